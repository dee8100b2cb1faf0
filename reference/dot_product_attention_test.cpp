// Tests of reference/dot_product_attention: hand-computed attention, the
// GQA head->group map, the scale rules, finite-difference gradients of query,
// key and value (GQA, padding with a fully masked row, layer scaling,
// sliding window, dropout), invariants, precision emulation and errors.
#include "reference/dot_product_attention.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/math/random.h"
#include "common/rng.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

TransformerConfig config(int64_t np, int64_t ng, int64_t hn) {
  TransformerConfig c = attention_config(np, ng, hn, np * hn);
  c.num_layers = 4;
  // Not validate_config: its Paritron rule that int(kv_channels *
  // rotary_percent) be even (RoPE) would forbid the odd head widths the core
  // attention supports; every field it would derive is set here.
  return c;
}

const Precision kTruth = truth_precision();
const double kLn3 = std::log(3.0);

// ---------------------------------------------------------------------------
// Hand-computed cases.

// One head, hn = 4 (alpha = 1/sqrt(4) = 1/2), sq = sk = 2, causal.
// k0 = e0, k1 = e1, q1 = (0, 2 ln 3, 0, 0): scores of query 1 are
// (0, 1/2 * 2 ln 3) = (0, ln 3) -> probs (1/4, 3/4), so
// context_1 = v0/4 + 3 v1/4 = (1 + 15, 2 + 18, 3 + 21, 4 + 24)/4 = (4, 5, 6, 7);
// query 0 sees key 0 only: context_0 = v0.
TEST(DotProductAttention, TwoTokensByHand) {
  const TransformerConfig cfg = config(1, 1, 4);
  const Mat q = rows_of({{1, 1, 1, 1}, {0, 2 * kLn3, 0, 0}});
  const Mat k = rows_of({{1, 0, 0, 0}, {0, 1, 0, 0}});
  const Mat v = rows_of({{1, 2, 3, 4}, {5, 6, 7, 8}});
  const auto f = dot_product_attention_forward(cfg, q, k, v, 1, AttnMaskType::causal, std::nullopt, kTruth, {});
  const Mat expected = rows_of({{1, 2, 3, 4}, {4, 5, 6, 7}});
  EXPECT_LE((f.output - expected).cwiseAbs().maxCoeff(), 1e-14) << f.output;
  EXPECT_LE((f.probs - rows_of({{1, 0}, {0.25, 0.75}})).cwiseAbs().maxCoeff(), 1e-15);
  EXPECT_EQ(f.scale.alpha, 0.5);
  EXPECT_FALSE(f.scale.coeff.has_value());
  // Padding type with no mask: nothing masked. q0 = 0 scores (0, 0) -> the
  // mean of v0, v1 = (3, 4, 5, 6).
  const Mat q0 = rows_of({{0, 0, 0, 0}, {0, 2 * kLn3, 0, 0}});
  const auto g = dot_product_attention_forward(cfg, q0, k, v, 1, AttnMaskType::padding, std::nullopt, kTruth, {});
  EXPECT_LE((g.output - rows_of({{3, 4, 5, 6}, {4, 5, 6, 7}})).cwiseAbs().maxCoeff(), 1e-14);
}

// b = 2: rows are (s, b) row-major, token t = i_s * b + i_b. Batch 1 has the
// values swapped, so its context is v1 for query 0 and v1/4 + 3 v0/4 =
// (2, 3, 4, 5) for query 1.
TEST(DotProductAttention, SequenceFirstBatchLayout) {
  const TransformerConfig cfg = config(1, 1, 4);
  const Mat q = rows_of({{1, 1, 1, 1}, {1, 1, 1, 1}, {0, 2 * kLn3, 0, 0}, {0, 2 * kLn3, 0, 0}});
  const Mat k = rows_of({{1, 0, 0, 0}, {1, 0, 0, 0}, {0, 1, 0, 0}, {0, 1, 0, 0}});
  const Mat v = rows_of({{1, 2, 3, 4}, {5, 6, 7, 8}, {5, 6, 7, 8}, {1, 2, 3, 4}});
  const auto f = dot_product_attention_forward(cfg, q, k, v, 2, AttnMaskType::causal, std::nullopt, kTruth, {});
  const Mat expected = rows_of({{1, 2, 3, 4}, {5, 6, 7, 8}, {4, 5, 6, 7}, {2, 3, 4, 5}});
  EXPECT_LE((f.output - expected).cwiseAbs().maxCoeff(), 1e-14) << f.output;
}

