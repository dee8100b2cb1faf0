// Tests of reference/moe_router: hand-computed routing, aux and z losses,
// sinkhorn, jitter, the newer score options and capacity, finite-difference
// gradients of x and the router weight in every mode, invariants, precision
// emulation, errors.
#include "reference/moe_router.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <functional>
#include <set>
#include <string>

#include "common/error.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

const double kLn2 = std::log(2.0), kLn3 = std::log(3.0), kLn4 = std::log(4.0);

// A validated MoE config; `edit` sets the fields a test is about before validation.
TransformerConfig moe_config(int64_t h, int64_t experts, int64_t k,
                             const std::function<void(TransformerConfig&)>& edit = {}) {
  TransformerConfig cfg;
  cfg.num_layers = 1;
  cfg.hidden_size = h;
  cfg.num_attention_heads = 1;
  cfg.kv_channels = 2;  // any even width: RoPE's rotary_dim must be even even if unused
  cfg.ffn_hidden_size = 4;
  cfg.num_moe_experts = experts;
  cfg.moe_router_topk = k;
  if (edit) edit(cfg);
  validate_config(cfg);
  return cfg;
}

RunContext eval_ctx(uint64_t seed = 0) {
  RunContext c;
  c.seed = seed;
  c.path = "layers.0.mlp.router";
  return c;
}
RunContext train_ctx(uint64_t seed = 0) {
  RunContext c = eval_ctx(seed);
  c.training = true;
  return c;
}

// Router weight = identity rows, so the logits are the token's first E features.
MatMap identity_router(int64_t experts, int64_t h) {
  return MatMap{{"router.weight", Mat::Identity(experts, h)}};
}

// ---------------------------------------------------------------------------
// Hand-computed routing.

// W = [[1,0],[0,1],[0,0]] so logits = [x0, x1, 0].
// Token 0: x = (ln 3, 0): logits [ln 3, 0, 0]; top-2 = experts 0 and 1 (1 and 2 tie
//   at 0: the lower index wins); scores = softmax(ln 3, 0) = [3/4, 1/4].
// Token 1: x = (0, 2): logits [0, 2, 0]; top-2 = [1, 0] (0 and 2 tie); scores =
//   softmax(2, 0) = [e^2/(1+e^2), 1/(1+e^2)].
// Full softmax probs: token 0 [3, 1, 1]/5, token 1 [1, e^2, 1]/(2+e^2).
// mask counts [2, 2, 0]; aux = E * sum_e mean_t(P_e) * (count_e / T) / k * coeff
//   = 3 * (mean P_0 * 1/2 + mean P_1 * 1/2) * 0.1 = 0.075 * (P_00 + P_10 + P_01 + P_11)
//   = 0.075 * (4/5 + (1 + e^2)/(2 + e^2)).
// z = 0.01 * mean(lse^2) = 0.01 * (ln(5)^2 + ln(2 + e^2)^2) / 2.
TEST(MoeRouter, TopTwoScoresAuxAndZLossByHand) {
  const TransformerConfig cfg = moe_config(2, 3, 2, [](TransformerConfig& c) {
    c.moe_aux_loss_coeff = 0.1;
    c.moe_z_loss_coeff = 0.01;
  });
  MatMap w{{"router.weight", rows_of({{1, 0}, {0, 1}, {0, 0}})}};
  const Mat x = rows_of({{kLn3, 0}, {0, 2}});
  const RouterForward f = moe_router_forward(cfg, Params(w).sub("router"), x, float64_math(), eval_ctx());
  const double e2 = std::exp(2.0);
  EXPECT_EQ(f.indices(0, 0), 0);
  EXPECT_EQ(f.indices(0, 1), 1);
  EXPECT_EQ(f.indices(1, 0), 1);
  EXPECT_EQ(f.indices(1, 1), 0);
  EXPECT_NEAR(f.scores(0, 0), 0.75, 1e-15);
  EXPECT_NEAR(f.scores(0, 1), 0.25, 1e-15);
  EXPECT_NEAR(f.scores(1, 0), e2 / (1 + e2), 1e-15);
  EXPECT_NEAR(f.scores(1, 1), 1 / (1 + e2), 1e-15);
  ASSERT_TRUE(f.probs.has_value());
  EXPECT_NEAR((*f.probs)(0, 0), 0.6, 1e-15);
  EXPECT_NEAR((*f.probs)(1, 1), e2 / (2 + e2), 1e-15);
  ASSERT_TRUE(f.aux_loss.has_value());
  EXPECT_NEAR(*f.aux_loss, 0.075 * (0.8 + (1 + e2) / (2 + e2)), 1e-15);
  ASSERT_TRUE(f.z_loss.has_value());
  const double l5 = std::log(5.0), l2e = std::log(2 + e2);
  EXPECT_NEAR(*f.z_loss, 0.01 * (l5 * l5 + l2e * l2e) / 2, 1e-15);
  EXPECT_EQ(f.tokens_per_expert, (std::vector<int64_t>{2, 2, 0}));
  // The ties at 0 are visible: the k-th and (k+1)-th logits are equal.
  EXPECT_EQ(f.topk_margin(0, 0), 0.0);
  EXPECT_EQ(f.topk_margin(1, 0), 0.0);
  EXPECT_NEAR(f.order_margin(0, 0), kLn3, 1e-15);
  EXPECT_NEAR(f.order_margin(1, 0), 2.0, 1e-15);
  EXPECT_TRUE(f.kept.isOnes());
}

