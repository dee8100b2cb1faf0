// Tests of reference/transformer_block (spec §8.3-8.4, §10.8, §14 #9, #24,
// #38): pipeline_stage for the spec's 16-layer pp4 vp2 example and pp2
// without vp (offsets, sizes, 1-based layer numbers, post_process only on the
// last stage's last chunk), whole_model_stage; a block equals its layers
// applied one after another then the final norm as Transformer Engine's
// kernel; the final norm skipped without weights or post_process; stage-local
// attention layer numbers (and the global_layer_number_in_attention switch);
// dropout RNG names by global layer index (a whole-model training run equals
// its pipeline stages run in sequence, bitwise); the block backward equals the
// chained layer backwards; taps and errors. Whole-block gradients through the
// case path are in run_case_test.cpp.
#include "reference/transformer_block.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include <fmt/format.h>

#include "common/error.h"
#include "common/module_params.h"
#include "common/transformer_config.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

TransformerConfig with_layers(int64_t num_layers) {
  TransformerConfig c;
  c.num_layers = num_layers;
  return c;
}

// The whole model's parameters: "layers.<global i>.*" and "final_layernorm.*".
MatMap model_weights(const TransformerConfig& cfg, uint64_t seed, DType dtype = DType::F64) {
  return random_weights(module_params("transformer_block", cfg), "", seed, dtype, cfg.layernorm_zero_centered_gamma);
}

// What a pipeline stage holds: global layers [offset, offset + n) renamed to
// chunk-local "layers.<i>", plus final_layernorm.* when `final_norm`.
MatMap stage_weights(const MatMap& model, int64_t offset, int64_t n, bool final_norm) {
  MatMap w;
  for (const auto& [key, value] : model) {
    if (key.rfind("final_layernorm.", 0) == 0) {
      if (final_norm) w[key] = value;
      continue;
    }
    for (int64_t i = 0; i < n; ++i) {
      const std::string global = fmt::format("layers.{}.", offset + i);
      if (key.rfind(global, 0) == 0) w[fmt::format("layers.{}.", i) + key.substr(global.size())] = value;
    }
  }
  return w;
}

const char* kGpt = R"({"num_layers": 4, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": 12,
  "hidden_dropout": 0.0, "attention_dropout": 0.0})";

// ---------------------------------------------------------------------------
// Pipeline layer assignment (spec §10.8).

// 16 layers, pp 4, vp 2: L_s = 4 per stage, L_c = 2 per chunk, chunk v of
// stage r starts at v * 16/2 + r * 2. 1-based (the spec's table):
//   stage 0 = [1, 2] and [9, 10]; stage 1 = [3, 4] and [11, 12];
//   stage 2 = [5, 6] and [13, 14]; stage 3 = [7, 8] and [15, 16].
// Only stage 3's chunk 1 (layers 15, 16) is post_process.
TEST(TransformerBlockStage, Pp4Vp2SixteenLayers) {
  const TransformerConfig cfg = with_layers(16);
  const int64_t first[4][2] = {{1, 9}, {3, 11}, {5, 13}, {7, 15}};  // 1-based first layer of each chunk
  for (int64_t r = 0; r < 4; ++r) {
    for (int64_t v = 0; v < 2; ++v) {
      const BlockStage s = pipeline_stage(cfg, 4, 2, r, v);
      EXPECT_EQ(s.num_layers, 2) << r << " " << v;
      EXPECT_EQ(s.layer_offset + 1, first[r][v]) << r << " " << v;
      EXPECT_EQ(s.post_process, r == 3 && v == 1) << r << " " << v;
      EXPECT_FALSE(s.global_layer_number_in_attention);
    }
  }
  EXPECT_EQ(pipeline_stage(cfg, 4, 2, 0, 1).layer_offset, 8);
  EXPECT_EQ(pipeline_stage(cfg, 4, 2, 1, 0).layer_offset, 2);
  EXPECT_EQ(pipeline_stage(cfg, 4, 2, 1, 1).layer_offset, 10);
}

