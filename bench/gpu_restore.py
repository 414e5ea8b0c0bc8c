"""A whole OES run on the GPU through the Python API, as a researcher would write it (README,
"Python API"), on the astronaut sample with Gaussian noise (sigma 0.1): the OES network and z
on the device, a mask search (a CUDA graph per step, checkpointed), then Sparse-DIP training
with the bundled mask for that size and the weights and z it belongs to: eagerly (engine
"auto"), then replayed from a CUDA graph (`cuda_graph=True`) with each engine. The short search
(1000 steps, a faithful one is 20,000+) leaves a mask that often cuts a layer, so it is timed
and its loss and health reported, and the training, timed with PSNR recorded, uses the
bundled mask. It checks that the pieces run end to end on a GPU (devices, checkpoints, the
mask's extraction, the training's records). Part of bench/gpu_check.sh (phase `restore`).

    python bench/gpu_restore.py [--size 512] [--search-steps 1000] [--train-steps 1000] [--json F]
    python bench/gpu_restore.py --device cpu --size 256 --search-steps 20 --train-steps 20   # a dry walk
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def table(record: dict) -> list[str]:
    """The run's figures as markdown table lines, from `main`'s record: what main prints, and the
    table of bench/gpu_check.py's report (records from before the graphed rows lack them)."""
    rows = ["| what | steps | seconds | ms/step | result |", "|---|---:|---:|---:|---|",
            f"| OES search ({record['device']}{'' if record['device'] == 'cpu' else ', CUDA graph'}) | "
            f"{record['search_steps']} | {record['search_s']:.1f} | {record['search_ms_per_step']:.2f} | loss "
            f"{record['search_first_loss']:.4f} -> {record['search_last_loss']:.4f}, mask density "
            f"{record['mask_density']:.4f}, {record['mask_health']} |",
            f"| Sparse-DIP training, {record.get('train_mask', 'the searched mask')} | {record['train_steps']} | "
            f"{record['train_s']:.1f} | {record['train_ms_per_step']:.2f} | PSNR {record['noisy_psnr']:.2f} dB noisy -> "
            f"{record['train_final_psnr']:.2f} dB final (peak {record['train_peak_psnr']:.2f}) |"]
    for engine in ("dense", "sparse"):
        r = record.get(f"graph_{engine}")
        if r:
            rows.append(f"| the same, CUDA graph, engine {engine} | {record['train_steps']} | {r['seconds']:.1f} | "
                        f"{r['ms_per_step']:.2f} | PSNR {r['final_psnr']:.2f} dB final |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--search-steps", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    import torch

    import oes_fast
    from oes_fast.metrics import psnr

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = oes_fast.models.skip_oes(seed=0).to(device)
    z = oes_fast.models.dip_input(32, args.size, args.size, seed=0, device=device)
    clean = oes_fast.images.sample_image("astronaut", args.size)
    noisy = oes_fast.tasks.Denoise(0.1).degrade(clean, seed=0)
    record = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", size=args.size,
                  search_steps=args.search_steps, train_steps=args.train_steps, noisy_psnr=psnr(noisy, clean))
    with tempfile.TemporaryDirectory() as tmp:
        sync()
        start = time.perf_counter()
        found = oes_fast.search(model, z, noisy.to(device), density=0.05, steps=args.search_steps,
                                checkpoint=Path(tmp) / "search.ckpt", checkpoint_every=max(1, args.search_steps // 2),
                                cuda_graph=device.type == "cuda", progress=False)
        sync()
        record["search_s"] = time.perf_counter() - start
    losses = found.losses
    record |= dict(search_first_loss=losses[0], search_last_loss=losses[-1], mask_density=found.mask.density,
                   mask_health=found.health.message)
    mask = oes_fast.masks.bundled(args.size * args.size)
    net = oes_fast.models.skip_oes(seed=mask.seed).to(device)
    z_mask = oes_fast.models.dip_input(32, args.size, args.size, seed=mask.z_seed, device=device)
    record["train_mask"] = mask.meta["bundled_file"]
    sync()
    start = time.perf_counter()
    fit = oes_fast.train_sparse(net, mask, z_mask, noisy.to(device), steps=args.train_steps, clean=clean.to(device),
                                record_every=max(1, args.train_steps // 10), progress=False)
    sync()
    record |= dict(train_s=time.perf_counter() - start, train_peak_psnr=fit.peak_psnr, train_final_psnr=fit.final_psnr)
    if device.type == "cuda":  # the same training replayed from a CUDA graph, both engines
        for engine in ("dense", "sparse"):
            sync()
            start = time.perf_counter()
            graphed = oes_fast.train_sparse(net, mask, z_mask, noisy.to(device), steps=args.train_steps,
                                            clean=clean.to(device), record_every=max(1, args.train_steps // 10),
                                            progress=False, engine=engine, cuda_graph=True)
            sync()
            seconds = time.perf_counter() - start
            record[f"graph_{engine}"] = dict(seconds=seconds, final_psnr=graphed.final_psnr,
                                             ms_per_step=1e3 * seconds / max(1, args.train_steps))
    record["search_ms_per_step"] = 1e3 * record["search_s"] / max(1, args.search_steps)
    record["train_ms_per_step"] = 1e3 * record["train_s"] / max(1, args.train_steps)
    print("\n".join(table(record)))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
