"""Every operator on CUDA tensors, on both CUDA backends (the CUDA C++ kernels of the extension,
when it was built with nvcc, and the Triton kernels), against oes_fast.reference in float64 with
the same-dtype error rule of tests/tolerances.py; the random stream bit for bit against the
reference (and so against the CPU kernels). Shapes are large enough for the GPU's own launch
configuration: the fused convolution's GPU_TILES (not the interpreter's 16x16x16 tiles) and the
weight gradient's split-K with atomics. Skipped without a CUDA device; bench/gpu_check.sh runs
this module first.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import oes_fast  # noqa: E402
from oes_fast import _C, ops, reference  # noqa: E402
from oes_fast.sparse import to_csr  # noqa: E402
from tolerances import assert_close_to_reference  # noqa: E402

SEED, OFFSET, TAU = 987654321, 4242, 0.2
BACKENDS = ["triton"] + (["cuda"] if _C.with_cuda else [])
FLAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@contextlib.contextmanager
def backend(name):
    saved = ops.cuda_backend()
    ops.set_cuda_backend(name)
    try:
        yield
    finally:
        ops.set_cuda_backend(saved)


def uniforms(shape, seed=SEED, offset=OFFSET):
    n = 1
    for s in shape:
        n *= s
    return reference.philox_uniform(seed, offset + torch.arange(n)).view(shape)


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ------------------------------------------------------------------------------ random stream
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("n, offset", [(1, 0), (1000, 7), ((1 << 20) + 7, 2**40 + 3), (4097, 2**63 - 5000)])
def test_philox_stream_bit_identical(name, n, offset):
    like = torch.empty(n, device="cuda")
    with backend(name):
        got = ops.philox_uniform(like, SEED, offset).cpu()
    assert torch.equal(got, reference.philox_uniform(SEED, offset + torch.arange(n)))
    assert torch.equal(got, ops.philox_uniform(torch.empty(n), SEED, offset))  # the CPU kernel


# ------------------------------------------------------------------------------ flat mask ops
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", FLAT_DTYPES)
@pytest.mark.parametrize("n", [1, 3000, 300_001])
def test_gumbel_mask_forward_backward(name, dtype, n):
    p64, w64, g64 = randn(n, seed=1, scale=2), randn(n, seed=2), randn(n, seed=3)
    u = uniforms((n,))
    p, w, g = (t.to(dtype).cuda() for t in (p64, w64, g64))
    with backend(name):
        out = torch.ops.oes_fast.gumbel_mask(p, w, SEED, OFFSET, TAU)
        grad_p, grad_w = torch.ops.oes_fast.gumbel_mask_backward(g, p, w, SEED, OFFSET, TAU, True)
    lowp = [t.to(dtype) for t in (p64, w64, g64)]
    assert_close_to_reference(out, reference.gumbel_mask(p64, w64, u, TAU),
                              reference.gumbel_mask(lowp[0], lowp[1], u, TAU), name="output")
    for got, r64, rlo, what in zip((grad_p, grad_w), reference.gumbel_mask_backward(g64, p64, w64, u, TAU),
                                   reference.gumbel_mask_backward(lowp[2], lowp[0], lowp[1], u, TAU),
                                   ("grad_logits", "grad_weight")):
        assert_close_to_reference(got, r64, rlo, name=what)


@pytest.mark.parametrize("dtype", FLAT_DTYPES)
def test_gumbel_mask_with_slope_and_device_offset(dtype):
    """The search step's pair on CUDA, and the offset read from device memory (CUDA graphs):
    bit-identical to the same launch with the offset as an argument."""
    n = 100_003
    p64, w64 = randn(n, seed=4, scale=2), randn(n, seed=5)
    u = uniforms((n,))
    p, w = p64.to(dtype).cuda(), w64.to(dtype).cuda()
    masked, slope = ops.gumbel_mask_with_slope(p, w, SEED, OFFSET, TAU)
    lowp = (p64.to(dtype), w64.to(dtype))
    ones = torch.ones(n, dtype=torch.float64)
    assert_close_to_reference(masked, reference.gumbel_mask(p64, w64, u, TAU), reference.gumbel_mask(*lowp, u, TAU))
    assert_close_to_reference(slope, reference.gumbel_mask_backward(ones, p64, w64, u, TAU)[0],
                              reference.gumbel_mask_backward(ones.to(dtype), *lowp, u, TAU)[0], name="slope")
    from oes_fast.kernels import gumbel_mask as kernels

    offset = torch.tensor(OFFSET, dtype=torch.int64, device="cuda")
    on_device = kernels.gumbel_mask_with_slope(p, w, SEED, offset, TAU)
    as_argument = kernels.gumbel_mask_with_slope(p, w, SEED, OFFSET, TAU)
    assert torch.equal(on_device[0], as_argument[0]) and torch.equal(on_device[1], as_argument[1])


def test_kl_prior():
    p64 = randn(50_001, seed=6, scale=3)
    for dtype in (torch.float32, torch.float64):
        value, grad = ops.kl_prior(p64.to(dtype).cuda(), 0.05)
        assert_close_to_reference(grad, reference.kl_prior_grad(p64, 0.05),
                                  reference.kl_prior_grad(p64.to(dtype), 0.05), name="kl grad")
        assert_close_to_reference(value.reshape(1), reference.kl_prior(p64, 0.05).reshape(1),
                                  reference.kl_prior(p64.to(dtype), 0.05).reshape(1).to(value.dtype), name="kl value")


@pytest.mark.parametrize("dtype", FLAT_DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_logit_adam_step(dtype, masked):
    from test_logit_adam_step import assert_step_matches_reference, fused_step, make_state

    state = make_state(200_003, dtype)
    for step in (1, 7):
        got = fused_step(*[t.cuda() for t in state[:4]], state[4].cuda() if masked else None, step)
        assert_step_matches_reference([t.cpu() for t in got], state, masked, step)


# ------------------------------------------------------------------------------ gumbel_masked_conv2d
# (N, C_in, C_out, H, W, k, mode): OES-like widths at sizes that fill several GPU tiles, odd
# sides; the 16-channel 130x130 layer gives 16,900 pixels, which the weight gradient splits.
CONV_SHAPES = [(1, 32, 64, 67, 45, 5, "reflect"), (2, 64, 32, 33, 31, 3, "reflect"), (1, 128, 3, 40, 24, 1, "zeros"),
               (1, 16, 16, 130, 130, 5, "reflect"), (1, 3, 16, 9, 11, 3, "zeros")]


def conv_reference(x, p, w, b, grad, k, mode, dtype):
    """(output, grad_input, grad_logits, grad_weight, grad_bias) of the reference in `dtype`."""
    x, p, w, b = (t.detach().to(dtype).requires_grad_() for t in (x, p, w, b))
    w_eff = reference.gumbel_mask(p, w, uniforms(tuple(w.shape)), TAU)
    pad = (k - 1) // 2
    out = F.conv2d(F.pad(x, [pad] * 4, mode="reflect" if mode == "reflect" else "constant"), w_eff, b)
    out.backward(grad.to(dtype))
    return out.detach(), x.grad, p.grad, w.grad, b.grad


def conv_inputs(shape, seed):
    n, c_in, c_out, h, w, k, mode = shape
    x = randn(n, c_in, h, w, seed=seed)
    p = randn(c_out, c_in, k, k, seed=seed + 1, scale=2)
    wt = randn(c_out, c_in, k, k, seed=seed + 2, scale=(c_in * k * k) ** -0.5)
    b = randn(c_out, seed=seed + 3)
    grad = randn(n, c_out, h, w, seed=seed + 4)
    return x, p, wt, b, grad


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + s[6][0])
def test_gumbel_masked_conv2d(name, dtype, shape):
    k, mode = shape[5], shape[6]
    x, p, w, b, grad = conv_inputs(shape, seed=sum(shape[:6]))
    args = [t.to(dtype).cuda().requires_grad_() for t in (x, p, w, b)]
    with backend(name):
        out = ops.gumbel_masked_conv2d(*args, seed=SEED, offset=OFFSET, tau=TAU, padding=(k - 1) // 2,
                                       padding_mode=mode)
        out.backward(grad.to(dtype).cuda())
    got = (out.detach(), *(a.grad for a in args))
    ref64 = conv_reference(x, p, w, b, grad, k, mode, torch.float64)
    ref_lowp = conv_reference(x, p, w, b, grad, k, mode, dtype) if dtype != torch.float64 else ref64
    for what, a, r64, rlo in zip(("output", "grad_input", "grad_logits", "grad_weight", "grad_bias"), got, ref64,
                                 ref_lowp):
        # factor 4 as in tests/test_gumbel_masked_conv2d.py: another summation order (tiles,
        # split-K partial sums) than cuDNN's, the same number of roundings
        assert_close_to_reference(a.cpu(), r64, rlo, factor=4.0, name=what)


def test_weight_gradient_is_split_on_this_gpu():
    """The split-K path really runs in the test above (16-channel 130x130 layer)."""
    from oes_fast.kernels import gumbel_masked_conv2d as kernels

    n, c_in, c_out, h, w, k, mode = CONV_SHAPES[3]
    g, x = torch.empty(n, c_out, h, w, device="cuda"), torch.empty(n, c_in, h, w, device="cuda")
    wt = torch.empty(c_out, c_in, k, k, device="cuda")
    launch = kernels.weight_grad_launch(g, x, wt, wt, wt, None, SEED, OFFSET, None, False, TAU, 2, mode,
                                        kernels._gpu_launch(g.device))
    assert launch[1][2] > 1 and launch[3]["ATOMIC"]


@pytest.mark.parametrize("precision, bound", [("tf32", 5e-3), ("bf16", 3e-2)])
def test_gumbel_masked_conv2d_reduced_precision_dots(precision, bound):
    """TF32 / bf16 dots (set_precision): not the same-dtype rule (they round the inputs), a
    relative error bound of the input rounding (2^-11, 2^-8) times a few."""
    from oes_fast.kernels import gumbel_masked_conv2d as kernels

    shape = CONV_SHAPES[0]
    k, mode = shape[5], shape[6]
    x, p, w, b, grad = conv_inputs(shape, seed=11)
    args = [t.float().cuda().requires_grad_() for t in (x, p, w, b)]
    kernels.set_precision(precision)
    try:
        out = kernels.gumbel_masked_conv2d_forward(*[a.detach() for a in args], SEED, OFFSET, TAU, (k - 1) // 2, mode)
        grads = kernels.gumbel_masked_conv2d_backward(grad.float().cuda(), *[a.detach() for a in args[:3]], SEED,
                                                      OFFSET, TAU, (k - 1) // 2, mode, [True, True, True, False])
    finally:
        kernels.set_precision("ieee")
    ref64 = conv_reference(x, p, w, b, grad, k, mode, torch.float64)
    for what, a, r in zip(("output", "grad_input", "grad_logits", "grad_weight"), (out, *grads[:3]), ref64):
        err = float((a.double().cpu() - r).abs().max() / r.abs().max())
        assert err < bound, f"{precision} {what}: relative error {err:.2e} >= {bound:.0e}"


def test_gumbel_masked_conv2d_device_offset_is_bit_identical():
    from oes_fast.kernels import gumbel_masked_conv2d as kernels

    x, p, w, b, grad = (t.float().cuda() for t in conv_inputs(CONV_SHAPES[1], seed=21))
    offset = torch.tensor(OFFSET, dtype=torch.int64, device="cuda")
    for args in ((x, p, w, b), ):
        want = kernels.gumbel_masked_conv2d_forward(*args, SEED, OFFSET, TAU, 1, "reflect")
        assert torch.equal(kernels.gumbel_masked_conv2d_forward(*args, SEED, offset, TAU, 1, "reflect"), want)
    want = kernels.gumbel_masked_conv2d_backward(grad, x, p, w, SEED, OFFSET, TAU, 1, "reflect", [True] * 4)
    got = kernels.gumbel_masked_conv2d_backward(grad, x, p, w, SEED, offset, TAU, 1, "reflect", [True] * 4)
    # split-K partial sums are added atomically in any order: the weight gradients may differ in
    # the last bits; the input gradient and the forward are deterministic
    assert torch.equal(got[0], want[0])
    for a, r in zip(got[1:3], want[1:3]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ sparse_conv2d
SPARSE_SHAPES = [(1, 16, 32, 67, 45, 5, "reflect", 1), (1, 64, 32, 33, 31, 3, "reflect", 2),
                 (2, 8, 3, 20, 24, 1, "zeros", 1)]


def sparse_backends():
    """The sparse ops run the CUDA C++ kernels when the extension has them, else the Triton
    kernels; the Triton kernels are also called directly so both are tested."""
    return ["op"] + (["triton"] if _C.with_cuda else [])


@pytest.mark.parametrize("path", sparse_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + s[6][0] + f"u{s[7]}")
def test_sparse_conv2d(path, dtype, shape):
    n, c_in, c_out, h, w, k, mode, up = shape
    g = torch.Generator().manual_seed(sum(shape[:6]))
    keep = torch.rand(c_out, c_in, k, k, generator=g) < 0.1
    wt = randn(c_out, c_in, k, k, seed=1) * keep
    x, b = randn(n, c_in, h, w, seed=2), randn(c_out, seed=3)
    grad = randn(n, c_out, h * up, w * up, seed=4)
    values, row_ptr, col_idx = to_csr(wt, keep)
    pad = (k - 1) // 2
    xs, vs, bs = (t.to(dtype).cuda().requires_grad_() for t in (x, values, b))
    if path == "op":
        out = oes_fast.sparse.sparse_conv2d(xs, vs, row_ptr.cuda(), col_idx.cuda(), k, bs, 1, pad, mode, upsample=up)
        out.backward(grad.to(dtype).cuda())
        got = (out, xs.grad, vs.grad, bs.grad)
    else:
        from oes_fast.kernels import sparse_conv2d as kernels

        rp, ci = row_ptr.cuda(), col_idx.cuda()
        xu = F.interpolate(xs.detach(), scale_factor=up, mode="nearest") if up > 1 else xs.detach()
        out = kernels.sparse_conv2d(xs.detach(), vs.detach(), rp, ci, bs.detach(), [k, k], [1, 1], [pad, pad], mode, up)
        gi = kernels.sparse_conv2d_input_grad(grad.to(dtype).cuda(), vs.detach(), rp, ci, list(xu.shape), [k, k],
                                              [1, 1], [pad, pad], mode)
        if up > 1:
            gi = gi.view(n, c_in, h, up, w, up).sum((3, 5))
        gv = kernels.sparse_conv2d_weight_grad(grad.to(dtype).cuda(), xu, rp, ci, [k, k], [1, 1], [pad, pad], mode)
        got = (out, gi, gv, None)

    def ref(dt):
        xr, wr, br = (t.detach().to(dt).requires_grad_() for t in (x, wt, b))
        xu = F.interpolate(xr, scale_factor=up, mode="nearest") if up > 1 else xr
        o = F.conv2d(F.pad(xu, [pad] * 4, mode="reflect" if mode == "reflect" else "constant"), wr, br)
        o.backward(grad.to(dt))
        return o.detach(), xr.grad, wr.grad[keep], br.grad

    ref64 = ref(torch.float64)
    ref_lowp = ref(dtype) if dtype != torch.float64 else ref64
    for what, a, r64, rlo in zip(("output", "grad_input", "grad_values", "grad_bias"), got, ref64, ref_lowp):
        if a is not None:
            assert_close_to_reference(a.detach().cpu(), r64, rlo, factor=4.0, name=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_generator_on_cuda(dtype):
    """A SparseGenerator compacted from a model on the GPU: every conv dense by default; with the
    CPU's crossover (sparse layers on the GPU kernels), every tensor of it on the GPU, and its
    output and the kept parameters' gradients against the masked dense model in float64 on the
    CPU, with the same-dtype rule (the dense model run on the CPU in `dtype`), as
    tests/test_sparse.py checks the CPU generator."""
    import copy
    import itertools

    from oes_fast import models
    from oes_fast.sparse import CROSSOVER_DENSITY, SparseGenerator
    from test_sparse import assert_every_conv_keeps_taps, connected_mask, dense_grads, perturbed_model

    model = perturbed_model(3, seed=21)
    mask = connected_mask(model, 0.15, seed=22)
    on_gpu = copy.deepcopy(model).to(device="cuda", dtype=dtype)
    assert all(conv.mode == "dense" for _, conv in SparseGenerator.from_masked(on_gpu, mask).convs())  # the default
    gen = SparseGenerator.from_masked(on_gpu, mask, crossover=CROSSOVER_DENSITY)  # the sparse kernels too
    assert_every_conv_keeps_taps(gen)
    assert all(t.device.type == "cuda" for t in itertools.chain(gen.parameters(), gen.buffers()))
    assert any(conv.mode == "sparse" for _, conv in gen.convs())
    z = torch.rand(1, 32, 32, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.1
    target = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    refs = {}
    for ref_dtype in {torch.float64, dtype}:
        dense = models.skip_oes(levels=3)
        dense.load_state_dict(model.state_dict())
        mask.apply_(dense)
        with torch.no_grad():
            ref_out = dense.to(ref_dtype).train()(z.to(ref_dtype))
        refs[ref_dtype] = ref_out, dense_grads(model, mask, z.to(ref_dtype), target.to(ref_dtype), ref_dtype)
    out = gen(z.to(device="cuda", dtype=dtype))
    ((out - target.to(device="cuda", dtype=dtype)) ** 2).mean().backward()
    assert_close_to_reference(out.cpu(), refs[torch.float64][0], refs[dtype][0], name="output")
    largest = max(float(g.abs().max()) for g in refs[torch.float64][1].values())
    # factor 4, as test_sparse_conv2d: the GPU's reductions add in another order than the CPU's
    # float32 reference (seen on an H200: 1.03x the default factor 2's bound, up.0's weights)
    for param, name, index in gen.parameter_map():
        got = (param.grad if param.grad is not None else torch.zeros_like(param)).cpu()
        index = index.cpu()
        assert_close_to_reference(got, refs[torch.float64][1][name].reshape(-1)[index].view_as(got),
                                  refs[dtype][1][name].reshape(-1)[index].view_as(got).to(dtype), factor=4.0,
                                  scale=largest, name=f"grad {name}")


def test_sparse_generator_step_captures_in_a_cuda_graph():
    """The sparse generator's training step (forward, loss, backward) with its sparse layers on
    the GPU kernels, captured in one CUDA graph (oes_fast.graphs.GraphedStep): nothing in it may
    wait for the device (the sparse convs' backward once did, in repeat_interleave and bincount).
    A replay gives the eager step's gradients, up to rounding."""
    import copy

    from oes_fast.graphs import GraphedStep
    from oes_fast.sparse import CROSSOVER_DENSITY, SparseGenerator
    from test_sparse import assert_every_conv_keeps_taps, connected_mask, perturbed_model

    model = perturbed_model(3, seed=31)
    gen = SparseGenerator.from_masked(copy.deepcopy(model).cuda(), connected_mask(model, 0.15, seed=32),
                                      crossover=CROSSOVER_DENSITY)
    assert_every_conv_keeps_taps(gen)
    assert any(conv.mode == "sparse" for _, conv in gen.convs())
    z = torch.rand(1, 32, 32, 40, generator=torch.Generator().manual_seed(4)).cuda() * 0.1
    target = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(5)).cuda()
    params = list(gen.parameters())

    def step():
        gen.zero_grad(set_to_none=True)
        ((gen(z) - target) ** 2).mean().backward()

    step()
    eager = [p.grad.clone() if p.grad is not None else None for p in params]
    graphed = GraphedStep(step, warmup=1)
    graphed()  # the warm-up, eager on a side stream
    graphed()  # the capture and its first replay
    for p in params:  # poison: the replay must write every gradient
        if p.grad is not None:
            p.grad.fill_(float("nan"))
    graphed()
    torch.cuda.synchronize()
    assert sum(g is not None for g in eager) > 0
    for p, want in zip(params, eager):
        assert (p.grad is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-12)


