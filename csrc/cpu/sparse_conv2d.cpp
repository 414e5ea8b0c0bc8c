// CPU kernels of sparse_conv2d, sparse_conv2d_input_grad and sparse_conv2d_weight_grad.
//
// Weights are CSR over output channels (csrc/sparse_conv2d.h). The forward gathers: a task owns
// (image, row tile, group of output channels), so it writes its output rows alone. It loads the
// tile's input rows, padded, into a cache-sized halo buffer (the padding is fused into this
// load; no padded tensor is materialized), then for each output channel walks its kept taps:
// every tap is one multiply-add of a shifted halo row into output rows held in registers
// (a block of up to 4 vectors, or 4 rows of one vector for narrow images), one load per
// multiply-add, no scalar border path.
//
// The kernels themselves are in sparse_conv2d_kernels.h, compiled here three times (per_isa.h):
// at the baseline flags of the build, for AVX2+FMA and for AVX-512; cpu_isa() chooses the copy
// at run time. This file holds the argument handling (ATen) and the registration, compiled at
// the baseline flags. Every header any copy needs is included before per_isa.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/upsample_nearest2d.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../sparse_conv2d.h"
#include "cpu_isa.h"
#include "structure_cache.h"  // (the kernels keep their structure plans there)

#define OES_FAST_KERNELS_FILE "sparse_conv2d_kernels.h"
#include "per_isa.h"

namespace oes_fast {
namespace {

std::string mode_string(c10::string_view s) { return std::string(s.data(), s.size()); }

// The bias as the kernels take it: contiguous, or undefined for none.
at::Tensor checked_bias(const char* op, const std::optional<at::Tensor>& bias, const SparseConvGeometry& g,
                        const at::Tensor& input) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->numel() == g.C_out && bias->scalar_type() == input.scalar_type() &&
                  bias->device() == input.device(),
              op, ": bias must be 1-D with C_out = ", g.C_out, " entries of the input's dtype and device");
  return bias->contiguous();
}

// The forward with the batch-norm statistics of its output (sparse_conv2d_stats), or of the
// pooled output with the conv and the 2x2 average pooling as one conv (sparse_conv2d_pool_stats).
std::tuple<at::Tensor, at::Tensor> forward_with_stats(const char* op, const at::Tensor& input, const at::Tensor& values,
                                                      const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                      const std::optional<at::Tensor>& bias,
                                                      const SparseConvGeometry& g, bool pooled) {
  const at::Tensor b = checked_bias(op, bias, g, input);
  const at::Tensor x = input.contiguous(), v = values.contiguous(), rp = row_ptr.contiguous(),
                   ci = col_idx.contiguous();
  const int64_t h = pooled ? g.H_out / 2 : g.H_out, w = pooled ? g.W_out / 2 : g.W_out;
  at::Tensor out = at::empty({g.N, g.C_out, h, w}, input.options());
  at::Tensor stats = at::zeros({g.C_out, 2}, input.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_forward_with_stats", [&] {
    auto* kernel = pooled ? OES_FAST_ISA_DISPATCH(forward_pool<scalar_t>) : OES_FAST_ISA_DISPATCH(forward<scalar_t>);
    kernel(x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(), ci.data_ptr<int32_t>(),
           b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), g, stats.data_ptr<double>());
  });
  return {out, stats};
}

// grad_output has the output's shape, or the pooled output's (the sparse_conv2d_pool_* ops).
void check_grad_output_shape(const char* op, const at::Tensor& grad_output, const SparseConvGeometry& g, bool pooled) {
  const int64_t h = pooled ? g.H_out / 2 : g.H_out, w = pooled ? g.W_out / 2 : g.W_out;
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.N, g.C_out, h, w}), op, ": grad_output must have the ",
              pooled ? "pooled " : "", "output's shape (", g.N, ", ", g.C_out, ", ", h, ", ", w, "), got ",
              grad_output.sizes());
}

