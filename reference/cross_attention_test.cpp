// Tests of reference/cross_attention: the per-head [k_j | v_j] layout of
// linear_kv (identity weights), a hand-computed case, finite-difference
// gradients of both inputs and every weight, invariants, precision emulation
// and errors.
#include "reference/cross_attention.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "common/error.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

MatMap weights(const TransformerConfig& c, uint64_t seed) {
  const int64_t proj = c.num_attention_heads * *c.kv_channels, h = c.hidden_size;
  MatMap w;
  w["linear_q.weight"] = random_normal(proj, h, seed, "linear_q.weight", 0.5);
  w["linear_kv.weight"] = random_normal(2 * proj, h, seed, "linear_kv.weight", 0.5);
  w["linear_proj.weight"] = random_normal(h, proj, seed, "linear_proj.weight", 0.5);
  if (c.add_bias_linear) {
    w["linear_q.bias"] = random_normal(1, proj, seed, "linear_q.bias", 0.5);
    w["linear_kv.bias"] = random_normal(1, 2 * proj, seed, "linear_kv.bias", 0.5);
    w["linear_proj.bias"] = random_normal(1, h, seed, "linear_proj.bias", 0.5);
  }
  return w;
}

const Precision kTruth = truth_precision();

// linear_kv.weight = I (h = 2 n hn): mixed_kv = context. n = 2, hn = 1: rows
// are k0, v0, k1, v1, so key = columns {0, 2}, value = {1, 3} ([all K | all V]
// would give key {0, 1}). linear_q = the first two rows of I: query = x[:, 0:2].
TEST(CrossAttention, KvLayoutIsPerHeadKeyThenValue) {
  const TransformerConfig cfg = attention_config(2, 2, 1, 4, /*bias_linear=*/false);
  MatMap w = weights(cfg, 1);
  w["linear_kv.weight"] = Mat::Identity(4, 4);
  w["linear_q.weight"] = Mat::Identity(2, 4);
  const Mat x = random_normal(2, 4, 1, "x"), c = random_normal(3, 4, 1, "c");
  MatMap taps;
  cross_attention_forward(cfg, Params(w), x, c, 1, AttnMaskType::padding, std::nullopt, kTruth, {}, Sink(taps));
  EXPECT_EQ(taps.at("linear_kv.output"), c);
  EXPECT_EQ(taps.at("core_attention.key"), columns(c, {0, 2}));
  EXPECT_EQ(taps.at("core_attention.value"), columns(c, {1, 3}));
  EXPECT_EQ(taps.at("core_attention.query"), columns(x, {0, 1}));
  EXPECT_EQ(taps.at("linear_q.output"), columns(x, {0, 1}));
  // hn = 2: head j's block is [k_j (2) | v_j (2)].
  Mat k, v;
  const Mat m = random_normal(2, 8, 2, "m");
  split_kv(m, AttentionDims{2, 2, 2}, k, v);
  EXPECT_EQ(k, columns(m, {0, 1, 4, 5}));
  EXPECT_EQ(v, columns(m, {2, 3, 6, 7}));
  EXPECT_EQ(merge_kv(k, v, AttentionDims{2, 2, 2}), m);
}

