// Central finite differences in float64: the check that every hand-written
// backward in reference/ is the derivative of its forward (issue #3, "Tests").
//
// A test collects every differentiable tensor of a component (inputs and
// weights) in one MatMap, writes the scalar L(vars) the case format defines
// (sum(output * grad_output) + ...), runs its backward once for the analytic
// gradients, and calls gradcheck: each checked element is perturbed by +-eps
// and (L(+) - L(-)) / (2 eps) is compared with the analytic value.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "reference/core.h"

namespace paritron::ref {

struct GradcheckOptions {
  double eps = 1e-6;
  double rtol = 1e-6;             // |fd - analytic| <= atol + rtol * max(|fd|, |analytic|)
  double atol = 1e-8;
  int64_t max_elements_per_tensor = 64;  // larger tensors: this many elements at evenly spread indices
};

struct GradcheckFailure {
  std::string tensor;
  int64_t row = 0, col = 0;
  double finite_difference = 0, analytic = 0;
};

struct GradcheckResult {
  int64_t checked = 0;
  std::vector<GradcheckFailure> failures;
  bool ok() const { return failures.empty() && checked > 0; }
  std::string describe() const;  // the first failures, one per line
};

// `analytic` must hold a gradient for every tensor of `vars` (a missing one is
// a failure: a weight without a gradient is a bug, or it must be zero and
// present as such).
GradcheckResult gradcheck(const std::function<double(const MatMap&)>& loss, const MatMap& vars,
                          const MatMap& analytic, const GradcheckOptions& options = {});

// Test inputs: an [rows, cols] Mat of N(0, stddev) draws from the counter-based
// RNG keyed by (seed, name), reproducible on every machine.
Mat random_normal(int64_t rows, int64_t cols, uint64_t seed, std::string_view name, double stddev = 1.0);
// Uniform on (low, high).
Mat random_uniform(int64_t rows, int64_t cols, uint64_t seed, std::string_view name, double low, double high);

// sum(a .* b): the usual L = sum(output * grad_output).
inline double dot(const Mat& a, const Mat& b) { return a.cwiseProduct(b).sum(); }

}  // namespace paritron::ref
