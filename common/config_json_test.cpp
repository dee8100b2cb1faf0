// Tests of TransformerConfig JSON load/save (common/config_json.cpp) and of the
// generated Megatron field catalog (common/megatron_config_fields.inc).
#include "common/config_json.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/transformer_config.h"

namespace paritron {
namespace {

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

const std::filesystem::path kConfigs = std::filesystem::path(PARITRON_SOURCE_DIR) / "fixtures" / "configs";

// Runs config_from_json_text expecting a ConfigError; returns its issues.
std::vector<ConfigIssue> load_issues(const std::string& json, bool validate = true) {
  try {
    config_from_json_text(json, validate);
  } catch (const ConfigError& e) {
    return e.issues();
  }
  ADD_FAILURE() << "loaded without error: " << json;
  return {};
}

bool has_issue(const std::vector<ConfigIssue>& issues, const std::string& field, const std::string& rule_part) {
  return std::any_of(issues.begin(), issues.end(), [&](const ConfigIssue& i) {
    return i.field == field && i.rule.find(rule_part) != std::string::npos;
  });
}

std::string describe(const std::vector<ConfigIssue>& issues) {
  std::string out;
  for (const ConfigIssue& i : issues) out += "\n  " + i.message();
  return out;
}

bool contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

// ---------------------------------------------------------------------------
// Catalog.
// ---------------------------------------------------------------------------

TEST(MegatronFieldCatalog, HasTheFieldsOfEveryClassAndRelease) {
  EXPECT_GT(megatron_field_catalog().size(), 300u);
  const MegatronField* hidden = find_megatron_field("hidden_size");
  ASSERT_NE(hidden, nullptr);
  EXPECT_EQ(hidden->first_release, "0.5.0");
  EXPECT_EQ(hidden->last_release, "0.19.0");
  EXPECT_EQ(hidden->declaring_class, "TransformerConfig");
  const MegatronField* tp = find_megatron_field("tensor_model_parallel_size");
  ASSERT_NE(tp, nullptr);
  EXPECT_EQ(tp->declaring_class, "ModelParallelConfig");
  const MegatronField* mla = find_megatron_field("q_lora_rank");
  ASSERT_NE(mla, nullptr);
  EXPECT_EQ(mla->declaring_class, "MLATransformerConfig");
  const MegatronField* removed = find_megatron_field("async_tensor_model_parallel_allreduce");
  ASSERT_NE(removed, nullptr);
  EXPECT_EQ(removed->first_release, "0.5.0");
  EXPECT_NE(removed->last_release, "0.19.0");  // removed after 0.16
  EXPECT_NE(find_megatron_field("_cpu_offloading_context"), nullptr);
  EXPECT_EQ(find_megatron_field("hiden_size"), nullptr);
}

TEST(MegatronFieldCatalog, EveryTypedFieldIsMegatronsOrParitrons) {
  auto paritron_only = paritron_only_field_names();
  for (std::string_view name : config_field_names()) {
    bool ours = std::find(paritron_only.begin(), paritron_only.end(), name) != paritron_only.end();
    EXPECT_TRUE(ours || find_megatron_field(name) != nullptr) << name;
    EXPECT_EQ(field_treatment(name), FieldTreatment::kTyped) << name;
  }
  EXPECT_EQ(find_megatron_field("seq_len_interpolation_factor"), nullptr);
}

TEST(MegatronFieldCatalog, EveryNumericsFieldOf050IsTyped) {
  // Every TransformerConfig field of core_v0.5.0 is typed (the brief: all of them).
  for (const MegatronField& f : megatron_field_catalog()) {
    if (f.first_release == "0.5.0" && f.declaring_class == "TransformerConfig") {
      EXPECT_EQ(field_treatment(f.name), FieldTreatment::kTyped) << f.name;
    }
  }
}

TEST(MegatronFieldCatalog, Treatments) {
  EXPECT_EQ(field_treatment("hidden_size"), FieldTreatment::kTyped);
  EXPECT_EQ(field_treatment("timers"), FieldTreatment::kIgnored);
  EXPECT_EQ(field_treatment("tp_comm_overlap"), FieldTreatment::kIgnored);
  EXPECT_EQ(field_treatment("cuda_graph_impl"), FieldTreatment::kIgnored);
  EXPECT_EQ(field_treatment("multi_latent_attention"), FieldTreatment::kUnmodelledNumerics);
  EXPECT_EQ(field_treatment("moe_shared_expert_intermediate_size"), FieldTreatment::kUnmodelledNumerics);
  EXPECT_EQ(field_treatment("_cpu_offloading_context"), FieldTreatment::kPrivate);
  EXPECT_EQ(field_treatment("hiden_size"), FieldTreatment::kUnknown);
  // Every unmodelled-numerics name is a real Megatron field (no typo in the table).
  size_t unmodelled = 0;
  for (const MegatronField& f : megatron_field_catalog()) {
    if (field_treatment(f.name) == FieldTreatment::kUnmodelledNumerics) ++unmodelled;
  }
  EXPECT_GE(unmodelled, 40u);
  for (std::string_view name : {"qk_l2_norm", "softmax_type", "attention_output_gate", "experimental_attention_variant",
                                "fp4", "moe_router_num_groups", "moe_router_group_topk", "mrope_section",
                                "no_rope_freq", "window_attn_skip_freq", "glu_linear_offset",
                                "activation_func_clamp_value", "use_mup", "is_hybrid_model", "mtp_num_layers",
                                "moe_latent_size", "moe_layer_freq", "heterogeneous_block_specs",
                                "linear_attention_freq", "num_layers_in_first_pipeline_stage",
                                "num_layers_in_last_pipeline_stage", "pipeline_model_parallel_layout",
                                "moe_mlp_glu_interleave_size", "fp8_param", "moe_apply_probs_on_input"}) {
    EXPECT_NE(find_megatron_field(name), nullptr) << name;
    EXPECT_EQ(field_treatment(name), FieldTreatment::kUnmodelledNumerics) << name;
  }
}

TEST(MegatronFieldCatalog, ClosestFieldName) {
  EXPECT_EQ(closest_field_name("hiden_size"), "hidden_size");
  EXPECT_EQ(closest_field_name("num_attention_head"), "num_attention_heads");
  EXPECT_EQ(closest_field_name("Hidden_Size"), "hidden_size");
  EXPECT_EQ(closest_field_name("seq_len_interpolation_factr"), "seq_len_interpolation_factor");
  EXPECT_EQ(closest_field_name("completely_unrelated_thing"), std::nullopt);
}

// ---------------------------------------------------------------------------
// Loading.
// ---------------------------------------------------------------------------

TEST(ConfigJson, FieldsLeftOutTakeDefaults) {
  LoadedConfig loaded = config_from_json_text(R"({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8})");
  TransformerConfig expected;
  expected.num_layers = 2;
  expected.hidden_size = 64;
  expected.num_attention_heads = 8;
  validate_config(expected);
  EXPECT_EQ(loaded.config, expected);
  EXPECT_EQ(loaded.config.kv_channels, 8);
  EXPECT_EQ(loaded.config.ffn_hidden_size, 256);
  EXPECT_TRUE(loaded.ignored_fields.empty());
}

TEST(ConfigJson, EmptyObjectLoadsWithoutValidationAndFailsWithIt) {
  LoadedConfig loaded = config_from_json_text("{}", /*validate=*/false);
  EXPECT_EQ(loaded.config, TransformerConfig{});
  std::vector<ConfigIssue> issues = load_issues("{}");
  EXPECT_TRUE(has_issue(issues, "num_layers", "must be >= 1")) << describe(issues);
}

TEST(ConfigJson, ParseErrorsNameTheJson) {
  std::vector<ConfigIssue> issues = load_issues(R"({"num_layers": 2,)");
  ASSERT_EQ(issues.size(), 1u);
  EXPECT_EQ(issues[0].field, "<json>");
  EXPECT_NE(issues[0].rule.find("is not valid JSON"), std::string::npos);
  // What nlohmann would accept silently or report as another exception type.
  issues = load_issues(R"({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "hidden_size": 128})");
  ASSERT_EQ(issues.size(), 1u);
  EXPECT_NE(issues[0].rule.find("has the key \"hidden_size\" twice"), std::string::npos) << describe(issues);
  issues = load_issues(std::string("{\"num_layers\": 2}\0garbage", 25));
  ASSERT_EQ(issues.size(), 1u);
  EXPECT_NE(issues[0].rule.find("NUL byte"), std::string::npos) << describe(issues);
  issues = load_issues(R"({"num_layers": 2, "hidden_dropout": 1e400})");
  ASSERT_EQ(issues.size(), 1u);
  EXPECT_NE(issues[0].rule.find("number overflow"), std::string::npos) << describe(issues);
  issues = load_issues("[1, 2]");
  ASSERT_EQ(issues.size(), 1u);
  EXPECT_EQ(issues[0].field, "<json>");
  EXPECT_NE(issues[0].rule.find("must be a JSON object"), std::string::npos);
  EXPECT_EQ(load_issues("").at(0).field, "<json>");
}

TEST(ConfigJson, WrongTypesNameFieldAndExpectedType) {
  std::vector<ConfigIssue> issues = load_issues(
      R"({"hidden_size": "abc", "num_layers": 1.5, "add_bias_linear": "true", "hidden_dropout": "0.1",
          "num_query_groups": [2], "params_dtype": "torch.float128", "window_size": [1, 2, 3],
          "activation_func": null, "normalization": 1, "init_method": 3,
          "tensor_model_parallel_size": 18446744073709551615})");
  EXPECT_TRUE(has_issue(issues, "hidden_size", "must be an integer (got a string)")) << describe(issues);
  EXPECT_TRUE(has_issue(issues, "num_layers", "must be an integer (got a number)"));
  EXPECT_TRUE(has_issue(issues, "add_bias_linear", "must be a boolean"));
  EXPECT_TRUE(has_issue(issues, "hidden_dropout", "must be a number (got a string)"));
  EXPECT_TRUE(has_issue(issues, "num_query_groups", "must be an integer or null (got an array)"));
  EXPECT_TRUE(has_issue(issues, "params_dtype", "torch dtype name"));
  EXPECT_TRUE(has_issue(issues, "window_size", "pair [left, right] of integers or null"));
  EXPECT_TRUE(has_issue(issues, "activation_func", "callable name"));
  EXPECT_TRUE(has_issue(issues, "normalization", "must be a string"));
  EXPECT_TRUE(has_issue(issues, "init_method", "callable name (string) or null"));
  EXPECT_TRUE(has_issue(issues, "tensor_model_parallel_size", "within int64"));
  EXPECT_EQ(issues.size(), 11u) << describe(issues);
  for (const ConfigIssue& i : issues) EXPECT_FALSE(i.value.empty()) << i.field;
}

TEST(ConfigJson, UnknownFieldSuggestsTheClosestName) {
  std::vector<ConfigIssue> issues =
      load_issues(R"({"num_layers": 2, "hiden_size": 64, "num_attention_heads": 8})");
  ASSERT_EQ(issues.size(), 1u) << describe(issues);
  EXPECT_EQ(issues[0].field, "hiden_size");
  EXPECT_EQ(issues[0].value, "64");
  EXPECT_NE(issues[0].rule.find("is not a field of Megatron-core"), std::string::npos);
  EXPECT_NE(issues[0].rule.find("did you mean \"hidden_size\"?"), std::string::npos) << issues[0].rule;
  issues = load_issues(R"({"zzzzzzzzzzzzzzzzzz": 1})", false);
  ASSERT_EQ(issues.size(), 1u);
  EXPECT_EQ(issues[0].rule.find("did you mean"), std::string::npos);
}

TEST(ConfigJson, UnmodelledNumericsOnlyAtDefault) {
  const std::string base = R"("num_layers": 2, "hidden_size": 64, "num_attention_heads": 8)";
  LoadedConfig loaded = config_from_json_text(
      "{" + base +
      R"(, "multi_latent_attention": false, "softmax_type": "vanilla", "glu_linear_offset": 0.0,
          "moe_layer_freq": [1, 1], "mtp_num_layers": 0, "moe_router_padding_for_quantization": null,
          "qk_l2_norm": false, "fp4": null})");
  for (const char* name : {"multi_latent_attention", "softmax_type", "glu_linear_offset", "moe_layer_freq",
                           "mtp_num_layers", "moe_router_padding_for_quantization", "qk_l2_norm", "fp4"}) {
    EXPECT_TRUE(contains(loaded.ignored_fields, name)) << name;
  }
  std::vector<ConfigIssue> issues = load_issues(
      "{" + base +
      R"(, "multi_latent_attention": true, "softmax_type": "off-by-one", "glu_linear_offset": 1.0,
          "moe_layer_freq": [1, 0], "moe_shared_expert_intermediate_size": 128, "use_mup": true})");
  for (const char* name : {"multi_latent_attention", "softmax_type", "glu_linear_offset", "moe_layer_freq",
                           "moe_shared_expert_intermediate_size", "use_mup"}) {
    EXPECT_TRUE(has_issue(issues, name, "changes numerics and is not modelled by paritron")) << name << describe(issues);
  }
  EXPECT_TRUE(has_issue(issues, "softmax_type", "only its default [\"vanilla\"] is accepted"));
}

