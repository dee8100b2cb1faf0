// Tests of reference/linear: y = x W^T + b by hand, skip-bias behaviour, the
// backward by hand (dx = dy W, dW = dy^T x, db = column sums), central finite
// differences, the separate rounding of the bias add in bf16, fp8 fake
// quantisation (E4M3 / hybrid E5M2 grad-output, fp8_wgrad, zero tensors)
// with hand-quantised operands, and errors.
#include "reference/linear.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <string>

#include "common/error.h"
#include "common/fp8_scaling.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

Precision fp8_precision(const std::string& recipe, bool wgrad = true) {
  Precision p;  // float64 GEMMs: isolates the quantisation from the output rounding
  p.fp8 = recipe;
  p.fp8_wgrad = wgrad;
  return p;
}

// W = [[1, 2], [3, 4], [5, 6]] (out 3, in 2), b = [0.5, -1, 2],
// x = [[1, -1], [2, 0.5]]:
//   x W^T = [[1-2, 3-4, 5-6], [2+1, 6+2, 10+3]] = [[-1, -1, -1], [3, 8, 13]]
//   + b   = [[-0.5, -2, 1], [3.5, 7, 15]].
const MatMap kHand{{"lin.weight", mat(3, 2, {1, 2, 3, 4, 5, 6})}, {"lin.bias", mat(1, 3, {0.5, -1, 2})}};
const Mat kX = mat(2, 2, {1, -1, 2, 0.5});

TEST(LinearForward, ByHandWithAndWithoutBias) {
  const Params w = Params(kHand).sub("lin");
  EXPECT_EQ(linear_forward(w, kX, true, truth_precision()), mat(2, 3, {-0.5, -2, 1, 3.5, 7, 15}));
  // skip_bias_add (add_bias = false): the bias is left to the caller.
  EXPECT_EQ(linear_forward(w, kX, false, truth_precision()), mat(2, 3, {-1, -1, -1, 3, 8, 13}));
  // A layer without a bias adds none even when asked to.
  MatMap no_bias{{"lin.weight", kHand.at("lin.weight")}};
  EXPECT_EQ(linear_forward(Params(no_bias).sub("lin"), kX, true, truth_precision()),
            mat(2, 3, {-1, -1, -1, 3, 8, 13}));
}

// dy = [[1, 0, -1], [2, 1, 0]]:
//   dx = dy W   = [[1*(1,2) - (5,6)], [2*(1,2) + (3,4)]] = [[-4, -4], [5, 8]]
//   dW = dy^T x : row o = sum_t dy[t][o] x[t]
//        o=0: (1,-1) + 2*(2,0.5) = (5, 0); o=1: (2, 0.5); o=2: -(1,-1) = (-1, 1)
//   db = column sums of dy = [3, 1, -1].
// Gradients accumulate into what the sink already holds; without bias_grad
// the bias gets nothing.
TEST(LinearBackward, ByHand) {
  const Params w = Params(kHand).sub("lin");
  const Mat dy = mat(2, 3, {1, 0, -1, 2, 1, 0});
  MatMap grads;
  const Mat dx = linear_backward(w, kX, dy, true, Sink(grads).sub("lin"), truth_precision());
  EXPECT_EQ(dx, mat(2, 2, {-4, -4, 5, 8}));
  EXPECT_EQ(grads.at("lin.weight"), mat(3, 2, {5, 0, 2, 0.5, -1, 1}));
  EXPECT_EQ(grads.at("lin.bias"), mat(1, 3, {3, 1, -1}));
  linear_backward(w, kX, dy, true, Sink(grads).sub("lin"), truth_precision());
  EXPECT_EQ(grads.at("lin.weight"), mat(3, 2, {10, 0, 4, 1, -2, 2}));
  EXPECT_EQ(grads.at("lin.bias"), mat(1, 3, {6, 2, -2}));

  MatMap no_bias_grad;
  linear_backward(w, kX, dy, false, Sink(no_bias_grad).sub("lin"), truth_precision());
  EXPECT_EQ(no_bias_grad.count("lin.bias"), 0u);
  EXPECT_EQ(no_bias_grad.at("lin.weight"), mat(3, 2, {5, 0, 2, 0.5, -1, 1}));
}

