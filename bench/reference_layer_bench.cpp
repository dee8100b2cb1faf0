// The float64 reference's speed on a whole transformer layer (issue #3's
// target: hidden 1024, 16 heads, ffn 4096, seq 2048, batch 1, causal,
// forward + backward in under a minute on the 2-core development machine),
// forward only at the same shape, and a small layer for quick regression
// tracking and the quick optimized/reference ratio. Each iteration is
// run_reference on a layer case, what `paritron check` does: forward only
// (ReferenceOptions::backward = false) or forward and backward of every
// weight and the input.
//
// The case is built directly (Megatron-init weights from the counter-based
// RNG, uniform inputs and grad_output, as optimized_layer_bench draws them,
// stored in float64) rather than by make_case, which would run the
// reference twice more to fill the expected outputs (~17 s at h1024).
//
// Names and counters follow bench/README.md:
//   transformer_layer_{fwd,fwd_bwd}/reference/h<h>_a<np>_f<ffn>_s<s>_b1/fp64
// with `flops` per iteration: forward GEMMs 2*s*(4h^2 + 2*h*f) and attention
// 4*s^2*h (the full square: the reference does not skip the causal half);
// forward + backward 3x.
//
//   build/release/bench/reference_layer_bench --benchmark_filter=h1024
#include <benchmark/benchmark.h>

#include <fmt/format.h>

#include "bench/layer_case.h"
#include "reference/run_case.h"

namespace {

using paritron::Case;
using paritron::DType;
using paritron::bench::forward_flops;

Case layer_case(int64_t hidden, int64_t heads, int64_t ffn, int64_t seq) {
  return paritron::bench::layer_case(hidden, heads, ffn, seq, DType::F64);
}

void run(benchmark::State& state, int64_t hidden, int64_t heads, int64_t ffn, int64_t seq, bool backward) {
  const Case c = layer_case(hidden, heads, ffn, seq);
  paritron::ref::ReferenceOptions options;
  options.backward = backward;
  for (auto _ : state) {
    const auto result = paritron::ref::run_reference(c, options);
    if (backward && result.tensors.count("grads.inputs.hidden_states") == 0) {
      state.SkipWithError("run_reference produced no grads.inputs.hidden_states");
      break;
    }
    benchmark::DoNotOptimize(result.tensors.size());
  }
  const double flops = forward_flops(static_cast<double>(hidden), static_cast<double>(ffn), static_cast<double>(seq));
  state.counters["flops"] = backward ? 3 * flops : flops;
}

// iterations 0: Google Benchmark's --benchmark_min_time decides.
void register_layer(int64_t hidden, int64_t heads, int64_t ffn, int64_t seq, int iterations) {
  const std::string shape = fmt::format("h{}_a{}_f{}_s{}_b1", hidden, heads, ffn, seq);
  for (bool backward : {false, true}) {
    const std::string name =
        fmt::format("transformer_layer_{}/reference/{}/fp64", backward ? "fwd_bwd" : "fwd", shape);
    auto* b = benchmark::RegisterBenchmark(name.c_str(),
                                           [=](benchmark::State& s) { run(s, hidden, heads, ffn, seq, backward); })
                  ->UseRealTime()
                  ->Unit(benchmark::kMillisecond);
    if (iterations > 0) b->Iterations(iterations);
  }
}

const bool kRegistered = [] {
  register_layer(128, 4, 512, 128, 0);
  register_layer(1024, 16, 4096, 2048, 1);
  return true;
}();

}  // namespace
