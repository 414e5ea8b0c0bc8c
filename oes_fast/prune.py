"""Pruning baselines of oes-spec.md section 6: pruning at initialization (random, magnitude,
SNIP, GraSP, SynFlow) and the Lottery Image Prior's iterative magnitude pruning (IMP).

Every method covers ALL parameters (conv weights and biases, BN weights and biases), like the
OES masks, and returns an `oes_fast.masks.Mask` at an exact density:

- scope="global": keep the round(density * n) highest scores over all parameters
  (`oes_fast.masks.topk`, ties broken by seeded random keys);
- scope="layer": keep k_l of each parameter tensor, where k_l is density * n_l rounded down or
  up so that the total is exactly round(density * n) (`layer_counts`, largest remainders).
  Every layer is then within one weight of its exact share, and usually k_l = round(density * n_l).

Ties are broken with the same seeded keys as `masks.topk` (key of flat element j is
u(stream_seed(seed, "topk"), j)), so per-layer and global selection agree on tie order.

The model passed in is never modified: scores are computed on a deep copy (batch norm in
training mode updates running statistics, and SynFlow replaces the weights by |W|).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import rng
from .flat import FlatLayout
from .masks import Mask, check_density, topk

__all__ = [
    "random", "magnitude", "snip", "grasp", "synflow", "imp", "IMPResult", "loss_increase_stop",
    "random_scores", "magnitude_scores", "snip_scores", "grasp_scores", "synflow_scores",
    "select", "layer_counts",
]

SCOPES = ("global", "layer")


# ------------------------------------------------------------------------------ selection
def layer_counts(numels: Sequence[int], density: float) -> list[int]:
    """How many entries each parameter tensor keeps under scope="layer": a list of ints, one
    per entry of `numels` (the parameters' sizes, non-negative ints), for `density` in (0, 1].

    Each count is floor or ceil of density * n_l, and they add up to exactly
    round(density * sum(n_l)) (the global count): floors first, then one more to the layers
    with the largest fractional parts (earlier layer first on equal parts). This is as close
    to the same density in every layer as integer counts allow, while the total density is
    the same as for scope="global".
    """
    density = check_density(density)
    numels = [int(n) for n in numels]
    total = round(density * sum(numels))
    exact = [density * n for n in numels]
    counts = [min(math.floor(x), n) for x, n in zip(exact, numels)]
    missing = total - sum(counts)
    order = sorted(range(len(numels)), key=lambda i: -(exact[i] - counts[i]))  # stable: index breaks ties
    for i in order:
        if missing <= 0:
            break
        if counts[i] < numels[i]:
            counts[i] += 1
            missing -= 1
    return counts


def _keep_top(scores: torch.Tensor, k: int, keys: torch.Tensor) -> torch.Tensor:
    """Boolean vector keeping the k highest scores; ties go to the larger key (as masks.topk)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        by_key = torch.sort(keys, descending=True, stable=True).indices
        by_score = torch.sort(scores[by_key], descending=True, stable=True).indices
        keep[by_key[by_score[:k]]] = True
    return keep


def _flat_scores(scores: Mapping[str, torch.Tensor], what: str) -> tuple[FlatLayout, torch.Tensor]:
    layout = FlatLayout.from_shapes({n: t.shape for n, t in scores.items()})
    flat = layout.flatten({n: t.detach().to("cpu", torch.float64) for n, t in scores.items()})
    if torch.isnan(flat).any():
        raise ValueError(f"{what}: scores contain NaN")
    return layout, flat


def _select_layerwise(scores: Mapping[str, torch.Tensor], density: float, seed: int, **attributes) -> Mask:
    layout, flat = _flat_scores(scores, "select")
    counts = layer_counts([s.numel() for s in layout.shapes], density)
    if sum(counts) == 0:
        raise ValueError(f"density {density} keeps no parameter of {layout.numel}")
    keys = rng.uniform((layout.numel,), rng.stream_seed(seed, "topk"))
    keep = torch.zeros(layout.numel, dtype=torch.bool)
    for shape, offset, k in zip(layout.shapes, layout.offsets, counts):
        n = shape.numel()
        keep[offset:offset + n] = _keep_top(flat[offset:offset + n], k, keys[offset:offset + n])
    mask = Mask(layout.views(keep), **attributes)
    mask.meta.setdefault("density_requested", density)
    return mask


def select(scores: Mapping[str, torch.Tensor], density: float, *, scope: str = "global", seed: int = 0,
           **attributes) -> Mask:
    """Mask keeping the highest `scores` (name -> real-valued tensor shaped like that parameter,
    any float dtype and device, no NaN) at an exact `density` in (0, 1], over all of them
    (scope="global") or per tensor (scope="layer"); ties go by keys seeded with `seed` (int >= 0).
    Extra keyword arguments become Mask attributes (architecture, seed, z_seed, meta). Returns
    an oes_fast.masks.Mask (CPU bool tensors)."""
    density = check_density(density)
    if scope == "global":
        return topk(scores, density, seed=seed, **attributes)
    if scope == "layer":
        return _select_layerwise(scores, density, seed, **attributes)
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _mask_for(model: nn.Module, scores, density, scope, seed, method: str, **meta) -> Mask:
    density = check_density(density)
    return select(scores, density, scope=scope, seed=seed, architecture=getattr(model, "config", None),
                  meta=dict(method=method, scope=scope, prune_seed=seed, **meta))


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


# ------------------------------------------------------------------------------ helpers
def _mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x, y)  # as loop.data_loss says why


