// Tests of reference/moe_layer: a hand-computed top-2 layer, the dispatch,
// one expert + top-1 == the dense MLP, GroupedMLP == SequentialMLP with the
// weight view, capacity dropping, finite-difference gradients of x and every
// weight (router, expert fc1/fc2 weights and biases, grouped weights),
// precision emulation, errors.
#include "reference/moe_layer.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <functional>
#include <string>

#include "common/error.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

const double kLn3 = std::log(3.0);

struct LayerSpec {
  int64_t h = 4, experts = 3, k = 2, ffn = 5;
  bool bias = true, gated = false, grouped = false;
  std::string activation = "gelu";
  std::function<void(TransformerConfig&)> edit;
};

TransformerConfig layer_config(const LayerSpec& s) {
  TransformerConfig cfg;
  cfg.num_layers = 1;
  cfg.hidden_size = s.h;
  cfg.num_attention_heads = 1;
  cfg.kv_channels = 2;  // any even width: RoPE's rotary_dim must be even even if unused
  cfg.ffn_hidden_size = s.ffn;
  cfg.num_moe_experts = s.experts;
  cfg.moe_router_topk = s.k;
  cfg.add_bias_linear = s.bias;
  cfg.gated_linear_unit = s.gated;
  cfg.activation_func = s.activation;
  cfg.moe_grouped_gemm = s.grouped;
  if (s.edit) s.edit(cfg);
  validate_config(cfg);
  return cfg;
}

// SequentialMLP weights under "mlp.": router, and per expert fc1/fc2 (+ biases).
MatMap sequential_weights(const LayerSpec& s, uint64_t seed, double router_std = 1.0) {
  const int64_t F = s.gated ? 2 * s.ffn : s.ffn;
  MatMap m{{"mlp.router.weight", random_normal(s.experts, s.h, seed, "router", router_std)}};
  for (int64_t e = 0; e < s.experts; ++e) {
    const std::string p = "mlp.experts.local_experts." + std::to_string(e) + ".";
    m[p + "linear_fc1.weight"] = random_normal(F, s.h, seed, p + "fc1", 0.5);
    m[p + "linear_fc2.weight"] = random_normal(s.h, s.ffn, seed, p + "fc2", 0.5);
    if (s.bias) {
      m[p + "linear_fc1.bias"] = random_normal(1, F, seed, p + "b1", 0.3);
      m[p + "linear_fc2.bias"] = random_normal(1, s.h, seed, p + "b2", 0.3);
    }
  }
  return m;
}

// The GroupedMLP weights holding the same experts: w1[e] = fc1_e^T stored as
// weight1.view(E, h, F)[e], w2[e] = fc2_e^T as weight2.view(E, f, h)[e].
MatMap grouped_from_sequential(const LayerSpec& s, const MatMap& seq) {
  const int64_t F = s.gated ? 2 * s.ffn : s.ffn;
  Mat w1(s.h, s.experts * F), w2(s.experts * s.ffn, s.h);
  for (int64_t e = 0; e < s.experts; ++e) {
    const std::string p = "mlp.experts.local_experts." + std::to_string(e) + ".";
    const Mat& fc1 = seq.at(p + "linear_fc1.weight");
    const Mat& fc2 = seq.at(p + "linear_fc2.weight");
    for (int64_t r = 0; r < s.h; ++r) {
      for (int64_t c = 0; c < F; ++c) w1.data()[e * s.h * F + r * F + c] = fc1(c, r);
    }
    for (int64_t r = 0; r < s.ffn; ++r) {
      for (int64_t c = 0; c < s.h; ++c) w2(e * s.ffn + r, c) = fc2(c, r);
    }
  }
  return MatMap{{"mlp.router.weight", seq.at("mlp.router.weight")},
                {"mlp.experts.weight1", w1},
                {"mlp.experts.weight2", w2}};
}

RunContext ctx_of(bool training = false, uint64_t seed = 0) {
  RunContext c;
  c.training = training;
  c.seed = seed;
  c.path = "layers.0";
  return c.sub("mlp");
}

