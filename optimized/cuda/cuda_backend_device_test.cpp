// The CUDA backend (optimized/cuda/cuda_backend.h) on a device: every Backend
// op (optimized/backend.h) run on CudaBackend and on the CPU backend
// (optimized/cpu/cpu_backend.h) with the same random inputs (uploaded from the
// same host Tensors, so both hold the same dtype-rounded values), compared
// after download; GEMMs against a float64 host product.
//
// Two kinds of comparison:
//   * bit-exact (bit_exact): element-wise ops whose math is the single source
//     of optimized/math/ and common/math/ (PARITRON_HD), evaluated once per
//     element and rounded once to the output dtype: copy/cast, copy_cols,
//     fill, axpby, bias-activation (fused and unfused, every ActivationKind,
//     GLU), bias-dropout-add and dropout backward (Philox keys), RoPE,
//     fp8 fake quantisation, gather, scatter-add into distinct rows, the
//     router's top-k, amax. A difference is a bug: another formula, an FMA
//     contraction (device code is built with --fmad=false), a second
//     rounding, a wrong index or mask. NaNs compare equal whatever their
//     payload; the sign of zero counts.
//   * within a bound (within): ops whose reduction order legitimately
//     differs (GEMMs, norms, softmax, sums, column sums, attention). Each
//     bound is built next to its test from the unit roundoffs u (2^-53 fp64,
//     2^-24 fp32, 2^-11 fp16, 2^-8 bf16, 2^-4 e4m3) as an error delta before
//     the output's rounding, widened by rounded() for the two independent
//     roundings to the output dtype. Sums of n fp32 terms use the
//     probabilistic bound 4 sqrt(n) u sum|terms| (Higham & Mary 2019; every
//     reduction tree or atomic order satisfies it with a wide margin for
//     these sizes), not the worst-case n u.
//
// Every test skips without a device (the fixture's SetUp). ci/gpu runs this
// binary on a GPU machine, also under compute-sanitizer (memcheck, racecheck),
// so the shapes stay small; awkward sizes (not multiples of tiles or vector
// widths) are chosen on purpose.
#include "optimized/cuda/cuda_backend.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/math/float_format.h"
#include "common/math/random.h"
#include "common/rng.h"
#include "optimized/cpu/cpu_backend.h"
#include "optimized/math/router.h"

