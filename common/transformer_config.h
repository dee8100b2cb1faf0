// TransformerConfig: Megatron-core's TransformerConfig together with the
// ModelParallelConfig fields it uses, under Megatron's names, with Megatron's
// defaults, derived defaults and validation.
//
// Source: megatron/core/transformer/transformer_config.py and
// megatron/core/model_parallel_config.py at core_v0.5.0 (the primary version,
// shared/spec/megatron-semantics.md §1); fields added later that Paritron
// models carry their newest (core_v0.19.0) defaults and say since when they
// exist. rotary_percent, rotary_base and seq_len_interpolation_factor are
// Paritron fields: in 0.5.0 they are GPTModel / RotaryEmbedding arguments
// (spec §1.2, §5.1), carried here so one config describes a whole case.
//
// check_config() follows TransformerConfig.__post_init__ in Megatron's order
// (spec §1.3), then the checks Megatron makes elsewhere (layers, router,
// parallel_state), then the newer-version rules and Paritron's own rules for
// what no Megatron module could build or run. Every rule is cited in
// transformer_config.cpp. JSON load/save (case files' `config` metadata,
// shared/spec/case-format.md) is in config_json.cpp; introspection of the
// field catalog is in config_json.h.
//
// Deliberately left out: fields that do not change numerics (timers,
// callbacks, comm-overlap and offloading switches, CUDA-graph knobs); the JSON
// loader accepts and ignores them. Callables are names: activation_func is one
// of kActivationNames, init methods are recorded, not interpreted (Paritron's
// init is Philox-based; nullopt means Megatron's default normal init).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/dtype.h"
#include "common/error.h"

namespace paritron {

// Activation functions Paritron implements, by the name of Megatron's (or
// torch's) Python function:
//   gelu          F.gelu, exact: 0.5 x (1 + erf(x / sqrt 2))  (Megatron's default)
//   silu          F.silu: x sigmoid(x)  (SwiGLU with gated_linear_unit)
//   relu          F.relu
//   squared_relu  relu(x)^2  (megatron/core/activations.py; arguments.py in 0.5.0)
//   openai_gelu   0.5 x (1 + tanh(0.7978845608028654 x (1 + 0.044715 x^2)))
//                 (megatron/core/transformer/utils.py)
//   erf_gelu      0.5 x (erf(x / 1.41421) + 1): note the truncated constant
//                 (megatron/core/transformer/utils.py)
//   quick_gelu    x sigmoid(1.702 x)  (megatron/core/activations.py, newer)
inline constexpr std::array<std::string_view, 7> kActivationNames = {
    "gelu", "silu", "relu", "squared_relu", "openai_gelu", "erf_gelu", "quick_gelu"};
bool is_known_activation(std::string_view name);

struct TransformerConfig {
  // ===================== ModelParallelConfig: model parallelism =====================
  int64_t tensor_model_parallel_size = 1;    // TP size p: heads, query groups, ffn split over p
  int64_t context_parallel_size = 1;         // CP size; > 1 only with TE attention (spec §10.6)
  int64_t pipeline_model_parallel_size = 1;  // PP size: num_layers / pp layers per stage
  std::optional<int64_t> virtual_pipeline_model_parallel_size;  // interleaved-schedule model chunks per PP rank
  bool sequence_parallel = false;            // SP: activations outside TP regions split along s
  int64_t expert_model_parallel_size = 1;    // EP size: experts split over ep ranks
  std::optional<int64_t> expert_tensor_parallel_size;  // (0.10+) TP inside experts; None = TP size

  // ===================== ModelParallelConfig: initialization =====================
  bool perform_initialization = true;   // if false, weights are allocated but not initialised
  bool use_cpu_initialization = false;  // init the fp32 master weight on CPU, then slice (spec §13)

  // ===================== ModelParallelConfig: training =====================
  bool fp16 = false;                  // fp16 mixed precision (softmax upcast, spec §2)
  bool bf16 = false;                  // bf16 mixed precision (softmax upcast, spec §2)
  DType params_dtype = DType::F32;    // dtype weights are allocated in (torch.float32)

  // ===================== ModelParallelConfig: optimizations =====================
  bool gradient_accumulation_fusion = false;  // wgrad accumulated into an fp32 main_grad

  // ===================== ModelParallelConfig: pipeline parallel =====================
  std::optional<DType> pipeline_dtype;  // dtype of activations sent between stages; required when pp > 1
  bool enable_autocast = false;         // run the forward step under torch.autocast
  std::optional<DType> autocast_dtype;  // autocast dtype; None -> params_dtype

