// LayerNorm / RMSNorm over one row (a token's h channels), single source
// (PARITRON_HD): T = float (bf16/fp16/fp32 values computed in fp32) or double
// (float64 runs). Semantics: reference/norm.h. The statistics are summed in
// double with 8 independent partial sums (vectorisable, order fixed), then
// kept as T (the fp32 mean / rstd Apex and TE save); the affine transform and
// the backward are evaluated in T.
//   LayerNorm  y = (x - mean) * rstd * gamma + beta, rstd = 1 / sqrt(var + eps), biased var
//   RMSNorm    y = x * rstd * gamma,                 rstd = 1 / sqrt(mean(x^2) + eps)
// Backward with xhat = (x - mean) rstd, g = dy gamma:
//   dx = rstd (g - mean(g) - xhat mean(g xhat))     (RMSNorm: no mean(g) term)
#pragma once

#include <cmath>
#include <cstdint>

#include "common/math/host_device.h"

namespace paritron::math {

namespace norm_detail {
inline constexpr int kLanes = 8;
// sum over i of f(i) in double, kLanes interleaved partial sums then a fixed tree.
template <class F> PARITRON_HD inline double lane_sum(int64_t n, F f) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += f(i + l);
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += f(i);
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}
}  // namespace norm_detail

// gamma as the kernel multiplies by it, for one channel: w, or w + 1 under
// zero-centered gamma (the caller rounds w + 1 to w's dtype for Apex).
template <class T> PARITRON_HD inline T norm_gamma(T w, bool zero_centered) { return zero_centered ? w + T(1) : w; }

// mean (0 for RMSNorm) and rstd of row x[0..h).
template <class T>
PARITRON_HD inline void norm_row_stats(const T* x, int64_t h, bool rms, double eps, T* mean_out, T* rstd_out) {
  const double inv_h = 1.0 / static_cast<double>(h);
  double mean = 0.0;
  if (!rms) mean = norm_detail::lane_sum(h, [&](int64_t i) { return static_cast<double>(x[i]); }) * inv_h;
  const double ss = norm_detail::lane_sum(h, [&](int64_t i) {
    const double d = static_cast<double>(x[i]) - mean;
    return d * d;
  });
  *mean_out = static_cast<T>(mean);
  *rstd_out = static_cast<T>(1.0 / sqrt(ss * inv_h + eps));
}

// y[c] = (x[c] - mean) * rstd * gamma[c] (+ beta[c]); beta may be null.
template <class T>
PARITRON_HD inline void norm_row_forward(const T* x, int64_t h, T mean, T rstd, const T* gamma, const T* beta, T* y) {
  if (beta != nullptr) {
    for (int64_t c = 0; c < h; ++c) y[c] = ((x[c] - mean) * rstd) * gamma[c] + beta[c];
  } else {
    for (int64_t c = 0; c < h; ++c) y[c] = ((x[c] - mean) * rstd) * gamma[c];
  }
}

// dx of one row (dx may alias dy); adds dy * xhat to dgamma_acc and dy to
// dbeta_acc (when not null): the caller's per-thread partial sums.
template <class T>
PARITRON_HD inline void norm_row_backward(const T* x, const T* dy, int64_t h, bool rms, T mean, T rstd,
                                          const T* gamma, T* dx, double* dgamma_acc, double* dbeta_acc) {
  const double inv_h = 1.0 / static_cast<double>(h);
  const T m = rms ? T(0) : mean;
  const double sum_g = rms ? 0.0 : norm_detail::lane_sum(h, [&](int64_t i) {
    return static_cast<double>(dy[i] * gamma[i]);
  });
  const double sum_gx = norm_detail::lane_sum(h, [&](int64_t i) {
    const T xhat = (x[i] - m) * rstd;
    return static_cast<double>((dy[i] * gamma[i]) * xhat);
  });
  const T mean_g = static_cast<T>(sum_g * inv_h);
  const T mean_gx = static_cast<T>(sum_gx * inv_h);
  for (int64_t c = 0; c < h; ++c) {
    const T xhat = (x[c] - m) * rstd;
    const T d = dy[c];
    if (dgamma_acc != nullptr) dgamma_acc[c] += static_cast<double>(d * xhat);
    if (dbeta_acc != nullptr) dbeta_acc[c] += static_cast<double>(d);
    const T g = d * gamma[c];
    dx[c] = rstd * ((g - mean_g) - xhat * mean_gx);
  }
}

}  // namespace paritron::math
