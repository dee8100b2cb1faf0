// Tests of reference/norm.h (layernorm.cpp, rmsnorm.cpp): hand-computed
// values, zero-centered gamma, finite-difference gradients of x, weight and
// bias, invariants, precision emulation, errors.
#include "reference/norm.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <string>

#include "common/error.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

Mat row_of(std::initializer_list<double> v) {
  Mat m(1, static_cast<Eigen::Index>(v.size()));
  Eigen::Index i = 0;
  for (double d : v) m(0, i++) = d;
  return m;
}

TransformerConfig config(const std::string& normalization, double eps, bool zero_centered = false) {
  TransformerConfig cfg;
  cfg.normalization = normalization;
  cfg.layernorm_epsilon = eps;
  cfg.layernorm_zero_centered_gamma = zero_centered;
  return cfg;
}

// x = [1, 2, 3, 4]: mean 2.5, deviations [-1.5, -0.5, 0.5, 1.5], biased
// variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25. With eps = 0.3125,
// var + eps = 1.5625 = 1.25^2, so rstd = 0.8 and xhat = [-1.2, -0.4, 0.4, 1.2].
// gamma = [1, 2, 0.5, -1], beta = [0.1, 0, 0, 1]:
// y = [-1.2 + 0.1, -0.8, 0.2, -1.2 + 1] = [-1.1, -0.8, 0.2, -0.2].
TEST(LayerNorm, HandComputedBiasedVariance) {
  const TransformerConfig cfg = config("LayerNorm", 0.3125);
  MatMap map{{"ln.weight", row_of({1, 2, 0.5, -1})}, {"ln.bias", row_of({0.1, 0, 0, 1})}};
  const NormForward f = layernorm_forward(cfg, Params(map).sub("ln"), row_of({1, 2, 3, 4}), truth_precision());
  const double expected[] = {-1.1, -0.8, 0.2, -0.2};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(f.output(0, i), expected[i], 1e-15) << i;
  EXPECT_NEAR(f.rstd[0], 0.8, 1e-16);
  EXPECT_NEAR(f.normalized(0, 0), -1.2, 1e-15);
  EXPECT_NEAR(f.normalized(0, 3), 1.2, 1e-15);
}

// The same output with zero-centered gamma: stored weight = gamma - 1.
TEST(LayerNorm, ZeroCenteredGammaAddsOne) {
  const TransformerConfig cfg = config("LayerNorm", 0.3125, /*zero_centered=*/true);
  MatMap map{{"ln.weight", row_of({0, 1, -0.5, -2})}, {"ln.bias", row_of({0.1, 0, 0, 1})}};
  const NormForward f = layernorm_forward(cfg, Params(map).sub("ln"), row_of({1, 2, 3, 4}), truth_precision());
  const double expected[] = {-1.1, -0.8, 0.2, -0.2};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(f.output(0, i), expected[i], 1e-15) << i;
}

// Backward by hand, same x and eps (rstd 0.8, xhat [-1.2, -0.4, 0.4, 1.2]),
// gamma = 1, dy = [1, 0, 0, 0]: g = dy, mean(g) = 0.25,
// mean(g xhat) = -1.2 / 4 = -0.3, dx = 0.8 (g - 0.25 + 0.3 xhat)
// = 0.8 [0.39, -0.37, -0.13, 0.11] = [0.312, -0.296, -0.104, 0.088];
// dgamma = dy xhat = [-1.2, 0, 0, 0], dbeta = dy.
TEST(LayerNorm, HandComputedBackward) {
  const TransformerConfig cfg = config("LayerNorm", 0.3125);
  MatMap map{{"ln.weight", row_of({1, 1, 1, 1})}, {"ln.bias", row_of({0, 0, 0, 0})}};
  const Mat x = row_of({1, 2, 3, 4});
  const Params w = Params(map).sub("ln");
  const NormForward f = layernorm_forward(cfg, w, x, truth_precision());
  MatMap grads;
  const Mat dx = layernorm_backward(cfg, w, x, f, row_of({1, 0, 0, 0}), Sink(grads).sub("ln"), truth_precision());
  const double expected[] = {0.312, -0.296, -0.104, 0.088};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(dx(0, i), expected[i], 1e-15) << i;
  EXPECT_NEAR(grads.at("ln.weight")(0, 0), -1.2, 1e-15);
  EXPECT_EQ(grads.at("ln.weight")(0, 1), 0.0);
  EXPECT_EQ(grads.at("ln.bias"), row_of({1, 0, 0, 0}));
}

