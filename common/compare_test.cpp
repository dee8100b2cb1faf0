// Tests of the one comparison: hand-computed metrics, NaN/inf rules, exact
// integers, locations of the worst and failing elements, ULP distances.
#include "common/compare.h"

#include <cmath>
#include <limits>

#include <gtest/gtest.h>

namespace paritron {
namespace {

Tensor make(DType dtype, Shape shape, std::vector<double> values) {
  return Tensor::from_values(dtype, std::move(shape), values);
}

TEST(Compare, HandComputedMetrics) {
  const Tensor expected = make(DType::F64, {2, 2}, {1, 2, 3, 4});
  const Tensor actual = make(DType::F64, {2, 2}, {1, 2, 3.5, 4});
  const CompareReport r = compare("outputs.output", expected, actual, {.rtol = 0.0, .atol = 0.1});
  EXPECT_FALSE(r.ok());
  EXPECT_DOUBLE_EQ(r.max_abs_error, 0.5);
  EXPECT_DOUBLE_EQ(r.max_rel_error, 0.5 / 3.0);
  EXPECT_DOUBLE_EQ(r.rms_error, std::sqrt(0.25 / 4.0));
  EXPECT_DOUBLE_EQ(r.nmse, 0.25 / 30.0);
  EXPECT_DOUBLE_EQ(r.cosine_similarity, (1 + 4 + 10.5 + 16) / (std::sqrt(30.0) * std::sqrt(33.25)));
  EXPECT_EQ(r.out_of_tolerance, 1);
  ASSERT_EQ(r.first_failures.size(), 1u);
  EXPECT_EQ(r.first_failures[0].index, (Shape{1, 0}));
  EXPECT_EQ(r.worst.index, (Shape{1, 0}));
  EXPECT_DOUBLE_EQ(r.worst.expected, 3.0);
  EXPECT_DOUBLE_EQ(r.worst.actual, 3.5);
  EXPECT_NE(r.summary().find("FAIL outputs.output"), std::string::npos);
  EXPECT_NE(r.summary().find("[1,0]"), std::string::npos);
  EXPECT_NE(r.details().find("expected 3, actual 3.5"), std::string::npos);
}

TEST(Compare, ToleranceBoundaryIsInclusiveAndRelativeToExpected) {
  const Tensor expected = make(DType::F64, {2}, {2.0, -4.0});
  const Tensor actual = make(DType::F64, {2}, {2.25, -4.5});
  // allowed = 0.05 + 0.1 * |expected| = 0.25 and 0.45
  const CompareReport r = compare("x", expected, actual, {.rtol = 0.1, .atol = 0.05});
  EXPECT_EQ(r.out_of_tolerance, 1);
  EXPECT_EQ(r.first_failures.at(0).flat_index, 1);
  EXPECT_DOUBLE_EQ(r.first_failures.at(0).allowed, 0.45);
  EXPECT_TRUE(compare("x", expected, actual, {.rtol = 0.1, .atol = 0.1}).ok());
}

TEST(Compare, IdenticalTensorsPass) {
  const Tensor t = make(DType::F32, {3}, {0.5, -1.25, 8});
  const CompareReport r = compare("x", t, t, {});
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.max_abs_error, 0.0);
  EXPECT_EQ(r.nmse, 0.0);
  EXPECT_DOUBLE_EQ(r.cosine_similarity, 1.0);
  EXPECT_EQ(r.summary().find("worst"), std::string::npos);
}

TEST(Compare, NanNeverPassesUnlessEqualNanIsAsked) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const Tensor expected = make(DType::F64, {3}, {nan, 1.0, 2.0});
  const CompareReport strict = compare("x", expected, make(DType::F64, {3}, {nan, 1.0, 2.0}), {.rtol = 1, .atol = 1});
  EXPECT_FALSE(strict.ok());  // torch.allclose(equal_nan=False)
  EXPECT_EQ(strict.nan_mismatches, 1);
  EXPECT_TRUE(compare("x", expected, make(DType::F64, {3}, {nan, 1.0, 2.0}), {}, {.equal_nan = true}).ok());
  const CompareReport r = compare("x", expected, make(DType::F64, {3}, {nan, nan, 2.0}), {.rtol = 1, .atol = 1}, {.equal_nan = true});
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.nan_mismatches, 1);
  EXPECT_EQ(r.worst.flat_index, 1);
  const CompareReport r2 = compare("x", expected, make(DType::F64, {3}, {0.0, 1.0, 2.0}), {.rtol = 1, .atol = 1}, {.equal_nan = true});
  EXPECT_EQ(r2.nan_mismatches, 1);
  EXPECT_NE(r2.summary().find("NaN mismatches"), std::string::npos);
}

