"""How long the default job takes on a photo, and how close the pre-run estimate was (issue 13):

    python scripts/restore_timing.py --sizes 256,512,1024 --out docs/restore_timing.json

For each size: a noisy photo (pepper from ../shared/data, center-cropped to 256 or whole at 512,
enlarged x2 with Lanczos for 1024; Gaussian noise sigma 0.1, seed 0, saved as an 8-bit PNG) is
restored by `oes-fast denoise PHOTO` as a new user runs it (the quick budget, no reference), in
a fresh process. Recorded: the estimate the command printed, the run's own time after the
estimate (search + training, from report.json), the whole command's wall time, the thread count,
the processor and its copy of the CPU kernels, and the load average. Writes a JSON file (one row
per size, thread count and copy of the kernels) and prints a markdown table.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
PEPPER = os.path.join(HERE, "..", "..", "shared", "data", "images", "pepper.png")


def noisy_photo(size: int, folder: str) -> str:
    im = Image.open(PEPPER).convert("RGB")
    if size < 512:
        left = (512 - size) // 2
        im = im.crop((left, left, left + size, left + size))
    elif size > 512:
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    clean = np.asarray(im, dtype=np.float64) / 255.0
    noise = np.random.default_rng(0).standard_normal(clean.shape)
    path = os.path.join(folder, f"pepper{size}_noisy.png")
    Image.fromarray(np.round(np.clip(clean + 0.1 * noise, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def row_key(row: dict) -> tuple:
    """Which row a new measurement replaces: the same size, threads, copy of the kernels and processor."""
    return row["size"], row["threads"], row.get("cpu_kernels"), row.get("processor")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512,1024")
    parser.add_argument("--work", default="runs/restore_timing", help="folder for the photos and the runs")
    parser.add_argument("--out", required=True, help="JSON file of the results")
    parser.add_argument("--extra", default="", help="more oes-fast arguments, e.g. '--train-steps 500'")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    rows = json.load(open(args.out)) if os.path.exists(args.out) else []
    for size in (int(s) for s in args.sizes.split(",")):
        photo = noisy_photo(size, args.work)
        out = os.path.join(args.work, f"denoise{size}")
        shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
        cmd = ["oes-fast", "denoise", photo, "--out", out, "--no-progress", *args.extra.split()]
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
        report = json.load(open(os.path.join(out, "report.json")))
        est = report["estimate"]
        run = report["timings"].get("search_seconds", 0.0) + report["timings"]["train_seconds"]
        machine = report["machine"]
        row = dict(size=size, command=" ".join(cmd), threads=machine["threads"], processor=machine["processor"],
                   cpu_kernels=machine["cpu_kernels"],
                   estimate_seconds=est["seconds"], estimate_line=re.sub(r"\s+", " ", est["message"]),
                   run_seconds=run, ratio=run / est["seconds"], wall_seconds=wall,
                   estimate_phase_seconds=report["timings"]["estimate_seconds"], steps=report["settings"]["steps"],
                   peak_estimate_gb=(est["resident_bytes"] + est["peak_bytes"]) / 1e9,
                   load_before=load_before, load_after=os.getloadavg()[0],
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        rows = [r for r in rows if row_key(r) != row_key(row)] + [row]
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"{size}: estimate {row['estimate_seconds']:.0f} s, run {run:.0f} s ({row['ratio']:.2f}x), "
              f"wall {wall:.0f} s", flush=True)
    print("\n| size | threads | processor (CPU kernels) | steps | estimate printed | run (after the estimate) "
          "| run / estimate | whole command | date |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for r in sorted(rows, key=lambda r: (r["processor"], r["threads"], r["size"])):
        print(f"| {r['size']}x{r['size']} | {r['threads']} | {r['processor']} ({r.get('cpu_kernels', '?')}) | {r['steps']:,} | "
              f"{r['estimate_seconds']:.0f} s | {r['run_seconds']:.0f} s | {r['ratio']:.2f} | {r['wall_seconds']:.0f} s "
              f"| {r['date']} |")


if __name__ == "__main__":
    main()
