// See moe_router.h.
#include "reference/moe_router.h"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <limits>
#include <numeric>

#include "common/error.h"
#include "common/math/random.h"

namespace paritron::ref {

namespace {

// Megatron's sinkhorn loops without a cap; with a dominant expert and few
// tokens it takes 1e5..1e6 iterations to converge. The reference follows it
// up to a work budget of ~2e10 multiply-adds (a minute or so), at least 1e7
// iterations, then stops with an error rather than hanging.
constexpr double kSinkhornWorkBudget = 2e10;
constexpr int64_t kSinkhornMinIterations = 10000000;

// torch's type promotion between the floating dtypes Paritron emulates.
int precision_rank(DType d) {
  switch (d) {
    case DType::F64: return 3;
    case DType::F32: return 2;
    default: return 1;
  }
}
DType promote(DType a, DType b) {
  if (a == b) return a;
  if (precision_rank(a) == 1 && precision_rank(b) == 1) return DType::F32;  // bf16 with fp16
  return precision_rank(a) >= precision_rank(b) ? a : b;
}

// The dtypes of the router's tensors (see the header, "Precision"). The truth
// (activation dtype F64) rounds nothing.
struct RouterDtypes {
  DType act;      // A: activations and parameters
  DType router;   // R: logits (moe_router_dtype, newer)
  DType routing;  // L: logits after jitter, scores
  DType fp32;     // where Megatron forces float32
};

RouterDtypes router_dtypes(const TransformerConfig& cfg, const Precision& p) {
  RouterDtypes d{p.dtype, p.dtype, p.dtype, DType::F32};
  if (p.dtype == DType::F64) {
    // Megatron's softmax(dtype=float32) rounds even in a float64 model.
    d.fp32 = p.forced_fp32 ? DType::F32 : DType::F64;
    return d;
  }
  if (cfg.moe_router_dtype == "fp32") d.router = DType::F32;
  if (cfg.moe_router_dtype == "fp64") d.router = DType::F64;
  // 0.5.0's jitter multiplier is an fp32 tensor: the product promotes.
  d.routing = cfg.moe_input_jitter_eps ? promote(d.router, DType::F32) : d.router;
  return d;
}

enum class Mode {
  kTopkThenSoftmax,  // 0.5.0 aux_loss / none: top-k of the logits, softmax over the k
  kSoftmaxThenTopk,  // moe_router_pre_softmax
  kSigmoid,          // moe_router_score_function = "sigmoid"
  kSinkhorn          // moe_router_load_balancing_type = "sinkhorn" (ignores the newer score options)
};

Mode router_mode(const TransformerConfig& cfg) {
  if (cfg.moe_router_load_balancing_type == "sinkhorn") return Mode::kSinkhorn;
  if (cfg.moe_router_score_function == "sigmoid") return Mode::kSigmoid;
  if (cfg.moe_router_pre_softmax) return Mode::kSoftmaxThenTopk;
  return Mode::kTopkThenSoftmax;
}

struct Dims {
  int64_t tokens, experts, topk, hidden;
};

Dims check_router_inputs(const TransformerConfig& cfg, const Mat& x) {
  if (!cfg.num_moe_experts || *cfg.num_moe_experts < 1) {
    throw Error("moe_router: num_moe_experts must be set to a positive number of experts");
  }
  const int64_t experts = *cfg.num_moe_experts;
  const int64_t k = cfg.moe_router_topk;
  if (k < 1 || k > experts) {
    throw Error(fmt::format("moe_router: moe_router_topk ({}) must be in [1, num_moe_experts = {}]", k, experts));
  }
  const std::string& type = cfg.moe_router_load_balancing_type;
  if (type != "aux_loss" && type != "sinkhorn" && type != "none") {
    throw Error(fmt::format("moe_router: unsupported moe_router_load_balancing_type '{}'", type));
  }
  if (cfg.moe_router_score_function != "softmax" && cfg.moe_router_score_function != "sigmoid") {
    throw Error(fmt::format("moe_router: unsupported moe_router_score_function '{}'", cfg.moe_router_score_function));
  }
  if (x.cols() != cfg.hidden_size) {
    throw Error(fmt::format("moe_router: hidden_states has {} features but hidden_size is {}", x.cols(),
                            cfg.hidden_size));
  }
  if (x.rows() == 0) throw Error("moe_router: hidden_states has no tokens");
  return {x.rows(), experts, k, cfg.hidden_size};
}

// Softmax of a row in double (max-shifted), each probability rounded once to dtype.
void softmax_row(const double* in, double* out, int64_t n, DType dtype) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, in[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(in[i] - mx);
  for (int64_t i = 0; i < n; ++i) out[i] = round_to(std::exp(in[i] - mx) / sum, dtype);
}

double logsumexp_row(const double* in, int64_t n) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, in[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(in[i] - mx);
  return mx + std::log(sum);
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// All n indices of a row in torch.topk order (descending, ties by index, NaN first).
std::vector<int64_t> sorted_order(const double* row, int64_t n) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [row](int64_t a, int64_t b) {
    const bool na = std::isnan(row[a]), nb = std::isnan(row[b]);
    if (na != nb) return na;
    return !na && row[a] > row[b];
  });
  return order;
}

Mat softmax_rows(const Mat& logits) {
  Mat out(logits.rows(), logits.cols());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) softmax_row(&logits(t, 0), &out(t, 0), logits.cols(), DType::F64);
  return out;
}

}  // namespace

