// Tests of reference/mlp: hand-computed tiny MLPs (plain, SwiGLU with the
// fc1 bias added before the split, GeGLU, without bias, fused tanh gelu),
// finite-difference gradients of the input and every weight, the output_bias
// gradient, precision emulation, errors.
#include "reference/mlp.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/error.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

TransformerConfig mlp_config(const std::string& activation, bool gated, bool bias = true, bool fused = false) {
  TransformerConfig cfg;
  cfg.activation_func = activation;
  cfg.gated_linear_unit = gated;
  cfg.add_bias_linear = bias;
  cfg.bias_activation_fusion = fused;
  return cfg;
}

constexpr double kSigmoid1 = 0.7310585786300049;  // 1 / (1 + e^-1)
constexpr double kPhi1 = 0.8413447460685429;      // standard normal CDF at 1: gelu(1)

// x = [1, -2]; W1 = [[1, 0], [1, 1]] -> x W1^T = [1, -1]; b1 = [0.5, 0.5] ->
// a = [1.5, -0.5]; relu -> z = [1.5, 0]; W2 = [[2, 3], [-1, 1]] ->
// out = [3, -1.5]; output_bias = b2 = [0.25, -0.25] (not added: skip_bias_add).
// Backward with d_out = [1, 1], d_output_bias = [1, 2]: dz = d_out W2 = [1, 4];
// dW2 = d_out^T z = [[1.5, 0], [1.5, 0]]; db2 = [1, 2]; da = dz relu'(a) = [1, 0];
// db1 = [1, 0]; dW1 = da^T x = [[1, -2], [0, 0]]; dx = da W1 = [1, 0].
TEST(Mlp, HandComputedReluMlp) {
  const TransformerConfig cfg = mlp_config("relu", false);
  MatMap w{{"mlp.linear_fc1.weight", mat(2, 2, {1, 0, 1, 1})},
           {"mlp.linear_fc1.bias", mat(1, 2, {0.5, 0.5})},
           {"mlp.linear_fc2.weight", mat(2, 2, {2, 3, -1, 1})},
           {"mlp.linear_fc2.bias", mat(1, 2, {0.25, -0.25})}};
  const Params p = Params(w).sub("mlp");
  const Mat x = mat(1, 2, {1, -2});
  const MlpForward f = mlp_forward(cfg, p, x, truth_precision());
  EXPECT_EQ(f.fc1_output, mat(1, 2, {1.5, -0.5}));
  EXPECT_EQ(f.activation_output, mat(1, 2, {1.5, 0}));
  EXPECT_EQ(f.output, mat(1, 2, {3, -1.5}));
  ASSERT_TRUE(f.output_bias.has_value());
  EXPECT_EQ(Mat(*f.output_bias), mat(1, 2, {0.25, -0.25}));

  MatMap grads;
  const Mat dx = mlp_backward(cfg, p, x, f, mat(1, 2, {1, 1}), RowVec(mat(1, 2, {1, 2})), Sink(grads).sub("mlp"),
                              truth_precision());
  EXPECT_EQ(dx, mat(1, 2, {1, 0}));
  EXPECT_EQ(grads.at("mlp.linear_fc2.weight"), mat(2, 2, {1.5, 0, 1.5, 0}));
  EXPECT_EQ(grads.at("mlp.linear_fc2.bias"), mat(1, 2, {1, 2}));
  EXPECT_EQ(grads.at("mlp.linear_fc1.bias"), mat(1, 2, {1, 0}));
  EXPECT_EQ(grads.at("mlp.linear_fc1.weight"), mat(2, 2, {1, -2, 0, 0}));
}

