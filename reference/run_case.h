// Running the reference on a case file (shared/spec/case-format.md): the
// entry point of `paritron check` and, later, of the parity harness. Eigen-free
// so that the command line and the harness include it cheaply.
//
// run_reference reads the case's weights and inputs, runs the component's
// forward, and, when the case holds `inputs.grad_output`, its backward of
//   L = sum(outputs.output * inputs.grad_output)
//     + sum(outputs.output_bias * inputs.grad_output_bias)   (when present)
//     + the MoE aux_loss and z_loss (gradient scale 1)
// producing `grads.inputs.<name>` and `grads.weights.<key>`. Intermediate taps
// (`outputs.intermediate.<module path>`) come from the modules that record
// them. Everything produced is float64 (or the emulated dtype's values held
// in float64).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "common/case_file.h"
#include "common/tensor.h"

namespace paritron::ref {

struct ReferenceOptions {
  DType dtype = DType::F64;  // F64: the truth; F32/BF16/F16: emulate Megatron running in that dtype
  bool backward = true;      // run the backward when the case has inputs.grad_output
  // F64 only: round where Megatron forces float32 in a float64 model (the
  // router's fp32 softmax), as Megatron's own float64 outputs are. false gives
  // the smooth float64 function (finite-difference checks).
  bool forced_fp32 = true;
};

struct ReferenceResult {
  std::map<std::string, Tensor> tensors;  // outputs.*, outputs.intermediate.*, grads.* by case-file name
  std::vector<std::string> notes;         // what was not run and why ("no inputs.grad_output: backward skipped")
};

// Throws Error (naming the tensor) for a missing or misshapen weight or input,
// and for a component or feature the reference does not support.
ReferenceResult run_reference(const Case& c, const ReferenceOptions& options = {});

}  // namespace paritron::ref