std::vector<int64_t> topk_indices(const double* row, int64_t n, int64_t k) {
  std::vector<int64_t> order = sorted_order(row, n);
  order.resize(static_cast<size_t>(std::min(k, n)));
  return order;
}

Mat sinkhorn_fp32(const Mat& cost, double tol, int64_t max_iterations_wanted) {
  const Eigen::Index tokens = cost.rows(), experts = cost.cols();
  if (tokens == 0 || experts == 0) throw Error("sinkhorn: empty cost matrix");
  // cost = torch.exp(logits.to(float32)): fp32 input, exp rounded to fp32.
  std::vector<float> c(static_cast<size_t>(tokens * experts));
  for (Eigen::Index i = 0; i < cost.size(); ++i) {
    c[static_cast<size_t>(i)] = static_cast<float>(std::exp(static_cast<double>(static_cast<float>(cost.data()[i]))));
  }
  auto at = [&](Eigen::Index t, Eigen::Index e) { return c[static_cast<size_t>(t * experts + e)]; };
  std::vector<float> d0(static_cast<size_t>(tokens), 1.0f), d1(static_cast<size_t>(experts), 1.0f), d1_old = d1;
  const float eps = 1e-8f;
  // (1 / n) * 1 / tensor: torch evaluates python_scalar / tensor as tensor.reciprocal() * scalar.
  const float inv_tokens = static_cast<float>(1.0 / static_cast<double>(tokens));
  const float inv_experts = static_cast<float>(1.0 / static_cast<double>(experts));
  double error = 1e9;  // a Python float until the first iteration replaces it with an fp32 tensor
  bool first = true;
  int64_t iterations = 0;
  const int64_t max_iterations =
      max_iterations_wanted > 0
          ? max_iterations_wanted
          : std::max<int64_t>(kSinkhornMinIterations,
                              static_cast<int64_t>(kSinkhornWorkBudget / static_cast<double>(2 * tokens * experts)));
  while (first ? error > tol : static_cast<float>(error) > static_cast<float>(tol)) {
    first = false;
    if (++iterations > max_iterations) {
      throw Error(fmt::format("sinkhorn: no convergence to tol {} after {} iterations (Megatron iterates without a cap; "
                              "this happens with a dominant expert and few tokens)",
                              tol, max_iterations));
    }
    for (Eigen::Index t = 0; t < tokens; ++t) {
      double sum = 0;  // torch.sum(d1 * cost, 1): fp32 products, summed (here in double) and rounded once
      for (Eigen::Index e = 0; e < experts; ++e) sum += static_cast<double>(d1[static_cast<size_t>(e)] * at(t, e));
      const float denom = static_cast<float>(sum) + eps;
      d0[static_cast<size_t>(t)] = (1.0f / denom) * inv_tokens;
    }
    for (Eigen::Index e = 0; e < experts; ++e) {
      double sum = 0;
      for (Eigen::Index t = 0; t < tokens; ++t) sum += static_cast<double>(d0[static_cast<size_t>(t)] * at(t, e));
      const float denom = static_cast<float>(sum) + eps;
      d1[static_cast<size_t>(e)] = (1.0f / denom) * inv_experts;
    }
    double abs_sum = 0;
    for (Eigen::Index e = 0; e < experts; ++e) {
      abs_sum += static_cast<double>(std::fabs(d1_old[static_cast<size_t>(e)] - d1[static_cast<size_t>(e)]));
    }
    error = static_cast<float>(abs_sum / static_cast<double>(experts));
    d1_old = d1;
  }
  Mat out(tokens, experts);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    for (Eigen::Index e = 0; e < experts; ++e) {
      out(t, e) = static_cast<double>((d1[static_cast<size_t>(e)] * at(t, e)) * d0[static_cast<size_t>(t)]);
    }
  }
  return out;
}

