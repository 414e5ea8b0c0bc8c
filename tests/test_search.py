"""The mask search against the reference step, checkpoints, and mask health."""
import pytest
import torch

import oes_fast
from oes_fast import reference, rng
from oes_fast.flat import FlatLayout


def tiny_model(seed=0):
    return oes_fast.models.skip(seed=seed, in_channels=4, channels_down=(4, 8), channels_up=(4, 8),
                                channels_skip=(0, 0))


def tiny_problem(dtype=torch.float64):
    model = tiny_model().to(dtype)
    side = model.min_side
    z = oes_fast.models.dip_input(4, side, side, seed=1).to(dtype)
    y = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return model, z, y


def test_search_steps_equal_reference_steps():
    # Three steps of the fused search equal three reference steps with the uniforms drawn at the
    # documented offsets: stream_seed(seed, "search"), offset step * n + j.
    model, z, y = tiny_problem()
    density, seed, steps = 0.3, 5, 3
    result = oes_fast.search(model, z, y, density=density, steps=steps, seed=seed, kl=1e-3, progress=False)

    layout = FlatLayout.from_model(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = {n: torch.zeros_like(p) for n, p in weights.items()}
    state, losses = {}, []
    noise_seed = rng.stream_seed(seed, "search")
    for step in range(steps):
        u_flat = reference.philox_uniform(noise_seed, step * layout.numel + torch.arange(layout.numel))
        uniforms = layout.views(u_flat)
        loss, logits = reference.search_step(model, weights, logits, uniforms, z, y, density, state, kl=1e-3)
        losses.append(loss.item())
    for name in logits:
        torch.testing.assert_close(result.logits[name].double(), logits[name], rtol=1e-9, atol=1e-12)
    assert result.losses == pytest.approx(losses, rel=1e-10)
    assert result.mask.kept == round(density * layout.numel)


def test_search_resume_equals_uninterrupted(tmp_path):
    model, z, y = tiny_problem(torch.float32)
    full = oes_fast.search(model, z, y, density=0.2, steps=6, progress=False)
    path = tmp_path / "search.ckpt"
    oes_fast.search(model, z, y, density=0.2, steps=4, checkpoint=path, checkpoint_every=2, progress=False)
    resumed = oes_fast.search(model, z, y, density=0.2, steps=6, checkpoint=path, resume=True, progress=False)
    assert resumed.losses == full.losses
    for name in full.logits:
        assert torch.equal(resumed.logits[name], full.logits[name])
    assert torch.equal(resumed.mask.to_flat(), full.mask.to_flat())


def test_search_resume_refuses_other_settings(tmp_path):
    model, z, y = tiny_problem(torch.float32)
    path = tmp_path / "search.ckpt"
    oes_fast.search(model, z, y, density=0.2, steps=2, checkpoint=path, progress=False)
    with pytest.raises(oes_fast.checkpoint.CheckpointError, match="density"):
        oes_fast.search(model, z, y, density=0.3, steps=4, checkpoint=path, resume=True, progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model, z, y = tiny_problem(torch.float32)
    path = tmp_path / "search.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(oes_fast.checkpoint.CheckpointError, match="not a readable checkpoint"):
        oes_fast.search(model, z, y, density=0.2, steps=2, checkpoint=path, resume=True, progress=False)


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5, float("nan")])
def test_search_rejects_bad_density(density):
    model, z, y = tiny_problem(torch.float32)
    with pytest.raises(ValueError, match="density"):
        oes_fast.search(model, z, y, density=density, steps=1, progress=False)


def test_search_rejects_nan_target():
    model, z, y = tiny_problem(torch.float32)
    y[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        oes_fast.search(model, z, y, density=0.1, steps=1, progress=False)


def test_mask_records_its_weights_and_input_seeds():
    model, z, y = tiny_problem(torch.float32)
    result = oes_fast.search(model, z, y, density=0.5, steps=1, z_seed=1, progress=False)
    assert result.mask.seed == 0 and result.mask.z_seed == 1
    assert result.mask.architecture == model.config


def test_health_flags_a_disconnecting_mask():
    model = tiny_model()
    flat = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.bool)
    mask = oes_fast.masks.from_flat(model, flat)
    assert oes_fast.masks.health(mask, model).ok
    mask.tensors["down.1.bn1.weight"][:] = False
    report = oes_fast.masks.health(mask, model)
    assert not report.ok and "down.1.bn1" in report.message
    side = model.min_side
    z, y = oes_fast.models.dip_input(4, side, side), torch.rand(1, 3, side, side)
    with pytest.raises(ValueError, match="disconnects"):
        oes_fast.train_sparse(model, mask, z, y, steps=1, progress=False)
    oes_fast.train_sparse(model, mask, z, y, steps=1, progress=False, allow_disconnected=True)