namespace paritron::opt::cuda {
namespace {

constexpr DType kF64 = DType::F64, kF32 = DType::F32, kBF16 = DType::BF16, kF16 = DType::F16;
constexpr DType kFloatDtypes[] = {kF64, kF32, kBF16, kF16};
constexpr double kU32 = 0x1p-24;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------
// Precision of the formats.

// Unit roundoff: the largest relative error of one RNE rounding to dtype.
double unit_roundoff(DType d) {
  switch (d) {
    case DType::F64: return 0x1p-53;
    case DType::F32: return 0x1p-24;
    case DType::F16: return 0x1p-11;
    case DType::BF16: return 0x1p-8;
    case DType::F8_E4M3: return 0x1p-4;
    case DType::F8_E5M2: return 0x1p-3;
    default: return 0.0;
  }
}

// Half the smallest subnormal: the absolute rounding error below the normal range.
double underflow(DType d) {
  switch (d) {
    case DType::F64: return 0x1p-1074;
    case DType::F32: return 0x1p-150;
    case DType::F16: return 0x1p-25;
    case DType::BF16: return 0x1p-134;
    case DType::F8_E4M3: return 0x1p-10;
    case DType::F8_E5M2: return 0x1p-17;
    default: return 0.0;
  }
}

// The compute precision of an op on dtype: fp32, or double for F64 tensors.
double compute_u(DType d) { return d == kF64 ? 0x1p-53 : kU32; }

// Two values computed within `delta` of each other, each then rounded once to
// dtype, where the first rounds to `want`: the rounded values differ by at
// most delta + u (|p| + |q|) + 2 underflow <= delta + u (2 (1 + 2u) |want| + delta) + 2 underflow.
double rounded(double delta, double want, DType dtype) {
  const double u = unit_roundoff(dtype);
  return delta + u * (2.0 * (1.0 + 2.0 * u) * std::abs(want) + delta) + 2.0 * underflow(dtype);
}

// The probabilistic error bound of an fp32 (or fp64) sum of n terms of total magnitude abs_sum.
double sum_bound(int64_t n, double abs_sum, double u) {
  return (4.0 * std::sqrt(static_cast<double>(std::max<int64_t>(n, 1))) + 4.0) * u * abs_sum;
}

// ---------------------------------------------------------------------------
// Host inputs.

// F64 host tensor of normal values (uploading rounds them to the dtype once).
Tensor normal(const Shape& shape, uint64_t seed, double sd = 1.0, double mean = 0.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(mean, sd);
  Tensor t(kF64, shape);
  for (double& v : t.data<double>()) v = dist(gen);
  return t;
}

// The values of t (any dtype) as doubles, exactly.
std::vector<double> values(const Tensor& t) { return t.to_doubles(); }

// host rounded to dtype, as exact doubles (what an upload of host as dtype holds).
std::vector<double> values_as(const Tensor& host, DType dtype) { return host.to(dtype).to_doubles(); }

std::string at(const Tensor& t, int64_t i) { return shape_string(t.unravel(i)); }

// ---------------------------------------------------------------------------
// Comparisons.

// Same dtype, shape and values bit for bit (NaN equals NaN; -0 differs from +0).
::testing::AssertionResult bit_exact(const Tensor& got, const Tensor& want) {
  if (got.dtype() != want.dtype() || got.shape() != want.shape()) {
    return ::testing::AssertionFailure() << "got " << dtype_name(got.dtype()) << shape_string(got.shape())
                                         << ", want " << dtype_name(want.dtype()) << shape_string(want.shape());
  }
  const bool integral = is_integral(got.dtype());
  int64_t bad = 0;
  std::string first;
  for (int64_t i = 0; i < got.numel(); ++i) {
    bool same;
    double g, w;
    if (integral) {
      g = static_cast<double>(got.get_int(i));
      w = static_cast<double>(want.get_int(i));
      same = got.get_int(i) == want.get_int(i);
    } else {
      g = got.get(i);
      w = want.get(i);
      same = (std::isnan(g) && std::isnan(w)) || (g == w && std::signbit(g) == std::signbit(w));
    }
    if (!same) {
      if (bad < 5) first += fmt::format("\n  at {}: got {} ({:a}), want {} ({:a})", at(got, i), g, g, w, w);
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.numel() << " " << dtype_name(got.dtype())
                                       << " elements differ:" << first;
}

// |got_i - want_i| <= bound(i) for every element (a NaN anywhere fails); on
// failure, the count and the worst elements relative to their bound.
template <class Bound>
::testing::AssertionResult within(const Tensor& got, const Tensor& want, Bound bound) {
  if (got.shape() != want.shape()) {
    return ::testing::AssertionFailure() << "shape " << shape_string(got.shape()) << ", want "
                                         << shape_string(want.shape());
  }
  int64_t bad = 0, worst_at = -1;
  double worst = -1.0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double g = got.get(i), w = want.get(i), b = bound(i);
    const double e = std::abs(g - w);
    const bool ok = e <= b;  // false for NaN
    const double ratio = ok ? (b > 0 ? e / b : 0.0) : kInf;
    if (!ok) ++bad;
    if (ratio > worst || (worst_at < 0)) {
      worst = ratio;
      worst_at = i;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  const int64_t i = worst_at;
  return ::testing::AssertionFailure() << bad << " of " << got.numel() << " elements beyond the bound; e.g. at "
                                       << at(got, i) << ": got " << got.get(i) << ", want " << want.get(i)
                                       << ", |diff| " << std::abs(got.get(i) - want.get(i)) << " > bound "
                                       << bound(i);
}

// Runs f, which must throw BackendError whose message contains every needle.
template <class F>
void expect_backend_error(F&& f, std::initializer_list<std::string> needles) {
  try {
    f();
    ADD_FAILURE() << "no BackendError thrown";
  } catch (const BackendError& e) {
    for (const std::string& n : needles) {
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "'" << n << "' not in: " << e.what();
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a BackendError: " << e.what();
  }
}

// ---------------------------------------------------------------------------
// The fixture: a CudaBackend (skipped without a device) and a CpuBackend.

class CudaDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::device_available(&why)) GTEST_SKIP() << "no CUDA device: " << why;
    gpu_ = std::make_unique<CudaBackend>();
  }

  CudaBackend& gpu() { return *gpu_; }
  cpu::CpuBackend& cpu() { return cpu_; }

  // One tensor on both backends.
  struct Pair {
    DTensor g, c;
  };
  Pair up(const Tensor& host, DType dtype) { return {gpu().upload(host, dtype), cpu().upload(host, dtype)}; }
  Pair empty(DType dtype, const Shape& shape) { return {gpu().empty(dtype, shape), cpu().empty(dtype, shape)}; }
  Pair zeros(DType dtype, const Shape& shape) { return {gpu().zeros(dtype, shape), cpu().zeros(dtype, shape)}; }
  Tensor down_g(const Pair& p) { return gpu().download(p.g); }
  Tensor down_c(const Pair& p) { return cpu().download(p.c); }
  ::testing::AssertionResult same(const Pair& p) { return bit_exact(down_g(p), down_c(p)); }
  // A GPU scalar (F32 [1]) holding v: fp8 scales.
  DTensor scalar(float v) {
    Tensor t(kF32, {1});
    t.data<float>()[0] = v;
    return gpu().upload(t, kF32);
  }

  std::unique_ptr<CudaBackend> gpu_;
  cpu::CpuBackend cpu_;
};

// ===========================================================================
// Memory: upload, download, copy (the cast), copy_cols, fill.

TEST_F(CudaDevice, UploadDownloadRoundsOnceAndKeepsTheBits) {
  const Tensor host = normal({37, 129}, 1, 3.0);
  for (DType d : kFloatDtypes) {
    SCOPED_TRACE(dtype_name(d));
    const Pair t = up(host, d);
    EXPECT_EQ(t.g.dtype(), d);
    EXPECT_EQ(t.g.storage_dtype(), d);  // the CUDA backend stores the dtype itself (2 bytes for bf16)
    EXPECT_EQ(t.g.nbytes(), static_cast<size_t>(37 * 129) * dtype_size(d));
    const Tensor g = gpu().download(t.g);
    EXPECT_TRUE(bit_exact(g, host.to(d)));
    EXPECT_TRUE(bit_exact(g, down_c(t)));
  }
  // A host tensor already in the dtype: its bytes as they are.
  const Tensor hb = host.to(kBF16);
  EXPECT_TRUE(bit_exact(gpu().download(gpu().upload(hb, kBF16)), hb));
  // Integers (routing metadata) and empty tensors.
  Tensor idx(DType::I64, {5});
  for (int64_t i = 0; i < 5; ++i) idx.set_int(i, (i * 7919) % 13 - 4);
  EXPECT_TRUE(bit_exact(gpu().download(gpu().upload(idx, DType::I64)), idx));
  const Tensor none(kF32, {0, 5});
  const Tensor back = gpu().download(gpu().upload(none, kBF16));
  EXPECT_EQ(back.shape(), (Shape{0, 5}));
  EXPECT_EQ(back.dtype(), kBF16);
  // zeros: +0 in every dtype.
  for (DType d : kFloatDtypes) EXPECT_TRUE(same(zeros(d, {3, 17}))) << dtype_name(d);
}

// Inputs for the casts: normal values plus RNE ties of bf16 and fp16, values
// beyond fp16's range, subnormals of every format, signed zeros, inf, NaN.
Tensor cast_inputs() {
  Tensor t = normal({1031}, 2, 3.0);
  const double specials[] = {1.0 + 0x1p-8,  1.0 + 3 * 0x1p-8, -(1.0 + 0x1p-8), 1.0 + 0x1p-11, 1.0 + 3 * 0x1p-11,
                             65504.0,       65519.0,          65520.0,         70000.0,       -1e6,
                             1e-6,          3e-8,             1e-40,           1e-300,        0.0,
                             -0.0,          kInf,             -kInf,           kNaN,          1.0 + 0x1p-8 + 0x1p-30,
                             3.0e38,        3.5e38,           0.1,             1.0 / 3.0,     -2.5e-5};
  for (size_t i = 0; i < std::size(specials); ++i) t.set(static_cast<int64_t>(i * 41), specials[i]);
  return t;
}

TEST_F(CudaDevice, CopyCastsEveryDtypePairBitExact) {
  const Tensor host = cast_inputs();
  for (DType s : kFloatDtypes) {
    for (DType d : kFloatDtypes) {
      SCOPED_TRACE(fmt::format("{} -> {}", dtype_name(s), dtype_name(d)));
      const Pair src = up(host, s);
      Pair dst = empty(d, {1031});
      gpu().copy(src.g, dst.g);
      cpu().copy(src.c, dst.c);
      EXPECT_TRUE(same(dst));
    }
  }
  // Views: a slice (a byte offset into the storage) copied into another shape.
  const Tensor m = normal({20, 33}, 3);
  for (DType d : {kF32, kBF16}) {
    const Pair src = up(m, kF32);
    Pair dst = empty(d, {3, 55});
    gpu().copy(src.g.slice0(7, 5), dst.g);
    cpu().copy(src.c.slice0(7, 5), dst.c);
    EXPECT_TRUE(same(dst)) << dtype_name(d);
  }
}

TEST_F(CudaDevice, CopyColsBitExact) {
  const int64_t rows = 50;
  const Tensor src_h = normal({rows, 3 * 64}, 4), dst_h = normal({rows, 2 * 64 + 3}, 5);
  for (auto [sd, dd] : {std::pair{kF32, kBF16}, std::pair{kBF16, kBF16}, std::pair{kF16, kF32}, std::pair{kF64, kF64}}) {
    SCOPED_TRACE(fmt::format("{} -> {}", dtype_name(sd), dtype_name(dd)));
    const Pair src = up(src_h, sd);
    Pair dst = up(dst_h, dd);  // the untouched columns must keep these values
    gpu().copy_cols(src.g, 64, dst.g, 33, 67);
    cpu().copy_cols(src.c, 64, dst.c, 33, 67);
    EXPECT_TRUE(same(dst));
    gpu().copy_cols(src.g, 0, dst.g, 0, 1);
    cpu().copy_cols(src.c, 0, dst.c, 0, 1);
    EXPECT_TRUE(same(dst));
  }
}

TEST_F(CudaDevice, FillRoundsOnceToTheDtypeBitExact) {
  const double fills[] = {0.0,   -0.0, 1.0 + 0x1p-9, 1.0 + 0x1p-8 + 0x1p-30, 1.0 / 3.0, 65520.0, 1e-8,
                          -1e30, kInf, kNaN,         -3.5,                   1e-45};
  for (DType d : kFloatDtypes) {
    for (double v : fills) {
      SCOPED_TRACE(fmt::format("{} fill {}", dtype_name(d), v));
      Pair t = up(normal({1000, 3}, 6), d);
      gpu().fill(t.g, v);
      cpu().fill(t.c, v);
      EXPECT_TRUE(same(t));
    }
  }
}

// ===========================================================================
// Element-wise math: bit-exact against the CPU backend.

TEST_F(CudaDevice, AxpbyBitExactWithAliasing) {
  struct Mix {
    DType a, b, out;
  };
  const Mix mixes[] = {{kF32, kF32, kF32},    {kF32, kF32, kBF16}, {kBF16, kBF16, kBF16},
                       {kF16, kF16, kF16},    {kBF16, kF32, kF32}, {kF64, kF64, kF64}};
  for (const int64_t n : {int64_t{70 * 601}, int64_t{(1 << 20) + 3}}) {
    const Tensor ha = normal({n}, 7, 2.0), hb = normal({n}, 8);
    for (const Mix& m : mixes) {
      for (auto [alpha, beta] : {std::pair{0.3f, -1.7f}, std::pair{1.0f, 1.0f}, std::pair{-2.0f, 0.0f}}) {
        SCOPED_TRACE(fmt::format("n {} {}*{} + {}*{} -> {}", n, alpha, dtype_name(m.a), beta, dtype_name(m.b),
                                 dtype_name(m.out)));
        const Pair a = up(ha, m.a), b = up(hb, m.b);
        Pair out = empty(m.out, {n});
        gpu().axpby(alpha, a.g, beta, b.g, out.g);
        cpu().axpby(alpha, a.c, beta, b.c, out.c);
        EXPECT_TRUE(same(out));
      }
    }
    // out aliases a, then b (the in-place updates of the optimizer-like paths).
    for (DType d : {kF32, kBF16, kF64}) {
      Pair a = up(ha, d), b = up(hb, d);
      gpu().axpby(0.5f, a.g, 2.0f, b.g, a.g);
      cpu().axpby(0.5f, a.c, 2.0f, b.c, a.c);
      EXPECT_TRUE(same(a)) << dtype_name(d) << " out = a";
      gpu().axpby(-1.0f, a.g, 0.25f, b.g, b.g);
      cpu().axpby(-1.0f, a.c, 0.25f, b.c, b.c);
      EXPECT_TRUE(same(b)) << dtype_name(d) << " out = b";
    }
  }
}

constexpr ActivationKind kKinds[] = {ActivationKind::kGelu,       ActivationKind::kSilu,
                                     ActivationKind::kRelu,       ActivationKind::kSquaredRelu,
                                     ActivationKind::kOpenaiGelu, ActivationKind::kErfGelu,
                                     ActivationKind::kQuickGelu,  ActivationKind::kBiasGeluTanh};

std::string kind_name(ActivationKind k) {
  constexpr const char* kNames[] = {"gelu",      "silu",     "relu",       "squared_relu",
                                    "openai_gelu", "erf_gelu", "quick_gelu", "bias_gelu_tanh"};
  return kNames[static_cast<int>(k)];
}

// x [T, w] for the activations: N(0, 2) with values that reach the clamps of
// fast_expf and the saturated branches (|x| up to 90).
Tensor act_inputs(int64_t rows, int64_t w, uint64_t seed) {
  Tensor x = normal({rows, w}, seed, 2.0);
  const double edge[] = {30.0, -30.0, 88.5, -88.5, 0.0, -0.0, 0.625, -0.625, 10.0, 0.9277, 1e-3, -90.0};
  for (size_t i = 0; i < std::size(edge); ++i) x.set(static_cast<int64_t>(i * 13 % (rows * w)), edge[i]);
  return x;
}

struct ActCase {
  ActivationKind kind;
  bool glu;
  bool fused;
  DType dtype;
};

void PrintTo(const ActCase& c, std::ostream* os) {
  *os << kind_name(c.kind) << (c.glu ? " glu" : "") << (c.fused ? " fused " : " unfused ") << dtype_name(c.dtype);
}

class BiasActBitExact : public CudaDevice, public ::testing::WithParamInterface<ActCase> {};

// bias_act_forward / bias_act_backward, with and without a bias, against the
// CPU backend bit for bit (F64 has its own test: double libm differs).
TEST_P(BiasActBitExact, ForwardAndBackward) {
  const ActCase p = GetParam();
  const int64_t rows = 33, f = 72, w = p.glu ? 2 * f : f;
  const Tensor hx = act_inputs(rows, w, 40), hbias = normal({w}, 41, 0.5), hdy = normal({rows, f}, 42);
  const ActivationArgs args{p.kind, p.glu, p.fused};
  for (bool with_bias : {true, false}) {
    SCOPED_TRACE(with_bias ? "bias" : "no bias");
    const Pair x = up(hx, p.dtype), bias = up(hbias, p.dtype), dy = up(hdy, p.dtype);
    Pair y = empty(p.dtype, {rows, f}), dx = empty(p.dtype, {rows, w});
    gpu().bias_act_forward(args, x.g, with_bias ? &bias.g : nullptr, y.g);
    cpu().bias_act_forward(args, x.c, with_bias ? &bias.c : nullptr, y.c);
    EXPECT_TRUE(same(y)) << "forward";
    gpu().bias_act_backward(args, x.g, with_bias ? &bias.g : nullptr, dy.g, dx.g);
    cpu().bias_act_backward(args, x.c, with_bias ? &bias.c : nullptr, dy.c, dx.c);
    EXPECT_TRUE(same(dx)) << "backward";
  }
}

std::vector<ActCase> act_cases() {
  std::vector<ActCase> v;
  for (ActivationKind k : kKinds)
    for (bool glu : {false, true})
      for (bool fused : {true, false})
        for (DType d : {kF32, kBF16, kF16}) v.push_back({k, glu, fused, d});
  return v;
}

INSTANTIATE_TEST_SUITE_P(All, BiasActBitExact, ::testing::ValuesIn(act_cases()),
                         [](const ::testing::TestParamInfo<ActCase>& i) {
                           return fmt::format("{}_{}_{}_{}", kind_name(i.param.kind), i.param.glu ? "glu" : "plain",
                                              i.param.fused ? "fused" : "unfused", dtype_name(i.param.dtype));
                         });

// F64: the activations go through double libm (exp, erf, tanh), whose device
// and host results may differ by a few ulp (CUDA: <= 2 ulp; glibc: < 1 ulp).
// The formulas amplify an ulp of an intermediate of size up to (1 + |z|)^3
// (the cubic of the tanh forms), times the gate and dy: bound 2^-44 (about
// 256 double ulps at 1) times those factors. relu and squared_relu (no libm)
// are compared bit for bit.
TEST_F(CudaDevice, BiasActF64WithinLibmBound) {
  const int64_t rows = 17, f = 40;
  for (ActivationKind kind : kKinds) {
    for (bool glu : {false, true}) {
      SCOPED_TRACE(fmt::format("{} {}", kind_name(kind), glu ? "glu" : "plain"));
      const int64_t w = glu ? 2 * f : f;
      const Tensor hx = act_inputs(rows, w, 43), hbias = normal({w}, 44, 0.5), hdy = normal({rows, f}, 45);
      const Pair x = up(hx, kF64), bias = up(hbias, kF64), dy = up(hdy, kF64);
      Pair y = empty(kF64, {rows, f}), dx = empty(kF64, {rows, w});
      const ActivationArgs args{kind, glu, true};
      gpu().bias_act_forward(args, x.g, &bias.g, y.g);
      cpu().bias_act_forward(args, x.c, &bias.c, y.c);
      gpu().bias_act_backward(args, x.g, &bias.g, dy.g, dx.g);
      cpu().bias_act_backward(args, x.c, &bias.c, dy.c, dx.c);
      if (kind == ActivationKind::kRelu || kind == ActivationKind::kSquaredRelu) {
        EXPECT_TRUE(same(y));
        EXPECT_TRUE(same(dx));
        continue;
      }
      const std::vector<double> xv = values(hx), bv = values(hbias), dyv = values(hdy);
      auto z = [&](int64_t r, int64_t c) { return xv[static_cast<size_t>(r * w + c)] + bv[static_cast<size_t>(c)]; };
      auto gate = [&](int64_t r, int64_t c) { return glu ? std::abs(z(r, f + c)) : 1.0; };
      auto factor = [&](int64_t r, int64_t c) { return std::pow(1.0 + std::abs(z(r, c)), 3.0); };
      EXPECT_TRUE(within(down_g(y), down_c(y), [&](int64_t i) {
        const int64_t r = i / f, c = i % f;
        return 0x1p-44 * factor(r, c) * (1.0 + gate(r, c));
      })) << "forward";
      EXPECT_TRUE(within(down_g(dx), down_c(dx), [&](int64_t i) {
        const int64_t r = i / w, c = (i % w) % f;  // a GLU gate column shares its partner's bound
        return 0x1p-44 * factor(r, c) * (1.0 + gate(r, c)) * (1.0 + std::abs(dyv[static_cast<size_t>(r * f + c)]));
      })) << "backward";
    }
  }
}

struct DropCase {
  DType dtype;
  DType residual;  // the residual stream's dtype
  double p;
};

void PrintTo(const DropCase& c, std::ostream* os) {
  *os << dtype_name(c.dtype) << " residual " << dtype_name(c.residual) << " p " << c.p;
}

class BiasDropoutAddBitExact : public CudaDevice, public ::testing::WithParamInterface<DropCase> {};

// out = residual + dropout(x + bias): the keep decision is the Philox draw of
// the global element, so both backends drop the same elements and produce the
// same bits; with and without bias and residual, shard offsets (row_offset,
// row_positions whose element indices cross 2^32), in place on the residual,
// and dropout_backward (also in place).
TEST_P(BiasDropoutAddBitExact, ForwardAndBackward) {
  const DropCase pc = GetParam();
  const int64_t rows = 40, h = 96;
  const Tensor hx = normal({rows, h}, 50), hb = normal({h}, 51), hr = normal({rows, h}, 52), hdy = normal({rows, h}, 53);
  DropoutArgs args;
  args.p = pc.p;
  args.key = rng_key(5, "dropout.decoder.layers.0.self_attention");
  std::vector<int64_t> positions(rows);
  for (int64_t i = 0; i < rows; ++i) positions[static_cast<size_t>(i)] = 107374182 - 20 + (i * 17) % rows;  // * 96 crosses 2^32
  for (int variant = 0; variant < 3; ++variant) {
    DropoutArgs a = args;
    if (variant == 1) a.row_offset = 4093;
    if (variant == 2) a.row_positions = positions;
    for (int with = 0; with < 4; ++with) {
      const bool with_bias = with & 1, with_residual = with & 2;
      SCOPED_TRACE(fmt::format("variant {} bias {} residual {}", variant, with_bias, with_residual));
      const Pair x = up(hx, pc.dtype), bias = up(hb, pc.dtype), res = up(hr, pc.residual);
      Pair out = empty(pc.dtype, {rows, h});
      gpu().bias_dropout_add(a, x.g, with_bias ? &bias.g : nullptr, with_residual ? &res.g : nullptr, out.g);
      cpu().bias_dropout_add(a, x.c, with_bias ? &bias.c : nullptr, with_residual ? &res.c : nullptr, out.c);
      EXPECT_TRUE(same(out)) << "forward";
    }
    // In place on the residual stream (out aliases residual; same dtype).
    const Pair x = up(hx, pc.dtype), bias = up(hb, pc.dtype);
    Pair stream = up(hr, pc.dtype);
    gpu().bias_dropout_add(a, x.g, &bias.g, &stream.g, stream.g);
    cpu().bias_dropout_add(a, x.c, &bias.c, &stream.c, stream.c);
    EXPECT_TRUE(same(stream)) << "in place";
    // Backward, out of place and in place.
    const Pair dout = up(hdy, pc.dtype);
    Pair dx = empty(pc.dtype, {rows, h});
    gpu().dropout_backward(a, dout.g, dx.g);
    cpu().dropout_backward(a, dout.c, dx.c);
    EXPECT_TRUE(same(dx)) << "backward";
    Pair g = up(hdy, pc.dtype);
    gpu().dropout_backward(a, g.g, g.g);
    cpu().dropout_backward(a, g.c, g.c);
    EXPECT_TRUE(same(g)) << "backward in place";
  }
  // A large tensor (grid-stride loops, vector paths): [1027, 1024].
  const Tensor bx = normal({1027, 1024}, 54), br = normal({1027, 1024}, 55), bb = normal({1024}, 56);
  const Pair x = up(bx, pc.dtype), bias = up(bb, pc.dtype), res = up(br, pc.residual);
  Pair out = empty(pc.dtype, {1027, 1024});
  gpu().bias_dropout_add(args, x.g, &bias.g, &res.g, out.g);
  cpu().bias_dropout_add(args, x.c, &bias.c, &res.c, out.c);
  EXPECT_TRUE(same(out)) << "large";
}

std::vector<DropCase> drop_cases() {
  std::vector<DropCase> v;
  for (double p : {0.0, 0.1, 0.5}) {
    v.push_back({kF32, kF32, p});
    v.push_back({kBF16, kBF16, p});
    v.push_back({kBF16, kF32, p});  // bf16 activations, fp32 residual stream
    v.push_back({kF16, kF16, p});
    v.push_back({kF64, kF64, p});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(All, BiasDropoutAddBitExact, ::testing::ValuesIn(drop_cases()),
                         [](const ::testing::TestParamInfo<DropCase>& i) {
                           return fmt::format("{}_residual_{}_p{}", dtype_name(i.param.dtype),
                                              dtype_name(i.param.residual), static_cast<int>(i.param.p * 100));
                         });

// RoPE, forward and backward (the transpose), interleaved or not, full and
// partial rotation, hn 64 and 40, in place. cos/sin are the fp32 cos/sin of
// the fp32 angles computed through double libm (optimized/math/rope.h): host
// and device double cos differ by at most an ulp of a double, so the fp32
// values can only differ for an angle whose cosine lies within 2^-53 of an
// fp32 rounding boundary (about one angle in 2^29); with fixed inputs the
// comparison is exact.
TEST_F(CudaDevice, RopeBitExact) {
  const int64_t s = 37, b = 2, heads = 3;
  for (const int64_t hn : {int64_t{64}, int64_t{40}}) {
    for (const bool interleaved : {false, true}) {
      for (const double percent : {1.0, 0.5}) {
        const int64_t rot = static_cast<int64_t>(static_cast<double>(hn) * percent) / 2 * 2;
        // Megatron's angles: position * base^(-2c / rot), positions from 4000 (large angles).
        Tensor freqs(kF32, {s, rot});
        for (int64_t i = 0; i < s; ++i) {
          for (int64_t c = 0; c < rot; ++c) {
            const double inv = std::pow(10000.0, -2.0 * static_cast<double>(c % (rot / 2)) / static_cast<double>(rot));
            freqs.set(i * rot + c, static_cast<double>(static_cast<float>(static_cast<double>(4000 + i) * inv)));
          }
        }
        const RopeArgs args{b, heads, hn, rot, interleaved};
        for (DType d : kFloatDtypes) {
          SCOPED_TRACE(fmt::format("hn {} rot {} interleaved {} {}", hn, rot, interleaved, dtype_name(d)));
          const Tensor hx = normal({s, b, heads, hn}, 60 + static_cast<uint64_t>(hn));
          const Pair x = up(hx, d), f = up(freqs, kF32);
          for (const bool backward : {false, true}) {
            Pair y = empty(d, {s, b, heads, hn});
            gpu().rope(args, x.g, f.g, y.g, backward);
            cpu().rope(args, x.c, f.c, y.c, backward);
            EXPECT_TRUE(same(y)) << (backward ? "backward" : "forward");
          }
          Pair inplace = up(hx, d);
          gpu().rope(args, inplace.g, f.g, inplace.g, false);
          cpu().rope(args, inplace.c, f.c, inplace.c, false);
          EXPECT_TRUE(same(inplace)) << "in place";
        }
      }
    }
  }
}

// fp8_fake_quant: q = fp8(RNE(x * scale)) saturating, out = q * (1 / scale)
// rounded once, for E4M3 and E5M2, several scales, inputs that saturate, tie,
// underflow, inf and NaN; out in x's dtype or fp32; in place.
TEST_F(CudaDevice, Fp8FakeQuantBitExact) {
  Tensor hx = normal({2053}, 70, 4.0);
  const double edge[] = {0.0,  -0.0, 448.0, 449.0, 464.0,   480.0,  1e6,   -1e6,   kInf, -kInf, kNaN,
                         0x1p-9, 0x1p-10, 3 * 0x1p-11, 3e-3, 57344.0, 61440.0, 1e-7, -0x1p-7, 240.0, 0.1};
  for (size_t i = 0; i < std::size(edge); ++i) hx.set(static_cast<int64_t>(i * 97), edge[i]);
  struct Mix {
    DType x, out;
  };
  for (const Mix m : {Mix{kF32, kF32}, Mix{kBF16, kBF16}, Mix{kBF16, kF32}, Mix{kF16, kF16}, Mix{kF64, kF64}}) {
    for (const bool e5m2 : {false, true}) {
      for (const float scale : {1.0f, 0.37f, 448.0f / 13.5f, 1024.0f, 1.0f / 3.0f}) {
        SCOPED_TRACE(fmt::format("{} -> {} {} scale {}", dtype_name(m.x), dtype_name(m.out), e5m2 ? "e5m2" : "e4m3",
                                 scale));
        const Pair x = up(hx, m.x);
        Pair out = empty(m.out, {2053});
        gpu().fp8_fake_quant(x.g, e5m2, scale, out.g);
        cpu().fp8_fake_quant(x.c, e5m2, scale, out.c);
        EXPECT_TRUE(same(out));
      }
    }
  }
  Pair inplace = up(hx, kBF16);
  gpu().fp8_fake_quant(inplace.g, false, 2.5f, inplace.g);
  cpu().fp8_fake_quant(inplace.c, false, 2.5f, inplace.c);
  EXPECT_TRUE(same(inplace)) << "in place";
}

// ===========================================================================
// Routing: gather, scatter-add, top-k.

TEST_F(CudaDevice, GatherRowsBitExact) {
  const int64_t rows = 100, h = 300;
  std::mt19937 gen(80);
  std::vector<int64_t> idx(257);
  for (int64_t& r : idx) r = static_cast<int64_t>(gen() % rows);
  idx[0] = rows - 1, idx[1] = 0, idx[2] = 0;  // both ends, a repeat
  const Tensor hx = normal({rows, h}, 81);
  for (auto [xd, od] : {std::pair{kF32, kF32}, std::pair{kBF16, kBF16}, std::pair{kF16, kF16}, std::pair{kF64, kF64},
                        std::pair{kF32, kBF16}}) {
    SCOPED_TRACE(fmt::format("{} -> {}", dtype_name(xd), dtype_name(od)));
    const Pair x = up(hx, xd);
    Pair out = empty(od, {257, h});
    gpu().gather_rows(x.g, idx, out.g);
    cpu().gather_rows(x.c, idx, out.c);
    EXPECT_TRUE(same(out));
    Pair none = empty(od, {0, h});
    gpu().gather_rows(x.g, std::span<const int64_t>(), none.g);  // an expert with no tokens
    EXPECT_EQ(down_g(none).numel(), 0);
  }
}

// Distinct destination rows: one addition per element, so one rounding.
TEST_F(CudaDevice, ScatterAddRowsToDistinctRowsBitExact) {
  const int64_t out_rows = 120, n = 100, h = 300;
  std::vector<int64_t> dst(out_rows);
  std::iota(dst.begin(), dst.end(), 0);
  std::shuffle(dst.begin(), dst.end(), std::mt19937(90));
  dst.resize(n);
  std::vector<float> w(n);
  std::mt19937 gen(91);
  for (float& x : w) x = std::uniform_real_distribution<float>(0.0f, 1.0f)(gen);
  const Tensor hy = normal({n, h}, 92), hout = normal({out_rows, h}, 93);
  for (auto [yd, od] : {std::pair{kBF16, kF32}, std::pair{kBF16, kBF16}, std::pair{kF32, kF32}, std::pair{kF16, kF16},
                        std::pair{kF64, kF64}}) {
    for (const bool weighted : {true, false}) {
      SCOPED_TRACE(fmt::format("{} -> {} {}", dtype_name(yd), dtype_name(od), weighted ? "weighted" : "unweighted"));
      const Pair y = up(hy, yd);
      Pair out = up(hout, od);  // scatter-add accumulates onto these
      const std::span<const float> ws = weighted ? std::span<const float>(w) : std::span<const float>();
      gpu().scatter_add_rows(y.g, dst, ws, out.g);
      cpu().scatter_add_rows(y.c, dst, ws, out.c);
      EXPECT_TRUE(same(out));
    }
  }
}

// Repeated destinations (the top-k combine): the additions into one element
// happen in any order. Each side adds m terms to out0, rounding to out's
// dtype after each addition (or once): within m u_out (|out0| + sum |w y|) of
// the exact sum (the products w y are the same fp32 values on both sides;
// fp32 accumulation adds m u32 of the same). Bound: twice that.
TEST_F(CudaDevice, ScatterAddRowsToRepeatedRowsWithinBound) {
  const int64_t tokens = 64, k = 4, h = 200;
  std::vector<int64_t> dst(tokens * k);
  std::vector<float> w(tokens * k);
  std::mt19937 gen(94);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      dst[static_cast<size_t>(j * tokens + t)] = t;  // expert-major order: a token's k rows far apart
      w[static_cast<size_t>(j * tokens + t)] = std::uniform_real_distribution<float>(0.0f, 1.0f)(gen);
    }
  }
  std::shuffle(dst.begin(), dst.end(), gen);
  const Tensor hy = normal({tokens * k, h}, 95), hout = normal({tokens, h}, 96, 0.1);
  for (auto [yd, od] : {std::pair{kBF16, kF32}, std::pair{kBF16, kBF16}, std::pair{kF32, kF32}}) {
    SCOPED_TRACE(fmt::format("{} -> {}", dtype_name(yd), dtype_name(od)));
    const Pair y = up(hy, yd);
    Pair out = up(hout, od);
    gpu().scatter_add_rows(y.g, dst, w, out.g);
    cpu().scatter_add_rows(y.c, dst, w, out.c);
    const std::vector<double> yv = values_as(hy, yd), o0 = values_as(hout, od);
    std::vector<double> mag(static_cast<size_t>(tokens * h));
    std::vector<int64_t> m(static_cast<size_t>(tokens), 0);
    for (size_t i = 0; i < mag.size(); ++i) mag[i] = std::abs(o0[i]);
    for (size_t i = 0; i < dst.size(); ++i) {
      ++m[static_cast<size_t>(dst[i])];
      for (int64_t c = 0; c < h; ++c) {
        mag[static_cast<size_t>(dst[i] * h + c)] += std::abs(static_cast<double>(w[i]) * yv[i * h + static_cast<size_t>(c)]);
      }
    }
    const double u = std::max(unit_roundoff(od), kU32);
    EXPECT_TRUE(within(down_g(out), down_c(out), [&](int64_t i) {
      const double mi = static_cast<double>(m[static_cast<size_t>(i / h)]);
      return 2.0 * (mi + 1.0) * (u + kU32) * mag[static_cast<size_t>(i)] + 2.0 * underflow(od);
    }));
  }
}

// router_topk against math::topk_row (torch.topk order: descending, ties by
// index, NaN first), with many ties and some NaN rows.
TEST_F(CudaDevice, RouterTopkMatchesTopkRow) {
  const int64_t tokens = 257, experts = 64;
  Tensor scores = normal({tokens, experts}, 100).to(kF32);
  auto sv = scores.data<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t e = 0; e < experts; ++e) {
      float& v = sv[static_cast<size_t>(t * experts + e)];
      if (t % 2 == 0) v = std::round(v * 2.0f) / 2.0f;  // ties
      if (t % 3 == 0) v = 0.25f;                        // a row of equal values
      if (t % 17 == 5 && e % 9 == 4) v = std::numeric_limits<float>::quiet_NaN();
    }
  }
  const DTensor ds = gpu().upload(scores, kF32);
  for (const int64_t k : {int64_t{1}, int64_t{2}, int64_t{6}, experts}) {
    SCOPED_TRACE("k = " + std::to_string(k));
    DTensor idx = gpu().empty(DType::I64, {tokens, k});
    gpu().router_topk(ds, k, idx);
    Tensor want(DType::I64, {tokens, k});
    std::vector<int64_t> row(static_cast<size_t>(k));
    for (int64_t t = 0; t < tokens; ++t) {
      math::topk_row(sv.data() + t * experts, experts, k, row.data());
      for (int64_t j = 0; j < k; ++j) want.set_int(t * k + j, row[static_cast<size_t>(j)]);
    }
    EXPECT_TRUE(bit_exact(gpu().download(idx), want));
  }
}

// ===========================================================================
// Reductions.

// amax: max |x| over fp32-rounded elements, NaN ignored: exact (a max does not
// depend on the order). amax_to gives the same value in a device scalar.
TEST_F(CudaDevice, AmaxExactAndAmaxToAgrees) {
  for (const int64_t n : {int64_t{1}, int64_t{1000}, int64_t{(1 << 20) + 77}}) {
    Tensor hx = normal({n}, 110, 3.0);
    if (n > 10) {
      hx.set(n / 3, -17.25);  // the max, negative
      hx.set(n / 2, kNaN);
      hx.set(n - 1, kNaN);
    }
    for (DType d : kFloatDtypes) {
      SCOPED_TRACE(fmt::format("n {} {}", n, dtype_name(d)));
      const Pair x = up(hx, d);
      const double g = gpu().amax(x.g);
      EXPECT_EQ(g, cpu().amax(x.c));
      DTensor s = gpu().zeros(kF32, {1});
      gpu().amax_to(x.g, s);
      EXPECT_EQ(gpu().download(s).get(0), g);
    }
  }
  auto amax_of = [&](std::vector<double> v, DType d) {
    Tensor t(kF64, {static_cast<int64_t>(v.size())});
    for (size_t i = 0; i < v.size(); ++i) t.set(static_cast<int64_t>(i), v[i]);
    const Pair x = up(t, d);
    const double g = gpu().amax(x.g);
    EXPECT_EQ(g, cpu().amax(x.c)) << dtype_name(d);
    return g;
  };
  EXPECT_EQ(amax_of({kNaN, kNaN}, kF32), 0.0);
  EXPECT_EQ(amax_of({1.0, -kInf, kNaN}, kBF16), kInf);
  EXPECT_EQ(amax_of({1.0 + 0x1p-40}, kF64), 1.0);  // an F64 element is rounded to fp32 first
  EXPECT_EQ(gpu().amax(gpu().empty(kF32, {0, 4})), 0.0);
}

// sum: fp32 (double for F64) accumulation in any order, bound sum_bound.
TEST_F(CudaDevice, SumWithinReductionBound) {
  for (const int64_t n : {int64_t{1}, int64_t{1000}, int64_t{70 * 601}, int64_t{(1 << 22) + 7}}) {
    const Tensor hx = normal({n}, 120, 2.0, 0.3);
    for (DType d : kFloatDtypes) {
      SCOPED_TRACE(fmt::format("n {} {}", n, dtype_name(d)));
      const Pair x = up(hx, d);
      const std::vector<double> v = values_as(hx, d);
      double exact = 0.0, abs_sum = 0.0;
      for (double e : v) exact += e, abs_sum += std::abs(e);
      const double g = gpu().sum(x.g), c = cpu().sum(x.c);
      EXPECT_LE(std::abs(g - c), sum_bound(n, abs_sum, compute_u(d)) + 1e-300) << "gpu " << g << " cpu " << c;
      EXPECT_LE(std::abs(g - exact), sum_bound(n, abs_sum, compute_u(d)) + 1e-300) << "gpu " << g << " exact " << exact;
    }
  }
  EXPECT_EQ(gpu().sum(gpu().empty(kF32, {0})), 0.0);
}

// bias_grad: column sums of dy [T, n], the contribution rounded to dy's dtype
// (Megatron's bias gradient in the param dtype) and added to the fp32 main
// grad. Bound: sum_bound over T, then the two roundings.
TEST_F(CudaDevice, BiasGradWithinBound) {
  const int64_t rows = 333, n = 257;
  const Tensor hdy = normal({rows, n}, 130), hdb0 = normal({n}, 131);
  for (DType d : kFloatDtypes) {
    SCOPED_TRACE(dtype_name(d));
    const DType acc = d == kF64 ? kF64 : kF32;
    const std::vector<double> dy = values_as(hdy, d);
    std::vector<double> col(static_cast<size_t>(n), 0.0), mag(static_cast<size_t>(n), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < n; ++c) {
        col[static_cast<size_t>(c)] += dy[static_cast<size_t>(r * n + c)];
        mag[static_cast<size_t>(c)] += std::abs(dy[static_cast<size_t>(r * n + c)]);
      }
    }
    for (const bool accumulate : {false, true}) {
      const Pair x = up(hdy, d);
      Pair db = up(hdb0, acc);
      if (!accumulate) {  // overwritten: NaN before must not survive
        gpu().fill(db.g, kNaN);
        cpu().fill(db.c, kNaN);
      }
      gpu().bias_grad(x.g, db.g, accumulate);
      cpu().bias_grad(x.c, db.c, accumulate);
      const std::vector<double> db0 = values_as(hdb0, acc);
      EXPECT_TRUE(within(down_g(db), down_c(db), [&](int64_t c) {
        const size_t j = static_cast<size_t>(c);
        const double contribution = rounded(sum_bound(rows, mag[j], compute_u(d)), col[j], d);
        return rounded(contribution, (accumulate ? db0[j] : 0.0) + col[j], acc);
      })) << (accumulate ? "accumulate" : "overwrite");
    }
  }
}

