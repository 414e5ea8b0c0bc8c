// oes_fast._C.GeneratorForward (csrc/generator_forward.cpp): the Sparse-DIP generator's forward
// without autograd in one call, bound into the Python module by csrc/ops.cpp.
#pragma once
#include <torch/extension.h>

namespace oes_fast {

void bind_generator_forward(pybind11::module_& m);

}  // namespace oes_fast
