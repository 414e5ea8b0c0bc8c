"""Compiles every Triton kernel that the launchers in kernels/ can launch on CUDA, for an H100
(sm_90), on a machine without a GPU, and reports registers, spills and shared memory:

    python bench/triton_compile_report.py                       # the default set, a table on stdout
    python bench/triton_compile_report.py --all --check         # every variant; exit 1 on a problem
    python bench/triton_compile_report.py --all --report bench/REPORT.md --json bench/triton_compile_sm90.json
    /root/venv-triton36/bin/python bench/triton_compile_report.py --all --check   # the oldest Triton

How: Triton's compiler needs no GPU. A stand-in driver reports the target GPUTarget("cuda", 90,
32); each launch is the launcher's own (the *_launch functions of kernels/gumbel_masked_conv2d.py;
for the fixed-configuration kernels, their module's BLOCK / NUM_WARPS with the launcher's
arguments), made with triton's MockTensor in place of tensors, and `kernel.warmup(...)` compiles
it through ptxas to a cubin with the JIT's own specialization (ints equal to 1, divisibility by
16). ptxas's verbose log (TRITON_DUMP_PTXAS_LOG) gives registers and spill stores; the compiled
metadata gives the shared memory. Distinct compiles only: launches that specialize alike share
one cubin (the JIT's cache), reported once with every layer that uses it.

Shapes: the layers of the OES network (skip_oes) and of the deep decoder at 256 and 512 pixels
(--all; 512 alone in the default set), for gumbel_masked_conv2d (fused search) and sparse_conv2d (Sparse-DIP); the flat
parameter vectors for gumbel_mask and logit_adam_step_.

The default set (what `pytest` compiles every run): what the float32 search and Sparse-DIP run
by default at 512 pixels - the three fused-conv kernels with exact float32 dots, the offset as
an argument (eager) and read from the device (CUDA graphs), the flat mask and Adam kernels, the
sparse kernels. --all adds the TF32 and bf16 dots of set_precision (also on the default path:
they must not spill either), 256 pixels, and the float64 / bfloat16 / grad_weight variants
(compiled and listed; they may spill). A problem is a compile error, a default-path kernel that
spills, or shared memory beyond an H100's 227 KB per block.

Results are cached (a JSON per Triton version under ~/.cache/oes_fast, keyed by the sources of
kernels/*.py and this file), so a second run with unchanged kernels compiles nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100_SHARED_PER_BLOCK = 227 * 1024  # max dynamic shared memory per block on sm_90 (228 KB per SM)
H100_REGS_PER_SM = 65536
H100_MAX_THREADS_PER_SM = 2048
H100_SHARED_PER_SM = 228 * 1024
CACHE_DIR = Path(os.environ.get("OES_FAST_COMPILE_CACHE", Path.home() / ".cache" / "oes_fast" / "triton_compile"))


@dataclasses.dataclass
class Row:
    """One distinct compile."""
    kernel: str        # module.kernel function
    variant: str       # constexprs that matter to a reader (precision, offset source, ...)
    dtype: str
    shapes: list       # the layers (or vectors) whose launch compiles to this cubin
    default: bool      # on the default path (the float32 search): must not spill
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    num_warps: int | None = None
    error: str | None = None

    def problems(self) -> list[str]:
        where = f"{self.kernel} [{self.variant}, {self.dtype}] at {self.shapes[0]}"
        if self.error:
            return [f"{where}: compile error: {self.error}"]
        out = []
        if self.default and (self.spill_stores or self.spill_loads):
            out.append(f"{where}: spills {self.spill_stores} B stores / {self.spill_loads} B loads per thread "
                       f"({self.regs} registers)")
        if self.shared is not None and self.shared > H100_SHARED_PER_BLOCK:
            out.append(f"{where}: needs {self.shared} B shared memory, an H100 block gets {H100_SHARED_PER_BLOCK}")
        if self.regs is None or self.spill_stores is None:
            out.append(f"{where}: no ptxas report read")
        return out

    def occupancy(self) -> float | None:
        """Resident warps per SM / 64, from registers (allocated per warp in units of 256),
        shared memory and the 2048-thread limit."""
        if self.regs is None or not self.num_warps:
            return None
        regs_per_warp = -(-max(self.regs, 1) * 32 // 256) * 256
        blocks = min(H100_REGS_PER_SM // (regs_per_warp * self.num_warps),
                     H100_MAX_THREADS_PER_SM // (32 * self.num_warps),
                     H100_SHARED_PER_SM // self.shared if self.shared else 32, 32)
        return blocks * self.num_warps / 64


# ----------------------------------------------------------------------------- ptxas log
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict:
    """{regs, spill_stores, spill_loads, stack} of the last function in a `ptxas -v` log (each
    Triton compile is one function), None where absent."""
    spills = _PTXAS_SPILLS.findall(log)
    regs = _PTXAS_REGS.findall(log)
    stack, stores, loads = (int(v) for v in spills[-1]) if spills else (None, None, None)
    return dict(regs=int(regs[-1]) if regs else None, spill_stores=stores, spill_loads=loads, stack=stack)


# ----------------------------------------------------------------------------- the stand-in GPU
class _SM90Driver:
    """Just what the JIT asks of a driver before it launches: the target, a device, a stream."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def sm90_compiler(cache_dir: str):
    """Makes kernel.warmup(...) compile for sm_90 without a GPU, with ptxas's log printed into
    the compile's stdout, in a fresh Triton cache (so ptxas runs and reports every time)."""
    import triton
    from triton.runtime import driver

    saved = (triton.knobs.nvidia.dump_ptxas_log, triton.knobs.cache.dir, driver._active)
    driver.set_active(_SM90Driver())
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.cache.dir = cache_dir
    try:
        yield
    finally:
        # not driver.reset_active(): without a GPU, making the default driver raises
        triton.knobs.nvidia.dump_ptxas_log, triton.knobs.cache.dir, driver._active = saved


