// CPU kernels of batch_norm_stats, batch_norm_leaky_relu and batch_norm_leaky_relu_backward, one
// channel at a time, and of batch_norm_leaky_relu_conv1x1 and its backward, a chunk of pixels at
// a time (the ATen side, which splits the channels or chunks among threads, is
// batch_norm_leaky_relu.cpp). Channel c of image n is the contiguous plane at
// (n * C + c) * HW: a kernel walks the N planes of its channel with `image_stride` = C * HW.
// Everything is computed in float64 but the sums of the head's 1x1 conv on float32 inputs: the
// pre-activation x * scale + shift would cancel in float32 where |mean| >> std (the byte
// traffic, not the arithmetic, bounds these loops).
// Included once per instruction set by per_isa.h (from batch_norm_leaky_relu.cpp): no library
// includes, no include guard; everything in the copy's namespace with internal linkage.
#include "vectors.h"     // vec_t<T>, kLanes<T>
#include "activation.h"  // activation, activate_row, F64Vec, ...

namespace oes_fast {
namespace OES_FAST_ISA_NS {
namespace {

// The float64 lanes v rounded to scalar_t, as stored, and widened back (exact).
template <typename scalar_t>
inline F64Vec round_lanes(F64Vec v) {
  return widen(__builtin_convertvector(v, F64Narrow<scalar_t>));
}

// The (sum, sum of squares) of one plane's n values in float64: `lanes(i)` gives the kF64Lanes
// values from i, `one(i)` the value at i (past the last whole vector). kStatAcc interleaved
// accumulators of each sum (the last whole vectors into the first), added in one fixed tree at
// the end, then the lanes in order, then the tail. Each value passes a compiler barrier before it
// is summed: gcc, free to reassociate in this file (-ffast-math), would otherwise contract a
// computed value into the sums, or vectorize the tail for one caller and not the other, and the
// callers' bits would differ. With one accumulator of each, as gcc vectorized a plain loop, the
// sums waited on the adds' latency: batch_norm_stats of 19 planes of 256x256 took 85 us, now
// 55-60 us (Zen 5 EPYC, 1 thread). channel_stats and channel_act_stats both sum through this
// code, so the statistics of an activation made in the pass have the bits of batch_norm_stats on
// batch_norm_leaky_relu's stored output.
constexpr int kStatAcc = 4;
template <typename Lanes, typename One>
__attribute__((always_inline)) inline void plane_sums(int64_t n, Lanes&& lanes, One&& one, double* out) {
  F64Vec s[kStatAcc], q[kStatAcc];
  for (int k = 0; k < kStatAcc; ++k) s[k] = q[k] = F64Vec{};
  int64_t i = 0;
  for (; i + kStatAcc * kF64Lanes <= n; i += kStatAcc * kF64Lanes) {
    for (int k = 0; k < kStatAcc; ++k) {
      F64Vec v = lanes(i + k * kF64Lanes);
      in_order(v);
      s[k] += v;
      q[k] += v * v;
    }
  }
  for (; i + kF64Lanes <= n; i += kF64Lanes) {  // (whole vectors where activate_row makes vectors)
    F64Vec v = lanes(i);
    in_order(v);
    s[0] += v;
    q[0] += v * v;
  }
  const F64Vec S = (s[0] + s[1]) + (s[2] + s[3]), Q = (q[0] + q[1]) + (q[2] + q[3]);
  double sum = 0.0, sum_sq = 0.0;
  for (int64_t l = 0; l < kF64Lanes; ++l) {
    sum += S[l];
    sum_sq += Q[l];
  }
  for (; i < n; ++i) {
    double v = one(i);
    in_order(v);
    sum += v;
    sum_sq += v * v;
  }
  out[0] = sum;
  out[1] = sum_sq;
}
static_assert(kStatAcc == 4, "plane_sums adds four accumulators");

// (sum, sum of squares) of channel c into out[0], out[1]: each image's sums (plane_sums), added in
// image order.
template <typename scalar_t>
void channel_stats(const scalar_t* x, int64_t images, int64_t image_stride, int64_t hw, double* out) {
  double sum = 0.0, sum_sq = 0.0;
  for (int64_t n = 0; n < images; ++n) {
    const scalar_t* p = x + n * image_stride;
    double s[2];
    plane_sums(
        hw, [&](int64_t i) { return load_as_double(p + i); }, [&](int64_t i) { return static_cast<double>(p[i]); },
        s);
    sum += s[0];
    sum_sq += s[1];
  }
  out[0] = sum;
  out[1] = sum_sq;
}

// channel_stats of leaky_relu(x * scale + shift) as channel_forward stores it (rounded to
// scalar_t, each value as activate_row makes it), from x in one pass: that tensor is not written.
template <typename scalar_t>
void channel_act_stats(const scalar_t* x, int64_t images, int64_t image_stride, int64_t hw, double scale,
                       double shift, double slope, double* out) {
  const F64Vec vscale = F64Vec{} + scale, vshift = F64Vec{} + shift, vslope = F64Vec{} + slope;
  double sum = 0.0, sum_sq = 0.0;
  for (int64_t n = 0; n < images; ++n) {
    const scalar_t* p = x + n * image_stride;
    double s[2];
    plane_sums(
        hw,
        [&](int64_t i) { return round_lanes<scalar_t>(activation_lanes(p + i, vscale, vshift, vslope)); },
        [&](int64_t i) {
          return static_cast<double>(static_cast<scalar_t>(activation(static_cast<double>(p[i]), scale, shift, slope)));
        },
        s);
    sum += s[0];
    sum_sq += s[1];
  }
  out[0] = sum;
  out[1] = sum_sq;
}

// Pass 1: the sums of dt = grad * leaky'(pre) and of dt * (x - mean); pass 2: grad_x. Both
// passes walk the same channel, so on planes that fit in cache the second reads from it.
template <typename scalar_t>
void channel_backward(const scalar_t* grad, const scalar_t* x, scalar_t* grad_x, int64_t images, int64_t image_stride,
                      int64_t hw, const ChannelBackward& k, double* grad_weight, double* grad_bias) {
  const double mean = k.mean, scale = k.scale, shift = k.shift, slope = k.slope;
  double sum_dt = 0.0, sum_dt_xc = 0.0;
  for (int64_t n = 0; n < images; ++n) {
    const scalar_t* g = grad + n * image_stride;
    const scalar_t* p = x + n * image_stride;
    double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = 0; i < hw; ++i) {
      const double v = static_cast<double>(p[i]);
      const double dt = static_cast<double>(g[i]) * (pre_activation(v, scale, shift) > 0.0 ? 1.0 : slope);
      a += dt;
      b += dt * (v - mean);
    }
    sum_dt += a;
    sum_dt_xc += b;
  }
  *grad_bias = sum_dt;
  *grad_weight = sum_dt_xc * k.invstd;
  // grad_x = scale * (dt - mean(dt) - xhat * mean(dt * xhat)), xhat = (x - mean) * invstd,
  // as dt * scale + (x - mean) * xc_coef + constant
  const double count = static_cast<double>(images * hw);
  const double xc_coef = -scale * k.invstd * k.invstd * sum_dt_xc / count;
  const double constant = -scale * sum_dt / count;
  for (int64_t n = 0; n < images; ++n) {
    const scalar_t* g = grad + n * image_stride;
    const scalar_t* p = x + n * image_stride;
    scalar_t* out = grad_x + n * image_stride;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) {
      const double v = static_cast<double>(p[i]);
      const double dt = static_cast<double>(g[i]) * (pre_activation(v, scale, shift) > 0.0 ? 1.0 : slope);
      out[i] = static_cast<scalar_t>(dt * scale + (v - mean) * xc_coef + constant);
    }
  }
}

// The generator's head (batch_norm_leaky_relu_conv1x1) and its backward work on chunks of
// kHeadChunk pixels of one image in float64 vectors of kF64Lanes (channel_forward uses the
// vectors too).
constexpr int64_t kHeadAcc = 8;
constexpr int64_t kHeadChunk = 128;  // a multiple of kHeadAcc * kF64Lanes in every copy (<= 64)

// batch_norm_leaky_relu on channel c: y = leaky_relu(x * scale + shift) over its N planes.
template <typename scalar_t>
void channel_forward(const scalar_t* x, scalar_t* y, int64_t images, int64_t image_stride, int64_t hw, double scale,
                     double shift, double slope) {
  for (int64_t n = 0; n < images; ++n) activate_row(x + n * image_stride, y + n * image_stride, hw, scale, shift, slope);
}

// The next chunk of a plane (read, or about to be written: kWrite), into the cache: the hardware
// did not follow the C short runs of a chunk loop (16 channels at 512x512, 1 thread: head_chunk
// 2.7 -> 1.6 ms; the backward's input loads had been 70 % of its time). With locality 3
// (prefetcht0), not 0 (prefetchnta): on the Intel Xeon the non-temporal hint left the backward at
// 9.5 ms and the forward at 2.1 ms (isolated, 16 channels at 512x512, 1 thread), 5.2 and 1.3 ms
// with t0 (t1: 6.4 ms), the Sparse-DIP step 1.07x faster. always_inline: gcc 12 drops calls to a
// function whose only effect is a prefetch.
// `span`: the first span values of the next chunk only (a block's share of it).
template <int kWrite, typename scalar_t>
__attribute__((always_inline)) inline void prefetch_next_chunk(const scalar_t* p, int64_t span = kHeadChunk) {
  for (int64_t i = 0; i < span; i += 64 / int64_t(sizeof(scalar_t))) __builtin_prefetch(p + kHeadChunk + i, kWrite, 3);
}

// The head (batch_norm_leaky_relu_conv1x1): for `count` pixels of one image, whose channel c
// starts at x + c * plane, out[o] (likewise at out + o * plane) = bias[o] + sum_c weight[o][c] *
// act_c in channel order, act_c = leaky_relu(x_c * scale[c] + shift[c]) rounded to scalar_t as
// batch_norm_leaky_relu stores it (made in float64: see the top of this file). The sums run in
// vectors of scalar_t, as a float32 conv sums float32 inputs (the op on 16 float32 channels at
// 512x512, 1 thread: 3.8-5.2 ms with the sums in float64 and rounded once, 2.5-3.2 ms in
// float32). Activations made in float32 as well were faster still, but their rounding took the
// backward's conv weight gradient past the tests' bound (docs/performance.md, the fifth session
// on the Zen 3 machine). `act` holds h.C * kHeadChunk values of scalar_t; count <=
// kHeadChunk. The chunk's activations are made first; then the sums of kHeadAcc vectors
// of pixels stay in registers over the channel loop, kHeadAcc independent FMA chains (with the
// sums in memory, or one chain per vector as gcc arranged a plain loop, the op ran 3-4x slower
// than batch_norm_leaky_relu on the same input). Chunks of 64, 256, 512 and 1024 pixels were
// slower than 128.
template <typename scalar_t>
void head_chunk_staged(const scalar_t* x, scalar_t* out, int64_t plane, int64_t count, const Head& h, scalar_t* act) {
  using V = vec_t<scalar_t>;  // the sums' vectors
  constexpr int64_t L = kLanes<scalar_t>, block = kHeadAcc * L;  // block divides kHeadChunk
  const int64_t padded = (count + block - 1) / block * block;
  for (int64_t c = 0; c < h.C; ++c) {
    const scalar_t* p = x + c * plane;
    scalar_t* a = act + c * kHeadChunk;
    prefetch_next_chunk<0>(p);
    // in vectors, as channel_forward (the op on 16 channels of 512x512: 4.1 -> 3.2 ms)
    activate_row(p, a, count, h.scale[c], h.shift[c], h.slope);
    for (int64_t i = count; i < padded; ++i) a[i] = scalar_t(0);  // a last block's unused pixels
  }
  for (int64_t o = 0; o < h.O; ++o) {
    const double* w = h.weight + o * h.C;
    const V b = V{} + static_cast<scalar_t>(h.bias != nullptr ? h.bias[o] : 0.0);
    scalar_t* q = out + o * plane;
    for (int64_t i0 = 0; i0 < count; i0 += block) {
      V sum[kHeadAcc];
      for (int64_t v = 0; v < kHeadAcc; ++v) sum[v] = b;
      for (int64_t c = 0; c < h.C; ++c) {
        const V wc = V{} + static_cast<scalar_t>(w[c]);
        const scalar_t* a = act + c * kHeadChunk + i0;
        for (int64_t v = 0; v < kHeadAcc; ++v) {
          V av;
          __builtin_memcpy(&av, a + v * L, sizeof av);
          sum[v] += wc * av;
        }
      }
      // unrolled, so that the sums are stored from registers (gcc kept this loop, with the sums
      // spilled to the stack and reloaded, and a partial store's branches for every vector)
      if (count - i0 >= block) {
#pragma GCC unroll 16
        for (int64_t v = 0; v < kHeadAcc; ++v) __builtin_memcpy(q + i0 + v * L, &sum[v], sizeof sum[v]);
        continue;
      }
      for (int64_t v = 0; v < kHeadAcc; ++v)
        for (int64_t l = 0, at = i0 + v * L; l < L && at + l < count; ++l) q[at + l] = sum[v][l];
    }
  }
}

// The activation of the kLanes<scalar_t> values at p as one vector of scalar_t: activation_lanes
// on each of its float64 parts, rounded as store_rounded rounds them (the same bits).
template <typename scalar_t>
__attribute__((always_inline)) inline vec_t<scalar_t> activation_vec(const scalar_t* p, F64Vec scale, F64Vec shift,
                                                                    F64Vec slope) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return activation_lanes(p, scale, shift, slope);
  } else {
    constexpr int64_t L = kLanes<scalar_t>;  // (dependent: only this copy's branch below is made)
    static_assert(L == 2 * kF64Lanes, "a float vector is two float64 vectors");
    using H = F64Narrow<scalar_t>;
    const H lo = __builtin_convertvector(activation_lanes(p, scale, shift, slope), H);
    const H hi = __builtin_convertvector(activation_lanes(p + kF64Lanes, scale, shift, slope), H);
    if constexpr (L == 16) {
      return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    } else if constexpr (L == 8) {
      return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7);
    } else {
      return __builtin_shufflevector(lo, hi, 0, 1, 2, 3);
    }
  }
}

