// The optimized side's dot_product_attention, rotary_pos_emb and
// cross_attention (as components, and inside encoder-decoder layers and
// blocks) against the reference, through case files, under parallel layouts.
//
// Float64 runs match the float64 truth within 3e-6 relative (the CPU
// attention kernel and RoPE's cos/sin are fp32 even there); float32 runs
// within 1e-4. A sharding bug (a wrong head slice, a missing all-gather of
// the context, a chunk out of order) shows as an O(1) mismatch.
#include <gtest/gtest.h>

#include <cmath>
#include <fmt/format.h>

#include "common/error.h"
#include "common/transformer_config.h"
#include "optimized/run_case.h"
#include "optimized/test_util.h"
#include "reference/make_case.h"
#include "reference/run_case.h"

namespace paritron::opt {
namespace {

const char* kGpt = R"({"num_layers": 4, "hidden_size": 16, "num_attention_heads": 4, "ffn_hidden_size": 24,
  "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3})";
// Grouped-query attention, kv_channels != h / np, interleaved RoPE, layer scaling.
const char* kGqa = R"({"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "num_query_groups": 2,
  "kv_channels": 6, "ffn_hidden_size": 10, "normalization": "RMSNorm", "activation_func": "silu",
  "gated_linear_unit": true, "add_bias_linear": false, "rotary_interleaved": true,
  "apply_query_key_layer_scaling": true, "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3})";
// Cross attention needs np == ng; kv_channels 6 makes the [k_j | v_j] split visible.
const char* kCross = R"({"num_layers": 4, "hidden_size": 16, "num_attention_heads": 4, "kv_channels": 6,
  "ffn_hidden_size": 24, "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3})";
const char* kCrossRms = R"({"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "ffn_hidden_size": 12,
  "normalization": "RMSNorm", "add_bias_linear": false, "activation_func": "silu", "gated_linear_unit": true,
  "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3})";
const char* kDropout = R"({"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "ffn_hidden_size": 24,
  "hidden_dropout": 0.25, "attention_dropout": 0.2, "init_method_std": 0.3})";

TransformerConfig config(const char* json) { return config_from_json_text(json).config; }

struct Setup {
  std::string component;
  const char* config;
  std::string layout;
  int64_t s = 8, b = 2, sk = 0;  // sk 0: = s
  std::string mask = {};         // causal | padding | no_mask; empty: the module's default
  bool cross = false, rotary = false, training = false, explicit_mask = false;
};

Case make(const Setup& u) {
  ref::MakeCaseOptions o;
  o.component = u.component;
  o.config = config(u.config);
  o.seq_length = u.s;
  o.kv_seq_length = u.sk;
  o.micro_batch_size = u.b;
  o.attn_mask_type = u.mask;
  o.cross_attention = u.cross;
  o.rotary = u.rotary;
  o.training = u.training;
  o.explicit_mask = u.explicit_mask;
  o.seed = 11;
  o.taps = false;
  return ref::make_case(o);
}

void check(const Setup& u, DType dtype = DType::F64) {
  const Case c = make(u);
  const ParallelConfig pc = ParallelConfig::parse_layout(u.layout);
  OptimizedOptions o;
  o.dtype = dtype;
  const OptimizedResult got = run_optimized(c, pc, o);
  const ref::ReferenceResult want = ref::run_reference(c);
  test_util::expect_matches(got.tensors, want.tensors, dtype == DType::F64 ? 3e-6 : 1e-4,
                            fmt::format("{} on {} in {}", u.component, u.layout, dtype_name(dtype)));
}

// The layout is refused before any rank runs, with a message containing `why`.
void expect_refused(const Setup& u, const std::string& why) {
  const Case c = make(u);
  try {
    run_optimized(c, ParallelConfig::parse_layout(u.layout), {});
    ADD_FAILURE() << u.component << " on " << u.layout << " ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
  }
}

TEST(OptimizedComponents, DotProductAttention) {
  check({"dot_product_attention", kGpt, "tp1"});
  check({"dot_product_attention", kGpt, "tp2"});                       // heads split over TP
  check({"dot_product_attention", kGpt, "dp2"});                       // batch split
  check({"dot_product_attention", kGpt, "cp2"});                       // causal: chunks r, 2cp-1-r, K/V gathered
  check({"dot_product_attention", kGqa, "tp2", 8, 2});                 // GQA: one group per TP rank
  check({"dot_product_attention", kGqa, "cp2-tp2-dp2", 8, 2});
  check({"dot_product_attention", kGpt, "tp2-dp2", 8, 2, 6, "padding"});  // sq != sk, padding mask
  check({"dot_product_attention", kGpt, "cp2-dp2", 8, 2, 0, "padding"});
  check({"dot_product_attention", kGpt, "tp2-sp", 8, 2, 0, "causal", false, false, false, /*explicit_mask=*/true});
  check({"dot_product_attention", kGpt, "tp2", 8, 2, 5, "no_mask"});
}