// RMSNorm on x = [1, 2, 3, 4]: mean(x^2) = 30 / 4 = 7.5; eps = 1.5 gives
// rstd = 1 / sqrt(9) = 1/3, xhat = [1/3, 2/3, 1, 4/3]; gamma = [3, 1.5, 1, -0.75]
// gives y = [1, 1, 1, -1]. No mean subtraction: a LayerNorm would differ.
TEST(RmsNorm, HandComputed) {
  const TransformerConfig cfg = config("RMSNorm", 1.5);
  MatMap map{{"n.weight", row_of({3, 1.5, 1, -0.75})}};
  const NormForward f = rmsnorm_forward(cfg, Params(map).sub("n"), row_of({1, 2, 3, 4}), truth_precision());
  const double expected[] = {1, 1, 1, -1};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(f.output(0, i), expected[i], 1e-15) << i;
  EXPECT_NEAR(f.rstd[0], 1.0 / 3.0, 1e-16);
  // Zero-centered: weight = gamma - 1, same output.
  MatMap zc{{"n.weight", row_of({2, 0.5, 0, -1.75})}};
  const NormForward g = rmsnorm_forward(config("RMSNorm", 1.5, true), Params(zc).sub("n"), row_of({1, 2, 3, 4}),
                                        truth_precision());
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(g.output(0, i), expected[i], 1e-15) << i;
}

// RMSNorm backward by hand (x, eps as above, gamma = 1, dy = [1, 0, 0, 0]):
// mean(g xhat) = (1/3) / 4 = 1/12, dx = (1/3)(g - xhat / 12)
// = (1/3) [1 - 1/36, -2/36, -3/36, -4/36] = [35, -2, -3, -4] / 108; dgamma = [1/3, 0, 0, 0].
TEST(RmsNorm, HandComputedBackward) {
  const TransformerConfig cfg = config("RMSNorm", 1.5);
  MatMap map{{"n.weight", row_of({1, 1, 1, 1})}};
  const Mat x = row_of({1, 2, 3, 4});
  const Params w = Params(map).sub("n");
  const NormForward f = rmsnorm_forward(cfg, w, x, truth_precision());
  MatMap grads;
  const Mat dx = rmsnorm_backward(cfg, w, x, f, row_of({1, 0, 0, 0}), Sink(grads).sub("n"), truth_precision());
  const double expected[] = {35.0 / 108, -2.0 / 108, -3.0 / 108, -4.0 / 108};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(dx(0, i), expected[i], 1e-15) << i;
  EXPECT_NEAR(grads.at("n.weight")(0, 0), 1.0 / 3.0, 1e-16);
  EXPECT_EQ(grads.count("n.bias"), 0u);
}

