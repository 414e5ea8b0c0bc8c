// The CPU kernels of sparse_conv2d (forward, input gradient, weight gradient), written once and
// compiled once per instruction set: csrc/cpu/sparse_conv2d.cpp includes this file three times,
// each time with OES_FAST_ISA_NS naming the namespace of that copy (isa_baseline, isa_avx2,
// isa_avx512) and, for the last two, inside a `#pragma GCC target` region. So this file includes
// no library header (only vectors.h, its vector types, made per copy like itself): every library
// header is included before the first region, which keeps the library's inline functions and
// templates (std::vector, at::parallel_for, ...) compiled once, at the baseline flags; only what
// is defined here, in its own namespace with internal linkage, gets the wider instructions. No
// include guard, on purpose.
//
// Vectors are GCC vector extensions of OES_FAST_VEC_BYTES bytes, one register of the copy's
// instruction set: 64 (zmm) for AVX-512, 32 (ymm) for AVX2, 16 (xmm) at the baseline. (A vector
// type wider than the registers is not split into registers by gcc: its operations go through
// the stack, which made a 64-byte vector on AVX2 slower than the SSE2 baseline.) The arithmetic
// of each output is the same in every copy (FMA contracted where the instruction set has FMA,
// so the baseline's bits differ from the other two); horizontal sums (weight gradient, the
// statistics) add lanes in a different grouping per vector width.
#if !defined(OES_FAST_ISA_NS) || !defined(OES_FAST_VEC_BYTES)
#error "define OES_FAST_ISA_NS and OES_FAST_VEC_BYTES before including sparse_conv2d_kernels.h"
#endif

#include "vectors.h"     // vec_t<T>, kLanes<T>, IndexVecOf<T>
#include "activation.h"  // activate_row: the input prologue (SparseConvGeometry::act_scale)

namespace oes_fast {
namespace OES_FAST_ISA_NS {
namespace {

// 4 independent accumulators a block (4 vectors of one row, or 1 vector of 4 rows).
constexpr int kNV = 4;
// Output rows per task: the taps' source rows of a tile stay in L1/L2 while all its output
// channels run (tasks iterate output channels fastest).
constexpr int64_t kRowTile = 8;

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V, typename T>
inline V broadcast(T s) {
  return V{} + s;
}

// Padded coordinate -> input coordinate; -1 where zero padding reads a zero.
inline int64_t source_index(int64_t i, int64_t n, bool reflect) {
  if (reflect) {
    i = i < 0 ? -i : i;
    return i >= n ? 2 * (n - 1) - i : i;
  }
  return (i >= 0 && i < n) ? i : -1;
}
inline int64_t source_index(int64_t i, int64_t n, const SparseConvGeometry& g) {
  if (g.replicate) return i < 0 ? 0 : (i >= n ? n - 1 : i);
  return source_index(i, n, g.reflect);
}

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 by one multiply: m = ceil(2^62 / d) makes n * m / 2^62
// exceed n / d by less than 2^-31, too little to reach the next integer. Decoding the taps'
// col_idx with 64-bit divisions cost 5-12 ns a tap: most of a small layer's time (26,500 taps
// at 8x8: 0.14 ms of the forward's 0.20 ms, measured with a 1x1 image).
struct Divider {
  explicit Divider(int64_t d)
      : m(static_cast<uint64_t>(((static_cast<unsigned __int128>(1) << 62) + static_cast<uint64_t>(d) - 1) /
                                static_cast<uint64_t>(d))) {}
  int64_t operator()(int64_t n) const {
    return static_cast<int64_t>((static_cast<unsigned __int128>(static_cast<uint64_t>(n)) * m) >> 62);
  }
  uint64_t m;
};

// Halo offset of each tap position r = ky * KW + kx within a channel's rows (`Wa` apart), and the
// halo offset of tap col_idx value i: channel i / KK, position i % KK. In a shifted window
// (shifted_window: KW column-shifted copies of each channel's rows) column kx is read from copy
// kx at column 0.
struct TapOffsets {
  TapOffsets(const SparseConvGeometry& g, int64_t rows_h, int64_t Wa, bool shifted = false)
      : by_kk(g.KH * g.KW), kk(g.KH * g.KW), channel((shifted ? g.KW : 1) * rows_h * Wa), position(g.KH * g.KW) {
    for (int64_t r = 0; r < kk; ++r) {
      const int64_t ky = r / g.KW, kx = r % g.KW;
      position[r] = shifted ? (kx * rows_h + ky) * Wa : ky * Wa + kx;
    }
  }
  int64_t operator()(int64_t i) const {
    const int64_t c = by_kk(i);
    return c * channel + position[i - c * kk];
  }
  // off[k] = (*this)(ci[k]) for the n taps ci of a conv with C_in input channels: through a
  // table of every col_idx value where there are fewer of those than taps. Decoding each tap
  // (a 128-bit multiply, a lookup) took about 1.6 ns: on the deep layers (down.5.conv2, 26,521
  // taps at 8x8) 60 % as long as their multiply-adds.
  void decode(const int32_t* ci, int64_t n, int64_t C_in, int64_t* off) const {
    const int64_t values = C_in * kk;
    if (values >= n) {
      for (int64_t k = 0; k < n; ++k) off[k] = (*this)(ci[k]);
      return;
    }
    std::vector<int64_t> table(values);
    for (int64_t c = 0; c < C_in; ++c)
      for (int64_t r = 0; r < kk; ++r) table[c * kk + r] = c * channel + position[r];
    for (int64_t k = 0; k < n; ++k) off[k] = table[ci[k]];
  }
  Divider by_kk;
  int64_t kk, channel;
  std::vector<int64_t> position;
};

// gw[k] = the sum over the `parts` rows of partial ([parts][nnz], float64) at k, in row order:
// the weight gradients' (and the statistics') per-task partials, added the same way whatever the
// thread count.
template <typename Out>
void sum_partials(const std::vector<double>& partial, int64_t parts, int64_t nnz, Out* gw) {
  at::parallel_for(0, nnz, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      double s = 0.0;
      for (int64_t p = 0; p < parts; ++p) s += partial[p * nnz + k];
      gw[k] = static_cast<Out>(s);
    }
  });
}

// The batch-norm statistics' per-task lane sums (partial: [tasks][C][2][L] in float64, as
// store_block adds them) summed over the tasks in order, then over the lanes in order: stats
// [C][2]. Each channel's sums come from the tasks of its group (the rest hold zeros), in tile
// order, whatever the thread count.
template <typename T>
void sum_stat_lanes(const std::vector<double>& partial, int64_t tasks, int64_t C, double* stats) {
  constexpr int64_t L = kLanes<T>;
  std::vector<double> lanes(C * 2 * L);
  sum_partials(partial, tasks, C * 2 * L, lanes.data());
  for (int64_t i = 0; i < C * 2; ++i) {
    double s = 0.0;
    for (int64_t l = 0; l < L; ++l) {
      s += lanes[i * L + l];
      in_order(s);
    }
    stats[i] = s;
  }
}

// Stride-1 output columns whose taps all read inside the row: [lo, hi).
inline void interior_columns(const SparseConvGeometry& g, int64_t* lo, int64_t* hi) {
  *lo = std::min(g.PW, g.W_out);
  *hi = std::max(*lo, std::min(g.W_out, g.W - g.KW + g.PW + 1));
}

// Input rows of one row tile, all input channels, padded in the copy: the padding is applied
// while the tile is loaded (the padded tensor never exists), so every output column, border
// or not, takes the vector path. kHaloBytes keeps the tile within the L2 of one core, down to
// kMinTileRows output rows: on wide images fewer rows would load each input row up to KH times
// (a 5x5 layer 2048 wide got 1-row tiles), more than a tile spilling to L3 costs. 32 rows rather
// than 8: the generator's first conv (its pooled form on 32 channels of z, 512x512) then reads z
// in longer runs and fewer of its rows twice, forward 6.0 -> 4.4-4.7 ms and weight gradient 6.2
// -> 4.7-4.9 ms (1 thread, cache flushed between calls); the Sparse-DIP step 84.5 -> 82.0 ms at
// 512x512 (four alternating pairs), even at 1024 and 2048.
constexpr int64_t kHaloBytes = 512 * 1024;
constexpr int64_t kMinTileRows = 32;

// The row tiling of a halo kernel (forward and weight gradient share it): rows of `Wa` elements
// (the padded width and a vector of slack), `tile` output rows per tile, `rows_h` halo rows.
struct HaloPlan {
  int64_t Wa, tile, n_tiles, rows_h;
};

// A zeroed buffer of n elements whose first element sits on a 64-byte boundary: with Wa a whole
// number of vectors, every halo row starts on a vector boundary, and so do the loads of taps at
// column shift 0 (the others straddle cache lines whatever we do).
template <typename T>
struct AlignedBuffer {
  explicit AlignedBuffer(int64_t n) : store(n + 64 / sizeof(T), T(0)) {
    const auto address = reinterpret_cast<uintptr_t>(store.data());
    data = store.data() + ((64 - address % 64) % 64) / sizeof(T);
  }
  std::vector<T> store;
  T* data;
};

template <typename T>
HaloPlan plan_halo(const SparseConvGeometry& g) {
  HaloPlan p;
  // a vector of slack (loads of the last partial vector stay inside), rounded to whole vectors
  const int64_t L = kLanes<T>;
  p.Wa = ((g.W_out - 1) * g.SW + g.KW + L + L - 1) / L * L;
  const int64_t budget_rows = kHaloBytes / (int64_t(sizeof(T)) * std::max<int64_t>(1, g.C_in) * p.Wa);
  const int64_t fit = budget_rows >= g.KH ? (budget_rows - g.KH) / g.SH + 1 : 0;
  p.tile = std::max<int64_t>(1, std::min(g.H_out, std::max(kMinTileRows, fit)));
  p.n_tiles = (g.H_out + p.tile - 1) / p.tile;
  // tiles of equal height: a short last tile left one thread idle (up.3's input gradient, 66 rows
  // as 32 + 32 + 2, ran 1.1x faster on 2 threads than on 1)
  p.tile = (g.H_out + p.n_tiles - 1) / p.n_tiles;
  p.rows_h = (p.tile - 1) * g.SH + g.KH;
  return p;
}

// The row tiling of forward_kernel's planes (its narrow rows): tiles whose planes (every input
// channel's KW shifted copies) take at most kPlaneBytes, in whole blocks of 16 vectors where such
// a block is whole rows, and at least kMinPlaneRows rows (each tile loads KH - 1 halo rows more).
// The budget is the next layer's as much as this one's: with planes of up to 512 KB or 1 MB, up.4
// of the generator (91 channels, 32x32) ran 1.23-1.28x faster in the network, but the stage after
// it (up.3, which reads up.4's output) 0.90-0.93x as fast; with 256 KB, 1.33x and 1.00x (1
// thread, 512x512, rounds of five builds in shuffled turns; docs/performance.md). Tiles hold at
// least one 8-vector block where that is whole rows: down.4.conv2 (16 rows of 16) in tiles of 6,
// 6 and 4 rows, 4-vector blocks with lanes to spare, ran 0.85x as fast as the rows' blocks on 2
// threads; in tiles of 8, 1.28x.
constexpr int64_t kPlaneBytes = 256 * 1024;
constexpr int64_t kMinPlaneRows = 4;

template <typename T>
HaloPlan plan_planes(const SparseConvGeometry& g, HaloPlan p) {  // p: plan_halo's (its Wa: the halo's rows)
  const int64_t L = kLanes<T>;
  const int64_t row_bytes = int64_t(sizeof(T)) * std::max<int64_t>(1, g.C_in) * g.KW * g.W_out;
  int64_t rows = std::max(kMinPlaneRows, kPlaneBytes / row_bytes - g.KH);
  if (8 * L % g.W_out == 0) rows = std::max(rows, 8 * L / g.W_out);  // at least one 8-vector block
  const int64_t unit = 16 * L % g.W_out == 0 ? 16 * L / g.W_out : 1;  // rows of a 16-vector block
  if (rows >= unit) rows = rows / unit * unit;
  p.tile = std::min(g.H_out, rows);
  p.n_tiles = (g.H_out + p.tile - 1) / p.tile;
  // tiles of equal height (plan_halo) unless that splits the blocks
  if (p.tile % unit != 0 || g.H_out % p.tile != 0) p.tile = (g.H_out + p.n_tiles - 1) / p.n_tiles;
  p.rows_h = (p.tile - 1) * g.SH + g.KH;
  return p;
}

// The loaders walk each channel's stored rows downwards, one row at a time with other work in
// between, and the hardware prefetchers did not keep up: loads of the input stalled. So each
// row load asks for the row kPrefetchRows below it (the generator's first conv, the pooled form
// reading 32 channels of z at 512x512, 1 thread: forward 5.7 -> 3.1-3.3 ms, its input load alone
// 4.7 -> 1.8-2.0 ms; 1 row ahead 3.5 ms, 4 rows 3.0-3.3 ms).
constexpr int64_t kPrefetchRows = 2;

// (always_inline: gcc 12 finds a function that only prefetches free of side effects and drops
// calls to it; inlined early, the prefetches stay in the loader)
template <typename T>
__attribute__((always_inline)) inline void prefetch_row_ahead(const T* row, int64_t i, int64_t rows, int64_t width) {
  if (i + kPrefetchRows >= rows) return;
  const T* ahead = row + kPrefetchRows * width;
  for (int64_t j = 0; j < width; j += 64 / int64_t(sizeof(T))) __builtin_prefetch(ahead + j, 0, 3);
}

// dst[0, n) = input channel c's stored row src through g's prologue (act_scale: a batch norm's
// apply and LeakyReLU, then post_scale: a second batch norm's apply), each stage rounded to T as
// batch_norm_leaky_relu stores it.
template <typename T>
inline void prologue_row(const T* src, T* dst, int64_t n, const SparseConvGeometry& g, int64_t c) {
  if (g.post_scale == nullptr) {
    activate_row(src, dst, n, g.act_scale[c], g.act_shift[c], g.act_slope);
  } else {
    activate_row_twice(src, dst, n, g.act_scale[c], g.act_shift[c], g.act_slope, g.post_scale[c], g.post_shift[c]);
  }
}

template <typename T>
void load_halo(const T* x, T* halo, int64_t rows_h, int64_t rows_load, int64_t Wa, int64_t y_in0,
               const SparseConvGeometry& g, int64_t n) {
  const int64_t Wp = (g.W_out - 1) * g.SW + g.KW;
  std::vector<T> act_row(g.act_scale != nullptr ? g.W_src : 0);
  for (int64_t c = 0; c < g.C_in; ++c) {
    for (int64_t hr = 0; hr < rows_load; ++hr) {
      T* dst = halo + (c * rows_h + hr) * Wa;
      const int64_t iy = source_index(y_in0 + hr, g.H, g);
      if (iy < 0) {
        std::fill(dst, dst + Wp, T(0));
        continue;
      }
      // nearest upsampling fused into the load: upsampled pixel i reads stored pixel i / U
      const T* src = x + ((n * g.C_in + c) * g.H_src + iy / g.U) * g.W_src;
      prefetch_row_ahead(src, iy / g.U, g.H_src, g.W_src);
      if (g.act_scale != nullptr) {  // the prologue: the stored row activated, then read as x's
        prologue_row(src, act_row.data(), g.W_src, g, c);
        src = act_row.data();
      }
      const int64_t lo = std::min(g.PW, Wp), hi = std::min(Wp, g.PW + g.W);
      for (int64_t j = 0; j < lo; ++j) {
        const int64_t ix = source_index(j - g.PW, g.W, g);
        dst[j] = ix < 0 ? T(0) : src[ix / g.U];
      }
      // the interior: pixels 0 .. n_up - 1 of the (upsampled) row, from dst + PW (or none)
      T* d = dst + lo;
      const int64_t n_up = hi - lo;
      if (g.U == 1) {
        std::memcpy(d, src, sizeof(T) * n_up);
      } else {
        int64_t i = 0;
        if (g.U == 2) {
          for (; i + 2 <= n_up; i += 2) d[i] = d[i + 1] = src[i >> 1];  // the network's 2x: no division
        }
        for (; i < n_up; ++i) d[i] = src[i / g.U];
      }
      for (int64_t j = hi; j < Wp; ++j) {
        const int64_t ix = source_index(j - g.PW, g.W, g);
        dst[j] = ix < 0 ? T(0) : src[ix / g.U];
      }
    }
  }
}

// The stored row that padded row i of conv g's input reads; -1 where the padding reads zeros or i
// is past the padded rows (padded_row, BoxRowPrefetch).
inline int64_t padded_source_row(int64_t i, const SparseConvGeometry& g) {
  return i < g.H + 2 * g.PH ? source_index(i - g.PH, g.H, g) : -1;
}

// dst[j] = row i of the padded input of conv g (its padding applied), for j < len: zeros past
// the padded size (rows and columns that only feed values no output reads). With g's prologue
// (act_scale) the row is activated into act_row (g.W values) first. With `prefetch`, asks for
// the stored row kPrefetchRows below (the caller that passes false prefetches on its own).
template <typename T>
void padded_row(const T* x, int64_t i, T* dst, int64_t len, const SparseConvGeometry& g, int64_t n, int64_t c,
                T* act_row, bool prefetch = true) {
  const int64_t Wx = g.W + 2 * g.PW;
  const int64_t iy = padded_source_row(i, g);
  if (iy < 0) {
    std::fill(dst, dst + len, T(0));
    return;
  }
  const T* src = x + ((n * g.C_in + c) * g.H + iy) * g.W;
  if (prefetch) prefetch_row_ahead(src, iy, g.H, g.W);
  if (g.act_scale != nullptr) {
    prologue_row(src, act_row, g.W, g, c);
    src = act_row;
  }
  auto edge = [&](int64_t j) {
    const int64_t ix = j < Wx ? source_index(j - g.PW, g.W, g) : -1;
    dst[j] = ix < 0 ? T(0) : src[ix];
  };
  const int64_t lo = std::min(g.PW, len), hi = std::max(lo, std::min(len, g.PW + g.W));
  for (int64_t j = 0; j < lo; ++j) edge(j);
  T* d = dst + lo;
  for (int64_t j = 0; j < hi - lo; ++j) d[j] = src[j];
  for (int64_t j = hi; j < len; ++j) edge(j);
}

// The lane masks that split two vectors (a, b) = 2 L consecutive elements into their even and odd
// elements, and that take the L elements from a's second on.
template <typename T>
struct Deinterleave {
  using M = typename IndexVecOf<T>::type;
  Deinterleave() {
    for (int64_t l = 0; l < kLanes<T>; ++l) {
      even[l] = 2 * l;
      odd[l] = 2 * l + 1;
      shift[l] = l + 1;
    }
  }
  M even, odd, shift;  // shift: (a, b) -> a's lanes 1.. then b's lane 0
};

// The box mean's loader asks for the stored row kBoxPrefetchRows padded rows below the one it reads,
// two lines at a time between the box mean's vectors (BoxRowPrefetch), instead of padded_row's
// burst of a whole row into L1. With the burst the memory
// stream ran only while rows were copied and stopped during the box mean: the generator's first
// conv (the pooled form of 32 channels of z, 512x512, 1 thread, its input from memory) spent
// 3.0 ms copying rows and 1.2 ms on the box mean, 4.2 ms for both. Spread, the conv's forward and
// weight gradient ran 1.12-1.20x faster (bench/kernel_ab.py --flush; 2, 3, 4 or 6 rows ahead and
// locality 1 or 2 all within that; locality 3 1.03-1.05x). Non-temporal (locality 0,
// prefetchnta): a pooled conv reads each input row once, the first one all of z's 33.5 MB per
// step, and with a hint that keeps them out of the last-level cache the rest of the network's
// data and code stay there. On
// the Zen 5 EPYC (1 MiB of L2, 32 MiB of L3; docs/performance.md) the first conv alone ran as
// fast (kernel_ab.py --flush: 1.00x) and the whole forward 1.02-1.05x faster, the step 1.03x
// (bench/step_ab.py, alternating processes). A prefetch changes no value.
constexpr int64_t kBoxPrefetchRows = 4;

template <typename T>
struct BoxRowPrefetch {
  // stored row of padded row i of conv g's input (image n, channel c); none past the padded rows
  BoxRowPrefetch(const T* x, int64_t i, const SparseConvGeometry& g, int64_t n, int64_t c)
      : bytes(g.W * int64_t(sizeof(T))) {
    const int64_t iy = padded_source_row(i, g);
    if (iy >= 0) row = reinterpret_cast<const char*>(x + ((n * g.C_in + c) * g.H + iy) * g.W);
  }
  // the row's next two lines
  __attribute__((always_inline)) inline void next() {
    if (row == nullptr) return;
    for (int q = 0; q < 2 && line < bytes; ++q, line += 64) __builtin_prefetch(row + line, 0, 0);
  }
  const char* row = nullptr;
  int64_t bytes, line = 0;
};

// Where a halo kernel reads its input as stride-2 phases (load_halo_phases): `of` is the conv whose
// padded input is read; with box_mean, the phases of its 2x2 box mean instead (the pooled form).
struct PhaseInput {
  const SparseConvGeometry* of;
  bool box_mean;
};

// The halo of a conv reading another conv's padded input xp at stride 2: phase channel
// c' = 4 c + 2 pu + pv, row r, column s holds xp(2 r + pu, 2 s + pv) of channel c, so that the
// reading conv is a stride-1 conv of these phases (no padding of its own). With box_mean it holds
// the box mean B(i, j) = (xp(i, j) + xp(i + 1, j) + xp(i, j + 1) + xp(i + 1, j + 1)) / 4 at
// (2 r + pu, 2 s + pv) instead. Each padded row is made once in a row buffer, and vector shuffles
// split it (or the box mean of two of them) into its two column phases.
template <typename T>
void load_halo_phases(const T* x, T* halo, int64_t rows_h, int64_t rows_load, int64_t Wa, int64_t r0,
                      const PhaseInput& in, int64_t Wp, int64_t n, int64_t c_begin = 0, int64_t c_end = -1) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  const SparseConvGeometry& g = *in.of;
  const Deinterleave<T> split;
  // padded rows of 2 Wp (+ 1 for the box's right neighbour) columns, and the vectors' reach past them
  const int64_t len = 2 * Wp + 1, cap = 2 * ((Wp + L - 1) / L) * L + 2 * L;
  std::vector<T> rows(2 * cap, T(0));
  std::vector<T> act_row(g.act_scale != nullptr ? g.W : 0);
  T* cur = rows.data();
  T* next = rows.data() + cap;
  const V quarter = broadcast<V>(T(0.25));
  // (input channels [c_begin, c_end) only, their phase channels from the halo's start)
  for (int64_t c = c_begin; c < (c_end < 0 ? g.C_in : c_end); ++c) {
    auto dst = [&](int64_t pu, int64_t pv, int64_t hr) {
      return halo + ((4 * (c - c_begin) + 2 * pu + pv) * rows_h + hr) * Wa;
    };
    if (!in.box_mean) {
      for (int64_t hr = 0; hr < rows_load; ++hr) {
        for (int64_t pu = 0; pu < 2; ++pu) {
          padded_row(x, 2 * (r0 + hr) + pu, cur, len, g, n, c, act_row.data());
          T* d0 = dst(pu, 0, hr);
          T* d1 = dst(pu, 1, hr);
          for (int64_t s = 0; s < Wp; s += L) {
            const V a = load<V>(cur + 2 * s), b = load<V>(cur + 2 * s + L);
            store(d0 + s, __builtin_shuffle(a, b, split.even));
            store(d1 + s, __builtin_shuffle(a, b, split.odd));
          }
        }
      }
      continue;
    }
    // B rows 2 r0 .. 2 (r0 + rows_load) - 1, each from padded rows i and i + 1
    padded_row(x, 2 * r0, cur, len, g, n, c, act_row.data(), false);
    for (int64_t i = 2 * r0; i < 2 * (r0 + rows_load); ++i) {
      padded_row(x, i + 1, next, len, g, n, c, act_row.data(), false);
      T* d0 = dst(i % 2, 0, i / 2 - r0);
      T* d1 = dst(i % 2, 1, i / 2 - r0);
      BoxRowPrefetch<T> ahead(x, i + 1 + kBoxPrefetchRows, g, n, c);
      // the column sums v(j) = cur[j] + next[j] in vectors, each made once: B(j) = (v(j) + v(j + 1)) / 4
      // with v(j + 1) shifted in from the vector after (both rows loaded again at j + 1, as
      // before, ran the first conv 1.02-1.03x slower)
      V v_lo = load<V>(cur) + load<V>(next);
      for (int64_t s = 0; s < Wp; s += L) {
        ahead.next();
        const T* p = cur + 2 * s;
        const T* q = next + 2 * s;
        const V v_hi = load<V>(p + L) + load<V>(q + L);
        const V v_next = load<V>(p + 2 * L) + load<V>(q + 2 * L);
        const V a = quarter * (v_lo + __builtin_shuffle(v_lo, v_hi, split.shift));
        const V b = quarter * (v_hi + __builtin_shuffle(v_hi, v_next, split.shift));
        store(d0 + s, __builtin_shuffle(a, b, split.even));
        store(d1 + s, __builtin_shuffle(a, b, split.odd));
        v_lo = v_next;
      }
      std::swap(cur, next);
    }
  }
}

