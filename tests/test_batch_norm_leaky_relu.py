"""Tests of oes_fast.ops.batch_norm_leaky_relu (training-mode batch norm fused with LeakyReLU)
and its three C++ ops, against oes_fast.reference.batch_norm_leaky_relu (F.batch_norm +
F.leaky_relu), and of the generator's head op batch_norm_leaky_relu_conv1x1 (the same with a 1x1
conv after it) and its backward against reference.batch_norm_leaky_relu_conv1x1: forward and the gradients in x, weight and bias, with the statistics given (as
sparse_conv2d_stats returns them) and computed by the op; gradcheck; opcheck; the same bits
with 1 and 2 threads; and every instruction set of the CPU kernels (one subprocess each, since
the choice is made once per process). The generator's use of it is tested in test_sparse.py.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import oes_fast._C as _C
from oes_fast import ops, reference
from cpu_variants import assert_same_bits, assert_thread_independent, run_under_isa
from tolerances import assert_close_to_reference

ops_ns = torch.ops.oes_fast
EPS = 1e-5
SLOPE = 0.2
# (N, C, H, W): sides that are not multiples of any vector width, one and several images and
# channels, and one plane of a single row.
SHAPES = [(1, 1, 7, 13), (2, 5, 7, 13), (1, 5, 13, 7), (2, 1, 3, 17), (2, 3, 1, 9)]
DTYPES = [torch.float64, torch.float32]


def make_inputs(shape, seed):
    """float64 x with a per-channel offset larger than its spread (the cancellation a batch norm
    after a conv with bias sees), weight of both signs, bias, and an output gradient; all
    float32 values, so that the float64 reference sees the float32 runs' inputs exactly."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    offset = torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64) * 4
    x = offset + torch.randn(shape, generator=g, dtype=torch.float64) * (0.5 + torch.rand(1, c, 1, 1, generator=g))
    weight = torch.randn(c, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return tuple(t.float().double() for t in (x, weight, bias, grad))


def sums(x):
    """(sum, sum of squares) per channel, float64: the statistics sparse_conv2d_stats returns."""
    x = x.detach().double()
    return torch.stack([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))], 1)


def run(fn, x, weight, bias, grad, dtype):
    """fn's output and its gradients in (x, weight, bias), all in dtype."""
    x, weight, bias = (t.detach().to(dtype).requires_grad_() for t in (x, weight, bias))
    y = fn(x, weight, bias)
    return (y.detach(), *torch.autograd.grad(y, (x, weight, bias), grad.to(dtype)))


