// The parameter catalogue (module_params.h) against Megatron-core core_v0.5.0's
// local-spec modules (attention.py, mlp.py, moe/*.py, transformer_layer.py,
// transformer_block.py, fused_layer_norm.py; spec §4, §6, §9, §10.4, §13).
#include "common/module_params.h"

#include <algorithm>
#include <set>

#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "common/parallel_config.h"
#include "common/test_util.h"
#include "common/transformer_config.h"

namespace paritron {
namespace {

using namespace test_util;  // gqa_config(): h 8, n 4, g 2 (GQA, r = 2), hn 2, f 12, two layers

// Attention.__init__ registers linear_proj before SelfAttention registers
// linear_qkv, so the state dict lists linear_proj first.
TEST(ModuleParams, SelfAttentionGqaShapesAndOrder) {
  const auto ps = module_params("self_attention", gqa_config());
  EXPECT_EQ(keys_of(ps), (Keys{"linear_proj.weight", "linear_proj.bias", "linear_qkv.weight", "linear_qkv.bias"}));
  // linear_proj: row-parallel n*hn -> h, output-layer init, bias replicated.
  EXPECT_EQ(ps[0].shape, (Shape{8, 8}));
  EXPECT_EQ(ps[0].init, Init::kNormalOutputLayer);
  EXPECT_EQ(ps[0].tp_axis, 1);
  EXPECT_EQ(ps[1].shape, (Shape{8}));
  EXPECT_EQ(ps[1].init, Init::kZeros);
  EXPECT_EQ(ps[1].tp_axis, -1);
  // linear_qkv: (n + 2g) hn = (4 + 4) * 2 = 16 rows.
  EXPECT_EQ(ps[2].shape, (Shape{16, 8}));
  EXPECT_EQ(ps[2].init, Init::kNormal);
  EXPECT_EQ(ps[2].tp_axis, 0);
  EXPECT_EQ(ps[3].shape, (Shape{16}));
  EXPECT_EQ(ps[3].tp_axis, 0);
  for (const ParamSpec& p : ps) {
    EXPECT_TRUE(p.linear) << p.key;
    EXPECT_FALSE(p.glu_fc1) << p.key;
    EXPECT_FALSE(p.expert.has_value());
    EXPECT_FALSE(p.layer.has_value());
  }
}

// linear_qkv's bias = add_bias_linear or add_qkv_bias; linear_proj's = add_bias_linear.
TEST(ModuleParams, QkvBiasFlag) {
  TransformerConfig c = gqa_config();
  c.add_bias_linear = false;
  EXPECT_EQ(keys_of(module_params("self_attention", c)), (Keys{"linear_proj.weight", "linear_qkv.weight"}));
  c.add_qkv_bias = true;
  EXPECT_EQ(keys_of(module_params("self_attention", c)),
            (Keys{"linear_proj.weight", "linear_qkv.weight", "linear_qkv.bias"}));
}

// CrossAttention ignores add_qkv_bias and refuses GQA.
TEST(ModuleParams, CrossAttention) {
  TransformerConfig c;
  c.num_layers = 2;
  c.hidden_size = 8;
  c.num_attention_heads = 4;
  c.kv_channels = 4;
  c.add_bias_linear = false;
  c.add_qkv_bias = true;
  validate_config(c);
  const auto ps = module_params("cross_attention", c);
  EXPECT_EQ(keys_of(ps), (Keys{"linear_proj.weight", "linear_q.weight", "linear_kv.weight"}));
  EXPECT_EQ(ps[0].shape, (Shape{8, 16}));
  EXPECT_EQ(ps[1].shape, (Shape{16, 8}));
  EXPECT_EQ(ps[2].shape, (Shape{32, 8}));
  EXPECT_EQ(ps[2].tp_axis, 0);
  c.add_bias_linear = true;
  EXPECT_EQ(keys_of(module_params("cross_attention", c)),
            (Keys{"linear_proj.weight", "linear_proj.bias", "linear_q.weight", "linear_q.bias", "linear_kv.weight",
                  "linear_kv.bias"}));
  EXPECT_THROW(module_params("cross_attention", gqa_config()), Error);
}

TEST(ModuleParams, MlpPlainAndGated) {
  TransformerConfig c = gqa_config();
  auto ps = module_params("mlp", c);
  EXPECT_EQ(keys_of(ps), (Keys{"linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias"}));
  EXPECT_EQ(ps[0].shape, (Shape{12, 8}));
  EXPECT_FALSE(ps[0].glu_fc1);
  EXPECT_EQ(ps[2].shape, (Shape{8, 12}));
  EXPECT_EQ(ps[2].init, Init::kNormalOutputLayer);
  EXPECT_EQ(ps[2].tp_axis, 1);
  EXPECT_EQ(ps[3].tp_axis, -1);
  c.gated_linear_unit = true;
  ps = module_params("mlp", c);
  EXPECT_EQ(ps[0].shape, (Shape{24, 8}));
  EXPECT_TRUE(ps[0].glu_fc1);
  EXPECT_EQ(ps[1].shape, (Shape{24}));
  EXPECT_TRUE(ps[1].glu_fc1);  // the bias is sharded [gate_r; up_r] too
  EXPECT_FALSE(ps[2].glu_fc1);
  EXPECT_EQ(ps[2].shape, (Shape{8, 12}));
}

TEST(ModuleParams, NormsAndZeroCenteredGamma) {
  TransformerConfig c = gqa_config();
  auto ln = module_params("layernorm", c);
  EXPECT_EQ(keys_of(ln), (Keys{"weight", "bias"}));
  EXPECT_EQ(ln[0].init, Init::kOnes);
  EXPECT_EQ(ln[1].init, Init::kZeros);
  EXPECT_EQ(ln[0].shape, (Shape{8}));
  EXPECT_FALSE(ln[0].linear);
  auto rms = module_params("rmsnorm", c);
  EXPECT_EQ(keys_of(rms), (Keys{"weight"}));
  c.layernorm_zero_centered_gamma = true;
  EXPECT_EQ(module_params("layernorm", c)[0].init, Init::kZeros);
  EXPECT_EQ(module_params("rmsnorm", c)[0].init, Init::kZeros);
}

TEST(ModuleParams, MoeLayerExperts) {
  TransformerConfig c = gqa_config();
  c.num_moe_experts = 3;
  c.moe_ffn_hidden_size = 6;
  c.gated_linear_unit = true;
  validate_config(c);
  const auto ps = module_params("moe_layer", c);
  ASSERT_EQ(ps.size(), 1u + 3u * 4u);
  EXPECT_EQ(ps[0].key, "router.weight");
  EXPECT_EQ(ps[0].shape, (Shape{3, 8}));
  EXPECT_EQ(ps[0].init, Init::kNormal);
  EXPECT_EQ(ps[0].tp_axis, -1);
  EXPECT_FALSE(ps[0].linear);  // initialised even without perform_initialization
  EXPECT_EQ(ps[5].key, "experts.local_experts.1.linear_fc1.weight");
  EXPECT_EQ(ps[5].expert, 1);
  EXPECT_EQ(ps[5].shape, (Shape{12, 8}));  // 2 * moe_ffn_hidden_size
  EXPECT_TRUE(ps[5].glu_fc1);
  EXPECT_EQ(ps[12].key, "experts.local_experts.2.linear_fc2.bias");
  EXPECT_EQ(find(ps, "experts.local_experts.2.linear_fc2.weight").shape, (Shape{8, 6}));
  EXPECT_EQ(find(ps, "experts.local_experts.0.linear_fc2.weight").init, Init::kNormalOutputLayer);
  const auto router = module_params("moe_router", c);
  ASSERT_EQ(router.size(), 1u);
  EXPECT_EQ(router[0].key, "weight");
  EXPECT_EQ(router[0].shape, (Shape{3, 8}));
  // Without moe_ffn_hidden_size the experts use ffn_hidden_size.
  TransformerConfig d = gqa_config();
  d.num_moe_experts = 2;
  validate_config(d);
  EXPECT_EQ(find(module_params("moe_layer", d), "experts.local_experts.1.linear_fc1.weight").shape, (Shape{12, 8}));
}

TEST(ModuleParams, TransformerLayerKeys) {
  TransformerConfig c = gqa_config();
  EXPECT_EQ(keys_of(module_params("transformer_layer", c)),
            (Keys{"input_layernorm.weight", "input_layernorm.bias", "self_attention.linear_proj.weight",
                  "self_attention.linear_proj.bias", "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                  "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias", "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
                  "mlp.linear_fc2.weight", "mlp.linear_fc2.bias"}));
  c.normalization = "RMSNorm";
  c.add_bias_linear = false;
  EXPECT_EQ(keys_of(module_params("transformer_layer", c)),
            (Keys{"input_layernorm.weight", "self_attention.linear_proj.weight", "self_attention.linear_qkv.weight",
                  "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"}));
  c.num_moe_experts = 2;
  validate_config(c);
  EXPECT_EQ(keys_of(module_params("transformer_layer", c)),
            (Keys{"input_layernorm.weight", "self_attention.linear_proj.weight", "self_attention.linear_qkv.weight",
                  "pre_mlp_layernorm.weight", "mlp.router.weight", "mlp.experts.local_experts.0.linear_fc1.weight",
                  "mlp.experts.local_experts.0.linear_fc2.weight", "mlp.experts.local_experts.1.linear_fc1.weight",
                  "mlp.experts.local_experts.1.linear_fc2.weight"}));
}

TEST(ModuleParams, TransformerBlockKeys) {
  TransformerConfig c = gqa_config();
  c.num_layers = 3;
  const auto layer = module_params("transformer_layer", c);
  const auto block = module_params("transformer_block", c);
  ASSERT_EQ(block.size(), 3 * layer.size() + 2);
  for (size_t i = 0; i < 3; ++i) {
    for (size_t j = 0; j < layer.size(); ++j) {
      const ParamSpec& b = block[i * layer.size() + j];
      EXPECT_EQ(b.key, "layers." + std::to_string(i) + "." + layer[j].key);
      EXPECT_EQ(b.layer, static_cast<int64_t>(i));
      EXPECT_EQ(b.shape, layer[j].shape);
      EXPECT_EQ(b.init, layer[j].init);
    }
  }
  EXPECT_EQ(block[block.size() - 2].key, "final_layernorm.weight");
  EXPECT_EQ(block.back().key, "final_layernorm.bias");
  EXPECT_FALSE(block.back().layer.has_value());
  c.normalization = "RMSNorm";
  const auto rms_block = module_params("transformer_block", c);
  EXPECT_EQ(rms_block.back().key, "final_layernorm.weight");
}

TEST(ModuleParams, Errors) {
  TransformerConfig c = gqa_config();
  EXPECT_THROW(module_params("attention", c), Error);
  EXPECT_THROW(module_params("moe_layer", c), Error);  // no experts
  EXPECT_THROW(module_params("moe_router", c), Error);
  TransformerConfig raw;
  raw.num_layers = 1;
  raw.hidden_size = 8;
  raw.num_attention_heads = 2;
  EXPECT_THROW(module_params("mlp", raw), Error);  // derived defaults missing
  c.num_moe_experts = 2;
  c.moe_grouped_gemm = true;
  c.add_bias_linear = false;
  validate_config(c);
  EXPECT_THROW(module_params("moe_layer", c), Error);
}

// Spec §10.4: qkv rows of rank r are contiguous; linear_proj columns; GLU two blocks.
TEST(ModuleParams, LocalShardSpec) {
  TransformerConfig c = gqa_config();
  c.gated_linear_unit = true;
  const auto attn = module_params("self_attention", c);
  const TpShard qkv = local_shard_spec(find(attn, "linear_qkv.weight"), 2, 1);
  EXPECT_EQ(qkv.axis, 0);
  EXPECT_EQ(qkv.ranges, (std::vector<IndexRange>{{8, 16}}));
  EXPECT_EQ(qkv.local_shape, (Shape{8, 8}));
  const TpShard proj = local_shard_spec(find(attn, "linear_proj.weight"), 2, 1);
  EXPECT_EQ(proj.axis, 1);
  EXPECT_EQ(proj.ranges, (std::vector<IndexRange>{{4, 8}}));
  EXPECT_EQ(proj.local_shape, (Shape{8, 4}));
  const TpShard bias = local_shard_spec(find(attn, "linear_proj.bias"), 2, 1);
  EXPECT_EQ(bias.axis, -1);
  EXPECT_EQ(bias.local_shape, (Shape{8}));
  const auto mlp = module_params("mlp", c);
  // f = 12, tp 2, rank 1: gate rows [6, 12), up rows [12 + 6, 24).
  const TpShard fc1 = local_shard_spec(find(mlp, "linear_fc1.weight"), 2, 1);
  EXPECT_EQ(fc1.axis, 0);
  EXPECT_EQ(fc1.ranges, (std::vector<IndexRange>{{6, 12}, {18, 24}}));
  EXPECT_EQ(fc1.local_shape, (Shape{12, 8}));
  EXPECT_EQ(local_shard_spec(find(mlp, "linear_fc1.bias"), 3, 0).ranges, (std::vector<IndexRange>{{0, 4}, {12, 16}}));
  ParallelConfig pc;
  pc.tensor_model_parallel_size = 4;
  EXPECT_EQ(local_shard_spec(find(mlp, "linear_fc2.weight"), pc, 3).ranges, (std::vector<IndexRange>{{9, 12}}));
  EXPECT_THROW(local_shard_spec(find(mlp, "linear_fc1.weight"), 5, 0), Error);  // 12 % 5
  EXPECT_THROW(local_shard_spec(find(mlp, "linear_fc1.weight"), 2, 2), Error);  // rank out of range
  EXPECT_THROW(local_shard_spec(find(mlp, "linear_fc1.weight"), 0, 0), Error);
}

// A valid config built constructively for tensor-parallel size tp.
TransformerConfig arbitrary_config(int64_t tp) {
  TransformerConfig c;
  c.tensor_model_parallel_size = tp;
  c.sequence_parallel = tp > 1;
  const int64_t groups = tp * *rc::gen::inRange<int64_t>(1, 3);
  c.num_attention_heads = groups * *rc::gen::element<int64_t>(1, 2);
  c.num_query_groups = groups;
  c.kv_channels = *rc::gen::element<int64_t>(2, 4);  // RoPE needs an even rotary dim
  c.hidden_size = *rc::gen::inRange<int64_t>(1, 12);
  c.ffn_hidden_size = tp * *rc::gen::inRange<int64_t>(1, 4);
  c.num_layers = *rc::gen::inRange<int64_t>(1, 4);
  c.add_bias_linear = *rc::gen::arbitrary<bool>();
  c.add_qkv_bias = *rc::gen::arbitrary<bool>();
  c.gated_linear_unit = *rc::gen::arbitrary<bool>();
  c.normalization = *rc::gen::element<std::string>("LayerNorm", "RMSNorm");
  if (*rc::gen::arbitrary<bool>()) {
    c.num_moe_experts = *rc::gen::inRange<int64_t>(1, 4);
    c.moe_router_topk = 1;
    if (*rc::gen::arbitrary<bool>()) c.moe_ffn_hidden_size = tp * *rc::gen::inRange<int64_t>(1, 3);
  }
  return c;
}

// The TP shards of every parameter partition its split axis: each global
// index is held by exactly one rank, the local shape sums to the global one.
RC_GTEST_PROP(ModuleParams, TpShardsPartitionEveryParameter, ()) {
  const int64_t tp = *rc::gen::element<int64_t>(1, 2, 3, 4);
  TransformerConfig c = arbitrary_config(tp);
  const auto issues = check_config(c);
  for (const ConfigIssue& i : issues) RC_LOG() << i.message() << "\n";
  RC_ASSERT(issues.empty());
  for (const ParamSpec& p : module_params("transformer_block", c)) {
    if (p.tp_axis < 0) {
      RC_ASSERT(local_shard_spec(p, tp, tp - 1).local_shape == p.shape);
      continue;
    }
    const auto extent = p.shape[static_cast<size_t>(p.tp_axis)];
    std::vector<int> held(static_cast<size_t>(extent), 0);
    int64_t local_sum = 0;
    for (int64_t r = 0; r < tp; ++r) {
      const TpShard s = local_shard_spec(p, tp, r);
      RC_ASSERT(s.axis == p.tp_axis);
      RC_ASSERT(s.ranges.size() == (p.glu_fc1 ? 2u : 1u));
      int64_t len = 0;
      for (const IndexRange& range : s.ranges) {
        for (int64_t i = range.begin; i < range.end; ++i) ++held[static_cast<size_t>(i)];
        len += range.end - range.begin;
      }
      RC_ASSERT(s.local_shape[static_cast<size_t>(p.tp_axis)] == len);
      local_sum += len;
    }
    RC_ASSERT(local_sum == extent);
    RC_ASSERT(std::all_of(held.begin(), held.end(), [](int n) { return n == 1; }));
  }
}

// The block is num_layers copies of the layer plus the final norm, and keys are unique.
RC_GTEST_PROP(ModuleParams, BlockIsLayersPlusFinalNorm, ()) {
  TransformerConfig c = arbitrary_config(*rc::gen::element<int64_t>(1, 2));
  const auto issues = check_config(c);
  for (const ConfigIssue& i : issues) RC_LOG() << i.message() << "\n";
  RC_ASSERT(issues.empty());
  const auto layer = module_params("transformer_layer", c);
  const auto block = module_params("transformer_block", c);
  const size_t norm = c.normalization == "RMSNorm" ? 1 : 2;
  RC_ASSERT(block.size() == static_cast<size_t>(c.num_layers) * layer.size() + norm);
  std::set<std::string> keys;
  for (const ParamSpec& p : block) keys.insert(p.key);
  RC_ASSERT(keys.size() == block.size());
  // Experts carry their global index, and only expert parameters do.
  for (const ParamSpec& p : layer) RC_ASSERT(p.expert.has_value() == (p.key.find(".local_experts.") != std::string::npos));
}

}  // namespace
}  // namespace paritron
