// Declares the oes_fast operators (schemas) and the Python module oes_fast._C.
// CPU kernels register in csrc/cpu/*.cpp. The CUDA dispatch is registered from Python in
// oes_fast/ops.py, which chooses between the CUDA C++ kernels exposed here and Triton.
#include <torch/extension.h>
#include <torch/library.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>

#include "cpu/cpu_isa.h"
#include "generator_forward.h"
#include "ops.h"

TORCH_LIBRARY(oes_fast, m) {
  // float32 uniforms shaped like `like`, on its device: element j gets stream (seed, offset + j).
  m.def("philox_uniform(Tensor like, int seed, int offset) -> Tensor");
  // weight * sigmoid((logits + log(u) - log(1 - u)) / tau), u = philox_uniform(seed, offset + j).
  m.def("gumbel_mask(Tensor logits, Tensor weight, int seed, int offset, float tau) -> Tensor");
  // (gumbel_mask, its derivative in the logits weight * m * (1 - m) / tau) in one pass: the
  // second is what the chain rule to the logits needs, so a caller that keeps it (the CPU
  // search step) skips the backward's regeneration of the noise.
  m.def("gumbel_mask_with_slope(Tensor logits, Tensor weight, int seed, int offset, float tau) -> (Tensor, Tensor)");
  // (grad_logits, grad_weight); grad_weight is an empty tensor unless weight_grad is true.
  m.def(
      "gumbel_mask_backward(Tensor grad, Tensor logits, Tensor weight, int seed, int offset, float tau, "
      "bool weight_grad) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The instruction set the CPU kernels run with (csrc/cpu/cpu_isa.h): "avx512", "avx2" or
  // "baseline"; OES_FAST_CPU_ISA forces one. And those this CPU can run.
  m.def("cpu_isa", [] { return std::string(oes_fast::cpu_isa_name(oes_fast::cpu_isa())); });
  m.def("cpu_isas_supported", &oes_fast::cpu_isas_supported);
  oes_fast::bind_generator_forward(m);
#ifdef OES_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("philox_uniform_cuda", &oes_fast::philox_uniform_cuda);
  m.def("gumbel_mask_cuda", &oes_fast::gumbel_mask_cuda);
  m.def("gumbel_mask_backward_cuda", &oes_fast::gumbel_mask_backward_cuda);
#else
  m.attr("with_cuda") = false;
#endif
}

namespace oes_fast {

// Tested on the bits: this file is compiled with -ffast-math, under which the compiler may
// assume no NaN/Inf and drop an isfinite() test.
bool is_positive_finite(double x) {
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const bool negative = bits >> 63;
  const bool inf_or_nan = ((bits >> 52) & 0x7ff) == 0x7ff;
  return !negative && !inf_or_nan && (bits << 1) != 0;
}

void check_gumbel_mask_inputs(const at::Tensor& logits, const at::Tensor& weight, int64_t seed, int64_t offset,
                              double tau) {
  TORCH_CHECK(logits.sizes() == weight.sizes(), "gumbel_mask: logits and weight must have the same shape, got ",
              logits.sizes(), " and ", weight.sizes());
  TORCH_CHECK(logits.scalar_type() == weight.scalar_type(), "gumbel_mask: logits and weight must have the same dtype, got ",
              logits.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(logits.device() == weight.device(), "gumbel_mask: logits and weight must be on the same device, got ",
              logits.device(), " and ", weight.device());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "gumbel_mask: dtype must be float32, float64 or bfloat16, got ", dtype);
  TORCH_CHECK(is_positive_finite(tau), "gumbel_mask: tau must be positive and finite, got ", tau);
  TORCH_CHECK(seed >= 0, "gumbel_mask: seed must be non-negative, got ", seed);
  TORCH_CHECK(offset >= 0 && offset <= INT64_MAX - logits.numel(),
              "gumbel_mask: offset must be non-negative and offset + numel must fit in int64, got ", offset);
}

}  // namespace oes_fast

TORCH_LIBRARY_FRAGMENT(oes_fast, m) {
  // (sum_j KL(Bernoulli(sigmoid(p_j)) || Bernoulli(density)), its gradient wrt p), one pass.
  m.def("kl_prior(Tensor logits, float density) -> (Tensor, Tensor)");
  // The logit side of a search step, in place: the logits' gradient (grad, times grad_scale
  // when given: the masked weights' gradient times gumbel_mask_with_slope's slope) + kl * the
  // prior's gradient, then Adam (step counted from 1). Returns the prior's value.
  m.def(
      "logit_adam_step_(Tensor(a!) logits, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor grad, "
      "Tensor? grad_scale, float density, float kl, float lr, float beta1, float beta2, float eps, int step) "
      "-> Tensor");
}
