// Fast fp32 -> bf16 / fp16 rounding, returning the rounded value as a float
// (the CPU backend holds 16-bit dtypes in fp32 storage; a CUDA kernel rounds
// the same way before its 16-bit store). Round-to-nearest-even, no
// saturation: equal bit for bit to math::round_to(x, kBFloat16 / kFloat16)
// (common/math/float_format.h) for every non-NaN float; a NaN stays a quiet
// NaN (its payload kept). Single source: PARITRON_HD, integer bit arithmetic
// plus one float add for fp16 subnormals (exact under RNE).
#pragma once

#include <cstdint>

#include "common/math/host_device.h"

namespace paritron::math {

// x rounded to bfloat16 (8 exponent bits, 7 fraction bits), as a float.
PARITRON_HD inline float round_float_to_bf16(float x) {
  const uint32_t u = bits_of(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return float_from_bits(u | 0x00400000u);  // NaN: quiet it
  // Add just under half an ulp, plus one when the kept lsb is odd (ties to
  // even); a carry runs into the exponent (up to inf), as it should.
  const uint32_t r = u + 0x7FFFu + ((u >> 16) & 1u);
  return float_from_bits(r & 0xFFFF0000u);
}

// x rounded to IEEE half (5 exponent bits, 10 fraction bits), as a float.
PARITRON_HD inline float round_float_to_fp16(float x) {
  const uint32_t u = bits_of(x);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return float_from_bits(u | 0x00400000u);  // NaN
  if (a >= 0x477FF000u) return float_from_bits(sign | 0x7F800000u);  // >= 65520 (max + ulp/2): inf
  if (a < 0x38800000u) {
    // Below 2^-14 (fp16 subnormals): a multiple of 2^-24. Adding 0.5 puts the
    // value where the float ulp is 2^-24, so the add rounds it (RNE); the
    // subtraction is exact (Sterbenz).
#if defined(__CUDA_ARCH__)
    const float t = __fsub_rn(__fadd_rn(float_from_bits(a), 0.5f), 0.5f);
#else
    const float t = (float_from_bits(a) + 0.5f) - 0.5f;  // IEEE: never folded without -ffast-math
#endif
    return float_from_bits(sign | bits_of(t));
  }
  const uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);  // 13 dropped bits, ties to even
  return float_from_bits(sign | (r & 0xFFFFE000u));
}

}  // namespace paritron::math
