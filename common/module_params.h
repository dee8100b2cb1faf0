// The parameter catalogue: for one Megatron-core module built with the GPT
// local spec (get_gpt_layer_local_spec, core_v0.5.0), the parameters of its
// state_dict in Megatron's order, with their global (TP = 1) shapes, their
// init rule and their tensor-parallel layout.
//
// Mirrors megatron/core/transformer/{attention,mlp,transformer_layer,
// transformer_block}.py, moe/{router,experts,moe_layer}.py,
// tensor_parallel/layers.py (ColumnParallelLinear / RowParallelLinear) and
// fusions/fused_layer_norm.py at core_v0.5.0;
// shared/spec/megatron-semantics.md §4 (attention shapes), §6 (MLP, §6.4 the
// gated fc1 shard), §7 (norms), §9 (MoE), §10.4 (TP layout), §13 (init).
//
// Order: torch's state_dict order, i.e. a module's own parameters, then its
// children in registration order. So self_attention lists linear_proj BEFORE
// linear_qkv (Attention.__init__ registers core_attention and linear_proj,
// SelfAttention.__init__ registers linear_qkv afterwards); cross_attention lists
// linear_proj, linear_q, linear_kv.
//
// Left out on purpose: the `_extra_state` entries (value None) that
// ColumnParallelLinear / RowParallelLinear add to their state_dict; they are
// not parameters (checkpoint_sharding.h models them as ShardedObjects).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/tensor.h"

namespace paritron {

struct TransformerConfig;
struct ParallelConfig;

// The components module_params() knows, by Paritron's name:
//   layernorm          FusedLayerNorm (weight, bias)
//   rmsnorm            RMSNorm (weight; Megatron 0.5.0 has it only as TENorm)
//   self_attention     SelfAttention with ColumnParallelLinear/RowParallelLinear
//   cross_attention    CrossAttention (needs num_query_groups == num_attention_heads)
//   mlp                MLP
//   moe_router         TopKRouter
//   moe_layer          MoELayer with SequentialMLP experts
//   transformer_layer  TransformerLayer (mlp is a MoELayer when num_moe_experts is set)
//   transformer_block  TransformerBlock: all num_layers layers, then final_layernorm
inline constexpr std::array<std::string_view, 9> kModuleComponents = {
    "layernorm", "rmsnorm",  "self_attention",    "cross_attention",  "mlp",
    "moe_router", "moe_layer", "transformer_layer", "transformer_block"};
bool is_module_component(std::string_view component);

// How Megatron initialises a parameter (spec §13).
enum class Init {
  kNormal,             // init_method: N(0, init_method_std^2)
  kNormalOutputLayer,  // output_layer_init_method: N(0, output_layer_init_std(cfg)^2)
  kZeros,
  kOnes,
};

struct ParamSpec {
  std::string key;  // state_dict key relative to the component, e.g. "linear_qkv.weight"
  Shape shape;      // global (unsharded, TP = 1, EP = 1) shape
  Init init = Init::kZeros;
  // Axis split over the tensor-parallel ranks: -1 replicated, 0 (column-parallel
  // weight and bias), 1 (row-parallel weight).
  int tp_axis = -1;
  // The gated (GLU) linear_fc1 weight or bias: a TP rank holds [gate_r; up_r],
  // two row blocks of the global [gate; up] tensor (spec §6.4, §10.4).
  bool glu_fc1 = false;
  // A parameter of a ColumnParallelLinear / RowParallelLinear: Megatron leaves
  // it unwritten when perform_initialization is false (norms and the router
  // are initialised regardless).
  bool linear = false;
  std::optional<int64_t> expert;  // global expert index (moe_layer experts)
  std::optional<int64_t> layer;   // 0-based global layer index (transformer_block layers)

  bool operator==(const ParamSpec&) const = default;
};

// The parameters of `component` for a config whose derived defaults are filled
// in (validate_config / check_config). Throws Error for an unknown component,
// an unvalidated config, a component the config cannot build (cross attention
// with num_query_groups != num_attention_heads, MoE without num_moe_experts)
// and for moe_grouped_gemm (GroupedMLP is not catalogued: its weights are
// per-rank packed [h, E_loc*F/tp] views with no TP = 1 layout of their own).
std::vector<ParamSpec> module_params(std::string_view component, const TransformerConfig& cfg);

// Expert ffn width: moe_ffn_hidden_size when set, else ffn_hidden_size.
int64_t expert_ffn_hidden_size(const TransformerConfig& cfg);

// Where the Transformer Engine spec keeps the layer norms the local spec has
// as modules (TELayerNormColumnParallelLinear fuses them into the next linear;
// the local spec's sharded_state_dict_keys_map renames to these keys, spec
// §11.5): {TE key prefix within a layer, local key prefix}.
inline constexpr std::array<std::pair<std::string_view, std::string_view>, 2> kTeNormKeyPrefixes = {{
    {"self_attention.linear_qkv.layer_norm_", "input_layernorm."},
    {"mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."},
}};

// The submodules an encoder-decoder layer adds to the GPT layer (spec §8.1;
// the GPT specs leave them IdentityOp): pre_cross_attn_layernorm.* (LayerNorm
// or RMSNorm by cfg.normalization) and cross_attention.*, keys prefixed with
// layer_prefix ("" for a layer, "layers.3." in a block). Empty when the config
// has GQA, which Megatron's CrossAttention rejects.
std::vector<ParamSpec> cross_attention_layer_params(const TransformerConfig& cfg, std::string_view layer_prefix);

// [begin, end) along one axis of the global tensor.
struct IndexRange {
  int64_t begin = 0;
  int64_t end = 0;
  bool operator==(const IndexRange&) const = default;
};

// What one tensor-parallel rank holds of a parameter: the ranges of the
// global tensor along `axis`, concatenated in this order along that axis
// (every other axis whole). axis = -1 means the whole tensor (replicated).
struct TpShard {
  int axis = -1;
  std::vector<IndexRange> ranges;  // one range; two for glu_fc1 (gate rows, then up rows)
  Shape local_shape;
  bool operator==(const TpShard&) const = default;
};

// The shard of tp_rank out of tp_size ranks (ColumnParallelLinear splits dim
// 0, RowParallelLinear dim 1, spec §10.2-10.4). Throws Error when tp_rank is
// out of range or the split axis (half of it for glu_fc1) is not divisible by
// tp_size.
TpShard local_shard_spec(const ParamSpec& spec, int64_t tp_size, int64_t tp_rank);
TpShard local_shard_spec(const ParamSpec& spec, const ParallelConfig& pc, int64_t tp_rank);

}  // namespace paritron
