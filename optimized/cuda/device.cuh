// Device-side helpers shared by the kernels of optimized/cuda/ (included by
// .cu files only).
//
// Storage access: a tensor reaches a kernel as a DevPtr (address + storage
// dtype). ld<T>/st<T> read and write element i in the compute type T (float,
// or double for F64 runs), converting from/to the storage dtype. The branch on
// the dtype is uniform across a launch, so it costs a few instructions and no
// divergence, and one kernel instantiation serves every dtype mix (mixed
// dtypes are real: bf16 activations with fp32 main grads, fp32 lse/rstd).
// Stores round once, RNE, with the single-source conversions of
// common/math/float_format.h and optimized/math/rounding.h, so a value the
// CPU backend rounds with the same functions gets the same bits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/dtype.h"
#include "common/math/float_format.h"
#include "optimized/cuda/cuda_check.h"
#include "optimized/math/rounding.h"
#include "optimized/tensor.h"

namespace paritron::opt::cuda {

// A floating format by value, for device code: the namespace-scope constants
// of float_format.h are host variables, which device code may not reference;
// a function-local constexpr copy is fine.
#define PARITRON_FORMAT(name, constant) constexpr ::paritron::math::FloatFormat name = ::paritron::math::constant

struct DevPtr {
  void* p = nullptr;
  DType dt = DType::F32;
};

inline DevPtr dev(DTensor& t) { return DevPtr{t.data(), t.storage_dtype()}; }
inline DevPtr dev(const DTensor& t) { return DevPtr{const_cast<void*>(t.data()), t.storage_dtype()}; }
inline DevPtr dev(const DTensor* t) { return t ? dev(*t) : DevPtr{}; }

// Element i of a as T (float or double).
template <class T>
__device__ __forceinline__ T ld(DevPtr a, int64_t i) {
  switch (a.dt) {
    case DType::F32: return static_cast<T>(static_cast<const float*>(a.p)[i]);
    case DType::F64: return static_cast<T>(static_cast<const double*>(a.p)[i]);
    case DType::BF16: return static_cast<T>(math::bf16_bits_to_float(static_cast<const uint16_t*>(a.p)[i]));
    case DType::F16: return static_cast<T>(__half2float(__ushort_as_half(static_cast<const unsigned short*>(a.p)[i])));
    case DType::F8_E4M3: {
      PARITRON_FORMAT(f, kFloat8E4M3);
      return static_cast<T>(math::decode(static_cast<const uint8_t*>(a.p)[i], f));
    }
    case DType::F8_E5M2: {
      PARITRON_FORMAT(f, kFloat8E5M2);
      return static_cast<T>(math::decode(static_cast<const uint8_t*>(a.p)[i], f));
    }
    default: return T(0);
  }
}

// Element i of a = v, rounded once (RNE) to a's storage dtype.
template <class T>
__device__ __forceinline__ void st(DevPtr a, int64_t i, T v) {
  switch (a.dt) {
    case DType::F32: static_cast<float*>(a.p)[i] = static_cast<float>(v); break;
    case DType::F64: static_cast<double*>(a.p)[i] = static_cast<double>(v); break;
    case DType::BF16:
      if constexpr (sizeof(T) == 8) {
        PARITRON_FORMAT(f, kBFloat16);
        static_cast<uint16_t*>(a.p)[i] = static_cast<uint16_t>(math::encode(static_cast<double>(v), f));
      } else {
        static_cast<uint16_t*>(a.p)[i] = math::float_to_bf16_bits(static_cast<float>(v));
      }
      break;
    case DType::F16:
      if constexpr (sizeof(T) == 8) {
        PARITRON_FORMAT(f, kFloat16);
        static_cast<uint16_t*>(a.p)[i] = static_cast<uint16_t>(math::encode(static_cast<double>(v), f));
      } else {
        static_cast<unsigned short*>(a.p)[i] = __half_as_ushort(__float2half_rn(static_cast<float>(v)));
      }
      break;
    case DType::F8_E4M3: {
      PARITRON_FORMAT(f, kFloat8E4M3);
      static_cast<uint8_t*>(a.p)[i] = static_cast<uint8_t>(math::encode(static_cast<double>(v), f, math::Saturation::kFinite));
      break;
    }
    case DType::F8_E5M2: {
      PARITRON_FORMAT(f, kFloat8E5M2);
      static_cast<uint8_t*>(a.p)[i] = static_cast<uint8_t>(math::encode(static_cast<double>(v), f, math::Saturation::kFinite));
      break;
    }
    default: break;
  }
}

// v rounded to dtype dt's values, kept in T (a value a kernel would store and
// reload, without the memory round trip).
template <class T>
__device__ __forceinline__ T round_as(DType dt, T v) {
  if constexpr (sizeof(T) == 8) {
    if (dt == DType::F64) return v;
    if (dt == DType::F32) return static_cast<double>(static_cast<float>(v));
    PARITRON_FORMAT(bf16, kBFloat16);
    PARITRON_FORMAT(fp16, kFloat16);
    return math::round_to(v, dt == DType::BF16 ? bf16 : fp16);
  } else {
    if (dt == DType::BF16) return math::round_float_to_bf16(v);
    if (dt == DType::F16) return math::round_float_to_fp16(v);
    return v;
  }
}

// Launch shapes.
inline constexpr int kThreads = 256;
inline int blocks_for(int64_t n, int threads = kThreads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));  // grid-stride loops cover the rest
}

