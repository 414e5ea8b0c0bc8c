// CPU kernels of avg_pool2x2 and avg_pool2x2_backward, over a range of output rows (the ATen
// side, which splits the rows among threads, is avg_pool2x2.cpp). Output row r of the
// (N * C * H2) output rows is row i = r % H2 of plane r / H2; it reads or writes input rows
// 2i and 2i + 1 of that plane. One pass: each input element is read (forward) or written
// (backward) once.
// Included once per instruction set by per_isa.h: no includes, no include guard; everything in
// the copy's namespace with internal linkage.

// The build's -ffast-math allows reassociation, which would turn ((a + b) + c) + d into
// (a + b) + (c + d) (and the vector loop and its scalar remainder might differ): keep the
// written order, so every output has the bits of the torch expression it replaces.
#pragma GCC push_options
#pragma GCC optimize("no-associative-math")

namespace oes_fast {
namespace OES_FAST_ISA_NS {
namespace {

template <typename scalar_t>
void pool_rows(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, int64_t h, int64_t w) {
  const int64_t h2 = h / 2, w2 = w / 2;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* a = in + (r / h2) * h * w + (r % h2) * 2 * w;  // row 2i; row 2i + 1 is a + w
    const scalar_t* b = a + w;
    scalar_t* o = out + r * w2;
#pragma omp simd
    for (int64_t j = 0; j < w2; ++j) {
      o[j] = (((a[2 * j] + a[2 * j + 1]) + b[2 * j]) + b[2 * j + 1]) * scalar_t(0.25);
    }
  }
}

template <typename scalar_t>
void unpool_rows(const scalar_t* grad, scalar_t* grad_in, int64_t begin, int64_t end, int64_t h, int64_t w) {
  const int64_t h2 = h / 2, w2 = w / 2;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t i = r % h2;
    scalar_t* a = grad_in + (r / h2) * h * w + i * 2 * w;
    scalar_t* b = a + w;
    const scalar_t* g = grad + r * w2;
#pragma omp simd
    for (int64_t j = 0; j < w2; ++j) {
      const scalar_t v = g[j] * scalar_t(0.25);
      a[2 * j] = v;
      a[2 * j + 1] = v;
      b[2 * j] = v;
      b[2 * j + 1] = v;
    }
    if (w & 1) a[w - 1] = b[w - 1] = scalar_t(0);
    // the plane's dropped odd last row, by the task that owns the plane's last output row
    if ((h & 1) && i == h2 - 1) {
      for (int64_t j = 0; j < w; ++j) b[w + j] = scalar_t(0);
    }
  }
}

}  // namespace
}  // namespace OES_FAST_ISA_NS
}  // namespace oes_fast

#pragma GCC pop_options