// The head with kO outputs in the AVX-512 copy: each block of NV vectors of pixels is activated
// channel by channel in registers and added into the kO outputs' sums there, without
// head_chunk_staged's buffer of activations (stored, then loaded back for every output). Each
// pixel's sum adds the same products in the same (channel) order from the same bias, and the
// activations are activation_lanes', rounded alike: the bits of head_chunk_staged, which takes the
// pixels after the last whole block. The generator's head (16 channels of 512x512 -> 3, 1 thread,
// its input read from memory after the rest of the forward, medians of 40-60 alternating calls)
// 1.19-1.30 -> 0.93-1.05 ms with 8 vectors a block, 1.19 ms with 4. In the AVX2 copy (16
// registers: 2 or 4 vectors a block) it ran 1.63-1.69 ms against 1.48-1.53 ms staged, so that copy
// keeps head_chunk_staged.
template <int kO>
constexpr int head_fused_vecs() {  // kO x NV sums in at most 24 of the 32 registers, NV <= 8
  return 24 / kO >= 8 ? 8 : 4;
}

template <int kO, typename scalar_t>
void head_chunk_fused(const scalar_t* x, scalar_t* out, int64_t plane, int64_t count, const Head& h, scalar_t* act) {
  using V = vec_t<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>, NV = head_fused_vecs<kO>(), block = NV * L;
  const F64Vec slope = F64Vec{} + h.slope;
  int64_t i0 = 0;
  for (; i0 + block <= count; i0 += block) {
    V sum[kO][NV];
    for (int o = 0; o < kO; ++o) {
      const V b = V{} + static_cast<scalar_t>(h.bias != nullptr ? h.bias[o] : 0.0);
      for (int v = 0; v < NV; ++v) sum[o][v] = b;
    }
    for (int64_t c = 0; c < h.C; ++c) {
      const scalar_t* p = x + c * plane + i0;
      prefetch_next_chunk<0>(p, block);  // this block's share of the channel's next chunk
      const F64Vec scale = F64Vec{} + h.scale[c], shift = F64Vec{} + h.shift[c];
      V w[kO];
      for (int o = 0; o < kO; ++o) w[o] = V{} + static_cast<scalar_t>(h.weight[o * h.C + c]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const V a = activation_vec(p + v * L, scale, shift, slope);
#pragma GCC unroll 4
        for (int o = 0; o < kO; ++o) sum[o][v] += w[o] * a;
      }
    }
#pragma GCC unroll 4
    for (int o = 0; o < kO; ++o)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) __builtin_memcpy(out + o * plane + i0 + v * L, &sum[o][v], sizeof(V));
  }
  if (i0 < count) head_chunk_staged(x + i0, out + i0, plane, count - i0, h, act);
}