// "none": the same top-k-then-softmax scores, no aux loss and no probs.
// Megatron run in float64 still computes the top-k softmax in float32
// (router.py: softmax(top_logits, dtype=torch.float32).type_as(logits)), so
// the truth's scores are the float32 roundings of the exact ones of the test
// above: token 0's scores are exactly float(3/4) and float(1/4) (both exact),
// token 1's are float(e^2/(1+e^2)), which differs from the double value.
TEST(MoeRouter, TruthRoundsWhereMegatronForcesFloat32) {
  const TransformerConfig cfg = moe_config(2, 3, 2, [](TransformerConfig& c) { c.moe_aux_loss_coeff = 0.1; });
  MatMap w{{"router.weight", rows_of({{1, 0}, {0, 1}, {0, 0}})}};
  const Mat x = rows_of({{kLn3, 0}, {0, 2}});
  const RouterForward truth = moe_router_forward(cfg, Params(w).sub("router"), x, truth_precision(), eval_ctx());
  const RouterForward exact = moe_router_forward(cfg, Params(w).sub("router"), x, float64_math(), eval_ctx());
  const double e2 = std::exp(2.0);
  EXPECT_EQ(truth.scores(1, 0), static_cast<double>(static_cast<float>(e2 / (1 + e2))));
  EXPECT_NE(truth.scores(1, 0), exact.scores(1, 0));
  EXPECT_NEAR(truth.scores(1, 0), exact.scores(1, 0), 1e-7);
  EXPECT_EQ(static_cast<double>(static_cast<float>(truth.probs->operator()(1, 1))), truth.probs->operator()(1, 1));
  // The logits themselves are not forced: they stay float64 products.
  EXPECT_EQ(truth.logits, exact.logits);
}

TEST(MoeRouter, NoneTypeHasNoLoss) {
  const TransformerConfig cfg =
      moe_config(2, 3, 2, [](TransformerConfig& c) { c.moe_router_load_balancing_type = "none"; });
  MatMap w{{"router.weight", rows_of({{1, 0}, {0, 1}, {0, 0}})}};
  const RouterForward f =
      moe_router_forward(cfg, Params(w).sub("router"), rows_of({{kLn3, 0}}), float64_math(), eval_ctx());
  EXPECT_NEAR(f.scores(0, 0), 0.75, 1e-15);
  EXPECT_FALSE(f.aux_loss.has_value());
  EXPECT_FALSE(f.z_loss.has_value());
  EXPECT_FALSE(f.probs.has_value());
}

// Newer Megatron's router bias (present in the weights): logits = x W^T + b.
// x = 0, b = [ln 3, 0]: scores softmax(ln 3, 0) = [3/4, 1/4]. With d_scores = [1, 0]
// the softmax backward gives d logits = s (g - <g, s>) = [3/4 * 1/4, 1/4 * (-3/4)]
// = [3/16, -3/16], which is the bias gradient (and the weight gradient is 0: x = 0).
TEST(MoeRouter, RouterBiasOfNewerVersions) {
  const TransformerConfig cfg = moe_config(2, 2, 2);
  MatMap w{{"router.weight", Mat::Identity(2, 2)}, {"router.bias", rows_of({{kLn3, 0}})}};
  const Mat x = Mat::Zero(1, 2);
  const RouterForward f = moe_router_forward(cfg, Params(w).sub("router"), x, float64_math(), eval_ctx());
  EXPECT_NEAR(f.scores(0, 0), 0.75, 1e-15);
  EXPECT_EQ(f.indices(0, 0), 0);
  MatMap g;
  moe_router_backward(cfg, Params(w).sub("router"), x, f, rows_of({{1, 0}}), Sink(g).sub("router"),
                      float64_math());
  EXPECT_NEAR(g.at("router.bias")(0, 0), 3.0 / 16, 1e-15);
  EXPECT_NEAR(g.at("router.bias")(0, 1), -3.0 / 16, 1e-15);
  EXPECT_EQ(g.at("router.weight").cwiseAbs().maxCoeff(), 0.0);
}

// With uniform probabilities (zero weight) every P[t, e] = 1/E, so
// aux = E * sum_e (1/E) * (count_e / T) / k * coeff = coeff * (sum_e count_e) / (T k) = coeff.
TEST(MoeRouter, AuxLossOfUniformProbsIsTheCoefficient) {
  const TransformerConfig cfg = moe_config(3, 5, 2, [](TransformerConfig& c) { c.moe_aux_loss_coeff = 0.37; });
  MatMap w{{"router.weight", Mat::Zero(5, 3)}};
  const Mat x = random_normal(7, 3, 1, "x");
  const RouterForward f = moe_router_forward(cfg, Params(w).sub("router"), x, float64_math(), eval_ctx());
  EXPECT_NEAR(*f.aux_loss, 0.37, 1e-15);
  // All logits tie: every token picks experts 0 and 1 (lower index first).
  EXPECT_EQ(f.tokens_per_expert, (std::vector<int64_t>{7, 7, 0, 0, 0}));
}

// k = 1 with aux_loss: the score is softmax of a single logit = exactly 1.0, in
// every precision, so the main loss gives the router no gradient.
TEST(MoeRouter, TopOneAuxLossScoreIsExactlyOne) {
  const TransformerConfig cfg = moe_config(6, 4, 1);
  MatMap w{{"router.weight", random_normal(4, 6, 2, "w")}};
  const Mat x = random_normal(9, 6, 2, "x");
  for (DType dt : {DType::F64, DType::F32, DType::BF16, DType::F16}) {
    const Precision p = emulated_precision(dt, cfg);
    const RouterForward f = moe_router_forward(cfg, Params(w).sub("router"), rounded(x, dt), p, eval_ctx());
    EXPECT_TRUE((f.scores.array() == 1.0).all()) << dtype_name(dt);
    MatMap g;
    const Mat dx = moe_router_backward(cfg, Params(w).sub("router"), rounded(x, dt), f, random_normal(9, 1, 3, "ds"),
                                       Sink(g).sub("router"), p);
    EXPECT_EQ(dx.cwiseAbs().maxCoeff(), 0.0) << dtype_name(dt);
    EXPECT_EQ(g.at("router.weight").cwiseAbs().maxCoeff(), 0.0) << dtype_name(dt);
  }
}

