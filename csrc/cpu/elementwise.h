// Per-element pieces shared by the CPU kernels of gumbel_mask, kl_prior and logit_adam_step.
// Each kernel cuts its work into tiles of kTile elements counted from the start of the tensor
// and hands every tile to one non-inlined tile function whose loops have a constant trip count:
// full tiles in place, the last partial tile through zero-padded local copies (load_tile,
// store_tile). So an element gets the same bits whatever its position, the thread split or the
// launch (one compiled loop for all, no scalar remainder), and full tiles, nearly all of the
// work, run straight from memory, where loads overlap the arithmetic.
//
// Included by the kernels file of each of those ops, which per_isa.h includes once per
// instruction set: so no include guard and no includes here (the .cpp includes <ATen/OpMathType.h>,
// <cmath>, <cstdint>, <immintrin.h> and ../philox.h before per_isa.h), and everything below
// lives in the copy's namespace with internal linkage.
#ifndef OES_FAST_ISA_NS
#error "elementwise.h is included by a kernels file inside per_isa.h"
#endif

// One compiled copy of a tile function, whatever calls it (see above).
#ifndef OES_TILE_FN
#define OES_TILE_FN __attribute__((noinline))
#endif

namespace oes_fast {
namespace OES_FAST_ISA_NS {
namespace {

constexpr int64_t kTile = 256;
constexpr double kKlEps = 1e-6;  // the OES authors' epsilon inside the prior's logs

// s = sigmoid(x) = 1 / (1 + exp(-x)), returned, and its complement 1 - s in `complement`, taken
// as exp(-x) * s: where s is nearly 1, 1 - s would cancel to a few bits (about 20 % off in float32
// at x = 15), and so would the derivative s * (1 - s). -x is capped below the overflow of exp:
// under -ffast-math the vector division 1 / (1 + inf) gives NaN, not 0; the cap changes nothing
// representable (s is then below 1e-34 in float32, 1e-304 in float64).
template <typename acc_t>
inline acc_t sigmoid_and_complement(acc_t x, acc_t& complement) {
  const acc_t max_neg_x = sizeof(acc_t) == 4 ? acc_t(80) : acc_t(700);
  const acc_t neg_x = -x;
  const acc_t e = std::exp(neg_x < max_neg_x ? neg_x : max_neg_x);
  // 1 where 1 + e rounds to 1: -ffast-math divides float vectors by an estimated reciprocal and
  // a Newton step, and AVX2's 12-bit estimate makes 1 / 1 come out 0.99999994 (saturated masks
  // one ulp below 1; AVX-512's 14-bit estimate gives 1)
  const acc_t d = acc_t(1) + e;
  const acc_t s = d == acc_t(1) ? acc_t(1) : acc_t(1) / d;
  complement = e * s;
  return s;
}

template <typename acc_t>
struct alignas(64) Tile {
  acc_t a[kTile];
  acc_t b[kTile];
  acc_t c[kTile];
};

// philox_uniforms with AVX-512 intrinsics: in the isa_avx512 copy, or in every copy of a build
// whose flags enable AVX-512. (In C++ gcc does not define __AVX512F__ inside a `#pragma GCC
// target` region: it cannot be the test alone.)
#if OES_FAST_VEC_BYTES == 64 || defined(__AVX512F__)
#define OES_FAST_PHILOX_AVX512 1
#else
#define OES_FAST_PHILOX_AVX512 0
#endif
// and with AVX2 intrinsics in the isa_avx2 copy (or a build whose flags enable AVX2)
#if !OES_FAST_PHILOX_AVX512 && (OES_FAST_VEC_BYTES == 32 || defined(__AVX2__))
#define OES_FAST_PHILOX_AVX2 1
#else
#define OES_FAST_PHILOX_AVX2 0
#endif

#if OES_FAST_PHILOX_AVX512
// High and low 32 bits of the 32x32-bit products a * b, 16 lanes.
inline void mul_hi_lo(__m512i a, __m512i b, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, b);                         // lanes 0, 2, ... as 64-bit products
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);  // lanes 1, 3, ...
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mullo_epi32(a, b);
}
#endif

#if OES_FAST_PHILOX_AVX2
// The same, 8 lanes.
inline void mul_hi_lo(__m256i a, __m256i b, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
#endif

#if OES_FAST_PHILOX_AVX512 || OES_FAST_PHILOX_AVX2
// philox_first_word's ten rounds on a vector of counters (c0, c1, 0, 0) with key (k0, k1): the
// first output words. `splat` broadcasts a word, `xor3` is the three-way xor.
template <typename V, typename Splat, typename Xor3>
inline V philox_rounds(V c0, V c1, uint32_t k0, uint32_t k1, Splat splat, Xor3 xor3) {
  const V round_a = splat(kPhiloxRoundA), round_b = splat(kPhiloxRoundB);
  V c2 = splat(0u), c3 = splat(0u);
  for (int round = 0; round < 10; ++round) {
    V hi_a, lo_a, hi_b, lo_b;
    mul_hi_lo(c0, round_a, hi_a, lo_a);
    mul_hi_lo(c2, round_b, hi_b, lo_b);
    c0 = xor3(hi_b, c1, splat(k0));
    c2 = xor3(hi_a, c3, splat(k1));
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}
#endif

// philox_uniform(seed, first_offset + i) for i < n, bit for bit. With AVX-512, 16 counters per
// vector with the 32x32->64-bit products of vpmuludq: twice as fast as what gcc makes of
// philox_first_word, which widens every lane to 64 bits. With AVX2, 8 counters a vector the same
// way (gcc's widened lanes went through lane-crossing permutes: the gumbel mask of 3 million
// weights took 31 ms on Zen 3, 1 thread).
inline void philox_uniforms(uint64_t seed, uint64_t first_offset, int64_t n, float* u) {
  int64_t i = 0;
#if OES_FAST_PHILOX_AVX512
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  auto splat = [](uint32_t w) { return _mm512_set1_epi32(static_cast<int>(w)); };
  auto xor3 = [](__m512i a, __m512i b, __m512i c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); };
  for (; i + 16 <= n; i += 16) {
    const uint64_t first = first_offset + static_cast<uint64_t>(i);
    const __m512i first_lo = splat(static_cast<uint32_t>(first));
    const __m512i c0 = _mm512_add_epi32(first_lo, iota);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, first_lo);  // the low word wrapped
    const __m512i high = splat(static_cast<uint32_t>(first >> 32));
    const __m512i c1 = _mm512_mask_add_epi32(high, carry, high, splat(1u));
    const __m512i word =
        philox_rounds(c0, c1, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), splat, xor3);
    const __m512i x = _mm512_xor_si512(word, _mm512_srai_epi32(word, 31));  // x < 0 ? ~x : x
    _mm512_storeu_ps(u + i, _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(kUniformScale)));
  }
