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


def _process_group(distributed: bool):
    if not distributed:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed initialized (e.g. run under torchrun)")
    return torch.distributed.group.WORLD


def _check_density(density) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density


def search(model: nn.Module, z: torch.Tensor, y, *, density: float = 0.05, steps: int = 60000,
           lr: float = 0.01, tau: float = 0.2, kl: float = 1e-9, seed: int = 0, degradation=None,
           progress: bool | None = None, checkpoint=None, checkpoint_every: int = 1000, resume: bool = False,
           z_seed: int | None = None, distributed: bool = False, engine: str = "unfused") -> SearchResult:
    """Learn a mask at `density` for `model`'s current (initial) weights by fitting `y`.

    `y` is one image or a list of images (multi-image search: one network, one mask, the shared
    `z`, the loss summed over the images). With `distributed=True` (torch.distributed
    initialized, e.g. by torchrun), each process passes its own shard of the images and the
    logit gradients are summed across processes, so every process follows the single-process
    multi-image search over all images. `steps` defaults to the authors' 60,000. With
    `checkpoint=PATH` the state is saved atomically every `checkpoint_every` steps (one file per
    process when distributed); `resume=True` continues from it to the same result as an
    uninterrupted run. `z_seed` (the seed of `z`) is stored in the mask.

    `engine`: "unfused" samples all masked weights in one flat `gumbel_mask` launch and runs
    the network's own convolutions; "fused" runs every conv through `gumbel_masked_conv2d`,
    which forms the masked weights inside the convolution (meant for CUDA; on a CPU it computes
    the same numbers as "unfused").
    """
    density = _check_density(density)
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if engine not in ("unfused", "fused"):
        raise ValueError(f"engine must be 'unfused' or 'fused', got {engine!r}")
    check_finite("z", z)
    targets = [y] if torch.is_tensor(y) else list(y)
    if not targets:
        raise ValueError("y: no image given")
    for i, target in enumerate(targets):
        check_finite("y" if torch.is_tensor(y) else f"y[{i}]", target)
    group = _process_group(distributed)
    if group is not None and checkpoint is not None:
        checkpoint = f"{checkpoint}.rank{torch.distributed.get_rank()}"
    model.train()
    layout = FlatLayout.from_model(model)
    weights = layout.flatten({n: p.detach() for n, p in model.named_parameters()}).to(z.device)
    check_finite("the model's weights", weights)
    logits = torch.zeros(layout.numel, device=z.device, dtype=weights.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    noise_seed = rng.stream_seed(seed, "search")
    if engine == "fused":
        from .fused_search import FusedForward

        forward = FusedForward(model, layout, weights, noise_seed, tau)
    else:
        def forward(logits, z, step):
            masked = gumbel_mask(logits, weights, noise_seed, step * layout.numel, tau)
            return functional_call(model, layout.views(masked), (z,))
    settings = dict(density=density, lr=lr, tau=tau, kl=kl, seed=seed, architecture=getattr(model, "config", None),
                    weights=fingerprint(weights), z=fingerprint(z), y=[fingerprint(t) for t in targets],
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
        out = forward(logits, z, step)
        loss = sum(data_loss(out, target, degradation) for target in targets)
        loss.backward()
        if group is not None:
            torch.distributed.all_reduce(logits.grad, group=group)
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss, group=group)
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
