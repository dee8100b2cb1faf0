// MoE through the optimized runner under expert, data, tensor and sequence
// parallelism, against parity/expected.h's expectation (the reference per
// token group: data-parallel slice x SP slice): capacity dropping and
// padding, aux and z losses, expert parallelism's all-to-all dispatch, TP-
// sharded experts, the moe_router component, and pipeline stages holding MoE
// layers.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <fmt/format.h>

#include "common/transformer_config.h"
#include "optimized/run_case.h"
#include "parity/expected.h"
#include "reference/make_case.h"

namespace paritron::parity {
namespace {

// edit: changes to the config after parsing (fields the base JSON sets).
Case moe_case(const std::string& component, const std::string& extra, int64_t b, int64_t s = 6,
              const std::function<void(TransformerConfig&)>& edit = {}) {
  ref::MakeCaseOptions o;
  o.component = component;
  o.config = config_from_json_text(fmt::format(
                 R"({{"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "ffn_hidden_size": 12,
                     "num_moe_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 0.01,
                     "moe_z_loss_coeff": 0.001, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                     "init_method_std": 0.3 {}}})",
                 extra))
                 .config;
  if (edit) edit(o.config);
  o.seq_length = s;
  o.micro_batch_size = b;
  o.seed = 11;
  o.taps = false;
  return ref::make_case(o);
}

// dtype F64: against the float64 truth; F32: against the F32-emulating reference.
void expect_layout_matches(const Case& c, const std::string& layout, DType dtype = DType::F64) {
  const ParallelConfig pc = ParallelConfig::parse_layout(layout);
  opt::OptimizedOptions o;
  o.dtype = dtype;
  const opt::OptimizedResult got = opt::run_optimized(c, pc, o);
  ref::ReferenceOptions ro;
  ro.dtype = dtype;
  const ref::ReferenceResult want = expected_for_layout(c, pc, opt::optimized_micro_batches(c, pc, o), ro);
  // MoE layers without attention match to rounding; with attention, the CPU
  // attention kernel's fp32 shows.
  const bool no_attention = c.component == "moe_layer" || c.component == "moe_router";
  const double tol = dtype == DType::F32 ? 1e-5 : no_attention ? 1e-10 : 3e-6;
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
  EXPECT_GT(compared, c.component == "moe_router" ? 4 : 8);
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

// Tensor parallelism: TP-sharded experts, the router on each rank's SP slice
// (its token group: s / tp positions of a data-parallel slice), with and
// without expert parallelism (ep carved out of dp: tp2 x dp2 with ep2).
TEST(ExpectedForLayout, MoeLayerUnderTensorAndSequenceParallelism) {
  const Case c = moe_case("moe_layer", "", 4, 8);
  for (const char* layout : {"tp2-sp", "tp2-dp2-sp", "tp2-ep2-dp2-sp", "tp2", "tp2-dp2"}) {
    expect_layout_matches(c, layout);
  }
  expect_layout_matches(c, "tp2-ep2-dp2-sp", DType::F32);
}

TEST(ExpectedForLayout, CapacityDroppingUnderTensorAndSequenceParallelism) {
  for (const char* capacity : {R"(, "moe_expert_capacity_factor": 1.0)",
                               R"(, "moe_expert_capacity_factor": 0.5, "moe_token_drop_policy": "position")",
                               R"(, "moe_expert_capacity_factor": 0.5, "moe_pad_expert_input_to_capacity": true)"}) {
    const Case c = moe_case("moe_layer", capacity, 4, 8);
    for (const char* layout : {"tp2-sp", "tp2-dp2-sp", "tp2-ep2-dp2-sp"}) expect_layout_matches(c, layout);
  }
}

TEST(ExpectedForLayout, GatedExpertsWithoutBiasUnderTensorParallelism) {
  const Case c = moe_case("moe_layer", R"(, "gated_linear_unit": true, "activation_func": "silu",
                                         "add_bias_linear": false)",
                          4, 8, [](TransformerConfig& cfg) { cfg.moe_router_topk = 1; });
  for (const char* layout : {"tp2-sp", "tp2-ep2-dp2-sp", "tp4-sp"}) expect_layout_matches(c, layout);
}

void dropless(TransformerConfig& cfg) {
  cfg.moe_aux_loss_coeff = 0.0;
  cfg.moe_z_loss_coeff.reset();
}

TEST(ExpectedForLayout, MoeRouterComponent) {
  const Case c = moe_case("moe_router", R"(, "moe_expert_capacity_factor": 1.0)", 4, 8);
  EXPECT_TRUE(token_coupled(c));
  for (const char* layout : {"tp1", "dp2", "tp2-sp", "tp2-dp2-sp", "tp2"}) expect_layout_matches(c, layout);
  expect_layout_matches(c, "tp2-sp", DType::F32);
  // A dropless router without losses: the whole-case reference on every layout.
  const Case plain = moe_case("moe_router", "", 4, 8, dropless);
  EXPECT_FALSE(token_coupled(plain));
  for (const char* layout : {"dp2", "tp2-sp"}) expect_layout_matches(plain, layout);
}

// Layers: a dropless router without aux / z loss couples no tokens, so a
// block of MoE layers runs on any layout, here TP x PP with SP.
TEST(ExpectedForLayout, DroplessMoeBlockUnderTensorPipelineAndSequenceParallelism) {
  const Case c = moe_case("transformer_block", "", 4, 8, dropless);
  EXPECT_FALSE(token_coupled(c));
  for (const char* layout : {"tp2-pp2-sp", "tp2-dp2-ep2-sp"}) expect_layout_matches(c, layout);
}

TEST(ExpectedForLayout, TokenCoupledMoeLayerUnderContextOrSequenceParallelismIsRefused) {
  const Case c = moe_case("transformer_layer", "", 4, 8);
  EXPECT_TRUE(token_coupled(c));
  for (const char* layout : {"cp2", "tp2-sp"}) {
    try {
      expected_for_layout(c, ParallelConfig::parse_layout(layout));
      ADD_FAILURE() << layout << ": no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("cannot run alone"), std::string::npos) << e.what();
    }
  }
  // Without sequence parallelism the TP ranks share the whole batch: one token group.
  expect_layout_matches(c, "tp2");
}

TEST(ExpectedForLayout, TokenCoupledMoeLayerUnderContextParallelism) {
  const Case c = moe_case("moe_layer", "", 4, 8);
  expect_layout_matches(c, "cp2");
  expect_layout_matches(c, "cp2-tp2-sp");
}

}  // namespace
}  // namespace paritron::parity
