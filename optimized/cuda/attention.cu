// Core attention of the CUDA backend (cuda_backend.h): attention_forward and
// attention_backward, the contract of AttentionArgs (optimized/backend.h).
//
// What it computes: Megatron's DotProductAttention
// (megatron/core/transformer/dot_product_attention.py, spec §3, and the torch
// path of FusedScaleMaskSoftmax, spec §2.3): per (batch, query head j, KV
// group j / (np / ng)) scores s = scale * q.k, masked entries set to `fill`
// (-10000, not -inf: a fully masked row is uniform), softmax, dropout on the
// probabilities, the probabilities rounded to probs_dtype before the product
// with V. It is computed flash-style (FlashAttention-2, Dao 2023,
// arXiv:2307.08691): tiles of queries against tiles of keys with an online
// softmax in the forward, P recomputed from the saved log-sum-exp in the
// backward, and no s x s matrix in memory.
//
// The model is the CPU twin, optimized/cpu/attention.cpp: the same math in
// the same order, the same rounding points (listed there and below), the same
// tile schedule where it matters (fully masked tiles last, skipped when they
// add exactly nothing), the same argument checks and messages. Differences in
// bits come only from the order of fp32 sums and from expf/logf against the
// CPU's own exp (see "Where the GPU differs" at the end of this comment).
//
// Kernels.
//   Generic (every case: any head dim, F32/F64/BF16/F16 storage, compute in
//   float, or double when an operand is F64): 256 threads, square tiles of
//   B = 64, 32 or 16 rows (the largest whose shared-memory working set fits),
//   scalar FMA dot products out of shared memory.
//     forward_generic_kernel        one block per (query tile, batch, head)
//     backward_prep_generic_kernel  per query tile: the row statistics the
//                                   backward uses (max, log-sum where lse is
//                                   not precise enough) and D
//     backward_dkdv_generic_kernel  one block per (key tile, batch, group):
//                                   dK, dV summed over the group's heads in
//                                   head order then query-tile order
//     backward_dq_generic_kernel    one block per (query tile, batch, head):
//                                   dQ over the key tiles in order
//   No atomics anywhere: every output element is written by one block, so
//   results are deterministic run to run.
//
//   Tensor-core fast path (bf16/fp16 storage, head dim 64 or 128, probs_dtype
//   the storage dtype): 128 threads (4 warps x 16 rows) on 64 x 64 tiles,
//   mma.sync m16n8k16 with fp32 accumulators, ldmatrix from padded shared
//   tiles, cp.async double-buffered K/V (or Q/dO) tiles. Same semantics as the
//   generic kernels, masks, dropout and rounding included:
//     forward_fast_kernel           (bf16 and fp16)
//     backward_prep_fast_kernel, backward_dkdv_fast_kernel,
//     backward_dq_fast_kernel       (bf16 only, see below)
//   Dispatch (fast_forward_ok / fast_backward_ok): all of q, k, v (and dout)
//   stored in the same 16-bit dtype with no relabelling, probs_dtype equal to
//   it, head_dim 64 or 128, 16-byte aligned data, an sm_80+ device with the
//   shared memory; everything else runs the generic kernels.
//
// Rounding points (the CPU twin's):
//   S = q.k accumulated in fp32 FMA; s = S * scale; masked s = fill.
//   fp32 probabilities (probs_dtype F32/F64): one pass, m' = max(m, max s),
//     p = exp(s - m'), alpha = exp(m - m') (0 for the first tile),
//     l = l * alpha + sum p, O = O * alpha + (p * dropout) V;
//     lse = m + log l, out = O * (1 / l).
//   16-bit probabilities: a statistics pass (as above, no PV), lse = m + log l,
//     then P = round(exp(s - lse)), dropped P = round(P * dropout scale),
//     O += P V, out = O. The fast path needs this form: P and V are exact in
//     the MMA's 16-bit operands, so the tensor-core product is the fp32 one.
//   Backward: P = exp((s - m) - ll) with (m, ll) = (lse, 0), or the recomputed
//     (max, log sum) of a row whose lse is near `fill` (there the fp32 ulp of
//     lse, 1e-3, would make P off by 1e-3); P' = P (rounded, dropped,
//     rounded) feeds dV += P'^T dO; dP' = (dO V^T) * dropout scale;
//     D = rowsum(dO o O) in double (fp32 probabilities) or rowsum(P o dP') in
//     double (16-bit probabilities: O came from rounded P);
//     dS = (P * (dP' - D)) * scale, 0 where masked (masked_fill passes no
//     gradient); dK += dS^T Q, dQ += dS K, accumulated in fp32.
//   Fully masked tiles: processed after the others and skipped when every row's
//     max (forward) / lse (backward) is past fill + 104 (fp32; 746 in double),
//     where exp(fill - max) is exactly 0.
//
// Cost of these semantics on the fast path (against FlashAttention-2's
// 2 forward / 5 backward GEMM-sized products): the forward computes Q K^T
// twice (statistics pass, then the PV pass: 16-bit probabilities are rounded
// after normalisation), 3 products; the backward recomputes S and dP in three
// kernels (D needs rowsum(P o dP') with 16-bit probabilities; dQ has its own
// pass instead of atomics) and multiplies dS as three bf16 pieces: 2 (D) + 6
// (dK, dV) + 5 (dQ) products. The issue's targets (>= 500 / 400 TFLOP/s on
// H100, seq 8192 causal hd 128) are out of reach of mma.sync with this much
// work; they would need sm_90a wgmma/TMA kernels as well. Not measured here
// (no GPU).
//
// Where the GPU differs from the CPU twin (values, not semantics):
//   * exp and log are CUDA's expf/logf (<= 2 ulp) against the CPU's
//     polynomial exp and glibc's log; fp32 sums (row sums, S, PV, dK, dQ) run
//     in other orders (tree reductions across threads, tensor-core
//     accumulation). The generic kernel's S = q.k is the CPU's FMA chain in
//     the CPU's order; the first bits to differ are those of exp.
//   * F64 runs compute in double end to end (the CPU backend computes
//     attention in fp32 even for F64 tensors). An F64 backward whose lse is
//     stored in fp32 recomputes the row statistics in double (lse in fp32 is
//     not precise enough for double P).
//   * The fast backward keeps dS in fp32 through bf16 MMAs by splitting it into
//     three bf16 pieces (hi + mid + lo = dS exactly), three products instead
//     of one. fp16 pieces would lose dS values below 2^-24 (fp16's range),
//     so fp16 backward runs the generic kernels.
//   * Tile classification: the generic kernel classifies a tile element by
//     element (exact); the CPU and the fast path classify causal/window tiles
//     from the key tile's position bounds (conservative). A tile is only
//     skipped when its contribution is exactly zero, so this moves rounding,
//     not results.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/math/random.h"
#include "optimized/cuda/cuda_backend.h"
#include "optimized/cuda/cuda_check.h"
#include "optimized/cuda/device.cuh"
#include "optimized/cuda/op_checks.h"
#include "optimized/math/rounding.h"

namespace paritron::opt::cuda {

namespace {

// ---------------------------------------------------------------------------
// Errors and checks (the CPU backend's messages, with BackendError; the
// shared ones are op_checks.h's).

// The CPU backend's check_attention (shapes) followed by the CPU kernel's
// check_args (positions, dropout, explicit mask), in that order. Beyond the
// CPU: the explicit mask must cover every index the call reads (the device
// cannot report an out-of-bounds read).
void check_attention(std::string_view op, const AttentionArgs& a, const DTensor& q, const DTensor& k,
                     const DTensor& v, const DTensor& out, const DTensor& lse) {
  if (a.batch <= 0 || a.heads <= 0 || a.groups <= 0 || a.head_dim <= 0 || a.sq < 0 || a.sk < 0) {
    fail(op, text("batch {}, heads {}, groups {}, head_dim {} must be positive (sq {}, sk {})", a.batch, a.heads,
                  a.groups, a.head_dim, a.sq, a.sk));
  }
  if (a.heads % a.groups != 0) fail(op, text("heads {} is not a multiple of groups {}", a.heads, a.groups));
  const std::string qs = text("[{}, {}, {}, {}]", a.sq, a.batch, a.heads, a.head_dim);
  const std::string ks = text("[{}, {}, {}, {}]", a.sk, a.batch, a.groups, a.head_dim);
  check_numel(op, "q", q, a.sq * a.batch * a.heads * a.head_dim, qs);
  check_numel(op, "k", k, a.sk * a.batch * a.groups * a.head_dim, ks);
  check_numel(op, "v", v, a.sk * a.batch * a.groups * a.head_dim, ks);
  check_numel(op, "out", out, a.sq * a.batch * a.heads * a.head_dim, qs);
  check_numel(op, "lse", lse, a.batch * a.heads * a.sq, text("[{}, {}, {}]", a.batch, a.heads, a.sq));
  if (!a.q_positions.empty() && static_cast<int64_t>(a.q_positions.size()) != a.sq) {
    fail(op, text("{} q_positions for sq = {}", a.q_positions.size(), a.sq));
  }
  if (!a.k_positions.empty() && static_cast<int64_t>(a.k_positions.size()) != a.sk) {
    fail(op, text("{} k_positions for sk = {}", a.k_positions.size(), a.sk));
  }
  if (a.dropout_p < 0.0f || a.dropout_p >= 1.0f) {
    fail(op, text("dropout_p = {} must be in [0, 1)", a.dropout_p));
  }
  if (a.mask != nullptr) {
    const auto& d = a.mask_dims;
    if (d[0] < 1 || d[1] < 1 || d[2] < 1 || d[3] < 1) {
      fail(op, text("explicit mask dims [{}, {}, {}, {}] must be >= 1", d[0], d[1], d[2], d[3]));
    }
    if (d[0] != 1 && a.batch_offset + a.batch > d[0]) {
      fail(op, text("explicit mask batch extent {} does not cover sequences {}..{}", d[0], a.batch_offset,
                    a.batch_offset + a.batch - 1));
    }
    if (d[1] != 1 && a.head_offset + a.heads > d[1]) {
      fail(op, text("explicit mask head extent {} does not cover heads {}..{}", d[1], a.head_offset,
                    a.head_offset + a.heads - 1));
    }
    const auto covers = [](std::span<const int64_t> pos, int64_t n, int64_t extent) {
      if (pos.empty()) return n <= extent;
      return std::all_of(pos.begin(), pos.end(), [&](int64_t x) { return x >= 0 && x < extent; });
    };
    if (d[2] != 1 && !covers(a.q_positions, a.sq, d[2])) {
      fail(op, text("explicit mask query extent {} does not cover the query positions (sq = {})", d[2], a.sq));
    }
    if (d[3] != 1 && !covers(a.k_positions, a.sk, d[3])) {
      fail(op, text("explicit mask key extent {} does not cover the key positions (sk = {})", d[3], a.sk));
    }
  }
}

int device_attribute(const CudaBackend& be, cudaDeviceAttr attr, const std::string& ctx) {
  int v = 0;
  PARITRON_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, be.device()), ctx);
  return v;
}

// ---------------------------------------------------------------------------
// The problem as the kernels see it: resolved once on the host (global
// extents, dropout threshold and scale, device copies of the positions and of
// the explicit mask). T is the compute type (float, or double for F64 runs).

template <class T>
struct Attn {
  DevPtr q, k, v, out, lse, dout, dq, dk, dv;
  DType out_dt = DType::F32, lse_dt = DType::F32, dq_dt = DType::F32, dk_dt = DType::F32, dv_dt = DType::F32;
  int64_t batch = 1, sq = 0, sk = 0, heads = 1, groups = 1, hn = 0, r = 1;
  int64_t q_stride = 0, kv_stride = 0;  // elements between consecutive sequence rows of one head
  const int64_t* q_pos = nullptr;       // device copies of the positions, or null (0..n-1)
  const int64_t* k_pos = nullptr;
  const int64_t* kt_bounds = nullptr;   // fast path: {min, max} key position of each 64-key tile
  const uint8_t* mask = nullptr;        // device copy of the explicit mask, or null
  int64_t md[4] = {1, 1, 1, 1};         // its dims [b, heads, Sq, Sk]
  int64_t batch_offset = 0, head_offset = 0, heads_global = 1, Sq = 0, Sk = 0;
  int64_t left = -1, right = -1;  // sliding window (< 0: unbounded)
  bool causal = false;
  bool any_mask = false;  // causal, window or explicit: tiles need classifying
  bool drop = false;
  bool round_p = false;  // probabilities rounded to probs_dt (bf16 / fp16)
  bool force_stats = false;  // backward: recompute every row's statistics (F64 run with an fp32 lse)
  DType probs_dt = DType::F32;
  T scale = T(1), fill = T(-10000), keep = T(1);
  T underflow = T(104);  // exp(x) is exactly 0 for x < -underflow (fp32: 104, double: 746)
  float threshold = 0.0f;
  math::RngKey key{};
  T* row_m = nullptr;   // backward scratch [b, np, sq]: the row max (or lse) ...
  T* row_ll = nullptr;  // ... the log of the row sum (or 0) ...
  T* row_d = nullptr;   // ... and D
};

// ---------------------------------------------------------------------------
// Device helpers shared by every kernel.

__device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }

