// The Sparse-DIP generator's forward without autograd in one C++ call (oes_fast._C.GeneratorForward,
// used by oes_fast.sparse.SparseGenerator.forward when gradients are off, on CPU float32 / float64).
//
// The Python forward (SparseGenerator.run_stage) decides per stage which fused op runs and then
// computes, from the parameters, the small vectors each op takes (live gammas and betas, the
// folded constants of the conv biases), about 20 small torch calls and 80 trips through the
// dispatcher per forward, each of which finds its code and data cold after a kernel has swept
// the caches: 1-2 ms of a 17-22 ms forward at 512x512 (docs/performance.md). Here the decisions
// are the ones a Python forward on the same input shape took (SparseGenerator records them, see
// `_executor`), and each step computes what the Python stage methods compute, with the same
// ATen and oes_fast ops in the same order: the same bits (tests/test_sparse.py compares them).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "generator_forward.h"

namespace oes_fast {
namespace {

namespace py = pybind11;
using Conv = std::tuple<at::Tensor, at::Tensor>;
using Opt = std::optional<at::Tensor>;

// What SparseGenerator's _Conv holds (oes_fast/sparse.py)
struct ConvStage {
  at::Tensor values, row_ptr, col_idx, live_out, live_in, dense_pos;
  Opt bias, bias_mask, fold_weight, fold_in, fold_mask;
  std::vector<int64_t> kernel;
  int64_t upsample = 1, n_in = 0, n_out = 0;
  bool select_in = false, sparse = true;
};

// What _BatchNorm holds
struct BatchNormStage {
  at::Tensor live, weight, bias, weight_mask, bias_mask;
  Opt zero_beta, zero_beta_live;  // where betas_pruned
  double eps = 1e-5;
  bool const_zero = false, betas_pruned = false, live_gammas_kept = false;
};

// What _Elementwise holds
struct ElementwiseStage {
  std::string op, arg;
};

struct Stage {
  std::string kind;  // "conv", "bn" or "elementwise"
  ConvStage conv;
  BatchNormStage bn;
  ElementwiseStage el;
};

// One call of SparseGenerator.run_stage: its branch and where it went on
enum Branch : int64_t { kPoolConv = 0, kStatsConv, kHead, kPrologue, kBatchNormOp, kBatchNormFromStats, kPlain };

struct Step {
  int64_t branch, i, j;  // j: the conv that kHead and kPrologue end with
  bool act, pool;        // kPrologue, kBatchNormOp: a LeakyReLU fused; kPrologue: the conv's pooling
  int64_t bn2;           // kPrologue: the second batch norm's stage, or -1
};

constexpr double kLeakySlope = 0.2;  // oes_fast.sparse.LEAKY_RELU_SLOPE

// the state between stages (SparseGenerator.forward's x, const, hw, stats; undefined = None)
struct State {
  at::Tensor x, c, stats;
  int64_t n, h, w;
};

template <typename F>
c10::TypedOperatorHandle<F> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

// one handle per op, found once: OES_OP(accessor, op name, signature)
#define OES_OP(fn, name, ...)                                           \
  const auto& fn() {                                                    \
    static const auto handle = find_op<__VA_ARGS__>("oes_fast::" name); \
    return handle;                                                      \
  }
OES_OP(pool_stats_op, "sparse_conv2d_pool_stats",
       Conv(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, at::IntArrayRef,
            at::IntArrayRef, c10::string_view))
OES_OP(stats_op, "sparse_conv2d_stats",
       Conv(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, at::IntArrayRef,
            at::IntArrayRef, c10::string_view, int64_t))
OES_OP(conv_op, "sparse_conv2d",
       at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&,
                  at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, c10::string_view, int64_t))
OES_OP(constants_op, "batch_norm_constants",
       std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, const at::Tensor&,
                                                                  const at::Tensor&, double))
OES_OP(batch_norm_act_op, "batch_norm_act",
       at::Tensor(const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&, double, double))
OES_OP(head_op, "batch_norm_act_conv1x1",
       at::Tensor(const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&, double, double,
                  const at::Tensor&, const Opt&))