// The taps of a stride-1 conv read the halo at column shifts 0 .. KW - 1 from the output's vector
// boundaries, so with 64-byte vectors all but shift 0 straddle two cache lines, and the register
// blocks ran at about one FMA a cycle, bound by their loads. A shifted window holds rows
// r .. r + rows - 1 of every halo channel in KW copies, copy kx starting at column kx, so that every
// tap loads whole aligned vectors (TapOffsets with shifted). It is made per block of output rows
// (tap_block's R) rather than per tile: a tile's KW copies would not stay in L2. Worth it where
// the copies are few against the multiply-adds (kWindowMaxCost): the up layers, whose masks keep
// about 40 % of the weights; the down layers' 5-15 % do not pay for the copies.
template <typename T>
void shifted_window(const T* halo, int64_t rows_h, int64_t Wa, int64_t r, int64_t rows, const SparseConvGeometry& g,
                    T* window, int64_t window_rows) {
  for (int64_t c = 0; c < g.C_in; ++c) {
    for (int64_t kx = 0; kx < g.KW; ++kx) {
      const T* src = halo + (c * rows_h + r) * Wa + kx;
      T* dst = window + (c * g.KW + kx) * window_rows * Wa;
      // (the last kx columns of a copy are never written: zeros, as the halo's slack)
      for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * Wa, src + i * Wa, sizeof(T) * (Wa - kx));
    }
  }
}

// A block window: rows r .. r + rows - 1 of every halo channel, `width` values from column xo, in
// KW copies (copy kx from column xo + kx) packed `width` apart ([c][kx][row][width]), so that a
// block of outputs at xo reads every tap in whole aligned vectors. Made per block of
// kBlockWindowRows x kBlockWindowVecs outputs in the phase form where pairs run (forward_kernel):
// there a row window (shifted_window) of all input channels outgrows the L1, the halo's rows
// are read across cache lines at column shifts 1 and 2, and the pairs' loads bound the blocks. A
// block window of up.0 (19 channels, 3 copies of 6 rows of 2 vectors) takes 29 KB; its 684
// vector copies are 2.6 % of the block's 26,304 multiply-adds. Zen 5 EPYC, 1 thread, 512x512,
// the published pepper mask, each stage alone in alternating processes (docs/performance.md):
// up.0's stage 3.60-3.66 -> 3.44-3.52 ms, up.1's 1.57-1.58 -> 1.46-1.51 ms, up.2's (a row window
// before) 1.57-1.61 -> 1.52-1.55 ms; blocks of 2 rows x 4 vectors: up.0 3.49-3.52, up.1
// 1.61-1.66 ms. Not for the input gradients' pairs or the up layers' non-phase rows (up.3): the
// training step 1.02x slower. A copy changes no value; the blocks' shape moves the statistics'
// last bits (store_block's lane sums).
constexpr int kBlockWindowRows = 4, kBlockWindowVecs = 2;
// Phase rows of one vector (16 floats: up.4's phases at 512x512) take block windows of 8 rows x
// 1 vector (the pairs' 16 accumulators again); see use_phases_forward.
constexpr int kNarrowBlockWindowRows = 8;

// Whether the phase form's rows of `width` values are read in block windows (the AVX-512 copy):
// whole windows of kBlockWindowVecs vectors, or one vector.
template <typename T>
constexpr bool block_window_rows(int64_t width) {
  return OES_FAST_VEC_BYTES == 64 && (width % (kBlockWindowVecs * kLanes<T>) == 0 || width == kLanes<T>);
}

template <typename T>
void block_window(const T* halo, int64_t rows_h, int64_t Wa, int64_t r, int64_t xo, int64_t rows, int64_t width,
                  const SparseConvGeometry& g, T* window) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  for (int64_t c = 0; c < g.C_in; ++c) {
    for (int64_t kx = 0; kx < g.KW; ++kx) {
      const T* src = halo + (c * rows_h + r) * Wa + xo + kx;
      T* dst = window + (c * g.KW + kx) * rows * width;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < width; j += L) store(dst + i * width + j, load<V>(src + i * Wa + j));
    }
  }
}

// planes + (c KW + kx) plane_rows W_out: rows [0, rows) of input channel c's halo from column kx,
// W_out values each, packed W_out apart (forward_kernel's narrow rows)
template <typename T>
void flat_planes(const T* halo, int64_t rows_h, int64_t Wa, int64_t rows, const SparseConvGeometry& g, T* planes,
                 int64_t plane_rows) {
  const int64_t w = g.W_out;
  for (int64_t c = 0; c < g.C_in; ++c) {
    for (int64_t kx = 0; kx < g.KW; ++kx) {
      const T* src = halo + c * rows_h * Wa + kx;
      T* dst = planes + (c * g.KW + kx) * plane_rows * w;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < w; ++j) dst[i * w + j] = src[i * Wa + j];
    }
  }
}

// The blocks along a run of P values of L lanes (forward_kernel's planes): f(NB, p0) for blocks of
// NB = 16, 8 or 4 vectors (std::integral_constant) from p0. Blocks of at least 4 vectors: fewer
// accumulators wait on the multiply-adds' latency; the last block's lanes past P are computed from
// the planes' slack and not stored.
template <typename F>
__attribute__((always_inline)) inline void flat_blocks(int64_t P, int64_t L, F&& f) {
  int64_t p0 = 0;
  for (; P - p0 >= 16 * L; p0 += 16 * L) f(std::integral_constant<int, 16>{}, p0);
  for (; P - p0 >= 8 * L; p0 += 8 * L) f(std::integral_constant<int, 8>{}, p0);
  for (; P - p0 > 0; p0 += 4 * L) f(std::integral_constant<int, 4>{}, p0);
}

// The vectors those blocks compute, the lanes past P included.
inline int64_t flat_block_vectors(int64_t P, int64_t L) {
  int64_t v = 0;
  flat_blocks(P, L, [&](auto vecs_c, int64_t) { v += decltype(vecs_c)::value; });
  return v;
}

