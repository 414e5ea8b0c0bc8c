"""Per-dtype tolerances of the package's tests, in one table, and the comparison rule.

The rule (flash-attention's, engineering.md): compute the reference in float64 (`ref64`) and
the same reference in the low dtype under test (`ref_lowp`); the fast path's error against
`ref64` must stay within `factor` times the error of `ref_lowp` against `ref64`, plus a small
`floor`. The floor covers cases where the low-precision reference happens to be exact (one
element, float64 where `ref_lowp` IS the float64 reference). It is relative to the values:
`floor` times the largest |ref64|, so it is about one unit of the dtype's epsilon at the scale
of the output, whatever that scale is (Adam's second moments are of order 1e-7: an absolute
floor of 2e-7 would let a zeroed `exp_avg_sq` pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    factor: float  # allowed multiple of the low-precision reference's error
    floor: float  # error always allowed, relative to the largest |value| of the reference


# The one table. float64: the fast path and the reference differ only by the order of
# rounded operations (a few ulps of values of order one), hence a tiny floor. float32 and
# bfloat16: about one unit of the dtype's epsilon as floor.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(factor=2.0, floor=1e-12),
    torch.float32: Tolerance(factor=2.0, floor=2e-7),
    torch.float16: Tolerance(factor=2.0, floor=1e-3),
    torch.bfloat16: Tolerance(factor=2.0, floor=8e-3),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise KeyError(f"no tolerance for {dtype}; add it to tests/tolerances.py:TOLERANCES") from None


def max_abs_error(x: torch.Tensor, ref64: torch.Tensor) -> float:
    """Largest |x - ref64| in float64; NaN where exactly one of them is NaN counts as infinite."""
    diff = (x.detach().to(torch.float64).cpu() - ref64.detach().to(torch.float64).cpu()).abs()
    both_nan = torch.isnan(x.detach().cpu()) & torch.isnan(ref64.detach().cpu())
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None = None,
                              factor: float | None = None, floor: float | None = None, name: str = "output",
                              scale: float | None = None) -> None:
    """Assert max|out - ref64| <= factor * max|ref_lowp - ref64| + floor * scale.

    `ref_lowp` is the reference run in out's dtype; when omitted, ref64 rounded to out's dtype
    stands in for it (the best that dtype can do). `factor` and `floor` default to the table.
    `scale` defaults to max|ref64|; pass the size of the computation's values where the output
    can be structurally zero and the reference holds only rounding noise there (a gradient
    that vanishes exactly, compared among other gradients).
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref64.shape)}"
    assert ref64.dtype == torch.float64, f"{name}: the reference must be float64, got {ref64.dtype}"
    tol = tolerance(out.dtype)
    factor = tol.factor if factor is None else factor
    floor = tol.floor if floor is None else floor
    if ref_lowp is None:
        ref_lowp = ref64.to(out.dtype)
    assert ref_lowp.shape == ref64.shape, f"{name}: low-precision reference shape {tuple(ref_lowp.shape)}"
    err = max_abs_error(out, ref64)
    err_lowp = max_abs_error(ref_lowp, ref64)
    if scale is None:
        scale = float(ref64.detach().abs().max()) if ref64.numel() else 0.0
    bound = factor * err_lowp + floor * scale
    if not err <= bound:
        diff = (out.detach().double().cpu() - ref64.detach().cpu()).abs().nan_to_num(nan=float("inf")).reshape(-1)
        j = int(diff.argmax())
        raise AssertionError(
            f"{name} ({out.dtype}): max error vs float64 reference {err:.3e} exceeds {bound:.3e} "
            f"= {factor} x {err_lowp:.3e} (reference in {out.dtype}) + {floor:.1e} x {scale:.3g}; "
            f"worst flat index {j}: got {float(out.reshape(-1)[j]):.10g}, expected {float(ref64.reshape(-1)[j]):.17g}"
        )


def assert_channel_stats(stats: torch.Tensor, values: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """`stats` ((C, 2) float64: per channel the sum and the sum of squares, as the sparse convs'
    epilogue returns them) against those of `values` (N, C, H, W). The kernels add partial sums
    of blocks in `dtype`: the error scales with the sum of |terms|, not with the sum, which can
    cancel to near zero (a relative tolerance on the sum was flaky)."""
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    v = values.double()
    expected = torch.stack([v.sum((0, 2, 3)), (v**2).sum((0, 2, 3))], 1)
    size = torch.stack([v.abs().sum((0, 2, 3)), (v**2).sum((0, 2, 3))], 1)
    assert ((stats - expected).abs() <= rtol * size + 1e-9).all(), (name, stats, expected)
