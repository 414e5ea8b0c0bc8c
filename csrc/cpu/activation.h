// The batch norm's apply and LeakyReLU, leaky_relu(x * scale + shift), as the CPU kernels compute
// it: in float64 (the pre-activation would cancel in float32 where |mean| >> std), rounded once
// to the stored dtype. Shared by the batch-norm kernels (batch_norm_leaky_relu and its head) and
// the sparse convs' input prologue (sparse_conv2d_act_*), so that an activation made inside a
// conv's input load has the bits batch_norm_leaky_relu would have stored.
// Per-ISA like vectors.h (which a kernels file includes first): no include guard, no includes,
// everything in the copy's namespace with internal linkage.
#ifndef OES_FAST_ISA_NS
#error "activation.h is included by a kernels file inside per_isa.h"
#endif

namespace oes_fast {
namespace OES_FAST_ISA_NS {
namespace {

// float64 vectors of the copy's register width, and kF64Lanes values of scalar_t (F64Narrow)
using F64Vec = vec_t<double>;
constexpr int64_t kF64Lanes = kLanes<double>;
template <typename scalar_t>
struct F64NarrowOf;
template <>
struct F64NarrowOf<float> {
  using type = float __attribute__((vector_size(kF64Lanes * 4)));
};
template <>
struct F64NarrowOf<double> {
  using type = F64Vec;
};
template <typename scalar_t>
using F64Narrow = typename F64NarrowOf<scalar_t>::type;

inline F64Vec load_f64(const double* p) {
  F64Vec v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store_f64(double* p, F64Vec v) { __builtin_memcpy(p, &v, sizeof v); }

// The one expression the forward and the backward evaluate, so that the backward's choice of
// slope is the forward's, bit for bit, without keeping the output.
inline double pre_activation(double x, double scale, double shift) { return x * scale + shift; }
// leaky_relu(pre_activation(x)), not rounded: the scalar loops' value (activation_lanes: in lanes)
inline double activation(double x, double scale, double shift, double slope) {
  const double pre = pre_activation(x, scale, shift);
  return pre > 0.0 ? pre : pre * slope;
}

// The first n (any count; none when n <= 0) lanes of v rounded to scalar_t at p.
template <typename scalar_t>
inline void store_rounded(scalar_t* p, F64Vec v, int64_t n) {
  if (n >= kF64Lanes) {
    const F64Narrow<scalar_t> rounded = __builtin_convertvector(v, F64Narrow<scalar_t>);
    __builtin_memcpy(p, &rounded, sizeof rounded);
  } else {
    for (int64_t l = 0; l < n; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }
}

// kF64Lanes floats as float64 lanes (exact). gcc 12 widens 8 floats to a 512-bit vector as two
// 4-lane conversions and an insert; the AVX-512 builtin is one vcvtps2pd.
inline F64Vec widen(F64Narrow<float> v) {
#if OES_FAST_VEC_BYTES == 64 && defined(__GNUC__) && !defined(__clang__)
  return __builtin_ia32_cvtps2pd512_mask(v, F64Vec{}, static_cast<unsigned char>(-1), 4 /* current rounding */);
#else
  return __builtin_convertvector(v, F64Vec);
#endif
}
inline F64Vec widen(F64Vec v) { return v; }  // (F64Narrow<double>)

// kF64Lanes values at p as float64 lanes
inline F64Vec load_as_double(const float* p) {
  F64Narrow<float> v;
  __builtin_memcpy(&v, p, sizeof v);
  return widen(v);
}
inline F64Vec load_as_double(const double* p) { return load_f64(p); }

// leaky_relu(x * scale + shift) of the kF64Lanes values at p, in float64 (not rounded): each
// lane as `activation` computes it
template <typename scalar_t>
inline F64Vec activation_lanes(const scalar_t* p, F64Vec scale, F64Vec shift, F64Vec slope) {
  const F64Vec pre = load_as_double(p) * scale + shift;
  return pre > 0.0 ? pre : pre * slope;
}

// y[i] = leaky_relu(x[i] * scale + shift) rounded to scalar_t, i < n. In explicit vectors: from
// the plain loop gcc made code that rounded both candidates to scalar_t and blended after, twice
// the conversions (batch_norm_leaky_relu on 28 channels of 128x128, AVX2, 1 thread: 0.234 ->
// 0.146 ms). The same operations on each value in lanes and in the tail: the same bits.
template <typename scalar_t>
inline void activate_row(const scalar_t* x, scalar_t* y, int64_t n, double scale, double shift, double slope) {
  const F64Vec vscale = F64Vec{} + scale, vshift = F64Vec{} + shift, vslope = F64Vec{} + slope;
  int64_t i = 0;
  for (; i + kF64Lanes <= n; i += kF64Lanes) store_rounded(y + i, activation_lanes(x + i, vscale, vshift, vslope), kF64Lanes);
  for (; i < n; ++i) y[i] = static_cast<scalar_t>(activation(static_cast<double>(x[i]), scale, shift, slope));
}

// activate_row(x, y, n, scale, shift, slope), then activate_row(y, y, n, scale2, shift2, 1.0) (a
// second batch norm's apply), in one pass: each stage rounded to scalar_t as there, the same bits.
template <typename scalar_t>
inline void activate_row_twice(const scalar_t* x, scalar_t* y, int64_t n, double scale, double shift, double slope,
                               double scale2, double shift2) {
  const F64Vec vscale = F64Vec{} + scale, vshift = F64Vec{} + shift, vslope = F64Vec{} + slope;
  const F64Vec vscale2 = F64Vec{} + scale2, vshift2 = F64Vec{} + shift2, one = F64Vec{} + 1.0;
  int64_t i = 0;
  for (; i + kF64Lanes <= n; i += kF64Lanes) {
    const F64Narrow<scalar_t> first = __builtin_convertvector(activation_lanes(x + i, vscale, vshift, vslope),
                                                              F64Narrow<scalar_t>);
    const F64Vec pre = widen(first) * vscale2 + vshift2;
    store_rounded(y + i, pre > 0.0 ? pre : pre * one, kF64Lanes);
  }
  for (; i < n; ++i) {
    const scalar_t first = static_cast<scalar_t>(activation(static_cast<double>(x[i]), scale, shift, slope));
    y[i] = static_cast<scalar_t>(activation(static_cast<double>(first), scale2, shift2, 1.0));
  }
}

}  // namespace
}  // namespace OES_FAST_ISA_NS
}  // namespace oes_fast
