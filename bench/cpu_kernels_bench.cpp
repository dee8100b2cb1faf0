// The CPU backend's kernels (optimized/cpu/cpu_backend.h) at a layer's shapes
// (tokens 2048, hidden 1024, ffn 4096), against a bare OpenBLAS GEMM and the
// float64 reference components (reference/*.h), for the targets:
// linear layers >= 80% of a bare GEMM of the same shape, and the fused kernels'
// speed-up over the reference.
//
//   build/release/bench/cpu_kernels_bench --benchmark_min_time=1
// Counters: GFLOP/s for GEMMs; GB/s for the memory-bound kernels, counting the
// bytes of fp32 storage the kernel must read and write (the reference runs on
// the same logical tensors, so the ratio of the counters is the speed-up).
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <random>
#include <vector>

#include "common/dtype.h"
#include "common/rng.h"
#include "optimized/cpu/cpu_backend.h"
#include "reference/activations.h"
#include "reference/bias_dropout_add.h"
#include "reference/core.h"
#include "reference/norm.h"
#include "reference/rotary_pos_emb.h"

namespace {

using paritron::DType;
using paritron::opt::DTensor;
using paritron::ref::Mat;

constexpr int64_t kTokens = 2048;
constexpr int64_t kHidden = 1024;

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

void gbps(benchmark::State& state, double bytes_per_iter) {
  state.counters["GB/s"] = benchmark::Counter(bytes_per_iter * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// ---------------------------------------------------------------------------
// GEMM: y [T, out] = x [T, in] W[out, in]^T (+ b), Megatron's linear layout.

void set_gflops(benchmark::State& state, int64_t m, int64_t n, int64_t k) {
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(m * n * k) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void BM_BareSgemm(benchmark::State& state) {
  const int64_t in = state.range(0), out = state.range(1);
  std::vector<float> x(static_cast<size_t>(kTokens * in)), w(static_cast<size_t>(out * in)),
      y(static_cast<size_t>(kTokens * out));
  std::mt19937 gen(1);
  std::normal_distribution<float> d;
  for (float& v : x) v = d(gen);
  for (float& v : w) v = d(gen);
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(kTokens), static_cast<int>(out),
                static_cast<int>(in), 1.0f, x.data(), static_cast<int>(in), w.data(), static_cast<int>(in), 0.0f,
                y.data(), static_cast<int>(out));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_gflops(state, kTokens, out, in);
}

// Backend::gemm with the bias epilogue; range(2): 0 = fp32, 1 = bf16 values
// (fp32 accumulation, output rounded to bf16).
void BM_BackendLinear(benchmark::State& state) {
  const int64_t in = state.range(0), out = state.range(1);
  const DType dtype = state.range(2) ? DType::BF16 : DType::F32;
  auto& be = backend();
  const DTensor x = up(random_mat(kTokens, in, 1), dtype);
  const DTensor w = up(random_mat(out, in, 2), dtype);
  const DTensor b = up(random_mat(1, out, 3), dtype, {out});
  DTensor y = be.empty(dtype, {kTokens, out});
  for (auto _ : state) {
    be.gemm(x, false, w, true, y, 1.0f, 0.0f, &b);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_gflops(state, kTokens, out, in);
}

void linear_shapes(benchmark::internal::Benchmark* b) {
  for (auto [in, out] : {std::pair<int64_t, int64_t>{1024, 3072}, {1024, 1024}, {1024, 4096}, {4096, 1024}}) {
    b->Args({in, out});
  }
}
void linear_shapes_dtype(benchmark::internal::Benchmark* b) {
  for (auto [in, out] : {std::pair<int64_t, int64_t>{1024, 3072}, {1024, 1024}, {1024, 4096}, {4096, 1024}}) {
    b->Args({in, out, 0});
    b->Args({in, out, 1});
  }
}
BENCHMARK(BM_BareSgemm)->Apply(linear_shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_BackendLinear)->Apply(linear_shapes_dtype)->Unit(benchmark::kMillisecond)->UseRealTime();

// ---------------------------------------------------------------------------
// LayerNorm forward [2048, 1024].

void BM_BackendLayerNorm(benchmark::State& state) {
  const DType dtype = state.range(0) ? DType::BF16 : DType::F32;
  auto& be = backend();
  const DTensor x = up(random_mat(kTokens, kHidden, 4), dtype);
  const DTensor g = up(random_mat(1, kHidden, 5), dtype, {kHidden});
  const DTensor b = up(random_mat(1, kHidden, 6), dtype, {kHidden});
  DTensor y = be.empty(dtype, {kTokens, kHidden});
  DTensor mean = be.empty(DType::F32, {kTokens}), rstd = be.empty(DType::F32, {kTokens});
  for (auto _ : state) {
    be.norm_forward(paritron::opt::NormArgs{}, x, g, &b, y, mean, rstd);
    benchmark::DoNotOptimize(y.data());
  }
  gbps(state, 2.0 * kTokens * kHidden * 4);
}

void BM_ReferenceLayerNorm(benchmark::State& state) {
  paritron::TransformerConfig cfg;
  const Mat x = random_mat(kTokens, kHidden, 4);
  paritron::ref::MatMap params{{"ln.weight", random_mat(1, kHidden, 5)}, {"ln.bias", random_mat(1, kHidden, 6)}};
  const paritron::ref::Precision p = paritron::ref::truth_precision();
  for (auto _ : state) {
    auto f = paritron::ref::layernorm_forward(cfg, paritron::ref::Params(params).sub("ln"), x, p);
    benchmark::DoNotOptimize(f.output.data());
  }
  gbps(state, 2.0 * kTokens * kHidden * 4);
}

void BM_BackendLayerNormBackward(benchmark::State& state) {
  auto& be = backend();
  const DTensor x = up(random_mat(kTokens, kHidden, 4), DType::BF16);
  const DTensor dy = up(random_mat(kTokens, kHidden, 7), DType::BF16);
  const DTensor g = up(random_mat(1, kHidden, 5), DType::BF16, {kHidden});
  const DTensor b = up(random_mat(1, kHidden, 6), DType::BF16, {kHidden});
  DTensor y = be.empty(DType::BF16, {kTokens, kHidden}), dx = be.empty(DType::BF16, {kTokens, kHidden});
  DTensor mean = be.empty(DType::F32, {kTokens}), rstd = be.empty(DType::F32, {kTokens});
  DTensor dg = be.zeros(DType::F32, {kHidden}), db = be.zeros(DType::F32, {kHidden});
  be.norm_forward(paritron::opt::NormArgs{}, x, g, &b, y, mean, rstd);
  for (auto _ : state) {
    be.norm_backward(paritron::opt::NormArgs{}, x, g, mean, rstd, dy, dx, dg, &db);
    benchmark::DoNotOptimize(dx.data());
  }
  gbps(state, 3.0 * kTokens * kHidden * 4);
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
  }
  gbps(state, 3.0 * kTokens * kHidden * 4);
}

BENCHMARK(BM_BackendLayerNorm)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_ReferenceLayerNorm)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_BackendLayerNormBackward)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_ReferenceLayerNormBackward)->Unit(benchmark::kMicrosecond)->UseRealTime();