// Grid-stride index loop.
#define PARITRON_GRID_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < (n); i += int64_t{gridDim.x} * blockDim.x)

// Whether a kernel computes in double: any F64 operand makes it a float64 run.
inline bool is_f64(const DTensor& t) { return t.storage_dtype() == DType::F64; }

// Block-wide sum (blockDim.x a multiple of 32, <= 1024), T float or double,
// result valid in every thread. The order of additions is fixed by the launch
// shape, so results are deterministic run to run.
template <class T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  T total = T(0);
  for (int w = 0; w < warps; ++w) total += partial[w];
  return total;
}

// ---------------------------------------------------------------------------
// Storage access with a value dtype, and by 8 elements (16-byte vectors).

// Element i of a = v, rounded to the value dtype vdt, then stored in a's
// storage dtype (the two differ only for a tensor relabelled by as_dtype).
template <class T>
__device__ __forceinline__ void put(DevPtr a, DType vdt, int64_t i, T v) {
  if (vdt != a.dt) v = round_as<T>(vdt, v);
  st<T>(a, i, v);
}

// The 16-bit storage bits of v (dt BF16 or F16), exactly as st<T> writes them.
template <class T>
__device__ __forceinline__ uint32_t bits16(DType dt, T v) {
  if (dt == DType::BF16) {
    if constexpr (sizeof(T) == 8) {
      PARITRON_FORMAT(f, kBFloat16);
      return static_cast<uint16_t>(math::encode(static_cast<double>(v), f));
    } else {
      return math::float_to_bf16_bits(static_cast<float>(v));
    }
  }
  if constexpr (sizeof(T) == 8) {
    PARITRON_FORMAT(f, kFloat16);
    return static_cast<uint16_t>(math::encode(static_cast<double>(v), f));
  } else {
    return __half_as_ushort(__float2half_rn(static_cast<float>(v)));
  }
}

// A 16-bit storage value (dt BF16 or F16) as T, exactly as ld<T> reads it.
template <class T>
__device__ __forceinline__ T from16(DType dt, uint32_t bits) {
  const auto b = static_cast<uint16_t>(bits);
  if (dt == DType::BF16) return static_cast<T>(math::bf16_bits_to_float(b));
  return static_cast<T>(__half2float(__ushort_as_half(static_cast<unsigned short>(b))));
}

