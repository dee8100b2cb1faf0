// The CPU backend's kernels (optimized/cpu/cpu_backend.h) at a layer's shapes
// (tokens 2048, hidden 1024, ffn 4096), against a bare multithreaded OpenBLAS
// SGEMM of the same shape and the float64 reference components
// (reference/*.h), for the targets: linear layers >= 80% of a bare
// GEMM of the same shape, and the fused kernels' speed-up over the reference.
//
// Names and counters follow bench/README.md (<component>/<impl>/<shape>/<dtype>):
//   gemm/bare_gemm/m<T>_n<out>_k<in>/fp32      cblas_sgemm, OpenBLAS threads = omp_get_max_threads()
//   linear_fwd/{reference,optimized}/m<T>_n<out>_k<in>/{fp64,fp32,bf16}   y = x W^T + b
//   layernorm_fwd, layernorm_bwd, rope_fwd, bias_gelu_fwd (fused tanh form),
//   bias_gelu_erf_fwd (erf gelu + bias, the layer's default), swiglu_fwd
//   (bias + silu GLU, input [T, 2h] -> output [T, h]), bias_dropout_add_fwd
//   (p = 0.1, training) / {reference,optimized} / n2048_h1024 / {fp64,fp32,bf16}
// Counters, plain per-iteration values: `flops` (2 m n k) for GEMMs and
// linears; `bytes` = the bytes of the main tensors the kernel must read and
// write, at the row's element size (fp64 8, fp32 4, bf16 2), so GB/s in the
// table JSON is the effective bandwidth of that storage.
//
// The CPU backend runs OpenBLAS single-threaded inside its own OpenMP team
// (cpu_backend.cpp blocked_gemm); the bare_gemm rows set OpenBLAS's thread
// count to omp_get_max_threads() first, so the ceiling is a fair bare
// multithreaded cblas_sgemm, and set it back to 1 afterwards.
//
//   build/release/bench/cpu_kernels_bench --benchmark_filter=linear
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <omp.h>

#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "common/dtype.h"
#include "common/rng.h"
#include "optimized/cpu/cpu_backend.h"
#include "reference/activations.h"
#include "reference/bias_dropout_add.h"
#include "reference/core.h"
#include "reference/linear.h"
#include "reference/norm.h"
#include "reference/rotary_pos_emb.h"

namespace {

using paritron::DType;
using paritron::opt::DTensor;
using paritron::ref::Mat;

constexpr int64_t kTokens = 2048;
constexpr int64_t kHidden = 1024;
const std::string kElementwiseShape = fmt::format("n{}_h{}", kTokens, kHidden);

paritron::opt::cpu::CpuBackend& backend() {
  static paritron::opt::cpu::CpuBackend be;
  return be;
}

Mat random_mat(int64_t rows, int64_t cols, uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  Mat m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
  return m;
}

DTensor up(const Mat& m, DType dtype, paritron::Shape shape = {}) {
  if (shape.empty()) shape = {m.rows(), m.cols()};
  return backend().upload(paritron::ref::to_tensor(m, shape), dtype);
}

const char* row_dtype(DType d) {
  switch (d) {
    case DType::F64: return "fp64";
    case DType::F32: return "fp32";
    case DType::BF16: return "bf16";
    default: return "other";
  }
}
double elem_bytes(DType d) { return d == DType::F64 ? 8.0 : d == DType::F32 ? 4.0 : 2.0; }

void set_bytes(benchmark::State& state, double elements, DType d) { state.counters["bytes"] = elements * elem_bytes(d); }

// ---------------------------------------------------------------------------
// GEMM: y [T, out] = x [T, in] W[out, in]^T (+ b), Megatron's linear layout.

struct GemmShape {
  int64_t in, out;
  std::string name() const { return fmt::format("m{}_n{}_k{}", kTokens, out, in); }
  double flops() const { return 2.0 * static_cast<double>(kTokens) * static_cast<double>(out) * static_cast<double>(in); }
  double elements() const { return static_cast<double>(kTokens * in + out * in + kTokens * out); }
};
const GemmShape kGemmShapes[] = {{1024, 3072}, {1024, 1024}, {1024, 4096}, {4096, 1024}};

void BM_BareSgemm(benchmark::State& state, GemmShape sh) {
  openblas_set_num_threads(omp_get_max_threads());
  std::vector<float> x(static_cast<size_t>(kTokens * sh.in)), w(static_cast<size_t>(sh.out * sh.in)),
      y(static_cast<size_t>(kTokens * sh.out));
  std::mt19937 gen(1);
  std::normal_distribution<float> d;
  for (float& v : x) v = d(gen);
  for (float& v : w) v = d(gen);
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(kTokens), static_cast<int>(sh.out),
                static_cast<int>(sh.in), 1.0f, x.data(), static_cast<int>(sh.in), w.data(), static_cast<int>(sh.in),
                0.0f, y.data(), static_cast<int>(sh.out));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["flops"] = sh.flops();
  state.counters["openblas_threads"] = openblas_get_num_threads();
  set_bytes(state, sh.elements(), DType::F32);
  openblas_set_num_threads(1);  // as the backend keeps it
}