// np = 4 query heads, ng = 2 groups: repeat_interleave gives heads 0, 1 group
// 0 and heads 2, 3 group 1 (not j mod ng). Zero queries attend uniformly, so
// head j's context is the mean of its group's values: 1 for group 0 and 2 for
// group 1 (values constant per group).
TEST(DotProductAttention, GqaHeadToGroupIsBlockwise) {
  const TransformerConfig cfg = config(4, 2, 2);
  const int64_t s = 3;
  const Mat q = Mat::Zero(s, 8);
  const Mat k = random_normal(s, 4, 1, "k");
  Mat v(s, 4);
  v << Mat::Constant(s, 2, 1.0), Mat::Constant(s, 2, 2.0);
  const auto f = dot_product_attention_forward(cfg, q, k, v, 1, AttnMaskType::no_mask, std::nullopt, kTruth, {});
  for (int64_t i = 0; i < s; ++i) {
    EXPECT_LE((f.output.row(i) - rows_of({{1, 1, 1, 1, 2, 2, 2, 2}})).cwiseAbs().maxCoeff(), 1e-15) << f.output;
  }
}

TEST(DotProductAttention, ScaleRules) {
  TransformerConfig cfg = config(2, 2, 4);
  // 0.5.0: alpha = 1 / sqrt(hn).
  EXPECT_EQ(attention_scale(cfg, 3).alpha, 0.5);
  EXPECT_FALSE(attention_scale(cfg, 3).coeff.has_value());
  // Layer scaling: norm_factor = sqrt(hn) * L, coeff = L (L = 3: 1/6).
  cfg.apply_query_key_layer_scaling = true;
  EXPECT_EQ(attention_scale(cfg, 3).alpha, 1.0 / 6.0);
  EXPECT_EQ(attention_scale(cfg, 3).coeff, 3.0);
  // layer_number = max(1, layer_number).
  EXPECT_EQ(attention_scale(cfg, 0).alpha, 0.5);
  EXPECT_EQ(attention_scale(cfg, 0).coeff, 1.0);
  // softmax_scale (newer): replaces 1/sqrt(hn), divided by coeff under layer scaling.
  cfg.softmax_scale = 0.125;
  EXPECT_EQ(attention_scale(cfg, 3).alpha, 0.125 / 3.0);
  EXPECT_EQ(attention_scale(cfg, 3).coeff, 3.0);
  cfg.apply_query_key_layer_scaling = false;
  EXPECT_EQ(attention_scale(cfg, 3).alpha, 0.125);
  // softmax_scale = 1 in the two-token case: q1 = (0, ln 3, 0, 0) gives the
  // same scores (0, ln 3) and so the same context (4, 5, 6, 7).
  TransformerConfig one = config(1, 1, 4);
  one.softmax_scale = 1.0;
  const Mat q = rows_of({{1, 1, 1, 1}, {0, kLn3, 0, 0}});
  const Mat k = rows_of({{1, 0, 0, 0}, {0, 1, 0, 0}});
  const Mat v = rows_of({{1, 2, 3, 4}, {5, 6, 7, 8}});
  const auto f = dot_product_attention_forward(one, q, k, v, 1, AttnMaskType::causal, std::nullopt, kTruth, {});
  EXPECT_LE((f.output.row(1) - rows_of({{4, 5, 6, 7}})).cwiseAbs().maxCoeff(), 1e-14);
}

TEST(DotProductAttention, LayerScalingEqualsNoScalingInFloat64) {
  TransformerConfig cfg = config(2, 1, 3);
  const Mat q = random_normal(5 * 2, 6, 2, "q"), k = random_normal(5 * 2, 3, 2, "k"), v = random_normal(10, 3, 2, "v");
  const Mat g = random_normal(10, 6, 2, "g");
  RunContext ctx;
  ctx.layer_number = 3;
  const auto plain = dot_product_attention_forward(cfg, q, k, v, 2, AttnMaskType::causal, std::nullopt, kTruth, ctx);
  cfg.apply_query_key_layer_scaling = true;
  const auto scaled = dot_product_attention_forward(cfg, q, k, v, 2, AttnMaskType::causal, std::nullopt, kTruth, ctx);
  EXPECT_EQ(scaled.scale.coeff, 3.0);
  EXPECT_LE((plain.output - scaled.output).cwiseAbs().maxCoeff(), 1e-13);
  const auto dp = dot_product_attention_backward(config(2, 1, 3), q, k, v, plain, g, kTruth);
  const auto ds = dot_product_attention_backward(cfg, q, k, v, scaled, g, kTruth);
  EXPECT_LE((dp.d_query - ds.d_query).cwiseAbs().maxCoeff(), 1e-13);
  EXPECT_LE((dp.d_key - ds.d_key).cwiseAbs().maxCoeff(), 1e-13);
  EXPECT_LE((dp.d_value - ds.d_value).cwiseAbs().maxCoeff(), 1e-13);
}

