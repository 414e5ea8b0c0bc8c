"""Optimal Eye Surgeon mask search (oes-spec.md section 3).

One logit per parameter (all of them: conv weights and biases, batch-norm weights and biases),
initialized to 0; the network's initial weights W0 stay fixed. Each step samples the masked
weights of the whole network in ONE launch of the fused op over the flat parameter space
(Gumbel noise regenerated from (seed, step * n + j) in the backward), runs the generator on
views of that flat buffer, adds the KL prior, and takes an Adam step on the logits only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from . import checkpoint as ckpt
from . import rng
from .flat import FlatLayout
from .masks import Mask, MaskHealth, health, topk
from .ops import gumbel_mask, kl_prior
from .train import _bar, _exists, check_finite, data_loss, fingerprint, show_progress


@dataclass
class SearchResult:
    logits: dict[str, torch.Tensor]  # final mask logits per parameter (CPU, float32)
    mask: Mask  # hard mask at the requested density
    losses: list[float]  # total loss (data + kl * KL) at every step
    health: MaskHealth
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)


def _check_density(density) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density


def search(model: nn.Module, z: torch.Tensor, y: torch.Tensor, *, density: float = 0.05, steps: int = 60000,
           lr: float = 0.01, tau: float = 0.2, kl: float = 1e-9, seed: int = 0, degradation=None,
           progress: bool | None = None, checkpoint=None, checkpoint_every: int = 1000, resume: bool = False,
           z_seed: int | None = None) -> SearchResult:
    """Learn a mask at `density` for `model`'s current (initial) weights by fitting `y`.

    `steps` defaults to the authors' 60,000. With `checkpoint=PATH` the state is saved
    atomically every `checkpoint_every` steps; `resume=True` continues from it to the same
    result as an uninterrupted run. `z_seed` (the seed of `z`) is stored in the mask.
    """
    density = _check_density(density)
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    check_finite("z", z)
    check_finite("y", y)
    model.train()
    layout = FlatLayout.from_model(model)
    weights = layout.flatten({n: p.detach() for n, p in model.named_parameters()}).to(z.device)
    check_finite("the model's weights", weights)
    logits = torch.zeros(layout.numel, device=z.device, dtype=weights.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    noise_seed = rng.stream_seed(seed, "search")
    settings = dict(density=density, lr=lr, tau=tau, kl=kl, seed=seed, architecture=getattr(model, "config", None),
                    weights=fingerprint(weights), z=fingerprint(z), y=fingerprint(y),
                    degradation=degradation.to_dict() if degradation else None)
    losses: list[float] = []
    start = 0
    if resume and checkpoint is not None and _exists(checkpoint):
        state = ckpt.load(checkpoint, "search", settings)
        with torch.no_grad():
            logits.copy_(state["logits"].to(logits.device))
        optimizer.load_state_dict(state["optimizer"])
        losses, start = list(state["losses"]), state["step"]
        if start > steps:
            raise ckpt.CheckpointError(f"{checkpoint} is at step {start}, beyond the {steps} steps asked for")

    def save_checkpoint(step):
        ckpt.save(checkpoint, "search", settings,
                  dict(step=step, logits=logits.detach().cpu(), optimizer=optimizer.state_dict(), losses=losses))

    started = time.perf_counter()
    bar = _bar(steps, start, "search", show_progress(progress))
    for step in range(start, steps):
        optimizer.zero_grad(set_to_none=False)
        masked = gumbel_mask(logits, weights, noise_seed, step * layout.numel, tau)
        out = functional_call(model, layout.views(masked), (z,))
        loss = data_loss(out, y, degradation)
        loss.backward()
        # the KL prior's value and gradient in one fused pass, added outside autograd
        prior, prior_grad = kl_prior(logits.detach(), density)
        logits.grad.add_(prior_grad, alpha=kl)
        optimizer.step()
        losses.append(loss.item() + kl * prior.item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.2e}")
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            save_checkpoint(step + 1)
    if bar is not None:
        bar.close()
    if checkpoint is not None:
        save_checkpoint(steps)
    final = {n: t.detach().cpu().clone() for n, t in layout.views(logits.detach()).items()}
    mask = topk(final, density, seed=seed, architecture=getattr(model, "config", None))
    mask.seed = getattr(model, "init_seed", None)  # the weight seed: skip_oes(seed=mask.seed) rebuilds W0
    mask.z_seed = z_seed
    mask.meta.update(method="oes", steps=steps, lr=lr, tau=tau, kl=kl, search_seed=seed,
                     degradation=settings["degradation"])
    report = health(mask, model)
    return SearchResult(logits=final, mask=mask, losses=losses, health=report,
                        seconds=time.perf_counter() - started, settings=settings)
