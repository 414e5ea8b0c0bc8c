// Per-element pieces shared by the CPU kernels of gumbel_mask, kl_prior and logit_adam_step.
// Each kernel cuts its work into tiles of kTile elements counted from the start of the tensor
// and runs loops of constant trip count on aligned local buffers, so an element gets the same
// bits whatever its position, the thread split or the launch (no scalar remainder, no alignment
// peeling).
#pragma once
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>

#include "../philox.h"

namespace oes_fast {

constexpr int64_t kTile = 256;
constexpr double kKlEps = 1e-6;  // the OES authors' epsilon inside the prior's logs

// sigmoid(x) = 1 / (1 + exp(-x)), with -x capped below the overflow of exp: under -ffast-math
// the vector division 1 / (1 + inf) gives NaN, not 0. The cap changes nothing representable
// (the result is then below 1e-34 in float32, 1e-304 in float64).
template <typename acc_t>
inline acc_t stable_sigmoid(acc_t x) {
  const acc_t max_neg_x = sizeof(acc_t) == 4 ? acc_t(80) : acc_t(700);
  const acc_t neg_x = -x;
  return acc_t(1) / (acc_t(1) + std::exp(neg_x < max_neg_x ? neg_x : max_neg_x));
}

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

// n elements of src into dst as acc_t, the rest of the tile zero.
template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* src, int64_t n, acc_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  for (int64_t i = n; i < kTile; ++i) dst[i] = acc_t(0);
}

template <typename scalar_t, typename acc_t>
inline void store_tile(const acc_t* src, int64_t n, scalar_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// The OES prior KL(Bernoulli(s) || Bernoulli(rho)) of one logit p, s = sigmoid(p), and its
// derivative in p; log_rho = log(rho), log_not_rho = log(1 - rho).
template <typename acc_t>
inline void kl_term(acc_t p, acc_t log_rho, acc_t log_not_rho, acc_t& value, acc_t& grad) {
  const acc_t eps = static_cast<acc_t>(kKlEps);
  const acc_t s = stable_sigmoid<acc_t>(p);
  const acc_t log_a = std::log(s + eps) - log_rho;
  const acc_t log_b = std::log(acc_t(1) - s + eps) - log_not_rho;
  value = s * log_a + (acc_t(1) - s) * log_b;
  const acc_t dkl_ds = log_a + s / (s + eps) - log_b - (acc_t(1) - s) / (acc_t(1) - s + eps);
  grad = dkl_ds * s * (acc_t(1) - s);
}

}  // namespace oes_fast