// Planes for narrow rows where rows are whole vectors or the blocks over the planes compute fewer
// vectors than the rows' blocks (a row of W_out values takes ceil(W_out / L) of them). At equal
// counts (rows of 12, 8 + 4 vectors for 12 rows either way) the planes' unaligned loads lost:
// down.5.conv2's input gradient 0.97x.
template <typename T>
bool use_planes(const SparseConvGeometry& g, int64_t rows) {
  constexpr int64_t L = kLanes<T>;
  if (g.W_out % L == 0) return true;
  const int64_t tiles = (g.H_out + rows - 1) / rows;  // (the last tile may be shorter: counted as full)
  return tiles * flat_block_vectors(rows * g.W_out, L) < g.H_out * ((g.W_out + L - 1) / L);
}

// Use shifted windows where their copies (per output row) are at most this share of the
// multiply-adds (per output row, vectors of both), with blocks of `rows` output rows. With
// AVX2's 32-byte vectors an unaligned load straddles a cache line only half the time, and the
// windows save less (Zen 3, rounds alternating both versions in one process, bench/kernel_ab.py):
// up.1's input gradient, copies at 5.2 % of its multiply-adds, ran 1.10x and 1.12x faster
// without them (two runs); the forwards of up.0 and up.1 (3.5 % and 2.9 %) showed 0.96x to 1.08x
// across three runs, no difference; up.2's and up.3's (2.1 % and 0.9 %) lost 7-11 % without.
constexpr double kWindowMaxCost = OES_FAST_VEC_BYTES == 32 ? 0.025 : 0.1;

inline bool use_shifted_window(const SparseConvGeometry& g, int64_t rows) {
  const double copies = double(g.C_in) * g.KW * (rows + g.KH - 1) / rows;
  return g.SW == 1 && g.SH == 1 && g.KW > 1 && copies <= kWindowMaxCost * double(g.nnz);
}

// acc (R rows x NB vectors from column xo) += the m taps (halo offsets off, weights w), in order.
template <typename T, int R, int NB>
__attribute__((always_inline)) inline void add_taps(vec_t<T> (&acc)[R][NB], const T* base, int64_t row_stride,
                                                    const int64_t* off, const T* w, int64_t m, int64_t xo) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  for (int64_t j = 0; j < m; ++j) {
    const T* s = base + off[j] + xo;
    const V wv = broadcast<V>(w[j]);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NB; ++v) acc[r][v] += wv * load<V>(s + r * row_stride + v * L);
  }
}

// Stores the block acc (R rows x NB vectors from column xo; `valid` columns) and, with stats, adds
// its batch-norm statistics.
template <typename T, int R, int NB>
__attribute__((always_inline)) inline void store_block(vec_t<T> (&acc)[R][NB], int64_t xo, T* out,
                                                       int64_t out_stride, int64_t valid, double* stats) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  V sum = {}, sumsq = {};
  if (valid >= NB * L) {
    // every lane stored (all blocks but a row's last): the loops unrolled, so that the sums
    // stay in registers (left to itself gcc kept this loop, spilled them to the stack and
    // copied each to the output in 16-byte halves)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int v = 0; v < NB; ++v) {
        store(out + r * out_stride + xo + v * L, acc[r][v]);
        sum += acc[r][v];
        in_order(sum);
        sumsq += acc[r][v] * acc[r][v];
        in_order(sumsq);
      }
    }
  } else {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < NB; ++v) {
        T* dst = out + r * out_stride + xo + v * L;
        const int64_t lanes = std::min<int64_t>(L, valid - v * L);
        if (lanes == L) {
          store(dst, acc[r][v]);
          sum += acc[r][v];
          in_order(sum);
          sumsq += acc[r][v] * acc[r][v];
          in_order(sumsq);
        } else if (lanes > 0) {
          T tmp[L];
          store(tmp, acc[r][v]);
          std::memcpy(dst, tmp, sizeof(T) * lanes);
          for (int64_t l = 0; l < lanes; ++l) {
            sum[l] += tmp[l];
            sumsq[l] += tmp[l] * tmp[l];
          }
          in_order(sum);
          in_order(sumsq);
        }
      }
    }
  }
  if (stats != nullptr) {
    // batch-norm statistics of what was just stored, lane by lane (sums of at most R * NB values
    // in T, every sum in the order written: in_order above), added to the channel's float64 lane
    // sums (stats: L sums, then L sums of squares; sum_stat_lanes adds the lanes at the end).
    // Adding the lanes here, one after the other, was a chain of 2 L dependent float64 additions a
    // block: about a tenth of up.0's forward.
    for (int64_t l = 0; l < L; ++l) {
      stats[l] += sum[l];
      stats[L + l] += sumsq[l];
    }
  }
}

// R rows x NB vectors of outputs in registers, accumulated over all m taps of one output
// channel; `valid` columns from xo are stored (the last vector may be partial).
template <typename T, int R, int NB>
inline void tap_block(const T* base, int64_t row_stride, const int64_t* off, const T* w, int64_t m, T b, int64_t xo,
                      T* out, int64_t out_stride, int64_t valid, double* stats) {
  vec_t<T> acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NB; ++v) acc[r][v] = broadcast<vec_t<T>>(b);
  add_taps<T, R, NB>(acc, base, row_stride, off, w, m, xo);
  store_block<T, R, NB>(acc, xo, out, out_stride, valid, stats);
}

// tap_block over one slice of an output channel's taps (no statistics), the sums carried from
// slice to slice in `keep` (R * NB vectors): the first slice starts them at b, the last stores
// them. Each sum adds the same taps in the same order as tap_block: the same bits.
template <typename T, int R, int NB>
inline void tap_block_slice(const T* base, int64_t row_stride, const int64_t* off, const T* w, int64_t m, T b,
                            int64_t xo, T* out, int64_t out_stride, int64_t valid, T* keep, bool first, bool last,
                            double* stats = nullptr) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  V acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NB; ++v) acc[r][v] = first ? broadcast<V>(b) : load<V>(keep + (r * NB + v) * L);
  add_taps<T, R, NB>(acc, base, row_stride, off, w, m, xo);
  if (!last) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < NB; ++v) store(keep + (r * NB + v) * L, acc[r][v]);
    return;
  }
  store_block<T, R, NB>(acc, xo, out, out_stride, valid, stats);
}

// Output-channel pairs in the wide rows (forward_kernel, AVX-512 copy; the forwards and the input
// gradients outside slices): two output channels run as one block. The taps both channels have
// run first, each loaded input vector serving both channels' multiply-adds (the wide rows' blocks
// are bound by their loads: one load per multiply-add alone); then each channel's own taps, as
// alone. No multiply-add by a weight of 0: a non-finite input reaches only the outputs whose taps
// read it. A channel's sum adds its shared taps, then its own: other bits than alone, fixed by the
// mask (not by the thread count: channel_groups keeps pairs whole). Pairs are channels a and a +
// stride with a / stride even: stride 1, or 4 in the phase form (the same phase of two consecutive
// output channels; each merged position there collects 1, 2 or 4 of the 3x3 kernel's taps, so a
// channel has taps at about two thirds of the positions and two channels share most). A group of
// pairs is taken where the union of its pairs' taps is at most kPairMaxUnion of their taps
// (docs/performance.md, 1 thread, 512x512, the published pepper mask; with the statistics' lane
// sums, against the code before both): forwards of up.0-up.2 1.21-1.24x (unions of 0.64-0.66),
// up.3 1.09x (0.8); input gradients of up.1-up.3 1.10-1.23x; the down layers' 5x5 convs (unions
// of 0.9-0.95) 0.97-1.11x.
constexpr double kPairMaxUnion = 0.9;

// The cache's kinds of plan (structure_cache.h), one per plan and kernel copy.
constexpr int64_t kPairPlanKind = 10 + OES_FAST_VEC_BYTES / 16, kPhasePlanKind = 20 + OES_FAST_VEC_BYTES / 16,
                  kPooledTapsKind = 30 + OES_FAST_VEC_BYTES / 16;

// The pairs' structure (plan_pairs), kept in the structure cache: the weights' places in the
// conv's values instead of the weights.
struct PairPlan : StructurePlan {
  std::vector<int64_t> first;  // channel a -> its pair's index (a the pair's first channel), else -1
  std::vector<int64_t> rp;     // pair i's taps [rp[i], rp[i + 1]): shared, then a's own, then b's own
  std::vector<int64_t> split;  // [2 i], [2 i + 1]: the ends of pair i's shared taps and of a's own
  std::vector<int32_t> ci;
  std::vector<int64_t> src_a, src_b;  // where the two channels' weights are in the values (-1: none)
  int64_t count = 0;
};

template <typename T>
struct ChannelPairs {
  std::shared_ptr<const PairPlan> plan;  // (holds what the pointers below point into)
  const int64_t* first = nullptr;
  const int64_t* rp = nullptr;
  const int64_t* split = nullptr;
  const int32_t* ci = nullptr;
  std::vector<T> wa, wb;  // the two channels' weights (a's own taps: wb unused; b's: wa)
  int64_t count = 0, taps = 0;
};

// The pairs of channels a, a + stride (a / stride even; groups of `stride` pairs taken whole: in
// the phase form, all four phases of two output channels or none). A pair's shared taps come in
// b's order, a's own taps in a's, b's own in b's.
inline std::shared_ptr<PairPlan> make_pair_plan(const int64_t* rp, const int32_t* ci, int64_t C_out, int64_t keys,
                                                int64_t stride) {
  // keys: the col_idx values' range. Each pair: a's taps marked in `slot` by their index, b's taps
  // read the marks (shared: -2 left behind), a's taps read them back; the three runs written by
  // cursors, without a branch on the (unpredictable) data.
  auto pp = std::make_shared<PairPlan>();
  pp->first = std::vector<int64_t>(C_out, -1);
  pp->rp = std::vector<int64_t>(C_out / 2 + 1, 0);
  pp->split = std::vector<int64_t>(C_out, 0);
  const int64_t cap = rp[C_out] - rp[0] + 1;  // (+ 1: a's pass may rewrite one past the end)
  pp->ci = std::vector<int32_t>(cap);
  pp->src_a = std::vector<int64_t>(cap, -1);
  pp->src_b = std::vector<int64_t>(cap, -1);
  std::vector<int64_t> slot(keys, -1);
  int64_t n = 0;
  for (int64_t g0 = 0; g0 + 2 * stride <= C_out; g0 += 2 * stride) {
    const int64_t n0 = n, count0 = pp->count;
    int64_t taps = 0, merged = 0;
    for (int64_t a = g0; a < g0 + stride; ++a) {
      const int64_t b = a + stride, na = rp[a + 1] - rp[a], nb = rp[b + 1] - rp[b];
      for (int64_t i = rp[a]; i < rp[a + 1]; ++i) slot[ci[i]] = i;
      // b's taps in order: shared ones to [n, n + shared), its own to [n + na, ...)
      int64_t shared = 0, own_b = 0;
      for (int64_t j = rp[b]; j < rp[b + 1]; ++j) {
        const int64_t i = slot[ci[j]];
        const bool both = i >= 0;
        const int64_t at = both ? n + shared : n + na + own_b;
        pp->ci[at] = ci[j];
        pp->src_a[at] = both ? i : j;  // (b's own: unused)
        pp->src_b[at] = j;
        slot[ci[j]] = both ? -2 : -1;
        shared += both;
        own_b += !both;
      }
      // a's own taps in order, after the shared ones
      int64_t own_a = 0;
      for (int64_t i = rp[a]; i < rp[a + 1]; ++i) {
        const bool own = slot[ci[i]] != -2;
        const int64_t at = n + shared + own_a;
        pp->ci[at] = own ? ci[i] : pp->ci[at];
        pp->src_a[at] = own ? i : pp->src_a[at];
        own_a += own;
        slot[ci[i]] = -1;
      }
      taps += na + nb;
      merged += na + nb - shared;
      pp->split[2 * pp->count] = n + shared;
      pp->split[2 * pp->count + 1] = n + na;
      pp->first[a] = pp->count;
      n += na + nb - shared;
      pp->rp[++pp->count] = n;
    }
    if (taps == 0 || double(merged) > kPairMaxUnion * double(taps)) {  // not paired: undone
      for (int64_t a = g0; a < g0 + stride; ++a) pp->first[a] = -1;
      n = n0;
      pp->count = count0;
    }
  }
  pp->bytes = int64_t(sizeof(int64_t)) * (2 * C_out + C_out / 2 + 1 + 2 * cap) + int64_t(sizeof(int32_t)) * cap;
  return pp;
}

// The pairs (make_pair_plan, from the structure cache where it has them) with their weights.
template <typename T>
ChannelPairs<T> plan_pairs(const T* vals, const int64_t* rp, const int32_t* ci, int64_t C_out, int64_t keys,
                           int64_t stride) {
  auto plan = cached_plan<PairPlan>(StructureKey{kPairPlanKind, {keys, stride}, rp, C_out, ci},
                                    [&] { return make_pair_plan(rp, ci, C_out, keys, stride); });
  ChannelPairs<T> pp;
  pp.first = plan->first.data();
  pp.rp = plan->rp.data();
  pp.split = plan->split.data();
  pp.ci = plan->ci.data();
  pp.count = plan->count;
  pp.taps = plan->rp[plan->count];
  pp.wa.resize(pp.taps);
  pp.wb.resize(pp.taps);
  for (int64_t at = 0; at < pp.taps; ++at) {
    pp.wa[at] = plan->src_a[at] >= 0 ? vals[plan->src_a[at]] : T(0);
    pp.wb[at] = plan->src_b[at] >= 0 ? vals[plan->src_b[at]] : T(0);
  }
  pp.plan = std::move(plan);
  return pp;
}

// tap_block for a pair (ChannelPairs): R rows x NB vectors of both channels in registers (16
// accumulators at 2 x 4: AVX-512's 32 registers hold them), each stored as tap_block stores it.
// Of the m taps, [0, shared) are both channels', [shared, own_a) a's own, the rest b's own.
template <typename T, int R, int NB>
inline void tap_block_pair(const T* base, int64_t row_stride, const int64_t* off, const T* wa, const T* wb, int64_t m,
                           int64_t shared, int64_t own_a, T ba, T bb, int64_t xo, T* outa, T* outb, int64_t out_stride,
                           int64_t valid, double* sta, double* stb) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  V acc_a[R][NB], acc_b[R][NB];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NB; ++v) {
      acc_a[r][v] = broadcast<V>(ba);
      acc_b[r][v] = broadcast<V>(bb);
    }
  }
  add_taps<T, R, NB>(acc_a, base, row_stride, off + shared, wa + shared, own_a - shared, xo);
  add_taps<T, R, NB>(acc_b, base, row_stride, off + own_a, wb + own_a, m - own_a, xo);
  for (int64_t j = 0; j < shared; ++j) {
    const T* s = base + off[j] + xo;
    const V va = broadcast<V>(wa[j]), vb = broadcast<V>(wb[j]);
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < NB; ++v) {
        V xv = load<V>(s + r * row_stride + v * L);
        asm("" : "+v"(xv));  // one load for both (else gcc folds it into each multiply-add)
        acc_a[r][v] += va * xv;
        acc_b[r][v] += vb * xv;
      }
    }
  }
  store_block<T, R, NB>(acc_a, xo, outa, out_stride, valid, sta);
  store_block<T, R, NB>(acc_b, xo, outb, out_stride, valid, stb);
}

// The output of the phase form of a 2x-upsampled conv (forward_up2): phase channel o' = 4 o + 2 p + q
// of the conv is stored at rows 2 y + p, columns 2 x + q of channel o of an H x W output.
struct PhaseOutput {
  int64_t H, W;
};

// Whether this copy has streaming (non-temporal) vector stores: AVX-512's write one whole cache
// line without first reading it.
#if defined(__x86_64__)
constexpr bool kStreamStores = OES_FAST_VEC_BYTES == 64;
#else
constexpr bool kStreamStores = false;
#endif