// pp 2 without vp, 8 layers: stage r holds [4r, 4r + 4); only stage 1 is
// post_process. pp 1 is the whole model. Ranks out of range are errors.
TEST(TransformerBlockStage, Pp2WithoutVirtualPipelineAndWholeModel) {
  const TransformerConfig cfg = with_layers(8);
  const BlockStage s0 = pipeline_stage(cfg, 2, std::nullopt, 0);
  const BlockStage s1 = pipeline_stage(cfg, 2, std::nullopt, 1);
  EXPECT_EQ(s0.num_layers, 4);
  EXPECT_EQ(s0.layer_offset, 0);
  EXPECT_FALSE(s0.post_process);
  EXPECT_EQ(s1.num_layers, 4);
  EXPECT_EQ(s1.layer_offset, 4);
  EXPECT_TRUE(s1.post_process);

  const BlockStage whole = whole_model_stage(cfg);
  EXPECT_EQ(whole.num_layers, 8);
  EXPECT_EQ(whole.layer_offset, 0);
  EXPECT_TRUE(whole.post_process);
  EXPECT_FALSE(whole.global_layer_number_in_attention);
  const BlockStage pp1 = pipeline_stage(cfg, 1, std::nullopt, 0);
  EXPECT_EQ(pp1.num_layers, 8);
  EXPECT_EQ(pp1.layer_offset, 0);
  EXPECT_TRUE(pp1.post_process);

  EXPECT_THROW(pipeline_stage(cfg, 2, std::nullopt, 2), Error);
  EXPECT_THROW(pipeline_stage(cfg, 2, std::nullopt, -1), Error);
  EXPECT_THROW(pipeline_stage(with_layers(16), 4, 2, 0, 2), Error);
}

// ---------------------------------------------------------------------------
// Forward.

// A 2-layer block = layer 0, then layer 1 (contexts "layers.<i>", layer
// numbers 1 and 2), then final_layernorm with the TE kernel, bitwise, in
// float64 and bf16. Zero-centered gamma makes the kernel visible in bf16: TE
// adds the 1 in fp32, the local (Apex) norm rounds weight + 1 to bf16.
TEST(TransformerBlock, EqualsLayersInSequenceThenTeFinalNorm) {
  TransformerConfig cfg = json_config(R"({"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2,
    "ffn_hidden_size": 12, "hidden_dropout": 0.1, "attention_dropout": 0.1,
    "layernorm_zero_centered_gamma": true})");
  LayerInputs in;
  in.b = 2;
  RunContext ctx;
  ctx.training = true;
  ctx.seed = 31;
  for (DType dtype : {DType::F64, DType::BF16}) {
    const MatMap w = model_weights(cfg, 31, dtype);
    const Mat x = rounded(random_normal(8, 8, 31, "x"), dtype);
    const Precision p = dtype == DType::F64 ? truth_precision() : emulated_precision(dtype, cfg);
    MatMap taps;
    const TransformerBlockForward f =
        transformer_block_forward(cfg, Params(w), x, in, whole_model_stage(cfg), p, ctx, Sink(taps));

    Mat hidden = x;
    for (int64_t i = 0; i < 2; ++i) {
      RunContext lc = ctx.sub(fmt::format("layers.{}", i));
      lc.layer_number = i + 1;
      const TransformerLayerForward lf =
          transformer_layer_forward(cfg, Params(w).sub(fmt::format("layers.{}", i)), hidden, in, p, lc);
      EXPECT_EQ(lf.output, f.layers[static_cast<size_t>(i)].output) << dtype_name(dtype) << " layer " << i;
      hidden = lf.output;
      EXPECT_EQ(taps.at(fmt::format("layers.{}", i)), hidden);
    }
    const NormForward te =
        norm_forward(cfg, Params(w).sub("final_layernorm"), hidden, p, NormKernel::kTransformerEngine);
    ASSERT_TRUE(f.final_layernorm.has_value());
    EXPECT_EQ(f.output, te.output) << dtype_name(dtype);
    EXPECT_EQ(taps.at("final_layernorm"), te.output);
    if (dtype == DType::BF16) {
      const NormForward apex = norm_forward(cfg, Params(w).sub("final_layernorm"), hidden, p, NormKernel::kApex);
      EXPECT_NE(f.output, apex.output);
    }
  }
}

