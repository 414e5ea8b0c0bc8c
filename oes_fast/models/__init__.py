"""Generators: the DIP hourglass (`skip`, `skip_oes`), the deep decoder, and the DIP input.

With `seed=`, weights are drawn from the package's counter-based stream (oes_fast.rng) with
the distributions of PyTorch's default initialization, so one seed rebuilds bit-identical
weights on any machine, backend and torch version. With `seed=None`, PyTorch's own
initialization (global RNG) is kept.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import rng
from .deep_decoder import DeepDecoder
from .skip import Skip

__all__ = ["Skip", "DeepDecoder", "skip", "skip_oes", "deep_decoder", "dip_input", "initialize", "build"]

OES_CHANNELS = (16, 32, 64, 128, 128, 128)


@torch.no_grad()
def initialize(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter of `model` from the seeded stream, in place.

    Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is what PyTorch's
    default (kaiming_uniform with a=sqrt(5)) amounts to; batch norm: weight 1, bias 0.
    Parameter j of the flat parameter space uses stream offset j, in float32 arithmetic
    whose every step is exactly rounded (so identical everywhere). `model`: float32 parameters
    in convs and batch norms only (TypeError / RuntimeError otherwise); `seed`: int >= 0.
    Returns `model`, with `model.init_seed = seed`.
    """
    seed_user, seed = int(seed), rng.stream_seed(seed, "init")
    offset = 0
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            fan_in = module.weight[0].numel()
            bound = torch.tensor(1.0 / math.sqrt(fan_in), dtype=torch.float32)
            params = [module.weight] + ([module.bias] if module.bias is not None else [])
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = [module.weight, module.bias] if module.affine else []
        else:
            continue
        for p in params:
            if p.dtype != torch.float32:
                raise TypeError(f"initialize expects float32 parameters, got {p.dtype}")
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                p.fill_(1.0 if p is module.weight else 0.0)
            else:
                u = rng.uniform(p.shape, seed, offset)
                p.copy_((u * 2.0 - 1.0) * bound)
            offset += p.numel()
    if offset != sum(p.numel() for p in model.parameters()):
        raise RuntimeError("initialize: the model has parameters outside convs and batch norms")
    model.init_seed = seed_user
    return model


def skip(seed: int | None = None, **options) -> Skip:
    """DIP hourglass (float32, CPU) with the options of `Skip` (channels, filters, padding,
    sampling, ...); weights from `seed` (int >= 0) or, with None, from PyTorch's global RNG.
    It maps (N, in_channels, H, W) to (N, out_channels, H, W), H and W multiples of
    2 ** levels and at least `model.min_side`."""
    model = Skip(**options)
    return initialize(model, seed) if seed is not None else model


def skip_oes(levels: int = 6, seed: int | None = None) -> Skip:
    """The OES configuration (3,008,867 parameters for 6 levels): 32 input channels, 3 output,
    channels [16, 32, 64, 128, 128, 128][:levels], no skip branches, 5x5 down and 3x3 up
    filters, reflection padding, average pooling, nearest upsampling, LeakyReLU(0.2), sigmoid
    output in [0, 1]. `levels` in 1..6; `seed` as in `skip`. Input (N, 32, H, W), H and W
    multiples of 2 ** levels (at least 256 for 6 levels); output (N, 3, H, W)."""
    if not 1 <= levels <= len(OES_CHANNELS):
        raise ValueError(f"levels must be in 1..{len(OES_CHANNELS)}, got {levels}")
    channels = OES_CHANNELS[:levels]
    return skip(seed, in_channels=32, out_channels=3, channels_down=channels, channels_up=channels,
                channels_skip=(0,) * levels, filter_down=5, filter_up=3)


def deep_decoder(channels: int = 128, num_up: int = 5, out_channels: int = 3, seed: int | None = None) -> DeepDecoder:
    """The deep decoder (float32, CPU): `channels` per layer, `num_up` x2 upsamplings (ints,
    channels >= 1, num_up >= 0), `out_channels` outputs in [0, 1]; weights from `seed` as in `skip`. Its input shape
    for an H x W output is `model.input_shape(H, W)`."""
    model = DeepDecoder(channels, num_up, out_channels)
    return initialize(model, seed) if seed is not None else model


def build(config: dict, seed: int | None = None) -> nn.Module:
    """Rebuild a model from its `config` (a dict as stored in mask files: `model.config`), its
    weights from `seed` as in `skip`; ValueError for an unknown architecture."""
    options = dict(config)
    name = options.pop("name", None)
    if name == "skip":
        return skip(seed, **options)
    if name == "deep_decoder":
        return deep_decoder(seed=seed, **options)
    raise ValueError(f"unknown architecture {name!r}")


def dip_input(channels: int, height: int, width: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """The fixed DIP input z: a float32 (1, channels, height, width) tensor on `device`, uniform
    on [0, 0.1] from `seed` (int >= 0); positive sizes."""
    if min(channels, height, width) <= 0:
        raise ValueError(f"dip_input: sizes must be positive, got {(channels, height, width)}")
    u = rng.uniform((1, channels, height, width), rng.stream_seed(seed, "input"), 0, device=device)
    return u * 0.1
