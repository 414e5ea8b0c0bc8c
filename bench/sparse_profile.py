"""Where the time goes in the sparse generator, per layer and per phase, against the floors (issue 16):

    OMP_NUM_THREADS=1 python bench/sparse_profile.py [--size 512] [--repeats 9] [--quick]
        [--scaling 1024,2048] [--scaling-repeats 3] [--allocator kept|default]
        [--out bench/REPORT.md] [--json bench/sparse_profile.json] [--threads 1]

The problem is bench/bench_sparse.py's (its helpers are imported): the OES network (seed 0)
with the published pepper mask (density 0.05) applied to fresh weights, z = dip_input(32, S, S,
seed 1), batch norm with batch statistics, one thread (--threads N: N torch threads for every
timing, the peak and the bandwidth that set the floors included). `SparseGenerator.from_masked(model, mask)`
is run stage by stage, mirroring SparseGenerator.forward, with a clock read between stages:

- forward: without autograd, as SparseGenerator.forward runs it then (SparseGenerator.run_stage:
  a sparse conv followed by batch norm computes the batch statistics in its epilogue,
  `sparse_conv2d_stats`; a batch norm (with the LeakyReLU after it) that a sparse conv follows
  is made in that conv's input load, ops.batch_norm_leaky_relu_sparse_conv2d: one row "bn ...
  + conv ... (fused)" named after both, counted as a sparse conv; every other batch norm runs
  as ops.batch_norm_leaky_relu, one pass with the LeakyReLU after it, after its own statistics
  pass where no conv precedes; the last one, its LeakyReLU and the 1x1 output conv as
  ops.batch_norm_leaky_relu_conv1x1, one pass);
- training step: zero_grad, forward with autograd as SparseGenerator.forward runs it then (a
  sparse conv followed by batch norm: sparse_conv2d_stats; a batch norm followed by LeakyReLU:
  both in one op, ops.batch_norm_leaky_relu, one pass from the conv's statistics or after its
  own statistics pass, two per channel backward: one "batch norm + activation" row each; in the
  next sparse conv's input load where one follows, as in the forward: one "batch norm[ +
  activation] + sparse conv" row each, forward and backward; the
  last one with the 1x1 output conv, ops.batch_norm_leaky_relu_conv1x1: "+ act + out"; other
  batch norms F.batch_norm or ops.batch_norm_from_stats), MSE loss, backward, Adam (lr 0.01;
  its own row). The backward is timed per stage in context by tensor hooks on every stage's
  output: on this chain the gradient of stage i's output arrives, then stage i's backward runs,
  then the gradient of its input arrives (a fused pair of stages counts as one).
- isolated ops: every sparse conv's ops called directly (torch.ops.oes_fast.sparse_conv2d,
  sparse_conv2d_stats, sparse_conv2d_input_grad, sparse_conv2d_weight_grad) on the layer's
  actual input and output gradient captured from a step run with the batch norms as ops of
  their own (capture_unfused: a conv's input is then the activated tensor), plus the pieces the autograd formula
  (oes_fast/ops.py) adds around them: the bias gradient (channel sum). A fused upsampling is
  taken by the gradient ops themselves, as by the forward. Timed in shuffled rounds (below).

Not present in this generator, so no rows: padding (reflection is applied in the conv's halo
load), concatenation (the OES network has no skip branches) and a separate forward upsampling
(fused into the conv's input load of the up path).

Per row: median time over the repeats; executed FLOPs (2 x kept multiply-adds x output pixels
for sparse convs, 2 x all compacted taps for the dense 1x1 output conv; elementwise ops: 1 per
element for an activation, 2 for a batch-norm apply, 5 for batch norm with statistics, 3 for
sigmoid, 4 per output pixel for 2x2 average pooling, the sums of its parts for a fused batch
norm + activation); bytes that must move, a one-pass lower
bound: every input activation read once, every output written once, weights and CSR indices
read once, float32 (a batch norm with batch statistics needs two passes over its input when it
does not fit in cache, so its ratio cannot get below about 1.5); FLOP floor = FLOPs / peak,
byte floor = bytes / bandwidth, and time / max(floors). Peak: oneDNN dense conv 128 -> 128,
3x3, 64x64, no padding (bench_sparse.py's test_peak_conv), on the run's threads; bandwidth: a torch copy
of 256 MiB, read + write counted (bench/report.py's measure_bandwidth). Both are timed once per
round inside the shuffled rounds, so they see the contention the rows see, and their medians
set the floors (the machine is shared: a peak measured alone in a quiet second and rows timed
under load would mix two machines); measure_bandwidth and a 20-conv median at the start and the
end are reported beside them, and so is the same copy of 4 to 64 MiB buffers, timed once at the
start: what the caches serve (tensors that stay in them between ops move that fast, so their byte
floors are lower than the table's).

--scaling SIZES: is the cost linear in pixels, row by row? The instrumented step and the isolated
ops run at --size and at each of SIZES (fresh generators, captured tensors per size), all sizes
in the same shuffled rounds (--scaling-repeats of them); per phase and per op, the time per
pixel at each size over that at --size (1.00: linear; above: slower per pixel). No dense runs.

Allocator: by default glibc keeps freed memory for reuse (oes_fast.allocator.keep_freed_memory,
as the oes-fast command runs); with --allocator default every large temporary is a fresh mapping
whose pages fault in again on every call. Minor page faults per call are counted either way.

Whole-network times (uninstrumented sparse forward and step, the forward as
SparseGenerator.forward runs it without autograd: one C++ call after the first; the masked dense forward through
oneDNN in NCHW and channels-last, and the masked dense training step of bench_sparse.py) are
timed in rounds with the instrumented runs, every round in its own shuffled order (seeded; a
fixed or rotated order makes each call follow the same neighbour, whose freed memory or cache
footprint it then inherits every time); ratios are the
median of the per-round ratios. Writes a markdown section between
<!-- sparse_profile:begin --> and <!-- sparse_profile:end --> of --out and the raw numbers to
--json. The machine is shared: read ratios, and the load average next to them.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_sparse  # noqa: E402
from bench_sparse import DATA  # noqa: E402
from report import measure_bandwidth  # noqa: E402

import oes_fast._C as _C  # noqa: E402
from oes_fast.cli.common import cpu_model  # noqa: E402
from oes_fast.ops import _channel_sum  # noqa: E402
from oes_fast.sparse import SparseGenerator, _BatchNorm, _Conv  # noqa: E402
from oes_fast.train import adam  # noqa: E402

BEGIN, END = "<!-- sparse_profile:begin -->", "<!-- sparse_profile:end -->"
PEAK_CALL, COPY_CALL = "peak conv", "bandwidth copy"
COPY_SIZES_MIB = (4, 16, 32, 64)  # copy bandwidth at these buffer sizes, reported beside the floors
PEAK_FLOPS = 2 * 128 * 128 * 9 * 62 * 62  # the peak conv's FLOPs
F32 = 4
ops = torch.ops.oes_fast


# ------------------------------------------------------------------------------ problem
def problem(size: int) -> dict:
    """bench_sparse.py's problem at size x size (SystemExit without the published masks)."""
    if not (DATA / "pepper_density0.05.npz").exists():
        raise SystemExit(f"needs {DATA / 'pepper_density0.05.npz'}")
    return bench_sparse.problem(size)


