"""Triton kernels of gumbel_masked_conv2d: a stride-1 convolution whose weight tiles are formed
on the fly as w * sigmoid((p + logistic(u)) / tau), and its backward. Launchers at the bottom.

The masked weights are never written to memory: every program regenerates the tile of the
mask it multiplies with from the package's random stream (csrc/philox.h, the helpers of
kernels/gumbel_mask.py), weight element j at offset `offset + j` (j row-major over
[C_out, C_in, k, k]), so the forward, the backward and the flat gumbel_mask op all see the
same noise.

All three kernels are implicit GEMMs (no im2col buffer):
- forward:      out[m, co]  = sum_kk X[m, kk] * Wm[kk, co],  m = (n, y, x), kk = (ci, ky, kx);
                padding (reflect / zeros) folded into the gather of X, bias in the epilogue.
- input grad:   gpad[m', ci] = sum_kk G[m', kk] * Wm[kk, ci], m' = (n, y', x') over the PADDED
                input, kk = (co, ky, kx), G gathered from grad_output at (y' - ky, x' - kx);
                the launcher folds the padded gradient back (reflection: fold_reflect_padding,
                zeros: a slice) - one activation-sized buffer, a cheap pass, instead of a 3x3
                gather of mirrored candidates per tap.
- weight grad:  dW[co, kk] = sum_r G[co, r] * X[r, kk] over the pixels r, split over programs
                (split-K) and the epilogue writes grad_logits = dW * w * m (1 - m) / tau (1 - m
                evaluated as e * m, e = exp(-x), as the CPU kernels do; and
                grad_weight = dW * m when asked) directly; both are linear in dW, so the
                partial sums of the splits are scaled and atomically added.
Accumulation in float32 for float32 inputs (the dot's input precision: "ieee" by default,
"tf32" or "bf16" on request), float64 for float64. Runs on CUDA tensors, and on CPU tensors
under TRITON_INTERPRET=1 (the tests).
"""
import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .gumbel_mask import (INTERPRETED, _as_f64_bits, _base_offset, _check_seed_offset, _f64, _launch_offset,
                          _logistic_noise, _sigmoid_and_complement)

__all__ = ["gumbel_masked_conv2d_forward", "gumbel_masked_conv2d_input_grad", "gumbel_masked_conv2d_weight_grad",
           "gumbel_masked_conv2d_backward", "set_precision", "precision", "GPU_TILES", "Tile", "tile",
           "gpu_launch_config"]

_PRECISIONS = ("ieee", "tf32", "bf16")
_precision = "ieee"


def set_precision(name: str) -> None:
    """Input precision of the float32 dots: "ieee" (exact float32, the default), "tf32", or
    "bf16" (tiles rounded to bfloat16, float32 accumulation). float64 is always exact."""
    global _precision
    if name not in _PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {_PRECISIONS}")
    _precision = name


def precision() -> str:
    return _precision


@triton.jit
def _src(i, n, REFLECT: tl.constexpr):
    """Padded coordinate (already shifted by -P) -> (input coordinate, in range)."""
    if REFLECT:
        i = tl.where(i < 0, -i, i)
        i = tl.where(i >= n, 2 * (n - 1) - i, i)
        return i, (i >= 0) & (i < n)
    else:
        return i, (i >= 0) & (i < n)


@triton.jit
def _mask_and_complement(p, seed, offs, tau_bits, COMPUTE: tl.constexpr):
    """(m, 1 - m), m = sigmoid((p + L) / tau) in the expression order of every other backend,
    1 - m as e * m (gumbel_mask._sigmoid_and_complement)."""
    noise = _logistic_noise(seed, offs, COMPUTE)
    tau = _f64(tau_bits, COMPUTE)
    return _sigmoid_and_complement((p + noise) / tau, COMPUTE)


@triton.jit
def _mask(p, seed, offs, tau_bits, COMPUTE: tl.constexpr):
    """m = sigmoid((p + L) / tau) in the expression order of every other backend."""
    m, _ = _mask_and_complement(p, seed, offs, tau_bits, COMPUTE)
    return m


