// SelfAttention: linear_qkv with Megatron's per-query-group fused layout,
// RoPE on q and k, core attention, linear_proj (bias returned, not added),
// forward and backward.
//
// Megatron: megatron/core/transformer/attention.py (Attention.forward,
// SelfAttention.__init__ / get_query_key_value_tensors) at core_v0.5.0.
// Spec §4.1, §4.2, §4.4, §14 #1, #14, #19. With r = n/g:
//   mixed = x W_qkv^T + b_qkv                      [s*b, (n + 2g)*hn]
//   group G's channels: [q heads G*r .. G*r+r-1 | k_G | v_G], each hn wide, so
//   q head j channel d = mixed column (j / r)*(r+2)*hn + (j % r)*hn + d,
//   key G = G*(r+2)*hn + r*hn + d, value G = G*(r+2)*hn + (r+1)*hn + d
//   (NOT [all Q | all K | all V]);
//   q, k = apply_rotary_pos_emb(q, k; freqs)        (never v; after the split)
//   context = DotProductAttention(q, k, v, mask)    [s*b, n*hn]
//   output = context W_proj^T, output_bias = b_proj (skip_bias_add)
// linear_qkv has a bias iff add_bias_linear or add_qkv_bias; linear_proj iff
// add_bias_linear.
//
// Parameters (w is the module's view, e.g. "layers.0.self_attention."):
// linear_qkv.weight [(n+2g)*hn, h], linear_qkv.bias [(n+2g)*hn],
// linear_proj.weight [h, n*hn], linear_proj.bias [h]. A bias the config says
// the module has is required; one it says the module lacks is an error (the
// weights belong to another config).
//
// Taps (local names): "linear_qkv.output" (mixed, [s*b, (n+2g)*hn]),
// "core_attention.query"/"key"/"value" (after RoPE, [s*b, heads*hn]),
// "core_attention.scale_mask_softmax.output", "core_attention.output" (the
// context), "output" ([s*b, h], without the bias).
// The core attention runs under RunContext path "<path>.core_attention".
//
// Left out: the inference KV cache, packed sequences, qk_layernorm (a newer
// field: rejected with an Error), selective recomputation (bit-identical,
// spec §8.5), TP/SP communication.
#pragma once

#include <optional>

#include "reference/core.h"
#include "reference/dot_product_attention.h"
#include "reference/masks.h"

namespace paritron::ref {

struct SelfAttentionForward {
  Mat mixed_qkv;  // [s*b, (n+2g)*hn]: linear_qkv output (bias added)
  Mat query;      // [s*b, n*hn]: after RoPE
  Mat key;        // [s*b, g*hn]: after RoPE
  Mat value;      // [s*b, g*hn]
  DotProductAttentionForward core;   // core.output is the context [s*b, n*hn]
  Mat output;                        // [s*b, h]: linear_proj output without its bias
  std::optional<RowVec> output_bias; // [h]: linear_proj.bias (nullopt without add_bias_linear)
};

// hidden_states [s*b, h] (rows (s, b) row-major); rotary_pos_emb the angle
// table [s, rot_dim] (RotaryEmbedding's [s, 1, 1, rot_dim]), used for both q
// and k; attention_mask broadcastable to [b, n, s, s]. mask_type: the
// module's attn_mask_type (causal in the GPT specs, padding by default).
SelfAttentionForward self_attention_forward(const TransformerConfig& cfg, const Params& w,
                                            const Mat& hidden_states, int64_t b, AttnMaskType mask_type,
                                            const std::optional<AttentionMask>& attention_mask,
                                            const std::optional<Mat>& rotary_pos_emb, const Precision& p,
                                            const RunContext& ctx, const Sink& taps = {});

// Returns d hidden_states. d_output_bias is the gradient reaching
// output_bias (absent when nothing consumes it: linear_proj.bias then gets a
// zero gradient); weight gradients go to grads under w's keys.
Mat self_attention_backward(const TransformerConfig& cfg, const Params& w, const Mat& hidden_states, int64_t b,
                            const std::optional<Mat>& rotary_pos_emb, const SelfAttentionForward& fwd,
                            const Mat& d_output, const std::optional<RowVec>& d_output_bias, const Sink& grads,
                            const Precision& p);

// The fused-layout helpers (exposed for tests and the optimized side's
// cross-checks): split mixed [T, (n+2g)*hn] into q [T, n*hn], k, v [T, g*hn],
// and the inverse (assembling d_mixed from dq, dk, dv).
void split_qkv(const Mat& mixed, const AttentionDims& d, Mat& query, Mat& key, Mat& value);
Mat merge_qkv(const Mat& query, const Mat& key, const Mat& value, const AttentionDims& d);

// linear_proj's part, shared with cross attention: out = context W^T and the
// returned bias; backward adds the weight gradient and the bias gradient
// (d_output_bias or zero) and returns d_context.
Mat attention_proj_forward(const TransformerConfig& cfg, const Params& w, const Mat& context, const Precision& p,
                           std::optional<RowVec>* output_bias);
Mat attention_proj_backward(const TransformerConfig& cfg, const Params& w, const Mat& context, const Mat& d_output,
                            const std::optional<RowVec>& d_output_bias, const Sink& grads, const Precision& p);

// The bias rule of an attention projection: requires `<linear>.bias` [n]
// when has_bias, rejects it otherwise (Error naming the key and the flags).
void check_linear_params(const Params& w, std::string_view linear, int64_t out, int64_t in, bool has_bias,
                         std::string_view bias_rule);

}  // namespace paritron::ref
