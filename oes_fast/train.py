"""Fitting a generator to one degraded image: Sparse-DIP, dense DIP and the deep decoder
(oes-spec.md sections 4 and 6). Adam (lr 0.01) on the loss of the degradation (mean squared
error for denoising); PSNR/SSIM against the clean image are recorded when it is given."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checkpoint as ckpt
from .graphs import GraphedStep
from .loop import (check_finite, checkpoint_exists, data_loss, fingerprint, network_input, progress_bar,
                   show_progress)
from .masks import Mask


@dataclass
class TrainResult:
    image: torch.Tensor  # the generator's output after the last step, shaped like the clean image
    losses: list[float]  # training loss at every step
    model: nn.Module  # the trained generator (a copy; the model passed in is left as it was)
    steps: list[int] = field(default_factory=list)  # steps at which psnr/ssim were recorded
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step this call ran
    # with output smoothing, psnr/ssim are of the smoothed output and these of the last output itself
    raw_psnr: list[float] = field(default_factory=list)
    raw_ssim: list[float] = field(default_factory=list)

    @property
    def peak_psnr(self) -> float | None:
        return max(self.psnr) if self.psnr else None

    @property
    def peak_step(self) -> int | None:
        return self.steps[max(range(len(self.psnr)), key=self.psnr.__getitem__)] if self.psnr else None

    @property
    def final_psnr(self) -> float | None:
        return self.psnr[-1] if self.psnr else None

    def summary(self) -> dict:
        return dict(steps=len(self.losses), final_loss=self.losses[-1] if self.losses else None,
                    peak_psnr=self.peak_psnr, peak_step=self.peak_step, final_psnr=self.final_psnr,
                    final_ssim=self.ssim[-1] if self.ssim else None, seconds=self.seconds,
                    **(dict(raw_peak_psnr=max(self.raw_psnr), raw_final_psnr=self.raw_psnr[-1]) if self.raw_psnr else {}))


def adam(params, lr: float, capturable: bool = False) -> torch.optim.Adam:
    """torch.optim.Adam with its defaults, as one fused kernel over every parameter where torch has
    one (CPU and CUDA, float32/float64): the same update several times faster on a CPU than the
    per-tensor loop (measured: 0.26 against 1.15 ms for the sparse generator's small tensors).
    `capturable`: its step count kept on the device, so that a CUDA graph can capture the update."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
                                 for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None, capturable=capturable)


class Recorder:
    """PSNR/SSIM against the clean image every `every` steps and at the end; with `box` (top,
    left, bottom, right), against that region of the output (a padded network's image)."""

    def __init__(self, clean: torch.Tensor | None, every: int, box: tuple[int, int, int, int] | None = None):
        self.clean = clean.detach().cpu() if clean is not None else None
        self.box = box
        self.every = max(1, int(every))
        self.steps: list[int] = []
        self.psnr: list[float] = []
        self.ssim: list[float] = []

    def due(self, step: int) -> bool:
        return self.clean is not None and step % self.every == 0

    def record(self, step: int, image: torch.Tensor) -> None:
        from .metrics import psnr, ssim

        image = image.detach().cpu().float()
        if self.box is not None:
            top, left, bottom, right = self.box
            image = image[:, :, top:bottom, left:right]
        self.steps.append(step)
        self.psnr.append(float(psnr(image, self.clean)))
        self.ssim.append(float(ssim(image, self.clean)))

    def state(self) -> dict:
        return dict(steps=list(self.steps), psnr=list(self.psnr), ssim=list(self.ssim))

    def restore(self, state: dict) -> None:
        self.steps, self.psnr, self.ssim = list(state["steps"]), list(state["psnr"]), list(state["ssim"])