// softmax_rows: exp (fast_expf on both sides, or the device's expf: <= 2 ulp
// apart), the row sum (sum_bound over n), the normalisation (2 ulp): delta =
// (12 + 4 sqrt(n) + 4) u y, then rounding to y's dtype.
TEST_F(CudaDevice, SoftmaxRowsWithinBound) {
  const int64_t rows = 37;
  struct Mix {
    DType x, y;
  };
  for (const int64_t n : {int64_t{8}, int64_t{64}, int64_t{1000}, int64_t{5000}}) {
    Tensor hx = normal({rows, n}, 140 + static_cast<uint64_t>(n), 3.0);
    for (int64_t c = 0; c < n; ++c) {
      hx.set(3 * n + c, 80.0 + static_cast<double>(c % 7));  // large logits: the max shift matters
      hx.set(5 * n + c, -2.5);                              // a constant row: uniform
    }
    for (const Mix m : {Mix{kF32, kF32}, Mix{kBF16, kF32}, Mix{kBF16, kBF16}, Mix{kF64, kF64}}) {
      SCOPED_TRACE(fmt::format("n {} {} -> {}", n, dtype_name(m.x), dtype_name(m.y)));
      const Pair x = up(hx, m.x);
      Pair y = empty(m.y, {rows, n});
      gpu().softmax_rows(x.g, y.g);
      cpu().softmax_rows(x.c, y.c);
      const Tensor want = down_c(y);
      const double u = compute_u(m.x);
      EXPECT_TRUE(within(down_g(y), want, [&](int64_t i) {
        const double delta = (16.0 + 4.0 * std::sqrt(static_cast<double>(n))) * u * std::abs(want.get(i));
        return rounded(delta, want.get(i), m.y);
      }));
    }
  }
}