// Central differences of L = sum(y * dy) over x, W and b on random shapes.
RC_GTEST_PROP(LinearProperty, GradcheckInputWeightAndBias, ()) {
  const int64_t tokens = *rc::gen::inRange<int64_t>(1, 6);
  const int64_t in = *rc::gen::inRange<int64_t>(1, 6);
  const int64_t out = *rc::gen::inRange<int64_t>(1, 6);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  MatMap vars{{"x", random_normal(tokens, in, seed, "x")},
              {"lin.weight", random_normal(out, in, seed, "w")},
              {"lin.bias", random_normal(1, out, seed, "b")}};
  const Mat dy = random_normal(tokens, out, seed, "dy");
  const Precision p = truth_precision();
  auto loss = [&](const MatMap& v) { return dot(linear_forward(Params(v).sub("lin"), v.at("x"), true, p), dy); };
  MatMap analytic;
  analytic["x"] = linear_backward(Params(vars).sub("lin"), vars.at("x"), dy, true, Sink(analytic).sub("lin"), p);
  const GradcheckResult r = gradcheck(loss, vars, analytic);
  RC_ASSERT(r.ok());
  RC_ASSERT(r.checked == tokens * in + out * in + out);
}

// bf16: the GEMM output is rounded, then the bias add is rounded again.
// x = [1, 2^-8], W = [[1, 1]], b = [2^-8]: fp32 GEMM 1 + 2^-8 -> bf16 1 (tie
// to even); + 2^-8 -> 1 + 2^-8 -> 1 again. One rounding of the exact
// x W^T + b = 1 + 2^-7 would keep 1.0078125. float64: 1 + 2^-7.
// Backward: dy = [[2^-8], [1]] over two tokens; db = 1 + 2^-8 rounds to 1.
TEST(LinearPrecision, Bf16BiasAddIsRoundedSeparately) {
  MatMap w{{"weight", mat(1, 2, {1, 1})}, {"bias", mat(1, 1, {0x1p-8})}};
  const Mat x = mat(1, 2, {1, 0x1p-8});
  Precision bf16;
  bf16.dtype = DType::BF16;
  EXPECT_EQ(linear_forward(Params(w), x, true, bf16)(0, 0), 1.0);
  EXPECT_EQ(linear_forward(Params(w), x, true, truth_precision())(0, 0), 1 + 0x1p-7);
  MatMap g;
  linear_backward(Params(w), mat(2, 2, {1, 0, 0, 1}), mat(2, 1, {0x1p-8, 1}), true, Sink(g), bf16);
  EXPECT_EQ(g.at("bias")(0, 0), 1.0);
  EXPECT_EQ(g.at("weight"), mat(1, 2, {0x1p-8, 1}));
}

// ---------------------------------------------------------------------------
// fp8 (spec §12): steady-state delayed scale = fp8_max / amax / 2^margin.

// E4M3 (max 448, 3 mantissa bits), input x = [[3.5, -1], [0.3, 0.1]]:
// amax 3.5 -> scale 448 / 3.5 = 128 (scale_inv 2^-7, exact).
//   3.5 * 128 = 448 (max, exact) -> 3.5;  -1 * 128 = -128 -> -1;
//   0.3 * 128 = 38.4: spacing 4 in [32, 64), 38.4 / 4 = 9.6 -> 10 -> 40 -> 0.3125;
//   0.1 * 128 = 12.8: spacing 1 in [8, 16) -> 13 -> 13/128 = 0.1015625.
// Ties to even: 0.265625 * 128 = 34 (8.5 steps) -> 32 -> 0.25;
//   0.296875 * 128 = 38 (9.5 steps) -> 40 -> 0.3125.
TEST(LinearFp8, E4M3FakeQuantByHand) {
  const Precision p = fp8_precision("e4m3");
  EXPECT_EQ(scale_for_amax(3.5f, math::kFloat8E4M3, 0), 128.0f);
  EXPECT_EQ(fp8_fake_quant(mat(2, 2, {3.5, -1, 0.3, 0.1}), Fp8Operand::kInput, p),
            mat(2, 2, {3.5, -1, 0.3125, 0.1015625}));
  EXPECT_EQ(fp8_fake_quant(mat(1, 3, {-3.5, 0.265625, 0.296875}), Fp8Operand::kWeight, p),
            mat(1, 3, {-3.5, 0.25, 0.3125}));
  // Grad-output under the e4m3 recipe is E4M3 too: amax 1.75 -> scale 256;
  // 0.4 * 256 = 102.4: spacing 8 in [64, 128) -> 12.8 -> 13 -> 104 -> 0.40625.
  EXPECT_EQ(fp8_fake_quant(mat(1, 2, {1.75, 0.4}), Fp8Operand::kGradOutput, p), mat(1, 2, {1.75, 0.40625}));
  // Hybrid: grad-output in E5M2 (max 57344, 2 mantissa bits): amax 1.75 ->
  // scale 57344 / 1.75 = 32768; 0.4 * 32768 = 13107.2: spacing 2048 in
  // [8192, 16384) -> 6.4 -> 6 -> 12288 -> 0.375. Forward roles stay E4M3.
  const Precision h = fp8_precision("hybrid");
  EXPECT_EQ(scale_for_amax(1.75f, math::kFloat8E5M2, 0), 32768.0f);
  EXPECT_EQ(fp8_fake_quant(mat(1, 2, {1.75, 0.4}), Fp8Operand::kGradOutput, h), mat(1, 2, {1.75, 0.375}));
  EXPECT_EQ(fp8_fake_quant(mat(1, 2, {1.75, 0.4}), Fp8Operand::kInput, h), mat(1, 2, {1.75, 0.40625}));
  // Without fp8 the operand is untouched.
  EXPECT_EQ(fp8_fake_quant(mat(1, 2, {1.75, 0.4}), Fp8Operand::kInput, truth_precision()), mat(1, 2, {1.75, 0.4}));
}