// The head on a chunk: head_chunk_fused in the AVX-512 copy for up to 4 outputs, else
// head_chunk_staged.
template <typename scalar_t>
void head_chunk(const scalar_t* x, scalar_t* out, int64_t plane, int64_t count, const Head& h, scalar_t* act) {
  if constexpr (OES_FAST_VEC_BYTES == 64) {
    switch (h.O) {
      case 1: return head_chunk_fused<1>(x, out, plane, count, h, act);
      case 2: return head_chunk_fused<2>(x, out, plane, count, h, act);
      case 3: return head_chunk_fused<3>(x, out, plane, count, h, act);
      case 4: return head_chunk_fused<4>(x, out, plane, count, h, act);
      default: break;
    }
  }
  head_chunk_staged(x, out, plane, count, h, act);
}

// A chunk of one plane as float64 in xb[0, count), zeros up to a whole number of lanes.
template <typename scalar_t>
inline int64_t chunk_as_double(const scalar_t* p, int64_t count, double* xb) {
  const int64_t padded = (count + kF64Lanes - 1) / kF64Lanes * kF64Lanes;
  prefetch_next_chunk<0>(p);
  for (int64_t i = 0; i < count; ++i) xb[i] = static_cast<double>(p[i]);
  for (int64_t i = count; i < padded; ++i) xb[i] = 0.0;
  return padded;
}

