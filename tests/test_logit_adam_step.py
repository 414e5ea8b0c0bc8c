"""The CPU search step's pair of ops against the float64 reference: gumbel_mask_with_slope
(the masked weights and their slope in the logits) and logit_adam_step_ (chain rule, KL prior
and Adam in one pass), and the latter against the unfused composite and torch's Adam."""
import pytest
import torch
from torch.library import opcheck

import oes_fast._C as _C
from oes_fast import ops, reference
from oes_fast.mask_search import LogitAdam
from cpu_variants import run_under_isa
from tolerances import assert_close_to_reference, tolerance

SEED, OFFSET, TAU, DENSITY, KL, LR = 1234, 5_000_000_000, 0.2, 0.05, 1e-3, 0.01
BETAS, EPS = (0.9, 0.999), 1e-8
# The kernels (C++ and Triton) take 1 - beta2 in float32 from beta2 rounded to float32: that
# coefficient of the new g^2 term is off by 1.3e-5 relative (torch.optim.Adam rounds 1 - beta2
# itself, off by 6e-8). Since (1 - beta2) g^2 <= exp_avg_sq, exp_avg_sq's error from it is at
# most this fraction of exp_avg_sq: the float32 comparison of exp_avg_sq allows exactly that.
BETA2_ROUNDING = abs((1 - torch.tensor(BETAS[1], dtype=torch.float32).item()) / (1 - BETAS[1]) - 1)


def make_state(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g, dtype=torch.float64) * 2
    w = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    grad = torch.randn(n, generator=g, dtype=torch.float64) * 1e-3
    m = torch.randn(n, generator=g, dtype=torch.float64) * 1e-4
    v = torch.rand(n, generator=g, dtype=torch.float64) * 1e-7
    return [t.to(dtype) for t in (p, m, v, grad, w)]


def reference_step(p, m, v, grad, w, step):
    """(new logits, exp_avg, exp_avg_sq, prior value) from oes_fast.reference, in p's dtype;
    with `w`, `grad` is the gradient of the masked weights gumbel_mask(p, w) at (SEED, OFFSET)."""
    if w is not None:
        u = reference.philox_uniform(SEED, OFFSET + torch.arange(p.numel()))
        grad = reference.gumbel_mask_backward(grad, p, w, u, TAU)[0]
    grad = grad + KL * reference.kl_prior_grad(p, DENSITY)
    state = dict(step=step - 1, exp_avg=m, exp_avg_sq=v)
    new_p = reference.adam_update(p, grad, state, LR, BETAS, EPS)
    return new_p, state["exp_avg"], state["exp_avg_sq"], reference.kl_prior(p, DENSITY)


def fused_step(p, m, v, grad, w, step):
    """The search step's way: the slope from gumbel_mask_with_slope, then logit_adam_step_."""
    slope = None if w is None else ops.gumbel_mask_with_slope(p, w, SEED, OFFSET, TAU)[1]
    p, m, v = p.clone(), m.clone(), v.clone()
    value = ops.logit_adam_step_(p, m, v, grad, step=step, density=DENSITY, kl=KL, lr=LR, betas=BETAS, eps=EPS,
                                 grad_scale=slope)
    return p, m, v, value


def assert_step_matches_reference(got, state, masked, step):
    """`got` = (logits, exp_avg, exp_avg_sq, prior) after a step from `state` (make_state's list)
    against reference_step in float64, with the error bound of the reference in state's dtype."""
    w = state[4] if masked else None
    ref64 = reference_step(*[t.double() for t in state[:4]], None if w is None else w.double(), step=step)
    ref_lowp = reference_step(*state[:4], w, step=step)
    for name, a, r, rl in zip(("logits", "exp_avg", "exp_avg_sq", "prior"), got, ref64, ref_lowp):
        floor = tolerance(a.dtype).floor + (BETA2_ROUNDING if name == "exp_avg_sq" and a.dtype == torch.float32 else 0)
        assert_close_to_reference(a.reshape(-1), r.reshape(-1), rl.reshape(-1).to(a.dtype), floor=floor, name=name)
    # the update moved the logits (by up to lr), so the comparison above is not vacuous (in
    # bfloat16 a step of lr is below the resolution of most logits; there the moments, compared
    # with a floor scaled to their size, show a step that did nothing)
    if state[0].dtype != torch.bfloat16:
        assert (got[0].double() - state[0].double()).abs().max() > LR / 100


