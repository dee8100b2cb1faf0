// See moe.h. The router's per-token math runs on the host (small [T, E]
// arrays, with the reference's dtype roundings; the single-source formulas
// are optimized/math/router.h); the gating GEMMs, the token movement
// (gather / all-to-all / scatter-add) and the experts run on the backend.
//
// Dispatch (all-to-all form, spec §9.6 "newer"): the rank's (token, expert)
// pairs that an expert processes are listed expert-major (global expert
// ascending, tokens ascending within an expert: reference moe_dispatch's
// order), which is also EP-member-major because member r owns the contiguous
// experts [r E/ep, (r+1) E/ep). Counts per expert are exchanged with
// all_gather_ints over the EP group, rows with all_to_all_v; the receiver
// regroups its rows by local expert (source member order within an expert),
// runs each expert's MLP, and the inverse path brings the rows back. The
// combine scatters slot by slot (slot order per token, as the reference's
// scatter_add), so the numbers equal the reference run on the rank's tokens.
#include "optimized/model/moe.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/error.h"
#include "common/math/float_format.h"
#include "common/math/random.h"
#include "common/module_params.h"
#include "optimized/faults.h"
#include "optimized/math/router.h"

namespace paritron::opt {

using faults::Fault;

namespace {

// The experts' linears never run in fp8 (ModelContext::fp8_linears): set for
// the scope of the expert loop, restored after.
class ExpertsWithoutFp8 {
 public:
  explicit ExpertsWithoutFp8(ModelContext& m) : m_(m), saved_(m.fp8_linears) { m.fp8_linears = false; }
  ~ExpertsWithoutFp8() { m_.fp8_linears = saved_; }
  ExpertsWithoutFp8(const ExpertsWithoutFp8&) = delete;
  ExpertsWithoutFp8& operator=(const ExpertsWithoutFp8&) = delete;

 private:
  ModelContext& m_;
  bool saved_;
};

double rnd(double x, DType d) {
  if (d == DType::F64) return x;
  return math::round_to(x, *float_format(d));
}

int precision_rank(DType d) {
  switch (d) {
    case DType::F64:
      return 3;
    case DType::F32:
      return 2;
    default:
      return 1;
  }
}
DType promote(DType a, DType b) {
  if (a == b) return a;
  if (precision_rank(a) == 1 && precision_rank(b) == 1) return DType::F32;
  return precision_rank(a) >= precision_rank(b) ? a : b;
}

enum class Mode {
  kTopkThenSoftmax,  // 0.5.0 aux_loss / none: top-k of the logits, softmax over the k
  kSoftmaxThenTopk,  // moe_router_pre_softmax
  kSinkhorn          // moe_router_load_balancing_type = "sinkhorn"
};

// Megatron's sinkhorn has no iteration cap; the reference stops after a work
// budget (reference/moe_router.cpp), and so does this.
constexpr double kSinkhornWorkBudget = 2e10;
constexpr int64_t kSinkhornMinIterations = 10000000;

// Everything the optimized MoE does not do throws here, naming the field.
// layer: a MoELayer (experts and their dispatch), else the router alone.
void check_supported(const ModelContext& m, int64_t experts, bool layer) {
  const TransformerConfig& c = m.cfg;
  if (experts < 1) throw Error("MoE: num_moe_experts must be a positive number of experts");
  if (c.moe_router_topk < 1 || c.moe_router_topk > experts) {
    throw Error(
        fmt::format("MoE: moe_router_topk ({}) must be in [1, num_moe_experts = {}]", c.moe_router_topk, experts));
  }
  // 0.5.0 TransformerConfig.__post_init__: expert parallelism with tensor
  // parallelism needs sequence parallelism (also a ParallelConfig rule).
  if (m.tp() > 1 && m.ps.ep.size() > 1 && !m.sequence_parallel()) {
    throw Error("MoE: expert_model_parallel_size > 1 with tensor_model_parallel_size > 1 needs sequence_parallel");
  }
  if (c.moe_router_load_balancing_type != "aux_loss" && c.moe_router_load_balancing_type != "none" &&
      c.moe_router_load_balancing_type != "sinkhorn") {
    throw Error(fmt::format(
        "MoE: moe_router_load_balancing_type = '{}' is not supported by the optimized side (aux_loss, sinkhorn, none)",
        c.moe_router_load_balancing_type));
  }
  // (sinkhorn ignores the newer score options, as the reference does.)
  if (c.moe_router_load_balancing_type != "sinkhorn" && c.moe_router_score_function != "softmax") {
    throw Error(fmt::format("MoE: moe_router_score_function = '{}' is not supported by the optimized side (softmax)",
                            c.moe_router_score_function));
  }
  if (layer && c.moe_grouped_gemm) throw Error("MoE: moe_grouped_gemm (GroupedMLP) is not supported by the optimized side yet");
  if (c.moe_token_dropping) throw Error("MoE: moe_token_dropping is not supported (0.5.0 is dropless)");
  if (c.moe_router_dtype && m.dtype != DType::F64) {  // (a float64 run computes everything in float64)
    const DType r = *c.moe_router_dtype == "fp64" ? DType::F64 : DType::F32;
    if (r != m.dtype) {
      throw Error(fmt::format("MoE: moe_router_dtype = '{}' with {} activations is not supported by the optimized side",
                              *c.moe_router_dtype, dtype_name(m.dtype)));
    }
  }
  if (c.moe_expert_capacity_factor && c.moe_token_drop_policy != "probs" && c.moe_token_drop_policy != "position") {
    throw Error(fmt::format("MoE: unknown moe_token_drop_policy '{}'", c.moe_token_drop_policy));
  }
  const int64_t ep = layer ? m.ps.ep.size() : 1;
  if (experts % ep != 0) {
    throw Error(
        fmt::format("MoE: num_moe_experts ({}) must be divisible by expert_model_parallel_size ({})", experts, ep));
  }
}

std::string expert_prefix(const std::string& prefix, int64_t e) {
  return prefix + "experts.local_experts." + std::to_string(e) + ".";
}

Tensor host_f64(const std::vector<double>& v, Shape shape) {
  return Tensor::from_values(DType::F64, std::move(shape), v);
}

std::vector<double> to_host(Backend& be, const DTensor& t) { return be.download(t).to_doubles(); }

}  // namespace

struct MoeSaved::State {
  int64_t T = 0, E = 0, k = 0, h = 0, ep = 1, e_loc = 0, first = 0;
  Mode mode = Mode::kTopkThenSoftmax;
  DType act = DType::F32, router = DType::F32, routing = DType::F32, fp32 = DType::F32;
  double scale = 1.0;
  bool scaled = false;
  DTensor x;  // [T, h]
  Shape x_shape;

  // Router (host, [T, E] / [T, k] row-major).
  std::vector<double> logits, jitter, z, topk_softmax, activation, aux_probs;
  std::vector<int64_t> aux_counts;
  std::vector<int64_t> indices;
  std::vector<double> scores;
  std::vector<uint8_t> kept;