// ---------------------------------------------------------------------------
// Sinkhorn.

// cost = [[ln 4, 0], [ln 2, 0]], C = exp(cost) = [[4, 1], [2, 1]], T = E = 2.
// No iteration (tol >= the initial error 1e9): d0 = d1 = 1, the result is C.
// One iteration (tol = 1e8 stops after the first): d0 = 0.5 / row sums = [1/10, 1/6];
//   column sums of d0 C: [4/10 + 2/6, 1/10 + 1/6] = [11/15, 4/15], d1 = 0.5 / them = [15/22, 15/8];
//   P = d0[t] C[t,e] d1[e] = [[6/22, 3/16], [5/22, 5/16]].
// Converged: P has row and column sums 1/2 and keeps C's cross ratio
//   P00 P11 / (P01 P10) = 4*1/(1*2) = 2, so P = [[p, 1/2 - p], [1/2 - p, p]] with
//   p / (1/2 - p) = sqrt 2, p = (2 - sqrt 2)/2. Megatron's tol 1e-4 on mean|d1 change|
//   stops after 4 iterations, 1.5e-5 from the fixed point in d1 (worked in Python floats),
//   so P is within 1e-5 of the closed form.
TEST(MoeRouter, SinkhornTwoByTwoByHand) {
  const Mat cost = rows_of({{kLn4, 0}, {kLn2, 0}});
  const Mat none = sinkhorn_fp32(cost, 1e10);
  EXPECT_NEAR(none(0, 0), 4.0, 4e-7);
  EXPECT_NEAR(none(1, 0), 2.0, 2e-7);
  EXPECT_EQ(none(0, 1), 1.0);
  const Mat one = sinkhorn_fp32(cost, 1e8);
  const double expected_one[2][2] = {{6.0 / 22, 3.0 / 16}, {5.0 / 22, 5.0 / 16}};
  for (int t = 0; t < 2; ++t) {
    for (int e = 0; e < 2; ++e) EXPECT_NEAR(one(t, e), expected_one[t][e], 1e-6) << t << "," << e;
  }
  const Mat conv = sinkhorn_fp32(cost);
  const double pp = (2 - std::sqrt(2.0)) / 2;
  const double expected[2][2] = {{pp, 0.5 - pp}, {0.5 - pp, pp}};
  for (int t = 0; t < 2; ++t) {
    for (int e = 0; e < 2; ++e) EXPECT_NEAR(conv(t, e), expected[t][e], 1e-5) << t << "," << e;
  }
  // Every value is an fp32 number (the computation is fp32, also for the truth).
  for (Eigen::Index i = 0; i < conv.size(); ++i) EXPECT_EQ(conv.data()[i], round_to(conv.data()[i], DType::F32));
}

// One token whose logits are 16 apart: the +1e-8 in sinkhorn's denominators keeps
// the rare expert's d1 drifting (4e6 after one iteration, 5e3 after 20000), and the
// change per iteration falls only like 1/n^2 (0.12 at n = 20000, worked through in
// Python with fp32 rounding of every operation): Megatron's uncapped loop would need
// about a million iterations. The reference gives up after 100000 with an Error.
// Logits 16 apart on one token: Megatron's loop needs about 1e6 iterations.
// The reference follows it (the default budget allows >= 1e7) and stops with
// a clear error only past its cap.
TEST(MoeRouter, SinkhornThatConvergesTooSlowlyThrows) {
  EXPECT_NE(error_of([] { sinkhorn_fp32(rows_of({{8, -8}}), 1e-4, 1000); }).find("no convergence"), std::string::npos);
  const Mat converged = sinkhorn_fp32(rows_of({{8, -8}}));
  EXPECT_GT(converged(0, 0), converged(0, 1));
}

// The same logits through the router with k = 1: in training sinkhorn balances
// the two experts, so token 1 goes to expert 1 (P11 = 0.293 > P10 = 0.207) and
// the score is sigmoid(logit) gathered: sigmoid(ln 4) = 4/5, sigmoid(0) = 1/2.
// In eval sinkhorn does not run: top-1 of sigmoid(logits) sends both tokens to
// expert 0, scores sigmoid(ln 4) = 4/5 and sigmoid(ln 2) = 2/3.
TEST(MoeRouter, SinkhornTrainingVersusEval) {
  const TransformerConfig cfg =
      moe_config(2, 2, 1, [](TransformerConfig& c) { c.moe_router_load_balancing_type = "sinkhorn"; });
  MatMap w = identity_router(2, 2);
  const Mat x = rows_of({{kLn4, 0}, {kLn2, 0}});
  const RouterForward tr = moe_router_forward(cfg, Params(w).sub("router"), x, float64_math(), train_ctx());
  EXPECT_EQ(tr.indices(0, 0), 0);
  EXPECT_EQ(tr.indices(1, 0), 1);
  EXPECT_NEAR(tr.scores(0, 0), 0.8, 1e-15);
  EXPECT_NEAR(tr.scores(1, 0), 0.5, 1e-15);
  EXPECT_EQ(tr.tokens_per_expert, (std::vector<int64_t>{1, 1}));
  EXPECT_FALSE(tr.aux_loss.has_value());
  const RouterForward ev = moe_router_forward(cfg, Params(w).sub("router"), x, float64_math(), eval_ctx());
  EXPECT_EQ(ev.indices(0, 0), 0);
  EXPECT_EQ(ev.indices(1, 0), 0);
  EXPECT_NEAR(ev.scores(0, 0), 0.8, 1e-15);
  EXPECT_NEAR(ev.scores(1, 0), 2.0 / 3.0, 1e-15);
  EXPECT_EQ(ev.tokens_per_expert, (std::vector<int64_t>{2, 0}));
}

