// See make_case.h.
#include "reference/make_case.h"

#include <fmt/format.h>

#include <cmath>

#include "common/error.h"
#include "common/init.h"
#include "common/module_params.h"
#include "common/rng.h"
#include "reference/core.h"
#include "reference/masks.h"
#include "reference/rotary_pos_emb.h"
#include "reference/run_case.h"

namespace paritron::ref {
namespace {

Tensor normal_tensor(const Shape& shape, uint64_t seed, const std::string& name, double mean, double stddev,
                     DType dtype) {
  Tensor t(dtype, shape);
  fill_normal(t, rng_key(seed, name), 0, mean, stddev);
  return t;
}

// Exact mode: centre + i * 2^-shift, i uniform in [-range, range] (an
// integer draw from the counter-based uniform, keyed like the normal draw).
Tensor dyadic_tensor(const Shape& shape, const MakeCaseOptions& o, const std::string& name, double centre,
                     DType dtype) {
  Tensor t(DType::F64, shape);
  const RngKey key = rng_key(o.seed, name);
  const int64_t span = 2 * o.dyadic_range + 1;
  const double step = std::ldexp(1.0, -static_cast<int>(o.dyadic_shift));
  for (int64_t i = 0; i < t.numel(); ++i) {
    int64_t k = static_cast<int64_t>(uniform(key, static_cast<uint64_t>(i)) * static_cast<double>(span));
    if (k >= span) k = span - 1;
    t.set(i, centre + static_cast<double>(k - o.dyadic_range) * step);
  }
  return dtype == DType::F64 ? t : t.to(dtype);
}

// The component whose parameters a case of `component` holds (a router case
// holds the router's "weight").
std::vector<ParamSpec> case_params(const std::string& component, const TransformerConfig& cfg) {
  if (component == "dot_product_attention" || component == "rotary_pos_emb") return {};
  return module_params(component, cfg);
}

// One parameter under `key`: Megatron's init, or the "random" draw.
Tensor draw_param(const ParamSpec& spec, const std::string& key, const TransformerConfig& cfg,
                  const MakeCaseOptions& o) {
  if (o.dyadic) {
    const bool norm_weight = spec.shape.size() == 1 && spec.key.find("bias") == std::string::npos;
    const double centre = norm_weight && !cfg.layernorm_zero_centered_gamma ? 1.0 : 0.0;
    return dyadic_tensor(spec.shape, o, key, centre, o.dtype);
  }
  if (o.weights == "megatron") {
    ParamSpec keyed = spec;
    keyed.key = key;
    return init_parameter(keyed, cfg, o.seed, o.dtype);
  }
  if (spec.shape.size() == 1 && spec.key.find("bias") == std::string::npos) {
    // A norm weight: near its identity value (1, or 0 with zero-centered gamma).
    const double centre = cfg.layernorm_zero_centered_gamma ? 0.0 : 1.0;
    return normal_tensor(spec.shape, o.seed, key, centre, 0.1, o.dtype);
  }
  return normal_tensor(spec.shape, o.seed, key, 0.0, cfg.init_method_std, o.dtype);
}

void add_weights(Case& c, const MakeCaseOptions& o) {
  for (const ParamSpec& spec : case_params(o.component, c.config)) {
    c.tensors["weights." + spec.key] = draw_param(spec, spec.key, c.config, o);
  }
  if (!o.cross_attention || (o.component != "transformer_layer" && o.component != "transformer_block")) return;
  // The GPT specs have no cross attention; an encoder-decoder layer adds
  // pre_cross_attn_layernorm and cross_attention (spec §8.1).
  const bool block = o.component == "transformer_block";
  for (int64_t l = 0; l < (block ? c.config.num_layers : 1); ++l) {
    for (const ParamSpec& spec :
         cross_attention_layer_params(c.config, block ? fmt::format("layers.{}.", l) : std::string())) {
      c.tensors["weights." + spec.key] = draw_param(spec, spec.key, c.config, o);
    }
  }
}

// Key-padding mask [b, 1, sq, sk]: sequence i keeps its first len_i keys. With
// b > 1 the last sequence keeps none, so its rows are fully masked (uniform
// softmax, spec §2.2).
Tensor padding_mask_tensor(const MakeCaseOptions& o, int64_t sq, int64_t sk) {
  const int64_t b = o.micro_batch_size;
  Tensor m(DType::BOOL, {b, 1, sq, sk});
  for (int64_t i = 0; i < b; ++i) {
    int64_t len = 1 + static_cast<int64_t>(uniform(rng_key(o.seed, "inputs.padding_lengths"), i) * sk);
    if (len > sk) len = sk;
    if (b > 1 && i == b - 1) len = 0;
    for (int64_t q = 0; q < sq; ++q)
      for (int64_t k = 0; k < sk; ++k) m.set_int((i * sq + q) * sk + k, k >= len ? 1 : 0);
  }
  return m;
}

void add_mask(Case& c, const MakeCaseOptions& o, const std::string& name, int64_t sq, int64_t sk) {
  if (o.attn_mask_type == "padding") {
    c.tensors["inputs." + name] = padding_mask_tensor(o, sq, sk);
  } else if (o.attn_mask_type == "causal" && o.explicit_mask) {
    c.tensors["inputs." + name] = get_default_causal_mask(sq).to_tensor();
  }
}

Tensor rotary_tensor(const TransformerConfig& cfg, int64_t s) {
  const Mat freqs = rotary_freqs(cfg, s);
  return to_tensor(freqs, {s, 1, 1, freqs.cols()}, DType::F32);  // float32 angles, as Megatron's table
}

void add_inputs(Case& c, const MakeCaseOptions& o) {
  const TransformerConfig& cfg = c.config;
  const int64_t s = o.seq_length, b = o.micro_batch_size, h = cfg.hidden_size;
  const int64_t sk = o.kv_seq_length > 0 ? o.kv_seq_length : s;
  const int64_t hn = *cfg.kv_channels, n = cfg.num_attention_heads, g = *cfg.num_query_groups;
  auto input = [&](const std::string& name, Shape shape) {
    c.tensors["inputs." + name] = o.dyadic ? dyadic_tensor(shape, o, "inputs." + name, 0.0, o.dtype)
                                           : normal_tensor(shape, o.seed, "inputs." + name, 0.0, 1.0, o.dtype);
  };
  const std::string& comp = o.component;
  if (comp == "rotary_pos_emb") {
    input("t", {s, b, n, hn});
    c.tensors["inputs.freqs"] = rotary_tensor(cfg, s);
  } else if (comp == "dot_product_attention") {
    input("query", {s, b, n, hn});
    input("key", {sk, b, g, hn});
    input("value", {sk, b, g, hn});
    add_mask(c, o, "attention_mask", s, sk);
  } else if (comp == "cross_attention") {
    input("hidden_states", {s, b, h});
    input("key_value_states", {sk, b, h});
    add_mask(c, o, "attention_mask", s, sk);
  } else {
    input("hidden_states", {s, b, h});
    if (comp == "self_attention" || comp == "transformer_layer" || comp == "transformer_block") {
      add_mask(c, o, "attention_mask", s, s);
      if (o.rotary) c.tensors["inputs.rotary_pos_emb"] = rotary_tensor(cfg, s);
    }
    if ((comp == "transformer_layer" || comp == "transformer_block") && o.cross_attention) {
      input("context", {sk, b, h});
      if (o.attn_mask_type == "padding") c.tensors["inputs.context_mask"] = padding_mask_tensor(o, s, sk);
    }
  }
}

void add_output_grads(Case& c, const ReferenceResult& forward, const MakeCaseOptions& o) {
  const DType dtype = o.dtype;
  auto draw = [&](const Shape& shape, const std::string& name) {
    return o.dyadic ? dyadic_tensor(shape, o, name, 0.0, dtype) : normal_tensor(shape, *c.seed, name, 0.0, 1.0, dtype);
  };
  for (const std::string name : {"output", "output_bias"}) {
    auto it = forward.tensors.find("outputs." + name);
    if (it == forward.tensors.end()) continue;
    c.tensors["inputs.grad_" + name] = draw(it->second.shape(), "inputs.grad_" + name);
  }
  if (c.component == "moe_router") {  // the router's main result is router_scores
    const Tensor& scores = forward.tensors.at("outputs.router_scores");
    c.tensors["inputs.grad_output"] = draw(scores.shape(), "inputs.grad_output");
  }
}

}  // namespace

Case make_case(const MakeCaseOptions& requested) {
  MakeCaseOptions o = requested;
  const auto& components = case_components();
  if (std::find(components.begin(), components.end(), o.component) == components.end()) {
    throw Error(fmt::format("unknown component '{}'", o.component));
  }
  if (o.seq_length < 1 || o.micro_batch_size < 1 || o.kv_seq_length < 0) {
    throw Error(fmt::format("sequence length {} and micro-batch size {} must be >= 1", o.seq_length,
                            o.micro_batch_size));
  }
  if (o.attn_mask_type.empty()) o.attn_mask_type = o.component == "cross_attention" ? "padding" : "causal";
  if (o.attn_mask_type != "causal" && o.attn_mask_type != "padding" && o.attn_mask_type != "no_mask") {
    throw Error(fmt::format("attn_mask_type '{}' is not causal, padding or no_mask", o.attn_mask_type));
  }
  if (o.weights != "random" && o.weights != "megatron") {
    throw Error(fmt::format("weights '{}' is not random or megatron", o.weights));
  }
  if (o.dtype != DType::F64 && o.dtype != DType::F32) throw Error("case make stores F64 or F32 tensors");
  if (o.dyadic && (o.dyadic_range < 1 || o.dyadic_range > 64 || o.dyadic_shift < 0 || o.dyadic_shift > 8)) {
    throw Error(fmt::format("dyadic_range {} must be in [1, 64] and dyadic_shift {} in [0, 8]", o.dyadic_range,
                            o.dyadic_shift));
  }
  Case c;
  c.component = o.component;
  c.config = o.config;
  validate_config(c.config);
  if ((o.component == "moe_router" || o.component == "moe_layer") && !c.config.num_moe_experts) {
    throw Error(fmt::format("component {} needs num_moe_experts in the config", o.component));
  }
  c.config_json = config_to_json_text(c.config);
  c.layer_number = o.layer_number;
  c.attn_mask_type = o.attn_mask_type;
  c.attn_mask_type_given = true;
  c.training = o.training;
  c.seed = o.seed;
  c.producer = o.dyadic ? fmt::format("paritron reference, float64 (weights: dyadic i * 2^-{}, |i| <= {})",
                                      o.dyadic_shift, o.dyadic_range)
                        : fmt::format("paritron reference, float64 (weights: {})", o.weights);
  add_weights(c, o);
  add_inputs(c, o);
  // Forward first: the output shapes give the shapes of the grad_* inputs;
  // with those in the case, the second run adds the backward.
  ReferenceOptions run;
  run.backward = false;
  ReferenceResult result = run_reference(c, run);
  if (o.backward) {
    add_output_grads(c, result, o);
    run.backward = true;
    result = run_reference(c, run);
  }
  for (const auto& [name, t] : result.tensors) {
    const bool tap = name.rfind("outputs.intermediate.", 0) == 0;
    if (tap && !o.taps) continue;
    c.tensors[name] = t.dtype() == DType::F64 ? t.to(o.dtype) : t;
  }
  return c;
}

}  // namespace paritron::ref
