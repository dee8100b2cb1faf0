// Tests of reference/transformer_layer (spec §8.1-8.3, §14 #19, #21): a
// hand-computable layer (h = 2, one token per sequence, identity-like weights)
// showing the residual is each sub-block's pre-norm input and the
// linear_proj / fc2 biases are added by bias-dropout-add, the unused
// apply_residual_connection_post_layernorm, IdentityOp submodules (no
// self_attention weights, a pre-cross norm without cross attention, absent
// cross attention as an exact no-op), layer_spec_for, the documented taps,
// the layer number reaching the attention, a MoE layer equal to
// moe_layer_forward + bda (forward and backward), finite differences of the
// identity variants, and the missing-context error. Whole-layer gradients of
// the full GPT / cross-attention layers are in run_case_test.cpp.
#include "reference/transformer_layer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/module_params.h"
#include "common/transformer_config.h"
#include "reference/gradcheck.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

double max_abs_diff(const Mat& a, const Mat& b) { return (a - b).cwiseAbs().maxCoeff(); }

// A GPT layer's weights plus, with cross, a pre-cross-attention LayerNorm and
// a cross attention (the encoder-decoder layer).
MatMap layer_weights(const TransformerConfig& cfg, uint64_t seed, bool cross, DType dtype = DType::F64) {
  MatMap w = random_weights(module_params("transformer_layer", cfg), "", seed, dtype);
  if (cross) {
    w.merge(random_weights(module_params("cross_attention", cfg), "cross_attention.", seed, dtype));
    w.merge(random_weights(module_params("layernorm", cfg), "pre_cross_attn_layernorm.", seed, dtype));
  }
  return w;
}

MatMap without_prefix(MatMap w, const std::string& prefix) {
  std::erase_if(w, [&](const auto& kv) { return kv.first.rfind(prefix, 0) == 0; });
  return w;
}

const char* kGpt = R"({"num_layers": 4, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": 12,
  "hidden_dropout": 0.0, "attention_dropout": 0.0})";

// ---------------------------------------------------------------------------
// The hand-computable layer.
//
// h = 2, one head with hn = 2, ffn 2 (relu), biases on, LayerNorm (eps 1e-5)
// with weight 1 and bias 0. s = 1, b = 2: two tokens, each its own sequence,
// so the softmax is over one key and the probabilities are exactly 1.
//   linear_qkv = [q rows 0; k rows 0; v rows I], bias 0  -> v = a, context = a
//   linear_proj = 2 I, bias pb = [0.5, -0.25]            -> o = 2a (pb returned)
//   linear_fc1 = I, bias 0; relu; linear_fc2 = 3 I, bias fb = [1, 2].
// x = [[3, 1], [0, 2]]. LayerNorm of [u + d, u - d] is [d, -d] / sqrt(d^2 + eps):
//   n = 1 / sqrt(1 + eps): a = input_layernorm(x) = [[n, -n], [-n, n]];
//   after self attention (residual = x, the pre-norm input):
//     y = x + 2a + pb = [[3.5 + 2n, 0.75 - 2n], [0.5 - 2n, 1.75 + 2n]];
//   pre_mlp_layernorm(y): token 0 d0 = 1.375 + 2n, token 1 d1 = -(0.625 + 2n):
//     m0 = d0 / sqrt(d0^2 + eps), m1 = |d1| / sqrt(d1^2 + eps):
//     [[m0, -m0], [-m1, m1]] -> relu -> [[m0, 0], [0, m1]] -> fc2 = [[3 m0, 0], [0, 3 m1]];
//   output = y + fc2 + fb = [[4.5 + 2n + 3 m0, 2.75 - 2n], [1.5 - 2n, 3.75 + 2n + 3 m1]].
// With the residual taken after the norm (the tempting mistake) the first
// output would be 3a + pb + ... instead, e.g. token 0 column 1 = -3n - 0.25 + ...

constexpr double kEps = 1e-5;

TransformerConfig hand_config() {
  TransformerConfig c;
  c.num_layers = 1;
  c.hidden_size = 2;
  c.num_attention_heads = 1;
  c.kv_channels = 2;
  c.ffn_hidden_size = 2;
  c.activation_func = "relu";
  c.hidden_dropout = 0.0;
  c.attention_dropout = 0.0;
  c.layernorm_epsilon = kEps;
  return c;
}

