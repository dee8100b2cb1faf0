// Fused LayerNorm / RMSNorm of the CUDA backend (cuda_backend.h): the
// kernels behind Megatron's norm modules, megatron/core/fusions/
// fused_layer_norm.py (FusedLayerNorm: Apex's fused layer norm, 1 + w rounded
// to w's dtype under zero_centered_gamma) and TENorm
// (megatron/core/extensions/transformer_engine.py: TE LayerNorm / RMSNorm,
// 1 + w kept in fp32). Semantics: backend.h (NormArgs), reference/norm.h.
//
// The CPU backend (optimized/cpu/cpu_backend.cpp, norm_forward_impl /
// norm_backward_impl) is the model, with the row math of optimized/math/norm.h:
//   * Row statistics and the backward's two row sums are math::norm_detail::
//     lane_sum: 8 partial sums in double, partial l taking elements l, l + 8,
//     l + 16, ... in index order, then the fixed tree ((a0 + a4) + (a1 + a5))
//     + ((a2 + a6) + (a3 + a7)). Here 8 threads of a warp run exactly those
//     8 chains over a row and lane_tree combines them with the same tree, so
//     mean, rstd, y and dx are the CPU backend's bits (same T arithmetic,
//     no contraction: device code is built with --fmad=false).
//   * y per element is math::norm_row_forward; dx per element is
//     norm_row_backward's formula, written out per element (the row sums
//     above are its lane_sums).
//   * dgamma / dbeta: per-column sums of fp32 (T) products in double, like
//     the CPU backend's column_partials, then rounded to gamma's dtype and
//     added to the fp32 main grad (accumulate_into). The order of the double
//     additions differs from the CPU backend's (whose order depends on its
//     OpenMP thread count): fixed row slices of a separate kernel, summed in
//     slice order by a second one; deterministic run to run and across GPUs,
//     no atomics. Both sums usually are exact (fp32 products summed in
//     double), so the rounded results almost always agree with the CPU's bit
//     for bit, but that is not guaranteed.
//
// Layout: a block of 256 threads takes tiles of R consecutive rows (R <= 32,
// as many as fit ~46 KiB of shared memory), stages them in shared memory in
// their storage dtype (16-byte cp.async), runs the chains (8 threads a row:
// the chains are serial, so throughput comes from many rows in flight), then
// every thread writes outputs (16-byte vector stores when aligned). A row too
// long for shared memory even alone is read from global memory instead
// (same values, slower).
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
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
#include "optimized/math/norm.h"

