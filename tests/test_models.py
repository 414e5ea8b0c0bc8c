"""The generators of oes_fast.models against oes-spec.md section 2 and the published OES masks."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oes_fast
from oes_fast.models import deep_decoder, dip_input, skip, skip_oes

OES_NUMEL = 3_008_867
OES_KEPT = 150_443  # round(0.05 * 3,008,867), as stored in the published masks


@pytest.fixture(scope="module")
def oes_model():
    return skip_oes(seed=0)


# ------------------------------------------------------------------------------ OES network, published data
def test_skip_oes_parameter_count(oes_model):
    assert sum(p.numel() for p in oes_model.parameters()) == OES_NUMEL
    assert len(list(oes_model.parameters())) == 86
    assert oes_model.min_side == 256


def test_skip_oes_matches_published_layout(oes_model, shared_data):
    layout = json.loads((shared_data / "oes_published_masks" / "parameter_layout.json").read_text())
    assert layout["numel_total"] == OES_NUMEL
    params = list(oes_model.named_parameters())
    assert len(params) == len(layout["parameters"])
    for (name, p), entry in zip(params, layout["parameters"]):
        assert list(p.shape) == entry["shape"] and p.numel() == entry["numel"], (entry["index"], name)


MASK_FILES = ["pepper_density0.05.npz", "baboon_density0.05.npz", "barbara_density0.05.npz"]


@pytest.mark.parametrize("filename", MASK_FILES)
def test_published_masks_load(oes_model, shared_data, filename):
    data = np.load(shared_data / "oes_published_masks" / filename)
    numel = int(data["numel"])
    assert numel == OES_NUMEL
    flat = np.unpackbits(data["bits"])[:numel].astype(bool)
    mask = oes_fast.masks.from_flat(oes_model, torch.from_numpy(flat))
    assert mask.numel == OES_NUMEL and mask.kept == OES_KEPT == round(0.05 * OES_NUMEL)
    assert mask.density == pytest.approx(0.05, abs=1e-6) and mask.sparsity == pytest.approx(0.95, abs=1e-6)
    assert torch.equal(mask.to_flat(), torch.from_numpy(flat))
    mask.check_fits(oes_model)
    # With the right parameter order the pattern the data README describes falls on the right
    # names: every bias (conv and batch norm) is pruned except the output conv's, while every
    # conv weight and the output bias keep something.
    for row in mask.layer_stats():
        if row["name"].endswith(".bias") and row["name"] != "out.bias":
            assert row["kept"] == 0, row["name"]
        if row["name"].endswith(".weight") and "conv" in row["name"] or row["name"] == "out.bias":
            assert row["kept"] > 0, row["name"]


# ------------------------------------------------------------------------------ seeded initialization
def test_seeded_init_is_reproducible(oes_model):
    torch.manual_seed(123)  # the global RNG must not matter
    again = skip_oes(seed=0)
    for (name, p), q in zip(oes_model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    other = skip_oes(seed=1)
    for (name, p), q in zip(oes_model.named_parameters(), other.parameters()):
        if ".bn" in name:  # batch norm: constant 1 / 0 whatever the seed
            assert torch.equal(p, q), name
        else:
            assert not torch.equal(p, q), name


def test_seeded_init_distributions(oes_model):
    for name, module in oes_model.named_modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            for p in (module.weight, module.bias):
                p = p.detach().double()
                assert float(p.abs().max()) <= bound * (1 + 1e-6), name
                n = p.numel()
                if n >= 10_000:  # U(-b, b): mean 0, std b / sqrt(3)
                    std = bound / math.sqrt(3)
                    assert abs(float(p.mean())) < 5 * std / math.sqrt(n), name
                    assert float(p.std()) == pytest.approx(std, rel=0.02), name
                    assert float(p.abs().max()) > 0.99 * bound, name
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name


def test_unseeded_init_uses_torch_rng():
    torch.manual_seed(0)
    a = skip(in_channels=2, channels_down=(2,), channels_up=(2,), channels_skip=(0,))
    torch.manual_seed(0)
    b = skip(in_channels=2, channels_down=(2,), channels_up=(2,), channels_skip=(0,))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------------------ forward of the OES network
def test_skip_oes_forward_256(oes_model):
    z = dip_input(32, 256, 256, seed=0)
    with torch.no_grad():
        out = oes_model(z)
    assert out.shape == (1, 3, 256, 256) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    assert float(out.min()) > 0 and float(out.max()) < 1


@pytest.mark.parametrize(
    "shape, words",
    [
        ((1, 32, 255, 256), ["multiples of 64", "(255, 256)"]),
        ((1, 32, 256, 200), ["multiples of 64", "(256, 200)"]),
        ((1, 32, 128, 128), ["at least 256", "(128, 128)"]),
        ((1, 32, 192, 256), ["at least 256", "(192, 256)"]),
        ((1, 31, 256, 256), ["(N, 32, H, W)", "(1, 31, 256, 256)"]),
        ((32, 256, 256), ["(N, 32, H, W)", "(32, 256, 256)"]),
    ],
)
def test_invalid_input_sizes(shape, words):
    model = skip_oes()
    with pytest.raises(ValueError) as info:
        model(torch.zeros(shape))
    for word in words:
        assert word in str(info.value)


def test_invalid_constructor_arguments():
    for levels in (0, 7):
        with pytest.raises(ValueError, match="levels"):
            skip_oes(levels=levels)
    bad = [
        dict(channels_down=(4, 4), channels_up=(4,), channels_skip=(0, 0)),
        dict(channels_down=(), channels_up=(), channels_skip=()),
        dict(pad="circular"),
        dict(act="GELU"),
        dict(upsample="bicubic"),
        dict(downsample="stride"),
    ]
    for options in bad:
        with pytest.raises(ValueError):
            skip(**options)


# ------------------------------------------------------------------------------ architecture, by hand
def _pad_conv(x, w, b):
    """Reflection padding then a stride-1 'valid' conv: 'same' output size."""
    p = (w.shape[-1] - 1) // 2
    if p:
        x = F.pad(x, (p, p, p, p), mode="reflect")
    return F.conv2d(x, w, b)


def _bn(x, w, b):
    return F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)


def _act(x):
    return F.leaky_relu(x, 0.2)


def spec_skip_forward(z, params, down, up, skip_ch):
    """oes-spec.md section 2 written out; `params` yields the parameters in the spec's order,
    which the recursion consumes in exactly that order (skip branch, down path, deeper level,
    BN over k, up conv, its BN; the 1x1 output conv last)."""
    take = lambda: (next(params), next(params))  # noqa: E731  (weight, bias)
    levels = len(down)

    def level(i, x):
        s = None
        if skip_ch[i]:
            w, b = take()
            s = _pad_conv(x, w, b)
            s = _act(_bn(s, *take()))
        w, b = take()
        y = F.avg_pool2d(_pad_conv(x, w, b), 2)
        y = _act(_bn(y, *take()))
        w, b = take()
        y = _act(_bn(_pad_conv(y, w, b), *take()))
        if i < levels - 1:
            y = level(i + 1, y)
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        if s is not None:
            y = torch.cat([s, y], dim=1)
        y = _bn(y, *take())  # BN over k (+ skip) channels
        w, b = take()
        return _act(_bn(_pad_conv(y, w, b), *take()))

    x = level(0, z)
    w, b = take()
    out = torch.sigmoid(F.conv2d(x, w, b))
    with pytest.raises(StopIteration):
        next(params)  # every parameter used exactly once
    return out


def _randomize_(model, seed):
    """float64 and random values everywhere (BN weight 1 / bias 0 would hide order mistakes)."""
    model.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale + (1.0 if ".bn" in name and
                                                                                        name.endswith("weight") else 0.0))
    return model


@pytest.mark.parametrize(
    "config",
    [
        dict(in_channels=3, channels_down=(4, 5), channels_up=(6, 7), channels_skip=(0, 0)),
        dict(in_channels=3, channels_down=(4, 5), channels_up=(6, 7), channels_skip=(2, 3), filter_skip=3),
        dict(in_channels=2, channels_down=(3, 4, 5), channels_up=(3, 4, 5), channels_skip=(1, 0, 2)),
    ],
    ids=["no_skip", "skip", "three_levels"],
)
def test_skip_matches_spec_reimplementation(config):
    model = _randomize_(skip(**config), seed=1)
    side = model.min_side
    g = torch.Generator().manual_seed(2)
    z = torch.rand(1, config["in_channels"], side, 2 * side, generator=g, dtype=torch.float64)
    model.train()
    with torch.no_grad():
        out = model(z)
        expected = spec_skip_forward(z, iter(list(model.parameters())), config["channels_down"],
                                     config["channels_up"], config["channels_skip"])
    assert out.shape == (1, 3, side, 2 * side)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13)


def test_skip_branch_shapes():
    down, up, skip_ch = (4, 5), (6, 7), (2, 3)
    model = skip(seed=0, in_channels=3, channels_down=down, channels_up=up, channels_skip=skip_ch)
    assert model.down[0].skip_conv.weight.shape == (2, 3, 1, 1)
    assert model.down[1].skip_conv.weight.shape == (3, 4, 1, 1)
    # BN over k plus the skip channels: k = up[i + 1], or down[i] at the deepest level
    assert model.up["1"].bn_in.num_features == 3 + 5 and model.up["1"].conv.weight.shape == (7, 8, 3, 3)
    assert model.up["0"].bn_in.num_features == 2 + 7 and model.up["0"].conv.weight.shape == (6, 9, 3, 3)
    assert model.out.weight.shape == (3, 6, 1, 1)
    with torch.no_grad():
        assert model(dip_input(3, 16, 32)).shape == (1, 3, 16, 32)
    plain = skip(seed=0, in_channels=3, channels_down=down, channels_up=up, channels_skip=(0, 0))
    extra = 2 * 3 * 1 + 2 + 2 * 2 + 3 * 4 + 3 + 2 * 3 + (2 + 3) * 2 + 2 * 6 * 3 * 3 + 3 * 7 * 3 * 3
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters()) == extra


# ------------------------------------------------------------------------------ deep decoder, DIP input
def spec_deep_decoder_forward(z, params, num_up):
    """Section 2's deep decoder; the spec fixes no parameter order, so parameters go by name."""
    x = z
    for i in range(num_up + 1):
        x = F.conv2d(x, params[f"convs.{i}.weight"])  # 1x1, no bias
        if i < num_up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = _bn(F.relu(x), params[f"bns.{i}.weight"], params[f"bns.{i}.bias"])
    return torch.sigmoid(F.conv2d(x, params["out.weight"]))


