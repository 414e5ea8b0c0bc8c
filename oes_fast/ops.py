"""The one place where oes_fast operators meet PyTorch.

Loads the C++ extension (which declares the operator schemas and registers the CPU kernels),
registers the CUDA kernels (CUDA C++ from the extension, or Triton from `oes_fast.kernels`),
the fake (meta) implementations used by torch.compile, and autograd. Users call the thin
wrappers at the bottom, e.g. `oes_fast.gumbel_mask`.
"""
from __future__ import annotations

import importlib
import math
import os

import torch

from .op_checks import (SEED_LIMIT, check_gumbel_mask_inputs, check_gumbel_masked_conv2d_inputs,  # noqa: F401
                        check_logit_adam_step_inputs)

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "oes_fast._C is not built: install the package with "
        "`pip install --no-build-isolation -e .` in the source tree"
    ) from exc

_ops = torch.ops.oes_fast

# ---------------------------------------------------------------------------------------------
# CUDA backend choice: "cuda" (CUDA C++ kernels of the extension) or "triton".
_CUDA_BACKENDS = ("cuda", "triton")
_cuda_backend = os.environ.get("OES_FAST_CUDA_BACKEND", "cuda" if _C.with_cuda else "triton")


def set_cuda_backend(name: str) -> None:
    """Choose which kernels run the ops on CUDA tensors, process-wide: "cuda" (the CUDA C++
    kernels; only when the extension was built with nvcc) or "triton". The default is "cuda"
    when built with it, else "triton", or the environment variable OES_FAST_CUDA_BACKEND.
    Raises ValueError for another name, RuntimeError for "cuda" without the CUDA C++ build."""
    global _cuda_backend
    if name not in _CUDA_BACKENDS:
        raise ValueError(f"unknown CUDA backend {name!r}; choose one of {_CUDA_BACKENDS}")
    if name == "cuda" and not _C.with_cuda:
        raise RuntimeError("oes_fast was built without CUDA C++ kernels (no nvcc or CPU-only torch); use 'triton'")
    _cuda_backend = name


def cuda_backend() -> str:
    """The current CUDA backend: "cuda" or "triton" (see set_cuda_backend)."""
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


def _channel_sum(grad: torch.Tensor) -> torch.Tensor:
    """A conv bias's gradient: grad summed over batch and pixels, accumulated in float64 for
    lower dtypes (a sum over a whole image loses several ulps in float32 otherwise)."""
    wide = torch.float64 if grad.dtype in (torch.float32, torch.float16, torch.bfloat16) else grad.dtype
    return grad.sum((0, 2, 3), dtype=wide).to(grad.dtype)


def _check_seed_offset(seed: int, offset: int) -> None:
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not 0 <= int(offset) < SEED_LIMIT:
        raise ValueError(f"offset must be in [0, 2**63), got {offset}")


def gumbel_mask(logits: torch.Tensor, weight: torch.Tensor, seed: int, offset: int = 0, tau: float = 0.2) -> torch.Tensor:
    """Masked weight `weight * sigmoid((logits + log(u) - log(1-u)) / tau)`, differentiable in both.

    logits, weight: same shape (any), dtype (float32, float64 or bfloat16) and device (CPU or
    CUDA). seed, offset: ints in [0, 2**63); tau > 0. `u` is generated in the kernel from
    (seed, offset + j) for element j (row-major), so the same seed and offset give the same
    noise on every backend and in the backward pass. Returns a contiguous tensor of the
    logits' shape, dtype and device (bfloat16 computes in float32, rounds once).
    """
    check_gumbel_mask_inputs(logits, weight, int(seed), int(offset), float(tau))
    return _ops.gumbel_mask(logits, weight, int(seed), int(offset), float(tau))


