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


def test_denoise_restores_the_photo_as_it_is(tmp_path, mask_file, photo, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["denoise", photo, "--mask", mask_file, "--out", out, *FAST], capsys)
    assert code == 0
    for name in ("restored.png", "input.png", "side_by_side.png", "mask.safetensors", "report.json", "loss.png",
                 "density.png"):
        assert (out / name).is_file(), name
    assert not (out / "psnr.png").exists() and not (out / "clean.png").exists()
    report = json.loads((out / "report.json").read_text())
    # 260x300 is reflect-padded to 320x320 and cropped back: the output has the input's size
    assert report["output_size"] == [260, 300] and report["network_size"] == [320, 320] and report["fit"]["changed"]
    assert report["mask"]["seed"] == 3 and report["mask"]["z_seed"] == 4
    assert len(report["losses"]) == 2 and report["psnr"] == [] and report["final_psnr"] is None
    assert "no reference" in report["note"] and report["image"]["mode"] == "observation"
    # the machine a run's timings come from: its processor and the copy of the CPU kernels it ran
    assert report["machine"]["processor"] and report["machine"]["cpu_kernels"] in ("avx512", "avx2", "baseline")
    assert Image.open(out / "restored.png").size == (300, 260)
    # the input is written as given: no noise was added
    assert np.array_equal(np.asarray(Image.open(out / "input.png")), np.asarray(Image.open(photo)))
    assert "estimate: about" in err and "peak memory" in err
    assert "outputs in" in stdout
    # denoising fits down to the noise level estimated from the photo, and says so
    assert report["settings"]["noise_level"] == "auto" and report["noise"]["sigma"] > 0
    assert f"noise level {report['noise']['sigma']:.4f}, estimated from the image" in err


@pytest.mark.parametrize("shape, mode", [((301, 451, 3), "RGB"), ((200, 200), "L")])
def test_odd_sizes_and_gray_come_back_at_their_size(shape, mode, tmp_path, mask_file, capsys):
    path = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)).save(path)
    code, _, _ = run_cli(["denoise", path, "--mask", mask_file, "--out", tmp_path / "o", *FAST], capsys)
    assert code == 0
    restored = Image.open(tmp_path / "o" / "restored.png")
    assert restored.size == (shape[1], shape[0]) and restored.mode == mode


def test_16_bit_in_16_bit_out(tmp_path, mask_file, capsys):
    import png

    path = tmp_path / "deep.png"
    rgb = np.random.default_rng(2).integers(0, 65536, (256, 256, 3)).astype(np.uint16)
    png.from_array(rgb.reshape(256, -1), "RGB;16").save(str(path))
    code, _, _ = run_cli(["denoise", path, "--mask", mask_file, "--out", tmp_path / "o", *FAST], capsys)
    assert code == 0
    width, height, _, info = png.Reader(filename=str(tmp_path / "o" / "restored.png")).read()
    assert (width, height, info["bitdepth"], info["planes"]) == (256, 256, 16, 3)


def test_inpaint_holes_from_a_file_and_from_alpha(tmp_path, mask_file, photo, capsys):
    holes = np.zeros((260, 300), dtype=np.uint8)
    holes[100:150, 40:120] = 255
    Image.fromarray(holes).save(tmp_path / "holes.png")
    code, _, _ = run_cli(["inpaint", photo, "--holes", tmp_path / "holes.png", "--mask", mask_file,
                          "--out", tmp_path / "a", *FAST], capsys)
    assert code == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["task"]["missing_fraction"] == pytest.approx(50 * 80 / (260 * 300), abs=1e-6)
    rgba = np.dstack([np.asarray(Image.open(photo)), 255 - holes])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    code, _, _ = run_cli(["inpaint", tmp_path / "rgba.png", "--mask", mask_file, "--out", tmp_path / "b", *FAST],
                         capsys)
    assert code == 0
    restored = Image.open(tmp_path / "b" / "restored.png")
    assert restored.mode == "RGBA" and restored.size == (300, 260)
    assert json.loads((tmp_path / "b" / "report.json").read_text())["task"]["holes_from_alpha"]


def test_superres_enlarges_the_image_given(tmp_path, mask_file, capsys):
    path = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    code, _, _ = run_cli(["superres", path, "--factor", "4", "--mask", mask_file, "--out", tmp_path / "sr", *FAST],
                         capsys)
    assert code == 0
    assert Image.open(tmp_path / "sr" / "restored.png").size == (360, 280)
    assert Image.open(tmp_path / "sr" / "input.png").size == (90, 70)


def test_synthetic_and_clean_give_psnr(tmp_path, mask_file, photo, capsys):
    code, stdout, _ = run_cli(["denoise", photo, "--synthetic", "--sigma", "0.2", "--mask", mask_file,
                               "--out", tmp_path / "syn", *FAST], capsys)
    assert code == 0 and "PSNR" in stdout
    report = json.loads((tmp_path / "syn" / "report.json").read_text())
    assert report["reference"] and len(report["psnr"]) == 3 and report["final_psnr"] is not None
    assert report["image"]["degradation"]["sigma"] == 0.2
    assert (tmp_path / "syn" / "psnr.png").is_file() and (tmp_path / "syn" / "clean.png").is_file()
    # the noisy input differs from the clean image: noise was added in benchmark mode
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "syn" / "input.png")), np.asarray(Image.open(photo)))
    # --clean without --synthetic: the image is restored as given and scored against the reference
    code, _, _ = run_cli(["denoise", photo, "--clean", photo, "--mask", mask_file, "--out", tmp_path / "ref", *FAST],
                         capsys)
    report = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert code == 0 and report["reference"] and report["final_psnr"] is not None