namespace paritron::opt::cuda {

namespace {

// ---------------------------------------------------------------------------
// Device helpers: scratch parameters and shared-memory staging (storage access,
// FastDiv and lane_tree: device.cuh).

// A T array of the scratch space as a DevPtr (for load8).
template <class T>
__device__ __forceinline__ DevPtr param_ptr(const T* p) {
  return DevPtr{const_cast<T*>(p), sizeof(T) == 8 ? DType::F64 : DType::F32};
}

// Starts copying `bytes` from global src to shared dst with the whole block,
// in units of `unit` bytes: 16 is cp.async (both addresses 16-byte aligned,
// bytes a multiple of 16), 8 / 4 / 2 plain copies. stage_wait() and a
// __syncthreads() make the copy visible.
__device__ __forceinline__ void stage_issue(unsigned char* dst, const unsigned char* src, int64_t bytes, int unit) {
  const int64_t step = int64_t{blockDim.x} * unit;
  switch (unit) {
    case 16:
      for (int64_t o = int64_t{threadIdx.x} * 16; o < bytes; o += step) __pipeline_memcpy_async(dst + o, src + o, 16);
      break;
    case 8:
      for (int64_t o = int64_t{threadIdx.x} * 8; o < bytes; o += step) {
        *reinterpret_cast<uint64_t*>(dst + o) = *reinterpret_cast<const uint64_t*>(src + o);
      }
      break;
    case 4:
      for (int64_t o = int64_t{threadIdx.x} * 4; o < bytes; o += step) {
        *reinterpret_cast<uint32_t*>(dst + o) = *reinterpret_cast<const uint32_t*>(src + o);
      }
      break;
    default:
      for (int64_t o = int64_t{threadIdx.x} * 2; o < bytes; o += step) {
        *reinterpret_cast<uint16_t*>(dst + o) = *reinterpret_cast<const uint16_t*>(src + o);
      }
      break;
  }
}

__device__ __forceinline__ void stage_wait() {
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

constexpr int kNormThreads = 256;
constexpr int kChainLanes = 8;                               // math::norm_detail::kLanes
constexpr int kMaxTileRows = kNormThreads / kChainLanes;     // 8 threads per row run its chains
constexpr int kChainBatch = 8;                               // loads issued ahead of a chain's adds
static_assert(kChainLanes == math::norm_detail::kLanes);

// ---------------------------------------------------------------------------
// gamma as the kernels multiply by it (the CPU backend's effective_gamma): w,
// or 1 + w computed in double from w as T and then rounded to gamma's dtype
// (Apex) or to fp32 (TE; kept in double for an f64 gamma). beta as T.

template <class T>
__global__ void norm_params_kernel(DevPtr gamma, DType gamma_dt, bool gamma_f64, DevPtr beta, int64_t h,
                                   bool zero_centered, bool te, T* g_out, T* b_out) {
  PARITRON_GRID_LOOP(c, h) {
    T w = ld<T>(gamma, c);
    if (zero_centered) {
      const double plus = static_cast<double>(w) + 1.0;
      w = static_cast<T>(te ? (gamma_f64 ? plus : static_cast<double>(static_cast<float>(plus)))
                            : round_as<double>(gamma_dt, plus));
    }
    g_out[c] = w;
    if (b_out != nullptr) b_out[c] = ld<T>(beta, c);
  }
}

// ---------------------------------------------------------------------------
// Forward.

template <class T>
struct NormForward {
  DevPtr x, y, mean, rstd;  // mean.p null: not written (RMSNorm without mean)
  DType y_dt = DType::F32;
  const T* gamma = nullptr;  // effective gamma [h]
  const T* beta = nullptr;   // [h], or null
  int64_t rows = 0, h = 0, x_es = 0;
  double eps = 0;
  FastDiv div_h;  // n / h
  int tile_rows = 1;
  int stage_unit = 0;  // 0: chains read x from global memory
  bool rms = false;
  bool vec = false;  // 8-element vector path (h % 8 == 0, x and y 16-byte aligned)
};

template <class T>
__global__ void __launch_bounds__(kNormThreads) norm_forward_kernel(NormForward<T> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ T s_mean[kMaxTileRows], s_rstd[kMaxTileRows];
  const int64_t h = a.h;
  const double inv_h = 1.0 / static_cast<double>(h);
  const int R = a.tile_rows;
  const int chain_warps = (kChainLanes * R + 31) / 32;
  const int warp = static_cast<int>(threadIdx.x >> 5);
  for (int64_t base = int64_t{blockIdx.x} * R; base < a.rows; base += int64_t{gridDim.x} * R) {  // block-uniform
    const int nr = static_cast<int>(a.rows - base < R ? a.rows - base : R);
    const auto* xg = static_cast<const unsigned char*>(a.x.p) + base * h * a.x_es;
    DevPtr xt{const_cast<unsigned char*>(xg), a.x.dt};  // this tile of x: staged or in place
    if (a.stage_unit != 0) {
      stage_issue(smem, xg, nr * h * a.x_es, a.stage_unit);
      stage_wait();
      xt.p = smem;
      __syncthreads();
    }

    // Statistics (math::norm_row_stats): thread 8 rr + l runs chain l of row rr.
    if (warp < chain_warps) {  // whole warps: lane_tree shuffles over all 32 lanes
      const int rr = static_cast<int>(threadIdx.x) / kChainLanes;
      const int l = static_cast<int>(threadIdx.x) % kChainLanes;
      const bool live = rr < nr;
      const int64_t off = int64_t{rr} * h;
      double mean = 0.0;
      if (!a.rms) {
        double acc = 0.0;
        if (live) {
          for (int64_t c0 = l; c0 < h; c0 += kChainLanes * kChainBatch) {
            T v[kChainBatch];
#pragma unroll
            for (int k = 0; k < kChainBatch; ++k) {
              const int64_t c = c0 + int64_t{k} * kChainLanes;
              v[k] = c < h ? ld<T>(xt, off + c) : T(0);
            }
#pragma unroll
            for (int k = 0; k < kChainBatch; ++k) {
              if (c0 + int64_t{k} * kChainLanes < h) acc += static_cast<double>(v[k]);
            }
          }
        }
        mean = lane_tree(acc) * inv_h;
      }
      double acc = 0.0;
      if (live) {
        for (int64_t c0 = l; c0 < h; c0 += kChainLanes * kChainBatch) {
          T v[kChainBatch];
#pragma unroll
          for (int k = 0; k < kChainBatch; ++k) {
            const int64_t c = c0 + int64_t{k} * kChainLanes;
            v[k] = c < h ? ld<T>(xt, off + c) : T(0);
          }
#pragma unroll
          for (int k = 0; k < kChainBatch; ++k) {
            if (c0 + int64_t{k} * kChainLanes < h) {
              const double d = static_cast<double>(v[k]) - mean;
              acc += d * d;
            }
          }
        }
      }
      const double ss = lane_tree(acc);
      if (live && l == 0) {
        const T mu = static_cast<T>(mean);
        const T rs = static_cast<T>(1.0 / sqrt(ss * inv_h + a.eps));
        s_mean[rr] = mu;
        s_rstd[rr] = rs;
        if (a.mean.p != nullptr) st<T>(a.mean, base + rr, mu);
        st<T>(a.rstd, base + rr, rs);
      }
    }
    __syncthreads();

    // y = ((x - mean) * rstd) * gamma (+ beta): math::norm_row_forward per element.
    const int64_t n = int64_t{nr} * h, y0 = base * h;
    if (a.vec) {
      for (int64_t e = int64_t{threadIdx.x} * 8; e < n; e += int64_t{blockDim.x} * 8) {
        const int rr = static_cast<int>(fast_div(a.div_h, static_cast<uint32_t>(e)));  // e < 32 h < 2^31
        const int64_t c = e - int64_t{rr} * h;
        T xv[8], g[8], b[8] = {}, yv[8];
        load8<T>(xt, e, xv);
        load8<T>(param_ptr(a.gamma), c, g);
        if (a.beta != nullptr) load8<T>(param_ptr(a.beta), c, b);
        const T mu = s_mean[rr], rs = s_rstd[rr];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          math::norm_row_forward(&xv[k], int64_t{1}, mu, rs, &g[k], a.beta != nullptr ? &b[k] : nullptr, &yv[k]);
        }
        store8<T>(a.y, a.y_dt, y0 + e, yv);
      }
    } else {
      for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
        const int rr = static_cast<int>(fast_div(a.div_h, static_cast<uint32_t>(e)));  // e < 32 h < 2^31
        const int64_t c = e - int64_t{rr} * h;
        const T xv = ld<T>(xt, e), g = a.gamma[c], b = a.beta != nullptr ? a.beta[c] : T(0);
        T yv;
        math::norm_row_forward(&xv, int64_t{1}, s_mean[rr], s_rstd[rr], &g, a.beta != nullptr ? &b : nullptr, &yv);
        put<T>(a.y, a.y_dt, y0 + e, yv);
      }
    }
    __syncthreads();  // the next tile overwrites the staged rows and the statistics
  }
}

// ---------------------------------------------------------------------------
// Backward: dx (kernel 1), then dgamma / dbeta (kernels 2 and 3).

template <class T>
struct NormBackward {
  DevPtr x, dy, dx, mean, rstd;
  DType dx_dt = DType::F32;
  const T* gamma = nullptr;  // effective gamma [h]
  int64_t rows = 0, h = 0, x_es = 0, dy_es = 0;
  int64_t dy_smem = 0;  // byte offset of the staged dy tile in shared memory
  FastDiv div_h;         // n / h
  int tile_rows = 1;
  int stage_x = 0, stage_dy = 0;  // copy units; both 0: not staged
  bool rms = false;
  bool vec = false;  // 8-element vector path (h % 8 == 0, x, dy, dx 16-byte aligned)
};

template <class T>
__global__ void __launch_bounds__(kNormThreads) norm_backward_kernel(NormBackward<T> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ T s_m[kMaxTileRows], s_rs[kMaxTileRows], s_mg[kMaxTileRows], s_mgx[kMaxTileRows];
  const int64_t h = a.h;
  const double inv_h = 1.0 / static_cast<double>(h);
  const int R = a.tile_rows;
  const int chain_warps = (kChainLanes * R + 31) / 32;
  const int warp = static_cast<int>(threadIdx.x >> 5);
  for (int64_t base = int64_t{blockIdx.x} * R; base < a.rows; base += int64_t{gridDim.x} * R) {  // block-uniform
    const int nr = static_cast<int>(a.rows - base < R ? a.rows - base : R);
    const auto* xg = static_cast<const unsigned char*>(a.x.p) + base * h * a.x_es;
    const auto* dyg = static_cast<const unsigned char*>(a.dy.p) + base * h * a.dy_es;
    DevPtr xt{const_cast<unsigned char*>(xg), a.x.dt};
    DevPtr dyt{const_cast<unsigned char*>(dyg), a.dy.dt};
    if (a.stage_x != 0) {
      stage_issue(smem, xg, nr * h * a.x_es, a.stage_x);
      stage_issue(smem + a.dy_smem, dyg, nr * h * a.dy_es, a.stage_dy);
      stage_wait();
      xt.p = smem;
      dyt.p = smem + a.dy_smem;
      __syncthreads();
    }

    // The row sums of math::norm_row_backward: sum_g = sum (dy gamma),
    // sum_gx = sum (dy gamma) xhat, both lane_sums (chain l of row rr in
    // thread 8 rr + l).
    if (warp < chain_warps) {
      const int rr = static_cast<int>(threadIdx.x) / kChainLanes;
      const int l = static_cast<int>(threadIdx.x) % kChainLanes;
      const bool live = rr < nr;
      const int64_t off = int64_t{rr} * h;
      T m = T(0), rs = T(0);
      if (live) {
        m = a.rms ? T(0) : ld<T>(a.mean, base + rr);
        rs = ld<T>(a.rstd, base + rr);
      }
      double acc_g = 0.0, acc_gx = 0.0;
      if (live) {
        for (int64_t c0 = l; c0 < h; c0 += kChainLanes * kChainBatch) {
          T xv[kChainBatch], dv[kChainBatch], gv[kChainBatch];
#pragma unroll
          for (int k = 0; k < kChainBatch; ++k) {
            const int64_t c = c0 + int64_t{k} * kChainLanes;
            const bool in = c < h;
            xv[k] = in ? ld<T>(xt, off + c) : T(0);
            dv[k] = in ? ld<T>(dyt, off + c) : T(0);
            gv[k] = in ? a.gamma[c] : T(0);
          }
#pragma unroll
          for (int k = 0; k < kChainBatch; ++k) {
            if (c0 + int64_t{k} * kChainLanes < h) {
              const T dg = dv[k] * gv[k];
              if (!a.rms) acc_g += static_cast<double>(dg);
              const T xhat = (xv[k] - m) * rs;
              acc_gx += static_cast<double>(dg * xhat);
            }
          }
        }
      }
      const double sum_g = a.rms ? 0.0 : lane_tree(acc_g);
      const double sum_gx = lane_tree(acc_gx);
      if (live && l == 0) {
        s_m[rr] = m;
        s_rs[rr] = rs;
        s_mg[rr] = static_cast<T>(sum_g * inv_h);
        s_mgx[rr] = static_cast<T>(sum_gx * inv_h);
      }
    }
    __syncthreads();

    // dx = rstd ((g - mean_g) - xhat mean_gx), g = dy gamma (norm_row_backward).
    const int64_t n = int64_t{nr} * h, y0 = base * h;
    if (a.vec) {
      for (int64_t e = int64_t{threadIdx.x} * 8; e < n; e += int64_t{blockDim.x} * 8) {
        const int rr = static_cast<int>(fast_div(a.div_h, static_cast<uint32_t>(e)));  // e < 32 h < 2^31
        const int64_t c = e - int64_t{rr} * h;
        T xv[8], dv[8], gv[8], o[8];
        load8<T>(xt, e, xv);
        load8<T>(dyt, e, dv);
        load8<T>(param_ptr(a.gamma), c, gv);
        const T m = s_m[rr], rs = s_rs[rr], mean_g = s_mg[rr], mean_gx = s_mgx[rr];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const T xhat = (xv[k] - m) * rs;
          const T g = dv[k] * gv[k];
          o[k] = rs * ((g - mean_g) - xhat * mean_gx);
        }
        store8<T>(a.dx, a.dx_dt, y0 + e, o);
      }
    } else {
      for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
        const int rr = static_cast<int>(fast_div(a.div_h, static_cast<uint32_t>(e)));  // e < 32 h < 2^31
        const int64_t c = e - int64_t{rr} * h;
        const T rs = s_rs[rr];
        const T xhat = (ld<T>(xt, e) - s_m[rr]) * rs;
        const T g = ld<T>(dyt, e) * a.gamma[c];
        put<T>(a.dx, a.dx_dt, y0 + e, rs * ((g - s_mg[rr]) - xhat * s_mgx[rr]));
      }
    }
    __syncthreads();
  }
}

