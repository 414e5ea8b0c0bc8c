"""Estimated GPU memory of one OES search step, without a GPU (issue 5, large images):

    python bench/memory_estimate.py [--sizes 512,1024,2048,4096] [--budget-gb 80] [--out bench/REPORT.md]

Runs one step of each variant on PyTorch's "meta" device, where every op computes shapes only
(our ops through their fake kernels), and follows the bytes of all live tensor storages with a
dispatch mode: the peak of live bytes during the step, above what was live before it. The
layout is the CUDA one (NCHW activations; channels-last is only used on a CPU). From the two
largest sizes: bytes per pixel and the largest square side (a multiple of 64) whose step
fits in the budget, as bench/gpu_suite.py computes it from measured peaks.

An estimate, not a measurement. Not counted: workspace inside kernels (cuDNN's, and the
padded input gradient our Triton backward writes before folding the borders back), the CUDA
caching allocator's rounding and fragmentation, and the CUDA context. bench/gpu_suite.py
measures the real peaks on a GPU (torch.cuda.max_memory_allocated).

Variants as in bench/memory_cpu.py: authors, unfused, fused, recompute.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_search_step import MEMORY_VARIANTS as VARIANTS, memory_variant_step  # noqa: E402

from oes_fast.memory import LiveBytes  # noqa: E402

BEGIN, END = "<!-- memory_estimate:begin -->", "<!-- memory_estimate:end -->"


def step_peak(variant: str, size: int) -> int:
    """Peak live bytes of the second step of `variant` at size x size, above the bytes alive before it."""
    import oes_fast

    model = oes_fast.models.skip_oes().to("meta")  # weight values do not matter here
    z = torch.empty(1, 32, size, size, device="meta")
    y = torch.empty(1, 3, size, size, device="meta")
    step = memory_variant_step(variant, model, z, y)
    step(0)
    with LiveBytes() as tracker:
        step(1)
    return tracker.peak


def render(peaks: dict, sizes: list[int], budget: float) -> str:
    from gpu_suite import largest_side

    lines = [f"### Estimated GPU memory of one search step (bench/memory_estimate.py)\n",
             "Peak of live tensor bytes during one step on the meta device (CUDA layout), above what was live "
             "before it. An estimate: no kernel workspace, allocator rounding or CUDA context (see the script). "
             f"Largest side: multiple of 64 whose step fits in {budget / 1e9:.0f} GB, from the two largest sizes.\n",
             "| variant | " + " | ".join(f"{s}x{s} GB" for s in sizes) + " | bytes/pixel | largest side | vs authors |",
             "|---|" + "---:|" * (len(sizes) + 3)]
    sides = {}
    for v in VARIANTS:
        side, per_px = largest_side([(s * s, peaks[v, s]) for s in sizes], budget)
        sides[v] = side
        row = " | ".join(f"{peaks[v, s] / 1e9:.2f}" for s in sizes)
        ratio = f"{side / sides['authors']:.2f}x" if side and sides.get("authors") else "-"
        lines.append(f"| {v} | {row} | {per_px:.0f} | {side} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024,2048,4096", help="square image sides, at least two")
    parser.add_argument("--budget-gb", type=float, default=80.0)
    parser.add_argument("--out", type=Path, help="markdown file to write the table into (section replaced)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) < 2:
        parser.error("--sizes needs at least two sizes (bytes per pixel is a slope)")
    peaks = {(v, s): step_peak(v, s) for s in sizes for v in VARIANTS}
    body = render(peaks, sizes, args.budget_gb * 1e9)
    print(body)
    if args.out:
        from gpu_suite import write_section

        write_section(args.out, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
