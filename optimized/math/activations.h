// The MLP activations, value and derivative, single source (PARITRON_HD):
// evaluated in T = float (what a kernel reading bf16/fp16/fp32 computes in)
// or T = double (float64 runs). Formulas, constants and derivative forms are
// those of reference/activations.h (torch / Megatron): in particular
// bias_gelu's tanh form with the truncated 0.79788456 and its hand-written
// backward constant 0.1070322243, and erf_gelu's 1.41421 divisor. In fp32,
// exp, tanh and erf are fast_expf / fast_tanhf / fast_erff below.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/math/host_device.h"

namespace paritron::math {

// Same order as opt::ActivationKind (optimized/backend.h; the backend checks).
enum class Act : uint8_t { kGelu, kSilu, kRelu, kSquaredRelu, kOpenaiGelu, kErfGelu, kQuickGelu, kBiasGeluTanh };

// fp32 exp and tanh written out (Cephes' expf / tanhf: range reduction and
// minimax polynomials, <= 2 ulp), so that CPU loops vectorise (no libm call)
// and CPU and GPU compute the same bits. Straight-line code: both branches of
// tanh are evaluated and one is selected. double keeps libm (float64 runs).
PARITRON_HD inline float fast_expf(float x) {
  x = x < -87.3f ? -87.3f : x;  // exp(-87.3) = 1.2e-38: normal; below, the true value underflows
  x = x > 88.0f ? 88.0f : x;    // 2^127 * poly stays finite
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2), ties to even
  float r = x - n * 0.693359375f;                                            // ln2 split: exact product
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * float_from_bits(scale_bits);
}

PARITRON_HD inline float fast_tanhf(float x) {
  const uint32_t sign = bits_of(x) & 0x80000000u;
  float a = float_from_bits(bits_of(x) & 0x7FFFFFFFu);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = x + x * (z * p);
  const float e = fast_expf(2.0f * (a < 10.0f ? a : 10.0f));  // tanh(10) rounds to 1 in fp32
  const float big = float_from_bits(bits_of(1.0f - 2.0f / (e + 1.0f)) | sign);
  return a < 0.625f ? small : big;
}

// erf in fp32 (N. Juffa's minimax erff: two ranges, fma Horner, < 1 ulp
// with a correctly rounded expf; here with fast_expf).
PARITRON_HD inline float fast_erff(float a) {
  const float t = float_from_bits(bits_of(a) & 0x7FFFFFFFu);
  const float s = a * a;
  // |a| > 0.927734375: erf = 1 - exp(poly(t)), sign restored.
  float r = fmaf(-1.72853470e-5f, t, 3.83197126e-4f);
  const float u = fmaf(-3.88396438e-3f, t, 2.42546219e-2f);
  r = fmaf(r, s, u);
  r = fmaf(r, t, -1.06777877e-1f);
  r = fmaf(r, t, -6.34846687e-1f);
  r = fmaf(r, t, -1.28717512e-1f);
  r = fmaf(r, t, -t);
  const float e = fast_expf(r < -87.0f ? -87.0f : r);
  const float big = float_from_bits(bits_of(1.0f - e) | (bits_of(a) & 0x80000000u));
  // |a| <= 0.927734375: odd polynomial.
  float q = -5.96761703e-4f;
  q = fmaf(q, s, 4.99119423e-3f);
  q = fmaf(q, s, -2.67681349e-2f);
  q = fmaf(q, s, 1.12819925e-1f);
  q = fmaf(q, s, -3.76125336e-1f);
  q = fmaf(q, s, 1.28379166e-1f);
  const float small = fmaf(q, a, a);
  return t > 0.927734375f ? big : small;
}

namespace act_detail {
PARITRON_HD inline float exp_(float x) { return fast_expf(x); }
PARITRON_HD inline double exp_(double x) { return exp(x); }
PARITRON_HD inline float erf_(float x) { return fast_erff(x); }
PARITRON_HD inline double erf_(double x) { return erf(x); }
PARITRON_HD inline float tanh_(float x) { return fast_tanhf(x); }
PARITRON_HD inline double tanh_(double x) { return tanh(x); }
template <class T> PARITRON_HD inline T sigmoid(T x) { return T(1) / (T(1) + exp_(-x)); }

inline constexpr double kSqrt1_2 = 0.70710678118654752440;
inline constexpr double kInvSqrt2Pi = 0.39894228040143267794;
inline constexpr double k2OverSqrtPi = 1.12837916709551257390;
inline constexpr double kOpenaiSqrt2OverPi = 0.7978845608028654;
inline constexpr double kFusedSqrt2OverPi = 0.79788456;
inline constexpr double kFusedBackCoeff = 0.1070322243;
inline constexpr double kTanhCubic = 0.044715;
inline constexpr double kErfGeluDivisor = 1.41421;
inline constexpr double kQuickGeluAlpha = 1.702;
}  // namespace act_detail

