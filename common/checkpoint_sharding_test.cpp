// Megatron-core's distributed-checkpoint sharding (checkpoint_sharding.h)
// against core_v0.5.0's dist_checkpointing/mapping.py, megatron/core/utils.py,
// transformer/utils.py, transformer_layer.py, transformer_block.py, mlp.py,
// moe/experts.py and serialization.py (spec §11): hand-computed
// ShardedTensors, Megatron's assertion errors, and properties over random
// layouts.
#include "common/checkpoint_sharding.h"

#include <algorithm>
#include <functional>
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "common/module_params.h"
#include "common/parallel_config.h"
#include "common/test_util.h"
#include "common/transformer_config.h"

namespace paritron {
namespace {

using namespace test_util;  // gqa_config(layers): h 8, n 4, g 2 (GQA), hn 2, f 12; keys_of

using Ints = std::vector<int64_t>;

bool message_has(const std::function<void()>& f, const std::string& words) {
  try {
    f();
  } catch (const Error& e) {
    return std::string(e.what()).find(words) != std::string::npos;
  }
  return false;
}

ShardedTensor expected(std::string key, Shape local, Shape global, Shape offset, Ints fragm, Ints replica,
                       int64_t prepend, std::optional<DType> dtype = DType::F32) {
  ShardedTensor t;
  t.key = std::move(key);
  t.dtype = dtype;
  t.local_shape = std::move(local);
  t.global_shape = std::move(global);
  t.global_offset = std::move(offset);
  t.axis_fragmentations = std::move(fragm);
  t.replica_id = std::move(replica);
  t.prepend_axis_num = prepend;
  return t;
}

std::vector<const ShardedTensor*> with_key(const std::vector<ShardedTensor>& ts, const std::string& key) {
  std::vector<const ShardedTensor*> out;
  for (const ShardedTensor& t : ts) {
    if (t.key == key) out.push_back(&t);
  }
  return out;
}

ParallelConfig layout(const std::string& name) { return ParallelConfig::parse_layout(name); }

std::vector<std::vector<ShardedTensor>> all_ranks(std::string_view component, const TransformerConfig& c,
                                                  const ParallelConfig& pc, std::string_view prefix = "") {
  std::vector<std::vector<ShardedTensor>> out;
  for (int64_t r = 0; r < pc.world_size(); ++r) out.push_back(sharded_state_dict(component, c, pc, r, prefix));
  return out;
}

std::vector<std::vector<ShardedObject>> all_rank_objects(std::string_view component, const TransformerConfig& c,
                                                         const ParallelConfig& pc) {
  std::vector<std::vector<ShardedObject>> out;
  for (int64_t r = 0; r < pc.world_size(); ++r) out.push_back(module_sharded_state_dict(component, c, pc, r).objects);
  return out;
}

// ===================== mapping.py =====================

TEST(CheckpointSharding, FromRankOffsets) {
  const ShardedTensor a = from_rank_offsets("a", {4, 6}, std::vector<RankOffset>{{0, 1, 2}});
  EXPECT_EQ(a, expected("a", {4, 6}, {8, 6}, {4, 0}, {2, 1}, {0}, 0, std::nullopt));
  // One prepended axis (like unsqueeze(0)), an offset on it and on the last axis.
  const ShardedTensor b =
      from_rank_offsets("b", {4, 6}, std::vector<RankOffset>{{0, 3, 5}, {2, 1, 2}}, {0, 1, 2}, 1, false, DType::BF16);
  EXPECT_EQ(b, expected("b", {4, 6}, {5, 4, 12}, {3, 0, 6}, {5, 1, 2}, {0, 1, 2}, 1, DType::BF16));
  EXPECT_EQ(b.global_slice(), (std::vector<GlobalSliceAxis>{{3, 4, true}, {0, 4, false}, {6, 12, false}}));
  EXPECT_EQ(b.max_allowed_chunks(), (Ints{1, 4, 6}));
  EXPECT_FALSE(b.is_main_replica());
  EXPECT_TRUE(a.is_main_replica());
  EXPECT_TRUE(is_main_replica(Ints{0, 0, 0}));
  EXPECT_FALSE(is_main_replica(Ints{0, 0, 1}));
}

// The asserts of from_rank_offsets, global_slice and max_allowed_chunks.
TEST(CheckpointSharding, FromRankOffsetsAsserts) {
  const Shape s{4, 6};
  auto offs = [](std::initializer_list<RankOffset> o) { return std::vector<RankOffset>(o); };
  EXPECT_TRUE(message_has([&] { from_rank_offsets("k", s, offs({{0, 2, 2}})); },
                          "Rank offset must be lower than axis fragmentation"));
  EXPECT_TRUE(message_has([&] { from_rank_offsets("k", s, offs({{0, 0, 2}, {0, 1, 2}})); }, "Duplicated axis specified"));
  EXPECT_THROW(from_rank_offsets("k", s, offs({{-1, 0, 1}})), CheckpointingError);
  EXPECT_THROW(from_rank_offsets("k", s, offs({{0, -1, 1}})), CheckpointingError);
  EXPECT_THROW(from_rank_offsets("k", s, offs({{2, 0, 1}})), CheckpointingError);  // axis past the 2-d tensor
  EXPECT_THROW(from_rank_offsets("k", s, {}, {0}, -1), CheckpointingError);
  ShardedTensor bad = from_rank_offsets("k", s, {});
  bad.global_offset = {0};
  EXPECT_THROW(bad.global_slice(), CheckpointingError);
  ShardedTensor uneven = from_rank_offsets("k", {5}, {});
  uneven.axis_fragmentations = {2};
  EXPECT_TRUE(message_has([&] { uneven.max_allowed_chunks(); }, "Axis shape (5) not divisible by axis fragmentation (2"));
  uneven.allow_shape_mismatch = true;
  EXPECT_EQ(uneven.max_allowed_chunks(), (Ints{2}));
}

// ===================== helpers =====================

TEST(CheckpointSharding, Helpers) {
  // tp2-cp2-dp2, rank 7: tp 1, cp 1, dp 1 -> rank in the DP-with-CP group = 1 + 2 * 1.
  const ShardingContext ctx = sharding_context(layout("tp2-cp2-dp2"), 7);
  EXPECT_EQ(ctx.tp_rank, 1);
  EXPECT_EQ(ctx.tp_size, 2);
  EXPECT_EQ(ctx.dp_rank_with_cp, 3);
  const std::vector<RankOffset> layer{{0, 5, 8}};
  EXPECT_EQ(make_tp_sharded_tensor_for_checkpoint("w", {3, 4}, 1, ctx, layer),
            expected("w", {3, 4}, {8, 3, 8}, {5, 0, 4}, {8, 1, 2}, {0, 0, 3}, 1, std::nullopt));
  EXPECT_EQ(make_sharded_tensor_for_checkpoint("b", {3}, ctx),
            expected("b", {3}, {3}, {0}, {1}, {0, 1, 3}, 0, std::nullopt));
  EXPECT_EQ(make_sharded_tensor_for_checkpoint("b", {3}, ctx, {}, Ints{7}).replica_id, (Ints{7}));
  // ShardedObjects take the sorted offsets as shard grid, or (1,) / (0,).
  const ShardedObject o = make_sharded_object_for_checkpoint("x._extra_state", ctx,
                                                             std::vector<RankOffset>{{1, 2, 4}, {0, 5, 8}});
  EXPECT_EQ(o.global_shape, (Ints{8, 4}));
  EXPECT_EQ(o.global_offset, (Ints{5, 2}));
  EXPECT_EQ(o.replica_id, (Ints{0, 1, 3}));
  EXPECT_EQ(o.unique_key(), "x._extra_state/shard_5.2_8.4");
  const ShardedObject lone = make_sharded_object_for_checkpoint("y._extra_state", ctx);
  EXPECT_EQ(lone.global_shape, (Ints{1}));
  EXPECT_EQ(lone.global_offset, (Ints{0}));
  EXPECT_TRUE(message_has([&] { make_sharded_object_for_checkpoint("z", ctx, std::vector<RankOffset>{{1, 0, 2}}); },
                          "Expected contiguous axis"));
  // make_sharded_tensors_for_checkpoint with ColumnParallelLinear's map.
  const std::vector<LocalStateEntry> sd{{"weight", {2, 3}, DType::F32}, {"bias", {2}, DType::F32}, {"_extra_state", {}, std::nullopt}};
  const ShardedStateDict col = make_sharded_tensors_for_checkpoint(sd, "fc1.", tensor_parallel_axis_map("ColumnParallelLinear"), ctx);
  ASSERT_EQ(col.tensors.size(), 2u);
  EXPECT_EQ(col.tensors[0], expected("fc1.weight", {2, 3}, {4, 3}, {2, 0}, {2, 1}, {0, 0, 3}, 0));
  EXPECT_EQ(col.tensors[1], expected("fc1.bias", {2}, {4}, {2}, {2}, {0, 0, 3}, 0));
  ASSERT_EQ(col.objects.size(), 1u);
  EXPECT_EQ(col.objects[0].key, "fc1._extra_state");
  const ShardedStateDict row = make_sharded_tensors_for_checkpoint(sd, "fc2.", tensor_parallel_axis_map("RowParallelLinear"), ctx);
  EXPECT_EQ(row.tensors[0], expected("fc2.weight", {2, 3}, {2, 6}, {0, 3}, {1, 2}, {0, 0, 3}, 0));
  EXPECT_EQ(row.tensors[1], expected("fc2.bias", {2}, {2}, {0}, {1}, {0, 1, 3}, 0));
  EXPECT_TRUE(tensor_parallel_axis_map("FusedLayerNorm").empty());
  EXPECT_THROW(tensor_parallel_axis_map("TELinear"), Error);
}

// ===================== module sharded_state_dict() =====================

// A TP=2 GQA block on rank 1: the exact ShardedTensors of linear_qkv and friends.
TEST(CheckpointSharding, Tp2GqaBlockOnRank1) {
  const TransformerConfig c = gqa_config();
  const ParallelConfig pc = layout("tp2");
  const std::vector<ShardedTensor> ts = sharded_state_dict("transformer_block", c, pc, 1);
  const Keys layer_keys{"layers.self_attention.linear_qkv.layer_norm_weight", "layers.self_attention.linear_qkv.layer_norm_bias",
                        "layers.self_attention.linear_proj.weight", "layers.self_attention.linear_proj.bias",
                        "layers.self_attention.linear_qkv.weight", "layers.self_attention.linear_qkv.bias",
                        "layers.mlp.linear_fc1.layer_norm_weight", "layers.mlp.linear_fc1.layer_norm_bias",
                        "layers.mlp.linear_fc1.weight", "layers.mlp.linear_fc1.bias",
                        "layers.mlp.linear_fc2.weight", "layers.mlp.linear_fc2.bias"};
  Keys want = layer_keys;
  want.insert(want.end(), layer_keys.begin(), layer_keys.end());
  want.push_back("final_layernorm.weight");
  want.push_back("final_layernorm.bias");
  EXPECT_EQ(keys_of(ts), want);
  // linear_qkv: (4 + 2*2) * 2 = 16 rows; rank 1 holds rows [8, 16) = query group 1.
  EXPECT_EQ(ts[12 + 4], expected("layers.self_attention.linear_qkv.weight", {8, 8}, {2, 16, 8}, {1, 8, 0}, {2, 2, 1},
                                 {0, 0, 0}, 1));
  EXPECT_EQ(ts[4], expected("layers.self_attention.linear_qkv.weight", {8, 8}, {2, 16, 8}, {0, 8, 0}, {2, 2, 1},
                            {0, 0, 0}, 1));
  EXPECT_EQ(ts[12 + 5], expected("layers.self_attention.linear_qkv.bias", {8}, {2, 16}, {1, 8}, {2, 2}, {0, 0, 0}, 1));
  // Row-parallel linear_proj: columns [4, 8); its bias is replicated, rank 1 is not the main replica.
  EXPECT_EQ(ts[12 + 2], expected("layers.self_attention.linear_proj.weight", {8, 4}, {2, 8, 8}, {1, 0, 4}, {2, 1, 2},
                                 {0, 0, 0}, 1));
  EXPECT_EQ(ts[12 + 3], expected("layers.self_attention.linear_proj.bias", {8}, {2, 8}, {1, 0}, {2, 1}, {0, 1, 0}, 1));
  // FusedLayerNorm, renamed by the local spec's sharded_state_dict_keys_map.
  EXPECT_EQ(ts[12], expected("layers.self_attention.linear_qkv.layer_norm_weight", {8}, {2, 8}, {1, 0}, {2, 1},
                             {0, 1, 0}, 1));
  EXPECT_EQ(ts[8], expected("layers.mlp.linear_fc1.weight", {6, 8}, {2, 12, 8}, {0, 6, 0}, {2, 2, 1}, {0, 0, 0}, 1));
  // The final norm: no layer axis.
  EXPECT_EQ(ts[24], expected("final_layernorm.weight", {8}, {8}, {0}, {1}, {0, 1, 0}, 0));
  // The `_extra_state` objects of the four linears per layer.
  const ShardedStateDict sd = module_sharded_state_dict("transformer_block", c, pc, 1);
  ASSERT_EQ(sd.objects.size(), 8u);
  EXPECT_EQ(sd.objects[1].key, "layers.self_attention.linear_qkv._extra_state");
  EXPECT_EQ(sd.objects[5].global_shape, (Ints{2}));
  EXPECT_EQ(sd.objects[5].global_offset, (Ints{1}));
  EXPECT_EQ(sd.objects[5].replica_id, (Ints{0, 1, 0}));
  // A prefix goes in front of every key.
  const auto decoder = sharded_state_dict("transformer_block", c, pc, 1, "decoder.");
  EXPECT_EQ(decoder[4].key, "decoder.layers.self_attention.linear_qkv.weight");
  EXPECT_EQ(decoder.back().key, "decoder.final_layernorm.bias");
  EXPECT_TRUE(check_sharding_integrity(all_ranks("transformer_block", c, pc)).empty());
  EXPECT_TRUE(check_object_integrity(all_rank_objects("transformer_block", c, pc)).empty());
}

// PP = 2: stage 1 holds layers 2 and 3 (layer axis offsets) and the final norm.
TEST(CheckpointSharding, Pp2BlockLayerOffsets) {
  const TransformerConfig c = gqa_config(4);
  const ParallelConfig pc = layout("pp2");
  const auto stage0 = sharded_state_dict("transformer_block", c, pc, 0);
  const auto stage1 = sharded_state_dict("transformer_block", c, pc, 1);
  const std::string key = "layers.self_attention.linear_qkv.weight";
  auto layer_offsets = [&](const std::vector<ShardedTensor>& ts) {
    Ints out;
    for (const ShardedTensor* t : with_key(ts, key)) {
      EXPECT_EQ(t->global_shape, (Shape{4, 16, 8}));
      out.push_back(t->global_offset[0]);
    }
    return out;
  };
  EXPECT_EQ(layer_offsets(stage0), (Ints{0, 1}));
  EXPECT_EQ(layer_offsets(stage1), (Ints{2, 3}));
  EXPECT_TRUE(with_key(stage0, "final_layernorm.weight").empty());
  EXPECT_EQ(with_key(stage1, "final_layernorm.weight").size(), 1u);
  EXPECT_TRUE(check_sharding_integrity({stage0, stage1}).empty());
  // A layer on its own, by global layer number: what the block emits for it.
  const auto layer3 = sharded_state_dict("transformer_layer", c, pc, 1, "", 3);
  ASSERT_EQ(layer3.size(), 12u);
  for (size_t i = 0; i < layer3.size(); ++i) EXPECT_EQ(layer3[i], stage1[i]) << i;
  EXPECT_THROW(sharded_state_dict("transformer_layer", c, pc, 0, "", 3), Error);  // layer 3 is on stage 1
  EXPECT_THROW(sharded_state_dict("transformer_layer", c, pc, 0, "", 0), Error);
  EXPECT_THROW(sharded_state_dict("transformer_block", c, pc, 0, "", 1), Error);
}

// Spec §10.8: 16 layers, pp 4, vp 2 -> stage s holds 1-based layers [2s+1, 2s+2] and [2s+9, 2s+10].
TEST(CheckpointSharding, Pp4Vp2SixteenLayers) {
  const TransformerConfig c = gqa_config(16);
  const ParallelConfig pc = layout("pp4-vp2");
  const std::vector<Ints> want{{0, 1, 8, 9}, {2, 3, 10, 11}, {4, 5, 12, 13}, {6, 7, 14, 15}};
  const auto ranks = all_ranks("transformer_block", c, pc);
  for (int64_t s = 0; s < 4; ++s) {
    Ints got;
    for (const ShardedTensor* t : with_key(ranks[static_cast<size_t>(s)], "layers.mlp.linear_fc2.weight")) {
      EXPECT_EQ(t->axis_fragmentations[0], 16);
      got.push_back(t->global_offset[0]);
    }
    EXPECT_EQ(got, want[static_cast<size_t>(s)]) << "stage " << s;
    EXPECT_EQ(with_key(ranks[static_cast<size_t>(s)], "final_layernorm.bias").size(), s == 3 ? 1u : 0u);
  }
  EXPECT_TRUE(check_sharding_integrity(ranks).empty());
}

// EP = 2 out of dp 4: experts [0, 2) on ep rank 0, [2, 4) on ep rank 1; the
// replica's third element is the data-modulo-expert rank.
TEST(CheckpointSharding, Ep2ExpertKeysAndReplicas) {
  TransformerConfig c = gqa_config();
  c.num_moe_experts = 4;
  validate_config(c);
  const ParallelConfig pc = layout("dp4-ep2");
  const auto rank3 = sharded_state_dict("transformer_block", c, pc, 3);  // dp 3: ep 1, edp 1
  const Keys layer_keys{"layers.self_attention.linear_qkv.layer_norm_weight", "layers.self_attention.linear_qkv.layer_norm_bias",
                        "layers.self_attention.linear_proj.weight", "layers.self_attention.linear_proj.bias",
                        "layers.self_attention.linear_qkv.weight", "layers.self_attention.linear_qkv.bias",
                        // 0.5.0 renames the MoE layer's pre_mlp_layernorm into mlp.linear_fc1 too.
                        "layers.mlp.linear_fc1.layer_norm_weight", "layers.mlp.linear_fc1.layer_norm_bias",
                        "layers.mlp.router.weight",
                        "layers.mlp.experts.experts.linear_fc1.weight", "layers.mlp.experts.experts.linear_fc1.bias",
                        "layers.mlp.experts.experts.linear_fc2.weight", "layers.mlp.experts.experts.linear_fc2.bias",
                        "layers.mlp.experts.experts.linear_fc1.weight", "layers.mlp.experts.experts.linear_fc1.bias",
                        "layers.mlp.experts.experts.linear_fc2.weight", "layers.mlp.experts.experts.linear_fc2.bias"};
  ASSERT_EQ(rank3.size(), 2 * layer_keys.size() + 2);
  for (size_t i = 0; i < layer_keys.size(); ++i) EXPECT_EQ(rank3[i].key, layer_keys[i]) << i;
  // Layer 0, local expert 0 = global expert 2: axes [layer, expert, f, h].
  EXPECT_EQ(rank3[9], expected("layers.mlp.experts.experts.linear_fc1.weight", {12, 8}, {2, 4, 12, 8}, {0, 2, 0, 0},
                               {2, 4, 1, 1}, {0, 0, 1}, 2));
  EXPECT_EQ(rank3[13].global_offset, (Ints{0, 3, 0, 0}));
  EXPECT_EQ(rank3[12], expected("layers.mlp.experts.experts.linear_fc2.bias", {8}, {2, 4, 8}, {0, 2, 0}, {2, 4, 1},
                                {0, 0, 1}, 2));
  // The router is replicated over TP and DP (EP included): replica (0, tp, dp).
  EXPECT_EQ(rank3[8], expected("layers.mlp.router.weight", {4, 8}, {2, 4, 8}, {0, 0, 0}, {2, 1, 1}, {0, 0, 3}, 1));
  const auto rank1 = sharded_state_dict("transformer_block", c, pc, 1);  // dp 1: ep 1, edp 0 -> main replica
  EXPECT_EQ(rank1[9].replica_id, (Ints{0, 0, 0}));
  EXPECT_EQ(rank1[9].global_offset, (Ints{0, 2, 0, 0}));
  const auto rank2 = sharded_state_dict("transformer_block", c, pc, 2);  // dp 2: ep 0, edp 1
  EXPECT_EQ(rank2[9].global_offset, (Ints{0, 0, 0, 0}));
  EXPECT_EQ(rank2[9].replica_id, (Ints{0, 0, 1}));
  // Expert `_extra_state` objects: grid [layers, experts], edp replica.
  const ShardedStateDict sd = module_sharded_state_dict("transformer_block", c, pc, 3);
  const auto obj = std::find_if(sd.objects.begin(), sd.objects.end(), [](const ShardedObject& o) {
    return o.key == "layers.mlp.experts.experts.linear_fc2._extra_state";
  });
  ASSERT_NE(obj, sd.objects.end());
  EXPECT_EQ(obj->global_shape, (Ints{2, 4}));
  EXPECT_EQ(obj->global_offset, (Ints{0, 2}));
  EXPECT_EQ(obj->replica_id, (Ints{0, 0, 1}));
  EXPECT_TRUE(check_sharding_integrity(all_ranks("transformer_block", c, pc)).empty());
  EXPECT_TRUE(check_object_integrity(all_rank_objects("transformer_block", c, pc)).empty());
}

// mlp.py's ShardedTensorFactory for the gated fc1 weight: two pieces under one
// key; the 0.5.0 fc1 bias stays a plain dim-0 shard.
TEST(CheckpointSharding, GluFc1Pieces) {
  TransformerConfig c = gqa_config();
  c.gated_linear_unit = true;
  const ParallelConfig pc = layout("tp2");
  const auto mlp = sharded_state_dict("mlp", c, pc, 1);
  EXPECT_EQ(keys_of(mlp),
            (Keys{"linear_fc1.weight", "linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias"}));
  EXPECT_EQ(mlp[0], expected("linear_fc1.weight", {6, 8}, {24, 8}, {6, 0}, {4, 1}, {0, 0, 0}, 0));
  EXPECT_EQ(mlp[1], expected("linear_fc1.weight", {6, 8}, {24, 8}, {18, 0}, {4, 1}, {0, 0, 0}, 0));
  EXPECT_EQ(mlp[2], expected("linear_fc1.bias", {12}, {24}, {12}, {2}, {0, 0, 0}, 0));
  EXPECT_EQ(mlp[3], expected("linear_fc2.weight", {8, 6}, {8, 12}, {0, 6}, {1, 2}, {0, 0, 0}, 0));
  EXPECT_EQ(mlp[4], expected("linear_fc2.bias", {8}, {8}, {0}, {1}, {0, 1, 0}, 0));
  // The weight pieces are exactly the rows the rank holds (module_params' local_shard_spec);
  // the 0.5.0 bias is not: rank 1 saves its [gate_1; up_1] values as global [12, 24).
  const auto params = module_params("mlp", c);
  const TpShard w = local_shard_spec(params[0], 2, 1);
  EXPECT_EQ(w.ranges, (std::vector<IndexRange>{{6, 12}, {18, 24}}));
  const TpShard b = local_shard_spec(params[1], 2, 1);
  EXPECT_NE(b.ranges, (std::vector<IndexRange>{{12, 24}}));
  // In a block: a prepended layer axis.
  const auto block = sharded_state_dict("transformer_block", c, pc, 1);
  const auto pieces = with_key(block, "layers.mlp.linear_fc1.weight");
  ASSERT_EQ(pieces.size(), 4u);
  EXPECT_EQ(*pieces[2], expected("layers.mlp.linear_fc1.weight", {6, 8}, {2, 24, 8}, {1, 6, 0}, {2, 4, 1}, {0, 0, 0}, 1));
  EXPECT_EQ(*pieces[3], expected("layers.mlp.linear_fc1.weight", {6, 8}, {2, 24, 8}, {1, 18, 0}, {2, 4, 1}, {0, 0, 0}, 1));
  EXPECT_TRUE(check_sharding_integrity(all_ranks("transformer_block", c, pc)).empty());
  // The factory build on its own: offsets (prepend + 0, tp_rank, 2 tp) and (prepend + 0, tp + tp_rank, 2 tp).
  const ShardingContext ctx = sharding_context(layout("tp4"), 3);
  const auto built = glu_fc1_sharded_tensors("k", {4, 5}, ctx, std::vector<RankOffset>{{0, 1, 3}}, {0, 0, 2});
  ASSERT_EQ(built.size(), 2u);
  EXPECT_EQ(built[0], expected("k", {2, 5}, {3, 16, 5}, {1, 6, 0}, {3, 8, 1}, {0, 0, 2}, 1, std::nullopt));
  EXPECT_EQ(built[1], expected("k", {2, 5}, {3, 16, 5}, {1, 14, 0}, {3, 8, 1}, {0, 0, 2}, 1, std::nullopt));
}

// Experts with GLU: the factory pieces get the data-modulo-expert replica too.
TEST(CheckpointSharding, GluExpertPiecesCarryExpertReplica) {
  TransformerConfig c = gqa_config();
  c.gated_linear_unit = true;
  c.num_moe_experts = 2;
  validate_config(c);
  const ParallelConfig pc = layout("tp2-dp4-ep2-sp");
  const auto r = sharded_state_dict("moe_layer", c, pc, 7);  // tp 1, dp 3: ep 1, edp 1
  const auto pieces = with_key(r, "experts.experts.linear_fc1.weight");
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(*pieces[0], expected("experts.experts.linear_fc1.weight", {6, 8}, {2, 24, 8}, {1, 6, 0}, {2, 4, 1},
                                 {0, 0, 1}, 1));
  EXPECT_EQ(pieces[1]->global_offset, (Ints{1, 18, 0}));
  EXPECT_TRUE(check_sharding_integrity(all_ranks("moe_layer", c, pc)).empty());
}

// TransformerLayer.sharded_state_dict on its own (no layer axis): the local
// spec's renames, prefixed with the layer's prefix.
TEST(CheckpointSharding, StandaloneLayerAndComponents) {
  TransformerConfig c = gqa_config();
  const ParallelConfig pc = layout("tp2");
  const auto layer = sharded_state_dict("transformer_layer", c, pc, 0, "decoder.layers.7.");
  EXPECT_EQ(keys_of(layer), (Keys{"decoder.layers.7.self_attention.linear_qkv.layer_norm_weight",
                                  "decoder.layers.7.self_attention.linear_qkv.layer_norm_bias",
                                  "decoder.layers.7.self_attention.linear_proj.weight",
                                  "decoder.layers.7.self_attention.linear_proj.bias",
                                  "decoder.layers.7.self_attention.linear_qkv.weight",
                                  "decoder.layers.7.self_attention.linear_qkv.bias",
                                  "decoder.layers.7.mlp.linear_fc1.layer_norm_weight",
                                  "decoder.layers.7.mlp.linear_fc1.layer_norm_bias",
                                  "decoder.layers.7.mlp.linear_fc1.weight", "decoder.layers.7.mlp.linear_fc1.bias",
                                  "decoder.layers.7.mlp.linear_fc2.weight", "decoder.layers.7.mlp.linear_fc2.bias"}));
  EXPECT_EQ(layer[4], expected("decoder.layers.7.self_attention.linear_qkv.weight", {8, 8}, {16, 8}, {0, 0}, {2, 1},
                               {0, 0, 0}, 0));
  const auto objects = module_sharded_state_dict("transformer_layer", c, pc, 0).objects;
  ASSERT_EQ(objects.size(), 4u);
  EXPECT_EQ(objects[0].global_shape, (Ints{1}));
  // An RMSNorm layer: norm weights only.
  c.normalization = "RMSNorm";
  const auto rms = sharded_state_dict("transformer_layer", c, pc, 0);
  EXPECT_EQ(rms[0].key, "self_attention.linear_qkv.layer_norm_weight");
  EXPECT_EQ(rms[1].key, "self_attention.linear_proj.weight");
  EXPECT_EQ(keys_of(sharded_state_dict("rmsnorm", c, pc, 1, "final_layernorm.")), (Keys{"final_layernorm.weight"}));
  EXPECT_EQ(keys_of(sharded_state_dict("layernorm", c, pc, 1)), (Keys{"weight", "bias"}));
  // Cross attention (MHA only): linear_proj, linear_q, linear_kv.
  TransformerConfig mha = gqa_config();
  mha.num_query_groups = 4;
  const auto cross = sharded_state_dict("cross_attention", mha, pc, 1);
  EXPECT_EQ(keys_of(cross), (Keys{"linear_proj.weight", "linear_proj.bias", "linear_q.weight", "linear_q.bias",
                                  "linear_kv.weight", "linear_kv.bias"}));
  EXPECT_EQ(cross[4], expected("linear_kv.weight", {8, 8}, {16, 8}, {8, 0}, {2, 1}, {0, 0, 0}, 0));
  EXPECT_THROW(sharded_state_dict("cross_attention", gqa_config(), pc, 1), Error);
  // Offsets passed in (as a block would) go in front.
  const std::vector<RankOffset> offs{{0, 3, 5}};
  const auto attn = module_sharded_state_dict("self_attention", gqa_config(), pc, 1, "", offs).tensors;
  EXPECT_EQ(attn[2], expected("linear_qkv.weight", {8, 8}, {5, 16, 8}, {3, 8, 0}, {5, 2, 1}, {0, 0, 0}, 1));
}

// Megatron's assertions and the layout checks.
TEST(CheckpointSharding, Errors) {
  TransformerConfig c = gqa_config();
  const std::vector<RankOffset> offs{{0, 0, 2}};
  EXPECT_TRUE(message_has([&] { module_sharded_state_dict("transformer_block", c, layout("tp1"), 0, "", offs); },
                          "Unexpected sharded offsets"));
  EXPECT_THROW(sharded_state_dict("transformer_block", c, layout("tp3"), 0), ConfigError);  // 4 heads % 3
  EXPECT_THROW(sharded_state_dict("transformer_block", c, layout("pp3"), 0), ConfigError);  // 2 layers % 3
  EXPECT_THROW(sharded_state_dict("transformer_block", c, layout("tp2"), 2), Error);       // rank outside
  EXPECT_THROW(sharded_state_dict("attention", c, layout("tp1"), 0), Error);
  EXPECT_THROW(sharded_state_dict("moe_layer", c, layout("tp1"), 0), Error);  // no experts
  c.num_moe_experts = 2;
  c.moe_grouped_gemm = true;
  c.add_bias_linear = false;
  validate_config(c);
  EXPECT_TRUE(message_has([&] { sharded_state_dict("transformer_block", c, layout("tp1"), 0); },
                          "not supported for GroupedMLP"));
}

// core_v0.5.0 builds the data-modulo-expert groups from blocks of tp * dp
// consecutive ranks, ignoring CP: with tp 1, cp 2, dp 1 each rank is its own
// group, so both CP ranks save the experts as main replicas (Megatron's own
// validate_sharding_integrity would refuse this checkpoint). Dense tensors are
// fine: their replica id uses the DP-with-CP rank.
TEST(CheckpointSharding, MoeWithContextParallelDuplicatesExpertMainReplicas) {
  TransformerConfig c = gqa_config(1);
  c.num_moe_experts = 2;
  validate_config(c);
  const ParallelConfig pc = layout("cp2");
  const ShardingContext ctx1 = sharding_context(pc, 1);
  EXPECT_EQ(ctx1.dp_rank_with_cp, 1);
  EXPECT_EQ(ctx1.data_modulo_expert_rank, 0);
  const auto ranks = all_ranks("transformer_block", c, pc);
  EXPECT_EQ(with_key(ranks[1], "layers.mlp.router.weight")[0]->replica_id, (Ints{0, 0, 1}));
  EXPECT_EQ(with_key(ranks[1], "layers.mlp.experts.experts.linear_fc1.weight")[0]->replica_id, (Ints{0, 0, 0}));
  const auto problems = check_sharding_integrity(ranks);
  ASSERT_EQ(problems.size(), 8u);  // 2 experts x (fc1, fc2) x (weight, bias), each overlapping once
  for (const std::string& p : problems) EXPECT_EQ(p.find("layers.mlp.experts.experts."), 0u) << p;
  // With cp 1 the same model is sound.
  EXPECT_TRUE(check_sharding_integrity(all_ranks("transformer_block", c, layout("dp2"))).empty());
}

// ===================== validate_sharding_integrity =====================

TEST(CheckpointSharding, IntegrityFindsBrokenShardings) {
  const TransformerConfig c = gqa_config();
  const ParallelConfig pc = layout("tp2");
  const auto good = all_ranks("transformer_block", c, pc);
  ASSERT_TRUE(check_sharding_integrity(good).empty());
  auto has = [](const std::vector<std::string>& problems, const std::string& words) {
    return std::any_of(problems.begin(), problems.end(), [&](const std::string& p) { return p.find(words) != std::string::npos; });
  };
  {  // A second main replica of a replicated bias.
    auto broken = good;
    broken[1][3].replica_id = {0, 0, 0};
    const auto problems = check_sharding_integrity(broken);
    EXPECT_TRUE(has(problems, "layers.self_attention.linear_proj.bias: main replicas overlap")) << problems.size();
  }
  {  // A missing piece.
    auto broken = good;
    broken[1].erase(broken[1].begin() + 4);
    EXPECT_TRUE(has(check_sharding_integrity(broken),
                    "layers.self_attention.linear_qkv.weight: main replicas cover 192 of the 256 elements"));
  }
  {  // No main replica at all for the final norm.
    auto broken = good;
    broken[0].back().replica_id = {0, 2, 0};
    EXPECT_TRUE(has(check_sharding_integrity(broken), "final_layernorm.bias: main replicas cover 0 of the 8"));
  }
  {  // Disagreeing global shapes, local shapes, dtypes; a piece out of bounds.
    auto broken = good;
    broken[1][4].global_shape = {2, 17, 8};
    broken[1][5].local_shape = {7};
    broken[1][6].dtype = DType::BF16;
    broken[0][8].global_offset = {0, 8, 0};
    const auto problems = check_sharding_integrity(broken);
    EXPECT_TRUE(has(problems, "layers.self_attention.linear_qkv.weight: rank 1 has global shape [2, 17, 8]"));
    EXPECT_TRUE(has(problems, "layers.self_attention.linear_qkv.bias: rank 1 has local shape [7]"));
    EXPECT_TRUE(has(problems, "layers.mlp.linear_fc1.layer_norm_weight: rank 1 has dtype BF16"));
    EXPECT_TRUE(has(problems, "outside the global extent 12"));
  }
  {  // Flattened ranges (distributed optimizer) must tile each local box.
    ShardedTensor a = from_rank_offsets("f", {4}, {});
    ShardedTensor b = a;
    a.flattened_range = FlattenedRange{0, 2};
    b.flattened_range = FlattenedRange{2, 4};
    EXPECT_TRUE(check_sharding_integrity({{a}, {b}}).empty());
    b.flattened_range = FlattenedRange{3, 4};
    EXPECT_TRUE(has(check_sharding_integrity({{a}, {b}}), "f: flattened ranges at offset [0] do not tile"));
    b.flattened_range.reset();
    EXPECT_TRUE(has(check_sharding_integrity({{a}, {b}}), "disagree on having a flattened_range"));
  }
  {  // Objects: a duplicated main replica and a missing cell.
    auto objects = all_rank_objects("transformer_block", c, pc);
    ASSERT_TRUE(check_object_integrity(objects).empty());
    objects[1][0].replica_id = {0, 0, 0};
    EXPECT_TRUE(has(check_object_integrity(objects), "Duplicate ShardedObject key layers.self_attention.linear_proj._extra_state/shard_0_2"));
    objects[0].erase(objects[0].begin());
    objects[1].erase(objects[1].begin());
    EXPECT_TRUE(has(check_object_integrity(objects), "layers.self_attention.linear_proj._extra_state: main replicas hold 1 of the 2 cells"));
  }
}

// ===================== JSON =====================

TEST(CheckpointSharding, JsonFieldsAndRoundTrip) {
  const ShardedTensor t = expected("layers.self_attention.linear_qkv.weight", {8, 8}, {2, 16, 8}, {1, 8, 0}, {2, 2, 1},
                                   {0, 0, 0}, 1);
  EXPECT_EQ(sharded_tensors_to_json(std::vector<ShardedTensor>{t}),
            R"([{"key":"layers.self_attention.linear_qkv.weight","dtype":"float32","local_shape":[8,8],)"
            R"("global_shape":[2,16,8],"global_offset":[1,8,0],"axis_fragmentations":[2,2,1],"replica_id":[0,0,0],)"
            R"("prepend_axis_num":1,"allow_shape_mismatch":false,"flattened_range":null}])");
  ShardedTensor u = from_rank_offsets("u", {3}, {}, {0});
  u.flattened_range = FlattenedRange{1, 3};
  const std::string text = sharded_tensors_to_json(std::vector<ShardedTensor>{u});
  EXPECT_NE(text.find(R"("replica_id":0)"), std::string::npos);  // an int replica id
  EXPECT_NE(text.find(R"("flattened_range":{"start":1,"stop":3})"), std::string::npos);
  EXPECT_EQ(text.find("dtype"), std::string::npos);
  EXPECT_EQ(sharded_tensors_from_json(text), std::vector<ShardedTensor>{u});
  // A whole block, all ranks, round trips.
  TransformerConfig c = gqa_config();
  c.gated_linear_unit = true;
  for (const auto& rank : all_ranks("transformer_block", c, layout("tp2-pp2-dp2"))) {
    EXPECT_EQ(sharded_tensors_from_json(sharded_tensors_to_json(rank, 2)), rank);
  }
  // Python-side spellings: torch.float32, [start, stop], no optional fields.
  const auto parsed = sharded_tensors_from_json(
      R"([{"key":"k","dtype":"torch.bfloat16","local_shape":[2],"global_shape":[4],"global_offset":[2],)"
      R"("axis_fragmentations":[2],"replica_id":[0,1,0],"prepend_axis_num":0,"flattened_range":[0,1]}])");
  ASSERT_EQ(parsed.size(), 1u);
  EXPECT_EQ(parsed[0].dtype, DType::BF16);
  EXPECT_EQ(parsed[0].flattened_range, (FlattenedRange{0, 1}));
  EXPECT_EQ(parsed[0].replica_id, (Ints{0, 1, 0}));
  EXPECT_FALSE(parsed[0].allow_shape_mismatch);
  // Errors name the entry and field.
  EXPECT_TRUE(message_has([] { sharded_tensors_from_json(R"([{"key":"k"}])"); }, R"(entry 0: "local_shape" is missing)"));
  EXPECT_TRUE(message_has([] { sharded_tensors_from_json(R"({"key":"k"})"); }, "must be a JSON array"));
  EXPECT_TRUE(message_has(
      [] {
        sharded_tensors_from_json(R"([{"key":"k","local_shape":[2.5],"global_shape":[4],"global_offset":[2],)"
                                  R"("axis_fragmentations":[2],"replica_id":0,"prepend_axis_num":0}])");
      },
      R"("local_shape" must be an integer)"));
  EXPECT_THROW(sharded_tensors_from_json(R"([{"key":"k","key":"j"}])"), Error);  // repeated key
  EXPECT_THROW(sharded_tensors_from_json("[1"), Error);
  // Objects.
  const auto objects = module_sharded_state_dict("transformer_block", c, layout("tp2"), 1).objects;
  EXPECT_EQ(sharded_objects_from_json(sharded_objects_to_json(objects)), objects);
  EXPECT_EQ(sharded_objects_to_json(std::vector<ShardedObject>{objects[0]}),
            R"([{"key":"layers.self_attention.linear_proj._extra_state","global_shape":[2],"global_offset":[0],)"
            R"("replica_id":[0,1,0]}])");
}

// ===================== properties over random layouts =====================

struct Case {
  TransformerConfig cfg;
  ParallelConfig pc;
};

// Valid by construction: heads = groups * r, tp | groups and ffn, ep | experts
// and dp, layers divisible by pp * vp, vp only with pp > 2, ep with tp needs sp,
// no ep with cp.
Case arbitrary_case(bool moe_with_cp = true) {
  ParallelConfig pc;
  pc.tensor_model_parallel_size = *rc::gen::element<int64_t>(1, 2, 3);
  pc.pipeline_model_parallel_size = *rc::gen::element<int64_t>(1, 2, 3, 4);
  if (pc.pipeline_model_parallel_size > 2 && *rc::gen::arbitrary<bool>()) pc.virtual_pipeline_model_parallel_size = 2;
  const bool moe = *rc::gen::arbitrary<bool>();
  pc.expert_model_parallel_size = moe ? *rc::gen::element<int64_t>(1, 2) : 1;
  pc.context_parallel_size =
      pc.expert_model_parallel_size == 1 && (moe_with_cp || !moe) ? *rc::gen::element<int64_t>(1, 2) : 1;
  pc.data_parallel_size = pc.expert_model_parallel_size * *rc::gen::element<int64_t>(1, 2);
  pc.sequence_parallel = pc.tensor_model_parallel_size > 1 && (pc.expert_model_parallel_size > 1 || *rc::gen::arbitrary<bool>());
  const int64_t tp = pc.tensor_model_parallel_size;
  TransformerConfig c;
  c.num_layers = pc.pipeline_model_parallel_size * pc.virtual_pipeline_model_parallel_size.value_or(1) *
                 *rc::gen::element<int64_t>(1, 2);
  const int64_t groups = tp * *rc::gen::element<int64_t>(1, 2);
  c.num_query_groups = groups;
  c.num_attention_heads = groups * *rc::gen::element<int64_t>(1, 2);
  c.kv_channels = *rc::gen::element<int64_t>(2, 4);
  c.hidden_size = *rc::gen::inRange<int64_t>(1, 9);
  c.ffn_hidden_size = tp * *rc::gen::inRange<int64_t>(1, 4);
  c.gated_linear_unit = *rc::gen::arbitrary<bool>();
  c.add_bias_linear = *rc::gen::arbitrary<bool>();
  c.add_qkv_bias = *rc::gen::arbitrary<bool>();
  c.normalization = *rc::gen::element<std::string>("LayerNorm", "RMSNorm");
  if (moe) {
    c.num_moe_experts = pc.expert_model_parallel_size * *rc::gen::element<int64_t>(1, 2);
    c.moe_router_topk = 1;
    if (*rc::gen::arbitrary<bool>()) c.moe_ffn_hidden_size = tp * *rc::gen::element<int64_t>(1, 2);
  }
  c = with_parallel(c, pc);
  validate_config(c);
  return {c, pc};
}

// The checkpoint keys and global shapes the catalogue predicts for a block:
// "layers.<i>.<p>" -> "layers.<renamed p>" with the layer axis in front, experts
// "mlp.experts.local_experts.<e>.<q>" -> "mlp.experts.experts.<q>" with [L, E] in front.
std::map<std::string, Shape> predicted_global_shapes(const TransformerConfig& c) {
  std::map<std::string, Shape> out;
  for (const ParamSpec& p : module_params("transformer_block", c)) {
    if (!p.layer) {
      out[p.key] = p.shape;
      continue;
    }
    std::string rest = p.key.substr(p.key.find('.', 7) + 1);  // after "layers.<i>."
    for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
             {"input_layernorm.", "self_attention.linear_qkv.layer_norm_"}, {"pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"}}) {
      if (rest.rfind(from, 0) == 0) rest = to + rest.substr(from.size());
    }
    Shape shape{c.num_layers};
    if (p.expert) {
      rest = "mlp.experts.experts." + rest.substr(rest.find('.', std::string("mlp.experts.local_experts.").size()) + 1);
      shape.push_back(*c.num_moe_experts);
    }
    shape.insert(shape.end(), p.shape.begin(), p.shape.end());
    out["layers." + rest] = shape;
  }
  return out;
}

