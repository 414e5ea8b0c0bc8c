"""Image files and image tensors: load, validate, fit to the network, save, built-in samples.

Images are (1, C, H, W) float32 tensors in [0, 1] with C = 1 (gray) or 3 (RGB). Sizes the
network cannot take are center-cropped or reflect-padded (`fit_to_network`), never resized
(spec section 2); only the built-in samples of `sample_image` are resized.
"""
from __future__ import annotations

import errno
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from .files import atomic_path

__all__ = ["SAMPLE_IMAGES", "read_image", "load_image", "write_image", "check_image", "array_to_tensor", "fit_to_network", "reflect_pad", "unfit", "save_image", "sample_image"]

# Names of the built-in samples: images bundled inside scikit-image's wheel (skimage/data/*.png),
# so they load offline (checked with networking disabled).
SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "camera")

# ITU-R 601-2 luma, the weights Pillow's convert("L") uses; applied in float so 16-bit input
# keeps its precision.
_LUMA = (0.299, 0.587, 0.114)


def check_image(image, name: str = "image") -> torch.Tensor:
    """Validate an image tensor and return it unchanged.

    Requires a torch.Tensor (TypeError otherwise) of shape (1, C, H, W) with C in {1, 3},
    a floating dtype, only finite values, and values in [0, 1]; anything else raises
    ValueError naming `name`.
    """
    _check_tensor(image, name)
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: values must lie in [0, 1], got range [{lo:.6g}, {hi:.6g}]")
    return image


def _check_tensor(image, name: str) -> None:
    """Everything of check_image except the value range (save_image clamps instead)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected shape (1, C, H, W) with C in {{1, 3}}, got {tuple(image.shape)}")
    if image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"{name}: empty image, shape {tuple(image.shape)}")
    if not image.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating dtype, got {image.dtype}")
    if not bool(torch.isfinite(image).all()):
        bad = int((~torch.isfinite(image)).sum())
        raise ValueError(f"{name}: contains {bad} NaN or Inf values")


def _pil_to_array(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(H, W) or (H, W, 3) float64 in [0, 1] from a Pillow image, scaled by its bit depth; the
    alpha channel (H, W) in [0, 1] or None; the bit depth (8 or 16)."""
    mode = im.mode
    if mode.startswith("I;16"):
        # 16-bit grayscale PNG: Pillow keeps all 16 bits.
        return np.asarray(im, dtype=np.float64) / 65535.0, None, 16
    if mode == "I":
        # 32-bit integer mode; Pillow uses it for 16-bit grayscale in some formats/versions.
        a = np.asarray(im, dtype=np.float64)
        deep = a.max(initial=0) > 255
        return a / (65535.0 if deep else 255.0), None, 16 if deep else 8
    if mode == "F":
        return np.clip(np.asarray(im, dtype=np.float64), 0.0, 1.0), None, 16
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # a palette with a transparent entry: keep it as alpha
        mode = im.mode
    if mode in ("LA", "La", "PA"):
        la = np.asarray(im.convert("LA"), dtype=np.float64) / 255.0
        return la[:, :, 0], la[:, :, 1], 8
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64) / 255.0
        return rgba[:, :, :3], rgba[:, :, 3], 8
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0, None, 8
    if mode == "RGB":
        return np.asarray(im, dtype=np.float64) / 255.0, None, 8
    # palette, CMYK, YCbCr, ... become RGB (a gray palette stays gray).
    if mode == "P" and im.palette is not None and im.palette.mode == "L":
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0, None, 8
    return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0, None, 8


def _png_header(path: str) -> tuple[int, int] | None:
    """(bit depth, color type) from a PNG file's IHDR chunk; None for other files."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _read_png16(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A 16-bit PNG with all its bits (Pillow reads 16-bit color at 8 bits): pypng decodes it."""
    import png

    width, height, rows, info = png.Reader(filename=path).asDirect()
    planes = info["planes"]
    array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    array = array.astype(np.float64) / 65535.0
    if info["alpha"]:
        return array[:, :, :-1].squeeze(2) if planes == 2 else array[:, :, :-1], array[:, :, -1]
    return array.squeeze(2) if planes == 1 else array, None


# EXIF orientation (1-8) -> the numpy operations that show the image upright, as viewers do
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
           7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: np.swapaxes(a, 0, 1)[::-1]}


