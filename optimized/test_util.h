// Shared by the optimized side's tests that compare a sharded run with the
// reference through case files (layouts_test, components_test, fp8_test).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>

#include "common/tensor.h"

namespace paritron::opt::test_util {

// For every tensor the reference produced (taps excepted): the optimized run
// has it, with the same shape, and max |got - want| <= tol * max(1, max |want|).
// At least `min_compared` tensors must be compared.
inline void expect_matches(const std::map<std::string, Tensor>& got, const std::map<std::string, Tensor>& want,
                           double tol, const std::string& what, int min_compared = 2) {
  int compared = 0;
  for (const auto& [name, expected] : want) {
    if (name.rfind("outputs.intermediate.", 0) == 0) continue;
    auto it = got.find(name);
    ASSERT_NE(it, got.end()) << what << ": the optimized run lacks " << name;
    ASSERT_EQ(it->second.shape(), expected.shape()) << what << ": " << name;
    double scale = 1.0, worst = 0.0;
    int64_t worst_at = 0;
    for (int64_t i = 0; i < expected.numel(); ++i) scale = std::max(scale, std::abs(expected.get(i)));
    for (int64_t i = 0; i < expected.numel(); ++i) {
      const double e = std::abs(it->second.get(i) - expected.get(i));
      if (e > worst) worst = e, worst_at = i;
    }
    EXPECT_LE(worst / scale, tol) << what << ": " << name << " element " << worst_at << " expected "
                                  << expected.get(worst_at) << " got " << it->second.get(worst_at);
    ++compared;
  }
  EXPECT_GE(compared, min_compared) << what;
}

}  // namespace paritron::opt::test_util