// A non-power-of-two scale: amax 4 -> scale 448 / 4 = 112; 0.3 * 112 = 33.6:
// spacing 4 in [32, 64) -> 8.4 -> 8 -> 32, dequantised as 32 * fl32(1/112)
// (scale_inv is an fp32 value, applied exactly); 4 -> 448 * fl32(1/112).
TEST(LinearFp8, ScaleInvIsTheFloat32Reciprocal) {
  const Mat q = fp8_fake_quant(mat(1, 2, {4, 0.3}), Fp8Operand::kInput, fp8_precision("e4m3"));
  const double inv = static_cast<double>(1.0f / 112.0f);
  EXPECT_EQ(q(0, 0), 448 * inv);
  EXPECT_EQ(q(0, 1), 32 * inv);
  EXPECT_NE(q(0, 1), 32.0 / 112.0);  // not the float64 quotient
}

// With fp8 the GEMMs consume exactly the fake-quantised operands.
//   x = [[3.5, 0.296875]] (amax 3.5, scale 128) -> xq = [[3.5, 0.3125]];
//   W = [[1.75, 0.3], [-0.5, 0.25]] (amax 1.75, scale 256):
//     0.3 * 256 = 76.8: spacing 8 in [64, 128) -> 9.6 -> 10 -> 80 -> 0.3125;
//     -0.5 * 256 = -128 and 0.25 * 256 = 64 exact -> Wq = [[1.75, 0.3125], [-0.5, 0.25]];
//   y = xq Wq^T = [3.5*1.75 + 0.3125^2, -3.5*0.5 + 0.3125*0.25] = [6.22265625, -1.671875]
//   (unquantised: [6.2140625, -1.67578125]).
// Backward with dy = [[1.75, 0.4]] (amax 1.75):
//   hybrid dyq = [1.75, 0.375] (E5M2, above): dx = dyq Wq
//     = 1.75*(1.75, 0.3125) + 0.375*(-0.5, 0.25) = [2.875, 0.640625];
//   dW (fp8_wgrad) = dyq^T xq = [[6.125, 0.546875], [1.3125, 0.1171875]];
//   dW (fp8_wgrad = false) = dy^T x = [[6.125, 0.51953125], [0.4*3.5, 0.4*0.296875]];
//   e4m3 dyq = [1.75, 0.40625]: dx = [3.0625 - 0.203125, 0.546875 + 0.1015625]
//     = [2.859375, 0.6484375];
//   db = column sums of the unquantised dy = [1.75, 0.4] in every recipe.
TEST(LinearFp8, GemmOperandsAreTheFakeQuantisedValues) {
  MatMap wm{{"weight", mat(2, 2, {1.75, 0.3, -0.5, 0.25})}, {"bias", mat(1, 2, {0, 0})}};
  const Params w(wm);
  const Mat x = mat(1, 2, {3.5, 0.296875});
  const Mat dy = mat(1, 2, {1.75, 0.4});

  for (const char* recipe : {"e4m3", "hybrid"}) {
    EXPECT_EQ(linear_forward(w, x, false, fp8_precision(recipe)), mat(1, 2, {6.22265625, -1.671875})) << recipe;
  }
  const Mat y_truth = linear_forward(w, x, false, truth_precision());
  EXPECT_DOUBLE_EQ(y_truth(0, 0), 6.2140625);
  EXPECT_EQ(y_truth(0, 1), -1.67578125);  // exact: every term is a short binary fraction

  MatMap g_hybrid;
  const Mat dx_hybrid = linear_backward(w, x, dy, true, Sink(g_hybrid), fp8_precision("hybrid"));
  EXPECT_EQ(dx_hybrid, mat(1, 2, {2.875, 0.640625}));
  EXPECT_EQ(g_hybrid.at("weight"), mat(2, 2, {6.125, 0.546875, 1.3125, 0.1171875}));
  EXPECT_EQ(g_hybrid.at("bias"), mat(1, 2, {1.75, 0.4}));

  MatMap g_e4m3;
  const Mat dx_e4m3 = linear_backward(w, x, dy, true, Sink(g_e4m3), fp8_precision("e4m3"));
  EXPECT_EQ(dx_e4m3, mat(1, 2, {2.859375, 0.6484375}));
  EXPECT_EQ(g_e4m3.at("weight"), mat(2, 2, {6.125, 0.546875, 3.5 * 0.40625, 0.3125 * 0.40625}));

  // fp8_wgrad = false: the wgrad GEMM runs on the high-precision dy and x;
  // dgrad stays fp8.
  MatMap g_hp;
  const Mat dx_hp = linear_backward(w, x, dy, true, Sink(g_hp), fp8_precision("hybrid", false));
  EXPECT_EQ(dx_hp, mat(1, 2, {2.875, 0.640625}));
  EXPECT_EQ(g_hp.at("weight"), mat(2, 2, {6.125, 1.75 * 0.296875, 0.4 * 3.5, 0.4 * 0.296875}));
}

