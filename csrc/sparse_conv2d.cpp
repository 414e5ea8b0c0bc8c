// Declares the sparse_conv2d operators (schemas) and their shared argument checks.
// CPU kernels: csrc/cpu/sparse_conv2d.cpp; CUDA C++: csrc/cuda/sparse_conv2d.cu (registered
// there); autograd: csrc/sparse_conv2d_autograd.cpp; Triton and fake registrations: the
// sparse_conv2d block of oes_fast/ops.py.
#include <torch/library.h>

#include "sparse_conv2d.h"

TORCH_LIBRARY_FRAGMENT(oes_fast, m) {
  // 2-D cross-correlation (as F.conv2d) with CSR weights (see sparse_conv2d.h) and the padding
  // applied while reading ("reflect" or "zeros"), plus an optional bias. With upsample = u > 1
  // the input is read nearest-upsampled by u (F.interpolate(input, scale_factor=u) fused in).
  m.def(
      "sparse_conv2d(Tensor input, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? bias, "
      "int[2] kernel_size, int[2] stride, int[2] padding, str padding_mode, int upsample=1) -> Tensor");
  // Stride-1 forward that also returns the batch-norm statistics of its output: stats[o] =
  // (sum, sum of squares) over images and pixels, float64, accumulated in the epilogue while the
  // outputs are in registers (saves the statistics pass of a following batch norm). The
  // statistics carry no gradient: batch_norm_from_stats differentiates through them itself.
  m.def(
      "sparse_conv2d_stats(Tensor input, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? bias, "
      "int[2] kernel_size, int[2] padding, str padding_mode, int upsample=1) -> (Tensor, Tensor)");
  // Gradient w.r.t. the input (the transposed sparse convolution, reflection folded back).
  // input_size is the stored input's; with upsample = u > 1 the convolution read it
  // nearest-upsampled (as the forward's), and each stored pixel gets the sum of its u x u block.
  m.def(
      "sparse_conv2d_input_grad(Tensor grad_output, Tensor values, Tensor row_ptr, Tensor col_idx, "
      "SymInt[4] input_size, int[2] kernel_size, int[2] stride, int[2] padding, str padding_mode, "
      "int upsample=1) -> Tensor");
  // Gradient w.r.t. the kept weights only: one value per stored nonzero. `input` is the stored
  // input; with upsample = u > 1 the convolution read it nearest-upsampled, as the forward's.
  m.def(
      "sparse_conv2d_weight_grad(Tensor grad_output, Tensor input, Tensor row_ptr, Tensor col_idx, "
      "int[2] kernel_size, int[2] stride, int[2] padding, str padding_mode, int upsample=1) -> Tensor");
  // CPU: a stride-1 conv that keeps the size (odd kernel, padding (k - 1) / 2) followed by 2x2
  // average pooling (stride 2, an odd last row or column dropped), computed as one conv at the
  // pooled size: the conv at stride 2 of the input's 2x2 box mean (csrc/cpu/sparse_conv2d_kernels.h),
  // with the batch-norm statistics of the pooled output as sparse_conv2d_stats returns them. Its
  // weight and input gradients take the pooled output's gradient; input_size is the input's.
  m.def(
      "sparse_conv2d_pool_stats(Tensor input, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? bias, "
      "int[2] kernel_size, int[2] padding, str padding_mode) -> (Tensor, Tensor)");
  m.def(
      "sparse_conv2d_pool_weight_grad(Tensor grad_output, Tensor input, Tensor row_ptr, Tensor col_idx, "
      "int[2] kernel_size, int[2] padding, str padding_mode) -> Tensor");
  m.def(
      "sparse_conv2d_pool_input_grad(Tensor grad_output, Tensor values, Tensor row_ptr, Tensor col_idx, "
      "SymInt[4] input_size, int[2] kernel_size, int[2] padding, str padding_mode) -> Tensor");
  // CPU: sparse_conv2d_stats (pool = false) or sparse_conv2d_pool_stats (pool = true, upsample 1)
  // of batch_norm_leaky_relu(input, scale, shift, negative_slope) (scale, shift: (C_in,) float64),
  // the activation made while the conv loads its input rows, with the bits that op would store:
  // a batch norm's normalizing pass and the LeakyReLU after it fused into the next conv (no
  // activated tensor is written or read). With post_scale and post_shift ((C_in,) float64), the
  // conv reads batch_norm_leaky_relu(that, post_scale, post_shift, 1.0) instead: a second batch
  // norm's apply after the activation. Not differentiable; batch_norm_act_sparse_conv2d and
  // batch_norm_act_norm_sparse_conv2d are.
  m.def(
      "sparse_conv2d_act_stats(Tensor input, Tensor scale, Tensor shift, float negative_slope, Tensor values, "
      "Tensor row_ptr, Tensor col_idx, Tensor? bias, int[2] kernel_size, int[2] padding, str padding_mode, "
      "int upsample, bool pool, Tensor? post_scale=None, Tensor? post_shift=None) -> (Tensor, Tensor)");
  // Its weight gradient (sparse_conv2d_weight_grad or sparse_conv2d_pool_weight_grad of the
  // activated input, activated in the same way while loading).
  m.def(
      "sparse_conv2d_act_weight_grad(Tensor grad_output, Tensor input, Tensor scale, Tensor shift, "
      "float negative_slope, Tensor row_ptr, Tensor col_idx, int[2] kernel_size, int[2] padding, "
      "str padding_mode, int upsample, bool pool, Tensor? post_scale=None, Tensor? post_shift=None) -> Tensor");
}

