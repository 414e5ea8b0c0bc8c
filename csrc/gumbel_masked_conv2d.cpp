// Declares the gumbel_masked_conv2d operators (schemas). The composite CPU kernels, the fake
// (meta) kernels, autograd and the CUDA dispatch (Triton, or the CUDA C++ kernels below) are
// registered in the gumbel_masked_conv2d block of oes_fast/ops.py; the CUDA C++ kernels live in
// csrc/cuda/gumbel_masked_conv2d.cu, which registers them for the CUDA key in C++.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(oes_fast, m) {
  // Stride-1 conv2d of pad(input) with weight * sigmoid((logits + log(u) - log(1 - u)) / tau),
  // u = philox_uniform(seed, offset + j) for weight element j (row-major), plus bias (not masked
  // here: the caller passes an already masked bias). padding_mode: "reflect" or "zeros".
  m.def(
      "gumbel_masked_conv2d(Tensor input, Tensor logits, Tensor weight, Tensor? bias, int seed, int offset, "
      "float tau, int padding, str padding_mode) -> Tensor");
  // (grad_input, grad_logits, grad_weight, grad_bias); output_mask says which are wanted, the
  // others come back as empty [0] tensors. The masked weights are regenerated, never stored.
  m.def(
      "gumbel_masked_conv2d_backward(Tensor grad_output, Tensor input, Tensor logits, Tensor weight, int seed, "
      "int offset, float tau, int padding, str padding_mode, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // The CUDA C++ kernels of the two ops above, under their own names so that one dispatch key
  // (CUDA) of the public ops can still choose between them and Triton at run time
  // (oes_fast.ops.set_cuda_backend). Implemented for the CUDA key only, when the extension is
  // built with nvcc; never called directly by users.
  m.def(
      "gumbel_masked_conv2d_cuda_impl(Tensor input, Tensor logits, Tensor weight, Tensor? bias, int seed, "
      "int offset, float tau, int padding, str padding_mode) -> Tensor");
  m.def(
      "gumbel_masked_conv2d_backward_cuda_impl(Tensor grad_output, Tensor input, Tensor logits, Tensor weight, "
      "int seed, int offset, float tau, int padding, str padding_mode, bool[4] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}
