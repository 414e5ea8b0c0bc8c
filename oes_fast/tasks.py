"""Degradations (spec section 5): denoising, inpainting, super-resolution.

Each degradation makes the synthetic measurement y from a clean image (`degrade`), applies
its operator A to the network output (`forward`, differentiable) and gives the fitting loss
(`loss`). Randomness (noise, Bernoulli masks) comes from the package's counter-based stream
(oes_fast.rng), generated on the CPU, so one seed gives the same y on every machine and
device.
"""
from __future__ import annotations

import base64
import math

import numpy as np
import torch
import torch.nn.functional as F

from . import rng
from .images import check_image

__all__ = ["Degradation", "Denoise", "Inpaint", "SuperRes", "standard_normal", "downsample_kernel",
           "make", "from_dict", "TASKS"]

# Smallest uniform fed to log() in Box-Muller; the stream can return exactly 0.
_U_MIN = 2.0 ** -32


def standard_normal(shape, seed: int, stream: str = "noise") -> torch.Tensor:
    """float32 N(0, 1) draws of `shape` (on the CPU) from the seeded counter-based stream.

    Box-Muller: element j uses uniforms u1 = u(j), u2 = u(n + j) of stream
    rng.stream_seed(seed, stream) (n = number of elements), z = sqrt(-2 ln u1) cos(2 pi u2),
    evaluated in float64 and rounded to float32: libm/SIMD differences between machines are
    below float64 precision, so the float32 result is the same everywhere (barring a
    float64 result within 1 ulp of a float32 rounding boundary, odds about 1e-8 per value).
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    s = rng.stream_seed(seed, stream)
    u1 = rng.uniform((n,), s, 0).double().clamp_(min=_U_MIN)
    u2 = rng.uniform((n,), s, n).double()
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(torch.float32).reshape(shape)


class Degradation:
    """Base class. Subclasses set `name` and implement degrade, forward and to_dict."""

    name: str = ""

    def __init__(self):
        self.seed: int | None = None  # seed of the last degrade(), kept for reports

    def degrade(self, clean: torch.Tensor, seed: int) -> torch.Tensor:
        """The synthetic measurement y from a clean (1, C, H, W) image in [0, 1]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A(x), differentiable; x is the network output (N, C, H, W)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """mean((A(x) - y)^2), a scalar tensor."""
        ax = self.forward(x)
        _check_same_shape(ax, y, self.name)
        return F.mse_loss(ax, y)  # as loop.data_loss says why

    def to_dict(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        d = self.to_dict()
        d.pop("pixel_mask", None)
        args = ", ".join(f"{k}={v!r}" for k, v in d.items() if k != "name")
        return f"{type(self).__name__}({args})"


def _check_same_shape(ax: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if ax.shape[1:] != y.shape[1:] or y.shape[0] not in (1, ax.shape[0]):
        raise ValueError(f"{name}: A(x) has shape {tuple(ax.shape)} but y has shape {tuple(y.shape)}")


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


class Denoise(Degradation):
    """y = clip(x + N(0, sigma^2), 0, 1); A = identity; loss = mean((x - y)^2).

    The OES default sigma is 0.1 (about 25/255). The noise is standard_normal(shape, seed,
    "noise") times sigma.
    """

    name = "denoise"

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        sigma = float(sigma)
        if not (math.isfinite(sigma) and sigma >= 0.0):
            raise ValueError(f"sigma must be a finite non-negative number, got {sigma}")
        self.sigma = sigma

    def degrade(self, clean, seed):
        check_image(clean, "clean image")
        self.seed = _check_seed(seed)
        noise = standard_normal(clean.shape, self.seed).to(device=clean.device, dtype=clean.dtype)
        return torch.clamp(clean + self.sigma * noise, 0.0, 1.0)

    def forward(self, x):
        return x

    def to_dict(self):
        return {"name": self.name, "sigma": self.sigma, "seed": self.seed}


def _pack_mask(mask: torch.Tensor) -> dict:
    """A binary (H, W) mask as JSON: bits packed row-major, base64."""
    bits = np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1))
    return {"shape": list(mask.shape), "bits": base64.b64encode(bits.tobytes()).decode("ascii")}


