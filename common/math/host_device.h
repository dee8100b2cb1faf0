// PARITRON_HD marks single-source math: compiled as __host__ __device__ under
// nvcc and as plain C++ otherwise, so the CPU backend runs the very code the
// GPU runs (design.md, principle 4). Bit casts that work on both sides live here.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PARITRON_HD __host__ __device__
#else
#define PARITRON_HD
#endif

namespace paritron::math {

PARITRON_HD inline uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

PARITRON_HD inline double double_from_bits(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

PARITRON_HD inline uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_uint(x));
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

PARITRON_HD inline float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

}  // namespace paritron::math
