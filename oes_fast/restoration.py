"""Restore the image a user has: the observation in, the restored image out, at its full size.

    restored, report = oes_fast.restore("noisy.png")                                # denoise
    restored, report = oes_fast.restore("scan.png", task="inpaint", holes="holes.png")  # nonzero = missing
    restored, report = oes_fast.restore(small_array, task="superres", factor=4)     # 4x larger out

The image given is the observation: no noise is added, nothing is downsampled first. A side that
is not a multiple of the network's 64, or below its 256, is reflect-padded for the network and
the result cropped back, so the output has exactly the input's size (times `factor` for
super-resolution), channels, dtype and range. Before the first step the run's time and peak
memory are estimated from steps timed and memory traced on this machine (`estimate_cost`); a run
that would not fit in memory is refused (`NotEnoughMemory`) before anything large is allocated.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from . import images, masks, memory, metrics, models, tasks
from .masks import Mask

__all__ = ["restore", "prepare", "estimate_cost", "checked_estimate", "Problem", "CostEstimate", "RestoreReport", "NotEnoughMemory",
           "TASKS", "DEFAULT_STEPS", "DEFAULT_SMOOTHING", "DEFAULT_NOISE_LEVEL"]

TASKS = ("denoise", "inpaint", "superres")
DEFAULT_STEPS = 2000  # the command's quick budget (oes_fast.cli.common.PRESETS)
# the result is the exponential moving average of the outputs with this decay (train.py); chosen on
# pepper and the astronaut at 512x512, where it holds the peak better than the last output
# (docs/quality.md, "Output smoothing")
DEFAULT_SMOOTHING = 0.99
# "auto": denoising fits down to the noise level estimated from the image (metrics.noise_sigma) and
# no further; chosen on pepper and the astronaut at 256x256, where the plain fit fell 2 dB from its
# peak on pepper (docs/quality.md, "Fitting down to the noise level")
DEFAULT_NOISE_LEVEL = "auto"
# fraction of the machine's available memory a run may plan to use: the rest is the allocator's
# rounding, buffers inside kernels and whatever else the machine runs meanwhile
MEMORY_SHARE = 0.9
TIMED_STEPS = 8  # estimate_cost times a run of this many steps at the run's size


class NotEnoughMemory(ValueError):
    """The estimated peak memory of a run exceeds what this machine has available."""


# ------------------------------------------------------------------------------------ inputs
@dataclass
class Observation:
    """An image as the user gave it, decoded: what to restore and how to give it back."""

    pixels: torch.Tensor  # (1, C, H, W) float32 in [0, 1], C = 1 (gray) or 3 (RGB)
    alpha: np.ndarray | None  # (H, W) float64 in [0, 1], or None
    kind: str  # "file", "array" or "tensor": what restore() returns (a file gives an array)
    dtype: str  # numpy dtype of the returned array ("uint8", "uint16", "float32", ...), or torch dtype
    layout: str  # "HW", "HWC" (arrays, files), "CHW", "NCHW" (tensors), "HW" for 2-D tensors
    bit_depth: int  # 8 or 16: of the file, or of an integer array; 16 for float input (no rounding loss)
    source: str  # the path, or "array"/"tensor"
    device: str = "cpu"  # of an input tensor

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[2]), int(self.pixels.shape[3])

    def describe(self) -> dict:
        c = self.pixels.shape[1] + (self.alpha is not None)
        return dict(source=self.source, kind=self.kind, dtype=self.dtype, size=list(self.size), channels=c,
                    alpha=self.alpha is not None, bit_depth=self.bit_depth)


def _array_to_unit(array: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """An image array as float64 in [0, 1] and its bit depth: uint8 / 255, uint16 / 65535, floats
    as they are (they must lie in [0, 1])."""
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0, 8
    if array.dtype == np.uint16:
        return array.astype(np.float64) / 65535.0, 16
    if array.dtype.kind == "f":
        a = array.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: contains {int((~np.isfinite(a)).sum())} NaN or Inf values")
        if a.size and (a.min() < 0.0 or a.max() > 1.0):
            raise ValueError(f"{name}: float values must lie in [0, 1], got range [{a.min():.6g}, {a.max():.6g}]")
        return a, 16
    raise ValueError(f"{name}: dtype {array.dtype} is not an image type (uint8, uint16 or float in [0, 1])")


def read_observation(image, name: str = "image") -> Observation:
    """Decode `image`: a file path, a numpy array (H, W) or (H, W, C) with C in 1-4 (2 and 4 carry
    alpha last), or a tensor (H, W), (C, H, W) or (1, C, H, W)."""
    if isinstance(image, (str, os.PathLike)):
        pixels, alpha, depth = images.read_image(image)
        array = pixels if pixels.ndim == 3 else pixels[:, :, None]
        dtype = "uint8" if depth == 8 else "uint16"
        layout = "HWC" if pixels.ndim == 3 or alpha is not None else "HW"
        obs = Observation(images.array_to_tensor(array), alpha, "file", dtype, layout, depth, os.fspath(image))
        _check_not_empty(obs, name)
        return obs
    if torch.is_tensor(image):
        t = image.detach()
        layouts = {2: "HW", 3: "CHW", 4: "NCHW"}
        if t.dim() not in layouts or (t.dim() == 4 and t.shape[0] != 1):
            raise ValueError(f"{name}: a tensor image must be (H, W), (C, H, W) or (1, C, H, W), got {tuple(t.shape)}")
        layout = layouts[t.dim()]
        hwc = t.reshape(1, *t.shape[-2:]) if t.dim() == 2 else t.reshape(t.shape[-3:])
        array = hwc.permute(1, 2, 0).to("cpu").numpy()
        if t.dtype == torch.bfloat16:
            raise ValueError(f"{name}: bfloat16 images are not supported; pass float32")
        obs = _from_hwc(array, name, "tensor", str(t.dtype).removeprefix("torch."), layout)
        obs.device = str(t.device)
        return obs
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"{name}: an array image must be (H, W) or (H, W, C), got shape {image.shape}")
        array = image if image.ndim == 3 else image[:, :, None]
        return _from_hwc(array, name, "array", str(image.dtype), "HWC" if image.ndim == 3 else "HW")
    raise TypeError(f"{name}: expected a file path, a numpy array or a torch tensor, got {type(image).__name__}")


def _from_hwc(array: np.ndarray, name: str, kind: str, dtype: str, layout: str) -> Observation:
    if array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{name}: expected 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA) channels, "
                         f"got {array.shape[2]}")
    unit, depth = _array_to_unit(array, name)
    alpha = None
    if unit.shape[2] in (2, 4):
        unit, alpha = unit[:, :, :-1], unit[:, :, -1]
    obs = Observation(images.array_to_tensor(unit), alpha, kind, dtype, layout, depth, kind)
    _check_not_empty(obs, name)
    return obs


def _check_not_empty(obs: Observation, name: str) -> None:
    if min(obs.size) < 1:
        raise ValueError(f"{name}: empty image, size {obs.size[0]}x{obs.size[1]}")


def read_holes(holes, size: tuple[int, int]) -> np.ndarray:
    """A holes mask as a bool (H, W) array, True = missing: any nonzero value (in any color channel)
    of a file, array or tensor marks its pixel missing. Its size must be `size`."""
    if isinstance(holes, (str, os.PathLike)):
        pixels, _, _ = images.read_image(holes)
        name = f"holes mask {os.fspath(holes)!r}"
    else:
        pixels = holes.detach().cpu().numpy() if torch.is_tensor(holes) else np.asarray(holes)
        name = "holes mask"
        if pixels.ndim == 3 and torch.is_tensor(holes):
            pixels = pixels.transpose(1, 2, 0)  # (C, H, W) tensor
    if pixels.ndim == 3:
        pixels = np.abs(pixels).max(axis=2)
    if pixels.ndim != 2:
        raise ValueError(f"{name}: expected (H, W) or (H, W, C), got shape {pixels.shape}")
    if tuple(pixels.shape) != tuple(size):
        raise ValueError(f"{name} is {pixels.shape[0]}x{pixels.shape[1]} but the image is {size[0]}x{size[1]}")
    return pixels != 0


def _to_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(1, 3, H, W) network output as `channels` channels: gray is the mean of the three."""
    return t.mean(dim=1, keepdim=True) if channels == 1 else t


