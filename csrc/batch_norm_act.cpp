// batch_norm_act, batch_norm_act_conv1x1 and batch_norm_act_sparse_conv2d: the Sparse-DIP
// generator's training-mode batch norm with the LeakyReLU after it (and, for its last one, the
// 1x1 output conv; where a sparse conv follows, that conv, the batch norm made in its input
// load), each one differentiable op. They compose the kernels of csrc/batch_norm_leaky_relu.cpp
// (and of the sparse convs): the statistics pass where no statistics are given, the per-channel
// constants, one pass forward (batch_norm_leaky_relu / batch_norm_leaky_relu_conv1x1 /
// sparse_conv2d_act_stats) and their backward ops, keeping only the input, the per-channel
// constants and the conv's weights for the backward.
//
// Why C++: as a Python autograd function the composition cost about 100 us of Python per batch
// norm and step (the function's call, the constants' op calls, the gradients' dtype conversions),
// on layers whose kernels take 10-50 us below 64x64: about 3 ms of a 256x256 Sparse-DIP step
// with its 23 batch norms.
//
// Registered for the CPU key (the composition, for calls below autograd) and the Autograd key
// (the autograd function, or the composition where no gradient is wanted: wants_grad); the fake
// kernels are in oes_fast/ops.py. CPU only: the Python wrapper oes_fast.ops.batch_norm_leaky_relu
// runs the reference composition on other devices, and the generator calls the other two on CPU
// tensors only.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "sparse_conv2d.h"

TORCH_LIBRARY_FRAGMENT(oes_fast, m) {
  // leaky_relu(batch_norm(input), negative_slope) with batch statistics (training mode): from
  // `stats` ((C, 2) float64 per-channel sum and sum of squares, sparse_conv2d_stats' format) or
  // after a statistics pass when None; weight and bias (C,). Differentiable once in input,
  // weight and bias; a slope of 1 is the batch norm alone.
  m.def(
      "batch_norm_act(Tensor input, Tensor? stats, Tensor weight, Tensor bias, float eps, float negative_slope) "
      "-> Tensor");
  // The 1x1 conv (conv_weight (C_out, C), conv_bias (C_out,) or None) of batch_norm_act(input,
  // stats, weight, bias, eps, negative_slope): the generator's head. Differentiable once in
  // input, weight, bias, conv_weight and conv_bias.
  m.def(
      "batch_norm_act_conv1x1(Tensor input, Tensor? stats, Tensor weight, Tensor bias, float eps, "
      "float negative_slope, Tensor conv_weight, Tensor? conv_bias) -> Tensor");
  // sparse_conv2d_stats (pool = false) or sparse_conv2d_pool_stats (pool = true) of
  // batch_norm_act(input, stats, weight, bias, eps, negative_slope), with the batch norm's
  // normalizing pass and activation made in the conv's input load (sparse_conv2d_act_stats): the
  // activated tensor is neither written nor kept for the backward, which makes it again in the
  // weight gradient's load. Differentiable once in input, weight, bias, values and conv_bias; the
  // statistics output carries no gradient (as sparse_conv2d_stats'). CPU only.
  m.def(
      "batch_norm_act_sparse_conv2d(Tensor input, Tensor? stats, Tensor weight, Tensor bias, float eps, "
      "float negative_slope, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? conv_bias, int[2] kernel_size, "
      "int[2] padding, str padding_mode, int upsample, bool pool) -> (Tensor, Tensor)");
  // The same with a second batch norm (weight2, bias2, eps2, batch statistics, no activation)
  // between the activation and the conv: the conv of
  // batch_norm_act(batch_norm_act(input, stats, weight, bias, eps, negative_slope), None, weight2,
  // bias2, eps2, 1.0), the generator's up path (a batch norm and its LeakyReLU, then the next
  // block's input batch norm). The second batch norm's statistics come from a pass over the input
  // that activates it without writing it (batch_norm_act_stats), and both batch norms are made in
  // the conv's input load. Differentiable once in input, weight, bias, weight2, bias2, values and
  // conv_bias; the statistics output carries no gradient. CPU only.
  m.def(
      "batch_norm_act_norm_sparse_conv2d(Tensor input, Tensor? stats, Tensor weight, Tensor bias, float eps, "
      "float negative_slope, Tensor weight2, Tensor bias2, float eps2, Tensor values, Tensor row_ptr, "
      "Tensor col_idx, Tensor? conv_bias, int[2] kernel_size, int[2] padding, str padding_mode, int upsample, "
      "bool pool) -> (Tensor, Tensor)");
}