// SwiGLU, h = f = 1: W1 = [[2], [3]] ([gate; up]), x = 1 -> [2, 3];
// b1 = [-1, 1] is added before the split: a = [1, 4]; z = silu(1) * 4 = 4 s
// with s = sigmoid(1); W2 = [[0.5]] -> out = 2 s.
// (Bias after the split per half gives the same here, but gating the second
// half would give silu(4) * 1 = 3.928.)
// Backward, d_out = 1: dz = 0.5; da1 = dz a2 silu'(1) = 0.5 * 4 * s (2 - s);
// da2 = dz silu(1) = 0.5 s; db1 = [da1, da2]; dW1 = da^T x; dx = 2 da1 + 3 da2.
TEST(Mlp, HandComputedSwiGluBiasBeforeSplit) {
  for (bool fused : {false, true}) {
    const TransformerConfig cfg = mlp_config("silu", true, true, fused);
    MatMap w{{"linear_fc1.weight", mat(2, 1, {2, 3})},
             {"linear_fc1.bias", mat(1, 2, {-1, 1})},
             {"linear_fc2.weight", mat(1, 1, {0.5})},
             {"linear_fc2.bias", mat(1, 1, {0})}};
    const Mat x = mat(1, 1, {1});
    const MlpForward f = mlp_forward(cfg, Params(w), x, truth_precision());
    const double s = kSigmoid1;
    EXPECT_EQ(f.fc1_output, mat(1, 2, {1, 4}));
    EXPECT_DOUBLE_EQ(f.activation_output(0, 0), 4 * s);
    EXPECT_DOUBLE_EQ(f.output(0, 0), 2 * s);

    MatMap grads;
    const Mat dx = mlp_backward(cfg, Params(w), x, f, mat(1, 1, {1}), std::nullopt, Sink(grads), truth_precision());
    const double da1 = 0.5 * 4 * s * (2 - s), da2 = 0.5 * s;
    EXPECT_DOUBLE_EQ(grads.at("linear_fc1.bias")(0, 0), da1);
    EXPECT_DOUBLE_EQ(grads.at("linear_fc1.bias")(0, 1), da2);
    EXPECT_DOUBLE_EQ(grads.at("linear_fc1.weight")(0, 0), da1);
    EXPECT_DOUBLE_EQ(grads.at("linear_fc1.weight")(1, 0), da2);
    EXPECT_DOUBLE_EQ(dx(0, 0), 2 * da1 + 3 * da2);
    EXPECT_DOUBLE_EQ(grads.at("linear_fc2.weight")(0, 0), 4 * s);
    EXPECT_EQ(grads.at("linear_fc2.bias"), mat(1, 1, {0}));  // only output_bias consumes it, and nothing got it
  }
}

// GeGLU without bias: W1 = [[1], [-2]], x = 1 -> a = [1, -2]; z = gelu(1) * (-2)
// = -2 Phi(1); W2 = [[3]] -> out = -6 Phi(1). With bias_activation_fusion the
// gate uses the tanh form (newest Megatron's bias_geglu): -6 * 0.8411919903841787.
TEST(Mlp, HandComputedGeGluExactAndFusedTanh) {
  MatMap w{{"linear_fc1.weight", mat(2, 1, {1, -2})}, {"linear_fc2.weight", mat(1, 1, {3})}};
  const Mat x = mat(1, 1, {1});
  const MlpForward exact = mlp_forward(mlp_config("gelu", true, false), Params(w), x, truth_precision());
  EXPECT_DOUBLE_EQ(exact.output(0, 0), -6 * kPhi1);
  EXPECT_FALSE(exact.output_bias.has_value());
  const MlpForward fused = mlp_forward(mlp_config("gelu", true, false, true), Params(w), x, truth_precision());
  EXPECT_DOUBLE_EQ(fused.output(0, 0), -6 * 0.8411919903841787);
}

