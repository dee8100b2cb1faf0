// SelfAttention, forward and backward, under TP, SP and CP.
//
// Megatron: megatron/core/transformer/attention.py (SelfAttention,
// get_query_key_value_tensors), dot_product_attention.py, and for context
// parallelism Transformer Engine's all-gather CP (cp_comm_type "all_gather");
// shared/spec/megatron-semantics.md §4, §10.6 (CP), reference/self_attention.h.
//   mixed = linear_qkv(x)  (column parallel: a TP rank holds ng/tp whole query
//           groups, each [q heads of the group | k | v], so the split is local)
//   q, k = RoPE(q, k)  with the angles of the tokens' global positions
//   CP: k, v all-gathered over the CP group (each rank keeps its 2 chunks of
//       queries; causal masks use global positions); backward reduce-scatters dk, dv
//   context = flash attention(q, k, v)  (Backend::attention_forward)
//   output = linear_proj(context)  (row parallel; its bias goes to the caller's bda)
#pragma once

#include <string>

#include "optimized/model/context.h"
#include "optimized/model/linear.h"

namespace paritron::opt {

struct AttentionSaved {
  LinearSaved qkv, proj;
  DTensor q, k, v;       // after RoPE; k, v gathered over CP
  DTensor context, lse;
  DTensor freqs;         // [s_loc, rot] angles of the local positions (empty without RoPE)
  AttentionArgs args;
  std::vector<int64_t> q_pos, k_pos;
  std::vector<uint8_t> mask;
};

// prefix: "self_attention." or "layers.N.self_attention."; path: the RNG path
// of the module ("self_attention", "layers.N.self_attention").
DTensor self_attention_forward(ModelContext& m, const std::string& prefix, const std::string& path,
                               int64_t layer_number, const DTensor& x, const TokenLayout& tokens,
                               const LayerArgs& args, AttentionSaved& saved);
DTensor self_attention_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                const TokenLayout& tokens, AttentionSaved& saved);

// The softmax scale Megatron applies in effect: alpha (baddbmm) times the
// softmax's coeff, each computed as DotProductAttention does.
double effective_softmax_scale(const TransformerConfig& cfg, int64_t layer_number);

}  // namespace paritron::opt
