// CUDA kernels of philox_uniform, gumbel_mask and gumbel_mask_backward, and their host
// launchers (declared in ops.h, exposed as oes_fast._C.*_cuda and dispatched from
// oes_fast/ops.py). Same random stream as every backend (philox.h): element i uses
// philox_uniform(seed, offset + i). The noise is regenerated in the backward, never stored.
// bfloat16 computes in float32 (at::opmath_type), float64 in float64.
//
// Only c10/cuda headers are included (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS,
// cuSPARSE and cuSOLVER headers that a bare CUDA toolkit lacks); c10::cuda::getCurrentCUDAStream
// is the function at::cuda::getCurrentCUDAStream re-exports.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../ops.h"
#include "../philox.h"
#include "gumbel_sigmoid.cuh"

namespace oes_fast {
namespace {

constexpr int kThreads = 256;

// Grid-stride loops with 64-bit indices: tensors past 2^31 elements are fine, and the grid
// is capped at what the GPU holds resident at once (see launch_blocks).
__global__ void philox_uniform_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = philox_uniform(seed, offset + static_cast<uint64_t>(i));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gumbel_mask_forward_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ weight,
                                           scalar_t* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset,
                                           acc_t tau) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t m = gumbel_sigmoid<acc_t>(static_cast<acc_t>(logits[i]), seed, offset + static_cast<uint64_t>(i), tau);
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(weight[i]) * m);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gumbel_mask_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ logits,
                                            const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_logits,
                                            scalar_t* __restrict__ grad_weight, int64_t n, uint64_t seed,
                                            uint64_t offset, acc_t tau) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t g = static_cast<acc_t>(grad[i]);
    acc_t m_slope;  // m * (1 - m), evaluated as (e * m) * m
    const acc_t m =
        gumbel_sigmoid<acc_t>(static_cast<acc_t>(logits[i]), seed, offset + static_cast<uint64_t>(i), tau, m_slope);
    // d/dp [w * sigmoid((p + L) / tau)] = w * m * (1 - m) / tau
    grad_logits[i] = static_cast<scalar_t>(g * static_cast<acc_t>(weight[i]) * m_slope / tau);
    if (grad_weight != nullptr) grad_weight[i] = static_cast<scalar_t>(g * m);
  }
}

// Enough blocks to cover n, at most as many as the current device keeps resident (the
// grid-stride loop does the rest), so huge tensors do not launch millions of blocks.
unsigned int launch_blocks(int64_t n) {
  int device = 0, sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t resident = static_cast<int64_t>(sms) * std::max(threads_per_sm / kThreads, 1);
  const int64_t needed = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, resident)));
}

}  // namespace

at::Tensor philox_uniform_cuda(const at::Tensor& like, int64_t seed, int64_t offset) {
  TORCH_CHECK(like.is_cuda(), "philox_uniform_cuda: expected a CUDA tensor, got ", like.device());
  TORCH_CHECK(seed >= 0, "philox_uniform: seed must be non-negative, got ", seed);
  TORCH_CHECK(offset >= 0 && offset <= INT64_MAX - like.numel(),
              "philox_uniform: offset must be non-negative and offset + numel must fit in int64, got ", offset);
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = out.numel();
  if (n == 0) return out;  // a zero-block launch is an error
  philox_uniform_kernel<<<launch_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), n, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gumbel_mask_cuda(const at::Tensor& logits, const at::Tensor& weight, int64_t seed, int64_t offset,
                            double tau) {
  check_gumbel_mask_inputs(logits, weight, seed, offset, tau);
  TORCH_CHECK(logits.is_cuda(), "gumbel_mask_cuda: expected CUDA tensors, got ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor p = logits.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(p, at::MemoryFormat::Contiguous);
  const int64_t n = p.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "gumbel_mask_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gumbel_mask_forward_kernel<scalar_t, acc_t><<<launch_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, static_cast<uint64_t>(seed),
        static_cast<uint64_t>(offset), static_cast<acc_t>(tau));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gumbel_mask_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                             const at::Tensor& weight, int64_t seed, int64_t offset,
                                                             double tau, bool weight_grad) {
  check_gumbel_mask_inputs(logits, weight, seed, offset, tau);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
              "gumbel_mask_backward: grad must match logits in shape and dtype");
  TORCH_CHECK(grad.device() == logits.device(), "gumbel_mask_backward: grad must be on the device of logits, got ",
              grad.device(), " and ", logits.device());
  TORCH_CHECK(logits.is_cuda(), "gumbel_mask_backward_cuda: expected CUDA tensors, got ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g = grad.contiguous(), p = logits.contiguous(), w = weight.contiguous();
  at::Tensor grad_logits = at::empty_like(p, at::MemoryFormat::Contiguous);
  at::Tensor grad_weight = weight_grad ? at::empty_like(w, at::MemoryFormat::Contiguous) : at::empty({0}, p.options());
  const int64_t n = p.numel();
  if (n == 0) return {grad_logits, grad_weight};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "gumbel_mask_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gumbel_mask_backward_kernel<scalar_t, acc_t><<<launch_blocks(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), grad_logits.data_ptr<scalar_t>(),
        weight_grad ? grad_weight.data_ptr<scalar_t>() : nullptr, n, static_cast<uint64_t>(seed),
        static_cast<uint64_t>(offset), static_cast<acc_t>(tau));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_logits, grad_weight};
}

}  // namespace oes_fast