MatMap hand_weights() {
  return MatMap{{"input_layernorm.weight", mat(1, 2, {1, 1})},
                {"input_layernorm.bias", mat(1, 2, {0, 0})},
                {"self_attention.linear_qkv.weight", mat(6, 2, {0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1})},
                {"self_attention.linear_qkv.bias", Mat::Zero(1, 6)},
                {"self_attention.linear_proj.weight", mat(2, 2, {2, 0, 0, 2})},
                {"self_attention.linear_proj.bias", mat(1, 2, {0.5, -0.25})},
                {"pre_mlp_layernorm.weight", mat(1, 2, {1, 1})},
                {"pre_mlp_layernorm.bias", mat(1, 2, {0, 0})},
                {"mlp.linear_fc1.weight", mat(2, 2, {1, 0, 0, 1})},
                {"mlp.linear_fc1.bias", mat(1, 2, {0, 0})},
                {"mlp.linear_fc2.weight", mat(2, 2, {3, 0, 0, 3})},
                {"mlp.linear_fc2.bias", mat(1, 2, {1, 2})}};
}

const Mat kHandX = mat(2, 2, {3, 1, 0, 2});

LayerInputs hand_inputs() {
  LayerInputs in;
  in.b = 2;  // s = 1
  return in;
}

TEST(TransformerLayer, HandComputedResidualIsThePreNormInput) {
  const TransformerConfig cfg = hand_config();
  const MatMap w = hand_weights();
  const TransformerLayerForward f =
      transformer_layer_forward(cfg, Params(w), kHandX, hand_inputs(), truth_precision(), RunContext{});
  const double n = 1 / std::sqrt(1 + kEps);
  const double d0 = 1.375 + 2 * n, d1 = 0.625 + 2 * n;
  const double m0 = d0 / std::sqrt(d0 * d0 + kEps), m1 = d1 / std::sqrt(d1 * d1 + kEps);
  ASSERT_TRUE(f.input_layernorm && f.self_attention && f.mlp);
  EXPECT_LE(max_abs_diff(f.input_layernorm->output, mat(2, 2, {n, -n, -n, n})), 1e-15);
  // The sub-blocks return their output without the bias, and the bias apart.
  EXPECT_LE(max_abs_diff(f.self_attention->output, mat(2, 2, {2 * n, -2 * n, -2 * n, 2 * n})), 1e-15);
  ASSERT_TRUE(f.self_attention->output_bias.has_value());
  EXPECT_EQ(Mat(*f.self_attention->output_bias), mat(1, 2, {0.5, -0.25}));
  EXPECT_LE(max_abs_diff(f.after_self_attention, mat(2, 2, {3.5 + 2 * n, 0.75 - 2 * n, 0.5 - 2 * n, 1.75 + 2 * n})),
            1e-14);
  EXPECT_EQ(f.after_cross_attention, f.after_self_attention);  // no cross attention: exact no-op
  EXPECT_LE(max_abs_diff(f.pre_mlp_layernorm->output, mat(2, 2, {m0, -m0, -m1, m1})), 1e-14);
  EXPECT_LE(max_abs_diff(f.mlp->output, mat(2, 2, {3 * m0, 0, 0, 3 * m1})), 1e-14);
  ASSERT_TRUE(f.mlp->output_bias.has_value());
  EXPECT_EQ(Mat(*f.mlp->output_bias), mat(1, 2, {1, 2}));
  EXPECT_LE(max_abs_diff(f.output, mat(2, 2, {4.5 + 2 * n + 3 * m0, 2.75 - 2 * n, 1.5 - 2 * n, 3.75 + 2 * n + 3 * m1})),
            1e-13);
}

