// CPU kernels of sparse_conv2d, sparse_conv2d_input_grad and sparse_conv2d_weight_grad.
//
// Weights are CSR over output channels (csrc/sparse_conv2d.h). The forward gathers: a task owns
// (image, row tile, group of output channels), so it writes its output rows alone. It loads the
// tile's input rows, padded, into a cache-sized halo buffer (the padding is fused into this
// load; no padded tensor is materialized), then for each output channel walks its kept taps:
// every tap is one multiply-add of a shifted halo row into output rows held in registers
// (a block of up to 4 vectors, or 4 rows of one vector for narrow images), one load per
// multiply-add, no scalar border path.
//
// Vectors are GCC vector extensions of 64 bytes: with -march=native on an AVX-512 host one
// register, elsewhere the compiler splits them (AVX2: two ymm).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "../sparse_conv2d.h"

namespace oes_fast {
namespace {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using vec_t = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(T));

// 4 independent accumulators cover the FMA latency; 64 float32 (32 float64) columns a block.
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

// Stride-1 output columns whose taps all read inside the row: [lo, hi).
inline void interior_columns(const SparseConvGeometry& g, int64_t* lo, int64_t* hi) {
  *lo = std::min(g.PW, g.W_out);
  *hi = std::max(*lo, std::min(g.W_out, g.W - g.KW + g.PW + 1));
}

// Input rows of one row tile, all input channels, padded in the copy: the padding is applied
// while the tile is loaded (the padded tensor never exists), so every output column, border
// or not, takes the vector path. kHaloBytes keeps the tile within the L2 of one core.
constexpr int64_t kHaloBytes = 384 * 1024;

template <typename T>
void load_halo(const T* x, T* halo, int64_t rows_h, int64_t rows_load, int64_t Wa, int64_t y_in0,
               const SparseConvGeometry& g, int64_t n) {
  const int64_t Wp = (g.W_out - 1) * g.SW + g.KW;
  for (int64_t c = 0; c < g.C_in; ++c) {
    for (int64_t hr = 0; hr < rows_load; ++hr) {
      T* dst = halo + (c * rows_h + hr) * Wa;
      const int64_t iy = source_index(y_in0 + hr, g.H, g.reflect);
      if (iy < 0) {
        std::fill(dst, dst + Wp, T(0));
        continue;
      }
      const T* src = x + ((n * g.C_in + c) * g.H + iy) * g.W;
      const int64_t lo = std::min(g.PW, Wp), hi = std::min(Wp, g.PW + g.W);
      for (int64_t j = 0; j < lo; ++j) {
        const int64_t ix = source_index(j - g.PW, g.W, g.reflect);
        dst[j] = ix < 0 ? T(0) : src[ix];
      }
      std::memcpy(dst + lo, src + (lo - g.PW), sizeof(T) * (hi - lo));
      for (int64_t j = hi; j < Wp; ++j) {
        const int64_t ix = source_index(j - g.PW, g.W, g.reflect);
        dst[j] = ix < 0 ? T(0) : src[ix];
      }
    }
  }
}

// R rows x NB vectors of outputs in registers, accumulated over all m taps of one output
// channel; `valid` columns from xo are stored (the last vector may be partial).
template <typename T, int R, int NB>
inline void tap_block(const T* base, int64_t row_stride, const int64_t* off, const T* w, int64_t m, T b, int64_t xo,
                      T* out, int64_t out_stride, int64_t valid) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  V acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NB; ++v) acc[r][v] = broadcast<V>(b);
  for (int64_t j = 0; j < m; ++j) {
    const T* s = base + off[j] + xo;
    const V wv = broadcast<V>(w[j]);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NB; ++v) acc[r][v] += wv * load<V>(s + r * row_stride + v * L);
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NB; ++v) {
      T* dst = out + r * out_stride + xo + v * L;
      const int64_t lanes = std::min<int64_t>(L, valid - v * L);
      if (lanes == L) {
        store(dst, acc[r][v]);
      } else if (lanes > 0) {
        T tmp[L];
        store(tmp, acc[r][v]);
        std::memcpy(dst, tmp, sizeof(T) * lanes);
      }
    }
  }
}

