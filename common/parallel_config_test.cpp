// ParallelConfig: Megatron's rank order and groups (parallel_state.py,
// core_v0.5.0), pipeline layer assignment, layout names, validation.
#include "common/parallel_config.h"

#include <algorithm>
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "common/transformer_config.h"

namespace paritron {
namespace {

using Groups = std::vector<std::vector<int64_t>>;

bool mentions(const std::vector<ConfigIssue>& issues, const std::string& field, const std::string& words) {
  return std::any_of(issues.begin(), issues.end(), [&](const ConfigIssue& i) {
    return i.field == field && i.message().find(words) != std::string::npos;
  });
}

// The example in initialize_model_parallel's docstring: 16 GPUs, tp 2, pp 4.
TEST(ParallelConfig, MegatronDocstringExample) {
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-pp4-dp2");
  EXPECT_EQ(pc.world_size(), 16);
  EXPECT_EQ(all_groups(pc, GroupKind::kData),
            (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14}, {13, 15}}));
  EXPECT_EQ(all_groups(pc, GroupKind::kTensor),
            (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}}));
  EXPECT_EQ(all_groups(pc, GroupKind::kPipeline), (Groups{{0, 4, 8, 12}, {1, 5, 9, 13}, {2, 6, 10, 14}, {3, 7, 11, 15}}));
  EXPECT_EQ(group_members(pc, GroupKind::kEmbedding, 9), (std::vector<int64_t>{1, 13}));
  EXPECT_EQ(group_members(pc, GroupKind::kModel, 2), (std::vector<int64_t>{2, 3, 6, 7, 10, 11, 14, 15}));
}

// The context-parallel example of the same docstring: 8 GPUs, tp 2, cp 2 -> CP groups [0,2],[1,3],...
TEST(ParallelConfig, ContextParallelGroups) {
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-cp2-dp2");
  EXPECT_EQ(all_groups(pc, GroupKind::kContext), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(all_groups(pc, GroupKind::kData), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
  EXPECT_EQ(all_groups(pc, GroupKind::kDataWithContext), (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}}));
  EXPECT_EQ(all_groups(pc, GroupKind::kTensorAndData), (Groups{{0, 1, 4, 5}, {2, 3, 6, 7}}));
  EXPECT_EQ(all_groups(pc, GroupKind::kTensorDataContext), (Groups{{0, 1, 2, 3, 4, 5, 6, 7}}));
  const RankCoordinates c = rank_coordinates(pc, 6);
  EXPECT_EQ(c, (RankCoordinates{.tp = 0, .cp = 1, .dp = 1, .pp = 0, .ep = 0, .edp = 1}));
}