def _fit(model, z, y, steps, *, kind, clean, lr, degradation, record_every, progress, checkpoint, checkpoint_every,
         resume, keep=None, extra_settings=None, sgld_seed=None, sgld_std=None, average_from=None,
         clean_box=None, smoothing=0.0, noise_level=0.0, cuda_graph=False) -> TrainResult:
    """The training loop shared by every method. `keep` (name -> bool tensor) masks the
    gradients so pruned weights stay exactly zero. With `sgld_seed`, Gaussian noise of standard
    deviation `sgld_std` is added to every weight after each update (SGLD) and the outputs from
    step `average_from` on are averaged: that average is the result and what PSNR is measured on.
    With `smoothing` = beta in (0, 1), the result is the exponential moving average of the outputs,
    s_0 = out_0, s_t = beta s_{t-1} + (1 - beta) out_t (the last output after the final update
    folded in too); PSNR is measured on it, and on the output itself as `raw_psnr`.
    With `noise_level` = sigma > 0, the gradient is that of max(loss - sigma^2, 0): the fit stops
    where its residual reaches the noise's variance (the discrepancy principle); the recorded
    losses are the losses themselves. With `cuda_graph`, the steps replay one CUDA graph
    (oes_fast.graphs.GraphedStep). The losses are fetched from the device in batches, not once a step."""
    steps = int(steps)
    noise_level = float(noise_level)
    if not (math.isfinite(noise_level) and 0.0 <= noise_level <= 1.0):
        raise ValueError(f"noise_level must be a standard deviation in [0, 1] (the image's range), got {noise_level}")
    noise_floor = noise_level ** 2
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    smoothing = float(smoothing)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if smoothing and sgld_seed is not None:
        raise ValueError("smoothing and SGLD's average are exclusive")
    check_finite("z", z)
    check_finite("y", y)
    if clean is not None:
        check_finite("clean", clean)
    if cuda_graph and (z.device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(f"cuda_graph=True needs the model, z and y on a CUDA device (z is on {z.device})")
    if cuda_graph and sgld_seed is not None:
        raise ValueError("cuda_graph=True does not run SGLD: its noise is drawn between the steps")
    model.train()
    params = [p for _, p in model.named_parameters()]
    optimizer = adam(params, lr, capturable=cuda_graph)
    keep_list = None
    if keep is not None:
        keep_list = [keep[name].to(device=p.device, dtype=p.dtype) for name, p in model.named_parameters()]
        with torch.no_grad():
            torch._foreach_mul_(params, keep_list)
    recorder = Recorder(clean, record_every, clean_box)
    raw_recorder = Recorder(clean, record_every, clean_box) if smoothing else None
    losses: list[float] = []
    start_step = 0
    noise = torch.Generator(device=z.device).manual_seed(sgld_seed) if sgld_seed is not None else None
    average, averaged = None, 0

    def smoothed(average, frame):
        """The moving average with `frame` folded in (in place; the first frame starts it)."""
        return frame.clone() if average is None else average.mul_(smoothing).add_(frame, alpha=1 - smoothing)

    settings = dict(kind=kind, lr=lr, record_every=record_every, architecture=getattr(model, "config", None),
                    z=fingerprint(z), y=fingerprint(y), degradation=degradation.to_dict() if degradation else None,
                    **(extra_settings or {}), **(dict(smoothing=smoothing) if smoothing else {}),
                    **(dict(noise_level=noise_level) if noise_level else {}))
    if resume and checkpoint is not None and checkpoint_exists(checkpoint):
        state = ckpt.load(checkpoint, "train", settings)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        losses = list(state["losses"])
        recorder.restore(state["recorder"])
        start_step = state["step"]
        if noise is not None:
            noise.set_state(state["noise"])
            average, averaged = state["average"], state["averaged"]
        if smoothing:
            average = state["average"]
            raw_recorder.restore(state["raw_recorder"])
        if start_step > steps:
            raise ckpt.CheckpointError(f"{checkpoint} is at step {start_step}, beyond the {steps} steps asked for")

    def save_checkpoint(step):
        state = dict(step=step, model=model.state_dict(), optimizer=optimizer.state_dict(), losses=losses,
                     recorder=recorder.state())
        if noise is not None:
            state.update(noise=noise.get_state(), average=average, averaged=averaged)
        if smoothing:
            state.update(average=average, raw_recorder=raw_recorder.state())
        ckpt.save(checkpoint, "train", settings, state)

    started = time.perf_counter()
    bar = progress_bar(steps, start_step, kind, show_progress(progress))
    out = None
    z_run = network_input(model, z)

    def one_step():
        optimizer.zero_grad(set_to_none=False)
        out = model(z_run)
        loss = data_loss(out, y, degradation)
        if loss.requires_grad:  # a network cut by its mask may have nothing left to train
            # with a noise level: no gradient once the loss is below its variance
            fitted = (loss - noise_floor).clamp_min(0) if noise_floor else loss
            fitted.backward()
            if keep_list is not None:
                torch._foreach_mul_([p.grad for p in params], keep_list)
            optimizer.step()
        return out, loss.detach()

    run_step = GraphedStep(one_step) if cuda_graph else one_step
    pending: list[torch.Tensor] = []  # losses still on the device: a fetch per step would wait for a GPU

    def fetch_losses():
        if pending:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()

    step_seconds: list[float] = []  # on a GPU, the host's time to queue each step
    for step in range(start_step, steps):
        step_started = time.perf_counter()
        out, loss = run_step()
        pending.append(loss.clone() if cuda_graph else loss)  # (a graph's loss is overwritten next step)
        step_seconds.append(time.perf_counter() - step_started)
        if noise is not None:
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=noise, device=p.device, dtype=p.dtype), alpha=sgld_std)
            if step >= average_from:
                averaged += 1
                frame = out.detach()
                average = frame.clone() if average is None else average.add_(frame - average, alpha=1 / averaged)
        elif smoothing:
            average = smoothed(average, out.detach())
        if recorder.due(step):
            recorder.record(step, average if average is not None else out)
            if raw_recorder is not None:
                raw_recorder.record(step, out)
        if len(pending) == 100:
            fetch_losses()
        if bar is not None:
            bar.update(1)
            if step % 20 == 0 or step == steps - 1:
                fetch_losses()
                postfix = dict(loss=f"{losses[-1]:.2e}")
                if recorder.psnr:
                    postfix["psnr"] = f"{recorder.psnr[-1]:.2f}"
                bar.set_postfix(postfix)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            fetch_losses()
            save_checkpoint(step + 1)
    if bar is not None:
        bar.close()
    fetch_losses()
    if checkpoint is not None:
        save_checkpoint(steps)  # before the closing record, which a resumed run makes in its loop
    with torch.no_grad():
        last = model(z_run) if average is None or smoothing else None
        if smoothing:
            average = smoothed(average, last)
        out = last if average is None else average
    if clean is not None and (not recorder.steps or recorder.steps[-1] != steps):
        recorder.record(steps, out)
        if raw_recorder is not None:
            raw_recorder.record(steps, last)
    raw = dict(raw_psnr=raw_recorder.psnr, raw_ssim=raw_recorder.ssim) if raw_recorder is not None else {}
    return TrainResult(image=out.detach().cpu().contiguous(), losses=losses, model=model, steps=recorder.steps,
                       psnr=recorder.psnr, ssim=recorder.ssim, seconds=time.perf_counter() - started,
                       step_seconds=step_seconds, **raw)


