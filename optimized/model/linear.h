// ColumnParallelLinear and RowParallelLinear, forward and backward, with
// tensor and sequence parallelism.
//
// Megatron: megatron/core/tensor_parallel/layers.py
// (ColumnParallelLinear.forward, RowParallelLinear.forward,
// LinearWithGradAccumulationAndAsyncCommunication) and mappings.py;
// shared/spec/megatron-semantics.md §10.2-§10.5.
//   column:  x_full = SP ? all_gather_tp(x) : x           (copy_to_tp_region: identity)
//            y_r = x_full W_r^T + b_r                       (W_r: rows of W, b_r likewise)
//   backward dx = SP ? reduce_scatter_tp(dy W_r) : all_reduce_tp(dy W_r)
//            dW_r += dy^T x_full,  db_r += colsum(dy)
//   row:     y = SP ? reduce_scatter_tp(x W_r^T) : all_reduce_tp(x W_r^T)   (W_r: columns of W)
//            the bias is not added (skip_bias_add: the caller's bias-dropout-add does)
//   backward dy_full = SP ? all_gather_tp(dy) : dy;  dx = dy_full W_r;  dW_r += dy_full^T x
// Weight gradients accumulate in fp32 main grads (gradient_accumulation_fusion).
//
// fp8 (config.fp8 = "e4m3" | "hybrid"; spec §12; Megatron's TE linears,
// transformer_engine/pytorch/module/linear.py): the GEMM operands are cast
// to fp8 and the GEMMs consume q * scale_inv, emulated here by fake
// quantisation (Backend::fp8_fake_quant) into fp32 operands:
//   fprop  y  = x_q W_q^T           x, W in E4M3
//   dgrad  dx = dy_q W_q            dy in E4M3 (e4m3) or E5M2 (hybrid)
//   wgrad  dW = dy_q^T x_q          high precision dy^T x when !fp8_wgrad
//                                    (override_linear_precision[2])
// Scales: the reference's steady state of delayed scaling (reference/linear.h):
// scale = fp8_max / amax / 2^margin from the amax of the tensor being cast.
// TE max-all-reduces every amax over the fp8 group, which Megatron makes the
// amax reduction group TP x DP x CP (transformer_block.py: fp8_group =
// parallel_state.get_amax_reduction_group(with_context_parallel=True)), so
// the scale is that of the WHOLE tensor: all TP shards of a weight, all
// tokens of an activation or gradient (every DP, CP and SP shard). That is
// what the unsharded reference computes, so a sharded run quantises exactly
// as the reference does. The bias gradient uses the high-precision dy (TE
// computes it in the cast-transpose-dbias kernel from the unquantised dy).
// As in reference/run_case.cpp, a float64 run is the truth: fp8 applies to
// the emulated dtypes (F32, BF16, F16) only.
// Not modelled: the amax history across steps (reference Fp8Session), and
// pipeline micro-batches: each micro-batch reduces its own amax, so with
// several micro-batches the scales are those of each micro-batch's tokens.
#pragma once

#include <initializer_list>
#include <string>
#include <vector>

#include "common/fp8_scaling.h"
#include "optimized/model/context.h"

namespace paritron::opt {

struct LinearSaved {
  // What the wgrad GEMM multiplies: the gathered input of a column linear, the
  // input of a row linear (under fp8 with fp8_wgrad: its fake-quantised copy).
  DTensor input;
  // Under fp8: the weight as the fprop GEMM consumed it, reused by dgrad (TE
  // saves the fp8 weight; within a step the cast is the same).
  DTensor weight;
};

// fp8 GEMM operands (see the top of this file).
bool fp8_enabled(const ModelContext& m);  // m.cfg.fp8 is set and m.dtype is not F64
struct Fp8Operand {
  const DTensor* x;
  Fp8Role role;  // kInput, kWeight (forward format) or kGradOutput (backward format)
};
// The fake-quantised copies (fp32: F64 in float64 runs) of the operands, each
// with the scale of its global amax: the local amaxes are max-reduced over the
// amax group in one collective, which every member of the group must join.
std::vector<DTensor> fp8_cast(ModelContext& m, std::initializer_list<Fp8Operand> operands);
// max over the TP x DP x CP group of this pipeline stage, element-wise, in place.
void reduce_amax(ModelContext& m, std::vector<float>& amaxes);

// prefix: the linear's key prefix, e.g. "layers.0.self_attention.linear_qkv."
// (weight, and bias when the case holds one).
// add_bias = false leaves the bias to the caller (a fused bias-activation).
DTensor column_parallel_forward(ModelContext& m, const std::string& prefix, const DTensor& x, LinearSaved& saved,
                                bool add_bias = true);
DTensor column_parallel_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                 const LinearSaved& saved);
DTensor row_parallel_forward(ModelContext& m, const std::string& prefix, const DTensor& x, LinearSaved& saved);
DTensor row_parallel_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                              const LinearSaved& saved);

// Sequence-parallel helpers over the TP group (identity when tp == 1 or, for
// the SP ones, without sequence parallelism).
DTensor gather_sequence(ModelContext& m, const DTensor& x);          // [rows, c] -> [tp * rows, c]
DTensor reduce_scatter_sequence(ModelContext& m, const DTensor& x);  // [rows, c] -> [rows / tp, c], summed
void all_reduce_tensor(ModelContext& m, DTensor& x);                 // sum over TP

}  // namespace paritron::opt
