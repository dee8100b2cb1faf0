// Tests of the bit-level building blocks of the RNG: Philox4x32-R against the
// published Random123 known-answer vectors (Random123 1.14, examples/
// kat_vectors, lines "philox4x32 7" and "philox4x32 10"), and portable_log
// (common/math/random.h) against std::log, measured in ulps over millions of
// inputs chosen where a logarithm is hardest: near 1 (cancellation), near
// sqrt(2) and sqrt(2)/2 (the reduction boundary), at and around every power of
// two, in the subnormal range and next to it, and on the s values Marsaglia's
// polar method actually feeds it.
#include "common/math/philox.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/math/random.h"

namespace paritron::math {
namespace {

struct Kat {
  int rounds;
  PhiloxBlock counter;
  PhiloxKey key;
  PhiloxBlock expected;
};

// Random123 kat_vectors: counter[4] key[2] -> out[4].
const Kat kKats[] = {
    {7, {{0x00000000, 0x00000000, 0x00000000, 0x00000000}}, {0x00000000, 0x00000000},
     {{0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48}}},
    {7, {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}}, {0xffffffff, 0xffffffff},
     {{0x5207ddc2, 0x45165e59, 0x4d8ee751, 0x8c52f662}}},
    {7, {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}}, {0xa4093822, 0x299f31d0},
     {{0x4dfccaba, 0x190a87f0, 0xc47362ba, 0xb6b5242a}}},
    {10, {{0x00000000, 0x00000000, 0x00000000, 0x00000000}}, {0x00000000, 0x00000000},
     {{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}}},
    {10, {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}}, {0xffffffff, 0xffffffff},
     {{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}}},
    {10, {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}}, {0xa4093822, 0x299f31d0},
     {{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}}},
};

std::string hex(const PhiloxBlock& b) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%08x %08x %08x %08x", b.v[0], b.v[1], b.v[2], b.v[3]);
  return buf;
}

TEST(Philox, KnownAnswerVectors) {
  for (const Kat& kat : kKats) {
    const PhiloxBlock out = kat.rounds == 7 ? philox4x32<7>(kat.counter, kat.key) : philox4x32<10>(kat.counter, kat.key);
    EXPECT_EQ(hex(out), hex(kat.expected)) << "philox4x32 " << kat.rounds << " counter " << hex(kat.counter);
  }
}

TEST(Philox, TenRoundsIsTheDefault) {
  for (const Kat& kat : kKats) {
    if (kat.rounds == 10) {
      EXPECT_EQ(philox4x32_10(kat.counter, kat.key), kat.expected);
    }
  }
}

TEST(Philox, MulHiLoIsTheFull64BitProduct) {
  std::mt19937_64 gen(7);
  for (int i = 0; i < 100000; ++i) {
    const auto a = static_cast<uint32_t>(gen());
    const auto b = static_cast<uint32_t>(gen());
    const uint64_t p = static_cast<uint64_t>(a) * b;
    ASSERT_EQ(mulhi32(a, b), static_cast<uint32_t>(p >> 32));
    ASSERT_EQ(mullo32(a, b), static_cast<uint32_t>(p));
  }
  EXPECT_EQ(mulhi32(0xffffffffu, 0xffffffffu), 0xfffffffeu);
}

// One bit flipped anywhere in counter or key flips about half the output bits
// (Salmon et al.'s avalanche criterion for 10 rounds): 64 in 128 on average,
// sd 5.7 per trial; the mean over 192 x 200 trials has sd 0.03.
TEST(Philox, Avalanche) {
  std::mt19937_64 gen(11);
  double total = 0;
  int trials = 0;
  for (int t = 0; t < 200; ++t) {
    PhiloxBlock c;
    for (uint32_t& w : c.v) w = static_cast<uint32_t>(gen());
    const PhiloxKey k{static_cast<uint32_t>(gen()), static_cast<uint32_t>(gen())};
    const PhiloxBlock base = philox4x32_10(c, k);
    for (int bit = 0; bit < 192; ++bit) {  // 128 counter bits, then 64 key bits
      PhiloxBlock c2 = c;
      PhiloxKey k2 = k;
      if (bit < 128) {
        c2.v[bit / 32] ^= 1u << (bit % 32);
      } else {
        (bit < 160 ? k2.k0 : k2.k1) ^= 1u << (bit % 32);
      }
      const PhiloxBlock out = philox4x32_10(c2, k2);
      int flipped = 0;
      for (int w = 0; w < 4; ++w) flipped += __builtin_popcount(out.v[w] ^ base.v[w]);
      total += flipped;
      ++trials;
    }
  }
  EXPECT_NEAR(total / trials, 64.0, 0.5);
}

// ---------------------------------------------------------------------------
// portable_log vs std::log.

// Distance in ulps between two finite doubles of the same sign or zero.
int64_t ulp_distance(double a, double b) {
  const auto ordered = [](double x) {
    const uint64_t u = bits_of(x);
    const auto mag = static_cast<int64_t>(u & 0x7FFFFFFFFFFFFFFFull);
    return (u >> 63) != 0 ? -mag : mag;
  };
  const int64_t d = ordered(a) - ordered(b);
  return d < 0 ? -d : d;
}

struct LogStats {
  int64_t count = 0;
  int64_t max_ulp = 0;
  int64_t differing = 0;
  double worst_x = 0;
};

void check_log(LogStats& st, double x) {
  const double ours = portable_log(x);
  const double libm = std::log(x);
  const int64_t d = ulp_distance(ours, libm);
  ++st.count;
  if (d > 0) ++st.differing;
  if (d > st.max_ulp) {
    st.max_ulp = d;
    st.worst_x = x;
  }
}

