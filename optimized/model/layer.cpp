#include "optimized/model/layer.h"

#include <fmt/format.h>

#include <algorithm>

#include "common/error.h"

namespace paritron::opt {
namespace {

NormArgs norm_args(const TransformerConfig& cfg, bool te_kernel) {
  NormArgs a;
  a.rms = cfg.normalization == "RMSNorm";
  a.eps = cfg.layernorm_epsilon;
  a.zero_centered_gamma = cfg.layernorm_zero_centered_gamma;
  a.te_kernel = te_kernel || a.rms;  // Megatron 0.5.0 has RMSNorm only as TENorm
  return a;
}

std::string path_of(const std::string& prefix, const std::string& module) {
  return prefix.empty() ? module : prefix + module;
}

// The layer's RNG path ("" for a layer case, "layers.N" in a block).
std::string layer_path(const std::string& prefix) {
  return prefix.empty() ? "" : prefix.substr(0, prefix.size() - 1);
}

DropoutArgs bda_args(ModelContext& m, const std::string& purpose, const std::string& prefix,
                     const std::vector<int64_t>& rows) {
  DropoutArgs d;
  if (m.training && m.cfg.hidden_dropout > 0) {
    d.p = m.cfg.hidden_dropout;
    d.key = m.key(purpose, layer_path(prefix));
  }
  d.row_positions = rows;
  return d;
}

// x + dropout(o + ob): the bias-dropout-add of a sub-block (ob, a replicated
// bias, may be absent).
DTensor bias_dropout_add(ModelContext& m, const DropoutArgs& d, const DTensor& o, const std::string& bias_key,
                         const DTensor& residual) {
  DTensor out = m.empty({o.rows(), o.cols()});
  m.be.bias_dropout_add(d, o, m.param_or_null(bias_key), &residual, out);
  return out;
}

// The gradient through a bda into its sub-block's output (and bias).
DTensor bias_dropout_add_backward(ModelContext& m, const DropoutArgs& d, const DTensor& dy,
                                  const std::string& bias_key) {
  DTensor dx = m.empty({dy.rows(), dy.cols()});
  m.be.dropout_backward(d, dy, dx);
  if (m.has_param(bias_key)) {
    Param& b = m.param(bias_key);
    m.be.bias_grad(dx, b.grad, true);
    b.used = true;
  }
  return dx;
}

bool is_moe(const ModelContext& m) { return m.cfg.num_moe_experts.has_value(); }

bool has_cross_attention(const ModelContext& m, const std::string& prefix) {
  return m.has_param(prefix + "cross_attention.linear_q.weight") ||
         m.has_param(prefix + "cross_attention.linear_kv.weight");
}

}  // namespace

DTensor norm_forward(ModelContext& m, const std::string& prefix, const DTensor& x, bool te_kernel, NormSaved& saved) {
  const NormArgs a = norm_args(m.cfg, te_kernel);
  saved.input = x;
  saved.mean = m.empty_f32({x.rows()});  // fp32 statistics (F64 in float64 runs)
  saved.rstd = m.empty_f32({x.rows()});
  DTensor y = m.empty({x.rows(), x.cols()});
  m.be.norm_forward(a, x, m.param(prefix + "weight").value, a.rms ? nullptr : &m.param(prefix + "bias").value, y,
                    saved.mean, saved.rstd);
  return y;
}

DTensor norm_backward(ModelContext& m, const std::string& prefix, const DTensor& dy, bool te_kernel,
                      NormSaved& saved) {
  const NormArgs a = norm_args(m.cfg, te_kernel);
  Param& w = m.param(prefix + "weight");
  Param* b = a.rms ? nullptr : &m.param(prefix + "bias");
  DTensor dx = m.empty({dy.rows(), dy.cols()});
  m.be.norm_backward(a, saved.input, w.value, saved.mean, saved.rstd, dy, dx, w.grad, b ? &b->grad : nullptr);
  w.used = true;
  if (b) b->used = true;
  saved = NormSaved{};
  return dx;
}

DTensor transformer_layer_forward(ModelContext& m, const std::string& prefix, int64_t layer_number, const DTensor& x,
                                  const TokenLayout& tokens, const LayerArgs& args, LayerSaved& saved) {
  const std::vector<int64_t> rows = tokens.hidden_token_rows();
  DTensor hidden = x;
  if (m.has_param(prefix + "self_attention.linear_qkv.weight")) {
    const DTensor a = m.has_param(prefix + "input_layernorm.weight")
                          ? norm_forward(m, prefix + "input_layernorm.", hidden, false, saved.input_norm)
                          : hidden;
    const DTensor o = self_attention_forward(m, prefix + "self_attention.", path_of(prefix, "self_attention"),
                                             layer_number, a, tokens, args, saved.attention);
    hidden = bias_dropout_add(m, bda_args(m, "self_attn_bda", prefix, rows), o,
                              prefix + "self_attention.linear_proj.bias", hidden);
  } else if (m.has_param(prefix + "input_layernorm.weight")) {  // IdentityOp attention, IdentityFuncOp bda
    hidden = norm_forward(m, prefix + "input_layernorm.", hidden, false, saved.input_norm);
  }
  // Cross attention (reference/transformer_layer.cpp): a norm without the
  // module is IdentityOp attention returning the normed input.
  if (has_cross_attention(m, prefix)) {
    const DTensor a = m.has_param(prefix + "pre_cross_attn_layernorm.weight")
                          ? norm_forward(m, prefix + "pre_cross_attn_layernorm.", hidden, false, saved.pre_cross_norm)
                          : hidden;
    const DTensor o = cross_attention_forward(m, prefix + "cross_attention.", path_of(prefix, "cross_attention"),
                                              layer_number, a, tokens, args, saved.cross);
    hidden = bias_dropout_add(m, bda_args(m, "cross_attn_bda", prefix, rows), o,
                              prefix + "cross_attention.linear_proj.bias", hidden);
  } else if (m.has_param(prefix + "pre_cross_attn_layernorm.weight")) {
    hidden = norm_forward(m, prefix + "pre_cross_attn_layernorm.", hidden, false, saved.pre_cross_norm);
  }
  const bool has_mlp = m.has_param(prefix + "mlp.linear_fc1.weight") || m.has_param(prefix + "mlp.router.weight");
  if (has_mlp) {
    const DTensor a = m.has_param(prefix + "pre_mlp_layernorm.weight")
                          ? norm_forward(m, prefix + "pre_mlp_layernorm.", hidden, false, saved.pre_mlp_norm)
                          : hidden;
    DTensor o = is_moe(m) ? moe_forward(m, prefix + "mlp.", path_of(prefix, "mlp"), a, tokens, saved.moe)
                          : mlp_forward(m, prefix + "mlp.", a, saved.mlp);
    if (is_moe(m) && saved.moe.output_bias.defined()) {  // the experts' [T, h] output_bias
      m.be.axpby(1.0f, o, 1.0f, saved.moe.output_bias, o);
    }
    hidden = bias_dropout_add(m, bda_args(m, "mlp_bda", prefix, rows), o, prefix + "mlp.linear_fc2.bias", hidden);
  } else if (m.has_param(prefix + "pre_mlp_layernorm.weight")) {
    hidden = norm_forward(m, prefix + "pre_mlp_layernorm.", hidden, false, saved.pre_mlp_norm);
  }
  return hidden;
}

namespace {

// The backward of one residual sub-block `x + bda(sublayer(norm(x)))`:
// the residual passes d_hidden through and the sub-block adds its part. A
// sub-block without its module (IdentityOp) leaves only the norm, whose
// output replaced the hidden state in the forward.
template <class SubBackward>
DTensor sub_block_backward(ModelContext& m, const std::string& prefix, const std::string& norm, bool has_module,
                           const DropoutArgs& bda, const std::string& bias_key, const DTensor& d_hidden,
                           NormSaved& norm_saved, SubBackward sub_backward) {
  const bool has_norm = m.has_param(prefix + norm + "weight");
  if (!has_module) {
    return has_norm ? norm_backward(m, prefix + norm, d_hidden, false, norm_saved) : d_hidden;
  }
  DTensor d_a = sub_backward(bias_dropout_add_backward(m, bda, d_hidden, bias_key));
  if (has_norm) d_a = norm_backward(m, prefix + norm, d_a, false, norm_saved);
  DTensor sum = m.empty({d_hidden.rows(), d_hidden.cols()});
  m.be.axpby(1.0f, d_hidden, 1.0f, d_a, sum);
  return sum;
}

}  // namespace

DTensor transformer_layer_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                   const TokenLayout& tokens, LayerSaved& saved) {
  const std::vector<int64_t> rows = tokens.hidden_token_rows();
  const bool has_mlp = m.has_param(prefix + "mlp.linear_fc1.weight") || m.has_param(prefix + "mlp.router.weight");
  DTensor d = sub_block_backward(
      m, prefix, "pre_mlp_layernorm.", has_mlp, bda_args(m, "mlp_bda", prefix, rows), prefix + "mlp.linear_fc2.bias",
      dy, saved.pre_mlp_norm, [&](const DTensor& d_o) {
        return is_moe(m) ? moe_backward(m, prefix + "mlp.", d_o, &d_o, tokens, saved.moe)
                         : mlp_backward(m, prefix + "mlp.", d_o, saved.mlp);
      });
  d = sub_block_backward(m, prefix, "pre_cross_attn_layernorm.", has_cross_attention(m, prefix),
                         bda_args(m, "cross_attn_bda", prefix, rows), prefix + "cross_attention.linear_proj.bias", d,
                         saved.pre_cross_norm, [&](const DTensor& d_o) {
                           return cross_attention_backward(m, prefix + "cross_attention.", d_o, saved.cross);
                         });
  return sub_block_backward(m, prefix, "input_layernorm.", m.has_param(prefix + "self_attention.linear_qkv.weight"),
                            bda_args(m, "self_attn_bda", prefix, rows), prefix + "self_attention.linear_proj.bias", d,
                            saved.input_norm, [&](const DTensor& d_o) {
                              return self_attention_backward(m, prefix + "self_attention.", d_o, tokens,
                                                             saved.attention);
                            });
}

