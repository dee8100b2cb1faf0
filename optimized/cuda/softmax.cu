// The MoE router's row ops of the CUDA backend (cuda_backend.h): the row
// softmax of the router scores and the top-k selection, as Megatron's
// TopKRouter computes them (megatron/core/transformer/moe/router.py,
// moe_utils.py topk_softmax_with_capacity: torch.softmax(logits, dim=-1,
// dtype=float32) and torch.topk). Semantics: backend.h (softmax_rows),
// cuda_backend.h (router_topk), reference/moe_router.h.
//
// softmax_rows mirrors the CPU backend's softmax_impl
// (optimized/cpu/cpu_backend.cpp): max of the row (the first element when it
// is NaN), e = exp_(x - max) in T (math::act_detail::exp_: fast_expf in fp32,
// single source), the sum of e in double as math::norm_detail::lane_sum (8
// chains, lane l taking elements l, l + 8, ... in order, then its fixed tree),
// inv = T(1 / sum), y = e * inv rounded once to y's dtype. One warp per row:
// lane L holds elements 32k + L, and chain l (l = L % 8, duplicated in lanes
// l, l + 8, l + 16, l + 24) takes, for each block of 32, the elements of lanes
// l, l + 8, l + 16, l + 24 by shuffles: exactly lane_sum's order, so fp32
// results are the CPU backend's bits. In float64 runs exp is libm's on each
// side (CUDA's double exp may differ from the host's in the last bit).
// The max's zero sign may differ from the CPU's sequential scan; it cannot
// change a result (x - max differs only in the sign of a zero, exp(+-0) = 1).
//
// router_topk is math::topk_row per row (torch.topk order: descending, NaN
// first, ties to the lower index), one thread a row: E is small.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "common/error.h"
#include "optimized/cuda/cuda_backend.h"
#include "optimized/cuda/cuda_check.h"
#include "optimized/cuda/device.cuh"
#include "optimized/cuda/op_checks.h"
#include "optimized/math/activations.h"
#include "optimized/math/norm.h"
#include "optimized/math/router.h"

namespace paritron::opt::cuda {

namespace {

__device__ __forceinline__ float fmax_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double fmax_(double a, double b) { return fmax(a, b); }

constexpr int kSoftmaxThreads = 256;
static_assert(math::norm_detail::kLanes == 8);

// One warp per row of x [rows, n] (n >= 1).
template <class T>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_rows_kernel(DevPtr x, DevPtr y, DType y_dt, int64_t rows, int64_t n) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int chain = lane & 7;
  const int64_t warps = (int64_t{gridDim.x} * blockDim.x) >> 5;
  for (int64_t r = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {  // warp-uniform
    const int64_t off = r * n;
    // The CPU's scan: mx = x0, then x[c] > mx ? x[c] : mx, i.e. x0 when it is
    // NaN, else the max of the non-NaN elements (fmax ignores NaN).
    T mx = T(-INFINITY);
    for (int64_t c = lane; c < n; c += 32) mx = fmax_(mx, ld<T>(x, off + c));
    for (int o = 16; o > 0; o >>= 1) mx = fmax_(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
    const T x0 = ld<T>(x, off);
    if (x0 != x0) mx = x0;
    // sum of e = exp_(x - mx) in double, lane_sum's chains.
    double acc = 0.0;
    for (int64_t c0 = 0; c0 < n; c0 += 32) {  // warp-uniform
      const int64_t c = c0 + lane;
      const T e = c < n ? math::act_detail::exp_(ld<T>(x, off + c) - mx) : T(0);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const T v = __shfl_sync(0xFFFFFFFFu, e, chain + 8 * q);
        if (c0 + chain + 8 * q < n) acc += static_cast<double>(v);
      }
    }
    const double s = lane_tree(acc);
    const T inv = static_cast<T>(1.0 / s);
    for (int64_t c = lane; c < n; c += 32) {
      const T e = math::act_detail::exp_(ld<T>(x, off + c) - mx);
      put<T>(y, y_dt, off + c, e * inv);
    }
  }
}

// indices[r, 0..k) = math::topk_row of scores row r.
template <class T>
__global__ void router_topk_kernel(const T* scores, int64_t rows, int64_t n, int64_t k, int64_t* indices) {
  PARITRON_GRID_LOOP(r, rows) math::topk_row(scores + r * n, n, k, indices + r * k);
}

}  // namespace

// TopKRouter's torch.softmax(logits, dim=-1, dtype=torch.float32)
// (megatron/core/transformer/moe/router.py, moe_utils.py).
void CudaBackend::softmax_rows(const DTensor& x, DTensor& y) {
  static constexpr std::string_view op = "softmax_rows";
  check_defined(op, "x", x);
  check_defined(op, "y", y);
  if (y.rows() != x.rows() || y.cols() != x.cols()) {
    fail(op, text("y {} is not x's shape {}", y.describe(), x.describe()));
  }
  if (x.cols() == 0 || x.rows() == 0) return;
  const int64_t rows = x.rows(), n = x.cols();
  const cudaStream_t s = static_cast<cudaStream_t>(stream());
  const std::string ctx = text("{} x {} y {}", op, x.describe(), y.describe());
  const int blocks = blocks_for(rows * 32, kSoftmaxThreads);
  if (is_f64(x) || is_f64(y)) {
    softmax_rows_kernel<double><<<blocks, kSoftmaxThreads, 0, s>>>(dev(x), dev(y), y.dtype(), rows, n);
  } else {
    softmax_rows_kernel<float><<<blocks, kSoftmaxThreads, 0, s>>>(dev(x), dev(y), y.dtype(), rows, n);
  }
  PARITRON_CUDA_CHECK_LAUNCH("softmax_rows_kernel", ctx);
}

// TopKRouter's torch.topk(scores, k, dim=1) indices (moe_utils.py
// topk_softmax_with_capacity).
void CudaBackend::router_topk(const DTensor& scores, int64_t k, DTensor& indices) {
  static constexpr std::string_view op = "router_topk";
  if (!scores.defined()) fail(op, "scores is not allocated");
  if (!indices.defined()) fail(op, "indices is not allocated");
  const DType sd = scores.storage_dtype();
  if ((sd != DType::F32 && sd != DType::F64) || scores.dtype() != sd) {
    fail(op, text("scores {} must be f32 (or f64 in float64 runs)", scores.describe()));
  }
  const int64_t rows = scores.rows(), n = scores.cols();
  if (k < 1 || k > n) fail(op, text("k = {} must be in [1, {}] (the columns of scores {})", k, n, scores.describe()));
  if (indices.storage_dtype() != DType::I64 || indices.rows() != rows || indices.cols() != k) {
    fail(op, text("indices {} is not i64[{}, {}] (k per row of scores {})", indices.describe(), rows, k,
                  scores.describe()));
  }
  if (rows == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream());
  const std::string ctx = text("{} scores {} k {} indices {}", op, scores.describe(), k, indices.describe());
  auto* out = static_cast<int64_t*>(indices.data());
  if (sd == DType::F64) {
    router_topk_kernel<double><<<blocks_for(rows), kThreads, 0, s>>>(static_cast<const double*>(scores.data()), rows,
                                                                     n, k, out);
  } else {
    router_topk_kernel<float><<<blocks_for(rows), kThreads, 0, s>>>(static_cast<const float*>(scores.data()), rows,
                                                                    n, k, out);
  }
  PARITRON_CUDA_CHECK_LAUNCH("router_topk_kernel", ctx);
}

}  // namespace paritron::opt::cuda