namespace oes_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Constants = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (mean, invstd, scale, shift) of the contiguous x, float64 per channel, from `stats` or from a
// statistics pass.
Constants batch_norm_constants(const at::Tensor& x, const std::optional<at::Tensor>& stats, const at::Tensor& weight,
                               const at::Tensor& bias, double eps) {
  static const auto stats_op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("oes_fast::batch_norm_stats", "")
                                   .typed<at::Tensor(const at::Tensor&)>();
  static const auto constants_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("oes_fast::batch_norm_constants", "")
          .typed<Constants(const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&, double)>();
  TORCH_CHECK(x.dim() == 4, "batch_norm_act: input must be 4-D (N, C, H, W), got ", x.sizes());
  const at::Tensor s = stats.has_value() && stats->defined() ? *stats : stats_op.call(x);
  return constants_op.call(s, x.size(0) * x.size(2) * x.size(3), weight, bias, eps);
}

at::Tensor normalize(const at::Tensor& x, const Constants& c, double slope) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("oes_fast::batch_norm_leaky_relu", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, std::get<2>(c), std::get<3>(c), slope);
}

at::Tensor head(const at::Tensor& x, const Constants& c, double slope, const at::Tensor& conv_weight,
                const std::optional<at::Tensor>& conv_bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("oes_fast::batch_norm_leaky_relu_conv1x1", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                               const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(x, std::get<2>(c), std::get<3>(c), slope, conv_weight, conv_bias);
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Whether a call needs its autograd function: grad mode on and some input wanting a gradient.
// Without one (the generator's forward under no_grad) the composition runs as the CPU kernel does:
// Function::apply would still make its node and save its tensors, 10-20 us a call (17 calls in a
// Sparse-DIP forward).
bool wants_grad(std::initializer_list<const at::Tensor*> tensors, const std::optional<at::Tensor>& stats,
                const std::optional<at::Tensor>& conv_bias = std::nullopt) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors)
    if (t->requires_grad()) return true;
  return (given(stats) && stats->requires_grad()) || (given(conv_bias) && conv_bias->requires_grad());
}

// batch_norm_leaky_relu_backward through the dispatcher
const auto& batch_norm_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("oes_fast::batch_norm_leaky_relu_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, double)>();
  return op;
}

// The float64 gradient g in dtype `dtype` where wanted, else undefined.
at::Tensor as_grad(bool wanted, const at::Tensor& g, const c10::IValue& dtype) {
  return wanted ? g.to(static_cast<at::ScalarType>(dtype.toInt())) : at::Tensor();
}

// What the forwards keep for the backward: x, the constants and the conv weight (the head's, or
// the sparse conv's values; saved),
// the slope, the dtypes of the batch norm's weight and bias, and where their autograd edges are
// (stats, a tensor when given, takes edge 1).
void save_batch_norm(AutogradContext* ctx, const at::Tensor& x, const Constants& c, double slope,
                     const std::optional<at::Tensor>& stats, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& conv_weight = at::Tensor(), const Constants* second = nullptr) {
  std::vector<at::Tensor> saved{x, std::get<0>(c), std::get<1>(c), std::get<2>(c), std::get<3>(c), conv_weight};
  if (second != nullptr)  // a second batch norm's constants (batch_norm_act_norm_sparse_conv2d)
    saved.insert(saved.end(), {std::get<0>(*second), std::get<1>(*second), std::get<2>(*second), std::get<3>(*second)});
  ctx->save_for_backward(saved);
  ctx->saved_data["slope"] = slope;
  ctx->saved_data["weight_edge"] = static_cast<int64_t>(given(stats) ? 2 : 1);
  ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
  ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.scalar_type());
}