template <class T>
__device__ __forceinline__ T neg_inf() {
  return static_cast<T>(-INFINITY);
}
template <class T>
__device__ __forceinline__ T ex(T x) {
  if constexpr (sizeof(T) == 8) {
    return ::exp(x);
  } else {
    return ::expf(x);
  }
}
template <class T>
__device__ __forceinline__ T ln(T x) {
  if constexpr (sizeof(T) == 8) {
    return ::log(x);
  } else {
    return ::logf(x);
  }
}
// a * b + c rounded once (the CPU twin's FMA micro-kernels).
template <class T>
__device__ __forceinline__ T mad(T a, T b, T c) {
  if constexpr (sizeof(T) == 8) {
    return __fma_rn(a, b, c);
  } else {
    return __fmaf_rn(a, b, c);
  }
}
template <class T>
__device__ __forceinline__ T tmax(T a, T b) {
  if constexpr (sizeof(T) == 8) {
    return ::fmax(a, b);
  } else {
    return ::fmaxf(a, b);
  }
}

template <class T>
__device__ __forceinline__ int64_t qpos(const Attn<T>& p, int64_t i) {
  return p.q_pos != nullptr ? p.q_pos[i] : i;
}
template <class T>
__device__ __forceinline__ int64_t kpos(const Attn<T>& p, int64_t j) {
  return p.k_pos != nullptr ? p.k_pos[j] : j;
}

// Causal: key after query; window: key outside [q - left, q + right].
template <class T>
__device__ __forceinline__ bool positional_masked(const Attn<T>& p, int64_t qp, int64_t kp) {
  return (p.causal && kp > qp) || (p.left >= 0 && kp < qp - p.left) || (p.right >= 0 && kp > qp + p.right);
}

// mask[bi?, head?, q?, k?] != 0, broadcasting dims of extent 1 (torch).
template <class T>
__device__ __forceinline__ bool explicit_masked(const Attn<T>& p, int64_t bi, int64_t hg, int64_t qp, int64_t kp) {
  const int64_t mb = p.md[0] == 1 ? 0 : p.batch_offset + bi, mh = p.md[1] == 1 ? 0 : hg;
  const int64_t mq = p.md[2] == 1 ? 0 : qp, mk = p.md[3] == 1 ? 0 : kp;
  return p.mask[((mb * p.md[1] + mh) * p.md[2] + mq) * p.md[3] + mk] != 0;
}

template <class T>
__device__ __forceinline__ bool is_masked(const Attn<T>& p, int64_t bi, int64_t hg, int64_t qp, int64_t kp) {
  return positional_masked(p, qp, kp) || (p.mask != nullptr && explicit_masked(p, bi, hg, qp, kp));
}

// Dropout scale of global element (batch_offset + bi, hg, qp, kp) of the
// [b, np_global, Sq, Sk] probabilities: keep / (1 - p) or 0.
template <class T>
__device__ __forceinline__ uint64_t dropout_index(const Attn<T>& p, int64_t bi, int64_t hg, int64_t qp, int64_t kp) {
  return static_cast<uint64_t>((((p.batch_offset + bi) * p.heads_global + hg) * p.Sq + qp) * p.Sk + kp);
}
template <class T>
__device__ __forceinline__ T dropout_factor(const Attn<T>& p, int64_t bi, int64_t hg, int64_t qp, int64_t kp) {
  return math::uniform_float(p.key, dropout_index(p, bi, hg, qp, kp)) >= p.threshold ? p.keep : T(0);
}
// The same, out of line: the fast kernels call it from fully unrolled loops
// over a thread's 32 elements, where 32 inlined Philox rounds would bloat the
// code (and the compile) of every kernel for a path only dropout takes.
__device__ __noinline__ float dropout_factor_call(math::RngKey key, uint64_t flat, float threshold, float keep) {
  return math::uniform_float(key, flat) >= threshold ? keep : 0.0f;
}
__device__ __forceinline__ float fast_dropout(const Attn<float>& p, int64_t bi, int64_t hg, int64_t qp, int64_t kp) {
  return dropout_factor_call(p.key, dropout_index(p, bi, hg, qp, kp), p.threshold, p.keep);
}

// x rounded to the probabilities' dtype (Megatron casts the softmax output).
template <class T>
__device__ __forceinline__ T round_probs(const Attn<T>& p, T x) {
  return round_as<T>(p.probs_dt, x);
}

// What the mask does to a tile of (query rows x keys): nothing, something, everything.
enum class TileKind : int { kVisible, kPartial, kMasked };

// ===========================================================================
// Generic kernels.

constexpr int kGenThreads = 256;

// Shared-memory buffers of the generic kernels (a kernel takes those it uses).
enum GenBuf : int { kGQ, kGDout, kGK, kGV, kGS, kGDP, kGPT, kGAcc0, kGAcc1, kGBufs };
constexpr size_t kNoBuffer = ~size_t{0};

// Byte offsets of the buffers for tile size B: row tiles [B][hn + 1] (the
// pad puts consecutive rows in different banks), score tiles [B][B + 1],
// accumulators [B][hn], four per-row arrays, the tile's positions and its
// element mask.
struct GenLayout {
  int B = 0, ld = 0, ldS = 0;
  size_t off[kGBufs] = {};
  size_t rows = 0, qpos = 0, kpos = 0, mask = 0, bytes = 0;
};

GenLayout gen_layout(int B, int64_t hn, size_t tsize, unsigned bufs) {
  GenLayout L;
  L.B = B;
  L.ld = static_cast<int>(hn + 1);
  L.ldS = B + 1;
  size_t o = 0;
  const auto take = [&](size_t bytes) {
    const size_t at = o;
    o += (bytes + 15) / 16 * 16;
    return at;
  };
  const size_t b = static_cast<size_t>(B), h = static_cast<size_t>(hn);
  const size_t tile = b * (h + 1) * tsize, score = b * (b + 1) * tsize, acc = b * h * tsize;
  const size_t sizes[kGBufs] = {tile, tile, tile, tile, score, score, score, acc, acc};
  for (int i = 0; i < kGBufs; ++i) L.off[i] = (bufs >> i) & 1u ? take(sizes[i]) : kNoBuffer;
  L.rows = take(4 * b * tsize);
  L.qpos = take(b * sizeof(int64_t));
  L.kpos = take(b * sizeof(int64_t));
  L.mask = take(b * b);
  L.bytes = o;
  return L;
}

// The largest tile (64, 32, 16) whose layout fits `limit` bytes, no larger
// than the sequences need; B = 0 when none fits.
GenLayout pick_gen_layout(int64_t hn, size_t tsize, unsigned bufs, size_t limit, int64_t longest) {
  for (int B : {64, 32, 16}) {
    if (B > 16 && B / 2 >= longest) continue;  // a smaller tile covers the sequences
    const GenLayout L = gen_layout(B, hn, tsize, bufs);
    if (L.bytes <= limit) return L;
  }
  return GenLayout{};
}

// Shared-memory views of one generic block, and the block's row ownership for
// the softmax: G = 256 / B consecutive threads (one shuffle group within a
// warp) share query row `row` of the tile.
template <class T>
struct Tiles {
  T *q, *dout, *k, *v, *s, *dp, *pt, *acc0, *acc1;
  T *row_m, *row_ll, *row_d, *row_a;
  int64_t *qp, *kp;
  uint8_t* mask;
  int B, ld, ldS, hn;
  int G, row, lane_g;
};

template <class T>
__device__ __forceinline__ Tiles<T> carve(unsigned char* smem, const GenLayout& L, int hn) {
  const auto at = [&](size_t off) { return off == kNoBuffer ? nullptr : reinterpret_cast<T*>(smem + off); };
  Tiles<T> t;
  t.q = at(L.off[kGQ]);
  t.dout = at(L.off[kGDout]);
  t.k = at(L.off[kGK]);
  t.v = at(L.off[kGV]);
  t.s = at(L.off[kGS]);
  t.dp = at(L.off[kGDP]);
  t.pt = at(L.off[kGPT]);
  t.acc0 = at(L.off[kGAcc0]);
  t.acc1 = at(L.off[kGAcc1]);
  t.row_m = at(L.rows);
  t.row_ll = t.row_m + L.B;
  t.row_d = t.row_ll + L.B;
  t.row_a = t.row_d + L.B;
  t.qp = reinterpret_cast<int64_t*>(smem + L.qpos);
  t.kp = reinterpret_cast<int64_t*>(smem + L.kpos);
  t.mask = smem + L.mask;
  t.B = L.B;
  t.ld = L.ld;
  t.ldS = L.ldS;
  t.hn = hn;
  t.G = kGenThreads / L.B;
  t.row = static_cast<int>(threadIdx.x) / t.G;
  t.lane_g = static_cast<int>(threadIdx.x) % t.G;
  return t;
}

