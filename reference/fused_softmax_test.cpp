// Tests of reference/fused_softmax (FusedScaleMaskSoftmax's torch path):
// closed-form probabilities, the order scale-then-mask, the -10000 fill, the
// mask-selection rules, finite-difference gradients, invariants, precision
// emulation and errors.
#include "reference/fused_softmax.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/error.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

Precision emulated(DType dtype, DType softmax) {
  Precision p;
  p.dtype = dtype;
  p.softmax_dtype = softmax;
  return p;
}

const Precision kTruth = truth_precision();
const double kLn2 = std::log(2.0), kLn3 = std::log(3.0);

SoftmaxForward run(const Mat& x, AttnMaskType type, const std::optional<AttentionMask>& mask,
                   std::optional<double> scale = std::nullopt,
                   std::optional<std::array<int64_t, 2>> window = std::nullopt, const Precision& p = kTruth,
                   int64_t b = 1, int64_t np = 1) {
  return fused_scale_mask_softmax_forward(x, b, np, type, mask, scale, window, p);
}

// exp(0) : exp(ln 2) : exp(ln 3) = 1 : 2 : 3, so the probabilities are 1/6, 2/6, 3/6.
TEST(FusedSoftmax, ClosedFormRow) {
  const SoftmaxForward f = run(rows_of({{0.0, kLn2, kLn3}}), AttnMaskType::no_mask, std::nullopt);
  EXPECT_NEAR(f.probs(0, 0), 1.0 / 6, 1e-15);
  EXPECT_NEAR(f.probs(0, 1), 2.0 / 6, 1e-15);
  EXPECT_NEAR(f.probs(0, 2), 3.0 / 6, 1e-15);
  EXPECT_FALSE(f.mask.has_value());
  EXPECT_EQ(f.probs_softmax.size(), 0);  // truth: no separate softmax-dtype copy
}

TEST(FusedSoftmax, CausalMaskBuiltWhenNoMaskIsPassed) {
  // Row 0 sees only key 0 (exp(-10000.3 - 0.3) underflows to exactly 0 in
  // double); row 1 softmax(0, ln 3) = (1/4, 3/4).
  const SoftmaxForward f = run(rows_of({{0.3, 0.7}, {0.0, kLn3}}), AttnMaskType::causal, std::nullopt);
  EXPECT_EQ(f.probs(0, 0), 1.0);
  EXPECT_EQ(f.probs(0, 1), 0.0);
  EXPECT_NEAR(f.probs(1, 0), 0.25, 1e-15);
  EXPECT_NEAR(f.probs(1, 1), 0.75, 1e-15);
  ASSERT_TRUE(f.mask.has_value());
  EXPECT_EQ(*f.mask, get_default_causal_mask(2));
}

TEST(FusedSoftmax, PassedMaskIsUsedAsIsEvenForCausal) {
  // An all-false mask with the causal type: no triangle is added (spec §14 #7),
  // so row 0 is softmax(0.3, 0.7) = (1, e^0.4) / (1 + e^0.4).
  const SoftmaxForward f = run(rows_of({{0.3, 0.7}, {0.0, kLn3}}), AttnMaskType::causal, AttentionMask(1, 1, 2, 2));
  const double e = std::exp(0.4);
  EXPECT_NEAR(f.probs(0, 0), 1 / (1 + e), 1e-15);
  EXPECT_NEAR(f.probs(0, 1), e / (1 + e), 1e-15);
  EXPECT_NEAR(f.probs(1, 1), 0.75, 1e-15);
}

TEST(FusedSoftmax, SingleQueryCausalHasNoMask) {
  // sq = 1 (decode step): the mask stays None, every key counts.
  const SoftmaxForward f = run(rows_of({{0.0, kLn2, kLn3}}), AttnMaskType::causal, std::nullopt);
  EXPECT_FALSE(f.mask.has_value());
  EXPECT_NEAR(f.probs(0, 2), 0.5, 1e-15);
}

TEST(FusedSoftmax, FullyMaskedRowIsUniform) {
  AttentionMask m(1, 1, 2, 3);
  for (int64_t j = 0; j < 3; ++j) m.set(0, 0, 1, j, true);
  const SoftmaxForward f = run(rows_of({{0.0, kLn2, kLn3}, {5.0, -3.0, 100.0}}), AttnMaskType::padding, m);
  for (int64_t j = 0; j < 3; ++j) EXPECT_EQ(f.probs(1, j), 1.0 / 3);  // every entry -10000: exp(0)/3
  EXPECT_NEAR(f.probs(0, 0), 1.0 / 6, 1e-15);
}

