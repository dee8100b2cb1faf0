// Tests of reference/core: round_to for every emulated dtype (ties to even,
// subnormals, overflow), matmul in float64 against the emulated GEMM (fp32
// accumulation, alpha before the single rounding), emulated_precision,
// Params/Sink key handling and errors, RunContext paths and RNG keys, the
// counter-based dropout (identity cases, keep rate, scale, determinism by
// (seed, path, purpose, index), slices via first_index), Tensor <-> Mat.
// Every expected value is derived by hand in the comment above it.
#include "reference/core.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/math/random.h"
#include "common/rng.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

const double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------
// round_to

// F64 is the identity (0.1 is not rounded anywhere).
// F32: 24 significant bits. 1 + 2^-24 is halfway between 1 and 1 + 2^-23: ties
// to the even significand, 1. 1 + 3*2^-24 is halfway between 1 + 2^-23 (odd
// last bit) and 1 + 2^-22 (even): 1 + 2^-22. 0.1 -> 13421773 * 2^-27 =
// 0.100000001490116119384765625 (the float closest to 0.1).
TEST(CoreRoundTo, Float64AndFloat32) {
  EXPECT_EQ(round_to(0.1, DType::F64), 0.1);
  EXPECT_EQ(round_to(1 + 0x1p-30, DType::F64), 1 + 0x1p-30);
  EXPECT_EQ(round_to(1 + 0x1p-24, DType::F32), 1.0);
  EXPECT_EQ(round_to(1 + 3 * 0x1p-24, DType::F32), 1 + 0x1p-22);
  EXPECT_EQ(round_to(1 + 0x1p-23, DType::F32), 1 + 0x1p-23);  // representable: unchanged
  EXPECT_EQ(round_to(0.1, DType::F32), 13421773 * 0x1p-27);
  EXPECT_EQ(round_to(-(1 + 3 * 0x1p-24), DType::F32), -(1 + 0x1p-22));  // symmetric
}

// BF16: 8 significant bits (7 stored). 1 + 2^-8: tie between 1 and 1 + 2^-7,
// to even: 1. 1 + 3*2^-8: tie between 1 + 2^-7 (odd) and 1 + 2^-6: 1 + 2^-6.
// 0.1 = 1.6 * 2^-4; 1.6 * 128 = 204.8 -> 205: 205 * 2^-11 = 0.10009765625
// (bf16 0x3DCD). 1 + 2^-8 + 2^-20 is just above the tie: rounds up to 1 + 2^-7.
// Range as fp32: 1e30 / 2^99 = 1.57772, and 0.57772 * 128 = 73.95 -> 74, so
// 1e30 -> (1 + 74/128) * 2^99 = 1.578125 * 2^99 (bf16 0x714A), finite.
TEST(CoreRoundTo, BFloat16TiesToEven) {
  EXPECT_EQ(round_to(1 + 0x1p-8, DType::BF16), 1.0);
  EXPECT_EQ(round_to(1 + 3 * 0x1p-8, DType::BF16), 1 + 0x1p-6);
  EXPECT_EQ(round_to(1 + 0x1p-8 + 0x1p-20, DType::BF16), 1 + 0x1p-7);
  EXPECT_EQ(round_to(0.1, DType::BF16), 0.10009765625);
  EXPECT_EQ(round_to(-0.1, DType::BF16), -0.10009765625);
  EXPECT_TRUE(std::isfinite(round_to(1e30, DType::BF16)));
  EXPECT_EQ(round_to(1e30, DType::BF16), 1.578125 * 0x1p99);
}

// F16: 11 significant bits. 1 + 2^-11 ties to 1; 1 + 3*2^-11 ties to 1 + 2^-9.
// 0.1: 1.6 * 1024 = 1638.4 -> 1638: 1638 * 2^-14 = 0.0999755859375 (0x2E66).
// Subnormals: the smallest is 2^-24; 2^-25 is the tie between 0 and 2^-24 (to
// even: 0); 3*2^-26 = 0.75 * 2^-24 rounds to 2^-24. Overflow: max 65504 (odd
// significand 0x3FF); 65520 = max + ulp/2 is a tie, to even = 65536 -> inf
// (no saturation); 65519 rounds down to 65504.
TEST(CoreRoundTo, Float16SubnormalsAndOverflow) {
  EXPECT_EQ(round_to(1 + 0x1p-11, DType::F16), 1.0);
  EXPECT_EQ(round_to(1 + 3 * 0x1p-11, DType::F16), 1 + 0x1p-9);
  EXPECT_EQ(round_to(0.1, DType::F16), 0.0999755859375);
  EXPECT_EQ(round_to(0x1p-25, DType::F16), 0.0);
  EXPECT_EQ(round_to(3 * 0x1p-26, DType::F16), 0x1p-24);
  EXPECT_EQ(round_to(65519, DType::F16), 65504);
  EXPECT_EQ(round_to(65520, DType::F16), kInf);
  EXPECT_EQ(round_to(-65520, DType::F16), -kInf);
}

