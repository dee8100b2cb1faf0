// Rotary position embedding of the CUDA backend (cuda_backend.h), forward
// and backward (the transpose, rotation by -angle): Megatron's
// apply_rotary_pos_emb / _apply_rotary_pos_emb_bshd
// (megatron/core/models/common/embeddings/rotary_pos_embedding.py, rope_utils.py;
// TE's fused_apply_rotary_pos_emb computes the same), interleaved or
// rotate-half. Semantics: backend.h (RopeArgs), reference/rotary_pos_emb.h.
//
// The CPU backend's rope_impl (optimized/cpu/cpu_backend.cpp) is the model:
// cos_ / sin_ are math::rope_cos / rope_sin of the fp32 angle, rounded to x's
// dtype (cos_.to(t.dtype)); each pair (i, j) is rotated by math::rope_head in
// T; the rotated channels are rounded to y's dtype, the channels >= rot_dim
// pass through (rounded to y's dtype when it differs from x's). y may alias x:
// every pair is read and written by one thread.
//
// Bits: equal to the CPU backend's except where the device's double cos / sin
// (CUDA libm, <= 2 ulp in double) and the host's differ after rounding to
// fp32, i.e. when the double result lies within an ulp or two of an fp32
// rounding boundary (rare: about 2^-28 per angle); see math_device_test.cu.
//
// Layout: grid.x runs over sequence positions, grid.y over slices of a
// position's (batch, head, pair) items; a block first evaluates the rot_dim
// cos / sin of its position into shared memory, then each thread rotates
// pairs, a few at a time with all loads issued before the stores.
#include <cuda_runtime.h>

#include <algorithm>
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
#include "optimized/math/rope.h"

