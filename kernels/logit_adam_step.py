"""Triton kernel of logit_adam_step_ (the CPU kernel: csrc/cpu/logit_adam_step.cpp): the logit
side of a search step in one pass. Per element: g = grad (* grad_scale) + kl * dKL/dp, then
Adam as torch.optim.Adam (exp_avg.lerp_(g, 1 - beta1), exp_avg_sq = beta2 v + (1 - beta2) g^2,
p -= lr / bias1 * exp_avg / (sqrt(exp_avg_sq) / sqrt(bias2) + eps)), in place; each program
writes its partial sum of the KL prior, summed after (in float64, no atomics: deterministic).

float32 and bfloat16 compute in float32, float64 in float64. Works on CUDA tensors, and on CPU
tensors when TRITON_INTERPRET=1 was set before triton was imported.
"""
import math

import torch
import triton
import triton.language as tl

from .gumbel_mask import _as_f64_bits, _check_device, _compute_dtype, _f64, _on_device, _sigmoid_and_complement

__all__ = ["logit_adam_step_"]

BLOCK = 1024
NUM_WARPS = 4
KL_EPS: tl.constexpr = tl.constexpr(1e-6)  # the authors' epsilon inside the prior's logs


@triton.jit
def _logit_adam_step_kernel(p_ptr, m_ptr, v_ptr, g_ptr, scale_ptr, partial_ptr, n, log_rho_bits, log_not_rho_bits,
                            kl_bits, beta1_bits, beta2_bits, step_size_bits, bias2_sqrt_bits, eps_bits, step_ptr,
                            lr_bits, HAS_SCALE: tl.constexpr, STEP_FROM_PTR: tl.constexpr, COMPUTE: tl.constexpr,
                            BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = idx < n
    p = tl.load(p_ptr + idx, mask=live, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + idx, mask=live, other=0.0).to(COMPUTE)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr + idx, mask=live, other=0.0).to(COMPUTE)
    # the KL prior of p and its derivative (csrc/cpu/elementwise.h: kl_term), with 1 - s taken as
    # e * s (no cancellation where s = sigmoid(p) is nearly 1)
    s, not_s = _sigmoid_and_complement(p, COMPUTE)
    log_a = tl.log(s + KL_EPS) - _f64(log_rho_bits, COMPUTE)
    log_b = tl.log(not_s + KL_EPS) - _f64(log_not_rho_bits, COMPUTE)
    value = s * log_a + not_s * log_b
    dkl = (log_a + s / (s + KL_EPS) - log_b - not_s / (not_s + KL_EPS)) * (s * not_s)
    g = g + _f64(kl_bits, COMPUTE) * dkl
    m = tl.load(m_ptr + idx, mask=live, other=0.0).to(COMPUTE)
    v = tl.load(v_ptr + idx, mask=live, other=0.0).to(COMPUTE)
    m = m + (1.0 - _f64(beta1_bits, COMPUTE)) * (g - m)
    beta2 = _f64(beta2_bits, COMPUTE)
    v = beta2 * v + (1.0 - beta2) * g * g
    if STEP_FROM_PTR:  # Adam's step count read on the device (a captured CUDA graph's replays)
        t = tl.load(step_ptr).to(tl.float64)
        bias1 = 1.0 - tl.exp(t * tl.log(_f64(beta1_bits, tl.float64)))
        step_size = (_f64(lr_bits, tl.float64) / bias1).to(COMPUTE)
        bias2_sqrt = tl.sqrt(1.0 - tl.exp(t * tl.log(_f64(beta2_bits, tl.float64)))).to(COMPUTE)
    else:
        step_size = _f64(step_size_bits, COMPUTE)
        bias2_sqrt = _f64(bias2_sqrt_bits, COMPUTE)
    p = p - step_size * m / (tl.sqrt(v) / bias2_sqrt + _f64(eps_bits, COMPUTE))
    tl.store(p_ptr + idx, p.to(p_ptr.dtype.element_ty), mask=live)
    tl.store(m_ptr + idx, m.to(m_ptr.dtype.element_ty), mask=live)
    tl.store(v_ptr + idx, v.to(v_ptr.dtype.element_ty), mask=live)
    tl.store(partial_ptr + pid, tl.sum(tl.where(live, value, 0.0), axis=0).to(tl.float64))


def logit_adam_step_(logits, exp_avg, exp_avg_sq, grad, grad_scale, density, kl, lr, beta1, beta2, eps, step):
    """The op's CUDA kernel; the caller (oes_fast.ops) has checked the arguments. `step` is an
    int, or a 0-d int64 tensor beside the logits that the kernel reads on the device (no host
    sync: the launch can be captured in a CUDA graph; the bias corrections are then computed
    in float64 in the kernel, as exp(step * log(beta)))."""
    _check_device("logit_adam_step_", logits)
    n = logits.numel()
    programs = triton.cdiv(n, BLOCK)
    partial = torch.zeros(max(programs, 1), dtype=torch.float64, device=logits.device)
    value_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if n == 0:
        return partial.sum().to(value_dtype)
    g = grad.contiguous()
    scale = grad_scale.contiguous() if grad_scale is not None else g  # not read without HAS_SCALE
    on_device = isinstance(step, torch.Tensor)
    if on_device:
        if not (step.dim() == 0 and step.dtype == torch.int64 and step.device == logits.device):
            raise ValueError("logit_adam_step_: a step tensor must be a 0-d int64 tensor on the logits' device")
        step_size = bias2_sqrt = 0.0  # computed in the kernel
    else:
        step_size, bias2_sqrt = lr / (1 - beta1**step), math.sqrt(1 - beta2**step)
    constants = (math.log(density), math.log1p(-density), kl, beta1, beta2, step_size, bias2_sqrt, eps)
    with _on_device(logits):
        _logit_adam_step_kernel[(programs,)](logits, exp_avg, exp_avg_sq, g, scale, partial, n,
                                             *(_as_f64_bits(c) for c in constants),
                                             step if on_device else partial, _as_f64_bits(lr),
                                             HAS_SCALE=grad_scale is not None, STEP_FROM_PTR=on_device,
                                             COMPUTE=_compute_dtype(logits.dtype), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return partial.sum().to(value_dtype)