// Plain gelu MLP, W1 = W2 = [[1]], b1 = 1, x = 1: a = 2, out = gelu(2) =
// 2 Phi(2) = 1.9544997361036416; fused: the tanh form 1.9545976939197902 —
// the fusion changes the numerics by ~1e-4 (spec §6.3).
TEST(Mlp, BiasActivationFusionGeluIsTanhForm) {
  MatMap w{{"linear_fc1.weight", mat(1, 1, {1})},
           {"linear_fc1.bias", mat(1, 1, {1})},
           {"linear_fc2.weight", mat(1, 1, {1})},
           {"linear_fc2.bias", mat(1, 1, {0})}};
  const Mat x = mat(1, 1, {1});
  EXPECT_DOUBLE_EQ(mlp_forward(mlp_config("gelu", false), Params(w), x, truth_precision()).output(0, 0),
                   1.9544997361036416);
  EXPECT_DOUBLE_EQ(mlp_forward(mlp_config("gelu", false, true, true), Params(w), x, truth_precision()).output(0, 0),
                   1.9545976939197902);
}

// add_bias_linear = false: no output_bias, no bias gradients, and biases in
// the map are ignored (the module would not have them).
TEST(Mlp, WithoutBias) {
  const TransformerConfig cfg = mlp_config("squared_relu", false, false);
  MatMap w{{"linear_fc1.weight", mat(2, 2, {1, 0, 0, 1})}, {"linear_fc2.weight", mat(2, 2, {1, 1, 0, 1})}};
  const Mat x = mat(2, 2, {3, -1, -2, 0.5});
  // a = x; z = relu(a)^2 = [[9, 0], [0, 0.25]]; out = z W2^T = [[9, 0], [0.25, 0.25]].
  const MlpForward f = mlp_forward(cfg, Params(w), x, truth_precision());
  EXPECT_EQ(f.output, mat(2, 2, {9, 0, 0.25, 0.25}));
  EXPECT_FALSE(f.output_bias.has_value());
  MatMap grads;
  mlp_backward(cfg, Params(w), x, f, Mat::Ones(2, 2), std::nullopt, Sink(grads), truth_precision());
  EXPECT_EQ(grads.count("linear_fc1.bias") + grads.count("linear_fc2.bias"), 0u);
  MatMap with_bias = w;
  with_bias["linear_fc1.bias"] = Mat::Ones(1, 2);
  with_bias["linear_fc2.bias"] = Mat::Ones(1, 2);
  EXPECT_EQ(mlp_forward(cfg, Params(with_bias), x, truth_precision()).output, f.output);
}

// Central finite differences of L = sum(out * d_out) + sum(output_bias * d_bias)
// in the input and every weight, over activations, gating, bias and fusion.
struct GradCase {
  std::string activation;
  bool gated, bias, fused, with_output_bias_grad;
};

void expect_mlp_gradcheck(const GradCase& c, uint64_t seed) {
  const TransformerConfig cfg = mlp_config(c.activation, c.gated, c.bias, c.fused);
  const int64_t tokens = 5, h = 4, f = 6, f1 = c.gated ? 2 * f : f;
  MatMap vars{{"x", random_normal(tokens, h, seed, "x")},
              {"mlp.linear_fc1.weight", random_normal(f1, h, seed, "w1", 0.7)},
              {"mlp.linear_fc2.weight", random_normal(h, f, seed, "w2", 0.7)}};
  if (c.bias) {
    vars["mlp.linear_fc1.bias"] = random_normal(1, f1, seed, "b1", 0.5);
    vars["mlp.linear_fc2.bias"] = random_normal(1, h, seed, "b2", 0.5);
  }
  const Mat d_out = random_normal(tokens, h, seed, "d_out");
  const std::optional<RowVec> d_bias =
      c.bias && c.with_output_bias_grad ? std::optional<RowVec>(random_normal(1, h, seed, "d_bias").row(0))
                                        : std::nullopt;
  const Precision p = truth_precision();
  auto loss = [&](const MatMap& v) {
    const MlpForward fw = mlp_forward(cfg, Params(v).sub("mlp"), v.at("x"), p);
    double l = dot(fw.output, d_out);
    if (d_bias && fw.output_bias) l += fw.output_bias->dot(*d_bias);
    return l;
  };
  const MlpForward fw = mlp_forward(cfg, Params(vars).sub("mlp"), vars.at("x"), p);
  MatMap analytic;
  analytic["x"] = mlp_backward(cfg, Params(vars).sub("mlp"), vars.at("x"), fw, d_out, d_bias,
                               Sink(analytic).sub("mlp"), p);
  const GradcheckResult r = gradcheck(loss, vars, analytic, {.eps = 1e-6, .rtol = 2e-6, .atol = 1e-8});
  EXPECT_TRUE(r.ok()) << c.activation << (c.gated ? " gated" : "") << (c.bias ? " bias" : "")
                      << (c.fused ? " fused" : "") << ": " << r.describe();
  EXPECT_EQ(r.checked, 20 + f1 * h + h * f + (c.bias ? f1 + h : 0));
  if (c.bias && !c.with_output_bias_grad) {
    EXPECT_EQ(analytic.at("mlp.linear_fc2.bias"), Mat::Zero(1, h));
  }
  if (d_bias) {
    EXPECT_EQ(Mat(analytic.at("mlp.linear_fc2.bias")), Mat(*d_bias));
  }
}

