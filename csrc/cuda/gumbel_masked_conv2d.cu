// CUDA C++ kernels of gumbel_masked_conv2d (schemas in csrc/gumbel_masked_conv2d.cpp), registered
// for the CUDA key of the ops gumbel_masked_conv2d{,_backward}_cuda_impl, which the CUDA kernel
// of the public op calls when cuda_backend() == "cuda" (oes_fast/ops.py). Same random stream as
// every backend (philox.h): weight element j uses philox_uniform(seed, offset + j).
//
// Direct convolution with the masked weights staged in shared memory, never in global memory:
// - forward: a block owns 256 output pixels of one image x kCo output channels; for each chunk
//   of kCi input channels it forms the masked weights of the chunk in shared memory (each
//   weight's mask once per block: Philox amortized over 256 pixels), then every thread
//   accumulates its pixel for the kCo channels (one input load feeds kCo FMAs).
// - input grad: the same on the padded input's gradient (a block: 256 padded pixels x kCo
//   input channels, chunks of output channels), folded back by fold_reflect_padding below.
// - weight grad: a block per (c_out, c_in) pair and split of the pixels; each thread keeps the
//   k*k partial sums of its pixels, a block reduction, and the epilogue writes grad_logits =
//   dW * w * m (1 - m) / tau (m (1 - m) evaluated as (e * m) * m, gumbel_sigmoid.cuh;
//   grad_weight = dW * m when asked), atomically when split.
// No tensor cores: this is the portable, readable CUDA path; the Triton kernels are the
// implicit-GEMM ones (kernels/gumbel_masked_conv2d.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "../philox.h"
#include "gumbel_sigmoid.cuh"

namespace oes_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kCo = 8;  // channels per block (registers per thread)
constexpr int kCi = 8;  // reduction channels staged in shared memory per chunk

// padded coordinate (already shifted by -pad) -> input coordinate, or -1 outside (zeros)
__device__ __forceinline__ int src_index(int i, int n, bool reflect) {
  if (reflect) {
    i = i < 0 ? -i : i;
    return i >= n ? 2 * (n - 1) - i : i;
  }
  return (i >= 0 && i < n) ? i : -1;
}

// Stages a chunk of masked weights w * m in shared memory as wm[j][c][t] (j < kCo, c < kCi,
// t < ks*ks): j runs over output channels from co0 and c over input channels from ci0 when
// kCoIsRow (forward), the other way round for the input gradient; zero outside the tensor.
template <bool kCoIsRow, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_masked_weights(acc_t* wm, const scalar_t* __restrict__ weight,
                                                     const scalar_t* __restrict__ logits, int co0, int ci0, int C_out,
                                                     int C_in, int kk, uint64_t seed, uint64_t offset, acc_t tau) {
  const int64_t K = static_cast<int64_t>(C_in) * kk;
  for (int e = threadIdx.x; e < kCo * kCi * kk; e += kThreads) {
    const int j = e / (kCi * kk), c = (e / kk) % kCi, t = e % kk;
    const int co = co0 + (kCoIsRow ? j : c), ci = ci0 + (kCoIsRow ? c : j);
    acc_t v = acc_t(0);
    if (co < C_out && ci < C_in) {
      const int64_t idx = co * K + static_cast<int64_t>(ci) * kk + t;
      v = static_cast<acc_t>(weight[idx]) *
          gumbel_sigmoid<acc_t>(static_cast<acc_t>(logits[idx]), seed, offset + static_cast<uint64_t>(idx), tau);
    }
    wm[e] = v;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ logits,
                               const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                               scalar_t* __restrict__ out, int C_in, int H, int W, int C_out, int H_out, int W_out,
                               int ks, int pad, bool reflect, uint64_t seed, uint64_t offset, acc_t tau) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* wm = reinterpret_cast<acc_t*>(smem_raw);  // [kCo][kCi][ks*ks]
  const int kk = ks * ks;
  const int n = blockIdx.z;
  const int co0 = blockIdx.y * kCo;
  const int pix = blockIdx.x * kThreads + threadIdx.x;
  const bool live = pix < H_out * W_out;
  const int yo = live ? pix / W_out : 0, xo = live ? pix % W_out : 0;
  acc_t acc[kCo];
#pragma unroll
  for (int j = 0; j < kCo; ++j) acc[j] = acc_t(0);
  for (int ci0 = 0; ci0 < C_in; ci0 += kCi) {
    __syncthreads();  // the previous chunk's weights are no longer read
    stage_masked_weights</*kCoIsRow=*/true>(wm, weight, logits, co0, ci0, C_out, C_in, kk, seed, offset, tau);
    __syncthreads();
    if (!live) continue;
    const int c_end = min(kCi, C_in - ci0);
    for (int c = 0; c < c_end; ++c) {
      const scalar_t* plane = x + (static_cast<int64_t>(n) * C_in + ci0 + c) * H * W;
      for (int ky = 0; ky < ks; ++ky) {
        const int iy = src_index(yo + ky - pad, H, reflect);
        for (int kx = 0; kx < ks; ++kx) {
          const int ix = src_index(xo + kx - pad, W, reflect);
          if (iy < 0 || ix < 0) continue;
          const acc_t v = static_cast<acc_t>(plane[static_cast<int64_t>(iy) * W + ix]);
          const int t = (c * ks + ky) * ks + kx;
#pragma unroll
          for (int j = 0; j < kCo; ++j) acc[j] += v * wm[j * kCi * kk + t];
        }
      }
    }
  }
  if (!live) return;
#pragma unroll
  for (int j = 0; j < kCo; ++j) {
    const int co = co0 + j;
    if (co >= C_out) break;
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[co]) : acc_t(0);
    out[(static_cast<int64_t>(n) * C_out + co) * H_out * W_out + pix] = static_cast<scalar_t>(acc[j] + b);
  }
}

