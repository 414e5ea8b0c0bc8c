"""The C++ (CPU) gumbel_mask / philox_uniform ops against oes_fast.reference, plus the OES search
step of the reference against the closed form of oes-spec.md section 3."""
import math
import time

import numpy as np
import pytest
import torch

import oes_fast
import oes_fast._C as _C
from oes_fast import reference
from oes_fast.flat import FlatLayout
from oes_fast.ops import philox_uniform
from cpu_variants import run_under_isa
from tolerances import assert_close_to_reference

ops = torch.ops.oes_fast
TAU = 0.2
SEED = 1234
OFFSET = 17

# ------------------------------------------------------------------------------ Philox in numpy
_M32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def philox4x32_10(ctr, key):
    """All four output words of Philox4x32-10 (Salmon et al., Random123), numpy uint64 lanes."""
    c = [np.asarray(x, dtype=np.uint64) for x in ctr]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        prod_a = np.uint64(0xD2511F53) * c[0]  # < 2^64: exact in uint64
        prod_b = np.uint64(0xCD9E8D57) * c[2]
        c = [(prod_b >> _32) ^ c[1] ^ k0, prod_b & _M32, (prod_a >> _32) ^ c[3] ^ k1, prod_a & _M32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return c


def numpy_uniform(seed: int, offsets: np.ndarray) -> np.ndarray:
    """tl.rand(seed, offset): first word as int32, ~x if negative, to float32, times the scale."""
    offsets = np.asarray(offsets, dtype=np.uint64)
    zero = np.zeros_like(offsets)
    word = philox4x32_10([offsets & _M32, offsets >> _32, zero, zero], [seed & 0xFFFFFFFF, seed >> 32])[0]
    x = word.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


@pytest.mark.parametrize(
    "ctr, key, expected",
    [  # known-answer vectors of Random123 (kat_vectors, philox4x32 10 rounds)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_numpy_philox_known_answers(ctr, key, expected):
    assert tuple(int(w) for w in philox4x32_10(ctr, key)) == expected


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 7, 2**62 + 3])
@pytest.mark.parametrize("offset", [0, 2**32 - 5, 2**40])
def test_philox_uniform_bitwise(seed, offset):
    n = 257  # from 2**32 - 5 the counter's low word wraps and the high word carries
    like = torch.empty(n)
    op = philox_uniform(like, seed, offset)
    ref = reference.philox_uniform(seed, offset + torch.arange(n))
    expected = torch.from_numpy(numpy_uniform(seed, offset + np.arange(n, dtype=np.uint64)))
    assert op.dtype == torch.float32 and op.shape == like.shape
    assert torch.equal(ref, expected), "reference.philox_uniform differs from the numpy Philox"
    assert torch.equal(op, expected), "the C++ philox_uniform differs from the numpy Philox"
    assert 0.0 <= float(op.min()) and float(op.max()) <= 1.0


def test_philox_uniform_shape_and_statistics():
    like = torch.empty(3, 5, 7, dtype=torch.float64)
    u = philox_uniform(like, 5, 3)
    assert u.shape == like.shape and u.dtype == torch.float32 and u.is_contiguous()
    assert torch.equal(u.reshape(-1), reference.philox_uniform(5, 3 + torch.arange(like.numel())))
    big = philox_uniform(torch.empty(200_000), 11, 0).double()
    assert abs(float(big.mean()) - 0.5) < 0.005 and abs(float(big.var()) - 1 / 12) < 0.002
    assert not torch.equal(philox_uniform(torch.empty(64), 11, 0), philox_uniform(torch.empty(64), 12, 0))


# ------------------------------------------------------------------------------ forward
SHAPES = [(1,), (7,), (3, 5, 5), (1031,), (16, 32, 5, 5), (0,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def make_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    weight = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return logits, weight


def uniforms_like(t, seed=SEED, offset=OFFSET):
    return reference.philox_uniform(seed, offset + torch.arange(t.numel())).view(t.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(shape, dtype):
    logits, weight = make_inputs(shape, dtype)
    u = uniforms_like(logits)
    out = oes_fast.gumbel_mask(logits, weight, SEED, OFFSET, TAU)
    assert out.shape == logits.shape and out.dtype == dtype
    ref64 = reference.gumbel_mask(logits.double(), weight.double(), u, TAU)
    ref_lowp = reference.gumbel_mask(logits, weight, u, TAU)
    assert_close_to_reference(out, ref64, ref_lowp, name="gumbel_mask")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_non_contiguous(dtype):
    # element j is the j-th element in row-major order of the logical shape, whatever the strides
    base_p, base_w = make_inputs((7, 5), dtype, seed=3)
    logits, weight = base_p.t(), base_w.t()
    assert not logits.is_contiguous()
    u = uniforms_like(logits)
    out = oes_fast.gumbel_mask(logits, weight, SEED, OFFSET, TAU)
    assert out.shape == (5, 7) and out.is_contiguous()
    ref64 = reference.gumbel_mask(logits.double(), weight.double(), u, TAU)
    assert_close_to_reference(out, ref64, reference.gumbel_mask(logits, weight, u, TAU))
    mixed = oes_fast.gumbel_mask(logits, weight.contiguous(), SEED, OFFSET, TAU)  # one strided input
    assert torch.equal(mixed, out)


def test_forward_is_deterministic_and_seeded():
    logits, weight = make_inputs((1031,), torch.float32)
    a = oes_fast.gumbel_mask(logits, weight, SEED, OFFSET)
    assert torch.equal(a, oes_fast.gumbel_mask(logits, weight, SEED, OFFSET))
    assert not torch.equal(a, oes_fast.gumbel_mask(logits, weight, SEED + 1, OFFSET))
    assert not torch.equal(a, oes_fast.gumbel_mask(logits, weight, SEED, OFFSET + 1))


def test_mask_distribution():
    # m = sigmoid((p + L) / tau) with logistic L: P(m > 1/2) = sigmoid(p)
    n = 100_000
    for p in (-1.5, 0.0, 2.0):
        m = oes_fast.gumbel_mask(torch.full((n,), p), torch.ones(n), 7, 0)
        assert abs(float((m > 0.5).double().mean()) - 1 / (1 + math.exp(-p))) < 0.01


# ------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (3, 5, 5), (1031,), (0,)], ids=str)
def test_backward_op_matches_reference(shape, dtype):
    logits, weight = make_inputs(shape, dtype, seed=1)
    grad = make_inputs(shape, dtype, seed=2)[0]
    u = uniforms_like(logits)
    gp, gw = ops.gumbel_mask_backward(grad, logits, weight, SEED, OFFSET, TAU, True)
    ref64 = reference.gumbel_mask_backward(grad.double(), logits.double(), weight.double(), u, TAU)
    ref_lowp = reference.gumbel_mask_backward(grad, logits, weight, u, TAU)
    assert_close_to_reference(gp, ref64[0], ref_lowp[0], name="grad_logits")
    assert_close_to_reference(gw, ref64[1], ref_lowp[1], name="grad_weight")
    gp_only, gw_none = ops.gumbel_mask_backward(grad, logits, weight, SEED, OFFSET, TAU, False)
    assert torch.equal(gp_only, gp) and gw_none.numel() == 0


def test_backward_reference_matches_autograd():
    logits, weight = make_inputs((3, 5, 5), torch.float64, seed=4)
    grad = make_inputs((3, 5, 5), torch.float64, seed=5)[0]
    u = uniforms_like(logits)
    p, w = logits.clone().requires_grad_(), weight.clone().requires_grad_()
    auto = torch.autograd.grad(reference.gumbel_mask(p, w, u, TAU), (p, w), grad)
    closed = reference.gumbel_mask_backward(grad, logits, weight, u, TAU)
    # autograd differentiates torch.sigmoid as grad * m * (1 - m): where m is nearly 1, 1 - m
    # keeps m's rounding (an ulp of 1, 2^-53) as an absolute error, 1e-10 relative at x = 16 and
    # 2e-4 at x = 30 in this sample; the closed form takes m * sigmoid(-x) and is exact to a few
    # ulps. So besides the relative bound, each element may differ by a few 2^-53 of
    # |grad * w * m / tau| (the largest seen: 2.5 of them), a term that exceeds the relative
    # one only where 1 - m < 1e-3 (the cancellation's region).
    m = reference.gumbel_sigmoid(logits, u, TAU)
    bound = 1e-12 * auto[0].abs() + 1e-15 + 8 * 2.0**-53 * (grad * weight * m).abs() / TAU
    assert ((closed[0] - auto[0]).abs() <= bound).all(), float(((closed[0] - auto[0]).abs() / bound).max())
    torch.testing.assert_close(closed[1], auto[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_through_op_matches_reference(dtype):
    logits, weight = make_inputs((16, 3, 3), dtype, seed=6)
    grad = make_inputs((16, 3, 3), dtype, seed=7)[0]
    u = uniforms_like(logits)
    p, w = logits.clone().requires_grad_(), weight.clone().requires_grad_()
    oes_fast.gumbel_mask(p, w, SEED, OFFSET, TAU).backward(grad)
    p64, w64 = logits.double().clone().requires_grad_(), weight.double().clone().requires_grad_()
    reference.gumbel_mask(p64, w64, u, TAU).backward(grad.double())
    pl, wl = logits.clone().requires_grad_(), weight.clone().requires_grad_()
    reference.gumbel_mask(pl, wl, u, TAU).backward(grad)
    assert_close_to_reference(p.grad, p64.grad, pl.grad, name="logits.grad")
    assert_close_to_reference(w.grad, w64.grad, wl.grad, name="weight.grad")


def test_autograd_only_logits_requires_grad():
    logits, weight = make_inputs((9,), torch.float64)
    p = logits.clone().requires_grad_()
    out = oes_fast.gumbel_mask(p, weight, SEED, OFFSET, TAU)
    (g,) = torch.autograd.grad(out.sum(), p)
    ref = reference.gumbel_mask_backward(torch.ones(9, dtype=torch.float64), logits, weight, uniforms_like(logits), TAU)
    assert_close_to_reference(g, ref[0])


def test_gradcheck_float64():
    logits, weight = make_inputs((2, 3, 4), torch.float64, seed=8)
    logits.requires_grad_()
    weight.requires_grad_()
    # the noise is regenerated from (seed, offset), so every evaluation sees the same mask
    assert torch.autograd.gradcheck(lambda p, w: oes_fast.gumbel_mask(p, w, SEED, OFFSET, TAU), (logits, weight))


# ------------------------------------------------------------------------------ saturated masks
def _triton_gumbel_mask():
    """kernels/gumbel_mask.py on CUDA, or through the interpreter on CPU tensors; None if neither."""
    try:
        from oes_fast.kernels import gumbel_mask as kernels
    except ImportError:
        return None
    return kernels if torch.cuda.is_available() or kernels.INTERPRETED else None


SLOPE_IMPLS = {
    "op_with_slope": lambda p, w, u, tau: oes_fast.ops.gumbel_mask_with_slope(p, w, SEED, OFFSET, tau)[1],
    "op_backward": lambda p, w, u, tau: ops.gumbel_mask_backward(torch.ones_like(p), p, w, SEED, OFFSET, tau,
                                                                 False)[0],
    "reference": lambda p, w, u, tau: reference.gumbel_mask_backward(torch.ones_like(p), p, w, u, tau)[0],
    "triton_with_slope": lambda p, w, u, tau: _triton_gumbel_mask().gumbel_mask_with_slope(p, w, SEED, OFFSET,
                                                                                            tau)[1],
    "triton_backward": lambda p, w, u, tau: _triton_gumbel_mask().gumbel_mask_backward(
        torch.ones_like(p), p, w, SEED, OFFSET, tau, False)[0],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("impl", list(SLOPE_IMPLS))
def test_slope_of_saturated_mask(impl, dtype):
    """d(w m)/dp = w m (1 - m) / tau where m is within 1e-6 of 1 (and of 0): every backend takes
    m (1 - m) as (e m) m, e = exp(-x), and must stay close to the float64 value in relative
    terms. Computed as m * (1 - m), float32 rounds m to 1 for x > 16.6 and the slope to 0.

    The float32 slope cannot be within a few ulps of the float64 one: x = (p + L) / tau is itself
    rounded (p + L and the logs of L, a few ulps of |x|), and where m saturates d slope / slope =
    -dx, so the bound is a few ulps of |x| (the largest seen: 1.4 ulps of |x|, 2e-6 relative),
    four orders of magnitude below the cancellation's 100 %. tau = 1: with the logistic noise's
    spread (x runs over [24, 41] and [-39, -23] on the +-31 quarters of the sample), a smaller
    tau would push x past the exp cap of 80 or leave part of the sample unsaturated."""
    if impl.startswith("triton") and _triton_gumbel_mask() is None:
        pytest.skip("Triton kernels need CUDA or the interpreter")
    device = "cuda" if impl.startswith("triton") and torch.cuda.is_available() else "cpu"
    n, tau = 4096, 1.0
    g = torch.Generator().manual_seed(3)
    p64 = torch.tensor([31.0, -31.0, 15.0, -15.0], dtype=torch.float64).repeat_interleave(n // 4)
    w64 = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    u = reference.philox_uniform(SEED, OFFSET + torch.arange(n))
    x64 = (p64 + reference.logistic_noise(u)) / tau
    # the sample's regime: m within 1e-6 of 1 on the first quarter, of 0 on the second, and no
    # exp near its cap or the float32 slope near underflow anywhere
    assert (torch.sigmoid(-x64[:n // 4]) < 1e-6).all() and (torch.sigmoid(x64[n // 4:n // 2]) < 1e-6).all()
    assert x64.abs().max() < 42
    ref64 = reference.gumbel_mask_backward(torch.ones(n, dtype=torch.float64), p64, w64, u, tau)[0]
    slope = SLOPE_IMPLS[impl](p64.to(dtype).to(device), w64.to(dtype).to(device), u.to(device), tau).cpu()
    assert slope.dtype == dtype and torch.isfinite(slope).all()
    ulp = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    rel = (slope.double() - ref64).abs() / ref64
    bound = 4 * ulp * (x64.abs() + 4)
    j = int((rel / bound).argmax())
    assert (rel <= bound).all(), (f"{impl} {dtype}: slope {slope[j].item():.9g} vs float64 {ref64[j].item():.9g} "
                                  f"at x = {x64[j].item():.4f}, relative error {rel[j].item():.3g} > {bound[j].item():.3g}")


def test_kl_prior_grad_of_saturated_logits():
    """dKL/dp = dKL/ds * s (1 - s) for |p| from 10 to 40 in float64, 1 - s taken as sigmoid(-p)
    (reference) and exp(-p) s (CPU kernel): computed as 1 - s it keeps s's rounding, 1e-3 relative
    at p = 30, and is 0 beyond p = 37."""
    p = torch.cat([torch.linspace(10, 40, 61), -torch.linspace(10, 40, 61)]).double()
    for density in (0.05, 0.5, 0.9):
        ref = reference.kl_prior_grad(p, density)
        assert (ref != 0).all()
        torch.testing.assert_close(oes_fast.ops.kl_prior(p, density)[1], ref, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ opcheck, compile
def test_opcheck_gumbel_mask():
    logits, weight = make_inputs((3, 4), torch.float32)
    torch.library.opcheck(ops.gumbel_mask.default, (logits, weight, SEED, OFFSET, TAU))
    torch.library.opcheck(ops.gumbel_mask.default, (logits.requires_grad_(), weight.requires_grad_(), SEED, 0, TAU))


def test_opcheck_gumbel_mask_backward():
    logits, weight = make_inputs((3, 4), torch.float64)
    grad = torch.ones_like(logits)
    for weight_grad in (True, False):
        torch.library.opcheck(ops.gumbel_mask_backward.default, (grad, logits, weight, SEED, OFFSET, TAU, weight_grad))


def test_opcheck_philox_uniform():
    torch.library.opcheck(ops.philox_uniform.default, (torch.empty(2, 5, dtype=torch.float64), SEED, OFFSET))


def _masked_sum(logits, weight):
    return (oes_fast.gumbel_mask(logits, weight, SEED, OFFSET, TAU) * 2).sum(0)


def test_compile_fullgraph_aot_eager():
    # traces through the fake implementation and the registered autograd without a C++ compiler
    logits, weight = make_inputs((4, 6), torch.float32)
    compiled = torch.compile(_masked_sum, fullgraph=True, backend="aot_eager")
    p1, p2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = compiled(p1, weight)
    expected = _masked_sum(p2, weight)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(p1.grad, p2.grad)


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    logits, weight = make_inputs((4, 6), torch.float32)
    start = time.perf_counter()
    out = torch.compile(_masked_sum, fullgraph=True)(logits, weight)
    print(f"inductor compile + run: {time.perf_counter() - start:.1f} s")
    torch.testing.assert_close(out, _masked_sum(logits, weight), rtol=0, atol=0)


# ------------------------------------------------------------------------------ input errors
def _error(fn, *args):
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        fn(*args)
    return str(info.value)


def test_input_errors():
    p, w = torch.zeros(5), torch.ones(5)
    assert "same shape" in _error(ops.gumbel_mask, p, torch.ones(4), 0, 0, TAU)
    assert "same shape" in _error(ops.gumbel_mask, p, torch.ones(5, 1), 0, 0, TAU)
    assert "same dtype" in _error(ops.gumbel_mask, p, w.double(), 0, 0, TAU)
    msg = _error(ops.gumbel_mask, p.long(), w.long(), 0, 0, TAU)
    assert "dtype" in msg and "Long" in msg
    assert "dtype" in _error(ops.gumbel_mask, p.half(), w.half(), 0, 0, TAU)
    for tau in (0.0, -0.5):
        assert "tau" in _error(ops.gumbel_mask, p, w, 0, 0, tau)
    assert "seed" in _error(ops.gumbel_mask, p, w, -1, 0, TAU)
    assert "offset" in _error(ops.gumbel_mask, p, w, 0, -3, TAU)
    assert "offset" in _error(ops.gumbel_mask, p, w, 0, 2**63 - 2, TAU)  # offset + numel overflows
    assert "seed" in _error(ops.philox_uniform, p, -1, 0)
    assert "grad" in _error(ops.gumbel_mask_backward, torch.ones(4), p, w, 0, 0, TAU, True)
    # the Python wrappers check seed and offset before the op
    with pytest.raises(ValueError, match="seed"):
        oes_fast.gumbel_mask(p, w, -1)
    with pytest.raises(ValueError, match="seed"):
        oes_fast.gumbel_mask(p, w, 2**63)
    with pytest.raises(ValueError, match="offset"):
        oes_fast.gumbel_mask(p, w, 0, -1)
    with pytest.raises(ValueError, match="seed"):
        philox_uniform(p, -2)


@pytest.mark.parametrize("tau", [float("nan"), float("inf"), -float("inf"), 0.0, -1.0])
def test_non_finite_tau_rejected(tau):
    # the C++ check itself (compiled with -ffast-math, so it tests the bits) and the wrapper's
    with pytest.raises(RuntimeError, match="tau"):
        torch.ops.oes_fast.gumbel_mask(torch.zeros(5), torch.ones(5), 0, 0, tau)
    with pytest.raises(ValueError, match="tau"):
        oes_fast.gumbel_mask(torch.zeros(5), torch.ones(5), 0, 0, tau)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a cross-device pair")
def test_device_mismatch_cuda():
    with pytest.raises(RuntimeError, match="same device"):
        ops.gumbel_mask(torch.zeros(5), torch.ones(5, device="cuda"), 0, 0, TAU)


def test_device_mismatch_meta():
    # a CPU/meta pair dispatches to the fake kernel, which checks like the real ones
    with pytest.raises(ValueError, match="same device"):
        torch.ops.oes_fast.gumbel_mask(torch.zeros(5), torch.ones(5, device="meta"), 0, 0, TAU)


# ------------------------------------------------------------------------------ flat launches
def tiny_skip(seed=0):
    return oes_fast.models.skip(seed=seed, in_channels=4, channels_down=(4, 4), channels_up=(4, 4),
                                channels_skip=(0, 0))


def test_flat_launch_equals_per_parameter_launches():
    model = tiny_skip()
    layout = FlatLayout.from_model(model)
    base = 1000
    g = torch.Generator().manual_seed(9)
    flat_logits = torch.randn(layout.numel, generator=g)
    flat_weight = layout.flatten(dict(model.named_parameters())).detach()
    flat_out = oes_fast.gumbel_mask(flat_logits, flat_weight, SEED, base)
    u_flat = philox_uniform(flat_logits, SEED, base)
    ref64 = reference.gumbel_mask(flat_logits.double(), flat_weight.double(),
                                  reference.philox_uniform(SEED, base + torch.arange(layout.numel)), TAU)
    logits_views, weight_views = layout.views(flat_logits), layout.views(flat_weight)
    ref64_views = layout.views(ref64)
    u_views = layout.views(u_flat)
    per_param = {}
    for name, offset in zip(layout.names, layout.offsets):
        p, w = logits_views[name], weight_views[name]
        # the noise of one parameter is exactly the flat stream's slice
        assert torch.equal(philox_uniform(p, SEED, base + offset), u_views[name]), name
        per_param[name] = oes_fast.gumbel_mask(p, w, SEED, base + offset)
        u = uniforms_like(p, SEED, base + offset)
        assert_close_to_reference(per_param[name], ref64_views[name], reference.gumbel_mask(p, w, u, TAU), name=name)
    assert_close_to_reference(flat_out, ref64, reference.gumbel_mask(flat_logits, flat_weight, u_flat, TAU))
    # every element takes the same vector code path wherever its launch starts: bitwise equal
    assert torch.equal(layout.flatten(per_param), flat_out)


def test_result_independent_of_split():
    g = torch.Generator().manual_seed(10)
    n = 100_003
    p, w = torch.randn(n, generator=g), torch.randn(n, generator=g)
    full = oes_fast.gumbel_mask(p, w, SEED, 0)
    for start in (1, 5, 13, 257):
        assert torch.equal(oes_fast.gumbel_mask(p[start:], w[start:], SEED, start), full[start:]), start
    for stop in (100, 300):  # elements of full tiles through the partial-tile path
        assert torch.equal(oes_fast.gumbel_mask(p[:stop], w[:stop], SEED, 0), full[:stop]), stop
        masked, slope = oes_fast.ops.gumbel_mask_with_slope(p[:stop], w[:stop], SEED, 0, TAU)
        assert torch.equal(masked, full[:stop]), stop
        grads = torch.ops.oes_fast.gumbel_mask_backward(w[:stop], p[:stop], w[:stop], SEED, 0, TAU, True)
        full_grads = torch.ops.oes_fast.gumbel_mask_backward(w, p, w, SEED, 0, TAU, True)
        assert all(torch.equal(a, b[:stop]) for a, b in zip(grads, full_grads)), stop
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert torch.equal(oes_fast.gumbel_mask(p, w, SEED, 0), full), "thread count"
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ KL prior, search step
def test_kl_prior_grad_matches_autograd():
    g = torch.Generator().manual_seed(11)
    logits = torch.cat([3 * torch.randn(200, generator=g, dtype=torch.float64),
                        torch.tensor([0.0, -20.0, 20.0], dtype=torch.float64)])
    for density in (0.05, 0.5, 0.9):
        p = logits.clone().requires_grad_()
        (auto,) = torch.autograd.grad(reference.kl_prior(p, density), p)
        torch.testing.assert_close(reference.kl_prior_grad(logits, density), auto, rtol=1e-10, atol=1e-14)


def test_kl_prior_values():
    # KL(Bernoulli(s) || Bernoulli(rho)) is ~0 at s = rho and positive elsewhere
    rho = 0.05
    at_rho = torch.tensor([math.log(rho / (1 - rho))], dtype=torch.float64)
    assert abs(float(reference.kl_prior(at_rho, rho))) < 1e-4
    assert float(reference.kl_prior(torch.zeros(3, dtype=torch.float64), rho)) > 0


def _search_setup():
    model = tiny_skip().double()
    side = model.min_side
    layout = FlatLayout.from_model(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(12)
    logits = {n: 0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in weights.items()}
    z = oes_fast.models.dip_input(4, side, side, seed=0).double()
    y = torch.rand(1, 3, side, side, generator=g, dtype=torch.float64)

    def uniforms(step):
        flat = reference.philox_uniform(oes_fast.rng.stream_seed(step, "search"), torch.arange(layout.numel))
        return {n: v.clone() for n, v in layout.views(flat).items()}

    return model, weights, logits, uniforms, z, y


def test_search_gradient_matches_closed_form():
    model, weights, logits, uniforms, z, y = _search_setup()
    u = uniforms(0)
    density, kl = 0.05, 1e-3  # kl large enough that the prior term is visible in the gradient
    leaves = {n: p.clone().requires_grad_() for n, p in logits.items()}
    loss = reference.search_loss(model, weights, leaves, u, z, y, density, TAU, kl)
    auto = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    # closed form: dL/dw_eff * W0 * m (1 - m) / tau + kl * dKL/dp, with dL/dw_eff by autograd
    w_eff = {n: reference.gumbel_mask(logits[n], weights[n], u[n], TAU).requires_grad_() for n in weights}
    data = torch.mean((reference.masked_forward(model, w_eff, z) - y) ** 2)
    grad_w = dict(zip(w_eff, torch.autograd.grad(data, list(w_eff.values()))))
    prior_share = 0.0
    for n in weights:
        m = reference.gumbel_sigmoid(logits[n], u[n], TAU)
        prior = kl * reference.kl_prior_grad(logits[n], density)
        closed = grad_w[n] * weights[n] * m * (1 - m) / TAU + prior
        torch.testing.assert_close(auto[n], closed, rtol=1e-9, atol=1e-15, msg=lambda s, n=n: f"{n}: {s}")
        prior_share = max(prior_share, float(prior.abs().max() / closed.abs().max().clamp_min(1e-300)))
    assert prior_share > 1e-3, "the test setup does not exercise the KL term"


def test_search_step_adam_matches_torch_optim():
    model, weights, logits, uniforms, z, y = _search_setup()
    density, kl, lr = 0.05, 1e-3, 0.01
    params = [p.clone().requires_grad_() for p in logits.values()]
    optimizer = torch.optim.Adam(params, lr=lr)
    state, current = {}, dict(logits)
    for step in range(3):
        u = uniforms(step)
        loss, current = reference.search_step(model, weights, current, u, z, y, density, state, TAU, kl, lr)
        optimizer.zero_grad()
        torch_loss = reference.search_loss(model, weights, dict(zip(logits, params)), u, z, y, density, TAU, kl)
        torch_loss.backward()
        optimizer.step()
        torch.testing.assert_close(loss, torch_loss.detach(), rtol=1e-12, atol=0)
        for (n, new), p in zip(current.items(), params):
            torch.testing.assert_close(new, p.detach(), rtol=1e-10, atol=1e-13, msg=lambda s, n=n: f"step {step} {n}: {s}")
    assert all(not torch.equal(current[n], logits[n]) for n in logits)


def test_cpu_slope_does_not_underflow_where_the_mask_is_nearly_0():
    """At x = -60 in float32 the slope m (1 - m) is about 1e-26, far above float32's smallest
    normal; formed as (m * m) * e (a regrouping -ffast-math allows) it would underflow to 0. The
    forward's slope and the backward's gradient must both keep it, with the same bits."""
    p, w = torch.full((4096,), -60.0), torch.ones(4096)
    _, slope = oes_fast.ops.gumbel_mask_with_slope(p, w, SEED, OFFSET, 1.0)
    grad_logits, _ = torch.ops.oes_fast.gumbel_mask_backward(torch.ones(4096), p, w, SEED, OFFSET, 1.0, True)
    assert (slope > 0).all() and (grad_logits > 0).all()
    assert torch.equal(grad_logits, slope)


def saturated_masks(logits, weight):
    """gumbel_mask of saturated logits (float32 and float64) at TAU / 2: {dtype: mask}."""
    return {str(d): torch.ops.oes_fast.gumbel_mask(logits.to(d), weight.to(d), SEED, 0, TAU / 2)
            for d in (torch.float32, torch.float64)}


@pytest.mark.parametrize("isa", _C.cpu_isas_supported())
def test_saturated_mask_under_every_isa(isa, tmp_path):
    """Logits of +-20 to +-40 at tau = 0.1 saturate the sigmoid whatever the noise: the mask is
    the weight exactly on the positive side, under every instruction set (AVX2's reciprocal
    estimate once made 1 / 1 come out 0.99999994), and below 1e-30 on the negative side (the
    kernels cap exp's argument at 80 in float32, 700 in float64: sigmoid_and_complement)."""
    logits = torch.cat([torch.linspace(20, 40, 40), -torch.linspace(20, 40, 40)]).double()
    weight = torch.ones_like(logits)
    out = run_under_isa(isa, tmp_path, "test_gumbel_mask", "saturated_masks", [(logits, weight)])
    for threads, (masks,) in out["threads"].items():
        for dtype, mask in masks.items():
            where = f"{isa}, {threads} threads, {dtype}"
            assert (mask[:40] == 1).all(), where
            assert (mask[40:] >= 0).all() and (mask[40:] < 1e-30).all(), where