// sum over the n (a whole number of lanes) values of a * b, lane by lane, in 4 independent chains
inline F64Vec dot_lanes(const double* a, const double* b, int64_t n) {
  F64Vec s0 = F64Vec{}, s1 = F64Vec{}, s2 = F64Vec{}, s3 = F64Vec{};
  int64_t i = 0;
  for (; i + 4 * kF64Lanes <= n; i += 4 * kF64Lanes) {
    s0 += load_f64(a + i) * load_f64(b + i);
    s1 += load_f64(a + i + kF64Lanes) * load_f64(b + i + kF64Lanes);
    s2 += load_f64(a + i + 2 * kF64Lanes) * load_f64(b + i + 2 * kF64Lanes);
    s3 += load_f64(a + i + 3 * kF64Lanes) * load_f64(b + i + 3 * kF64Lanes);
  }
  for (; i < n; i += kF64Lanes) s0 += load_f64(a + i) * load_f64(b + i);
  return (s0 + s1) + (s2 + s3);
}

// Both passes' per-lane terms for channel c at pixels i.. of the chunk: the pre-activation, the
// activation's slope factor (1 or slope) and dt = (sum_o W[o][c] g_o) * that factor. O: the
// outputs (a constant where the caller's kO is).
struct HeadTerms {
  F64Vec pre, fac, dt;
};
// Channel c's constants in vectors, made once per channel; w: the weights W[o][c] of the first
// kHeadMaxOutputs outputs. In the AVX-512 copy head_terms takes the weights and the slope from
// here too: gcc had loaded and broadcast them again at every vector of pixels (it could not tell
// that the stores to the gradients leave h's arrays alone). With that, the chunk's whole vectors
// read straight from x (chunk_lanes) and the partial last vector stored apart, the generator's
// head backward (16 channels of 512x512 -> 3, 1 thread, isolated, alternating with the previous
// build) ran 3.99-4.06 -> 2.69-3.08 ms. The AVX2 copy (16 registers) was 1.03-1.08x slower with
// the weights held here, and keeps reading them from h. The float64 input gradient's last bit
// moved in some pixels with this change (gcc contracts its expression differently); float32's
// did not in the cases checked.
constexpr int64_t kHeadMaxOutputs = 3;
struct HeadChannel {
  F64Vec scale, shift, mean, slope, w[kHeadMaxOutputs];
  HeadChannel(const HeadBackward& h, int64_t O, int64_t c)
      : scale(F64Vec{} + h.scale[c]), shift(F64Vec{} + h.shift[c]), mean(F64Vec{} + h.mean[c]),
        slope(F64Vec{} + h.slope) {
    for (int64_t o = 0; o < std::min<int64_t>(O, kHeadMaxOutputs); ++o) w[o] = F64Vec{} + h.weight[o * h.C + c];
  }
};
template <int kO>
inline HeadTerms head_terms(const HeadBackward& h, int64_t O, int64_t c, const HeadChannel& k, const double* g,
                            int64_t i, F64Vec xv) {
  HeadTerms t;
  t.pre = xv * k.scale + k.shift;
  t.fac = t.pre > 0.0 ? F64Vec{} + 1.0 : (OES_FAST_VEC_BYTES == 64 ? k.slope : F64Vec{} + h.slope);
  F64Vec ga = F64Vec{};
  if constexpr (kO > 0 && kO <= kHeadMaxOutputs && OES_FAST_VEC_BYTES == 64) {
    for (int64_t o = 0; o < kO; ++o) ga += k.w[o] * load_f64(g + o * kHeadChunk + i);
  } else {
    for (int64_t o = 0; o < O; ++o) ga += h.weight[o * h.C + c] * load_f64(g + o * kHeadChunk + i);
  }
  t.dt = ga * t.fac;
  return t;
}

