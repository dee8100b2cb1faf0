// Tests of reference/self_attention: the fused QKV row layout (identity
// weights), a hand-computed layer, RoPE on q and k only, finite-difference
// gradients of the input and every weight, invariants, precision emulation,
// taps and errors.
#include "reference/self_attention.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cstdio>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "common/error.h"
#include "reference/gradcheck.h"
#include "reference/rotary_pos_emb.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

// Random weights for cfg under the self-attention's local keys.
MatMap weights(const TransformerConfig& c, uint64_t seed) {
  const AttentionDims d = attention_dims(c);
  const int64_t qkv = (d.np + 2 * d.ng) * d.hn;
  MatMap w;
  w["linear_qkv.weight"] = random_normal(qkv, c.hidden_size, seed, "linear_qkv.weight", 0.5);
  if (c.add_bias_linear || c.add_qkv_bias) w["linear_qkv.bias"] = random_normal(1, qkv, seed, "linear_qkv.bias", 0.5);
  w["linear_proj.weight"] = random_normal(c.hidden_size, d.np * d.hn, seed, "linear_proj.weight", 0.5);
  if (c.add_bias_linear) w["linear_proj.bias"] = random_normal(1, c.hidden_size, seed, "linear_proj.bias", 0.5);
  return w;
}

const Precision kTruth = truth_precision();

// ---------------------------------------------------------------------------
// The fused QKV layout.

// With linear_qkv.weight = I (h = (n + 2g) hn), mixed = x, so the split picks
// x's columns. n = 4, g = 2, hn = 1 (r = 2): rows are
//   group 0: q0, q1, k0, v0; group 1: q2, q3, k1, v1
// so query = columns {0, 1, 4, 5}, key = {2, 6}, value = {3, 7}
// ([all Q | all K | all V] would give query {0, 1, 2, 3}).
TEST(SelfAttention, FusedQkvLayoutIsPerQueryGroup) {
  const TransformerConfig cfg = attention_config(4, 2, 1, 8, /*bias_linear=*/false);
  MatMap w = weights(cfg, 1);
  w["linear_qkv.weight"] = Mat::Identity(8, 8);
  const Mat x = random_normal(3, 8, 1, "x");
  MatMap taps;
  self_attention_forward(cfg, Params(w), x, 1, AttnMaskType::causal, std::nullopt, std::nullopt, kTruth, {},
                         Sink(taps));
  EXPECT_EQ(taps.at("linear_qkv.output"), x);
  EXPECT_EQ(taps.at("core_attention.query"), columns(x, {0, 1, 4, 5}));
  EXPECT_EQ(taps.at("core_attention.key"), columns(x, {2, 6}));
  EXPECT_EQ(taps.at("core_attention.value"), columns(x, {3, 7}));
  // MHA (g = n = 2, hn = 2): per head [q_j | k_j | v_j], 3*hn rows each.
  Mat q, k, v;
  const Mat m = random_normal(2, 12, 2, "m");
  split_qkv(m, AttentionDims{2, 2, 2}, q, k, v);
  EXPECT_EQ(q, columns(m, {0, 1, 6, 7}));
  EXPECT_EQ(k, columns(m, {2, 3, 8, 9}));
  EXPECT_EQ(v, columns(m, {4, 5, 10, 11}));
}

RC_GTEST_PROP(SelfAttentionProperty, SplitFollowsTheSpecRowFormula, ()) {
  const int64_t g = *rc::gen::inRange<int64_t>(1, 4), r = *rc::gen::inRange<int64_t>(1, 4);
  const int64_t n = g * r, hn = *rc::gen::inRange<int64_t>(1, 4);
  const Mat m = random_normal(2, (n + 2 * g) * hn, *rc::gen::arbitrary<uint64_t>(), "m");
  Mat q, k, v;
  const AttentionDims d{n, g, hn};
  split_qkv(m, d, q, k, v);
  // spec §4.2: q head j channel d at (j / r)(r+2)hn + (j % r)hn + d; key G at
  // G(r+2)hn + r hn + d; value at G(r+2)hn + (r+1)hn + d.
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < hn; ++c) RC_ASSERT(q.col(j * hn + c) == m.col((j / r) * (r + 2) * hn + (j % r) * hn + c));
  for (int64_t G = 0; G < g; ++G)
    for (int64_t c = 0; c < hn; ++c) {
      RC_ASSERT(k.col(G * hn + c) == m.col(G * (r + 2) * hn + r * hn + c));
      RC_ASSERT(v.col(G * hn + c) == m.col(G * (r + 2) * hn + (r + 1) * hn + c));
    }
  RC_ASSERT(merge_qkv(q, k, v, d) == m);
}

