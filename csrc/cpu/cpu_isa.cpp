// Run-time choice of the CPU kernels' instruction set (see cpu_isa.h). Compiled at the
// baseline flags like the rest of the extension.
#include "cpu_isa.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstdlib>
#include <cstring>

#include <unistd.h>

namespace oes_fast {
namespace {

bool supported(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::baseline:
      return true;
#if OES_FAST_X86_DISPATCH
    // libgcc's cpu model also checks (XGETBV) that the OS saves the ymm / zmm state.
    case CpuIsa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::avx512:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
    default:
      return false;
  }
}

// sysconf's answer for a cache size, or `fallback` where it gives none (-1, or 0 on some systems)
int64_t reported_or(long reported, int64_t fallback) { return reported > 0 ? int64_t(reported) : fallback; }

CpuIsa choose() {
#if OES_FAST_X86_DISPATCH
  __builtin_cpu_init();
#endif
  const char* forced = std::getenv("OES_FAST_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    for (CpuIsa isa : {CpuIsa::baseline, CpuIsa::avx2, CpuIsa::avx512}) {
      if (std::strcmp(forced, cpu_isa_name(isa)) == 0) {
        TORCH_CHECK(supported(isa), "OES_FAST_CPU_ISA=", forced,
                    ": this CPU (or this build) cannot run it; it can run: ", c10::Join(", ", cpu_isas_supported()));
        return isa;
      }
    }
    TORCH_CHECK(false, "OES_FAST_CPU_ISA must be one of baseline, avx2, avx512 (or unset), got '", forced, "'");
  }
  if (supported(CpuIsa::avx512)) return CpuIsa::avx512;
  if (supported(CpuIsa::avx2)) return CpuIsa::avx2;
  return CpuIsa::baseline;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = choose();  // a throw leaves it unset: the next call tries again
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx2:
      return "avx2";
    case CpuIsa::avx512:
      return "avx512";
    default:
      return "baseline";
  }
}

int64_t l1_data_cache_bytes() {
#ifdef _SC_LEVEL1_DCACHE_SIZE
  static const int64_t bytes = reported_or(sysconf(_SC_LEVEL1_DCACHE_SIZE), 32 * 1024);
#else
  static const int64_t bytes = 32 * 1024;
#endif
  return bytes;
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {  // a throw leaves it unset, as cpu_isa()
    const char* forced = std::getenv("OES_FAST_L2_CACHE_BYTES");
    if (forced != nullptr && forced[0] != '\0') {
      char* end = nullptr;
      const long long value = std::strtoll(forced, &end, 10);
      TORCH_CHECK(*end == '\0' && value > 0,
                  "OES_FAST_L2_CACHE_BYTES must be a positive whole number of bytes (or unset), got '", forced, "'");
      return int64_t(value);
    }
#ifdef _SC_LEVEL2_CACHE_SIZE
    return reported_or(sysconf(_SC_LEVEL2_CACHE_SIZE), 1024 * 1024);
#else
    return int64_t(1024) * 1024;
#endif
  }();
  return bytes;
}

std::vector<std::string> cpu_isas_supported() {
  std::vector<std::string> names;
  for (CpuIsa isa : {CpuIsa::baseline, CpuIsa::avx2, CpuIsa::avx512}) {
    if (supported(isa)) names.emplace_back(cpu_isa_name(isa));
  }
  return names;
}

}  // namespace oes_fast