// dgamma / dbeta column partials: block (column tile, row slice) sums, per
// column, (double)(dy xhat) and (double)dy over its rows: thread (ty, tx)
// takes rows slice_begin + ty, + 8, ... in order, then the 8 sums are added
// in ty order into part[slice][c]. The order is fixed by the shapes alone
// (not by the GPU, nor by V: a thread takes V = 8 adjacent columns with
// 16-byte loads when aligned, else 1), so the result is deterministic
// everywhere. xhat = (x - mean) rstd in T, as norm_row_backward forms it.
constexpr int kPartCols = 32, kPartRowLanes = kNormThreads / kPartCols;

template <class T, int V>
__global__ void __launch_bounds__(kNormThreads, 3)  // 3 blocks per SM: no spills in fp32
    norm_dgamma_partial_kernel(DevPtr x, DevPtr dy, DevPtr mean, DevPtr rstd, int64_t rows, int64_t h,
                               int64_t slice_rows, bool rms, bool with_beta, double* part_g, double* part_b) {
  __shared__ double s_g[kPartRowLanes][kPartCols * V], s_b[kPartRowLanes][kPartCols * V];
  const int tx = static_cast<int>(threadIdx.x) % kPartCols, ty = static_cast<int>(threadIdx.x) / kPartCols;
  const int64_t tile0 = int64_t{blockIdx.x} * kPartCols * V;  // first column of the block
  const int64_t c0 = tile0 + int64_t{tx} * V;                   // V == 8: h % 8 == 0, so c0 < h covers all 8
  const int64_t r0 = int64_t{blockIdx.y} * slice_rows;
  const int64_t r1 = rows - r0 < slice_rows ? rows : r0 + slice_rows;
  double sg[V], sb[V];
#pragma unroll
  for (int k = 0; k < V; ++k) sg[k] = sb[k] = 0.0;
  if (c0 < h) {
#pragma unroll(V == 1 ? 2 : 1)
    for (int64_t r = r0 + ty; r < r1; r += kPartRowLanes) {
      const T m = rms ? T(0) : ld<T>(mean, r);
      const T rs = ld<T>(rstd, r);
      T xv[8], dv[8];
      if constexpr (V == 8) {
        load8<T>(x, r * h + c0, xv);
        load8<T>(dy, r * h + c0, dv);
      } else {
        xv[0] = ld<T>(x, r * h + c0);
        dv[0] = ld<T>(dy, r * h + c0);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const T xhat = (xv[k] - m) * rs;
        sg[k] += static_cast<double>(dv[k] * xhat);
        if (with_beta) sb[k] += static_cast<double>(dv[k]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s_g[ty][tx * V + k] = sg[k];
    s_b[ty][tx * V + k] = sb[k];
  }
  __syncthreads();
  for (int j = static_cast<int>(threadIdx.x); j < kPartCols * V; j += static_cast<int>(blockDim.x)) {
    const int64_t c = tile0 + j;
    if (c >= h) continue;
    double tg = s_g[0][j], tb = s_b[0][j];
    for (int k = 1; k < kPartRowLanes; ++k) {
      tg += s_g[k][j];
      tb += s_b[k][j];
    }
    part_g[int64_t{blockIdx.y} * h + c] = tg;
    if (with_beta) part_b[int64_t{blockIdx.y} * h + c] = tb;
  }
}

// dgamma[c] = dgamma[c] + round(sum of the slices' partials, gamma's dtype),
// rounded to dgamma's dtype (the CPU backend's accumulate_into); likewise
// dbeta when part_b is not null.
__global__ void norm_dgamma_finalize_kernel(const double* part_g, const double* part_b, int64_t slices, int64_t h,
                                            DType contribution_dt, DevPtr dgamma, DType dgamma_dt, DevPtr dbeta,
                                            DType dbeta_dt) {
  PARITRON_GRID_LOOP(c, h) {
    double sg = 0.0, sb = 0.0;
    for (int64_t p = 0; p < slices; ++p) {
      sg += part_g[p * h + c];
      if (part_b != nullptr) sb += part_b[p * h + c];
    }
    const double g = round_as<double>(contribution_dt, sg);
    st<double>(dgamma, c, round_as<double>(dgamma_dt, ld<double>(dgamma, c) + g));
    if (part_b != nullptr) {
      const double b = round_as<double>(contribution_dt, sb);
      st<double>(dbeta, c, round_as<double>(dbeta_dt, ld<double>(dbeta, c) + b));
    }
  }
}

// ---------------------------------------------------------------------------
// Launch shapes.

// A tile (<= 32 rows) is indexed with 32-bit fast division.
constexpr int64_t kMaxFeatures = (int64_t{1} << 31) / kMaxTileRows - 1;

constexpr int64_t kStageBudget = 46 * 1024;  // dynamic shared memory per block by default (static < 2 KiB)

struct NormLaunch {
  int tile_rows = 1;
  bool staged = false;
  size_t smem = 0;
  int grid = 1;
};

// Staged bytes of r rows of the tensors with element sizes es (each region
// 16-byte aligned).
int64_t staged_bytes(int64_t r, int64_t h, std::initializer_list<int64_t> es) {
  int64_t total = 0;
  for (int64_t e : es) total = static_cast<int64_t>(align_up(static_cast<size_t>(total), 16)) + r * h * e;
  return total;
}

NormLaunch norm_launch(const CudaBackend& be, int64_t rows, int64_t h, std::initializer_list<int64_t> es,
                       const std::string& ctx) {
  int sms = 0, optin = 0;
  PARITRON_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, be.device()), ctx);
  PARITRON_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, be.device()), ctx);
  // Rows per tile: as many as fit the budget, up to 32, but no more than
  // spreads the rows over every SM twice (rows in flight hide the chains).
  int64_t r = std::min<int64_t>(kMaxTileRows, std::max<int64_t>(1, rows / (2 * std::max(sms, 1))));
  while (r > 1 && staged_bytes(r, h, es) > kStageBudget) --r;
  NormLaunch l;
  l.tile_rows = static_cast<int>(r);
  const int64_t bytes = staged_bytes(r, h, es);
  if (bytes <= std::max<int64_t>(kStageBudget, optin - 2048)) {  // above the default: opt in
    l.staged = true;
    l.smem = static_cast<size_t>(bytes);
  }
  const int64_t tiles = (rows + r - 1) / r;
  l.grid = static_cast<int>(std::min<int64_t>(tiles, int64_t{1} << 20));
  return l;
}

