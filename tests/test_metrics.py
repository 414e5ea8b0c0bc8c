"""PSNR and SSIM against scikit-image."""
import math

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from oes_fast.metrics import psnr, ssim



def test_psnr_known_mse():
    clean = torch.rand(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.8
    assert psnr(clean + 0.1, clean) == pytest.approx(20.0, abs=1e-9)  # mse 0.01 -> 20 dB
    assert psnr(clean + 0.01, clean) == pytest.approx(40.0, abs=1e-9)
    assert psnr(clean, clean) == math.inf


def test_psnr_matches_skimage():
    g = torch.Generator().manual_seed(1)
    x, clean = torch.rand(1, 3, 20, 24, generator=g), torch.rand(1, 3, 20, 24, generator=g)
    expected = peak_signal_noise_ratio(clean.double().numpy(), x.double().numpy(), data_range=1)
    assert psnr(x, clean) == pytest.approx(expected, rel=1e-12)


def test_ssim_identity_and_skimage():
    g = torch.Generator().manual_seed(2)
    clean = torch.rand(1, 3, 32, 32, generator=g)
    assert ssim(clean, clean) == 1.0
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    value = ssim(noisy, clean)
    expected = structural_similarity(noisy[0].permute(1, 2, 0).double().numpy(), clean[0].permute(1, 2, 0).double().numpy(),
                                     data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     channel_axis=2)
    assert 0 < value < 1 and value == pytest.approx(expected, rel=1e-12)
    gray = clean[:, :1]
    assert ssim(gray, gray) == 1.0 and ssim(noisy[:, :1], gray) < 1


def test_metric_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"shape \(1, C, H, W\)"):
        ssim(torch.rand(3, 16, 16), torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_pepper_denoise_metrics(shared_data):
    from oes_fast.images import load_image
    from oes_fast.tasks import Denoise

    clean = load_image(shared_data / "images" / "pepper.png")
    noisy = Denoise(0.1).degrade(clean, 0)
    # sigma 0.1 gives 20 dB before clipping; clipping at 0 and 1 only removes error.
    assert 20.0 <= psnr(noisy, clean) < 21.0
    assert 0.2 < ssim(noisy, clean) < 0.7


def test_noise_sigma_finds_the_level_of_white_noise_on_a_smooth_image():
    from oes_fast.metrics import noise_sigma

    ramp = torch.linspace(0.3, 0.7, 256, dtype=torch.float64)
    smooth = (ramp[None, :] + ramp[:, None]).div(2).expand(1, 3, 256, 256)
    g = torch.Generator().manual_seed(0)
    for sigma in (0.02, 0.05, 0.1):
        noisy = smooth + sigma * torch.randn(smooth.shape, generator=g, dtype=torch.float64)
        assert noise_sigma(noisy) == pytest.approx(sigma, rel=0.05)
        assert noise_sigma(noisy[:, :1].float()) == pytest.approx(sigma, rel=0.05)  # gray, float32
    assert noise_sigma(smooth) < 1e-3


def test_noise_sigma_refuses_what_is_not_an_image():
    from oes_fast.metrics import noise_sigma

    with pytest.raises(ValueError, match=r"shape \(1, C, H, W\)"):
        noise_sigma(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="finite"):
        noise_sigma(torch.full((1, 3, 16, 16), math.nan))
    with pytest.raises(TypeError, match="torch.Tensor"):
        noise_sigma([[0.5]])


def test_noise_sigma_of_noisy_pepper(shared_data):
    from oes_fast.images import load_image
    from oes_fast.metrics import noise_sigma
    from oes_fast.tasks import Denoise

    clean = load_image(shared_data / "images" / "pepper.png")
    # measured: 0.0975 on the noisy 512x512 pepper (sigma 0.1, clipped at 0 and 1), 0.022 on the clean one
    assert noise_sigma(Denoise(0.1).degrade(clean, 0)) == pytest.approx(0.0975, abs=0.003)
    assert noise_sigma(clean) < 0.03