// ---------------------------------------------------------------------------
// A whole layer by hand: h = 2, one head, hn = 2 (alpha = 1/sqrt 2), s = 2,
// causal. W_qkv = [I; I; I] (q = k = x, v = x + b_v), b_qkv = (0, 0, 0, 0, 1, -1),
// W_proj = diag(1, 2), b_proj = (0.5, -0.5).
// x0 = 0, x1 = (a, 0) with a^2 = sqrt(2) ln 3: query 1 scores
// (x1.x0, x1.x1)/sqrt 2 = (0, ln 3) -> probs (1/4, 3/4).
// v0 = (1, -1), v1 = (a + 1, -1): context0 = v0, context1 = v0/4 + 3 v1/4 =
// (1 + 3a/4, -1). output = context diag(1, 2): (1, -2), (1 + 3a/4, -2);
// output_bias = b_proj, not added.
TEST(SelfAttention, TwoTokensByHand) {
  const TransformerConfig cfg = attention_config(1, 1, 2, 2);
  MatMap w;
  w["linear_qkv.weight"] = rows_of({{1, 0}, {0, 1}, {1, 0}, {0, 1}, {1, 0}, {0, 1}});
  w["linear_qkv.bias"] = rows_of({{0, 0, 0, 0, 1, -1}});
  w["linear_proj.weight"] = rows_of({{1, 0}, {0, 2}});
  w["linear_proj.bias"] = rows_of({{0.5, -0.5}});
  const double a = std::sqrt(std::sqrt(2.0) * std::log(3.0));
  const Mat x = rows_of({{0, 0}, {a, 0}});
  const auto f = self_attention_forward(cfg, Params(w), x, 1, AttnMaskType::causal, std::nullopt, std::nullopt,
                                        kTruth, {});
  EXPECT_LE((f.output - rows_of({{1, -2}, {1 + 3 * a / 4, -2}})).cwiseAbs().maxCoeff(), 1e-14) << f.output;
  ASSERT_TRUE(f.output_bias.has_value());
  EXPECT_EQ(*f.output_bias, rows_of({{0.5, -0.5}}));
  EXPECT_LE((f.core.probs - rows_of({{1, 0}, {0.25, 0.75}})).cwiseAbs().maxCoeff(), 1e-15);
  // Without add_bias_linear there is no output_bias.
  TransformerConfig nob = cfg;
  nob.add_bias_linear = false;
  nob.add_qkv_bias = true;  // linear_qkv keeps its bias through add_qkv_bias
  w.erase("linear_proj.bias");
  const auto g = self_attention_forward(nob, Params(w), x, 1, AttnMaskType::causal, std::nullopt, std::nullopt,
                                        kTruth, {});
  EXPECT_FALSE(g.output_bias.has_value());
  EXPECT_EQ(g.output, f.output);
}

// RoPE on q and k, never v. hn = rot_dim = 2, angles (0, 0) at position 0 and
// (1/2, 1/2) at position 1 (cat(f, f) for one frequency); non-interleaved
// rotate_half([x0, x1]) = [-x1, x0], so (a, 0) becomes (a c, a s) with c, s
// the float32 cos/sin of 1/2 (Megatron evaluates them in float32).
TEST(SelfAttention, RopeRotatesQueryAndKeyOnly) {
  const TransformerConfig cfg = attention_config(1, 1, 2, 2, /*bias_linear=*/false);
  MatMap w;
  w["linear_qkv.weight"] = rows_of({{1, 0}, {0, 1}, {1, 0}, {0, 1}, {1, 0}, {0, 1}});
  w["linear_proj.weight"] = Mat::Identity(2, 2);
  const double a = 1.5;
  const Mat x = rows_of({{0.25, -1}, {a, 0}});
  const Mat freqs = rows_of({{0, 0}, {0.5, 0.5}});
  MatMap taps;
  self_attention_forward(cfg, Params(w), x, 1, AttnMaskType::causal, std::nullopt, freqs, kTruth, {}, Sink(taps));
  const double c = static_cast<float>(std::cos(0.5)), s = static_cast<float>(std::sin(0.5));
  const Mat rotated = rows_of({{0.25, -1}, {a * c, a * s}});
  EXPECT_EQ(taps.at("core_attention.query"), rotated);
  EXPECT_EQ(taps.at("core_attention.key"), rotated);
  EXPECT_EQ(taps.at("core_attention.value"), x);  // unrotated
}

