// The single-source math (design.md, principle 4) run on the GPU and compared
// bit for bit with the same functions run on the host: the guarantee that CPU
// CI tests the very numbers the GPU makes. Covered here:
//   - common/math/philox.h: Philox4x32-10 and -7 on the published known-answer
//     vectors and ~1M random (counter, key) pairs;
//   - common/math/random.h: uniform_float, uniform_double, normal_double (and
//     its attempt count), uniform_range, normal_scaled for ~1.2M element
//     indices, including both sides of 2^32 and the last indices below 2^64;
//     portable_log on ~3M inputs (every binade, subnormals, near 1, near
//     sqrt(2), specials);
//   - common/math/float_format.h: decode and encode (both saturation modes)
//     of every fp16 / bf16 / e4m3 / e5m2 bit pattern, decode of random fp32
//     patterns, encode to all five formats of ~4M doubles (random bit
//     patterns, every format's range, and each rounding tie with its two
//     neighbouring doubles), and the fast fp32 -> bf16 cast.
// One generic kernel maps an op over an input array; the op is a functor
// whose operator() is __host__ __device__, so the host reference and the
// kernel run the same source. Outputs are integers or bit patterns, compared
// with ==. Skips cleanly without a CUDA device (shared/toolchain.md).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/math/float_format.h"
#include "common/math/philox.h"
#include "common/math/random.h"
#include "common/rng.h"

namespace paritron::math {
namespace {

#define PARITRON_CUDA_ASSERT(expr)                                                                    \
  do {                                                                                                \
    const cudaError_t status_ = (expr);                                                               \
    ASSERT_EQ(status_, cudaSuccess) << #expr << ": " << cudaGetErrorName(status_) << " ("             \
                                    << cudaGetErrorString(status_) << ")";                            \
  } while (0)

class MathDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0) {
      (void)cudaGetLastError();  // clear the sticky error for later tests
      GTEST_SKIP() << "no CUDA device (" << cudaGetErrorName(status) << ")";
    }
  }
};

// ---------------------------------------------------------------------------
// Harness: out[i] = op(in[i]) on the device, compared with op(in[i]) on the host.

template <class In, class Out, class Op>
__global__ void map_kernel(const In* in, Out* out, size_t n, Op op) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = op(in[i]);
}

template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr != nullptr) (void)cudaFree(ptr);
  }
};

template <class In, class Op>
using OutOf = decltype(std::declval<const Op&>()(std::declval<const In&>()));

// Runs op over in on the device; out receives the results. Times the kernel.
template <class In, class Op>
void run_on_device(const std::vector<In>& in, std::vector<OutOf<In, Op>>& out, const Op& op, float* kernel_ms) {
  using Out = OutOf<In, Op>;
  const size_t n = in.size();
  out.assign(n, Out{});
  if (n == 0) return;
  DeviceBuffer<In> d_in;
  DeviceBuffer<Out> d_out;
  PARITRON_CUDA_ASSERT(cudaMalloc(&d_in.ptr, n * sizeof(In)));
  PARITRON_CUDA_ASSERT(cudaMalloc(&d_out.ptr, n * sizeof(Out)));
  PARITRON_CUDA_ASSERT(cudaMemcpy(d_in.ptr, in.data(), n * sizeof(In), cudaMemcpyHostToDevice));
  cudaEvent_t start = nullptr, stop = nullptr;
  PARITRON_CUDA_ASSERT(cudaEventCreate(&start));
  PARITRON_CUDA_ASSERT(cudaEventCreate(&stop));
  constexpr unsigned kThreads = 256;
  const auto blocks = static_cast<unsigned>(std::min<size_t>((n + kThreads - 1) / kThreads, 8192));
  PARITRON_CUDA_ASSERT(cudaEventRecord(start));
  map_kernel<<<blocks, kThreads>>>(d_in.ptr, d_out.ptr, n, op);
  PARITRON_CUDA_ASSERT(cudaGetLastError());
  PARITRON_CUDA_ASSERT(cudaEventRecord(stop));
  PARITRON_CUDA_ASSERT(cudaDeviceSynchronize());
  float ms = 0;
  PARITRON_CUDA_ASSERT(cudaEventElapsedTime(&ms, start, stop));
  PARITRON_CUDA_ASSERT(cudaEventDestroy(start));
  PARITRON_CUDA_ASSERT(cudaEventDestroy(stop));
  if (kernel_ms != nullptr) *kernel_ms = ms;
  PARITRON_CUDA_ASSERT(cudaMemcpy(out.data(), d_out.ptr, n * sizeof(Out), cudaMemcpyDeviceToHost));
}

std::string hex64(uint64_t u) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%016llx", static_cast<unsigned long long>(u));
  return buf;
}

