// The package's one random stream (engineering.md, "Random numbers"): Philox4x32 with 10
// rounds, key = (seed lo, seed hi), counter = (offset lo, offset hi, 0, 0); the first output
// word becomes a float32 uniform exactly as Triton's tl.rand(seed, offset) makes it.
// Shared by the CPU (C++) and CUDA kernels so all backends give bit-identical uniforms.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define OES_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OES_HOST_DEVICE inline
#endif

namespace oes_fast {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
// tl.rand's scale: float32(4.6566127342e-10), about 2^-31.
constexpr float kUniformScale = 4.6566127342e-10f;
// Uniforms are clamped to [2^-24, 1 - 2^-24] before the logs (both ends exact in float32).
constexpr float kUniformMin = 5.9604644775390625e-08f;
constexpr float kUniformMax = 0.99999994039535522f;

// First word of Philox4x32-10 for counter (c0, c1, 0, 0) and key (k0, k1).
OES_HOST_DEVICE uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0u, c3 = 0u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint32_t next_c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t next_c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = next_c0;
    c2 = next_c2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// Uniform in [0, 1] (both ends possible) for element `offset` of stream `seed`.
OES_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t offset) {
  const uint32_t word = philox_first_word(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

OES_HOST_DEVICE float clamp_uniform(float u) {
  return u < kUniformMin ? kUniformMin : (u > kUniformMax ? kUniformMax : u);
}

}  // namespace oes_fast
