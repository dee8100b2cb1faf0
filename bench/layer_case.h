// The transformer-layer case both layer benchmarks run (reference and
// optimized): GPT local spec, no dropout, Megatron's init drawn from the
// counter-based RNG (common/init.h), uniform inputs and output gradient,
// batch 1; and its model FLOPs (bench/README.md).
#pragma once

#include <fmt/format.h>

#include <string>

#include "common/case_file.h"
#include "common/init.h"
#include "common/rng.h"
#include "common/transformer_config.h"

namespace paritron::bench {

inline Case layer_case(int64_t hidden, int64_t heads, int64_t ffn, int64_t seq, DType dtype) {
  Case c;
  c.component = "transformer_layer";
  c.config = config_from_json_text(fmt::format(R"({{"num_layers": 1, "hidden_size": {}, "num_attention_heads": {},
                     "ffn_hidden_size": {}, "hidden_dropout": 0.0, "attention_dropout": 0.0}})",
                                               hidden, heads, ffn))
                 .config;
  c.config_json = config_to_json_text(c.config);
  for (auto& [key, t] : init_parameters("transformer_layer", c.config, 1, dtype)) c.tensors["weights." + key] = std::move(t);
  for (const char* name : {"hidden_states", "grad_output"}) {
    Tensor t(dtype, {seq, 1, hidden});
    fill_uniform(t, rng_key(1, std::string("inputs.") + name), 0, -1.0, 1.0);
    c.tensors[std::string("inputs.") + name] = std::move(t);
  }
  return c;
}

// Model FLOPs of the forward: GEMMs 2*s*(4h^2 + 2*h*f) and attention 4*s^2*h
// (the full square); forward + backward counts 3x.
inline double forward_flops(double h, double f, double s) { return 2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h; }

}  // namespace paritron::bench