// Every device result must equal the host's; reports the first few that do not.
template <class In, class Op, class Describe>
void expect_device_equals_host(const char* what, const std::vector<In>& in, const Op& op, Describe describe) {
  std::vector<OutOf<In, Op>> device;
  float ms = 0;
  ASSERT_NO_FATAL_FAILURE(run_on_device(in, device, op, &ms));
  int64_t mismatches = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const auto host = op(in[i]);
    if (!(host == device[i])) {
      if (mismatches < 8) {
        ADD_FAILURE() << what << ": element " << i << " input " << describe(in[i]) << " host "
                      << describe(host) << " device " << describe(device[i]);
      }
      ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0) << what << ": " << mismatches << " of " << in.size() << " differ";
  std::printf("%-44s %9zu inputs, all bit-identical: %s (kernel %.3f ms)\n", what, in.size(),
              mismatches == 0 ? "yes" : "NO", static_cast<double>(ms));
}

// ---------------------------------------------------------------------------
// Ops.

struct PhiloxInput {
  PhiloxBlock counter;
  PhiloxKey key;
};

template <int Rounds>
struct PhiloxOp {
  __host__ __device__ PhiloxBlock operator()(const PhiloxInput& in) const {
    return philox4x32<Rounds>(in.counter, in.key);
  }
};

// All draws of one element as bit patterns (no padding, so == is bitwise).
struct DrawBits {
  uint64_t uniform_float;
  uint64_t uniform_double;
  uint64_t normal;
  uint64_t attempts;
  uint64_t range;
  uint64_t scaled;
  friend bool operator==(const DrawBits&, const DrawBits&) = default;
};

struct DrawOp {
  RngKey key;
  __host__ __device__ DrawBits operator()(uint64_t index) const {
    DrawBits d{};
    uint32_t attempts = 0;
    d.uniform_float = bits_of(uniform_float(key, index));
    d.uniform_double = bits_of(uniform_double(key, index));
    d.normal = bits_of(normal_double(key, index, &attempts));
    d.attempts = attempts;
    d.range = bits_of(uniform_range(key, index, -0.25, 3.5));
    d.scaled = bits_of(normal_scaled(key, index, 0.125, 0.02));
    return d;
  }
};

struct LogOp {
  __host__ __device__ uint64_t operator()(double x) const { return bits_of(portable_log(x)); }
};

struct DecodeOp {
  FloatFormat format;
  __host__ __device__ uint64_t operator()(uint32_t code) const { return bits_of(decode(code, format)); }
};

struct EncodeOp {
  FloatFormat format;
  Saturation saturation;
  __host__ __device__ uint32_t operator()(double x) const { return encode(x, format, saturation); }
};

// Both saturation modes of encode, and round_to, of a decoded code: the round
// trip every code makes in the emulation.
struct RoundTripOp {
  FloatFormat format;
  __host__ __device__ uint64_t operator()(uint32_t code) const {
    const double v = decode(code, format);
    return (static_cast<uint64_t>(encode(v, format, Saturation::kNone)) << 32) |
           encode(v, format, Saturation::kFinite);
  }
};

struct RoundToOp {
  FloatFormat format;
  Saturation saturation;
  __host__ __device__ uint64_t operator()(double x) const { return bits_of(round_to(x, format, saturation)); }
};

struct Bf16CastOp {
  __host__ __device__ uint64_t operator()(uint32_t float_bits) const {
    const uint16_t b = float_to_bf16_bits(float_from_bits(float_bits));
    return (static_cast<uint64_t>(b) << 32) | bits_of(bf16_bits_to_float(static_cast<uint16_t>(float_bits)));
  }
};

std::string describe_u64(uint64_t u) { return hex64(u); }
std::string describe_double(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%a (%s)", x, hex64(bits_of(x)).c_str());
  return buf;
}
std::string describe_block(const PhiloxBlock& b) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%08x %08x %08x %08x", b.v[0], b.v[1], b.v[2], b.v[3]);
  return buf;
}
std::string describe_philox_input(const PhiloxInput& in) {
  char buf[32];
  std::snprintf(buf, sizeof buf, " key %08x %08x", in.key.k0, in.key.k1);
  return describe_block(in.counter) + buf;
}
std::string describe_draws(const DrawBits& d) {
  return "uf " + hex64(d.uniform_float) + " ud " + hex64(d.uniform_double) + " n " + hex64(d.normal) + " attempts " +
         std::to_string(d.attempts) + " range " + hex64(d.range) + " scaled " + hex64(d.scaled);
}