// Max / sum over the G threads of a row group (G a power of two <= 16, the
// group aligned within its warp; every thread of the block calls it).
template <class T>
__device__ __forceinline__ T group_max(T v, int G) {
  for (int o = G >> 1; o > 0; o >>= 1) v = tmax(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
template <class T>
__device__ __forceinline__ T group_sum(T v, int G) {
  for (int o = G >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// Rows row0..row0+n of one head (column offset col, hn wide) of a
// sequence-major tensor into dst [B][lds], zero rows past n.
template <class T>
__device__ void load_rows(DevPtr src, int64_t row0, int n, int64_t stride, int64_t col, int hn, int B, T* dst,
                          int lds) {
  for (int e = static_cast<int>(threadIdx.x); e < B * hn; e += static_cast<int>(blockDim.x)) {
    const int r = e / hn, d = e - r * hn;
    dst[r * lds + d] = r < n ? ld<T>(src, (row0 + r) * stride + col + d) : T(0);
  }
}

// Rows row0..row0+n of a [b, np, sq] row array into dst[0..B), zero past n.
template <class T>
__device__ void load_row_stats(const T* src, int n, T* dst, int B) {
  for (int i = static_cast<int>(threadIdx.x); i < B; i += static_cast<int>(blockDim.x)) {
    dst[i] = i < n ? src[i] : T(0);
  }
}

// q . k over hn, an FMA chain in index order (the CPU micro-kernel's order).
template <class T>
__device__ __forceinline__ T dot(const T* a, const T* b, int n) {
  T acc = T(0);
  for (int d = 0; d < n; ++d) acc = mad(a[d], b[d], acc);
  return acc;
}

// Block-wide: the element mask of the tile (query rows t.qp[0..qn), keys
// t.kp[0..kn)) of (batch bi, global head hg) into t.mask (1 = masked; 0
// outside the qn x kn block), and the tile's kind. Exact per element. t.qp and
// t.kp must be visible to the block; ends with a barrier when there is a mask.
template <class T>
__device__ TileKind classify_tile(const Attn<T>& p, const Tiles<T>& t, int qn, int kn, int64_t bi, int64_t hg) {
  if (!p.any_mask) return TileKind::kVisible;
  int vis = 0, msk = 0;
  for (int e = static_cast<int>(threadIdx.x); e < t.B * t.B; e += static_cast<int>(blockDim.x)) {
    const int i = e / t.B, j = e - i * t.B;
    uint8_t m = 0;
    if (i < qn && j < kn) {
      m = is_masked(p, bi, hg, t.qp[i], t.kp[j]) ? 1 : 0;
      vis |= m == 0;
      msk |= m;
    }
    t.mask[e] = m;
  }
  vis = __syncthreads_or(vis);
  msk = __syncthreads_or(msk);
  if (!msk) return TileKind::kVisible;
  return vis ? TileKind::kPartial : TileKind::kMasked;
}

// t.s = scale * Q K^T of the tile, `fill` where masked, -inf for keys past kn
// (not part of the row). Megatron's order: scale, then masked_fill.
template <class T>
__device__ void score_tile(const Attn<T>& p, const Tiles<T>& t, int kn) {
  for (int e = static_cast<int>(threadIdx.x); e < t.B * t.B; e += static_cast<int>(blockDim.x)) {
    const int i = e / t.B, j = e - i * t.B;
    T s = dot(t.q + i * t.ld, t.k + j * t.ld, t.hn) * p.scale;
    if (j >= kn) {
      s = neg_inf<T>();
    } else if (p.any_mask && t.mask[e]) {
      s = p.fill;
    }
    t.s[i * t.ldS + j] = s;
  }
}

// Backward: t.s = P = exp((s - m_i) - ll_i) and t.dp = dO V^T for the tile,
// both 0 outside the qn x kn block.
template <class T>
__device__ void probs_dp_tile(const Attn<T>& p, const Tiles<T>& t, int qn, int kn) {
  for (int e = static_cast<int>(threadIdx.x); e < t.B * t.B; e += static_cast<int>(blockDim.x)) {
    const int i = e / t.B, j = e - i * t.B;
    T pr = T(0), dp = T(0);
    if (i < qn && j < kn) {
      T s = dot(t.q + i * t.ld, t.k + j * t.ld, t.hn) * p.scale;
      if (p.any_mask && t.mask[e]) s = p.fill;
      pr = ex((s - t.row_m[i]) - t.row_ll[i]);
      dp = dot(t.dout + i * t.ld, t.v + j * t.ld, t.hn);
    }
    t.s[i * t.ldS + j] = pr;
    t.dp[i * t.ldS + j] = dp;
  }
}

enum class Pass {
  kOnePass,  // fp32 probabilities: statistics and O together
  kStats,    // the statistics only (16-bit probabilities' first pass; the backward's recomputation)
  kProbs,    // O from P = round(exp(s - lse)) (16-bit probabilities' second pass)
};

// One pass of the forward over the key tiles for the block's query tile
// (t.q, t.qp loaded; t.acc0 = O): FlashAttention-2's inner loop in the CPU
// twin's order. Tiles with a visible entry come first (phase 0), the fully
// masked ones after (phase 1), and only when some row's max (kStats,
// kOnePass) or lse (kProbs) is not past fill + underflow: otherwise they add
// exp(fill - m) = 0. m, l: this thread's row's running max and sum.
template <class T>
__device__ void generic_forward_pass(const Attn<T>& p, const Tiles<T>& t, Pass pass, int64_t bi, int64_t h, int qn,
                                     T& m, T& l, T lse_row) {
  const int B = t.B, G = t.G, row = t.row, lg = t.lane_g;
  const int64_t g = h / p.r, hg = p.head_offset + h;
  const int64_t kv_col = (bi * p.groups + g) * p.hn;
  const int64_t nkt = (p.sk + B - 1) / B;
  const bool stats = pass != Pass::kProbs, pv = pass != Pass::kStats;
  bool saw_masked = false;
  for (int phase = 0; phase < 2; ++phase) {
    if (phase == 1) {
      if (!saw_masked) break;
      const T ref = stats ? m : lse_row;
      if (__syncthreads_and(row >= qn || ref > p.fill + p.underflow)) break;
    }
    for (int64_t kt = 0; kt < nkt; ++kt) {
      const int64_t k0 = kt * B;
      const int kn = static_cast<int>(lmin(B, p.sk - k0));
      __syncthreads();  // the previous tile's readers are done with the shared tiles
      for (int j = static_cast<int>(threadIdx.x); j < B; j += static_cast<int>(blockDim.x)) {
        t.kp[j] = j < kn ? kpos(p, k0 + j) : 0;
      }
      __syncthreads();
      const TileKind kind = classify_tile(p, t, qn, kn, bi, hg);
      if (kind == TileKind::kMasked) saw_masked = true;
      if ((kind == TileKind::kMasked) != (phase == 1)) continue;
      load_rows(p.k, k0, kn, p.kv_stride, kv_col, t.hn, B, t.k, t.ld);
      __syncthreads();
      score_tile(p, t, kn);
      __syncthreads();
      if (pv) load_rows(p.v, k0, kn, p.kv_stride, kv_col, t.hn, B, t.k, t.ld);  // V replaces K (S is done with it)
      T* srow = t.s + row * t.ldS;
      if (stats) {
        T mx = neg_inf<T>();
        for (int j = lg; j < B; j += G) mx = tmax(mx, srow[j]);
        mx = group_max(mx, G);
        const T m_new = tmax(m, mx);
        T sum = T(0);
        for (int j = lg; j < B; j += G) {
          const T e = ex(srow[j] - m_new);
          sum += e;
          if (pv) {
            // Unnormalised P for the PV product, times the dropout scale (the
            // row sum is of the undropped values).
            srow[j] = p.drop && j < kn && row < qn ? e * dropout_factor(p, bi, hg, t.qp[row], t.kp[j]) : e;
          }
        }
        sum = group_sum(sum, G);
        const T alpha = m == neg_inf<T>() ? T(0) : ex(m - m_new);  // exactly 1 where the max did not move
        l = l * alpha + sum;
        m = m_new;
        if (lg == 0) t.row_a[row] = alpha;
      } else {
        // P normalised, rounded to probs_dtype, dropped and rounded again
        // (Megatron's dropout output is a tensor of that dtype).
        for (int j = lg; j < B; j += G) {
          T pr = ex(srow[j] - lse_row);
          if (j < kn) {
            pr = round_probs(p, pr);
            if (p.drop && row < qn) pr = round_probs(p, pr * dropout_factor(p, bi, hg, t.qp[row], t.kp[j]));
          }
          srow[j] = pr;
        }
        if (lg == 0) t.row_a[row] = T(1);
      }
      __syncthreads();
      if (pv) {
        // O = O * alpha + P V (an FMA chain over the keys, the CPU's order).
        for (int e = static_cast<int>(threadIdx.x); e < B * t.hn; e += static_cast<int>(blockDim.x)) {
          const int i = e / t.hn, d = e - i * t.hn;
          const T* prow = t.s + i * t.ldS;
          T acc = t.acc0[e] * t.row_a[i];
          for (int j = 0; j < kn; ++j) acc = mad(prow[j], t.k[j * t.ld + d], acc);
          t.acc0[e] = acc;
        }
      }
    }
  }
}

// Forward: one block per (query tile, batch, head); query tiles in reverse
// order so that under a causal mask the expensive (late) tiles start first.
template <class T>
__global__ void __launch_bounds__(kGenThreads)
    forward_generic_kernel(const __grid_constant__ Attn<T> p, const GenLayout L) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Tiles<T> t = carve<T>(smem, L, static_cast<int>(p.hn));
  const int B = t.B;
  const int64_t nqt = (p.sq + B - 1) / B, bhn = p.batch * p.heads;
  const int64_t qt = nqt - 1 - static_cast<int64_t>(blockIdx.x) / bhn, bh = static_cast<int64_t>(blockIdx.x) % bhn;
  const int64_t bi = bh / p.heads, h = bh % p.heads;
  const int64_t i0 = qt * B;
  const int qn = static_cast<int>(lmin(B, p.sq - i0));
  const int64_t q_col = bh * p.hn;
  load_rows(p.q, i0, qn, p.q_stride, q_col, t.hn, B, t.q, t.ld);
  for (int i = static_cast<int>(threadIdx.x); i < B; i += static_cast<int>(blockDim.x)) {
    t.qp[i] = i < qn ? qpos(p, i0 + i) : 0;
  }
  for (int e = static_cast<int>(threadIdx.x); e < B * t.hn; e += static_cast<int>(blockDim.x)) t.acc0[e] = T(0);
  __syncthreads();

  T m = neg_inf<T>(), l = T(0);
  if (!p.round_p) {
    generic_forward_pass(p, t, Pass::kOnePass, bi, h, qn, m, l, T(0));
  } else {
    // 16-bit probabilities are rounded after normalisation: the final max and
    // sum first, then the PV pass with P = exp(s - lse).
    generic_forward_pass(p, t, Pass::kStats, bi, h, qn, m, l, T(0));
    generic_forward_pass(p, t, Pass::kProbs, bi, h, qn, m, l, m + ln(l));
  }
  const T lse_row = m + ln(l);
  __syncthreads();
  if (t.lane_g == 0) {
    t.row_a[t.row] = p.round_p ? T(1) : T(1) / l;
    if (t.row < qn) put<T>(p.lse, p.lse_dt, bh * p.sq + i0 + t.row, lse_row);
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < qn * t.hn; e += static_cast<int>(blockDim.x)) {
    const int i = e / t.hn, d = e - i * t.hn;
    put<T>(p.out, p.out_dt, (i0 + i) * p.q_stride + q_col + d, t.acc0[e] * t.row_a[i]);
  }
}

// Backward preprocessing, one block per (query tile, batch, head): the row
// statistics P is recomputed from (row_m, row_ll) and D (row_d).
//   Statistics: (lse, 0), except in a tile with a row whose lse is not past
//   fill + underflow (a fully masked row: lse ~ fill, where the fp32 ulp is
//   1e-3): there every row gets its exact (max, log sum) from a statistics
//   pass of the forward. force_stats does that for every tile.
//   D: rowsum(dO o O) in double (fp32 probabilities); with 16-bit
//   probabilities the output was computed from rounded P, so
//   D = rowsum(P o dP') in double over the key tiles (what Megatron's softmax
//   backward, fed fp32 probs, computes).
template <class T>
__global__ void __launch_bounds__(kGenThreads)
    backward_prep_generic_kernel(const __grid_constant__ Attn<T> p, const GenLayout L) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Tiles<T> t = carve<T>(smem, L, static_cast<int>(p.hn));
  const int B = t.B, G = t.G, row = t.row, lg = t.lane_g;
  const int64_t bhn = p.batch * p.heads;
  const int64_t qt = static_cast<int64_t>(blockIdx.x) / bhn, bh = static_cast<int64_t>(blockIdx.x) % bhn;
  const int64_t bi = bh / p.heads, h = bh % p.heads, hg = p.head_offset + h;
  const int64_t i0 = qt * B;
  const int qn = static_cast<int>(lmin(B, p.sq - i0));
  const int64_t q_col = bh * p.hn, rows0 = bh * p.sq + i0;
  load_rows(p.q, i0, qn, p.q_stride, q_col, t.hn, B, t.q, t.ld);
  for (int i = static_cast<int>(threadIdx.x); i < B; i += static_cast<int>(blockDim.x)) {
    t.qp[i] = i < qn ? qpos(p, i0 + i) : 0;
  }
  const bool valid = row < qn;
  const T lse_i = valid ? ld<T>(p.lse, rows0 + row) : T(0);
  __syncthreads();

  T rm = lse_i, rll = T(0);
  if (__syncthreads_or(valid && (p.force_stats || !(lse_i > p.fill + p.underflow)))) {
    T m = neg_inf<T>(), l = T(0);
    generic_forward_pass(p, t, Pass::kStats, bi, h, qn, m, l, T(0));
    rm = m;
    rll = ln(l);
  }
  if (lg == 0) {
    t.row_m[row] = rm;
    t.row_ll[row] = rll;
    if (valid) {
      p.row_m[rows0 + row] = rm;
      p.row_ll[rows0 + row] = rll;
    }
  }

  if (!p.round_p) {
    if (lg == 0 && valid) {
      const int64_t base = (i0 + row) * p.q_stride + q_col;
      double acc = 0.0;
      for (int64_t d = 0; d < p.hn; ++d) {
        acc += static_cast<double>(ld<T>(p.out, base + d)) * static_cast<double>(ld<T>(p.dout, base + d));
      }
      p.row_d[rows0 + row] = static_cast<T>(acc);
    }
    return;
  }

  // Fully masked tiles add nothing once every row's lse is past fill + underflow.
  const bool above = __syncthreads_and(!valid || lse_i > p.fill + p.underflow);
  load_rows(p.dout, i0, qn, p.q_stride, q_col, t.hn, B, t.dout, t.ld);
  const int64_t kv_col = (bi * p.groups + h / p.r) * p.hn;
  const int64_t nkt = (p.sk + B - 1) / B;
  double acc = 0.0;
  for (int64_t kt = 0; kt < nkt; ++kt) {
    const int64_t k0 = kt * B;
    const int kn = static_cast<int>(lmin(B, p.sk - k0));
    __syncthreads();
    for (int j = static_cast<int>(threadIdx.x); j < B; j += static_cast<int>(blockDim.x)) {
      t.kp[j] = j < kn ? kpos(p, k0 + j) : 0;
    }
    __syncthreads();
    const TileKind kind = classify_tile(p, t, qn, kn, bi, hg);
    if (kind == TileKind::kMasked && above) continue;
    load_rows(p.k, k0, kn, p.kv_stride, kv_col, t.hn, B, t.k, t.ld);
    load_rows(p.v, k0, kn, p.kv_stride, kv_col, t.hn, B, t.v, t.ld);
    __syncthreads();
    probs_dp_tile(p, t, qn, kn);
    __syncthreads();
    if (valid) {
      for (int j = lg; j < kn; j += G) {
        T dp = t.dp[row * t.ldS + j];
        if (p.drop) dp = dp * dropout_factor(p, bi, hg, t.qp[row], t.kp[j]);
        acc += static_cast<double>(t.s[row * t.ldS + j]) * static_cast<double>(dp);
      }
    }
  }
  acc = group_sum(acc, G);
  if (lg == 0 && valid) p.row_d[rows0 + row] = static_cast<T>(acc);
}

// P' (the probabilities of the PV product: rounded, dropped, rounded) and dS
// of the tile, from t.s = P and t.dp = dO V^T (probs_dp_tile): P' into pt
// (when not null), dS = (P * (dP' - D)) * scale into t.s, both 0 outside the
// qn x kn block and dS 0 where masked.
template <class T>
__device__ void probs_grad_tile(const Attn<T>& p, const Tiles<T>& t, int qn, int kn, int64_t bi, int64_t hg, T* pt) {
  for (int e = static_cast<int>(threadIdx.x); e < t.B * t.B; e += static_cast<int>(blockDim.x)) {
    const int i = e / t.B, j = e - i * t.B;
    const int at = i * t.ldS + j;
    T pp = T(0), ds = T(0);
    if (i < qn && j < kn) {
      const T pr = t.s[at];
      T dp = t.dp[at];
      pp = pr;
      if (p.round_p) pp = round_probs(p, pp);
      if (p.drop) {
        const T f = dropout_factor(p, bi, hg, t.qp[i], t.kp[j]);
        pp = p.round_p ? round_probs(p, pp * f) : pp * f;
        dp = dp * f;  // dP' = dP * mask scale
      }
      ds = (p.any_mask && t.mask[e]) ? T(0) : (pr * (dp - t.row_d[i])) * p.scale;
    }
    if (pt != nullptr) pt[at] = pp;
    t.s[at] = ds;
  }
}

// dK, dV: one block per (key tile, batch, group). For each head of the group
// (in order) and each query tile (in order): recompute P and dP, then
// dV += P'^T dO and dK += dS^T Q, summed in fp32 over the group's heads (GQA:
// the repeat_interleave'd K/V of Megatron receive the sum of their copies'
// gradients), in a fixed order.
template <class T>
__global__ void __launch_bounds__(kGenThreads)
    backward_dkdv_generic_kernel(const __grid_constant__ Attn<T> p, const GenLayout L) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Tiles<T> t = carve<T>(smem, L, static_cast<int>(p.hn));
  const int B = t.B, hn = t.hn;
  const int64_t bgn = p.batch * p.groups;
  const int64_t kt = static_cast<int64_t>(blockIdx.x) / bgn, bg = static_cast<int64_t>(blockIdx.x) % bgn;
  const int64_t bi = bg / p.groups, g = bg % p.groups;
  const int64_t k0 = kt * B;
  const int kn = static_cast<int>(lmin(B, p.sk - k0));
  const int64_t kv_col = bg * p.hn;
  load_rows(p.k, k0, kn, p.kv_stride, kv_col, hn, B, t.k, t.ld);
  load_rows(p.v, k0, kn, p.kv_stride, kv_col, hn, B, t.v, t.ld);
  for (int j = static_cast<int>(threadIdx.x); j < B; j += static_cast<int>(blockDim.x)) {
    t.kp[j] = j < kn ? kpos(p, k0 + j) : 0;
  }
  for (int e = static_cast<int>(threadIdx.x); e < B * hn; e += static_cast<int>(blockDim.x)) {
    t.acc0[e] = T(0);  // dK
    t.acc1[e] = T(0);  // dV
  }
  const int64_t nqt = (p.sq + B - 1) / B;
  for (int64_t h = g * p.r; h < (g + 1) * p.r; ++h) {
    const int64_t hg = p.head_offset + h, bh = bi * p.heads + h, q_col = bh * p.hn;
    for (int64_t qt = 0; qt < nqt; ++qt) {
      const int64_t i0 = qt * B, rows0 = bh * p.sq + i0;
      const int qn = static_cast<int>(lmin(B, p.sq - i0));
      __syncthreads();  // the previous tile's readers are done
      for (int i = static_cast<int>(threadIdx.x); i < B; i += static_cast<int>(blockDim.x)) {
        t.qp[i] = i < qn ? qpos(p, i0 + i) : 0;
      }
      const T lse_i = t.row < qn ? ld<T>(p.lse, rows0 + t.row) : T(0);
      __syncthreads();
      const TileKind kind = classify_tile(p, t, qn, kn, bi, hg);
      const bool above = __syncthreads_and(t.row >= qn || lse_i > p.fill + p.underflow);
      if (kind == TileKind::kMasked && above) continue;  // P = 0 and dS = 0 there: adds exactly nothing
      load_rows(p.q, i0, qn, p.q_stride, q_col, hn, B, t.q, t.ld);
      load_rows(p.dout, i0, qn, p.q_stride, q_col, hn, B, t.dout, t.ld);
      load_row_stats(p.row_m + rows0, qn, t.row_m, B);
      load_row_stats(p.row_ll + rows0, qn, t.row_ll, B);
      load_row_stats(p.row_d + rows0, qn, t.row_d, B);
      __syncthreads();
      probs_dp_tile(p, t, qn, kn);
      __syncthreads();
      probs_grad_tile(p, t, qn, kn, bi, hg, t.pt);
      __syncthreads();
      // dV += P'^T dO, dK += dS^T Q: FMA chains over the query rows in order.
      for (int e = static_cast<int>(threadIdx.x); e < B * hn; e += static_cast<int>(blockDim.x)) {
        const int j = e / hn, d = e - j * hn;
        if (j >= kn) continue;
        T dv = t.acc1[e], dk = t.acc0[e];
        for (int i = 0; i < qn; ++i) {
          dv = mad(t.pt[i * t.ldS + j], t.dout[i * t.ld + d], dv);
          dk = mad(t.s[i * t.ldS + j], t.q[i * t.ld + d], dk);
        }
        t.acc1[e] = dv;
        t.acc0[e] = dk;
      }
    }
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < kn * hn; e += static_cast<int>(blockDim.x)) {
    const int j = e / hn, d = e - j * hn;
    const int64_t at = (k0 + j) * p.kv_stride + kv_col + d;
    put<T>(p.dk, p.dk_dt, at, t.acc0[e]);
    put<T>(p.dv, p.dv_dt, at, t.acc1[e]);
  }
}

// dQ: one block per (query tile, batch, head), dQ += dS K over the key tiles
// in order (a second recomputation of P and dP instead of atomics: dQ is
// deterministic).
template <class T>
__global__ void __launch_bounds__(kGenThreads)
    backward_dq_generic_kernel(const __grid_constant__ Attn<T> p, const GenLayout L) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Tiles<T> t = carve<T>(smem, L, static_cast<int>(p.hn));
  const int B = t.B, hn = t.hn;
  const int64_t bhn = p.batch * p.heads;
  const int64_t qt = static_cast<int64_t>(blockIdx.x) / bhn, bh = static_cast<int64_t>(blockIdx.x) % bhn;
  const int64_t bi = bh / p.heads, h = bh % p.heads, hg = p.head_offset + h;
  const int64_t i0 = qt * B, rows0 = bh * p.sq + i0;
  const int qn = static_cast<int>(lmin(B, p.sq - i0));
  const int64_t q_col = bh * p.hn, kv_col = (bi * p.groups + h / p.r) * p.hn;
  load_rows(p.q, i0, qn, p.q_stride, q_col, hn, B, t.q, t.ld);
  load_rows(p.dout, i0, qn, p.q_stride, q_col, hn, B, t.dout, t.ld);
  for (int i = static_cast<int>(threadIdx.x); i < B; i += static_cast<int>(blockDim.x)) {
    t.qp[i] = i < qn ? qpos(p, i0 + i) : 0;
  }
  load_row_stats(p.row_m + rows0, qn, t.row_m, B);
  load_row_stats(p.row_ll + rows0, qn, t.row_ll, B);
  load_row_stats(p.row_d + rows0, qn, t.row_d, B);
  for (int e = static_cast<int>(threadIdx.x); e < B * hn; e += static_cast<int>(blockDim.x)) t.acc0[e] = T(0);
  const T lse_i = t.row < qn ? ld<T>(p.lse, rows0 + t.row) : T(0);
  const bool above = __syncthreads_and(t.row >= qn || lse_i > p.fill + p.underflow);
  const int64_t nkt = (p.sk + B - 1) / B;
  for (int64_t kt = 0; kt < nkt; ++kt) {
    const int64_t k0 = kt * B;
    const int kn = static_cast<int>(lmin(B, p.sk - k0));
    __syncthreads();
    for (int j = static_cast<int>(threadIdx.x); j < B; j += static_cast<int>(blockDim.x)) {
      t.kp[j] = j < kn ? kpos(p, k0 + j) : 0;
    }
    __syncthreads();
    const TileKind kind = classify_tile(p, t, qn, kn, bi, hg);
    if (kind == TileKind::kMasked && above) continue;
    load_rows(p.k, k0, kn, p.kv_stride, kv_col, hn, B, t.k, t.ld);
    load_rows(p.v, k0, kn, p.kv_stride, kv_col, hn, B, t.v, t.ld);
    __syncthreads();
    probs_dp_tile(p, t, qn, kn);
    __syncthreads();
    probs_grad_tile(p, t, qn, kn, bi, hg, static_cast<T*>(nullptr));
    __syncthreads();
    for (int e = static_cast<int>(threadIdx.x); e < B * hn; e += static_cast<int>(blockDim.x)) {
      const int i = e / hn, d = e - i * hn;
      const T* dsrow = t.s + i * t.ldS;
      T acc = t.acc0[e];
      for (int j = 0; j < kn; ++j) acc = mad(dsrow[j], t.k[j * t.ld + d], acc);
      t.acc0[e] = acc;
    }
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < qn * hn; e += static_cast<int>(blockDim.x)) {
    const int i = e / hn, d = e - i * hn;
    put<T>(p.dq, p.dq_dt, (i0 + i) * p.q_stride + q_col + d, t.acc0[e]);
  }
}