def train_dense(model: nn.Module, z, y, steps: int = 4000, clean=None, *, lr: float = 0.01, degradation=None,
                record_every: int = 100, progress: bool | None = None, checkpoint=None, checkpoint_every: int = 500,
                resume: bool = False, clean_box=None, smoothing: float = 0.0, noise_level: float = 0.0,
                cuda_graph: bool = False) -> TrainResult:
    """Dense DIP: every weight of (a copy of) `model` is trained.

    Arguments shared by the training functions: `model` a generator (oes_fast.models; not
    modified, a copy is trained); `z` its fixed input, a float tensor (1, C_in, H, W)
    (oes_fast.models.dip_input); `y` the degraded image, float (1, C, H, W) with values in
    [0, 1] (for a degradation other than denoising, what `degradation.degrade` returned);
    `clean` (optional) the clean image, float (1, C, H, W) in [0, 1], against which PSNR/SSIM
    are recorded every `record_every` steps and at the end (with `clean_box` = (top, left, bottom,
    right), against that region of the output, e.g. a padded image's original); `steps` >= 0; `lr` > 0 (Adam);
    `degradation` an oes_fast.tasks degradation (None: plain mean squared error against `y`);
    `progress` True/False/None (None: when stderr is a terminal); `checkpoint` a file path
    written every `checkpoint_every` steps, from which `resume=True` continues to the same
    result as an uninterrupted run; `smoothing` = beta in [0, 1): 0 returns the last output, beta > 0
    the exponential moving average of the outputs (s_t = beta s_{t-1} + (1 - beta) out_t), on which
    PSNR/SSIM are then recorded (and on the output itself as `raw_psnr`/`raw_ssim`); `noise_level` =
    sigma in [0, 1], the standard deviation of the noise in `y` (e.g. `metrics.noise_sigma(y)`): with
    sigma > 0 the fit minimizes max(loss - sigma^2, 0), so it stops where its residual reaches the
    noise's variance instead of fitting the noise (0: the loss itself, as oes-spec.md); `cuda_graph`
    (CUDA only): after 3 eager steps, every step replays one captured CUDA graph (oes_fast.graphs.GraphedStep,
    Adam kept capturable): the same training without a launch per kernel from Python. Measured in
    bench/gpu_check.py's `graphed_train_step` on an H200 at 512x512: 8.0 ms a step for the masked
    dense network and 5.3 ms for the compacted generator (engine="sparse"), against 11.3 and 17.5
    ms eager; this loop's own graph mode is not yet run on a GPU. All tensors on one device;
    NaN/Inf refused. Returns a TrainResult (image on the CPU, shaped like the model's output).
    """
    model = copy.deepcopy(model)
    return _fit(model, z, y, steps, kind="dense", clean=clean, lr=lr, degradation=degradation,
                record_every=record_every, progress=progress, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every, resume=resume, clean_box=clean_box, smoothing=smoothing,
                noise_level=noise_level, cuda_graph=cuda_graph)