// Training with hidden_dropout = 0.5: each bda output is residual + (o + bias)
// * mask, mask 0 or 2 per element: the bias goes through the dropout with the
// sub-block output and the residual never does. The masks are the draws
// "self_attn_bda.<path>" and "mlp_bda.<path>".
TEST(TransformerLayer, BiasIsAddedInsideBiasDropoutAdd) {
  TransformerConfig cfg = hand_config();
  cfg.hidden_dropout = 0.5;
  const MatMap w = hand_weights();
  RunContext ctx;
  ctx.training = true;
  ctx.seed = 21;
  ctx.path = "layers.0";
  const TransformerLayerForward f =
      transformer_layer_forward(cfg, Params(w), kHandX, hand_inputs(), truth_precision(), ctx);
  const Mat& s1 = f.self_attn_bda->dropout_scale;
  const Mat o1 = f.self_attention->output.rowwise() + mat(1, 2, {0.5, -0.25}).row(0);
  EXPECT_EQ(f.after_self_attention, Mat(kHandX + o1.cwiseProduct(s1)));
  const Mat& s2 = f.mlp_bda->dropout_scale;
  const Mat o2 = f.mlp->output.rowwise() + mat(1, 2, {1, 2}).row(0);
  EXPECT_EQ(f.output, Mat(f.after_self_attention + o2.cwiseProduct(s2)));
  Mat expected_s1, expected_s2;
  dropout(Mat::Ones(2, 2), 0.5, ctx, "self_attn_bda", &expected_s1);
  dropout(Mat::Ones(2, 2), 0.5, ctx, "mlp_bda", &expected_s2);
  EXPECT_EQ(s1, expected_s1);
  EXPECT_EQ(s2, expected_s2);
}

// Spec §14 #21: megatron/core 0.5.0 never reads
// apply_residual_connection_post_layernorm, so the flag changes nothing
// (forward bitwise, backward bitwise), here on a random GPT layer too.
TEST(TransformerLayer, ApplyResidualConnectionPostLayernormChangesNothing) {
  for (bool hand : {true, false}) {
    TransformerConfig cfg = hand ? hand_config() : json_config(kGpt);
    const MatMap w = hand ? hand_weights() : layer_weights(cfg, 3, false);
    LayerInputs in = hand_inputs();
    const Mat x = hand ? kHandX : random_normal(6, 8, 3, "x");
    const Mat dy = random_normal(x.rows(), x.cols(), 3, "dy");
    const auto before = transformer_layer_forward(cfg, Params(w), x, in, truth_precision(), RunContext{});
    MatMap g_before;
    const auto d_before = transformer_layer_backward(cfg, Params(w), in, before, dy, Sink(g_before), truth_precision());
    cfg.apply_residual_connection_post_layernorm = true;
    const auto after = transformer_layer_forward(cfg, Params(w), x, in, truth_precision(), RunContext{});
    MatMap g_after;
    const auto d_after = transformer_layer_backward(cfg, Params(w), in, after, dy, Sink(g_after), truth_precision());
    EXPECT_EQ(after.output, before.output) << hand;
    EXPECT_EQ(d_after.hidden_states, d_before.hidden_states) << hand;
    EXPECT_TRUE(g_after == g_before) << hand;
  }
}

// IdentityOp self attention (no self_attention weights) with the input norm
// present: the attention "output" is the normed input and the identity bda
// returns it, no residual added (spec §8.1). Then the MLP block as usual:
//   a = [[n, -n], [-n, n]]; pre_mlp_layernorm(a) = [[m, -m], [-m, m]] with
//   m = n / sqrt(n^2 + eps); relu/fc2: [[3m, 0], [0, 3m]] + fb;
//   output = a + that = [[n + 3m + 1, 2 - n], [1 - n, n + 3m + 2]]
// (with the residual x added it would be larger by x = [[3, 1], [0, 2]]).
TEST(TransformerLayer, IdentitySelfAttentionPassesTheNormedInputThrough) {
  const TransformerConfig cfg = hand_config();
  const MatMap w = without_prefix(hand_weights(), "self_attention.");
  MatMap taps;
  const TransformerLayerForward f =
      transformer_layer_forward(cfg, Params(w), kHandX, hand_inputs(), truth_precision(), RunContext{}, Sink(taps));
  EXPECT_FALSE(f.spec.self_attention);
  EXPECT_FALSE(f.self_attention.has_value());
  EXPECT_FALSE(f.self_attn_bda.has_value());
  ASSERT_TRUE(f.input_layernorm.has_value());
  EXPECT_EQ(f.after_self_attention, f.input_layernorm->output);
  const double n = 1 / std::sqrt(1 + kEps), m = n / std::sqrt(n * n + kEps);
  EXPECT_LE(max_abs_diff(f.output, mat(2, 2, {n + 3 * m + 1, 2 - n, 1 - n, n + 3 * m + 2})), 1e-14);
  EXPECT_EQ(taps.count("self_attn_bda") + taps.count("self_attention.output"), 0u);
  EXPECT_EQ(taps.count("input_layernorm"), 1u);

  // Neither norm nor attention: the block is the identity on x.
  const MatMap bare = without_prefix(w, "input_layernorm.");
  const auto g = transformer_layer_forward(cfg, Params(bare), kHandX, hand_inputs(), truth_precision(), RunContext{});
  EXPECT_EQ(g.after_self_attention, kHandX);
  EXPECT_FALSE(g.input_layernorm.has_value());
}