// For random layouts, the main replicas over all ranks cover every element of
// every key exactly once, the objects every cell once, and the keys and global
// shapes are those of the parameter catalogue. The one exception is 0.5.0's:
// MoE with context parallelism duplicates the main replicas of expert tensors.
RC_GTEST_PROP(CheckpointSharding, MainReplicasCoverEveryElementOnce, ()) {
  const Case k = arbitrary_case();
  std::vector<std::vector<ShardedTensor>> tensors;
  std::vector<std::vector<ShardedObject>> objects;
  for (int64_t r = 0; r < k.pc.world_size(); ++r) {
    ShardedStateDict sd = module_sharded_state_dict("transformer_block", k.cfg, k.pc, r, "decoder.");
    tensors.push_back(std::move(sd.tensors));
    objects.push_back(std::move(sd.objects));
  }
  const auto problems = check_sharding_integrity(tensors);
  for (const std::string& p : problems) RC_LOG() << p << "\n";
  const auto object_problems = check_object_integrity(objects);
  if (k.cfg.num_moe_experts && k.pc.context_parallel_size > 1) {
    RC_ASSERT(!problems.empty());
    RC_ASSERT(!object_problems.empty());
    for (const std::string& p : problems) RC_ASSERT(p.find("decoder.layers.mlp.experts.experts.") == 0);
    for (const std::string& p : object_problems) RC_ASSERT(p.find("layers.mlp.experts.experts.") != std::string::npos);
  } else {
    RC_ASSERT(problems.empty());
    RC_ASSERT(object_problems.empty());
  }
  std::map<std::string, Shape> seen;
  for (const auto& rank : tensors) {
    for (const ShardedTensor& t : rank) seen[t.key.substr(std::string("decoder.").size())] = t.global_shape;
  }
  RC_ASSERT(seen == predicted_global_shapes(k.cfg));
}

