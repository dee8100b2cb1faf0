// Tests of reference/bias_dropout_add (spec §8.2): out = residual +
// dropout(x + bias) with a [1, h] and a [T, h] bias by hand, dropout in
// training (surviving fraction, 1/(1-p) scale, the module path's RNG key), the
// backward by hand (bias grad = column sums for the broadcast bias), finite
// differences, bf16 rounding, shape errors.
#include "reference/bias_dropout_add.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <string>

#include "common/error.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

RunContext training(uint64_t seed, std::string path = "layers.0") {
  RunContext c;
  c.training = true;
  c.seed = seed;
  c.path = std::move(path);
  return c;
}

const Mat kX = mat(2, 2, {1, 2, 3, 4});
const Mat kResidual = mat(2, 2, {10, 20, 30, 40});

// x = [[1, 2], [3, 4]], residual = [[10, 20], [30, 40]]:
//   [1, h] bias [0.5, -1]: residual + x + bias = [[11.5, 21], [33.5, 43]];
//   [T, h] bias [[1, 2], [3, 4]] (MoE): [[12, 24], [36, 48]];
//   no bias: [[11, 22], [33, 44]].
// Eval (and p = 0 in training): no dropout, scale all ones, even with p = 0.5.
TEST(BiasDropoutAdd, ForwardByHandBroadcastAndPerTokenBias) {
  const RunContext eval;
  const Precision t = truth_precision();
  auto f = bias_dropout_add_forward(kX, mat(1, 2, {0.5, -1}), kResidual, 0.5, eval, "self_attn_bda", t);
  EXPECT_EQ(f.output, mat(2, 2, {11.5, 21, 33.5, 43}));
  EXPECT_EQ(f.dropout_scale, Mat::Ones(2, 2));
  f = bias_dropout_add_forward(kX, mat(2, 2, {1, 2, 3, 4}), kResidual, 0.5, eval, "mlp_bda", t);
  EXPECT_EQ(f.output, mat(2, 2, {12, 24, 36, 48}));
  f = bias_dropout_add_forward(kX, std::nullopt, kResidual, 0.5, eval, "mlp_bda", t);
  EXPECT_EQ(f.output, mat(2, 2, {11, 22, 33, 44}));
  f = bias_dropout_add_forward(kX, mat(1, 2, {0.5, -1}), kResidual, 0.0, training(3), "mlp_bda", t);
  EXPECT_EQ(f.output, mat(2, 2, {11.5, 21, 33.5, 43}));
}

// Training with p = 0.25 over 100 x 100 elements, x = 1, bias 0.5, residual
// = 0: each output is dropout(1.5) = 0 or 1.5 / 0.75 = 2; about 75% survive
// (binomial std 0.0043; 0.02 is 4.6 sigma). The mask is the module's dropout
// draw: purpose "mlp_bda" under ctx's path (the same as core dropout() with
// those arguments), different for another purpose or seed.
TEST(BiasDropoutAdd, TrainingDropoutFractionScaleAndKey) {
  const int64_t T = 100, h = 100;
  const Mat x = Mat::Ones(T, h), residual = Mat::Zero(T, h);
  const Mat bias = Mat::Constant(1, h, 0.5);
  const RunContext ctx = training(11);
  const auto f = bias_dropout_add_forward(x, bias, residual, 0.25, ctx, "mlp_bda", truth_precision());
  int64_t kept = 0;
  for (Eigen::Index i = 0; i < f.output.size(); ++i) {
    const double o = f.output.data()[i], s = f.dropout_scale.data()[i];
    if (s != 0.0) {
      ++kept;
      ASSERT_EQ(o, 2.0) << i;
      ASSERT_DOUBLE_EQ(s, 4.0 / 3.0) << i;
    } else {
      ASSERT_EQ(o, 0.0) << i;
    }
  }
  EXPECT_NEAR(static_cast<double>(kept) / static_cast<double>(T * h), 0.75, 0.02);

  Mat core_scale;
  dropout(x, 0.25, ctx, "mlp_bda", &core_scale);
  EXPECT_EQ(f.dropout_scale, core_scale);
  EXPECT_NE(bias_dropout_add_forward(x, bias, residual, 0.25, ctx, "self_attn_bda", truth_precision()).dropout_scale,
            f.dropout_scale);
  EXPECT_NE(bias_dropout_add_forward(x, bias, residual, 0.25, training(12), "mlp_bda", truth_precision()).dropout_scale,
            f.dropout_scale);
  // The residual is added after dropout (it is never dropped): residual 5 gives 5 or 7.
  const auto g = bias_dropout_add_forward(x, bias, Mat::Constant(T, h, 5.0), 0.25, ctx, "mlp_bda", truth_precision());
  EXPECT_EQ(g.output, Mat(Mat::Constant(T, h, 5.0) + f.output));
}