// The Mat helpers round every element; rounded() leaves F64 alone.
TEST(CoreRoundTo, MatHelpersAndNonFloatDtype) {
  const Mat m = mat(1, 3, {1 + 0x1p-8, 1 + 3 * 0x1p-8, 0.1});
  EXPECT_EQ(rounded(m, DType::BF16), mat(1, 3, {1, 1 + 0x1p-6, 0.10009765625}));
  EXPECT_EQ(rounded(m, DType::F64), m);
  Mat n = m;
  round_inplace(n, DType::F16);
  EXPECT_EQ(n, mat(1, 3, {1 + 0x1p-8, 1 + 3 * 0x1p-8, 0.0999755859375}));  // 2^-8 steps are f16 values
  expect_error([] { round_to(1.5, DType::I32); }, "cannot round to");
}

// ---------------------------------------------------------------------------
// matmul

// F64: [[1, 2], [3, 4]] @ [[5, 6], [7, 8]] = [[19, 22], [43, 50]]; alpha 0.5
// halves it.
TEST(CoreMatmul, Float64IsPlainProduct) {
  const Mat a = mat(2, 2, {1, 2, 3, 4}), b = mat(2, 2, {5, 6, 7, 8});
  EXPECT_EQ(matmul(a, b, DType::F64), mat(2, 2, {19, 22, 43, 50}));
  EXPECT_EQ(matmul(a, b, DType::F64, 0.5), mat(2, 2, {9.5, 11, 21.5, 25}));
  // 1 + 2^-30 survives in float64 but not in float32 (24 bits): the fp32 sum of
  // 1 and 2^-30 rounds to 1 whatever the order.
  const Mat u = mat(1, 2, {1, 0x1p-30}), ones = mat(2, 1, {1, 1});
  EXPECT_EQ(matmul(u, ones, DType::F64)(0, 0), 1 + 0x1p-30);
  EXPECT_EQ(matmul(u, ones, DType::F32)(0, 0), 1.0);
}

// BF16 GEMM = fp32 accumulation, then one rounding:
//  [1, 2^-8, 2^-8] . [1, 1, 1]: the fp32 sum is exactly 1 + 2^-7 (a bf16
//  value) in any order; a bf16 accumulator would give 1 (1 + 2^-8 ties to 1,
//  twice).
//  [1, 3*2^-8] . [1, 1] = 1 + 3*2^-8 in fp32, then the single rounding ties to
//  even: 1 + 2^-6.
//  alpha before the rounding: [1, 2^-8] . [1, 1] = 1 + 2^-8 in fp32; times 3
//  = 3 + 3*2^-8 = 3.01171875 (exact in fp32); bf16 spacing in [2, 4) is 2^-6,
//  3.01171875 = 3 + 0.75 ulp -> 3.015625. Rounding first would give
//  round(1 + 2^-8) * 3 = 3.
TEST(CoreMatmul, EmulatedAccumulatesInFloat32AndRoundsOnce) {
  EXPECT_EQ(matmul(mat(1, 3, {1, 0x1p-8, 0x1p-8}), mat(3, 1, {1, 1, 1}), DType::BF16)(0, 0), 1 + 0x1p-7);
  EXPECT_EQ(matmul(mat(1, 2, {1, 3 * 0x1p-8}), mat(2, 1, {1, 1}), DType::BF16)(0, 0), 1 + 0x1p-6);
  EXPECT_EQ(matmul(mat(1, 2, {1, 0x1p-8}), mat(2, 1, {1, 1}), DType::BF16)(0, 0), 1.0);
  EXPECT_EQ(matmul(mat(1, 2, {1, 0x1p-8}), mat(2, 1, {1, 1}), DType::BF16, 3.0)(0, 0), 3.015625);
  EXPECT_EQ(matmul(mat(1, 2, {1, 0x1p-8}), mat(2, 1, {1, 1}), DType::F64, 3.0)(0, 0), 3 + 3 * 0x1p-8);
  // F16 the same way: [1, 2^-11, 2^-11] sums to 1 + 2^-10 (an f16 value).
  EXPECT_EQ(matmul(mat(1, 3, {1, 0x1p-11, 0x1p-11}), mat(3, 1, {1, 1, 1}), DType::F16)(0, 0), 1 + 0x1p-10);
  // Shapes of the product.
  const Mat c = matmul(Mat::Ones(3, 4), Mat::Ones(4, 2), DType::BF16);
  EXPECT_EQ(c, Mat::Constant(3, 2, 4.0));
}

