"""`oes-fast denoise | inpaint | superres | train`: restore an image with a Sparse-DIP.

The image given is the observation (oes_fast.restoration). Benchmark mode (--synthetic, or no
IMAGE: the built-in sample) degrades a clean image first and scores the result against it.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .common import (SYNTHETIC_HOLES, UsageError, check_common, check_out, load_mask_file, load_sample,
                     make_synthetic_task, prepare_out, resolve_steps, run_info, search_density, smoothing,
                     write_report)

TASKS = {"denoise": "remove noise from IMAGE", "inpaint": "fill the missing pixels of IMAGE",
         "superres": "enlarge IMAGE x4 / x8"}


def task_arguments() -> argparse.ArgumentParser:
    """What the restoring commands take beyond the common arguments."""
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--holes", metavar="FILE",
                      help="inpaint: an image of IMAGE's size whose nonzero pixels mark the missing ones (default: "
                           "IMAGE's transparent pixels); with --synthetic: bernoulli or block holes are made")
    task.add_argument("--factor", type=int, choices=(4, 8), default=None, help="super-resolution factor (default: 4)")
    task.add_argument("--kernel", choices=("lanczos", "bicubic"), default="lanczos",
                      help="super-resolution: the downsampler the output must agree with IMAGE under")
    task.add_argument("--clean", metavar="FILE", help="a reference of the output's size: PSNR/SSIM against it")
    task.add_argument("--synthetic", action="store_true",
                      help="benchmark mode: IMAGE is clean; degrade it first (--sigma, --drop, --holes bernoulli|block, "
                           "--factor) and score the result against it")
    task.add_argument("--sigma", type=float, default=None, help="--synthetic denoise: noise level (default: 0.1)")
    task.add_argument("--drop", type=float, default=None,
                      help="--synthetic inpaint: fraction of pixels dropped (default: 0.5)")
    task.add_argument("--mask", help="mask file to train with (default: the bundled mask)")
    task.add_argument("--search", action="store_true", help="search an image-specific mask first")
    task.add_argument("--dense-baseline", action="store_true", help="also train dense DIP for comparison")
    task.add_argument("--allow-disconnected", action="store_true", help="train even if the mask cuts the network")
    task.add_argument("--engine", choices=("auto", "sparse", "dense"), default="auto",
                      help="Sparse-DIP training engine: sparse kernels, masked dense, or auto (default)")
    task.add_argument("--noise-level", type=noise_level_value, default="auto", metavar="auto|off|SIGMA",
                      help="fit the image only down to this noise level (a standard deviation in [0, 1], the image's "
                           "range: 0.1 is about 25/255), so the network stops before it fits the noise; auto "
                           "(default): estimated from the image for denoise, off for inpaint and superres; off: the "
                           "plain loss, as the OES paper trains")
    return task


def noise_level_value(text: str):
    """--noise-level: auto, off, or a number in [0, 1]."""
    if text in ("auto", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be auto, off or a standard deviation in [0, 1], got {text!r}")
    return value


def task_name(args) -> str:
    return args.task if args.command in ("train", "search") else args.command


def observation(args, name: str) -> dict:
    """What restore() gets from the arguments: image, holes, clean reference, factor, and how to
    write the output (bit depth), with the report's description of the input."""
    synthetic = args.synthetic or args.image is None
    holes_kind = args.holes in SYNTHETIC_HOLES
    if args.holes is not None and name != "inpaint":
        raise UsageError(f"--holes is for inpaint, not {name}")
    if not synthetic:
        for flag, value in (("--sigma", args.sigma), ("--drop", args.drop)):
            if value is not None:
                raise UsageError(f"{flag} is for --synthetic (benchmark mode): IMAGE is restored as it is, "
                                 "nothing is added to it")
        if holes_kind:
            raise UsageError(f"--holes {args.holes} makes synthetic holes: add --synthetic, or give a holes image")
        return dict(image=args.image, holes=args.holes, clean=args.clean, bit_depth=None,
                    info=dict(source=os.path.abspath(args.image), mode="observation"))
    from .. import images

    if args.image is None:
        clean, info = load_sample(args)
        depth = 8
    else:
        pixels, _, depth = images.read_image(args.image)
        clean = images.check_image(images.array_to_tensor(pixels), f"image file {args.image!r}")
        info = dict(source=os.path.abspath(args.image))
        if args.fit == "crop":
            clean, fit = images.fit_to_network(clean, 2**6, 4 * 2**6, mode="crop")
            info["fit"] = fit
    task = make_synthetic_task(name, args)
    if name == "superres" and (clean.shape[2] % task.factor or clean.shape[3] % task.factor):
        raise UsageError(f"--synthetic superres: the image is {clean.shape[2]}x{clean.shape[3]}, not divisible by "
                         f"the factor {task.factor}; use --fit crop")
    # an observation is an image: values in [0, 1] (Lanczos downsampling overshoots a little)
    y = task.degrade(clean, seed=args.noise_seed).clamp(0.0, 1.0)
    holes = None
    if name == "inpaint":
        if args.holes is not None and not holes_kind:  # a holes file on a clean image
            from .. import restoration

            missing = restoration.read_holes(args.holes, tuple(clean.shape[2:]))
            y = clean * torch_from(~missing)
            holes = missing
        else:
            holes = (task.mask[0, 0] == 0).numpy()
    info.update(mode="synthetic", degradation=task.to_dict())
    return dict(image=_to_array(y), holes=holes, clean=args.clean if args.clean else _to_array(clean),
                bit_depth=depth, info=info, clean_tensor=clean)