// ---------------------------------------------------------------------------
// Norms.

struct NormCase {
  bool rms;
  bool zero_centered;
  bool te;
  DType dtype;
  int64_t h;
};

void PrintTo(const NormCase& c, std::ostream* os) {
  *os << (c.rms ? "RMSNorm" : "LayerNorm") << (c.zero_centered ? " zero-centered" : "") << (c.te ? " te " : " apex ")
      << dtype_name(c.dtype) << " h " << c.h;
}

class NormWithinBound : public CudaDevice, public ::testing::WithParamInterface<NormCase> {};

// norm_forward / norm_backward against the CPU backend. The CPU sums the row
// statistics in double; the device may sum in fp32 in any order.
//   mean: delta = sum_bound(h) mean|x|;
//   rstd: relative delta_r = (4 sqrt(h) + 8) u kappa, kappa = (mean x^2) / var
//         (cancellation when var is formed as E[x^2] - mean^2; 1 for RMSNorm);
//   y:    |gamma| rstd (delta_mean + |x - mean| delta_r) + 6 u (|xhat gamma| + |beta|),
//         then rounding to y's dtype.
// The backward gets the same mean and rstd on both sides (the CPU's), so
// only its own reductions differ: mean(g) and mean(g xhat) over h (sum_bound),
// dgamma / dbeta over T (sum_bound), each contribution rounded to gamma's
// dtype and added to the fp32 main grad (two roundings).
TEST_P(NormWithinBound, ForwardBackward) {
  const NormCase nc = GetParam();
  const int64_t rows = 37, h = nc.h;
  const DType d = nc.dtype, stat = d == kF64 ? kF64 : kF32, acc = d == kF64 ? kF64 : kF32;
  const double u = compute_u(d);
  NormArgs args;
  args.rms = nc.rms;
  args.eps = 1e-5;
  args.zero_centered_gamma = nc.zero_centered;
  args.te_kernel = nc.te;
  Tensor hx = normal({rows, h}, 150, 2.0, 0.5);
  for (int64_t c = 0; c < h; ++c) hx.set(7 * h + c, 1e-3 * static_cast<double>(c % 5));  // a near-constant row
  const Tensor hg = nc.zero_centered ? normal({h}, 151, 0.01) : normal({h}, 151, 0.3, 1.0);
  const Tensor hb = normal({h}, 152), hdy = normal({rows, h}, 153), hdg0 = normal({h}, 154), hdb0 = normal({h}, 155);

  const Pair x = up(hx, d), gamma = up(hg, d), beta = up(hb, d);
  Pair y = empty(d, {rows, h}), mean = empty(stat, {rows}), rstd = empty(stat, {rows});
  gpu().norm_forward(args, x.g, gamma.g, nc.rms ? nullptr : &beta.g, y.g, mean.g, rstd.g);
  cpu().norm_forward(args, x.c, gamma.c, nc.rms ? nullptr : &beta.c, y.c, mean.c, rstd.c);

  const std::vector<double> xv = values_as(hx, d), gv = values_as(hg, d), bv = values_as(hb, d);
  const Tensor cmean = down_c(mean), crstd = down_c(rstd);
  std::vector<double> dmean(static_cast<size_t>(rows)), drel(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0, s2 = 0, a = 0;
    for (int64_t c = 0; c < h; ++c) {
      const double v = xv[static_cast<size_t>(r * h + c)];
      s += v, s2 += v * v, a += std::abs(v);
    }
    const double mu = s / static_cast<double>(h), var = s2 / static_cast<double>(h) - (nc.rms ? 0.0 : mu * mu);
    const double kappa = nc.rms ? 1.0 : (s2 / static_cast<double>(h)) / (var + args.eps);
    dmean[static_cast<size_t>(r)] = sum_bound(h, a / static_cast<double>(h), u);
    drel[static_cast<size_t>(r)] = (4.0 * std::sqrt(static_cast<double>(h)) + 8.0) * u * kappa;
  }
  auto gamma_abs = [&](int64_t c) { return std::abs(gv[static_cast<size_t>(c)]) + (nc.zero_centered ? 1.0 : 0.0); };
  if (!nc.rms) {
    EXPECT_TRUE(within(down_g(mean), cmean,
                       [&](int64_t r) { return rounded(dmean[static_cast<size_t>(r)], cmean.get(r), stat); }))
        << "mean";
  }
  EXPECT_TRUE(within(down_g(rstd), crstd, [&](int64_t r) {
    return rounded(drel[static_cast<size_t>(r)] * crstd.get(r), crstd.get(r), stat);
  })) << "rstd";
  const Tensor cy = down_c(y);
  EXPECT_TRUE(within(down_g(y), cy, [&](int64_t i) {
    const int64_t r = i / h, c = i % h;
    const double rs = crstd.get(r), mu = nc.rms ? 0.0 : cmean.get(r);
    const double xc = std::abs(xv[static_cast<size_t>(i)] - mu);
    const double delta = gamma_abs(c) * rs * (dmean[static_cast<size_t>(r)] + xc * drel[static_cast<size_t>(r)]) +
                         6.0 * u * (xc * rs * gamma_abs(c) + (nc.rms ? 0.0 : std::abs(bv[static_cast<size_t>(c)])));
    return rounded(delta, cy.get(i), d);
  })) << "y";

  // Backward with the CPU's statistics on both sides.
  const DTensor gmean = gpu().upload(cmean, stat), grstd = gpu().upload(crstd, stat);
  const Pair dy = up(hdy, d);
  Pair dx = empty(d, {rows, h}), dgamma = up(hdg0, acc), dbeta = up(hdb0, acc);
  gpu().norm_backward(args, x.g, gamma.g, gmean, grstd, dy.g, dx.g, dgamma.g, nc.rms ? nullptr : &dbeta.g);
  cpu().norm_backward(args, x.c, gamma.c, mean.c, rstd.c, dy.c, dx.c, dgamma.c, nc.rms ? nullptr : &dbeta.c);

  const std::vector<double> dyv = values_as(hdy, d);
  std::vector<double> xhat(static_cast<size_t>(rows * h)), dmg(static_cast<size_t>(rows)), dmgx(static_cast<size_t>(rows)),
      mg(static_cast<size_t>(rows)), mgx(static_cast<size_t>(rows));
  std::vector<double> cg(static_cast<size_t>(h), 0), cg_abs(static_cast<size_t>(h), 0), cb(static_cast<size_t>(h), 0),
      cb_abs(static_cast<size_t>(h), 0);
  for (int64_t r = 0; r < rows; ++r) {
    const double rs = crstd.get(r), mu = nc.rms ? 0.0 : cmean.get(r);
    double sg = 0, sgx = 0, ag = 0, agx = 0;
    for (int64_t c = 0; c < h; ++c) {
      const size_t i = static_cast<size_t>(r * h + c);
      xhat[i] = (xv[i] - mu) * rs;
      const double g = dyv[i] * (gv[static_cast<size_t>(c)] + (nc.zero_centered ? 1.0 : 0.0));
      sg += g, sgx += g * xhat[i], ag += std::abs(g), agx += std::abs(g * xhat[i]);
      cg[static_cast<size_t>(c)] += dyv[i] * xhat[i];
      cg_abs[static_cast<size_t>(c)] += std::abs(dyv[i] * xhat[i]);
      cb[static_cast<size_t>(c)] += dyv[i];
      cb_abs[static_cast<size_t>(c)] += std::abs(dyv[i]);
    }
    const double hd = static_cast<double>(h);
    mg[static_cast<size_t>(r)] = nc.rms ? 0.0 : sg / hd;
    mgx[static_cast<size_t>(r)] = sgx / hd;
    dmg[static_cast<size_t>(r)] = nc.rms ? 0.0 : sum_bound(h, ag / hd, u);
    dmgx[static_cast<size_t>(r)] = sum_bound(h, agx / hd, u) + 4.0 * u * agx / hd;
  }
  const Tensor cdx = down_c(dx);
  EXPECT_TRUE(within(down_g(dx), cdx, [&](int64_t i) {
    const int64_t r = i / h, c = i % h;
    const size_t ri = static_cast<size_t>(r), ii = static_cast<size_t>(i);
    const double rs = crstd.get(r), g = std::abs(dyv[ii]) * gamma_abs(c);
    const double delta = rs * (dmg[ri] + std::abs(xhat[ii]) * dmgx[ri]) +
                         8.0 * u * rs * (g + std::abs(mg[ri]) + std::abs(xhat[ii] * mgx[ri]));
    return rounded(delta, cdx.get(i), d);
  })) << "dx";
  const std::vector<double> g0 = values_as(hdg0, acc), b0 = values_as(hdb0, acc);
  EXPECT_TRUE(within(down_g(dgamma), down_c(dgamma), [&](int64_t c) {
    const size_t j = static_cast<size_t>(c);
    const double contribution = rounded(sum_bound(rows, cg_abs[j], u) + 4.0 * u * cg_abs[j], cg[j], d);
    return rounded(contribution, g0[j] + cg[j], acc);
  })) << "dgamma";
  if (!nc.rms) {
    EXPECT_TRUE(within(down_g(dbeta), down_c(dbeta), [&](int64_t c) {
      const size_t j = static_cast<size_t>(c);
      return rounded(rounded(sum_bound(rows, cb_abs[j], u), cb[j], d), b0[j] + cb[j], acc);
    })) << "dbeta";
  }
}