// ---------------------------------------------------------------------------
// Hand-computed layer. h = 2, E = 2, k = 2, f = 1, relu, biases; router W = I,
// so logits = x.
//   expert 0: fc1 [[1, 0]], b1 [0], fc2 [[1], [2]], b2 [0.5, -0.5]: y0(x) = relu(x0) * [1, 2]
//   expert 1: fc1 [[0, 1]], b1 [1], fc2 [[3], [0]], b2 [1, 1]:      y1(x) = relu(x1 + 1) * [3, 0]
// Token 0, x = (ln 3, 0): top-2 = [0, 1], scores softmax(ln 3, 0) = [3/4, 1/4];
//   y0 = [ln 3, 2 ln 3], y1 = [3, 0]: output = [3/4 ln 3 + 3/4, 3/2 ln 3],
//   output_bias = 3/4 [0.5, -0.5] + 1/4 [1, 1] = [0.625, -0.125].
// Token 1, x = (-1, 1): top-2 = [1, 0], scores [s, 1 - s] with s = sigmoid(2);
//   y1 = [6, 0], y0 = [0, 0]: output = [6 s, 0], output_bias = s [1, 1] + (1 - s) [0.5, -0.5].
TEST(MoeLayer, HandComputedTopTwo) {
  LayerSpec s;
  s.h = 2, s.experts = 2, s.k = 2, s.ffn = 1, s.activation = "relu";
  const TransformerConfig cfg = layer_config(s);
  MatMap w{{"mlp.router.weight", Mat::Identity(2, 2)},
           {"mlp.experts.local_experts.0.linear_fc1.weight", rows_of({{1, 0}})},
           {"mlp.experts.local_experts.0.linear_fc1.bias", rows_of({{0}})},
           {"mlp.experts.local_experts.0.linear_fc2.weight", rows_of({{1}, {2}})},
           {"mlp.experts.local_experts.0.linear_fc2.bias", rows_of({{0.5, -0.5}})},
           {"mlp.experts.local_experts.1.linear_fc1.weight", rows_of({{0, 1}})},
           {"mlp.experts.local_experts.1.linear_fc1.bias", rows_of({{1}})},
           {"mlp.experts.local_experts.1.linear_fc2.weight", rows_of({{3}, {0}})},
           {"mlp.experts.local_experts.1.linear_fc2.bias", rows_of({{1, 1}})}};
  const Mat x = rows_of({{kLn3, 0}, {-1, 1}});
  MatMap taps;
  const MoeLayerForward f =
      moe_layer_forward(cfg, Params(w).sub("mlp"), x, float64_math(), ctx_of(), Sink(taps).sub("mlp"));
  const double sg = 1 / (1 + std::exp(-2.0));
  EXPECT_NEAR(f.output(0, 0), 0.75 * kLn3 + 0.75, 1e-15);
  EXPECT_NEAR(f.output(0, 1), 1.5 * kLn3, 1e-15);
  EXPECT_NEAR(f.output(1, 0), 6 * sg, 1e-15);
  EXPECT_EQ(f.output(1, 1), 0.0);
  ASSERT_TRUE(f.output_bias.has_value());
  EXPECT_NEAR((*f.output_bias)(0, 0), 0.625, 1e-15);
  EXPECT_NEAR((*f.output_bias)(0, 1), -0.125, 1e-15);
  EXPECT_NEAR((*f.output_bias)(1, 0), sg + 0.5 * (1 - sg), 1e-15);
  EXPECT_NEAR((*f.output_bias)(1, 1), sg - 0.5 * (1 - sg), 1e-15);
  // Dispatch: each expert sees both tokens, in token order.
  EXPECT_EQ(f.experts[0].tokens, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(f.experts[0].slots, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(f.experts[1].slots, (std::vector<int64_t>{1, 0}));
  // Taps: the router outputs and the expert-major dispatched rows.
  EXPECT_EQ(taps.at("mlp.router.tokens_per_expert"), rows_of({{2, 2}}));
  EXPECT_EQ(taps.at("mlp.router.indices"), rows_of({{0, 1}, {1, 0}}));
  EXPECT_EQ(taps.at("mlp.experts.input").rows(), 4);
  EXPECT_NEAR(taps.at("mlp.experts.output")(3, 0), 6.0, 1e-15);  // expert 1, token 1

  // Backward with d_output = 1 and d_output_bias = 0 at token 1 only: d score of
  // (token 1, slot 0 = expert 1) = sum(y1) = 6, of slot 1 = sum(y0) = 0, so through
  // the 2-way softmax d logit_1 = s (1 - s)(6 - 0) and d logit_0 = -that; x = logits,
  // so dx(1) gets those plus the experts' input gradient: expert 1 (relu'(2) = 1,
  // d y1 = s [1, 1] -> d a = s * 3, d x1 += 3 s), expert 0 (relu'(-1) = 0).
  const Mat dout = rows_of({{0, 0}, {1, 1}});
  MatMap g;
  const Mat dx = moe_layer_backward(cfg, Params(w).sub("mlp"), x, f, dout, Mat(Mat::Zero(2, 2)), Sink(g).sub("mlp"),
                                    float64_math());
  const double dl = sg * (1 - sg) * 6;
  EXPECT_NEAR(dx(1, 0), -dl, 1e-14);
  EXPECT_NEAR(dx(1, 1), dl + 3 * sg, 1e-14);
  EXPECT_EQ(dx(0, 0), 0.0);
  // fc2 of expert 1 gets d y1^T relu(a) = s [1, 1]^T * 2 at token 1.
  EXPECT_NEAR(g.at("mlp.experts.local_experts.1.linear_fc2.weight")(0, 0), 2 * sg, 1e-15);
  // The fc2 biases feed output_bias only: zero gradients here (d_output_bias = 0).
  EXPECT_EQ(g.at("mlp.experts.local_experts.0.linear_fc2.bias").cwiseAbs().maxCoeff(), 0.0);
}

// ---------------------------------------------------------------------------
// Invariants.

// One expert with top-1 (aux_loss, score exactly 1) is the dense MLP: the same
// output, output_bias = b2 on every token, the same input and weight gradients,
// and no router gradient.
RC_GTEST_PROP(MoeLayerProperty, OneExpertTopOneIsTheDenseMlp, ()) {
  LayerSpec s;
  s.h = *rc::gen::inRange<int64_t>(1, 7);
  s.ffn = *rc::gen::inRange<int64_t>(1, 7);
  s.experts = 1, s.k = 1;
  s.bias = *rc::gen::arbitrary<bool>();
  s.gated = *rc::gen::arbitrary<bool>();
  s.activation = *rc::gen::element<std::string>("gelu", "silu", "relu", "squared_relu");
  const int64_t T = *rc::gen::inRange<int64_t>(1, 9);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const TransformerConfig cfg = layer_config(s);
  MatMap w = sequential_weights(s, seed);
  const Mat x = random_normal(T, s.h, seed, "x");
  const Mat dout = random_normal(T, s.h, seed, "dout");
  const Mat dob = random_normal(T, s.h, seed, "dob");
  const MoeLayerForward f = moe_layer_forward(cfg, Params(w).sub("mlp"), x, float64_math(), ctx_of());
  const Params ew = Params(w).sub("mlp.experts.local_experts.0");
  const MlpForward m = mlp_forward(cfg, ew, x, float64_math());
  RC_ASSERT(f.output == m.output);
  RC_ASSERT(f.output_bias.has_value() == s.bias);
  MatMap gm, gl;
  std::optional<RowVec> dbias;
  if (s.bias) {
    for (int64_t t = 0; t < T; ++t) RC_ASSERT(Mat(f.output_bias->row(t)) == Mat(*m.output_bias));
    dbias = RowVec(dob.colwise().sum());
  }
  const Mat dx_mlp = mlp_backward(cfg, ew, x, m, dout, dbias, Sink(gm).sub("mlp.experts.local_experts.0"),
                                  float64_math());
  const Mat dx = moe_layer_backward(cfg, Params(w).sub("mlp"), x, f, dout,
                                    s.bias ? std::optional<Mat>(dob) : std::nullopt, Sink(gl).sub("mlp"),
                                    float64_math());
  RC_ASSERT((dx - dx_mlp).cwiseAbs().maxCoeff() <= 1e-14 * (1 + dx_mlp.cwiseAbs().maxCoeff()));
  for (const auto& [key, grad] : gm) {
    const Mat& other = gl.at(key);
    RC_ASSERT((other - grad).cwiseAbs().maxCoeff() <= 1e-13 * (1 + grad.cwiseAbs().maxCoeff()));
  }
  RC_ASSERT(gl.at("mlp.router.weight").cwiseAbs().maxCoeff() == 0.0);
}

// GroupedMLP with weight1 / weight2 holding the transposed expert weights in the
// view layout computes exactly what SequentialMLP computes, and its gradients are
// the sequential ones relaid out the same way.
RC_GTEST_PROP(MoeLayerProperty, GroupedMlpEqualsSequentialMlp, ()) {
  LayerSpec s;
  s.h = *rc::gen::inRange<int64_t>(1, 6);
  s.ffn = *rc::gen::inRange<int64_t>(1, 6);
  s.experts = *rc::gen::inRange<int64_t>(1, 5);
  s.k = *rc::gen::inRange<int64_t>(1, s.experts + 1);
  s.bias = false;
  s.gated = *rc::gen::arbitrary<bool>();
  s.activation = *rc::gen::element<std::string>("gelu", "silu", "relu");
  const int64_t T = *rc::gen::inRange<int64_t>(1, 10);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const TransformerConfig seq_cfg = layer_config(s);
  LayerSpec gs = s;
  gs.grouped = true;
  const TransformerConfig grp_cfg = layer_config(gs);
  const MatMap sw = sequential_weights(s, seed);
  const MatMap gw = grouped_from_sequential(s, sw);
  const Mat x = random_normal(T, s.h, seed, "x");
  const Mat dout = random_normal(T, s.h, seed, "dout");
  const MoeLayerForward fs = moe_layer_forward(seq_cfg, Params(sw).sub("mlp"), x, float64_math(), ctx_of());
  const MoeLayerForward fg = moe_layer_forward(grp_cfg, Params(gw).sub("mlp"), x, float64_math(), ctx_of());
  RC_ASSERT(fs.output == fg.output);
  RC_ASSERT(!fg.output_bias.has_value());
  MatMap gseq, ggrp;
  const Mat dxs = moe_layer_backward(seq_cfg, Params(sw).sub("mlp"), x, fs, dout, std::nullopt, Sink(gseq).sub("mlp"),
                                     float64_math());
  const Mat dxg = moe_layer_backward(grp_cfg, Params(gw).sub("mlp"), x, fg, dout, std::nullopt, Sink(ggrp).sub("mlp"),
                                     float64_math());
  RC_ASSERT(dxs == dxg);
  RC_ASSERT(gseq.at("mlp.router.weight") == ggrp.at("mlp.router.weight"));
  // Relayout the sequential gradients as weights and compare.
  MatMap gseq_as_weights;
  for (const auto& [key, grad] : gseq) gseq_as_weights[key] = grad;
  const MatMap expected = grouped_from_sequential(s, gseq_as_weights);
  RC_ASSERT(expected.at("mlp.experts.weight1") == ggrp.at("mlp.experts.weight1"));
  RC_ASSERT(expected.at("mlp.experts.weight2") == ggrp.at("mlp.experts.weight2"));
}

// The view is a memory reinterpretation, not column blocks (spec §14 #33):
// h = 2, E = 2, F = 1: weight1 [2, 2] = [[a, b], [c, d]] has memory a b c d, viewed
// [E, h, F] as w1[0] = [a; b], w1[1] = [c; d]. So expert 0's fc1 is row 0 of weight1
// ((x0, x1) -> a x0 + b x1), NOT column 0 (a x0 + c x1).
// relu, f = 1, weight2 = [[1, 0], [0, 1]] viewed [E, f, h]: w2[0] = [1, 0], w2[1] = [0, 1].
// Router weight [[1, 0], [0, 0]] with k = 1 sends x = (1, 0.5) (logits [1, 0]) to expert 0 with
// score 1: output = relu(a + 0.5 b) [1, 0].
TEST(MoeLayer, GroupedWeightViewIsAMemoryReinterpretation) {
  LayerSpec s;
  s.h = 2, s.experts = 2, s.k = 1, s.ffn = 1, s.bias = false, s.grouped = true, s.activation = "relu";
  const TransformerConfig cfg = layer_config(s);
  MatMap w{{"mlp.router.weight", rows_of({{1, 0}, {0, 0}})},
           {"mlp.experts.weight1", rows_of({{2, 4}, {8, 16}})},
           {"mlp.experts.weight2", rows_of({{1, 0}, {0, 1}})}};
  const MoeLayerForward f =
      moe_layer_forward(cfg, Params(w).sub("mlp"), rows_of({{1, 0.5}}), float64_math(), ctx_of());
  EXPECT_EQ(f.router.indices(0, 0), 0);
  EXPECT_EQ(f.output(0, 0), 2 + 0.5 * 4);  // row 0 of weight1; column 0 would give 2 + 0.5 * 8
  EXPECT_EQ(f.output(0, 1), 0.0);
}

// Capacity: the tokens an expert drops contribute 0 to output and output_bias;
// the kept ones give exactly the dropless rows (k = 1 here, so a dropped token's
// output is 0). Same routing as moe_router_test's capacity case: all four tokens
// choose expert 0 with scores [0.6, 0.9, 0.7, 0.8], capacity 2, "probs" keeps 1 and 3.
TEST(MoeLayer, DroppedTokensContributeZero) {
  auto logit = [](double q) { return std::log(q / (1 - q)); };
  LayerSpec s;
  s.h = 2, s.experts = 2, s.k = 1, s.ffn = 3;
  const auto with = [](bool capacity) {
    return [capacity](TransformerConfig& c) {
      c.moe_router_pre_softmax = true;
      if (capacity) c.moe_expert_capacity_factor = 1.0;
    };
  };
  s.edit = with(true);
  const TransformerConfig cap = layer_config(s);
  s.edit = with(false);
  const TransformerConfig free = layer_config(s);
  MatMap w = sequential_weights(s, 3);
  w["mlp.router.weight"] = Mat::Identity(2, 2);
  const Mat x = rows_of({{logit(0.6), 0}, {logit(0.9), 0}, {logit(0.7), 0}, {logit(0.8), 0}});
  const MoeLayerForward fc = moe_layer_forward(cap, Params(w).sub("mlp"), x, float64_math(), ctx_of());
  const MoeLayerForward ff = moe_layer_forward(free, Params(w).sub("mlp"), x, float64_math(), ctx_of());
  for (int t : {0, 2}) {
    EXPECT_EQ(fc.output.row(t).cwiseAbs().maxCoeff(), 0.0) << t;
    EXPECT_EQ(fc.output_bias->row(t).cwiseAbs().maxCoeff(), 0.0) << t;
  }
  for (int t : {1, 3}) {
    EXPECT_EQ(fc.output.row(t), ff.output.row(t)) << t;
    EXPECT_EQ(fc.output_bias->row(t), ff.output_bias->row(t)) << t;
    EXPECT_GT(ff.output.row(t).cwiseAbs().maxCoeff(), 0.0);
  }
  EXPECT_EQ(fc.experts[0].tokens, (std::vector<int64_t>{1, 3}));
}

// With capacity, k = 2 and padding on random draws: every expert processes at
// most C rows (exactly C with padding), and output = sum over the kept slots of
// score * expert(x) computed from the dropless layer's per-expert MLPs.
RC_GTEST_PROP(MoeLayerProperty, CapacityCombineUsesOnlyKeptPairs, ()) {
  LayerSpec s;
  s.h = 3, s.ffn = 4, s.bias = true;
  s.experts = *rc::gen::inRange<int64_t>(2, 5);
  s.k = *rc::gen::inRange<int64_t>(1, 3);
  const double factor = *rc::gen::element(0.5, 0.75, 1.0);
  const bool pad = *rc::gen::arbitrary<bool>();
  const std::string policy = *rc::gen::element<std::string>("probs", "position");
  const int64_t T = *rc::gen::inRange<int64_t>(2, 12);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  s.edit = [&](TransformerConfig& c) {
    c.moe_expert_capacity_factor = factor;
    c.moe_pad_expert_input_to_capacity = pad;
    c.moe_token_drop_policy = policy;
  };
  const TransformerConfig cfg = layer_config(s);
  const MatMap w = sequential_weights(s, seed);
  const Mat x = random_normal(T, s.h, seed, "x");
  const MoeLayerForward f = moe_layer_forward(cfg, Params(w).sub("mlp"), x, float64_math(), ctx_of());
  const double cap = std::ceil(static_cast<double>(T * s.k) / static_cast<double>(s.experts) * factor);
  const auto capacity = static_cast<int64_t>(std::min(cap, static_cast<double>(T)));
  Mat expected = Mat::Zero(T, s.h), expected_bias = Mat::Zero(T, s.h);
  for (int64_t e = 0; e < s.experts; ++e) {
    const auto n = static_cast<int64_t>(f.experts[static_cast<size_t>(e)].tokens.size());
    RC_ASSERT((pad ? n == capacity : n <= capacity));
    RC_ASSERT(n == f.router.tokens_per_expert[static_cast<size_t>(e)]);
    const Params ew = Params(w).sub("mlp.experts.local_experts." + std::to_string(e));
    const MlpForward m = mlp_forward(cfg, ew, x, float64_math());
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < s.k; ++j) {
        if (f.router.indices(t, j) != e || f.router.kept(t, j) == 0) continue;
        expected.row(t) += f.router.scores(t, j) * m.output.row(t);
        expected_bias.row(t) += f.router.scores(t, j) * *m.output_bias;
      }
    }
  }
  RC_ASSERT((f.output - expected).cwiseAbs().maxCoeff() <= 1e-14);
  RC_ASSERT((*f.output_bias - expected_bias).cwiseAbs().maxCoeff() <= 1e-14);
}

