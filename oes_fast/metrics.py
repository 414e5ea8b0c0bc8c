"""Image quality against the clean image (spec section 5): PSNR and SSIM, data range 1; and the
noise level of an image without one (`noise_sigma`)."""
from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import structural_similarity

__all__ = ["psnr", "ssim", "noise_sigma"]


def _check_pair(x: torch.Tensor, clean: torch.Tensor) -> None:
    for name, t in (("x", x), ("clean", clean)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] not in (1, 3):
            raise ValueError(f"{name}: expected shape (1, C, H, W) with C in {{1, 3}}, got {tuple(t.shape)}")
    if x.shape != clean.shape:
        raise ValueError(f"x and clean differ in shape: {tuple(x.shape)} vs {tuple(clean.shape)}")


@torch.no_grad()
def psnr(x: torch.Tensor, clean: torch.Tensor) -> float:
    """PSNR in dB with data range 1: 10 log10(1 / mean((x - clean)^2)); inf when equal.

    `x`, `clean`: float tensors of the same shape (1, C, H, W), C in {1, 3}, values in [0, 1],
    any float dtype and device. Returns a Python float.

    The closed form of skimage.metrics.peak_signal_noise_ratio(data_range=1), computed in
    float64 on the tensors' device (no copy to the host inside training loops). No clamping:
    pass images in [0, 1].
    """
    _check_pair(x, clean)
    mse = float(torch.mean((x.detach().double() - clean.detach().double().to(x.device)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def _to_hwc(t: torch.Tensor) -> np.ndarray:
    return t.detach()[0].to("cpu", torch.float64).permute(1, 2, 0).numpy()


@torch.no_grad()
def ssim(x: torch.Tensor, clean: torch.Tensor) -> float:
    """SSIM as in scikit-image with the Gaussian window of Wang et al.: a Python float in
    [-1, 1] (1 when equal) for `x`, `clean` as in `psnr`.

    skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1), averaged over channels for color
    (channel_axis). Computed in float64 on the CPU. Both sides need at least 11 pixels
    (the Gaussian window, truncated at 3.5 sigma).
    """
    _check_pair(x, clean)
    a, b = _to_hwc(x), _to_hwc(clean)
    if min(a.shape[0], a.shape[1]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11 pixels, got {a.shape[0]}x{a.shape[1]}")
    color = a.shape[2] == 3
    if not color:
        a, b = a[:, :, 0], b[:, :, 0]
    return float(structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, channel_axis=2 if color else None))


@torch.no_grad()
def noise_sigma(image: torch.Tensor) -> float:
    """The standard deviation of white Gaussian noise in `image`, estimated from the image alone:
    scikit-image's `estimate_sigma` (the median absolute value of the finest diagonal wavelet
    coefficients over 0.6745, Donoho and Johnstone), averaged over the channels.

    `image`: a float tensor (1, C, H, W), C in {1, 3}, values in [0, 1], at least 2x2 pixels; any
    float dtype and device; NaN/Inf refused. Returns a Python float in the image's range. Fine
    texture reads as noise (on the clean 512x512 baboon it gives 0.05), so the estimate errs high
    on textured images and low on noise that is not white (docs/quality.md measures it).
    """
    from skimage.restoration import estimate_sigma

    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image: expected a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] not in (1, 3) or min(image.shape[2:]) < 2:
        raise ValueError(f"image: expected shape (1, C, H, W) with C in {{1, 3}} and sides >= 2, got {tuple(image.shape)}")
    if not image.is_floating_point() or not bool(torch.isfinite(image).all()):
        raise ValueError("image: expected finite floating-point values")
    return float(estimate_sigma(_to_hwc(image), channel_axis=-1, average_sigmas=True))