// Elements i .. i + 7 of a as T (i a multiple of 8, a.p 16-byte aligned).
template <class T>
__device__ __forceinline__ void load8(DevPtr a, int64_t i, T (&v)[8]) {
  switch (a.dt) {
    case DType::BF16:
    case DType::F16: {
      const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.p) + i);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        v[2 * k] = from16<T>(a.dt, w[k] & 0xFFFFu);
        v[2 * k + 1] = from16<T>(a.dt, w[k] >> 16);
      }
      break;
    }
    case DType::F32: {
      const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(a.p) + i);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const float4 u = p[k];
        v[4 * k] = static_cast<T>(u.x);
        v[4 * k + 1] = static_cast<T>(u.y);
        v[4 * k + 2] = static_cast<T>(u.z);
        v[4 * k + 3] = static_cast<T>(u.w);
      }
      break;
    }
    case DType::F64: {
      const double2* p = reinterpret_cast<const double2*>(static_cast<const double*>(a.p) + i);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const double2 u = p[k];
        v[2 * k] = static_cast<T>(u.x);
        v[2 * k + 1] = static_cast<T>(u.y);
      }
      break;
    }
    default:
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = ld<T>(a, i + k);
      break;
  }
}

// Elements i .. i + 7 of a = v, as put<T> stores them (i a multiple of 8,
// a.p 16-byte aligned).
template <class T>
__device__ __forceinline__ void store8(DevPtr a, DType vdt, int64_t i, const T (&v)[8]) {
  T r[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) r[k] = vdt != a.dt ? round_as<T>(vdt, v[k]) : v[k];
  switch (a.dt) {
    case DType::BF16:
    case DType::F16: {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = bits16<T>(a.dt, r[2 * k]) | (bits16<T>(a.dt, r[2 * k + 1]) << 16);
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(a.p) + i) = make_uint4(w[0], w[1], w[2], w[3]);
      break;
    }
    case DType::F32: {
      float4* p = reinterpret_cast<float4*>(static_cast<float*>(a.p) + i);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        p[k] = make_float4(static_cast<float>(r[4 * k]), static_cast<float>(r[4 * k + 1]),
                           static_cast<float>(r[4 * k + 2]), static_cast<float>(r[4 * k + 3]));
      }
      break;
    }
    case DType::F64: {
      double2* p = reinterpret_cast<double2*>(static_cast<double*>(a.p) + i);
#pragma unroll
      for (int k = 0; k < 4; ++k) p[k] = make_double2(static_cast<double>(r[2 * k]), static_cast<double>(r[2 * k + 1]));
      break;
    }
    default:
#pragma unroll
      for (int k = 0; k < 8; ++k) st<T>(a, i + k, r[k]);
      break;
  }
}

// ---------------------------------------------------------------------------
// Index and warp arithmetic.

// n / d by a multiply-high and a shift (Granlund-Montgomery, as PyTorch's
// IntDivider): exact for 0 <= n < 2^31 and 1 <= d < 2^31. Splits a flat index
// into (outer, inner) without a division instruction (norm.cu's output
// loops: (row, column) of a tile; rope.cu: (head slot, item of the head)).
struct FastDiv {
  uint32_t magic = 1;
  int shift = 0;
};

inline FastDiv make_fastdiv(uint32_t d) {
  FastDiv f;
  while ((uint64_t{1} << f.shift) < d) ++f.shift;
  f.magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << f.shift) - d)) / d + 1);
  return f;
}

__device__ __forceinline__ uint32_t fast_div(FastDiv f, uint32_t n) {
  return (__umulhi(n, f.magic) + n) >> f.shift;
}

// The 8 chain partials of math::norm_detail::lane_sum, held by the 8 lanes
// 8g .. 8g + 7 of a warp (lane 8g + l holds partial l), combined with its
// tree ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)); IEEE addition is
// commutative, so every lane of the 8 ends with the same bits. All 32 lanes
// of the warp must call it.
__device__ __forceinline__ double lane_tree(double a) {
  a = a + __shfl_xor_sync(0xFFFFFFFFu, a, 4);  // lane l < 4: a_l + a_(l+4)
  a = a + __shfl_xor_sync(0xFFFFFFFFu, a, 1);  // (a0 + a4) + (a1 + a5), (a2 + a6) + (a3 + a7)
  a = a + __shfl_xor_sync(0xFFFFFFFFu, a, 2);  // the whole
  return a;
}

}  // namespace paritron::opt::cuda
