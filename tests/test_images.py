"""Image files and tensors: loading, validation, fitting to the network, saving, samples."""
import errno
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oes_fast import files, images
from oes_fast.images import check_image, fit_to_network, load_image, sample_image, save_image, unfit


def rand_uint8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_png16(path, array):
    """A 16-bit PNG (gray (H, W) or RGB (H, W, 3)); Pillow cannot write 16-bit color."""
    h, w = array.shape[:2]
    color_type = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------
# load_image

def test_load_gray_rgb_rgba(tmp_path):
    gray, rgb, rgba = rand_uint8((12, 10)), rand_uint8((12, 10, 3), 1), rand_uint8((12, 10, 4), 2)
    for name, array in [("g.png", gray), ("c.png", rgb), ("a.png", rgba)]:
        Image.fromarray(array).save(tmp_path / name)
    g, c, a = (load_image(tmp_path / n) for n in ("g.png", "c.png", "a.png"))
    assert g.shape == (1, 1, 12, 10) and c.shape == (1, 3, 12, 10) and a.shape == (1, 3, 12, 10)
    assert g.dtype == torch.float32
    assert torch.equal(g[0, 0], torch.from_numpy(gray / 255.0).float())
    assert torch.equal(c[0], torch.from_numpy(rgb.transpose(2, 0, 1) / 255.0).float())
    assert torch.equal(a[0], torch.from_numpy(rgba[:, :, :3].transpose(2, 0, 1) / 255.0).float())  # alpha dropped


def test_load_channel_conversion(tmp_path):
    rgb = rand_uint8((8, 9, 3))
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "g.png")
    luma = load_image(tmp_path / "c.png", channels=1)
    assert luma.shape == (1, 1, 8, 9)
    assert torch.allclose(luma[0, 0].double(), torch.from_numpy(rgb @ np.array([0.299, 0.587, 0.114]) / 255), atol=1e-6)
    three = load_image(tmp_path / "g.png", channels=3)
    assert three.shape == (1, 3, 8, 9) and torch.equal(three[0, 0], three[0, 2])
    with pytest.raises(ValueError, match="channels"):
        load_image(tmp_path / "g.png", channels=2)


def test_load_16bit_png(tmp_path):
    gray = np.random.default_rng(0).integers(0, 65536, size=(6, 7)).astype(np.uint16)
    gray[0, 0], gray[0, 1] = 0, 65535
    write_png16(tmp_path / "g16.png", gray)
    g = load_image(tmp_path / "g16.png")
    assert g.shape == (1, 1, 6, 7)
    assert torch.allclose(g[0, 0].double(), torch.from_numpy(gray / 65535.0), atol=1e-7)  # full 16-bit precision
    rgb = np.random.default_rng(1).integers(0, 65536, size=(6, 7, 3)).astype(np.uint16)
    rgb[0, 0] = (0, 65535, 65535)
    write_png16(tmp_path / "c16.png", rgb)
    c = load_image(tmp_path / "c16.png")
    # Pillow decodes 16-bit color at 8 bits: scaled right, within one 8-bit step.
    assert c.shape == (1, 3, 6, 7) and c[0, :, 0, 0].tolist() == [0.0, 1.0, 1.0]
    assert torch.allclose(c[0].double(), torch.from_numpy(rgb.transpose(2, 0, 1) / 65535.0), atol=1 / 255)


