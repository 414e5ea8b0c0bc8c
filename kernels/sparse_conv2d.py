"""Triton kernels of sparse_conv2d (forward, input gradient, weight gradient) and their launchers.

Weights are CSR over output channels (csrc/sparse_conv2d.h): row_ptr int64 [C_out + 1],
col_idx int32 = c * KH * KW + ky * KW + kx, values. Padding ("reflect" or "zeros") is applied
on the load addresses, never materialized.

- forward: one program per (image, output channel, block of output pixels); it walks the
  channel's taps (the CSR row) and gathers one input pixel per output pixel per tap, so each
  output is written once by its owner, no atomics.
- input gradient: a gather too (deterministic). The taps are regrouped by input channel in
  the launcher (CSC, a sort of nnz entries); an input pixel i receives from the padded
  coordinates that map onto it: i + P, and under reflection also P - i and 2(H-1) - i + P,
  hence up to 3 x 3 candidate positions per tap, each checked against stride and range.
- weight gradient: one program per (tap, block of output pixels) writes a partial sum; the
  launcher adds the partials in a fixed order.
float32 accumulates in float32, float64 in float64. Runs on CUDA tensors, and on CPU tensors
under TRITON_INTERPRET=1 (the tests).
"""
import torch
import triton
import triton.language as tl

__all__ = ["sparse_conv2d", "sparse_conv2d_input_grad", "sparse_conv2d_weight_grad"]

# 128 output pixels per program: a 4-warp program keeps one pixel per thread per tap, loads
# of neighbouring pixels of one row coalesce, and the 256x256..512x512 planes of the OES
# network give thousands of programs.
BLOCK = 128
NUM_WARPS = 4
_DTYPES = (torch.float32, torch.float64)


@triton.jit
def _src(i, n, REFLECT: tl.constexpr):
    """Padded coordinate -> (input coordinate, valid)."""
    if REFLECT:
        i = tl.where(i < 0, -i, i)
        i = tl.where(i >= n, 2 * (n - 1) - i, i)
        return i, i == i
    else:
        return i, (i >= 0) & (i < n)


