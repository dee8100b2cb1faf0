// The one place results are compared (style.md, "One comparison").
//
// compare(expected, actual, tolerance) walks both tensors element by element
// with torch.allclose's semantics, which is what the case format's rule
// |actual - expected| <= atol + rtol * |expected| (shared/spec/case-format.md)
// means for non-finite values: an infinity passes only against the same
// infinity, and a NaN never passes (unless CompareOptions::equal_nan, where
// NaN matches NaN). Integer and boolean tensors must match exactly, compared
// as integers (not through double, which would merge values past 2^53).
// It reports the error metrics Paritron uses everywhere: max abs / max rel
// error, RMS error, NMSE, cosine similarity, ULP distance in the actual's float
// format, and the worst element and the first out-of-tolerance elements with
// their multi-indices.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/tensor.h"

namespace paritron {

struct Tolerance {
  double rtol = 0.0;
  double atol = 0.0;
};

// One element of a comparison, located by its multi-index.
struct ElementReport {
  int64_t flat_index = -1;
  Shape index;
  double expected = 0.0;
  double actual = 0.0;
  double abs_error = 0.0;
  double allowed = 0.0;  // atol + rtol * |expected| at this element
};

struct CompareReport {
  std::string name;           // e.g. "outputs.output"
  Tolerance tolerance;
  int64_t numel = 0;
  bool shape_mismatch = false;
  std::string mismatch_detail;  // why the shapes cannot be compared

  double max_abs_error = 0.0;
  double max_rel_error = 0.0;   // max over elements with expected != 0 of |err| / |expected|
  double rms_error = 0.0;       // sqrt(mean(err^2))
  double nmse = 0.0;            // sum(err^2) / sum(expected^2) (0 when both are 0)
  double cosine_similarity = 1.0;
  int64_t max_ulp_distance = 0; // in the actual's float format (F64 for integers: 0/exact)

  int64_t nan_mismatches = 0;   // failing NaNs: on one side only, or on both without equal_nan
  int64_t inf_mismatches = 0;   // inf on one side only, or infs of opposite sign
  int64_t out_of_tolerance = 0; // elements failing the test, non-finite mismatches included
  ElementReport worst;          // largest abs_error / allowed (or first non-finite mismatch)
  std::vector<ElementReport> first_failures;  // up to max_failures_listed, in index order

  bool ok() const { return !shape_mismatch && out_of_tolerance == 0; }
  std::string summary() const;   // one line: PASS/FAIL name max_abs ... worst [i,j] exp/act
  std::string details() const;   // summary plus the listed failures, one per line
};

struct CompareOptions {
  int max_failures_listed = 10;
  bool equal_nan = false;  // NaN in both tensors at one element counts as a match
};

CompareReport compare(const std::string& name, const Tensor& expected, const Tensor& actual,
                      Tolerance tolerance, const CompareOptions& options = {});

// ULP distance between two values in a float format: |index(a) - index(b)| on
// the format's number line, after rounding a (e.g. a float64 truth) to it.
int64_t ulp_distance(double a, double b, DType format);

}  // namespace paritron
