// Tests of reference/rotary_pos_emb: the float32 angle table, the pairing of
// the two rotate_half styles, partial rotary, backward (rotation by -theta)
// and its finite differences, precision emulation, errors.
#include "reference/rotary_pos_emb.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <string>

#include "common/error.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

TransformerConfig rope_config(int64_t kv_channels, double percent = 1.0, bool interleaved = false) {
  TransformerConfig cfg;
  cfg.kv_channels = kv_channels;
  cfg.rotary_percent = percent;
  cfg.rotary_interleaved = interleaved;
  return cfg;
}

double f32(double x) { return static_cast<double>(static_cast<float>(x)); }

// kv_channels 8, base 10000: exponents 0/8, 2/8, 4/8, 6/8 = 0, 0.25, 0.5, 0.75
// (exact in float32), 10000^e = 1, 10, 100, 1000 (exact), inv_freq = the
// float32 reciprocals: 1, float(0.1), float(0.01), float(0.001).
TEST(RotaryEmbedding, HandComputedInvFreq) {
  const std::vector<float> inv = rotary_inv_freq(rope_config(8));
  ASSERT_EQ(inv.size(), 4u);
  EXPECT_EQ(inv[0], 1.0f);
  EXPECT_EQ(static_cast<double>(inv[1]), 0.10000000149011612);
  EXPECT_EQ(static_cast<double>(inv[2]), 0.009999999776482582);
  EXPECT_EQ(static_cast<double>(inv[3]), 0.0010000000474974513);
  // rotary_percent 0.5: dim = int(8 * 0.5) = 4, exponents 0, 0.5: inv_freq 1, float(0.01).
  const std::vector<float> half = rotary_inv_freq(rope_config(8, 0.5));
  ASSERT_EQ(half.size(), 2u);
  EXPECT_EQ(static_cast<double>(half[1]), 0.009999999776482582);
  // rotary_base 4, dim 4: 4^0.5 = 2, inv_freq [1, 0.5].
  TransformerConfig b4 = rope_config(4);
  b4.rotary_base = 4;
  EXPECT_EQ(rotary_inv_freq(b4), (std::vector<float>{1.0f, 0.5f}));
}

// The table holds angles pos * inv_freq, laid out cat(f, f) or repeat-each.
TEST(RotaryEmbedding, AngleTableLayouts) {
  const Mat plain = rotary_freqs(rope_config(8), 3);
  ASSERT_EQ(plain.rows(), 3);
  ASSERT_EQ(plain.cols(), 8);
  // Position 2: [2, 2 f(0.1), 2 f(0.01), 2 f(0.001)] twice (doubling is exact).
  const double row2[] = {2.0, 0.20000000298023224, 0.019999999552965164, 0.0020000000949949026};
  for (int j = 0; j < 4; ++j) {
    EXPECT_EQ(plain(2, j), row2[j]) << j;
    EXPECT_EQ(plain(2, 4 + j), row2[j]) << j;
  }
  EXPECT_EQ(plain.row(0), Mat::Zero(1, 8));
  const Mat inter = rotary_freqs(rope_config(8, 1.0, true), 3);
  for (int j = 0; j < 4; ++j) {
    EXPECT_EQ(inter(2, 2 * j), row2[j]) << j;
    EXPECT_EQ(inter(2, 2 * j + 1), row2[j]) << j;
  }
  // An offset shifts positions: rows of (seq 2, offset 5) are rows 5, 6 of (seq 7).
  const Mat shifted = rotary_freqs(rope_config(8), 2, 5);
  EXPECT_EQ(shifted, rotary_freqs(rope_config(8), 7).bottomRows(2));
}

// Float32 exactness: the angles are float32 products, not double ones.
TEST(RotaryEmbedding, AnglesAreFloat32) {
  const Mat table = rotary_freqs(rope_config(8), 1001);
  // 1000 * float(0.1) = 100.0000015 in double, 100 exactly in float32.
  EXPECT_EQ(table(1000, 1), 100.0);
  EXPECT_NE(table(1000, 1), 1000.0 * 0.10000000149011612);
  for (Eigen::Index i = 0; i < table.size(); ++i) EXPECT_EQ(table.data()[i], f32(table.data()[i]));
  // seq_len_interpolation_factor 3: positions times float(1/3) = 0.3333333432674408,
  // so position 2 is 0.6666666865348816, not 2/3.
  TransformerConfig cfg = rope_config(8);
  cfg.seq_len_interpolation_factor = 3.0;
  const Mat scaled = rotary_freqs(cfg, 3);
  EXPECT_EQ(scaled(2, 0), 0.6666666865348816);
  EXPECT_NE(scaled(2, 0), 2.0 / 3.0);
  // factor 4: a multiply by 0.25, exact.
  cfg.seq_len_interpolation_factor = 4.0;
  EXPECT_EQ(rotary_freqs(cfg, 3)(2, 0), 0.5);
}

