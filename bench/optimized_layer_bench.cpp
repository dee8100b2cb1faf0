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

#include "common/init.h"
#include "common/rng.h"
#include "common/transformer_config.h"
#include "optimized/run_case.h"

namespace {

using paritron::Case;
using paritron::DType;
using paritron::Tensor;

Case layer_case(int64_t hidden, int64_t heads, int64_t ffn, int64_t seq) {
  Case c;
  c.component = "transformer_layer";
  c.config = paritron::config_from_json_text(
                 fmt::format(R"({{"num_layers": 1, "hidden_size": {}, "num_attention_heads": {},
                     "ffn_hidden_size": {}, "hidden_dropout": 0.0, "attention_dropout": 0.0}})",
                             hidden, heads, ffn))
                 .config;
  for (auto& [key, t] : paritron::init_parameters("transformer_layer", c.config, 1, DType::F32)) {
    c.tensors["weights." + key] = std::move(t);
  }
  for (const char* name : {"hidden_states", "grad_output"}) {
    Tensor t(DType::F32, {seq, 1, hidden});
    paritron::fill_uniform(t, paritron::rng_key(1, std::string("inputs.") + name), 0, -1.0, 1.0);
    c.tensors[std::string("inputs.") + name] = std::move(t);
  }
  return c;
}

// Model FLOPs of the forward: GEMMs 2*s*(4h^2 + 2*h*f) and attention 4*s^2*h,
// the full square (bench/README.md); forward + backward counts 3x.
double forward_flops(double h, double f, double s) { return 2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h; }

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
