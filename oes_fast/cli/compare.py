"""`oes-fast compare`: the benchmark of every method on the same image, noise, z and initial weights.

A benchmark, not a restoration: the image (or the built-in sample) is the clean reference,
degraded synthetically (--sigma, --drop, --holes bernoulli|block, --factor) and center-cropped
to the network's multiples by default (--fit crop), so every method is scored by PSNR/SSIM.

    oes-fast compare                                  # built-in sample, dense,random,magnitude
    oes-fast compare photo.png --methods dense,oes,imp,snip,synflow --density 0.05
    oes-fast compare --task inpaint --methods dense,magnitude --preset paper

Each method gets the network skip_oes(seed=--seed), the input dip_input(32, H, W, seed=--seed)
and the measurement degraded with --noise-seed; mask methods find a mask at --density for those
weights and train the Sparse-DIP from them. Outputs in --out (default runs/compare):
comparison.md, comparison.csv, psnr.png, density.png, report.json, and per method the restored
image (restored/) and the mask (masks/). They are rewritten after every method, so an
interrupted comparison keeps what it finished.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field

from ..files import write_text
from .common import (PRESETS, UsageError, load_clean_for_benchmark, make_synthetic_task, prepare_out, search_density,
                     smoothing, version)

# name -> what it is (the help text and the table's notes)
METHODS = {
    "dense": "dense DIP: every weight trained",
    "sgld": "SGLD-DIP: dense DIP with Gaussian weight noise, outputs averaged over the second half",
    "deep_decoder": "deep decoder (128 channels, 5 upsamplings), its own input",
    "oes": "OES mask search (--search-steps), then Sparse-DIP",
    "bundled": "the mask shipped with oes_fast, then Sparse-DIP",
    "imp": "LIP iterative magnitude pruning (--imp-steps per round, rewind to W0), then Sparse-DIP",
    "random": "random pruning (global), then Sparse-DIP",
    "random_layer": "random pruning (same density in every layer), then Sparse-DIP",
    "magnitude": "global magnitude pruning at init, then Sparse-DIP",
    "magnitude_layer": "per-layer magnitude pruning at init, then Sparse-DIP",
    "snip": "SNIP (global), then Sparse-DIP",
    "snip_layer": "SNIP (per layer), then Sparse-DIP",
    "grasp": "GraSP (global), then Sparse-DIP",
    "grasp_layer": "GraSP (per layer), then Sparse-DIP",
    "synflow": "SynFlow (global, --synflow-iterations), then Sparse-DIP",
    "synflow_layer": "SynFlow (per layer), then Sparse-DIP",
}
DENSE_METHODS = ("dense", "sgld", "deep_decoder")
# pruning at initialization: prune.<function>(..., scope=...)
AT_INIT = {name: (name.removesuffix("_layer"), "layer" if name.endswith("_layer") else "global")
           for name in METHODS if name.removesuffix("_layer") in ("random", "magnitude", "snip", "grasp", "synflow")}
DEFAULT_METHODS = "dense,random,magnitude"  # no search, no gradient scores: minutes on a CPU at --train-steps 2000
# IMP steps per round. The spec gives no number; with 'paper' each round is trained like one
# full run (lottery-ticket style), which at density 0.05 means 14 rounds of --train-steps.
IMP_STEPS = {"quick": 200, "paper": None}
SYNFLOW_ITERATIONS = 100
DEEP_DECODER = dict(channels=128, num_up=5)  # 256 -> an 8x8 input; any side the OES network takes works
BUNDLED_SIZE = (256, 256)  # what masks.bundled() documents, when its meta does not say


def add_compare_parser(commands, parents):
    parser = commands.add_parser(
        "compare", parents=parents, help="benchmark: compare pruning methods and baselines on a clean image",
        description="Benchmark: IMAGE (or the built-in sample) is the clean reference, degraded synthetically; "
                    "run several methods on the same degraded image, z and initial weights; write a table "
                    "(comparison.md/.csv), PSNR curves, layer-wise densities and report.json.")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, from: {', '.join(METHODS)} (default: {DEFAULT_METHODS})")
    parser.add_argument("--task", choices=("denoise", "inpaint", "superres"), default="denoise",
                        help="degradation (default: denoise with --sigma)")
    parser.add_argument("--imp-steps", type=int, default=None,
                        help="IMP training steps per round (default: 200 with --preset quick, --train-steps with paper)")
    parser.add_argument("--synflow-iterations", type=int, default=SYNFLOW_ITERATIONS,
                        help=f"SynFlow pruning iterations (default: {SYNFLOW_ITERATIONS})")
    parser.add_argument("--sgld-noise-std", type=float, default=None,
                        help="for 'sgld': standard deviation of the weight noise per step (default: sqrt(2 * lr), "
                             "the spec's variance 2 * lr; public SGLD-DIP code uses 2 * lr)")
    parser.add_argument("--oes-mask", metavar="FILE", default=None,
                        help="for 'oes': a mask found earlier on this image (e.g. by `oes-fast search`), "
                             "trained with the weights and z of its own seeds, instead of a new search")
    parser.add_argument("--resume", action="store_true",
                        help="keep the methods already finished in --out (same image, task, seeds, density and "
                             "budgets) and run only the others")
    return parser


def parse_methods(text: str) -> list[str]:
    """The method names of --methods, in order, without repeats; UsageError for unknown ones."""

    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise UsageError(f"--methods is empty; choose from {', '.join(METHODS)}")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise UsageError(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in --methods; "
                         f"valid names: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


@dataclass
class Row:
    """One method's line of the table."""

    method: str
    status: str = "ok"  # ok | skipped
    peak_psnr: float | None = None
    peak_step: int | None = None
    final_psnr: float | None = None
    final_ssim: float | None = None
    mask_seconds: float = 0.0  # search / pruning
    train_seconds: float = 0.0
    kept: int | None = None
    numel: int | None = None
    density: float | None = None
    healthy: bool | None = None  # None: no mask (dense baselines)
    notes: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return self.mask_seconds + self.train_seconds


