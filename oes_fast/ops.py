"""The one place where oes_fast operators meet PyTorch.

Loads the C++ extension (which declares the operator schemas and registers the CPU kernels),
registers the CUDA kernels (CUDA C++ from the extension, or Triton from `oes_fast.kernels`),
the fake (meta) implementations used by torch.compile, and autograd. Users call the thin
wrappers at the bottom, e.g. `oes_fast.gumbel_mask`.
"""
from __future__ import annotations

import os

import torch

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "oes_fast._C is not built: install the package with "
        "`pip install --no-build-isolation -e .` in the source tree"
    ) from exc

_ops = torch.ops.oes_fast
_SEED_LIMIT = 2**63

# ---------------------------------------------------------------------------------------------
# CUDA backend choice: "cuda" (CUDA C++ kernels of the extension) or "triton".
_CUDA_BACKENDS = ("cuda", "triton")
_cuda_backend = os.environ.get("OES_FAST_CUDA_BACKEND", "cuda" if _C.with_cuda else "triton")


def set_cuda_backend(name: str) -> None:
    """Choose which kernels run the ops on CUDA tensors: "cuda" (CUDA C++) or "triton"."""
    global _cuda_backend
    if name not in _CUDA_BACKENDS:
        raise ValueError(f"unknown CUDA backend {name!r}; choose one of {_CUDA_BACKENDS}")
    if name == "cuda" and not _C.with_cuda:
        raise RuntimeError("oes_fast was built without CUDA C++ kernels (no nvcc or CPU-only torch); use 'triton'")
    _cuda_backend = name


def cuda_backend() -> str:
    return _cuda_backend


def _triton():
    from .kernels import gumbel_mask as triton_gumbel_mask

    return triton_gumbel_mask


_cuda_lib = torch.library.Library("oes_fast", "IMPL")


def _philox_uniform_cuda(like, seed, offset):
    if _cuda_backend == "cuda":
        return _C.philox_uniform_cuda(like, seed, offset)
    return _triton().philox_uniform(like, seed, offset)


def _gumbel_mask_cuda(logits, weight, seed, offset, tau):
    if _cuda_backend == "cuda":
        return _C.gumbel_mask_cuda(logits, weight, seed, offset, tau)
    return _triton().gumbel_mask_forward(logits, weight, seed, offset, tau)


def _gumbel_mask_backward_cuda(grad, logits, weight, seed, offset, tau, weight_grad):
    if _cuda_backend == "cuda":
        return _C.gumbel_mask_backward_cuda(grad, logits, weight, seed, offset, tau, weight_grad)
    return _triton().gumbel_mask_backward(grad, logits, weight, seed, offset, tau, weight_grad)


_cuda_lib.impl("philox_uniform", _philox_uniform_cuda, "CUDA")
_cuda_lib.impl("gumbel_mask", _gumbel_mask_cuda, "CUDA")
_cuda_lib.impl("gumbel_mask_backward", _gumbel_mask_backward_cuda, "CUDA")

# ---------------------------------------------------------------------------------------------
# Fake implementations: shapes and dtypes only, so torch.compile can trace the ops.


@torch.library.register_fake("oes_fast::philox_uniform")
def _philox_uniform_fake(like, seed, offset):
    return like.new_empty(like.shape, dtype=torch.float32)


@torch.library.register_fake("oes_fast::gumbel_mask")
def _gumbel_mask_fake(logits, weight, seed, offset, tau):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("oes_fast::gumbel_mask_backward")
def _gumbel_mask_backward_fake(grad, logits, weight, seed, offset, tau, weight_grad):
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grad else logits.new_empty(0)
    return torch.empty_like(logits, memory_format=torch.contiguous_format), grad_weight


# ---------------------------------------------------------------------------------------------
# Autograd: the backward regenerates the noise from (seed, offset) instead of storing it.


def _gumbel_mask_setup_context(ctx, inputs, output):
    logits, weight, seed, offset, tau = inputs
    ctx.save_for_backward(logits, weight)
    ctx.seed, ctx.offset, ctx.tau = seed, offset, tau


def _gumbel_mask_autograd_backward(ctx, grad):
    logits, weight = ctx.saved_tensors
    need_logits, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_logits or need_weight):
        return None, None, None, None, None
    grad_logits, grad_weight = _ops.gumbel_mask_backward(
        grad.contiguous(), logits, weight, ctx.seed, ctx.offset, ctx.tau, need_weight
    )
    return (grad_logits if need_logits else None), (grad_weight if need_weight else None), None, None, None


torch.library.register_autograd(
    "oes_fast::gumbel_mask", _gumbel_mask_autograd_backward, setup_context=_gumbel_mask_setup_context
)

# ---------------------------------------------------------------------------------------------
# Python wrappers.


def _check_seed_offset(seed: int, offset: int) -> None:
    if not 0 <= int(seed) < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not 0 <= int(offset) < _SEED_LIMIT:
        raise ValueError(f"offset must be in [0, 2**63), got {offset}")


def gumbel_mask(logits: torch.Tensor, weight: torch.Tensor, seed: int, offset: int = 0, tau: float = 0.2) -> torch.Tensor:
    """Masked weight `weight * sigmoid((logits + log(u) - log(1-u)) / tau)`, differentiable in both.

    `u` is generated in the kernel from (seed, offset + j) for element j (row-major), so the
    same seed and offset give the same noise on every backend and in the backward pass.
    """
    _check_seed_offset(seed, offset)
    return _ops.gumbel_mask(logits, weight, int(seed), int(offset), float(tau))


def philox_uniform(like: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """float32 uniforms of the package's random stream, shaped like `like` and on its device."""
    _check_seed_offset(seed, offset)
    return _ops.philox_uniform(like, int(seed), int(offset))