def _give_back(out: torch.Tensor, obs: Observation, alpha: np.ndarray | None):
    """The restored (1, C, H, W) image in the kind, dtype, layout and range the input came in."""
    hwc = out[0].permute(1, 2, 0).to(torch.float64).clamp(0, 1).numpy()
    if alpha is not None:
        hwc = np.concatenate([hwc, alpha[:, :, None]], axis=2)
    if obs.layout == "HW":
        hwc = hwc[:, :, 0]
    if obs.dtype in ("uint8", "uint16"):
        top = 255.0 if obs.dtype == "uint8" else 65535.0
        array = np.round(hwc * top).astype(obs.dtype)
    else:
        array = hwc.astype(np.dtype(obs.dtype))
    if obs.kind != "tensor":
        return array
    t = torch.from_numpy(np.ascontiguousarray(array))
    if obs.layout in ("CHW", "NCHW"):
        t = t.permute(2, 0, 1).contiguous()
        t = t[None] if obs.layout == "NCHW" else t
    return t.to(obs.device)


def _alpha_out(obs: Observation, task: str, filled_from_alpha: bool, factor: int) -> np.ndarray | None:
    """The output's alpha: none without one in; opaque where inpainting filled the transparent
    pixels; as given for denoising; resized with Lanczos (Pillow) for super-resolution."""
    if obs.alpha is None:
        return None
    if filled_from_alpha:
        return np.ones_like(obs.alpha)
    if task != "superres":
        return obs.alpha
    from PIL import Image

    h, w = obs.alpha.shape
    im = Image.fromarray(obs.alpha.astype(np.float32)).resize((w * factor, h * factor),
                                                                         Image.Resampling.LANCZOS)
    return np.clip(np.asarray(im, dtype=np.float64), 0.0, 1.0)


