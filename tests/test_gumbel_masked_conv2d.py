"""gumbel_masked_conv2d (issue 5): the CPU composite op (autograd, opcheck) and the Triton
kernels (through the interpreter on CPU) against oes_fast.reference in float64: the masked
weights reference.gumbel_mask(p, w, u) with u = reference.philox_uniform(seed, offset + j),
padded with F.pad and convolved with F.conv2d."""
import pytest
import torch
import torch.nn.functional as F

import oes_fast
import oes_fast.ops  # noqa: F401  (registers the ops)
from oes_fast import reference
from oes_fast.ops import gumbel_masked_conv2d
from tolerances import assert_close_to_reference

ops = torch.ops.oes_fast
SEED, OFFSET, TAU = 987654321, 4242, 0.2

# (N, C_in, C_out, H, W) per kernel size: odd sizes, tiny for the interpreter
SHAPES = {1: (1, 3, 4, 5, 7), 3: (2, 3, 2, 7, 5), 5: (1, 4, 3, 9, 7)}
CASES = [(k, mode) for k in (1, 3, 5) for mode in ("reflect", "zeros")]


def make(k, dtype, bias=True, seed=0):
    n, c_in, c_out, h, w = SHAPES[k]
    g = torch.Generator().manual_seed(seed + k)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    p = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64) * 2
    wt = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    grad = torch.randn(n, c_out, h, w, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(p), cast(wt), cast(b), cast(grad)


def reference_conv(x, p, w, b, grad, padding, mode, dtype=torch.float64):
    """(output, grad_input, grad_logits, grad_weight, grad_bias) of the reference in `dtype`."""
    x, p, w = (t.detach().to(dtype).requires_grad_() for t in (x, p, w))
    b = None if b is None else b.detach().to(dtype).requires_grad_()
    u = reference.philox_uniform(SEED, OFFSET + torch.arange(w.numel())).view(w.shape)
    w_eff = reference.gumbel_mask(p, w, u, TAU)
    xp = F.pad(x, [padding] * 4, mode="reflect" if mode == "reflect" else "constant")
    out = F.conv2d(xp, w_eff, b)
    out.backward(grad.to(dtype))
    return out.detach(), x.grad, p.grad, w.grad, None if b is None else b.grad


def check_all(got, x, p, w, b, grad, padding, mode, dtype):
    names = ("output", "grad_input", "grad_logits", "grad_weight", "grad_bias")
    ref64 = reference_conv(x, p, w, b, grad, padding, mode)
    ref_lowp = reference_conv(x, p, w, b, grad, padding, mode, dtype) if dtype != torch.float64 else ref64
    for name, out, r64, rlo in zip(names, got, ref64, ref_lowp):
        if r64 is None:
            continue
        assert out.dtype == dtype, name
        # factor 4: the kernels sum the products in another order than the reference (same
        # number of roundings, different ones); floor covers float32 sums that happen to be exact
        assert_close_to_reference(out, r64, rlo, factor=4.0, name=name)


# ------------------------------------------------------------------------------ CPU composite
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, mode", CASES)
def test_op_cpu_matches_reference(k, mode, dtype):
    x, p, w, b, grad = make(k, dtype)
    x, p, w, b = (t.requires_grad_() for t in (x, p, w, b))
    out = gumbel_masked_conv2d(x, p, w, b, SEED, OFFSET, TAU, (k - 1) // 2, mode)
    out.backward(grad)
    check_all((out.detach(), x.grad, p.grad, w.grad, b.grad), x, p, w, b, grad, (k - 1) // 2, mode, dtype)


def test_op_only_logits_gradient_and_no_bias():
    x, p, w, _, grad = make(3, torch.float64, bias=False)
    p.requires_grad_()
    out = gumbel_masked_conv2d(x, p, w, None, SEED, OFFSET, TAU)  # padding defaults to 'same'
    out.backward(grad)
    _, _, want, _, _ = reference_conv(x, p, w, None, grad, 1, "reflect")
    assert out.shape == grad.shape and w.grad is None and x.grad is None
    torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-12)


def test_backward_op_output_mask():
    x, p, w, _, grad = make(3, torch.float64)
    gi, gl, gw, gb = ops.gumbel_masked_conv2d_backward(grad, x, p, w, SEED, OFFSET, TAU, 1, "reflect",
                                                       [False, True, False, True])
    assert gi.shape == (0,) and gw.shape == (0,) and gl.shape == p.shape and gb.shape == (w.shape[0],)


def test_gradcheck_float64():
    x, p, w, b, _ = make(3, torch.float64)
    args = tuple(t.requires_grad_() for t in (x, p, w, b))
    assert torch.autograd.gradcheck(lambda *a: gumbel_masked_conv2d(*a, SEED, OFFSET, TAU, 1, "reflect"), args)


def test_noise_is_the_flat_streams():
    """Weight element j draws the flat stream's uniform at (seed, offset + j), as gumbel_mask
    does: the op equals the float64 reference built from those uniforms, and not at offset + 1."""
    x, p, w, b, grad = make(5, torch.float64)
    want = reference_conv(x, p, w, b, grad, 2, "reflect")[0]
    assert_close_to_reference(gumbel_masked_conv2d(x, p, w, b, SEED, OFFSET, TAU), want)
    assert (gumbel_masked_conv2d(x, p, w, b, SEED, OFFSET + 1, TAU) - want).abs().max() > 1e-3


@pytest.mark.parametrize("bad, error", [
    (dict(padding_mode="circular"), ValueError),
    (dict(padding=7), ValueError),  # reflection padding must be smaller than the sides
    (dict(tau=0.0), ValueError),
])
def test_rejects_bad_arguments(bad, error):
    x, p, w, b, _ = make(3, torch.float64)
    kwargs = dict(seed=SEED, offset=OFFSET, tau=TAU, padding=1, padding_mode="reflect") | bad
    with pytest.raises((error, RuntimeError)):
        gumbel_masked_conv2d(x, p, w, b, **kwargs)


def test_opcheck():
    for k, mode in ((3, "reflect"), (1, "zeros")):
        x, p, w, b, grad = make(k, torch.float64)
        pad = (k - 1) // 2
        torch.library.opcheck(ops.gumbel_masked_conv2d.default, (x, p, w, b, SEED, OFFSET, TAU, pad, mode))
        torch.library.opcheck(ops.gumbel_masked_conv2d.default,
                              (x.requires_grad_(), p.requires_grad_(), w, None, SEED, OFFSET, TAU, pad, mode))
        torch.library.opcheck(ops.gumbel_masked_conv2d_backward.default,
                              (grad, x.detach(), p.detach(), w, SEED, OFFSET, TAU, pad, mode, [True, True, False, True]))


# ------------------------------------------------------------------------------ Triton (interpreter)
@pytest.fixture(scope="module")
def triton_kernels():
    pytest.importorskip("triton")
    from oes_fast.kernels import gumbel_masked_conv2d as kernels

    if not kernels.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 before triton is imported")
    return kernels


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("pad, h, w", [(1, 2, 5), (2, 3, 7), (2, 9, 4), (3, 4, 11)])
def test_fold_reflect_padding_is_the_adjoint_of_reflect_padding(triton_kernels, pad, h, w):
    """The launchers' deterministic fold against aten's reflection_pad2d_backward (on the CPU),
    on integer-valued gradients so that every order of the additions gives the same bits; and
    the adjoint identity <pad(x), g> = <x, fold(g)>."""
    g = torch.randint(-50, 50, (2, 3, h + 2 * pad, w + 2 * pad), generator=torch.Generator().manual_seed(pad + h),
                      dtype=torch.float64)
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    folded = triton_kernels.fold_reflect_padding(g, pad)
    assert folded.is_contiguous()
    assert torch.equal(folded, torch.ops.aten.reflection_pad2d_backward(g, x, [pad] * 4))
    lhs = (F.pad(x, [pad] * 4, mode="reflect") * g).sum()
    torch.testing.assert_close(lhs, (x * folded).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, mode", CASES)
def test_triton_matches_reference(triton_kernels, k, mode, dtype):
    x, p, w, b, grad = make(k, dtype)
    d = _device()
    pad = (k - 1) // 2
    out = triton_kernels.gumbel_masked_conv2d_forward(x.to(d), p.to(d), w.to(d), b.to(d), SEED, OFFSET, TAU, pad, mode)
    grads = triton_kernels.gumbel_masked_conv2d_backward(grad.to(d), x.to(d), p.to(d), w.to(d), SEED, OFFSET, TAU,
                                                         pad, mode, [True, True, True, True])
    check_all([t.cpu() for t in (out, *grads)], x, p, w, b, grad, pad, mode, dtype)


def test_triton_large_offset_and_logits_only(triton_kernels):
    """64-bit offsets past 2^32 and grad_weight skipped (empty) in the weight-gradient kernel."""
    global OFFSET
    x, p, w, b, grad = make(3, torch.float64)
    d = _device()
    saved, OFFSET = OFFSET, 2**33 + 5
    try:
        gi, gl, gw, gb = triton_kernels.gumbel_masked_conv2d_backward(grad.to(d), x.to(d), p.to(d), w.to(d), SEED,
                                                                      OFFSET, TAU, 1, "zeros",
                                                                      [False, True, False, False])
        out = triton_kernels.gumbel_masked_conv2d_forward(x.to(d), p.to(d), w.to(d), None, SEED, OFFSET, TAU, 1,
                                                          "zeros")
        ref = reference_conv(x, p, w, None, grad, 1, "zeros")
    finally:
        OFFSET = saved
    assert gi.numel() == gw.numel() == gb.numel() == 0
    torch.testing.assert_close(out.cpu(), ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gl.cpu(), ref[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_logits_of_saturated_mask(backend, dtype, request):
    """grad_logits = dW * w * m (1 - m) / tau where m is within 1e-6 of 1 (logits +31) or of 0
    (-31), tau 1: the backends take m (1 - m) as (e m) m (computed as m * (1 - m), float32 rounds
    m to 1 and the gradient to 0), so they stay close to the float64 value in relative terms.
    The float64 value is built from the reference's slope (test_gumbel_mask.py:
    test_slope_of_saturated_mask) and dW by autograd of the plain conv (no sigmoid), since
    autograd through torch.sigmoid cancels the same way. Input and grad_output are positive, so
    dW has no cancellation: the bound is the slope's (a few ulps of |x|, x being rounded) plus an
    ulp per summed pixel."""
    kernels = request.getfixturevalue("triton_kernels") if backend == "triton" else None
    d = _device() if backend == "triton" else "cpu"
    n, c_in, c_out, h, wd, k, pad, tau = 1, 3, 2, 6, 6, 3, 1, 1.0
    g = torch.Generator().manual_seed(17)
    x = torch.rand(n, c_in, h, wd, generator=g, dtype=torch.float64) + 0.5
    grad = torch.rand(n, c_out, h, wd, generator=g, dtype=torch.float64) + 0.5
    w = torch.rand(c_out, c_in, k, k, generator=g, dtype=torch.float64) + 0.5
    p = torch.where(torch.arange(w.numel()) % 2 == 0, 31.0, -31.0).to(torch.float64).view(w.shape)
    u = reference.philox_uniform(SEED, OFFSET + torch.arange(w.numel())).view(w.shape)
    x_mask = (p + reference.logistic_noise(u)) / tau
    assert (torch.sigmoid(-x_mask.abs()) < 1e-6).all() and x_mask.abs().max() < 42
    w_eff = reference.gumbel_mask(p, w, u, tau).requires_grad_()
    F.conv2d(F.pad(x, [pad] * 4), w_eff).backward(grad)
    expected = w_eff.grad * reference.gumbel_mask_backward(torch.ones_like(p), p, w, u, tau)[0]
    args = [t.to(dtype).to(d) for t in (grad, x, p, w)] + [SEED, OFFSET, tau, pad, "zeros"]
    if backend == "cpu":
        got = ops.gumbel_masked_conv2d_backward(*args, [False, True, False, False])[1]
    else:
        got = kernels.gumbel_masked_conv2d_backward(*args, [False, True, False, False])[1]
    got = got.cpu()
    assert got.dtype == dtype and torch.isfinite(got).all()
    ulp = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    rel = (got.double() - expected).abs() / expected
    bound = ulp * (4 * (x_mask.abs() + 4) + n * h * wd)
    assert (rel <= bound).all(), f"relative error {float(rel.max()):.3g}, bound {float(bound.min()):.3g}"


# ------------------------------------------------------------------------------ fused search step
def _tiny_problem(dtype=torch.float32):
    from oes_fast.models import Skip, initialize

    model = Skip(in_channels=4, out_channels=3, channels_down=(4, 5), channels_up=(4, 5), channels_skip=(2, 0),
                 filter_down=5, filter_up=3, filter_skip=1).to(dtype)
    initialize(model, seed=3)
    g = torch.Generator().manual_seed(1)
    z = torch.rand(1, 4, 16, 16, generator=g, dtype=dtype) * 0.1
    y = torch.rand(1, 3, 16, 16, generator=g, dtype=dtype)
    return model, z, y


def test_fused_step_follows_the_unfused_trajectory():
    """Five steps of the fused engine (every conv through gumbel_masked_conv2d, the rest through
    per-run gumbel_mask) against the unfused loop of oes_fast.search: same logits, same losses,
    same batch-norm running statistics."""
    from torch.func import functional_call

    from oes_fast.flat import FlatLayout
    from oes_fast.fused_search import FusedForward
    from oes_fast.mask_search import SearchStep

    tau, kl, density, seed, steps = 0.2, 1e-3, 0.1, 77, 5  # kl large enough to matter
    runs = {}
    for engine in ("unfused", "fused"):
        model, z, y = _tiny_problem()
        run = SearchStep(model, z, y, density=density, lr=0.01, tau=tau, kl=kl, seed=seed, engine=engine)
        if engine == "fused":
            assert len(run.fused.fused) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        losses = []
        for i in range(steps):
            loss, prior = run(i)
            losses.append(loss.item() + kl * prior.item())
        runs[engine] = (run.logits.detach().clone(), losses, [b.clone() for b in model.buffers()])
    (l_u, loss_u, buf_u), (l_f, loss_f, buf_f) = runs["unfused"], runs["fused"]
    assert l_u.abs().max() > 0.01  # the logits moved
    # on the CPU the fused op is the composite of the same kernels, so the forward and the
    # masked weights' gradient are bit-identical; the chain rule to the logits runs in the conv
    # backward for one engine and in logit_adam_step_ for the other, which may round an element
    # one ulp apart. Conv biases before batch norm have a zero true gradient, whose rounding
    # noise Adam turns into +-lr steps; a difference there would show as ~1e-2.
    torch.testing.assert_close(l_f, l_u, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(loss_f), torch.tensor(loss_u), rtol=1e-6, atol=0)
    for a, b in zip(buf_f, buf_u):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the forward alone, as mask_search.py calls it
    model, z, _ = _tiny_problem()
    layout = FlatLayout.from_model(model)
    weights = layout.flatten({n: p.detach() for n, p in model.named_parameters()})
    p = torch.randn(layout.numel, generator=torch.Generator().manual_seed(5))
    want = functional_call(model, layout.views(oes_fast.ops.gumbel_mask(p, weights, seed, 3 * layout.numel, tau)), (z,))
    got = FusedForward(model, layout, weights, seed, tau)(p, z, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------ GPU launch configuration
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, mode", [(5, "reflect"), (3, "zeros")])
def test_triton_gpu_tiles_and_split_k_match_reference(triton_kernels, k, mode, dtype):
    """The launch configuration the GPU uses (GPU_TILES, split-K with atomics) rather than the
    interpreter's 16x16x16 tiles: same kernels, same reference. min_rows_per_split is lowered
    so these small images split the weight gradient's pixel reduction as a large one would."""
    x, p, w, b, grad = make(k, dtype)
    d = _device()
    pad = (k - 1) // 2
    with triton_kernels.gpu_launch_config(sms=132, min_rows_per_split=16):
        gpu = triton_kernels.GPU_TILES[("forward", "float64" if dtype == torch.float64 else "ieee")]
        fwd = triton_kernels.forward_launch(x, p, w, b, grad, SEED, OFFSET, None, False, TAU, pad, mode)
        assert (fwd[3]["BLOCK_M"], fwd[3]["BLOCK_K"], fwd[3]["num_warps"]) == (gpu.block_m, gpu.block_k, gpu.num_warps)
        wgrad = triton_kernels.weight_grad_launch(grad, x, p, w, p, None, SEED, OFFSET, None, False, TAU, pad, mode,
                                                  triton_kernels._gpu_launch(x.device))
        assert wgrad[1][2] > 1 and wgrad[3]["ATOMIC"], "the test must exercise split-K"
        out = triton_kernels.gumbel_masked_conv2d_forward(x.to(d), p.to(d), w.to(d), b.to(d), SEED, OFFSET, TAU, pad,
                                                          mode)
        grads = triton_kernels.gumbel_masked_conv2d_backward(grad.to(d), x.to(d), p.to(d), w.to(d), SEED, OFFSET, TAU,
                                                             pad, mode, [True, True, True, True])
    check_all([t.cpu() for t in (out, *grads)], x, p, w, b, grad, pad, mode, dtype)
