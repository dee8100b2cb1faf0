// The parity tolerance model (issue #6): when an optimized result is close
// enough to the float64 truth. See parity/README.md, "Tolerance model", for
// the measured distributions the constants rest on.
//
// Per output tensor T (every floating tensor the truth and the optimized run
// both hold):
//
//   error           = max_i |actual_i - truth_i|
//   reference_error = max_i |emulated_i - truth_i|   (the reference emulating
//                     Megatron in the same dtype: ref::run_reference with
//                     ReferenceOptions::dtype, or expected_for_layout)
//   scale           = max_i |truth_i|
//   floor           = c * u(dtype) * sqrt(n) * scale
//   sensitivity     = max_i |perturbed_i - truth_i|   (the float64 truth of the
//                     case with weights and inputs perturbed by a relative
//                     2^-24, parity/sensitivity.h: the conditioning the
//                     emulation, computing inside kernels in float64, misses)
//   pooled_error    = the (lower) median over the tensors T' of the family
//                     (every output, or every gradient; pooled when it has 3
//                     or more) of reference_error(T') / scale(T'), times
//                     scale: the emulation's typical relative error, a stable
//                     estimate where one tensor's max is a lucky draw
//   bound           = k * max(reference_error, pooled_error)
//                     + k_s * sensitivity + floor
//   passed          = error <= bound
//
// u is the dtype's unit roundoff (2^-53 F64, 2^-24 F32, 2^-11 F16, 2^-8
// BF16); n is the case's reduction length (reduction_length(case): the
// longest sum a GEMM or a norm of the case runs). Both errors are max-abs
// over the whole tensor: the optimized side computes the same function with
// other summation orders, blockings and layouts, so its elementwise error
// pattern differs from the emulation's while the size of the error does not;
// max-abs over the tensor compares the sizes. Element-wise (rtol-style)
// comparisons cry wolf at elements near zero, where cancellation makes the
// relative error of any rounding arbitrarily large.
//
// The floor covers what the emulation cannot predict: a tensor whose
// emulated error is accidentally tiny (a loss scalar, a gradient the
// reference happens to round favourably) while a different order of the
// same sums gives the usual u * sqrt(n) growth.
//
// Integer and boolean tensors (expert indices, token counts) must match
// exactly; ToleranceParams::skip names tensors to leave out (the harness's
// near-tie handling of routing decisions, which judges them separately and
// counts them), reported with passed = true and skipped = true.
// Non-finite values: an actual NaN or infinity where the truth is finite
// fails (error = +inf); where the truth itself is non-finite the actual must
// hold the same value.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/case_file.h"
#include "common/dtype.h"
#include "common/tensor.h"

namespace paritron::parity {

struct ToleranceParams {
  // k: how many times the emulated reference's error the optimized may make.
  double k = 0.0;  // 0: the measured default for the dtype (default_k)
  // c: the floor's multiple of u * sqrt(n) * scale.
  double c = 0.0;  // 0: the measured default (default_c)
  // The float64 truth of the perturbed case (parity/sensitivity.h); null: no
  // conditioning term.
  const std::map<std::string, Tensor>* perturbed = nullptr;
  // k_s: the multiple of the sensitivity the optimized may add.
  double k_sensitivity = 0.0;  // 0: the measured default (default_k_sensitivity)
  // Tensors judged elsewhere.
  std::set<std::string> skip;
  // Tensors whose names start with this are left out unless the actual has
  // them (the reference's intermediate taps; the optimized side records none).
  std::string optional_prefix = "outputs.intermediate.";
};

// The measured constants (parity/README.md).
double default_k(DType dtype);
double default_c(DType dtype);
double default_k_sensitivity(DType dtype);

// Unit roundoff of a floating dtype: 2^-53, 2^-24, 2^-11, 2^-8, 2^-4 (F8_E4M3),
// 2^-3 (F8_E5M2). Throws Error for an integer dtype.
double unit_roundoff(DType dtype);

// The reduction length of a case: the longest sum its forward or backward
// runs, max(hidden (QKV, fc1, norms), ffn or expert ffn (fc2), heads x
// kv_channels (linear_proj), key length (softmax . V; the query length for
// self attention), tokens b * s (weight gradients sum over tokens)). At least 1.
int64_t reduction_length(const Case& c);

struct TensorVerdict {
  std::string name;
  bool passed = false;
  bool skipped = false;          // in ToleranceParams::skip: not judged here
  bool integral = false;         // judged exactly
  double error = 0;              // max |actual - truth|
  double bound = 0;              // k * max(reference_error, pooled_error) + k_s * sensitivity + floor
  double reference_error = 0;    // max |emulated - truth|
  double floor = 0;              // c * u * sqrt(n) * scale
  double sensitivity = 0;        // max |perturbed truth - truth| (0 without ToleranceParams::perturbed)
  double pooled_error = 0;       // the family's median reference_error / scale, times this scale
  double needed_k = 0;           // the smallest k this tensor passes with (calibration; +inf: the
                                 // reference error is 0 and the floor does not cover the error)
  double scale = 0;              // max |truth|
  int64_t worst_index = -1;      // flat index of the largest |actual - truth| (-1: none)
  Shape shape;                   // the tensor's shape (worst_position() turns worst_index into a multi-index)
  double expected = 0, actual = 0;  // truth and actual at worst_index
  std::string note;              // why it failed beyond the numbers (missing, shape), else empty

  // error / bound (0 when both are 0; +inf when only the bound is 0).
  double ratio() const;
  // "[s, b, h]" of worst_index in shape (row-major), "" when none.
  std::string worst_position() const;
  // One line: PASS/FAIL name error bound (its parts) worst [multi-index] expected / actual.
  std::string summary() const;
};

// Judges every tensor of `truth` (except optional_prefix ones the actual
// lacks, and `skip`) and every tensor only `actual` holds (failed: not in
// the truth). `emulated` may lack a tensor (reference_error 0: the floor
// alone). reduction_length: reduction_length(case).
std::vector<TensorVerdict> judge(const std::map<std::string, Tensor>& truth,
                                 const std::map<std::string, Tensor>& emulated,
                                 const std::map<std::string, Tensor>& actual, DType dtype,
                                 int64_t reduction_length, const ToleranceParams& p = {});

// Whether every verdict passed.
bool all_passed(const std::vector<TensorVerdict>& verdicts);

}  // namespace paritron::parity
