"""bench/gpu_check.py (issue 15): its dry run walks every phase that needs no GPU and fails
none; the report compares a measured step with the cost model's prediction."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_dry_run_walks_the_phases_that_need_no_gpu():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for phase in ("env", "build", "cuda_tests", "cost_model"):
        assert f"| {phase} | ok |" in out, out[-4000:]
    for phase in ("steps", "sparse"):
        assert f"| {phase} | skipped (needs a GPU) |" in out
    assert "dry run: nothing written" in out


def test_report_compares_measured_with_predicted(tmp_path):
    import json

    import gpu_check

    (tmp_path / "env.json").write_text(json.dumps({"device": "H100", "date": "today"}))
    (tmp_path / "steps.json").write_text(json.dumps({"correct": True, "steps": [
        dict(variant="fused", size=512, ms=6.0, peak_bytes=2e9, note=""),
        dict(variant="graphed", size=512, ms=1.5, peak_bytes=1e9, note="")]}))
    (tmp_path / "cost.json").write_text(json.dumps({
        "fused": {"512": {"eager_ms": 4.0, "graphed_ms": 3.0}},
        "unfused": {"512": {"eager_ms": 2.0, "graphed_ms": 1.0}}}))
    body, record = gpu_check.report([], tmp_path, dry=False)
    assert "| fused | 512 | 6.00 | 4.00 | 1.50 | 2.00 |" in body
    assert "| graphed | 512 | 1.50 | 1.00 | 1.50 | 1.00 |" in body  # graphed: the unfused engine's graphed time
    assert record["steps"]["correct"] is True