// EP is carved out of DP: tp 2, dp 4, ep 2 -> tensor-and-expert groups of 4
// contiguous ranks, ep_rank = dp mod ep, replicas of an expert stride tp*ep.
TEST(ParallelConfig, ExpertGroups) {
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-dp4-ep2-sp");
  EXPECT_EQ(all_groups(pc, GroupKind::kTensorAndExpert), (Groups{{0, 1, 2, 3}, {4, 5, 6, 7}}));
  EXPECT_EQ(all_groups(pc, GroupKind::kExpert), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(all_groups(pc, GroupKind::kDataModuloExpert), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
  EXPECT_EQ(rank_coordinates(pc, 6).ep, 1);   // dp 3
  EXPECT_EQ(rank_coordinates(pc, 6).edp, 1);
}

ParallelConfig arbitrary_layout() {
  ParallelConfig pc;
  pc.tensor_model_parallel_size = *rc::gen::inRange(1, 4);
  pc.pipeline_model_parallel_size = *rc::gen::inRange(1, 4);
  pc.context_parallel_size = *rc::gen::inRange(1, 3);
  pc.expert_model_parallel_size = pc.context_parallel_size == 1 ? *rc::gen::inRange(1, 3) : 1;
  pc.data_parallel_size = pc.expert_model_parallel_size * *rc::gen::inRange(1, 3);
  pc.sequence_parallel = pc.tensor_model_parallel_size > 1 && (pc.expert_model_parallel_size > 1 || *rc::gen::arbitrary<bool>());
  return pc;
}

RC_GTEST_PROP(ParallelConfig, RankCoordinatesRoundTrip, ()) {
  const ParallelConfig pc = arbitrary_layout();
  RC_ASSERT(pc.check().empty());
  for (int64_t rank = 0; rank < pc.world_size(); ++rank) {
    const RankCoordinates c = rank_coordinates(pc, rank);
    RC_ASSERT(global_rank(pc, c.tp, c.cp, c.dp, c.pp) == rank);
    RC_ASSERT(c.ep + pc.expert_model_parallel_size * c.edp == c.dp);
  }
}

// Every kind of group partitions the world into groups of the right size whose
// members differ exactly in the coordinate the group spans, in rank order of
// that coordinate (the group rank is the coordinate).
RC_GTEST_PROP(ParallelConfig, GroupsPartitionTheWorld, ()) {
  const ParallelConfig pc = arbitrary_layout();
  const int64_t tp = pc.tensor_model_parallel_size, cp = pc.context_parallel_size, dp = pc.data_parallel_size;
  const int64_t pp = pc.pipeline_model_parallel_size, ep = pc.expert_model_parallel_size;
  struct Expect {
    GroupKind kind;
    int64_t size;
    int64_t (*index)(const RankCoordinates&, int64_t cp);  // position inside the group
  };
  const Expect expectations[] = {
      {GroupKind::kTensor, tp, [](const RankCoordinates& c, int64_t) { return c.tp; }},
      {GroupKind::kContext, cp, [](const RankCoordinates& c, int64_t) { return c.cp; }},
      {GroupKind::kData, dp, [](const RankCoordinates& c, int64_t) { return c.dp; }},
      {GroupKind::kDataWithContext, dp * cp, [](const RankCoordinates& c, int64_t n) { return c.cp + n * c.dp; }},
      {GroupKind::kPipeline, pp, [](const RankCoordinates& c, int64_t) { return c.pp; }},
      {GroupKind::kModel, tp * pp, nullptr},
      {GroupKind::kTensorAndData, tp * dp, nullptr},
      {GroupKind::kTensorDataContext, tp * dp * cp, nullptr},
      {GroupKind::kTensorAndExpert, tp * ep, nullptr},
      {GroupKind::kExpert, ep, [](const RankCoordinates& c, int64_t) { return c.ep; }},
      {GroupKind::kDataModuloExpert, dp / ep, [](const RankCoordinates& c, int64_t) { return c.edp; }},
  };
  for (const Expect& e : expectations) {
    if (cp > 1 && (e.kind == GroupKind::kTensorAndExpert || e.kind == GroupKind::kExpert ||
                   e.kind == GroupKind::kDataModuloExpert)) {
      continue;  // expert groups exist only with cp == 1 (ep > 1 forbids cp > 1)
    }
    std::set<int64_t> covered;
    for (const std::vector<int64_t>& g : all_groups(pc, e.kind)) {
      RC_ASSERT(static_cast<int64_t>(g.size()) == e.size);
      for (size_t i = 0; i < g.size(); ++i) {
        RC_ASSERT(covered.insert(g[i]).second);
        RC_ASSERT(group_members(pc, e.kind, g[i]) == g);
        if (e.index != nullptr) RC_ASSERT(e.index(rank_coordinates(pc, g[i]), cp) == static_cast<int64_t>(i));
      }
    }
    RC_ASSERT(static_cast<int64_t>(covered.size()) == pc.world_size());
  }
  // The tensor group shares (cp, dp, pp); the expert group shares tp and pp.
  for (int64_t rank = 0; rank < pc.world_size(); ++rank) {
    const RankCoordinates c = rank_coordinates(pc, rank);
    for (int64_t m : group_members(pc, GroupKind::kTensor, rank)) {
      const RankCoordinates o = rank_coordinates(pc, m);
      RC_ASSERT(o.cp == c.cp && o.dp == c.dp && o.pp == c.pp);
    }
    if (cp == 1) {
      for (int64_t m : group_members(pc, GroupKind::kExpert, rank)) {
        const RankCoordinates o = rank_coordinates(pc, m);
        RC_ASSERT(o.tp == c.tp && o.pp == c.pp && o.edp == c.edp);
      }
    }
  }
}

// spec §10.8: 16 layers, pp 4, vp 2 (1-based): stage 0 = [1,2] and [9,10];
// stage 1 = [3,4] and [11,12]; stage 2 = [5,6] and [13,14]; stage 3 = [7,8] and [15,16].
TEST(ParallelConfig, VirtualPipelineLayerAssignment) {
  const ParallelConfig pc = ParallelConfig::parse_layout("pp4-vp2");
  EXPECT_EQ(num_layers_to_build(pc, 16), 2);
  EXPECT_EQ(stage_layers(pc, 16, 0, 0), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(stage_layers(pc, 16, 0, 1), (std::vector<int64_t>{8, 9}));
  EXPECT_EQ(stage_layers(pc, 16, 1, 1), (std::vector<int64_t>{10, 11}));
  EXPECT_EQ(stage_layers(pc, 16, 3, 0), (std::vector<int64_t>{6, 7}));
  EXPECT_EQ(stage_layers(pc, 16, 3, 1), (std::vector<int64_t>{14, 15}));
  EXPECT_THROW(stage_layers(pc, 16, 4, 0), Error);
  EXPECT_THROW(stage_layers(pc, 16, 0, 2), Error);
  const ParallelConfig plain = ParallelConfig::parse_layout("pp3");
  EXPECT_EQ(stage_layers(plain, 6, 2), (std::vector<int64_t>{4, 5}));
}

RC_GTEST_PROP(ParallelConfig, EveryLayerBuiltOnce, ()) {
  ParallelConfig pc;
  pc.pipeline_model_parallel_size = *rc::gen::inRange(1, 5);
  const int64_t vp = *rc::gen::inRange(1, 4);
  if (pc.pipeline_model_parallel_size > 2 && *rc::gen::arbitrary<bool>()) pc.virtual_pipeline_model_parallel_size = vp;
  const int64_t num_layers = pc.pipeline_model_parallel_size * pc.virtual_pipeline_model_parallel_size.value_or(1) * *rc::gen::inRange(1, 4);
  std::vector<int> built(static_cast<size_t>(num_layers), 0);
  for (int64_t p = 0; p < pc.pipeline_model_parallel_size; ++p) {
    for (int64_t v = 0; v < pc.virtual_pipeline_model_parallel_size.value_or(1); ++v) {
      for (int64_t layer : stage_layers(pc, num_layers, p, v)) ++built.at(static_cast<size_t>(layer));
    }
  }
  RC_ASSERT(std::all_of(built.begin(), built.end(), [](int n) { return n == 1; }));
}

TEST(ParallelConfig, LayoutNames) {
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-pp2-dp1-cp1-ep1-sp");
  EXPECT_EQ(pc.tensor_model_parallel_size, 2);
  EXPECT_TRUE(pc.sequence_parallel);
  EXPECT_EQ(pc.layout_name(), "tp2-pp2-dp1-cp1-ep1-sp");
  EXPECT_EQ(ParallelConfig::parse_layout("dp4-tp2").layout_name(), "tp2-pp1-dp4-cp1-ep1");
  EXPECT_EQ(ParallelConfig::parse_layout("pp4-vp2").layout_name(), "tp1-pp4-dp1-cp1-ep1-vp2");
  const auto message = [](std::string_view layout) {
    try {
      ParallelConfig::parse_layout(layout);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message("tp2-xx3").find("part \"xx3\" is unknown"), std::string::npos);
  EXPECT_NE(message("tp-pp2").find("part \"tp\" needs a size"), std::string::npos);
  EXPECT_NE(message("tp2-tp4").find("is given twice"), std::string::npos);
  EXPECT_NE(message("tp2x").find("needs a size"), std::string::npos);
  EXPECT_NE(message("").find("is empty"), std::string::npos);
}

TEST(ParallelConfig, LayoutRules) {
  EXPECT_TRUE(mentions(ParallelConfig::parse_layout("tp1-sp").check(), "sequence_parallel", "without tensor parallelism"));
  EXPECT_TRUE(mentions(ParallelConfig::parse_layout("tp2-dp2-ep2").check(), "sequence_parallel", "must be true"));
  EXPECT_TRUE(mentions(ParallelConfig::parse_layout("dp3-ep2").check(), "data_parallel_size", "divisible by expert_model_parallel_size (2)"));
  EXPECT_TRUE(mentions(ParallelConfig::parse_layout("cp2-dp2-ep2").check(), "expert_model_parallel_size", "context_parallel_size"));
  EXPECT_TRUE(mentions(ParallelConfig::parse_layout("pp2-vp2").check(), "virtual_pipeline_model_parallel_size", "pipeline_model_parallel_size > 2"));
  EXPECT_TRUE(ParallelConfig::parse_layout("pp3-vp2").check().empty());
  EXPECT_TRUE(mentions(ParallelConfig::parse_layout("tp0").check(), "tensor_model_parallel_size", "must be >= 1"));
  EXPECT_TRUE(mentions(ParallelConfig::parse_layout("tp4611686018427387904-pp4").check(), "data_parallel_size", "larger than"));
  // The rank arithmetic refuses what it cannot compute instead of dividing by zero.
  EXPECT_THROW(rank_coordinates(ParallelConfig::parse_layout("dp2-ep0"), 0), ConfigError);
  EXPECT_THROW(ParallelConfig::parse_layout("tp4611686018427387904-pp4").world_size(), ConfigError);
  EXPECT_THROW(num_layers_to_build(ParallelConfig::parse_layout("pp0"), 4), ConfigError);
  EXPECT_TRUE(ParallelConfig::parse_layout("tp2-pp2-dp2-ep2-sp").check().empty());
  EXPECT_THROW(ParallelConfig::parse_layout("tp1-sp").validate(), ConfigError);
  EXPECT_THROW(rank_coordinates(ParallelConfig::parse_layout("tp2"), 2), Error);
}

TEST(ParallelConfig, FitsTheModel) {
  TransformerConfig cfg;
  cfg.num_layers = 6;
  cfg.hidden_size = 96;
  cfg.num_attention_heads = 6;
  cfg.num_query_groups = 2;
  ASSERT_TRUE(check_config(cfg).empty());
  EXPECT_TRUE(check_fits(ParallelConfig::parse_layout("tp2-pp3"), cfg).empty());
  const std::vector<ConfigIssue> issues = check_fits(ParallelConfig::parse_layout("tp4-pp4"), cfg);
  EXPECT_TRUE(mentions(issues, "num_attention_heads", "tensor_model_parallel_size (4)"));
  EXPECT_TRUE(mentions(issues, "num_query_groups", "tensor_model_parallel_size (4)"));
  EXPECT_TRUE(mentions(issues, "num_layers", "pipeline_model_parallel_size (4)"));
  EXPECT_TRUE(mentions(check_fits(ParallelConfig::parse_layout("dp2-ep2"), cfg), "num_moe_experts", "expert parallelism"));
  // A rule between parallel sizes is reported once, not by both the layout and the config.
  for (const char* layout : {"tp1-sp", "pp2-vp2-cp2-dp2-ep2"}) {
    const std::vector<ConfigIssue> all = check_fits(ParallelConfig::parse_layout(layout), cfg);
    std::set<std::string> fields;
    for (const ConfigIssue& i : all) EXPECT_TRUE(fields.insert(i.field + i.rule).second) << layout << ": " << i.message();
  }
  // Sequence-dependent rules.
  EXPECT_TRUE(check_sequence_length(ParallelConfig::parse_layout("tp2-sp"), 8).empty());
  EXPECT_TRUE(mentions(check_sequence_length(ParallelConfig::parse_layout("tp2-sp"), 7), "seq_length", "tensor_model_parallel_size (2)"));
  EXPECT_TRUE(mentions(check_sequence_length(ParallelConfig::parse_layout("cp2"), 6), "seq_length", "2 * context_parallel_size (4)"));
  // The config's own parallel fields read back as a layout and applied again.
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-pp3-dp2");
  const TransformerConfig sized = with_parallel(cfg, pc);
  EXPECT_EQ(parallel_from_config(sized, 2), pc);
  EXPECT_TRUE(sized.pipeline_dtype.has_value());
}

TEST(ParallelConfig, Json) {
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-pp4-vp2-dp2-sp");
  EXPECT_EQ(parallel_from_json_text(parallel_to_json_text(pc)), pc);
  EXPECT_EQ(parallel_from_json_text("{\"tensor_model_parallel_size\": 2}").tensor_model_parallel_size, 2);
  const auto message = [](std::string_view text) {
    try {
      parallel_from_json_text(text);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message("{\"tensor_model_paralel_size\": 2}").find("tensor_model_paralel_size"), std::string::npos);
  EXPECT_NE(message("{\"data_parallel_size\": \"2\"}").find("must be an integer"), std::string::npos);
  EXPECT_NE(message("[1]").find("must be a JSON object"), std::string::npos);
  EXPECT_NE(message("{\"data_parallel_size\": 18446744073709551615}").find("must be an integer"), std::string::npos);
  EXPECT_NE(message("{\"data_parallel_size\": 2, \"data_parallel_size\": 4}").find("twice"), std::string::npos);
  EXPECT_NE(message("{").find("not valid JSON"), std::string::npos);
}

}  // namespace
}  // namespace paritron

namespace paritron {
namespace {

// An independent transcription of the loops of initialize_model_parallel
// (megatron/core/parallel_state.py, core_v0.5.0), creating each group in
// Megatron's order, to compare with group_members() on random layouts.
std::map<GroupKind, std::vector<std::vector<int64_t>>> megatron_groups(const ParallelConfig& pc) {
  const int64_t tp = pc.tensor_model_parallel_size, pp = pc.pipeline_model_parallel_size;
  const int64_t cp = pc.context_parallel_size, ep = pc.expert_model_parallel_size;
  const int64_t world = pc.world_size(), dp = world / (tp * pp * cp);
  const int64_t num_pp_groups = world / pp;
  const auto range = [](int64_t begin, int64_t end, int64_t step) {
    std::vector<int64_t> r;
    for (int64_t i = begin; i < end; i += step) r.push_back(i);
    return r;
  };
  std::map<GroupKind, std::vector<std::vector<int64_t>>> g;
  std::vector<std::vector<int64_t>> all_dp_with_cp;
  for (int64_t i = 0; i < pp; ++i) {
    const int64_t start = i * num_pp_groups, end = (i + 1) * num_pp_groups;
    for (int64_t j = 0; j < cp * tp; ++j) g[GroupKind::kData].push_back(range(start + j, end, cp * tp));
    for (int64_t j = 0; j < tp; ++j) {
      all_dp_with_cp.push_back(range(start + j, end, tp));
      g[GroupKind::kDataWithContext].push_back(all_dp_with_cp.back());
    }
  }
  for (int64_t i = 0; i < pp; ++i) {
    for (int64_t j = 0; j < dp; ++j) {
      const int64_t start = i * num_pp_groups + j * tp * cp, end = i * num_pp_groups + (j + 1) * tp * cp;
      for (int64_t k = 0; k < tp; ++k) g[GroupKind::kContext].push_back(range(start + k, end, tp));
    }
  }
  for (int64_t i = 0; i < dp * cp; ++i) {
    std::vector<int64_t> ranks;
    for (const auto& group : all_dp_with_cp) ranks.push_back(group[static_cast<size_t>(i)]);
    g[GroupKind::kModel].push_back(ranks);
  }
  for (int64_t i = 0; i < world / tp; ++i) g[GroupKind::kTensor].push_back(range(i * tp, (i + 1) * tp, 1));
  for (int64_t i = 0; i < num_pp_groups; ++i) {
    const std::vector<int64_t> ranks = range(i, world, num_pp_groups);
    g[GroupKind::kPipeline].push_back(ranks);
  }
  const int64_t tdc = tp * dp * cp;
  for (int64_t i = 0; i < world / tdc; ++i) {
    g[GroupKind::kTensorDataContext].push_back(range(i * tdc, (i + 1) * tdc, 1));
    for (int64_t j = 0; j < cp; ++j) {
      std::vector<int64_t> ranks;
      for (int64_t k = 0; k < dp; ++k) {
        const int64_t start = i * tdc + j * tp + k * tp * cp;
        for (int64_t r : range(start, start + tp, 1)) ranks.push_back(r);
      }
      g[GroupKind::kTensorAndData].push_back(ranks);
    }
  }
  const int64_t td = tp * dp, tae = tp * ep;
  for (int64_t i = 0; i < world / td; ++i) {
    for (int64_t j = 0; j < dp / ep; ++j) {
      g[GroupKind::kTensorAndExpert].push_back(range(i * td + j * tae, i * td + (j + 1) * tae, 1));
    }
  }
  for (int64_t i = 0; i < world / td; ++i) {
    for (int64_t j = 0; j < tae; ++j) g[GroupKind::kDataModuloExpert].push_back(range(i * td + j, (i + 1) * td, tae));
  }
  return g;
}

RC_GTEST_PROP(ParallelConfig, GroupsMatchATranscriptionOfMegatronsLoops, ()) {
  const ParallelConfig pc = arbitrary_layout();
  for (const auto& [kind, groups] : megatron_groups(pc)) {
    // Every group (expert groups with cp > 1 included: Megatron builds those
    // as if cp == 1, and group_members follows the same formula) Megatron creates is the group of each of its members, in Megatron's order.
    for (const std::vector<int64_t>& group : groups) {
      for (int64_t rank : group) RC_ASSERT(group_members(pc, kind, rank) == group);
    }
  }
}

}  // namespace
}  // namespace paritron
