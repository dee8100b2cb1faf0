// The host side of Paritron's counter-based RNG (design.md, principle 1 "Same
// inputs by construction"): a key per (seed, global tensor name), and fills of
// whole tensors or of any shard of them, all drawn from Philox4x32-10 by
// global element index (the per-element, host-device draws are in
// common/math/random.h; kernels call those with the RngKey made here).
//
// Because element i of a global tensor is a pure function of (seed, name, i),
// the reference fills the whole tensor, each optimized rank fills only its
// shard, and they hold the same numbers without a scatter; a CUDA kernel
// calling math::normal_scaled with the same key fills the same bits too.
//
// Fixed forever (changing any of it changes every case file and golden test):
//   key     h = fnv1a64(tensor_name)                  (FNV-1a, 64-bit, over the UTF-8 bytes)
//           x = splitmix64(splitmix64(seed) ^ h)      (splitmix64 = one step of Vigna's generator)
//           RngKey{k0 = lo32(x), k1 = hi32(x)}
//   counter element i, attempt a, stream s -> {lo32(i), hi32(i), a, s} (common/math/random.h)
//   values  uniform(key, i): (2k+1)/2^53, k the top 52 bits of (w1:w0) of attempt 0, stream 0
//           normal(key, i):  Marsaglia polar on stream 1, first accepted attempt
//   fills   dst[j] = round_RNE_to_dtype(draw(global_begin + j)), where the draw for
//           uniform is fma(high - low, u, low) and for normal fma(stddev, z, mean)
//
// Names are the global (unsharded) state-dict key or the purpose of the draw,
// e.g. "layers.0.self_attention.linear_qkv.weight", "inputs.hidden_states",
// "dropout.layers.0.attention"; rng_test.cpp pins golden values of all of it.
#pragma once

#include <cstdint>
#include <string_view>

#include "common/math/random.h"
#include "common/tensor.h"

namespace paritron {

using RngKey = math::RngKey;  // {k0, k1}: the Philox key

// FNV-1a, 64-bit (offset basis 0xcbf29ce484222325, prime 0x100000001b3), bytewise.
constexpr uint64_t fnv1a64(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : bytes) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

// One output of splitmix64 whose state was x before the step (Steele, Lea and
// Flood 2014, "Fast splittable pseudorandom number generators"; constants from
// Vigna's splitmix64.c): a bijective 64-bit mixer with full avalanche, so
// seeds 0, 1, 2 and names differing in one byte give unrelated keys.
constexpr uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The Philox key of the global tensor `tensor_name` under `seed` (layout above).
constexpr RngKey rng_key(uint64_t seed, std::string_view tensor_name) {
  const uint64_t x = splitmix64(splitmix64(seed) ^ fnv1a64(tensor_name));
  return RngKey{static_cast<uint32_t>(x), static_cast<uint32_t>(x >> 32)};
}

// Element `index` of the global tensor keyed by key.
double uniform(RngKey key, uint64_t index);  // on (0, 1), 53-bit precision
double normal(RngKey key, uint64_t index);   // N(0, 1)

// dst[j] = the draw of global element global_begin + j (j in flat row-major
// order over dst), rounded to dst's dtype with Tensor::set's rounding (RNE,
// no saturation). dst must have a floating dtype; the global indices must fit
// in 64 bits. Uniform values lie in (low, high) before rounding; rounded to
// the dtype they stay within [low, high] only when low and high are values of
// the dtype.
void fill_uniform(Tensor& dst, RngKey key, uint64_t global_begin, double low, double high);
void fill_normal(Tensor& dst, RngKey key, uint64_t global_begin, double mean, double stddev);

// Rows [r0, r0 + nr) x columns [c0, c0 + nc) of a row-major 2-D global tensor
// of shape [global_rows, global_cols], as a new [nr, nc] tensor of dtype: the
// slice a tensor-parallel rank owns. Equal, bit for bit, to the same slice of
// the whole tensor drawn at once. Throws Error if the block is out of range.
Tensor uniform_shard(DType dtype, RngKey key, int64_t global_rows, int64_t global_cols, int64_t r0, int64_t nr,
                     int64_t c0, int64_t nc, double low, double high);
Tensor normal_shard(DType dtype, RngKey key, int64_t global_rows, int64_t global_cols, int64_t r0, int64_t nr,
                    int64_t c0, int64_t nc, double mean, double stddev);

}  // namespace paritron
