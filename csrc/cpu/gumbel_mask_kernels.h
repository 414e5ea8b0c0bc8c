// CPU kernels of philox_uniform, gumbel_mask, gumbel_mask_with_slope and gumbel_mask_backward:
// the tile functions and the loops over tiles (the ATen side is gumbel_mask.cpp).
// Included once per instruction set by per_isa.h (from gumbel_mask.cpp): no includes, no
// include guard; everything in the copy's namespace with internal linkage.
#include "elementwise.h"

namespace oes_fast {
namespace OES_FAST_ISA_NS {
namespace {

constexpr int64_t kGrain = 16384;

// One tile of the forward: out = w * m; with `slope` non-null also
// slope = d out / d logits = w * m * (1 - m) / tau. kTile elements from each pointer.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
OES_TILE_FN void gumbel_mask_forward_tile(const scalar_t* logits, const scalar_t* weight, scalar_t* out,
                                          scalar_t* slope, uint64_t seed, uint64_t first_offset, acc_t tau) {
  alignas(64) acc_t mask[kTile];
  alignas(64) acc_t complement[kTile];  // 1 - mask
  logistic_noise_tile<acc_t>(seed, first_offset, mask);
  // the same loops with or without the slope, so both give the same masked weights
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) {
    mask[i] = sigmoid_and_complement<acc_t>((static_cast<acc_t>(logits[i]) + mask[i]) / tau, complement[i]);
  }
  if (slope != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < kTile; ++i) {
      slope[i] = static_cast<scalar_t>(static_cast<acc_t>(weight[i]) * (mask[i] * complement[i]) / tau);
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(weight[i]) * mask[i]);
}

// fn(start, n, first) on every tile of kTile elements of [0, numel), split across threads: `first`
// is the stream offset of element `start`; n < kTile only for the last tile, which the callers
// pass through zero-padded copies.
template <typename Fn>
void for_each_tile(int64_t numel, uint64_t offset, const Fn& fn) {
  const int64_t tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrain / kTile, [&](int64_t tile_begin, int64_t tile_end) {
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t start = tile * kTile;
      fn(start, std::min(kTile, numel - start), offset + static_cast<uint64_t>(start));
    }
  });
}

template <typename scalar_t>
void gumbel_mask_forward_cpu(const scalar_t* logits, const scalar_t* weight, scalar_t* out, scalar_t* slope,
                             int64_t numel, uint64_t seed, uint64_t offset, double tau_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t tau = static_cast<acc_t>(tau_d);
  for_each_tile(numel, offset, [&](int64_t start, int64_t n, uint64_t first) {
    if (n == kTile) {
      gumbel_mask_forward_tile<scalar_t>(logits + start, weight + start, out + start,
                                         slope != nullptr ? slope + start : nullptr, seed, first, tau);
      return;
    }
    Tile<scalar_t> t;  // a: logits, b: weight, c: out
    alignas(64) scalar_t slope_tile[kTile];
    load_tile(logits + start, n, t.a);
    load_tile(weight + start, n, t.b);
    gumbel_mask_forward_tile<scalar_t>(t.a, t.b, t.c, slope != nullptr ? slope_tile : nullptr, seed, first, tau);
    store_tile(t.c, n, out + start);
    if (slope != nullptr) store_tile(slope_tile, n, slope + start);
  });
}

// One tile of the backward: grad_logits = grad * w * m * (1 - m) / tau and, with `grad_weight`
// non-null, grad_weight = grad * m.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
OES_TILE_FN void gumbel_mask_backward_tile(const scalar_t* grad, const scalar_t* logits, const scalar_t* weight,
                                           scalar_t* grad_logits, scalar_t* grad_weight, uint64_t seed,
                                           uint64_t first_offset, acc_t tau) {
  alignas(64) acc_t noise[kTile];
  alignas(64) acc_t mask[kTile];
  alignas(64) acc_t complement[kTile];  // 1 - mask
  alignas(64) acc_t grad_w[kTile];
  logistic_noise_tile<acc_t>(seed, first_offset, noise);
  // m and 1 - m go through memory before their product is formed: in one expression -ffast-math
  // may regroup m * (e * m) as (m * m) * e, which underflows to 0 in float32 below x = -44
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) {
    mask[i] = sigmoid_and_complement<acc_t>((static_cast<acc_t>(logits[i]) + noise[i]) / tau, complement[i]);
  }
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) {
    const acc_t g = static_cast<acc_t>(grad[i]);
    // d/dp [w * sigmoid((p + L) / tau)] = w * m * (1 - m) / tau
    grad_logits[i] = static_cast<scalar_t>(g * static_cast<acc_t>(weight[i]) * (mask[i] * complement[i]) / tau);
    grad_w[i] = g * mask[i];
  }
  if (grad_weight != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < kTile; ++i) grad_weight[i] = static_cast<scalar_t>(grad_w[i]);
  }
}

template <typename scalar_t>
void gumbel_mask_backward_cpu(const scalar_t* grad, const scalar_t* logits, const scalar_t* weight,
                              scalar_t* grad_logits, scalar_t* grad_weight, int64_t numel, uint64_t seed,
                              uint64_t offset, double tau_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t tau = static_cast<acc_t>(tau_d);
  for_each_tile(numel, offset, [&](int64_t start, int64_t n, uint64_t first) {
    if (n == kTile) {
      gumbel_mask_backward_tile<scalar_t>(grad + start, logits + start, weight + start, grad_logits + start,
                                          grad_weight != nullptr ? grad_weight + start : nullptr, seed, first, tau);
      return;
    }
    Tile<scalar_t> in, out;  // in: grad, logits, weight; out: grad_logits, grad_weight
    load_tile(grad + start, n, in.a);
    load_tile(logits + start, n, in.b);
    load_tile(weight + start, n, in.c);
    gumbel_mask_backward_tile<scalar_t>(in.a, in.b, in.c, out.a, grad_weight != nullptr ? out.b : nullptr, seed,
                                        first, tau);
    store_tile(out.a, n, grad_logits + start);
    if (grad_weight != nullptr) store_tile(out.b, n, grad_weight + start);
  });
}

// philox_uniform over numel elements, split across threads.
void philox_uniform_fill(uint64_t seed, uint64_t offset, int64_t numel, float* out) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    philox_uniforms(seed, offset + static_cast<uint64_t>(begin), end - begin, out + begin);
  });
}

}  // namespace
}  // namespace OES_FAST_ISA_NS
}  // namespace oes_fast
