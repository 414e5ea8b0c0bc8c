// Declarations shared by the sparse_conv2d schemas (csrc/sparse_conv2d.cpp) and the kernels of
// each backend (csrc/cpu/sparse_conv2d.cpp, csrc/cuda/sparse_conv2d.cu).
//
// Weight format: CSR over output channels. Row o holds the kept weights of output channel o;
// col_idx[k] = c * KH * KW + ky * KW + kx names the input channel and tap, values[k] the weight.
// row_ptr is int64 [C_out + 1], col_idx int32 [nnz], values [nnz] in the input's dtype.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace oes_fast {

struct SparseConvGeometry {
  int64_t N, C_in, H, W;         // input as the convolution sees it (after the upsampling)
  int64_t U, H_src, W_src;       // nearest-upsampling factor of the stored input, its size
  int64_t C_out, H_out, W_out;   // output
  int64_t KH, KW, SH, SW, PH, PW;
  bool reflect;                  // padding mode: true = reflection, false = zeros
  // Set only inside the CPU kernels (the phase form of a 2x-upsampled conv reads the stored
  // input with its border pixels repeated, what reflection of the upsampled input amounts to).
  bool replicate = false;
  int64_t nnz;
  // Set only by the CPU ops with an input prologue (sparse_conv2d_act_*): the conv reads
  // leaky_relu(x * act_scale[c] + act_shift[c], act_slope) of each stored input channel c, as
  // batch_norm_leaky_relu would store it, made while the input rows are loaded (float64
  // constants, C_in each); nullptr: x itself.
  const double* act_scale = nullptr;
  const double* act_shift = nullptr;
  double act_slope = 1.0;
  // With the prologue, optionally a second batch norm's apply after it (no activation): the conv
  // reads that value * post_scale[c] + post_shift[c], rounded again, as batch_norm_leaky_relu
  // with a slope of 1 would store it from the stored activation; nullptr: none.
  const double* post_scale = nullptr;
  const double* post_shift = nullptr;
};

// Validates shapes, dtypes, devices and index ranges; returns the geometry. `input_size` is the
// (N, C_in, H, W) of the stored input (for the input-gradient op the input is not passed); the
// convolution reads it nearest-upsampled by `upsample` (1: as is).
SparseConvGeometry sparse_conv2d_geometry(at::IntArrayRef input_size, const at::Tensor& values,
                                          const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding, const std::string& padding_mode,
                                          const at::Tensor& like, int64_t upsample = 1);

// For the C++ autograd (csrc/sparse_conv2d_autograd.cpp, csrc/batch_norm_act.cpp): a conv bias's
// gradient from the output's, and the conv's input gradient through the dispatcher
// (sparse_conv2d_input_grad, or with pool sparse_conv2d_pool_input_grad from the pooled output's
// gradient, which takes neither stride nor upsampling).
at::Tensor channel_sum(const at::Tensor& grad);
at::Tensor conv_input_grad(const at::Tensor& grad, const at::Tensor& values, const at::Tensor& row_ptr,
                           const at::Tensor& col_idx, c10::SymIntArrayRef input_size, at::IntArrayRef kernel,
                           at::IntArrayRef stride, at::IntArrayRef padding, c10::string_view mode, int64_t upsample,
                           bool pool);

}  // namespace oes_fast