// No cross-attention weights: the cross block is an exact no-op even when a
// context is passed (IdentityOp + IdentityFuncOp: the residual is not added a
// second time), there are no cross taps and no context gradient. A
// pre_cross_attn_layernorm without cross attention replaces the hidden state
// by its norm (IdentityOp returns the normed tensor, identity bda passes it):
// for the hand layer it is [[m0, -m0], [-m1, m1]] of the first test.
TEST(TransformerLayer, AbsentCrossAttentionIsAnExactNoOp) {
  const TransformerConfig cfg = json_config(kGpt);
  const MatMap w = layer_weights(cfg, 5, false);
  const Mat x = random_normal(6, 8, 5, "x");
  LayerInputs in;
  in.b = 2;
  MatMap taps;
  const auto plain = transformer_layer_forward(cfg, Params(w), x, in, truth_precision(), RunContext{}, Sink(taps));
  EXPECT_EQ(plain.after_cross_attention, plain.after_self_attention);
  EXPECT_FALSE(plain.cross_attention.has_value() || plain.pre_cross_attn_layernorm.has_value());
  for (const auto& [name, value] : taps) EXPECT_EQ(name.find("cross"), std::string::npos) << name;

  LayerInputs with_context = in;
  with_context.context = random_normal(4, 8, 5, "context");
  const auto f = transformer_layer_forward(cfg, Params(w), x, with_context, truth_precision(), RunContext{});
  EXPECT_EQ(f.output, plain.output);
  const Mat dy = random_normal(6, 8, 5, "dy");
  MatMap g1, g2;
  const auto d1 = transformer_layer_backward(cfg, Params(w), in, plain, dy, Sink(g1), truth_precision());
  const auto d2 = transformer_layer_backward(cfg, Params(w), with_context, f, dy, Sink(g2), truth_precision());
  EXPECT_EQ(d1.hidden_states, d2.hidden_states);
  EXPECT_FALSE(d2.context.has_value());
  EXPECT_TRUE(g1 == g2);

  // A pre-cross norm alone (hand layer).
  MatMap hw = hand_weights();
  hw["pre_cross_attn_layernorm.weight"] = mat(1, 2, {1, 1});
  hw["pre_cross_attn_layernorm.bias"] = mat(1, 2, {0, 0});
  const auto h = transformer_layer_forward(hand_config(), Params(hw), kHandX, hand_inputs(), truth_precision(),
                                           RunContext{});
  const double n = 1 / std::sqrt(1 + kEps);
  const double d0 = 1.375 + 2 * n, d1v = 0.625 + 2 * n;
  const double m0 = d0 / std::sqrt(d0 * d0 + kEps), m1 = d1v / std::sqrt(d1v * d1v + kEps);
  EXPECT_FALSE(h.spec.cross_attention);
  EXPECT_TRUE(h.spec.pre_cross_attn_layernorm);
  EXPECT_LE(max_abs_diff(h.after_cross_attention, mat(2, 2, {m0, -m0, -m1, m1})), 1e-14);
}