// ===========================================================================
// Tensor-core fast path: bf16/fp16 storage, head dim D = 64 or 128, 16-bit
// probabilities (probs_dtype = the storage dtype). 4 warps; in the query-tile
// kernels warp w owns query rows 16w..16w+15 of a 64-row tile, in the dK/dV
// kernel keys 16w..16w+15. Products are mma.sync m16n8k16 (fp32
// accumulators) on operands read with ldmatrix from row-padded shared tiles
// (rows of D + 8 elements: the 8 row addresses of an 8x8 matrix fall in
// distinct bank groups). K/V (or Q/dO) tiles are double-buffered: the next
// tile's cp.async loads run under the current tile's math.
//
// Semantics are the generic kernels': every MMA operand is exact in the 16-bit
// format (inputs; probabilities already rounded to it; dS split into three
// exact bf16 pieces), so each product is the fp32 product of the generic
// kernel, accumulated in fp32 in another order.
//
// Fragment layouts (PTX ISA, mma.m16n8k16; lane = 4 gid + tig):
//   A (16 x 16, row): a0 (gid, 2tig..+1), a1 (gid + 8, 2tig..), a2 (gid, 2tig + 8..), a3 (gid + 8, 2tig + 8..)
//   B (16 x 8, col):  b0 (k 2tig..+1, n gid), b1 (k 2tig + 8..+9, n gid)
//   C (16 x 8):       c0, c1 (gid, 2tig..+1), c2, c3 (gid + 8, 2tig..+1)
// so a C tile pair (n-tiles 2kk, 2kk + 1) is the A fragment of k-step kk:
// {c(2kk)[0,1], c(2kk)[2,3], c(2kk+1)[0,1], c(2kk+1)[2,3]} (FlashAttention-2's
// P-in-registers trick).

constexpr int kFastThreads = 128;
constexpr int kFT = 64;  // rows of a fast tile (queries or keys)

template <int D>
struct FastTile {
  static constexpr int kLd = D + 8;  // 16-bit elements per padded row
  static constexpr int kElems = kFT * kLd;
  static constexpr int kBytes = kElems * 2;
};

// Shared memory of the query-tile kernels (forward, backward prep, dQ).
template <int D>
struct FastQLayout {
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + FastTile<D>::kBytes;       // 2 buffers
  static constexpr int kV = kK + 2 * FastTile<D>::kBytes;   // 2 buffers
  static constexpr int kKp = kV + 2 * FastTile<D>::kBytes;  // int64 [2][64] key positions
  static constexpr int kQp = kKp + 2 * kFT * 8;             // int64 [64] query positions
  static constexpr int kMask = kQp + kFT * 8;               // uint8 [2][64 x 64] element mask ([query][key])
  static constexpr int kForwardBytes = kMask + 2 * kFT * kFT;
  static constexpr int kDout = kForwardBytes;  // backward kernels: the dO tile
  static constexpr int kBackwardBytes = kDout + FastTile<D>::kBytes;
};

// Shared memory of the dK/dV kernel.
template <int D>
struct FastKLayout {
  static constexpr int kK = 0;
  static constexpr int kV = kK + FastTile<D>::kBytes;
  static constexpr int kQ = kV + FastTile<D>::kBytes;           // 2 buffers
  static constexpr int kDout = kQ + 2 * FastTile<D>::kBytes;    // 2 buffers
  static constexpr int kKp = kDout + 2 * FastTile<D>::kBytes;   // int64 [64]
  static constexpr int kQp = kKp + kFT * 8;                     // int64 [2][64]
  static constexpr int kRows = kQp + 2 * kFT * 8;               // float [2][3][64]: m, ll, D of the query rows
  static constexpr int kMask = kRows + 2 * 3 * kFT * 4;         // uint8 [2][64 x 64] ([query][key])
  static constexpr int kBytes = kMask + 2 * kFT * kFT;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// 16 bytes global -> shared, asynchronously; !valid writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(uint16_t* dst, const uint16_t* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// d += a b (16 x 8 += 16 x 16 . 16 x 8), fp32 accumulators.
template <bool kBf16>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as a 16-bit pair (lo in the low half), rounded RNE: exact for the
// values passed here, which are already values of the format.
template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t d;
  // cvt packs its first source into the upper half.
  if constexpr (kBf16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  }
  return d;
}

// x rounded to bf16 (RNE) by the hardware conversion, as a float.
__device__ __forceinline__ float bf16_rn(float x) {
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %1;\n" : "=r"(d) : "f"(x));
  return __uint_as_float(d & 0xFFFF0000u);
}

// x rounded (RNE) to the 16-bit format: the fast path's probs_dtype.
template <bool kBf16>
__device__ __forceinline__ float round16(float x) {
  if constexpr (kBf16) {
    return math::round_float_to_bf16(x);
  } else {
    return math::round_float_to_fp16(x);
  }
}

// x = hi + mid + lo with each piece a bf16 value, exactly: x has 24
// significant bits, each piece takes 8 (x - hi and r - mid are exact in fp32;
// only a remainder below bf16's subnormal range, |x| < 2^-110, could lose bits).
__device__ __forceinline__ void split3(float x, float& hi, float& mid, float& lo) {
  hi = bf16_rn(x);
  const float r = x - hi;
  mid = bf16_rn(r);
  lo = r - mid;
}

// Fragments from a padded [64][D + 8] tile:
//   load_a:  A of rows row0..row0+15, k-step kk (columns 16kk..16kk+15);
//   load_b:  B of a product with the tile's rows as B's columns (B = tile^T,
//            rows n0..n0+15 = two n-tiles), k-step kk: {b[0], b[1]} n-tile n0,
//            {b[2], b[3]} n-tile n0 + 8;
//   load_bt: B = the tile itself (rows = k, 16kk..16kk+15; columns n0..n0+15
//            = two n-tiles), through ldmatrix's transpose.
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* tile, int row0, int kk, int lane) {
  ldsm_x4(a, tile + (row0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * FastTile<D>::kLd + kk * 16 + (lane >> 4) * 8);
}
template <int D>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const uint16_t* tile, int n0, int kk, int lane) {
  ldsm_x4(b, tile + (n0 + (lane >> 4) * 8 + (lane & 7)) * FastTile<D>::kLd + kk * 16 + ((lane >> 3) & 1) * 8);
}
template <int D>
__device__ __forceinline__ void load_bt(uint32_t (&b)[4], const uint16_t* tile, int kk, int n0, int lane) {
  ldsm_x4_trans(b, tile + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * FastTile<D>::kLd + n0 + (lane >> 4) * 8);
}