def test_deep_decoder():
    model = deep_decoder(channels=8, num_up=2, seed=0)
    assert model.input_shape(32, 48) == (1, 8, 8, 12)
    z = dip_input(8, 8, 12, seed=1)
    with torch.no_grad():
        out = model(z)
    assert out.shape == (1, 3, 32, 48) and float(out.min()) > 0 and float(out.max()) < 1
    assert all(p.dim() == 4 or n.startswith("bns.") for n, p in model.named_parameters())  # convs without bias
    _randomize_(model, seed=3)
    z = z.double()
    with torch.no_grad():
        torch.testing.assert_close(model(z), spec_deep_decoder_forward(z, dict(model.named_parameters()), 2),
                                   rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.input_shape(30, 32)
    assert deep_decoder().input_shape(512, 512) == (1, 128, 16, 16)


def test_dip_input():
    z = dip_input(32, 64, 96, seed=3)
    assert z.shape == (1, 32, 64, 96) and z.dtype == torch.float32
    assert float(z.min()) >= 0 and float(z.max()) <= 0.1
    assert float(z.max()) > 0.099 and float(z.min()) < 0.001  # fills the range
    assert float(z.mean()) == pytest.approx(0.05, abs=0.001)
    assert torch.equal(z, dip_input(32, 64, 96, seed=3))
    assert not torch.equal(z, dip_input(32, 64, 96, seed=4))
    with pytest.raises(ValueError, match="positive"):
        dip_input(0, 64, 64)