def philox_uniform(like: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """float32 uniforms of the package's random stream, shaped like `like` (any dtype; only its
    shape and device are used) and on its device: element j (row-major) is the Philox4x32-10
    draw at (seed, offset + j), in [0, 1] (the ends included; not clamped). seed, offset: ints
    in [0, 2**63). Bit-identical on CPU and CUDA, both CUDA backends."""
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

    logits: any shape, float32 / float64 / bfloat16, CPU or CUDA; density in (0, 1). Returns a
    0-d value (float64 for float64 logits, else float32) and the gradient, shaped and typed
    like the logits. Not differentiable through autograd: add the returned gradient to the
    logits' gradient."""
    if not 0.0 < float(density) < 1.0:
        raise ValueError(f"kl_prior: density must be in (0, 1), got {density}")
    return _ops.kl_prior(logits, float(density))


# ---------------------------------------------------------------------------------------------
# gumbel_mask_with_slope and logit_adam_step_: the search step's own pair (CPU kernels in
# csrc/cpu/gumbel_mask.cpp and csrc/cpu/logit_adam_step.cpp, CUDA kernels in Triton:
# kernels/gumbel_mask.py and kernels/logit_adam_step.py). The forward keeps the masked
# weights' slope in the logits, so the update needs no second noise generation; the update
# applies the chain rule, the KL prior and Adam in one pass. Where Triton cannot be imported,
# CUDA runs them composed of the ops above and torch's elementwise kernels.


def _triton_or_none(module):
    try:
        return importlib.import_module(f".kernels.{module}", __package__)
    except ImportError:
        return None


def _gumbel_mask_with_slope_cuda(logits, weight, seed, offset, tau):
    kernels = _triton_or_none("gumbel_mask")
    if kernels is not None:
        return kernels.gumbel_mask_with_slope(logits, weight, seed, offset, tau)
    masked = _ops.gumbel_mask(logits, weight, seed, offset, tau)
    slope = _ops.gumbel_mask_backward(torch.ones_like(logits), logits, weight, seed, offset, tau, False)[0]
    return masked, slope


_cuda_lib.impl("gumbel_mask_with_slope", _gumbel_mask_with_slope_cuda, "CUDA")


@torch.library.register_fake("oes_fast::gumbel_mask_with_slope")
def _gumbel_mask_with_slope_fake(logits, weight, seed, offset, tau):
    check_gumbel_mask_inputs(logits, weight, seed, offset, tau)
    return (torch.empty_like(logits, memory_format=torch.contiguous_format),
            torch.empty_like(logits, memory_format=torch.contiguous_format))


def gumbel_mask_with_slope(logits: torch.Tensor, weight: torch.Tensor, seed: int, offset: int = 0,
                           tau: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(gumbel_mask(logits, weight, seed, offset, tau), its derivative in the logits
    weight * m * (1 - m) / tau), in one pass; not differentiable through autograd. Arguments
    as gumbel_mask; both results contiguous, shaped and typed like the logits."""
    check_gumbel_mask_inputs(logits, weight, int(seed), int(offset), float(tau))
    return _ops.gumbel_mask_with_slope(logits, weight, int(seed), int(offset), float(tau))


def logit_adam_step_composite(logits, exp_avg, exp_avg_sq, grad, grad_scale, density, kl, lr, beta1, beta2, eps,
                              step):
    """logit_adam_step_ from unfused ops (CUDA without Triton; on a CPU, a test oracle). Same
    arguments as the op (betas split in beta1, beta2; unchecked: the caller checks), same
    in-place updates, returns the prior's value."""
    if grad_scale is not None:
        grad = grad * grad_scale
    value, prior_grad = _ops.kl_prior(logits, density)
    grad = grad + kl * prior_grad
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    logits.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
    return value


def _logit_adam_step_cuda(logits, exp_avg, exp_avg_sq, grad, grad_scale, density, kl, lr, beta1, beta2, eps, step):
    kernels = _triton_or_none("logit_adam_step")
    if kernels is None:
        return logit_adam_step_composite(logits, exp_avg, exp_avg_sq, grad, grad_scale, density, kl, lr, beta1,
                                         beta2, eps, step)
    return kernels.logit_adam_step_(logits, exp_avg, exp_avg_sq, grad, grad_scale, density, kl, lr, beta1, beta2,
                                    eps, step)


_cuda_lib.impl("logit_adam_step_", _logit_adam_step_cuda, "CUDA")


@torch.library.register_fake("oes_fast::logit_adam_step_")
def _logit_adam_step_fake(logits, exp_avg, exp_avg_sq, grad, grad_scale, density, kl, lr, beta1, beta2, eps, step):
    check_logit_adam_step_inputs(logits, exp_avg, exp_avg_sq, grad, grad_scale, density, lr, (beta1, beta2), eps,
                                 step)
    return logits.new_empty((), dtype=_kl_value_dtype(logits))


def logit_adam_step_(logits: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, *,
                     step: int, density: float, kl: float, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                     grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One OES update of the logits, in place: the logits' gradient (`grad`, times `grad_scale`
    elementwise when given: the masked weights' gradient times `gumbel_mask_with_slope`'s slope)
    plus `kl` times the KL prior's gradient, then the Adam step number `step` (counted from 1,
    as torch.optim.Adam with default options). Returns the prior's value before the update.

    logits, exp_avg, exp_avg_sq: one shape, dtype (float32, float64, bfloat16) and device,
    contiguous (updated in place); grad and grad_scale: the same shape, dtype and device.
    step >= 1; density in (0, 1); lr > 0; betas in [0, 1); eps > 0. The value is 0-d, float64
    for float64 logits, else float32. ValueError / TypeError on anything else."""
    density, lr, eps, step = float(density), float(lr), float(eps), int(step)
    betas = tuple(float(b) for b in betas)
    check_logit_adam_step_inputs(logits, exp_avg, exp_avg_sq, grad, grad_scale, density, lr, betas, eps, step)
    return _ops.logit_adam_step_(logits, exp_avg, exp_avg_sq, grad, grad_scale, density, float(kl), lr, betas[0],
                                 betas[1], eps, step)


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

    def _sparse_conv2d_triton(input, values, row_ptr, col_idx, bias, kernel_size, stride, padding, padding_mode,
                              upsample=1):
        return _sparse_triton().sparse_conv2d(input, values, row_ptr, col_idx, bias, kernel_size, stride, padding,
                                              padding_mode, upsample)

    def _sparse_conv2d_input_grad_triton(grad_output, values, row_ptr, col_idx, input_size, kernel_size, stride,
                                         padding, padding_mode, upsample=1):
        return _sparse_triton().sparse_conv2d_input_grad(grad_output, values, row_ptr, col_idx, input_size,
                                                         kernel_size, stride, padding, padding_mode, upsample)

    def _sparse_conv2d_weight_grad_triton(grad_output, input, row_ptr, col_idx, kernel_size, stride, padding,
                                          padding_mode, upsample=1):
        return _sparse_triton().sparse_conv2d_weight_grad(grad_output, input, row_ptr, col_idx, kernel_size, stride,
                                                          padding, padding_mode, upsample)

    _cuda_lib.impl("sparse_conv2d", _sparse_conv2d_triton, "CUDA")
    _cuda_lib.impl("sparse_conv2d_input_grad", _sparse_conv2d_input_grad_triton, "CUDA")
    _cuda_lib.impl("sparse_conv2d_weight_grad", _sparse_conv2d_weight_grad_triton, "CUDA")


def _sparse_conv2d_out_size(size, kernel_size, stride, padding):
    return [(size[i] + 2 * padding[i] - kernel_size[i]) // stride[i] + 1 for i in range(2)]


@torch.library.register_fake("oes_fast::sparse_conv2d")
def _sparse_conv2d_fake(input, values, row_ptr, col_idx, bias, kernel_size, stride, padding, padding_mode, upsample=1):
    h, w = _sparse_conv2d_out_size([s * upsample for s in input.shape[2:]], kernel_size, stride, padding)
    return input.new_empty((input.shape[0], row_ptr.shape[0] - 1, h, w))


@torch.library.register_fake("oes_fast::sparse_conv2d_stats")
def _sparse_conv2d_stats_fake(input, values, row_ptr, col_idx, bias, kernel_size, padding, padding_mode, upsample=1):
    h, w = _sparse_conv2d_out_size([s * upsample for s in input.shape[2:]], kernel_size, [1, 1], padding)
    c_out = row_ptr.shape[0] - 1
    return input.new_empty((input.shape[0], c_out, h, w)), input.new_empty((c_out, 2), dtype=torch.float64)


@torch.library.register_fake("oes_fast::sparse_conv2d_input_grad")
def _sparse_conv2d_input_grad_fake(grad_output, values, row_ptr, col_idx, input_size, kernel_size, stride, padding,
                                   padding_mode, upsample=1):
    return grad_output.new_empty(tuple(input_size))


@torch.library.register_fake("oes_fast::sparse_conv2d_weight_grad")
def _sparse_conv2d_weight_grad_fake(grad_output, input, row_ptr, col_idx, kernel_size, stride, padding, padding_mode,
                                    upsample=1):
    return input.new_empty((col_idx.shape[0],))


# The autograd of sparse_conv2d, sparse_conv2d_stats and sparse_conv2d_pool_stats is C++, for
# every device: csrc/sparse_conv2d_autograd.cpp.


@torch.library.register_fake("oes_fast::sparse_conv2d_pool_stats")
def _sparse_conv2d_pool_stats_fake(input, values, row_ptr, col_idx, bias, kernel_size, padding, padding_mode):
    h, w = _sparse_conv2d_out_size(input.shape[2:], kernel_size, [1, 1], padding)
    c_out = row_ptr.shape[0] - 1
    return (input.new_empty((input.shape[0], c_out, h // 2, w // 2)),
            input.new_empty((c_out, 2), dtype=torch.float64))


@torch.library.register_fake("oes_fast::sparse_conv2d_pool_weight_grad")
def _sparse_conv2d_pool_weight_grad_fake(grad_output, input, row_ptr, col_idx, kernel_size, padding, padding_mode):
    return input.new_empty((col_idx.shape[0],))


@torch.library.register_fake("oes_fast::sparse_conv2d_pool_input_grad")
def _sparse_conv2d_pool_input_grad_fake(grad_output, values, row_ptr, col_idx, input_size, kernel_size, padding,
                                        padding_mode):
    return grad_output.new_empty(tuple(input_size))


def batch_norm_affine(stats: torch.Tensor, count: int, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(mean, sqrt(var + eps), scale, shift), float64 per channel, of the training-mode batch norm
    of values whose per-channel sum and sum of squares over `count` values are `stats` ((C, 2),
    float64): the batch norm is x * scale + shift."""
    mean = stats[:, 0] / count
    var = (stats[:, 1] / count - mean * mean).clamp_min(0.0)
    std = torch.sqrt(var + eps)
    scale = weight.double() / std
    return mean, std, scale, bias.double() - mean * scale


class _BatchNormFromStats(torch.autograd.Function):
    """Training-mode batch norm of x whose per-channel (sum, sum of squares) `stats` (float64,
    from sparse_conv2d_stats) are given: one pass over x instead of a statistics pass and a
    normalizing pass. The backward is torch's own batch-norm backward (through the statistics)."""

    @staticmethod
    def forward(ctx, x, stats, weight, bias, eps):
        mean, invstd, scale, shift = batch_norm_constants(stats, x.shape[0] * x.shape[2] * x.shape[3], weight, bias,
                                                          eps)
        shape = (1, -1, 1, 1)
        y = torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))
        ctx.save_for_backward(x, weight, mean.to(x.dtype), invstd.to(x.dtype))
        ctx.eps = eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), x, weight, None, None, mean, invstd, True, ctx.eps, [need[0], need[2], need[3]])
        return gx, None, gw, gb, None


