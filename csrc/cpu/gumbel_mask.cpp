// CPU kernels of philox_uniform, gumbel_mask, gumbel_mask_with_slope and gumbel_mask_backward.
// Work is split across threads with at::parallel_for (OpenMP); inside a thread, tiles of
// kTile elements (elementwise.h) run through one tile function of `omp simd` loops that gcc
// vectorizes, calling glibc's vector logf/expf. bfloat16 is computed in float32; float64 in
// float64 (the uniform itself is always the float32 of the RNG contract).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "../ops.h"
#include "../philox.h"
#include "cpu_isa.h"

#define OES_FAST_KERNELS_FILE "gumbel_mask_kernels.h"
#include "per_isa.h"

namespace oes_fast {
namespace {

at::Tensor philox_uniform_cpu(const at::Tensor& like, int64_t seed, int64_t offset) {
  TORCH_CHECK(seed >= 0, "philox_uniform: seed must be non-negative, got ", seed);
  TORCH_CHECK(offset >= 0 && offset <= INT64_MAX - like.numel(),
              "philox_uniform: offset must be non-negative and offset + numel must fit in int64, got ", offset);
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  float* o = out.data_ptr<float>();
  auto* kernel = OES_FAST_ISA_DISPATCH(philox_uniform_fill);
  kernel(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), out.numel(), o);
  return out;
}

at::Tensor gumbel_mask_cpu(const at::Tensor& logits, const at::Tensor& weight, int64_t seed, int64_t offset,
                           double tau) {
  check_gumbel_mask_inputs(logits, weight, seed, offset, tau);
  const at::Tensor p = logits.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(p, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "gumbel_mask_cpu", [&] {
    auto* kernel = OES_FAST_ISA_DISPATCH(gumbel_mask_forward_cpu<scalar_t>);
    kernel(p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), nullptr, p.numel(),
           static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), tau);
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
    auto* kernel = OES_FAST_ISA_DISPATCH(gumbel_mask_forward_cpu<scalar_t>);
    kernel(p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), slope.data_ptr<scalar_t>(),
           p.numel(), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), tau);
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
    auto* kernel = OES_FAST_ISA_DISPATCH(gumbel_mask_backward_cpu<scalar_t>);
    kernel(g.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), grad_logits.data_ptr<scalar_t>(),
           weight_grad ? grad_weight.data_ptr<scalar_t>() : nullptr, p.numel(), static_cast<uint64_t>(seed),
           static_cast<uint64_t>(offset), tau);
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