def read_image(path) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Decode an image file as it is: (pixels (H, W) or (H, W, 3) float64 in [0, 1], alpha (H, W)
    float64 in [0, 1] or None, bit depth 8 or 16), EXIF orientation applied.

    16-bit PNGs keep all 16 bits (color ones through pypng). Raises FileNotFoundError for a
    missing file and ValueError, naming the file, for one that is not a readable image or holds
    NaN/Inf (float TIFFs).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "image file not found", path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated/corrupt data fails here, inside the try
            header = _png_header(path) if im.format == "PNG" else None
            orientation = im.getexif().get(0x0112, 1)
            if header is not None and header[0] == 16 and header[1] != 0:
                array, alpha = _read_png16(path)  # color or gray+alpha at 16 bits
                depth = 16
                if orientation in _ORIENT:
                    array = np.ascontiguousarray(_ORIENT[orientation](array))
                    alpha = None if alpha is None else np.ascontiguousarray(_ORIENT[orientation](alpha))
            else:
                array, alpha, depth = _pil_to_array(ImageOps.exif_transpose(im))
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, zlib.error, ...
        raise ValueError(f"cannot read image file {path!r}: {exc}") from exc
    if not np.isfinite(array).all():
        raise ValueError(f"image file {path!r}: contains NaN or Inf values")
    return array, alpha, depth


def load_image(path, *, channels: int | None = None) -> torch.Tensor:
    """Read a PNG or JPEG (any format Pillow reads) as a (1, C, H, W) float32 tensor in [0, 1].

    channels=None keeps the file's channels (gray -> 1, color -> 3); 1 converts color to
    luma (ITU-R 601-2), 3 repeats gray. Alpha is dropped (`read_image` keeps it). 8-bit files
    are divided by 255, 16-bit PNGs by 65535. The EXIF orientation of photos is applied, as
    image viewers do.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for one that
    is not a readable image (corrupt, truncated, a folder, unreadable) or that holds NaN/Inf.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    array, _, _ = read_image(path)
    if array.ndim == 2:
        array = array[:, :, None]
    if channels == 1 and array.shape[2] == 3:
        array = (array @ np.asarray(_LUMA))[:, :, None]
    elif channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return check_image(array_to_tensor(array), f"image file {os.fspath(path)!r}")


def write_image(path, pixels: np.ndarray, bit_depth: int = 8, alpha: np.ndarray | None = None) -> None:
    """Write pixels (H, W), (H, W, 1) or (H, W, 3) in [0, 1] (clamped) as a PNG of `bit_depth`
    8 or 16 bits, with an alpha channel (H, W) in [0, 1] when given. Atomic, like save_image."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"pixels must be (H, W), (H, W, 1) or (H, W, 3), got shape {pixels.shape}")
    planes = pixels if pixels.ndim == 3 else pixels[:, :, None]
    if alpha is not None:
        alpha = np.asarray(alpha, dtype=np.float64)
        if alpha.shape != planes.shape[:2]:
            raise ValueError(f"alpha is {alpha.shape}, the pixels {planes.shape[:2]}")
        planes = np.concatenate([planes, alpha[:, :, None]], axis=2)
    if not np.isfinite(planes).all():
        raise ValueError("image to write: contains NaN or Inf values")
    top = 255.0 if bit_depth == 8 else 65535.0
    ints = np.round(np.clip(planes, 0.0, 1.0) * top).astype(np.uint8 if bit_depth == 8 else np.uint16)
    path = os.fspath(path)
    with atomic_path(path, ".png") as tmp:
        if bit_depth == 8:
            modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
            Image.fromarray(ints[:, :, 0] if ints.shape[2] == 1 else ints, modes[ints.shape[2]]).save(tmp, format="PNG")
        else:
            import png

            h, w, c = ints.shape
            writer = png.Writer(w, h, greyscale=c in (1, 2), alpha=c in (2, 4), bitdepth=16)
            with open(tmp, "wb") as f:
                writer.write(f, ints.reshape(h, w * c))


