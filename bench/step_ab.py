"""Two versions of the package, the Sparse-DIP training step timed in alternating fresh processes.

    git archive REV | tar -x -C OLD && (cd OLD && python setup.py build_ext --inplace)  # once
    python bench/step_ab.py --old OLD [--threads 2] [--size 256] [--mask bundled|pepper]
        [--pairs 8] [--steps 40] [--forward]

The step is the default job's: OES network (seed 0), the mask (`bundled`: masks.bundled for the
image's pixels, as `oes-fast` picks it; `pepper`: the published pepper mask at density 0.05),
z = dip_input(32, S, S, seed 0), a random target, zero_grad + forward + MSE + backward + Adam (lr
0.01, oes_fast.train.adam) on SparseGenerator.from_masked; with --forward, the forward alone
under torch.no_grad. Each child imports the package from its root (OLD, or this working tree),
runs 5 warm-up steps and times --steps steps; pairs
alternate which version runs first. Per pair the two children's minimum and median step times;
at the end the medians over pairs and the median of the per-pair ratios old / new (above 1: the
working tree is faster), by minimum (the least disturbed step: on this shared machine a step's
time drifts by 20 % within minutes, mostly upwards) and by median. A development tool; nothing
in the package or the tests uses it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, statistics, sys, time, torch
from oes_fast import masks, models
from oes_fast.allocator import keep_freed_memory
from oes_fast.sparse import SparseGenerator
from oes_fast.train import adam
threads, size, mask_name, steps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
forward_only = sys.argv[6] == "forward"
keep_freed_memory()
torch.set_num_threads(threads)
model = models.skip_oes(seed=0)
if mask_name == "bundled":
    mask = masks.bundled(pixels=size * size)
else:
    sys.path.insert(0, sys.argv[5])
    import bench_sparse
    mask = bench_sparse._mask(model)
gen = SparseGenerator.from_masked(model, mask)
z = models.dip_input(32, size, size, seed=0)
y = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2))
opt = adam(list(gen.parameters()), 0.01)
def step():
    if forward_only:
        with torch.no_grad():
            return gen(z)
    opt.zero_grad(set_to_none=False)
    loss = torch.nn.functional.mse_loss(gen(z), y)
    loss.backward()
    opt.step()
    return loss.item()
for _ in range(5):
    step()
times = []
for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
print(json.dumps(dict(min=min(times), median=statistics.median(times), file=__import__("oes_fast").__file__)))
"""


def child(root: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    # run from an empty folder, so that the working directory's package does not shadow `root`
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), str(args.size), args.mask, str(args.steps),
                          str(ROOT / "bench"), "forward" if args.forward else "step"],
                         cwd=args.cwd, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["file"]).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"the child imported {result['file']}, not the package under {root}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="root of the other version (its oes_fast/ built)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--mask", choices=("bundled", "pepper"), default="bundled")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--forward", action="store_true", help="time the forward without autograd instead of the step")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as cwd:
        args.cwd = cwd
        runs = {"old": [], "new": []}
        for i in range(args.pairs):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            got = {v: child(args.old if v == "old" else ROOT, args) for v in order}
            for v in order:
                runs[v].append(got[v])
            print(f"pair {i}: old min {got['old']['min'] * 1e3:.2f} / median {got['old']['median'] * 1e3:.2f} ms, "
                  f"new min {got['new']['min'] * 1e3:.2f} / median {got['new']['median'] * 1e3:.2f} ms", flush=True)
    what = "forwards" if args.forward else "steps"
    print(f"{args.size}x{args.size}, {args.mask} mask, {args.threads} thread(s), {args.pairs} pairs of {args.steps} {what}:")
    for key in ("min", "median"):
        old = [r[key] for r in runs["old"]]
        new = [r[key] for r in runs["new"]]
        ratios = [a / b for a, b in zip(old, new)]
        print(f"  by {key}: old {statistics.median(old) * 1e3:.2f} ms, new {statistics.median(new) * 1e3:.2f} ms, "
              f"old / new {statistics.median(ratios):.3f} (pairs {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