// k = 2 sinkhorn: scores are the full softmax over all E gathered, NOT
// renormalised over the two chosen: logits [ln 3, 0, 0] -> softmax [3, 1, 1]/5,
// scores [3/5, 1/5] (sum 4/5), in eval.
TEST(MoeRouter, SinkhornTopTwoScoresAreTheFullSoftmax) {
  const TransformerConfig cfg =
      moe_config(3, 3, 2, [](TransformerConfig& c) { c.moe_router_load_balancing_type = "sinkhorn"; });
  MatMap w = identity_router(3, 3);
  const RouterForward ev =
      moe_router_forward(cfg, Params(w).sub("router"), rows_of({{kLn3, 0, 0}}), float64_math(), eval_ctx());
  EXPECT_NEAR(ev.scores(0, 0), 0.6, 1e-15);
  EXPECT_NEAR(ev.scores(0, 1), 0.2, 1e-15);
  ASSERT_TRUE(ev.probs.has_value());
  EXPECT_NEAR((*ev.probs)(0, 2), 0.2, 1e-15);
}

// ---------------------------------------------------------------------------
// Jitter.

TEST(MoeRouter, JitterIsDeterministicBySeedAndBounded) {
  const double eps = 0.1;
  const TransformerConfig cfg = moe_config(4, 6, 2, [&](TransformerConfig& c) { c.moe_input_jitter_eps = eps; });
  MatMap w{{"router.weight", random_normal(6, 4, 4, "w")}};
  const Mat x = random_normal(10, 4, 4, "x");
  const Params rw = Params(w).sub("router");
  const RouterForward a = moe_router_forward(cfg, rw, x, float64_math(), train_ctx(11));
  const RouterForward b = moe_router_forward(cfg, rw, x, float64_math(), train_ctx(11));
  const RouterForward c = moe_router_forward(cfg, rw, x, float64_math(), train_ctx(12));
  ASSERT_EQ(a.jitter.rows(), 10);
  EXPECT_EQ(a.jitter, b.jitter);
  EXPECT_EQ(a.scores, b.scores);
  EXPECT_GT((a.jitter - c.jitter).cwiseAbs().maxCoeff(), 1e-3);
  EXPECT_GE(a.jitter.minCoeff(), 1 - eps - 1e-7);
  EXPECT_LE(a.jitter.maxCoeff(), 1 + eps + 1e-7);
  EXPECT_GT(a.jitter.maxCoeff() - a.jitter.minCoeff(), eps);  // it does spread over the range
  // u is an fp32 value; the jittered logits are logits * u, and 0.5.0 applies it in eval too.
  for (Eigen::Index i = 0; i < a.jitter.size(); ++i) EXPECT_EQ(a.jitter.data()[i], round_to(a.jitter.data()[i], DType::F32));
  EXPECT_EQ(a.routing_logits, a.logits.cwiseProduct(a.jitter));
  const RouterForward ev = moe_router_forward(cfg, rw, x, float64_math(), eval_ctx(11));
  EXPECT_EQ(ev.jitter, a.jitter);
  // The z-loss sees the logits before jitter: the same with and without it.
  const TransformerConfig cz = moe_config(4, 6, 2, [&](TransformerConfig& c) {
    c.moe_input_jitter_eps = eps;
    c.moe_z_loss_coeff = 1.0;
  });
  const TransformerConfig cz0 = moe_config(4, 6, 2, [&](TransformerConfig& c) { c.moe_z_loss_coeff = 1.0; });
  EXPECT_EQ(*moe_router_forward(cz, rw, x, float64_math(), eval_ctx(3)).z_loss,
            *moe_router_forward(cz0, rw, x, float64_math(), eval_ctx(3)).z_loss);
}

// ---------------------------------------------------------------------------
// Newer score options.

// pre-softmax: P = softmax(ln 3, 0, 0) = [3/5, 1/5, 1/5]; top-2 of P = [0, 1],
// scores [3/5, 1/5] (not renormalised).
TEST(MoeRouter, PreSoftmaxByHand) {
  const TransformerConfig cfg = moe_config(3, 3, 2, [](TransformerConfig& c) { c.moe_router_pre_softmax = true; });
  MatMap w = identity_router(3, 3);
  const RouterForward f =
      moe_router_forward(cfg, Params(w).sub("router"), rows_of({{kLn3, 0, 0}}), float64_math(), eval_ctx());
  EXPECT_EQ(f.indices(0, 0), 0);
  EXPECT_EQ(f.indices(0, 1), 1);
  EXPECT_NEAR(f.scores(0, 0), 0.6, 1e-15);
  EXPECT_NEAR(f.scores(0, 1), 0.2, 1e-15);
}

