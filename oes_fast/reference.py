"""Plain, readable PyTorch for every oes_fast op: the meaning each fast path is tested against.

Everything here works in float64. Random numbers are passed in explicitly (uniforms `u`),
except `philox_uniform`, a direct transcription of the RNG contract (engineering.md).
Formulas follow oes-spec.md section 3.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.func import functional_call

# Uniforms are clamped to [2^-24, 1 - 2^-24] before the logs (csrc/philox.h).
U_MIN = 2.0**-24
U_MAX = 1.0 - 2.0**-24
KL_EPS = 1e-6

# ------------------------------------------------------------------------------ random stream
_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms u(seed, offset) of Philox4x32-10, computed with int64 tensor arithmetic.

    key = (seed lo, seed hi); counter = (offset lo, offset hi, 0, 0); the first output word x,
    read as int32, gives u = float32(x < 0 ? ~x : x) * float32(4.6566127342e-10).
    """
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        # 32x32 -> 64-bit products, split in 16-bit halves so nothing overflows int64
        prod_a_hi, prod_a_lo = _mulhilo32(_ROUND_A, c0)
        prod_b_hi, prod_b_lo = _mulhilo32(_ROUND_B, c2)
        c0, c1, c2, c3 = prod_b_hi ^ c1 ^ k0, prod_b_lo, prod_a_hi ^ c3 ^ k1, prod_a_lo
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_lo = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi + (lo_lo >> 16)  # < 2^34, fits
    hi = a_hi * b_hi + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    return hi & _M32, lo & _M32