// gradient of the padded input: gpad[n, ci, yp, xp] = sum_{co, ky, kx} g[n, co, yp - ky, xp - kx] * Wm[co, ci, ky, kx]
template <typename scalar_t, typename acc_t>
__global__ void input_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ logits,
                                  const scalar_t* __restrict__ weight, scalar_t* __restrict__ gpad, int C_in,
                                  int C_out, int H_out, int W_out, int HP, int WP, int ks, uint64_t seed,
                                  uint64_t offset, acc_t tau) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* wm = reinterpret_cast<acc_t*>(smem_raw);  // [kCo input channels][kCi output channels][ks*ks]
  const int kk = ks * ks;
  const int n = blockIdx.z;
  const int ci0 = blockIdx.y * kCo;
  const int pix = blockIdx.x * kThreads + threadIdx.x;
  const bool live = pix < HP * WP;
  const int yp = live ? pix / WP : 0, xp = live ? pix % WP : 0;
  acc_t acc[kCo];
#pragma unroll
  for (int j = 0; j < kCo; ++j) acc[j] = acc_t(0);
  for (int co0 = 0; co0 < C_out; co0 += kCi) {
    __syncthreads();
    stage_masked_weights</*kCoIsRow=*/false>(wm, weight, logits, co0, ci0, C_out, C_in, kk, seed, offset, tau);
    __syncthreads();
    if (!live) continue;
    const int c_end = min(kCi, C_out - co0);
    for (int c = 0; c < c_end; ++c) {
      const scalar_t* plane = g + (static_cast<int64_t>(n) * C_out + co0 + c) * H_out * W_out;
      for (int ky = 0; ky < ks; ++ky) {
        const int oy = yp - ky;
        if (oy < 0 || oy >= H_out) continue;
        for (int kx = 0; kx < ks; ++kx) {
          const int ox = xp - kx;
          if (ox < 0 || ox >= W_out) continue;
          const acc_t v = static_cast<acc_t>(plane[static_cast<int64_t>(oy) * W_out + ox]);
          const int t = (c * ks + ky) * ks + kx;
#pragma unroll
          for (int j = 0; j < kCo; ++j) acc[j] += v * wm[j * kCi * kk + t];
        }
      }
    }
  }
  if (!live) return;
#pragma unroll
  for (int j = 0; j < kCo; ++j) {
    const int ci = ci0 + j;
    if (ci >= C_in) break;
    gpad[(static_cast<int64_t>(n) * C_in + ci) * HP * WP + pix] = static_cast<scalar_t>(acc[j]);
  }
}