OES_OP(act_conv_op, "batch_norm_act_sparse_conv2d",
       Conv(const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&, double, double, const at::Tensor&,
            const at::Tensor&, const at::Tensor&, const Opt&, at::IntArrayRef, at::IntArrayRef, c10::string_view,
            int64_t, bool))
OES_OP(act_norm_conv_op, "batch_norm_act_norm_sparse_conv2d",
       Conv(const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&, double, double, const at::Tensor&,
            const at::Tensor&, double, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&,
            at::IntArrayRef, at::IntArrayRef, c10::string_view, int64_t, bool))
OES_OP(avg_pool_op, "avg_pool2x2", at::Tensor(const at::Tensor&))
#undef OES_OP

Opt opt(const at::Tensor& t) { return t.defined() ? Opt(t) : std::nullopt; }

// --- _Conv
at::Tensor conv_constants(const ConvStage& s, const at::Tensor& const_in) {
  at::Tensor c;
  if (s.bias) c = *s.bias * *s.bias_mask;
  if (s.fold_weight) {
    TORCH_CHECK(const_in.defined(), "GeneratorForward: a folded conv without input constants");
    const at::Tensor taps = (*s.fold_weight * *s.fold_mask).sum({2, 3});
    const at::Tensor folded = at::matmul(taps, const_in.index_select(0, *s.fold_in));
    c = c.defined() ? c + folded : folded;
  }
  return c;
}

Opt live_bias(const ConvStage& s, const at::Tensor& const_out) {
  return const_out.defined() ? Opt(const_out.index_select(0, s.live_out)) : std::nullopt;
}

at::Tensor dense_weight(const ConvStage& s) {
  const int64_t kk = s.kernel[0] * s.kernel[1];
  return s.values.new_zeros({s.n_out * s.n_in * kk}).scatter(0, s.dense_pos, s.values)
      .view({s.n_out, s.n_in, s.kernel[0], s.kernel[1]});
}

std::vector<int64_t> same_padding(const ConvStage& s) { return {(s.kernel[0] - 1) / 2, (s.kernel[1] - 1) / 2}; }

// _Conv.forward
void conv_forward(const ConvStage& s, State& st, bool with_stats, bool pool) {
  const at::Tensor const_out = conv_constants(s, st.c);
  const Opt bias = live_bias(s, const_out);
  const int64_t u = s.upsample;
  st.c = const_out;
  st.h *= u;
  st.w *= u;
  st.stats = at::Tensor();
  if (s.n_out == 0) {
    st.x = at::Tensor();
    return;
  }
  if (!st.x.defined() || s.n_in == 0) {
    const at::Tensor b = bias ? *bias : s.values.new_zeros({s.n_out});
    st.x = b.view({1, -1, 1, 1}).expand({st.n, -1, st.h, st.w}).contiguous();
    return;
  }
  at::Tensor x = s.select_in ? st.x.index_select(1, s.live_in) : st.x;
  const std::vector<int64_t> pad = same_padding(s);
  if (pool) {
    std::tie(st.x, st.stats) =
        pool_stats_op()
            .call(x, s.values, s.row_ptr, s.col_idx, bias, s.kernel, pad, "reflect");
    st.h /= 2;
    st.w /= 2;
    return;
  }
  if (with_stats) {
    std::tie(st.x, st.stats) =
        stats_op()
            .call(x, s.values, s.row_ptr, s.col_idx, bias, s.kernel, pad, "reflect", u);
    return;
  }
  if (s.sparse) {
    st.x = conv_op()
               .call(x, s.values, s.row_ptr, s.col_idx, bias, s.kernel, {1, 1}, pad, "reflect", u);
    return;
  }
  if (u > 1) {
    const std::vector<double> scale{double(u), double(u)};
    x = at::upsample_nearest2d(x, std::nullopt, at::ArrayRef<double>(scale));
  }
  if (s.kernel[0] == 1 && s.kernel[1] == 1) {
    // as _Conv.forward: bmm, or baddbmm with the bias
    const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
    const at::Tensor weight = dense_weight(s).view({1, s.n_out, s.n_in}).expand({n, -1, -1});
    const at::Tensor flat = x.reshape({n, s.n_in, h * w});
    st.x = (bias ? at::baddbmm(bias->view({1, -1, 1}), weight, flat) : at::bmm(weight, flat)).view({n, s.n_out, h, w});
    return;
  }
  if (pad[0] || pad[1]) x = at::pad(x, {pad[1], pad[1], pad[0], pad[0]}, "reflect");
  st.x = at::conv2d(x, dense_weight(s), bias);
}