// The final norm runs only with post_process and its weights: otherwise the
// output is the last layer's output (no final_layernorm tap).
TEST(TransformerBlock, FinalNormSkippedWithoutWeightsOrPostProcess) {
  const TransformerConfig cfg = json_config(kGpt);
  const MatMap model = model_weights(cfg, 37);
  const MatMap no_norm = stage_weights(model, 0, 4, false);
  LayerInputs in;
  in.b = 2;
  const Mat x = random_normal(6, 8, 37, "x");
  const BlockStage whole = whole_model_stage(cfg);
  const auto with = transformer_block_forward(cfg, Params(model), x, in, whole, truth_precision(), RunContext{});
  ASSERT_TRUE(with.final_layernorm.has_value());
  EXPECT_NE(with.output, with.layers.back().output);

  MatMap taps;
  const auto without = transformer_block_forward(cfg, Params(no_norm), x, in, whole, truth_precision(), RunContext{},
                                                 Sink(taps));
  EXPECT_FALSE(without.final_layernorm.has_value());
  EXPECT_EQ(without.output, without.layers.back().output);
  EXPECT_EQ(without.layers.back().output, with.layers.back().output);
  EXPECT_EQ(taps.count("final_layernorm"), 0u);

  BlockStage not_last = whole;
  not_last.post_process = false;
  const auto mid = transformer_block_forward(cfg, Params(model), x, in, not_last, truth_precision(), RunContext{});
  EXPECT_FALSE(mid.final_layernorm.has_value());
  EXPECT_EQ(mid.output, with.layers.back().output);
}

// 0.5.0: the attention of chunk-local layer i sees layer_number i + 1 (spec
// §8.3), so with query-key layer scaling a stage starting at global layer 5
// uses coefficients 1 and 2; global_layer_number_in_attention gives 5 and 6.
// In bf16 the two differ (the scaled scores round differently), and each
// equals the layer run with that number.
TEST(TransformerBlock, AttentionLayerNumbersAreStageLocal) {
  const TransformerConfig cfg = json_config(R"({"num_layers": 8, "hidden_size": 8, "num_attention_heads": 2,
    "ffn_hidden_size": 12, "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "apply_query_key_layer_scaling": true})");
  const MatMap model = model_weights(cfg, 41, DType::BF16);
  const MatMap w = stage_weights(model, 4, 2, false);
  const Precision p = emulated_precision(DType::BF16, cfg);
  LayerInputs in;
  in.b = 2;
  const Mat x = rounded(random_normal(16, 8, 41, "x"), DType::BF16);
  BlockStage stage = pipeline_stage(cfg, 2, 2, 0, 1);  // 8 layers, pp 2, vp 2: stage 0 chunk 1 = layers 5, 6
  ASSERT_EQ(stage.layer_offset, 4);
  ASSERT_EQ(stage.num_layers, 2);
  const auto local = transformer_block_forward(cfg, Params(w), x, in, stage, p, RunContext{});
  EXPECT_EQ(local.layers[0].self_attention->core.scale.coeff, std::optional<double>(1.0));
  EXPECT_EQ(local.layers[1].self_attention->core.scale.coeff, std::optional<double>(2.0));
  stage.global_layer_number_in_attention = true;
  const auto global = transformer_block_forward(cfg, Params(w), x, in, stage, p, RunContext{});
  EXPECT_EQ(global.layers[0].self_attention->core.scale.coeff, std::optional<double>(5.0));
  EXPECT_EQ(global.layers[1].self_attention->core.scale.coeff, std::optional<double>(6.0));
  EXPECT_NE(local.output, global.output);

  RunContext first = RunContext{}.sub("layers.4");
  first.layer_number = 5;
  EXPECT_EQ(transformer_layer_forward(cfg, Params(w).sub("layers.0"), x, in, p, first).output,
            global.layers[0].output);
  first.layer_number = 1;
  EXPECT_EQ(transformer_layer_forward(cfg, Params(w).sub("layers.0"), x, in, p, first).output,
            local.layers[0].output);
}

