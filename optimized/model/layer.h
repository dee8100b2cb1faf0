// TransformerLayer and TransformerBlock (one pipeline stage's layers, then the
// final norm), forward and backward, on SP-local hidden states.
//
// Megatron: megatron/core/transformer/transformer_layer.py,
// transformer_block.py; spec §8; reference/transformer_layer.h and
// transformer_block.h (the residual is always the sub-block's input; a
// submodule without parameters is IdentityOp).
//   residual = x;  a = input_layernorm(x);  (o, ob) = self_attention(a)
//   x = residual + dropout(o + ob)                       self_attn_bda
//   residual = x;  c = pre_cross_attn_layernorm(x); (o, ob) = cross_attention(c, context)
//   x = residual + dropout(o + ob)                       cross_attn_bda (encoder-decoder layers;
//                                                        IdentityOp in the GPT specs)
//   residual = x;  m = pre_mlp_layernorm(x); (o, ob) = mlp(m)   (MoE when num_moe_experts)
//   x = residual + dropout(o + ob)                       mlp_bda
// Under sequence parallelism norms and bias-dropout-add run on the SP-local
// rows, so the norms' and the row-parallel biases' gradients are partial
// sums, all-reduced over TP after the backward (GradReduce::kTensorIfSequence).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "optimized/model/attention.h"
#include "optimized/model/context.h"
#include "optimized/model/mlp.h"
#include "optimized/model/moe.h"

namespace paritron::opt {

struct NormSaved {
  DTensor input, mean, rstd;
};
// prefix: the norm's keys ("input_layernorm."); te_kernel: TENorm (1 + w in fp32).
DTensor norm_forward(ModelContext& m, const std::string& prefix, const DTensor& x, bool te_kernel, NormSaved& saved);
DTensor norm_backward(ModelContext& m, const std::string& prefix, const DTensor& dy, bool te_kernel,
                      NormSaved& saved);

struct LayerSaved {
  NormSaved input_norm, pre_cross_norm, pre_mlp_norm;
  AttentionSaved attention;
  CrossAttentionSaved cross;
  MlpSaved mlp;
  MoeSaved moe;
};

// prefix: "" (a layer case) or "layers.N."; layer_number: 1-based global.
DTensor transformer_layer_forward(ModelContext& m, const std::string& prefix, int64_t layer_number, const DTensor& x,
                                  const TokenLayout& tokens, const LayerArgs& args, LayerSaved& saved);
DTensor transformer_layer_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                   const TokenLayout& tokens, LayerSaved& saved);

// One pipeline stage (model chunk) of a transformer_block case: its global
// layers in order, and the final norm when it is the last stage and the case
// has final_layernorm weights.
struct StagePlan {
  std::vector<int64_t> layers;  // 0-based global layer indices
  bool final_norm = false;
};
// Activation recompute (Megatron's TransformerBlock._checkpointed_forward,
// config recompute_granularity "full"): the stage's layers fall into units;
// a checkpointed unit keeps only its input hidden states in the forward (its
// layers' saved activations are dropped as soon as the unit has run) and
// re-runs its forward from that input just before its backward. Units:
//   "uniform": consecutive groups of recompute_num_layers layers of the chunk,
//              every group checkpointed;
//   "block":   each of the chunk's first recompute_num_layers layers
//              checkpointed on its own, the rest not;
//   otherwise (none, "selective"): no layer checkpointed.
// The re-run draws the same dropout masks (counter-based, keyed by the
// module's path and the tokens' global positions) and, with fp8, the same
// amaxes, so recompute changes no number. "selective" recomputes core
// attention instead (attention.cpp, AttentionSaved::recompute).
struct RecomputeUnit {
  size_t begin = 0, end = 0;  // indices into StagePlan::layers
  bool checkpointed = false;
};
std::vector<RecomputeUnit> recompute_units(const TransformerConfig& cfg, size_t num_layers);

struct StageSaved {
  std::vector<LayerSaved> layers;
  NormSaved final_norm;
  std::vector<RecomputeUnit> units;
  std::vector<DTensor> unit_inputs;  // per unit: its input when checkpointed, else undefined
  const LayerArgs* args = nullptr;   // the forward's arguments, for re-running checkpointed units
};
DTensor block_stage_forward(ModelContext& m, const StagePlan& plan, const DTensor& x, const TokenLayout& tokens,
                            const LayerArgs& args, StageSaved& saved);
DTensor block_stage_backward(ModelContext& m, const StagePlan& plan, const DTensor& dy, const TokenLayout& tokens,
                             StageSaved& saved);

}  // namespace paritron::opt