// Breaking any one piece (dropping a main replica, or making another replica
// main too) is always caught.
RC_GTEST_PROP(CheckpointSharding, IntegrityCatchesOneBrokenPiece, ()) {
  const Case k = arbitrary_case(false);
  auto tensors = std::vector<std::vector<ShardedTensor>>();
  for (int64_t r = 0; r < k.pc.world_size(); ++r) tensors.push_back(sharded_state_dict("transformer_block", k.cfg, k.pc, r));
  const size_t rank = *rc::gen::inRange<size_t>(0, tensors.size());
  RC_PRE(!tensors[rank].empty());
  const size_t i = *rc::gen::inRange<size_t>(0, tensors[rank].size());
  ShardedTensor& t = tensors[rank][i];
  // A key nobody holds any more cannot be missed: keep at least one piece of it.
  size_t pieces = 0;
  for (const auto& r : tensors) pieces += static_cast<size_t>(std::count_if(r.begin(), r.end(), [&](const ShardedTensor& x) { return x.key == t.key; }));
  RC_PRE(!t.is_main_replica() || pieces > 1);
  if (t.is_main_replica()) {
    tensors[rank].erase(tensors[rank].begin() + static_cast<std::ptrdiff_t>(i));
  } else {
    t.replica_id.assign(t.replica_id.size(), 0);
  }
  RC_ASSERT(!check_sharding_integrity(tensors).empty());
}

// GLU fc1 weights: each rank's two pieces are exactly the rows module_params'
// local_shard_spec gives it (the checkpoint stores the TP = 1 layout).
RC_GTEST_PROP(CheckpointSharding, GluPiecesMatchLocalShards, ()) {
  Case k = arbitrary_case();
  k.cfg.gated_linear_unit = true;
  const auto params = module_params("mlp", k.cfg);
  const int64_t tp = k.pc.tensor_model_parallel_size;
  for (int64_t r = 0; r < k.pc.world_size(); ++r) {
    const int64_t tp_rank = sharding_context(k.pc, r).tp_rank;
    const auto mlp = sharded_state_dict("mlp", k.cfg, k.pc, r);
    const auto pieces = with_key(mlp, "linear_fc1.weight");
    RC_ASSERT(pieces.size() == 2u);
    const TpShard s = local_shard_spec(params[0], tp, tp_rank);
    for (size_t j = 0; j < 2; ++j) {
      RC_ASSERT(pieces[j]->global_offset[0] == s.ranges[j].begin);
      RC_ASSERT(pieces[j]->global_offset[0] + pieces[j]->local_shape[0] == s.ranges[j].end);
    }
  }
}

}  // namespace
}  // namespace paritron
