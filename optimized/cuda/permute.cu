// MoE token routing of the CUDA backend (cuda_backend.h): gather_rows (the
// permute: out[i] = x[rows[i]]) and scatter_add_rows (the unpermute /
// combine: out[rows[i]] += weights[i] * y[i]), as Megatron's
// megatron/core/transformer/moe/moe_utils.py permute / unpermute (index_select,
// then scatter_add of the probability-weighted expert outputs) used by
// token_dispatcher.py. Semantics: backend.h.
//
// The CPU backend (optimized/cpu/cpu_backend.cpp, gather_rows / scatter_impl)
// is the model:
//   * gather copies the storage bytes when x and out share dtypes (16-byte
//     vectors when aligned), else rounds each value to out's dtype.
//   * scatter_add adds each destination row's contributions in ascending
//     entry order i, each step out = out + w_i * y_i in T (w_i = T(float
//     weight)) rounded to out's dtype: the CPU backend's order and rounding
//     points, so the result is its bits, deterministic, with no atomics. The
//     order comes from a stable CUB radix sort of (key = destination row,
//     value = i); a warp then takes each run of equal keys and, per column,
//     folds the run's rows in order in registers, rounding after each step
//     exactly where the CPU rounds its stored row.
// The row indices and weights are host spans, uploaded to scratch memory
// (cudaMemcpyAsync from pageable memory returns once the bytes are staged).
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "common/error.h"
#include "common/math/float_format.h"
#include "optimized/cuda/cuda_backend.h"
#include "optimized/cuda/cuda_check.h"
#include "optimized/cuda/device.cuh"
#include "optimized/cuda/op_checks.h"

namespace paritron::opt::cuda {

namespace {

constexpr int kRowThreads = 256;  // 8 warps, one row each at a time
constexpr int kCopyBatch = 4;     // vectors in flight per lane

// Warps of the grid, and this thread's warp and lane.
__device__ __forceinline__ int64_t warp_count() { return (int64_t{gridDim.x} * blockDim.x) >> 5; }
__device__ __forceinline__ int64_t warp_id() { return (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) >> 5; }

// ---------------------------------------------------------------------------
// gather_rows.

// out row i = x row rows[i], bytes moved in units U (uint4 when the rows are
// 16-byte multiples and aligned, else the element size); one warp a row.
template <class U>
__global__ void __launch_bounds__(kRowThreads)
    gather_rows_copy_kernel(const U* __restrict__ x, const int64_t* __restrict__ rows, U* __restrict__ out,
                            int64_t n, int64_t units) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  for (int64_t i = warp_id(); i < n; i += warp_count()) {
    const U* src = x + rows[i] * units;
    U* dst = out + i * units;
    for (int64_t u0 = lane; u0 < units; u0 += 32 * kCopyBatch) {
      U v[kCopyBatch];
#pragma unroll
      for (int k = 0; k < kCopyBatch; ++k) {
        const int64_t u = u0 + 32 * k;
        v[k] = u < units ? src[u] : U{};
      }
#pragma unroll
      for (int k = 0; k < kCopyBatch; ++k) {
        const int64_t u = u0 + 32 * k;
        if (u < units) dst[u] = v[k];
      }
    }
  }
}

// out row i = x row rows[i] rounded to out's dtype (dtypes differ).
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    gather_rows_convert_kernel(DevPtr x, const int64_t* __restrict__ rows, DevPtr out, DType out_dt, int64_t n,
                               int64_t h) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  for (int64_t i = warp_id(); i < n; i += warp_count()) {
    const int64_t src = rows[i] * h, dst = i * h;
    for (int64_t c = lane; c < h; c += 32) put<T>(out, out_dt, dst + c, ld<T>(x, src + c));
  }
}

template <class U>
void launch_gather_copy(const DTensor& x, const int64_t* rows, DTensor& out, int64_t n, int64_t row_bytes,
                        cudaStream_t s, const std::string& ctx) {
  const int64_t units = row_bytes / static_cast<int64_t>(sizeof(U));
  gather_rows_copy_kernel<U><<<blocks_for(n * 32, kRowThreads), kRowThreads, 0, s>>>(
      static_cast<const U*>(x.data()), rows, static_cast<U*>(out.data()), n, units);
  PARITRON_CUDA_CHECK_LAUNCH("gather_rows_copy_kernel", ctx);
}

// ---------------------------------------------------------------------------
// scatter_add_rows.

__global__ void iota_kernel(int32_t* v, int64_t n) {
  PARITRON_GRID_LOOP(i, n) v[i] = static_cast<int32_t>(i);
}

