// Tests of TransformerConfig defaults, derived defaults and every validation
// rule (common/transformer_config.cpp): each rule is triggered from a valid
// base config and must produce an issue naming its field and rule.
#include "common/transformer_config.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "common/config_json.h"

namespace paritron {
namespace {

// A small valid config: 2 layers, h = 64, 8 heads.
TransformerConfig base() {
  TransformerConfig c;
  c.num_layers = 2;
  c.hidden_size = 64;
  c.num_attention_heads = 8;
  return c;
}

std::string describe(const std::vector<ConfigIssue>& issues) {
  std::string out;
  for (const ConfigIssue& i : issues) out += "\n  " + i.message();
  return out.empty() ? "\n  (no issues)" : out;
}

bool has_issue(const std::vector<ConfigIssue>& issues, const std::string& field, const std::string& rule_part) {
  for (const ConfigIssue& i : issues) {
    if (i.field == field && i.rule.find(rule_part) != std::string::npos) return true;
  }
  return false;
}

TEST(TransformerConfig, DefaultsAreMegatron050) {
  const TransformerConfig c;
  // ModelParallelConfig (core_v0.5.0).
  EXPECT_EQ(c.tensor_model_parallel_size, 1);
  EXPECT_EQ(c.context_parallel_size, 1);
  EXPECT_EQ(c.pipeline_model_parallel_size, 1);
  EXPECT_FALSE(c.virtual_pipeline_model_parallel_size);
  EXPECT_FALSE(c.sequence_parallel);
  EXPECT_EQ(c.expert_model_parallel_size, 1);
  EXPECT_TRUE(c.perform_initialization);
  EXPECT_FALSE(c.use_cpu_initialization);
  EXPECT_FALSE(c.fp16);
  EXPECT_FALSE(c.bf16);
  EXPECT_EQ(c.params_dtype, DType::F32);
  EXPECT_FALSE(c.gradient_accumulation_fusion);
  EXPECT_FALSE(c.pipeline_dtype);
  EXPECT_FALSE(c.enable_autocast);
  EXPECT_FALSE(c.autocast_dtype);
  EXPECT_FALSE(c.cpu_offloading);
  EXPECT_EQ(c.cpu_offloading_num_layers, 0);
  // TransformerConfig (core_v0.5.0).
  EXPECT_EQ(c.num_layers, 0);
  EXPECT_EQ(c.hidden_size, 0);
  EXPECT_EQ(c.num_attention_heads, 0);
  EXPECT_FALSE(c.num_query_groups);
  EXPECT_FALSE(c.ffn_hidden_size);
  EXPECT_FALSE(c.kv_channels);
  EXPECT_EQ(c.hidden_dropout, 0.1);
  EXPECT_EQ(c.attention_dropout, 0.1);
  EXPECT_FALSE(c.fp32_residual_connection);
  EXPECT_FALSE(c.apply_residual_connection_post_layernorm);
  EXPECT_EQ(c.layernorm_epsilon, 1e-5);
  EXPECT_FALSE(c.layernorm_zero_centered_gamma);
  EXPECT_TRUE(c.add_bias_linear);
  EXPECT_FALSE(c.add_qkv_bias);
  EXPECT_FALSE(c.gated_linear_unit);
  EXPECT_EQ(c.activation_func, "gelu");
  EXPECT_FALSE(c.num_moe_experts);
  EXPECT_FALSE(c.rotary_interleaved);
  EXPECT_FALSE(c.window_size);
  EXPECT_FALSE(c.init_method);
  EXPECT_FALSE(c.output_layer_init_method);
  EXPECT_EQ(c.init_method_std, 0.02);
  EXPECT_FALSE(c.apply_query_key_layer_scaling);  // the 0.5.0 docstring says True; the code says False
  EXPECT_TRUE(c.attention_softmax_in_fp32);
  EXPECT_FALSE(c.bias_activation_fusion);
  EXPECT_FALSE(c.masked_softmax_fusion);
  EXPECT_FALSE(c.persist_layer_norm);
  EXPECT_FALSE(c.memory_efficient_layer_norm);
  EXPECT_FALSE(c.bias_dropout_fusion);
  EXPECT_FALSE(c.apply_rope_fusion);
  EXPECT_FALSE(c.recompute_granularity);
  EXPECT_FALSE(c.recompute_method);
  EXPECT_FALSE(c.recompute_num_layers);
  EXPECT_FALSE(c.distribute_saved_activations);  // 0.5.0: None (newer: False)
  EXPECT_FALSE(c.fp8);
  EXPECT_EQ(c.fp8_margin, 0);
  EXPECT_EQ(c.fp8_interval, 1);
  EXPECT_EQ(c.fp8_amax_history_len, 1);
  EXPECT_EQ(c.fp8_amax_compute_algo, "most_recent");
  EXPECT_TRUE(c.fp8_wgrad);
  EXPECT_TRUE(c.clone_scatter_output_in_embedding);
  EXPECT_EQ(c.normalization, "LayerNorm");
  EXPECT_EQ(c.moe_router_load_balancing_type, "aux_loss");
  EXPECT_EQ(c.moe_router_topk, 2);
  EXPECT_FALSE(c.moe_grouped_gemm);
  EXPECT_EQ(c.moe_aux_loss_coeff, 0.0);
  EXPECT_FALSE(c.moe_z_loss_coeff);
  EXPECT_FALSE(c.moe_input_jitter_eps);
  EXPECT_FALSE(c.moe_token_dropping);
  // Newer fields, newest defaults (core_v0.19.0).
  EXPECT_FALSE(c.expert_tensor_parallel_size);
  EXPECT_FALSE(c.qk_layernorm);
  EXPECT_FALSE(c.softmax_scale);
  EXPECT_EQ(c.fp8_recipe, "delayed");
  EXPECT_FALSE(c.moe_ffn_hidden_size);
  EXPECT_FALSE(c.moe_router_pre_softmax);
  EXPECT_EQ(c.moe_router_score_function, "softmax");
  EXPECT_FALSE(c.moe_router_topk_scaling_factor);
  EXPECT_FALSE(c.moe_router_enable_expert_bias);
  EXPECT_FALSE(c.moe_router_dtype);
  EXPECT_FALSE(c.moe_expert_capacity_factor);
  EXPECT_FALSE(c.moe_pad_expert_input_to_capacity);
  EXPECT_EQ(c.moe_token_drop_policy, "probs");
  // Paritron fields: GPTModel / RotaryEmbedding defaults.
  EXPECT_EQ(c.rotary_percent, 1.0);
  EXPECT_EQ(c.rotary_base, 10000.0);
  EXPECT_FALSE(c.seq_len_interpolation_factor);
}

TEST(TransformerConfig, DefaultConfigIsInvalidLikeMegatron) {
  // Megatron's defaults (num_layers = hidden_size = num_attention_heads = 0) do not build a
  // model: 0.5.0 already rejects num_layers = 0 through the cpu_offloading_num_layers rule,
  // and h // n divides by zero. check_config must report, not crash.
  TransformerConfig c;
  std::vector<ConfigIssue> issues = check_config(c);
  EXPECT_TRUE(has_issue(issues, "cpu_offloading_num_layers", "less than num_layers (0)")) << describe(issues);
  EXPECT_TRUE(has_issue(issues, "num_layers", "must be >= 1")) << describe(issues);
  EXPECT_TRUE(has_issue(issues, "num_attention_heads", "must be >= 1")) << describe(issues);
  EXPECT_TRUE(has_issue(issues, "hidden_size", "must be >= 1")) << describe(issues);
  EXPECT_FALSE(c.kv_channels);  // 0 // 0: not derivable
}

TEST(TransformerConfig, DerivedDefaults) {
  TransformerConfig c = base();
  c.hidden_size = 100;
  c.num_attention_heads = 8;
  c.params_dtype = DType::BF16;
  std::vector<ConfigIssue> issues = check_config(c);
  EXPECT_TRUE(issues.empty()) << describe(issues);
  EXPECT_EQ(c.kv_channels, 12);         // 100 // 8, integer division (spec §14 #47)
  EXPECT_EQ(c.ffn_hidden_size, 400);    // 4 h
  EXPECT_EQ(c.num_query_groups, 8);     // n
  EXPECT_EQ(c.autocast_dtype, DType::BF16);  // params_dtype
  EXPECT_FALSE(c.moe_ffn_hidden_size);  // dense
  EXPECT_EQ(rotary_dim(c), 12);
}

TEST(TransformerConfig, DerivedDefaultsKeepExplicitValues) {
  TransformerConfig c = base();
  c.kv_channels = 16;
  c.ffn_hidden_size = 100;
  c.num_query_groups = 2;
  c.autocast_dtype = DType::F16;
  ASSERT_TRUE(check_config(c).empty());
  EXPECT_EQ(c.kv_channels, 16);
  EXPECT_EQ(c.ffn_hidden_size, 100);
  EXPECT_EQ(c.num_query_groups, 2);
  EXPECT_EQ(c.autocast_dtype, DType::F16);
}

TEST(TransformerConfig, MoeFfnHiddenSizeDefaultsToFfnHiddenSize) {
  TransformerConfig c = base();
  c.num_moe_experts = 4;
  ASSERT_TRUE(check_config(c).empty());
  EXPECT_EQ(c.moe_ffn_hidden_size, 256);
}

TEST(TransformerConfig, QueryKeyLayerScalingForcesFp32Softmax) {
  TransformerConfig c = base();
  c.apply_query_key_layer_scaling = true;
  c.attention_softmax_in_fp32 = false;
  ASSERT_TRUE(check_config(c).empty());
  EXPECT_TRUE(c.attention_softmax_in_fp32);
}

TEST(TransformerConfig, NegativeCapacityFactorMeansDropless) {
  TransformerConfig c = base();
  c.num_moe_experts = 4;
  c.moe_expert_capacity_factor = -1.0;
  ASSERT_TRUE(check_config(c).empty());
  EXPECT_FALSE(c.moe_expert_capacity_factor);
}

TEST(TransformerConfig, TopOneSoftmaxRoutingWithoutPreSoftmaxIsAccepted) {
  // core_v0.19.0 rejects it ("Please use --moe-router-pre-softmax when topk is 1"); 0.5.0
  // accepts it and the golden fixtures use it.
  TransformerConfig c = base();
  c.num_moe_experts = 4;
  c.moe_router_topk = 1;
  std::vector<ConfigIssue> issues = check_config(c);
  EXPECT_TRUE(issues.empty()) << describe(issues);
}

TEST(TransformerConfig, CheckIsIdempotent) {
  TransformerConfig c = base();
  c.num_moe_experts = 4;
  ASSERT_TRUE(check_config(c).empty());
  TransformerConfig again = c;
  ASSERT_TRUE(check_config(again).empty());
  EXPECT_EQ(again, c);
}

TEST(TransformerConfig, ReportsSeveralIssuesAtOnce) {
  TransformerConfig c = base();
  c.num_attention_heads = 6;
  c.tensor_model_parallel_size = 4;
  c.normalization = "LayerNrom";
  c.hidden_dropout = 1.5;
  c.pipeline_model_parallel_size = 2;
  c.num_layers = 3;
  std::vector<ConfigIssue> issues = check_config(c);
  EXPECT_TRUE(has_issue(issues, "num_attention_heads", "multiple of tensor_model_parallel_size (4)"));
  EXPECT_TRUE(has_issue(issues, "num_query_groups", "multiple of tensor_model_parallel_size (4)"));
  EXPECT_TRUE(has_issue(issues, "pipeline_dtype", "must be specified"));
  EXPECT_TRUE(has_issue(issues, "num_layers", "divisible by pipeline_model_parallel_size (2)"));
  EXPECT_TRUE(has_issue(issues, "normalization", "\"RMSNorm\""));
  EXPECT_TRUE(has_issue(issues, "hidden_dropout", "[0, 1)"));
  EXPECT_GE(issues.size(), 6u) << describe(issues);
  try {
    validate_config(c);
    FAIL() << "validate_config accepted an invalid config";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.issues().size(), issues.size());
    EXPECT_NE(std::string(e.what()).find("num_attention_heads = 6: must be a multiple of "
                                         "tensor_model_parallel_size (4)"),
              std::string::npos)
        << e.what();
  }
}

TEST(TransformerConfig, MessageNamesFieldValueAndRule) {
  TransformerConfig c = base();
  c.num_attention_heads = 6;
  c.tensor_model_parallel_size = 4;
  c.num_query_groups = 2;
  c.ffn_hidden_size = 256;
  c.sequence_parallel = true;
  std::vector<ConfigIssue> issues = check_config(c);
  ASSERT_FALSE(issues.empty());
  EXPECT_EQ(issues[0].field, "num_attention_heads");
  EXPECT_EQ(issues[0].value, "6");
  EXPECT_EQ(issues[0].rule, "must be a multiple of tensor_model_parallel_size (4)");
}

TEST(TransformerConfig, Helpers) {
  TransformerConfig c = base();
  c.num_layers = 8;
  c.init_method_std = 0.02;
  EXPECT_DOUBLE_EQ(output_layer_init_std(c), 0.02 / std::sqrt(16.0));
  c.kv_channels = 10;
  c.rotary_percent = 0.5;
  EXPECT_EQ(rotary_dim(c), 5);  // int(10 * 0.5): odd, so validation rejects it
  EXPECT_TRUE(has_issue(check_config(c), "rotary_percent", "must be even and > 0"));
  c.rotary_percent = 0.25;
  c.kv_channels = 64;
  EXPECT_EQ(rotary_dim(c), 16);
  c.rotary_percent = 1.0;
  EXPECT_EQ(rotary_dim(c), 64);
  c.kv_channels = 6;
  c.rotary_percent = 0.7;  // 6 * 0.7 = 4.199999... -> 4 (truncation, like Python's int())
  EXPECT_EQ(rotary_dim(c), 4);
}

TEST(TransformerConfig, KnownActivations) {
  for (std::string_view name : kActivationNames) {
    TransformerConfig c = base();
    c.activation_func = std::string(name);
    EXPECT_TRUE(check_config(c).empty()) << name;
  }
  EXPECT_FALSE(is_known_activation("swish"));
  EXPECT_FALSE(is_known_activation("swiglu"));  // silu + gated_linear_unit
}

// ---------------------------------------------------------------------------
// One case per rule: start from a valid config, break one rule, expect an issue with
// that field and rule text.
// ---------------------------------------------------------------------------
struct RuleCase {
  std::string name;  // test name suffix
  std::function<void(TransformerConfig&)> mutate;
  std::string field;
  std::string rule_part;
};

std::ostream& operator<<(std::ostream& os, const RuleCase& r) { return os << r.name; }

std::vector<RuleCase> rule_cases() {
  using C = TransformerConfig&;
  return {
      // A. ModelParallelConfig.__post_init__ (0.5.0).
      {"MPC1_SequenceParallelNeedsTP", [](C c) { c.sequence_parallel = true; }, "sequence_parallel",
       "requires tensor_model_parallel_size > 1"},
      {"MPC2_PipelineNeedsPipelineDtype", [](C c) { c.pipeline_model_parallel_size = 2; },
       "pipeline_dtype", "must be specified when pipeline_model_parallel_size (2) > 1"},
      {"MPC4_ExpertAndTensorParallelNeedSP",
       [](C c) {
         c.num_moe_experts = 4;
         c.expert_model_parallel_size = 2;
         c.tensor_model_parallel_size = 2;
       },
       "sequence_parallel", "must be true when expert_model_parallel_size (2) > 1"},
      // B. TransformerConfig.__post_init__ (0.5.0).
      {"TC2_Fp16AndBf16",
       [](C c) {
         c.fp16 = true;
         c.bf16 = true;
       },
       "bf16", "only one of fp16 and bf16"},
      {"TC3_HeadsMultipleOfTP",
       [](C c) {
         c.num_attention_heads = 6;
         c.num_query_groups = 4;
         c.hidden_size = 48;
         c.tensor_model_parallel_size = 4;
         c.sequence_parallel = true;
       },
       "num_attention_heads", "must be a multiple of tensor_model_parallel_size (4)"},
      {"TC6_GroupsMultipleOfTP",
       [](C c) {
         c.num_query_groups = 1;
         c.tensor_model_parallel_size = 2;
       },
       "num_query_groups", "must be a multiple of tensor_model_parallel_size (2)"},
      {"TC8_ExpertParallelNeedsExperts", [](C c) { c.expert_model_parallel_size = 2; }, "num_moe_experts",
       "must be set to use expert parallelism"},
      {"TC8_ExpertsPositive", [](C c) { c.num_moe_experts = 0; }, "num_moe_experts", "must be positive"},
      {"TC9_CpuOffloadingLayersBelowNumLayers", [](C c) { c.cpu_offloading_num_layers = 2; },
       "cpu_offloading_num_layers", "less than num_layers (2)"},
      {"TC9_CpuOffloadingLayersNonNegative", [](C c) { c.cpu_offloading_num_layers = -1; },
       "cpu_offloading_num_layers", "must be >= 0"},
      {"TC9_RejectsZeroLayers", [](C c) { c.num_layers = 0; }, "cpu_offloading_num_layers",
       "less than num_layers (0)"},
      {"TC10_CpuOffloadingWithPipeline",
       [](C c) {
         c.cpu_offloading = true;
         c.pipeline_model_parallel_size = 2;
         c.pipeline_dtype = DType::F32;
       },
       "cpu_offloading", "not supported with pipeline parallelism"},
      {"TC10_CpuOffloadingWithRecompute",
       [](C c) {
         c.cpu_offloading = true;
         c.recompute_granularity = "selective";
       },
       "cpu_offloading", "does not work with activation recomputation"},
      {"TC11_GranularityFullOrSelective", [](C c) { c.recompute_granularity = "partial"; },
       "recompute_granularity", "\"full\", \"selective\""},
      {"TC11_MethodBlockOrUniform",
       [](C c) {
         c.recompute_granularity = "full";
         c.recompute_method = "all";
         c.recompute_num_layers = 1;
       },
       "recompute_method", "\"block\", \"uniform\""},
      {"TC11_FullNeedsMethod",
       [](C c) {
         c.recompute_granularity = "full";
         c.recompute_num_layers = 1;
       },
       "recompute_method", "when recompute_granularity is \"full\""},
      {"TC11_FullNeedsNumLayers",
       [](C c) {
         c.recompute_granularity = "full";
         c.recompute_method = "uniform";
       },
       "recompute_num_layers", "must be between 1 and num_layers_per_pipeline_rank (2)"},
      {"TC11_SelectiveForbidsNumLayers",
       [](C c) {
         c.recompute_granularity = "selective";
         c.recompute_num_layers = 1;
       },
       "recompute_num_layers", "must be None when recompute_granularity is \"selective\""},
      {"TC11_DistributeSavedActivationsWithSP",
       [](C c) {
         c.recompute_granularity = "selective";
         c.distribute_saved_activations = true;
         c.tensor_model_parallel_size = 2;
         c.sequence_parallel = true;
       },
       "distribute_saved_activations", "must be false when sequence_parallel"},
      {"TC11_NumLayersDivisibleByVirtualPipeline",
       [](C c) {
         c.recompute_granularity = "selective";
         c.num_layers = 9;
         c.pipeline_model_parallel_size = 3;
         c.pipeline_dtype = DType::F32;
         c.virtual_pipeline_model_parallel_size = 2;
       },
       "num_layers", "must be divisible by virtual_pipeline_model_parallel_size (2)"},
      {"TC13_FusionNeedsGeluOrSilu",
       [](C c) {
         c.bias_activation_fusion = true;
         c.activation_func = "relu";
       },
       "activation_func", "must be \"gelu\" or \"silu\" when bias_activation_fusion"},
      {"TC13_FusedGeluNeedsBias",
       [](C c) {
         c.bias_activation_fusion = true;
         c.add_bias_linear = false;
       },
       "add_bias_linear", "must be true when bias_activation_fusion is true and activation_func is \"gelu\""},
      {"TC14_RopeFusionNotInterleaved",
       [](C c) {
         c.apply_rope_fusion = true;
         c.rotary_interleaved = true;
       },
       "apply_rope_fusion", "does not work with rotary_interleaved"},
      // C. Elsewhere.
      {"Elsewhere_FfnMultipleOfTP",
       [](C c) {
         c.tensor_model_parallel_size = 2;
         c.ffn_hidden_size = 101;
       },
       "ffn_hidden_size", "must be a multiple of tensor_model_parallel_size (2)"},
      {"Elsewhere_MoeFfnMultipleOfExpertTP",
       [](C c) {
         c.tensor_model_parallel_size = 2;
         c.num_moe_experts = 4;
         c.moe_ffn_hidden_size = 33;
       },
       "moe_ffn_hidden_size", "multiple of the expert tensor parallel size (2)"},
      {"Elsewhere_NumLayersDivisibleByPipeline",
       [](C c) {
         c.num_layers = 3;
         c.pipeline_model_parallel_size = 2;
         c.pipeline_dtype = DType::BF16;
       },
       "num_layers", "must be divisible by pipeline_model_parallel_size (2)"},
      {"Elsewhere_StageLayersDivisibleByVirtualPipeline",
       [](C c) {
         c.num_layers = 6;
         c.pipeline_model_parallel_size = 3;
         c.pipeline_dtype = DType::F32;
         c.virtual_pipeline_model_parallel_size = 3;
       },
       "num_layers", "num_layers / pipeline_model_parallel_size (2) must be divisible by "
                     "virtual_pipeline_model_parallel_size (3)"},
      {"Elsewhere_VirtualPipelineNeedsPipelineAbove2",
       [](C c) {
         c.num_layers = 4;
         c.pipeline_model_parallel_size = 2;
         c.pipeline_dtype = DType::F32;
         c.virtual_pipeline_model_parallel_size = 2;
       },
       "virtual_pipeline_model_parallel_size", "requires pipeline_model_parallel_size > 2 (is 2)"},
      {"Elsewhere_ExpertsMultipleOfEP",
       [](C c) {
         c.num_moe_experts = 3;
         c.expert_model_parallel_size = 2;
         c.moe_router_topk = 1;
       },
       "num_moe_experts", "must be a multiple of expert_model_parallel_size (2)"},
      {"Elsewhere_GroupedGemmWithoutBias",
       [](C c) {
         c.num_moe_experts = 4;
         c.moe_grouped_gemm = true;
       },
       "add_bias_linear", "must be false when moe_grouped_gemm"},
      {"Elsewhere_NoTokenDropping",
       [](C c) {
         c.num_moe_experts = 4;
         c.moe_token_dropping = true;
       },
       "moe_token_dropping", "is not supported"},
      {"Elsewhere_SinkhornWithoutAuxLoss",
       [](C c) {
         c.num_moe_experts = 4;
         c.moe_router_load_balancing_type = "sinkhorn";
         c.moe_aux_loss_coeff = 0.01;
       },
       "moe_aux_loss_coeff", "must be 0 with sinkhorn"},
      {"Elsewhere_TopkAtMostExperts",
       [](C c) {
         c.num_moe_experts = 2;
         c.moe_router_topk = 3;
       },
       "moe_router_topk", "must be <= num_moe_experts (2)"},
      {"Elsewhere_ExpertAndContextParallel",
       [](C c) {
         c.num_moe_experts = 4;
         c.expert_model_parallel_size = 2;
         c.context_parallel_size = 2;
       },
       "expert_model_parallel_size", "cannot be combined with context_parallel_size (2)"},
      {"Elsewhere_FusedSiluIsSwiglu",
       [](C c) {
         c.bias_activation_fusion = true;
         c.activation_func = "silu";
       },
       "gated_linear_unit", "must be true when bias_activation_fusion is true and activation_func is \"silu\""},
      // D. Newer-version fields.
      {"Newer_MoeFfnNeedsExperts", [](C c) { c.moe_ffn_hidden_size = 64; }, "moe_ffn_hidden_size",
       "num_moe_experts is None"},
      {"Newer_CapacityFactorNotWithSinkhorn",
       [](C c) {
         c.num_moe_experts = 4;
         c.moe_router_load_balancing_type = "sinkhorn";
         c.moe_expert_capacity_factor = 1.0;
       },
       "moe_expert_capacity_factor", "only works with aux_loss or none load balancing"},
      {"Newer_PadNeedsCapacityFactor",
       [](C c) {
         c.num_moe_experts = 4;
         c.moe_pad_expert_input_to_capacity = true;
       },
       "moe_pad_expert_input_to_capacity", "requires moe_expert_capacity_factor"},
      {"Newer_ExpertBiasNeedsSigmoid",
       [](C c) {
         c.num_moe_experts = 4;
         c.moe_router_enable_expert_bias = true;
       },
       "moe_router_enable_expert_bias", "requires moe_router_score_function \"sigmoid\""},
      {"Newer_ScoreFunctionSqrtSoftplusNotModelled",
       [](C c) {
         c.num_moe_experts = 4;
         c.moe_router_score_function = "sqrtsoftplus";
       },
       "moe_router_score_function", "not modelled by paritron"},
      {"Newer_ScoreFunctionKnown", [](C c) { c.moe_router_score_function = "tanh"; },
       "moe_router_score_function", "\"softmax\", \"sigmoid\""},
      {"Newer_RouterDtype", [](C c) { c.moe_router_dtype = "fp16"; }, "moe_router_dtype", "\"fp32\", \"fp64\""},
      {"Newer_TokenDropPolicy", [](C c) { c.moe_token_drop_policy = "random"; }, "moe_token_drop_policy",
       "\"probs\", \"position\""},
      {"Newer_ExpertTensorParallelEqualsTP", [](C c) { c.expert_tensor_parallel_size = 2; },
       "expert_tensor_parallel_size", "not modelled by paritron"},
      {"Newer_MoeBiasNeedsExpertTP1",
       [](C c) {
         c.num_moe_experts = 4;
         c.tensor_model_parallel_size = 2;
         c.expert_tensor_parallel_size = 2;
       },
       "expert_tensor_parallel_size", "must be 1 when num_moe_experts is set and add_bias_linear"},
      {"Newer_Fp8RecipeDelayedOnly",
       [](C c) {
         c.fp8 = "hybrid";
         c.fp8_recipe = "mxfp8";
       },
       "fp8_recipe", "not modelled by paritron"},
      {"Newer_Fp8RecipeKnown", [](C c) { c.fp8_recipe = "fast"; }, "fp8_recipe", "\"delayed\""},
      // E. Paritron.
      {"Paritron_HiddenSizePositive", [](C c) { c.hidden_size = 0; }, "hidden_size", "must be >= 1"},
      {"Paritron_HeadsPositive", [](C c) { c.num_attention_heads = -8; }, "num_attention_heads", "must be >= 1"},
      {"Paritron_NumLayersPositive", [](C c) { c.num_layers = -1; }, "num_layers", "must be >= 1"},
      {"Paritron_KvChannelsPositive",
       [](C c) {
         c.hidden_size = 4;
         c.num_attention_heads = 8;
       },
       "kv_channels", "hidden_size // num_attention_heads = 4 // 8 = 0"},
      {"Paritron_FfnPositive", [](C c) { c.ffn_hidden_size = 0; }, "ffn_hidden_size", "must be >= 1"},
      {"Paritron_GroupsPositive", [](C c) { c.num_query_groups = 0; }, "num_query_groups", "must be >= 1"},
      {"Paritron_TensorParallelPositive", [](C c) { c.tensor_model_parallel_size = 0; },
       "tensor_model_parallel_size", "must be >= 1"},
      {"Paritron_ContextParallelPositive", [](C c) { c.context_parallel_size = 0; }, "context_parallel_size",
       "must be >= 1"},
      {"Paritron_PipelinePositive", [](C c) { c.pipeline_model_parallel_size = 0; },
       "pipeline_model_parallel_size", "must be >= 1"},
      {"Paritron_ExpertParallelPositive", [](C c) { c.expert_model_parallel_size = -2; },
       "expert_model_parallel_size", "must be >= 1"},
      {"Paritron_VirtualPipelinePositive",
       [](C c) {
         c.num_layers = 6;
         c.pipeline_model_parallel_size = 3;
         c.pipeline_dtype = DType::F32;
         c.virtual_pipeline_model_parallel_size = 0;
       },
       "virtual_pipeline_model_parallel_size", "must be >= 1"},
      {"Paritron_HeadsMultipleOfGroups", [](C c) { c.num_query_groups = 3; }, "num_attention_heads",
       "must be a multiple of num_query_groups (3)"},
      {"Paritron_Normalization", [](C c) { c.normalization = "BatchNorm"; }, "normalization",
       "\"LayerNorm\", \"RMSNorm\""},
      {"Paritron_ActivationKnown", [](C c) { c.activation_func = "swish"; }, "activation_func",
       "\"squared_relu\""},
      {"Paritron_HiddenDropoutRange", [](C c) { c.hidden_dropout = 1.0; }, "hidden_dropout", "must be in [0, 1)"},
      {"Paritron_AttentionDropoutRange", [](C c) { c.attention_dropout = -0.1; }, "attention_dropout",
       "must be in [0, 1)"},
      {"Paritron_DropoutNotNaN", [](C c) { c.attention_dropout = std::nan(""); }, "attention_dropout",
       "must be in [0, 1)"},
      {"Paritron_LayernormEpsilon", [](C c) { c.layernorm_epsilon = -1e-5; }, "layernorm_epsilon",
       "must be finite and >= 0"},
      {"Paritron_LayernormEpsilonFinite",
       [](C c) { c.layernorm_epsilon = std::numeric_limits<double>::infinity(); }, "layernorm_epsilon",
       "must be finite and >= 0"},
      {"Paritron_InitMethodStd", [](C c) { c.init_method_std = -0.02; }, "init_method_std",
       "must be finite and >= 0"},
      {"Paritron_TopkPositive", [](C c) { c.moe_router_topk = 0; }, "moe_router_topk", "must be >= 1"},
      {"Paritron_LoadBalancingType", [](C c) { c.moe_router_load_balancing_type = "seq_aux_loss"; },
       "moe_router_load_balancing_type", "\"aux_loss\", \"sinkhorn\", \"none\""},
      {"Paritron_Fp8Format", [](C c) { c.fp8 = "e5m2"; }, "fp8", "\"e4m3\", \"hybrid\""},
      {"Paritron_Fp8AmaxAlgo", [](C c) { c.fp8_amax_compute_algo = "mean"; }, "fp8_amax_compute_algo",
       "\"most_recent\", \"max\""},
      {"Paritron_Fp8HistoryLen", [](C c) { c.fp8_amax_history_len = 0; }, "fp8_amax_history_len",
       "must be >= 1"},
      {"Paritron_Fp8Interval", [](C c) { c.fp8_interval = 0; }, "fp8_interval", "must be >= 1"},
      {"Paritron_RotaryPercentRange", [](C c) { c.rotary_percent = 1.5; }, "rotary_percent", "must be in (0, 1]"},
      {"Paritron_RotaryPercentZero", [](C c) { c.rotary_percent = 0.0; }, "rotary_percent", "must be in (0, 1]"},
      {"Paritron_RotaryDimEven",
       [](C c) {
         c.kv_channels = 6;
         c.rotary_percent = 0.5;
       },
       "rotary_percent", "int(kv_channels * rotary_percent) = int(6 * 0.5) = 3 must be even and > 0"},
      {"Paritron_RotaryDimPositive", [](C c) { c.rotary_percent = 0.01; }, "rotary_percent",
       "= 0 must be even and > 0"},
      {"Paritron_RotaryBase", [](C c) { c.rotary_base = 0; }, "rotary_base", "must be finite and > 0"},
      {"Paritron_SeqLenInterpolation", [](C c) { c.seq_len_interpolation_factor = 0.0; },
       "seq_len_interpolation_factor", "must be finite and > 0 if set"},
      {"Paritron_SoftmaxScale", [](C c) { c.softmax_scale = -1.0; }, "softmax_scale",
       "must be finite and > 0 if set"},
      {"Paritron_WindowSize", [](C c) { c.window_size = std::array<int64_t, 2>{-2, 0}; }, "window_size",
       "entries must be >= -1"},
      {"Paritron_ParamsDtypeFloat", [](C c) { c.params_dtype = DType::I64; }, "params_dtype",
       "\"float64\", \"float32\", \"float16\", \"bfloat16\""},
      {"Paritron_PipelineDtypeFloat",
       [](C c) {
         c.pipeline_dtype = DType::F8_E4M3;
       },
       "pipeline_dtype", "\"bfloat16\""},
      {"Paritron_RecomputeNumLayersPositive",
       [](C c) {
         c.recompute_granularity = "full";
         c.recompute_method = "uniform";
         c.recompute_num_layers = 0;
       },
       "recompute_num_layers", "must be >= 1 if set"},
      {"Paritron_MoeFfnPositive",
       [](C c) {
         c.num_moe_experts = 4;
         c.moe_ffn_hidden_size = -4;
       },
       "moe_ffn_hidden_size", "must be >= 1"},
      {"Paritron_AuxLossFinite", [](C c) { c.moe_aux_loss_coeff = std::nan(""); }, "moe_aux_loss_coeff",
       "must be finite"},
      {"Paritron_JitterNonNegative", [](C c) { c.moe_input_jitter_eps = -0.1; }, "moe_input_jitter_eps",
       "must be finite and >= 0 if set"},
      {"Paritron_HiddenSizeOverflow",
       [](C c) { c.hidden_size = std::numeric_limits<int64_t>::max(); }, "hidden_size",
       "4 * hidden_size overflows int64"},
  };
}

class ConfigRule : public ::testing::TestWithParam<RuleCase> {};

TEST_P(ConfigRule, BaseIsValidAndRuleFires) {
  const RuleCase& rule = GetParam();
  TransformerConfig valid = base();
  ASSERT_TRUE(check_config(valid).empty());
  TransformerConfig c = base();
  rule.mutate(c);
  std::vector<ConfigIssue> issues = check_config(c);
  EXPECT_TRUE(has_issue(issues, rule.field, rule.rule_part))
      << "expected an issue on " << rule.field << " containing \"" << rule.rule_part << "\", got"
      << describe(issues);
  EXPECT_THROW(validate_config(c), ConfigError);
}

INSTANTIATE_TEST_SUITE_P(AllRules, ConfigRule, ::testing::ValuesIn(rule_cases()),
                         [](const ::testing::TestParamInfo<RuleCase>& info) { return info.param.name; });

TEST(TransformerConfig, AcceptedButOnlyForTransformerEngine) {
  // Local DotProductAttention asserts cp == 1 and window_size is None, TE attention supports
  // both: the config itself is valid.
  TransformerConfig c = base();
  c.context_parallel_size = 2;
  c.window_size = std::array<int64_t, 2>{-1, 0};
  std::vector<ConfigIssue> issues = check_config(c);
  EXPECT_TRUE(issues.empty()) << describe(issues);
}

TEST(TransformerConfig, ValidParallelLayouts) {
  TransformerConfig c = base();
  c.num_layers = 8;
  c.tensor_model_parallel_size = 4;
  c.sequence_parallel = true;
  c.pipeline_model_parallel_size = 4;
  c.virtual_pipeline_model_parallel_size = 2;
  c.pipeline_dtype = DType::BF16;
  c.num_moe_experts = 8;
  c.expert_model_parallel_size = 4;
  c.add_bias_linear = false;
  c.moe_grouped_gemm = true;
  std::vector<ConfigIssue> issues = check_config(c);
  EXPECT_TRUE(issues.empty()) << describe(issues);
}

// ---------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------

// Any values at all, extremes included: check_config must report, never throw or trap
// (integer division by zero or INT64_MIN / -1 would kill the process).
RC_GTEST_PROP(TransformerConfigProperty, NeverThrowsOnArbitraryValues, ()) {
  auto any_int = [] {
    return *rc::gen::oneOf(rc::gen::arbitrary<int64_t>(), rc::gen::inRange<int64_t>(-3, 10),
                           rc::gen::element(std::numeric_limits<int64_t>::min(),
                                            std::numeric_limits<int64_t>::max(), int64_t{-1}, int64_t{0}));
  };
  auto maybe_int = [&]() -> std::optional<int64_t> {
    if (*rc::gen::arbitrary<bool>()) return std::nullopt;
    return any_int();
  };
  auto any_double = [] {
    return *rc::gen::oneOf(rc::gen::arbitrary<double>(),
                           rc::gen::element(0.0, -1.0, 0.5, 1.0, std::nan(""),
                                            std::numeric_limits<double>::infinity()));
  };
  TransformerConfig c;
  c.tensor_model_parallel_size = any_int();
  c.context_parallel_size = any_int();
  c.pipeline_model_parallel_size = any_int();
  c.virtual_pipeline_model_parallel_size = maybe_int();
  c.expert_model_parallel_size = any_int();
  c.expert_tensor_parallel_size = maybe_int();
  c.sequence_parallel = *rc::gen::arbitrary<bool>();
  c.cpu_offloading = *rc::gen::arbitrary<bool>();
  c.cpu_offloading_num_layers = any_int();
  c.num_layers = any_int();
  c.hidden_size = any_int();
  c.num_attention_heads = any_int();
  c.num_query_groups = maybe_int();
  c.ffn_hidden_size = maybe_int();
  c.kv_channels = maybe_int();
  c.num_moe_experts = maybe_int();
  c.moe_ffn_hidden_size = maybe_int();
  c.moe_router_topk = any_int();
  c.recompute_num_layers = maybe_int();
  c.fp8_interval = any_int();
  c.hidden_dropout = any_double();
  c.rotary_percent = any_double();
  c.rotary_base = any_double();
  c.layernorm_epsilon = any_double();
  c.moe_expert_capacity_factor = any_double();
  c.moe_aux_loss_coeff = any_double();
  c.activation_func = *rc::gen::element<std::string>("gelu", "silu", "", "swish");
  c.recompute_granularity = *rc::gen::element<std::optional<std::string>>(std::nullopt, "full", "selective", "x");
  c.recompute_method = *rc::gen::element<std::optional<std::string>>(std::nullopt, "block", "y");
  c.bias_activation_fusion = *rc::gen::arbitrary<bool>();
  std::vector<ConfigIssue> issues = check_config(c);
  for (const ConfigIssue& issue : issues) {
    RC_ASSERT(!issue.field.empty());
    RC_ASSERT(!issue.rule.empty());
  }
}

}  // namespace
}  // namespace paritron