TEST(CoreMatmul, ShapeMismatchIsAnError) {
  expect_error([] { matmul(Mat::Ones(1, 2), Mat::Ones(3, 1), DType::F64); }, "matmul of [1, 2] and [3, 1]");
  EXPECT_THROW(matmul(Mat::Ones(2, 2), Mat::Ones(3, 2), DType::BF16), Error);
}

// ---------------------------------------------------------------------------
// Precision

// emulated_precision (spec §2.3): the softmax is upcast to fp32 only for
// fp16/bf16 with attention_softmax_in_fp32; fp32 and fp64 keep their dtype;
// fp8 fields come from the config.
TEST(CorePrecision, EmulatedPrecisionSoftmaxDtypeAndFp8) {
  TransformerConfig cfg;
  EXPECT_TRUE(truth_precision().truth());
  EXPECT_EQ(truth_precision().dtype, DType::F64);
  EXPECT_EQ(emulated_precision(DType::BF16, cfg).softmax_dtype, DType::F32);
  EXPECT_EQ(emulated_precision(DType::F16, cfg).softmax_dtype, DType::F32);
  EXPECT_EQ(emulated_precision(DType::F32, cfg).softmax_dtype, DType::F32);
  EXPECT_EQ(emulated_precision(DType::F64, cfg).softmax_dtype, DType::F64);
  EXPECT_TRUE(emulated_precision(DType::F64, cfg).truth());
  cfg.attention_softmax_in_fp32 = false;
  EXPECT_EQ(emulated_precision(DType::BF16, cfg).softmax_dtype, DType::BF16);
  cfg.fp8 = "hybrid";
  cfg.fp8_margin = 2;
  cfg.fp8_wgrad = false;
  const Precision p = emulated_precision(DType::BF16, cfg);
  EXPECT_EQ(p.fp8, std::optional<std::string>("hybrid"));
  EXPECT_EQ(p.fp8_margin, 2);
  EXPECT_FALSE(p.fp8_wgrad);
  EXPECT_FALSE(emulated_precision(DType::F64, cfg).truth());  // fp8 is not the truth
  expect_error([&] { emulated_precision(DType::F8_E4M3, cfg); }, "F8_E4M3");
  EXPECT_THROW(emulated_precision(DType::I64, cfg), Error);
}

// ---------------------------------------------------------------------------
// Params / Sink

