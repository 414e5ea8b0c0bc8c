"""Degradations: seeded measurements, operators, losses, gradients, (de)serialization."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from oes_fast import tasks
from oes_fast.tasks import Denoise, Inpaint, SuperRes


def smooth_image(h=64, w=64, channels=3):
    """A smooth color image in [0.1, 0.9]: low-frequency sinusoids, different per channel."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    planes = [0.5 + 0.2 * np.sin(2 * np.pi * (1.3 * xx + 0.4 * yy + c / 3)) + 0.15 * np.cos(2 * np.pi * (0.7 * yy - 0.5 * xx) + c)
              for c in range(channels)]
    return torch.from_numpy(np.stack(planes)[None].astype(np.float32))


# --------------------------------------------------------------------------------------------
# The seeded Gaussian stream

def test_standard_normal_pinned_values():
    # Pins the stream (Philox uniforms -> Box-Muller in float64 -> float32): a change here
    # changes every synthetic measurement.
    z = tasks.standard_normal((2, 3), 0)
    expected = torch.tensor([[-0.23701825737953186, -3.2050931453704834, -1.6133147478103638],
                             [-0.3710099160671234, 0.588904082775116, -0.37515750527381897]], dtype=torch.float32)
    assert z.dtype == torch.float32 and torch.equal(z, expected)


def test_standard_normal_moments_and_seeds():
    z = tasks.standard_normal((200_000,), 5)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert torch.equal(z, tasks.standard_normal((200_000,), 5))
    assert not torch.equal(z, tasks.standard_normal((200_000,), 6))
    assert not torch.equal(z, tasks.standard_normal((200_000,), 5, stream="other"))


# --------------------------------------------------------------------------------------------
# Denoise

def test_denoise_shape_seed_and_noise_level():
    clean = torch.full((1, 3, 128, 128), 0.5)  # 5 sigma from both clip bounds: no clipping
    d = Denoise(sigma=0.1)
    y = d.degrade(clean, seed=0)
    assert y.shape == clean.shape and y.dtype == torch.float32
    noise = y - clean
    assert abs(float(noise.std()) - 0.1) < 0.002 and abs(float(noise.mean())) < 0.002
    assert torch.equal(y, Denoise(0.1).degrade(clean, 0))
    assert not torch.equal(y, d.degrade(clean, 1))
    assert d.to_dict() == {"name": "denoise", "sigma": 0.1, "seed": 1}


def test_denoise_clips_to_unit_range():
    clean = smooth_image()
    clean[..., :8, :] = 1.0
    y = Denoise(0.3).degrade(clean, 0)
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0


def test_denoise_forward_loss_and_gradient():
    d = Denoise(0.1)
    clean = smooth_image(32, 32)
    y = d.degrade(clean, 0)
    x = torch.rand_like(clean, requires_grad=True)
    assert d.forward(x) is x
    loss = d.loss(x, y)
    assert torch.allclose(loss, torch.mean((x - y) ** 2))
    loss.backward()
    assert torch.allclose(x.grad, 2 * (x - y).detach() / x.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 37, 41), (1, 1, 5, 3)])
def test_mse_losses_have_the_written_out_bits(shape, dtype):
    # loop.data_loss and Degradation.loss take F.mse_loss (one op each way) for
    # torch.mean((x - y) ** 2); a loss whose own gradient is 1, as every loss here, gets the same
    # bits both ways, value and gradient.
    from oes_fast.loop import data_loss

    g = torch.Generator().manual_seed(sum(shape))
    y = torch.rand(shape, generator=g, dtype=dtype)
    x0 = torch.rand(shape, generator=g, dtype=dtype)
    x = x0.clone().requires_grad_()
    expected = torch.mean((x - y) ** 2)
    (expected_grad,) = torch.autograd.grad(expected, x)
    for loss_fn in (data_loss, Denoise(0.1).loss):
        x = x0.clone().requires_grad_()
        loss = loss_fn(x, y)
        loss.backward()
        assert torch.equal(loss.detach(), expected.detach()) and torch.equal(x.grad, expected_grad)