TEST(Compare, InfinitiesMustMatchInSign) {
  const double inf = std::numeric_limits<double>::infinity();
  const Tensor expected = make(DType::F64, {3}, {inf, -inf, 1.0});
  EXPECT_TRUE(compare("x", expected, make(DType::F64, {3}, {inf, -inf, 1.0}), {}).ok());
  const CompareReport r = compare("x", expected, make(DType::F64, {3}, {-inf, 1e300, 1.0}), {.rtol = 1e9, .atol = 1e300});
  EXPECT_EQ(r.inf_mismatches, 2);
  EXPECT_EQ(r.out_of_tolerance, 2);
}

TEST(Compare, IntegersAreExactWhateverTheTolerance) {
  const Tensor expected = make(DType::I64, {2}, {1, 2});
  const CompareReport r = compare("outputs.router_indices", expected, make(DType::I64, {2}, {1, 3}), {.rtol = 10, .atol = 10});
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.tolerance.atol, 0.0);
  EXPECT_TRUE(compare("m", make(DType::BOOL, {2}, {0, 1}), make(DType::BOOL, {2}, {0, 1}), {}).ok());
  // Past 2^53 neighbouring integers are one double: they must still differ.
  Tensor a(DType::I64, {1}), b(DType::I64, {1});
  a.set_int(0, int64_t{1} << 53);
  b.set_int(0, (int64_t{1} << 53) + 1);
  EXPECT_FALSE(compare("counts", a, b, {}).ok());
  EXPECT_TRUE(compare("counts", b, b, {}).ok());
}

TEST(Compare, ShapeMismatchIsReported) {
  const CompareReport r = compare("x", Tensor(DType::F32, {2, 3}), Tensor(DType::F32, {3, 2}), {});
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(r.shape_mismatch);
  EXPECT_NE(r.summary().find("shape [2, 3] expected, [3, 2] actual"), std::string::npos);
}

TEST(Compare, ListsFirstFailuresAndCountsAll) {
  std::vector<double> zeros(100, 0.0), ones(100, 1.0);
  const CompareReport r = compare("x", make(DType::F64, {10, 10}, zeros), make(DType::F64, {10, 10}, ones),
                                  {.rtol = 0, .atol = 0.5}, {.max_failures_listed = 3});
  EXPECT_EQ(r.out_of_tolerance, 100);
  ASSERT_EQ(r.first_failures.size(), 3u);
  EXPECT_EQ(r.first_failures[2].index, (Shape{0, 2}));
  EXPECT_NE(r.details().find("... and 97 more"), std::string::npos);
}

TEST(Compare, NmseAndCosineAgainstZeroTruth) {
  const Tensor zero = make(DType::F64, {2}, {0, 0});
  const CompareReport r = compare("x", zero, make(DType::F64, {2}, {1e-3, 0}), {.rtol = 0, .atol = 1});
  EXPECT_TRUE(r.ok());
  EXPECT_TRUE(std::isinf(r.nmse));
  EXPECT_EQ(r.cosine_similarity, 0.0);
  EXPECT_EQ(r.max_rel_error, 0.0);  // relative error is undefined where expected is 0
}

TEST(UlpDistance, CountsValuesOfTheActualFormat) {
  EXPECT_EQ(ulp_distance(1.0, 1.0078125, DType::BF16), 1);  // bf16 has 7 fraction bits
  EXPECT_EQ(ulp_distance(1.0, 1.0 + 0x1p-23, DType::F32), 1);
  EXPECT_EQ(ulp_distance(1.0, 1.0 + 0x1p-52, DType::F64), 1);
  EXPECT_EQ(ulp_distance(-0x1p-149, 0x1p-149, DType::F32), 2);  // across zero: -min, 0, +min
  EXPECT_EQ(ulp_distance(0.0, -0.0, DType::F16), 0);
  EXPECT_EQ(ulp_distance(448.0, 416.0, DType::F8_E4M3), 1);
  EXPECT_EQ(ulp_distance(1.0, 1.001, DType::BF16), 0);  // the truth rounds to the same bf16
  // In a compare, the distance is measured in the actual's format.
  const CompareReport r = compare("x", make(DType::F64, {1}, {1.0}), make(DType::BF16, {1}, {1.015625}), {.rtol = 1, .atol = 0});
  EXPECT_EQ(r.max_ulp_distance, 2);
}

}  // namespace
}  // namespace paritron