# ----------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Layer:
    net: str
    c_in: int
    c_out: int
    k: int
    padding: int
    mode: str
    bias: bool
    h: int
    w: int

    def label(self) -> str:
        return f"{self.net} {self.c_in}->{self.c_out} k{self.k} {self.h}x{self.w}"


def conv_layers(net: str, size: int) -> list[Layer]:
    """The stride-1 convolutions of a network at size x size, in order (a meta-device forward)."""
    import torch

    import oes_fast

    if net == "skip_oes":
        model, x = oes_fast.models.skip_oes(), torch.empty(1, 32, size, size, device="meta")
    else:
        model = oes_fast.models.deep_decoder()
        x = torch.empty(model.input_shape(size, size), device="meta")
    layers = []

    def hook(m, inputs, out):
        layers.append(Layer(f"{net}@{size}", m.in_channels, m.out_channels, m.kernel_size[0], m.padding[0],
                            m.padding_mode, m.bias is not None, inputs[0].shape[2], inputs[0].shape[3]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.to("meta")(x)
    for h in handles:
        h.remove()
    return layers


def flat_sizes(nets) -> list[int]:
    import oes_fast

    models = {"skip_oes": oes_fast.models.skip_oes, "deep_decoder": oes_fast.models.deep_decoder}
    return sorted({sum(p.numel() for p in models[n]().parameters()) for n in nets})


# ----------------------------------------------------------------------------- launches
@dataclasses.dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    options: dict
    variant: str
    dtype: str
    shape: str
    default: bool


def _mock(dtype, shape=(1,)):
    from triton.runtime.jit import MockTensor

    return MockTensor(dtype, list(shape))


def gumbel_masked_conv2d_launches(layers, precisions, dtypes, from_ptrs, weight_grads, default) -> list[Launch]:
    import torch

    from oes_fast.kernels import gumbel_masked_conv2d as K

    out = []
    gpu = K.GPULaunch()
    for dtype in dtypes:
        for prec in (precisions if dtype == torch.float32 else ["ieee"]):
            K.set_precision(prec)
            try:
                for layer in layers:
                    n, ci, co, k, pad = 1, layer.c_in, layer.c_out, layer.k, layer.padding
                    ho, wo = layer.h + 2 * pad - k + 1, layer.w + 2 * pad - k + 1
                    x, g = _mock(dtype, (n, ci, layer.h, layer.w)), _mock(dtype, (n, co, ho, wo))
                    w, b = _mock(dtype, (co, ci, k, k)), _mock(dtype, (co,)) if layer.bias else None
                    gpad = _mock(dtype, (n, ci, layer.h + 2 * pad, layer.w + 2 * pad))
                    label = str(dtype).replace("torch.", "")
                    name = K.precision_name(dtype)
                    for from_ptr in from_ptrs:
                        offset = (0, _mock(torch.int64)) if from_ptr else (12345, x)
                        src = "offset in device memory (CUDA graph)" if from_ptr else "offset argument"
                        launches = [("forward", K.forward_launch(x, w, w, b, g, 7, *offset, from_ptr, 0.2, pad,
                                                                 layer.mode)),
                                    ("input_grad", K.input_grad_launch(g, w, w, gpad, 7, *offset, from_ptr, 0.2))]
                        for wg in weight_grads:
                            launches.append(("weight_grad" + (" +grad_weight" if wg else ""),
                                             K.weight_grad_launch(g, x, w, w, w, w if wg else None, 7, *offset,
                                                                  from_ptr, 0.2, pad, layer.mode, gpu)))
                        for what, (kernel, grid, args, options) in launches:
                            out.append(Launch(kernel, grid, args, options, f"{what}, {name}, {src}", label,
                                              layer.label(), default))
            finally:
                K.set_precision("ieee")
    return out


def gumbel_mask_launches(sizes, dtypes, default) -> list[Launch]:
    import torch

    from oes_fast.kernels import gumbel_mask as K

    out = []
    for n in sizes:
        grid = K._grid(n)
        out.append(Launch(K._philox_uniform_kernel, grid, (_mock(torch.float32), n, 7, 12345),
                          dict(BLOCK=K.BLOCK, num_warps=K.NUM_WARPS), "philox_uniform", "float32", f"flat {n}",
                          default))
        for dtype in dtypes:
            label = str(dtype).replace("torch.", "")
            t, c = _mock(dtype), K._compute_dtype(dtype)
            for from_ptr in (False, True):
                off = (0, _mock(torch.int64)) if from_ptr else (12345, t)
                src = "device offset" if from_ptr else "offset argument"
                for slope in (False, True):
                    out.append(Launch(K._gumbel_mask_fwd_kernel, grid, (t, t, t, t, n, 7, *off, 1 << 60),
                                      dict(WITH_SLOPE=slope, OFFSET_FROM_PTR=from_ptr, COMPUTE=c, BF16_BY_HAND=False,
                                           BLOCK=K.BLOCK, num_warps=K.NUM_WARPS),
                                      f"forward{' +slope' if slope else ''}, {src}", label, f"flat {n}", default))
                for wg in (False, True):
                    out.append(Launch(K._gumbel_mask_bwd_kernel, grid, (t, t, t, t, t, n, 7, *off, 1 << 60),
                                      dict(WEIGHT_GRAD=wg, OFFSET_FROM_PTR=from_ptr, COMPUTE=c, BF16_BY_HAND=False,
                                           BLOCK=K.BLOCK, num_warps=K.NUM_WARPS),
                                      f"backward{' +grad_weight' if wg else ''}, {src}", label, f"flat {n}", default))
    return out


def logit_adam_launches(sizes, dtypes, default) -> list[Launch]:
    import torch

    from oes_fast.kernels import gumbel_mask
    from oes_fast.kernels import logit_adam_step as K

    out = []
    for n in sizes:
        for dtype in dtypes:
            t, c = _mock(dtype), gumbel_mask._compute_dtype(dtype)
            partial = _mock(torch.float64)
            for scale in (False, True):
                for step_ptr in (False, True):
                    args = (t, t, t, t, t, partial, n, *([1 << 60] * 8), _mock(torch.int64) if step_ptr else partial,
                            1 << 60)
                    out.append(Launch(K._logit_adam_step_kernel, (-(-n // K.BLOCK),), args,
                                      dict(HAS_SCALE=scale, STEP_FROM_PTR=step_ptr, COMPUTE=c, BLOCK=K.BLOCK,
                                           num_warps=K.NUM_WARPS),
                                      f"{'grad_scale, ' if scale else ''}{'device step' if step_ptr else 'step argument'}",
                                      str(dtype).replace("torch.", ""), f"flat {n}", default))
    return out


def sparse_conv2d_launches(layers, dtypes, default) -> list[Launch]:
    import torch

    from oes_fast.kernels import sparse_conv2d as K

    out = []
    for dtype in dtypes:
        label = str(dtype).replace("torch.", "")
        t, i64, i32 = _mock(dtype), _mock(torch.int64), _mock(torch.int32)
        for layer in layers:
            kh = kw = layer.k
            ph = pw = layer.padding
            reflect = layer.mode == "reflect"
            # the skip network's 3x3 convs follow a nearest x2 upsampling, which Sparse-DIP fuses
            for u in ((1, 2) if layer.k == 3 and layer.net.startswith("skip") else (1,)):
                h, w = layer.h, layer.w  # as the convolution sees the input (upsampled)
                ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
                geo = (kh, kw, 1, 1, ph, pw, reflect)
                out.append(Launch(K._forward_kernel, (layer.c_out, -(-ho * wo // K.BLOCK)),
                                  (t, t, i64, i32, t, t, layer.c_in, h, w, layer.c_out, ho, wo, *geo, layer.bias, u,
                                   K.BLOCK), dict(num_warps=K.NUM_WARPS), f"forward, upsample {u}", label,
                                  layer.label(), default))
            out.append(Launch(K._input_grad_kernel, (layer.c_in, -(-layer.h * layer.w // K.BLOCK)),
                              (t, t, i64, i32, i32, t, layer.c_in, layer.h, layer.w, layer.c_out, ho, wo, *geo,
                               K.BLOCK), dict(num_warps=K.NUM_WARPS), "input_grad", label, layer.label(), default))
            out.append(Launch(K._weight_grad_kernel, (1, -(-ho * wo // K.BLOCK)),
                              (t, t, i32, i32, t, 1, layer.c_in, layer.h, layer.w, layer.c_out, ho, wo,
                               -(-ho * wo // K.BLOCK), *geo, K.BLOCK), dict(num_warps=K.NUM_WARPS), "weight_grad",
                              label, layer.label(), default))
    return out


def launches(everything: bool) -> list[Launch]:
    """The default set (float32 search at 512 pixels, each dot precision), and with
    `everything` also 256 pixels, float64 / bfloat16 and the grad_weight variants."""
    import torch

    sizes = (256, 512) if everything else (512,)
    layers = [layer for size in sizes for net in ("skip_oes", "deep_decoder") for layer in conv_layers(net, size)]
    flat = flat_sizes(("skip_oes", "deep_decoder"))
    f32 = [torch.float32]
    out = (gumbel_masked_conv2d_launches(layers, ["ieee"], f32, (False, True), (False,), True)
           + gumbel_mask_launches(flat, f32, True) + logit_adam_launches(flat, f32, True)
           + sparse_conv2d_launches(layers, f32, True))
    if everything:
        out += (gumbel_masked_conv2d_launches(layers, ["tf32", "bf16"], f32, (False, True), (False,), True)
                + gumbel_masked_conv2d_launches(layers, ["ieee", "tf32", "bf16"], f32, (False, True), (True,), False)
                + gumbel_masked_conv2d_launches(layers, [], [torch.float64], (False, True), (False, True), False)
                + gumbel_mask_launches(flat, [torch.float64, torch.bfloat16], False)
                + logit_adam_launches(flat, [torch.float64, torch.bfloat16], False)
                + sparse_conv2d_launches(layers, [torch.float64], False))
    return out


# ----------------------------------------------------------------------------- compiling
def _kernel_name(kernel) -> str:
    return f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__}"


def compile_all(todo: list[Launch], progress=None) -> list[Row]:
    """Compiles each launch for sm_90 (once per distinct specialization); a compile error is
    recorded on its row, not raised."""
    rows: dict[object, Row] = {}
    with tempfile.TemporaryDirectory(prefix="oes_fast_triton_cache_") as cache, sm90_compiler(cache):
        for i, launch in enumerate(todo):
            log = io.StringIO()
            error = compiled = None
            try:
                with contextlib.redirect_stdout(log):
                    compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.options)
            except Exception as exc:  # a compile error is a result here
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
            key = id(compiled) if compiled is not None else ("error", _kernel_name(launch.kernel), launch.variant,
                                                            launch.dtype, launch.shape)
            row = rows.get(key)
            if row is None:
                row = rows[key] = Row(_kernel_name(launch.kernel), launch.variant, launch.dtype, [], launch.default,
                                      error=error, num_warps=launch.options.get("num_warps", 4))
                if compiled is not None:
                    row.__dict__.update(parse_ptxas_log(log.getvalue()))
                    row.shared = int(compiled.metadata.shared)
            row.default |= launch.default
            if launch.shape not in row.shapes:
                row.shapes.append(launch.shape)
            if progress:
                progress(i + 1, len(todo), row)
    return list(rows.values())


def _source_hash() -> str:
    """Of kernels/*.py and of this file's code that makes and compiles the launches (not its
    docstring or report formatting)."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        h.update(path.read_bytes())
    text = Path(__file__).read_text()
    h.update(text[text.index("# " + "-" * 77 + " ptxas log"):text.index("# " + "-" * 77 + " report")].encode())
    return h.hexdigest()[:16]


def run(everything: bool, use_cache: bool = True, progress=None) -> dict:
    """{triton, ptxas, date, set, rows, seconds}: from the cache when the kernels are unchanged."""
    import triton

    which = "all" if everything else "default"
    cache_file = CACHE_DIR / f"triton{triton.__version__}_{which}_{_source_hash()}.json"
    if use_cache and cache_file.exists():
        result = json.loads(cache_file.read_text())
        result["cached"] = True
        return result
    from oes_fast.kernels import gumbel_mask

    if gumbel_mask.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreter functions, nothing to compile; "
                           "run without it")
    start = time.perf_counter()
    rows = compile_all(launches(everything), progress)
    result = dict(triton=triton.__version__, target="cuda sm_90 (GPUTarget('cuda', 90, 32))",
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), set=which,
                  seconds=round(time.perf_counter() - start, 1), rows=[dataclasses.asdict(r) for r in rows],
                  cached=False)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(result))
    return result


def rows_of(result) -> list[Row]:
    return [Row(**r) for r in result["rows"]]


# ----------------------------------------------------------------------------- report
def summary_table(rows: list[Row]) -> list[str]:
    """One line per (kernel, variant, dtype) over all the shapes: worst registers / spills / shared."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.variant, r.dtype), []).append(r)
    lines = ["| kernel | variant | dtype | cubins | layers | regs (max) | spill stores B (max) | shared KB (max) "
             "| warps | occupancy (min) | default path | errors |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for (kernel, variant, dtype), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.error]
        errors = len(rs) - len(ok)
        fmt = lambda xs: str(max(xs)) if xs else "-"  # noqa: E731
        occ = [o for o in (r.occupancy() for r in ok) if o is not None]
        lines.append(f"| {kernel} | {variant} | {dtype} | {len(rs)} | {sum(len(r.shapes) for r in rs)} | "
                     f"{fmt([r.regs for r in ok if r.regs is not None])} | "
                     f"{fmt([r.spill_stores for r in ok if r.spill_stores is not None])} | "
                     f"{fmt([round((r.shared or 0) / 1024, 1) for r in ok])} | {rs[0].num_warps} | "
                     f"{f'{min(occ):.0%}' if occ else '-'} | {'yes' if any(r.default for r in rs) else 'no'} | "
                     f"{errors} |")
    return lines


def report_section(results: list[dict]) -> str:
    lines = ["## Triton kernels compiled for sm_90 (issue 15)\n",
             "Written by `bench/triton_compile_report.py --all`: every kernel the launchers in kernels/ can launch "
             "on CUDA, with their GPU tile choices, compiled for sm_90 on a CPU machine (no GPU involved) for the "
             "layers of the OES network and the deep decoder at 256 and 512 pixels. One line per kernel "
             "variant over all layer shapes (worst case shown); occupancy = resident warps / 64 per SM from "
             "registers, shared memory and warps. A default-path kernel must not spill; float64 / bfloat16 and "
             "grad_weight variants are compiled and listed but may spill.\n"]
    for result in results:
        rows = rows_of(result)
        problems = [p for r in rows for p in r.problems()]
        lines.append(f"### Triton {result['triton']} ({result['date']}, {len(rows)} distinct compiles, "
                     f"{result['seconds']} s)\n")
        lines.append(f"Problems: {len(problems)}" + ("" if not problems else " - " + "; ".join(problems[:10])) + "\n")
        lines += summary_table(rows)
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every variant, not just the default path")
    parser.add_argument("--check", action="store_true", help="exit 1 when a kernel fails, spills on the default "
                                                             "path or needs too much shared memory")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--report", help="write this Triton version's section into this markdown file (REPORT.md)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--from-json", help="report a result that an earlier --json wrote instead of compiling")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    def progress(i, n, row):
        if not args.quiet and (i % 25 == 0 or i == n):
            print(f"  {i}/{n} launches compiled", file=sys.stderr, flush=True)

    if args.from_json:
        result = json.loads(Path(args.from_json).read_text()) | {"cached": True}
    else:
        result = run(args.all, use_cache=not args.no_cache, progress=progress)
    rows = rows_of(result)
    problems = [p for r in rows for p in r.problems()]
    if not args.quiet:
        print("\n".join(summary_table(rows)))
        print(f"\nTriton {result['triton']}: {len(rows)} distinct compiles{' (cached)' if result['cached'] else ''}, "
              f"{len(problems)} problems")
    for p in problems:
        print("PROBLEM:", p)
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    if args.report:
        sys.path.insert(0, str(ROOT / "bench"))
        from gpu_suite import write_section

        name = f"triton_compile_{result['triton']}"
        write_section(Path(args.report), report_section([result]), f"<!-- {name}:begin -->", f"<!-- {name}:end -->")
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
