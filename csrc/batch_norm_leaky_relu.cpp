// Declares the batch_norm_leaky_relu operators (schemas): the training-mode batch norm of the
// Sparse-DIP generator fused with the LeakyReLU that follows it. CPU kernels:
// csrc/cpu/batch_norm_leaky_relu.cpp; the differentiable ops that compose them, batch_norm_act
// and batch_norm_act_conv1x1: csrc/batch_norm_act.cpp; fake kernels and the composition for
// other devices: the batch_norm_leaky_relu block of oes_fast/ops.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(oes_fast, m) {
  // Per-channel (sum, sum of squares) of an (N, C, H, W) tensor over images and pixels: (C, 2)
  // float64, the format of sparse_conv2d_stats' statistics. Each channel is summed by one
  // thread in a fixed order, so the bits do not depend on the thread count.
  m.def("batch_norm_stats(Tensor input) -> Tensor");
  // batch_norm_stats(batch_norm_leaky_relu(input, scale, shift, negative_slope)), the same bits,
  // without writing that tensor: the statistics of a batch norm that follows an activation, for
  // batch_norm_act_norm_sparse_conv2d.
  m.def("batch_norm_act_stats(Tensor input, Tensor scale, Tensor shift, float negative_slope) -> Tensor");
  // The batch norm's per-channel constants from such statistics over `count` values per
  // channel, weight and bias (C,): (mean, invstd, scale, shift), each (C,) float64, with
  // scale = weight / sqrt(var + eps) and shift = bias - mean * scale (oes_fast.ops.batch_norm_affine).
  m.def("batch_norm_constants(Tensor stats, int count, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // leaky_relu(input * scale[c] + shift[c], negative_slope) of an (N, C, H, W) float32 or
  // float64 tensor in one pass; scale and shift are (C,) float64 (oes_fast.ops.batch_norm_affine),
  // the pre-activation is computed in float64 and rounded once.
  m.def("batch_norm_leaky_relu(Tensor input, Tensor scale, Tensor shift, float negative_slope) -> Tensor");
  // Backward of the training-mode batch norm (batch statistics mean, invstd; scale = weight *
  // invstd, shift = bias - mean * scale) followed by leaky_relu, in two passes per channel:
  // (grad_input in the input's dtype, grad_weight and grad_bias (C,) float64). The activation's
  // slope is taken from the sign of the pre-activation, recomputed from input as the forward
  // computed it (so the output need not be kept).
  m.def(
      "batch_norm_leaky_relu_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor scale, "
      "Tensor shift, float negative_slope) -> (Tensor, Tensor, Tensor)");
  // The generator's head: the 1x1 conv (weight (C_out, C), optional bias (C_out,), both of the
  // input's dtype) of batch_norm_leaky_relu(input, scale, shift, negative_slope), in one pass
  // over the input: (N, C_out, H, W). The activation is rounded to the input's dtype as
  // batch_norm_leaky_relu stores it; the conv sums in the input's dtype, in channel order.
  m.def(
      "batch_norm_leaky_relu_conv1x1(Tensor input, Tensor scale, Tensor shift, float negative_slope, Tensor weight, "
      "Tensor? bias) -> Tensor");
  // Its backward, with the batch norm's gradient through its batch statistics (mean, invstd as
  // batch_norm_leaky_relu_backward takes them), in two passes over the input (the activation
  // recomputed): (grad_input in the input's dtype, grad of the batch norm's weight and bias (C,),
  // grad_weight (C_out, C) and grad_bias (C_out,), all four float64). Sums over pixels in
  // float64 in a fixed order: the bits do not depend on the thread count.
  m.def(
      "batch_norm_leaky_relu_conv1x1_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor scale, Tensor shift, float negative_slope, Tensor weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