// v to the 64-byte aligned dst in a streaming store (copies with kStreamStores).
template <typename T>
__attribute__((always_inline)) inline void stream_store(T* dst, const vec_t<T>& v) {
#if defined(__x86_64__)
  if constexpr (kStreamStores) {
    if constexpr (std::is_same_v<T, float>) {
      __builtin_ia32_movntps512(dst, v);
    } else {
      __builtin_ia32_movntpd512(dst, v);
    }
  }
#endif
}

// Orders the streaming stores this thread issued before every store after it (each thread that
// streamed calls it before its part of the work is handed back).
inline void stream_fence() {
#if defined(__x86_64__)
  if constexpr (kStreamStores) __builtin_ia32_sfence();
#endif
}

// dst[2 j] = a[j], dst[2 j + 1] = b[j] for j < n: two phase rows into one output row. With
// `stream`, the whole vectors go to memory in streaming stores where the copy has them and dst
// is 64-byte aligned (the caller then fences before the output is read).
template <typename T>
inline void interleave_row(const T* a, const T* b, int64_t n, T* dst, bool stream = false) {
  using V = vec_t<T>;
  using M = typename IndexVecOf<T>::type;
  constexpr int64_t L = kLanes<T>;
  M lo, hi;  // lanes a0 b0 a1 b1 ... of the first and the second half
  for (int64_t l = 0; l < L; ++l) {
    lo[l] = (l % 2) * L + l / 2;
    hi[l] = (l % 2) * L + L / 2 + l / 2;
  }
  const bool streamed = kStreamStores && stream && reinterpret_cast<uintptr_t>(dst) % 64 == 0;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V va = load<V>(a + j), vb = load<V>(b + j);
    const V first = __builtin_shuffle(va, vb, lo), second = __builtin_shuffle(va, vb, hi);
    if (streamed) {
      stream_store(dst + 2 * j, first);
      stream_store(dst + 2 * j + L, second);
    } else {
      store(dst + 2 * j, first);
      store(dst + 2 * j + L, second);
    }
  }
  for (; j < n; ++j) {
    dst[2 * j] = a[j];
    dst[2 * j + 1] = b[j];
  }
}

// Output-channel groups of a kernel over `tiles` (images x row tiles) of equal work: group i is
// channels [bounds[i], bounds[i + 1]). at::parallel_for hands each thread one contiguous run of
// the tiles x groups tasks, so there are as few groups as make that count a multiple of the
// thread count (each task loads its tile's halo, whatever its channels), and the groups hold
// whole `unit`s of channels with about equal numbers of taps (the channels' taps differ
// tenfold). The grouping does not change the bits: each output value, and each tap's partial
// sum, comes from one task.
inline std::vector<int64_t> channel_groups(const int64_t* rp, int64_t channels, int64_t unit, int64_t tiles) {
  const int64_t threads = at::get_num_threads();
  const int64_t units = std::max<int64_t>(1, (channels + unit - 1) / unit);
  const int64_t count = std::min(units, threads / std::gcd(std::max<int64_t>(1, tiles), threads));
  auto cost = [&](int64_t u) {  // taps of units [0, u), plus one per channel (its stores)
    const int64_t c = std::min(channels, u * unit);
    return rp[c] - rp[0] + c;
  };
  std::vector<int64_t> bounds(count + 1, 0);
  int64_t u = 0;
  for (int64_t i = 1; i < count; ++i) {
    const int64_t target = cost(units) * i / count;
    while (u < units - (count - i) && (u <= bounds[i - 1] / unit || cost(u) < target)) ++u;
    bounds[i] = std::min(channels, u * unit);
  }
  bounds[count] = channels;
  return bounds;
}

// Input-channel slices (forward_kernel<T, true>, which the input gradients run): with many input
// channels, the strip of the halo that one block of outputs reads (all input channels, the
// block's rows and KH - 1 more, 4 vectors and KW - 1 columns) outgrows the L1 cache. The blocks
// then run over the taps of a slice of input channels whose strip takes at most kSliceBytes,
// every output channel's taps of one slice before the next slice's, the sums kept between slices
// (tap_block_slice: the same bits, so the rule may depend on the machine). Only where the whole
// strip is larger than this core's L1 data cache: on the Intel machine (48 KB), down.2.conv1's
// input gradient (24 channels, 39 KB) ran 0.80-0.90x as fast in slices. With slices of 24 KB, 1
// thread: up.0's input gradient (64 phase channels, 67 KB in AVX-512 vectors) 1.05-1.22x faster
// on the Intel machine (the 512x512 training step 0.99-1.02x, within the noise); 1.13-1.22x on
// the AVX2-only Zen 3 (35 KB, against its 32 KB of L1; docs/performance.md). Not in the forward's
// own instantiation: there every narrow layer got slower with slices, and compiling them into it
// made gcc arrange its statistics' sums anew.
constexpr int64_t kSliceBytes = 24 * 1024;

// The phase form's output (the up layers' forwards) goes to memory in streaming stores where it
// takes at least kStreamMinL2 times this core's L2: such an output does not stay in the caches
// until the next op reads it, and a plain store first reads each line it writes (a 16.8 MB output
// read for nothing). On the Intel Xeon (2 MiB of L2, 1 thread, 512x512; docs/performance.md): up.0
// (16.8 MB) streamed, the generator's forward ran 1.04x faster in 8 alternating pairs of
// processes (1.038x with the caches flushed before each call): its up.0 stage 6.7-7.0 -> 6.2-6.4
// ms, the head, which then reads that output from memory, 0-0.2 ms slower. With up.1 (5 MB)
// streamed as well, within the noise of two stage-by-stage runs. The training step: 1.00-1.02x.
// On the Zen 5 EPYC (1 MiB of L2, so up.1 streams too): the forward 1.03x; 8 times the L2 (up.0
// alone) 0.99-1.01x. A store changes no value.
constexpr int64_t kStreamMinL2 = 4;
inline int64_t stream_min_bytes() { return kStreamMinL2 * l2_cache_bytes(); }