// sigmoid: logits [0, ln 3, -ln 3] -> sigmoid [1/2, 3/4, 1/4]; top-2 = [1, 0],
// q = [3/4, 1/2], renormalised [0.6, 0.4], times the scaling factor 2.5 = [1.5, 1.0].
// With expert bias [0, 0, 0.6] the selection values are [0.5, 0.75, 0.85]: top-2 =
// [2, 1], q = [1/4, 3/4] (the bias does not enter the scores) -> [0.25, 0.75] * 2.5.
TEST(MoeRouter, SigmoidScalingAndExpertBiasByHand) {
  const TransformerConfig cfg = moe_config(3, 3, 2, [](TransformerConfig& c) {
    c.moe_router_score_function = "sigmoid";
    c.moe_router_topk_scaling_factor = 2.5;
  });
  MatMap w = identity_router(3, 3);
  const Mat x = rows_of({{0, kLn3, -kLn3}});
  const RouterForward f = moe_router_forward(cfg, Params(w).sub("router"), x, float64_math(), eval_ctx());
  EXPECT_EQ(f.indices(0, 0), 1);
  EXPECT_EQ(f.indices(0, 1), 0);
  EXPECT_NEAR(f.scores(0, 0), 1.5, 1e-15);
  EXPECT_NEAR(f.scores(0, 1), 1.0, 1e-15);

  const TransformerConfig cb = moe_config(3, 3, 2, [](TransformerConfig& c) {
    c.moe_router_score_function = "sigmoid";
    c.moe_router_topk_scaling_factor = 2.5;
    c.moe_router_enable_expert_bias = true;
  });
  w.emplace("router.expert_bias", rows_of({{0, 0, 0.6}}));
  const RouterForward b = moe_router_forward(cb, Params(w).sub("router"), x, float64_math(), eval_ctx());
  EXPECT_EQ(b.indices(0, 0), 2);
  EXPECT_EQ(b.indices(0, 1), 1);
  EXPECT_NEAR(b.scores(0, 0), 0.25 * 2.5, 1e-15);
  EXPECT_NEAR(b.scores(0, 1), 0.75 * 2.5, 1e-15);
  EXPECT_NEAR(b.selection_values(0, 2), 0.85, 1e-15);
}

// ---------------------------------------------------------------------------
// Capacity (newer): T = 4, E = 2, k = 1, factor 1 -> C = ceil(4 * 1 / 2 * 1) = 2.
// pre-softmax with logits (a, 0): P(expert 0) = sigmoid(a); a = logit(p) for
// p = [0.6, 0.9, 0.7, 0.8], so every token picks expert 0 with that score.
// "probs" keeps the two highest (tokens 1 and 3); "position" the first two (0, 1).
TEST(MoeRouter, CapacityDropsByProbsOrPosition) {
  auto logit = [](double q) { return std::log(q / (1 - q)); };
  const Mat x = rows_of({{logit(0.6), 0}, {logit(0.9), 0}, {logit(0.7), 0}, {logit(0.8), 0}});
  MatMap w = identity_router(2, 2);
  for (const std::string policy : {"probs", "position"}) {
    for (bool pad : {false, true}) {
      const TransformerConfig cfg = moe_config(2, 2, 1, [&](TransformerConfig& c) {
        c.moe_router_pre_softmax = true;
        c.moe_expert_capacity_factor = 1.0;
        c.moe_token_drop_policy = policy;
        c.moe_pad_expert_input_to_capacity = pad;
      });
      const RouterForward f = moe_router_forward(cfg, Params(w).sub("router"), x, float64_math(), eval_ctx());
      const std::vector<double> kept =
          policy == "probs" ? std::vector<double>{0, 1, 0, 1} : std::vector<double>{1, 1, 0, 0};
      const double p[] = {0.6, 0.9, 0.7, 0.8};
      for (int t = 0; t < 4; ++t) {
        EXPECT_EQ(f.indices(t, 0), 0);
        EXPECT_EQ(f.kept(t, 0), kept[static_cast<size_t>(t)]) << policy << " " << t;
        EXPECT_NEAR(f.scores(t, 0), kept[static_cast<size_t>(t)] * p[t], 1e-15);
      }
      // Padding fills expert 1 (no routed token) with two weight-0 tokens.
      EXPECT_EQ(f.tokens_per_expert, pad ? (std::vector<int64_t>{2, 2}) : (std::vector<int64_t>{2, 0}));
    }
  }
  // Factor 4: C = 8 > T, nothing is dropped.
  const TransformerConfig big = moe_config(2, 2, 1, [](TransformerConfig& c) {
    c.moe_router_pre_softmax = true;
    c.moe_expert_capacity_factor = 4.0;
  });
  EXPECT_TRUE(moe_router_forward(big, Params(w).sub("router"), x, float64_math(), eval_ctx()).kept.isOnes());
}

// ---------------------------------------------------------------------------
// Finite-difference gradients of x and router.weight, in every mode.

struct GradCase {
  std::string name;
  std::function<void(TransformerConfig&)> edit;
  int64_t experts, k;
  bool training;
  bool router_bias = false;  // newer Megatron's router.bias
};

