// The parameter catalogue (common/module_params.h). Mirrors the constructors
// of Megatron-core core_v0.5.0's local-spec modules: attention.py
// (SelfAttention, CrossAttention), mlp.py (MLP), moe/router.py (TopKRouter),
// moe/experts.py (SequentialMLP), moe/moe_layer.py (MoELayer),
// transformer_layer.py, transformer_block.py, fusions/fused_layer_norm.py,
// tensor_parallel/layers.py. Spec: shared/spec/megatron-semantics.md §4, §6,
// §7, §9, §10.4, §13.
#include "common/module_params.h"

#include <algorithm>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "common/error.h"
#include "common/parallel_config.h"
#include "common/transformer_config.h"

namespace paritron {

bool is_module_component(std::string_view component) {
  return std::find(kModuleComponents.begin(), kModuleComponents.end(), component) != kModuleComponents.end();
}

namespace {

// The sizes every component needs, read once from a validated config.
struct Dims {
  int64_t h = 0;   // hidden_size
  int64_t n = 0;   // num_attention_heads
  int64_t g = 0;   // num_query_groups
  int64_t hn = 0;  // kv_channels
  int64_t f = 0;   // ffn_hidden_size
};

Dims dims_of(const TransformerConfig& cfg) {
  if (!cfg.num_query_groups || !cfg.ffn_hidden_size || !cfg.kv_channels) {
    throw Error(
        "module_params: the config's derived defaults (ffn_hidden_size, kv_channels, num_query_groups) are not "
        "filled in; run validate_config first");
  }
  return Dims{cfg.hidden_size, cfg.num_attention_heads, *cfg.num_query_groups, *cfg.kv_channels,
              *cfg.ffn_hidden_size};
}

using Params = std::vector<ParamSpec>;

ParamSpec param(std::string key, Shape shape, Init init, int tp_axis = -1, bool glu_fc1 = false, bool linear = false) {
  ParamSpec p;
  p.key = std::move(key);
  p.shape = std::move(shape);
  p.init = init;
  p.tp_axis = tp_axis;
  p.glu_fc1 = glu_fc1;
  p.linear = linear;
  return p;
}

// Appends `from` with `prefix` on every key (a child module's entries).
void append(Params& out, const std::string& prefix, Params from) {
  for (ParamSpec& p : from) {
    p.key = prefix + p.key;
    out.push_back(std::move(p));
  }
}

// FusedLayerNorm.reset_parameters: weight 1 (0 with zero-centered gamma), bias 0.
// RMSNorm (TENorm / newer local specs) has no bias.
Params norm_params(const TransformerConfig& cfg, int64_t h, bool rms) {
  const Init w = cfg.layernorm_zero_centered_gamma ? Init::kZeros : Init::kOnes;
  Params out{param("weight", {h}, w)};
  if (!rms) out.push_back(param("bias", {h}, Init::kZeros));
  return out;
}

// ColumnParallelLinear(in -> out): weight [out, in] split on dim 0, bias [out]
// split on dim 0, bias always zero-initialised.
Params column_linear(int64_t in, int64_t out, bool bias, Init init, bool glu = false) {
  Params p{param("weight", {out, in}, init, 0, glu, true)};
  if (bias) p.push_back(param("bias", {out}, Init::kZeros, 0, glu, true));
  return p;
}

// RowParallelLinear(in -> out): weight [out, in] split on dim 1, bias [out] replicated.
Params row_linear(int64_t in, int64_t out, bool bias, Init init) {
  Params p{param("weight", {out, in}, init, 1, false, true)};
  if (bias) p.push_back(param("bias", {out}, Init::kZeros, -1, false, true));
  return p;
}

// Attention.__init__ registers linear_proj (output_layer_init_method, bias =
// add_bias_linear) before the subclass registers its input projections.
Params self_attention_params(const TransformerConfig& cfg, const Dims& d) {
  Params out;
  append(out, "linear_proj.", row_linear(d.n * d.hn, d.h, cfg.add_bias_linear, Init::kNormalOutputLayer));
  // linear_qkv: h -> (n + 2g) hn, bias = add_bias_linear or add_qkv_bias (spec §4.2).
  append(out, "linear_qkv.",
         column_linear(d.h, (d.n + 2 * d.g) * d.hn, cfg.add_bias_linear || cfg.add_qkv_bias, Init::kNormal));
  return out;
}

Params cross_attention_params(const TransformerConfig& cfg, const Dims& d) {
  // CrossAttention.__init__: "Group query attention is not currently supported in cross attention."
  if (d.g != d.n) {
    throw Error(fmt::format(
        "cross_attention: num_query_groups ({}) must equal num_attention_heads ({}); Megatron's CrossAttention "
        "raises ValueError for group query attention",
        d.g, d.n));
  }
  Params out;
  append(out, "linear_proj.", row_linear(d.n * d.hn, d.h, cfg.add_bias_linear, Init::kNormalOutputLayer));
  // add_qkv_bias is ignored here: both use bias = add_bias_linear (spec §4.3).
  append(out, "linear_q.", column_linear(d.h, d.n * d.hn, cfg.add_bias_linear, Init::kNormal));
  append(out, "linear_kv.", column_linear(d.h, 2 * d.n * d.hn, cfg.add_bias_linear, Init::kNormal));
  return out;
}

// MLP(ffn): fc1 h -> ffn (2 ffn gated), fc2 ffn -> h (spec §6.1).
Params mlp_params(const TransformerConfig& cfg, const Dims& d, int64_t ffn) {
  Params out;
  const bool glu = cfg.gated_linear_unit;
  append(out, "linear_fc1.", column_linear(d.h, glu ? 2 * ffn : ffn, cfg.add_bias_linear, Init::kNormal, glu));
  append(out, "linear_fc2.", row_linear(ffn, d.h, cfg.add_bias_linear, Init::kNormalOutputLayer));
  return out;
}

int64_t num_experts(const TransformerConfig& cfg, std::string_view component) {
  if (!cfg.num_moe_experts) {
    throw Error(fmt::format("{}: num_moe_experts is not set; a MoE component needs experts", component));
  }
  return *cfg.num_moe_experts;
}

// TopKRouter: weight [E, h], init_method, drawn even without perform_initialization; no bias.
Params router_params(const TransformerConfig& cfg, const Dims& d) {
  return {param("weight", {num_experts(cfg, "moe_router"), d.h}, Init::kNormal)};
}

// MoELayer registers router, then experts (SequentialMLP: local_experts.<i>).
// Globally (EP = 1) local_experts.<i> is expert i.
Params moe_layer_params(const TransformerConfig& cfg, const Dims& d) {
  if (cfg.moe_grouped_gemm) {
    throw Error(
        "moe_layer: moe_grouped_gemm (GroupedMLP) is not catalogued: its weight1 [h, E_loc*F/tp] / weight2 "
        "[E_loc*f/tp, h] are per-rank packings with no TP=1 layout (Megatron 0.5.0 cannot checkpoint it either)");
  }
  const int64_t e_count = num_experts(cfg, "moe_layer");
  Params out;
  append(out, "router.", router_params(cfg, d));
  const int64_t ffn = expert_ffn_hidden_size(cfg);
  for (int64_t e = 0; e < e_count; ++e) {
    Params expert = mlp_params(cfg, d, ffn);
    for (ParamSpec& p : expert) p.expert = e;
    append(out, fmt::format("experts.local_experts.{}.", e), std::move(expert));
  }
  return out;
}

// TransformerLayer children in registration order: input_layernorm,
// self_attention, (pre_cross_attn_layernorm, cross_attention: IdentityOp in
// the GPT spec, no parameters), pre_mlp_layernorm, mlp.
Params layer_params(const TransformerConfig& cfg, const Dims& d) {
  const bool rms = cfg.normalization == "RMSNorm";
  Params out;
  append(out, "input_layernorm.", norm_params(cfg, d.h, rms));
  append(out, "self_attention.", self_attention_params(cfg, d));
  append(out, "pre_mlp_layernorm.", norm_params(cfg, d.h, rms));
  append(out, "mlp.", cfg.num_moe_experts ? moe_layer_params(cfg, d) : mlp_params(cfg, d, d.f));
  return out;
}

Params block_params(const TransformerConfig& cfg, const Dims& d) {
  Params out;
  const Params layer = layer_params(cfg, d);
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    Params copy = layer;
    for (ParamSpec& p : copy) p.layer = i;
    append(out, fmt::format("layers.{}.", i), std::move(copy));
  }
  // final_layernorm is a TENorm in 0.5.0 (even with the local spec): LayerNorm
  // or RMSNorm according to `normalization`.
  append(out, "final_layernorm.", norm_params(cfg, d.h, cfg.normalization == "RMSNorm"));
  return out;
}

}  // namespace

