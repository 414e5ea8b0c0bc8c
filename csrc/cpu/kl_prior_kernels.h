// CPU kernel of kl_prior (the ATen side is kl_prior.cpp).
// Included once per instruction set by per_isa.h (from kl_prior.cpp): no includes, no
// include guard; everything in the copy's namespace with internal linkage.
#include "elementwise.h"

namespace oes_fast {
namespace OES_FAST_ISA_NS {
namespace {

template <typename scalar_t>
double kl_prior_cpu_kernel(const scalar_t* logits, scalar_t* grad, int64_t numel, double density) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t log_rho = static_cast<acc_t>(std::log(density));
  const acc_t log_one_minus_rho = static_cast<acc_t>(std::log1p(-density));
  // parallel_reduce: per-chunk sums in double, combined in a fixed order (deterministic)
  return at::parallel_reduce(
      0, numel, 32768, 0.0,
      [&](int64_t begin, int64_t end, double partial) {
        // locals, not the closure's members: gcc did not vectorize the loop in the target
        // regions of per_isa.h while it read them through the closure
        const acc_t lr = log_rho, lnr = log_one_minus_rho;
        const scalar_t* p = logits;
        scalar_t* g = grad;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = begin; i < end; ++i) {
          acc_t value, grad_i;
          kl_term<acc_t>(static_cast<acc_t>(p[i]), lr, lnr, value, grad_i);
          sum += static_cast<double>(value);
          g[i] = static_cast<scalar_t>(grad_i);
        }
        return partial + sum;
      },
      std::plus<double>());
}

}  // namespace
}  // namespace OES_FAST_ISA_NS
}  // namespace oes_fast
