// Run-time choice of the instruction set of the hot CPU kernels.
//
// The extension is compiled with portable baseline flags (setup.py); the kernels that gain
// from wide vectors are compiled a second and third time for AVX2+FMA and AVX-512 inside
// `#pragma GCC target` regions (see csrc/cpu/sparse_conv2d.cpp), each copy in its own
// namespace, and the copy to run is chosen here once per process from what the CPU (and the
// OS) supports: the widest, unless OES_FAST_CPU_ISA=baseline|avx2|avx512 names another one
// (asking for one the CPU lacks is an error, not a crash).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace oes_fast {

enum class CpuIsa { baseline = 0, avx2 = 1, avx512 = 2 };

// Whether the copies for AVX2 / AVX-512 are compiled in: x86-64 with GCC (the target regions
// are `#pragma GCC target`, which Clang does not implement; there only the baseline copy).
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define OES_FAST_X86_DISPATCH 1
#else
#define OES_FAST_X86_DISPATCH 0
#endif

// The instruction set the kernels run with in this process (chosen on the first call).
// Throws (c10::Error) when OES_FAST_CPU_ISA is invalid or names one this CPU cannot run.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);
// Names of the instruction sets this CPU can run, narrowest first ("baseline" always).
std::vector<std::string> cpu_isas_supported();
// The L1 data cache of one core in bytes, as the OS reports it (sysconf); 32 KiB where it does not
// say. For choices of blocking that do not change any result's bits.
int64_t l1_data_cache_bytes();
// The L2 cache of one core in bytes, likewise (1 MiB where the OS does not say), or what
// OES_FAST_L2_CACHE_BYTES says (tests and benchmarks: the choices it makes do not change bits).
int64_t l2_cache_bytes();

}  // namespace oes_fast

// The address of kernel `fn` (a name inside the per-ISA namespaces of per_isa.h, template
// arguments allowed) in the copy for cpu_isa(), e.g.
//   OES_FAST_ISA_DISPATCH(forward<scalar_t>)(x, ...);
#if OES_FAST_X86_DISPATCH
#define OES_FAST_ISA_DISPATCH(...)                                                                  \
  (::oes_fast::cpu_isa() == ::oes_fast::CpuIsa::avx512 ? &::oes_fast::isa_avx512::__VA_ARGS__      \
   : ::oes_fast::cpu_isa() == ::oes_fast::CpuIsa::avx2 ? &::oes_fast::isa_avx2::__VA_ARGS__        \
                                                       : &::oes_fast::isa_baseline::__VA_ARGS__)
#else
#define OES_FAST_ISA_DISPATCH(...) (&::oes_fast::isa_baseline::__VA_ARGS__)
#endif
