"""The run-time choice of the CPU kernels' instruction set (csrc/cpu/cpu_isa.h).

The extension is built with portable baseline flags; the sparse convolution's kernels are
compiled again for AVX2+FMA and AVX-512 and one copy is chosen per process, the widest the CPU
runs unless OES_FAST_CPU_ISA names another. The choice is made once per process, so every
instruction set is exercised in a subprocess of its own: it runs the forward (and the forward
with batch-norm statistics), the input gradient and the weight gradient on inputs made here,
in float64 and float32, with 1 and then 2 threads, and the same with a batch norm and LeakyReLU
made in the conv's input load (batch_norm_act_sparse_conv2d) and as two ops before it, and the
same with a second batch norm after the activation (batch_norm_act_norm_sparse_conv2d, three ops);
this process checks the results against oes_fast.reference, that the fused op gives the two ops'
bits, and that the bits do not depend on the thread count.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import oes_fast._C as _C
from oes_fast import reference
from oes_fast.sparse import to_csr
from tolerances import assert_channel_stats, assert_close_to_reference

ISAS = _C.cpu_isas_supported()
X86 = platform.machine().lower() in ("x86_64", "amd64")

# (N, C_in, C_out, H, W, k, stride, padding mode, upsample, density). Rows wide enough for the
# 4-vector blocks of both dtypes and a partial vector, narrow rows (4-row blocks in float32),
# zero padding, stride 2 (the generic gradient kernels), the fused upsampling (below and from the
# stored width of 64 where the 3x3 conv runs in its phase form, and from 256 where its input
# gradient does), 1x1, a density that leaves output channels without any kept tap, and input
# gradients in input-channel slices.
CASES = [
    (1, 8, 8, 19, 150, 3, 1, "reflect", 1, 0.3),
    (2, 4, 6, 13, 37, 5, 1, "reflect", 1, 0.5),
    (1, 5, 3, 9, 70, 5, 1, "zeros", 1, 0.5),
    (2, 3, 4, 11, 13, 5, 2, "reflect", 1, 0.5),
    (1, 4, 5, 8, 40, 3, 1, "reflect", 2, 0.4),
    (2, 3, 5, 9, 67, 3, 1, "reflect", 2, 0.4),
    (1, 3, 4, 7, 64, 3, 1, "zeros", 2, 0.5),
    (1, 2, 3, 3, 257, 3, 1, "reflect", 2, 0.5),
    (1, 6, 4, 21, 19, 1, 1, "reflect", 1, 1.0),
    # (at 0.08 every output channel kept a tap: test_a_case_has_output_channels_without_taps)
    (1, 2, 6, 12, 90, 3, 1, "zeros", 1, 0.07),
    # many outputs on few inputs: column-shifted windows (use_shifted_window), plain and phase form
    # (in the AVX-512 copy the phase form pairs its output channels, ChannelPairs, and drops the
    # windows where a block's plain strip fits the L1: the second case)
    (1, 2, 16, 10, 70, 3, 1, "reflect", 1, 0.5),
    (1, 2, 12, 4, 64, 3, 1, "reflect", 2, 0.5),
    # input gradients whose transposed conv reads its input in input-channel slices (kSliceBytes,
    # where the strip outgrows an L1 of 48 KB or less): 100 outputs (in the AVX2 and AVX-512
    # copies; the baseline's 16-byte strips stay whole), and 12 outputs of the phase form (48 phase
    # channels: in the AVX-512 copy)
    (1, 3, 100, 6, 70, 3, 1, "reflect", 1, 0.3),
    (1, 2, 12, 3, 257, 3, 1, "reflect", 2, 0.4),
    # the pooled ops with their halo in slices of input channels (see _env) on rows wide enough for
    # the forward's 4-vector blocks in every copy: an odd number of pooled rows, a partial last
    # column block
    (1, 7, 3, 19, 150, 5, 1, "reflect", 1, 0.2),
    # the phase form's pairs with windows: 48 inputs, strips of 50-52 KB in both dtypes (last: the
    # cases' seeds follow their index)
    (1, 48, 20, 3, 64, 3, 1, "reflect", 2, 0.5),
]
DTYPES = [torch.float64, torch.float32]
THREADS = [1, 2]

# Runs in a subprocess: argv[1] holds the inputs (torch.save), argv[2] receives the results.
WORKER = r"""
import sys
import torch
import oes_fast._C as _C
from oes_fast.sparse import sparse_conv2d

