// The Gumbel-sigmoid mask on the GPU, shared by the CUDA kernels that sample masks
// (gumbel_mask.cu, gumbel_masked_conv2d.cu).
#pragma once
#include <cstdint>

#include "../philox.h"

namespace oes_fast {

// Explicit float and double overloads: the build passes --use_fast_math, so logf/expf become
// the fast __logf/__expf intrinsics while the double path keeps the accurate log/exp.
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// s = sigmoid(x) = 1 / (1 + exp(-x)), returned, and its derivative s * (1 - s) in `slope`, as the
// CPU kernels (csrc/cpu/elementwise.h: sigmoid_and_complement): e = exp(min(-x, cap)), s = 1 / (1 + e),
// s * (1 - s) = (e * s) * s, since 1 - s = e * s; where s is nearly 1, 1 - s would cancel to a few
// bits (about 20 % off in float32 at x = 15). The cap (80 in float32, 700 in float64) keeps exp
// finite, so e * s is never inf * 0 = NaN; below x = -cap, s stays 1 / (1 + e^cap) (1.8e-35 in
// float32, 1e-304 in float64) instead of going to 0, as on the CPU.
template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_and_slope(acc_t x, acc_t& slope) {
  const acc_t max_neg_x = sizeof(acc_t) == 4 ? acc_t(80) : acc_t(700);
  const acc_t neg_x = -x;
  const acc_t e = exp_acc(neg_x < max_neg_x ? neg_x : max_neg_x);
  const acc_t s = acc_t(1) / (acc_t(1) + e);
  slope = (e * s) * s;
  return s;
}

// m = sigmoid((p + log(u) - log(1 - u)) / tau), u the clamped float32 uniform of `offset`,
// written in the same order as the CPU kernel: 1 / (1 + exp(min(-((p + noise) / tau), cap))),
// and m * (1 - m) in `slope` (sigmoid_and_slope).
template <typename acc_t>
__device__ __forceinline__ acc_t gumbel_sigmoid(acc_t p, uint64_t seed, uint64_t offset, acc_t tau, acc_t& slope) {
  const acc_t u = static_cast<acc_t>(clamp_uniform(philox_uniform(seed, offset)));
  const acc_t noise = log_acc(u) - log_acc(acc_t(1) - u);
  return sigmoid_and_slope<acc_t>((p + noise) / tau, slope);
}

// m alone (the unused slope is dead code to the compiler).
template <typename acc_t>
__device__ __forceinline__ acc_t gumbel_sigmoid(acc_t p, uint64_t seed, uint64_t offset, acc_t tau) {
  acc_t slope;
  return gumbel_sigmoid<acc_t>(p, seed, offset, tau, slope);
}

}  // namespace oes_fast
