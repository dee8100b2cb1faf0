// MLP: linear_fc1 -> (+ fc1 bias) -> activation or gated linear unit ->
// linear_fc2 with its bias returned (skip_bias_add), forward and backward.
//
// Megatron: megatron/core/transformer/mlp.py (MLP.forward),
// megatron/core/fusions/fused_bias_gelu.py, fused_bias_swiglu.py. Spec §6:
// a = x W1^T + b1 (bias [f or 2f] added before the GLU split); z = act(a), or
// for gated_linear_unit z = act(a[:, :f]) * a[:, f:]; out = z W2^T and
// output_bias = b2 (added later in bias-dropout-add). bias_activation_fusion
// turns gelu into bias_gelu's tanh form (0.79788456).
//
// Backward (Megatron's autograd / the fused kernels' hand-written backward):
// dz = d_output W2, dW2 = d_output^T z, d b2 = d_output_bias; non-gated
// da = dz f'(a); gated da1 = dz a2 f'(a1), da2 = dz f(a1); d b1 = sum_t da
// (the bias is added before the split, so its gradient is [2f]); dx = da W1,
// dW1 = da^T x. Activations and their derivatives: activations.h.
//
// Precision (which tensors are materialised in the activation dtype):
// unfused: x W1^T, a + b1, act(a1), act(a1) * a2 (eager torch: each a tensor);
// backward dz * a2, dz * act(a1), the activation's backward, d b1 (an fp32
// reduction rounded once). Fused (bias_gelu / bias_geglu / bias_swiglu, jit
// kernels computing in fp32): y + b is not rounded to the dtype (fp32 in
// emulated runs) and the activation output — and its backward — is rounded
// once. GEMMs and fp8 via linear_forward / linear_backward.
//
// Version choices: gelu + gated_linear_unit + bias_activation_fusion fails at
// run time in 0.5.0 (bias_gelu_impl is applied to the full 2f-wide tensor and
// linear_fc2 rejects it); the reference follows the newest release, which runs
// bias_geglu_impl: tanh gelu of the gate half times the up half. The bias rule
// follows cfg.add_bias_linear: linear_fc1.bias / linear_fc2.bias are required
// when it is true and ignored when it is false, as the module would not have
// them.
// Left out: TP (the gated fc1 is the unsharded [gate; up] layout), newer
// versions' per_token_scale, clamped GLU, TE activation modules.
#pragma once

#include <optional>

#include "reference/core.h"

namespace paritron::ref {

struct MlpForward {
  Mat fc1_output;                     // [T, f or 2f]: x W1^T + b1
  Mat activation_output;              // [T, f]: the input of linear_fc2
  Mat output;                         // [T, h]: without the fc2 bias
  std::optional<RowVec> output_bias;  // [h]: fc2 bias (None without add_bias_linear)
};

// w: the MLP's view ("mlp." or "mlp.experts.local_experts.3."): linear_fc1.weight
// [f or 2f, h] (+ .bias), linear_fc2.weight [h, f] (+ .bias). The ffn width is
// read off the weights, so the same function serves dense MLPs and experts.
MlpForward mlp_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p);

// Returns dx. d_output_bias is the gradient reaching output_bias (absent when
// nothing consumes it); weight gradients go to grads under the same keys as w.
Mat mlp_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const MlpForward& fwd,
                 const Mat& d_output, const std::optional<RowVec>& d_output_bias, const Sink& grads,
                 const Precision& p);

}  // namespace paritron::ref
