"""A static cost model of one OES search step on an H100 SXM, per kernel and per engine, written
for bench/gpu_check.sh to compare with what it measures:

    python bench/cost_model.py                      # table on stdout
    python bench/cost_model.py --report bench/REPORT.md --json bench/cost_model.json

Machine (NVIDIA H100 SXM5 80 GB). Source: NVIDIA H100 Tensor Core GPU datasheet
(nvidia.com/en-us/data-center/h100, "H100 SXM" column): 132 SMs, HBM3 3.35 TB/s, 50 MB L2,
FP64 34 TFLOP/s, FP32 67 TFLOP/s, TF32 Tensor Core 989 TFLOP/s and BF16 Tensor Core 1,979
TFLOP/s "with sparsity" (the datasheet's footnote: dense is half, 494.5 and 989.5). The integer
and special-function rates are not in the datasheet: the CUDA C++ Programming Guide's
arithmetic-instruction throughput table for compute capability 9.0 gives 64 32-bit integer
multiply / add / logic results and 16 special-function results (log2, exp2, reciprocal) per
clock per SM, at the 1.98 GHz that makes the datasheet's 67 FP32 TFLOP/s (16,896 lanes x 2).

Kernels of one step (float32, the OES network skip_oes, N = 1, size x size):
- every conv, three GEMMs (forward, input gradient, weight gradient), 2 * M * N * K FLOPs each;
  unfused: cuDNN with PyTorch's default cudnn.allow_tf32 = True, so TF32 tensor cores; fused:
  gumbel_masked_conv2d with exact float32 dots (set_precision("ieee"), the default): FP32 FMA;
- mask generation: one Philox4x32-10 draw (about 100 integer operations: 10 rounds of two 32-bit
  mul-hi/lo pairs, xors and key bumps) and 4 special functions (2 logs, exp, reciprocal) per mask
  value. Unfused: once per parameter (the flat gumbel_mask_with_slope). Fused: every program
  regenerates the tile it multiplies with, so the forward generates (pixel tiles) x (layer
  parameters) values, the input gradient (padded-pixel tiles) x (layer parameters), the weight
  gradient's epilogue (splits) x (layer parameters): the price of never storing the masked weights;
- bytes: activations read and written by each GEMM (the fused weight gradient re-reads
  grad_output once per K tile and the input once per C_out tile: no L2 reuse assumed, an upper
  bound where a layer's tensors fit the 50 MB L2), the flat vectors of the mask and Adam kernels,
  and for batch norm + activation + pooling / upsampling 6 passes over each conv output forward
  and 12 backward (PyTorch's eager elementwise kernels, the same in every engine);
- fused_tf32: the fused engine after set_precision("tf32") (tensor-core dots, its own tiles);
- recompute: the fused engine with each hourglass block run again in the backward: one more
  forward of every conv;
- launches: 15 per conv (conv + about 4 elementwise forward, 10 backward) plus the flat kernels,
  at 6 us each in eager PyTorch (the CPU's dispatch cost per op) and 1 us replayed in a CUDA
  graph (the "graphed" rows).

Time per kernel = max(FLOPs / peak, integer work / integer peak, special functions / their
peak, bytes / bandwidth) + launch: a roofline floor (perfect overlap, full clocks). Occupancy
(from the registers and shared memory of the sm_90 compiles of bench/triton_compile_report.py)
is listed beside the fused kernels, not used in the time: a kernel at 12% occupancy (one 8-warp
block per SM) will hide its gathers' latency worse than the floor assumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

# NVIDIA H100 SXM datasheet (dense figures: half the "with sparsity" ones for tensor cores)
SMS = 132
CLOCK_HZ = 1.98e9
BANDWIDTH = 3.35e12  # bytes/s
PEAK_FLOPS = {"fp64": 34e12, "fp32": 67e12, "tf32": 989e12 / 2, "bf16": 1979e12 / 2}
# CUDA C++ Programming Guide, throughput per clock per SM for compute capability 9.0
INT_OPS = 64 * SMS * CLOCK_HZ
SFU_OPS = 16 * SMS * CLOCK_HZ
PHILOX_INT_OPS = 100  # per mask value
MASK_SFU_OPS = 4
LAUNCH_EAGER_S, LAUNCH_GRAPHED_S = 6e-6, 1e-6
ELEMENTWISE_PASSES = 6 + 12  # batch norm, activation, pooling / upsampling: forward + backward
SIZES = (512, 1024, 2048, 4096)
ENGINES = ("unfused", "fused", "fused_tf32", "recompute")


@dataclasses.dataclass
class Kernel:
    name: str
    flops: float = 0.0
    precision: str = "fp32"
    masks: float = 0.0  # mask values generated (Philox + logs)
    bytes: float = 0.0
    launches: int = 1
    occupancy: float | None = None
    regs: int | None = None

    def seconds(self, graphed: bool = False) -> float:
        work = max(self.flops / PEAK_FLOPS[self.precision] if self.flops else 0.0,
                   self.masks * PHILOX_INT_OPS / INT_OPS, self.masks * MASK_SFU_OPS / SFU_OPS,
                   self.bytes / BANDWIDTH)
        return work + self.launches * (LAUNCH_GRAPHED_S if graphed else LAUNCH_EAGER_S)


def _cdiv(a, b):
    return -(-a // b)


def compiled_metrics(path: Path | None) -> dict:
    """{(kernel function, variant prefix): (regs, occupancy)} from a triton_compile_report JSON,
    worst case over the layers; {} without one."""
    if path is None or not path.exists():
        return {}
    from triton_compile_report import rows_of

    out = {}
    for row in rows_of(json.loads(path.read_text())):
        if (row.error or not row.kernel.startswith("gumbel_masked_conv2d.") or row.dtype != "float32"
                or "ieee, offset argument" not in row.variant):
            continue
        key = row.kernel.rsplit(".", 1)[-1]
        regs, occ = out.get(key, (0, 1.0))
        out[key] = (max(regs, row.regs or 0), min(occ, row.occupancy() or 1.0))
    return out


def step_kernels(size: int, engine: str, metrics: dict) -> list[Kernel]:
    """The kernels of one search step of `engine` at size x size, as the module doc counts them."""
    import oes_fast
    from oes_fast.kernels import gumbel_masked_conv2d as K
    from triton_compile_report import conv_layers

    layers = conv_layers("skip_oes", size)
    n_params = sum(p.numel() for p in oes_fast.models.skip_oes().parameters())
    conv_params = sum(la.c_out * la.c_in * la.k * la.k for la in layers)
    kernels = []
    for la in layers:
        kk = la.c_in * la.k * la.k
        w_params = la.c_out * kk
        pix = la.h * la.w  # stride 1, 'same' padding
        hp, wp = la.h + 2 * la.padding, la.w + 2 * la.padding
        act_in, act_out = 4.0 * la.c_in * pix, 4.0 * la.c_out * pix
        gemm = 2.0 * pix * la.c_out * kk
        name = f"{la.c_in}->{la.c_out} k{la.k} {la.h}x{la.w}"
        kernels.append(Kernel(f"elementwise {name}", bytes=ELEMENTWISE_PASSES * act_out, launches=14))
        if engine == "unfused":
            kernels += [Kernel(f"cudnn forward {name}", gemm, "tf32", bytes=act_in + act_out + 4 * w_params),
                        Kernel(f"cudnn input grad {name}", gemm, "tf32", bytes=act_in + act_out + 4 * w_params),
                        Kernel(f"cudnn weight grad {name}", gemm, "tf32", bytes=act_in + act_out + 4 * w_params)]
            continue
        prec = "tf32" if engine == "fused_tf32" else "ieee"
        fwd, igr, wgr = (K.GPU_TILES[(kernel, prec)] for kernel in ("forward", "input_grad", "weight_grad"))
        peak = "tf32" if prec == "tf32" else "fp32"
        fwd_bn = min(fwd.block_n, max(16, 1 << (la.c_out - 1).bit_length()))
        igr_bn = min(igr.block_n, max(16, 1 << (la.c_in - 1).bit_length()))
        wgr_bm = min(wgr.block_m, max(16, 1 << (la.c_out - 1).bit_length()))
        tiles = _cdiv(la.c_out, wgr_bm) * _cdiv(kk, wgr.block_n)
        splits = K.splits(pix, tiles, K.GPULaunch())
        reg = lambda fn: metrics.get(fn, (None, None))  # noqa: E731
        forward = Kernel(f"fused forward {name}", gemm, peak, masks=_cdiv(pix, fwd.block_m) * w_params,
                         bytes=act_in * _cdiv(la.c_out, fwd_bn) + act_out + 8 * w_params,
                         regs=reg("_forward_kernel")[0], occupancy=reg("_forward_kernel")[1])
        kernels.append(forward)
        if engine == "recompute":
            kernels.append(dataclasses.replace(forward, name=f"fused forward again {name}"))
        kernels += [Kernel(f"fused input grad {name}", 2.0 * hp * wp * la.c_in * la.c_out * la.k * la.k, peak,
                           masks=_cdiv(hp * wp, igr.block_m) * _cdiv(la.c_in, igr_bn) * igr_bn * la.c_out * la.k ** 2,
                           bytes=act_out * _cdiv(la.c_in, igr_bn) + 4.0 * la.c_in * hp * wp + 8 * w_params,
                           launches=2, regs=reg("_input_grad_kernel")[0], occupancy=reg("_input_grad_kernel")[1]),
                    Kernel(f"fused weight grad {name}", gemm, peak, masks=splits * w_params,
                           bytes=act_out * _cdiv(kk, wgr.block_n) + act_in * _cdiv(la.c_out, wgr_bm) + 16 * w_params,
                           regs=reg("_weight_grad_kernel")[0], occupancy=reg("_weight_grad_kernel")[1])]
    # unfused: every parameter through the flat mask; fused: only those outside the convs
    flat = n_params if engine == "unfused" else n_params - conv_params
    kernels.append(Kernel("gumbel_mask_with_slope (flat)", masks=flat, bytes=16.0 * flat))
    # logit_adam_step_: p, m, v, grad (and the slope where the flat mask made it) read, p, m, v
    # written; the fused engine's conv logits get their gradient from the weight-gradient epilogue
    kernels.append(Kernel("logit_adam_step_ (flat)", bytes=28.0 * n_params + 4.0 * flat))
    return kernels


def predict(sizes=SIZES, metrics=None) -> dict:
    """{engine: {size: {"eager_ms", "graphed_ms", "flops", "bytes", "masks", "kernels"}}}."""
    metrics = metrics or {}
    out = {}
    for engine in ENGINES:
        out[engine] = {}
        for size in sizes:
            ks = step_kernels(size, engine, metrics)
            out[engine][size] = dict(eager_ms=1e3 * sum(k.seconds() for k in ks),
                                     graphed_ms=1e3 * sum(k.seconds(graphed=True) for k in ks),
                                     flops=sum(k.flops for k in ks), bytes=sum(k.bytes for k in ks),
                                     masks=sum(k.masks for k in ks), launches=sum(k.launches for k in ks),
                                     kernels=[dataclasses.asdict(k) | {"ms": 1e3 * k.seconds()} for k in ks])
    return out


def report_section(pred: dict, metrics_source: str, metrics: dict) -> str:
    lines = ["## Cost model of a search step on an H100 SXM (issue 15; predicted, not measured)\n",
             "Written by `bench/cost_model.py` (assumptions and sources in its docstring): a roofline floor per "
             "kernel (max of FLOPs / datasheet peak, Philox integer work / integer peak, bytes / 3.35 TB/s) plus "
             "launch cost (6 us eager, 1 us graphed). Unfused convs on cuDNN TF32 (PyTorch's default), fused "
             "convs on exact float32 FMA (set_precision('ieee')). `bench/gpu_check.sh` measures the same steps "
             f"and prints measured / predicted. Registers and occupancy from {metrics_source}.\n",
             "| engine | size | predicted ms (eager) | predicted ms (graphed) | GFLOP | GB moved | mask values (G) "
             "| launches | largest kernel (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for engine, by_size in pred.items():
        for size, p in by_size.items():
            top = max(p["kernels"], key=lambda k: k["ms"])
            lines.append(f"| {engine} | {size} | {p['eager_ms']:.2f} | {p['graphed_ms']:.2f} | {p['flops'] / 1e9:.1f} | "
                         f"{p['bytes'] / 1e9:.2f} | {p['masks'] / 1e9:.2f} | {p['launches']} | "
                         f"{top['name']} ({top['ms']:.3f}) |")
    if metrics:
        lines.append("\nFused kernels, float32 ieee, worst layer: " + "; ".join(
            f"{fn}: {regs} registers, occupancy {occ:.0%}" for fn, (regs, occ) in sorted(metrics.items())
            if fn.startswith(("_forward", "_input_grad", "_weight_grad"))) + ".\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--compile-json", default=None,
                        help="triton_compile_report JSON for registers / occupancy (default: the newest "
                             "bench/triton_compile_sm90_*.json)")
    parser.add_argument("--json")
    parser.add_argument("--report")
    args = parser.parse_args(argv)
    path = Path(args.compile_json) if args.compile_json else max(
        sorted((ROOT / "bench").glob("triton_compile_sm90_*.json")), default=None)
    metrics = compiled_metrics(path)
    pred = predict([int(s) for s in args.sizes.split(",")], metrics)
    for engine, by_size in pred.items():
        for size, p in by_size.items():
            print(f"{engine:10s} {size:5d}: {p['eager_ms']:9.2f} ms eager, {p['graphed_ms']:9.2f} ms graphed, "
                  f"{p['flops'] / 1e9:9.1f} GFLOP, {p['bytes'] / 1e9:7.2f} GB, {p['masks'] / 1e9:7.2f} G masks")
    if args.json:
        Path(args.json).write_text(json.dumps({e: {str(s): v for s, v in d.items()} for e, d in pred.items()}, indent=1))
    if args.report:
        from gpu_suite import write_section

        source = f"`{path.relative_to(ROOT)}`" if path else "no compile report (none found)"
        write_section(Path(args.report), report_section(pred, source, metrics), "<!-- cost_model:begin -->",
                      "<!-- cost_model:end -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