// Backward with dy = [[1, 2], [3, 4]] in eval: d x = d residual = dy;
// d bias [1, h] = column sums [4, 6]; d bias [T, h] = dy; no bias -> none.
// In training: d x = dy * scale elementwise (0 or 1/(1-p)); the [1, h] bias
// gets the column sums of that; the residual gets dy unmasked.
TEST(BiasDropoutAdd, BackwardByHand) {
  const Mat dy = mat(2, 2, {1, 2, 3, 4});
  const Precision t = truth_precision();
  const RunContext eval;
  const std::optional<Mat> row_bias = mat(1, 2, {0.5, -1});
  auto f = bias_dropout_add_forward(kX, row_bias, kResidual, 0.5, eval, "mlp_bda", t);
  auto g = bias_dropout_add_backward(f, row_bias, dy, t);
  EXPECT_EQ(g.x, dy);
  EXPECT_EQ(g.residual, dy);
  ASSERT_TRUE(g.bias.has_value());
  EXPECT_EQ(*g.bias, mat(1, 2, {4, 6}));

  const std::optional<Mat> token_bias = mat(2, 2, {1, 2, 3, 4});
  f = bias_dropout_add_forward(kX, token_bias, kResidual, 0.5, eval, "mlp_bda", t);
  g = bias_dropout_add_backward(f, token_bias, dy, t);
  ASSERT_TRUE(g.bias.has_value());
  EXPECT_EQ(*g.bias, dy);

  f = bias_dropout_add_forward(kX, std::nullopt, kResidual, 0.5, eval, "mlp_bda", t);
  g = bias_dropout_add_backward(f, std::nullopt, dy, t);
  EXPECT_FALSE(g.bias.has_value());

  // Training, p = 0.5 (scale exactly 2) on 4 x 8 elements.
  const Mat x = Mat::Ones(4, 8), res = Mat::Zero(4, 8);
  const std::optional<Mat> b8 = Mat::Zero(1, 8);
  const Mat dy8 = Mat::Constant(4, 8, 3.0);
  f = bias_dropout_add_forward(x, b8, res, 0.5, training(5), "self_attn_bda", t);
  g = bias_dropout_add_backward(f, b8, dy8, t);
  EXPECT_EQ(g.residual, dy8);
  for (Eigen::Index r = 0; r < 4; ++r) {
    for (Eigen::Index c = 0; c < 8; ++c) {
      ASSERT_TRUE(f.dropout_scale(r, c) == 0.0 || f.dropout_scale(r, c) == 2.0);
      EXPECT_EQ(g.x(r, c), f.dropout_scale(r, c) == 0.0 ? 0.0 : 6.0);
    }
  }
  for (Eigen::Index c = 0; c < 8; ++c) {
    const double survivors = (f.dropout_scale.col(c).array() != 0.0).count();
    EXPECT_EQ((*g.bias)(0, c), 6.0 * survivors) << c;
  }
  EXPECT_GT((f.dropout_scale.array() == 0.0).count(), 0);  // the check above saw both cases
  EXPECT_GT((f.dropout_scale.array() != 0.0).count(), 0);
}

// Central differences of L = sum(out * dy) in x, bias and residual, for both
// bias shapes, with dropout active (the mask is fixed by the seed).
RC_GTEST_PROP(BiasDropoutAddProperty, GradcheckWithDropout, ()) {
  const int64_t T = *rc::gen::inRange<int64_t>(1, 6);
  const int64_t h = *rc::gen::inRange<int64_t>(1, 6);
  const bool per_token = *rc::gen::arbitrary<bool>();
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const double p = *rc::gen::elementOf(std::vector<double>{0.0, 0.2, 0.5});
  MatMap vars{{"x", random_normal(T, h, seed, "x")},
              {"bias", random_normal(per_token ? T : 1, h, seed, "b")},
              {"residual", random_normal(T, h, seed, "r")}};
  const Mat dy = random_normal(T, h, seed, "dy");
  const RunContext ctx = training(seed);
  const Precision t = truth_precision();
  auto loss = [&](const MatMap& v) {
    return dot(bias_dropout_add_forward(v.at("x"), v.at("bias"), v.at("residual"), p, ctx, "bda", t).output, dy);
  };
  const auto f = bias_dropout_add_forward(vars.at("x"), vars.at("bias"), vars.at("residual"), p, ctx, "bda", t);
  const auto g = bias_dropout_add_backward(f, vars.at("bias"), dy, t);
  RC_ASSERT(g.bias.has_value());
  const MatMap analytic{{"x", g.x}, {"bias", *g.bias}, {"residual", g.residual}};
  const GradcheckResult r = gradcheck(loss, vars, analytic);
  RC_ASSERT(r.ok());
}