template <typename T>
void forward_kernel(const T* x, const T* vals, const int64_t* rp, const int32_t* ci, const T* bias, T* out,
                    const SparseConvGeometry& g) {
  constexpr int64_t L = kLanes<T>;
  if (g.N == 0 || g.C_out == 0) return;
  const int64_t KK = g.KH * g.KW;
  const int64_t Wp = (g.W_out - 1) * g.SW + g.KW;
  const int64_t Wa = Wp + L;  // slack: vector loads of the last partial vector stay inside
  // rows per tile from the cache budget of the halo (all input channels)
  const int64_t budget_rows = std::max<int64_t>(g.KH, kHaloBytes / (int64_t(sizeof(T)) * std::max<int64_t>(1, g.C_in) * Wa));
  const int64_t tile = std::min(g.H_out, std::max<int64_t>(1, (budget_rows - g.KH) / g.SH + 1));
  const int64_t n_tiles = (g.H_out + tile - 1) / tile;
  // output-channel groups only where tiles alone do not give every thread several tasks
  const int64_t want = 4 * at::get_num_threads();
  const int64_t groups = std::min(g.C_out, std::max<int64_t>(1, (want + g.N * n_tiles - 1) / (g.N * n_tiles)));
  const int64_t group_size = (g.C_out + groups - 1) / groups;
  const int64_t rows_h_max = (tile - 1) * g.SH + g.KH;
  at::parallel_for(0, g.N * n_tiles * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> halo(g.C_in * rows_h_max * Wa, T(0));
    std::vector<int64_t> off;
    std::vector<T> w;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t grp = t % groups, tl = (t / groups) % n_tiles, n = t / (groups * n_tiles);
      const int64_t y0 = tl * tile, rows = std::min(tile, g.H_out - y0);
      load_halo(x, halo.data(), rows_h_max, (rows - 1) * g.SH + g.KH, Wa, y0 * g.SH - g.PH, g, n);
      for (int64_t o = grp * group_size; o < std::min(g.C_out, (grp + 1) * group_size); ++o) {
        const int64_t k0 = rp[o], m = rp[o + 1] - k0;
        off.resize(m);
        w.resize(m);
        for (int64_t j = 0; j < m; ++j) {
          const int64_t col = ci[k0 + j], c = col / KK, r = col % KK;
          off[j] = (c * rows_h_max + r / g.KW) * Wa + r % g.KW;
          w[j] = vals[k0 + j];
        }
        const T b = bias ? bias[o] : T(0);
        T* oplane = out + ((n * g.C_out + o) * g.H_out + y0) * g.W_out;
        const int64_t rs = g.SH * Wa;  // halo distance of consecutive output rows
        if (g.SW != 1) {
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t xo = 0; xo < g.W_out; ++xo) {
              T acc = b;
              const T* base = halo.data() + r * rs + xo * g.SW;
              for (int64_t j = 0; j < m; ++j) acc += w[j] * base[off[j]];
              oplane[r * g.W_out + xo] = acc;
            }
          }
        } else if (g.W_out >= 4 * L) {
          for (int64_t r = 0; r < rows; ++r) {
            const T* base = halo.data() + r * rs;
            T* orow = oplane + r * g.W_out;
            int64_t xo = 0;
            for (; xo + 4 * L <= g.W_out; xo += 4 * L)
              tap_block<T, 1, 4>(base, rs, off.data(), w.data(), m, b, xo, orow, g.W_out, 4 * L);
            for (; xo < g.W_out; xo += L)
              tap_block<T, 1, 1>(base, rs, off.data(), w.data(), m, b, xo, orow, g.W_out, g.W_out - xo);
          }
        } else {
          // narrow rows: block 4 rows per vector instead
          for (int64_t xo = 0; xo < g.W_out; xo += L) {
            int64_t r = 0;
            for (; r + 4 <= rows; r += 4)
              tap_block<T, 4, 1>(halo.data() + r * rs, rs, off.data(), w.data(), m, b, xo, oplane + r * g.W_out,
                                 g.W_out, g.W_out - xo);
            for (; r < rows; ++r)
              tap_block<T, 1, 1>(halo.data() + r * rs, rs, off.data(), w.data(), m, b, xo, oplane + r * g.W_out,
                                 g.W_out, g.W_out - xo);
          }
        }
      }
    }
  });
}