class BatchNormActFunction : public torch::autograd::Function<BatchNormActFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& stats,
                            const at::Tensor& weight, const at::Tensor& bias, double eps, double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor x = input.contiguous();
    const Constants c = batch_norm_constants(x, stats, weight, bias, eps);
    save_batch_norm(ctx, x, c, negative_slope, stats, weight, bias);
    return normalize(x, c, negative_slope);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t w = ctx->saved_data["weight_edge"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(w),
               need_b = ctx->needs_input_grad(w + 1);
    if (!(need_x || need_w || need_b)) return variable_list(6);
    const auto s = ctx->get_saved_variables();
    const auto [gx, gw, gb] = batch_norm_backward_op().call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4],
                                      ctx->saved_data["slope"].toDouble());
    return {need_x ? gx : at::Tensor(), at::Tensor(), as_grad(need_w, gw, ctx->saved_data["weight_dtype"]),
            as_grad(need_b, gb, ctx->saved_data["bias_dtype"]), at::Tensor(), at::Tensor()};
  }
};

class BatchNormActConv1x1Function : public torch::autograd::Function<BatchNormActConv1x1Function> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& stats,
                            const at::Tensor& weight, const at::Tensor& bias, double eps, double negative_slope,
                            const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor x = input.contiguous();
    const Constants c = batch_norm_constants(x, stats, weight, bias, eps);
    save_batch_norm(ctx, x, c, negative_slope, stats, weight, bias, conv_weight);
    ctx->saved_data["conv_dtype"] = static_cast<int64_t>(conv_weight.scalar_type());
    ctx->saved_data["has_conv_bias"] = given(conv_bias);
    return head(x, c, negative_slope, conv_weight, conv_bias);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("oes_fast::batch_norm_leaky_relu_conv1x1_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>();
    const int64_t w = ctx->saved_data["weight_edge"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(w),
               need_b = ctx->needs_input_grad(w + 1), need_cw = ctx->needs_input_grad(w + 2),
               need_cb = ctx->saved_data["has_conv_bias"].toBool() && ctx->needs_input_grad(w + 3);
    if (!(need_x || need_w || need_b || need_cw || need_cb)) return variable_list(8);
    const auto s = ctx->get_saved_variables();
    const auto [gx, gw, gb, gcw, gcb] = op.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4],
                                                ctx->saved_data["slope"].toDouble(), s[5]);
    const c10::IValue& conv_dtype = ctx->saved_data["conv_dtype"];
    return {need_x ? gx : at::Tensor(), at::Tensor(), as_grad(need_w, gw, ctx->saved_data["weight_dtype"]),
            as_grad(need_b, gb, ctx->saved_data["bias_dtype"]), at::Tensor(), at::Tensor(),
            as_grad(need_cw, gcw, conv_dtype), as_grad(need_cb, gcb, conv_dtype)};
  }
};

using Conv = std::tuple<at::Tensor, at::Tensor>;

// The sparse_conv2d_act_* ops' post_scale and post_shift: a second batch norm's scale and shift
// (its constants `post`), or None.
std::pair<std::optional<at::Tensor>, std::optional<at::Tensor>> post_constants(const Constants* post) {
  if (post == nullptr) return {};
  return {std::get<2>(*post), std::get<3>(*post)};
}

// The conv of the activated input (sparse_conv2d_act_stats) with the constants c.
// With `post` (the second batch norm's constants), the conv reads that batch norm of the activation.
Conv act_conv(const at::Tensor& x, const Constants& c, double slope, const at::Tensor& values,
              const at::Tensor& row_ptr, const at::Tensor& col_idx, const std::optional<at::Tensor>& conv_bias,
              at::IntArrayRef kernel_size, at::IntArrayRef padding, c10::string_view mode, int64_t upsample,
              bool pool, const Constants* post = nullptr) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("oes_fast::sparse_conv2d_act_stats", "")
                             .typed<Conv(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                         c10::string_view, int64_t, bool, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&)>();
  const auto [post_scale, post_shift] = post_constants(post);
  return op.call(x, std::get<2>(c), std::get<3>(c), slope, values, row_ptr, col_idx, conv_bias, kernel_size, padding,
                 mode, upsample, pool, post_scale, post_shift);
}

