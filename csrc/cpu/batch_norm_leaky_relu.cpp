// CPU kernels of batch_norm_stats, batch_norm_leaky_relu and batch_norm_leaky_relu_backward
// (schemas: csrc/batch_norm_leaky_relu.cpp): the training-mode batch norm and the LeakyReLU
// after it in one pass forward and two backward, where torch runs a batch-norm apply, an
// activation, the activation's backward and the batch norm's two-pass backward, with their
// temporaries. Threads split the channels and each channel is summed in one fixed order, so
// the results do not depend on the thread count.
//
// The per-channel loops are in batch_norm_leaky_relu_kernels.h, compiled once per instruction
// set (per_isa.h); cpu_isa() chooses the copy at run time. This file holds the argument
// handling and the registration, compiled at the baseline flags.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace oes_fast {
namespace {

// Per-channel constants of the backward (all float64).
struct ChannelBackward {
  double mean, invstd, scale, shift, slope;
};

// The head's constants (batch_norm_leaky_relu_conv1x1): C input and O output channels, the
// per-channel scale and shift, the slope, the (O, C) weight and the optional bias, all float64.
struct Head {
  int64_t C, O;
  const double *scale, *shift;
  double slope;
  const double *weight, *bias;
};

// The head's backward constants (batch_norm_leaky_relu_conv1x1_backward), all float64: the batch
// norm's mean and scale and shift per input channel, the slope, the (O, C) weight, and for the
// second pass the per-channel coefficients of the input gradient.
struct HeadBackward {
  int64_t C, O;
  const double *mean, *scale, *shift;
  double slope;
  const double* weight;
  const double *xc_coef, *constant;
};

}  // namespace
}  // namespace oes_fast

#define OES_FAST_KERNELS_FILE "batch_norm_leaky_relu_kernels.h"
#include "per_isa.h"

namespace oes_fast {
namespace {

struct Planes {
  int64_t N, C, HW;
};

Planes check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got ", input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": dtype must be float32 or float64, got ", dtype);
  return {input.size(0), input.size(1), input.size(2) * input.size(3)};
}

at::Tensor channel_vector(const at::Tensor& t, const at::Tensor& input, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == input.size(1) && t.scalar_type() == at::kDouble &&
                  t.device() == input.device(),
              op, ": ", name, " must be a float64 vector of C = ", input.size(1), " entries on ", input.device(),
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  return t.contiguous();
}

// Channels per task: at least ~32K elements each, so small tensors stay on one thread.
int64_t channel_grain(const Planes& p) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.N * p.HW)); }

at::Tensor batch_norm_stats_cpu(const at::Tensor& input) {
  const Planes p = check_input(input, "batch_norm_stats");
  const at::Tensor x = input.contiguous();
  at::Tensor stats = at::empty({p.C, 2}, input.options().dtype(at::kDouble));
  double* out = stats.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_stats_cpu", [&] {
    auto* kernel = OES_FAST_ISA_DISPATCH(channel_stats<scalar_t>);
    const scalar_t* data = x.data_ptr<scalar_t>();
    at::parallel_for(0, p.C, channel_grain(p), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) kernel(data + c * p.HW, p.N, p.C * p.HW, p.HW, out + 2 * c);
    });
  });
  return stats;
}

at::Tensor batch_norm_act_stats_cpu(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                                    double negative_slope) {
  const char* op = "batch_norm_act_stats";
  const Planes p = check_input(input, op);
  const at::Tensor sc = channel_vector(scale, input, "scale", op), sh = channel_vector(shift, input, "shift", op);
  const at::Tensor x = input.contiguous();
  at::Tensor stats = at::empty({p.C, 2}, input.options().dtype(at::kDouble));
  double* out = stats.data_ptr<double>();
  const double* scale_d = sc.data_ptr<double>();
  const double* shift_d = sh.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_act_stats_cpu", [&] {
    auto* kernel = OES_FAST_ISA_DISPATCH(channel_act_stats<scalar_t>);
    const scalar_t* data = x.data_ptr<scalar_t>();
    at::parallel_for(0, p.C, channel_grain(p), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        kernel(data + c * p.HW, p.N, p.C * p.HW, p.HW, scale_d[c], shift_d[c], negative_slope, out + 2 * c);
    });
  });
  return stats;
}

