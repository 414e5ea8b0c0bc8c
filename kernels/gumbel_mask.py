"""Triton kernels for the Gumbel (logistic-noise) mask and their Python launchers.

Same ops and random stream as the C++ kernels in csrc/ (see csrc/philox.h): element j of a
tensor uses tl.rand(seed, offset + j), i.e. Philox4x32-10 with key (seed lo, seed hi) and
counter (offset lo, offset hi, 0, 0), offsets as int64 so 64-bit offsets work.

    forward:  out = w * m,   m = sigmoid((p + log(u) - log(1 - u)) / tau)
              (and, for the search step, the slope w * m * (1 - m) / tau)
    backward: grad_p = g * w * m * (1 - m) / tau,   grad_w = g * m   (noise regenerated)

m * (1 - m) is evaluated as (e * m) * m with e = exp(-x), as the CPU kernels do (see
_sigmoid_and_complement): 1 - m itself would cancel where m is nearly 1.

float32 and bfloat16 compute in float32, float64 in float64 (u is always the float32 uniform
of the contract, clamped, then widened). Works on CUDA tensors, and on CPU tensors when
TRITON_INTERPRET=1 was set before triton was imported.
"""
import contextlib
import operator
import struct

import torch
import triton
import triton.language as tl

__all__ = ["philox_uniform", "gumbel_mask_forward", "gumbel_mask_with_slope", "gumbel_mask_backward"]

# 1024 elements per program with 4 warps = 8 elements per thread: enough independent Philox
# chains per thread to hide the latency of its 10 mul-hi rounds, loads still vectorize to
# 128 bits, and a flat grid of cdiv(n, 1024) programs fills every SM for the tensor sizes
# this package sees (>= ~1e5 elements).
BLOCK = 1024
NUM_WARPS = 4

# Uniforms are clamped to [2^-24, 1 - 2^-24] before the logs (kUniformMin/kUniformMax in
# csrc/philox.h); both ends are exact in float32.
U_MIN: tl.constexpr = tl.constexpr(5.9604644775390625e-08)
U_MAX: tl.constexpr = tl.constexpr(0.99999994039535522)

_INT64_MAX = 2**63 - 1
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@triton.jit
def _logistic_noise(seed, offs, COMPUTE: tl.constexpr):
    """log(u) - log(1 - u) in COMPUTE for int64 offsets; u is the clamped float32 uniform."""
    u = tl.rand(seed, offs)
    u = tl.minimum(tl.maximum(u, U_MIN), U_MAX).to(COMPUTE)
    return tl.log(u) - tl.log(1.0 - u)


@triton.jit
def _sigmoid_and_complement(x, COMPUTE: tl.constexpr):
    """(m, 1 - m) for m = sigmoid(x), as the CPU kernels (csrc/cpu/elementwise.h:
    sigmoid_and_complement): e = exp(min(-x, cap)), m = 1 / (1 + e), 1 - m = e * m; where m is
    nearly 1, 1 - m computed as such would cancel to a few bits (about 20 % off in float32 at
    x = 15). The cap (80 in float32, 700 in float64) keeps exp finite, so e * m is never
    inf * 0 = NaN; below x = -cap, m stays 1 / (1 + e^cap) (1.8e-35 in float32, 1e-304 in
    float64) instead of going to 0, as on the CPU. Written as the CPU's
    `neg_x < cap ? neg_x : cap` (a NaN x gives the cap, as there)."""
    if COMPUTE == tl.float64:
        cap = 700.0
    else:
        cap = 80.0
    neg_x = -x
    e = tl.exp(tl.where(neg_x < cap, neg_x, cap))
    m = 1.0 / (1.0 + e)
    return m, e * m


@triton.jit
def _sigmoid_and_slope(x, COMPUTE: tl.constexpr):
    """(m, m * (1 - m)), the derivative of m = sigmoid(x), with 1 - m from _sigmoid_and_complement."""
    m, not_m = _sigmoid_and_complement(x, COMPUTE)
    return m, not_m * m


