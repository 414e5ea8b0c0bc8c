"""The CUDA-graph search step (oes_fast.mask_search.GraphedSearchStep) on the CPU, through the
Triton interpreter: its kernels read the noise offsets and Adam's step count from device
tensors, and its body, step after step and for both engines, follows the ordinary search
step. The capture and replay themselves need a GPU."""
import pytest
import torch

import oes_fast
from oes_fast.mask_search import GraphedSearchStep, SearchStep

pytest.importorskip("triton")
from oes_fast.kernels import gumbel_mask as mask_kernels  # noqa: E402
from oes_fast.kernels import logit_adam_step as adam_kernels  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_offset_read_on_the_device_equals_the_offset_argument(dtype):
    g = torch.Generator().manual_seed(0)
    p, w = torch.randn(3000, generator=g, dtype=dtype), torch.randn(3000, generator=g, dtype=dtype)
    grad = torch.randn(3000, generator=g, dtype=dtype)
    offset = 2**32 - 1000  # the counter's low word wraps inside the tensor
    for launch in (lambda o: mask_kernels.gumbel_mask_with_slope(p, w, 7, o, 0.2),
                   lambda o: mask_kernels.gumbel_mask_backward(grad, p, w, 7, o, 0.2, True)):
        for a, b in zip(launch(torch.tensor(offset)), launch(offset)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="0-d int64"):
        mask_kernels.gumbel_mask_with_slope(p, w, 7, torch.tensor([offset]), 0.2)


@pytest.mark.parametrize("k,padding_mode", [(3, "reflect"), (5, "zeros"), (1, "reflect")])
def test_fused_conv_offset_read_on_the_device(k, padding_mode):
    from oes_fast.kernels import gumbel_masked_conv2d as conv_kernels

    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, 3, 9, 11, generator=g)
    p, w = torch.randn(4, 3, k, k, generator=g), torch.randn(4, 3, k, k, generator=g)
    b, grad = torch.randn(4, generator=g), torch.randn(1, 4, 9, 11, generator=g)
    offset, pad = 2**32 - 50, (k - 1) // 2
    want = conv_kernels.gumbel_masked_conv2d_forward(x, p, w, b, 9, offset, 0.2, pad, padding_mode)
    got = conv_kernels.gumbel_masked_conv2d_forward(x, p, w, b, 9, torch.tensor(offset), 0.2, pad, padding_mode)
    assert torch.equal(got, want)
    need = [True, True, True, True]
    want = conv_kernels.gumbel_masked_conv2d_backward(grad, x, p, w, 9, offset, 0.2, pad, padding_mode, need)
    got = conv_kernels.gumbel_masked_conv2d_backward(grad, x, p, w, 9, torch.tensor(offset), 0.2, pad, padding_mode,
                                                     need)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("step", [1, 2, 1000])
def test_adam_step_count_read_on_the_device(step):
    # the bias corrections come from exp(step * log(beta)) in float64 in the kernel instead of
    # the host's beta ** step: the same to a few float64 ulps, so the float32 update agrees to
    # an ulp of the logits
    g = torch.Generator().manual_seed(step)
    p, m, v, grad, scale = (torch.randn(5000, generator=g) for _ in range(5))
    v = v.abs() * 1e-6
    states = [[t.clone() for t in (p, m, v)] for _ in range(2)]
    priors = [adam_kernels.logit_adam_step_(*state, grad, scale, 0.05, 1e-3, 0.01, 0.9, 0.999, 1e-8, s)
              for state, s in zip(states, (step, torch.tensor(step)))]
    for a, b in zip(*states):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=0)
    assert torch.equal(priors[0], priors[1])
    with pytest.raises(ValueError, match="0-d int64"):
        adam_kernels.logit_adam_step_(*states[0], grad, scale, 0.05, 1e-3, 0.01, 0.9, 0.999, 1e-8,
                                      torch.tensor(step, dtype=torch.int32))


def _tiny_problem():
    model = oes_fast.models.skip(seed=0, in_channels=4, channels_down=(4, 8), channels_up=(4, 8),
                                 channels_skip=(2, 0))
    side = model.min_side
    z = oes_fast.models.dip_input(4, side, side, seed=1)
    y = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    return model, z, y


@pytest.mark.parametrize("engine,recompute", [("unfused", False), ("fused", False), ("fused", True)])
def test_graph_body_follows_the_search_step(engine, recompute):
    # the body the graph records, run eagerly: the same masks (offsets from the device step),
    # the same losses and logits as SearchStep, up to the rounding of the Triton kernels
    # (interpreted) against the C++ ones
    runs = {}
    for name in ("plain", "graph_body"):
        model, z, y = _tiny_problem()
        run = SearchStep(model, z, y, density=0.3, kl=1e-3, seed=4, engine=engine, recompute=recompute)
        body = GraphedSearchStep(run, first_step=0).body if name == "graph_body" else None
        losses = []
        for i in range(4):
            loss, prior = run(i) if body is None else body()
            losses.append(loss.item() + 1e-3 * prior.item())
        runs[name] = (run.logits.clone(), losses, run.optimizer.steps, [b.clone() for b in model.buffers()])
    (l0, loss0, n0, b0), (l1, loss1, n1, b1) = runs["plain"], runs["graph_body"]
    assert n0 == n1 == 4
    assert l0.abs().max() > 0.01
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(loss1), torch.tensor(loss0), rtol=1e-5, atol=0)
    for a, b in zip(b1, b0):  # running statistics: sums of conv outputs, which Triton's tiles add in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cuda_graph_needs_cuda():
    model, z, y = _tiny_problem()
    with pytest.raises(ValueError, match="CUDA device"):
        oes_fast.search(model, z, y, density=0.3, steps=1, cuda_graph=True, progress=False)


def test_training_cuda_graph_needs_cuda():
    """train_dense / train_sparse(cuda_graph=True) refuse CPU tensors, naming the device; the
    capture and replay are tested on a GPU (tests/test_cuda_ops.py)."""
    model, z, y = _tiny_problem()
    mask = oes_fast.masks.Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()},
                               architecture=model.config)
    with pytest.raises(ValueError, match="CUDA device .*cpu"):
        oes_fast.train_dense(model, z, y, steps=1, cuda_graph=True, progress=False)
    with pytest.raises(ValueError, match="CUDA device"):
        oes_fast.train_sparse(model, mask, z, y, steps=1, cuda_graph=True, progress=False)