def test_degrade_rejects_bad_clean_images():
    bad = smooth_image(16, 16)
    bad[0, 0, 0, 0] = float("nan")
    for task in (Denoise(), Inpaint(), SuperRes(4)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            task.degrade(bad, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Denoise().degrade(smooth_image(16, 16) * 2, 0)
    with pytest.raises(ValueError, match="seed"):
        Denoise().degrade(smooth_image(16, 16), -1)


# --------------------------------------------------------------------------------------------
# Inpaint

def test_inpaint_bernoulli_mask():
    clean = smooth_image(64, 64)
    task = Inpaint(kind="bernoulli", drop=0.3)
    y = task.degrade(clean, seed=2)
    m = task.mask
    assert m.shape == (1, 1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(task.observed_fraction - 0.7) < 0.03
    # Same mask for every channel: y is zero exactly where the mask is (clean > 0 here).
    assert torch.equal(y, m * clean) and torch.equal((y == 0).float(), (1 - m).expand_as(y))
    again = Inpaint("bernoulli", 0.3)
    again.degrade(clean, 2)
    assert torch.equal(again.mask, m)
    again.degrade(clean, 3)
    assert not torch.equal(again.mask, m)


def test_inpaint_loss_ignores_unobserved_pixels():
    clean = smooth_image(32, 32)
    task = Inpaint(drop=0.5)
    y = task.degrade(clean, 0)
    m = task.mask
    x = torch.rand_like(clean)
    x2 = torch.where(m.bool(), x, torch.rand_like(x) * 100)  # change only the unobserved pixels
    assert torch.equal(task.loss(x, y), task.loss(x2, y))
    expected = (m * (x - y) ** 2).sum() / (m.sum() * 3)
    assert torch.allclose(task.loss(x, y), expected)
    assert float(task.loss(clean, y)) == 0.0


def test_inpaint_gradient_only_on_observed_pixels():
    task = Inpaint(drop=0.5)
    y = task.degrade(smooth_image(32, 32), 0)
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    task.loss(x, y).backward()
    observed = task.mask.bool().expand_as(x)
    assert torch.all(x.grad[~observed] == 0)
    assert torch.all(x.grad[observed] != 0)


def test_inpaint_block_masks():
    clean = smooth_image(64, 64)
    centered = Inpaint(kind="block", drop=0.25)  # centered square of a quarter of the area
    centered.degrade(clean, 0)
    m = centered.mask[0, 0]
    assert centered.observed_fraction == 0.75
    assert torch.all(m[16:48, 16:48] == 0) and float(m.sum()) == 64 * 64 - 32 * 32
    side = Inpaint(kind="block", block=10)
    side.degrade(clean, 0)
    assert float(side.mask.sum()) == 64 * 64 - 100 and torch.all(side.mask[0, 0, 27:37, 27:37] == 0)
    box = Inpaint(kind="block", block=(0, 5, 4, 6))
    box.degrade(clean, 0)
    expected = torch.ones(64, 64)
    expected[0:4, 5:11] = 0
    assert torch.equal(box.mask[0, 0], expected)
    with pytest.raises(ValueError, match="does not fit"):
        Inpaint(kind="block", block=(60, 0, 10, 10)).degrade(clean, 0)


def test_inpaint_explicit_mask_and_round_trip():
    pm = (torch.rand(20, 24, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    task = Inpaint(pixel_mask=pm)
    clean = smooth_image(20, 24)
    y = task.degrade(clean, 0)
    assert task.kind == "explicit" and torch.equal(y, pm * clean)
    back = tasks.from_dict(json.loads(json.dumps(task.to_dict())))
    assert torch.equal(back.mask, task.mask) and torch.equal(back.forward(clean), y)
    with pytest.raises(ValueError, match="20x24 but the image is 16x16"):
        task.degrade(smooth_image(16, 16), 0)
    with pytest.raises(ValueError, match="binary"):
        Inpaint(pixel_mask=pm * 0.5)


def test_inpaint_round_trip_recreates_mask():
    for task in (Inpaint(drop=0.4), Inpaint(kind="block", block=(2, 3, 5, 7))):
        task.degrade(smooth_image(32, 48), 9)
        d = json.loads(json.dumps(task.to_dict()))
        assert d["seed"] == 9 and d["size"] == [32, 48]
        back = tasks.from_dict(d)
        assert torch.equal(back.mask, task.mask)


def test_inpaint_errors():
    with pytest.raises(RuntimeError, match="call degrade"):
        Inpaint().forward(torch.rand(1, 3, 8, 8))
    task = Inpaint()
    task.degrade(smooth_image(16, 16), 0)
    with pytest.raises(ValueError, match="mask is 16x16"):
        task.forward(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="drop"):
        Inpaint(drop=1.0)
    with pytest.raises(ValueError, match="unknown inpainting kind"):
        Inpaint(kind="text")
    with pytest.raises(ValueError, match="observes no pixel"):
        Inpaint(pixel_mask=torch.zeros(4, 4))


# --------------------------------------------------------------------------------------------
# SuperRes

@pytest.mark.parametrize("factor", [4, 8])
@pytest.mark.parametrize("kernel", ["lanczos", "bicubic"])
def test_superres_constant_image_is_preserved(factor, kernel):
    task = SuperRes(factor, kernel)
    const = torch.full((1, 3, 64, 64), 0.37)
    y = task.degrade(const, 0)
    assert y.shape == (1, 3, 64 // factor, 64 // factor)
    assert torch.allclose(y, torch.full_like(y, 0.37), atol=1e-6)


def test_superres_kernel_taps():
    for factor, kernel, n in [(4, "lanczos", 24), (8, "lanczos", 48), (4, "bicubic", 16), (8, "bicubic", 32)]:
        taps, before, after = tasks.downsample_kernel(factor, kernel)
        assert len(taps) == n and abs(taps.sum() - 1) < 1e-12
        assert np.allclose(taps, taps[::-1])  # symmetric about the output pixel's center
        assert before == after == (n - factor) // 2


@pytest.mark.parametrize("factor", [4, 8])
@pytest.mark.parametrize("kernel,pil_filter", [("lanczos", Image.Resampling.LANCZOS), ("bicubic", Image.Resampling.BICUBIC)])
def test_superres_matches_pillow(factor, kernel, pil_filter):
    # Pillow's float ("F") resize uses the same convention (filter stretched by the factor,
    # taps centered at (i + 0.5) * factor, normalized), so away from the borders the two
    # agree to float32 rounding (measured <= 2.4e-7). Within pad/factor output pixels of an
    # edge Pillow truncates and renormalizes the filter while D reflects the image: on this
    # smooth image that differs by up to 3e-3 (x4) / 7.3e-3 (x8), hence the looser bound.
    clean = smooth_image(128, 128)
    task = SuperRes(factor, kernel)
    ours = task.degrade(clean, 0)[0].numpy()
    size = (128 // factor, 128 // factor)
    pil = np.stack([np.asarray(Image.fromarray(c, mode="F").resize(size, pil_filter)) for c in clean[0].numpy()])
    border = -(-task.pad_before // factor)
    diff = np.abs(ours - pil)
    assert diff[:, border:-border, border:-border].max() < 1e-5
    assert diff.max() < 0.02 and diff.mean() < 0.003


def test_superres_loss_gradient_and_noise():
    task = SuperRes(4)
    clean = smooth_image(32, 32)
    y = task.degrade(clean, 0)
    assert float(task.loss(clean, y)) == 0.0
    # Gradient through D: the loss is quadratic, so a central difference along a random
    # direction equals the directional derivative up to rounding (cheaper than gradcheck).
    y64 = y.double()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    task.loss(x, y64).backward()
    assert torch.all(x.grad != 0)
    v, eps = torch.randn_like(x), 1e-3
    with torch.no_grad():
        numeric = (task.loss(x + eps * v, y64) - task.loss(x - eps * v, y64)) / (2 * eps)
    assert torch.allclose((x.grad * v).sum(), numeric, rtol=1e-9, atol=1e-12)
    noisy = SuperRes(4, sigma=0.05)
    y1, y2 = noisy.degrade(clean, 1), noisy.degrade(clean, 1)
    assert torch.equal(y1, y2) and not torch.equal(y1, noisy.degrade(clean, 2))
    assert abs(float((y1 - y).std()) - 0.05) < 0.01


def test_superres_errors():
    with pytest.raises(ValueError, match="not divisible by 4"):
        SuperRes(4).degrade(torch.rand(1, 3, 66, 64), 0)
    with pytest.raises(ValueError, match="too small"):
        SuperRes(8).forward(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown kernel"):
        SuperRes(4, "nearest")
    with pytest.raises(ValueError, match="factor"):
        SuperRes(2.5)


# --------------------------------------------------------------------------------------------
# Factory and serialization

def test_make_and_from_dict():
    for name, options in [("denoise", {"sigma": 0.05}), ("inpaint", {"kind": "bernoulli", "drop": 0.2}),
                          ("superres", {"factor": 8, "kernel": "bicubic"})]:
        task = tasks.make(name, **options)
        assert task.name == name
        task.degrade(smooth_image(64, 64), 4)
        d = json.loads(json.dumps(task.to_dict()))
        back = tasks.from_dict(d)
        assert type(back) is type(task) and back.to_dict() == d
    with pytest.raises(ValueError, match="unknown task 'deblur'"):
        tasks.make("deblur")
