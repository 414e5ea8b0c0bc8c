// CUDA kernels of sparse_conv2d, sparse_conv2d_input_grad and sparse_conv2d_weight_grad,
// registered for the CUDA dispatch key here (TORCH_LIBRARY_IMPL), so the Python side needs no
// pybind entry; oes_fast/ops.py registers the Triton kernels instead only when the extension
// was built without CUDA C++.
//
// Same design as kernels/sparse_conv2d.py: CSR over output channels (csrc/sparse_conv2d.h),
// padding applied on the load addresses.
// - forward: a thread per output pixel, a block per (pixel range, image * output channel); the
//   block stages its channel's taps in shared memory in chunks and every thread walks them
//   (consecutive threads read consecutive pixels of a row: coalesced), one writer per output;
// - input gradient: a gather per input pixel over the taps regrouped by input channel (CSC,
//   built with a stable sort on the device); under reflection an input pixel is also read
//   through the mirrored padded coordinates, so up to 3 x 3 candidate positions per tap;
// - weight gradient: a block per kept tap reduces over all images and output pixels with a
//   fixed tree, deterministic, no atomics.
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

#include "../sparse_conv2d.h"

namespace oes_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kTapChunk = 256;

struct Geo {
  int64_t N, C_in, H, W, C_out, H_out, W_out, H_src, W_src;
  int KH, KW, SH, SW, PH, PW, U;
  bool reflect;
};

Geo to_geo(const SparseConvGeometry& g) {
  return Geo{g.N, g.C_in, g.H, g.W, g.C_out, g.H_out, g.W_out, g.H_src, g.W_src, int(g.KH), int(g.KW), int(g.SH),
             int(g.SW), int(g.PH), int(g.PW), int(g.U), g.reflect};
}

__device__ __forceinline__ int64_t source_index(int64_t i, int64_t n, bool reflect) {
  if (reflect) {
    i = i < 0 ? -i : i;
    return i >= n ? 2 * (n - 1) - i : i;
  }
  return (i >= 0 && i < n) ? i : -1;
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ vals, const int64_t* __restrict__ rp,
                               const int32_t* __restrict__ ci, const T* __restrict__ bias, T* __restrict__ out, Geo g) {
  __shared__ int32_t s_col[kTapChunk];
  __shared__ T s_val[kTapChunk];
  const int64_t no = blockIdx.y;  // n * C_out + o
  const int64_t n = no / g.C_out, o = no % g.C_out;
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool live = p < g.H_out * g.W_out;
  const int64_t yo = live ? p / g.W_out : 0, xo = live ? p % g.W_out : 0;
  const int KK = g.KH * g.KW;
  T acc = bias != nullptr ? bias[o] : T(0);
  const T* x_img = x + n * g.C_in * g.H_src * g.W_src;
  const int64_t start = rp[o], end = rp[o + 1];
  for (int64_t base = start; base < end; base += kTapChunk) {
    const int64_t m = (end - base) < kTapChunk ? (end - base) : int64_t(kTapChunk);
    __syncthreads();
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
      s_col[j] = ci[base + j];
      s_val[j] = vals[base + j];
    }
    __syncthreads();
    if (live) {
      for (int64_t j = 0; j < m; ++j) {
        const int col = s_col[j], c = col / KK, r = col % KK;
        const int64_t iy = source_index(yo * g.SH + r / g.KW - g.PH, g.H, g.reflect);
        const int64_t ix = source_index(xo * g.SW + r % g.KW - g.PW, g.W, g.reflect);
        if (iy >= 0 && ix >= 0) acc += s_val[j] * x_img[(c * g.H_src + iy / g.U) * g.W_src + ix / g.U];
      }
    }
  }
  if (live) out[no * g.H_out * g.W_out + p] = acc;
}

// Candidate padded coordinates that read input coordinate i (see the file comment).
__device__ __forceinline__ int64_t candidate(int a, int64_t i, int64_t n, int P, bool reflect, bool* ok) {
  if (a == 0) {
    *ok = true;
    return i + P;
  }
  if (!reflect) {
    *ok = false;
    return 0;
  }
  if (a == 1) {
    *ok = i >= 1 && i <= P;
    return P - i;
  }
  *ok = i >= n - 1 - P && i <= n - 2;
  return 2 * (n - 1) - i + P;
}