// acc (16 x 64) += A B^T: A = rows row0..row0+15 of tile a, B = the 64 rows of
// tile b (both [rows][D]): S = Q K^T, dP = dO V^T, S^T = K Q^T, dP^T = V dO^T.
template <bool kBf16, int D>
__device__ __forceinline__ void mma_abt(float (&acc)[8][4], const uint16_t* a, int row0, const uint16_t* b,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    load_a<D>(af, a, row0, kk, lane);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t bf[4];
      load_b<D>(bf, b, 16 * np, kk, lane);
      mma16816<kBf16>(acc[2 * np], af, bf[0], bf[1]);
      mma16816<kBf16>(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 x D) += X B: X the 16 x 64 tile x in accumulator layout (its 64
// columns are the k dimension), B = tile b ([64][D], rows = k): O += P V,
// dV += P'^T dO, dK += dS^T Q, dQ += dS K. Without kSplit X's values must be
// values of the 16-bit format (rounded probabilities); with kSplit (bf16) X is
// any fp32 tile, multiplied as its three exact bf16 pieces.
template <bool kBf16, int D, bool kSplit>
__device__ __forceinline__ void mma_xb(float (&acc)[D / 8][4], const float (&x)[8][4], const uint16_t* b, int lane) {
  static_assert(!kSplit || kBf16, "the exact split is into bf16 pieces");
  constexpr int kPieces = kSplit ? 3 : 1;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[kPieces][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int nt = 2 * kk + (i >> 1), e = (i & 1) * 2;
      if constexpr (kSplit) {
        float h0, m0, l0, h1, m1, l1;
        split3(x[nt][e], h0, m0, l0);
        split3(x[nt][e + 1], h1, m1, l1);
        a[0][i] = pack2<kBf16>(h0, h1);
        a[1][i] = pack2<kBf16>(m0, m1);
        a[2][i] = pack2<kBf16>(l0, l1);
      } else {
        a[0][i] = pack2<kBf16>(x[nt][e], x[nt][e + 1]);
      }
    }
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      uint32_t bf[4];
      load_bt<D>(bf, b, kk, 16 * dt, lane);
#pragma unroll
      for (int s = 0; s < kPieces; ++s) {
        mma16816<kBf16>(acc[2 * dt], a[s], bf[0], bf[1]);
        mma16816<kBf16>(acc[2 * dt + 1], a[s], bf[2], bf[3]);
      }
    }
  }
}

// Rows row0..row0+n of one head (column offset col) of a sequence-major
// 16-bit tensor into a padded tile, zero rows past n; asynchronous (the caller
// commits the group).
template <int D>
__device__ __forceinline__ void load_tile_async(uint16_t* dst, const DevPtr& src, int64_t row0, int n,
                                                int64_t stride, int64_t col) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const uint16_t* base = static_cast<const uint16_t*>(src.p);
  for (int c = static_cast<int>(threadIdx.x); c < kFT * kChunks; c += static_cast<int>(blockDim.x)) {
    const int r = c / kChunks, x = (c - r * kChunks) * 8;
    const bool valid = r < n;
    cp_async16(dst + r * FastTile<D>::kLd + x, base + (row0 + (valid ? r : 0)) * stride + col + x, valid);
  }
}

// Epilogue: a warp's 16 x D accumulator tile (rows row0 + gid and + 8 of
// this thread) into a shared fp32 tile [64][D + 4], then the block writes the
// tile's first n rows to one head of a sequence-major tensor in a rolled,
// coalesced loop (one inlined store, not one per accumulator).
template <int D>
constexpr int kStageLd = D + 4;
template <int D>
__device__ __forceinline__ void stage_acc(float* stage, const float (&acc)[D / 8][4], int row0, int lane) {
  const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      stage[(row0 + gid + 8 * (e >> 1)) * kStageLd<D> + 8 * dt + 2 * tig + (e & 1)] = acc[dt][e];
    }
  }
}
template <int D>
__device__ void store_staged(const float* stage, int n, DevPtr dst, DType dt, int64_t row0, int64_t stride,
                             int64_t col) {
  for (int i = static_cast<int>(threadIdx.x); i < n * D; i += static_cast<int>(blockDim.x)) {
    const int r = i / D, d = i - r * D;
    put<float>(dst, dt, (row0 + r) * stride + col + d, stage[r * kStageLd<D> + d]);
  }
}

// The block's loop over n items (key tiles, or (head, query tile) pairs),
// double-buffered: classify(i, buf, kind) says whether item i is wanted (and
// may fill buffer buf's small per-item data), issue(i, buf) starts the item's
// asynchronous tile loads and commits them, compute(i, buf, kind) runs on them.
// Item i + 1 is classified and loaded while item i computes. Every thread of
// the block calls it (classify and compute synchronise the block).
template <class Classify, class Issue, class Compute>
__device__ __forceinline__ void pipelined(int64_t n, Classify&& classify, Issue&& issue, Compute&& compute) {
  const auto next = [&](int64_t after, int buf, TileKind& kind) -> int64_t {
    for (int64_t i = after + 1; i < n; ++i) {
      if (classify(i, buf, kind)) return i;
    }
    return n;
  };
  __syncthreads();  // the buffers are free (readers of a previous loop are done)
  int buf = 0;
  TileKind kind = TileKind::kVisible;
  int64_t i = next(-1, buf, kind);
  if (i < n) issue(i, buf);
  while (i < n) {
    TileKind next_kind = TileKind::kVisible;
    const int64_t in = next(i, buf ^ 1, next_kind);  // buffer buf ^ 1 was last read before the barrier below
    if (in < n) {
      issue(in, buf ^ 1);
      cp_async_wait<1>();  // item i's group is complete, item in's may still run
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    compute(i, buf, kind);
    __syncthreads();
    i = in;
    kind = next_kind;
    buf ^= 1;
  }
}

// One query-tile block of the fast kernels: shared tiles, indices, and this
// thread's two query rows (16 warp + gid and + 8) of the tile.
template <int D>
struct QBlock {
  uint16_t *q, *dout, *k, *v;  // k, v: 2 buffers each
  int64_t *kp, *qp;            // kp: [2][64]
  uint8_t* mask;               // [2][64 x 64]
  int64_t bi, h, hg, bh, i0, nkt, q_col, kv_col, rows0;
  int qn, lane, warp, gid, tig;
  int row[2];
  int64_t qpos[2];
  bool valid[2];
};

template <int D>
__device__ __forceinline__ QBlock<D> make_qblock(const Attn<float>& p, unsigned char* smem, int64_t qt, int64_t bh,
                                                 bool with_dout) {
  using L = FastQLayout<D>;
  QBlock<D> c;
  c.q = reinterpret_cast<uint16_t*>(smem + L::kQ);
  c.k = reinterpret_cast<uint16_t*>(smem + L::kK);
  c.v = reinterpret_cast<uint16_t*>(smem + L::kV);
  c.dout = with_dout ? reinterpret_cast<uint16_t*>(smem + L::kDout) : nullptr;
  c.kp = reinterpret_cast<int64_t*>(smem + L::kKp);
  c.qp = reinterpret_cast<int64_t*>(smem + L::kQp);
  c.mask = smem + L::kMask;
  c.bh = bh;
  c.bi = bh / p.heads;
  c.h = bh % p.heads;
  c.hg = p.head_offset + c.h;
  c.i0 = qt * kFT;
  c.qn = static_cast<int>(lmin(kFT, p.sq - c.i0));
  c.nkt = (p.sk + kFT - 1) / kFT;
  c.q_col = bh * D;
  c.kv_col = (c.bi * p.groups + c.h / p.r) * D;
  c.rows0 = bh * p.sq + c.i0;
  const int tid = static_cast<int>(threadIdx.x);
  c.lane = tid & 31;
  c.warp = tid >> 5;
  c.gid = c.lane >> 2;
  c.tig = c.lane & 3;
  for (int rl = 0; rl < 2; ++rl) {
    c.row[rl] = 16 * c.warp + c.gid + 8 * rl;
    c.valid[rl] = c.row[rl] < c.qn;
    c.qpos[rl] = c.valid[rl] ? qpos(p, c.i0 + c.row[rl]) : 0;
  }
  return c;
}

// Starts loading the block's Q (and dO) tile and its query positions; on
// return (after the wait and the barrier) they are in shared memory.
template <int D>
__device__ __forceinline__ void load_query_side(const Attn<float>& p, const QBlock<D>& c) {
  load_tile_async<D>(c.q, p.q, c.i0, c.qn, p.q_stride, c.q_col);
  if (c.dout != nullptr) load_tile_async<D>(c.dout, p.dout, c.i0, c.qn, p.q_stride, c.q_col);
  cp_async_commit();
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kFT) c.qp[tid] = tid < c.qn ? qpos(p, c.i0 + tid) : 0;
  cp_async_wait<0>();
  __syncthreads();
}

// Whether every valid row of this thread has x > fill + underflow (then exp(fill - x) = 0).
template <int D>
__device__ __forceinline__ bool rows_above(const Attn<float>& p, const QBlock<D>& c, const float (&x)[2]) {
  const float lim = p.fill + p.underflow;
  return (!c.valid[0] || x[0] > lim) && (!c.valid[1] || x[1] > lim);
}

// Block-wide: the kind of key tile t for the block's query rows (c.qp), its
// key positions into kp and, with an explicit mask, its element mask into mk
// ([query][key], 1 = masked). Causal/window only: the CPU twin's per-row test
// against the tile's key position bounds; an explicit mask: element by element.
template <int D>
__device__ TileKind fast_classify(const Attn<float>& p, const QBlock<D>& c, int64_t t, int64_t* kp, uint8_t* mk) {
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t k0 = t * kFT;
  const int kn = static_cast<int>(lmin(kFT, p.sk - k0));
  if (tid < kFT) kp[tid] = tid < kn ? kpos(p, k0 + tid) : 0;
  if (!p.any_mask) return TileKind::kVisible;
  int vis = 0, msk = 0;
  if (p.mask == nullptr) {
    if (tid < c.qn) {
      const int64_t q = c.qp[tid], kmin = p.kt_bounds[2 * t], kmax = p.kt_bounds[2 * t + 1];
      const bool all_visible = (!p.causal || kmax <= q) && (p.left < 0 || kmin >= q - p.left) &&
                               (p.right < 0 || kmax <= q + p.right);
      const bool all_masked = (p.causal && kmin > q) || (p.left >= 0 && kmax < q - p.left) ||
                              (p.right >= 0 && kmin > q + p.right);
      vis = !all_masked;
      msk = !all_visible;
    }
  } else {
    __syncthreads();  // kp
    for (int e = tid; e < kFT * kFT; e += static_cast<int>(blockDim.x)) {
      const int i = e / kFT, j = e - i * kFT;
      uint8_t m = 0;
      if (i < c.qn && j < kn) {
        m = is_masked(p, c.bi, c.hg, c.qp[i], kp[j]) ? 1 : 0;
        vis |= m == 0;
        msk |= m;
      }
      mk[e] = m;
    }
  }
  vis = __syncthreads_or(vis);
  msk = __syncthreads_or(msk);
  if (!msk) return TileKind::kVisible;
  return vis ? TileKind::kPartial : TileKind::kMasked;
}

// Whether element (query row, key) of a tile of this kind is masked.
__device__ __forceinline__ bool fast_masked(const Attn<float>& p, TileKind kind, const uint8_t* mk, int row, int key,
                                            int64_t qp, int64_t kp) {
  if (kind == TileKind::kVisible) return false;
  if (kind == TileKind::kMasked) return true;
  return p.mask != nullptr ? mk[row * kFT + key] != 0 : positional_masked(p, qp, kp);
}

// Key tiles for the block's query tile, in order, those `want` accepts, with
// K (and V) in shared memory for compute(t, buf, kind).
template <int D, class Want, class Compute>
__device__ __forceinline__ void fast_key_loop(const Attn<float>& p, const QBlock<D>& c, bool load_v, Want&& want,
                                              Compute&& compute) {
  pipelined(
      c.nkt,
      [&](int64_t t, int buf, TileKind& kind) {
        kind = fast_classify<D>(p, c, t, c.kp + buf * kFT, c.mask + buf * kFT * kFT);
        return want(kind);
      },
      [&](int64_t t, int buf) {
        const int64_t k0 = t * kFT;
        const int kn = static_cast<int>(lmin(kFT, p.sk - k0));
        load_tile_async<D>(c.k + buf * FastTile<D>::kElems, p.k, k0, kn, p.kv_stride, c.kv_col);
        if (load_v) load_tile_async<D>(c.v + buf * FastTile<D>::kElems, p.v, k0, kn, p.kv_stride, c.kv_col);
        cp_async_commit();
      },
      compute);
}

// The forward's tile order (generic_forward_pass): the key tiles with a
// visible entry (phase 0), then the fully masked ones (phase 1) unless every
// row's reference (running max, or lse) is past fill + underflow, where they
// add exp(fill - ref) = 0. One loop body for both phases (code size).
template <int D, class Compute>
__device__ __forceinline__ void fast_phases(const Attn<float>& p, const QBlock<D>& c, bool load_v, const float (&ref)[2],
                                            Compute&& compute) {
  bool saw_masked = false;
  for (int phase = 0; phase < 2; ++phase) {
    if (phase == 1 && (!saw_masked || __syncthreads_and(rows_above(p, c, ref)))) break;
    fast_key_loop<D>(
        p, c, load_v,
        [&](TileKind k) {
          const bool masked = k == TileKind::kMasked;
          if (phase == 0) saw_masked = saw_masked || masked;
          return masked == (phase == 1);
        },
        compute);
  }
}

