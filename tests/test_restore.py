"""oes_fast.restore: the image given is the observation and comes back at its size, channels,
dtype and range; holes from a mask or from alpha; super-resolution enlarges; bad input is refused
before anything runs; the cost estimate refuses a run larger than the machine's memory."""
import numpy as np
import pytest
import torch

import oes_fast
from oes_fast import restoration
from oes_fast.images import fit_to_network, reflect_pad, unfit

STEPS = dict(steps=1, progress=False, record_every=1)


def noisy(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    top = {np.uint8: 255, np.uint16: 65535}.get(dtype)
    if top is None:
        return rng.random(shape).astype(dtype)
    return rng.integers(0, top + 1, shape).astype(dtype)


@pytest.mark.parametrize("shape, dtype", [((301, 451, 3), np.uint8), ((200, 200), np.uint16),
                                          ((260, 270, 1), np.float32), ((256, 300, 4), np.uint8)])
def test_an_array_comes_back_with_its_shape_and_dtype(shape, dtype):
    image = noisy(shape, dtype)
    restored, report = oes_fast.restore(image, **STEPS)
    assert isinstance(restored, np.ndarray) and restored.shape == image.shape and restored.dtype == image.dtype
    assert report.output_size == shape[:2] and report.network_size[0] % 64 == 0 and report.network_size[1] % 64 == 0
    assert len(report.losses) == 1 and not report.reference and report.psnr == []
    if shape[-1] == 4:  # denoising keeps the alpha channel as it was
        assert np.array_equal(restored[:, :, 3], image[:, :, 3])


def test_gray_is_restored_as_gray_and_padding_is_cropped_back():
    # a constant gray image: the network's output, cropped back from the padded frame, is gray
    image = np.full((200, 210), 0.25, dtype=np.float64)
    restored, report = oes_fast.restore(image, **STEPS)
    assert restored.shape == (200, 210) and restored.dtype == np.float64
    assert report.fit["changed"] and report.fit["pad"] == (28, 28, 23, 23)
    assert 0.0 <= restored.min() <= restored.max() <= 1.0


def test_a_tensor_comes_back_as_a_tensor():
    image = torch.rand(3, 256, 320, dtype=torch.float64)
    restored, _ = oes_fast.restore(image, **STEPS)
    assert torch.is_tensor(restored) and restored.shape == image.shape and restored.dtype == torch.float64


def test_superres_output_is_factor_times_the_input():
    image = noisy((70, 90, 3))
    for factor in (4, 8):
        restored, report = oes_fast.restore(image, task="superres", factor=factor, **STEPS)
        assert restored.shape == (70 * factor, 90 * factor, 3)
        assert report.network_size[0] >= 70 * factor and report.network_size[0] % 64 == 0


def test_inpaint_from_a_holes_array_and_from_alpha():
    image = noisy((256, 300, 3))
    holes = np.zeros((256, 300), dtype=np.uint8)
    holes[100:140, 50:90] = 255
    restored, report = oes_fast.restore(image, task="inpaint", holes=holes, **STEPS)
    assert restored.shape == image.shape
    assert report.task["missing_fraction"] == pytest.approx(40 * 40 / (256 * 300), abs=1e-6)
    rgba = np.dstack([image, np.full((256, 300), 255, np.uint8)])
    rgba[100:140, 50:90, 3] = 0
    restored, report = oes_fast.restore(rgba, task="inpaint", **STEPS)
    assert restored.shape == rgba.shape and report.task["holes_from_alpha"]
    assert (restored[:, :, 3] == 255).all()  # the filled pixels are opaque now


def test_a_reference_gives_psnr_on_the_output_itself():
    clean = noisy((256, 256, 3), np.float32, seed=1)
    restored, report = oes_fast.restore(clean, clean=clean, **STEPS)
    assert report.reference and len(report.psnr) == 2  # steps 0 and 1
    expected = oes_fast.metrics.psnr(torch.from_numpy(restored).permute(2, 0, 1)[None].float(),
                                     torch.from_numpy(clean).permute(2, 0, 1)[None])
    assert report.final_psnr == pytest.approx(float(expected), abs=1e-3)
    # by default the result is the outputs' moving average; the last output's PSNR is kept beside it
    assert report.settings["smoothing"] == oes_fast.restoration.DEFAULT_SMOOTHING == 0.99
    assert len(report.raw_psnr) == 2 and report.raw_psnr[0] == report.psnr[0] and report.raw_psnr[1] != report.psnr[1]
    last, last_report = oes_fast.restore(clean, clean=clean, smoothing=0, **STEPS)
    assert last_report.raw_psnr == [] and last_report.psnr == report.raw_psnr
    assert not np.array_equal(last, restored)


@pytest.mark.parametrize("case, kwargs, message", [
    ("holes of another size", dict(task="inpaint", holes=np.ones((10, 10))), "holes mask is 10x10 but the image is 256x256"),
    ("every pixel missing", dict(task="inpaint", holes=np.ones((256, 256))), "marks every pixel missing"),
    ("no pixel missing", dict(task="inpaint", holes=np.zeros((256, 256))), "marks no pixel missing"),
    ("holes with denoise", dict(task="denoise", holes=np.ones((256, 256))), "holes are for inpaint only"),
    ("inpaint without holes", dict(task="inpaint"), "inpaint needs the missing pixels"),
    ("reference of another size", dict(clean=np.zeros((128, 128, 3), np.uint8)), "reference (clean) image is 128x128"),
    ("unknown task", dict(task="deblur"), "task must be one of"),
    ("float out of range", dict(image=np.full((256, 256), 2.0)), "float values must lie in [0, 1]"),
    ("NaN", dict(image=np.full((256, 256), np.nan)), "NaN"),
    ("five channels", dict(image=np.zeros((256, 256, 5), np.uint8)), "channels"),
    ("smoothing of 1", dict(smoothing=1.0), "smoothing must be in [0, 1)"),
    ("noise level of 2", dict(noise_level=2.0), "noise_level must be 'auto', 'off' or a standard deviation"),
    ("noise level by name", dict(noise_level="high"), "noise_level must be"),
])
def test_bad_input_is_refused_with_a_message(case, kwargs, message):
    kwargs = {"image": noisy((256, 256, 3)), **kwargs}
    with pytest.raises(ValueError, match=_escape(message)):
        oes_fast.restore(**kwargs, **STEPS)


def test_denoising_fits_down_to_the_noise_level_it_estimates():
    ramp = np.linspace(0.3, 0.7, 256)
    smooth = np.repeat(((ramp[None, :] + ramp[:, None]) / 2)[:, :, None], 3, axis=2)
    image = np.clip(smooth + 0.05 * np.random.default_rng(0).standard_normal(smooth.shape), 0, 1)
    _, report = oes_fast.restore(image, **STEPS)
    assert report.settings["noise_level"] == restoration.DEFAULT_NOISE_LEVEL == "auto"
    expected = oes_fast.metrics.noise_sigma(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    assert report.noise == dict(sigma=expected, source="estimated from the image (metrics.noise_sigma)")
    assert report.noise["sigma"] == pytest.approx(0.05, rel=0.05)
    assert report.to_dict()["noise"] == report.noise
    _, report = oes_fast.restore(image, noise_level="off", **STEPS)
    assert report.noise == dict(sigma=0.0, source="off")
    _, report = oes_fast.restore(image, noise_level=0.07, **STEPS)
    assert report.noise == dict(sigma=0.07, source="given")
    holes = np.zeros((256, 256), dtype=bool)
    holes[:20] = True
    _, report = oes_fast.restore(image, task="inpaint", holes=holes, **STEPS)
    assert report.noise["sigma"] == 0.0 and report.noise["source"].startswith("off (auto")


def test_opaque_alpha_is_not_holes():
    rgba = noisy((256, 256, 4))
    rgba[:, :, 3] = 255
    with pytest.raises(ValueError, match="alpha channel but no transparent pixel"):
        oes_fast.restore(rgba, task="inpaint", **STEPS)


def test_a_run_larger_than_memory_is_refused_before_it_starts():
    # x8 super-resolution of a 2048x2048 image: a 16384x16384 network output, hundreds of GB
    image = np.zeros((2048, 2048, 3), dtype=np.uint8)
    with pytest.raises(restoration.NotEnoughMemory, match=r"not enough memory: restoring at 16384x16384.*smaller factor"):
        oes_fast.restore(image, task="superres", factor=8, **STEPS)


def test_the_estimate_scales_the_traced_peaks_with_the_pixels():
    small = restoration.prepare(noisy((256, 256, 3)))
    large = restoration.prepare(noisy((512, 512, 3)))
    a = restoration.estimate_cost(small, None, train_steps=10, time_steps=False)
    b = restoration.estimate_cost(large, None, train_steps=10, time_steps=False)
    assert a.bytes_per_pixel > 100 and b.bytes_per_pixel == a.bytes_per_pixel
    assert b.peak_bytes - a.peak_bytes == pytest.approx(a.bytes_per_pixel * (512**2 - 256**2), rel=1e-6)
    timed = restoration.estimate_cost(small, None, train_steps=10)
    assert timed.timed and timed.seconds_per_step > 0
    assert timed.seconds == pytest.approx(timed.setup_seconds + 10 * timed.seconds_per_step)


def test_reflect_pad_any_amount_and_unfit():
    x = torch.rand(1, 3, 5, 3)
    y = reflect_pad(x, 7, 8, 9, 10)
    assert y.shape == (1, 3, 20, 22) and torch.equal(y[:, :, 7:12, 9:12], x)
    # one round reflects: the row above the image is its second row
    assert torch.equal(y[:, :, 6, 9:12], x[:, :, 1])
    out, info = fit_to_network(torch.rand(1, 1, 10, 300), 64, 256, mode="pad")
    assert out.shape == (1, 1, 256, 320) and unfit(out, info).shape == (1, 1, 10, 300)


def _escape(text):
    import re

    return re.escape(text)


def test_the_report_names_the_bundled_mask():
    _, report = oes_fast.restore(noisy((256, 256, 3)), **STEPS)
    assert report.mask["source"] == "bundled: bundled_density0.05.safetensors"
    assert report.settings["density"] == "auto" and report.mask["healthy"]
    # a photo nearer 512x512 pixels gets the mask searched at 512x512 (500x420 runs padded to 512x448)
    _, report = oes_fast.restore(noisy((420, 500, 3)), **STEPS)
    assert report.mask["source"] == "bundled: bundled_density0.05_512.safetensors"


def test_a_density_picks_that_bundled_mask_or_is_refused():
    _, report = oes_fast.restore(noisy((256, 256, 3)), density=0.025, **STEPS)
    assert report.mask["source"] == "bundled: bundled_density0.025_vectors.safetensors"
    with pytest.raises(ValueError, match="no bundled mask at density 0.03"):
        oes_fast.restore(noisy((256, 256, 3)), density=0.03, **STEPS)
    with pytest.raises(ValueError, match="density must be 'auto' or in"):
        oes_fast.restore(noisy((256, 256, 3)), density=0.0, **STEPS)