  // Dispatch, source side: the rows this rank sends (expert-major).
  std::vector<int64_t> send_tokens, send_slots, send_expert;
  std::vector<int64_t> send_counts, recv_counts;  // per EP member
  // Receiver side: expert-major row i is received row regroup[i].
  std::vector<int64_t> regroup, ungroup;
  std::vector<int64_t> expert_rows;  // [e_loc]
  std::vector<int64_t> expert_pad;   // [e_loc] rows each expert's TP-sharded MLP runs with (see run_experts)
  std::vector<MlpSaved> mlp;         // [e_loc]
  DTensor y_back;                    // [N_send, h] expert outputs, send order
  bool has_bias = false;
  DTensor b2_all;  // [E, h] every expert's fc2 bias (has_bias)
  std::string prefix;
};

namespace {

// Rows of `rows` in the backend (gather), or `x` itself when the map is the identity.
DTensor gather(ModelContext& m, const DTensor& x, const std::vector<int64_t>& rows) {
  bool identity = static_cast<int64_t>(rows.size()) == x.rows();
  for (size_t i = 0; identity && i < rows.size(); ++i) identity = rows[i] == static_cast<int64_t>(i);
  if (identity) return x;
  DTensor out = m.be.empty(x.dtype(), {static_cast<int64_t>(rows.size()), x.cols()});
  if (!rows.empty()) m.be.gather_rows(x, rows, out);
  return out;
}

// The all-to-all over the EP group (identity for ep = 1).
DTensor exchange(ModelContext& m, const DTensor& in, const std::vector<int64_t>& send,
                 const std::vector<int64_t>& recv) {
  if (m.ps.ep.size() == 1) return in;
  const int64_t n = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  DTensor out = m.be.empty(in.dtype(), {n, in.cols()});
  m.comm.all_to_all_v(in, send, out, recv, m.ps.ep);
  return out;
}

// out[tokens[i]] += weights[i] * y[rows[i]], in the order given (per slot).
// Megatron multiplies (a tensor in the activation dtype: the product is
// rounded to it) and then scatter-adds; for 16-bit dtypes that is done in two
// passes here (the backend's fused multiply-add rounds once, which for F32 /
// F64 is the same number).
// F64: the backend's weights are floats, so a weight that is not an fp32
// value (sinkhorn's float64 sigmoid scores) goes in as hi + lo, two floats
// (2^-48 relative).
void weighted_scatter(ModelContext& m, const DTensor& g, const std::vector<int64_t>& tokens,
                      const std::vector<double>& weights, DTensor& out) {
  if (tokens.empty()) return;
  if (weights.empty()) {
    m.be.scatter_add_rows(g, tokens, {}, out);
    return;
  }
  std::vector<float> hi(weights.size()), lo(weights.size());
  bool need_lo = false;
  for (size_t i = 0; i < weights.size(); ++i) {
    hi[i] = static_cast<float>(weights[i]);
    lo[i] = static_cast<float>(weights[i] - static_cast<double>(hi[i]));
    need_lo = need_lo || lo[i] != 0.0f;
  }
  if (out.dtype() != DType::F32 && out.dtype() != DType::F64) {
    DTensor scaled = m.be.zeros(out.dtype(), {g.rows(), g.cols()});
    std::vector<int64_t> iota(static_cast<size_t>(g.rows()));
    std::iota(iota.begin(), iota.end(), int64_t{0});
    m.be.scatter_add_rows(g, iota, hi, scaled);
    m.be.scatter_add_rows(scaled, tokens, {}, out);
    return;
  }
  m.be.scatter_add_rows(g, tokens, hi, out);
  if (need_lo && out.dtype() == DType::F64) m.be.scatter_add_rows(g, tokens, lo, out);
}

void scatter_rows(ModelContext& m, const DTensor& y, const std::vector<int64_t>& rows,
                  const std::vector<int64_t>& tokens, const std::vector<double>& weights, DTensor& out) {
  if (rows.empty()) return;
  weighted_scatter(m, gather(m, y, rows), tokens, weights, out);
}

// The router forward on the host: fills the routing decision in s.
// router: the router's key prefix ("mlp.router.", a moe_router case: "");
// jitter_path: the RNG path of its jitter draws.
void router_forward(ModelContext& m, const std::string& router, const std::string& jitter_path, MoeSaved::State& s) {
  const TransformerConfig& cfg = m.cfg;
  const int64_t T = s.T, E = s.E, k = s.k;
  // logits = x W^T (+ b), in the router dtype (= the activation dtype).
  const Param& w = m.param(router + "weight");
  if (w.value.dim() != 2 || w.value.size(0) != E || w.value.size(1) != s.h) {
    throw Error(fmt::format("MoE: {}weight is {}, expected [{}, {}]", router, w.value.describe(), E, s.h));
  }
  DTensor lg = m.be.empty(s.router, {T, E});
  m.be.gemm(s.x, false, w.value, true, lg, 1.0f, 0.0f, m.param_or_null(router + "bias"));
  s.logits = to_host(m.be, lg);

  s.z = s.logits;
  if (cfg.moe_input_jitter_eps) {
    const double eps = *cfg.moe_input_jitter_eps;
    const float low = static_cast<float>(1.0 - eps), high = static_cast<float>(1.0 + eps);
    const float range = high - low;
    const math::RngKey key = m.key("moe_jitter", jitter_path);
    s.jitter.resize(static_cast<size_t>(T * E));
    for (size_t i = 0; i < s.jitter.size(); ++i) {
      const float r = math::uniform_float(key, static_cast<uint64_t>(i));
      const float scaled = r * range;
      s.jitter[i] = static_cast<double>(low + scaled);
      s.z[i] = rnd(s.logits[i] * s.jitter[i], s.routing);
    }
  }

  auto finish = [&](double v) { return rnd(s.scaled ? rnd(v * s.scale, s.fp32) : v, s.routing); };
  s.indices.assign(static_cast<size_t>(T * k), 0);
  s.scores.assign(static_cast<size_t>(T * k), 0.0);
  s.kept.assign(static_cast<size_t>(T * k), 1);
  std::vector<double> buf(static_cast<size_t>(std::max(E, k)));
  if (s.mode == Mode::kSinkhorn) {
    // act: sigmoid (k = 1, in the logits dtype) or the fp32 softmax cast back (k > 1).
    s.activation.resize(static_cast<size_t>(T * E));
    for (int64_t t = 0; t < T; ++t) {
      const double* zr = &s.z[static_cast<size_t>(t * E)];
      double* a = &s.activation[static_cast<size_t>(t * E)];
      if (k == 1) {
        for (int64_t e = 0; e < E; ++e) a[e] = rnd(1.0 / (1.0 + std::exp(-zr[e])), s.routing);
      } else {
        math::softmax_row(zr, a, E);
        for (int64_t e = 0; e < E; ++e) a[e] = rnd(rnd(a[e], s.fp32), s.routing);
      }
    }
    // Training: select on sinkhorn(logits.float()) (no grad); eval: on act.
    std::vector<double> sel = s.activation;
    if (m.training) {
      std::vector<float> c(static_cast<size_t>(T * E)), out(static_cast<size_t>(T * E));
      for (size_t i = 0; i < c.size(); ++i) {
        c[i] = static_cast<float>(std::exp(static_cast<double>(static_cast<float>(s.z[i]))));
      }
      std::vector<float> d0(static_cast<size_t>(T)), d1(static_cast<size_t>(E)), d1_old(static_cast<size_t>(E));
      const int64_t max_it = std::max<int64_t>(
          kSinkhornMinIterations, static_cast<int64_t>(kSinkhornWorkBudget / static_cast<double>(2 * T * E)));
      if (math::sinkhorn_fp32(c.data(), T, E, 1e-4, max_it, d0.data(), d1.data(), d1_old.data(), out.data()) < 0) {
        throw Error(
            fmt::format("sinkhorn: no convergence to tol 1e-4 after {} iterations (Megatron iterates without "
                        "a cap; this happens with a dominant expert and few tokens)",
                        max_it));
      }
      for (size_t i = 0; i < sel.size(); ++i) sel[i] = static_cast<double>(out[i]);
    }
    for (int64_t t = 0; t < T; ++t) {
      int64_t* idx = &s.indices[static_cast<size_t>(t * k)];
      math::topk_row(&sel[static_cast<size_t>(t * E)], E, k, idx);
      for (int64_t j = 0; j < k; ++j) {
        s.scores[static_cast<size_t>(t * k + j)] = s.activation[static_cast<size_t>(t * E + idx[j])];
      }
    }
    return;
  }
  if (s.mode == Mode::kSoftmaxThenTopk) {
    s.activation.resize(static_cast<size_t>(T * E));
    for (int64_t t = 0; t < T; ++t) {
      double* a = &s.activation[static_cast<size_t>(t * E)];
      math::softmax_row(&s.z[static_cast<size_t>(t * E)], a, E);
      for (int64_t e = 0; e < E; ++e) a[e] = rnd(a[e], s.fp32);
    }
  } else {
    s.topk_softmax.resize(static_cast<size_t>(T * k));
  }
  for (int64_t t = 0; t < T; ++t) {
    int64_t* idx = &s.indices[static_cast<size_t>(t * k)];
    if (s.mode == Mode::kTopkThenSoftmax) {
      const double* zr = &s.z[static_cast<size_t>(t * E)];
      math::topk_row(zr, E, k, idx);
      // scores = softmax(top_logits, dtype=float32).type_as(logits)
      for (int64_t j = 0; j < k; ++j) buf[static_cast<size_t>(j)] = zr[idx[j]];
      if (faults::active(Fault::softmax_before_topk)) {
        // softmax over every expert first, then the top-k of the probabilities (not renormalised)
        std::vector<double> all(static_cast<size_t>(E));
        math::softmax_row(zr, all.data(), E);
        for (int64_t j = 0; j < k; ++j) buf[static_cast<size_t>(j)] = all[static_cast<size_t>(idx[j])];
      } else {
        math::softmax_row(buf.data(), buf.data(), k);
      }
      for (int64_t j = 0; j < k; ++j) {
        const double p = rnd(buf[static_cast<size_t>(j)], s.fp32);
        s.topk_softmax[static_cast<size_t>(t * k + j)] = p;
        s.scores[static_cast<size_t>(t * k + j)] = finish(p);
      }
    } else {
      const double* a = &s.activation[static_cast<size_t>(t * E)];
      math::topk_row(a, E, k, idx);
      for (int64_t j = 0; j < k; ++j) s.scores[static_cast<size_t>(t * k + j)] = finish(a[idx[j]]);
    }
  }
}

// aux loss (switch_load_balancing_loss_func, 0.5.0 order) and z-loss.
void router_losses(ModelContext& m, MoeSaved::State& s, MoeSaved& saved) {
  const TransformerConfig& cfg = m.cfg;
  const int64_t T = s.T, E = s.E, k = s.k;
  if (cfg.moe_z_loss_coeff) {
    double acc = 0;
    for (int64_t t = 0; t < T; ++t) {
      const double lse = rnd(math::logsumexp_row(&s.logits[static_cast<size_t>(t * E)], E), s.router);
      acc += rnd(lse * lse, s.router);
    }
    saved.z_loss = rnd(rnd(acc / static_cast<double>(T), s.router) * *cfg.moe_z_loss_coeff, s.router);
  }
  if (cfg.moe_router_load_balancing_type == "aux_loss") {
    if (s.mode == Mode::kSoftmaxThenTopk) {
      s.aux_probs = s.activation;
    } else {
      s.aux_probs.resize(static_cast<size_t>(T * E));
      for (int64_t t = 0; t < T; ++t) {
        double* p = &s.aux_probs[static_cast<size_t>(t * E)];
        math::softmax_row(&s.z[static_cast<size_t>(t * E)], p, E);
        for (int64_t e = 0; e < E; ++e) p[e] = rnd(p[e], s.fp32);
      }
    }
    s.aux_counts.assign(static_cast<size_t>(E), 0);
    for (int64_t i : s.indices) ++s.aux_counts[static_cast<size_t>(i)];
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      double col = 0;
      for (int64_t t = 0; t < T; ++t) col += s.aux_probs[static_cast<size_t>(t * E + e)];
      const double gates_mean = rnd(col / static_cast<double>(T), s.fp32);
      // Fault aux_loss_normalisation: by the tokens, not tokens * topk.
      const double norm_k = faults::active(Fault::aux_loss_normalisation) ? 1.0 : static_cast<double>(k);
      const double selection_mean =
          rnd(rnd(static_cast<double>(s.aux_counts[static_cast<size_t>(e)]) / static_cast<double>(T), s.fp32) /
                  norm_k,
              s.fp32);
      sum += rnd(gates_mean * selection_mean, s.fp32);
    }
    saved.aux_loss = rnd(rnd(rnd(sum, s.fp32) * static_cast<double>(E), s.fp32) * cfg.moe_aux_loss_coeff, s.fp32);
    saved.router_probs = host_f64(s.aux_probs, {T, E});
  } else if (s.mode == Mode::kSoftmaxThenTopk || (s.mode == Mode::kSinkhorn && k > 1)) {
    saved.router_probs = host_f64(s.activation, {T, E});
  }
}

// Expert MLPs under tensor parallelism (Megatron core_v0.5.0).
//
// The experts are MLP(is_expert=True) (moe/experts.py SequentialMLP): fc1 a
// ColumnParallelLinear, fc2 a RowParallelLinear, so a TP rank holds fc1 rows
// [F/tp] (GLU: [gate_r; up_r]) and its bias, fc2 columns [F/tp] and the whole
// fc2 bias (common/module_params.h local_shard_spec: the catalogue's mlp
// params, tp_axis 0 / 1 / -1).
//   * tp > 1 with sequence parallelism (required when ep > 1): the dispatcher
//     (token_dispatcher.py:105-130) all-gathers the SP-local hidden states and
//     the routing results over the tensor-and-expert group
//     (gather_from_sequence_parallel_region_to_moe, mappings.py
//     _gather_along_first_dim_moe: get_tensor_and_expert_parallel_group()),
//     every rank keeps the (token, slot) pairs of its local experts, the
//     experts run with explicit_expert_comm (layers.py:708, 922: fc1 does not
//     gather, fc2 does not reduce: partial sums), and token_unpermutation
//     (token_dispatcher.py:219-249) scatter-adds and reduce-scatters over the
//     same group, which sums the fc2 partials over TP and returns each rank
//     its own SP-local rows. The router ran before the gather, on the rank's
//     SP-local [s/tp, b, h] tokens (moe_layer.py:68): the token group of the
//     aux loss, z-loss and capacity is the SP slice.
//     Here: the router and the pairs stay on the SP-local tokens, the EP
//     all-to-all moves them to the expert's owner among the ranks of the same
//     TP index (the expert group), and each expert runs as an ordinary
//     SP-mode MLP over the TP group: column-parallel fc1 all-gathers the TP
//     ranks' rows of that expert, row-parallel fc2 reduce-scatters them back,
//     summing the partials. The row set an expert's shard multiplies is the
//     same as Megatron's (every pair of the tensor-and-expert group routed to
//     it); all-gather and reduce-scatter need equal blocks, so each rank pads
//     its rows of an expert with zero rows to the TP group's maximum (zero
//     rows get a zero gradient: they add nothing to any weight gradient).
//     Backward: fc2 all-gathers dy, fc1 reduce-scatters dx, as Megatron's
//     all-gather's backward (reduce-scatter over the group) sums the dgrad
//     partials; expert weight gradients are those of the TP shard (no TP
//     reduction); the router weight and the fc2 bias are replicated and see
//     the SP-local tokens, so their gradients are all-reduced over TP
//     (sequence_parallel attribute: router.py:47, layers.py:917;
//     finalize_model_grads.py _allreduce_layernorm_grads; run_case's
//     GradReduce::kTensorIfSequence). Megatron's bias path divides the
//     reduce-scattered sum of the tp identical fc2 biases by tp
//     (token_dispatcher.py:245-249): the same value as the bias of the rank's
//     own pairs computed here.
//   * tp > 1 without sequence parallelism (ep = 1): no gather
//     (token_dispatcher.py:131-143), every TP rank holds all tokens and
//     routes them identically; the experts are plain TP MLPs (fc1 input
//     copy_to_tensor_model_parallel_region, fc2 all-reduce): mlp_forward's
//     non-SP path, no padding (the row counts agree).
std::vector<int64_t> expert_block_rows(ModelContext& m, const std::vector<int64_t>& rows) {
  if (m.tp() == 1 || !m.sequence_parallel()) return rows;
  const std::vector<int64_t> all = m.comm.all_gather_ints(rows, m.ps.tp);
  std::vector<int64_t> pad(rows.size(), 0);
  for (size_t r = 0; r < static_cast<size_t>(m.tp()); ++r) {
    for (size_t le = 0; le < rows.size(); ++le) pad[le] = std::max(pad[le], all[r * rows.size() + le]);
  }
  return pad;
}

// Rows [at, at + n) of t, padded with zero rows to `rows` rows.
DTensor padded_block(ModelContext& m, const DTensor& t, int64_t at, int64_t n, int64_t rows) {
  if (rows == n) return t.slice0(at, n);
  DTensor out = m.be.zeros(t.dtype(), {rows, t.cols()});
  if (n > 0) {
    DTensor dst = out.slice0(0, n);
    m.be.copy(t.slice0(at, n), dst);
  }
  return out;
}

// Capacity (apply_router_token_dropping) and the per-expert processed token
// lists: routing_map[t, e] -> for each expert, its tokens ascending and slots.
void route_tokens(ModelContext& m, MoeSaved::State& s, std::vector<std::vector<int64_t>>& tokens,
                  std::vector<std::vector<int64_t>>& slots) {
  const TransformerConfig& cfg = m.cfg;
  const int64_t T = s.T, E = s.E, k = s.k;
  std::vector<uint8_t> map(static_cast<size_t>(T * E), 0);
  std::vector<double> routing(static_cast<size_t>(T * E), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const auto e = s.indices[static_cast<size_t>(t * k + j)];
      map[static_cast<size_t>(t * E + e)] = 1;
      routing[static_cast<size_t>(t * E + e)] = s.scores[static_cast<size_t>(t * k + j)];
    }
  }
  std::vector<uint8_t> final_map = map;
  if (cfg.moe_expert_capacity_factor) {
    const double capacity_d =
        std::ceil(static_cast<double>(T * k) / static_cast<double>(E) * *cfg.moe_expert_capacity_factor);
    std::vector<uint8_t> cap(static_cast<size_t>(T * E), 1);
    if (capacity_d <= static_cast<double>(T)) {
      const auto capacity = static_cast<int64_t>(capacity_d);
      std::fill(cap.begin(), cap.end(), 0);
      const bool by_probs = cfg.moe_token_drop_policy == "probs";
      std::vector<double> column(static_cast<size_t>(T));
      std::vector<int64_t> order(static_cast<size_t>(T));
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t t = 0; t < T; ++t) {
          column[static_cast<size_t>(t)] = by_probs ? routing[static_cast<size_t>(t * E + e)]
                                                    : static_cast<double>(map[static_cast<size_t>(t * E + e)]);
        }
        std::iota(order.begin(), order.end(), int64_t{0});
        std::partial_sort(order.begin(), order.begin() + capacity, order.end(),
                          [&](int64_t a, int64_t b) { return math::topk_before(column.data(), a, b); });
        for (int64_t i = 0; i < capacity; ++i) cap[static_cast<size_t>(order[static_cast<size_t>(i)] * E + e)] = 1;
      }
    }
    for (size_t i = 0; i < final_map.size(); ++i) {
      final_map[i] = cfg.moe_pad_expert_input_to_capacity ? cap[i] : static_cast<uint8_t>(map[i] & cap[i]);
    }
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const auto e = s.indices[static_cast<size_t>(t * k + j)];
        if (cap[static_cast<size_t>(t * E + e)] == 0) {
          s.kept[static_cast<size_t>(t * k + j)] = 0;
          s.scores[static_cast<size_t>(t * k + j)] = 0.0;
        }
      }
    }
  }
  tokens.assign(static_cast<size_t>(E), {});
  slots.assign(static_cast<size_t>(E), {});
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) {
      if (final_map[static_cast<size_t>(t * E + e)] == 0) continue;
      int64_t slot = -1;
      for (int64_t j = 0; j < k; ++j) {
        if (s.indices[static_cast<size_t>(t * k + j)] == e && s.kept[static_cast<size_t>(t * k + j)]) slot = j;
      }
      tokens[static_cast<size_t>(e)].push_back(t);
      slots[static_cast<size_t>(e)].push_back(slot);
    }
  }
}

