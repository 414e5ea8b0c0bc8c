"""The DIP hourglass ("skip" network) as used by Optimal Eye Surgeon (oes-spec.md section 2).

The original is built recursively; here the levels are kept in two lists, registered so that
the parameter order is exactly the recursive one: all down blocks from level 0 to level L-1,
then the up blocks from level L-1 back to level 0, then the 1x1 output conv.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

PADDING_MODES = {"reflection": "reflect", "zero": "zeros"}
ACTIVATIONS = {"LeakyReLU": lambda: nn.LeakyReLU(0.2), "ReLU": nn.ReLU, "ELU": nn.ELU, "none": nn.Identity}


def conv(c_in: int, c_out: int, kernel: int, pad: str, bias: bool) -> nn.Conv2d:
    """A stride-1 'same' convolution with the requested padding fused into nn.Conv2d."""
    if pad not in PADDING_MODES:
        raise ValueError(f"pad must be one of {sorted(PADDING_MODES)}, got {pad!r}")
    return nn.Conv2d(c_in, c_out, kernel, padding=(kernel - 1) // 2, padding_mode=PADDING_MODES[pad], bias=bias)


def downsampler(mode: str) -> nn.Module:
    """The x2 downsampling: `mode` "avg" (average pooling) or "max" (max pooling), 2x2 stride 2."""
    if mode == "avg":
        return nn.AvgPool2d(2, 2)
    if mode == "max":
        return nn.MaxPool2d(2, 2)
    raise ValueError(f"downsample must be 'avg' or 'max', got {mode!r}")


class DownBlock(nn.Module):
    """Level i going down: [optional skip branch], conv + pool, BN, act, conv, BN, act."""

    def __init__(self, c_in, c_down, c_skip, k_down, k_skip, pad, downsample, act, bias):
        super().__init__()
        if c_skip:
            self.skip_conv = conv(c_in, c_skip, k_skip, pad, bias)
            self.skip_bn = nn.BatchNorm2d(c_skip)
        self.conv1 = conv(c_in, c_down, k_down, pad, bias)
        self.pool = downsampler(downsample)
        self.bn1 = nn.BatchNorm2d(c_down)
        self.conv2 = conv(c_down, c_down, k_down, pad, bias)
        self.bn2 = nn.BatchNorm2d(c_down)
        self.act = ACTIVATIONS[act]()
        self.has_skip = bool(c_skip)

    def forward(self, x):
        skip = self.act(self.skip_bn(self.skip_conv(x))) if self.has_skip else None
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x))), skip


class UpBlock(nn.Module):
    """Level i coming up: x2 upsample, [skip branch concatenated in front], BN over all the
    channels, conv, BN, act. The upsample lives here so that a block recomputed in the
    backward (oes_fast.fused_search) keeps its input at the lower resolution."""

    def __init__(self, c_in, c_up, k_up, pad, act, bias, upsample):
        super().__init__()
        self.upsample_mode = upsample
        self.bn_in = nn.BatchNorm2d(c_in)
        self.conv = conv(c_in, c_up, k_up, pad, bias)
        self.bn = nn.BatchNorm2d(c_up)
        self.act = ACTIVATIONS[act]()

    def forward(self, x, skip=None):
        x = nn.functional.interpolate(x, scale_factor=2, mode=self.upsample_mode)
        if skip is not None:
            x = torch.cat([skip, x], dim=1)
        return self.act(self.bn(self.conv(self.bn_in(x))))


class Skip(nn.Module):
    """DIP hourglass. `config` holds the constructor arguments (it names the architecture).

    forward(z): z float (N, in_channels, H, W) (see `check_input`) -> (N, out_channels, H, W),
    in [0, 1] with `sigmoid`. `channels_*`: one int per level (the same number of levels, at
    least one); filters: odd ints; `pad` "reflection" or "zero"; `downsample` "avg" or "max";
    `upsample` "nearest" or "bilinear"; `act` "LeakyReLU", "ReLU", "ELU" or "none"."""

    def __init__(
        self,
        in_channels: int = 32,
        out_channels: int = 3,
        channels_down: Sequence[int] = (16, 32, 64, 128, 128, 128),
        channels_up: Sequence[int] = (16, 32, 64, 128, 128, 128),
        channels_skip: Sequence[int] = (0, 0, 0, 0, 0, 0),
        filter_down: int = 5,
        filter_up: int = 3,
        filter_skip: int = 1,
        pad: str = "reflection",
        downsample: str = "avg",
        upsample: str = "nearest",
        act: str = "LeakyReLU",
        bias: bool = True,
        sigmoid: bool = True,
    ):
        super().__init__()
        levels = len(channels_down)
        if not (len(channels_up) == len(channels_skip) == levels) or levels == 0:
            raise ValueError(
                "channels_down, channels_up and channels_skip must have the same non-zero length, got "
                f"{len(channels_down)}, {len(channels_up)}, {len(channels_skip)}"
            )
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        self.config = dict(
            name="skip", in_channels=in_channels, out_channels=out_channels, channels_down=list(channels_down),
            channels_up=list(channels_up), channels_skip=list(channels_skip), filter_down=filter_down,
            filter_up=filter_up, filter_skip=filter_skip, pad=pad, downsample=downsample, upsample=upsample,
            act=act, bias=bias, sigmoid=sigmoid,
        )
        self.levels = levels
        c_in = [in_channels] + list(channels_down[:-1])
        self.down = nn.ModuleList(
            DownBlock(c_in[i], channels_down[i], channels_skip[i], filter_down, filter_skip, pad, downsample, act, bias)
            for i in range(levels)
        )
        # Up blocks are registered deepest first: that is the recursive parameter order.
        up = {}
        for i in reversed(range(levels)):
            k = channels_up[i + 1] if i < levels - 1 else channels_down[i]
            up[str(i)] = UpBlock(channels_skip[i] + k, channels_up[i], filter_up, pad, act, bias, upsample)
        self.up = nn.ModuleDict(up)
        self.out = conv(channels_up[0], out_channels, 1, pad, bias)
        self.sigmoid = sigmoid

    @property
    def min_side(self) -> int:
        """Smallest image side: 4 pixels at the deepest level (256 for 6 levels, oes-spec.md)."""
        return 4 * 2**self.levels

    def check_input(self, z: torch.Tensor) -> None:
        """ValueError unless `z` is (N, in_channels, H, W) with H and W multiples of 2 ** levels
        and at least `min_side`."""
        if z.dim() != 4 or z.shape[1] != self.config["in_channels"]:
            raise ValueError(f"input must be (N, {self.config['in_channels']}, H, W), got {tuple(z.shape)}")
        step = 2**self.levels
        for side in z.shape[2:]:
            if side % step or side < self.min_side:
                raise ValueError(
                    f"image sides must be multiples of {step} and at least {self.min_side} for a "
                    f"{self.levels}-level network, got {tuple(z.shape[2:])}"
                )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        x, skips = z, []
        for block in self.down:
            x, skip = block(x)
            skips.append(skip)
        for i in reversed(range(self.levels)):
            x = self.up[str(i)](x, skips[i])
        x = self.out(x)
        return torch.sigmoid(x) if self.sigmoid else x
