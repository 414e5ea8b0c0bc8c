"""Sparse-DIP / dense DIP training: pruned weights stay zero, resume is exact, every degradation
trains, masks transfer with the seeds that rebuild their weights."""
import copy

import pytest
import torch

import oes_fast
from oes_fast import tasks


def tiny_model(seed=0):
    return oes_fast.models.skip(seed=seed, in_channels=4, channels_down=(4, 8), channels_up=(4, 8),
                                channels_skip=(0, 0))


def tiny_images(model, seed=0):
    side = model.min_side
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(1, 3, side, side, generator=g)
    z = oes_fast.models.dip_input(4, side, side, seed=1)
    return z, clean


def half_mask(model, seed=0):
    return oes_fast.prune.random(model, 0.5, scope="layer", seed=seed)


def test_pruned_weights_stay_exactly_zero():
    model = tiny_model()
    z, clean = tiny_images(model)
    mask = half_mask(model)
    y = tasks.Denoise(0.1).degrade(clean, seed=0)
    fit = oes_fast.train_sparse(model, mask, z, y, steps=5, progress=False)
    before = dict(model.named_parameters())
    for name, p in fit.model.named_parameters():
        assert torch.all(p[~mask[name]] == 0), name
    # kept weights did train (a conv bias right before a batch norm gets no gradient: skip those)
    assert torch.any(fit.model.down[0].conv1.weight[mask["down.0.conv1.weight"]]
                     != before["down.0.conv1.weight"][mask["down.0.conv1.weight"]])
    # the model passed in is left as it was
    assert torch.equal(dict(model.named_parameters())["down.0.conv1.weight"],
                       dict(tiny_model().named_parameters())["down.0.conv1.weight"])


def test_sparse_training_from_the_same_initial_weights():
    model = tiny_model()
    z, clean = tiny_images(model)
    mask = half_mask(model)
    fit = oes_fast.train_sparse(model, mask, z, clean, steps=0, progress=False)
    for name, p in fit.model.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name] * mask[name]), name


def test_resume_equals_uninterrupted(tmp_path):
    model = tiny_model()
    z, clean = tiny_images(model)
    mask = half_mask(model)
    y = tasks.Denoise(0.1).degrade(clean, seed=0)
    full = oes_fast.train_sparse(model, mask, z, y, steps=6, clean=clean, record_every=2, progress=False)
    path = tmp_path / "train.ckpt"
    oes_fast.train_sparse(model, mask, z, y, steps=4, clean=clean, record_every=2, checkpoint=path,
                          checkpoint_every=2, progress=False)
    resumed = oes_fast.train_sparse(model, mask, z, y, steps=6, clean=clean, record_every=2, checkpoint=path,
                                    resume=True, progress=False)
    assert resumed.losses == full.losses
    assert resumed.psnr == full.psnr
    assert torch.equal(resumed.image, full.image)