TEST(MoeRouter, GradientsMatchFiniteDifferencesInEveryMode) {
  const std::vector<GradCase> cases = {
      {"aux_loss k2 + z + jitter",
       [](TransformerConfig& c) {
         c.moe_aux_loss_coeff = 0.3;
         c.moe_z_loss_coeff = 0.05;
         c.moe_input_jitter_eps = 0.05;
       },
       5, 2, true, true},
      {"aux_loss k1", [](TransformerConfig& c) { c.moe_aux_loss_coeff = 0.7; }, 4, 1, false},
      {"aux_loss k3", [](TransformerConfig& c) { c.moe_aux_loss_coeff = 0.2; }, 6, 3, false},
      {"none k2", [](TransformerConfig& c) { c.moe_router_load_balancing_type = "none"; }, 4, 2, false},
      {"pre-softmax k2 + aux",
       [](TransformerConfig& c) {
         c.moe_router_pre_softmax = true;
         c.moe_aux_loss_coeff = 0.4;
         c.moe_router_topk_scaling_factor = 1.7;
       },
       5, 2, false},
      {"sigmoid k2 + aux + bias",
       [](TransformerConfig& c) {
         c.moe_router_score_function = "sigmoid";
         c.moe_aux_loss_coeff = 0.4;
         c.moe_router_enable_expert_bias = true;
         c.moe_router_topk_scaling_factor = 2.0;
       },
       5, 2, false},
      {"sigmoid k1", [](TransformerConfig& c) { c.moe_router_score_function = "sigmoid"; }, 3, 1, false, true},
      {"sinkhorn k1 training", [](TransformerConfig& c) { c.moe_router_load_balancing_type = "sinkhorn"; }, 3, 1,
       true},
      {"sinkhorn k2 training + z",
       [](TransformerConfig& c) {
         c.moe_router_load_balancing_type = "sinkhorn";
         c.moe_z_loss_coeff = 0.1;
       },
       4, 2, true},
      {"sinkhorn k2 eval", [](TransformerConfig& c) { c.moe_router_load_balancing_type = "sinkhorn"; }, 4, 2, false},
      {"capacity probs k2 + aux",
       [](TransformerConfig& c) {
         c.moe_expert_capacity_factor = 0.75;
         c.moe_aux_loss_coeff = 0.2;
       },
       4, 2, false},
      {"capacity position pad k1",
       [](TransformerConfig& c) {
         c.moe_router_pre_softmax = true;
         c.moe_expert_capacity_factor = 1.0;
         c.moe_token_drop_policy = "position";
         c.moe_pad_expert_input_to_capacity = true;
       },
       3, 1, false},
  };
  const int64_t h = 5, T = 8;
  for (const GradCase& gc : cases) {
    SCOPED_TRACE(gc.name);
    const TransformerConfig cfg = moe_config(h, gc.experts, gc.k, gc.edit);
    int64_t checked_seeds = 0;
    for (uint64_t seed = 1; seed <= 40 && checked_seeds < 2; ++seed) {
      MatMap vars{{"x", random_normal(T, h, seed, "x")},
                  {"router.weight", random_normal(gc.experts, h, seed, "w", 0.8)},
                  {"router.expert_bias", random_normal(1, gc.experts, seed, "expert_bias", 0.1)}};
      if (gc.router_bias) vars["router.bias"] = random_normal(1, gc.experts, seed, "bias", 0.5);
      const Mat ds = random_normal(T, gc.k, seed, "d_scores");
      const RunContext ctx = gc.training ? train_ctx(seed) : eval_ctx(seed);
      auto forward = [&](const MatMap& v) {
        return moe_router_forward(cfg, Params(v).sub("router"), v.at("x"), float64_math(), ctx);
      };
      const RouterForward f = forward(vars);
      // Well-separated selections only: FD must not flip a choice (relative to the
      // selection values' scale, which for sinkhorn is ~1/(T E)).
      const double unit = f.selection_values.cwiseAbs().maxCoeff();
      if (f.topk_margin.minCoeff() < 1e-3 * unit || f.order_margin.minCoeff() < 1e-3 * unit) continue;
      if (cfg.moe_expert_capacity_factor) {
        // The drop decision must be stable too: no two undropped scores within 1e-3,
        // and something is dropped.
        TransformerConfig dropless = cfg;
        dropless.moe_expert_capacity_factor.reset();
        const Mat all = moe_router_forward(dropless, Params(vars).sub("router"), vars.at("x"), float64_math(), ctx)
                            .scores;
        bool close = false;
        for (Eigen::Index a = 0; a < all.size(); ++a) {
          for (Eigen::Index b = a + 1; b < all.size(); ++b) close |= std::abs(all.data()[a] - all.data()[b]) < 1e-3;
        }
        if (close || !(f.kept.array() == 0).any()) continue;
      }
      ++checked_seeds;
      MatMap analytic;
      analytic["x"] = moe_router_backward(cfg, Params(vars).sub("router"), vars.at("x"), f, ds,
                                          Sink(analytic).sub("router"), float64_math());
      analytic["router.expert_bias"] = Mat::Zero(1, gc.experts);  // a buffer: no gradient by construction
      const auto loss = [&](const MatMap& v) {
        const RouterForward g = forward(v);
        return dot(g.scores, ds) + g.aux_loss.value_or(0.0) + g.z_loss.value_or(0.0);
      };
      const GradcheckResult r = gradcheck(loss, vars, analytic);
      EXPECT_TRUE(r.ok()) << "seed " << seed << ": " << r.describe();
      // The gradient is not trivially zero (k = 1 aux_loss gets it from the aux loss only).
      EXPECT_GT(analytic.at("router.weight").cwiseAbs().maxCoeff(), 1e-6);
    }
    EXPECT_EQ(checked_seeds, 2) << "no well-separated draws found";
  }
}

// ---------------------------------------------------------------------------
// Invariants.