// dW[co, ci, :, :] over the pixels of split blockIdx.y, then the epilogue into grad_logits / grad_weight
template <typename scalar_t, typename acc_t, int KS>
__global__ void weight_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ logits, const scalar_t* __restrict__ weight,
                                   scalar_t* __restrict__ grad_logits, scalar_t* __restrict__ grad_weight, int N,
                                   int C_in, int H, int W, int C_out, int H_out, int W_out, int pad, bool reflect,
                                   int64_t rows_per_split, bool atomic, uint64_t seed, uint64_t offset, acc_t tau) {
  constexpr int kk = KS * KS;
  __shared__ acc_t partial[kThreads / 32][kk];
  const int co = blockIdx.x / C_in, ci = blockIdx.x % C_in;
  const int64_t R = static_cast<int64_t>(N) * H_out * W_out;
  const int64_t r_begin = blockIdx.y * rows_per_split;
  const int64_t r_end = min(R, r_begin + rows_per_split);
  acc_t acc[kk];
#pragma unroll
  for (int t = 0; t < kk; ++t) acc[t] = acc_t(0);
  for (int64_t r = r_begin + threadIdx.x; r < r_end; r += kThreads) {
    const int64_t n = r / (H_out * W_out);
    const int pix = static_cast<int>(r % (H_out * W_out));
    const int yo = pix / W_out, xo = pix % W_out;
    const acc_t gv = static_cast<acc_t>(g[(n * C_out + co) * H_out * W_out + pix]);
    const scalar_t* plane = x + (n * C_in + ci) * H * W;
#pragma unroll
    for (int ky = 0; ky < KS; ++ky) {
      const int iy = src_index(yo + ky - pad, H, reflect);
#pragma unroll
      for (int kx = 0; kx < KS; ++kx) {
        const int ix = src_index(xo + kx - pad, W, reflect);
        if (iy >= 0 && ix >= 0) acc[ky * KS + kx] += gv * static_cast<acc_t>(plane[static_cast<int64_t>(iy) * W + ix]);
      }
    }
  }
  // block reduction: warp shuffles, then one value per warp through shared memory
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int t = 0; t < kk; ++t) {
    acc_t v = acc[t];
    for (int s = 16; s > 0; s /= 2) v += __shfl_down_sync(0xffffffffu, v, s);
    if (lane == 0) partial[warp][t] = v;
  }
  __syncthreads();
  if (threadIdx.x >= kk) return;
  const int t = threadIdx.x;
  acc_t dw = acc_t(0);
  for (int w = 0; w < kThreads / 32; ++w) dw += partial[w][t];
  const int64_t idx = (static_cast<int64_t>(co) * C_in + ci) * kk + t;
  acc_t m_slope;  // m * (1 - m), evaluated as (e * m) * m
  const acc_t m = gumbel_sigmoid<acc_t>(static_cast<acc_t>(logits[idx]), seed, offset + static_cast<uint64_t>(idx),
                                        tau, m_slope);
  // linear in dw, so the splits' scaled partial sums add up to the full epilogue
  const acc_t gl = dw * static_cast<acc_t>(weight[idx]) * m_slope / tau;
  if (atomic) {
    atomicAdd(grad_logits + idx, static_cast<scalar_t>(gl));
    if (grad_weight != nullptr) atomicAdd(grad_weight + idx, static_cast<scalar_t>(dw * m));
  } else {
    grad_logits[idx] = static_cast<scalar_t>(gl);
    if (grad_weight != nullptr) grad_weight[idx] = static_cast<scalar_t>(dw * m);
  }
}

struct Geometry {
  int N, C_in, H, W, C_out, ks, H_out, W_out, pad;
  bool reflect;
};