// One head, hn = h = 2 (alpha = 1/sqrt 2), sq = 1, sk = 2, no mask.
// W_q = I, W_kv = [I; I] (k = c, v = c + b_v), b_kv = (0, 0, 1, -1), b_q = 0,
// W_proj = I, b_proj = (0.5, -0.5).
// x = (sqrt(2) ln 3, 0), c0 = (0, 0), c1 = (1, 0): scores (0, ln 3) -> (1/4, 3/4);
// v0 = (1, -1), v1 = (2, -1): context = (1/4 + 6/4, -1) = (1.75, -1) = output.
TEST(CrossAttention, OneQueryTwoKeysByHand) {
  const TransformerConfig cfg = attention_config(1, 1, 2, 2);
  MatMap w;
  w["linear_q.weight"] = Mat::Identity(2, 2);
  w["linear_q.bias"] = Mat::Zero(1, 2);
  w["linear_kv.weight"] = rows_of({{1, 0}, {0, 1}, {1, 0}, {0, 1}});
  w["linear_kv.bias"] = rows_of({{0, 0, 1, -1}});
  w["linear_proj.weight"] = Mat::Identity(2, 2);
  w["linear_proj.bias"] = rows_of({{0.5, -0.5}});
  const Mat x = rows_of({{std::sqrt(2.0) * std::log(3.0), 0}});
  const Mat c = rows_of({{0, 0}, {1, 0}});
  const auto f = cross_attention_forward(cfg, Params(w), x, c, 1, AttnMaskType::padding, std::nullopt, kTruth, {});
  EXPECT_LE((f.output - rows_of({{1.75, -1}})).cwiseAbs().maxCoeff(), 1e-15) << f.output;
  EXPECT_LE((f.core.probs - rows_of({{0.25, 0.75}})).cwiseAbs().maxCoeff(), 1e-15);
  ASSERT_TRUE(f.output_bias.has_value());
  EXPECT_EQ(*f.output_bias, rows_of({{0.5, -0.5}}));
  // Masking key 1 leaves key 0 only: context = v0 = (1, -1).
  AttentionMask m(1, 1, 1, 2);
  m.set(0, 0, 0, 1, true);
  const auto g = cross_attention_forward(cfg, Params(w), x, c, 1, AttnMaskType::padding, m, kTruth, {});
  EXPECT_EQ(g.output, rows_of({{1, -1}}));
}

// ---------------------------------------------------------------------------
// Gradients of both inputs and every weight.

void check_gradients(const TransformerConfig& cfg, int64_t b, int64_t sq, int64_t sk,
                     const std::optional<AttentionMask>& mask, bool training, uint64_t seed) {
  MatMap vars = weights(cfg, seed);
  vars["hidden_states"] = random_normal(sq * b, cfg.hidden_size, seed, "x");
  vars["key_value_states"] = random_normal(sk * b, cfg.hidden_size, seed, "c");
  const Mat g = random_normal(sq * b, cfg.hidden_size, seed, "g");
  std::optional<RowVec> gb;
  if (cfg.add_bias_linear) gb = random_normal(1, cfg.hidden_size, seed, "gb").row(0);
  RunContext ctx;
  ctx.training = training;
  ctx.seed = seed;
  ctx.path = "layers.0.cross_attention";
  auto forward = [&](const MatMap& v) {
    return cross_attention_forward(cfg, Params(v), v.at("hidden_states"), v.at("key_value_states"), b,
                                   AttnMaskType::padding, mask, kTruth, ctx);
  };
  auto loss = [&](const MatMap& v) {
    const auto f = forward(v);
    return dot(f.output, g) + (gb && f.output_bias ? f.output_bias->dot(*gb) : 0.0);
  };
  const auto f = forward(vars);
  MatMap analytic;
  const CrossAttentionGrads d = cross_attention_backward(cfg, Params(vars), vars.at("hidden_states"),
                                                         vars.at("key_value_states"), b, f, g, gb, Sink(analytic),
                                                         kTruth);
  analytic["hidden_states"] = d.d_hidden_states;
  analytic["key_value_states"] = d.d_key_value_states;
  const GradcheckResult r = gradcheck(loss, vars, analytic);
  EXPECT_TRUE(r.ok()) << r.describe();
  EXPECT_EQ(analytic.size(), vars.size());
}

TEST(CrossAttentionGrad, PaddingMaskWithFullyMaskedRow) {
  const std::vector<int64_t> q = {3, 2}, kv = {5, 2};  // batch 1: query 2 fully masked
  check_gradients(attention_config(2, 2, 3, 4), 2, 3, 5, padding_mask(q, kv, 3, 5), false, 1);
}