// --- _BatchNorm
// masked_parameters: (beta over all channels, gamma and beta of the live channels)
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_parameters(const BatchNormStage& s) {
  const at::Tensor weight = s.live_gammas_kept ? s.weight : s.weight * s.weight_mask;
  const at::Tensor gamma = weight.index_select(0, s.live);
  if (s.betas_pruned) return {*s.zero_beta, gamma, *s.zero_beta_live};
  const at::Tensor beta = s.bias * s.bias_mask;
  return {beta, gamma, beta.index_select(0, s.live)};
}

at::Tensor constants_after(const BatchNormStage& s, const at::Tensor& beta, double slope) {
  if (s.const_zero) return at::Tensor();
  return slope == 1.0 ? beta : at::leaky_relu(beta, slope);
}

using Constants = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// _Conv.after_batch_norm: (gamma, live beta, the conv's output constants, its live bias)
std::tuple<at::Tensor, at::Tensor, at::Tensor, Opt> after_batch_norm(const ConvStage& conv, const BatchNormStage& bn,
                                                                     double slope) {
  const auto [beta, gamma, beta_live] = masked_parameters(bn);
  const at::Tensor const_out = conv_constants(conv, constants_after(bn, beta, slope));
  return {gamma, beta_live, const_out, live_bias(conv, const_out)};
}

void batch_norm_forward(const BatchNormStage& s, State& st) {
  const auto [beta, gamma, beta_live] = masked_parameters(s);
  if (st.x.defined())
    st.x = at::batch_norm(st.x, gamma, beta_live, {}, {}, true, 0.0, s.eps, at::globalContext().userEnabledCuDNN());
  st.c = s.const_zero ? at::Tensor() : beta;
  st.stats = at::Tensor();
}

void batch_norm_from_stats(const BatchNormStage& s, State& st) {
  const auto [beta, gamma, beta_live] = masked_parameters(s);
  const int64_t count = st.x.size(0) * st.x.size(2) * st.x.size(3);
  const Constants c = constants_op()
                          .call(st.stats, count, gamma, beta_live, s.eps);
  st.x.mul_(std::get<2>(c).to(st.x.scalar_type()).view({1, -1, 1, 1}))
      .add_(std::get<3>(c).to(st.x.scalar_type()).view({1, -1, 1, 1}));
  st.c = s.const_zero ? at::Tensor() : beta;
  st.stats = at::Tensor();
}

void batch_norm_leaky_relu(const BatchNormStage& s, State& st, double slope) {
  const auto [beta, gamma, beta_live] = masked_parameters(s);
  st.x = batch_norm_act_op()
             .call(st.x, opt(st.stats), gamma, beta_live, s.eps, slope);
  st.c = constants_after(s, beta, slope);
  st.stats = at::Tensor();
}

// _Conv.forward_head
void head(const ConvStage& conv, const BatchNormStage& bn, State& st) {
  const auto [gamma, beta_live, const_out, bias] = after_batch_norm(conv, bn, kLeakySlope);
  st.x = head_op()
             .call(st.x, opt(st.stats), gamma, beta_live, bn.eps, kLeakySlope,
                   dense_weight(conv).view({conv.n_out, conv.n_in}), bias);
  st.c = const_out;
  st.stats = at::Tensor();
}