def measure_peak(repeats: int = 20) -> float:
    """FLOP/s of oneDNN on bench_sparse.py's peak conv (128 -> 128, 3x3, 64x64), median."""
    x, w = torch.rand(1, 128, 64, 64), torch.rand(128, 128, 3, 3)
    flops = PEAK_FLOPS
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            t = time.perf_counter()
            F.conv2d(x, w)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return flops / statistics.median(times)


# ------------------------------------------------------------------------------ labels and work
def stage_labels(gen) -> list[str]:
    labels, prev = [], "input"
    for name, st in zip(gen.names, gen.stages):
        if name is not None:
            labels.append(name)
            prev = name
        else:
            labels.append(f"{st.op}{'(' + st.arg + ')' if st.op == 'act' and st.arg != 'LeakyReLU' else ''} after {prev}")
    return labels


def conv_work(st: _Conv, x_shape, out_shape, backward=False, input_grad=True) -> tuple[float, float]:
    """(FLOPs, bytes) of a conv stage forward, or of its whole backward (input grad if needed,
    weight grad, bias grad; one-pass lower bound)."""
    n, _, h_in, w_in = x_shape
    px_in, px_out = n * h_in * w_in, out_shape[0] * out_shape[2] * out_shape[3]
    kk = st.kernel[0] * st.kernel[1]
    taps = st.values.numel() if st.mode == "sparse" else st.n_out * st.n_in * kk
    weights = st.values.numel() * (F32 + 4) + (st.n_out + 1) * 8 + st.n_out * F32
    if not backward:
        return 2.0 * taps * px_out, F32 * (st.n_in * px_in + st.n_out * px_out) + weights
    flops = 2.0 * taps * px_out * (2 if input_grad else 1) + st.n_out * px_out
    nbytes = F32 * (st.n_out * px_out + st.n_in * px_in * (2 if input_grad else 1)) + weights + st.values.numel() * F32
    return flops, nbytes


ELEMENTWISE_FLOPS = {"act": 1, "sigmoid": 3}


def conv_output_shape(st: _Conv, x_shape, out_shape, phase: str):
    """The conv's own output shape: for a conv run with the pooling after it ("conv + pool ..."),
    the size before the pooling (the work counted is the conv's at full size)."""
    if phase.startswith("conv + pool"):
        return (out_shape[0], out_shape[1], x_shape[2], x_shape[3])
    return out_shape


