"""Every Triton kernel of kernels/, compiled for an H100 (sm_90) on this machine, which needs no
GPU (bench/triton_compile_report.py): with the launchers' own GPU tiles, constexprs and dtypes,
for the layers of the OES network and the deep decoder. Fails on a compile error, on a
default-path kernel that spills registers, and on shared memory beyond an H100's.

The compiles run in a subprocess without TRITON_INTERPRET (this process has the interpreter on,
so its kernels are not compilable JIT functions). The default run compiles the default set
(46 s on this 2-core machine the first time, cached after that); the slow tests
compile every variant, and with OES_FAST_OLDEST_TRITON_PYTHON set (a Python whose Triton is the
oldest supported one, 3.6: see README) also against that Triton.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "triton_compile_report.py"
sys.path.insert(0, str(ROOT / "bench"))


def compile_report(python, tmp_path, *args):
    """(process, result JSON) of the report script run by `python` with --check."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"OMP_NUM_THREADS": "1", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "compile.json"
    proc = subprocess.run([python, str(SCRIPT), "--check", "--quiet", "--json", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    return proc, json.loads(out.read_text()) if out.exists() else None


def jit_kernels() -> set[str]:
    """module.function of every @triton.jit kernel (a function named *_kernel) in kernels/."""
    names = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for name in re.findall(r"^@triton\.jit[^\n]*\ndef (\w+_kernel)\(", path.read_text(), flags=re.M):
            names.add(f"{path.stem}.{name}")
    return names


def assert_clean(proc, result, everything):
    assert proc.returncode == 0, f"compile report failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    import triton_compile_report as report

    rows = report.rows_of(result)
    assert rows and all(not r.error and r.regs and r.spill_stores is not None for r in rows)
    assert {r.kernel for r in rows} == jit_kernels(), "a kernel of kernels/ is not compiled by the report"
    default = [r for r in rows if r.default]
    assert default and all(r.spill_stores == 0 and r.spill_loads == 0 for r in default)
    assert all(r.shared <= report.H100_SHARED_PER_BLOCK for r in rows)
    if everything:
        assert {"float32", "float64", "bfloat16"} <= {r.dtype for r in rows}
        assert any("tf32" in r.variant for r in default) and any("bf16" in r.variant for r in default)


def test_default_kernels_compile_for_sm90_without_spills(tmp_path):
    proc, result = compile_report(sys.executable, tmp_path)
    assert_clean(proc, result, everything=False)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    proc, result = compile_report(sys.executable, tmp_path, "--all")
    assert_clean(proc, result, everything=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OES_FAST_OLDEST_TRITON_PYTHON"),
                    reason="set OES_FAST_OLDEST_TRITON_PYTHON to a Python with Triton 3.6 (see README)")
def test_every_kernel_variant_compiles_with_the_oldest_triton(tmp_path):
    python = os.environ["OES_FAST_OLDEST_TRITON_PYTHON"]
    version = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert version.startswith("3.6"), f"{python} has Triton {version}, not the oldest supported (3.6)"
    proc, result = compile_report(python, tmp_path, "--all")
    assert result["triton"] == version
    assert_clean(proc, result, everything=True)


# ------------------------------------------------------------------------------ the report's own logic
def test_ptxas_log_parsing_and_problems():
    import triton_compile_report as report

    log = ("ptxas info    : Compiling entry function '_forward_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _forward_kernel\n"
           "    5832 bytes stack frame, 13044 bytes spill stores, 18192 bytes spill loads\n"
           "ptxas info    : Used 32 registers, used 1 barriers, 5832 bytes cumulative stack size\n")
    metrics = report.parse_ptxas_log(log)
    assert metrics == dict(regs=32, spill_stores=13044, spill_loads=18192, stack=5832)
    row = report.Row("m._forward_kernel", "forward", "float32", ["layer"], True, shared=300 * 1024, num_warps=4,
                     **metrics)
    problems = row.problems()
    assert len(problems) == 2 and "spills" in problems[0] and "shared memory" in problems[1]
    assert report.Row("m.k", "v", "float64", ["l"], False, **metrics, shared=1024).problems() == []  # may spill
    assert report.Row("m.k", "v", "float32", ["l"], True, error="boom").problems()[0].endswith("boom")
    # occupancy: 255 registers x 8 warps fill the register file with one block: 8 of 64 warps
    assert report.Row("m.k", "v", "float32", ["l"], True, regs=255, shared=0, num_warps=8).occupancy() == 8 / 64
    assert report.Row("m.k", "v", "float32", ["l"], True, regs=32, shared=0, num_warps=4).occupancy() == 1.0
