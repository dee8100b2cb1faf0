// DotProductAttention ("core attention"): scores, masked softmax, attention
// dropout and the context, forward and backward, with grouped-query
// attention.
//
// Megatron: megatron/core/transformer/dot_product_attention.py
// (DotProductAttention.__init__/forward; softmax_scale and window_size from
// core_v0.19.0). Spec §3, §2.3, §14 #2, #8, #9. Per batch element e and
// query head j (group G = j / (np/ng), repeat_interleave: spec §14 #2):
//   S = alpha * Q_j K_G^T                  [sq, sk]  (baddbmm: alpha inside the GEMM)
//   P = FusedScaleMaskSoftmax(S, mask)     scale = coeff (fused_softmax.h)
//   P' = dropout(P, attention_dropout)     training only; element index = the
//                                          flat index in [b, np, sq, sk]
//   C_j = P' V_G                           [sq, hn] -> output [sq*b, np*hn], channel j*hn + d
// Scale: 0.5.0: norm_factor = sqrt(hn); with apply_query_key_layer_scaling
// coeff = L (= max(1, RunContext::layer_number)) and norm_factor *= L;
// alpha = 1 / norm_factor, and the softmax multiplies by coeff again before
// masking (divide-then-multiply, spec §3 step 3). Newer softmax_scale (set):
// alpha = softmax_scale, divided by L under layer scaling (core_v0.19.0
// `self.softmax_scale /= coeff`); unset it is 0.5.0's 1/(sqrt(hn) L).
// Dropout masks come from RunContext::dropout(purpose "dropout") with the
// module's path, so the key is "dropout.<path of core_attention>".
//
// Precision: the two GEMMs accumulate in fp32 and write p.dtype; the
// softmax as fused_softmax.h; dropout's product rounded to p.dtype. Backward
// follows autograd: baddbmm's input gradients are bmm results rounded, then
// multiplied by alpha and rounded again (maybe_multiply); the GQA sums over
// a group's query heads (repeat_interleave's backward) round once.
//
// Taps (under the caller's prefix, i.e. the module's own names): "query",
// "key", "value" (inputs, [s*b, heads*hn]), "scale_mask_softmax.output"
// (probs [b*np*sq, sk] = [b, np, sq, sk]), "attention_dropout.output" (when
// dropout is active), "output" (the context [sq*b, np*hn]).
//
// Left out: packed sequences (thd), context parallelism, attention_bias,
// softmax_type offsets, the KV cache, TE's flash/fused backends (-inf
// masking: fully masked rows differ there, spec §3).
#pragma once

#include <optional>

#include "reference/core.h"
#include "reference/fused_softmax.h"
#include "reference/masks.h"

namespace paritron::ref {

// Head geometry from a config: np = num_attention_heads, ng =
// num_query_groups (default np), hn = kv_channels (default h // np). Throws
// Error when np is not a multiple of ng or a value is not positive.
struct AttentionDims {
  int64_t np = 0, ng = 0, hn = 0;
  int64_t heads_per_group() const { return np / ng; }
};
AttentionDims attention_dims(const TransformerConfig& cfg);

// alpha (the baddbmm scale) and the softmax's coeff for layer `layer_number`.
struct AttentionScale {
  double alpha = 1.0;
  std::optional<double> coeff;
};
AttentionScale attention_scale(const TransformerConfig& cfg, int64_t layer_number);

struct DotProductAttentionForward {
  Mat output;         // [sq*b, np*hn]: the context, head-major channels
  Mat probs;          // [b*np*sq, sk]: softmax output in p.dtype (before dropout)
  Mat probs_softmax;  // the same in the softmax dtype when it differs from p.dtype; else empty
  Mat dropout_scale;  // [b*np*sq, sk]: 0 or 1/(1-p) when dropout ran; else empty
  Mat probs_dropped;  // [b*np*sq, sk]: the input of the context GEMM when dropout ran; else empty
  std::optional<AttentionMask> mask;  // the mask the softmax applied
  AttentionScale scale;
  int64_t b = 0, sq = 0, sk = 0;
};

// query [sq*b, np*hn], key and value [sk*b, ng*hn] (rows (s, b) row-major),
// b the micro-batch. attention_mask broadcastable to [b, np, sq, sk].
DotProductAttentionForward dot_product_attention_forward(const TransformerConfig& cfg, const Mat& query,
                                                         const Mat& key, const Mat& value, int64_t b,
                                                         AttnMaskType mask_type,
                                                         const std::optional<AttentionMask>& attention_mask,
                                                         const Precision& p, const RunContext& ctx,
                                                         const Sink& taps = {});

struct DotProductAttentionGrads {
  Mat d_query;  // [sq*b, np*hn]
  Mat d_key;    // [sk*b, ng*hn]: summed over each group's query heads
  Mat d_value;  // [sk*b, ng*hn]
};

DotProductAttentionGrads dot_product_attention_backward(const TransformerConfig& cfg, const Mat& query,
                                                        const Mat& key, const Mat& value,
                                                        const DotProductAttentionForward& fwd, const Mat& d_output,
                                                        const Precision& p);

}  // namespace paritron::ref