def _loss_fn(degradation) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return _mse if degradation is None else degradation.loss


def _working_copy(model: nn.Module) -> tuple[nn.Module, list[str], list[nn.Parameter]]:
    """Deep copy in training mode (batch statistics, oes-spec.md section 2) with no stale grads."""
    work = copy.deepcopy(model)
    work.train()
    names, params = zip(*work.named_parameters())
    for p in params:
        p.grad = None
        p.requires_grad_(True)  # scores need gradients even for a frozen model
    return work, list(names), list(params)


def _like_params(t: torch.Tensor, params) -> torch.Tensor:
    p = params[0]
    return t.to(device=p.device, dtype=p.dtype)


# ------------------------------------------------------------------------------ scores
def random_scores(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded uniforms: name -> float32 tensor in [0, 1] shaped like that parameter of `model`,
    element j of the flat parameter space at stream offset j (`seed`: int >= 0)."""
    layout = FlatLayout.from_model(model)
    s = rng.stream_seed(seed, "prune-random")
    return {n: rng.uniform(shape, s, off) for n, shape, off in zip(layout.names, layout.shapes, layout.offsets)}


@torch.no_grad()
def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """|w|: name -> tensor shaped, typed and placed like that parameter of `model`."""
    return {n: p.detach().abs().clone() for n, p in model.named_parameters()}


def snip_scores(model: nn.Module, z: torch.Tensor, y: torch.Tensor, *, degradation=None) -> dict[str, torch.Tensor]:
    """SNIP (Lee et al. 2019): |g * w| with g = d loss / d w at the current weights,
    loss = mse(model(z), y) or degradation.loss(model(z), y); batch norm with batch statistics.

    `z`: the network input (1, C_in, H, W); `y`: the target (1, C_out, H, W) in [0, 1], or
    what `degradation` (oes_fast.tasks) observes. Returns name -> non-negative tensor shaped
    like that parameter."""
    work, names, params = _working_copy(model)
    loss = _loss_fn(degradation)(work(_like_params(z, params)), _like_params(y, params))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: ((g if g is not None else torch.zeros_like(p)) * p).detach().abs()
            for n, p, g in zip(names, params, grads)}


def grasp_scores(model: nn.Module, z: torch.Tensor, y: torch.Tensor, *, degradation=None) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al. 2020) score S(-w) = -w * (H g), H the Hessian and g the gradient of the
    loss at the current weights; H g by double backward: H g = d/dw <grad L(w), stop_grad(g)>.

    Sign convention (the paper's Algorithm 1): S estimates the change of the gradient norm when a
    weight is removed; a LARGE S means removing the weight reduces gradient flow the least, so
    `grasp` REMOVES the highest scores and KEEPS the lowest.

    `z`, `y`, `degradation` as in `snip_scores`. Returns name -> real tensor shaped like that
    parameter.
    """
    work, names, params = _working_copy(model)
    loss = _loss_fn(degradation)(work(_like_params(z, params)), _like_params(y, params))
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(g, g.detach()) for g in grads if g is not None]
    gdotg = sum((g * gd).sum() for g, gd in pairs)
    hg = torch.autograd.grad(gdotg, params, allow_unused=True)
    return {n: (-p * (h if h is not None else torch.zeros_like(p))).detach()
            for n, p, h in zip(names, params, hg)}


