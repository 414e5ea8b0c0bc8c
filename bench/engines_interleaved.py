"""The search step's engines against each other, timed round-robin at one size:

    OMP_NUM_THREADS=2 python bench/engines_interleaved.py [--size 256] [--rounds 10]

engine="unfused" (the default), engine="fused" and engine="fused" with recompute=True (what
`oes-fast search --low-memory` runs), each as bench/bench_search_step.py builds it; timed as
bench/steps_interleaved.py times the baselines (every round times each engine once in a
rotating order, after 3 warm-up steps). Prints each engine's median and its time over the
unfused step's (median of the per-round ratios).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_search_step import memory_variant_step  # noqa: E402
from steps_interleaved import measure  # noqa: E402

ENGINES = ("unfused", "fused", "recompute")


def engine_step(variant):
    """A maker for steps_interleaved.measure: (model, z, y) -> a step with no arguments."""
    def make(model, z, y):
        run, count = memory_variant_step(variant, model, z, y), iter(range(10**9))
        return lambda: run(next(count))
    return make


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="square image side")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    before = os.getloadavg()[0]
    times = measure(args.size, args.rounds, {v: engine_step(v) for v in ENGINES})
    print(f"search step {args.size}x{args.size}, {args.rounds} rounds, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    for name, ts in times.items():
        ratio = statistics.median(t / u for t, u in zip(ts, times["unfused"]))
        print(f"{name:10s} median {1e3 * statistics.median(ts):7.1f} ms, {ratio:.2f}x the unfused step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