TEST(ConfigJson, EnumeratedStringsNameAllowedValues) {
  std::vector<ConfigIssue> issues = load_issues(
      R"({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "normalization": "LN",
          "moe_router_load_balancing_type": "greedy", "fp8": "e5m2", "recompute_granularity": "most",
          "activation_func": "swish", "moe_token_drop_policy": "random"})");
  EXPECT_TRUE(has_issue(issues, "normalization", "must be one of \"LayerNorm\", \"RMSNorm\"")) << describe(issues);
  EXPECT_TRUE(has_issue(issues, "moe_router_load_balancing_type", "\"aux_loss\", \"sinkhorn\", \"none\""));
  EXPECT_TRUE(has_issue(issues, "fp8", "\"e4m3\", \"hybrid\""));
  EXPECT_TRUE(has_issue(issues, "recompute_granularity", "\"full\", \"selective\""));
  EXPECT_TRUE(has_issue(issues, "activation_func", "\"gelu\", \"silu\""));
  EXPECT_TRUE(has_issue(issues, "moe_token_drop_policy", "\"probs\", \"position\""));
}

TEST(ConfigJson, CallablesAndDtypesByName) {
  LoadedConfig loaded = config_from_json_text(
      R"({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
          "activation_func": "<function silu at 0x7f3a2c1d5e50>", "gated_linear_unit": true,
          "init_method": "init_", "output_layer_init_method": null,
          "params_dtype": "torch.bfloat16", "pipeline_dtype": "float32", "autocast_dtype": "torch.float16"})");
  EXPECT_EQ(loaded.config.activation_func, "silu");
  EXPECT_EQ(loaded.config.init_method, "init_");
  EXPECT_FALSE(loaded.config.output_layer_init_method);
  EXPECT_EQ(loaded.config.params_dtype, DType::BF16);
  EXPECT_EQ(loaded.config.pipeline_dtype, DType::F32);
  EXPECT_EQ(loaded.config.autocast_dtype, DType::F16);
  for (const char* spelled : {"gelu", "F.gelu", "torch.nn.functional.gelu", "<built-in function gelu>"}) {
    LoadedConfig c = config_from_json_text(std::string(R"({"activation_func": ")") + spelled + "\"}", false);
    EXPECT_EQ(c.config.activation_func, "gelu") << spelled;
  }
  LoadedConfig squared =
      config_from_json_text(R"({"activation_func": "megatron.core.activations.squared_relu"})", false);
  EXPECT_EQ(squared.config.activation_func, "squared_relu");
}