def _synflow_input_shape(model: nn.Module, input_shape) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(input_shape)
    config = getattr(model, "config", {}) or {}
    side = getattr(model, "min_side", None)
    if side is not None and "in_channels" in config:
        return (1, config["in_channels"], side, side)
    if config.get("name") == "deep_decoder":
        return (1, config["channels"], 4, 4)
    raise ValueError("synflow: cannot infer the model's input shape; pass input_shape=(1, C, H, W)")


def _synflow_network(model: nn.Module) -> nn.Module:
    """The network SynFlow measures: a float64 deep copy, batch norm in eval mode with the default
    running statistics (mean 0, variance 1) so that each BN is a fixed affine map (as in the
    SynFlow paper, which scores the network on its linear path), and without the final sigmoid
    (with |W| the pre-activations are large and positive, a sigmoid would saturate and zero every
    score; R is the sum of the pre-sigmoid output). float64 as in the SynFlow authors' code:
    with |W| the output grows by a large factor per layer."""
    work = copy.deepcopy(model).double()
    work.eval()
    for module in work.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    if isinstance(getattr(work, "sigmoid", None), bool):
        work.sigmoid = False
    for p in work.parameters():
        p.grad = None
        p.requires_grad_(True)
    return work


def _synflow_scores_on(work: nn.Module, abs_w: list[torch.Tensor], masks: list[torch.Tensor] | None,
                       ones: torch.Tensor) -> list[torch.Tensor]:
    params = list(work.parameters())
    with torch.no_grad():
        for i, (p, w) in enumerate(zip(params, abs_w)):
            p.copy_(w if masks is None else w * masks[i])
    r = work(ones).sum()
    grads = torch.autograd.grad(r, params, allow_unused=True)
    return [((g if g is not None else torch.zeros_like(p)) * p).detach().abs() for p, g in zip(params, grads)]


def synflow_scores(model: nn.Module, mask: Mask | None = None, *, input_shape=None) -> dict[str, torch.Tensor]:
    """One SynFlow evaluation: |dR/dw * w| with R = sum(f(1; |W| * mask)) on the network of
    `_synflow_network`. `mask`: an oes_fast.masks.Mask for `model`, or None (nothing pruned);
    `input_shape`: (1, C, H, W) of the all-ones input (inferred for this package's models).
    Returns name -> float64 non-negative tensor shaped like that parameter."""
    work = _synflow_network(model)
    names = [n for n, _ in work.named_parameters()]
    abs_w = [p.detach().abs() for p in work.parameters()]
    masks = None if mask is None else [mask[n].to(abs_w[i].device, torch.float64) for i, n in enumerate(names)]
    ones = torch.ones(_synflow_input_shape(model, input_shape), dtype=torch.float64, device=abs_w[0].device)
    return dict(zip(names, _synflow_scores_on(work, abs_w, masks, ones)))


# ------------------------------------------------------------------------------ pruning at init
def random(model: nn.Module, density: float, *, scope: str = "global", seed: int = 0) -> Mask:
    """Random pruning: scores are seeded uniforms (stream "prune-random").

    Common to the pruning-at-initialization functions: `model` is not modified; `density` in
    (0, 1] is the exact fraction of ALL parameters kept; `scope` is "global" or "layer" (see the
    module docstring); `seed` (int >= 0) seeds the scores (here) and the tie-breaking keys.
    Returns an oes_fast.masks.Mask (CPU bool tensors, one per parameter) recording the method
    and its settings in `mask.meta`."""
    _check_scope(scope)
    return _mask_for(model, random_scores(model, seed), density, scope, seed, "random")


def magnitude(model: nn.Module, density: float, *, scope: str = "global", seed: int = 0) -> Mask:
    """Keep the largest |w| (arguments and result as for `random`)."""
    _check_scope(scope)
    return _mask_for(model, magnitude_scores(model), density, scope, seed, "magnitude")


