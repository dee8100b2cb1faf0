// The normalisations of a layer: LayerNorm or RMSNorm by cfg.normalization,
// with zero-centered gamma and layernorm_epsilon (spec §7). Implemented in
// layernorm.cpp and rmsnorm.cpp; norm_forward/norm_backward dispatch on
// cfg.normalization ("LayerNorm" | "RMSNorm").
//
// Megatron: megatron/core/fusions/fused_layer_norm.py (FusedLayerNorm, the
// local spec's input_layernorm / pre_mlp_layernorm: Apex's fused LayerNorm)
// and megatron/core/transformer/custom_layers/transformer_engine.py (TENorm:
// Transformer Engine's LayerNorm or RMSNorm; the final norm of every block in
// 0.5.0). Over the last axis (h), per token:
//   LayerNorm  y = (x - mean) / sqrt(var + eps) * gamma + beta, biased variance (divide by h)
//   RMSNorm    y = x / sqrt(mean(x^2) + eps) * gamma, no mean, no bias
// gamma = weight, or weight + 1 with layernorm_zero_centered_gamma: the local
// FusedLayerNorm computes weight + 1 as a parameter-dtype tensor (rounded to
// p.dtype), Transformer Engine adds the 1 inside its kernel in fp32 (rounded
// to fp32 in emulated runs). Backward: with g = dy * gamma,
//   LayerNorm  dx = rstd (g - mean(g) - xhat mean(g xhat)), dgamma = sum_t dy xhat, dbeta = sum_t dy
//   RMSNorm    dx = rstd (g - xhat mean(g xhat)),            dgamma = sum_t dy xhat
// (d weight = d gamma: the + 1 has derivative 1).
//
// Precision: the Apex and TE kernels read fp16/bf16 input, keep the statistics
// and the affine transform in fp32 and write the dtype once (dx and the
// parameter gradients likewise). An emulated run (p.dtype not F64) rounds the
// steps where fp32 rounding is amplified to fp32, as the kernels compute them:
// mean, x - mean, the variance, rstd and xhat in the forward; g = dy gamma,
// mean(g), mean(g xhat) and the cancelling difference g - mean(g) - xhat
// mean(g xhat) in the backward (with a variance near eps, or h = 1 or 2,
// these dominate the error: the parity harness's tolerance rests on the
// emulation seeing them). The sums themselves are exact sums rounded once
// (the kernels' fp32 summation order is unknowable); output, dx, dgamma and
// dbeta are rounded once to p.dtype. The truth (F64) rounds nothing.
//
// Left out: sequence-parallel gradient all-reduce of the weights (no sharding
// here), persist_layer_norm / memory_efficient_layer_norm (same math), the TE
// spec's LayerNorm fused into linear_qkv / linear_fc1 (weights
// layer_norm_weight / layer_norm_bias: the caller runs the norm on a view of
// those keys; the math is the TE norm's).
#pragma once

#include "reference/core.h"

namespace paritron::ref {

struct NormForward {
  Mat output;            // [T, h]
  Mat normalized;        // [T, h]: (x - mean) * rstd (LayerNorm) or x * rstd (RMSNorm)
  Eigen::VectorXd rstd;  // [T]: 1 / sqrt(var + eps) or 1 / sqrt(mean(x^2) + eps)
};

// Which kernel runs the norm; it only matters for zero-centered gamma in
// emulated precision (where weight + 1 is rounded, see above).
enum class NormKernel {
  kApex,              // local spec FusedLayerNorm: weight + 1 rounded to the parameter dtype
  kTransformerEngine  // TENorm / TE fused norms: weight + 1 in fp32
};

// The dtype the norm kernels compute in: F32 for an emulated run, F64 for the truth.
inline DType norm_compute_dtype(const Precision& p) { return p.dtype == DType::F64 ? DType::F64 : DType::F32; }

// w: the norm's view ("input_layernorm."): "weight" [h] and, for LayerNorm, "bias" [h].
// layernorm_* without a kernel argument mirror the local FusedLayerNorm (kApex);
// rmsnorm_* always mirror TE's RMSNorm (0.5.0 has no other). h is x.cols(), so
// the same functions serve qk_layernorm's per-head norms.
NormForward layernorm_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p);
Mat layernorm_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const NormForward& fwd,
                       const Mat& dy, const Sink& grads, const Precision& p);
NormForward rmsnorm_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p);
Mat rmsnorm_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const NormForward& fwd,
                     const Mat& dy, const Sink& grads, const Precision& p);

NormForward layernorm_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p,
                              NormKernel kernel);
Mat layernorm_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const NormForward& fwd,
                       const Mat& dy, const Sink& grads, const Precision& p, NormKernel kernel);

// Dispatch on cfg.normalization; throws Error for anything but "LayerNorm" and
// "RMSNorm". Without a kernel argument LayerNorm is the local FusedLayerNorm;
// pass kTransformerEngine for TENorm (the block's final_layernorm in 0.5.0).
NormForward norm_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p);
Mat norm_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const NormForward& fwd, const Mat& dy,
                  const Sink& grads, const Precision& p);
NormForward norm_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p,
                         NormKernel kernel);
Mat norm_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const NormForward& fwd, const Mat& dy,
                  const Sink& grads, const Precision& p, NormKernel kernel);

// The gamma the kernel multiplies by: weight, or weight + 1 (rounded as the
// kernel rounds it) with layernorm_zero_centered_gamma. [h]
RowVec norm_effective_gamma(const TransformerConfig& cfg, const RowVec& weight, const Precision& p,
                            NormKernel kernel);

}  // namespace paritron::ref
