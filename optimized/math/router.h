// The MoE router's per-token math, single source (PARITRON_HD): top-k
// selection in torch.topk order with Megatron's (Paritron's) tie rule, the
// softmax of a row, logsumexp, the softmax backward of a row, and the
// switch load-balancing loss gradient. Evaluated in T = float (a kernel) or
// T = double (float64 runs, the host router of optimized/model/moe.cpp).
//
// Semantics: reference/moe_router.h (Megatron core_v0.5.0 router.py and
// moe_utils.py; spec §9.2):
//   * top-k order: descending value, equal values in ascending index, NaN
//     above everything (torch.topk);
//   * softmax: max-shifted, exp(x - max) / sum;
//   * logsumexp: max + log(sum exp(x - max)).
// Rounding of results to the dtypes Megatron stores them in is the caller's
// (the reference rounds each probability once, after the division).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/math/host_device.h"

namespace paritron::math {

namespace router_detail {
PARITRON_HD inline float exp_(float x) { return expf(x); }
PARITRON_HD inline double exp_(double x) { return exp(x); }
PARITRON_HD inline float log_(float x) { return logf(x); }
PARITRON_HD inline double log_(double x) { return log(x); }
template <class T>
PARITRON_HD inline bool isnan_(T x) {
  return x != x;
}
}  // namespace router_detail

// Whether element a of `row` comes before element b in torch.topk order
// (descending; NaN first; ties: the lower index first).
template <class T>
PARITRON_HD inline bool topk_before(const T* row, int64_t a, int64_t b) {
  const bool na = router_detail::isnan_(row[a]), nb = router_detail::isnan_(row[b]);
  if (na != nb) return na;
  if (!na && row[a] != row[b]) return row[a] > row[b];
  return a < b;
}

// The k largest elements of row[0..n) in torch.topk order, as indices into
// out[0..k) (k <= n). Insertion into a sorted list of k: O(n k), for the
// small E of a router row.
template <class T>
PARITRON_HD inline void topk_row(const T* row, int64_t n, int64_t k, int64_t* out) {
  int64_t have = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (have == k && !topk_before(row, i, out[k - 1])) continue;
    int64_t pos = have < k ? have++ : k - 1;
    while (pos > 0 && topk_before(row, i, out[pos - 1])) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = i;
  }
}

// Softmax of in[0..n) into out (may alias), computed in T.
template <class T>
PARITRON_HD inline void softmax_row(const T* in, T* out, int64_t n) {
  T mx = in[0];
  for (int64_t i = 1; i < n; ++i) mx = in[i] > mx ? in[i] : mx;
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += router_detail::exp_(in[i] - mx);
  for (int64_t i = 0; i < n; ++i) out[i] = router_detail::exp_(in[i] - mx) / sum;
}

// log(sum_i exp(in[i])), max-shifted.
template <class T>
PARITRON_HD inline T logsumexp_row(const T* in, int64_t n) {
  T mx = in[0];
  for (int64_t i = 1; i < n; ++i) mx = in[i] > mx ? in[i] : mx;
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += router_detail::exp_(in[i] - mx);
  return mx + router_detail::log_(sum);
}

// <g, p>: the dot product a softmax backward subtracts; the gradient of the
// softmax input is then p[i] * (g[i] - dot) (the caller rounds each term).
template <class T>
PARITRON_HD inline T softmax_backward_dot(const T* p, const T* g, int64_t n) {
  T dot = 0;
  for (int64_t i = 0; i < n; ++i) dot += g[i] * p[i];
  return dot;
}

// Gradient of the switch load-balancing loss (0.5.0
// switch_load_balancing_loss_func) with respect to the aux probability
// P[t, e] of any token t: E * coeff * count_e / (k T^2).
template <class T>
PARITRON_HD inline T aux_loss_prob_grad(int64_t experts, double coeff, int64_t count, int64_t topk, int64_t tokens) {
  return static_cast<T>(static_cast<double>(experts) * coeff * static_cast<double>(count) /
                        (static_cast<double>(topk) * static_cast<double>(tokens) * static_cast<double>(tokens)));
}

// moe_utils.sinkhorn(cost, tol) as Megatron runs it on fp32 logits, with
// the reference's arithmetic (reference/moe_router.h sinkhorn_fp32): c =
// exp(cost) rounded to fp32 (computed in double from the fp32 cost; the
// caller passes it), d0 = (1 / (C d1 + 1e-8)) * fp32(1/T), d1 = (1 / (d0^T C
// + 1e-8)) * fp32(1/E), row/column sums of fp32 products summed in double
// and rounded once, until mean |d1_old - d1| <= tol (at least one
// iteration; the first test is against the Python float 1e9). Writes
// out[t, e] = (d1[e] * c[t, e]) * d0[t]. d0 [T], d1 and d1_old [E] are
// scratch. Returns the iterations run, or -1 when max_iterations ran out.
PARITRON_HD inline int64_t sinkhorn_fp32(const float* c, int64_t tokens, int64_t experts, double tol,
                                         int64_t max_iterations, float* d0, float* d1, float* d1_old, float* out) {
  const float eps = 1e-8f;
  const float inv_tokens = static_cast<float>(1.0 / static_cast<double>(tokens));
  const float inv_experts = static_cast<float>(1.0 / static_cast<double>(experts));
  for (int64_t t = 0; t < tokens; ++t) d0[t] = 1.0f;
  for (int64_t e = 0; e < experts; ++e) d1[e] = d1_old[e] = 1.0f;
  double error = 1e9;
  bool first = true;
  int64_t iterations = 0;
  while (first ? error > tol : static_cast<float>(error) > static_cast<float>(tol)) {
    first = false;
    if (++iterations > max_iterations) return -1;
    for (int64_t t = 0; t < tokens; ++t) {
      double sum = 0;
      for (int64_t e = 0; e < experts; ++e) sum += static_cast<double>(d1[e] * c[t * experts + e]);
      const float denom = static_cast<float>(sum) + eps;
      d0[t] = (1.0f / denom) * inv_tokens;
    }
    for (int64_t e = 0; e < experts; ++e) {
      double sum = 0;
      for (int64_t t = 0; t < tokens; ++t) sum += static_cast<double>(d0[t] * c[t * experts + e]);
      const float denom = static_cast<float>(sum) + eps;
      d1[e] = (1.0f / denom) * inv_experts;
    }
    double abs_sum = 0;
    for (int64_t e = 0; e < experts; ++e) {
      const float d = d1_old[e] - d1[e];
      abs_sum += static_cast<double>(d < 0 ? -d : d);
    }
    error = static_cast<float>(abs_sum / static_cast<double>(experts));
    for (int64_t e = 0; e < experts; ++e) d1_old[e] = d1[e];
  }
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t e = 0; e < experts; ++e) out[t * experts + e] = (d1[e] * c[t * experts + e]) * d0[t];
  }
  return iterations;
}

}  // namespace paritron::math
