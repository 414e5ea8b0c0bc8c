"""Peak memory of one OES search step on the CPU, per variant and image size (issue 5, large images):

    python bench/memory_cpu.py [--sizes 256,512] [--out bench/REPORT.md]

Each (variant, size) runs in a fresh process: one warm-up step, then the peak resident set
(VmHWM, reset through /proc/self/clear_refs) of the next step, minus what was resident before
it (the model, the logits and Adam's state, z and y). MALLOC_MMAP_THRESHOLD_ is fixed so that
every large tensor is its own mapping, returned to the system when freed: the resident set then
follows the live tensors. Bytes per pixel is the slope between the two largest sizes; the side
ratio is the square root of the authors'-style step's bytes per pixel over the variant's: how
much larger a square image fits in the same memory. Linux only.

Variants (bench/bench_search_step.py and oes_fast.mask_search.SearchStep):
  authors    the authors'-style step
  unfused    engine="unfused": flat gumbel_mask, the network's own convolutions
  fused      engine="fused": gumbel_masked_conv2d for every conv (on the CPU a composite that
             pads and masks inside the op, so those copies are transient, not saved)
  recompute  engine="fused", recompute=True: each hourglass block keeps only its input and runs
             again in the backward

CPU figures, not GPU ones: the CPU composite of gumbel_masked_conv2d still makes a padded copy
of its input and the masked weights while it runs, which the GPU kernels never write.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_search_step import MEMORY_VARIANTS as VARIANTS, memory_variant_step, problem  # noqa: E402

BEGIN, END = "<!-- memory_cpu:begin -->", "<!-- memory_cpu:end -->"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(variant: str, size: int) -> dict:
    """One measurement, in this process."""
    import torch

    import oes_fast

    torch.set_num_threads(2)
    step = memory_variant_step(variant, *problem(size))
    step(0)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    step(1)
    return dict(variant=variant, size=size, step_peak=_status("VmHWM") - before,
                torch=torch.__version__, oes_fast=oes_fast.__version__)


def measure(variant: str, size: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, __file__, "--child", variant, str(size)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(results: dict, sizes: list[int]) -> str:
    lines = ["### Peak memory of one search step, CPU (bench/memory_cpu.py)\n",
             "Peak resident set during one step above what was resident before it, 2 threads. "
             "bytes/pixel: slope between the two largest sizes; side ratio: the square root of the "
             "authors'-style step's bytes/pixel over the variant's.\n",
             "| variant | " + " | ".join(f"{s}x{s} MiB" for s in sizes) + " | bytes/pixel | side ratio |",
             "|---|" + "---:|" * (len(sizes) + 2)]
    lo, hi = sorted(sizes)[-2:]
    per_px = {v: (results[v, hi] - results[v, lo]) / (hi * hi - lo * lo) for v in VARIANTS}
    for v in VARIANTS:
        row = " | ".join(f"{results[v, s] / 2**20:.0f}" for s in sizes)
        lines.append(f"| {v} | {row} | {per_px[v]:.0f} | {math.sqrt(per_px['authors'] / per_px[v]):.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512", help="square image sides, at least two")
    parser.add_argument("--out", type=Path, help="markdown file to write the table into (section replaced)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) < 2:
        parser.error("--sizes needs at least two sizes (bytes per pixel is a slope)")
    results = {}
    for size in sizes:
        for v in VARIANTS:
            results[v, size] = measure(v, size)["step_peak"]
            print(f"{v:10s} {size:5d}: {results[v, size] / 2**20:.0f} MiB", flush=True)
    body = render(results, sizes)
    print(body)
    if args.out:
        from gpu_suite import write_section

        write_section(args.out, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