// Central finite differences of L = sum(y * dy) in x, weight and (LayerNorm) bias.
void expect_gradcheck(const std::string& normalization, bool zero_centered, uint64_t seed) {
  const TransformerConfig cfg = config(normalization, 1e-5, zero_centered);
  const int64_t tokens = 6, h = 10;
  MatMap vars{{"x", random_normal(tokens, h, seed, "x", 2.0)},
              {"norm.weight", random_normal(1, h, seed, "weight", 0.5)}};
  vars["x"].col(0).array() += 3.0;  // a non-zero mean, so the mean term matters
  if (!zero_centered) vars["norm.weight"].array() += 1.0;
  if (normalization == "LayerNorm") vars["norm.bias"] = random_normal(1, h, seed, "bias", 0.5);
  const Mat dy = random_normal(tokens, h, seed, "dy");
  const Precision p = truth_precision();

  const NormForward f = norm_forward(cfg, Params(vars).sub("norm"), vars.at("x"), p);
  MatMap analytic;
  analytic["x"] = norm_backward(cfg, Params(vars).sub("norm"), vars.at("x"), f, dy, Sink(analytic).sub("norm"), p);
  auto loss = [&](const MatMap& v) { return dot(norm_forward(cfg, Params(v).sub("norm"), v.at("x"), p).output, dy); };
  const GradcheckResult r = gradcheck(loss, vars, analytic, {.eps = 1e-6, .rtol = 1e-6, .atol = 1e-8});
  EXPECT_TRUE(r.ok()) << normalization << (zero_centered ? " zero-centered: " : ": ") << r.describe();
  EXPECT_EQ(r.checked, normalization == "LayerNorm" ? 60 + 10 + 10 : 60 + 10);
}

TEST(LayerNorm, Gradcheck) {
  expect_gradcheck("LayerNorm", false, 1);
  expect_gradcheck("LayerNorm", true, 2);
}

TEST(RmsNorm, Gradcheck) {
  expect_gradcheck("RMSNorm", false, 3);
  expect_gradcheck("RMSNorm", true, 4);
}

// Emulated precision: bf16 inputs and weights; the output is the truth on
// those inputs rounded once (within bf16's unit roundoff 2^-8), fp32 within
// 2^-24, and the truth is not representable in bf16.
TEST(Norms, EmulatedPrecision) {
  for (const char* name : {"LayerNorm", "RMSNorm"}) {
    const std::string normalization = name;
    const TransformerConfig cfg = config(normalization, 1e-5);
    MatMap map{{"n.weight", rounded((random_normal(1, 32, 5, "w", 0.3).array() + 1.0).matrix(), DType::BF16)},
               {"n.bias", rounded(random_normal(1, 32, 5, "b", 0.3), DType::BF16)}};
    const Mat x = rounded(random_normal(8, 32, 5, "x", 1.5), DType::BF16);
    const Params w = Params(map).sub("n");
    const Mat truth = norm_forward(cfg, w, x, truth_precision()).output;
    const Mat bf16 = norm_forward(cfg, w, x, emulated_precision(DType::BF16, cfg)).output;
    const Mat f32 = norm_forward(cfg, w, x, emulated_precision(DType::F32, cfg)).output;
    EXPECT_GT((truth - bf16).cwiseAbs().maxCoeff(), 0.0) << normalization;
    // The kernels compute in fp32 and round once to the dtype: within half an
    // ulp of the dtype plus a few fp32 ulps of the row's scale.
    const double scale = truth.cwiseAbs().maxCoeff();
    EXPECT_GT((truth - f32).cwiseAbs().maxCoeff(), 0.0) << normalization;
    for (Eigen::Index i = 0; i < truth.size(); ++i) {
      const double t = truth.data()[i];
      EXPECT_LE(std::abs(bf16.data()[i] - t), std::ldexp(std::abs(t), -8) + std::ldexp(scale, -20)) << normalization;
      EXPECT_LE(std::abs(f32.data()[i] - t), std::ldexp(scale, -20)) << normalization;
    }
    // The backward is rounded too.
    const Mat dy = rounded(random_normal(8, 32, 5, "dy"), DType::BF16);
    MatMap g_truth, g_bf16;
    const Mat dx_truth = norm_backward(cfg, w, x, norm_forward(cfg, w, x, truth_precision()), dy,
                                      Sink(g_truth).sub("n"), truth_precision());
    const Precision pb = emulated_precision(DType::BF16, cfg);
    const Mat dx_bf16 = norm_backward(cfg, w, x, norm_forward(cfg, w, x, pb), dy, Sink(g_bf16).sub("n"), pb);
    EXPECT_EQ(dx_bf16, rounded(dx_bf16, DType::BF16)) << normalization;
    const double dx_scale = dx_truth.cwiseAbs().maxCoeff();
    for (Eigen::Index i = 0; i < dx_truth.size(); ++i) {
      const double t = dx_truth.data()[i];
      EXPECT_LE(std::abs(dx_bf16.data()[i] - t), std::ldexp(std::abs(t), -8) + std::ldexp(dx_scale, -18))
          << normalization;
    }
    EXPECT_EQ(g_bf16.at("n.weight"), rounded(g_bf16.at("n.weight"), DType::BF16)) << normalization;
  }
}