def test_the_demo_degrades_the_sample(tmp_path, capsys):
    code, stdout, _ = run_cli(["denoise", "--out", tmp_path / "demo", *FAST], capsys)
    assert code == 0 and "PSNR" in stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["image"]["mode"] == "synthetic" and report["output_size"] == [256, 256]


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


def test_synthetic_superres_on_the_sample(tmp_path, mask_file, capsys):
    code, _, _ = run_cli(["superres", "--factor", "8", "--mask", mask_file, "--out", tmp_path / "sr", *FAST], capsys)
    assert code == 0
    report = json.loads((tmp_path / "sr" / "report.json").read_text())
    assert report["task"]["name"] == "superres" and report["task"]["factor"] == 8
    assert report["output_size"] == [256, 256] and report["input"]["size"] == [32, 32]


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
    small_holes = tmp_path / "small_holes.png"
    Image.fromarray(np.full((100, 120), 255, np.uint8)).save(small_holes)
    all_holes = tmp_path / "all_holes.png"
    Image.fromarray(np.full((260, 300), 255, np.uint8)).save(all_holes)
    opaque = tmp_path / "opaque.png"
    Image.fromarray(np.full((260, 300, 4), 255, np.uint8)).save(opaque)
    huge = tmp_path / "huge.png"
    Image.fromarray(np.zeros((2048, 2048, 3), np.uint8)).save(huge)
    return {
        "holes of another size": (["inpaint", photo, "--holes", small_holes, "--mask", mask_file],
                                  "is 100x120 but the image is 260x300"),
        "every pixel missing": (["inpaint", photo, "--holes", all_holes, "--mask", mask_file], "every pixel missing"),
        "holes with denoise": (["denoise", photo, "--holes", all_holes, "--mask", mask_file], "--holes is for inpaint"),
        "clean of another size": (["denoise", photo, "--clean", tiny, "--mask", mask_file],
                                  "reference (clean) image is 100x120"),
        "superres beyond memory": (["superres", huge, "--factor", "8", "--mask", mask_file], "not enough memory"),
        "opaque alpha to inpaint": (["inpaint", opaque, "--mask", mask_file], "no transparent pixel"),
        "sigma without synthetic": (["denoise", photo, "--sigma", "0.1", "--mask", mask_file], "--sigma is for --synthetic"),
        "missing image": (["denoise", tmp_path / "nope.png", "--mask", mask_file], "not found"),
        "corrupt image": (["denoise", corrupt, "--mask", mask_file], "cannot read image"),
        "image too small to crop": (["denoise", tiny, "--fit", "crop", "--mask", mask_file], "smaller than the minimum"),
        "density 0": (["denoise", photo, "--density", "0", "--search"], "density"),
        "density above 1": (["search", photo, "--density", "1.5"], "density"),
        "no bundled mask at that density": (["denoise", photo, "--density", "0.03"], "no bundled mask at density 0.03"),
        "mask for another network": (["denoise", photo, "--mask", other_mask], "does not fit"),
        "corrupt mask": (["denoise", photo, "--mask", bad_mask], "not a readable mask file"),
        "missing mask": (["denoise", photo, "--mask", tmp_path / "none.safetensors"], "not found"),
        "unwritable output": (["denoise", photo, "--mask", mask_file, "--out", blocker / "sub"], "cannot write"),
    }


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "image too small to crop", "density 0",
                                  "density above 1", "mask for another network", "corrupt mask", "missing mask",
                                  "unwritable output", "holes of another size", "every pixel missing",
                                  "holes with denoise", "clean of another size", "superres beyond memory",
                                  "opaque alpha to inpaint", "sigma without synthetic", "no bundled mask at that density"])
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


def test_density_is_auto_or_a_number(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        main(["denoise", "--density", "half"])
    assert exit_.value.code == 2 and "must be auto or a number" in capsys.readouterr().err


def test_smoothing_is_a_number_in_0_1_and_its_help_tells_the_default(capsys):
    from oes_fast.cli import common

    with pytest.raises(SystemExit) as exit_:
        main(["denoise", "--smoothing", "1"])
    assert exit_.value.code == 2 and "must be a number in [0, 1)" in capsys.readouterr().err
    assert common.HELP_SMOOTHING == oes_fast.restoration.DEFAULT_SMOOTHING


def test_noise_level_is_auto_off_or_a_number(tmp_path, mask_file, photo, capsys):
    from oes_fast.cli import restore

    for bad in ("2", "-0.1", "loud"):
        with pytest.raises(SystemExit) as exit_:
            main(["denoise", "--noise-level", bad])
        assert exit_.value.code == 2 and "must be auto, off or a standard deviation in [0, 1]" in capsys.readouterr().err
    assert restore.task_arguments().parse_args([]).noise_level == oes_fast.restoration.DEFAULT_NOISE_LEVEL
    for value, sigma in (("off", 0.0), ("0.03", 0.03)):
        out = tmp_path / value
        code, _, _ = run_cli(["denoise", photo, "--mask", mask_file, "--out", out, "--noise-level", value, *FAST], capsys)
        noise = json.loads((out / "report.json").read_text())["noise"]
        assert code == 0 and noise["sigma"] == sigma


def test_nan_in_an_input_tensor_is_refused():
    model = oes_fast.models.skip_oes(seed=0)
    z = oes_fast.models.dip_input(32, 256, 256)
    y = torch.full((1, 3, 256, 256), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        oes_fast.search(model, z, y, steps=1, progress=False)