// ---------------------------------------------------------------------------
// Gradients: L = sum(output * G), central differences over query, key, value.

struct GradCase {
  int64_t np = 2, ng = 2, hn = 3, b = 2, sq = 4, sk = 4;
  AttnMaskType type = AttnMaskType::causal;
  std::optional<AttentionMask> mask;
  bool layer_scaling = false;
  int64_t layer_number = 1;
  std::optional<std::array<int64_t, 2>> window;
  std::optional<double> softmax_scale;
  double dropout = 0.0;
  uint64_t seed = 1;
};

void check_gradients(const GradCase& c) {
  TransformerConfig cfg = config(c.np, c.ng, c.hn);
  cfg.apply_query_key_layer_scaling = c.layer_scaling;
  cfg.window_size = c.window;
  cfg.softmax_scale = c.softmax_scale;
  cfg.attention_dropout = c.dropout;
  RunContext ctx;
  ctx.layer_number = c.layer_number;
  ctx.training = c.dropout > 0;
  ctx.seed = c.seed;
  ctx.path = "layers.0.self_attention.core_attention";
  MatMap vars = {{"query", random_normal(c.sq * c.b, c.np * c.hn, c.seed, "q")},
                 {"key", random_normal(c.sk * c.b, c.ng * c.hn, c.seed, "k")},
                 {"value", random_normal(c.sk * c.b, c.ng * c.hn, c.seed, "v")}};
  const Mat g = random_normal(c.sq * c.b, c.np * c.hn, c.seed, "g");
  auto forward = [&](const MatMap& v) {
    return dot_product_attention_forward(cfg, v.at("query"), v.at("key"), v.at("value"), c.b, c.type, c.mask, kTruth,
                                         ctx);
  };
  const auto f = forward(vars);
  const auto d = dot_product_attention_backward(cfg, vars.at("query"), vars.at("key"), vars.at("value"), f, g, kTruth);
  const MatMap analytic = {{"query", d.d_query}, {"key", d.d_key}, {"value", d.d_value}};
  const GradcheckResult r = gradcheck([&](const MatMap& v) { return dot(forward(v).output, g); }, vars, analytic);
  EXPECT_TRUE(r.ok()) << r.describe();
  EXPECT_GE(r.checked, 3 * 24);
}

TEST(DotProductAttentionGrad, MultiHeadCausal) { check_gradients({}); }

TEST(DotProductAttentionGrad, GqaWithPaddingAndAFullyMaskedRow) {
  GradCase c;
  c.np = 6, c.ng = 2, c.sq = 3, c.sk = 5, c.type = AttnMaskType::padding, c.seed = 2;
  const std::vector<int64_t> q = {3, 2}, kv = {5, 3};  // batch 1: query 2 fully masked
  c.mask = padding_mask(q, kv, 3, 5);
  check_gradients(c);
}

TEST(DotProductAttentionGrad, LayerScalingAtLayer3) {
  GradCase c;
  c.np = 4, c.ng = 2, c.layer_scaling = true, c.layer_number = 3, c.seed = 3;
  check_gradients(c);
}

TEST(DotProductAttentionGrad, SlidingWindow) {
  GradCase c;
  c.sq = c.sk = 6, c.window = std::array<int64_t, 2>{2, 0}, c.seed = 4;
  check_gradients(c);
}

TEST(DotProductAttentionGrad, DropoutInTrainingWithFixedSeed) {
  // The dropout mask is a pure function of (seed, path, element index), so the
  // perturbed forwards drop the same elements and the loss stays smooth.
  GradCase c;
  c.np = 4, c.ng = 1, c.dropout = 0.3, c.seed = 5;
  check_gradients(c);
}

TEST(DotProductAttentionGrad, SoftmaxScaleAndNoMask) {
  GradCase c;
  c.type = AttnMaskType::no_mask, c.softmax_scale = 0.3, c.sq = 3, c.sk = 5, c.seed = 6;
  check_gradients(c);
}

// ---------------------------------------------------------------------------
// Dropout.