def test_output_smoothing_is_the_moving_average_of_the_outputs(tmp_path):
    model = tiny_model()
    z, clean = tiny_images(model)
    mask = half_mask(model)
    y = tasks.Denoise(0.1).degrade(clean, seed=0)
    beta, steps = 0.6, 5
    plain = oes_fast.train_sparse(model, mask, z, y, steps=steps, clean=clean, record_every=2, progress=False)
    smooth = oes_fast.train_sparse(model, mask, z, y, steps=steps, clean=clean, record_every=2, progress=False,
                                   smoothing=beta)
    # training is untouched: the same losses, and the raw curve is the plain run's curve
    assert smooth.losses == plain.losses and smooth.raw_psnr == plain.psnr
    # the result is the moving average of the outputs of every step and of the final weights
    net = mask.apply_(copy.deepcopy(model))
    opt = torch.optim.Adam(list(net.parameters()), lr=0.01)
    keep = [mask[n].to(p.dtype) for n, p in net.named_parameters()]
    expected = None
    for _ in range(steps):
        opt.zero_grad()
        out = net(z)
        frame = out.detach()
        expected = frame.clone() if expected is None else beta * expected + (1 - beta) * frame
        torch.nn.functional.mse_loss(out, y).backward()
        for p, k in zip(net.parameters(), keep):
            p.grad.mul_(k)
        opt.step()
    with torch.no_grad():
        expected = beta * expected + (1 - beta) * net(z)
    torch.testing.assert_close(smooth.image, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(smooth.image, plain.image)
    assert smooth.psnr[-1] == pytest.approx(float(oes_fast.metrics.psnr(smooth.image, clean)))
    # resume continues the average exactly
    path = tmp_path / "train.ckpt"
    oes_fast.train_sparse(model, mask, z, y, steps=2, clean=clean, record_every=2, checkpoint=path,
                          checkpoint_every=2, progress=False, smoothing=beta)
    resumed = oes_fast.train_sparse(model, mask, z, y, steps=steps, clean=clean, record_every=2, checkpoint=path,
                                    resume=True, progress=False, smoothing=beta)
    assert resumed.psnr == smooth.psnr and resumed.raw_psnr == smooth.raw_psnr
    assert torch.equal(resumed.image, smooth.image)
    with pytest.raises(ValueError, match="smoothing"):
        oes_fast.train_dense(model, z, y, steps=1, smoothing=1.0, progress=False)


def test_noise_level_fits_down_to_the_noise_variance_and_no_further(tmp_path):
    model = tiny_model()
    z, clean = tiny_images(model)
    y = tasks.Denoise(0.1).degrade(clean, seed=0)
    steps = 6
    plain = oes_fast.train_dense(model, z, y, steps=steps, progress=False)
    # a level whose variance lies between the losses: the gradient is the loss's above it, zero below
    level = (sum(plain.losses[:3]) / 3) ** 0.5
    fit = oes_fast.train_dense(model, z, y, steps=steps, progress=False, noise_level=level)
    net = copy.deepcopy(model)
    opt = torch.optim.Adam(list(net.parameters()), lr=0.01)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(z), y)
        torch.clamp_min(loss - level**2, 0).backward()
        opt.step()
        losses.append(loss.item())
    assert fit.losses == pytest.approx(losses, rel=1e-5)  # the recorded losses are the plain losses
    assert any(v < level**2 for v in fit.losses) and fit.losses != pytest.approx(plain.losses, rel=1e-6)
    # a level above every loss: nothing moves
    still = oes_fast.train_dense(model, z, y, steps=3, progress=False, noise_level=1.0)
    for (name, p), q in zip(still.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    # 0 is the plain loss; a checkpoint of another level is refused on resume
    assert oes_fast.train_dense(model, z, y, steps=steps, progress=False, noise_level=0.0).losses == plain.losses
    path = tmp_path / "train.ckpt"
    mask = half_mask(model)
    oes_fast.train_sparse(model, mask, z, y, steps=2, checkpoint=path, checkpoint_every=2, progress=False,
                          noise_level=level)
    with pytest.raises(oes_fast.checkpoint.CheckpointError):
        oes_fast.train_sparse(model, mask, z, y, steps=4, checkpoint=path, resume=True, progress=False)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="noise_level"):
            oes_fast.train_dense(model, z, y, steps=1, noise_level=bad, progress=False)


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    model = tiny_model()
    z, clean = tiny_images(model)
    path = tmp_path / "train.ckpt"
    oes_fast.train_dense(model, z, clean, steps=2, checkpoint=path, progress=False)
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        oes_fast.train_dense(model, z, clean, steps=4, checkpoint=path, checkpoint_every=1, resume=True,
                             progress=False)
    assert path.read_bytes() == good
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("task", [tasks.Denoise(0.1), tasks.Inpaint(kind="bernoulli", drop=0.5),
                                  tasks.Inpaint(kind="block", drop=0.2), tasks.SuperRes(factor=4)])
