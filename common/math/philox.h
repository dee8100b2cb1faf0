// Philox4x32-R: the counter-based block generator behind every random number
// Paritron draws (design.md, principle 1 "Same inputs by construction").
//
// A counter-based generator is a keyed bijection out = f_key(counter): there is
// no state to carry from one draw to the next, so any element of any tensor can
// be drawn alone, by any rank, on the CPU or the GPU, in any order. Philox4x32
// maps a 128-bit counter (four uint32 words) and a 64-bit key (two words) to
// 128 random bits with R rounds of 32x32->64 multiplies, xors and key bumps.
// R = 10 is the variant cuRAND uses (curand_Philox4x32_10) and the one Paritron
// draws with; R = 7 is kept because it is the other published known-answer set
// and checks the round loop, not just one round count.
//
// Source: J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel Random
// Numbers: As Easy as 1, 2, 3", SC'11 (doi:10.1145/2063384.2063405), and the
// Random123 library's philox.h (multipliers, Weyl key increments, the round
// and bump order). philox_test.cpp checks Random123's kat_vectors.
//
// Pure integer code, PARITRON_HD: host and device give the same bits by
// construction (no floating point here at all).
#pragma once

#include <cstdint>

#include "common/math/host_device.h"

namespace paritron::math {

// The 64-bit Philox key, as two words (Random123's key[0], key[1]).
struct PhiloxKey {
  uint32_t k0 = 0;
  uint32_t k1 = 0;
  friend constexpr bool operator==(const PhiloxKey&, const PhiloxKey&) = default;
};

// A 128-bit counter or output block, as four words (Random123's ctr[0..3]).
struct PhiloxBlock {
  uint32_t v[4] = {0, 0, 0, 0};
  friend constexpr bool operator==(const PhiloxBlock&, const PhiloxBlock&) = default;
};

inline constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers (Salmon et al., Table 2)
inline constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bumps: golden ratio and sqrt(3)-1, as Weyl increments
inline constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// The high and low 32 bits of the full 64-bit product a * b.
PARITRON_HD inline uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}
PARITRON_HD inline uint32_t mullo32(uint32_t a, uint32_t b) { return a * b; }  // mod 2^32

// One Philox S-box round (Random123 _philox4x32round).
PARITRON_HD inline PhiloxBlock philox4x32_round(const PhiloxBlock& c, const PhiloxKey& k) {
  const uint32_t hi0 = mulhi32(kPhiloxM0, c.v[0]);
  const uint32_t lo0 = mullo32(kPhiloxM0, c.v[0]);
  const uint32_t hi1 = mulhi32(kPhiloxM1, c.v[2]);
  const uint32_t lo1 = mullo32(kPhiloxM1, c.v[2]);
  PhiloxBlock out;
  out.v[0] = hi1 ^ c.v[1] ^ k.k0;
  out.v[1] = lo1;
  out.v[2] = hi0 ^ c.v[3] ^ k.k1;
  out.v[3] = lo0;
  return out;
}

// Philox4x32 with Rounds rounds: round, then bump the key, Rounds - 1 times,
// and a last round (the key schedule of Random123 philox4x32_R).
template <int Rounds>
PARITRON_HD inline PhiloxBlock philox4x32(PhiloxBlock counter, PhiloxKey key) {
  static_assert(Rounds >= 1 && Rounds <= 16, "Random123 defines Philox4x32 for 1..16 rounds");
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < Rounds; ++r) {
    if (r > 0) {
      key.k0 += kPhiloxW0;
      key.k1 += kPhiloxW1;
    }
    counter = philox4x32_round(counter, key);
  }
  return counter;
}

// The generator Paritron draws with. Salmon et al. found 7 rounds already pass
// TestU01's BigCrush and recommend 10 as a safety margin; cuRAND uses 10.
PARITRON_HD inline PhiloxBlock philox4x32_10(const PhiloxBlock& counter, const PhiloxKey& key) {
  return philox4x32<10>(counter, key);
}

}  // namespace paritron::math
