// CPU kernel of logit_adam_step_ (the ATen side is logit_adam_step.cpp).
// Included once per instruction set by per_isa.h (from logit_adam_step.cpp): no includes, no
// include guard; everything in the copy's namespace with internal linkage.
#include "elementwise.h"

namespace oes_fast {
namespace OES_FAST_ISA_NS {
namespace {

// Per-step constants in the compute type.
template <typename acc_t>
struct TileConstants {
  acc_t kl, log_rho, log_not_rho, beta1, beta2, step_size, bias2_sqrt, eps;
};

// sqrt(v) for v >= 0. -ffast-math takes a float vector's sqrt as v * rsqrt(v) with one Newton
// step, and the rsqrt estimate of SSE and AVX2 (not AVX-512's) is infinite for a subnormal v:
// exp_avg_sq is subnormal in float32 under gradients of about 3e-18, and the search's logits
// came out NaN on an AVX2 machine. A subnormal v is scaled into the normal range first (by 2^48,
// exact), its root back by 2^-24.
template <typename acc_t>
inline acc_t sqrt_of_any(acc_t v) {
  const bool small = v < (sizeof(acc_t) == 4 ? acc_t(0x1p-126) : acc_t(0x1p-1022));
  return std::sqrt(small ? v * acc_t(0x1p48) : v) * (small ? acc_t(0x1p-24) : acc_t(1));
}

// One tile: kTile logits and their Adam state updated in place; `prior` gets each element's KL
// term. `grad_scale` may be null (the gradient is then the logits' own).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
OES_TILE_FN void logit_adam_tile(scalar_t* logits, scalar_t* exp_avg, scalar_t* exp_avg_sq, const scalar_t* grad,
                                 const scalar_t* grad_scale, const TileConstants<acc_t>& c, acc_t* prior) {
  alignas(64) acc_t g_data[kTile];
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) g_data[i] = static_cast<acc_t>(grad[i]);
  if (grad_scale != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < kTile; ++i) g_data[i] = g_data[i] * static_cast<acc_t>(grad_scale[i]);
  }
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) {
    const acc_t p = static_cast<acc_t>(logits[i]);
    acc_t kl_grad;
    kl_term<acc_t>(p, c.log_rho, c.log_not_rho, prior[i], kl_grad);
    const acc_t g = g_data[i] + c.kl * kl_grad;
    // as torch.optim.Adam: exp_avg.lerp_(g, 1 - beta1), exp_avg_sq = beta2 v + (1 - beta2) g^2
    const acc_t m = static_cast<acc_t>(exp_avg[i]);
    const acc_t m1 = m + (acc_t(1) - c.beta1) * (g - m);
    const acc_t v = c.beta2 * static_cast<acc_t>(exp_avg_sq[i]) + (acc_t(1) - c.beta2) * g * g;
    exp_avg[i] = static_cast<scalar_t>(m1);
    exp_avg_sq[i] = static_cast<scalar_t>(v);
    logits[i] = static_cast<scalar_t>(p - c.step_size * m1 / (sqrt_of_any(v) / c.bias2_sqrt + c.eps));
  }
}

template <typename scalar_t>
double logit_adam_step_kernel(scalar_t* logits, scalar_t* exp_avg, scalar_t* exp_avg_sq, const scalar_t* grad,
                              const scalar_t* grad_scale, int64_t numel, double density, double kl_d,
                              const AdamConstants& c) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileConstants<acc_t> k{static_cast<acc_t>(kl_d),       static_cast<acc_t>(std::log(density)),
                               static_cast<acc_t>(std::log1p(-density)), static_cast<acc_t>(c.beta1),
                               static_cast<acc_t>(c.beta2),    static_cast<acc_t>(c.step_size),
                               static_cast<acc_t>(c.bias2_sqrt), static_cast<acc_t>(c.eps)};
  const int64_t tiles = (numel + kTile - 1) / kTile;
  const int64_t chunks = (tiles + kChunkTiles - 1) / kChunkTiles;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    alignas(64) acc_t prior[kTile];
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double chunk_sum = 0.0;
      const int64_t last_tile = std::min(tiles, (chunk + 1) * kChunkTiles);
      for (int64_t tile = chunk * kChunkTiles; tile < last_tile; ++tile) {
        const int64_t start = tile * kTile, n = std::min(kTile, numel - start);
        if (n == kTile) {
          logit_adam_tile<scalar_t>(logits + start, exp_avg + start, exp_avg_sq + start, grad + start,
                                    grad_scale != nullptr ? grad_scale + start : nullptr, k, prior);
        } else {
          Tile<scalar_t> state, in;  // state: logits, exp_avg, exp_avg_sq; in: grad, grad_scale
          load_tile(logits + start, n, state.a);
          load_tile(exp_avg + start, n, state.b);
          load_tile(exp_avg_sq + start, n, state.c);
          load_tile(grad + start, n, in.a);
          if (grad_scale != nullptr) load_tile(grad_scale + start, n, in.b);
          logit_adam_tile<scalar_t>(state.a, state.b, state.c, in.a, grad_scale != nullptr ? in.b : nullptr, k,
                                    prior);
          store_tile(state.a, n, logits + start);
          store_tile(state.b, n, exp_avg + start);
          store_tile(state.c, n, exp_avg_sq + start);
          for (int64_t i = n; i < kTile; ++i) prior[i] = acc_t(0);  // the padding is not a logit
        }
        acc_t tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
        for (int64_t i = 0; i < kTile; ++i) tile_sum += prior[i];
        chunk_sum += static_cast<double>(tile_sum);
      }
      partial[static_cast<size_t>(chunk)] = chunk_sum;
    }
  });
  double total = 0.0;
  for (double x : partial) total += x;
  return total;
}

}  // namespace
}  // namespace OES_FAST_ISA_NS
}  // namespace oes_fast