ACT_RESULTS = ("out", "stats", "input_grad", "gamma_grad", "beta_grad", "weight_grad", "bias_grad")
PAIR_RESULTS = ACT_RESULTS + ("gamma2_grad", "beta2_grad")
cases = torch.load(sys.argv[1])
results = {"isa": _C.cpu_isa(), "threads": {}}
for threads in (1, 2):
    torch.set_num_threads(threads)
    per_case = []
    for case in cases:
        (n, c_in, c_out, h, w, k, stride, mode, up, density), t = case["shape"], case["tensors"]
        out = {}
        for dtype in (torch.float64, torch.float32):
            x = t["x"].to(dtype).clone().requires_grad_()
            v = t["values"].to(dtype).clone().requires_grad_()
            b = t["bias"].to(dtype).clone().requires_grad_()
            y = sparse_conv2d(x, v, t["row_ptr"], t["col_idx"], k, b, stride, (k - 1) // 2, mode, up)
            y.backward(t["grad"].to(dtype))
            got = {"out": y.detach(), "input_grad": x.grad, "weight_grad": v.grad, "bias_grad": b.grad}
            if stride == 1:
                y2, stats = torch.ops.oes_fast.sparse_conv2d_stats(
                    x.detach(), v.detach(), t["row_ptr"], t["col_idx"], b.detach(), [k, k],
                    [(k - 1) // 2] * 2, mode, up)
                got["stats_out"], got["stats"] = y2, stats
            if stride == 1 and up == 1:  # the conv with the 2x2 average pooling after it, in one op
                xp, vp, bp = (a.detach().clone().requires_grad_() for a in (x, v, b))
                yp, pool_stats = torch.ops.oes_fast.sparse_conv2d_pool_stats(
                    xp, vp, t["row_ptr"], t["col_idx"], bp, [k, k], [(k - 1) // 2] * 2, mode)
                yp.backward(t["grad"].to(dtype)[:, :, :h // 2, :w // 2].contiguous())
                got.update(pool_out=yp.detach(), pool_stats=pool_stats, pool_input_grad=xp.grad,
                           pool_weight_grad=vp.grad, pool_bias_grad=bp.grad)
            if stride == 1:  # a batch norm + LeakyReLU before the conv: in its input load, and as two ops
                for pool in (False, True) if up == 1 else (False,):
                    grad = t["grad"].to(dtype)[:, :, :h // 2, :w // 2].contiguous() if pool else t["grad"].to(dtype)
                    for fused in (False, True):
                        xa, ga, ba, va, ca = (t[name].to(dtype).clone().requires_grad_()
                                              for name in ("x", "gamma", "beta", "values", "bias"))
                        conv = ([k, k], [(k - 1) // 2] * 2, mode)
                        if fused:
                            y, stats = torch.ops.oes_fast.batch_norm_act_sparse_conv2d(
                                xa, None, ga, ba, 1e-5, 0.2, va, t["row_ptr"], t["col_idx"], ca, *conv, up, pool)
                        else:
                            act = torch.ops.oes_fast.batch_norm_act(xa, None, ga, ba, 1e-5, 0.2)
                            if pool:
                                y, stats = torch.ops.oes_fast.sparse_conv2d_pool_stats(
                                    act, va, t["row_ptr"], t["col_idx"], ca, *conv)
                            else:
                                y, stats = torch.ops.oes_fast.sparse_conv2d_stats(
                                    act, va, t["row_ptr"], t["col_idx"], ca, *conv, up)
                        y.backward(grad)
                        act_out = (y.detach(), stats, xa.grad, ga.grad, ba.grad, va.grad, ca.grad)
                        for name, r in zip(ACT_RESULTS, act_out):
                            got[f"act{'_pool' if pool else ''}_{name}{'' if fused else '_two_ops'}"] = r
                    # a batch norm + LeakyReLU, then a second batch norm, before the conv: all in its
                    # input load (batch_norm_act_norm_sparse_conv2d), and as three ops
                    for fused in (False, True):
                        xa, ga, ba, g2, b2, va, ca = (t[name].to(dtype).clone().requires_grad_() for name in
                                                      ("x", "gamma", "beta", "gamma2", "beta2", "values", "bias"))
                        conv = ([k, k], [(k - 1) // 2] * 2, mode)
                        if fused:
                            y, stats = torch.ops.oes_fast.batch_norm_act_norm_sparse_conv2d(
                                xa, None, ga, ba, 1e-5, 0.2, g2, b2, 1e-3, va, t["row_ptr"], t["col_idx"], ca, *conv,
                                up, pool)
                        else:
                            act = torch.ops.oes_fast.batch_norm_act(xa, None, ga, ba, 1e-5, 0.2)
                            norm = torch.ops.oes_fast.batch_norm_act(act, None, g2, b2, 1e-3, 1.0)
                            if pool:
                                y, stats = torch.ops.oes_fast.sparse_conv2d_pool_stats(
                                    norm, va, t["row_ptr"], t["col_idx"], ca, *conv)
                            else:
                                y, stats = torch.ops.oes_fast.sparse_conv2d_stats(
                                    norm, va, t["row_ptr"], t["col_idx"], ca, *conv, up)
                        y.backward(grad)
                        pair_out = (y.detach(), stats, xa.grad, ga.grad, ba.grad, va.grad, ca.grad, g2.grad, b2.grad)
                        for name, r in zip(PAIR_RESULTS, pair_out):
                            got[f"pair{'_pool' if pool else ''}_{name}{'' if fused else '_three_ops'}"] = r
            out[str(dtype)] = got
        per_case.append(out)
    results["threads"][threads] = per_case
torch.save(results, sys.argv[2])
"""


def _env(isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("OES_FAST_CPU_ISA", None)
    # an L2 of 1 byte: the pooled ops of every case with more input than output channels make
    # their halo in slices of one input channel (pool_slice_channels), in every copy; the same
    # bits as whole halos (tests/test_sparse.py::test_pooled_halo_slices_keep_the_bits)
    env["OES_FAST_L2_CACHE_BYTES"] = "1"
    if isa is not None:
        env["OES_FAST_CPU_ISA"] = isa
    return env


def _python(code: str, isa: str | None, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=_env(isa), capture_output=True,
                          text=True, timeout=600)


def _inputs():
    cases = []
    for i, shape in enumerate(CASES):
        n, c_in, c_out, h, w, k, stride, mode, up, density = shape
        g = torch.Generator().manual_seed(1000 + i)
        weight = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
        keep = torch.rand(c_out, c_in, k, k, generator=g) < density
        values, row_ptr, col_idx = to_csr(weight * keep, keep)
        x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
        bias = torch.randn(c_out, generator=g, dtype=torch.float64)
        h_out = (h * up + 2 * ((k - 1) // 2) - k) // stride + 1
        w_out = (w * up + 2 * ((k - 1) // 2) - k) // stride + 1
        grad = torch.randn(n, c_out, h_out, w_out, generator=g, dtype=torch.float64)
        # a batch norm's scale and shift before the conv (sparse_conv2d_act_*)
        gamma = torch.randn(c_in, generator=g, dtype=torch.float64)
        beta = torch.randn(c_in, generator=g, dtype=torch.float64) * 0.5
        # a second batch norm after the first's LeakyReLU (batch_norm_act_norm_sparse_conv2d)
        gamma2 = torch.randn(c_in, generator=g, dtype=torch.float64)
        beta2 = torch.randn(c_in, generator=g, dtype=torch.float64) * 0.5
        cases.append({"shape": shape, "tensors": dict(x=x, values=values, row_ptr=row_ptr, col_idx=col_idx,
                                                      bias=bias, grad=grad, gamma=gamma, beta=beta, gamma2=gamma2,
                                                      beta2=beta2)})
    return cases


@pytest.fixture(scope="module")
def inputs():
    return _inputs()


_RESULTS: dict[str, dict] = {}


def _run_under(isa: str, inputs, tmp_path_factory) -> dict:
    if isa not in _RESULTS:
        folder = tmp_path_factory.mktemp(f"isa_{isa}")
        torch.save(inputs, folder / "inputs.pt")
        proc = _python(WORKER, isa, folder / "inputs.pt", folder / "results.pt")
        assert proc.returncode == 0, f"worker under OES_FAST_CPU_ISA={isa} failed:\n{proc.stderr[-4000:]}"
        _RESULTS[isa] = torch.load(folder / "results.pt")
    return _RESULTS[isa]


def _reference(case, dtype):
    """(out, input grad, weight grad at the kept taps, bias grad) of oes_fast.reference in dtype."""
    (n, c_in, c_out, h, w, k, stride, mode, up, density), t = case["shape"], case["tensors"]
    x = t["x"].to(dtype).clone().requires_grad_()
    v = t["values"].to(dtype).clone().requires_grad_()
    b = t["bias"].to(dtype).clone().requires_grad_()
    y = reference.sparse_conv2d(x, v, t["row_ptr"], t["col_idx"], k, b, stride, (k - 1) // 2, mode, up)
    y.backward(t["grad"].to(dtype))
    out = {"out": y.detach(), "input_grad": x.grad, "weight_grad": v.grad, "bias_grad": b.grad}
    if stride == 1 and up == 1:
        x, v, b = (a.detach().clone().requires_grad_() for a in (x, v, b))
        y = F.avg_pool2d(reference.sparse_conv2d(x, v, t["row_ptr"], t["col_idx"], k, b, 1, (k - 1) // 2, mode), 2)
        y.backward(t["grad"].to(dtype)[:, :, :h // 2, :w // 2])
        out.update(pool_out=y.detach(), pool_input_grad=x.grad, pool_weight_grad=v.grad, pool_bias_grad=b.grad)
    return out


ACT_RESULTS = ("out", "stats", "input_grad", "gamma_grad", "beta_grad", "weight_grad", "bias_grad")


def _act_reference(case, dtype, pool):
    """ACT_RESULTS but the statistics of the conv (with the pooling after it if pool) of
    reference.batch_norm_leaky_relu of x, in dtype; and the scales of the batch norm's gradients
    (see test_sparse_conv2d_under_isa)."""
    (n, c_in, c_out, h, w, k, stride, mode, up, density), t = case["shape"], case["tensors"]
    x, gamma, beta, v, b = (t[name].to(dtype).clone().requires_grad_()
                            for name in ("x", "gamma", "beta", "values", "bias"))
    act = reference.batch_norm_leaky_relu(x, gamma, beta, 1e-5, 0.2)
    act.retain_grad()
    y = reference.sparse_conv2d(act, v, t["row_ptr"], t["col_idx"], k, b, 1, (k - 1) // 2, mode, up)
    grad = t["grad"].to(dtype)
    if pool:
        y, grad = F.avg_pool2d(y, 2), grad[:, :, :h // 2, :w // 2]
    y.backward(grad)
    out = dict(zip(ACT_RESULTS[:1] + ACT_RESULTS[2:], (y.detach(), x.grad, gamma.grad, beta.grad, v.grad, b.grad)))
    # gamma's and beta's gradients sum dt * xhat and dt over every pixel, dt = the activation's
    # input gradient (rounded to dtype by the conv's input gradient) times its slope: their
    # rounding error scales with the sum of the terms' magnitudes, not with the sum
    xd = x.detach()
    xhat = (xd - xd.mean((0, 2, 3), keepdim=True)) / torch.sqrt(xd.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    dt = (act.grad * torch.where(act.detach() > 0, 1.0, 0.2)).abs()
    out["scales"] = {"gamma_grad": float((dt * xhat.abs()).sum((0, 2, 3)).max()),
                     "beta_grad": float(dt.sum((0, 2, 3)).max())}
    return out


PAIR_RESULTS = ACT_RESULTS + ("gamma2_grad", "beta2_grad")


def _pair_reference(case, dtype, pool):
    """The output of the conv (with the pooling after it if pool) of reference.batch_norm_leaky_relu
    of x, then reference.batch_norm_leaky_relu with a slope of 1 (the second batch norm), in dtype."""
    (n, c_in, c_out, h, w, k, stride, mode, up, density), t = case["shape"], case["tensors"]
    x, gamma, beta, gamma2, beta2, v, b = (t[name].to(dtype) for name in
                                           ("x", "gamma", "beta", "gamma2", "beta2", "values", "bias"))
    norm = reference.batch_norm_leaky_relu(reference.batch_norm_leaky_relu(x, gamma, beta, 1e-5, 0.2), gamma2, beta2,
                                           1e-3, 1.0)
    y = reference.sparse_conv2d(norm, v, t["row_ptr"], t["col_idx"], k, b, 1, (k - 1) // 2, mode, up)
    return F.avg_pool2d(y, 2) if pool else y


def test_a_case_has_output_channels_without_taps(inputs):
    """The premise CASES states: some case's weight keeps no tap in one of its output channels
    (an empty CSR row: that channel's output is its bias alone, and it adds nothing to the
    input gradient)."""
    empty = [case["shape"] for case in inputs
             if bool((case["tensors"]["row_ptr"].diff() == 0).any())]
    assert empty, "no case leaves an output channel without a kept tap"


def test_default_is_the_widest_supported():
    proc = _python("import oes_fast._C as C; print(C.cpu_isa())", None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ISAS[-1]
    assert ISAS[0] == "baseline"
    if X86 and "avx512f" in open("/proc/cpuinfo").read() and "avx512bw" in open("/proc/cpuinfo").read():
        assert "avx512" in ISAS


@pytest.mark.parametrize("isa", ISAS)
def test_forced_isa_is_reported(isa):
    proc = _python("import oes_fast._C as C; print(C.cpu_isa())", isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == isa


@pytest.mark.parametrize("value", ["avx", "AVX2 ", "sse"] + [i for i in ("avx2", "avx512") if i not in ISAS])
def test_unknown_or_unsupported_isa_is_an_error(value):
    code = "import oes_fast._C as C\ntry:\n    C.cpu_isa()\nexcept RuntimeError as e:\n    print('error:', e)\n"
    proc = _python(code, value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("error:") and "OES_FAST_CPU_ISA" in proc.stdout


@pytest.mark.parametrize("isa", ISAS)
def test_sparse_conv2d_under_isa(isa, inputs, tmp_path_factory):
    """Forward, statistics, input and weight gradients under one instruction set, and those of the
    conv with the pooling after it (sparse_conv2d_pool_stats): close to the reference in float64
    and float32, and the same bits with 1 and 2 threads."""
    results = _run_under(isa, inputs, tmp_path_factory)
    assert results["isa"] == isa
    for i, case in enumerate(inputs):
        for dtype in DTYPES:
            ref64, ref_lowp = _reference(case, torch.float64), _reference(case, dtype)
            got = results["threads"][1][i][str(dtype)]
            where = f"{case['shape']} {dtype} under {isa}"
            for name in ref64:
                assert got[name].dtype == dtype
                assert_close_to_reference(got[name], ref64[name], ref_lowp[name], name=f"{name} {where}")
            if "stats" in got:
                assert torch.equal(got["stats_out"], got["out"]), where
                assert_channel_stats(got["stats"], got["out"], dtype, where)
            if "pool_stats" in got:
                assert_channel_stats(got["pool_stats"], ref64["pool_out"], dtype, where)
            # the batch norm and activation in the conv's input load: the two ops' bits, the reference's values
            for pool in ("", "_pool"):
                if f"act{pool}_out" not in got:
                    continue
                for name in ACT_RESULTS:
                    two_ops = got[f"act{pool}_{name}_two_ops"]
                    assert torch.equal(got[f"act{pool}_{name}"], two_ops), f"act{pool} {name} {where}"
                act64 = _act_reference(case, torch.float64, pool == "_pool")
                act_lowp = _act_reference(case, dtype, pool == "_pool")
                scales = act64.pop("scales")
                for name in act64:
                    assert_close_to_reference(got[f"act{pool}_{name}"], act64[name], act_lowp[name],
                                              name=f"act{pool} {name} {where}", scale=scales.get(name))
                assert_channel_stats(got[f"act{pool}_stats"], act64["out"], dtype, where)
                # the pair of batch norms in the load: the three ops' bits (each checked against the
                # reference on its own, here and in test_sparse.py), the reference's output
                for name in PAIR_RESULTS:
                    three_ops = got[f"pair{pool}_{name}_three_ops"]
                    assert torch.equal(got[f"pair{pool}_{name}"], three_ops), f"pair{pool} {name} {where}"
                pair64, pair_lowp = (_pair_reference(case, d, pool == "_pool") for d in (torch.float64, dtype))
                assert_close_to_reference(got[f"pair{pool}_out"], pair64, pair_lowp, name=f"pair{pool} out {where}")
            other = results["threads"][2][i][str(dtype)]
            for name in got:
                assert torch.equal(got[name], other[name]), f"{name} {where}: bits differ between 1 and 2 threads"


def _functions_with_vex(so_path: str) -> dict[str, bool]:
    """{demangled function name: uses a VEX/EVEX-encoded instruction} of the shared object."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so_path], capture_output=True, text=True,
                          check=True).stdout
    found, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            found.setdefault(name, False)
        elif name is not None and re.search(r"\tv[a-z]", line):
            found[name] = True
    return found


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_wide_instructions_only_in_the_isa_copies():
    """The pitfall of target regions: an inline library function instantiated inside one would be
    compiled for AVX2/AVX-512 and might be the copy the linker keeps for every caller. So no
    function outside the isa_avx2 / isa_avx512 copies may use a VEX-encoded instruction."""
    found = _functions_with_vex(_C.__file__)
    if any(used for name, used in found.items() if "isa_baseline::" in name):
        pytest.skip("built with OES_FAST_ARCH_FLAGS above the x86-64 baseline: every copy uses wide instructions")
    outside = sorted(name for name, used in found.items()
                     if used and not re.match(r"^(?:[A-Za-z_][\w ]* )?oes_fast::isa_avx(2|512)::", name))
    assert not outside, "wide instructions outside the ISA copies:\n" + "\n".join(outside[:20])
    assert any(used for name, used in found.items() if "isa_avx512::" in name)