def torch_from(keep: np.ndarray):
    import torch

    return torch.from_numpy(keep.astype(np.float32))[None, None]


def _to_array(t) -> np.ndarray:
    """(1, C, H, W) float tensor -> (H, W, C) float32 array (C = 1 stays (H, W, 1))."""
    return t[0].permute(1, 2, 0).contiguous().numpy().astype(np.float32)


def _unit(array) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a / 255.0
    if a.dtype == np.uint16:
        return a / 65535.0
    return a.astype(np.float64)


def _write(path, array, bit_depth) -> None:
    """An array restore() returned (or an input array) as a PNG at `bit_depth`; alpha kept."""
    from .. import images

    a = _unit(array)
    a = a[:, :, None] if a.ndim == 2 else a
    alpha = a[:, :, -1] if a.shape[2] in (2, 4) else None
    pixels = a[:, :, :-1] if alpha is not None else a
    images.write_image(path, pixels, bit_depth, alpha)


def run(args) -> int:
    from .. import masks, models, plots, restoration

    name = task_name(args)
    check_common(args)
    search_steps, train_steps = resolve_steps(args)
    if args.search and args.mask:
        raise UsageError("--mask and --search exclude each other")
    if args.command == "train" and not args.mask:
        raise UsageError("train needs --mask FILE (or use denoise/inpaint/superres, which default to the bundled mask)")
    progress = False if args.no_progress else None
    obs = observation(args, name)
    mask = "search" if args.search else (load_mask_file(args.mask) if args.mask else None)
    out = check_out(args)  # created once the run starts: bad input leaves nothing behind
    settings = dict(task=name, holes=obs["holes"], factor=args.factor or 4, kernel=args.kernel, fit=args.fit,
                    density=args.density, search_steps=search_steps, seed=args.seed, engine=args.engine,
                    low_memory=args.low_memory, record_every=args.record_every,
                    allow_disconnected=args.allow_disconnected, progress=progress, smoothing=smoothing(args),
                    noise_level=args.noise_level)
    log = (lambda m: print(m, file=sys.stderr))
    if args.search:
        print(f"searching a mask at density {search_density(args)} for {search_steps:,} steps, then training "
              f"{train_steps:,} steps ...", file=sys.stderr)
    restored, report = restoration.restore(obs["image"], mask=mask, steps=train_steps, clean=obs["clean"],
                                           checkpoint_dir=out, log=log, **settings)
    out = prepare_out(args)
    bit_depth = obs["bit_depth"] or report.input["bit_depth"]
    _write(os.path.join(out, "restored.png"), restored, bit_depth)
    given = restoration.read_observation(obs["image"])
    input_array = _input_array(given)
    _write(os.path.join(out, "input.png"), input_array, bit_depth)
    panels = {"input": _unit(input_array), "restored": _unit(restored)}
    if report.reference:
        reference = restoration.read_observation(obs["clean"], "reference")
        panels["reference"] = _unit(_input_array(reference))
        _write(os.path.join(out, "clean.png"), panels["reference"], bit_depth)
    plots.side_by_side(panels, os.path.join(out, "side_by_side.png"))
    used = report.used_mask
    masks.save(used, os.path.join(out, "mask.safetensors"))
    plots.layer_densities({report.mask["source"] if report.mask["source"] != "search" else "searched": used},
                          os.path.join(out, "density.png"))
    plots.loss_curve(report.losses, os.path.join(out, "loss.png"))
    record = dict(command=args.command, image=obs["info"], **report.to_dict(), **run_info())
    curves = {"Sparse-DIP": (report.psnr_steps, report.psnr)}
    if args.dense_baseline:
        dense, dense_report = restoration.restore(obs["image"], method="dense", steps=train_steps, clean=obs["clean"],
                                                  checkpoint_dir=out, log=log,
                                                  **{k: v for k, v in settings.items() if k not in ("density",)})
        _write(os.path.join(out, "restored_dense.png"), dense, bit_depth)
        record["dense_dip"] = dense_report.to_dict()
        curves["dense DIP"] = (dense_report.psnr_steps, dense_report.psnr)
    if report.reference:
        plots.psnr_curves(curves, os.path.join(out, "psnr.png"))
    write_report(out, record)
    if report.reference:
        print(f"PSNR peak {report.peak_psnr:.2f} dB, final {report.final_psnr:.2f} dB "
              f"(SSIM {report.final_ssim:.3f}); outputs in {os.path.abspath(out)}")
    else:
        print(f"restored {report.output_size[0]}x{report.output_size[1]} in "
              f"{report.timings['total_seconds']:.0f} s (no reference: loss {report.losses[-1]:.3g}); "
              f"outputs in {os.path.abspath(out)}" if report.losses else f"outputs in {os.path.abspath(out)}")
    return 0


def _input_array(obs) -> np.ndarray:
    """The observation as an (H, W, C) float array in [0, 1], alpha last when it has one."""
    a = obs.pixels[0].permute(1, 2, 0).numpy().astype(np.float64)
    return np.concatenate([a, obs.alpha[:, :, None]], axis=2) if obs.alpha is not None else a
