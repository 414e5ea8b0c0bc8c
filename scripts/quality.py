"""The quality claim of the workflow issue, measured: on a 256x256 crop of a real photograph at
sigma = 0.1, Sparse-DIP (a mask at density 0.05) against dense DIP over the same steps.

    python scripts/quality.py dense --steps 4000 --out runs/quality/dense.json
    python scripts/quality.py sparse --mask bundled --steps 4000 --out runs/quality/sparse_bundled.json
    python scripts/quality.py plot runs/quality/*.json --out runs/quality/psnr.png
    python scripts/quality.py table runs/quality/*.json          # markdown rows: PSNR at every 1,000 steps, peak, final
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
import statistics
import time

import oes_fast
import torch
from oes_fast import images, plots, tasks

DEFAULT_IMAGE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "images", "pepper.png")


# The authors' Sparse-DIP on the whole 512x512 pepper (their public run logs: OES network, sigma 0.1,
# density 0.05, PSNR every 1,000 steps), drawn as reference points beside our curves.
AUTHORS_PEPPER_512 = ([1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000],
                      [28.62, 28.26, 27.72, 27.79, 27.56, 27.50, 27.38, 27.29, 27.19, 27.23])


def load_problem(path, sigma, noise_seed, size=256):
    """The center size x size crop of the image (the whole image when it is that size), and its noisy
    copy. A side shorter than `size` is reflect-padded after the noise is added (the noise falls on
    the photograph's own pixels only; the clean image is returned unpadded); the box (top, left,
    bottom, right) of the photograph in the padded image is returned for measuring PSNR there,
    None when nothing was padded."""
    clean = images.load_image(path)
    h, w = clean.shape[2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    clean = clean[:, :, top:top + size, left:left + size].contiguous()
    if clean.shape[1] == 1:
        clean = clean.expand(1, 3, *clean.shape[2:]).contiguous()  # the OES network outputs 3 channels
    noisy = tasks.Denoise(sigma).degrade(clean, seed=noise_seed)
    h, w = clean.shape[2:]
    if (h, w) == (size, size):
        return clean, noisy, None
    pad_top, pad_left = (size - h) // 2, (size - w) // 2
    pads = (pad_top, size - h - pad_top, pad_left, size - w - pad_left)
    # the clean image stays unpadded: PSNR compares the output's box with it
    return clean, images.reflect_pad(noisy, *pads), (pad_top, pad_left, pad_top + h, pad_left + w)


def run_time(fit, cpu_started, wall_started):
    """CPU and wall time of this invocation; a run resumed from a checkpoint ran its earlier steps in
    another process, whose time is estimated from this one's median step."""
    ran = len(fit.step_seconds)
    median = statistics.median(fit.step_seconds) if ran else 0.0
    cpu = time.process_time() - cpu_started
    return dict(cpu_seconds=cpu, wall_seconds=time.perf_counter() - wall_started, steps_run=ran,
                resumed_at_step=len(fit.losses) - ran,
                median_step_seconds=median, cpu_seconds_per_step=cpu / ran if ran else None)


