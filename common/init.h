// Parameter initialisation with Megatron's init rules drawn from Paritron's
// counter-based RNG (common/rng.h), so that any tensor-parallel shard can be
// drawn on its own and equals, bit for bit, the same slice of the whole tensor.
//
// Megatron source: megatron/core/utils.py (init_method_normal,
// scaled_init_method_normal), tensor_parallel/layers.py (linear weights,
// biases always zero), fusions/fused_layer_norm.py (norm weights and biases),
// moe/router.py (router weight), transformer_config.py (the defaults), all at
// core_v0.5.0; shared/spec/megatron-semantics.md §13 (and §10.9: Paritron
// deliberately does not reproduce Megatron's per-rank random streams).
//
//   RNG key    rng_key(seed, name), name = name_prefix + spec.key: the global
//              state-dict key, e.g. "layers.0.self_attention.linear_qkv.weight"
//   element    draw of global flat (row-major) index i of the TP = 1 tensor
//   kNormal             N(0, init_method_std^2)            (init_method_normal)
//   kNormalOutputLayer  N(0, (std / sqrt(2 num_layers))^2)  (scaled_init_method_normal;
//                       linear_proj and linear_fc2, dense and expert)
//   kZeros / kOnes      constants (biases 0, norm weights 1 or 0 with zero-centered gamma)
//
// init_method / output_layer_init_method names in the config are recorded,
// not interpreted: the draws above are Megatron's defaults.
//
// perform_initialization = false (Paritron's decision): Megatron allocates
// linear weights and biases with torch.empty and leaves them unwritten
// (nondeterministic memory); Paritron fills those parameters (ParamSpec::linear)
// with zeros so the result stays deterministic. Norm weights/biases and the
// router weight are initialised as usual, as Megatron does regardless of the flag.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "common/dtype.h"
#include "common/module_params.h"
#include "common/tensor.h"

namespace paritron {

struct TransformerConfig;

// The standard deviation of a normal init (0 for constants).
double init_stddev(Init init, const TransformerConfig& cfg);

// The whole (TP = 1) tensor of `spec`, shape spec.shape, in dtype (a floating
// dtype; values rounded to it with RNE).
Tensor init_parameter(const ParamSpec& spec, const TransformerConfig& cfg, uint64_t seed, DType dtype,
                      std::string_view name_prefix = "");

// What tensor-parallel rank tp_rank of tp_size holds (local_shard_spec): the
// same values, bit for bit, as slicing init_parameter's tensor; a gated fc1
// shard is [gate_r; up_r].
Tensor init_parameter_shard(const ParamSpec& spec, const TransformerConfig& cfg, int64_t tp_size, int64_t tp_rank,
                            uint64_t seed, DType dtype, std::string_view name_prefix = "");

// Every parameter of `component` (module_params), whole, keyed by name_prefix + spec.key.
std::map<std::string, Tensor> init_parameters(std::string_view component, const TransformerConfig& cfg, uint64_t seed,
                                              DType dtype, std::string_view name_prefix = "");

// The slice of a whole tensor a TP shard describes (ranges along shard.axis,
// concatenated): the reference the shard draws are tested against, also
// useful to cut a reference weight for an optimized rank.
Tensor slice_tp_shard(const Tensor& whole, const TpShard& shard);

}  // namespace paritron