// S of the warp's 16 query rows against key tile t (in buffer buf): scale *
// Q K^T, `fill` where masked, -inf past the last key.
template <bool kBf16, int D>
__device__ __forceinline__ void fast_scores(const Attn<float>& p, const QBlock<D>& c, int64_t t, int buf,
                                            TileKind kind, float (&s)[8][4]) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
  mma_abt<kBf16, D>(s, c.q, 16 * c.warp, c.k + buf * FastTile<D>::kElems, c.lane);
  const int kn = static_cast<int>(lmin(kFT, p.sk - t * kFT));
  const int64_t* kp = c.kp + buf * kFT;
  const uint8_t* mk = c.mask + buf * kFT * kFT;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = 8 * nt + 2 * c.tig + (e & 1), rl = e >> 1;
      float x = s[nt][e] * p.scale;
      if (key >= kn) {
        x = -INFINITY;
      } else if (fast_masked(p, kind, mk, c.row[rl], key, c.qpos[rl], kp[key])) {
        x = p.fill;
      }
      s[nt][e] = x;
    }
  }
}

// The forward's statistics pass for the block's query tile: the running max m
// and sum l of this thread's two rows over every key tile, fully masked tiles
// last and only when needed (generic_forward_pass, Pass::kStats).
template <bool kBf16, int D>
__device__ void fast_row_stats(const Attn<float>& p, const QBlock<D>& c, float (&m)[2], float (&l)[2]) {
  const auto update = [&](int64_t t, int buf, TileKind kind) {
    float s[8][4];
    fast_scores<kBf16, D>(p, c, t, buf, kind, s);
#pragma unroll
    for (int rl = 0; rl < 2; ++rl) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rl], s[nt][2 * rl + 1]));
      // The row's 64 keys are spread over the 4 threads of a quad.
      mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
      const float m_new = fmaxf(m[rl], mx);
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        sum += expf(s[nt][2 * rl] - m_new);
        sum += expf(s[nt][2 * rl + 1] - m_new);
      }
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 1);
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 2);
      const float alpha = m[rl] == -INFINITY ? 0.0f : expf(m[rl] - m_new);
      l[rl] = l[rl] * alpha + sum;
      m[rl] = m_new;
    }
  };
  fast_phases<D>(p, c, false, m, update);
}

// Forward, one block per (query tile, batch, head), query tiles in reverse
// order (causal: the expensive tiles first). Two passes (16-bit
// probabilities): statistics, then O += round(exp(s - lse)) V.
template <bool kBf16, int D>
__global__ void __launch_bounds__(kFastThreads) forward_fast_kernel(const __grid_constant__ Attn<float> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t nqt = (p.sq + kFT - 1) / kFT, bhn = p.batch * p.heads;
  const int64_t qt = nqt - 1 - static_cast<int64_t>(blockIdx.x) / bhn, bh = static_cast<int64_t>(blockIdx.x) % bhn;
  const QBlock<D> c = make_qblock<D>(p, smem, qt, bh, false);
  load_query_side<D>(p, c);

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  fast_row_stats<kBf16, D>(p, c, m, l);
  const float lse[2] = {m[0] + logf(l[0]), m[1] + logf(l[1])};

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  const auto pv = [&](int64_t t, int buf, TileKind kind) {
    float s[8][4];
    fast_scores<kBf16, D>(p, c, t, buf, kind, s);
    const int kn = static_cast<int>(lmin(kFT, p.sk - t * kFT));
    const int64_t* kp = c.kp + buf * kFT;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = 8 * nt + 2 * c.tig + (e & 1), rl = e >> 1;
        float pr = expf(s[nt][e] - lse[rl]);
        if (key < kn) {
          pr = round16<kBf16>(pr);
          if (p.drop && c.valid[rl]) {
            pr = round16<kBf16>(pr * fast_dropout(p, c.bi, c.hg, c.qpos[rl], kp[key]));
          }
        }
        s[nt][e] = pr;
      }
    }
    mma_xb<kBf16, D, false>(o, s, c.v + buf * FastTile<D>::kElems, c.lane);
  };
  fast_phases<D>(p, c, true, lse, pv);

  // out = O (P was normalised), staged in the K/V buffers (free after the loop's barrier), and lse.
  static_assert(kFT * kStageLd<D> * 4 <= 4 * FastTile<D>::kBytes, "the stage fits the K and V buffers");
  float* stage = reinterpret_cast<float*>(c.k);
  stage_acc<D>(stage, o, 16 * c.warp, c.lane);
  __syncthreads();
  store_staged<D>(stage, c.qn, p.out, p.out_dt, c.i0, p.q_stride, c.q_col);
  if (c.tig == 0) {
    for (int rl = 0; rl < 2; ++rl) {
      if (c.valid[rl]) put<float>(p.lse, p.lse_dt, c.rows0 + c.row[rl], lse[rl]);
    }
  }
}

// Backward preprocessing (backward_prep_generic_kernel's job; 16-bit
// probabilities, so D = rowsum(P o dP') over the key tiles), one block per
// (query tile, batch, head).
template <int D>
__global__ void __launch_bounds__(kFastThreads) backward_prep_fast_kernel(const __grid_constant__ Attn<float> p) {
  constexpr bool kBf16 = true;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t bhn = p.batch * p.heads;
  const int64_t qt = static_cast<int64_t>(blockIdx.x) / bhn, bh = static_cast<int64_t>(blockIdx.x) % bhn;
  const QBlock<D> c = make_qblock<D>(p, smem, qt, bh, true);
  load_query_side<D>(p, c);

  float lse_r[2];
  for (int rl = 0; rl < 2; ++rl) lse_r[rl] = c.valid[rl] ? ld<float>(p.lse, c.rows0 + c.row[rl]) : 0.0f;
  const float lim = p.fill + p.underflow;
  const bool need = __syncthreads_or((c.valid[0] && (p.force_stats || !(lse_r[0] > lim))) ||
                                     (c.valid[1] && (p.force_stats || !(lse_r[1] > lim)))) != 0;
  float rm[2] = {lse_r[0], lse_r[1]}, rll[2] = {0.0f, 0.0f};
  if (need) {
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    fast_row_stats<kBf16, D>(p, c, m, l);
    for (int rl = 0; rl < 2; ++rl) rm[rl] = m[rl], rll[rl] = logf(l[rl]);
  }
  if (c.tig == 0) {
    for (int rl = 0; rl < 2; ++rl) {
      if (!c.valid[rl]) continue;
      p.row_m[c.rows0 + c.row[rl]] = rm[rl];
      p.row_ll[c.rows0 + c.row[rl]] = rll[rl];
    }
  }

  const bool above = __syncthreads_and(rows_above(p, c, lse_r)) != 0;
  double acc[2] = {0.0, 0.0};
  const auto dpass = [&](int64_t t, int buf, TileKind kind) {
    float s[8][4];
    fast_scores<kBf16, D>(p, c, t, buf, kind, s);
    float dp[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
    mma_abt<kBf16, D>(dp, c.dout, 16 * c.warp, c.v + buf * FastTile<D>::kElems, c.lane);
    const int kn = static_cast<int>(lmin(kFT, p.sk - t * kFT));
    const int64_t* kp = c.kp + buf * kFT;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = 8 * nt + 2 * c.tig + (e & 1), rl = e >> 1;
        if (key >= kn || !c.valid[rl]) continue;
        const float pr = expf((s[nt][e] - rm[rl]) - rll[rl]);
        float d = dp[nt][e];
        if (p.drop) d = d * fast_dropout(p, c.bi, c.hg, c.qpos[rl], kp[key]);
        acc[rl] += static_cast<double>(pr) * static_cast<double>(d);
      }
    }
  };
  fast_key_loop<D>(p, c, true, [&](TileKind k) { return !(k == TileKind::kMasked && above); }, dpass);
  for (int rl = 0; rl < 2; ++rl) {
    acc[rl] += __shfl_xor_sync(0xFFFFFFFFu, acc[rl], 1);
    acc[rl] += __shfl_xor_sync(0xFFFFFFFFu, acc[rl], 2);
  }
  if (c.tig == 0) {
    for (int rl = 0; rl < 2; ++rl) {
      if (c.valid[rl]) p.row_d[c.rows0 + c.row[rl]] = static_cast<float>(acc[rl]);
    }
  }
}

// dQ, one block per (query tile, batch, head): dQ += dS K over the key tiles
// in order, dS in fp32 through the three-piece split.
template <int D>
__global__ void __launch_bounds__(kFastThreads) backward_dq_fast_kernel(const __grid_constant__ Attn<float> p) {
  constexpr bool kBf16 = true;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t bhn = p.batch * p.heads;
  const int64_t qt = static_cast<int64_t>(blockIdx.x) / bhn, bh = static_cast<int64_t>(blockIdx.x) % bhn;
  const QBlock<D> c = make_qblock<D>(p, smem, qt, bh, true);
  load_query_side<D>(p, c);

  float rm[2], rll[2], rd[2], lse_r[2];
  for (int rl = 0; rl < 2; ++rl) {
    const int64_t at = c.rows0 + c.row[rl];
    rm[rl] = c.valid[rl] ? p.row_m[at] : 0.0f;
    rll[rl] = c.valid[rl] ? p.row_ll[at] : 0.0f;
    rd[rl] = c.valid[rl] ? p.row_d[at] : 0.0f;
    lse_r[rl] = c.valid[rl] ? ld<float>(p.lse, at) : 0.0f;
  }
  const bool above = __syncthreads_and(rows_above(p, c, lse_r)) != 0;

  float dq[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;
  const auto step = [&](int64_t t, int buf, TileKind kind) {
    float s[8][4];
    fast_scores<kBf16, D>(p, c, t, buf, kind, s);
    float dp[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
    mma_abt<kBf16, D>(dp, c.dout, 16 * c.warp, c.v + buf * FastTile<D>::kElems, c.lane);
    const int kn = static_cast<int>(lmin(kFT, p.sk - t * kFT));
    const int64_t* kp = c.kp + buf * kFT;
    const uint8_t* mk = c.mask + buf * kFT * kFT;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = 8 * nt + 2 * c.tig + (e & 1), rl = e >> 1;
        float ds = 0.0f;
        if (key < kn && c.valid[rl]) {
          const float pr = expf((s[nt][e] - rm[rl]) - rll[rl]);
          float d = dp[nt][e];
          if (p.drop) d = d * fast_dropout(p, c.bi, c.hg, c.qpos[rl], kp[key]);
          ds = fast_masked(p, kind, mk, c.row[rl], key, c.qpos[rl], kp[key]) ? 0.0f : (pr * (d - rd[rl])) * p.scale;
        }
        s[nt][e] = ds;
      }
    }
    mma_xb<kBf16, D, true>(dq, s, c.k + buf * FastTile<D>::kElems, c.lane);
  };
  fast_key_loop<D>(p, c, true, [&](TileKind k) { return !(k == TileKind::kMasked && above); }, step);

  float* stage = reinterpret_cast<float*>(c.k);  // the K/V buffers, free after the loop's barrier
  stage_acc<D>(stage, dq, 16 * c.warp, c.lane);
  __syncthreads();
  store_staged<D>(stage, c.qn, p.dq, p.dq_dt, c.i0, p.q_stride, c.q_col);
}

