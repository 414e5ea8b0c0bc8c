"""The `oes-fast` command: restore an image with a Sparse-DIP, search masks, inspect them.

    oes-fast denoise                 # built-in sample, synthetic noise, bundled mask
    oes-fast denoise photo.png --search --search-steps 20000 --out runs/photo
    oes-fast inpaint photo.png --mask my_mask.safetensors
    oes-fast superres photo.png --factor 4
    oes-fast search photo.png --density 0.05 --out runs/mask
    oes-fast train photo.png --mask runs/mask/mask.safetensors
    oes-fast inspect runs/mask/mask.safetensors

Bad input ends with a one-line error and exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

PRESETS = {
    # quick: the default job finishes in about five minutes on a 2-core CPU
    "quick": dict(search_steps=20000, train_steps=2000),
    # the authors' budgets (OES, ICML 2024)
    "paper": dict(search_steps=60000, train_steps=40000),
}
RESTORE_COMMANDS = ("denoise", "inpaint", "superres", "train")


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oes-fast", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("image", nargs="?", help="PNG/JPEG image (default: the built-in sample)")
    common.add_argument("--sample", default="astronaut", help="built-in sample used without IMAGE (default: astronaut)")
    common.add_argument("--size", type=int, default=256, help="side of the built-in sample (default: 256)")
    common.add_argument("--fit", choices=("crop", "pad"), default="crop",
                        help="how an image whose sides the network cannot take is made to fit (default: crop)")
    common.add_argument("--density", type=float, default=0.05, help="fraction of parameters kept (default: 0.05)")
    common.add_argument("--seed", type=int, default=0, help="seed of the weights, the input z and the search (default: 0)")
    common.add_argument("--noise-seed", type=int, default=0, help="seed of the synthetic degradation (default: 0)")
    common.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="step budgets: quick (default) or paper (60,000 search / 40,000 training steps)")
    common.add_argument("--search-steps", type=int, help="mask-search steps (overrides the preset)")
    common.add_argument("--train-steps", type=int, help="training steps (overrides the preset)")
    common.add_argument("--record-every", type=int, default=50, help="PSNR/SSIM every N steps (default: 50)")
    common.add_argument("--out", default=None, help="output folder (default: runs/<command>)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--sigma", type=float, default=0.1, help="noise level for denoising (default: 0.1)")
    task.add_argument("--drop", type=float, default=0.5, help="inpainting: fraction of pixels dropped (default: 0.5)")
    task.add_argument("--holes", choices=("bernoulli", "block"), default="bernoulli", help="inpainting mask kind")
    task.add_argument("--factor", type=int, choices=(4, 8), default=4, help="super-resolution factor (default: 4)")
    task.add_argument("--kernel", choices=("lanczos", "bicubic"), default="lanczos", help="downsampler")
    restore = argparse.ArgumentParser(add_help=False)
    restore.add_argument("--mask", help="mask file to train with (default: the bundled mask)")
    restore.add_argument("--search", action="store_true", help="search an image-specific mask first")
    restore.add_argument("--dense-baseline", action="store_true", help="also train dense DIP for comparison")
    restore.add_argument("--allow-disconnected", action="store_true", help="train even if the mask cuts the network")
    restore.add_argument("--engine", choices=("auto", "sparse", "dense"), default="auto",
                         help="Sparse-DIP training engine: sparse kernels, masked dense, or auto (default)")
    low_memory = argparse.ArgumentParser(add_help=False)
    low_memory.add_argument("--low-memory", action="store_true",
                            help="mask search with less memory per pixel, for large images: the fused engine with "
                                 "every block recomputed in the backward (same mask; on a CPU about 1.8x slower); also leaves "
                                 "glibc's allocator as it is (oes_fast/allocator.py)")
    for name, help_text in (("denoise", "remove Gaussian noise"), ("inpaint", "fill in missing pixels"),
                            ("superres", "x4 / x8 super-resolution")):
        commands.add_parser(name, parents=[common, task, restore, low_memory], help=help_text)
    train = commands.add_parser("train", parents=[common, task, restore, low_memory],
                                help="train a Sparse-DIP with a mask")
    train.add_argument("--task", choices=("denoise", "inpaint", "superres"), default="denoise")
    search = commands.add_parser("search", parents=[common, task, low_memory], help="search a mask and save it")
    search.add_argument("--task", choices=("denoise", "inpaint", "superres"), default="denoise")
    from .compare import add_compare_parser

    add_compare_parser(commands, parents=[common, task])
    inspect = commands.add_parser("inspect", help="per-layer density table and plot of a mask file")
    inspect.add_argument("mask", help="mask file (.safetensors)")
    inspect.add_argument("--out", default=None, help="folder for the plot (default: beside the mask)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "inspect" and not getattr(args, "low_memory", False):
        from .allocator import keep_freed_memory

        # a long run of same-sized steps: no page faults per step (oes_fast/allocator.py); not
        # with --low-memory, where the heap's fragmentation would raise the peak it is there to cut
        keep_freed_memory()
    try:
        if args.command == "inspect":
            return inspect_mask(args)
        if args.command == "compare":
            from .compare import run_compare

            return run_compare(args)
        return run(args)
    except UsageError as exc:
        print(f"oes-fast: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"oes-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oes-fast: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------ restore / search
def _task_name(args) -> str:
    return args.task if args.command in ("train", "search") else args.command


def _make_task(args):
    from . import tasks

    name = _task_name(args)
    if name == "denoise":
        if not 0 <= args.sigma <= 1:
            raise UsageError(f"--sigma must be in [0, 1], got {args.sigma}")
        return tasks.Denoise(sigma=args.sigma)
    if name == "inpaint":
        if not 0 < args.drop < 1:
            raise UsageError(f"--drop must be in (0, 1), got {args.drop}")
        return tasks.Inpaint(kind=args.holes, drop=args.drop)
    return tasks.SuperRes(factor=args.factor, kernel=args.kernel)


def _load_clean(args):
    from . import images
    from .models import skip_oes

    multiple, min_side = 2**6, 4 * 2**6  # the 6-level OES network (Skip.min_side)
    if args.image is None:
        if args.sample not in images.SAMPLE_IMAGES:
            raise UsageError(f"--sample must be one of {', '.join(images.SAMPLE_IMAGES)}, got {args.sample!r}")
        if args.size % multiple or args.size < min_side:
            raise UsageError(f"--size must be a multiple of {multiple} and at least {min_side}, got {args.size}")
        image = images.sample_image(args.sample, args.size)
        info = dict(source=f"built-in sample {args.sample!r}", size=[args.size, args.size], changed=False)
    else:
        image = images.load_image(args.image)
        image, info = images.fit_to_network(image, multiple, min_side, mode=args.fit)
        info = dict(info, source=os.path.abspath(args.image))
    if image.shape[1] == 1:
        image = image.expand(1, 3, *image.shape[2:]).contiguous()  # the OES network outputs 3 channels
        info["gray"] = True
    return images.check_image(image, "image"), info


def _prepare_out(args) -> str:
    out = args.out or os.path.join("runs", args.command)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".oes-fast-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"cannot write to the output folder {out!r}: {exc.strerror or exc}") from exc
    return out


def _load_mask_file(path):
    from . import masks

    try:
        return masks.load(path)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc


def run(args) -> int:
    import torch

    from . import images, masks, models, plots
    from .train import train_dense, train_sparse

    preset = PRESETS[args.preset]
    search_steps = args.search_steps if args.search_steps is not None else preset["search_steps"]
    train_steps = args.train_steps if args.train_steps is not None else preset["train_steps"]
    if search_steps < 0 or train_steps < 0:
        raise UsageError("step counts must be non-negative")
    if not 0 < args.density <= 1:
        raise UsageError(f"--density must be in (0, 1], got {args.density}")
    if args.seed < 0 or args.noise_seed < 0:
        raise UsageError("seeds must be non-negative")
    progress = False if args.no_progress else None
    searching = args.command == "search" or getattr(args, "search", False)
    if searching and getattr(args, "mask", None):
        raise UsageError("--mask and --search exclude each other")
    if args.command == "train" and not args.mask:
        raise UsageError("train needs --mask FILE (or use denoise/inpaint/superres, which default to the bundled mask)")

    # everything the user gave is checked before anything is written
    clean, image_info = _load_clean(args)
    task = _make_task(args)
    if not searching:
        mask = _load_mask_file(args.mask) if args.mask else masks.bundled()
        weight_seed = mask.seed if mask.seed is not None else args.seed
        z_seed = mask.z_seed if mask.z_seed is not None else args.seed
        mask_source = os.path.abspath(args.mask) if args.mask else "bundled"
    else:
        mask, weight_seed, z_seed, mask_source = None, args.seed, args.seed, "search"
    model = models.skip_oes(seed=weight_seed)
    if mask is not None:
        mask.check_fits(model)
    out = _prepare_out(args)

    height, width = clean.shape[2:]
    z = models.dip_input(32, height, width, seed=z_seed)
    y = task.degrade(clean, seed=args.noise_seed)
    images.save_image(clean, os.path.join(out, "clean.png"))
    if y.shape == clean.shape:
        images.save_image(y, os.path.join(out, "degraded.png"))
    report = dict(command=args.command, task=task.to_dict(), image=image_info,
                  settings=dict(density=args.density, preset=args.preset, search_steps=search_steps,
                                train_steps=train_steps, record_every=args.record_every,
                                low_memory=args.low_memory),
                  seeds=dict(weights=weight_seed, z=z_seed, noise=args.noise_seed, search=args.seed),
                  versions=dict(oes_fast=_version(), torch=torch.__version__, python=platform.python_version()),
                  machine=dict(platform=platform.platform(), threads=torch.get_num_threads()),
                  timings={}, mask=dict(source=mask_source), engine=getattr(args, "engine", None))

    if searching:
        print(f"searching a mask at density {args.density} for {search_steps} steps ...", file=sys.stderr)
        from .mask_search import search

        found = search(model, z, y, density=args.density, steps=search_steps, seed=args.seed,
                       degradation=task, z_seed=z_seed, progress=progress,
                       checkpoint=os.path.join(out, "search.ckpt"), resume=True,
                       engine="fused" if args.low_memory else "unfused", recompute=args.low_memory)
        mask = found.mask
        report["timings"]["search_seconds"] = found.seconds
        report["search"] = dict(final_loss=found.losses[-1] if found.losses else None, steps=search_steps)
    masks.save(mask, os.path.join(out, "mask.safetensors"))
    health = masks.health(mask, model)
    report["mask"].update(density=mask.density, sparsity=mask.sparsity, kept=mask.kept, numel=mask.numel,
                          healthy=health.ok, health=health.message, meta=mask.meta)
    plots.layer_densities({mask_source if mask_source != "search" else "searched": mask},
                          os.path.join(out, "density.png"))
    if args.command == "search":
        _write_report(out, report)
        print(f"mask (density {mask.density:.4f}, {health.message}) written to {out}")
        return 0
    if not health.ok and not args.allow_disconnected:
        _write_report(out, report)
        raise UsageError(f"the mask disconnects the network ({health.message}); a longer search "
                         "(--search-steps) usually fixes this, or pass --allow-disconnected")

    print(f"training a Sparse-DIP ({mask.density:.1%} of the weights) for {train_steps} steps ...", file=sys.stderr)
    fit = train_sparse(model, mask, z, y, steps=train_steps, clean=clean, degradation=task,
                       record_every=args.record_every, progress=progress, allow_disconnected=args.allow_disconnected,
                       checkpoint=os.path.join(out, "train.ckpt"), resume=True, engine=args.engine)
    images.save_image(fit.image.clamp(0, 1), os.path.join(out, "restored.png"))
    report["timings"]["train_seconds"] = fit.seconds
    report["sparse_dip"] = fit.summary() | dict(final_ssim=fit.ssim[-1] if fit.ssim else None)
    curves = {"Sparse-DIP": (fit.steps, fit.psnr)}
    if args.dense_baseline:
        dense = train_dense(model, z, y, steps=train_steps, clean=clean, degradation=task,
                            record_every=args.record_every, progress=progress)
        images.save_image(dense.image.clamp(0, 1), os.path.join(out, "restored_dense.png"))
        report["dense_dip"] = dense.summary()
        report["timings"]["dense_seconds"] = dense.seconds
        curves["dense DIP"] = (dense.steps, dense.psnr)
    report["history"] = dict(steps=fit.steps, psnr=fit.psnr, ssim=fit.ssim)
    plots.psnr_curves(curves, os.path.join(out, "psnr.png"))
    _write_report(out, report)
    summary = report["sparse_dip"]
    print(f"PSNR peak {summary['peak_psnr']:.2f} dB (step {summary['peak_step']}), final {summary['final_psnr']:.2f} dB; "
          f"outputs in {os.path.abspath(out)}")
    return 0


def _version() -> str:
    from . import __version__

    return __version__


def _write_report(out, report) -> None:
    from .files import write_text

    write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2, default=str))


# ------------------------------------------------------------------------------ inspect
def inspect_mask(args) -> int:
    from . import masks, models, plots

    mask = _load_mask_file(args.mask)
    print(f"{args.mask}: kept {mask.kept:,} of {mask.numel:,} parameters, "
          f"density {mask.density:.4f} (sparsity {mask.sparsity:.4f})")
    print(f"{'parameter':40s} {'shape':>18s} {'kept':>9s} {'numel':>9s} {'density':>8s} {'empty out ch':>12s}")
    for row in mask.layer_stats():
        empty = f"{row['empty_out_channels']}/{row['out_channels']}" if "out_channels" in row else ""
        print(f"{row['name']:40s} {str(tuple(row['shape'])):>18s} {row['kept']:9d} {row['numel']:9d} "
              f"{row['density']:8.4f} {empty:>12s}")
    if mask.architecture:
        model = models.build(mask.architecture)
        mask.check_fits(model)
        print("health:", masks.health(mask, model).message)
    folder = args.out or os.path.dirname(os.path.abspath(args.mask))
    os.makedirs(folder, exist_ok=True)
    plot = os.path.join(folder, os.path.basename(args.mask).rsplit(".", 1)[0] + "_density.png")
    plots.layer_densities({os.path.basename(args.mask): mask}, plot)
    print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
