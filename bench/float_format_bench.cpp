// Throughput of the exact dtype conversions (common/math/float_format.h): the
// generic double -> format encode used by the reference's emulation and
// Tensor::set, against the fast fp32 -> bf16 path kernels use. Items are
// elements converted; compare ratios within one run only.
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include "common/math/float_format.h"

namespace {

using paritron::math::FloatFormat;

std::vector<float> inputs(size_t n) {
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

void BM_Encode(benchmark::State& state, const FloatFormat* format) {
  const std::vector<float> x = inputs(1 << 16);
  std::vector<uint32_t> out(x.size());
  for (auto _ : state) {
    for (size_t i = 0; i < x.size(); ++i) out[i] = paritron::math::encode(x[i], *format);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * x.size()));
}

void BM_Decode(benchmark::State& state, const FloatFormat* format) {
  std::vector<uint32_t> codes(1 << 16);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint32_t>(i) & ((1u << paritron::math::total_bits(*format)) - 1);
  std::vector<double> out(codes.size());
  for (auto _ : state) {
    for (size_t i = 0; i < codes.size(); ++i) out[i] = paritron::math::decode(codes[i], *format);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * codes.size()));
}

void BM_FastBf16(benchmark::State& state) {
  const std::vector<float> x = inputs(1 << 16);
  std::vector<uint16_t> out(x.size());
  for (auto _ : state) {
    for (size_t i = 0; i < x.size(); ++i) out[i] = paritron::math::float_to_bf16_bits(x[i]);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * x.size()));
}

BENCHMARK_CAPTURE(BM_Encode, bf16, &paritron::math::kBFloat16);
BENCHMARK(BM_FastBf16);
BENCHMARK_CAPTURE(BM_Encode, fp16, &paritron::math::kFloat16);
BENCHMARK_CAPTURE(BM_Encode, e4m3, &paritron::math::kFloat8E4M3);
BENCHMARK_CAPTURE(BM_Decode, fp16, &paritron::math::kFloat16);
BENCHMARK_CAPTURE(BM_Decode, e4m3, &paritron::math::kFloat8E4M3);

}  // namespace