RC_GTEST_PROP(MoeRouterProperty, TopkRoutingInvariants, ()) {
  const int64_t T = *rc::gen::inRange<int64_t>(1, 13);
  const int64_t E = *rc::gen::inRange<int64_t>(1, 9);
  const int64_t k = *rc::gen::inRange<int64_t>(1, E + 1);
  const int64_t h = *rc::gen::inRange<int64_t>(1, 7);
  const std::string type = *rc::gen::element<std::string>("aux_loss", "none", "sinkhorn");
  const bool training = *rc::gen::arbitrary<bool>();
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const TransformerConfig cfg = moe_config(h, E, k, [&](TransformerConfig& c) {
    c.moe_router_load_balancing_type = type;
    c.moe_aux_loss_coeff = type == "aux_loss" ? 0.5 : 0.0;
  });
  MatMap w{{"router.weight", random_normal(E, h, seed, "w")}};
  // Moderate logits for sinkhorn: with a dominant expert and few tokens Megatron's fp32
  // sinkhorn takes ~1e6 iterations to reach its tolerance (see SinkhornThatConvergesTooSlowlyThrows).
  const Mat x = random_normal(T, h, seed, "x", type == "sinkhorn" ? 0.3 : 2.0);
  const RunContext ctx = training ? train_ctx(seed) : eval_ctx(seed);
  RouterForward f;
  try {
    f = moe_router_forward(cfg, Params(w).sub("router"), x, float64_math(), ctx);
  } catch (const Error& e) {
    RC_ASSERT(std::string(e.what()).find("sinkhorn: no convergence") != std::string::npos);
    RC_DISCARD("sinkhorn does not converge on this draw");
  }
  int64_t total = 0;
  for (int64_t n : f.tokens_per_expert) total += n;
  RC_ASSERT(total == T * k);
  for (int64_t t = 0; t < T; ++t) {
    std::set<int64_t> chosen;
    for (int64_t j = 0; j < k; ++j) chosen.insert(f.indices(t, j));
    RC_ASSERT(static_cast<int64_t>(chosen.size()) == k);
    // Top-k order and nothing outside the top-k above the k-th selected value.
    double kth = f.selection_values(t, f.indices(t, k - 1));
    for (int64_t j = 0; j + 1 < k; ++j) {
      RC_ASSERT(f.selection_values(t, f.indices(t, j)) >= f.selection_values(t, f.indices(t, j + 1)));
    }
    for (int64_t e = 0; e < E; ++e) {
      if (!chosen.count(e)) RC_ASSERT(f.selection_values(t, e) <= kth);
    }
    RC_ASSERT(f.topk_margin(t, 0) >= 0.0);
    const double sum = f.scores.row(t).sum();
    if (type != "sinkhorn") {
      RC_ASSERT(std::abs(sum - 1.0) <= 1e-12);  // softmax over the k
    } else if (k > 1) {
      RC_ASSERT(sum <= 1.0 + 1e-12);  // a part of the full softmax
    }
  }
  if (type == "aux_loss") {
    RC_ASSERT(f.aux_loss.has_value());
    RC_ASSERT(*f.aux_loss >= 0.0);
    // aux >= coeff * (sum_e Pbar_e c_e)/(...) is bounded by E * coeff (all mass on one expert).
    RC_ASSERT(*f.aux_loss <= static_cast<double>(E) * 0.5 + 1e-12);
  }
}

RC_GTEST_PROP(MoeRouterProperty, CapacityIsNeverExceededAndKeepsTheBest, ()) {
  const int64_t T = *rc::gen::inRange<int64_t>(1, 16);
  const int64_t E = *rc::gen::inRange<int64_t>(1, 6);
  const int64_t k = *rc::gen::inRange<int64_t>(1, E + 1);
  const double factor = *rc::gen::element(0.25, 0.5, 1.0, 1.5, 2.0);
  const std::string policy = *rc::gen::element<std::string>("probs", "position");
  const bool pad = *rc::gen::arbitrary<bool>();
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const int64_t h = 3;
  auto edit = [&](TransformerConfig& c) {
    c.moe_router_pre_softmax = true;  // distinct probabilities per token
  };
  const TransformerConfig dropless = moe_config(h, E, k, edit);
  const TransformerConfig cfg = moe_config(h, E, k, [&](TransformerConfig& c) {
    edit(c);
    c.moe_expert_capacity_factor = factor;
    c.moe_token_drop_policy = policy;
    c.moe_pad_expert_input_to_capacity = pad;
  });
  MatMap w{{"router.weight", random_normal(E, h, seed, "w")}};
  const Mat x = random_normal(T, h, seed, "x", 2.0);
  const RouterForward f = moe_router_forward(cfg, Params(w).sub("router"), x, float64_math(), eval_ctx());
  const RouterForward d = moe_router_forward(dropless, Params(w).sub("router"), x, float64_math(), eval_ctx());
  const double cap = std::ceil(static_cast<double>(T * k) / static_cast<double>(E) * factor);
  const auto capacity = static_cast<int64_t>(std::min(cap, static_cast<double>(T)));
  RC_ASSERT(f.indices == d.indices);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = f.tokens_per_expert[static_cast<size_t>(e)];
    if (pad) {
      RC_ASSERT(n == capacity);
    } else {
      RC_ASSERT(n <= capacity);
    }
    // Kept pairs of expert e, and (policy probs) every kept score >= every dropped score.
    double min_kept = 2, max_dropped = -1;
    int64_t kept = 0, routed = 0;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        if (f.indices(t, j) != e) continue;
        ++routed;
        if (f.kept(t, j) != 0) {
          ++kept;
          RC_ASSERT(f.scores(t, j) == d.scores(t, j));
          min_kept = std::min(min_kept, d.scores(t, j));
        } else {
          RC_ASSERT(f.scores(t, j) == 0.0);
          max_dropped = std::max(max_dropped, d.scores(t, j));
        }
      }
    }
    RC_ASSERT(kept == std::min(routed, capacity));
    if (policy == "probs") RC_ASSERT(min_kept >= max_dropped);
  }
}

// ---------------------------------------------------------------------------
// Precision emulation.