// bf16: x + bias is its own rounded op, then residual + dropped is rounded.
// x = 1, bias = 2^-8, residual = 2^-8: 1 + 2^-8 -> 1 (tie to even), + 2^-8 -> 1
// again; float64 gives 1 + 2^-7 (one rounding of the exact sum would too).
TEST(BiasDropoutAdd, Bf16RoundsBiasAddAndResidualAdd) {
  Precision bf16;
  bf16.dtype = DType::BF16;
  const Mat x = mat(1, 1, {1}), bias = mat(1, 1, {0x1p-8}), residual = mat(1, 1, {0x1p-8});
  EXPECT_EQ(bias_dropout_add_forward(x, bias, residual, 0.1, RunContext{}, "bda", bf16).output(0, 0), 1.0);
  EXPECT_EQ(bias_dropout_add_forward(x, bias, residual, 0.1, RunContext{}, "bda", truth_precision()).output(0, 0),
            1 + 0x1p-7);
  // Backward: the [1, h] bias gradient over two tokens 1 + 2^-8 is rounded once: 1.
  const auto f = bias_dropout_add_forward(mat(2, 1, {1, 1}), bias, mat(2, 1, {0, 0}), 0.1, RunContext{}, "bda", bf16);
  const auto g = bias_dropout_add_backward(f, bias, mat(2, 1, {1, 0x1p-8}), bf16);
  EXPECT_EQ((*g.bias)(0, 0), 1.0);
}

// Spec §8.2 step 1 (and the header): "the residual cast to x's dtype first".
// A residual that is not a bf16 value (e.g. an fp32 residual stream with
// fp32_residual_connection) is rounded to bf16 before the add:
// residual = 1 + 2^-9 (a quarter bf16 ulp above 1) -> 1; x = 2^-8: 1 + 2^-8 is
// a tie -> 1 (even). Adding first and rounding once gives round(1 + 3*2^-9)
// = 1 + 2^-7 (0.75 ulp rounds up). Megatron 0.5.0 _bias_dropout_add_func:
// `residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)`.
// (A regression test: an earlier version rounded residual + dropped once and
// gave 1.0078125.)
TEST(BiasDropoutAdd, ResidualIsCastToTheOutputDtypeFirst) {
  Precision bf16;
  bf16.dtype = DType::BF16;
  const auto f = bias_dropout_add_forward(mat(1, 1, {0x1p-8}), std::nullopt, mat(1, 1, {1 + 0x1p-9}), 0.0,
                                          RunContext{}, "bda", bf16);
  EXPECT_EQ(f.output(0, 0), 1.0) << "residual not cast to bf16 before the add (spec §8.2 step 1)";
}

TEST(BiasDropoutAdd, ShapeErrors) {
  const RunContext eval;
  const Precision t = truth_precision();
  expect_error([&] { bias_dropout_add_forward(kX, std::nullopt, Mat::Zero(2, 3), 0.0, eval, "bda", t); },
               "residual [2, 3] and output [2, 2] differ");
  expect_error([&] { bias_dropout_add_forward(kX, std::nullopt, Mat::Zero(3, 2), 0.0, eval, "bda", t); },
               "residual [3, 2]");
  expect_error([&] { bias_dropout_add_forward(kX, Mat::Zero(1, 3), kResidual, 0.0, eval, "bda", t); },
               "bias [1, 3] fits neither [1, 2] nor [2, 2]");
  expect_error([&] { bias_dropout_add_forward(kX, Mat::Zero(3, 2), kResidual, 0.0, eval, "bda", t); },
               "bias [3, 2]");
  expect_error([&] { bias_dropout_add_forward(kX, Mat::Zero(2, 1), kResidual, 0.0, eval, "bda", t); },
               "bias [2, 1]");
}

}  // namespace
}  // namespace paritron::ref