# the network's LeakyReLU, and 1: a plain batch norm (how the generator runs one with no activation after it)
SLOPES = [SLOPE, 1.0]


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("given_stats", [False, True], ids=["stats computed", "stats given"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, given_stats, slope):
    x, weight, bias, grad = make_inputs(shape, zlib.crc32(repr(shape).encode()))

    def fused(x, w, b):
        return ops.batch_norm_leaky_relu(x, sums(x) if given_stats else None, w, b, EPS, slope)

    def ref(x, w, b):
        return reference.batch_norm_leaky_relu(x, w, b, EPS, slope)

    got = run(fused, x, weight, bias, grad, dtype)
    ref64, ref_lowp = run(ref, x, weight, bias, grad, torch.float64), run(ref, x, weight, bias, grad, dtype)
    for name, a, r, lp in zip(("output", "grad x", "grad weight", "grad bias"), got, ref64, ref_lowp):
        assert a.dtype == dtype
        assert_close_to_reference(a, r, lp, name=f"{name} {shape}")


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("given_stats", [False, True], ids=["stats computed", "stats given"])
def test_gradcheck(given_stats, slope):
    x, weight, bias, _ = make_inputs((2, 3, 4, 5), 7)
    args = tuple(t.clone().requires_grad_() for t in (x, weight, bias))

    def fused(x, w, b):
        return ops.batch_norm_leaky_relu(x, sums(x) if given_stats else None, w, b, EPS, slope)

    assert torch.autograd.gradcheck(fused, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    x, weight, bias, grad = (t.to(dtype) for t in make_inputs((2, 3, 5, 7), 8))
    stats = ops_ns.batch_norm_stats(x)
    mean, std, scale, shift = ops.batch_norm_affine(stats, 70, weight, bias, EPS)
    torch.library.opcheck(ops_ns.batch_norm_stats.default, (x,))
    torch.library.opcheck(ops_ns.batch_norm_leaky_relu.default, (x, scale, shift, SLOPE))
    torch.library.opcheck(ops_ns.batch_norm_leaky_relu_backward.default,
                          (grad, x, mean, std.reciprocal(), scale, shift, SLOPE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_differentiable_ops_opcheck_and_bits(dtype):
    """batch_norm_act and batch_norm_act_conv1x1 (the kernels composed, autograd in C++) pass
    opcheck with and without statistics and with inputs that need gradients, and give the bits
    of their kernels called one by one, forward and backward."""
    x, weight, bias, grad = (t.to(dtype) for t in make_inputs((2, 4, 5, 7), 9))
    conv_weight, conv_bias = (t.to(dtype) for t in head_weights(4, 3, 10))
    head_grad_out = head_grad((2, 4, 5, 7), 3, 11).to(dtype)
    for stats in (None, sums(x)):
        for leaf in (False, True):
            x_, w_, b_, cw_, cb_ = (t.clone().requires_grad_(leaf) for t in (x, weight, bias, conv_weight, conv_bias))
            torch.library.opcheck(ops_ns.batch_norm_act.default, (x_, stats, w_, b_, EPS, SLOPE))
            torch.library.opcheck(ops_ns.batch_norm_act_conv1x1.default, (x_, stats, w_, b_, EPS, SLOPE, cw_, cb_))
            torch.library.opcheck(ops_ns.batch_norm_act_conv1x1.default, (x_, stats, w_, b_, EPS, SLOPE, cw_, None))
    # the kernels one by one, as the C++ autograd composes them
    mean, invstd, scale, shift = ops_ns.batch_norm_constants(ops_ns.batch_norm_stats(x), 70, weight, bias, EPS)
    want = (ops_ns.batch_norm_leaky_relu(x, scale, shift, SLOPE),
            *ops_ns.batch_norm_leaky_relu_backward(grad, x, mean, invstd, scale, shift, SLOPE))
    x_, w_, b_ = (t.clone().requires_grad_() for t in (x, weight, bias))
    y = ops_ns.batch_norm_act(x_, None, w_, b_, EPS, SLOPE)
    got = (y, *torch.autograd.grad(y, (x_, w_, b_), grad))
    for g, w in zip(got, want):
        assert torch.equal(g, w.to(g.dtype))
    want = (ops_ns.batch_norm_leaky_relu_conv1x1(x, scale, shift, SLOPE, conv_weight, conv_bias),
            *ops_ns.batch_norm_leaky_relu_conv1x1_backward(head_grad_out, x, mean, invstd, scale, shift, SLOPE,
                                                           conv_weight))
    args = [t.clone().requires_grad_() for t in (x, weight, bias, conv_weight, conv_bias)]
    y = ops_ns.batch_norm_act_conv1x1(args[0], None, args[1], args[2], EPS, SLOPE, args[3], args[4])
    got = (y, *torch.autograd.grad(y, args, head_grad_out))
    for g, w in zip(got, want):
        assert torch.equal(g, w.to(g.dtype))


@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
def test_constants_op_matches_the_formula(wdtype):
    """batch_norm_constants (one C++ call) gives batch_norm_affine's bits: means far from zero
    (the variance's cancellation), a constant channel (variance rounding below zero, clamped), a
    zero weight, and NaN statistics passed through."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64) * torch.tensor([1, 1e-3, 10, 1, 1, 1]).view(1, -1, 1, 1)
    x = x + torch.tensor([0, 300, -5, 0, 1, 0.1]).view(1, -1, 1, 1)
    x[:, 3] = 0.7  # constant: q / n - m * m can round below zero
    stats = ops_ns.batch_norm_stats(x)
    stats[5] = float("nan")
    weight = torch.randn(6, generator=g, dtype=torch.float64).to(wdtype)
    weight[4] = 0
    bias = torch.randn(6, generator=g, dtype=torch.float64).to(wdtype)
    mean, invstd, scale, shift = ops_ns.batch_norm_constants(stats, 70, weight, bias, EPS)
    ref_mean, std, ref_scale, ref_shift = ops.batch_norm_affine(stats, 70, weight, bias, EPS)
    for got, ref in ((mean, ref_mean), (invstd, std.reciprocal()), (scale, ref_scale), (shift, ref_shift)):
        assert got.dtype == torch.float64
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(got.nan_to_num(0.0), ref.nan_to_num(0.0))
    assert torch.isnan(scale[5]) and torch.isnan(shift[5])
    finite = stats.nan_to_num(1.0)  # opcheck compares outputs with NaN != NaN
    torch.library.opcheck(ops_ns.batch_norm_constants.default, (finite, 70, weight, bias, EPS))
    with pytest.raises(RuntimeError, match="stats must be"):
        ops_ns.batch_norm_constants(stats.float(), 70, weight, bias, EPS)
    with pytest.raises(RuntimeError, match="vectors of C = 6"):
        ops_ns.batch_norm_constants(stats, 70, weight[:5], bias, EPS)
    with pytest.raises(RuntimeError, match="count must be positive"):
        ops_ns.batch_norm_constants(stats, 0, weight, bias, EPS)


def test_stats_op_and_arguments():
    x = make_inputs((2, 5, 7, 13), 9)[0]
    for dtype in DTYPES:
        got = ops_ns.batch_norm_stats(x.to(dtype))
        exact = sums(x.to(dtype))
        # float64 sums of float64 terms: an order of summation apart
        size = torch.stack([x.abs().sum((0, 2, 3)), (x * x).sum((0, 2, 3))], 1)
        assert got.dtype == torch.float64 and got.shape == (5, 2)
        assert ((got - exact).abs() <= 1e-14 * size).all()
    with pytest.raises(ValueError, match="stats must be float64"):
        ops.batch_norm_leaky_relu(x, torch.zeros(4, 2, dtype=torch.float64), torch.ones(5), torch.zeros(5), EPS)
    with pytest.raises(ValueError, match="more than one value"):
        ops.batch_norm_leaky_relu(x[:1, :, :1, :1], None, torch.ones(5), torch.zeros(5), EPS)
    with pytest.raises(RuntimeError, match="float64 vector"):
        ops_ns.batch_norm_leaky_relu(x, torch.ones(5), torch.zeros(5, dtype=torch.float64), SLOPE)
    with pytest.raises(RuntimeError, match="dtype"):
        ops_ns.batch_norm_stats(x.half())


def test_other_dtypes_fall_back():
    """bfloat16 (no C++ kernel) runs the composite expression, gradients included."""
    x, weight, bias, grad = (t.to(torch.bfloat16) for t in make_inputs((2, 3, 4, 6), 10))
    x.requires_grad_()
    y = ops.batch_norm_leaky_relu(x, None, weight, bias, EPS, SLOPE)
    ref = reference.batch_norm_leaky_relu(x.detach().double(), weight.double(), bias.double(), EPS, SLOPE)
    assert y.dtype == torch.bfloat16
    assert_close_to_reference(y, ref, name="bfloat16 fallback")
    y.backward(grad)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def head_weights(channels, outputs, seed):
    """A 1x1 conv's (outputs, channels) weight and (outputs,) bias, float32 values in float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(outputs, channels, generator=g, dtype=torch.float64) / channels**0.5
    return w.float().double(), torch.randn(outputs, generator=g, dtype=torch.float64).float().double()


HEAD_GRADS = ("head", "head grad x", "head grad weight", "head grad bias", "head grad conv weight",
              "head grad conv bias")


def head_run(fn, x, weight, bias, conv_weight, conv_bias, grad, dtype):
    """fn(x, weight, bias, conv_weight, conv_bias) in dtype and its gradients in all five for the
    output gradient `grad` (conv_bias may be None: no gradient then)."""
    args = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, weight, bias, conv_weight,
                                                                                   conv_bias)]
    y = fn(*args)
    wrt = [t for t in args if t is not None]
    grads = torch.autograd.grad(y, wrt, grad.to(dtype))
    return (y.detach(), *grads)


def head_fused(x, weight, bias, conv_weight, conv_bias):
    """ops.batch_norm_leaky_relu_conv1x1 from the given statistics, as the generator calls it."""
    return ops.batch_norm_leaky_relu_conv1x1(x, sums(x), weight, bias, EPS, SLOPE, conv_weight, conv_bias)


def head_reference(x, weight, bias, conv_weight, conv_bias):
    return reference.batch_norm_leaky_relu_conv1x1(x, weight, bias, EPS, SLOPE, conv_weight, conv_bias)


def head_grad(shape, outputs, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], outputs, *shape[2:], generator=g, dtype=torch.float64).float().double()


# (shape, outputs): one and several output channels (3, the generator's, compiled as a constant
# in the backward); planes of fewer pixels than a chunk (128), of several chunks with a partial
# last one, and of several whole chunks
HEAD_CASES = [((1, 1, 7, 13), 1), ((2, 5, 7, 13), 3), ((2, 16, 17, 19), 3), ((1, 3, 16, 32), 5), ((2, 4, 1, 9), 2)]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,outputs", HEAD_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_conv1x1_matches_reference(shape, outputs, dtype, with_bias):
    """The head op (batch norm, LeakyReLU and a 1x1 conv in one pass) and its backward against
    the composite reference in float64, as close as the reference run in dtype."""
    x, weight, bias, _ = make_inputs(shape, zlib.crc32(repr(shape).encode()))
    conv_weight, conv_bias = head_weights(shape[1], outputs, 5)
    conv_bias = conv_bias if with_bias else None
    grad = head_grad(shape, outputs, 6)
    got = head_run(head_fused, x, weight, bias, conv_weight, conv_bias, grad, dtype)
    ref64 = head_run(head_reference, x, weight, bias, conv_weight, conv_bias, grad, torch.float64)
    ref_lowp = head_run(head_reference, x, weight, bias, conv_weight, conv_bias, grad, dtype)
    assert got[0].dtype == dtype and got[0].shape == (shape[0], outputs, *shape[2:])
    for name, a, r, lp in zip(HEAD_GRADS, got, ref64, ref_lowp):
        assert a.dtype == dtype
        assert_close_to_reference(a, r, lp, name=f"{name} {shape} -> {outputs}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 23, 29), (1, 5, 16, 48)], ids=lambda s: "x".join(map(str, s)))
def test_conv1x1_outputs_have_the_bits_of_any_output_count(shape, dtype):
    """Each output pixel of the head is computed alone, so the head with 1-4 outputs (in the
    AVX-512 copy: activations kept in registers, blocks of pixels, the staged kernel for the
    pixels after the last whole block) gives the bits of the same outputs among 6 (the staged
    kernel: activations buffered per chunk), with and without bias. Planes of whole blocks and
    of a partial last chunk."""
    x, weight, bias, _ = make_inputs(shape, 21)
    xd, wd, bd = (t.to(dtype) for t in (x, weight, bias))
    conv_weight, conv_bias = (t.to(dtype) for t in head_weights(shape[1], 6, 22))
    stats = sums(xd)
    for conv_b in (conv_bias, None):
        all6 = ops.batch_norm_leaky_relu_conv1x1(xd, stats, wd, bd, EPS, SLOPE, conv_weight, conv_b)
        for outputs in (1, 2, 3, 4):
            got = ops.batch_norm_leaky_relu_conv1x1(xd, stats, wd, bd, EPS, SLOPE, conv_weight[:outputs].contiguous(),
                                                    None if conv_b is None else conv_b[:outputs].contiguous())
            assert torch.equal(got, all6[:, :outputs]), f"{outputs} outputs of {shape} {dtype}"


@pytest.mark.parametrize("outputs", [3, 2])
def test_conv1x1_gradcheck(outputs):
    x, weight, bias, _ = make_inputs((2, 3, 4, 5), 13)
    conv_weight, conv_bias = head_weights(3, outputs, 14)
    args = tuple(t.clone().requires_grad_() for t in (x, weight, bias, conv_weight, conv_bias))
    assert torch.autograd.gradcheck(head_fused, args)


def test_conv1x1_opcheck_and_errors():
    x, weight, bias, _ = make_inputs((2, 4, 5, 7), 12)
    conv_weight, conv_bias = head_weights(4, 3, 6)
    stats = ops_ns.batch_norm_stats(x)
    mean, std, scale, shift = ops.batch_norm_affine(stats, 70, weight, bias, EPS)
    grad = head_grad((2, 4, 5, 7), 3, 7)
    for dtype in DTYPES:
        args = (x.to(dtype), scale, shift, SLOPE, conv_weight.to(dtype))
        torch.library.opcheck(ops_ns.batch_norm_leaky_relu_conv1x1.default, (*args, conv_bias.to(dtype)))
        torch.library.opcheck(ops_ns.batch_norm_leaky_relu_conv1x1.default, (*args, None))
        torch.library.opcheck(ops_ns.batch_norm_leaky_relu_conv1x1_backward.default,
                              (grad.to(dtype), x.to(dtype), mean, std.reciprocal(), scale, shift, SLOPE,
                               conv_weight.to(dtype)))
    with pytest.raises(RuntimeError, match=r"weight must be \(C_out, C = 4\)"):
        ops_ns.batch_norm_leaky_relu_conv1x1(x, scale, shift, SLOPE, conv_weight[:, :3].contiguous(), conv_bias)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops_ns.batch_norm_leaky_relu_conv1x1(x, scale, shift, SLOPE, conv_weight.float(), conv_bias)
    with pytest.raises(RuntimeError, match="bias must be a vector of C_out = 3"):
        ops_ns.batch_norm_leaky_relu_conv1x1(x, scale, shift, SLOPE, conv_weight, conv_bias[:2])
    with pytest.raises(RuntimeError, match=r"grad_output must be \(N, C_out, H, W\)"):
        ops_ns.batch_norm_leaky_relu_conv1x1_backward(grad[:, :2], x, mean, std.reciprocal(), scale, shift, SLOPE,
                                                      conv_weight)
    with pytest.raises(ValueError, match="stats must be float64"):
        ops.batch_norm_leaky_relu_conv1x1(x, stats.float(), weight, bias, EPS, SLOPE, conv_weight, conv_bias)


def fused_results(x, weight, bias, grad, dtype, given_stats):
    stats = sums(x.to(dtype)) if given_stats else None
    xd, wd, bd = (t.detach().to(dtype).requires_grad_() for t in (x, weight, bias))
    y = ops.batch_norm_leaky_relu(xd, stats, wd, bd, EPS, SLOPE)
    y.backward(grad.to(dtype))
    return {"out": y.detach(), "grad_x": xd.grad, "grad_weight": wd.grad, "grad_bias": bd.grad,
            "stats": ops_ns.batch_norm_stats(xd.detach()),
            **dict(zip(HEAD_GRADS, head_run(head_fused, x, weight, bias, *head_weights(x.shape[1], 3, 7),
                                            head_grad(x.shape, 3, 8), dtype)))}


# Large enough that the channels are split among 2 threads (about 32K elements per task).
THREAD_SHAPE = (2, 16, 64, 67)


@pytest.mark.parametrize("given_stats", [False, True], ids=["stats computed", "stats given"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bits_do_not_depend_on_threads(dtype, given_stats):
    assert_thread_independent(fused_results, *make_inputs(THREAD_SHAPE, 11), dtype, given_stats)


def every_result(x, weight, bias, grad):
    """fused_results in both dtypes, with and without given statistics (the ISA worker's call)."""
    return {(str(dtype), given): fused_results(x, weight, bias, grad, dtype, given)
            for dtype in (torch.float64, torch.float32) for given in (False, True)}


ISA_SHAPES = [(2, 5, 7, 13), (1, 3, 1, 9), THREAD_SHAPE]


@pytest.mark.parametrize("isa", _C.cpu_isas_supported())
def test_under_isa(isa, tmp_path):
    """Every instruction set's copy of the kernels: close to the reference in float64 and
    float32, with and without given statistics, and the same bits with 1 and 2 threads."""
    cases = [make_inputs(shape, 100 + i) for i, shape in enumerate(ISA_SHAPES)]
    results = run_under_isa(isa, tmp_path, "test_batch_norm_leaky_relu", "every_result", cases)

    def ref(x, w, b):
        return reference.batch_norm_leaky_relu(x, w, b, EPS, SLOPE)

    for i, (x, weight, bias, grad) in enumerate(cases):
        for dtype in DTYPES:
            ref64 = run(ref, x, weight, bias, grad, torch.float64)
            ref_lowp = run(ref, x, weight, bias, grad, dtype)
            for given in (False, True):
                got = results["threads"][1][i][str(dtype), given]
                where = f"{ISA_SHAPES[i]} {dtype} stats {'given' if given else 'computed'} under {isa}"
                for k, name in enumerate(("out", "grad_x", "grad_weight", "grad_bias")):
                    assert_close_to_reference(got[name], ref64[k], ref_lowp[k], name=f"{name} {where}")
                head_args = (x, weight, bias, *head_weights(x.shape[1], 3, 7), head_grad(x.shape, 3, 8))
                head64 = head_run(head_reference, *head_args, torch.float64)
                head_lowp = head_run(head_reference, *head_args, dtype)
                for name, r, lp in zip(HEAD_GRADS, head64, head_lowp):
                    assert_close_to_reference(got[name], r, lp, name=f"{name} {where}")
                assert_same_bits(got, results["threads"][2][i][str(dtype), given], where)