// sparse_conv2d_act_weight_grad: the weight gradient of act_conv's conv.
at::Tensor act_weight_grad(const at::Tensor& g, const at::Tensor& x, const Constants& c, double slope,
                           const at::Tensor& row_ptr, const at::Tensor& col_idx, at::IntArrayRef kernel,
                           at::IntArrayRef padding, c10::string_view mode, int64_t upsample, bool pool,
                           const Constants* post = nullptr) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("oes_fast::sparse_conv2d_act_weight_grad", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, double, const at::Tensor&, const at::Tensor&,
                                               at::IntArrayRef, at::IntArrayRef, c10::string_view, int64_t, bool,
                                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  const auto [post_scale, post_shift] = post_constants(post);
  return op.call(g, x, std::get<2>(c), std::get<3>(c), slope, row_ptr, col_idx, kernel, padding, mode, upsample, pool,
                 post_scale, post_shift);
}

at::Tensor batch_norm_act_stats(const at::Tensor& x, const Constants& c, double slope) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("oes_fast::batch_norm_act_stats", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, std::get<2>(c), std::get<3>(c), slope);
}

// The conv's settings, kept by the forwards of the sparse-conv ops for their backward.
void save_conv(AutogradContext* ctx, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const std::optional<at::Tensor>& conv_bias, at::IntArrayRef kernel_size, at::IntArrayRef padding,
               c10::string_view mode, int64_t upsample, bool pool) {
  ctx->saved_data["row_ptr"] = row_ptr;
  ctx->saved_data["col_idx"] = col_idx;
  ctx->saved_data["has_conv_bias"] = given(conv_bias);
  ctx->saved_data["kernel"] = kernel_size.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["mode"] = std::string(mode.data(), mode.size());
  ctx->saved_data["upsample"] = upsample;
  ctx->saved_data["pool"] = pool;
}

struct SavedConv {
  at::Tensor row_ptr, col_idx;
  std::vector<int64_t> kernel, padding;
  std::string mode;
  int64_t upsample;
  bool pool;
};
SavedConv saved_conv(AutogradContext* ctx) {
  return {ctx->saved_data["row_ptr"].toTensor(), ctx->saved_data["col_idx"].toTensor(),
          ctx->saved_data["kernel"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["mode"].toStringRef(), ctx->saved_data["upsample"].toInt(),
          ctx->saved_data["pool"].toBool()};
}

// The backward: the conv's input gradient (the activated input's), its weight gradient (the
// activation made again in the load) and bias gradient, then the batch norm's and activation's
// backward from that input gradient (batch_norm_leaky_relu_backward, as BatchNormActFunction).
class BatchNormActSparseConv2dFunction : public torch::autograd::Function<BatchNormActSparseConv2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& stats,
                               const at::Tensor& weight, const at::Tensor& bias, double eps, double negative_slope,
                               const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                               const std::optional<at::Tensor>& conv_bias, at::IntArrayRef kernel_size,
                               at::IntArrayRef padding, c10::string_view mode, int64_t upsample, bool pool) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor x = input.contiguous();
    const Constants c = batch_norm_constants(x, stats, weight, bias, eps);
    save_batch_norm(ctx, x, c, negative_slope, stats, weight, bias, values);
    save_conv(ctx, row_ptr, col_idx, conv_bias, kernel_size, padding, mode, upsample, pool);
    auto [out, out_stats] =
        act_conv(x, c, negative_slope, values, row_ptr, col_idx, conv_bias, kernel_size, padding, mode, upsample, pool);
    ctx->mark_non_differentiable({out_stats});
    return {out, out_stats};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // edges: input 0, stats (when given), weight w, bias w + 1, values w + 2, conv_bias w + 5
    const int64_t w = ctx->saved_data["weight_edge"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(w),
               need_b = ctx->needs_input_grad(w + 1), need_v = ctx->needs_input_grad(w + 2),
               need_cb = ctx->saved_data["has_conv_bias"].toBool() && ctx->needs_input_grad(w + 5);
    variable_list out(15);
    if (!(need_x || need_w || need_b || need_v || need_cb)) return out;
    const auto s = ctx->get_saved_variables();
    const at::Tensor& x = s[0];
    const Constants c{s[1], s[2], s[3], s[4]};
    const at::Tensor& values = s[5];
    const SavedConv v = saved_conv(ctx);
    const double slope = ctx->saved_data["slope"].toDouble();
    const at::Tensor g = grads[0].contiguous();
    if (need_v)
      out[6] = act_weight_grad(g, x, c, slope, v.row_ptr, v.col_idx, v.kernel, v.padding, v.mode, v.upsample, v.pool);
    if (need_cb) out[9] = channel_sum(g);
    if (need_x || need_w || need_b) {
      const at::Tensor g_act = conv_input_grad(g, values, v.row_ptr, v.col_idx, x.sym_sizes(), v.kernel, {1, 1},
                                               v.padding, v.mode, v.upsample, v.pool);
      const auto [gx, gw, gb] = batch_norm_backward_op().call(g_act, x, s[1], s[2], s[3], s[4], slope);
      if (need_x) out[0] = gx;
      out[2] = as_grad(need_w, gw, ctx->saved_data["weight_dtype"]);
      out[3] = as_grad(need_b, gb, ctx->saved_data["bias_dtype"]);
    }
    return out;
  }
};