// ---------------------------------------------------------------------------
// RoPE: s 1024, b 2, 16 heads of 64 ([2048, 1024] rows).

constexpr int64_t kSeq = 1024, kBatch = 2, kHeads = 16, kHn = 64;

Mat rope_freqs() {
  paritron::TransformerConfig cfg;
  cfg.kv_channels = kHn;
  return paritron::ref::rotary_freqs(cfg, kSeq);
}

void BM_BackendRope(benchmark::State& state) {
  const DType dtype = state.range(0) ? DType::BF16 : DType::F32;
  auto& be = backend();
  const DTensor x = up(random_mat(kSeq * kBatch, kHeads * kHn, 8), dtype, {kSeq, kBatch, kHeads, kHn});
  const DTensor freqs = up(rope_freqs(), DType::F32);
  DTensor y = be.empty(dtype, {kSeq, kBatch, kHeads, kHn});
  const paritron::opt::RopeArgs args{kBatch, kHeads, kHn, kHn, false};
  for (auto _ : state) {
    be.rope(args, x, freqs, y, false);
    benchmark::DoNotOptimize(y.data());
  }
  gbps(state, 2.0 * kTokens * kHidden * 4);
}

void BM_ReferenceRope(benchmark::State& state) {
  const Mat x = random_mat(kSeq * kBatch, kHeads * kHn, 8);
  const Mat freqs = rope_freqs();
  const paritron::ref::Precision p = paritron::ref::truth_precision();
  for (auto _ : state) {
    auto y = paritron::ref::apply_rotary_pos_emb_forward(x, kBatch, kHeads, freqs, false, p);
    benchmark::DoNotOptimize(y.data());
  }
  gbps(state, 2.0 * kTokens * kHidden * 4);
}