std::vector<NormCase> norm_cases() {
  std::vector<NormCase> v;
  for (DType d : kFloatDtypes) {
    v.push_back({false, false, false, d, 1000});  // LayerNorm (Apex)
    v.push_back({false, true, false, d, 1000});   // zero-centered gamma, Apex: 1 + w rounded to w's dtype
    v.push_back({false, true, true, d, 1000});    // zero-centered gamma, TE: 1 + w in fp32
    v.push_back({true, false, true, d, 1000});    // RMSNorm (TE)
    v.push_back({true, true, true, d, 1000});
  }
  v.push_back({false, false, false, kBF16, 8192});  // wide rows
  v.push_back({true, false, true, kBF16, 8192});
  v.push_back({false, false, false, kF32, 48});    // narrow rows
  return v;
}

INSTANTIATE_TEST_SUITE_P(All, NormWithinBound, ::testing::ValuesIn(norm_cases()),
                         [](const ::testing::TestParamInfo<NormCase>& i) {
                           const NormCase& c = i.param;
                           return fmt::format("{}{}{}_{}_h{}", c.rms ? "rms" : "layer", c.zero_centered ? "_zc" : "",
                                              c.te ? "_te" : "_apex", dtype_name(c.dtype), c.h);
                         });

// ===========================================================================
// GEMMs against a float64 host product.
//
// Every output element is an fp32 (fp64) accumulation of K products of
// values of the dtype (exact in fp32 for bf16/fp16 operands) plus an fp32
// epilogue (alpha, beta c, bias): delta = 4 u_acc sqrt(K) alpha sum_k |a b|
// + 2 u_acc (|alpha a b| + |beta c| + |bias|), then rounding to c's dtype.
// The constant 4 also covers the truncating accumulation of tensor cores
// (biased, about 0.1 of the bound for random operands). TF32 inputs (a 2^-11
// relative error per product) would exceed it for fp32: the contract is fp32.

// op(x) [rows, cols] of a row-major host matrix (values), transposed when t.
struct HostMat {
  std::vector<double> v;
  int64_t rows, cols;  // of the stored matrix
  bool t;
  double operator()(int64_t i, int64_t j) const {
    return t ? v[static_cast<size_t>(j * cols + i)] : v[static_cast<size_t>(i * cols + j)];
  }
};

struct Exact {
  std::vector<double> value, bound_delta;  // [M, N]
};

// alpha op(a) op(b) + beta c0 (+ bias) in float64, with the accumulation
// delta above (u_acc the accumulator's unit roundoff).
Exact exact_gemm(const HostMat& a, const HostMat& b, int64_t m, int64_t n, int64_t k, double alpha, double beta,
                 const std::vector<double>* c0, const std::vector<double>* bias, double u_acc) {
  Exact e{std::vector<double>(static_cast<size_t>(m * n)), std::vector<double>(static_cast<size_t>(m * n))};
  const double sk = std::sqrt(static_cast<double>(std::max<int64_t>(k, 1)));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0, sa = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double x = a(i, p) * b(p, j);
        s += x, sa += std::abs(x);
      }
      const size_t o = static_cast<size_t>(i * n + j);
      const double cterm = c0 ? beta * (*c0)[o] : 0.0, bterm = bias ? (*bias)[static_cast<size_t>(j)] : 0.0;
      e.value[o] = alpha * s + cterm + bterm;
      e.bound_delta[o] = 4.0 * u_acc * sk * std::abs(alpha) * sa +
                         2.0 * u_acc * (std::abs(alpha * s) + std::abs(cterm) + std::abs(bterm));
    }
  }
  return e;
}

Tensor as_tensor(const std::vector<double>& v, const Shape& shape) {
  Tensor t(kF64, shape);
  std::copy(v.begin(), v.end(), t.data<double>().begin());
  return t;
}

struct GemmCase {
  DType dtype;
  bool ta, tb;
};

void PrintTo(const GemmCase& c, std::ostream* os) {
  *os << dtype_name(c.dtype) << (c.ta ? " a^T" : " a") << (c.tb ? " b^T" : " b");
}

class GemmWithinBound : public CudaDevice, public ::testing::WithParamInterface<GemmCase> {};

TEST_P(GemmWithinBound, AllTransposesBiasAlphaBeta) {
  const GemmCase gc = GetParam();
  const DType d = gc.dtype;
  const double u_acc = compute_u(d);
  for (const auto& [m, n, k] : {std::array<int64_t, 3>{67, 129, 320}, std::array<int64_t, 3>{8, 12, 1000},
                                std::array<int64_t, 3>{256, 256, 64}}) {
    SCOPED_TRACE(fmt::format("m {} n {} k {}", m, n, k));
    const Tensor ha = normal(gc.ta ? Shape{k, m} : Shape{m, k}, 200), hb = normal(gc.tb ? Shape{n, k} : Shape{k, n}, 201);
    const Tensor hbias = normal({n}, 202), hc0 = normal({m, n}, 203);
    const HostMat am{values_as(ha, d), ha.shape()[0], ha.shape()[1], gc.ta};
    const HostMat bm{values_as(hb, d), hb.shape()[0], hb.shape()[1], gc.tb};
    const std::vector<double> biasv = values_as(hbias, d), c0v = values_as(hc0, d);
    const DTensor a = gpu().upload(ha, d), b = gpu().upload(hb, d), bias = gpu().upload(hbias, d);
    struct Variant {
      float alpha, beta;
      bool with_bias;
    };
    for (const Variant var : {Variant{1.0f, 0.0f, false}, Variant{1.0f, 0.0f, true}, Variant{0.75f, 0.0f, true},
                              Variant{-1.5f, 1.0f, false}, Variant{0.5f, 0.25f, true}}) {
      SCOPED_TRACE(fmt::format("alpha {} beta {} bias {}", var.alpha, var.beta, var.with_bias));
      DTensor c = gpu().upload(hc0, d);
      gpu().gemm(a, gc.ta, b, gc.tb, c, var.alpha, var.beta, var.with_bias ? &bias : nullptr);
      const Exact e = exact_gemm(am, bm, m, n, k, var.alpha, var.beta, var.beta != 0 ? &c0v : nullptr,
                                 var.with_bias ? &biasv : nullptr, u_acc);
      EXPECT_TRUE(within(gpu().download(c), as_tensor(e.value, {m, n}), [&](int64_t i) {
        return rounded(e.bound_delta[static_cast<size_t>(i)], e.value[static_cast<size_t>(i)], d);
      }));
    }
  }
}

std::vector<GemmCase> gemm_cases() {
  std::vector<GemmCase> v;
  for (DType d : kFloatDtypes)
    for (bool ta : {false, true})
      for (bool tb : {false, true}) v.push_back({d, ta, tb});
  return v;
}

INSTANTIATE_TEST_SUITE_P(All, GemmWithinBound, ::testing::ValuesIn(gemm_cases()),
                         [](const ::testing::TestParamInfo<GemmCase>& i) {
                           return fmt::format("{}_{}{}", dtype_name(i.param.dtype), i.param.ta ? "T" : "N",
                                              i.param.tb ? "T" : "N");
                         });

// wgrad into an fp32 main grad: bf16 / fp16 operands, F32 c, beta = 1
// (gradient_accumulation_fusion), dW [out, in] += dy^T x.
TEST_F(CudaDevice, GemmHalfOperandsAccumulateIntoFp32MainGrad) {
  const int64_t tokens = 300, in = 96, out = 80;
  for (DType d : {kBF16, kF16}) {
    SCOPED_TRACE(dtype_name(d));
    const Tensor hdy = normal({tokens, out}, 210), hx = normal({tokens, in}, 211), hg0 = normal({out, in}, 212);
    const DTensor dy = gpu().upload(hdy, d), x = gpu().upload(hx, d);
    DTensor main_grad = gpu().upload(hg0, kF32);
    gpu().gemm(dy, true, x, false, main_grad, 1.0f, 1.0f);
    const std::vector<double> g0 = values_as(hg0, kF32);
    const Exact e = exact_gemm({values_as(hdy, d), tokens, out, true}, {values_as(hx, d), tokens, in, false}, out, in,
                               tokens, 1.0, 1.0, &g0, nullptr, kU32);
    EXPECT_TRUE(within(gpu().download(main_grad), as_tensor(e.value, {out, in}), [&](int64_t i) {
      return rounded(e.bound_delta[static_cast<size_t>(i)], e.value[static_cast<size_t>(i)], kF32);
    }));
  }
}

// Degenerate shapes the MoE path produces: an expert with no tokens (M = 0:
// nothing to write; K = 0 in its wgrad: c = beta c, + bias).
TEST_F(CudaDevice, GemmEmptyDimensions) {
  const DTensor a0 = gpu().zeros(kBF16, {0, 64}), b = gpu().upload(normal({64, 32}, 220), kBF16);
  DTensor c0 = gpu().empty(kBF16, {0, 32});
  gpu().gemm(a0, false, b, false, c0);
  EXPECT_EQ(gpu().download(c0).numel(), 0);
  const DTensor dy = gpu().zeros(kBF16, {0, 16}), x = gpu().zeros(kBF16, {0, 24});
  const Tensor hg = normal({16, 24}, 221);
  DTensor g = gpu().upload(hg, kF32);
  gpu().gemm(dy, true, x, false, g, 1.0f, 1.0f);
  EXPECT_TRUE(bit_exact(gpu().download(g), hg.to(kF32))) << "K = 0, beta = 1: c unchanged";
  gpu().gemm(dy, true, x, false, g, 1.0f, 0.0f);
  EXPECT_TRUE(within(gpu().download(g), Tensor(kF32, {16, 24}), [](int64_t) { return 0.0; }))
      << "K = 0, beta = 0: c = 0 (either sign)";
}

// ---------------------------------------------------------------------------
// gemm_lt: cuBLASLt epilogues on the Linear layouts (bf16 operands and output).

double gelu_tanh(double z) {
  const double c = std::sqrt(2.0 / M_PI);
  return 0.5 * z * (1.0 + std::tanh(c * (z + 0.044715 * z * z * z)));
}
double gelu_tanh_grad(double z) {
  const double c = std::sqrt(2.0 / M_PI), t = std::tanh(c * (z + 0.044715 * z * z * z));
  return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z);
}

