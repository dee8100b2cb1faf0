// MoELayer: router -> token permutation -> experts -> unpermutation and
// combine, forward and backward, at expert- and tensor-parallel size 1.
//
// Megatron (core_v0.5.0, primary): megatron/core/transformer/moe/moe_layer.py
// (MoELayer.forward), moe/token_dispatcher.py (MoEDroplessTokenDispatcher
// token_permutation / token_unpermutation without SP or EP), moe/experts.py
// (SequentialMLP, GroupedMLP), moe/router.py via reference/moe_router.h.
// Capacity-based dropping and padding follow core_v0.19.0
// (moe_utils.apply_router_token_dropping, permute / unpermute). Spec §9.1,
// §9.3-§9.5, §9.7, §14 rows 30, 32 (single-rank form) and 33.
//
// Formula (T tokens, k slots per token, expert e = indices[t, j]):
//   output[t]      = sum_j scores[t, j] * expert_e(x_t)     (expert output WITHOUT its fc2 bias)
//   output_bias[t] = sum_j scores[t, j] * b2_e               ([T, h]; absent without expert biases)
// (k = 1: output = unpermuted * scores, the same numbers.) Dropped (token,
// slot) pairs (capacity) contribute 0; capacity padding rows are processed
// with weight 0 and contribute 0.
//
// Permutation: the (token, slot) pairs are expanded token-major (pair t*k + j,
// 0.5.0's masked_select over a [T, k] mask) and stably sorted by expert
// (0.5.0 argsort(local_indices)); expert e processes its rows in token order.
// 0.5.0's argsort is not stable, so Megatron's order within an expert may
// differ: it does not change any result, because every expert computation is
// row-wise (each row of a GEMM depends only on its own input row, also in the
// emulated precisions) and the combine scatters each row back to its own
// (token, slot) position before summing over slots.
//
// Experts: SequentialMLP runs reference/mlp.h's mlp_forward on each expert's
// rows with weights "experts.local_experts.<e>.linear_fc1.weight" [F, h]
// (+ .bias [F]) and "...linear_fc2.weight" [h, f] (+ .bias [h]), f =
// moe_ffn_hidden_size (newer; check_config copies ffn_hidden_size into it, as
// 0.5.0's experts use ffn_hidden_size), F = f or 2f with gated_linear_unit.
// GroupedMLP (moe_grouped_gemm, no biases): "experts.weight1" [h, E*F] viewed
// (memory reinterpretation) as [E, h, F] and "experts.weight2" [E*f, h] viewed
// as [E, f, h]; out_e = act(x_e w1[e]) w2[e] — the same function as an MLP with
// fc1.weight = w1[e]^T and fc2.weight = w2[e]^T, which is how it is computed
// here. Its activation is config.activation_func (GLU: chunk, act(first) *
// second) without bias_activation_fusion's tanh-gelu (0.5.0 GroupedMLP never
// fuses).
//
// Precision (emulated runs): the experts as in mlp.h; the combine as 0.5.0's
// dispatcher does it: scores cast to the activation dtype A, each
// expert row times its score rounded to A, summed over the slots in slot
// order with a rounding after each add (scatter_add on CPU; CUDA's atomics
// add in any order: a parity tolerance matter). With moe_router_dtype set
// (newer), the product and the sum are in the promotion of A with the score
// dtype and the result is cast to A (moe_utils.unpermute). The backward
// mirrors it: d expert row = score * d output (A), d score = <expert row,
// d output> + <b2, d output_bias>.
//
// Left out: sequence / expert / tensor parallelism (the all-gather dispatcher,
// the reduce-scatter combine and its bias / tp; the reference never shards),
// the all-to-all and flex dispatchers (same numbers up to summation order),
// shared experts, TE grouped GEMM experts and newer GroupedMLP activation
// fusions, moe_layer_recompute (numerics identical).
#pragma once

#include <optional>
#include <vector>

#include "reference/core.h"
#include "reference/mlp.h"
#include "reference/moe_router.h"

namespace paritron::ref {

// The rows one expert processes, in processing order.
struct ExpertForward {
  std::vector<int64_t> tokens;  // token of each row (ascending)
  std::vector<int64_t> slots;   // its top-k slot j, or -1 for a capacity padding row
  Mat input;                    // [n_e, h] the gathered token rows
  MlpForward mlp;               // the expert's MLP on `input` (not run when n_e = 0)
};

struct MoeLayerForward {
  RouterForward router;
  std::vector<ExpertForward> experts;  // [E], global expert order
  Mat output;                          // [T, h] without the expert fc2 biases
  std::optional<Mat> output_bias;      // [T, h] sum_j score * b2_e (with add_bias_linear)
};

// The dispatch order of the (token, slot) pairs that are processed by an expert
// (routing_map), as the permuted row list: pairs t*k + j sorted stably by expert,
// then each expert's capacity padding rows (slot -1) merged in token order.
// Per expert e: rows of tokens t with routing_map(t, e) = 1, ascending t.
std::vector<ExpertForward> moe_dispatch(const RouterForward& router, const Mat& x);

// w: the MoE layer's view ("mlp."): "router.weight" (+ "router.expert_bias"),
// and the experts' weights as above. x [T, h]. taps (optional) receives
// "router.logits", "router.probs", "router.scores", "router.indices",
// "router.tokens_per_expert" [1, E], "router.aux_loss", "router.z_loss" [1, 1],
// "experts.input" (dispatched rows, expert-major) and "experts.output" (the
// experts' outputs in the same order, without fc2 bias).
MoeLayerForward moe_layer_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p,
                                  const RunContext& ctx, const Sink& taps = Sink());

// Gradient of sum(output * d_output) + sum(output_bias * d_output_bias) (when
// given) + aux_loss + z_loss: returns dx [T, h]; adds the gradients of every
// weight in w to grads under the same keys (experts that got no token get
// zero gradients; fc2 biases get zero gradients without d_output_bias).
Mat moe_layer_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const MoeLayerForward& fwd,
                       const Mat& d_output, const std::optional<Mat>& d_output_bias, const Sink& grads,
                       const Precision& p);

}  // namespace paritron::ref