// Copy unit for staging a tensor's tiles: 16-byte cp.async when every tile
// starts 16-byte aligned and is a multiple of 16 bytes, else the element size.
int stage_unit(const DTensor& t, int64_t h) {
  const int64_t es = static_cast<int64_t>(dtype_size(t.storage_dtype()));
  return aligned16(t.data()) && (h * es) % 16 == 0 ? 16 : static_cast<int>(es);
}

template <class T>
void set_smem(void (*kernel)(T), size_t smem, const std::string& ctx) {
  PARITRON_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                      ctx);
}

template <class T>
void norm_forward_run(CudaBackend& be, const NormArgs& args, const DTensor& x, const DTensor& gamma,
                      const DTensor* beta, DTensor& y, DTensor& mean, DTensor& rstd, const std::string& ctx) {
  const int64_t rows = x.rows(), h = x.cols();
  if (rows == 0) return;
  const cudaStream_t s = stream_of(be);
  const bool with_beta = beta != nullptr && !args.rms;
  const size_t pbytes = align_up(static_cast<size_t>(h) * sizeof(T), 256);
  auto* ws = static_cast<unsigned char*>(be.workspace(2 * pbytes));
  T* g = reinterpret_cast<T*>(ws);
  T* b = with_beta ? reinterpret_cast<T*>(ws + pbytes) : nullptr;
  const bool gamma_f64 = gamma.storage_dtype() == DType::F64 && gamma.dtype() == DType::F64;
  norm_params_kernel<T><<<blocks_for(h), kThreads, 0, s>>>(dev(gamma), gamma.dtype(), gamma_f64,
                                                           with_beta ? dev(*beta) : DevPtr{}, h,
                                                           args.zero_centered_gamma, args.te_kernel, g, b);
  PARITRON_CUDA_CHECK_LAUNCH("norm_params_kernel", ctx);

  const int64_t x_es = static_cast<int64_t>(dtype_size(x.storage_dtype()));
  const NormLaunch l = norm_launch(be, rows, h, {x_es}, ctx);
  NormForward<T> a;
  a.x = dev(x);
  a.y = dev(y);
  a.mean = mean.defined() ? dev(mean) : DevPtr{};
  a.rstd = dev(rstd);
  a.y_dt = y.dtype();
  a.gamma = g;
  a.beta = b;
  a.rows = rows;
  a.h = h;
  a.x_es = x_es;
  a.eps = args.eps;
  a.div_h = make_fastdiv(static_cast<uint32_t>(h));
  a.tile_rows = l.tile_rows;
  a.stage_unit = l.staged ? stage_unit(x, h) : 0;
  a.rms = args.rms;
  a.vec = h % 8 == 0 && aligned16(y.data()) && aligned16(x.data());
  if (l.staged) set_smem(norm_forward_kernel<T>, l.smem, ctx);
  norm_forward_kernel<T><<<l.grid, kNormThreads, l.smem, s>>>(a);
  PARITRON_CUDA_CHECK_LAUNCH("norm_forward_kernel", ctx);
}

