// ColumnParallelLinear / RowParallelLinear at tensor-parallel size 1: the
// GEMM every projection of the transformer runs (linear_qkv, linear_proj,
// linear_q, linear_kv, linear_fc1, linear_fc2).
//
// Megatron: megatron/core/tensor_parallel/layers.py
// (linear_with_grad_accumulation_and_async_allreduce: output =
// input @ weight.t(), then output + bias unless skip_bias_add). Weight
// [out_features, in_features]; y = x W^T + b. Spec §0, §10.2, §10.3.
//
// Precision: the GEMM accumulates in fp32 and writes the activation dtype;
// the bias add is a separate op rounded again (the local spec's unfused form).
// With fp8 (spec §12, TE linears) the GEMM inputs are fake-quantised:
// forward input and weight in E4M3, backward output-gradient in E4M3 (e4m3
// recipe) or E5M2 (hybrid); the wgrad GEMM stays in high precision when
// fp8_wgrad is false. Scales are the steady-state delayed scales: as if the
// amax history held the tensor's own amax (scale = fp8_max / amax / 2^margin),
// which is what the delayed recipe converges to on repeated batches.
// Deliberately left out: TP communication (the reference never shards).
#pragma once

#include <map>
#include <string_view>
#include <utility>

#include "common/fp8_scaling.h"
#include "reference/core.h"

namespace paritron::ref {

// y = x W^T (+ bias when add_bias and the layer has one). `w` is the linear
// module's view ("linear_qkv."): "weight" and, if present, "bias".
Mat linear_forward(const Params& w, const Mat& x, bool add_bias, const Precision& p);

// Gradients of y = x W^T (+ b): returns dx = dy W; adds dW = dy^T x to
// grads "weight" and, when bias_grad, db = column sums of dy to grads "bias"
// (for skip_bias_add layers the caller accounts for the bias where it is used).
Mat linear_backward(const Params& w, const Mat& x, const Mat& dy, bool bias_grad, const Sink& grads,
                    const Precision& p);

// fp8 fake quantisation (quantise then dequantise) of a GEMM operand in the
// given role; identity without fp8. Without a session: the steady-state scale
// of x's own amax. With p.fp8_session: TE's delayed scaling, the scale of the
// slot (linear, role), recording x's amax into its history.
using Fp8Operand = Fp8Role;  // kInput, kWeight, kGradOutput (common/fp8_scaling.h)
Mat fp8_fake_quant(const Mat& x, Fp8Operand role, const Precision& p, std::string_view linear = "");

// Transformer Engine's delayed scaling over several steps (spec §12.3): one
// amax history and scale per (linear layer, operand), as TE keeps fp8 meta per
// module, from the recipe Megatron builds out of the config
// (delayed_scaling_recipe, common/fp8_scaling.h). A step's casts use the
// scales computed at the end of earlier steps (scale 1 on the first step);
// end_step() runs the amax/scale update every `fp8_interval` steps.
class Fp8Session {
 public:
  explicit Fp8Session(const TransformerConfig& cfg);
  // The slot of `role` of the linear whose parameters sit under `linear`
  // ("self_attention.linear_qkv."), made on first use.
  size_t slot(std::string_view linear, Fp8Operand role);
  DelayedScalingState& state() { return state_; }
  bool end_step() { return state_.end_step(); }

 private:
  DelayedScalingState state_;
  std::map<std::pair<std::string, Fp8Operand>, size_t> slots_;
};

}  // namespace paritron::ref