@pytest.mark.parametrize("engine", ["dense", "sparse"])
def test_training_cuda_graph_follows_eager_training(engine):
    """train_sparse(cuda_graph=True) (3 eager warm-up steps, the capture, then replays) against
    the eager loop from the same start, both engines (masked dense; the compacted generator,
    every conv dense on a GPU): the same losses, PSNR records and smoothed output after 12 steps,
    up to rounding (cuDNN in float32 and deterministic; the capturable Adam computes its bias
    correction on the device, and torch's reflect padding adds its backward with atomics)."""
    from test_sparse import connected_mask

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = False, True
    try:
        model = oes_fast.models.skip_oes(levels=3, seed=0)
        mask = connected_mask(model, 0.3, seed=42)
        z = oes_fast.models.dip_input(32, 32, 40, seed=1, device="cuda")
        y = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(2)).cuda()
        clean = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(3)).cuda()
        fits = [oes_fast.train_sparse(model.cuda(), mask, z, y, steps=12, clean=clean, record_every=4, engine=engine,
                                      smoothing=0.9, progress=False, cuda_graph=graph) for graph in (False, True)]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = saved
    eager, graphed = fits
    assert len(graphed.losses) == 12 and graphed.losses[-1] < graphed.losses[0]
    assert graphed.steps == eager.steps == [0, 4, 8, 12]
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(graphed.psnr), torch.tensor(eager.psnr), rtol=1e-5, atol=0)
    torch.testing.assert_close(graphed.image, eager.image, rtol=0, atol=1e-4)