#elif OES_FAST_PHILOX_AVX2
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  auto splat = [](uint32_t w) { return _mm256_set1_epi32(static_cast<int>(w)); };
  auto xor3 = [](__m256i a, __m256i b, __m256i c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); };
  const __m256i sign = splat(0x80000000u);
  for (; i + 8 <= n; i += 8) {
    const uint64_t first = first_offset + static_cast<uint64_t>(i);
    const __m256i first_lo = splat(static_cast<uint32_t>(first));
    const __m256i c0 = _mm256_add_epi32(first_lo, iota);
    // the low word wrapped where c0 < first_lo unsigned (signed compare of sign-flipped words): -1 there
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(first_lo, sign), _mm256_xor_si256(c0, sign));
    const __m256i c1 = _mm256_sub_epi32(splat(static_cast<uint32_t>(first >> 32)), carry);
    const __m256i word =
        philox_rounds(c0, c1, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), splat, xor3);
    const __m256i x = _mm256_xor_si256(word, _mm256_srai_epi32(word, 31));  // x < 0 ? ~x : x
    _mm256_storeu_ps(u + i, _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale)));
  }
#endif
  for (; i < n; ++i) u[i] = philox_uniform(seed, first_offset + static_cast<uint64_t>(i));
}

// Logistic noise log(u) - log(1 - u) of kTile consecutive offsets, u clamped, computed as
// log(u / (1 - u)): one vector log instead of two, these kernels' largest cost.
template <typename acc_t>
inline void logistic_noise_tile(uint64_t seed, uint64_t first_offset, acc_t* noise) {
  alignas(64) float u[kTile];
  philox_uniforms(seed, first_offset, kTile, u);
#pragma omp simd
  for (int64_t i = 0; i < kTile; ++i) {
    const acc_t v = static_cast<acc_t>(clamp_uniform(u[i]));
    noise[i] = std::log(v / (acc_t(1) - v));
  }
}

// n elements of src into dst as acc_t, the rest of the tile zero.
template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* src, int64_t n, acc_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  for (int64_t i = n; i < kTile; ++i) dst[i] = acc_t(0);
}

template <typename scalar_t, typename acc_t>
inline void store_tile(const acc_t* src, int64_t n, scalar_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// The OES prior KL(Bernoulli(s) || Bernoulli(rho)) of one logit p, s = sigmoid(p), and its
// derivative in p; log_rho = log(rho), log_not_rho = log(1 - rho).
template <typename acc_t>
inline void kl_term(acc_t p, acc_t log_rho, acc_t log_not_rho, acc_t& value, acc_t& grad) {
  const acc_t eps = static_cast<acc_t>(kKlEps);
  acc_t c;  // 1 - s, accurate where s is nearly 1 (where 1 - s + eps would lose eps's digits)
  const acc_t s = sigmoid_and_complement<acc_t>(p, c);
  const acc_t log_a = std::log(s + eps) - log_rho;
  const acc_t log_b = std::log(c + eps) - log_not_rho;
  value = s * log_a + c * log_b;
  // s / (s + eps) - (1 - s) / (1 - s + eps), over one division
  const acc_t ratio_diff = eps * (s - c) / ((s + eps) * (c + eps));
  const acc_t dkl_ds = log_a - log_b + ratio_diff;
  grad = dkl_ds * (s * c);
}

}  // namespace
}  // namespace OES_FAST_ISA_NS
}  // namespace oes_fast

#undef OES_FAST_PHILOX_AVX512
#undef OES_FAST_PHILOX_AVX2
