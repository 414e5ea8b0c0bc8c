"""Sparse generators: a pruned DIP hourglass that runs at the cost of what it keeps (issue 4).

`SparseGenerator.from_masked(model, mask)` computes what `mask.apply_(model)` followed by a
training-mode forward computes (batch norm with batch statistics), in two steps:

1. Compaction, exact (the channel analysis is oes_fast.connectivity's). The OES hourglass
   without skip branches is one chain of stages (conv, pool, batch norm, activation, upsample,
   ..., 1x1 conv, sigmoid). Walking it forward, every channel of every intermediate tensor is
   either *variable* or a spatial *constant*:
   - a conv output channel none of whose kept taps reads a variable channel is a constant
     (its bias plus the constants it reads times their tap sums; exact because reflection
     padding of a constant plane is that constant plane);
   - a batch norm (batch statistics) output is the constant beta where its input is constant
     (zero variance) or its gamma is pruned (gamma * anything + beta);
   - pooling, upsampling and activations map constants to constants.
   Walking back from the output, a variable channel is *live* when a live channel reads it
   through a kept tap (or through a batch norm with kept gamma). Only live channels are
   computed; constants are folded into the bias of the conv that reads them, recomputed from
   the parameters at every forward so that they stay differentiable. With the published masks
   20-65 % of each conv's output channels disappear. Channels whose kept weights are never
   read also get no gradient in the dense masked model, so the compaction is exact for
   training as well (the structure is fixed by the mask, which training never changes).
2. Per conv, `sparse_conv2d` (CSR weights, reflection fused, see below) when the
   compacted weight is sparser than `CROSSOVER_DENSITY`, else a dense convolution (oneDNN)
   on the compacted weight; on a GPU every conv is dense (cuDNN; `default_crossover`). Fused
   where it pays: the bias (with the folded constants) in the kernel; the nearest x2
   upsampling of the up path in the kernel's input load (and the batch norm that follows the
   upsampling runs before it, on 4x fewer pixels: repeating every value four times leaves
   batch mean and biased variance unchanged); the batch norm statistics in
   the kernel's epilogue (`sparse_conv2d_stats`), so batch norm is one normalization pass.
   LeakyReLU follows batch norm, so it cannot go into the conv's epilogue; the batch norm's
   normalization and the LeakyReLU go into the next sparse conv's input load instead
   (`ops.batch_norm_leaky_relu_sparse_conv2d`, on CPU: the activated tensor is never stored, and
   the weight gradient's load makes it again). In the up path a batch norm and its LeakyReLU are
   followed by the next block's input batch norm: the conv's load makes all three
   (`ops.batch_norm_leaky_relu_batch_norm_sparse_conv2d`), the second batch norm's statistics
   from a pass that activates without storing. Every other batch norm runs as
   `ops.batch_norm_leaky_relu`, which normalizes and activates in one pass (from the conv's
   statistics, or after a statistics pass of its own where a pooling or nothing precedes; a
   slope of 1 where no LeakyReLU follows) and whose backward takes two passes per channel,
   keeping only the batch norm's input (`SparseGenerator.run_stage`). The last batch norm, its
   LeakyReLU and the 1x1 output conv are one pass too (`ops.batch_norm_leaky_relu_conv1x1`, two
   passes backward), and without autograd the sigmoid runs in place.
3. Without autograd (CPU float32 / float64) the whole forward is one C++ call
   (csrc/generator_forward.cpp): the first forward on an input shape runs the Python loop and
   records which op each stage took, later ones repeat those ops from C++ with the same bits
   (`SparseGenerator.forward`; `use_executor = False` keeps the loop).

Weight format: CSR over output channels (row_ptr int64 [C_out + 1], col_idx int32 = c * KH * KW
+ ky * KW + kx, values). The CPU kernel gives each thread whole output rows of one output
channel and walks that channel's kept taps, each tap a multiply-add of a shifted input row into
registers holding the output row: rows of the matrix are exactly what one writer needs, in the
order it needs them, with no atomics. The transposed access of the input gradient is built from
it by a counting sort in O(nnz).

Not reproduced: the running statistics of batch norm (the dense model updates them in training
mode; DIP never reads them).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops as _ops_module  # noqa: F401  (registers the operators)
from .ops import (batch_norm_constants, batch_norm_from_stats, batch_norm_leaky_relu,
                  batch_norm_leaky_relu_batch_norm_sparse_conv2d, batch_norm_leaky_relu_conv1x1,
                  batch_norm_leaky_relu_sparse_conv2d)
from .files import atomic_path
from .connectivity import live_channels
from . import _C  # (built: oes_fast.ops has checked)

__all__ = ["CROSSOVER_DENSITY", "SparseGenerator", "to_csr", "sparse_conv2d"]

FORMAT = "oes_fast.sparse_generator"
FORMAT_VERSION = 1

# Compacted-weight density above which a dense convolution on the compacted weight beats the
# sparse kernel on CPU, float32: the density sweep of bench/bench_sparse.py and the per-layer
# timings on the OES layers (pepper mask, 512x512, one thread) put oneDNN and sparse_conv2d
# level at 0.35-0.45 for 32..128-pixel planes with 70-90 channels, while on the 256- and
# 512-pixel planes with 16-30 channels (where most of the time goes) the sparse kernel still
# wins at 0.45 (oneDNN reaches only 20-40 GFLOP/s there); 0.5 takes the faster one on every
# layer but one, where the two are within 10 %.
CROSSOVER_DENSITY = 0.5
# On a GPU the Triton sparse kernels lost to cuDNN on the compacted weights (H200, the published
# pepper mask, float32 without TF32, bench/gpu_check.sh 2026-11-30): the training step took 38.0
# against 18.1 ms at 512x512 and 244.9 against 87.2 ms at 2048x2048, so every conv runs dense there.
GPU_CROSSOVER_DENSITY = 0.0


def default_crossover(device) -> float:
    """The crossover density a generator on `device` uses unless given one."""
    return CROSSOVER_DENSITY if torch.device(device).type == "cpu" else GPU_CROSSOVER_DENSITY


# ------------------------------------------------------------------------------------ the op
def to_csr(weight: torch.Tensor, mask: torch.Tensor | None = None):
    """(values, row_ptr, col_idx) of a (C_out, C_in, KH, KW) weight: CSR over output channels,
    keeping the entries where `mask` (bool, the weight's shape) is True (default: the nonzeros).
    The order within a row is ascending col_idx = c * KH * KW + ky * KW + kx. values: 1-D, the
    weight's dtype; row_ptr: int64 (C_out + 1,); col_idx: int32 (nnz,); all on the weight's
    device."""
    if weight.dim() != 4:
        raise ValueError(f"to_csr: weight must be 4-D (C_out, C_in, KH, KW), got shape {tuple(weight.shape)}")
    c_out = weight.shape[0]
    flat = weight.reshape(c_out, weight.shape[1] * weight.shape[2] * weight.shape[3])
    keep = (flat != 0) if mask is None else mask.reshape(flat.shape).to(device=weight.device, dtype=torch.bool)
    rows, cols = keep.nonzero(as_tuple=True)
    row_ptr = torch.zeros(c_out + 1, dtype=torch.int64, device=weight.device)
    row_ptr[1:] = torch.bincount(rows, minlength=c_out).cumsum(0)
    return flat[rows, cols].contiguous(), row_ptr, cols.to(torch.int32).contiguous()


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def sparse_conv2d(input, values, row_ptr, col_idx, kernel_size, bias=None, stride=1, padding=0,
                  padding_mode: str = "zeros", upsample: int = 1) -> torch.Tensor:
    """F.conv2d(pad(up(input)), W, bias, stride) for the CSR weight W (see `to_csr`), with the
    padding ("zeros" or "reflect") applied while reading and up = nearest upsampling by
    `upsample` (1: none), also applied while reading. Differentiable in input, values and bias.

    `input`: float32 or float64 (N, C_in, H, W), contiguous; `values`, `row_ptr`, `col_idx`: the
    CSR weight of `to_csr` (values in input's dtype, on its device); `kernel_size`, `stride`,
    `padding`: ints or pairs; `bias`: (C_out,) or None. Returns (N, C_out, H_out, W_out) in
    input's dtype, with H_out = (H * upsample + 2 * padding - KH) // stride + 1 (W alike)."""
    return torch.ops.oes_fast.sparse_conv2d(input, values, row_ptr, col_idx, bias, _pair(kernel_size), _pair(stride),
                                            _pair(padding), padding_mode, int(upsample))


# ---------------------------------------------------------------------------------- stages
def _idx(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.int64).reshape(-1)


class _Stage(nn.Module):
    """One step of the chain. forward(x, const, hw) -> (x, const, hw): x holds the live channels
    only (None when there are none), const is the full-length vector of the constant channels'
    values (None when all are structurally zero), hw = (batch, height, width)."""

    kind = ""

    def spec(self) -> dict:
        return {}


class _Conv(_Stage):
    """A compacted convolution: live inputs -> live outputs (sparse or dense), plus the constants
    of every output channel (bias + constants read through kept taps)."""

    kind = "conv"

    def __init__(self, spec: dict, tensors: dict):
        super().__init__()
        self.kernel = list(spec["kernel"])
        self.c_out = int(spec["c_out"])
        self.c_in = int(spec["c_in"])
        # first conv: pick the live channels of z (only in files written before the first conv's
        # CSR kept z's numbering; see _compile)
        self.select_in = bool(spec["select_in"])
        self.upsample = int(spec.get("upsample", 1))  # nearest upsampling of the input, fused
        self.mode = spec["mode"]
        self.n_in = int(spec["n_in"])
        self.n_out = int(spec["n_out"])
        self.register_buffer("live_out", _idx(tensors["live_out"]))
        self.register_buffer("row_ptr", tensors["row_ptr"].to(torch.int64))
        self.register_buffer("col_idx", tensors["col_idx"].to(torch.int32))
        self.values = nn.Parameter(tensors["values"].clone())
        # flat positions of the CSR entries in the dense compacted weight (dense mode)
        rows = torch.repeat_interleave(torch.arange(self.n_out), self.row_ptr[1:] - self.row_ptr[:-1])
        kk = self.kernel[0] * self.kernel[1]
        self.register_buffer("dense_pos", rows * (self.n_in * kk) + self.col_idx.to(torch.int64), persistent=False)
        self.bias = nn.Parameter(tensors["bias"].clone()) if "bias" in tensors else None
        if self.bias is not None:
            self.register_buffer("bias_mask", tensors["bias_mask"].to(torch.bool))
        self.fold_weight = nn.Parameter(tensors["fold_weight"].clone()) if "fold_weight" in tensors else None
        if self.fold_weight is not None:
            self.register_buffer("fold_in", _idx(tensors["fold_in"]))
            self.register_buffer("fold_mask", tensors["fold_mask"].to(torch.bool))
        self.register_buffer("live_in", _idx(tensors["live_in"]))

    def spec(self) -> dict:
        return dict(kernel=self.kernel, c_out=self.c_out, c_in=self.c_in, mode=self.mode, n_in=self.n_in,
                    n_out=self.n_out, select_in=self.select_in, upsample=self.upsample)

    def parameter_map(self, name):
        """(parameter, original name, flat indices into the original parameter, on its device)."""
        kk = self.kernel[0] * self.kernel[1]
        rows = torch.repeat_interleave(torch.arange(self.n_out, device=self.row_ptr.device),
                                       self.row_ptr[1:] - self.row_ptr[:-1])
        col = self.col_idx.to(torch.int64)
        index = (self.live_out[rows] * self.c_in + self.live_in[col // kk]) * kk + col % kk
        out = [(self.values, f"{name}.weight", index)]
        if self.bias is not None:
            out.append((self.bias, f"{name}.bias", torch.arange(self.c_out, device=self.row_ptr.device)))
        if self.fold_weight is not None:
            o, f, r = torch.meshgrid(torch.arange(self.c_out, device=self.fold_in.device), self.fold_in,
                                     torch.arange(kk, device=self.fold_in.device), indexing="ij")
            out.append((self.fold_weight, f"{name}.weight", ((o * self.c_in + f) * kk + r).reshape(-1)))
        return out

    @property
    def density(self) -> float:
        total = self.n_out * self.n_in * self.kernel[0] * self.kernel[1]
        return self.values.numel() / total if total else 0.0

    def constants(self, const_in):
        const = None
        if self.bias is not None:
            const = self.bias * self.bias_mask
        if self.fold_weight is not None:
            taps = (self.fold_weight * self.fold_mask).sum((2, 3))  # (c_out, n_fold)
            folded = taps @ const_in.index_select(0, self.fold_in)
            const = folded if const is None else const + folded
        return const

    def dense_weight(self) -> torch.Tensor:
        kk = self.kernel[0] * self.kernel[1]
        w = self.values.new_zeros(self.n_out * self.n_in * kk).scatter(0, self.dense_pos, self.values)
        return w.view(self.n_out, self.n_in, *self.kernel)

    def is_pointwise(self, x) -> bool:
        """Whether forward_head applies: a 1x1 conv (sparse or dense) of live inputs x (CPU float32
        or float64)."""
        return (self.kernel == [1, 1] and self.upsample == 1 and not self.select_in
                and self.n_out > 0 and self.n_in > 0 and x is not None and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64) and x.shape[1] == self.n_in)

    def live_bias(self, const_out):
        """The bias of the live outputs: the output constants `constants` returned, or None."""
        return const_out.index_select(0, self.live_out) if const_out is not None else None

    def after_batch_norm(self, bn, negative_slope):
        """What this conv, run in one op with bn's batch norm and a LeakyReLU of `negative_slope`
        (1.0: none) before it, takes from bn: (gamma and beta of bn's live channels, this conv's
        output constants, its bias on the live outputs). The batch norm maps its input's constant
        channels to beta, so their constants come from bn."""
        beta, gamma, beta_live = bn.masked_parameters()
        const_out = self.constants(bn.constants_after(beta, negative_slope))
        return gamma, beta_live, const_out, self.live_bias(const_out)

    def forward_head(self, x, stats, bn, hw, negative_slope):
        """This 1x1 conv of bn's batch norm of x (whose statistics the conv before returned) and a
        LeakyReLU of `negative_slope`, in one op (ops.batch_norm_leaky_relu_conv1x1)."""
        gamma, beta_live, const_out, bias = self.after_batch_norm(bn, negative_slope)
        x = batch_norm_leaky_relu_conv1x1(x, stats, gamma, beta_live, bn.eps, negative_slope,
                                          self.dense_weight().view(self.n_out, self.n_in), bias)
        return x, const_out, hw

    def forward_after_batch_norm(self, x, stats, bn, hw, negative_slope, pool: bool = False, bn2=None):
        """forward(bn's batch norm of x and a LeakyReLU of `negative_slope` (1.0: none),
        with_stats=True, pool) in one op (ops.batch_norm_leaky_relu_sparse_conv2d): the batch
        norm and activation made in this conv's input load. With bn2, a second batch norm (of the
        channels bn normalizes, no activation) between those and this conv, made in the load too
        (ops.batch_norm_leaky_relu_batch_norm_sparse_conv2d; its statistics from a pass that
        activates x without storing it). `stats`: x's statistics from the conv before, or None.
        can_fuse_stats must hold for x."""
        u = self.upsample
        conv = (self.values, self.row_ptr, self.col_idx)
        geometry = (self.kernel, [(self.kernel[0] - 1) // 2, (self.kernel[1] - 1) // 2], "reflect", u, pool)
        if bn2 is None:
            gamma, beta_live, const_out, bias = self.after_batch_norm(bn, negative_slope)
            x, stats = batch_norm_leaky_relu_sparse_conv2d(x, stats, gamma, beta_live, bn.eps, negative_slope, *conv,
                                                           bias, *geometry)
        else:
            _, gamma, beta_live = bn.masked_parameters()
            gamma2, beta2_live, const_out, bias = self.after_batch_norm(bn2, 1.0)
            x, stats = batch_norm_leaky_relu_batch_norm_sparse_conv2d(
                x, stats, gamma, beta_live, bn.eps, negative_slope, gamma2, beta2_live, bn2.eps, *conv, bias, *geometry)
        hw = (hw[0], hw[1] // 2, hw[2] // 2) if pool else (hw[0], hw[1] * u, hw[2] * u)
        return x, const_out, hw, stats

    def can_fuse_stats(self, x) -> bool:
        """Whether forward(..., with_stats=True) applies: sparse, CPU, live inputs and outputs."""
        return self.mode == "sparse" and x is not None and x.device.type == "cpu" and self.n_out > 0 and self.n_in > 0

    def forward(self, x, const, hw, with_stats: bool = False, pool: bool = False):
        """with_stats: also the batch-norm statistics of the output (sparse_conv2d_stats); pool
        (with with_stats): the output 2x2 average pooled (sparse_conv2d_pool_stats), for which
        can_fuse_stats must hold too."""
        const_out = self.constants(const)
        bias = self.live_bias(const_out)
        u = self.upsample
        hw = (hw[0], hw[1] * u, hw[2] * u)
        if self.n_out == 0:
            return None, const_out, hw
        if x is None or self.n_in == 0:
            # only the output conv gets here (its outputs are kept even when constant)
            b = bias if bias is not None else self.values.new_zeros(self.n_out)
            return b.view(1, -1, 1, 1).expand(hw[0], -1, hw[1], hw[2]).contiguous(), const_out, hw
        if self.select_in:
            x = x.index_select(1, self.live_in)
        ph, pw = (self.kernel[0] - 1) // 2, (self.kernel[1] - 1) // 2
        if pool:
            x, stats = torch.ops.oes_fast.sparse_conv2d_pool_stats(x, self.values, self.row_ptr, self.col_idx, bias,
                                                                   self.kernel, [ph, pw], "reflect")
            return x, const_out, (hw[0], hw[1] // 2, hw[2] // 2), stats
        if with_stats:
            x, stats = torch.ops.oes_fast.sparse_conv2d_stats(x, self.values, self.row_ptr, self.col_idx, bias,
                                                              self.kernel, [ph, pw], "reflect", u)
            return x, const_out, hw, stats
        if self.mode == "sparse":
            x = torch.ops.oes_fast.sparse_conv2d(x, self.values, self.row_ptr, self.col_idx, bias, self.kernel,
                                                 [1, 1], [ph, pw], "reflect", u)
        else:
            if u > 1:
                x = F.interpolate(x, scale_factor=u, mode="nearest")
            if self.kernel == [1, 1]:
                # a 1x1 conv is a matmul over channels (torch's conv2d takes a slow path here); bmm,
                # since a broadcasting matmul copies its operands under autograd (8x slower forward),
                # with the bias added in the same call (baddbmm: no second pass over the output)
                n, _, h, w = x.shape
                weight = self.dense_weight().view(1, self.n_out, self.n_in).expand(n, -1, -1)
                x = x.reshape(n, self.n_in, h * w)
                if bias is not None:
                    x = torch.baddbmm(bias.view(1, -1, 1), weight, x)
                else:
                    x = torch.bmm(weight, x)
                x = x.view(n, self.n_out, h, w)
            else:
                if ph or pw:
                    x = F.pad(x, (pw, pw, ph, ph), mode="reflect")
                x = F.conv2d(x, self.dense_weight(), bias)
        return x, const_out, hw


class _BatchNorm(_Stage):
    """Batch norm with batch statistics on the live channels; constant channels give beta."""

    kind = "bn"

    def __init__(self, spec: dict, tensors: dict):
        super().__init__()
        self.eps = float(spec["eps"])
        self.register_buffer("live", _idx(tensors["live"]))
        self.weight = nn.Parameter(tensors["weight"].clone())
        self.bias = nn.Parameter(tensors["bias"].clone())
        self.register_buffer("weight_mask", tensors["weight_mask"].to(torch.bool))
        self.register_buffer("bias_mask", tensors["bias_mask"].to(torch.bool))
        self.const_zero = bool(spec["const_zero"])
        # fixed by the mask (see masked_parameters)
        self.betas_pruned = not bool(self.bias_mask.any())
        self.live_gammas_kept = bool(self.weight_mask.index_select(0, self.live).all())
        if self.betas_pruned:  # its betas, all channels and live ones (read only)
            self.register_buffer("zero_beta", torch.zeros_like(self.bias.detach()), persistent=False)
            self.register_buffer("zero_beta_live", self.zero_beta[: len(self.live)].clone(), persistent=False)

    def spec(self) -> dict:
        return dict(eps=self.eps, const_zero=self.const_zero)

    def masked_parameters(self):
        """(beta over all channels, gamma and beta of the live channels), pruned entries zero.
        Where the mask prunes every beta (the published and the bundled masks do), beta is a
        constant zero, and where it keeps every live gamma, gamma is taken without the product:
        the same values with fewer autograd ops, which cost more than the batch norm's own
        kernels on the small layers (a 256x256 training step: 24 batch norms, about 2 ms of
        these ops)."""
        weight = self.weight if self.live_gammas_kept else self.weight * self.weight_mask
        gamma = weight.index_select(0, self.live)
        if self.betas_pruned:
            return self.zero_beta, gamma, self.zero_beta_live
        beta = self.bias * self.bias_mask
        return beta, gamma, beta.index_select(0, self.live)

    def forward(self, x, const, hw):
        beta, gamma, beta_live = self.masked_parameters()
        if x is not None:
            x = F.batch_norm(x, None, None, gamma, beta_live, True, 0.0, self.eps)
        return x, (None if self.const_zero else beta), hw

    def forward_from_stats(self, x, stats, const, hw):
        """The batch norm of a conv output whose (sum, sum of squares) per channel the conv
        returned (sparse_conv2d_stats): no statistics pass. Normalized in place without autograd;
        with it, through ops.batch_norm_from_stats."""
        beta, gamma, beta_live = self.masked_parameters()
        if torch.is_grad_enabled():
            x = batch_norm_from_stats(x, stats, gamma, beta_live, self.eps)
        else:
            count = x.shape[0] * x.shape[2] * x.shape[3]
            _, _, scale, shift = batch_norm_constants(stats, count, gamma, beta_live, self.eps)
            x.mul_(scale.to(x.dtype).view(1, -1, 1, 1)).add_(shift.to(x.dtype).view(1, -1, 1, 1))
        return x, (None if self.const_zero else beta), hw

    def constants_after(self, beta, negative_slope):
        """The constants of this batch norm's output channels and the LeakyReLU of `negative_slope`
        after it (1.0: none): beta, for constant inputs and pruned gammas alike."""
        return None if self.const_zero else beta if negative_slope == 1.0 else F.leaky_relu(beta, negative_slope)

    def forward_leaky_relu(self, x, stats, const, hw, negative_slope):
        """This batch norm and a LeakyReLU of `negative_slope` (1.0: no activation) as one op
        (ops.batch_norm_leaky_relu): live channels x (not None) with their (sum, sum of squares)
        `stats` from the conv's epilogue, or None to compute them; the constants get the
        activation as well."""
        beta, gamma, beta_live = self.masked_parameters()
        x = batch_norm_leaky_relu(x, stats, gamma, beta_live, self.eps, negative_slope)
        return x, self.constants_after(beta, negative_slope), hw

    def parameter_map(self, name):
        index = torch.arange(self.weight.numel(), device=self.weight.device)
        return [(self.weight, f"{name}.weight", index), (self.bias, f"{name}.bias", index)]


class _AvgPool2x2(torch.autograd.Function):
    """2x2 average pooling, stride 2 (an odd last row or column is dropped, as avg_pool2d does),
    in torch: where the C++ ops do not apply (see `avg_pool2x2`)."""

    @staticmethod
    def forward(ctx, x):
        # the four strided views summed: same value as avg_pool2d, several times faster on CPU
        ctx.shape = x.shape
        h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
        return (x[:, :, 0:h:2, 0:w:2] + x[:, :, 0:h:2, 1:w:2] + x[:, :, 1:h:2, 0:w:2] + x[:, :, 1:h:2, 1:w:2]) * 0.25

    @staticmethod
    def backward(ctx, grad):
        # every input pixel gets a quarter of its block's gradient: one pass that writes each
        # pixel once (autograd of the four views zero-filled and scattered four full-size tensors)
        n, c, h, w = ctx.shape
        h2, w2 = grad.shape[2], grad.shape[3]
        g = (grad * 0.25)[:, :, :, None, :, None].expand(n, c, h2, 2, w2, 2).reshape(n, c, 2 * h2, 2 * w2)
        if g.shape[2:] != (h, w):  # odd sides: the dropped row or column gets no gradient
            g = F.pad(g, (0, w - g.shape[3], 0, h - g.shape[2]))
        return g


def avg_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling, stride 2, of an (N, C, H, W) x: on CPU float32 / float64 contiguous
    input the one-pass C++ op (oes_fast::avg_pool2x2, its backward registered in ops.py; the bits
    of _AvgPool2x2's expression), else _AvgPool2x2."""
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
            and x.dim() == 4 and x.shape[2] >= 2 and x.shape[3] >= 2):
        return torch.ops.oes_fast.avg_pool2x2(x)
    return _AvgPool2x2.apply(x)


LEAKY_RELU_SLOPE = 0.2  # the OES network's nn.LeakyReLU(0.2)

# SparseGenerator.decide's branches (the numbering of csrc/generator_forward.cpp's Branch)
POOL_CONV, STATS_CONV, HEAD, PROLOGUE, BATCH_NORM_OP, BATCH_NORM_FROM_STATS, PLAIN = range(7)

_ACTS = {  # one for each of oes_fast.connectivity.ACTIVATIONS
    "LeakyReLU": lambda x, inplace: F.leaky_relu(x, LEAKY_RELU_SLOPE, inplace=inplace),
    "ReLU": lambda x, inplace: F.relu(x, inplace=inplace),
    "ELU": lambda x, inplace: F.elu(x, inplace=inplace),
    "none": lambda x, inplace: x,
}


class _Elementwise(_Stage):
    """Activation, pooling, upsampling or sigmoid: live channels and constants alike."""

    kind = "elementwise"

    def __init__(self, spec: dict, tensors: dict | None = None):
        super().__init__()
        self.op = spec["op"]
        self.arg = spec.get("arg")

    def spec(self) -> dict:
        return dict(op=self.op, arg=self.arg)

    def forward(self, x, const, hw):
        if self.op == "act":
            act = _ACTS[self.arg]
            if x is not None:
                # in place where autograd does not need the input (no grad, or the output suffices)
                x = act(x, not torch.is_grad_enabled())
            if const is not None:
                const = act(const, False)
        elif self.op == "pool":
            if x is not None:
                if self.arg == "avg":
                    x = avg_pool2x2(x)
                else:
                    x = F.max_pool2d(x, 2, 2)
            hw = (hw[0], hw[1] // 2, hw[2] // 2)
        elif self.op == "up":
            if x is not None:
                x = F.interpolate(x, scale_factor=2, mode=self.arg)
            hw = (hw[0], hw[1] * 2, hw[2] * 2)
        elif self.op == "sigmoid":
            if x is not None:
                x = torch.sigmoid(x) if torch.is_grad_enabled() else x.sigmoid_()
            const = None
        else:  # pragma: no cover - specs are written by this module
            raise ValueError(f"unknown stage {self.op!r}")
        return x, const, hw


_STAGES = {cls.kind: cls for cls in (_Conv, _BatchNorm, _Elementwise)}


def _executor_stage(stage: _Stage) -> dict:
    """What oes_fast._C.GeneratorForward takes of a stage: its tensors (shared, not copied: the
    executor reads the current parameter values) and settings."""
    if isinstance(stage, _Conv):
        d = dict(stage.spec(), kind="conv", values=stage.values, row_ptr=stage.row_ptr, col_idx=stage.col_idx,
                 live_out=stage.live_out, live_in=stage.live_in, dense_pos=stage.dense_pos)
        if stage.bias is not None:
            d.update(bias=stage.bias, bias_mask=stage.bias_mask)
        if stage.fold_weight is not None:
            d.update(fold_weight=stage.fold_weight, fold_in=stage.fold_in, fold_mask=stage.fold_mask)
        return d
    if isinstance(stage, _BatchNorm):
        d = dict(kind="bn", live=stage.live, weight=stage.weight, bias=stage.bias, weight_mask=stage.weight_mask,
                 bias_mask=stage.bias_mask, eps=stage.eps, const_zero=stage.const_zero,
                 betas_pruned=stage.betas_pruned, live_gammas_kept=stage.live_gammas_kept)
        if stage.betas_pruned:
            d.update(zero_beta=stage.zero_beta, zero_beta_live=stage.zero_beta_live)
        return d
    return dict(kind="elementwise", op=stage.op, arg=stage.arg)


def _masked(module, prefix, name, mask):
    p = getattr(module, name)
    if p is None:
        return None, None
    m = mask[f"{prefix}.{name}"].to(p.device)
    return (p.detach() * m.to(p.dtype)).clone(), m


@torch.no_grad()
def _compile(model, mask, crossover: float) -> tuple[list[dict], list[dict]]:
    """Specs and tensors of the compacted stages (see the module docstring)."""
    chain, info = live_channels(model, mask)
    # ---- stage specs and tensors
    specs, tensors = [], []
    first_conv = True
    for (kind, prefix, module, arg), e in zip(chain, info):
        if kind == "conv":
            w, wmask = _masked(module, prefix, "weight", mask)
            live_in, live_out = e["live_in"].nonzero().flatten(), e["live_out"].nonzero().flatten()
            if first_conv:
                # the network's input: its dead channels stay in the CSR's numbering (no taps read
                # them), which spares a copy of z's live channels every step (1.4 ms at 256x256)
                live_in = torch.arange(len(e["live_in"]), device=live_in.device)
            sub_mask = wmask[live_out][:, live_in]
            values, row_ptr, col_idx = to_csr(w[live_out][:, live_in], sub_mask)
            t = dict(live_out=live_out, row_ptr=row_ptr.cpu(), col_idx=col_idx.cpu(), values=values)
            b, bmask = _masked(module, prefix, "bias", mask)
            if b is not None and bool(bmask.any()):
                t.update(bias=b, bias_mask=bmask)
            fold_in = (e["fold"] & (e["taps"].any(0))).nonzero().flatten()
            if len(fold_in):
                t.update(fold_in=fold_in, fold_weight=w[:, fold_in].clone(), fold_mask=wmask[:, fold_in].clone())
            t.update(live_in=live_in)
            first_conv = False
            kernel = list(module.kernel_size)
            total = len(live_out) * len(live_in) * kernel[0] * kernel[1]
            density = values.numel() / total if total else 0.0
            specs.append(dict(kind="conv", name=prefix, kernel=kernel, c_out=int(w.shape[0]), c_in=int(w.shape[1]),
                              n_in=len(live_in), n_out=len(live_out), select_in=False, upsample=arg or 1,
                              mode="sparse" if density < crossover else "dense"))
            tensors.append(t)
        elif kind == "bn":
            g, gm = _masked(module, prefix, "weight", mask)
            b, bm = _masked(module, prefix, "bias", mask)
            live = e["live_out"].nonzero().flatten()
            specs.append(dict(kind="bn", name=prefix, eps=module.eps, const_zero=bool(e["zero_out"].all())))
            tensors.append(dict(live=live, weight=g, bias=b, weight_mask=gm, bias_mask=bm))
        else:
            specs.append(dict(kind="elementwise", op=kind, arg=arg))
            tensors.append({})
    return specs, tensors


class SparseGenerator(nn.Module):
    """The masked DIP hourglass, compacted and sparse (see the module docstring).

    `gen(z)` equals `mask.apply_(model); model.train(); model(z)` (up to rounding), and
    gradients w.r.t. the kept parameters equal those of the masked dense model; pruned
    entries never move (the kept ones are the only conv parameters; the few masked vectors
    are multiplied by their masks)."""

    channels_last_input = False  # its kernels index contiguous activations

    def __init__(self, specs: Sequence[dict], tensors: Sequence[dict], config: dict, shapes: dict):
        super().__init__()
        self.config = dict(config)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}  # the dense model's parameters
        self.stages = nn.ModuleList(_STAGES[s["kind"]](s, t) for s, t in zip(specs, tensors))
        # the same modules in a plain list for the loop of `forward`: ModuleList indexing costs a
        # few us a call, and the loop and its fusion checks index it about 400 times a forward
        self._chain = list(self.stages)
        self.names = [s.get("name") for s in specs]
        self.fuse_batch_norm = True  # see fuses_stats
        self.fuse_activation = True  # see fuses_batch_norm_op
        self.fuse_prologue = True  # see prologue_conv
        self.fuse_batch_norm_pairs = True  # see pair_prologue_conv
        # see fuses_pool: from this input width (isolated ops, 1 thread, the down blocks' first
        # convs of the published pepper mask, fused against conv + statistics + pooling: forward
        # 0.56 -> 0.19 ms at 256, 0.37 -> 0.19 at 128, 0.25 -> 0.17 at 64, 0.28 -> 0.19 at 32, but
        # 0.22 -> 0.31 at 16, where the pooled output is 8 wide; the weight gradients alike)
        self.pool_fusion_min_width = 32
        # the forward without autograd in one C++ call (see `forward`); False: the Python loop
        self.use_executor = True
        self._executors = {}  # _executor_key -> oes_fast._C.GeneratorForward

    @classmethod
    def from_masked(cls, model: nn.Module, mask, crossover: float | None = None) -> "SparseGenerator":
        """Compact `model` (a Skip hourglass that `oes_fast.connectivity.supports`) with `mask` (an
        oes_fast.masks.Mask that fits it) applied; the model itself is not modified. Convs whose
        compacted weight keeps less than `crossover` (in [0, 1]; default: `default_crossover` of
        the model's device) run sparse. The generator has the model's device and dtype."""
        mask.check_fits(model)
        p = next(model.parameters())
        crossover = default_crossover(p.device) if crossover is None else crossover
        # compacted on the CPU (the stages index their masks with CPU index tensors), then moved
        source = model if p.device.type == "cpu" else copy.deepcopy(model).cpu()
        specs, tensors = _compile(source, mask, crossover)
        gen = cls(specs, tensors, model.config, {n: tuple(p.shape) for n, p in model.named_parameters()})
        return gen.to(device=p.device, dtype=p.dtype)

    # --- running
    def check_input(self, z: torch.Tensor) -> None:
        """ValueError unless `z` is (N, in_channels, H, W) with H and W multiples of 2 ** levels
        and at least 4 * 2 ** levels, as the dense model takes it."""
        levels = len(self.config["channels_down"])
        if z.dim() != 4 or z.shape[1] != self.config["in_channels"]:
            raise ValueError(f"input must be (N, {self.config['in_channels']}, H, W), got {tuple(z.shape)}")
        step = 2**levels
        for side in z.shape[2:]:
            if side % step or side < 4 * step:
                raise ValueError(f"image sides must be multiples of {step} and at least {4 * step}, got "
                                 f"{tuple(z.shape[2:])}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The dense masked model's training-mode output for `z` (see `check_input`; the
        generator's dtype and device, contiguous): (N, out_channels, H, W). Without autograd on
        CPU float32 / float64 (and `use_executor`), the stages run in one C++ call that repeats
        what this Python loop decided on the first call for z's shape (`_record_executor`): the
        same ops and bits, without the loop's Python and dispatch between the kernels. The C++
        call reads the stages' tensors themselves, so new values (an optimizer step, a
        load_state_dict) are seen; after replacing a tensor object of a stage, `.to()` the
        generator (or set `use_executor` to False) so that the next forward records again."""
        self.check_input(z)
        if (self.use_executor and not torch.is_grad_enabled() and z.device.type == "cpu"
                and z.dtype in (torch.float32, torch.float64)):
            executor = self._executors.get(self._executor_key(z))
            if executor is not None:
                return executor.run(z)
            return self._record_executor(z)
        x, const, hw, stats, i = z, None, (z.shape[0], z.shape[2], z.shape[3]), None, 0
        while i < len(self._chain):
            x, const, hw, stats, i, _ = self.run_stage(i, x, const, hw, stats)
        return x

    # --- the forward without autograd in one C++ call (csrc/generator_forward.cpp)
    def _executor_key(self, z: torch.Tensor) -> tuple:
        """What the decisions of a forward on z depend on besides the structure: z's shape and
        dtype, the fusion switches and the convs' modes."""
        return (tuple(z.shape), z.dtype, self.fuse_batch_norm, self.fuse_activation, self.fuse_prologue,
                self.fuse_batch_norm_pairs, self.pool_fusion_min_width,
                tuple(s.mode for s in self._chain if isinstance(s, _Conv)))

    def _record_executor(self, z: torch.Tensor) -> torch.Tensor:
        """The Python forward of z (without autograd), recording each run_stage call's decision,
        then the C++ executor of those decisions for later calls on z's key. Returns the output."""
        key = self._executor_key(z)
        steps = []
        x, const, hw, stats, i = z, None, (z.shape[0], z.shape[2], z.shape[3]), None, 0
        while i < len(self._chain):
            decision = self.decide(i, x, stats)
            steps.append((decision[0], i, *decision[1:]))
            x, const, hw, stats, i, _ = self._run_decided(i, decision, x, const, hw, stats)
        self._executors[key] = _C.GeneratorForward([_executor_stage(s) for s in self._chain], steps)
        return x

    def _apply(self, *args, **kwargs):
        # .to(), .double(), ...: the executors hold the old buffers
        self._executors = {}
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state["_executors"] = {}  # (C++ objects: made again on the next forward)
        return state

    def run_stage(self, i: int, x, const, hw, stats=None):
        """Run stage i (and the stage fused with it) as `forward` does: returns (x, const, hw,
        stats, index of the next stage, phase). `stats`: what the previous call returned, the
        per-channel sums of a conv fused with the batch norm that stage i then is.
        Phases: "conv + pool + bn stats (fused)" (sparse_conv2d_pool_stats: the conv, the 2x2
        average pooling after it, and the statistics of the batch norm after that);
        "conv + bn stats (fused)" (sparse_conv2d_stats; the batch norm is next);
        the last batch norm, its LeakyReLU and the 1x1 conv after them as
        ops.batch_norm_leaky_relu_conv1x1: "bn apply + activation + 1x1 conv (fused)" (see `fuses_head`);
        a batch norm, its LeakyReLU, a second batch norm and the sparse conv after that as
        ops.batch_norm_leaky_relu_batch_norm_sparse_conv2d: "bn apply + activation + bn stats +
        apply + conv + bn stats (fused)" (see `pair_prologue_conv`);
        a batch norm, the LeakyReLU after it if any and the sparse conv after that (with its
        statistics, and its pooling where fuses_pool) as ops.batch_norm_leaky_relu_sparse_conv2d:
        "bn apply[ + activation] + conv[ + pool] + bn stats (fused)", "bn stats + apply..." where
        the batch norm's statistics were not given (see `prologue_conv`);
        every other batch norm as ops.batch_norm_leaky_relu: "bn apply[ + activation] (fused)" from the conv's
        statistics, "bn stats + apply[ + activation] (fused)" with its own statistics pass, the
        LeakyReLU after it included when there is one (else a slope of 1: the identity);
        with that fusion off (`fuse_activation`), "bn apply" (in place without autograd) after
        the conv's statistics; "fwd" (the stage alone)."""
        return self._run_decided(i, self.decide(i, x, stats), x, const, hw, stats)

    def _run_decided(self, i: int, decision: tuple, x, const, hw, stats):
        """run_stage with stage i's `decide` already made."""
        stage = self._chain[i]
        branch, j, act, pool, bn2 = decision
        if branch == POOL_CONV:
            x, const, hw, stats = stage(x, const, hw, with_stats=True, pool=True)
            return x, const, hw, stats, i + 2, "conv + pool + bn stats (fused)"
        if branch == STATS_CONV:
            x, const, hw, stats = stage(x, const, hw, with_stats=True)
            return x, const, hw, stats, i + 1, "conv + bn stats (fused)"
        if branch == HEAD:
            x, const, hw = self._chain[j].forward_head(x, stats, stage, hw, LEAKY_RELU_SLOPE)
            return x, const, hw, None, i + 3, "bn apply + activation + 1x1 conv (fused)"
        if branch == PROLOGUE:
            # the conv after the batch norm, its LeakyReLU if any and a second batch norm if a pair
            second = self._chain[bn2] if bn2 >= 0 else None
            phase = (("bn apply" if stats is not None else "bn stats + apply") + (" + activation" if act else "")
                     + (" + bn stats + apply" if second is not None else "")
                     + (" + conv + pool + bn stats (fused)" if pool else " + conv + bn stats (fused)"))
            x, const, hw, stats = self._chain[j].forward_after_batch_norm(x, stats, stage, hw,
                                                                          LEAKY_RELU_SLOPE if act else 1.0, pool, second)
            return x, const, hw, stats, j + (2 if pool else 1), phase
        if branch == BATCH_NORM_OP:
            x, const, hw = stage.forward_leaky_relu(x, stats, const, hw, LEAKY_RELU_SLOPE if act else 1.0)
            phase = ("bn apply" if stats is not None else "bn stats + apply") + (" + activation" if act else "")
            return x, const, hw, None, i + (2 if act else 1), phase + " (fused)"
        if branch == BATCH_NORM_FROM_STATS:
            x, const, hw = stage.forward_from_stats(x, stats, const, hw)
            return x, const, hw, None, i + 1, "bn apply"
        x, const, hw = stage(x, const, hw)
        return x, const, hw, None, i + 1, "fwd"

    def decide(self, i: int, x, stats) -> tuple[int, int, bool, bool, int]:
        """How `run_stage` runs stage i on live inputs x (with `stats` from the conv before, or
        None): (branch, the conv's index, whether a LeakyReLU is fused, whether a pooling is, the
        second batch norm's index or -1). Branches: POOL_CONV, STATS_CONV, HEAD, PROLOGUE (for
        these two the conv's index is that of the conv they end with), BATCH_NORM_OP,
        BATCH_NORM_FROM_STATS, PLAIN. Fixed by
        the generator's structure, its fusion switches and x's shape, dtype and device."""
        if self.fuses_pool(i, x):
            return POOL_CONV, i, False, True, -1
        if self.fuses_stats(i, x):
            return STATS_CONV, i, False, False, -1
        if self.fuses_head(i, x, stats):
            return HEAD, i + 2, True, False, -1
        pair = self.pair_prologue_conv(i, x)
        j = pair if pair is not None else self.prologue_conv(i, x)
        if j is not None:
            return PROLOGUE, j, j > i + 1, self.fuses_pool(j, x), i + 2 if pair is not None else -1
        if self.fuses_batch_norm_op(i, x):
            return BATCH_NORM_OP, i, self.fuses_activation(i, x), False, -1
        if stats is not None:
            return BATCH_NORM_FROM_STATS, i, False, False, -1
        return PLAIN, i, False, False, -1

    def fuses_stats(self, i: int, x) -> bool:
        """Whether `forward` runs stage i, a sparse conv followed by batch norm, with the batch-norm
        statistics in its epilogue (`sparse_conv2d_stats`) on input x, the batch norm then only
        normalizing: one pass over the output saved (in place without autograd)."""
        stages = self._chain
        return (self.fuse_batch_norm and isinstance(stages[i], _Conv) and i + 1 < len(stages)
                and isinstance(stages[i + 1], _BatchNorm) and stages[i].can_fuse_stats(x))

    def fuses_pool(self, i: int, x) -> bool:
        """Whether `forward` runs stage i, a sparse conv followed by 2x2 average pooling and batch
        norm (every down block's first conv), as one conv at the pooled size on the stride-2
        phases of the input's 2x2 box mean (`sparse_conv2d_pool_stats`) that also returns the
        batch norm's statistics: under `fuse_batch_norm`, on CPU, from an input
        `pool_fusion_min_width` wide."""
        stages = self._chain
        return (self.fuse_batch_norm and isinstance(stages[i], _Conv) and i + 2 < len(stages)
                and isinstance(stages[i + 1], _Elementwise) and stages[i + 1].op == "pool"
                and stages[i + 1].arg == "avg" and isinstance(stages[i + 2], _BatchNorm)
                and stages[i].upsample == 1 and stages[i].can_fuse_stats(x)
                and x.shape[-1] >= self.pool_fusion_min_width)

    def fuses_head(self, i: int, x, stats) -> bool:
        """Whether `forward` runs stage i, a batch norm whose statistics the conv before returned,
        the LeakyReLU after it and the 1x1 conv after that (the output conv) as one op
        (ops.batch_norm_leaky_relu_conv1x1): under `fuse_activation`, on CPU float32 or float64."""
        stages = self._chain
        return (self.fuses_activation(i, x) and stats is not None
                and i + 2 < len(stages) and isinstance(stages[i + 2], _Conv) and stages[i + 2].is_pointwise(x))

    def prologue_conv(self, i: int, x) -> int | None:
        """The index of the conv into whose input load `forward` puts stage i, a batch norm of x,
        with the LeakyReLU after it if any (ops.batch_norm_leaky_relu_sparse_conv2d), or None:
        under `fuse_prologue` and `fuse_activation`, where the conv is sparse and run with its
        statistics (`fuses_stats`) or its pooling (`fuses_pool`), on CPU float32 or float64,
        and reads x's channels as they are (not the first conv)."""
        if not (self.fuse_prologue and self.fuses_batch_norm_op(i, x)) or x.dtype not in (torch.float32, torch.float64):
            return None
        j = i + (2 if self.fuses_activation(i, x) else 1)
        conv = self._chain[j] if j < len(self._chain) else None
        if not (isinstance(conv, _Conv) and not conv.select_in and (self.fuses_stats(j, x) or self.fuses_pool(j, x))):
            return None
        return j

    def pair_prologue_conv(self, i: int, x) -> int | None:
        """The index of the conv into whose input load `forward` puts stage i, a batch norm of x,
        the LeakyReLU after it and the batch norm after that (the up path's `bn`, its activation
        and the next block's `bn_in`; ops.batch_norm_leaky_relu_batch_norm_sparse_conv2d), or
        None: under `fuse_batch_norm_pairs`, where the second batch norm goes into the conv after
        it without an activation between (`prologue_conv`)."""
        stages = self._chain
        if not (self.fuse_batch_norm_pairs and self.fuses_activation(i, x) and i + 2 < len(stages)
                and isinstance(stages[i + 2], _BatchNorm)):
            return None
        j = self.prologue_conv(i + 2, x)
        return j if j == i + 3 else None

    def fuses_batch_norm_op(self, i: int, x) -> bool:
        """Whether `forward` runs stage i, a batch norm, as ops.batch_norm_leaky_relu (one
        normalizing pass with the activation after it, whose backward keeps only its input)."""
        return self.fuse_activation and x is not None and isinstance(self._chain[i], _BatchNorm)

    def fuses_activation(self, i: int, x) -> bool:
        """Whether that op (`fuses_batch_norm_op`) also applies the LeakyReLU of stage i + 1."""
        stages = self._chain
        return (self.fuses_batch_norm_op(i, x) and i + 1 < len(stages) and isinstance(stages[i + 1], _Elementwise)
                and stages[i + 1].op == "act" and stages[i + 1].arg == "LeakyReLU")

    def convs(self):
        """(name in the dense model, compacted conv stage) for every conv, input to output."""
        return [(n, s) for n, s in zip(self.names, self.stages) if isinstance(s, _Conv)]

    def parameter_map(self) -> list[tuple[nn.Parameter, str, torch.Tensor]]:
        """(parameter, name in the dense model, flat indices there) for every parameter."""
        out = []
        for name, stage in zip(self.names, self.stages):
            if hasattr(stage, "parameter_map"):
                out += stage.parameter_map(name)
        return out

    @torch.no_grad()
    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters of the dense model this generator computes (masked entries and the
        kept entries the compaction proved unused are zero): load into the dense model with
        strict=False (batch norm buffers are not included)."""
        state = {n: torch.zeros(s, dtype=next(self.parameters()).dtype) for n, s in self.shapes.items()}
        masks = {}
        for stage in self.stages:
            if isinstance(stage, _BatchNorm):
                masks[id(stage.weight)], masks[id(stage.bias)] = stage.weight_mask, stage.bias_mask
            elif isinstance(stage, _Conv) and stage.bias is not None:
                masks[id(stage.bias)] = stage.bias_mask
            if isinstance(stage, _Conv) and stage.fold_weight is not None:
                masks[id(stage.fold_weight)] = stage.fold_mask
        for param, name, index in self.parameter_map():
            value = param.detach() * masks[id(param)] if id(param) in masks else param.detach()
            state[name].view(-1)[index.cpu()] = value.reshape(-1).cpu()
        return state

    def set_mode(self, mode: str | None = None, crossover: float | None = None) -> None:
        """Force every conv to "sparse" or "dense", or re-choose by a crossover density (default:
        `default_crossover` of the generator's device)."""
        if crossover is None:
            crossover = default_crossover(next(self.parameters()).device)
        for _, conv in self.convs():
            if mode is not None:
                conv.mode = mode
            else:
                conv.mode = "sparse" if conv.density < crossover else "dense"

    def layer_stats(self, height: int, width: int) -> list[dict]:
        """Per conv: kept channels, compacted density, mode, and the multiply-adds executed
        (nonzeros for sparse, all compacted taps for dense) at input size height x width."""
        rows, h, w = [], height, width
        for name, stage in zip(self.names, self.stages):
            if isinstance(stage, _Elementwise) and stage.op in ("pool", "up"):
                h, w = (h // 2, w // 2) if stage.op == "pool" else (h * 2, w * 2)
            if isinstance(stage, _Conv):
                h, w = h * stage.upsample, w * stage.upsample
                kk = stage.kernel[0] * stage.kernel[1]
                dense_taps = stage.n_out * stage.n_in * kk
                executed = stage.values.numel() if stage.mode == "sparse" else dense_taps
                rows.append(dict(name=name, c_out=stage.c_out, n_out=stage.n_out, n_in=stage.n_in, nnz=stage.values.numel(),
                                 density=stage.density, mode=stage.mode, hw=(h, w), macs=executed * h * w,
                                 kept_macs=stage.values.numel() * h * w))
        return rows

    # --- files
    def save(self, path) -> int:
        """Write a safetensors file (kept weights, CSR indices as int16 where they fit, masks of
        the small vectors) and return its size in bytes."""
        from safetensors.torch import save_file

        tensors = {}
        for key, t in self.state_dict().items():
            t = t.detach().cpu()
            if t.dtype in (torch.int64, torch.int32) and t.numel() and int(t.max()) < 2**15 and int(t.min()) >= 0:
                t = t.to(torch.int16)
            tensors[key] = t.contiguous()
        specs = [dict(kind=s.kind, name=n, **s.spec()) for n, s in zip(self.names, self.stages)]
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "specs": json.dumps(specs),
                    "config": json.dumps(self.config), "shapes": json.dumps(self.shapes)}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return os.path.getsize(path)

    @classmethod
    def load(cls, path, device="cpu") -> "SparseGenerator":
        """Read a generator written by `save` onto `device` (ValueError for another file). Its
        convs keep the modes they were saved with; `set_mode()` re-chooses them for the device
        (every conv dense on a GPU, `default_crossover`)."""
        from safetensors import safe_open

        path = os.fspath(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path} is not an oes_fast sparse generator file (format {metadata.get('format')!r})")
            if int(metadata.get("format_version", -1)) != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported sparse generator format version {metadata.get('format_version')}")
            specs, config, shapes = (json.loads(metadata[k]) for k in ("specs", "config", "shapes"))
            tensors = [dict() for _ in specs]
            for key in f.keys():
                _, i, name = key.split(".", 2)
                tensors[int(i)][name] = f.get_tensor(key)
        for t in tensors:
            for name, v in t.items():
                if v.dtype == torch.int16:
                    t[name] = v.to(torch.int64)
        gen = cls(specs, tensors, config, shapes)
        return gen.to(device=device, dtype=next(iter(gen.parameters())).dtype)
