// TopKRouter: the MoE gate. Logits x W^T, the z-loss, the input jitter, top-k
// selection with the load-balancing type's scores (aux_loss / sinkhorn /
// none), the switch load-balancing (aux) loss and, from newer versions, the
// score function, pre-softmax, scaling factor, expert bias, router dtype and
// capacity-based token dropping. Forward and backward.
//
// Megatron (core_v0.5.0, primary): megatron/core/transformer/moe/router.py
// (Router.gating, TopKRouter.routing, aux_loss_load_balancing,
// sinkhorn_load_balancing, apply_z_loss, apply_input_jitter) and
// moe/moe_utils.py (switch_load_balancing_loss_func, z_loss_func, sinkhorn,
// MoEAuxLossAutoScaler). Newer fields follow core_v0.19.0's
// moe_utils.topk_routing_with_score_function, compute_routing_scores_for_aux_loss,
// apply_router_token_dropping and router_gating_linear. Spec §9.2, §9.7,
// §14 rows 25-29 and 31.
//
// Formulas (T tokens, E experts, k = moe_router_topk), in Megatron's order:
//   logits = x W^T (+ b, newer)                         [T, E], router dtype R
//   z_loss = coeff * mean_t (logsumexp_e logits)^2       (moe_z_loss_coeff set), in R
//   z      = logits * u, u ~ U(1-eps, 1+eps)             (moe_input_jitter_eps set)
//   aux_loss / none, softmax:  idx = topk(z); scores = softmax_fp32(z[idx])
//           pre-softmax:       P = softmax_fp32(z); idx = topk(P); scores = P[idx]
//           sigmoid:           S = sigmoid(z); idx = topk(S + expert_bias); q = S[idx];
//                              scores = q / (sum q + 1e-20) if k > 1 else q
//           then scores *= moe_router_topk_scaling_factor (if set)
//   sinkhorn, training: idx = topk(sinkhorn(z) in fp32); scores = act(z)[idx]
//            eval:     scores, idx = topk(act(z))
//            act = sigmoid (k = 1) or the full fp32 softmax over E (k > 1)
//   aux_loss = E * coeff / (k T^2) * sum_e (sum_t P[t,e]) * count_e, with P the
//            full fp32 softmax of z (sigmoid: S normalised over E), count_e how
//            many tokens picked e in the top-k of P (no expert bias, no dropping).
//            0.5.0 writes it E * sum_e mean_t(P) * mean_t(mask) / k * coeff with
//            k = count_nonzero(mask[0]), which is the same number.
//   capacity (moe_expert_capacity_factor c): C = ceil(T k / E * c); unless C > T,
//            each expert keeps the C (token, slot) pairs with the highest score
//            ("probs") or the first C in token order ("position"); dropped pairs
//            get score 0. moe_pad_expert_input_to_capacity makes every expert
//            process exactly min(C, T) tokens (the extra ones with weight 0).
// Backward: gradients of L = sum(scores * d_scores) + aux_loss + z_loss with
// respect to x and weight (MoEAuxLossAutoScaler with its default scale 1). The
// selection (indices, capacity) is piecewise constant and sinkhorn runs under
// no_grad: no gradient flows through them, only through the score values,
// the aux-loss probabilities and the z-loss.
//
// Decisions (where Megatron leaves something open or Paritron must choose):
//  * Jitter follows 0.5.0 (the field exists there): it multiplies the
//    LOGITS, after the z-loss, in eval too. From core_v0.6 Megatron multiplies
//    the router INPUT x instead (still in eval too: no training check up to
//    core_v0.19); Paritron's config cannot say which version ran, so the
//    primary version wins. u is drawn from the counter-based RNG,
//    key ctx.key("moe_jitter"), element t*E + e, as torch's
//    Uniform(low, high).rsample computes it in fp32: u = low + r * (high - low)
//    with low = fp32(1 - eps), high = fp32(1 + eps), r = math::uniform_float.
//    It is the same u in every precision. (0.5.0 makes u fp32, so under
//    bf16/fp16 the jittered logits and the scores are fp32 tensors.)
//  * aux_loss and z_loss follow 0.5.0: computed in eval as well (newer: the
//    aux loss and the z-loss only in training from core_v0.8), and
//    aux_loss is computed (= 0) when the coefficient is 0.
//  * The sinkhorn selection is always computed in float32, even in the float64
//    truth: Megatron forces fp32 there (also when the model itself runs in
//    float64), the result is only a discrete choice, and following Megatron's
//    arithmetic keeps the expert choice of the truth equal to Megatron's. exp
//    and every product are rounded to fp32 once, (1/n) * 1 / s is evaluated as
//    torch does (s.reciprocal() * fp32(1/n)), row/column sums are summed in
//    double and rounded once (torch sums in another order: last-bit
//    differences, visible only in near-ties; see selection_values and the
//    margins). Megatron loops without a cap; here 100000 iterations without
//    reaching tol throw an Error (one token with logits 16 apart needs ~1e6:
//    the 1e-8 in the denominators makes the convergence sublinear).
//  * Top-k order: descending value; equal values in ascending expert index
//    (torch leaves tie order unspecified); NaN sorts above everything, as in
//    torch.topk. Capacity ties ("probs") keep the lower token index; the
//    "position" policy keeps the first C tokens in token order, and padding
//    takes the lowest-index unrouted tokens (weight 0: no effect on values).
//  * Scores of dropped (token, slot) pairs are 0 (Megatron's probs * mask);
//    indices keep the top-k choice, `kept` says what was dispatched.
//
// Precision (emulated runs; the truth rounds nothing except the sinkhorn
// selection above): activation dtype A = p.dtype; router dtype R = fp32/fp64
// when moe_router_dtype is set, else A; routing-logit dtype L = R, or the
// promotion of R with fp32 when jitter is on (u is fp32); softmax/sigmoid and
// the aux loss in fp32 as Megatron forces them, cast to L where Megatron
// casts back (type_as). The gating GEMM goes through matmul (it is a plain
// F.linear, never fp8).
//
// Router bias: 0.5.0 has none; from core_v0.15 Megatron creates router.bias
// [E] whenever add_bias_linear is true (the default). No Paritron field says
// which version a case comes from, so the bias is used when the weights hold
// "bias" (logits = x W^T + b, added inside the GEMM as addmm does) and is
// absent otherwise; it then gets its gradient (column sums of d logits).
//
// Left out: seq_aux_loss / global_aux_loss, grouped top-k
// (moe_router_num_groups), the sqrtsoftplus score function, quantile
// balancing, router replay, fused TE router kernels, padding masks,
// calculate_per_token_loss scaling and cross-rank reductions (no sharding).
#pragma once

