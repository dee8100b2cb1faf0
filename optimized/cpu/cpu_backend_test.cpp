// Tests of the CPU backend (optimized/cpu/cpu_backend.h) and the single-source
// math it runs (optimized/math/*.h): every op against the reference component
// it mirrors (reference/*.h) in float64 and fp32/bf16, hand-computed values,
// the rounding of outputs, F64 tensors, shape errors.
#include "optimized/cpu/cpu_backend.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/math/float_format.h"
#include "optimized/math/rounding.h"
#include "reference/activations.h"
#include "reference/bias_dropout_add.h"
#include "reference/core.h"
#include "reference/norm.h"
#include "reference/rotary_pos_emb.h"

namespace paritron::opt::cpu {
namespace {

using ref::Mat;

// ---------------------------------------------------------------------------
// Helpers.

Mat random_mat(int64_t rows, int64_t cols, uint32_t seed, double scale = 1.0, DType round = DType::F64) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  Mat m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = ref::round_to(dist(gen), round);
  return m;
}

struct Fixture : ::testing::Test {
  CpuBackend be;
  DTensor up(const Mat& m, DType dtype) { return be.upload(ref::to_tensor(m, {m.rows(), m.cols()}), dtype); }
  DTensor up_row(const Mat& m, DType dtype) { return be.upload(ref::to_tensor(m, {m.cols()}), dtype); }
  Mat down(const DTensor& t, int64_t cols = -1) {
    const Tensor h = be.download(t);
    return cols > 0 ? ref::to_mat(h, cols) : ref::to_mat(h);
  }
};

// max |a - b| / (|b| + floor), elementwise.
double max_rel(const Mat& a, const Mat& b, double floor = 1e-3) {
  EXPECT_EQ(a.rows(), b.rows());
  EXPECT_EQ(a.cols(), b.cols());
  double worst = 0.0;
  for (Eigen::Index i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::abs(a.data()[i] - b.data()[i]) / (std::abs(b.data()[i]) + floor));
  }
  return worst;
}

// Every element of m is a value of dtype.
bool representable(const Mat& m, DType dtype) {
  for (Eigen::Index i = 0; i < m.size(); ++i) {
    if (ref::round_to(m.data()[i], dtype) != m.data()[i]) return false;
  }
  return true;
}

// Fraction of elements that differ by more than one ulp of dtype (ulp of the
// larger magnitude).
double frac_beyond_one_ulp(const Mat& a, const Mat& b, DType dtype) {
  const int mant = dtype == DType::BF16 ? 7 : dtype == DType::F16 ? 10 : 23;
  int64_t bad = 0;
  for (Eigen::Index i = 0; i < a.size(); ++i) {
    const double m = std::max(std::abs(a.data()[i]), std::abs(b.data()[i]));
    const double ulp = m == 0 ? 0 : std::ldexp(1.0, std::ilogb(m) - mant);
    if (std::abs(a.data()[i] - b.data()[i]) > ulp * 1.0000001 + 1e-30) ++bad;
  }
  return static_cast<double>(bad) / static_cast<double>(a.size());
}