template <typename T, bool kSliced = false>
void forward_kernel(const T* x, const T* vals, const int64_t* rp, const int32_t* ci, const T* bias, T* out,
                    const SparseConvGeometry& g, double* stats = nullptr, const PhaseOutput* phase = nullptr,
                    const PhaseInput* phases_in = nullptr) {
  // kSliced: input-channel slices where they apply (kSliceBytes); the taps of every output channel
  // must be in input-channel order, as the transposed taps of padded_input_grad are.
  // stats (optional): per output channel (sum, sum of squares) of the output, float64, [C_out][2]
  // phase (optional): the output channels are the phases of a 2x larger output (PhaseOutput); a
  // block's two column phases go through a small buffer and are interleaved into the output rows.
  // phases_in (optional): the input channels are the stride-2 phases of `x` as the conv
  // phases_in->of reads it, or of their box mean (load_halo_phases; forward_pool).
  constexpr int64_t L = kLanes<T>;
  if (g.N == 0 || g.C_out == 0) return;
  // (and the phase form's rows of whole block windows in the AVX-512 copy: use_phases_forward)
  const bool wide = g.SW == 1 && (g.W_out >= 4 * L || (phase != nullptr && block_window_rows<T>(g.W_out)));
  // (narrow rows, 8-row blocks of one vector, were not faster with windows: up.3-up.5, 16-32 wide;
  // they take planes instead, below: blocks of up to 16 vectors along a channel's rows)
  constexpr int64_t kWindowBlockRows = 2;  // the wide rows' blocks
  // the strip of the halo that one wide block reads: every input channel, the block's rows and
  // KH - 1 more, 4 vectors and KW - 1 columns
  const int64_t strip = int64_t(sizeof(T)) * (kWindowBlockRows + g.KH - 1) * (4 * L + g.KW - 1);
  const bool strip_in_l1 = g.C_in * strip <= l1_data_cache_bytes();
  const bool can_window = wide && use_shifted_window(g, kWindowBlockRows);
  // kSliced: the input gradients' wide rows in input-channel slices where the strip outgrows the
  // L1 (kSliceBytes) and there are no windows
  const bool in_slices = kSliced && stats == nullptr && phase == nullptr && wide && !can_window && !strip_in_l1;
  // output-channel pairs (ChannelPairs) in the wide rows outside slices: AVX-512 only, whose 32
  // registers hold a pair's 16 accumulators; in the phase form the same phase of two channels
  ChannelPairs<T> pairs;
  if constexpr (OES_FAST_VEC_BYTES == 64) {
    if (wide && !in_slices) pairs = plan_pairs(vals, rp, ci, g.C_out, g.C_in * g.KH * g.KW, phase != nullptr ? 4 : 1);
  }
  // Windows (shifted_window) make every tap's loads aligned, at 2.4x the strip. Not where pairs
  // run and the plain strip fits this core's L1: there the pairs' fewer loads across cache lines
  // cost less than the copies (up.0, 24 KB, 1.05x and up.1, 36 KB, 1.02x faster without windows
  // on the Intel machine's 48 KB; up.2, 92 KB, 0.87x).
  // Block windows (block_window) in the phase form where pairs run (the AVX-512 copy), in place
  // of row windows
  // (rows of one vector: blocks of kNarrowBlockWindowRows x 1 vector)
  const bool one_vector_rows = g.W_out == L;
  const bool block_windowed = phase != nullptr && pairs.count > 0 && block_window_rows<T>(g.W_out);
  const bool windowed = can_window && !block_windowed && !(pairs.count > 0 && strip_in_l1);
  const int64_t bw_rows = (one_vector_rows ? kNarrowBlockWindowRows : kBlockWindowRows) + g.KH - 1;
  const int64_t bw_width = one_vector_rows ? L : kBlockWindowVecs * L;
  // Narrow rows in planes (flat_planes): the KW column-shifted copies of each input channel's halo
  // rows packed W_out apart, plane_rows rows each (a vector of slack past the halo's rows). The
  // forward's tiles keep its planes small (plan_planes); the input gradients' are the halo's
  // (with planes of at most 256 KB their padded rows, 12-36 wide, lost 3-23 %, else won 8-31 %).
  // Not for the pooled convs' phase inputs (4 C_in channels of 3x3 taps; down.3.conv1 0.87x,
  // down.4.conv1 0.98x as fast with planes).
  const bool narrow = !wide && g.SW == 1 && g.SH == 1 && phase == nullptr && phases_in == nullptr;
  const HaloPlan halo_plan = plan_halo<T>(g);
  const HaloPlan planes_plan = narrow && !kSliced ? plan_planes<T>(g, halo_plan) : halo_plan;
  const bool flat = narrow && use_planes<T>(g, planes_plan.tile);
  const HaloPlan plan = flat ? planes_plan : halo_plan;
  const int64_t Wa = plan.Wa, tile = plan.tile, n_tiles = plan.n_tiles, rows_h_max = plan.rows_h;
  int64_t plane_rows = rows_h_max + (L + g.W_out - 1) / g.W_out;
  while (plane_rows * g.W_out % L != 0) ++plane_rows;  // every plane starts on a vector boundary
  // the blocks' output row stride: the output's, or that of the phase rows' buffer
  constexpr int kPhaseRows = 8;
  const int64_t ostride = phase != nullptr ? 4 * L : g.W_out;
  // the phase form's output in streaming stores where it is large (kStreamMinL2)
  const bool stream = kStreamStores && phase != nullptr &&
                     g.N * (g.C_out / 4) * phase->H * phase->W * int64_t(sizeof(T)) >= stream_min_bytes();
  // the slices: input channels [j * slice, (j + 1) * slice); output channel o's taps of slice j are
  // [cut[o * (n_slices + 1) + j], cut[o * (n_slices + 1) + j + 1])
  int64_t n_slices = 1;
  constexpr int64_t keep_vecs = kWindowBlockRows * 4;  // one output channel's sums of the largest block
  std::vector<int64_t> cut;
  if constexpr (kSliced) {
    if (in_slices) {
      const int64_t slice = std::max<int64_t>(1, kSliceBytes / strip);
      n_slices = (g.C_in + slice - 1) / slice;
      if (n_slices > 1) {
        const Divider by_kk(g.KH * g.KW);  // a tap's input channel: col_idx / (KH KW)
        cut.resize(g.C_out * (n_slices + 1));
        for (int64_t o = 0; o < g.C_out; ++o) {
          int64_t k = rp[o];
          for (int64_t j = 0; j < n_slices; ++j) {
            cut[o * (n_slices + 1) + j] = k;
            while (k < rp[o + 1] && by_kk(ci[k]) < (j + 1) * slice) ++k;
          }
          cut[o * (n_slices + 1) + n_slices] = k;
        }
      }
    }
  }
  // (whole output channels of the phase form: its column phases are interleaved in pairs; whole
  // pairs of output channels where there are pairs)
  const int64_t unit = (phase != nullptr ? 4 : 1) * (pairs.count > 0 ? 2 : 1);
  const std::vector<int64_t> bounds = channel_groups(rp, g.C_out, unit, g.N * n_tiles);
  const int64_t groups = int64_t(bounds.size()) - 1;
  const int64_t tasks = g.N * n_tiles * groups;
  std::vector<double> partial(stats != nullptr ? tasks * g.C_out * 2 * L : 0, 0.0);  // (store_block's lanes)
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<T> halo(g.C_in * rows_h_max * Wa);
    AlignedBuffer<T> phase_rows(phase != nullptr ? (pairs.count > 0 ? 4 : 2) * kPhaseRows * ostride : 0);
    AlignedBuffer<T> keep(n_slices > 1 ? g.C_out * keep_vecs * L : 0);  // the sums between slices
    const int64_t window_rows = kWindowBlockRows + g.KH - 1;
    AlignedBuffer<T> window(windowed ? g.C_in * g.KW * window_rows * Wa : 0);
    AlignedBuffer<T> planes(flat ? g.C_in * g.KW * plane_rows * g.W_out + 4 * L : 0);
    // Tap offsets into the halo (or the window) depend on neither the tile nor the image: decode them once.
    std::vector<int64_t> off(g.nnz);
    std::vector<T> w(g.nnz);
    const TapOffsets offset = windowed ? TapOffsets(g, window_rows, Wa, true)
                              : flat   ? TapOffsets(g, plane_rows, g.W_out, true)
                                       : TapOffsets(g, rows_h_max, Wa);
    offset.decode(ci, g.nnz, g.C_in, off.data());
    for (int64_t k = 0; k < g.nnz; ++k) w[k] = vals[k];
    std::vector<int64_t> pair_off(pairs.taps);
    offset.decode(pairs.ci, int64_t(pair_off.size()), g.C_in, pair_off.data());
    AlignedBuffer<T> bwin(block_windowed ? g.C_in * g.KW * bw_rows * bw_width : 0);
    std::vector<int64_t> off_b(block_windowed ? g.nnz : 0), pair_off_b(block_windowed ? pair_off.size() : 0);
    if (block_windowed) {
      const TapOffsets ob(g, bw_rows, bw_width, true);
      ob.decode(ci, g.nnz, g.C_in, off_b.data());
      ob.decode(pairs.ci, int64_t(pair_off_b.size()), g.C_in, pair_off_b.data());
    }
    const int64_t rs = g.SH * Wa;  // halo distance of consecutive output rows
    for (int64_t t = begin; t < end; ++t) {
      const int64_t grp = t % groups, tl = (t / groups) % n_tiles, n = t / (groups * n_tiles);
      const int64_t y0 = tl * tile, rows = std::min(tile, g.H_out - y0);
      const int64_t o_begin = bounds[grp], o_end = bounds[grp + 1];
      if (phases_in != nullptr) {
        load_halo_phases(x, halo.data, rows_h_max, rows - 1 + g.KH, Wa, y0, *phases_in, g.W_out + g.KW - 1, n);
      } else {
        load_halo(x, halo.data, rows_h_max, (rows - 1) * g.SH + g.KH, Wa, y0 * g.SH - g.PH, g, n);
      }
      // Output channels innermost: the strip of the halo one column block reads (all input
      // channels, KH rows) stays in L1 while every output channel of the group uses it.
      double* part = stats != nullptr ? partial.data() + t * g.C_out * 2 * L : nullptr;
      // a block of R rows stores min(valid, span) columns from xo; pblock: the same block for a
      // pair of channels (pairs), or nullptr where the rows take no pairs; base_given: the input
      // the blocks read (a block window) instead of the halo or the row window
      auto run = [&](auto block, auto pblock, int R, int64_t span, int64_t r, int64_t xo, int64_t valid,
                     const T* base_given = nullptr) {
        constexpr bool kPaired = !std::is_same_v<decltype(pblock), std::nullptr_t>;
        // (a row window starts at row r)
        const T* base = base_given != nullptr ? base_given : windowed ? window.data : halo.data + r * rs;
        auto bias_of = [&](int64_t o) { return bias ? bias[o] : T(0); };
        auto stats_of = [&](int64_t o) { return part ? part + 2 * L * o : nullptr; };
        auto pair_of = [&](int64_t o) { return kPaired && pairs.count > 0 ? pairs.first[o] : int64_t(-1); };
        if (phase == nullptr) {
          for (int64_t o = o_begin; o < o_end; ++o) {
            T* orow = out + ((n * g.C_out + o) * g.H_out + y0 + r) * g.W_out;
            if constexpr (kPaired) {
              const int64_t pi = pair_of(o);
              if (pi >= 0) {
                pblock(base, pi, bias_of(o), bias_of(o + 1), xo, orow, orow + g.H_out * g.W_out, valid, stats_of(o),
                       stats_of(o + 1));
                ++o;
                continue;
              }
            }
            block(base, rp[o], rp[o + 1] - rp[o], bias_of(o), xo, orow, valid, stats_of(o));
          }
          return;
        }
        const int64_t cols = std::min(valid, span);
        T* t0 = phase_rows.data;  // channel c's column phases q = 0, 1
        T* t1 = t0 + kPhaseRows * ostride;
        T* u0 = t1 + kPhaseRows * ostride;  // channel c + 1's, where c is paired
        T* u1 = u0 + kPhaseRows * ostride;
        for (int64_t o = o_begin; o < o_end; o += 2) {  // column phases q = 0, 1 of one (channel, p)
          const int64_t c = o / 4, p = (o / 2) % 2;
          const int64_t pi = pair_of(o);  // paired: channel c + 1's phases too (phase channels o + 4, o + 5)
          if (pi >= 0) {
            if constexpr (kPaired) {
              pblock(base, pi, bias_of(o), bias_of(o + 4), xo, t0 - xo, u0 - xo, valid, stats_of(o), stats_of(o + 4));
              pblock(base, pairs.first[o + 1], bias_of(o + 1), bias_of(o + 5), xo, t1 - xo, u1 - xo, valid,
                     stats_of(o + 1), stats_of(o + 5));
            }
          } else {
            block(base, rp[o], rp[o + 1] - rp[o], bias_of(o), xo, t0 - xo, valid, stats_of(o));
            block(base, rp[o + 1], rp[o + 2] - rp[o + 1], bias_of(o + 1), xo, t1 - xo, valid, stats_of(o + 1));
          }
          for (int64_t cc = 0; cc < (pi >= 0 ? 2 : 1); ++cc) {
            const T* a = cc == 0 ? t0 : u0;
            const T* b = cc == 0 ? t1 : u1;
            for (int rr = 0; rr < R; ++rr) {
              T* dst = out + ((n * (g.C_out / 4) + c + cc) * phase->H + 2 * (y0 + r + rr) + p) * phase->W + 2 * xo;
              interleave_row(a + rr * ostride, b + rr * ostride, cols, dst, stream);
            }
          }
          if (pi >= 0 && p == 1) o += 4;  // channel c + 1's phases are done
        }
      };
      const T* offw = w.data();
      const int64_t* offp = off.data();
      if (g.SW != 1) {
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t o = o_begin; o < o_end; ++o) {
            const T b = bias ? bias[o] : T(0);
            T* orow = out + ((n * g.C_out + o) * g.H_out + y0 + r) * g.W_out;
            for (int64_t xo = 0; xo < g.W_out; ++xo) {
              T acc = b;
              const T* base = halo.data + r * rs + xo * g.SW;
              for (int64_t k = rp[o]; k < rp[o + 1]; ++k) acc += offw[k] * base[offp[k]];
              orow[xo] = acc;
              if (part) {  // (in lane 0 of the channel's lane sums)
                part[2 * L * o] += acc;
                part[2 * L * o + L] += double(acc) * acc;
              }
            }
          }
        }
      } else if (wide) {
        auto wide1 = [&](const T* base, int64_t k0, int64_t m, T b, int64_t xo, T* orow, int64_t valid, double* st) {
          tap_block<T, 1, 4>(base, rs, offp + k0, offw + k0, m, b, xo, orow, ostride, valid, st);
        };
        auto one = [&](const T* base, int64_t k0, int64_t m, T b, int64_t xo, T* orow, int64_t valid, double* st) {
          tap_block<T, 1, 1>(base, rs, offp + k0, offw + k0, m, b, xo, orow, ostride, valid, st);
        };
        // two rows at a time where there are two: 8 accumulators hide the FMA latency (4 would
        // wait on it), and each tap's weight broadcast serves 8 FMAs
        auto wide2 = [&](const T* base, int64_t k0, int64_t m, T b, int64_t xo, T* orow, int64_t valid, double* st) {
          tap_block<T, 2, 4>(base, rs, offp + k0, offw + k0, m, b, xo, orow, ostride, valid, st);
        };
        auto one2 = [&](const T* base, int64_t k0, int64_t m, T b, int64_t xo, T* orow, int64_t valid, double* st) {
          tap_block<T, 2, 1>(base, rs, offp + k0, offw + k0, m, b, xo, orow, ostride, valid, st);
        };
        // the same blocks for a pair (pairs.first), in the AVX-512 copy
        // (poff, stride: the pairs' tap offsets and the row stride of the input they read)
        auto paired = [&](auto rows_c, auto vecs_c, const int64_t* poff = nullptr, int64_t stride = 0) {
          if constexpr (OES_FAST_VEC_BYTES != 64) {
            return nullptr;
          } else {
            if (poff == nullptr) poff = pair_off.data(), stride = rs;
            return [&, poff, stride](const T* base, int64_t pi, T ba, T bb, int64_t xo, T* oa, T* ob, int64_t valid,
                                     double* sa, double* sb) {
              const int64_t k0 = pairs.rp[pi];
              tap_block_pair<T, decltype(rows_c)::value, decltype(vecs_c)::value>(
                  base, stride, poff + k0, pairs.wa.data() + k0, pairs.wb.data() + k0, pairs.rp[pi + 1] - k0,
                  pairs.split[2 * pi] - k0, pairs.split[2 * pi + 1] - k0, ba, bb, xo, oa, ob, ostride, valid, sa, sb);
            };
          }
        };
        using One = std::integral_constant<int, 1>;
        using Two = std::integral_constant<int, 2>;
        using Four = std::integral_constant<int, 4>;
        const auto wide2_pair = paired(Two{}, Four{}), one2_pair = paired(Two{}, One{});
        const auto wide1_pair = paired(One{}, Four{}), one_pair = paired(One{}, One{});
        int64_t r = 0;
        if constexpr (kSliced) {
          if (n_slices > 1) {
            // R rows x NB vectors from column xo, slice by slice (each output channel's sums in keep)
            auto sliced = [&](auto rows_c, auto vecs_c, int64_t r, int64_t xo, int64_t valid) {
              constexpr int R = decltype(rows_c)::value, NB = decltype(vecs_c)::value;
              for (int64_t j = 0; j < n_slices; ++j) {
                for (int64_t o = o_begin; o < o_end; ++o) {
                  const int64_t* c = cut.data() + o * (n_slices + 1) + j;
                  T* orow = out + ((n * g.C_out + o) * g.H_out + y0 + r) * g.W_out;
                  tap_block_slice<T, R, NB>(halo.data + r * rs, rs, offp + c[0], offw + c[0], c[1] - c[0],
                                            bias ? bias[o] : T(0), xo, orow, ostride, valid,
                                            keep.data + o * keep_vecs * L, j == 0, j == n_slices - 1);
                }
              }
            };
            for (; r + 2 <= rows; r += 2) {
              int64_t xo = 0;
              for (; xo + 4 * L <= g.W_out; xo += 4 * L) sliced(Two{}, Four{}, r, xo, 4 * L);
              for (; xo < g.W_out; xo += L) sliced(Two{}, One{}, r, xo, g.W_out - xo);
            }
            for (; r < rows; ++r) {
              int64_t xo = 0;
              for (; xo + 4 * L <= g.W_out; xo += 4 * L) sliced(One{}, Four{}, r, xo, 4 * L);
              for (; xo < g.W_out; xo += L) sliced(One{}, One{}, r, xo, g.W_out - xo);
            }
          }
        }
        auto block_windows = [&](auto rows_c, auto vecs_c) {
          constexpr int R = decltype(rows_c)::value, NB = decltype(vecs_c)::value;
          auto block = [&](const T* base, int64_t k0, int64_t m, T b, int64_t xo, T* orow, int64_t valid,
                           double* st) {
            tap_block<T, R, NB>(base, bw_width, off_b.data() + k0, offw + k0, m, b, xo, orow, ostride, valid, st);
          };
          const auto pblock = paired(rows_c, vecs_c, pair_off_b.data(), bw_width);
          for (; r + R <= rows; r += R) {
            for (int64_t xo = 0; xo < g.W_out; xo += NB * L) {
              block_window(halo.data, rows_h_max, Wa, r, xo, bw_rows, bw_width, g, bwin.data);
              run(block, pblock, R, NB * L, r, xo, NB * L, bwin.data - xo);  // (the blocks add xo back)
            }
          }
        };
        if (block_windowed && one_vector_rows) {
          static_assert(kNarrowBlockWindowRows <= kPhaseRows, "the phase rows' buffer holds a block's rows");
          block_windows(std::integral_constant<int, kNarrowBlockWindowRows>{}, One{});
        } else if (block_windowed) {
          block_windows(std::integral_constant<int, kBlockWindowRows>{}, std::integral_constant<int, kBlockWindowVecs>{});
        }
        for (; r + 2 <= rows; r += 2) {
          if (windowed) shifted_window(halo.data, rows_h_max, Wa, r, window_rows, g, window.data, window_rows);
          int64_t xo = 0;
          for (; xo + 4 * L <= g.W_out; xo += 4 * L) run(wide2, wide2_pair, 2, 4 * L, r, xo, 4 * L);
          for (; xo < g.W_out; xo += L) run(one2, one2_pair, 2, L, r, xo, g.W_out - xo);
        }
        for (; r < rows; ++r) {
          if (windowed) shifted_window(halo.data, rows_h_max, Wa, r, g.KH, g, window.data, window_rows);
          int64_t xo = 0;
          for (; xo + 4 * L <= g.W_out; xo += 4 * L) run(wide1, wide1_pair, 1, 4 * L, r, xo, 4 * L);
          for (; xo < g.W_out; xo += L) run(one, one_pair, 1, L, r, xo, g.W_out - xo);
        }
      } else if (flat) {
        flat_planes(halo.data, rows_h_max, Wa, rows - 1 + g.KH, g, planes.data, plane_rows);
        // output channel o's rows of the tile are one run of P values; tap (c, ky, kx) reads the
        // run of plane (c, kx) from its row ky: blocks of up to 16 vectors along the run
        const int64_t P = rows * g.W_out;
        auto block = [&](auto vecs_c, int64_t p0) {
          constexpr int NB = decltype(vecs_c)::value;
          for (int64_t o = o_begin; o < o_end; ++o) {
            T* orow = out + ((n * g.C_out + o) * g.H_out + y0) * g.W_out;
            tap_block<T, 1, NB>(planes.data, 0, offp + rp[o], offw + rp[o], rp[o + 1] - rp[o], bias ? bias[o] : T(0),
                                p0, orow, 0, P - p0, part ? part + 2 * L * o : nullptr);
          }
        };
        flat_blocks(P, L, block);
      } else {
        // narrow rows without planes (the pooled convs' phases, rows that planes do not pack better):
        // block 8 (or 4) rows per vector instead
        auto eight = [&](const T* base, int64_t k0, int64_t m, T b, int64_t xo, T* orow, int64_t valid, double* st) {
          tap_block<T, 8, 1>(base, rs, offp + k0, offw + k0, m, b, xo, orow, ostride, valid, st);
        };
        auto four = [&](const T* base, int64_t k0, int64_t m, T b, int64_t xo, T* orow, int64_t valid, double* st) {
          tap_block<T, 4, 1>(base, rs, offp + k0, offw + k0, m, b, xo, orow, ostride, valid, st);
        };
        auto one = [&](const T* base, int64_t k0, int64_t m, T b, int64_t xo, T* orow, int64_t valid, double* st) {
          tap_block<T, 1, 1>(base, rs, offp + k0, offw + k0, m, b, xo, orow, ostride, valid, st);
        };
        for (int64_t xo = 0; xo < g.W_out; xo += L) {
          int64_t r = 0;
          for (; r + 8 <= rows; r += 8) run(eight, nullptr, 8, L, r, xo, g.W_out - xo);
          for (; r + 4 <= rows; r += 4) run(four, nullptr, 4, L, r, xo, g.W_out - xo);
          for (; r < rows; ++r) run(one, nullptr, 1, L, r, xo, g.W_out - xo);
        }
      }
    }
    if (stream) stream_fence();
  });
  if (stats != nullptr) sum_stat_lanes<T>(partial, tasks, g.C_out, stats);
}

// Input gradient, any stride: the transposed convolution as a scatter. A task owns one (image, input
// channel) plane of the gradient and adds every tap reading from that channel; the transposed
// index (taps grouped by input channel) is built once per call by a counting sort, O(nnz).
// Reflection is folded back on the fly: the scatter target is the reflected source row/column.
template <typename T>
void input_grad_generic(const T* gout, const T* vals, const int64_t* rp, const int32_t* ci, T* gin,
                       const SparseConvGeometry& g) {
  const int64_t KK = g.KH * g.KW, HW = g.H * g.W, HWo = g.H_out * g.W_out;
  std::vector<int64_t> start(g.C_in + 1, 0);
  for (int64_t k = 0; k < g.nnz; ++k) ++start[ci[k] / KK + 1];
  for (int64_t c = 0; c < g.C_in; ++c) start[c + 1] += start[c];
  std::vector<int64_t> t_o(g.nnz), t_ky(g.nnz), t_kx(g.nnz);
  std::vector<T> t_w(g.nnz);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t o = 0; o < g.C_out; ++o) {
      for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
        const int64_t c = ci[k] / KK, r = ci[k] % KK, d = fill[c]++;
        t_o[d] = o;
        t_ky[d] = r / g.KW - g.PH;
        t_kx[d] = r % g.KW - g.PW;
        t_w[d] = vals[k];
      }
    }
  }
  int64_t lo, hi;
  interior_columns(g, &lo, &hi);
  const int64_t tasks = g.N * g.C_in;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / g.C_in, c = t % g.C_in;
      T* gx = gin + t * HW;
      std::fill(gx, gx + HW, T(0));
      for (int64_t y0 = 0; y0 < g.H_out; y0 += kRowTile) {
        const int64_t y1 = std::min(g.H_out, y0 + kRowTile);
        for (int64_t d = start[c]; d < start[c + 1]; ++d) {
          const T w = t_w[d];
          const int64_t kx = t_kx[d];
          const T* gsrc = gout + (n * g.C_out + t_o[d]) * HWo;
          for (int64_t yo = y0; yo < y1; ++yo) {
            const int64_t iy = source_index(yo * g.SH + t_ky[d], g.H, g.reflect);
            if (iy < 0) continue;
            T* drow = gx + iy * g.W;
            const T* srow = gsrc + yo * g.W_out;
            auto scalar = [&](int64_t xo) {
              const int64_t ix = source_index(xo * g.SW + kx, g.W, g.reflect);
              if (ix >= 0) drow[ix] += w * srow[xo];
            };
            if (g.SW != 1) {
              for (int64_t xo = 0; xo < g.W_out; ++xo) scalar(xo);
              continue;
            }
            for (int64_t xo = 0; xo < lo; ++xo) scalar(xo);
            T* dst = drow + kx;
#pragma omp simd
            for (int64_t xo = lo; xo < hi; ++xo) dst[xo] += w * srow[xo];
            for (int64_t xo = hi; xo < g.W_out; ++xo) scalar(xo);
          }
        }
      }
    }
  });
}