// A submodule view addresses tensors by local names; errors name the full key.
TEST(CoreParams, PrefixedViewAndErrorsNameTheFullKey) {
  MatMap m{{"layers.0.mlp.linear_fc1.weight", mat(2, 3, {1, 2, 3, 4, 5, 6})},
           {"layers.0.mlp.linear_fc1.bias", mat(1, 2, {7, 8})}};
  const Params p = Params(m).sub("layers.0").sub("mlp");
  EXPECT_EQ(p.prefix(), "layers.0.mlp.");
  EXPECT_EQ(Params(m, "layers.0.mlp.").prefix(), "layers.0.mlp.");
  EXPECT_TRUE(p.has("linear_fc1.weight"));
  EXPECT_FALSE(p.has("linear_fc2.weight"));
  EXPECT_FALSE(Params(m).has("linear_fc1.weight"));  // the root view needs the full key
  EXPECT_TRUE(Params(m).has("layers.0.mlp.linear_fc1.bias"));
  EXPECT_EQ(p.at("linear_fc1.weight"), mat(2, 3, {1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(p.at("linear_fc1.weight", 2, 3)(1, 2), 6);
  EXPECT_EQ(Mat(p.row("linear_fc1.bias")), mat(1, 2, {7, 8}));
  EXPECT_EQ(Mat(p.row("linear_fc1.bias", 2)), mat(1, 2, {7, 8}));

  expect_error([&] { p.at("linear_fc2.weight"); }, "missing parameter 'layers.0.mlp.linear_fc2.weight'");
  expect_error([&] { p.sub("linear_fc2").at("weight"); }, "'layers.0.mlp.linear_fc2.weight'");
  expect_error([&] { p.at("linear_fc1.weight", 3, 2); },
               "'layers.0.mlp.linear_fc1.weight' has shape [2, 3], expected [3, 2]");
  expect_error([&] { p.row("linear_fc1.bias", 3); }, "'layers.0.mlp.linear_fc1.bias' has shape [1, 2]");
  expect_error([&] { p.row("linear_fc1.weight"); }, "'layers.0.mlp.linear_fc1.weight'");  // 2 rows: not a vector
  expect_error([&] { p.row("missing"); }, "'layers.0.mlp.missing'");
}

// Gradients accumulate under the full key, taps are replaced; a mismatched
// accumulation names the key; a default Sink drops everything.
TEST(CoreSink, AccumulatesGradientsAndReplacesTaps) {
  MatMap g;
  const Sink s = Sink(g).sub("layers.1").sub("mlp");
  EXPECT_TRUE(s.active());
  EXPECT_EQ(s.prefix(), "layers.1.mlp.");
  s.add("linear_fc2.weight", mat(1, 2, {1, 2}));
  s.add("linear_fc2.weight", mat(1, 2, {10, 20}));
  s.add_row("linear_fc2.bias", RowVec(mat(1, 2, {0.5, 0.25}).row(0)));
  s.add_row("linear_fc2.bias", RowVec(mat(1, 2, {0.5, 0.25}).row(0)));
  EXPECT_EQ(g.at("layers.1.mlp.linear_fc2.weight"), mat(1, 2, {11, 22}));
  EXPECT_EQ(g.at("layers.1.mlp.linear_fc2.bias"), mat(1, 2, {1, 0.5}));
  s.put("output", mat(1, 1, {3}));
  s.put("output", mat(1, 1, {4}));
  EXPECT_EQ(g.at("layers.1.mlp.output"), mat(1, 1, {4}));
  EXPECT_EQ(g.size(), 3u);
  expect_error([&] { s.add("linear_fc2.weight", Mat::Ones(2, 1)); }, "'layers.1.mlp.linear_fc2.weight'");
  EXPECT_EQ(g.at("layers.1.mlp.linear_fc2.weight"), mat(1, 2, {11, 22}));  // untouched by the failed add

  Sink explicit_prefix(g, "final_layernorm.");
  explicit_prefix.add("weight", mat(1, 1, {2}));
  EXPECT_EQ(g.at("final_layernorm.weight"), mat(1, 1, {2}));

  const Sink none;
  EXPECT_FALSE(none.active());
  EXPECT_FALSE(none.sub("x").active());
  EXPECT_NO_THROW(none.add("w", Mat::Ones(1, 1)));
  EXPECT_NO_THROW(none.put("w", Mat::Ones(2, 2)));
}

// ---------------------------------------------------------------------------
// RunContext and dropout

// Paths join with '.', the root has none; key(purpose) is
// rng_key(seed, "<purpose>.<path>"), or rng_key(seed, purpose) at the root.
TEST(CoreRunContext, PathsAndKeys) {
  RunContext ctx;
  ctx.seed = 42;
  ctx.layer_number = 5;
  const RunContext c = ctx.sub("layers.0").sub("self_attention");
  EXPECT_EQ(c.path, "layers.0.self_attention");
  EXPECT_EQ(c.seed, 42u);
  EXPECT_EQ(c.layer_number, 5);
  EXPECT_EQ(c.key("dropout"), rng_key(42, "dropout.layers.0.self_attention"));
  EXPECT_EQ(ctx.key("dropout"), rng_key(42, "dropout"));
  EXPECT_FALSE(c.key("dropout") == rng_key(43, "dropout.layers.0.self_attention"));
}

// Not training, or p = 0: the input itself and a scale of ones.
TEST(CoreDropout, IdentityInEvalOrWithZeroP) {
  const Mat x = mat(2, 3, {1, -2, 3, 0.5, 0, -7});
  RunContext eval;
  eval.seed = 1;
  Mat scale;
  EXPECT_EQ(dropout(x, 0.5, eval, "dropout", &scale), x);
  EXPECT_EQ(scale, Mat::Ones(2, 3));
  RunContext train = eval;
  train.training = true;
  Mat scale0 = Mat::Zero(1, 1);
  EXPECT_EQ(dropout(x, 0.0, train, "dropout", &scale0), x);
  EXPECT_EQ(scale0, Mat::Ones(2, 3));
  // p = 1 drops everything (torch gives zeros).
  Mat scale1;
  EXPECT_EQ(dropout(x, 1.0, train, "dropout", &scale1), Mat::Zero(2, 3));
  EXPECT_EQ(scale1, Mat::Zero(2, 3));
}

// p = 0.25 over 40000 elements: the kept fraction is 0.75 up to binomial
// noise (std sqrt(0.25 * 0.75 / 40000) = 0.0022; 0.01 is 4.6 sigma); every
// kept value is x / (1 - p) = 4x/3 and every dropped one 0; p = 0.5 doubles
// exactly.
TEST(CoreDropout, KeepRateAndInvertedScale) {
  RunContext train;
  train.training = true;
  train.seed = 7;
  train.path = "layers.0";
  const int64_t rows = 200, cols = 200;
  Mat x(rows, cols);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = 1.0 + static_cast<double>(i % 13);
  Mat scale;
  const Mat y = dropout(x, 0.25, train, "dropout", &scale);
  int64_t kept = 0;
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    if (scale.data()[i] != 0.0) {
      ++kept;
      ASSERT_DOUBLE_EQ(scale.data()[i], 4.0 / 3.0);
      ASSERT_DOUBLE_EQ(y.data()[i], x.data()[i] * 4.0 / 3.0);
    } else {
      ASSERT_EQ(y.data()[i], 0.0);
    }
  }
  const double rate = static_cast<double>(kept) / static_cast<double>(x.size());
  EXPECT_NEAR(rate, 0.75, 0.01);

  const Mat y2 = dropout(x, 0.5, train, "dropout", &scale);
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    ASSERT_TRUE(y2.data()[i] == 0.0 || y2.data()[i] == 2 * x.data()[i]) << i;
  }
  EXPECT_NEAR(scale.mean(), 1.0, 0.02);  // E[scale] = (1 - p) / (1 - p) = 1
}

// Element i is kept iff uniform_float(rng_key(seed, "<purpose>.<path>"), i) >= p
// (core.h, spec §10.9): checked element by element, and the mask changes with
// the seed, the path and the purpose but not with the values.
TEST(CoreDropout, MaskIsAFunctionOfSeedPathPurposeAndIndex) {
  RunContext ctx;
  ctx.training = true;
  ctx.seed = 1234;
  ctx.path = "layers.3.self_attention.core_attention";
  const Mat x = Mat::Ones(16, 16);
  const double p = 0.3;
  Mat scale;
  dropout(x, p, ctx, "dropout", &scale);
  const RngKey key = rng_key(1234, "dropout.layers.3.self_attention.core_attention");
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    const bool keep = static_cast<double>(math::uniform_float(key, static_cast<uint64_t>(i))) >= p;
    ASSERT_EQ(scale.data()[i] != 0.0, keep) << i;
  }
  auto mask_of = [&](const RunContext& c, std::string_view purpose, const Mat& values) {
    Mat s;
    dropout(values, p, c, purpose, &s);
    return s;
  };
  EXPECT_EQ(mask_of(ctx, "dropout", Mat::Constant(16, 16, -3.0)), scale);  // values do not matter
  RunContext other_seed = ctx, other_path = ctx;
  other_seed.seed = 1235;
  other_path.path = "layers.4.self_attention.core_attention";
  EXPECT_NE(mask_of(other_seed, "dropout", x), scale);
  EXPECT_NE(mask_of(other_path, "dropout", x), scale);
  EXPECT_NE(mask_of(ctx, "self_attn_bda", x), scale);
  EXPECT_EQ(mask_of(ctx, "dropout", x), scale);  // deterministic
}