def batch_norm_from_stats(x: torch.Tensor, stats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """F.batch_norm(x, None, None, weight, bias, training=True, eps=eps) for an NCHW x whose
    per-channel sum and sum of squares are `stats` ((C, 2), float64, as sparse_conv2d_stats
    returns them): the statistics pass is skipped. Differentiable in x, weight and bias (once)."""
    if stats.shape != (x.shape[1], 2) or stats.dtype != torch.float64:
        raise ValueError(f"stats must be float64 of shape ({x.shape[1]}, 2), got {stats.dtype} {tuple(stats.shape)}")
    return _BatchNormFromStats.apply(x, stats, weight, bias, float(eps))
# ======================================================================= end of sparse_conv2d


# =============================================================================================
# gumbel_masked_conv2d (issue 5): a stride-1 convolution whose weights are masked on the fly,
# w * sigmoid((p + logistic(u)) / tau) with u from the package's stream at offset + j, so the
# masked weights never reach memory. Schemas: csrc/gumbel_masked_conv2d.cpp.
# - CPU: the composite gumbel_mask + pad + conv2d below (and its backward through the same
#   pieces); what CPU users run and what the Triton kernels are tested against.
# - CUDA: Triton (kernels/gumbel_masked_conv2d.py), or the CUDA C++ kernels of
#   csrc/cuda/gumbel_masked_conv2d.cu when the extension has them and cuda_backend() == "cuda".
#   Those are registered in C++ under the separate ops gumbel_masked_conv2d{,_backward}_cuda_impl
#   (CUDA key only), so the one CUDA kernel of the public op can pick either at run time.

import torch.nn.functional as _F

_gmc_lib = torch.library.Library("oes_fast", "IMPL")
def _gmc_pad(input, padding, padding_mode):
    if padding == 0:
        return input
    return _F.pad(input, [padding] * 4, mode="reflect" if padding_mode == "reflect" else "constant")


def _gmc_unpad(grad_padded, input, padding, padding_mode):
    """Adjoint of _gmc_pad: the mirrored borders' gradient folded back onto their sources."""
    if padding == 0:
        return grad_padded
    if padding_mode == "reflect":
        return torch.ops.aten.reflection_pad2d_backward(grad_padded, input, [padding] * 4)
    h, w = input.shape[2], input.shape[3]
    return grad_padded[:, :, padding:padding + h, padding:padding + w].contiguous()


def _gumbel_masked_conv2d_cpu(input, logits, weight, bias, seed, offset, tau, padding, padding_mode):
    check_gumbel_masked_conv2d_inputs(input, logits, weight, bias, tau, padding, padding_mode)
    w_eff = _ops.gumbel_mask(logits, weight, seed, offset, tau)
    return _F.conv2d(_gmc_pad(input, padding, padding_mode), w_eff, bias)


def _gumbel_masked_conv2d_backward_cpu(grad_output, input, logits, weight, seed, offset, tau, padding, padding_mode,
                                       output_mask):
    check_gumbel_masked_conv2d_inputs(input, logits, weight, None, tau, padding, padding_mode)
    need_input, need_logits, need_weight, need_bias = (bool(b) for b in output_mask)
    empty = grad_output.new_empty(0)
    grad_input = grad_logits = grad_weight = grad_bias = empty
    if need_input or need_logits or need_weight:
        w_eff = _ops.gumbel_mask(logits, weight, seed, offset, tau)
        x = _gmc_pad(input, padding, padding_mode)
        # the bias gradient from the same call as nn.Conv2d's backward gets it: bit-identical to
        # the unfused engine (it matters: a conv bias followed by batch norm has a zero true
        # gradient, and Adam turns its rounding noise into full-size steps)
        grad_x, grad_w_eff, grad_b = torch.ops.aten.convolution_backward(
            grad_output.contiguous(), x, w_eff, [weight.shape[0]] if need_bias else None, [1, 1], [0, 0], [1, 1],
            False, [0, 0], 1, [need_input, need_logits or need_weight, need_bias])
        if need_bias:
            grad_bias = grad_b
        if need_input:
            grad_input = _gmc_unpad(grad_x, input, padding, padding_mode)
        if need_logits or need_weight:
            gl, gw = _ops.gumbel_mask_backward(grad_w_eff.contiguous(), logits, weight, seed, offset, tau, need_weight)
            grad_logits = gl if need_logits else empty
            grad_weight = gw if need_weight else empty
    elif need_bias:
        grad_bias = _channel_sum(grad_output)
    return grad_input, grad_logits, grad_weight, grad_bias


def _gmc_triton():
    from .kernels import gumbel_masked_conv2d as triton_gumbel_masked_conv2d

    return triton_gumbel_masked_conv2d


def _gmc_cuda_cpp() -> bool:
    return bool(_C.with_cuda) and _cuda_backend == "cuda"


def _gumbel_masked_conv2d_cuda(input, logits, weight, bias, seed, offset, tau, padding, padding_mode):
    if _gmc_cuda_cpp():
        return _ops.gumbel_masked_conv2d_cuda_impl(input, logits, weight, bias, seed, offset, tau, padding,
                                                   padding_mode)
    return _gmc_triton().gumbel_masked_conv2d_forward(input, logits, weight, bias, seed, offset, tau, padding,
                                                      padding_mode)


def _gumbel_masked_conv2d_backward_cuda(grad_output, input, logits, weight, seed, offset, tau, padding, padding_mode,
                                        output_mask):
    if _gmc_cuda_cpp():
        return _ops.gumbel_masked_conv2d_backward_cuda_impl(grad_output, input, logits, weight, seed, offset, tau,
                                                            padding, padding_mode, output_mask)
    return _gmc_triton().gumbel_masked_conv2d_backward(grad_output, input, logits, weight, seed, offset, tau, padding,
                                                       padding_mode, output_mask)


_gmc_lib.impl("gumbel_masked_conv2d", _gumbel_masked_conv2d_cpu, "CPU")
_gmc_lib.impl("gumbel_masked_conv2d_backward", _gumbel_masked_conv2d_backward_cpu, "CPU")
_gmc_lib.impl("gumbel_masked_conv2d", _gumbel_masked_conv2d_cuda, "CUDA")
_gmc_lib.impl("gumbel_masked_conv2d_backward", _gumbel_masked_conv2d_backward_cuda, "CUDA")


@torch.library.register_fake("oes_fast::gumbel_masked_conv2d")
def _gumbel_masked_conv2d_fake(input, logits, weight, bias, seed, offset, tau, padding, padding_mode):
    h_out, w_out = check_gumbel_masked_conv2d_inputs(input, logits, weight, bias, tau, padding, padding_mode)
    return input.new_empty((input.shape[0], weight.shape[0], h_out, w_out))


@torch.library.register_fake("oes_fast::gumbel_masked_conv2d_backward")
def _gumbel_masked_conv2d_backward_fake(grad_output, input, logits, weight, seed, offset, tau, padding, padding_mode,
                                        output_mask):
    check_gumbel_masked_conv2d_inputs(input, logits, weight, None, tau, padding, padding_mode)
    shapes = (input.shape, weight.shape, weight.shape, (weight.shape[0],))
    return tuple(grad_output.new_empty(s if want else (0,)) for s, want in zip(shapes, output_mask))


def _gumbel_masked_conv2d_setup_context(ctx, inputs, output):
    input, logits, weight, bias, seed, offset, tau, padding, padding_mode = inputs
    ctx.save_for_backward(input, logits, weight)
    ctx.args = (seed, offset, tau, padding, padding_mode)
    ctx.has_bias = bias is not None


def _gumbel_masked_conv2d_autograd_backward(ctx, grad):
    # the backward op regenerates the masked weights from (seed, offset); nothing else is saved
    input, logits, weight = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[i]) for i in range(3)] + [ctx.has_bias and bool(ctx.needs_input_grad[3])]
    if not any(need):
        return (None,) * 9
    grads = _ops.gumbel_masked_conv2d_backward(grad.contiguous(), input, logits, weight, *ctx.args, need)
    return tuple(g if want else None for g, want in zip(grads, need)) + (None,) * 5


