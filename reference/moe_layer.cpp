// See moe_layer.h.
#include "reference/moe_layer.h"

#include <fmt/format.h>
#include <string>

#include "common/error.h"
#include "common/module_params.h"

namespace paritron::ref {

namespace {

// The experts of 0.5.0's MoE specs are local ColumnParallelLinear /
// RowParallelLinear layers, not Transformer Engine ones (gpt_layer_specs.py,
// _get_mlp_module_spec with num_experts), so they never run in fp8 even under
// an fp8 recipe; only the activation dtype applies.
Precision expert_precision(const Precision& p) {
  Precision e = p;
  e.fp8.reset();
  return e;
}


struct LayerShape {
  int64_t tokens, experts, topk, hidden;
  int64_t ffn;      // f: the input width of each expert's fc2
  int64_t fc1_out;  // F: f, or 2f with gated_linear_unit
  bool grouped;     // GroupedMLP
  bool bias;        // expert fc1 / fc2 biases (SequentialMLP with add_bias_linear)
};

LayerShape layer_shape(const TransformerConfig& cfg, const Mat& x) {
  if (!cfg.num_moe_experts || *cfg.num_moe_experts < 1) {
    throw Error("moe_layer: num_moe_experts must be set to a positive number of experts");
  }
  if (x.cols() != cfg.hidden_size) {
    throw Error(fmt::format("moe_layer: hidden_states has {} features but hidden_size is {}", x.cols(),
                            cfg.hidden_size));
  }
  LayerShape s{};
  s.tokens = x.rows();
  s.experts = *cfg.num_moe_experts;
  s.topk = cfg.moe_router_topk;
  s.hidden = cfg.hidden_size;
  s.ffn = expert_ffn_hidden_size(cfg);
  s.fc1_out = cfg.gated_linear_unit ? 2 * s.ffn : s.ffn;
  s.grouped = cfg.moe_grouped_gemm;
  if (s.grouped && cfg.add_bias_linear) {
    throw Error("moe_layer: moe_grouped_gemm needs add_bias_linear = false (GroupedMLP has no expert biases)");
  }
  s.bias = !s.grouped && cfg.add_bias_linear;
  return s;
}

std::string expert_prefix(int64_t e) { return "experts.local_experts." + std::to_string(e); }

// Checks every expert weight up front, so a wrong shape is reported by name
// even for an expert that receives no token.
void check_expert_weights(const LayerShape& s, const Params& w) {
  if (s.grouped) {
    w.at("experts.weight1", s.hidden, s.experts * s.fc1_out);
    w.at("experts.weight2", s.experts * s.ffn, s.hidden);
    return;
  }
  for (int64_t e = 0; e < s.experts; ++e) {
    const Params ex = w.sub(expert_prefix(e));
    ex.at("linear_fc1.weight", s.fc1_out, s.hidden);
    ex.at("linear_fc2.weight", s.hidden, s.ffn);
    if (s.bias) {
      ex.row("linear_fc1.bias", s.fc1_out);
      ex.row("linear_fc2.bias", s.hidden);
    }
  }
}

// GroupedMLP: w1 = weight1.view(E, h, F), w2 = weight2.view(E, f, h); an MLP
// with fc1.weight = w1[e]^T [F, h] and fc2.weight = w2[e]^T [h, f].
MatMap grouped_expert_weights(const LayerShape& s, const Params& w, int64_t e) {
  const Mat& weight1 = w.at("experts.weight1");
  const Mat& weight2 = w.at("experts.weight2");
  Mat fc1(s.fc1_out, s.hidden), fc2(s.hidden, s.ffn);
  const double* w1 = weight1.data() + e * s.hidden * s.fc1_out;  // row-major memory of [E, h, F]
  for (int64_t r = 0; r < s.hidden; ++r) {
    for (int64_t c = 0; c < s.fc1_out; ++c) fc1(c, r) = w1[r * s.fc1_out + c];
  }
  for (int64_t r = 0; r < s.ffn; ++r) {
    for (int64_t c = 0; c < s.hidden; ++c) fc2(c, r) = weight2(e * s.ffn + r, c);
  }
  MatMap m;
  m.emplace("linear_fc1.weight", std::move(fc1));
  m.emplace("linear_fc2.weight", std::move(fc2));
  return m;
}

// The config the expert MLPs run under: GroupedMLP applies activation_func
// unfused (0.5.0 experts.py), never bias_gelu's tanh form.
TransformerConfig expert_config(const TransformerConfig& cfg, const LayerShape& s) {
  TransformerConfig c = cfg;
  if (s.grouped) {
    c.bias_activation_fusion = false;
    c.add_bias_linear = false;
  }
  return c;
}

// The dtypes of the combine (see the header).
struct CombineDtypes {
  DType act;      // A
  DType scores;   // the dtype scores are cast to before the product
  DType combine;  // product and sum
};

CombineDtypes combine_dtypes(const TransformerConfig& cfg, const Precision& p) {
  if (!cfg.moe_router_dtype || p.dtype == DType::F64) return {p.dtype, p.dtype, p.dtype};
  // unpermute (newer): bf16 tokens * fp32/fp64 probs promotes; .to(input_dtype) at the end.
  const DType probs = cfg.moe_router_dtype == "fp64" ? DType::F64 : DType::F32;
  return {p.dtype, probs, probs};
}

}  // namespace

std::vector<ExpertForward> moe_dispatch(const RouterForward& router, const Mat& x) {
  const Eigen::Index T = router.routing_map.rows(), E = router.routing_map.cols(), k = router.indices.cols();
  if (x.rows() != T) {
    throw Error(fmt::format("moe_dispatch: hidden_states has {} tokens, the routing {}", x.rows(), T));
  }
  std::vector<ExpertForward> experts(static_cast<size_t>(E));
  // Token-major pairs t*k + j, stably grouped by expert, plus padding rows (slot -1):
  // per expert that is every token with routing_map(t, e) = 1 in ascending t.
  for (Eigen::Index t = 0; t < T; ++t) {
    for (Eigen::Index e = 0; e < E; ++e) {
      if (router.routing_map(t, e) == 0.0) continue;
      int64_t slot = -1;
      for (Eigen::Index j = 0; j < k; ++j) {
        if (router.indices(t, j) == e && router.kept(t, j) != 0.0) slot = j;
      }
      experts[static_cast<size_t>(e)].tokens.push_back(t);
      experts[static_cast<size_t>(e)].slots.push_back(slot);
    }
  }
  for (auto& ex : experts) {
    ex.input.resize(static_cast<Eigen::Index>(ex.tokens.size()), x.cols());
    for (size_t r = 0; r < ex.tokens.size(); ++r) ex.input.row(static_cast<Eigen::Index>(r)) = x.row(ex.tokens[r]);
  }
  return experts;
}

MoeLayerForward moe_layer_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p,
                                  const RunContext& ctx, const Sink& taps) {
  const LayerShape s = layer_shape(cfg, x);
  check_expert_weights(s, w);
  const TransformerConfig ecfg = expert_config(cfg, s);
  const CombineDtypes d = combine_dtypes(cfg, p);
  const Precision ep = expert_precision(p);
  MoeLayerForward f;
  f.router = moe_router_forward(cfg, w.sub("router"), x, p, ctx.sub("router"));
  f.experts = moe_dispatch(f.router, x);

  const RouterForward& r = f.router;
  const Eigen::Index T = s.tokens, h = s.hidden;
  // Per (token, slot): the expert output row and the bias that the combine scales.
  std::vector<Mat> slot_rows(static_cast<size_t>(s.topk), Mat::Zero(T, h));
  std::vector<Mat> slot_bias(static_cast<size_t>(s.topk), Mat::Zero(T, h));
  for (int64_t e = 0; e < s.experts; ++e) {
    ExpertForward& ex = f.experts[static_cast<size_t>(e)];
    if (ex.tokens.empty()) continue;  // an expert without tokens contributes nothing
    if (s.grouped) {
      const MatMap ew = grouped_expert_weights(s, w, e);
      ex.mlp = mlp_forward(ecfg, Params(ew), ex.input, ep);
    } else {
      ex.mlp = mlp_forward(ecfg, w.sub(expert_prefix(e)), ex.input, ep);
    }
    for (size_t row = 0; row < ex.tokens.size(); ++row) {
      if (ex.slots[row] < 0) continue;  // capacity padding: weight 0
      const auto j = static_cast<size_t>(ex.slots[row]);
      slot_rows[j].row(ex.tokens[row]) = ex.mlp.output.row(static_cast<Eigen::Index>(row));
      if (ex.mlp.output_bias) slot_bias[j].row(ex.tokens[row]) = *ex.mlp.output_bias;
    }
  }

  // Unpermute and combine: sum_j score * row, in slot order (scatter_add).
  auto combine = [&](const std::vector<Mat>& rows) {
    Mat out = Mat::Zero(T, h);
    for (Eigen::Index t = 0; t < T; ++t) {
      for (int64_t j = 0; j < s.topk; ++j) {
        if (r.kept(t, j) == 0.0) continue;
        const double score = round_to(r.scores(t, j), d.scores);
        for (Eigen::Index c = 0; c < h; ++c) {
          const double term = round_to(score * rows[static_cast<size_t>(j)](t, c), d.combine);
          out(t, c) = round_to(out(t, c) + term, d.combine);
        }
      }
    }
    return rounded(std::move(out), d.act);
  };
  f.output = combine(slot_rows);
  if (s.bias) f.output_bias = combine(slot_bias);

  if (taps.active()) {
    const Sink rt = taps.sub("router");
    rt.put("logits", r.logits);
    if (r.probs) rt.put("probs", *r.probs);
    rt.put("scores", r.scores);
    rt.put("indices", r.indices.cast<double>());
    Mat counts(1, s.experts);
    for (int64_t e = 0; e < s.experts; ++e) counts(0, e) = static_cast<double>(r.tokens_per_expert[static_cast<size_t>(e)]);
    rt.put("tokens_per_expert", counts);
    if (r.aux_loss) rt.put("aux_loss", Mat::Constant(1, 1, *r.aux_loss));
    if (r.z_loss) rt.put("z_loss", Mat::Constant(1, 1, *r.z_loss));
    // How close each token's expert choice is to a tie (the parity harness's
    // near-tie handling, parity/near_ties.h).
    rt.put("topk_margin", r.topk_margin);
    rt.put("order_margin", r.order_margin);
    rt.put("capacity_margin", r.capacity_margin);
    rt.put("selection", r.selection_values);
    Eigen::Index rows = 0;
    for (const auto& ex : f.experts) rows += ex.input.rows();
    Mat input(rows, h), output(rows, h);
    Eigen::Index at = 0;
    for (const auto& ex : f.experts) {
      if (ex.input.rows() == 0) continue;
      input.middleRows(at, ex.input.rows()) = ex.input;
      output.middleRows(at, ex.input.rows()) = ex.mlp.output;
      at += ex.input.rows();
    }
    taps.sub("experts").put("input", input);
    taps.sub("experts").put("output", output);
    // Every expert's pre-activations, rows in expert order (the parity
    // harness's kink near-ties).
    Eigen::Index fc1_cols = 0;
    for (const auto& ex : f.experts) fc1_cols = std::max(fc1_cols, ex.mlp.fc1_output.cols());
    Mat fc1 = Mat::Zero(rows, fc1_cols);
    at = 0;
    for (const auto& ex : f.experts) {
      if (ex.mlp.fc1_output.rows() > 0) fc1.middleRows(at, ex.input.rows()) = ex.mlp.fc1_output;
      at += ex.input.rows();
    }
    taps.sub("experts").put("linear_fc1", fc1);
  }
  return f;
}

