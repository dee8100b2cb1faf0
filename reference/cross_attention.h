// CrossAttention: queries from hidden_states, keys and values from
// key_value_states (the encoder context), core attention, linear_proj with
// its bias returned, forward and backward.
//
// Megatron: megatron/core/transformer/attention.py (Attention.forward,
// CrossAttention.__init__ / get_query_key_value_tensors) at core_v0.5.0.
// Spec §4.1, §4.3, §4.4, §14 #3, #48:
//   q = x W_q^T + b_q                           [sq*b, n*hn]
//   kv = c W_kv^T + b_kv                        [sk*b, 2*n*hn], viewed [sk, b, n, 2*hn]:
//     head j's channels are [k_j | v_j], so k head j channel d = column
//     j*2*hn + d and v = j*2*hn + hn + d (NOT [all K | all V]);
//   context = DotProductAttention(q, k, v, attention_mask)
//   output = context W_proj^T, output_bias = b_proj (skip_bias_add)
// Requires num_query_groups == num_attention_heads (CrossAttention raises
// "Group query attention is not currently supported in cross attention").
// linear_q / linear_kv / linear_proj have biases iff add_bias_linear
// (add_qkv_bias is ignored by cross attention, spec §14 #48).
//
// Parameters (w: "layers.0.cross_attention."): linear_q.weight [n*hn, h],
// linear_kv.weight [2*n*hn, h], linear_proj.weight [h, n*hn] and, with
// add_bias_linear, their biases. Mask: the caller's context mask; the mask
// type is the module's (padding by default: a passed mask is used as is, no
// mask means none). RoPE is not applied (the layer never passes it to cross
// attention, spec §4.3).
//
// Taps (local names): "linear_q.output", "linear_kv.output",
// "core_attention.query"/"key"/"value"/"scale_mask_softmax.output"/"output",
// "output". Core attention runs under RunContext path "<path>.core_attention".
//
// Left out: the inference KV cache, TP/SP communication.
#pragma once

#include <optional>

#include "reference/core.h"
#include "reference/dot_product_attention.h"
#include "reference/masks.h"

namespace paritron::ref {

struct CrossAttentionForward {
  Mat query;     // [sq*b, n*hn]: linear_q output
  Mat mixed_kv;  // [sk*b, 2*n*hn]: linear_kv output
  Mat key;       // [sk*b, n*hn]
  Mat value;     // [sk*b, n*hn]
  DotProductAttentionForward core;
  Mat output;                         // [sq*b, h]: without the linear_proj bias
  std::optional<RowVec> output_bias;  // [h]
};

// hidden_states [sq*b, h], key_value_states [sk*b, h]; attention_mask
// broadcastable to [b, n, sq, sk].
CrossAttentionForward cross_attention_forward(const TransformerConfig& cfg, const Params& w,
                                              const Mat& hidden_states, const Mat& key_value_states, int64_t b,
                                              AttnMaskType mask_type,
                                              const std::optional<AttentionMask>& attention_mask,
                                              const Precision& p, const RunContext& ctx, const Sink& taps = {});

struct CrossAttentionGrads {
  Mat d_hidden_states;     // [sq*b, h]
  Mat d_key_value_states;  // [sk*b, h]
};

CrossAttentionGrads cross_attention_backward(const TransformerConfig& cfg, const Params& w,
                                             const Mat& hidden_states, const Mat& key_value_states, int64_t b,
                                             const CrossAttentionForward& fwd, const Mat& d_output,
                                             const std::optional<RowVec>& d_output_bias, const Sink& grads,
                                             const Precision& p);

// The per-head [k_j | v_j] layout of linear_kv's output, and its inverse.
void split_kv(const Mat& mixed_kv, const AttentionDims& d, Mat& key, Mat& value);
Mat merge_kv(const Mat& key, const Mat& value, const AttentionDims& d);

}  // namespace paritron::ref