// grad += g (g in the activation dtype, cast to the main grad's dtype first).
void accumulate_grad(ModelContext& m, Param& p, const DTensor& g) {
  DTensor src = g.view(p.grad.shape());
  if (g.dtype() != p.grad.dtype() || g.storage_dtype() != p.grad.storage_dtype()) {
    src = m.be.empty(p.grad.dtype(), p.grad.shape());
    m.be.copy(g, src);
  }
  m.be.axpby(1.0f, p.grad, 1.0f, src, p.grad);
  p.used = true;
}

// The combine weights: scores cast to the expert-output dtype.
double combine_weight(const MoeSaved::State& s, int64_t pair) {
  return rnd(s.scores[static_cast<size_t>(pair)], s.act);
}

}  // namespace

namespace {

// The set-up shared by the layer and the router component: sizes, dtypes,
// the router mode and the input x [T, h] (the rank's token group).
std::shared_ptr<MoeSaved::State> start_state(ModelContext& m, const std::string& prefix, const DTensor& x,
                                             const TokenLayout& tokens, bool layer) {
  const TransformerConfig& cfg = m.cfg;
  if (!cfg.num_moe_experts) throw Error("MoE: num_moe_experts is not set");
  check_supported(m, *cfg.num_moe_experts, layer);
  auto st = std::make_shared<MoeSaved::State>();
  MoeSaved::State& s = *st;
  s.prefix = prefix;
  s.E = *cfg.num_moe_experts;
  s.k = cfg.moe_router_topk;
  s.h = cfg.hidden_size;
  if (x.cols() != s.h) {
    throw Error(fmt::format("MoE: the input {} has {} features, hidden_size is {}", x.describe(), x.cols(), s.h));
  }
  s.T = x.rows();
  if (s.T == 0) throw Error("MoE: the input has no tokens");
  if (tokens.hidden_rows() != 0 && tokens.hidden_rows() != s.T) {
    throw Error(fmt::format("MoE: the input has {} token rows, the token layout {}", s.T, tokens.hidden_rows()));
  }
  s.x_shape = x.shape();
  s.x = x.view({s.T, s.h});
  s.ep = m.ps.ep.size();
  s.e_loc = s.E / s.ep;
  s.first = m.ps.ep.index * s.e_loc;
  s.mode = cfg.moe_router_load_balancing_type == "sinkhorn" ? Mode::kSinkhorn
           : cfg.moe_router_pre_softmax                     ? Mode::kSoftmaxThenTopk
                                                            : Mode::kTopkThenSoftmax;
  s.act = m.dtype;
  s.router = m.dtype;
  s.routing = (cfg.moe_input_jitter_eps && m.dtype != DType::F64) ? promote(s.router, DType::F32) : s.router;
  s.fp32 = DType::F32;  // Megatron's softmax(dtype=float32), also in a float64 model
  s.scaled = cfg.moe_router_topk_scaling_factor && *cfg.moe_router_topk_scaling_factor != 0.0;
  s.scale = s.scaled ? *cfg.moe_router_topk_scaling_factor : 1.0;
  return st;
}

// The router on the rank's token group: routing decision, losses, capacity;
// the router outputs go to `saved`, the processed (token, slot) lists per
// expert to ex_tokens / ex_slots.
void run_router(ModelContext& m, const std::string& router, const std::string& jitter_path, MoeSaved::State& s,
                MoeSaved& saved, std::vector<std::vector<int64_t>>& ex_tokens,
                std::vector<std::vector<int64_t>>& ex_slots) {
  const int64_t T = s.T, E = s.E, k = s.k;
  router_forward(m, router, jitter_path, s);
  router_losses(m, s, saved);
  route_tokens(m, s, ex_tokens, ex_slots);
  saved.router_logits = host_f64(s.logits, {T, E});
  saved.router_scores = host_f64(s.scores, {T, k});
  saved.router_indices = Tensor(DType::I64, {T, k});
  for (int64_t i = 0; i < T * k; ++i) saved.router_indices.set_int(i, s.indices[static_cast<size_t>(i)]);
  saved.tokens_per_expert.assign(static_cast<size_t>(E), 0);
  for (int64_t e = 0; e < E; ++e) {
    saved.tokens_per_expert[static_cast<size_t>(e)] = static_cast<int64_t>(ex_tokens[static_cast<size_t>(e)].size());
  }
}

// The router backward on the host, then the gating GEMMs: d_scores [T, k]
// (the gradient of the routing scores; dropped slots ignored), the aux and
// z losses with gradient 1. Accumulates the router's weight (and bias)
// gradients; returns the router's part of dx [T, h].
DTensor router_backward(ModelContext& m, const std::string& router, const MoeSaved::State& s,
                        const std::vector<double>& d_scores) {
  const int64_t T = s.T, E = s.E, k = s.k, h = s.h;
  const TransformerConfig& cfg = m.cfg;
  std::vector<double> dz(static_cast<size_t>(T * E), 0.0);
  std::vector<double> gs(static_cast<size_t>(k)), dp(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const size_t pj = static_cast<size_t>(t * k + j);
      const double gval = s.kept[pj] ? rnd(d_scores[pj], s.routing) : 0.0;
      gs[static_cast<size_t>(j)] = rnd(gval * s.scale, s.fp32);
    }
    const int64_t* idx = &s.indices[static_cast<size_t>(t * k)];
    double* dzr = &dz[static_cast<size_t>(t * E)];
    if (s.mode == Mode::kSinkhorn) {
      const double* a = &s.activation[static_cast<size_t>(t * E)];
      auto g_of = [&](int64_t j) {
        const size_t pj = static_cast<size_t>(t * k + j);
        return s.kept[pj] ? rnd(d_scores[pj], s.routing) : 0.0;
      };
      if (k == 1) {
        const double sv = a[idx[0]];
        dzr[idx[0]] += rnd(g_of(0) * sv * (1.0 - sv), s.routing);
      } else {
        std::fill(dp.begin(), dp.end(), 0.0);
        for (int64_t j = 0; j < k; ++j) dp[static_cast<size_t>(idx[j])] = g_of(j);
        const double dot = math::softmax_backward_dot(a, dp.data(), E);
        for (int64_t e = 0; e < E; ++e) {
          dzr[e] += rnd(rnd(a[e] * (dp[static_cast<size_t>(e)] - dot), s.fp32), s.routing);
        }
      }
    } else if (s.mode == Mode::kTopkThenSoftmax) {
      const double* sm = &s.topk_softmax[static_cast<size_t>(t * k)];
      const double dot = math::softmax_backward_dot(sm, gs.data(), k);
      for (int64_t j = 0; j < k; ++j) {
        dzr[idx[j]] += rnd(rnd(sm[j] * (gs[static_cast<size_t>(j)] - dot), s.fp32), s.routing);
      }
    } else {
      std::fill(dp.begin(), dp.end(), 0.0);
      for (int64_t j = 0; j < k; ++j) dp[static_cast<size_t>(idx[j])] = gs[static_cast<size_t>(j)];
      const double* a = &s.activation[static_cast<size_t>(t * E)];
      const double dot = math::softmax_backward_dot(a, dp.data(), E);
      for (int64_t e = 0; e < E; ++e) dzr[e] += rnd(rnd(a[e] * (dp[static_cast<size_t>(e)] - dot), s.fp32), s.routing);
    }
  }
  if (cfg.moe_router_load_balancing_type == "aux_loss" && !s.aux_probs.empty()) {
    std::vector<double> gegrad(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      gegrad[static_cast<size_t>(e)] =
          math::aux_loss_prob_grad<double>(E, cfg.moe_aux_loss_coeff, s.aux_counts[static_cast<size_t>(e)],
                                           faults::active(Fault::aux_loss_normalisation) ? 1 : k, T);
    }
    for (int64_t t = 0; t < T; ++t) {
      const double* p = &s.aux_probs[static_cast<size_t>(t * E)];
      const double dot = math::softmax_backward_dot(p, gegrad.data(), E);
      for (int64_t e = 0; e < E; ++e) {
        dz[static_cast<size_t>(t * E + e)] +=
            rnd(rnd(p[e] * (gegrad[static_cast<size_t>(e)] - dot), s.fp32), s.routing);
      }
    }
  }
  for (double& v : dz) v = rnd(v, s.routing);
  std::vector<double> dl(static_cast<size_t>(T * E));
  for (size_t i = 0; i < dl.size(); ++i) dl[i] = s.jitter.empty() ? dz[i] : rnd(dz[i] * s.jitter[i], s.router);
  if (cfg.moe_z_loss_coeff && !faults::active(Fault::z_loss_missing)) {  // fault: the z-loss gradient never added
    std::vector<double> sm(static_cast<size_t>(E));
    for (int64_t t = 0; t < T; ++t) {
      const double* lr = &s.logits[static_cast<size_t>(t * E)];
      math::softmax_row(lr, sm.data(), E);
      const double lse = math::logsumexp_row(lr, E);
      const double c = *cfg.moe_z_loss_coeff * 2.0 * lse / static_cast<double>(T);
      for (int64_t e = 0; e < E; ++e)
        dl[static_cast<size_t>(t * E + e)] += rnd(c * sm[static_cast<size_t>(e)], s.router);
    }
    for (double& v : dl) v = rnd(v, s.router);
  }
  const DTensor d_logits = m.be.upload(host_f64(dl, {T, E}), s.router);
  Param& w = m.param(router + "weight");
  {
    DTensor dw = m.be.empty(s.act, {E, h});
    m.be.gemm(d_logits, true, s.x, false, dw);
    accumulate_grad(m, w, dw);
  }
  if (m.has_param(router + "bias")) {
    Param& b = m.param(router + "bias");
    DTensor db = m.be.empty(s.act, {E});
    m.be.bias_grad(d_logits, db, false);
    accumulate_grad(m, b, db);
  }
  DTensor dx_router = m.be.empty(s.act, {T, h});
  m.be.gemm(d_logits, false, w.value, false, dx_router);
  return dx_router;
}

}  // namespace