// The second batch norm's constants: its batch statistics are those of the activation
// batch_norm_act would store (batch_norm_act_stats; that tensor is not written).
Constants second_constants(const at::Tensor& x, const Constants& c, double slope, const at::Tensor& weight2,
                           const at::Tensor& bias2, double eps2) {
  return batch_norm_constants(x, batch_norm_act_stats(x, c, slope), weight2, bias2, eps2);
}

// The backward: the conv's input gradient (the second batch norm's output's), its weight gradient
// (both batch norms made again in the load) and bias gradient; then the second batch norm's
// backward, on the activation made again (the one tensor it writes besides the gradients), and
// the first batch norm's and activation's.
class BatchNormActNormSparseConv2dFunction : public torch::autograd::Function<BatchNormActNormSparseConv2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& stats,
                               const at::Tensor& weight, const at::Tensor& bias, double eps, double negative_slope,
                               const at::Tensor& weight2, const at::Tensor& bias2, double eps2,
                               const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                               const std::optional<at::Tensor>& conv_bias, at::IntArrayRef kernel_size,
                               at::IntArrayRef padding, c10::string_view mode, int64_t upsample, bool pool) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor x = input.contiguous();
    const Constants c = batch_norm_constants(x, stats, weight, bias, eps);
    const Constants c2 = second_constants(x, c, negative_slope, weight2, bias2, eps2);
    save_batch_norm(ctx, x, c, negative_slope, stats, weight, bias, values, &c2);
    ctx->saved_data["weight2_dtype"] = static_cast<int64_t>(weight2.scalar_type());
    ctx->saved_data["bias2_dtype"] = static_cast<int64_t>(bias2.scalar_type());
    save_conv(ctx, row_ptr, col_idx, conv_bias, kernel_size, padding, mode, upsample, pool);
    auto [out, out_stats] = act_conv(x, c, negative_slope, values, row_ptr, col_idx, conv_bias, kernel_size, padding,
                                     mode, upsample, pool, &c2);
    ctx->mark_non_differentiable({out_stats});
    return {out, out_stats};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // edges: input 0, stats (when given), weight w, bias w + 1, weight2 w + 2, bias2 w + 3,
    // values w + 4, conv_bias w + 7
    const int64_t w = ctx->saved_data["weight_edge"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(w),
               need_b = ctx->needs_input_grad(w + 1), need_w2 = ctx->needs_input_grad(w + 2),
               need_b2 = ctx->needs_input_grad(w + 3), need_v = ctx->needs_input_grad(w + 4),
               need_cb = ctx->saved_data["has_conv_bias"].toBool() && ctx->needs_input_grad(w + 7);
    variable_list out(18);
    const bool need_first = need_x || need_w || need_b;
    if (!(need_first || need_w2 || need_b2 || need_v || need_cb)) return out;
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &values = s[5];
    const Constants c{s[1], s[2], s[3], s[4]}, c2{s[6], s[7], s[8], s[9]};
    const SavedConv v = saved_conv(ctx);
    const double slope = ctx->saved_data["slope"].toDouble();
    const at::Tensor g = grads[0].contiguous();
    if (need_v)
      out[9] = act_weight_grad(g, x, c, slope, v.row_ptr, v.col_idx, v.kernel, v.padding, v.mode, v.upsample, v.pool,
                               &c2);
    if (need_cb) out[12] = channel_sum(g);
    if (need_first || need_w2 || need_b2) {
      const at::Tensor g_norm = conv_input_grad(g, values, v.row_ptr, v.col_idx, x.sym_sizes(), v.kernel, {1, 1},
                                                v.padding, v.mode, v.upsample, v.pool);
      const auto [g_act, gw2, gb2] = batch_norm_backward_op().call(g_norm, normalize(x, c, slope), s[6], s[7], s[8],
                                                                   s[9], 1.0);
      out[6] = as_grad(need_w2, gw2, ctx->saved_data["weight2_dtype"]);
      out[7] = as_grad(need_b2, gb2, ctx->saved_data["bias2_dtype"]);
      if (need_first) {
        const auto [gx, gw, gb] = batch_norm_backward_op().call(g_act, x, s[1], s[2], s[3], s[4], slope);
        if (need_x) out[0] = gx;
        out[2] = as_grad(need_w, gw, ctx->saved_data["weight_dtype"]);
        out[3] = as_grad(need_b, gb, ctx->saved_data["bias_dtype"]);
      }
    }
    return out;
  }
};

