"""Two versions of the CPU sparse conv forward, timed in turns in one process.

On a shared machine the same call drifts by 15-25 % within minutes, so two builds timed one
after the other, even in alternating processes, cannot show a 5 % change. This script compiles
csrc/cpu/sparse_conv2d_kernels.h twice into one throwaway extension: version A as it is at a git
revision (default HEAD), version B as it is in the working tree, both as the AVX2 copy (or the
AVX-512 copy with --isa avx512) with the build's flags (setup.py: -O3 -ffast-math, baseline x86-64
code outside the ISA region; the region's target as csrc/cpu/per_isa.h sets it). It runs the
generator's forward once (OES network, seed 0, the published pepper mask, 512x512 or --size),
captures the named layers' inputs, and calls A's and B's `forward` (or `forward_pool` where the network
fuses the pooling) in turns, A first in even rounds and B first in odd ones. With --input-grad
it times `input_grad` instead, on a random output gradient (layers with a fused pooling skipped);
with --weight-grad `weight_grad` (`weight_grad_pool` where the network fuses the pooling).
With --flush it writes 256 MiB before each call, so that the layer's input (and its weights) come
from memory as in the network, where the other layers' tensors have evicted them.

    python bench/kernel_ab.py [--rev REV] [--rounds 20] [--threads 1] [--input-grad | --weight-grad]
                              [--size 512] [--isa avx512] [--flush] [LAYER ...]

Per layer it prints A's and B's minimum and median (ms), the median of the per-round ratios A / B
(above 1: B is faster) with the 10th and 90th percentiles, and whether the outputs and the
batch-norm statistics have the same bits (else their largest difference). A development tool:
needs a compiler, an x86 processor with AVX2 and FMA, and git; nothing in the package or the
tests uses it.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "csrc/cpu/sparse_conv2d_kernels.h"
# the per-ISA headers the kernels file includes (vectors.h from 2026-11-30 01:5x, activation.h from 02:4x)
HEADERS = ("csrc/cpu/vectors.h", "csrc/cpu/activation.h")
DEFAULT_LAYERS = ["down.0.conv1", "up.0.conv", "up.1.conv", "up.2.conv", "up.3.conv", "up.4.conv"]
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffast-math", "-Wno-psabi", "-march=x86-64", "-mtune=generic"]

HARNESS = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>
#include "@ROOT@/csrc/sparse_conv2d.h"
#include "@ROOT@/csrc/cpu/cpu_isa.h"  // the slice rules' cache sizes (cpu_isa.cpp is compiled in too)
#pragma GCC push_options
#pragma GCC target(@TARGET@)
#define OES_FAST_VEC_BYTES @VEC_BYTES@
#define OES_FAST_ISA_NS isa_a
#include "@DIR@/a/kernels.h"
#undef OES_FAST_ISA_NS
#define OES_FAST_ISA_NS isa_b
#include "@DIR@/b/kernels.h"
#undef OES_FAST_ISA_NS
#pragma GCC pop_options

// the generator's convs: stride 1, reflection padding (k - 1) / 2, the input x nearest-upsampled by U
oes_fast::SparseConvGeometry geometry(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                                      int64_t k, int64_t U) {
  oes_fast::SparseConvGeometry g;
  g.N = x.size(0); g.C_in = x.size(1); g.H_src = x.size(2); g.W_src = x.size(3); g.U = U;
  g.H = g.H_out = g.H_src * U; g.W = g.W_out = g.W_src * U; g.C_out = row_ptr.numel() - 1;
  g.KH = g.KW = k; g.SH = g.SW = 1; g.PH = g.PW = (k - 1) / 2; g.reflect = true; g.nnz = values.numel();
  return g;
}
std::tuple<at::Tensor, at::Tensor> forward(bool b_version, bool pooled, const at::Tensor& x, const at::Tensor& values,
                                           const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                           const at::Tensor& bias, int64_t k, int64_t U) {
  const auto g = geometry(x, values, row_ptr, k, U);
  at::Tensor out = at::empty({g.N, g.C_out, pooled ? g.H / 2 : g.H, pooled ? g.W / 2 : g.W}, x.options());
  at::Tensor stats = at::zeros({g.C_out, 2}, x.options().dtype(at::kDouble));
  auto* kernel = b_version ? (pooled ? &oes_fast::isa_b::forward_pool<float> : &oes_fast::isa_b::forward<float>)
                           : (pooled ? &oes_fast::isa_a::forward_pool<float> : &oes_fast::isa_a::forward<float>);
  kernel(x.data_ptr<float>(), values.data_ptr<float>(), row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int32_t>(),
         bias.data_ptr<float>(), out.data_ptr<float>(), g, stats.data_ptr<double>());
  return {out, stats};
}
at::Tensor input_grad(bool b_version, const at::Tensor& x, const at::Tensor& grad_output, const at::Tensor& values,
                      const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t k, int64_t U) {
  const auto g = geometry(x, values, row_ptr, k, U);
  at::Tensor grad_input = at::empty_like(x);
  auto* kernel = b_version ? &oes_fast::isa_b::input_grad<float> : &oes_fast::isa_a::input_grad<float>;
  kernel(grad_output.data_ptr<float>(), values.data_ptr<float>(), row_ptr.data_ptr<int64_t>(),
         col_idx.data_ptr<int32_t>(), grad_input.data_ptr<float>(), g);
  return grad_input;
}
at::Tensor weight_grad(bool b_version, bool pooled, const at::Tensor& x, const at::Tensor& grad_output,
                       const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t k,
                       int64_t U) {
  const auto g = geometry(x, values, row_ptr, k, U);
  at::Tensor gw = at::zeros_like(values);
  auto* kernel = b_version ? (pooled ? &oes_fast::isa_b::weight_grad_pool<float> : &oes_fast::isa_b::weight_grad<float>)
                           : (pooled ? &oes_fast::isa_a::weight_grad_pool<float> : &oes_fast::isa_a::weight_grad<float>);
  kernel(grad_output.data_ptr<float>(), x.data_ptr<float>(), row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int32_t>(),
         gw.data_ptr<float>(), g);
  return gw;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("input_grad", &input_grad);
  m.def("weight_grad", &weight_grad);
}
"""