def fit_to_network(image: torch.Tensor, multiple: int, min_side: int, mode: str = "crop"):
    """Bring an image to a size the network takes: both sides multiples of `multiple`, >= min_side.

    mode="crop": center-crop each side to the largest multiple of `multiple` not above it.
    mode="pad": reflect-pad each side up to the next multiple, and at least to min_side (split
    evenly, the extra pixel at the bottom/right; pads larger than the image reflect in rounds,
    `reflect_pad`); `unfit(output, info)` crops a network output back to the original.
    Never resizes. mode="crop" raises ValueError when a side is below min_side (or cropping
    would take it below min_side). Returns (image, info) where info is a JSON-able dict:
      mode, original_size (H, W), size (h, w), changed, multiple, min_side,
      box (top, left, bottom, right): crop: the region of the original that was kept;
          pad: where the original lies in the padded image,
      pad (top, bottom, left, right) pixels added (zeros for crop),
      message: one line for a report.
    """
    _check_tensor(image, "image")
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    multiple, min_side = int(multiple), int(min_side)
    if multiple < 1 or min_side < 1:
        raise ValueError(f"multiple and min_side must be positive, got {multiple} and {min_side}")
    h, w = int(image.shape[2]), int(image.shape[3])
    if mode == "crop":
        if min(h, w) < min_side:
            raise ValueError(f"image is {h}x{w} pixels, smaller than the minimum side {min_side} of this network; "
                             "use mode='pad'")
        nh, nw = h // multiple * multiple, w // multiple * multiple
        if min(nh, nw) < min_side:
            raise ValueError(f"image is {h}x{w}: cropping to multiples of {multiple} gives {nh}x{nw}, "
                             f"smaller than the minimum side {min_side}; use mode='pad'")
        top, left = (h - nh) // 2, (w - nw) // 2
        out = image[:, :, top:top + nh, left:left + nw]
        box, pad = (top, left, top + nh, left + nw), (0, 0, 0, 0)
    else:
        floor = -(-min_side // multiple) * multiple
        nh, nw = max(floor, -(-h // multiple) * multiple), max(floor, -(-w // multiple) * multiple)
        pt, pl = (nh - h) // 2, (nw - w) // 2
        pad = (pt, nh - h - pt, pl, nw - w - pl)
        out = reflect_pad(image, *pad)
        box = (pt, pl, pt + h, pl + w)
    changed = (nh, nw) != (h, w)
    if not changed:
        message = f"image {h}x{w} fits the network (multiple of {multiple}, min side {min_side})"
    elif mode == "crop":
        message = (f"center-cropped {h}x{w} -> {nh}x{nw} (multiple of {multiple}); kept rows {box[0]}:{box[2]}, "
                   f"columns {box[1]}:{box[3]}")
    else:
        message = (f"reflect-padded {h}x{w} -> {nh}x{nw} (multiple of {multiple}); added top {pad[0]}, "
                   f"bottom {pad[1]}, left {pad[2]}, right {pad[3]}")
    info = {"mode": mode, "original_size": (h, w), "size": (nh, nw), "changed": changed, "multiple": multiple,
            "min_side": min_side, "box": box, "pad": pad, "message": message}
    return out.contiguous(), info


def reflect_pad(image: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflect-pad a (N, C, H, W) tensor by any amounts: a pad as large as the image or larger is
    done in rounds, each reflecting what the last one made (a side of 1 pixel is repeated)."""
    while top or bottom or left or right:
        h, w = image.shape[2], image.shape[3]
        step = [min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1)]
        if max(step) == 0:  # a 1-pixel side cannot be reflected: repeat it
            return torch.nn.functional.pad(image, (left, right, top, bottom), mode="replicate")
        image = torch.nn.functional.pad(image, step, mode="reflect")
        left, right, top, bottom = left - step[0], right - step[1], top - step[2], bottom - step[3]
    return image


def unfit(image: torch.Tensor, info: dict) -> torch.Tensor:
    """Undo the padding of fit_to_network (crop the original region back out); crops stay as they are."""
    if info["mode"] != "pad" or not info["changed"]:
        return image
    top, left, bottom, right = info["box"]
    return image[:, :, top:bottom, left:right]


def save_image(tensor: torch.Tensor, path) -> None:
    """Write a (1, C, H, W) image as an 8-bit PNG: clamp to [0, 1], times 255, round.

    Atomic: written to a temporary file in the same folder, then os.replace'd onto `path`,
    so a reader never sees a half-written file. Missing parent folders are created. The file
    is PNG whatever the extension. Raises PermissionError (an OSError) naming the folder when
    it cannot be created or written; ValueError for a bad tensor (shape, NaN/Inf).
    """
    _check_tensor(tensor, "image to save")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    array = (tensor.detach()[0].to("cpu", torch.float64).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    im = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)  # uint8: mode L or RGB
    try:
        with atomic_path(path, ".png") as tmp:
            im.save(tmp, format="PNG")
    except (PermissionError, FileExistsError, NotADirectoryError) as exc:
        raise PermissionError(errno.EACCES, f"cannot write image {path!r}: {folder!r} is not a writable folder ({exc})") from exc


def sample_image(name: str = "astronaut", size: int = 256) -> torch.Tensor:
    """A built-in sample image (1, C, size, size) float32 in [0, 1], from scikit-image's bundled data.

    Names in SAMPLE_IMAGES: "astronaut" (512x512), "coffee" (400x600), "chelsea" (300x451),
    "camera" (512x512, gray, C = 1). Unlike user images, the sample IS resized: with Pillow
    LANCZOS so that its smaller side equals `size` (when it does not already), so the
    center crop of size x size shows the subject rather than a detail; then center-cropped.
    """
    if name not in SAMPLE_IMAGES:
        raise ValueError(f"unknown sample image {name!r}; choose one of {', '.join(SAMPLE_IMAGES)}")
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    import skimage.data  # imported here: skimage is slow to import and only the samples need it

    array = getattr(skimage.data, name)()
    im = Image.fromarray(array)
    w, h = im.size
    if min(h, w) != size:
        scale = size / min(h, w)
        # max(size, ...) guards against rounding the smaller side below size.
        nw, nh = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return check_image(array_to_tensor(_pil_to_array(im)[0]), f"sample image {name!r}")


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) array -> (1, C, H, W) float32 tensor."""
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))[None]).to(torch.float32)