// dK, dV, one block per (key tile, batch, group); warp w owns keys
// 16w..16w+15. The items are (head of the group, query tile) pairs in head
// order, then query-tile order (the generic kernel's order): S^T = K Q^T and
// dP^T = V dO^T, then dV += P'^T dO and dK += dS^T Q (dS split).
template <int D>
__global__ void __launch_bounds__(kFastThreads) backward_dkdv_fast_kernel(const __grid_constant__ Attn<float> p) {
  constexpr bool kBf16 = true;
  using L = FastKLayout<D>;
  constexpr int kE = FastTile<D>::kElems;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* const sK = reinterpret_cast<uint16_t*>(smem + L::kK);
  uint16_t* const sV = reinterpret_cast<uint16_t*>(smem + L::kV);
  uint16_t* const sQ = reinterpret_cast<uint16_t*>(smem + L::kQ);
  uint16_t* const sDout = reinterpret_cast<uint16_t*>(smem + L::kDout);
  int64_t* const sKp = reinterpret_cast<int64_t*>(smem + L::kKp);
  int64_t* const sQp = reinterpret_cast<int64_t*>(smem + L::kQp);
  float* const sRows = reinterpret_cast<float*>(smem + L::kRows);
  uint8_t* const sMask = smem + L::kMask;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
  const int64_t bgn = p.batch * p.groups;
  const int64_t kt = static_cast<int64_t>(blockIdx.x) / bgn, bg = static_cast<int64_t>(blockIdx.x) % bgn;
  const int64_t bi = bg / p.groups, g = bg % p.groups;
  const int64_t k0 = kt * kFT;
  const int kn = static_cast<int>(lmin(kFT, p.sk - k0));
  const int64_t kv_col = bg * D;
  load_tile_async<D>(sK, p.k, k0, kn, p.kv_stride, kv_col);
  load_tile_async<D>(sV, p.v, k0, kn, p.kv_stride, kv_col);
  cp_async_commit();
  if (tid < kFT) sKp[tid] = tid < kn ? kpos(p, k0 + tid) : 0;
  const int64_t kmin = p.kt_bounds[2 * kt], kmax = p.kt_bounds[2 * kt + 1];
  cp_async_wait<0>();
  __syncthreads();

  const int64_t nqt = (p.sq + kFT - 1) / kFT;
  const int key_row[2] = {16 * warp + gid, 16 * warp + gid + 8};  // this thread's keys (rows of S^T)
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.0f;
    dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.0f;
  }

  // Item i = (head h = g r + i / nqt, query tile i % nqt).
  struct Item {
    int64_t h, hg, i0, rows0, q_col;
    int qn;
  };
  const auto item = [&](int64_t i) {
    Item it;
    it.h = g * p.r + i / nqt;
    it.hg = p.head_offset + it.h;
    it.i0 = (i % nqt) * kFT;
    it.qn = static_cast<int>(lmin(kFT, p.sq - it.i0));
    it.rows0 = (bi * p.heads + it.h) * p.sq + it.i0;
    it.q_col = (bi * p.heads + it.h) * D;
    return it;
  };
  const auto classify = [&](int64_t i, int buf, TileKind& kind) {
    const Item it = item(i);
    int64_t* qp = sQp + buf * kFT;
    uint8_t* mk = sMask + buf * kFT * kFT;
    if (tid < kFT) qp[tid] = tid < it.qn ? qpos(p, it.i0 + tid) : 0;
    float lse_i = 0.0f;
    int vis = 0, msk = 0;
    if (tid < it.qn) {
      lse_i = ld<float>(p.lse, it.rows0 + tid);
      if (p.any_mask && p.mask == nullptr) {
        const int64_t q = qpos(p, it.i0 + tid);
        const bool all_visible = (!p.causal || kmax <= q) && (p.left < 0 || kmin >= q - p.left) &&
                                 (p.right < 0 || kmax <= q + p.right);
        const bool all_masked = (p.causal && kmin > q) || (p.left >= 0 && kmax < q - p.left) ||
                                (p.right >= 0 && kmin > q + p.right);
        vis = !all_masked;
        msk = !all_visible;
      }
    }
    if (p.mask != nullptr) {
      __syncthreads();  // qp
      for (int e = tid; e < kFT * kFT; e += static_cast<int>(blockDim.x)) {
        const int qi = e / kFT, j = e - qi * kFT;
        uint8_t mm = 0;
        if (qi < it.qn && j < kn) {
          mm = is_masked(p, bi, it.hg, qp[qi], sKp[j]) ? 1 : 0;
          vis |= mm == 0;
          msk |= mm;
        }
        mk[e] = mm;
      }
    }
    const bool above = __syncthreads_and(tid >= it.qn || lse_i > p.fill + p.underflow) != 0;
    vis = __syncthreads_or(vis);
    msk = __syncthreads_or(msk);
    kind = !msk ? TileKind::kVisible : (vis ? TileKind::kPartial : TileKind::kMasked);
    return !(kind == TileKind::kMasked && above);  // else P = 0 and dS = 0: nothing to add
  };
  const auto issue = [&](int64_t i, int buf) {
    const Item it = item(i);
    load_tile_async<D>(sQ + buf * kE, p.q, it.i0, it.qn, p.q_stride, it.q_col);
    load_tile_async<D>(sDout + buf * kE, p.dout, it.i0, it.qn, p.q_stride, it.q_col);
    cp_async_commit();
    if (tid < kFT) {
      float* rows = sRows + buf * 3 * kFT;
      const bool v = tid < it.qn;
      rows[tid] = v ? p.row_m[it.rows0 + tid] : 0.0f;
      rows[kFT + tid] = v ? p.row_ll[it.rows0 + tid] : 0.0f;
      rows[2 * kFT + tid] = v ? p.row_d[it.rows0 + tid] : 0.0f;
    }
  };
  const auto compute = [&](int64_t i, int buf, TileKind kind) {
    const Item it = item(i);
    const uint16_t* q = sQ + buf * kE;
    const uint16_t* dout = sDout + buf * kE;
    const int64_t* qp = sQp + buf * kFT;
    const float* rows = sRows + buf * 3 * kFT;
    const uint8_t* mk = sMask + buf * kFT * kFT;
    float st[8][4], dpt[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.0f;
      dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.0f;
    }
    mma_abt<kBf16, D>(st, sK, 16 * warp, q, lane);      // S^T: this warp's keys x the 64 queries
    mma_abt<kBf16, D>(dpt, sV, 16 * warp, dout, lane);  // dP^T
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int query = 8 * nt + 2 * tig + (e & 1), key = key_row[e >> 1];
        float pp = 0.0f, ds = 0.0f;
        if (query < it.qn && key < kn) {
          const bool masked = fast_masked(p, kind, mk, query, key, qp[query], sKp[key]);
          const float x = masked ? p.fill : st[nt][e] * p.scale;
          const float pr = expf((x - rows[query]) - rows[kFT + query]);
          float d = dpt[nt][e];
          pp = round16<kBf16>(pr);  // the fast path's probs_dtype is the storage dtype
          if (p.drop) {
            const float f = fast_dropout(p, bi, it.hg, qp[query], sKp[key]);
            pp = round16<kBf16>(pp * f);
            d = d * f;
          }
          ds = masked ? 0.0f : (pr * (d - rows[2 * kFT + query])) * p.scale;
        }
        st[nt][e] = pp;
        dpt[nt][e] = ds;
      }
    }
    mma_xb<kBf16, D, false>(dv, st, dout, lane);  // dV += P'^T dO (P' exact in bf16)
    mma_xb<kBf16, D, true>(dk, dpt, q, lane);     // dK += dS^T Q
  };
  pipelined(p.r * nqt, classify, issue, compute);

  // dK staged in the Q buffers, dV in the dO buffers (free after the loop's barrier).
  static_assert(kFT * kStageLd<D> * 4 <= 2 * FastTile<D>::kBytes, "a stage fits two tile buffers");
  float* dk_stage = reinterpret_cast<float*>(sQ);
  float* dv_stage = reinterpret_cast<float*>(sDout);
  stage_acc<D>(dk_stage, dk, 16 * warp, lane);
  stage_acc<D>(dv_stage, dv, 16 * warp, lane);
  __syncthreads();
  store_staged<D>(dk_stage, kn, p.dk, p.dk_dt, k0, p.kv_stride, kv_col);
  store_staged<D>(dv_stage, kn, p.dv, p.dv_dt, k0, p.kv_stride, kv_col);
}

// ===========================================================================
// Host side.

// Device copies of the host-side arguments (positions, explicit mask, the
// fast path's key-tile bounds) and the backward's row arrays, carved from one
// workspace region (workspace() is valid until the next call that asks).
struct Staged {
  const int64_t* q_pos = nullptr;
  const int64_t* k_pos = nullptr;
  const int64_t* kt_bounds = nullptr;
  const uint8_t* mask = nullptr;
  void* rows = nullptr;  // 3 arrays of b * np * sq compute-type values
};

int64_t mask_bytes(const AttentionArgs& a) {
  if (a.mask == nullptr) return 0;
  return a.mask_dims[0] * a.mask_dims[1] * a.mask_dims[2] * a.mask_dims[3];
}

// {min, max} key position of each 64-key tile (the fast path's conservative
// tile classification, as the CPU's classify does per tile).
std::vector<int64_t> key_tile_bounds(const AttentionArgs& a) {
  constexpr int64_t kTile = 64;
  const int64_t nkt = (a.sk + kTile - 1) / kTile;
  std::vector<int64_t> b(static_cast<size_t>(2 * nkt));
  for (int64_t t = 0; t < nkt; ++t) {
    const int64_t k0 = t * kTile, k1 = std::min(a.sk, k0 + kTile);
    int64_t lo = k0, hi = k1 - 1;
    if (!a.k_positions.empty()) {
      const auto [mn, mx] = std::minmax_element(a.k_positions.begin() + k0, a.k_positions.begin() + k1);
      lo = *mn, hi = *mx;
    }
    b[static_cast<size_t>(2 * t)] = lo;
    b[static_cast<size_t>(2 * t + 1)] = hi;
  }
  return b;
}

Staged stage(CudaBackend& be, const AttentionArgs& a, bool bounds, size_t row_bytes, const std::string& ctx) {
  const auto up = [](size_t n) { return (n + 255) / 256 * 256; };
  const std::vector<int64_t> kb = bounds ? key_tile_bounds(a) : std::vector<int64_t>{};
  const size_t qb = a.q_positions.size() * sizeof(int64_t), kpb = a.k_positions.size() * sizeof(int64_t);
  const size_t bb = kb.size() * sizeof(int64_t), mb = static_cast<size_t>(mask_bytes(a));
  const size_t total = up(qb) + up(kpb) + up(bb) + up(mb) + up(3 * row_bytes);
  Staged s;
  if (total == 0) return s;
  auto* base = static_cast<unsigned char*>(be.workspace(total));
  size_t at = 0;
  const cudaStream_t st = stream_of(be);
  // Pageable sources: each call returns once its bytes are staged.
  const auto copy = [&](const void* src, size_t bytes) -> void* {
    void* dst = base + at;
    at += up(bytes);
    if (bytes > 0) PARITRON_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, st), ctx);
    return dst;
  };
  if (qb > 0) s.q_pos = static_cast<const int64_t*>(copy(a.q_positions.data(), qb));
  if (kpb > 0) s.k_pos = static_cast<const int64_t*>(copy(a.k_positions.data(), kpb));
  if (bb > 0) s.kt_bounds = static_cast<const int64_t*>(copy(kb.data(), bb));
  if (mb > 0) s.mask = static_cast<const uint8_t*>(copy(a.mask, mb));
  if (row_bytes > 0) s.rows = base + at;
  return s;
}

template <class T>
Attn<T> make_attn(const AttentionArgs& a, const Staged& s) {
  Attn<T> p;
  p.batch = a.batch, p.sq = a.sq, p.sk = a.sk, p.heads = a.heads, p.groups = a.groups, p.hn = a.head_dim;
  p.r = a.heads / a.groups;
  p.q_stride = a.batch * a.heads * a.head_dim;
  p.kv_stride = a.batch * a.groups * a.head_dim;
  p.q_pos = s.q_pos, p.k_pos = s.k_pos, p.kt_bounds = s.kt_bounds, p.mask = s.mask;
  for (int i = 0; i < 4; ++i) p.md[i] = a.mask_dims[static_cast<size_t>(i)];
  p.batch_offset = a.batch_offset, p.head_offset = a.head_offset;
  p.heads_global = a.heads_global > 0 ? a.heads_global : a.heads;
  p.Sq = a.sq_global > 0 ? a.sq_global : a.sq;
  p.Sk = a.sk_global > 0 ? a.sk_global : a.sk;
  p.causal = a.causal;
  p.left = a.window[0], p.right = a.window[1];
  p.any_mask = a.causal || a.window[0] >= 0 || a.window[1] >= 0 || a.mask != nullptr;
  p.drop = a.dropout_p > 0.0;
  p.threshold = threshold_float(a.dropout_p);
  // The CPU twin's keep scale: 1 / (1 - p) in double, as the compute type.
  p.keep = static_cast<T>(1.0 / (1.0 - a.dropout_p));
  p.key = a.dropout_key;
  p.probs_dt = a.probs_dtype;
  p.round_p = a.probs_dtype == DType::BF16 || a.probs_dtype == DType::F16;
  p.scale = static_cast<T>(a.softmax_scale);
  p.fill = static_cast<T>(a.fill);
  p.underflow = sizeof(T) == 8 ? T(746) : T(104);
  if (s.rows != nullptr) {
    const int64_t n = a.batch * a.heads * a.sq;
    p.row_m = static_cast<T*>(s.rows);
    p.row_ll = p.row_m + n;
    p.row_d = p.row_ll + n;
  }
  return p;
}

int grid_of(int64_t blocks, std::string_view op, const std::string& ctx) {
  if (blocks > std::numeric_limits<int>::max()) {
    fail(op, text("{} thread blocks exceed the grid limit ({})", blocks, ctx));
  }
  return static_cast<int>(blocks);
}

// A generic kernel's layout for this call, or a clear error when even 16-row
// tiles of this head dim do not fit the device's shared memory.
GenLayout gen_layout_for(std::string_view op, std::string_view kernel, const AttentionArgs& a, size_t tsize,
                         unsigned bufs, size_t limit) {
  const int64_t longest = std::max<int64_t>({a.sq, a.sk, 1});
  if (a.head_dim > (int64_t{1} << 20)) fail(op, text("head_dim {} is too large for the attention kernels", a.head_dim));
  const GenLayout L = pick_gen_layout(a.head_dim, tsize, bufs, limit, longest);
  if (L.B == 0) {
    fail(op, text("head_dim {} needs {} bytes of shared memory per block in {} ({}-byte values), the device "
                  "allows {}",
                  a.head_dim, gen_layout(16, a.head_dim, tsize, bufs).bytes, kernel, tsize, limit));
  }
  return L;
}

template <class K>
void set_smem(K* kernel, size_t bytes, const std::string& ctx) {
  PARITRON_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), ctx);
}

constexpr unsigned bit(GenBuf b) { return 1u << b; }

template <class T>
void forward_generic(const CudaBackend& be, const AttentionArgs& a, const Attn<T>& p, const std::string& ctx) {
  static constexpr std::string_view op = "attention_forward";
  const size_t limit =
      static_cast<size_t>(device_attribute(be, cudaDevAttrMaxSharedMemoryPerBlockOptin, ctx));
  const GenLayout L = gen_layout_for(op, "forward_generic_kernel", a, sizeof(T),
                                     bit(kGQ) | bit(kGK) | bit(kGS) | bit(kGAcc0), limit);
  const int64_t nqt = (a.sq + L.B - 1) / L.B;
  const int grid = grid_of(nqt * a.batch * a.heads, op, ctx);
  set_smem(forward_generic_kernel<T>, L.bytes, ctx);
  forward_generic_kernel<T><<<grid, kGenThreads, L.bytes, stream_of(be)>>>(p, L);
  PARITRON_CUDA_CHECK_LAUNCH("forward_generic_kernel", ctx);
}