Geometry check(const char* op, const at::Tensor& input, const at::Tensor& logits, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, int64_t seed, int64_t offset, double tau, int64_t padding,
               const std::string& padding_mode) {
  TORCH_CHECK(input.is_cuda(), op, ": expected CUDA tensors, got ", input.device());
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, op, ": input and weight must be 4-D");
  TORCH_CHECK(logits.sizes() == weight.sizes(), op, ": logits and weight must have the same shape");
  TORCH_CHECK(weight.size(2) == weight.size(3) && weight.size(1) == input.size(1), op,
              ": weight must be [C_out, C_in, k, k] with the input's C_in");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": dtype must be float32 or float64");
  for (const at::Tensor* t : {&logits, &weight}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->device() == input.device(), op,
                ": all tensors must share the input's dtype and device");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->device() == input.device() && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0),
                op, ": bias must be [C_out] with the input's dtype and device");
  }
  TORCH_CHECK(padding_mode == "reflect" || padding_mode == "zeros", op,
              ": padding_mode must be 'reflect' or 'zeros', got '", padding_mode, "'");
  TORCH_CHECK(tau > 0 && tau < 1e300, op, ": tau must be positive and finite");
  TORCH_CHECK(seed >= 0 && offset >= 0 && offset <= INT64_MAX - weight.numel(), op,
              ": seed and offset must be non-negative and offset + numel must fit in int64");
  Geometry g{};
  g.N = input.size(0);
  g.C_in = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.C_out = weight.size(0);
  g.ks = weight.size(2);
  g.pad = padding;
  g.reflect = padding_mode == "reflect";
  TORCH_CHECK(padding >= 0 && (!g.reflect || padding == 0 || padding < std::min(g.H, g.W)), op,
              ": padding must be in [0, min(H, W)) for reflection");
  TORCH_CHECK(g.ks % 2 == 1 && g.ks <= 7, op, ": the CUDA C++ kernels take odd kernel sizes up to 7, got ", g.ks);
  g.H_out = g.H + 2 * g.pad - g.ks + 1;
  g.W_out = g.W + 2 * g.pad - g.ks + 1;
  TORCH_CHECK(g.H_out > 0 && g.W_out > 0, op, ": kernel larger than the padded input");
  return g;
}

// The adjoint of reflect padding by `pad` on the last two dims: each mirrored border of the padded
// gradient added back onto the pixels it was read from, with slices and in-place adds, one dim
// after the other, so the result is the same to the bit on every run (aten's CUDA
// reflection_pad2d_backward adds with atomics, in a varying order). As the Triton path's
// kernels/gumbel_masked_conv2d.py fold_reflect_padding.
at::Tensor fold_reflect_padding(const at::Tensor& grad_padded, int64_t pad) {
  auto fold = [pad](const at::Tensor& g, int64_t dim) {
    const int64_t n = g.size(dim) - 2 * pad;
    at::Tensor out = g.narrow(dim, pad, n).clone();
    out.narrow(dim, 1, pad).add_(g.narrow(dim, 0, pad).flip({dim}));             // padded i < pad: from pad - i
    out.narrow(dim, n - 1 - pad, pad).add_(g.narrow(dim, n + pad, pad).flip({dim}));  // n + pad + j: from n - 2 - j
    return out;
  };
  return fold(fold(grad_padded, 2), 3);
}

template <typename acc_t>
size_t stage_bytes(int ks) {
  return static_cast<size_t>(kCo) * kCi * ks * ks * sizeof(acc_t);
}

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& logits, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, int64_t seed, int64_t offset, double tau,
                        int64_t padding, std::string padding_mode) {
  const Geometry g = check("gumbel_masked_conv2d", input, logits, weight, bias, seed, offset, tau, padding, padding_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), p = logits.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.N, g.C_out, g.H_out, g.W_out}, x.options());
  if (out.numel() == 0) return out;
  const dim3 grid((g.H_out * g.W_out + kThreads - 1) / kThreads, (g.C_out + kCo - 1) / kCo, g.N);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gumbel_masked_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<grid, kThreads, stage_bytes<acc_t>(g.ks), c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
        b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), g.C_in, g.H, g.W, g.C_out, g.H_out,
        g.W_out, g.ks, g.pad, g.reflect, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
        static_cast<acc_t>(tau));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t, typename acc_t, int KS>
