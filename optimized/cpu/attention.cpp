// See attention.h. FlashAttention-2 on the CPU: fp32 tiles, AVX2 + FMA
// micro-kernels, an online softmax in the forward and P recomputed from the
// saved log-sum-exp in the backward.
//
// Tiles: kBq query rows x kBk keys. Per thread the working set is a few
// tiles (Q, S/P, O: ~50 KiB at hn = 64). The operands are packed once per
// call into tile-contiguous copies (forward: K^T and V tiles; backward: Q and
// dO tiles), so the micro-kernels read sequential memory and no tile is
// re-packed for every tile it meets; the packs are the size of the inputs,
// so memory stays O(s) whatever the sequence length.
//
// Masks are evaluated per tile: a tile is "visible" (nothing masked),
// "masked" (everything masked) or "partial" (per-element check). Fully masked
// tiles are processed last and skipped when exact: a masked score is `fill`,
// and exp(fill - m) is 0 in fp32 once m > fill + 104, so when every row's
// running max (forward) / lse (backward) is past that, the tile adds nothing.
// A fully masked row (padding) never gets there and comes out uniform.
#include "optimized/cpu/attention.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "common/error.h"
#include "common/math/float_format.h"
#include "common/math/random.h"
#include "optimized/faults.h"

namespace paritron::opt::cpu {
namespace {

constexpr int kBq = 64;         // query rows per tile
constexpr int kBk = 64;         // keys per tile (multiple of 16: the micro-kernel width)
constexpr float kUnderflow = 104.0f;  // exp(-104) rounds to 0 in fp32

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------
// Micro-kernels: C[M x N] (+)= A[M x K] B[K x N], B and C row-major with
// strides, N % 16 == 0, any M and K. A is row-major (a(i,k) = A[i lda + k])
// or, with kATrans, stored transposed (a(i,k) = A[k lda + i]): the products
// with P^T and dS^T in the backward read the score tile in place instead of
// transposing it.
//
// Register block MR x 16 (MR = 6: 12 accumulators + 2 B vectors + 1
// broadcast = 15 of the 16 ymm registers; 12 independent FMA chains cover
// Zen 3's 4-cycle latency on its 2 FMA pipes with room to spare, where a
// 4 x 16 block's 8 chains only just do). The B panel (K x 16) stays in L1
// while the MR-row blocks of A stream past it.
template <int MR, bool kAccumulate, bool kATrans>
inline void micro_kernel(int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  __m256 c[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    if constexpr (kAccumulate) {
      c[r][0] = _mm256_loadu_ps(C + r * ldc), c[r][1] = _mm256_loadu_ps(C + r * ldc + 8);
    } else {
      c[r][0] = c[r][1] = _mm256_setzero_ps();
    }
  }
  for (int k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    const float* a = kATrans ? A + k * lda : A + k;
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(kATrans ? a + r : a + r * lda);
      c[r][0] = _mm256_fmadd_ps(ar, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(ar, b1, c[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(C + r * ldc, c[r][0]), _mm256_storeu_ps(C + r * ldc + 8, c[r][1]);
}

template <bool kAccumulate, bool kATrans = false>
void gemm(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  for (int j = 0; j < N; j += 16) {
    int i = 0;
    // Row offset i of A: row i (row-major) or column i (transposed).
    auto a_at = [&](int i) { return kATrans ? A + i : A + i * lda; };
    for (; i + 6 <= M; i += 6) micro_kernel<6, kAccumulate, kATrans>(K, a_at(i), lda, B + j, ldb, C + i * ldc + j, ldc);
    if (i + 4 <= M) micro_kernel<4, kAccumulate, kATrans>(K, a_at(i), lda, B + j, ldb, C + i * ldc + j, ldc), i += 4;
    if (i + 2 <= M) micro_kernel<2, kAccumulate, kATrans>(K, a_at(i), lda, B + j, ldb, C + i * ldc + j, ldc), i += 2;
    if (i < M) micro_kernel<1, kAccumulate, kATrans>(K, a_at(i), lda, B + j, ldb, C + i * ldc + j, ldc);
  }
}

// exp on 8 floats (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6
// polynomial, ~1 ulp). Inputs below -87.3 (including -inf) give 0; the
// scores here are never large and positive (x = s - max <= 0).
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n via the exponent bits (n in [-126, 127] after the clamp).
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x rounded to the probabilities' dtype (Megatron casts the softmax output).
inline float round_probs(float x, DType dt) {
  if (dt == DType::BF16 && faults::active(faults::Fault::bf16_truncation)) {  // fault: truncation, not RNE
    return math::float_from_bits(math::bits_of(x) & 0xFFFF0000u);
  }
  if (dt == DType::BF16) return math::bf16_bits_to_float(math::float_to_bf16_bits(x));
  if (dt == DType::F16) return static_cast<float>(math::round_to(x, math::kFloat16));
  return x;
}

// ---------------------------------------------------------------------------
// The problem, resolved once: strides, global indexing, mask evaluation.
struct Problem {
  const AttentionArgs& a;
  int64_t hn, hn_pad, r;         // r = heads per group
  int64_t q_stride, kv_stride;   // floats between consecutive sequence rows of one head
  int64_t heads_global, Sq, Sk;  // global extents (dropout index, explicit mask)
  float keep_scale = 1.0f;
  bool drop = false, round_p = false;

  explicit Problem(const AttentionArgs& args) : a(args) {
    hn = a.head_dim;
    hn_pad = round_up(hn, 16);
    r = a.heads / a.groups;
    q_stride = a.batch * a.heads * hn;
    kv_stride = a.batch * a.groups * hn;
    heads_global = a.heads_global > 0 ? a.heads_global : a.heads;
    Sq = a.sq_global > 0 ? a.sq_global : a.sq;
    Sk = a.sk_global > 0 ? a.sk_global : a.sk;
    drop = a.dropout_p > 0.0f;
    keep_scale = static_cast<float>(1.0 / (1.0 - static_cast<double>(a.dropout_p)));
    round_p = a.probs_dtype == DType::BF16 || a.probs_dtype == DType::F16;
  }
  int64_t qpos(int64_t i) const { return a.q_positions.empty() ? i : a.q_positions[i]; }
  int64_t kpos(int64_t j) const { return a.k_positions.empty() ? j : a.k_positions[j]; }
  const float* q_row(const float* base, int64_t i, int64_t bi, int64_t h) const {
    return base + i * q_stride + (bi * a.heads + h) * hn;
  }
  const float* kv_row(const float* base, int64_t j, int64_t bi, int64_t g) const {
    return base + j * kv_stride + (bi * a.groups + g) * hn;
  }
  bool positional_masked(int64_t qp, int64_t kp) const {
    return (a.causal && kp > qp) || (a.window[0] >= 0 && kp < qp - a.window[0]) ||
           (a.window[1] >= 0 && kp > qp + a.window[1]);
  }
  bool explicit_masked(int64_t bi, int64_t hg, int64_t qp, int64_t kp) const {
    const auto& d = a.mask_dims;
    const int64_t mb = d[0] == 1 ? 0 : a.batch_offset + bi, mh = d[1] == 1 ? 0 : hg;
    const int64_t mq = d[2] == 1 ? 0 : qp, mk = d[3] == 1 ? 0 : kp;
    return a.mask[((mb * d[1] + mh) * d[2] + mq) * d[3] + mk] != 0;
  }
  // Dropout scale of global element (batch_offset + bi, hg, qp, kp): 0 or 1 / (1 - p).
  float dropout(int64_t bi, int64_t hg, int64_t qp, int64_t kp) const {
    const uint64_t flat = static_cast<uint64_t>((((a.batch_offset + bi) * heads_global + hg) * Sq + qp) * Sk + kp);
    const float u = math::uniform_float(a.dropout_key, flat);
    return static_cast<double>(u) >= static_cast<double>(a.dropout_p) ? keep_scale : 0.0f;
  }
};

enum class TileMask { kVisible, kPartial, kMasked };

// What the mask does to tile (rows qp[0..qn), keys k0..k0+kn) of (bi, head hg).
// Causal/window use the key range's min and max position (conservative for
// non-contiguous positions: "visible"/"masked" are only claimed when certain);
// an explicit mask is read byte by byte (Bq*Bk bytes, small next to the tile's
// FLOPs).
TileMask classify(const Problem& P, const int64_t* qp, int qn, int64_t k0, int kn, int64_t bi, int64_t hg) {
  int64_t kmin = P.kpos(k0), kmax = kmin;
  if (!P.a.k_positions.empty()) {
    for (int j = 1; j < kn; ++j) kmin = std::min(kmin, P.kpos(k0 + j)), kmax = std::max(kmax, P.kpos(k0 + j));
  } else {
    kmax = k0 + kn - 1;
  }
  const auto& a = P.a;
  bool any_visible = false, any_masked = false;
  for (int i = 0; i < qn && !(any_visible && any_masked); ++i) {
    const int64_t q = qp[i];
    const bool all_visible = (!a.causal || kmax <= q) && (a.window[0] < 0 || kmin >= q - a.window[0]) &&
                             (a.window[1] < 0 || kmax <= q + a.window[1]);
    const bool all_masked = (a.causal && kmin > q) || (a.window[0] >= 0 && kmax < q - a.window[0]) ||
                            (a.window[1] >= 0 && kmin > q + a.window[1]);
    if (a.mask == nullptr || all_masked) {
      any_visible |= !all_masked;
      any_masked |= !all_visible;
      continue;
    }
    for (int j = 0; j < kn; ++j) {
      const int64_t k = P.kpos(k0 + j);
      const bool m = (!all_visible && P.positional_masked(q, k)) || P.explicit_masked(bi, hg, q, k);
      any_masked |= m;
      any_visible |= !m;
    }
  }
  if (!any_masked) return TileMask::kVisible;
  return any_visible ? TileMask::kPartial : TileMask::kMasked;
}

// Keys k0..k0+kn at contiguous positions and no explicit mask: the visible
// keys of query position q are one interval [lo, hi) of j (causal and window
// bounds), so a partial tile's row is masked by two fills instead of a test
// per element. Returns false when that does not apply.
bool visible_interval(const Problem& P, int64_t q, int64_t k0, int kn, int& lo, int& hi) {
  const auto& a = P.a;
  if (!a.k_positions.empty() || a.mask != nullptr) return false;
  int64_t l = 0, h = kn;  // j range, [l, h)
  if (a.causal) h = std::min<int64_t>(h, q - k0 + 1);
  if (a.window[1] >= 0) h = std::min<int64_t>(h, q + a.window[1] - k0 + 1);
  if (a.window[0] >= 0) l = std::max<int64_t>(l, q - a.window[0] - k0);
  h = std::max<int64_t>(h, 0), l = std::min<int64_t>(l, h);
  lo = static_cast<int>(l), hi = static_cast<int>(h);
  return true;
}

// Row i of a score tile: s_j = scale * S_ij, masked entries = fill, columns
// past kn = -inf (not part of the row). Megatron's order: scale, then
// masked_fill.
void scale_and_mask_row(const Problem& P, float* s, int kn, int kn_pad, TileMask tm, int64_t q, int64_t k0,
                        int64_t bi, int64_t hg) {
  const __m256 sc = _mm256_set1_ps(P.a.softmax_scale);
  for (int j = 0; j < kn_pad; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), sc));
  if (tm == TileMask::kMasked) {
    std::fill(s, s + kn, P.a.fill);
  } else if (int lo, hi; tm == TileMask::kPartial && visible_interval(P, q, k0, kn, lo, hi)) {
    std::fill(s, s + lo, P.a.fill);
    std::fill(s + hi, s + kn, P.a.fill);
  } else if (tm == TileMask::kPartial) {
    for (int j = 0; j < kn; ++j) {
      const int64_t k = P.kpos(k0 + j);
      if (P.positional_masked(q, k) || (P.a.mask != nullptr && P.explicit_masked(bi, hg, q, k))) s[j] = P.a.fill;
    }
  }
  std::fill(s + kn, s + kn_pad, -std::numeric_limits<float>::infinity());
}

// Per-thread tile buffers (64-byte aligned rows not needed: unaligned loads).
struct Buffers {
  std::vector<float> q, o, s, kt, v, dp, t, k, dk, dv;
};

// Packs keys k0..k0+kn of (bi, g) from a [sk, b, ng, hn] tensor as the
// transpose [hn, kBk] (zero columns past kn): the B operand of S = Q K^T.
void pack_transposed(const Problem& P, const float* src, int64_t k0, int kn, int64_t bi, int64_t g, float* dst) {
  std::fill(dst, dst + P.hn * kBk, 0.0f);
  for (int j = 0; j < kn; ++j) {
    const float* row = P.kv_row(src, k0 + j, bi, g);
    for (int64_t d = 0; d < P.hn; ++d) dst[d * kBk + j] = row[d];
  }
}

// Packs rows k0..k0+kn of (bi, g) as [kBk, hn_pad] (zero padding): the B
// operand of O += P V and dQ += dS K.
void pack_rows(const Problem& P, const float* src, int64_t k0, int kn, int64_t bi, int64_t g, float* dst) {
  std::fill(dst, dst + kBk * P.hn_pad, 0.0f);
  for (int j = 0; j < kn; ++j) std::memcpy(dst + j * P.hn_pad, P.kv_row(src, k0 + j, bi, g), P.hn * sizeof(float));
}

// Query-side rows i0..i0+qn of head h as [kBq, hn_pad], zero padded.
void load_q_rows(const Problem& P, const float* src, int64_t i0, int qn, int64_t bi, int64_t h, float* dst) {
  std::fill(dst, dst + kBq * P.hn_pad, 0.0f);
  for (int i = 0; i < qn; ++i) std::memcpy(dst + i * P.hn_pad, P.q_row(src, i0 + i, bi, h), P.hn * sizeof(float));
}

// Whole-tensor packs, built once per call so that no tile is packed again
// for every query tile that reads it (the packs cost O(s) memory, the size
// of the inputs). Storage is left uninitialised: the packing loops write
// every element, padding included, from the threads that later read it.
struct KvPack {
  std::unique_ptr<float[]> kt, v;  // K^T tiles [b, ng, nkt, hn, kBk]; V tiles [b, ng, nkt, kBk, hn_pad]
  int64_t nkt = 0, hn = 0, hp = 0, groups = 0;
  const float* kt_tile(int64_t bi, int64_t g, int64_t t) const {
    return kt.get() + ((bi * groups + g) * nkt + t) * hn * kBk;
  }
  const float* v_tile(int64_t bi, int64_t g, int64_t t) const {
    return v.get() + ((bi * groups + g) * nkt + t) * kBk * hp;
  }
};

KvPack pack_kv(const Problem& P, const float* k, const float* v) {
  KvPack kv;
  kv.nkt = (P.a.sk + kBk - 1) / kBk, kv.hn = P.hn, kv.hp = P.hn_pad, kv.groups = P.a.groups;
  const int64_t tiles = P.a.batch * P.a.groups * kv.nkt;
  kv.kt.reset(new float[tiles * kv.hn * kBk]);
  kv.v.reset(new float[tiles * kBk * kv.hp]);
#pragma omp parallel for schedule(static)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t t = tile % kv.nkt, bg = tile / kv.nkt;
    const int64_t bi = bg / P.a.groups, g = bg % P.a.groups;
    const int kn = static_cast<int>(std::min<int64_t>(kBk, P.a.sk - t * kBk));
    pack_transposed(P, k, t * kBk, kn, bi, g, kv.kt.get() + tile * kv.hn * kBk);
    pack_rows(P, v, t * kBk, kn, bi, g, kv.v.get() + tile * kBk * kv.hp);
  }
  return kv;
}

// Query-side tensor [sq, b, np, hn] as [b, np, nqt * kBq, hn_pad], zero
// padded: each query tile is a contiguous [kBq, hn_pad] block.
std::unique_ptr<float[]> pack_queries(const Problem& P, const float* src) {
  const int64_t nqt = (P.a.sq + kBq - 1) / kBq, tiles = P.a.batch * P.a.heads * nqt;
  std::unique_ptr<float[]> dst(new float[tiles * kBq * P.hn_pad]);
#pragma omp parallel for schedule(static)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t qt = tile % nqt, bh = tile / nqt;
    const int qn = static_cast<int>(std::min<int64_t>(kBq, P.a.sq - qt * kBq));
    load_q_rows(P, src, qt * kBq, qn, bh / P.a.heads, bh % P.a.heads, dst.get() + tile * kBq * P.hn_pad);
  }
  return dst;
}

void check_args(const AttentionArgs& a, const char* op) {
  if (a.batch < 1 || a.sq < 0 || a.sk < 0 || a.heads < 1 || a.groups < 1 || a.head_dim < 1 ||
      a.heads % a.groups != 0) {
    throw Error(fmt::format("{}: bad shape b={} sq={} sk={} np={} ng={} hn={} (np must be a multiple of ng)", op,
                            a.batch, a.sq, a.sk, a.heads, a.groups, a.head_dim));
  }
  if (!a.q_positions.empty() && static_cast<int64_t>(a.q_positions.size()) != a.sq) {
    throw Error(fmt::format("{}: {} q_positions for sq = {}", op, a.q_positions.size(), a.sq));
  }
  if (!a.k_positions.empty() && static_cast<int64_t>(a.k_positions.size()) != a.sk) {
    throw Error(fmt::format("{}: {} k_positions for sk = {}", op, a.k_positions.size(), a.sk));
  }
  if (a.dropout_p < 0.0f || a.dropout_p >= 1.0f) {
    throw Error(fmt::format("{}: dropout_p = {} must be in [0, 1)", op, a.dropout_p));
  }
  if (a.mask != nullptr) {
    const auto& d = a.mask_dims;
    if (d[0] < 1 || d[1] < 1 || d[2] < 1 || d[3] < 1) {
      throw Error(fmt::format("{}: explicit mask dims [{}, {}, {}, {}] must be >= 1", op, d[0], d[1], d[2], d[3]));
    }
  }
}

// The key tiles of one query tile in processing order: every tile with a
// visible entry first, then the fully masked ones (second list).
void order_tiles(const Problem& P, const int64_t* qp, int qn, int64_t bi, int64_t hg, std::vector<int64_t>& first,
                 std::vector<int64_t>& masked, std::vector<TileMask>& kinds) {
  const int64_t nkt = (P.a.sk + kBk - 1) / kBk;
  first.clear(), masked.clear();
  kinds.resize(nkt);
  for (int64_t t = 0; t < nkt; ++t) {
    const int kn = static_cast<int>(std::min<int64_t>(kBk, P.a.sk - t * kBk));
    kinds[t] = classify(P, qp, qn, t * kBk, kn, bi, hg);
    (kinds[t] == TileMask::kMasked ? masked : first).push_back(t);
  }
}

bool all_above(const float* x, int n, float threshold) {
  for (int i = 0; i < n; ++i)
    if (!(x[i] > threshold)) return false;
  return true;
}

// ---------------------------------------------------------------------------
// Forward of one (batch bi, head h, query tile i0..i0+qn). With `stats`
// only the row statistics are computed: stats[i] = {max, log(sum)} (the
// backward's exact form of lse for rows near `fill`, see there).
void forward_tile(const Problem& P, const float* q, const KvPack& kv, float* out, float* lse, int64_t bi, int64_t h,
                  int64_t i0, int qn, Buffers& B, std::pair<float, float>* stats = nullptr) {
  const auto& a = P.a;
  const int64_t hn = P.hn, hp = P.hn_pad, g = h / P.r, hg = a.head_offset + h;
  const int mq = static_cast<int>(round_up(qn, 4));
  int64_t qp[kBq];
  for (int i = 0; i < qn; ++i) qp[i] = P.qpos(i0 + i);
  float m[kBq], l[kBq];
  std::fill(m, m + kBq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + kBq, 0.0f);

  load_q_rows(P, q, i0, qn, bi, h, B.q.data());
  std::fill(B.o.begin(), B.o.end(), 0.0f);
  std::vector<int64_t> first, masked;
  std::vector<TileMask> kinds;
  order_tiles(P, qp, qn, bi, hg, first, masked, kinds);
  // 16-bit probabilities are rounded after normalisation (Megatron rounds the
  // softmax output), so they need the final max and sum first: a statistics
  // pass, then the PV pass with P = exp(s - lse). fp32 keeps one pass.
  const bool two_pass = P.round_p || stats != nullptr;
  const float* S = B.s.data();

  // S = Q K_t^T for key tile t, scaled and masked. A full, fully visible
  // tile in the one-pass form is left unscaled: the statistics pass below
  // applies the scale as it reads S (the same product, rounded the same way),
  // which saves a pass over the tile. Returns the factor still to apply.
  auto scores = [&](int64_t t, int kn) {
    gemm<false>(mq, kBk, static_cast<int>(hn), B.q.data(), hp, kv.kt_tile(bi, g, t), kBk, B.s.data(), kBk);
    if (!two_pass && kinds[t] == TileMask::kVisible && kn == kBk) return a.softmax_scale;
    for (int i = 0; i < qn; ++i) scale_and_mask_row(P, B.s.data() + i * kBk, kn, kBk, kinds[t], qp[i], t * kBk, bi, hg);
    return 1.0f;
  };
  // Online softmax statistics of tile t (S times `scale`): new running max,
  // rescale factor of what was accumulated, and the sum of exp(s - m_new).
  // When `p_out`, the probabilities exp(s - m_new) are left in S for the PV
  // product.
  auto update_stats = [&](float scale, bool p_out, float* alpha) {
    const __m256 sc = _mm256_set1_ps(scale);
    float m_old[kBq], rowsum[kBq];
    std::copy(m, m + kBq, m_old);
    for (int i = 0; i < qn; ++i) {
      float* s = B.s.data() + i * kBk;
      __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      for (int j = 0; j < kBk; j += 8) mx = _mm256_max_ps(mx, _mm256_mul_ps(_mm256_loadu_ps(s + j), sc));
      const float m_new = std::max(m[i], hmax8(mx));
      const __m256 mv = _mm256_set1_ps(m_new);
      __m256 sum = _mm256_setzero_ps();
      for (int j = 0; j < kBk; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), sc), mv));
        sum = _mm256_add_ps(sum, e);
        if (p_out) _mm256_storeu_ps(s + j, e);
      }
      rowsum[i] = hsum8(sum);
      m[i] = m_new;
    }
    // alpha = exp(m_old - m_new) (0 for a first tile: m_old = -inf), 8 rows
    // at a time; exactly 1 where the max did not move.
    for (int i = 0; i < qn; i += 8) {
      const __m256 mo = _mm256_loadu_ps(m_old + i);
      const __m256 first = _mm256_cmp_ps(mo, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
      const __m256 al = _mm256_andnot_ps(first, exp8(_mm256_sub_ps(mo, _mm256_loadu_ps(m + i))));
      _mm256_storeu_ps(alpha + i, al);
    }
    for (int i = 0; i < qn; ++i) l[i] = l[i] * alpha[i] + rowsum[i];
  };
  auto process = [&](int64_t t) {
    const int kn = static_cast<int>(std::min<int64_t>(kBk, a.sk - t * kBk));
    const float scale = scores(t, kn);
    float alpha[kBq];
    if (two_pass) {
      update_stats(scale, false, alpha);
      return;
    }
    update_stats(scale, true, alpha);
    for (int i = 0; i < qn; ++i) {
      float* s = B.s.data() + i * kBk;
      if (P.drop) {
        for (int j = 0; j < kn; ++j) s[j] *= P.dropout(bi, hg, qp[i], P.kpos(t * kBk + j));
      }
      if (alpha[i] != 1.0f) {
        float* o = B.o.data() + i * hp;
        const __m256 av = _mm256_set1_ps(alpha[i]);
        for (int64_t d = 0; d < hp; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), av));
      }
    }
    std::fill(B.s.data() + qn * kBk, B.s.data() + mq * kBk, 0.0f);  // padding rows add nothing
    gemm<true>(mq, static_cast<int>(hp), kBk, S, kBk, kv.v_tile(bi, g, t), hp, B.o.data(), hp);
  };

  for (int64_t t : first) process(t);
  if (!masked.empty() && !all_above(m, qn, a.fill + kUnderflow)) {
    for (int64_t t : masked) process(t);
  }

  float lse_row[kBq];
  for (int i = 0; i < qn; ++i) lse_row[i] = m[i] + std::log(l[i]);
  if (stats != nullptr) {
    for (int i = 0; i < qn; ++i) stats[i] = {m[i], std::log(l[i])};
    return;
  }

  if (two_pass) {
    // P = exp(s - lse) normalised, rounded to probs_dtype, dropped (the
    // product rounded again, as Megatron's dropout output), then O += P V.
    auto pv = [&](int64_t t) {
      const int kn = static_cast<int>(std::min<int64_t>(kBk, a.sk - t * kBk));
      scores(t, kn);
      for (int i = 0; i < qn; ++i) {
        float* s = B.s.data() + i * kBk;
        const __m256 lv = _mm256_set1_ps(lse_row[i]);
        for (int j = 0; j < kBk; j += 8) _mm256_storeu_ps(s + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), lv)));
        for (int j = 0; j < kn; ++j) {
          s[j] = round_probs(s[j], a.probs_dtype);
          if (P.drop) s[j] = round_probs(s[j] * P.dropout(bi, hg, qp[i], P.kpos(t * kBk + j)), a.probs_dtype);
        }
      }
      std::fill(B.s.data() + qn * kBk, B.s.data() + mq * kBk, 0.0f);
      gemm<true>(mq, static_cast<int>(hp), kBk, S, kBk, kv.v_tile(bi, g, t), hp, B.o.data(), hp);
    };
    for (int64_t t : first) pv(t);
    if (!masked.empty() && !all_above(lse_row, qn, a.fill + kUnderflow)) {
      for (int64_t t : masked) pv(t);
    }
  }

  for (int i = 0; i < qn; ++i) {
    const float inv = two_pass ? 1.0f : 1.0f / l[i];
    const float* o = B.o.data() + i * hp;
    float* dst = out + (i0 + i) * P.q_stride + (bi * a.heads + h) * hn;
    for (int64_t d = 0; d < hn; ++d) dst[d] = o[d] * inv;
    lse[(bi * a.heads + h) * a.sq + i0 + i] = lse_row[i];
  }
}

}  // namespace

