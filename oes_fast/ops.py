"""The one place where oes_fast operators meet PyTorch.

Loads the C++ extension (which declares the operator schemas and registers the CPU kernels),
registers the CUDA kernels (CUDA C++ from the extension, or Triton from `oes_fast.kernels`),
the fake (meta) implementations used by torch.compile, and autograd. Users call the thin
wrappers at the bottom, e.g. `oes_fast.gumbel_mask`.
"""
from __future__ import annotations

import math
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


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def check_gumbel_mask_inputs(logits, weight, seed, offset, tau) -> None:
    """The checks of csrc/ops.cpp, for the fake kernels (so tracing reports bad input too) and
    the wrapper. seed/offset may be symbolic while tracing; they are checked when plain ints."""
    if logits.shape != weight.shape:
        raise ValueError(f"gumbel_mask: logits and weight must have the same shape, got {tuple(logits.shape)} "
                         f"and {tuple(weight.shape)}")
    if logits.dtype != weight.dtype:
        raise TypeError(f"gumbel_mask: logits and weight must have the same dtype, got {logits.dtype} and {weight.dtype}")
    if logits.device != weight.device:
        raise ValueError(f"gumbel_mask: logits and weight must be on the same device, got {logits.device} and "
                         f"{weight.device}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gumbel_mask: dtype must be float32, float64 or bfloat16, got {logits.dtype}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"gumbel_mask: tau must be positive and finite, got {tau}")
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, int) and not 0 <= value < _SEED_LIMIT:
            raise ValueError(f"gumbel_mask: {name} must be in [0, 2**63), got {value}")


@torch.library.register_fake("oes_fast::philox_uniform")
def _philox_uniform_fake(like, seed, offset):
    return like.new_empty(like.shape, dtype=torch.float32)


@torch.library.register_fake("oes_fast::gumbel_mask")
def _gumbel_mask_fake(logits, weight, seed, offset, tau):
    check_gumbel_mask_inputs(logits, weight, seed, offset, tau)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("oes_fast::gumbel_mask_backward")
def _gumbel_mask_backward_fake(grad, logits, weight, seed, offset, tau, weight_grad):
    check_gumbel_mask_inputs(logits, weight, seed, offset, tau)
    if grad.shape != logits.shape or grad.dtype != logits.dtype or grad.device != logits.device:
        raise ValueError("gumbel_mask_backward: grad must match logits in shape, dtype and device")
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
    check_gumbel_mask_inputs(logits, weight, int(seed), int(offset), float(tau))
    return _ops.gumbel_mask(logits, weight, int(seed), int(offset), float(tau))