// layer_spec_for reads the submodules off the parameters under the view's
// prefix: a module counts when one of its weight keys is present.
TEST(TransformerLayer, LayerSpecForReadsTheParameters) {
  const MatMap none;
  const LayerSpec empty = layer_spec_for(Params(none));
  EXPECT_FALSE(empty.input_layernorm || empty.self_attention || empty.pre_cross_attn_layernorm ||
               empty.cross_attention || empty.pre_mlp_layernorm || empty.mlp);

  const TransformerConfig cfg = json_config(kGpt);
  MatMap gpt = random_weights(module_params("transformer_layer", cfg), "layers.3.", 1);
  const LayerSpec s = layer_spec_for(Params(gpt).sub("layers.3"));
  EXPECT_TRUE(s.input_layernorm && s.self_attention && s.pre_mlp_layernorm && s.mlp);
  EXPECT_FALSE(s.pre_cross_attn_layernorm || s.cross_attention);
  const LayerSpec wrong_prefix = layer_spec_for(Params(gpt).sub("layers.2"));
  EXPECT_FALSE(wrong_prefix.input_layernorm || wrong_prefix.self_attention || wrong_prefix.mlp);

  // One weight key is enough; a norm counts by its weight, not its bias.
  const MatMap parts{{"self_attention.linear_proj.weight", Mat::Ones(1, 1)},
                     {"cross_attention.linear_kv.weight", Mat::Ones(1, 1)},
                     {"mlp.router.weight", Mat::Ones(1, 1)},
                     {"input_layernorm.bias", Mat::Ones(1, 1)},
                     {"pre_cross_attn_layernorm.weight", Mat::Ones(1, 1)}};
  const LayerSpec p = layer_spec_for(Params(parts));
  EXPECT_TRUE(p.self_attention && p.cross_attention && p.mlp && p.pre_cross_attn_layernorm);
  EXPECT_FALSE(p.input_layernorm || p.pre_mlp_layernorm);
  const MatMap q{{"cross_attention.linear_q.weight", Mat::Ones(1, 1)}, {"mlp.linear_fc1.weight", Mat::Ones(1, 1)}};
  EXPECT_TRUE(layer_spec_for(Params(q)).cross_attention);
  EXPECT_TRUE(layer_spec_for(Params(q)).mlp);
}

// Every documented tap of a full encoder-decoder layer, under its name and
// holding the matching forward value; the attention modules see ctx's layer
// number (layer scaling on: coeff = 3 in both).
TEST(TransformerLayer, TapsUnderTheDocumentedNames) {
  TransformerConfig cfg = json_config(R"({"num_layers": 4, "hidden_size": 8, "num_attention_heads": 2,
    "ffn_hidden_size": 12, "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "apply_query_key_layer_scaling": true})");
  const MatMap w = layer_weights(cfg, 9, true);
  const Mat x = random_normal(6, 8, 9, "x");
  LayerInputs in;
  in.b = 2;
  in.context = random_normal(8, 8, 9, "context");  // sk = 4
  RunContext ctx;
  ctx.layer_number = 3;
  MatMap taps;
  const auto f = transformer_layer_forward(cfg, Params(w), x, in, truth_precision(), ctx, Sink(taps).sub("layers.2"));
  ASSERT_TRUE(f.spec.cross_attention && f.cross_attention && f.pre_cross_attn_layernorm);
  auto tap = [&](const std::string& name) -> const Mat& {
    static const Mat kMissing(0, 0);
    auto it = taps.find("layers.2." + name);
    if (it == taps.end()) {
      ADD_FAILURE() << "no tap " << name;
      return kMissing;
    }
    return it->second;
  };
  EXPECT_EQ(tap("input_layernorm"), f.input_layernorm->output);
  EXPECT_EQ(tap("self_attention.output"), f.self_attention->output);
  EXPECT_EQ(tap("self_attention.output_bias"), Mat(*f.self_attention->output_bias));
  EXPECT_EQ(tap("self_attention.core_attention.query"), f.self_attention->query);
  EXPECT_EQ(tap("self_attention.core_attention.key"), f.self_attention->key);
  EXPECT_EQ(tap("self_attention.core_attention.value"), f.self_attention->value);
  EXPECT_EQ(tap("self_attention.core_attention.output"), f.self_attention->core.output);
  EXPECT_EQ(tap("self_attn_bda"), f.after_self_attention);
  EXPECT_EQ(tap("pre_cross_attn_layernorm"), f.pre_cross_attn_layernorm->output);
  EXPECT_EQ(tap("cross_attention.output"), f.cross_attention->output);
  EXPECT_EQ(tap("cross_attn_bda"), f.after_cross_attention);
  EXPECT_EQ(tap("pre_mlp_layernorm"), f.pre_mlp_layernorm->output);
  EXPECT_EQ(tap("mlp.output"), f.mlp->output);
  EXPECT_EQ(tap("mlp.output_bias"), Mat(*f.mlp->output_bias));
  EXPECT_EQ(tap("mlp_bda"), f.output);
  EXPECT_EQ(f.self_attention->core.scale.coeff, std::optional<double>(3.0));
  EXPECT_EQ(f.cross_attention->core.scale.coeff, std::optional<double>(3.0));
  for (const auto& [name, value] : taps) EXPECT_EQ(name.rfind("layers.2.", 0), 0u) << name;
}

