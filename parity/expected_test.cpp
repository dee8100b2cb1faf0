// MoE through the optimized runner under expert and data parallelism,
// against parity/expected.h's expectation (the reference per data-parallel
// token group): capacity dropping and padding, aux and z losses, expert
// parallelism's all-to-all dispatch, and pipeline stages holding MoE layers.
#include <gtest/gtest.h>

#include <cmath>
#include <fmt/format.h>

#include "common/transformer_config.h"
#include "optimized/run_case.h"
#include "parity/expected.h"
#include "reference/make_case.h"

namespace paritron::parity {
namespace {

Case moe_case(const std::string& component, const std::string& extra, int64_t b) {
  ref::MakeCaseOptions o;
  o.component = component;
  o.config = config_from_json_text(fmt::format(
                 R"({{"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "ffn_hidden_size": 12,
                     "num_moe_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 0.01,
                     "moe_z_loss_coeff": 0.001, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                     "init_method_std": 0.3 {}}})",
                 extra))
                 .config;
  o.seq_length = 6;
  o.micro_batch_size = b;
  o.seed = 11;
  o.taps = false;
  return ref::make_case(o);
}

void expect_layout_matches(const Case& c, const std::string& layout) {
  const ParallelConfig pc = ParallelConfig::parse_layout(layout);
  opt::OptimizedOptions o;
  o.dtype = DType::F64;
  const opt::OptimizedResult got = opt::run_optimized(c, pc, o);
  const ref::ReferenceResult want = expected_for_layout(c, pc, opt::optimized_micro_batches(c, pc, o));
  // MoE layers without attention match to rounding; with attention, the CPU
  // attention kernel's fp32 shows.
  const double tol = c.component == "moe_layer" ? 1e-10 : 3e-6;
  int compared = 0;
  for (const auto& [name, expected] : want.tensors) {
    if (name.rfind("outputs.intermediate.", 0) == 0) continue;
    auto it = got.tensors.find(name);
    ASSERT_NE(it, got.tensors.end()) << layout << ": no " << name;
    ASSERT_EQ(it->second.shape(), expected.shape()) << layout << ": " << name;
    double scale = 1e-30, worst = 0;
    for (int64_t i = 0; i < expected.numel(); ++i) {
      scale = std::max(scale, std::abs(expected.get(i)));
      worst = std::max(worst, std::abs(expected.get(i) - it->second.get(i)));
    }
    if (!is_floating(expected.dtype())) {
      EXPECT_EQ(worst, 0) << layout << ": " << name;  // indices and counts are exact
    } else {
      EXPECT_LE(worst, tol * std::max(scale, 1.0)) << layout << ": " << name;
    }
    ++compared;
  }
  EXPECT_GT(compared, 8);
}

TEST(ExpectedForLayout, MoeLayerUnderExpertParallelism) {
  const Case c = moe_case("moe_layer", "", 4);
  for (const char* layout : {"tp1", "dp2", "dp2-ep2", "dp4-ep4", "dp4-ep2"}) expect_layout_matches(c, layout);
}

TEST(ExpectedForLayout, CapacityDroppingUnderExpertParallelism) {
  for (const char* capacity : {R"(, "moe_expert_capacity_factor": 1.0)",
                               R"(, "moe_expert_capacity_factor": 0.5, "moe_token_drop_policy": "position")",
                               R"(, "moe_expert_capacity_factor": 0.5, "moe_pad_expert_input_to_capacity": true)"}) {
    const Case c = moe_case("moe_layer", capacity, 4);
    for (const char* layout : {"dp2-ep2", "dp4-ep4"}) expect_layout_matches(c, layout);
  }
}

TEST(ExpectedForLayout, MoeBlockOverPipelineDataAndExpertParallelism) {
  const Case c = moe_case("transformer_block", R"(, "moe_expert_capacity_factor": 1.0)", 4);
  expect_layout_matches(c, "pp2-dp2-ep2");
}

TEST(ExpectedForLayout, TokenCoupledMoeUnderContextParallelismIsRefused) {
  const Case c = moe_case("moe_layer", "", 4);
  EXPECT_THROW(expected_for_layout(c, ParallelConfig::parse_layout("cp2")), Error);
  EXPECT_TRUE(token_coupled(c));
}

}  // namespace
}  // namespace paritron::parity