DTensor moe_forward(ModelContext& m, const std::string& prefix, const std::string& path, const DTensor& x,
                    const TokenLayout& tokens, MoeSaved& saved) {
  auto st = start_state(m, prefix, x, tokens, /*layer=*/true);
  MoeSaved::State& s = *st;
  const int64_t T = s.T, E = s.E, k = s.k, h = s.h;

  // --- router: on the rank's own (SP-local) tokens ---------------------------
  std::vector<std::vector<int64_t>> ex_tokens, ex_slots;
  run_router(m, prefix + "router.", path.empty() ? "router" : path + ".router", s, saved, ex_tokens, ex_slots);

  // --- dispatch ------------------------------------------------------------
  s.send_counts.assign(static_cast<size_t>(s.ep), 0);
  for (int64_t e = 0; e < E; ++e) {
    const auto& tk = ex_tokens[static_cast<size_t>(e)];
    s.send_tokens.insert(s.send_tokens.end(), tk.begin(), tk.end());
    s.send_slots.insert(s.send_slots.end(), ex_slots[static_cast<size_t>(e)].begin(),
                        ex_slots[static_cast<size_t>(e)].end());
    s.send_expert.insert(s.send_expert.end(), tk.size(), e);
    s.send_counts[static_cast<size_t>(e / s.e_loc)] += static_cast<int64_t>(tk.size());
  }
  // counts[src * E + e]: rows member src sends to expert e.
  std::vector<int64_t> counts = saved.tokens_per_expert;
  if (s.ep > 1) counts = m.comm.all_gather_ints(saved.tokens_per_expert, m.ps.ep);
  s.recv_counts.assign(static_cast<size_t>(s.ep), 0);
  std::vector<int64_t> src_offset(static_cast<size_t>(s.ep), 0);
  for (int64_t src = 0; src < s.ep; ++src) {
    for (int64_t e = s.first; e < s.first + s.e_loc; ++e) {
      s.recv_counts[static_cast<size_t>(src)] += counts[static_cast<size_t>(src * E + e)];
    }
    if (src > 0)
      src_offset[static_cast<size_t>(src)] =
          src_offset[static_cast<size_t>(src - 1)] + s.recv_counts[static_cast<size_t>(src - 1)];
  }
  s.expert_rows.assign(static_cast<size_t>(s.e_loc), 0);
  for (int64_t le = 0; le < s.e_loc; ++le) {
    for (int64_t src = 0; src < s.ep; ++src) {
      int64_t at = src_offset[static_cast<size_t>(src)];
      for (int64_t e = s.first; e < s.first + le; ++e) at += counts[static_cast<size_t>(src * E + e)];
      const int64_t n = counts[static_cast<size_t>(src * E + s.first + le)];
      for (int64_t i = 0; i < n; ++i) s.regroup.push_back(at + i);
      s.expert_rows[static_cast<size_t>(le)] += n;
    }
  }
  s.ungroup.assign(s.regroup.size(), 0);
  for (size_t i = 0; i < s.regroup.size(); ++i) s.ungroup[static_cast<size_t>(s.regroup[i])] = static_cast<int64_t>(i);

  const DTensor xs = gather(m, s.x, s.send_tokens);
  const DTensor xr = exchange(m, xs, s.send_counts, s.recv_counts);
  const DTensor xe = gather(m, xr, s.regroup);

  // --- experts (TP-sharded MLPs, see expert_block_rows) ------------------------
  const int64_t n_recv = static_cast<int64_t>(s.regroup.size());
  DTensor ye = m.empty({n_recv, h});
  s.mlp.assign(static_cast<size_t>(s.e_loc), MlpSaved{});
  s.expert_pad = expert_block_rows(m, s.expert_rows);
  const ExpertsWithoutFp8 no_fp8(m);
  int64_t at = 0;
  for (int64_t le = 0; le < s.e_loc; ++le) {
    const int64_t n = s.expert_rows[static_cast<size_t>(le)], pad = s.expert_pad[static_cast<size_t>(le)];
    if (pad > 0) {
      const DTensor out = mlp_forward(m, expert_prefix(prefix, s.first + le), padded_block(m, xe, at, n, pad),
                                      s.mlp[static_cast<size_t>(le)]);
      if (n > 0) {
        DTensor dst = ye.slice0(at, n);
        m.be.copy(out.slice0(0, n), dst);
      }
    }
    at += n;
  }
  const DTensor yr = gather(m, ye, s.ungroup);
  s.y_back = exchange(m, yr, s.recv_counts, s.send_counts);

  // --- combine -------------------------------------------------------------
  DTensor out = m.be.zeros(s.act, {T, h});
  std::vector<std::vector<int64_t>> slot_rows(static_cast<size_t>(k)), slot_tokens(static_cast<size_t>(k));
  std::vector<std::vector<double>> slot_weights(static_cast<size_t>(k));
  // Fault expert_permutation_order: the unpermute takes the expert-major rows
  // to be in token-major (token, slot) order, i.e. does not invert the permute.
  std::vector<size_t> pair_of(s.send_tokens.size());
  std::iota(pair_of.begin(), pair_of.end(), size_t{0});
  if (faults::active(Fault::expert_permutation_order)) {
    std::stable_sort(pair_of.begin(), pair_of.end(), [&](size_t a, size_t b) {
      return std::pair(s.send_tokens[a], s.send_slots[a]) < std::pair(s.send_tokens[b], s.send_slots[b]);
    });
  }
  for (size_t i = 0; i < s.send_tokens.size(); ++i) {
    const size_t p = pair_of[i];
    const int64_t j = s.send_slots[p];
    if (j < 0) continue;  // capacity padding: weight 0
    slot_rows[static_cast<size_t>(j)].push_back(static_cast<int64_t>(i));
    slot_tokens[static_cast<size_t>(j)].push_back(s.send_tokens[p]);
    slot_weights[static_cast<size_t>(j)].push_back(combine_weight(s, s.send_tokens[p] * k + j));
  }
  for (int64_t j = 0; j < k; ++j) {
    scatter_rows(m, s.y_back, slot_rows[static_cast<size_t>(j)], slot_tokens[static_cast<size_t>(j)],
                 slot_weights[static_cast<size_t>(j)], out);
  }

  // output_bias = sum_j score * b2_e, from every expert's fc2 bias (gathered over EP).
  s.has_bias = m.has_param(expert_prefix(prefix, s.first) + "linear_fc2.bias");
  if (s.has_bias) {
    DTensor b2_loc = m.empty({s.e_loc, h});
    for (int64_t le = 0; le < s.e_loc; ++le) {
      DTensor dst = b2_loc.slice0(le, 1);
      m.be.copy(m.param(expert_prefix(prefix, s.first + le) + "linear_fc2.bias").value, dst);
    }
    if (s.ep > 1) {
      s.b2_all = m.empty({E, h});
      m.comm.all_gather(b2_loc, s.b2_all, m.ps.ep);
    } else {
      s.b2_all = b2_loc;
    }
    DTensor ob = m.be.zeros(s.act, {T, h});
    for (int64_t j = 0; j < k; ++j) {
      std::vector<int64_t> experts;
      for (int64_t r : slot_rows[static_cast<size_t>(j)]) experts.push_back(s.send_expert[static_cast<size_t>(r)]);
      scatter_rows(m, s.b2_all, experts, slot_tokens[static_cast<size_t>(j)], slot_weights[static_cast<size_t>(j)], ob);
    }
    saved.output_bias = ob.view(s.x_shape);
  } else {
    saved.output_bias = DTensor();
  }
  saved.state = st;
  return out.view(s.x_shape);
}