@triton.jit
def _f64(bits, COMPUTE: tl.constexpr):
    # A double passed as the int64 of its bit pattern (_as_f64_bits): Triton passes Python floats
    # as fp32, which would round them for the float64 path. Rounded to COMPUTE here (float32
    # for float32/bf16, as the C++ kernels do).
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)


@triton.jit
def _store(ptr, idx, x, mask, BF16_BY_HAND: tl.constexpr):
    """Stores float32/float64 x into ptr's dtype, rounding to nearest even."""
    if BF16_BY_HAND:
        # Triton's interpreter truncates float32 -> bfloat16 (compiled Triton and the C++
        # kernels round to nearest even), so under it the rounding is done on the bits.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        y = tl.where(x != x, x.to(tl.bfloat16), y)  # keep nan a nan
    else:
        y = x.to(ptr.dtype.element_ty)
    tl.store(ptr + idx, y, mask=mask)


@triton.jit
def _base_offset(offset, offset_ptr, OFFSET_FROM_PTR: tl.constexpr):
    """The launch's stream offset: the int argument, or read on the device from offset_ptr, so
    that a launch captured in a CUDA graph replays with each step's offset."""
    base = offset.to(tl.int64)
    if OFFSET_FROM_PTR:
        base = tl.load(offset_ptr).to(tl.int64)
    return base


@triton.jit(do_not_specialize=["seed", "offset"])
def _philox_uniform_kernel(out_ptr, n, seed: tl.int64, offset: tl.int64, BLOCK: tl.constexpr):
    # 64-bit flat index: tensors past 2^31 elements and offsets past 2^32 stay exact.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    u = tl.rand(seed, idx + offset.to(tl.int64))  # unclamped, as the op promises
    tl.store(out_ptr + idx, u, mask=mask)


