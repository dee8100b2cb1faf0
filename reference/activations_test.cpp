// Tests of reference/activations: values against closed forms, derivatives
// against finite differences, precision emulation, errors.
#include "reference/activations.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <string>

#include "common/error.h"
#include "reference/gradcheck.h"

namespace paritron::ref {
namespace {

constexpr Activation kAll[] = {Activation::kGelu,       Activation::kSilu,    Activation::kRelu,
                               Activation::kSquaredRelu, Activation::kOpenaiGelu, Activation::kErfGelu,
                               Activation::kQuickGelu,  Activation::kBiasGeluTanh};

// Expected values below are closed forms evaluated with Python's math module
// (math.erf, math.tanh, math.exp), not with this implementation:
//   Phi(1) = 0.5 (1 + erf(1/sqrt 2)) = 0.8413447460685429 (standard normal CDF),
//   phi(1) = exp(-1/2) / sqrt(2 pi)  = 0.24197072451914337,
//   sigmoid(1) = 1 / (1 + e^-1)      = 0.7310585786300049.
TEST(Activations, GeluIsExactErfForm) {
  EXPECT_DOUBLE_EQ(activation_value(Activation::kGelu, 1.0), 0.8413447460685429);     // 1 * Phi(1)
  EXPECT_DOUBLE_EQ(activation_value(Activation::kGelu, -1.0), -0.15865525393145707);  // -1 * Phi(-1) = -(1 - Phi(1))
  EXPECT_DOUBLE_EQ(activation_value(Activation::kGelu, 2.0), 1.9544997361036416);     // 2 Phi(2)
  EXPECT_EQ(activation_value(Activation::kGelu, 0.0), 0.0);
  // gelu'(x) = Phi(x) + x phi(x): 0.5 at 0, Phi(1) + phi(1) at 1.
  EXPECT_DOUBLE_EQ(activation_derivative(Activation::kGelu, 0.0), 0.5);
  EXPECT_DOUBLE_EQ(activation_derivative(Activation::kGelu, 1.0), 0.8413447460685429 + 0.24197072451914337);
}

TEST(Activations, SiluReluSquaredRelu) {
  EXPECT_DOUBLE_EQ(activation_value(Activation::kSilu, 1.0), 0.7310585786300049);    // sigmoid(1)
  EXPECT_DOUBLE_EQ(activation_value(Activation::kSilu, -2.0), -0.2384058440442351);  // -2 / (1 + e^2)
  EXPECT_DOUBLE_EQ(activation_derivative(Activation::kSilu, 0.0), 0.5);             // s(0)(1 + 0)
  // silu'(1) = s (1 + (1 - s)) with s = sigmoid(1).
  EXPECT_DOUBLE_EQ(activation_derivative(Activation::kSilu, 1.0),
                   0.7310585786300049 * (1.0 + (1.0 - 0.7310585786300049)));
  EXPECT_EQ(activation_value(Activation::kRelu, -3.0), 0.0);
  EXPECT_EQ(activation_value(Activation::kRelu, 2.5), 2.5);
  EXPECT_EQ(activation_derivative(Activation::kRelu, 0.0), 0.0);  // torch threshold_backward: 0 at 0
  EXPECT_EQ(activation_derivative(Activation::kRelu, 0.1), 1.0);
  EXPECT_EQ(activation_value(Activation::kSquaredRelu, 3.0), 9.0);
  EXPECT_EQ(activation_value(Activation::kSquaredRelu, -3.0), 0.0);
  EXPECT_EQ(activation_derivative(Activation::kSquaredRelu, 3.0), 6.0);
  EXPECT_EQ(activation_derivative(Activation::kSquaredRelu, -3.0), 0.0);
}

TEST(Activations, TanhAndTruncatedConstantForms) {
  // openai_gelu: 0.5 x (1 + tanh(0.7978845608028654 x (1 + 0.044715 x^2))).
  EXPECT_DOUBLE_EQ(activation_value(Activation::kOpenaiGelu, 1.0), 0.8411919906082768);
  EXPECT_DOUBLE_EQ(activation_value(Activation::kOpenaiGelu, -3.0), -0.0036373920817729943);
  // bias_gelu (fused): the same with the truncated 0.79788456.
  EXPECT_DOUBLE_EQ(activation_value(Activation::kBiasGeluTanh, 1.0), 0.8411919903841787);
  EXPECT_DOUBLE_EQ(activation_value(Activation::kBiasGeluTanh, 2.0), 1.9545976939197902);
  // erf_gelu: x 0.5 (erf(x / 1.41421) + 1): 1.41421 < sqrt 2, so slightly above gelu for x > 0.
  EXPECT_DOUBLE_EQ(activation_value(Activation::kErfGelu, 1.0), 0.8413453555882842);
  EXPECT_DOUBLE_EQ(activation_value(Activation::kErfGelu, -3.0), -0.0040495936222113005);
  // quick_gelu: x sigmoid(1.702 x).
  EXPECT_DOUBLE_EQ(activation_value(Activation::kQuickGelu, 1.0), 0.8457957659328212);
  EXPECT_DOUBLE_EQ(activation_value(Activation::kQuickGelu, -1.0), -0.1542042340671787);
  // The tanh form is not gelu: at x = 2 it is 9.8e-5 above (spec §6.3 "turning on the fusion changes the numerics").
  EXPECT_NEAR(activation_value(Activation::kBiasGeluTanh, 2.0) - activation_value(Activation::kGelu, 2.0),
              9.795781614863053e-05, 1e-15);
  // erf_gelu differs from exact gelu by 6.1e-7 at x = 1 (the 1.41421 constant).
  EXPECT_NEAR(activation_value(Activation::kErfGelu, 1.0) - activation_value(Activation::kGelu, 1.0),
              6.095197412347986e-07, 1e-15);
}

TEST(Activations, BiasGeluBackIsMegatronsFormula) {
  // bias_gelu_back at x = 1, term for term with t = tanh(0.79788456 * 1.044715):
  // ff = 0.5 (1 - t^2)(0.79788456 + 0.1070322243) + 0.5 (1 + t).
  const double t = std::tanh(0.79788456 * 1.044715);
  const double ff = 0.5 * ((1 - t * t) * (0.79788456 + 0.1070322243)) + 0.5 * (1 + t);
  EXPECT_DOUBLE_EQ(activation_derivative(Activation::kBiasGeluTanh, 1.0), ff);
  // It is the forward's derivative up to the rounding of 0.1070322243 (~1e-11).
  const double eps = 1e-5;
  const double fd = (activation_value(Activation::kBiasGeluTanh, 1.0 + eps) -
                     activation_value(Activation::kBiasGeluTanh, 1.0 - eps)) /
                    (2 * eps);
  EXPECT_NEAR(ff, fd, 1e-9);
}

TEST(Activations, DerivativesMatchFiniteDifferences) {
  const double points[] = {-4.0, -2.5, -1.0, -0.3, 0.2, 0.7, 1.5, 3.0, 5.5};
  for (Activation a : kAll) {
    for (double x : points) {
      const double eps = 1e-6;
      const double fd = (activation_value(a, x + eps) - activation_value(a, x - eps)) / (2 * eps);
      const double an = activation_derivative(a, x);
      EXPECT_NEAR(fd, an, 1e-8 + 1e-7 * std::abs(an)) << activation_name(a) << " at " << x;
    }
  }
}

TEST(Activations, BackwardGradcheck) {
  const Mat x = random_normal(5, 7, 11, "x", 2.0);
  const Mat dy = random_normal(5, 7, 11, "dy");
  for (Activation a : kAll) {
    MatMap vars{{"x", x}};
    MatMap analytic{{"x", activation_backward(a, x, dy, DType::F64)}};
    auto loss = [&](const MatMap& v) { return dot(activation_forward(a, v.at("x"), DType::F64), dy); };
    const GradcheckResult r = gradcheck(loss, vars, analytic, {.eps = 1e-6, .rtol = 1e-6, .atol = 1e-8});
    EXPECT_TRUE(r.ok()) << activation_name(a) << ": " << r.describe();
    EXPECT_EQ(r.checked, 35);
  }
}

TEST(Activations, EmulatedPrecisionRoundsOnce) {
  const Mat x = random_normal(8, 16, 3, "x", 2.0);
  for (Activation a : kAll) {
    const Mat truth = activation_forward(a, x, DType::F64);
    const Mat bf16 = activation_forward(a, x, DType::BF16);
    const Mat f32 = activation_forward(a, x, DType::F32);
    EXPECT_GT((truth - bf16).cwiseAbs().maxCoeff(), 0.0) << activation_name(a);
    for (Eigen::Index i = 0; i < x.size(); ++i) {
      const double t = truth.data()[i];
      // Unit roundoff: 2^-8 for bf16 (8 significant bits), 2^-24 for fp32.
      EXPECT_LE(std::abs(bf16.data()[i] - t), std::ldexp(std::abs(t), -8)) << activation_name(a);
      EXPECT_LE(std::abs(f32.data()[i] - t), std::ldexp(std::abs(t), -24)) << activation_name(a);
      EXPECT_EQ(bf16.data()[i], round_to(t, DType::BF16));
    }
  }
}

TEST(Activations, NamesAndMlpChoice) {
  for (std::string_view name : kActivationNames) EXPECT_EQ(activation_name(activation_from_name(name)), name);
  EXPECT_EQ(activation_from_name("bias_gelu"), Activation::kBiasGeluTanh);
  TransformerConfig cfg;
  cfg.activation_func = "gelu";
  EXPECT_EQ(mlp_activation(cfg), Activation::kGelu);
  cfg.bias_activation_fusion = true;
  EXPECT_EQ(mlp_activation(cfg), Activation::kBiasGeluTanh);  // fusion switches gelu to the tanh form
  cfg.activation_func = "silu";
  cfg.gated_linear_unit = true;
  EXPECT_EQ(mlp_activation(cfg), Activation::kSilu);  // bias_swiglu is plain silu
}

TEST(Activations, ErrorsNameTheProblem) {
  try {
    activation_from_name("swish");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'swish'"), std::string::npos) << e.what();
  }
  TransformerConfig cfg;
  cfg.bias_activation_fusion = true;
  cfg.activation_func = "relu";
  EXPECT_THROW(mlp_activation(cfg), Error);
  cfg.activation_func = "silu";  // silu fuses only as swiglu
  EXPECT_THROW(mlp_activation(cfg), Error);
  EXPECT_THROW(activation_backward(Activation::kGelu, Mat::Zero(2, 3), Mat::Zero(3, 2), DType::F64), Error);
}

// Invariants: gelu(x) - gelu(-x) = x for the erf forms (Phi(x) + Phi(-x) = 1),
// silu(x) - silu(-x) = x (sigmoid(x) + sigmoid(-x) = 1), likewise for the tanh
// forms and quick_gelu; relu and squared_relu vanish on negatives.
RC_GTEST_PROP(ActivationsProperty, OddPartIsIdentity, ()) {
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const Mat x = random_normal(1, 16, seed, "x", 3.0);
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    const double v = x.data()[i];
    for (Activation a : {Activation::kGelu, Activation::kSilu, Activation::kOpenaiGelu, Activation::kErfGelu,
                         Activation::kQuickGelu, Activation::kBiasGeluTanh}) {
      RC_ASSERT(std::abs(activation_value(a, v) - activation_value(a, -v) - v) <= 1e-14 * (1 + std::abs(v)));
    }
    RC_ASSERT(activation_value(Activation::kRelu, -std::abs(v)) == 0.0);
    RC_ASSERT(activation_value(Activation::kSquaredRelu, v) == std::pow(std::max(v, 0.0), 2));
  }
}

}  // namespace
}  // namespace paritron::ref