def table(files) -> str:
    """Markdown rows, one per result file: PSNR at every 1,000 steps, the peak and its step,
    final minus peak, and the CPU time of the invocation that finished the run."""
    results = [json.load(open(f)) for f in files]
    last = max(r["steps"][-1] for r in results)
    marks = list(range(1000, last + 1, 1000))
    lines = ["| run | " + " | ".join(f"{m // 1000}k" for m in marks) + " | peak (step) | final - peak | CPU s/step |",
             "|---|" + "---:|" * (len(marks) + 3)]
    for r in results:
        at = dict(zip(r["steps"], r["psnr"]))
        peak = max(r["psnr"])
        peak_step = r["steps"][r["psnr"].index(peak)]
        per_step = (r.get("time") or {}).get("cpu_seconds_per_step")
        cells = [f"{at[m]:.2f}" if m in at else "" for m in marks]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {peak:.2f} ({peak_step:,}) | "
                     f"{r['psnr'][-1] - peak:+.2f} dB | " + (f"{per_step:.3f}" if per_step else "-") + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=("dense", "sparse", "search", "plot", "table"))
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
    parser.add_argument("--smoothing", type=float, default=0.0,
                        help="dense, sparse: the result is the exponential moving average of the outputs with this "
                             "decay (0: the last output); PSNR of both is recorded")
    parser.add_argument("--noise-level", default="off",
                        help="dense, sparse: fit down to this noise level only (train_*(noise_level=)): off "
                             "(default, the plain loss), estimate (metrics.noise_sigma of the noisy image, as "
                             "restore's auto), sigma (--sigma itself) or a number")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--record-every", type=int, default=50)
    parser.add_argument("--out", help="result file (dense, sparse, search, plot)")
    parser.add_argument("--label", help="curve label in the plot (dense, sparse; default: from the method and mask)")
    parser.add_argument("--title", default="pepper 256x256, sigma 0.1", help="plot title")
    parser.add_argument("--authors", action="store_true",
                        help="plot: add the authors' Sparse-DIP pepper curve at 512x512 (their run logs) as points")
    args = parser.parse_args()
    if args.method != "table" and not args.out:
        parser.error(f"{args.method} needs --out")
    oes_fast.allocator.keep_freed_memory()  # as the oes-fast command does
    if args.method == "table":
        print(table(args.files))
        return
    if args.method == "plot":
        curves = {}
        for f in args.files:
            r = json.load(open(f))
            curves[r["label"]] = (r["steps"], r["psnr"])
        points = {"authors' Sparse-DIP, pepper 512x512 (their logs)": AUTHORS_PEPPER_512} if args.authors else None
        plots.psnr_curves(curves, args.out, title=args.title, points=points)
        return
    clean, noisy, box = load_problem(args.image, args.sigma, noise_seed=args.noise_seed, size=args.size)
    side = args.size
    if args.noise_level == "estimate":
        level = oes_fast.metrics.noise_sigma(noisy if box is None else noisy[:, :, box[0]:box[2], box[1]:box[3]])
    elif args.noise_level == "sigma":
        level = args.sigma
    elif args.noise_level == "off":
        level = 0.0
    else:
        level = float(args.noise_level)
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    if args.method == "search":
        model, z = oes_fast.models.skip_oes(seed=0), oes_fast.models.dip_input(32, side, side, seed=0)
        result = oes_fast.search(model, z, noisy, density=0.05, steps=args.steps, seed=0, z_seed=0,
                                 checkpoint=args.out + ".ckpt", checkpoint_every=args.checkpoint_every, resume=True, progress=True)
        result.mask.meta.update(image=f"{os.path.basename(args.image)}, center {side}x{side}",
                                task=dict(name="denoise", sigma=args.sigma, noise_seed=args.noise_seed),
                                search_seconds=result.seconds, time=run_time(result, cpu_started, wall_started))
        oes_fast.masks.save(result.mask, args.out)
        print(result.mask, result.health.message)
        return
    if args.method == "dense":
        model, z = oes_fast.models.skip_oes(seed=0), oes_fast.models.dip_input(32, side, side, seed=0)
        fit = oes_fast.train_dense(model, z, noisy, steps=args.steps, lr=args.lr, clean=clean,
                                   record_every=args.record_every, checkpoint_every=args.checkpoint_every,
                                   checkpoint=args.out + ".ckpt", resume=True, clean_box=box, smoothing=args.smoothing,
                                   noise_level=level)
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
                                    checkpoint=args.out + ".ckpt", resume=True, clean_box=box,
                                    smoothing=args.smoothing, noise_level=level)
        label = args.label or f"Sparse-DIP ({args.mask} mask, density {mask.density:.3f})"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        raw = dict(raw_psnr=fit.raw_psnr, raw_ssim=fit.raw_ssim) if fit.raw_psnr else {}
        json.dump(dict(label=label, summary=fit.summary(), steps=fit.steps, psnr=fit.psnr, ssim=fit.ssim, **raw,
                       settings=dict(image=os.path.basename(args.image), size=side, sigma=args.sigma,
                                     noise_seed=args.noise_seed, lr=args.lr, steps=args.steps, padded_box=box,
                                     smoothing=args.smoothing, noise_level=level,
                                     threads=torch.get_num_threads()),
                       seconds=fit.seconds, time=run_time(fit, cpu_started, wall_started)), f)
    print(json.dumps(fit.summary()))


if __name__ == "__main__":
    main()