// The training-mode batch norm's per-channel constants from the statistics: the formula of
// oes_fast.ops.batch_norm_affine, one operation at a time in IEEE float64 (no contraction, no
// reciprocal for the division: the file's -ffast-math is off here), so that both give the same
// bits. One call instead of a dozen small tensor ops: on the generator's small layers those
// cost more than the pass over the activations (about 70 us a batch norm on a 2-core Zen 3).
// weight and bias are read in their own dtype and widened exactly (no float64 copies made first).
template <typename W>
__attribute__((optimize("no-fast-math", "fp-contract=off"))) void batch_norm_constants_loop(
    const double* stats, double count, const W* weight, const W* bias, double eps, int64_t C, double* mean,
    double* invstd, double* scale, double* shift) {
  for (int64_t c = 0; c < C; ++c) {
    const double m = stats[2 * c] / count;
    double var = stats[2 * c + 1] / count - m * m;
    if (!(var > 0.0)) var = var == var ? 0.0 : var;  // clamp_min(0): NaN stays NaN
    const double std = std::sqrt(var + eps);
    const double s = static_cast<double>(weight[c]) / std;
    mean[c] = m;
    invstd[c] = 1.0 / std;
    scale[c] = s;
    shift[c] = static_cast<double>(bias[c]) - m * s;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_constants_cpu(const at::Tensor& stats,
                                                                                   int64_t count,
                                                                                   const at::Tensor& weight,
                                                                                   const at::Tensor& bias, double eps) {
  const char* op = "batch_norm_constants";
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == 2 && stats.scalar_type() == at::kDouble, op,
              ": stats must be (C, 2) float64, got ", stats.scalar_type(), " ", stats.sizes());
  const int64_t C = stats.size(0);
  TORCH_CHECK(count > 0, op, ": count must be positive, got ", count);
  for (const at::Tensor* t : {&weight, &bias}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == C && t->device() == stats.device(), op,
                ": weight and bias must be vectors of C = ", C, " entries on ", stats.device(), ", got ", t->sizes(),
                " on ", t->device());
  }
  const at::Tensor st = stats.contiguous();
  at::Tensor mean = at::empty({C}, stats.options()), invstd = at::empty_like(mean), scale = at::empty_like(mean),
             shift = at::empty_like(mean);
  const bool same = weight.scalar_type() == bias.scalar_type();
  if (same && weight.scalar_type() == at::kFloat && weight.is_contiguous() && bias.is_contiguous()) {
    batch_norm_constants_loop(st.data_ptr<double>(), static_cast<double>(count), weight.data_ptr<float>(),
                              bias.data_ptr<float>(), eps, C, mean.data_ptr<double>(), invstd.data_ptr<double>(),
                              scale.data_ptr<double>(), shift.data_ptr<double>());
  } else {
    const at::Tensor w = weight.to(at::kDouble).contiguous(), b = bias.to(at::kDouble).contiguous();
    batch_norm_constants_loop(st.data_ptr<double>(), static_cast<double>(count), w.data_ptr<double>(),
                              b.data_ptr<double>(), eps, C, mean.data_ptr<double>(), invstd.data_ptr<double>(),
                              scale.data_ptr<double>(), shift.data_ptr<double>());
  }
  return {mean, invstd, scale, shift};
}

at::Tensor batch_norm_leaky_relu_cpu(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                                     double negative_slope) {
  const char* op = "batch_norm_leaky_relu";
  const Planes p = check_input(input, op);
  const at::Tensor sc = channel_vector(scale, input, "scale", op), sh = channel_vector(shift, input, "shift", op);
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const double* scale_d = sc.data_ptr<double>();
  const double* shift_d = sh.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_leaky_relu_cpu", [&] {
    auto* kernel = OES_FAST_ISA_DISPATCH(channel_forward<scalar_t>);
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, p.C, channel_grain(p), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        kernel(in + c * p.HW, out + c * p.HW, p.N, p.C * p.HW, p.HW, scale_d[c], shift_d[c], negative_slope);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_leaky_relu_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& scale, const at::Tensor& shift, double negative_slope) {
  const char* op = "batch_norm_leaky_relu_backward";
  const Planes p = check_input(input, op);
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == input.scalar_type() &&
                  grad_output.device() == input.device(),
              op, ": grad_output must match input in shape, dtype and device");
  const at::Tensor m = channel_vector(mean, input, "mean", op), is = channel_vector(invstd, input, "invstd", op),
                   sc = channel_vector(scale, input, "scale", op), sh = channel_vector(shift, input, "shift", op);
  const at::Tensor g = grad_output.contiguous(), x = input.contiguous();
  at::Tensor grad_input = at::empty_like(x, at::MemoryFormat::Contiguous);
  const auto vec = input.options().dtype(at::kDouble);
  at::Tensor grad_weight = at::empty({p.C}, vec), grad_bias = at::empty({p.C}, vec);
  const double *mean_d = m.data_ptr<double>(), *invstd_d = is.data_ptr<double>(), *scale_d = sc.data_ptr<double>(),
               *shift_d = sh.data_ptr<double>();
  double *gw = grad_weight.data_ptr<double>(), *gb = grad_bias.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_leaky_relu_backward_cpu", [&] {
    auto* kernel = OES_FAST_ISA_DISPATCH(channel_backward<scalar_t>);
    const scalar_t* go = g.data_ptr<scalar_t>();
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* gi = grad_input.data_ptr<scalar_t>();
    at::parallel_for(0, p.C, channel_grain(p), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const ChannelBackward k{mean_d[c], invstd_d[c], scale_d[c], shift_d[c], negative_slope};
        const int64_t at_c = c * p.HW;
        kernel(go + at_c, in + at_c, gi + at_c, p.N, p.C * p.HW, p.HW, k, gw + c, gb + c);
      }
    });
  });
  return {grad_input, grad_weight, grad_bias};
}

