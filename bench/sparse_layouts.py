"""Sparse-DIP against the masked dense network in both activation layouts, round-robin:

    OMP_NUM_THREADS=1 python bench/sparse_layouts.py [--size 512] [--rounds 5]

bench/bench_sparse.py times the sparse generator against the masked dense network on
contiguous activations; on a CPU oneDNN runs the dense convolutions faster on channels-last
activations (what oes_fast.train_dense and the masked dense engine of train_sparse feed it,
oes_fast.loop.network_input). Here one training step (forward, MSE, backward, Adam; dense
gradients masked) and one forward of each, on the OES network (seed 0) with the published
pepper mask (../shared/data/oes_published_masks), every round timing each once in a rotating
order after one warm-up. Prints medians and the dense/sparse ratios (median of rounds).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

import torch

from oes_fast import masks, models
from oes_fast.sparse import SparseGenerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparse import train_step  # noqa: E402
from steps_interleaved import round_robin  # noqa: E402

MASK = Path(__file__).resolve().parents[2] / "shared" / "data" / "oes_published_masks" / "pepper_density0.05.npz"


def forward(net, z):
    def run():
        with torch.no_grad():
            net(z)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if not MASK.is_file():
        parser.error(f"needs {MASK}")
    model = models.skip_oes(seed=0)
    mask = masks.load_published(MASK, model)
    dense = mask.apply_(copy.deepcopy(model)).train()
    gen = SparseGenerator.from_masked(model, mask)
    z = models.dip_input(32, args.size, args.size, seed=1)
    z_cl = z.contiguous(memory_format=torch.channels_last)
    target = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
    runs = {
        "train: masked dense, contiguous": train_step(copy.deepcopy(dense), z, target, mask),
        "train: masked dense, channels-last": train_step(copy.deepcopy(dense), z_cl, target, mask),
        "train: sparse generator": train_step(gen, z, target),
        "forward: masked dense, contiguous": forward(dense, z),
        "forward: masked dense, channels-last": forward(dense, z_cl),
        "forward: sparse generator": forward(gen, z),
    }
    names, times = list(runs), round_robin(runs, args.rounds, warmup=1)
    print(f"{args.size}x{args.size}, {args.rounds} rounds, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    for name in names:
        print(f"{name:40s} median {1e3 * statistics.median(times[name]):8.1f} ms")
    for kind in ("train", "forward"):
        sparse = times[f"{kind}: sparse generator"]
        for layout in ("contiguous", "channels-last"):
            dense_t = times[f"{kind}: masked dense, {layout}"]
            print(f"{kind}: masked dense ({layout}) / sparse generator, median of rounds: "
                  f"{statistics.median(d / s for d, s in zip(dense_t, sparse)):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