def test_fused_engine_follows_the_unfused_trajectory():
    # on a CPU the fused op's kernel is gumbel_mask + conv: the engines differ only in where the
    # chain rule to the logits is rounded (conv backward or logit_adam_step_), an ulp at most
    model, z, y = tiny_problem(torch.float32)
    unfused = oes_fast.search(model, z, y, density=0.3, steps=3, kl=1e-3, progress=False)
    fused = oes_fast.search(model, z, y, density=0.3, steps=3, kl=1e-3, engine="fused", progress=False)
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(unfused.losses), rtol=1e-6, atol=0)
    for name in unfused.logits:
        torch.testing.assert_close(fused.logits[name], unfused.logits[name], rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="engine"):
        oes_fast.search(model, z, y, density=0.3, steps=1, engine="warp", progress=False)


@pytest.mark.parametrize("skip_channels", [(0, 0), (2, 0)])
def test_recompute_gives_the_same_search(skip_channels):
    # the blocks run again in the backward with the same masks (counter-based noise) and batch
    # norm's running statistics put back: the same logits, losses and statistics to the bit
    runs = []
    for recompute in (False, True):
        model = oes_fast.models.skip(seed=0, in_channels=4, channels_down=(4, 8), channels_up=(4, 8),
                                     channels_skip=skip_channels)
        side = model.min_side
        z = oes_fast.models.dip_input(4, side, side, seed=1)
        y = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        result = oes_fast.search(model, z, y, density=0.3, steps=3, kl=1e-3, engine="fused", recompute=recompute,
                                 progress=False)
        runs.append((result, [b.clone() for b in model.buffers()]))
    (plain, plain_buffers), (recomputed, recomputed_buffers) = runs
    assert plain.losses == recomputed.losses
    assert max(t.abs().max() for t in plain.logits.values()) > 0.01  # the logits moved
    for name in plain.logits:
        assert torch.equal(plain.logits[name], recomputed.logits[name]), name
    assert int(recomputed_buffers[-1]) == 3  # num_batches_tracked counts each step once
    for a, b in zip(plain_buffers, recomputed_buffers):
        assert torch.equal(a, b)


def test_recompute_needs_the_fused_engine_and_blocks():
    model, z, y = tiny_problem(torch.float32)
    with pytest.raises(ValueError, match="recompute=True needs engine='fused'"):
        oes_fast.search(model, z, y, density=0.3, steps=1, recompute=True, progress=False)
    decoder = oes_fast.models.deep_decoder(seed=0, channels=4, num_up=1)
    zd = torch.rand(decoder.input_shape(8, 8))
    with pytest.raises(ValueError, match="no hourglass blocks"):
        oes_fast.search(decoder, zd, torch.rand(1, 3, 8, 8), density=0.3, steps=1, engine="fused", recompute=True,
                        progress=False)


def test_health_follows_channel_paths():
    # every layer keeps something, but a random 5 % never lines up kept weights with kept
    # batch-norm scales along a path: no signal reaches the output
    model = oes_fast.models.skip_oes(seed=0)
    mask = oes_fast.prune.random(model, 0.05)
    assert all(row["kept"] for row in mask.layer_stats() if row["name"].endswith("weight"))
    report = oes_fast.masks.health(mask, model)
    assert not report.ok and "no channel path" in report.message
    # the message names the first few layers and counts the rest
    n = len(report.disconnected)
    assert n > 3 and report.message.startswith(f"nothing kept in {n} layers: ")
    assert report.message.endswith(f" and {n - 3} more") and report.disconnected[0] in report.message
    assert oes_fast.masks.health(oes_fast.masks.bundled(), model).ok
