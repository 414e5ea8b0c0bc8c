// Includes the kernels file OES_FAST_KERNELS_FILE once per instruction set (see cpu_isa.h):
//   isa_baseline  the build's flags (portable x86-64 by default), OES_FAST_VEC_BYTES 16
//   isa_avx2      `#pragma GCC target` AVX2 + FMA,                 OES_FAST_VEC_BYTES 32
//   isa_avx512    `#pragma GCC target` AVX-512 F/VL/BW/DQ + AVX2/FMA, OES_FAST_VEC_BYTES 64
// each time with OES_FAST_ISA_NS naming the namespace of that copy. Usage, in a .cpp file after
// ALL its #includes of library headers (so that no inline function or template of a library
// is first defined inside a target region, compiled with wider instructions there, and then
// kept by the linker for every caller):
//   #define OES_FAST_KERNELS_FILE "op_kernels.h"
//   #include "per_isa.h"
// A kernels file includes no library header and puts everything in
// `namespace oes_fast { namespace OES_FAST_ISA_NS { namespace { ... } } }`. No include guard.
// Test OES_FAST_VEC_BYTES, not __AVX2__ / __AVX512F__, for ISA-specific code: in C++ gcc does
// not define those inside a target region (they only say what the build's own flags enable).
#ifndef OES_FAST_KERNELS_FILE
#error "define OES_FAST_KERNELS_FILE before including per_isa.h"
#endif

#define OES_FAST_ISA_NS isa_baseline
#define OES_FAST_VEC_BYTES 16
#include OES_FAST_KERNELS_FILE
#undef OES_FAST_VEC_BYTES
#undef OES_FAST_ISA_NS

#if OES_FAST_X86_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma")
#define OES_FAST_ISA_NS isa_avx2
#define OES_FAST_VEC_BYTES 32
#include OES_FAST_KERNELS_FILE
#undef OES_FAST_VEC_BYTES
#undef OES_FAST_ISA_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
#define OES_FAST_ISA_NS isa_avx512
#define OES_FAST_VEC_BYTES 64
#include OES_FAST_KERNELS_FILE
#undef OES_FAST_VEC_BYTES
#undef OES_FAST_ISA_NS
#pragma GCC pop_options
#endif

#undef OES_FAST_KERNELS_FILE