template <typename T>
inline T dot_row(const T* a, const T* b, int64_t lo, int64_t hi) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  V acc[kNV] = {};
  int64_t i = lo;
  for (; i + kNV * L <= hi; i += kNV * L) {
    for (int v = 0; v < kNV; ++v) acc[v] += load<V>(a + i + v * L) * load<V>(b + i + v * L);
  }
  for (; i + L <= hi; i += L) acc[0] += load<V>(a + i) * load<V>(b + i);
  for (int v = 1; v < kNV; ++v) acc[0] += acc[v];
  T s = 0;
  for (int64_t l = 0; l < L; ++l) s += acc[0][l];
  for (; i < hi; ++i) s += a[i] * b[i];
  return s;
}

// Weight gradient at the kept taps only, any stride: grad[k] = sum over images and output pixels of
// grad_out[o] times the input the tap read. Tasks are (row tile, output channel); each keeps a
// partial per tap (in float64), summed over tiles in a fixed order (deterministic).
template <typename T>
void weight_grad_generic(const T* gout, const T* x, const int64_t* rp, const int32_t* ci, T* gw,
                        const SparseConvGeometry& g) {
  const int64_t KK = g.KH * g.KW, HW = g.H * g.W, HWo = g.H_out * g.W_out;
  const int64_t n_tiles = (g.H_out + kRowTile - 1) / kRowTile;
  const int64_t tasks = n_tiles * g.C_out;
  if (g.nnz == 0) return;
  std::vector<double> partial(n_tiles * g.nnz, 0.0);
  int64_t lo, hi;
  interior_columns(g, &lo, &hi);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t % g.C_out, tile = t / g.C_out;
      const int64_t y_end = std::min(g.H_out, (tile + 1) * kRowTile);
      double* part = partial.data() + tile * g.nnz;
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t yo = tile * kRowTile; yo < y_end; ++yo) {
          const T* grow = gout + (n * g.C_out + o) * HWo + yo * g.W_out;
          for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
            const int64_t c = ci[k] / KK, r = ci[k] % KK;
            const int64_t iy = source_index(yo * g.SH + r / g.KW - g.PH, g.H, g.reflect);
            if (iy < 0) continue;
            const T* xrow = x + (n * g.C_in + c) * HW + iy * g.W;
            const int64_t kx = r % g.KW - g.PW;
            T s = 0;
            auto scalar = [&](int64_t xo) {
              const int64_t ix = source_index(xo * g.SW + kx, g.W, g.reflect);
              if (ix >= 0) s += grow[xo] * xrow[ix];
            };
            if (g.SW != 1) {
              for (int64_t xo = 0; xo < g.W_out; ++xo) scalar(xo);
            } else {
              for (int64_t xo = 0; xo < lo; ++xo) scalar(xo);
              for (int64_t xo = hi; xo < g.W_out; ++xo) scalar(xo);
              // grow[xo] * xrow[xo + kx] over the interior: xrow + kx is the aligned partner
              s += dot_row(grow, xrow + kx, lo, hi);
            }
            part[k] += static_cast<double>(s);
          }
        }
      }
    }
  });
  sum_partials(partial, n_tiles, g.nnz, gw);
}

// Input gradient, stride 1: the gradient of the padded input is the full correlation of
// grad_output with the flipped kernel, i.e. a forward sparse convolution with the taps regrouped
// by input channel (CSR over input channels, O(nnz) counting sort), kernel flipped and zero
// padding K - 1; it runs on the register-blocked forward kernel into a padded plane, and the
// padding is folded back (reflected rows/columns added onto the rows/columns they mirror).
//
// padded: the gradient of the padded input, (N, C_in, H_out + KH - 1, W_out + KW - 1), every
// element stored; phases_of (optional): gout is read as the stride-2 phases of this larger
// gradient (load_halo_phases), as the phase form of a 2x-upsampled conv needs (input_grad_up2).
template <typename T>
void padded_input_grad(const T* gout, const T* vals, const int64_t* rp, const int32_t* ci,
                       const SparseConvGeometry& g, const SparseConvGeometry* phases_of, T* padded) {
  const int64_t KK = g.KH * g.KW;
  std::vector<int64_t> trp(g.C_in + 1, 0);
  const Divider by_kk(KK);
  std::vector<int32_t> flipped(KK);  // tap position r -> the flipped kernel's
  for (int64_t r = 0; r < KK; ++r)
    flipped[r] = static_cast<int32_t>((g.KH - 1 - r / g.KW) * g.KW + (g.KW - 1 - r % g.KW));
  for (int64_t k = 0; k < g.nnz; ++k) ++trp[by_kk(ci[k]) + 1];
  for (int64_t c = 0; c < g.C_in; ++c) trp[c + 1] += trp[c];
  std::vector<int32_t> tci(g.nnz);
  std::vector<T> tv(g.nnz);
  {
    std::vector<int64_t> fill(trp.begin(), trp.end() - 1);
    for (int64_t o = 0; o < g.C_out; ++o) {
      for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
        const int64_t c = by_kk(ci[k]), d = fill[c]++;
        tci[d] = static_cast<int32_t>(o * KK) + flipped[ci[k] - c * KK];
        tv[d] = vals[k];
      }
    }
  }
  SparseConvGeometry t = g;
  t.C_in = g.C_out;
  t.C_out = g.C_in;
  t.H = t.H_src = g.H_out;
  t.W = t.W_src = g.W_out;
  t.U = 1;
  t.PH = g.KH - 1;
  t.PW = g.KW - 1;
  t.reflect = false;
  t.H_out = g.H_out + g.KH - 1;  // = H + 2 PH, the padded input
  t.W_out = g.W_out + g.KW - 1;
  const PhaseInput phases{phases_of, false};
  forward_kernel<T, true>(gout, tv.data(), trp.data(), tci.data(), nullptr, padded, t, nullptr, nullptr,
                    phases_of != nullptr ? &phases : nullptr);
}

template <typename T>
void input_grad_stride1(const T* gout, const T* vals, const int64_t* rp, const int32_t* ci, T* gin,
                        const SparseConvGeometry& g, const SparseConvGeometry* phases_of = nullptr) {
  const int64_t Hp = g.H_out + g.KH - 1, Wp = g.W_out + g.KW - 1;
  // not zeroed: every element is stored (a zeroing pass cost about 1 ms at 512x512)
  std::unique_ptr<T[]> padded(new T[g.N * g.C_in * Hp * Wp]);
  padded_input_grad(gout, vals, rp, ci, g, phases_of, padded.get());
  // Fold the padded plane back: reflected rows/columns onto those they mirror and, with a fused
  // upsampling u, every upsampled pixel onto the stored pixel it was read from (iy / u, ix / u).
  at::parallel_for(0, g.N * g.C_in, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      T* gx = gin + nc * g.H_src * g.W_src;
      const T* src = padded.get() + nc * Hp * Wp;
      std::fill(gx, gx + g.H_src * g.W_src, T(0));
      for (int64_t i = 0; i < Hp; ++i) {
        const int64_t iy = source_index(i - g.PH, g.H, g);
        if (iy < 0) continue;
        T* drow = gx + (iy / g.U) * g.W_src;
        const T* srow = src + i * Wp;
        for (int64_t j = 0; j < g.PW; ++j) {
          const int64_t ix = source_index(j - g.PW, g.W, g);
          if (ix >= 0) drow[ix / g.U] += srow[j];
        }
        const T* s0 = srow + g.PW;
        if (g.U == 1) {
#pragma omp simd
          for (int64_t j = 0; j < g.W; ++j) drow[j] += s0[j];
        } else if (g.U == 2) {  // the network's 2x: pairs, no division
          for (int64_t j = 0; j < g.W_src; ++j) drow[j] += s0[2 * j] + s0[2 * j + 1];
        } else {
          for (int64_t j = 0; j < g.W; ++j) drow[j / g.U] += s0[j];
        }
        for (int64_t j = g.PW + g.W; j < Wp; ++j) {
          const int64_t ix = source_index(j - g.PW, g.W, g);
          if (ix >= 0) drow[ix / g.U] += srow[j];
        }
      }
    }
  });
}

// The sum of the N lanes of a in a fixed tree, the same bits wherever it is inlined: the lower
// half plus the upper half, down to one lane (in_order pins each level). gcc's own sum of the
// float32 lanes was this tree; a sum lane by lane, in order, made the deep layers' weight
// gradients 1.2-1.6x slower (16 dependent additions per tap and tile), and a tree of rotations
// (__builtin_shuffle) 1.5-3.4x slower.
template <typename T, int N>
struct LanesOf {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <typename T, int N>
__attribute__((always_inline)) inline T lane_sum(typename LanesOf<T, N>::type a) {
  if constexpr (N == 2) {
    T s = a[0] + a[1];
    in_order(s);
    return s;
  } else {
    using Half = typename LanesOf<T, N / 2>::type;
    Half lo, hi;
    std::memcpy(&lo, &a, sizeof(Half));
    std::memcpy(&hi, reinterpret_cast<const char*>(&a) + sizeof(Half), sizeof(Half));
    Half s = lo + hi;
    in_order(s);
    return lane_sum<T, N / 2>(s);
  }
}

// part[i] += the sums over `rows` rows of a tile of the grad rows (grows, nvec vectors a row) times
// the halo rows (Wa apart) at the KT taps' offsets off[i]. KT taps at once share each load of the
// grad rows, and their 2 * KT accumulators hide the FMA latency; each tap's accumulators run over
// all rows of the tile, so the lanes are summed once per tile, not once per row. Every tap's sum
// has the same grouping (even and odd vectors of every row, then the lanes in order) alone or in
// a group, so the bits do not depend on how the taps fall into groups (lane_sum: left to itself,
// gcc summed the lanes of a group of 8 float64 taps in another order than those of a lone tap).
template <typename T, int KT>
__attribute__((always_inline)) inline void weight_grad_taps(const T* halo, int64_t Wa, const int64_t* off,
                                                            int64_t rows, const T* grows, int64_t nvec,
                                                            double* part) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  V acc[KT][2] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const T* hrow[KT];
    for (int i = 0; i < KT; ++i) hrow[i] = halo + r * Wa + off[i];
    const T* gr = grows + r * nvec * L;
    int64_t v = 0;
    for (; v + 2 <= nvec; v += 2) {
      const V g0 = load<V>(gr + v * L), g1 = load<V>(gr + (v + 1) * L);
      for (int i = 0; i < KT; ++i) {
        acc[i][0] += g0 * load<V>(hrow[i] + v * L);
        acc[i][1] += g1 * load<V>(hrow[i] + (v + 1) * L);
      }
    }
    if (v < nvec) {
      const V g0 = load<V>(gr + v * L);
      for (int i = 0; i < KT; ++i) acc[i][0] += g0 * load<V>(hrow[i] + v * L);
    }
  }
  for (int i = 0; i < KT; ++i) part[i] += static_cast<double>(lane_sum<T, int(L)>(acc[i][0] + acc[i][1]));
}

// Weight gradient, stride 1: tasks are (image, row tile); a task loads the tile's padded input
// rows into a halo (as the forward) and, per output channel, takes the dot product of the
// tile's grad_output rows with every kept tap's shifted halo rows: full vectors only (the grad
// rows are copied into zero-tailed rows, the halo has zeroed slack). Partials per task in
// float64 are added in task order (deterministic).
template <typename T, typename Out = T>
void weight_grad_stride1(const T* gout, const T* x, const int64_t* rp, const int32_t* ci, Out* gw,
                         const SparseConvGeometry& g, const PhaseOutput* phase = nullptr,
                         const PhaseInput* phases_in = nullptr) {
  // phase (optional): the conv is the phase form of a 2x-upsampled one (forward_up2) and gout
  // the 2x larger output's gradient; each phase channel's rows are read out of it.
  // phases_in (optional): the input channels are stride-2 phases of x (load_halo_phases; forward_pool).
  constexpr int64_t L = kLanes<T>;
  if (g.nnz == 0 || g.N == 0) return;
  const HaloPlan plan = plan_halo<T>(g);
  const int64_t Wa = plan.Wa, tile = plan.tile, n_tiles = plan.n_tiles, rows_h_max = plan.rows_h;
  // tasks: (image, row tile, output-channel group); the groups' taps are disjoint, so each
  // (image, tile) row of partials has each tap's sum from one task, whatever the grouping
  const std::vector<int64_t> bounds = channel_groups(rp, g.C_out, 1, g.N * n_tiles);
  const int64_t groups = int64_t(bounds.size()) - 1;
  const int64_t tasks = g.N * n_tiles * groups;
  const int64_t nvec = (g.W_out + L - 1) / L;
  std::vector<double> partial(g.N * n_tiles * g.nnz, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<T> halo(g.C_in * rows_h_max * Wa);
    // one output channel's grad rows of the tile, each padded with zeros to whole vectors
    AlignedBuffer<T> grows(tile * nvec * L);
    std::vector<int64_t> off(g.nnz);
    const TapOffsets offset(g, rows_h_max, Wa);
    offset.decode(ci, g.nnz, g.C_in, off.data());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t grp = t % groups, tl = (t / groups) % n_tiles, n = t / (groups * n_tiles);
      const int64_t y0 = tl * tile, rows = std::min(tile, g.H_out - y0);
      const int64_t o_begin = bounds[grp], o_end = bounds[grp + 1];
      if (phases_in != nullptr) {
        load_halo_phases(x, halo.data, rows_h_max, rows - 1 + g.KH, Wa, y0, *phases_in, g.W_out + g.KW - 1, n);
      } else {
        load_halo(x, halo.data, rows_h_max, rows - 1 + g.KH, Wa, y0 - g.PH, g, n);
      }
      double* part = partial.data() + (t / groups) * g.nnz;
      for (int64_t o = o_begin; o < o_end; ++o) {
        if (rp[o] == rp[o + 1]) continue;
        for (int64_t r = 0; r < rows; ++r) {
          T* dst = grows.data + r * nvec * L;
          if (phase == nullptr) {
            std::memcpy(dst, gout + ((n * g.C_out + o) * g.H_out + y0 + r) * g.W_out, sizeof(T) * g.W_out);
          } else {  // phase channel o = 4 c + 2 p + q: row 2 y + p, columns 2 x + q of channel c
            const T* src = gout + ((n * (g.C_out / 4) + o / 4) * phase->H + 2 * (y0 + r) + (o / 2) % 2) * phase->W;
            for (int64_t j = 0; j < g.W_out; ++j) dst[j] = src[2 * j + o % 2];
          }
        }
        auto taps = [&](auto kt, int64_t k) {
          weight_grad_taps<T, decltype(kt)::value>(halo.data, Wa, off.data() + k, rows, grows.data, nvec, part + k);
        };
        int64_t k = rp[o];
        if constexpr (OES_FAST_VEC_BYTES == 64) {  // 32 vector registers: 16 accumulators fit
          for (; k + 8 <= rp[o + 1]; k += 8) taps(std::integral_constant<int, 8>{}, k);
        }
        for (; k + 4 <= rp[o + 1]; k += 4) taps(std::integral_constant<int, 4>{}, k);
        for (; k < rp[o + 1]; ++k) taps(std::integral_constant<int, 1>{}, k);
      }
    }
  });
  sum_partials(partial, g.N * n_tiles, g.nnz, gw);
}

