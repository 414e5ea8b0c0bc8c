"""Tests of oes_fast.sparse_conv2d (every implementation against F.conv2d on the masked dense
weights) and of oes_fast.sparse.SparseGenerator (against the masked dense OES network).

The same op tests run on every device the machine has: CPU (C++), and CUDA when present
(CUDA C++ or Triton, whichever the build registered). The Triton kernels also run on CPU
tensors through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import oes_fast
from oes_fast import masks, models
from oes_fast.ops import batch_norm_from_stats
from oes_fast.sparse import SparseGenerator, _Conv, sparse_conv2d, to_csr
from cpu_variants import assert_thread_independent
from tolerances import assert_channel_stats, assert_close_to_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MASK_NAMES = ["pepper", "baboon", "barbara"]


# ------------------------------------------------------------------------------ helpers
def stable_seed(*key) -> int:
    """A seed from the test's parameters, the same in every process (hash() of a str is not)."""
    return zlib.crc32(repr(key).encode())


def random_weight(c_out, c_in, k, density, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
    keep = torch.rand(c_out, c_in, k, k, generator=g) < density
    return (w * keep).to(dtype), keep


def reference_conv(x, w, b, stride, padding, mode):
    """F.conv2d on the dense (masked) weight, padding materialized as torch does it."""
    if mode == "reflect" and padding:
        x = F.pad(x, (padding,) * 4, mode="reflect")
        padding = 0
    return F.conv2d(x, w, b, stride=stride, padding=padding)


def op_call(x, w, keep, b, k, stride, padding, mode):
    values, row_ptr, col_idx = to_csr(w, keep)
    return sparse_conv2d(x, values.to(x.device), row_ptr.to(x.device), col_idx.to(x.device), k,
                         None if b is None else b.to(x.device), stride, padding, mode)


# Shapes: (N, C_in, C_out, H, W, k, stride, mode). Odd sizes, one pixel wide interiors, the
# strides and kernels of the OES network (1, 3, 5 with stride 1) plus stride 2.
SHAPES = [
    (1, 3, 5, 7, 9, 3, 1, "reflect"),
    (2, 4, 6, 13, 37, 5, 1, "reflect"),
    (1, 5, 3, 9, 70, 5, 1, "zeros"),
    (1, 6, 4, 21, 19, 1, 1, "reflect"),
    (2, 3, 4, 11, 13, 5, 2, "reflect"),
    (1, 4, 3, 10, 15, 3, 2, "zeros"),
    (1, 2, 3, 4, 4, 5, 1, "reflect"),
    (1, 8, 8, 33, 65, 3, 1, "reflect"),
    # many outputs on few inputs: from density 0.5 the CPU forward reads column-shifted windows
    # (use_shifted_window)
    (1, 2, 16, 10, 70, 3, 1, "reflect"),
]
DENSITIES = [0.0, 0.05, 0.5, 1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sparse_conv2d_matches_dense(shape, density, dtype, device):
    n, c_in, c_out, h, w_, k, stride, mode = shape
    seed = stable_seed(shape, density)
    w, keep = random_weight(c_out, c_in, k, density, torch.float64, seed)
    x = torch.randn(n, c_in, h, w_, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    b = torch.randn(c_out, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    p = (k - 1) // 2
    ref64 = reference_conv(x, w, b, stride, p, mode)
    ref_lowp = reference_conv(x.to(dtype), w.to(dtype), b.to(dtype), stride, p, mode)
    out = op_call(x.to(dtype).to(device), w.to(dtype), keep, b.to(dtype), k, stride, p, mode)
    assert out.dtype == dtype and out.device.type == device
    assert_close_to_reference(out.cpu(), ref64, ref_lowp, name="sparse_conv2d")
    out_nobias = op_call(x.to(dtype).to(device), w.to(dtype), keep, None, k, stride, p, mode)
    assert_close_to_reference(out_nobias.cpu(), reference_conv(x, w, None, stride, p, mode),
                              reference_conv(x.to(dtype), w.to(dtype), None, stride, p, mode), name="no bias")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sparse_conv2d_gradients(shape, density, dtype, device):
    """Input gradient (transposed sparse conv) and weight gradient at the kept taps against
    autograd of F.conv2d on the masked dense weight."""
    n, c_in, c_out, h, w_, k, stride, mode = shape
    seed = stable_seed(shape, density, "grad")
    w, keep = random_weight(c_out, c_in, k, density, torch.float64, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, c_in, h, w_, generator=gen, dtype=torch.float64)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64)
    p = (k - 1) // 2

    def ref_grads(dt):
        xr, wr, br = (t.detach().to(dt).clone().requires_grad_() for t in (x, w, b))
        out = reference_conv(xr, wr, br, stride, p, mode)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64).to(dt)
        out.backward(g)
        return xr.grad, wr.grad.reshape(c_out, -1)[keep.reshape(c_out, -1)], br.grad, g

    gx64, gw64, gb64, g = ref_grads(torch.float64)
    gx_lp, gw_lp, gb_lp, _ = ref_grads(dtype)
    values, row_ptr, col_idx = to_csr(w.to(dtype), keep)
    xs = x.to(dtype).to(device).requires_grad_()
    vs = values.to(device).requires_grad_()
    bs = b.to(dtype).to(device).requires_grad_()
    out = sparse_conv2d(xs, vs, row_ptr.to(device), col_idx.to(device), k, bs, stride, p, mode)
    out.backward(g.to(dtype).to(device))
    assert_close_to_reference(xs.grad.cpu(), gx64, gx_lp, name="input grad")
    assert_close_to_reference(vs.grad.cpu(), gw64, gw_lp, name="weight grad")
    assert_close_to_reference(bs.grad.cpu(), gb64, gb_lp, name="bias grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 3, 4, 5, 7, 3, "reflect"), (2, 4, 3, 4, 4, 3, "reflect"), (1, 2, 3, 6, 5, 5, "zeros"),
                                   (2, 3, 5, 5, 67, 3, "reflect"), (1, 4, 3, 6, 64, 3, "zeros"),
                                   (1, 2, 3, 3, 257, 3, "reflect"), (1, 3, 2, 4, 256, 3, "zeros"),
                                   (1, 2, 12, 4, 64, 3, "reflect")],
                         ids=lambda s: "x".join(map(str, s)))
def test_sparse_conv2d_fused_upsample(shape, dtype, device):
    """upsample=2 reads the input nearest-upsampled: conv(pad(interpolate(x))), with gradients.
    From a stored width of 64 a 3x3 conv runs in its phase form on the CPU (the last five shapes:
    forward and weight gradient), from 256 its input gradient too (the two before the last); the
    last one's phase form reads column-shifted windows (use_shifted_window)."""
    n, c_in, c_out, h, w_, k, mode = shape
    w, keep = random_weight(c_out, c_in, k, 0.4, torch.float64, 9)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(n, c_in, h, w_, generator=gen, dtype=torch.float64)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64)
    p = (k - 1) // 2

    def ref(dt):
        xr, wr = x.to(dt).clone().requires_grad_(), w.to(dt).clone().requires_grad_()
        out = reference_conv(F.interpolate(xr, scale_factor=2, mode="nearest"), wr, b.to(dt), 1, p, mode)
        out.backward(torch.ones_like(out))
        return out.detach(), xr.grad, wr.grad.reshape(c_out, -1)[keep.reshape(c_out, -1)]

    r64, r32 = ref(torch.float64), ref(dtype)
    values, row_ptr, col_idx = (t.to(device) for t in to_csr(w.to(dtype), keep))
    xs = x.to(dtype).to(device).requires_grad_()
    vs = values.clone().requires_grad_()
    out = sparse_conv2d(xs, vs, row_ptr, col_idx, k, b.to(dtype).to(device), 1, p, mode, upsample=2)
    out.backward(torch.ones_like(out))
    for got, e64, elp, name in zip((out, xs.grad, vs.grad), r64, r32, ("forward", "input grad", "weight grad")):
        assert_close_to_reference(got.detach().cpu(), e64, elp, name=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_conv2d_fused_upsample_streamed_output(dtype):
    """The phase form writes an output of at least 4x the core's L2 with streaming stores (the
    AVX-512 copy; the others store as usual): a 2048 x 1018 output of 4 channels (33 MB in
    float32, 67 MB in float64: above 4x an L2 of 4 MB), rows of 1018 values (a partial last
    vector; in float32 one row in eight starts on a cache line, where the streaming stores run),
    against the reference, with the statistics of sparse_conv2d_stats."""
    n, c_in, c_out, h, w_ = 1, 3, 4, 1024, 509
    w, keep = random_weight(c_out, c_in, 3, 0.4, torch.float64, 21)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(n, c_in, h, w_, generator=gen, dtype=torch.float64)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        refs = [reference_conv(F.interpolate(x.to(dt), scale_factor=2, mode="nearest"), w.to(dt), b.to(dt), 1, 1,
                               "reflect") for dt in (torch.float64, dtype)]
        values, row_ptr, col_idx = to_csr(w.to(dtype), keep)
        out = sparse_conv2d(x.to(dtype), values, row_ptr, col_idx, 3, b.to(dtype), 1, 1, "reflect", upsample=2)
        y, stats = torch.ops.oes_fast.sparse_conv2d_stats(x.to(dtype), values, row_ptr, col_idx, b.to(dtype), [3, 3],
                                                          [1, 1], "reflect", 2)
    assert out.shape == (n, c_out, 2 * h, 2 * w_) and out.element_size() * out.numel() >= 16 * 2**20
    assert_close_to_reference(out, refs[0], refs[1], name="forward")
    assert torch.equal(y, out)
    r = refs[0].transpose(0, 1).reshape(c_out, -1)
    torch.testing.assert_close(stats, torch.stack([r.sum(1), (r * r).sum(1)], 1), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("upsample, size", [(1, (6, 7)), (2, (3, 65))])
def test_sparse_conv2d_gradcheck(upsample, size):
    """Gradients of the op; with upsample=2 at a stored width of 64 and more the CPU runs the 3x3
    conv in its phase form (the four output phases as one conv of the stored input,
    csrc/cpu/sparse_conv2d_kernels.h), checked by opcheck as well."""
    w, keep = random_weight(3, 2, 3, 0.6, torch.float64, 5)
    values, row_ptr, col_idx = to_csr(w, keep)
    x = torch.randn(1, 2, *size, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    values.requires_grad_()
    for mode in ("reflect", "zeros"):
        assert torch.autograd.gradcheck(
            lambda x, v, b: sparse_conv2d(x, v, row_ptr, col_idx, 3, b, 1, 1, mode, upsample=upsample), (x, values, b),
            fast_mode=upsample > 1)
        if upsample > 1:
            torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d.default,
                                  (x, values, row_ptr, col_idx, b, [3, 3], [1, 1], [1, 1], mode, upsample))


def test_sparse_conv2d_opcheck():
    w, keep = random_weight(4, 3, 5, 0.3, torch.float32, 7)
    values, row_ptr, col_idx = to_csr(w, keep)
    x = torch.randn(2, 3, 9, 11)
    b = torch.randn(4)
    args = (x, values, row_ptr, col_idx, b, [5, 5], [1, 1], [2, 2], "reflect")
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d.default, args)
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d.default,
                          (x.requires_grad_(), values.requires_grad_(), row_ptr, col_idx, b.requires_grad_(), [5, 5],
                           [2, 2], [2, 2], "zeros"))
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d.default,
                          (x.detach()[:, :, :5, :6].requires_grad_(), values, row_ptr, col_idx, b, [5, 5], [1, 1],
                           [2, 2], "reflect", 2))
    g = torch.randn(2, 4, 9, 11)
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d_input_grad.default,
                          (g, values.detach(), row_ptr, col_idx, [2, 3, 9, 11], [5, 5], [1, 1], [2, 2], "reflect"))
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d_weight_grad.default,
                          (g, x.detach(), row_ptr, col_idx, [5, 5], [1, 1], [2, 2], "reflect"))
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d_weight_grad.default,
                          (torch.randn(2, 4, 10, 12), x.detach()[:, :, :5, :6], row_ptr, col_idx, [5, 5], [1, 1],
                           [2, 2], "reflect", 2))
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d_input_grad.default,
                          (torch.randn(2, 4, 10, 12), values.detach(), row_ptr, col_idx, [2, 3, 5, 6], [5, 5], [1, 1],
                           [2, 2], "reflect", 2))