def test_every_degradation_trains(task):
    model = tiny_model()
    z, clean = tiny_images(model)
    y = task.degrade(clean, seed=0)
    fit = oes_fast.train_dense(model, z, y, steps=30, clean=clean, degradation=task, record_every=10, progress=False)
    assert fit.image.shape == clean.shape
    assert fit.losses[-1] < fit.losses[0]
    assert len(fit.psnr) == len(fit.steps) and fit.steps[-1] == 30
    # the last record is the returned image's PSNR, and the fit raised it from the start
    assert fit.final_psnr == pytest.approx(float(oes_fast.metrics.psnr(fit.image, clean)), abs=1e-9)
    assert fit.psnr[-1] > fit.psnr[0] + 0.5


def test_peak_and_final_of_a_psnr_curve():
    curve = oes_fast.train.TrainResult(image=torch.zeros(1), losses=[0.3, 0.2, 0.1], model=None, steps=[0, 10, 20],
                                       psnr=[11.0, 14.0, 12.5], ssim=[0.1, 0.3, 0.2])
    assert (curve.peak_psnr, curve.peak_step, curve.final_psnr) == (14.0, 10, 12.5)
    summary = curve.summary()
    assert (summary["peak_psnr"], summary["peak_step"], summary["final_psnr"], summary["final_ssim"]) == (14.0, 10,
                                                                                                           12.5, 0.2)


def test_search_accepts_a_degradation():
    model = tiny_model()
    z, clean = tiny_images(model)
    task = tasks.Inpaint(kind="bernoulli", drop=0.5)
    y = task.degrade(clean, seed=0)
    result = oes_fast.search(model, z, y, density=0.3, steps=2, degradation=task, progress=False)
    assert result.mask.meta["degradation"]["name"] == "inpaint"


def test_mask_transfers_with_its_seeds(tmp_path):
    # a mask found on image A, saved, reloaded and applied to a NEW image with the same weights
    model = tiny_model(seed=7)
    z, clean_a = tiny_images(model, seed=0)
    found = oes_fast.search(model, z, clean_a, density=0.4, steps=3, z_seed=1, progress=False)
    path = tmp_path / "mask.safetensors"
    oes_fast.masks.save(found.mask, path)
    mask = oes_fast.masks.load(path)
    rebuilt = oes_fast.models.build(mask.architecture, seed=mask.seed)
    for (name, p), q in zip(model.named_parameters(), rebuilt.parameters()):
        assert torch.equal(p, q), name
    side = rebuilt.min_side
    z_again = oes_fast.models.dip_input(4, side, side, seed=mask.z_seed)
    assert torch.equal(z_again, z)
    _, clean_b = tiny_images(rebuilt, seed=1)
    task = tasks.SuperRes(factor=4)  # and another degradation
    fit = oes_fast.train_sparse(rebuilt, mask, z_again, task.degrade(clean_b, seed=0), steps=3, clean=clean_b,
                                degradation=task, progress=False, allow_disconnected=True)
    assert fit.image.shape == clean_b.shape


def test_mask_for_another_model_is_refused():
    model = tiny_model()
    other = oes_fast.models.skip(seed=0, in_channels=4, channels_down=(4, 4), channels_up=(4, 4), channels_skip=(0, 0))
    z, clean = tiny_images(model)
    with pytest.raises(oes_fast.masks.MaskMismatchError, match="down.1.conv1.weight"):
        oes_fast.train_sparse(model, half_mask(other), z, clean, steps=1, progress=False)


def test_nan_target_is_refused():
    model = tiny_model()
    z, clean = tiny_images(model)
    clean[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="y contains NaN or Inf"):
        oes_fast.train_dense(model, z, clean, steps=1, progress=False)