BENCHMARK(BM_BackendRope)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_ReferenceRope)->Unit(benchmark::kMicrosecond)->UseRealTime();

// ---------------------------------------------------------------------------
// Bias-gelu (fused tanh form) [2048, 1024].

void BM_BackendBiasGelu(benchmark::State& state) {
  const DType dtype = state.range(0) ? DType::BF16 : DType::F32;
  auto& be = backend();
  const DTensor x = up(random_mat(kTokens, kHidden, 9), dtype);
  const DTensor b = up(random_mat(1, kHidden, 10), dtype, {kHidden});
  DTensor y = be.empty(dtype, {kTokens, kHidden});
  const paritron::opt::ActivationArgs args{paritron::opt::ActivationKind::kBiasGeluTanh, false};
  for (auto _ : state) {
    be.bias_act_forward(args, x, &b, y);
    benchmark::DoNotOptimize(y.data());
  }
  gbps(state, 2.0 * kTokens * kHidden * 4);
}

void BM_ReferenceBiasGelu(benchmark::State& state) {
  const Mat x = random_mat(kTokens, kHidden, 9);
  const Mat b = random_mat(1, kHidden, 10);
  for (auto _ : state) {
    Mat a = x;
    a.rowwise() += b.row(0);
    auto y = paritron::ref::activation_forward(paritron::ref::Activation::kBiasGeluTanh, a, DType::F64);
    benchmark::DoNotOptimize(y.data());
  }
  gbps(state, 2.0 * kTokens * kHidden * 4);
}

// Other MLP activations at the same output shape [2048, 1024], bf16: range(0)
// 0 = gelu (erf, Megatron's default), 1 = swiglu (silu GLU: input [2048, 2048]).
void BM_BackendActivation(benchmark::State& state) {
  const bool swiglu = state.range(0) == 1;
  auto& be = backend();
  const int64_t in_w = swiglu ? 2 * kHidden : kHidden;
  const DTensor x = up(random_mat(kTokens, in_w, 9), DType::BF16);
  const DTensor b = up(random_mat(1, in_w, 10), DType::BF16, {in_w});
  DTensor y = be.empty(DType::BF16, {kTokens, kHidden});
  const paritron::opt::ActivationArgs args{
      swiglu ? paritron::opt::ActivationKind::kSilu : paritron::opt::ActivationKind::kGelu, swiglu};
  for (auto _ : state) {
    be.bias_act_forward(args, x, &b, y);
    benchmark::DoNotOptimize(y.data());
  }
  gbps(state, static_cast<double>(kTokens * (in_w + kHidden) * 4));
}

BENCHMARK(BM_BackendBiasGelu)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_BackendActivation)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_ReferenceBiasGelu)->Unit(benchmark::kMicrosecond)->UseRealTime();

// ---------------------------------------------------------------------------
// Bias-dropout-add [2048, 1024], p = 0.1 (training).

void BM_BackendBiasDropoutAdd(benchmark::State& state) {
  const DType dtype = state.range(0) ? DType::BF16 : DType::F32;
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
  }
  gbps(state, 3.0 * kTokens * kHidden * 4);
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
  }
  gbps(state, 3.0 * kTokens * kHidden * 4);
}

BENCHMARK(BM_BackendBiasDropoutAdd)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_ReferenceBiasDropoutAdd)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