# ------------------------------------------------------------------------------ Gumbel mask
def logistic_noise(u: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """L = log(u) - log(1 - u) with u clamped away from 0 and 1."""
    u = u.to(dtype).clamp(U_MIN, U_MAX)
    return torch.log(u) - torch.log(1 - u)


def gumbel_sigmoid(logits: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft mask m = sigmoid((p + L) / tau) of the binary Concrete relaxation."""
    return torch.sigmoid((logits + logistic_noise(u, logits.dtype)) / tau)


def gumbel_mask(logits: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
    """Masked weight w * m."""
    return weight * gumbel_sigmoid(logits, u, tau)


def gumbel_mask_backward(grad, logits, weight, u, tau):
    """(d/dp, d/dw) of sum(grad * w * m): grad * w * m (1 - m) / tau and grad * m."""
    x = (logits + logistic_noise(u, logits.dtype)) / tau
    m = torch.sigmoid(x)
    # 1 - m as sigmoid(-x): where m is nearly 1, 1 - m would cancel to a few bits
    return grad * weight * (m * torch.sigmoid(-x)) / tau, grad * m


# ------------------------------------------------------------------------------ KL prior
def kl_prior(logits: torch.Tensor, density: float) -> torch.Tensor:
    """sum_j KL(Bernoulli(s_j) || Bernoulli(rho)), s = sigmoid(p), with the authors' 1e-6."""
    s = torch.sigmoid(logits)
    not_s = torch.sigmoid(-logits)  # 1 - s; where s is nearly 1, 1 - s would cancel to a few bits
    rho = density
    return (s * torch.log((s + KL_EPS) / rho) + not_s * torch.log((not_s + KL_EPS) / (1 - rho))).sum()


def kl_prior_grad(logits: torch.Tensor, density: float) -> torch.Tensor:
    """d kl_prior / d p, by the chain rule through s = sigmoid(p)."""
    s = torch.sigmoid(logits)
    not_s = torch.sigmoid(-logits)  # 1 - s, as in kl_prior
    rho = density
    dkl_ds = (torch.log((s + KL_EPS) / rho) + s / (s + KL_EPS)
              - torch.log((not_s + KL_EPS) / (1 - rho)) - not_s / (not_s + KL_EPS))
    return dkl_ds * (s * not_s)


# ------------------------------------------------------------------------------ sparse convolution
def sparse_conv2d(input: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                  kernel_size, bias=None, stride=1, padding=0, padding_mode: str = "zeros",
                  upsample: int = 1) -> torch.Tensor:
    """oes_fast.sparse.sparse_conv2d: the CSR weight (row o holds output channel o; col_idx =
    c * KH * KW + ky * KW + kx) scattered into a dense weight, the input nearest-upsampled and
    padded, then F.conv2d. Differentiable in input, values and bias."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    c_out, c_in = row_ptr.numel() - 1, input.shape[1]
    rows = torch.repeat_interleave(torch.arange(c_out, device=values.device), row_ptr.diff())
    dense = torch.zeros(c_out, c_in * kh * kw, dtype=values.dtype, device=values.device)
    dense = dense.index_put((rows, col_idx.long()), values).reshape(c_out, c_in, kh, kw)
    x = torch.nn.functional.interpolate(input, scale_factor=upsample, mode="nearest") if upsample != 1 else input
    mode = "reflect" if padding_mode == "reflect" else "constant"
    x = torch.nn.functional.pad(x, (pw, pw, ph, ph), mode=mode)
    return torch.nn.functional.conv2d(x, dense, bias, stride=stride)


# ------------------------------------------------------------------------------ batch norm
def batch_norm_leaky_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                          negative_slope: float = 0.2) -> torch.Tensor:
    """Training-mode batch norm of an NCHW x (batch statistics, biased variance) followed by
    LeakyReLU: the meaning of oes_fast.ops.batch_norm_leaky_relu."""
    y = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    return torch.nn.functional.leaky_relu(y, negative_slope)


def batch_norm_leaky_relu_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                                  negative_slope: float, conv_weight: torch.Tensor,
                                  conv_bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 conv (conv_weight (C_out, C)) of batch_norm_leaky_relu: the meaning of
    oes_fast.ops.batch_norm_leaky_relu_conv1x1 (the generator's head)."""
    y = batch_norm_leaky_relu(x, weight, bias, eps, negative_slope)
    return torch.nn.functional.conv2d(y, conv_weight[:, :, None, None], conv_bias)


# ------------------------------------------------------------------------------ masked model
def masked_forward(model: nn.Module, params: Mapping[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """f(z; params) through torch.func.functional_call (the model's own weights are untouched).

    Batch norm uses batch statistics, as in training mode (oes-spec.md section 2).
    """
    model.train()
    return functional_call(model, dict(params), (z,))


def search_loss(model, weights, logits, uniforms, z, y, density, tau=0.2, kl=1e-9, observed=None):
    """OES loss of one step: mse(f(z; W0 * m), y) + kl * KL prior, with explicit uniforms.

    `observed` (optional, broadcastable to y) restricts the data term to observed pixels.
    """
    masked = {name: gumbel_mask(logits[name], weights[name], uniforms[name], tau) for name in weights}
    out = masked_forward(model, masked, z)
    if observed is None:
        data = torch.mean((out - y) ** 2)
    else:
        observed = observed.expand_as(y).to(out.dtype)
        data = torch.sum(observed * (out - y) ** 2) / observed.sum()
    prior = sum(kl_prior(logits[name], density) for name in logits)
    return data + kl * prior


def adam_update(param, grad, state: dict, lr=0.01, betas=(0.9, 0.999), eps=1e-8):
    """One Adam step (Kingma & Ba, as torch.optim.Adam with default options); returns the new
    parameter. `state` holds 'step', 'exp_avg', 'exp_avg_sq' and is updated."""
    beta1, beta2 = betas
    step = state.get("step", 0) + 1
    m = beta1 * state.get("exp_avg", torch.zeros_like(param)) + (1 - beta1) * grad
    v = beta2 * state.get("exp_avg_sq", torch.zeros_like(param)) + (1 - beta2) * grad * grad
    state.update(step=step, exp_avg=m, exp_avg_sq=v)
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    return param - lr * m_hat / (v_hat.sqrt() + eps)


def search_step(model, weights, logits, uniforms, z, y, density, adam_state, tau=0.2, kl=1e-9, lr=0.01,
                observed=None):
    """One OES search step: loss, gradient with respect to the logits (autograd), Adam on the
    logits only. Returns (loss, new_logits); `adam_state` (a dict of per-name dicts) is updated."""
    leaves = {name: p.detach().clone().requires_grad_(True) for name, p in logits.items()}
    loss = search_loss(model, weights, leaves, uniforms, z, y, density, tau, kl, observed)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    new_logits = {}
    for (name, p), g in zip(leaves.items(), grads):
        new_logits[name] = adam_update(p.detach(), g, adam_state.setdefault(name, {}), lr)
    return loss.detach(), new_logits


def hard_mask(logits: torch.Tensor, density: float, tiebreak: torch.Tensor) -> torch.Tensor:
    """Keep the round(density * n) largest logits; ties go to the larger `tiebreak` key."""
    n = logits.numel()
    k = round(density * n)
    order = sorted(range(n), key=lambda j: (-float(logits.reshape(-1)[j]), -float(tiebreak.reshape(-1)[j])))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(logits.shape)
