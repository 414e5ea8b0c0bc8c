"""The `oes-fast` command: restore an image with a Sparse-DIP, search masks, inspect them.

    oes-fast denoise noisy.png                        # restore the photo as it is
    oes-fast inpaint scan.png --holes holes.png       # nonzero pixels of holes.png are missing
    oes-fast superres small.png --factor 4            # a 4x larger image
    oes-fast denoise                                  # demo: built-in sample, synthetic noise
    oes-fast denoise clean.png --synthetic --clean clean.png   # benchmark: degrade, restore, score
    oes-fast search photo.png --density 0.05 --out runs/mask
    oes-fast train photo.png --mask runs/mask/mask.safetensors
    oes-fast inspect runs/mask/mask.safetensors

Bad input ends with a one-line error and exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import sys

from . import compare, inspect, restore, search
from .common import UsageError, benchmark_task_arguments, common_arguments

__all__ = ["main", "build_parser", "UsageError"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oes-fast", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common, task = common_arguments(), restore.task_arguments()
    low_memory = argparse.ArgumentParser(add_help=False)
    low_memory.add_argument("--low-memory", action="store_true",
                            help="mask search with less memory per pixel, for large images: the fused engine with "
                                 "every block recomputed in the backward (same mask; on a CPU about 1.6x the time of a step); also leaves "
                                 "glibc's allocator as it is (oes_fast/allocator.py)")
    for name, help_text in restore.TASKS.items():
        commands.add_parser(name, parents=[common, task, low_memory], help=help_text)
    train = commands.add_parser("train", parents=[common, task, low_memory], help="train a Sparse-DIP with a mask")
    train.add_argument("--task", choices=tuple(restore.TASKS), default="denoise")
    find = commands.add_parser("search", parents=[common, task, low_memory], help="search a mask and save it")
    find.add_argument("--task", choices=tuple(restore.TASKS), default="denoise")
    # its own copies of the shared arguments: compare changes --fit's default, and argparse
    # parents share their argument objects
    compare.add_compare_parser(commands, parents=[common_arguments(fit="crop"), benchmark_task_arguments()])
    look = commands.add_parser("inspect", help="per-layer density table and plot of a mask file")
    look.add_argument("mask", help="mask file (.safetensors)")
    look.add_argument("--out", default=None, help="folder for the plot (default: beside the mask)")
    return parser


COMMANDS = {"inspect": inspect.run, "compare": compare.run_compare, "search": search.run}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "inspect" and not getattr(args, "low_memory", False):
        from ..allocator import keep_freed_memory

        # a long run of same-sized steps: no page faults per step (oes_fast/allocator.py); not
        # with --low-memory, where the heap's fragmentation would raise the peak it is there to cut
        keep_freed_memory()
    try:
        return COMMANDS.get(args.command, restore.run)(args)
    except UsageError as exc:
        print(f"oes-fast: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"oes-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oes-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
