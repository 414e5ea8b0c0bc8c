"""Writes bench/REPORT.md from pytest-benchmark JSON files (--benchmark-json).

    python bench/report.py RESULTS.json [MORE.json ...] [--out bench/REPORT.md]

Per group: median time, speedup over the authors'-style loop of the same group, elements/s,
and the memory floor (bytes that must move / memory bandwidth measured here by timing a
large torch copy). Also the machine, the torch and triton versions and the date.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from oes_fast.cli.common import cpu_model

HERE = Path(__file__).resolve().parent
METHOD_ORDER = ["fused", "compiled", "plain_torch", "authors_loop"]
METHOD_TEXT = {
    "fused": "oes_fast.gumbel_mask, one launch on the flat buffers",
    "compiled": "plain PyTorch under torch.compile (inductor)",
    "plain_torch": "plain PyTorch on the flat buffers (rand, clamp, log, sigmoid, mul)",
    "authors_loop": "authors' style: per-parameter two-class gumbel_softmax",
}


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def measure_bandwidth(mib: int = 256, repeats: int = 10) -> tuple[float, int, int]:
    """Copy bandwidth in bytes/s: median over `repeats` of dst.copy_(src), counting the read and
    the write (2 x the buffer), two buffers of `mib` MiB each (the default far larger than the
    caches; smaller ones show what the caches serve)."""
    n = mib * 2**20 // 4
    src = torch.rand(n)  # not zeros: some systems shortcut zero pages
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times), mib, repeats


def load(paths):
    rows, runs = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs.append(dict(path=str(path), datetime=data.get("datetime", "?"), machine=data.get("machine_info", {}),
                         gc_off=all(b.get("options", {}).get("disable_gc") for b in data.get("benchmarks", []))))
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            rows.append(dict(
                run=Path(path).name,
                name=bench["name"],
                group=bench.get("group") or info.get("group") or "ungrouped",
                method=info.get("method") or info.get("kind") or bench.get("param") or bench["name"],
                macs=info.get("macs"),
                density=info.get("density"),
                impl=info.get("impl"),
                median=bench["stats"]["median"],
                iqr=bench["stats"]["iqr"],
                minimum=bench["stats"]["min"],
                rounds=bench["stats"]["rounds"],
                elements=info.get("elements"),
                bytes_per_element=info.get("bytes_per_element"),
                baseline=bool(info.get("baseline")),
                threads=info.get("torch_threads", info.get("threads")),
                load=info.get("load_average") or _load_pair(info),
            ))
    return rows, runs


def _kept(run) -> str:
    kept = run["machine"].get("oes_keep_freed_memory")
    return "unrecorded" if kept is None else "yes" if kept else "no"


def _load_pair(info):
    before, after = info.get("load_average_before"), info.get("load_average_after")
    return [before, after] if before is not None and after is not None else None


def fmt_rate(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} "


def render(rows, runs, bandwidth) -> str:
    bw, mib, repeats = bandwidth
    threads = sorted({r["threads"] for r in rows if r["threads"] is not None})
    lines = [
        "# Benchmark report",
        "",
        f"Written by `bench/report.py` on {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} from "
        + ", ".join(f"`{r['path']}` (run {r['datetime']})" for r in runs) + ".",
        "",
        "## Machine",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch threads during the run: "
        f"{', '.join(map(str, threads)) or '?'}. No GPU: these are CPU timings.",
        f"- torch {torch.__version__}, triton {triton_version()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        f"- Memory bandwidth measured by this script: {bw / 1e9:.1f} GB/s (torch copy of a {mib} MiB float32 "
        f"buffer, read + write counted, median of {repeats}).",
        "- Python's garbage collector during timing: "
        + ", ".join(f"{'off' if r['gc_off'] else 'on'} in `{Path(r['path']).name}`" for r in runs)
        + " (`--benchmark-disable-gc`: in pytest's large heap a full collection costs tens of ms and lands on "
        "whichever step allocates the most Python objects).",
        "- glibc keeping freed memory (`OES_BENCH_KEEP_FREED_MEMORY=1`, as the `oes-fast` command runs; "
        "`oes_fast/allocator.py`): "
        + ", ".join(f"{_kept(r)} in `{Path(r['path']).name}`" for r in runs) + ".",
        f"- The machine is shared with other users: absolute times move from run to run, the ratios "
        f"within one run are what to read, and only when the 1-minute load average (last column) stayed "
        f"at or below the {os.cpu_count()} cores during the run.",
        "",
    ]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["run"], r["group"])].append(r)
    peak = max((2 * r["macs"] / r["median"] for r in rows if r["group"] == "peak" and r["macs"]), default=None)
    for (run, group), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "forward", kv[0][1])):
        title = f"### {group}" + (f" ({run})" if len(runs) > 1 else "")
        lines += [title, ""]
        if any(r["density"] is not None and r["impl"] for r in members):
            lines += render_sweep(members)
            continue
        members.sort(key=lambda r: (METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99, r["name"]))
        base = next((r for r in members if r["baseline"]), None)
        elements = members[0]["elements"]
        bpe = members[0]["bytes_per_element"]
        if elements:
            lines.append(f"{elements:,} elements (every parameter of the OES network), float32.")
        if bpe and elements:
            floor = bpe * elements / bw
            lines.append(f"Memory floor: {bpe} B/element x {elements:,} = {bpe * elements / 1e6:.1f} MB, "
                         f"{floor * 1e3:.2f} ms at {bw / 1e9:.1f} GB/s.")
        if base:
            lines.append(f"Ratio = median of the baseline `{base['method']}` / median of the method (above 1: faster).")
        lines += [
            "",
            "| method | median (ms) | IQR (ms) | rounds | vs baseline | rate | memory floor / median | load avg before/after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in members:
            speedup = f"{base['median'] / r['median']:.2f}x" if base else "-"
            if r["elements"]:
                rate = fmt_rate(r["elements"] / r["median"]) + "elem/s"
            elif r["macs"]:
                gflops = 2 * r["macs"] / r["median"] / 1e9
                rate = f"{gflops:.1f} GFLOP/s" + (f" ({gflops * 1e9 / peak:.0%} of peak)" if peak else "")
            else:
                rate = "-"
            frac = f"{(r['bytes_per_element'] * r['elements'] / bw) / r['median']:.1%}" if r["bytes_per_element"] else "-"
            load = "/".join(f"{x:.1f}" for x in r["load"]) if r["load"] else "-"
            label = f"`{r['method']}`" + (f": {METHOD_TEXT[r['method']]}" if r["method"] in METHOD_TEXT else "")
            lines.append(f"| {label} | {r['median'] * 1e3:.2f} | {r['iqr'] * 1e3:.2f} | {r['rounds']} | {speedup} "
                         f"| {rate} | {frac} | {load} |")
        lines.append("")
    if peak:
        lines += [f"Peak: the fastest `peak` benchmark of the run, {peak / 1e9:.1f} GFLOP/s; GFLOP/s count the "
                  "multiply-adds actually executed (dense or kept only) as 2 FLOPs each.", ""]
    lines += [
        "Ratios compare medians of the same group and run. 'memory floor / median' near 100 % would "
        "mean bandwidth-bound. Mask sampling is compute-bound on a CPU (10 Philox rounds, two logs "
        "and an exp per element), so its floor is far away.",
        "",
    ]
    return "\n".join(lines)


def render_sweep(members) -> list[str]:
    """Density sweep: sparse against dense per density, with the crossover marked."""
    by_density = defaultdict(dict)
    for r in members:
        by_density[r["density"]][r["impl"]] = r
    lines = ["| density | sparse (ms) | dense (ms) | dense / sparse | faster |", "|---:|---:|---:|---:|---|"]
    crossover = None
    for density in sorted(by_density):
        pair = by_density[density]
        if "sparse" not in pair or "dense" not in pair:
            continue
        ratio = pair["dense"]["median"] / pair["sparse"]["median"]
        if ratio < 1 and crossover is None:
            crossover = density
        lines.append(f"| {density:.2f} | {pair['sparse']['median'] * 1e3:.2f} | {pair['dense']['median'] * 1e3:.2f} "
                     f"| {ratio:.2f}x | {'sparse' if ratio >= 1 else 'dense'} |")
    lines += ["", f"Crossover: dense wins from density {crossover:.2f} on." if crossover is not None
              else "Crossover: sparse wins at every density measured.", ""]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--out", default=str(HERE / "REPORT.md"))
    args = parser.parse_args(argv)
    rows, runs = load(args.json)
    if not rows:
        raise SystemExit("no benchmarks in " + ", ".join(args.json))
    text = render(rows, runs, measure_bandwidth())
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    # sections written by other scripts (bench/gpu_suite.py, bench/memory_*.py,
    # bench/steps_interleaved.py), between <!-- NAME:begin --> and <!-- NAME:end -->, are kept
    for section in re.finditer(r"<!-- (\S+):begin -->.*?<!-- \1:end -->", old, flags=re.S):
        text += "\n" + section.group(0) + "\n"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