def train_sparse(model: nn.Module, mask: Mask, z, y, steps: int = 4000, clean=None, *, lr: float = 0.01,
                 degradation=None, record_every: int = 100, progress: bool | None = None, checkpoint=None,
                 checkpoint_every: int = 500, resume: bool = False, allow_disconnected: bool = False,
                 engine: str = "auto", clean_box=None, smoothing: float = 0.0, noise_level: float = 0.0,
                 cuda_graph: bool = False) -> TrainResult:
    """Sparse-DIP: start from the model's own initial weights W0, set w = W0 * mask and train
    with the pruned weights kept exactly zero. Refuses a mask that disconnects the network
    unless `allow_disconnected`.

    engine="dense" trains the masked dense network (gradients masked; Adam then never moves a
    pruned weight); engine="sparse" trains `oes_fast.sparse.SparseGenerator` (compacted
    channels, sparse convolution kernels forward and backward, weight gradients only at kept
    positions); "auto" takes the sparse engine on a CPU when the mask keeps at most
    `oes_fast.sparse.CROSSOVER_DENSITY`, where the benchmarks measured it faster. With the
    sparse engine `result.model` is the SparseGenerator (`.dense_state_dict()` exports it); on a
    GPU it runs every compacted conv dense (oes_fast.sparse.default_crossover), the faster step
    there as a CUDA graph (`cuda_graph=True`).

    `mask`: an oes_fast.masks.Mask that fits `model` (MaskMismatchError otherwise); the other
    arguments as in `train_dense`."""
    from .masks import health

    if engine not in ("auto", "sparse", "dense"):
        raise ValueError(f"engine must be 'auto', 'sparse' or 'dense', got {engine!r}")
    mask.check_fits(model)
    report = health(mask, model)
    if not report.ok and not allow_disconnected:
        raise ValueError(f"the mask disconnects the network: {report.message}; pass allow_disconnected=True to train anyway")
    model = mask.apply_(copy.deepcopy(model))
    keep = mask.tensors
    engine = choose_engine(engine, mask, model, z.device.type, healthy=report.ok)
    if engine == "sparse":
        from .sparse import SparseGenerator

        # the compacted generator holds only kept weights: nothing pruned can move
        model, keep = SparseGenerator.from_masked(model, mask), None
    return _fit(model, z, y, steps, kind="sparse", clean=clean, lr=lr, degradation=degradation,
                record_every=record_every, progress=progress, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every, resume=resume, keep=keep, clean_box=clean_box, smoothing=smoothing,
                noise_level=noise_level, cuda_graph=cuda_graph,
                extra_settings=dict(mask=fingerprint(mask.to_flat().to(torch.float32)), engine=engine))