void attention_forward(const AttentionArgs& args, const float* q, const float* k, const float* v, float* out,
                       float* lse) {
  check_args(args, "attention_forward");
  const Problem P(args);
  const int64_t nqt = (args.sq + kBq - 1) / kBq;
  const int64_t tasks = args.batch * args.heads * nqt;
  const KvPack kv = pack_kv(P, k, v);
#pragma omp parallel
  {
    Buffers B;
    B.q.resize(kBq * P.hn_pad);
    B.o.resize(kBq * P.hn_pad);
    B.s.resize(kBq * kBk);
    // Query tiles in reverse order: under a causal mask the late tiles are
    // the expensive ones, and dynamic scheduling balances best when the
    // large tasks start first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t qt = nqt - 1 - task % nqt;
      const int64_t bh = task / nqt;
      const int64_t i0 = qt * kBq;
      const int qn = static_cast<int>(std::min<int64_t>(kBq, args.sq - i0));
      forward_tile(P, q, kv, out, lse, bh / args.heads, bh % args.heads, i0, qn, B);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward (FlashAttention-2): per (batch, group), key tiles outer; for each
// head of the group and each query tile recompute S and P = exp(s - lse),
// then dV += P'^T dO, dP = dO V^T, dS = P o (dP' - D) (0 where masked:
// masked_fill passes no gradient), dK += scale dS^T Q, dQ += scale dS K.
// A (batch, group) task owns dk/dv rows of its group and dq rows of its
// heads, so there are no races and no atomics (with fewer pairs than
// threads, a pair's key tiles are split over tasks, each with its own dq
// copy, see below). The products with P'^T and dS^T read the score tile
// transposed in place (gemm<.., true>), and dS K accumulates straight into dq.
//
// D = rowsum(P o dP') = rowsum(dO o O) when P' is P (times the dropout
// scale): true for fp32 probabilities. With 16-bit probabilities the output
// was computed from rounded P, so D is recomputed from P and dP directly
// (what Megatron's softmax backward, fed fp32 probs, computes).
void attention_backward(const AttentionArgs& args, const float* q, const float* k, const float* v, const float* out,
                        const float* lse, const float* dout, float* dq, float* dk, float* dv) {
  check_args(args, "attention_backward");
  const Problem P(args);
  const auto& a = args;
  const int64_t hn = P.hn, hp = P.hn_pad;
  const int64_t nqt = (a.sq + kBq - 1) / kBq, nkt = (a.sk + kBk - 1) / kBk;
  std::vector<float> D(static_cast<size_t>(a.batch * a.heads * a.sq), 0.0f);  // [b, np, sq]: O(s)

  if (!P.round_p) {
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < a.sq * a.batch * a.heads; ++row) {
      const int64_t i = row / (a.batch * a.heads), bh = row % (a.batch * a.heads);
      const float* o = out + row * hn;
      const float* d_o = dout + row * hn;
      double acc = 0.0;
      for (int64_t d = 0; d < hn; ++d) acc += static_cast<double>(o[d]) * d_o[d];
      D[bh * a.sq + i] = static_cast<float>(acc);
    }
  }

  // P = exp(s - lse) needs lse to fp32 precision relative to the scores.
  // A row whose max is `fill` (fully masked: padding) has lse = fill +
  // log(sum) ~ -10000, where the fp32 ulp (1e-3) would make P off by 1e-3.
  // For those rows the (max, log sum) pair is recomputed exactly (a stats
  // pass of the forward, only for query tiles that contain such rows), and
  // P = exp((s - max) - log sum).
  std::vector<std::pair<float, float>> stats(static_cast<size_t>(a.batch * a.heads * a.sq));
  for (int64_t i = 0; i < a.batch * a.heads * a.sq; ++i) stats[i] = {lse[i], 0.0f};
  bool need_stats = false;
  for (int64_t bh = 0; bh < a.batch * a.heads && !need_stats; ++bh) {
    need_stats = !all_above(lse + bh * a.sq, static_cast<int>(a.sq), a.fill + kUnderflow);
  }
  if (need_stats) {
    const KvPack kv = pack_kv(P, k, v);
    const int64_t ntasks = a.batch * a.heads * nqt;
#pragma omp parallel
    {
      Buffers B;
      bool ready = false;
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < ntasks; ++task) {
        const int64_t bh = task / nqt, i0 = (task % nqt) * kBq;
        const int qn = static_cast<int>(std::min<int64_t>(kBq, a.sq - i0));
        if (all_above(lse + bh * a.sq + i0, qn, a.fill + kUnderflow)) continue;
        if (!ready) {
          B.q.resize(kBq * hp), B.o.resize(kBq * hp), B.s.resize(kBq * kBk);
          ready = true;
        }
        forward_tile(P, q, kv, nullptr, nullptr, bh / a.heads, bh % a.heads, i0, qn, B, &stats[bh * a.sq + i0]);
      }
    }
  }

  // Q and dO tiles are read once per key tile: packed once.
  const std::unique_ptr<float[]> q_pack = pack_queries(P, q), do_pack = pack_queries(P, dout);
  // Tasks: (batch, group, key chunk). With fewer (batch, group) pairs than
  // threads (GQA / MQA, a TP slice) the key tiles of a pair are dealt out
  // round-robin to `chunks` tasks (round-robin: under a causal mask the early
  // key tiles see more queries). dk/dv rows stay owned by one task; the dq
  // contributions of chunk c > 0 go to a private copy of dq, summed in at the
  // end. The 16-bit-probabilities pass for D is per pair: not split.
  const int64_t pairs = a.batch * a.groups;
  const int64_t nthreads = omp_get_max_threads();
  const int64_t chunks =
      P.round_p || pairs >= nthreads ? 1 : std::max<int64_t>(1, std::min(nkt, (nthreads + pairs - 1) / pairs));
  const int64_t q_numel = a.sq * P.q_stride;
  std::unique_ptr<float[]> dq_private;
  if (chunks > 1) dq_private.reset(new float[(chunks - 1) * q_numel]());
  const int64_t tasks = pairs * chunks;
#pragma omp parallel
  {
    Buffers B;
    const float* q_tile = nullptr;   // [kBq, hn_pad] tiles of the packs
    const float* do_tile = nullptr;
    B.s.resize(kBq * kBk);
    B.dp.resize(kBq * kBk);
    B.t.resize(kBq * kBk);  // P' (16-bit or dropped probabilities)
    B.kt.resize(hn * kBk);
    B.v.resize(hn * kBk);  // V^T
    B.k.resize(kBk * hp);
    B.o.resize(kBq * hp);  // dQ tile
    B.dk.resize(kBk * hp);
    B.dv.resize(kBk * hp);
    std::vector<TileMask> kinds(nkt);

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t chunk = task % chunks, pair = task / chunks;
      const int64_t bi = pair / a.groups, g = pair % a.groups;
      float* const dq_out = chunk == 0 ? dq : dq_private.get() + (chunk - 1) * q_numel;  // private copies start zero
      if (chunk == 0) {
        for (int64_t h = g * P.r; h < (g + 1) * P.r; ++h) {
          for (int64_t i = 0; i < a.sq; ++i) std::fill_n(dq + i * P.q_stride + (bi * a.heads + h) * hn, hn, 0.0f);
        }
      }
      // Scores of (head h, q tile qt) against the packed key tile: S scaled,
      // masked, then P = exp(s - lse) in place; dP = dO V^T into B.dp. The Q
      // and dO tiles are q_tile, do_tile. Returns false when the tile is
      // skipped (fully masked and exactly zero).
      int64_t qp[kBq];
      float lse_r[kBq], D_r[kBq], ll_r[kBq];
      auto recompute = [&](int64_t h, int qn, int64_t kt0, int kn, TileMask tm) {
        const int mq = static_cast<int>(round_up(qn, 4));
        const int64_t hg = a.head_offset + h;
        gemm<false>(mq, kBk, static_cast<int>(hn), q_tile, hp, B.kt.data(), kBk, B.s.data(), kBk);
        gemm<false>(mq, kBk, static_cast<int>(hn), do_tile, hp, B.v.data(), kBk, B.dp.data(), kBk);
        // A full visible tile is scaled as it is read (one pass); others
        // are scaled and masked first.
        const bool fused = tm == TileMask::kVisible && kn == kBk;
        const __m256 sc = _mm256_set1_ps(fused ? a.softmax_scale : 1.0f);
        for (int i = 0; i < qn; ++i) {
          float* s = B.s.data() + i * kBk;
          if (!fused) scale_and_mask_row(P, s, kn, kBk, tm, qp[i], kt0, bi, hg);
          const __m256 mv = _mm256_set1_ps(lse_r[i]), lv = _mm256_set1_ps(ll_r[i]);
          for (int j = 0; j < kBk; j += 8) {
            const __m256 x = _mm256_sub_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), sc), mv), lv);
            _mm256_storeu_ps(s + j, exp8(x));
          }
        }
        std::fill(B.s.data() + qn * kBk, B.s.data() + mq * kBk, 0.0f);
      };
      auto load_tiles = [&](int64_t h, int64_t i0, int qn) {
        const int64_t off = ((bi * a.heads + h) * nqt + i0 / kBq) * kBq * hp;
        q_tile = q_pack.get() + off, do_tile = do_pack.get() + off;
        for (int i = 0; i < qn; ++i) {
          qp[i] = P.qpos(i0 + i);
          const auto& st = stats[(bi * a.heads + h) * a.sq + i0 + i];
          ll_r[i] = st.second;
          lse_r[i] = st.first;  // = lse (ll_r = 0) except for rows near fill
        }
      };
      auto pack_keys = [&](int64_t t, int kn) {
        pack_transposed(P, k, t * kBk, kn, bi, g, B.kt.data());
        pack_transposed(P, v, t * kBk, kn, bi, g, B.v.data());
      };
      auto skip = [&](TileMask tm, int64_t h, int64_t i0, int qn) {
        return tm == TileMask::kMasked && all_above(lse + (bi * a.heads + h) * a.sq + i0, qn, a.fill + kUnderflow);
      };

      if (P.round_p) {
        // D = rowsum(P o dP') with fp32 P: one more pass over the keys.
        for (int64_t h = g * P.r; h < (g + 1) * P.r; ++h) {
          const int64_t hg = a.head_offset + h;
          for (int64_t qt = 0; qt < nqt; ++qt) {
            const int64_t i0 = qt * kBq;
            const int qn = static_cast<int>(std::min<int64_t>(kBq, a.sq - i0));
            load_tiles(h, i0, qn);
            double acc[kBq] = {};
            for (int64_t t = 0; t < nkt; ++t) {
              const int kn = static_cast<int>(std::min<int64_t>(kBk, a.sk - t * kBk));
              const TileMask tm = classify(P, qp, qn, t * kBk, kn, bi, hg);
              if (skip(tm, h, i0, qn)) continue;
              pack_keys(t, kn);
              recompute(h, qn, t * kBk, kn, tm);
              for (int i = 0; i < qn; ++i) {
                for (int j = 0; j < kn; ++j) {
                  float dpj = B.dp[i * kBk + j];
                  if (P.drop) dpj *= P.dropout(bi, hg, qp[i], P.kpos(t * kBk + j));
                  acc[i] += static_cast<double>(B.s[i * kBk + j]) * dpj;
                }
              }
            }
            for (int i = 0; i < qn; ++i) D[(bi * a.heads + h) * a.sq + i0 + i] = static_cast<float>(acc[i]);
          }
        }
      }

      for (int64_t t = chunk; t < nkt; t += chunks) {
        const int64_t kt0 = t * kBk;
        const int kn = static_cast<int>(std::min<int64_t>(kBk, a.sk - kt0));
        pack_keys(t, kn);
        pack_rows(P, k, kt0, kn, bi, g, B.k.data());
        std::fill(B.dk.begin(), B.dk.end(), 0.0f);
        std::fill(B.dv.begin(), B.dv.end(), 0.0f);
        for (int64_t h = g * P.r; h < (g + 1) * P.r; ++h) {
          const int64_t hg = a.head_offset + h;
          for (int64_t qt = 0; qt < nqt; ++qt) {
            const int64_t i0 = qt * kBq;
            const int qn = static_cast<int>(std::min<int64_t>(kBq, a.sq - i0));
            const int mq = static_cast<int>(round_up(qn, 4));
            for (int i = 0; i < qn; ++i) qp[i] = P.qpos(i0 + i);
            const TileMask tm = classify(P, qp, qn, kt0, kn, bi, hg);
            if (skip(tm, h, i0, qn)) continue;
            load_tiles(h, i0, qn);
            for (int i = 0; i < qn; ++i) D_r[i] = D[(bi * a.heads + h) * a.sq + i0 + i];
            recompute(h, qn, kt0, kn, tm);
            // dV += P'^T dO, P' the context probabilities. With fp32
            // probabilities and no dropout P' is P: the product reads S
            // transposed in place. Otherwise P' (rounded, dropped) goes to
            // T in S's layout, rows past qn zero.
            const float* pc = B.s.data();
            if (P.round_p || P.drop) {
              for (int i = 0; i < qn; ++i) {
                const float* s = B.s.data() + i * kBk;
                float* t = B.t.data() + i * kBk;
                for (int j = 0; j < kBk; ++j) {
                  float p = s[j];
                  if (j < kn) {
                    if (P.round_p) p = round_probs(p, a.probs_dtype);
                    if (P.drop) {
                      const float ds = P.dropout(bi, hg, qp[i], P.kpos(kt0 + j));
                      p = P.round_p ? round_probs(p * ds, a.probs_dtype) : p * ds;
                      B.dp[i * kBk + j] *= ds;  // dP' = dP * mask scale
                    }
                  }
                  t[j] = p;
                }
              }
              std::fill(B.t.data() + qn * kBk, B.t.data() + mq * kBk, 0.0f);
              pc = B.t.data();
            }
            gemm<true, true>(kBk, static_cast<int>(hp), mq, pc, kBk, do_tile, hp, B.dv.data(), hp);
            // dS = scale * P o (dP' - D), zero where masked, in place in S
            // (rows past qn stay zero: P is zero there).
            const bool partial = tm != TileMask::kVisible;
            for (int i = 0; i < qn; ++i) {
              float* s = B.s.data() + i * kBk;
              const float* dp = B.dp.data() + i * kBk;
              const __m256 dv_ = _mm256_set1_ps(D_r[i]), sc = _mm256_set1_ps(a.softmax_scale);
              for (int j = 0; j < kBk; j += 8) {
                const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), _mm256_sub_ps(_mm256_loadu_ps(dp + j), dv_));
                _mm256_storeu_ps(s + j, _mm256_mul_ps(x, sc));
              }
              int lo, hi;
              if (partial && tm == TileMask::kPartial && visible_interval(P, qp[i], kt0, kn, lo, hi)) {
                std::fill(s, s + lo, 0.0f);
                std::fill(s + hi, s + kn, 0.0f);
              } else if (partial) {
                for (int j = 0; j < kn; ++j) {
                  const int64_t kp = P.kpos(kt0 + j);
                  if (tm == TileMask::kMasked || P.positional_masked(qp[i], kp) ||
                      (a.mask != nullptr && P.explicit_masked(bi, hg, qp[i], kp))) {
                    s[j] = 0.0f;
                  }
                }
              }
              std::fill(s + kn, s + kBk, 0.0f);
            }
            // dK += dS^T Q (S read transposed in place).
            gemm<true, true>(kBk, static_cast<int>(hp), mq, B.s.data(), kBk, q_tile, hp, B.dk.data(), hp);
            // dQ += dS K: accumulated straight into dq when the tile is whole
            // (no padding rows, hn a multiple of 16: the padded columns would
            // touch the next head, which another thread may own); otherwise
            // through a scratch tile.
            float* dq_tile = dq_out + i0 * P.q_stride + (bi * a.heads + h) * hn;
            if (qn == mq && hn == hp) {
              gemm<true>(mq, static_cast<int>(hp), kBk, B.s.data(), kBk, B.k.data(), hp, dq_tile, P.q_stride);
            } else {
              gemm<false>(mq, static_cast<int>(hp), kBk, B.s.data(), kBk, B.k.data(), hp, B.o.data(), hp);
              for (int i = 0; i < qn; ++i) {
                float* dst = dq_tile + i * P.q_stride;
                const float* src = B.o.data() + i * hp;
                for (int64_t d = 0; d < hn; ++d) dst[d] += src[d];
              }
            }
          }
        }
        for (int j = 0; j < kn; ++j) {
          std::memcpy(dk + (kt0 + j) * P.kv_stride + (bi * a.groups + g) * hn, B.dk.data() + j * hp,
                      hn * sizeof(float));
          std::memcpy(dv + (kt0 + j) * P.kv_stride + (bi * a.groups + g) * hn, B.dv.data() + j * hp,
                      hn * sizeof(float));
        }
      }
    }
    if (chunks > 1) {
      // After the loop's barrier: dq += the private copies.
#pragma omp for schedule(static)
      for (int64_t e = 0; e < q_numel; ++e) {
        float acc = dq[e];
        for (int64_t c = 0; c + 1 < chunks; ++c) acc += dq_private[c * q_numel + e];
        dq[e] = acc;
      }
    }
  }
}

}  // namespace paritron::opt::cpu