RouterForward moe_router_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p,
                                 const RunContext& ctx) {
  const Dims n = check_router_inputs(cfg, x);
  const int64_t T = n.tokens, E = n.experts, k = n.topk;
  const Mat& weight = w.at("weight", E, n.hidden);
  const RouterDtypes d = router_dtypes(cfg, p);
  const Mode mode = router_mode(cfg);
  RouterForward f;

  // Gating: F.linear(x, weight) (0.5.0) / router_gating_linear in moe_router_dtype (newer;
  // from 0.15 with the optional bias added in the GEMM: addmm, one rounding).
  if (w.has("bias")) {
    f.logits = matmul(x, weight.transpose(), d.router == DType::F64 ? DType::F64 : DType::F32);
    f.logits.rowwise() += w.row("bias", E);
    round_inplace(f.logits, d.router);
  } else {
    f.logits = matmul(x, weight.transpose(), d.router);
  }

  // z-loss on the logits before jitter, in the logits dtype.
  if (cfg.moe_z_loss_coeff) {
    double acc = 0;
    for (int64_t t = 0; t < T; ++t) {
      const double lse = round_to(logsumexp_row(&f.logits(t, 0), E), d.router);
      acc += round_to(lse * lse, d.router);
    }
    f.z_loss = round_to(round_to(acc / static_cast<double>(T), d.router) * *cfg.moe_z_loss_coeff, d.router);
  }

  // Jitter (0.5.0: on the logits, also in eval): Uniform(low, high).rsample in fp32.
  f.routing_logits = f.logits;
  if (cfg.moe_input_jitter_eps) {
    const double eps = *cfg.moe_input_jitter_eps;
    const float low = static_cast<float>(1.0 - eps), high = static_cast<float>(1.0 + eps);
    const float range = high - low;
    const RngKey key = ctx.key("moe_jitter");
    f.jitter.resize(T, E);
    for (Eigen::Index i = 0; i < f.jitter.size(); ++i) {
      const float r = math::uniform_float(key, static_cast<uint64_t>(i));
      const float scaled = r * range;
      f.jitter.data()[i] = static_cast<double>(low + scaled);
    }
    f.routing_logits = rounded(f.logits.cwiseProduct(f.jitter), d.routing);
  }
  const Mat& z = f.routing_logits;

  // `if scaling_factor:` in Python: None and 0 both mean no scaling.
  const bool scaled = cfg.moe_router_topk_scaling_factor && *cfg.moe_router_topk_scaling_factor != 0.0;
  const double scale = scaled ? *cfg.moe_router_topk_scaling_factor : 1.0;
  auto finish_score = [&](double v) { return round_to(scaled ? round_to(v * scale, d.fp32) : v, d.routing); };

  RowVec expert_bias = RowVec::Zero(E);
  if (mode == Mode::kSigmoid && cfg.moe_router_enable_expert_bias && w.has("expert_bias")) {
    expert_bias = w.row("expert_bias", E);
  }

  f.scores.resize(T, k);
  f.indices.resize(T, k);
  f.selection_values.resize(T, E);
  f.topk_margin.resize(T, 1);
  f.order_margin.resize(T, 1);
  if (mode == Mode::kTopkThenSoftmax) {
    f.selection_values = z;
    f.topk_softmax.resize(T, k);
  } else if (mode == Mode::kSoftmaxThenTopk) {
    f.activation.resize(T, E);
    for (int64_t t = 0; t < T; ++t) softmax_row(&z(t, 0), &f.activation(t, 0), E, d.fp32);
    f.selection_values = f.activation;
  } else if (mode == Mode::kSigmoid) {
    // torch.sigmoid(logits.float()); the expert bias (an fp32 buffer) only steers the selection.
    f.activation = z.unaryExpr([&](double v) { return round_to(sigmoid(v), d.fp32); });
    f.selection_values = f.activation;
    if (cfg.moe_router_enable_expert_bias) {
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t e = 0; e < E; ++e) {
          f.selection_values(t, e) = round_to(f.activation(t, e) + expert_bias(e), d.fp32);
        }
      }
    }
  } else {  // sinkhorn: sigmoid (k = 1, in the logits dtype) or the fp32 softmax cast back (k > 1)
    f.activation.resize(T, E);
    if (k == 1) {
      f.activation = z.unaryExpr([&](double v) { return round_to(sigmoid(v), d.routing); });
    } else {
      for (int64_t t = 0; t < T; ++t) softmax_row(&z(t, 0), &f.activation(t, 0), E, d.fp32);
      round_inplace(f.activation, d.routing);
    }
    f.selection_values = ctx.training ? sinkhorn_fp32(z) : f.activation;
  }

  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<int64_t> order = sorted_order(&f.selection_values(t, 0), E);
    auto value = [&](int64_t j) { return f.selection_values(t, order[static_cast<size_t>(j)]); };
    f.topk_margin(t, 0) = k < E ? value(k - 1) - value(k) : inf;
    double order_gap = inf;
    for (int64_t j = 0; j + 1 < k; ++j) order_gap = std::min(order_gap, value(j) - value(j + 1));
    f.order_margin(t, 0) = order_gap;
    for (int64_t j = 0; j < k; ++j) f.indices(t, j) = order[static_cast<size_t>(j)];

    switch (mode) {
      case Mode::kTopkThenSoftmax: {
        // scores = softmax(top_logits, dtype=float32).type_as(logits)
        std::vector<double> top(static_cast<size_t>(k)), s(static_cast<size_t>(k));
        for (int64_t j = 0; j < k; ++j) top[static_cast<size_t>(j)] = z(t, f.indices(t, j));
        softmax_row(top.data(), s.data(), k, d.fp32);
        for (int64_t j = 0; j < k; ++j) {
          f.topk_softmax(t, j) = s[static_cast<size_t>(j)];
          f.scores(t, j) = finish_score(s[static_cast<size_t>(j)]);
        }
        break;
      }
      case Mode::kSoftmaxThenTopk:
        for (int64_t j = 0; j < k; ++j) f.scores(t, j) = finish_score(f.activation(t, f.indices(t, j)));
        break;
      case Mode::kSigmoid: {
        double sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += f.activation(t, f.indices(t, j));
        const double denom = round_to(round_to(sum, d.fp32) + 1e-20, d.fp32);
        for (int64_t j = 0; j < k; ++j) {
          const double q = f.activation(t, f.indices(t, j));
          f.scores(t, j) = finish_score(k > 1 ? round_to(q / denom, d.fp32) : q);
        }
        break;
      }
      case Mode::kSinkhorn:
        for (int64_t j = 0; j < k; ++j) f.scores(t, j) = f.activation(t, f.indices(t, j));
        break;
    }
  }

  // router_probs and the aux loss.
  const bool aux = cfg.moe_router_load_balancing_type == "aux_loss";
  if (aux) {
    if (mode == Mode::kSigmoid) {
      // compute_routing_scores_for_aux_loss: sigmoid normalised over all E (newer).
      f.aux_probs.resize(T, E);
      for (int64_t t = 0; t < T; ++t) {
        const double denom = round_to(round_to(f.activation.row(t).sum(), d.fp32) + 1e-20, d.fp32);
        for (int64_t e = 0; e < E; ++e) f.aux_probs(t, e) = round_to(f.activation(t, e) / denom, d.fp32);
      }
    } else if (mode == Mode::kSoftmaxThenTopk) {
      f.aux_probs = f.activation;
    } else {
      f.aux_probs.resize(T, E);
      for (int64_t t = 0; t < T; ++t) softmax_row(&z(t, 0), &f.aux_probs(t, 0), E, d.fp32);
    }
    f.probs = f.aux_probs;
    // mask: the top-k of the aux probabilities, before expert bias and dropping. For
    // softmax and unbiased sigmoid this is the routing's own top-k set (0.5.0's
    // one_hot(indices).sum(1)).
    f.aux_counts.assign(static_cast<size_t>(E), 0);
    const bool own_mask = !(mode == Mode::kSigmoid && cfg.moe_router_enable_expert_bias);
    for (int64_t t = 0; t < T; ++t) {
      if (own_mask) {
        for (int64_t j = 0; j < k; ++j) ++f.aux_counts[static_cast<size_t>(f.indices(t, j))];
      } else {
        for (int64_t e : topk_indices(&f.aux_probs(t, 0), E, k)) ++f.aux_counts[static_cast<size_t>(e)];
      }
    }
    // switch_load_balancing_loss_func (0.5.0 order of operations, fp32).
    const double coeff = cfg.moe_aux_loss_coeff;
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      const double gates_mean = round_to(f.aux_probs.col(e).sum() / static_cast<double>(T), d.fp32);
      const double selection_mean = round_to(
          round_to(static_cast<double>(f.aux_counts[static_cast<size_t>(e)]) / static_cast<double>(T), d.fp32) /
              static_cast<double>(k),
          d.fp32);
      sum += round_to(gates_mean * selection_mean, d.fp32);
    }
    f.aux_loss = round_to(round_to(round_to(sum, d.fp32) * static_cast<double>(E), d.fp32) * coeff, d.fp32);
  } else if (mode == Mode::kSoftmaxThenTopk || (mode == Mode::kSinkhorn && k > 1)) {
    f.probs = f.activation;
  }

  // Routing map, then capacity (apply_router_token_dropping, newer).
  Mat routing = Mat::Zero(T, E);  // routing_probs: the scores scattered to [T, E]
  Mat map = Mat::Zero(T, E);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      routing(t, f.indices(t, j)) = f.scores(t, j);
      map(t, f.indices(t, j)) = 1.0;
    }
  }
  f.kept = Mat::Ones(T, k);
  f.routing_map = map;
  f.capacity_margin = Mat::Constant(1, E, std::numeric_limits<double>::infinity());
  if (cfg.moe_expert_capacity_factor) {
    const double capacity_d =
        std::ceil(static_cast<double>(T * k) / static_cast<double>(E) * *cfg.moe_expert_capacity_factor);
    Mat capacity_mask = Mat::Ones(T, E);
    if (capacity_d <= static_cast<double>(T)) {
      const int64_t capacity = static_cast<int64_t>(capacity_d);
      capacity_mask.setZero();
      const bool by_probs = cfg.moe_token_drop_policy == "probs";
      for (int64_t e = 0; e < E; ++e) {
        std::vector<double> column(static_cast<size_t>(T));
        for (int64_t t = 0; t < T; ++t) column[static_cast<size_t>(t)] = by_probs ? routing(t, e) : map(t, e);
        const std::vector<int64_t> chosen = topk_indices(column.data(), T, capacity);
        for (int64_t t : chosen) capacity_mask(t, e) = 1.0;
        if (by_probs && capacity < T) {
          std::vector<double> sorted = column;
          std::sort(sorted.begin(), sorted.end(), std::greater<>());
          const double last_kept = sorted[static_cast<size_t>(capacity - 1)];
          if (last_kept > 0) f.capacity_margin(0, e) = last_kept - sorted[static_cast<size_t>(capacity)];
        }
      }
    }
    f.routing_map = cfg.moe_pad_expert_input_to_capacity ? capacity_mask : map.cwiseProduct(capacity_mask);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        if (capacity_mask(t, f.indices(t, j)) == 0.0) {
          f.kept(t, j) = 0.0;
          f.scores(t, j) = 0.0;
        }
      }
    }
  }
  f.tokens_per_expert.assign(static_cast<size_t>(E), 0);
  for (int64_t e = 0; e < E; ++e) {
    f.tokens_per_expert[static_cast<size_t>(e)] = static_cast<int64_t>(f.routing_map.col(e).sum());
  }
  return f;
}