// Dropout masks are named by the global layer ("self_attn_bda.layers.<g>",
// "dropout.layers.<g>.self_attention.core_attention", ...): a 4-layer model in
// training with hidden and attention dropout equals, bitwise, its pipeline
// stages run one after another on stage-local weights — pp 2 (layers 0-1,
// 2-3) and pp 2 vp 2 (chunks in model order: layers 0, 1, 2, 3) — with the
// final norm on the last one only. Naming by the chunk-local index instead
// (layer_offset 0 on the second stage) draws other masks.
TEST(TransformerBlock, DropoutMasksUseTheGlobalLayerIndex) {
  const TransformerConfig cfg = json_config(R"({"num_layers": 4, "hidden_size": 8, "num_attention_heads": 2,
    "ffn_hidden_size": 12, "hidden_dropout": 0.3, "attention_dropout": 0.3})");
  const MatMap model = model_weights(cfg, 43);
  LayerInputs in;
  in.b = 2;
  const Mat x = random_normal(8, 8, 43, "x");
  RunContext ctx;
  ctx.training = true;
  ctx.seed = 2024;
  const Precision p = truth_precision();
  const auto whole = transformer_block_forward(cfg, Params(model), x, in, whole_model_stage(cfg), p, ctx);

  struct Chunk {
    int64_t pp_rank, vp_rank;
  };
  const std::vector<std::pair<std::optional<int64_t>, std::vector<Chunk>>> layouts = {
      {std::nullopt, {{0, 0}, {1, 0}}},
      {2, {{0, 0}, {1, 0}, {0, 1}, {1, 1}}},
  };
  for (const auto& [vp, order] : layouts) {
    Mat hidden = x;
    for (const Chunk& c : order) {
      const BlockStage s = pipeline_stage(cfg, 2, vp, c.pp_rank, c.vp_rank);
      const MatMap w = stage_weights(model, s.layer_offset, s.num_layers, s.post_process);
      hidden = transformer_block_forward(cfg, Params(w), hidden, in, s, p, ctx).output;
    }
    EXPECT_EQ(hidden, whole.output) << (vp ? "pp2 vp2" : "pp2");
  }

  // Negative control: the second pp-2 stage named as if it started at layer 0.
  const BlockStage s0 = pipeline_stage(cfg, 2, std::nullopt, 0);
  BlockStage s1 = pipeline_stage(cfg, 2, std::nullopt, 1);
  const Mat h0 = transformer_block_forward(cfg, Params(stage_weights(model, 0, 2, false)), x, in, s0, p, ctx).output;
  s1.layer_offset = 0;
  const Mat wrong =
      transformer_block_forward(cfg, Params(stage_weights(model, 2, 2, true)), h0, in, s1, p, ctx).output;
  EXPECT_NE(wrong, whole.output);
}

// ---------------------------------------------------------------------------
// Backward.