// kNone, kBias, kGelu, kBiasGelu, kBiasGeluAux on the fprop layout y = x W^T
// (trans_b), kDGelu on the dgrad layout dx = dy W, kBGradB on the wgrad
// layout dW = dy^T x (bias_grad[m] = sum_k op(a)[m, k]). cuBLASLt's GELU is the tanh
// form, computed with its own tanh: besides the GEMM delta, 2^-10 (|z| + 1)
// for the activation and 2^-9 (1 + |aux|) |AB| for its derivative.
TEST_F(CudaDevice, GemmLtEpiloguesMatchHostMath) {
  const int64_t m = 64, n = 96, k = 256;
  const Tensor hx = normal({m, k}, 230), hw = normal({n, k}, 231), hbias = normal({n}, 232),
               haux = normal({m, n}, 233, 1.5);
  const std::vector<double> biasv = values_as(hbias, kBF16), auxv = values_as(haux, kBF16);
  const DTensor x = gpu().upload(hx, kBF16), w = gpu().upload(hw, kBF16), bias = gpu().upload(hbias, kBF16);
  const Exact ab = exact_gemm({values_as(hx, kBF16), m, k, false}, {values_as(hw, kBF16), n, k, true}, m, n, k, 1.0,
                              0.0, nullptr, nullptr, kU32);
  auto z = [&](size_t i) { return ab.value[i] + biasv[i % static_cast<size_t>(n)]; };
  auto dz = [&](size_t i) { return ab.bound_delta[i] + 2.0 * kU32 * std::abs(z(i)); };

  for (const Epilogue ep : {Epilogue::kNone, Epilogue::kBias, Epilogue::kGelu, Epilogue::kBiasGelu,
                            Epilogue::kBiasGeluAux, Epilogue::kDGelu}) {
    SCOPED_TRACE("epilogue " + std::to_string(static_cast<int>(ep)));
    const bool has_bias = ep == Epilogue::kBias || ep == Epilogue::kBiasGelu || ep == Epilogue::kBiasGeluAux;
    DTensor d = gpu().empty(kBF16, {m, n});
    DTensor aux = ep == Epilogue::kDGelu ? gpu().upload(haux, kBF16) : gpu().empty(kBF16, {m, n});
    GemmLtArgs args;
    args.a = &x;
    args.b = &w;
    args.trans_b = true;
    args.d = &d;
    args.epilogue = ep;
    args.bias = has_bias ? &bias : nullptr;
    args.aux = (ep == Epilogue::kBiasGeluAux || ep == Epilogue::kDGelu) ? &aux : nullptr;
    gpu().gemm_lt(args);
    std::vector<double> want(static_cast<size_t>(m * n)), delta(want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      const double pre = has_bias ? z(i) : ab.value[i], dpre = has_bias ? dz(i) : ab.bound_delta[i];
      switch (ep) {
        case Epilogue::kNone:
        case Epilogue::kBias: want[i] = pre, delta[i] = dpre; break;
        case Epilogue::kGelu:
        case Epilogue::kBiasGelu:
        case Epilogue::kBiasGeluAux:
          want[i] = gelu_tanh(pre), delta[i] = 1.13 * dpre + 0x1p-10 * (std::abs(pre) + 1.0);
          break;
        case Epilogue::kDGelu:
          want[i] = ab.value[i] * gelu_tanh_grad(auxv[i]);
          delta[i] = 1.13 * ab.bound_delta[i] + 0x1p-9 * (1.0 + std::abs(auxv[i])) * std::abs(ab.value[i]);
          break;
        default: break;
      }
    }
    EXPECT_TRUE(within(gpu().download(d), as_tensor(want, {m, n}), [&](int64_t i) {
      return rounded(delta[static_cast<size_t>(i)], want[static_cast<size_t>(i)], kBF16);
    })) << "d";
    if (ep == Epilogue::kBiasGeluAux) {
      const Tensor got_aux = gpu().download(aux);
      std::vector<double> zv(ab.value.size());
      for (size_t i = 0; i < zv.size(); ++i) zv[i] = z(i);
      EXPECT_TRUE(within(got_aux, as_tensor(zv, {m, n}),
                         [&](int64_t i) { return rounded(dz(static_cast<size_t>(i)), zv[static_cast<size_t>(i)], kBF16); }))
          << "aux = the pre-activation";
    }
  }

  // kBGradB on the wgrad layout Megatron and TE use: dW [out, in] = dy^T x
  // (a = dy transposed), bias_grad [out] = the column sums of dy, i.e. the
  // sums of op(a) over K.
  const int64_t tokens = 200, in = 48, out = 72;
  const Tensor hxa = normal({tokens, in}, 234), hdy = normal({tokens, out}, 235);
  const DTensor xa = gpu().upload(hxa, kBF16), dy = gpu().upload(hdy, kBF16);
  DTensor d = gpu().empty(kBF16, {out, in});
  DTensor bgrad = gpu().empty(kBF16, {out});
  gpu().fill(bgrad, 1e30);  // written, not accumulated
  GemmLtArgs args;
  args.a = &dy;
  args.trans_a = true;
  args.b = &xa;
  args.d = &d;
  args.epilogue = Epilogue::kBGradB;
  args.bias_grad = &bgrad;
  gpu().gemm_lt(args);
  const std::vector<double> dyv = values_as(hdy, kBF16);
  const Exact e = exact_gemm({dyv, tokens, out, true}, {values_as(hxa, kBF16), tokens, in, false}, out, in, tokens, 1.0,
                             0.0, nullptr, nullptr, kU32);
  EXPECT_TRUE(within(gpu().download(d), as_tensor(e.value, {out, in}), [&](int64_t i) {
    return rounded(e.bound_delta[static_cast<size_t>(i)], e.value[static_cast<size_t>(i)], kBF16);
  })) << "bgradb d";
  std::vector<double> col(static_cast<size_t>(out), 0.0), mag(static_cast<size_t>(out), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < out; ++c) {
      col[static_cast<size_t>(c)] += dyv[static_cast<size_t>(t * out + c)];
      mag[static_cast<size_t>(c)] += std::abs(dyv[static_cast<size_t>(t * out + c)]);
    }
  }
  EXPECT_TRUE(within(gpu().download(bgrad), as_tensor(col, {out}), [&](int64_t c) {
    return rounded(sum_bound(tokens, mag[static_cast<size_t>(c)], kU32), col[static_cast<size_t>(c)], kBF16);
  })) << "bias_grad = column sums of dy (op(a) summed over K)";
}

// An FP8 E4M3 GEMM on the fprop layout (TN, the one cuBLASLt's fp8 kernels
// take) with per-tensor scale_inv of both operands, a bf16 output and d_amax,
// then an E4M3 output with d_scale. Hopper's fp8 tensor cores accumulate with
// about 14 significant bits (fast accumulation), so u_acc = 2^-14 here: the
// GEMM delta is then about 2% of |D|, while a wrong or missing scale (0.5,
// 0.3) or a transposed operand is off by 40% or more.
TEST_F(CudaDevice, GemmLtFp8E4m3ScalesAndAmax) {
  const int64_t m = 64, n = 96, k = 128;
  const Tensor ha = normal({m, k}, 240, 2.0).to(DType::F8_E4M3), hb = normal({n, k}, 241, 2.0).to(DType::F8_E4M3);
  const float sa = 0.5f, sb = 0.3f;
  const DTensor a = gpu().upload(ha, DType::F8_E4M3), b = gpu().upload(hb, DType::F8_E4M3);
  const DTensor a_si = scalar(sa), b_si = scalar(sb);
  const double u_acc = 0x1p-14;
  Exact e = exact_gemm({values(ha), m, k, false}, {values(hb), n, k, true}, m, n, k, 1.0, 0.0, nullptr, nullptr, u_acc);
  const double s = static_cast<double>(sa) * static_cast<double>(sb);
  double amax = 0.0, amax_delta = 0.0;
  for (size_t i = 0; i < e.value.size(); ++i) {
    e.value[i] *= s;
    e.bound_delta[i] = e.bound_delta[i] * s + 2.0 * kU32 * std::abs(e.value[i]);  // the two fp32 scale products
    amax = std::max(amax, std::abs(e.value[i]));
    amax_delta = std::max(amax_delta, e.bound_delta[i]);
  }
  {
    DTensor d = gpu().empty(kBF16, {m, n});
    DTensor d_amax = gpu().zeros(kF32, {1});
    GemmLtArgs args;
    args.a = &a;
    args.b = &b;
    args.trans_b = true;
    args.d = &d;
    args.a_scale_inv = &a_si;
    args.b_scale_inv = &b_si;
    args.d_amax = &d_amax;
    gpu().gemm_lt(args);
    EXPECT_TRUE(within(gpu().download(d), as_tensor(e.value, {m, n}), [&](int64_t i) {
      return rounded(e.bound_delta[static_cast<size_t>(i)], e.value[static_cast<size_t>(i)], kBF16);
    })) << "bf16 output";
    EXPECT_NEAR(gpu().download(d_amax).get(0), amax, amax_delta + 2.0 * kU32 * amax) << "d_amax = max |D|";
  }
  {
    // E4M3 output: q = e4m3(D * d_scale) with D * d_scale within [-400, 400] (no saturation).
    const float ds = static_cast<float>(400.0 / amax);
    DTensor d = gpu().empty(DType::F8_E4M3, {m, n});
    DTensor d_amax = gpu().zeros(kF32, {1});
    const DTensor d_scale = scalar(ds);
    GemmLtArgs args;
    args.a = &a;
    args.b = &b;
    args.trans_b = true;
    args.d = &d;
    args.a_scale_inv = &a_si;
    args.b_scale_inv = &b_si;
    args.d_scale = &d_scale;
    args.d_amax = &d_amax;
    gpu().gemm_lt(args);
    std::vector<double> scaled(e.value.size());
    for (size_t i = 0; i < scaled.size(); ++i) scaled[i] = e.value[i] * static_cast<double>(ds);
    EXPECT_TRUE(within(gpu().download(d), as_tensor(scaled, {m, n}), [&](int64_t i) {
      const size_t j = static_cast<size_t>(i);
      return rounded(e.bound_delta[j] * static_cast<double>(ds) + 2.0 * kU32 * std::abs(scaled[j]), scaled[j],
                     DType::F8_E4M3);
    })) << "e4m3 output = e4m3(D * d_scale)";
    EXPECT_NEAR(gpu().download(d_amax).get(0), amax, amax_delta + 2.0 * kU32 * amax) << "d_amax before d_scale";
  }
}

// grouped_gemm against one gemm per problem (and both against float64): the
// experts' fc1 (x W^T, different token counts) and their wgrad into fp32
// main grads (dy^T x, beta = 1).
TEST_F(CudaDevice, GroupedGemmMatchesLoopOfGemm) {
  const int64_t hidden = 96, ffn = 160;
  const std::vector<int64_t> tokens = {64, 17, 128, 1};
  std::vector<DTensor> xs, ws, ys, loop;
  std::vector<Exact> exact;
  for (size_t e = 0; e < tokens.size(); ++e) {
    const int64_t t = tokens[e];
    const Tensor hx = normal({t, hidden}, 250 + e), hw = normal({ffn, hidden}, 260 + e);
    xs.push_back(gpu().upload(hx, kBF16));
    ws.push_back(gpu().upload(hw, kBF16));
    ys.push_back(gpu().empty(kBF16, {t, ffn}));
    loop.push_back(gpu().empty(kBF16, {t, ffn}));
    exact.push_back(exact_gemm({values_as(hx, kBF16), t, hidden, false}, {values_as(hw, kBF16), ffn, hidden, true}, t,
                               ffn, hidden, 1.0, 0.0, nullptr, nullptr, kU32));
  }
  std::vector<GroupedGemmProblem> problems;
  for (size_t e = 0; e < tokens.size(); ++e) problems.push_back({&xs[e], &ws[e], &ys[e]});
  gpu().grouped_gemm(problems, false, true);
  for (size_t e = 0; e < tokens.size(); ++e) {
    SCOPED_TRACE("expert " + std::to_string(e));
    gpu().gemm(xs[e], false, ws[e], true, loop[e]);
    const Exact& x = exact[e];
    const Tensor want = as_tensor(x.value, {tokens[e], ffn});
    auto bound = [&](int64_t i) {
      return rounded(x.bound_delta[static_cast<size_t>(i)], x.value[static_cast<size_t>(i)], kBF16);
    };
    EXPECT_TRUE(within(gpu().download(ys[e]), want, bound)) << "grouped vs float64";
    EXPECT_TRUE(within(gpu().download(loop[e]), want, bound)) << "gemm vs float64";
    EXPECT_TRUE(within(gpu().download(ys[e]), gpu().download(loop[e]), [&](int64_t i) { return 2.0 * bound(i); }))
        << "grouped vs gemm";
  }
}

TEST_F(CudaDevice, GroupedGemmWgradIntoFp32MainGrads) {
  const int64_t hidden = 96, ffn = 160;
  const std::vector<int64_t> tokens = {64, 17, 128};
  std::vector<DTensor> dys, xs, grads;
  std::vector<Exact> exact;
  for (size_t e = 0; e < tokens.size(); ++e) {
    const int64_t t = tokens[e];
    const Tensor hdy = normal({t, ffn}, 270 + e), hx = normal({t, hidden}, 280 + e), hg = normal({ffn, hidden}, 290 + e);
    dys.push_back(gpu().upload(hdy, kBF16));
    xs.push_back(gpu().upload(hx, kBF16));
    grads.push_back(gpu().upload(hg, kF32));
    const std::vector<double> g0 = values_as(hg, kF32);
    exact.push_back(exact_gemm({values_as(hdy, kBF16), t, ffn, true}, {values_as(hx, kBF16), t, hidden, false}, ffn,
                               hidden, t, 0.5, 1.0, &g0, nullptr, kU32));
  }
  std::vector<GroupedGemmProblem> problems;
  for (size_t e = 0; e < tokens.size(); ++e) problems.push_back({&dys[e], &xs[e], &grads[e]});
  gpu().grouped_gemm(problems, true, false, 0.5f, 1.0f);
  for (size_t e = 0; e < tokens.size(); ++e) {
    const Exact& x = exact[e];
    EXPECT_TRUE(within(gpu().download(grads[e]), as_tensor(x.value, {ffn, hidden}), [&](int64_t i) {
      return rounded(x.bound_delta[static_cast<size_t>(i)], x.value[static_cast<size_t>(i)], kF32);
    })) << "expert " << e;
  }
}

