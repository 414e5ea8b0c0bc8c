"""The example photos the README's "Restore your own image" commands run on (examples/):

    python scripts/make_examples.py

From scikit-image's astronaut (NASA, public domain), a 300x240 crop of the face (not a multiple
of 64: the command pads and crops back):
- photo.png: the crop itself (a reference for --clean, and an image to fill with holes.png);
- noisy.png: with Gaussian noise (sigma 0.1, seed 0), 8-bit RGB;
- scratched.png: RGBA, with scratches made transparent (the pixels to fill), and holes.png, the
  same scratches as a separate mask (white = missing) for an image without alpha;
- small.png: the crop reduced x4 with Lanczos (75x60), to enlarge back with superres.
"""
import os

import numpy as np
import skimage.data
from PIL import Image, ImageDraw

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")


def main():
    os.makedirs(OUT, exist_ok=True)
    photo = Image.fromarray(skimage.data.astronaut()).crop((130, 20, 370, 320))  # 240 wide, 300 high
    photo.save(os.path.join(OUT, "photo.png"))
    clean = np.asarray(photo, dtype=np.float64) / 255.0
    noise = np.random.default_rng(0).standard_normal(clean.shape)
    noisy = np.round(np.clip(clean + 0.1 * noise, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(noisy).save(os.path.join(OUT, "noisy.png"))

    holes = Image.new("L", photo.size, 0)
    draw = ImageDraw.Draw(holes)
    rng = np.random.default_rng(1)
    for _ in range(7):  # thin strokes across the picture, as scratches on a scanned print
        x0, y0 = rng.integers(0, photo.size[0]), rng.integers(0, photo.size[1])
        x1, y1 = x0 + rng.integers(-120, 120), y0 + rng.integers(-120, 120)
        draw.line((int(x0), int(y0), int(x1), int(y1)), fill=255, width=int(rng.integers(2, 5)))
    holes.save(os.path.join(OUT, "holes.png"))
    rgba = np.dstack([np.asarray(photo), 255 - np.asarray(holes)])
    Image.fromarray(rgba).save(os.path.join(OUT, "scratched.png"))

    photo.resize((photo.size[0] // 4, photo.size[1] // 4), Image.Resampling.LANCZOS).save(os.path.join(OUT, "small.png"))


if __name__ == "__main__":
    main()