  // ===================== ModelParallelConfig: CPU offloading =====================
  bool cpu_offloading = false;            // offload activations to CPU (no numeric effect, but validated)
  int64_t cpu_offloading_num_layers = 0;  // layers whose activations are offloaded; must be < num_layers

  // ===================== TransformerConfig: model architecture =====================
  int64_t num_layers = 0;                       // layers in the whole model (all pipeline stages)
  int64_t hidden_size = 0;                      // h
  int64_t num_attention_heads = 0;              // n
  std::optional<int64_t> num_query_groups;      // g (GQA when g < n); None -> n
  std::optional<int64_t> ffn_hidden_size;       // f; None -> 4 h
  std::optional<int64_t> kv_channels;           // hn, per-head width; None -> h // n
  double hidden_dropout = 0.1;                  // dropout in bias-dropout-add
  double attention_dropout = 0.1;               // dropout on attention probabilities
  bool fp32_residual_connection = false;        // keep the residual stream in fp32
  bool apply_residual_connection_post_layernorm = false;  // unused by the 0.5.0 layer (spec §14 #21)
  double layernorm_epsilon = 1e-5;              // eps of LayerNorm and RMSNorm
  bool layernorm_zero_centered_gamma = false;   // norm scales by (1 + weight)
  bool add_bias_linear = true;                  // bias in linear_qkv, linear_proj, linear_fc1, linear_fc2
  bool add_qkv_bias = false;                    // bias in linear_qkv only
  bool gated_linear_unit = false;               // fc1 width 2f, act(first half) * second half
  std::string activation_func = "gelu";         // MLP activation, one of kActivationNames
  std::optional<int64_t> num_moe_experts;       // E; set -> the MLP is a MoE layer
  bool rotary_interleaved = false;              // RoPE pairs (2i, 2i+1) instead of (c, c + rot/2)
  std::optional<std::array<int64_t, 2>> window_size;  // sliding window (TE attention only); -1 = infinite
  bool qk_layernorm = false;                    // (0.6+) normalization applied to q and k per head
  std::optional<double> softmax_scale;          // (0.11+) attention scale; None -> 1 / sqrt(kv_channels)
  double rotary_percent = 1.0;                  // (Paritron; GPTModel arg) fraction of hn that rotates
  double rotary_base = 10000;                   // (Paritron; GPTModel arg) RoPE base
  std::optional<double> seq_len_interpolation_factor;  // (Paritron; GPTModel arg) RoPE positions scaled by 1/factor

  // ===================== TransformerConfig: initialization =====================
  std::optional<std::string> init_method;               // recorded name; None -> N(0, init_method_std)
  std::optional<std::string> output_layer_init_method;  // recorded name; None -> N(0, std / sqrt(2 num_layers))
  double init_method_std = 0.02;                        // std of the default init methods

  // ===================== TransformerConfig: mixed precision =====================
  bool apply_query_key_layer_scaling = false;  // scale scores by 1/layer_number (forces fp32 softmax)
  bool attention_softmax_in_fp32 = true;       // upcast softmax to fp32 when fp16/bf16

  // ===================== TransformerConfig: fusion =====================
  bool bias_activation_fusion = false;       // fused bias+gelu (tanh form!) or bias+swiglu (spec §6.3)
  bool masked_softmax_fusion = false;        // fused scale-mask-softmax kernels (same math)
  bool persist_layer_norm = false;           // Apex persistent LN kernel (same math)
  bool memory_efficient_layer_norm = false;  // Apex memory-efficient LN (same math)
  bool bias_dropout_fusion = false;          // jit-fused bias-dropout-add (same math)
  bool apply_rope_fusion = false;            // fused RoPE kernel (non-interleaved only)

  // ===================== TransformerConfig: activation recomputation =====================
  std::optional<std::string> recompute_granularity;  // "full" or "selective" (numerics identical)
  std::optional<std::string> recompute_method;       // "uniform" or "block"
  std::optional<int64_t> recompute_num_layers;       // layers per recompute unit (full granularity)
  std::optional<bool> distribute_saved_activations;  // split saved activations over TP (not with SP)

