"""The whole GPU suite of the search step in one command (issue 5):

    python bench/gpu_suite.py --out bench/REPORT_GPU.md      # or --out bench/REPORT.md

Builds nothing (install the package first: pip install --no-build-isolation -e .). In order:
1. environment: device, driver/CUDA, torch, triton, date;
2. machine floors: measured peak matmul TFLOP/s (float32 exact, TF32, bfloat16) and copy
   bandwidth;
3. correctness first: gumbel_masked_conv2d (Triton, and CUDA C++ when built) against the
   float64 reference at one size, forward and the three gradients; one step of the fused
   engine against the unfused one on the OES network;
4. step time (CUDA events after warm-up) and peak memory (torch.cuda.max_memory_allocated)
   of one search step at 512, 1024, 2048, 4096 square for
     authors   the authors'-style step (bench/bench_search_step.py:AuthorsStep)
     unfused   oes_fast's unfused engine: one flat gumbel_mask launch + cuDNN convs
     compiled  torch.compile of the reference step (plain PyTorch mask + network + loss)
     fused     the fused engine: gumbel_masked_conv2d for every conv (Triton), fused Adam
     fused_cpp the fused engine on the CUDA C++ kernels (sizes up to --cpp-max-size)
     recompute the fused engine with recompute=True (blocks run again in the backward)
     graphed   the unfused engine's step replayed from one captured CUDA graph
     fused_graphed  the same for the fused engine
   sizes that run out of memory are recorded as OOM; achieved TFLOP/s from the counted conv
   FLOPs (3 x the forward's: forward, input gradient, weight gradient);
5. largest square image whose step fits in 80 GB, from the measured bytes per pixel;
6. precision: a short search (--precision-steps) of the fused engine with exact float32,
   TF32 and bfloat16 dots: final-mask agreement with float32 and PSNR of the output;
then writes one markdown section (between markers, replacing an older one) into --out.
Without a CUDA device it prints "no CUDA device: GPU suite not run" and exits with 0.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

BEGIN, END = "<!-- gpu_suite:begin -->", "<!-- gpu_suite:end -->"
TAU, KL, DENSITY, LR = 0.2, 1e-9, 0.05, 0.01
GB = 1e9


# ----------------------------------------------------------------------------- helpers
def cuda_time(fn, warmup: int, iters: int) -> list[float]:
    """Milliseconds per call, CUDA events around each call, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def kernel_profile(step, calls: int = 3) -> tuple[float, float]:
    """(kernels launched, milliseconds spent in them) per call of `step`, from torch.profiler's
    CUDA activity over `calls` calls after one more: against the call's time, what is left is
    launch and host overhead. Not yet run on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels) / calls, sum(e.time_range.elapsed_us() for e in kernels) / calls / 1e3


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def peak_matmul_tflops(dtype, tf32: bool, n: int = 8192) -> float:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(n, n, device="cuda", dtype=dtype, generator=g)  # never time on zeros
        b = torch.randn(n, n, device="cuda", dtype=dtype, generator=g)
        ms = median(cuda_time(lambda: a @ b, 3, 10))
        return 2 * n**3 / (ms * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def copy_bandwidth(nbytes: int = 2**30) -> float:
    src = torch.rand(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median(cuda_time(lambda: dst.copy_(src), 3, 10))
    return 2 * nbytes / (ms * 1e-3) / GB  # read + write


# ----------------------------------------------------------------------------- the problem
def problem(size, device="cuda"):
    import oes_fast

    model = oes_fast.models.skip_oes(seed=0).to(device)
    z = oes_fast.models.dip_input(32, size, size, seed=0, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    # a smooth image (a random 16x16 field upsampled), not noise: the network can fit it
    y = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(size, size), mode="bicubic",
                                        align_corners=False).clamp(0, 1).to(device)
    return model, z, y


def conv_flops(model, size) -> float:
    """FLOPs of one forward's convolutions at size x size (2 per multiply-add), counted on hooks."""
    flops = []

    def hook(module, inputs, out):
        flops.append(2.0 * out.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        side = 256  # all convs scale with the pixel count: count at 256 and scale
        with torch.no_grad():
            import oes_fast

            model(oes_fast.models.dip_input(32, side, side, seed=0, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return sum(flops) * (size / 256) ** 2


class UnfusedStep:
    """oes_fast.search's unfused engine: one flat gumbel_mask, the network's own (cuDNN) convs,
    the fused logit update (oes_fast.mask_search.SearchStep)."""

    engine, recompute = "unfused", False

    def __init__(self, model, z, y):
        from oes_fast.mask_search import SearchStep

        self.run = SearchStep(model, z, y, density=DENSITY, lr=LR, tau=TAU, kl=KL, seed=0, engine=self.engine,
                              recompute=self.recompute)
        self.step = 0

    def __call__(self):
        self.run(self.step)
        self.step += 1


class CompiledStep:
    """torch.compile of the reference step: plain PyTorch mask (uniforms from torch.rand),
    network, loss and prior compiled together; backward through AOTAutograd; fused Adam."""

    def __init__(self, model, z, y):
        from torch.func import functional_call

        from oes_fast import reference
        from oes_fast.flat import FlatLayout

        self.layout = FlatLayout.from_model(model)
        weights = self.layout.flatten({n: p.detach() for n, p in model.named_parameters()})
        self.logits = torch.zeros(self.layout.numel, device=z.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=LR, fused=True)
        layout = self.layout

        def loss_fn(logits, u):
            masked = reference.gumbel_mask(logits, weights, u, TAU)
            out = functional_call(model, layout.views(masked), (z,))
            s = torch.sigmoid(logits)
            prior = (s * torch.log((s + reference.KL_EPS) / DENSITY)
                     + (1 - s) * torch.log((1 - s + reference.KL_EPS) / (1 - DENSITY))).sum()
            return torch.mean((out - y) ** 2) + KL * prior

        self.loss_fn = torch.compile(loss_fn)

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=False)
        u = torch.rand(self.layout.numel, device=self.logits.device)
        self.loss_fn(self.logits, u).backward()
        self.optimizer.step()


class FusedStep(UnfusedStep):
    """The fused engine (oes_fast/fused_search.py), on the chosen CUDA backend."""

    engine = "fused"

    def __init__(self, model, z, y, backend="triton"):
        super().__init__(model, z, y)
        self.backend = backend

    def __call__(self):
        from oes_fast import ops

        ops.set_cuda_backend(self.backend)
        super().__call__()


class GraphedStep(UnfusedStep):
    """The unfused engine's step captured in one CUDA graph (search(cuda_graph=True)): its
    first GraphedSearchStep.warmup calls run eagerly, the next captures, the rest replay."""

    def __init__(self, model, z, y):
        from oes_fast.mask_search import GraphedSearchStep

        super().__init__(model, z, y)
        self.graphed = GraphedSearchStep(self.run, first_step=0)

    def __call__(self):
        self.graphed()


class FusedGraphedStep(GraphedStep):
    """The fused engine's step (Triton) captured in one CUDA graph."""

    engine = "fused"


class RecomputeStep(FusedStep):
    """The fused engine with its hourglass blocks recomputed in the backward (recompute=True)."""

    recompute = True


def authors_step(model, z, y):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_search_step import AuthorsStep

    return AuthorsStep(model, z, y)


VARIANTS = {
    "authors": ("the authors'-style step (deep copy, per-tensor two-class Gumbel-softmax)", authors_step),
    "unfused": ("oes_fast unfused: one flat gumbel_mask + cuDNN convs, fused Adam", UnfusedStep),
    "compiled": ("torch.compile of the reference step (plain PyTorch), fused Adam", CompiledStep),
    "fused": ("oes_fast fused engine: gumbel_masked_conv2d (Triton) for every conv, fused Adam", FusedStep),
    "fused_cpp": ("oes_fast fused engine on the CUDA C++ kernels", lambda m, z, y: FusedStep(m, z, y, "cuda")),
    "recompute": ("the fused engine (Triton) with recompute=True: each hourglass block saves only its input "
                  "and runs again in the backward", RecomputeStep),
    "graphed": ("the unfused engine's step captured in one CUDA graph and replayed (cuda_graph=True)", GraphedStep),
    "fused_graphed": ("the fused engine's step (Triton) captured in one CUDA graph and replayed", FusedGraphedStep),
}


# ----------------------------------------------------------------------------- sections
def check_op(lines, backends):
    """gumbel_masked_conv2d vs the float64 reference, forward and gradients, float32."""
    import torch.nn.functional as F

    from oes_fast import ops, reference

    lines.append("### Correctness (before any timing)\n")
    lines.append("gumbel_masked_conv2d, float32, N=1, C_in=32, C_out=64, 96x80, against the float64 reference "
                 "(reference.gumbel_mask with reference.philox_uniform + F.pad + F.conv2d); max |error| / max |ref|:\n")
    lines.append("| backend | k | padding | output | grad_input | grad_logits | grad_weight | ok |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---|")
    ok_all = True
    g = torch.Generator().manual_seed(0)
    for k, mode in ((5, "reflect"), (3, "reflect"), (1, "zeros")):
        x = torch.randn(1, 32, 96, 80, generator=g, dtype=torch.float64)
        p = torch.randn(64, 32, k, k, generator=g, dtype=torch.float64)
        w = torch.randn(64, 32, k, k, generator=g, dtype=torch.float64) / math.sqrt(32 * k * k)
        b = torch.randn(64, generator=g, dtype=torch.float64)
        gout = torch.randn(1, 64, 96, 80, generator=g, dtype=torch.float64)
        pad = (k - 1) // 2
        xr, pr, wr = (t.clone().requires_grad_() for t in (x, p, w))
        u = reference.philox_uniform(7, 11 + torch.arange(w.numel())).view(w.shape)
        out = F.conv2d(F.pad(xr, [pad] * 4, mode="reflect" if mode == "reflect" else "constant"),
                       reference.gumbel_mask(pr, wr, u, TAU), b)
        out.backward(gout)
        refs = (out.detach(), xr.grad, pr.grad, wr.grad)
        for backend in backends:
            ops.set_cuda_backend(backend)
            args = [t.float().cuda().requires_grad_() for t in (x, p, w)]
            y = ops.gumbel_masked_conv2d(args[0], args[1], args[2], b.float().cuda(), 7, 11, TAU, pad, mode)
            y.backward(gout.float().cuda())
            got = (y.detach(), args[0].grad, args[1].grad, args[2].grad)
            errs = [float((a.double().cpu() - r).abs().max() / r.abs().max()) for a, r in zip(got, refs)]
            ok = all(e < 1e-4 for e in errs)  # float32 sums of <= 800 terms: ~1e-6 expected
            ok_all &= ok
            lines.append(f"| {backend} | {k} | {mode} | " + " | ".join(f"{e:.1e}" for e in errs)
                         + f" | {'yes' if ok else '**NO**'} |")
    return ok_all


def check_engine(lines):
    """The logits' gradient of one step at 256x256, fused engine (Triton) against the unfused one.
    Gradients, not logits after Adam: conv biases followed by batch norm have a zero true
    gradient, and Adam's first step turns their rounding noise (which differs between cuDNN
    and Triton) into full +-lr steps."""
    from torch.func import functional_call

    from oes_fast.fused_search import FusedForward
    from oes_fast.ops import gumbel_mask, set_cuda_backend

    set_cuda_backend("triton")
    model, z, y = problem(256)
    u = UnfusedStep(model, z, y).run
    fused = FusedForward(model, u.layout, u.weights, u.noise_seed, TAU)
    forwards = (lambda p: functional_call(model, u.layout.views(gumbel_mask(p, u.weights, u.noise_seed, 0, TAU)),
                                          (z,)),
                lambda p: fused(p, z, 0))
    def grad(forward, tf32):
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            p = torch.zeros(u.layout.numel, device="cuda", requires_grad=True)
            torch.mean((forward(p) - y) ** 2).backward()
            return p.grad
        finally:
            torch.backends.cudnn.allow_tf32 = saved

    # cuDNN in float32 for the check (torch's default, TF32, rounds the convs' inputs to 10 bits)
    unfused, unfused_tf32, fused = grad(forwards[0], False), grad(forwards[0], True), grad(forwards[1], False)
    err = float((unfused - fused).abs().max() / unfused.abs().max())
    err_tf32 = float((unfused_tf32 - fused).abs().max() / unfused.abs().max())
    ok = err < 1e-3
    lines.append(f"\nOne search step at 256x256 on the OES network, logits' gradient of the fused engine (Triton, "
                 f"exact float32) vs the unfused one (cuDNN, float32): max |difference| / max |gradient| = {err:.1e} "
                 f"-> {'ok' if ok else '**MISMATCH**'}; against the unfused one in cuDNN's TF32 (torch's default): "
                 f"{err_tf32:.1e}.\n")
    return ok


def run_variant(name, size, warmup, iters):
    """(median ms, peak bytes, note) for one variant at one size; OOM recorded, not raised."""
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    step = None
    try:
        model, z, y = problem(size)
        step = VARIANTS[name][1](model, z, y)
        times = cuda_time(step, warmup, iters)
        peak = torch.cuda.max_memory_allocated()
        try:
            kernels, kernel_ms = kernel_profile(step)
            note = f"{kernels:.0f} kernels, {kernel_ms:.3g} ms in them"
        except Exception as exc:  # the timing stands without the profile
            note = f"no kernel profile: {type(exc).__name__}"
        return median(times), peak, note
    except torch.cuda.OutOfMemoryError:
        return None, torch.cuda.max_memory_allocated(), "OOM"
    except Exception as exc:  # one broken variant must not lose the rest of the run
        traceback.print_exc()
        return None, torch.cuda.max_memory_allocated(), f"error: {type(exc).__name__}: {str(exc)[:120]}"
    finally:
        del step
        free_memory()


def largest_side(points, budget=80 * GB):
    """Largest multiple of 64 whose step fits in `budget`, from a line through the two largest
    measured (pixels, peak bytes) points: peak = fixed + bytes_per_pixel * pixels."""
    pts = sorted(points)[-2:]
    if len(pts) < 2:
        return None, None
    (p0, m0), (p1, m1) = pts
    per_px = (m1 - m0) / (p1 - p0)
    fixed = m1 - per_px * p1
    if per_px <= 0:
        return None, per_px
    side = int(math.sqrt(max(budget - fixed, 0) / per_px)) // 64 * 64
    return side, per_px


def precision_study(lines, steps, size):
    """Short fused-engine searches with exact float32, TF32 and bf16 dots: final hard-mask
    agreement with the float32 run and PSNR of the network output against the target."""
    from oes_fast import metrics
    from oes_fast.fused_search import FusedForward
    from oes_fast.kernels import gumbel_masked_conv2d as kernels
    from oes_fast.ops import set_cuda_backend

    set_cuda_backend("triton")
    lines.append(f"\n### Precision of the fused engine's dots ({steps} search steps at {size}x{size})\n")
    lines.append("| dot precision | ms/step | final loss | PSNR of output (dB) | top-5% mask overlap with float32 |")
    lines.append("|---|---:|---:|---:|---:|")
    results = {}
    for prec in ("ieee", "tf32", "bf16"):
        kernels.set_precision(prec)
        try:
            model, z, y = problem(size)
            run = FusedStep(model, z, y).run
            layout, weights, logits, seed = run.layout, run.weights, run.logits, run.noise_seed
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(steps):
                loss, _ = run(i)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / steps * 1e3
            kernels.set_precision("ieee")  # evaluate every run's output the same, exactly
            with torch.no_grad():
                out = FusedForward(model, layout, weights, seed, TAU)(logits.detach(), z, steps)
            psnr = metrics.psnr(out.clamp(0, 1).cpu(), y.cpu())
            keep = int(DENSITY * layout.numel)
            top = torch.zeros(layout.numel, dtype=torch.bool, device="cuda")
            top[logits.detach().topk(keep).indices] = True
            results[prec] = (ms, float(loss), psnr, top)
        finally:
            kernels.set_precision("ieee")
        free_memory()
    ref_top = results["ieee"][3]
    for prec, (ms, loss, psnr, top) in results.items():
        overlap = float((top & ref_top).sum()) / float(ref_top.sum())
        lines.append(f"| {prec} | {ms:.1f} | {loss:.4e} | {psnr:.2f} | {overlap:.4f} |")
    lines.append("\nSame seeds, so the runs see the same noise; differences come from the dots' rounding alone. "
                 "(PSNR of the soft-masked network's output against the target, after the last step.)\n")


def write_section(path: Path, body: str, begin: str = BEGIN, end: str = END):
    """Write `body` between the markers in `path`, replacing what was there (or append it)."""
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = (text.rstrip() + "\n\n" if text else "") + section
    path.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/REPORT_GPU.md")
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (graphed: 3 eager, 1 capture)")
    parser.add_argument("--cpp-max-size", type=int, default=1024, help="largest size for the CUDA C++ fused variant")
    parser.add_argument("--precision-steps", type=int, default=300)
    parser.add_argument("--precision-size", type=int, default=512)
    parser.add_argument("--json", help="also write the measurements here (bench/gpu_check.py reads them)")
    parser.add_argument("--section", default="gpu_suite", help="marker name of the section written into --out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU suite not run")
        return 0

    import triton

    import oes_fast
    from oes_fast import _C

    sizes = [int(s) for s in args.sizes.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    if "fused_cpp" in variants and not _C.with_cuda:
        variants.remove("fused_cpp")
    props = torch.cuda.get_device_properties(0)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## GPU suite: search step (issue 5) - {props.name}\n",
             f"Written by `bench/gpu_suite.py` on {now}.\n",
             f"- Device: {props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs; "
             f"CUDA {torch.version.cuda}; torch {torch.__version__}; triton {triton.__version__}; "
             f"Python {platform.python_version()}; oes_fast CUDA C++ kernels built: {bool(_C.with_cuda)}",
             f"- Problem: the OES network (skip_oes, {sum(p.numel() for p in oes_fast.models.skip_oes().parameters()):,} "
             f"parameters), float32, one search step = mask sampling, forward, backward, KL prior, Adam on the logits.\n"]

    print("measuring the machine's peaks ...", flush=True)
    peaks = {"float32 (exact)": peak_matmul_tflops(torch.float32, False), "TF32": peak_matmul_tflops(torch.float32, True),
             "bfloat16": peak_matmul_tflops(torch.bfloat16, False)}
    bw = copy_bandwidth()
    lines.append("### Machine floors (measured)\n")
    lines.append("| measure | value |")
    lines.append("|---|---:|")
    for k, v in peaks.items():
        lines.append(f"| matmul 8192^3, {k} | {v:.1f} TFLOP/s |")
    lines.append(f"| copy, 1 GiB float32 (read + write) | {bw:.0f} GB/s |\n")

    print("correctness ...", flush=True)
    backends = ["triton"] + (["cuda"] if _C.with_cuda else [])
    first = len(lines)
    ok = check_op(lines, backends)
    ok = check_engine(lines) and ok  # both run, so that the log shows both
    if not ok:
        lines.append("\n**Correctness checks failed: timings below are of wrong results.**\n")
    correctness = lines[first:]
    print("\n".join(correctness), flush=True)

    print("timing ...", flush=True)
    results = {}
    for size in sizes:
        for v in variants:
            if v == "fused_cpp" and size > args.cpp_max_size:
                continue
            iters = max(2, args.iters // (4 if size >= 4096 else 1))
            ms, peak, note = run_variant(v, size, args.warmup, iters)
            results[(v, size)] = (ms, peak, note)
            print(f"  {v:10s} {size:5d}: {ms if ms is None else round(ms, 2)} ms, peak {peak / GB:.2f} GB {note}",
                  flush=True)
    lines.append("### Step time and memory\n")
    lines.append("Median of CUDA-event times after warm-up. TFLOP/s = 3 x the forward's conv FLOPs / time "
                 f"(forward, input gradient, weight gradient; exact float32 peak {peaks['float32 (exact)']:.1f}, "
                 f"TF32 peak {peaks['TF32']:.1f}). Peak = torch.cuda.max_memory_allocated over building the step, "
                 "warm-up and timed steps.\n")
    lines.append("| size | variant | ms/step | speedup vs authors | conv TFLOP/s | % of fp32 peak | peak GB | bytes/pixel |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|")
    model = oes_fast.models.skip_oes(seed=0).cuda()
    for size in sizes:
        flops = 3 * conv_flops(model, size)
        base = results.get(("authors", size), (None,))[0]
        for v in variants:
            if (v, size) not in results:
                continue
            ms, peak, note = results[(v, size)]
            if ms is None:
                lines.append(f"| {size} | {v} | {note} | | | | {peak / GB:.2f} (at failure) | |")
                continue
            tflops = flops / (ms * 1e-3) / 1e12
            speed = f"{base / ms:.2f}x" if base else "-"
            lines.append(f"| {size} | {v} | {ms:.2f} | {speed} | {tflops:.2f} | "
                         f"{100 * tflops / peaks['float32 (exact)']:.0f}% | {peak / GB:.2f} | {peak / size**2:.0f} |")
    lines.append("\nVariants: " + "; ".join(f"`{v}`: {VARIANTS[v][0]}" for v in variants) + ".\n")

    lines.append("### Largest square image whose step fits in 80 GB\n")
    lines.append("Extrapolated linearly (fixed + bytes/pixel x pixels) through the two largest sizes that ran; "
                 "sides rounded down to multiples of 64 (the 6-level network's constraint).\n")
    lines.append("| variant | marginal bytes/pixel | largest side in 80 GB |")
    lines.append("|---|---:|---:|")
    for v in variants:
        pts = [(s * s, results[(v, s)][1]) for s in sizes if (v, s) in results and results[(v, s)][0] is not None]
        side, per_px = largest_side(pts)
        lines.append(f"| {v} | {per_px:.0f} | {side} |" if side else f"| {v} | - | (needs two sizes that ran) |")

    if args.precision_steps > 0:
        print("precision study ...", flush=True)
        try:
            precision_study(lines, args.precision_steps, args.precision_size)
        except Exception as exc:
            traceback.print_exc()
            lines.append(f"\nPrecision study failed: {type(exc).__name__}: {exc}\n")

    out = Path(args.out)
    write_section(out, "\n".join(lines), f"<!-- {args.section}:begin -->", f"<!-- {args.section}:end -->")
    print(f"wrote {out}")
    if args.json:
        import json

        record = dict(device=props.name, sms=props.multi_processor_count, total_memory=props.total_memory,
                      cuda=torch.version.cuda, torch=torch.__version__, triton=triton.__version__, date=now,
                      cuda_cpp=bool(_C.with_cuda), correct=bool(ok), correctness=correctness, peaks_tflops=peaks,
                      copy_gbps=bw,
                      steps=[dict(variant=v, size=s, ms=ms, peak_bytes=peak, note=note)
                             for (v, s), (ms, peak, note) in results.items()])
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