// A slice of rows [2, 5) of a 6 x 5 global tensor passes first_index = 2 * 5
// and gets exactly those rows of the global mask; the mask depends only on
// the flat index, so viewing the same tensor as 10 x 3 gives the same flat mask.
TEST(CoreDropout, FirstIndexSelectsTheSliceOfTheGlobalMask) {
  RunContext ctx;
  ctx.training = true;
  ctx.seed = 99;
  ctx.path = "p";
  Mat global_scale, slice_scale, reshaped_scale;
  dropout(Mat::Ones(6, 5), 0.5, ctx, "dropout", &global_scale);
  dropout(Mat::Ones(3, 5), 0.5, ctx, "dropout", &slice_scale, 10);
  EXPECT_EQ(slice_scale, Mat(global_scale.block(2, 0, 3, 5)));
  EXPECT_NE(slice_scale, Mat(global_scale.block(0, 0, 3, 5)));
  dropout(Mat::Ones(10, 3), 0.5, ctx, "dropout", &reshaped_scale);
  for (Eigen::Index i = 0; i < 30; ++i) EXPECT_EQ(reshaped_scale.data()[i], global_scale.data()[i]) << i;
}

// The keep rate over random seeds and p, and determinism by element index:
// the last element of a long tensor equals a one-element draw at that index.
RC_GTEST_PROP(CoreDropoutProperty, KeepRateAndIndexDeterminism, ()) {
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const double p = *rc::gen::elementOf(std::vector<double>{0.05, 0.1, 0.3, 0.5, 0.7, 0.9});
  RunContext ctx;
  ctx.training = true;
  ctx.seed = seed;
  ctx.path = *rc::gen::elementOf(std::vector<std::string>{"", "layers.0", "layers.11.mlp"});
  const int64_t n = 20000;
  Mat scale;
  dropout(Mat::Ones(1, n), p, ctx, "dropout", &scale);
  const double kept = static_cast<double>((scale.array() != 0.0).count()) / static_cast<double>(n);
  RC_ASSERT(std::abs(kept - (1 - p)) <= 5 * std::sqrt(p * (1 - p) / static_cast<double>(n)));
  const uint64_t index = *rc::gen::inRange<uint64_t>(0, static_cast<uint64_t>(n));
  Mat one;
  dropout(Mat::Ones(1, 1), p, ctx, "dropout", &one, index);
  RC_ASSERT(one(0, 0) == scale(0, static_cast<Eigen::Index>(index)));
}