template <class T>
void norm_backward_run(CudaBackend& be, const NormArgs& args, const DTensor& x, const DTensor& gamma,
                       const DTensor& mean, const DTensor& rstd, const DTensor& dy, DTensor& dx, DTensor& dgamma,
                       DTensor* dbeta, const std::string& ctx) {
  const int64_t rows = x.rows(), h = x.cols();
  const cudaStream_t s = stream_of(be);
  const bool with_beta = dbeta != nullptr && !args.rms;
  // Row slices of the dgamma partials: at least 64 rows, at most 128 slices.
  const int64_t slice_rows = (std::max<int64_t>(64, (rows + 127) / 128) + 7) / 8 * 8;
  const int64_t slices = (rows + slice_rows - 1) / slice_rows;
  const size_t gbytes = align_up(static_cast<size_t>(h) * sizeof(T), 256);
  const size_t part_bytes = align_up(static_cast<size_t>(slices * h) * sizeof(double), 256);
  auto* ws = static_cast<unsigned char*>(be.workspace(gbytes + (with_beta ? 2 : 1) * part_bytes));
  T* g = reinterpret_cast<T*>(ws);
  auto* part_g = reinterpret_cast<double*>(ws + gbytes);
  auto* part_b = with_beta ? reinterpret_cast<double*>(ws + gbytes + part_bytes) : nullptr;
  const bool gamma_f64 = gamma.storage_dtype() == DType::F64 && gamma.dtype() == DType::F64;
  norm_params_kernel<T><<<blocks_for(h), kThreads, 0, s>>>(dev(gamma), gamma.dtype(), gamma_f64, DevPtr{}, h,
                                                           args.zero_centered_gamma, args.te_kernel, g, nullptr);
  PARITRON_CUDA_CHECK_LAUNCH("norm_params_kernel", ctx);

  if (rows > 0) {
    // The partials first: dx may alias dy (or x), as on the CPU backend.
    const DevPtr mean_ptr = args.rms ? DevPtr{} : dev(mean);
    if (h % 8 == 0 && aligned16(x.data()) && aligned16(dy.data())) {
      const dim3 grid(static_cast<unsigned>((h + kPartCols * 8 - 1) / (kPartCols * 8)), static_cast<unsigned>(slices));
      norm_dgamma_partial_kernel<T, 8><<<grid, kNormThreads, 0, s>>>(dev(x), dev(dy), mean_ptr, dev(rstd), rows, h,
                                                                     slice_rows, args.rms, with_beta, part_g, part_b);
    } else {
      const dim3 grid(static_cast<unsigned>((h + kPartCols - 1) / kPartCols), static_cast<unsigned>(slices));
      norm_dgamma_partial_kernel<T, 1><<<grid, kNormThreads, 0, s>>>(dev(x), dev(dy), mean_ptr, dev(rstd), rows, h,
                                                                     slice_rows, args.rms, with_beta, part_g, part_b);
    }
    PARITRON_CUDA_CHECK_LAUNCH("norm_dgamma_partial_kernel", ctx);

    const int64_t x_es = static_cast<int64_t>(dtype_size(x.storage_dtype()));
    const int64_t dy_es = static_cast<int64_t>(dtype_size(dy.storage_dtype()));
    const NormLaunch l = norm_launch(be, rows, h, {x_es, dy_es}, ctx);
    NormBackward<T> a;
    a.x = dev(x);
    a.dy = dev(dy);
    a.dx = dev(dx);
    a.mean = mean_ptr;
    a.rstd = dev(rstd);
    a.dx_dt = dx.dtype();
    a.gamma = g;
    a.rows = rows;
    a.h = h;
    a.x_es = x_es;
    a.dy_es = dy_es;
    a.dy_smem = static_cast<int64_t>(align_up(static_cast<size_t>(l.tile_rows * h * x_es), 16));
    a.div_h = make_fastdiv(static_cast<uint32_t>(h));
    a.tile_rows = l.tile_rows;
    a.stage_x = l.staged ? stage_unit(x, h) : 0;
    a.stage_dy = l.staged ? stage_unit(dy, h) : 0;
    a.rms = args.rms;
    a.vec = h % 8 == 0 && aligned16(x.data()) && aligned16(dy.data()) && aligned16(dx.data());
    if (l.staged) set_smem(norm_backward_kernel<T>, l.smem, ctx);
    norm_backward_kernel<T><<<l.grid, kNormThreads, l.smem, s>>>(a);
    PARITRON_CUDA_CHECK_LAUNCH("norm_backward_kernel", ctx);
  }
  // rows == 0: no slices, dgamma += round(0), as the CPU backend does.
  norm_dgamma_finalize_kernel<<<blocks_for(h), kThreads, 0, s>>>(
      part_g, part_b, slices, h, gamma.dtype(), dev(dgamma), dgamma.dtype(),
      with_beta ? dev(*dbeta) : DevPtr{}, with_beta ? dbeta->dtype() : DType::F32);
  PARITRON_CUDA_CHECK_LAUNCH("norm_dgamma_finalize_kernel", ctx);
}

}  // namespace