// The layer number reaches the attention: with apply_query_key_layer_scaling
// layer 3 divides the scores by sqrt(hn) * 3 and the softmax multiplies by 3
// again (spec §3, §14 #9), which cancels in exact arithmetic (float64: equal
// to layer 1 within 1e-12) but rounds differently when the scores are
// materialised in bf16 / fp16 (not bitwise equal).
TEST(TransformerLayer, LayerNumberReachesTheAttention) {
  const TransformerConfig cfg = json_config(R"({"num_layers": 4, "hidden_size": 8, "num_attention_heads": 2,
    "ffn_hidden_size": 12, "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "apply_query_key_layer_scaling": true})");
  LayerInputs in;
  in.b = 2;
  RunContext layer1, layer3;
  layer3.layer_number = 3;
  for (DType dtype : {DType::F64, DType::BF16, DType::F16}) {
    const MatMap w = layer_weights(cfg, 13, false, dtype);
    const Mat x = rounded(random_normal(16, 8, 13, "x"), dtype);  // s = 8
    const Precision p = dtype == DType::F64 ? truth_precision() : emulated_precision(dtype, cfg);
    const auto f1 = transformer_layer_forward(cfg, Params(w), x, in, p, layer1);
    const auto f3 = transformer_layer_forward(cfg, Params(w), x, in, p, layer3);
    EXPECT_EQ(f1.self_attention->core.scale.coeff, std::optional<double>(1.0));
    EXPECT_EQ(f3.self_attention->core.scale.coeff, std::optional<double>(3.0));
    if (dtype == DType::F64) {
      EXPECT_LE(max_abs_diff(f1.output, f3.output), 1e-12);
      EXPECT_LE(max_abs_diff(f1.self_attention->core.probs, f3.self_attention->core.probs), 1e-12);
    } else {
      EXPECT_NE(f1.output, f3.output) << dtype_name(dtype);
      EXPECT_LE(max_abs_diff(f1.output, f3.output), 0.05 * f1.output.cwiseAbs().maxCoeff()) << dtype_name(dtype);
    }
  }
}

// A MoE layer (cfg.num_moe_experts) is moe_layer_forward on the pre-MLP norm
// output, joined by mlp_bda with its [T, h] output_bias; in training with
// dropout, bitwise; the layer's backward is bda backward then
// moe_layer_backward (the MoE parameter gradients bitwise).
TEST(TransformerLayer, MoeLayerEqualsMoeLayerForwardPlusBda) {
  const TransformerConfig cfg = json_config(R"({"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2,
    "ffn_hidden_size": 6, "num_moe_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 0.01,
    "hidden_dropout": 0.3, "attention_dropout": 0.1})");
  const MatMap w = layer_weights(cfg, 17, false);
  const Mat x = random_normal(10, 8, 17, "x");
  LayerInputs in;
  in.b = 2;
  RunContext ctx;
  ctx.training = true;
  ctx.seed = 4;
  ctx.path = "layers.1";
  const Precision p = truth_precision();
  MatMap taps;
  const auto f = transformer_layer_forward(cfg, Params(w), x, in, p, ctx, Sink(taps));
  ASSERT_TRUE(f.moe.has_value());
  EXPECT_FALSE(f.mlp.has_value());
  const Mat& residual = f.after_cross_attention;
  const NormForward norm = norm_forward(cfg, Params(w).sub("pre_mlp_layernorm"), residual, p);
  EXPECT_EQ(norm.output, f.pre_mlp_layernorm->output);
  const MoeLayerForward moe = moe_layer_forward(cfg, Params(w).sub("mlp"), norm.output, p, ctx.sub("mlp"));
  ASSERT_TRUE(moe.output_bias.has_value());
  EXPECT_EQ(moe.output_bias->rows(), 10);  // a per-token bias
  const BiasDropoutAddForward bda =
      bias_dropout_add_forward(moe.output, moe.output_bias, residual, 0.3, ctx, "mlp_bda", p);
  EXPECT_EQ(f.moe->output, moe.output);
  EXPECT_EQ(f.output, bda.output);
  EXPECT_EQ(taps.at("mlp.output"), moe.output);
  EXPECT_EQ(taps.at("mlp.output_bias"), *moe.output_bias);
  EXPECT_GT((bda.dropout_scale.array() == 0.0).count(), 0);  // dropout really ran

  const Mat dy = random_normal(10, 8, 17, "dy");
  MatMap g_layer, g_moe;
  transformer_layer_backward(cfg, Params(w), in, f, dy, Sink(g_layer), p);
  const BiasDropoutAddGrads gb = bias_dropout_add_backward(bda, moe.output_bias, dy, p);
  moe_layer_backward(cfg, Params(w).sub("mlp"), norm.output, moe, gb.x, gb.bias, Sink(g_moe).sub("mlp"), p);
  int64_t compared = 0;
  for (const auto& [key, value] : g_moe) {
    ASSERT_TRUE(g_layer.count(key)) << key;
    EXPECT_EQ(g_layer.at(key), value) << key;
    ++compared;
  }
  EXPECT_GE(compared, 1 + 4 * 4);  // router + 4 experts x (fc1, fc2) x (weight, bias)
}