// Channel c's chunk as float64 lanes: x straight from the plane p where it has count values from
// i on (widened exactly), else from xb, where chunk_tail_as_double put them (zeros after count).
template <typename scalar_t>
inline F64Vec chunk_lanes(const scalar_t* p, const double* xb, int64_t i, int64_t count) {
  return i + kF64Lanes <= count ? load_as_double(p + i) : load_f64(xb + i);
}

// For chunk_lanes: asks for the plane's next chunk, and puts the chunk's partial last vector (if
// any) as float64 at its place in xb, zeros after count, as chunk_as_double would. Returns the
// end of the whole vectors.
template <typename scalar_t>
inline int64_t chunk_tail_as_double(const scalar_t* p, int64_t count, double* xb) {
  prefetch_next_chunk<0>(p);
  const int64_t whole = count / kF64Lanes * kF64Lanes;
  if (whole < count)
    for (int64_t i = whole; i < whole + kF64Lanes; ++i) xb[i] = i < count ? static_cast<double>(p[i]) : 0.0;
  return whole;
}

// Pass 1 of the head's backward (batch_norm_leaky_relu_conv1x1_backward) over `count` <=
// kHeadChunk pixels of one image (channel c of x at x + c * plane, output o of grad at
// grad + o * plane). With g_o the output gradient and dt_c = (sum_o W[o][c] g_o) *
// leaky_relu'(pre_c), adds lane by lane into acc, entries of kHeadMaxLanes doubles:
// [O * C] g_o * act_c (the weight gradient), [O] g_o (the bias gradient), [C] dt_c, [C] dt_c *
// (x_c - mean_c) (the batch norm's sums). g: O * kHeadChunk doubles, act: C * kHeadChunk.
// kO: the number of outputs O when it is known at compile time (the generator's 3), 0 otherwise:
// then the gradients g_o of a vector of pixels stay in registers, and the weight gradient's sums
// are taken in the channel loop (isolated, 16 channels at 512x512, 1 thread: the backward 4.3-4.6
// -> 3.4-3.9 ms); otherwise after it, from the stored activations (dot_lanes).
constexpr int64_t kHeadMaxLanes = 8;

