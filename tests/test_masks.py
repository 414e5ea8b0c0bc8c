"""oes_fast.masks: Mask objects, flat order, top-k hard masks, files."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import oes_fast
from oes_fast import masks, models, reference, rng
from oes_fast.flat import FlatLayout
from oes_fast.masks import Mask, MaskMismatchError


def tiny(seed=0, **overrides):
    options = dict(in_channels=4, channels_down=(4, 4), channels_up=(4, 4), channels_skip=(0, 0))
    options.update(overrides)
    return oes_fast.models.skip(seed=seed, **options)


def random_mask(model, density=0.3, seed=0, **attributes):
    g = torch.Generator().manual_seed(seed)
    n = FlatLayout.from_model(model).numel
    return masks.from_flat(model, torch.rand(n, generator=g) < density, **attributes)


# ------------------------------------------------------------------------------ flat order
def test_flat_round_trip():
    model = tiny()
    layout = FlatLayout.from_model(model)
    g = torch.Generator().manual_seed(1)
    flat = torch.rand(layout.numel, generator=g) < 0.4
    mask = masks.from_flat(model, flat, seed=0)
    assert list(mask) == [n for n, _ in model.named_parameters()]
    for (name, p), offset in zip(model.named_parameters(), layout.offsets):
        assert mask[name].shape == p.shape and mask[name].dtype == torch.bool
        assert torch.equal(mask[name].reshape(-1), flat[offset:offset + p.numel()])
    assert torch.equal(mask.to_flat(), flat)
    assert mask.kept == int(flat.sum()) and mask.numel == layout.numel
    assert mask.density == pytest.approx(float(flat.double().mean()))
    assert mask.sparsity == pytest.approx(1 - mask.density)
    assert mask.architecture == model.config
    again = masks.from_flat(model, mask.to_flat())
    assert all(torch.equal(again[n], mask[n]) for n in mask)


def test_from_flat_rejects_bad_input():
    model = tiny()
    n = FlatLayout.from_model(model).numel
    with pytest.raises(MaskMismatchError, match=f"{n - 1} elements.*{n} parameters"):
        masks.from_flat(model, torch.zeros(n - 1, dtype=torch.bool))
    with pytest.raises(MaskMismatchError):
        masks.from_flat(model, torch.zeros(1, n, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        masks.from_flat(model, torch.zeros(n))
    with pytest.raises(TypeError, match="bool"):
        Mask({"w": torch.zeros(3, dtype=torch.uint8)})


def test_apply_zeroes_pruned_parameters():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = random_mask(model)
    mask.apply_(model)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name] * mask[name]), name


# ------------------------------------------------------------------------------ files
def test_save_load_round_trip(tmp_path):
    model = tiny()
    mask = random_mask(model, seed=3)
    mask.seed, mask.z_seed = 7, 11
    mask.meta.update(image="pepper", steps=12, note="ünïcode ok", nested={"a": [1, 2.5]})
    path = tmp_path / "mask.safetensors"
    masks.save(mask, path)
    assert sorted(os.listdir(tmp_path)) == ["mask.safetensors"]  # no temporary left behind
    loaded = masks.load(path)
    assert list(loaded) == list(mask)
    assert all(torch.equal(loaded[n], mask[n]) for n in mask)
    assert (loaded.seed, loaded.z_seed) == (7, 11)
    assert loaded.architecture == mask.architecture == model.config
    assert loaded.meta == mask.meta
    loaded.check_fits(model)
    assert oes_fast.models.build(loaded.architecture, seed=loaded.seed) is not None
    masks.load(str(path))  # str paths too


def test_save_load_without_optional_attributes(tmp_path):
    mask = Mask({"a": torch.tensor([True, False]), "b": torch.ones(2, 3, dtype=torch.bool)})
    masks.save(mask, tmp_path / "m")
    loaded = masks.load(tmp_path / "m")
    assert loaded.seed is None and loaded.z_seed is None and loaded.architecture is None and loaded.meta == {}
    assert loaded.kept == 7 and list(loaded) == ["a", "b"]


def test_mask_of_other_shape_rejected():
    mask = random_mask(tiny())
    other = tiny(channels_down=(4, 8), channels_up=(4, 8))
    with pytest.raises(MaskMismatchError) as info:
        mask.check_fits(other)
    message = str(info.value)
    # the first parameter that differs: the second level's first conv
    assert "down.1.conv1.weight" in message and "(8, 4, 5, 5)" in message and "(4, 4, 5, 5)" in message
    with pytest.raises(MaskMismatchError):
        mask.apply_(other)


def test_mask_with_missing_parameter_rejected():
    model = tiny()
    mask = random_mask(model)
    names = list(mask)
    without_last = Mask({n: mask[n] for n in names[:-1]})
    with pytest.raises(MaskMismatchError, match="'out.bias'"):
        without_last.check_fits(model)
    without_middle = Mask({n: mask[n] for n in names if n != "down.0.bn1.bias"})
    with pytest.raises(MaskMismatchError, match="down.0.bn1.bias"):
        without_middle.check_fits(model)
    longer = Mask({**mask.tensors, "extra": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(MaskMismatchError, match="'extra'"):
        longer.check_fits(model)


def test_mask_of_other_architecture_rejected(tmp_path):
    mask = random_mask(tiny())
    masks.save(mask, tmp_path / "m.safetensors")
    loaded = masks.load(tmp_path / "m.safetensors")
    same_shapes = tiny(act="ReLU", pad="zero")
    with pytest.raises(MaskMismatchError, match=r"another architecture.*\['act', 'pad'\]"):
        loaded.check_fits(same_shapes)
    with pytest.raises(MaskMismatchError):
        loaded.apply_(same_shapes)


def test_corrupt_files(tmp_path):
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable mask file"):
        masks.load(random_bytes)

    good = tmp_path / "good.safetensors"
    masks.save(random_mask(tiny()), good)
    data = good.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"truncated{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable mask file"):
            masks.load(truncated)

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        masks.load(empty)


def _write(path, metadata, tensors=None):
    tensors = tensors if tensors is not None else {"a": torch.ones(3, dtype=torch.bool)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _good_metadata(**changes):
    metadata = dict(format=masks.FORMAT, format_version=str(masks.FORMAT_VERSION), kept="3", numel="3",
                    density="1.0", order=json.dumps(["a"]), architecture="null", seed="null", z_seed="null",
                    meta="{}")
    metadata.update(changes)
    return {k: v for k, v in metadata.items() if v is not None}


def test_wrong_format_metadata(tmp_path):
    assert masks.load(_write(tmp_path / "ok", _good_metadata())).kept == 3
    with pytest.raises(ValueError, match="not an oes_fast mask file"):
        masks.load(_write(tmp_path / "other", _good_metadata(format="something.else")))
    with pytest.raises(ValueError, match="not an oes_fast mask file"):
        masks.load(_write(tmp_path / "none", {}))
    with pytest.raises(ValueError, match="format version 99"):
        masks.load(_write(tmp_path / "v99", _good_metadata(format_version="99")))
    with pytest.raises(ValueError, match="damaged mask metadata"):
        masks.load(_write(tmp_path / "json", _good_metadata(meta="{not json")))
    with pytest.raises(ValueError, match="damaged mask metadata"):
        masks.load(_write(tmp_path / "noorder", _good_metadata(order=None)))
    with pytest.raises(ValueError, match="parameter list"):
        masks.load(_write(tmp_path / "order", _good_metadata(order=json.dumps(["b"]))))
    with pytest.raises(ValueError, match="keep 3 parameters, the metadata says 2"):
        masks.load(_write(tmp_path / "kept", _good_metadata(kept="2")))
    with pytest.raises(TypeError, match="bool"):
        masks.load(_write(tmp_path / "float", _good_metadata(), {"a": torch.ones(3)}))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        masks.load(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------------------ top-k
def test_topk_keeps_exactly_round_density_n():
    g = torch.Generator().manual_seed(4)
    logits = {"a": torch.randn(7, 11, generator=g), "b": torch.randn(13, generator=g), "c": torch.randn(3, generator=g)}
    n = 7 * 11 + 13 + 3
    for density in (0.01, 0.05, 0.1, 1 / 3, 0.5, 0.999, 1.0):
        mask = masks.topk(logits, density)
        assert mask.kept == round(density * n), density
        assert list(mask) == ["a", "b", "c"] and mask["a"].shape == (7, 11)
        assert mask.meta["density_requested"] == density


def test_topk_picks_largest_logits():
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(500, generator=g)  # distinct values
    layout = FlatLayout.from_shapes({"a": (20, 10), "b": (300,)})
    mask = masks.topk(layout.views(flat), 0.1)
    kept = mask.to_flat()
    assert int(kept.sum()) == 50
    assert float(flat[kept].min()) > float(flat[~kept].max())
    assert torch.equal(kept, flat >= torch.topk(flat, 50).values.min())


def test_topk_flat_with_model():
    model = tiny()
    n = FlatLayout.from_model(model).numel
    g = torch.Generator().manual_seed(6)
    flat = torch.randn(n, generator=g)
    mask = masks.topk(flat, 0.05, model=model, seed=2)
    assert mask.kept == round(0.05 * n) and mask.architecture == model.config
    mask.check_fits(model)
    by_name = masks.topk(FlatLayout.from_model(model).views(flat), 0.05, seed=2)
    assert torch.equal(by_name.to_flat(), mask.to_flat())
    with pytest.raises(TypeError, match="model="):
        masks.topk(flat, 0.05)
    with pytest.raises(MaskMismatchError):
        masks.topk(flat[:-1], 0.05, model=model)


def test_topk_ties_are_seeded():
    # 40 distinct large logits and 400 tied at 0: the last 60 places go to tied entries
    g = torch.Generator().manual_seed(7)
    flat = torch.cat([torch.rand(40, generator=g) + 1, torch.zeros(400)])
    flat = flat[torch.randperm(440, generator=g)]
    logits = {"p": flat}
    a = masks.topk(logits, 100 / 440, seed=0)["p"]
    assert int(a.sum()) == 100 and bool(a[flat > 0].all())
    assert torch.equal(a, masks.topk(logits, 100 / 440, seed=0)["p"])  # deterministic
    b = masks.topk(logits, 100 / 440, seed=1)["p"]
    assert int(b.sum()) == 100 and bool(b[flat > 0].all())
    assert not torch.equal(a, b)  # another seed breaks the ties differently
    # the winners among the tied are those with the largest tie-break keys of the seed
    keys = rng.uniform((440,), rng.stream_seed(1, "topk"))
    tied = flat == 0
    threshold = keys[tied & b].min()
    assert bool((keys[tied & ~b] < threshold).all())


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_topk_invalid_density(density):
    with pytest.raises(ValueError, match="density"):
        masks.topk({"p": torch.randn(10)}, density)


def test_topk_rejects_nan_logits_and_empty_selection():
    with pytest.raises(ValueError, match="NaN"):
        masks.topk({"p": torch.tensor([0.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="keeps no parameter"):
        masks.topk({"p": torch.randn(10)}, 0.01)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5])
def test_topk_matches_reference_hard_mask(seed, density):
    g = torch.Generator().manual_seed(8 + seed)
    # few distinct values (many ties, also at the threshold) and a few distinct ones
    flat = torch.cat([torch.randint(-3, 3, (150,), generator=g).float() / 2, torch.randn(31, generator=g)])
    layout = FlatLayout.from_shapes({"w": (5, 6, 5), "b": (31,)})
    mask = masks.topk(layout.views(flat), density, seed=seed)
    tiebreak = rng.uniform((flat.numel(),), rng.stream_seed(seed, "topk"))
    expected = reference.hard_mask(flat, density, tiebreak)
    assert torch.equal(mask.to_flat(), expected)


# ------------------------------------------------------------------------------ layer stats
def test_layer_stats():
    w = torch.zeros(3, 2, 2, 2, dtype=torch.bool)
    w[0, 0, 0, 0] = True
    w[2] = True
    b = torch.tensor([True, False, False, True])
    mask = Mask({"conv.weight": w, "conv.bias": b, "empty": torch.zeros(0, dtype=torch.bool)})
    rows = {r["name"]: r for r in mask.layer_stats()}
    assert list(rows) == ["conv.weight", "conv.bias", "empty"]
    cw = rows["conv.weight"]
    assert (cw["shape"], cw["numel"], cw["kept"]) == ((3, 2, 2, 2), 24, 9)
    assert cw["density"] == pytest.approx(9 / 24)
    assert cw["out_channels"] == 3 and cw["empty_out_channels"] == 1
    assert rows["conv.bias"]["kept"] == 2 and rows["conv.bias"]["density"] == 0.5
    assert "empty_out_channels" not in rows["conv.bias"]
    assert rows["empty"]["numel"] == 0 and rows["empty"]["density"] == 0.0
    assert mask.kept == 11 and mask.numel == 28
    assert "kept 11 of 28" in repr(mask)


def test_auto_density_and_the_bundled_masks():
    from oes_fast.masks import auto_density, bundled

    assert auto_density(256 * 256) == 0.05 and auto_density(4096 * 4096) == 0.05
    with pytest.raises(ValueError, match="pixels must be positive"):
        auto_density(0)
    model = models.skip_oes(seed=0)
    small, large = bundled(density=0.025), bundled(pixels=256 * 256)
    assert large.meta["bundled_file"] == "bundled_density0.05.safetensors" and abs(large.density - 0.05) < 1e-4
    assert small.meta["bundled_file"] == "bundled_density0.025_vectors.safetensors"
    # the sparser mask keeps every 1-D parameter and the network stays connected
    assert 0.025 < small.density < 0.03 and small.meta["vectors_kept"]
    assert all(bool(t.all()) for t in small.tensors.values() if t.dim() == 1)
    assert masks.health(small, model).ok and masks.health(large, model).ok
    assert bundled().kept == large.kept
    assert bundled(pixels=4096 * 4096, density=0.025).meta["bundled_file"] == small.meta["bundled_file"]
    # the mask searched on the whole 512x512 astronaut, for images nearer that size
    big = bundled(pixels=512 * 512)
    assert big.meta["bundled_file"] == "bundled_density0.05_512.safetensors" and abs(big.density - 0.05) < 1e-4
    assert "512x512" in big.meta["image"] and big.meta["steps"] == 20000 and masks.health(big, model).ok
    assert bundled(pixels=1024 * 1024).meta["bundled_file"] == big.meta["bundled_file"]
    # the same search's 10 % mask, taken on request: the 5 % mask is a subset of it
    wide = bundled(pixels=1024 * 1024, density=0.1)
    assert wide.meta["bundled_file"] == "bundled_density0.1_512.safetensors" and abs(wide.density - 0.1) < 1e-4
    assert (wide.seed, wide.z_seed) == (big.seed, big.z_seed) and masks.health(wide, model).ok
    assert bool((big.to_flat() <= wide.to_flat()).all())
    assert bundled(pixels=256 * 256, density=0.1).meta["bundled_file"] == wide.meta["bundled_file"]  # the only one
    with pytest.raises(ValueError, match="no bundled mask at density 0.2"):
        bundled(density=0.2)
    with pytest.raises(ValueError, match="pixels must be positive"):
        bundled(pixels=0)


def test_bundled_picks_the_mask_searched_nearest_the_image_size(monkeypatch):
    """Of the bundled masks at one density, the one searched at the pixel count nearest the
    image's (by ratio): the 256x256 one up to about 362x362, the 512x512 one above."""
    from oes_fast.masks import BUNDLED_FILE, BUNDLED_SMALL_FILE, bundled

    # a stand-in for the 512x512 entry (any bundled file will do: the rule only picks the name)
    monkeypatch.setitem(masks.BUNDLED_FILES, (0.05, 512), BUNDLED_SMALL_FILE)
    for pixels, name in [(128 * 128, BUNDLED_FILE), (256 * 256, BUNDLED_FILE), (360 * 360, BUNDLED_FILE),
                         (364 * 364, BUNDLED_SMALL_FILE), (512 * 512, BUNDLED_SMALL_FILE),
                         (2048 * 2048, BUNDLED_SMALL_FILE), (256 * 1024, BUNDLED_SMALL_FILE)]:
        assert bundled(pixels=pixels).meta["bundled_file"] == name, pixels
    assert bundled().meta["bundled_file"] == BUNDLED_FILE  # no size: the smallest search size


def test_keep_vectors_keeps_the_1d_parameters_and_nothing_else():
    model = models.skip_oes(seed=0)
    mask = masks.topk({n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
                       for n, p in model.named_parameters()}, 0.01)
    kept = masks.keep_vectors(mask)
    for name, t in kept.items():
        assert bool(t.all()) if t.dim() == 1 else torch.equal(t, mask[name])
    assert kept.meta["vectors_kept"] and not mask.meta.get("vectors_kept")