// glibc's log is correctly rounded in all but rare cases (< 0.52 ulp), so 1 ulp
// against it means ours is within ~1.5 ulp of the true value; fdlibm's
// published bound for this algorithm is < 1 ulp.
constexpr int64_t kMaxLogUlps = 1;

void report(const char* name, const LogStats& st) {
  std::printf("portable_log %-28s %9lld inputs: max %lld ulp (at %a), %lld differ from std::log\n", name,
              static_cast<long long>(st.count), static_cast<long long>(st.max_ulp), st.worst_x,
              static_cast<long long>(st.differing));
  EXPECT_LE(st.max_ulp, kMaxLogUlps) << name << ": worst input " << st.worst_x;
}

TEST(RngPortableLog, RandomPositiveDoublesOverTheWholeRange) {
  std::mt19937_64 gen(1);
  LogStats st;
  for (int i = 0; i < 2000000; ++i) {
    // Uniform random bit patterns: every binade (subnormals included) equally likely.
    const uint64_t u = gen() & 0x7FFFFFFFFFFFFFFFull;
    if (u >= 0x7FF0000000000000ull || u == 0) continue;
    check_log(st, double_from_bits(u));
  }
  report("random bit patterns", st);
}

TEST(RngPortableLog, Subnormals) {
  std::mt19937_64 gen(2);
  LogStats st;
  for (uint64_t u = 1; u < 1000; ++u) check_log(st, double_from_bits(u));  // the smallest ones
  for (int i = 0; i < 500000; ++i) check_log(st, double_from_bits(1 + gen() % 0x000FFFFFFFFFFFFFull));
  // Both sides of the subnormal / normal boundary 2^-1022.
  for (uint64_t d = 0; d < 100000; ++d) {
    check_log(st, double_from_bits(0x0010000000000000ull - 1 - d));
    check_log(st, double_from_bits(0x0010000000000000ull + d));
  }
  report("subnormal and adjacent", st);
}

TEST(RngPortableLog, NearOne) {
  std::mt19937_64 gen(3);
  LogStats st;
  for (uint64_t d = 1; d < 200000; ++d) {  // 1 +- d ulps: where log(x) ~ x - 1 cancels most
    check_log(st, double_from_bits(0x3FF0000000000000ull + d));
    check_log(st, double_from_bits(0x3FF0000000000000ull - d));
  }
  std::uniform_real_distribution<double> exponent(-50.0, -1.0);
  for (int i = 0; i < 500000; ++i) {
    const double delta = std::exp2(exponent(gen));
    check_log(st, 1.0 + delta);
    check_log(st, 1.0 - delta);
  }
  report("near 1", st);
}

TEST(RngPortableLog, NearTheReductionBoundary) {
  LogStats st;
  for (double center : {std::sqrt(2.0), std::sqrt(0.5), 2 * std::sqrt(2.0), std::sqrt(2.0) / 4, 1e300 * std::sqrt(2.0)}) {
    const uint64_t c = bits_of(center);
    for (uint64_t d = 0; d < 100000; ++d) {
      check_log(st, double_from_bits(c + d));
      check_log(st, double_from_bits(c - d));
    }
  }
  report("near sqrt(2) * 2^k", st);
}

TEST(RngPortableLog, AroundEveryPowerOfTwo) {
  LogStats st;
  for (int e = -1074; e <= 1023; ++e) {
    const double p = std::ldexp(1.0, e);
    const uint64_t c = bits_of(p);
    for (uint64_t d = 0; d < 200; ++d) {
      check_log(st, double_from_bits(c + d));
      if (c > d) check_log(st, double_from_bits(c - d));
    }
  }
  report("around 2^e, e in [-1074, 1023]", st);
}

TEST(RngPortableLog, MarsagliaInputs) {
  // The s = v1^2 + v2^2 < 1 that normal_double takes the log of.
  LogStats st;
  const PhiloxKey key{0x12345678u, 0x9abcdef0u};
  for (uint64_t i = 0; i < 1000000; ++i) {
    const PhiloxBlock b = rng_block(key, i, 0, RngStream::kNormal);
    const double v1 = symmetric_open_double(join64(b.v[0], b.v[1]));
    const double v2 = symmetric_open_double(join64(b.v[2], b.v[3]));
    const double s = rn::fma(v1, v1, rn::mul(v2, v2));
    if (s < 1.0) check_log(st, s);
  }
  report("Marsaglia s in (0, 1)", st);
}

TEST(RngPortableLog, ExactAndSpecialValues) {
  EXPECT_EQ(bits_of(portable_log(1.0)), bits_of(0.0));  // +0, as IEEE requires
  for (int e = -1074; e <= 1023; ++e) {
    const double p = std::ldexp(1.0, e);
    EXPECT_EQ(portable_log(p), std::log(p)) << "log(2^" << e << ")";
  }
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(portable_log(0.0), -inf);
  EXPECT_EQ(portable_log(-0.0), -inf);
  EXPECT_EQ(portable_log(inf), inf);
  EXPECT_TRUE(std::isnan(portable_log(-1.0)));
  EXPECT_TRUE(std::isnan(portable_log(-inf)));
  EXPECT_TRUE(std::isnan(portable_log(std::numeric_limits<double>::quiet_NaN())));
  EXPECT_EQ(portable_log(std::numeric_limits<double>::max()), std::log(std::numeric_limits<double>::max()));
  EXPECT_EQ(portable_log(std::numeric_limits<double>::denorm_min()),
            std::log(std::numeric_limits<double>::denorm_min()));
}

}  // namespace
}  // namespace paritron::math