def snip(model: nn.Module, density: float, z: torch.Tensor, y: torch.Tensor, *, scope: str = "global",
         seed: int = 0, degradation=None) -> Mask:
    """SNIP: keep the largest |g * w| at initialization (`snip_scores` for z, y and degradation;
    the rest as for `random`)."""
    _check_scope(scope)
    check_density(density)
    return _mask_for(model, snip_scores(model, z, y, degradation=degradation), density, scope, seed, "snip")


def grasp(model: nn.Module, density: float, z: torch.Tensor, y: torch.Tensor, *, scope: str = "global",
          seed: int = 0, degradation=None) -> Mask:
    """GraSP: remove the highest S = -w * (H g), keep the lowest (`grasp_scores` for the sign
    and for z, y and degradation; the rest as for `random`)."""
    _check_scope(scope)
    check_density(density)
    scores = grasp_scores(model, z, y, degradation=degradation)
    # keeping the lowest S = keeping the highest -S; ties still go by the seeded keys
    return _mask_for(model, {n: -s for n, s in scores.items()}, density, scope, seed, "grasp")


def synflow(model: nn.Module, density: float, *, scope: str = "global", seed: int = 0, iterations: int = 100,
            input_shape=None) -> Mask:
    """Iterative, data-free SynFlow (Tanaka et al. 2020).

    On the network of `_synflow_network` (|W|, BN as a fixed affine map, no sigmoid, float64),
    with an all-ones input (1, C, min_side, min_side): for k = 1..iterations, score
    |dR/dw * w| with the current mask applied, then keep density ** (k / iterations) of the
    parameters (globally or per layer). Already pruned weights score -inf, so they are not
    brought back (except where per-layer counts force it, which largest-remainder rounding can
    do by one weight). `iterations`: int >= 1; `input_shape` as in `synflow_scores`; the rest
    as for `random`.
    """
    _check_scope(scope)
    density = check_density(density)
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    work = _synflow_network(model)
    names = [n for n, _ in work.named_parameters()]
    abs_w = [p.detach().abs() for p in work.parameters()]
    ones = torch.ones(_synflow_input_shape(model, input_shape), dtype=torch.float64, device=abs_w[0].device)
    mask, masks = None, None
    for k in range(1, int(iterations) + 1):
        scores = _synflow_scores_on(work, abs_w, masks, ones)
        scores = {n: s.cpu() for n, s in zip(names, scores)}
        if mask is not None:
            scores = {n: s.masked_fill(~mask[n], -math.inf) for n, s in scores.items()}
        step_density = density if k == iterations else density ** (k / iterations)
        mask = _mask_for(model, scores, step_density, scope, seed, "synflow", iterations=int(iterations))
        masks = [mask[n].to(abs_w[0].device, torch.float64) for n in names]
    mask.meta["density_requested"] = density
    return mask


# ------------------------------------------------------------------------------ LIP: IMP
def loss_increase_stop(losses: Sequence[float], patience: int) -> int | None:
    """LIP's stopping rule: the index of the round just before the first run of `patience`
    consecutive increases (losses[i] > losses[i - 1]) of the fitting loss, else None.

    E.g. losses [5, 4, 3, 4, 5], patience 2 -> 2 (the loss rose at rounds 3 and 4).
    `patience`: int >= 1.
    """
    if isinstance(patience, bool) or int(patience) != patience or patience < 1:
        raise ValueError(f"patience must be a positive integer, got {patience!r}")
    run = 0
    for i in range(1, len(losses)):
        run = run + 1 if losses[i] > losses[i - 1] else 0
        if run == patience:
            return i - patience
    return None


@dataclass
class IMPResult:
    """Outcome of `imp`. masks[r], losses[r], densities[r] belong to round r (round 0 = dense);
    losses[r] is the fitting loss of the weights after round r's training. `stopped_at` is the
    round picked by the stopping rule (None if it did not fire or was off); `rewind_weights` are
    the weights every round restarts from (times its mask)."""

    masks: list[Mask]
    losses: list[float]
    densities: list[float]
    stopped_at: int | None = None
    rewind_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def mask(self) -> Mask:
        """The chosen mask: the stopping rule's round if it fired, else the last round's."""
        return self.masks[self.stopped_at if self.stopped_at is not None else -1]

    @property
    def sparsities(self) -> list[float]:
        return [1.0 - d for d in self.densities]

    @property
    def kept(self) -> list[int]:
        return [m.kept for m in self.masks]


