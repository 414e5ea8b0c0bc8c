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

__all__ = ["SAMPLE_IMAGES", "load_image", "check_image", "fit_to_network", "unfit", "save_image", "sample_image"]

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


def _pil_to_array(im: Image.Image) -> np.ndarray:
    """(H, W) or (H, W, 3) float64 in [0, 1] from a Pillow image, scaled by its bit depth."""
    mode = im.mode
    if mode.startswith("I;16"):
        # 16-bit grayscale PNG: Pillow keeps all 16 bits.
        return np.asarray(im, dtype=np.float64) / 65535.0
    if mode == "I":
        # 32-bit integer mode; Pillow uses it for 16-bit grayscale in some formats/versions.
        a = np.asarray(im, dtype=np.float64)
        return a / (65535.0 if a.max(initial=0) > 255 else 255.0)
    if mode == "F":
        return np.asarray(im, dtype=np.float64)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    if mode == "RGB":
        return np.asarray(im, dtype=np.float64) / 255.0
    # RGBA/RGBa/PA drop alpha (no compositing); palette, CMYK, YCbCr, ... become RGB.
    # Note: Pillow decodes 16-bit color PNGs as 8-bit RGB (it has no 16-bit color mode),
    # so those arrive here with 8-bit precision, still correctly scaled to [0, 1].
    if mode == "P" and im.palette is not None and im.palette.mode == "L":
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def load_image(path, *, channels: int | None = None) -> torch.Tensor:
    """Read a PNG or JPEG (any format Pillow reads) as a (1, C, H, W) float32 tensor in [0, 1].

    channels=None keeps the file's channels (gray -> 1, color -> 3); 1 converts color to
    luma (ITU-R 601-2), 3 repeats gray. Alpha is dropped. 8-bit files are divided by 255,
    16-bit grayscale PNGs by 65535 (16-bit color PNGs are read at 8-bit precision by Pillow).
    The EXIF orientation of photos is applied, as image viewers do.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for one that
    is not a readable image (corrupt, truncated, a folder, unreadable) or that holds NaN/Inf.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "image file not found", path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated/corrupt data fails here, inside the try
            im = ImageOps.exif_transpose(im)
            array = _pil_to_array(im)
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, zlib.error, ...
        raise ValueError(f"cannot read image file {path!r}: {exc}") from exc
    if array.ndim == 2:
        array = array[:, :, None]
    if channels == 1 and array.shape[2] == 3:
        array = (array @ np.asarray(_LUMA))[:, :, None]
    elif channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return check_image(_array_to_tensor(array), f"image file {path!r}")


def fit_to_network(image: torch.Tensor, multiple: int, min_side: int, mode: str = "crop"):
    """Bring an image to a size the network takes: both sides multiples of `multiple`, >= min_side.

    mode="crop": center-crop each side to the largest multiple of `multiple` not above it.
    mode="pad": reflect-pad each side up to the next multiple (split evenly, the extra pixel
    at the bottom/right); `unfit(output, info)` crops a network output back to the original.
    Never resizes. Raises ValueError when a side is below min_side (or cropping would take it
    below min_side). Returns (image, info) where info is a JSON-able dict:
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
    if min(h, w) < min_side:
        raise ValueError(f"image is {h}x{w} pixels, smaller than the minimum side {min_side} of this network")
    if mode == "crop":
        nh, nw = h // multiple * multiple, w // multiple * multiple
        if min(nh, nw) < min_side:
            raise ValueError(f"image is {h}x{w}: cropping to multiples of {multiple} gives {nh}x{nw}, "
                             f"smaller than the minimum side {min_side}; use mode='pad'")
        top, left = (h - nh) // 2, (w - nw) // 2
        out = image[:, :, top:top + nh, left:left + nw]
        box, pad = (top, left, top + nh, left + nw), (0, 0, 0, 0)
    else:
        nh, nw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        pt, pl = (nh - h) // 2, (nw - w) // 2
        pad = (pt, nh - h - pt, pl, nw - w - pl)
        if max(pad[0], pad[1]) >= h or max(pad[2], pad[3]) >= w:
            raise ValueError(f"image is {h}x{w}: too small to reflect-pad to {nh}x{nw}")
        # F.pad takes (left, right, top, bottom).
        out = torch.nn.functional.pad(image, (pad[2], pad[3], pad[0], pad[1]), mode="reflect") if any(pad) else image
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
    return check_image(_array_to_tensor(_pil_to_array(im)), f"sample image {name!r}")


def _array_to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))[None]).to(torch.float32)