// The emulation computes inside the norm in fp32, as the Apex and TE kernels
// do, so it sees what fp32 rounding does where the norm is ill-conditioned:
// over h = 2 features almost equal, x - mean cancels, and the backward's
// g - mean(g) - xhat mean(g xhat) cancels. There the fp32 emulation's error
// is far above rounding the float64 result once (which the harness's
// tolerance would otherwise take as the budget; parity/tolerance.h).
TEST(Norms, EmulatedFp32SeesCancellation) {
  for (const char* name : {"LayerNorm", "RMSNorm"}) {
    const std::string normalization = name;
    const TransformerConfig cfg = config(normalization, 1e-6);
    MatMap map{{"n.weight", Mat::Constant(1, normalization == "RMSNorm" ? 1 : 2, 0.75)},
               {"n.bias", Mat::Constant(1, 2, 0.125)}};
    const int64_t h = normalization == "RMSNorm" ? 1 : 2;
    Mat x(4, h);
    if (h == 1) {
      x << 0.3, -0.7, 1.1, 0.05;
    } else {
      x << 0.3, 0.3001, -0.7, -0.70003, 1.1, 1.1002, 0.05, 0.0501;
    }
    x = rounded(x, DType::F32);
    const Mat dy = rounded(Mat::Constant(4, h, 0.37) + Mat::Identity(4, h) * 0.2, DType::F32);
    const Params w = Params(map).sub("n");
    MatMap gt, g32;
    const Precision p32 = emulated_precision(DType::F32, cfg);
    const Mat dx_truth = norm_backward(cfg, w, x, norm_forward(cfg, w, x, truth_precision()), dy, Sink(gt).sub("n"),
                                      truth_precision());
    const Mat dx_f32 = norm_backward(cfg, w, x, norm_forward(cfg, w, x, p32), dy, Sink(g32).sub("n"), p32);
    const Mat once = rounded(dx_truth, DType::F32);
    EXPECT_GT((dx_f32 - dx_truth).cwiseAbs().maxCoeff(), 8 * (once - dx_truth).cwiseAbs().maxCoeff())
        << normalization;
  }
}