@triton.jit
def _forward_kernel(x_ptr, val_ptr, rp_ptr, ci_ptr, b_ptr, out_ptr, C_in, H, W, C_out, H_out, W_out,
                    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                    PW: tl.constexpr, REFLECT: tl.constexpr, HAS_BIAS: tl.constexpr, U: tl.constexpr,
                    BLOCK: tl.constexpr):
    # H, W: the input as the convolution sees it (upsampled by U); the stored input is H/U x W/U
    pid_no = tl.program_id(0)  # n * C_out + o
    pid_px = tl.program_id(1)
    n = pid_no // C_out
    o = pid_no % C_out
    offs = pid_px * BLOCK + tl.arange(0, BLOCK)
    live = offs < H_out * W_out
    yo = offs // W_out
    xo = offs % W_out
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o)
    start = tl.load(rp_ptr + o)
    end = tl.load(rp_ptr + o + 1)
    x_img = x_ptr + n.to(tl.int64) * C_in * (H // U) * (W // U)
    for k in range(start, end):
        col = tl.load(ci_ptr + k)
        w = tl.load(val_ptr + k)
        c = col // (KH * KW)
        r = col % (KH * KW)
        iy, vy = _src(yo * SH + r // KW - PH, H, REFLECT)
        ix, vx = _src(xo * SW + r % KW - PW, W, REFLECT)
        v = tl.load(x_img + c.to(tl.int64) * (H // U) * (W // U) + (iy // U) * (W // U) + ix // U,
                    mask=live & vy & vx, other=0.0)
        acc += w * v
    tl.store(out_ptr + pid_no.to(tl.int64) * H_out * W_out + offs, acc, mask=live)


@triton.jit
def _tap_output(idx, size, pad, k, stride, size_out, case: tl.constexpr, REFLECT: tl.constexpr):
    """Along one axis, the output index whose kernel tap k reads input index `idx` through
    padded position `case`: 0 direct, 1 mirrored at the start, 2 mirrored at the end
    (reflection padding only); with whether that output exists."""
    if case == 0:
        padded = idx + pad
        ok = idx >= 0
    elif case == 1:
        padded = pad - idx
        ok = (idx >= 1) & (idx <= pad) & REFLECT
    else:
        padded = 2 * (size - 1) - idx + pad
        ok = (idx >= size - 1 - pad) & (idx <= size - 2) & REFLECT
    shifted = padded - k
    out = shifted // stride
    return out, ok & (shifted >= 0) & (shifted % stride == 0) & (out < size_out)


@triton.jit
def _input_grad_kernel(g_ptr, val_ptr, cp_ptr, o_ptr, r_ptr, out_ptr, C_in, H, W, C_out, H_out, W_out,
                       KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                       PW: tl.constexpr, REFLECT: tl.constexpr, BLOCK: tl.constexpr):
    pid_nc = tl.program_id(0)  # n * C_in + c
    pid_px = tl.program_id(1)
    n = pid_nc // C_in
    c = pid_nc % C_in
    offs = pid_px * BLOCK + tl.arange(0, BLOCK)
    live = offs < H * W
    i = offs // W
    j = offs % W
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    start = tl.load(cp_ptr + c)
    end = tl.load(cp_ptr + c + 1)
    g_img = g_ptr + n.to(tl.int64) * C_out * H_out * W_out
    for t in range(start, end):
        o = tl.load(o_ptr + t)
        r = tl.load(r_ptr + t)
        w = tl.load(val_ptr + t)
        ky = r // KW
        kx = r % KW
        g_plane = g_img + o.to(tl.int64) * H_out * W_out
        for a in tl.static_range(3):
            yo, ok_a = _tap_output(i, H, PH, ky, SH, H_out, a, REFLECT)
            ok_a = ok_a & live
            for b in tl.static_range(3):
                xo, ok_b = _tap_output(j, W, PW, kx, SW, W_out, b, REFLECT)
                ok = ok_a & ok_b
                gv = tl.load(g_plane + yo * W_out + xo, mask=ok, other=0.0)
                acc += w * gv
    tl.store(out_ptr + pid_nc.to(tl.int64) * H * W + offs, acc, mask=live)


@triton.jit
def _weight_grad_kernel(g_ptr, x_ptr, rowof_ptr, ci_ptr, part_ptr, N, C_in, H, W, C_out, H_out, W_out, n_blocks,
                        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                        PW: tl.constexpr, REFLECT: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0)
    pid_px = tl.program_id(1)
    o = tl.load(rowof_ptr + k)
    col = tl.load(ci_ptr + k)
    c = col // (KH * KW)
    r = col % (KH * KW)
    offs = pid_px * BLOCK + tl.arange(0, BLOCK)
    live = offs < N * H_out * W_out
    n = offs // (H_out * W_out)
    p = offs % (H_out * W_out)
    yo = p // W_out
    xo = p % W_out
    iy, vy = _src(yo * SH + r // KW - PH, H, REFLECT)
    ix, vx = _src(xo * SW + r % KW - PW, W, REFLECT)
    n64 = n.to(tl.int64)
    gv = tl.load(g_ptr + (n64 * C_out + o) * H_out * W_out + p, mask=live, other=0.0)
    xv = tl.load(x_ptr + (n64 * C_in + c) * H * W + iy * W + ix, mask=live & vy & vx, other=0.0)
    tl.store(part_ptr + k.to(tl.int64) * n_blocks + pid_px, tl.sum(gv * xv, axis=0))


def _geometry(input_size, kernel_size, stride, padding, padding_mode, upsample=1):
    if padding_mode not in ("reflect", "zeros"):
        raise RuntimeError(f"sparse_conv2d: padding_mode must be 'reflect' or 'zeros', got '{padding_mode}'")
    n, c, h, w = (int(v) for v in input_size)
    h, w = h * upsample, w * upsample
    kh, kw = (int(v) for v in kernel_size)
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    if padding_mode == "reflect" and (ph >= h or pw >= w):
        raise RuntimeError("sparse_conv2d: reflection padding must be smaller than the input's sides")
    h_out = (h + 2 * ph - kh) // sh + 1
    w_out = (w + 2 * pw - kw) // sw + 1
    return n, c, h, w, kh, kw, sh, sw, ph, pw, h_out, w_out, padding_mode == "reflect"


def sparse_conv2d(input, values, row_ptr, col_idx, bias, kernel_size, stride, padding, padding_mode, upsample=1):
    n, c, h, w, kh, kw, sh, sw, ph, pw, h_out, w_out, reflect = _geometry(input.shape, kernel_size, stride, padding,
                                                                         padding_mode, upsample)
    if input.dtype not in _DTYPES or values.dtype != input.dtype:
        raise RuntimeError("sparse_conv2d: dtype must be float32 or float64 and the values must match the input")
    c_out = row_ptr.numel() - 1
    x = input.contiguous()
    out = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    b = bias.contiguous() if bias is not None else values
    grid = (n * c_out, triton.cdiv(h_out * w_out, BLOCK))
    _forward_kernel[grid](x, values.contiguous(), row_ptr.contiguous(), col_idx.contiguous(), b, out, c, h, w, c_out,
                          h_out, w_out, kh, kw, sh, sw, ph, pw, reflect, bias is not None, int(upsample), BLOCK,
                          num_warps=NUM_WARPS)
    return out


def sparse_conv2d_input_grad(grad_output, values, row_ptr, col_idx, input_size, kernel_size, stride, padding,
                             padding_mode, upsample=1):
    if upsample > 1:  # the upsampled input's gradient, summed over each u x u block
        n, c, h, w = input_size
        full = sparse_conv2d_input_grad(grad_output, values, row_ptr, col_idx, [n, c, h * upsample, w * upsample],
                                        kernel_size, stride, padding, padding_mode)
        return full.view(n, c, h, upsample, w, upsample).sum((3, 5))
    n, c, h, w, kh, kw, sh, sw, ph, pw, h_out, w_out, reflect = _geometry(input_size, kernel_size, stride, padding,
                                                                         padding_mode)
    c_out = row_ptr.numel() - 1
    g = grad_output.contiguous()
    out = torch.empty((n, c, h, w), dtype=g.dtype, device=g.device)
    if out.numel() == 0:
        return out
    # CSC: taps grouped by input channel (stable sort keeps a fixed summation order)
    kk = kh * kw
    # nothing here waits for the device (repeat_interleave is told its size; searchsorted, not
    # bincount), so that a CUDA graph can capture the backward
    rows = torch.repeat_interleave(row_ptr[1:] - row_ptr[:-1], output_size=col_idx.numel())
    col = col_idx.to(torch.int64)
    ch_sorted, order = torch.sort(col // kk, stable=True)
    col_ptr = torch.searchsorted(ch_sorted, torch.arange(c + 1, device=g.device))
    t_o = rows[order].to(torch.int32).contiguous()
    t_r = (col % kk)[order].to(torch.int32).contiguous()
    t_w = values[order].contiguous()
    grid = (n * c, triton.cdiv(h * w, BLOCK))
    _input_grad_kernel[grid](g, t_w, col_ptr, t_o, t_r, out, c, h, w, c_out, h_out, w_out, kh, kw, sh, sw, ph, pw,
                             reflect, BLOCK, num_warps=NUM_WARPS)
    return out


def sparse_conv2d_weight_grad(grad_output, input, row_ptr, col_idx, kernel_size, stride, padding, padding_mode,
                              upsample=1):
    if upsample > 1:  # the kernel reads the input as the convolution saw it: upsample it first
        input = torch.nn.functional.interpolate(input, scale_factor=upsample, mode="nearest")
    n, c, h, w, kh, kw, sh, sw, ph, pw, h_out, w_out, reflect = _geometry(input.shape, kernel_size, stride, padding,
                                                                         padding_mode)
    c_out = row_ptr.numel() - 1
    nnz = col_idx.numel()
    x = input.contiguous()
    g = grad_output.contiguous()
    if nnz == 0 or g.numel() == 0:
        return torch.zeros(nnz, dtype=x.dtype, device=x.device)
    # told its size: no wait for the device (CUDA graphs)
    rows = torch.repeat_interleave(row_ptr[1:] - row_ptr[:-1], output_size=nnz).to(torch.int32)
    n_blocks = triton.cdiv(n * h_out * w_out, BLOCK)
    partial = torch.empty((nnz, n_blocks), dtype=x.dtype, device=x.device)
    _weight_grad_kernel[(nnz, n_blocks)](g, x, rows.contiguous(), col_idx.contiguous(), partial, n, c, h, w, c_out,
                                         h_out, w_out, n_blocks, kh, kw, sh, sw, ph, pw, reflect, BLOCK,
                                         num_warps=NUM_WARPS)
    return partial.sum(1)