DTensor moe_backward(ModelContext& m, const std::string& prefix, const DTensor& dy_in, const DTensor* dy_bias_in,
                     const TokenLayout& tokens, MoeSaved& saved) {
  if (!saved.state) throw Error("moe_backward: no saved forward state");
  MoeSaved::State& s = *saved.state;
  if (prefix != s.prefix)
    throw Error(fmt::format("moe_backward: prefix '{}' but the forward ran '{}'", prefix, s.prefix));
  const int64_t T = s.T, E = s.E, k = s.k, h = s.h;
  if (dy_in.numel() != T * h)
    throw Error(fmt::format("moe_backward: dy is {}, expected [{}, {}]", dy_in.describe(), T, h));
  if (tokens.hidden_rows() != 0 && tokens.hidden_rows() != T) {
    throw Error(fmt::format("moe_backward: {} token rows, the token layout {}", T, tokens.hidden_rows()));
  }
  const DTensor dy = dy_in.view({T, h});
  const bool bias_grad = s.has_bias && dy_bias_in != nullptr;
  DTensor dyb;
  if (bias_grad) dyb = dy_bias_in->view({T, h});
  const int64_t n_send = static_cast<int64_t>(s.send_tokens.size());

  // --- combine backward: d scores on the host --------------------------------
  std::vector<double> d_scores(static_cast<size_t>(T * k), 0.0);
  {
    const std::vector<double> dyh = to_host(m.be, dy);
    const std::vector<double> yh = n_send > 0 ? to_host(m.be, s.y_back) : std::vector<double>();
    std::vector<double> dybh, b2h;
    if (bias_grad) {
      dybh = to_host(m.be, dyb);
      b2h = to_host(m.be, s.b2_all);
    }
    for (int64_t i = 0; i < n_send; ++i) {
      const int64_t j = s.send_slots[static_cast<size_t>(i)];
      if (j < 0) continue;
      const int64_t t = s.send_tokens[static_cast<size_t>(i)];
      double ds = 0;
      for (int64_t c = 0; c < h; ++c) ds += yh[static_cast<size_t>(i * h + c)] * dyh[static_cast<size_t>(t * h + c)];
      if (bias_grad) {
        const int64_t e = s.send_expert[static_cast<size_t>(i)];
        double db = 0;
        for (int64_t c = 0; c < h; ++c)
          db += b2h[static_cast<size_t>(e * h + c)] * dybh[static_cast<size_t>(t * h + c)];
        ds += db;
      }
      d_scores[static_cast<size_t>(t * k + j)] = rnd(ds, s.act);
    }
  }

  // d expert rows = score * dy (padding rows: 0), sent to the experts.
  std::vector<double> row_weights(static_cast<size_t>(n_send), 0.0);
  for (int64_t i = 0; i < n_send; ++i) {
    const int64_t j = s.send_slots[static_cast<size_t>(i)];
    if (j >= 0) row_weights[static_cast<size_t>(i)] = combine_weight(s, s.send_tokens[static_cast<size_t>(i)] * k + j);
  }
  DTensor g = m.be.zeros(s.act, {n_send, h});
  if (n_send > 0) {
    const DTensor rows = gather(m, dy, s.send_tokens);
    std::vector<int64_t> iota(static_cast<size_t>(n_send));
    std::iota(iota.begin(), iota.end(), int64_t{0});
    weighted_scatter(m, rows, iota, row_weights, g);
  }
  const DTensor gr = exchange(m, g, s.send_counts, s.recv_counts);
  const DTensor ge = gather(m, gr, s.regroup);

  // --- experts backward ------------------------------------------------------
  const int64_t n_recv = static_cast<int64_t>(s.regroup.size());
  DTensor dxe = m.empty({n_recv, h});
  const ExpertsWithoutFp8 no_fp8(m);
  int64_t at = 0;
  for (int64_t le = 0; le < s.e_loc; ++le) {
    const int64_t n = s.expert_rows[static_cast<size_t>(le)], pad = s.expert_pad[static_cast<size_t>(le)];
    const std::string ep = expert_prefix(prefix, s.first + le);
    if (pad > 0) {
      // Padding rows carry a zero gradient: nothing of them reaches a weight.
      const DTensor d = mlp_backward(m, ep, padded_block(m, ge, at, n, pad), s.mlp[static_cast<size_t>(le)]);
      if (n > 0) {
        DTensor dst = dxe.slice0(at, n);
        m.be.copy(d.slice0(0, n), dst);
      }
    } else {
      // Megatron's expert still sees an (empty) input: zero gradients.
      for (const char* name : {"linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight"}) {
        if (m.has_param(ep + name)) m.param(ep + name).used = true;
      }
    }
    if (s.has_bias) m.param(ep + "linear_fc2.bias").used = true;
    at += n;
  }
  const DTensor dxr = gather(m, dxe, s.ungroup);
  const DTensor dxb = exchange(m, dxr, s.recv_counts, s.send_counts);

  // fc2 bias gradients: sum over the pairs of score * dy_bias, reduced over EP to the owner.
  if (bias_grad) {
    DTensor db = m.be.zeros(m.grad_dtype, {E, h});  // summed in the main-grad dtype
    std::vector<int64_t> rows, experts;
    std::vector<double> weights;
    for (int64_t i = 0; i < n_send; ++i) {
      if (s.send_slots[static_cast<size_t>(i)] < 0) continue;
      rows.push_back(s.send_tokens[static_cast<size_t>(i)]);
      experts.push_back(s.send_expert[static_cast<size_t>(i)]);
      weights.push_back(row_weights[static_cast<size_t>(i)]);
    }
    if (!rows.empty()) {
      DTensor src = gather(m, dyb, rows);
      if (src.dtype() != db.dtype()) {
        DTensor cast = m.be.empty(db.dtype(), src.shape());
        m.be.copy(src, cast);
        src = cast;
      }
      weighted_scatter(m, src, experts, weights, db);
    }
    DTensor db_loc = db;
    if (s.ep > 1) {
      db_loc = m.be.empty(db.dtype(), {s.e_loc, h});
      m.comm.reduce_scatter(db, db_loc, m.ps.ep);
    }
    for (int64_t le = 0; le < s.e_loc; ++le) {
      Param& b2 = m.param(expert_prefix(prefix, s.first + le) + "linear_fc2.bias");
      accumulate_grad(m, b2, db_loc.slice0(le, 1));
    }
  }

  // --- unpermute the input gradients: per slot, in slot order -------------------
  DTensor dx = m.be.zeros(s.act, {T, h});
  {
    std::vector<std::vector<int64_t>> slot_rows(static_cast<size_t>(k)), slot_tokens(static_cast<size_t>(k));
    for (int64_t i = 0; i < n_send; ++i) {
      const int64_t j = s.send_slots[static_cast<size_t>(i)];
      if (j < 0) continue;  // padding rows: zero gradient
      slot_rows[static_cast<size_t>(j)].push_back(i);
      slot_tokens[static_cast<size_t>(j)].push_back(s.send_tokens[static_cast<size_t>(i)]);
    }
    for (int64_t j = 0; j < k; ++j) {
      scatter_rows(m, dxb, slot_rows[static_cast<size_t>(j)], slot_tokens[static_cast<size_t>(j)], {}, dx);
    }
  }

  // --- router backward (host), then the gating GEMMs ---------------------------
  const DTensor dx_router = router_backward(m, prefix + "router.", s, d_scores);
  m.be.axpby(1.0f, dx, 1.0f, dx_router, dx);
  const std::vector<int64_t> shape = s.x_shape;
  saved.state.reset();
  return dx.view(shape);
}