# ----------------------------------------------------------------------------------- problem
@dataclass
class Problem:
    """What the network fits: the observation padded to a size the network takes, its operator,
    and where the result lies in the network's output."""

    observation: Observation
    task: str
    y: torch.Tensor  # (1, 3, h, w) the padded observation (superres: the low-resolution one)
    degradation: tasks.Degradation  # A and the loss, at the network's size
    network_size: tuple[int, int]  # the network's output (H, W)
    box: tuple[int, int, int, int]  # (top, left, bottom, right) of the result in the network's output
    fit: dict  # images.fit_to_network's info, on the observation
    factor: int = 1
    filled_from_alpha: bool = False
    missing_fraction: float | None = None

    @property
    def output_size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]

    def crop(self, out: torch.Tensor) -> torch.Tensor:
        top, left, bottom, right = self.box
        return out[:, :, top:bottom, left:right]


def prepare(image, task: str = "denoise", *, holes=None, factor: int = 4, kernel: str = "lanczos",
            fit: str = "pad", network: torch.nn.Module | None = None) -> Problem:
    """Decode `image` and set up what the network fits (see `restore` for the arguments).

    Raises ValueError (naming the problem) for an unknown task, `holes` with a task other than
    inpaint, a holes mask of another size or that marks every pixel (or none) missing, an image
    with alpha but no transparent pixel given to inpaint without holes, or a factor the network
    cannot take.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if fit not in ("pad", "crop"):
        raise ValueError(f"fit must be 'pad' or 'crop', got {fit!r}")
    if holes is not None and task != "inpaint":
        raise ValueError(f"holes are for inpaint only, not for {task}")
    network = network if network is not None else models.skip_oes()
    multiple, min_side = 2**network.levels, network.min_side
    obs = read_observation(image)
    h, w = obs.size
    factor = int(factor) if task == "superres" else 1
    if task == "superres" and (factor < 2 or multiple % factor):
        raise ValueError(f"superres factor must divide {multiple} (2, 4, 8, ...), got {factor}")
    y = obs.pixels.expand(1, 3, h, w) if obs.pixels.shape[1] == 1 else obs.pixels
    known = None
    filled_from_alpha = False
    if task == "inpaint":
        if holes is not None:
            missing = read_holes(holes, (h, w))
            what = "the holes mask"
        elif obs.alpha is not None:
            missing, what, filled_from_alpha = obs.alpha == 0, "the alpha channel", True
            if not missing.any():
                raise ValueError("inpaint: the image has an alpha channel but no transparent pixel; "
                                 "give the missing pixels with --holes FILE (holes=)")
        else:
            raise ValueError("inpaint needs the missing pixels: --holes FILE (holes=), nonzero = missing, "
                             "or an alpha channel with the missing pixels transparent")
        if missing.all():
            raise ValueError(f"inpaint: {what} marks every pixel missing; nothing is left to restore from")
        if not missing.any():
            raise ValueError(f"inpaint: {what} marks no pixel missing")
        known = torch.from_numpy(~missing).to(torch.float32)[None, None]
    # superres: the network's output is `factor` times the observation; pad the observation so
    # that output is a multiple of `multiple` and at least `min_side`
    y_fit, info = images.fit_to_network(y.contiguous(), multiple // factor, -(-min_side // factor), mode=fit)
    top, left, bottom, right = info["box"] if fit == "pad" else (0, 0, *info["size"])
    if fit == "crop":  # the observation itself is cut: its crop is what gets restored
        ct, cl, cb, cr = info["box"]
        obs.pixels = obs.pixels[:, :, ct:cb, cl:cr].contiguous()
        obs.alpha = None if obs.alpha is None else obs.alpha[ct:cb, cl:cr]
        known = None if known is None else known[:, :, ct:cb, cl:cr]
    if task == "denoise":
        degradation = tasks.Denoise(sigma=0.0)
    elif task == "inpaint":
        pt, pb, pl, pr = info["pad"]
        padded = images.reflect_pad(known, pt, pb, pl, pr)
        degradation = tasks.Inpaint(pixel_mask=padded)
    else:
        degradation = tasks.SuperRes(factor=factor, kernel=kernel)
    net_h, net_w = (s * factor for s in y_fit.shape[2:])
    box = (top * factor, left * factor, bottom * factor, right * factor)
    return Problem(obs, task, y_fit.contiguous(), degradation, (net_h, net_w), box, info, factor, filled_from_alpha,
                   None if known is None else float(1 - known.mean()))


# ---------------------------------------------------------------------------------- the cost
@dataclass
class CostEstimate:
    """A run's time and peak memory, predicted from steps timed and memory traced on this machine."""

    train_steps: int
    search_steps: int
    seconds_per_step: float  # one training step at the run's size
    search_seconds_per_step: float  # one search step (0 without a search)
    setup_seconds: float  # building and compacting the network, once per phase
    seconds: float  # the whole run, predicted
    peak_bytes: int  # tensors alive at once during a step, predicted at the run's size
    resident_bytes: int  # what the process held before the run
    available_bytes: int | None  # what the machine had left (None: unknown)
    bytes_per_pixel: float  # slope of the traced peaks over the network's pixels
    network_size: tuple[int, int]
    timed: bool = True  # False when refused before timing

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes <= MEMORY_SHARE * self.available_bytes

    def message(self) -> str:
        h, w = self.network_size
        parts = []
        if self.timed:
            if self.search_steps:
                parts.append(f"{self.search_steps:,} search steps x {self.search_seconds_per_step:.3f} s")
            parts.append(f"{self.train_steps:,} steps x {self.seconds_per_step:.3f} s")
            when = f"about {_duration(self.seconds)} ({' + '.join(parts)}, timed here at {h}x{w})"
        else:
            when = "not timed"
        avail = "" if self.available_bytes is None else f" of {self.available_bytes / 1e9:.1f} GB available"
        return f"estimate: {when}; peak memory about {(self.resident_bytes + self.peak_bytes) / 1e9:.2f} GB{avail}"

    def to_dict(self) -> dict:
        return asdict(self) | dict(message=self.message())


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _traced_peak(fn) -> int:
    with memory.LiveBytes() as tracker:
        fn()
    return tracker.peak