def _git_show(rev: str, path: str) -> str | None:
    out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0 and path == KERNELS:
        raise SystemExit(f"git show {rev}:{path} failed: {out.stderr.strip()}")
    return out.stdout if out.returncode == 0 else None


def _working_tree(path: str) -> str | None:
    return (ROOT / path).read_text() if (ROOT / path).exists() else None


# the target pragma and the vector width of each instruction set's copy (csrc/cpu/per_isa.h)
ISAS = {
    "avx2": ('"avx,avx2,fma"', 32),
    "avx512": ('"avx,avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512"', 64),
}


def build(rev: str, folder: Path, isa: str = "avx2"):
    from torch.utils.cpp_extension import load

    # each version in its own folder, with the per-ISA headers it includes where it has them
    for version, read in (("a", lambda path: _git_show(rev, path)), ("b", lambda path: _working_tree(path))):
        (folder / version).mkdir()
        for path, name in ((KERNELS, "kernels.h"), *((h, Path(h).name) for h in HEADERS)):
            text = read(path)
            if text is not None:
                (folder / version / name).write_text(text)
    source = folder / "harness.cpp"
    target, vec_bytes = ISAS[isa]
    source.write_text(HARNESS.replace("@ROOT@", str(ROOT)).replace("@DIR@", str(folder))
                      .replace("@TARGET@", target).replace("@VEC_BYTES@", str(vec_bytes)))
    return load("oes_fast_kernel_ab", [str(source), str(ROOT / "csrc" / "cpu" / "cpu_isa.cpp")], extra_cflags=FLAGS,
                build_directory=str(folder))


