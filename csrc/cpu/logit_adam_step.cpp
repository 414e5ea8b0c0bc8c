// CPU kernel of logit_adam_step_: the logit side of an OES search step in one pass over the
// flat parameter space. Given the gradient of the loss with respect to the masked weights and
// their slope in the logits (from gumbel_mask_with_slope), it applies the chain rule, adds the
// KL prior's gradient, and takes the Adam step on the logits in place, returning the prior's
// value. Unfused, this is gumbel_mask_backward, kl_prior, an add and torch.optim.Adam: about
// a dozen passes over 3M elements, several temporaries, and the noise generated twice.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "../ops.h"
#include "../philox.h"
#include "cpu_isa.h"

namespace oes_fast {
namespace {

constexpr int64_t kChunkTiles = 64;  // tiles per KL partial sum: fixed, so the sum does not depend on threads

struct AdamConstants {
  double lr, beta1, beta2, eps, step_size, bias2_sqrt;
};

}  // namespace
}  // namespace oes_fast

#define OES_FAST_KERNELS_FILE "logit_adam_step_kernels.h"
#include "per_isa.h"

namespace oes_fast {
namespace {

void check_like_logits(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.sizes() == logits.sizes() && t.scalar_type() == logits.scalar_type() && t.device() == logits.device(),
              "logit_adam_step_: ", name, " must match logits in shape, dtype and device");
}

void check_state(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  check_like_logits(t, logits, name);
  TORCH_CHECK(t.is_contiguous(), "logit_adam_step_: ", name, " must be contiguous (it is updated in place)");
}

at::Tensor logit_adam_step_cpu(at::Tensor& logits, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& grad,
                               const std::optional<at::Tensor>& grad_scale, double density, double kl, double lr,
                               double beta1, double beta2, double eps, int64_t step) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "logit_adam_step_: dtype must be float32, float64 or bfloat16, got ", dtype);
  check_state(logits, logits, "logits");
  check_state(exp_avg, logits, "exp_avg");
  check_state(exp_avg_sq, logits, "exp_avg_sq");
  check_like_logits(grad, logits, "grad");
  if (grad_scale.has_value()) check_like_logits(*grad_scale, logits, "grad_scale");
  TORCH_CHECK(is_positive_finite(density) && density < 1.0, "logit_adam_step_: density must be in (0, 1), got ",
              density);
  TORCH_CHECK(is_positive_finite(lr), "logit_adam_step_: lr must be positive and finite, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
              "logit_adam_step_: betas must be in [0, 1), got ", beta1, " and ", beta2);
  TORCH_CHECK(is_positive_finite(eps), "logit_adam_step_: eps must be positive and finite, got ", eps);
  TORCH_CHECK(step >= 1, "logit_adam_step_: step counts from 1, got ", step);
  const AdamConstants c{lr, beta1, beta2, eps, lr / (1.0 - std::pow(beta1, double(step))),
                        std::sqrt(1.0 - std::pow(beta2, double(step)))};
  const at::Tensor g = grad.contiguous();
  const at::Tensor scale = grad_scale.has_value() ? grad_scale->contiguous() : at::Tensor();
  double value = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "logit_adam_step_cpu", [&] {
    auto* kernel = OES_FAST_ISA_DISPATCH(logit_adam_step_kernel<scalar_t>);
    value = kernel(logits.data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(), exp_avg_sq.data_ptr<scalar_t>(),
                   g.data_ptr<scalar_t>(), scale.defined() ? scale.data_ptr<scalar_t>() : nullptr, logits.numel(),
                   density, kl, c);
  });
  return at::scalar_tensor(value, logits.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(oes_fast, CPU, m) { m.impl("logit_adam_step_", &logit_adam_step_cpu); }

}  // namespace oes_fast
