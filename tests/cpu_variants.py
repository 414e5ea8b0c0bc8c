"""Running a CPU kernel's test computation under other thread counts and instruction sets: the
same bits with 1 and 2 threads, and every ISA copy (one subprocess each under OES_FAST_CPU_ISA,
since the choice is made once per process)."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

# The subprocess: imports `function` from `module` (a test file), calls it on every case with 1
# and 2 threads, saves {"isa": ..., "threads": {1: [...], 2: [...]}}.
WORKER = r"""
import importlib, sys
import torch
import oes_fast._C as _C

module, function, inputs, output = sys.argv[1:]
compute = getattr(importlib.import_module(module), function)
cases = torch.load(inputs)
out = {"isa": _C.cpu_isa(), "threads": {}}
for threads in (1, 2):
    torch.set_num_threads(threads)
    out["threads"][threads] = [compute(*case) for case in cases]
torch.save(out, output)
"""


def with_threads(threads: int, compute, *args):
    """compute(*args) with torch using `threads` threads (restored afterwards)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return compute(*args)
    finally:
        torch.set_num_threads(before)


def assert_same_bits(one: dict, two: dict, where: str = "") -> None:
    """Every tensor of `one` equal bit for bit to the same-named tensor of `two`."""
    for name in one:
        assert torch.equal(one[name], two[name]), f"{name} {where}: bits differ between 1 and 2 threads"


def assert_thread_independent(compute, *args) -> None:
    """compute(*args) (a dict of tensors) gives the same bits with 1 and 2 threads."""
    assert_same_bits(with_threads(1, compute, *args), with_threads(2, compute, *args))


def run_under_isa(isa: str, tmp_path, module: str, function: str, cases: list) -> dict:
    """`module.function(*case)` for every case in a subprocess under OES_FAST_CPU_ISA=isa, with 1
    and 2 threads: {"isa": the ISA the process ran, "threads": {1: [results], 2: [results]}}."""
    torch.save(cases, tmp_path / "inputs.pt")
    env = dict(os.environ, OES_FAST_CPU_ISA=isa)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", WORKER, module, function, tmp_path / "inputs.pt",
                           tmp_path / "results.pt"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"worker under OES_FAST_CPU_ISA={isa} failed:\n{proc.stderr[-4000:]}"
    out = torch.load(tmp_path / "results.pt")
    assert out["isa"] == isa
    return out