template <class T> PARITRON_HD inline T act_value(Act a, T x) {
  using namespace act_detail;
  switch (a) {
    case Act::kGelu: return x * T(0.5) * (T(1) + erf_(x * T(kSqrt1_2)));
    case Act::kSilu: return x * sigmoid(x);
    case Act::kRelu: return x > T(0) ? x : T(0);
    case Act::kSquaredRelu: return x > T(0) ? x * x : T(0);
    case Act::kOpenaiGelu:
      return T(0.5) * x * (T(1) + tanh_(T(kOpenaiSqrt2OverPi) * x * (T(1) + T(kTanhCubic) * x * x)));
    case Act::kErfGelu: return x * T(0.5) * (erf_(x / T(kErfGeluDivisor)) + T(1));
    case Act::kQuickGelu: return x * sigmoid(T(kQuickGeluAlpha) * x);
    case Act::kBiasGeluTanh:
      return x * T(0.5) * (T(1) + tanh_(T(kFusedSqrt2OverPi) * x * (T(1) + T(kTanhCubic) * x * x)));
  }
  return x;
}

// The derivative Megatron's backward multiplies dy by (autograd's, or the
// fused kernel's hand-written one).
template <class T> PARITRON_HD inline T act_derivative(Act a, T x) {
  using namespace act_detail;
  switch (a) {
    case Act::kGelu:
      return T(0.5) * (T(1) + erf_(x * T(kSqrt1_2))) + x * T(kInvSqrt2Pi) * exp_(T(-0.5) * x * x);
    case Act::kSilu: {
      const T s = sigmoid(x);
      return s * (T(1) + x * (T(1) - s));
    }
    case Act::kRelu: return x > T(0) ? T(1) : T(0);
    case Act::kSquaredRelu: return x > T(0) ? T(2) * x : T(0);
    case Act::kOpenaiGelu: {
      const T t = tanh_(T(kOpenaiSqrt2OverPi) * x * (T(1) + T(kTanhCubic) * x * x));
      return T(0.5) * (T(1) + t) +
             T(0.5) * x * (T(1) - t * t) * T(kOpenaiSqrt2OverPi) * (T(1) + T(3.0 * kTanhCubic) * x * x);
    }
    case Act::kErfGelu: {
      const T u = x / T(kErfGeluDivisor);
      return T(0.5) * (erf_(u) + T(1)) + x * T(0.5) * T(k2OverSqrtPi) * exp_(-u * u) / T(kErfGeluDivisor);
    }
    case Act::kQuickGelu: {
      const T s = sigmoid(T(kQuickGeluAlpha) * x);
      return s + x * T(kQuickGeluAlpha) * s * (T(1) - s);
    }
    case Act::kBiasGeluTanh: {
      const T t = tanh_(T(kFusedSqrt2OverPi) * x * (T(1) + T(kTanhCubic) * x * x));
      return T(0.5) * x * ((T(1) - t * t) * (T(kFusedSqrt2OverPi) + T(kFusedBackCoeff) * x * x)) +
             T(0.5) * (T(1) + t);
    }
  }
  return T(0);
}

// One element of bias + activation (+ GLU), forward: y = act(a) or act(a) * g.
template <class T> PARITRON_HD inline T bias_act_value(Act kind, T a, bool glu, T g) {
  const T v = act_value(kind, a);
  return glu ? v * g : v;
}

// Backward of one element: da = dy * act'(a) (* g under GLU), dg = dy * act(a).
template <class T> PARITRON_HD inline void bias_act_grad(Act kind, T a, bool glu, T g, T dy, T* da, T* dg) {
  if (!glu) {
    *da = dy * act_derivative(kind, a);
    return;
  }
  *da = dy * g * act_derivative(kind, a);
  *dg = dy * act_value(kind, a);
}

}  // namespace paritron::math