TEST(FusedSoftmax, FillIsMinus10000AppliedAfterScaling) {
  // Key 1 masked. Unmasked score -5000 scaled by 2 is -10000 = the fill, so
  // both entries are equal and the row is (1/2, 1/2). Were the mask applied
  // before scaling (fill scaled to -20000) or with -inf, the masked entry
  // would get 0.
  AttentionMask m(1, 1, 1, 2);
  m.set(0, 0, 0, 1, true);
  const SoftmaxForward f = run(rows_of({{-5000.0, 7.0}}), AttnMaskType::padding, m, 2.0);
  EXPECT_EQ(f.probs(0, 0), 0.5);
  EXPECT_EQ(f.probs(0, 1), 0.5);
  // Scale multiplies unmasked scores: 2 * (0, ln 3 / 2) = (0, ln 3) -> (1/4, 3/4).
  const SoftmaxForward g = run(rows_of({{0.0, kLn3 / 2}}), AttnMaskType::padding, std::nullopt, 2.0);
  EXPECT_NEAR(g.probs(0, 1), 0.75, 1e-15);
}

TEST(FusedSoftmax, FillIsRoundedToTheSoftmaxDtype) {
  // Softmax in bf16 (attention_softmax_in_fp32 = false): -10000 is stored as
  // -9984 (bf16 spacing 64 at 2^13), equal to the unmasked -9984 -> (1/2, 1/2).
  AttentionMask m(1, 1, 1, 2);
  m.set(0, 0, 0, 1, true);
  const SoftmaxForward bf = run(rows_of({{-9984.0, 0.0}}), AttnMaskType::padding, m, std::nullopt, std::nullopt,
                                emulated(DType::BF16, DType::BF16));
  EXPECT_EQ(bf.probs(0, 0), 0.5);
  // In fp32 the fill stays -10000: exp(-16) / (1 + exp(-16)) for the masked key.
  const SoftmaxForward f32 = run(rows_of({{-9984.0, 0.0}}), AttnMaskType::padding, m, std::nullopt, std::nullopt,
                                 emulated(DType::BF16, DType::F32));
  EXPECT_EQ(f32.probs(0, 0), round_to(1 / (1 + std::exp(-16.0)), DType::BF16));
}

TEST(FusedSoftmax, SlidingWindow) {
  const Mat zeros = Mat::Zero(3, 3);
  // (1, 0), no mask type: row i averages keys i-1, i.
  const SoftmaxForward a = run(zeros, AttnMaskType::no_mask, std::nullopt, std::nullopt, std::array<int64_t, 2>{1, 0});
  EXPECT_EQ(a.probs, rows_of({{1, 0, 0}, {0.5, 0.5, 0}, {0, 0.5, 0.5}}));
  // The causal type forces right = 0 (TE check_set_window_size): (1, 1) acts as (1, 0).
  const SoftmaxForward c = run(zeros, AttnMaskType::causal, std::nullopt, std::nullopt, std::array<int64_t, 2>{1, 1});
  EXPECT_EQ(c.probs, a.probs);
  // (0, 1) with the padding type: keys i, i+1.
  const SoftmaxForward p = run(zeros, AttnMaskType::padding, std::nullopt, std::nullopt, std::array<int64_t, 2>{0, 1});
  EXPECT_EQ(p.probs, rows_of({{0.5, 0.5, 0}, {0, 0.5, 0.5}, {0, 0, 1}}));
  // A passed mask is replaced by the window, as newer Megatron's torch path
  // does (fused_softmax.py: mask = get_sliding_window_causal_mask(...)):
  // masking key 2 everywhere changes nothing, the result is the (0, 1) window's.
  AttentionMask k(1, 1, 1, 3);
  k.set(0, 0, 0, 2, true);
  const SoftmaxForward o = run(zeros, AttnMaskType::padding, k, std::nullopt, std::array<int64_t, 2>{0, 1});
  EXPECT_EQ(o.probs, p.probs);
  // (-1, -1) is no window at all.
  const SoftmaxForward n = run(zeros, AttnMaskType::no_mask, std::nullopt, std::nullopt,
                               std::array<int64_t, 2>{-1, -1});
  EXPECT_EQ(n.probs, Mat::Constant(3, 3, 1.0 / 3));
}

