// Autograd of sparse_conv2d, sparse_conv2d_stats and sparse_conv2d_pool_stats, in C++ for every
// device (the Autograd dispatch key): the backward calls the gradient operators through the
// dispatcher, so each device runs its own kernels (CPU, CUDA C++ or Triton).
//
// Why C++: the same formulas registered from Python (torch.library.register_autograd) cost about
// 150-250 us of Python a layer for the forward and backward together (the wrapper's argument
// handling, the autograd Function, the backward's op calls), against 50-100 us for the kernels of
// a small layer: at 256x256 about 4 ms of a 46-60 ms Sparse-DIP step.
//
// The statistics output carries no gradient of its own: its one user, batch_norm_from_stats
// (oes_fast/ops.py), differentiates the batch norm through the statistics itself.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "sparse_conv2d.h"

namespace oes_fast {

// A conv bias's gradient: grad summed over images and pixels, in float64 below float64 (a sum
// over a whole image loses several ulps in float32 otherwise), as oes_fast.ops._channel_sum.
at::Tensor channel_sum(const at::Tensor& grad) {
  const auto dtype = grad.scalar_type();
  const auto wide = dtype == at::kDouble ? dtype : at::kDouble;
  return grad.sum({0, 2, 3}, false, wide).to(dtype);
}

at::Tensor conv_input_grad(const at::Tensor& grad, const at::Tensor& values, const at::Tensor& row_ptr,
                           const at::Tensor& col_idx, c10::SymIntArrayRef input_size, at::IntArrayRef kernel,
                           at::IntArrayRef stride, at::IntArrayRef padding, c10::string_view mode, int64_t upsample,
                           bool pool) {
  static const auto plain = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("oes_fast::sparse_conv2d_input_grad", "")
                                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, c10::SymIntArrayRef, at::IntArrayRef,
                                                  at::IntArrayRef, at::IntArrayRef, c10::string_view, int64_t)>();
  static const auto pooled = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("oes_fast::sparse_conv2d_pool_input_grad", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, c10::SymIntArrayRef, at::IntArrayRef,
                                                   at::IntArrayRef, c10::string_view)>();
  if (pool) return pooled.call(grad, values, row_ptr, col_idx, input_size, kernel, padding, mode);
  return plain.call(grad, values, row_ptr, col_idx, input_size, kernel, stride, padding, mode, upsample);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, c10::string_view, int64_t)>
weight_grad_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("oes_fast::sparse_conv2d_weight_grad", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                               c10::string_view, int64_t)>();
  return op;
}

bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// What every backward needs: the saved tensors and geometry, the incoming gradient contiguous,
// and which of input (edge 0), values (1) and bias (4, when given) want a gradient.
struct ConvBackward {
  at::Tensor input, values, row_ptr, col_idx, grad;
  std::vector<int64_t> kernel, padding;
  std::string mode;
  bool need_input, need_values, need_bias;
  ConvBackward(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    input = saved[0];
    values = saved[1];
    row_ptr = saved[2];
    col_idx = saved[3];
    grad = grads[0].contiguous();
    kernel = ctx->saved_data["kernel"].toIntVector();
    padding = ctx->saved_data["padding"].toIntVector();
    mode = ctx->saved_data["mode"].toStringRef();
    need_input = ctx->needs_input_grad(0);
    need_values = ctx->needs_input_grad(1);
    need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(4);
  }
};

void save_conv(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
               const at::Tensor& col_idx, const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
               at::IntArrayRef padding, c10::string_view mode) {
  ctx->save_for_backward({input, values, row_ptr, col_idx});
  ctx->saved_data["kernel"] = kernel_size.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["mode"] = std::string(mode.data(), mode.size());
  ctx->saved_data["has_bias"] = has_tensor(bias);
}

// sparse_conv2d (any stride) and sparse_conv2d_stats (stride 1): input gradient by the transposed
// sparse conv, weight gradient at the kept taps only, both reading a fused upsampling as the
// forward does (the input gradient comes back at the stored size).
std::pair<at::Tensor, at::Tensor> conv_grads(const ConvBackward& b, at::IntArrayRef stride, int64_t upsample) {
  at::Tensor grad_input, grad_values;
  if (b.need_input)
    grad_input = conv_input_grad(b.grad, b.values, b.row_ptr, b.col_idx, b.input.sym_sizes(), b.kernel, stride,
                                 b.padding, b.mode, upsample, false);
  if (b.need_values)
    grad_values = weight_grad_op().call(b.grad, b.input, b.row_ptr, b.col_idx, b.kernel, stride, b.padding, b.mode,
                                        upsample);
  return {grad_input, grad_values};
}

