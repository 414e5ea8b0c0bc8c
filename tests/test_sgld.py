"""SGLD-DIP (train_sgld): seeded, noise of variance 2 * lr per step (or the given noise_std),
exact resume, and the result is the mean of the outputs from `average_from` on."""
import pytest
import torch
from torch import nn

import oes_fast
import oes_fast.train as train_module
from oes_fast import metrics, tasks
from oes_fast.train import train_sgld


def tiny_model(dtype=torch.float32):
    model = oes_fast.models.skip(seed=0, in_channels=4, channels_down=(4, 8), channels_up=(4, 8),
                                 channels_skip=(0, 0))
    return model.to(dtype)


def problem(dtype=torch.float32):
    model = tiny_model(dtype)
    side = model.min_side
    clean = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(dtype)
    z = oes_fast.models.dip_input(4, side, side, seed=1).to(dtype)
    y = tasks.Denoise(0.1).degrade(clean, seed=0)
    return model, z, y, clean


def test_deterministic_for_a_seed_and_different_across_seeds():
    model, z, y, _ = problem()
    a = train_sgld(model, z, y, steps=4, seed=1, progress=False)
    b = train_sgld(model, z, y, steps=4, seed=1, progress=False)
    c = train_sgld(model, z, y, steps=4, seed=2, progress=False)
    assert a.losses == b.losses and torch.equal(a.image, b.image)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.image, c.image)
    # the first loss is before any noise; later ones see different noise
    assert a.losses[0] == c.losses[0] and a.losses[1:] != c.losses[1:]


class IdleParameter(nn.Module):
    """A generator with a parameter its output does not depend on (gradient exactly zero, so
    Adam never moves it): only the SGLD noise changes `idle`."""

    def __init__(self, n=40000):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.idle = nn.Parameter(torch.zeros(n))

    def forward(self, z):
        return self.scale * z + 0.0 * self.idle.sum()


@pytest.mark.parametrize("lr,steps,noise_std", [(0.5, 1, None), (0.5, 3, None), (0.02, 2, None), (0.01, 2, 0.02)])
def test_noise_per_step_has_variance_two_lr(lr, steps, noise_std):
    model = IdleParameter()
    z = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fit = train_sgld(model, z, y, steps=steps, lr=lr, seed=7, noise_std=noise_std, progress=False)
    change = (fit.model.idle - model.idle).detach().double()
    per_step = 2 * lr if noise_std is None else noise_std**2
    n, expected = change.numel(), per_step * steps  # independent steps: variances add
    var = change.var().item()
    # the sample variance has a relative standard deviation sqrt(2 / n) = 0.7 %; allow ~5 of them
    assert var == pytest.approx(expected, rel=5 * (2 / n) ** 0.5)
    assert abs(change.mean().item()) < 5 * (expected / n) ** 0.5
    kurtosis = ((change - change.mean()) ** 4).mean().item() / var**2
    assert kurtosis == pytest.approx(3.0, abs=5 * (24 / n) ** 0.5)  # Gaussian
    assert torch.equal(model.idle, torch.zeros_like(model.idle))  # the model passed in is untouched


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    model, z, y, clean = problem()
    kw = dict(steps=8, clean=clean, record_every=2, average_from=3, seed=5, progress=False)
    full = train_sgld(model, z, y, **kw)
    path = tmp_path / "sgld.ckpt"
    calls = []
    original = train_module.data_loss

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # during step 5: the last checkpoint is at step 4, inside the averaging
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "data_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_sgld(model, z, y, checkpoint=path, checkpoint_every=2, **kw)
    monkeypatch.setattr(train_module, "data_loss", original)
    resumed = train_sgld(model, z, y, checkpoint=path, resume=True, **kw)
    assert resumed.losses == full.losses
    assert resumed.steps == full.steps and resumed.psnr == full.psnr and resumed.ssim == full.ssim
    assert torch.equal(resumed.image, full.image)
    for (name, p), q in zip(resumed.model.named_parameters(), full.model.parameters()):
        assert torch.equal(p, q), name


class Recording(nn.Module):
    """Wraps a generator and keeps a copy of every output (the copy made by train_sgld keeps its own list)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.outputs = []

    def forward(self, z):
        out = self.inner(z)
        self.outputs.append(out.detach().clone())
        return out


@pytest.mark.parametrize("steps,average_from", [(7, 3), (6, None), (4, 0)])
def test_result_is_the_mean_of_the_outputs_from_average_from(steps, average_from):
    model, z, y, clean = problem(torch.float64)
    fit = train_sgld(Recording(model), z, y, steps=steps, average_from=average_from, clean=clean,
                     record_every=100, seed=3, progress=False)
    outputs = fit.model.outputs
    assert len(outputs) == steps  # one forward per step, none after (the result is the average)
    start = steps // 2 if average_from is None else average_from
    expected = torch.stack(outputs[start:]).mean(0)
    torch.testing.assert_close(fit.image, expected, rtol=1e-12, atol=1e-14)
    # PSNR is measured on the average too
    assert fit.steps[-1] == steps
    assert fit.psnr[-1] == pytest.approx(float(metrics.psnr(expected.float(), clean.float())), rel=1e-6)


def test_without_noise_it_is_dense_dip():
    model, z, y, clean = problem()
    sgld = train_sgld(model, z, y, steps=5, noise_std=0.0, average_from=5, clean=clean, record_every=1,
                      progress=False)
    dense = oes_fast.train_dense(model, z, y, steps=5, clean=clean, record_every=1, progress=False)
    assert sgld.losses == dense.losses and torch.equal(sgld.image, dense.image) and sgld.psnr == dense.psnr
    with pytest.raises(ValueError, match="noise_std"):
        train_sgld(model, z, y, steps=1, noise_std=-1.0, progress=False)
