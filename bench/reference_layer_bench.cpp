// The float64 reference's speed on a whole transformer layer (issue #3's
// target: hidden 1024, 16 heads, ffn 4096, seq 2048, batch 1, causal,
// forward + backward in under a minute on the 2-core development machine),
// and a small layer for quick regression tracking. Weights and inputs are
// drawn once by make_case; each iteration runs forward and backward through
// run_reference, exactly what `paritron check` does on a layer case.
//
//   build/release/bench/reference_layer_bench --benchmark_min_time=1
#include <benchmark/benchmark.h>

#include <fmt/format.h>

#include "common/transformer_config.h"
#include "reference/make_case.h"
#include "reference/run_case.h"

namespace {

paritron::Case layer_case(int64_t hidden, int64_t heads, int64_t seq) {
  paritron::ref::MakeCaseOptions o;
  o.component = "transformer_layer";
  o.config = paritron::config_from_json_text(
                 fmt::format(R"({{"num_layers": 1, "hidden_size": {}, "num_attention_heads": {},
                     "ffn_hidden_size": {}, "hidden_dropout": 0.0, "attention_dropout": 0.0}})",
                             hidden, heads, 4 * hidden))
                 .config;
  o.seq_length = seq;
  o.micro_batch_size = 1;
  o.backward = true;
  o.taps = false;
  return paritron::ref::make_case(o);
}

void BM_ReferenceLayerForwardBackward(benchmark::State& state) {
  const int64_t hidden = state.range(0), heads = state.range(1), seq = state.range(2);
  const paritron::Case c = layer_case(hidden, heads, seq);
  for (auto _ : state) {
    const auto result = paritron::ref::run_reference(c);
    benchmark::DoNotOptimize(result.tensors.size());
  }
  // Model FLOPs of forward + backward (3x forward): GEMMs 2*s*(4h^2 + 2*h*4h) and
  // attention 4*s^2*h (the full square: the reference does not skip the causal half).
  const double s = static_cast<double>(seq), h = static_cast<double>(hidden);
  const double flops = 3 * (2 * s * (4 * h * h + 8 * h * h) + 4 * s * s * h);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_ReferenceLayerForwardBackward)
    ->Args({128, 4, 128})
    ->Args({1024, 16, 2048})
    ->Unit(benchmark::kSecond)
    ->Iterations(1);

}  // namespace