// Overloads so describe() works on inputs and outputs of every op.
struct Describe {
  std::string operator()(uint64_t u) const { return describe_u64(u); }
  std::string operator()(uint32_t u) const { return describe_u64(u); }
  std::string operator()(double x) const { return describe_double(x); }
  std::string operator()(const PhiloxBlock& b) const { return describe_block(b); }
  std::string operator()(const PhiloxInput& in) const { return describe_philox_input(in); }
  std::string operator()(const DrawBits& d) const { return describe_draws(d); }
};

struct NamedFormat {
  const char* name;
  FloatFormat format;
};

const NamedFormat kSmallFormats[] = {
    {"fp16", kFloat16}, {"bf16", kBFloat16}, {"e4m3", kFloat8E4M3}, {"e5m2", kFloat8E5M2}};
const NamedFormat kAllFormats[] = {{"fp32", kFloat32},    {"fp16", kFloat16},    {"bf16", kBFloat16},
                                   {"e4m3", kFloat8E4M3}, {"e5m2", kFloat8E5M2}};

// ---------------------------------------------------------------------------
// Philox and the draws.

TEST_F(MathDeviceTest, Philox) {
  std::vector<PhiloxInput> in = {
      {{{0, 0, 0, 0}}, {0, 0}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, {0xffffffffu, 0xffffffffu}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, {0xa4093822u, 0x299f31d0u}},
  };
  std::mt19937_64 gen(1);
  for (int i = 0; i < (1 << 20); ++i) {
    PhiloxInput x;
    for (uint32_t& w : x.counter.v) w = static_cast<uint32_t>(gen());
    x.key = {static_cast<uint32_t>(gen()), static_cast<uint32_t>(gen())};
    in.push_back(x);
  }
  expect_device_equals_host("philox4x32-10", in, PhiloxOp<10>{}, Describe{});
  expect_device_equals_host("philox4x32-7", in, PhiloxOp<7>{}, Describe{});
  // The known answers themselves, as the GPU computes them.
  std::vector<PhiloxBlock> out;
  ASSERT_NO_FATAL_FAILURE(run_on_device(in, out, PhiloxOp<10>{}, nullptr));
  EXPECT_EQ(describe_block(out[0]), "6627e8d5 e169c58d bc57ac4c 9b00dbd8");
  EXPECT_EQ(describe_block(out[1]), "408f276d 41c83b0e a20bc7c6 6d5451fd");
  EXPECT_EQ(describe_block(out[2]), "d16cfe09 94fdcceb 5001e420 24126ea1");
}

TEST_F(MathDeviceTest, UniformAndNormalDraws) {
  std::vector<uint64_t> indices;
  for (uint64_t i = 0; i < (uint64_t{1} << 20); ++i) indices.push_back(i);
  for (uint64_t i = (uint64_t{1} << 32) - (1 << 15); i < (uint64_t{1} << 32) + (1 << 15); ++i) indices.push_back(i);
  for (uint64_t d = 1; d <= (1 << 16); ++d) indices.push_back(std::numeric_limits<uint64_t>::max() - (d - 1));
  for (const char* name : {"layers.0.self_attention.linear_qkv.weight", "dropout.layers.3.attention"}) {
    const DrawOp op{rng_key(1234, name)};
    expect_device_equals_host((std::string("draws under ") + name).c_str(), indices, op, Describe{});
  }
}

TEST_F(MathDeviceTest, PortableLog) {
  std::vector<double> in;
  std::mt19937_64 gen(2);
  for (int i = 0; i < 1500000; ++i) in.push_back(double_from_bits(gen() & 0x7FFFFFFFFFFFFFFFull));  // every binade, inf, NaN
  for (int i = 0; i < 200000; ++i) in.push_back(double_from_bits(1 + gen() % 0x000FFFFFFFFFFFFFull));  // subnormal
  for (uint64_t d = 0; d < 200000; ++d) {
    in.push_back(double_from_bits(0x3FF0000000000000ull + d));  // 1 + d ulps
    in.push_back(double_from_bits(0x3FF0000000000000ull - d));  // 1 - d ulps
    in.push_back(double_from_bits(bits_of(std::sqrt(2.0)) + d - 100000));
    in.push_back(double_from_bits(bits_of(std::sqrt(0.5)) + d - 100000));
  }
  const PhiloxKey key{0x12345678u, 0x9abcdef0u};  // the s values Marsaglia's method feeds it
  for (uint64_t i = 0; i < 500000; ++i) {
    const PhiloxBlock b = rng_block(key, i, 0, RngStream::kNormal);
    const double v1 = symmetric_open_double(join64(b.v[0], b.v[1]));
    const double v2 = symmetric_open_double(join64(b.v[2], b.v[3]));
    in.push_back(rn::fma(v1, v1, rn::mul(v2, v2)));
  }
  for (double special : {0.0, -0.0, 1.0, -1.0, std::numeric_limits<double>::infinity(),
                         -std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN(),
                         std::numeric_limits<double>::denorm_min(), std::numeric_limits<double>::min(),
                         std::numeric_limits<double>::max()}) {
    in.push_back(special);
  }
  expect_device_equals_host("portable_log", in, LogOp{}, Describe{});
}