def train_sgld(model: nn.Module, z, y, steps: int = 4000, clean=None, *, lr: float = 0.01, average_from: int | None = None,
               noise_std: float | None = None, seed: int = 0, degradation=None, record_every: int = 100,
               progress: bool | None = None, checkpoint=None, checkpoint_every: int = 500,
               resume: bool = False) -> TrainResult:
    """SGLD-DIP (oes-spec.md section 6): dense DIP with Gaussian noise added to every weight
    after each Adam update; the result is the average of the outputs from step `average_from`
    (default: half of `steps`) on.

    `noise_std`: the noise's standard deviation, by default sqrt(2 * lr) (variance 2 * lr, as
    the spec states it). With Adam at lr 0.01 that is 0.14 per step, larger than most weights
    of the network: the fit never starts (measured: docs/quality.md, "Comparison of methods"). Public SGLD-DIP code adds
    noise of standard deviation 2 * lr (0.02), to the conv weights only; pass noise_std=2 * lr
    for that scale (here on every parameter). `average_from` in [0, steps]; `seed` (int >= 0)
    seeds the noise; the other arguments as in `train_dense`."""
    std = (2 * lr) ** 0.5 if noise_std is None else float(noise_std)
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise_std must be finite and non-negative, got {noise_std}")
    average_from = steps // 2 if average_from is None else int(average_from)
    model = copy.deepcopy(model)
    return _fit(model, z, y, steps, kind="sgld", clean=clean, lr=lr, degradation=degradation,
                record_every=record_every, progress=progress, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every, resume=resume, sgld_seed=seed, sgld_std=std,
                average_from=average_from, extra_settings=dict(seed=seed, average_from=average_from, noise_std=std))


def choose_engine(engine: str, mask: Mask, model: nn.Module, device: str = "cpu", healthy: bool = True) -> str:
    """The training engine "auto" resolves to (see train_sparse): the sparse one on a CPU for a
    network SparseGenerator takes, at a density where its kernels were measured faster, and
    for a mask that leaves the network connected (a cut network compacts to constants). On a
    GPU, the masked dense model: on an H200 its step (cuDNN TF32) took 11.8 ms at 512x512
    against 15.9-17.7 for the compacted generator with dense convs and 34.0 with the sparse
    kernels; at 2048x2048 the compacted generator was faster (66.3 against 83.9 ms)."""
    if engine != "auto":
        return engine
    from .connectivity import supports
    from .sparse import CROSSOVER_DENSITY

    sparse_pays = device == "cpu" and supports(model) and mask.density <= CROSSOVER_DENSITY
    return "sparse" if sparse_pays and healthy else "dense"
