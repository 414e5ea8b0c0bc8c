"""The device check: everything a short GPU window should measure, in one command that fits in
10 minutes on one H100 with nothing prepared on the machine (torch and Triton installed, no
network). Run it through bench/gpu_check.sh from the repository root:

    bench/gpu_check.sh               # on the GPU machine
    bench/gpu_check.sh --dry-run     # anywhere: walks every phase that needs no GPU
    bench/gpu_check.sh --log F       # also every phase's whole output, appended to F

Phases, each in its own process with its own timeout (a hung kernel fails its phase loudly and
the check goes on to write what it has); expected times on an H100 with 16 cores in brackets:
  1. env          device, driver, torch / triton / python versions                       [5 s]
  2. build        Triton-only build: OES_FAST_NO_CUDA=1 pip install --no-build-isolation
                  --no-deps -e .  (C++ CPU kernels only; no network)                     [1-2 min]
  3. cuda_tests   tests/test_cuda_ops.py: every op on CUDA vs the float64 reference,
                  Philox bit for bit, GPU tiles and split-K (Triton backend)             [1-2 min]
  4. sparse       issue 16: the Sparse-DIP forward and training step (eager, its kernels
                  counted and timed by torch.profiler, and as one CUDA graph;
                  SparseGenerator) vs the masked dense model on cuDNN (TF32 and float32) and
                  vs the compacted model with dense convs, at 512 and 2048, with peak
                  memory; the published pepper mask where OES_GPU_CHECK_MASK names its
                  file, else the bundled mask                                           [1 min]
  5. steps        bench/gpu_suite.py: correctness, machine floors, one search step per
                  engine (authors, unfused, fused, graphed, recompute, fused_graphed) at
                  512 and 2048 pixels with peak memory                                   [1-2 min]
  6. restore      bench/gpu_restore.py: an OES search (1000 steps, CUDA graph) and Sparse-DIP
                  training (1000 steps, the bundled mask; eager, then as a CUDA graph with
                  each engine) at 512x512 through the Python API, end to end              [1 min]
  7. build_cuda   optional: the CUDA C++ build (MAX_JOBS=16), then tests/test_cuda_ops.py
                  again on both backends                                                 [2-4 min]
  8. report       measured vs bench/cost_model.py's prediction; bench/REPORT.md section
                  gpu_check and bench/gpu_check.json
The budget (--budget, 570 s) is shared: a phase starts only with its timeout left in the
budget, the optional CUDA C++ build and its tests only when 150 s remain (they took 62 + 12 s on
an H200 machine with 16 cores, 2026-11-30).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
PY = sys.executable
STEP_VARIANTS = "authors,unfused,fused,graphed,recompute,fused_graphed"
SIZES = (512, 2048)


class Phase:
    def __init__(self, name, timeout, command=None, needs_gpu=True, optional=False, dry_command=None, env=None,
                 dry_ok=(0,)):
        self.name, self.timeout, self.command, self.needs_gpu = name, timeout, command, needs_gpu
        self.optional, self.dry_command, self.env, self.dry_ok = optional, dry_command, env or {}, dry_ok
        self.status, self.seconds, self.full_output = "not run", 0.0, ""

    def run(self, dry: bool, log):
        command = self.dry_command if dry else self.command
        if command is None:
            self.status = "skipped (needs a GPU)" if dry and self.needs_gpu else "skipped"
            log(f"[{self.name}] {self.status}: would run `{shlex.join(self.command) if self.command else ''}`")
            return
        log(f"[{self.name}] $ {shlex.join(command)}  (timeout {self.timeout} s)")
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=ROOT, env=os.environ | self.env, capture_output=True, text=True,
                                  timeout=self.timeout)
            self.full_output = proc.stdout + proc.stderr
            self.status = "ok" if proc.returncode in (self.dry_ok if dry else (0,)) else f"FAILED (exit {proc.returncode})"
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            self.full_output = out.decode(errors="replace") if isinstance(out, bytes) else out
            self.status = f"FAILED (timeout after {self.timeout} s)"
        self.seconds = time.perf_counter() - start
        log(f"[{self.name}] {self.status} in {self.seconds:.0f} s")
        if self.status != "ok":
            log(self.full_output[-3000:])


def phases(tmp: Path, dry: bool) -> list[Phase]:
    pip = [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    tests = [PY, "-m", "pytest", "-q", "-rfE", "--maxfail=20", "-p", "no:cacheprovider", "tests/test_cuda_ops.py"]
    sizes = ",".join(map(str, SIZES))
    return [
        Phase("env", 30, [PY, str(ROOT / "bench" / "gpu_check.py"), "--phase", "env", "--out", str(tmp / "env.json")],
              needs_gpu=False, dry_command=[PY, str(ROOT / "bench" / "gpu_check.py"), "--phase", "env", "--out",
                                            str(tmp / "env.json")]),
        Phase("build", 240, pip, needs_gpu=False, env={"OES_FAST_NO_CUDA": "1", "MAX_JOBS": "16"},
              dry_command=[PY, "-c", "import setuptools, torch.utils.cpp_extension; print('build tools present')"]),
        # after the Triton-only build the module tests the Triton backend alone
        # (dry run: the module imports and skips itself without CUDA: pytest's "no tests collected", 5)
        Phase("cuda_tests", 180, tests, dry_command=tests + ["--collect-only"], dry_ok=(0, 5)),
        Phase("sparse", 150, [PY, str(ROOT / "bench" / "gpu_check.py"), "--phase", "sparse", "--out",
                             str(tmp / "sparse.json")]),
        Phase("steps", 200, [PY, str(ROOT / "bench" / "gpu_suite.py"), "--out", str(tmp / "steps.md"), "--section",
                             "gpu_check_steps", "--sizes", sizes, "--variants", STEP_VARIANTS, "--iters", "5",
                             "--warmup", "3", "--precision-steps", "0", "--json", str(tmp / "steps.json")]),
        Phase("restore", 150, [PY, str(ROOT / "bench" / "gpu_restore.py"), "--json", str(tmp / "restore.json")],
              dry_command=[PY, str(ROOT / "bench" / "gpu_restore.py"), "--device", "cpu", "--size", "256",
                           "--search-steps", "2", "--train-steps", "2"]),
        Phase("build_cuda", 300, pip, needs_gpu=False, optional=True, env={"MAX_JOBS": "16"}),
        Phase("cuda_tests_cpp", 180, tests, optional=True),
        Phase("cost_model", 60, [PY, str(ROOT / "bench" / "cost_model.py"), "--sizes", sizes, "--json",
                                 str(tmp / "cost.json")], needs_gpu=False,
              dry_command=[PY, str(ROOT / "bench" / "cost_model.py"), "--sizes", sizes, "--json",
                           str(tmp / "cost.json")]),
    ]


# ----------------------------------------------------------------------------- in-process phases
def phase_env(out: Path):
    import torch

    record = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                  host=platform.node(), cpus=os.cpu_count(),
                  # without ninja, torch's BuildExtension compiles one file at a time: a slow build phase
                  ninja=bool(shutil.which("ninja")))
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        record |= dict(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
        try:
            record["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                              capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            record["driver"] = None
    else:
        record["device"] = None
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def graphed_train_step(net, z, target, mask=None, warmup: int = 3):
    """bench_sparse.train_step's step (Adam capturable) replayed from one CUDA graph, z and target
    static (oes_fast.graphs.GraphedStep: `warmup` eager steps on a side stream, then the capture;
    its zero_grad leaves the gradients to the graph's pool, which each replay rewrites). Returns
    the GraphedStep, captured: each call replays. First run on the H200 2026-11-30 21:00 UTC."""
    from bench_sparse import train_step
    from oes_fast.graphs import GraphedStep

    graphed = GraphedStep(train_step(net, z, target, mask, capturable=True), warmup)
    for _ in range(warmup + 1):  # the warm-up steps, then the capture (and its first replay)
        graphed()
    return graphed


def phase_sparse(out: Path):
    """Issue 16 on a GPU: the Sparse-DIP forward (no_grad) and training step (forward, MSE loss,
    backward, Adam; the dense step's gradients masked, as the authors' loop), the step also as
    one CUDA graph (`graphed_train_step`), at each size: the generator against the masked dense
    model on cuDNN, each in TF32 (torch's default) and in float32. "sparse generator": the
    CPU's crossover, its sparse layers on the Triton kernels; "compacted, dense convs": every
    conv dense on the compacted weights, the GPU's default (oes_fast.sparse.default_crossover).
    Batch statistics; median ms over CUDA events and peak memory. The mask: the published
    pepper mask where OES_GPU_CHECK_MASK names its file (the targets' mask), else the bundled
    one. Each row is written as soon as it is measured, so a timeout keeps the rows before it."""
    import copy
    import traceback

    import torch

    from bench_sparse import train_step
    from gpu_suite import cuda_time, free_memory, kernel_profile, median
    from oes_fast import masks, models
    from oes_fast.sparse import CROSSOVER_DENSITY, SparseGenerator

    mask_file = os.environ.get("OES_GPU_CHECK_MASK")
    if mask_file and Path(mask_file).exists():
        model = models.skip_oes(seed=0)
        mask, mask_name = masks.load_published(mask_file, model), Path(mask_file).name
    else:
        mask, mask_name = masks.bundled(), "bundled"
        model = models.skip_oes(seed=mask.seed)
    model = model.cuda()
    dense = mask.apply_(copy.deepcopy(model)).train()
    # the CPU's crossover: the sparse layers on the Triton kernels; the GPU's default: all dense
    sparse = SparseGenerator.from_masked(model, mask, crossover=CROSSOVER_DENSITY)
    compact = SparseGenerator.from_masked(model, mask, crossover=0.0)
    nets = (("cudnn masked dense tf32", dense, True), ("cudnn masked dense fp32", dense, False),
            ("compacted, dense convs tf32", compact, True), ("compacted, dense convs fp32", compact, False),
            ("sparse generator", sparse, False))
    rows = []

    def record(**row):
        rows.append(dict(mask=mask_name) | row)
        print(rows[-1], flush=True)
        out.write_text(json.dumps(rows, indent=1))

    tf32_before = torch.backends.cudnn.allow_tf32
    for size in SIZES:
        z = models.dip_input(32, size, size, seed=1, device="cuda")
        target = torch.rand(1, 3, size, size, generator=torch.Generator(device="cuda").manual_seed(2), device="cuda")
        warmup, iters = (3, 10) if size <= 512 else (2, 5)
        for kind in ("forward", "step", "step, CUDA graph"):
            for name, net, tf32 in nets:
                free_memory()
                torch.cuda.reset_peak_memory_stats()
                torch.backends.cudnn.allow_tf32 = tf32
                try:
                    if kind == "forward":
                        with torch.no_grad():
                            ms = median(cuda_time(lambda: net(z), warmup, iters))
                    elif kind == "step":
                        step = train_step(copy.deepcopy(net), z, target, mask if net is dense else None)
                        ms = median(cuda_time(step, warmup, iters))
                    else:
                        step = graphed_train_step(copy.deepcopy(net), z, target, mask if net is dense else None)
                        ms = median(cuda_time(step, 1, iters))
                    row = dict(variant=name, kind=kind, size=size, ms=ms, peak_bytes=torch.cuda.max_memory_allocated())
                    if kind == "step":
                        try:
                            row["kernels"], row["kernel_ms"] = kernel_profile(step)
                        except Exception as exc:
                            row["profile_error"] = repr(exc)[:200]
                    record(**row)
                except Exception as exc:  # one failing variant must not hide the others' rows
                    traceback.print_exc()
                    record(variant=name, kind=kind, size=size, ms=None, peak_bytes=0, error=repr(exc)[:300])
                finally:
                    torch.backends.cudnn.allow_tf32 = tf32_before
        try:
            torch.backends.cudnn.allow_tf32 = False
            with torch.no_grad():
                ref = dense(z)
                for name, net in (("sparse generator", sparse), ("compacted, dense convs fp32", compact)):
                    diff = (net(z) - ref).norm() / ref.norm()
                    record(variant=name, kind="forward rel. diff vs cudnn fp32", size=size, ms=None, peak_bytes=0,
                           rel_diff=float(diff))
        except Exception as exc:
            traceback.print_exc()
            record(variant="sparse generator", kind="forward rel. diff vs cudnn fp32", size=size, ms=None,
                   peak_bytes=0, error=repr(exc)[:300])
        finally:
            torch.backends.cudnn.allow_tf32 = tf32_before


# ----------------------------------------------------------------------------- report
def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def report(ph: list[Phase], tmp: Path, dry: bool) -> tuple[str, dict]:
    env = _load(tmp / "env.json") or {}
    steps = _load(tmp / "steps.json") or {}
    sparse = _load(tmp / "sparse.json") or []
    cost = _load(tmp / "cost.json") or {}
    engine_of = {"unfused": "unfused", "fused": "fused", "graphed": "unfused", "recompute": "recompute",
                 "fused_graphed": "fused"}
    lines = [f"## Device check (bench/gpu_check.sh) - {env.get('device') or 'no GPU'}"
             + (" - DRY RUN" if dry else "") + "\n",
             f"Run on {env.get('date')}: device {env.get('device')}, driver {env.get('driver')}, CUDA "
             f"{env.get('cuda')}, torch {env.get('torch')}, triton {env.get('triton')}, Python {env.get('python')}, "
             f"{env.get('cpus')} CPUs, ninja {'found' if env.get('ninja') else 'MISSING (serial build)'}.\n",
             "| phase | status | seconds |", "|---|---|---:|"]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} |" for p in ph]
    if steps:
        lines += ["", "### One search step (CUDA events, median after warm-up) against the cost model\n",
                  "| engine | size | ms/step | predicted ms | measured / predicted | peak GB | note |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in steps.get("steps", []):
            pred = cost.get(engine_of.get(r["variant"], ""), {}).get(str(r["size"]))
            p_ms = None if pred is None else pred.get("graphed_ms" if r["variant"].endswith("graphed") else "eager_ms")
            ms = r["ms"]
            ratio = f"{ms / p_ms:.2f}" if (ms and p_ms) else "-"
            lines.append(f"| {r['variant']} | {r['size']} | {ms if ms is None else f'{ms:.2f}'} | "
                         f"{'-' if p_ms is None else f'{p_ms:.2f}'} | {ratio} | {r['peak_bytes'] / 1e9:.2f} | "
                         f"{r['note']} |")
        lines.append(f"\nCorrectness before timing (gpu_suite): {'ok' if steps.get('correct') else '**FAILED**'}; "
                     f"measured peaks: " + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in
                                                     steps.get("peaks_tflops", {}).items())
                     + f", copy {steps.get('copy_gbps', 0):.0f} GB/s.")
        if steps.get("correctness"):  # gpu_suite's checks: the op against the reference, the engines
            lines += [""] + steps["correctness"]
    if sparse:
        base = {(r["kind"], r["size"]): r["ms"] for r in sparse if r["variant"] == "cudnn masked dense tf32"}
        lines += ["", f"### Sparse-DIP forward (no_grad) and training step vs cuDNN on the masked dense model "
                  f"(mask {sparse[0].get('mask')}, batch statistics)\n",
                  "| size | kind | variant | ms | cuDNN TF32 / this | peak GB | note |", "|---:|---|---|---:|---:|---:|---|"]
        for r in sparse:
            ms, b = r.get("ms"), base.get((r["kind"], r["size"]))
            ratio = f"{b / ms:.2f}" if (ms and b) else "-"
            note = r.get("error") or (f"rel. diff {r['rel_diff']:.2e}" if "rel_diff" in r else "")
            if "kernel_ms" in r:
                note = f"{r['kernels']:.0f} kernels, {r['kernel_ms']:.3g} ms in them"
            note = note or r.get("profile_error", "")
            lines.append(f"| {r['size']} | {r['kind']} | {r['variant']} | {'-' if ms is None else f'{ms:.4g}'} | "
                         f"{ratio} | {r['peak_bytes'] / 1e9:.2f} | {note} |")
    restore = _load(tmp / "restore.json") or {}
    if restore:
        from gpu_restore import table

        lines += ["", f"### A whole search and Sparse-DIP training on the GPU (bench/gpu_restore.py, "
                  f"{restore['size']}x{restore['size']}, astronaut, sigma 0.1)\n", *table(restore)]
    record = dict(env=env, phases=[dict(name=p.name, status=p.status, seconds=p.seconds) for p in ph],
                  steps=steps, sparse=sparse, restore=restore, predicted=cost, dry_run=dry)
    return "\n".join(lines) + "\n", record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="walk the phases that need no GPU, write nothing "
                                                               "into bench/")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for all phases together")
    parser.add_argument("--report", default=str(ROOT / "bench" / "REPORT.md"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "gpu_check.json"))
    parser.add_argument("--log", help="also write every phase's whole output to this file (appended per phase)")
    parser.add_argument("--phase", choices=["env", "sparse"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        {"env": phase_env, "sparse": phase_sparse}[args.phase](Path(args.out))
        return 0

    start = time.perf_counter()

    def log(msg):
        print(f"{time.perf_counter() - start:6.0f}s {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="oes_fast_gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        ph = phases(tmp, args.dry_run)
        for p in ph:
            left = args.budget - (time.perf_counter() - start)
            if p.optional and not args.dry_run and left < 150:
                p.status = "skipped (budget)"
                log(f"[{p.name}] skipped: {left:.0f} s left")
                continue
            if not args.dry_run and p.name == "cuda_tests_cpp" and not any(
                    q.name == "build_cuda" and q.status == "ok" for q in ph):
                p.status = "skipped (no CUDA C++ build)"
                continue
            p.timeout = int(max(10, min(p.timeout, left)))
            p.run(args.dry_run, log)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(f"\n===== {p.name}: {p.status} in {p.seconds:.0f} s\n{p.full_output}")
        body, record = report(ph, tmp, args.dry_run)
    print(body)
    if args.dry_run:
        log("dry run: nothing written")
    else:
        from gpu_suite import write_section

        write_section(Path(args.report), body, "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->")
        Path(args.json).write_text(json.dumps(record, indent=1))
        log(f"wrote {args.report} (section gpu_check) and {args.json}")
    failed = [p.name for p in ph if p.status.startswith("FAILED") and not p.optional]
    if failed:
        log(f"FAILED phases: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