namespace paritron::opt::cuda {

namespace {

// ---------------------------------------------------------------------------
// The kernel.

constexpr int kRopeThreads = 256;
constexpr int kRopeUnroll = 4;                                   // items in flight per thread
constexpr int64_t kRopeItemsPerBlock = kRopeThreads * kRopeUnroll * 4;  // grid.y slices of a position

struct RopeLaunch {
  DevPtr x, y, freqs;
  DType x_dt = DType::F32, y_dt = DType::F32;
  int64_t s = 0;       // sequence positions (rows of freqs)
  int64_t bh = 0;      // batch * heads: head slots per position
  int64_t hn = 0, rot = 0;
  int64_t npass = 0;   // channels >= rot_dim written per head (0 when y is x, same dtype)
  int64_t items_per_block = 0;
  FastDiv div_per;     // n / (rot_dim / 2 + npass)
  bool interleaved = false, backward = false;
};

template <class T>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(RopeLaunch a) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* cs = reinterpret_cast<T*>(smem);  // [rot]: cos_ of this position, rounded to x's dtype
  T* sn = cs + a.rot;                  // [rot]: sin_
  const auto half = static_cast<uint32_t>(a.rot / 2);
  const auto per = static_cast<uint32_t>(half + a.npass);  // items per head: pairs, then pass-through channels
  const int64_t items = a.bh * per;
  const int64_t i0 = int64_t{blockIdx.y} * a.items_per_block;
  const int64_t i1 = items - i0 < a.items_per_block ? items : i0 + a.items_per_block;
  for (int64_t p = blockIdx.x; p < a.s; p += gridDim.x) {  // block-uniform
    __syncthreads();  // the previous position's tables are no longer read
    for (int64_t k = threadIdx.x; k < a.rot; k += blockDim.x) {
      const float angle = static_cast<float>(ld<double>(a.freqs, p * a.rot + k));
      cs[k] = round_as<T>(a.x_dt, static_cast<T>(math::rope_cos(angle)));
      sn[k] = round_as<T>(a.x_dt, static_cast<T>(math::rope_sin(angle)));
    }
    __syncthreads();
    for (int64_t it0 = i0 + threadIdx.x; it0 < i1; it0 += int64_t{blockDim.x} * kRopeUnroll) {
      int64_t head[kRopeUnroll];  // first element of the item's head, -1: no item
      int ci[kRopeUnroll], cj[kRopeUnroll];  // channels of the pair (i, j); cj < 0: pass-through channel ci
      T v[kRopeUnroll][2];
#pragma unroll
      for (int u = 0; u < kRopeUnroll; ++u) {
        const int64_t it = it0 + int64_t{u} * blockDim.x;
        head[u] = -1;
        ci[u] = cj[u] = -1;
        v[u][0] = v[u][1] = T(0);
        if (it >= i1) continue;
        const uint32_t slot = fast_div(a.div_per, static_cast<uint32_t>(it));  // it < 2^31 (checked)
        const auto k = static_cast<uint32_t>(it) - slot * per;
        head[u] = (p * a.bh + slot) * a.hn;  // row p * batch + b, head hd: slot b * heads + hd
        if (k < half) {
          ci[u] = static_cast<int>(a.interleaved ? 2 * k : k);
          cj[u] = static_cast<int>(ci[u] + (a.interleaved ? 1u : half));
          v[u][0] = ld<T>(a.x, head[u] + ci[u]);
          v[u][1] = ld<T>(a.x, head[u] + cj[u]);
        } else {
          ci[u] = static_cast<int>(a.rot + (k - half));
          v[u][0] = ld<T>(a.x, head[u] + ci[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kRopeUnroll; ++u) {
        if (head[u] < 0) continue;
        if (cj[u] < 0) {  // channel >= rot_dim: passes through
          put<T>(a.y, a.y_dt, head[u] + ci[u], v[u][0]);
          continue;
        }
        // The pair as a 2-channel interleaved head: rope_head's formulas with
        // (i, j) = (0, 1) and the tables' entries of channels i and j.
        const T cv[2] = {cs[ci[u]], cs[cj[u]]}, sv[2] = {sn[ci[u]], sn[cj[u]]};
        T yv[2];
        math::rope_head(v[u], yv, cv, sv, int64_t{2}, int64_t{2}, true, a.backward);
        put<T>(a.y, a.y_dt, head[u] + ci[u], yv[0]);
        put<T>(a.y, a.y_dt, head[u] + cj[u], yv[1]);
      }
    }
  }
}

}  // namespace

// apply_rotary_pos_emb (megatron/core/models/common/embeddings/rope_utils.py);
// backward applies the transpose to a gradient.
void CudaBackend::rope(const RopeArgs& args, const DTensor& x, const DTensor& freqs, DTensor& y, bool backward) {
  static constexpr std::string_view op = "rope";
  check_defined(op, "x", x);
  check_defined(op, "y", y);
  check_defined(op, "freqs", freqs);
  if (args.batch <= 0 || args.heads <= 0 || args.head_dim <= 0) {
    fail(op, text("batch {}, heads {}, head_dim {} must be positive", args.batch, args.heads, args.head_dim));
  }
  if (args.rot_dim <= 0 || args.rot_dim % 2 != 0 || args.rot_dim > args.head_dim) {
    fail(op, text("rot_dim {} must be even, positive and <= head_dim {}", args.rot_dim, args.head_dim));
  }
  const int64_t token = args.batch * args.heads * args.head_dim;
  if (x.numel() % token != 0) {
    fail(op, text("x {} is not [s, {}, {}, {}]", x.describe(), args.batch, args.heads, args.head_dim));
  }
  const int64_t s = x.numel() / token;
  check_numel(op, "y", y, x.numel(), text("x's shape [{}, {}, {}, {}]", s, args.batch, args.heads, args.head_dim));
  if (freqs.cols() != args.rot_dim || freqs.numel() != s * args.rot_dim) {
    fail(op, text("freqs {} is not [{}, {}] ([s, rot_dim] for x {})", freqs.describe(), s, args.rot_dim,
                  x.describe()));
  }
  if (s == 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(this->stream());
  const std::string ctx = text("{}{} x {} freqs {} y {}", op, backward ? " (backward)" : "", x.describe(),
                               freqs.describe(), y.describe());
  RopeLaunch a;
  a.x = dev(x);
  a.y = dev(y);
  a.freqs = dev(freqs);
  a.x_dt = x.dtype();
  a.y_dt = y.dtype();
  a.s = s;
  a.bh = args.batch * args.heads;
  a.hn = args.head_dim;
  a.rot = args.rot_dim;
  // The CPU backend copies channels >= rot_dim unless y is x, and rounds
  // them when the dtypes differ.
  const bool pass = x.data() != y.data() || x.dtype() != y.dtype();
  a.npass = pass ? args.head_dim - args.rot_dim : 0;
  a.interleaved = args.interleaved;
  a.backward = backward;
  const int64_t items = a.bh * (args.rot_dim / 2 + a.npass);
  if (items >= (int64_t{1} << 31)) {  // the kernel indexes a position's items in 31 bits
    fail(op, text("x {}: {} (batch, head, channel) items per sequence position, at most 2^31 - 1",
                  x.describe(), items));
  }
  a.div_per = make_fastdiv(static_cast<uint32_t>(args.rot_dim / 2 + a.npass));
  a.items_per_block = std::max<int64_t>(kRopeItemsPerBlock, (items + 65534) / 65535);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(s, int64_t{1} << 20)),
                  static_cast<unsigned>((items + a.items_per_block - 1) / a.items_per_block));
  const bool f64 = is_f64(x) || is_f64(y);
  const size_t smem = 2 * static_cast<size_t>(args.rot_dim) * (f64 ? sizeof(double) : sizeof(float));
  if (f64) {
    if (smem > 48 * 1024) {
      PARITRON_CUDA_CHECK(cudaFuncSetAttribute(rope_kernel<double>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem)),
                          ctx);
    }
    rope_kernel<double><<<grid, kRopeThreads, smem, stream>>>(a);
  } else {
    if (smem > 48 * 1024) {
      PARITRON_CUDA_CHECK(cudaFuncSetAttribute(rope_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem)),
                          ctx);
    }
    rope_kernel<float><<<grid, kRopeThreads, smem, stream>>>(a);
  }
  PARITRON_CUDA_CHECK_LAUNCH("rope_kernel", ctx);
}

}  // namespace paritron::opt::cuda
