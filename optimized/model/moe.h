// MoELayer on the optimized side: TopKRouter, token permutation, expert-
// parallel all-to-all dispatch, SequentialMLP experts, combine; forward and
// backward. Semantics: reference/moe_layer.h and reference/moe_router.h (the
// single-rank truth); Megatron core_v0.5.0 megatron/core/transformer/moe/
// (router.py, token_dispatcher.py, experts.py, moe_utils.py), spec §9.
//
// Token groups: as in Megatron, the router sees the rank's local tokens (the
// SP-local rows of a DP/CP shard): capacity, the aux loss and the z-loss are
// computed over them, so a sharded run equals the reference run on each
// rank's tokens, not on the whole batch. Under tensor parallelism the experts
// are TP-sharded MLPs (moe.cpp, "Expert MLPs under tensor parallelism").
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "optimized/model/context.h"
#include "optimized/model/mlp.h"

namespace paritron::opt {

struct MoeSaved {
  // Router results of the local tokens (host copies, also reported as case outputs).
  // Float values are held as F64 host tensors (the exact values of the run's dtype).
  Tensor router_logits;      // [T, E]
  std::optional<Tensor> router_probs;  // [T, E] aux-loss / pre-softmax probabilities (the reference's router_probs)
  Tensor router_scores;      // [T, k]
  Tensor router_indices;     // [T, k] I64
  std::vector<int64_t> tokens_per_expert;  // [E] counts of the local tokens
  std::optional<double> aux_loss, z_loss;
  DTensor output_bias;       // [T, h] sum_j scores[t, j] * b2_e; undefined without expert biases
  // Whatever the backward needs (implementation-defined).
  struct State;
  std::shared_ptr<State> state;
};

// prefix: "mlp." or "layers.N.mlp." (a moe_layer case: ""); path: the RNG path.
// Returns the combined expert output [T, h] WITHOUT the experts' fc2 bias
// (Megatron's MoELayer returns it as output_bias; see reference/moe_layer.h).
DTensor moe_forward(ModelContext& m, const std::string& prefix, const std::string& path, const DTensor& x,
                    const TokenLayout& tokens, MoeSaved& saved);
// dy: gradient of the output, dy_bias of output_bias (nullptr: zero); the
// aux and z losses enter with gradient 1 (MoEAuxLossAutoScaler's default
// scale). Returns dx [T, h].
DTensor moe_backward(ModelContext& m, const std::string& prefix, const DTensor& dy, const DTensor* dy_bias,
                     const TokenLayout& tokens, MoeSaved& saved);

// The router alone (the moe_router component, TopKRouter): prefix is the
// router's key prefix ("" in a moe_router case: keys "weight", "bias"), path
// its RNG path (jitter draws: "moe_jitter.<path>", "" for a case). Fills the
// router outputs of the rank's tokens x [T, h] in saved (output_bias stays
// undefined; tokens_per_expert after capacity, as the reference's router).
void moe_router_forward(ModelContext& m, const std::string& prefix, const std::string& path, const DTensor& x,
                        const TokenLayout& tokens, MoeSaved& saved);
// d_scores: the gradient of router_scores [T, k] (dropped slots get none);
// the aux and z losses enter with gradient 1. Accumulates the router's
// weight gradients; returns dx [T, h].
DTensor moe_router_backward(ModelContext& m, const std::string& prefix, const DTensor& d_scores,
                            const TokenLayout& tokens, MoeSaved& saved);

}  // namespace paritron::opt