def captured_layers(names: list[str], size: int = 512) -> dict:
    """Layer name -> (its input in the no-grad forward, its stage, whether the network fuses the
    pooling after it) of the profile's problem at size x size."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sparse_profile
    from oes_fast.sparse import SparseGenerator

    p = sparse_profile.problem(size)
    gen = SparseGenerator.from_masked(p["model"], p["mask"])
    gen.fuse_prologue = False  # each conv's input as a tensor: the activated one (the kernels' own work)
    unknown = set(names) - {n for n in gen.names if n}
    if unknown:
        raise SystemExit(f"no sparse conv named {sorted(unknown)}; the generator's: {[n for n in gen.names if n]}")
    found = {}
    x, const, hw, stats, i = p["z"], None, (1, size, size), None, 0
    with torch.no_grad():
        while i < len(gen._chain):
            if gen.names[i] in names:
                found[gen.names[i]] = (x.contiguous().clone(), gen._chain[i], gen.fuses_pool(i, x))
            x, const, hw, stats, i, _ = gen.run_stage(i, x, const, hw, stats)
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layers", nargs="*", default=DEFAULT_LAYERS)
    ap.add_argument("--rev", default="HEAD", help="git revision of version A (B: the working tree)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--input-grad", action="store_true", help="time input_grad instead of the forward")
    ap.add_argument("--weight-grad", action="store_true",
                    help="time weight_grad (weight_grad_pool where the network fuses the pooling) instead")
    ap.add_argument("--size", type=int, default=512, help="the image's side (default 512)")
    ap.add_argument("--isa", choices=sorted(ISAS), default="avx2", help="the copy to build (default avx2)")
    ap.add_argument("--flush", action="store_true",
                    help="write 256 MiB before each call, so that the layer's input comes from memory, as in "
                         "the network (default: it stays in the caches between calls)")
    args = ap.parse_args(argv)
    from oes_fast import _C

    if _C.cpu_isa() not in ("avx2", "avx512") or (args.isa == "avx512" and _C.cpu_isa() != "avx512"):
        raise SystemExit(f"needs a processor with {args.isa}; this one runs the {_C.cpu_isa()} kernels")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="oes_fast_kernel_ab_") as tmp:
        ext = build(args.rev, Path(tmp), args.isa)
        for name, (x, st, pooled) in captured_layers(args.layers, args.size).items():
            values = st.values.detach().contiguous()
            if args.input_grad:
                if pooled:
                    print(f"{name:13s} skipped: the network fuses its pooling (no input_grad of that form here)")
                    continue
                grad_output = torch.randn(1, st.n_out, x.shape[2] * st.upsample, x.shape[3] * st.upsample,
                                          generator=torch.Generator().manual_seed(0))
                run = lambda version: (ext.input_grad(version, x, grad_output, values, st.row_ptr, st.col_idx,
                                                      st.kernel[0], st.upsample),)
            elif args.weight_grad:
                h, w = x.shape[2] * st.upsample, x.shape[3] * st.upsample
                grad_output = torch.randn(1, st.n_out, h // 2 if pooled else h, w // 2 if pooled else w,
                                          generator=torch.Generator().manual_seed(0))
                run = lambda version: (ext.weight_grad(version, pooled, x, grad_output, values, st.row_ptr,
                                                       st.col_idx, st.kernel[0], st.upsample),)
            else:
                run = lambda version: ext.forward(version, pooled, x, values, st.row_ptr, st.col_idx,
                                                  torch.zeros(st.n_out), st.kernel[0], st.upsample)
            same = ["yes" if torch.equal(a, b) else f"no ({(a - b).abs().max().item():.1e})"
                    for a, b in zip(run(False), run(True))]
            times = {False: [], True: []}
            scratch = torch.empty(64 * 2**20) if args.flush else None
            for r in range(args.rounds):
                for version in (False, True) if r % 2 == 0 else (True, False):
                    if scratch is not None:
                        scratch.fill_(float(r))
                    start = time.perf_counter()
                    run(version)
                    times[version].append(time.perf_counter() - start)
            a, b = times[False], times[True]
            ratios = sorted(x / y for x, y in zip(a, b))
            tenth = len(ratios) // 10
            print(f"{name:13s} A {min(a) * 1e3:7.2f} / {statistics.median(a) * 1e3:7.2f} ms   "
                  f"B {min(b) * 1e3:7.2f} / {statistics.median(b) * 1e3:7.2f} ms   "
                  f"A/B {statistics.median(ratios):.3f} [{ratios[tenth]:.2f}-{ratios[-1 - tenth]:.2f}]   "
                  f"same bits: output {same[0]}" + (f", statistics {same[1]}" if len(same) > 1 else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