at::Tensor batch_norm_act_cpu(const at::Tensor& input, const std::optional<at::Tensor>& stats,
                              const at::Tensor& weight, const at::Tensor& bias, double eps, double negative_slope) {
  const at::Tensor x = input.contiguous();
  return normalize(x, batch_norm_constants(x, stats, weight, bias, eps), negative_slope);
}

at::Tensor batch_norm_act_conv1x1_cpu(const at::Tensor& input, const std::optional<at::Tensor>& stats,
                                      const at::Tensor& weight, const at::Tensor& bias, double eps,
                                      double negative_slope, const at::Tensor& conv_weight,
                                      const std::optional<at::Tensor>& conv_bias) {
  const at::Tensor x = input.contiguous();
  return head(x, batch_norm_constants(x, stats, weight, bias, eps), negative_slope, conv_weight, conv_bias);
}

at::Tensor batch_norm_act_autograd(const at::Tensor& input, const std::optional<at::Tensor>& stats,
                                   const at::Tensor& weight, const at::Tensor& bias, double eps,
                                   double negative_slope) {
  if (!wants_grad({&input, &weight, &bias}, stats)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_act_cpu(input, stats, weight, bias, eps, negative_slope);
  }
  return BatchNormActFunction::apply(input, stats, weight, bias, eps, negative_slope);
}