TEST(FusedSoftmax, MaskSelectionErrors) {
  // Causal without a mask needs sq == sk (Megatron asserts).
  expect_error([] { run(Mat::Zero(2, 3), AttnMaskType::causal, std::nullopt); }, "sq == sk");
  expect_error([] { run(Mat::Zero(2, 3), AttnMaskType::causal, std::nullopt, std::nullopt, std::array<int64_t, 2>{1, 0}); },
               "sliding window");
  // A mask that does not broadcast to the scores.
  expect_error([] { run(Mat::Zero(2, 2), AttnMaskType::padding, AttentionMask(1, 1, 3, 2)); }, "attention_mask");
  expect_error([] { run(Mat::Zero(4, 2), AttnMaskType::padding, AttentionMask(2, 1, 2, 2)); }, "not broadcastable");
  // Rows not a multiple of b*np.
  expect_error([] { run(Mat::Zero(3, 2), AttnMaskType::no_mask, std::nullopt, std::nullopt, std::nullopt, kTruth, 2, 1); },
               "b * np");
  // Backward with a gradient of the wrong shape.
  const SoftmaxForward f = run(Mat::Zero(2, 2), AttnMaskType::no_mask, std::nullopt);
  expect_error([&] { fused_scale_mask_softmax_backward(f, Mat::Zero(2, 3), 1, 1, std::nullopt, kTruth); },
               "gradient");
}

// ---------------------------------------------------------------------------
// Gradients: L = sum(probs * G) by central differences, over the scores.

void check_gradient(int64_t b, int64_t np, int64_t sq, int64_t sk, AttnMaskType type,
                    const std::optional<AttentionMask>& mask, std::optional<double> scale,
                    std::optional<std::array<int64_t, 2>> window, uint64_t seed) {
  const Mat g = random_normal(b * np * sq, sk, seed, "grad");
  MatMap vars = {{"scores", random_normal(b * np * sq, sk, seed, "scores", 2.0)}};
  auto loss = [&](const MatMap& v) {
    return dot(fused_scale_mask_softmax_forward(v.at("scores"), b, np, type, mask, scale, window, kTruth).probs, g);
  };
  const SoftmaxForward f = fused_scale_mask_softmax_forward(vars.at("scores"), b, np, type, mask, scale, window, kTruth);
  MatMap analytic = {{"scores", fused_scale_mask_softmax_backward(f, g, b, np, scale, kTruth)}};
  const GradcheckResult r = gradcheck(loss, vars, analytic, {.max_elements_per_tensor = 200});
  EXPECT_TRUE(r.ok()) << r.describe();
}

TEST(FusedSoftmaxGrad, NoMask) { check_gradient(2, 3, 4, 5, AttnMaskType::no_mask, std::nullopt, std::nullopt, std::nullopt, 1); }
TEST(FusedSoftmaxGrad, CausalWithLayerScalingCoeff3) {
  check_gradient(1, 2, 4, 4, AttnMaskType::causal, std::nullopt, 3.0, std::nullopt, 2);
}
TEST(FusedSoftmaxGrad, PaddingWithFullyMaskedRow) {
  const std::vector<int64_t> q = {2, 3}, kv = {4, 2};
  check_gradient(2, 2, 3, 4, AttnMaskType::padding, padding_mask(q, kv, 3, 4), 2.0, std::nullopt, 3);
}
TEST(FusedSoftmaxGrad, SlidingWindow) {
  check_gradient(1, 2, 5, 5, AttnMaskType::causal, std::nullopt, std::nullopt, std::array<int64_t, 2>{2, 0}, 4);
}

TEST(FusedSoftmaxGrad, MaskedEntriesGetZeroGradient) {
  const Mat x = random_normal(3, 3, 5, "x");
  const SoftmaxForward f = run(x, AttnMaskType::causal, std::nullopt);
  const Mat d = fused_scale_mask_softmax_backward(f, Mat::Ones(3, 3) + x, 1, 1, std::nullopt, kTruth);
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = i + 1; j < 3; ++j) EXPECT_EQ(d(i, j), 0.0);
  // Row 0 attends one key only: its probability is constant 1, gradient 0.
  EXPECT_EQ(d(0, 0), 0.0);
}

// ---------------------------------------------------------------------------
// Invariants.

RC_GTEST_PROP(FusedSoftmaxProperty, RowsSumToOneAndMaskedEntriesVanish, ()) {
  const int64_t b = *rc::gen::inRange<int64_t>(1, 3), np = *rc::gen::inRange<int64_t>(1, 3);
  const int64_t sq = *rc::gen::inRange<int64_t>(1, 6), sk = *rc::gen::inRange<int64_t>(1, 6);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const double scale = *rc::gen::element(1.0, 2.0, 5.0);
  AttentionMask m(b, 1, sq, sk);
  for (int64_t e = 0; e < b; ++e)
    for (int64_t i = 0; i < sq; ++i)
      for (int64_t j = 0; j < sk; ++j) m.set(e, 0, i, j, *rc::gen::arbitrary<bool>());
  const Mat x = random_normal(b * np * sq, sk, seed, "x", 3.0);
  const SoftmaxForward f = run(x, AttnMaskType::padding, m, scale, std::nullopt, kTruth, b, np);
  for (int64_t e = 0; e < b; ++e)
    for (int64_t h = 0; h < np; ++h)
      for (int64_t i = 0; i < sq; ++i) {
        const int64_t r = (e * np + h) * sq + i;
        RC_ASSERT(std::abs(f.probs.row(r).sum() - 1.0) < 1e-12);
        bool all = true;
        for (int64_t j = 0; j < sk; ++j) all = all && m.masked(e, h, i, j);
        for (int64_t j = 0; j < sk; ++j) {
          if (all) {
            RC_ASSERT(std::abs(f.probs(r, j) - 1.0 / static_cast<double>(sk)) < 1e-15);
          } else if (m.masked(e, h, i, j)) {
            RC_ASSERT(f.probs(r, j) == 0.0);
          } else {
            RC_ASSERT(f.probs(r, j) > 0.0);
          }
        }
      }
  // Scaling by c equals scaling the scores by c beforehand (no mask entries
  // differ: the fill happens after the scale).
  const SoftmaxForward pre = run(x * scale, AttnMaskType::padding, m, std::nullopt, std::nullopt, kTruth, b, np);
  RC_ASSERT((pre.probs - f.probs).cwiseAbs().maxCoeff() < 1e-12);
}

