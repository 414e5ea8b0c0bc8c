"""The quality claim of the workflow issue, measured: on a 256x256 crop of a real photograph at
sigma = 0.1, Sparse-DIP (a mask at density 0.05) against dense DIP over the same steps.

    python scripts/quality.py dense --steps 4000 --out runs/quality/dense.json
    python scripts/quality.py sparse --mask bundled --steps 4000 --out runs/quality/sparse_bundled.json
    python scripts/quality.py plot runs/quality/*.json --out runs/quality/psnr.png
    python scripts/quality.py search --steps 20000 --out runs/quality/pepper_mask.safetensors
    python scripts/quality.py sparse --mask runs/quality/pepper_mask.safetensors --steps 4000 --out runs/quality/sparse_pepper.json

The photograph is ../shared/data/images/pepper.png (center 256x256 crop), which the bundled
mask was not found on. Weights and z come from the mask's seeds (0 for dense). `search` finds an
image-specific mask on the same noisy crop (seeds 0/0, density 0.05), checkpointing every 250
steps next to --out; run it again with the same arguments to resume.
"""
import argparse
import json
import os

import oes_fast
from oes_fast import images, plots, tasks

DEFAULT_IMAGE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "images", "pepper.png")


def load_problem(path, sigma, noise_seed, size=256):
    """The center size x size crop of the image (the whole image when it is that size), and its noisy copy."""
    clean, info = images.fit_to_network(images.load_image(path), 64, 256, mode="crop")
    if min(clean.shape[2:]) < size:
        raise SystemExit(f"{path}: {clean.shape[2]}x{clean.shape[3]} is smaller than --size {size}")
    top, left = (clean.shape[2] - size) // 2, (clean.shape[3] - size) // 2
    clean = clean[:, :, top:top + size, left:left + size].contiguous()
    if clean.shape[1] == 1:
        clean = clean.expand(1, 3, size, size).contiguous()  # the OES network outputs 3 channels
    return clean, tasks.Denoise(sigma).degrade(clean, seed=noise_seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=("dense", "sparse", "search", "plot"))
    parser.add_argument("files", nargs="*", help="result JSON files (plot)")
    parser.add_argument("--mask", default="bundled",
                        help="'bundled', a mask file, or a published .npz mask (applied to the weights of seed 0)")
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--size", type=int, default=256,
                        help="side of the center crop (default 256; 512 is the whole 512x512 image)")
    parser.add_argument("--noise-seed", type=int, default=0,
                        help="seed of the noise draw (search and training; the authors' protocol trains on "
                             "another draw than the search saw, e.g. --noise-seed 1 for training)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of dense/sparse training")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--record-every", type=int, default=50)
    parser.add_argument("--out", required=True)
    parser.add_argument("--label", help="curve label in the plot (dense, sparse; default: from the method and mask)")
    args = parser.parse_args()
    oes_fast.allocator.keep_freed_memory()  # as the oes-fast command does
    if args.method == "plot":
        curves = {}
        for f in args.files:
            r = json.load(open(f))
            curves[r["label"]] = (r["steps"], r["psnr"])
        plots.psnr_curves(curves, args.out, title="pepper 256x256, sigma 0.1")
        return
    clean, noisy = load_problem(args.image, args.sigma, noise_seed=args.noise_seed, size=args.size)
    side = args.size
    if args.method == "search":
        model, z = oes_fast.models.skip_oes(seed=0), oes_fast.models.dip_input(32, side, side, seed=0)
        result = oes_fast.search(model, z, noisy, density=0.05, steps=args.steps, seed=0, z_seed=0,
                                 checkpoint=args.out + ".ckpt", checkpoint_every=args.checkpoint_every, resume=True, progress=True)
        result.mask.meta.update(image=f"{os.path.basename(args.image)}, center {side}x{side}",
                                task=dict(name="denoise", sigma=args.sigma, noise_seed=args.noise_seed),
                                search_seconds=result.seconds)
        oes_fast.masks.save(result.mask, args.out)
        print(result.mask, result.health.message)
        return
    if args.method == "dense":
        model, z = oes_fast.models.skip_oes(seed=0), oes_fast.models.dip_input(32, side, side, seed=0)
        fit = oes_fast.train_dense(model, z, noisy, steps=args.steps, lr=args.lr, clean=clean,
                                   record_every=args.record_every, checkpoint_every=args.checkpoint_every,
                                   checkpoint=args.out + ".ckpt", resume=True)
        label = args.label or "dense DIP"
    else:
        mask = (oes_fast.masks.bundled() if args.mask == "bundled" else
                # a published mask on our weights and z of seed 0: its structure, not the authors' weights
                oes_fast.masks.load_published(args.mask, oes_fast.models.skip_oes(seed=0), seed=0, z_seed=0)
                if args.mask.endswith(".npz") else oes_fast.masks.load(args.mask))
        model = oes_fast.models.skip_oes(seed=mask.seed)
        z = oes_fast.models.dip_input(32, side, side, seed=mask.z_seed)
        fit = oes_fast.train_sparse(model, mask, z, noisy, steps=args.steps, lr=args.lr, clean=clean,
                                    record_every=args.record_every, checkpoint_every=args.checkpoint_every,
                                    checkpoint=args.out + ".ckpt", resume=True)
        label = args.label or f"Sparse-DIP ({args.mask} mask, density {mask.density:.3f})"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(label=label, summary=fit.summary(), steps=fit.steps, psnr=fit.psnr, ssim=fit.ssim,
                       settings=dict(image=os.path.basename(args.image), size=side, sigma=args.sigma,
                                     noise_seed=args.noise_seed, lr=args.lr, steps=args.steps),
                       seconds=fit.seconds), f)
    print(json.dumps(fit.summary()))


if __name__ == "__main__":
    main()