TEST(MoeRouter, EmulatedPrecisionTracksTheTruth) {
  const int64_t T = 16, E = 6, k = 2, h = 24;
  const TransformerConfig cfg = moe_config(h, E, k, [](TransformerConfig& c) {
    c.moe_aux_loss_coeff = 0.1;
    c.moe_z_loss_coeff = 0.01;
  });
  // Inputs representable in bf16 (and so in every emulated dtype).
  MatMap w{{"router.weight", rounded(random_normal(E, h, 5, "w", 0.3), DType::BF16)}};
  const Mat x = rounded(random_normal(T, h, 5, "x"), DType::BF16);
  const Params rw = Params(w).sub("router");
  const RouterForward truth = moe_router_forward(cfg, rw, x, float64_math(), eval_ctx());
  const Mat ds = rounded(random_normal(T, k, 5, "ds"), DType::BF16);
  const Mat dx_truth = moe_router_backward(cfg, rw, x, truth, ds, Sink(), float64_math());
  bool differs = false;
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const double u = dt == DType::F32 ? std::ldexp(1.0, -24) : std::ldexp(1.0, -8);  // unit roundoff
    const Precision p = emulated_precision(dt, cfg);
    const RouterForward f = moe_router_forward(cfg, rw, x, p, eval_ctx());
    for (int64_t t = 0; t < T; ++t) {
      // Logits: fp32-accumulated, rounded once: within one unit roundoff.
      for (int64_t e = 0; e < E; ++e) {
        EXPECT_LE(std::abs(f.logits(t, e) - truth.logits(t, e)), 2 * u * std::abs(truth.logits(t, e)) + 1e-30);
      }
      if (truth.topk_margin(t, 0) < 0.05 || truth.order_margin(t, 0) < 0.05) continue;
      for (int64_t j = 0; j < k; ++j) {
        ASSERT_EQ(f.indices(t, j), truth.indices(t, j));
        // score = sigmoid of the logit gap: error <= 1/4 * gap error + one rounding of the score.
        const double gap_err = 2 * u * (std::abs(truth.logits(t, truth.indices(t, 0))) +
                                        std::abs(truth.logits(t, truth.indices(t, 1))));
        EXPECT_LE(std::abs(f.scores(t, j) - truth.scores(t, j)), 2 * (0.25 * gap_err + u * truth.scores(t, j)));
        differs |= f.scores(t, j) != truth.scores(t, j);
      }
    }
    EXPECT_NEAR(*f.aux_loss, *truth.aux_loss, 20 * u * *truth.aux_loss);
    EXPECT_NEAR(*f.z_loss, *truth.z_loss, 20 * u * *truth.z_loss);
    const Mat dx = moe_router_backward(cfg, rw, x, f, ds, Sink(), p);
    EXPECT_LE((dx - dx_truth).cwiseAbs().maxCoeff(), 200 * u * dx_truth.cwiseAbs().maxCoeff());
    // Every emulated output is a value of its dtype (scores: the logits dtype).
    for (Eigen::Index i = 0; i < f.scores.size(); ++i) EXPECT_EQ(f.scores.data()[i], round_to(f.scores.data()[i], dt));
    for (Eigen::Index i = 0; i < dx.size(); ++i) EXPECT_EQ(dx.data()[i], round_to(dx.data()[i], dt));
  }
  EXPECT_TRUE(differs);
}

// moe_router_dtype fp32 (newer): bf16 inputs, fp32 logits and scores.
TEST(MoeRouter, RouterDtypeKeepsLogitsInFp32) {
  const TransformerConfig cfg = moe_config(24, 4, 2, [](TransformerConfig& c) { c.moe_router_dtype = "fp32"; });
  MatMap w{{"router.weight", rounded(random_normal(4, 24, 6, "w", 0.3), DType::BF16)}};
  const Mat x = rounded(random_normal(8, 24, 6, "x"), DType::BF16);
  const RouterForward f = moe_router_forward(cfg, Params(w).sub("router"), x, emulated_precision(DType::BF16, cfg),
                                             eval_ctx());
  bool not_bf16 = false;
  for (Eigen::Index i = 0; i < f.logits.size(); ++i) {
    EXPECT_EQ(f.logits.data()[i], round_to(f.logits.data()[i], DType::F32));
    not_bf16 |= f.logits.data()[i] != round_to(f.logits.data()[i], DType::BF16);
  }
  EXPECT_TRUE(not_bf16);
}

// ---------------------------------------------------------------------------
// Errors.

TEST(MoeRouter, ClearErrorsOnBadInput) {
  const TransformerConfig cfg = moe_config(4, 3, 2);
  MatMap w{{"mlp.router.weight", Mat::Zero(3, 4)}};
  const Params rw = Params(w).sub("mlp").sub("router");
  const Mat x = Mat::Zero(5, 4);
  MatMap none;
  EXPECT_NE(error_of([&] { moe_router_forward(cfg, Params(none).sub("mlp.router"), x, float64_math(), eval_ctx()); })
                .find("mlp.router.weight"),
            std::string::npos);
  MatMap bad{{"mlp.router.weight", Mat::Zero(4, 3)}};
  EXPECT_NE(error_of([&] { moe_router_forward(cfg, Params(bad).sub("mlp.router"), x, float64_math(), eval_ctx()); })
                .find("mlp.router.weight"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moe_router_forward(cfg, rw, Mat::Zero(5, 3), float64_math(), eval_ctx()); })
                .find("hidden_size"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moe_router_forward(cfg, rw, Mat::Zero(0, 4), float64_math(), eval_ctx()); })
                .find("no tokens"),
            std::string::npos);
  TransformerConfig dense = cfg;
  dense.num_moe_experts.reset();
  EXPECT_NE(error_of([&] { moe_router_forward(dense, rw, x, float64_math(), eval_ctx()); }).find("num_moe_experts"),
            std::string::npos);
  TransformerConfig too_many = cfg;
  too_many.moe_router_topk = 4;
  EXPECT_NE(error_of([&] { moe_router_forward(too_many, rw, x, float64_math(), eval_ctx()); })
                .find("moe_router_topk"),
            std::string::npos);
  TransformerConfig unknown = cfg;
  unknown.moe_router_load_balancing_type = "switch";
  EXPECT_NE(error_of([&] { moe_router_forward(unknown, rw, x, float64_math(), eval_ctx()); }).find("switch"),
            std::string::npos);
  const RouterForward f = moe_router_forward(cfg, rw, x, float64_math(), eval_ctx());
  EXPECT_NE(error_of([&] { moe_router_backward(cfg, rw, x, f, Mat::Zero(5, 3), Sink(), float64_math()); })
                .find("d_scores"),
            std::string::npos);
  EXPECT_THROW(sinkhorn_fp32(Mat(0, 2)), Error);
}

}  // namespace
}  // namespace paritron::ref
