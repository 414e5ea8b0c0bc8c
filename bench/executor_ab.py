"""The Sparse-DIP forward without autograd: the C++ executor against the Python loop, alternating.

    OMP_NUM_THREADS=1 python bench/executor_ab.py [--size 512] [--pairs 200] [--threads 1]

The problem is bench/bench_sparse.py's: the OES network (seed 0) with the published pepper mask
(density 0.05) on fresh weights, z = dip_input(32, S, S, seed 0), batch statistics. One
SparseGenerator runs its forward under torch.no_grad with `use_executor` on (one C++ call,
oes_fast._C.GeneratorForward) and off (SparseGenerator.run_stage in a Python loop), the two in
alternating pairs after warm-up, the garbage collector off. Prints whether the outputs are the same
bits, each way's median and minimum, and the median of the per-pair ratios (Python / executor;
above 1: the executor is faster). A development tool; nothing in the package or the tests uses it.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sparse  # noqa: E402
from oes_fast import models  # noqa: E402
from oes_fast.allocator import keep_freed_memory  # noqa: E402
from oes_fast.sparse import SparseGenerator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    model = models.skip_oes(seed=0)
    gen = SparseGenerator.from_masked(model, bench_sparse._mask(model))
    z = models.dip_input(32, args.size, args.size, seed=0)
    gc.disable()
    times = {True: [], False: []}
    with torch.no_grad():
        outputs = {}
        for executor in (False, True, True):  # (the first call with the executor records it)
            gen.use_executor = executor
            outputs[executor] = gen(z)
        for _ in range(5):
            for executor in (True, False):
                gen.use_executor = executor
                gen(z)
        for k in range(args.pairs):
            for executor in ((True, False) if k % 2 else (False, True)):
                gen.use_executor = executor
                start = time.perf_counter()
                gen(z)
                times[executor].append(time.perf_counter() - start)
    ratios = [p / e for e, p in zip(times[True], times[False])]
    print(f"{args.size}x{args.size}, {args.threads} thread(s), {args.pairs} pairs; "
          f"the same bits: {torch.equal(outputs[True], outputs[False])}")
    for executor, name in ((True, "executor"), (False, "python loop")):
        t = times[executor]
        print(f"  {name:12s} median {statistics.median(t) * 1e3:.3f} ms, min {min(t) * 1e3:.3f} ms")
    print(f"  python loop / executor: {statistics.median(ratios):.3f} (median of the per-pair ratios)")


if __name__ == "__main__":
    main()
