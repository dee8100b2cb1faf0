// MLP: linear_fc1 (column parallel) -> bias + activation (GLU) -> linear_fc2
// (row parallel, bias left to the caller's bias-dropout-add).
//
// Megatron: megatron/core/transformer/mlp.py (MLP.forward), fusions/
// fused_bias_gelu.py, fused_bias_swiglu.py; spec §6, §10.4 (a TP rank's fc1
// shard of a GLU is [gate_r; up_r], so the activation's chunk(2) is local);
// reference/mlp.h.
#pragma once

#include <string>

#include "optimized/model/context.h"
#include "optimized/model/linear.h"

namespace paritron::opt {

struct MlpSaved {
  LinearSaved fc1, fc2;
  DTensor pre_activation;  // fc1 output without its bias
};

ActivationKind mlp_activation_kind(const TransformerConfig& cfg);

// prefix: "mlp." / "layers.N.mlp." / an expert's "mlp.experts.local_experts.E.".
DTensor mlp_forward(ModelContext& m, const std::string& prefix, const DTensor& x, MlpSaved& saved);
DTensor mlp_backward(ModelContext& m, const std::string& prefix, const DTensor& dy, MlpSaved& saved);

}  // namespace paritron::opt