TEST(ConfigJson, RotaryPercentZeroFromMegatron06IsUnset) {
  LoadedConfig loaded = config_from_json_text(
      R"({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "rotary_percent": 0,
          "max_position_embeddings": 0})");
  EXPECT_EQ(loaded.config.rotary_percent, 1.0);
  EXPECT_TRUE(contains(loaded.ignored_fields, "rotary_percent"));
  EXPECT_TRUE(contains(loaded.ignored_fields, "max_position_embeddings"));
  loaded = config_from_json_text(
      R"({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "rotary_percent": 0.5})");
  EXPECT_EQ(loaded.config.rotary_percent, 0.5);
}

// dataclasses.asdict(TransformerConfig(...)) from core_v0.5.0, written the way case files
// carry it: callables by name, torch dtypes by str().
TEST(ConfigJson, LoadsMegatron050Asdict) {
  const char* json = R"({
    "tensor_model_parallel_size": 1, "context_parallel_size": 1, "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": null, "sequence_parallel": false, "expert_model_parallel_size": 1,
    "perform_initialization": true, "use_cpu_initialization": true, "fp16": false, "bf16": false,
    "params_dtype": "torch.float64", "timers": null, "gradient_accumulation_fusion": false,
    "async_tensor_model_parallel_allreduce": false, "tp_comm_overlap": false, "tp_comm_split_ag": true,
    "tp_comm_atomic_ag": true, "tp_comm_split_rs": true, "tp_comm_atomic_rs": true, "tp_comm_bulk_wgrad": true,
    "tp_comm_bulk_dgrad": true, "finalize_model_grads_func": null, "pipeline_dtype": null,
    "grad_scale_func": null, "enable_autocast": false, "autocast_dtype": "torch.float64",
    "variable_seq_lengths": false, "num_microbatches_with_partial_activation_checkpoints": null,
    "overlap_p2p_comm": false, "batch_p2p_comm": true, "batch_p2p_sync": true, "use_ring_exchange_p2p": false,
    "deallocate_pipeline_outputs": false, "no_sync_func": null, "grad_sync_func": null, "param_sync_func": null,
    "pipeline_model_parallel_split_rank": null, "cpu_offloading": false, "cpu_offloading_num_layers": 0,
    "_cpu_offloading_context": null, "cpu_offloading_activations": true, "cpu_offloading_weights": true,
    "barrier_with_L1_time": true, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
    "num_query_groups": 2, "ffn_hidden_size": 64, "kv_channels": 8, "hidden_dropout": 0.0,
    "attention_dropout": 0.0, "fp32_residual_connection": false, "apply_residual_connection_post_layernorm": false,
    "layernorm_epsilon": 1e-05, "layernorm_zero_centered_gamma": false, "add_bias_linear": true,
    "add_qkv_bias": false, "gated_linear_unit": false, "activation_func": "gelu", "num_moe_experts": 4,
    "rotary_interleaved": false, "window_size": null, "init_method": "init_", "output_layer_init_method": "init_",
    "init_method_std": 0.02, "apply_query_key_layer_scaling": false, "attention_softmax_in_fp32": true,
    "bias_activation_fusion": false, "masked_softmax_fusion": false, "persist_layer_norm": false,
    "memory_efficient_layer_norm": false, "bias_dropout_fusion": false, "apply_rope_fusion": false,
    "recompute_granularity": null, "recompute_method": null, "recompute_num_layers": null,
    "distribute_saved_activations": null, "fp8": null, "fp8_margin": 0, "fp8_interval": 1,
    "fp8_amax_history_len": 1, "fp8_amax_compute_algo": "most_recent", "fp8_wgrad": true,
    "clone_scatter_output_in_embedding": true, "normalization": "LayerNorm",
    "moe_router_load_balancing_type": "aux_loss", "moe_router_topk": 1, "moe_grouped_gemm": false,
    "moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": null, "moe_input_jitter_eps": null,
    "moe_token_dropping": false})";
  LoadedConfig loaded = config_from_json_text(json);
  EXPECT_EQ(loaded.config.params_dtype, DType::F64);
  EXPECT_EQ(loaded.config.num_moe_experts, 4);
  EXPECT_EQ(loaded.config.moe_router_topk, 1);  // top-1 aux-loss routing, accepted as in 0.5.0
  EXPECT_EQ(loaded.config.moe_ffn_hidden_size, 64);
  EXPECT_TRUE(loaded.config.use_cpu_initialization);
  for (const char* name : {"timers", "async_tensor_model_parallel_allreduce", "tp_comm_split_ag",
                           "_cpu_offloading_context", "barrier_with_L1_time", "pipeline_model_parallel_split_rank"}) {
    EXPECT_TRUE(contains(loaded.ignored_fields, name)) << name;
  }
  EXPECT_EQ(loaded.ignored_fields.size(), 26u);  // the 0.5.0 ModelParallelConfig fields not typed
}

