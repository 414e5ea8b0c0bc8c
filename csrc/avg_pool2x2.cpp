// Declares the avg_pool2x2 operators (schemas): the 2x2, stride-2 average pooling of the
// Sparse-DIP generator's down path. CPU kernels: csrc/cpu/avg_pool2x2.cpp; fake kernels and
// autograd: the avg_pool2x2 block of oes_fast/ops.py; other devices and dtypes run the torch
// expression of oes_fast.sparse._AvgPool2x2.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(oes_fast, m) {
  // (N, C, H, W) float32 / float64, H, W >= 2 -> (N, C, H / 2, W / 2): each output is
  // (((x[2i, 2j] + x[2i, 2j+1]) + x[2i+1, 2j]) + x[2i+1, 2j+1]) * 0.25, the value of
  // F.avg_pool2d(x, 2, 2); an odd last row or column is dropped.
  m.def("avg_pool2x2(Tensor input) -> Tensor");
  // Its gradient: grad_input[2i+di, 2j+dj] = grad_output[i, j] * 0.25 for di, dj in {0, 1};
  // zero in a dropped odd last row or column. input_size = (N, C, H, W) of the forward's input.
  m.def("avg_pool2x2_backward(Tensor grad_output, SymInt[] input_size) -> Tensor");
}
