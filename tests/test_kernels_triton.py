"""Tests of the Triton kernels (kernels/gumbel_mask.py) against the C++ CPU operators and an
independent numpy transcription of Philox4x32-10.

Without CUDA the kernels run on CPU tensors through Triton's interpreter, which must be
switched on before triton.jit decorates them, hence the environment variable set first.
"""
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
INT64_MAX = 2**63 - 1


def _load_kernels():
    try:
        from oes_fast.kernels import gumbel_mask as kernels
    except ImportError:  # oes_fast not importable (not built / being edited): load the file itself
        spec = importlib.util.spec_from_file_location("_oes_fast_triton_gumbel_mask", ROOT / "kernels" / "gumbel_mask.py")
        kernels = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernels)
    if DEVICE == "cpu" and not kernels.INTERPRETED:
        # Imported earlier in this process without the interpreter: redo the decorations.
        kernels = importlib.reload(kernels)
    return kernels


K = _load_kernels()


def _load_cpp_ops():
    """torch.ops.oes_fast with the C++ CPU kernels, or None if the extension is not built."""
    try:
        import oes_fast  # noqa: F401
    except ImportError:
        try:
            torch.ops.oes_fast.gumbel_mask.default  # already registered by a partial import?
        except (AttributeError, RuntimeError):
            libs = sorted((ROOT / "oes_fast").glob("_C*.so"))
            if not libs:
                return None
            torch.ops.load_library(str(libs[0]))
    return torch.ops.oes_fast


_CPP = _load_cpp_ops()


@pytest.fixture
def cpp():
    if _CPP is None:
        pytest.skip("oes_fast._C is not built (pip install --no-build-isolation -e .)")
    return _CPP


# ---------------------------------------------------------------------------- numpy Philox
# Philox4x32-10 (Salmon et al., SC'11), written from the algorithm with numpy uint64 lanes.
_M32 = np.uint64(0xFFFFFFFF)
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)