// A realistic dataclasses.asdict of a core_v0.19.0 GPT TransformerConfig after
// __post_init__ (derived values filled in), as a case file would carry it.
TEST(ConfigJson, LoadsNewestMegatronAsdict) {
  const char* json = R"({
    "tensor_model_parallel_size": 2, "pipeline_model_parallel_comm_backend": null, "context_parallel_size": 1,
    "hierarchical_context_parallel_sizes": null, "max_seqlen_per_dp_cp_rank": null,
    "hybrid_context_parallel": false, "pipeline_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": null,
    "sequence_parallel": true, "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 2,
    "tensor_parallel_num_weight_shards": null, "gtp_weight_remat_size": 1,
    "expert_tensor_parallel_num_weight_shards": null, "expert_gtp_weight_remat_size": 1,
    "moe_extended_tp": false, "perform_initialization": true, "use_cpu_initialization": false,
    "fp16": false, "bf16": true, "params_dtype": "torch.bfloat16", "timers": null,
    "finalize_model_grads_func": null, "grad_scale_func": null, "moe_grad_scale_func": null,
    "mtp_grad_scale_func": null, "no_sync_func": null, "grad_sync_func": null, "param_sync_func": null,
    "deterministic_mode": false, "enable_autocast": false, "autocast_dtype": "torch.bfloat16",
    "num_microbatches_with_partial_activation_checkpoints": null, "gradient_accumulation_fusion": true,
    "async_tensor_model_parallel_allreduce": false, "use_te_rng_tracker": false, "tp_comm_overlap": false,
    "tp_comm_bulk_wgrad": true, "tp_comm_bulk_dgrad": true, "tp_comm_overlap_ag": true, "tp_comm_overlap_rs": true,
    "tp_comm_overlap_rs_dgrad": false, "tp_comm_split_ag": true, "tp_comm_atomic_ag": false,
    "tp_comm_split_rs": true, "tp_comm_atomic_rs": false, "cross_entropy_loss_fusion": false,
    "cross_entropy_fusion_impl": "native", "tp_comm_overlap_disable_qkv": false,
    "tp_comm_overlap_disable_fc1": false, "tp_comm_bootstrap_backend": "nccl",
    "overlap_moe_expert_parallel_comm": false, "delay_wgrad_compute": false,
    "overlap_dispatch_backward_with_experts_wgrad": false, "ep_overlap_early_attn_memory_release": false,
    "pipeline_dtype": "torch.bfloat16", "variable_seq_lengths": false, "overlap_p2p_comm": false,
    "batch_p2p_comm": true, "batch_p2p_sync": true, "use_ring_exchange_p2p": false,
    "deallocate_pipeline_outputs": true, "defer_embedding_wgrad_compute": false, "wgrad_deferral_limit": 0,
    "overlap_p2p_comm_warmup_flush": false, "microbatch_group_size_per_vp_stage": 1,
    "cpu_offloading": false, "cpu_offloading_num_layers": 0, "_cpu_offloading_context": null,
    "cpu_offloading_activations": true, "cpu_offloading_weights": false, "cpu_offloading_double_buffering": false,
    "cpu_offloading_retain_pinned_cpu_buffers": false, "barrier_with_L1_time": true, "mtp_standalone": false,
    "num_layers": 4, "mtp_num_layers": null, "mtp_loss_scaling_factor": 0.1, "mtp_use_repeated_layer": false,
    "mtp_detach_heads": false, "mtp_hybrid_override_pattern": null, "num_layers_in_first_pipeline_stage": null,
    "num_layers_in_last_pipeline_stage": null, "pipeline_model_parallel_layout": null,
    "account_for_embedding_in_pipeline_split": false, "account_for_loss_in_pipeline_split": false,
    "hidden_size": 128, "num_attention_heads": 8, "attention_backend": "AttnBackend.auto", "softmax_scale": null,
    "softmax_type": "vanilla", "num_query_groups": 2, "ffn_hidden_size": 352, "kv_channels": 16,
    "hidden_dropout": 0.0, "attention_dropout": 0.0, "fp32_residual_connection": false,
    "apply_residual_connection_post_layernorm": false, "layernorm_epsilon": 1e-06,
    "layernorm_zero_centered_gamma": false, "add_bias_linear": false, "add_qkv_bias": false,
    "gated_linear_unit": true, "activation_func": "silu", "activation_func_fp8_input_store": false,
    "glu_linear_offset": 0.0, "activation_func_clamp_value": null, "num_moe_experts": null,
    "rotary_interleaved": false, "window_size": null, "window_attn_skip_freq": null, "normalization": "RMSNorm",
    "qk_layernorm": true, "qk_l2_norm": false, "qk_clip": false, "qk_clip_alpha": 0.5, "qk_clip_threshold": 100,
    "log_max_attention_logit": false, "attention_output_gate": false, "test_mode": false,
    "calculate_per_token_loss": false, "multi_latent_attention": false, "no_rope_freq": null,
    "moe_deepep_num_sms": null, "moe_hybridep_num_sms": null, "experimental_attention_variant": null,
    "experimental_attention_variant_loss_scale_func": null, "dsa_indexer_n_heads": null,
    "dsa_indexer_head_dim": null, "dsa_indexer_topk": null, "dsa_indexer_loss_coeff": null,
    "dsa_indexer_use_sparse_loss": false, "dsa_indexer_topk_freq": 1, "dsa_indexer_skip_topk_offset": 0,
    "dsa_kernel_backend": "none", "linear_attention_freq": null, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "init_method": "init_", "output_layer_init_method": "init_",
    "init_method_std": 0.02, "embedding_init_method": "init_", "embedding_init_method_std": 0.02,
    "init_model_with_meta_device": false, "apply_query_key_layer_scaling": false,
    "attention_softmax_in_fp32": true, "disable_bf16_reduced_precision_matmul": false,
    "bias_activation_fusion": true, "masked_softmax_fusion": true, "persist_layer_norm": false,
    "memory_efficient_layer_norm": false, "bias_dropout_fusion": true, "apply_rope_fusion": false,
    "use_fused_weighted_squared_relu": false, "fused_single_qkv_rope": false, "fused_residual_rmsnorm": false,
    "recompute_granularity": "selective", "recompute_method": null, "recompute_num_layers": null,
    "distribute_saved_activations": false, "recompute_modules": ["core_attn"], "fp8": null,
    "fp8_recipe": "delayed", "fp8_param": false, "fp8_quantizer_factory": null, "fp8_margin": 0,
    "fp8_interval": 1, "fp8_amax_history_len": 1, "fp8_amax_compute_algo": "most_recent", "fp8_wgrad": true,
    "fp8_dot_product_attention": false, "fp8_multi_head_attention": false, "fp8_output_proj": false,
    "tp_only_amax_red": false, "first_last_layers_bf16": false, "num_layers_at_start_in_bf16": 1,
    "num_layers_at_end_in_bf16": 1, "use_kitchen": false, "use_kitchen_attention": false,
    "kitchen_attention_backend": "sdpa", "fp4": null, "fp4_recipe": "nvfp4", "fp4_param": false,
    "fp4_quantizer_factory": null, "moe_shared_expert_intermediate_size": null, "moe_shared_expert_gate": false,
    "moe_shared_expert_overlap": false, "moe_layer_freq": 1, "moe_ffn_hidden_size": null,
    "moe_router_load_balancing_type": "aux_loss", "moe_router_topk": 2, "moe_router_topk_limited_devices": null,
    "moe_router_padding_for_quantization": false, "moe_router_padding_for_fp8": false,
    "moe_router_num_groups": null, "moe_router_group_topk": null, "moe_router_pre_softmax": false,
    "moe_router_topk_scaling_factor": null, "moe_router_score_function": "softmax", "moe_router_dtype": null,
    "moe_router_enable_expert_bias": false, "moe_router_bias_update_rate": 0.001,
    "moe_router_quantile_balancing_ema": 0.0, "moe_router_force_load_balancing": false,
    "moe_router_force_biased": null, "moe_grouped_gemm": false, "moe_use_legacy_grouped_gemm": false,
    "moe_aux_loss_coeff": 0.0, "moe_z_loss_coeff": null, "moe_input_jitter_eps": null,
    "moe_token_dropping": false, "moe_token_dispatcher_type": "allgather", "moe_enable_deepep": false,
    "moe_flex_dispatcher_backend": "deepep", "moe_per_layer_logging": false, "moe_expert_capacity_factor": null,
    "moe_pad_expert_input_to_capacity": false, "moe_token_drop_policy": "probs", "moe_layer_recompute": false,
    "moe_permute_fusion": false, "moe_router_fusion": false, "moe_apply_probs_on_input": false,
    "moe_latent_size": null, "moe_mlp_glu_interleave_size": null, "moe_expert_rank_capacity_factor": null,
    "moe_enable_routing_replay": false, "moe_pad_experts_for_cuda_graph_inference": false,
    "cp_comm_type": null, "enable_cuda_graph": false, "cuda_graph_use_single_mempool": true,
    "cuda_graph_retain_backward_graph": false, "cuda_graph_warmup_steps": 3, "external_cuda_graph": false,
    "cuda_graph_impl": "none", "cuda_graph_scope": null, "cuda_graph_modules": [],
    "inference_cuda_graph_scope": "none", "clone_scatter_output_in_embedding": true,
    "disable_parameter_transpose_cache": false, "config_logger_dir": "", "flash_decode": false,
    "batch_invariant_mode": false, "flash_attention_version": null, "use_te_activation_func": false,
    "inference_rng_tracker": false, "inference_sampling_seed": 42, "symmetric_ar_type": null,
    "use_inference_optimized_layers": false, "inference_fuse_tp_communication": false,
    "mrope_section": null, "is_hybrid_model": false, "mamba_state_dim": 128, "mamba_head_dim": 64,
    "mamba_num_groups": 8, "mamba_num_heads": null, "use_mamba_mem_eff_path": true,
    "mamba_training_ssm_states_dtype": null, "mlp_chunks_for_prefill": 1, "mlp_chunks_for_training": 1,
    "heterogeneous_block_specs": false, "hetereogenous_dist_checkpoint": false, "quant_recipe": null,
    "transformer_impl": "transformer_engine", "fine_grained_activation_offloading": false,
    "offload_modules": [], "min_offloaded_tensor_size": 1048576, "use_mup": false, "mup_width_mult": 1.0,
    "mup_base_hidden_size": null, "mup_embedding_mult": 1.0, "mup_output_mult": 1.0,
    "mup_base_head_dim": null, "mup_attn_scale_power": 1.0, "use_transformer_engine_op_fuser": false})";
  LoadedConfig loaded = config_from_json_text(json);
  const TransformerConfig& c = loaded.config;
  EXPECT_EQ(c.num_layers, 4);
  EXPECT_EQ(c.hidden_size, 128);
  EXPECT_EQ(c.num_query_groups, 2);
  EXPECT_EQ(c.kv_channels, 16);
  EXPECT_EQ(c.activation_func, "silu");
  EXPECT_TRUE(c.gated_linear_unit);
  EXPECT_TRUE(c.qk_layernorm);
  EXPECT_EQ(c.normalization, "RMSNorm");
  EXPECT_EQ(c.params_dtype, DType::BF16);
  EXPECT_EQ(c.expert_tensor_parallel_size, 2);
  EXPECT_EQ(c.recompute_granularity, "selective");
  EXPECT_EQ(c.distribute_saved_activations, false);
  for (const char* name : {"timers", "cuda_graph_impl", "recompute_modules", "attention_backend",
                           "embedding_init_method", "mamba_state_dim", "dsa_kernel_backend", "qk_clip",
                           "multi_latent_attention", "moe_layer_freq", "offload_modules", "use_mup",
                           "mup_width_mult", "_cpu_offloading_context"}) {
    EXPECT_TRUE(contains(loaded.ignored_fields, name)) << name;
  }
  EXPECT_GT(loaded.ignored_fields.size(), 150u);
}

