// CPU kernels of philox_uniform, gumbel_mask, gumbel_mask_with_slope and gumbel_mask_backward.
// Work is split across threads with at::parallel_for (OpenMP); inside a thread, tiles of
// kTile elements (elementwise.h) run through one tile function of `omp simd` loops that gcc
// vectorizes, calling glibc's vector logf/expf. bfloat16 is computed in float32; float64 in
// float64 (the uniform itself is always the float32 of the RNG contract).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../ops.h"
#include "../philox.h"
#include "elementwise.h"

namespace oes_fast {
namespace {

constexpr int64_t kGrain = 16384;

// One tile of the forward: out = w * m; with `slope` non-null also
// slope = d out / d logits = w * m * (1 - m) / tau. kTile elements from each pointer.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
OES_TILE_FN void gumbel_mask_forward_tile(const scalar_t* logits, const scalar_t* weight, scalar_t* out,
                                          scalar_t* slope, uint64_t seed, uint64_t first_offset, acc_t tau) {
  alignas(64) acc_t mask[kTile];
  logistic_noise_tile<acc_t>(seed, first_offset, mask);
  // the same loops with or without the slope, so both give the same masked weights
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) mask[i] = stable_sigmoid<acc_t>((static_cast<acc_t>(logits[i]) + mask[i]) / tau);
  if (slope != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < kTile; ++i) {
      slope[i] = static_cast<scalar_t>(static_cast<acc_t>(weight[i]) * mask[i] * (acc_t(1) - mask[i]) / tau);
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(weight[i]) * mask[i]);
}

template <typename scalar_t>
void gumbel_mask_forward_cpu(const scalar_t* logits, const scalar_t* weight, scalar_t* out, scalar_t* slope,
                             int64_t numel, uint64_t seed, uint64_t offset, double tau_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t tau = static_cast<acc_t>(tau_d);
  const int64_t tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrain / kTile, [&](int64_t tile_begin, int64_t tile_end) {
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t start = tile * kTile, n = std::min(kTile, numel - start);
      const uint64_t first = offset + static_cast<uint64_t>(start);
      if (n == kTile) {
        gumbel_mask_forward_tile<scalar_t>(logits + start, weight + start, out + start,
                                           slope != nullptr ? slope + start : nullptr, seed, first, tau);
        continue;
      }
      Tile<scalar_t> t;  // a: logits, b: weight, c: out
      alignas(64) scalar_t slope_tile[kTile];
      load_tile(logits + start, n, t.a);
      load_tile(weight + start, n, t.b);
      gumbel_mask_forward_tile<scalar_t>(t.a, t.b, t.c, slope != nullptr ? slope_tile : nullptr, seed, first, tau);
      store_tile(t.c, n, out + start);
      if (slope != nullptr) store_tile(slope_tile, n, slope + start);
    }
  });
}

// One tile of the backward: grad_logits = grad * w * m * (1 - m) / tau and, with `grad_weight`
// non-null, grad_weight = grad * m.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
OES_TILE_FN void gumbel_mask_backward_tile(const scalar_t* grad, const scalar_t* logits, const scalar_t* weight,
                                           scalar_t* grad_logits, scalar_t* grad_weight, uint64_t seed,
                                           uint64_t first_offset, acc_t tau) {
  alignas(64) acc_t noise[kTile];
  alignas(64) acc_t grad_w[kTile];
  logistic_noise_tile<acc_t>(seed, first_offset, noise);
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) {
    const acc_t g = static_cast<acc_t>(grad[i]);
    const acc_t m = stable_sigmoid<acc_t>((static_cast<acc_t>(logits[i]) + noise[i]) / tau);
    // d/dp [w * sigmoid((p + L) / tau)] = w * m * (1 - m) / tau
    grad_logits[i] = static_cast<scalar_t>(g * static_cast<acc_t>(weight[i]) * m * (acc_t(1) - m) / tau);
    grad_w[i] = g * m;
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
  const int64_t tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrain / kTile, [&](int64_t tile_begin, int64_t tile_end) {
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t start = tile * kTile, n = std::min(kTile, numel - start);
      const uint64_t first = offset + static_cast<uint64_t>(start);
      if (n == kTile) {
        gumbel_mask_backward_tile<scalar_t>(grad + start, logits + start, weight + start, grad_logits + start,
                                            grad_weight != nullptr ? grad_weight + start : nullptr, seed, first, tau);
        continue;
      }
      Tile<scalar_t> in, out;  // in: grad, logits, weight; out: grad_logits, grad_weight
      load_tile(grad + start, n, in.a);
      load_tile(logits + start, n, in.b);
      load_tile(weight + start, n, in.c);
      gumbel_mask_backward_tile<scalar_t>(in.a, in.b, in.c, out.a, grad_weight != nullptr ? out.b : nullptr, seed,
                                          first, tau);
      store_tile(out.a, n, grad_logits + start);
      if (grad_weight != nullptr) store_tile(out.b, n, grad_weight + start);
    }
  });
}