def stage_work(st, x_shape, out_shape, phase: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one non-conv stage in `phase` (see the module docstring)."""
    numel = lambda s: float(s[0] * s[1] * s[2] * s[3])  # noqa: E731
    i, o = numel(x_shape), numel(out_shape)
    if isinstance(st, _BatchNorm) and "1x1 conv" in phase:
        # the head (ops.batch_norm_leaky_relu_conv1x1): batch-norm apply and activation on the
        # input, the 1x1 conv (every compacted tap) into out_shape's channels; backward: the
        # batch norm's and the activation's, and the conv's input and weight gradients (read the
        # input and the output's gradient, write the input's)
        if phase.startswith("bwd"):
            return 10 * i + 4.0 * x_shape[1] * o, F32 * (2 * i + o)
        return 3 * i + 2.0 * x_shape[1] * o, F32 * (i + o)
    if isinstance(st, _BatchNorm):
        # the phase names its parts (SparseGenerator.run_stage): "bn stats + apply[ + activation]
        # (fused)", "bn apply[ + activation][ (fused)]" from the conv's statistics, "fwd"
        # (F.batch_norm: statistics + apply); backward "bwd[ + activation]"
        act = ELEMENTWISE_FLOPS["act"] * o if "activation" in phase else 0.0  # fused: no bytes of its own
        if phase.startswith("bwd"):  # read grad and input, write grad
            return 9 * o + act, F32 * 3 * o
        with_stats = phase == "fwd" or phase.startswith("bn stats")
        return (5 if with_stats else 2) * o + act, F32 * 2 * o
    if st.op == "pool":
        return (4 * o, F32 * (i + o)) if phase == "fwd" else (i, F32 * (i + o))
    f = ELEMENTWISE_FLOPS[st.op]
    return (f * o, F32 * 2 * o) if phase == "fwd" else (f * o, F32 * 3 * o)


# ------------------------------------------------------------------------------ instrumented runs
def forward_timed(gen, z, shapes=None):
    """SparseGenerator.forward without autograd (same branches), clock read after every stage:
    (output, {(stage index, phase): seconds}). `shapes`, if given, gets {stage: (in, out)}."""
    assert not torch.is_grad_enabled()
    gen.check_input(z)
    x, const, hw = z, None, (z.shape[0], z.shape[2], z.shape[3])
    stats, i, times = None, 0, {}
    t0 = time.perf_counter()
    while i < len(gen.stages):  # SparseGenerator.forward's stages and fusions
        xin = x
        x, const, hw, stats, nxt, phase = gen.run_stage(i, x, const, hw, stats)
        t1 = time.perf_counter()
        times[i, phase] = t1 - t0
        t0 = t1
        if shapes is not None:
            shapes[i] = (tuple(xin.shape), tuple(x.shape))
        i = nxt
    return x, times


def step_timed(gen, opt, z, target, capture=None):
    """One training step, stage by stage: {(stage index or name, phase): seconds}. `capture`, if
    given, gets the inputs and output gradients of every stage ({i: (input, grad of output)})."""
    times = {}
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    times["zero_grad", "step"] = t1 - t0
    x, const, hw = z, None, (z.shape[0], z.shape[2], z.shape[3])
    outs, inputs = {}, {}  # by stage index; a batch norm fused with its activation holds the pair's
    t0 = t1
    stats, i = None, 0
    while i < len(gen.stages):  # SparseGenerator.forward's stages and fusions, with autograd
        inputs[i] = x
        x, const, hw, stats, nxt, phase = gen.run_stage(i, x, const, hw, stats)
        t1 = time.perf_counter()
        times[i, phase] = t1 - t0
        t0 = t1
        outs[i] = x
        i = nxt
    loss = ((x - target) ** 2).mean()
    t1 = time.perf_counter()
    times["loss (MSE)", "fwd"] = t1 - t0
    stamps = {}
    grads = {}

    def hook(i):
        def fn(g):
            stamps[i] = time.perf_counter()
            if capture is not None:
                grads[i] = g.detach()
        return fn

    for i, o in outs.items():
        if o is not None and o.requires_grad:
            o.register_hook(hook(i))
    t_start = time.perf_counter()
    loss.backward()
    t_end = time.perf_counter()
    keys = sorted(outs)
    times["loss (MSE)", "bwd"] = stamps[keys[-1]] - t_start
    for before, i in zip(keys, keys[1:]):
        times[i, "bwd"] = stamps[before] - stamps[i]
    times[keys[0], "bwd"] = t_end - stamps[keys[0]]
    t0 = time.perf_counter()
    opt.step()
    times["adam", "step"] = time.perf_counter() - t0
    if capture is not None:
        for i in keys:
            capture[i] = (inputs[i], grads.get(i), outs[i])
    return times


def fused_activation_stages(step_times: dict) -> set:
    """The stages whose batch norm step_timed ran fused with the activation after it."""
    return {k[0] for k in step_times if "activation" in k[1]}


def head_stages(step_times: dict) -> set:
    """The stages whose batch norm step_timed ran with the activation and the 1x1 output conv."""
    return {k[0] for k in step_times if "1x1 conv" in k[1]}


def prologue_stages(step_times: dict) -> set:
    """The stages whose batch norm (and activation, and the batch norm after it) step_timed ran in
    the next sparse conv's input load (ops.batch_norm_leaky_relu_sparse_conv2d,
    ops.batch_norm_leaky_relu_batch_norm_sparse_conv2d; SparseGenerator.prologue_conv,
    pair_prologue_conv)."""
    return {k[0] for k in step_times if "+ conv" in k[1]}


def pair_stages(step_times: dict) -> set:
    """The prologue stages with two batch norms ("bn ... + activation + bn stats + apply + conv")."""
    return {k[0] for k in step_times if "+ conv" in k[1] and k[1].count("apply") == 2}


def prologue_conv_index(i: int, phase: str) -> int:
    """The conv of a "bn ... + conv ..." phase of stage i: after the batch norm, its activation and
    the second batch norm, where the phase has them."""
    return i + phase.count("apply") + ("activation" in phase)


def prologue_label(labels, i: int, phase: str) -> str:
    """The row label of a prologue phase: the batch norms' and the conv's names."""
    norms = [labels[i]] + ([labels[i + 2]] if phase.count("apply") == 2 else [])
    return " + ".join(norms + [labels[prologue_conv_index(i, phase)]])


def step_kind(gen, i, fused: set, heads: set = frozenset(), prologues: set = frozenset(),
              pairs: set = frozenset()) -> str:
    if i in heads:
        return "batch norm + activation + 1x1 conv"
    if i in prologues:
        return ("batch norm" + (" + activation" if i in fused else "") + (" + batch norm" if i in pairs else "")
                + " + sparse conv")
    return "batch norm + activation" if i in fused else stage_kind(gen.stages[i])


def prologue_work(gen, i, phase, x_shape, conv_out_shape, backward=False) -> tuple[float, float]:
    """(FLOPs, bytes) of a batch norm (and activation) made in the input load of the sparse conv
    after it: the conv's work on an input of x's size (x is read instead of the activation) plus
    the batch norm's arithmetic (2 per element, 5 with its own statistics pass, which reads x once
    more; 1 for the activation); backward: the conv's and the batch norm's (9 per element). With a
    second batch norm (a pair): its statistics pass (reads x, activates, 5 + 1 per element) and
    backward (9 per element; the activation made again: reads x, writes it, and that backward
    reads it and the gradient and writes one)."""
    conv = gen.stages[prologue_conv_index(i, phase)]
    numel = float(x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3])
    act = ELEMENTWISE_FLOPS["act"] * numel if "activation" in phase else 0.0
    pair = phase.count("apply") == 2
    fl, nb = conv_work(conv, x_shape, conv_out_shape, backward=backward)
    if backward:  # the batch norm's backward reads x and the activation's gradient, writes x's
        fl, nb = fl + 9 * numel + act, nb + F32 * 3 * numel
        return (fl + 9 * numel + act, nb + F32 * 5 * numel) if pair else (fl, nb)
    own_stats = phase.startswith("bn stats")
    conv_stats = 3.0 * conv_out_shape[0] * conv_out_shape[1] * conv_out_shape[2] * conv_out_shape[3]
    fl, nb = fl + conv_stats + (5 if own_stats else 2) * numel + act, nb + (F32 * numel if own_stats else 0.0)
    return (fl + 6 * numel, nb + F32 * numel) if pair else (fl, nb)


def prologue_conv_out(phase, x_shape, out_shape, upsample) -> tuple:
    """The conv's own output shape of a prologue phase (before its pooling, if any)."""
    if "pool" in phase:
        return (out_shape[0], out_shape[1], x_shape[2], x_shape[3])
    return (out_shape[0], out_shape[1], x_shape[2] * upsample, x_shape[3] * upsample)


def capture_unfused(gen, opt, z, target) -> dict:
    """step_timed's capture of one more step with every stage's input and output gradient, the
    batch norms run as ops of their own (fuse_prologue off): the convs that run with a batch norm
    in their input load get their activated input captured, so the isolated ops time the conv's
    kernels alone on it."""
    capture, before = {}, gen.fuse_prologue
    gen.fuse_prologue = False
    try:
        step_timed(gen, opt, z, target, capture)
    finally:
        gen.fuse_prologue = before
    return capture


def isolated_conv_ops(gen, capture) -> tuple[dict, dict]:
    """Callables and (FLOPs, bytes) of every sparse conv's ops on the captured tensors:
    {(stage index, phase): fn}, {(stage index, phase): (flops, bytes)}."""
    fns, work = {}, {}
    for i, st in enumerate(gen.stages):
        if isinstance(st, _Conv) and st.mode == "sparse":
            _layer_ops(i, st, capture[i], fns, work, pooled=gen.fuses_pool(i, capture[i][0]))
    return fns, work