// _Conv.forward_after_batch_norm
void prologue(const ConvStage& conv, const BatchNormStage& bn, const BatchNormStage* bn2, State& st, double slope,
              bool pool) {
  const std::vector<int64_t> pad = same_padding(conv);
  const int64_t u = conv.upsample;
  Conv out;
  if (bn2 == nullptr) {
    const auto [gamma, beta_live, const_out, bias] = after_batch_norm(conv, bn, slope);
    out = act_conv_op()
              .call(st.x, opt(st.stats), gamma, beta_live, bn.eps, slope, conv.values, conv.row_ptr, conv.col_idx,
                    bias, conv.kernel, pad, "reflect", u, pool);
    st.c = const_out;
  } else {
    const auto [beta, gamma, beta_live] = masked_parameters(bn);
    const auto [gamma2, beta2_live, const_out, bias] = after_batch_norm(conv, *bn2, 1.0);
    out = act_norm_conv_op()
              .call(st.x, opt(st.stats), gamma, beta_live, bn.eps, slope, gamma2, beta2_live, bn2->eps, conv.values,
                    conv.row_ptr, conv.col_idx, bias, conv.kernel, pad, "reflect", u, pool);
    st.c = const_out;
  }
  std::tie(st.x, st.stats) = out;
  if (pool) {
    st.h /= 2;
    st.w /= 2;
  } else {
    st.h *= u;
    st.w *= u;
  }
}

// --- _Elementwise (without autograd: in place where the Python stage is)
at::Tensor activation(const std::string& arg, at::Tensor x, bool inplace) {
  if (arg == "LeakyReLU") return inplace ? at::leaky_relu_(x, kLeakySlope) : at::leaky_relu(x, kLeakySlope);
  if (arg == "ReLU") return inplace ? at::relu_(x) : at::relu(x);
  if (arg == "ELU") return inplace ? at::elu_(x) : at::elu(x);
  return x;  // "none"
}