// The block backward is the final norm's backward (TE kernel) then the layer
// backwards from last to first, each on its own forward record, with the
// context gradients of the cross-attention layers summed: gradients bitwise,
// in training with dropout (a 2-layer encoder-decoder stage starting at
// global layer 3, so the RNG paths are layers.2 and layers.3).
TEST(TransformerBlock, BackwardEqualsChainedLayerBackwards) {
  const TransformerConfig cfg = json_config(R"({"num_layers": 4, "hidden_size": 8, "num_attention_heads": 2,
    "ffn_hidden_size": 12, "hidden_dropout": 0.2, "attention_dropout": 0.2, "normalization": "RMSNorm"})");
  MatMap w = stage_weights(model_weights(cfg, 47), 2, 2, true);
  for (int64_t i = 0; i < 2; ++i) {
    const std::string prefix = fmt::format("layers.{}.", i);
    w.merge(random_weights(module_params("cross_attention", cfg), prefix + "cross_attention.", 47 + i, DType::F64,
                           cfg.layernorm_zero_centered_gamma));
    w.merge(random_weights(module_params("rmsnorm", cfg), prefix + "pre_cross_attn_layernorm.", 47 + i, DType::F64,
                           cfg.layernorm_zero_centered_gamma));
  }
  LayerInputs in;
  in.b = 2;
  in.context = random_normal(6, 8, 47, "context");
  const Mat x = random_normal(8, 8, 47, "x");
  const Mat dy = random_normal(8, 8, 47, "dy");
  RunContext ctx;
  ctx.training = true;
  ctx.seed = 5;
  const Precision p = truth_precision();
  const BlockStage stage = pipeline_stage(cfg, 2, std::nullopt, 1);
  const auto f = transformer_block_forward(cfg, Params(w), x, in, stage, p, ctx);
  ASSERT_TRUE(f.final_layernorm.has_value());
  ASSERT_TRUE(f.layers[0].cross_attention.has_value());
  MatMap g_block;
  const TransformerLayerGrads gb = transformer_block_backward(cfg, Params(w), in, stage, f, dy, Sink(g_block), p);

  MatMap g_chain;
  Mat d = norm_backward(cfg, Params(w).sub("final_layernorm"), f.layers[1].output, *f.final_layernorm, dy,
                        Sink(g_chain).sub("final_layernorm"), p, NormKernel::kTransformerEngine);
  const TransformerLayerGrads g1 =
      transformer_layer_backward(cfg, Params(w).sub("layers.1"), in, f.layers[1], d, Sink(g_chain).sub("layers.1"), p);
  const TransformerLayerGrads g0 = transformer_layer_backward(cfg, Params(w).sub("layers.0"), in, f.layers[0],
                                                              g1.hidden_states, Sink(g_chain).sub("layers.0"), p);
  EXPECT_EQ(gb.hidden_states, g0.hidden_states);
  ASSERT_TRUE(gb.context && g0.context && g1.context);
  EXPECT_EQ(*gb.context, Mat(*g1.context + *g0.context));
  EXPECT_EQ(g_block.size(), w.size());  // a gradient for every weight
  EXPECT_TRUE(g_block == g_chain);

  // And the chain is the derivative (a few weights of each kind and the input).
  MatMap vars = w;
  vars["x"] = x;
  vars["context"] = *in.context;
  auto loss = [&](const MatMap& v) {
    LayerInputs li = in;
    li.context = v.at("context");
    return dot(transformer_block_forward(cfg, Params(v), v.at("x"), li, stage, p, ctx).output, dy);
  };
  MatMap analytic = g_block;
  analytic["x"] = gb.hidden_states;
  analytic["context"] = *gb.context;
  const GradcheckResult r =
      gradcheck(loss, vars, analytic, {.eps = 1e-6, .rtol = 1e-5, .atol = 1e-8, .max_elements_per_tensor = 3});
  EXPECT_TRUE(r.ok()) << r.describe();
}

TEST(TransformerBlock, TapsAndErrors) {
  const TransformerConfig cfg = json_config(kGpt);
  const MatMap w = model_weights(cfg, 53);
  LayerInputs in;
  in.b = 2;
  const Mat x = random_normal(6, 8, 53, "x");
  MatMap taps;
  const auto f = transformer_block_forward(cfg, Params(w), x, in, whole_model_stage(cfg), truth_precision(),
                                           RunContext{}, Sink(taps));
  for (int64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(taps.at(fmt::format("layers.{}", i)), f.layers[static_cast<size_t>(i)].output);
    EXPECT_EQ(taps.at(fmt::format("layers.{}.mlp_bda", i)), f.layers[static_cast<size_t>(i)].output);
    EXPECT_EQ(taps.at(fmt::format("layers.{}.input_layernorm", i)),
              f.layers[static_cast<size_t>(i)].input_layernorm->output);
  }
  EXPECT_EQ(taps.at("final_layernorm"), f.output);

  BlockStage empty;
  expect_error([&] { transformer_block_forward(cfg, Params(w), x, in, empty, truth_precision(), RunContext{}); },
               "at least one layer");
}

}  // namespace
}  // namespace paritron::ref
