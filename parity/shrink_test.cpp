// Shrinking over decision lists (parity/shrink.h): recording and replaying
// give the drawn spec back, synthetic failures shrink to the minimal config,
// the budget holds, and a decision list is a one-line repro.
#include <gtest/gtest.h>

#include "common/error.h"
#include "parity/generators.h"
#include "parity/profile.h"
#include "parity/shrink.h"

namespace paritron::parity {
namespace {

std::vector<SpecFilter> filters() {
  std::vector<SpecFilter> fs(5);
  fs[1].large = true;
  fs[2].layout = ParallelConfig::parse_layout("tp2-dp2-sp");
  fs[3].profile = load_profile("mixtral-like");
  fs[4].component = "transformer_block";
  fs[4].profile = load_profile("tiny");
  return fs;
}

TEST(Shrink, ReplayingTheRecordedDecisionsGivesTheSameSpec) {
  for (const SpecFilter& f : filters()) {
    for (uint64_t i = 0; i < 300; ++i) {
      const uint64_t seed = case_seed(5, i);
      const RecordedSpec rec = record_case_spec(seed, f);
      const CaseSpec drawn = draw_case_spec(seed, f);
      ASSERT_EQ(rec.spec, drawn) << describe(drawn);  // recording does not change the draw
      for (const Decision& d : rec.decisions) {
        ASSERT_LT(d.lo, d.hi);
        ASSERT_TRUE(d.lo <= d.value && d.value <= d.hi);
      }
      const std::vector<int64_t> values = decision_values(rec.decisions);
      ASSERT_LE(values.size(), rec.decisions.size());
      const RecordedSpec replayed = replay_case_spec(values, f);
      ASSERT_EQ(replayed.spec, drawn) << describe(drawn);
      ASSERT_EQ(replayed.decisions, rec.decisions);
      // the one-line repro
      ASSERT_EQ(draw_case_spec_from_decisions(parse_decisions(format_decisions(values)), f), drawn);
    }
  }
}

TEST(Shrink, AnyDecisionListIsAValidSpec) {
  // Out-of-range values clamp, missing ones are lo: every list replays.
  EXPECT_EQ(draw_case_spec_from_decisions({}).component, generated_components().front());
  EXPECT_EQ(draw_case_spec_from_decisions({1000}).component, generated_components().back());
  for (uint64_t i = 0; i < 200; ++i) {
    std::vector<int64_t> values;
    uint64_t x = i * 7919 + 1;
    for (int j = 0; j < 40; ++j) {
      x = splitmix64(x);
      values.push_back(static_cast<int64_t>(x % 9) - 1);
    }
    const CaseSpec s = draw_case_spec_from_decisions(values);
    TransformerConfig cfg = s.config;
    EXPECT_TRUE(check_config(cfg).empty()) << describe(s);
    EXPECT_TRUE(check_fits(s.layout, s.config).empty()) << describe(s);
  }
}

TEST(Shrink, DecisionText) {
  EXPECT_EQ(format_decisions({3, 0, 12}), "3,0,12");
  EXPECT_EQ(format_decisions({}), "0");
  EXPECT_EQ(draw_case_spec_from_decisions(parse_decisions("0")), draw_case_spec_from_decisions({}));
  EXPECT_EQ(parse_decisions("3,0,12"), (std::vector<int64_t>{3, 0, 12}));
  EXPECT_EQ(parse_decisions(" 3, 0 ,12 "), (std::vector<int64_t>{3, 0, 12}));
  EXPECT_EQ(parse_decisions(""), std::vector<int64_t>{});
  EXPECT_THROW(parse_decisions("3,,1"), Error);
  EXPECT_THROW(parse_decisions("3;1"), Error);
  EXPECT_THROW(parse_decisions("a"), Error);
  EXPECT_THROW(parse_decisions("3,"), Error);
  EXPECT_THROW(parse_decisions("99999999999999999999"), Error);
}

// "Fails when tp > 1": every failing draw shrinks to tp2 on the simplest case.
TEST(Shrink, TensorParallelFailureShrinksToTp2OnTheSimplestCase) {
  const StillFails fails = [](const CaseSpec& s) { return s.layout.tensor_model_parallel_size > 1; };
  int shrunk = 0;
  for (uint64_t i = 0; shrunk < 15 && i < 500; ++i) {
    const uint64_t seed = case_seed(77, i);
    if (!fails(draw_case_spec(seed))) continue;
    ++shrunk;
    const ShrinkResult r = shrink_drawn_case(seed, {}, fails);
    SCOPED_TRACE(describe(draw_case_spec(seed)) + "\n -> " + describe(r.spec) + "  --decisions " + r.repro_decisions);
    EXPECT_FALSE(r.budget_exhausted);
    EXPECT_EQ(r.spec.layout.layout_name(), ParallelConfig::parse_layout("tp2").layout_name());
    EXPECT_EQ(r.spec.layout.world_size(), 2);
    EXPECT_EQ(r.spec.component, generated_components().front());
    EXPECT_EQ(r.spec.dtype, DType::F32);
    EXPECT_EQ(r.spec.config.num_attention_heads, 2);
    EXPECT_EQ(r.spec.seq, 1);
    EXPECT_EQ(r.spec.batch, 1);
    EXPECT_EQ(r.spec.seed, 0u);
    EXPECT_EQ(r.spec.config.num_layers, 1);
    EXPECT_FALSE(r.spec.training);
    EXPECT_FALSE(r.spec.config.num_moe_experts.has_value());
    // every failing start reaches the same minimal spec, and its repro gives it
    EXPECT_EQ(r.spec, draw_case_spec_from_decisions(parse_decisions(r.repro_decisions)));
  }
  EXPECT_EQ(shrunk, 15);
}

// "Fails for a transformer_layer with hidden_size >= 8".
TEST(Shrink, LayerWidthFailureShrinksToTheSmallestWidth) {
  const StillFails fails = [](const CaseSpec& s) {
    return s.component == "transformer_layer" && s.config.hidden_size >= 8;
  };
  SpecFilter any;
  int shrunk = 0;
  for (uint64_t i = 0; shrunk < 10 && i < 2000; ++i) {
    const uint64_t seed = case_seed(78, i);
    if (!fails(draw_case_spec(seed))) continue;
    const ShrinkResult r = shrink_drawn_case(seed, any, fails);
    SCOPED_TRACE(describe(draw_case_spec(seed)) + "\n -> " + describe(r.spec));
    EXPECT_EQ(r.spec.component, "transformer_layer");
    EXPECT_EQ(r.spec.config.hidden_size, 8);
    EXPECT_EQ(r.spec.layout.world_size(), 1);
    EXPECT_EQ(r.spec.dtype, DType::F32);
    // heads * head_dim = 8: 1 x 8 or 2 x 4 (greedy lowering of one decision at
    // a time cannot trade heads for a larger head dimension)
    EXPECT_LE(r.spec.config.num_attention_heads, 2);
    EXPECT_EQ(r.spec.config.num_layers, 1);
    EXPECT_EQ(r.spec.seq, 1);
    EXPECT_EQ(r.spec.batch, 1);
    EXPECT_FALSE(r.spec.config.num_moe_experts.has_value());
    EXPECT_FALSE(r.spec.config.add_bias_linear);
    EXPECT_FALSE(r.spec.training);
    EXPECT_EQ(r.spec, draw_case_spec_from_decisions(r.decisions, any));
    ++shrunk;
  }
  EXPECT_EQ(shrunk, 10);
}

// Shrinking under a profile stays inside it (the filter is replayed too).
TEST(Shrink, ShrinkingKeepsTheProfile) {
  SpecFilter f;
  f.profile = load_profile("mixtral-like");
  const StillFails fails = [](const CaseSpec& s) { return s.config.num_moe_experts.has_value(); };
  for (uint64_t i = 0; i < 40; ++i) {
    const uint64_t seed = case_seed(79, i);
    if (!fails(draw_case_spec(seed, f))) continue;
    const ShrinkResult r = shrink_drawn_case(seed, f, fails);
    SCOPED_TRACE(describe(r.spec));
    EXPECT_EQ(r.spec.component, "moe_router");
    EXPECT_EQ(*r.spec.config.num_moe_experts, 4);
    EXPECT_EQ(r.spec.config.moe_router_topk, 2);
    EXPECT_EQ(r.spec.config.moe_router_load_balancing_type, "aux_loss");
    EXPECT_EQ(r.spec.config.normalization, "RMSNorm");
    EXPECT_EQ(r.spec.layout.world_size(), 1);
    EXPECT_EQ(r.spec, draw_case_spec_from_decisions(r.decisions, f));
  }
}

TEST(Shrink, BudgetIsRespected) {
  int64_t calls = 0;
  const StillFails always = [&](const CaseSpec&) {
    ++calls;
    return true;
  };
  const uint64_t seed = case_seed(80, 3);
  // Every spec fails: without a budget, the all-lo spec (no decisions).
  ShrinkResult r = shrink_drawn_case(seed, {}, always);
  EXPECT_FALSE(r.budget_exhausted);
  EXPECT_TRUE(r.decisions.empty());
  EXPECT_EQ(r.spec, draw_case_spec_from_decisions({}));
  EXPECT_EQ(r.calls, calls);
  // A call budget.
  for (int64_t max_calls : {0, 1, 5, 12}) {
    calls = 0;
    ShrinkBudget b;
    b.max_calls = max_calls;
    r = shrink_drawn_case(seed, {}, always, b);
    EXPECT_TRUE(r.budget_exhausted);
    EXPECT_EQ(calls, max_calls);
    EXPECT_EQ(r.calls, max_calls);
    EXPECT_TRUE(always(r.spec));  // what it returns is a failing spec
  }
  // A time budget: a slow predicate stops it after about max_seconds.
  calls = 0;
  ShrinkBudget b;
  b.max_seconds = 0.2;
  const StillFails slow = [&](const CaseSpec&) {
    ++calls;
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(50);
    while (std::chrono::steady_clock::now() < until) {
    }
    return true;
  };
  r = shrink_drawn_case(seed, {}, slow, b);
  EXPECT_TRUE(r.budget_exhausted);
  EXPECT_LE(calls, 5);
  EXPECT_LT(r.seconds, 0.2 + 0.1);
  // A predicate that never fails: nothing changes, no budget trouble.
  calls = 0;
  const StillFails never = [&](const CaseSpec&) {
    ++calls;
    return false;
  };
  r = shrink_drawn_case(seed, {}, never);
  EXPECT_FALSE(r.budget_exhausted);
  EXPECT_EQ(r.spec, draw_case_spec(seed));
  EXPECT_EQ(r.steps, 0);
  EXPECT_GT(calls, 0);
  // A predicate that throws counts as not failing.
  const StillFails throws = [](const CaseSpec&) -> bool { throw Error("boom"); };
  r = shrink_drawn_case(seed, {}, throws);
  EXPECT_EQ(r.spec, draw_case_spec(seed));
}

}  // namespace
}  // namespace paritron::parity