TEST(Mlp, GradcheckEveryWeightAndInput) {
  const GradCase cases[] = {
      {"gelu", false, true, false, true},         {"gelu", false, true, true, true},
      {"silu", true, true, false, true},          {"silu", true, true, true, false},
      {"silu", true, false, true, false},         {"gelu", true, true, false, true},
      {"gelu", true, false, true, false},         {"relu", false, true, false, false},
      {"squared_relu", false, false, false, false}, {"quick_gelu", true, true, false, true},
      {"openai_gelu", false, true, false, true},  {"erf_gelu", true, true, false, true},
  };
  uint64_t seed = 100;
  for (const GradCase& c : cases) expect_mlp_gradcheck(c, seed++);
}

// Emulated precision on a 16-token MLP: bf16 close to truth (within a few
// percent of the output scale: GEMMs over 64 and 256 terms), fp32 within 1e-5
// relative, truth different from both; every materialised tensor is a bf16
// value; the fused swiglu (one rounding) differs from the unfused one in bf16
// but not in float64.
TEST(Mlp, EmulatedPrecision) {
  const int64_t tokens = 16, h = 64, f = 128;
  MatMap w{{"linear_fc1.weight", rounded(random_normal(2 * f, h, 1, "w1", 0.125), DType::BF16)},
           {"linear_fc1.bias", rounded(random_normal(1, 2 * f, 1, "b1", 0.1), DType::BF16)},
           {"linear_fc2.weight", rounded(random_normal(h, f, 1, "w2", 0.09), DType::BF16)},
           {"linear_fc2.bias", rounded(random_normal(1, h, 1, "b2", 0.1), DType::BF16)}};
  const Mat x = rounded(random_normal(tokens, h, 1, "x"), DType::BF16);
  const TransformerConfig unfused = mlp_config("silu", true), fused = mlp_config("silu", true, true, true);
  const MlpForward truth = mlp_forward(unfused, Params(w), x, truth_precision());
  const MlpForward bf16 = mlp_forward(unfused, Params(w), x, emulated_precision(DType::BF16, unfused));
  const MlpForward f32 = mlp_forward(unfused, Params(w), x, emulated_precision(DType::F32, unfused));
  const double scale = truth.output.cwiseAbs().maxCoeff();
  const double err16 = (bf16.output - truth.output).cwiseAbs().maxCoeff();
  const double err32 = (f32.output - truth.output).cwiseAbs().maxCoeff();
  EXPECT_GT(err16, 0.0);
  EXPECT_LE(err16, 0.03 * scale);
  EXPECT_GT(err32, 0.0);
  EXPECT_LE(err32, 1e-5 * scale);
  EXPECT_GT(err16, 100 * err32);
  EXPECT_EQ(bf16.fc1_output, rounded(bf16.fc1_output, DType::BF16));
  EXPECT_EQ(bf16.activation_output, rounded(bf16.activation_output, DType::BF16));
  EXPECT_EQ(bf16.output, rounded(bf16.output, DType::BF16));

  EXPECT_EQ(mlp_forward(fused, Params(w), x, truth_precision()).output, truth.output);
  const MlpForward bf16_fused = mlp_forward(fused, Params(w), x, emulated_precision(DType::BF16, fused));
  EXPECT_NE(bf16_fused.activation_output, bf16.activation_output);
  EXPECT_LE((bf16_fused.output - truth.output).cwiseAbs().maxCoeff(), 0.03 * scale);

  // Backward in bf16: close to truth, every gradient a bf16 value.
  const Mat d_out = rounded(random_normal(tokens, h, 1, "d_out"), DType::BF16);
  MatMap g_truth, g_bf16;
  const Mat dx_truth = mlp_backward(unfused, Params(w), x, truth, d_out, std::nullopt, Sink(g_truth),
                                    truth_precision());
  const Precision pb = emulated_precision(DType::BF16, unfused);
  const Mat dx_bf16 = mlp_backward(unfused, Params(w), x, bf16, d_out, std::nullopt, Sink(g_bf16), pb);
  EXPECT_EQ(dx_bf16, rounded(dx_bf16, DType::BF16));
  EXPECT_LE((dx_bf16 - dx_truth).cwiseAbs().maxCoeff(), 0.03 * dx_truth.cwiseAbs().maxCoeff());
  for (const char* key : {"linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight"}) {
    const Mat& gb = g_bf16.at(key);
    const Mat& gt = g_truth.at(key);
    EXPECT_EQ(gb, rounded(gb, DType::BF16)) << key;
    EXPECT_GT((gb - gt).cwiseAbs().maxCoeff(), 0.0) << key;
    EXPECT_LE((gb - gt).cwiseAbs().maxCoeff(), 0.03 * gt.cwiseAbs().maxCoeff()) << key;
  }
}