// Dispatch: every expert's rows are its tokens in ascending order, and all
// rows together are the T*k (token, slot) pairs, each once.
RC_GTEST_PROP(MoeLayerProperty, DispatchCoversEveryPairOnceInTokenOrder, ()) {
  LayerSpec s;
  s.experts = *rc::gen::inRange<int64_t>(1, 7);
  s.k = *rc::gen::inRange<int64_t>(1, s.experts + 1);
  s.h = 3;
  const int64_t T = *rc::gen::inRange<int64_t>(1, 15);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const TransformerConfig cfg = layer_config(s);
  const MatMap w = sequential_weights(s, seed);
  const Mat x = random_normal(T, s.h, seed, "x");
  const RouterForward r = moe_router_forward(cfg, Params(w).sub("mlp.router"), x, float64_math(), ctx_of());
  const std::vector<ExpertForward> d = moe_dispatch(r, x);
  Mat seen = Mat::Zero(T, s.k);
  for (size_t e = 0; e < d.size(); ++e) {
    for (size_t i = 0; i < d[e].tokens.size(); ++i) {
      if (i > 0) RC_ASSERT(d[e].tokens[i - 1] < d[e].tokens[i]);
      const int64_t t = d[e].tokens[i], j = d[e].slots[i];
      RC_ASSERT(j >= 0);
      RC_ASSERT(r.indices(t, j) == static_cast<int64_t>(e));
      RC_ASSERT(d[e].input.row(static_cast<Eigen::Index>(i)) == x.row(t));
      seen(t, j) += 1;
    }
  }
  RC_ASSERT(seen.isOnes());
}

