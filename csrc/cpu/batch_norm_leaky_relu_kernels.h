// CPU kernels of batch_norm_stats, batch_norm_leaky_relu and batch_norm_leaky_relu_backward, one
// channel at a time (the ATen side, which splits the channels among threads, is
// batch_norm_leaky_relu.cpp). Channel c of image n is the contiguous plane at
// (n * C + c) * HW: a kernel walks the N planes of its channel with `image_stride` = C * HW.
// Everything is computed in float64: the pre-activation x * scale + shift would cancel in
// float32 where |mean| >> std (the byte traffic, not the arithmetic, bounds these loops).
// Included once per instruction set by per_isa.h (from batch_norm_leaky_relu.cpp): no includes,
// no include guard; everything in the copy's namespace with internal linkage.

namespace oes_fast {
namespace OES_FAST_ISA_NS {
namespace {

// The one expression both the forward and the backward evaluate, so that the backward's
// choice of slope is the forward's, bit for bit, without keeping the output.
inline double pre_activation(double x, double scale, double shift) { return x * scale + shift; }

// (sum, sum of squares) of channel c into out[0], out[1].
template <typename scalar_t>
void channel_stats(const scalar_t* x, int64_t images, int64_t image_stride, int64_t hw, double* out) {
  double sum = 0.0, sum_sq = 0.0;
  for (int64_t n = 0; n < images; ++n) {
    const scalar_t* p = x + n * image_stride;
    double s = 0.0, q = 0.0;
#pragma omp simd reduction(+ : s, q)
    for (int64_t i = 0; i < hw; ++i) {
      const double v = static_cast<double>(p[i]);
      s += v;
      q += v * v;
    }
    sum += s;
    sum_sq += q;
  }
  out[0] = sum;
  out[1] = sum_sq;
}

template <typename scalar_t>
void channel_forward(const scalar_t* x, scalar_t* y, int64_t images, int64_t image_stride, int64_t hw, double scale,
                     double shift, double slope) {
  for (int64_t n = 0; n < images; ++n) {
    const scalar_t* p = x + n * image_stride;
    scalar_t* q = y + n * image_stride;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) {
      const double pre = pre_activation(static_cast<double>(p[i]), scale, shift);
      q[i] = static_cast<scalar_t>(pre > 0.0 ? pre : pre * slope);
    }
  }
}

// Pass 1: the sums of dt = grad * leaky'(pre) and of dt * (x - mean); pass 2: grad_x. Both
// passes walk the same channel, so on planes that fit in cache the second reads from it.
template <typename scalar_t>
void channel_backward(const scalar_t* grad, const scalar_t* x, scalar_t* grad_x, int64_t images, int64_t image_stride,
                      int64_t hw, const ChannelBackward& k, double* grad_weight, double* grad_bias) {
  const double mean = k.mean, scale = k.scale, shift = k.shift, slope = k.slope;
  double sum_dt = 0.0, sum_dt_xc = 0.0;
  for (int64_t n = 0; n < images; ++n) {
    const scalar_t* g = grad + n * image_stride;
    const scalar_t* p = x + n * image_stride;
    double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = 0; i < hw; ++i) {
      const double v = static_cast<double>(p[i]);
      const double dt = static_cast<double>(g[i]) * (pre_activation(v, scale, shift) > 0.0 ? 1.0 : slope);
      a += dt;
      b += dt * (v - mean);
    }
    sum_dt += a;
    sum_dt_xc += b;
  }
  *grad_bias = sum_dt;
  *grad_weight = sum_dt_xc * k.invstd;
  // grad_x = scale * (dt - mean(dt) - xhat * mean(dt * xhat)), xhat = (x - mean) * invstd,
  // as dt * scale + (x - mean) * xc_coef + constant
  const double count = static_cast<double>(images * hw);
  const double xc_coef = -scale * k.invstd * k.invstd * sum_dt_xc / count;
  const double constant = -scale * sum_dt / count;
  for (int64_t n = 0; n < images; ++n) {
    const scalar_t* g = grad + n * image_stride;
    const scalar_t* p = x + n * image_stride;
    scalar_t* out = grad_x + n * image_stride;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) {
      const double v = static_cast<double>(p[i]);
      const double dt = static_cast<double>(g[i]) * (pre_activation(v, scale, shift) > 0.0 ? 1.0 : slope);
      out[i] = static_cast<scalar_t>(dt * scale + (v - mean) * xc_coef + constant);
    }
  }
}

}  // namespace
}  // namespace OES_FAST_ISA_NS
}  // namespace oes_fast
