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
#pragma once

#include <string>

#include "optimized/model/context.h"

namespace paritron::opt {

struct LinearSaved {
  DTensor input;  // what the GEMM multiplied: the gathered input of a column linear, the input of a row linear
};

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