Mat moe_layer_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const MoeLayerForward& fwd,
                       const Mat& d_output, const std::optional<Mat>& d_output_bias, const Sink& grads,
                       const Precision& p) {
  const LayerShape s = layer_shape(cfg, x);
  check_expert_weights(s, w);
  const TransformerConfig ecfg = expert_config(cfg, s);
  const CombineDtypes d = combine_dtypes(cfg, p);
  const Eigen::Index T = s.tokens, h = s.hidden;
  if (d_output.rows() != T || d_output.cols() != h) {
    throw Error(fmt::format("moe_layer_backward: d_output is [{}, {}], expected [{}, {}]", d_output.rows(),
                            d_output.cols(), T, h));
  }
  if (d_output_bias && (d_output_bias->rows() != T || d_output_bias->cols() != h)) {
    throw Error(fmt::format("moe_layer_backward: d_output_bias is [{}, {}], expected [{}, {}]",
                            d_output_bias->rows(), d_output_bias->cols(), T, h));
  }
  if (static_cast<int64_t>(fwd.experts.size()) != s.experts || fwd.router.scores.rows() != T) {
    throw Error("moe_layer_backward: the forward record does not match hidden_states and the config");
  }
  const RouterForward& r = fwd.router;
  const Mat dout = rounded(d_output, d.act);
  Mat d_scores = Mat::Zero(T, s.topk);
  // The experts' input gradients, scattered back per (token, slot) and summed in slot order.
  std::vector<Mat> dx_slots(static_cast<size_t>(s.topk), Mat::Zero(T, h));
  Mat dx_padding = Mat::Zero(T, h);

  for (int64_t e = 0; e < s.experts; ++e) {
    const ExpertForward& ex = fwd.experts[static_cast<size_t>(e)];
    const auto n = static_cast<Eigen::Index>(ex.tokens.size());
    MatMap grouped_w, grouped_g;
    const Params ew = s.grouped ? (grouped_w = grouped_expert_weights(s, w, e), Params(grouped_w))
                                : w.sub(expert_prefix(e));
    const Sink eg = s.grouped ? Sink(grouped_g) : grads.sub(expert_prefix(e));
    if (n == 0) {
      // Megatron's expert still sees an (empty) input: its weights get zero gradients.
      eg.add("linear_fc1.weight", Mat::Zero(s.fc1_out, h));
      eg.add("linear_fc2.weight", Mat::Zero(h, s.ffn));
      if (s.bias) {
        eg.add("linear_fc1.bias", Mat::Zero(1, s.fc1_out));
        eg.add("linear_fc2.bias", Mat::Zero(1, h));
      }
    } else {
      Mat dy(n, h);
      RowVec db2 = RowVec::Zero(h);
      for (Eigen::Index row = 0; row < n; ++row) {
        const int64_t t = ex.tokens[static_cast<size_t>(row)];
        const int64_t j = ex.slots[static_cast<size_t>(row)];
        if (j < 0) {  // padding row: weight 0
          dy.row(row).setZero();
          continue;
        }
        const double score = round_to(r.scores(t, j), d.scores);
        for (Eigen::Index c = 0; c < h; ++c) dy(row, c) = round_to(round_to(score * dout(t, c), d.combine), d.act);
        // d score: <expert row, d output> (+ <b2, d output_bias>), summed in the combine dtype.
        double ds = ex.mlp.output.row(row).dot(dout.row(t));
        if (ex.mlp.output_bias && d_output_bias) {
          const RowVec dob = rounded(d_output_bias->row(t), d.act);
          ds += ex.mlp.output_bias->dot(dob);
          for (Eigen::Index c = 0; c < h; ++c) db2(c) += round_to(score * dob(c), d.combine);
        }
        d_scores(t, j) = round_to(ds, d.combine);
      }
      const std::optional<RowVec> d_bias =
          ex.mlp.output_bias ? std::optional<RowVec>(rounded(db2, d.act)) : std::nullopt;
      const Mat dxe = mlp_backward(ecfg, ew, ex.input, ex.mlp, dy, d_bias, eg, expert_precision(p));
      for (Eigen::Index row = 0; row < n; ++row) {
        const int64_t t = ex.tokens[static_cast<size_t>(row)];
        const int64_t j = ex.slots[static_cast<size_t>(row)];
        if (j < 0) {
          dx_padding.row(t) += dxe.row(row);  // exactly zero: its output gradient is zero
        } else {
          dx_slots[static_cast<size_t>(j)].row(t) = dxe.row(row);
        }
      }
    }
    if (s.grouped) {
      // Relayout the per-expert gradients into weight1 [h, E*F] / weight2 [E*f, h].
      const Mat& g1 = grouped_g.at("linear_fc1.weight");  // [F, h]
      const Mat& g2 = grouped_g.at("linear_fc2.weight");  // [h, f]
      Mat gw1 = Mat::Zero(s.hidden, s.experts * s.fc1_out), gw2 = Mat::Zero(s.experts * s.ffn, s.hidden);
      double* w1 = gw1.data() + e * s.hidden * s.fc1_out;
      for (int64_t rr = 0; rr < s.hidden; ++rr) {
        for (int64_t c = 0; c < s.fc1_out; ++c) w1[rr * s.fc1_out + c] = g1(c, rr);
      }
      for (int64_t rr = 0; rr < s.ffn; ++rr) {
        for (int64_t c = 0; c < s.hidden; ++c) gw2(e * s.ffn + rr, c) = g2(c, rr);
      }
      grads.add("experts.weight1", gw1);
      grads.add("experts.weight2", gw2);
    }
  }

  // The gather's backward: scatter_add of the rows into [T, h] in pair order.
  Mat dx = Mat::Zero(T, h);
  for (int64_t j = 0; j < s.topk; ++j) dx = rounded(dx + dx_slots[static_cast<size_t>(j)], d.act);
  dx = rounded(dx + dx_padding, d.act);
  const Mat dx_router = moe_router_backward(cfg, w.sub("router"), x, r, d_scores, grads.sub("router"), p);
  return rounded(dx + dx_router, d.act);
}

}  // namespace paritron::ref