// FusedLayerNorm / TENorm forward (megatron/core/fusions/fused_layer_norm.py,
// megatron/core/extensions/transformer_engine.py): y, mean, rstd.
void CudaBackend::norm_forward(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor* beta,
                               DTensor& y, DTensor& mean, DTensor& rstd) {
  static constexpr std::string_view op = "norm_forward";
  check_defined(op, "x", x);
  check_defined(op, "y", y);
  check_defined(op, "gamma", gamma);
  check_defined(op, "rstd", rstd);
  const int64_t rows = x.rows(), h = x.cols();
  if (h <= 0) fail(op, text("x {} has no features", x.describe()));
  if (h > kMaxFeatures) fail(op, text("x {} has more than {} features", x.describe(), kMaxFeatures));
  const std::string xs = text("[{}, {}]", rows, h);
  check_numel(op, "y", y, x.numel(), text("x's shape {}", xs));
  check_numel(op, "gamma", gamma, h, text("[{}]", h));
  if (beta != nullptr && !args.rms) {
    check_defined(op, "beta", *beta);
    check_numel(op, "beta", *beta, h, text("[{}]", h));
  }
  check_numel(op, "rstd", rstd, rows, text("[{}] (one per row of x {})", rows, xs));
  if (!args.rms || mean.defined()) {
    check_defined(op, "mean", mean);
    check_numel(op, "mean", mean, rows, text("[{}] (one per row of x {})", rows, xs));
  }
  const std::string ctx = context(op, {{"x", &x}, {"gamma", &gamma}, {"beta", args.rms ? nullptr : beta},
                                       {"y", &y}, {"mean", mean.defined() ? &mean : nullptr}, {"rstd", &rstd}});
  if (is_f64(x) || is_f64(y)) {
    norm_forward_run<double>(*this, args, x, gamma, beta, y, mean, rstd, ctx);
  } else {
    norm_forward_run<float>(*this, args, x, gamma, beta, y, mean, rstd, ctx);
  }
}