def test_load_jpeg(tmp_path):
    yy, xx = np.mgrid[0:32, 0:40]
    array = np.stack([xx * 6, yy * 7, (xx + yy) * 3], axis=2).astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "x.jpg", quality=95)
    x = load_image(tmp_path / "x.jpg")
    assert x.shape == (1, 3, 32, 40)
    assert float((x[0] - torch.from_numpy(array.transpose(2, 0, 1) / 255.0)).abs().mean()) < 0.02


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(ValueError, match=r"cannot read image file .*junk\.png"):
        load_image(junk)
    Image.fromarray(rand_uint8((64, 64, 3))).save(tmp_path / "full.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"cannot read image file .*truncated\.png"):
        load_image(truncated)
    with pytest.raises(ValueError, match="cannot read image file"):
        load_image(tmp_path)  # a folder


# --------------------------------------------------------------------------------------------
# check_image

def test_check_image():
    good = torch.rand(1, 3, 8, 8)
    assert check_image(good) is good
    check_image(torch.rand(1, 1, 8, 8, dtype=torch.float64))
    nan = good.clone()
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="noisy: contains 1 NaN or Inf"):
        check_image(nan, "noisy")
    inf = good.clone()
    inf[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_image(inf)
    with pytest.raises(ValueError, match=r"shape \(1, C, H, W\)"):
        check_image(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(1, C, H, W\)"):
        check_image(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="floating dtype"):
        check_image(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_image(good + 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_image(np.zeros((1, 3, 8, 8)))


# --------------------------------------------------------------------------------------------
# fit_to_network

def test_fit_crop():
    image = torch.rand(1, 3, 300, 451)
    out, info = fit_to_network(image, 64, 256)
    assert out.shape == (1, 3, 256, 448)
    assert info["mode"] == "crop" and info["original_size"] == (300, 451) and info["size"] == (256, 448)
    assert info["changed"] and info["box"] == (22, 1, 278, 449) and info["pad"] == (0, 0, 0, 0)
    assert torch.equal(out, image[:, :, 22:278, 1:449])
    assert "300x451 -> 256x448" in info["message"]
    json.dumps(info)  # printable in a JSON report
    assert unfit(out, info) is out


def test_fit_pad_and_unfit():
    image = torch.rand(1, 1, 260, 250)
    out, info = fit_to_network(image, 64, 128, mode="pad")
    assert out.shape == (1, 1, 320, 256) and info["size"] == (320, 256)
    assert info["pad"] == (30, 30, 3, 3) and info["box"] == (30, 3, 290, 253)
    assert torch.equal(unfit(out, info), image)
    # reflect: the padded row above the original's first row mirrors its second row
    assert torch.equal(out[0, 0, 29, 3:253], image[0, 0, 1])
    assert torch.equal(out[0, 0, 30:290, 2], image[0, 0, :, 1])


def test_fit_exact_size_unchanged():
    image = torch.rand(1, 3, 256, 256)
    for mode in ("crop", "pad"):
        out, info = fit_to_network(image, 64, 256, mode=mode)
        assert torch.equal(out, image) and not info["changed"] and info["box"] == (0, 0, 256, 256)


def test_fit_errors():
    with pytest.raises(ValueError, match="image is 200x300 pixels, smaller than the minimum side 256"):
        fit_to_network(torch.rand(1, 3, 200, 300), 64, 256)
    # mode="pad" pads a small image up to the minimum side instead (oes_fast.images.fit_to_network)
    small = torch.rand(1, 3, 200, 300)
    out, info = fit_to_network(small, 64, 256, mode="pad")
    assert out.shape == (1, 3, 256, 320) and torch.equal(unfit(out, info), small)
    with pytest.raises(ValueError, match="gives 192x256.*mode='pad'"):
        fit_to_network(torch.rand(1, 3, 250, 256), 64, 200)
    with pytest.raises(ValueError, match="mode"):
        fit_to_network(torch.rand(1, 3, 256, 256), 64, 256, mode="resize")


# --------------------------------------------------------------------------------------------
# save_image

def test_save_round_trip_clamp_and_round(tmp_path):
    x = torch.rand(1, 3, 9, 11)
    path = tmp_path / "out.png"
    save_image(x, path)
    back = load_image(path)
    assert torch.equal(back, (x * 255).round() / 255)
    special = torch.tensor([-0.5, 0.2, 0.50196, 1.7]).reshape(1, 1, 2, 2)
    save_image(special, tmp_path / "g.png")
    assert np.asarray(Image.open(tmp_path / "g.png")).tolist() == [[0, 51], [128, 255]]


def test_save_is_atomic_replace(tmp_path):
    path = tmp_path / "sub" / "dir" / "x.png"  # missing folders are created
    save_image(torch.zeros(1, 3, 4, 4), path)
    save_image(torch.ones(1, 3, 4, 4), path)
    assert float(load_image(path).min()) == 1.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]  # no temp file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any new file, not mkstemp's 0600


def test_save_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="is not a writable folder"):
        save_image(torch.rand(1, 3, 4, 4), blocker / "x.png")
    nan = torch.full((1, 3, 4, 4), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        save_image(nan, tmp_path / "nan.png")
    assert not (tmp_path / "nan.png").exists()


def test_save_read_only_folder(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root writes into a 0555 folder anyway (as the tests run in CI): the refusal a user
        # gets is made where the file is created
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))

        monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    try:
        with pytest.raises(PermissionError, match="not a writable folder"):
            save_image(torch.rand(1, 3, 4, 4), folder / "x.png")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------------------------
# sample_image

def test_sample_images():
    for name in images.SAMPLE_IMAGES:
        x = sample_image(name, size=48)
        assert x.shape == (1, 1 if name == "camera" else 3, 48, 48) and x.dtype == torch.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.05
    a = sample_image()
    assert a.shape == (1, 3, 256, 256) and torch.equal(a, sample_image("astronaut", 256))
    # At the native size no resize happens: the 512 crop is the bundled astronaut itself.
    import skimage.data
    full = sample_image("astronaut", 512)
    assert torch.equal(full[0], torch.from_numpy(skimage.data.astronaut().transpose(2, 0, 1) / 255.0).float())
    with pytest.raises(ValueError, match="unknown sample image 'lena'"):
        sample_image("lena")


def test_load_pepper(shared_data):
    x = load_image(shared_data / "images" / "pepper.png")
    assert x.shape == (1, 3, 512, 512) and 0 <= float(x.min()) and float(x.max()) <= 1
    out, info = fit_to_network(x, 64, 256)
    assert out.shape == x.shape and not info["changed"]
