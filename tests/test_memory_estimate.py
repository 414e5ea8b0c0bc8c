"""bench/memory_estimate.py: the live-bytes tracker, and that recompute=True lowers the step's peak."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_estimate  # noqa: E402


def test_live_bytes_follows_allocations_and_frees():
    with memory_estimate.LiveBytes() as tracker:
        a = torch.empty(1000, device="meta")  # 4,000 bytes
        b = a * 2  # 4,000 more: peak 8,000
        del a, b
        c = torch.empty(250, dtype=torch.float64, device="meta")  # 2,000 while nothing else lives
        view = c[10:]  # a view: no new storage
    assert tracker.peak == 8000
    assert tracker.live == 2000 and view.untyped_storage().nbytes() == 2000


def test_recompute_lowers_the_estimated_peak():
    peaks = {v: memory_estimate.step_peak(v, 256) for v in ("authors", "fused", "recompute")}
    assert peaks["recompute"] < peaks["fused"] < peaks["authors"]