// An expert that received no tokens among others (M = 0).
TEST_F(CudaDevice, GroupedGemmWithAnEmptyExpert) {
  const int64_t hidden = 32, ffn = 48;
  const Tensor hx = normal({10, hidden}, 300), hw0 = normal({ffn, hidden}, 301), hw1 = normal({ffn, hidden}, 302);
  const DTensor x0 = gpu().zeros(kBF16, {0, hidden}), x1 = gpu().upload(hx, kBF16);
  const DTensor w0 = gpu().upload(hw0, kBF16), w1 = gpu().upload(hw1, kBF16);
  DTensor y0 = gpu().empty(kBF16, {0, ffn}), y1 = gpu().empty(kBF16, {10, ffn}), ref = gpu().empty(kBF16, {10, ffn});
  const std::vector<GroupedGemmProblem> problems = {{&x0, &w0, &y0}, {&x1, &w1, &y1}};
  gpu().grouped_gemm(problems, false, true);
  gpu().gemm(x1, false, w1, true, ref);
  const Exact e = exact_gemm({values_as(hx, kBF16), 10, hidden, false}, {values_as(hw1, kBF16), ffn, hidden, true}, 10,
                             ffn, hidden, 1.0, 0.0, nullptr, nullptr, kU32);
  EXPECT_TRUE(within(gpu().download(y1), as_tensor(e.value, {10, ffn}), [&](int64_t i) {
    return rounded(e.bound_delta[static_cast<size_t>(i)], e.value[static_cast<size_t>(i)], kBF16);
  }));
}

// ===========================================================================
// Attention: the CUDA flash attention against the CPU backend's.

enum class MaskKind { kNone, kCausal, kWindow, kWindowCausal, kPadding, kPerHead, kCpChunks, kBottomRight, kTpSlice };

struct AttnCase {
  std::string name;
  int64_t b, sq, sk, np, ng, hn;
  DType dtype;
  MaskKind mask;
  double dropout = 0.0;
};

// Element bounds of the comparison, from a float64 evaluation of the
// contract (positions, masks, fill, dropout) on the same inputs. Per query
// row i and key j:
//   ds_ij  = (4 sqrt(hn) + 4) u32 scale sum_d |q_id k_jd|   (an fp32 score)
//   rho_i  = 3 max_j ds_ij + (4 sqrt(sk) + 12) u32 + 2 u32 |lse_i|
//            (relative error of a probability: its score, the normaliser,
//             exp, and lse's own fp32 rounding for fully masked rows)
//   eta    = 2 u_p (16-bit probabilities: the two sides may round different
//            but equally valid fp32 values, or unnormalised ones, flash
//            style), doubled with dropout (rounded again after the scale).
// lse: max_j ds_ij + (4 sqrt(sk) + 16) u32 + 8 u32 |lse|.
// out: (rho_i + eta + (4 sqrt(sk) + 4) u32) sum_j P'_ij |v_jd|.
// The backward gets the same out and lse on both sides (the CPU's), so it is
// compared on its own: dP_ij = keep (dO_i . v_j) with ddP = (4 sqrt(hn) + 4)
// u32 keep sum |dO v|; D_i = rowsum(dO o O) or rowsum(P o dP), which differ by
// the output's own error: dD = (4 sqrt(hn) + 4) u32 sum|dO O| + sum_d |dO|
// (delta_out + u_o |O|); dS_ij = P (dP - D) with ddS = (rho + eta) |dS| +
// P (ddP + dD) (eta: dS may be rounded to the dtype for the tensor-core GEMM);
// dq = scale sum_j dS k: scale (sum_j ddS |k| + (4 sqrt(sk) + 4) u32 sum_j |dS k|);
// dk, dv likewise over the query rows of the group's heads, dv with P'.
// Each is then widened by rounded() for the output dtype.
struct AttnBounds {
  std::vector<double> lse, out, dq, dk, dv;
};

AttnBounds attention_bounds(const AttentionArgs& a, const std::vector<double>& q, const std::vector<double>& k,
                            const std::vector<double>& v, const std::vector<double>& o,
                            const std::vector<double>& dout, DType dtype) {
  const int64_t hn = a.head_dim, r = a.heads / a.groups, b = a.batch;
  const int64_t hg_n = a.heads_global > 0 ? a.heads_global : a.heads;
  const int64_t Sq = a.sq_global > 0 ? a.sq_global : a.sq, Sk = a.sk_global > 0 ? a.sk_global : a.sk;
  const double u = kU32, u_p = dtype == kF32 ? 0.0 : unit_roundoff(dtype), u_o = unit_roundoff(dtype);
  const double eta = (a.dropout_p > 0 ? 4.0 : 2.0) * u_p;
  const double scale = static_cast<double>(a.softmax_scale);
  const double c_hn = (4.0 * std::sqrt(static_cast<double>(hn)) + 4.0) * u;
  const double c_sk = (4.0 * std::sqrt(static_cast<double>(a.sk)) + 4.0) * u;
  const double c_sq = (4.0 * std::sqrt(static_cast<double>(a.sq * r)) + 4.0) * u;
  AttnBounds B;
  B.lse.assign(static_cast<size_t>(b * a.heads * a.sq), 0.0);
  B.out.assign(q.size(), 0.0);
  B.dq.assign(q.size(), 0.0);
  B.dk.assign(k.size(), 0.0);
  B.dv.assign(v.size(), 0.0);
  std::vector<double> dk_acc(k.size(), 0.0), dv_acc(v.size(), 0.0);  // the (4 sqrt(n) + 4) u32 sum parts
  auto qi = [&](int64_t i, int64_t bi, int64_t h) { return static_cast<size_t>(((i * b + bi) * a.heads + h) * hn); };
  auto kj = [&](int64_t j, int64_t bi, int64_t g) { return static_cast<size_t>(((j * b + bi) * a.groups + g) * hn); };
  std::vector<double> s(static_cast<size_t>(a.sk)), ds(static_cast<size_t>(a.sk)), p(static_cast<size_t>(a.sk)),
      keep(static_cast<size_t>(a.sk)), dp(static_cast<size_t>(a.sk)), ddp(static_cast<size_t>(a.sk));
  std::vector<bool> masked(static_cast<size_t>(a.sk));
  for (int64_t bi = 0; bi < b; ++bi) {
    const int64_t bg = a.batch_offset + bi;
    for (int64_t h = 0; h < a.heads; ++h) {
      const int64_t g = h / r, hg = a.head_offset + h;
      for (int64_t i = 0; i < a.sq; ++i) {
        const int64_t qp = a.q_positions.empty() ? i : a.q_positions[static_cast<size_t>(i)];
        const size_t q0 = qi(i, bi, h);
        double mx = -1e300, ds_max = 0.0;
        for (int64_t j = 0; j < a.sk; ++j) {
          const size_t jj = static_cast<size_t>(j);
          const int64_t kp = a.k_positions.empty() ? j : a.k_positions[jj];
          bool m = (a.causal && kp > qp) || (a.window[0] >= 0 && kp < qp - a.window[0]) ||
                   (a.window[1] >= 0 && kp > qp + a.window[1]);
          if (a.mask != nullptr) {
            const auto& md = a.mask_dims;
            const int64_t idx = (((md[0] == 1 ? 0 : bg) * md[1] + (md[1] == 1 ? 0 : hg)) * md[2] +
                                 (md[2] == 1 ? 0 : qp)) * md[3] + (md[3] == 1 ? 0 : kp);
            m = m || a.mask[idx] != 0;
          }
          masked[jj] = m;
          const size_t k0 = kj(j, bi, g);
          double dot = 0.0, adot = 0.0;
          for (int64_t d = 0; d < hn; ++d) {
            dot += q[q0 + static_cast<size_t>(d)] * k[k0 + static_cast<size_t>(d)];
            adot += std::abs(q[q0 + static_cast<size_t>(d)] * k[k0 + static_cast<size_t>(d)]);
          }
          s[jj] = m ? static_cast<double>(a.fill) : scale * dot;
          ds[jj] = m ? 0.0 : c_hn * scale * adot;
          ds_max = std::max(ds_max, ds[jj]);
          mx = std::max(mx, s[jj]);
          keep[jj] = 1.0;
          if (a.dropout_p > 0) {
            const uint64_t flat = static_cast<uint64_t>(((bg * hg_n + hg) * Sq + qp) * Sk + kp);
            keep[jj] = static_cast<double>(math::uniform_float(a.dropout_key, flat)) >= a.dropout_p
                           ? 1.0 / (1.0 - a.dropout_p)
                           : 0.0;
          }
        }
        double z = 0.0;
        for (int64_t j = 0; j < a.sk; ++j) z += std::exp(s[static_cast<size_t>(j)] - mx);
        const double lse = mx + std::log(z);
        const size_t li = static_cast<size_t>((bi * a.heads + h) * a.sq + i);
        B.lse[li] = ds_max + (4.0 * std::sqrt(static_cast<double>(a.sk)) + 16.0) * u + 8.0 * u * std::abs(lse);
        const double rho = 3.0 * ds_max + (4.0 * std::sqrt(static_cast<double>(a.sk)) + 12.0) * u + 2.0 * u * std::abs(lse);
        for (int64_t j = 0; j < a.sk; ++j) p[static_cast<size_t>(j)] = std::exp(s[static_cast<size_t>(j)] - lse);
        // Forward: out, and D's inputs.
        double D = 0.0, dD = 0.0;
        for (int64_t d = 0; d < hn; ++d) {
          double mag = 0.0;
          for (int64_t j = 0; j < a.sk; ++j) {
            const size_t jj = static_cast<size_t>(j);
            mag += p[jj] * keep[jj] * std::abs(v[kj(j, bi, g) + static_cast<size_t>(d)]);
          }
          const size_t od = q0 + static_cast<size_t>(d);
          B.out[od] = (rho + eta + c_sk) * mag;
          D += dout[od] * o[od];
          dD += c_hn * std::abs(dout[od] * o[od]) + std::abs(dout[od]) * (rounded(B.out[od], o[od], dtype) + u_o * std::abs(o[od]));
        }
        // Backward.
        for (int64_t j = 0; j < a.sk; ++j) {
          const size_t jj = static_cast<size_t>(j), k0 = kj(j, bi, g);
          double dot = 0.0, adot = 0.0;
          for (int64_t d = 0; d < hn; ++d) {
            dot += dout[q0 + static_cast<size_t>(d)] * v[k0 + static_cast<size_t>(d)];
            adot += std::abs(dout[q0 + static_cast<size_t>(d)] * v[k0 + static_cast<size_t>(d)]);
          }
          dp[jj] = keep[jj] * dot;
          ddp[jj] = c_hn * keep[jj] * adot;
        }
        for (int64_t j = 0; j < a.sk; ++j) {
          const size_t jj = static_cast<size_t>(j), k0 = kj(j, bi, g);
          const double dS = masked[jj] ? 0.0 : p[jj] * (dp[jj] - D);
          const double ddS = masked[jj] ? 0.0 : (rho + eta) * std::abs(dS) + p[jj] * (ddp[jj] + dD);
          const double pk = p[jj] * keep[jj];
          for (int64_t d = 0; d < hn; ++d) {
            const size_t qd = q0 + static_cast<size_t>(d), kd = k0 + static_cast<size_t>(d);
            B.dq[qd] += scale * (ddS * std::abs(k[kd]) + c_sk * std::abs(dS * k[kd]));
            B.dk[kd] += scale * ddS * std::abs(q[qd]);
            dk_acc[kd] += scale * std::abs(dS * q[qd]);
            B.dv[kd] += (rho + eta) * pk * std::abs(dout[qd]);
            dv_acc[kd] += pk * std::abs(dout[qd]);
          }
        }
      }
    }
  }
  for (size_t i = 0; i < B.dk.size(); ++i) {
    B.dk[i] += c_sq * dk_acc[i];
    B.dv[i] += c_sq * dv_acc[i];
  }
  return B;
}

void PrintTo(const AttnCase& c, std::ostream* os) {
  *os << fmt::format("{} b {} sq {} sk {} heads {} groups {} hn {} {} dropout {}", c.name, c.b, c.sq, c.sk, c.np, c.ng,
                     c.hn, dtype_name(c.dtype), c.dropout);
}

class AttentionWithinBound : public CudaDevice, public ::testing::WithParamInterface<AttnCase> {};

