"""Optimal Eye Surgeon mask search (oes-spec.md section 3).

One logit per parameter (all of them: conv weights and biases, batch-norm weights and biases),
initialized to 0; the network's initial weights W0 stay fixed. Each step samples the masked
weights of the whole network in ONE launch over the flat parameter space (Gumbel noise from
(seed, step * n + j)), runs the generator on views of that flat buffer, and hands the gradient
of the masked weights to ONE fused pass (`logit_adam_step_`) that applies the chain rule, adds
the KL prior's gradient and takes the Adam step on the logits in place.
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
from .graphs import GraphedStep
from .masks import Mask, MaskHealth, check_density, health, topk
from .ops import gumbel_mask_with_slope, logit_adam_step_
from .loop import (check_finite, checkpoint_exists, data_loss, fingerprint, network_input, progress_bar,
                   show_progress)


@dataclass
class SearchResult:
    logits: dict[str, torch.Tensor]  # final mask logits per parameter (CPU, float32)
    mask: Mask  # hard mask at the requested density
    losses: list[float]  # total loss (data + kl * KL) at every step
    health: MaskHealth
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each (ungraphed) step this call ran
    settings: dict = field(default_factory=dict)


def _process_group(distributed: bool):
    if not distributed:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed initialized (e.g. run under torchrun)")
    return torch.distributed.group.WORLD


class LogitAdam:
    """Adam (torch.optim.Adam's defaults) on the flat logits, one fused `logit_adam_step_` per
    step that also adds the KL prior. The state dict has torch.optim.Adam's layout, so
    checkpoints of either load into the other."""

    betas, eps = (0.9, 0.999), 1e-8

    def __init__(self, logits: torch.Tensor, lr: float):
        self.logits, self.lr, self.steps = logits, float(lr), 0
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(logits), torch.zeros_like(logits)

    def step(self, grad, *, density, kl, grad_scale=None, count: torch.Tensor | None = None) -> torch.Tensor:
        """Update the logits in place from their gradient `grad` (times `grad_scale` when
        given); returns the KL prior's value before the update. `count`: Adam's step count as
        a 0-d int64 device tensor that the Triton kernel reads (GraphedSearchStep), instead of
        the host's own count."""
        self.steps += 1
        with torch.no_grad():
            if count is not None:
                from .kernels import logit_adam_step as kernels

                return kernels.logit_adam_step_(self.logits, self.exp_avg, self.exp_avg_sq, grad, grad_scale, density,
                                                kl, self.lr, *self.betas, self.eps, count)
            return logit_adam_step_(self.logits, self.exp_avg, self.exp_avg_sq, grad, step=self.steps,
                                    density=density, kl=kl, lr=self.lr, betas=self.betas, eps=self.eps,
                                    grad_scale=grad_scale)

    def state_dict(self) -> dict:
        state = {} if self.steps == 0 else {0: dict(step=torch.tensor(float(self.steps)),
                                                    exp_avg=self.exp_avg.detach().cpu().clone(),
                                                    exp_avg_sq=self.exp_avg_sq.detach().cpu().clone())}
        group = dict(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=0, amsgrad=False, maximize=False,
                     params=[0])
        return dict(state=state, param_groups=[group])

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict["state"].get(0)
        if state is None:
            self.steps = 0
            self.exp_avg.zero_()
            self.exp_avg_sq.zero_()
            return
        self.steps = int(state["step"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])


class SearchStep:
    """One OES search step (oes-spec.md section 3), the body of `search`'s loop:
    `step(i)` samples the masks of step i (stream offset i * numel + j for flat element j),
    fits `targets` (one image or a list, the loss summed), and updates `self.logits` (flat,
    float32, initially 0) in place. Returns (data loss, KL prior) as 0-d tensors.

    engine "unfused": one flat `gumbel_mask_with_slope` launch (the masked weights and their
    slope in the logits), the network's own convolutions on views of that buffer, the masked
    weights' gradient and the slope handed to `logit_adam_step_`. engine "fused":
    every conv through `gumbel_masked_conv2d`, whose backward writes the logits' gradient
    (oes_fast/fused_search.py); with `recompute=True` its blocks keep only their inputs for the
    backward and run again there (less memory per pixel, one more forward). `group`: a
    torch.distributed process group whose gradients and losses are summed (multi-image search
    across processes)."""

    def __init__(self, model: nn.Module, z: torch.Tensor, targets, *, density: float, lr: float = 0.01,
                 tau: float = 0.2, kl: float = 1e-9, seed: int = 0, degradation=None, engine: str = "unfused",
                 group=None, recompute: bool = False):
        if engine not in ("unfused", "fused"):
            raise ValueError(f"engine must be 'unfused' or 'fused', got {engine!r}")
        if recompute and engine != "fused":
            raise ValueError("recompute=True needs engine='fused'")
        self.model, self.density, self.tau, self.kl, self.group = model, density, tau, kl, group
        self.targets = [targets] if torch.is_tensor(targets) else list(targets)
        self.degradation = degradation
        model.train()
        self.layout = FlatLayout.from_model(model)
        self.weights = self.layout.flatten({n: p.detach() for n, p in model.named_parameters()}).to(z.device)
        self.logits = torch.zeros(self.layout.numel, device=z.device, dtype=self.weights.dtype)
        self.optimizer = LogitAdam(self.logits, lr=lr)
        self.noise_seed = rng.stream_seed(seed, "search")
        self.z = network_input(model, z)
        self.fused = None
        if engine == "fused":
            from .fused_search import FusedForward

            self.fused = FusedForward(model, self.layout, self.weights, self.noise_seed, tau, recompute=recompute)
            self.logits.requires_grad_(True)

    def _data_loss(self, out):
        return sum(data_loss(out, target, self.degradation) for target in self.targets)

    def loss_and_grad(self, offset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(data loss, the gradient the logit update takes, its slope or None) with the masks
        drawn at stream offset `offset` (step * numel): an int, or a 0-d int64 device tensor
        that the Triton kernels read (GraphedSearchStep)."""
        if self.fused is not None:  # the logits' gradient, from the fused convolutions' epilogues
            self.logits.grad = None
            loss = self._data_loss(self.fused.forward_at(self.logits, self.z, offset))
            loss.backward()
            return loss.detach(), self.logits.grad, None
        # the masked weights' gradient; the chain rule to the logits is fused into the update
        if isinstance(offset, torch.Tensor):
            from .kernels import gumbel_mask as kernels

            masked, slope = kernels.gumbel_mask_with_slope(self.logits, self.weights, self.noise_seed, offset,
                                                           self.tau)
        else:
            masked, slope = gumbel_mask_with_slope(self.logits, self.weights, self.noise_seed, offset, self.tau)
        masked.requires_grad_(True)
        loss = self._data_loss(functional_call(self.model, self.layout.views(masked), (self.z,)))
        loss.backward()
        return loss.detach(), masked.grad, slope

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        loss, grad, slope = self.loss_and_grad(step * self.layout.numel)
        if self.group is not None:
            torch.distributed.all_reduce(grad, group=self.group)
            loss = loss.clone()
            torch.distributed.all_reduce(loss, group=self.group)
        prior = self.optimizer.step(grad, density=self.density, kl=self.kl, grad_scale=slope)
        return loss, prior


class GraphedSearchStep:
    """A SearchStep on CUDA captured in one CUDA graph and replayed (issue 5): the step index
    lives in a device tensor that the graph itself advances, and the Triton kernels read the
    noise offsets and Adam's step count from it, so one capture serves every step and a step
    launches no kernel from Python. Both engines: "unfused" (gumbel_mask_with_slope, the
    network's own convolutions) and "fused" (every conv through the Triton gumbel_masked_conv2d
    kernels, with or without recompute). Warm-up, capture and replay as oes_fast.graphs.GraphedStep
    (the first `warmup` calls are real steps, run eagerly). Returns the step's (data loss, KL
    prior) as device tensors that the next call overwrites.

    Needs one process and CUDA tensors. The body is tested on the CPU through the Triton
    interpreter, the capture and replay by tests/test_cuda_ops.py on a GPU. On an H200 the
    unfused engine's graph took 7.7 ms a step at 512x512, against 15.3 ms eager."""

    def __init__(self, run: SearchStep, first_step: int, warmup: int = 3):
        if run.group is not None:
            raise ValueError("cuda_graph=True needs a single process (no distributed search)")
        self.run = run
        device = run.logits.device
        self.step = torch.full((), int(first_step), dtype=torch.int64, device=device)  # the step about to run
        self.offset, self.count = torch.empty_like(self.step), torch.empty_like(self.step)
        self.graphed = GraphedStep(self.body, warmup)

    def body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One step with every step-dependent number read on the device; advances self.step."""
        run = self.run
        torch.mul(self.step, run.layout.numel, out=self.offset)
        loss, grad, slope = run.loss_and_grad(self.offset)
        torch.add(self.step, 1, out=self.count)  # Adam counts from 1
        prior = run.optimizer.step(grad, density=run.density, kl=run.kl, grad_scale=slope, count=self.count)
        self.step.add_(1)
        return loss, prior

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        steps = self.run.optimizer.steps
        out = self.graphed()
        if self.graphed.graph is not None:  # replayed: the capture's count put back, the replay counted
            self.run.optimizer.steps = steps + 1
        return out


def search(model: nn.Module, z: torch.Tensor, y, *, density: float = 0.05, steps: int = 60000,
           lr: float = 0.01, tau: float = 0.2, kl: float = 1e-9, seed: int = 0, degradation=None,
           progress: bool | None = None, checkpoint=None, checkpoint_every: int = 1000, resume: bool = False,
           z_seed: int | None = None, distributed: bool = False, engine: str = "unfused",
           recompute: bool = False, cuda_graph: bool = False) -> SearchResult:
    """Learn a mask at `density` for `model`'s current (initial) weights by fitting `y`.

    `model`: a generator (oes_fast.models; its weights are read, not changed; float32 or
    float64); `z`: its fixed input, float (1, C_in, H, W) on the model's device; `y`: the
    degraded image(s), float (1, C, H, W) with values in [0, 1] (or what `degradation`
    observes); `density` in (0, 1]: the fraction of ALL parameters the mask keeps; `steps` >= 0;
    `lr` > 0 (Adam on the logits); `tau` > 0 (Gumbel-sigmoid temperature); `kl` >= 0 (weight of
    the KL prior); `seed` (int >= 0) seeds the Gumbel noise and the mask's tie-breaks;
    `progress` True/False/None (None: when stderr is a terminal). NaN/Inf refused. Returns a
    SearchResult: the final logits (name -> CPU tensor shaped like the parameter, in the weights' dtype), the
    hard Mask at `density` (top-k of the logits), the loss at every step and the mask's health.

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
    the same numbers as "unfused"). `recompute=True` (fused engine only) keeps only each
    hourglass block's input for the backward and runs the block again there: the same result
    for less memory per pixel (large images), at the cost of about one more forward per step.
    `cuda_graph=True` (CUDA, one process, either engine) replays the step from one captured
    CUDA graph (GraphedSearchStep; on an H200 7.7 ms a step at 512x512 against 15.3 eager, unfused),
    fetching the losses in batches.
    """
    density = check_density(density)
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    check_finite("z", z)
    targets = [y] if torch.is_tensor(y) else list(y)
    if not targets:
        raise ValueError("y: no image given")
    for i, target in enumerate(targets):
        check_finite("y" if torch.is_tensor(y) else f"y[{i}]", target)
    group = _process_group(distributed)
    if group is not None and checkpoint is not None:
        checkpoint = f"{checkpoint}.rank{torch.distributed.get_rank()}"
    run = SearchStep(model, z, targets, density=density, lr=lr, tau=tau, kl=kl, seed=seed, degradation=degradation,
                     engine=engine, group=group, recompute=recompute)
    layout, weights, logits, optimizer = run.layout, run.weights, run.logits, run.optimizer
    check_finite("the model's weights", weights)
    settings = dict(density=density, lr=lr, tau=tau, kl=kl, seed=seed, architecture=getattr(model, "config", None),
                    weights=fingerprint(weights), z=fingerprint(z), y=[fingerprint(t) for t in targets],
                    degradation=degradation.to_dict() if degradation else None)
    losses: list[float] = []
    start = 0
    if resume and checkpoint is not None and checkpoint_exists(checkpoint):
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

    graphed = None
    if cuda_graph:
        if logits.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model and z on a CUDA device")
        graphed = GraphedSearchStep(run, start)
    pending: list[torch.Tensor] = []  # graphed steps' losses, still on the device

    def fetch_pending():
        if pending:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()

    started = time.perf_counter()
    bar = progress_bar(steps, start, "search", show_progress(progress))
    step_seconds: list[float] = []
    for step in range(start, steps):
        if graphed is None:
            step_started = time.perf_counter()
            loss, prior = run(step)
            losses.append(loss.item() + kl * prior.item())
            step_seconds.append(time.perf_counter() - step_started)
        else:  # no host sync per step: the same sum in float64 on the device, fetched in batches
            loss, prior = graphed()
            pending.append(loss.double() + kl * prior.double())
            if len(pending) == 100 or step == steps - 1:
                fetch_pending()
        if bar is not None:
            bar.update(1)
            if (step % 20 == 0 or step == steps - 1) and losses:
                bar.set_postfix(loss=f"{losses[-1]:.2e}")
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            fetch_pending()
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
                        seconds=time.perf_counter() - started, settings=settings, step_seconds=step_seconds)
