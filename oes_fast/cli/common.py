"""What the `oes-fast` subcommands share: budgets, the argument groups, loading the built-in
sample or a benchmark image, synthetic degradations, the output folder and report.json."""
from __future__ import annotations

import argparse
import json
import os

PRESETS = {
    # quick: a Sparse-DIP with the bundled mask; minutes on a 2-core CPU at 256x256 (README)
    "quick": dict(search_steps=20000, train_steps=2000),
    # the authors' budgets (OES, ICML 2024)
    "paper": dict(search_steps=60000, train_steps=40000),
}
SYNTHETIC_HOLES = ("bernoulli", "block")
# defaults of the synthetic degradations (benchmark mode)
SIGMA, DROP, FACTOR = 0.1, 0.5, 4


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


def common_arguments(fit: str = "pad") -> argparse.ArgumentParser:
    """Image, budgets, seeds and output: every command that runs a network (`fit`: the --fit default)."""
    fit_help = {"pad": "pad, default: the output has the input's size", "crop": "pad: the output has the input's size"}
    crop_help = {"pad": "crop, for benchmarks", "crop": "crop, default: benchmarks score whole network-sized crops"}
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("image", nargs="?", help="PNG/JPEG image (default: the built-in sample)")
    common.add_argument("--sample", default="astronaut", help="built-in sample used without IMAGE (default: astronaut)")
    common.add_argument("--size", type=int, default=256, help="side of the built-in sample (default: 256)")
    common.add_argument("--fit", choices=("pad", "crop"), default=fit,
                        help="an image whose sides the network cannot take: reflect-pad it and crop the result back "
                             f"({fit_help[fit]}) or center-crop it ({crop_help[fit]})")
    common.add_argument("--density", type=density_value, default="auto",
                        help="fraction of parameters kept, in (0, 1], or auto (default): with the bundled mask, the "
                             "one masks.auto_density picks for the image's size (0.05 at every size measured; 0.025 "
                             "and 0.1 are also bundled), searched nearest the image's size (256x256 or 512x512; "
                             "0.025 only at 256x256, 0.1 only at 512x512); for a search, 0.05")
    common.add_argument("--seed", type=int, default=0, help="seed of the weights, the input z and the search (default: 0)")
    common.add_argument("--noise-seed", type=int, default=0, help="seed of the synthetic degradation (default: 0)")
    common.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="step budgets: quick (default) or paper (60,000 search / 40,000 training steps)")
    common.add_argument("--search-steps", type=int, help="mask-search steps (overrides the preset)")
    common.add_argument("--train-steps", type=int, help="training steps (overrides the preset)")
    common.add_argument("--record-every", type=int, default=50, help="PSNR/SSIM every N steps (default: 50)")
    # default None: restoration.DEFAULT_SMOOTHING (not imported here: the parser loads without torch)
    common.add_argument("--smoothing", type=smoothing_value, default=None,
                        help="the result is the moving average of the network's outputs with this decay, in [0, 1) "
                             f"(default: {HELP_SMOOTHING}); 0: the last output, as the OES paper reports it")
    common.add_argument("--out", default=None, help="output folder (default: runs/<command>)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    return common


def benchmark_task_arguments() -> argparse.ArgumentParser:
    """The synthetic degradations of benchmark mode (compare), with their defaults."""
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--sigma", type=float, default=SIGMA, help=f"noise level for denoising (default: {SIGMA})")
    task.add_argument("--drop", type=float, default=DROP,
                      help=f"inpainting: fraction of pixels dropped (default: {DROP})")
    task.add_argument("--holes", choices=SYNTHETIC_HOLES, default="bernoulli", help="inpainting mask kind")
    task.add_argument("--factor", type=int, choices=(4, 8), default=FACTOR,
                      help=f"super-resolution factor (default: {FACTOR})")
    task.add_argument("--kernel", choices=("lanczos", "bicubic"), default="lanczos", help="downsampler")
    return task


def resolve_steps(args) -> tuple[int, int]:
    """(search steps, training steps) from the preset and the overrides."""
    preset = PRESETS[args.preset]
    search_steps = args.search_steps if args.search_steps is not None else preset["search_steps"]
    train_steps = args.train_steps if args.train_steps is not None else preset["train_steps"]
    if search_steps < 0 or train_steps < 0:
        raise UsageError("step counts must be non-negative")
    return search_steps, train_steps


def density_value(text: str):
    """--density: "auto" or a number."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a number in (0, 1], got {text!r}") from None


HELP_SMOOTHING = 0.99  # restoration.DEFAULT_SMOOTHING, for --help (a test keeps them equal)


def smoothing_value(text: str) -> float:
    """--smoothing: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def smoothing(args) -> float:
    """--smoothing, or the library's default."""
    from ..restoration import DEFAULT_SMOOTHING

    return DEFAULT_SMOOTHING if args.smoothing is None else args.smoothing


def search_density(args) -> float:
    """The density a search runs at: --density, auto being the paper's 0.05."""
    return 0.05 if args.density == "auto" else args.density


def check_common(args) -> None:
    if args.density != "auto" and not 0 < args.density <= 1:
        raise UsageError(f"--density must be auto or in (0, 1], got {args.density}")
    if args.seed < 0 or args.noise_seed < 0:
        raise UsageError("seeds must be non-negative")
    if args.record_every < 1:
        raise UsageError(f"--record-every must be at least 1, got {args.record_every}")


def make_synthetic_task(name: str, args):
    """The synthetic degradation `name` of benchmark mode, from --sigma / --drop / --holes / --factor."""
    from .. import tasks

    sigma = SIGMA if args.sigma is None else args.sigma
    drop = DROP if args.drop is None else args.drop
    holes = args.holes if args.holes in SYNTHETIC_HOLES else "bernoulli"
    factor = FACTOR if args.factor is None else args.factor
    if name == "denoise":
        if not 0 <= sigma <= 1:
            raise UsageError(f"--sigma must be in [0, 1], got {sigma}")
        return tasks.Denoise(sigma=sigma)
    if name == "inpaint":
        if not 0 < drop < 1:
            raise UsageError(f"--drop must be in (0, 1), got {drop}")
        return tasks.Inpaint(kind=holes, drop=drop)
    return tasks.SuperRes(factor=factor, kernel=args.kernel)


def load_sample(args):
    """The built-in sample at --size, and the report's description of it."""
    from .. import images

    multiple, min_side = 2**6, 4 * 2**6  # the 6-level OES network (Skip.min_side)
    if args.sample not in images.SAMPLE_IMAGES:
        raise UsageError(f"--sample must be one of {', '.join(images.SAMPLE_IMAGES)}, got {args.sample!r}")
    if args.size % multiple or args.size < min_side:
        raise UsageError(f"--size must be a multiple of {multiple} and at least {min_side}, got {args.size}")
    image = images.sample_image(args.sample, args.size)
    return image, dict(source=f"built-in sample {args.sample!r}", size=[args.size, args.size], changed=False)


def load_clean_for_benchmark(args):
    """The clean image of a benchmark at a size the network takes: the built-in sample, or IMAGE
    cropped (--fit crop) or reflect-padded (--fit pad) to the network's multiples; gray as 3 channels."""
    from .. import images

    if args.image is None:
        image, info = load_sample(args)
    else:
        image = images.load_image(args.image)
        image, info = images.fit_to_network(image, 2**6, 4 * 2**6, mode=args.fit)
        info = dict(info, source=os.path.abspath(args.image))
    if image.shape[1] == 1:
        image = image.expand(1, 3, *image.shape[2:]).contiguous()  # the OES network outputs 3 channels
        info["gray"] = True
    return images.check_image(image, "image"), info


def check_out(args) -> str:
    """The output folder (--out, default runs/<command>), checked writable without creating it."""
    out = args.out or os.path.join("runs", args.command)
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to the output folder {out!r}: {probe!r} is not a writable folder")
    return out


def prepare_out(args) -> str:
    """The output folder, created and checked writable."""
    out = check_out(args)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".oes-fast-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"cannot write to the output folder {out!r}: {exc.strerror or exc}") from exc
    return out


def load_mask_file(path):
    from .. import masks

    try:
        return masks.load(path)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc


def version() -> str:
    from .. import __version__

    return __version__


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo's model name on Linux)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info() -> dict:
    """Versions and machine, for report.json: the processor and which copy of the CPU kernels it
    runs (avx512, avx2 or baseline: the speed of a run depends on it), the GPU if there is one."""
    import platform

    import torch

    from .. import _C

    machine = dict(platform=platform.platform(), processor=cpu_model(), cpu_kernels=_C.cpu_isa(),
                   threads=torch.get_num_threads())
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    return dict(versions=dict(oes_fast=version(), torch=torch.__version__, python=platform.python_version()),
                machine=machine)


def write_report(out, report) -> None:
    from ..files import write_text

    write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2, default=str))
