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

// Logistic noise log(u) - log(1 - u) for kTile consecutive offsets, u clamped.
template <typename acc_t>
inline void logistic_noise_tile(uint64_t seed, uint64_t first_offset, int64_t n, acc_t* noise) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t u = static_cast<acc_t>(clamp_uniform(philox_uniform(seed, first_offset + static_cast<uint64_t>(i))));
    noise[i] = std::log(u) - std::log(acc_t(1) - u);
  }
}

template <typename scalar_t>
void gumbel_mask_forward_cpu(const scalar_t* logits, const scalar_t* weight, scalar_t* out, int64_t numel,
                             uint64_t seed, uint64_t offset, double tau_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t tau = static_cast<acc_t>(tau_d);
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    acc_t noise[kTile];
    for (int64_t start = begin; start < end; start += kTile) {
      const int64_t n = std::min(kTile, end - start);
      logistic_noise_tile<acc_t>(seed, offset + static_cast<uint64_t>(start), n, noise);
      const scalar_t* p = logits + start;
      const scalar_t* w = weight + start;
      scalar_t* o = out + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const acc_t m = acc_t(1) / (acc_t(1) + std::exp(-(static_cast<acc_t>(p[i]) + noise[i]) / tau));
        o[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) * m);
      }
    }
  });
}

template <typename scalar_t>
void gumbel_mask_backward_cpu(const scalar_t* grad, const scalar_t* logits, const scalar_t* weight,
                              scalar_t* grad_logits, scalar_t* grad_weight, int64_t numel, uint64_t seed,
                              uint64_t offset, double tau_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t tau = static_cast<acc_t>(tau_d);
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    acc_t noise[kTile];
    for (int64_t start = begin; start < end; start += kTile) {
      const int64_t n = std::min(kTile, end - start);
      logistic_noise_tile<acc_t>(seed, offset + static_cast<uint64_t>(start), n, noise);
      const scalar_t* g = grad + start;
      const scalar_t* p = logits + start;
      const scalar_t* w = weight + start;
      scalar_t* gp = grad_logits + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const acc_t m = acc_t(1) / (acc_t(1) + std::exp(-(static_cast<acc_t>(p[i]) + noise[i]) / tau));
        // d/dp [w * sigmoid((p + L) / tau)] = w * m * (1 - m) / tau
        gp[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * static_cast<acc_t>(w[i]) * m * (acc_t(1) - m) / tau);
        if (grad_weight != nullptr) grad_weight[start + i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * m);
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