// keys [n]: destination rows sorted (stable; the int64 indices, all >= 0,
// sorted as uint64); src [n]: the entries i in that
// order (ascending within a destination). One warp per run of equal keys
// (the warp whose position starts the run): for each column, out = out +
// w_i y_i (or out + y_i without weights) for the run's i in order, in T,
// rounded to out's dtype after every step (the CPU backend rounds its stored
// row after each entry), one load and one store of out per column.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    scatter_add_sorted_kernel(DevPtr y, const uint64_t* __restrict__ keys, const int32_t* __restrict__ src,
                              const float* __restrict__ w, DevPtr out, DType out_dt, int64_t n, int64_t h, bool vec) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  for (int64_t p = warp_id(); p < n; p += warp_count()) {  // warp-uniform
    const uint64_t row = keys[p];
    if (p > 0 && keys[p - 1] == row) continue;  // not the start of a run
    int64_t end = p + 1;
    while (end < n && keys[end] == row) ++end;
    const int64_t orow = static_cast<int64_t>(row) * h;
    if (vec) {
      for (int64_t c = int64_t{lane} * 8; c < h; c += 32 * 8) {
        T o[8];
        load8<T>(out, orow + c, o);
        for (int64_t q = p; q < end; ++q) {
          const int64_t i = src[q];
          T v[8];
          load8<T>(y, i * h + c, v);
          if (w != nullptr) {
            const T wi = static_cast<T>(w[i]);
#pragma unroll
            for (int k = 0; k < 8; ++k) o[k] = round_as<T>(out_dt, o[k] + wi * v[k]);
          } else {
#pragma unroll
            for (int k = 0; k < 8; ++k) o[k] = round_as<T>(out_dt, o[k] + v[k]);
          }
        }
        store8<T>(out, out_dt, orow + c, o);
      }
    } else {
      for (int64_t c = lane; c < h; c += 32) {
        T o = ld<T>(out, orow + c);
        for (int64_t q = p; q < end; ++q) {
          const int64_t i = src[q];
          const T v = ld<T>(y, i * h + c);
          o = round_as<T>(out_dt, w != nullptr ? o + static_cast<T>(w[i]) * v : o + v);
        }
        put<T>(out, out_dt, orow + c, o);
      }
    }
  }
}

}  // namespace

// moe_utils.permute: tokens.index_select(0, sorted_indices).
void CudaBackend::gather_rows(const DTensor& x, std::span<const int64_t> rows, DTensor& out) {
  static constexpr std::string_view op = "gather_rows";
  check_defined(op, "x", x);
  check_defined(op, "out", out);
  const int64_t h = x.cols(), n = static_cast<int64_t>(rows.size()), xr = x.rows();
  if (out.rows() != n || out.cols() != h) {
    fail(op, text("out {} is not [{}, {}] ({} rows of x {})", out.describe(), n, h, n, x.describe()));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (rows[static_cast<size_t>(i)] < 0 || rows[static_cast<size_t>(i)] >= xr) {
      fail(op, text("row index {} (entry {}) out of range for x {}", rows[static_cast<size_t>(i)], i, x.describe()));
    }
  }
  if (n == 0 || h == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream());
  const std::string ctx = text("{} x {} ({} rows) out {}", op, x.describe(), n, out.describe());
  const size_t index_bytes = static_cast<size_t>(n) * sizeof(int64_t);
  auto* d_rows = static_cast<int64_t*>(workspace(index_bytes));
  PARITRON_CUDA_CHECK(cudaMemcpyAsync(d_rows, rows.data(), index_bytes, cudaMemcpyHostToDevice, s), ctx);
  if (x.dtype() == out.dtype() && x.storage_dtype() == out.storage_dtype()) {  // the bytes
    const int64_t es = static_cast<int64_t>(dtype_size(x.storage_dtype()));
    const int64_t row_bytes = h * es;
    if (row_bytes % 16 == 0 && aligned16(x.data()) && aligned16(out.data())) {
      launch_gather_copy<uint4>(x, d_rows, out, n, row_bytes, s, ctx);
    } else if (es == 8) {
      launch_gather_copy<uint64_t>(x, d_rows, out, n, row_bytes, s, ctx);
    } else if (es == 4) {
      launch_gather_copy<uint32_t>(x, d_rows, out, n, row_bytes, s, ctx);
    } else {
      launch_gather_copy<uint16_t>(x, d_rows, out, n, row_bytes, s, ctx);
    }
    return;
  }
  const int blocks = blocks_for(n * 32, kRowThreads);
  if (is_f64(x) || is_f64(out)) {
    gather_rows_convert_kernel<double><<<blocks, kRowThreads, 0, s>>>(dev(x), d_rows, dev(out), out.dtype(), n, h);
  } else {
    gather_rows_convert_kernel<float><<<blocks, kRowThreads, 0, s>>>(dev(x), d_rows, dev(out), out.dtype(), n, h);
  }
  PARITRON_CUDA_CHECK_LAUNCH("gather_rows_convert_kernel", ctx);
}