// One head [1, 2, 3, 4], every angle 0.5 (exact in float32), c = float(cos 0.5),
// s = float(sin 0.5). Non-interleaved pairs (0, 2), (1, 3):
//   y = [1c - 3s, 2c - 4s, 3c + 1s, 4c + 2s];
// interleaved pairs (0, 1), (2, 3):
//   y = [1c - 2s, 2c + 1s, 3c - 4s, 4c + 3s].
TEST(ApplyRotaryPosEmb, PairingByHand) {
  const double c = f32(std::cos(0.5)), s = f32(std::sin(0.5));
  Mat t(1, 4);
  t << 1, 2, 3, 4;
  const Mat freqs = Mat::Constant(1, 4, 0.5);
  const Mat plain = apply_rotary_pos_emb_forward(t, 1, 1, freqs, false, truth_precision());
  const double expect_plain[] = {1 * c - 3 * s, 2 * c - 4 * s, 3 * c + 1 * s, 4 * c + 2 * s};
  const Mat inter = apply_rotary_pos_emb_forward(t, 1, 1, freqs, true, truth_precision());
  const double expect_inter[] = {1 * c - 2 * s, 2 * c + 1 * s, 3 * c - 4 * s, 4 * c + 3 * s};
  for (int i = 0; i < 4; ++i) {
    EXPECT_DOUBLE_EQ(plain(0, i), expect_plain[i]) << i;
    EXPECT_DOUBLE_EQ(inter(0, i), expect_inter[i]) << i;
  }
  // cos/sin are float32 values even in float64 runs: the result is not the double rotation.
  EXPECT_NE(plain(0, 0), 1 * std::cos(0.5) - 3 * std::sin(0.5));
}

// Rows are tokens (i_s, i_b) with i_s = row / b: with b = 2, rows 0 and 1
// both use position 0 (angle 0: identity), rows 2 and 3 position 1.
TEST(ApplyRotaryPosEmb, PositionIsRowOverBatch) {
  const TransformerConfig cfg = rope_config(4);
  const Mat freqs = rotary_freqs(cfg, 2);  // position 1: angles [1, f(0.01), 1, f(0.01)]
  Mat t = Mat::Zero(4, 4);
  t.col(0).setOnes();
  const Mat y = apply_rotary_pos_emb_forward(t, 2, 1, freqs, false, truth_precision());
  EXPECT_EQ(y.row(0), t.row(0));
  EXPECT_EQ(y.row(1), t.row(1));
  // Position 1, x = e_0: y[0] = cos 1, y[2] = sin 1 (pair (0, 2)), others 0.
  EXPECT_EQ(y(2, 0), f32(std::cos(1.0)));
  EXPECT_EQ(y(2, 2), f32(std::sin(1.0)));
  EXPECT_EQ(y(3, 1), 0.0);
  EXPECT_EQ(y(3, 3), 0.0);
}

// rotary_percent 0.5 on hn = 8: the first 4 channels of each head rotate, the
// last 4 pass through untouched (forward and backward).
TEST(ApplyRotaryPosEmb, PartialRotaryLeavesTheTail) {
  const TransformerConfig cfg = rope_config(8, 0.5);
  const int64_t s = 3, b = 2, heads = 2, hn = 8;
  const Mat freqs = rotary_freqs(cfg, s);
  ASSERT_EQ(freqs.cols(), 4);
  const Mat t = random_normal(s * b, heads * hn, 7, "t");
  const Mat y = apply_rotary_pos_emb_forward(t, b, heads, freqs, false, truth_precision());
  const Mat dt = apply_rotary_pos_emb_backward(t, b, heads, freqs, false, truth_precision());
  for (int64_t head = 0; head < heads; ++head) {
    EXPECT_EQ(y.middleCols(head * hn + 4, 4), t.middleCols(head * hn + 4, 4)) << head;
    EXPECT_EQ(dt.middleCols(head * hn + 4, 4), t.middleCols(head * hn + 4, 4)) << head;
    EXPECT_GT((y.middleCols(head * hn, 4) - t.middleCols(head * hn, 4)).cwiseAbs().maxCoeff(), 0.01);
  }
}

