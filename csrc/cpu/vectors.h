// The vector types of a kernels file's copy: vec_t<T> is one register of the copy's instruction
// set (OES_FAST_VEC_BYTES: 16, 32 or 64 bytes) of float or double, kLanes<T> its lane count,
// IndexVecOf<T>::type the integer vector of as many lanes.
// Shared by the kernels files of sparse_conv2d and batch_norm_leaky_relu, which per_isa.h
// includes once per instruction set: so no include guard and no includes here, and everything
// below lives in the copy's namespace with internal linkage.
#ifndef OES_FAST_ISA_NS
#error "vectors.h is included by a kernels file inside per_isa.h"
#endif

namespace oes_fast {
namespace OES_FAST_ISA_NS {
namespace {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(OES_FAST_VEC_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(OES_FAST_VEC_BYTES)));
};
template <typename T>
using vec_t = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = OES_FAST_VEC_BYTES / static_cast<int64_t>(sizeof(T));
// The integer vector of as many lanes (shuffle masks).
template <typename T>
struct IndexVecOf;
template <>
struct IndexVecOf<float> {
  typedef int32_t type __attribute__((vector_size(OES_FAST_VEC_BYTES)));
};
template <>
struct IndexVecOf<double> {
  typedef int64_t type __attribute__((vector_size(OES_FAST_VEC_BYTES)));
};

// An empty asm that "changes" x: the compiler must finish the arithmetic before it and cannot
// fold later arithmetic into it. -ffast-math lets gcc regroup a chain of additions (a += b; a +=
// c; ...) wherever the chain is inlined, and the grouping it picks depends on the code around it;
// with in_order(a) after each addition the chain is added in the order it is written, the same
// bits whatever code is compiled beside it.
template <typename X>
__attribute__((always_inline)) inline void in_order(X& x) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+v"(x));
#elif defined(__aarch64__)
  __asm__("" : "+w"(x));
#else
  __asm__("" : "+m"(x));
#endif
}

}  // namespace
}  // namespace OES_FAST_ISA_NS
}  // namespace oes_fast
