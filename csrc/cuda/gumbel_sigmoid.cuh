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

// m = sigmoid((p + log(u) - log(1 - u)) / tau), u the clamped float32 uniform of `offset`,
// written in the same order as the CPU kernel: 1 / (1 + exp(-(p + noise) / tau)).
template <typename acc_t>
__device__ __forceinline__ acc_t gumbel_sigmoid(acc_t p, uint64_t seed, uint64_t offset, acc_t tau) {
  const acc_t u = static_cast<acc_t>(clamp_uniform(philox_uniform(seed, offset)));
  const acc_t noise = log_acc(u) - log_acc(acc_t(1) - u);
  return acc_t(1) / (acc_t(1) + exp_acc(-(p + noise) / tau));
}

}  // namespace oes_fast
