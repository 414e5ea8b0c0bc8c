// Declarations shared by the op registration and the kernels of each backend.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace oes_fast {

// x > 0 and finite, robust to -ffast-math.
bool is_positive_finite(double x);

// Checks every op does before launching: same shape, dtype and device; a floating dtype
// among float32, float64, bfloat16; tau > 0; seed and offset non-negative.
void check_gumbel_mask_inputs(const at::Tensor& logits, const at::Tensor& weight, int64_t seed, int64_t offset,
                              double tau);

#ifdef OES_FAST_WITH_CUDA
at::Tensor philox_uniform_cuda(const at::Tensor& like, int64_t seed, int64_t offset);
at::Tensor gumbel_mask_cuda(const at::Tensor& logits, const at::Tensor& weight, int64_t seed, int64_t offset,
                            double tau);
std::tuple<at::Tensor, at::Tensor> gumbel_mask_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                             const at::Tensor& weight, int64_t seed, int64_t offset,
                                                             double tau, bool weight_grad);
#endif

}  // namespace oes_fast