def philox_uniform(like: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """float32 uniforms of the package's random stream, shaped like `like` and on its device."""
    _check_seed_offset(seed, offset)
    return _ops.philox_uniform(like, int(seed), int(offset))


# ---------------------------------------------------------------------------------------------
# kl_prior: value and gradient of the OES prior in one pass (CPU kernel in csrc/cpu/kl_prior.cpp;
# on CUDA the reference expression, which the GPU runs as a handful of elementwise kernels).


def _kl_prior_cuda(logits, density):
    from . import reference

    p = logits.detach().double()
    return reference.kl_prior(p, density).to(_kl_value_dtype(logits)), reference.kl_prior_grad(p, density).to(logits.dtype)


def _kl_value_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


_cuda_lib.impl("kl_prior", _kl_prior_cuda, "CUDA")


@torch.library.register_fake("oes_fast::kl_prior")
def _kl_prior_fake(logits, density):
    return logits.new_empty((), dtype=_kl_value_dtype(logits)), torch.empty_like(logits, memory_format=torch.contiguous_format)


def kl_prior(logits: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_j KL(Bernoulli(sigmoid(p_j)) || Bernoulli(density)), d/dp) of oes-spec.md section 3.
    Not differentiable through autograd: add the returned gradient to the logits' gradient."""
    if not 0.0 < float(density) < 1.0:
        raise ValueError(f"kl_prior: density must be in (0, 1), got {density}")
    return _ops.kl_prior(logits, float(density))


# =============================================================================================
# sparse_conv2d (issue 4): 2-D convolution with CSR weights and fused padding. Schemas:
# csrc/sparse_conv2d.cpp; CPU: csrc/cpu/sparse_conv2d.cpp. CUDA: when the extension was built
# with nvcc, csrc/cuda/sparse_conv2d.cu registers its kernels for the CUDA key in C++ itself
# (TORCH_LIBRARY_IMPL), so no pybind entry is needed; only an extension built without CUDA C++
# gets the Triton kernels (kernels/sparse_conv2d.py) registered here for CUDA tensors, since
# one dispatch key takes one kernel.

if not _C.with_cuda:

    def _sparse_triton():
        from .kernels import sparse_conv2d as triton_sparse_conv2d

        return triton_sparse_conv2d

    def _sparse_conv2d_triton(input, values, row_ptr, col_idx, bias, kernel_size, stride, padding, padding_mode):
        return _sparse_triton().sparse_conv2d(input, values, row_ptr, col_idx, bias, kernel_size, stride, padding,
                                              padding_mode)

    def _sparse_conv2d_input_grad_triton(grad_output, values, row_ptr, col_idx, input_size, kernel_size, stride,
                                         padding, padding_mode):
        return _sparse_triton().sparse_conv2d_input_grad(grad_output, values, row_ptr, col_idx, input_size,
                                                         kernel_size, stride, padding, padding_mode)

    def _sparse_conv2d_weight_grad_triton(grad_output, input, row_ptr, col_idx, kernel_size, stride, padding,
                                          padding_mode):
        return _sparse_triton().sparse_conv2d_weight_grad(grad_output, input, row_ptr, col_idx, kernel_size, stride,
                                                          padding, padding_mode)

    _cuda_lib.impl("sparse_conv2d", _sparse_conv2d_triton, "CUDA")
    _cuda_lib.impl("sparse_conv2d_input_grad", _sparse_conv2d_input_grad_triton, "CUDA")
    _cuda_lib.impl("sparse_conv2d_weight_grad", _sparse_conv2d_weight_grad_triton, "CUDA")


def _sparse_conv2d_out_size(size, kernel_size, stride, padding):
    return [(size[i] + 2 * padding[i] - kernel_size[i]) // stride[i] + 1 for i in range(2)]


@torch.library.register_fake("oes_fast::sparse_conv2d")
def _sparse_conv2d_fake(input, values, row_ptr, col_idx, bias, kernel_size, stride, padding, padding_mode):
    h, w = _sparse_conv2d_out_size(input.shape[2:], kernel_size, stride, padding)
    return input.new_empty((input.shape[0], row_ptr.shape[0] - 1, h, w))


@torch.library.register_fake("oes_fast::sparse_conv2d_input_grad")
def _sparse_conv2d_input_grad_fake(grad_output, values, row_ptr, col_idx, input_size, kernel_size, stride, padding,
                                   padding_mode):
    return grad_output.new_empty(tuple(input_size))


@torch.library.register_fake("oes_fast::sparse_conv2d_weight_grad")
def _sparse_conv2d_weight_grad_fake(grad_output, input, row_ptr, col_idx, kernel_size, stride, padding, padding_mode):
    return input.new_empty((col_idx.shape[0],))


def _sparse_conv2d_setup_context(ctx, inputs, output):
    input, values, row_ptr, col_idx, bias, kernel_size, stride, padding, padding_mode = inputs
    ctx.save_for_backward(input, values, row_ptr, col_idx)
    ctx.geometry = (list(input.shape), list(kernel_size), list(stride), list(padding), padding_mode)


def _sparse_conv2d_backward(ctx, grad):
    # Input gradient by the transposed sparse convolution; weight gradient at kept taps only.
    input, values, row_ptr, col_idx = ctx.saved_tensors
    input_size, kernel_size, stride, padding, mode = ctx.geometry
    grad = grad.contiguous()
    grad_input = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.sparse_conv2d_input_grad(grad, values, row_ptr, col_idx, input_size, kernel_size, stride,
                                                   padding, mode)
    if ctx.needs_input_grad[1]:
        grad_values = _ops.sparse_conv2d_weight_grad(grad, input, row_ptr, col_idx, kernel_size, stride, padding, mode)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.sum((0, 2, 3))
    return grad_input, grad_values, None, None, grad_bias, None, None, None, None


torch.library.register_autograd(
    "oes_fast::sparse_conv2d", _sparse_conv2d_backward, setup_context=_sparse_conv2d_setup_context
)
# ======================================================================= end of sparse_conv2d