TEST(ConfigJson, MlaConfigIsRejectedAsUnmodelled) {
  std::vector<ConfigIssue> issues = load_issues(
      R"({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "multi_latent_attention": true,
          "q_lora_rank": 512, "kv_lora_rank": 512, "qk_head_dim": 128, "rope_type": "yarn",
          "normalization": "RMSNorm", "rotary_base": 10000, "rotary_percent": 1.0})");
  ASSERT_EQ(issues.size(), 1u) << describe(issues);
  EXPECT_EQ(issues[0].field, "multi_latent_attention");
}

// ---------------------------------------------------------------------------
// Saving and round trips.
// ---------------------------------------------------------------------------

TEST(ConfigJson, SaveWritesEveryTypedFieldInOrder) {
  TransformerConfig c;
  nlohmann::ordered_json saved = nlohmann::ordered_json::parse(config_to_json_text(c));
  std::vector<std::string_view> names = config_field_names();
  ASSERT_EQ(saved.size(), names.size());
  size_t i = 0;
  for (const auto& [key, value] : saved.items()) EXPECT_EQ(key, names[i++]);
  EXPECT_EQ(saved["params_dtype"], "float32");
  EXPECT_EQ(saved["activation_func"], "gelu");
  EXPECT_TRUE(saved["init_method"].is_null());
  EXPECT_EQ(saved["fp8_recipe"], "delayed");
  EXPECT_EQ(config_to_json_text(c), config_to_json_text(c));
  EXPECT_EQ(config_to_json_text(c, -1).find('\n'), std::string::npos);
  // Unvalidated defaults round-trip too.
  EXPECT_EQ(config_from_json_text(config_to_json_text(c), false).config, c);
}

