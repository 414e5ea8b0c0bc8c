"""The search step's CPU kernels alone, on the OES network's 3,008,867 parameters:

    OMP_NUM_THREADS=2 python bench/search_kernels.py [--repeats 50]

Times `philox_uniform` (the random stream, oes_fast.rng.uniform), `gumbel_mask_with_slope`
(masked weights and their slope) and `logit_adam_step_` (chain rule, KL prior and Adam in
place), each on inputs of the search step's size, after 5 warm-up calls; prints the median
and quartiles in ms. Complements bench/bench_gumbel_mask.py (gumbel_mask against the
authors'-style sampling) and bench/bench_search_step.py (the whole step).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from oes_fast import models, ops, rng

SEED, OFFSET, TAU, DENSITY, KL, LR = 1234, 0, 0.2, 0.05, 1e-9, 0.01


def timed(fn, repeats: int) -> list[float]:
    for _ in range(5):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    n = sum(p.numel() for p in models.skip_oes().parameters())
    g = torch.Generator().manual_seed(0)
    logits, weights, grad = (torch.randn(n, generator=g) for _ in range(3))
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    slope = ops.gumbel_mask_with_slope(logits, weights, SEED, OFFSET, TAU)[1]
    kernels = {
        "philox_uniform": lambda: rng.uniform((n,), SEED, OFFSET),
        "gumbel_mask_with_slope": lambda: ops.gumbel_mask_with_slope(logits, weights, SEED, OFFSET, TAU),
        # step fixed at 1: the same work every call (the logits drift, which changes no cost)
        "logit_adam_step_": lambda: ops.logit_adam_step_(logits, exp_avg, exp_avg_sq, grad, step=1, density=DENSITY,
                                                         kl=KL, lr=LR, grad_scale=slope),
    }
    print(f"{n:,} elements, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    for name, fn in kernels.items():
        q1, med, q3 = statistics.quantiles(timed(fn, args.repeats), n=4)
        print(f"{name:24s} median {1e3 * med:6.2f} ms (quartiles {1e3 * q1:.2f}-{1e3 * q3:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
