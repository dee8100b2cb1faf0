// Element-wise FP8 delayed-scaling math shared by the CPU reference and the
// CUDA kernels (PARITRON_HD): the scaled cast, the dequantise, the amax
// reduction step and the amax -> scale rule.
//
// Mirrors Transformer Engine 1.x (the versions used with megatron-core 0.5.0):
//   * cast:   transformer_engine/common/util/vectorized_pointwise.h
//             (unary_kernel: `max = fmaxf(fabsf(temp), max); temp = temp * s;
//             out = static_cast<fp8>(temp)`) and transpose/cast_transpose.cu
//             (`T(scale * tmp)`); the fp8 constructor is __nv_fp8_e4m3(float) /
//             __nv_fp8_e5m2(float), i.e. RNE with __NV_SATFINITE;
//   * dequantise: cast_from_fp8 (`float(q) * scale_inv`);
//   * scale:  transformer_engine/pytorch/fp8.py `_default_sf_compute` (v1.3):
//             `sf = (fp8_max / amax) / 2**margin`, kept when amax is not
//             finite or not > 0 (v1.4+: common/recipe/delayed_scaling.cu,
//             `scaled_max / amax` with scaled_max = fp8_max * 2^-margin, which
//             is the same float whenever neither form overflows or goes
//             subnormal, since scaling by 2^-margin is exact there).
// Spec: shared/spec/megatron-semantics.md §12.2-§12.3, Appendix A (fp8 scales and
// amax history are fp32, so everything here is float arithmetic).
#pragma once

#include <cstdint>

#include "common/math/float_format.h"
#include "common/math/host_device.h"

namespace paritron::math {

// Largest finite magnitude of a format (E4M3: 448, E5M2: 57344), as TE's
// fp8_dtype_max / Format.max_fwd/max_bwd give it.
PARITRON_HD inline float fp8_max(const FloatFormat& f) { return static_cast<float>(decode(f.max_finite, f)); }

// |x| by clearing the sign bit (also for -0 and NaN, like fabsf).
PARITRON_HD inline float fp8_abs(float x) { return float_from_bits(bits_of(x) & 0x7FFFFFFFu); }

// One step of TE's amax reduction: fmaxf(fabsf(x), running). fmaxf returns the
// non-NaN operand, so a NaN element is ignored (running starts at 0 and so
// never becomes NaN); +-inf gives inf. Written with a comparison instead of
// fmaxf so host and device need no libm and agree bit for bit.
PARITRON_HD inline float fp8_amax_step(float running, float x) {
  const float a = fp8_abs(x);
  return a > running ? a : running;  // false for NaN a: keep running
}

// The fp8 bits of x cast with `scale`: the product x * scale is one fp32
// multiplication (TE's `temp * s`), then one RNE rounding to the format with
// finite saturation (overflow and +-inf -> +-max, NaN -> NaN).
PARITRON_HD inline uint8_t fp8_quantise(float x, float scale, const FloatFormat& f) {
  const float scaled = x * scale;
  return static_cast<uint8_t>(encode(static_cast<double>(scaled), f, Saturation::kFinite));
}

// q * scale_inv as TE's cast_from_fp8 computes it: the decoded value (exact in
// fp32) times scale_inv, one fp32 rounding.
PARITRON_HD inline float fp8_dequantise(uint8_t q, float scale_inv, const FloatFormat& f) {
  return static_cast<float>(decode(q, f)) * scale_inv;
}

// q * scale_inv without the fp32 rounding: a value of at most 4 significant
// bits (E4M3) times a 24-bit float has at most 28 significant bits, so the
// double product is exact. This is the value an FP8 GEMM effectively consumes
// (cuBLASLt applies scale_inv to the fp32 accumulator, it never rounds
// q * scale_inv per element).
PARITRON_HD inline double fp8_dequantise_exact(uint8_t q, float scale_inv, const FloatFormat& f) {
  return decode(q, f) * static_cast<double>(scale_inv);
}

// dequantise(quantise(x)): what the reference feeds an emulated FP8 GEMM.
PARITRON_HD inline float fp8_fake_quant(float x, float scale, float scale_inv, const FloatFormat& f) {
  return fp8_dequantise(fp8_quantise(x, scale, f), scale_inv, f);
}

// 2^k as a float for -126 <= k <= 127 (exact, no libm).
PARITRON_HD inline float pow2f(int k) { return float_from_bits(static_cast<uint32_t>(k + 127) << 23); }

// TE's amax -> scale rule: (fp8_max / amax) / 2^margin in fp32 when amax is
// finite and > 0, otherwise the previous scale (amax 0: the tensor was all
// zeros or never cast; inf/NaN: an overflowed step must not poison the scale).
// margin must lie in [-126, 127] (DelayedScalingRecipe::validate checks it).
// The result can still be inf when amax is below fp8_max / FLT_MAX (about
// 1.3e-36 for E4M3), exactly as TE's fp32 division gives it.
PARITRON_HD inline float fp8_scale_from_amax(float amax, float fmax, int margin, float previous_scale) {
  const bool finite = fp8_abs(amax) < float_from_bits(0x7F800000u);  // false for inf and NaN
  if (!(finite && amax > 0.0f)) return previous_scale;
  return (fmax / amax) / pow2f(margin);
}

}  // namespace paritron::math