def test_deep_decoder_baseline_trains():
    model = oes_fast.models.deep_decoder(channels=8, num_up=3, seed=0)
    clean = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = oes_fast.models.dip_input(*model.input_shape(32, 32)[1:], seed=0)
    fit = oes_fast.train_dense(model, z, clean, steps=20, clean=clean, record_every=5, progress=False)
    assert fit.losses[-1] < fit.losses[0] and fit.image.shape == clean.shape


def test_sparse_engine_trains_like_the_dense_engine():
    # the same Sparse-DIP through the compacted sparse generator and through the masked dense net
    model = tiny_model()
    z, clean = tiny_images(model)
    mask = oes_fast.prune.magnitude(model, 0.3)
    y = tasks.Denoise(0.1).degrade(clean, seed=0)
    dense = oes_fast.train_sparse(model, mask, z, y, steps=4, engine="dense", progress=False, allow_disconnected=True)
    sparse = oes_fast.train_sparse(model, mask, z, y, steps=4, engine="sparse", progress=False,
                                   allow_disconnected=True)
    assert type(sparse.model).__name__ == "SparseGenerator"
    assert sparse.losses == pytest.approx(dense.losses, rel=1e-4)
    torch.testing.assert_close(sparse.image, dense.image, rtol=1e-3, atol=1e-4)
    exported = sparse.model.dense_state_dict()
    for name, p in exported.items():
        if name in mask.tensors:
            assert torch.all(p[~mask[name]] == 0), name


def test_auto_engine_choice():
    from oes_fast.sparse import CROSSOVER_DENSITY
    from oes_fast.train import choose_engine

    model = tiny_model()
    # a mask below the crossover that leaves the network connected (a random 5 % cuts this one:
    # train_sparse then passes healthy=False, and "auto" never gives the sparse engine)
    low, high = oes_fast.prune.magnitude(model, 0.3), oes_fast.prune.random(model, 0.9)
    assert oes_fast.masks.health(low, model).ok and low.density <= CROSSOVER_DENSITY
    assert choose_engine("auto", low, model) == "sparse"
    assert choose_engine("auto", high, model) == "dense"
    assert choose_engine("auto", low, model, "cuda") == "dense"
    cut = oes_fast.prune.random(model, 0.05)
    assert not oes_fast.masks.health(cut, model).ok
    assert choose_engine("auto", cut, model, healthy=False) == "dense"
    # train_sparse takes the engine "auto" resolves to, with the mask's health
    z, clean = tiny_images(model)
    fit = oes_fast.train_sparse(model, low, z, clean, steps=1, progress=False)
    assert type(fit.model).__name__ == "SparseGenerator"
    fit = oes_fast.train_sparse(model, cut, z, clean, steps=1, progress=False, allow_disconnected=True)
    assert type(fit.model).__name__ != "SparseGenerator"
    with_skips = oes_fast.models.skip(seed=0, in_channels=4, channels_down=(4, 8), channels_up=(4, 8),
                                      channels_skip=(2, 2))
    assert choose_engine("auto", oes_fast.prune.random(with_skips, 0.05), with_skips) == "dense"
    with pytest.raises(ValueError, match="engine"):
        oes_fast.train_sparse(model, low, *tiny_images(model), steps=1, engine="turbo", progress=False)


@pytest.mark.parametrize("isas, channels_last", [(["baseline", "avx2", "avx512"], True), (["baseline", "avx2"], False)])
def test_dense_generators_take_the_layout_measured_faster(monkeypatch, isas, channels_last):
    # channels-last activations where the processor has AVX-512, contiguous ones on AVX2 (and
    # always contiguous for the sparse generator, whose kernels index contiguous activations)
    from oes_fast import _C, loop

    monkeypatch.setattr(_C, "cpu_isas_supported", lambda: isas)
    model = tiny_model()
    z, _ = tiny_images(model)
    x = loop.network_input(model, z)
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last and torch.equal(x, z)
    model.channels_last_input = False
    assert loop.network_input(model, z).is_contiguous()
