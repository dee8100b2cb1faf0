// Parameter initialisation (init.h): Megatron's init rules (core_v0.5.0
// megatron/core/utils.py, tensor_parallel/layers.py, fused_layer_norm.py,
// moe/router.py; spec §13) drawn from the counter-based RNG, and TP shards
// that equal the slice of the whole tensor bit for bit.
#include "common/init.h"

#include <algorithm>
#include <cmath>

#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "common/parallel_config.h"
#include "common/rng.h"
#include "common/test_util.h"
#include "common/transformer_config.h"

namespace paritron {
namespace {

using namespace test_util;

// h 16, n 4, g 2 (GQA), hn 4, f 24, eight layers, init std 0.05.
TransformerConfig config() {
  return gqa_config(8, 16, 24, [](TransformerConfig& c) { c.init_method_std = 0.05; });
}

double sample_std(const Tensor& t) {
  double sum = 0, sq = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    sum += t.get(i);
    sq += t.get(i) * t.get(i);
  }
  const double n = static_cast<double>(t.numel());
  return std::sqrt(sq / n - (sum / n) * (sum / n));
}

// Element i of a normal init is the draw of global index i under the key of
// the tensor's full name, scaled by the init's std.
TEST(Init, NormalDrawsAreKeyedByNameAndIndex) {
  const TransformerConfig c = config();
  const auto ps = module_params("self_attention", c);
  const ParamSpec& qkv = find(ps, "linear_qkv.weight");
  const Tensor t = init_parameter(qkv, c, 7, DType::F64, "layers.3.self_attention.");
  ASSERT_EQ(t.shape(), (Shape{(4 + 2 * 2) * 4, 16}));
  const RngKey key = rng_key(7, "layers.3.self_attention.linear_qkv.weight");
  for (int64_t i : {int64_t{0}, int64_t{1}, int64_t{17}, t.numel() - 1}) {
    EXPECT_EQ(t.get(i), 0.05 * normal(key, static_cast<uint64_t>(i))) << i;
  }
  // Another seed or name gives other values; the same ones give the same.
  EXPECT_FALSE(t.bitwise_equal(init_parameter(qkv, c, 8, DType::F64, "layers.3.self_attention.")));
  EXPECT_FALSE(t.bitwise_equal(init_parameter(qkv, c, 7, DType::F64, "layers.4.self_attention.")));
  EXPECT_TRUE(t.bitwise_equal(init_parameter(qkv, c, 7, DType::F64, "layers.3.self_attention.")));
}

// scaled_init_method_normal: std / sqrt(2 num_layers) for linear_proj and linear_fc2.
TEST(Init, OutputLayerStd) {
  const TransformerConfig c = config();
  EXPECT_DOUBLE_EQ(init_stddev(Init::kNormal, c), 0.05);
  EXPECT_DOUBLE_EQ(init_stddev(Init::kNormalOutputLayer, c), 0.05 / 4.0);  // sqrt(2 * 8) = 4
  EXPECT_EQ(init_stddev(Init::kZeros, c), 0.0);
  const auto mlp = module_params("mlp", c);
  const Tensor fc2 = init_parameter(find(mlp, "linear_fc2.weight"), c, 1, DType::F64);
  const RngKey key = rng_key(1, "linear_fc2.weight");
  EXPECT_EQ(fc2.get(5), 0.05 / 4.0 * normal(key, 5));
  // A rough sanity check of the scale over 384 draws.
  EXPECT_NEAR(sample_std(fc2), 0.0125, 0.0025);
  const Tensor fc1 = init_parameter(find(mlp, "linear_fc1.weight"), c, 1, DType::F64);
  EXPECT_NEAR(sample_std(fc1), 0.05, 0.01);
}

TEST(Init, ConstantsAndZeroCenteredGamma) {
  TransformerConfig c = config();
  const auto layer = module_params("transformer_layer", c);
  const Tensor w = init_parameter(find(layer, "input_layernorm.weight"), c, 3, DType::BF16);
  const Tensor b = init_parameter(find(layer, "input_layernorm.bias"), c, 3, DType::BF16);
  const Tensor qkv_bias = init_parameter(find(layer, "self_attention.linear_qkv.bias"), c, 3, DType::F32);
  for (int64_t i = 0; i < 16; ++i) {
    EXPECT_EQ(w.get(i), 1.0);
    EXPECT_EQ(b.get(i), 0.0);
  }
  for (int64_t i = 0; i < qkv_bias.numel(); ++i) EXPECT_EQ(qkv_bias.get(i), 0.0);
  c.layernorm_zero_centered_gamma = true;
  const Tensor z = init_parameter(find(module_params("transformer_layer", c), "input_layernorm.weight"), c, 3, DType::F32);
  for (int64_t i = 0; i < 16; ++i) EXPECT_EQ(z.get(i), 0.0);
}

// perform_initialization = false: linear weights and biases zero (Paritron's
// stand-in for torch.empty), norms and the router initialised as usual.
TEST(Init, WithoutPerformInitialization) {
  TransformerConfig c = config();
  c.num_moe_experts = 2;
  c.perform_initialization = false;
  validate_config(c);
  const auto ps = module_params("transformer_layer", c);
  const Tensor qkv = init_parameter(find(ps, "self_attention.linear_qkv.weight"), c, 5, DType::F32);
  for (int64_t i = 0; i < qkv.numel(); ++i) ASSERT_EQ(qkv.get(i), 0.0);
  const Tensor expert = init_parameter_shard(find(ps, "mlp.experts.local_experts.1.linear_fc1.weight"), c, 2, 1, 5,
                                             DType::F32);
  for (int64_t i = 0; i < expert.numel(); ++i) ASSERT_EQ(expert.get(i), 0.0);
  const Tensor norm = init_parameter(find(ps, "pre_mlp_layernorm.weight"), c, 5, DType::F32);
  EXPECT_EQ(norm.get(3), 1.0);
  const Tensor router = init_parameter(find(ps, "mlp.router.weight"), c, 5, DType::F64);
  EXPECT_EQ(router.get(3), 0.05 * normal(rng_key(5, "mlp.router.weight"), 3));
}

// Spec §6.4: the gated fc1 shard of rank r is [gate rows of r; up rows of r].
TEST(Init, GluFc1ShardIsGateThenUp) {
  TransformerConfig c = config();
  c.gated_linear_unit = true;
  const auto mlp = module_params("mlp", c);
  const ParamSpec& fc1 = find(mlp, "linear_fc1.weight");  // [48, 16], f = 24
  const Tensor whole = init_parameter(fc1, c, 11, DType::F32);
  const Tensor shard = init_parameter_shard(fc1, c, 4, 2, 11, DType::F32);  // f/p = 6
  ASSERT_EQ(shard.shape(), (Shape{12, 16}));
  for (int64_t r = 0; r < 12; ++r) {
    const int64_t global_row = r < 6 ? 12 + r : 24 + 12 + (r - 6);
    for (int64_t col = 0; col < 16; ++col) {
      ASSERT_EQ(shard.get(r * 16 + col), whole.get(global_row * 16 + col)) << r << "," << col;
    }
  }
  EXPECT_TRUE(shard.bitwise_equal(slice_tp_shard(whole, local_shard_spec(fc1, 4, 2))));
}

// Row-parallel linear_proj: rank r holds columns [r h/p, (r+1) h/p).
TEST(Init, RowParallelShardIsAColumnBlock) {
  const TransformerConfig c = config();
  const auto attn = module_params("self_attention", c);
  const ParamSpec& proj = find(attn, "linear_proj.weight");  // [16, 16]
  const Tensor whole = init_parameter(proj, c, 2, DType::BF16);
  const Tensor shard = init_parameter_shard(proj, c, 2, 1, 2, DType::BF16);
  ASSERT_EQ(shard.shape(), (Shape{16, 8}));
  for (int64_t r = 0; r < 16; ++r) {
    for (int64_t col = 0; col < 8; ++col) ASSERT_EQ(shard.get(r * 8 + col), whole.get(r * 16 + 8 + col));
  }
}

// Experts of a block: the shard of expert e in layer l is the slice of the
// whole tensor named "layers.l.mlp.experts.local_experts.e.<param>".
TEST(Init, ExpertShardsInABlock) {
  TransformerConfig c = config();
  c.num_moe_experts = 4;
  c.gated_linear_unit = true;
  c.moe_ffn_hidden_size = 8;
  validate_config(c);
  const auto block = module_params("transformer_block", c);
  const ParamSpec& fc1 = find(block, "layers.5.mlp.experts.local_experts.3.linear_fc1.weight");
  EXPECT_EQ(fc1.layer, 5);
  EXPECT_EQ(fc1.expert, 3);
  const Tensor whole = init_parameter(fc1, c, 9, DType::F16);
  for (int64_t r = 0; r < 2; ++r) {
    EXPECT_TRUE(init_parameter_shard(fc1, c, 2, r, 9, DType::F16).bitwise_equal(slice_tp_shard(whole, local_shard_spec(fc1, 2, r))));
  }
  // The same tensor drawn as the layer component with the block's prefix.
  const auto layer = module_params("transformer_layer", c);
  const ParamSpec& layer_fc1 = find(layer, "mlp.experts.local_experts.3.linear_fc1.weight");
  EXPECT_TRUE(whole.bitwise_equal(init_parameter(layer_fc1, c, 9, DType::F16, "layers.5.")));
  const ParamSpec& fc2 = find(block, "layers.5.mlp.experts.local_experts.3.linear_fc2.weight");
  const Tensor fc2_whole = init_parameter(fc2, c, 9, DType::F64);
  EXPECT_EQ(fc2_whole.get(0), output_layer_init_std(c) * normal(rng_key(9, fc2.key), 0));
}

TEST(Init, InitParametersCoversTheCatalogue) {
  const TransformerConfig c = config();
  const auto tensors = init_parameters("transformer_layer", c, 4, DType::F32, "decoder.layers.0.");
  const auto ps = module_params("transformer_layer", c);
  ASSERT_EQ(tensors.size(), ps.size());
  for (const ParamSpec& p : ps) {
    const auto it = tensors.find("decoder.layers.0." + p.key);
    ASSERT_NE(it, tensors.end()) << p.key;
    EXPECT_EQ(it->second.shape(), p.shape);
    EXPECT_EQ(it->second.dtype(), DType::F32);
    EXPECT_TRUE(it->second.bitwise_equal(init_parameter(p, c, 4, DType::F32, "decoder.layers.0.")));
  }
}

TEST(Init, Errors) {
  const TransformerConfig c = config();
  const auto attn = module_params("self_attention", c);
  const ParamSpec& qkv = find(attn, "linear_qkv.weight");
  EXPECT_THROW(init_parameter(qkv, c, 1, DType::I32), Error);
  EXPECT_THROW(init_parameter_shard(qkv, c, 3, 0, 1, DType::F32), Error);  // 32 rows % 3
  EXPECT_THROW(init_parameter_shard(qkv, c, 2, 2, 1, DType::F32), Error);
}

// For random configs, parameters, TP sizes, ranks and dtypes, the shard draw
// equals the slice of the whole draw, bit for bit.
RC_GTEST_PROP(Init, ShardEqualsSliceOfWhole, ()) {
  const int64_t tp = *rc::gen::element<int64_t>(1, 2, 3, 4);
  TransformerConfig c;
  c.num_layers = *rc::gen::inRange<int64_t>(1, 5);
  const int64_t groups = tp * *rc::gen::inRange<int64_t>(1, 3);
  c.num_attention_heads = groups * *rc::gen::element<int64_t>(1, 2);
  c.num_query_groups = groups;
  c.kv_channels = *rc::gen::element<int64_t>(2, 4);
  c.hidden_size = *rc::gen::inRange<int64_t>(1, 10);
  c.ffn_hidden_size = tp * *rc::gen::inRange<int64_t>(1, 4);
  c.gated_linear_unit = *rc::gen::arbitrary<bool>();
  c.add_qkv_bias = *rc::gen::arbitrary<bool>();
  c.perform_initialization = *rc::gen::element(true, true, true, false);
  c.layernorm_zero_centered_gamma = *rc::gen::arbitrary<bool>();
  c.init_method_std = *rc::gen::element(0.02, 0.5, 1.0);
  if (*rc::gen::arbitrary<bool>()) {
    c.num_moe_experts = *rc::gen::inRange<int64_t>(1, 4);
    c.moe_router_topk = 1;
    if (*rc::gen::arbitrary<bool>()) c.moe_ffn_hidden_size = tp * *rc::gen::inRange<int64_t>(1, 3);
  }
  RC_ASSERT(check_config(c).empty());
  const DType dtype = *rc::gen::element(DType::F32, DType::BF16, DType::F16, DType::F64, DType::F8_E4M3);
  const uint64_t seed = *rc::gen::arbitrary<uint64_t>();
  const auto params = module_params("transformer_block", c);
  const ParamSpec& p = *rc::gen::elementOf(params);
  const int64_t rank = *rc::gen::inRange<int64_t>(0, tp);
  const Tensor whole = init_parameter(p, c, seed, dtype, "decoder.");
  const Tensor shard = init_parameter_shard(p, c, tp, rank, seed, dtype, "decoder.");
  RC_ASSERT(shard.bitwise_equal(slice_tp_shard(whole, local_shard_spec(p, tp, rank))));
  RC_ASSERT(shard.shape() == local_shard_spec(p, tp, rank).local_shape);
}

}  // namespace
}  // namespace paritron
