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

#include <functional>
#include <string>
#include <vector>

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
  bool gather_kv = false;  // k, v were all-gathered over CP (dk, dv reduce-scatter back)
  // recompute_granularity "selective" (Megatron's checkpoint_core_attention):
  // the forward drops context and lse, and the backward re-runs the attention
  // forward from q, k, v (same dropout draws) before its backward.
  bool recompute = false;
};

// Core attention (DotProductAttention: softmax(scale * q k^T + mask) v, with
// attention dropout) on a rank's heads. q holds the local query rows (the
// global positions q_pos of each sequence row, b sequences from batch_offset)
// and np/tp heads; k, v the key rows and ng/tp groups: every key position, or
// with gather_kv this CP rank's chunks (all-gathered over CP, TE's all-gather
// CP; the backward reduce-scatters dk, dv). Masks as reference/fused_softmax
// softmax_mask: a window replaces any mask; else a passed mask is used as is;
// else the causal type masks k > q (and needs sq == sk, as Megatron's default
// causal mask does).
struct CoreAttentionCall {
  int64_t batch = 1, batch_offset = 0, b_global = 1;
  int64_t sq_global = 0, sk_global = 0;
  std::vector<int64_t> q_pos;  // global positions of q's sequence rows
  bool gather_kv = false;      // k, v hold this CP rank's chunks
  std::string mask_type = "causal";
  const Tensor* mask = nullptr;  // explicit [b|1, np|1, Sq, Sk] bool mask (true = masked), or null
  std::string path;              // RNG path of the module holding core_attention ("" for a case of its own)
  int64_t layer_number = 1;
};
// Returns the context [sq_loc * b, np_loc * hn].
DTensor core_attention_forward(ModelContext& m, const CoreAttentionCall& call, const DTensor& q, const DTensor& k,
                               const DTensor& v, AttentionSaved& saved);
// Returns dq; dk, dv of this rank's k, v rows (reduce-scattered over CP with gather_kv).
DTensor core_attention_backward(ModelContext& m, const DTensor& d_context, AttentionSaved& saved, DTensor& dk,
                                DTensor& dv);

// The [n, rot] angle rows of the given positions from a [S, 1, 1, rot] fp32 table.
Tensor rotary_rows(const Tensor& table, const std::vector<int64_t>& positions);

// prefix: "self_attention." or "layers.N.self_attention."; path: the RNG path
// of the module ("self_attention", "layers.N.self_attention").
DTensor self_attention_forward(ModelContext& m, const std::string& prefix, const std::string& path,
                               int64_t layer_number, const DTensor& x, const TokenLayout& tokens,
                               const LayerArgs& args, AttentionSaved& saved);
DTensor self_attention_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                const TokenLayout& tokens, AttentionSaved& saved);

// CrossAttention (megatron/core/transformer/attention.py, core_v0.5.0):
//   q = linear_q(x)            column parallel: np/tp whole heads
//   kv = linear_kv(context)    column parallel; the output viewed [sk, b, np/tp, 2*hn]
//                              and split in the last dim: head j is [k_j | v_j]
//   context = core attention(q, k, v) with args.context_mask (padding type by
//             default: no causal mask, no RoPE)
//   output = linear_proj(context)  (row parallel; its bias goes to the caller's bda)
// Under sequence parallel both linears all-gather their SP-local input rows:
// the context is sharded over TP along its sequence like the hidden states
// (ColumnParallelLinear with sequence_parallel gathers whatever it is given),
// and its gradient comes back reduce-scattered. Not under context parallel.
// The context rows are args.context's: this micro-batch's sequences (and the
// TP rank's rows under SP); the backward hands d_context to args.context_grad.
struct CrossAttentionSaved {
  LinearSaved q, kv, proj;
  AttentionSaved core;
  TokenLayout kv_tokens;  // the context's rows: positions 0..Sk-1, SP slice
  std::function<void(const TokenLayout&, const DTensor&)> context_grad;
};
// The token layout of the context rows a rank holds for the query layout `tokens`.
TokenLayout cross_kv_tokens(const ModelContext& m, const TokenLayout& tokens, int64_t sk);
DTensor cross_attention_forward(ModelContext& m, const std::string& prefix, const std::string& path,
                                int64_t layer_number, const DTensor& x, const TokenLayout& tokens,
                                const LayerArgs& args, CrossAttentionSaved& saved);
DTensor cross_attention_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                 CrossAttentionSaved& saved);

// The softmax scale Megatron applies in effect: alpha (baddbmm) times the
// softmax's coeff, each computed as DotProductAttention does.
double effective_softmax_scale(const TransformerConfig& cfg, int64_t layer_number);

}  // namespace paritron::opt