// An all-zero tensor has amax 0: the scale stays 1 (TE keeps the previous
// scale, 1 initially) instead of 448 / 0 = inf, so the fake quantisation is
// exactly zero with no NaN (inf * 0); a zero input gives a zero output.
TEST(LinearFp8, ZeroTensorKeepsScaleOne) {
  EXPECT_EQ(scale_for_amax(0.0f, math::kFloat8E4M3, 0), 1.0f);
  EXPECT_EQ(scale_for_amax(0.0f, math::kFloat8E5M2, 0), 1.0f);
  for (const char* recipe : {"e4m3", "hybrid"}) {
    for (Fp8Operand role : {Fp8Operand::kInput, Fp8Operand::kWeight, Fp8Operand::kGradOutput}) {
      const Mat q = fp8_fake_quant(Mat::Zero(2, 3), role, fp8_precision(recipe));
      EXPECT_EQ(q, Mat::Zero(2, 3)) << recipe;
      EXPECT_TRUE(q.allFinite());
    }
  }
  MatMap wm{{"weight", mat(2, 2, {1.75, 0.3, -0.5, 0.25})}};
  EXPECT_EQ(linear_forward(Params(wm), Mat::Zero(3, 2), true, fp8_precision("e4m3")), Mat::Zero(3, 2));
  MatMap g;
  const Mat dx = linear_backward(Params(wm), mat(1, 2, {1, 2}), Mat::Zero(1, 2), true, Sink(g), fp8_precision("e4m3"));
  EXPECT_EQ(dx, Mat::Zero(1, 2));
  EXPECT_EQ(g.at("weight"), Mat::Zero(2, 2));
}

// An unknown recipe is rejected by the fp8 format parser.
TEST(LinearFp8, UnknownRecipeIsAnError) {
  EXPECT_ANY_THROW(fp8_fake_quant(Mat::Ones(1, 1), Fp8Operand::kInput, fp8_precision("e5m2")));
}

TEST(LinearErrors, FeatureMismatchAndMissingOrBadWeights) {
  const Params w = Params(kHand).sub("lin");
  expect_error([&] { linear_forward(w, Mat::Ones(2, 3), true, truth_precision()); },
               "'lin.weight' is [3, 2] but its input has 3 features");
  MatMap empty;
  expect_error([&] { linear_forward(Params(empty).sub("layers.0").sub("lin"), kX, true, truth_precision()); },
               "'layers.0.lin.weight'");
  MatMap bad_bias{{"lin.weight", kHand.at("lin.weight")}, {"lin.bias", mat(1, 2, {1, 2})}};
  expect_error([&] { linear_forward(Params(bad_bias).sub("lin"), kX, true, truth_precision()); }, "'lin.bias'");
  // Backward: dy must have out_features columns (the dgrad GEMM refuses it).
  EXPECT_THROW(linear_backward(w, kX, Mat::Ones(2, 2), true, Sink(), truth_precision()), Error);
  expect_error([&] { linear_backward(Params(empty).sub("lin"), kX, Mat::Ones(2, 3), true, Sink(), truth_precision()); },
               "'lin.weight'");
}