// oes_fast.sparse.avg_pool2x2
at::Tensor avg_pool2x2(const at::Tensor& x) {
  if ((x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && x.is_contiguous() && x.dim() == 4 &&
      x.size(2) >= 2 && x.size(3) >= 2)
    return avg_pool_op().call(x);
  const int64_t h = x.size(2) / 2 * 2, w = x.size(3) / 2 * 2;
  auto part = [&](int64_t r, int64_t c) { return x.slice(2, r, h, 2).slice(3, c, w, 2); };
  return (part(0, 0) + part(0, 1) + part(1, 0) + part(1, 1)) * 0.25;
}

void elementwise_forward(const ElementwiseStage& s, State& st) {
  st.stats = at::Tensor();
  if (s.op == "act") {
    if (st.x.defined()) st.x = activation(s.arg, st.x, true);
    if (st.c.defined()) st.c = activation(s.arg, st.c, false);
  } else if (s.op == "pool") {
    if (st.x.defined()) st.x = s.arg == "avg" ? avg_pool2x2(st.x) : at::max_pool2d(st.x, {2, 2}, {2, 2});
    st.h /= 2;
    st.w /= 2;
  } else if (s.op == "up") {
    if (st.x.defined()) {
      const std::vector<double> scale{2.0, 2.0};
      st.x = s.arg == "nearest" ? at::upsample_nearest2d(st.x, std::nullopt, at::ArrayRef<double>(scale))
                                : at::upsample_bilinear2d(st.x, std::nullopt, false, at::ArrayRef<double>(scale));
    }
    st.h *= 2;
    st.w *= 2;
  } else {  // "sigmoid"
    if (st.x.defined()) st.x.sigmoid_();
    st.c = at::Tensor();
  }
}

template <typename T>
T item(const py::dict& d, const char* key) {
  return d[key].cast<T>();
}

Opt optional_tensor(const py::dict& d, const char* key) {
  if (!d.contains(key) || d[key].is_none()) return std::nullopt;
  return d[key].cast<at::Tensor>();
}

class GeneratorForward {
 public:
  // stages: one dict per stage of SparseGenerator._chain (SparseGenerator._executor writes them);
  // steps: (branch, i, j, act, pool, bn2) per run_stage call of a forward
  GeneratorForward(const py::list& stages, const std::vector<std::tuple<int64_t, int64_t, int64_t, bool, bool, int64_t>>& steps) {
    for (const auto& item_ : stages) {
      const py::dict d = item_.cast<py::dict>();
      Stage s;
      s.kind = item<std::string>(d, "kind");
      if (s.kind == "conv") {
        ConvStage& c = s.conv;
        c.values = item<at::Tensor>(d, "values");
        c.row_ptr = item<at::Tensor>(d, "row_ptr");
        c.col_idx = item<at::Tensor>(d, "col_idx");
        c.live_out = item<at::Tensor>(d, "live_out");
        c.live_in = item<at::Tensor>(d, "live_in");
        c.dense_pos = item<at::Tensor>(d, "dense_pos");
        c.bias = optional_tensor(d, "bias");
        c.bias_mask = optional_tensor(d, "bias_mask");
        c.fold_weight = optional_tensor(d, "fold_weight");
        c.fold_in = optional_tensor(d, "fold_in");
        c.fold_mask = optional_tensor(d, "fold_mask");
        c.kernel = item<std::vector<int64_t>>(d, "kernel");
        c.upsample = item<int64_t>(d, "upsample");
        c.n_in = item<int64_t>(d, "n_in");
        c.n_out = item<int64_t>(d, "n_out");
        c.select_in = item<bool>(d, "select_in");
        c.sparse = item<std::string>(d, "mode") == "sparse";
      } else if (s.kind == "bn") {
        BatchNormStage& b = s.bn;
        b.live = item<at::Tensor>(d, "live");
        b.weight = item<at::Tensor>(d, "weight");
        b.bias = item<at::Tensor>(d, "bias");
        b.weight_mask = item<at::Tensor>(d, "weight_mask");
        b.bias_mask = item<at::Tensor>(d, "bias_mask");
        b.zero_beta = optional_tensor(d, "zero_beta");
        b.zero_beta_live = optional_tensor(d, "zero_beta_live");
        b.eps = item<double>(d, "eps");
        b.const_zero = item<bool>(d, "const_zero");
        b.betas_pruned = item<bool>(d, "betas_pruned");
        b.live_gammas_kept = item<bool>(d, "live_gammas_kept");
      } else {
        TORCH_CHECK(s.kind == "elementwise", "GeneratorForward: unknown stage kind ", s.kind);
        s.el.op = item<std::string>(d, "op");
        s.el.arg = d.contains("arg") && !d["arg"].is_none() ? item<std::string>(d, "arg") : std::string();
      }
      stages_.push_back(std::move(s));
    }
    for (const auto& [branch, i, j, act, pool, bn2] : steps) steps_.push_back(Step{branch, i, j, act, pool, bn2});
  }

  at::Tensor run(const at::Tensor& z) const {
    TORCH_CHECK(!at::GradMode::is_enabled(), "GeneratorForward: runs without autograd only");
    // below autograd: no autograd kernel of our ops (nor of ATen's) is entered, as without gradients
    // they would only pass the call on
    at::AutoDispatchBelowADInplaceOrView guard;
    State st{z, at::Tensor(), at::Tensor(), z.size(0), z.size(2), z.size(3)};
    for (const Step& step : steps_) {
      const Stage& s = stages_[step.i];
      switch (step.branch) {
        case kPoolConv:
          conv_forward(s.conv, st, true, true);
          break;
        case kStatsConv:
          conv_forward(s.conv, st, true, false);
          break;
        case kHead:
          head(stages_[step.j].conv, s.bn, st);
          break;
        case kPrologue:
          prologue(stages_[step.j].conv, s.bn, step.bn2 >= 0 ? &stages_[step.bn2].bn : nullptr, st,
                   step.act ? kLeakySlope : 1.0, step.pool);
          break;
        case kBatchNormOp:
          batch_norm_leaky_relu(s.bn, st, step.act ? kLeakySlope : 1.0);
          break;
        case kBatchNormFromStats:
          batch_norm_from_stats(s.bn, st);
          break;
        default:
          if (s.kind == "conv")
            conv_forward(s.conv, st, false, false);
          else if (s.kind == "bn")
            batch_norm_forward(s.bn, st);
          else
            elementwise_forward(s.el, st);
      }
    }
    return st.x;
  }

 private:
  std::vector<Stage> stages_;
  std::vector<Step> steps_;
};

}  // namespace

void bind_generator_forward(py::module_& m) {
  py::class_<GeneratorForward>(m, "GeneratorForward")
      .def(py::init<const py::list&, const std::vector<std::tuple<int64_t, int64_t, int64_t, bool, bool, int64_t>>&>())
      .def("run", &GeneratorForward::run);
}

}  // namespace oes_fast
