"""Find the mask shipped as oes_fast.masks.bundled(): an OES search on the built-in astronaut
sample (public domain, bundled with scikit-image), 256x256, Gaussian noise sigma = 0.1.

    python scripts/make_bundled_mask.py --steps 20000 --checkpoint runs/bundled/search.ckpt

Checkpoints every 250 steps; run again with the same arguments to resume. With a smaller
--steps than the checkpoint holds it refuses; with --steps equal to the checkpoint's step it
just writes the mask of that state.
"""
import argparse
import json
import os

import torch

import oes_fast
from oes_fast import images, tasks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--checkpoint", default="runs/bundled/search.ckpt")
    parser.add_argument("--out", default="runs/bundled/mask.safetensors")
    args = parser.parse_args()
    oes_fast.allocator.keep_freed_memory()  # as the oes-fast command does
    clean = images.sample_image("astronaut", 256)
    noisy = tasks.Denoise(sigma=0.1).degrade(clean, seed=0)
    model = oes_fast.models.skip_oes(seed=0)
    z = oes_fast.models.dip_input(32, 256, 256, seed=0)
    result = oes_fast.search(model, z, noisy, density=0.05, steps=args.steps, seed=0, z_seed=0,
                             checkpoint=args.checkpoint, checkpoint_every=250, resume=True, progress=True)
    result.mask.meta.update(image="skimage.data.astronaut, center 256x256 (oes_fast.images.sample_image)",
                            task=dict(name="denoise", sigma=0.1, noise_seed=0))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    oes_fast.masks.save(result.mask, args.out)
    print(result.mask, result.health.message)
    print(json.dumps({"steps": args.steps, "final_loss": result.losses[-1] if result.losses else None}))


if __name__ == "__main__":
    main()