torch.library.register_autograd("oes_fast::gumbel_masked_conv2d", _gumbel_masked_conv2d_autograd_backward,
                                setup_context=_gumbel_masked_conv2d_setup_context)


def gumbel_masked_conv2d(input: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, bias=None, seed: int = 0,
                         offset: int = 0, tau: float = 0.2, padding: int | None = None,
                         padding_mode: str = "reflect") -> torch.Tensor:
    """conv2d(pad(input), weight * sigmoid((logits + L) / tau)) + bias, stride 1, square kernel.

    L = log(u) - log(1 - u), u = philox_uniform(seed, offset + j) for weight element j: the noise
    `gumbel_mask(logits, weight, seed, offset, tau)` would use. `padding` defaults to 'same'
    ((k - 1) // 2). The bias is added as given (mask it with gumbel_mask first if it should be).
    Differentiable in input, logits, weight and bias.

    input [N, C_in, H, W]; logits, weight [C_out, C_in, k, k]; bias [C_out] or None; all one
    dtype (float32 or float64) and device. seed, offset in [0, 2**63); tau > 0; padding in
    [0, min(H, W)) for 'reflect' (>= 0 for 'zeros'); padding_mode 'reflect' or 'zeros'.
    Returns [N, C_out, H + 2 padding - k + 1, W + 2 padding - k + 1] in the input's dtype.
    """
    _check_seed_offset(seed, offset)
    if padding is None:
        padding = (weight.shape[-1] - 1) // 2
    return _ops.gumbel_masked_conv2d(input, logits, weight, bias, int(seed), int(offset), float(tau), int(padding),
                                     padding_mode)