@dataclass
class Budgets:
    train_steps: int
    search_steps: int
    imp_steps: int
    synflow_iterations: int
    record_every: int
    sgld_noise_std: float | None = None  # None: train_sgld's default


def _budgets(args) -> Budgets:

    preset = PRESETS[args.preset]
    train_steps = args.train_steps if args.train_steps is not None else preset["train_steps"]
    search_steps = args.search_steps if args.search_steps is not None else preset["search_steps"]
    imp_default = IMP_STEPS.get(args.preset)
    imp_steps = args.imp_steps if args.imp_steps is not None else (imp_default if imp_default is not None else train_steps)
    if min(train_steps, search_steps, imp_steps) < 0:
        raise UsageError("step counts must be non-negative")
    if args.synflow_iterations < 1:
        raise UsageError(f"--synflow-iterations must be at least 1, got {args.synflow_iterations}")
    if args.record_every < 1:
        raise UsageError(f"--record-every must be at least 1, got {args.record_every}")
    if args.sgld_noise_std is not None and not (math.isfinite(args.sgld_noise_std) and args.sgld_noise_std >= 0):
        raise UsageError(f"--sgld-noise-std must be finite and non-negative, got {args.sgld_noise_std}")
    return Budgets(train_steps, search_steps, imp_steps, args.synflow_iterations, args.record_every,
                   args.sgld_noise_std)


def _load_mask(path):
    """The --oes-mask file, checked against the OES network before anything is written."""
    from .. import masks, models

    try:
        mask = masks.load(path)
        mask.check_fits(models.skip_oes(seed=mask.seed or 0))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--oes-mask {path}: {exc}") from None
    return mask