// A full rotation preserves each token's norm (up to cos^2 + sin^2 = 1 in
// float32), and backward is the rotation by -theta: exactly the forward with
// negated angles (float32 sin is odd).
TEST(ApplyRotaryPosEmb, NormPreservingAndBackwardIsInverse) {
  for (bool interleaved : {false, true}) {
    const TransformerConfig cfg = rope_config(16, 1.0, interleaved);
    const int64_t s = 5, b = 3, heads = 2;
    const Mat freqs = rotary_freqs(cfg, s);
    const Mat t = random_normal(s * b, heads * 16, 9, "t");
    const Mat y = apply_rotary_pos_emb_forward(t, b, heads, freqs, interleaved, truth_precision());
    for (Eigen::Index r = 0; r < t.rows(); ++r) EXPECT_NEAR(y.row(r).norm(), t.row(r).norm(), 3e-7 * t.row(r).norm());
    const Mat back = apply_rotary_pos_emb_backward(y, b, heads, freqs, interleaved, truth_precision());
    EXPECT_EQ(back, apply_rotary_pos_emb_forward(y, b, heads, -freqs, interleaved, truth_precision()));
    EXPECT_LE((back - t).cwiseAbs().maxCoeff(), 1e-6);
  }
}

TEST(ApplyRotaryPosEmb, Gradcheck) {
  for (bool interleaved : {false, true}) {
    const TransformerConfig cfg = rope_config(6, 2.0 / 3.0, interleaved);  // dim int(6 * 2/3) = 4 of 6
    const int64_t s = 4, b = 2, heads = 3;
    const Mat freqs = rotary_freqs(cfg, s);
    const Mat dy = random_normal(s * b, heads * 6, 13, "dy");
    MatMap vars{{"t", random_normal(s * b, heads * 6, 13, "t")}};
    MatMap analytic{{"t", apply_rotary_pos_emb_backward(dy, b, heads, freqs, interleaved, truth_precision())}};
    auto loss = [&](const MatMap& v) {
      return dot(apply_rotary_pos_emb_forward(v.at("t"), b, heads, freqs, interleaved, truth_precision()), dy);
    };
    const GradcheckResult r = gradcheck(loss, vars, analytic, {.eps = 1e-6, .rtol = 1e-6, .atol = 1e-9});
    EXPECT_TRUE(r.ok()) << r.describe();
    EXPECT_EQ(r.checked, 64);  // 8 x 18 elements, 64 of them at spread indices
  }
}

// bf16: cos/sin are float32 values rounded to bf16; t * cos_, rotate_half(t) * sin_
// and the sum each round to bf16. The error stays within a few bf16 ulps of
// the pair's magnitude; fp32 within a few fp32 ulps; and truth differs.
TEST(ApplyRotaryPosEmb, EmulatedPrecision) {
  const TransformerConfig cfg = rope_config(8);
  const int64_t s = 16, b = 2, heads = 2;
  const Mat freqs = rotary_freqs(cfg, s);
  const Mat t = rounded(random_normal(s * b, heads * 8, 21, "t"), DType::BF16);
  const Mat truth = apply_rotary_pos_emb_forward(t, b, heads, freqs, false, truth_precision());
  const Mat bf16 = apply_rotary_pos_emb_forward(t, b, heads, freqs, false, emulated_precision(DType::BF16, cfg));
  const Mat f32m = apply_rotary_pos_emb_forward(t, b, heads, freqs, false, emulated_precision(DType::F32, cfg));
  EXPECT_GT((truth - bf16).cwiseAbs().maxCoeff(), 0.0);
  EXPECT_EQ(bf16, rounded(bf16, DType::BF16));
  for (Eigen::Index r = 0; r < t.rows(); ++r) {
    for (int64_t head = 0; head < heads; ++head) {
      for (int c = 0; c < 8; ++c) {
        const int partner = c < 4 ? c + 4 : c - 4;
        const double scale = std::abs(t(r, head * 8 + c)) + std::abs(t(r, head * 8 + partner));
        const Eigen::Index k = head * 8 + c;
        EXPECT_LE(std::abs(bf16(r, k) - truth(r, k)), 4 * std::ldexp(scale, -8)) << r << ", " << k;
        EXPECT_LE(std::abs(f32m(r, k) - truth(r, k)), 4 * std::ldexp(scale, -24)) << r << ", " << k;
      }
    }
  }
  // The cos_ of position 1, channel 0 is bf16(float32(cos 1)): visible on a unit vector.
  Mat e = Mat::Zero(s * b, heads * 8);
  e(2, 0) = 1.0;  // row 2 = position 1, batch 0
  const Mat ye = apply_rotary_pos_emb_forward(e, b, heads, freqs, false, emulated_precision(DType::BF16, cfg));
  EXPECT_EQ(ye(2, 0), round_to(f32(std::cos(1.0)), DType::BF16));
  EXPECT_EQ(ye(2, 4), round_to(f32(std::sin(1.0)), DType::BF16));
  // A freqs tensor held in float64 would give float64 cos/sin.
  const Mat y64 = apply_rotary_pos_emb_forward(e, b, heads, freqs, false, truth_precision(), DType::F64);
  EXPECT_EQ(y64(2, 0), std::cos(1.0));
}

