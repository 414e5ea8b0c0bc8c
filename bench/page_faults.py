"""Page faults and time of one OES search step with glibc's default allocator and with freed
memory kept (oes_fast.allocator.keep_freed_memory, as the oes-fast command runs):

    OMP_NUM_THREADS=2 python bench/page_faults.py [--size 256] [--steps 10]

Each policy runs in a fresh process (the allocator's state depends on what ran before): the
bench_search_step.py problem, 3 warm-up steps, then `--steps` steps, each with its minor page
faults (getrusage) and wall time. Prints the medians. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = ("default", "kept")


def child(policy: str, size: int, steps: int) -> dict:
    """One policy's measurement, in this process."""
    if policy == "kept":
        from oes_fast.allocator import keep_freed_memory

        keep_freed_memory()
    sys.path.insert(0, str(HERE))
    from bench_search_step import SearchStep, problem

    step = SearchStep(*problem(size))
    for _ in range(3):
        step()
    faults, seconds = [], []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return dict(policy=policy, faults=statistics.median(faults), ms=1e3 * statistics.median(seconds),
                ms_range=(1e3 * min(seconds), 1e3 * max(seconds)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="square image side")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.steps)))
        return 0
    env = dict(os.environ)
    env.pop("OES_BENCH_KEEP_FREED_MEMORY", None)  # the child sets the policy itself
    print(f"search step {args.size}x{args.size}, {args.steps} steps after 3 warm-up, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.2f}")
    for policy in POLICIES:
        out = subprocess.run([sys.executable, __file__, "--child", policy, "--size", str(args.size), "--steps",
                              str(args.steps)], env=env, check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{policy:8s} median {r['faults']:8.0f} minor page faults per step, median {r['ms']:6.1f} ms "
              f"(range {r['ms_range'][0]:.1f}-{r['ms_range'][1]:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