// The moe_router component: TopKRouter alone on the rank's tokens (a DP
// slice; under SP the SP-local rows, as the router inside MoELayer sees
// them). The case's L = sum(router_scores * grad_output) + aux_loss + z_loss
// (reference/README.md).
void moe_router_forward(ModelContext& m, const std::string& prefix, const std::string& path, const DTensor& x,
                        const TokenLayout& tokens, MoeSaved& saved) {
  auto st = start_state(m, prefix, x, tokens, /*layer=*/false);
  std::vector<std::vector<int64_t>> ex_tokens, ex_slots;
  run_router(m, prefix, path, *st, saved, ex_tokens, ex_slots);
  saved.output_bias = DTensor();
  saved.state = st;
}

DTensor moe_router_backward(ModelContext& m, const std::string& prefix, const DTensor& d_scores,
                            const TokenLayout& tokens, MoeSaved& saved) {
  if (!saved.state) throw Error("moe_router_backward: no saved forward state");
  const MoeSaved::State& s = *saved.state;
  if (prefix != s.prefix) {
    throw Error(fmt::format("moe_router_backward: prefix '{}' but the forward ran '{}'", prefix, s.prefix));
  }
  if (d_scores.numel() != s.T * s.k) {
    throw Error(fmt::format("moe_router_backward: the scores' gradient is {}, expected [{}, {}]", d_scores.describe(),
                            s.T, s.k));
  }
  if (tokens.hidden_rows() != 0 && tokens.hidden_rows() != s.T) {
    throw Error(fmt::format("moe_router_backward: {} token rows, the token layout {}", s.T, tokens.hidden_rows()));
  }
  // Megatron's scores are in the routing dtype; the gradient arrives in it.
  std::vector<double> ds = to_host(m.be, d_scores);
  const DTensor dx = router_backward(m, prefix, s, ds);
  const std::vector<int64_t> shape = s.x_shape;
  saved.state.reset();
  return dx.view(shape);
}

}  // namespace paritron::opt