template <typename scalar_t, int kO>
void head_backward_sums(const scalar_t* x, const scalar_t* grad, int64_t plane, int64_t count,
                        const HeadBackward& h, double* g, double* act, double* acc) {
  const int64_t O = kO > 0 ? kO : h.O, C = h.C;
  int64_t padded = 0;
  for (int64_t o = 0; o < O; ++o) padded = chunk_as_double(grad + o * plane, count, g + o * kHeadChunk);
  double* acc_w = acc;
  double* acc_b = acc + O * C * kHeadMaxLanes;
  double* acc_dt = acc_b + O * kHeadMaxLanes;
  double* acc_dtxc = acc_dt + C * kHeadMaxLanes;
  for (int64_t o = 0; o < O; ++o) {
    F64Vec sum = load_f64(acc_b + o * kHeadMaxLanes);
    for (int64_t i = 0; i < padded; i += kF64Lanes) sum += load_f64(g + o * kHeadChunk + i);
    store_f64(acc_b + o * kHeadMaxLanes, sum);
  }
  for (int64_t c = 0; c < C; ++c) {
    double* a = act + c * kHeadChunk;
    const scalar_t* xc = x + c * plane;
    // x as float64 in a: read from there where kO is 0 (then replaced by the activation), else
    // only for a partial last vector (whole vectors straight from x: chunk_lanes)
    if constexpr (kO > 0) {
      chunk_tail_as_double(xc, count, a);
    } else {
      chunk_as_double(xc, count, a);
    }
    const HeadChannel k(h, O, c);
    const F64Vec mean = k.mean;
    F64Vec dt_sum = load_f64(acc_dt + c * kHeadMaxLanes), dtxc_sum = load_f64(acc_dtxc + c * kHeadMaxLanes);
    // with kO, the weight gradient's sums too, while the activation is in registers (one pass over
    // the chunk where a second one read the stored activation and the gradients again)
    F64Vec w_sum[kO > 0 ? kO : 1];
    if constexpr (kO > 0) {
      for (int64_t o = 0; o < kO; ++o) w_sum[o] = load_f64(acc_w + (o * C + c) * kHeadMaxLanes);
    }
    for (int64_t i = 0; i < padded; i += kF64Lanes) {
      const F64Vec xv = kO > 0 ? chunk_lanes(xc, a, i, count) : load_f64(a + i);
      const HeadTerms t = head_terms<kO>(h, O, c, k, g, i, xv);
      dt_sum += t.dt;
      dtxc_sum += t.dt * (xv - mean);
      const F64Vec av = round_lanes<scalar_t>(t.pre * t.fac);
      if constexpr (kO > 0) {
        for (int64_t o = 0; o < kO; ++o) w_sum[o] += load_f64(g + o * kHeadChunk + i) * av;
      } else {
        store_f64(a + i, av);
      }
    }
    if constexpr (kO > 0) {
      for (int64_t o = 0; o < kO; ++o) store_f64(acc_w + (o * C + c) * kHeadMaxLanes, w_sum[o]);
    }
    store_f64(acc_dt + c * kHeadMaxLanes, dt_sum);
    store_f64(acc_dtxc + c * kHeadMaxLanes, dtxc_sum);
  }
  if constexpr (kO == 0) {
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t c = 0; c < C; ++c) {
        double* w = acc_w + (o * C + c) * kHeadMaxLanes;
        store_f64(w, load_f64(w) + dot_lanes(g + o * kHeadChunk, act + c * kHeadChunk, padded));
      }
    }
  }
}

