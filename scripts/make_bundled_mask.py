"""Find the mask shipped as oes_fast.masks.bundled(): an OES search on the built-in astronaut
sample (public domain, bundled with scikit-image), 256x256, Gaussian noise sigma = 0.1.

    python scripts/make_bundled_mask.py --steps 20000 --checkpoint runs/bundled/search.ckpt

The bundled mask for images nearer 512x512 pixels (masks.BUNDLED_512_FILE) is the same search on
the whole 512x512 astronaut:

    python scripts/make_bundled_mask.py --size 512 --steps 20000 --checkpoint runs/astro512/search.ckpt \
        --out oes_fast/data/bundled_density0.05_512.safetensors

The sparser bundled mask (masks.BUNDLED_SMALL_FILE) was made from the checkpoint of the command's
search (the same image, noise and seeds), its final logits taken at density 0.025 with every 1-D
parameter kept:

    oes-fast search --density 0.025 --search-steps 10000 --out runs/small
    python scripts/make_bundled_mask.py --from-checkpoint runs/small/search.ckpt --density 0.025 \
        --keep-vectors --out oes_fast/data/bundled_density0.025_vectors.safetensors

Checkpoints every 250 steps; run again with the same arguments to resume. With a smaller
--steps than the checkpoint holds it refuses; with --steps equal to the checkpoint's step it
just writes the mask of that state.
"""
import argparse
import json
import os
import time

import torch

import oes_fast
from oes_fast import images, tasks
from quality import run_time  # scripts/quality.py: the same CPU-time record as its searches


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--checkpoint", default="runs/bundled/search.ckpt")
    parser.add_argument("--out", default="runs/bundled/mask.safetensors")
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--size", type=int, default=256,
                        help="the astronaut sample at SIZE x SIZE (512: the whole photograph, not resized)")
    parser.add_argument("--from-checkpoint", metavar="CKPT",
                        help="no search: the mask of the logits in this search checkpoint (of the same problem)")
    parser.add_argument("--keep-vectors", action="store_true",
                        help="keep every 1-D parameter (batch norm, biases): oes_fast.masks.keep_vectors")
    args = parser.parse_args()
    oes_fast.allocator.keep_freed_memory()  # as the oes-fast command does
    clean = images.sample_image("astronaut", args.size)
    noisy = tasks.Denoise(sigma=0.1).degrade(clean, seed=0)
    model = oes_fast.models.skip_oes(seed=0)
    z = oes_fast.models.dip_input(32, args.size, args.size, seed=0)
    described = (f"skimage.data.astronaut, center {args.size}x{args.size} (oes_fast.images.sample_image)"
                 if args.size < 512 else "skimage.data.astronaut, whole 512x512 (oes_fast.images.sample_image)")
    if args.from_checkpoint:
        state = torch.load(args.from_checkpoint, map_location="cpu", weights_only=False)["state"]
        mask = oes_fast.masks.topk(state["logits"], args.density, model=model, seed=0)
        mask.seed, mask.z_seed = 0, 0
        mask.meta.update(method="oes", steps=state["step"], search_seed=0, from_checkpoint=os.path.basename(args.from_checkpoint),
                         image=described,
                         task=dict(name="denoise", sigma=0.1, noise_seed=0))
        if args.keep_vectors:
            mask = oes_fast.masks.keep_vectors(mask)
        oes_fast.masks.save(mask, args.out)
        print(mask, oes_fast.masks.health(mask, model).message)
        return
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    result = oes_fast.search(model, z, noisy, density=args.density, steps=args.steps, seed=0, z_seed=0,
                             checkpoint=args.checkpoint, checkpoint_every=250, resume=True, progress=True)
    result.mask.meta.update(image=described,
                            task=dict(name="denoise", sigma=0.1, noise_seed=0),
                            time=run_time(result, cpu_started, wall_started))
    mask = oes_fast.masks.keep_vectors(result.mask) if args.keep_vectors else result.mask
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    oes_fast.masks.save(mask, args.out)
    print(mask, oes_fast.masks.health(mask, model).message)
    print(json.dumps({"steps": args.steps, "final_loss": result.losses[-1] if result.losses else None}))


if __name__ == "__main__":
    main()
