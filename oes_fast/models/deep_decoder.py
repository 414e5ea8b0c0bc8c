"""Deep decoder (Heckel & Hand, ICLR 2019), the under-parameterized baseline of oes-spec.md."""
from __future__ import annotations

import torch
from torch import nn


class DeepDecoder(nn.Module):
    """`num_up` blocks of [1x1 conv (no bias), bilinear x2 upsample, ReLU, BN], one more block
    without the upsample, then a 1x1 conv to `out_channels` and a sigmoid. The input is
    (1, channels, H / 2**num_up, W / 2**num_up)."""

    def __init__(self, channels: int = 128, num_up: int = 5, out_channels: int = 3, sigmoid: bool = True):
        super().__init__()
        if channels <= 0 or num_up < 0:
            raise ValueError(f"channels must be positive and num_up non-negative, got {channels}, {num_up}")
        self.config = dict(name="deep_decoder", channels=channels, num_up=num_up, out_channels=out_channels,
                           sigmoid=sigmoid)
        self.num_up = num_up
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 1, bias=False) for _ in range(num_up + 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_up + 1))
        self.out = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.sigmoid = sigmoid

    def input_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The input's shape for a height x width output (both multiples of 2 ** num_up)."""
        step = 2**self.num_up
        if height % step or width % step:
            raise ValueError(f"image sides must be multiples of {step}, got {(height, width)}")
        return (1, self.config["channels"], height // step, width // step)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = conv(x)
            if i < self.num_up:
                x = nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = bn(torch.relu(x))
        x = self.out(x)
        return torch.sigmoid(x) if self.sigmoid else x