// The head's (C_out, C) conv weight, checked against the input, as float64.
at::Tensor head_weight(const at::Tensor& weight, const at::Tensor& input, const Planes& p, const char* op) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == p.C && weight.scalar_type() == input.scalar_type() &&
                  weight.device() == input.device(),
              op, ": weight must be (C_out, C = ", p.C, ") of the input's dtype and device, got ", weight.scalar_type(),
              " ", weight.sizes(), " on ", weight.device());
  return weight.to(at::kDouble).contiguous();
}

at::Tensor batch_norm_leaky_relu_conv1x1_cpu(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                                             double negative_slope, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias) {
  const char* op = "batch_norm_leaky_relu_conv1x1";
  const Planes p = check_input(input, op);
  const at::Tensor sc = channel_vector(scale, input, "scale", op), sh = channel_vector(shift, input, "shift", op);
  const at::Tensor w = head_weight(weight, input, p, op);
  const int64_t O = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == O && bias->scalar_type() == input.scalar_type() &&
                    bias->device() == input.device(),
                op, ": bias must be a vector of C_out = ", O, " entries of the input's dtype and device, got ",
                bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
  const at::Tensor b = has_bias ? bias->to(at::kDouble).contiguous() : at::Tensor();
  const Head head{p.C, O, sc.data_ptr<double>(), sh.data_ptr<double>(), negative_slope, w.data_ptr<double>(),
                  has_bias ? b.data_ptr<double>() : nullptr};
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({p.N, O, input.size(2), input.size(3)}, x.options());
  // tasks: chunks of kHeadChunk pixels of one image; every pixel is computed alone, so the bits
  // do not depend on the thread count
  const int64_t K = isa_baseline::kHeadChunk;
  const int64_t chunks = (p.HW + K - 1) / K, tasks = p.N * chunks;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_leaky_relu_conv1x1_cpu", [&] {
    auto* kernel = OES_FAST_ISA_DISPATCH(head_chunk<scalar_t>);
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, tasks, std::max<int64_t>(1, 32768 / (K * std::max<int64_t>(1, p.C))),
                     [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> act(p.C * K);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / chunks, i0 = (t % chunks) * K;
        kernel(in + n * p.C * p.HW + i0, out + n * O * p.HW + i0, p.HW, std::min(K, p.HW - i0), head, act.data());
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_leaky_relu_conv1x1_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& scale, const at::Tensor& shift, double negative_slope, const at::Tensor& weight) {
  const char* op = "batch_norm_leaky_relu_conv1x1_backward";
  const Planes p = check_input(input, op);
  const at::Tensor w = head_weight(weight, input, p, op);
  const int64_t O = weight.size(0);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({p.N, O, input.size(2), input.size(3)}) &&
                  grad_output.scalar_type() == input.scalar_type() && grad_output.device() == input.device(),
              op, ": grad_output must be (N, C_out, H, W) = (", p.N, ", ", O, ", ", input.size(2), ", ", input.size(3),
              ") of the input's dtype and device, got ", grad_output.scalar_type(), " ", grad_output.sizes());
  const at::Tensor m = channel_vector(mean, input, "mean", op), is = channel_vector(invstd, input, "invstd", op),
                   sc = channel_vector(scale, input, "scale", op), sh = channel_vector(shift, input, "shift", op);
  const at::Tensor x = input.contiguous(), go = grad_output.contiguous();
  at::Tensor grad_input = at::empty_like(x, at::MemoryFormat::Contiguous);
  const auto vec = input.options().dtype(at::kDouble);
  at::Tensor grad_bn_weight = at::empty({p.C}, vec), grad_bn_bias = at::empty({p.C}, vec);
  at::Tensor grad_weight = at::empty({O, p.C}, vec), grad_bias = at::empty({O}, vec);
  at::Tensor xc_coef = at::empty({p.C}, vec), constant = at::empty({p.C}, vec);
  HeadBackward h{p.C, O, m.data_ptr<double>(), sc.data_ptr<double>(), sh.data_ptr<double>(), negative_slope,
                 w.data_ptr<double>(), xc_coef.data_ptr<double>(), constant.data_ptr<double>()};
  // Pass 1's sums per task of kTaskChunks chunks of one image, added in task order: the bits do
  // not depend on the thread count.
  const int64_t K = isa_baseline::kHeadChunk, lanes = isa_baseline::kHeadMaxLanes, kTaskChunks = 16;
  const int64_t chunks = (p.HW + K - 1) / K, per_image = (chunks + kTaskChunks - 1) / kTaskChunks;
  const int64_t tasks = p.N * per_image, entries = O * p.C + O + 2 * p.C;
  std::vector<double> partial(tasks * entries, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_leaky_relu_conv1x1_backward_cpu", [&] {
    // the generator's 3 outputs (RGB) compiled as a constant, any other count at run time
    auto* sums = O == 3 ? OES_FAST_ISA_DISPATCH(head_backward_sums<scalar_t, 3>)
                        : OES_FAST_ISA_DISPATCH(head_backward_sums<scalar_t, 0>);
    auto* input_grad = O == 3 ? OES_FAST_ISA_DISPATCH(head_backward_input<scalar_t, 3>)
                              : OES_FAST_ISA_DISPATCH(head_backward_input<scalar_t, 0>);
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* gout = go.data_ptr<scalar_t>();
    scalar_t* gin = grad_input.data_ptr<scalar_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> g(O * K), act(p.C * K), acc(entries * lanes);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0);
        const int64_t n = t / per_image, first = (t % per_image) * kTaskChunks;
        for (int64_t k = first; k < std::min(chunks, first + kTaskChunks); ++k) {
          const int64_t i0 = k * K;
          sums(in + n * p.C * p.HW + i0, gout + n * O * p.HW + i0, p.HW, std::min(K, p.HW - i0), h, g.data(),
               act.data(), acc.data());
        }
        for (int64_t e = 0; e < entries; ++e) {
          double s = 0.0;
          for (int64_t l = 0; l < lanes; ++l) s += acc[e * lanes + l];
          partial[t * entries + e] = s;
        }
      }
    });
    std::vector<double> total(entries, 0.0);
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t e = 0; e < entries; ++e) total[e] += partial[t * entries + e];
    double *gw = grad_weight.data_ptr<double>(), *gb = grad_bias.data_ptr<double>();
    for (int64_t e = 0; e < O * p.C; ++e) gw[e] = total[e];
    for (int64_t o = 0; o < O; ++o) gb[o] = total[O * p.C + o];
    // the batch norm's gradients and the input gradient's coefficients, as channel_backward
    const double count = static_cast<double>(p.N * p.HW);
    const double *invstd_d = is.data_ptr<double>(), *scale_d = sc.data_ptr<double>();
    double *gbw = grad_bn_weight.data_ptr<double>(), *gbb = grad_bn_bias.data_ptr<double>();
    double *coef = xc_coef.data_ptr<double>(), *cst = constant.data_ptr<double>();
    for (int64_t c = 0; c < p.C; ++c) {
      const double sum_dt = total[O * p.C + O + c], sum_dt_xc = total[O * p.C + O + p.C + c];
      gbb[c] = sum_dt;
      gbw[c] = sum_dt_xc * invstd_d[c];
      coef[c] = -scale_d[c] * invstd_d[c] * invstd_d[c] * sum_dt_xc / count;
      cst[c] = -scale_d[c] * sum_dt / count;
    }
    at::parallel_for(0, p.N * chunks, std::max<int64_t>(1, 32768 / (K * std::max<int64_t>(1, p.C))),
                     [&](int64_t begin, int64_t end) {
      std::vector<double> g(O * K), xb(K);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / chunks, i0 = (t % chunks) * K;
        input_grad(in + n * p.C * p.HW + i0, gout + n * O * p.HW + i0, gin + n * p.C * p.HW + i0, p.HW,
                   std::min(K, p.HW - i0), h, g.data(), xb.data());
      }
    });
  });
  return {grad_input, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(oes_fast, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_act_stats", &batch_norm_act_stats_cpu);
  m.impl("batch_norm_constants", &batch_norm_constants_cpu);
  m.impl("batch_norm_leaky_relu", &batch_norm_leaky_relu_cpu);
  m.impl("batch_norm_leaky_relu_backward", &batch_norm_leaky_relu_backward_cpu);
  m.impl("batch_norm_leaky_relu_conv1x1", &batch_norm_leaky_relu_conv1x1_cpu);
  m.impl("batch_norm_leaky_relu_conv1x1_backward", &batch_norm_leaky_relu_conv1x1_backward_cpu);
}

}  // namespace oes_fast