int64_t expert_ffn_hidden_size(const TransformerConfig& cfg) {
  if (cfg.moe_ffn_hidden_size) return *cfg.moe_ffn_hidden_size;
  if (!cfg.ffn_hidden_size) throw Error("expert_ffn_hidden_size: ffn_hidden_size is not filled in; run validate_config");
  return *cfg.ffn_hidden_size;
}

std::vector<ParamSpec> module_params(std::string_view component, const TransformerConfig& cfg) {
  if (!is_module_component(component)) {
    throw Error(fmt::format("module_params: unknown component \"{}\" (known: {})", component,
                            fmt::join(kModuleComponents, ", ")));
  }
  const Dims d = dims_of(cfg);
  if (component == "layernorm") return norm_params(cfg, d.h, false);
  if (component == "rmsnorm") return norm_params(cfg, d.h, true);
  if (component == "self_attention") return self_attention_params(cfg, d);
  if (component == "cross_attention") return cross_attention_params(cfg, d);
  if (component == "mlp") return mlp_params(cfg, d, d.f);
  if (component == "moe_router") return router_params(cfg, d);
  if (component == "moe_layer") return moe_layer_params(cfg, d);
  if (component == "transformer_layer") return layer_params(cfg, d);
  return block_params(cfg, d);
}