namespace oes_fast {

SparseConvGeometry sparse_conv2d_geometry(at::IntArrayRef input_size, const at::Tensor& values,
                                          const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding, const std::string& padding_mode,
                                          const at::Tensor& like, int64_t upsample) {
  TORCH_CHECK(input_size.size() == 4, "sparse_conv2d: input must be 4-D (N, C, H, W), got ", input_size);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "sparse_conv2d: kernel_size, stride and padding take two values each");
  TORCH_CHECK(padding_mode == "reflect" || padding_mode == "zeros",
              "sparse_conv2d: padding_mode must be 'reflect' or 'zeros', got '", padding_mode, "'");
  const auto dtype = like.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "sparse_conv2d: dtype must be float32 or float64, got ",
              dtype);
  TORCH_CHECK(values.scalar_type() == dtype, "sparse_conv2d: values must have the input's dtype ", dtype, ", got ",
              values.scalar_type());
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong, "sparse_conv2d: row_ptr must be int64, got ", row_ptr.scalar_type());
  TORCH_CHECK(col_idx.scalar_type() == at::kInt, "sparse_conv2d: col_idx must be int32, got ", col_idx.scalar_type());
  TORCH_CHECK(values.dim() == 1 && col_idx.dim() == 1 && row_ptr.dim() == 1 && row_ptr.numel() >= 1,
              "sparse_conv2d: values, col_idx and row_ptr must be 1-D (row_ptr with C_out + 1 entries)");
  TORCH_CHECK(values.numel() == col_idx.numel(), "sparse_conv2d: values and col_idx must have the same length, got ",
              values.numel(), " and ", col_idx.numel());
  for (const auto* t : {&values, &row_ptr, &col_idx}) {
    TORCH_CHECK(t->device() == like.device(), "sparse_conv2d: all tensors must be on ", like.device(), ", got ",
                t->device());
  }
  TORCH_CHECK(upsample >= 1, "sparse_conv2d: upsample must be >= 1, got ", upsample);
  SparseConvGeometry g;
  g.N = input_size[0];
  g.C_in = input_size[1];
  g.U = upsample;
  g.H_src = input_size[2];
  g.W_src = input_size[3];
  g.H = g.H_src * upsample;
  g.W = g.W_src * upsample;
  g.KH = kernel_size[0];
  g.KW = kernel_size[1];
  g.SH = stride[0];
  g.SW = stride[1];
  g.PH = padding[0];
  g.PW = padding[1];
  g.reflect = padding_mode == "reflect";
  g.C_out = row_ptr.numel() - 1;
  g.nnz = values.numel();
  TORCH_CHECK(g.N >= 0 && g.C_in >= 0 && g.H > 0 && g.W > 0, "sparse_conv2d: bad input size ", input_size);
  TORCH_CHECK(g.KH > 0 && g.KW > 0 && g.SH > 0 && g.SW > 0 && g.PH >= 0 && g.PW >= 0,
              "sparse_conv2d: kernel_size and stride must be positive, padding non-negative");
  if (g.reflect) {
    TORCH_CHECK(g.PH < g.H && g.PW < g.W, "sparse_conv2d: reflection padding (", g.PH, ", ", g.PW,
                ") must be smaller than the input's sides (", g.H, ", ", g.W, ")");
  }
  TORCH_CHECK(g.H + 2 * g.PH >= g.KH && g.W + 2 * g.PW >= g.KW, "sparse_conv2d: kernel larger than padded input");
  TORCH_CHECK(g.C_in * g.KH * g.KW <= INT32_MAX, "sparse_conv2d: C_in * KH * KW must fit in int32");
  g.H_out = (g.H + 2 * g.PH - g.KH) / g.SH + 1;
  g.W_out = (g.W + 2 * g.PW - g.KW) / g.SW + 1;
  // Index ranges are checked on the host only (CPU tensors): a device-side check would sync.
  if (row_ptr.device().is_cpu()) {
    const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
    const int64_t* r = rp.data_ptr<int64_t>();
    TORCH_CHECK(r[0] == 0 && r[g.C_out] == g.nnz, "sparse_conv2d: row_ptr must start at 0 and end at nnz = ", g.nnz);
    for (int64_t o = 0; o < g.C_out; ++o) {
      TORCH_CHECK(r[o] <= r[o + 1], "sparse_conv2d: row_ptr must be non-decreasing");
    }
    const int32_t* c = ci.data_ptr<int32_t>();
    const int64_t limit = g.C_in * g.KH * g.KW;
    // the range first, in a loop the compiler vectorizes (a check per tap, with its message's
    // arguments: 32 us of each call on a 26,521-tap layer, 8.5 us this way); the offending entry
    // only on failure
    int32_t lo = 0, hi = 0;
    for (int64_t k = 0; k < g.nnz; ++k) {
      lo = std::min(lo, c[k]);
      hi = std::max(hi, c[k]);
    }
    if (lo < 0 || hi >= limit) {
      for (int64_t k = 0; k < g.nnz; ++k) {
        TORCH_CHECK(c[k] >= 0 && c[k] < limit, "sparse_conv2d: col_idx[", k, "] = ", c[k], " out of range [0, ",
                    limit, ")");
      }
    }
  }
  return g;
}

}  // namespace oes_fast