TEST(OptimizedComponents, DotProductAttentionDropout) {
  // The probabilities' dropout draws are keyed "dropout.core_attention" by global element.
  check({"dot_product_attention", kDropout, "tp2-dp2", 8, 2, 0, "", false, false, /*training=*/true});
  check({"dot_product_attention", kDropout, "cp2", 8, 2, 0, "", false, false, true});
  // A self_attention case's core attention draws under the same path.
  check({"self_attention", kDropout, "tp2-cp2", 8, 2, 0, "", false, false, true});
}

TEST(OptimizedComponents, RotaryPosEmb) {
  check({"rotary_pos_emb", kGpt, "dp2"});
  check({"rotary_pos_emb", kGpt, "tp2"});
  check({"rotary_pos_emb", kGqa, "tp2-cp2", 8, 2});  // interleaved, rot_dim = hn; CP positions
  check({"rotary_pos_emb", kGqa, "tp4-dp2", 8, 2});
}

TEST(OptimizedComponents, CrossAttention) {
  check({"cross_attention", kCross, "tp1", 8, 2, 6});
  check({"cross_attention", kCross, "tp2", 8, 2, 6});     // linear_kv rows: whole heads [k_j | v_j]
  check({"cross_attention", kCross, "tp2-sp", 8, 2, 6});  // context sequence-parallel too
  check({"cross_attention", kCross, "dp2", 8, 2, 6});
  check({"cross_attention", kCrossRms, "tp4-dp2-sp", 8, 2, 4});
  check({"cross_attention", kCross, "tp2-dp2", 8, 2, 6, "no_mask"});
}

TEST(OptimizedComponents, CrossAttentionDropout) {
  check({"cross_attention", kDropout, "tp2-dp2-sp", 8, 2, 6, "", false, false, /*training=*/true});
}

TEST(OptimizedComponents, TransformerLayerWithCrossAttention) {
  check({"transformer_layer", kCross, "tp2-dp2", 8, 2, 6, "", /*cross=*/true});
  check({"transformer_layer", kCross, "tp2-dp2", 8, 2, 6, "padding", true});  // self and context masks
  check({"transformer_layer", kCrossRms, "tp2-sp", 8, 2, 4, "", true, /*rotary=*/true});
  check({"transformer_layer", kDropout, "tp2-dp2-sp", 8, 2, 6, "", true, false, /*training=*/true});
}

// Submodules without parameters are IdentityOp: a norm alone returns the
// normed input with no residual (reference/transformer_layer.cpp).
TEST(OptimizedComponents, NormsOfIdentitySubmodules) {
  for (const std::string module : {"cross_attention.", "self_attention.", "mlp."}) {
    Case c = make({"transformer_layer", kCross, "tp2-dp2", 8, 2, 6, "", /*cross=*/true});
    for (auto it = c.tensors.begin(); it != c.tensors.end();) {
      const bool drop = it->first.rfind("weights." + module, 0) == 0 || it->first.rfind("outputs.", 0) == 0 ||
                        it->first.rfind("grads.", 0) == 0;
      it = drop ? c.tensors.erase(it) : std::next(it);
    }
    for (const char* layout : {"tp2-dp2", "tp2-sp"}) {
      const OptimizedResult got = run_optimized(c, ParallelConfig::parse_layout(layout), {.dtype = DType::F64});
      test_util::expect_matches(got.tensors, ref::run_reference(c).tensors, 3e-6,
                                fmt::format("layer without {} on {}", module, layout));
    }
  }
}

TEST(OptimizedComponents, TransformerBlockWithCrossAttention) {
  check({"transformer_block", kCross, "pp2", 8, 2, 6, "", /*cross=*/true});
  check({"transformer_block", kCross, "tp2-pp2-dp2-sp", 8, 4, 6, "padding", true});
}

TEST(OptimizedComponents, Float32) {
  check({"dot_product_attention", kGqa, "tp2-cp2", 8, 2}, DType::F32);
  check({"rotary_pos_emb", kGqa, "tp2-dp2", 8, 2}, DType::F32);
  check({"cross_attention", kCross, "tp2-sp", 8, 2, 6}, DType::F32);
  check({"transformer_layer", kCross, "tp2-dp2", 8, 2, 6, "padding", true}, DType::F32);
}

TEST(OptimizedComponents, RefusalsAreExplained) {
  expect_refused({"dot_product_attention", kGpt, "cp2", 8, 2, 6, "padding"}, "needs sq == sk");
  expect_refused({"cross_attention", kCross, "cp2", 8, 2, 6}, "not run under context parallelism");
  expect_refused({"transformer_layer", kCross, "cp2", 8, 2, 6, "", true}, "not run under context parallelism");
  expect_refused({"cross_attention", kCross, "tp2-sp", 8, 2, 5}, "sk must be divisible by tp");
}

}  // namespace
}  // namespace paritron::opt