@triton.jit
def _masked_weight_tile(p_ptr, w_ptr, widx, live, seed, offset, tau_bits, COMPUTE: tl.constexpr):
    """w * m at the flat weight indices `widx` (any tile layout), zero where not `live`; the
    noise of element widx is at stream offset `offset + widx`."""
    p = tl.load(p_ptr + widx, mask=live, other=0.0).to(COMPUTE)
    w = tl.load(w_ptr + widx, mask=live, other=0.0).to(COMPUTE)
    return w * _mask(p, seed, widx + offset.to(tl.int64), tau_bits, COMPUTE)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    # PREC: 0 exact (ieee; float64 is always this), 1 tf32, 2 bf16 tiles with float32 accumulation.
    # out_dtype always given: Triton 3.6 defaults it to float32, which breaks float64 accumulators.
    if PREC == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
    elif PREC == 1:
        return tl.dot(a, b, acc, input_precision="tf32", out_dtype=tl.float32)
    else:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit(do_not_specialize=["seed", "offset", "tau_bits"])
def _forward_kernel(x_ptr, p_ptr, w_ptr, b_ptr, out_ptr, N, C_in, H, W, C_out, H_out, W_out,
                    seed: tl.int64, offset: tl.int64, offset_ptr, tau_bits: tl.int64,
                    KS: tl.constexpr, PAD: tl.constexpr, REFLECT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    OFFSET_FROM_PTR: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offset = _base_offset(offset, offset_ptr, OFFSET_FROM_PTR)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # pixels along M (64-bit: N * H * W * C can pass 2^31 at 4096^2), output channels along N
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_live = rm < N * H_out * W_out
    n_live = rn < C_out
    img = rm // (H_out * W_out)
    pix = rm % (H_out * W_out)
    yo = pix // W_out
    xo = pix % W_out
    K = C_in * KS * KS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_live = rk < K
        ci = rk // (KS * KS)
        tap = rk % (KS * KS)
        # A: the input gathered at (y + ky - P, x + kx - P), padding applied on the address
        iy, vy = _src(yo[:, None] + (tap // KS)[None, :] - PAD, H, REFLECT)
        ix, vx = _src(xo[:, None] + (tap % KS)[None, :] - PAD, W, REFLECT)
        a_mask = m_live[:, None] & k_live[None, :] & vy & vx
        a = tl.load(x_ptr + ((img[:, None] * C_in + ci[None, :]) * H + iy) * W + ix, mask=a_mask, other=0.0)
        # B: the masked weight tile, Wm[kk, co] = w[co, kk] * m[co, kk], made here, never stored
        widx = rn[None, :].to(tl.int64) * K + rk[:, None]
        b = _masked_weight_tile(p_ptr, w_ptr, widx, k_live[:, None] & n_live[None, :], seed, offset, tau_bits,
                                COMPUTE)
        acc = _dot(a.to(COMPUTE), b, acc, PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_live, other=0.0).to(COMPUTE)[None, :]
    out_idx = (img[:, None] * C_out + rn[None, :]) * (H_out * W_out) + pix[:, None]
    tl.store(out_ptr + out_idx, acc.to(out_ptr.dtype.element_ty), mask=m_live[:, None] & n_live[None, :])


@triton.jit(do_not_specialize=["seed", "offset", "tau_bits"])
def _input_grad_kernel(g_ptr, p_ptr, w_ptr, out_ptr, N, C_in, H_out, W_out, C_out, HP, WP,
                       seed: tl.int64, offset: tl.int64, offset_ptr, tau_bits: tl.int64,
                       KS: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out: the gradient of the PADDED input [N, C_in, HP, WP]; g: grad_output [N, C_out, H_out, W_out]
    offset = _base_offset(offset, offset_ptr, OFFSET_FROM_PTR)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    m_live = rm < N * HP * WP
    n_live = rn < C_in
    img = rm // (HP * WP)
    pix = rm % (HP * WP)
    yp = pix // WP
    xp = pix % WP
    K = C_out * KS * KS
    KW_ALL = C_in * KS * KS  # weight row length
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_live = rk < K
        co = rk // (KS * KS)
        tap = rk % (KS * KS)
        # padded position (yp, xp) feeds output (yp - ky, xp - kx) through tap (ky, kx)
        oy = yp[:, None] - (tap // KS)[None, :]
        ox = xp[:, None] - (tap % KS)[None, :]
        a_mask = m_live[:, None] & k_live[None, :] & (oy >= 0) & (oy < H_out) & (ox >= 0) & (ox < W_out)
        a = tl.load(g_ptr + ((img[:, None] * C_out + co[None, :]) * H_out + oy) * W_out + ox, mask=a_mask, other=0.0)
        widx = co[:, None].to(tl.int64) * KW_ALL + rn[None, :] * (KS * KS) + tap[:, None]
        b = _masked_weight_tile(p_ptr, w_ptr, widx, k_live[:, None] & n_live[None, :], seed, offset, tau_bits,
                                COMPUTE)
        acc = _dot(a.to(COMPUTE), b, acc, PREC)
    out_idx = (img[:, None] * C_in + rn[None, :]) * (HP * WP) + pix[:, None]
    tl.store(out_ptr + out_idx, acc.to(out_ptr.dtype.element_ty), mask=m_live[:, None] & n_live[None, :])


@triton.jit(do_not_specialize=["seed", "offset", "tau_bits"])
def _weight_grad_kernel(g_ptr, x_ptr, p_ptr, w_ptr, gp_ptr, gw_ptr, N, C_in, H, W, C_out, H_out, W_out,
                        rows_per_split, seed: tl.int64, offset: tl.int64, offset_ptr, tau_bits: tl.int64,
                        KS: tl.constexpr, PAD: tl.constexpr, REFLECT: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
                        ATOMIC: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr, COMPUTE: tl.constexpr,
                        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offset = _base_offset(offset, offset_ptr, OFFSET_FROM_PTR)
    # GEMM rows: output channels (BLOCK_M), columns: kk = (ci, ky, kx) (BLOCK_N), reduction:
    # pixels (BLOCK_K), the pixel range of split program_id(2)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rco = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rkk = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    K = C_in * KS * KS
    co_live = rco < C_out
    kk_live = rkk < K
    ci = rkk // (KS * KS)
    tap = rkk % (KS * KS)
    ky = tap // KS
    kx = tap % KS
    R = N * H_out * W_out
    r_start = pid_s.to(tl.int64) * rows_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    for r0 in range(0, rows_per_split, BLOCK_K):
        rr = r_start + r0 + tl.arange(0, BLOCK_K)
        r_live = (rr < R) & (r0 + tl.arange(0, BLOCK_K) < rows_per_split)
        img = rr // (H_out * W_out)
        pix = rr % (H_out * W_out)
        yo = pix // W_out
        xo = pix % W_out
        # A = G^T [co, r]
        a = tl.load(g_ptr + (img[None, :] * C_out + rco[:, None]) * (H_out * W_out) + pix[None, :],
                    mask=co_live[:, None] & r_live[None, :], other=0.0)
        # B = X [r, kk], gathered with the padding folded in
        iy, vy = _src(yo[:, None] + ky[None, :] - PAD, H, REFLECT)
        ix, vx = _src(xo[:, None] + kx[None, :] - PAD, W, REFLECT)
        b = tl.load(x_ptr + ((img[:, None] * C_in + ci[None, :]) * H + iy) * W + ix,
                    mask=r_live[:, None] & kk_live[None, :] & vy & vx, other=0.0)
        acc = _dot(a.to(COMPUTE), b.to(COMPUTE), acc, PREC)
    # epilogue: dW_eff -> grad_weight = dW * m and grad_logits = dW * m * (1 - m) * w / tau, with
    # 1 - m as e * m (no cancellation where m is nearly 1); dW * m is formed first so that only
    # two tiles (it and 1 - m) stay live, as many as the earlier m * (1 - m) needed
    widx = rco[:, None].to(tl.int64) * K + rkk[None, :]
    live = co_live[:, None] & kk_live[None, :]
    p = tl.load(p_ptr + widx, mask=live, other=0.0).to(COMPUTE)
    m, not_m = _mask_and_complement(p, seed, widx + offset.to(tl.int64), tau_bits, COMPUTE)
    acc_m = acc * m
    # w loaded after the mask: live across the Philox rounds and the exp, its tile made the
    # default float32 kernel (64x64 on 8 warps) spill 4 bytes on sm_90 (test_triton_compile.py)
    w = tl.load(w_ptr + widx, mask=live, other=0.0).to(COMPUTE)
    gp = acc_m * not_m * w / _f64(tau_bits, COMPUTE)
    if ATOMIC:
        tl.atomic_add(gp_ptr + widx, gp.to(gp_ptr.dtype.element_ty), mask=live)
        if WEIGHT_GRAD:
            tl.atomic_add(gw_ptr + widx, acc_m.to(gw_ptr.dtype.element_ty), mask=live)
    else:
        tl.store(gp_ptr + widx, gp.to(gp_ptr.dtype.element_ty), mask=live)
        if WEIGHT_GRAD:
            tl.store(gw_ptr + widx, acc_m.to(gw_ptr.dtype.element_ty), mask=live)


# ----------------------------------------------------------------------------- launchers


def _check(op, input, logits, weight, bias, seed, offset, tau, padding, padding_mode):
    """The op's checks (oes_fast.op_checks.check_gumbel_masked_conv2d_inputs), then the launch's own:
    a device Triton can run on, offsets in int64. Returns (seed, offset, tau, k, padding, H_out, W_out)."""
    from oes_fast.op_checks import check_gumbel_masked_conv2d_inputs

    for name, t in (("input", input), ("logits", logits), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    tau, padding = float(tau), int(padding)
    h_out, w_out = check_gumbel_masked_conv2d_inputs(input, logits, weight, bias, tau, padding, padding_mode)
    if input.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {input.device}")
    seed, offset = _check_seed_offset(op, seed, offset, weight.numel())
    return seed, offset, tau, weight.shape[2], padding, h_out, w_out


def _compute(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prec(dtype):
    return 0 if dtype == torch.float64 else _PRECISIONS.index(_precision)


def _pow2(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(int(n))))


# ----------------------------------------------------------------------------- launch configuration


class Tile(NamedTuple):
    """A kernel's launch configuration: the GEMM tile (BLOCK_N, and BLOCK_M of the weight
    gradient, are caps: a narrower layer gets the next power of two of its width, at least 16,
    tl.dot's smallest side), warps, and software-pipelining stages."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The one table of GPU launch configurations, per kernel and dot precision ("float64" for
# float64 inputs); the layer shape enters through the width rule of Tile. Chosen by compiling
# candidates for sm_90 with Triton 3.6 and 3.9 over the layers of the OES network and the deep
# decoder (bench/triton_compile_report.py): the largest tiles whose kernels spill on neither
# version. What drove the choice:
# - software pipelining is off (1 stage): the A tile is gathered with masked pointer loads (the
#   padding is folded into the addresses) and the B tile is generated (Philox, logs), and the
#   pipeliner's in-flight copies made every multi-stage configuration spill (forward
#   128x64x32, 4 warps, 3 stages: 32 registers and 13 KB of spill stores per thread);
# - exact float32 ("ieee") dots run on FMA units, each thread holding its rows of A and columns
#   of B for the whole K step: at most 16 outputs per thread (64x64 tiles on 8 warps); TF32 /
#   bf16 dots run on tensor cores and take twice the tile;
# - 8 warps where a 4-warp program sat at 255 registers;
# - where a tile was spill-free on one version only, one spill-free on both: the forward's ieee
#   K step of 16 spilled 4 bytes on Triton 3.9 (16->3 1x1 layer), 32 does not; the weight
#   gradient's ieee 64x64x16 on 4 warps spilled 4 bytes on Triton 3.6 (128->128 layers at 8x8),
#   on 8 warps it does not.
#   forward      M: output pixels, N: output channels, K: C_in * k * k
#   input_grad   M: padded input pixels, N: input channels, K: C_out * k * k
#   weight_grad  M: output channels, N: C_in * k * k, K: pixels (split-K over programs)
GPU_TILES = {
    ("forward", "ieee"): Tile(64, 64, 32, 8, 1),
    ("forward", "tf32"): Tile(128, 64, 16, 8, 1),
    ("forward", "bf16"): Tile(128, 64, 16, 8, 1),
    ("forward", "float64"): Tile(64, 32, 16, 4, 1),
    ("input_grad", "ieee"): Tile(64, 64, 16, 8, 1),
    ("input_grad", "tf32"): Tile(64, 64, 16, 8, 1),
    ("input_grad", "bf16"): Tile(64, 64, 16, 8, 1),
    ("input_grad", "float64"): Tile(64, 32, 16, 4, 1),
    ("weight_grad", "ieee"): Tile(64, 64, 16, 8, 1),
    ("weight_grad", "tf32"): Tile(64, 64, 32, 4, 1),
    ("weight_grad", "bf16"): Tile(64, 64, 32, 4, 1),
    ("weight_grad", "float64"): Tile(64, 32, 16, 4, 1),
}
# Under the interpreter each program is numpy work: small tiles keep the CPU tests fast.
INTERPRETER_TILE = Tile(16, 16, 16, 4, 1)
# Split-K of the weight gradient: about 4 programs per SM, at least this many pixels per split.
SPLIT_MIN_ROWS = 4096
H100_SMS = 132


class GPULaunch(NamedTuple):
    """What the launchers assume of the GPU: its SM count (split-K) and the split threshold."""
    sms: int = H100_SMS
    min_rows_per_split: int = SPLIT_MIN_ROWS


_gpu_launch_override = None


@contextlib.contextmanager
def gpu_launch_config(sms: int = H100_SMS, min_rows_per_split: int = SPLIT_MIN_ROWS):
    """Within the block, launch with GPU_TILES and the GPU's split-K rule even under the
    interpreter (and with this SM count on a GPU), so CPU tests run the code the GPU runs."""
    global _gpu_launch_override
    saved, _gpu_launch_override = _gpu_launch_override, GPULaunch(int(sms), int(min_rows_per_split))
    try:
        yield
    finally:
        _gpu_launch_override = saved


def precision_name(dtype) -> str:
    """The GPU_TILES key of a dtype under the current set_precision."""
    return "float64" if dtype == torch.float64 else _precision


def tile(kernel: str, dtype, m_extent: int, n_extent: int) -> Tile:
    """The launch configuration of `kernel` for a GEMM of m_extent x n_extent outputs."""
    if INTERPRETED and _gpu_launch_override is None:
        return INTERPRETER_TILE
    t = GPU_TILES[(kernel, precision_name(dtype))]
    block_m = _pow2(m_extent, 16, t.block_m) if kernel == "weight_grad" else t.block_m
    return t._replace(block_m=block_m, block_n=_pow2(n_extent, 16, t.block_n))


def _on_device(t):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _gpu_launch(device) -> GPULaunch | None:
    if _gpu_launch_override is not None:
        return _gpu_launch_override
    if INTERPRETED or device.type != "cuda":
        return None
    return GPULaunch(torch.cuda.get_device_properties(device).multi_processor_count)


def splits(rows: int, tiles: int, gpu: GPULaunch | None) -> int:
    """Split-K factor for the weight gradient: enough programs to fill the GPU (about 4 per
    SM) when the C_out x K tile grid alone is small, at least min_rows_per_split pixels per
    split; 1 without a GPU launch configuration."""
    if gpu is None:
        return 1
    want = max(1, (4 * gpu.sms) // max(tiles, 1))
    return int(max(1, min(want, rows // gpu.min_rows_per_split)))


# Each *_launch function returns (kernel, grid, args, options) for `kernel[grid](*args, **options)`;
# it reads only shapes and dtypes, so bench/triton_compile_report.py compiles exactly these
# launches for sm_90 (with triton's MockTensor in place of tensors) on a machine without a GPU.

def forward_launch(x, p, w, b, out, seed, offset, offset_ptr, from_ptr, tau, padding, padding_mode):
    n, c_in, h, wd = x.shape
    c_out, _, k, _ = w.shape
    h_out, w_out = out.shape[2], out.shape[3]
    t = tile("forward", x.dtype, n * h_out * w_out, c_out)
    grid = (triton.cdiv(n * h_out * w_out, t.block_m), triton.cdiv(c_out, t.block_n))
    args = (x, p, w, b if b is not None else x, out, n, c_in, h, wd, c_out, h_out, w_out, seed, offset, offset_ptr,
            _as_f64_bits(tau))  # b is never read without HAS_BIAS
    options = dict(KS=k, PAD=padding, REFLECT=padding_mode == "reflect", HAS_BIAS=b is not None,
                   OFFSET_FROM_PTR=from_ptr, COMPUTE=_compute(x.dtype), PREC=_prec(x.dtype), BLOCK_M=t.block_m,
                   BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages)
    return _forward_kernel, grid, args, options


def input_grad_launch(g, p, w, gpad, seed, offset, offset_ptr, from_ptr, tau):
    n, c_in, hp, wp = gpad.shape
    c_out, _, k, _ = w.shape
    h_out, w_out = g.shape[2], g.shape[3]
    t = tile("input_grad", g.dtype, n * hp * wp, c_in)
    grid = (triton.cdiv(n * hp * wp, t.block_m), triton.cdiv(c_in, t.block_n))
    args = (g, p, w, gpad, n, c_in, h_out, w_out, c_out, hp, wp, seed, offset, offset_ptr, _as_f64_bits(tau))
    options = dict(KS=k, OFFSET_FROM_PTR=from_ptr, COMPUTE=_compute(g.dtype), PREC=_prec(g.dtype),
                   BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps,
                   num_stages=t.num_stages)
    return _input_grad_kernel, grid, args, options


def weight_grad_launch(g, x, p, w, grad_logits, grad_weight, seed, offset, offset_ptr, from_ptr, tau, padding,
                       padding_mode, gpu):
    """grad_weight None: not asked for. `gpu`: a GPULaunch (split-K) or None. The outputs must
    be zero-filled when the returned options have ATOMIC (the splits add into them)."""
    n, c_in, h, wd = x.shape
    c_out, _, k, _ = w.shape
    h_out, w_out = g.shape[2], g.shape[3]
    kk, rows = c_in * k * k, n * h_out * w_out
    t = tile("weight_grad", g.dtype, c_out, kk)
    n_splits = splits(rows, triton.cdiv(c_out, t.block_m) * triton.cdiv(kk, t.block_n), gpu)
    rows_per_split = triton.cdiv(triton.cdiv(rows, n_splits), t.block_k) * t.block_k
    n_splits = triton.cdiv(rows, rows_per_split)
    grid = (triton.cdiv(c_out, t.block_m), triton.cdiv(kk, t.block_n), n_splits)
    args = (g, x, p, w, grad_logits, grad_weight if grad_weight is not None else grad_logits, n, c_in, h, wd, c_out,
            h_out, w_out, rows_per_split, seed, offset, offset_ptr, _as_f64_bits(tau))
    options = dict(KS=k, PAD=padding, REFLECT=padding_mode == "reflect", WEIGHT_GRAD=grad_weight is not None,
                   ATOMIC=n_splits > 1, OFFSET_FROM_PTR=from_ptr, COMPUTE=_compute(g.dtype), PREC=_prec(g.dtype),
                   BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps,
                   num_stages=t.num_stages)
    return _weight_grad_kernel, grid, args, options


# ----------------------------------------------------------------------------- launchers


def gumbel_masked_conv2d_forward(input, logits, weight, bias, seed, offset, tau, padding, padding_mode):
    """conv2d(pad(input), weight * gumbel_sigmoid(logits)) + bias, stride 1, [N, C_out, H_out, W_out]."""
    seed, offset, tau, k, padding, h_out, w_out = _check("gumbel_masked_conv2d", input, logits, weight, bias, seed,
                                                         offset, tau, padding, padding_mode)
    x, p, w = input.contiguous(), logits.contiguous(), weight.contiguous()
    n, c_in = x.shape[0], x.shape[1]
    c_out = w.shape[0]
    out = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if c_in == 0:
        return out.copy_((bias if bias is not None else out.new_zeros(c_out)).view(1, -1, 1, 1).expand_as(out))
    b = bias.contiguous() if bias is not None else None
    offset, offset_ptr, from_ptr = _launch_offset("gumbel_masked_conv2d", offset, x)
    kernel, grid, args, options = forward_launch(x, p, w, b, out, seed, offset, offset_ptr, from_ptr, tau, padding,
                                                 padding_mode)
    with _on_device(x):
        kernel[grid](*args, **options)
    return out


def gumbel_masked_conv2d_input_grad(grad_output, input, logits, weight, seed, offset, tau, padding, padding_mode):
    """d loss / d input, the masked weights regenerated from (seed, offset)."""
    seed, offset, tau, k, padding, h_out, w_out = _check("gumbel_masked_conv2d_backward", input, logits, weight, None,
                                                         seed, offset, tau, padding, padding_mode)
    g, p, w = grad_output.contiguous(), logits.contiguous(), weight.contiguous()
    n, c_in, h, wd = input.shape
    c_out = w.shape[0]
    gpad = torch.empty((n, c_in, h + 2 * padding, wd + 2 * padding), dtype=g.dtype, device=g.device)
    if gpad.numel() and c_out:
        offset, offset_ptr, from_ptr = _launch_offset("gumbel_masked_conv2d_backward", offset, g)
        kernel, grid, args, options = input_grad_launch(g, p, w, gpad, seed, offset, offset_ptr, from_ptr, tau)
        with _on_device(g):
            kernel[grid](*args, **options)
    else:
        gpad.zero_()
    if padding == 0:
        return gpad
    if padding_mode == "reflect":
        return fold_reflect_padding(gpad, padding)
    return gpad[:, :, padding:padding + h, padding:padding + wd].contiguous()


def fold_reflect_padding(grad_padded: torch.Tensor, pad: int) -> torch.Tensor:
    """The adjoint of reflect padding by `pad` on the last two dims: the gradient of the padded
    tensor with each mirrored border added back onto the pixels it was read from. Slices and
    in-place adds, one dim after the other, so the result is the same to the bit on every run;
    aten's CUDA reflection_pad2d_backward adds with atomics, whose order (and so the last bits)
    varies from run to run. csrc/cuda/gumbel_masked_conv2d.cu folds the same way."""
    def fold(g, dim):
        n = g.shape[dim] - 2 * pad
        out = g.narrow(dim, pad, n).clone()
        out.narrow(dim, 1, pad).add_(g.narrow(dim, 0, pad).flip(dim))  # padded i < pad came from pad - i
        out.narrow(dim, n - 1 - pad, pad).add_(g.narrow(dim, n + pad, pad).flip(dim))  # n + pad + j from n - 2 - j
        return out

    return fold(fold(grad_padded, 2), 3)


def gumbel_masked_conv2d_weight_grad(grad_output, input, logits, weight, seed, offset, tau, padding, padding_mode,
                                     weight_grad):
    """(grad_logits, grad_weight or an empty [0] tensor), from the dW_eff reduction's epilogue."""
    seed, offset, tau, k, padding, h_out, w_out = _check("gumbel_masked_conv2d_backward", input, logits, weight, None,
                                                         seed, offset, tau, padding, padding_mode)
    g, x, p, w = grad_output.contiguous(), input.contiguous(), logits.contiguous(), weight.contiguous()
    grad_logits = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    grad_weight = torch.empty(w.shape, dtype=w.dtype, device=w.device) if weight_grad else None
    outputs = (grad_logits, grad_weight) if weight_grad else (grad_logits,)
    if w.numel() == 0 or g.numel() == 0:
        return grad_logits.zero_(), grad_weight.zero_() if weight_grad else w.new_empty(0)
    offset, offset_ptr, from_ptr = _launch_offset("gumbel_masked_conv2d_backward", offset, g)
    kernel, grid, args, options = weight_grad_launch(g, x, p, w, grad_logits, grad_weight, seed, offset, offset_ptr,
                                                     from_ptr, tau, padding, padding_mode, _gpu_launch(g.device))
    if options["ATOMIC"]:  # the splits add into the outputs
        for t in outputs:
            t.zero_()
    with _on_device(g):
        kernel[grid](*args, **options)
    return grad_logits, grad_weight if weight_grad else w.new_empty(0)


def gumbel_masked_conv2d_backward(grad_output, input, logits, weight, seed, offset, tau, padding, padding_mode,
                                  output_mask):
    """(grad_input, grad_logits, grad_weight, grad_bias); the ones not asked for in
    output_mask (4 bools) are empty [0] tensors."""
    need_input, need_logits, need_weight, need_bias = (bool(b) for b in output_mask)
    empty = grad_output.new_empty(0)
    grad_input = (gumbel_masked_conv2d_input_grad(grad_output, input, logits, weight, seed, offset, tau, padding,
                                                  padding_mode) if need_input else empty)
    grad_logits = grad_weight = empty
    if need_logits or need_weight:
        grad_logits, grad_weight = gumbel_masked_conv2d_weight_grad(grad_output, input, logits, weight, seed, offset,
                                                                    tau, padding, padding_mode, need_weight)
        if not need_logits:
            grad_logits = empty
    # accumulated in float64 as oes_fast.ops._channel_sum does: a sum over a whole image loses
    # several ulps in float32
    wide = torch.float64 if grad_output.dtype in (torch.float32, torch.float16, torch.bfloat16) else grad_output.dtype
    grad_bias = grad_output.sum((0, 2, 3), dtype=wide).to(grad_output.dtype) if need_bias else empty
    return grad_input, grad_logits, grad_weight, grad_bias