void launch_weight_grad(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& p, const at::Tensor& w,
                        at::Tensor& gl, at::Tensor* gw, const Geometry& g, int splits, int64_t rows_per_split,
                        int64_t seed, int64_t offset, double tau) {
  weight_grad_kernel<scalar_t, acc_t, KS>
      <<<dim3(g.C_out * g.C_in, splits), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gout.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
          gl.data_ptr<scalar_t>(), gw != nullptr ? gw->data_ptr<scalar_t>() : nullptr, g.N, g.C_in, g.H, g.W, g.C_out,
          g.H_out, g.W_out, g.pad, g.reflect, rows_per_split, splits > 1, static_cast<uint64_t>(seed),
          static_cast<uint64_t>(offset), static_cast<acc_t>(tau));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& logits, const at::Tensor& weight,
    int64_t seed, int64_t offset, double tau, int64_t padding, std::string padding_mode,
    std::array<bool, 4> output_mask) {
  const Geometry g = check("gumbel_masked_conv2d_backward", input, logits, weight, std::nullopt, seed, offset, tau,
                           padding, padding_mode);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.N && grad_output.size(1) == g.C_out &&
                  grad_output.size(2) == g.H_out && grad_output.size(3) == g.W_out &&
                  grad_output.scalar_type() == input.scalar_type() && grad_output.device() == input.device(),
              "gumbel_masked_conv2d_backward: grad_output must be [N, C_out, H_out, W_out] like the output");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor gout = grad_output.contiguous(), x = input.contiguous(), p = logits.contiguous(),
                   w = weight.contiguous();
  const at::Tensor empty = at::empty({0}, x.options());
  at::Tensor grad_input = empty, grad_logits = empty, grad_weight = empty, grad_bias = empty;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (output_mask[0]) {
    const int HP = g.H + 2 * g.pad, WP = g.W + 2 * g.pad;
    at::Tensor gpad = at::zeros({g.N, g.C_in, HP, WP}, x.options());
    if (gpad.numel() > 0 && g.C_out > 0) {
      const dim3 grid((HP * WP + kThreads - 1) / kThreads, (g.C_in + kCo - 1) / kCo, g.N);
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gumbel_masked_conv2d_input_grad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        input_grad_kernel<scalar_t, acc_t><<<grid, kThreads, stage_bytes<acc_t>(g.ks), stream>>>(
            gout.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), gpad.data_ptr<scalar_t>(),
            g.C_in, g.C_out, g.H_out, g.W_out, HP, WP, g.ks, static_cast<uint64_t>(seed),
            static_cast<uint64_t>(offset), static_cast<acc_t>(tau));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (g.pad == 0) {
      grad_input = gpad;
    } else if (g.reflect) {
      grad_input = fold_reflect_padding(gpad, g.pad);
    } else {
      grad_input = gpad.slice(2, g.pad, g.pad + g.H).slice(3, g.pad, g.pad + g.W).contiguous();
    }
  }
  if (output_mask[1] || output_mask[2]) {
    const int64_t rows = static_cast<int64_t>(g.N) * g.H_out * g.W_out;
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    // enough blocks for ~8 per SM, each with at least 8192 pixels to reduce
    const int64_t pairs = std::max<int64_t>(1, static_cast<int64_t>(g.C_out) * g.C_in);
    int splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((8LL * sms + pairs - 1) / pairs, rows / 8192)));
    const int64_t rows_per_split = std::max<int64_t>(1, (rows + splits - 1) / splits);
    splits = static_cast<int>(std::max<int64_t>(1, (rows + rows_per_split - 1) / rows_per_split));
    at::Tensor gl = at::zeros_like(w), gw = output_mask[2] ? at::zeros_like(w) : empty;
    if (w.numel() > 0 && rows > 0) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gumbel_masked_conv2d_weight_grad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor* gwp = output_mask[2] ? &gw : nullptr;
        switch (g.ks) {
          case 1: launch_weight_grad<scalar_t, acc_t, 1>(gout, x, p, w, gl, gwp, g, splits, rows_per_split, seed, offset, tau); break;
          case 3: launch_weight_grad<scalar_t, acc_t, 3>(gout, x, p, w, gl, gwp, g, splits, rows_per_split, seed, offset, tau); break;
          case 5: launch_weight_grad<scalar_t, acc_t, 5>(gout, x, p, w, gl, gwp, g, splits, rows_per_split, seed, offset, tau); break;
          default: launch_weight_grad<scalar_t, acc_t, 7>(gout, x, p, w, gl, gwp, g, splits, rows_per_split, seed, offset, tau); break;
        }
      });
    }
    if (output_mask[1]) grad_logits = gl;
    grad_weight = gw;
  }
  if (output_mask[3]) grad_bias = gout.sum({0, 2, 3});
  return {grad_input, grad_logits, grad_weight, grad_bias};
}

}  // namespace
}  // namespace oes_fast

TORCH_LIBRARY_IMPL(oes_fast, CUDA, m) {
  m.impl("gumbel_masked_conv2d_cuda_impl", &oes_fast::forward_cuda);
  m.impl("gumbel_masked_conv2d_backward_cuda_impl", &oes_fast::backward_cuda);
}
