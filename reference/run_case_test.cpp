// The reference through its case-file entry point (run_case.h, make_case.h):
//  - central finite differences in float64 of the case-format loss
//    L = sum(output * grad_output) + sum(output_bias * grad_output_bias)
//        + aux_loss + z_loss
//    against grads.* for every component, including the whole layer and block
//    with every submodule variant (GQA, RoPE, SwiGLU, RMSNorm, MoE, cross
//    attention, padding masks with fully masked rows, dropout in training);
//  - cases written, read back and replayed pass, and injected faults fail.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <unistd.h>

#include "common/compare.h"
#include "common/transformer_config.h"
#include "reference/make_case.h"
#include "reference/run_case.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

const char* kGpt = R"({"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": 12,
  "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3})";
const char* kLlama = R"({"num_layers": 2, "hidden_size": 8, "num_attention_heads": 4, "num_query_groups": 2,
  "kv_channels": 3, "ffn_hidden_size": 6, "normalization": "RMSNorm", "activation_func": "silu",
  "gated_linear_unit": true, "add_bias_linear": false, "add_qkv_bias": true, "rotary_interleaved": true,
  "rotary_percent": 0.67, "layernorm_zero_centered_gamma": true, "apply_query_key_layer_scaling": true,
  "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3})";
const char* kMoe = R"({"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": 6,
  "num_moe_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": 0.001,
  "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3})";
const char* kDropout = R"({"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": 12,
  "hidden_dropout": 0.25, "attention_dropout": 0.2, "init_method_std": 0.3})";

// The case-format loss of the reference's forward on `c`.
double case_loss(const Case& c) {
  ReferenceOptions forward;
  forward.backward = false;
  forward.forced_fp32 = false;  // the smooth float64 function
  const ReferenceResult r = run_reference(c, forward);
  auto dot = [&](const std::string& out, const std::string& grad) {
    auto o = r.tensors.find(out);
    auto g = c.tensors.find(grad);
    if (o == r.tensors.end() || g == c.tensors.end()) return 0.0;
    double sum = 0;
    for (int64_t i = 0; i < o->second.numel(); ++i) sum += o->second.get(i) * g->second.get(i);
    return sum;
  };
  const std::string main_output = c.component == "moe_router" ? "outputs.router_scores" : "outputs.output";
  double loss = dot(main_output, "inputs.grad_output") + dot("outputs.output_bias", "inputs.grad_output_bias");
  // The MoE losses of every MoE layer: a router or MoE-layer case reports them
  // as outputs, a layer or block as the routers' taps.
  const bool top_level = r.tensors.count("outputs.aux_loss") || r.tensors.count("outputs.z_loss");
  for (const auto& [name, t] : r.tensors) {
    const bool loss_name = name.ends_with(".aux_loss") || name.ends_with(".z_loss");
    const bool intermediate = name.rfind("outputs.intermediate.", 0) == 0;
    if (loss_name && intermediate != top_level) loss += t.get(0);
  }
  return loss;
}

bool differentiable(const std::string& name, const Tensor& t) {
  if (!is_floating(t.dtype())) return false;
  if (name.rfind("weights.", 0) == 0) return true;
  return name.rfind("inputs.", 0) == 0 && name.rfind("inputs.grad_", 0) != 0 && name != "inputs.rotary_pos_emb" &&
         name != "inputs.freqs";
}