@pytest.mark.parametrize("n", [1, 257, 20_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gumbel_mask_with_slope(n, dtype):
    p, _, _, _, w = make_state(n, dtype)
    masked, slope = ops.gumbel_mask_with_slope(p, w, SEED, OFFSET, TAU)
    # the masked weights are gumbel_mask's, bit for bit (same kernel)
    assert torch.equal(masked, ops.gumbel_mask(p, w, SEED, OFFSET, TAU))
    u = reference.philox_uniform(SEED, OFFSET + torch.arange(n))
    ref64 = reference.gumbel_mask_backward(torch.ones(n, dtype=torch.float64), p.double(), w.double(), u, TAU)[0]
    ref_lowp = reference.gumbel_mask_backward(torch.ones(n, dtype=dtype), p, w, u, TAU)[0]
    assert_close_to_reference(slope, ref64, ref_lowp, name="slope")
    assert slope.abs().max() > 0


@pytest.mark.parametrize("n", [1, 255, 256, 257, 20_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False], ids=["masked-weight-grad", "logit-grad"])
def test_matches_reference(n, dtype, masked):
    state = make_state(n, dtype)
    w = state[4] if masked else None
    assert_step_matches_reference(fused_step(*state[:4], w, step=7), state, masked, step=7)


@pytest.fixture(scope="module")
def triton_kernels():
    """The Triton kernels of the pair (the CUDA implementation), on CUDA tensors with a GPU and
    through the interpreter on CPU tensors without one (conftest switches it on)."""
    pytest.importorskip("triton")
    from oes_fast.kernels import gumbel_mask, logit_adam_step

    if not torch.cuda.is_available() and not gumbel_mask.INTERPRETED:
        pytest.skip("triton was imported before the interpreter was switched on")
    return gumbel_mask, logit_adam_step


@pytest.mark.parametrize("n", [1, 1025, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False], ids=["masked-weight-grad", "logit-grad"])
def test_triton_matches_reference(triton_kernels, n, dtype, masked):
    gumbel_mask, logit_adam_step = triton_kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = make_state(n, dtype, seed=5)
    p, m, v, grad, w = (t.to(device, copy=True) for t in state)  # updated in place
    slope = gumbel_mask.gumbel_mask_with_slope(p, w, SEED, OFFSET, TAU)[1] if masked else None
    value = logit_adam_step.logit_adam_step_(p, m, v, grad, slope, DENSITY, KL, LR, *BETAS, EPS, 7)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_step_matches_reference([t.cpu() for t in (p, m, v, value)], state, masked, step=7)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kl_gradient_of_saturated_logits(backend, request):
    """The prior's gradient dKL/ds * s (1 - s) inside the step, for |p| from 10 to 40 in float64:
    from zero moments with no data gradient and kl = 1, exp_avg = (1 - beta1) * dKL/dp. The
    kernels take 1 - s as e s (e = exp(-p)); computed as 1 - s it keeps s's rounding (1e-3
    relative at p = 30) and is 0 beyond p = 37."""
    p = torch.cat([torch.linspace(10, 40, 61), -torch.linspace(10, 40, 61)]).double()
    beta1 = 0.5
    for density in (0.05, 0.5, 0.9):
        logits, m, v, g = p.clone(), torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
        if backend == "cpu":
            ops.logit_adam_step_(logits, m, v, g, step=1, density=density, kl=1.0, lr=LR, betas=(beta1, BETAS[1]),
                                 eps=EPS)
        else:
            _, kernels = request.getfixturevalue("triton_kernels")
            device = "cuda" if torch.cuda.is_available() else "cpu"
            logits, m, v, g = (t.to(device) for t in (logits, m, v, g))
            kernels.logit_adam_step_(logits, m, v, g, None, density, 1.0, LR, beta1, BETAS[1], EPS, 1)
        ref = reference.kl_prior_grad(p, density)
        assert (ref != 0).all()
        torch.testing.assert_close(m.cpu() / (1 - beta1), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("masked", [True, False])
def test_matches_the_unfused_composite(masked):
    """The CUDA implementation (composed of gumbel_mask_backward, kl_prior and Adam's ops), run
    on CPU tensors, computes the same step."""
    p, m, v, grad, w = make_state(3000, torch.float32, seed=3)
    scale = torch.rand(3000, generator=torch.Generator().manual_seed(1)) if masked else None
    p1, m1, v1 = p.clone(), m.clone(), v.clone()
    value1 = ops.logit_adam_step_(p1, m1, v1, grad, step=2, density=DENSITY, kl=KL, lr=LR, grad_scale=scale)
    got = (p1, m1, v1, value1)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    value = ops.logit_adam_step_composite(p2, m2, v2, grad, scale, DENSITY, KL, LR, *BETAS, EPS, 2)
    for a, b in zip(got, (p2, m2, v2, value)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_prior_value_independent_of_threads():
    p, m, v, grad, w = make_state(300_000, torch.float32, seed=4)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fused_step(p, m, v, grad, w, step=1))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_update_independent_of_position():
    """Full tiles run in place and the last partial one through padded copies, by the same
    compiled loop: an element's update has the same bits wherever its launch starts."""
    p, m, v, grad, w = make_state(10_007, torch.float32, seed=5)
    slope = ops.gumbel_mask_with_slope(p, w, SEED, OFFSET, TAU)[1]
    full = [t.clone() for t in (p, m, v)]
    step = dict(step=3, density=DENSITY, kl=KL, lr=LR, betas=BETAS, eps=EPS)
    ops.logit_adam_step_(*full, grad, grad_scale=slope, **step)
    # a suffix moves every tile boundary; a short prefix sends elements of full tiles through
    # the partial-tile path
    for piece in (slice(1, None), slice(5, None), slice(13, None), slice(257, None), slice(0, 100), slice(0, 300)):
        part = [t[piece].clone() for t in (p, m, v)]
        ops.logit_adam_step_(*part, grad[piece], grad_scale=slope[piece], **step)
        for name, a, b in zip(("logits", "exp_avg", "exp_avg_sq"), part, full):
            assert torch.equal(a, b[piece]), (name, piece)


def test_logit_adam_follows_torch_adam():
    """LogitAdam with kl = 0 on logit gradients is torch.optim.Adam with default options, and
    their state dicts load into each other."""
    g = torch.Generator().manual_seed(9)
    p0 = torch.randn(500, generator=g, dtype=torch.float64)
    grads = [torch.randn(500, generator=g, dtype=torch.float64) for _ in range(4)]
    theirs = p0.clone().requires_grad_(True)
    adam = torch.optim.Adam([theirs], lr=LR)
    ours = LogitAdam(p0.clone(), lr=LR)
    for k, grad in enumerate(grads):
        theirs.grad = grad.clone()
        adam.step()
        ours.step(grad, density=DENSITY, kl=0.0)
        torch.testing.assert_close(ours.logits, theirs.detach(), rtol=0, atol=1e-14)
        if k == 1:  # hand torch's state to a fresh LogitAdam mid-run
            resumed = LogitAdam(theirs.detach().clone(), lr=LR)
            resumed.load_state_dict(adam.state_dict())
            assert resumed.steps == 2
            ours = resumed
    fresh = torch.optim.Adam([p0.clone().requires_grad_(True)], lr=LR)
    fresh.load_state_dict(ours.state_dict())
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], ours.exp_avg, rtol=0, atol=0)


def test_opcheck():
    p, m, v, grad, w = make_state(600, torch.float32)
    opcheck(torch.ops.oes_fast.logit_adam_step_.default, (p, m, v, grad, w, DENSITY, KL, LR, *BETAS, EPS, 3),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    opcheck(torch.ops.oes_fast.gumbel_mask_with_slope.default, (p, w, SEED, OFFSET, TAU))


@pytest.mark.parametrize("change, message", [
    (dict(grad=torch.zeros(5)), "grad must match logits"),
    (dict(exp_avg=torch.zeros(10, dtype=torch.float64)), "exp_avg must match logits"),
    (dict(grad_scale=torch.zeros(9)), "grad_scale must match logits"),
    (dict(logits=torch.zeros(20)[::2]), "logits must be contiguous"),
    (dict(density=1.0), "density must be in"),
    (dict(density=0.0), "density must be in"),
    (dict(step=0), "step counts from 1"),
    (dict(lr=float("nan")), "lr must be positive"),
    (dict(betas=(0.9, 1.0)), "betas must be in"),
])
def test_bad_input(change, message):
    kwargs = dict(logits=torch.zeros(10), exp_avg=torch.zeros(10), exp_avg_sq=torch.zeros(10), grad=torch.zeros(10),
                  step=1, density=0.05, kl=1e-9, lr=0.01, betas=BETAS, eps=EPS, grad_scale=torch.ones(10))
    kwargs.update(change)
    logits, exp_avg, exp_avg_sq, grad = (kwargs.pop(k) for k in ("logits", "exp_avg", "exp_avg_sq", "grad"))
    with pytest.raises(ValueError, match=message):
        ops.logit_adam_step_(logits, exp_avg, exp_avg_sq, grad, **kwargs)
    # the C++ checks say the same without the Python wrapper
    args = (logits, exp_avg, exp_avg_sq, grad, kwargs["grad_scale"], kwargs["density"], kwargs["kl"], kwargs["lr"],
            *kwargs["betas"], kwargs["eps"], kwargs["step"])
    with pytest.raises(RuntimeError, match=message.split(" must")[0].split(" counts")[0]):
        torch.ops.oes_fast.logit_adam_step_(*args)


def step_without_prior(p, m, v, grad):
    """One logit_adam_step_ at step 1 with kl = 0 (Adam alone), on copies: {name: tensor}."""
    p, m, v = p.clone(), m.clone(), v.clone()
    ops.logit_adam_step_(p, m, v, grad, step=1, density=DENSITY, kl=0.0, lr=LR, betas=BETAS, eps=EPS)
    return {"logits": p, "exp_avg": m, "exp_avg_sq": v}


@pytest.mark.parametrize("isa", _C.cpu_isas_supported())
def test_subnormal_second_moment(isa, tmp_path):
    """Gradients of 1e-25 to 1e-15 make exp_avg_sq = (1 - beta2) g^2 subnormal in float32 (below
    1.2e-38). -ffast-math computes the vector sqrt of it from an estimated reciprocal square root,
    which is infinite for a subnormal on SSE and AVX2 (not AVX-512): the search's logits turned
    NaN on an AVX2 machine. Every instruction set, 1 and 2 threads, against torch's Adam in
    float64."""
    n = 301
    g = torch.Generator().manual_seed(8)
    grad = torch.logspace(-25, -15, n, dtype=torch.float64) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    p = torch.randn(n, generator=g, dtype=torch.float64)
    state = [t.float() for t in (p, torch.zeros(n), torch.zeros(n), grad)]
    assert (state[3].double() ** 2 * (1 - BETAS[1]) < torch.finfo(torch.float32).tiny).sum() > n // 2
    ref = dict(step=0, exp_avg=torch.zeros(n, dtype=torch.float64), exp_avg_sq=torch.zeros(n, dtype=torch.float64))
    ref_p = reference.adam_update(state[0].double(), state[3].double(), ref, LR, BETAS, EPS)
    out = run_under_isa(isa, tmp_path, "test_logit_adam_step", "step_without_prior", [tuple(state)])
    for threads, (got,) in out["threads"].items():
        assert torch.isfinite(got["logits"]).all(), f"{isa}, {threads} threads: non-finite logits"
        # the update g / (|g| + eps) * lr is below 1e-9 here: the logits keep their float32 values
        torch.testing.assert_close(got["logits"].double(), ref_p, rtol=2e-7, atol=0)
        torch.testing.assert_close(got["exp_avg"].double(), ref["exp_avg"], rtol=2e-6, atol=1e-45)
        torch.testing.assert_close(got["exp_avg_sq"].double(), ref["exp_avg_sq"], rtol=2e-5, atol=2e-45)