# (phase, method, engine, low_memory, density, mask bits) -> (intercept, bytes per pixel): a
# process that restores several images traces each kind of run once
_PEAK_LINES: dict[tuple, tuple[float, float]] = {}


def estimate_cost(problem: Problem, mask: Mask | None, *, train_steps: int, search_steps: int = 0,
                  density: float = 0.05, engine: str = "auto", low_memory: bool = False,
                  method: str = "sparse", time_steps: bool = True) -> CostEstimate:
    """Predict the run's peak memory and time on this machine.

    Memory: two short runs of each phase (search when `search_steps`, training) at the network's
    smallest sizes, with every tensor's bytes traced (`memory.LiveBytes`); peak bytes grow
    linearly in the pixels, so their slope and intercept give the peak at the run's size.
    Time (only when the memory fits and `time_steps`): each phase once to warm up, then for
    TIMED_STEPS steps at the run's size: the median of its steps after the first is the time per
    step, the rest of its wall time the setup. A mask search
    probes with a fresh search mask; training with `mask` (default: the bundled mask).
    """
    from .mask_search import search
    from .train import train_dense, train_sparse

    net = models.skip_oes()
    side = net.min_side
    mask = mask if mask is not None else masks.bundled()

    def run_phase(size, steps, phase):
        h, w = size
        z = models.dip_input(32, h, w, seed=0)
        y = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
        if phase == "search":
            return search(net, z, y, density=density, steps=steps, progress=False,
                          engine="fused" if low_memory else "unfused", recompute=low_memory)
        if method == "dense":
            return train_dense(net, z, y, steps=steps, progress=False)
        return train_sparse(net, mask, z, y, steps=steps, progress=False, engine=engine,
                            allow_disconnected=True)

    phases = (["search"] if search_steps else []) + (["train"] if train_steps else [])
    small, large = (side, side), (side, side + 2 * 2**net.levels)
    peak, slope = 0, 0.0
    mask_key = hashlib.sha1(mask.to_flat().numpy().tobytes()).hexdigest()
    for phase in phases:
        key = (phase, method, engine, low_memory, density, mask_key if phase == "train" else None)
        if key not in _PEAK_LINES:
            p_small = _traced_peak(lambda: run_phase(small, 2, phase))
            p_large = _traced_peak(lambda: run_phase(large, 2, phase))
            b = max(0.0, (p_large - p_small) / (large[0] * large[1] - small[0] * small[1]))
            _PEAK_LINES[key] = (p_small - b * small[0] * small[1], b)
        a, b = _PEAK_LINES[key]
        h, w = problem.network_size
        predicted = int(a + b * h * w)
        if predicted > peak:
            peak, slope = predicted, b
    est = CostEstimate(train_steps, search_steps, 0.0, 0.0, 0.0, 0.0, peak, memory.resident_bytes() or 0,
                       memory.available_bytes(), slope, problem.network_size, timed=False)
    if not est.fits or not time_steps:
        return est
    seconds = {}
    for phase in phases:
        run_phase(problem.network_size, 1, phase)  # warm-up: first-touch memory, one-time initializations
        t0 = time.perf_counter()
        timed = run_phase(problem.network_size, TIMED_STEPS, phase)
        wall = time.perf_counter() - t0
        # the median step: a step slowed by another program on the machine does not set the forecast
        per_step = float(np.median(timed.step_seconds[1:]))
        seconds[phase] = (per_step, max(wall - sum(timed.step_seconds), 0.0))
    est.seconds_per_step, setup_train = seconds.get("train", (0.0, 0.0))
    est.search_seconds_per_step, setup_search = seconds.get("search", (0.0, 0.0))
    est.setup_seconds = setup_train + setup_search
    est.seconds = est.setup_seconds + train_steps * est.seconds_per_step + search_steps * est.search_seconds_per_step
    est.timed = True
    return est


