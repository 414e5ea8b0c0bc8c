"""Sampling the masked weights of the whole OES network (3,008,867 parameters) on the CPU.

Run: python -m pytest bench/bench_gumbel_mask.py --benchmark-only --benchmark-json out.json
then python bench/report.py out.json (writes bench/REPORT.md).

Ways compared, in the same run (a machine shared by several people: read the ratios):
  fused         oes_fast.gumbel_mask, one launch over the flat logits and weights
  authors_loop  per parameter tensor, a two-class Gumbel-softmax of sigmoid(p) (the OES
                authors' formulation), class 0 times the weight
  plain_torch   the same math as the fused op in plain PyTorch on the flat buffers
  compiled      plain_torch under torch.compile (skipped with OES_BENCH_NO_COMPILE=1)
Groups: "forward" (the masked weights) and "forward+backward" (plus the gradient with
respect to the logits, for a fixed upstream gradient).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import oes_fast
from oes_fast.flat import FlatLayout
from oes_fast.reference import U_MAX, U_MIN

TAU = 0.2
SEED = 0
ROUNDS = int(os.environ.get("OES_BENCH_ROUNDS", "10"))
# float32 bytes that must move per element: forward reads logits and weight and writes the
# output; the backward (grad wrt logits only, noise regenerated) reads grad, logits, weight
# and writes grad_logits.
BYTES_PER_ELEMENT = {"forward": 12, "forward+backward": 12 + 16}


@pytest.fixture(scope="module")
def oes():
    model = oes_fast.models.skip_oes(seed=0)
    layout = FlatLayout.from_model(model)
    weight = layout.flatten(dict(model.named_parameters())).detach().contiguous()
    g = torch.Generator().manual_seed(0)
    logits = 0.5 * torch.randn(layout.numel, generator=g)  # logits as during a search, not zeros
    grad_out = torch.randn(layout.numel, generator=g)
    # the authors' code keeps one tensor per parameter
    per_param = [(p.clone(), w.clone(), go.clone()) for p, w, go in
                 zip(layout.views(logits).values(), layout.views(weight).values(), layout.views(grad_out).values())]
    return dict(numel=layout.numel, weight=weight, logits=logits, grad_out=grad_out, per_param=per_param)


def fused(logits, weight):
    return oes_fast.gumbel_mask(logits, weight, SEED, 0, TAU)


def plain_torch(logits, weight):
    u = torch.rand_like(logits).clamp_(U_MIN, U_MAX)
    return weight * torch.sigmoid((logits + torch.log(u) - torch.log(1 - u)) / TAU)


def authors_mask(logits, weight):
    s = torch.sigmoid(logits)
    two_class = torch.stack([torch.log(s), torch.log(1 - s)], dim=-1)
    return weight * F.gumbel_softmax(two_class, tau=TAU, hard=False)[..., 0]


_compiled = None


def compiled(logits, weight):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(plain_torch, fullgraph=True)
    return _compiled(logits, weight)


def _run(benchmark, group, method, fn):
    numel = benchmark.extra_info["elements"] = 3_008_867
    benchmark.group = group
    benchmark.extra_info.update(method=method, group=group, bytes_per_element=BYTES_PER_ELEMENT[group],
                                baseline=method == "authors_loop", torch_threads=torch.get_num_threads())
    load_before = os.getloadavg()[0]
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=2 if method == "compiled" else 1, iterations=1)
    # other users' load on this shared machine, to judge how far to trust a ratio
    benchmark.extra_info["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["elements_per_s"] = numel / stats.stats.median


def _skip_compile(method):
    if method == "compiled" and os.environ.get("OES_BENCH_NO_COMPILE") == "1":
        pytest.skip("torch.compile variant disabled by OES_BENCH_NO_COMPILE=1")


FLAT = {"fused": fused, "plain_torch": plain_torch, "compiled": compiled}


@pytest.mark.parametrize("method", ["fused", "authors_loop", "plain_torch", "compiled"])
def test_forward(benchmark, oes, method):
    _skip_compile(method)
    assert oes["numel"] == 3_008_867
    if method == "authors_loop":
        def fn():
            with torch.no_grad():
                return [authors_mask(p, w) for p, w, _ in oes["per_param"]]
    else:
        flat_fn, logits, weight = FLAT[method], oes["logits"], oes["weight"]

        def fn():
            with torch.no_grad():
                return flat_fn(logits, weight)
    _run(benchmark, "forward", method, fn)


@pytest.mark.parametrize("method", ["fused", "authors_loop", "plain_torch", "compiled"])
def test_forward_backward(benchmark, oes, method):
    _skip_compile(method)
    if method == "authors_loop":
        leaves = [p.clone().requires_grad_() for p, _, _ in oes["per_param"]]
        weights = [w for _, w, _ in oes["per_param"]]
        grads = [go for _, _, go in oes["per_param"]]

        def fn():
            outs = [authors_mask(p, w) for p, w in zip(leaves, weights)]
            return torch.autograd.grad(outs, leaves, grads)
    else:
        flat_fn, weight, grad_out = FLAT[method], oes["weight"], oes["grad_out"]
        leaf = oes["logits"].clone().requires_grad_()

        def fn():
            return torch.autograd.grad(flat_fn(leaf, weight), leaf, grad_out)
    _run(benchmark, "forward+backward", method, fn)