// The phase form of a 3x3 conv (stride 1, padding 1) of a 2x nearest-upsampled input. Output
// pixel (2 y + p, 2 x + q) reads upsampled rows 2 y + p - 1 .. 2 y + p + 1, i.e. stored rows
// y + (p + kh - 1) div 2 for kh = 0, 1, 2: two distinct rows, and the same for columns. So each of the
// four phases (p, q) is a 3x3 conv of the stored input whose taps are the original ones moved to
// window position ((p + kh + 1) / 2, (q + kw + 1) / 2), those landing on one position summed, and
// reflection of the upsampled input at its border (pad 1) reads the stored input's border pixel
// again (replicate). On the masks OES produces (about 40 % per up layer) the four phases keep about
// 0.7x the multiply-adds of the upsampled conv, at a quarter of the pixels per phase, and the
// halo holds stored rows only. Used from a stored width of kPhaseMinWidth (the forward also from
// 32 in the AVX-512 copy: use_phases_forward), for the input gradient from
// kPhaseInputGradMinWidth (up.0, 256 stored: 8.5 -> 7.3 ms; at 128 even, at 64 slower, 3.0 -> 3.4).
constexpr int64_t kPhaseMinWidth = 64;
constexpr int64_t kPhaseInputGradMinWidth = 256;

// a 2x-upsampled 3x3 conv with padding 1, stride 1: what the phase form computes
inline bool phase_shape(const SparseConvGeometry& g) {
  return g.U == 2 && g.SH == 1 && g.SW == 1 && g.KH == 3 && g.KW == 3 && g.PH == 1 && g.PW == 1 && !g.replicate;
}

inline bool use_phases(const SparseConvGeometry& g) { return phase_shape(g) && g.W_src >= kPhaseMinWidth; }

// The forward also takes the phase form on narrower stored rows in the AVX-512 copy, where they
// are whole block windows wide (kBlockWindowVecs vectors, 32 floats) or one vector: forward_kernel
// runs such phase rows as wide ones, in block windows of output-channel pairs, 4 rows x 2 vectors
// or 8 rows x 1 vector. 1 thread, 512x512, the published pepper mask, each stage alone in
// alternating processes: up.3 (32x32 stored, 71 -> 72 channels) 1.59-1.68 -> 1.03-1.10 ms (three
// pairs), up.4 (16x16 stored, 91 -> 71) 0.68-0.90 -> 0.53-0.75 ms (faster in all of seven
// pairs). Before the pairs ran there (narrow 8 x 1 blocks), the phase form at 32 columns was
// slower (1.60-1.70 against 1.54-1.57 ms).
template <typename T>
bool use_phases_forward(const SparseConvGeometry& g) {
  return use_phases(g) || (phase_shape(g) && block_window_rows<T>(g.W_src));
}

// CSR of the phase form: row 4 o + 2 p + q holds output channel o's taps at phase (p, q), in the
// order of their first original tap; of[4 k + 2 p + q] = the phase entry original tap k went to.
// The structure (make_phase_structure) is kept in the structure cache; plan_phases adds the values.
struct PhaseStructure : StructurePlan {
  std::vector<int64_t> rp;
  std::vector<int32_t> ci;
  std::vector<int64_t> of;
};

inline std::shared_ptr<PhaseStructure> make_phase_structure(const int64_t* rp, const int32_t* ci,
                                                            const SparseConvGeometry& g) {
  auto pl = std::make_shared<PhaseStructure>();
  pl->rp = std::vector<int64_t>(4 * g.C_out + 1, 0);
  pl->ci = std::vector<int32_t>(4 * g.nnz);
  pl->of = std::vector<int64_t>(4 * g.nnz);
  std::vector<int64_t> slot(g.C_in * 9, -1);
  int64_t count = 0;
  for (int64_t o = 0; o < g.C_out; ++o) {
    for (int64_t ph = 0; ph < 4; ++ph) {
      const int64_t p = ph / 2, q = ph % 2, first = count;
      for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
        const int64_t c = ci[k] / 9, kh = ci[k] % 9 / 3, kw = ci[k] % 3;
        const int64_t key = c * 9 + (p + kh + 1) / 2 * 3 + (q + kw + 1) / 2;
        // without a branch (whether a position is new follows no pattern the predictor learns)
        const int64_t seen = slot[key];
        const bool fresh = seen < 0;
        const int64_t entry = fresh ? count : seen;
        slot[key] = entry;
        pl->ci[count] = static_cast<int32_t>(key);  // kept only where fresh: count moves past it
        count += fresh;
        pl->of[4 * k + ph] = entry;
      }
      for (int64_t j = first; j < count; ++j) slot[pl->ci[j]] = -1;
      pl->rp[4 * o + ph + 1] = count;
    }
  }
  pl->bytes = int64_t(sizeof(int64_t)) * (4 * g.C_out + 1 + 4 * g.nnz) + int64_t(sizeof(int32_t)) * 4 * g.nnz;
  return pl;
}

// The phase form's CSR (PhaseStructure) with its values: each phase value the sum of its original
// taps' values in CSR order (none without vals).
template <typename T>
struct PhasePlan {
  std::shared_ptr<const PhaseStructure> s;
  const int64_t* rp;
  const int32_t* ci;
  const int64_t* of;
  int64_t nnz;  // the phase taps
  std::vector<T> vals;
};

template <typename T>
PhasePlan<T> plan_phases(const T* vals, const int64_t* rp, const int32_t* ci, const SparseConvGeometry& g) {
  auto s = cached_plan<PhaseStructure>(StructureKey{kPhasePlanKind, {g.C_in}, rp, g.C_out, ci},
                                       [&] { return make_phase_structure(rp, ci, g); });
  PhasePlan<T> pl{s, s->rp.data(), s->ci.data(), s->of.data(), s->rp[4 * g.C_out], {}};
  if (vals != nullptr) {
    pl.vals = std::vector<T>(pl.nnz, T(0));
    for (int64_t o = 0; o < g.C_out; ++o)
      for (int64_t ph = 0; ph < 4; ++ph)
        for (int64_t k = rp[o]; k < rp[o + 1]; ++k) pl.vals[pl.of[4 * k + ph]] += vals[k];
  }
  return pl;
}

// The geometry of the phase form: the stored input, 4 C_out channels at its size, replicated border.
inline SparseConvGeometry phase_geometry(const SparseConvGeometry& g, int64_t nnz) {
  SparseConvGeometry t = g;
  t.U = 1;
  t.H = t.H_out = g.H_src;
  t.W = t.W_out = g.W_src;
  t.C_out = 4 * g.C_out;
  t.replicate = g.reflect;
  t.reflect = false;
  t.nnz = nnz;
  return t;
}

template <typename T>
void forward_up2(const T* x, const T* vals, const int64_t* rp, const int32_t* ci, const T* bias, T* out,
                 const SparseConvGeometry& g, double* stats) {
  const PhasePlan<T> pl = plan_phases(vals, rp, ci, g);
  std::vector<T> phase_bias(bias != nullptr ? 4 * g.C_out : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(phase_bias.size()); ++i) phase_bias[i] = bias[i / 4];
  std::vector<double> phase_stats(stats != nullptr ? 8 * g.C_out : 0);
  const PhaseOutput po{g.H_out, g.W_out};
  forward_kernel<T>(x, pl.vals.data(), pl.rp, pl.ci, bias != nullptr ? phase_bias.data() : nullptr,
                    out, phase_geometry(g, pl.nnz),
                    stats != nullptr ? phase_stats.data() : nullptr, &po);
  if (stats != nullptr) {
    for (int64_t o = 0; o < g.C_out; ++o) {
      for (int i = 0; i < 2; ++i) {
        const double* s = phase_stats.data() + 8 * o + i;
        stats[2 * o + i] = s[0] + s[2] + s[4] + s[6];
      }
    }
  }
}

// The input gradient in the phase form: the transposed conv of the four phases, each read out of
// the output gradient at stride 2 (its rows 2 y + p, columns 2 x + q: load_halo_phases, without
// the mean, of a geometry whose input is that gradient and whose padding is the phase conv's
// K - 1 = 2 phase rows), with the replicated border folded back onto the stored border pixels.
template <typename T>
void input_grad_up2(const T* gout, const T* vals, const int64_t* rp, const int32_t* ci, T* gin,
                    const SparseConvGeometry& g) {
  const PhasePlan<T> pl = plan_phases(vals, rp, ci, g);
  SparseConvGeometry grad = g;
  grad.C_in = g.C_out;
  grad.H = grad.H_src = g.H_out;
  grad.W = grad.W_src = g.W_out;
  grad.U = 1;
  grad.PH = grad.PW = 2 * (g.KH - 1);
  grad.reflect = grad.replicate = false;
  input_grad_stride1<T>(gout, pl.vals.data(), pl.rp, pl.ci, gin, phase_geometry(g, pl.nnz),
                        &grad);
}

template <typename T>
void weight_grad_up2(const T* gout, const T* x, const int64_t* rp, const int32_t* ci, T* gw,
                     const SparseConvGeometry& g) {
  const PhasePlan<T> pl = plan_phases<T>(nullptr, rp, ci, g);
  std::vector<double> phase_gw(pl.nnz, 0.0);
  const PhaseOutput po{g.H_out, g.W_out};
  weight_grad_stride1<T, double>(gout, x, pl.rp, pl.ci, phase_gw.data(),
                                 phase_geometry(g, pl.nnz), &po);
  // a tap's gradient: the sum of the gradients of the four phase entries it is part of
  for (int64_t k = 0; k < g.nnz; ++k) {
    const int64_t* of = pl.of + 4 * k;
    gw[k] = static_cast<T>(phase_gw[of[0]] + phase_gw[of[1]] + phase_gw[of[2]] + phase_gw[of[3]]);
  }
}

// The pooled form of a stride-1 conv of odd size K with padding (K - 1) / 2 followed by 2x2 average
// pooling (stride 2, an odd last row or column dropped): pooled pixel (i, j) is the mean of conv
// pixels (2 i + di, 2 j + dj) for di, dj in {0, 1}, i.e. the sum over taps (ky, kx) of w times the
// mean of padded input pixels (2 i + di + ky, 2 j + dj + kx): the conv at stride 2 of the padded
// input's 2x2 box mean B. Split ky = 2 a + pu (kx alike): the pooled output is a stride-1 conv of
// the four stride-2 phases of B (load_halo_phases with box_mean) with a (K + 1) / 2 square kernel,
// 5x5 -> 3x3 on 4 C_in channels, each tap moved to one phase and position: the same taps and
// weights, a quarter of the conv's multiply-adds (plus 3 adds per loaded element for the mean).
// No full-size output is written and no pooling pass runs.
inline int64_t pooled_kernel(int64_t k) { return (k + 1) / 2; }

// The geometry of the pooled form of conv g: stride-2 phases in, pooled size out.
inline SparseConvGeometry pooled_geometry(const SparseConvGeometry& g) {
  SparseConvGeometry t = g;
  t.C_in = 4 * g.C_in;
  t.KH = pooled_kernel(g.KH);
  t.KW = pooled_kernel(g.KW);
  t.PH = t.PW = 0;
  t.H_out = g.H_out / 2;
  t.W_out = g.W_out / 2;
  t.H = t.H_src = t.H_out + t.KH - 1;
  t.W = t.W_src = t.W_out + t.KW - 1;
  t.U = 1;
  t.reflect = t.replicate = false;
  return t;
}

// col_idx of the pooled form: tap (c, ky, kx) of g is tap (4 c + 2 (ky % 2) + kx % 2, ky / 2, kx / 2)
// (kept in the structure cache).
struct PooledTaps : StructurePlan {
  std::vector<int32_t> ci;
};

inline std::shared_ptr<const PooledTaps> pooled_col_idx(const int64_t* rp, const int32_t* ci,
                                                        const SparseConvGeometry& g) {
  return cached_plan<PooledTaps>(StructureKey{kPooledTapsKind, {g.KH, g.KW}, rp, g.C_out, ci}, [&] {
    const int64_t KK = g.KH * g.KW, KH2 = pooled_kernel(g.KH), KW2 = pooled_kernel(g.KW);
    auto out = std::make_shared<PooledTaps>();
    out->ci = std::vector<int32_t>(g.nnz);
    for (int64_t k = 0; k < g.nnz; ++k) {
      const int64_t c = ci[k] / KK, ky = ci[k] % KK / g.KW, kx = ci[k] % g.KW;
      out->ci[k] = static_cast<int32_t>(((4 * c + 2 * (ky % 2) + kx % 2) * KH2 + ky / 2) * KW2 + kx / 2);
    }
    out->bytes = int64_t(sizeof(int32_t)) * g.nnz;
    return out;
  });
}

// The pooled form with the halo made one slice of input channels at a time. A tile's halo of all
// 4 C_in phase channels can be far larger than a core's L2: 4.8 MiB for the generator's first
// conv (32 channels of z at 512x512, 32-row tiles, float32), which then went out to L3 and came
// back for each block's strip, a strip that only 6 output channels share. Sliced where the whole
// halo is larger than this core's L2 and the conv has more input than output channels, in slices
// of input channels whose phases take at most half the L2. On the Intel Xeon (2 MiB of L2; the
// figures in docs/performance.md, in-process A/B with bench/kernel_ab.py) the first conv (32 -> 6)
// ran 1.12-1.45x faster forward and 1.28-1.68x in its weight gradient from 256 to 2048 pixels;
// down.1.conv1 (6 -> 13) and down.2.conv1 (14 -> 24) at 2048, whose halos (1.7 and 2.2 MiB) are
// about the L2's size, ran 0.76-0.91x as fast forward in slices, so they are not sliced.
// The rule depends on the machine; the bits do not.
template <typename T>
int64_t pool_slice_channels(const SparseConvGeometry& g) {
  if (g.C_in <= g.C_out) return 0;
  const SparseConvGeometry t = pooled_geometry(g);
  const HaloPlan plan = plan_halo<T>(t);
  const int64_t channel_bytes = 4 * plan.rows_h * plan.Wa * int64_t(sizeof(T));  // one input channel's phases
  if (g.C_in * channel_bytes <= l2_cache_bytes()) return 0;
  return std::max<int64_t>(1, l2_cache_bytes() / 2 / channel_bytes);
}

