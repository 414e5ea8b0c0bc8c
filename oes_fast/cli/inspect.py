"""`oes-fast inspect`: a mask file's per-layer densities, its health and a plot."""
from __future__ import annotations

import os

from .common import load_mask_file


def run(args) -> int:
    from .. import masks, models, plots

    mask = load_mask_file(args.mask)
    print(f"{args.mask}: kept {mask.kept:,} of {mask.numel:,} parameters, "
          f"density {mask.density:.4f} (sparsity {mask.sparsity:.4f})")
    print(f"{'parameter':40s} {'shape':>18s} {'kept':>9s} {'numel':>9s} {'density':>8s} {'empty out ch':>12s}")
    for row in mask.layer_stats():
        empty = f"{row['empty_out_channels']}/{row['out_channels']}" if "out_channels" in row else ""
        print(f"{row['name']:40s} {str(tuple(row['shape'])):>18s} {row['kept']:9d} {row['numel']:9d} "
              f"{row['density']:8.4f} {empty:>12s}")
    if mask.architecture:
        model = models.build(mask.architecture)
        mask.check_fits(model)
        print("health:", masks.health(mask, model).message)
    folder = args.out or os.path.dirname(os.path.abspath(args.mask))
    os.makedirs(folder, exist_ok=True)
    plot = os.path.join(folder, os.path.basename(args.mask).rsplit(".", 1)[0] + "_density.png")
    plots.layer_densities({os.path.basename(args.mask): mask}, plot)
    print(f"plot: {plot}")
    return 0
