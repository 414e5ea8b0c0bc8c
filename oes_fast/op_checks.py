"""Argument checks of the operators, shared by oes_fast.ops (wrappers, fake kernels) and the
Triton launchers in oes_fast.kernels, which must not import oes_fast.ops (it loads the C++
extension and registers the operators). Each check raises ValueError / TypeError with the
operator's name and what was wrong; none of them touches tensor data, so they also run on fake
tensors while torch.compile traces.
"""
from __future__ import annotations

import math

import torch

__all__ = ["SEED_LIMIT", "check_gumbel_mask_inputs", "check_logit_adam_step_inputs",
           "check_gumbel_masked_conv2d_inputs"]

SEED_LIMIT = 2**63  # seeds and offsets are in [0, 2**63)

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
        if isinstance(value, int) and not 0 <= value < SEED_LIMIT:
            raise ValueError(f"gumbel_mask: {name} must be in [0, 2**63), got {value}")


def check_logit_adam_step_inputs(logits, exp_avg, exp_avg_sq, grad, grad_scale, density, lr, betas, eps,
                                 step) -> None:
    """The checks of csrc/ops.cpp for logit_adam_step_: every state tensor like the logits, the
    updated ones contiguous, the hyperparameters in range."""
    named = [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grad", grad)]
    if grad_scale is not None:
        named.append(("grad_scale", grad_scale))
    for name, t in named:
        if t.shape != logits.shape or t.dtype != logits.dtype or t.device != logits.device:
            raise ValueError(f"logit_adam_step_: {name} must match logits in shape, dtype and device, got "
                             f"{tuple(t.shape)} {t.dtype} {t.device} against {tuple(logits.shape)} {logits.dtype} "
                             f"{logits.device}")
    if logits.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise TypeError(f"logit_adam_step_: dtype must be float32, float64 or bfloat16, got {logits.dtype}")
    for name, t in (("logits", logits), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"logit_adam_step_: {name} must be contiguous (it is updated in place)")
    if not 0.0 < density < 1.0:
        raise ValueError(f"logit_adam_step_: density must be in (0, 1), got {density}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"logit_adam_step_: lr must be positive and finite, got {lr}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"logit_adam_step_: betas must be in [0, 1), got {betas}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"logit_adam_step_: eps must be positive and finite, got {eps}")
    if step < 1:
        raise ValueError(f"logit_adam_step_: step counts from 1, got {step}")



_GMC_DTYPES = (torch.float32, torch.float64)


def check_gumbel_masked_conv2d_inputs(input, logits, weight, bias, tau, padding, padding_mode):
    """Argument checks shared by the CPU, fake and Triton kernels; returns (H_out, W_out)."""
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"gumbel_masked_conv2d: input and weight must be 4-D, got {tuple(input.shape)} and "
                         f"{tuple(weight.shape)}")
    if logits.shape != weight.shape:
        raise ValueError(f"gumbel_masked_conv2d: logits and weight must have the same shape, got "
                         f"{tuple(logits.shape)} and {tuple(weight.shape)}")
    k = weight.shape[2]
    if weight.shape[3] != k or weight.shape[1] != input.shape[1]:
        raise ValueError(f"gumbel_masked_conv2d: weight must be [C_out, C_in, k, k] with C_in = {input.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    tensors = [input, logits, weight] + ([bias] if bias is not None else [])
    if input.dtype not in _GMC_DTYPES or any(t.dtype != input.dtype for t in tensors):
        raise TypeError("gumbel_masked_conv2d: all tensors must share one dtype, float32 or float64, got "
                        f"{[t.dtype for t in tensors]}")
    if any(t.device != input.device for t in tensors):
        raise ValueError("gumbel_masked_conv2d: all tensors must be on one device")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"gumbel_masked_conv2d: bias must be [C_out], got {tuple(bias.shape)}")
    if padding_mode not in ("reflect", "zeros"):
        raise ValueError(f"gumbel_masked_conv2d: padding_mode must be 'reflect' or 'zeros', got {padding_mode!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"gumbel_masked_conv2d: tau must be positive and finite, got {tau}")
    h, w = input.shape[2], input.shape[3]
    if padding < 0 or (padding_mode == "reflect" and padding > 0 and padding >= min(h, w)):
        raise ValueError(f"gumbel_masked_conv2d: padding must be in [0, min(H, W)) for reflection, got {padding}")
    h_out, w_out = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"gumbel_masked_conv2d: kernel {k} is larger than the padded input {h}x{w} + {padding}")
    return h_out, w_out