// Their backward: dx overwritten, dgamma / dbeta accumulated into the fp32
// main grads (gradient_accumulation_fusion).
void CudaBackend::norm_backward(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor& mean,
                                const DTensor& rstd, const DTensor& dy, DTensor& dx, DTensor& dgamma,
                                DTensor* dbeta) {
  static constexpr std::string_view op = "norm_backward";
  check_defined(op, "x", x);
  check_defined(op, "dy", dy);
  check_defined(op, "dx", dx);
  check_defined(op, "gamma", gamma);
  check_defined(op, "rstd", rstd);
  check_defined(op, "dgamma", dgamma);
  const int64_t rows = x.rows(), h = x.cols();
  if (h <= 0) fail(op, text("x {} has no features", x.describe()));
  if (h > kMaxFeatures) fail(op, text("x {} has more than {} features", x.describe(), kMaxFeatures));
  const std::string xs = text("x's shape [{}, {}]", rows, h);
  check_numel(op, "dy", dy, x.numel(), xs);
  check_numel(op, "dx", dx, x.numel(), xs);
  check_numel(op, "gamma", gamma, h, text("[{}]", h));
  check_numel(op, "dgamma", dgamma, h, text("[{}]", h));
  check_numel(op, "rstd", rstd, rows, text("[{}]", rows));
  if (!args.rms) {
    check_defined(op, "mean", mean);
    check_numel(op, "mean", mean, rows, text("[{}]", rows));
    if (dbeta != nullptr) {
      check_defined(op, "dbeta", *dbeta);
      check_numel(op, "dbeta", *dbeta, h, text("[{}]", h));
    }
  }
  const std::string ctx =
      context(op, {{"x", &x}, {"gamma", &gamma}, {"mean", args.rms ? nullptr : &mean}, {"rstd", &rstd},
                   {"dy", &dy}, {"dx", &dx}, {"dgamma", &dgamma}, {"dbeta", args.rms ? nullptr : dbeta}});
  if (is_f64(x) || is_f64(dy) || is_f64(dx)) {
    norm_backward_run<double>(*this, args, x, gamma, mean, rstd, dy, dx, dgamma, dbeta, ctx);
  } else {
    norm_backward_run<float>(*this, args, x, gamma, mean, rstd, dy, dx, dgamma, dbeta, ctx);
  }
}

}  // namespace paritron::opt::cuda
