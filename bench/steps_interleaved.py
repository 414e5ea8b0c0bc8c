"""The search step against its baselines, timed round-robin (bench/bench_search_step.py's steps):

    python bench/steps_interleaved.py [--size 256] [--rounds 20] [--out bench/REPORT.md]

pytest-benchmark times each step's rounds back to back, so on a shared machine a burst of
load can land on one step and not on another, and the ratios between steps move from run to
run. Here every round times each of the four steps once, in an order that rotates from round
to round, so all of them see the same conditions; the ratio of two steps is taken within each
round and its median reported. Each step is warmed up 3 times first. Uses the torch thread
count (OMP_NUM_THREADS); OES_BENCH_KEEP_FREED_MEMORY=1 runs it with glibc keeping freed memory
(oes_fast/allocator.py), as the oes-fast command does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_search_step import KEEP_FREED_MEMORY, STEPS, problem  # noqa: E402

WARMUP = 3


def measure(size: int, rounds: int, makers=None) -> dict[str, list[float]]:
    """Seconds per step of each method (`makers`: name -> class or function that takes
    (model, z, y) and returns a step callable with no arguments; default STEPS), one list entry
    per round."""
    return round_robin({name: make(*problem(size)) for name, make in (STEPS if makers is None else makers).items()},
                       rounds)


def round_robin(steps: dict, rounds: int, warmup: int = WARMUP) -> dict[str, list[float]]:
    """Seconds per call of each of `steps` (name -> callable with no arguments), one list entry
    per round: each is called `warmup` times, then every round calls each once, in an order
    that rotates from round to round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def quartiles(xs):
    q1, med, q3 = statistics.quantiles(xs, n=4)
    return q1, med, q3


def render(times: dict[str, list[float]], size: int, rounds: int, load: tuple[float, float]) -> str:
    threads = torch.get_num_threads()
    kept = ", freed memory kept" if KEEP_FREED_MEMORY else ""
    lines = [f"### Search step against its baselines, round-robin, {size}x{size}, {threads} thread"
             f"{'s' if threads > 1 else ''}{kept} (bench/steps_interleaved.py)\n",
             f"{rounds} rounds, each timing every step once in a rotating order; ratios per round, "
             f"their median. Load average {load[0]:.2f} before, {load[1]:.2f} after.\n",
             "| step | median ms | quartiles ms | search step over it (median of rounds) |",
             "|---|---:|---:|---:|"]
    search = times["search_step"]
    for name, ts in times.items():
        q1, med, q3 = quartiles(ts)
        ratio = statistics.median(s / t for s, t in zip(search, ts))
        lines.append(f"| {name} | {1e3 * med:.1f} | {1e3 * q1:.1f}-{1e3 * q3:.1f} | {ratio:.3f} |")
    faster = statistics.median(a / s for s, a in zip(search, times["authors_step"]))
    lines.append(f"\nauthors_step / search_step, median of rounds: {faster:.2f}x")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="square image side")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, help="markdown file to write the table into (section replaced)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    before = os.getloadavg()[0]
    times = measure(args.size, args.rounds)
    body = render(times, args.size, args.rounds, (before, os.getloadavg()[0]))
    print(body)
    if args.out:
        from gpu_suite import write_section

        # one section per size, thread count and allocator policy
        name = f"steps_interleaved_{args.size}_{torch.get_num_threads()}t{'_kept' if KEEP_FREED_MEMORY else ''}"
        write_section(args.out, body, f"<!-- {name}:begin -->", f"<!-- {name}:end -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
