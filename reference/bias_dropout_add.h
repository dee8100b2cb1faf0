// Bias-dropout-add: how every sub-block of a TransformerLayer joins the
// residual stream.
//
// Megatron: megatron/core/fusions/fused_bias_dropout.py
// (_bias_dropout_add_func, get_bias_dropout_add). Spec §8.2:
//   out = residual + dropout(x + bias, p)   (inverted dropout, identity in eval)
// with the residual cast to x's dtype first. The fused (jit) and unfused forms
// compute the same thing. The bias is the skip_bias_add bias a sub-block
// returns: a [h] vector (linear_proj, linear_fc2) or a [T, h] tensor (MoE).
#pragma once

#include <optional>

#include "reference/core.h"

namespace paritron::ref {

struct BiasDropoutAddForward {
  Mat output;       // [T, h]
  Mat dropout_scale;  // [T, h]: 0 or 1/(1-p) per element (all 1 in eval)
};

// bias: 1 x h (broadcast over tokens) or T x h; nullopt when the sub-block has
// no bias. `purpose` names the dropout draw under ctx's module path.
BiasDropoutAddForward bias_dropout_add_forward(const Mat& x, const std::optional<Mat>& bias, const Mat& residual,
                                               double p, const RunContext& ctx, std::string_view purpose,
                                               const Precision& prec);

struct BiasDropoutAddGrads {
  Mat x;                    // [T, h]
  std::optional<Mat> bias;  // the bias's shape: column sums for a broadcast bias
  Mat residual;             // [T, h]
};

BiasDropoutAddGrads bias_dropout_add_backward(const BiasDropoutAddForward& fwd, const std::optional<Mat>& bias,
                                              const Mat& dy, const Precision& prec);

}  // namespace paritron::ref