// Delayed scaling across steps (Fp8Session, spec §12.3), e4m3, margin 0.
// Operand x = [[1, -1], [2, 0.5]] (amax 2), W as above (amax 6).
//  step 1: every slot has scale 1, so x and W are cast unscaled: 0.5, 1, 2, 6
//          are all E4M3 values, so step 1 equals the plain float64 product;
//  step 2 (after end_step, most_recent, history 1): scale_x = 448/2 = 224,
//          scale_W = 448/6 -- the steady-state scales of the same tensors, so
//          the result equals the session-less (steady-state) emulation bit for bit.
TEST(LinearFp8Session, FirstStepUsesScaleOneThenTheRecordedAmax) {
  TransformerConfig cfg;
  cfg.fp8 = "e4m3";
  Precision p = fp8_precision("e4m3");
  p.fp8_session = std::make_shared<Fp8Session>(cfg);
  const Params w = Params(kHand).sub("lin");
  const Mat x = mat(2, 2, {1, -1, 2, 0.5});
  EXPECT_EQ(linear_forward(w, x, false, p), mat(2, 3, {-1, -1, -1, 3, 8, 13}));
  const size_t x_slot = p.fp8_session->slot("lin.", Fp8Operand::kInput);
  const size_t w_slot = p.fp8_session->slot("lin.", Fp8Operand::kWeight);
  EXPECT_EQ(p.fp8_session->state().meta(x_slot).amax_history[0], 2.0f);
  EXPECT_EQ(p.fp8_session->state().meta(w_slot).amax_history[0], 6.0f);
  EXPECT_TRUE(p.fp8_session->end_step());
  EXPECT_EQ(p.fp8_session->state().meta(x_slot).scale, 224.0f);
  EXPECT_EQ(p.fp8_session->state().meta(w_slot).scale, 448.0f / 6.0f);
  EXPECT_EQ(linear_forward(w, x, false, p), linear_forward(w, x, false, fp8_precision("e4m3")));
}

// The scale a step uses comes from earlier steps only: step 1 records amax 2,
// so step 2 casts [200, 1] with scale 448/2 = 224: 200 * 224 = 44800
// saturates to 448 (finite saturation) and dequantises to 448 * scale_inv ~ 2,
// while 1 * 224 = 224 = 1.75 * 2^7 is an E4M3 value and comes back as
// 224 * scale_inv ~ 1 (scale_inv = float(1/224), not exact: 224 = 7 * 2^5).
// The delayed scale lags, which the steady-state emulation cannot show.
TEST(LinearFp8Session, ScalesLagOneStepAndSaturate) {
  TransformerConfig cfg;
  cfg.fp8 = "e4m3";
  Precision p = fp8_precision("e4m3");
  p.fp8_session = std::make_shared<Fp8Session>(cfg);
  const Mat x = mat(1, 2, {2, 0.5});
  p.fp8_session->slot("lin.", Fp8Operand::kInput);
  fp8_fake_quant(x, Fp8Operand::kInput, p, "lin.");
  p.fp8_session->end_step();
  const Mat big = fp8_fake_quant(mat(1, 2, {200, 1}), Fp8Operand::kInput, p, "lin.");
  const double scale_inv = static_cast<double>(1.0f / 224.0f);
  EXPECT_EQ(big(0, 0), 448 * scale_inv);
  EXPECT_EQ(big(0, 1), 224 * scale_inv);
  EXPECT_NEAR(big(0, 0), 2.0, 1e-7);
}

// fp8_interval = 2: the scale is updated after every second step only; the
// "max" algorithm over a history of 2 takes the larger of the two amaxes.
TEST(LinearFp8Session, IntervalAndMaxHistory) {
  TransformerConfig cfg;
  cfg.fp8 = "e4m3";
  cfg.fp8_interval = 2;
  cfg.fp8_amax_history_len = 2;
  cfg.fp8_amax_compute_algo = "max";
  Precision p = fp8_precision("e4m3");
  p.fp8_session = std::make_shared<Fp8Session>(cfg);
  const size_t slot = p.fp8_session->slot("lin.", Fp8Operand::kInput);
  fp8_fake_quant(mat(1, 1, {4}), Fp8Operand::kInput, p, "lin.");
  EXPECT_FALSE(p.fp8_session->end_step());
  EXPECT_EQ(p.fp8_session->state().meta(slot).scale, 1.0f);
  fp8_fake_quant(mat(1, 1, {2}), Fp8Operand::kInput, p, "lin.");
  EXPECT_TRUE(p.fp8_session->end_step());
  EXPECT_EQ(p.fp8_session->state().meta(slot).scale, 448.0f / 4.0f);
}

}  // namespace
}  // namespace paritron::ref
