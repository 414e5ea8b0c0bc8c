"""What the training loops (oes_fast.train) and the mask search (oes_fast.mask_search) share:
input checks, fingerprints that tie a checkpoint to its data, the network's input layout, the
data loss, progress bars and checkpoint plumbing."""
from __future__ import annotations

import hashlib
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn


def show_progress(progress: bool | None) -> bool:
    """Whether to draw progress bars: `progress` when it is given (True/False), else whether
    stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar over `total` steps starting at step `initial` (a resumed run), labelled
    `desc`; None when not `enabled`."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def checkpoint_exists(path) -> bool:
    """Whether the checkpoint file `path` (str or path-like) exists, so a run can resume from it."""
    return os.path.isfile(os.fspath(path))


def fingerprint(t: torch.Tensor) -> str:
    """Short hash of a tensor's values (ties a checkpoint to its data): 16 hex digits of the
    SHA-1 of the values as float64, whatever the tensor's dtype, device or layout."""
    return hashlib.sha1(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()[:16]


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise TypeError unless `t` is a floating-point tensor, ValueError if it holds NaN or Inf;
    `name` says which argument in the message."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")


def network_input(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """z as the training loops feed it to `model`: channels-last on a CPU with AVX-512, where
    oneDNN ran the dense generators' convolutions (forward and backward) about a quarter faster
    that way; as it is elsewhere, and for models that say they need it. On an AVX2 processor
    (Zen 3) the contiguous layout was the faster one: a search step 1.11x (256x256) and 1.19x
    (512x512) faster than channels-last, a dense DIP step 1.15x and 1.20x (1 thread, rounds
    alternating both; docs/performance.md)."""
    if (z.device.type == "cpu" and z.dim() == 4 and getattr(model, "channels_last_input", True)
            and channels_last_is_faster()):
        return z.contiguous(memory_format=torch.channels_last)
    return z


def channels_last_is_faster() -> bool:
    """Whether oneDNN's convolutions on this CPU were measured faster on channels-last
    activations: where the processor has AVX-512 (whatever copy of our kernels OES_FAST_CPU_ISA
    picks; oneDNN chooses its own)."""
    from . import _C

    return "avx512" in _C.cpu_isas_supported()


def data_loss(out: torch.Tensor, y: torch.Tensor, degradation=None) -> torch.Tensor:
    """The 0-d loss of the generator's output `out` against the degraded image `y`:
    `degradation.loss(out, y)` when a degradation (oes_fast.tasks) is given, else the mean
    squared error of two tensors of the same shape."""
    if degradation is not None:
        return degradation.loss(out, y)
    if out.shape != y.shape:
        raise ValueError(f"output {tuple(out.shape)} and target {tuple(y.shape)} differ; pass the degradation")
    # F.mse_loss: one op each way where the written-out mean((out - y) ** 2) takes three; the same
    # bits, loss and gradient (tests/test_tasks.py), 2.8x faster at 512x512 (3.1 -> 1.1 ms a step)
    return F.mse_loss(out, y)
