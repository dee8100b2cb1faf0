// Single-source random draws: element `index` of a global tensor, under a
// Philox key, as a uniform float, a uniform double or a standard normal double
// (design.md, principles 1 and 4). The host API (key derivation from seed and
// tensor name, fills, shards) is common/rng.h; this header is what CPU loops
// and CUDA kernels call per element, and both give the same bits.
//
// Counter layout: element i, attempt a, stream s draws the block
//     philox4x32_10(counter = {lo32(i), hi32(i), a, s}, key)
// i is the global (unsharded, row-major) element index, so a rank drawing its
// shard computes exactly the numbers the full tensor holds there. a counts
// rejection-sampling attempts (0 for uniform draws) so a rejected element
// never borrows randomness from its neighbours: every element stays
// independently drawable. s separates kinds of draw under one key (RngStream).
// Changing any of this changes every case file: it is fixed forever.
//
// Uniform conversions are Random123's u01fixedpt "open_open" ones: the
// midpoints of 2^(p-1) equal cells of (0,1), p = 24 (float) or 53 (double),
// so every value is exact in the format, 0 and 1 never occur, and u and 1-u
// have the same distribution.
//
// Normal: Marsaglia's polar method (Marsaglia & Bray 1964): v1, v2 uniform on
// (-1,1), s = v1^2 + v2^2, accept s < 1, return v1 * sqrt(-2 ln s / s); the
// partner v2 * sqrt(...) is dropped so element i depends on nothing but i.
// It needs only +, -, *, /, sqrt, fma and a logarithm; IEEE 754 rounds the
// first six correctly on every host and on the GPU, and the logarithm is our
// own (portable_log below), because glibc's log and CUDA's log differ in the
// last bit for some inputs and would break CPU == GPU bit equality.
//
// Floating-point discipline: every operation that rounds is an rn:: helper:
// on the device the _rn intrinsics, which nvcc never contracts into an FMA
// (it does contract a*b+c by default, even across statements), and on the host
// the plain operators, which stay unfused because the project compiles with
// -ffp-contract=off (keep it for any target including this header: GCC with
// -std=gnu++* and an FMA-capable -march would otherwise fuse rn::add(rn::mul())
// after inlining). Every multiply-add we want fused is an explicit rn::fma,
// correctly rounded on both sides (glibc's fma is exact with or without
// hardware FMA).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/math/host_device.h"
#include "common/math/philox.h"