def _finished_methods(out, report) -> dict:
    """method -> (Row, report record, mask or None) of an earlier run in `out` with the same
    image, task, seeds, density and budgets (what --resume keeps); {} when there is none."""
    from .. import masks

    path = os.path.join(out, "report.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return {}
    def key(r):  # what must match, as JSON has it (tuples become lists)
        settings = {k: v for k, v in r.get("settings", {}).items() if k != "methods"}
        return json.loads(json.dumps([r.get("task"), r.get("seeds"), settings, r.get("image", {}).get("source")],
                                     default=str))

    if key(earlier) != key(report):
        print(f"oes-fast compare: {path} is from other settings; running every method", file=sys.stderr)
        return {}
    finished = {}
    for name, record in earlier.get("methods", {}).items():
        row_fields = dict(record.get("row", {}))
        row_fields.pop("total_seconds", None)
        if row_fields.get("status") != "ok":
            continue
        mask_path = os.path.join(out, "masks", f"{name}.safetensors")
        mask = masks.load(mask_path) if os.path.isfile(mask_path) else None
        finished[name] = (Row(**row_fields), record, mask)
    return finished


def _bundled_mask(height: int, width: int):
    """(mask, None) when the bundled mask can be used at this size, else (None, why not)."""
    from .. import masks

    try:
        mask = masks.bundled(pixels=height * width)
    except (FileNotFoundError, ValueError) as exc:
        return None, f"skipped: the bundled mask is not available ({exc})"
    found = re.search(r"(\d+)\s*x\s*(\d+)", str(mask.meta.get("image", "")))
    size = (int(found.group(1)), int(found.group(2))) if found else BUNDLED_SIZE
    if size != (height, width):
        return None, f"skipped: the bundled mask was found at {size[0]}x{size[1]}, the image is {height}x{width}"
    return mask, None


def run_compare(args) -> int:
    import torch

    from .. import images, masks, models, prune
    from ..mask_search import search
    from ..train import train_dense, train_sgld, train_sparse

    # everything the user gave is checked before anything is written
    methods = parse_methods(args.methods)
    budgets = _budgets(args)
    smoothed = smoothing(args)  # every method but SGLD, which averages its own way
    args.density = search_density(args)  # every method here searches or prunes: auto is the paper's 0.05
    if not 0 < args.density <= 1:
        raise UsageError(f"--density must be auto or in (0, 1], got {args.density}")
    if args.seed < 0 or args.noise_seed < 0:
        raise UsageError("seeds must be non-negative")
    clean, image_info = load_clean_for_benchmark(args)
    task = make_synthetic_task(args.task, args)
    height, width = clean.shape[2:]
    oes_mask = None
    if args.oes_mask is not None:
        if "oes" not in methods:
            raise UsageError("--oes-mask is for the 'oes' method, which --methods does not list")
        oes_mask = _load_mask(args.oes_mask)
    bundled, bundled_problem = (None, None)
    if "bundled" in methods:
        bundled, bundled_problem = _bundled_mask(height, width)
        if bundled_problem:
            print(f"oes-fast compare: bundled {bundled_problem}", file=sys.stderr)
    out = prepare_out(args)  # --out, default runs/compare
    progress = False if args.no_progress else None

    model = models.skip_oes(seed=args.seed)
    z = models.dip_input(32, height, width, seed=args.seed)
    y = task.degrade(clean, seed=args.noise_seed)
    numel = sum(p.numel() for p in model.parameters())
    images.save_image(clean, os.path.join(out, "clean.png"))
    if y.shape == clean.shape:
        images.save_image(y, os.path.join(out, "degraded.png"))
    for sub in ("restored", "masks"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)

    report = dict(command="compare", task=task.to_dict(), image=image_info,
                  settings=dict(methods=methods, density=args.density, preset=args.preset, smoothing=smoothed,
                                # options left at their default (None) are not recorded: reports
                                # from before an option existed still match for --resume
                                **{k: v for k, v in asdict(budgets).items() if v is not None}),
                  seeds=dict(weights=args.seed, z=args.seed, noise=args.noise_seed, prune=args.seed),
                  versions=dict(oes_fast=version(), torch=torch.__version__, python=platform.python_version()),
                  machine=dict(platform=platform.platform(), threads=torch.get_num_threads()),
                  methods={})
    rows: list[Row] = []
    curves: dict = {}
    found_masks: dict = {}
    finished = _finished_methods(out, report) if args.resume else {}

    def train_with_mask(row: Row, mask, net=model, net_z=z):
        """Sparse-DIP from the weights the mask was made for; a disconnected mask is trained anyway."""
        mask.check_fits(net)
        state = masks.health(mask, net)
        row.kept, row.numel, row.density, row.healthy = mask.kept, mask.numel, mask.density, state.ok
        if not state.ok:
            row.notes.append(f"mask disconnects the network ({state.message}); trained anyway")
        masks.save(mask, os.path.join(out, "masks", f"{row.method}.safetensors"))
        found_masks[row.method] = mask
        return train_sparse(net, mask, net_z, y, steps=budgets.train_steps, clean=clean, degradation=task,
                            record_every=budgets.record_every, progress=progress, allow_disconnected=True,
                            smoothing=smoothed)

    def make_mask(name: str):
        """The mask of a pruning/search method for (model, z, y), with the seeds that rebuild them."""
        if name == "oes":
            found = search(model, z, y, density=args.density, steps=budgets.search_steps, seed=args.seed,
                           degradation=task, z_seed=args.seed, progress=progress)
            return found.mask, [f"search steps: {budgets.search_steps}"]
        if name == "imp":
            result = prune.imp(model, z, y, density=args.density, steps_per_round=budgets.imp_steps,
                               degradation=task, seed=args.seed)
            return result.mask, [f"IMP rounds: {len(result.masks)} of {budgets.imp_steps} steps each"]
        function, scope = AT_INIT[name]
        if function in ("snip", "grasp"):
            mask = getattr(prune, function)(model, args.density, z, y, scope=scope, seed=args.seed, degradation=task)
        elif function == "synflow":
            mask = prune.synflow(model, args.density, scope=scope, seed=args.seed,
                                 iterations=budgets.synflow_iterations)
        else:
            mask = getattr(prune, function)(model, args.density, scope=scope, seed=args.seed)
        return mask, []

    for index, name in enumerate(methods, 1):
        row = Row(name)
        print(f"[{index}/{len(methods)}] {name}: {METHODS[name]}", file=sys.stderr)
        if name in finished:  # --resume: the earlier run's row, curve and mask
            row, record, mask = finished[name]
            rows.append(row)
            report["methods"][name] = record
            if record.get("history"):
                curves[name] = (record["history"]["steps"], record["history"]["psnr"])
            if mask is not None:
                found_masks[name] = mask
            print("    done in an earlier run (--resume)", file=sys.stderr)
            continue
        if name == "oes" and oes_mask is not None:
            net = models.skip_oes(seed=oes_mask.seed if oes_mask.seed is not None else args.seed)
            net_z = models.dip_input(32, height, width, seed=oes_mask.z_seed if oes_mask.z_seed is not None
                                     else args.seed)
            row.notes.append(f"mask from {args.oes_mask} ({oes_mask.meta.get('steps', '?')} search steps, "
                             f"seeds {oes_mask.seed}, {oes_mask.z_seed})")
            fit = train_with_mask(row, oes_mask, net, net_z)
        elif name == "dense":
            fit = train_dense(model, z, y, steps=budgets.train_steps, clean=clean, degradation=task,
                              record_every=budgets.record_every, progress=progress, smoothing=smoothed)
            row.kept = row.numel = numel
            row.density = 1.0
        elif name == "sgld":
            fit = train_sgld(model, z, y, steps=budgets.train_steps, clean=clean, degradation=task,
                             record_every=budgets.record_every, progress=progress, seed=args.seed,
                             noise_std=budgets.sgld_noise_std)
            row.kept = row.numel = numel
            row.density = 1.0
            std = budgets.sgld_noise_std
            row.notes.append(f"weight noise std {'sqrt(2 lr)' if std is None else f'{std:g}'} per step, "
                             f"outputs averaged from step {budgets.train_steps // 2}")
        elif name == "deep_decoder":
            decoder = models.deep_decoder(**DEEP_DECODER, seed=args.seed)
            decoder_z = models.dip_input(*decoder.input_shape(height, width)[1:], seed=args.seed)
            fit = train_dense(decoder, decoder_z, y, steps=budgets.train_steps, clean=clean, degradation=task,
                              record_every=budgets.record_every, progress=progress, smoothing=smoothed)
            row.kept = row.numel = sum(p.numel() for p in decoder.parameters())
            row.density = 1.0
            row.notes.append(f"its own network: {row.kept:,} parameters ({row.kept / numel:.2%} of the hourglass)")
        elif name == "bundled":
            if bundled is None:
                row.status = "skipped"
                row.notes.append(bundled_problem)
                fit = None
            else:
                # the bundled mask belongs to the weights and input of its own seeds
                net = models.skip_oes(seed=bundled.seed if bundled.seed is not None else args.seed)
                net_z = models.dip_input(32, height, width, seed=bundled.z_seed if bundled.z_seed is not None
                                         else args.seed)
                if (bundled.seed, bundled.z_seed) != (args.seed, args.seed):
                    row.notes.append(f"its own weights and z (seeds {bundled.seed}, {bundled.z_seed})")
                fit = train_with_mask(row, bundled, net, net_z)
        else:
            started = time.perf_counter()
            mask, notes = make_mask(name)
            row.mask_seconds = time.perf_counter() - started
            mask.seed, mask.z_seed = args.seed, args.seed  # the file rebuilds its weights and input
            row.notes.extend(notes)
            fit = train_with_mask(row, mask)
        if fit is not None:
            summary = fit.summary()
            row.peak_psnr, row.peak_step = summary["peak_psnr"], summary["peak_step"]
            row.final_psnr, row.final_ssim = summary["final_psnr"], summary["final_ssim"]
            row.train_seconds = fit.seconds
            curves[name] = (fit.steps, fit.psnr)
            images.save_image(fit.image.clamp(0, 1), os.path.join(out, "restored", f"{name}.png"))
            report["methods"][name] = dict(summary=summary, history=dict(steps=fit.steps, psnr=fit.psnr, ssim=fit.ssim))
        else:
            report["methods"][name] = {}
        report["methods"][name].update(row=asdict(row) | dict(total_seconds=row.total_seconds))
        rows.append(row)
        _write_outputs(out, rows, curves, found_masks, report, image_info, task, budgets, args)
        if row.status != "ok":
            print(f"    {'; '.join(row.notes)}", file=sys.stderr)
        else:
            print(f"    peak PSNR {_fmt(row.peak_psnr, '.2f')} dB (step {_fmt(row.peak_step)}), "
                  f"final {_fmt(row.final_psnr, '.2f')} dB, {row.total_seconds:.1f} s", file=sys.stderr)

    if all(name in finished for name in methods):  # nothing ran: the outputs still follow the methods asked for
        _write_outputs(out, rows, curves, found_masks, report, image_info, task, budgets, args)
    print(_markdown_table(rows))
    print(f"outputs in {os.path.abspath(out)}")
    return 0


# ------------------------------------------------------------------------------ outputs
CSV_FIELDS = ("method", "status", "peak_psnr", "peak_step", "final_psnr", "final_ssim", "mask_seconds",
              "train_seconds", "total_seconds", "kept", "numel", "density", "healthy", "notes")


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _healthy_cell(row: Row) -> str:
    if row.healthy is None:
        return "-"
    return "yes" if row.healthy else "NO (trained anyway)"


def _markdown_table(rows) -> str:
    lines = ["| method | peak PSNR (dB) | peak step | final PSNR (dB) | final SSIM | time (s): mask + train | "
             "kept parameters | density | mask healthy | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        time_cell = "-" if r.status != "ok" else f"{r.mask_seconds:.1f} + {r.train_seconds:.1f} = {r.total_seconds:.1f}"
        notes = "; ".join(r.notes).replace("|", "/")
        lines.append(f"| {r.method} | {_fmt(r.peak_psnr, '.2f')} | {_fmt(r.peak_step)} | {_fmt(r.final_psnr, '.2f')} | "
                     f"{_fmt(r.final_ssim, '.4f')} | {time_cell} | {_fmt(r.kept, ',')} | {_fmt(r.density, '.4f')} | "
                     f"{_healthy_cell(r)} | {notes} |")
    return "\n".join(lines)


def _write_outputs(out, rows, curves, found_masks, report, image_info, task, budgets, args) -> None:
    import io

    from .. import plots

    header = [
        "# oes-fast compare",
        "",
        f"- image: {image_info.get('source')} ({image_info['size'][0]}x{image_info['size'][1]})",
        f"- task: {task!r}, noise seed {args.noise_seed}",
        f"- same weights skip_oes(seed={args.seed}) and z dip_input(32, H, W, seed={args.seed}) for every method",
        f"- density {args.density} (sparsity {1 - args.density:.4g}); preset {args.preset}: "
        f"{budgets.train_steps} training steps, {budgets.search_steps} search steps, {budgets.imp_steps} IMP steps "
        f"per round, {budgets.synflow_iterations} SynFlow iterations; PSNR every {budgets.record_every} steps",
        "",
        _markdown_table(rows),
        "",
        "Methods: " + "; ".join(f"{r.method}: {METHODS[r.method]}" for r in rows) + ".",
        "",
    ]
    write_text(os.path.join(out, "comparison.md"), "\n".join(header))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        record = asdict(r)
        record.update(total_seconds=r.total_seconds, notes="; ".join(r.notes))
        writer.writerow({k: ("" if record[k] is None else record[k]) for k in CSV_FIELDS})
    write_text(os.path.join(out, "comparison.csv"), buffer.getvalue())
    if curves:
        plots.psnr_curves(curves, os.path.join(out, "psnr.png"), title="PSNR against the clean image, per method")
    if found_masks:
        plots.layer_densities(found_masks, os.path.join(out, "density.png"),
                              title="Kept fraction per layer, per method")
    write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2, default=str))