RC_GTEST_PROP(SelfAttentionProperty, RopeDependsOnRelativePositionsOnly, ()) {
  // Adding the same angle c to every position rotates every q and k by c:
  // q_i.k_j is unchanged, so is the output (up to the float32 cos/sin).
  const TransformerConfig cfg = attention_config(2, 1, 4, 5);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const MatMap w = weights(cfg, seed);
  const int64_t s = *rc::gen::inRange<int64_t>(1, 6), b = 2;
  const Mat x = random_normal(s * b, 5, seed, "x");
  Mat freqs = random_uniform(s, 4, seed, "f", -3, 3);
  freqs.rightCols(2) = freqs.leftCols(2);  // cat(f, f)
  const double shift = *rc::gen::inRange(-30, 30) / 10.0;
  const Mat shifted = (freqs.array() + shift).matrix();
  const auto f0 = self_attention_forward(cfg, Params(w), x, b, AttnMaskType::causal, std::nullopt, freqs, kTruth, {});
  const auto f1 =
      self_attention_forward(cfg, Params(w), x, b, AttnMaskType::causal, std::nullopt, shifted, kTruth, {});
  RC_ASSERT((f0.output - f1.output).cwiseAbs().maxCoeff() <= 1e-5 * (1 + f0.output.cwiseAbs().maxCoeff()));
}

// ---------------------------------------------------------------------------
// Gradients of every input and weight: L = sum(output G) + sum(output_bias Gb).

struct GradCase {
  TransformerConfig cfg;
  int64_t b = 2, s = 3;
  AttnMaskType type = AttnMaskType::causal;
  std::optional<AttentionMask> mask;
  bool rope = false;
  int64_t rot_dim = 0;
  bool training = false;
  int64_t layer_number = 1;
  bool grad_output_bias = true;
  uint64_t seed = 1;
};

void check_gradients(const GradCase& c) {
  const TransformerConfig& cfg = c.cfg;
  const AttentionDims d = attention_dims(cfg);
  MatMap vars = weights(cfg, c.seed);
  vars["hidden_states"] = random_normal(c.s * c.b, cfg.hidden_size, c.seed, "x");
  std::optional<Mat> freqs;
  if (c.rope) freqs = random_uniform(c.s, c.rot_dim > 0 ? c.rot_dim : d.hn, c.seed, "freqs", -2, 2);
  const Mat g = random_normal(c.s * c.b, cfg.hidden_size, c.seed, "g");
  std::optional<RowVec> gb;
  if (c.grad_output_bias && cfg.add_bias_linear) gb = random_normal(1, cfg.hidden_size, c.seed, "gb").row(0);
  RunContext ctx;
  ctx.training = c.training;
  ctx.seed = c.seed;
  ctx.layer_number = c.layer_number;
  ctx.path = "layers.0.self_attention";
  auto forward = [&](const MatMap& v) {
    return self_attention_forward(cfg, Params(v), v.at("hidden_states"), c.b, c.type, c.mask, freqs, kTruth, ctx);
  };
  auto loss = [&](const MatMap& v) {
    const auto f = forward(v);
    double l = dot(f.output, g);
    if (gb && f.output_bias) l += f.output_bias->dot(*gb);
    return l;
  };
  const auto f = forward(vars);
  MatMap analytic;
  analytic["hidden_states"] = self_attention_backward(cfg, Params(vars), vars.at("hidden_states"), c.b, freqs, f, g,
                                                      gb, Sink(analytic), kTruth);
  const GradcheckResult r = gradcheck(loss, vars, analytic);
  EXPECT_TRUE(r.ok()) << r.describe();
  EXPECT_EQ(analytic.size(), vars.size());
  if (cfg.add_bias_linear && !gb) {
    EXPECT_EQ(analytic.at("linear_proj.bias"), Mat::Zero(1, cfg.hidden_size));
  }
}

TEST(SelfAttentionGrad, GqaWithRopeAndOutputBias) {
  GradCase c;
  c.cfg = attention_config(4, 2, 4, 6);
  c.rope = true;
  check_gradients(c);
}

TEST(SelfAttentionGrad, QkvBiasOnlyWithPaddingAndFullyMaskedRow) {
  GradCase c;
  c.cfg = attention_config(2, 2, 3, 5, /*bias_linear=*/false, /*qkv_bias=*/true);
  c.type = AttnMaskType::padding;
  const std::vector<int64_t> q = {3, 1}, kv = {2, 3};  // batch 1: queries 1, 2 fully masked
  c.mask = padding_mask(q, kv, 3, 3);
  c.seed = 2;
  check_gradients(c);
}