@pytest.mark.parametrize("engine,recompute", [("unfused", False), ("fused", False), ("fused", True)])
def test_graphed_search_step_replays_the_search_step(engine, recompute):
    """GraphedSearchStep on the GPU (3 eager warm-up steps, the capture, then replays) against
    SearchStep run step by step from the same start: the same losses and logits after 8 steps,
    up to the rounding of the kernels (cuDNN in float32 and deterministic). The conv biases'
    logits are left out: a bias before batch norm has a zero gradient, whose rounding noise
    Adam turns into steps of +-lr, and the reflect padding's backward in torch adds with
    atomics, so that noise differs from run to run. The data loss does not depend on them
    (batch norm removes the bias); the KL prior does, so it is not compared."""
    from oes_fast.mask_search import GraphedSearchStep, SearchStep

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = False, True
    try:
        runs = {}
        for name in ("eager", "graphed"):
            model = oes_fast.models.skip(seed=0, in_channels=4, channels_down=(4, 8), channels_up=(4, 8),
                                         channels_skip=(2, 0)).cuda()
            side = 4 * model.min_side
            z = oes_fast.models.dip_input(4, side, side, seed=1, device="cuda")
            y = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).cuda()
            run = SearchStep(model, z, y, density=0.3, kl=1e-3, seed=4, engine=engine, recompute=recompute)
            graphed = GraphedSearchStep(run, first_step=0) if name == "graphed" else None
            losses = []
            for i in range(8):
                loss, _ = run(i) if graphed is None else graphed()
                losses.append(loss.item())
            runs[name] = run.logits.detach().clone(), losses, run.optimizer.steps
        convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
        compared = torch.ones(run.layout.numel, dtype=torch.bool, device="cuda")
        for name, shape, start in zip(run.layout.names, run.layout.shapes, run.layout.offsets):
            if name.endswith(".bias") and name[:-len(".bias")] in convs:
                compared[start:start + shape.numel()] = False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = saved
    (l0, loss0, n0), (l1, loss1, n1) = runs["eager"], runs["graphed"]
    assert n0 == n1 == 8
    assert l0.abs().max() > 0.01
    assert compared.any() and not compared.all()
    torch.testing.assert_close(l1[compared], l0[compared], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(loss1), torch.tensor(loss0), rtol=1e-5, atol=0)