template <typename T>
__global__ void input_grad_kernel(const T* __restrict__ gout, const T* __restrict__ t_w,
                                  const int64_t* __restrict__ cp, const int32_t* __restrict__ t_o,
                                  const int32_t* __restrict__ t_r, T* __restrict__ gin, Geo g) {
  const int64_t nc = blockIdx.y;  // n * C_in + c
  const int64_t n = nc / g.C_in, c = nc % g.C_in;
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= g.H * g.W) return;
  const int64_t i = p / g.W, j = p % g.W;
  const T* g_img = gout + n * g.C_out * g.H_out * g.W_out;
  T acc = 0;
  for (int64_t t = cp[c]; t < cp[c + 1]; ++t) {
    const int r = t_r[t], ky = r / g.KW, kx = r % g.KW;
    const T w = t_w[t];
    const T* plane = g_img + int64_t(t_o[t]) * g.H_out * g.W_out;
    for (int a = 0; a < 3; ++a) {
      bool ok_a;
      const int64_t ny = candidate(a, i, g.H, g.PH, g.reflect, &ok_a) - ky;
      if (!ok_a || ny < 0 || ny % g.SH || ny / g.SH >= g.H_out) continue;
      for (int b = 0; b < 3; ++b) {
        bool ok_b;
        const int64_t nx = candidate(b, j, g.W, g.PW, g.reflect, &ok_b) - kx;
        if (!ok_b || nx < 0 || nx % g.SW || nx / g.SW >= g.W_out) continue;
        acc += w * plane[(ny / g.SH) * g.W_out + nx / g.SW];
      }
    }
  }
  gin[nc * g.H * g.W + p] = acc;
}

template <typename T>
__global__ void weight_grad_kernel(const T* __restrict__ gout, const T* __restrict__ x,
                                   const int32_t* __restrict__ rowof, const int32_t* __restrict__ ci,
                                   T* __restrict__ gw, Geo g) {
  __shared__ T s_sum[kThreads];
  const int64_t k = blockIdx.x;
  const int64_t o = rowof[k];
  const int KK = g.KH * g.KW;
  const int col = ci[k], c = col / KK, r = col % KK, ky = r / g.KW, kx = r % g.KW;
  const int64_t HWo = g.H_out * g.W_out;
  T acc = 0;
  for (int64_t q = threadIdx.x; q < g.N * HWo; q += blockDim.x) {
    const int64_t n = q / HWo, p = q % HWo, yo = p / g.W_out, xo = p % g.W_out;
    const int64_t iy = source_index(yo * g.SH + ky - g.PH, g.H, g.reflect);
    const int64_t ix = source_index(xo * g.SW + kx - g.PW, g.W, g.reflect);
    if (iy >= 0 && ix >= 0) acc += gout[(n * g.C_out + o) * HWo + p] * x[((n * g.C_in + c) * g.H + iy) * g.W + ix];
  }
  s_sum[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) s_sum[threadIdx.x] += s_sum[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) gw[k] = s_sum[0];
}

std::string mode_string(c10::string_view s) { return std::string(s.data(), s.size()); }

