// TransformerLayer: norm -> self attention -> bias-dropout-add -> (norm ->
// cross attention -> bda) -> norm -> MLP or MoE -> bda, forward and backward.
//
// Megatron: megatron/core/transformer/transformer_layer.py
// (TransformerLayer.forward), with the submodules of
// megatron/core/models/gpt/gpt_layer_specs.py (get_gpt_layer_local_spec).
// Spec §8.1-8.3:
//   residual = x;              a = input_layernorm(x)
//   (o, ob) = self_attention(a, attention_mask, rotary_pos_emb)
//   x = residual + dropout(o + ob)          (self_attn_bda)
//   residual = x;              c = pre_cross_attn_layernorm(x)
//   (o, ob) = cross_attention(c, context_mask, context);  x = residual + dropout(o + ob)
//   residual = x;              m = pre_mlp_layernorm(x)
//   (o, ob) = mlp(m);          x = residual + dropout(o + ob)   (mlp_bda)
// The residual is always the sub-block's input: megatron/core never reads
// apply_residual_connection_post_layernorm (spec §14 #21). A submodule that
// the layer spec leaves out is IdentityOp, and its bda IdentityFuncOp: an
// absent cross attention is an exact no-op (no residual added twice).
//
// Deliberately left out: inference KV caches, packed sequences, recompute
// (numerically identical, spec §8.5), fp32_residual_connection (it only
// changes the embedding's output dtype).
#pragma once

#include <optional>

#include "reference/bias_dropout_add.h"
#include "reference/core.h"
#include "reference/cross_attention.h"
#include "reference/masks.h"
#include "reference/mlp.h"
#include "reference/moe_layer.h"
#include "reference/norm.h"
#include "reference/self_attention.h"

namespace paritron::ref {

// Which submodules the layer has (ModuleSpec as data). layer_spec_for()
// reads it off the parameters present: a submodule with no parameters is an
// IdentityOp, as in a spec that leaves it out.
struct LayerSpec {
  bool input_layernorm = true;
  bool self_attention = true;
  bool pre_cross_attn_layernorm = false;
  bool cross_attention = false;
  bool pre_mlp_layernorm = true;
  bool mlp = true;  // MLP, or MoELayer when cfg.num_moe_experts is set

  bool any() const {
    return input_layernorm || self_attention || pre_cross_attn_layernorm || cross_attention || pre_mlp_layernorm || mlp;
  }
};
LayerSpec layer_spec_for(const Params& w);

// The layer's forward arguments. Masks: true = masked out. rotary_pos_emb is
// the angle table [s, rot_dim] (RotaryEmbedding's [s, 1, 1, rot_dim]).
struct LayerInputs {
  int64_t b = 1;                               // micro-batch: rows are s*b tokens
  AttnMaskType self_attn_mask_type = AttnMaskType::causal;   // the GPT specs' self attention
  std::optional<AttentionMask> attention_mask;
  std::optional<Mat> context;                  // [sk*b, h] encoder output for cross attention
  AttnMaskType cross_attn_mask_type = AttnMaskType::padding;  // CrossAttention's default
  std::optional<AttentionMask> context_mask;
  std::optional<Mat> rotary_pos_emb;
};

struct TransformerLayerForward {
  LayerSpec spec;
  Mat input;                                         // [T, h]
  std::optional<NormForward> input_layernorm;
  std::optional<SelfAttentionForward> self_attention;
  std::optional<BiasDropoutAddForward> self_attn_bda;
  Mat after_self_attention;                          // [T, h]: the cross-attention residual
  std::optional<NormForward> pre_cross_attn_layernorm;
  std::optional<CrossAttentionForward> cross_attention;
  std::optional<BiasDropoutAddForward> cross_attn_bda;
  Mat after_cross_attention;                         // [T, h]: the MLP residual
  std::optional<NormForward> pre_mlp_layernorm;
  std::optional<MlpForward> mlp;
  std::optional<MoeLayerForward> moe;
  std::optional<BiasDropoutAddForward> mlp_bda;
  Mat output;                                        // [T, h]
};

// w: the layer's view ("" for a layer case, "layers.3." in a block).
// ctx.layer_number is the number the attention modules see (spec §8.3).
// Taps: input_layernorm, self_attention.output, self_attention.output_bias,
// self_attention.core_attention.{query,key,value,output}, self_attn_bda,
// pre_cross_attn_layernorm, cross_attention.output, cross_attn_bda,
// pre_mlp_layernorm, mlp.output, mlp.output_bias, mlp_bda.
TransformerLayerForward transformer_layer_forward(const TransformerConfig& cfg, const Params& w, const Mat& x,
                                                  const LayerInputs& in, const Precision& p, const RunContext& ctx,
                                                  const Sink& taps = {});

struct TransformerLayerGrads {
  Mat hidden_states;           // [T, h]
  std::optional<Mat> context;  // [sk*b, h] when cross attention ran
};

// Gradients of sum(output * d_output) (+ the MoE losses with scale 1).
TransformerLayerGrads transformer_layer_backward(const TransformerConfig& cfg, const Params& w,
                                                 const LayerInputs& in, const TransformerLayerForward& fwd,
                                                 const Mat& d_output, const Sink& grads, const Precision& p);

}  // namespace paritron::ref