@triton.jit(do_not_specialize=["seed", "offset", "tau_bits"])
def _gumbel_mask_fwd_kernel(p_ptr, w_ptr, out_ptr, slope_ptr, n, seed: tl.int64, offset: tl.int64, offset_ptr,
                            tau_bits: tl.int64, WITH_SLOPE: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr,
                            COMPUTE: tl.constexpr, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    p = tl.load(p_ptr + idx, mask=mask).to(COMPUTE)
    w = tl.load(w_ptr + idx, mask=mask).to(COMPUTE)
    noise = _logistic_noise(seed, idx + _base_offset(offset, offset_ptr, OFFSET_FROM_PTR), COMPUTE)
    tau = _f64(tau_bits, COMPUTE)
    # Same expression order as the CPU kernel: 1 / (1 + exp(min(-((p + noise) / tau), cap))).
    m, m_slope = _sigmoid_and_slope((p + noise) / tau, COMPUTE)
    _store(out_ptr, idx, w * m, mask, BF16_BY_HAND)
    if WITH_SLOPE:  # d out / d p = w * m * (1 - m) / tau, as the backward's factor
        _store(slope_ptr, idx, w * m_slope / tau, mask, BF16_BY_HAND)


@triton.jit(do_not_specialize=["seed", "offset", "tau_bits"])
def _gumbel_mask_bwd_kernel(g_ptr, p_ptr, w_ptr, gp_ptr, gw_ptr, n, seed: tl.int64, offset: tl.int64, offset_ptr,
                            tau_bits: tl.int64, WEIGHT_GRAD: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr,
                            COMPUTE: tl.constexpr, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    g = tl.load(g_ptr + idx, mask=mask).to(COMPUTE)
    p = tl.load(p_ptr + idx, mask=mask).to(COMPUTE)
    w = tl.load(w_ptr + idx, mask=mask).to(COMPUTE)
    # The noise is regenerated from (seed, offset), never stored by the forward.
    noise = _logistic_noise(seed, idx + _base_offset(offset, offset_ptr, OFFSET_FROM_PTR), COMPUTE)
    tau = _f64(tau_bits, COMPUTE)
    m, m_slope = _sigmoid_and_slope((p + noise) / tau, COMPUTE)
    # d/dp [w * sigmoid((p + L) / tau)] = w * m * (1 - m) / tau, m * (1 - m) evaluated as (e * m) * m
    gp = g * w * m_slope / tau
    _store(gp_ptr, idx, gp, mask, BF16_BY_HAND)
    if WEIGHT_GRAD:
        _store(gw_ptr, idx, g * m, mask, BF16_BY_HAND)


# ----------------------------------------------------------------------------- launchers


def _as_int(op, name, value):
    # operator.index: ints and integer scalars (numpy, 0-d integer tensors), not floats or bools.
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}") from None


def _check_seed_offset(op, seed, offset, numel):
    """(seed, offset) checked; `offset` may also be a 0-d int64 tensor, which the kernel reads on
    the device (see _launch_offset): its value is the caller's to keep in range."""
    seed = _as_int(op, "seed", seed)
    if not 0 <= seed <= _INT64_MAX:
        raise ValueError(f"{op}: seed must be non-negative and fit in int64, got {seed}")
    if isinstance(offset, torch.Tensor):
        if not (offset.dim() == 0 and offset.dtype == torch.int64):
            raise ValueError(f"{op}: an offset tensor must be a 0-d int64 tensor, got {offset.dtype} "
                             f"{tuple(offset.shape)}")
        return seed, offset
    offset = _as_int(op, "offset", offset)
    if not (offset >= 0 and offset <= _INT64_MAX - numel):
        raise ValueError(f"{op}: offset must be non-negative and offset + numel must fit in int64, got {offset}")
    return seed, offset


# Whether @triton.jit made interpreter functions, which it does when TRITON_INTERPRET=1 was
# set before this module was imported; only then can the kernels run on CPU tensors.
INTERPRETED = not isinstance(_philox_uniform_kernel, triton.runtime.JITFunction)


def _check_device(op, t):
    if t.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {t.device}")


def _check_inputs(logits, weight, seed, offset, tau):
    """The op's checks (oes_fast.op_checks.check_gumbel_mask_inputs, mirroring csrc/ops.cpp), then
    the launch's own: a device Triton can run on, offsets in int64. Returns (seed, offset, tau)."""
    from oes_fast.op_checks import check_gumbel_mask_inputs

    for name, t in (("logits", logits), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gumbel_mask: {name} must be a Tensor, got {type(t).__name__}")
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise TypeError(f"gumbel_mask: tau must be a float, got {type(tau).__name__}") from None
    check_gumbel_mask_inputs(logits, weight, seed, 0 if isinstance(offset, torch.Tensor) else offset, tau)
    _check_device("gumbel_mask", logits)
    seed, offset = _check_seed_offset("gumbel_mask", seed, offset, logits.numel())
    return seed, offset, tau


def _launch_offset(op, offset, like):
    """(offset, offset_ptr, OFFSET_FROM_PTR) for a launch: an int as it is (offset_ptr is never
    read; `like` stands in), or a 0-d int64 tensor on `like`'s device for the kernel to read."""
    if not isinstance(offset, torch.Tensor):
        return offset, like, False
    if offset.device != like.device:
        raise ValueError(f"{op}: the offset tensor must be on {like.device}, got {offset.device}")
    return 0, offset, True


def _compute_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _bf16_by_hand(dtype):
    return INTERPRETED and dtype == torch.bfloat16


def _as_f64_bits(x):
    # Bit pattern of the double as an int64; see _f64().
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _on_device(t):
    # Triton launches on the current CUDA device and stream: make that the tensor's device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


def philox_uniform(like: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """float32 uniforms shaped like `like` on its device: element j = u(seed, offset + j), unclamped."""
    if not isinstance(like, torch.Tensor):
        raise TypeError(f"philox_uniform: like must be a Tensor, got {type(like).__name__}")
    _check_device("philox_uniform", like)
    seed, offset = _check_seed_offset("philox_uniform", seed, offset, like.numel())
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    n = out.numel()
    if n == 0:
        return out
    with _on_device(like):
        _philox_uniform_kernel[_grid(n)](out, n, seed, offset, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def gumbel_mask_forward(logits: torch.Tensor, weight: torch.Tensor, seed: int, offset: int, tau: float) -> torch.Tensor:
    """weight * sigmoid((logits + log(u) - log(1 - u)) / tau); same dtype and shape as logits, contiguous."""
    return _forward(logits, weight, seed, offset, tau, with_slope=False)[0]


def gumbel_mask_with_slope(logits: torch.Tensor, weight: torch.Tensor, seed: int, offset: int,
                           tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gumbel_mask_forward(...), its derivative in the logits weight * m * (1 - m) / tau).
    Here and in the other launchers `offset` may be a 0-d int64 tensor on the logits' device,
    read by the kernel (CUDA graphs)."""
    return _forward(logits, weight, seed, offset, tau, with_slope=True)


def _forward(logits, weight, seed, offset, tau, with_slope):
    seed, offset, tau = _check_inputs(logits, weight, seed, offset, tau)
    p, w = logits.contiguous(), weight.contiguous()
    out = torch.empty_like(p, memory_format=torch.contiguous_format)
    slope = torch.empty_like(p, memory_format=torch.contiguous_format) if with_slope else None
    n = p.numel()
    if n == 0:
        return out, slope
    offset, offset_ptr, from_ptr = _launch_offset("gumbel_mask", offset, p)
    with _on_device(p):
        # without the slope the kernel never touches slope_ptr; out stands in for it
        _gumbel_mask_fwd_kernel[_grid(n)](p, w, out, slope if with_slope else out, n, seed, offset, offset_ptr,
                                          _as_f64_bits(tau), WITH_SLOPE=with_slope, OFFSET_FROM_PTR=from_ptr,
                                          COMPUTE=_compute_dtype(p.dtype), BF16_BY_HAND=_bf16_by_hand(p.dtype),
                                          BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, slope


def gumbel_mask_backward(grad: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, seed: int, offset: int,
                         tau: float, weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_logits, grad_weight); grad_weight is an empty [0] tensor unless weight_grad."""
    seed, offset, tau = _check_inputs(logits, weight, seed, offset, tau)
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"gumbel_mask_backward: grad must be a Tensor, got {type(grad).__name__}")
    if grad.shape != logits.shape or grad.dtype != logits.dtype:
        raise ValueError("gumbel_mask_backward: grad must match logits in shape and dtype, got "
                         f"{tuple(grad.shape)} {grad.dtype} and {tuple(logits.shape)} {logits.dtype}")
    if grad.device != logits.device:
        raise ValueError(f"gumbel_mask_backward: grad must be on the device of logits, got {grad.device} "
                         f"and {logits.device}")
    g, p, w = grad.contiguous(), logits.contiguous(), weight.contiguous()
    grad_logits = torch.empty_like(p, memory_format=torch.contiguous_format)
    if weight_grad:
        grad_weight = torch.empty_like(w, memory_format=torch.contiguous_format)
    else:
        grad_weight = torch.empty((0,), dtype=p.dtype, device=p.device)
    n = p.numel()
    if n == 0:
        return grad_logits, grad_weight
    offset, offset_ptr, from_ptr = _launch_offset("gumbel_mask_backward", offset, p)
    with _on_device(p):
        # Without weight_grad the kernel never touches gw_ptr; grad_logits stands in for it.
        _gumbel_mask_bwd_kernel[_grid(n)](g, p, w, grad_logits, grad_weight if weight_grad else grad_logits, n,
                                          seed, offset, offset_ptr, _as_f64_bits(tau), WEIGHT_GRAD=bool(weight_grad),
                                          OFFSET_FROM_PTR=from_ptr, COMPUTE=_compute_dtype(p.dtype),
                                          BF16_BY_HAND=_bf16_by_hand(p.dtype), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad_logits, grad_weight