at::Tensor sparse_conv2d_cuda(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                              c10::string_view padding_mode, int64_t upsample) {
  const auto g = sparse_conv2d_geometry(input.sizes(), values, row_ptr, col_idx, kernel_size, stride, padding,
                                        mode_string(padding_mode), input, upsample);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == g.C_out && bias->scalar_type() == input.scalar_type() &&
                    bias->device() == input.device(),
                "sparse_conv2d: bias must have C_out entries of the input's dtype and device");
    b = bias->contiguous();
  }
  const at::Tensor x = input.contiguous(), v = values.contiguous(), rp = row_ptr.contiguous(),
                   ci = col_idx.contiguous();
  at::Tensor out = at::empty({g.N, g.C_out, g.H_out, g.W_out}, input.options());
  if (out.numel() == 0) return out;
  const dim3 grid((g.H_out * g.W_out + kThreads - 1) / kThreads, g.N * g.C_out);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_cuda", [&] {
    forward_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(), ci.data_ptr<int32_t>(),
        b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), to_geo(g));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sparse_conv2d_input_grad_cuda(const at::Tensor& grad_output, const at::Tensor& values,
                                         const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                         at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         c10::string_view padding_mode, int64_t upsample) {
  TORCH_CHECK(upsample >= 1, "sparse_conv2d_input_grad: upsample must be >= 1, got ", upsample);
  if (upsample > 1) {  // the upsampled input's gradient, summed over each u x u block
    const int64_t n = input_size[0], c = input_size[1], h = input_size[2], w = input_size[3];
    const at::Tensor full = sparse_conv2d_input_grad_cuda(grad_output, values, row_ptr, col_idx,
                                                          {n, c, h * upsample, w * upsample}, kernel_size, stride,
                                                          padding, padding_mode, 1);
    return full.view({n, c, h, upsample, w, upsample}).sum({3, 5});
  }
  const auto g = sparse_conv2d_geometry(input_size, values, row_ptr, col_idx, kernel_size, stride, padding,
                                        mode_string(padding_mode), grad_output);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.N, g.C_out, g.H_out, g.W_out}),
              "sparse_conv2d_input_grad: grad_output must have the output's shape");
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const at::Tensor go = grad_output.contiguous();
  at::Tensor gin = at::empty({g.N, g.C_in, g.H, g.W}, go.options());
  if (gin.numel() == 0) return gin;
  // CSC: taps grouped by input channel; the stable sort fixes the summation order. Nothing here
  // waits for the device (repeat_interleave is told its size; searchsorted, not bincount), so
  // that a CUDA graph can capture the backward.
  const int64_t KK = g.KH * g.KW;
  // (the size as an optional: a plain int64_t would pick the overload that repeats each count nnz times)
  const at::Tensor rows =
      at::repeat_interleave(row_ptr.slice(0, 1) - row_ptr.slice(0, 0, g.C_out), std::optional<int64_t>(g.nnz));
  const at::Tensor col = col_idx.to(at::kLong);
  const auto [ch_sorted, order] = at::div(col, KK, "floor").sort(/*stable=*/true, 0, false);
  const at::Tensor cp = at::searchsorted(ch_sorted, at::arange(g.C_in + 1, row_ptr.options()));
  const at::Tensor t_o = rows.index_select(0, order).to(at::kInt).contiguous();
  const at::Tensor t_r = at::remainder(col, KK).index_select(0, order).to(at::kInt).contiguous();
  const at::Tensor t_w = values.index_select(0, order).contiguous();
  const dim3 grid((g.H * g.W + kThreads - 1) / kThreads, g.N * g.C_in);
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "sparse_conv2d_input_grad_cuda", [&] {
    input_grad_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        go.data_ptr<scalar_t>(), t_w.data_ptr<scalar_t>(), cp.data_ptr<int64_t>(), t_o.data_ptr<int32_t>(),
        t_r.data_ptr<int32_t>(), gin.data_ptr<scalar_t>(), to_geo(g));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gin;
}

at::Tensor sparse_conv2d_weight_grad_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding, c10::string_view padding_mode, int64_t upsample) {
  TORCH_CHECK(upsample >= 1, "sparse_conv2d_weight_grad: upsample must be >= 1, got ", upsample);
  if (upsample > 1) {  // the kernel reads the input as the convolution saw it: upsample it first
    return sparse_conv2d_weight_grad_cuda(
        grad_output, at::upsample_nearest2d(input, {input.size(2) * upsample, input.size(3) * upsample}), row_ptr,
        col_idx, kernel_size, stride, padding, padding_mode, 1);
  }
  const at::Tensor like_values = at::empty({col_idx.numel()}, input.options());
  const auto g = sparse_conv2d_geometry(input.sizes(), like_values, row_ptr, col_idx, kernel_size, stride, padding,
                                        mode_string(padding_mode), input);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.N, g.C_out, g.H_out, g.W_out}) &&
                  grad_output.scalar_type() == input.scalar_type(),
              "sparse_conv2d_weight_grad: grad_output must have the output's shape and the input's dtype");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor gw = at::zeros({g.nnz}, input.options());
  if (g.nnz == 0) return gw;
  const at::Tensor go = grad_output.contiguous(), x = input.contiguous(), ci = col_idx.contiguous();
  const at::Tensor rowof =  // told its size: no wait for the device (CUDA graphs)
      at::repeat_interleave(row_ptr.slice(0, 1) - row_ptr.slice(0, 0, g.C_out), std::optional<int64_t>(g.nnz))
          .to(at::kInt)
          .contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_weight_grad_cuda", [&] {
    weight_grad_kernel<scalar_t><<<g.nnz, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), rowof.data_ptr<int32_t>(), ci.data_ptr<int32_t>(),
        gw.data_ptr<scalar_t>(), to_geo(g));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(oes_fast, CUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_conv2d_input_grad", &sparse_conv2d_input_grad_cuda);
  m.impl("sparse_conv2d_weight_grad", &sparse_conv2d_weight_grad_cuda);
}

}  // namespace oes_fast