@pytest.mark.parametrize("upsample", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_input_grad_fused_upsample_sums_the_blocks(upsample, stride, mode):
    """The input gradient with upsample=u comes back at the stored size: each stored pixel the sum
    of its u x u block of the upsampled input's gradient (float64; the summation order differs)."""
    w, keep = random_weight(5, 3, 3, 0.4, torch.float64, 23)
    values, row_ptr, col_idx = to_csr(w, keep)
    gen = torch.Generator().manual_seed(24)
    n, c, h, w_ = 2, 3, 7, 11
    hu, wu = h * upsample, w_ * upsample
    g = torch.randn(n, 5, (hu + 2 - 3) // stride + 1, (wu + 2 - 3) // stride + 1, generator=gen, dtype=torch.float64)
    op = torch.ops.oes_fast.sparse_conv2d_input_grad
    fused = op(g, values, row_ptr, col_idx, [n, c, h, w_], [3, 3], [stride] * 2, [1, 1], mode, upsample)
    full = op(g, values, row_ptr, col_idx, [n, c, hu, wu], [3, 3], [stride] * 2, [1, 1], mode)
    expected = full.view(n, c, h, upsample, w_, upsample).sum((3, 5))
    assert fused.shape == (n, c, h, w_)
    torch.testing.assert_close(fused, expected, rtol=1e-13, atol=1e-13 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_weight_grad_fused_upsample_is_weight_grad_of_upsampled(dtype, stride, mode):
    """The weight gradient with upsample=2 reads the stored input through the upsampling: the same
    bits as the weight gradient of the upsampled input (same taps, same values, same sums). Below
    a stored width of 64: from there a 3x3 conv runs in its phase form, which sums differently."""
    w, keep = random_weight(5, 3, 3, 0.4, dtype, 21)
    _, row_ptr, col_idx = to_csr(w, keep)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(2, 3, 13, 37, generator=gen, dtype=dtype)  # 37: odd, so the last stored column is split
    xu = F.interpolate(x, scale_factor=2, mode="nearest")
    h_out, w_out = ((xu.shape[2] + 2 - 3) // stride + 1, (xu.shape[3] + 2 - 3) // stride + 1)
    g = torch.randn(2, 5, h_out, w_out, generator=gen, dtype=dtype)
    op = torch.ops.oes_fast.sparse_conv2d_weight_grad
    fused = op(g, x, row_ptr, col_idx, [3, 3], [stride] * 2, [1, 1], mode, 2)
    assert torch.equal(fused, op(g, xu, row_ptr, col_idx, [3, 3], [stride] * 2, [1, 1], mode))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", [(9, 11), (20, 70)])
@pytest.mark.parametrize("upsample", [1, 2])
def test_sparse_conv2d_stats(size, upsample, dtype):
    """The CPU forward with batch-norm statistics in the epilogue: same output, and per channel
    the sum and sum of squares of it."""
    w, keep = random_weight(5, 3, 3, 0.4, dtype, 13)
    values, row_ptr, col_idx = to_csr(w, keep)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    b = torch.randn(5, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    out, stats = torch.ops.oes_fast.sparse_conv2d_stats(x.to(dtype), values, row_ptr, col_idx, b.to(dtype), [3, 3],
                                                        [1, 1], "reflect", upsample)
    ref = reference_conv(F.interpolate(x, scale_factor=upsample, mode="nearest"), w.double(), b, 1, 1, "reflect")
    assert torch.equal(out, sparse_conv2d(x.to(dtype), values, row_ptr, col_idx, 3, b.to(dtype), 1, 1, "reflect",
                                          upsample))
    assert stats.dtype == torch.float64 and stats.shape == (5, 2)
    assert_channel_stats(stats, out, dtype, "stats")
    assert_close_to_reference(out, ref, name="stats forward")
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d_stats.default,
                          (x.to(dtype), values, row_ptr, col_idx, b.to(dtype), [3, 3], [1, 1], "reflect", upsample))


@pytest.mark.parametrize("upsample", [1, 2])
def test_sparse_conv2d_stats_then_batch_norm_gradcheck(upsample):
    """Training through the fused statistics: sparse_conv2d_stats followed by
    batch_norm_from_stats is F.batch_norm (training mode) of the conv, and its gradients in the
    input, the values, the bias and the batch-norm scale and shift pass gradcheck (float64)."""
    w, keep = random_weight(4, 3, 3, 0.5, torch.float64, 41)
    values, row_ptr, col_idx = to_csr(w, keep)
    g = torch.Generator().manual_seed(42)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    values.requires_grad_()

    def fused(x, v, b, gamma, beta):
        out, stats = torch.ops.oes_fast.sparse_conv2d_stats(x, v, row_ptr, col_idx, b, [3, 3], [1, 1], "reflect",
                                                            upsample)
        return batch_norm_from_stats(out, stats, gamma, beta, 1e-5)

    conv = sparse_conv2d(x, values, row_ptr, col_idx, 3, b, 1, 1, "reflect", upsample)
    ref = F.batch_norm(conv, None, None, gamma, beta, True, 0.0, 1e-5)
    got = fused(x, values, b, gamma, beta)
    assert_close_to_reference(got, ref, floor=1e-12, name="batch norm from stats")
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    args = (x, values, b, gamma, beta)
    grads, ref_grads = torch.autograd.grad(got, args, go), torch.autograd.grad(ref, args, go)
    # the conv bias's gradient is 0 up to rounding (a bias before batch norm): floor on the largest
    largest = max(float(r.abs().max()) for r in ref_grads)
    for a, r in zip(grads, ref_grads):
        assert_close_to_reference(a, r, floor=1e-12, scale=largest, name="batch norm from stats, gradient")
    assert torch.autograd.gradcheck(fused, args)
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d_stats.default,
                          (x, values, row_ptr, col_idx, b, [3, 3], [1, 1], "reflect", upsample))
    with pytest.raises(ValueError, match="stats must be float64"):
        batch_norm_from_stats(got, torch.zeros(3, 2, dtype=torch.float64), gamma, beta, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3, 4, 9, 67, 5, "reflect"), (1, 5, 3, 12, 20, 3, "zeros"),
                                   (1, 2, 3, 7, 5, 5, "reflect"), (1, 4, 2, 6, 33, 1, "reflect"),
                                   (1, 3, 5, 8, 70, 5, "zeros"), (1, 2, 3, 4, 3, 5, "reflect"),
                                   (1, 3, 2, 10, 261, 5, "reflect")],
                         ids=lambda s: "x".join(map(str, s)))
def test_sparse_conv2d_pool_stats(shape, dtype):
    """A size-keeping conv with 2x2 average pooling after it, computed as one conv of the stride-2
    phases of the input's box mean: the pooled output (odd last rows/columns dropped), its
    batch-norm statistics, and the input, weight and bias gradients against the reference conv +
    F.avg_pool2d."""
    n, c_in, c_out, h, w_, k, mode = shape
    w, keep = random_weight(c_out, c_in, k, 0.4, torch.float64, stable_seed(shape))
    gen = torch.Generator().manual_seed(stable_seed(shape, "x"))
    x = torch.randn(n, c_in, h, w_, generator=gen, dtype=torch.float64)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64)
    g = torch.randn(n, c_out, h // 2, w_ // 2, generator=gen, dtype=torch.float64)
    p = (k - 1) // 2

    def ref(dt):
        xr, wr, br = (t.to(dt).clone().requires_grad_() for t in (x, w, b))
        out = F.avg_pool2d(reference_conv(xr, wr, br, 1, p, mode), 2)
        out.backward(g.to(dt))
        return out.detach(), xr.grad, wr.grad.reshape(c_out, -1)[keep.reshape(c_out, -1)], br.grad

    r64, rlp = ref(torch.float64), ref(dtype)
    values, row_ptr, col_idx = to_csr(w.to(dtype), keep)
    xs, vs, bs = (t.clone().requires_grad_() for t in (x.to(dtype), values, b.to(dtype)))
    out, stats = torch.ops.oes_fast.sparse_conv2d_pool_stats(xs, vs, row_ptr, col_idx, bs, [k, k], [p, p], mode)
    out.backward(g.to(dtype))
    for got, e64, elp, name in zip((out.detach(), xs.grad, vs.grad, bs.grad), r64, rlp,
                                   ("forward", "input grad", "weight grad", "bias grad")):
        assert_close_to_reference(got, e64, elp, name=name)
    assert_channel_stats(stats, out.detach(), dtype, "pool stats")
    assert_thread_independent(
        lambda: dict(zip(("out", "stats"), torch.ops.oes_fast.sparse_conv2d_pool_stats(
            x.to(dtype), values, row_ptr, col_idx, b.to(dtype), [k, k], [p, p], mode)),
            weight_grad=torch.ops.oes_fast.sparse_conv2d_pool_weight_grad(
                g.to(dtype), x.to(dtype), row_ptr, col_idx, [k, k], [p, p], mode),
            input_grad=torch.ops.oes_fast.sparse_conv2d_pool_input_grad(
                g.to(dtype), values, row_ptr, col_idx, list(x.shape), [k, k], [p, p], mode)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_conv_autograd_gives_the_gradient_ops_bits(dtype):
    """The C++ autograd of sparse_conv2d, sparse_conv2d_stats (upsampled too) and
    sparse_conv2d_pool_stats (csrc/sparse_conv2d_autograd.cpp) returns the bits of the gradient
    ops called directly, and the bias gradient summed in float64."""
    ops = torch.ops.oes_fast
    w, keep = random_weight(4, 3, 3, 0.5, dtype, 41)
    values, row_ptr, col_idx = to_csr(w, keep)
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(2, 3, 8, 10, generator=gen, dtype=dtype)
    b = torch.randn(4, generator=gen, dtype=dtype)
    k, p = [3, 3], [1, 1]
    cases = {
        "conv": (lambda *a: ops.sparse_conv2d(*a, k, [1, 1], p, "reflect", 1), 1, False),
        "stats": (lambda *a: ops.sparse_conv2d_stats(*a, k, p, "reflect", 1)[0], 1, False),
        "stats upsampled": (lambda *a: ops.sparse_conv2d_stats(*a, k, p, "reflect", 2)[0], 2, False),
        "pool stats": (lambda *a: ops.sparse_conv2d_pool_stats(*a, k, p, "reflect")[0], 1, True),
    }
    for name, (fn, u, pooled) in cases.items():
        xs, vs, bs = (t.clone().requires_grad_() for t in (x, values, b))
        out = fn(xs, vs, row_ptr, col_idx, bs)
        g = torch.randn(out.shape, generator=gen, dtype=dtype)
        got = torch.autograd.grad(out, (xs, vs, bs), g)
        if pooled:
            want_x = ops.sparse_conv2d_pool_input_grad(g, values, row_ptr, col_idx, list(x.shape), k, p, "reflect")
            want_v = ops.sparse_conv2d_pool_weight_grad(g, x, row_ptr, col_idx, k, p, "reflect")
        else:
            want_x = ops.sparse_conv2d_input_grad(g, values, row_ptr, col_idx, list(x.shape), k, [1, 1], p, "reflect", u)
            want_v = ops.sparse_conv2d_weight_grad(g, x, row_ptr, col_idx, k, [1, 1], p, "reflect", u)
        want_b = g.sum((0, 2, 3), dtype=torch.float64).to(dtype)
        for got_t, want_t, what in zip(got, (want_x, want_v, want_b), ("input", "values", "bias")):
            assert torch.equal(got_t, want_t), f"{name}: {what} gradient"


def test_sparse_conv2d_pool_stats_gradcheck_and_opcheck():
    w, keep = random_weight(3, 2, 5, 0.4, torch.float64, 31)
    values, row_ptr, col_idx = to_csr(w, keep)
    x = torch.randn(1, 2, 7, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    values.requires_grad_()
    for mode in ("reflect", "zeros"):
        assert torch.autograd.gradcheck(
            lambda x, v, b: torch.ops.oes_fast.sparse_conv2d_pool_stats(x, v, row_ptr, col_idx, b, [5, 5], [2, 2],
                                                                        mode)[0], (x, values, b))
        torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d_pool_stats.default,
                              (x, values, row_ptr, col_idx, b, [5, 5], [2, 2], mode))
    g = torch.randn(1, 3, 3, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d_pool_weight_grad.default,
                          (g, x.detach(), row_ptr, col_idx, [5, 5], [2, 2], "reflect"))
    torch.library.opcheck(torch.ops.oes_fast.sparse_conv2d_pool_input_grad.default,
                          (g, values.detach(), row_ptr, col_idx, [1, 2, 7, 9], [5, 5], [2, 2], "zeros"))


@pytest.mark.parametrize("form", ["conv", "upsampled", "pooled"])
def test_batch_norm_act_sparse_conv2d_gradcheck_and_opcheck(form):
    """The batch norm + LeakyReLU made in the conv's input load (batch_norm_act_sparse_conv2d and
    its two kernel ops): gradcheck in x, the batch norm's weight and bias, the conv's values and
    bias (float64, statistics computed and given, both padding modes), and opcheck of the three
    ops. Their values against oes_fast.reference, and the bits of the unfused ops, are checked
    under every instruction set in test_cpu_isa.py."""
    ops = torch.ops.oes_fast
    k = 5 if form == "pooled" else 3
    up, pool = (2, False) if form == "upsampled" else (1, form == "pooled")
    w, keep = random_weight(3, 2, k, 0.5, torch.float64, stable_seed("act", form))
    values, row_ptr, col_idx = to_csr(w, keep)
    gen = torch.Generator().manual_seed(stable_seed("act inputs", form))
    x = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64) * 2 + 0.3
    gamma = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    beta = torch.randn(2, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    conv = ([k, k], [(k - 1) // 2] * 2)
    for mode in ("reflect", "zeros"):
        for given in (False, True):
            leaves = [t.clone().requires_grad_() for t in (x, gamma, beta, values, b)]

            def fn(x_, g_, b_, v_, cb_):
                # given statistics are x's (the gradient flows through them as batch statistics)
                stats = ops.batch_norm_stats(x_.detach()) if given else None
                return ops.batch_norm_act_sparse_conv2d(x_, stats, g_, b_, 1e-5, 0.2, v_, row_ptr, col_idx, cb_, *conv,
                                                        mode, up, pool)[0]

            assert torch.autograd.gradcheck(fn, leaves)
            torch.library.opcheck(ops.batch_norm_act_sparse_conv2d.default,
                                  (leaves[0], ops.batch_norm_stats(x) if given else None, *leaves[1:3], 1e-5, 0.2,
                                   leaves[3], row_ptr, col_idx, leaves[4], *conv, mode, up, pool))
    _, _, scale, shift = ops.batch_norm_constants(ops.batch_norm_stats(x), x.numel() // 2, gamma, beta, 1e-5)
    out, _ = ops.sparse_conv2d_act_stats(x, scale, shift, 0.2, values, row_ptr, col_idx, b, *conv, "reflect", up, pool)
    torch.library.opcheck(ops.sparse_conv2d_act_stats.default,
                          (x, scale, shift, 0.2, values, row_ptr, col_idx, b, *conv, "reflect", up, pool))
    torch.library.opcheck(ops.sparse_conv2d_act_weight_grad.default,
                          (torch.randn_like(out), x, scale, shift, 0.2, row_ptr, col_idx, *conv, "reflect", up, pool))


@pytest.mark.parametrize("form", ["conv", "upsampled", "pooled"])
def test_batch_norm_act_norm_sparse_conv2d_gradcheck_and_opcheck(form):
    """A batch norm + LeakyReLU, then a second batch norm, made in the conv's input load
    (batch_norm_act_norm_sparse_conv2d; the post_scale / post_shift of the two kernel ops, and
    batch_norm_act_stats): gradcheck in x, both batch norms' weights and biases, the conv's values
    and bias (float64, the first batch norm's statistics computed and given, both padding modes),
    the output against oes_fast.reference, and opcheck of the ops. The bits of the three ops it
    replaces are checked under every instruction set in test_cpu_isa.py."""
    ops = torch.ops.oes_fast
    k = 5 if form == "pooled" else 3
    up, pool = (2, False) if form == "upsampled" else (1, form == "pooled")
    w, keep = random_weight(3, 2, k, 0.5, torch.float64, stable_seed("pair", form))
    values, row_ptr, col_idx = to_csr(w, keep)
    gen = torch.Generator().manual_seed(stable_seed("pair inputs", form))
    x = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64) * 2 + 0.3
    gamma, gamma2 = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    beta, beta2 = (torch.randn(2, generator=gen, dtype=torch.float64) for _ in range(2))
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    conv = ([k, k], [(k - 1) // 2] * 2)
    ref = oes_fast.reference
    norm = ref.batch_norm_leaky_relu(ref.batch_norm_leaky_relu(x, gamma, beta, 1e-5, 0.2), gamma2, beta2, 1e-3, 1.0)
    expected = ref.sparse_conv2d(norm, values, row_ptr, col_idx, k, b, 1, (k - 1) // 2, "reflect", up)
    if pool:
        expected = F.avg_pool2d(expected, 2)
    got = ops.batch_norm_act_norm_sparse_conv2d(x, None, gamma, beta, 1e-5, 0.2, gamma2, beta2, 1e-3, values, row_ptr,
                                                col_idx, b, *conv, "reflect", up, pool)[0]
    assert_close_to_reference(got, expected, name=f"pair {form}")
    for mode in ("reflect", "zeros"):
        for given in (False, True):
            leaves = [t.clone().requires_grad_() for t in (x, gamma, beta, gamma2, beta2, values, b)]

            def fn(x_, g_, b_, g2_, b2_, v_, cb_):
                stats = ops.batch_norm_stats(x_.detach()) if given else None
                return ops.batch_norm_act_norm_sparse_conv2d(x_, stats, g_, b_, 1e-5, 0.2, g2_, b2_, 1e-3, v_, row_ptr,
                                                             col_idx, cb_, *conv, mode, up, pool)[0]

            assert torch.autograd.gradcheck(fn, leaves)
            torch.library.opcheck(ops.batch_norm_act_norm_sparse_conv2d.default,
                                  (leaves[0], ops.batch_norm_stats(x) if given else None, *leaves[1:3], 1e-5, 0.2,
                                   *leaves[3:5], 1e-3, leaves[5], row_ptr, col_idx, leaves[6], *conv, mode, up, pool))
    _, _, scale, shift = ops.batch_norm_constants(ops.batch_norm_stats(x), x.numel() // 2, gamma, beta, 1e-5)
    act = ops.batch_norm_leaky_relu(x, scale, shift, 0.2)
    assert torch.equal(ops.batch_norm_act_stats(x, scale, shift, 0.2), ops.batch_norm_stats(act))
    torch.library.opcheck(ops.batch_norm_act_stats.default, (x, scale, shift, 0.2))
    _, _, scale2, shift2 = ops.batch_norm_constants(ops.batch_norm_stats(act), x.numel() // 2, gamma2, beta2, 1e-3)
    out, _ = ops.sparse_conv2d_act_stats(x, scale, shift, 0.2, values, row_ptr, col_idx, b, *conv, "reflect", up, pool,
                                         scale2, shift2)
    torch.library.opcheck(ops.sparse_conv2d_act_stats.default,
                          (x, scale, shift, 0.2, values, row_ptr, col_idx, b, *conv, "reflect", up, pool, scale2,
                           shift2))
    torch.library.opcheck(ops.sparse_conv2d_act_weight_grad.default,
                          (torch.randn_like(out), x, scale, shift, 0.2, row_ptr, col_idx, *conv, "reflect", up, pool,
                           scale2, shift2))


def test_fused_batch_norm_ops_without_autograd():
    """The fused batch-norm ops run their composition without the autograd function where no
    gradient is wanted (grad mode off, or no input requiring one): the same bits as through the
    function, outputs without a graph; a gamma that wants a gradient still gets one. And
    batch_norm_constants reads float32 weight and bias as their float64 values (the same bits)."""
    ops = torch.ops.oes_fast
    w, keep = random_weight(3, 2, 3, 0.5, torch.float32, stable_seed("no grad"))
    values, row_ptr, col_idx = to_csr(w, keep)
    gen = torch.Generator().manual_seed(stable_seed("no grad inputs"))
    x = torch.randn(2, 2, 6, 7, generator=gen) * 2 + 0.3
    gamma, gamma2 = (torch.rand(2, generator=gen) + 0.5 for _ in range(2))
    beta, beta2 = (torch.randn(2, generator=gen) for _ in range(2))
    head_w, b = torch.randn(3, 2, generator=gen), torch.randn(3, generator=gen)
    conv = ([3, 3], [1, 1], "reflect", 1, False)
    calls = {
        "batch_norm_act": lambda g: ops.batch_norm_act(x, None, g, beta, 1e-5, 0.2),
        "batch_norm_act_conv1x1": lambda g: ops.batch_norm_act_conv1x1(x, None, g, beta, 1e-5, 0.2, head_w, b),
        "batch_norm_act_sparse_conv2d": lambda g: ops.batch_norm_act_sparse_conv2d(
            x, None, g, beta, 1e-5, 0.2, values, row_ptr, col_idx, b, *conv),
        "batch_norm_act_norm_sparse_conv2d": lambda g: ops.batch_norm_act_norm_sparse_conv2d(
            x, None, g, beta, 1e-5, 0.2, gamma2, beta2, 1e-3, values, row_ptr, col_idx, b, *conv),
    }
    for name, call in calls.items():
        def outputs(g):
            out = call(g)
            return list(out) if isinstance(out, (tuple, list)) else [out]

        with torch.no_grad():
            off = outputs(gamma.clone().requires_grad_())
        unwanted = outputs(gamma)  # grad mode on, nothing requires a gradient
        wanted = outputs(gamma.clone().requires_grad_())
        assert wanted[0].grad_fn is not None, name
        for a, c, d in zip(off, unwanted, wanted):
            assert not a.requires_grad and not c.requires_grad, name
            assert torch.equal(a, d) and torch.equal(c, d), name
    stats = ops.batch_norm_stats(x)
    for got, expected in zip(ops.batch_norm_constants(stats, 84, gamma, beta, 1e-5),
                             ops.batch_norm_constants(stats, 84, gamma.double(), beta.double(), 1e-5)):
        assert torch.equal(got, expected)


def test_batch_norm_act_sparse_conv2d_rejects_bad_arguments():
    ops = torch.ops.oes_fast
    w, keep = random_weight(4, 3, 3, 0.5, torch.float32, 5)
    values, row_ptr, col_idx = to_csr(w, keep)
    x = torch.randn(1, 3, 8, 8)
    scale, shift = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    conv = ([3, 3], [1, 1], "reflect")
    with pytest.raises(RuntimeError, match="must be contiguous float64 vectors of C_in = 3"):
        ops.sparse_conv2d_act_stats(x, scale.float(), shift, 0.2, values, row_ptr, col_idx, None, *conv, 1, False)
    with pytest.raises(RuntimeError, match="C_in = 3"):
        ops.sparse_conv2d_act_weight_grad(torch.randn(1, 4, 8, 8), x, scale[:2], shift[:2], 0.2, row_ptr, col_idx,
                                          *conv, 1, False)
    with pytest.raises(RuntimeError, match="pool takes no upsampling"):
        ops.sparse_conv2d_act_stats(x, scale, shift, 0.2, values, row_ptr, col_idx, None, *conv, 2, True)
    with pytest.raises(ValueError, match="CPU float32 or float64 tensor, got torch.float16"):
        oes_fast.ops.batch_norm_leaky_relu_sparse_conv2d(x.half(), None, torch.ones(3), torch.zeros(3), 1e-5, 0.2,
                                                         values, row_ptr, col_idx, None, [3, 3], [1, 1])
    with pytest.raises(ValueError, match="stats must be float64 of shape"):
        oes_fast.ops.batch_norm_leaky_relu_sparse_conv2d(x, torch.zeros(3, 2), torch.ones(3), torch.zeros(3), 1e-5,
                                                         0.2, values, row_ptr, col_idx, None, [3, 3], [1, 1])
    with pytest.raises(RuntimeError, match="post_scale and post_shift are given together"):
        ops.sparse_conv2d_act_stats(x, scale, shift, 0.2, values, row_ptr, col_idx, None, *conv, 1, False, scale)
    with pytest.raises(RuntimeError, match=r"\(and post_scale, post_shift\) must be contiguous float64 vectors"):
        ops.sparse_conv2d_act_weight_grad(torch.randn(1, 4, 8, 8), x, scale, shift, 0.2, row_ptr, col_idx, *conv, 1,
                                          False, scale[:2], shift[:2])
    with pytest.raises(ValueError, match="batch_norm_leaky_relu_batch_norm_sparse_conv2d: x must be a CPU float32"):
        oes_fast.ops.batch_norm_leaky_relu_batch_norm_sparse_conv2d(
            x.half(), None, torch.ones(3), torch.zeros(3), 1e-5, 0.2, torch.ones(3), torch.zeros(3), 1e-5, values,
            row_ptr, col_idx, None, [3, 3], [1, 1])
    with pytest.raises(RuntimeError, match="batch_norm_act_stats: scale must be a float64 vector of C = 3"):
        ops.batch_norm_act_stats(x, scale.float(), shift, 0.2)


@pytest.mark.parametrize("pooled, narrow", [(False, False), (True, False), (False, True)],
                         ids=["conv", "pooled", "narrow"])
def test_sparse_conv2d_several_row_tiles(pooled, narrow):
    """Inputs wide and deep enough that the halo kernels split the rows into several tiles (their
    halo budget holds a few rows; tiles are at least 32 rows): forward, statistics, input and
    weight gradients against the reference across the tile boundaries, float64. Narrow: rows of
    fewer than 4 vectors (the forward's planes, forward_kernel's `flat`), many channels, 150 rows."""
    c_in, c_out, h, w_ = (32, 3, 150, 300) if pooled else (96, 5, 150, 20) if narrow else (64, 4, 75, 300)
    w, keep = random_weight(c_out, c_in, 5, 0.05, torch.float64, stable_seed("tiles", pooled, *["narrow"] * narrow))
    gen = torch.Generator().manual_seed(stable_seed("tiles x", pooled, *["narrow"] * narrow))
    x = torch.randn(1, c_in, h, w_, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = reference_conv(x, w.requires_grad_(), b, 1, 2, "reflect")
    if pooled:
        ref = F.avg_pool2d(ref, 2)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    values, row_ptr, col_idx = to_csr(w.detach(), keep)
    values.requires_grad_()
    if pooled:
        out, stats = torch.ops.oes_fast.sparse_conv2d_pool_stats(x, values, row_ptr, col_idx, b, [5, 5], [2, 2],
                                                                 "reflect")
    else:
        out, stats = torch.ops.oes_fast.sparse_conv2d_stats(x, values, row_ptr, col_idx, b, [5, 5], [2, 2],
                                                            "reflect", 1)
        out = torch.ops.oes_fast.sparse_conv2d(x, values, row_ptr, col_idx, b, [5, 5], [1, 1], [2, 2], "reflect", 1)
    grads = torch.autograd.grad(out, (x, values, b), g)
    assert_close_to_reference(out.detach(), ref.detach(), name="forward")
    assert_channel_stats(stats, ref.detach(), torch.float64, "stats")
    for got, r, name in zip(grads, (ref_grads[0], ref_grads[1].reshape(c_out, -1)[keep.reshape(c_out, -1)],
                                    ref_grads[2]), ("input grad", "weight grad", "bias grad")):
        assert_close_to_reference(got, r, name=name)


@pytest.mark.parametrize("width", [70, 64, 32, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_conv2d_channel_pairs(dtype, width):
    """The phase form's output-channel pairs (ChannelPairs, AVX-512 copy): a 3x3 upsampled conv
    whose taps are dense enough (0.7) that the same phases of consecutive output channels share
    most positions, 7 output channels (three pairs and one alone) and 11 rows (after the blocks of
    4 or 8 rows, two and a last single one);
    a stored width of 70 (the rows' last vector partial), of 64 (whole blocks of 2 vectors,
    which read block windows, 4 rows at a time), of 32 (one block window wide) or of 16 (one
    float32 vector, block windows of 8 rows; the last two only the forward runs in the phase
    form, use_phases_forward): forward and statistics against the reference,
    the same bits on 1 and 2 threads; and a NaN in one input pixel reaches only the outputs whose
    taps read it (a pair adds only each channel's own taps)."""
    w, keep = random_weight(7, 6, 3, 0.7, torch.float64, stable_seed("pairs"))
    gen = torch.Generator().manual_seed(stable_seed("pairs x"))
    x = torch.randn(2, 6, 11, width, generator=gen, dtype=torch.float64)
    b = torch.randn(7, generator=gen, dtype=torch.float64)
    values, row_ptr, col_idx = to_csr(w.to(dtype), keep)
    conv = ([3, 3], [1, 1], "reflect", 2)

    def run(xin):
        out, stats = torch.ops.oes_fast.sparse_conv2d_stats(xin.to(dtype), values, row_ptr, col_idx, b.to(dtype),
                                                            *conv)
        return {"out": out, "stats": stats}

    def ref(xin):
        return reference_conv(F.interpolate(xin, scale_factor=2, mode="nearest"), w, b, 1, 1, "reflect")

    got = run(x)
    assert_close_to_reference(got["out"], ref(x), name="forward")
    assert_channel_stats(got["stats"], got["out"].double(), dtype, "stats")
    assert_thread_independent(run, x)
    x_nan = x.clone()
    x_nan[1, 2, 3, 40 if width > 40 else width // 2 + 4] = float("nan")
    # (not the reference's NaNs: its dense weight multiplies the NaN by the zeros too)
    reads_nan = reference_conv(F.interpolate(x_nan.isnan().double(), scale_factor=2, mode="nearest"),
                               keep.double(), None, 1, 1, "reflect") > 0
    assert reads_nan.any() and not reads_nan.all()
    assert torch.equal(run(x_nan)["out"].isnan(), reads_nan)


def test_structure_plans_follow_the_structure():
    """The kernels keep what they derive from a weight's structure (the phase form's plan, the
    output-channel pairs, the pooled taps: csrc/cpu/structure_cache.h) between calls. New values
    on the same structure, and then a new structure written into the same row_ptr / col_idx
    tensors (same address, same tap counts per channel), must each give the reference's result:
    a plan found by where the structure lives rather than by what it is would fail here."""
    def moved(keep, seed):  # the same taps per output channel, at other positions
        gen = torch.Generator().manual_seed(seed)
        flat = keep.reshape(keep.shape[0], -1)
        return torch.stack([row[torch.randperm(row.numel(), generator=gen)] for row in flat]).reshape(keep.shape)

    gen = torch.Generator().manual_seed(stable_seed("structure plans"))
    # the phase form with pairs (upsampled 3x3, stored width 64) and the pooled form (5x5)
    for k, upsample, pooled in ((3, 2, False), (5, 1, True)):
        w, keep = random_weight(6, 5, k, 0.6, torch.float64, stable_seed("structure plans", k))
        x = torch.randn(1, 5, 8, 64, generator=gen, dtype=torch.float64)
        b = torch.randn(6, generator=gen, dtype=torch.float64)
        p = (k - 1) // 2
        values, row_ptr, col_idx = to_csr(w, keep)

        def run():
            if pooled:
                return torch.ops.oes_fast.sparse_conv2d_pool_stats(x, values, row_ptr, col_idx, b, [k, k], [p, p],
                                                                   "reflect")[0]
            return torch.ops.oes_fast.sparse_conv2d_stats(x, values, row_ptr, col_idx, b, [k, k], [p, p], "reflect",
                                                          upsample)[0]

        def ref(weight):
            xin = F.interpolate(x, scale_factor=upsample, mode="nearest") if upsample > 1 else x
            out = reference_conv(xin, weight, b, 1, p, "reflect")
            return F.avg_pool2d(out, 2) if pooled else out

        assert_close_to_reference(run(), ref(w), name="first call")
        w2 = torch.randn(w.shape, generator=gen, dtype=torch.float64) * keep
        values.copy_(to_csr(w2, keep)[0])
        assert_close_to_reference(run(), ref(w2), name="new values")
        keep3 = moved(keep, stable_seed("structure plans moved", k))
        w3 = torch.randn(w.shape, generator=gen, dtype=torch.float64) * keep3
        v3, rp3, ci3 = to_csr(w3, keep3)
        assert torch.equal(rp3, row_ptr) and not torch.equal(ci3, col_idx)
        pointers = (values.data_ptr(), row_ptr.data_ptr(), col_idx.data_ptr())
        values.copy_(v3)
        col_idx.copy_(ci3)
        assert pointers == (values.data_ptr(), row_ptr.data_ptr(), col_idx.data_ptr())
        assert_close_to_reference(run(), ref(w3), name="new structure in the same tensors")


# Runs in a subprocess (the L2 size is read once per process): the pooled ops on the inputs in
# argv[1], 1 and 2 threads, float32 and float64, saved to argv[2].
POOL_SLICE_WORKER = r"""
import sys
import torch
import oes_fast  # noqa: F401  (registers the operators)

ops = torch.ops.oes_fast
t = torch.load(sys.argv[1])
conv = ([5, 5], [2, 2], "reflect")
out = {}
for threads in (1, 2):
    torch.set_num_threads(threads)
    for dtype in (torch.float32, torch.float64):
        x, v, b, g = (t[n].to(dtype) for n in ("x", "values", "bias", "grad"))
        key = f"{threads} threads, {dtype}"
        out[key + ": out"], out[key + ": stats"] = ops.sparse_conv2d_pool_stats(x, v, t["row_ptr"], t["col_idx"],
                                                                              b, *conv)
        out[key + ": weight grad"] = ops.sparse_conv2d_pool_weight_grad(g, x, t["row_ptr"], t["col_idx"], *conv)
        # a batch norm's apply and LeakyReLU in the input load
        act = (t["scale"], t["shift"], 0.2)
        out[key + ": act out"], out[key + ": act stats"] = ops.sparse_conv2d_act_stats(
            x, *act, v, t["row_ptr"], t["col_idx"], b, [5, 5], [2, 2], "reflect", 1, True)
        out[key + ": act weight grad"] = ops.sparse_conv2d_act_weight_grad(
            g, x, *act, t["row_ptr"], t["col_idx"], [5, 5], [2, 2], "reflect", 1, True)
torch.save(out, sys.argv[2])
"""


def _pool_ops_with_l2(l2_bytes: str, inputs: Path, output: Path) -> dict:
    env = dict(os.environ, OES_FAST_L2_CACHE_BYTES=l2_bytes)
    proc = subprocess.run([sys.executable, "-c", POOL_SLICE_WORKER, str(inputs), str(output)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(output)


def test_pooled_halo_slices_keep_the_bits(tmp_path):
    """The pooled ops make their halo in slices of input channels where it is larger than the L2
    and the conv has more inputs than outputs (pool_slice_channels): with an L2 of 1 byte every
    input channel is a slice of its own, with 1 TB nothing is sliced. Forward, statistics and
    weight gradient, plain and with a batch norm + LeakyReLU in the input load: the same bits
    either way, 1 and 2 threads, float32 and float64, and close to the reference."""
    c_in, c_out, h, w_ = 6, 3, 75, 150  # odd pooled rows (37), a partial last column block
    w, keep = random_weight(c_out, c_in, 5, 0.3, torch.float64, stable_seed("pool slices"))
    values, row_ptr, col_idx = to_csr(w, keep)
    gen = torch.Generator().manual_seed(stable_seed("pool slices x"))
    t = dict(x=torch.randn(2, c_in, h, w_, generator=gen, dtype=torch.float64), values=values, row_ptr=row_ptr,
             col_idx=col_idx, bias=torch.randn(c_out, generator=gen, dtype=torch.float64),
             grad=torch.randn(2, c_out, h // 2, w_ // 2, generator=gen, dtype=torch.float64),
             scale=torch.rand(c_in, generator=gen, dtype=torch.float64) + 0.5,
             shift=torch.randn(c_in, generator=gen, dtype=torch.float64) * 0.3)
    torch.save(t, tmp_path / "inputs.pt")
    sliced = _pool_ops_with_l2("1", tmp_path / "inputs.pt", tmp_path / "sliced.pt")
    whole = _pool_ops_with_l2(str(2 ** 40), tmp_path / "inputs.pt", tmp_path / "whole.pt")
    for name in whole:
        assert torch.equal(sliced[name], whole[name]), f"{name}: sliced and whole halos give different bits"
    x = t["x"].clone().requires_grad_()
    wr = w.clone().requires_grad_()
    ref = F.avg_pool2d(reference_conv(x, wr, t["bias"], 1, 2, "reflect"), 2)
    ref_gw = torch.autograd.grad(ref, wr, t["grad"])[0].reshape(c_out, -1)[keep.reshape(c_out, -1)]
    for dtype in (torch.float32, torch.float64):
        key = f"1 threads, {dtype}"
        assert_close_to_reference(sliced[key + ": out"], ref.detach(), name=f"sliced forward {dtype}")
        assert_channel_stats(sliced[key + ": stats"], sliced[key + ": out"], dtype, "sliced stats")
        assert_close_to_reference(sliced[key + ": weight grad"], ref_gw, name=f"sliced weight grad {dtype}")


def test_l2_cache_bytes_override_is_checked():
    env = dict(os.environ, OES_FAST_L2_CACHE_BYTES="2MB")
    code = ("import torch, oes_fast; from oes_fast.sparse import to_csr\n"
            "w = torch.ones(1, 8, 5, 5); v, rp, ci = to_csr(w)\n"
            "torch.ops.oes_fast.sparse_conv2d_pool_stats(torch.ones(1, 8, 8, 8), v, rp, ci, None, [5, 5], [2, 2], "
            "'reflect')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "OES_FAST_L2_CACHE_BYTES must be a positive whole number of bytes (or unset), got '2MB'" in proc.stderr


def test_sparse_conv2d_pool_stats_rejects_bad_arguments():
    op = torch.ops.oes_fast.sparse_conv2d_pool_stats
    w, keep = random_weight(4, 3, 3, 0.5, torch.float32, 2)
    values, row_ptr, col_idx = to_csr(w, keep)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"padding \(k - 1\) / 2"):
        op(x, values, row_ptr, col_idx, None, [3, 3], [0, 0], "reflect")
    with pytest.raises(RuntimeError, match="at least 2x2"):
        op(torch.randn(1, 3, 1, 8), values, row_ptr, col_idx, None, [3, 3], [1, 1], "zeros")
    w4, keep4 = random_weight(4, 3, 4, 0.5, torch.float32, 3)
    v4, rp4, ci4 = to_csr(w4, keep4)
    with pytest.raises(RuntimeError, match="odd kernel"):
        op(x, v4, rp4, ci4, None, [4, 4], [1, 1], "reflect")
    with pytest.raises(RuntimeError, match="pooled output's shape"):
        torch.ops.oes_fast.sparse_conv2d_pool_weight_grad(torch.randn(1, 4, 8, 8), x, row_ptr, col_idx, [3, 3],
                                                          [1, 1], "reflect")
    with pytest.raises(RuntimeError, match="pooled output's shape"):
        torch.ops.oes_fast.sparse_conv2d_pool_input_grad(torch.randn(1, 4, 8, 8), values, row_ptr, col_idx,
                                                         [1, 3, 8, 8], [3, 3], [1, 1], "reflect")


def test_sparse_conv2d_rejects_bad_arguments():
    w, keep = random_weight(4, 3, 3, 0.5, torch.float32, 1)
    values, row_ptr, col_idx = to_csr(w, keep)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="padding_mode"):
        sparse_conv2d(x, values, row_ptr, col_idx, 3, None, 1, 1, "circular")
    with pytest.raises(RuntimeError, match="dtype"):
        sparse_conv2d(x.double(), values, row_ptr, col_idx, 3, None, 1, 1, "reflect")
    with pytest.raises(RuntimeError, match="reflection padding"):
        sparse_conv2d(torch.randn(1, 3, 2, 8), values, row_ptr, col_idx, 3, None, 1, 2, "reflect")
    bad = col_idx.clone()
    bad[0] = 3 * 9
    with pytest.raises(RuntimeError, match="out of range"):
        sparse_conv2d(x, values, row_ptr, bad, 3, None, 1, 1, "reflect")
    # the first offending entry is named, a negative one too (the range is checked before any entry)
    last = col_idx.numel() - 1
    bad = col_idx.clone()
    bad[last] = -1
    with pytest.raises(RuntimeError, match=rf"col_idx\[{last}\] = -1 out of range \[0, 27\)"):
        sparse_conv2d(x, values, row_ptr, bad, 3, None, 1, 1, "reflect")
    bad[1] = 40
    with pytest.raises(RuntimeError, match=r"col_idx\[1\] = 40 out of range"):
        sparse_conv2d(x, values, row_ptr, bad, 3, None, 1, 1, "reflect")


def test_to_csr_round_trip():
    w, keep = random_weight(5, 4, 3, 0.3, torch.float64, 3)
    values, row_ptr, col_idx = to_csr(w, keep)
    dense = torch.zeros(5, 4 * 9, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(5), row_ptr[1:] - row_ptr[:-1])
    dense[rows, col_idx.long()] = values
    assert torch.equal(dense.view_as(w), w)
    assert values.numel() == int(keep.sum())


# ------------------------------------------------------------------------------ the generator
def published_mask(model, shared_data, name):
    path = shared_data / "oes_published_masks" / f"{name}_density0.05.npz"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return masks.load_published(path, model)


def masked_dense(model, mask, dtype):
    dense = models.skip_oes(seed=None)
    dense.load_state_dict(model.state_dict())
    mask.apply_(dense)
    return dense.to(dtype).train()


@pytest.mark.parametrize("size", [(256, 256), (256, 320)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", MASK_NAMES)
def test_generator_matches_masked_model_published(shared_data, name, size):
    """Each published mask on freshly initialized weights, float64: the compacted sparse
    generator computes the masked dense network (batch norm with batch statistics)."""
    model = models.skip_oes(seed=0)
    mask = published_mask(model, shared_data, name)
    gen = SparseGenerator.from_masked(model, mask).double()
    dense = masked_dense(model, mask, torch.float64)
    z = models.dip_input(32, *size, seed=3).double()
    with torch.no_grad():
        ref = dense(z)
        out = gen(z)  # batch-norm statistics fused into the sparse convs
        gen.fuse_batch_norm = False
        out_unfused = gen(z)
    assert out.shape == ref.shape == (1, 3, *size)
    assert_close_to_reference(out, ref, floor=1e-11, name=f"generator {name}")
    assert_close_to_reference(out_unfused, ref, floor=1e-11, name=f"generator {name}, batch norm not fused")
    # the compaction really removes channels, and the sparse kernel is in use
    stats = gen.layer_stats(*size)
    assert sum(r["n_out"] for r in stats) < 0.7 * sum(r["c_out"] for r in stats)
    assert any(r["mode"] == "sparse" for r in stats)


def test_generator_float32_published(shared_data):
    model = models.skip_oes(seed=0)
    mask = published_mask(model, shared_data, "pepper")
    gen = SparseGenerator.from_masked(model, mask)
    z = models.dip_input(32, 256, 256, seed=3)
    with torch.no_grad():
        ref64 = masked_dense(model, mask, torch.float64)(z.double())
        ref32 = masked_dense(model, mask, torch.float32)(z)
        out = gen(z)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, ref64, ref32, factor=4.0, name="generator float32")


def test_generator_prologue_fusion_keeps_the_bits(shared_data):
    """The published pepper mask, float32, one training step's output and gradients with the batch
    norms made in the next sparse convs' input loads (fuse_prologue; the up path's pairs of batch
    norms together, fuse_batch_norm_pairs, or not) and as ops of their own: the same bits."""
    model = models.skip_oes(seed=0)
    gen = SparseGenerator.from_masked(model, published_mask(model, shared_data, "pepper"))
    z = models.dip_input(32, 256, 256, seed=3)
    target = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    results = []
    for fuse, pairs in ((False, False), (True, False), (True, True)):
        gen.fuse_prologue, gen.fuse_batch_norm_pairs = fuse, pairs
        gen.zero_grad(set_to_none=True)
        out = gen(z)
        ((out - target) ** 2).mean().backward()
        results.append([out.detach()] + [p.grad for p in gen.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) == len(results[2]) > 20
    for a, b, c in zip(*results):
        assert torch.equal(a, b) and torch.equal(a, c)


def perturbed_model(levels, seed):
    """A small OES-style network whose biases and batch-norm parameters are all nonzero, so
    that constant channels carry nonzero values through the compaction."""
    return perturbed(models.skip_oes(levels=levels, seed=seed), seed)


def perturbed(model, seed):
    """model with its 1-D parameters (biases, batch-norm scales and shifts) drawn nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "bn" in name and name.endswith("weight") else 0.0))
    return model


def random_mask(model, density, seed, structured=True):
    """Random mask with whole channels and gammas pruned, as the published masks have."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in model.named_parameters():
        keep = torch.rand(p.shape, generator=g) < density
        if structured and p.dim() == 4:
            keep &= (torch.rand(p.shape[0], generator=g) < 0.7).view(-1, 1, 1, 1)
        tensors[name] = keep
    return masks.Mask(tensors, architecture=model.config)


def connected_mask(model, density, seed):
    """random_mask with every batch norm's scale and shift kept. random_mask prunes 1 - density
    of the scales too, and at the densities the tests use (0.1-0.2, on 3 levels) that kills
    every channel: the compacted generator then has no taps at all, and a test of its
    gradients would pass on an empty network. Channels still die here by whole pruned rows."""
    pruned = random_mask(model, density, seed)
    return masks.Mask({n: torch.ones_like(t) if ".bn" in n else t for n, t in pruned.items()},
                      architecture=model.config)


def assert_every_conv_keeps_taps(gen):
    empty = [name for name, conv in gen.convs() if conv.values.numel() == 0]
    assert not empty, f"convs with no kept taps (the test would not test them): {empty}"


def test_default_crossover_by_device():
    """The CPU's measured crossover on a CPU, every conv dense on a GPU (oes_fast.sparse's
    GPU_CROSSOVER_DENSITY); set_mode() re-chooses by the generator's device."""
    from oes_fast.sparse import CROSSOVER_DENSITY, default_crossover

    assert default_crossover("cpu") == CROSSOVER_DENSITY
    assert default_crossover(torch.device("cuda", 0)) == 0.0
    model = perturbed_model(3, seed=11)
    gen = SparseGenerator.from_masked(model, connected_mask(model, 0.1, seed=12))
    assert_every_conv_keeps_taps(gen)
    modes = [conv.mode for _, conv in gen.convs()]
    assert "sparse" in modes
    gen.set_mode("dense")
    gen.set_mode()
    assert [conv.mode for _, conv in gen.convs()] == modes


@pytest.mark.parametrize("kind,density", [("random", 0.0), ("random", 0.1), ("connected", 0.02),
                                          ("connected", 0.1), ("random", 0.5), ("random", 1.0)])
def test_generator_constant_folding(kind, density):
    """Random masks on nonzero biases and betas: constants from pruned channels (a conv's
    bias, a BN's beta) are folded exactly; density 0 (everything pruned) and 1 included.
    random_mask at 0.1 cuts the whole network (constants only); connected_mask keeps taps in
    every conv at low densities, so that live channels meet folded constants there too."""
    model = perturbed_model(3, seed=11)
    mask = (random_mask if kind == "random" else connected_mask)(model, density, seed=12)
    gen = SparseGenerator.from_masked(model, mask).double()
    if kind == "connected":
        assert_every_conv_keeps_taps(gen)
    dense = models.skip_oes(levels=3)
    dense.load_state_dict(model.state_dict())
    mask.apply_(dense)
    dense.double().train()
    for size in [(32, 32), (32, 48)]:
        z = torch.rand(2, 32, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1
        with torch.no_grad():
            ref, out = dense(z), gen(z)
        assert_close_to_reference(out, ref, floor=1e-9, name=f"density {density}")


def dense_grads(model, mask, z, target, dtype):
    dense = models.skip_oes(levels=model.levels)
    dense.load_state_dict(model.state_dict())
    mask.apply_(dense)
    dense.to(dtype).train()
    loss = ((dense(z) - target) ** 2).mean()
    loss.backward()
    # the dense model's gradient at pruned entries is not a gradient of the masked model's kept ones
    return {n: p.grad * mask[n].to(dtype) for n, p in dense.named_parameters()}


@pytest.mark.parametrize("mode,fuse", [("sparse", True), ("sparse", False), ("dense", True)])
def test_generator_gradients(mode, fuse):
    """Gradients of the kept parameters equal autograd of the masked dense model (with the
    batch-norm statistics from the sparse convs' epilogue, and without); the kept entries the
    generator drops (dead channels) get no gradient there either."""
    model = perturbed_model(3, seed=21)
    mask = connected_mask(model, 0.15, seed=22)
    gen = SparseGenerator.from_masked(model, mask).double()
    assert_every_conv_keeps_taps(gen)
    gen.set_mode(mode)
    gen.fuse_batch_norm = fuse
    gen.pool_fusion_min_width = 0  # the down blocks' conv + pooling as one op wherever fuse is on
    z = torch.rand(1, 32, 32, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.1
    target = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = dense_grads(model, mask, z, target, torch.float64)
    ((gen(z) - target) ** 2).mean().backward()
    assert mode == "dense" or any(isinstance(st, _Conv) and st.mode == "sparse" for st in gen.stages)
    covered = {n: torch.zeros(g.numel(), dtype=torch.bool) for n, g in ref.items()}
    # a conv bias right before a batch norm has a gradient of exactly 0, the reference only
    # rounding noise: the floor is relative to the largest gradient of the network
    largest = max(float(g.abs().max()) for g in ref.values())
    for param, name, index in gen.parameter_map():
        got = param.grad if param.grad is not None else torch.zeros_like(param)
        expected = ref[name].reshape(-1)[index].view_as(got)
        assert_close_to_reference(got, expected, floor=1e-10, scale=largest, name=f"grad {name}")
        covered[name][index] = True
    for name, g in ref.items():
        rest = g.reshape(-1)[~covered[name]]
        assert float(rest.abs().max()) <= 1e-10 if rest.numel() else True, f"{name}: gradient outside the generator"


@pytest.mark.parametrize("fuse_stats,fuse_activation,fuse_prologue,fuse_pairs",
                         [(True, True, False, False), (False, True, False, False), (True, False, False, False),
                          (True, True, True, False), (True, True, True, True)])
def test_generator_training_fused_batch_norm_leaky_relu(monkeypatch, fuse_stats, fuse_activation, fuse_prologue,
                                                        fuse_pairs):
    """Training forward and backward with every batch norm run as one op
    (ops.batch_norm_leaky_relu, with the LeakyReLU after it, or a slope of 1 where none follows;
    the last one with the output conv too, ops.batch_norm_leaky_relu_conv1x1;
    statistics from the sparse conv's epilogue after a conv, computed by the op elsewhere), and without it;
    with fuse_prologue, every batch norm (and its LeakyReLU) that a sparse conv with its
    statistics follows made in that conv's input load (ops.batch_norm_leaky_relu_sparse_conv2d),
    and with fuse_pairs a batch norm, its LeakyReLU and the batch norm after them in the load of
    the conv after those (ops.batch_norm_leaky_relu_batch_norm_sparse_conv2d): output and gradients of every kept parameter
    equal those of the masked dense model (float64). The batch norms' scales and shifts are all
    kept (connected_mask), so that most channels stay live through them."""
    model = perturbed_model(3, seed=23)
    mask = connected_mask(model, 0.3, seed=24)
    gen = SparseGenerator.from_masked(model, mask).double()
    assert_every_conv_keeps_taps(gen)
    gen.fuse_batch_norm, gen.fuse_activation, gen.fuse_prologue = fuse_stats, fuse_activation, fuse_prologue
    gen.fuse_batch_norm_pairs = fuse_pairs
    gen.pool_fusion_min_width = 0  # with fuse_stats, every conv + pooling as one op, whatever the size
    prologue_calls = []  # per call: statistics given, slope, pooled
    prologue_op = oes_fast.sparse.batch_norm_leaky_relu_sparse_conv2d
    monkeypatch.setattr(oes_fast.sparse, "batch_norm_leaky_relu_sparse_conv2d",
                        lambda *args: prologue_calls.append((args[1] is not None, args[5], args[14]))
                        or prologue_op(*args))
    pair_calls = []  # per call: statistics given, slope, pooled
    pair_op = oes_fast.sparse.batch_norm_leaky_relu_batch_norm_sparse_conv2d
    monkeypatch.setattr(oes_fast.sparse, "batch_norm_leaky_relu_batch_norm_sparse_conv2d",
                        lambda *args: pair_calls.append((args[1] is not None, args[5], args[17])) or pair_op(*args))
    calls = []  # per call of the fused op: whether the statistics were given, and the slope
    fused_op = oes_fast.sparse.batch_norm_leaky_relu
    monkeypatch.setattr(oes_fast.sparse, "batch_norm_leaky_relu",
                        lambda x, stats, w, b, eps, slope: calls.append((stats is not None, slope))
                        or fused_op(x, stats, w, b, eps, slope))
    head_calls = []  # the last batch norm, its activation and the output conv as one op (fuses_head)
    head_op = oes_fast.sparse.batch_norm_leaky_relu_conv1x1
    monkeypatch.setattr(oes_fast.sparse, "batch_norm_leaky_relu_conv1x1",
                        lambda *args: head_calls.append(args[5]) or head_op(*args))
    z = torch.rand(2, 32, 32, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.1
    target = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dense = models.skip_oes(levels=3)
    dense.load_state_dict(model.state_dict())
    mask.apply_(dense)
    dense.double().train()
    ref = dense(z)
    ((ref - target) ** 2).mean().backward()
    ref_grads = {n: p.grad * mask[n].double() for n, p in dense.named_parameters()}
    out = gen(z)
    ((out - target) ** 2).mean().backward()
    # 12 batch norms, all on live channels; down: bn1 after the pooling (its statistics from the
    # conv + pooling op where fused), bn2 after a sparse conv, each followed by LeakyReLU; up:
    # bn_in (no activation after it), bn after a sparse conv
    act = oes_fast.sparse.LEAKY_RELU_SLOPE
    if not fuse_activation:
        assert calls == [] and prologue_calls == [] and pair_calls == []
    elif fuse_pairs:
        # down as below; then each bn with its LeakyReLU (the last down block's bn2, the up
        # blocks' bn but the head's) and the bn_in after it into that bn_in's conv
        assert prologue_calls == [(True, act, False), (True, act, True)] * 2 + [(True, act, False)]
        assert pair_calls == [(True, act, False)] * 3
        assert calls == [] and head_calls == [act]
    elif fuse_prologue:
        # down: each block's bn1 into its conv2, bn2 into the next block's conv1 + pooling, but
        # the last bn2 (an up block's bn_in follows); up: each bn_in into its conv, each bn but
        # the last (the head) before the next bn_in
        down, up = [(True, act, False), (True, act, True)] * 2 + [(True, act, False)], [(False, 1.0, False)] * 3
        assert prologue_calls == down + up
        assert calls == [(True, act)] * 3
        assert head_calls == [act]
    else:
        # the last batch norm (statistics from up.0's conv) goes into the head op instead
        head = fuse_stats and fuse_activation
        assert calls == ([(fuse_stats, act), (fuse_stats, act)] * 3 + [(False, 1.0), (fuse_stats, act)] * 3)[
            :-1 if head else None]
        assert head_calls == ([act] if head else []) and prologue_calls == []
    assert_close_to_reference(out, ref, floor=1e-11, name="output")
    largest = max(float(g.abs().max()) for g in ref_grads.values())
    for param, name, index in gen.parameter_map():
        got = param.grad if param.grad is not None else torch.zeros_like(param)
        assert_close_to_reference(got, ref_grads[name].reshape(-1)[index].view_as(got), floor=1e-10, scale=largest,
                                  name=f"grad {name}")
    expected_calls, expected_prologue, expected_pairs = list(calls), list(prologue_calls), list(pair_calls)
    with torch.no_grad():  # the inference path runs the same ops
        calls.clear()
        head_calls.clear()
        prologue_calls.clear()
        pair_calls.clear()
        assert_close_to_reference(gen(z), ref, floor=1e-11, name="output without autograd")
        assert calls == expected_calls and prologue_calls == expected_prologue and pair_calls == expected_pairs
        assert head_calls == ([oes_fast.sparse.LEAKY_RELU_SLOPE] if fuse_stats and fuse_activation else [])


@pytest.mark.parametrize("size", [(8, 10), (7, 9)])
def test_avg_pool_2x2_matches_avg_pool2d(size):
    """The generator's 2x2 average pooling and its one-pass backward against F.avg_pool2d (float64;
    an odd last row or column is dropped and gets no gradient)."""
    from oes_fast.sparse import avg_pool2x2

    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    ref = F.avg_pool2d(x, 2, 2)
    out = avg_pool2x2(x)
    assert_close_to_reference(out, ref, floor=1e-15, name="avg pool")
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert_close_to_reference(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], floor=1e-15,
                              name="avg pool gradient")
    assert torch.autograd.gradcheck(avg_pool2x2, (x,))


def test_generator_training_keeps_pruned_zero():
    model = perturbed_model(3, seed=31)
    mask = connected_mask(model, 0.2, seed=32)
    gen = SparseGenerator.from_masked(model, mask)
    assert_every_conv_keeps_taps(gen)
    opt = torch.optim.Adam(gen.parameters(), lr=0.01)
    z = torch.rand(1, 32, 32, 32) * 0.1
    target = torch.rand(1, 3, 32, 32)
    for _ in range(3):
        opt.zero_grad()
        loss = ((gen(z) - target) ** 2).mean()
        loss.backward()
        opt.step()
    state = gen.dense_state_dict()
    for name, t in state.items():
        assert not bool((t != 0)[~mask[name]].any()), f"{name}: a pruned entry moved"
    # the exported weights reproduce the trained generator in the dense model
    dense = models.skip_oes(levels=3)
    dense.load_state_dict(state, strict=False)
    with torch.no_grad():
        out, ref = gen(z), dense.train()(z)
    assert (out - ref).abs().max() < 1e-5


def test_generator_save_load(tmp_path, shared_data):
    model = models.skip_oes(seed=0)
    mask = published_mask(model, shared_data, "barbara")
    gen = SparseGenerator.from_masked(model, mask)
    path = tmp_path / "gen.safetensors"
    nbytes = gen.save(path)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert nbytes < dense_bytes / 10, (nbytes, dense_bytes)
    loaded = SparseGenerator.load(path)
    z = models.dip_input(32, 256, 256, seed=0)
    with torch.no_grad():
        assert torch.equal(gen(z), loaded(z))
    with pytest.raises(ValueError, match="not an oes_fast sparse generator"):
        masks.save(mask, tmp_path / "mask.safetensors")
        SparseGenerator.load(tmp_path / "mask.safetensors")


# ------------------------------------------------------------------------------ the C++ forward
def forward_both_ways(gen, z):
    """(the Python loop's output, the recording call's, the C++ executor's) for z without
    autograd: the executor's call must not enter the Python stages."""
    with torch.no_grad():
        gen.use_executor = False
        ref = gen(z)
        gen.use_executor = True
        recorded = gen(z)
        run_stage = gen.run_stage
        gen.run_stage = None  # (the executor's call must not reach it)
        try:
            out = gen(z)
        finally:
            gen.run_stage = run_stage
    return ref, recorded, out


def skip_variant(seed, **options):
    """A 3-level Skip network without skip branches, its 1-D parameters nonzero (as perturbed_model)."""
    return perturbed(models.skip(seed=seed, in_channels=8, out_channels=3, channels_down=(6, 8, 10),
                                 channels_up=(6, 8, 10), channels_skip=(0, 0, 0), filter_down=5, filter_up=3,
                                 **options), seed)


EXECUTOR_VARIANTS = [
    ("oes", dict()),
    ("relu, max pooling", dict(act="ReLU", downsample="max")),
    ("elu, bilinear", dict(act="ELU", upsample="bilinear")),
    ("no activation, no sigmoid", dict(act="none", sigmoid=False)),
    ("no bias", dict(bias=False)),
]


@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("variant", EXECUTOR_VARIANTS, ids=lambda v: v[0])
def test_executor_keeps_the_bits_of_the_python_forward(variant, density):
    """SparseGenerator's forward without autograd in one C++ call (oes_fast._C.GeneratorForward)
    against its Python loop: the same bits, on networks whose constants, dead channels, dense
    convs (density above the crossover), activations, poolings and upsamplings take every branch
    of the loop, in float64 and float32, batches of two, with every combination of the fusion
    switches."""
    name, options = variant
    model = skip_variant(seed=5, **options) if name != "oes" else perturbed_model(3, seed=5)
    mask = (connected_mask if density < 0.5 else random_mask)(model, density, seed=6)
    gen = SparseGenerator.from_masked(model, mask)
    z = torch.rand(2, model.config["in_channels"], 32, 48, generator=torch.Generator().manual_seed(7))
    branches = set()
    for dtype in (torch.float32, torch.float64):
        gen = gen.to(dtype)
        for switches in range(16):
            gen.fuse_batch_norm, gen.fuse_activation, gen.fuse_prologue, gen.fuse_batch_norm_pairs = (
                bool(switches & 1), bool(switches & 2), bool(switches & 4), bool(switches & 8))
            gen.pool_fusion_min_width = 0 if switches % 3 else 32
            ref, recorded, out = forward_both_ways(gen, z.to(dtype))
            assert torch.equal(recorded, ref) and torch.equal(out, ref), (dtype, switches)
            assert out.dtype == dtype and out.shape == (2, 3, 32, 48)
        branches |= _branches_of(gen, z.to(dtype))
    if name == "oes" and density == 0.1:
        # every branch of SparseGenerator.decide ran somewhere in this network
        assert branches == set(range(7)), branches


def _branches_of(gen, z):
    """The branches of SparseGenerator.decide that forwards of z take under each combination of
    the fusion switches."""
    out = set()
    with torch.no_grad():
        for switches in range(16):
            gen.fuse_batch_norm, gen.fuse_activation, gen.fuse_prologue, gen.fuse_batch_norm_pairs = (
                bool(switches & 1), bool(switches & 2), bool(switches & 4), bool(switches & 8))
            x, const, hw, stats, i = z, None, (z.shape[0], z.shape[2], z.shape[3]), None, 0
            while i < len(gen._chain):
                out.add(gen.decide(i, x, stats)[0])
                x, const, hw, stats, i, _ = gen.run_stage(i, x, const, hw, stats)
    return out


def test_executor_published_mask(shared_data):
    """The published pepper mask on the OES network at 256x256, float32 and float64: the executor's
    bits are the Python loop's, and the executor is the forward's path once recorded (one per
    input shape and dtype)."""
    model = models.skip_oes(seed=0)
    gen = SparseGenerator.from_masked(model, published_mask(model, shared_data, "pepper"))
    for dtype in (torch.float32, torch.float64):
        gen = gen.to(dtype)
        z = models.dip_input(32, 256, 256, seed=3).to(dtype)
        ref, recorded, out = forward_both_ways(gen, z)
        assert torch.equal(recorded, ref) and torch.equal(out, ref)
    assert len(gen._executors) == 1  # .to(dtype) dropped the float32 one


def test_executor_reads_the_current_parameters():
    """The executor holds the parameters, not copies: after training steps (Adam, in place) and
    a load_state_dict, its output is the Python loop's on the new values; with autograd the
    forward stays in Python (an output with a gradient) and records nothing."""
    model = perturbed_model(3, seed=21)
    gen = SparseGenerator.from_masked(model, connected_mask(model, 0.2, seed=22)).double()
    z = torch.rand(1, 32, 32, 32, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    before = forward_both_ways(gen, z)[2]
    opt = torch.optim.Adam(gen.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        out = gen(z)
        assert out.grad_fn is not None
        ((out - target) ** 2).mean().backward()
        opt.step()
    assert len(gen._executors) == 1
    ref, _, out = forward_both_ways(gen, z)
    assert torch.equal(out, ref) and not torch.equal(out, before)
    fresh = SparseGenerator.from_masked(model, connected_mask(model, 0.2, seed=22)).double()
    gen.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        assert torch.equal(gen(z), before)


def test_executor_survives_copies():
    """A generator with a recorded executor can be deep-copied and pickled (the executor is
    not: the copy records its own), and GeneratorForward refuses to run under autograd."""
    import copy
    import pickle

    model = perturbed_model(3, seed=31)
    gen = SparseGenerator.from_masked(model, connected_mask(model, 0.2, seed=32))
    z = torch.rand(1, 32, 32, 32, generator=torch.Generator().manual_seed(33))
    ref = forward_both_ways(gen, z)[2]
    for other in (copy.deepcopy(gen), pickle.loads(pickle.dumps(gen))):
        assert other._executors == {}
        assert torch.equal(forward_both_ways(other, z)[2], ref)
    executor = next(iter(gen._executors.values()))
    with pytest.raises(RuntimeError, match="without autograd"):
        executor.run(z)


def test_generator_rejects_bad_input():
    model = models.skip_oes(levels=3, seed=0)
    gen = SparseGenerator.from_masked(model, random_mask(model, 0.3, 1))
    with pytest.raises(ValueError, match="multiples"):
        gen(torch.rand(1, 32, 36, 32))
    with pytest.raises(ValueError, match="input must be"):
        gen(torch.rand(1, 3, 32, 32))


# ------------------------------------------------------------------------------ Triton
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5], SHAPES[4], SHAPES[6]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", [0.0, 0.4])
def test_triton_sparse_conv2d(shape, density, dtype):
    """The Triton kernels (interpreter on CPU) against F.conv2d: forward, input and weight grads."""
    from oes_fast.kernels import sparse_conv2d as tk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, c_in, c_out, h, w_, k, stride, mode = shape
    seed = stable_seed(shape, density, "triton")
    w, keep = random_weight(c_out, c_in, k, density, torch.float64, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, c_in, h, w_, generator=gen, dtype=torch.float64)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64)
    p = (k - 1) // 2
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref64 = reference_conv(xr, wr, b, stride, p, mode)
    g = torch.randn(ref64.shape, generator=gen, dtype=torch.float64)
    ref64.backward(g)
    values, row_ptr, col_idx = (t.to(device) for t in to_csr(w.to(dtype), keep))
    xd = x.to(dtype).to(device)
    out = tk.sparse_conv2d(xd, values, row_ptr, col_idx, b.to(dtype).to(device), [k, k], [stride] * 2, [p, p], mode)
    ref_lowp = reference_conv(x.to(dtype), w.to(dtype), b.to(dtype), stride, p, mode)
    assert_close_to_reference(out.cpu(), ref64.detach(), ref_lowp, factor=4.0, name="triton forward")
    gd = g.to(dtype).to(device)
    gi = tk.sparse_conv2d_input_grad(gd, values, row_ptr, col_idx, list(x.shape), [k, k], [stride] * 2, [p, p], mode)
    assert_close_to_reference(gi.cpu(), xr.grad, xr.grad.to(dtype), factor=1.0,
                              floor=1e-5 if dtype == torch.float32 else 1e-12, name="triton input grad")
    gw = tk.sparse_conv2d_weight_grad(gd, xd, row_ptr, col_idx, [k, k], [stride] * 2, [p, p], mode)
    expected = wr.grad.reshape(c_out, -1)[keep.reshape(c_out, -1)]
    assert_close_to_reference(gw.cpu(), expected, expected.to(dtype), factor=1.0,
                              floor=1e-4 if dtype == torch.float32 else 1e-11, name="triton weight grad")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_fused_upsample():
    from oes_fast.kernels import sparse_conv2d as tk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w, keep = random_weight(3, 2, 3, 0.5, torch.float64, 4)
    x = torch.randn(1, 2, 4, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = reference_conv(F.interpolate(x, scale_factor=2, mode="nearest"), w, None, 1, 1, "reflect")
    values, row_ptr, col_idx = (t.to(device) for t in to_csr(w, keep))
    out = tk.sparse_conv2d(x.to(device), values, row_ptr, col_idx, None, [3, 3], [1, 1], [1, 1], "reflect", 2)
    assert_close_to_reference(out.cpu(), ref, name="triton upsample")