def np_philox4x32_10(counter, key):
    """counter: 4 uint64 arrays holding 32-bit words; key: 2 words. Returns the 4 output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _M32 for c in counter)
    k0, k1 = (np.uint64(k) & _M32 for k in key)
    for _ in range(10):
        prod_a, prod_b = _ROUND_A * c0, _ROUND_B * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (prod_b >> np.uint64(32)) ^ c1 ^ k0, prod_b & _M32, (prod_a >> np.uint64(32)) ^ c3 ^ k1, prod_a & _M32
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def np_uniform(seed, offset, n):
    """float32 uniforms of the package contract for offsets offset .. offset + n - 1."""
    offs = np.uint64(offset) + np.arange(n, dtype=np.uint64)
    zero = np.zeros(n, dtype=np.uint64)
    word = np_philox4x32_10((offs & _M32, offs >> np.uint64(32), zero, zero), (seed & 0xFFFFFFFF, seed >> 32))[0]
    x = word.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def test_numpy_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    def one(counter, key):
        return tuple(int(w[0]) for w in np_philox4x32_10([np.array([c], dtype=np.uint64) for c in counter], key))

    assert one((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert one((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert one((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


# ---------------------------------------------------------------------------- uniforms

SEEDS = [0, 1, 12345, 2**31 + 7, 2**62 + 3, INT64_MAX]
OFFSETS = [0, 1000, 2**32 - 5, 2**40]  # 2**32 - 5: the block crosses the 32-bit boundary


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_uniform_bit_identical(cpp, seed, offset):
    like = torch.empty(1031, device=DEVICE)  # > one 1024 block: the second program is masked
    got = K.philox_uniform(like, seed, offset)
    assert got.dtype == torch.float32 and got.shape == like.shape and got.device == like.device
    want = torch.from_numpy(np_uniform(seed, offset, like.numel()))
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got.cpu(), cpp.philox_uniform(like.cpu(), seed, offset))


def test_uniform_shape_and_last_offsets():
    like = torch.empty(3, 5, 5, dtype=torch.bfloat16, device=DEVICE)
    got = K.philox_uniform(like, 7, INT64_MAX - like.numel())  # last valid offsets
    assert got.dtype == torch.float32 and got.shape == (3, 5, 5)
    assert torch.equal(got.cpu().flatten(), torch.from_numpy(np_uniform(7, INT64_MAX - 75, 75)))
    assert K.philox_uniform(torch.empty(0, 4, device=DEVICE), 1, 0).shape == (0, 4)


# ---------------------------------------------------------------------------- gumbel mask

SHAPES = [(1,), (7,), (3, 5, 5), (1031,), (0,)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (seed, offset, tau): small seed (passed to Triton as i32 in the interpreter) and large ones.
# tau >= 0.35 keeps exp(-(p + noise) / tau) finite in float32 for these logits (|p| <~ 10,
# |noise| <= 16.7); the saturated regime has its own tests below.
CASES = [(0, 0, 1.0), (12345, 1000, 0.5), (2**31 + 7, 2**32 - 5, 2.0 / 3.0), (2**62 + 3, 2**40, 0.35)]

# Triton and C++ use different exp/log (and the C++ build uses -ffast-math), so m differs by
# a few ulp of 1; that error is amplified where 1 - m cancels (grad_logits) or exp(x) is
# large, so the comparison is on the absolute error measured in units of each output's
# natural scale: |w| for out, |g| for grad_weight, |g * w| / tau for grad_logits. Observed
# (this CPU): float32 <= 3e-7, float64 <= 5e-16 for tau >= 0.35; bfloat16 bit-identical.
SCALED_TOL = {torch.float32: 1e-6, torch.float64: 4e-15, torch.bfloat16: 1e-6}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p, w, grad = (torch.randn(shape, generator=g, dtype=torch.float64) * s for s in (3.0, 1.0, 1.0))
    return tuple(t.to(dtype).to(DEVICE) for t in (p, w, grad))


def _ordered_bits(t):
    """Float bits mapped to integers that are consecutive for consecutive floats."""
    ints = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype]
    bits = t.contiguous().view(ints).to(torch.int64)
    return torch.where(bits < 0, torch.iinfo(ints).min - bits, bits)


def ulp_diff(a, b):
    """Elementwise distance in ulp between two tensors of the same float dtype."""
    return (_ordered_bits(a) - _ordered_bits(b)).abs()


def assert_matches(got, want, scale):
    """Triton vs C++: |got - want| <= SCALED_TOL * scale; bfloat16 also passes within 1 ulp."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    assert not got.isnan().any()
    err = (got.double() - want.double()).abs()
    ok = err <= SCALED_TOL[got.dtype] * scale.cpu().double()
    if got.dtype == torch.bfloat16:
        ok |= ulp_diff(got, want) <= 1  # float32 results a few ulp apart may round apart
    bad = (~ok).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} elements differ, first at {bad[0].tolist()}: {got[tuple(bad[0])]} vs " \
                             f"{want[tuple(bad[0])]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_cpp(cpp, dtype, shape):
    p, w, _ = _inputs(shape, dtype)
    for seed, offset, tau in CASES:
        got = K.gumbel_mask_forward(p, w, seed, offset, tau)
        assert got.device == p.device
        assert_matches(got, cpp.gumbel_mask(p.cpu(), w.cpu(), seed, offset, tau), w.abs())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_with_slope_matches_cpp(cpp, dtype, shape):
    p, w, _ = _inputs(shape, dtype)
    for seed, offset, tau in CASES:
        masked, slope = K.gumbel_mask_with_slope(p, w, seed, offset, tau)
        assert torch.equal(masked, K.gumbel_mask_forward(p, w, seed, offset, tau))
        want = cpp.gumbel_mask_with_slope(p.cpu(), w.cpu(), seed, offset, tau)[1]
        assert_matches(slope, want, w.abs() / tau)


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_cpp(cpp, dtype, shape, weight_grad):
    p, w, grad = _inputs(shape, dtype)
    for seed, offset, tau in CASES:
        gp, gw = K.gumbel_mask_backward(grad, p, w, seed, offset, tau, weight_grad)
        assert gp.device == p.device and gw.device == p.device
        want_gp, want_gw = cpp.gumbel_mask_backward(grad.cpu(), p.cpu(), w.cpu(), seed, offset, tau, weight_grad)
        assert_matches(gp, want_gp, (grad.double() * w.double()).abs() / tau)
        if weight_grad:
            assert_matches(gw, want_gw, grad.abs())
        else:
            assert gw.shape == (0,) and gw.dtype == dtype


SATURATED = (torch.tensor([-30.0, -20.0, 20.0, 30.0]).repeat(4), 0.1)  # |p + noise| / tau > 89


def test_bfloat16_is_float32_rounded_to_nearest_even():
    # The bfloat16 path computes in float32 and rounds once, to nearest even (the interpreter
    # alone would truncate; the kernels round by hand there).
    p, w, grad = _inputs((1031,), torch.bfloat16)
    args = (12345, 2**32 - 5, 0.5)
    want = K.gumbel_mask_forward(p.float(), w.float(), *args).bfloat16()
    assert torch.equal(K.gumbel_mask_forward(p, w, *args), want)
    gp, gw = K.gumbel_mask_backward(grad, p, w, *args, True)
    gp32, gw32 = K.gumbel_mask_backward(grad.float(), p.float(), w.float(), *args, True)
    assert torch.equal(gp, gp32.bfloat16()) and torch.equal(gw, gw32.bfloat16())


# numpy (under the interpreter) warns about the exp overflow that these tests are about.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saturated_mask_is_exact(dtype):
    # Computed in float32, exp(-x) would overflow to inf for the negative logits: its argument
    # is capped at 80, as in the C++ kernels, so m is their 1 / (1 + e^80) = 1.8e-35 there (not
    # 0, not nan) and exactly 1 for the positive ones; the slope (e m) m / tau stays finite
    # (uncapped, e m would be inf * 0). On the positive side it is e^-x / tau, tiny but not 0
    # (1 - m, 0 in float32, gave 0): its accuracy is test_gumbel_mask.py's
    # test_slope_of_saturated_mask.
    p, tau = SATURATED
    p = p.to(dtype).to(DEVICE)
    w = torch.ones_like(p)
    m = K.gumbel_mask_forward(p, w, 5, 0, tau).cpu()
    pos, neg = (p > 0).cpu(), (p < 0).cpu()
    assert torch.equal(m[pos], torch.ones_like(m[pos]))
    assert ((m[neg] > 0) & (m[neg] < 2e-35)).all()
    gp, gw = (t.cpu() for t in K.gumbel_mask_backward(w, p, w, 5, 0, tau, True))
    assert torch.equal(gw, m)
    assert torch.isfinite(gp).all() and (gp >= 0).all() and (gp[neg] < 2e-34).all() and (gp[pos] < 2e-13).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_saturated_mask_matches_cpp(cpp):
    # C++ caps the exp argument (fast-math 1/(1+inf) would be NaN): saturated masks agree to 1e-30
    p, tau = SATURATED
    w = torch.ones_like(p)
    got = cpp.gumbel_mask(p, w, 5, 0, tau)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(K.gumbel_mask_forward(p.to(DEVICE), w.to(DEVICE), 5, 0, tau).cpu(), got,
                               rtol=0, atol=1e-30)


def test_float64_against_numpy_formula():
    # Independent of the C++ op: numpy uniforms and the formula written out in float64.
    p, w, grad = _inputs((3, 5, 5), torch.float64)
    seed, offset, tau = 2**62 + 3, 2**32 - 5, 0.3  # 0.3 is not a float32: tau must stay double
    u = np.clip(np_uniform(seed, offset, 75), np.float32(2.0**-24), np.float32(1 - 2.0**-24)).astype(np.float64)
    m = 1.0 / (1.0 + np.exp(-(p.cpu().numpy().ravel() + np.log(u) - np.log1p(-u)) / tau))
    m = torch.from_numpy(m).reshape(3, 5, 5)
    pc, wc, gc = p.cpu(), w.cpu(), grad.cpu()
    torch.testing.assert_close(K.gumbel_mask_forward(p, w, seed, offset, tau).cpu(), wc * m, rtol=1e-12, atol=1e-15)
    gp, gw = K.gumbel_mask_backward(grad, p, w, seed, offset, tau, True)
    torch.testing.assert_close(gp.cpu(), gc * wc * m * (1 - m) / tau, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gw.cpu(), gc * m, rtol=1e-12, atol=1e-15)


def test_non_contiguous_inputs():
    p, w, grad = _inputs((7, 5), torch.float32)
    pt, wt, gt = p.t(), w.t(), grad.t()  # (5, 7), non-contiguous
    assert not pt.is_contiguous()
    out = K.gumbel_mask_forward(pt, wt, 3, 11, 0.7)
    assert out.is_contiguous() and torch.equal(out, K.gumbel_mask_forward(pt.contiguous(), wt.contiguous(), 3, 11, 0.7))
    gp, gw = K.gumbel_mask_backward(gt, pt, wt, 3, 11, 0.7, True)
    gp2, gw2 = K.gumbel_mask_backward(gt.contiguous(), pt.contiguous(), wt.contiguous(), 3, 11, 0.7, True)
    assert torch.equal(gp, gp2) and torch.equal(gw, gw2)


def test_input_checks():
    p, w, grad = _inputs((4,), torch.float32)
    fwd = K.gumbel_mask_forward
    with pytest.raises(ValueError, match="same shape"):
        fwd(p, w[:3], 0, 0, 1.0)
    with pytest.raises(TypeError, match="same dtype"):
        fwd(p, w.double(), 0, 0, 1.0)
    with pytest.raises(TypeError, match="float32, float64 or bfloat16"):
        fwd(p.half(), w.half(), 0, 0, 1.0)
    for tau in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tau"):
            fwd(p, w, 0, 0, tau)
    for seed in (-1, 2**63):
        with pytest.raises(ValueError, match="seed"):
            fwd(p, w, seed, 0, 1.0)
    for offset in (-1, INT64_MAX - 3):
        with pytest.raises(ValueError, match="offset"):
            fwd(p, w, 0, offset, 1.0)
    with pytest.raises(TypeError, match="seed"):
        fwd(p, w, 1.5, 0, 1.0)
    with pytest.raises(ValueError, match="grad"):
        K.gumbel_mask_backward(grad[:3], p, w, 0, 0, 1.0, True)
    with pytest.raises(ValueError, match="offset"):
        K.philox_uniform(p, 0, -1)
    fwd(p, w, 0, INT64_MAX - 4, 1.0)  # the last valid offset passes
