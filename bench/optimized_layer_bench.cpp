// The optimized implementation's speed on a whole transformer layer on the
// CPU backend (issue #5's target shape: hidden 1024, 16 heads, ffn 4096,
// seq 2048, batch 1, causal, fp32; compared by ci/bench with PyTorch on the
// CPU running the same layer, bench/torch_layer.py). Weights come from
// Megatron's init drawn by the counter-based RNG (common/init.h), inputs are
// uniform; weights are loaded once and each iteration runs the layer's
// forward (or forward + backward) exactly as run_optimized does on one rank.
// Names and counters follow bench/README.md.
//
//   build/release/bench/optimized_layer_bench --benchmark_filter=h1024
#include <benchmark/benchmark.h>

#include <fmt/format.h>

#include "bench/layer_case.h"
#include "optimized/run_case.h"

namespace {

using paritron::Case;
using paritron::DType;
using paritron::bench::forward_flops;

Case layer_case(int64_t hidden, int64_t heads, int64_t ffn, int64_t seq) {
  return paritron::bench::layer_case(hidden, heads, ffn, seq, DType::F32);
}

void run(benchmark::State& state, int64_t hidden, int64_t heads, int64_t ffn, int64_t seq, bool backward) {
  paritron::opt::SingleRankModel model(layer_case(hidden, heads, ffn, seq));
  for (auto _ : state) {
    if (backward) {
      model.forward_backward();
    } else {
      model.forward();
    }
  }
  const double flops = forward_flops(static_cast<double>(hidden), static_cast<double>(ffn), static_cast<double>(seq));
  state.counters["flops"] = backward ? 3 * flops : flops;
}

void register_layer(int64_t hidden, int64_t heads, int64_t ffn, int64_t seq, int iterations) {
  const std::string shape = fmt::format("h{}_a{}_f{}_s{}_b1", hidden, heads, ffn, seq);
  for (bool backward : {false, true}) {
    const std::string name =
        fmt::format("transformer_layer_{}/optimized/{}/fp32", backward ? "fwd_bwd" : "fwd", shape);
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { run(s, hidden, heads, ffn, seq, backward); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(iterations)
        ->Repetitions(3)
        ->ReportAggregatesOnly(false);
  }
}

const bool kRegistered = [] {
  register_layer(128, 4, 512, 128, 20);
  register_layer(1024, 16, 4096, 2048, 2);
  return true;
}();

}  // namespace