// ---------------------------------------------------------------------------
// Tensor <-> Mat

// A [2, 3] tensor holding 0..5 is the Mat [[0, 1, 2], [3, 4, 5]] (row-major,
// last dimension as columns), or [[0, 1], [2, 3], [4, 5]] as rows of 2.
TEST(CoreTensorMat, ViewsAndShapeErrors) {
  Tensor t(DType::F64, {2, 3});
  for (int64_t i = 0; i < 6; ++i) t.set(i, static_cast<double>(i));
  EXPECT_EQ(to_mat(t), mat(2, 3, {0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(to_mat(t, 2), mat(3, 2, {0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(to_mat(t, 6), mat(1, 6, {0, 1, 2, 3, 4, 5}));
  expect_error([&] { to_mat(t, 4); }, "cannot view a tensor of shape [2, 3] as rows of 4");
  EXPECT_THROW(to_mat(t, 0), Error);
  EXPECT_THROW(to_mat(t, -3), Error);
  // 0-d: one 1 x 1 row; 1-d: one row.
  Tensor scalar(DType::F32, {});
  scalar.set(0, 2.5);
  EXPECT_EQ(to_mat(scalar), mat(1, 1, {2.5}));
  Tensor vec(DType::F64, {4});
  for (int64_t i = 0; i < 4; ++i) vec.set(i, 10.0 + static_cast<double>(i));
  EXPECT_EQ(to_mat(vec), mat(1, 4, {10, 11, 12, 13}));

  const Mat m = mat(2, 3, {0, 1, 2, 3, 4, 5});
  const Tensor back = to_tensor(m, {3, 2});
  EXPECT_EQ(back.shape(), (Shape{3, 2}));
  EXPECT_EQ(back.dtype(), DType::F64);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(back.get(i), static_cast<double>(i));
  expect_error([&] { to_tensor(m, {4, 2}); }, "cannot store a [2, 3] matrix as shape [4, 2]");
  EXPECT_THROW(to_tensor(m, {5}), Error);
  // A low-precision tensor stores rounded values: 1 + 2^-8 ties to 1 in bf16.
  const Tensor b16 = to_tensor(mat(1, 2, {1 + 0x1p-8, 0.1}), {2}, DType::BF16);
  EXPECT_EQ(b16.dtype(), DType::BF16);
  EXPECT_EQ(b16.get(0), 1.0);
  EXPECT_EQ(b16.get(1), 0.10009765625);
}

}  // namespace
}  // namespace paritron::ref