// ---------------------------------------------------------------------------
// Finite-difference gradients of x and every weight.

struct GradCase {
  std::string name;
  LayerSpec spec;
  bool training = false;
  bool with_output_bias_grad = true;
};

TEST(MoeLayer, GradientsMatchFiniteDifferences) {
  std::vector<GradCase> cases;
  {
    GradCase c{"top-2 gelu, biases, aux + z + jitter", {}, true, true};
    c.spec.edit = [](TransformerConfig& cfg) {
      cfg.moe_aux_loss_coeff = 0.2;
      cfg.moe_z_loss_coeff = 0.05;
      cfg.moe_input_jitter_eps = 0.02;
    };
    cases.push_back(c);
  }
  {
    GradCase c{"top-2 swiglu, no bias", {}};
    c.spec.bias = false, c.spec.gated = true, c.spec.activation = "silu";
    cases.push_back(c);
  }
  {
    GradCase c{"grouped top-2 swiglu", {}};
    c.spec.bias = false, c.spec.gated = true, c.spec.activation = "silu", c.spec.grouped = true;
    cases.push_back(c);
  }
  {
    GradCase c{"top-1 aux_loss, biases without output_bias gradient", {}, false, false};
    c.spec.k = 1;
    c.spec.edit = [](TransformerConfig& cfg) { cfg.moe_aux_loss_coeff = 0.5; };
    cases.push_back(c);
  }
  {
    GradCase c{"sinkhorn top-2 training", {}, true, true};
    c.spec.experts = 4;
    c.spec.edit = [](TransformerConfig& cfg) { cfg.moe_router_load_balancing_type = "sinkhorn"; };
    cases.push_back(c);
  }
  {
    GradCase c{"capacity probs top-2, pre-softmax", {}};
    c.spec.experts = 4;
    c.spec.edit = [](TransformerConfig& cfg) {
      cfg.moe_router_pre_softmax = true;
      cfg.moe_expert_capacity_factor = 0.75;
    };
    cases.push_back(c);
  }
  {
    GradCase c{"sigmoid top-2, router dtype fp64", {}};
    c.spec.edit = [](TransformerConfig& cfg) {
      cfg.moe_router_score_function = "sigmoid";
      cfg.moe_router_dtype = "fp64";
    };
    cases.push_back(c);
  }
  const int64_t T = 7;
  for (const GradCase& gc : cases) {
    SCOPED_TRACE(gc.name);
    const LayerSpec& s = gc.spec;
    const TransformerConfig cfg = layer_config(s);
    int checked = 0;
    for (uint64_t seed = 1; seed <= 40 && checked < 1; ++seed) {
      MatMap seq = sequential_weights(s, seed, 0.8);
      MatMap vars = s.grouped ? grouped_from_sequential(s, seq) : seq;
      vars["x"] = random_normal(T, s.h, seed, "x");
      const Mat dout = random_normal(T, s.h, seed, "dout");
      const Mat dob = random_normal(T, s.h, seed, "dob");
      const std::optional<Mat> d_bias = gc.with_output_bias_grad && s.bias ? std::optional<Mat>(dob) : std::nullopt;
      const RunContext ctx = ctx_of(gc.training, seed);
      auto forward = [&](const MatMap& v) {
        return moe_layer_forward(cfg, Params(v).sub("mlp"), v.at("x"), float64_math(), ctx);
      };
      const MoeLayerForward f = forward(vars);
      const RouterForward& r = f.router;
      const double unit = r.selection_values.cwiseAbs().maxCoeff();
      if (r.topk_margin.minCoeff() < 1e-3 * unit || r.order_margin.minCoeff() < 1e-3 * unit) continue;
      if (cfg.moe_expert_capacity_factor) {
        // Keep the drop decisions stable under the perturbation: no two undropped
        // scores within 1e-3 of each other.
        TransformerConfig dropless = cfg;
        dropless.moe_expert_capacity_factor.reset();
        const Mat all = moe_router_forward(dropless, Params(vars).sub("mlp.router"), vars.at("x"), float64_math(),
                                           ctx.sub("router"))
                            .scores;
        bool close = false;
        for (Eigen::Index a = 0; a < all.size(); ++a) {
          for (Eigen::Index b = a + 1; b < all.size(); ++b) close |= std::abs(all.data()[a] - all.data()[b]) < 1e-3;
        }
        bool dropped = (r.kept.array() == 0).any();
        if (close || !dropped) continue;
      }
      ++checked;
      MatMap analytic;
      analytic["x"] = moe_layer_backward(cfg, Params(vars).sub("mlp"), vars.at("x"), f, dout, d_bias,
                                         Sink(analytic).sub("mlp"), float64_math());
      const auto loss = [&](const MatMap& v) {
        const MoeLayerForward g = forward(v);
        double l = dot(g.output, dout) + g.router.aux_loss.value_or(0.0) + g.router.z_loss.value_or(0.0);
        if (d_bias) l += dot(*g.output_bias, *d_bias);
        return l;
      };
      GradcheckOptions opt;
      opt.max_elements_per_tensor = 24;
      const GradcheckResult res = gradcheck(loss, vars, analytic, opt);
      EXPECT_TRUE(res.ok()) << "seed " << seed << ": " << res.describe();
      EXPECT_EQ(analytic.size(), vars.size());  // a gradient for every weight and x, nothing else
    }
    EXPECT_EQ(checked, 1) << "no well-separated draw found";
  }
}

