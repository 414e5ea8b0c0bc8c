"""Multi-image mask search and IMP over several processes (torchrun).

Every process holds the same network, the same z and its own shard of the images; the
gradients are summed across processes, so the result is the single-process multi-image run
over all the images (to float rounding). In a script:

    import oes_fast, oes_fast.distributed as dist
    proc = dist.init()                          # gloo on CPU, nccl with CUDA; torchrun's env
    mine = dist.shard(all_noisy_images)         # round robin: rank r gets r, r + W, r + 2W, ...
    found = oes_fast.search(model, z, mine, density=0.05, steps=20000, distributed=True)
    if proc.rank == 0:
        oes_fast.masks.save(found.mask, "mask.safetensors")
    dist.finish()

From the shell (each torchrun process runs the same command):

    torchrun --nproc-per-node 4 -m oes_fast.distributed search a.png b.png c.png d.png \\
        --density 0.05 --steps 20000 --out runs/multi
    torchrun --nproc-per-node 2 -m oes_fast.distributed imp a.png b.png --density 0.2 --steps 500

Image i of the full list is degraded with Denoise(sigma).degrade(image, seed=i), whichever
process it lands on, so the noisy images do not depend on the number of processes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")

__all__ = ["Process", "init", "shard", "finish", "is_main", "main"]


@dataclass
class Process:
    """This process's place in the group and the device it should compute on."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


def init(backend: str | None = None) -> Process:
    """Join (or create) the default process group from torchrun's environment.

    backend: None picks nccl when CUDA is available and gloo otherwise. RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from the environment (torchrun sets them);
    without them this is a group of one process (MASTER_ADDR 127.0.0.1 and a free port), so
    the same script also runs with plain `python`. With nccl, the process uses cuda:LOCAL_RANK.
    Calling init again returns the group already joined.
    """
    dist = torch.distributed
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_initialized():
        backend = dist.get_backend()
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", rank)
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
        if world_size == 1:  # a lone process: no torchrun needed
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT (torchrun sets them)")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)  # before the group, so nccl binds the right GPU
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return Process(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, device=device)


def free_port() -> int:
    """A TCP port free on this machine right now (for MASTER_PORT)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_and_size(rank, world_size) -> tuple[int, int]:
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    return rank, world_size


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This process's share of `items`, round robin: items[rank], items[rank + W], ...
    (rank and world size default to the process group's, or 0 and 1 without one)."""
    rank, world_size = _rank_and_size(rank, world_size)
    return list(items)[rank::world_size]


def is_main() -> bool:
    """True on rank 0 (or without a process group): the process that writes files."""
    return _rank_and_size(None, None)[0] == 0