std::vector<ParamSpec> cross_attention_layer_params(const TransformerConfig& cfg, std::string_view layer_prefix) {
  std::vector<ParamSpec> out;
  if (cfg.num_query_groups.value_or(cfg.num_attention_heads) != cfg.num_attention_heads) return out;
  const std::string layer(layer_prefix);
  for (ParamSpec spec : module_params(cfg.normalization == "RMSNorm" ? "rmsnorm" : "layernorm", cfg)) {
    spec.key = layer + "pre_cross_attn_layernorm." + spec.key;
    out.push_back(std::move(spec));
  }
  for (ParamSpec spec : module_params("cross_attention", cfg)) {
    spec.key = layer + "cross_attention." + spec.key;
    out.push_back(std::move(spec));
  }
  return out;
}

TpShard local_shard_spec(const ParamSpec& spec, int64_t tp_size, int64_t tp_rank) {
  if (tp_size < 1 || tp_rank < 0 || tp_rank >= tp_size) {
    throw Error(fmt::format("local_shard_spec({}): tensor-parallel rank {} outside size {}", spec.key, tp_rank, tp_size));
  }
  TpShard shard;
  shard.local_shape = spec.shape;
  if (spec.tp_axis < 0) {
    shard.ranges.push_back({0, spec.shape.empty() ? 1 : spec.shape[0]});
    return shard;
  }
  if (static_cast<size_t>(spec.tp_axis) >= spec.shape.size()) {
    throw Error(fmt::format("local_shard_spec({}): tp_axis {} outside shape {}", spec.key, spec.tp_axis,
                            shape_string(spec.shape)));
  }
  shard.axis = spec.tp_axis;
  const int64_t extent = spec.shape[static_cast<size_t>(spec.tp_axis)];
  if (spec.glu_fc1) {
    // [gate; up], each half split over the ranks; the rank keeps [gate_r; up_r] (spec §6.4).
    if (extent % (2 * tp_size) != 0) {
      throw Error(fmt::format("local_shard_spec({}): the gated fc1 extent {} is not divisible by 2 * tp = {}",
                              spec.key, extent, 2 * tp_size));
    }
    const int64_t half = extent / 2, part = half / tp_size;
    shard.ranges = {{tp_rank * part, (tp_rank + 1) * part}, {half + tp_rank * part, half + (tp_rank + 1) * part}};
    shard.local_shape[static_cast<size_t>(spec.tp_axis)] = 2 * part;
    return shard;
  }
  if (extent % tp_size != 0) {
    throw Error(fmt::format("local_shard_spec({}): axis {} extent {} is not divisible by tp = {}", spec.key,
                            spec.tp_axis, extent, tp_size));
  }
  const int64_t part = extent / tp_size;
  shard.ranges = {{tp_rank * part, (tp_rank + 1) * part}};
  shard.local_shape[static_cast<size_t>(spec.tp_axis)] = part;
  return shard;
}

TpShard local_shard_spec(const ParamSpec& spec, const ParallelConfig& pc, int64_t tp_rank) {
  return local_shard_spec(spec, pc.tensor_model_parallel_size, tp_rank);
}

}  // namespace paritron