TEST(CrossAttentionGrad, NoBiasWithDropout) {
  TransformerConfig cfg = attention_config(3, 3, 2, 5, /*bias_linear=*/false);
  cfg.attention_dropout = 0.2;
  check_gradients(cfg, 1, 4, 2, std::nullopt, true, 2);
}

// ---------------------------------------------------------------------------
// Invariants.

RC_GTEST_PROP(CrossAttentionProperty, InvariantUnderKeyValuePermutation, ()) {
  // Without positions, reordering the encoder tokens (and the mask's key
  // columns with them) does not change the output.
  const int64_t b = *rc::gen::inRange<int64_t>(1, 3), sq = *rc::gen::inRange<int64_t>(1, 4);
  const int64_t sk = *rc::gen::inRange<int64_t>(1, 6);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const TransformerConfig cfg = attention_config(2, 2, 2, 3);
  const MatMap w = weights(cfg, seed);
  std::vector<int64_t> perm(static_cast<size_t>(sk));
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t i = sk - 1; i > 0; --i) std::swap(perm[i], perm[*rc::gen::inRange<int64_t>(0, i + 1)]);
  AttentionMask m(b, 1, sq, sk), mp(b, 1, sq, sk);
  for (int64_t e = 0; e < b; ++e)
    for (int64_t i = 0; i < sq; ++i)
      for (int64_t j = 0; j < sk; ++j) m.set(e, 0, i, j, *rc::gen::arbitrary<bool>());
  const Mat x = random_normal(sq * b, 3, seed, "x"), c = random_normal(sk * b, 3, seed, "c");
  Mat cp(c.rows(), c.cols());
  for (int64_t l = 0; l < sk; ++l)
    for (int64_t e = 0; e < b; ++e) {
      cp.row(l * b + e) = c.row(perm[l] * b + e);
      for (int64_t i = 0; i < sq; ++i) mp.set(e, 0, i, l, m.masked(e, 0, i, perm[l]));
    }
  const auto f = cross_attention_forward(cfg, Params(w), x, c, b, AttnMaskType::padding, m, kTruth, {});
  const auto fp = cross_attention_forward(cfg, Params(w), x, cp, b, AttnMaskType::padding, mp, kTruth, {});
  RC_ASSERT((f.output - fp.output).cwiseAbs().maxCoeff() <= 1e-12 * (1 + f.output.cwiseAbs().maxCoeff()));
}

// ---------------------------------------------------------------------------
// Precision emulation.

TEST(CrossAttentionPrecision, Bf16AndFp16AgainstTruth) {
  for (DType dtype : {DType::BF16, DType::F16}) {
    TransformerConfig cfg = attention_config(2, 2, 4, 8);
    (dtype == DType::BF16 ? cfg.bf16 : cfg.fp16) = true;
    MatMap w = weights(cfg, 3);
    for (auto& [k, v] : w) v = rounded(v, dtype);
    const int64_t b = 2, sq = 3, sk = 5;
    const Mat x = rounded(random_normal(sq * b, 8, 3, "x"), dtype);
    const Mat c = rounded(random_normal(sk * b, 8, 3, "c"), dtype);
    const Mat g = rounded(random_normal(sq * b, 8, 3, "g"), dtype);
    const auto ft = cross_attention_forward(cfg, Params(w), x, c, b, AttnMaskType::padding, std::nullopt, kTruth, {});
    MatMap gt;
    const auto dt = cross_attention_backward(cfg, Params(w), x, c, b, ft, g, std::nullopt, Sink(gt), kTruth);
    const Precision p = emulated_precision(dtype, cfg);
    ASSERT_EQ(p.softmax_dtype, DType::F32);
    const auto fe = cross_attention_forward(cfg, Params(w), x, c, b, AttnMaskType::padding, std::nullopt, p, {});
    MatMap ge;
    const auto de = cross_attention_backward(cfg, Params(w), x, c, b, fe, g, std::nullopt, Sink(ge), p);
    const double ulp = dtype == DType::BF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
    const auto close = [&](const Mat& e, const Mat& t, const std::string& what) {
      EXPECT_EQ(e, rounded(e, dtype)) << what;
      const double err = (e - t).cwiseAbs().maxCoeff();
      EXPECT_LE(err, 8 * ulp * t.cwiseAbs().maxCoeff()) << what << " " << dtype_name(dtype);
      EXPECT_GT(err, 0.0) << what << " " << dtype_name(dtype);
    };
    close(fe.output, ft.output, "output");
    close(de.d_hidden_states, dt.d_hidden_states, "d hidden_states");
    close(de.d_key_value_states, dt.d_key_value_states, "d key_value_states");
    close(ge.at("linear_kv.weight"), gt.at("linear_kv.weight"), "linear_kv.weight");
  }
}