// Zero-centered gamma in bf16: FusedLayerNorm rounds weight + 1 to bf16,
// Transformer Engine adds the 1 in fp32. w = 2^-9: 1 + 2^-9 lies below
// bf16's half-ulp at 1 (2^-8), so Apex uses gamma = 1 and TE 1.001953125.
TEST(Norms, ZeroCenteredGammaRoundingByKernel) {
  TransformerConfig cfg = config("LayerNorm", 1e-5, true);
  const RowVec w = RowVec::Constant(3, std::ldexp(1.0, -9));
  const Precision bf16 = emulated_precision(DType::BF16, cfg);
  EXPECT_EQ(norm_effective_gamma(cfg, w, bf16, NormKernel::kApex)[0], 1.0);
  EXPECT_EQ(norm_effective_gamma(cfg, w, bf16, NormKernel::kTransformerEngine)[0], 1.001953125);
  EXPECT_EQ(norm_effective_gamma(cfg, w, truth_precision(), NormKernel::kApex)[0], 1.001953125);
  cfg.layernorm_zero_centered_gamma = false;
  EXPECT_EQ(norm_effective_gamma(cfg, w, bf16, NormKernel::kApex)[0], std::ldexp(1.0, -9));

  // So the local and the TE LayerNorm differ in bf16. x = [-1, 1] with eps 0
  // normalises to exactly [-1, 1]; beta = [0, -1]: Apex gives [-1, 1 - 1] =
  // [-1, 0], TE [-(1 + 2^-9), 2^-9] = [-1, 2^-9] after bf16 rounding.
  cfg.layernorm_zero_centered_gamma = true;
  cfg.layernorm_epsilon = 0;
  MatMap map{{"n.weight", Mat::Constant(1, 2, std::ldexp(1.0, -9))}, {"n.bias", row_of({0, -1})}};
  const Mat x = row_of({-1.0, 1.0});
  const Mat local = layernorm_forward(cfg, Params(map).sub("n"), x, bf16).output;
  const Mat te = layernorm_forward(cfg, Params(map).sub("n"), x, bf16, NormKernel::kTransformerEngine).output;
  EXPECT_EQ(local, row_of({-1, 0}));
  EXPECT_EQ(te, row_of({-1, std::ldexp(1.0, -9)}));
  EXPECT_EQ(local, norm_forward(cfg, Params(map).sub("n"), x, bf16).output);  // default: FusedLayerNorm
  EXPECT_EQ(te, norm_forward(cfg, Params(map).sub("n"), x, bf16, NormKernel::kTransformerEngine).output);
  // RMSNorm is TE's (gamma = 1 + 2^-9 in fp32). h = 1, x = a = 257/512 =
  // 0.501953125 (the midpoint between bf16 0.5 and 0.50390625) and eps =
  // 1 - a^2 (exact): rstd = 1, xhat = a. gamma 1 would give the tie a, rounded
  // to even 0.5; gamma 1 + 2^-9 lifts it above the midpoint: 0.50390625.
  cfg.normalization = "RMSNorm";
  cfg.layernorm_epsilon = 1.0 - 0.501953125 * 0.501953125;
  MatMap one{{"n.weight", Mat::Constant(1, 1, std::ldexp(1.0, -9))}};
  EXPECT_EQ(rmsnorm_forward(cfg, Params(one).sub("n"), row_of({0.501953125}), bf16).output(0, 0), 0.50390625);
  MatMap unit{{"n.weight", Mat::Zero(1, 1)}};
  EXPECT_EQ(rmsnorm_forward(cfg, Params(unit).sub("n"), row_of({0.501953125}), bf16).output(0, 0), 0.5);
}

TEST(Norms, DispatchOnNormalization) {
  MatMap map{{"n.weight", row_of({1, 2, 3})}, {"n.bias", row_of({0.5, 0, -0.5})}};
  const Mat x = row_of({0.5, -1, 4});
  const Params w = Params(map).sub("n");
  EXPECT_EQ(norm_forward(config("RMSNorm", 1e-5), w, x, truth_precision()).output,
            rmsnorm_forward(config("RMSNorm", 1e-5), w, x, truth_precision()).output);
  EXPECT_EQ(norm_forward(config("LayerNorm", 1e-5), w, x, truth_precision()).output,
            layernorm_forward(config("LayerNorm", 1e-5), w, x, truth_precision()).output);
  EXPECT_NE(norm_forward(config("RMSNorm", 1e-5), w, x, truth_precision()).output,
            norm_forward(config("LayerNorm", 1e-5), w, x, truth_precision()).output);
}