// ---------------------------------------------------------------------------
// float_format.h.

TEST_F(MathDeviceTest, EveryBitPatternOfTheSmallFormats) {
  for (const NamedFormat& f : kSmallFormats) {
    std::vector<uint32_t> codes(size_t{1} << total_bits(f.format));
    for (uint32_t c = 0; c < codes.size(); ++c) codes[c] = c;
    expect_device_equals_host((std::string("decode every ") + f.name).c_str(), codes, DecodeOp{f.format}, Describe{});
    expect_device_equals_host((std::string("re-encode every ") + f.name).c_str(), codes, RoundTripOp{f.format},
                              Describe{});
  }
}

TEST_F(MathDeviceTest, Fp32DecodeAndBf16Cast) {
  std::vector<uint32_t> codes;
  std::mt19937_64 gen(3);
  for (int i = 0; i < 2000000; ++i) codes.push_back(static_cast<uint32_t>(gen()));
  // Every bf16 rounding boundary: the 16 low bits at, just below and just above the tie.
  for (uint32_t hi = 0; hi < 65536; ++hi) {
    for (uint32_t lo : {0x0000u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu}) codes.push_back((hi << 16) | lo);
  }
  expect_device_equals_host("decode fp32", codes, DecodeOp{kFloat32}, Describe{});
  expect_device_equals_host("float_to_bf16_bits / bf16_bits_to_float", codes, Bf16CastOp{}, Describe{});
}

// Doubles that exercise every path of encode: random bit patterns (all
// exponents, inf, NaN, subnormal doubles), each format's own range from below
// its smallest subnormal to past its max, and for each format the midpoint of
// adjacent values (the ties) and the doubles either side of it.
std::vector<double> encode_inputs() {
  std::vector<double> in;
  std::mt19937_64 gen(4);
  for (int i = 0; i < 1000000; ++i) in.push_back(double_from_bits(gen()));
  for (const NamedFormat& f : kAllFormats) {
    const int emin = 1 - f.format.bias;
    const int emax = static_cast<int>(f.format.max_finite >> f.format.mantissa_bits) - f.format.bias;
    std::uniform_int_distribution<int> exponent(emin - f.format.mantissa_bits - 3, emax + 2);
    for (int i = 0; i < 200000; ++i) {
      const uint64_t e = static_cast<uint64_t>(exponent(gen) + 1023);
      in.push_back(double_from_bits((gen() & 0x800FFFFFFFFFFFFFull) | (e << 52)));
    }
    // Ties: all positive codes of the 8/16-bit formats, 300k random ones of fp32.
    const uint32_t sign = 1u << (f.format.exponent_bits + f.format.mantissa_bits);
    const bool exhaustive = total_bits(f.format) <= 16;
    const uint32_t count = exhaustive ? sign - 1 : 300000;
    for (uint32_t i = 0; i < count; ++i) {
      const uint32_t code = exhaustive ? i : static_cast<uint32_t>(gen() % (f.format.max_finite));
      const double lo = decode(code, f.format), hi = decode(code + 1, f.format);
      if (!std::isfinite(lo) || !std::isfinite(hi)) continue;
      const double mid = rn::mul(rn::add(lo, hi), 0.5);  // exact: both have far fewer than 52 bits
      for (double x : {mid, std::nextafter(mid, 0.0), std::nextafter(mid, 1e300)}) {
        in.push_back(x);
        in.push_back(-x);
      }
    }
    // Just past max + ulp/2, where kNone overflows and kFinite saturates.
    const double max = decode(f.format.max_finite, f.format);
    for (double x : {max, std::nextafter(max, 1e300), max * 1.0625, max * 2, max * 1e10}) {
      in.push_back(x);
      in.push_back(-x);
    }
  }
  return in;
}

TEST_F(MathDeviceTest, EncodeMillionsOfDoubles) {
  const std::vector<double> in = encode_inputs();
  for (const NamedFormat& f : kAllFormats) {
    for (Saturation s : {Saturation::kNone, Saturation::kFinite}) {
      const std::string what = std::string("encode to ") + f.name + (s == Saturation::kNone ? "" : " (satfinite)");
      expect_device_equals_host(what.c_str(), in, EncodeOp{f.format, s}, Describe{});
    }
    expect_device_equals_host((std::string("round_to ") + f.name).c_str(), in, RoundToOp{f.format, Saturation::kNone},
                              Describe{});
  }
}

}  // namespace
}  // namespace paritron::math