TEST_P(AttentionWithinBound, ForwardAndBackwardMatchCpu) {
  const AttnCase c = GetParam();
  const DType d = c.dtype;
  AttentionArgs a;
  a.batch = c.b, a.sq = c.sq, a.sk = c.sk, a.heads = c.np, a.groups = c.ng, a.head_dim = c.hn;
  a.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.hn)));
  a.probs_dtype = d;
  a.causal = c.mask == MaskKind::kCausal || c.mask == MaskKind::kWindowCausal || c.mask == MaskKind::kCpChunks ||
             c.mask == MaskKind::kBottomRight;
  if (c.mask == MaskKind::kWindow) a.window = {50, 20};
  if (c.mask == MaskKind::kWindowCausal) a.window = {70, 0};
  std::vector<int64_t> qpos;
  std::vector<uint8_t> mask;
  std::mt19937 gen(7);
  if (c.mask == MaskKind::kPadding) {
    // [b, 1, S, S]: sequence e has valid query and key lengths; padded query
    // rows are masked entirely (uniform rows, no gradient to q, k).
    const int64_t ql[] = {c.sq, c.sq / 2 - 3}, kl[] = {c.sk - 20, c.sk / 2 + 11};
    for (int64_t e = 0; e < c.b; ++e)
      for (int64_t i = 0; i < c.sq; ++i)
        for (int64_t j = 0; j < c.sk; ++j) mask.push_back(i >= ql[e % 2] || j >= kl[e % 2] ? 1 : 0);
    a.mask = mask.data();
    a.mask_dims = {c.b, 1, c.sq, c.sk};
  }
  if (c.mask == MaskKind::kPerHead) {
    for (int64_t e = 0; e < c.b * c.np * c.sq * c.sk; ++e) mask.push_back(gen() % 3 == 0 ? 1 : 0);
    a.mask = mask.data();
    a.mask_dims = {c.b, c.np, c.sq, c.sk};
  }
  if (c.mask == MaskKind::kCpChunks) {
    // Context parallelism: chunks 1 and 2 of 4 of the sequence (rank 1 of cp 2), all keys.
    const int64_t chunk = c.sk / 4;
    for (int64_t t = 0; t < chunk; ++t) qpos.push_back(chunk + t);
    for (int64_t t = 0; t < chunk; ++t) qpos.push_back(2 * chunk + t);
    a.q_positions = qpos;
    a.sq_global = c.sk, a.sk_global = c.sk;
  }
  if (c.mask == MaskKind::kBottomRight) {
    for (int64_t i = 0; i < c.sq; ++i) qpos.push_back(c.sk - c.sq + i);
    a.q_positions = qpos;
    a.sq_global = c.sk;
  }
  if (c.mask == MaskKind::kTpSlice) {
    // Heads 2, 3 of 4 (group 1 of 2) and sequences 1, 2 of 3: a per-head
    // global mask and the dropout index use global head and batch indices.
    a.head_offset = 2, a.heads_global = 4, a.batch_offset = 1;
    for (int64_t h = 0; h < 4; ++h)
      for (int64_t i = 0; i < c.sq; ++i)
        for (int64_t j = 0; j < c.sk; ++j) mask.push_back(j > i || gen() % 4 == 0 ? 1 : 0);
    a.mask = mask.data();
    a.mask_dims = {1, 4, c.sq, c.sk};
  }
  a.dropout_p = c.dropout;
  a.dropout_key = rng_key(11, "dropout.decoder.layers.0.self_attention.core_attention");

  const Tensor hq = normal({c.sq, c.b, c.np, c.hn}, 400), hk = normal({c.sk, c.b, c.ng, c.hn}, 401),
               hv = normal({c.sk, c.b, c.ng, c.hn}, 402), hdo = normal({c.sq, c.b, c.np, c.hn}, 403);
  const Pair q = up(hq, d), k = up(hk, d), v = up(hv, d), dout = up(hdo, d);
  Pair out = empty(d, {c.sq, c.b, c.np, c.hn}), lse = empty(kF32, {c.b, c.np, c.sq});
  gpu().attention_forward(a, q.g, k.g, v.g, out.g, lse.g);
  cpu().attention_forward(a, q.c, k.c, v.c, out.c, lse.c);
  const Tensor cout = down_c(out), clse = down_c(lse);

  const AttnBounds B = attention_bounds(a, values_as(hq, d), values_as(hk, d), values_as(hv, d), values(cout),
                                        values_as(hdo, d), d);
  auto bound_of = [&](const std::vector<double>& delta, const Tensor& want, DType dt) {
    return [&delta, &want, dt](int64_t i) { return rounded(delta[static_cast<size_t>(i)], want.get(i), dt); };
  };
  EXPECT_TRUE(within(down_g(lse), clse, bound_of(B.lse, clse, kF32))) << "lse";
  EXPECT_TRUE(within(down_g(out), cout, bound_of(B.out, cout, d))) << "out";

  // Backward on the same forward results (the CPU's out and lse, uploaded).
  const DTensor g_out = gpu().upload(cout, d), g_lse = gpu().upload(clse, kF32);
  Pair dq = up(normal({c.sq, c.b, c.np, c.hn}, 404), d), dk = up(normal({c.sk, c.b, c.ng, c.hn}, 405), d),
       dv = up(normal({c.sk, c.b, c.ng, c.hn}, 406), d);  // overwritten, not accumulated
  gpu().attention_backward(a, q.g, k.g, v.g, g_out, g_lse, dout.g, dq.g, dk.g, dv.g);
  cpu().attention_backward(a, q.c, k.c, v.c, out.c, lse.c, dout.c, dq.c, dk.c, dv.c);
  const Tensor cdq = down_c(dq), cdk = down_c(dk), cdv = down_c(dv);
  EXPECT_TRUE(within(down_g(dq), cdq, bound_of(B.dq, cdq, d))) << "dq";
  EXPECT_TRUE(within(down_g(dk), cdk, bound_of(B.dk, cdk, d))) << "dk";
  EXPECT_TRUE(within(down_g(dv), cdv, bound_of(B.dv, cdv, d))) << "dv";
}

std::vector<AttnCase> attention_cases() {
  std::vector<AttnCase> v;
  // Causal GQA (4 heads, 2 groups) at every head width and dtype.
  for (const int64_t hn : {int64_t{64}, int64_t{128}, int64_t{40}}) {
    for (DType d : {kBF16, kF16, kF32}) v.push_back({"causal_gqa", 2, 160, 160, 4, 2, hn, d, MaskKind::kCausal});
  }
  for (DType d : {kBF16, kF32}) {
    v.push_back({"nomask", 1, 130, 130, 2, 2, 64, d, MaskKind::kNone});
    v.push_back({"window", 1, 300, 300, 2, 2, 64, d, MaskKind::kWindow});
    v.push_back({"padding", 2, 150, 150, 2, 2, 64, d, MaskKind::kPadding});
    v.push_back({"per_head_mask", 2, 70, 90, 4, 2, 64, d, MaskKind::kPerHead});
    v.push_back({"dropout_causal", 2, 130, 130, 4, 2, 64, d, MaskKind::kCausal, 0.1});
    v.push_back({"cp_chunks", 2, 96, 192, 2, 2, 64, d, MaskKind::kCpChunks, 0.25});
    v.push_back({"tp_slice_dropout", 2, 100, 100, 2, 1, 128, d, MaskKind::kTpSlice, 0.2});
  }
  v.push_back({"window_causal", 1, 300, 300, 2, 2, 128, kBF16, MaskKind::kWindowCausal});
  v.push_back({"padding", 2, 150, 150, 2, 2, 40, kF16, MaskKind::kPadding});
  v.push_back({"mqa_causal", 1, 200, 200, 8, 1, 128, kBF16, MaskKind::kCausal});
  v.push_back({"bottom_right_causal", 2, 70, 150, 2, 2, 64, kF16, MaskKind::kBottomRight});
  v.push_back({"dropout_causal", 1, 200, 200, 4, 2, 128, kBF16, MaskKind::kCausal, 0.1});
  v.push_back({"single_query", 1, 1, 77, 2, 1, 128, kBF16, MaskKind::kNone});
  return v;
}

INSTANTIATE_TEST_SUITE_P(All, AttentionWithinBound, ::testing::ValuesIn(attention_cases()),
                         [](const ::testing::TestParamInfo<AttnCase>& i) {
                           const AttnCase& c = i.param;
                           return fmt::format("{}_b{}_sq{}_sk{}_a{}_g{}_d{}_{}", c.name, c.b, c.sq, c.sk, c.np, c.ng,
                                              c.hn, dtype_name(c.dtype));
                         });

// ===========================================================================
// Errors, streams, memory ownership.

TEST_F(CudaDevice, GemmShapeMismatchThrowsBackendErrorNamingTheShapes) {
  const DTensor a = gpu().zeros(kF32, {4, 3}), b = gpu().zeros(kF32, {5, 2});
  DTensor c = gpu().zeros(kF32, {4, 2});
  expect_backend_error([&] { gpu().gemm(a, false, b, false, c); }, {"gemm", "[4, 3]", "[5, 2]"});
  const DTensor b2 = gpu().zeros(kF32, {3, 2});
  DTensor c_bad = gpu().zeros(kF32, {4, 7});
  expect_backend_error([&] { gpu().gemm(a, false, b2, false, c_bad); }, {"gemm", "[4, 7]"});
  const DTensor bias = gpu().zeros(kF32, {3});
  expect_backend_error([&] { gpu().gemm(a, false, b2, false, c, 1.0f, 0.0f, &bias); }, {"gemm", "bias", "[3]"});
  GemmLtArgs lt;
  lt.a = &a;
  lt.b = &b2;
  lt.d = &c;
  lt.epilogue = Epilogue::kBias;  // without a bias
  expect_backend_error([&] { gpu().gemm_lt(lt); }, {"bias"});
  // The backend is still usable after the errors (no sticky CUDA error).
  gpu().gemm(a, false, b2, false, c);
  EXPECT_TRUE(bit_exact(gpu().download(c), Tensor(kF32, {4, 2})));
}

TEST_F(CudaDevice, OtherShapeAndIndexErrorsThrowBackendError) {
  const DTensor x = gpu().zeros(kBF16, {3, 4});
  DTensor y5 = gpu().zeros(kBF16, {5});
  expect_backend_error([&] { gpu().copy(x, y5); }, {"copy", "[3, 4]", "[5]"});
  DTensor y = gpu().zeros(kBF16, {3, 4}), mean = gpu().zeros(kF32, {3}), rstd = gpu().zeros(kF32, {3});
  const DTensor g5 = gpu().zeros(kBF16, {5});
  expect_backend_error([&] { gpu().norm_forward(NormArgs{}, x, g5, nullptr, y, mean, rstd); },
                       {"norm_forward", "gamma", "[5]"});
  DTensor out2 = gpu().zeros(kBF16, {2, 4});
  const std::vector<int64_t> oob = {0, 3};
  expect_backend_error([&] { gpu().gather_rows(x, oob, out2); }, {"gather_rows", "3"});
  expect_backend_error([&] { gpu().scatter_add_rows(out2, oob, {}, y); }, {"scatter_add_rows", "3"});
  DTensor yb = gpu().zeros(kBF16, {3, 3});
  expect_backend_error([&] { gpu().axpby(1.0f, x, 1.0f, x, yb); }, {"axpby"});
  expect_backend_error([&] { gpu().bias_act_forward({ActivationKind::kSilu, true}, gpu().zeros(kBF16, {3, 5}), nullptr, y); },
                       {"bias_act_forward"});
  AttentionArgs a;
  a.sq = 4, a.sk = 4, a.heads = 3, a.groups = 2, a.head_dim = 8;
  const DTensor q = gpu().zeros(kBF16, {4, 1, 3, 8}), kv = gpu().zeros(kBF16, {4, 1, 2, 8});
  DTensor o = gpu().zeros(kBF16, {4, 1, 3, 8}), l = gpu().zeros(kF32, {1, 3, 4});
  expect_backend_error([&] { gpu().attention_forward(a, q, kv, kv, o, l); }, {"attention_forward"});
  DTensor idx = gpu().empty(DType::I64, {3, 5});
  expect_backend_error([&] { gpu().router_topk(gpu().zeros(kF32, {3, 4}), 5, idx); }, {"router_topk"});
  // A CPU backend tensor (bf16 values in fp32 storage) is not the GPU's.
  expect_backend_error([&] { (void)gpu().download(cpu().zeros(kBF16, {2})); }, {"download"});
  // Still usable.
  EXPECT_TRUE(bit_exact(gpu().download(x), Tensor(kBF16, {3, 4})));
}

TEST_F(CudaDevice, StreamWorkspaceAndTensorsOutlivingTheBackend) {
  EXPECT_NE(gpu().stream(), nullptr);
  EXPECT_EQ(current_stream(), gpu().stream());
  EXPECT_GE(gpu().device(), 0);
  EXPECT_NE(gpu().cublaslt_handle(), nullptr);
  EXPECT_NE(gpu().cublas_handle(), nullptr);
  EXPECT_NE(gpu().workspace(1 << 20), nullptr);
  EXPECT_NE(gpu().workspace(64 << 20), nullptr);  // grows
  DTensor kept;
  {
    CudaBackend other;
    EXPECT_EQ(current_stream(), other.stream());
    EXPECT_NE(other.stream(), gpu().stream());
    kept = other.upload(normal({1000}, 500), kBF16);
    const Tensor back = other.download(kept);
    EXPECT_TRUE(bit_exact(back, normal({1000}, 500).to(kBF16)));
  }
  EXPECT_EQ(current_stream(), nullptr);  // the most recent backend is gone
  kept = DTensor();                      // freed after its backend: on its (still live) stream
  gpu().synchronize();
  EXPECT_EQ(gpu().name(), "cuda");
}

}  // namespace
}  // namespace paritron::opt::cuda