def checked_estimate(problem: Problem, mask: Mask | None, **cost) -> CostEstimate:
    """estimate_cost, refusing first (NotEnoughMemory) when the traced memory does not fit, so no
    step is timed at a size this machine cannot hold."""
    est = estimate_cost(problem, mask, **cost, time_steps=False)
    if not est.fits:
        raise NotEnoughMemory(_refusal(est, problem, searching=cost.get("search_steps", 0) > 0))
    return estimate_cost(problem, mask, **cost)


def _refusal(est: CostEstimate, problem: Problem, searching: bool) -> str:
    h, w = problem.network_size
    need = (est.resident_bytes + est.peak_bytes) / 1e9
    advice = ("search with less memory (--low-memory, search(engine='fused', recompute=True)) or restore a "
              "smaller image (or a crop of it)" if searching else "restore a smaller image (or a crop of it)")
    if problem.task == "superres":
        advice = f"a smaller factor, or {advice}"
    return (f"not enough memory: restoring at {h}x{w} network pixels needs about {need:.1f} GB "
            f"({est.bytes_per_pixel:.0f} bytes per pixel, traced on this machine), more than "
            f"{MEMORY_SHARE:.0%} of the {est.available_bytes / 1e9:.1f} GB available; {advice}")


# ------------------------------------------------------------------------------------ report
@dataclass
class RestoreReport:
    """What a restore() run did: settings, sizes, the estimate, the loss history, timings, and
    PSNR/SSIM against a reference when one was given."""

    task: dict
    input: dict
    output_size: tuple[int, int]
    network_size: tuple[int, int]
    fit: dict
    mask: dict
    settings: dict
    noise: dict  # sigma: the noise level the fit stopped at (0: off), source: where it came from
    estimate: dict
    losses: list[float] = field(default_factory=list)  # the training loss at every step
    reference: bool = False  # a reference (clean) image was given
    psnr_steps: list[int] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)  # against the reference, on the output's region
    ssim: list[float] = field(default_factory=list)
    raw_psnr: list[float] = field(default_factory=list)  # with smoothing: psnr of the last output itself
    final_psnr: float | None = None  # against the reference, on the output exactly (cropped)
    final_ssim: float | None = None
    timings: dict = field(default_factory=dict)
    search: dict | None = None
    used_mask: Mask | None = field(default=None, repr=False)  # the mask trained with (not in to_dict)

    @property
    def peak_psnr(self) -> float | None:
        return max(self.psnr) if self.psnr else None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "used_mask"}
        d["peak_psnr"] = self.peak_psnr
        if not self.reference:
            d["note"] = "no reference image was given: the loss curve is recorded instead of PSNR"
        return d