TEST(DotProductAttention, DropoutUsesGlobalFlatIndexInBNpSqSk) {
  TransformerConfig cfg = config(2, 2, 3);
  cfg.attention_dropout = 0.5;
  RunContext ctx;
  ctx.training = true;
  ctx.seed = 7;
  ctx.path = "layers.0.self_attention.core_attention";
  const int64_t b = 2, s = 4;
  const Mat q = random_normal(s * b, 6, 1, "q"), k = random_normal(s * b, 6, 1, "k"), v = random_normal(s * b, 6, 1, "v");
  const auto f = dot_product_attention_forward(cfg, q, k, v, b, AttnMaskType::causal, std::nullopt, kTruth, ctx);
  ASSERT_EQ(f.dropout_scale.rows(), b * 2 * s);
  // Element (r, c) of [b*np*sq, sk] is flat element r*sk + c of [b, np, sq, sk];
  // key "dropout.<path>" (RunContext::key).
  const RngKey key = rng_key(7, "dropout.layers.0.self_attention.core_attention");
  int64_t kept = 0;
  for (int64_t r = 0; r < f.dropout_scale.rows(); ++r)
    for (int64_t c = 0; c < s; ++c) {
      const bool keep = math::uniform_float(key, static_cast<uint64_t>(r * s + c)) >= 0.5f;
      EXPECT_EQ(f.dropout_scale(r, c), keep ? 2.0 : 0.0) << r << ", " << c;
      EXPECT_EQ(f.probs_dropped(r, c), f.probs(r, c) * f.dropout_scale(r, c));
      kept += keep;
    }
  EXPECT_GT(kept, 8);
  EXPECT_LT(kept, 56);
  // The context uses the dropped probabilities: head 1 of batch 0, query 3.
  const int64_t r = (0 * 2 + 1) * s + 3;
  Mat ctx_row = Mat::Zero(1, 3);
  for (int64_t l = 0; l < s; ++l) ctx_row += f.probs_dropped(r, l) * v.block(l * b + 0, 3, 1, 3);
  EXPECT_LE((f.output.block(3 * b + 0, 3, 1, 3) - ctx_row).cwiseAbs().maxCoeff(), 1e-14);
  // Eval mode: identity (no mask stored), equal to p = 0.
  ctx.training = false;
  const auto e = dot_product_attention_forward(cfg, q, k, v, b, AttnMaskType::causal, std::nullopt, kTruth, ctx);
  EXPECT_EQ(e.dropout_scale.size(), 0);
  cfg.attention_dropout = 0.0;
  EXPECT_EQ(e.output, dot_product_attention_forward(cfg, q, k, v, b, AttnMaskType::causal, std::nullopt, kTruth, ctx).output);
  // Another seed drops other elements.
  cfg.attention_dropout = 0.5;
  ctx.training = true;
  ctx.seed = 8;
  const auto other = dot_product_attention_forward(cfg, q, k, v, b, AttnMaskType::causal, std::nullopt, kTruth, ctx);
  EXPECT_NE(other.dropout_scale, f.dropout_scale);
}

// ---------------------------------------------------------------------------
// Invariants.

// repeat_interleave(t [s*b, ng*hn], r) along heads: [s*b, ng*r*hn].
Mat repeat_heads(const Mat& t, int64_t ng, int64_t r, int64_t hn) {
  Mat out(t.rows(), ng * r * hn);
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t k = 0; k < r; ++k) out.middleCols((g * r + k) * hn, hn) = t.middleCols(g * hn, hn);
  return out;
}