TEST(ConfigJson, SaveNeverThrows) {
  TransformerConfig c;
  c.activation_func = "\xff\xfe";  // invalid UTF-8, set programmatically
  c.hidden_dropout = std::nan("");  // JSON has no NaN: written as null
  std::string text;
  ASSERT_NO_THROW(text = config_to_json_text(c));
  EXPECT_NE(text.find("\"hidden_dropout\": null"), std::string::npos);
  std::vector<ConfigIssue> issues = load_issues(text, false);
  EXPECT_TRUE(has_issue(issues, "hidden_dropout", "must be a number (got null)")) << describe(issues);
}

TEST(ConfigJson, IssueValuesAreWrittenAsJson) {
  std::vector<ConfigIssue> issues =
      load_issues(R"({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "normalization": "LN"})");
  ASSERT_EQ(issues.size(), 1u);
  EXPECT_EQ(issues[0].message(), R"(normalization = "LN": must be one of "LayerNorm", "RMSNorm")");
}

// Draws a valid config (check_config finds nothing) across every typed field.
rc::Gen<TransformerConfig> gen_valid_config() {
  return rc::gen::exec([] {
    TransformerConfig c;
    const int64_t tp = *rc::gen::element<int64_t>(1, 2, 4);
    c.tensor_model_parallel_size = tp;
    c.sequence_parallel = tp > 1 && *rc::gen::arbitrary<bool>();
    const int64_t pp = *rc::gen::element<int64_t>(1, 1, 2, 3, 4);
    c.pipeline_model_parallel_size = pp;
    if (pp > 1 || *rc::gen::arbitrary<bool>()) {
      c.pipeline_dtype = *rc::gen::element(DType::F32, DType::BF16, DType::F16, DType::F64);
    }
    int64_t layers_per_stage = *rc::gen::inRange<int64_t>(1, 4);
    if (pp > 2 && *rc::gen::arbitrary<bool>()) {
      c.virtual_pipeline_model_parallel_size = 2;
      layers_per_stage = 2 * *rc::gen::inRange<int64_t>(1, 3);
    }
    c.num_layers = pp * layers_per_stage;
    const int64_t groups = tp * *rc::gen::inRange<int64_t>(1, 4);
    const int64_t heads = groups * *rc::gen::element<int64_t>(1, 2, 4);
    c.num_attention_heads = heads;
    if (groups != heads || *rc::gen::arbitrary<bool>()) c.num_query_groups = groups;
    const int64_t kv = *rc::gen::element<int64_t>(8, 16, 32, 64);
    if (*rc::gen::arbitrary<bool>()) {
      c.hidden_size = heads * kv;  // kv_channels derived
    } else {
      c.kv_channels = kv;
      c.hidden_size = *rc::gen::inRange<int64_t>(1, 512);
    }
    // Left unset, ffn_hidden_size = 4 h divides by tp <= 4.
    if (*rc::gen::arbitrary<bool>()) c.ffn_hidden_size = tp * *rc::gen::inRange<int64_t>(1, 200);
    c.hidden_dropout = *rc::gen::inRange(0, 900) / 1000.0;
    c.attention_dropout = *rc::gen::inRange(0, 900) / 1000.0;
    c.fp32_residual_connection = *rc::gen::arbitrary<bool>();
    c.apply_residual_connection_post_layernorm = *rc::gen::arbitrary<bool>();
    c.layernorm_epsilon = *rc::gen::element(1e-5, 1e-6, 0.0, 1e-12);
    c.layernorm_zero_centered_gamma = *rc::gen::arbitrary<bool>();
    c.add_bias_linear = *rc::gen::arbitrary<bool>();
    c.add_qkv_bias = *rc::gen::arbitrary<bool>();
    c.gated_linear_unit = *rc::gen::arbitrary<bool>();
    c.activation_func = std::string(*rc::gen::elementOf(kActivationNames));
    c.rotary_interleaved = *rc::gen::arbitrary<bool>();
    if (*rc::gen::arbitrary<bool>()) {
      c.window_size = std::array<int64_t, 2>{*rc::gen::inRange<int64_t>(-1, 64), *rc::gen::inRange<int64_t>(-1, 64)};
    }
    c.qk_layernorm = *rc::gen::arbitrary<bool>();
    if (*rc::gen::arbitrary<bool>()) c.softmax_scale = *rc::gen::inRange(1, 1000) / 997.0;
    c.rotary_percent = *rc::gen::element(1.0, 0.5, 0.25);
    c.rotary_base = *rc::gen::element(10000.0, 500000.0, 1e6);
    if (*rc::gen::arbitrary<bool>()) c.seq_len_interpolation_factor = *rc::gen::inRange(1, 64) / 8.0;
    if (*rc::gen::arbitrary<bool>()) c.init_method = *rc::gen::element<std::string>("init_", "xavier_uniform_");
    if (*rc::gen::arbitrary<bool>()) c.output_layer_init_method = std::string("init_");
    c.init_method_std = *rc::gen::inRange(0, 100) / 1000.0;
    c.apply_query_key_layer_scaling = *rc::gen::arbitrary<bool>();
    c.attention_softmax_in_fp32 = c.apply_query_key_layer_scaling || *rc::gen::arbitrary<bool>();
    c.fp16 = *rc::gen::arbitrary<bool>();
    c.bf16 = !c.fp16 && *rc::gen::arbitrary<bool>();
    c.params_dtype = *rc::gen::element(DType::F32, DType::BF16, DType::F16, DType::F64);
    c.autocast_dtype = *rc::gen::element<std::optional<DType>>(std::nullopt, DType::BF16);
    c.enable_autocast = *rc::gen::arbitrary<bool>();
    c.perform_initialization = *rc::gen::arbitrary<bool>();
    c.use_cpu_initialization = *rc::gen::arbitrary<bool>();
    c.gradient_accumulation_fusion = *rc::gen::arbitrary<bool>();
    c.masked_softmax_fusion = *rc::gen::arbitrary<bool>();
    c.persist_layer_norm = *rc::gen::arbitrary<bool>();
    c.memory_efficient_layer_norm = *rc::gen::arbitrary<bool>();
    c.bias_dropout_fusion = *rc::gen::arbitrary<bool>();
    c.apply_rope_fusion = !c.rotary_interleaved && *rc::gen::arbitrary<bool>();
    c.bias_activation_fusion = *rc::gen::arbitrary<bool>();
    if (c.bias_activation_fusion) {
      c.activation_func = *rc::gen::element<std::string>("gelu", "silu");
      if (c.activation_func == "gelu") c.add_bias_linear = true;
      else c.gated_linear_unit = true;
    }
    const int recompute = *rc::gen::inRange(0, 3);
    if (recompute == 1) {
      c.recompute_granularity = "selective";
    } else if (recompute == 2) {
      c.recompute_granularity = "full";
      c.recompute_method = *rc::gen::element<std::string>("block", "uniform");
      c.recompute_num_layers = *rc::gen::inRange<int64_t>(1, 4);
    }
    if (c.recompute_granularity && !c.sequence_parallel) {
      c.distribute_saved_activations = *rc::gen::arbitrary<bool>();
    }
    c.cpu_offloading = pp == 1 && !c.recompute_granularity && *rc::gen::arbitrary<bool>();
    c.cpu_offloading_num_layers = *rc::gen::inRange<int64_t>(0, c.num_layers);
    if (*rc::gen::arbitrary<bool>()) {
      c.fp8 = *rc::gen::element<std::string>("e4m3", "hybrid");
      c.fp8_margin = *rc::gen::inRange<int64_t>(0, 3);
      c.fp8_interval = *rc::gen::inRange<int64_t>(1, 3);
      c.fp8_amax_history_len = *rc::gen::inRange<int64_t>(1, 16);
      c.fp8_amax_compute_algo = *rc::gen::element<std::string>("most_recent", "max");
      c.fp8_wgrad = *rc::gen::arbitrary<bool>();
    }
    c.clone_scatter_output_in_embedding = *rc::gen::arbitrary<bool>();
    c.normalization = *rc::gen::element<std::string>("LayerNorm", "RMSNorm");
    if (*rc::gen::arbitrary<bool>()) {  // MoE
      const int64_t ep = *rc::gen::element<int64_t>(1, 2, 4);
      c.expert_model_parallel_size = ep;
      if (ep > 1 && tp > 1) c.sequence_parallel = true;
      if (c.sequence_parallel) c.distribute_saved_activations.reset();
      c.num_moe_experts = ep * *rc::gen::inRange<int64_t>(1, 4);
      c.moe_router_topk = *rc::gen::inRange<int64_t>(1, *c.num_moe_experts + 1);
      c.moe_router_load_balancing_type = *rc::gen::element<std::string>("aux_loss", "sinkhorn", "none");
      if (c.moe_router_load_balancing_type != "sinkhorn") c.moe_aux_loss_coeff = *rc::gen::inRange(0, 100) / 1000.0;
      if (*rc::gen::arbitrary<bool>()) c.moe_z_loss_coeff = *rc::gen::inRange(0, 100) / 10000.0;
      if (*rc::gen::arbitrary<bool>()) c.moe_input_jitter_eps = *rc::gen::inRange(0, 100) / 1000.0;
      c.moe_grouped_gemm = !c.add_bias_linear && *rc::gen::arbitrary<bool>();
      if (*rc::gen::arbitrary<bool>()) c.moe_ffn_hidden_size = tp * *rc::gen::inRange<int64_t>(1, 64);
      c.moe_router_pre_softmax = *rc::gen::arbitrary<bool>();
      c.moe_router_score_function = *rc::gen::element<std::string>("softmax", "sigmoid");
      c.moe_router_enable_expert_bias = c.moe_router_score_function == "sigmoid" && *rc::gen::arbitrary<bool>();
      if (*rc::gen::arbitrary<bool>()) c.moe_router_topk_scaling_factor = *rc::gen::inRange(1, 40) / 8.0;
      c.moe_router_dtype = *rc::gen::element<std::optional<std::string>>(std::nullopt, "fp32", "fp64");
      if (c.moe_router_load_balancing_type != "sinkhorn" && *rc::gen::arbitrary<bool>()) {
        c.moe_expert_capacity_factor = *rc::gen::inRange(1, 40) / 8.0;
        c.moe_pad_expert_input_to_capacity = *rc::gen::arbitrary<bool>();
      }
      c.moe_token_drop_policy = *rc::gen::element<std::string>("probs", "position");
      if (!c.add_bias_linear && *rc::gen::arbitrary<bool>()) c.expert_tensor_parallel_size = tp;
    } else if (*rc::gen::arbitrary<bool>()) {
      c.context_parallel_size = *rc::gen::element<int64_t>(1, 2);
    }
    if (*rc::gen::arbitrary<bool>()) c.expert_tensor_parallel_size = tp;
    if (c.num_moe_experts && c.add_bias_linear && tp != 1) c.expert_tensor_parallel_size.reset();
    std::vector<ConfigIssue> issues = check_config(c);
    RC_ASSERT(issues.empty());  // the generator only draws valid configs
    return c;
  });
}