TEST(SelfAttentionGrad, DropoutAndLayerScalingAtLayer3) {
  GradCase c;
  c.cfg = attention_config(2, 1, 4, 4);
  c.cfg.attention_dropout = 0.25;
  c.cfg.apply_query_key_layer_scaling = true;
  c.training = true;
  c.layer_number = 3;
  c.s = 4;
  c.seed = 3;
  check_gradients(c);
}

TEST(SelfAttentionGrad, PartialInterleavedRopeSlidingWindowNoOutputBiasGrad) {
  GradCase c;
  c.cfg = attention_config(2, 2, 4, 4);
  c.cfg.rotary_interleaved = true;
  c.cfg.window_size = std::array<int64_t, 2>{1, 0};
  c.rope = true;
  c.rot_dim = 2;
  c.s = 4;
  c.grad_output_bias = false;  // linear_proj.bias then has a zero gradient
  c.seed = 4;
  check_gradients(c);
}

// ---------------------------------------------------------------------------
// Invariants.

RC_GTEST_PROP(SelfAttentionProperty, EquivariantUnderBatchPermutation, ()) {
  const int64_t b = *rc::gen::inRange<int64_t>(2, 4), s = *rc::gen::inRange<int64_t>(1, 5);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const TransformerConfig cfg = attention_config(2, 1, 2, 3);
  const MatMap w = weights(cfg, seed);
  std::vector<int64_t> perm(static_cast<size_t>(b));
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t i = b - 1; i > 0; --i) std::swap(perm[i], perm[*rc::gen::inRange<int64_t>(0, i + 1)]);
  auto permute = [&](const Mat& t) {
    Mat out(t.rows(), t.cols());
    for (int64_t i = 0; i < s; ++i)
      for (int64_t e = 0; e < b; ++e) out.row(i * b + e) = t.row(i * b + perm[e]);
    return out;
  };
  const Mat x = random_normal(s * b, 3, seed, "x");
  Mat freqs = random_uniform(s, 2, seed, "f", -1, 1);
  freqs.col(1) = freqs.col(0);
  const auto f = self_attention_forward(cfg, Params(w), x, b, AttnMaskType::causal, std::nullopt, freqs, kTruth, {});
  const auto fp =
      self_attention_forward(cfg, Params(w), permute(x), b, AttnMaskType::causal, std::nullopt, freqs, kTruth, {});
  RC_ASSERT(fp.output == permute(f.output));
}

// ---------------------------------------------------------------------------
// Precision emulation.

TEST(SelfAttentionPrecision, Bf16IsWithinBf16ErrorsOfTruth) {
  TransformerConfig cfg = attention_config(4, 2, 8, 16);
  cfg.bf16 = true;
  MatMap w = weights(cfg, 5);
  for (auto& [k, v] : w) v = rounded(v, DType::BF16);
  const int64_t b = 2, s = 5;
  const Mat x = rounded(random_normal(s * b, 16, 5, "x"), DType::BF16);
  const Mat g = rounded(random_normal(s * b, 16, 5, "g"), DType::BF16);
  Mat freqs = rotary_freqs([] {
    TransformerConfig r;
    r.kv_channels = 8;
    return r;
  }(), s);
  const auto ft = self_attention_forward(cfg, Params(w), x, b, AttnMaskType::causal, std::nullopt, freqs, kTruth, {});
  MatMap gt;
  const Mat dxt = self_attention_backward(cfg, Params(w), x, b, freqs, ft, g, std::nullopt, Sink(gt), kTruth);
  const Precision p = emulated_precision(DType::BF16, cfg);
  const auto fe = self_attention_forward(cfg, Params(w), x, b, AttnMaskType::causal, std::nullopt, freqs, p, {});
  MatMap ge;
  const Mat dxe = self_attention_backward(cfg, Params(w), x, b, freqs, fe, g, std::nullopt, Sink(ge), p);
  const auto close = [](const Mat& e, const Mat& t, const std::string& what) {
    EXPECT_EQ(e, rounded(e, DType::BF16)) << what;
    const double err = (e - t).cwiseAbs().maxCoeff();
    // A few bf16 roundings (2^-8 relative each) through a chain of GEMMs.
    EXPECT_LE(err, 8 * std::ldexp(1.0, -8) * t.cwiseAbs().maxCoeff()) << what;
    EXPECT_GT(err, 0.0) << what;
  };
  close(fe.output, ft.output, "output");
  close(dxe, dxt, "d hidden_states");
  for (const auto& [k, v] : gt) {
    if (k == "linear_proj.bias") continue;  // zero in both (no output-bias gradient)
    close(ge.at(k), v, k);
  }
}

// ---------------------------------------------------------------------------
// Taps, RNG path and errors.