RC_GTEST_PROP(DotProductAttentionProperty, GqaEqualsMhaWithRepeatedKeyValueHeads, ()) {
  const int64_t ng = *rc::gen::inRange<int64_t>(1, 4), r = *rc::gen::inRange<int64_t>(1, 4);
  const int64_t np = ng * r, hn = *rc::gen::inRange<int64_t>(1, 5), b = *rc::gen::inRange<int64_t>(1, 3);
  const int64_t sq = *rc::gen::inRange<int64_t>(1, 5);
  const bool causal = *rc::gen::arbitrary<bool>();
  const int64_t sk = causal ? sq : *rc::gen::inRange<int64_t>(1, 5);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const AttnMaskType type = causal ? AttnMaskType::causal : AttnMaskType::no_mask;
  const Mat q = random_normal(sq * b, np * hn, seed, "q"), k = random_normal(sk * b, ng * hn, seed, "k");
  const Mat v = random_normal(sk * b, ng * hn, seed, "v"), g = random_normal(sq * b, np * hn, seed, "g");
  const TransformerConfig gqa = config(np, ng, hn), mha = config(np, np, hn);
  const Mat kr = repeat_heads(k, ng, r, hn), vr = repeat_heads(v, ng, r, hn);
  const auto fg = dot_product_attention_forward(gqa, q, k, v, b, type, std::nullopt, kTruth, {});
  const auto fm = dot_product_attention_forward(mha, q, kr, vr, b, type, std::nullopt, kTruth, {});
  RC_ASSERT(fg.output == fm.output);
  const auto dg = dot_product_attention_backward(gqa, q, k, v, fg, g, kTruth);
  const auto dm = dot_product_attention_backward(mha, q, kr, vr, fm, g, kTruth);
  RC_ASSERT(dg.d_query == dm.d_query);
  // repeat_interleave's backward: a group's gradient is the sum over its heads.
  for (int64_t grp = 0; grp < ng; ++grp) {
    Mat dk = Mat::Zero(sk * b, hn), dv = Mat::Zero(sk * b, hn);
    for (int64_t kk = 0; kk < r; ++kk) {
      dk += dm.d_key.middleCols((grp * r + kk) * hn, hn);
      dv += dm.d_value.middleCols((grp * r + kk) * hn, hn);
    }
    RC_ASSERT((dg.d_key.middleCols(grp * hn, hn) - dk).cwiseAbs().maxCoeff() <= 1e-12);
    RC_ASSERT((dg.d_value.middleCols(grp * hn, hn) - dv).cwiseAbs().maxCoeff() <= 1e-12);
  }
  // groups = heads is plain multi-head attention: the same as num_query_groups unset.
  TransformerConfig unset = mha;
  unset.num_query_groups = std::nullopt;
  RC_ASSERT(dot_product_attention_forward(unset, q, kr, vr, b, type, std::nullopt, kTruth, {}).output == fm.output);
}

// Rows of a [s*b, c] tensor with the batch permuted: new batch e = old perm[e].
Mat permute_batch(const Mat& t, int64_t b, const std::vector<int64_t>& perm) {
  Mat out(t.rows(), t.cols());
  for (int64_t i = 0; i < t.rows() / b; ++i)
    for (int64_t e = 0; e < b; ++e) out.row(i * b + e) = t.row(i * b + perm[e]);
  return out;
}

RC_GTEST_PROP(DotProductAttentionProperty, EquivariantUnderBatchPermutation, ()) {
  const int64_t b = *rc::gen::inRange<int64_t>(2, 5), np = 2, sq = *rc::gen::inRange<int64_t>(1, 5);
  const int64_t sk = *rc::gen::inRange<int64_t>(1, 5);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  std::vector<int64_t> perm(static_cast<size_t>(b));
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t i = b - 1; i > 0; --i) std::swap(perm[i], perm[*rc::gen::inRange<int64_t>(0, i + 1)]);
  std::vector<int64_t> kv(static_cast<size_t>(b)), kv_perm(static_cast<size_t>(b));
  for (int64_t e = 0; e < b; ++e) kv[e] = *rc::gen::inRange<int64_t>(0, sk + 1);
  for (int64_t e = 0; e < b; ++e) kv_perm[e] = kv[perm[e]];
  const TransformerConfig cfg = config(np, 1, 3);
  const Mat q = random_normal(sq * b, 6, seed, "q"), k = random_normal(sk * b, 3, seed, "k");
  const Mat v = random_normal(sk * b, 3, seed, "v");
  const auto f = dot_product_attention_forward(cfg, q, k, v, b, AttnMaskType::padding, padding_mask({}, kv, sq, sk),
                                               kTruth, {});
  const auto fp = dot_product_attention_forward(cfg, permute_batch(q, b, perm), permute_batch(k, b, perm),
                                                permute_batch(v, b, perm), b, AttnMaskType::padding,
                                                padding_mask({}, kv_perm, sq, sk), kTruth, {});
  RC_ASSERT(fp.output == permute_batch(f.output, b, perm));
}

// ---------------------------------------------------------------------------
// Precision emulation.