def _layer_ops(i, st, captured, fns, work, pooled=False):
    """isolated_conv_ops for one conv (a function of its own so that the closures bind its locals).
    pooled: the generator runs it with the 2x2 average pooling after it as one op
    (SparseGenerator.fuses_pool); the captured output gradient is then the pooled one, and the ops
    are sparse_conv2d_pool_stats and its weight and input gradients. The work counted is the
    conv's at full size either way."""
    x, g, out = captured
    x = x.detach().contiguous()
    g = g.contiguous()
    u = st.upsample
    n, c, h, w = x.shape
    ph, pw = (st.kernel[0] - 1) // 2, (st.kernel[1] - 1) // 2
    # the conv's own (masked) bias; in the generator the folded constants are added to it, which
    # changes its values, not the work
    bias = ((st.bias * st.bias_mask).detach().index_select(0, st.live_out).contiguous() if st.bias is not None
            else torch.zeros(st.n_out) if st.fold_weight is not None else None)
    values = st.values.detach()
    nnz, px_in, px_out = values.numel(), n * h * w, g.shape[0] * g.shape[2] * g.shape[3]
    px_conv = px_in * u * u  # the conv's output pixels (before any pooling; stride 1)
    weights = nnz * (F32 + 4) + (st.n_out + 1) * 8
    act_in, act_out = F32 * c * px_in, F32 * st.n_out * px_out
    conv_flops = 2.0 * nnz * px_conv
    if pooled:
        fns[i, "sparse_conv2d_pool_stats"] = (lambda x=x, b=bias: ops.sparse_conv2d_pool_stats(
            x, values, st.row_ptr, st.col_idx, b, st.kernel, [ph, pw], "reflect"))
        work[i, "sparse_conv2d_pool_stats"] = (conv_flops + st.n_out * px_conv + 3.0 * st.n_out * px_out,
                                               act_in + act_out + weights)
        weight_grad = (lambda g=g, x=x: ops.sparse_conv2d_pool_weight_grad(
            g, x, st.row_ptr, st.col_idx, st.kernel, [ph, pw], "reflect"))
        input_grad = (lambda g=g, shape=[n, c, h, w]: ops.sparse_conv2d_pool_input_grad(
            g, values, st.row_ptr, st.col_idx, shape, st.kernel, [ph, pw], "reflect"))
    else:
        fns[i, "sparse_conv2d"] = (lambda x=x, b=bias: ops.sparse_conv2d(
            x, values, st.row_ptr, st.col_idx, b, st.kernel, [1, 1], [ph, pw], "reflect", u))
        work[i, "sparse_conv2d"] = (conv_flops, act_in + act_out + weights)
        fns[i, "sparse_conv2d_stats"] = (lambda x=x, b=bias: ops.sparse_conv2d_stats(
            x, values, st.row_ptr, st.col_idx, b, st.kernel, [ph, pw], "reflect", u))
        work[i, "sparse_conv2d_stats"] = (conv_flops + 3.0 * st.n_out * px_out, act_in + act_out + weights)
        # with a fused upsampling the op folds each u x u block onto its stored pixel itself
        input_grad = (lambda g=g, shape=[n, c, h, w]: ops.sparse_conv2d_input_grad(
            g, values, st.row_ptr, st.col_idx, shape, st.kernel, [1, 1], [ph, pw], "reflect", u))
        # the weight gradient reads the stored input through the upsampling, as the forward does
        weight_grad = (lambda g=g, x=x: ops.sparse_conv2d_weight_grad(
            g, x, st.row_ptr, st.col_idx, st.kernel, [1, 1], [ph, pw], "reflect", u))
    if i > 0:  # the first conv reads z, which needs no gradient
        fns[i, "input_grad"] = input_grad
        work[i, "input_grad"] = (conv_flops, act_out + act_in + weights)
    fns[i, "weight_grad"] = weight_grad
    work[i, "weight_grad"] = (conv_flops, act_out + act_in + weights)
    if st.bias is not None or st.fold_weight is not None:  # the op's bias then needs a gradient
        fns[i, "bias grad (channel sum)"] = (lambda g=g: _channel_sum(g))
        work[i, "bias grad (channel sum)"] = (float(st.n_out * px_out), act_out)