TEST(SelfAttention, TapsAndDropoutPath) {
  TransformerConfig cfg = attention_config(2, 1, 2, 3);
  cfg.attention_dropout = 0.5;
  const MatMap w = weights(cfg, 6);
  const Mat x = random_normal(4, 3, 6, "x");
  RunContext ctx;
  ctx.training = true;
  ctx.seed = 11;
  ctx.path = "layers.0.self_attention";
  MatMap taps;
  const auto f = self_attention_forward(cfg, Params(w), x, 2, AttnMaskType::causal, std::nullopt, std::nullopt,
                                        kTruth, ctx, Sink(taps, "self_attention."));
  for (const char* key : {"linear_qkv.output", "core_attention.query", "core_attention.key", "core_attention.value",
                          "core_attention.scale_mask_softmax.output", "core_attention.attention_dropout.output",
                          "core_attention.output", "output"}) {
    EXPECT_EQ(taps.count(std::string("self_attention.") + key), 1u) << key;
  }
  EXPECT_EQ(taps.at("self_attention.output"), f.output);
  EXPECT_EQ(taps.at("self_attention.core_attention.output"), f.core.output);
  // The core attention draws its dropout under "<path>.core_attention".
  RunContext core = ctx;
  core.path = "layers.0.self_attention.core_attention";
  const auto direct = dot_product_attention_forward(cfg, f.query, f.key, f.value, 2, AttnMaskType::causal,
                                                    std::nullopt, kTruth, core);
  EXPECT_EQ(direct.dropout_scale, f.core.dropout_scale);
}

TEST(SelfAttention, BadInputErrors) {
  const TransformerConfig cfg = attention_config(2, 1, 2, 3);
  const MatMap good = weights(cfg, 7);
  const Mat x = random_normal(4, 3, 7, "x");
  auto run = [&](const TransformerConfig& c, const MatMap& w, const Mat& xx, const std::optional<Mat>& freqs) {
    return self_attention_forward(c, Params(w, "layers.0.self_attention."), xx, 2, AttnMaskType::causal,
                                  std::nullopt, freqs, kTruth, {});
  };
  auto prefixed = [](const MatMap& w) {
    MatMap out;
    for (const auto& [k, v] : w) out["layers.0.self_attention." + k] = v;
    return out;
  };
  MatMap missing = prefixed(good);
  missing.erase("layers.0.self_attention.linear_qkv.weight");
  expect_error([&] { run(cfg, missing, x, std::nullopt); }, "missing parameter 'layers.0.self_attention.linear_qkv.weight'");
  MatMap shape = prefixed(good);
  shape["layers.0.self_attention.linear_proj.weight"] = Mat::Zero(3, 3);
  expect_error([&] { run(cfg, shape, x, std::nullopt); }, "linear_proj.weight' has shape [3, 3], expected [3, 4]");
  MatMap no_bias = prefixed(good);
  no_bias.erase("layers.0.self_attention.linear_qkv.bias");
  expect_error([&] { run(cfg, no_bias, x, std::nullopt); }, "missing parameter 'layers.0.self_attention.linear_qkv.bias'");
  TransformerConfig nob = cfg;
  nob.add_bias_linear = false;
  expect_error([&] { run(nob, prefixed(good), x, std::nullopt); }, "unexpected parameter 'layers.0.self_attention.linear_qkv.bias'");
  expect_error([&] { run(cfg, prefixed(good), Mat::Zero(4, 4), std::nullopt); }, "hidden_states is [4, 4]");
  expect_error([&] { run(cfg, prefixed(good), x, Mat::Zero(3, 2)); }, "rotary_pos_emb is [3, 2]");
  expect_error([&] { run(cfg, prefixed(good), x, Mat::Zero(2, 4)); }, "rotary_pos_emb is [2, 4]");
  TransformerConfig heads = cfg;
  heads.num_attention_heads = 3;
  heads.num_query_groups = 2;
  expect_error([&] { run(heads, prefixed(good), x, std::nullopt); }, "must be a multiple of num_query_groups");
  TransformerConfig qkln = cfg;
  qkln.qk_layernorm = true;
  expect_error([&] { run(qkln, prefixed(good), x, std::nullopt); }, "qk_layernorm");
  const auto f = run(cfg, prefixed(good), x, std::nullopt);
  expect_error([&] {
    self_attention_backward(cfg, Params(prefixed(good), "layers.0.self_attention."), x, 2, std::nullopt, f,
                            Mat::Zero(4, 2), std::nullopt, Sink(), kTruth);
  }, "d_output");
}

}  // namespace
}  // namespace paritron::ref
