// Exhaustive tests of the exact conversions in common/math/float_format.h.
//
// Every fp16 / bf16 / e4m3 / e5m2 bit pattern is decoded and re-encoded; every
// rounding interval between two adjacent values is probed at its midpoint (tie
// to even) and one double/float ulp either side of it; and the results are
// cross-checked against independent implementations present on the machine:
// the compiler's _Float16, Eigen::half / Eigen::bfloat16, and the CUDA
// toolkit's host-side conversions (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h; the
// latter define Transformer Engine's fp8 cast semantics) when the toolkit is
// installed.
#include "common/math/float_format.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <Eigen/Core>
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#if defined(PARITRON_HAVE_CUDA_HEADERS)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#endif

namespace paritron::math {
namespace {

struct Case {
  const char* name;
  FloatFormat format;
};

const Case kSmallFormats[] = {
    {"fp16", kFloat16}, {"bf16", kBFloat16}, {"e4m3", kFloat8E4M3}, {"e5m2", kFloat8E5M2}};

uint32_t code_count(const FloatFormat& f) { return 1u << total_bits(f); }
uint32_t sign_bit(const FloatFormat& f) { return 1u << (f.exponent_bits + f.mantissa_bits); }

// Non-negative finite values of a format in increasing order, with their codes.
std::vector<std::pair<double, uint32_t>> positive_values(const FloatFormat& f) {
  std::vector<std::pair<double, uint32_t>> values;
  for (uint32_t code = 0; code < sign_bit(f); ++code) {
    const double v = decode(code, f);
    if (std::isfinite(v)) values.emplace_back(v, code);
  }
  std::sort(values.begin(), values.end());
  return values;
}

// Cross-checks compare NaN-ness only for NaN results (payloads differ between
// implementations) and bits otherwise.
bool same_result(uint32_t ours, uint32_t theirs, const FloatFormat& f) {
  const bool ours_nan = std::isnan(decode(ours, f));
  const bool theirs_nan = std::isnan(decode(theirs, f));
  return ours_nan || theirs_nan ? ours_nan == theirs_nan : ours == theirs;
}

// The inputs that matter for rounding: every value, every midpoint between
// neighbours (and the midpoint past the largest finite value), and the doubles
// right next to each midpoint, for both signs.
std::vector<double> boundary_doubles(const FloatFormat& f) {
  const auto values = positive_values(f);
  std::vector<double> out;
  const auto add = [&](double x) {
    for (double s : {1.0, -1.0}) {
      out.push_back(s * x);
      out.push_back(s * std::nextafter(x, 0.0));
      out.push_back(s * std::nextafter(x, std::numeric_limits<double>::infinity()));
    }
  };
  for (size_t i = 0; i + 1 < values.size(); ++i) {
    add(values[i].first);
    add((values[i].first + values[i + 1].first) / 2.0);
  }
  const double max = values.back().first;
  const double ulp_at_max = max - values[values.size() - 2].first;
  add(max);
  add(max + ulp_at_max / 2.0);
  add(max + ulp_at_max);
  add(max * 4.0);
  return out;
}

// The float versions of the boundaries (every midpoint of these formats is a float).
std::vector<float> boundary_floats(const FloatFormat& f) {
  std::vector<float> out;
  for (double d : boundary_doubles(f)) {
    const float x = static_cast<float>(d);
    if (static_cast<double>(x) != d) continue;  // only the exactly representable ones
    out.push_back(x);
    out.push_back(std::nextafter(x, -std::numeric_limits<float>::infinity()));
    out.push_back(std::nextafter(x, std::numeric_limits<float>::infinity()));
  }
  return out;
}

std::vector<float> random_floats(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> out(n);
  for (float& x : out) {
    const uint32_t bits = static_cast<uint32_t>(rng());
    std::memcpy(&x, &bits, sizeof x);
  }
  return out;
}

// ------------------------------------------------------------------ known values

TEST(FloatFormat, KnownEncodings) {
  EXPECT_EQ(encode(1.0, kFloat16), 0x3C00u);
  EXPECT_EQ(encode(-2.0, kFloat16), 0xC000u);
  EXPECT_EQ(encode(65504.0, kFloat16), 0x7BFFu);
  EXPECT_EQ(encode(65519.0, kFloat16), 0x7BFFu);
  EXPECT_EQ(encode(65520.0, kFloat16), 0x7C00u);  // max + ulp/2 ties to even: overflow
  EXPECT_EQ(encode(65520.0, kFloat16, Saturation::kFinite), 0x7BFFu);
  EXPECT_EQ(encode(0x1p-24, kFloat16), 0x0001u);  // smallest subnormal
  EXPECT_EQ(encode(0x1p-25, kFloat16), 0x0000u);  // half of it ties to 0 (even)
  EXPECT_EQ(encode(std::nextafter(0x1p-25, 1.0), kFloat16), 0x0001u);
  EXPECT_EQ(encode(-0.0, kFloat16), 0x8000u);
  EXPECT_EQ(encode(1.0, kBFloat16), 0x3F80u);
  EXPECT_EQ(encode(1.00390625, kBFloat16), 0x3F80u);  // 1 + 2^-8 ties to even (down)
  EXPECT_EQ(encode(1.01171875, kBFloat16), 0x3F82u);  // 1 + 3*2^-8 ties to even (up)
  EXPECT_EQ(encode(448.0, kFloat8E4M3), 0x7Eu);
  EXPECT_EQ(encode(464.0, kFloat8E4M3), 0x7Eu);  // tie between 448 (even) and "480": 448
  EXPECT_EQ(encode(std::nextafter(464.0, 1e9), kFloat8E4M3), 0x7Fu);  // no inf in E4M3: NaN
  EXPECT_EQ(encode(std::nextafter(464.0, 1e9), kFloat8E4M3, Saturation::kFinite), 0x7Eu);
  EXPECT_EQ(encode(-1e9, kFloat8E4M3, Saturation::kFinite), 0xFEu);
  EXPECT_EQ(encode(0x1p-9, kFloat8E4M3), 0x01u);
  EXPECT_EQ(encode(57344.0, kFloat8E5M2), 0x7Bu);
  EXPECT_EQ(encode(61439.0, kFloat8E5M2), 0x7Bu);
  EXPECT_EQ(encode(61440.0, kFloat8E5M2), 0x7Cu);  // ties to even past max: inf
  EXPECT_EQ(encode(0x1p-16, kFloat8E5M2), 0x01u);
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(encode(inf, kFloat8E4M3), 0x7Fu);
  EXPECT_EQ(encode(inf, kFloat8E4M3, Saturation::kFinite), 0x7Eu);  // TE: saturate to max
  EXPECT_EQ(encode(-inf, kFloat8E5M2), 0xFCu);
  EXPECT_EQ(encode(-inf, kFloat8E5M2, Saturation::kFinite), 0xFBu);
  EXPECT_TRUE(std::isnan(decode(encode(std::nan(""), kFloat8E5M2, Saturation::kFinite), kFloat8E5M2)));
  EXPECT_EQ(encode(0x1p-1050, kFloat32), 0u);  // double subnormal
}

TEST(FloatFormat, FormatConstants) {
  EXPECT_EQ(decode(kFloat16.max_finite, kFloat16), 65504.0);
  EXPECT_EQ(decode(kBFloat16.max_finite, kBFloat16), 0x1.FEp127);
  EXPECT_EQ(decode(kFloat8E4M3.max_finite, kFloat8E4M3), 448.0);
  EXPECT_EQ(decode(kFloat8E5M2.max_finite, kFloat8E5M2), 57344.0);
  EXPECT_EQ(decode(kFloat32.max_finite, kFloat32), static_cast<double>(std::numeric_limits<float>::max()));
  EXPECT_EQ(decode(1, kFloat16), 0x1p-24);
  EXPECT_EQ(decode(1, kBFloat16), 0x1p-133);
  EXPECT_EQ(decode(1, kFloat8E4M3), 0x1p-9);
  EXPECT_EQ(decode(1, kFloat8E5M2), 0x1p-16);
  EXPECT_EQ(decode(1, kFloat32), static_cast<double>(std::numeric_limits<float>::denorm_min()));
}

// ------------------------------------------------------------------ every code

TEST(FloatFormat, EveryCodeDecodesAndRoundTrips) {
  for (const Case& c : kSmallFormats) {
    SCOPED_TRACE(c.name);
    const FloatFormat& f = c.format;
    int nans = 0, infs = 0;
    for (uint32_t code = 0; code < code_count(f); ++code) {
      const double v = decode(code, f);
      if (std::isnan(v)) {
        ++nans;
        continue;
      }
      if (std::isinf(v)) ++infs;
      ASSERT_EQ(encode(v, f), code) << "code " << code << " value " << v;
      ASSERT_EQ(std::signbit(v), (code & sign_bit(f)) != 0);
    }
    const int mantissa_codes = (1 << f.mantissa_bits) - 1;
    EXPECT_EQ(nans, f.ieee_specials ? 2 * mantissa_codes : 2);  // E4M3: only S.1111.111
    EXPECT_EQ(infs, f.ieee_specials ? 2 : 0);
  }
}

TEST(FloatFormat, EveryRoundingIntervalTiesToEven) {
  for (const Case& c : kSmallFormats) {
    SCOPED_TRACE(c.name);
    const FloatFormat& f = c.format;
    const auto values = positive_values(f);
    for (size_t i = 0; i + 1 < values.size(); ++i) {
      const auto [lo, lo_code] = values[i];
      const auto [hi, hi_code] = values[i + 1];
      const double mid = (lo + hi) / 2.0;
      const uint32_t even = (lo_code & 1u) == 0 ? lo_code : hi_code;
      for (uint32_t sign : {0u, sign_bit(f)}) {
        const double s = sign ? -1.0 : 1.0;
        ASSERT_EQ(encode(s * mid, f), sign | even) << "midpoint " << mid;
        ASSERT_EQ(encode(s * std::nextafter(mid, 0.0), f), sign | lo_code) << mid;
        ASSERT_EQ(encode(s * std::nextafter(mid, 1e300), f), sign | hi_code) << mid;
      }
    }
    // Past the largest finite value: IEEE formats overflow at max + ulp/2
    // (the tie goes to the even "next" value, which does not exist), E4M3 keeps
    // max at the tie (its mantissa 110 is even) and overflows just above.
    const double max = values.back().first;
    const double half_ulp = (max - values[values.size() - 2].first) / 2.0;
    const uint32_t overflow = f.ieee_specials ? f.inf : f.nan;
    EXPECT_EQ(encode(max + half_ulp, f), f.ieee_specials ? overflow : f.max_finite);
    EXPECT_EQ(encode(std::nextafter(max + half_ulp, 1e300), f), overflow);
    EXPECT_EQ(encode(std::nextafter(max + half_ulp, 0.0), f), f.max_finite);
    EXPECT_EQ(encode(-(max + 2 * half_ulp), f, Saturation::kFinite), sign_bit(f) | f.max_finite);
  }
}

RC_GTEST_PROP(FloatFormat, RoundsToANearestValue, ()) {
  const Case& c = kSmallFormats[*rc::gen::inRange(0, 4)];
  const FloatFormat& f = c.format;
  const double max = decode(f.max_finite, f);
  const int exponent = *rc::gen::inRange(-30, 20);
  const double x = std::ldexp(*rc::gen::inRange(-(1 << 24), 1 << 24) / double(1 << 24), exponent);
  RC_PRE(std::abs(x) <= max);
  const double r = round_to(x, f);
  // No value of the format lies strictly closer to x than r.
  const uint32_t code = encode(x, f);
  const uint32_t mag = code & (sign_bit(f) - 1);
  for (uint32_t neighbour : {mag - 1, mag + 1}) {
    if (neighbour > f.max_finite || mag == 0) continue;
    const double v = std::copysign(decode(neighbour, f), r);
    RC_ASSERT(std::abs(x - r) <= std::abs(x - v));
  }
  RC_ASSERT(std::abs(x - r) <= std::abs(x));  // never farther than zero
}

// ------------------------------------------------------------------ fp32 and the fast bf16 path

TEST(FloatFormat, Float32MatchesTheHardwareCast) {
  std::mt19937_64 rng(7);
  std::vector<double> inputs;
  for (int i = 0; i < 2000000; ++i) {
    // Doubles whose exponents span float's normal, subnormal and overflow ranges.
    const double mantissa = std::ldexp(static_cast<double>(rng() >> 11), -53) + 0.5;
    const int exponent = static_cast<int>(rng() % 320) - 160;
    inputs.push_back((rng() & 1 ? -1.0 : 1.0) * std::ldexp(mantissa, exponent));
  }
  for (float x : random_floats(200000, 8)) {  // midpoints between adjacent floats
    if (!std::isfinite(x)) continue;
    const double next = std::nextafter(x, std::numeric_limits<float>::infinity());
    if (std::isfinite(next)) inputs.push_back((static_cast<double>(x) + next) / 2.0);
  }
  const double max = std::numeric_limits<float>::max();
  inputs.push_back(max + 0x1p103);                      // max + ulp/2: IEEE overflows to inf
  inputs.push_back(std::nextafter(max + 0x1p103, 0.0));  // just below: max
  for (double x : inputs) {
    // The cast is only defined within float's range; past it IEEE gives inf.
    const float expected = std::abs(x) < max + 0x1p103 ? static_cast<float>(x) : std::copysign(INFINITY, static_cast<float>(x));
    uint32_t expected_bits;
    std::memcpy(&expected_bits, &expected, sizeof expected_bits);
    ASSERT_EQ(encode(x, kFloat32), expected_bits) << x;
  }
}

TEST(FloatFormat, FastBf16PathEqualsEncodeForEveryLowHalf) {
  // bf16 rounding depends on all 16 dropped bits and on the kept bits: every
  // low half with a spread of high halves, and every high half with the low
  // halves that decide ties.
  std::vector<uint32_t> highs;
  for (uint32_t h = 0; h < 0x10000u; h += 37) highs.push_back(h);
  for (uint32_t h : {0x7F7Fu, 0x7F80u, 0xFF7Fu, 0x0000u, 0x8000u, 0x007Fu, 0x0080u}) highs.push_back(h);
  for (uint32_t high : highs) {
    for (uint32_t low = 0; low < 0x10000u; ++low) {
      const float x = float_from_bits((high << 16) | low);
      ASSERT_TRUE(same_result(float_to_bf16_bits(x), encode(x, kBFloat16), kBFloat16)) << std::hex << (high << 16 | low);
    }
  }
  for (uint32_t high = 0; high < 0x10000u; ++high) {
    for (uint32_t low : {0x0000u, 0x0001u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu}) {
      const float x = float_from_bits((high << 16) | low);
      ASSERT_TRUE(same_result(float_to_bf16_bits(x), encode(x, kBFloat16), kBFloat16)) << std::hex << (high << 16 | low);
    }
    EXPECT_EQ(bits_of(bf16_bits_to_float(static_cast<uint16_t>(high))) >> 16, high);
  }
}

// ------------------------------------------------------------------ independent implementations

// _Float16 exists in GCC >= 12 and clang >= 15 on x86-64 (they define __FLT16_MAX__).
#if defined(__FLT16_MAX__)
uint32_t float16_bits(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, sizeof b);
  return b;
}

TEST(FloatFormatCrossCheck, CompilerFloat16) {
  for (uint32_t code = 0; code < 0x10000u; ++code) {
    const uint16_t raw = static_cast<uint16_t>(code);
    _Float16 h;
    std::memcpy(&h, &raw, sizeof h);
    const double theirs = static_cast<double>(h);
    const double ours = decode(code, kFloat16);
    ASSERT_TRUE(std::isnan(ours) ? std::isnan(theirs) : ours == theirs && std::signbit(ours) == std::signbit(theirs)) << code;
  }
  std::vector<float> inputs = boundary_floats(kFloat16);
  const std::vector<float> random = random_floats(1 << 22, 1);
  inputs.insert(inputs.end(), random.begin(), random.end());
  for (float x : inputs) {
    ASSERT_TRUE(same_result(encode(x, kFloat16), float16_bits(static_cast<_Float16>(x)), kFloat16)) << x;
  }
  for (double x : boundary_doubles(kFloat16)) {  // double -> half in one rounding
    ASSERT_TRUE(same_result(encode(x, kFloat16), float16_bits(static_cast<_Float16>(x)), kFloat16)) << x;
  }
}
#else
TEST(FloatFormatCrossCheck, CompilerFloat16) { GTEST_SKIP() << "this compiler has no _Float16 on this target"; }
#endif

TEST(FloatFormatCrossCheck, EigenHalfAndBfloat16) {
  for (uint32_t code = 0; code < 0x10000u; ++code) {
    const auto h = Eigen::numext::bit_cast<Eigen::half>(static_cast<uint16_t>(code));
    const auto b = Eigen::numext::bit_cast<Eigen::bfloat16>(static_cast<uint16_t>(code));
    const double h_ours = decode(code, kFloat16), b_ours = decode(code, kBFloat16);
    ASSERT_TRUE(std::isnan(h_ours) ? std::isnan(float(h)) : h_ours == double(float(h))) << code;
    ASSERT_TRUE(std::isnan(b_ours) ? std::isnan(float(b)) : b_ours == double(float(b))) << code;
  }
  for (const Case& c : {kSmallFormats[0], kSmallFormats[1]}) {
    std::vector<float> inputs = boundary_floats(c.format);
    const std::vector<float> random = random_floats(1 << 22, 2);
    inputs.insert(inputs.end(), random.begin(), random.end());
    for (float x : inputs) {
      const uint32_t theirs = c.format.mantissa_bits == 10
                                  ? Eigen::numext::bit_cast<uint16_t>(Eigen::half(x))
                                  : Eigen::numext::bit_cast<uint16_t>(Eigen::bfloat16(x));
      ASSERT_TRUE(same_result(encode(x, c.format), theirs, c.format)) << c.name << " " << x;
    }
  }
}

#if defined(PARITRON_HAVE_CUDA_HEADERS)
TEST(FloatFormatCrossCheck, CudaHalfAndBfloat16) {
  for (uint32_t code = 0; code < 0x10000u; ++code) {
    const double h = __half2float(__ushort_as_half(static_cast<unsigned short>(code)));
    const double b = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(code)));
    const double h_ours = decode(code, kFloat16), b_ours = decode(code, kBFloat16);
    ASSERT_TRUE(std::isnan(h_ours) ? std::isnan(h) : h_ours == h) << code;
    ASSERT_TRUE(std::isnan(b_ours) ? std::isnan(b) : b_ours == b) << code;
  }
  for (const Case& c : {kSmallFormats[0], kSmallFormats[1]}) {
    const bool half = c.format.mantissa_bits == 10;
    std::vector<float> inputs = boundary_floats(c.format);
    const std::vector<float> random = random_floats(1 << 22, 3);
    inputs.insert(inputs.end(), random.begin(), random.end());
    for (float x : inputs) {
      const uint32_t theirs = half ? __half_as_ushort(__float2half_rn(x)) : __bfloat16_as_ushort(__float2bfloat16_rn(x));
      ASSERT_TRUE(same_result(encode(x, c.format), theirs, c.format)) << c.name << " " << x;
    }
    for (double x : boundary_doubles(c.format)) {
      const uint32_t theirs = half ? __half_as_ushort(__double2half(x)) : __bfloat16_as_ushort(__double2bfloat16(x));
      ASSERT_TRUE(same_result(encode(x, c.format), theirs, c.format)) << c.name << " " << x;
    }
  }
}