at::Tensor batch_norm_act_conv1x1_autograd(const at::Tensor& input, const std::optional<at::Tensor>& stats,
                                           const at::Tensor& weight, const at::Tensor& bias, double eps,
                                           double negative_slope, const at::Tensor& conv_weight,
                                           const std::optional<at::Tensor>& conv_bias) {
  if (!wants_grad({&input, &weight, &bias, &conv_weight}, stats, conv_bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_act_conv1x1_cpu(input, stats, weight, bias, eps, negative_slope, conv_weight, conv_bias);
  }
  return BatchNormActConv1x1Function::apply(input, stats, weight, bias, eps, negative_slope, conv_weight, conv_bias);
}

Conv batch_norm_act_sparse_conv2d_cpu(const at::Tensor& input, const std::optional<at::Tensor>& stats,
                                      const at::Tensor& weight, const at::Tensor& bias, double eps,
                                      double negative_slope, const at::Tensor& values, const at::Tensor& row_ptr,
                                      const at::Tensor& col_idx, const std::optional<at::Tensor>& conv_bias,
                                      at::IntArrayRef kernel_size, at::IntArrayRef padding, c10::string_view mode,
                                      int64_t upsample, bool pool) {
  const at::Tensor x = input.contiguous();
  return act_conv(x, batch_norm_constants(x, stats, weight, bias, eps), negative_slope, values, row_ptr, col_idx,
                  conv_bias, kernel_size, padding, mode, upsample, pool);
}

Conv batch_norm_act_sparse_conv2d_autograd(const at::Tensor& input, const std::optional<at::Tensor>& stats,
                                           const at::Tensor& weight, const at::Tensor& bias, double eps,
                                           double negative_slope, const at::Tensor& values,
                                           const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                           const std::optional<at::Tensor>& conv_bias, at::IntArrayRef kernel_size,
                                           at::IntArrayRef padding, c10::string_view mode, int64_t upsample,
                                           bool pool) {
  if (!wants_grad({&input, &weight, &bias, &values}, stats, conv_bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_act_sparse_conv2d_cpu(input, stats, weight, bias, eps, negative_slope, values, row_ptr, col_idx,
                                            conv_bias, kernel_size, padding, mode, upsample, pool);
  }
  const auto out = BatchNormActSparseConv2dFunction::apply(input, stats, weight, bias, eps, negative_slope, values,
                                                           row_ptr, col_idx, conv_bias, kernel_size, padding, mode,
                                                           upsample, pool);
  return {out[0], out[1]};
}

Conv batch_norm_act_norm_sparse_conv2d_cpu(const at::Tensor& input, const std::optional<at::Tensor>& stats,
                                           const at::Tensor& weight, const at::Tensor& bias, double eps,
                                           double negative_slope, const at::Tensor& weight2, const at::Tensor& bias2,
                                           double eps2, const at::Tensor& values, const at::Tensor& row_ptr,
                                           const at::Tensor& col_idx, const std::optional<at::Tensor>& conv_bias,
                                           at::IntArrayRef kernel_size, at::IntArrayRef padding,
                                           c10::string_view mode, int64_t upsample, bool pool) {
  const at::Tensor x = input.contiguous();
  const Constants c = batch_norm_constants(x, stats, weight, bias, eps);
  const Constants c2 = second_constants(x, c, negative_slope, weight2, bias2, eps2);
  return act_conv(x, c, negative_slope, values, row_ptr, col_idx, conv_bias, kernel_size, padding, mode, upsample,
                  pool, &c2);
}

Conv batch_norm_act_norm_sparse_conv2d_autograd(const at::Tensor& input, const std::optional<at::Tensor>& stats,
                                                const at::Tensor& weight, const at::Tensor& bias, double eps,
                                                double negative_slope, const at::Tensor& weight2,
                                                const at::Tensor& bias2, double eps2, const at::Tensor& values,
                                                const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                const std::optional<at::Tensor>& conv_bias,
                                                at::IntArrayRef kernel_size, at::IntArrayRef padding,
                                                c10::string_view mode, int64_t upsample, bool pool) {
  if (!wants_grad({&input, &weight, &bias, &weight2, &bias2, &values}, stats, conv_bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_act_norm_sparse_conv2d_cpu(input, stats, weight, bias, eps, negative_slope, weight2, bias2, eps2,
                                                 values, row_ptr, col_idx, conv_bias, kernel_size, padding, mode,
                                                 upsample, pool);
  }
  const auto out = BatchNormActNormSparseConv2dFunction::apply(input, stats, weight, bias, eps, negative_slope, weight2,
                                                               bias2, eps2, values, row_ptr, col_idx, conv_bias,
                                                               kernel_size, padding, mode, upsample, pool);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(oes_fast, CPU, m) {
  m.impl("batch_norm_act_norm_sparse_conv2d", &batch_norm_act_norm_sparse_conv2d_cpu);
  m.impl("batch_norm_act_sparse_conv2d", &batch_norm_act_sparse_conv2d_cpu);
  m.impl("batch_norm_act", &batch_norm_act_cpu);
  m.impl("batch_norm_act_conv1x1", &batch_norm_act_conv1x1_cpu);
}

TORCH_LIBRARY_IMPL(oes_fast, Autograd, m) {
  m.impl("batch_norm_act_norm_sparse_conv2d", &batch_norm_act_norm_sparse_conv2d_autograd);
  m.impl("batch_norm_act_sparse_conv2d", &batch_norm_act_sparse_conv2d_autograd);
  m.impl("batch_norm_act", &batch_norm_act_autograd);
  m.impl("batch_norm_act_conv1x1", &batch_norm_act_conv1x1_autograd);
}

}  // namespace oes_fast