// Pass 2: the input gradient of the same pixels, grad_x = dt * scale + (x - mean) * xc_coef +
// constant per channel (as channel_backward computes it, from pass 1's sums), rounded to scalar_t.
template <typename scalar_t, int kO>
void head_backward_input(const scalar_t* x, const scalar_t* grad, scalar_t* grad_x, int64_t plane, int64_t count,
                         const HeadBackward& h, double* g, double* xb) {
  const int64_t O = kO > 0 ? kO : h.O, C = h.C;
  for (int64_t o = 0; o < O; ++o) chunk_as_double(grad + o * plane, count, g + o * kHeadChunk);
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xc = x + c * plane;
    const int64_t whole = chunk_tail_as_double(xc, count, xb);
    const HeadChannel k(h, O, c);
    const F64Vec coef = F64Vec{} + h.xc_coef[c], constant = F64Vec{} + h.constant[c];
    scalar_t* out = grad_x + c * plane;
    prefetch_next_chunk<1>(out);
    auto grad_lanes = [&](int64_t i) {
      const F64Vec xv = chunk_lanes(xc, xb, i, count);
      return head_terms<kO>(h, O, c, k, g, i, xv).dt * k.scale + (xv - k.mean) * coef + constant;
    };
    // whole vectors, then the partial last one (one loop with store_rounded's branch kept the
    // lanes on the stack)
    for (int64_t i = 0; i < whole; i += kF64Lanes) store_rounded(out + i, grad_lanes(i), kF64Lanes);
    if (whole < count) store_rounded(out + whole, grad_lanes(whole), count - whole);
  }
}

}  // namespace
}  // namespace OES_FAST_ISA_NS
}  // namespace oes_fast