def finish(synchronize: bool = True) -> None:
    """Leave the process group (when one was joined). With `synchronize` (the default, for a run
    that went through), after a barrier, so that no rank takes the group down while another still
    uses it (in two full test runs over two stops, one rank of the two-process gloo test aborted
    with 'terminate called without an active exception'; this is the usual guard, the cause was
    not pinned down). Pass False after an error: the other ranks may never reach the barrier."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if synchronize:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------ the entry point
def build_parser() -> argparse.ArgumentParser:
    """The arguments of `python -m oes_fast.distributed` (subcommands search and imp)."""
    parser = argparse.ArgumentParser(prog="python -m oes_fast.distributed",
                                     description="Multi-image mask search / IMP, one process per torchrun rank.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("images", nargs="+", help="PNG/JPEG images, all of the same size after fitting")
    common.add_argument("--density", type=float, default=0.05, help="fraction of parameters kept (default: 0.05)")
    common.add_argument("--sigma", type=float, default=0.1, help="Gaussian noise level (default: 0.1)")
    common.add_argument("--seed", type=int, default=0, help="seed of the weights, z and the search (default: 0)")
    common.add_argument("--fit", choices=("crop", "pad"), default="crop", help="how images are fitted to the network")
    common.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default: 0.01)")
    common.add_argument("--out", default=None, help="output folder (default: runs/distributed_<command>)")
    common.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                        help="process-group backend (default: nccl with CUDA, else gloo)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar (rank 0 shows one)")
    search = commands.add_parser("search", parents=[common], help="OES mask search over all the images")
    search.add_argument("--steps", type=int, default=20000, help="search steps (default: 20000)")
    search.add_argument("--checkpoint-every", type=int, default=1000,
                        help="checkpoint every N steps (one file per rank in --out; reruns resume)")
    imp = commands.add_parser("imp", parents=[common], help="LIP multi-image iterative magnitude pruning")
    imp.add_argument("--steps", type=int, default=500, help="training steps per IMP round (default: 500)")
    imp.add_argument("--prune-fraction", type=float, default=0.2, help="pruned per round (default: 0.2)")
    imp.add_argument("--stop-on-loss-increase", type=int, default=None, metavar="PATIENCE",
                     help="stop when the fitting loss rose PATIENCE rounds in a row (default: off)")
    return parser


def load_images(paths: Sequence[str], fit: str = "crop") -> list[torch.Tensor]:
    """Load and fit every image for the OES network; all must end up the same size."""
    from . import images

    multiple, min_side = 2**6, 4 * 2**6  # the 6-level OES network
    loaded = []
    for path in paths:
        image, _ = images.fit_to_network(images.load_image(path), multiple, min_side, mode=fit)
        if image.shape[1] == 1:
            image = image.expand(1, 3, *image.shape[2:]).contiguous()  # the network outputs 3 channels
        loaded.append(image)
    sizes = {tuple(t.shape[2:]) for t in loaded}
    if len(sizes) > 1:
        listing = ", ".join(f"{p}: {t.shape[2]}x{t.shape[3]}" for p, t in zip(paths, loaded))
        raise ValueError(f"the images must have the same size after fitting ({fit}); got {listing}")
    return loaded


def _check_args(args, world_size: int) -> None:
    if not 0 < args.density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {args.density}")
    if args.steps < 0:
        raise ValueError(f"--steps must be non-negative, got {args.steps}")
    if not 0 <= args.sigma <= 1:
        raise ValueError(f"--sigma must be in [0, 1], got {args.sigma}")
    if args.seed < 0:
        raise ValueError("--seed must be non-negative")
    if len(args.images) < world_size:
        raise ValueError(f"{len(args.images)} images for {world_size} processes: every process needs at least one")


def run(args, proc: Process) -> dict:
    """One process's part of `search` or `imp`; returns the report (rank 0 also writes it)."""
    from . import masks, models, prune, tasks
    from .mask_search import search

    _check_args(args, proc.world_size)
    # every rank loads every image, so bad input fails on all ranks alike, before any collective
    clean = load_images(args.images, args.fit)
    height, width = clean[0].shape[2:]
    mine = shard(list(enumerate(clean)), proc.rank, proc.world_size)
    noisy = [tasks.Denoise(args.sigma).degrade(image, seed=i).to(proc.device) for i, image in mine]
    model = models.skip_oes(seed=args.seed).to(proc.device)
    z = models.dip_input(32, height, width, seed=args.seed, device=proc.device)
    out = args.out or os.path.join("runs", f"distributed_{args.command}")
    if proc.rank == 0:
        os.makedirs(out, exist_ok=True)
    progress = proc.rank == 0 and not args.no_progress
    started = time.perf_counter()
    report = dict(command=args.command, images=[os.path.abspath(p) for p in args.images], size=[height, width],
                  world_size=proc.world_size, backend=proc.backend, density=args.density, steps=args.steps,
                  sigma=args.sigma, seed=args.seed, noise_seeds=list(range(len(args.images))))
    if args.command == "search":
        found = search(model, z, noisy, density=args.density, steps=args.steps, lr=args.lr, seed=args.seed,
                       degradation=tasks.Denoise(args.sigma), z_seed=args.seed, progress=progress,
                       checkpoint=os.path.join(out, "search.ckpt"), checkpoint_every=args.checkpoint_every,
                       resume=True, distributed=proc.world_size > 1)
        mask = found.mask
        report.update(final_loss=found.losses[-1] if found.losses else None, health=found.health.message)
    else:
        result = prune.imp(model, z, images=noisy, density=args.density, steps_per_round=args.steps,
                           prune_fraction=args.prune_fraction, stop_on_loss_increase=args.stop_on_loss_increase,
                           lr=args.lr, degradation=tasks.Denoise(args.sigma), seed=args.seed,
                           distributed=proc.world_size > 1)
        mask = result.mask
        mask.seed, mask.z_seed = args.seed, args.seed
        report.update(losses=result.losses, densities=result.densities, stopped_at=result.stopped_at,
                      health=masks.health(mask, model).message)
    mask.meta.update(images=report["images"], world_size=proc.world_size,
                     task=dict(name="denoise", sigma=args.sigma, noise_seeds=report["noise_seeds"]))
    report.update(seconds=time.perf_counter() - started, kept=mask.kept, numel=mask.numel, mask_density=mask.density)
    if proc.rank == 0:
        masks.save(mask, os.path.join(out, "mask.safetensors"))
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(f"{args.command}: mask (density {mask.density:.4f}, {report['health']}) from {len(args.images)} images "
              f"on {proc.world_size} process(es) written to {out}")
    return report


def main(argv=None) -> int:
    """Run one rank of `python -m oes_fast.distributed` with `argv` (default sys.argv); returns
    the exit status."""
    args = build_parser().parse_args(argv)
    proc = init(args.backend)
    completed = False
    try:
        run(args, proc)
        completed = True
    except (ValueError, FileNotFoundError) as exc:
        print(f"oes_fast.distributed (rank {proc.rank}): error: {exc}", file=sys.stderr)
        return 2
    finally:
        finish(synchronize=completed)  # the barrier only after a run that went through
    return 0


if __name__ == "__main__":
    sys.exit(main())