// The weight gradient at the kept taps with grad_output checked against the output
// (sparse_conv2d_weight_grad), or against the pooled output (sparse_conv2d_pool_weight_grad).
at::Tensor weight_grad_checked(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx, const SparseConvGeometry& g,
                               bool pooled) {
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() && grad_output.device() == input.device(), op,
              ": grad_output must match the input's dtype and device");
  check_grad_output_shape(op, grad_output, g, pooled);
  const at::Tensor go = grad_output.contiguous(), x = input.contiguous(), rp = row_ptr.contiguous(),
                   ci = col_idx.contiguous();
  at::Tensor gw = at::zeros({g.nnz}, input.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_weight_grad_checked", [&] {
    auto* kernel =
        pooled ? OES_FAST_ISA_DISPATCH(weight_grad_pool<scalar_t>) : OES_FAST_ISA_DISPATCH(weight_grad<scalar_t>);
    kernel(go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(), ci.data_ptr<int32_t>(),
           gw.data_ptr<scalar_t>(), g);
  });
  return gw;
}

// The input gradient with grad_output checked against the output (sparse_conv2d_input_grad), or
// against the pooled output (sparse_conv2d_pool_input_grad).
at::Tensor input_grad_checked(const char* op, const at::Tensor& grad_output, const at::Tensor& values,
                              const at::Tensor& row_ptr, const at::Tensor& col_idx, const SparseConvGeometry& g,
                              bool pooled) {
  check_grad_output_shape(op, grad_output, g, pooled);
  const at::Tensor go = grad_output.contiguous(), v = values.contiguous(), rp = row_ptr.contiguous(),
                   ci = col_idx.contiguous();
  at::Tensor gin = at::empty({g.N, g.C_in, g.H_src, g.W_src}, grad_output.options());
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "sparse_conv2d_input_grad_checked", [&] {
    auto* kernel =
        pooled ? OES_FAST_ISA_DISPATCH(input_grad_pool<scalar_t>) : OES_FAST_ISA_DISPATCH(input_grad<scalar_t>);
    kernel(go.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(), ci.data_ptr<int32_t>(),
           gin.data_ptr<scalar_t>(), g);
  });
  return gin;
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                             c10::string_view padding_mode, int64_t upsample) {
  const auto g = sparse_conv2d_geometry(input.sizes(), values, row_ptr, col_idx, kernel_size, stride, padding,
                                        mode_string(padding_mode), input, upsample);
  const at::Tensor b = checked_bias("sparse_conv2d", bias, g, input);
  const at::Tensor x = input.contiguous(), v = values.contiguous(), rp = row_ptr.contiguous(),
                   ci = col_idx.contiguous();
  at::Tensor out = at::empty({g.N, g.C_out, g.H_out, g.W_out}, input.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_cpu", [&] {
    auto* kernel = OES_FAST_ISA_DISPATCH(forward<scalar_t>);
    kernel(x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(), ci.data_ptr<int32_t>(),
           b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), g, nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_conv2d_stats_cpu(const at::Tensor& input, const at::Tensor& values,
                                                           const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                           const std::optional<at::Tensor>& bias,
                                                           at::IntArrayRef kernel_size, at::IntArrayRef padding,
                                                           c10::string_view padding_mode, int64_t upsample) {
  const auto g = sparse_conv2d_geometry(input.sizes(), values, row_ptr, col_idx, kernel_size, {1, 1}, padding,
                                        mode_string(padding_mode), input, upsample);
  return forward_with_stats("sparse_conv2d_stats", input, values, row_ptr, col_idx, bias, g, false);
}

at::Tensor sparse_conv2d_input_grad_cpu(const at::Tensor& grad_output, const at::Tensor& values,
                                        const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                        at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        c10::string_view padding_mode, int64_t upsample) {
  const auto g = sparse_conv2d_geometry(input_size, values, row_ptr, col_idx, kernel_size, stride, padding,
                                        mode_string(padding_mode), grad_output, upsample);
  // The stride-1 kernel folds the u x u blocks while it folds the padding back; the strided one
  // computes the upsampled input's gradient, summed over the blocks here.
  if (g.U > 1 && (g.SH != 1 || g.SW != 1)) {
    const at::Tensor full = sparse_conv2d_input_grad_cpu(grad_output, values, row_ptr, col_idx,
                                                         {g.N, g.C_in, g.H, g.W}, kernel_size, stride, padding,
                                                         padding_mode, 1);
    return full.view({g.N, g.C_in, g.H_src, g.U, g.W_src, g.U}).sum({3, 5});
  }
  return input_grad_checked("sparse_conv2d_input_grad", grad_output, values, row_ptr, col_idx, g, false);
}

at::Tensor sparse_conv2d_weight_grad_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                         const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                         c10::string_view padding_mode, int64_t upsample) {
  // values are not needed, only their count and dtype: an empty-strided stand-in is enough.
  const at::Tensor like_values = at::empty({col_idx.numel()}, input.options());
  const auto g = sparse_conv2d_geometry(input.sizes(), like_values, row_ptr, col_idx, kernel_size, stride, padding,
                                        mode_string(padding_mode), input, upsample);
  // The stride-1 kernel reads the upsampling in its halo load (as the forward); the strided
  // one reads the input directly, so it gets the upsampled copy.
  if (g.U > 1 && (g.SH != 1 || g.SW != 1)) {
    return sparse_conv2d_weight_grad_cpu(grad_output, at::upsample_nearest2d(input, {g.H, g.W}), row_ptr, col_idx,
                                         kernel_size, stride, padding, padding_mode, 1);
  }
  return weight_grad_checked("sparse_conv2d_weight_grad", grad_output, input, row_ptr, col_idx, g, false);
}

// The conv that sparse_conv2d_pool_stats pools: stride 1, an odd kernel, the size kept.
SparseConvGeometry pooled_conv_geometry(const char* op, at::IntArrayRef input_size, const at::Tensor& values,
                                        const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                        at::IntArrayRef kernel_size, at::IntArrayRef padding,
                                        c10::string_view padding_mode, const at::Tensor& like) {
  const auto g = sparse_conv2d_geometry(input_size, values, row_ptr, col_idx, kernel_size, {1, 1}, padding,
                                        mode_string(padding_mode), like, 1);
  TORCH_CHECK(g.KH % 2 == 1 && g.KW % 2 == 1 && g.PH == (g.KH - 1) / 2 && g.PW == (g.KW - 1) / 2, op,
              ": needs an odd kernel with padding (k - 1) / 2 (a conv that keeps the size), got kernel ",
              kernel_size, " and padding ", padding);
  TORCH_CHECK(g.H_out >= 2 && g.W_out >= 2, op, ": the input must be at least 2x2 to pool, got ", input_size);
  return g;
}

std::tuple<at::Tensor, at::Tensor> sparse_conv2d_pool_stats_cpu(const at::Tensor& input, const at::Tensor& values,
                                                                const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                                const std::optional<at::Tensor>& bias,
                                                                at::IntArrayRef kernel_size, at::IntArrayRef padding,
                                                                c10::string_view padding_mode) {
  const auto g = pooled_conv_geometry("sparse_conv2d_pool_stats", input.sizes(), values, row_ptr, col_idx,
                                      kernel_size, padding, padding_mode, input);
  return forward_with_stats("sparse_conv2d_pool_stats", input, values, row_ptr, col_idx, bias, g, true);
}

at::Tensor sparse_conv2d_pool_weight_grad_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                              const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                              at::IntArrayRef kernel_size, at::IntArrayRef padding,
                                              c10::string_view padding_mode) {
  const at::Tensor like_values = at::empty({col_idx.numel()}, input.options());
  const auto g = pooled_conv_geometry("sparse_conv2d_pool_weight_grad", input.sizes(), like_values, row_ptr,
                                      col_idx, kernel_size, padding, padding_mode, input);
  return weight_grad_checked("sparse_conv2d_pool_weight_grad", grad_output, input, row_ptr, col_idx, g, true);
}