def _all_reduce_sum(tensors: list[torch.Tensor], group) -> None:
    """Sum `tensors` in place across the processes of `group`, in one collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _train(model: nn.Module, mask: Mask, z: torch.Tensor, images: Sequence[torch.Tensor], steps: int, *,
           lr: float = 0.01, degradation=None, callback=None, group=None) -> float:
    """Fit `model` in place with Adam on sum_i loss(model(z), images[i]); pruned weights stay
    exactly zero (gradients masked and weights re-zeroed after every step, so Adam's moments of
    pruned entries never move them). callback(step, model) runs after each step (1-based).
    Returns the fitting loss of the final weights. With a process `group`, `images` is this
    process's shard: gradients and the final loss are summed over the group, so every process
    takes the steps of one process holding all the images."""
    loss_fn = _loss_fn(degradation)
    params = list(model.parameters())
    masks = [mask[n].to(p.device, p.dtype) for n, p in model.named_parameters()]
    model.train()  # batch statistics, oes-spec.md section 2
    with torch.no_grad():
        for p, m in zip(params, masks):
            p.mul_(m)
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        x = model(z)
        loss = sum(loss_fn(x, y) for y in images)
        loss.backward()
        if group is not None:
            for p in params:  # a parameter unused in the forward still joins the collective
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            _all_reduce_sum([p.grad for p in params], group)
        for p, m in zip(params, masks):
            if p.grad is not None:
                p.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, masks):
                p.mul_(m)
        if callback is not None:
            callback(step, model)
    with torch.no_grad():
        x = model(z)
        final = sum(loss_fn(x, y) for y in images)
        if group is not None:
            final = final.detach().clone().reshape(1)
            _all_reduce_sum([final], group)  # every process sees the same loss: same stopping decision
        return float(final.sum())


def imp(model: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None, *, density: float, steps_per_round: int,
        prune_fraction: float = 0.2, rewind="init", stop_on_loss_increase: int | None = None, lr: float = 0.01,
        degradation=None, images: Sequence[torch.Tensor] | None = None, seed: int = 0,
        train_fn: Callable | None = None, distributed: bool = False) -> IMPResult:
    """LIP iterative magnitude pruning (oes-spec.md section 6). Returns an IMPResult.

    `z`: the network input (1, C_in, H, W); `y`: the target (1, C_out, H, W), values in [0, 1]
    (or what `degradation` observes); `density` in (0, 1]: the target fraction of ALL
    parameters kept; `steps_per_round`: int >= 0; `prune_fraction` in (0, 1); `lr` > 0.

    Round r (r = 0 dense) sets the kept weights to the rewind weights, trains the masked network
    for `steps_per_round` steps (Adam, lr; pruned weights exactly zero), records the fitting loss,
    and, unless the target is reached, prunes `prune_fraction` of the REMAINING weights by global
    magnitude of the trained weights: kept_{r+1} = round((1 - prune_fraction) * kept_r) (at least
    one weight less, so tiny counts cannot stall). Rounds go on until kept_r <= round(density * n),
    so the last density is the first of the 0.8^i sequence at or below the target.

    rewind: "init" (the model's weights W0) or j in [0, 1): the weights after round(j * steps)
    steps of the dense round 0 (lottery-ticket rewinding). Adam restarts every round.
    stop_on_loss_increase: None, or the patience of `loss_increase_stop`; when the rule fires,
    IMP stops there (no further rounds) and `.mask` is the round before the increases.
    (To see the whole curve, run with None and call `loss_increase_stop` on `.losses`.)
    images: several targets sharing z and one mask; the loss is the sum over them (y must be None).
    train_fn: replaces the built-in trainer, same signature as `_train`:
    train_fn(model, mask, z, images, steps, *, lr, degradation, callback) -> final loss; it trains
    `model` in place, keeps pruned weights zero and calls callback(step, model) after each step.
    distributed: with torch.distributed initialized (e.g. under torchrun), each process passes
    its own shard of the images (`images=` or `y=`); the gradients and the fitting losses are
    summed across processes, so every process runs the single-process multi-image IMP over all
    the images (same masks, to float rounding). Uses the built-in trainer (no `train_fn`).
    The model passed in is not modified.
    """
    density = check_density(density)
    if not 0.0 < float(prune_fraction) < 1.0:
        raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction}")
    steps = int(steps_per_round)
    if steps < 0:
        raise ValueError(f"steps_per_round must be >= 0, got {steps_per_round}")
    if rewind == "init":
        rewind_step = 0
    elif isinstance(rewind, (int, float)) and not isinstance(rewind, bool) and 0.0 <= float(rewind) < 1.0:
        rewind_step = round(float(rewind) * steps)
    else:
        raise ValueError(f"rewind must be 'init' or a fraction in [0, 1), got {rewind!r}")
    if stop_on_loss_increase is not None:
        loss_increase_stop([], stop_on_loss_increase)  # validates the patience
    if (images is None) == (y is None):
        raise ValueError("imp: pass exactly one of y (one image) or images (a list sharing z and the mask)")
    images = [y] if images is None else list(images)
    if not images:
        raise ValueError("imp: images is empty")
    group = None
    if distributed:
        if train_fn is not None:
            raise ValueError("imp: distributed=True uses the built-in trainer; train_fn would have to all-reduce "
                             "the gradients itself, so pass one or the other")
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("imp: distributed=True needs torch.distributed initialized (e.g. run under torchrun)")
        group = torch.distributed.group.WORLD

    work = copy.deepcopy(model)
    names, params = zip(*work.named_parameters())
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    z = _like_params(z, params)
    images = [_like_params(t, params) for t in images]
    layout = FlatLayout.from_model(work)
    n = layout.numel
    target = round(density * n)
    if target == 0:
        raise ValueError(f"density {density} keeps no parameter of {n}")
    keys = rng.uniform((n,), rng.stream_seed(seed, "topk"))
    architecture = getattr(model, "config", None)
    trainer = train_fn or (functools.partial(_train, group=group) if group is not None else _train)

    rewind_w = {nm: p.detach().clone() for nm, p in zip(names, params)}
    snapshot: dict[str, torch.Tensor] = {}

    def take_snapshot(step, net):
        if step == rewind_step:
            snapshot.update({nm: p.detach().clone() for nm, p in net.named_parameters()})

    masks, losses, densities = [], [], []
    keep = torch.ones(n, dtype=torch.bool)
    stopped_at = None
    while True:
        r = len(masks)
        mask = Mask(layout.views(keep.clone()), architecture=architecture,
                    meta=dict(method="imp", round=r, prune_seed=seed, rewind=rewind, density_requested=density))
        with torch.no_grad():  # rewind: the kept weights restart from rewind_w, the pruned are zero
            for nm, p in zip(names, params):
                p.copy_(rewind_w[nm] * mask[nm].to(p.device, p.dtype))
        callback = take_snapshot if (r == 0 and rewind_step > 0) else None
        loss = trainer(work, mask, z, images, steps, lr=lr, degradation=degradation, callback=callback)
        if r == 0 and rewind_step > 0:
            if not snapshot:
                raise RuntimeError(f"imp: train_fn did not call callback at step {rewind_step} (needed for rewind)")
            rewind_w = snapshot
        masks.append(mask)
        losses.append(float(loss))
        densities.append(mask.density)
        if stop_on_loss_increase is not None:
            stopped_at = loss_increase_stop(losses, stop_on_loss_increase)
            if stopped_at is not None:
                break
        kept = int(keep.sum())
        if kept <= target:
            break
        # prune by global magnitude of the trained weights; pruned ones score -inf (never return)
        trained = layout.flatten({nm: p.detach().to("cpu", torch.float64) for nm, p in zip(names, params)})
        scores = trained.abs().masked_fill(~keep, -math.inf)
        k_next = min(round((1.0 - float(prune_fraction)) * kept), kept - 1)
        keep = _keep_top(scores, max(k_next, 1), keys)
    return IMPResult(masks=masks, losses=losses, densities=densities, stopped_at=stopped_at,
                     rewind_weights={nm: t.detach().cpu() for nm, t in rewind_w.items()})