TEST(Mlp, ErrorsNameTheTensor) {
  const TransformerConfig cfg = mlp_config("gelu", false);
  const Mat x = Mat::Ones(3, 4);
  MatMap full{{"mlp.linear_fc1.weight", Mat::Ones(8, 4)},
              {"mlp.linear_fc1.bias", Mat::Zero(1, 8)},
              {"mlp.linear_fc2.weight", Mat::Ones(4, 8)},
              {"mlp.linear_fc2.bias", Mat::Zero(1, 4)}};
  auto without = [&](const std::string& key) {
    MatMap m = full;
    m.erase(key);
    return m;
  };
  for (const char* name : {"mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight",
                           "mlp.linear_fc2.bias"}) {
    const std::string key = name;
    const MatMap m = without(key);
    EXPECT_NE(error_of([&] { mlp_forward(cfg, Params(m).sub("mlp"), x, truth_precision()); }).find(key),
              std::string::npos)
        << key;
  }
  MatMap bad = full;
  bad["mlp.linear_fc2.weight"] = Mat::Ones(4, 7);
  EXPECT_NE(error_of([&] { mlp_forward(cfg, Params(bad).sub("mlp"), x, truth_precision()); })
                .find("mlp.linear_fc2.weight"),
            std::string::npos);
  bad = full;
  bad["mlp.linear_fc1.bias"] = Mat::Zero(1, 7);
  EXPECT_NE(error_of([&] { mlp_forward(cfg, Params(bad).sub("mlp"), x, truth_precision()); })
                .find("mlp.linear_fc1.bias"),
            std::string::npos);
  EXPECT_NE(error_of([&] { mlp_forward(cfg, Params(full).sub("mlp"), Mat::Ones(3, 5), truth_precision()); })
                .find("mlp.linear_fc1.weight"),
            std::string::npos);
  // Gated: fc1 needs an even [gate; up] height; then fc2 takes f = rows / 2.
  MatMap odd = full;
  odd["mlp.linear_fc1.weight"] = Mat::Ones(7, 4);
  odd["mlp.linear_fc1.bias"] = Mat::Zero(1, 7);
  EXPECT_THROW(mlp_forward(mlp_config("silu", true), Params(odd).sub("mlp"), x, truth_precision()), Error);
  EXPECT_NE(error_of([&] { mlp_forward(mlp_config("silu", true), Params(full).sub("mlp"), x, truth_precision()); })
                .find("mlp.linear_fc2.weight"),
            std::string::npos);  // fc2 is [4, 8] but gated f = 4
  // Fusion Megatron has no kernel for.
  EXPECT_THROW(mlp_forward(mlp_config("relu", false, true, true), Params(full).sub("mlp"), x, truth_precision()),
               Error);
  EXPECT_THROW(mlp_forward(mlp_config("silu", false, true, true), Params(full).sub("mlp"), x, truth_precision()),
               Error);
  // Backward shapes.
  const MlpForward f = mlp_forward(cfg, Params(full).sub("mlp"), x, truth_precision());
  EXPECT_THROW(mlp_backward(cfg, Params(full).sub("mlp"), x, f, Mat::Ones(3, 5), std::nullopt, Sink(),
                            truth_precision()),
               Error);
  EXPECT_THROW(mlp_backward(cfg, Params(full).sub("mlp"), x, f, Mat::Ones(3, 4), RowVec(RowVec::Ones(3)), Sink(),
                            truth_precision()),
               Error);
}