#include <optional>
#include <vector>

#include "reference/core.h"

namespace paritron::ref {

using IndexMat = Eigen::Matrix<int64_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct RouterForward {
  Mat logits;                    // [T, E] x W^T in the router dtype (case-format router_logits)
  Mat jitter;                    // [T, E] the multiplier u; empty without moe_input_jitter_eps
  Mat routing_logits;            // [T, E] logits after jitter: what selection and scores see
  std::optional<Mat> probs;      // [T, E] router_probs: the aux-loss probabilities (aux_loss),
                                 // or the full softmax that pre-softmax / sinkhorn (k > 1) use
  Mat scores;                    // [T, k] router_scores: combine weights, top-k order, 0 if dropped
  IndexMat indices;              // [T, k] router_indices, top-k order
  Mat kept;                      // [T, k] 1 = dispatched, 0 = dropped by the capacity
  Mat routing_map;               // [T, E] 1 where expert e processes token t (kept or capacity padding)
  std::vector<int64_t> tokens_per_expert;  // [E] column sums of routing_map
  std::optional<double> aux_loss;          // set for moe_router_load_balancing_type "aux_loss"
  std::optional<double> z_loss;            // set when moe_z_loss_coeff is set
  Mat selection_values;          // [T, E] the values top-k ran on (logits, probabilities, sigmoid
                                 // + expert bias, or the fp32 sinkhorn output)
  Mat topk_margin;               // [T, 1] k-th minus (k+1)-th largest selection value (+inf if k = E):
                                 // near 0 means another implementation may pick another expert set
  Mat order_margin;              // [T, 1] smallest gap between consecutive top-k values (+inf if k = 1):
                                 // near 0 means the order within the top-k may differ
  Mat capacity_margin;           // [1, E] drop policy "probs" with a capacity below T: the last kept
                                 // token's score minus the first dropped one's (+inf otherwise):
                                 // near 0 means another implementation may keep another token
  // For the backward:
  Mat activation;                // [T, E] fp32 softmax or sigmoid of routing_logits the scores came
                                 // from (pre-softmax, sigmoid, sinkhorn); empty otherwise
  Mat topk_softmax;              // [T, k] fp32 softmax over the top-k logits (top-k-then-softmax)
  Mat aux_probs;                 // [T, E] the probabilities of the aux loss (empty without it)
  std::vector<int64_t> aux_counts;  // [E] count_e of the aux loss
};

// w: the router's view ("mlp.router."): "weight" [E, h], optionally "bias" [E]
// (newer Megatron, see above); with
// moe_router_enable_expert_bias also "expert_bias" [E] (a non-learned buffer,
// zeros when absent, as Megatron initialises it). x: [T, h] tokens in (s, b)
// order. Throws Error for a config without experts, bad shapes, or T = 0.
RouterForward moe_router_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p,
                                 const RunContext& ctx);

// Gradient of sum(scores * d_scores) + aux_loss + z_loss: returns dx [T, h]
// and adds d weight [E, h] to grads "weight" (and d bias to "bias" when the
// router has one). d_scores [T, k]; entries of
// dropped pairs are ignored (their score is a constant 0).
Mat moe_router_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const RouterForward& fwd,
                        const Mat& d_scores, const Sink& grads, const Precision& p);

// moe_utils.sinkhorn(cost, tol) as Megatron runs it on fp32 logits: C = exp(cost),
// d0 = 1/T / (C d1 + 1e-8), d1 = 1/E / (d0^T C + 1e-8) until mean|d1_old - d1| <= tol
// (at least one iteration); returns d1[e] * C[t,e] * d0[t]. Every value is rounded
// to fp32 (see the decision above). Megatron has no iteration cap; this throws
// Error after max_iterations (0: a work budget of ~2e10 multiply-adds, at
// least 1e7 iterations).
Mat sinkhorn_fp32(const Mat& cost, double tol = 1e-4, int64_t max_iterations = 0);

// Indices of the k largest values of `row` (length n) in torch.topk order with
// the tie rule above.
std::vector<int64_t> topk_indices(const double* row, int64_t n, int64_t k);

}  // namespace paritron::ref