  // ===================== TransformerConfig: fp8 =====================
  std::optional<std::string> fp8;                      // "e4m3" or "hybrid" (spec §12); None = off
  int64_t fp8_margin = 0;                              // scale = fp8_max / amax / 2^margin
  int64_t fp8_interval = 1;                            // steps between scale updates
  int64_t fp8_amax_history_len = 1;                    // amax history window
  std::string fp8_amax_compute_algo = "most_recent";   // "most_recent" or "max" over the history
  bool fp8_wgrad = true;                               // wgrad GEMM in fp8 too
  std::optional<std::string> fp8_recipe = "delayed";   // (0.12+) TE recipe; Paritron models "delayed"

  // ===================== TransformerConfig: miscellaneous =====================
  bool clone_scatter_output_in_embedding = true;  // embedding only

  // ===================== TransformerConfig: experimental =====================
  std::string normalization = "LayerNorm";  // "LayerNorm" or "RMSNorm"

  // ===================== TransformerConfig: MoE =====================
  std::string moe_router_load_balancing_type = "aux_loss";  // "aux_loss", "sinkhorn" or "none"
  int64_t moe_router_topk = 2;                     // k experts per token
  bool moe_grouped_gemm = false;                   // GroupedMLP experts (no bias)
  double moe_aux_loss_coeff = 0;                   // aux-loss coefficient (0 = no aux loss)
  std::optional<double> moe_z_loss_coeff;          // z-loss coefficient; None = off
  std::optional<double> moe_input_jitter_eps;      // multiplicative logit jitter U(1-eps, 1+eps); None = off
  bool moe_token_dropping = false;                 // unsupported in 0.5.0 (dropless only)
  std::optional<int64_t> moe_ffn_hidden_size;      // (0.10+) expert ffn width; None -> ffn_hidden_size with MoE
  bool moe_router_pre_softmax = false;             // (0.8+) softmax over all E before top-k
  std::string moe_router_score_function = "softmax";     // (0.11+) "softmax" or "sigmoid"
  std::optional<double> moe_router_topk_scaling_factor;  // (0.11+) multiplies the routing scores
  bool moe_router_enable_expert_bias = false;      // (0.11+) per-expert bias for selection (sigmoid only)
  std::optional<std::string> moe_router_dtype;     // (0.12+) "fp32" or "fp64" routing dtype; None = activations'
  std::optional<double> moe_expert_capacity_factor;  // (0.7+) capacity = ceil(T k / E * c); None = dropless
  bool moe_pad_expert_input_to_capacity = false;   // (0.7+) pad each expert's tokens to capacity
  std::string moe_token_drop_policy = "probs";     // (0.7+) "probs" or "position"

  friend bool operator==(const TransformerConfig&, const TransformerConfig&) = default;
};

// Fills the derived defaults in Megatron's order (autocast_dtype,
// ffn_hidden_size, kv_channels, num_query_groups, moe_ffn_hidden_size; forces
// attention_softmax_in_fp32 under query-key layer scaling; resets a negative
// moe_expert_capacity_factor) and returns every broken rule, in rule order.
// Never throws for bad values and never divides by zero.
std::vector<ConfigIssue> check_config(TransformerConfig& cfg);

// check_config, then throws ConfigError carrying all issues if there are any.
void validate_config(TransformerConfig& cfg);

struct LoadedConfig {
  TransformerConfig config;
  std::vector<std::string> ignored_fields;  // accepted Megatron fields present in the input but not stored
};

// Parses a JSON object of Megatron field names (case-format.md "config"):
// fields left out keep their defaults; dataclasses.asdict output of any
// Megatron-core 0.5 .. 0.19 config loads. Throws ConfigError listing every
// problem (a parse error has field "<json>"); with validate, runs check_config
// (derived defaults filled in) and throws its issues too.
LoadedConfig config_from_json_text(std::string_view json_text, bool validate = true);

// Every typed field under Megatron's name, in struct order, dtypes by torch
// name ("float32"), callables by name. load(save(cfg)) == cfg for finite values.
std::string config_to_json_text(const TransformerConfig& cfg, int indent = 2);

// init_method_std / sqrt(2 num_layers): std of output_layer_init_method
// (linear_proj, linear_fc2) when it is Megatron's default (spec §13).
double output_layer_init_std(const TransformerConfig& cfg);

// Rotating channels per head: int(kv_channels * rotary_percent) when
// rotary_percent < 1, else kv_channels (spec §5.1). Needs a validated config.
int64_t rotary_dim(const TransformerConfig& cfg);

}  // namespace paritron
