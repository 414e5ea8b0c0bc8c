// CPU kernels of philox_uniform, gumbel_mask and gumbel_mask_backward.
// Work is split across threads with at::parallel_for (OpenMP); inside a thread, tiles of
// kTile elements run through `omp simd` loops that gcc vectorizes, calling glibc's vector
// logf/expf. bfloat16 is computed in float32; float64 in float64 (the uniform itself is
// always the float32 of the RNG contract).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../ops.h"
#include "../philox.h"

namespace oes_fast {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kGrain = 16384;

// sigmoid(x) = 1 / (1 + exp(-x)), with -x capped below the overflow of exp: under -ffast-math
// the vector division 1 / (1 + inf) gives NaN, not 0. The cap changes nothing representable
// (the result is then below 1e-34 in float32, 1e-304 in float64).
template <typename acc_t>
inline acc_t stable_sigmoid(acc_t x) {
  const acc_t max_neg_x = sizeof(acc_t) == 4 ? acc_t(80) : acc_t(700);
  const acc_t neg_x = -x;
  return acc_t(1) / (acc_t(1) + std::exp(neg_x < max_neg_x ? neg_x : max_neg_x));
}

// Every element goes through the same vector code whatever its position, thread split or
// launch: work is cut into tiles of kTile elements counted from the start of the tensor, and
// each tile (the last one zero-padded) runs loops of constant trip count on aligned local
// buffers, so there is no scalar remainder or alignment peeling to give an element other bits.
template <typename acc_t>
struct alignas(64) Tile {
  acc_t a[kTile];
  acc_t b[kTile];
  acc_t c[kTile];
};

// Logistic noise log(u) - log(1 - u) of kTile consecutive offsets, u clamped.
template <typename acc_t>
inline void logistic_noise_tile(uint64_t seed, uint64_t first_offset, acc_t* noise) {
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) {
    const acc_t u = static_cast<acc_t>(clamp_uniform(philox_uniform(seed, first_offset + static_cast<uint64_t>(i))));
    noise[i] = std::log(u) - std::log(acc_t(1) - u);
  }
}

template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* src, int64_t n, acc_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  for (int64_t i = n; i < kTile; ++i) dst[i] = acc_t(0);
}

template <typename scalar_t>
void gumbel_mask_forward_cpu(const scalar_t* logits, const scalar_t* weight, scalar_t* out, int64_t numel,
                             uint64_t seed, uint64_t offset, double tau_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t tau = static_cast<acc_t>(tau_d);
  const int64_t tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrain / kTile, [&](int64_t tile_begin, int64_t tile_end) {
    Tile<acc_t> t;  // a: logits, b: weight, c: noise
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t start = tile * kTile, n = std::min(kTile, numel - start);
      logistic_noise_tile<acc_t>(seed, offset + static_cast<uint64_t>(start), t.c);
      load_tile(logits + start, n, t.a);
      load_tile(weight + start, n, t.b);
#pragma omp simd
      for (int64_t i = 0; i < kTile; ++i) t.c[i] = t.b[i] * stable_sigmoid<acc_t>((t.a[i] + t.c[i]) / tau);
      for (int64_t i = 0; i < n; ++i) out[start + i] = static_cast<scalar_t>(t.c[i]);
    }
  });
}

template <typename scalar_t>
void gumbel_mask_backward_cpu(const scalar_t* grad, const scalar_t* logits, const scalar_t* weight,
                              scalar_t* grad_logits, scalar_t* grad_weight, int64_t numel, uint64_t seed,
                              uint64_t offset, double tau_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t tau = static_cast<acc_t>(tau_d);
  const int64_t tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrain / kTile, [&](int64_t tile_begin, int64_t tile_end) {
    Tile<acc_t> t;      // a: logits, b: weight, c: noise, then the mask m
    Tile<acc_t> g;      // a: upstream gradient, b: grad_logits, c: grad_weight
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t start = tile * kTile, n = std::min(kTile, numel - start);
      logistic_noise_tile<acc_t>(seed, offset + static_cast<uint64_t>(start), t.c);
      load_tile(logits + start, n, t.a);
      load_tile(weight + start, n, t.b);
      load_tile(grad + start, n, g.a);
#pragma omp simd
      for (int64_t i = 0; i < kTile; ++i) {
        const acc_t m = stable_sigmoid<acc_t>((t.a[i] + t.c[i]) / tau);
        // d/dp [w * sigmoid((p + L) / tau)] = w * m * (1 - m) / tau
        g.b[i] = g.a[i] * t.b[i] * m * (acc_t(1) - m) / tau;
        g.c[i] = g.a[i] * m;
      }
      for (int64_t i = 0; i < n; ++i) grad_logits[start + i] = static_cast<scalar_t>(g.b[i]);
      if (grad_weight != nullptr) {
        for (int64_t i = 0; i < n; ++i) grad_weight[start + i] = static_cast<scalar_t>(g.c[i]);
      }
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
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) o[i] = philox_uniform(s, base + static_cast<uint64_t>(i));
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
                                      p.numel(), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), tau);
  });
  return out;
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
  m.impl("gumbel_mask_backward", &gumbel_mask_backward_cpu_op);
}

}  // namespace oes_fast