at::Tensor sparse_conv2d_pool_input_grad_cpu(const at::Tensor& grad_output, const at::Tensor& values,
                                             const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                             at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                             at::IntArrayRef padding, c10::string_view padding_mode) {
  const auto g = pooled_conv_geometry("sparse_conv2d_pool_input_grad", input_size, values, row_ptr, col_idx,
                                      kernel_size, padding, padding_mode, grad_output);
  return input_grad_checked("sparse_conv2d_pool_input_grad", grad_output, values, row_ptr, col_idx, g, true);
}

// The geometry of a sparse_conv2d_act_* op: the stride-1 conv (or its pooled form) of the
// activated input, with its prologue's constants, checked. `values` may be a stand-in of the
// right length and dtype (the weight gradient has none).
SparseConvGeometry act_geometry(const char* op, const at::Tensor& input, const at::Tensor& values,
                                const at::Tensor& row_ptr, const at::Tensor& col_idx, at::IntArrayRef kernel_size,
                                at::IntArrayRef padding, c10::string_view padding_mode, int64_t upsample, bool pool,
                                const at::Tensor& scale, const at::Tensor& shift, double negative_slope,
                                const std::optional<at::Tensor>& post_scale,
                                const std::optional<at::Tensor>& post_shift) {
  TORCH_CHECK(!pool || upsample == 1, op, ": pool takes no upsampling, got upsample = ", upsample);
  SparseConvGeometry g = pool ? pooled_conv_geometry(op, input.sizes(), values, row_ptr, col_idx, kernel_size,
                                                     padding, padding_mode, input)
                              : sparse_conv2d_geometry(input.sizes(), values, row_ptr, col_idx, kernel_size, {1, 1},
                                                       padding, mode_string(padding_mode), input, upsample);
  const bool post = post_scale.has_value() && post_scale->defined();
  TORCH_CHECK(post == (post_shift.has_value() && post_shift->defined()), op,
              ": post_scale and post_shift are given together or not at all");
  std::vector<const at::Tensor*> constants{&scale, &shift};
  if (post) constants.insert(constants.end(), {&*post_scale, &*post_shift});
  for (const auto* t : constants) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == g.C_in && t->scalar_type() == at::kDouble &&
                    t->device() == input.device() && t->is_contiguous(),
                op, ": scale and shift (and post_scale, post_shift) must be contiguous float64 vectors of C_in = ",
                g.C_in, " entries on ", input.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ",
                t->device());
  }
  g.act_scale = scale.data_ptr<double>();
  g.act_shift = shift.data_ptr<double>();
  g.act_slope = negative_slope;
  if (post) {
    g.post_scale = post_scale->data_ptr<double>();
    g.post_shift = post_shift->data_ptr<double>();
  }
  return g;
}

