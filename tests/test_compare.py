"""`oes-fast compare`: the table, CSV, plots and report for a tiny budget; bad method names;
a missing bundled mask and a disconnected mask are reported, not fatal."""
import csv
import json

import pytest

import oes_fast
from oes_fast import images, masks, prune
from oes_fast.cli import UsageError, build_parser, compare, main

# the OES network at 256x256 (its smallest side): keep to a couple of steps per method
FAST = ["--train-steps", "2", "--record-every", "1", "--no-progress"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_compare_writes_table_csv_plots_and_report(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, _ = run_cli(["compare", "--methods", "dense,random,magnitude", "--out", out, *FAST], capsys)
    assert code == 0
    for name in ("comparison.md", "comparison.csv", "psnr.png", "density.png", "report.json", "clean.png",
                 "degraded.png", "restored/dense.png", "masks/random.safetensors", "masks/magnitude.safetensors"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "comparison.csv")
    assert [r["method"] for r in rows] == ["dense", "random", "magnitude"]
    numel = sum(p.numel() for p in oes_fast.models.skip_oes(seed=0).parameters())
    for r in rows:
        assert r["status"] == "ok"
        assert float(r["final_psnr"]) > 0 and 0 < float(r["final_ssim"]) <= 1
        assert float(r["total_seconds"]) == pytest.approx(float(r["mask_seconds"]) + float(r["train_seconds"]))
    assert int(rows[0]["kept"]) == numel and rows[0]["healthy"] == ""
    for r in rows[1:]:
        assert int(r["kept"]) == round(0.05 * numel) and float(r["density"]) == pytest.approx(0.05, abs=1e-6)
    # a random 5 % keeps something in every layer but no channel path lines up: cut, reported
    assert rows[1]["healthy"] == "False" and "no channel path" in rows[1]["notes"]
    # global magnitude at init empties the deep convs (their init bound 1/sqrt(fan_in) is the
    # smallest): reported, and trained anyway
    assert rows[2]["healthy"] == "False" and "trained anyway" in rows[2]["notes"]
    table = (out / "comparison.md").read_text()
    assert sum(line.startswith("| dense |") or line.startswith("| random |") or line.startswith("| magnitude |")
               for line in table.splitlines()) == 3
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["dense", "random", "magnitude"]
    assert report["settings"]["train_steps"] == 2
    assert len(report["methods"]["dense"]["history"]["psnr"]) == 3  # steps 0, 1 and the end
    clean = images.load_image(out / "clean.png")
    for r in rows:
        # the table's peak and final PSNR are those of the recorded curve, and the final one is
        # the PSNR of the restored image written (to within its 8-bit rounding)
        history = report["methods"][r["method"]]["history"]
        peak = max(range(len(history["psnr"])), key=history["psnr"].__getitem__)
        assert float(r["peak_psnr"]) == pytest.approx(history["psnr"][peak], abs=1e-6)
        assert int(r["peak_step"]) == history["steps"][peak]
        assert float(r["final_psnr"]) == pytest.approx(history["psnr"][-1], abs=1e-6)
        restored = images.load_image(out / "restored" / f"{r['method']}.png")
        assert float(r["final_psnr"]) == pytest.approx(float(oes_fast.metrics.psnr(restored, clean)), abs=0.05)
    # every mask belongs to the same weights and input: the files carry the seeds
    saved = masks.load(out / "masks" / "random.safetensors")
    assert (saved.seed, saved.z_seed) == (0, 0)
    assert "| magnitude |" in stdout


@pytest.mark.parametrize("methods", ["dense,oes,lottery", "", "Dense"])
def test_unknown_method_is_a_usage_error(tmp_path, capsys, methods):
    out = tmp_path / "cmp"
    code, _, err = run_cli(["compare", "--methods", methods, "--out", out, *FAST], capsys)
    assert code == 2
    assert err.startswith("oes-fast: error:") and len(err.strip().splitlines()) == 1
    assert "synflow" in err  # lists the valid names
    assert not out.exists()  # nothing written


def test_missing_bundled_mask_and_disconnected_mask_are_reported(tmp_path, capsys, monkeypatch):
    def no_bundled(**size):
        raise FileNotFoundError("the bundled mask is missing from this installation (test)")

    real_random = prune.random

    def cutting_random(model, density, **kw):
        # a mask that prunes every weight of one conv: the output no longer depends on z
        mask = real_random(model, density, **kw)
        mask.tensors["down.1.conv2.weight"].zero_()
        return mask

    monkeypatch.setattr(masks, "bundled", no_bundled)
    monkeypatch.setattr(prune, "random", cutting_random)
    out = tmp_path / "cmp"
    code, _, err = run_cli(["compare", "--methods", "bundled,random", "--task", "inpaint", "--train-steps", "1",
                            "--record-every", "1", "--no-progress", "--out", out], capsys)
    assert code == 0
    assert "bundled mask is not available" in err
    rows = read_csv(out / "comparison.csv")
    assert [r["method"] for r in rows] == ["bundled", "random"]
    assert rows[0]["status"] == "skipped" and rows[0]["final_psnr"] == ""
    assert rows[1]["status"] == "ok" and rows[1]["healthy"] == "False"
    assert "down.1.conv2" in rows[1]["notes"] and "trained anyway" in rows[1]["notes"]
    table = (out / "comparison.md").read_text()
    assert "NO (trained anyway)" in table and "skipped" in table
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["name"] == "inpaint"


def test_bundled_mask_needs_the_image_size(monkeypatch):
    mask = prune.random(oes_fast.models.skip(seed=0, in_channels=4, channels_down=(4, 8), channels_up=(4, 8),
                                             channels_skip=(0, 0)), 0.5)
    mask.meta["image"] = "skimage.data.astronaut, center 256x256"
    monkeypatch.setattr(masks, "bundled", lambda **size: mask)
    assert compare._bundled_mask(256, 256) == (mask, None)
    found, why = compare._bundled_mask(320, 256)
    assert found is None and "256x256" in why and "320x256" in why


def test_bundled_method_takes_the_mask_searched_at_the_image_size():
    """compare's "bundled" method is the mask searched on the astronaut at the image's own size:
    the 256x256 one for 256x256 images, the 512x512 one for 512x512 images."""
    for side in (256, 512):
        found, why = compare._bundled_mask(side, side)
        assert why is None and f"{side}x{side}" in found.meta["image"]


def test_method_names_and_budgets():
    assert compare.parse_methods("dense, snip_layer,dense ,synflow") == ["dense", "snip_layer", "synflow"]
    with pytest.raises(UsageError, match="valid names"):
        compare.parse_methods("dense,nope")
    parser = build_parser()
    quick = compare._budgets(parser.parse_args(["compare"]))
    assert (quick.train_steps, quick.search_steps, quick.imp_steps, quick.synflow_iterations) == (2000, 20000, 200, 100)
    paper = compare._budgets(parser.parse_args(["compare", "--preset", "paper", "--imp-steps", "7"]))
    assert (paper.train_steps, paper.search_steps, paper.imp_steps) == (40000, 60000, 7)
    with pytest.raises(UsageError):
        compare._budgets(parser.parse_args(["compare", "--synflow-iterations", "0"]))
    assert quick.sgld_noise_std is None
    assert compare._budgets(parser.parse_args(["compare", "--sgld-noise-std", "0.02"])).sgld_noise_std == 0.02
    with pytest.raises(UsageError, match="sgld-noise-std"):
        compare._budgets(parser.parse_args(["compare", "--sgld-noise-std", "nan"]))


def test_oes_mask_file_and_resume(tmp_path, capsys):
    """--oes-mask trains a given mask for 'oes' with its own seeds; --resume keeps the finished
    methods of the same settings and runs only the new ones."""
    mask = prune.random(oes_fast.models.skip_oes(seed=3), 0.05, seed=1)
    mask.seed, mask.z_seed = 3, 4
    mask.meta["steps"] = 123
    masks.save(mask, tmp_path / "found.safetensors")
    out = tmp_path / "cmp"
    code, _, _ = run_cli(["compare", "--methods", "random", "--out", out, *FAST], capsys)
    assert code == 0
    first = json.loads((out / "report.json").read_text())["methods"]["random"]
    code, _, err = run_cli(["compare", "--methods", "random,oes", "--oes-mask", tmp_path / "found.safetensors",
                            "--resume", "--out", out, *FAST], capsys)
    assert code == 0
    assert "done in an earlier run" in err
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["random", "oes"]
    assert report["methods"]["random"] == first  # kept, not rerun
    rows = read_csv(out / "comparison.csv")
    assert [r["method"] for r in rows] == ["random", "oes"]
    assert "123 search steps, seeds 3, 4" in rows[1]["notes"]
    assert int(rows[1]["kept"]) == mask.kept
    assert masks.load(out / "masks" / "oes.safetensors").seed == 3
    # everything finished already: nothing runs, the outputs are written again for the methods asked
    (out / "psnr.png").unlink()
    code, _, _ = run_cli(["compare", "--methods", "oes", "--oes-mask", tmp_path / "found.safetensors", "--resume",
                          "--out", out, *FAST], capsys)
    assert code == 0 and (out / "psnr.png").is_file()
    assert [r["method"] for r in read_csv(out / "comparison.csv")] == ["oes"]
    # other settings: nothing kept
    code, _, err = run_cli(["compare", "--methods", "random", "--resume", "--out", out, "--train-steps", "3",
                            "--record-every", "1", "--no-progress"], capsys)
    assert code == 0 and "other settings" in err
    assert json.loads((out / "report.json").read_text())["settings"]["train_steps"] == 3


@pytest.mark.parametrize("problem, message", [("missing", "No such file|not found|does not exist"),
                                              ("no-oes", "'oes' method")])
def test_oes_mask_errors(tmp_path, capsys, problem, message):
    out = tmp_path / "cmp"
    methods = "dense" if problem == "no-oes" else "oes"
    mask_file = tmp_path / "nothing.safetensors"
    if problem == "no-oes":
        masks.save(prune.random(oes_fast.models.skip_oes(seed=0), 0.05, seed=1), mask_file)
    code, _, err = run_cli(["compare", "--methods", methods, "--oes-mask", mask_file, "--out", out, *FAST], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    import re
    assert re.search(message, err), err
    assert not out.exists()