def _resolve_mask(mask) -> tuple[Mask | None, str]:
    if isinstance(mask, Mask):
        return mask, "given"
    if isinstance(mask, str) and mask == "search":
        return None, "search"
    if isinstance(mask, (str, os.PathLike)):
        return masks.load(mask), os.path.abspath(os.fspath(mask))
    raise TypeError(f"mask must be None (the bundled mask), 'search', a Mask or a mask file path, "
                    f"got {type(mask).__name__}")


def restore(image, task: str = "denoise", *, holes=None, factor: int = 4, mask=None, steps: int = DEFAULT_STEPS,
            progress: bool | None = True, clean=None, kernel: str = "lanczos", fit: str = "pad",
            density: float | str = "auto", search_steps: int = 20000, seed: int = 0, engine: str = "auto",
            low_memory: bool = False, record_every: int = 50, checkpoint_dir=None,
            allow_disconnected: bool = False, method: str = "sparse", smoothing: float = DEFAULT_SMOOTHING,
            noise_level: float | str = DEFAULT_NOISE_LEVEL, log=None):
    """Restore `image` with a Sparse-DIP and return `(restored, report)`.

    image: a file path (PNG, JPEG, ...: gray, RGB, RGBA, 8 or 16 bits), a numpy array (H, W) or
        (H, W, C), C in 1-4 (alpha last), uint8 / uint16 / float in [0, 1], or a tensor (H, W),
        (C, H, W) or (1, C, H, W). It is the observation: restored as it is.
    task: "denoise"; "inpaint" (fills `holes`: a path, array or tensor (H, W), nonzero = missing;
        without holes, the pixels the alpha channel marks fully transparent); "superres" (an
        output `factor` (4, 8) times larger on each side, whose downsampling fits the image).
    mask: None (a bundled mask), a `Mask`, a mask file, or "search" (an OES search of
        `search_steps` steps at `density` on this image first). Weights and z come from the mask's
        seeds (else `seed`).
    density: "auto" or a number in (0, 1]. With the bundled mask, "auto" takes the density that
        `masks.auto_density` picks for the network's input size (0.05 at every size measured) and
        a number that density (0.05, 0.025 or 0.1); of the bundled masks at it, the one searched
        nearest the input's pixel count (0.05: 256x256 or 512x512; 0.025: 256x256; 0.1: 512x512);
        the report names the file.
        With mask="search", "auto" is 0.05 (the paper's).
    steps: Sparse-DIP training steps. clean: an optional reference of the output's size, for
        PSNR/SSIM. fit: "pad" (reflect-pad to the network and crop back: the output has the
        input's size) or "crop" (center-crop to the network's multiples: the output is the crop).
    checkpoint_dir: a folder for checkpoints; the same call resumes an interrupted run.
    method: "sparse" (Sparse-DIP, the default) or "dense" (dense DIP on the same problem, a baseline;
        the mask is then not used).
    smoothing: in [0, 1): the restored image is the exponential moving average of the network's
        outputs with this decay (default 0.99), PSNR/SSIM are measured on it and, in
        `report.raw_psnr`, on the last output itself; 0 returns the last output (the OES paper's).
    noise_level: "auto" (default), "off", or the standard deviation of the image's noise in [0, 1]
        (its range: 0.1 is about 25 of 255). With a level sigma > 0 the network fits the image only
        until the loss reaches sigma^2 (max(loss - sigma^2, 0) is minimized): it stops fitting the
        noise. "auto": for denoise, the level estimated from the image (`metrics.noise_sigma`); for
        inpaint and superres, off. "off" or 0: the plain loss, as the OES paper trains. The level
        used and where it came from are in `report.noise`.
    log: where the estimate line goes (a callable; default: stderr when `progress`).

    Returns the restored image in the input's kind (a file or array gives a numpy array, a tensor
    a tensor), dtype, range and layout, with the input's channels (gray stays gray; alpha is kept,
    opaque where inpainting filled it); and a `RestoreReport`. Raises ValueError for bad input
    and `NotEnoughMemory` (a ValueError) when the run would not fit in this machine's memory,
    before anything large is allocated.
    """
    from .mask_search import search
    from .train import train_dense, train_sparse

    started = time.perf_counter()
    steps, search_steps = int(steps), int(search_steps)
    if steps < 0 or search_steps < 0:
        raise ValueError(f"step counts must be non-negative, got steps={steps}, search_steps={search_steps}")
    if density != "auto" and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density must be 'auto' or in (0, 1], got {density!r}")
    say = log if log is not None else ((lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None))
    if method not in ("sparse", "dense"):
        raise ValueError(f"method must be 'sparse' or 'dense', got {method!r}")
    if not (isinstance(smoothing, (int, float)) and 0 <= smoothing < 1):
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    if noise_level not in ("auto", "off") and not (isinstance(noise_level, (int, float)) and 0 <= noise_level <= 1):
        raise ValueError(f"noise_level must be 'auto', 'off' or a standard deviation in [0, 1], got {noise_level!r}")
    problem = prepare(image, task, holes=holes, factor=factor, kernel=kernel, fit=fit)
    noise = resolve_noise_level(noise_level, problem)
    if mask is None:
        # the bundled mask (of the density asked for, or auto's) searched nearest the network's input size
        sized = problem.network_size
        the_mask = masks.bundled(pixels=sized[0] * sized[1], density=None if density == "auto" else density)
        mask_source = f"bundled: {the_mask.meta['bundled_file']}"
    else:
        the_mask, mask_source = _resolve_mask(mask)
    searching = the_mask is None
    search_density = 0.05 if density == "auto" else float(density)
    network = models.skip_oes(seed=seed if searching or the_mask.seed is None else the_mask.seed)
    if the_mask is not None:
        the_mask.check_fits(network)
        verdict = masks.health(the_mask, network)
        if method == "sparse" and not verdict.ok and not allow_disconnected:
            raise ValueError(f"the mask disconnects the network ({verdict.message}); a longer search usually fixes "
                             "this, or train anyway (--allow-disconnected, allow_disconnected=True)")
    out_h, out_w = problem.output_size
    reference = None
    if clean is not None:
        ref = read_observation(clean, "reference (clean) image")
        if ref.size != (out_h, out_w):
            raise ValueError(f"the reference (clean) image is {ref.size[0]}x{ref.size[1]} but the restored image "
                             f"will be {out_h}x{out_w}")
        reference = ref.pixels.expand(1, 3, out_h, out_w) if ref.pixels.shape[1] == 1 else ref.pixels

    searching = searching and method == "sparse"
    cost = dict(train_steps=steps, search_steps=search_steps if searching else 0, density=search_density, engine=engine,
                low_memory=low_memory, method=method)
    est = checked_estimate(problem, the_mask, **cost)
    say(est.message())
    if noise["sigma"] > 0:
        say(f"noise level {noise['sigma']:.4f}, {noise['source']}: the network fits the image down to it and no "
            "further (--noise-level off, noise_level='off': the plain loss)")

    h, w = problem.network_size
    z_seed = seed if searching or the_mask.z_seed is None else the_mask.z_seed
    z = models.dip_input(32, h, w, seed=z_seed)
    ckpt = (lambda name: None) if checkpoint_dir is None else (lambda name: os.path.join(checkpoint_dir, name))
    timings = dict(estimate_seconds=time.perf_counter() - started)
    search_info = None
    if searching:
        found = search(network, z, problem.y, density=search_density, steps=search_steps, seed=seed,
                       degradation=problem.degradation, z_seed=z_seed, progress=progress,
                       checkpoint=ckpt("search.ckpt"), resume=checkpoint_dir is not None,
                       engine="fused" if low_memory else "unfused", recompute=low_memory)
        the_mask = found.mask
        the_mask.meta.update(task=problem.task, image_size=list(problem.network_size))
        timings["search_seconds"] = found.seconds
        search_info = dict(steps=search_steps, final_loss=found.losses[-1] if found.losses else None,
                           health=found.health.message)
    training = dict(steps=steps, clean=reference, clean_box=None if reference is None else problem.box,
                    degradation=problem.degradation, record_every=record_every, progress=progress,
                    resume=checkpoint_dir is not None, smoothing=smoothing, noise_level=noise["sigma"])
    if method == "dense":
        fitted = train_dense(network, z, problem.y, checkpoint=ckpt("dense.ckpt"), **training)
    else:
        fitted = train_sparse(network, the_mask, z, problem.y, checkpoint=ckpt("train.ckpt"),
                              allow_disconnected=allow_disconnected, engine=engine, **training)
    health = masks.health(the_mask, network) if the_mask is not None else None
    timings["train_seconds"] = fitted.seconds
    out = _to_channels(problem.crop(fitted.image), problem.observation.pixels.shape[1])
    final_psnr = final_ssim = None
    if reference is not None:
        ref_c = _to_channels(reference, out.shape[1]) if problem.observation.pixels.shape[1] == 1 else reference
        final_psnr = float(metrics.psnr(out.clamp(0, 1), ref_c))
        final_ssim = float(metrics.ssim(out.clamp(0, 1), ref_c))
    alpha = _alpha_out(problem.observation, problem.task, problem.filled_from_alpha, problem.factor)
    restored = _give_back(out, problem.observation, alpha)
    timings["total_seconds"] = time.perf_counter() - started
    report = RestoreReport(
        task=dict(name=problem.task, factor=problem.factor if problem.task == "superres" else None,
                  kernel=kernel if problem.task == "superres" else None, holes_from_alpha=problem.filled_from_alpha,
                  missing_fraction=problem.missing_fraction),
        input=problem.observation.describe(), output_size=(out_h, out_w), network_size=problem.network_size,
        fit=problem.fit | dict(applied_to="the observation"),
        mask=dict(source="none (dense DIP)") if method == "dense" else
        dict(source=mask_source, density=the_mask.density, kept=the_mask.kept, healthy=health.ok,
             health=health.message, seed=network_seed(the_mask, seed), z_seed=z_seed),
        settings=dict(method=method, steps=steps, search_steps=search_steps if searching else 0, density=density,
                      search_density=search_density if searching else None, seed=seed,
                      engine=engine, low_memory=low_memory, record_every=record_every, fit=fit,
                      smoothing=smoothing, noise_level=noise_level),
        noise=noise, estimate=est.to_dict(), losses=fitted.losses, reference=reference is not None,
        psnr_steps=fitted.steps, psnr=fitted.psnr, ssim=fitted.ssim, raw_psnr=fitted.raw_psnr,
        final_psnr=final_psnr, final_ssim=final_ssim,
        timings=timings, search=search_info, used_mask=None if method == "dense" else the_mask)
    return restored, report


def resolve_noise_level(noise_level: float | str, problem: Problem) -> dict:
    """The noise level a run fits down to: {"sigma": float, "source": str}. "auto" estimates it
    from the observation for denoising (the image as given, before padding) and is off for the
    other tasks, whose observations are usually clean."""
    if noise_level == "off" or noise_level == 0:
        return dict(sigma=0.0, source="off")
    if noise_level != "auto":
        return dict(sigma=float(noise_level), source="given")
    if problem.task != "denoise":
        return dict(sigma=0.0, source=f"off (auto: {problem.task} fits the plain loss)")
    return dict(sigma=metrics.noise_sigma(problem.observation.pixels),
                source="estimated from the image (metrics.noise_sigma)")


def network_seed(mask: Mask, seed: int) -> int:
    """The weight seed a run uses: the mask's own, else `seed`."""
    return seed if mask.seed is None else mask.seed
