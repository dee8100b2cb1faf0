// Tests of the single-source math (optimized/math/*.h) on its own: the
// accuracy of the fp32 exp / tanh the activations use.
#include <gtest/gtest.h>

#include <cmath>

#include "optimized/math/activations.h"

namespace paritron::math {
namespace {

// Relative error in units of 2^-24 (half an fp32 ulp at 1) over a dense grid.
TEST(FastMath, ExpWithinTwoUlp) {
  double worst = 0;
  for (float x = -87.0f; x < 88.0f; x += 0.0137f) {
    const double e = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(static_cast<double>(fast_expf(x)) - e) / e);
  }
  EXPECT_LT(worst, 2.5e-7);
  EXPECT_EQ(fast_expf(0.0f), 1.0f);
  EXPECT_GT(fast_expf(-200.0f), 0.0f);  // clamped, tiny, finite
  EXPECT_LT(fast_expf(-200.0f), 1.3e-38f);
  EXPECT_TRUE(std::isfinite(fast_expf(200.0f)));
}

TEST(FastMath, TanhWithinTwoUlpAndOdd) {
  double worst = 0;
  for (float x = -12.0f; x < 12.0f; x += 0.00317f) {
    const double t = std::tanh(static_cast<double>(x));
    worst = std::max(worst, std::abs(static_cast<double>(fast_tanhf(x)) - t) / std::abs(t));
    ASSERT_EQ(fast_tanhf(-x), -fast_tanhf(x)) << x;
  }
  EXPECT_LT(worst, 3e-7);
  EXPECT_EQ(fast_tanhf(0.0f), 0.0f);
  EXPECT_EQ(fast_tanhf(20.0f), 1.0f);
  EXPECT_EQ(fast_tanhf(-1e-20f), -1e-20f);
}

TEST(FastMath, ErfWithinTwoUlp) {
  double worst = 0;
  for (float x = -6.0f; x < 6.0f; x += 0.00123f) {
    const double e = std::erf(static_cast<double>(x));
    worst = std::max(worst, std::abs(static_cast<double>(fast_erff(x)) - e) / std::abs(e));
    ASSERT_EQ(fast_erff(-x), -fast_erff(x)) << x;
  }
  EXPECT_LT(worst, 2.5e-7);
  EXPECT_EQ(fast_erff(0.0f), 0.0f);
  EXPECT_EQ(fast_erff(10.0f), 1.0f);
}

TEST(FastMath, ActivationsFloatCloseToDouble) {
  for (int k = 0; k < 8; ++k) {
    const Act a = static_cast<Act>(k);
    for (float x = -9.0f; x < 9.0f; x += 0.01f) {
      const double vd = act_value(a, static_cast<double>(x));
      const double dd = act_derivative(a, static_cast<double>(x));
      EXPECT_NEAR(act_value(a, x), vd, 2e-6 * (1 + std::abs(vd))) << k << " " << x;
      EXPECT_NEAR(act_derivative(a, x), dd, 2e-6 * (1 + std::abs(dd))) << k << " " << x;
    }
  }
}

}  // namespace
}  // namespace paritron::math
