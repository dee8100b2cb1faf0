// Exact round-to-nearest-even conversion between double and the floating-point
// storage formats Paritron emulates: fp32, fp16, bf16 and the OCP 8-bit formats
// E4M3 and E5M2 (OCP "OFP8" spec v1.0; E4M3 is the "fn" variant: no infinity,
// only S.1111.111 is NaN, max 448; E5M2 follows IEEE: inf and NaN, max 57344).
//
// encode() rounds a double straight to the target format with one rounding (no
// double rounding through fp32), by integer arithmetic on the double's bits,
// so host and device give identical bits. decode() is exact.
//
// Saturation (shared/spec/megatron-semantics.md §12.3):
//   kNone   IEEE behaviour: values past max + ulp/2 become inf (E4M3: NaN,
//           since it has no inf); inf stays inf (E4M3: NaN).
//   kFinite what Transformer Engine's casts do (__nv_fp8_e4m3(float) uses
//           __NV_SATFINITE): finite overflow and +-inf become +-max; NaN stays NaN.
#pragma once

#include <cstdint>

#include "common/math/host_device.h"

namespace paritron::math {

struct FloatFormat {
  int exponent_bits;
  int mantissa_bits;    // stored fraction bits (the leading 1 is implicit)
  int bias;
  bool ieee_specials;   // exponent all-ones means inf/NaN; false for E4M3 (fn)
  uint32_t max_finite;  // magnitude bits of the largest finite value
  uint32_t inf;         // magnitude bits of +inf (0 when the format has none)
  uint32_t nan;         // magnitude bits of the canonical quiet NaN
};

inline constexpr FloatFormat kFloat32{8, 23, 127, true, 0x7F7FFFFFu, 0x7F800000u, 0x7FC00000u};
inline constexpr FloatFormat kFloat16{5, 10, 15, true, 0x7BFFu, 0x7C00u, 0x7E00u};
inline constexpr FloatFormat kBFloat16{8, 7, 127, true, 0x7F7Fu, 0x7F80u, 0x7FC0u};
inline constexpr FloatFormat kFloat8E4M3{4, 3, 7, false, 0x7Eu, 0x00u, 0x7Fu};
inline constexpr FloatFormat kFloat8E5M2{5, 2, 15, true, 0x7Bu, 0x7Cu, 0x7Eu};

enum class Saturation : uint8_t { kNone, kFinite };

PARITRON_HD constexpr int total_bits(const FloatFormat& f) { return 1 + f.exponent_bits + f.mantissa_bits; }

// 2^k as a double, for -1022 <= k <= 1023 (exact, no libm).
PARITRON_HD inline double pow2(int k) { return double_from_bits(static_cast<uint64_t>(k + 1023) << 52); }

// Round x to the nearest value of format f (ties to even) and return its bits.
PARITRON_HD inline uint32_t encode(double x, const FloatFormat& f, Saturation sat = Saturation::kNone) {
  const uint64_t u = bits_of(x);
  const uint32_t sign = static_cast<uint32_t>(u >> 63) << (f.exponent_bits + f.mantissa_bits);
  const uint64_t abs = u & 0x7FFFFFFFFFFFFFFFull;
  const uint32_t overflow = sat == Saturation::kFinite ? f.max_finite : (f.ieee_specials ? f.inf : f.nan);
  if (abs > 0x7FF0000000000000ull) return sign | f.nan;
  if (abs == 0x7FF0000000000000ull) return sign | overflow;
  const int exp_field = static_cast<int>(abs >> 52);
  // Double subnormals (< 2^-1022) are below half of every target's smallest
  // subnormal (fp32: 2^-149), so they round to a signed zero.
  if (exp_field == 0) return sign;

  const uint64_t significand = (abs & 0x000FFFFFFFFFFFFFull) | (1ull << 52);  // x = sig * 2^(e-52)
  const int e = exp_field - 1023;
  const int emin = 1 - f.bias;
  // Keep mantissa_bits fraction bits at exponent max(e, emin): below emin the
  // result is subnormal and loses precision one bit per binade.
  const int shift = 52 - f.mantissa_bits + (e < emin ? emin - e : 0);
  if (shift >= 54) return sign;  // below half the smallest subnormal
  uint64_t q = significand >> shift;
  const uint64_t rem = significand & ((1ull << shift) - 1);
  const uint64_t half = 1ull << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;

  // Subnormal: q itself is the magnitude (q == 2^M is the smallest normal).
  // Normal: a mantissa carry (q == 2^(M+1)) runs into the exponent field.
  const uint64_t mag = e < emin ? q
                                : (static_cast<uint64_t>(e + f.bias) << f.mantissa_bits) +
                                      (q - (1ull << f.mantissa_bits));
  if (mag > f.max_finite) return sign | overflow;
  return sign | static_cast<uint32_t>(mag);
}

// The exact value of bits in format f (NaN for NaN codes, keeping the sign).
PARITRON_HD inline double decode(uint32_t bits, const FloatFormat& f) {
  const int width = f.exponent_bits + f.mantissa_bits;
  const uint32_t mag = bits & ((1u << width) - 1u);
  const uint64_t sign = static_cast<uint64_t>((bits >> width) & 1u) << 63;
  const uint32_t exp_field = mag >> f.mantissa_bits;
  const uint32_t mant = mag & ((1u << f.mantissa_bits) - 1u);
  const uint32_t exp_all_ones = (1u << f.exponent_bits) - 1u;
  if (f.ieee_specials && exp_field == exp_all_ones) {
    return double_from_bits(sign | (mant == 0 ? 0x7FF0000000000000ull : 0x7FF8000000000000ull));
  }
  if (!f.ieee_specials && mag == f.nan) return double_from_bits(sign | 0x7FF8000000000000ull);
  if (exp_field == 0) {  // subnormal or zero: mant * 2^(emin - M), exact
    const double value = static_cast<double>(mant) * pow2(1 - f.bias - f.mantissa_bits);
    return sign ? -value : value;
  }
  const uint64_t exponent = static_cast<uint64_t>(static_cast<int>(exp_field) - f.bias + 1023);
  return double_from_bits(sign | (exponent << 52) |
                          (static_cast<uint64_t>(mant) << (52 - f.mantissa_bits)));
}

// x rounded to format f, as a double (the emulation primitive of the reference).
PARITRON_HD inline double round_to(double x, const FloatFormat& f, Saturation sat = Saturation::kNone) {
  return decode(encode(x, f, sat), f);
}

// Position of a value on the format's number line: consecutive finite values
// differ by 1 and +0/-0 share 0, so |a - b| is the ULP distance.
PARITRON_HD inline int64_t ordered_index(uint64_t bits, int width_without_sign) {
  const uint64_t mag = bits & ((1ull << width_without_sign) - 1);
  const bool negative = (bits >> width_without_sign) & 1u;
  return negative ? -static_cast<int64_t>(mag) : static_cast<int64_t>(mag);
}

// Fast fp32 <-> bf16 (the common storage cast of kernels); equal to
// encode(x, kBFloat16) for every non-NaN float (a NaN stays a NaN with its
// payload's top bits, where encode gives the canonical NaN), which the tests
// check exhaustively over the bits that decide the rounding.
PARITRON_HD inline uint16_t float_to_bf16_bits(float x) {
  uint32_t u = bits_of(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

PARITRON_HD inline float bf16_bits_to_float(uint16_t b) { return float_from_bits(static_cast<uint32_t>(b) << 16); }

}  // namespace paritron::math