RC_GTEST_PROP(ConfigJsonProperty, RoundTripsValidConfigs, ()) {
  const TransformerConfig cfg = *gen_valid_config();
  RC_CLASSIFY(cfg.num_moe_experts.has_value(), "moe");
  RC_CLASSIFY(cfg.fp8.has_value(), "fp8");
  RC_CLASSIFY(cfg.tensor_model_parallel_size > 1, "tp");
  RC_CLASSIFY(cfg.virtual_pipeline_model_parallel_size.has_value(), "vp");
  RC_CLASSIFY(*cfg.num_query_groups < cfg.num_attention_heads, "gqa");
  const std::string text = config_to_json_text(cfg);
  const LoadedConfig loaded = config_from_json_text(text);
  RC_ASSERT(loaded.config == cfg);
  RC_ASSERT(loaded.ignored_fields.empty());
  RC_ASSERT(config_to_json_text(loaded.config) == text);
  RC_ASSERT(config_from_json_text(config_to_json_text(cfg, -1)).config == cfg);
}

RC_GTEST_PROP(ConfigJsonProperty, ValidConfigsStayValidAfterCheck, ()) {
  TransformerConfig cfg = *gen_valid_config();
  TransformerConfig again = cfg;
  RC_ASSERT(check_config(again).empty());
  RC_ASSERT(again == cfg);
}