# ------------------------------------------------------------------------------ timing
def rounds_shuffled(calls: dict, rounds: int, warmup: int = 1) -> dict:
    """{name: [result of each round]}: every callable (returning seconds, or a dict of them)
    once per round, in an order shuffled anew every round (seeded), after `warmup` calls each."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    out = {name: [] for name in names}
    for r in range(rounds):
        order = list(names)
        random.Random(r).shuffle(order)
        for name in order:
            out[name].append(calls[name]())
    return out


def timed(fn):
    def run():
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return run


def med(xs):
    return statistics.median(xs)


# ------------------------------------------------------------------------------ the run
def page_faults(fn) -> int:
    """Minor page faults of one call of fn."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def run(size: int, repeats: int, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    load = [os.getloadavg()[0]]
    peaks, bws = [measure_peak()], [measure_bandwidth()[0]]
    # the floors use the 256 MiB copy; these show how much faster tensors that stay in cache move
    copy_by_size = {mib: measure_bandwidth(mib)[0] for mib in COPY_SIZES_MIB}
    p = problem(size)
    gen = SparseGenerator.from_masked(p["model"], p["mask"])
    labels = stage_labels(gen)
    z, target = p["z"], p["target"]

    # shapes, and a check that the instrumented forward is the generator's forward
    shapes = {}
    with torch.no_grad():
        out, _ = forward_timed(gen, z, shapes)
        ref = gen(z)
    assert torch.equal(out, ref), "instrumented forward differs from SparseGenerator.forward"

    # whole networks
    dense, dense_cl = p["dense"], copy.deepcopy(p["dense"]).to(memory_format=torch.channels_last)
    z_cl = z.contiguous(memory_format=torch.channels_last)
    opt = adam(gen.parameters(), 0.01)
    gen_whole = SparseGenerator.from_masked(p["model"], p["mask"])
    sparse_step = bench_sparse.train_step(gen_whole, z, target)
    dense_step = bench_sparse.train_step(copy.deepcopy(dense), z, target, p["mask"])  # test_train_step_dense_masked's

    def no_grad(fn):
        def f():
            with torch.no_grad():
                return fn()
        return f

    calls = {
        "sparse forward": no_grad(timed(lambda: gen_whole(z))),
        "sparse forward (instrumented)": no_grad(lambda: forward_timed(gen, z)[1]),
        "dense forward NCHW": no_grad(timed(lambda: dense(z))),
        "dense forward channels-last": no_grad(timed(lambda: dense_cl(z_cl))),
        "sparse step": timed(sparse_step),
        "sparse step (instrumented)": lambda: step_timed(gen, opt, z, target),
        "dense step NCHW": timed(dense_step),
    }
    load.append(os.getloadavg()[0])
    # the floors, measured in the same rounds as the rows (same contention); FLOP/s and bytes/s
    x_pk, w_pk = torch.rand(1, 128, 64, 64), torch.rand(128, 128, 3, 3)
    src = torch.rand(256 * 2**20 // 4)
    dst = torch.empty_like(src)
    floors = {PEAK_CALL: no_grad(timed(lambda: F.conv2d(x_pk, w_pk))), COPY_CALL: timed(lambda: dst.copy_(src))}
    res = rounds_shuffled({**calls, **floors}, repeats)
    floor_samples = {k: res.pop(k) for k in floors}
    load.append(os.getloadavg()[0])
    faults = {k: page_faults(f) for k, f in calls.items() if "instrumented" not in k}

    # isolated ops on the captured tensors of one more step
    capture = capture_unfused(gen, opt, z, target)
    fns, work = isolated_conv_ops(gen, capture)
    iso = rounds_shuffled({**{k: timed(f) for k, f in fns.items()}, **floors}, repeats)
    for k in floors:
        floor_samples[k] += iso.pop(k)
    load.append(os.getloadavg()[0])
    peaks.append(measure_peak())
    bws.append(measure_bandwidth()[0])
    peak = PEAK_FLOPS / med(floor_samples[PEAK_CALL])
    bw = 2 * src.numel() * F32 / med(floor_samples[COPY_CALL])

    # rows
    rows = []

    def row(section, key, label, phase, times, flops, nbytes, context, kind=None):
        t = med(times)
        floor_f, floor_b = flops / peak, nbytes / bw
        kind = kind or (key if isinstance(key, str) else stage_kind(gen.stages[key]))
        rows.append(dict(section=section, stage=key, kind=kind, layer=label, phase=phase, time_s=t, flops=flops,
                         bytes=nbytes, flop_floor_s=floor_f, byte_floor_s=floor_b,
                         over_floor=t / max(floor_f, floor_b) if max(floor_f, floor_b) > 0 else None,
                         context=context, repeats=len(times)))

    fwd_rounds = res["sparse forward (instrumented)"]
    for (i, phase) in fwd_rounds[0]:
        st = gen.stages[i]
        xs, os_ = shapes[i]
        if "+ conv" in phase:
            j = prologue_conv_index(i, phase)
            fl, nb = prologue_work(gen, i, phase, xs, prologue_conv_out(phase, xs, os_, gen.stages[j].upsample))
            row("forward", i, prologue_label(labels, i, phase), phase, [r[i, phase] for r in fwd_rounds], fl, nb,
                "in context", kind="sparse conv")
            continue
        if isinstance(st, _Conv):
            fl, nb = conv_work(st, xs, conv_output_shape(st, xs, os_, phase))
            if "bn stats" in phase:
                fl += 3.0 * os_[1] * os_[0] * os_[2] * os_[3]
        else:
            fl, nb = stage_work(st, xs, os_, phase)
        row("forward", i, labels[i], phase, [r[i, phase] for r in fwd_rounds], fl, nb, "in context")

    step_rounds = res["sparse step (instrumented)"]
    sh = {i: (tuple(capture[i][0].shape), tuple(capture[i][2].shape)) for i in capture}
    fused, heads = fused_activation_stages(step_rounds[0]), head_stages(step_rounds[0])
    prologues, pairs = prologue_stages(step_rounds[0]), pair_stages(step_rounds[0])
    forward_phase = {i: phase for i, phase in step_rounds[0] if isinstance(i, int) and phase != "bwd"}
    for key in step_rounds[0]:
        i, phase = key
        ts = [r[key] for r in step_rounds]
        if isinstance(i, str):
            numel_out = float(target.numel())
            if i == "adam":
                n_par = sum(q.numel() for q in gen.parameters())
                fl, nb = 12.0 * n_par, 7.0 * F32 * n_par
            elif i == "zero_grad":
                fl, nb = 0.0, 0.0
            else:  # loss
                fl, nb = (3 * numel_out, F32 * 2 * numel_out) if phase == "fwd" else (3 * numel_out, F32 * 3 * numel_out)
            row("step", i, i, phase, ts, fl, nb, "in context")
            continue
        st = gen.stages[i]
        if i in prologues:  # (sh: the unfused capture's shapes, the conv's at its own index)
            j = prologue_conv_index(i, forward_phase[i])
            conv_out = prologue_conv_out(forward_phase[i], sh[i][0], sh[j][1], gen.stages[j].upsample)
            fl, nb = prologue_work(gen, i, forward_phase[i], sh[i][0], conv_out, backward=phase == "bwd")
            row("step", i, prologue_label(labels, i, forward_phase[i]), phase, ts, fl, nb, "in context",
                kind=step_kind(gen, i, fused, heads, prologues, pairs))
            continue
        if isinstance(st, _Conv):
            fl, nb = conv_work(st, sh[i][0], conv_output_shape(st, *sh[i], forward_phase[i]), backward=phase == "bwd",
                               input_grad=i > 0)
            if "bn stats" in phase:
                fl += 3.0 * sh[i][1][1] * sh[i][1][0] * sh[i][1][2] * sh[i][1][3]
        else:
            bwd = "bwd + activation" + (" + 1x1 conv" if i in heads else "")
            fl, nb = stage_work(st, *sh[i], bwd if i in fused and phase == "bwd" else phase)
        label = labels[i] + (" + act + out" if i in heads else " + act" if i in fused else "")
        row("step", i, label, phase, ts, fl, nb, "in context", kind=step_kind(gen, i, fused, heads))

    for (i, phase), ts in iso.items():
        row("isolated", i, labels[i], phase, ts, *work[i, phase], "isolated")

    whole = {k: [t for t in v] for k, v in res.items() if "instrumented" not in k}
    ratio = {k: med([a / b for a, b in zip(v, whole["sparse forward" if "forward" in k else "sparse step"])])
             for k, v in whole.items()}
    return dict(
        size=size, repeats=repeats, threads=torch.get_num_threads(), cpu=cpu_model(), cores=os.cpu_count(),
        isa=_C.cpu_isa(),
        torch=torch.__version__, date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load_average_1min=load, peak_flops=peak, peaks_measured=peaks, bandwidth=bw, bandwidths_measured=bws,
        copy_bandwidth_by_mib=copy_by_size,
        floor_samples_s=floor_samples,
        whole={k: dict(median_s=med(v), times_s=v, ratio_to_sparse=ratio[k], minor_page_faults=faults[k])
               for k, v in whole.items()},
        instrumented_totals=dict(
            forward=[sum(r.values()) for r in fwd_rounds], step=[sum(r.values()) for r in step_rounds]),
        # (the output conv has no stage of its own where the head op runs it: its output is stage i - 2's)
        conv_layers=[dict(stage=i, name=labels[i], n_in=st.n_in, n_out=st.n_out, kernel=st.kernel, nnz=st.values.numel(),
                          density=st.density, mode=st.mode, upsample=st.upsample, out_hw=list((sh[i] if i in sh else sh[i - 2])[1][2:]))
                     for i, st in enumerate(gen.stages) if isinstance(st, _Conv)],
        rows=rows,
    )


# ------------------------------------------------------------------------------ report
def ms(s):
    return f"{1e3 * s:.2f}"


def stage_kind(st) -> str:
    if isinstance(st, _Conv):
        return "sparse conv" if st.mode == "sparse" else f"dense {st.kernel[0]}x{st.kernel[1]} conv"
    if isinstance(st, _BatchNorm):
        return "batch norm"
    return {"act": "activation", "pool": "avg pool 2x2", "sigmoid": "sigmoid"}.get(st.op, st.op)


def phase_of(r) -> str:
    """The phase a row counts toward in the summary."""
    st, ph, kind = r["stage"], r["phase"], r["kind"]
    if isinstance(st, str):
        return {"adam": "Adam", "zero_grad": "zero_grad"}.get(st, f"MSE loss {ph}")
    if r["section"] == "forward":
        return f"{kind}: {ph}" if kind in ("sparse conv", "batch norm") else kind
    return f"{kind} {'backward' if ph == 'bwd' else 'forward'}"


def summarize(rows, peak, bw):
    groups = {}
    for r in rows:
        g = groups.setdefault(phase_of(r), dict(n=0, time_s=0.0, flops=0.0, bytes=0.0))
        g["n"] += 1
        g["time_s"] += r["time_s"]
        g["flops"] += r["flops"]
        g["bytes"] += r["bytes"]
    out = []
    for name, g in groups.items():
        ff, fb = g["flops"] / peak, g["bytes"] / bw
        out.append(dict(phase=name, **g, flop_floor_s=ff, byte_floor_s=fb,
                        over_floor=g["time_s"] / max(ff, fb) if max(ff, fb) > 0 else None))
    return sorted(out, key=lambda g: -g["time_s"])


def floors_line(fwd_phases, step_phases, f_ref, s_ref, peak, bw) -> str:
    """Issue 16's floor target, read on this run: the uninstrumented forward and step against
    their FLOP floors (all their FLOPs at the peak) and against the sums of their phases' larger
    floors (`summarize`'s phases, the tables below)."""
    parts = []
    for name, phases, t in (("forward", fwd_phases, f_ref), ("step", step_phases, s_ref)):
        flop_floor = sum(g["flops"] for g in phases) / peak
        floor_sum = sum(max(g["flop_floor_s"], g["byte_floor_s"]) for g in phases)
        parts.append(f"the {name} ({ms(t)} ms) is {t / flop_floor:.2f}x its FLOP floor ({ms(flop_floor)} ms) and "
                     f"{t / floor_sum:.2f}x the sum of its phases' larger floors ({ms(floor_sum)} ms)")
    return f"Against the floors at {peak / 1e9:.1f} GFLOP/s and {bw / 1e9:.1f} GB/s: " + "; ".join(parts) + ".\n"


def ratio(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(rows, first_cols, share=True):
    lines = ["| " + " | ".join(first_cols) + " | ms |" + (" % |" if share else "") +
             " GFLOP | MB | FLOP floor ms | byte floor ms | time / max(floors) |",
             "|" + "---|" * len(first_cols) + "---:|" * (7 if share else 6)]
    total = sum(r["time_s"] for r in rows)
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in first_cols) + f" | {ms(r['time_s'])} |" +
                     (f" {100 * r['time_s'] / total:.1f} |" if share else "") +
                     f" {r['flops'] / 1e9:.4f} | {r['bytes'] / 1e6:.2f} | {ms(r['flop_floor_s'])} | "
                     f"{ms(r['byte_floor_s'])} | {ratio(r['over_floor'])} |")
    return lines


