// Near-tie detection (parity/near_ties.h) on hand-built taps, and the
// sensitivity term's perturbation (parity/sensitivity.h).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "common/case_file.h"
#include "parity/near_ties.h"
#include "parity/sensitivity.h"
#include "parity/tolerance.h"

namespace paritron::parity {
namespace {

Tensor mat(int64_t rows, int64_t cols, std::vector<double> v) {
  return Tensor::from_values(DType::F64, {rows, cols}, v);
}

constexpr double kInf = std::numeric_limits<double>::infinity();

NearTie near(const std::map<std::string, Tensor>& truth, const std::map<std::string, Tensor>& emulated, DType dtype,
             const TransformerConfig& cfg) {
  return find_near_tie(truth, {&emulated}, dtype, dtype, cfg);
}

// A router tap set: logits [2 tokens, 3 experts], margins per token.
std::map<std::string, Tensor> router(const std::string& path, std::vector<double> logits, double topk_margin,
                                     double capacity_margin = kInf) {
  const std::string p = "outputs.intermediate." + path + "router.";
  return {{p + "logits", mat(2, 3, std::move(logits))},
          {p + "topk_margin", mat(2, 1, {topk_margin, 1.0})},
          {p + "order_margin", mat(2, 1, {kInf, kInf})},
          {p + "capacity_margin", mat(1, 3, {capacity_margin, kInf, kInf})}};
}

TEST(NearTies, RouterMarginAgainstTheEmulatedLogitDrift) {
  TransformerConfig cfg;
  // The emulation's logits of token 0 drift by 0.01: a margin of 0.07 is 7 x
  // the resolution (not a tie), 0.05 is 5 x (a tie: < tie_factor(BF16) = 6,
  // the tolerance model's k).
  const std::vector<double> logits{1.0, 0.5, -0.25, 0.75, 0.0, 2.0};
  std::vector<double> drifted = logits;
  drifted[1] += 0.01;
  const auto emulated = router("layers.1.mlp.", drifted, 0.0);
  {
    const NearTie t = near(router("layers.1.mlp.", logits, 0.07), emulated, DType::BF16, cfg);
    EXPECT_FALSE(t.near_tie) << t.describe();
    EXPECT_EQ(t.router, "layers.1.mlp.");
    EXPECT_NEAR(t.resolution, 0.01, 1e-15);
    EXPECT_EQ(t.margin, 0.07);
  }
  {
    const NearTie t = near(router("layers.1.mlp.", logits, 0.05), emulated, DType::BF16, cfg);
    EXPECT_TRUE(t.near_tie) << t.describe();
    EXPECT_TRUE(t.routing);  // the sweep redraws the case
    EXPECT_FALSE(t.kink);
    EXPECT_NE(t.describe().find("layers.1.mlp."), std::string::npos);
  }
  // A capacity decision near a tie counts the same way.
  const auto same_path = router("", drifted, 0.0, 0.0);
  EXPECT_TRUE(near(router("", logits, 1.0, 0.02), same_path, DType::BF16, cfg).near_tie);
  EXPECT_FALSE(near(router("", logits, 1.0, 0.2), same_path, DType::BF16, cfg).near_tie);
  // An exact tie (margin 0: equal scores, every top-1 score is 1) is settled
  // by the tie rule, not by rounding.
  EXPECT_FALSE(near(router("", logits, 1.0, 0.0), same_path, DType::BF16, cfg).near_tie);
  // A decision that flips in the perturbed truth counts as well: its drift
  // joins the resolution.
  std::vector<double> shaken = logits;
  shaken[0] += 0.02;
  const auto perturbed = router("", shaken, 0.0);
  const auto truth = router("", logits, 0.05);
  EXPECT_FALSE(near(truth, truth, DType::BF16, cfg).near_tie);
  const auto both = find_near_tie(truth, {&truth, &perturbed}, DType::BF16, DType::BF16, cfg);
  EXPECT_TRUE(both.near_tie) << both.describe();
  // fp8 cases: the factor is fp8's k, 16.
  const auto fp8 = find_near_tie(router("", logits, 0.05), {&emulated}, DType::BF16, DType::F8_E4M3, cfg);
  EXPECT_EQ(fp8.factor, 16.0);
}

TEST(NearTies, ResolutionIsAtLeastTheDtypesRoundoff) {
  TransformerConfig cfg;
  // Emulation identical to the truth: token 0's resolution is u * its
  // largest |logit| = 2^-8 * 1 for BF16, 2^-24 for F32.
  const std::vector<double> logits{1.0, 0.5, -0.25, 0.75, 0.0, 2.0};
  const auto taps = router("", logits, 0.01);
  EXPECT_TRUE(near(taps, taps, DType::BF16, cfg).near_tie);   // 0.01 < 6 * 2^-8
  EXPECT_FALSE(near(taps, taps, DType::F32, cfg).near_tie);   // 0.01 >> 4 * 2^-24
  EXPECT_EQ(tie_factor(DType::F32), 4.0);
  EXPECT_EQ(tie_factor(DType::BF16), default_k(DType::BF16));
  EXPECT_FALSE(near({}, {}, DType::BF16, cfg).near_tie);      // no router
}

TEST(NearTies, ReluKinksOnlyForRelu) {
  TransformerConfig cfg;
  cfg.activation_func = "relu";
  // fc1 pre-activations [2 tokens, 4 units]; the emulation drifts by 0.002.
  const std::string name = "outputs.intermediate.mlp.linear_fc1";
  std::map<std::string, Tensor> truth{{name, mat(2, 4, {0.5, -0.4, 0.004, 0.3, -0.2, 0.6, 0.7, -0.9})}};
  std::map<std::string, Tensor> emulated{{name, mat(2, 4, {0.5, -0.4, 0.002, 0.3, -0.2, 0.6, 0.7, -0.9})}};
  const NearTie t = near(truth, emulated, DType::BF16, cfg);
  EXPECT_TRUE(t.near_tie) << t.describe();  // row 0: |z| = 0.004 < 6 x max(0.002, 2^-8 * 0.5)
  EXPECT_NE(t.describe().find("relu kink"), std::string::npos);
  EXPECT_TRUE(t.kink);
  EXPECT_FALSE(t.routing);  // the sweep judges the outputs, not the gradients
  // GLU: only the gate half (the first two columns) has the activation.
  cfg.gated_linear_unit = true;
  EXPECT_FALSE(near(truth, emulated, DType::BF16, cfg).near_tie);
  // A smooth activation has no kink.
  cfg.gated_linear_unit = false;
  cfg.activation_func = "gelu";
  EXPECT_FALSE(near(truth, emulated, DType::BF16, cfg).near_tie);
}

TEST(Sensitivity, PerturbsWeightsAndInputsByExactlyOneRelativeStep) {
  Case c;
  c.component = "mlp";
  c.tensors["weights.linear_fc1.weight"] = Tensor::from_values(DType::F32, {2, 2}, std::vector<double>{1, -2, 0.5, 4});
  c.tensors["inputs.hidden_states"] = Tensor::from_values(DType::BF16, {1, 1, 2}, std::vector<double>{0.25, -1});
  c.tensors["inputs.grad_output"] = Tensor::from_values(DType::F32, {1, 1, 2}, std::vector<double>{3, 5});
  c.tensors["inputs.rotary_pos_emb"] = Tensor::from_values(DType::F32, {1, 1, 1, 2}, std::vector<double>{0.1, 0.2});
  c.tensors["outputs.output"] = Tensor::from_values(DType::F32, {1, 1, 2}, std::vector<double>{7, 8});
  const double u = sensitivity_roundoff();
  EXPECT_EQ(u, std::ldexp(1.0, -24));
  const Case p = perturb_case(c, u, 42);
  int up = 0, down = 0;
  for (const char* name : {"weights.linear_fc1.weight", "inputs.hidden_states"}) {
    const Tensor& a = c.tensors.at(name);
    const Tensor& b = p.tensors.at(name);
    EXPECT_EQ(b.dtype(), DType::F64) << name;
    for (int64_t i = 0; i < a.numel(); ++i) {
      const double rel = (b.get(i) - a.get(i)) / a.get(i);
      EXPECT_TRUE(rel == u || rel == -u) << name << " " << rel;
      (rel > 0 ? up : down) += 1;
    }
  }
  EXPECT_GT(up, 0);
  EXPECT_GT(down, 0);
  // Output gradients, the float32 RoPE table and results stay as they were.
  for (const char* name : {"inputs.grad_output", "inputs.rotary_pos_emb", "outputs.output"}) {
    EXPECT_TRUE(p.tensors.at(name).bitwise_equal(c.tensors.at(name))) << name;
  }
  // Deterministic in the seed, different across seeds.
  EXPECT_TRUE(perturb_case(c, u, 42).tensors.at("inputs.hidden_states").bitwise_equal(p.tensors.at("inputs.hidden_states")));
}

// bound = k * reference_error + k_s * sensitivity + floor, and needed_k, by hand.
TEST(Tolerance, SensitivityTermAndNeededK) {
  auto f64 = [](std::vector<double> v) { return Tensor::from_values(DType::F64, {4}, v); };
  const std::map<std::string, Tensor> truth{{"outputs.output", f64({1.0, -2.0, 0.5, 0.0})}};
  const std::map<std::string, Tensor> emulated{{"outputs.output", f64({1.0, -2.015625, 0.5, 0.0})}};  // 1/64
  const std::map<std::string, Tensor> perturbed{{"outputs.output", f64({1.0, -2.0, 0.53125, 0.0})}};  // 1/32
  const std::map<std::string, Tensor> actual{{"outputs.output", f64({1.0, -2.0, 0.5, 0.25})}};        // 1/4
  ToleranceParams p;
  p.k = 2;
  p.c = 1;
  p.k_sensitivity = 4;
  p.perturbed = &perturbed;
  // BF16, n = 16: floor = 2^-8 * 4 * 2 = 1/32; bound = 2/64 + 4/32 + 1/32 = 3/16 < 1/4.
  const TensorVerdict v = judge(truth, emulated, actual, DType::BF16, 16, p)[0];
  EXPECT_EQ(v.sensitivity, 0.03125);
  EXPECT_EQ(v.bound, 0.1875);
  EXPECT_FALSE(v.passed);
  // needed k: (1/4 - 4/32 - 1/32) / (1/64) = 6.
  EXPECT_EQ(v.needed_k, 6.0);
  p.k = 6;
  EXPECT_TRUE(judge(truth, emulated, actual, DType::BF16, 16, p)[0].passed);
}

}  // namespace
}  // namespace paritron::parity