// Input gradient: the transposed convolution as a scatter. A task owns one (image, input
// channel) plane of the gradient and adds every tap reading from that channel; the transposed
// index (taps grouped by input channel) is built once per call by a counting sort, O(nnz).
// Reflection is folded back on the fly: the scatter target is the reflected source row/column.
template <typename T>
void input_grad_kernel(const T* gout, const T* vals, const int64_t* rp, const int32_t* ci, T* gin,
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

// Weight gradient at the kept taps only: grad[k] = sum over images and output pixels of
// grad_out[o] times the input the tap read. Tasks are (row tile, output channel); each keeps a
// partial per tap (in float64), summed over tiles in a fixed order (deterministic).
template <typename T>
void weight_grad_kernel(const T* gout, const T* x, const int64_t* rp, const int32_t* ci, T* gw,
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
  at::parallel_for(0, g.nnz, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      double s = 0.0;
      for (int64_t tile = 0; tile < n_tiles; ++tile) s += partial[tile * g.nnz + k];
      gw[k] = static_cast<T>(s);
    }
  });
}

std::string mode_string(c10::string_view s) { return std::string(s.data(), s.size()); }

at::Tensor sparse_conv2d_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                             c10::string_view padding_mode) {
  const auto g = sparse_conv2d_geometry(input.sizes(), values, row_ptr, col_idx, kernel_size, stride, padding,
                                        mode_string(padding_mode), input);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == g.C_out && bias->scalar_type() == input.scalar_type() &&
                    bias->device() == input.device(),
                "sparse_conv2d: bias must be 1-D with C_out = ", g.C_out, " entries of the input's dtype and device");
    b = bias->contiguous();
  }
  const at::Tensor x = input.contiguous(), v = values.contiguous(), rp = row_ptr.contiguous(),
                   ci = col_idx.contiguous();
  at::Tensor out = at::empty({g.N, g.C_out, g.H_out, g.W_out}, input.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_cpu", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(),
                             ci.data_ptr<int32_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                             out.data_ptr<scalar_t>(), g);
  });
  return out;
}

at::Tensor sparse_conv2d_input_grad_cpu(const at::Tensor& grad_output, const at::Tensor& values,
                                        const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                        at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        c10::string_view padding_mode) {
  const auto g = sparse_conv2d_geometry(input_size, values, row_ptr, col_idx, kernel_size, stride, padding,
                                        mode_string(padding_mode), grad_output);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.N, g.C_out, g.H_out, g.W_out}),
              "sparse_conv2d_input_grad: grad_output must have the output's shape (", g.N, ", ", g.C_out, ", ",
              g.H_out, ", ", g.W_out, "), got ", grad_output.sizes());
  const at::Tensor go = grad_output.contiguous(), v = values.contiguous(), rp = row_ptr.contiguous(),
                   ci = col_idx.contiguous();
  at::Tensor gin = at::empty({g.N, g.C_in, g.H, g.W}, grad_output.options());
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "sparse_conv2d_input_grad_cpu", [&] {
    input_grad_kernel<scalar_t>(go.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(),
                                ci.data_ptr<int32_t>(), gin.data_ptr<scalar_t>(), g);
  });
  return gin;
}

at::Tensor sparse_conv2d_weight_grad_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                         const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                         c10::string_view padding_mode) {
  // values are not needed, only their count and dtype: an empty-strided stand-in is enough.
  const at::Tensor like_values = at::empty({col_idx.numel()}, input.options());
  const auto g = sparse_conv2d_geometry(input.sizes(), like_values, row_ptr, col_idx, kernel_size, stride, padding,
                                        mode_string(padding_mode), input);
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() && grad_output.device() == input.device(),
              "sparse_conv2d_weight_grad: grad_output must match the input's dtype and device");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.N, g.C_out, g.H_out, g.W_out}),
              "sparse_conv2d_weight_grad: grad_output must have the output's shape (", g.N, ", ", g.C_out, ", ",
              g.H_out, ", ", g.W_out, "), got ", grad_output.sizes());
  const at::Tensor go = grad_output.contiguous(), x = input.contiguous(), rp = row_ptr.contiguous(),
                   ci = col_idx.contiguous();
  at::Tensor gw = at::zeros({g.nnz}, input.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_weight_grad_cpu", [&] {
    weight_grad_kernel<scalar_t>(go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(),
                                 ci.data_ptr<int32_t>(), gw.data_ptr<scalar_t>(), g);
  });
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(oes_fast, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_conv2d_input_grad", &sparse_conv2d_input_grad_cpu);
  m.impl("sparse_conv2d_weight_grad", &sparse_conv2d_weight_grad_cpu);
}

}  // namespace oes_fast
