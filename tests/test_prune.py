"""Pruning baselines (oes_fast.prune): exact densities, scope semantics, scores against direct
float64 computations, the model left untouched, LIP IMP and its stopping rule."""
import copy
import math

import pytest
import torch
from torch.func import functional_call

from oes_fast import masks, models, prune, rng


def tiny(seed=0):
    return models.skip(seed=seed, in_channels=4, channels_down=(4, 8), channels_up=(4, 8), channels_skip=(0, 0))


@pytest.fixture(scope="module")
def net():
    return tiny()


@pytest.fixture(scope="module")
def data(net):
    s = net.min_side
    z = models.dip_input(4, s, s, seed=0)
    y = rng.uniform((1, 3, s, s), 123)
    return z, y


def numel(model):
    return sum(p.numel() for p in model.parameters())


def kept_per_layer(mask):
    return [int(t.sum()) for t in mask.tensors.values()]


def run_method(name, model, density, data, **kw):
    z, y = data
    if name in ("snip", "grasp"):
        return getattr(prune, name)(model, density, z, y, **kw)
    if name == "synflow":
        kw.setdefault("iterations", 3)
    return getattr(prune, name)(model, density, **kw)


METHODS = ["random", "magnitude", "snip", "grasp", "synflow"]


# ------------------------------------------------------------------------------ exact densities
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 1.0])
def test_global_density_is_exact(net, data, method, density):
    mask = run_method(method, net, density, data, scope="global")
    mask.check_fits(net)
    assert mask.kept == round(density * numel(net))
    assert mask.meta["method"] == method and mask.meta["scope"] == "global"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5])
def test_layer_density_is_exact(net, data, method, density):
    mask = run_method(method, net, density, data, scope="layer")
    sizes = [p.numel() for p in net.parameters()]
    kept = kept_per_layer(mask)
    assert kept == prune.layer_counts(sizes, density)
    for k, n in zip(kept, sizes):
        assert math.floor(density * n) <= k <= math.ceil(density * n)
    assert mask.kept == round(density * numel(net))