// ---------------------------------------------------------------------------
// fixtures/configs.
// ---------------------------------------------------------------------------

TEST(ExampleConfigs, LoadAndValidate) {
  LoadedConfig gpt = config_from_json_text(read_text(kConfigs / "gpt-small.json"));
  EXPECT_EQ(gpt.config.normalization, "LayerNorm");
  EXPECT_EQ(gpt.config.activation_func, "gelu");
  EXPECT_EQ(gpt.config.num_query_groups, gpt.config.num_attention_heads);  // MHA
  EXPECT_TRUE(gpt.config.add_bias_linear);

  LoadedConfig llama = config_from_json_text(read_text(kConfigs / "llama-small.json"));
  EXPECT_EQ(llama.config.normalization, "RMSNorm");
  EXPECT_EQ(llama.config.activation_func, "silu");
  EXPECT_TRUE(llama.config.gated_linear_unit);
  EXPECT_LT(*llama.config.num_query_groups, llama.config.num_attention_heads);  // GQA
  EXPECT_FALSE(llama.config.add_bias_linear);
  EXPECT_EQ(rotary_dim(llama.config), *llama.config.kv_channels);

  LoadedConfig mixtral = config_from_json_text(read_text(kConfigs / "mixtral-small.json"));
  EXPECT_EQ(mixtral.config.num_moe_experts, 8);
  EXPECT_EQ(mixtral.config.moe_router_topk, 2);
  EXPECT_EQ(mixtral.config.moe_router_load_balancing_type, "aux_loss");
  EXPECT_GT(mixtral.config.moe_aux_loss_coeff, 0.0);
  EXPECT_EQ(mixtral.config.moe_ffn_hidden_size, mixtral.config.ffn_hidden_size);

  for (const LoadedConfig* loaded : {&gpt, &llama, &mixtral}) {
    EXPECT_TRUE(loaded->ignored_fields.empty());
    EXPECT_EQ(config_from_json_text(config_to_json_text(loaded->config)).config, loaded->config);
  }
}

TEST(ExampleConfigs, BadHeadsReportsEveryProblem) {
  std::vector<ConfigIssue> issues = load_issues(read_text(kConfigs / "invalid" / "bad-heads.json"));
  EXPECT_TRUE(has_issue(issues, "num_attention_heads", "must be a multiple of tensor_model_parallel_size (4)"))
      << describe(issues);
  EXPECT_TRUE(has_issue(issues, "num_query_groups", "must be a multiple of tensor_model_parallel_size (4)"));
  EXPECT_TRUE(has_issue(issues, "pipeline_dtype", "must be specified"));
  EXPECT_TRUE(has_issue(issues, "num_layers", "divisible by pipeline_model_parallel_size (2)"));
  EXPECT_TRUE(has_issue(issues, "normalization", "must be one of"));
  EXPECT_TRUE(has_issue(issues, "activation_func", "must be one of"));
  EXPECT_TRUE(has_issue(issues, "hidden_dropout", "must be in [0, 1)"));
  EXPECT_EQ(issues.size(), 7u) << describe(issues);
}

}  // namespace
}  // namespace paritron