template <class F> void expect_error(F&& f, std::initializer_list<std::string> needles) {
  try {
    f();
    ADD_FAILURE() << "no Error thrown";
  } catch (const Error& e) {
    for (const std::string& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------
// rounding.h: bit-for-bit equal to math::encode/decode.

TEST(Rounding, Bf16MatchesEncodeOverDecidingBits) {
  const uint32_t lows[] = {0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000, 0x1234};
  for (uint32_t hi = 0; hi < 0x10000; ++hi) {
    for (uint32_t lo : lows) {
      const float x = math::float_from_bits((hi << 16) | lo);
      if (std::isnan(x)) {
        EXPECT_TRUE(std::isnan(math::round_float_to_bf16(x)));
        continue;
      }
      const double expected = math::round_to(static_cast<double>(x), math::kBFloat16);
      const float got = math::round_float_to_bf16(x);
      ASSERT_EQ(math::bits_of(got), math::bits_of(static_cast<float>(expected))) << std::hex << ((hi << 16) | lo);
    }
  }
}

TEST(Rounding, Fp16MatchesEncodeOverDecidingBits) {
  const uint32_t lows[] = {0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x0800, 0x1800};
  for (uint32_t hi = 0; hi < (1u << 19); ++hi) {
    for (uint32_t lo : lows) {
      const float x = math::float_from_bits((hi << 13) | lo);
      if (std::isnan(x)) {
        EXPECT_TRUE(std::isnan(math::round_float_to_fp16(x)));
        continue;
      }
      const double expected = math::round_to(static_cast<double>(x), math::kFloat16);
      const float got = math::round_float_to_fp16(x);
      ASSERT_EQ(math::bits_of(got), math::bits_of(static_cast<float>(expected))) << std::hex << ((hi << 13) | lo);
    }
  }
}

// The vectorised rounding pass of the backend (copy as a cast) agrees too.
TEST_F(Fixture, VectorRoundingPassMatchesEncode) {
  std::mt19937 gen(7);
  const int64_t n = 1 << 16;
  Tensor host(DType::F32, {n});
  auto v = host.data<float>();
  for (int64_t i = 0; i < n; ++i) {
    float x;
    do {
      x = math::float_from_bits(static_cast<uint32_t>(gen()));
    } while (std::isnan(x));
    v[static_cast<size_t>(i)] = x;
  }
  v[0] = 65520.0f;
  v[1] = 65519.99f;
  v[2] = 3.0e-8f;
  for (DType d : {DType::BF16, DType::F16}) {
    const DTensor src = be.upload(host, DType::F32);
    DTensor dst = be.empty(d, {n});
    be.copy(src, dst);
    const float* got = dst.f32();
    for (int64_t i = 0; i < n; ++i) {
      const double e = math::round_to(static_cast<double>(v[static_cast<size_t>(i)]), *float_format(d));
      ASSERT_EQ(math::bits_of(got[i]), math::bits_of(static_cast<float>(e))) << dtype_name(d) << " " << i;
    }
  }
}

// ---------------------------------------------------------------------------
// Memory.

TEST_F(Fixture, UploadDownloadRoundTripAndCopyCasts) {
  const Mat m = random_mat(3, 5, 1);
  // F64 keeps every bit.
  EXPECT_EQ(down(up(m, DType::F64)), m);
  // BF16: values rounded once (double -> bf16, no double rounding through fp32).
  const DTensor b = up(m, DType::BF16);
  EXPECT_EQ(b.storage_dtype(), DType::F32);
  const Tensor hb = be.download(b);
  EXPECT_EQ(hb.dtype(), DType::BF16);
  EXPECT_EQ(ref::to_mat(hb), ref::rounded(m, DType::BF16));
  // copy f64 -> bf16 rounds once; bf16 -> f64 widens exactly.
  const DTensor d64 = up(m, DType::F64);
  DTensor cast = be.empty(DType::BF16, {3, 5});
  be.copy(d64, cast);
  EXPECT_EQ(down(cast), ref::rounded(m, DType::BF16));
  DTensor back = be.empty(DType::F64, {15});
  be.copy(cast, back);
  EXPECT_EQ(down(back, 5), ref::rounded(m, DType::BF16));
  // fill rounds to the dtype.
  DTensor f = be.empty(DType::BF16, {4});
  be.fill(f, 1.0 + 1.0 / 512);
  EXPECT_EQ(f.f32()[3], 1.0f);
  DTensor z = be.zeros(DType::F64, {2, 2});
  EXPECT_EQ(be.sum(z), 0.0);
  expect_error([&] { be.copy(d64, f); }, {"copy", "dst"});
}

TEST_F(Fixture, CopyColsSplitsAndMerges) {
  const Mat m = random_mat(4, 6, 2);
  const DTensor src = up(m, DType::F32);
  DTensor dst = be.zeros(DType::BF16, {4, 3});
  be.copy_cols(src, 2, dst, 1, 2);
  const Mat d = down(dst);
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(d(r, 0), 0.0);
    EXPECT_EQ(d(r, 1), ref::round_to(static_cast<float>(m(r, 2)), DType::BF16));
    EXPECT_EQ(d(r, 2), ref::round_to(static_cast<float>(m(r, 3)), DType::BF16));
  }
  expect_error([&] { be.copy_cols(src, 5, dst, 0, 2); }, {"copy_cols"});
}

// ---------------------------------------------------------------------------
// GEMM.

TEST_F(Fixture, GemmF64MatchesReferenceAllTransposes) {
  const Mat a = random_mat(7, 5, 3), b = random_mat(5, 9, 4);
  const Mat bias = random_mat(1, 9, 5);
  for (int ta = 0; ta < 2; ++ta) {
    for (int tb = 0; tb < 2; ++tb) {
      const DTensor da = up(ta ? Mat(a.transpose()) : a, DType::F64);
      const DTensor db = up(tb ? Mat(b.transpose()) : b, DType::F64);
      DTensor c = be.empty(DType::F64, {7, 9});
      const DTensor dbias = up_row(bias, DType::F64);
      be.gemm(da, ta, db, tb, c, 1.0f, 0.0f, &dbias);
      Mat expected = a * b;
      expected.rowwise() += bias.row(0);
      EXPECT_LT(max_rel(down(c), expected), 1e-13) << ta << tb;
    }
  }
}

TEST_F(Fixture, GemmBf16AccumulatesInFp32AndRoundsOnce) {
  const Mat a = random_mat(33, 64, 6, 1.0, DType::BF16), b = random_mat(64, 40, 7, 1.0, DType::BF16);
  const Mat bias = random_mat(1, 40, 8, 1.0, DType::BF16);
  DTensor c = be.empty(DType::BF16, {33, 40});
  const DTensor dbias = up_row(bias, DType::BF16);
  be.gemm(up(a, DType::BF16), false, up(b, DType::BF16), false, c, 1.0f, 0.0f, &dbias);
  const Mat got = down(c);
  EXPECT_TRUE(representable(got, DType::BF16));
  Mat exact = a * b;
  exact.rowwise() += bias.row(0);
  // fp32 accumulation, one bf16 rounding: within one bf16 ulp of the exact sum.
  EXPECT_EQ(frac_beyond_one_ulp(got, exact, DType::BF16), 0.0);
  // And equal to the reference's emulated GEMM up to accumulation order.
  Mat ref_c = ref::matmul(a, b, DType::F32);
  ref_c.rowwise() += bias.row(0);
  EXPECT_LT(frac_beyond_one_ulp(got, ref::rounded(ref_c, DType::BF16), DType::BF16), 0.01);
}

TEST_F(Fixture, GemmBetaAccumulatesIntoFp32MainGrad) {
  const Mat x = random_mat(16, 8, 9, 1.0, DType::BF16), dy = random_mat(16, 4, 10, 1.0, DType::BF16);
  const Mat g0 = random_mat(4, 8, 11);
  DTensor main_grad = up(g0, DType::F32);
  // wgrad: dW [4, 8] += dy^T x.
  be.gemm(up(dy, DType::BF16), true, up(x, DType::BF16), false, main_grad, 1.0f, 1.0f);
  const Mat expected = ref::rounded(g0, DType::F32) + dy.transpose() * x;
  EXPECT_LT(max_rel(down(main_grad), expected), 1e-5);
  // alpha scales the product.
  DTensor c = be.empty(DType::F32, {4, 8});
  be.gemm(up(dy, DType::F32), true, up(x, DType::F32), false, c, 0.5f, 0.0f);
  EXPECT_LT(max_rel(down(c), 0.5 * dy.transpose() * x), 1e-5);
}

TEST_F(Fixture, GemmShapeErrorsNameTheOpAndShapes) {
  const DTensor a = be.zeros(DType::F32, {4, 3}), b = be.zeros(DType::F32, {5, 2});
  DTensor c = be.zeros(DType::F32, {4, 2});
  expect_error([&] { be.gemm(a, false, b, false, c); }, {"gemm", "[4, 3]", "[5, 2]"});
  const DTensor b2 = be.zeros(DType::F32, {3, 2});
  const DTensor bias = be.zeros(DType::F32, {3});
  expect_error([&] { be.gemm(a, false, b2, false, c, 1, 0, &bias); }, {"gemm", "bias"});
  const DTensor b64 = be.zeros(DType::F64, {3, 2});
  expect_error([&] { be.gemm(a, false, b64, false, c); }, {"gemm", "storage"});
}

TEST_F(Fixture, BiasGradColumnSumsAccumulate) {
  const Mat dy = random_mat(50, 6, 12, 1.0, DType::BF16);
  DTensor db = be.zeros(DType::F32, {6});
  be.bias_grad(up(dy, DType::BF16), db, false);
  be.bias_grad(up(dy, DType::BF16), db, true);
  const Mat col = dy.colwise().sum();
  const Mat expected = 2.0 * ref::rounded(col, DType::BF16);  // each contribution a bf16 gradient
  EXPECT_LT(max_rel(down(db, 6), expected), 1e-6);
  DTensor db64 = be.zeros(DType::F64, {6});
  be.bias_grad(up(dy, DType::F64), db64, false);
  EXPECT_LT(max_rel(down(db64, 6), col), 1e-14);
  DTensor bad = be.zeros(DType::F32, {5});
  expect_error([&] { be.bias_grad(up(dy, DType::F32), bad, false); }, {"bias_grad", "db"});
}

// ---------------------------------------------------------------------------
// Norms.

ref::Precision prec(DType d) {
  ref::Precision p = ref::float64_math();
  p.dtype = d;
  return p;
}

struct NormCase {
  bool rms;
  bool zero_centered;
  bool te;
};

class NormTest : public Fixture, public ::testing::WithParamInterface<NormCase> {};

TEST_P(NormTest, ForwardBackwardMatchReference) {
  const NormCase nc = GetParam();
  const int64_t T = 37, h = 48;
  TransformerConfig cfg;
  cfg.normalization = nc.rms ? "RMSNorm" : "LayerNorm";
  cfg.layernorm_epsilon = 1e-5;
  cfg.layernorm_zero_centered_gamma = nc.zero_centered;
  const ref::NormKernel kernel = nc.te ? ref::NormKernel::kTransformerEngine : ref::NormKernel::kApex;
  NormArgs args;
  args.rms = nc.rms;
  args.eps = 1e-5;
  args.zero_centered_gamma = nc.zero_centered;
  args.te_kernel = nc.te || nc.rms;  // RMSNorm is TE's in 0.5.0

  for (DType dtype : {DType::F64, DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    Mat x = random_mat(T, h, 20, 2.0, dtype);
    x.rowwise() += random_mat(1, h, 21, 0.5, dtype).row(0);
    x = ref::rounded(x, dtype);
    // Small weights make w + 1 round differently in bf16 (Apex) and fp32 (TE).
    const Mat w = random_mat(1, h, 22, nc.zero_centered ? 0.01 : 1.0, dtype);
    const Mat bvec = random_mat(1, h, 23, 1.0, dtype);
    const Mat dy = random_mat(T, h, 24, 1.0, dtype);
    ref::MatMap params{{"ln.weight", w}};
    if (!nc.rms) params["ln.bias"] = bvec;
    const ref::Precision p = prec(dtype);
    const ref::NormForward rf = ref::norm_forward(cfg, ref::Params(params).sub("ln"), x, p, kernel);
    ref::MatMap grads;
    const Mat rdx = ref::norm_backward(cfg, ref::Params(params).sub("ln"), x, rf, dy, ref::Sink(grads).sub("ln"), p,
                                       kernel);

    const DTensor dx_in = up(x, dtype), dg = up_row(w, dtype), dbt = up_row(bvec, dtype);
    DTensor y = be.empty(dtype, {T, h});
    const DType stat = dtype == DType::F64 ? DType::F64 : DType::F32;
    DTensor mean = be.empty(stat, {T}), rstd = be.empty(stat, {T});
    be.norm_forward(args, dx_in, dg, nc.rms ? nullptr : &dbt, y, mean, rstd);
    DTensor dx = be.empty(dtype, {T, h});
    DTensor dgamma = be.zeros(DType::F32, {h}), dbeta = be.zeros(DType::F32, {h});
    if (dtype == DType::F64) {
      dgamma = be.zeros(DType::F64, {h});
      dbeta = be.zeros(DType::F64, {h});
    }
    be.norm_backward(args, dx_in, dg, mean, rstd, up(dy, dtype), dx, dgamma, nc.rms ? nullptr : &dbeta);

    const Mat gy = down(y), gdx = down(dx);
    const Mat gdg = down(dgamma, h);
    if (dtype == DType::F64) {
      EXPECT_LT(max_rel(gy, rf.output), 1e-12);
      EXPECT_LT(max_rel(gdx, rdx), 1e-11);
      EXPECT_LT(max_rel(gdg, grads.at("ln.weight")), 1e-12);
      if (!nc.rms) {
        EXPECT_LT(max_rel(down(dbeta, h), grads.at("ln.bias")), 1e-12);
      }
      EXPECT_LT(max_rel(down(rstd, 1), Mat(rf.rstd)), 1e-14);
    } else if (dtype == DType::F32) {
      // fp32 arithmetic: errors relative to the row's scale (floor 1).
      EXPECT_LT(max_rel(gy, rf.output, 1.0), 1e-6);
      EXPECT_LT(max_rel(gdx, rdx, 1.0), 1e-5);
      EXPECT_LT(max_rel(gdg, grads.at("ln.weight"), 1.0), 1e-5);
    } else {
      EXPECT_TRUE(representable(gy, DType::BF16));
      EXPECT_TRUE(representable(gdx, DType::BF16));
      EXPECT_TRUE(representable(gdg, DType::BF16));  // a bf16 gradient added to a zero main grad
      // fp32 compute + one rounding vs double + one rounding: at most one ulp
      // apart (cancellation in dx / column sums leaves a few elements beyond).
      EXPECT_EQ(frac_beyond_one_ulp(gy, rf.output, DType::BF16), 0.0);
      EXPECT_LT(frac_beyond_one_ulp(gdx, rdx, DType::BF16), 0.01);
      EXPECT_LT(frac_beyond_one_ulp(gdg, grads.at("ln.weight"), DType::BF16), 0.05);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, NormTest,
                         ::testing::Values(NormCase{false, false, false}, NormCase{false, true, false},
                                           NormCase{false, true, true}, NormCase{true, false, true},
                                           NormCase{true, true, true}));

// The spec's hand example: x = [1, 2, 3, 4], eps = 0.3125: rstd = 0.8.
TEST_F(Fixture, LayerNormHandComputed) {
  const DTensor x = up(ref::Mat{{1, 2, 3, 4}}, DType::F64);
  const DTensor g = up_row(ref::Mat{{1, 2, 0.5, -1}}, DType::F64);
  const DTensor b = up_row(ref::Mat{{0.1, 0, 0, 1}}, DType::F64);
  DTensor y = be.empty(DType::F64, {1, 4}), mean = be.empty(DType::F32, {1}), rstd = be.empty(DType::F32, {1});
  NormArgs args;
  args.eps = 0.3125;
  be.norm_forward(args, x, g, &b, y, mean, rstd);
  const Mat got = down(y);
  const double expected[] = {-1.1, -0.8, 0.2, -0.2};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(got(0, i), expected[i], 1e-15);
  EXPECT_EQ(mean.f32()[0], 2.5f);
  EXPECT_EQ(rstd.f32()[0], 0.8f);
}

// Apex rounds 1 + w to bf16; TE keeps it in fp32.
TEST_F(Fixture, ZeroCenteredGammaApexVsTe) {
  const DTensor x = up(ref::Mat{{1, -1, 1, -1}}, DType::BF16);  // xhat = x, rstd ~ 1
  const double w = std::ldexp(1.0, -9);                          // 1 + 2^-9 is not a bf16 value
  const DTensor g = up_row(ref::Mat{{w, w, w, w}}, DType::BF16);
  const DTensor b = be.zeros(DType::BF16, {4});
  NormArgs args;
  args.eps = 0.0;
  args.zero_centered_gamma = true;
  DTensor y = be.empty(DType::F32, {1, 4}), mean = be.empty(DType::F32, {1}), rstd = be.empty(DType::F32, {1});
  args.te_kernel = false;
  be.norm_forward(args, x, g, &b, y, mean, rstd);
  EXPECT_EQ(y.f32()[0], 1.0f);  // gamma = bf16(1 + 2^-9) = 1
  args.te_kernel = true;
  be.norm_forward(args, x, g, &b, y, mean, rstd);
  EXPECT_EQ(y.f32()[0], static_cast<float>(1.0 + w));
}

TEST_F(Fixture, NormShapeErrors) {
  const DTensor x = be.zeros(DType::F32, {3, 4});
  const DTensor g = be.zeros(DType::F32, {5});
  DTensor y = be.zeros(DType::F32, {3, 4}), mean = be.zeros(DType::F32, {3}), rstd = be.zeros(DType::F32, {3});
  expect_error([&] { be.norm_forward(NormArgs{}, x, g, nullptr, y, mean, rstd); }, {"norm_forward", "gamma", "[4]"});
  const DTensor g4 = be.zeros(DType::F32, {4});
  DTensor rstd2 = be.zeros(DType::F32, {2});
  expect_error([&] { be.norm_forward(NormArgs{}, x, g4, nullptr, y, mean, rstd2); }, {"norm_forward", "rstd"});
  DTensor dx = be.zeros(DType::F32, {3, 5}), dg = be.zeros(DType::F32, {4});
  expect_error([&] { be.norm_backward(NormArgs{}, x, g4, mean, rstd, y, dx, dg, nullptr); }, {"norm_backward", "dx"});
}

// ---------------------------------------------------------------------------
// RoPE.

struct RopeCase {
  bool interleaved;
  double percent;
};
class RopeTest : public Fixture, public ::testing::WithParamInterface<RopeCase> {};

TEST_P(RopeTest, ForwardBackwardMatchReference) {
  const RopeCase rc = GetParam();
  const int64_t s = 9, b = 2, heads = 3, hn = 16;
  TransformerConfig cfg;
  cfg.kv_channels = hn;
  cfg.rotary_percent = rc.percent;
  cfg.rotary_interleaved = rc.interleaved;
  const Mat freqs = ref::rotary_freqs(cfg, s, /*offset=*/3);
  const int64_t rot = freqs.cols();
  RopeArgs args{b, heads, hn, rot, rc.interleaved};
  for (DType dtype : {DType::F64, DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const Mat x = random_mat(s * b, heads * hn, 30, 1.0, dtype);
    const ref::Precision p = prec(dtype);
    const Mat rf = ref::apply_rotary_pos_emb_forward(x, b, heads, freqs, rc.interleaved, p);
    const Mat rb = ref::apply_rotary_pos_emb_backward(x, b, heads, freqs, rc.interleaved, p);
    const DTensor df = up(freqs, DType::F32);
    const DTensor dx = up(x, dtype).view({s, b, heads, hn});
    DTensor y = be.empty(dtype, {s, b, heads, hn}), g = be.empty(dtype, {s, b, heads, hn});
    be.rope(args, dx, df, y, false);
    be.rope(args, dx, df, g, true);
    const Mat gy = down(y, heads * hn), gg = down(g, heads * hn);
    if (dtype == DType::F64) {
      EXPECT_LT(max_rel(gy, rf), 1e-15);
      EXPECT_LT(max_rel(gg, rb), 1e-15);
    } else if (dtype == DType::F32) {
      EXPECT_LT(max_rel(gy, rf), 1e-6);
      EXPECT_LT(max_rel(gg, rb), 1e-6);
    } else {
      // One rounding here, three in eager torch (the reference): within a bf16 ulp.
      EXPECT_TRUE(representable(gy, DType::BF16));
      EXPECT_LT(frac_beyond_one_ulp(gy, rf, DType::BF16), 0.05);
      EXPECT_LT(frac_beyond_one_ulp(gg, rb, DType::BF16), 0.05);
      EXPECT_LT(max_rel(gy, rf, 1.0), 0.02);
      EXPECT_LT(max_rel(gg, rb, 1.0), 0.02);
    }
    // In place: y aliases x.
    DTensor inplace = up(x, dtype).view({s, b, heads, hn});
    be.rope(args, inplace, df, inplace, false);
    EXPECT_EQ(down(inplace, heads * hn), gy);
  }
}

INSTANTIATE_TEST_SUITE_P(All, RopeTest,
                         ::testing::Values(RopeCase{false, 1.0}, RopeCase{true, 1.0}, RopeCase{false, 0.5},
                                           RopeCase{true, 0.5}));

// Angle pi/2 on the pair (0, 1) of a non-interleaved 2-channel rotation:
// y = (-x1, x0); backward rotates back.
TEST_F(Fixture, RopeHandComputedQuarterTurn) {
  const float angle = static_cast<float>(M_PI / 2);
  const DTensor freqs = up(ref::Mat{{angle, angle}}, DType::F32);
  const DTensor x = up(ref::Mat{{3, 5, 7}}, DType::F64);  // hn 3, rot 2: channel 2 passes
  DTensor y = be.empty(DType::F64, {1, 3});
  RopeArgs args{1, 1, 3, 2, false};
  be.rope(args, x, freqs, y, false);
  const double c = static_cast<float>(std::cos(static_cast<double>(angle)));  // fp32 cos of the fp32 angle
  const Mat got = down(y);
  EXPECT_DOUBLE_EQ(got(0, 0), 3 * c - 5);
  EXPECT_DOUBLE_EQ(got(0, 1), 5 * c + 3);
  EXPECT_EQ(got(0, 2), 7);
  RopeArgs bad = args;
  bad.rot_dim = 4;
  expect_error([&] { be.rope(bad, x, freqs, y, false); }, {"rope", "rot_dim"});
}

// ---------------------------------------------------------------------------
// Activations.

constexpr std::pair<ActivationKind, ref::Activation> kKinds[] = {
    {ActivationKind::kGelu, ref::Activation::kGelu},
    {ActivationKind::kSilu, ref::Activation::kSilu},
    {ActivationKind::kRelu, ref::Activation::kRelu},
    {ActivationKind::kSquaredRelu, ref::Activation::kSquaredRelu},
    {ActivationKind::kOpenaiGelu, ref::Activation::kOpenaiGelu},
    {ActivationKind::kErfGelu, ref::Activation::kErfGelu},
    {ActivationKind::kQuickGelu, ref::Activation::kQuickGelu},
    {ActivationKind::kBiasGeluTanh, ref::Activation::kBiasGeluTanh},
};

TEST_F(Fixture, BiasActivationMatchesReferenceAllKindsGluAndNot) {
  const int64_t T = 11, f = 24;
  for (const auto& [kind, rkind] : kKinds) {
    for (bool glu : {false, true}) {
      for (DType dtype : {DType::F64, DType::F32, DType::BF16}) {
        SCOPED_TRACE(fmt::format("{} glu {} {}", ref::activation_name(rkind), glu, dtype_name(dtype)));
        const int64_t w = glu ? 2 * f : f;
        const Mat x = random_mat(T, w, 40, 2.0, dtype), bias = random_mat(1, w, 41, 0.5, dtype);
        const Mat dy = random_mat(T, f, 42, 1.0, dtype);
        Mat a = x;
        a.rowwise() += bias.row(0);  // fused: the sum stays in fp32 (exact here in f64)
        Mat ey(T, f), edx(T, w);
        for (int64_t r = 0; r < T; ++r) {
          for (int64_t c = 0; c < f; ++c) {
            const double v = ref::activation_value(rkind, a(r, c));
            const double d = ref::activation_derivative(rkind, a(r, c));
            if (glu) {
              ey(r, c) = ref::round_to(v * a(r, f + c), dtype);
              edx(r, c) = ref::round_to(dy(r, c) * a(r, f + c) * d, dtype);
              edx(r, f + c) = ref::round_to(dy(r, c) * v, dtype);
            } else {
              ey(r, c) = ref::round_to(v, dtype);
              edx(r, c) = ref::round_to(dy(r, c) * d, dtype);
            }
          }
        }
        ActivationArgs args{kind, glu};
        const DTensor dxin = up(x, dtype), db = up_row(bias, dtype);
        DTensor y = be.empty(dtype, {T, f}), dx = be.empty(dtype, {T, w});
        be.bias_act_forward(args, dxin, &db, y);
        be.bias_act_backward(args, dxin, &db, up(dy, dtype), dx);
        const Mat gy = down(y), gdx = down(dx);
        if (dtype == DType::F64) {
          EXPECT_LT(max_rel(gy, ey, 1e-6), 1e-13);
          EXPECT_LT(max_rel(gdx, edx, 1e-6), 1e-13);
        } else if (dtype == DType::F32) {
          // fp32 formulas (1 + erf(x) cancels for x << 0): relative to scale 1.
          EXPECT_LT(max_rel(gy, ey, 1.0), 2e-6);
          EXPECT_LT(max_rel(gdx, edx, 1.0), 2e-6);
        } else {
          EXPECT_TRUE(representable(gy, DType::BF16));
          EXPECT_LT(frac_beyond_one_ulp(gy, ey, DType::BF16), 0.02);
          EXPECT_LT(frac_beyond_one_ulp(gdx, edx, DType::BF16), 0.02);
        }
      }
    }
  }
}

// The reference's own functions, unfused non-GLU path (activation_forward /
// activation_backward), without a bias.
TEST_F(Fixture, ActivationNoBiasEqualsReferenceFunctions) {
  const Mat x = random_mat(5, 16, 43, 3.0), dy = random_mat(5, 16, 44);
  for (const auto& [kind, rkind] : kKinds) {
    DTensor y = be.empty(DType::F64, {5, 16}), dx = be.empty(DType::F64, {5, 16});
    be.bias_act_forward({kind, false}, up(x, DType::F64), nullptr, y);
    be.bias_act_backward({kind, false}, up(x, DType::F64), nullptr, up(dy, DType::F64), dx);
    EXPECT_LT(max_rel(down(y), ref::activation_forward(rkind, x, DType::F64), 1e-8), 1e-13);
    EXPECT_LT(max_rel(down(dx), ref::activation_backward(rkind, x, dy, DType::F64), 1e-8), 1e-13);
  }
}

// bias_gelu at x = 1: 0.5 (1 + tanh(0.79788456 * 1.044715)); backward uses
// the hand-written constant 0.1070322243.
TEST_F(Fixture, BiasGeluTanhHandComputed) {
  const double t = std::tanh(0.79788456 * 1.044715);
  DTensor y = be.empty(DType::F64, {1, 1}), dx = be.empty(DType::F64, {1, 1});
  const DTensor x = up(ref::Mat{{0.75}}, DType::F64), b = up_row(ref::Mat{{0.25}}, DType::F64);
  be.bias_act_forward({ActivationKind::kBiasGeluTanh, false}, x, &b, y);
  be.bias_act_backward({ActivationKind::kBiasGeluTanh, false}, x, &b, up(ref::Mat{{2.0}}, DType::F64), dx);
  EXPECT_NEAR(y.f64()[0], 0.5 * (1 + t), 1e-15);
  EXPECT_NEAR(dx.f64()[0], 2.0 * (0.5 * (1 - t * t) * (0.79788456 + 0.1070322243) + 0.5 * (1 + t)), 1e-15);
  expect_error([&] { be.bias_act_forward({ActivationKind::kGelu, true}, x, &b, y); }, {"bias_act_forward", "odd"});
}

// ---------------------------------------------------------------------------
// Bias-dropout-add and dropout.

ref::RunContext training(uint64_t seed) {
  ref::RunContext c;
  c.training = true;
  c.seed = seed;
  c.path = "layers.0";
  return c;
}

TEST_F(Fixture, BiasDropoutAddMatchesReference) {
  const int64_t T = 40, h = 32;
  const double p = 0.3;
  const ref::RunContext ctx = training(5);
  for (DType dtype : {DType::F64, DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const Mat x = random_mat(T, h, 50, 1.0, dtype), bias = random_mat(1, h, 51, 1.0, dtype);
    const Mat residual = random_mat(T, h, 52, 1.0, DType::F32);  // an fp32 residual stream
    const ref::BiasDropoutAddForward rf =
        ref::bias_dropout_add_forward(x, bias, residual, p, ctx, "dropout", prec(dtype));
    const Mat dy = random_mat(T, h, 53, 1.0, dtype);
    const ref::BiasDropoutAddGrads rg = ref::bias_dropout_add_backward(rf, bias, dy, prec(dtype));

    DropoutArgs args;
    args.p = p;
    args.key = ctx.key("dropout");
    DTensor out = be.empty(dtype, {T, h}), dx = be.empty(dtype, {T, h});
    const DTensor db = up_row(bias, dtype);
    const DTensor res = up(residual, dtype == DType::F64 ? DType::F64 : DType::F32);
    be.bias_dropout_add(args, up(x, dtype), &db, &res, out);
    be.dropout_backward(args, up(dy, dtype), dx);
    const Mat got = down(out), gdx = down(dx);
    // In place on the residual stream (out aliases residual), and dx aliasing dout.
    DTensor stream = up(residual, dtype == DType::F64 ? DType::F64 : DType::F32);
    be.bias_dropout_add(args, up(x, dtype), &db, &stream, stream);
    if (dtype != DType::BF16) {
      EXPECT_EQ(down(stream), got);
    }
    DTensor g_inplace = up(dy, dtype);
    be.dropout_backward(args, g_inplace, g_inplace);
    EXPECT_EQ(down(g_inplace), gdx);
    // Same mask: dropped elements of x + bias leave exactly the (rounded) residual.
    for (Eigen::Index i = 0; i < got.size(); ++i) {
      if (rf.dropout_scale.data()[i] == 0.0) {
        ASSERT_EQ(got.data()[i], ref::round_to(residual.data()[i], dtype)) << i;
        ASSERT_EQ(gdx.data()[i], 0.0) << i;
      }
    }
    if (dtype == DType::F64) {
      EXPECT_LT(max_rel(got, rf.output), 1e-15);
      EXPECT_LT(max_rel(gdx, rg.x), 1e-15);
    } else if (dtype == DType::F32) {
      EXPECT_LT(max_rel(got, rf.output, 1.0), 1e-6);
      EXPECT_LT(max_rel(gdx, rg.x, 1.0), 1e-6);
    } else {
      // One rounding here, three in the reference (x + bias, dropout, + residual).
      EXPECT_TRUE(representable(got, DType::BF16));
      EXPECT_LT(frac_beyond_one_ulp(got, rf.output, DType::BF16), 0.08);
      EXPECT_LT(max_rel(got, rf.output, 1.0), 0.02);
      EXPECT_EQ(frac_beyond_one_ulp(gdx, rg.x, DType::BF16), 0.0);
    }
  }
}

// A shard's rows index the global tensor: row_offset, and row_positions for
// rows that are not contiguous globally.
TEST_F(Fixture, DropoutGlobalRowIndexing) {
  const int64_t T = 12, h = 8;
  const Mat x = random_mat(T, h, 60);
  DropoutArgs args;
  args.p = 0.5;
  args.key = training(9).key("dropout");
  DTensor full = be.empty(DType::F64, {T, h});
  be.bias_dropout_add(args, up(x, DType::F64), nullptr, nullptr, full);
  const Mat whole = down(full);
  // Rows [4, 8) as a shard with row_offset 4.
  DropoutArgs shard = args;
  shard.row_offset = 4;
  DTensor part = be.empty(DType::F64, {4, h});
  be.bias_dropout_add(shard, up(Mat(x.middleRows(4, 4)), DType::F64), nullptr, nullptr, part);
  EXPECT_EQ(down(part), Mat(whole.middleRows(4, 4)));
  // Rows {10, 1, 7} via row_positions.
  const std::vector<int64_t> pos = {10, 1, 7};
  DropoutArgs perm = args;
  perm.row_positions = pos;
  perm.row_offset = 99;  // ignored
  Mat xs(3, h);
  for (int i = 0; i < 3; ++i) xs.row(i) = x.row(pos[static_cast<size_t>(i)]);
  DTensor got = be.empty(DType::F64, {3, h});
  be.bias_dropout_add(perm, up(xs, DType::F64), nullptr, nullptr, got);
  const Mat g = down(got);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(Mat(g.row(i)), Mat(whole.row(pos[static_cast<size_t>(i)]))) << i;
  // Half dropped, kept ones doubled.
  int kept = 0;
  for (Eigen::Index i = 0; i < whole.size(); ++i) {
    if (whole.data()[i] != 0) {
      EXPECT_DOUBLE_EQ(whole.data()[i], 2 * x.data()[i]);
      ++kept;
    }
  }
  EXPECT_GT(kept, 25);
  EXPECT_LT(kept, 71);
  DropoutArgs wrong = args;
  const std::vector<int64_t> two = {0, 1};
  wrong.row_positions = two;
  expect_error([&] { be.dropout_backward(wrong, full, full); }, {"dropout_backward", "row_positions"});
}

TEST_F(Fixture, BiasDropoutAddEvalAndShapeErrors) {
  const DTensor x = up(ref::Mat{{1, 2}, {3, 4}}, DType::F32);
  const DTensor r = up(ref::Mat{{10, 20}, {30, 40}}, DType::F32);
  const DTensor b = up_row(ref::Mat{{0.5, -1}}, DType::F32);
  DTensor out = be.empty(DType::F32, {2, 2});
  be.bias_dropout_add(DropoutArgs{}, x, &b, &r, out);
  EXPECT_EQ(down(out), (ref::Mat{{11.5, 21}, {33.5, 43}}));
  DTensor bad = be.empty(DType::F32, {2, 3});
  expect_error([&] { be.bias_dropout_add(DropoutArgs{}, x, &b, &r, bad); }, {"bias_dropout_add", "out"});
}

// ---------------------------------------------------------------------------
// Element-wise, reductions, routing.

TEST_F(Fixture, AxpbySumSoftmax) {
  const Mat a = random_mat(70, 600, 70), b = random_mat(70, 600, 71);
  DTensor out = be.empty(DType::BF16, {70, 600});
  be.axpby(2.0f, up(a, DType::F32), -0.5f, up(b, DType::F32), out);
  const Mat ea = ref::rounded(a, DType::F32), eb = ref::rounded(b, DType::F32);
  EXPECT_LT(frac_beyond_one_ulp(down(out), 2.0 * ea - 0.5 * eb, DType::BF16), 1e-3);
  DTensor o64 = up(a, DType::F64);
  be.axpby(2.0f, o64, 1.0f, up(b, DType::F64), o64);  // out aliases a
  EXPECT_LT(max_rel(down(o64), 2.0 * a + b), 1e-15);
  EXPECT_NEAR(be.sum(up(a, DType::F64)), a.sum(), 1e-9);
  EXPECT_NEAR(be.sum(up(a, DType::F32)), ea.sum(), 1e-9);
  DTensor s = be.empty(DType::F64, {1, 3});
  be.softmax_rows(up(ref::Mat{{0, std::log(2.0), std::log(5.0)}}, DType::F64), s);
  EXPECT_NEAR(s.f64()[0], 0.125, 1e-15);
  EXPECT_NEAR(s.f64()[1], 0.25, 1e-15);
  EXPECT_NEAR(s.f64()[2], 0.625, 1e-15);
  DTensor s32 = be.empty(DType::F32, {70, 600});
  be.softmax_rows(up(a, DType::F32), s32);
  const Mat gs = down(s32);
  EXPECT_NEAR(gs.row(3).sum(), 1.0, 1e-5);
  expect_error([&] { be.axpby(1, up(a, DType::F32), 1, be.zeros(DType::F32, {3}), out); }, {"axpby"});
}

TEST_F(Fixture, GatherScatterRows) {
  const Mat x = random_mat(6, 300, 80);
  const std::vector<int64_t> rows = {5, 0, 5, 2};
  DTensor g = be.empty(DType::F64, {4, 300});
  be.gather_rows(up(x, DType::F64), rows, g);
  const Mat gg = down(g);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(Mat(gg.row(i)), Mat(x.row(rows[static_cast<size_t>(i)])));
  const std::vector<float> w = {0.5f, 1.0f, 0.25f, 2.0f};
  DTensor out = be.zeros(DType::F64, {6, 300});
  be.scatter_add_rows(g, rows, w, out);
  const Mat o = down(out);
  EXPECT_LT(max_rel(Mat(o.row(5)), Mat(0.75 * x.row(5)), 1e-9), 1e-15);
  EXPECT_LT(max_rel(Mat(o.row(0)), Mat(x.row(0))), 1e-15);
  EXPECT_LT(max_rel(Mat(o.row(2)), Mat(2.0 * x.row(2))), 1e-15);
  EXPECT_EQ(o.row(1).squaredNorm(), 0.0);
  // Large enough for the threaded path, unweighted, bf16 output.
  const Mat y = random_mat(400, 256, 81, 1.0, DType::BF16);
  std::vector<int64_t> dst(400);
  for (int i = 0; i < 400; ++i) dst[static_cast<size_t>(i)] = (i * 7) % 50;
  DTensor acc = be.zeros(DType::F32, {50, 256});
  be.scatter_add_rows(up(y, DType::BF16), dst, {}, acc);
  Mat expected = Mat::Zero(50, 256);
  for (int i = 0; i < 400; ++i) expected.row(dst[static_cast<size_t>(i)]) += y.row(i);
  EXPECT_LT(max_rel(down(acc), expected), 1e-5);
  const std::vector<int64_t> oob = {6};
  DTensor one = be.empty(DType::F64, {1, 300});
  expect_error([&] { be.gather_rows(up(x, DType::F64), oob, one); }, {"gather_rows", "out of range"});
}

// Sizes past the threading threshold (OpenMP over rows, per-thread partial
// sums): the same results as the reference in float64.
TEST_F(Fixture, ThreadedPathsMatchReferenceF64) {
  const int64_t T = 300, h = 160;
  const Mat x = random_mat(T, h, 90, 1.5), dy = random_mat(T, h, 91), w = random_mat(1, h, 92);
  const Mat bvec = random_mat(1, h, 93);
  TransformerConfig cfg;
  cfg.normalization = "LayerNorm";
  ref::MatMap params{{"ln.weight", w}, {"ln.bias", bvec}};
  const ref::Precision p = prec(DType::F64);
  const ref::NormForward rf = ref::norm_forward(cfg, ref::Params(params).sub("ln"), x, p);
  ref::MatMap grads;
  const Mat rdx = ref::norm_backward(cfg, ref::Params(params).sub("ln"), x, rf, dy, ref::Sink(grads).sub("ln"), p);
  const DTensor dxin = up(x, DType::F64), g = up_row(w, DType::F64), b = up_row(bvec, DType::F64);
  DTensor y = be.empty(DType::F64, {T, h}), mean = be.empty(DType::F64, {T}), rstd = be.empty(DType::F64, {T});
  NormArgs args;
  be.norm_forward(args, dxin, g, &b, y, mean, rstd);
  DTensor dx = be.empty(DType::F64, {T, h}), dg = be.zeros(DType::F64, {h}), db = be.zeros(DType::F64, {h});
  be.norm_backward(args, dxin, g, mean, rstd, up(dy, DType::F64), dx, dg, &db);
  EXPECT_LT(max_rel(down(y), rf.output), 1e-12);
  EXPECT_LT(max_rel(down(dx), rdx), 1e-10);
  EXPECT_LT(max_rel(down(dg, h), grads.at("ln.weight")), 1e-12);
  EXPECT_LT(max_rel(down(db, h), grads.at("ln.bias")), 1e-12);
  DTensor bg = be.zeros(DType::F64, {h});
  be.bias_grad(up(dy, DType::F64), bg, false);
  EXPECT_LT(max_rel(down(bg, h), Mat(dy.colwise().sum())), 1e-12);
  const ref::RunContext ctx = training(3);
  const ref::BiasDropoutAddForward bf = ref::bias_dropout_add_forward(x, bvec, dy, 0.125, ctx, "dropout", p);
  DropoutArgs dargs;
  dargs.p = 0.125;
  dargs.key = ctx.key("dropout");
  DTensor out = be.empty(DType::F64, {T, h});
  const DTensor res = up(dy, DType::F64);
  be.bias_dropout_add(dargs, dxin, &b, &res, out);
  EXPECT_LT(max_rel(down(out), bf.output), 1e-15);
  DTensor act = be.empty(DType::F64, {T, h / 2});
  be.bias_act_forward({ActivationKind::kSilu, true}, dxin, nullptr, act);
  const Mat ga = down(act);
  double worst = 0;
  for (int64_t r = 0; r < T; ++r) {
    for (int64_t c = 0; c < h / 2; ++c) {
      const double e = ref::activation_value(ref::Activation::kSilu, x(r, c)) * x(r, h / 2 + c);
      worst = std::max(worst, std::abs(ga(r, c) - e) / (std::abs(e) + 1e-6));
    }
  }
  EXPECT_LT(worst, 1e-14);
}

// The vectorised Philox path against the scalar draw, on a row whose element
// indices cross 2^32 inside an 8-lane group (the counter's high word carries).
TEST_F(Fixture, DropoutMaskMatchesScalarDrawAcross32BitBoundary) {
  const int64_t h = 40;
  const std::vector<int64_t> rows = {107374182, 3};  // 107374182 * 40 = 2^32 - 16
  DropoutArgs args;
  args.p = 0.3;
  args.key = training(11).key("dropout");
  args.row_positions = rows;
  DTensor ones = be.empty(DType::F64, {2, h});
  be.fill(ones, 1.0);
  DTensor dx = be.empty(DType::F64, {2, h});
  be.dropout_backward(args, ones, dx);
  for (int r = 0; r < 2; ++r) {
    for (int64_t c = 0; c < h; ++c) {
      const uint64_t index = static_cast<uint64_t>(rows[static_cast<size_t>(r)]) * h + static_cast<uint64_t>(c);
      const bool keep = static_cast<double>(math::uniform_float(args.key, index)) >= 0.3;
      EXPECT_EQ(dx.f64()[r * h + c], keep ? 1.0 / 0.7 : 0.0) << r << " " << c;
    }
  }
}

TEST(MakeBackend, CpuByNameAndUnknownNamesTheAvailable) {
  EXPECT_EQ(make_backend("cpu")->name(), "cpu");
  expect_error([] { (void)make_backend("tpu"); }, {"tpu", "cpu"});
}

}  // namespace
}  // namespace paritron::opt::cpu