std::tuple<at::Tensor, at::Tensor> sparse_conv2d_act_stats_cpu(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift, double negative_slope,
    const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
    const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef padding,
    c10::string_view padding_mode, int64_t upsample, bool pool, const std::optional<at::Tensor>& post_scale,
    const std::optional<at::Tensor>& post_shift) {
  const char* op = "sparse_conv2d_act_stats";
  const auto g = act_geometry(op, input, values, row_ptr, col_idx, kernel_size, padding, padding_mode, upsample, pool,
                              scale, shift, negative_slope, post_scale, post_shift);
  return forward_with_stats(op, input, values, row_ptr, col_idx, bias, g, pool);
}

at::Tensor sparse_conv2d_act_weight_grad_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                             const at::Tensor& scale, const at::Tensor& shift, double negative_slope,
                                             const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                             at::IntArrayRef kernel_size, at::IntArrayRef padding,
                                             c10::string_view padding_mode, int64_t upsample, bool pool,
                                             const std::optional<at::Tensor>& post_scale,
                                             const std::optional<at::Tensor>& post_shift) {
  const char* op = "sparse_conv2d_act_weight_grad";
  const at::Tensor like_values = at::empty({col_idx.numel()}, input.options());
  const auto g = act_geometry(op, input, like_values, row_ptr, col_idx, kernel_size, padding, padding_mode, upsample,
                              pool, scale, shift, negative_slope, post_scale, post_shift);
  return weight_grad_checked(op, grad_output, input, row_ptr, col_idx, g, pool);
}

}  // namespace

TORCH_LIBRARY_IMPL(oes_fast, CPU, m) {
  m.impl("sparse_conv2d_act_stats", &sparse_conv2d_act_stats_cpu);
  m.impl("sparse_conv2d_act_weight_grad", &sparse_conv2d_act_weight_grad_cpu);
  m.impl("sparse_conv2d_pool_input_grad", &sparse_conv2d_pool_input_grad_cpu);
  m.impl("sparse_conv2d_pool_stats", &sparse_conv2d_pool_stats_cpu);
  m.impl("sparse_conv2d_pool_weight_grad", &sparse_conv2d_pool_weight_grad_cpu);
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_conv2d_stats", &sparse_conv2d_stats_cpu);
  m.impl("sparse_conv2d_input_grad", &sparse_conv2d_input_grad_cpu);
  m.impl("sparse_conv2d_weight_grad", &sparse_conv2d_weight_grad_cpu);
}

}  // namespace oes_fast