// Invariants on random shapes: the MLP is token-wise (permuting tokens
// permutes outputs), and a GLU whose up half is 1 with zero up weights equals
// the plain MLP on the gate half.
RC_GTEST_PROP(MlpProperty, TokenwiseAndGluReducesToPlain, ()) {
  const int64_t tokens = *rc::gen::inRange<int64_t>(2, 7);
  const int64_t h = *rc::gen::inRange<int64_t>(1, 9);
  const int64_t f = *rc::gen::inRange<int64_t>(1, 12);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const std::string act = *rc::gen::elementOf(std::vector<std::string>{"gelu", "silu", "quick_gelu", "relu"});
  MatMap plain{{"linear_fc1.weight", random_normal(f, h, seed, "w1")},
               {"linear_fc1.bias", random_normal(1, f, seed, "b1")},
               {"linear_fc2.weight", random_normal(h, f, seed, "w2")},
               {"linear_fc2.bias", random_normal(1, h, seed, "b2")}};
  const Mat x = random_normal(tokens, h, seed, "x");
  const MlpForward ref = mlp_forward(mlp_config(act, false), Params(plain), x, truth_precision());

  Mat reversed = x.colwise().reverse();
  const MlpForward rev = mlp_forward(mlp_config(act, false), Params(plain), reversed, truth_precision());
  RC_ASSERT((rev.output.colwise().reverse() - ref.output).cwiseAbs().maxCoeff() <= 1e-12);

  MatMap glu = plain;
  Mat w1(2 * f, h);
  w1 << plain.at("linear_fc1.weight"), Mat::Zero(f, h);
  Mat b1(1, 2 * f);
  b1 << plain.at("linear_fc1.bias"), Mat::Ones(1, f);
  glu["linear_fc1.weight"] = w1;
  glu["linear_fc1.bias"] = b1;
  const MlpForward gated = mlp_forward(mlp_config(act, true), Params(glu), x, truth_precision());
  RC_ASSERT((gated.output - ref.output).cwiseAbs().maxCoeff() <= 1e-12);
}

}  // namespace
}  // namespace paritron::ref