template <class T>
void backward_generic(const CudaBackend& be, const AttentionArgs& a, const Attn<T>& p, const std::string& ctx) {
  static constexpr std::string_view op = "attention_backward";
  const size_t limit =
      static_cast<size_t>(device_attribute(be, cudaDevAttrMaxSharedMemoryPerBlockOptin, ctx));
  const cudaStream_t s = stream_of(be);
  const unsigned rec = bit(kGQ) | bit(kGDout) | bit(kGK) | bit(kGV) | bit(kGS) | bit(kGDP);  // P and dP recomputed
  {
    const unsigned bufs = p.round_p ? rec : bit(kGQ) | bit(kGK) | bit(kGS);
    const GenLayout L = gen_layout_for(op, "backward_prep_generic_kernel", a, sizeof(T), bufs, limit);
    const int grid = grid_of((a.sq + L.B - 1) / L.B * a.batch * a.heads, op, ctx);
    set_smem(backward_prep_generic_kernel<T>, L.bytes, ctx);
    backward_prep_generic_kernel<T><<<grid, kGenThreads, L.bytes, s>>>(p, L);
    PARITRON_CUDA_CHECK_LAUNCH("backward_prep_generic_kernel", ctx);
  }
  if (a.sk > 0) {
    const GenLayout L = gen_layout_for(op, "backward_dkdv_generic_kernel", a, sizeof(T),
                                       rec | bit(kGPT) | bit(kGAcc0) | bit(kGAcc1), limit);
    const int grid = grid_of((a.sk + L.B - 1) / L.B * a.batch * a.groups, op, ctx);
    set_smem(backward_dkdv_generic_kernel<T>, L.bytes, ctx);
    backward_dkdv_generic_kernel<T><<<grid, kGenThreads, L.bytes, s>>>(p, L);
    PARITRON_CUDA_CHECK_LAUNCH("backward_dkdv_generic_kernel", ctx);
  }
  {
    const GenLayout L = gen_layout_for(op, "backward_dq_generic_kernel", a, sizeof(T), rec | bit(kGAcc0), limit);
    const int grid = grid_of((a.sq + L.B - 1) / L.B * a.batch * a.heads, op, ctx);
    set_smem(backward_dq_generic_kernel<T>, L.bytes, ctx);
    backward_dq_generic_kernel<T><<<grid, kGenThreads, L.bytes, s>>>(p, L);
    PARITRON_CUDA_CHECK_LAUNCH("backward_dq_generic_kernel", ctx);
  }
}

// The fast path's variants; kFastNone: the generic kernels.
enum FastKind : int { kFastNone = 0, kFastBf16D64, kFastBf16D128, kFastF16D64, kFastF16D128 };

bool aligned16(const DTensor& t) { return reinterpret_cast<uintptr_t>(t.data()) % 16 == 0; }

// Whether the device runs mma.sync bf16 (sm_80+) with `bytes` of shared memory per block.
bool device_fits(const CudaBackend& be, int bytes, const std::string& ctx) {
  return device_attribute(be, cudaDevAttrComputeCapabilityMajor, ctx) >= 8 &&
         device_attribute(be, cudaDevAttrMaxSharedMemoryPerBlockOptin, ctx) >= bytes;
}

// The fast variant for these operands, if any: every operand in the same
// 16-bit storage dtype (values not relabelled), probabilities rounded to it
// (the two-pass form whose P is exact in the MMA), head dim 64 or 128,
// 16-byte aligned rows (cp.async).
int fast_kind(const CudaBackend& be, const AttentionArgs& a, std::initializer_list<const DTensor*> ts, bool bf16_only,
              int bytes64, int bytes128, const std::string& ctx) {
  const DType dt = (*ts.begin())->storage_dtype();
  if (dt != DType::BF16 && (bf16_only || dt != DType::F16)) return kFastNone;
  for (const DTensor* t : ts) {
    if (t->storage_dtype() != dt || t->dtype() != dt || !aligned16(*t)) return kFastNone;
  }
  if (a.probs_dtype != dt || (a.head_dim != 64 && a.head_dim != 128)) return kFastNone;
  if (!device_fits(be, a.head_dim == 64 ? bytes64 : bytes128, ctx)) return kFastNone;
  if (dt == DType::BF16) return a.head_dim == 64 ? kFastBf16D64 : kFastBf16D128;
  return a.head_dim == 64 ? kFastF16D64 : kFastF16D128;
}

int fast_forward_kind(const CudaBackend& be, const AttentionArgs& a, const DTensor& q, const DTensor& k,
                      const DTensor& v, const std::string& ctx) {
  return fast_kind(be, a, {&q, &k, &v}, false, FastQLayout<64>::kForwardBytes, FastQLayout<128>::kForwardBytes,
                   ctx);
}

// bf16 only: fp16 pieces of dS would lose values below fp16's range.
int fast_backward_kind(const CudaBackend& be, const AttentionArgs& a, const DTensor& q, const DTensor& k,
                       const DTensor& v, const DTensor& dout, const std::string& ctx) {
  const int b64 = std::max(FastQLayout<64>::kBackwardBytes, FastKLayout<64>::kBytes);
  const int b128 = std::max(FastQLayout<128>::kBackwardBytes, FastKLayout<128>::kBytes);
  return fast_kind(be, a, {&q, &k, &v, &dout}, true, b64, b128, ctx);
}

template <bool kBf16, int D>
void launch_forward_fast(const CudaBackend& be, const AttentionArgs& a, const Attn<float>& p,
                         const std::string& ctx) {
  constexpr int bytes = FastQLayout<D>::kForwardBytes;
  const int grid = grid_of((a.sq + kFT - 1) / kFT * a.batch * a.heads, "attention_forward", ctx);
  set_smem(forward_fast_kernel<kBf16, D>, bytes, ctx);
  forward_fast_kernel<kBf16, D><<<grid, kFastThreads, bytes, stream_of(be)>>>(p);
  PARITRON_CUDA_CHECK_LAUNCH("forward_fast_kernel", ctx);
}

void forward_fast(const CudaBackend& be, const AttentionArgs& a, const Attn<float>& p, int kind,
                  const std::string& ctx) {
  switch (kind) {
    case kFastBf16D64: launch_forward_fast<true, 64>(be, a, p, ctx); break;
    case kFastBf16D128: launch_forward_fast<true, 128>(be, a, p, ctx); break;
    case kFastF16D64: launch_forward_fast<false, 64>(be, a, p, ctx); break;
    case kFastF16D128: launch_forward_fast<false, 128>(be, a, p, ctx); break;
    default: fail("attention_forward", text("no fast attention variant {} ({})", kind, ctx));
  }
}

template <int D>
void launch_backward_fast(const CudaBackend& be, const AttentionArgs& a, const Attn<float>& p,
                          const std::string& ctx) {
  static constexpr std::string_view op = "attention_backward";
  const cudaStream_t s = stream_of(be);
  const int q_grid = grid_of((a.sq + kFT - 1) / kFT * a.batch * a.heads, op, ctx);
  constexpr int q_bytes = FastQLayout<D>::kBackwardBytes, k_bytes = FastKLayout<D>::kBytes;
  set_smem(backward_prep_fast_kernel<D>, q_bytes, ctx);
  backward_prep_fast_kernel<D><<<q_grid, kFastThreads, q_bytes, s>>>(p);
  PARITRON_CUDA_CHECK_LAUNCH("backward_prep_fast_kernel", ctx);
  if (a.sk > 0) {
    const int k_grid = grid_of((a.sk + kFT - 1) / kFT * a.batch * a.groups, op, ctx);
    set_smem(backward_dkdv_fast_kernel<D>, k_bytes, ctx);
    backward_dkdv_fast_kernel<D><<<k_grid, kFastThreads, k_bytes, s>>>(p);
    PARITRON_CUDA_CHECK_LAUNCH("backward_dkdv_fast_kernel", ctx);
  }
  set_smem(backward_dq_fast_kernel<D>, q_bytes, ctx);
  backward_dq_fast_kernel<D><<<q_grid, kFastThreads, q_bytes, s>>>(p);
  PARITRON_CUDA_CHECK_LAUNCH("backward_dq_fast_kernel", ctx);
}

void backward_fast(const CudaBackend& be, const AttentionArgs& a, const Attn<float>& p, int kind,
                   const std::string& ctx) {
  switch (kind) {
    case kFastBf16D64: launch_backward_fast<64>(be, a, p, ctx); break;
    case kFastBf16D128: launch_backward_fast<128>(be, a, p, ctx); break;
    default: fail("attention_backward", text("no fast attention variant {} ({})", kind, ctx));
  }
}

}  // namespace

// ===========================================================================
// The Backend entry points.

void CudaBackend::attention_forward(const AttentionArgs& args, const DTensor& q, const DTensor& k, const DTensor& v,
                                    DTensor& out, DTensor& lse) {
  static constexpr std::string_view op = "attention_forward";
  for (auto [name, t] : {std::pair<std::string_view, const DTensor*>{"q", &q}, {"k", &k}, {"v", &v},
                         {"out", &out}, {"lse", &lse}}) {
    check_defined(op, name, *t);
  }
  check_attention(op, args, q, k, v, out, lse);
  if (args.sq == 0) return;  // nothing to write
  const std::string ctx = context(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}});
  const bool f64 = is_f64(q) || is_f64(k) || is_f64(v) || is_f64(out);
  const int fast = f64 ? 0 : fast_forward_kind(*this, args, q, k, v, ctx);
  const Staged staged = stage(*this, args, fast != 0, 0, ctx);
  if (f64) {
    Attn<double> p = make_attn<double>(args, staged);
    p.q = dev(q), p.k = dev(k), p.v = dev(v), p.out = dev(out), p.lse = dev(lse);
    p.out_dt = out.dtype(), p.lse_dt = lse.dtype();
    forward_generic(*this, args, p, ctx);
    return;
  }
  Attn<float> p = make_attn<float>(args, staged);
  p.q = dev(q), p.k = dev(k), p.v = dev(v), p.out = dev(out), p.lse = dev(lse);
  p.out_dt = out.dtype(), p.lse_dt = lse.dtype();
  if (fast != 0) {
    forward_fast(*this, args, p, fast, ctx);
  } else {
    forward_generic(*this, args, p, ctx);
  }
}

void CudaBackend::attention_backward(const AttentionArgs& args, const DTensor& q, const DTensor& k, const DTensor& v,
                                     const DTensor& out, const DTensor& lse, const DTensor& dout, DTensor& dq,
                                     DTensor& dk, DTensor& dv) {
  static constexpr std::string_view op = "attention_backward";
  for (auto [name, t] : {std::pair<std::string_view, const DTensor*>{"q", &q}, {"k", &k}, {"v", &v},
                         {"out", &out}, {"lse", &lse}, {"dout", &dout}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}}) {
    check_defined(op, name, *t);
  }
  check_attention(op, args, q, k, v, out, lse);
  check_numel(op, "dout", dout, out.numel(), "the shape of out");
  check_numel(op, "dq", dq, q.numel(), "the shape of q");
  check_numel(op, "dk", dk, k.numel(), "the shape of k");
  check_numel(op, "dv", dv, v.numel(), "the shape of v");
  const std::string ctx = context(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse},
                                       {"dout", &dout}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}});
  if (args.sq == 0) {
    // No queries: nothing reaches K and V.
    if (dk.nbytes() > 0) PARITRON_CUDA_CHECK(cudaMemsetAsync(dk.data(), 0, dk.nbytes(), stream_of(*this)), ctx);
    if (dv.nbytes() > 0) PARITRON_CUDA_CHECK(cudaMemsetAsync(dv.data(), 0, dv.nbytes(), stream_of(*this)), ctx);
    return;
  }
  const bool f64 = is_f64(q) || is_f64(k) || is_f64(v) || is_f64(out) || is_f64(dout) || is_f64(dq) ||
                   is_f64(dk) || is_f64(dv);
  const int fast = f64 ? 0 : fast_backward_kind(*this, args, q, k, v, dout, ctx);
  const size_t row_bytes = static_cast<size_t>(args.batch * args.heads * args.sq) * (f64 ? 8 : 4);
  const Staged staged = stage(*this, args, fast != 0, row_bytes, ctx);
  const auto fill_tensors = [&](auto& p) {
    p.q = dev(q), p.k = dev(k), p.v = dev(v), p.out = dev(out), p.lse = dev(lse), p.dout = dev(dout);
    p.dq = dev(dq), p.dk = dev(dk), p.dv = dev(dv);
    p.dq_dt = dq.dtype(), p.dk_dt = dk.dtype(), p.dv_dt = dv.dtype();
  };
  if (f64) {
    Attn<double> p = make_attn<double>(args, staged);
    fill_tensors(p);
    // lse holds fp32 (or coarser) values: not enough for P in double.
    p.force_stats = lse.storage_dtype() != DType::F64 || lse.dtype() != DType::F64;
    backward_generic(*this, args, p, ctx);
    return;
  }
  Attn<float> p = make_attn<float>(args, staged);
  fill_tensors(p);
  if (fast != 0) {
    backward_fast(*this, args, p, fast, ctx);
  } else {
    backward_generic(*this, args, p, ctx);
  }
}

}  // namespace paritron::opt::cuda