std::vector<RecomputeUnit> recompute_units(const TransformerConfig& cfg, size_t num_layers) {
  std::vector<RecomputeUnit> units;
  const bool full = cfg.recompute_granularity == "full" && cfg.recompute_num_layers.value_or(0) > 0;
  const size_t n = full ? static_cast<size_t>(*cfg.recompute_num_layers) : 0;
  const std::string method = cfg.recompute_method.value_or("");
  if (full && method == "uniform") {
    for (size_t l = 0; l < num_layers; l += n) units.push_back({l, std::min(l + n, num_layers), true});
    return units;
  }
  for (size_t l = 0; l < num_layers; ++l) units.push_back({l, l + 1, full && method == "block" && l < n});
  return units;
}

namespace {

// The forward of one recompute unit's layers, from its input.
DTensor unit_forward(ModelContext& m, const StagePlan& plan, const RecomputeUnit& u, const DTensor& x,
                     const TokenLayout& tokens, const LayerArgs& args, StageSaved& saved) {
  DTensor hidden = x;
  for (size_t i = u.begin; i < u.end; ++i) {
    const int64_t l = plan.layers[i];
    hidden = transformer_layer_forward(m, fmt::format("layers.{}.", l), l + 1, hidden, tokens, args, saved.layers[i]);
  }
  return hidden;
}

}  // namespace