namespace paritron::math {

// ---------------------------------------------------------------------------
// Correctly rounded (round-to-nearest-even) operations, same bits on both sides.
namespace rn {

PARITRON_HD inline double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

PARITRON_HD inline double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

PARITRON_HD inline double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

PARITRON_HD inline double div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

PARITRON_HD inline double sqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// a * b + c with one rounding.
PARITRON_HD inline double fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

}  // namespace rn

// ---------------------------------------------------------------------------
// Keys and counters.

// The key of one global tensor's draws; common/rng.h derives it from
// (seed, tensor name) with rng_key().
using RngKey = PhiloxKey;

// Counter word 3: which kind of draw. Values are part of the fixed layout;
// new kinds of draw take new values, never reuse one.
enum class RngStream : uint32_t {
  kUniform = 0,  // uniform_float, uniform_double (and everything built on them)
  kNormal = 1,   // normal_double
};

PARITRON_HD inline PhiloxBlock rng_counter(uint64_t index, uint32_t attempt, RngStream stream) {
  PhiloxBlock c;
  c.v[0] = static_cast<uint32_t>(index);
  c.v[1] = static_cast<uint32_t>(index >> 32);
  c.v[2] = attempt;
  c.v[3] = static_cast<uint32_t>(stream);
  return c;
}

// The 128 random bits of (element index, attempt, stream) under key.
PARITRON_HD inline PhiloxBlock rng_block(RngKey key, uint64_t index, uint32_t attempt, RngStream stream) {
  return philox4x32_10(rng_counter(index, attempt, stream), key);
}

PARITRON_HD inline uint64_t join64(uint32_t lo, uint32_t hi) {
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// ---------------------------------------------------------------------------
// Bits -> uniform numbers (Random123 u01fixedpt open_open_32_24 / 64_53).
// The integer 2k+1 is exact in the format and the scale is a power of two, so
// each conversion is exact: no rounding, nothing for a compiler to fuse.

// (2k + 1) / 2^24 with k the top 23 bits: 2^23 values, min 2^-24, max 1 - 2^-24.
PARITRON_HD inline float u01_open_open_float(uint32_t bits) {
  const uint32_t odd = ((bits >> 9) << 1) | 1u;
  return static_cast<float>(odd) * 0x1p-24f;
}

// (2k + 1) / 2^53 with k the top 52 bits: 2^52 values, min 2^-53, max 1 - 2^-53.
PARITRON_HD inline double u01_open_open_double(uint64_t bits) {
  const uint64_t odd = ((bits >> 12) << 1) | 1u;
  return static_cast<double>(odd) * 0x1p-53;
}

// (2k + 1 - 2^53) / 2^53 with k the top 53 bits: uniform on (-1, 1), symmetric
// about 0, never 0 (|numerator| < 2^53, so exact).
PARITRON_HD inline double symmetric_open_double(uint64_t bits) {
  const int64_t odd = static_cast<int64_t>(((bits >> 11) << 1) | 1u) - (int64_t{1} << 53);
  return static_cast<double>(odd) * 0x1p-53;
}

// Uniform on (0, 1), 24-bit precision: for dropout masks and other float work.
PARITRON_HD inline float uniform_float(RngKey key, uint64_t index) {
  return u01_open_open_float(rng_block(key, index, 0, RngStream::kUniform).v[0]);
}

// Uniform on (0, 1), 53-bit precision.
PARITRON_HD inline double uniform_double(RngKey key, uint64_t index) {
  const PhiloxBlock b = rng_block(key, index, 0, RngStream::kUniform);
  return u01_open_open_double(join64(b.v[0], b.v[1]));
}

// ---------------------------------------------------------------------------
// portable_log: natural logarithm from correctly rounded operations only.
//
// The reduction and polynomial are fdlibm's e_log.c (Sun Microsystems, 1993:
// "Developed at SunSoft, a Sun Microsystems, Inc. business. Permission to use,
// copy, modify, and distribute this software is freely granted, provided that
// this notice is preserved."), written here with explicit fma:
//   x = 2^k * m, m in [sqrt(2)/2, sqrt(2)), read off the exponent bits (exact);
//   f = m - 1 (exact by Sterbenz), s = f / (2 + f), so log(m) = 2 atanh(s)
//     = 2s + s*R(s^2), R a degree-7 minimax polynomial in s^2 (|error| < 2^-58.45);
//   2s = f - s*f = f - hfsq + s*hfsq with hfsq = f^2/2, which keeps the big
//     terms exact and leaves the rounding of s only in small products:
//   log(x) = k*ln2_hi + (f + (s*(hfsq + R) + (k*ln2_lo - hfsq))),
//   with ln2_hi carrying 32 bits so k*ln2_hi is exact for every k here.
// philox_test.cpp measures it against std::log over millions of inputs
// (normal, subnormal, near 1, near powers of two and sqrt(2)).
namespace log_detail {
inline constexpr double kLn2Hi = 0x1.62e42feep-1;          // 3FE62E42 FEE00000
inline constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;    // 3DEA39EF 35793C76
inline constexpr double kLg1 = 0x1.5555555555593p-1;       // 3FE55555 55555593
inline constexpr double kLg2 = 0x1.999999997fa04p-2;       // 3FD99999 9997FA04
inline constexpr double kLg3 = 0x1.2492494229359p-2;       // 3FD24924 94229359
inline constexpr double kLg4 = 0x1.c71c51d8e78afp-3;       // 3FCC71C5 1D8E78AF
inline constexpr double kLg5 = 0x1.7466496cb03dep-3;       // 3FC74664 96CB03DE
inline constexpr double kLg6 = 0x1.39a09d078c69fp-3;       // 3FC39A09 D078C69F
inline constexpr double kLg7 = 0x1.2f112df3e5244p-3;       // 3FC2F112 DF3E5244
inline constexpr uint64_t kMantissaMask = 0x000FFFFFFFFFFFFFull;
inline constexpr uint64_t kSqrt2Mantissa = 0x0006A09E667F3BCDull;  // fraction bits of sqrt(2)
inline constexpr uint64_t kExponentOne = 0x3FF0000000000000ull;   // exponent field of [1, 2)
inline constexpr uint64_t kExponentHalf = 0x3FE0000000000000ull;  // exponent field of [1/2, 1)
}  // namespace log_detail

PARITRON_HD inline double portable_log(double x) {
  using namespace log_detail;
  uint64_t u = bits_of(x);
  if (u == 0 || u == 0x8000000000000000ull) return double_from_bits(0xFFF0000000000000ull);  // -inf
  if (u >= 0x7FF0000000000000ull) {                                   // +inf, NaN, or negative
    if ((u & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull) return x;  // NaN in, NaN out
    if (u == 0x7FF0000000000000ull) return x;                           // log(+inf) = +inf
    return double_from_bits(0x7FF8000000000000ull);                     // log(negative) = NaN
  }
  int k = 0;
  if (u < 0x0010000000000000ull) {  // subnormal: 2^54 brings it into the normal range, exactly
    u = bits_of(rn::mul(x, 0x1p54));
    k = -54;
  }
  k += static_cast<int>(u >> 52) - 1023;
  const uint64_t fraction = u & kMantissaMask;
  double m;
  if (fraction >= kSqrt2Mantissa) {  // m in [sqrt(2)/2, 1): one binade down
    m = double_from_bits(kExponentHalf | fraction);
    k += 1;
  } else {                           // m in [1, sqrt(2))
    m = double_from_bits(kExponentOne | fraction);
  }
  const double f = rn::sub(m, 1.0);
  const double s = rn::div(f, rn::add(2.0, f));
  const double z = rn::mul(s, s);
  double poly = kLg7;
  poly = rn::fma(z, poly, kLg6);
  poly = rn::fma(z, poly, kLg5);
  poly = rn::fma(z, poly, kLg4);
  poly = rn::fma(z, poly, kLg3);
  poly = rn::fma(z, poly, kLg2);
  poly = rn::fma(z, poly, kLg1);
  const double r = rn::mul(z, poly);
  const double hfsq = rn::mul(rn::mul(0.5, f), f);  // 0.5 * f is exact: one rounding
  const double dk = static_cast<double>(k);
  const double small = rn::fma(s, rn::add(hfsq, r), rn::fma(dk, kLn2Lo, -hfsq));
  return rn::fma(dk, kLn2Hi, rn::add(f, small));
}

// ---------------------------------------------------------------------------
// Standard normal.

// Attempts before normal_double gives up. One attempt is rejected with
// probability 1 - pi/4 = 0.2146, so all 32 fail with probability
// 0.2146^32 = 4.0e-22 per element: at 10^12 draws a day, once in ~7e6 years.
// The cap keeps GPU threads bounded; an exhausted element returns 0.0.
inline constexpr uint32_t kNormalMaxAttempts = 32;

// N(0, 1) as a double; |result| <= sqrt(-2 ln 2^-105) = 12.07 (s >= 2^-105). If attempts_used is
// given it receives the number of Philox blocks consumed (1 .. kNormalMaxAttempts).
PARITRON_HD inline double normal_double(RngKey key, uint64_t index, uint32_t* attempts_used = nullptr) {
  for (uint32_t attempt = 0; attempt < kNormalMaxAttempts; ++attempt) {
    const PhiloxBlock b = rng_block(key, index, attempt, RngStream::kNormal);
    const double v1 = symmetric_open_double(join64(b.v[0], b.v[1]));
    const double v2 = symmetric_open_double(join64(b.v[2], b.v[3]));
    const double s = rn::fma(v1, v1, rn::mul(v2, v2));  // > 0: v1, v2 are never 0
    if (s < 1.0) {
      if (attempts_used != nullptr) *attempts_used = attempt + 1;
      // -2 * log(s) is exact (a power-of-two scale), so only /, sqrt, * round.
      const double scale = rn::sqrt(rn::div(rn::mul(-2.0, portable_log(s)), s));
      return rn::mul(v1, scale);
    }
  }
  if (attempts_used != nullptr) *attempts_used = kNormalMaxAttempts;
  return 0.0;
}

// ---------------------------------------------------------------------------
// Affine forms used by the fills, kept here so a kernel filling a tensor makes
// the same doubles the host fill does (before the one rounding to the dtype).

// low + (high - low) * u, u = uniform_double: one rounding for the fma.
PARITRON_HD inline double uniform_range(RngKey key, uint64_t index, double low, double high) {
  return rn::fma(rn::sub(high, low), uniform_double(key, index), low);
}

// mean + stddev * z, z = normal_double: one rounding.
PARITRON_HD inline double normal_scaled(RngKey key, uint64_t index, double mean, double stddev) {
  return rn::fma(stddev, normal_double(key, index), mean);
}

}  // namespace paritron::math