def cache_bandwidth_note(d: dict) -> str:
    """The copy bandwidth by buffer size (measured alone at the start), where the run has it."""
    by = d.get("copy_bandwidth_by_mib")
    if not by:
        return ""
    sizes = ", ".join(f"{mib} MiB {bw / 1e9:.1f}" for mib, bw in sorted(by.items(), key=lambda kv: int(kv[0])))
    fastest = max(by.values())
    return (f"The same copy of smaller buffers, alone at the start: {sizes} GB/s, up to "
            f"{fastest / d['bandwidths_measured'][0]:.1f}x the 256 MiB copy's {d['bandwidths_measured'][0] / 1e9:.1f}: "
            f"a row whose tensors stay in the caches between ops moves its bytes faster than its byte floor "
            f"assumes, so its real floor is lower. ")


def render(d: dict, quick: bool) -> str:
    peak, bw, size = d["peak_flops"], d["bandwidth"], d["size"]
    la = d["load_average_1min"]
    W = d["whole"]
    isa = f", {d['isa']} kernels" if "isa" in d else ""
    threads = f"{d['threads']} thread" + ("s" if d["threads"] > 1 else "")
    lines = [f"### Sparse generator profile, {size}x{size}: {d['cpu']} ({d['cores']} cores{isa}), {d['date']}, "
             f"{threads}, load average {la[0]:.2f} (bench/sparse_profile.py)"
             + (" - quick smoke run" if quick else "") + "\n",
             f"torch {d['torch']}, allocator: {d['allocator']}. OES network (seed 0), published pepper mask (density 0.05) on fresh weights, "
             f"batch statistics. Floors from a peak of {peak / 1e9:.1f} GFLOP/s (oneDNN dense conv 128->128 3x3 "
             f"64x64, {threads}) and a bandwidth of {bw / 1e9:.1f} GB/s (torch copy of 256 MiB, read + write), both "
             f"timed inside the rounds next to the rows, medians of {len(d['floor_samples_s'][PEAK_CALL])} samples "
             f"(same contention as the rows). Measured alone at start and end: "
             f"{', '.join(f'{x / 1e9:.1f}' for x in d['peaks_measured'])} GFLOP/s (median of 20 convs), "
             f"{', '.join(f'{x / 1e9:.1f}' for x in d['bandwidths_measured'])} GB/s. "
             + cache_bandwidth_note(d) + f"{d['repeats']} rounds, each "
             f"timing every run once in a shuffled order; medians. 1-minute load average "
             f"{' / '.join(f'{x:.2f}' for x in la)} (start / before rounds / after rounds / end; this job "
             f"counts for about 1 of it on {d.get('cpus', '?')} cores): "
             + ("other jobs shared the cores, so absolute times are inflated; read ratios.\n"
                if min(la) > 1.5 else "little else ran beside it.\n"),
             "#### Whole networks\n",
             "| run | median ms | time / sparse time (median of per-round ratios) | minor page faults (one call) |",
             "|---|---:|---:|---:|"]
    for k, v in W.items():
        lines.append(f"| {k} | {ms(v['median_s'])} | {v['ratio_to_sparse']:.2f}x | {v['minor_page_faults']} |")
    it = d["instrumented_totals"]
    fwd_rows = [r for r in d["rows"] if r["section"] == "forward"]
    step_rows = [r for r in d["rows"] if r["section"] == "step"]
    iso_rows = [r for r in d["rows"] if r["section"] == "isolated"]
    s_f, s_s = sum(r["time_s"] for r in fwd_rows), sum(r["time_s"] for r in step_rows)
    f_ref, s_ref = W["sparse forward"]["median_s"], W["sparse step"]["median_s"]
    lines += ["", f"Coverage: per round, the rows of the instrumented forward add up to a median of "
              f"{ms(med(it['forward']))} ms against {ms(f_ref)} ms for the uninstrumented forward "
              f"({100 * med(it['forward']) / f_ref:.0f} %), those of the instrumented step to {ms(med(it['step']))} ms "
              f"against {ms(s_ref)} ms ({100 * med(it['step']) / s_ref:.0f} %). The sums of the per-row medians below "
              f"are lower, {ms(s_f)} ms ({100 * s_f / f_ref:.0f} %) and {ms(s_s)} ms ({100 * s_s / s_ref:.0f} %): "
              "on the loaded machine each row's slow rounds fall on different rounds. The uninstrumented forward "
              "runs as SparseGenerator.forward does without autograd, its stages in one C++ call "
              "(oes_fast._C.GeneratorForward); the instrumented one runs them from Python (run_stage), whose loop "
              "and calls the rows also hold. Not covered by any row: the "
              "Python loop between stages and check_input; in the step, each stage's backward row also holds the "
              "autograd bookkeeping and the small graph of the folded constants that the engine runs in between, "
              "and a freed tensor's release is charged to the stage during which its last reference goes.\n"]
    fwd_phases, step_phases = summarize(fwd_rows, peak, bw), summarize(step_rows, peak, bw)
    lines += [floors_line(fwd_phases, step_phases, f_ref, s_ref, peak, bw)]
    for title, phases in (("Forward without autograd (inference path: fused BN statistics, batch norm and activation in one op, the last one with the 1x1 output conv)", fwd_phases),
                          ("Training step (zero_grad, forward with autograd, MSE, backward, Adam lr 0.01)", step_phases)):
        lines += [f"#### {title}: by phase\n"]
        lines += table(phases, ["phase", "n"])
        lines.append("")
    # per conv layer
    lines += ["#### Per sparse conv layer (isolated ops on the layer's captured input and output gradient)\n",
              "ms and time / max(floors) per op; fwd = sparse_conv2d, +stats = sparse_conv2d_stats (the statistics "
              "epilogue's cost is the difference), dgrad = sparse_conv2d_input_grad (upsampling folded back in "
              "the op), wgrad = sparse_conv2d_weight_grad (upsampling read in its input load); GFLOP/s of fwd "
              "(FLOPs of the conv as the network defines it: the phase forms of the upsampled and the pooled "
              "convs execute fewer). Layers marked + pool run with the pooling after them "
              "(SparseGenerator.fuses_pool): fwd = +stats = sparse_conv2d_pool_stats, wgrad = "
              "sparse_conv2d_pool_weight_grad, dgrad = sparse_conv2d_pool_input_grad.\n",
              "| layer | in->out | k | out px | nnz | density | fwd ms | fwd x | fwd GFLOP/s | +stats ms | dgrad ms | dgrad x | "
              "wgrad ms | wgrad x | bias grad ms |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["stage"], r["phase"]): r for r in iso_rows}
    for c in d["conv_layers"]:
        i = c["stage"]
        name = c["name"]
        if (i, "sparse_conv2d_pool_stats") in by:  # run with the pooling after it
            f = fs = by[i, "sparse_conv2d_pool_stats"]
            name += " (+ pool)"
        elif (i, "sparse_conv2d") in by:
            f, fs = by[i, "sparse_conv2d"], by[i, "sparse_conv2d_stats"]
        else:
            continue
        dg, wg = by.get((i, "input_grad")), by[i, "weight_grad"]
        bg = by.get((i, "bias grad (channel sum)"))
        dg_s = "-" if dg is None else ms(dg["time_s"])
        dg_x = "-" if dg is None else f"{dg['over_floor']:.1f}"
        wg_s = ms(wg["time_s"])
        bg_s = "-" if bg is None else ms(bg["time_s"])
        lines.append(
            f"| {name} | {c['n_in']}->{c['n_out']} | {c['kernel'][0]} | {c['out_hw'][0]}x{c['out_hw'][1]} | {c['nnz']} | "
            f"{c['density']:.2f} | {ms(f['time_s'])} | {f['over_floor']:.1f} | {f['flops'] / f['time_s'] / 1e9:.1f} | "
            f"{ms(fs['time_s'])} | {dg_s} | {dg_x} | {wg_s} | {wg['over_floor']:.1f} | {bg_s} |")
    tot = {ph: sum(r["time_s"] for r in iso_rows if r["phase"] == ph) for ph in
           ("sparse_conv2d", "sparse_conv2d_stats", "sparse_conv2d_pool_stats", "input_grad", "weight_grad",
            "bias grad (channel sum)")
           if any(r["phase"] == ph for r in iso_rows)}
    conv_bwd_ctx = sum(r["time_s"] for r in step_rows if r["phase"] == "bwd" and isinstance(r["stage"], int)
                       and isinstance(r["layer"], str) and ".conv" in r["layer"])
    iso_bwd = sum(tot.get(k, 0.0) for k in ("input_grad", "weight_grad", "bias grad (channel sum)"))
    lines += ["", "Totals of the isolated ops: " + ", ".join(f"{k} {ms(v)} ms" for k, v in tot.items()) +
              f". The sparse convs' backward rows in the step (in context) sum to {ms(conv_bwd_ctx)} ms against "
              f"{ms(iso_bwd)} ms for their isolated pieces.\n"]
    # biggest sinks
    sinks = sorted((r for r in fwd_rows + step_rows), key=lambda r: -(r["time_s"] - max(r["flop_floor_s"], r["byte_floor_s"])))
    lines += ["#### Largest time above the floor (rows of the forward and the step, in context)\n",
              "| section | layer | phase | ms | max floor ms | time / max(floors) | ms above floor |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in sinks[:15]:
        fl = max(r["flop_floor_s"], r["byte_floor_s"])
        lines.append(f"| {r['section']} | {r['layer']} | {r['phase']} | {ms(r['time_s'])} | {ms(fl)} | {ratio(r['over_floor'])} | "
                     f"{ms(r['time_s'] - fl)} |")
    # full rows
    lines += ["", "<details><summary>Every row (forward, step, isolated ops)</summary>\n"]
    lines += table(d["rows"], ["section", "layer", "phase"], share=False)
    lines += ["", "</details>", ""]
    return "\n".join(lines) + "\n"


def scaling(sizes: list[int], repeats: int) -> dict:
    """Instrumented step and isolated ops at every size of `sizes`, in the same shuffled rounds."""
    setups, steps = {}, {}
    for size in sizes:
        p = problem(size)
        gen = SparseGenerator.from_masked(p["model"], p["mask"])
        opt = adam(gen.parameters(), 0.01)
        setups[size] = (gen, opt, p["z"], p["target"])
        steps[size] = (lambda g=gen, o=opt, z=p["z"], t=p["target"]: step_timed(g, o, z, t))
    load = [os.getloadavg()[0]]
    res = rounds_shuffled(steps, repeats)
    load.append(os.getloadavg()[0])
    fns, labels = {}, None
    for size, (gen, opt, z, target) in setups.items():
        labels = stage_labels(gen)
        capture = capture_unfused(gen, opt, z, target)
        f, _ = isolated_conv_ops(gen, capture)
        fns.update({(size, *k): v for k, v in f.items()})
        del capture
    iso = rounds_shuffled({k: timed(f) for k, f in fns.items()}, repeats)
    load.append(os.getloadavg()[0])
    out = dict(sizes=sizes, repeats=repeats, load_average_1min=load, step={}, isolated={})
    for size in sizes:
        rounds = res[size]
        fused, prologues, pairs = fused_activation_stages(rounds[0]), prologue_stages(rounds[0]), pair_stages(rounds[0])
        out["step"][size] = dict(
            total_s=[sum(r.values()) for r in rounds],
            rows=[dict(stage=k[0], layer=k[0] if isinstance(k[0], str) else labels[k[0]], phase=k[1],
                       kind=k[0] if isinstance(k[0], str) else step_kind(setups[size][0], k[0], fused, set(),
                                                                          prologues, pairs),
                       time_s=med([r[k] for r in rounds])) for k in rounds[0]])
        out["isolated"][size] = [dict(stage=k[1], layer=labels[k[1]], phase=k[2], time_s=med(v), samples_s=v)
                                 for k, v in iso.items() if k[0] == size]
    return out


def render_scaling(sc: dict) -> str:
    sizes = sc["sizes"]
    base = sizes[0]
    rel = lambda t, t0, s: (t / t0) / (s * s / (base * base))  # noqa: E731
    lines = [f"#### Cost per pixel against size (--scaling; {sc['repeats']} rounds, all sizes in the same shuffled rounds, "
             f"load average {' / '.join(f'{x:.2f}' for x in sc['load_average_1min'])})\n",
             f"Time per pixel at each size over that at {base}x{base} (1.00: linear in pixels), per phase of the "
             f"instrumented step and per isolated op summed over the sparse convs.\n",
             "| phase | " + " | ".join(f"ms at {s}" for s in sizes) + " | " +
             " | ".join(f"per pixel {s} / {base}" for s in sizes[1:]) + " |",
             "|---|" + "---:|" * (2 * len(sizes) - 1)]
    agg = {}
    for s in sizes:
        for r in sc["step"][s]["rows"]:
            a = agg.setdefault(phase_of(dict(r, section="step")), {})
            a[s] = a.get(s, 0.0) + r["time_s"]
        for r in sc["isolated"][s]:
            a = agg.setdefault(f"isolated {r['phase']}", {})
            a[s] = a.get(s, 0.0) + r["time_s"]
    tot = {s: med(sc["step"][s]["total_s"]) for s in sizes}
    # (a phase runs at some sizes only where a layer changes form with the size: the generator
    # fuses a conv with the pooling after it from an input 32 wide; - where it does not run)
    order = sorted(agg, key=lambda k: (k.startswith("isolated"), -agg[k].get(sizes[-1], 0.0)))
    for name in ["whole step (median of per-round sums)"] + order:
        v = tot if name.startswith("whole") else agg[name]
        lines.append(f"| {name} | " + " | ".join(ms(v[s]) if s in v else "-" for s in sizes) + " | " +
                     " | ".join(f"{rel(v[s], v[base], s):.2f}" if s in v and v.get(base, 0) > 0 else "-"
                                for s in sizes[1:]) + " |")
    # per conv layer, isolated
    lines += ["", "Per sparse conv, isolated ops, time per pixel at the largest size over that at the smallest "
              "(- where the layer does not run that op at both sizes: a down block's first conv runs with its "
              "pooling from an input 32 wide, SparseGenerator.fuses_pool):\n",
              "| layer | " + " | ".join(ph for ph in ISO_PHASES) + " |", "|---|" + "---:|" * len(ISO_PHASES)]
    big = sizes[-1]
    t0 = {(r["layer"], r["phase"]): r["time_s"] for r in sc["isolated"][base]}
    t1 = {(r["layer"], r["phase"]): r["time_s"] for r in sc["isolated"][big]}
    for layer in dict.fromkeys(r["layer"] for r in sc["isolated"][base]):
        cells = [f"{rel(t1[layer, ph], t0[layer, ph], big):.2f}" if (layer, ph) in t0 and (layer, ph) in t1 else "-"
                 for ph in ISO_PHASES]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines) + "\n"


ISO_PHASES = ("sparse_conv2d", "sparse_conv2d_stats", "sparse_conv2d_pool_stats", "input_grad", "weight_grad")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, help="square image side (default 512, 256 with --quick)")
    parser.add_argument("--repeats", type=int, help="rounds (default 9, 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fast smoke run: 256x256, 2 rounds")
    parser.add_argument("--allocator", choices=("kept", "default"), default="kept",
                        help="kept: glibc keeps freed memory (as the oes-fast command runs); default: glibc's own")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every timing, the peak and the bandwidth included (default 1)")
    parser.add_argument("--scaling", help="also compare the time per pixel at these sides, e.g. 1024,2048")
    parser.add_argument("--scaling-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "REPORT.md", help="markdown file (section replaced)")
    parser.add_argument("--json", type=Path, default=HERE / "sparse_profile.json")
    parser.add_argument("--from-json", type=Path, help="render a saved --json file again, measuring nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        d = json.loads(args.from_json.read_text())
        sc = d.get("scaling")
        if sc:  # JSON turned the per-size keys into strings
            sc["step"], sc["isolated"] = ({int(k): v for k, v in sc[part].items()} for part in ("step", "isolated"))
        return _write(args.out, d, render(d, d["quick"]), sc)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    size = args.size or (256 if args.quick else 512)
    repeats = args.repeats or (2 if args.quick else 9)
    kept = False
    if args.allocator == "kept":
        from oes_fast.allocator import keep_freed_memory

        kept = keep_freed_memory()
    d = run(size, repeats, args.threads)
    d["quick"] = args.quick
    d["cpus"] = os.cpu_count()
    d["allocator"] = ("glibc keeps freed memory (keep_freed_memory)" if kept else
                      "glibc default" + (" (keep_freed_memory refused)" if args.allocator == "kept" else ""))
    body = render(d, args.quick)
    if args.scaling:
        d["scaling"] = scaling([size] + [int(x) for x in args.scaling.split(",")], args.scaling_repeats)
    args.json.write_text(json.dumps(d, indent=1, default=str) + "\n")
    return _write(args.out, d, body, d.get("scaling"))


def _write(out: Path, d: dict, body: str, sc: dict | None) -> int:
    """The section (with the scaling table when there is one) into `out`, and printed."""
    if sc:
        marker = "#### Largest time above the floor"
        body = body.replace(marker, render_scaling(sc) + "\n" + marker)
    print(body)
    from gpu_suite import write_section

    write_section(out, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