Mat moe_router_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const RouterForward& fwd,
                        const Mat& d_scores, const Sink& grads, const Precision& p) {
  const Dims n = check_router_inputs(cfg, x);
  const int64_t T = n.tokens, E = n.experts, k = n.topk;
  const Mat& weight = w.at("weight", E, n.hidden);
  if (d_scores.rows() != T || d_scores.cols() != k) {
    throw Error(fmt::format("moe_router_backward: d_scores is [{}, {}], expected [{}, {}]", d_scores.rows(),
                            d_scores.cols(), T, k));
  }
  if (fwd.logits.rows() != T || fwd.logits.cols() != E || fwd.indices.rows() != T || fwd.indices.cols() != k) {
    throw Error("moe_router_backward: the forward record does not match hidden_states and the config");
  }
  const RouterDtypes d = router_dtypes(cfg, p);
  const Mode mode = router_mode(cfg);
  const bool scaled = cfg.moe_router_topk_scaling_factor && *cfg.moe_router_topk_scaling_factor != 0.0;
  const double scale = scaled ? *cfg.moe_router_topk_scaling_factor : 1.0;

  // Gradient reaching the scores; dropped pairs were multiplied by a constant 0.
  const Mat g = rounded(d_scores, d.routing).cwiseProduct(fwd.kept);
  Mat dz = Mat::Zero(T, E);  // gradient of the routing logits (after jitter)

  // Softmax backward of a full row p (dtype fp32) with upstream dp, cast to L and added to dz.
  auto add_softmax_backward = [&](int64_t t, const Mat& probs, const std::vector<double>& dp) {
    double dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += dp[static_cast<size_t>(e)] * probs(t, e);
    for (int64_t e = 0; e < E; ++e) {
      dz(t, e) += round_to(round_to(probs(t, e) * (dp[static_cast<size_t>(e)] - dot), d.fp32), d.routing);
    }
  };

  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> gs(static_cast<size_t>(k));  // gradient of the unscaled fp32 scores
    for (int64_t j = 0; j < k; ++j) gs[static_cast<size_t>(j)] = round_to(g(t, j) * scale, d.fp32);
    switch (mode) {
      case Mode::kTopkThenSoftmax: {
        double dot = 0;
        for (int64_t j = 0; j < k; ++j) dot += gs[static_cast<size_t>(j)] * fwd.topk_softmax(t, j);
        for (int64_t j = 0; j < k; ++j) {
          const double s = fwd.topk_softmax(t, j);
          dz(t, fwd.indices(t, j)) += round_to(round_to(s * (gs[static_cast<size_t>(j)] - dot), d.fp32), d.routing);
        }
        break;
      }
      case Mode::kSoftmaxThenTopk: {
        std::vector<double> dp(static_cast<size_t>(E), 0.0);
        for (int64_t j = 0; j < k; ++j) dp[static_cast<size_t>(fwd.indices(t, j))] = gs[static_cast<size_t>(j)];
        add_softmax_backward(t, fwd.activation, dp);
        break;
      }
      case Mode::kSigmoid: {
        std::vector<double> dq(gs);
        if (k > 1) {
          double sum = 0, dot = 0;
          for (int64_t j = 0; j < k; ++j) {
            const double q = fwd.activation(t, fwd.indices(t, j));
            sum += q;
            dot += gs[static_cast<size_t>(j)] * q;
          }
          const double denom = sum + 1e-20;
          for (int64_t j = 0; j < k; ++j) {
            dq[static_cast<size_t>(j)] = gs[static_cast<size_t>(j)] / denom - dot / (denom * denom);
          }
        }
        for (int64_t j = 0; j < k; ++j) {
          const double s = fwd.activation(t, fwd.indices(t, j));
          dz(t, fwd.indices(t, j)) +=
              round_to(round_to(dq[static_cast<size_t>(j)] * s * (1.0 - s), d.fp32), d.routing);
        }
        break;
      }
      case Mode::kSinkhorn: {
        if (k == 1) {
          const double s = fwd.activation(t, fwd.indices(t, 0));
          dz(t, fwd.indices(t, 0)) += round_to(g(t, 0) * s * (1.0 - s), d.routing);
        } else {
          std::vector<double> dp(static_cast<size_t>(E), 0.0);
          for (int64_t j = 0; j < k; ++j) dp[static_cast<size_t>(fwd.indices(t, j))] = g(t, j);
          add_softmax_backward(t, fwd.activation, dp);
        }
        break;
      }
    }
  }

  // aux loss: d aux / d P[t, e] = E coeff count_e / (k T^2), the same for every token.
  if (cfg.moe_router_load_balancing_type == "aux_loss" && fwd.aux_probs.size() > 0) {
    std::vector<double> ge(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      ge[static_cast<size_t>(e)] = static_cast<double>(E) * cfg.moe_aux_loss_coeff *
                                   static_cast<double>(fwd.aux_counts[static_cast<size_t>(e)]) /
                                   (static_cast<double>(k) * static_cast<double>(T) * static_cast<double>(T));
    }
    for (int64_t t = 0; t < T; ++t) {
      if (mode == Mode::kSigmoid) {
        double sum = 0, dot = 0;
        for (int64_t e = 0; e < E; ++e) {
          sum += fwd.activation(t, e);
          dot += ge[static_cast<size_t>(e)] * fwd.activation(t, e);
        }
        const double denom = sum + 1e-20;
        for (int64_t e = 0; e < E; ++e) {
          const double s = fwd.activation(t, e);
          const double ds = ge[static_cast<size_t>(e)] / denom - dot / (denom * denom);
          dz(t, e) += round_to(round_to(ds * s * (1.0 - s), d.fp32), d.routing);
        }
      } else {
        add_softmax_backward(t, fwd.aux_probs, ge);
      }
    }
  }
  round_inplace(dz, d.routing);

  // Through the jitter (u is a constant) back to the logits, then the z-loss.
  Mat d_logits = fwd.jitter.size() > 0 ? rounded(dz.cwiseProduct(fwd.jitter), d.router) : dz;
  if (cfg.moe_z_loss_coeff) {
    const Mat sm = softmax_rows(fwd.logits);
    for (int64_t t = 0; t < T; ++t) {
      const double lse = logsumexp_row(&fwd.logits(t, 0), E);
      const double c = *cfg.moe_z_loss_coeff * 2.0 * lse / static_cast<double>(T);
      for (int64_t e = 0; e < E; ++e) d_logits(t, e) += round_to(c * sm(t, e), d.router);
    }
    round_inplace(d_logits, d.router);
  }

  // Gating GEMM backward (in the router dtype, cast back to the input / parameter dtype).
  grads.add("weight", rounded(matmul(d_logits.transpose(), x, d.router), d.act));
  if (w.has("bias")) grads.add("bias", rounded(d_logits.colwise().sum(), d.act));
  return rounded(matmul(d_logits, weight, d.router), d.act);
}

}  // namespace paritron::ref