// Finite differences of case_loss against the reference's backward in pure
// float64 math, on up to `per_tensor` elements of every weight and
// differentiable input.
void expect_gradients_match(const Case& made, int per_tensor = 6) {
  Case c = made;
  ReferenceOptions smooth;
  smooth.forced_fp32 = false;
  const ReferenceResult analytic_run = run_reference(made, smooth);
  int64_t checked = 0;
  for (const auto& [name, tensor] : made.tensors) {
    if (!differentiable(name, tensor)) continue;
    const std::string grad_name = "grads." + name;
    ASSERT_TRUE(made.tensors.count(grad_name)) << "no " << grad_name << " in a " << made.component << " case";
    auto grad = analytic_run.tensors.find(grad_name);
    ASSERT_NE(grad, analytic_run.tensors.end()) << grad_name << " not produced";
    const int64_t n = tensor.numel();
    const int64_t count = std::min<int64_t>(n, per_tensor);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = count == 1 ? 0 : k * (n - 1) / (count - 1);
      const double eps = 1e-6, original = tensor.get(i);
      c.tensors[name].set(i, original + eps);
      const double up = case_loss(c);
      c.tensors[name].set(i, original - eps);
      const double down = case_loss(c);
      c.tensors[name].set(i, original);
      const double fd = (up - down) / (2 * eps);
      const double analytic = grad->second.get(i);
      EXPECT_NEAR(fd, analytic, 1e-7 + 1e-5 * std::abs(analytic))
          << made.component << " " << grad_name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

MakeCaseOptions options(const std::string& component, const char* json) {
  MakeCaseOptions o;
  o.component = component;
  o.config = json_config(json);
  o.seed = 7;
  o.seq_length = 4;
  o.micro_batch_size = 2;
  return o;
}

TEST(RunCaseGradients, NormsRopeMlp) {
  for (const char* cfg : {kGpt, kLlama}) {
    const bool rms = json_config(cfg).normalization == "RMSNorm";
    expect_gradients_match(make_case(options(rms ? "rmsnorm" : "layernorm", cfg)));
    expect_gradients_match(make_case(options("mlp", cfg)));
    expect_gradients_match(make_case(options("rotary_pos_emb", cfg)));
  }
}

TEST(RunCaseGradients, Attention) {
  for (const char* cfg : {kGpt, kLlama}) {
    for (const char* mask : {"causal", "padding", "no_mask"}) {
      MakeCaseOptions o = options("dot_product_attention", cfg);
      o.attn_mask_type = mask;
      expect_gradients_match(make_case(o));
      o.component = "self_attention";
      o.rotary = true;
      expect_gradients_match(make_case(o));
    }
  }
  MakeCaseOptions cross = options("cross_attention", kGpt);
  cross.attn_mask_type = "padding";
  cross.kv_seq_length = 3;
  expect_gradients_match(make_case(cross));
}

TEST(RunCaseGradients, MoE) {
  expect_gradients_match(make_case(options("moe_router", kMoe)));
  expect_gradients_match(make_case(options("moe_layer", kMoe)));
}

TEST(RunCaseGradients, TransformerLayerVariants) {
  MakeCaseOptions gpt = options("transformer_layer", kGpt);
  expect_gradients_match(make_case(gpt));
  MakeCaseOptions llama = options("transformer_layer", kLlama);
  llama.rotary = true;
  llama.attn_mask_type = "padding";
  llama.layer_number = 3;
  expect_gradients_match(make_case(llama));
  expect_gradients_match(make_case(options("transformer_layer", kMoe)));
  MakeCaseOptions cross = options("transformer_layer", kGpt);
  cross.cross_attention = true;
  cross.kv_seq_length = 5;
  expect_gradients_match(make_case(cross));
  // Training with dropout: the masks are a pure function of (seed, path,
  // index), so the finite differences see the same masks as the backward.
  MakeCaseOptions train = options("transformer_layer", kDropout);
  train.training = true;
  expect_gradients_match(make_case(train));
}

TEST(RunCaseGradients, TransformerBlock) {
  MakeCaseOptions o = options("transformer_block", kLlama);
  o.rotary = true;
  expect_gradients_match(make_case(o), 4);
  expect_gradients_match(make_case(options("transformer_block", kMoe)), 4);
}

// Dropout really drops: a training-mode layer differs from eval, and the same
// seed gives the same bits.
TEST(RunCase, TrainingDropoutIsSeededAndActive) {
  MakeCaseOptions o = options("transformer_layer", kDropout);
  o.training = true;
  const Case a = make_case(o), b = make_case(o);
  EXPECT_TRUE(a.tensors.at("outputs.output").bitwise_equal(b.tensors.at("outputs.output")));
  o.training = false;
  const Case eval = make_case(o);
  const CompareReport r = compare("outputs.output", eval.tensors.at("outputs.output"), a.tensors.at("outputs.output"),
                                  {0, 1e-3});
  EXPECT_FALSE(r.ok());
}

// Every component's case survives a write and read, replays bit for bit, and
// a one-ulp-scale perturbation of any single output element is caught.
TEST(RunCase, RoundTripAndInjectedFaults) {
  const auto dir = std::filesystem::temp_directory_path() / ("paritron_run_case_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  for (const auto& [component, cfg] : std::vector<std::pair<std::string, const char*>>{
           {"layernorm", kGpt}, {"rmsnorm", kLlama}, {"mlp", kLlama}, {"self_attention", kLlama},
           {"cross_attention", kGpt}, {"dot_product_attention", kLlama}, {"moe_router", kMoe},
           {"moe_layer", kMoe}, {"transformer_layer", kMoe}, {"transformer_block", kLlama},
           {"rotary_pos_emb", kLlama}}) {
    MakeCaseOptions o = options(component, cfg);
    if (component == "cross_attention") o.attn_mask_type = "padding";
    const Case made = make_case(o);
    const auto path = dir / (component + ".safetensors");
    write_case(path, made);
    const Case read = read_case(path);
    const ReferenceResult r = run_reference(read);
    int64_t compared = 0;
    for (const auto& [name, expected] : read.tensors) {
      if (name.rfind("outputs.", 0) != 0 && name.rfind("grads.", 0) != 0) continue;
      ASSERT_TRUE(r.tensors.count(name)) << component << ": " << name << " not produced";
      EXPECT_TRUE(r.tensors.at(name).bitwise_equal(expected)) << component << ": " << name;
      ++compared;
      if (!is_floating(expected.dtype()) || expected.numel() == 0) continue;
      // A fault of 1e-6 relative in one element fails the F64 default tolerance.
      Tensor faulty = expected;
      int64_t i = expected.numel() / 2;
      while (i < expected.numel() && !std::isfinite(expected.get(i))) ++i;  // margins hold +inf (no decision)
      if (i == expected.numel()) continue;
      faulty.set(i, expected.get(i) * (1 + 1e-6) + 1e-6);
      const Tolerance tol = *read.tolerance_for(name, DType::F64);
      EXPECT_FALSE(compare(name, faulty, r.tensors.at(name), tol).ok()) << component << ": " << name;
    }
    EXPECT_GT(compared, 1) << component;
  }
  std::filesystem::remove_all(dir);
}

// Emulated precisions run the same code: F32 is close to the truth, BF16
// further, and neither is bit-identical to it.
TEST(RunCase, EmulatedPrecisionErrorGrowsAsPrecisionShrinks) {
  MakeCaseOptions o = options("transformer_layer", kLlama);
  o.rotary = true;
  const Case c = make_case(o);
  auto max_error = [&](DType dtype) {
    ReferenceOptions ro;
    ro.dtype = dtype;
    const ReferenceResult r = run_reference(c, ro);
    return compare("outputs.output", c.tensors.at("outputs.output"), r.tensors.at("outputs.output"), {}).max_abs_error;
  };
  const double f32 = max_error(DType::F32), bf16 = max_error(DType::BF16), f16 = max_error(DType::F16);
  EXPECT_GT(f32, 0.0);
  EXPECT_LT(f32, 1e-5);
  EXPECT_GT(bf16, 10 * f32);
  EXPECT_LT(bf16, 0.1);
  EXPECT_GT(f16, f32);
  EXPECT_LT(f16, bf16);
}

TEST(RunCase, BadInputIsAClearError) {
  Case c = make_case(options("mlp", kGpt));
  c.tensors.erase("weights.linear_fc1.weight");
  try {
    run_reference(c);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("linear_fc1.weight"), std::string::npos) << e.what();
  }
  Case wrong = make_case(options("layernorm", kGpt));
  wrong.tensors["inputs.hidden_states"] = Tensor(DType::F64, {4, 2, 5});
  EXPECT_THROW(run_reference(wrong), Error);
  MakeCaseOptions bad = options("moe_layer", kGpt);
  EXPECT_THROW(make_case(bad), Error);  // no experts in the config

  // Weights are checked against the parameter catalogue: a key the component
  // does not have, a bias the config leaves out, a width the config does not
  // give, and a weight of the wrong rank are errors, never silently ignored.
  auto error_of = [](const Case& broken) {
    try {
      run_reference(broken);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  Case unknown = make_case(options("mlp", kGpt));
  unknown.tensors["weights.linear_fc1.layer_norm_weight"] = Tensor(DType::F64, {8});
  EXPECT_NE(error_of(unknown).find("weights.linear_fc1.layer_norm_weight is not a parameter of mlp"), std::string::npos)
      << error_of(unknown);
  Case stray_bias = make_case(options("mlp", kLlama));  // add_bias_linear false
  stray_bias.tensors["weights.linear_fc2.bias"] = Tensor(DType::F64, {8});
  EXPECT_NE(error_of(stray_bias).find("weights.linear_fc2.bias is not a parameter"), std::string::npos);
  Case narrow = make_case(options("mlp", kGpt));  // ffn_hidden_size 12
  narrow.tensors["weights.linear_fc1.weight"] = Tensor(DType::F64, {10, 8});
  EXPECT_NE(error_of(narrow).find("weights.linear_fc1.weight has shape [10, 8], the config gives [12, 8]"),
            std::string::npos)
      << error_of(narrow);
  Case rank = make_case(options("layernorm", kGpt));
  rank.tensors["weights.bias"] = Tensor(DType::F64, {1, 8});
  EXPECT_NE(error_of(rank).find("weights.bias has shape [1, 8], the config gives [8]"), std::string::npos);
}

}  // namespace
}  // namespace paritron::ref