def _unpack_mask(d: dict) -> torch.Tensor:
    h, w = (int(s) for s in d["shape"])
    bits = np.frombuffer(base64.b64decode(d["bits"]), dtype=np.uint8)
    return torch.from_numpy(np.unpackbits(bits, count=h * w).reshape(h, w).astype(np.float32))


class Inpaint(Degradation):
    """y = M * x with a binary pixel mask M of shape (1, 1, H, W), the same for all channels.

    kind="bernoulli": each pixel is dropped with probability `drop` (pixel j dropped when
        u(j) < drop, u from rng.stream_seed(seed, "inpaint"), row-major over H x W).
    kind="block": a box is dropped. block=None: the centered square whose area is the
        fraction `drop` of the image; block=int s: the centered s x s square;
        block=(top, left, height, width): that box.
    pixel_mask=tensor: an explicit mask (H, W), (1, H, W) or (1, 1, H, W), 1 = observed,
        0 = dropped; `kind` is then "explicit".
    The mask is made in degrade (it needs the size) and kept in `self.mask`; to_dict keeps
    the settings, seed and size (or the packed explicit mask) so from_dict recreates it.
    A(x) = M * x; loss = sum(M (x - y)^2) / (sum(M) C): mean over observed entries only.
    """

    name = "inpaint"
    KINDS = ("bernoulli", "block")

    def __init__(self, kind: str = "bernoulli", drop: float = 0.5, block=None, pixel_mask=None):
        super().__init__()
        self.mask: torch.Tensor | None = None
        self.size: tuple[int, int] | None = None
        drop = float(drop)
        if pixel_mask is not None:
            m = torch.as_tensor(pixel_mask)
            if m.dim() == 4 and m.shape[:2] == (1, 1):
                m = m[0, 0]
            elif m.dim() == 3 and m.shape[0] == 1:
                m = m[0]
            if m.dim() != 2:
                raise ValueError(f"pixel_mask must have shape (H, W), (1, H, W) or (1, 1, H, W), got {tuple(m.shape)}")
            m = m.detach().to("cpu", torch.float32)
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError("pixel_mask must be binary (1 = observed, 0 = dropped)")
            self.kind, self.drop, self.block = "explicit", None, None
            self._set_mask(m)
            return
        if kind not in self.KINDS:
            raise ValueError(f"unknown inpainting kind {kind!r}; choose one of {', '.join(self.KINDS)} or pass pixel_mask=")
        if kind == "bernoulli" and block is not None:
            raise ValueError("block= is only for kind='block'")
        if not (0.0 <= drop < 1.0):
            raise ValueError(f"drop must be in [0, 1), got {drop}")
        if block is not None and not isinstance(block, (int, np.integer)):
            block = tuple(int(v) for v in block)
            if len(block) != 4 or block[2] <= 0 or block[3] <= 0:
                raise ValueError(f"block must be a side or (top, left, height, width), got {block}")
        elif block is not None and int(block) <= 0:
            raise ValueError(f"block side must be positive, got {block}")
        self.kind, self.drop, self.block = kind, drop, block

    def _set_mask(self, m2d: torch.Tensor) -> None:
        if float(m2d.sum()) == 0:
            raise ValueError("inpainting mask observes no pixel")
        self.mask = m2d.reshape(1, 1, *m2d.shape)
        self.size = (int(m2d.shape[0]), int(m2d.shape[1]))
        self._cache = {}

    def build_mask(self, height: int, width: int, seed: int) -> torch.Tensor:
        """Make (and keep) the mask for an image of height x width; returns it (1, 1, H, W) float32."""
        height, width = int(height), int(width)
        if self.kind == "explicit":
            if self.size != (height, width):
                raise ValueError(f"pixel_mask is {self.size[0]}x{self.size[1]} but the image is {height}x{width}")
            self.seed = _check_seed(seed)
            return self.mask
        self.seed = _check_seed(seed)
        if self.kind == "bernoulli":
            u = rng.uniform((height, width), rng.stream_seed(self.seed, "inpaint"), 0)
            m = (u >= self.drop).to(torch.float32)
        else:
            if self.block is None:
                side = min(height, width, max(1, round(math.sqrt(self.drop * height * width))))
                box = ((height - side) // 2, (width - side) // 2, side, side)
            elif isinstance(self.block, tuple):
                box = self.block
            else:
                side = int(self.block)
                box = ((height - side) // 2, (width - side) // 2, side, side)
            top, left, bh, bw = box
            if top < 0 or left < 0 or top + bh > height or left + bw > width:
                raise ValueError(f"block (top={top}, left={left}, height={bh}, width={bw}) does not fit "
                                 f"in a {height}x{width} image")
            m = torch.ones(height, width)
            m[top:top + bh, left:left + bw] = 0.0
        self._set_mask(m)
        return self.mask

    def _mask_like(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("Inpaint has no mask yet: call degrade(clean, seed) first "
                               "(or from_dict with a seed and size)")
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"inpaint: image is {x.shape[-2]}x{x.shape[-1]} but the mask is {self.size[0]}x{self.size[1]}")
        key = (x.device, x.dtype)
        if key not in self._cache:  # one copy per device/dtype, not a transfer every step
            self._cache[key] = self.mask.to(device=x.device, dtype=x.dtype)
        return self._cache[key]

    def degrade(self, clean, seed):
        check_image(clean, "clean image")
        self.build_mask(clean.shape[2], clean.shape[3], seed)
        return self.forward(clean)

    def forward(self, x):
        return self._mask_like(x) * x

    def loss(self, x, y):
        m = self._mask_like(x)
        _check_same_shape(x, y, self.name)
        d2 = m * (x - y) ** 2
        # Observed entries: sum(M) per channel and image; the denominator of the spec, batched.
        return d2.sum() / (m.sum() * (d2.numel() // m.numel()))

    def to_dict(self):
        d = {"name": self.name, "kind": self.kind, "drop": self.drop,
             "block": list(self.block) if isinstance(self.block, tuple) else self.block,
             "seed": self.seed, "size": list(self.size) if self.size is not None else None}
        if self.kind == "explicit":
            d["pixel_mask"] = _pack_mask(self.mask[0, 0])
        return d

    @property
    def observed_fraction(self) -> float | None:
        return None if self.mask is None else float(self.mask.mean())


def _lanczos3(t: np.ndarray) -> np.ndarray:
    return np.where(np.abs(t) < 3.0, np.sinc(t) * np.sinc(t / 3.0), 0.0)


def _keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


# name -> (filter, support in output-pixel units)
_FILTERS = {"lanczos": (_lanczos3, 3.0), "bicubic": (_keys_cubic, 2.0)}


def downsample_kernel(factor: int, kernel: str = "lanczos"):
    """1-D taps of the antialiased downsampler by an integer factor, and its padding.

    Output pixel i is centered at input coordinate (i + 0.5) * factor (pixel j spans
    [j, j + 1]); input pixel j gets weight K((j + 0.5 - center) / factor) with K the Lanczos3
    or Keys bicubic (a = -0.5) filter stretched by the factor (this is Pillow's reducing
    convention), taps with nonzero weight only, normalized to sum 1. Returns (taps float64
    array, pad_before, pad_after): output i reads input pixels i*factor - pad_before ...
    i*factor + factor - 1 + pad_after.
    """
    if kernel not in _FILTERS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(_FILTERS)}")
    factor = int(factor)
    fn, support = _FILTERS[kernel]
    reach = support * factor
    center = factor / 2.0
    # Every j whose distance to the center of output 0 is strictly inside the support
    # (the endpoints have zero weight); distances are exact half-integers or integers.
    j = np.arange(math.floor(center - reach - 0.5), math.ceil(center + reach - 0.5) + 1)
    d = j + 0.5 - center
    j = j[np.abs(d) < reach]
    taps = fn((j + 0.5 - center) / factor)
    taps = taps / taps.sum()
    return taps, int(-j[0]), int(j[-1] - (factor - 1))


class SuperRes(Degradation):
    """y = D(x) (+ optional N(0, sigma^2) noise, not clipped); A = D; loss = mean((D(x) - y)^2).

    D: antialiased downsampling by `factor` (4 or 8 in the spec; any integer >= 2 works) with
    the Lanczos3 ("lanczos") or Keys bicubic a = -0.5 ("bicubic") filter stretched by the
    factor, as a fixed separable convolution with stride `factor` after reflect padding
    (see downsample_kernel). Differentiable, it runs in the loss. Image sides must be
    divisible by the factor. In the interior it equals Pillow's Image.resize(..., reducing);
    near the borders Pillow truncates and renormalizes the filter, D reflects the image.
    """

    name = "superres"

    def __init__(self, factor: int = 4, kernel: str = "lanczos", sigma: float = 0.0):
        super().__init__()
        if isinstance(factor, bool) or int(factor) != factor or int(factor) < 2:
            raise ValueError(f"factor must be an integer >= 2 (the spec uses 4 and 8), got {factor!r}")
        sigma = float(sigma)
        if not (math.isfinite(sigma) and sigma >= 0.0):
            raise ValueError(f"sigma must be a finite non-negative number, got {sigma}")
        self.factor, self.kernel, self.sigma = int(factor), kernel, sigma
        self.taps, self.pad_before, self.pad_after = downsample_kernel(self.factor, kernel)
        self._cache = {}

    def _weights(self, x):
        key = (x.device, x.dtype)
        if key not in self._cache:
            t = torch.as_tensor(self.taps, dtype=x.dtype, device=x.device)
            self._cache[key] = (t.view(1, 1, -1, 1), t.view(1, 1, 1, -1))
        return self._cache[key]

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"superres: expected (N, C, H, W), got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"superres x{f}: image size {h}x{w} is not divisible by {f} "
                             f"(crop or pad it with images.fit_to_network)")
        if min(h, w) <= max(self.pad_before, self.pad_after):
            raise ValueError(f"superres x{f} {self.kernel}: image {h}x{w} is too small for the filter "
                             f"(sides must exceed {max(self.pad_before, self.pad_after)})")
        wv, wh = self._weights(x)
        z = x.reshape(n * c, 1, h, w)  # channels as batch: one depthwise filter for all
        z = F.pad(z, (self.pad_before, self.pad_after, self.pad_before, self.pad_after), mode="reflect")
        z = F.conv2d(z, wv, stride=(f, 1))
        z = F.conv2d(z, wh, stride=(1, f))
        return z.reshape(n, c, h // f, w // f)

    def degrade(self, clean, seed):
        check_image(clean, "clean image")
        self.seed = _check_seed(seed)
        y = self.forward(clean)
        if self.sigma > 0:
            y = y + self.sigma * standard_normal(y.shape, self.seed).to(device=y.device, dtype=y.dtype)
        return y

    def to_dict(self):
        return {"name": self.name, "factor": self.factor, "kernel": self.kernel, "sigma": self.sigma,
                "seed": self.seed}


TASKS = {"denoise": Denoise, "inpaint": Inpaint, "superres": SuperRes}


def make(name: str, **options) -> Degradation:
    """Build a degradation by name ("denoise", "inpaint", "superres") with its options."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](**options)


def from_dict(d: dict) -> Degradation:
    """Rebuild a degradation from to_dict(); an Inpaint with seed and size gets its mask back."""
    d = dict(d)
    name = d.pop("name", None)
    seed = d.pop("seed", None)
    if name == "inpaint":
        size = d.pop("size", None)
        packed = d.pop("pixel_mask", None)
        if d.get("kind") == "explicit":
            if packed is None:
                raise ValueError("inpaint dict of kind 'explicit' lacks its pixel_mask")
            obj = Inpaint(pixel_mask=_unpack_mask(packed))
            obj.seed = seed
            return obj
        if isinstance(d.get("block"), list):
            d["block"] = tuple(d["block"])
        obj = make(name, **d)
        if seed is not None and size is not None:
            obj.build_mask(size[0], size[1], seed)
        return obj
    obj = make(name, **d)
    obj.seed = seed
    return obj
