// JSON load/save of TransformerConfig: the `config` metadata of case files
// (shared/spec/case-format.md) and the configs under fixtures/configs/.
//
// Input is a JSON object of Megatron field names, typically
// `dataclasses.asdict(config)` from any Megatron-core release 0.5 .. 0.19
// with callables written by name and torch dtypes by str(). Each name is one of:
//   typed                the TransformerConfig members listed once in for_each_field below;
//   private              starts with "_": ignored (dataclass internals);
//   unmodelled numerics  kUnmodelled below: changes the transformer's numbers and Paritron
//                        does not model it: accepted only at Megatron's default (what asdict
//                        lists, including what newer __post_init__ derives from defaults);
//   ignored              any other name in the generated Megatron catalog: it does not change
//                        the numbers of the transformer package (timers, callbacks, overlap,
//                        offloading, CUDA graphs, kernel/backend choices, inference knobs,
//                        embedding / LM-head / loss / optimizer settings) or it only
//                        parameterises a feature whose switch is unmodelled and therefore held
//                        at its default (dsa_*, linear_* for experimental_attention_variant,
//                        mamba_* for is_hybrid_model, mup_* for use_mup, mtp_* for
//                        mtp_num_layers, MLA's q_lora_rank .. mscale for multi_latent_attention,
//                        fp4_recipe for fp4, ...): accepted with any value and reported;
//   unknown              in no release: an error naming it, with a did-you-mean.
#include <algorithm>
#include <cctype>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/config_json.h"
#include "common/strict_json.h"
#include "common/transformer_config.h"