at::Tensor philox_uniform_cpu(const at::Tensor& like, int64_t seed, int64_t offset) {
  TORCH_CHECK(seed >= 0, "philox_uniform: seed must be non-negative, got ", seed);
  TORCH_CHECK(offset >= 0 && offset <= INT64_MAX - like.numel(),
              "philox_uniform: offset must be non-negative and offset + numel must fit in int64, got ", offset);
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  float* o = out.data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed), base = static_cast<uint64_t>(offset);
  at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    philox_uniforms(s, base + static_cast<uint64_t>(begin), end - begin, o + begin);
  });
  return out;
}

at::Tensor gumbel_mask_cpu(const at::Tensor& logits, const at::Tensor& weight, int64_t seed, int64_t offset,
                           double tau) {
  check_gumbel_mask_inputs(logits, weight, seed, offset, tau);
  const at::Tensor p = logits.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(p, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "gumbel_mask_cpu", [&] {
    gumbel_mask_forward_cpu<scalar_t>(p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                      nullptr, p.numel(), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                      tau);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gumbel_mask_with_slope_cpu(const at::Tensor& logits, const at::Tensor& weight,
                                                              int64_t seed, int64_t offset, double tau) {
  check_gumbel_mask_inputs(logits, weight, seed, offset, tau);
  const at::Tensor p = logits.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(p, at::MemoryFormat::Contiguous);
  at::Tensor slope = at::empty_like(p, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "gumbel_mask_with_slope_cpu", [&] {
    gumbel_mask_forward_cpu<scalar_t>(p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                      slope.data_ptr<scalar_t>(), p.numel(), static_cast<uint64_t>(seed),
                                      static_cast<uint64_t>(offset), tau);
  });
  return {out, slope};
}

std::tuple<at::Tensor, at::Tensor> gumbel_mask_backward_cpu_op(const at::Tensor& grad, const at::Tensor& logits,
                                                               const at::Tensor& weight, int64_t seed, int64_t offset,
                                                               double tau, bool weight_grad) {
  check_gumbel_mask_inputs(logits, weight, seed, offset, tau);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
              "gumbel_mask_backward: grad must match logits in shape and dtype");
  const at::Tensor g = grad.contiguous(), p = logits.contiguous(), w = weight.contiguous();
  at::Tensor grad_logits = at::empty_like(p, at::MemoryFormat::Contiguous);
  at::Tensor grad_weight = weight_grad ? at::empty_like(w, at::MemoryFormat::Contiguous) : at::empty({0}, p.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "gumbel_mask_backward_cpu", [&] {
    gumbel_mask_backward_cpu<scalar_t>(g.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                       grad_logits.data_ptr<scalar_t>(),
                                       weight_grad ? grad_weight.data_ptr<scalar_t>() : nullptr, p.numel(),
                                       static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), tau);
  });
  return {grad_logits, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(oes_fast, CPU, m) {
  m.impl("philox_uniform", &philox_uniform_cpu);
  m.impl("gumbel_mask", &gumbel_mask_cpu);
  m.impl("gumbel_mask_with_slope", &gumbel_mask_with_slope_cpu);
  m.impl("gumbel_mask_backward", &gumbel_mask_backward_cpu_op);
}

}  // namespace oes_fast