// Backend::gemm with the bias epilogue; bf16: bf16 values, fp32 accumulation,
// output rounded to bf16.
void BM_OptimizedLinear(benchmark::State& state, GemmShape sh, DType dtype) {
  auto& be = backend();
  const DTensor x = up(random_mat(kTokens, sh.in, 1), dtype);
  const DTensor w = up(random_mat(sh.out, sh.in, 2), dtype);
  const DTensor b = up(random_mat(1, sh.out, 3), dtype, {sh.out});
  DTensor y = be.empty(dtype, {kTokens, sh.out});
  for (auto _ : state) {
    be.gemm(x, false, w, true, y, 1.0f, 0.0f, &b);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["flops"] = sh.flops();
  set_bytes(state, sh.elements(), dtype);
}

// The reference's linear_forward (float64, Eigen), bias added.
void BM_ReferenceLinear(benchmark::State& state, GemmShape sh) {
  paritron::ref::MatMap params{{"l.weight", random_mat(sh.out, sh.in, 2)}, {"l.bias", random_mat(1, sh.out, 3)}};
  const Mat x = random_mat(kTokens, sh.in, 1);
  const paritron::ref::Precision p = paritron::ref::truth_precision();
  for (auto _ : state) {
    Mat y = paritron::ref::linear_forward(paritron::ref::Params(params).sub("l"), x, true, p);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["flops"] = sh.flops();
  set_bytes(state, sh.elements(), DType::F64);
}

// ---------------------------------------------------------------------------
// LayerNorm [2048, 1024]: forward reads x, writes y; backward reads x, dy,
// writes dx (gamma/beta/statistics are O(h) or O(n), left out of `bytes`).

constexpr double kNH = static_cast<double>(kTokens * kHidden);

void BM_OptimizedLayerNorm(benchmark::State& state, DType dtype) {
  auto& be = backend();
  const DTensor x = up(random_mat(kTokens, kHidden, 4), dtype);
  const DTensor g = up(random_mat(1, kHidden, 5), dtype, {kHidden});
  const DTensor b = up(random_mat(1, kHidden, 6), dtype, {kHidden});
  DTensor y = be.empty(dtype, {kTokens, kHidden});
  DTensor mean = be.empty(DType::F32, {kTokens}), rstd = be.empty(DType::F32, {kTokens});
  for (auto _ : state) {
    be.norm_forward(paritron::opt::NormArgs{}, x, g, &b, y, mean, rstd);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 2 * kNH, dtype);
}

void BM_ReferenceLayerNorm(benchmark::State& state) {
  paritron::TransformerConfig cfg;
  const Mat x = random_mat(kTokens, kHidden, 4);
  paritron::ref::MatMap params{{"ln.weight", random_mat(1, kHidden, 5)}, {"ln.bias", random_mat(1, kHidden, 6)}};
  const paritron::ref::Precision p = paritron::ref::truth_precision();
  for (auto _ : state) {
    auto f = paritron::ref::layernorm_forward(cfg, paritron::ref::Params(params).sub("ln"), x, p);
    benchmark::DoNotOptimize(f.output.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 2 * kNH, DType::F64);
}

void BM_OptimizedLayerNormBackward(benchmark::State& state, DType dtype) {
  auto& be = backend();
  const DTensor x = up(random_mat(kTokens, kHidden, 4), dtype);
  const DTensor dy = up(random_mat(kTokens, kHidden, 7), dtype);
  const DTensor g = up(random_mat(1, kHidden, 5), dtype, {kHidden});
  const DTensor b = up(random_mat(1, kHidden, 6), dtype, {kHidden});
  DTensor y = be.empty(dtype, {kTokens, kHidden}), dx = be.empty(dtype, {kTokens, kHidden});
  DTensor mean = be.empty(DType::F32, {kTokens}), rstd = be.empty(DType::F32, {kTokens});
  DTensor dg = be.zeros(DType::F32, {kHidden}), db = be.zeros(DType::F32, {kHidden});
  be.norm_forward(paritron::opt::NormArgs{}, x, g, &b, y, mean, rstd);
  for (auto _ : state) {
    be.norm_backward(paritron::opt::NormArgs{}, x, g, mean, rstd, dy, dx, dg, &db);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 3 * kNH, dtype);
}

void BM_ReferenceLayerNormBackward(benchmark::State& state) {
  paritron::TransformerConfig cfg;
  const Mat x = random_mat(kTokens, kHidden, 4), dy = random_mat(kTokens, kHidden, 7);
  paritron::ref::MatMap params{{"ln.weight", random_mat(1, kHidden, 5)}, {"ln.bias", random_mat(1, kHidden, 6)}};
  const paritron::ref::Precision p = paritron::ref::truth_precision();
  const auto f = paritron::ref::layernorm_forward(cfg, paritron::ref::Params(params).sub("ln"), x, p);
  for (auto _ : state) {
    paritron::ref::MatMap grads;
    auto dx = paritron::ref::layernorm_backward(cfg, paritron::ref::Params(params).sub("ln"), x, f, dy,
                                                paritron::ref::Sink(grads).sub("ln"), p);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 3 * kNH, DType::F64);
}

// ---------------------------------------------------------------------------
// RoPE: s 1024, b 2, 16 heads of 64 ([2048, 1024] rows).

constexpr int64_t kSeq = 1024, kBatch = 2, kHeads = 16, kHn = 64;
static_assert(kSeq * kBatch == kTokens && kHeads * kHn == kHidden);

Mat rope_freqs() {
  paritron::TransformerConfig cfg;
  cfg.kv_channels = kHn;
  return paritron::ref::rotary_freqs(cfg, kSeq);
}

void BM_OptimizedRope(benchmark::State& state, DType dtype) {
  auto& be = backend();
  const DTensor x = up(random_mat(kSeq * kBatch, kHeads * kHn, 8), dtype, {kSeq, kBatch, kHeads, kHn});
  const DTensor freqs = up(rope_freqs(), DType::F32);
  DTensor y = be.empty(dtype, {kSeq, kBatch, kHeads, kHn});
  const paritron::opt::RopeArgs args{kBatch, kHeads, kHn, kHn, false};
  for (auto _ : state) {
    be.rope(args, x, freqs, y, false);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 2 * kNH, dtype);
}

void BM_ReferenceRope(benchmark::State& state) {
  const Mat x = random_mat(kSeq * kBatch, kHeads * kHn, 8);
  const Mat freqs = rope_freqs();
  const paritron::ref::Precision p = paritron::ref::truth_precision();
  for (auto _ : state) {
    auto y = paritron::ref::apply_rotary_pos_emb_forward(x, kBatch, kHeads, freqs, false, p);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 2 * kNH, DType::F64);
}

// ---------------------------------------------------------------------------
// Bias + activation [2048, 1024] (output): bias_gelu (fused tanh form),
// bias + erf gelu, and bias + swiglu (input [2048, 2048]: gate half through
// silu times the up half). Reference: the bias add and the activation as
// reference/mlp.cpp computes them in float64 (activation_forward; the fused
// GLU's activation_value(gate) * up per element).

enum class Act { kBiasGeluTanh, kBiasGeluErf, kSwiglu };

int64_t act_in_width(Act a) { return a == Act::kSwiglu ? 2 * kHidden : kHidden; }
double act_elements(Act a) { return static_cast<double>(kTokens * (act_in_width(a) + kHidden)); }

void BM_OptimizedBiasAct(benchmark::State& state, Act act, DType dtype) {
  auto& be = backend();
  const int64_t in_w = act_in_width(act);
  const DTensor x = up(random_mat(kTokens, in_w, 9), dtype);
  const DTensor b = up(random_mat(1, in_w, 10), dtype, {in_w});
  DTensor y = be.empty(dtype, {kTokens, kHidden});
  using paritron::opt::ActivationKind;
  const paritron::opt::ActivationArgs args{act == Act::kBiasGeluTanh ? ActivationKind::kBiasGeluTanh
                                           : act == Act::kBiasGeluErf ? ActivationKind::kGelu
                                                                      : ActivationKind::kSilu,
                                           act == Act::kSwiglu};
  for (auto _ : state) {
    be.bias_act_forward(args, x, &b, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, act_elements(act), dtype);
}

void BM_ReferenceBiasAct(benchmark::State& state, Act act) {
  using paritron::ref::Activation;
  const int64_t in_w = act_in_width(act);
  const Mat x = random_mat(kTokens, in_w, 9);
  const Mat b = random_mat(1, in_w, 10);
  for (auto _ : state) {
    Mat a = x;
    a.rowwise() += b.row(0);
    Mat y;
    if (act == Act::kSwiglu) {
      y.resize(kTokens, kHidden);
      for (int64_t r = 0; r < kTokens; ++r) {
        for (int64_t c = 0; c < kHidden; ++c) {
          y(r, c) = paritron::ref::round_to(
              paritron::ref::activation_value(Activation::kSilu, a(r, c)) * a(r, kHidden + c), DType::F64);
        }
      }
    } else {
      y = paritron::ref::activation_forward(act == Act::kBiasGeluTanh ? Activation::kBiasGeluTanh : Activation::kGelu,
                                            a, DType::F64);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, act_elements(act), DType::F64);
}

// ---------------------------------------------------------------------------
// Bias-dropout-add [2048, 1024], p = 0.1 (training): reads x and the
// residual, writes the output.

void BM_OptimizedBiasDropoutAdd(benchmark::State& state, DType dtype) {
  auto& be = backend();
  const DTensor x = up(random_mat(kTokens, kHidden, 11), dtype);
  const DTensor r = up(random_mat(kTokens, kHidden, 12), dtype);
  const DTensor b = up(random_mat(1, kHidden, 13), dtype, {kHidden});
  DTensor y = be.empty(dtype, {kTokens, kHidden});
  paritron::opt::DropoutArgs args;
  args.p = 0.1;
  args.key = paritron::rng_key(1234, "dropout");
  for (auto _ : state) {
    be.bias_dropout_add(args, x, &b, &r, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 3 * kNH, dtype);
}

void BM_ReferenceBiasDropoutAdd(benchmark::State& state) {
  const Mat x = random_mat(kTokens, kHidden, 11), r = random_mat(kTokens, kHidden, 12);
  const Mat b = random_mat(1, kHidden, 13);
  paritron::ref::RunContext ctx;
  ctx.training = true;
  ctx.seed = 1234;
  const paritron::ref::Precision p = paritron::ref::truth_precision();
  for (auto _ : state) {
    auto f = paritron::ref::bias_dropout_add_forward(x, b, r, 0.1, ctx, "dropout", p);
    benchmark::DoNotOptimize(f.output.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 3 * kNH, DType::F64);
}

// ---------------------------------------------------------------------------
// Registration: one benchmark per row, named explicitly (no /Args suffixes).

template <class Fn, class... A>
void reg(const std::string& component, const char* impl, const std::string& shape, DType dtype,
         benchmark::TimeUnit unit, Fn fn, A... args) {
  const std::string name = fmt::format("{}/{}/{}/{}", component, impl, shape, row_dtype(dtype));
  benchmark::RegisterBenchmark(name.c_str(), fn, args...)->Unit(unit)->UseRealTime();
}

const bool kRegistered = [] {
  using benchmark::kMicrosecond;
  using benchmark::kMillisecond;
  for (const GemmShape& sh : kGemmShapes) {
    reg("gemm", "bare_gemm", sh.name(), DType::F32, kMillisecond, BM_BareSgemm, sh);
  }
  for (const GemmShape& sh : kGemmShapes) {
    reg("linear_fwd", "reference", sh.name(), DType::F64, kMillisecond, BM_ReferenceLinear, sh);
    for (DType d : {DType::F32, DType::BF16}) {
      reg("linear_fwd", "optimized", sh.name(), d, kMillisecond, BM_OptimizedLinear, sh, d);
    }
  }
  const std::string& s = kElementwiseShape;
  const DType opt_dtypes[] = {DType::F32, DType::BF16};
  reg("layernorm_fwd", "reference", s, DType::F64, kMicrosecond, BM_ReferenceLayerNorm);
  for (DType d : opt_dtypes) reg("layernorm_fwd", "optimized", s, d, kMicrosecond, BM_OptimizedLayerNorm, d);
  reg("layernorm_bwd", "reference", s, DType::F64, kMicrosecond, BM_ReferenceLayerNormBackward);
  for (DType d : opt_dtypes) reg("layernorm_bwd", "optimized", s, d, kMicrosecond, BM_OptimizedLayerNormBackward, d);
  reg("rope_fwd", "reference", s, DType::F64, kMicrosecond, BM_ReferenceRope);
  for (DType d : opt_dtypes) reg("rope_fwd", "optimized", s, d, kMicrosecond, BM_OptimizedRope, d);
  for (auto [comp, act] : {std::pair<const char*, Act>{"bias_gelu_fwd", Act::kBiasGeluTanh},
                           {"bias_gelu_erf_fwd", Act::kBiasGeluErf},
                           {"swiglu_fwd", Act::kSwiglu}}) {
    reg(comp, "reference", s, DType::F64, kMicrosecond, BM_ReferenceBiasAct, act);
    for (DType d : opt_dtypes) reg(comp, "optimized", s, d, kMicrosecond, BM_OptimizedBiasAct, act, d);
  }
  reg("bias_dropout_add_fwd", "reference", s, DType::F64, kMicrosecond, BM_ReferenceBiasDropoutAdd);
  for (DType d : opt_dtypes) reg("bias_dropout_add_fwd", "optimized", s, d, kMicrosecond, BM_OptimizedBiasDropoutAdd, d);
  return true;
}();

}  // namespace
