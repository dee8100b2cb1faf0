// The CPU backend's fp8 ops (optimized/backend.h: amax, fp8_fake_quant)
// against common/math/fp8.h / common/fp8_scaling.h (the single-source math)
// and the reference's fake quantisation of a GEMM operand
// (reference/linear.h fp8_fake_quant): bit-exact in F32 and F64 storage,
// NaN / inf / saturation / zero handling, aliasing, shape errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/error.h"
#include "common/fp8_scaling.h"
#include "common/math/float_format.h"
#include "common/math/fp8.h"
#include "optimized/cpu/cpu_backend.h"
#include "reference/core.h"
#include "reference/linear.h"

namespace paritron::opt::cpu {
namespace {

using ref::Mat;

Mat random_mat(int64_t rows, int64_t cols, uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  Mat m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
  return m;
}

struct Fp8Fixture : ::testing::Test {
  CpuBackend be;
  DTensor up(const Mat& m, DType dtype) { return be.upload(ref::to_tensor(m, {m.rows(), m.cols()}), dtype); }
  std::vector<double> down(const DTensor& t) {
    const Tensor h = be.download(t);
    std::vector<double> v(static_cast<size_t>(h.numel()));
    for (int64_t i = 0; i < h.numel(); ++i) v[static_cast<size_t>(i)] = h.get(i);
    return v;
  }
};

// Bit equality that treats NaN == NaN.
bool same(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

// ---------------------------------------------------------------------------
// amax

TEST_F(Fp8Fixture, AmaxIsTensorAmaxInF32AndF64Storage) {
  // Big enough for the chunked OpenMP path, small for the serial one.
  for (int64_t cols : {7, 40000}) {
    const Mat x = random_mat(3, cols, 11, 2.5);
    const std::vector<double> xs(x.data(), x.data() + x.size());
    EXPECT_EQ(be.amax(up(x, DType::F64)), tensor_amax(std::span<const double>(xs))) << cols;
    const DTensor f = up(x, DType::F32);
    const std::vector<double> fv = down(f);
    EXPECT_EQ(be.amax(f), tensor_amax(std::span<const double>(fv))) << cols;
    const DTensor b = up(x, DType::BF16);
    const std::vector<double> bv = down(b);
    EXPECT_EQ(be.amax(b), tensor_amax(std::span<const double>(bv))) << cols;
  }
}

TEST_F(Fp8Fixture, AmaxIgnoresNanAndRoundsF64ToF32First) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // NaN ignored (fmaxf), sign dropped.
  EXPECT_EQ(be.amax(up(ref::Mat{{nan, -3.0, 2.0}}, DType::F64)), 3.0);
  EXPECT_EQ(be.amax(up(ref::Mat{{nan, -3.0, 2.0}}, DType::F32)), 3.0);
  EXPECT_EQ(be.amax(up(ref::Mat{{nan, nan}}, DType::F64)), 0.0);
  // inf gives inf.
  EXPECT_EQ(be.amax(up(ref::Mat{{1.0, -std::numeric_limits<double>::infinity()}}, DType::F32)),
            std::numeric_limits<double>::infinity());
  // An F64 element is rounded to fp32 before the max (TE's ComputeType).
  const double x = 1.0 + 0x1p-40;
  EXPECT_EQ(be.amax(up(ref::Mat{{x}}, DType::F64)), 1.0);
  // Empty: 0.
  EXPECT_EQ(be.amax(be.empty(DType::F32, {0, 4})), 0.0);
}

// ---------------------------------------------------------------------------
// fp8_fake_quant

struct Recipe {
  const char* fp8;
  Fp8Role role;
};

// Every role of both recipes: F64 storage holds exactly what the reference's
// fp8_fake_quant gives its float64 GEMM (q * scale_inv exact), F32 storage the
// fp32 rounding of it, which is TE's cast_from_fp8 (fp8_dequantise) and what
// the reference's fp32 GEMM reads (matmul casts its operands to float).
TEST_F(Fp8Fixture, FakeQuantMatchesTheReferenceBitForBit) {
  for (const Recipe r : {Recipe{"e4m3", Fp8Role::kInput}, Recipe{"e4m3", Fp8Role::kWeight},
                         Recipe{"e4m3", Fp8Role::kGradOutput}, Recipe{"hybrid", Fp8Role::kInput},
                         Recipe{"hybrid", Fp8Role::kGradOutput}}) {
    for (int64_t margin : {0, 2}) {
      ref::Precision p;
      p.fp8 = r.fp8;
      p.fp8_margin = margin;
      const Fp8Format format = parse_fp8_format(r.fp8);
      const math::FloatFormat& f = fp8_float_format(format, r.role);
      const bool e5m2 = fp8_dtype(format, r.role) == DType::F8_E5M2;
      // Values spanning the fp8 range after scaling, incl. subnormals of the format.
      Mat x = random_mat(5, 9000, 3, 0.7);
      x(0, 0) = 1e-9;
      x(0, 1) = -3e-6;
      const Mat want = ref::fp8_fake_quant(x, r.role, p);
      for (DType storage : {DType::F64, DType::F32}) {
        const DTensor xt = up(x, storage);
        const float scale = scale_for_amax(static_cast<float>(be.amax(xt)), f, static_cast<int>(margin));
        DTensor out = be.empty(storage, xt.shape());
        be.fp8_fake_quant(xt, e5m2, scale, out);
        const std::vector<double> got = down(out);
        int64_t bad = 0;
        for (Eigen::Index i = 0; i < want.size(); ++i) {
          const double w = storage == DType::F64 ? want.data()[i]
                                                 : static_cast<double>(static_cast<float>(want.data()[i]));
          bad += got[static_cast<size_t>(i)] != w;
        }
        EXPECT_EQ(bad, 0) << r.fp8 << " role " << static_cast<int>(r.role) << " margin " << margin << " storage "
                          << dtype_name(storage);
      }
    }
  }
}

// Element by element against common/math/fp8.h: F32 out = fp8_dequantise,
// F64 out = fp8_dequantise_exact, BF16 out = the exact value rounded once to
// bf16; specials: NaN stays NaN, +-inf and overflow saturate to +-max
// (E4M3 448, E5M2 57344), zeros stay zeros (signed).
TEST_F(Fp8Fixture, FakeQuantIsTheFp8MathElementByElement) {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  const Mat x{{0.0, -0.0, 1.0, -1.0, 0.3, 1000.0, -1e6, inf, -inf, nan, 3.14159, 1e-7, 0.0625, 2.71828}};
  for (bool e5m2 : {false, true}) {
    const math::FloatFormat& f = e5m2 ? math::kFloat8E5M2 : math::kFloat8E4M3;
    for (float scale : {1.0f, 0.37f, 96.5f}) {
      const float scale_inv = 1.0f / scale;
      for (DType dtype : {DType::F32, DType::F64, DType::BF16}) {
        const DTensor xt = up(x, dtype == DType::F64 ? DType::F64 : DType::F32);
        DTensor out = be.empty(dtype, xt.shape());
        be.fp8_fake_quant(xt, e5m2, scale, out);
        const std::vector<double> got = down(out);
        for (Eigen::Index i = 0; i < x.size(); ++i) {
          const uint8_t q = math::fp8_quantise(static_cast<float>(x.data()[i]), scale, f);
          const double exact = math::fp8_dequantise_exact(q, scale_inv, f);
          double want = exact;
          if (dtype == DType::F32) want = math::fp8_dequantise(q, scale_inv, f);
          if (dtype == DType::BF16) want = math::round_to(exact, math::kBFloat16);
          EXPECT_TRUE(same(got[static_cast<size_t>(i)], want))
              << "x " << x.data()[i] << " scale " << scale << " e5m2 " << e5m2 << " " << dtype_name(dtype) << ": got "
              << got[static_cast<size_t>(i)] << " want " << want;
          // The F32 value is the fp32 rounding of the exact product.
          if (dtype == DType::F32) {
            EXPECT_TRUE(same(want, static_cast<double>(static_cast<float>(exact))));
          }
        }
        // Saturation: +-inf (and x * scale past max) give +-max * scale_inv.
        if (dtype == DType::F64) {
          const double fmax = math::fp8_max(f);
          EXPECT_EQ(got[7], fmax * static_cast<double>(scale_inv));
          EXPECT_EQ(got[8], -fmax * static_cast<double>(scale_inv));
          if (1e6 * scale > fmax) {
            EXPECT_EQ(got[6], -fmax * static_cast<double>(scale_inv));
          }
        }
        EXPECT_TRUE(std::isnan(got[9]));
        EXPECT_FALSE(std::isinf(got[7]));
        EXPECT_TRUE(std::signbit(got[1]));
      }
    }
  }
}

TEST_F(Fp8Fixture, FakeQuantInPlaceAndErrors) {
  const Mat x = random_mat(4, 6, 5);
  DTensor a = up(x, DType::F32);
  DTensor b = be.empty(DType::F32, a.shape());
  be.fp8_fake_quant(a, false, 100.0f, b);
  be.fp8_fake_quant(a, false, 100.0f, a);  // out aliases x
  EXPECT_EQ(down(a), down(b));
  // Quantising a quantised tensor with the same scale is the identity.
  DTensor c = be.empty(DType::F32, a.shape());
  be.fp8_fake_quant(a, false, 100.0f, c);
  EXPECT_EQ(down(c), down(a));

  DTensor small = be.empty(DType::F32, {4, 5});
  EXPECT_THROW(be.fp8_fake_quant(a, false, 1.0f, small), Error);
  DTensor f64 = be.empty(DType::F64, {4, 6});
  EXPECT_THROW(be.fp8_fake_quant(a, false, 1.0f, f64), Error);  // mixed storage
  try {
    be.fp8_fake_quant(a, false, 1.0f, small);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fp8_fake_quant"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace paritron::opt::cpu