TEST(ApplyRotaryPosEmb, ErrorsNameTheProblem) {
  const Mat freqs = rotary_freqs(rope_config(4), 3);
  const Mat t = Mat::Zero(6, 8);
  EXPECT_NE(error_of([&] { apply_rotary_pos_emb_forward(t, 3, 2, freqs, false, truth_precision()); })
                .find("positions"),
            std::string::npos);  // s = 2 but freqs has 3 positions
  EXPECT_NE(error_of([&] { apply_rotary_pos_emb_forward(t, 2, 4, freqs, false, truth_precision()); })
                .find("head width"),
            std::string::npos);  // hn = 2 < rot_dim 4
  EXPECT_THROW(apply_rotary_pos_emb_forward(t, 2, 3, freqs, false, truth_precision()), Error);  // 8 % 3
  EXPECT_THROW(apply_rotary_pos_emb_forward(t, 4, 2, freqs, false, truth_precision()), Error);  // 6 % 4
  EXPECT_THROW(apply_rotary_pos_emb_backward(t, 2, 2, Mat::Zero(3, 3), false, truth_precision()), Error);  // odd
  EXPECT_NE(error_of([] { rotary_inv_freq(TransformerConfig{}); }).find("kv_channels"), std::string::npos);
  EXPECT_NE(error_of([] { rotary_inv_freq(rope_config(6, 0.5)); }).find("= 3"), std::string::npos);
  EXPECT_THROW(rotary_freqs(rope_config(4), -1), Error);
}

// On random shapes: the tail channels pass through, backward undoes forward,
// and the rotation preserves per-token norms; all for both pairings.
RC_GTEST_PROP(RotaryProperty, RotationInvariants, ()) {
  const int64_t s = *rc::gen::inRange<int64_t>(1, 9);
  const int64_t b = *rc::gen::inRange<int64_t>(1, 4);
  const int64_t heads = *rc::gen::inRange<int64_t>(1, 4);
  const int64_t hn = 2 * *rc::gen::inRange<int64_t>(1, 9);
  const int64_t rot = 2 * *rc::gen::inRange<int64_t>(1, hn / 2 + 1);
  const bool interleaved = *rc::gen::arbitrary<bool>();
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  TransformerConfig cfg = rope_config(hn, rot == hn ? 1.0 : static_cast<double>(rot) / static_cast<double>(hn),
                                      interleaved);
  RC_PRE(rotary_dim(cfg) == rot);  // int(hn * rot/hn) may truncate below rot
  const Mat freqs = rotary_freqs(cfg, s, *rc::gen::inRange<int64_t>(0, 100));
  const Mat t = random_normal(s * b, heads * hn, seed, "t");
  const Mat y = apply_rotary_pos_emb_forward(t, b, heads, freqs, interleaved, truth_precision());
  const Mat back = apply_rotary_pos_emb_backward(y, b, heads, freqs, interleaved, truth_precision());
  RC_ASSERT((back - t).cwiseAbs().maxCoeff() <= 1e-6);
  for (Eigen::Index r = 0; r < t.rows(); ++r) {
    RC_ASSERT(std::abs(y.row(r).norm() - t.row(r).norm()) <= 3e-7 * t.row(r).norm());
    for (int64_t head = 0; head < heads; ++head) {
      RC_ASSERT(y.block(r, head * hn + rot, 1, hn - rot) == t.block(r, head * hn + rot, 1, hn - rot));
    }
  }
}

}  // namespace
}  // namespace paritron::ref
