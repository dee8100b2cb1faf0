#include "common/compare.h"

#include <cmath>
#include <cstdlib>
#include <limits>

#include <fmt/format.h>

namespace paritron {

int64_t ulp_distance(double a, double b, DType format) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b) ? 0 : std::numeric_limits<int64_t>::max();
  const math::FloatFormat* f = float_format(format);
  if (f == nullptr) {  // F64 (and integers, compared as doubles): the double number line
    const int64_t ia = math::ordered_index(math::bits_of(a), 63);
    const int64_t ib = math::ordered_index(math::bits_of(b), 63);
    // The difference of two 64-bit indices can overflow; saturate instead.
    if ((ia >= 0) != (ib >= 0) && std::abs(static_cast<double>(ia) - static_cast<double>(ib)) > 9.0e18) {
      return std::numeric_limits<int64_t>::max();
    }
    return std::abs(ia - ib);
  }
  const int width = f->exponent_bits + f->mantissa_bits;
  const int64_t ia = math::ordered_index(math::encode(a, *f), width);
  const int64_t ib = math::ordered_index(math::encode(b, *f), width);
  return std::abs(ia - ib);
}

namespace {

ElementReport element(const Tensor& t, int64_t i, double expected, double actual, double allowed) {
  ElementReport e;
  e.flat_index = i;
  e.index = t.unravel(i);
  e.expected = expected;
  e.actual = actual;
  e.abs_error = std::isfinite(expected) && std::isfinite(actual) ? std::abs(actual - expected)
                                                                  : std::numeric_limits<double>::infinity();
  e.allowed = allowed;
  return e;
}

std::string index_string(const Shape& index) { return fmt::format("[{}]", fmt::join(index, ",")); }

}  // namespace

CompareReport compare(const std::string& name, const Tensor& expected, const Tensor& actual,
                      Tolerance tolerance, const CompareOptions& options) {
  CompareReport r;
  r.name = name;
  r.numel = expected.numel();
  if (expected.shape() != actual.shape()) {
    r.shape_mismatch = true;
    r.mismatch_detail = fmt::format("shape {} expected, {} actual", shape_string(expected.shape()),
                                    shape_string(actual.shape()));
    return r;
  }
  const bool exact = is_integral(expected.dtype()) || is_integral(actual.dtype());
  if (exact) tolerance = {};  // indices, counts and masks must match exactly
  const bool both_integral = is_integral(expected.dtype()) && is_integral(actual.dtype());
  r.tolerance = tolerance;

  double sum_sq_err = 0.0, sum_sq_exp = 0.0, sum_sq_act = 0.0, dot = 0.0;
  int64_t finite_pairs = 0;
  double worst_badness = -1.0;
  for (int64_t i = 0; i < r.numel; ++i) {
    const double e = expected.get(i);
    const double a = actual.get(i);
    const double allowed = tolerance.atol + tolerance.rtol * std::abs(e);
    bool fails = false;
    double err = 0.0;
    if (std::isnan(e) || std::isnan(a)) {
      fails = !(options.equal_nan && std::isnan(e) && std::isnan(a));
      if (fails) ++r.nan_mismatches;
    } else if (std::isinf(e) || std::isinf(a)) {
      fails = e != a;
      if (fails) ++r.inf_mismatches;
    } else {
      err = std::abs(a - e);
      ++finite_pairs;
      sum_sq_err += err * err;
      sum_sq_exp += e * e;
      sum_sq_act += a * a;
      dot += e * a;
      r.max_abs_error = std::max(r.max_abs_error, err);
      if (e != 0.0) r.max_rel_error = std::max(r.max_rel_error, err / std::abs(e));
      r.max_ulp_distance = std::max(r.max_ulp_distance, ulp_distance(e, a, actual.dtype()));
      fails = both_integral ? expected.get_int(i) != actual.get_int(i) : !(err <= allowed);
    }
    // How badly the element fares: error over allowance; infinite for a
    // non-finite mismatch or for any error where nothing was allowed.
    const double badness = fails && err == 0.0 ? std::numeric_limits<double>::infinity()
                           : err == 0.0        ? 0.0
                           : allowed > 0.0     ? err / allowed
                                               : std::numeric_limits<double>::infinity();
    if (badness > worst_badness) {
      worst_badness = badness;
      r.worst = element(expected, i, e, a, allowed);
    }
    if (fails) {
      ++r.out_of_tolerance;
      if (static_cast<int>(r.first_failures.size()) < options.max_failures_listed) {
        r.first_failures.push_back(element(expected, i, e, a, allowed));
      }
    }
  }
  if (finite_pairs > 0) {
    r.rms_error = std::sqrt(sum_sq_err / static_cast<double>(finite_pairs));
    r.nmse = sum_sq_exp > 0.0 ? sum_sq_err / sum_sq_exp : (sum_sq_err > 0.0 ? std::numeric_limits<double>::infinity() : 0.0);
    const double norms = std::sqrt(sum_sq_exp) * std::sqrt(sum_sq_act);
    r.cosine_similarity = norms > 0.0 ? dot / norms : (sum_sq_exp == sum_sq_act ? 1.0 : 0.0);
  }
  return r;
}

std::string CompareReport::summary() const {
  if (shape_mismatch) return fmt::format("FAIL {}: {}", name, mismatch_detail);
  std::string line = fmt::format(
      "{} {}: {} elements, max_abs {:.3e}, max_rel {:.3e}, rms {:.3e}, nmse {:.3e}, cos {:.9f}, "
      "max_ulp {}, tol rtol={:.1e} atol={:.1e}",
      ok() ? "PASS" : "FAIL", name, numel, max_abs_error, max_rel_error, rms_error, nmse,
      cosine_similarity, max_ulp_distance, tolerance.rtol, tolerance.atol);
  if (!ok()) {
    line += fmt::format(", {} out of tolerance", out_of_tolerance);
    if (nan_mismatches > 0) line += fmt::format(" ({} NaN mismatches)", nan_mismatches);
    if (inf_mismatches > 0) line += fmt::format(" ({} inf mismatches)", inf_mismatches);
  }
  if (worst.flat_index >= 0 && (worst.abs_error > 0.0 || !ok())) {
    line += fmt::format("; worst at {}: expected {:.9g}, actual {:.9g}", index_string(worst.index),
                        worst.expected, worst.actual);
  }
  return line;
}

std::string CompareReport::details() const {
  std::string out = summary();
  for (const ElementReport& e : first_failures) {
    out += fmt::format("\n  at {}: expected {:.17g}, actual {:.17g}, |err| {:.3e} > allowed {:.3e}",
                       index_string(e.index), e.expected, e.actual, e.abs_error, e.allowed);
  }
  if (out_of_tolerance > static_cast<int64_t>(first_failures.size())) {
    out += fmt::format("\n  ... and {} more", out_of_tolerance - static_cast<int64_t>(first_failures.size()));
  }
  return out;
}

}  // namespace paritron
