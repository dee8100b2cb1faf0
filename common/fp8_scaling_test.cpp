// Tests of FP8 delayed scaling (common/fp8_scaling.{h,cpp}, common/math/fp8.h)
// against hand-computed values from Transformer Engine 1.x's rules
// (pytorch/fp8.py amax_and_scale_update, common/recipe/delayed_scaling.cu, the
// cast kernels) and the recipe Megatron core_v0.5.0 builds in
// transformer_block.py. Spec: shared/spec/megatron-semantics.md §12, Appendix A.
#include "common/fp8_scaling.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/error.h"
#include "common/math/fp8.h"
#include "common/transformer_config.h"

namespace paritron {
namespace {

using math::kFloat8E4M3;
using math::kFloat8E5M2;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

DelayedScalingRecipe recipe_with(int64_t history_len, AmaxComputeAlgo algo, int margin = 0, int64_t interval = 1,
                                 Fp8Format format = Fp8Format::kE4M3) {
  DelayedScalingRecipe r;
  r.amax_history_len = history_len;
  r.amax_compute_algo = algo;
  r.margin = margin;
  r.interval = interval;
  r.fp8_format = format;
  return r;
}

// ---------------------------------------------------------------- formats

TEST(Fp8Format, ParsesMegatronStringsAndRejectsOthers) {
  EXPECT_EQ(parse_fp8_format("e4m3"), Fp8Format::kE4M3);
  EXPECT_EQ(parse_fp8_format("hybrid"), Fp8Format::kHybrid);
  for (const char* bad : {"E4M3", "e5m2", "", "hybrid "}) {
    try {
      parse_fp8_format(bad);
      ADD_FAILURE() << "accepted " << bad;
    } catch (const ConfigError& e) {
      ASSERT_EQ(e.issues().size(), 1u);
      EXPECT_EQ(e.issues()[0].field, "fp8");
      EXPECT_NE(std::string(e.what()).find("E4M3 and HYBRID"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(fp8_format_name(Fp8Format::kHybrid), "hybrid");
  EXPECT_EQ(parse_amax_compute_algo("most_recent"), AmaxComputeAlgo::kMostRecent);
  EXPECT_EQ(parse_amax_compute_algo("max"), AmaxComputeAlgo::kMax);
  EXPECT_THROW(parse_amax_compute_algo("mean"), ConfigError);
  EXPECT_EQ(amax_compute_algo_name(AmaxComputeAlgo::kMax), "max");
}

TEST(Fp8Format, RoleFormats) {
  for (Fp8Role role : {Fp8Role::kInput, Fp8Role::kWeight, Fp8Role::kGradOutput}) {
    EXPECT_EQ(&fp8_float_format(Fp8Format::kE4M3, role), &kFloat8E4M3);
    EXPECT_EQ(fp8_dtype(Fp8Format::kE4M3, role), DType::F8_E4M3);
    EXPECT_EQ(fp8_max(Fp8Format::kE4M3, role), 448.0f);
  }
  EXPECT_EQ(&fp8_float_format(Fp8Format::kHybrid, Fp8Role::kInput), &kFloat8E4M3);
  EXPECT_EQ(&fp8_float_format(Fp8Format::kHybrid, Fp8Role::kWeight), &kFloat8E4M3);
  EXPECT_EQ(&fp8_float_format(Fp8Format::kHybrid, Fp8Role::kGradOutput), &kFloat8E5M2);
  EXPECT_EQ(fp8_dtype(Fp8Format::kHybrid, Fp8Role::kGradOutput), DType::F8_E5M2);
  EXPECT_EQ(fp8_max(Fp8Format::kHybrid, Fp8Role::kInput), 448.0f);
  EXPECT_EQ(fp8_max(Fp8Format::kHybrid, Fp8Role::kGradOutput), 57344.0f);
  EXPECT_EQ(math::fp8_max(kFloat8E4M3), 448.0f);
  EXPECT_EQ(math::fp8_max(kFloat8E5M2), 57344.0f);
}

// ---------------------------------------------------------------- recipe

TEST(Fp8Recipe, DefaultsAreTransformerEngines) {
  const DelayedScalingRecipe r;
  EXPECT_EQ(r.margin, 0);
  EXPECT_EQ(r.interval, 1);
  EXPECT_EQ(r.fp8_format, Fp8Format::kHybrid);
  EXPECT_EQ(r.amax_history_len, 1024);
  EXPECT_EQ(r.amax_compute_algo, AmaxComputeAlgo::kMax);
  EXPECT_TRUE(r.gemm_in_fp8(Fp8Gemm::kFprop));
  EXPECT_TRUE(r.gemm_in_fp8(Fp8Gemm::kDgrad));
  EXPECT_TRUE(r.gemm_in_fp8(Fp8Gemm::kWgrad));
  EXPECT_TRUE(r.reduce_amax);
}

TEST(Fp8Recipe, BuiltFromConfigLikeMegatron) {
  TransformerConfig c;
  c.fp8 = "hybrid";
  c.fp8_margin = 2;
  c.fp8_interval = 3;
  c.fp8_amax_history_len = 16;
  c.fp8_amax_compute_algo = "max";
  c.fp8_wgrad = false;
  const DelayedScalingRecipe r = delayed_scaling_recipe(c);
  EXPECT_EQ(r.fp8_format, Fp8Format::kHybrid);
  EXPECT_EQ(r.margin, 2);
  EXPECT_EQ(r.interval, 3);
  EXPECT_EQ(r.amax_history_len, 16);
  EXPECT_EQ(r.amax_compute_algo, AmaxComputeAlgo::kMax);
  EXPECT_FALSE(r.override_linear_precision.fprop);
  EXPECT_FALSE(r.override_linear_precision.dgrad);
  EXPECT_TRUE(r.override_linear_precision.wgrad);  // not fp8_wgrad
  EXPECT_TRUE(r.gemm_in_fp8(Fp8Gemm::kFprop));
  EXPECT_TRUE(r.gemm_in_fp8(Fp8Gemm::kDgrad));
  EXPECT_FALSE(r.gemm_in_fp8(Fp8Gemm::kWgrad));
  EXPECT_EQ(r.fp8_max(Fp8Role::kGradOutput), 57344.0f);

  // Megatron's own defaults: e4m3, margin 0, interval 1, history 1, most_recent, wgrad in fp8.
  TransformerConfig d;
  d.fp8 = "e4m3";
  const DelayedScalingRecipe m = delayed_scaling_recipe(d);
  EXPECT_EQ(m.fp8_format, Fp8Format::kE4M3);
  EXPECT_EQ(m.margin, 0);
  EXPECT_EQ(m.interval, 1);
  EXPECT_EQ(m.amax_history_len, 1);
  EXPECT_EQ(m.amax_compute_algo, AmaxComputeAlgo::kMostRecent);
  EXPECT_TRUE(m.gemm_in_fp8(Fp8Gemm::kWgrad));
}

TEST(Fp8Recipe, InvalidConfigsThrow) {
  TransformerConfig off;
  EXPECT_THROW(delayed_scaling_recipe(off), ConfigError);  // fp8 unset
  auto with = [](auto edit) {
    TransformerConfig c;
    c.fp8 = "e4m3";
    edit(c);
    return c;
  };
  EXPECT_THROW(delayed_scaling_recipe(with([](TransformerConfig& c) { c.fp8 = "e5m2"; })), ConfigError);
  EXPECT_THROW(delayed_scaling_recipe(with([](TransformerConfig& c) { c.fp8_interval = 0; })), ConfigError);
  EXPECT_THROW(delayed_scaling_recipe(with([](TransformerConfig& c) { c.fp8_amax_history_len = 0; })),
               ConfigError);
  EXPECT_THROW(delayed_scaling_recipe(with([](TransformerConfig& c) { c.fp8_margin = 128; })), ConfigError);
  EXPECT_THROW(delayed_scaling_recipe(with([](TransformerConfig& c) { c.fp8_amax_compute_algo = "avg"; })),
               ConfigError);
  DelayedScalingRecipe r;
  r.override_linear_precision.dgrad = true;  // TE: only the wgrad override is supported
  EXPECT_THROW(r.validate(), ConfigError);
  EXPECT_THROW(DelayedScalingState{r}, ConfigError);
}

// ---------------------------------------------------------------- scale rule

TEST(Fp8Scale, HandComputedScales) {
  EXPECT_EQ(scale_for_amax(3.5f, kFloat8E4M3, 0), 128.0f);  // 448 / 3.5
  EXPECT_EQ(scale_for_amax(3.5f, kFloat8E4M3, 1), 64.0f);   // / 2^1
  EXPECT_EQ(scale_for_amax(3.5f, kFloat8E4M3, 3), 16.0f);
  EXPECT_EQ(scale_for_amax(3.5f, kFloat8E5M2, 0), 16384.0f);  // 57344 / 3.5
  EXPECT_EQ(scale_for_amax(448.0f, kFloat8E4M3, 0), 1.0f);
  EXPECT_EQ(scale_for_amax(0.5f, kFloat8E4M3, -1), 1792.0f);  // negative margin: * 2
  // 448 / 3 = 149.333..., rounded to fp32: 0x43155555 = 149.33332824707031.
  EXPECT_EQ(scale_for_amax(3.0f, kFloat8E4M3, 0), 149.33332824707031f);
  EXPECT_EQ(math::bits_of(scale_for_amax(3.0f, kFloat8E4M3, 0)), 0x43155555u);
  // Hybrid recipe: grad-output uses E5M2's 57344, forward tensors 448.
  const DelayedScalingRecipe hybrid = recipe_with(1, AmaxComputeAlgo::kMostRecent, 0, 1, Fp8Format::kHybrid);
  EXPECT_EQ(scale_for_amax(7.0f, hybrid, Fp8Role::kGradOutput), 8192.0f);
  EXPECT_EQ(scale_for_amax(7.0f, hybrid, Fp8Role::kWeight), 64.0f);
  // amax 0 / negative / inf / NaN keep the previous scale.
  EXPECT_EQ(scale_for_amax(0.0f, kFloat8E4M3, 0, 5.0f), 5.0f);
  EXPECT_EQ(scale_for_amax(-0.0f, kFloat8E4M3, 0, 5.0f), 5.0f);
  EXPECT_EQ(scale_for_amax(kInf, kFloat8E4M3, 0, 5.0f), 5.0f);
  EXPECT_EQ(scale_for_amax(kNaN, kFloat8E4M3, 0, 5.0f), 5.0f);
  EXPECT_EQ(scale_for_amax(0.0f, kFloat8E4M3, 0), 1.0f);
  // A finite amax so small that 448 / amax overflows fp32: TE's division gives inf.
  EXPECT_EQ(scale_for_amax(1e-38f, kFloat8E4M3, 0), kInf);
  EXPECT_THROW(scale_for_amax(1.0f, kFloat8E4M3, 128), Error);
}

// ---------------------------------------------------------------- amax bookkeeping

TEST(Fp8Meta, RecordAmaxTakesTheMaxWithinAStep) {
  Fp8TensorMeta m(3);
  EXPECT_EQ(m.scale, 1.0f);
  EXPECT_EQ(m.scale_inv, 1.0f);
  EXPECT_EQ(m.amax_history, (std::vector<float>{0, 0, 0}));
  record_amax(m, 2.0f);
  record_amax(m, 1.0f);
  EXPECT_EQ(m.amax_history, (std::vector<float>{2, 0, 0}));
  record_amax(m, 5.0f);
  EXPECT_EQ(m.amax_history, (std::vector<float>{5, 0, 0}));
  record_amax(m, kInf);
  EXPECT_EQ(m.amax_history[0], kInf);
  EXPECT_THROW(record_amax(m, -1.0f), Error);
  Fp8TensorMeta n(1);
  record_amax(n, kNaN);  // atomicMaxFloat on the bits: NaN sticks
  record_amax(n, 3.0f);
  EXPECT_TRUE(std::isnan(n.amax_history[0]));
  EXPECT_THROW(Fp8TensorMeta(0), Error);
}

TEST(Fp8Meta, RollMatchesTorchRollThenZero) {
  Fp8TensorMeta m(4);
  m.amax_history = {1, 2, 3, 4};
  roll_amax_history(m);
  EXPECT_EQ(m.amax_history, (std::vector<float>{0, 3, 4, 1}));  // roll(-1) = {2,3,4,1}, slot 0 zeroed
  Fp8TensorMeta one(1);
  one.amax_history = {7};
  roll_amax_history(one);
  EXPECT_EQ(one.amax_history, (std::vector<float>{0}));
}

TEST(Fp8Meta, HistoryAmax) {
  Fp8TensorMeta m(3);
  m.amax_history = {1, 4, 2};
  EXPECT_EQ(history_amax(m, AmaxComputeAlgo::kMostRecent), 1.0f);
  EXPECT_EQ(history_amax(m, AmaxComputeAlgo::kMax), 4.0f);
  m.amax_history = {1, kNaN, 2};
  EXPECT_TRUE(std::isnan(history_amax(m, AmaxComputeAlgo::kMax)));  // torch.max propagates NaN
  EXPECT_EQ(history_amax(m, AmaxComputeAlgo::kMostRecent), 1.0f);
}

// L_h = 3 over several steps, amaxes 2, 8, 4, 1 (E4M3, margin 0).
TEST(Fp8Meta, HistoryRollMostRecent) {
  const DelayedScalingRecipe r = recipe_with(3, AmaxComputeAlgo::kMostRecent);
  Fp8TensorMeta m(3);
  record_amax(m, 2.0f);
  update_scale(m, r, Fp8Role::kInput);
  EXPECT_EQ(m.amax_history, (std::vector<float>{0, 0, 2}));
  EXPECT_EQ(m.scale, 224.0f);
  EXPECT_EQ(m.scale_inv, 1.0f / 224.0f);
  record_amax(m, 8.0f);
  update_scale(m, r, Fp8Role::kInput);
  EXPECT_EQ(m.amax_history, (std::vector<float>{0, 2, 8}));
  EXPECT_EQ(m.scale, 56.0f);
  record_amax(m, 4.0f);
  update_scale(m, r, Fp8Role::kInput);
  EXPECT_EQ(m.amax_history, (std::vector<float>{0, 8, 4}));
  EXPECT_EQ(m.scale, 112.0f);
  record_amax(m, 1.0f);
  update_scale(m, r, Fp8Role::kInput);
  EXPECT_EQ(m.amax_history, (std::vector<float>{0, 4, 1}));
  EXPECT_EQ(m.scale, 448.0f);
  EXPECT_EQ(m.scale_inv, 1.0f / 448.0f);
}

// Same amaxes with "max": the window is the last 3 recorded amaxes.
TEST(Fp8Meta, HistoryRollMax) {
  const DelayedScalingRecipe r = recipe_with(3, AmaxComputeAlgo::kMax);
  Fp8TensorMeta m(3);
  const float amaxes[] = {2, 8, 4, 1, 0.5f, 0.25f};
  const float scales[] = {224, 56, 56, 56, 112, 448};  // max of {2}, {2,8}, {2,8,4}, {8,4,1}, {4,1,.5}, {1,.5,.25}
  const std::vector<float> histories[] = {{0, 0, 2}, {0, 2, 8},    {0, 8, 4},
                                          {0, 4, 1}, {0, 1, 0.5f}, {0, 0.5f, 0.25f}};
  for (int t = 0; t < 6; ++t) {
    record_amax(m, amaxes[t]);
    update_scale(m, r, Fp8Role::kWeight);
    EXPECT_EQ(m.scale, scales[t]) << "step " << t + 1;
    EXPECT_EQ(m.amax_history, histories[t]) << "step " << t + 1;
  }
  Fp8TensorMeta wrong(2);
  EXPECT_THROW(update_scale(wrong, r, Fp8Role::kInput), Error);
}

TEST(Fp8Meta, ZeroInfNaNKeepTheScale) {
  const DelayedScalingRecipe r = recipe_with(1, AmaxComputeAlgo::kMostRecent);
  Fp8TensorMeta m(1);
  update_scale(m, r, Fp8Role::kInput);  // nothing recorded (amax 0): first-step scale 1 stays
  EXPECT_EQ(m.scale, 1.0f);
  EXPECT_EQ(m.scale_inv, 1.0f);
  record_amax(m, 3.5f);
  update_scale(m, r, Fp8Role::kInput);
  EXPECT_EQ(m.scale, 128.0f);
  for (float bad : {0.0f, kInf, kNaN}) {
    record_amax(m, bad);
    update_scale(m, r, Fp8Role::kInput);
    EXPECT_EQ(m.scale, 128.0f) << bad;
    EXPECT_EQ(m.scale_inv, 0.0078125f) << bad;
    EXPECT_EQ(m.amax_history[0], 0.0f) << bad;
  }
  record_amax(m, 7.0f);
  update_scale(m, r, Fp8Role::kInput);
  EXPECT_EQ(m.scale, 64.0f);

  // With "max" an inf stays in the window for L_h updates.
  const DelayedScalingRecipe r2 = recipe_with(2, AmaxComputeAlgo::kMax);
  Fp8TensorMeta w(2);
  record_amax(w, 3.5f);
  update_scale(w, r2, Fp8Role::kInput);
  EXPECT_EQ(w.scale, 128.0f);
  record_amax(w, kInf);
  update_scale(w, r2, Fp8Role::kInput);
  EXPECT_EQ(w.scale, 128.0f);
  record_amax(w, 1.0f);
  update_scale(w, r2, Fp8Role::kInput);  // window {1, inf}
  EXPECT_EQ(w.scale, 128.0f);
  record_amax(w, 1.0f);
  update_scale(w, r2, Fp8Role::kInput);  // window {1, 1}
  EXPECT_EQ(w.scale, 448.0f);
}

// ---------------------------------------------------------------- casts

TEST(Fp8Cast, QuantiseHandValuesE4M3) {
  const std::vector<float> x = {1.0f,   -1.0f,  448.0f,  464.0f, 500.0f,        1e6f, -1e6f,    kInf,
                                -kInf,  kNaN,   1.0625f, 1.1875f, 0.001953125f, 0.0009765625f, 0.0f, -0.0f};
  const std::vector<uint8_t> want = {0x38, 0xB8, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0x7E,
                                     0xFE, 0x7F, 0x38, 0x3A, 0x01, 0x00, 0x00, 0x80};
  // 1.0625 ties to even (1.0), 1.1875 ties to 1.25; 2^-9 is the smallest subnormal,
  // 2^-10 ties to 0; everything past 448 (and +-inf) saturates; NaN stays NaN.
  EXPECT_EQ(quantise(std::span<const float>(x), 1.0f, kFloat8E4M3), want);
}

TEST(Fp8Cast, QuantiseHandValuesE5M2) {
  const std::vector<float> x = {1.0f, 57344.0f, 60000.0f, kInf, -kInf, kNaN, 1.125f, 1.375f, 0.5f};
  const std::vector<uint8_t> want = {0x3C, 0x7B, 0x7B, 0x7B, 0xFB, 0x7E, 0x3C, 0x3E, 0x38};
  EXPECT_EQ(quantise(std::span<const float>(x), 1.0f, kFloat8E5M2), want);
}

TEST(Fp8Cast, ScaledQuantiseAndDequantise) {
  // amax 3.5 -> scale 128: 3.5 maps onto 448 exactly, 3.6 * 128 = 460.8 saturates.
  const float scale = scale_for_amax(3.5f, kFloat8E4M3, 0);
  const float scale_inv = 1.0f / scale;
  const std::vector<float> x = {3.5f, 3.6f, -3.5f, 1.0f, 0.01f};
  const auto q = quantise(std::span<const float>(x), scale, kFloat8E4M3);
  // 128 = 2^7 -> 0x70; 0.01 * 128 = 1.28 -> 1.25 (0x3A).
  EXPECT_EQ(q, (std::vector<uint8_t>{0x7E, 0x7E, 0xFE, 0x70, 0x3A}));
  EXPECT_EQ(dequantise(q, scale_inv, kFloat8E4M3), (std::vector<float>{3.5f, 3.5f, -3.5f, 1.0f, 0.009765625f}));
  EXPECT_EQ(fake_quant(std::span<const float>(x), scale, scale_inv, kFloat8E4M3),
            (std::vector<float>{3.5f, 3.5f, -3.5f, 1.0f, 0.009765625f}));
  // A non power-of-two scale: dequantise rounds q * scale_inv to fp32,
  // dequantise_exact keeps the exact product.
  const float s3 = scale_for_amax(3.0f, kFloat8E4M3, 0);  // 149.33333
  const float si3 = 1.0f / s3;
  const std::vector<float> y = {1.0f};
  const auto q3 = quantise(std::span<const float>(y), s3, kFloat8E4M3);
  EXPECT_EQ(q3[0], 0x71);  // 149.333 -> 144 = 2^7 * 1.125 (0x71); 160 is farther
  EXPECT_EQ(dequantise_exact(q3, si3, kFloat8E4M3)[0], 144.0 * static_cast<double>(si3));
  EXPECT_EQ(dequantise(q3, si3, kFloat8E4M3)[0], static_cast<float>(144.0 * static_cast<double>(si3)));
}

TEST(Fp8Cast, ProductIsRoundedToFp32BeforeTheFp8Rounding) {
  // x * 3 = 1.0625 + 5.96e-8 exactly: one rounding to e4m3 gives 1.125 (0x39),
  // but TE computes x * scale in fp32 first (= 1.0625, a tie) and then the tie
  // goes to even: 1.0 (0x38).
  const float x = math::float_from_bits(0x3EB55556u);
  EXPECT_GT(static_cast<double>(x) * 3.0, 1.0625);
  EXPECT_EQ(x * 3.0f, 1.0625f);
  EXPECT_EQ(math::encode(static_cast<double>(x) * 3.0, kFloat8E4M3, math::Saturation::kFinite), 0x39u);
  EXPECT_EQ(math::fp8_quantise(x, 3.0f, kFloat8E4M3), 0x38u);
  const std::vector<double> xd = {static_cast<double>(x)};
  EXPECT_EQ(quantise(std::span<const double>(xd), 3.0f, kFloat8E4M3), (std::vector<uint8_t>{0x38}));
}

TEST(Fp8Cast, ProductOverflowSaturates) {
  // 1e30 * 1e30 overflows fp32 to inf; finite saturation still gives max.
  EXPECT_EQ(math::fp8_quantise(1e30f, 1e30f, kFloat8E4M3), 0x7Eu);
  EXPECT_EQ(math::fp8_quantise(-1e30f, 1e30f, kFloat8E5M2), 0xFBu);
}

TEST(Fp8Cast, TensorAmax) {
  const std::vector<float> x = {1.0f, -3.0f, kNaN, 2.0f};
  EXPECT_EQ(tensor_amax(std::span<const float>(x)), 3.0f);  // NaN ignored (fmaxf)
  const std::vector<float> allnan = {kNaN, kNaN};
  EXPECT_EQ(tensor_amax(std::span<const float>(allnan)), 0.0f);
  const std::vector<float> withinf = {1.0f, -kInf};
  EXPECT_EQ(tensor_amax(std::span<const float>(withinf)), kInf);
  EXPECT_EQ(tensor_amax(std::span<const float>()), 0.0f);
  const std::vector<double> d = {0.1, -0.3};
  EXPECT_EQ(tensor_amax(std::span<const double>(d)), 0.3f);  // the fp32-rounded value
  const std::vector<double> big = {1e300};
  EXPECT_EQ(tensor_amax(std::span<const double>(big)), kInf);
}

TEST(Fp8Cast, TensorForms) {
  const std::vector<double> v = {3.5, -1.0, 0.01, 100.0, -0.0, 2.0};
  const Tensor x = Tensor::from_values(DType::BF16, {2, 3}, v);
  // bf16(0.01) = 0.010009765625; amax = 100 -> scale 4.48.
  EXPECT_EQ(tensor_amax(x), 100.0f);
  const float scale = scale_for_amax(tensor_amax(x), kFloat8E4M3, 0);
  EXPECT_EQ(scale, 4.48f);
  const Tensor q = quantise(x, scale, kFloat8E4M3);
  EXPECT_EQ(q.dtype(), DType::F8_E4M3);
  EXPECT_EQ(q.shape(), (Shape{2, 3}));
  // 3.5*4.48 = 15.68 -> 16 (0x58); -4.48 -> -4.5 (0xC9); 0.010009765625*4.48 =
  // 0.0448 -> 0.04296875 = 2^-5 * 1.375 (0x13); 448 (0x7E); -0 (0x80); 8.96 -> 9 (0x51).
  const auto bits = q.data<uint8_t>();
  EXPECT_EQ(std::vector<uint8_t>(bits.begin(), bits.end()),
            (std::vector<uint8_t>{0x58, 0xC9, 0x13, 0x7E, 0x80, 0x51}));
  const float si = 1.0f / scale;
  const Tensor d = dequantise(q, si, DType::F64);
  EXPECT_EQ(d.dtype(), DType::F64);
  EXPECT_EQ(d.get(3), static_cast<double>(448.0f * si));
  EXPECT_EQ(d.get(0), static_cast<double>(16.0f * si));
  EXPECT_EQ(d.get(1), static_cast<double>(-4.5f * si));
  const Tensor f = fake_quant(x, scale, si, kFloat8E4M3);
  EXPECT_EQ(f.dtype(), DType::F32);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(f.get(i), d.get(i)) << i;
  EXPECT_THROW(quantise(Tensor(DType::I32, {2}), 1.0f, kFloat8E4M3), Error);
  EXPECT_THROW(dequantise(x, 1.0f), Error);
  EXPECT_THROW(quantise(x, 1.0f, math::kBFloat16), Error);
}

// E4M3: 3 mantissa bits -> relative error <= 2^-4 for scaled values in the
// normal range [2^-6, 448]; E5M2: 2 bits -> 2^-3 for [2^-14, 57344]. The extra
// factor covers the fp32 roundings of x*scale, 1/scale and q*scale_inv.
TEST(Fp8Cast, FakeQuantRoundTripErrorBound) {
  struct Case {
    const math::FloatFormat* format;
    double rel_bound;
    double min_normal;
  };
  for (const Case& c : {Case{&kFloat8E4M3, 0x1p-4, 0x1p-6}, Case{&kFloat8E5M2, 0x1p-3, 0x1p-14}}) {
    for (float amax : {3.5f, 1.0f, 1e-3f, 7e4f, 0.3f}) {
      const float scale = scale_for_amax(amax, *c.format, 0);
      const float scale_inv = 1.0f / scale;
      std::vector<float> x;
      for (int i = 1; i <= 4000; ++i) {
        const float t = static_cast<float>(std::pow(2.0, -12.0 * i / 4000.0)) * (i % 2 ? 1.0f : -1.0f);
        x.push_back(amax * t * (1.0f - 0.37f * static_cast<float>(i % 7) / 7.0f));
      }
      const auto fq = fake_quant(std::span<const float>(x), scale, scale_inv, *c.format);
      double worst = 0;
      int checked = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        const double scaled = std::fabs(static_cast<double>(x[i]) * scale);
        if (scaled < c.min_normal) continue;
        ++checked;
        const double rel = std::fabs(static_cast<double>(fq[i]) - x[i]) / std::fabs(static_cast<double>(x[i]));
        worst = std::max(worst, rel);
        EXPECT_LE(rel, c.rel_bound * (1 + 0x1p-16)) << "x=" << x[i] << " amax=" << amax;
      }
      EXPECT_GT(checked, 1000);
      EXPECT_GT(worst, c.rel_bound * 0.8) << "bound never approached: the test would be vacuous";
    }
  }
}

// ---------------------------------------------------------------- state / steps

TEST(Fp8State, FirstStepUsesScaleOneThenDelayed) {
  DelayedScalingState st(recipe_with(1, AmaxComputeAlgo::kMostRecent, 0, 1, Fp8Format::kHybrid));
  const size_t in = st.add_slot(Fp8Role::kInput);
  const size_t grad = st.add_slot(Fp8Role::kGradOutput);
  EXPECT_EQ(st.num_slots(), 2u);
  EXPECT_EQ(&st.format(in), &kFloat8E4M3);
  EXPECT_EQ(&st.format(grad), &kFloat8E5M2);
  const std::vector<float> x = {3.5f, -1.0f, 600.0f};
  // Step 1: scale 1, 600 saturates to 448.
  EXPECT_EQ(st.fake_quant(in, std::span<const float>(x)), (std::vector<float>{3.5f, -1.0f, 448.0f}));
  const std::vector<float> g = {7.0f, 0.5f};
  EXPECT_EQ(st.cast(grad, std::span<const float>(g)), (std::vector<uint8_t>{0x47, 0x38}));  // e5m2: 7 = 2^2 * 1.75, 0.5
  EXPECT_EQ(st.meta(in).amax_history[0], 600.0f);
  EXPECT_EQ(st.meta(grad).amax_history[0], 7.0f);
  EXPECT_TRUE(st.end_step());
  EXPECT_EQ(st.steps_completed(), 1);
  EXPECT_EQ(st.meta(in).scale, 448.0f / 600.0f);
  EXPECT_EQ(st.meta(grad).scale, 8192.0f);
  EXPECT_EQ(st.meta(grad).scale_inv, 1.0f / 8192.0f);
  // Step 2 casts with the scale from step 1's amax.
  const std::vector<double> gd = {7.0, -3.5};
  EXPECT_EQ(st.fake_quant(grad, std::span<const double>(gd)), (std::vector<double>{7.0, -3.5}));
  EXPECT_THROW(st.meta(5), Error);
  EXPECT_THROW(st.record_amax(2, 1.0f), Error);
}

TEST(Fp8State, IntervalTwoUpdatesEveryOtherStep) {
  DelayedScalingState st(recipe_with(1, AmaxComputeAlgo::kMostRecent, 0, 2));
  const size_t s = st.add_slot(Fp8Role::kWeight);
  st.record_amax(s, 2.0f);
  EXPECT_FALSE(st.end_step());  // step 1: no update
  EXPECT_EQ(st.meta(s).scale, 1.0f);
  EXPECT_EQ(st.meta(s).amax_history[0], 2.0f);  // kept, not rolled
  st.record_amax(s, 4.0f);
  EXPECT_TRUE(st.end_step());  // step 2: amax = max(2, 4) accumulated in slot 0
  EXPECT_EQ(st.meta(s).scale, 112.0f);
  EXPECT_EQ(st.meta(s).amax_history[0], 0.0f);
  st.record_amax(s, 8.0f);
  EXPECT_FALSE(st.end_step());
  EXPECT_EQ(st.meta(s).scale, 112.0f);
  st.record_amax(s, 1.0f);
  EXPECT_TRUE(st.end_step());
  EXPECT_EQ(st.meta(s).scale, 56.0f);
  EXPECT_EQ(st.steps_completed(), 4);
}

TEST(Fp8State, TensorFakeQuantRecordsAndCasts) {
  DelayedScalingState st(recipe_with(2, AmaxComputeAlgo::kMax));
  const size_t s = st.add_slot(Fp8Role::kInput);
  const Tensor x = Tensor::from_values(DType::F32, {2}, std::vector<double>{1.0, -3.5});
  const Tensor y1 = st.fake_quant(s, x, DType::F64);
  EXPECT_EQ(y1.to_doubles(), (std::vector<double>{1.0, -3.5}));  // scale 1: exact
  st.end_step();
  EXPECT_EQ(st.meta(s).scale, 128.0f);
  const Tensor z = Tensor::from_values(DType::F32, {2}, std::vector<double>{0.3, 3.5});
  const Tensor y2 = st.fake_quant(s, z);
  // 0.3 * 128 = 38.4 -> 40 (e4m3 step 4 in [32, 64)) -> 40/128 = 0.3125.
  EXPECT_EQ(y2.to_doubles(), (std::vector<double>{0.3125, 3.5}));
  EXPECT_EQ(st.meta(s).amax_history, (std::vector<float>{3.5f, 3.5f}));
}

// ---------------------------------------------------------------- properties

// A finite float with a random sign, exponent in [lo, hi] and random mantissa.
float gen_float(int lo, int hi) {
  const int e = *rc::gen::inRange(lo, hi + 1);
  const uint32_t mant = *rc::gen::inRange<uint32_t>(0, 1u << 23);
  const uint32_t sign = *rc::gen::arbitrary<bool>() ? 0x80000000u : 0u;
  return math::float_from_bits(sign | (static_cast<uint32_t>(e + 127) << 23) | mant);
}

const math::FloatFormat& gen_format() { return *rc::gen::arbitrary<bool>() ? kFloat8E4M3 : kFloat8E5M2; }

// Half an ulp of format f at |y| (subnormal spacing below the smallest normal).
double half_ulp(double y, const math::FloatFormat& f) {
  int e = 0;
  std::frexp(std::fabs(y), &e);  // |y| in [2^(e-1), 2^e)
  const int exponent = std::max(e - 1, 1 - f.bias);
  return std::ldexp(1.0, exponent - f.mantissa_bits - 1);
}

RC_GTEST_PROP(Fp8Props, QuantiseIsWithinHalfAnUlpOfTheScaledValue, ()) {
  const math::FloatFormat& f = gen_format();
  const int margin = *rc::gen::inRange(0, 4);
  const float amax = std::fabs(gen_float(-60, 60));
  const float scale = scale_for_amax(amax, f, margin);
  const float scale_inv = 1.0f / scale;
  // x up to about amax, down into the format's subnormals after scaling.
  const float x = amax * gen_float(-30, -1) * 2.0f;
  const float y = x * scale;  // the fp32 product TE rounds
  const uint8_t q = math::fp8_quantise(x, scale, f);
  const double d = math::decode(q, f);
  RC_ASSERT(std::isfinite(d));
  if (std::fabs(y) >= math::fp8_max(f)) {
    RC_ASSERT(std::fabs(d) == math::fp8_max(f));
  } else {
    RC_ASSERT(std::fabs(d - y) <= half_ulp(y, f));
  }
  // dequantise is exactly d * scale_inv rounded once to fp32.
  RC_ASSERT(math::fp8_dequantise(q, scale_inv, f) == static_cast<float>(d * static_cast<double>(scale_inv)));
  RC_ASSERT(math::fp8_dequantise_exact(q, scale_inv, f) == d * static_cast<double>(scale_inv));
}

RC_GTEST_PROP(Fp8Props, SaturationNeverProducesInfOrNaNForFiniteInput, ()) {
  const math::FloatFormat& f = gen_format();
  const float x = gen_float(-126, 127);
  const float scale = std::fabs(gen_float(-126, 127));  // x * scale may overflow fp32 to inf
  const uint8_t q = math::fp8_quantise(x, scale, f);
  const double d = math::decode(q, f);
  RC_ASSERT(std::isfinite(d));
  RC_ASSERT(std::fabs(d) <= math::fp8_max(f));
  RC_ASSERT(d == 0.0 || std::signbit(d) == std::signbit(x));
  // Saturation is the only way to reach the format's max: only from |x*scale| > max - half ulp.
  if (std::isinf(x * scale)) RC_ASSERT(std::fabs(d) == math::fp8_max(f));
}

RC_GTEST_PROP(Fp8Props, SteadyStateScaleMapsAmaxOntoFp8Max, ()) {
  const math::FloatFormat& f = gen_format();
  const int margin = *rc::gen::inRange(0, 8);
  const float amax = std::fabs(gen_float(-100, 100));
  const float scale = scale_for_amax(amax, f, margin);
  RC_ASSERT(std::isfinite(scale));
  RC_ASSERT(scale > 0.0f);
  const double target = math::fp8_max(f) * std::ldexp(1.0, -margin);
  // scale = RN(fp8_max / amax) / 2^margin: the exact product is within fp32's
  // relative rounding error (2^-24) of fp8_max / 2^margin, so never above it
  // by more than that ...
  const double product = static_cast<double>(amax) * scale;
  RC_ASSERT(product <= target * (1 + 0x1p-24));
  RC_ASSERT(product >= target * (1 - 0x1p-24));
  // ... and casting amax itself never needs saturation: without it the cast
  // is finite and lands on the value nearest fp8_max / 2^margin.
  const float y = amax * scale;
  const uint32_t bits = math::encode(static_cast<double>(y), f, math::Saturation::kNone);
  RC_ASSERT(std::isfinite(math::decode(bits, f)));
  RC_ASSERT(math::decode(bits, f) == math::round_to(target, f));
  RC_ASSERT(math::fp8_quantise(amax, scale, f) == bits);
}

RC_GTEST_PROP(Fp8Props, MaxHistoryScaleIsTheScaleOfTheWindowMax, ()) {
  const int64_t len = *rc::gen::inRange<int64_t>(1, 6);
  const DelayedScalingRecipe r = recipe_with(len, AmaxComputeAlgo::kMax, *rc::gen::inRange(0, 3));
  Fp8TensorMeta m(len);
  std::vector<float> recorded;
  const int steps = *rc::gen::inRange(1, 15);
  for (int t = 0; t < steps; ++t) {
    const float a = std::fabs(gen_float(-10, 10));
    recorded.push_back(a);
    record_amax(m, a);
    update_scale(m, r, Fp8Role::kInput);
    float window = 0.0f;
    for (size_t i = recorded.size() > static_cast<size_t>(len) ? recorded.size() - len : 0; i < recorded.size(); ++i) {
      window = std::max(window, recorded[i]);
    }
    RC_ASSERT(m.scale == scale_for_amax(window, kFloat8E4M3, r.margin));
    RC_ASSERT(m.scale_inv == 1.0f / m.scale);
    RC_ASSERT(m.amax_history[0] == 0.0f);
  }
}

}  // namespace
}  // namespace paritron