// ---------------------------------------------------------------------------
// Precision emulation.

TEST(MoeLayer, EmulatedPrecisionTracksTheTruth) {
  LayerSpec s;
  s.h = 32, s.ffn = 48, s.experts = 4, s.k = 2;
  const TransformerConfig cfg = layer_config(s);
  MatMap w = sequential_weights(s, 9);
  for (auto& [key, m] : w) round_inplace(m, DType::BF16);
  const Mat x = rounded(random_normal(12, s.h, 9, "x"), DType::BF16);
  const Mat dout = rounded(random_normal(12, s.h, 9, "dout"), DType::BF16);
  const MoeLayerForward truth = moe_layer_forward(cfg, Params(w).sub("mlp"), x, float64_math(), ctx_of());
  const Mat dx_truth =
      moe_layer_backward(cfg, Params(w).sub("mlp"), x, truth, dout, std::nullopt, Sink(), float64_math());
  const double scale = truth.output.cwiseAbs().maxCoeff();
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const double u = dt == DType::F32 ? std::ldexp(1.0, -24) : std::ldexp(1.0, -8);
    const Precision p = emulated_precision(dt, cfg);
    const MoeLayerForward f = moe_layer_forward(cfg, Params(w).sub("mlp"), x, p, ctx_of());
    ASSERT_EQ(f.router.indices, truth.router.indices);  // no near-ties in this draw
    const double err = (f.output - truth.output).cwiseAbs().maxCoeff();
    // A few roundings (fc1, activation, fc2, score, product, sum) of O(scale) values.
    EXPECT_LE(err, 30 * u * scale);
    EXPECT_GT(err, 0.0);
    for (Eigen::Index i = 0; i < f.output.size(); ++i) EXPECT_EQ(f.output.data()[i], round_to(f.output.data()[i], dt));
    const Mat dx = moe_layer_backward(cfg, Params(w).sub("mlp"), x, f, dout, std::nullopt, Sink(), p);
    EXPECT_LE((dx - dx_truth).cwiseAbs().maxCoeff(), 100 * u * dx_truth.cwiseAbs().maxCoeff());
  }
}