TEST(Norms, ErrorsNameTheTensor) {
  const TransformerConfig ln = config("LayerNorm", 1e-5);
  const Mat x = Mat::Ones(2, 4);
  MatMap no_bias{{"input_layernorm.weight", Mat::Ones(1, 4)}};
  EXPECT_NE(error_of([&] { layernorm_forward(ln, Params(no_bias).sub("input_layernorm"), x, truth_precision()); })
                .find("input_layernorm.bias"),
            std::string::npos);
  MatMap short_weight{{"n.weight", Mat::Ones(1, 3)}, {"n.bias", Mat::Zero(1, 4)}};
  EXPECT_NE(error_of([&] { layernorm_forward(ln, Params(short_weight).sub("n"), x, truth_precision()); })
                .find("n.weight"),
            std::string::npos);
  EXPECT_NE(error_of([&] { rmsnorm_forward(ln, Params(short_weight).sub("n"), x, truth_precision()); })
                .find("n.weight"),
            std::string::npos);
  MatMap ok{{"n.weight", Mat::Ones(1, 4)}, {"n.bias", Mat::Zero(1, 4)}};
  EXPECT_NE(error_of([&] { norm_forward(config("ScaleNorm", 1e-5), Params(ok).sub("n"), x, truth_precision()); })
                .find("ScaleNorm"),
            std::string::npos);
  const NormForward f = layernorm_forward(ln, Params(ok).sub("n"), x, truth_precision());
  EXPECT_NE(error_of([&] { layernorm_backward(ln, Params(ok).sub("n"), x, f, Mat::Ones(3, 4), Sink(), truth_precision()); })
                .find("gradient"),
            std::string::npos);
  EXPECT_THROW(rmsnorm_backward(ln, Params(ok).sub("n"), x, f, Mat::Ones(2, 5), Sink(), truth_precision()), Error);
}

// Invariants on random shapes: LayerNorm output (gamma 1, beta 0) has mean 0
// and variance var / (var + eps) per token, is invariant to a shift of x, and
// its dx sums to 0 per token (the loss does not see the mean); RMSNorm's
// output has mean square ms / (ms + eps).
RC_GTEST_PROP(NormProperty, MomentsAndShiftInvariance, ()) {
  const int64_t tokens = *rc::gen::inRange<int64_t>(1, 6);
  const int64_t h = *rc::gen::inRange<int64_t>(2, 40);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const double shift = *rc::gen::inRange(-50, 50) * 0.5;
  const double eps = 1e-5;
  const Mat x = random_normal(tokens, h, seed, "x", 3.0);
  MatMap map{{"n.weight", Mat::Ones(1, h)}, {"n.bias", Mat::Zero(1, h)}};
  const Params w = Params(map).sub("n");
  const TransformerConfig ln = config("LayerNorm", eps), rms = config("RMSNorm", eps);

  const NormForward f = layernorm_forward(ln, w, x, truth_precision());
  const Mat shifted = layernorm_forward(ln, w, (x.array() + shift).matrix(), truth_precision()).output;
  const Mat dx = layernorm_backward(ln, w, x, f, random_normal(tokens, h, seed, "dy"), Sink(), truth_precision());
  const NormForward r = rmsnorm_forward(rms, w, x, truth_precision());
  for (int64_t t = 0; t < tokens; ++t) {
    const double mean = x.row(t).mean();
    const double var = (x.row(t).array() - mean).square().mean();
    RC_ASSERT(std::abs(f.output.row(t).mean()) <= 1e-13);
    RC_ASSERT(std::abs(f.output.row(t).array().square().mean() - var / (var + eps)) <= 1e-12);
    RC_ASSERT((shifted.row(t) - f.output.row(t)).cwiseAbs().maxCoeff() <= 1e-10);
    RC_ASSERT(std::abs(dx.row(t).sum()) <= 1e-12 * (1 + dx.row(t).cwiseAbs().sum()));
    const double ms = x.row(t).squaredNorm() / static_cast<double>(h);
    RC_ASSERT(std::abs(r.output.row(t).squaredNorm() / static_cast<double>(h) - ms / (ms + eps)) <= 1e-12);
  }
}

}  // namespace
}  // namespace paritron::ref
