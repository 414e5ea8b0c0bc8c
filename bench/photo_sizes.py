"""Sparse-DIP training at photo sizes: step time and peak memory of the sparse generator against
the masked dense network, per image side (issue 16):

    OMP_NUM_THREADS=1 python bench/photo_sizes.py [--sizes 512,1024,2048] [--rounds 3] [--quick]
        [--allocator kept|default] [--out bench/REPORT.md] [--json bench/photo_sizes.json]
    python bench/photo_sizes.py --from-json bench/photo_sizes.json   # render again, no measuring

The problem is bench/bench_sparse.py's at side S (OES network seed 0, the published pepper mask
at density 0.05 on fresh weights, z = dip_input(32, S, S, seed 1), a random target). Engines:
  sparse  SparseGenerator.from_masked(model, mask), Adam over its parameters (lr 0.01);
  dense   the model with the mask applied, gradients multiplied by the mask before Adam (lr 0.01):
          bench_sparse.py's test_train_step_dense_masked, what a user would otherwise run.
A step is zero_grad, forward, MSE loss, backward, Adam. Every (engine, size) runs in a fresh
child process, one thread: one warm-up step, then a few timed steps (5 up to 512, 4 at 1024, 3
from 2048 on; --steps overrides). Peak memory: resource.getrusage(RUSAGE_SELF).ru_maxrss of the
child after its steps (absolute), and that minus the resident set just before the warm-up step
(the step's own peak: activations, gradients, Adam state, allocator slack). Bytes per pixel:
the slope of the step peak between consecutive sizes. Time per pixel: median step time / S^2,
and its change from the smallest size (target: within 15 % from 512 to 2048).

Before a size is launched, its absolute peak is estimated from the smaller sizes of the same
engine (linear in pixels through the two largest measured, proportional to pixels from one) and
the run is skipped, with the estimate in the table, if it would exceed 60 % of MemAvailable at
that moment (other jobs on the machine need their memory).

Every round runs every size, ascending, and within a size both engines (sparse first in even
rounds, dense first in odd ones), so that a drift of the machine's load touches all sizes and
both engines alike; the step time of an (engine, size) is the median over the timed steps of all
its rounds, the dense / sparse ratio the median of the per-round ratios of medians.

Allocator: by default glibc keeps freed memory (oes_fast.allocator.keep_freed_memory, as the
oes-fast command runs, with its 1 GiB limit); --allocator default leaves glibc's own policy.
Writes a markdown section between <!-- photo_sizes:begin --> and <!-- photo_sizes:end --> of
--out and the raw numbers to --json. The machine is shared: the 1-minute load average of each
child is recorded (before/after).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- photo_sizes:begin -->", "<!-- photo_sizes:end -->"
ENGINES = ("sparse", "dense")
MEMORY_FRACTION = 0.6
TARGET = 0.15


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def default_steps(size: int) -> int:
    return 5 if size <= 512 else 4 if size <= 1024 else 3


# ------------------------------------------------------------------------------ child
def child(engine: str, size: int, steps: int, allocator: str) -> dict:
    """One (engine, size) measurement, in this process."""
    import resource
    import time

    kept = False
    if allocator == "kept":
        from oes_fast.allocator import keep_freed_memory

        kept = keep_freed_memory()
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from bench_sparse import train_step
    from sparse_profile import problem

    from oes_fast.sparse import SparseGenerator

    load_before = os.getloadavg()[0]
    p = problem(size)
    if engine == "sparse":
        step = train_step(SparseGenerator.from_masked(p["model"], p["mask"]), p["z"], p["target"])
    else:
        step = train_step(p["dense"], p["z"], p["target"], p["mask"])
    del p

    rss_before = _status("VmRSS")
    times = []
    for i in range(1 + steps):
        if i == 1:
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return dict(engine=engine, size=size, steps=steps, warmup_s=times[0], times_s=times[1:],
                median_s=statistics.median(times[1:]), rss_before=rss_before, max_rss=ru.ru_maxrss * 1024,
                step_peak=ru.ru_maxrss * 1024 - rss_before, minor_faults_per_step=(ru.ru_minflt - faults0) / steps,
                load_before=load_before, load_after=os.getloadavg()[0], allocator_kept=kept,
                threads=torch.get_num_threads(), torch=torch.__version__)


def measure(engine: str, size: int, steps: int, allocator: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", engine, str(size), str(steps), allocator], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ parent
def estimate(measured: dict[int, int], size: int) -> int | None:
    """Absolute peak at `size` from {side: absolute peak} of smaller sides, or None."""
    smaller = sorted(s for s in measured if s < size)
    if not smaller:
        return None
    if len(smaller) == 1:
        s = smaller[0]
        return int(measured[s] * size * size / (s * s))
    lo, hi = smaller[-2:]
    slope = (measured[hi] - measured[lo]) / (hi * hi - lo * lo)
    return int(measured[hi] + slope * (size * size - hi * hi))


def run_all(sizes: list[int], rounds: int, steps_override: int | None, allocator: str) -> dict:
    runs, skipped = [], {}
    peaks = {e: {} for e in ENGINES}
    for r in range(rounds):  # rounds outermost: a drift of the machine's load touches every size alike
        for size in sizes:
            steps = steps_override or default_steps(size)
            order = ENGINES if r % 2 == 0 else ENGINES[::-1]
            for engine in order:
                if (engine, size) in skipped:
                    continue
                est = estimate(peaks[engine], size)
                avail = mem_available()
                if est is not None and est > MEMORY_FRACTION * avail:
                    skipped[engine, size] = dict(estimate=est, mem_available=avail)
                    print(f"{engine:6s} {size:5d}: skipped, estimated peak {est / 2**30:.1f} GiB > "
                          f"{MEMORY_FRACTION:.0%} of MemAvailable {avail / 2**30:.1f} GiB", flush=True)
                    continue
                res = measure(engine, size, steps, allocator)
                res.update(round=r, estimate=est, mem_available=avail)
                runs.append(res)
                peaks[engine][size] = max(peaks[engine].get(size, 0), res["max_rss"])
                print(f"{engine:6s} {size:5d} round {r}: median step {res['median_s'] * 1e3:.0f} ms, "
                      f"peak {res['max_rss'] / 2**20:.0f} MiB (step {res['step_peak'] / 2**20:.0f} MiB), "
                      f"load {res['load_before']:.2f}/{res['load_after']:.2f}", flush=True)
    return dict(runs=runs, skipped=[dict(engine=e, size=s, **v) for (e, s), v in skipped.items()])


def summarize(data: dict, sizes: list[int]) -> list[dict]:
    rows = []
    for engine in ENGINES:
        base = None
        prev = None
        for size in sizes:
            rs = [r for r in data["runs"] if r["engine"] == engine and r["size"] == size]
            skip = next((s for s in data["skipped"] if s["engine"] == engine and s["size"] == size), None)
            if not rs:
                rows.append(dict(engine=engine, size=size, skipped=skip))
                continue
            times = [t for r in rs for t in r["times_s"]]
            med = statistics.median(times)
            step_peak = statistics.median(r["step_peak"] for r in rs)
            max_rss = max(r["max_rss"] for r in rs)
            px = size * size
            row = dict(engine=engine, size=size, runs=len(rs), timed_steps=len(times), median_s=med,
                       min_s=min(times), max_s=max(times), s_per_mpx=med / px * 1e6, step_peak=step_peak,
                       max_rss=max_rss, rss_before=statistics.median(r["rss_before"] for r in rs),
                       step_bytes_per_px=step_peak / px,
                       faults_per_step=statistics.median(r["minor_faults_per_step"] for r in rs),
                       load=[(r["load_before"], r["load_after"]) for r in rs], skipped=None)
            if prev is not None:
                row["slope_bytes_per_px"] = (step_peak - prev["step_peak"]) / (px - prev["size"] ** 2)
            if base is None:
                base = row
            row["tpp_change"] = row["s_per_mpx"] / base["s_per_mpx"] - 1
            row["tpp_base_size"] = base["size"]
            # the same, per round (both sizes timed in the same round), then the median over rounds
            per_round = []
            for r in rs:
                b = [x for x in data["runs"] if x["engine"] == engine and x["size"] == base["size"]
                     and x["round"] == r["round"]]
                if b:
                    per_round.append((r["median_s"] / px) / (b[0]["median_s"] / base["size"] ** 2) - 1)
            row["tpp_change_per_round"] = per_round
            rows.append(row)
            prev = row
    # dense / sparse per size: median over rounds of the ratio of the rounds' medians
    for size in sizes:
        ratios = []
        for r in range(max((x["round"] for x in data["runs"]), default=-1) + 1):
            s = [x for x in data["runs"] if x["engine"] == "sparse" and x["size"] == size and x["round"] == r]
            d = [x for x in data["runs"] if x["engine"] == "dense" and x["size"] == size and x["round"] == r]
            if s and d:
                ratios.append(d[0]["median_s"] / s[0]["median_s"])
        for row in rows:
            if row["size"] == size and row["engine"] == "dense" and ratios:
                row["dense_over_sparse"] = statistics.median(ratios)
    return rows


def render(data: dict, rows: list[dict], sizes: list[int], quick: bool) -> str:
    from oes_fast.cli.common import cpu_model

    loads = [x for r in data["runs"] for x in (r["load_before"], r["load_after"])]
    la = data["load_at_start"]
    # the machine as measured (files written before these keys: the machine rendering them)
    isa = f", {data['isa']} kernels" if "isa" in data else ""
    cpu, cores = data.get("cpu") or cpu_model(), data.get("cores") or os.cpu_count()
    lines = [f"### Sparse-DIP training at photo sizes: {cpu} ({cores} cores{isa}), {data['date']}, 1 thread, "
             f"load average {la:.2f} (bench/photo_sizes.py)" + (" - quick smoke run" if quick else "") + "\n",
             f"torch {data['torch']}, allocator: {data['allocator']}. One step = zero_grad, forward, MSE, backward, "
             f"Adam (lr 0.01); OES network, published pepper mask (density 0.05) on fresh weights. Each (engine, "
             f"size) in a fresh child process, {data['rounds']} round(s), each over all sizes and both engines; per child one "
             f"warm-up step then the timed steps (column 'steps': all rounds together). Peak = ru_maxrss of the "
             f"child (absolute); step peak = that minus the resident set before the warm-up step; slope = bytes "
             f"per pixel of the step peak from the previous size; faults/step: minor page faults per timed step. 1-minute load average of the children "
             f"{min(loads, default=0):.2f}-{max(loads, default=0):.2f} (the child itself counts for about 1 of it; "
             f"above about 1.5 other jobs shared the cores and absolute times are inflated): ratios within a size "
             f"are what to read.\n",
             "| engine | side | steps | median step s | s / Mpixel | change vs " + str(sizes[0]) + " | same, per round | "
             "dense / sparse | peak MiB | step peak MiB | step bytes/px | slope bytes/px | faults/step | load |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("skipped") is not None or "median_s" not in r:
            sk = r.get("skipped")
            why = (f"skipped: estimated peak {sk['estimate'] / 2**20:.0f} MiB > {MEMORY_FRACTION:.0%} of "
                   f"MemAvailable ({sk['mem_available'] / 2**20:.0f} MiB)" if sk else "not run")
            lines.append(f"| {r['engine']} | {r['size']} | {why} |" + " |" * 11)
            continue
        ratio = f"{r['dense_over_sparse']:.2f}x" if "dense_over_sparse" in r else "-"
        slope = f"{r['slope_bytes_per_px']:.0f}" if "slope_bytes_per_px" in r else "-"
        load = ", ".join(f"{x:.1f}/{y:.1f}" for x, y in r["load"])
        per_round = ", ".join(f"{100 * c:+.0f} %" for c in r.get("tpp_change_per_round", [])) or "-"
        lines.append(
            f"| {r['engine']} | {r['size']} | {r['timed_steps']} | {r['median_s']:.3f} | {r['s_per_mpx']:.3f} | "
            f"{100 * r['tpp_change']:+.1f} % | {per_round} | {ratio} | {r['max_rss'] / 2**20:.0f} | {r['step_peak'] / 2**20:.0f} | "
            f"{r['step_bytes_per_px']:.0f} | {slope} | {r['faults_per_step']:.0f} | {load} |")
    # the target
    sp = {r["size"]: r for r in rows if r["engine"] == "sparse" and "median_s" in r}
    if len(sp) >= 2:
        lo, hi = min(sp), max(sp)
        ch = sp[hi]["s_per_mpx"] / sp[lo]["s_per_mpx"] - 1
        pr = sp[hi].get("tpp_change_per_round", [])
        lines += ["", f"Sparse time per pixel from {lo} to {hi}: {100 * ch:+.1f} % from the pooled medians"
                  + (f", {100 * statistics.median(pr):+.1f} % as the median of the per-round changes" if pr else "")
                  + f" (target: within {TARGET:.0%}). Per round the sizes run minutes apart, so a change of the "
                  "machine's load between them moves these figures; the load column shows it."]
    checks = [r for r in data["runs"] if r.get("estimate") is not None and r["round"] == 0]
    if checks:
        lines += ["", "Memory check before each launch (first round): " + "; ".join(
            f"{r['engine']} {r['size']}: estimated peak {r['estimate'] / 2**20:.0f} MiB against "
            f"{MEMORY_FRACTION:.0%} of MemAvailable = {MEMORY_FRACTION * r['mem_available'] / 2**20:.0f} MiB, "
            f"ran (measured {r['max_rss'] / 2**20:.0f} MiB)" for r in checks) + "."]
    lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024,2048", help="square image sides, ascending")
    parser.add_argument("--rounds", type=int, default=3, help="child runs per (engine, size); each round runs all")
    parser.add_argument("--steps", type=int, help="timed steps per child (default: 5 up to 512, 4 at 1024, 3 beyond)")
    parser.add_argument("--quick", action="store_true", help="fast smoke run: sides 256,512, 1 round, 2 timed steps")
    parser.add_argument("--allocator", choices=("kept", "default"), default="kept")
    parser.add_argument("--out", type=Path, default=HERE / "REPORT.md", help="markdown file (section replaced)")
    parser.add_argument("--json", type=Path, default=HERE / "photo_sizes.json")
    parser.add_argument("--from-json", type=Path, help="render a saved --json file again, measuring nothing")
    parser.add_argument("--child", nargs=4, metavar=("ENGINE", "SIZE", "STEPS", "ALLOCATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        e, s, n, a = args.child
        print(json.dumps(child(e, int(s), int(n), a)))
        return 0
    sizes = [int(s) for s in ("256,512" if args.quick and args.sizes == "512,1024,2048" else args.sizes).split(",")]
    if sizes != sorted(sizes):
        parser.error("--sizes must be ascending")
    rounds = 1 if args.quick else args.rounds
    steps = args.steps or (2 if args.quick else None)
    sys.path.insert(0, str(HERE))  # report, gpu_suite
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        sizes, args.quick = data["sizes"], data["quick"]
    else:
        import torch

        from oes_fast import _C
        from oes_fast.cli.common import cpu_model

        start_load = os.getloadavg()[0]
        data = run_all(sizes, rounds, steps, args.allocator)
        data.update(sizes=sizes, rounds=rounds, load_at_start=start_load, quick=args.quick,
                    date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
                    allocator=("glibc keeps freed memory (keep_freed_memory)" if args.allocator == "kept" and
                               all(r["allocator_kept"] for r in data["runs"]) else "glibc default"),
                    memory_fraction=MEMORY_FRACTION, cpu=cpu_model(), cores=os.cpu_count(), isa=_C.cpu_isa())
    rows = summarize(data, sizes)
    data["rows"] = rows
    body = render(data, rows, sizes, args.quick)
    print(body)
    if not args.from_json:  # (a re-render leaves the saved measurements, and bench/photo_sizes.json, alone)
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    from gpu_suite import write_section

    write_section(args.out, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