# ================================================================ end of gumbel_masked_conv2d


# =============================================================================================
# batch_norm_leaky_relu: the Sparse-DIP generator's training-mode batch norm fused with the
# LeakyReLU after it (one pass forward, two per channel backward). Schemas:
# csrc/batch_norm_leaky_relu.cpp; CPU kernels: csrc/cpu/batch_norm_leaky_relu.cpp, for float32
# and float64. Those kernels carry no autograd of their own; batch_norm_act composes them into
# one differentiable op, its gradient flowing through the batch statistics, with its autograd in
# C++ (csrc/batch_norm_act.cpp). Other devices and dtypes run reference.batch_norm_leaky_relu
# (F.batch_norm + F.leaky_relu). The generator's head, the last batch norm with its LeakyReLU
# and the 1x1 output conv, is one more pair of kernels (batch_norm_leaky_relu_conv1x1 and its
# backward) and one more differentiable op (batch_norm_act_conv1x1; CPU only).


@torch.library.register_fake("oes_fast::batch_norm_stats")
def _batch_norm_stats_fake(input):
    return input.new_empty((input.shape[1], 2), dtype=torch.float64)


@torch.library.register_fake("oes_fast::batch_norm_act_stats")
def _batch_norm_act_stats_fake(input, scale, shift, negative_slope):
    return _batch_norm_stats_fake(input)