// ---------------------------------------------------------------------------
// Errors.

TEST(CrossAttention, BadInputErrors) {
  const TransformerConfig cfg = attention_config(2, 2, 2, 3);
  const MatMap w = weights(cfg, 4);
  const Mat x = random_normal(4, 3, 4, "x"), c = random_normal(6, 3, 4, "c");
  auto run = [&](const TransformerConfig& cc, const MatMap& ww, const Mat& xx, const Mat& kv, AttnMaskType type,
                 const std::optional<AttentionMask>& m) {
    return cross_attention_forward(cc, Params(ww), xx, kv, 2, type, m, kTruth, {});
  };
  TransformerConfig gqa = cfg;
  gqa.num_query_groups = 1;
  expect_error([&] { run(gqa, w, x, c, AttnMaskType::padding, std::nullopt); },
               "num_query_groups == num_attention_heads (got 1 and 2)");
  // add_qkv_bias does not give cross attention biases (spec §14 #48).
  TransformerConfig qkv_bias = cfg;
  qkv_bias.add_bias_linear = false;
  qkv_bias.add_qkv_bias = true;
  expect_error([&] { run(qkv_bias, w, x, c, AttnMaskType::padding, std::nullopt); },
               "unexpected parameter 'linear_q.bias'");
  const auto nob = run(qkv_bias, weights(qkv_bias, 4), x, c, AttnMaskType::padding, std::nullopt);
  EXPECT_FALSE(nob.output_bias.has_value());
  MatMap bad_kv = w;
  bad_kv["linear_kv.weight"] = Mat::Zero(4, 3);
  expect_error([&] { run(cfg, bad_kv, x, c, AttnMaskType::padding, std::nullopt); },
               "'linear_kv.weight' has shape [4, 3], expected [8, 3]");
  expect_error([&] { run(cfg, w, x, Mat::Zero(6, 2), AttnMaskType::padding, std::nullopt); },
               "key_value_states is [6, 2]");
  // The causal type with sq != sk and no mask: Megatron asserts sq == sk.
  expect_error([&] { run(cfg, w, x, c, AttnMaskType::causal, std::nullopt); }, "sq == sk");
  expect_error([&] { run(cfg, w, x, c, AttnMaskType::padding, AttentionMask(2, 1, 2, 2)); },
               "attention_mask has shape [2, 1, 2, 2]");
  const auto f = run(cfg, w, x, c, AttnMaskType::padding, std::nullopt);
  expect_error([&] { cross_attention_backward(cfg, Params(w), x, c, 2, f, Mat::Zero(2, 3), std::nullopt, Sink(), kTruth); },
               "d_output");
  expect_error([&] {
    cross_attention_backward(cfg, Params(w), x, c, 2, f, Mat::Zero(4, 3), RowVec::Zero(2), Sink(), kTruth);
  }, "d_output_bias has 2 entries");
}

}  // namespace
}  // namespace paritron::ref