DTensor block_stage_forward(ModelContext& m, const StagePlan& plan, const DTensor& x, const TokenLayout& tokens,
                            const LayerArgs& args, StageSaved& saved) {
  saved.layers.assign(plan.layers.size(), LayerSaved{});
  saved.units = recompute_units(m.cfg, plan.layers.size());
  saved.unit_inputs.assign(saved.units.size(), DTensor{});
  saved.args = &args;
  DTensor hidden = x;
  for (size_t u = 0; u < saved.units.size(); ++u) {
    const RecomputeUnit& unit = saved.units[u];
    if (unit.checkpointed) saved.unit_inputs[u] = hidden;
    hidden = unit_forward(m, plan, unit, hidden, tokens, args, saved);
    if (unit.checkpointed) {  // keep only the unit's input: drop its layers' activations
      for (size_t i = unit.begin; i < unit.end; ++i) saved.layers[i] = LayerSaved{};
    }
  }
  if (plan.final_norm) hidden = norm_forward(m, "final_layernorm.", hidden, /*te_kernel=*/true, saved.final_norm);
  return hidden;
}

DTensor block_stage_backward(ModelContext& m, const StagePlan& plan, const DTensor& dy, const TokenLayout& tokens,
                             StageSaved& saved) {
  DTensor d = dy;
  if (plan.final_norm) d = norm_backward(m, "final_layernorm.", d, /*te_kernel=*/true, saved.final_norm);
  if (saved.units.empty()) saved.units = recompute_units(m.cfg, plan.layers.size());  // no checkpointed unit then
  for (size_t u = saved.units.size(); u-- > 0;) {
    const RecomputeUnit& unit = saved.units[u];
    if (unit.checkpointed) {  // re-run the unit's forward from its input, just before its backward
      if (!saved.args || u >= saved.unit_inputs.size() || !saved.unit_inputs[u].defined()) {
        throw Error("block_stage_backward: a checkpointed unit lacks its saved input (forward not run?)");
      }
      unit_forward(m, plan, unit, saved.unit_inputs[u], tokens, *saved.args, saved);
      saved.unit_inputs[u] = DTensor{};
    }
    for (size_t i = unit.end; i-- > unit.begin;) {
      d = transformer_layer_backward(m, fmt::format("layers.{}.", plan.layers[i]), d, tokens, saved.layers[i]);
    }
  }
  saved = StageSaved{};
  return d;
}

}  // namespace paritron::opt
