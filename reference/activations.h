// The element-wise activations of the MLP, forward and derivative, as
// Megatron and torch compute them: every name of kActivationNames
// (common/transformer_config.h) plus bias_gelu's tanh form, which the MLP uses
// instead of gelu when bias_activation_fusion is on.
//
// Megatron / torch sources:
//   gelu          torch.nn.functional.gelu (approximate='none'):
//                 f = 0.5 x (1 + erf(x / sqrt 2)),
//                 f' = 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)
//   silu          F.silu: f = x s(x), s = sigmoid; f' = s (1 + x (1 - s))
//                 (the same formula as fused_bias_swiglu.py's swiglu_back)
//   relu          F.relu; f' = 1 for x > 0, else 0 (threshold_backward: 0 at x = 0)
//   squared_relu  megatron/core/activations.py: pow(relu(x), 2); f' = 2 relu(x)
//   openai_gelu   megatron/core/transformer/utils.py gelu_impl:
//                 0.5 x (1 + tanh(0.7978845608028654 x (1 + 0.044715 x^2))); autograd derivative
//   erf_gelu      megatron/core/transformer/utils.py: x 0.5 (erf(x / 1.41421) + 1) — the
//                 truncated constant 1.41421, not sqrt 2; autograd derivative
//   quick_gelu    megatron/core/activations.py (newer versions): x sigmoid(1.702 x)
//   bias_gelu     megatron/core/fusions/fused_bias_gelu.py (bias_activation_fusion):
//                 0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2))), and its hand-written
//                 backward bias_gelu_back: f' = 0.5 x (1 - t^2)(0.79788456 + 0.1070322243 x^2)
//                 + 0.5 (1 + t) — 0.1070322243 is sqrt(2/pi) * 3 * 0.044715 rounded, so f' is
//                 the forward's derivative only to ~1e-11 relative (Megatron's gradient is the
//                 formula, which is what we reproduce). Also fused_bias_geglu.py (newer).
// Spec §6.2, §6.3, §14 #18.
//
// Precision: each activation is one torch kernel (or one jit-fused kernel)
// that reads the dtype, computes in fp32 and writes the dtype once; the
// reference evaluates in double and rounds once (a lower bound on the
// kernels' error, see core.h).
// Left out: Transformer Engine activation modules (use_te_activation_func),
// fast_gelu, clamped GLU (activation_func_clamp_value, glu_linear_offset):
// Paritron's config does not carry them.
#pragma once

#include <string_view>

#include "reference/core.h"

namespace paritron::ref {

enum class Activation {
  kGelu,         // "gelu"
  kSilu,         // "silu"
  kRelu,         // "relu"
  kSquaredRelu,  // "squared_relu"
  kOpenaiGelu,   // "openai_gelu"
  kErfGelu,      // "erf_gelu"
  kQuickGelu,    // "quick_gelu"
  kBiasGeluTanh  // "bias_gelu": fused_bias_gelu.py's tanh form (bias_activation_fusion)
};

// A name of kActivationNames, or "bias_gelu"; throws Error naming the unknown name.
Activation activation_from_name(std::string_view name);
std::string_view activation_name(Activation a);

// The activation MLP.forward applies to the (gate half of the) fc1 output:
// cfg.activation_func, except that gelu under bias_activation_fusion becomes
// the tanh form (bias_gelu / bias_geglu). Throws Error for a fused activation
// Megatron has no kernel for ("Only support fusion of gelu and swiglu").
Activation mlp_activation(const TransformerConfig& cfg);

// f(x) and the derivative Megatron's backward uses, in double.
double activation_value(Activation a, double x);
double activation_derivative(Activation a, double x);

// f applied element-wise, each result rounded once to dtype.
Mat activation_forward(Activation a, const Mat& x, DType dtype);
// dy * f'(x) element-wise, rounded once to dtype (torch's *_backward kernels).
Mat activation_backward(Activation a, const Mat& x, const Mat& dy, DType dtype);

}  // namespace paritron::ref