TEST(DotProductAttentionPrecision, Bf16AndFp32AgainstTruth) {
  TransformerConfig cfg = config(4, 2, 8);
  cfg.bf16 = true;
  const int64_t b = 2, s = 6;
  const Mat q = rounded(random_normal(s * b, 32, 9, "q"), DType::BF16);
  const Mat k = rounded(random_normal(s * b, 16, 9, "k"), DType::BF16);
  const Mat v = rounded(random_normal(s * b, 16, 9, "v"), DType::BF16);
  const Mat g = rounded(random_normal(s * b, 32, 9, "g"), DType::BF16);
  const auto ft = dot_product_attention_forward(cfg, q, k, v, b, AttnMaskType::causal, std::nullopt, kTruth, {});
  const auto dt = dot_product_attention_backward(cfg, q, k, v, ft, g, kTruth);
  for (DType dtype : {DType::BF16, DType::F32}) {
    const Precision p = emulated_precision(dtype, cfg);
    EXPECT_EQ(p.softmax_dtype, DType::F32);
    const auto fe = dot_product_attention_forward(cfg, q, k, v, b, AttnMaskType::causal, std::nullopt, p, {});
    const auto de = dot_product_attention_backward(cfg, q, k, v, fe, g, p);
    // bf16: a few bf16 ulps (2^-8 relative) of the output's scale; f32: ~2^-20.
    const double tol = dtype == DType::BF16 ? 4 * std::ldexp(1.0, -8) : std::ldexp(1.0, -20);
    const auto close = [&](const Mat& e, const Mat& t, const char* what) {
      EXPECT_EQ(e, rounded(e, dtype)) << what;
      const double err = (e - t).cwiseAbs().maxCoeff();
      EXPECT_LE(err, tol * t.cwiseAbs().maxCoeff()) << what << " " << dtype_name(dtype);
      EXPECT_GT(err, 0.0) << what << " " << dtype_name(dtype);
    };
    close(fe.output, ft.output, "output");
    close(de.d_query, dt.d_query, "d_query");
    close(de.d_key, dt.d_key, "d_key");
    close(de.d_value, dt.d_value, "d_value");
  }
}

// ---------------------------------------------------------------------------
// Errors.

TEST(DotProductAttention, BadInputErrors) {
  const TransformerConfig cfg = config(4, 2, 2);
  const Mat q = Mat::Zero(6, 8), kv = Mat::Zero(6, 4);
  auto fwd = [&](const Mat& qq, const Mat& kk, const Mat& vv, int64_t b, const std::optional<AttentionMask>& m) {
    return dot_product_attention_forward(cfg, qq, kk, vv, b, AttnMaskType::padding, m, kTruth, {});
  };
  expect_error([&] { fwd(Mat::Zero(6, 6), kv, kv, 2, std::nullopt); }, "query is [6, 6]");
  expect_error([&] { fwd(q, Mat::Zero(6, 8), kv, 2, std::nullopt); }, "key is [6, 8]");
  expect_error([&] { fwd(q, kv, Mat::Zero(4, 4), 2, std::nullopt); }, "key has 6 rows but value has 4");
  expect_error([&] { fwd(q, kv, kv, 4, std::nullopt); }, "b = 4");
  expect_error([&] { fwd(q, kv, kv, 2, AttentionMask(3, 1, 3, 3)); }, "attention_mask has shape [3, 1, 3, 3]");
  // Heads not divisible by groups (an unvalidated config).
  TransformerConfig bad = cfg;
  bad.num_attention_heads = 3;
  expect_error([&] { dot_product_attention_forward(bad, q, kv, kv, 2, AttnMaskType::padding, std::nullopt, kTruth, {}); },
               "num_attention_heads (3) must be a multiple of num_query_groups (2)");
  const auto f = fwd(q, kv, kv, 2, std::nullopt);
  expect_error([&] { dot_product_attention_backward(cfg, q, kv, kv, f, Mat::Zero(6, 4), kTruth); }, "d_output");
}

TEST(DotProductAttention, RecordsTaps) {
  const TransformerConfig cfg = config(2, 1, 2);
  MatMap taps;
  const Mat q = random_normal(3, 4, 1, "q"), k = random_normal(3, 2, 1, "k"), v = random_normal(3, 2, 1, "v");
  const auto f = dot_product_attention_forward(cfg, q, k, v, 1, AttnMaskType::causal, std::nullopt, kTruth, {},
                                               Sink(taps, "core_attention."));
  EXPECT_EQ(taps.at("core_attention.query"), q);
  EXPECT_EQ(taps.at("core_attention.key"), k);
  EXPECT_EQ(taps.at("core_attention.value"), v);
  EXPECT_EQ(taps.at("core_attention.output"), f.output);
  EXPECT_EQ(taps.at("core_attention.scale_mask_softmax.output"), f.probs);
  EXPECT_EQ(taps.count("core_attention.attention_dropout.output"), 0u);
}

}  // namespace
}  // namespace paritron::ref