// moe_utils.unpermute: output.scatter_add_(0, indices, permuted_tokens * probs).
void CudaBackend::scatter_add_rows(const DTensor& y, std::span<const int64_t> rows, std::span<const float> weights,
                                   DTensor& out) {
  static constexpr std::string_view op = "scatter_add_rows";
  check_defined(op, "y", y);
  check_defined(op, "out", out);
  const int64_t h = y.cols(), n = static_cast<int64_t>(rows.size());
  if (y.rows() != n || out.cols() != h) {
    fail(op, text("y {} must be [{}, h] ({} row indices) and out {} [*, {}]", y.describe(), n, n, out.describe(),
                  h));
  }
  if (!weights.empty() && static_cast<int64_t>(weights.size()) != n) {
    fail(op, text("{} weights for {} rows", weights.size(), n));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (rows[static_cast<size_t>(i)] < 0 || rows[static_cast<size_t>(i)] >= out.rows()) {
      fail(op, text("row index {} (entry {}) out of range for out {}", rows[static_cast<size_t>(i)], i,
                    out.describe()));
    }
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    fail(op, text("{} rows: at most 2^31 - 1 entries (the sort's values are int32)", n));
  }
  if (n == 0 || h == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream());
  const std::string ctx = text("{} y {} ({} rows{}) out {}", op, y.describe(), n,
                               weights.empty() ? std::string_view{} : std::string_view{", weighted"},
                               out.describe());
  // Radix sort on the bits that can differ: row indices are in [0, out.rows()).
  const int end_bit = std::max(1, static_cast<int>(std::bit_width(static_cast<uint64_t>(out.rows() - 1))));
  const int num = static_cast<int>(n);
  size_t sort_bytes = 0;
  PARITRON_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const uint64_t*>(nullptr),
                                                      static_cast<uint64_t*>(nullptr),
                                                      static_cast<const int32_t*>(nullptr),
                                                      static_cast<int32_t*>(nullptr), num, 0, end_bit, s),
                      ctx);
  // One scratch region: keys in / out, values in / out, weights, CUB's temporary storage.
  const size_t key_bytes = align_up(static_cast<size_t>(n) * sizeof(uint64_t), 256);
  const size_t val_bytes = align_up(static_cast<size_t>(n) * sizeof(int32_t), 256);
  const size_t w_bytes = weights.empty() ? 0 : align_up(static_cast<size_t>(n) * sizeof(float), 256);
  auto* ws = static_cast<unsigned char*>(workspace(2 * key_bytes + 2 * val_bytes + w_bytes + sort_bytes));
  auto* keys_in = reinterpret_cast<uint64_t*>(ws);
  auto* keys_out = reinterpret_cast<uint64_t*>(ws + key_bytes);
  auto* vals_in = reinterpret_cast<int32_t*>(ws + 2 * key_bytes);
  auto* vals_out = reinterpret_cast<int32_t*>(ws + 2 * key_bytes + val_bytes);
  float* d_w = weights.empty() ? nullptr : reinterpret_cast<float*>(ws + 2 * key_bytes + 2 * val_bytes);
  void* sort_tmp = ws + 2 * key_bytes + 2 * val_bytes + w_bytes;

  PARITRON_CUDA_CHECK(cudaMemcpyAsync(keys_in, rows.data(), static_cast<size_t>(n) * sizeof(int64_t),
                                      cudaMemcpyHostToDevice, s),
                      ctx);
  if (d_w != nullptr) {
    PARITRON_CUDA_CHECK(cudaMemcpyAsync(d_w, weights.data(), static_cast<size_t>(n) * sizeof(float),
                                        cudaMemcpyHostToDevice, s),
                        ctx);
  }
  iota_kernel<<<blocks_for(n), kThreads, 0, s>>>(vals_in, n);
  PARITRON_CUDA_CHECK_LAUNCH("iota_kernel", ctx);
  // Stable: equal destinations keep ascending i, the CPU backend's order.
  PARITRON_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, static_cast<const uint64_t*>(keys_in),
                                                      keys_out, static_cast<const int32_t*>(vals_in), vals_out, num,
                                                      0, end_bit, s),
                      ctx);
  PARITRON_CUDA_CHECK(cudaGetLastError(), ctx);  // a failed launch inside CUB

  const bool vec = h % 8 == 0 && aligned16(y.data()) && aligned16(out.data());
  const int blocks = blocks_for(n * 32, kRowThreads);
  if (is_f64(y) || is_f64(out)) {
    scatter_add_sorted_kernel<double><<<blocks, kRowThreads, 0, s>>>(dev(y), keys_out, vals_out, d_w, dev(out),
                                                                     out.dtype(), n, h, vec);
  } else {
    scatter_add_sorted_kernel<float><<<blocks, kRowThreads, 0, s>>>(dev(y), keys_out, vals_out, d_w, dev(out),
                                                                    out.dtype(), n, h, vec);
  }
  PARITRON_CUDA_CHECK_LAUNCH("scatter_add_sorted_kernel", ctx);
}

}  // namespace paritron::opt::cuda
