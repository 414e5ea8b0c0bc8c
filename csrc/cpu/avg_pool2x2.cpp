// CPU kernels of avg_pool2x2 and avg_pool2x2_backward (schemas: csrc/avg_pool2x2.cpp), float32
// and float64: one pass each, where the torch expression they replace ran three adds, a
// multiply and their temporaries forward, and an expand, a reshape copy and a pad backward.
// Threads split the output rows; each output element is one fixed expression, so the results
// do not depend on the thread count.
//
// The row loops are in avg_pool2x2_kernels.h, compiled once per instruction set (per_isa.h);
// cpu_isa() chooses the copy at run time. This file holds the argument handling and the
// registration, compiled at the baseline flags.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"

#define OES_FAST_KERNELS_FILE "avg_pool2x2_kernels.h"
#include "per_isa.h"

namespace oes_fast {
namespace {

void check_dtype(const at::Tensor& t, const char* op) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": dtype must be float32 or float64, got ", dtype);
}

// Output rows per task: at least ~8K output elements (32K input elements), so small tensors
// stay on one thread.
int64_t row_grain(int64_t w2) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, w2)); }

at::Tensor avg_pool2x2_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 4 && input.size(2) >= 2 && input.size(3) >= 2,
              "avg_pool2x2: input must be (N, C, H, W) with H, W >= 2, got ", input.sizes());
  check_dtype(input, "avg_pool2x2");
  const int64_t h = input.size(2), w = input.size(3);
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({input.size(0), input.size(1), h / 2, w / 2}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "avg_pool2x2_cpu", [&] {
    auto* kernel = OES_FAST_ISA_DISPATCH(pool_rows<scalar_t>);
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, input.size(0) * input.size(1) * (h / 2), row_grain(w / 2),
                     [&](int64_t begin, int64_t end) { kernel(in, out, begin, end, h, w); });
  });
  return y;
}

at::Tensor avg_pool2x2_backward_cpu(const at::Tensor& grad_output, at::IntArrayRef input_size) {
  TORCH_CHECK(input_size.size() == 4 && input_size[2] >= 2 && input_size[3] >= 2,
              "avg_pool2x2_backward: input_size must be (N, C, H, W) with H, W >= 2, got ", input_size);
  const int64_t n = input_size[0], c = input_size[1], h = input_size[2], w = input_size[3];
  const std::vector<int64_t> pooled_vec{n, c, h / 2, w / 2};
  const at::IntArrayRef pooled(pooled_vec);
  TORCH_CHECK(grad_output.sizes() == pooled, "avg_pool2x2_backward: grad_output must be (N, C, H / 2, W / 2) = ",
              pooled, ", got ", grad_output.sizes());
  check_dtype(grad_output, "avg_pool2x2_backward");
  const at::Tensor g = grad_output.contiguous();
  at::Tensor grad_input = at::empty({n, c, h, w}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "avg_pool2x2_backward_cpu", [&] {
    auto* kernel = OES_FAST_ISA_DISPATCH(unpool_rows<scalar_t>);
    const scalar_t* go = g.data_ptr<scalar_t>();
    scalar_t* gi = grad_input.data_ptr<scalar_t>();
    at::parallel_for(0, n * c * (h / 2), row_grain(w / 2),
                     [&](int64_t begin, int64_t end) { kernel(go, gi, begin, end, h, w); });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(oes_fast, CPU, m) {
  m.impl("avg_pool2x2", &avg_pool2x2_cpu);
  m.impl("avg_pool2x2_backward", &avg_pool2x2_backward_cpu);
}

}  // namespace oes_fast
