"""The `oes-fast` command: outputs of a run, and a one-line error (exit status 2) with nothing
written for every kind of bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import oes_fast
from oes_fast.cli import main

FAST = ["--train-steps", "2", "--record-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    # the bundled mask's structure (a healthy one: pruning at init at 5 % cuts the hourglass)
    # with other seeds, to check that the seeds in the file are the ones used
    mask = oes_fast.masks.bundled()
    mask.seed, mask.z_seed = 3, 4
    path = tmp_path_factory.mktemp("mask") / "mask.safetensors"
    oes_fast.masks.save(mask, path)
    return path


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (260, 300, 3), dtype=np.uint8)).save(path)
    return path


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_denoise_with_a_mask_writes_every_output(tmp_path, mask_file, photo, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["denoise", photo, "--mask", mask_file, "--out", out, *FAST], capsys)
    assert code == 0
    for name in ("restored.png", "degraded.png", "clean.png", "mask.safetensors", "report.json", "psnr.png",
                 "density.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    # 260x300 is cropped to 256x256 (multiples of 64), and the report says so
    assert report["image"]["size"] == [256, 256] and report["image"]["changed"]
    assert report["seeds"]["weights"] == 3 and report["seeds"]["z"] == 4
    assert report["sparse_dip"]["steps"] == 2 and len(report["history"]["psnr"]) == 3
    assert Image.open(out / "restored.png").size == (256, 256)
    assert "outputs in" in stdout


def test_search_then_train_on_the_sample(tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, _ = run_cli(["search", "--search-steps", "2", "--out", out, "--no-progress"], capsys)
    assert code == 0 and (out / "mask.safetensors").is_file()
    mask = oes_fast.masks.load(out / "mask.safetensors")
    assert mask.kept == round(0.05 * 3_008_867) and mask.seed == 0 and mask.z_seed == 0
    # --low-memory (fused engine, blocks recomputed) finds the same mask, up to the fused
    # engine's last-bit rounding of the logits, which can swap a few of the logits at the threshold
    code, _, _ = run_cli(["search", "--search-steps", "2", "--out", tmp_path / "low", "--no-progress", "--low-memory"],
                         capsys)
    assert code == 0 and json.loads((tmp_path / "low" / "report.json").read_text())["settings"]["low_memory"]
    low = oes_fast.masks.load(tmp_path / "low" / "mask.safetensors")
    shared = sum(int((low.tensors[n] & mask.tensors[n]).sum()) for n in mask.tensors)
    assert low.kept == mask.kept and shared >= mask.kept - 10
    code, _, _ = run_cli(["inpaint", "--mask", out / "mask.safetensors", "--out", tmp_path / "t", "--allow-disconnected",
                          *FAST], capsys)
    assert code == 0
    # a mask that prunes every scale of a batch norm cuts the hourglass: refused unless asked
    mask.tensors["down.2.bn1.weight"][:] = False
    oes_fast.masks.save(mask, tmp_path / "cut.safetensors")
    code, _, err = run_cli(["denoise", "--mask", tmp_path / "cut.safetensors", "--out", tmp_path / "c", *FAST], capsys)
    assert code == 2 and "disconnects" in err and "down.2.bn1" in err
    assert not (tmp_path / "c" / "restored.png").exists()


def test_superres_runs(tmp_path, mask_file, capsys):
    code, _, _ = run_cli(["superres", "--factor", "8", "--mask", mask_file, "--out", tmp_path / "sr", *FAST], capsys)
    assert code == 0
    report = json.loads((tmp_path / "sr" / "report.json").read_text())
    assert report["task"]["name"] == "superres" and report["task"]["factor"] == 8


def test_inspect(mask_file, tmp_path, capsys):
    code, stdout, _ = run_cli(["inspect", mask_file, "--out", tmp_path], capsys)
    assert code == 0
    assert "density 0.0500" in stdout and "down.0.conv1.weight" in stdout and "health:" in stdout
    assert list(tmp_path.glob("*_density.png"))


def _bad_input_cases(tmp_path, mask_file, photo):
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((100, 120, 3), dtype=np.uint8)).save(tiny)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    bad_mask = tmp_path / "bad.safetensors"
    bad_mask.write_bytes(b"definitely not safetensors")
    other = oes_fast.models.skip(seed=0, in_channels=32, channels_down=(16, 32), channels_up=(16, 32),
                                 channels_skip=(0, 0))
    other_mask = tmp_path / "other.safetensors"
    oes_fast.masks.save(oes_fast.prune.random(other, 0.5), other_mask)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    return {
        "missing image": (["denoise", tmp_path / "nope.png", "--mask", mask_file], "not found"),
        "corrupt image": (["denoise", corrupt, "--mask", mask_file], "cannot read image"),
        "image too small": (["denoise", tiny, "--mask", mask_file], "smaller than the minimum"),
        "density 0": (["denoise", photo, "--density", "0", "--search"], "density"),
        "density above 1": (["search", photo, "--density", "1.5"], "density"),
        "mask for another network": (["denoise", photo, "--mask", other_mask], "does not fit"),
        "corrupt mask": (["denoise", photo, "--mask", bad_mask], "not a readable mask file"),
        "missing mask": (["denoise", photo, "--mask", tmp_path / "none.safetensors"], "not found"),
        "unwritable output": (["denoise", photo, "--mask", mask_file, "--out", blocker / "sub"], "cannot write"),
    }


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "image too small", "density 0", "density above 1",
                                  "mask for another network", "corrupt mask", "missing mask", "unwritable output"])
def test_bad_input_is_one_clear_line_and_writes_nothing(case, tmp_path, mask_file, photo, capsys):
    args, message = _bad_input_cases(tmp_path, mask_file, photo)[case]
    out = tmp_path / "out"
    if "--out" not in args:
        args = [*args, "--out", out]
    code, _, err = run_cli([*args, *FAST], capsys)
    assert code == 2
    assert err.startswith("oes-fast: error:") and message in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_nan_in_an_input_tensor_is_refused():
    model = oes_fast.models.skip_oes(seed=0)
    z = oes_fast.models.dip_input(32, 256, 256)
    y = torch.full((1, 3, 256, 256), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        oes_fast.search(model, z, y, steps=1, progress=False)