// The plan both sliced kernels share: the pooled form g of g0, its row tiles, the slices
// (slice_c input channels each, the last one shorter) and the tasks (image, tile, group of
// output channels). Output channel o's taps of slice j are [taps(o, j)[0], taps(o, j)[1]), its
// taps being in input-channel order (pooled_col_idx keeps col_idx's order).
template <typename T>
struct PoolSlices {
  PoolSlices(const int64_t* rp, const int32_t* pci, const SparseConvGeometry& g0, int64_t slice_c)
      : g(pooled_geometry(g0)),
        plan(plan_halo<T>(g)),
        slice_c(slice_c),
        count((g0.C_in + slice_c - 1) / slice_c),
        cut(g.C_out * (count + 1)),
        bounds(channel_groups(rp, g.C_out, 1, g.N * plan.n_tiles)),
        groups(int64_t(bounds.size()) - 1),
        tasks(g.N * plan.n_tiles * groups) {
    const int64_t kk = g.KH * g.KW;
    for (int64_t o = 0; o < g.C_out; ++o) {
      int64_t k = rp[o];
      for (int64_t j = 0; j < count; ++j) {
        cut[o * (count + 1) + j] = k;
        while (k < rp[o + 1] && pci[k] / kk / 4 < (j + 1) * slice_c) ++k;
      }
      cut[o * (count + 1) + count] = k;
    }
    for (int64_t i = 0; i < groups; ++i) group_max = std::max(group_max, bounds[i + 1] - bounds[i]);
  }
  const int64_t* taps(int64_t o, int64_t j) const { return cut.data() + o * (count + 1) + j; }
  // the taps' offsets into the halo of one slice, from the slice's first phase channel
  std::vector<int64_t> offsets(const int32_t* pci) const {
    const TapOffsets offset(g, plan.rows_h, plan.Wa);
    std::vector<int64_t> off(g.nnz);
    offset.decode(pci, g.nnz, g.C_in, off.data());
    for (int64_t o = 0; o < g.C_out; ++o)
      for (int64_t j = 0; j < count; ++j)
        for (int64_t k = taps(o, j)[0]; k < taps(o, j)[1]; ++k) off[k] -= 4 * j * slice_c * offset.channel;
    return off;
  }
  // task t: image n, rows [y0, y0 + rows), output channels [o_begin, o_end)
  void task(int64_t t, int64_t* n, int64_t* y0, int64_t* rows, int64_t* o_begin, int64_t* o_end) const {
    const int64_t grp = t % groups, tl = (t / groups) % plan.n_tiles;
    *n = t / (groups * plan.n_tiles);
    *y0 = tl * plan.tile;
    *rows = std::min(plan.tile, g.H_out - *y0);
    *o_begin = bounds[grp];
    *o_end = bounds[grp + 1];
  }
  SparseConvGeometry g;
  HaloPlan plan;
  int64_t slice_c, count;
  std::vector<int64_t> cut, bounds;
  int64_t groups, tasks, group_max = 0;
};

// The forward: every block of the tile adds each slice's taps in turn, its sums kept between
// slices (tap_block_slice). Each sum adds the same taps in the same order as forward_kernel (taps
// in input-channel order, as pooled_col_idx keeps them) and the blocks are forward_kernel's wide
// blocks in its order: the same bits, the statistics' too.
template <typename T>
void forward_pool_sliced(const T* x, const T* vals, const int64_t* rp, const int32_t* pci, const T* bias, T* out,
                         const SparseConvGeometry& g0, double* stats, int64_t slice_c) {
  constexpr int64_t L = kLanes<T>;
  const PoolSlices<T> sl(rp, pci, g0, slice_c);
  const SparseConvGeometry& g = sl.g;
  const PhaseInput box{&g0, true};
  const int64_t Wa = sl.plan.Wa, tile = sl.plan.tile, rows_h = sl.plan.rows_h, tasks = sl.tasks;
  std::vector<double> partial(stats != nullptr ? tasks * g.C_out * 2 * L : 0, 0.0);  // (store_block's lanes)
  // blocks of a tile: pairs of rows (the last row alone when odd) x column blocks of 4 vectors,
  // then of 1 (forward_kernel's wide path); each block's sums take 8 vectors of keep
  const int64_t full_cols = g.W_out / (4 * L), col_blocks = full_cols + (g.W_out % (4 * L) + L - 1) / L;
  const int64_t row_blocks = (tile + 1) / 2;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<T> halo(4 * slice_c * rows_h * Wa);
    AlignedBuffer<T> keep(sl.group_max * row_blocks * col_blocks * 8 * L);
    const std::vector<int64_t> off = sl.offsets(pci);
    const int64_t rs = Wa;
    for (int64_t t = begin; t < end; ++t) {
      int64_t n, y0, rows, o_begin, o_end;
      sl.task(t, &n, &y0, &rows, &o_begin, &o_end);
      double* part = stats != nullptr ? partial.data() + t * g.C_out * 2 * L : nullptr;
      for (int64_t j = 0; j < sl.count; ++j) {
        const int64_t c0 = j * slice_c, c1 = std::min(g0.C_in, c0 + slice_c);
        load_halo_phases(x, halo.data, rows_h, rows - 1 + g.KH, Wa, y0, box, g.W_out + g.KW - 1, n, c0, c1);
        const bool first = j == 0, last = j == sl.count - 1;
        auto block = [&](auto rows_c, auto vecs_c, int64_t r, int64_t xo, int64_t valid, int64_t slot) {
          constexpr int R = decltype(rows_c)::value, NB = decltype(vecs_c)::value;
          for (int64_t o = o_begin; o < o_end; ++o) {
            const int64_t* c = sl.taps(o, j);
            T* orow = out + ((n * g.C_out + o) * g.H_out + y0 + r) * g.W_out;
            T* kp = keep.data + (((o - o_begin) * row_blocks + r / 2) * col_blocks + slot) * 8 * L;
            tap_block_slice<T, R, NB>(halo.data + r * rs, rs, off.data() + c[0], vals + c[0], c[1] - c[0],
                                      bias ? bias[o] : T(0), xo, orow, g.W_out, valid, kp, first, last,
                                      part && last ? part + 2 * L * o : nullptr);
          }
        };
        using One = std::integral_constant<int, 1>;
        using Two = std::integral_constant<int, 2>;
        using Four = std::integral_constant<int, 4>;
        int64_t r = 0;
        for (; r + 2 <= rows; r += 2) {
          int64_t xo = 0, slot = 0;
          for (; xo + 4 * L <= g.W_out; xo += 4 * L) block(Two{}, Four{}, r, xo, 4 * L, slot++);
          for (; xo < g.W_out; xo += L) block(Two{}, One{}, r, xo, g.W_out - xo, slot++);
        }
        for (; r < rows; ++r) {
          int64_t xo = 0, slot = 0;
          for (; xo + 4 * L <= g.W_out; xo += 4 * L) block(One{}, Four{}, r, xo, 4 * L, slot++);
          for (; xo < g.W_out; xo += L) block(One{}, One{}, r, xo, g.W_out - xo, slot++);
        }
      }
    }
  });
  if (stats != nullptr) sum_stat_lanes<T>(partial, tasks, g.C_out, stats);
}

template <typename T>
void forward_pool(const T* x, const T* vals, const int64_t* rp, const int32_t* ci, const T* bias, T* out,
                  const SparseConvGeometry& g, double* stats) {
  const auto pci = pooled_col_idx(rp, ci, g);
  // (only where forward_kernel would take its wide blocks, which forward_pool_sliced repeats)
  const int64_t slice_c = pool_slice_channels<T>(g);
  if (slice_c > 0 && g.W_out / 2 >= 4 * kLanes<T>) {
    forward_pool_sliced<T>(x, vals, rp, pci->ci.data(), bias, out, g, stats, slice_c);
    return;
  }
  const PhaseInput box{&g, true};
  forward_kernel<T>(x, vals, rp, pci->ci.data(), bias, out, pooled_geometry(g), stats, nullptr, &box);
}

// The weight gradient of the pooled form in slices (as forward_pool_sliced): each tap's sum over a
// tile runs as in weight_grad_stride1, the same bits. A tile's grad rows of every output channel
// of the task are copied once, before the slices.
template <typename T>
void weight_grad_pool_sliced(const T* gout, const T* x, const int64_t* rp, const int32_t* pci, T* gw,
                             const SparseConvGeometry& g0, int64_t slice_c) {
  constexpr int64_t L = kLanes<T>;
  if (g0.nnz == 0 || g0.N == 0) return;
  const PoolSlices<T> sl(rp, pci, g0, slice_c);
  const SparseConvGeometry& g = sl.g;
  const PhaseInput box{&g0, true};
  const int64_t Wa = sl.plan.Wa, tile = sl.plan.tile, rows_h = sl.plan.rows_h;
  const int64_t nvec = (g.W_out + L - 1) / L;
  std::vector<double> partial(g.N * sl.plan.n_tiles * g.nnz, 0.0);
  at::parallel_for(0, sl.tasks, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<T> halo(4 * slice_c * rows_h * Wa);
    // the grad rows of every output channel of a group, each row padded with zeros to whole
    // vectors (the padding is never written)
    AlignedBuffer<T> grows(sl.group_max * tile * nvec * L);
    const std::vector<int64_t> off = sl.offsets(pci);
    for (int64_t t = begin; t < end; ++t) {
      int64_t n, y0, rows, o_begin, o_end;
      sl.task(t, &n, &y0, &rows, &o_begin, &o_end);
      for (int64_t o = o_begin; o < o_end; ++o)
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(grows.data + ((o - o_begin) * tile + r) * nvec * L,
                      gout + ((n * g.C_out + o) * g.H_out + y0 + r) * g.W_out, sizeof(T) * g.W_out);
      double* part = partial.data() + (t / sl.groups) * g.nnz;
      for (int64_t j = 0; j < sl.count; ++j) {
        const int64_t c0 = j * slice_c, c1 = std::min(g0.C_in, c0 + slice_c);
        load_halo_phases(x, halo.data, rows_h, rows - 1 + g.KH, Wa, y0, box, g.W_out + g.KW - 1, n, c0, c1);
        for (int64_t o = o_begin; o < o_end; ++o) {
          const T* gr = grows.data + (o - o_begin) * tile * nvec * L;
          auto taps = [&](auto kt, int64_t k) {
            weight_grad_taps<T, decltype(kt)::value>(halo.data, Wa, off.data() + k, rows, gr, nvec, part + k);
          };
          int64_t k = sl.taps(o, j)[0];
          const int64_t k_end = sl.taps(o, j)[1];
          if constexpr (OES_FAST_VEC_BYTES == 64) {
            for (; k + 8 <= k_end; k += 8) taps(std::integral_constant<int, 8>{}, k);
          }
          for (; k + 4 <= k_end; k += 4) taps(std::integral_constant<int, 4>{}, k);
          for (; k < k_end; ++k) taps(std::integral_constant<int, 1>{}, k);
        }
      }
    }
  });
  sum_partials(partial, g.N * sl.plan.n_tiles, g.nnz, gw);
}

template <typename T>
void weight_grad_pool(const T* gout, const T* x, const int64_t* rp, const int32_t* ci, T* gw,
                      const SparseConvGeometry& g) {
  const auto pci = pooled_col_idx(rp, ci, g);
  const int64_t slice_c = pool_slice_channels<T>(g);
  if (slice_c > 0) {
    weight_grad_pool_sliced<T>(gout, x, rp, pci->ci.data(), gw, g, slice_c);
    return;
  }
  const PhaseInput box{&g, true};
  weight_grad_stride1<T>(gout, x, rp, pci->ci.data(), gw, pooled_geometry(g), nullptr, &box);
}

// The input gradient of the pooled form: the gradient of the box mean's phases (the transposed
// conv of the pooled gradient with the pooled form's taps, padded_input_grad), then the adjoint of
// the mean, row by row: the phases interleaved back into rows of B's gradient dB (interleave_row),
// each padded input pixel (a, b) taking a quarter of dB at (a - 1 .. a, b - 1 .. b), and the
// padding folded back onto the pixels it mirrors. A quarter of the multiply-adds of the conv's
// own input gradient, and no full-size gradient of the conv's output.
template <typename T>
void input_grad_pool(const T* gout, const T* vals, const int64_t* rp, const int32_t* ci, T* gin,
                     const SparseConvGeometry& g) {
  const auto pci = pooled_col_idx(rp, ci, g);
  const SparseConvGeometry t = pooled_geometry(g);
  const int64_t Hb = t.H, Wb = t.W;  // phase rows and columns of B
  std::unique_ptr<T[]> dB(new T[t.N * t.C_in * Hb * Wb]);
  padded_input_grad(gout, vals, rp, pci->ci.data(), t, nullptr, dB.get());
  const int64_t Hx = g.H + 2 * g.PH, Wx = g.W + 2 * g.PW;  // the padded input
  const int64_t len = 2 * Wb + 1;  // padded columns 0 .. 2 Wb reach dB
  at::parallel_for(0, g.N * g.C_in, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(3 * len + 1, T(0));
    T* brow = rows.data();                // a row of dB
    T* prev = rows.data() + len + 1;      // its horizontal adjoint, row a - 1
    T* cur = rows.data() + 2 * len + 1;   // ... row a
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / g.C_in, c = nc % g.C_in;
      T* gx = gin + nc * g.H * g.W;
      std::fill(gx, gx + g.H * g.W, T(0));
      std::fill(prev, prev + len, T(0));
      for (int64_t a = 0; a <= 2 * Hb && a < Hx; ++a) {
        // cur[b] = dB(a, b) + dB(a, b - 1), dB zero outside its 2 Hb x 2 Wb
        if (a < 2 * Hb) {
          const T* ph = dB.get() + ((n * t.C_in + 4 * c + 2 * (a % 2)) * Hb + a / 2) * Wb;
          interleave_row(ph, ph + Hb * Wb, Wb, brow);
          cur[0] = brow[0];
          for (int64_t b = 1; b < 2 * Wb; ++b) cur[b] = brow[b] + brow[b - 1];
          cur[2 * Wb] = brow[2 * Wb - 1];
        } else {
          std::fill(cur, cur + len, T(0));
        }
        const int64_t iy = source_index(a - g.PH, g.H, g);
        if (iy >= 0) {
          T* drow = gx + iy * g.W;
          const T quarter = T(0.25);
          auto edge = [&](int64_t b) {
            const int64_t ix = source_index(b - g.PW, g.W, g);
            if (ix >= 0) drow[ix] += quarter * (cur[b] + prev[b]);
          };
          const int64_t lo = std::min(g.PW, len), hi = std::max(lo, std::min(len, g.PW + g.W));
          for (int64_t b = 0; b < lo; ++b) edge(b);
          const T* c0 = cur + g.PW;
          const T* p0 = prev + g.PW;
#pragma omp simd
          for (int64_t j = 0; j < hi - lo; ++j) drow[j] += quarter * (c0[j] + p0[j]);
          for (int64_t b = hi; b < std::min(len, Wx); ++b) edge(b);
        }
        std::swap(prev, cur);
      }
    }
  });
}

// The entry points sparse_conv2d.cpp calls through OES_FAST_ISA_DISPATCH.
template <typename T>
void forward(const T* x, const T* vals, const int64_t* rp, const int32_t* ci, const T* bias, T* out,
             const SparseConvGeometry& g, double* stats) {
  if (use_phases_forward<T>(g)) {
    forward_up2<T>(x, vals, rp, ci, bias, out, g, stats);
  } else {
    forward_kernel<T>(x, vals, rp, ci, bias, out, g, stats);
  }
}

template <typename T>
void input_grad(const T* gout, const T* vals, const int64_t* rp, const int32_t* ci, T* gin,
                const SparseConvGeometry& g) {
  if (use_phases(g) && g.W_src >= kPhaseInputGradMinWidth) {
    input_grad_up2<T>(gout, vals, rp, ci, gin, g);
  } else if (g.SH == 1 && g.SW == 1) {
    input_grad_stride1<T>(gout, vals, rp, ci, gin, g);
  } else {
    input_grad_generic<T>(gout, vals, rp, ci, gin, g);
  }
}

template <typename T>
void weight_grad(const T* gout, const T* x, const int64_t* rp, const int32_t* ci, T* gw, const SparseConvGeometry& g) {
  if (use_phases(g)) {
    weight_grad_up2<T>(gout, x, rp, ci, gw, g);
  } else if (g.SH == 1 && g.SW == 1) {
    weight_grad_stride1<T>(gout, x, rp, ci, gw, g);
  } else {
    weight_grad_generic<T>(gout, x, rp, ci, gw, g);
  }
}

}  // namespace
}  // namespace OES_FAST_ISA_NS
}  // namespace oes_fast