def test_layer_counts():
    # floors, then the largest remainders (earlier layer first on ties); total = round(d * n)
    assert prune.layer_counts([3, 3, 3], 0.5) == [2, 1, 1]  # total round(4.5) = 4
    assert prune.layer_counts([10, 10], 0.25) == [3, 2]  # 2.5 + 2.5 -> 5
    assert prune.layer_counts([100, 7, 3], 1.0) == [100, 7, 3]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        sizes = torch.randint(1, 50, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        d = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        counts = prune.layer_counts(sizes, d)
        assert sum(counts) == round(d * sum(sizes))
        assert all(math.floor(d * n) <= k <= math.ceil(d * n) for k, n in zip(counts, sizes))
        # where the total allows it, a layer keeps its own round(d * n_l)
        if sum(round(d * n) for n in sizes) == sum(counts):
            assert all(abs(k - d * n) <= 0.5 + 1e-9 for k, n in zip(counts, sizes))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("method", METHODS)
def test_density_out_of_range(net, data, method, bad):
    with pytest.raises(ValueError):
        run_method(method, net, bad, data)


def test_bad_scope(net):
    with pytest.raises(ValueError):
        prune.random(net, 0.5, scope="channel")


def test_layer_selection_uses_topk_tie_order():
    # one layer per-layer selection == masks.topk on heavily tied scores: same seeded keys
    scores = {"a": torch.randint(0, 3, (50,)).double(), "b": torch.randint(0, 3, (7, 3)).double()}
    for seed in (0, 1):
        glob = masks.topk(scores, 0.37, seed=seed)
        one = prune.select({"a": torch.cat([scores["a"], scores["b"].reshape(-1)])}, 0.37, scope="layer", seed=seed)
        assert torch.equal(glob.to_flat(), one.to_flat())
        assert torch.equal(prune.select(scores, 0.37, seed=seed).to_flat(), glob.to_flat())


# ------------------------------------------------------------------------------ scope semantics
def test_global_vs_layer(net):
    d = 0.3
    for method in (prune.random, prune.magnitude):
        layer = method(net, d, scope="layer")
        for row in layer.layer_stats():
            assert abs(row["kept"] - d * row["numel"]) <= 1
    glob = prune.magnitude(net, d, scope="global")
    dens = [row["density"] for row in glob.layer_stats()]
    assert max(dens) - min(dens) > 0.5  # e.g. BN weights (all 1) kept, BN biases (all 0) dropped
    assert not torch.equal(glob.to_flat(), prune.magnitude(net, d, scope="layer").to_flat())


def test_random_seeded(net):
    a = prune.random(net, 0.4, seed=3)
    b = prune.random(net, 0.4, seed=3)
    c = prune.random(net, 0.4, seed=4)
    assert torch.equal(a.to_flat(), b.to_flat())
    assert not torch.equal(a.to_flat(), c.to_flat())
    la, lc = prune.random(net, 0.4, scope="layer", seed=3), prune.random(net, 0.4, scope="layer", seed=4)
    assert not torch.equal(la.to_flat(), lc.to_flat())
    # scores are the package's stream at the flat offsets
    scores = prune.random_scores(net, seed=3)
    stream = rng.stream_seed(3, "prune-random")
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    assert torch.equal(flat, rng.uniform((numel(net),), stream))
    assert torch.equal(a.to_flat(), masks.topk(scores, 0.4, seed=3).to_flat())


def test_deterministic_methods(net, data):
    for method in METHODS:
        a = run_method(method, net, 0.3, data, seed=1)
        b = run_method(method, net, 0.3, data, seed=1)
        assert torch.equal(a.to_flat(), b.to_flat()), method


# ------------------------------------------------------------------------------ scores (float64)
def loss_grad(model, params, z, y):
    """d mse(f(z; params), y) / d params, batch norm with batch statistics, written here directly."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
    net = copy.deepcopy(model).train()
    loss = torch.mean((functional_call(net, leaves, (z,)) - y) ** 2)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.fixture(scope="module")
def net64(net):
    return copy.deepcopy(net).double()


@pytest.fixture(scope="module")
def data64(data):
    return tuple(t.double() for t in data)


def test_magnitude_scores(net):
    scores = prune.magnitude_scores(net)
    for n, p in net.named_parameters():
        assert torch.equal(scores[n], p.detach().abs())
    assert torch.equal(prune.magnitude(net, 0.3, seed=2).to_flat(), masks.topk(scores, 0.3, seed=2).to_flat())


def test_snip_scores_float64(net64, data64):
    z, y = data64
    w = dict(net64.named_parameters())
    g = loss_grad(net64, w, z, y)
    expected = {n: (g[n] * w[n]).abs() for n in w}
    got = prune.snip_scores(net64, z, y)
    for n in w:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-14)
    assert torch.equal(prune.snip(net64, 0.3, z, y, seed=5).to_flat(), masks.topk(expected, 0.3, seed=5).to_flat())


def test_snip_degradation(net64, data64):
    z, y = data64
    observed = (rng.uniform(y.shape[-2:], 7) < 0.5).double()

    class Inpaint:
        def loss(self, x, t):
            return torch.sum(observed * (x - t) ** 2) / observed.sum()

    w = dict(net64.named_parameters())
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in w.items()}
    loss = Inpaint().loss(functional_call(copy.deepcopy(net64).train(), leaves, (z,)), y)
    g = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    got = prune.snip_scores(net64, z, y, degradation=Inpaint())
    for n in w:
        torch.testing.assert_close(got[n], (g[n] * w[n]).abs(), rtol=1e-10, atol=1e-14)


def test_grasp_scores_float64(net64, data64):
    """-w * Hg against a central finite difference of the gradient along g. The step is tiny
    because LeakyReLU kinks make the gradient piecewise smooth: a larger step crosses kinks."""
    z, y = data64
    w = {n: p.detach() for n, p in net64.named_parameters()}
    g = loss_grad(net64, w, z, y)
    gnorm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
    eps = 1e-6 / float(gnorm)
    plus = loss_grad(net64, {n: w[n] + eps * g[n] for n in w}, z, y)
    minus = loss_grad(net64, {n: w[n] - eps * g[n] for n in w}, z, y)
    expected = {n: -w[n] * (plus[n] - minus[n]) / (2 * eps) for n in w}
    got = prune.grasp_scores(net64, z, y)
    scale = max(float(t.abs().max()) for t in expected.values())
    for n in w:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7 * scale)


def test_grasp_removes_highest_scores(net64, data64):
    z, y = data64
    s = torch.cat([t.reshape(-1) for t in prune.grasp_scores(net64, z, y).values()])
    mask = prune.grasp(net64, 0.3, z, y).to_flat()
    assert s[mask].max() <= s[~mask].min()  # kept = the lowest S = -w * Hg (Wang et al. 2020, Alg. 1)
    layer = prune.grasp(net64, 0.3, z, y, scope="layer")
    for name, t in prune.grasp_scores(net64, z, y).items():
        m = layer[name]
        if m.any() and (~m).any():
            assert t[m].max() <= t[~m].min()


def synflow_direct(model, side):
    """|dR/dw * w|, R = sum(f(1; |W|)), BN as the affine map of default running statistics,
    no sigmoid; returns (scores, R as a function of the parameters)."""
    net = copy.deepcopy(model).double().eval()
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.zero_()
            mod.running_var.fill_(1.0)
    net.sigmoid = False
    ones = torch.ones(1, 4, side, side, dtype=torch.float64)
    absw = {n: p.detach().abs().clone() for n, p in net.named_parameters()}

    def R(params):
        return functional_call(net, params, (ones,)).sum()

    leaves = {n: t.clone().requires_grad_(True) for n, t in absw.items()}
    grads = dict(zip(leaves, torch.autograd.grad(R(leaves), list(leaves.values()))))
    return {n: (grads[n] * absw[n]).abs() for n in absw}, R, absw


def test_synflow_one_iteration(net):
    model = copy.deepcopy(net)
    model.train()
    with torch.no_grad():  # stale running statistics must not matter
        model(models.dip_input(4, net.min_side, net.min_side, seed=1))
    expected, R, absw = synflow_direct(net, net.min_side)
    got = prune.synflow_scores(model)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-12, atol=0)
    # R is linear in each single weight (all activations positive): a central difference is exact
    g = torch.Generator().manual_seed(0)
    for n, t in absw.items():
        j = int(torch.randint(t.numel(), (1,), generator=g))
        h = 1e-3 * max(float(t.reshape(-1)[j]), 1e-3)
        up, down = dict(absw), dict(absw)
        up[n] = t.clone().reshape(-1).index_add_(0, torch.tensor([j]), torch.tensor([h], dtype=t.dtype)).view_as(t)
        down[n] = t.clone().reshape(-1).index_add_(0, torch.tensor([j]), torch.tensor([-h], dtype=t.dtype)).view_as(t)
        fd = float((R(up) - R(down)) / (2 * h)) * float(t.reshape(-1)[j])
        assert math.isclose(abs(fd), float(expected[n].reshape(-1)[j]), rel_tol=1e-6, abs_tol=1e-9 * float(R(absw)))
    mask = prune.synflow(model, 0.3, iterations=1, seed=2)
    assert torch.equal(mask.to_flat(), masks.topk(expected, 0.3, seed=2).to_flat())


def test_synflow_iterative(net):
    one = prune.synflow(net, 0.1, iterations=1)
    many = prune.synflow(net, 0.1, iterations=10)
    assert many.kept == one.kept == round(0.1 * numel(net))
    assert many.meta["density_requested"] == 0.1
    # synflow(d ** 0.9, 9 iterations) runs the first 9 steps of synflow(d, 10) (same densities
    # d ** (k / 10)); the 10th step only prunes further: masks are nested, pruned weights stay pruned
    prev = prune.synflow(net, 0.1 ** 0.9, iterations=9)
    assert not torch.any(many.to_flat() & ~prev.to_flat())
    assert prev.kept == round(0.1 ** 0.9 * numel(net))
    # the deep decoder infers its input shape too
    dd = models.deep_decoder(channels=4, num_up=2, seed=0)
    assert prune.synflow(dd, 0.2, iterations=3).kept == round(0.2 * numel(dd))


# ------------------------------------------------------------------------------ the model is untouched
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("training", [True, False])
def test_model_not_modified(data, method, training):
    model = tiny()
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_method(method, model, 0.3, data)
    run_method(method, model, 0.3, data, scope="layer")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.training == training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.sigmoid is True


# ------------------------------------------------------------------------------ IMP
def expected_kept(n, density, fraction=0.2):
    kept = [n]
    while kept[-1] > round(density * n):
        kept.append(min(round((1 - fraction) * kept[-1]), kept[-1] - 1))
    return kept


class Recorder:
    """train_fn around the built-in trainer: records the weights each round starts from and ends
    with, and checks after every step that the pruned weights are exactly zero."""

    def __init__(self):
        self.start, self.end, self.steps = [], [], 0

    def __call__(self, model, mask, z, images, steps, *, lr, degradation, callback=None):
        self.start.append({n: p.detach().clone() for n, p in model.named_parameters()})

        def check(step, net):
            self.steps += 1
            for n, p in net.named_parameters():
                assert torch.all(p[~mask[n]] == 0), (n, step)
            if callback is not None:
                callback(step, net)

        loss = prune._train(model, mask, z, images, steps, lr=lr, degradation=degradation, callback=check)
        self.end.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return loss


def test_imp_densities_and_rewind_init(net, data):
    z, y = data
    n = numel(net)
    w0 = {k: p.detach().clone() for k, p in net.named_parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rec = Recorder()
    res = prune.imp(net, z, y, density=0.35, steps_per_round=3, train_fn=rec)
    assert res.kept == expected_kept(n, 0.35)  # 4219, 3375, 2700, 2160, 1728, 1382
    assert res.densities == [k / n for k in res.kept]
    assert res.densities[-1] <= 0.35 < res.densities[-2]
    assert len(res.losses) == len(res.masks) and all(math.isfinite(l) for l in res.losses)
    assert res.stopped_at is None and res.mask is res.masks[-1]
    assert rec.steps == 3 * len(res.masks)
    for r, mask in enumerate(res.masks):
        mask.check_fits(net)
        # rewind: every round starts from W0 on the kept weights, zero elsewhere
        for k in w0:
            assert torch.equal(rec.start[r][k], w0[k] * mask[k]), (r, k)
        if r:
            prev = res.masks[r - 1].to_flat()
            cur = mask.to_flat()
            assert not torch.any(cur & ~prev)  # nested
            # pruned by global magnitude of the previous round's trained weights
            trained = torch.cat([t.reshape(-1) for t in rec.end[r - 1].values()]).abs()
            assert trained[cur].min() >= trained[prev & ~cur].max()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_imp_rewind_fraction(net, data):
    z, y = data
    rec = Recorder()
    res = prune.imp(net, z, y, density=0.7, steps_per_round=4, rewind=0.5, train_fn=rec, lr=0.01)
    # the rewind point: 2 steps of dense Adam from W0, computed here
    ref = copy.deepcopy(net).train()
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        torch.mean((ref(z) - y) ** 2).backward()
        opt.step()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(res.rewind_weights[k], p.detach(), rtol=0, atol=1e-7)
        assert not torch.equal(res.rewind_weights[k], dict(net.named_parameters())[k].detach())
    for r in range(1, len(res.masks)):
        for k in res.rewind_weights:
            assert torch.equal(rec.start[r][k], res.rewind_weights[k] * res.masks[r][k])


def test_imp_builtin_trainer_keeps_pruned_zero(net, data):
    # the default trainer (no train_fn): losses of a 2-round run match the recorded trainer's
    z, y = data
    a = prune.imp(net, z, y, density=0.8, steps_per_round=3)
    b = prune.imp(net, z, y, density=0.8, steps_per_round=3, train_fn=Recorder())
    assert a.losses == b.losses and a.kept == b.kept


def test_imp_multi_image(net, data):
    z, y = data
    y2 = rng.uniform(y.shape, 99)
    single = prune.imp(net, z, y, density=0.6, steps_per_round=3)
    # the same image twice: the loss doubles and Adam (scale invariant) takes the same steps
    twice = prune.imp(net, z, images=[y, y], density=0.6, steps_per_round=3)
    assert twice.kept == single.kept
    assert twice.losses[0] == pytest.approx(2 * single.losses[0], rel=1e-5)
    for a, b, ma, mb in zip(twice.losses, single.losses, twice.masks, single.masks):
        # rounding can swap near-equal magnitudes at a threshold; compare where the masks agree
        if torch.equal(ma.to_flat(), mb.to_flat()):
            assert a == pytest.approx(2 * b, rel=1e-4)
    two = prune.imp(net, z, images=[y, y2], density=0.6, steps_per_round=3, train_fn=Recorder())
    assert two.kept == single.kept and all(math.isfinite(l) for l in two.losses)
    with pytest.raises(ValueError):
        prune.imp(net, z, y, images=[y2], density=0.6, steps_per_round=1)


def test_imp_stopping_rule(net, data):
    z, y = data
    fake = iter([5.0, 4.0, 3.0, 3.5, 4.0, 1.0, 1.0, 1.0])

    def train_fn(model, mask, z, images, steps, **kw):  # prescribed losses, no training
        return next(fake)

    res = prune.imp(net, z, y, density=0.1, steps_per_round=1, stop_on_loss_increase=2, train_fn=train_fn)
    assert res.losses == [5.0, 4.0, 3.0, 3.5, 4.0] and len(res.masks) == 5
    assert res.stopped_at == 2 and res.mask is res.masks[2]
    assert res.mask.kept == expected_kept(numel(net), 0.1)[2]


def test_loss_increase_stop():
    f = prune.loss_increase_stop
    assert f([5, 4, 3, 4, 5], 2) == 2
    assert f([5, 4, 3, 4, 5], 3) is None
    assert f([5, 4, 3, 4, 5, 6], 3) == 2
    assert f([1, 2, 1, 2, 3, 4], 2) == 2  # a single increase does not count for patience 2
    assert f([1, 2, 1, 2, 3, 4], 1) == 0
    assert f([3, 3, 3, 3], 2) is None  # equal is not an increase
    assert f([], 2) is None and f([1.0], 1) is None
    assert f([4, 3, 2, 1], 2) is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            f([1, 2], bad)


def test_imp_validation(net, data):
    z, y = data
    for kw in (dict(density=0.0), dict(density=1.2), dict(density=0.5, rewind=1.0), dict(density=0.5, rewind="late"),
               dict(density=0.5, prune_fraction=0.0), dict(density=0.5, stop_on_loss_increase=0)):
        kw.setdefault("steps_per_round", 1)
        with pytest.raises(ValueError):
            prune.imp(net, z, y, **kw)
    dense = prune.imp(net, z, y, density=1.0, steps_per_round=1)
    assert dense.kept == [numel(net)]