TEST(FloatFormatCrossCheck, CudaFp8BothSaturationModes) {
  for (const Case& c : {kSmallFormats[2], kSmallFormats[3]}) {
    SCOPED_TRACE(c.name);
    const auto kind = c.format.mantissa_bits == 3 ? __NV_E4M3 : __NV_E5M2;
    for (uint32_t code = 0; code < 0x100u; ++code) {
      const __half_raw raw = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), kind);
      const double theirs = __half2float(__half(raw));
      const double ours = decode(code, c.format);
      ASSERT_TRUE(std::isnan(ours) ? std::isnan(theirs) : ours == theirs) << code;
    }
    std::vector<float> floats = boundary_floats(c.format);
    const std::vector<float> random = random_floats(1 << 21, 4);
    floats.insert(floats.end(), random.begin(), random.end());
    const std::vector<double> doubles = boundary_doubles(c.format);
    for (auto [sat, theirs_sat] : {std::pair{Saturation::kNone, __NV_NOSAT}, std::pair{Saturation::kFinite, __NV_SATFINITE}}) {
      for (float x : floats) {
        ASSERT_TRUE(same_result(encode(x, c.format, sat), __nv_cvt_float_to_fp8(x, theirs_sat, kind), c.format)) << x;
      }
      for (double x : doubles) {
        ASSERT_TRUE(same_result(encode(x, c.format, sat), __nv_cvt_double_to_fp8(x, theirs_sat, kind), c.format)) << x;
      }
      const double inf = std::numeric_limits<double>::infinity();
      for (double x : {inf, -inf}) {
        ASSERT_TRUE(same_result(encode(x, c.format, sat), __nv_cvt_double_to_fp8(x, theirs_sat, kind), c.format)) << x;
      }
    }
  }
}
#else
TEST(FloatFormatCrossCheck, CudaHeaders) { GTEST_SKIP() << "CUDA toolkit headers not found: cross-check against cuda_fp16/bf16/fp8 skipped"; }
#endif

}  // namespace
}  // namespace paritron::math