namespace paritron {
namespace {

using Json = nlohmann::ordered_json;

constexpr MegatronField kCatalog[] = {
#define PARITRON_MEGATRON_FIELD(name, first, last, declaring_class) {name, first, last, declaring_class},
#include "common/megatron_config_fields.inc"
#undef PARITRON_MEGATRON_FIELD
};

constexpr std::string_view kParitronOnlyFields[] = {"rotary_percent", "rotary_base",
                                                    "seq_len_interpolation_factor"};

// How a typed member is written in JSON beyond its C++ type.
enum class Kind {
  kPlain,
  kActivation,  // a callable given by name: normalised to the bare function name
  kCallable,    // a callable recorded by name as given (init methods)
};

// The one list of typed fields: (Megatron name, member, kind), in struct order. Used by
// load, save and config_field_names.
template <class Config, class Visit>
void for_each_field(Config& c, Visit&& f) {
  // ModelParallelConfig
  f("tensor_model_parallel_size", c.tensor_model_parallel_size, Kind::kPlain);
  f("context_parallel_size", c.context_parallel_size, Kind::kPlain);
  f("pipeline_model_parallel_size", c.pipeline_model_parallel_size, Kind::kPlain);
  f("virtual_pipeline_model_parallel_size", c.virtual_pipeline_model_parallel_size, Kind::kPlain);
  f("sequence_parallel", c.sequence_parallel, Kind::kPlain);
  f("expert_model_parallel_size", c.expert_model_parallel_size, Kind::kPlain);
  f("expert_tensor_parallel_size", c.expert_tensor_parallel_size, Kind::kPlain);
  f("perform_initialization", c.perform_initialization, Kind::kPlain);
  f("use_cpu_initialization", c.use_cpu_initialization, Kind::kPlain);
  f("fp16", c.fp16, Kind::kPlain);
  f("bf16", c.bf16, Kind::kPlain);
  f("params_dtype", c.params_dtype, Kind::kPlain);
  f("gradient_accumulation_fusion", c.gradient_accumulation_fusion, Kind::kPlain);
  f("pipeline_dtype", c.pipeline_dtype, Kind::kPlain);
  f("enable_autocast", c.enable_autocast, Kind::kPlain);
  f("autocast_dtype", c.autocast_dtype, Kind::kPlain);
  f("cpu_offloading", c.cpu_offloading, Kind::kPlain);
  f("cpu_offloading_num_layers", c.cpu_offloading_num_layers, Kind::kPlain);
  // TransformerConfig: model architecture
  f("num_layers", c.num_layers, Kind::kPlain);
  f("hidden_size", c.hidden_size, Kind::kPlain);
  f("num_attention_heads", c.num_attention_heads, Kind::kPlain);
  f("num_query_groups", c.num_query_groups, Kind::kPlain);
  f("ffn_hidden_size", c.ffn_hidden_size, Kind::kPlain);
  f("kv_channels", c.kv_channels, Kind::kPlain);
  f("hidden_dropout", c.hidden_dropout, Kind::kPlain);
  f("attention_dropout", c.attention_dropout, Kind::kPlain);
  f("fp32_residual_connection", c.fp32_residual_connection, Kind::kPlain);
  f("apply_residual_connection_post_layernorm", c.apply_residual_connection_post_layernorm, Kind::kPlain);
  f("layernorm_epsilon", c.layernorm_epsilon, Kind::kPlain);
  f("layernorm_zero_centered_gamma", c.layernorm_zero_centered_gamma, Kind::kPlain);
  f("add_bias_linear", c.add_bias_linear, Kind::kPlain);
  f("add_qkv_bias", c.add_qkv_bias, Kind::kPlain);
  f("gated_linear_unit", c.gated_linear_unit, Kind::kPlain);
  f("activation_func", c.activation_func, Kind::kActivation);
  f("num_moe_experts", c.num_moe_experts, Kind::kPlain);
  f("rotary_interleaved", c.rotary_interleaved, Kind::kPlain);
  f("window_size", c.window_size, Kind::kPlain);
  f("qk_layernorm", c.qk_layernorm, Kind::kPlain);
  f("softmax_scale", c.softmax_scale, Kind::kPlain);
  f("rotary_percent", c.rotary_percent, Kind::kPlain);
  f("rotary_base", c.rotary_base, Kind::kPlain);
  f("seq_len_interpolation_factor", c.seq_len_interpolation_factor, Kind::kPlain);
  // initialization
  f("init_method", c.init_method, Kind::kCallable);
  f("output_layer_init_method", c.output_layer_init_method, Kind::kCallable);
  f("init_method_std", c.init_method_std, Kind::kPlain);
  // mixed precision
  f("apply_query_key_layer_scaling", c.apply_query_key_layer_scaling, Kind::kPlain);
  f("attention_softmax_in_fp32", c.attention_softmax_in_fp32, Kind::kPlain);
  // fusion
  f("bias_activation_fusion", c.bias_activation_fusion, Kind::kPlain);
  f("masked_softmax_fusion", c.masked_softmax_fusion, Kind::kPlain);
  f("persist_layer_norm", c.persist_layer_norm, Kind::kPlain);
  f("memory_efficient_layer_norm", c.memory_efficient_layer_norm, Kind::kPlain);
  f("bias_dropout_fusion", c.bias_dropout_fusion, Kind::kPlain);
  f("apply_rope_fusion", c.apply_rope_fusion, Kind::kPlain);
  // activation recomputation
  f("recompute_granularity", c.recompute_granularity, Kind::kPlain);
  f("recompute_method", c.recompute_method, Kind::kPlain);
  f("recompute_num_layers", c.recompute_num_layers, Kind::kPlain);
  f("distribute_saved_activations", c.distribute_saved_activations, Kind::kPlain);
  // fp8
  f("fp8", c.fp8, Kind::kPlain);
  f("fp8_margin", c.fp8_margin, Kind::kPlain);
  f("fp8_interval", c.fp8_interval, Kind::kPlain);
  f("fp8_amax_history_len", c.fp8_amax_history_len, Kind::kPlain);
  f("fp8_amax_compute_algo", c.fp8_amax_compute_algo, Kind::kPlain);
  f("fp8_wgrad", c.fp8_wgrad, Kind::kPlain);
  f("fp8_recipe", c.fp8_recipe, Kind::kPlain);
  // miscellaneous, experimental
  f("clone_scatter_output_in_embedding", c.clone_scatter_output_in_embedding, Kind::kPlain);
  f("normalization", c.normalization, Kind::kPlain);
  // MoE
  f("moe_router_load_balancing_type", c.moe_router_load_balancing_type, Kind::kPlain);
  f("moe_router_topk", c.moe_router_topk, Kind::kPlain);
  f("moe_grouped_gemm", c.moe_grouped_gemm, Kind::kPlain);
  f("moe_aux_loss_coeff", c.moe_aux_loss_coeff, Kind::kPlain);
  f("moe_z_loss_coeff", c.moe_z_loss_coeff, Kind::kPlain);
  f("moe_input_jitter_eps", c.moe_input_jitter_eps, Kind::kPlain);
  f("moe_token_dropping", c.moe_token_dropping, Kind::kPlain);
  f("moe_ffn_hidden_size", c.moe_ffn_hidden_size, Kind::kPlain);
  f("moe_router_pre_softmax", c.moe_router_pre_softmax, Kind::kPlain);
  f("moe_router_score_function", c.moe_router_score_function, Kind::kPlain);
  f("moe_router_topk_scaling_factor", c.moe_router_topk_scaling_factor, Kind::kPlain);
  f("moe_router_enable_expert_bias", c.moe_router_enable_expert_bias, Kind::kPlain);
  f("moe_router_dtype", c.moe_router_dtype, Kind::kPlain);
  f("moe_expert_capacity_factor", c.moe_expert_capacity_factor, Kind::kPlain);
  f("moe_pad_expert_input_to_capacity", c.moe_pad_expert_input_to_capacity, Kind::kPlain);
  f("moe_token_drop_policy", c.moe_token_drop_policy, Kind::kPlain);
}

// Megatron fields (newer than 0.5.0) that change the transformer's numbers and that Paritron
// does not model. `defaults` is a JSON array of the values accepted: the default as asdict
// lists it (for Optional[bool] fields also null; for mtp_num_layers also 0, which builds no
// MTP layer). Decided by going through the catalog; see the file comment for the rest.
struct Unmodelled {
  std::string_view name;
  std::string_view defaults;
  std::string_view what;
};
constexpr Unmodelled kUnmodelled[] = {
    // Pipeline layer placement: which global layer a stage builds, hence layer numbers
    // (apply_query_key_layer_scaling) and the layout Paritron's pipeline assumes (spec §10.8).
    {"first_pipeline_num_layers", "[null]", "uneven first pipeline stage"},
    {"last_pipeline_num_layers", "[null]", "uneven last pipeline stage"},
    {"num_layers_in_first_pipeline_stage", "[null]", "uneven first pipeline stage"},
    {"num_layers_in_last_pipeline_stage", "[null]", "uneven last pipeline stage"},
    {"account_for_embedding_in_pipeline_split", "[false]", "embedding counted as a pipeline layer"},
    {"account_for_loss_in_pipeline_split", "[false]", "loss counted as a pipeline layer"},
    {"pipeline_model_parallel_layout", "[null]", "custom pipeline layout"},
    // Attention variants.
    {"multi_latent_attention", "[false]", "multi-latent attention"},
    {"softmax_type", "[\"vanilla\"]", "off-by-one / learnable softmax offset"},
    {"qk_l2_norm", "[false]", "Llama-4 style q/k L2 norm"},
    {"attention_output_gate", "[false]", "gated attention output"},
    {"experimental_attention_variant", "[null]", "gated delta net / DSA attention"},
    {"linear_attention_freq", "[null]", "linear attention layers"},
    {"window_attn_skip_freq", "[null]", "full-attention layers between sliding-window layers"},
    {"no_rope_freq", "[null]", "layers without RoPE"},
    {"mrope_section", "[null]", "multimodal RoPE"},
    {"use_kitchen_attention", "[false]", "kitchen attention"},
    {"fp8_dot_product_attention", "[false]", "fp8 core attention"},
    {"fp8_multi_head_attention", "[false]", "fp8 multi-head attention"},
    // Quantisation beyond fp8 delayed scaling (spec §12).
    {"fp8_param", "[false]", "fp8 parameters"},
    {"first_last_layers_bf16", "[false]", "bf16 first/last layers under fp8"},
    {"tp_only_amax_red", "[false]", "fp8 amax reduced over TP only"},
    {"fp4", "[null]", "fp4"},
    {"fp4_param", "[false]", "fp4 parameters"},
    {"quant_recipe", "[null]", "per-module quantisation recipe"},
    {"use_kitchen", "[false]", "kitchen quantisation"},
    // MLP activation variants.
    {"glu_linear_offset", "[0]", "GLU linear offset"},
    {"activation_func_clamp_value", "[null]", "clamped activation"},
    {"use_te_activation_func", "[false]", "Transformer Engine activations (tanh gelu)"},
    {"activation_func_fp8_input_store", "[false]", "activation input stored in fp8"},
    {"moe_mlp_glu_interleave_size", "[null]", "block-interleaved GLU weights"},
    // MoE variants.
    {"moe_shared_expert_intermediate_size", "[null]", "shared experts"},
    {"moe_layer_freq", "[1]", "mixed dense / MoE layers"},
    {"moe_router_num_groups", "[null]", "group-limited routing"},
    {"moe_router_group_topk", "[null]", "group-limited routing"},
    {"moe_router_topk_limited_devices", "[null]", "device-limited routing"},
    {"moe_apply_probs_on_input", "[false]", "routing probabilities applied to expert inputs"},
    {"moe_router_force_load_balancing", "[false]", "random router logits"},
    {"moe_router_force_biased", "[null]", "random router bias"},
    {"moe_latent_size", "[null]", "MoE latent projections"},
    {"moe_expert_rank_capacity_factor", "[null]", "per-rank token dropping"},
    {"moe_enable_routing_replay", "[false]", "routing replay"},
    {"moe_router_padding_for_quantization", "[false, null]", "padded routing map"},
    {"moe_router_padding_for_fp8", "[false, null]", "padded routing map"},
    {"moe_pad_experts_for_cuda_graph_inference", "[false]", "token dropping during decode"},
    // Model structure and parameterisation.
    {"is_hybrid_model", "[false]", "hybrid (Mamba) model"},
    {"heterogeneous_block_specs", "[false]", "heterogeneous layers"},
    {"mtp_num_layers", "[null, 0]", "multi-token prediction layers"},
    {"use_mup", "[false]", "maximal update parameterisation"},
};

const Unmodelled* find_unmodelled(std::string_view name) {
  for (const Unmodelled& u : kUnmodelled) {
    if (u.name == name) return &u;
  }
  return nullptr;
}

bool accepted_unmodelled_value(const Unmodelled& u, const Json& value) {
  // moe_layer_freq as a list: all ones is the all-MoE default spelled out per layer.
  if (u.name == "moe_layer_freq" && value.is_array() && !value.empty() &&
      std::all_of(value.begin(), value.end(), [](const Json& v) { return v.is_number() && v == 1; })) {
    return true;
  }
  const Json defaults = Json::parse(u.defaults);
  return std::any_of(defaults.begin(), defaults.end(), [&](const Json& d) { return d == value; });
}

const std::vector<std::string_view>& typed_names() {
  static const std::vector<std::string_view> names = [] {
    std::vector<std::string_view> out;
    TransformerConfig cfg;
    for_each_field(cfg, [&](std::string_view name, auto&, Kind) { out.push_back(name); });
    return out;
  }();
  return names;
}

bool is_typed(std::string_view name) {
  const auto& names = typed_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}

// ---- reading one typed value ----

std::string json_type(const Json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

std::string shown(const Json& v) { return json_brief(v); }

// Each read returns "" on success, else what was expected.
std::string read(const Json& v, int64_t& out, Kind) {
  if (!v.is_number_integer()) return "an integer";
  const std::optional<int64_t> value = json_int64(v);
  if (!value) return "an integer within int64";
  out = *value;
  return "";
}
std::string read(const Json& v, double& out, Kind) {
  if (!v.is_number()) return "a number";
  out = v.get<double>();
  return "";
}
std::string read(const Json& v, bool& out, Kind) {
  if (!v.is_boolean()) return "a boolean (true or false)";
  out = v.get<bool>();
  return "";
}

// str() of a Python callable or its dotted path to the bare function name:
// "<function squared_relu at 0x7f..>", "<built-in function gelu>",
// "torch.nn.functional.silu", "F.gelu" -> "squared_relu", "gelu", "silu", "gelu".
std::string callable_name(std::string text) {
  for (std::string_view prefix : {"<function ", "<built-in function ", "<built-in method "}) {
    if (text.starts_with(prefix) && text.ends_with(">")) {
      text = text.substr(prefix.size(), text.size() - prefix.size() - 1);
      text = text.substr(0, text.find(' '));
      break;
    }
  }
  if (size_t dot = text.rfind('.'); dot != std::string::npos) text = text.substr(dot + 1);
  return text;
}

std::string read(const Json& v, std::string& out, Kind kind) {
  if (!v.is_string()) return kind == Kind::kPlain ? "a string" : "a callable name (string)";
  out = v.get<std::string>();
  if (kind == Kind::kActivation) out = callable_name(out);
  return "";
}
std::string read(const Json& v, DType& out, Kind) {
  if (v.is_string()) {
    if (std::optional<DType> d = dtype_from_torch_name(v.get<std::string>())) {
      out = *d;
      return "";
    }
  }
  return "a torch dtype name such as \"torch.float32\" or \"bfloat16\"";
}
std::string read(const Json& v, std::array<int64_t, 2>& out, Kind) {
  if (!v.is_array() || v.size() != 2 || !v[0].is_number_integer() || !v[1].is_number_integer()) {
    return "a pair [left, right] of integers";
  }
  if (!read(v[0], out[0], Kind::kPlain).empty() || !read(v[1], out[1], Kind::kPlain).empty()) {
    return "a pair [left, right] of integers within int64";
  }
  return "";
}
template <class T>
std::string read(const Json& v, std::optional<T>& out, Kind kind) {
  if (v.is_null()) {
    out.reset();
    return "";
  }
  T value{};
  std::string expected = read(v, value, kind);
  if (!expected.empty()) return expected + " or null";
  out = std::move(value);
  return "";
}

// ---- writing one typed value ----

Json write(int64_t v) { return v; }
Json write(double v) { return v; }
Json write(bool v) { return v; }
Json write(const std::string& v) { return v; }
Json write(DType v) {
  std::string_view name = torch_dtype_name(v);
  return std::string(name.empty() ? dtype_name(v) : name);
}
Json write(const std::array<int64_t, 2>& v) { return Json::array({v[0], v[1]}); }
template <class T>
Json write(const std::optional<T>& v) {
  return v ? write(*v) : Json(nullptr);
}

// ---- did you mean ----

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      bool same = std::tolower(static_cast<unsigned char>(a[i - 1])) ==
                  std::tolower(static_cast<unsigned char>(b[j - 1]));
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (same ? 0 : 1)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

}  // namespace

// ---------------------------------------------------------------------------
// config_json.h
// ---------------------------------------------------------------------------

std::span<const MegatronField> megatron_field_catalog() { return kCatalog; }

const MegatronField* find_megatron_field(std::string_view name) {
  for (const MegatronField& f : kCatalog) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

FieldTreatment field_treatment(std::string_view name) {
  if (name.starts_with("_")) return FieldTreatment::kPrivate;
  if (is_typed(name)) return FieldTreatment::kTyped;
  if (find_unmodelled(name) != nullptr) return FieldTreatment::kUnmodelledNumerics;
  if (find_megatron_field(name) != nullptr) return FieldTreatment::kIgnored;
  return FieldTreatment::kUnknown;
}

std::vector<std::string_view> config_field_names() { return typed_names(); }

std::span<const std::string_view> paritron_only_field_names() { return kParitronOnlyFields; }

std::optional<std::string_view> closest_field_name(std::string_view name) {
  std::optional<std::string_view> best;
  size_t best_distance = std::numeric_limits<size_t>::max();
  auto consider = [&](std::string_view candidate) {
    size_t d = edit_distance(name, candidate);
    if (d < best_distance) {
      best_distance = d;
      best = candidate;
    }
  };
  for (const MegatronField& f : kCatalog) consider(f.name);
  for (std::string_view n : typed_names()) consider(n);
  // A typo, not a different word: about one edit per four characters, at most three.
  const size_t limit = std::max<size_t>(1, std::min<size_t>(3, (name.size() + 2) / 4));
  if (best && best_distance <= limit) return best;
  return std::nullopt;
}

// ---------------------------------------------------------------------------
// transformer_config.h: load / save
// ---------------------------------------------------------------------------

LoadedConfig config_from_json_text(std::string_view json_text, bool validate) {
  // Strict: a repeated field would otherwise keep its last value silently.
  const Json root = parse_strict_json<Json>(
      json_text, "config", {.what = "the config", .fail = [](const std::string& problem) {
                              throw ConfigError("<json>", "", problem);
                            }});
  if (!root.is_object()) {
    throw ConfigError("<json>", shown(root),
                      "must be a JSON object of TransformerConfig fields (got " + json_type(root) + ")");
  }

  LoadedConfig loaded;
  std::vector<ConfigIssue> issues;
  for (const auto& item : root.items()) {
    // Not a structured binding: clang < 16 cannot capture those in the lambdas below.
    const std::string& key = item.key();
    const Json& value = item.value();
    switch (field_treatment(key)) {
      case FieldTreatment::kPrivate:
      case FieldTreatment::kIgnored:
        loaded.ignored_fields.push_back(key);
        break;
      case FieldTreatment::kUnmodelledNumerics: {
        const Unmodelled& u = *find_unmodelled(key);
        if (accepted_unmodelled_value(u, value)) {
          loaded.ignored_fields.push_back(key);
        } else {
          issues.push_back({key, shown(value),
                            fmt::format("changes numerics and is not modelled by paritron ({}); "
                                        "only its default {} is accepted",
                                        u.what, u.defaults)});
        }
        break;
      }
      case FieldTreatment::kUnknown: {
        std::string rule = "is not a field of Megatron-core's TransformerConfig, ModelParallelConfig "
                           "or MLATransformerConfig (0.5.0 .. 0.19.0) nor a paritron field";
        if (std::optional<std::string_view> near = closest_field_name(key)) {
          rule += fmt::format("; did you mean \"{}\"?", *near);
        }
        issues.push_back({key, shown(value), std::move(rule)});
        break;
      }
      case FieldTreatment::kTyped:
        // Megatron-core 0.6.0 and 0.7.0 declare `rotary_percent: float = 0`, unused by core
        // (GPTModel takes its own rotary_percent = 1.0), so their asdict carries a 0 that
        // means "not set": keep Paritron's default.
        if (key == "rotary_percent" && value.is_number() && value == 0) {
          loaded.ignored_fields.push_back(key);
          break;
        }
        for_each_field(loaded.config, [&](std::string_view name, auto& member, Kind kind) {
          if (name != key) return;
          std::string expected = read(value, member, kind);
          if (!expected.empty()) {
            issues.push_back({key, shown(value),
                              fmt::format("must be {} (got {})", expected, json_type(value))});
          }
        });
        break;
    }
  }
  if (!issues.empty()) throw ConfigError(std::move(issues));
  if (validate) validate_config(loaded.config);
  return loaded;
}

std::string config_to_json_text(const TransformerConfig& cfg, int indent) {
  Json out = Json::object();
  for_each_field(cfg, [&](std::string_view name, const auto& member, Kind) {
    out[std::string(name)] = write(member);
  });
  // Invalid UTF-8 in a programmatically set string must not throw from a save.
  return out.dump(indent, ' ', false, Json::error_handler_t::replace);
}

}  // namespace paritron
