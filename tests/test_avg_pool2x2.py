"""Tests of the avg_pool2x2 ops (2x2, stride-2 average pooling, forward and backward), of
oes_fast.sparse.avg_pool2x2, which calls them on CPU float32 / float64, and of its torch fallback
oes_fast.sparse._AvgPool2x2: against F.avg_pool2d in
float64 (and float32 by tests/tolerances.py's rule), odd and even sides; the forward's bits equal
to the torch expression it replaced; gradcheck (and gradgradcheck: each op is the other's
gradient); opcheck; the same bits with 1 and 2 threads; and every instruction set of the CPU
kernels (one subprocess each, since the choice is made once per process). The generator's use
of it is tested in test_sparse.py.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import oes_fast._C as _C
from oes_fast.sparse import _AvgPool2x2, avg_pool2x2
from cpu_variants import assert_same_bits, assert_thread_independent, run_under_isa
from tolerances import assert_close_to_reference

ops_ns = torch.ops.oes_fast
# (N, C, H, W): odd and even sides, the smallest plane, and sides that are not multiples of any vector width
SHAPES = [(2, 3, 7, 13), (2, 3, 8, 10), (2, 3, 2, 3), (1, 1, 3, 2), (1, 2, 9, 67)]
DTYPES = [torch.float64, torch.float32]


def make_inputs(shape, seed):
    """x and an output gradient, float64 holding float32 values (so the float64 reference sees
    the float32 runs' inputs exactly)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    grad = torch.randn((n, c, h // 2, w // 2), generator=g, dtype=torch.float64)
    return x.float().double(), grad.float().double()


def old_forward(x):
    """The torch expression of _AvgPool2x2, written out: the bits the C++ forward must give."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    return (x[:, :, 0:h:2, 0:w:2] + x[:, :, 0:h:2, 1:w:2] + x[:, :, 1:h:2, 0:w:2] + x[:, :, 1:h:2, 1:w:2]) * 0.25


def run(fn, x, grad, dtype):
    """fn(x) and its gradient in x, in dtype."""
    x = x.detach().to(dtype).requires_grad_()
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, grad.to(dtype))
    return y.detach(), gx


def pool(x):
    return F.avg_pool2d(x, 2, 2)


@pytest.mark.parametrize("fn", [ops_ns.avg_pool2x2, avg_pool2x2, _AvgPool2x2.apply],
                         ids=["op", "avg_pool2x2", "_AvgPool2x2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_avg_pool2d(shape, dtype, fn):
    x, grad = make_inputs(shape, zlib.crc32(repr(shape).encode()))
    got = run(fn, x, grad, dtype)
    ref64, ref_lowp = run(pool, x, grad, torch.float64), run(pool, x, grad, dtype)
    for name, a, r, lp in zip(("output", "grad x"), got, ref64, ref_lowp):
        assert a.dtype == dtype and a.shape == r.shape
        assert_close_to_reference(a, r, lp, name=f"{name} {shape}")
    n, c, h, w = shape
    # the dropped odd row / column: exactly zero; the rest: a quarter of the block's gradient, exactly
    assert not got[1][:, :, h // 2 * 2:].any() and not got[1][:, :, :, w // 2 * 2:].any()
    quarter = (grad.to(dtype) * 0.25).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal(got[1][:, :, :h // 2 * 2, :w // 2 * 2], quarter)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(1, 6, 64, 64)], ids=lambda s: "x".join(map(str, s)))
def test_forward_bits_equal_old_expression(shape, dtype):
    x = make_inputs(shape, 3)[0].to(dtype)
    assert torch.equal(ops_ns.avg_pool2x2(x), old_forward(x))
    assert torch.equal(avg_pool2x2(x), old_forward(x))
    assert torch.equal(_AvgPool2x2.apply(x), old_forward(x))


def test_fallback_paths():
    """Non-contiguous, bfloat16 and sides below 2 run the torch expression; same values."""
    x = make_inputs((2, 3, 8, 10), 4)[0]
    nc = x.transpose(2, 3)
    assert torch.equal(avg_pool2x2(nc), old_forward(nc))
    xb = x.to(torch.bfloat16).requires_grad_()
    y = avg_pool2x2(xb)
    assert y.dtype == torch.bfloat16 and torch.equal(y, old_forward(xb.detach()))
    y.sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.equal(xb.grad, torch.full_like(xb, 0.25))
    thin = torch.ones(1, 1, 1, 6, requires_grad=True)
    assert avg_pool2x2(thin).shape == (1, 1, 0, 3)


def test_gradcheck():
    x, grad = make_inputs((2, 3, 7, 9), 5)
    x.requires_grad_()
    assert torch.autograd.gradcheck(ops_ns.avg_pool2x2, (x,))
    assert torch.autograd.gradgradcheck(ops_ns.avg_pool2x2, (x,))
    assert torch.autograd.gradcheck(_AvgPool2x2.apply, (x,))
    assert torch.autograd.gradgradcheck(_AvgPool2x2.apply, (x,))
    assert torch.autograd.gradcheck(avg_pool2x2, (x,))
    assert torch.autograd.gradgradcheck(avg_pool2x2, (x,))
    grad.requires_grad_()
    assert torch.autograd.gradcheck(lambda g: ops_ns.avg_pool2x2_backward(g, [2, 3, 7, 9]), (grad,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    x, grad = (t.to(dtype) for t in make_inputs((2, 3, 7, 10), 6))
    torch.library.opcheck(ops_ns.avg_pool2x2.default, (x,))
    torch.library.opcheck(ops_ns.avg_pool2x2.default, (x.clone().requires_grad_(),))
    torch.library.opcheck(ops_ns.avg_pool2x2_backward.default, (grad, [2, 3, 7, 10]))
    torch.library.opcheck(ops_ns.avg_pool2x2_backward.default, (grad.clone().requires_grad_(), [2, 3, 7, 10]))


def test_arguments():
    x = torch.zeros(2, 3, 8, 10)
    with pytest.raises(RuntimeError, match="H, W >= 2"):
        ops_ns.avg_pool2x2(x[:, :, :1])
    with pytest.raises(RuntimeError, match="dtype"):
        ops_ns.avg_pool2x2(x.half())
    with pytest.raises(RuntimeError, match="grad_output must be"):
        ops_ns.avg_pool2x2_backward(torch.zeros(2, 3, 4, 4), [2, 3, 8, 10])


def results(x, grad, dtype):
    out, gx = run(ops_ns.avg_pool2x2, x, grad, dtype)
    return {"out": out, "grad_x": gx}


# Large enough that the rows are split among 2 threads (about 8K output elements per task).
THREAD_SHAPE = (2, 16, 65, 67)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bits_do_not_depend_on_threads(dtype):
    assert_thread_independent(results, *make_inputs(THREAD_SHAPE, 11), dtype)


def every_result(x, grad):
    """results in both dtypes (the ISA worker's call)."""
    return {str(dtype): results(x, grad, dtype) for dtype in (torch.float64, torch.float32)}


ISA_SHAPES = [(2, 3, 7, 13), (2, 3, 8, 10), (1, 2, 2, 3), (1, 2, 9, 67), THREAD_SHAPE]


@pytest.mark.parametrize("isa", _C.cpu_isas_supported())
def test_under_isa(isa, tmp_path):
    """Every instruction set's copy of the kernels: the bits of the torch expressions (the old
    forward; a quarter of the gradient, zero in dropped rows and columns), close to avg_pool2d,
    and the same bits with 1 and 2 threads."""
    cases = [make_inputs(shape, 100 + i) for i, shape in enumerate(ISA_SHAPES)]
    out = run_under_isa(isa, tmp_path, "test_avg_pool2x2", "every_result", cases)
    for i, (x, grad) in enumerate(cases):
        n, c, h, w = ISA_SHAPES[i]
        for dtype in DTYPES:
            where = f"{ISA_SHAPES[i]} {dtype} under {isa}"
            got = out["threads"][1][i][str(dtype)]
            assert torch.equal(got["out"], old_forward(x.to(dtype))), f"output {where}"
            expected = torch.zeros((n, c, h, w), dtype=dtype)
            quarter = (grad.to(dtype) * 0.25).repeat_interleave(2, 2).repeat_interleave(2, 3)
            expected[:, :, :h // 2 * 2, :w // 2 * 2] = quarter
            assert torch.equal(got["grad_x"], expected), f"grad_x {where}"
            ref64 = run(pool, x, grad, torch.float64)
            for k, name in enumerate(("out", "grad_x")):
                assert_close_to_reference(got[name], ref64[k], name=f"{name} {where}")
            assert_same_bits(got, out["threads"][2][i][str(dtype)], where)