// ---------------------------------------------------------------------------
// Precision emulation.

TEST(FusedSoftmaxPrecision, Bf16WithFp32SoftmaxIsWithinBf16Rounding) {
  // [b = 1, np = 2, sq = 8, sk = 8].
  const Mat x = rounded(random_normal(16, 8, 7, "x", 2.0), DType::BF16);
  const Mat g = rounded(random_normal(16, 8, 7, "g"), DType::BF16);
  const SoftmaxForward truth = run(x, AttnMaskType::causal, std::nullopt, 2.0, std::nullopt, kTruth, 1, 2);
  const Precision p = emulated(DType::BF16, DType::F32);
  const SoftmaxForward bf = run(x, AttnMaskType::causal, std::nullopt, 2.0, std::nullopt, p, 1, 2);
  // Probs are bf16 values, within one bf16 rounding (2^-9 relative, plus the
  // fp32 softmax's ~2^-24) of the truth; the fp32 copy is within fp32 rounding.
  ASSERT_EQ(bf.probs_softmax.rows(), 16);
  EXPECT_EQ(bf.probs, rounded(bf.probs, DType::BF16));
  EXPECT_EQ(bf.probs_softmax, rounded(bf.probs_softmax, DType::F32));
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    const double t = truth.probs.data()[i];
    EXPECT_LE(std::abs(bf.probs.data()[i] - t), std::ldexp(std::abs(t), -8) + 1e-30) << i;
    EXPECT_LE(std::abs(bf.probs_softmax.data()[i] - t), std::ldexp(std::abs(t), -22) + 1e-30) << i;
  }
  EXPECT_GT((bf.probs - truth.probs).cwiseAbs().maxCoeff(), 0.0);
  // Backward: bf16 values close to the truth's gradient (relative to its scale).
  const Mat dt = fused_scale_mask_softmax_backward(truth, g, 1, 2, 2.0, kTruth);
  const Mat de = fused_scale_mask_softmax_backward(bf, g, 1, 2, 2.0, p);
  EXPECT_EQ(de, rounded(de, DType::BF16));
  EXPECT_LE((de - dt).cwiseAbs().maxCoeff(), std::ldexp(dt.cwiseAbs().maxCoeff(), -7));
  EXPECT_GT((de - dt).cwiseAbs().maxCoeff(), 0.0);
}

TEST(FusedSoftmaxPrecision, Fp32AndFp16) {
  const Mat x = rounded(random_normal(7, 7, 8, "x", 2.0), DType::F16);
  const SoftmaxForward truth = run(x, AttnMaskType::causal, std::nullopt, std::nullopt, std::nullopt, kTruth, 1, 1);
  const SoftmaxForward f32 = run(x, AttnMaskType::causal, std::nullopt, std::nullopt, std::nullopt,
                                 emulated(DType::F32, DType::F32), 1, 1);
  EXPECT_EQ(f32.probs_softmax.size(), 0);  // softmax in the activation dtype: no second copy
  EXPECT_LE((f32.probs - truth.probs).cwiseAbs().maxCoeff(), 1e-7);
  EXPECT_GT((f32.probs - truth.probs).cwiseAbs().maxCoeff(), 0.0);
  const SoftmaxForward f16 = run(x, AttnMaskType::causal, std::nullopt, std::nullopt, std::nullopt,
                                 emulated(DType::F16, DType::F32), 1, 1);
  EXPECT_EQ(f16.probs, rounded(f16.probs, DType::F16));
  EXPECT_LE((f16.probs - truth.probs).cwiseAbs().maxCoeff(), std::ldexp(1.0, -11));
}

}  // namespace
}  // namespace paritron::ref