@torch.library.register_fake("oes_fast::batch_norm_leaky_relu")
def _batch_norm_leaky_relu_fake(input, scale, shift, negative_slope):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("oes_fast::batch_norm_leaky_relu_backward")
def _batch_norm_leaky_relu_backward_fake(grad_output, input, mean, invstd, scale, shift, negative_slope):
    channels = input.shape[1]
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            input.new_empty((channels,), dtype=torch.float64), input.new_empty((channels,), dtype=torch.float64))


@torch.library.register_fake("oes_fast::batch_norm_constants")
def _batch_norm_constants_fake(stats, count, weight, bias, eps):
    return tuple(stats.new_empty((stats.shape[0],)) for _ in range(4))


def batch_norm_constants(stats: torch.Tensor, count: int, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(mean, 1 / sqrt(var + eps), scale, shift), float64 per channel: batch_norm_affine's
    formula, in one C++ call for CPU statistics (the same bits; a dozen small tensor ops cost
    more than the batch norm's pass over a small layer). Not differentiable."""
    if stats.device.type == "cpu":
        return _ops.batch_norm_constants(stats, count, weight.detach(), bias.detach(), eps)
    mean, std, scale, shift = batch_norm_affine(stats, count, weight, bias, eps)
    return mean, std.reciprocal(), scale, shift


def _check_batch_norm_input(x, stats, op):
    """ValueError unless x is (N, C, H, W) with more than one value per channel and stats (if
    given) are (C, 2) float64."""
    if stats is not None and (stats.shape != (x.shape[1], 2) or stats.dtype != torch.float64):
        raise ValueError(f"stats must be float64 of shape ({x.shape[1]}, 2), got {stats.dtype} {tuple(stats.shape)}")
    if x.dim() != 4 or x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        raise ValueError(f"{op}: x must be (N, C, H, W) with more than one value per channel, "
                         f"got shape {tuple(x.shape)}")


@torch.library.register_fake("oes_fast::batch_norm_leaky_relu_conv1x1")
def _batch_norm_leaky_relu_conv1x1_fake(input, scale, shift, negative_slope, weight, bias):
    n, _, h, w = input.shape
    return input.new_empty((n, weight.shape[0], h, w))


@torch.library.register_fake("oes_fast::batch_norm_leaky_relu_conv1x1_backward")
def _batch_norm_leaky_relu_conv1x1_backward_fake(grad_output, input, mean, invstd, scale, shift, negative_slope,
                                                 weight):
    channels, outputs = input.shape[1], weight.shape[0]
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            input.new_empty((channels,), dtype=torch.float64), input.new_empty((channels,), dtype=torch.float64),
            input.new_empty((outputs, channels), dtype=torch.float64),
            input.new_empty((outputs,), dtype=torch.float64))


@torch.library.register_fake("oes_fast::batch_norm_act")
def _batch_norm_act_fake(input, stats, weight, bias, eps, negative_slope):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("oes_fast::batch_norm_act_conv1x1")
def _batch_norm_act_conv1x1_fake(input, stats, weight, bias, eps, negative_slope, conv_weight, conv_bias):
    n, _, h, w = input.shape
    return input.new_empty((n, conv_weight.shape[0], h, w))


@torch.library.register_fake("oes_fast::sparse_conv2d_act_stats")
def _sparse_conv2d_act_stats_fake(input, scale, shift, negative_slope, values, row_ptr, col_idx, bias, kernel_size,
                                  padding, padding_mode, upsample, pool, post_scale=None, post_shift=None):
    if pool:
        return _sparse_conv2d_pool_stats_fake(input, values, row_ptr, col_idx, bias, kernel_size, padding, padding_mode)
    return _sparse_conv2d_stats_fake(input, values, row_ptr, col_idx, bias, kernel_size, padding, padding_mode, upsample)


@torch.library.register_fake("oes_fast::sparse_conv2d_act_weight_grad")
def _sparse_conv2d_act_weight_grad_fake(grad_output, input, scale, shift, negative_slope, row_ptr, col_idx,
                                        kernel_size, padding, padding_mode, upsample, pool, post_scale=None,
                                        post_shift=None):
    return _sparse_conv2d_weight_grad_fake(grad_output, input, row_ptr, col_idx, kernel_size, [1, 1], padding,
                                           padding_mode, upsample)


@torch.library.register_fake("oes_fast::batch_norm_act_sparse_conv2d")
def _batch_norm_act_sparse_conv2d_fake(input, stats, weight, bias, eps, negative_slope, values, row_ptr, col_idx,
                                       conv_bias, kernel_size, padding, padding_mode, upsample, pool):
    return _sparse_conv2d_act_stats_fake(input, None, None, negative_slope, values, row_ptr, col_idx, conv_bias,
                                         kernel_size, padding, padding_mode, upsample, pool)


@torch.library.register_fake("oes_fast::batch_norm_act_norm_sparse_conv2d")
def _batch_norm_act_norm_sparse_conv2d_fake(input, stats, weight, bias, eps, negative_slope, weight2, bias2, eps2,
                                            values, row_ptr, col_idx, conv_bias, kernel_size, padding, padding_mode,
                                            upsample, pool):
    return _sparse_conv2d_act_stats_fake(input, None, None, negative_slope, values, row_ptr, col_idx, conv_bias,
                                         kernel_size, padding, padding_mode, upsample, pool)


def _check_fused_conv_input(x, stats, op):
    """_check_batch_norm_input, and ValueError unless x is a CPU float32 or float64 tensor (the
    fused batch-norm-and-conv ops are CPU only)."""
    _check_batch_norm_input(x, stats, op)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: x must be a CPU float32 or float64 tensor, got {x.dtype} on {x.device}")


def batch_norm_leaky_relu_sparse_conv2d(x: torch.Tensor, stats: torch.Tensor | None, weight: torch.Tensor,
                                        bias: torch.Tensor, eps: float, negative_slope: float, values: torch.Tensor,
                                        row_ptr: torch.Tensor, col_idx: torch.Tensor, conv_bias: torch.Tensor | None,
                                        kernel_size, padding, padding_mode: str = "reflect", upsample: int = 1,
                                        pool: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_conv2d_stats(batch_norm_leaky_relu(x, stats, weight, bias, eps, negative_slope),
    values, row_ptr, col_idx, conv_bias, kernel_size, padding, padding_mode, upsample) (or, with
    pool, the conv's 2x2 average pooling and its statistics, as sparse_conv2d_pool_stats), with
    the batch norm's normalizing pass and activation made while the conv loads its input: the
    activated tensor is never stored (forward or backward). Returns (output, its (C_out, 2)
    float64 statistics). x: NCHW, CPU, float32 or float64. Differentiable (once) in x, weight,
    bias, values and conv_bias; the same values and gradients, bit for bit, as the two ops."""
    _check_fused_conv_input(x, stats, "batch_norm_leaky_relu_sparse_conv2d")
    return _ops.batch_norm_act_sparse_conv2d(x, stats, weight, bias, float(eps), float(negative_slope), values,
                                             row_ptr, col_idx, conv_bias, list(kernel_size), list(padding),
                                             padding_mode, int(upsample), bool(pool))


def batch_norm_leaky_relu_batch_norm_sparse_conv2d(
        x: torch.Tensor, stats: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
        negative_slope: float, weight2: torch.Tensor, bias2: torch.Tensor, eps2: float, values: torch.Tensor,
        row_ptr: torch.Tensor, col_idx: torch.Tensor, conv_bias: torch.Tensor | None, kernel_size, padding,
        padding_mode: str = "reflect", upsample: int = 1, pool: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_norm_leaky_relu_sparse_conv2d(batch_norm_leaky_relu(x, stats, weight, bias, eps,
    negative_slope), None, weight2, bias2, eps2, 1.0, values, ...): a batch norm and its
    LeakyReLU, then a second batch norm (batch statistics, no activation), then the sparse conv,
    as the generator's up path runs them. The second batch norm's statistics come from a pass over
    x that activates it without storing it, and both batch norms are made in the conv's input
    load: neither intermediate tensor is stored in the forward (the backward makes the activation
    again for the second batch norm's gradient). Returns (output, its (C_out, 2) float64
    statistics). x: NCHW, CPU, float32 or float64. Differentiable (once) in x, weight, bias,
    weight2, bias2, values and conv_bias; the same values and gradients, bit for bit, as the ops
    it replaces."""
    _check_fused_conv_input(x, stats, "batch_norm_leaky_relu_batch_norm_sparse_conv2d")
    return _ops.batch_norm_act_norm_sparse_conv2d(x, stats, weight, bias, float(eps), float(negative_slope), weight2,
                                                  bias2, float(eps2), values, row_ptr, col_idx, conv_bias,
                                                  list(kernel_size), list(padding), padding_mode, int(upsample),
                                                  bool(pool))


def batch_norm_leaky_relu_conv1x1(x: torch.Tensor, stats: torch.Tensor | None, weight: torch.Tensor,
                                  bias: torch.Tensor, eps: float, negative_slope: float, conv_weight: torch.Tensor,
                                  conv_bias: torch.Tensor | None) -> torch.Tensor:
    """The 1x1 conv (conv_weight (C_out, C), conv_bias (C_out,) or None) of
    batch_norm_leaky_relu(x, stats, weight, bias, eps, negative_slope), in one pass over x (the
    generator's head; reference.batch_norm_leaky_relu_conv1x1 is its meaning). x: NCHW, CPU,
    float32 or float64; stats as batch_norm_leaky_relu takes them. Differentiable (once) in x,
    weight, bias, conv_weight and conv_bias."""
    _check_batch_norm_input(x, stats, "batch_norm_leaky_relu_conv1x1")
    return _ops.batch_norm_act_conv1x1(x, stats, weight, bias, float(eps), float(negative_slope), conv_weight,
                                       conv_bias)


def batch_norm_leaky_relu(x: torch.Tensor, stats: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float, negative_slope: float = 0.2) -> torch.Tensor:
    """F.leaky_relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=eps),
    negative_slope) of an NCHW x, in one pass over x (plus a statistics pass when `stats` is
    None). `stats`: x's per-channel (sum, sum of squares), (C, 2) float64, as
    sparse_conv2d_stats returns them, or None. weight, bias: (C,). Differentiable (once) in x,
    weight and bias. CPU float32 / float64: the C++ kernels, normalizing in float64; otherwise
    the composite reference.batch_norm_leaky_relu (batch_norm_from_stats when stats are given)."""
    _check_batch_norm_input(x, stats, "batch_norm_leaky_relu")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        if stats is not None:
            return _F.leaky_relu(batch_norm_from_stats(x, stats, weight, bias, eps), negative_slope)
        from . import reference

        return reference.batch_norm_leaky_relu(x, weight, bias, eps, negative_slope)
    return _ops.batch_norm_act(x, stats, weight, bias, float(eps), float(negative_slope))
# ============================================================== end of batch_norm_leaky_relu


# =============================================================================================
# avg_pool2x2: the Sparse-DIP generator's 2x2, stride-2 average pooling in one pass forward and
# one backward (oes_fast.sparse.avg_pool2x2 calls them on CPU float32 / float64 and
# oes_fast.sparse._AvgPool2x2's torch expression for the rest). Schemas: csrc/avg_pool2x2.cpp;
# CPU kernels: csrc/cpu/avg_pool2x2.cpp. Each op is linear and the other is its adjoint, so each
# one's gradient is the other: differentiable any number of times.


@torch.library.register_fake("oes_fast::avg_pool2x2")
def _avg_pool2x2_fake(input):
    torch._check(input.dim() == 4 and input.shape[2] >= 2 and input.shape[3] >= 2,
                 lambda: f"avg_pool2x2: input must be (N, C, H, W) with H, W >= 2, got {tuple(input.shape)}")
    n, c, h, w = input.shape
    return input.new_empty((n, c, h // 2, w // 2))


@torch.library.register_fake("oes_fast::avg_pool2x2_backward")
def _avg_pool2x2_backward_fake(grad_output, input_size):
    return grad_output.new_empty(input_size)


def _avg_pool2x2_setup_context(ctx, inputs, output):
    ctx.input_size = list(inputs[0].shape)


def _avg_pool2x2_autograd_backward(ctx, grad):
    return _ops.avg_pool2x2_backward(grad.contiguous(), ctx.input_size)


def _avg_pool2x2_backward_autograd_backward(ctx, grad):
    return _ops.avg_pool2x2(grad.contiguous()), None


torch.library.register_autograd("oes_fast::avg_pool2x2", _avg_pool2x2_autograd_backward,
                                setup_context=_avg_pool2x2_setup_context)
torch.library.register_autograd("oes_fast::avg_pool2x2_backward", _avg_pool2x2_backward_autograd_backward,
                                setup_context=lambda ctx, inputs, output: None)
# ======================================================================== end of avg_pool2x2