// Central differences over x and every weight of the identity variants the
// case-file tests do not build: IdentityOp attention, a pre-cross norm
// without cross attention, no norms at all, an IdentityOp MLP after its norm
// — in training with hidden dropout.
TEST(TransformerLayer, GradcheckIdentityVariants) {
  const TransformerConfig base = json_config(R"({"num_layers": 2, "hidden_size": 4, "num_attention_heads": 2,
    "ffn_hidden_size": 6, "hidden_dropout": 0.2, "attention_dropout": 0.0})");
  const MatMap full = layer_weights(base, 23, false);
  MatMap with_pre_cross = full;
  with_pre_cross.merge(random_weights(module_params("layernorm", base), "pre_cross_attn_layernorm.", 23));
  const std::vector<std::pair<std::string, MatMap>> variants = {
      {"identity attention", without_prefix(full, "self_attention.")},
      {"pre-cross norm only", with_pre_cross},
      {"no norms", without_prefix(without_prefix(full, "input_layernorm."), "pre_mlp_layernorm.")},
      {"identity mlp", without_prefix(full, "mlp.")},
  };
  LayerInputs in;
  in.b = 2;
  RunContext ctx;
  ctx.training = true;
  ctx.seed = 8;
  const Precision p = truth_precision();
  for (const auto& [name, weights] : variants) {
    MatMap vars = weights;
    vars["x"] = random_normal(6, 4, 23, "x");
    const Mat dy = random_normal(6, 4, 23, "dy");
    auto loss = [&](const MatMap& v) {
      return dot(transformer_layer_forward(base, Params(v), v.at("x"), in, p, ctx).output, dy);
    };
    const auto f = transformer_layer_forward(base, Params(vars), vars.at("x"), in, p, ctx);
    MatMap analytic;
    analytic["x"] = transformer_layer_backward(base, Params(vars), in, f, dy, Sink(analytic), p).hidden_states;
    const GradcheckResult r = gradcheck(loss, vars, analytic, {.eps = 1e-6, .rtol = 1e-5, .atol = 1e-8,
                                                                .max_elements_per_tensor = 12});
    EXPECT_TRUE(r.ok()) << name << ": " << r.describe();
  }
}

TEST(TransformerLayer, CrossAttentionWeightsWithoutContextIsAnError) {
  const TransformerConfig cfg = json_config(kGpt);
  const MatMap w = layer_weights(cfg, 2, true);
  LayerInputs in;
  in.b = 2;
  expect_error([&] { transformer_layer_forward(cfg, Params(w), random_normal(4, 8, 2, "x"), in, truth_precision(),
                                               RunContext{}); },
               "no context");
}

}  // namespace
}  // namespace paritron::ref