class SparseConv2dFunction : public torch::autograd::Function<SparseConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& values,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                            c10::string_view mode, int64_t upsample) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("oes_fast::sparse_conv2d", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                                                 at::IntArrayRef, at::IntArrayRef, c10::string_view, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op.call(input, values, row_ptr, col_idx, bias, kernel_size, stride, padding, mode, upsample);
    save_conv(ctx, input, values, row_ptr, col_idx, bias, kernel_size, padding, mode);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["upsample"] = upsample;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const ConvBackward b(ctx, grads);
    const auto [gi, gv] = conv_grads(b, ctx->saved_data["stride"].toIntVector(), ctx->saved_data["upsample"].toInt());
    const at::Tensor gb = b.need_bias ? channel_sum(b.grad) : at::Tensor();
    return {gi, gv, at::Tensor(), at::Tensor(), gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class SparseConv2dStatsFunction : public torch::autograd::Function<SparseConv2dStatsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& values,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                               at::IntArrayRef padding, c10::string_view mode, int64_t upsample) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("oes_fast::sparse_conv2d_stats", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                   c10::string_view, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, stats] = op.call(input, values, row_ptr, col_idx, bias, kernel_size, padding, mode, upsample);
    save_conv(ctx, input, values, row_ptr, col_idx, bias, kernel_size, padding, mode);
    ctx->saved_data["upsample"] = upsample;
    ctx->mark_non_differentiable({stats});
    return {out, stats};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const ConvBackward b(ctx, grads);
    const auto [gi, gv] = conv_grads(b, {1, 1}, ctx->saved_data["upsample"].toInt());
    const at::Tensor gb = b.need_bias ? channel_sum(b.grad) : at::Tensor();
    return {gi, gv, at::Tensor(), at::Tensor(), gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The conv and the 2x2 average pooling after it as one op: the gradients in the pooled form, from
// the pooled output's gradient (the bias passes the pooling unchanged: the pooled mean of conv +
// bias is the pooled conv + bias).
class SparseConv2dPoolStatsFunction : public torch::autograd::Function<SparseConv2dPoolStatsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& values,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                               at::IntArrayRef padding, c10::string_view mode) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("oes_fast::sparse_conv2d_pool_stats", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                   c10::string_view)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, stats] = op.call(input, values, row_ptr, col_idx, bias, kernel_size, padding, mode);
    save_conv(ctx, input, values, row_ptr, col_idx, bias, kernel_size, padding, mode);
    ctx->mark_non_differentiable({stats});
    return {out, stats};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto weight_grad = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("oes_fast::sparse_conv2d_pool_weight_grad", "")
                                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                                          c10::string_view)>();
    const ConvBackward b(ctx, grads);
    at::Tensor gi, gv, gb;
    if (b.need_input)
      gi = conv_input_grad(b.grad, b.values, b.row_ptr, b.col_idx, b.input.sym_sizes(), b.kernel, {1, 1}, b.padding,
                           b.mode, 1, true);
    if (b.need_values) gv = weight_grad.call(b.grad, b.input, b.row_ptr, b.col_idx, b.kernel, b.padding, b.mode);
    if (b.need_bias) gb = channel_sum(b.grad);
    return {gi, gv, at::Tensor(), at::Tensor(), gb, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor sparse_conv2d_autograd(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                  const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  c10::string_view mode, int64_t upsample) {
  return SparseConv2dFunction::apply(input, values, row_ptr, col_idx, bias, kernel_size, stride, padding, mode,
                                     upsample);
}

std::tuple<at::Tensor, at::Tensor> sparse_conv2d_stats_autograd(const at::Tensor& input, const at::Tensor& values,
                                                                const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                                const std::optional<at::Tensor>& bias,
                                                                at::IntArrayRef kernel_size, at::IntArrayRef padding,
                                                                c10::string_view mode, int64_t upsample) {
  const auto out = SparseConv2dStatsFunction::apply(input, values, row_ptr, col_idx, bias, kernel_size, padding, mode,
                                                    upsample);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> sparse_conv2d_pool_stats_autograd(const at::Tensor& input,
                                                                     const at::Tensor& values,
                                                                     const at::Tensor& row_ptr,
                                                                     const at::Tensor& col_idx,
                                                                     const std::optional<at::Tensor>& bias,
                                                                     at::IntArrayRef kernel_size,
                                                                     at::IntArrayRef padding, c10::string_view mode) {
  const auto out = SparseConv2dPoolStatsFunction::apply(input, values, row_ptr, col_idx, bias, kernel_size, padding,
                                                        mode);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(oes_fast, Autograd, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_autograd);
  m.impl("sparse_conv2d_stats", &sparse_conv2d_stats_autograd);
  m.impl("sparse_conv2d_pool_stats", &sparse_conv2d_pool_stats_autograd);
}

}  // namespace oes_fast