// ---------------------------------------------------------------------------
// Errors.

TEST(MoeLayer, ClearErrorsOnBadInput) {
  LayerSpec s;
  const TransformerConfig cfg = layer_config(s);
  const Mat x = random_normal(5, s.h, 1, "x");
  MatMap w = sequential_weights(s, 1);
  MatMap missing = w;
  missing.erase("mlp.experts.local_experts.2.linear_fc2.weight");
  EXPECT_NE(error_of([&] { moe_layer_forward(cfg, Params(missing).sub("mlp"), x, float64_math(), ctx_of()); })
                .find("mlp.experts.local_experts.2.linear_fc2.weight"),
            std::string::npos);
  MatMap misshapen = w;
  misshapen["mlp.experts.local_experts.1.linear_fc1.bias"] = Mat::Zero(1, s.ffn + 1);
  EXPECT_NE(error_of([&] { moe_layer_forward(cfg, Params(misshapen).sub("mlp"), x, float64_math(), ctx_of()); })
                .find("mlp.experts.local_experts.1.linear_fc1.bias"),
            std::string::npos);
  MatMap no_router = w;
  no_router.erase("mlp.router.weight");
  EXPECT_NE(error_of([&] { moe_layer_forward(cfg, Params(no_router).sub("mlp"), x, float64_math(), ctx_of()); })
                .find("mlp.router.weight"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moe_layer_forward(cfg, Params(w).sub("mlp"), Mat::Zero(5, s.h + 1), float64_math(),
                                              ctx_of()); })
                .find("hidden_size"),
            std::string::npos);
  const MoeLayerForward f = moe_layer_forward(cfg, Params(w).sub("mlp"), x, float64_math(), ctx_of());
  EXPECT_NE(error_of([&] { moe_layer_backward(cfg, Params(w).sub("mlp"), x, f, Mat::Zero(4, s.h), std::nullopt,
                                               Sink(), float64_math()); })
                .find("d_output"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moe_layer_backward(cfg, Params(w).sub("mlp"), x, f, Mat::Zero(5, s.h),
                                               Mat(Mat::Zero(5, 1)), Sink(), float64_math()); })
                .find("d_output_bias"),
            std::string::npos);
  LayerSpec g = s;
  g.bias = false, g.grouped = true;
  const TransformerConfig gcfg = layer_config(g);
  MatMap gw = grouped_from_sequential(g, sequential_weights(g, 1));
  gw.erase("mlp.experts.weight2");
  EXPECT_NE(error_of([&] { moe_layer_forward(gcfg, Params(gw).sub("mlp"), x, float64_math(), ctx_of()); })
                .find("mlp.experts.weight2"),
            std::string::npos);
  TransformerConfig grouped_bias = gcfg;
  grouped_bias.add_bias_linear = true;
  EXPECT_NE(error_of([&] { moe_layer_forward(grouped_bias, Params(gw).sub("mlp"), x, float64_math(), ctx_of()); })
                .find("add_bias_linear"),
            std::string::npos);
}

}  // namespace
}  // namespace paritron::ref
