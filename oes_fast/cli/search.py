"""`oes-fast search`: find an OES mask for an image and save it (no training)."""
from __future__ import annotations

import os
import sys

from .common import check_common, check_out, prepare_out, resolve_steps, run_info, search_density, write_report
from .restore import observation, task_name


def run(args) -> int:
    from .. import masks, models, plots, restoration
    from ..mask_search import search

    name = task_name(args)
    check_common(args)
    args.density = search_density(args)
    search_steps, _ = resolve_steps(args)
    obs = observation(args, name)
    out = check_out(args)
    network = models.skip_oes(seed=args.seed)
    problem = restoration.prepare(obs["image"], name, holes=obs["holes"], factor=args.factor or 4,
                                  kernel=args.kernel, fit=args.fit, network=network)
    est = restoration.checked_estimate(problem, None, train_steps=0, search_steps=search_steps,
                                       density=args.density, low_memory=args.low_memory)
    print(est.message(), file=sys.stderr)
    out = prepare_out(args)
    h, w = problem.network_size
    z = models.dip_input(32, h, w, seed=args.seed)
    print(f"searching a mask at density {args.density} for {search_steps:,} steps ...", file=sys.stderr)
    found = search(network, z, problem.y, density=args.density, steps=search_steps, seed=args.seed,
                   degradation=problem.degradation, z_seed=args.seed, progress=False if args.no_progress else None,
                   checkpoint=os.path.join(out, "search.ckpt"), resume=True,
                   engine="fused" if args.low_memory else "unfused", recompute=args.low_memory)
    mask = found.mask
    mask.meta.update(image=obs["info"]["source"], task=name, image_size=[h, w])
    masks.save(mask, os.path.join(out, "mask.safetensors"))
    plots.layer_densities({"searched": mask}, os.path.join(out, "density.png"))
    write_report(out, dict(command="search", task=name, input=obs["info"], network_size=[h, w],
                           settings=dict(density=args.density, search_steps=search_steps, seed=args.seed,
                                         low_memory=args.low_memory, fit=args.fit),
                           estimate=est.to_dict(), timings=dict(search_seconds=found.seconds),
                           search=dict(final_loss=found.losses[-1] if found.losses else None, losses=found.losses),
                           mask=dict(density=mask.density, kept=mask.kept, numel=mask.numel,
                                     healthy=found.health.ok, health=found.health.message),
                           **run_info()))
    print(f"mask (density {mask.density:.4f}, {found.health.message}) written to {out}")
    return 0
