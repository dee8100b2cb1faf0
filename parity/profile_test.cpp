// Profiles (parity/profile.h): the bundled ones load, their draws are valid
// and honour every constraint the profile states, an empty profile draws what
// no profile draws, and bad files fail with errors that say what is wrong.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "common/error.h"
#include "optimized/run_case.h"
#include "parity/expected.h"
#include "parity/generators.h"
#include "parity/profile.h"
#include "reference/make_case.h"

namespace paritron::parity {
namespace {

bool is_layer(const std::string& c) { return c == "transformer_layer" || c == "transformer_block"; }
bool has_attention(const std::string& c) {
  return c == "dot_product_attention" || c == "self_attention" || c == "cross_attention" || is_layer(c);
}

// Every constraint of `p` the spec breaks (empty: none).
std::vector<std::string> violations(const CaseSpec& s, const Profile& p) {
  std::vector<std::string> out;
  auto check = [&](const std::string& key, const ChoiceValue& v) {
    if (!p.allows(key, v)) out.push_back(key + " = " + choice_value_text(v));
  };
  auto in_range = [&](const std::string& key, int64_t v) {
    if (const IntRange* r = p.range(key); r != nullptr && !r->contains(v)) {
      out.push_back(key + " = " + std::to_string(v) + " outside [" + std::to_string(r->lo) + ", " +
                    std::to_string(r->hi) + "]");
    }
  };
  auto opt_value = [](const std::optional<double>& v) { return v ? ChoiceValue(*v) : ChoiceValue(); };
  const TransformerConfig& c = s.config;
  const ParallelConfig& l = s.layout;
  if (!p.allows_component(s.component)) out.push_back("component " + s.component);
  if (!p.allows_dtype(s.dtype)) out.push_back("dtype " + spec_dtype_name(s.dtype));
  if (p.max_world_size && l.world_size() > *p.max_world_size) out.push_back("world size");
  check("tp", l.tensor_model_parallel_size);
  check("pp", l.pipeline_model_parallel_size);
  check("cp", l.context_parallel_size);
  check("dp", l.data_parallel_size);
  check("ep", l.expert_model_parallel_size);
  if (l.tensor_model_parallel_size > 1 && l.expert_model_parallel_size == 1) check("sp", l.sequence_parallel);
  if (l.pipeline_model_parallel_size > 2) check("vp", l.virtual_pipeline_model_parallel_size.has_value());
  check("normalization", c.normalization);
  check("layernorm_zero_centered_gamma", c.layernorm_zero_centered_gamma);
  check("layernorm_epsilon", c.layernorm_epsilon);
  check("gated_linear_unit", c.gated_linear_unit);
  check("activation_func", c.activation_func);
  check("add_bias_linear", c.add_bias_linear);
  check("add_qkv_bias", c.add_qkv_bias);
  if ((c.activation_func == "gelu" && c.add_bias_linear) || (c.activation_func == "silu" && c.gated_linear_unit)) {
    check("bias_activation_fusion", c.bias_activation_fusion);
  }
  check("apply_query_key_layer_scaling", c.apply_query_key_layer_scaling);
  check("softmax_scale", opt_value(c.softmax_scale));
  check("init_method_std", c.init_method_std);
  check("rotary_percent", c.rotary_percent);
  check("rotary_interleaved", c.rotary_interleaved);
  check("kv_channels_explicit", c.kv_channels.has_value());
  check("ffn_hidden_size_4h", !c.ffn_hidden_size.has_value());
  if (c.hidden_dropout != 0) check("hidden_dropout", c.hidden_dropout);  // 0: token-coupled routers' rule
  if (c.attention_dropout != 0) check("attention_dropout", c.attention_dropout);
  if (s.dtype == DType::F8_E4M3) check("fp8", *c.fp8);
  const int64_t heads = c.num_attention_heads, groups = c.num_query_groups.value_or(heads);
  in_range("heads", heads);
  in_range("heads_per_group", heads / groups);
  in_range("kv_channels", c.kv_channels.value_or(c.hidden_size / heads));
  if (c.kv_channels) in_range("hidden_size", c.hidden_size);
  if (c.ffn_hidden_size) in_range("ffn_hidden_size", *c.ffn_hidden_size);
  in_range("num_layers", c.num_layers);
  in_range("seq", s.seq);
  in_range("batch", s.batch);
  if (is_layer(s.component)) check("moe", c.num_moe_experts.has_value());
  if (c.num_moe_experts) {
    in_range("experts", *c.num_moe_experts);
    in_range("topk", c.moe_router_topk);
    check("router", c.moe_router_load_balancing_type);
    if (c.moe_aux_loss_coeff != 0) check("moe_aux_loss_coeff", c.moe_aux_loss_coeff);
    check("moe_z_loss_coeff", opt_value(c.moe_z_loss_coeff));
    check("moe_input_jitter_eps", opt_value(c.moe_input_jitter_eps));
    check("moe_expert_capacity_factor", opt_value(c.moe_expert_capacity_factor));
    check("moe_router_pre_softmax", c.moe_router_pre_softmax);
    check("moe_ffn_hidden_size_explicit", c.moe_ffn_hidden_size.has_value());
    if (c.moe_ffn_hidden_size) in_range("moe_ffn_hidden_size", *c.moe_ffn_hidden_size);
  }
  if (has_attention(s.component)) {
    check("mask", s.mask_type);
    if (s.mask_type == "causal") check("explicit_mask", s.explicit_mask);
    if (s.component != "cross_attention") check("window", c.window_size.has_value());
  }
  if (s.component == "self_attention" || is_layer(s.component)) check("rotary", s.rotary);
  check("training", s.training);
  return out;
}

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += "\n  " + s;
  return out;
}

void expect_valid(const CaseSpec& spec) {
  SCOPED_TRACE(describe(spec));
  TransformerConfig cfg = spec.config;
  ASSERT_TRUE(check_config(cfg).empty());
  ASSERT_TRUE(spec.layout.check().empty());
  ASSERT_LE(spec.layout.world_size(), 8);
  ASSERT_TRUE(check_fits(spec.layout, spec.config).empty());
  ASSERT_TRUE(check_sequence_length(spec.layout, spec.seq).empty());
  const Case c = ref::make_case(make_options(spec));
  const std::vector<std::string> issues = opt::optimized_layout_issues(c, spec.layout);
  ASSERT_TRUE(issues.empty()) << joined(issues);
}

TEST(Profiles, BundledProfilesAreAvailable) {
  const std::vector<std::string> names = available_profiles();
  for (const char* n : {"gpt-like", "llama-like", "mixtral-like", "tiny"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n << " in " << profiles_dir();
  }
}

TEST(Profiles, EveryBundledProfileDrawsValidSpecsThatHonourIt) {
  for (const std::string& name : available_profiles()) {
    SCOPED_TRACE(name);
    const Profile p = load_profile(name);
    EXPECT_EQ(p.name, name);
    SpecFilter f;
    f.profile = p;
    std::set<std::string> components;
    for (uint64_t i = 0; i < 200; ++i) {
      const CaseSpec spec = draw_case_spec(case_seed(11, i), f);
      EXPECT_EQ(spec, draw_case_spec(case_seed(11, i), f));  // deterministic
      const std::vector<std::string> v = violations(spec, p);
      EXPECT_TRUE(v.empty()) << describe(spec) << joined(v);
      expect_valid(spec);
      components.insert(spec.component);
    }
    // the profile's components all come up (200 draws)
    if (!p.components.empty()) {
      EXPECT_EQ(components.size(), p.components.size());
    }
  }
}

TEST(Profiles, ProfilesShapeTheDistribution) {
  SpecFilter llama, mixtral, gpt;
  llama.profile = load_profile("llama-like");
  mixtral.profile = load_profile("mixtral-like");
  gpt.profile = load_profile("gpt-like");
  int gqa = 0, moe_layers = 0, layers = 0, mha = 0;
  for (uint64_t i = 0; i < 200; ++i) {
    const CaseSpec l = draw_case_spec(i, llama);
    gqa += l.config.num_query_groups.value_or(l.config.num_attention_heads) < l.config.num_attention_heads;
    const CaseSpec m = draw_case_spec(i, mixtral);
    if (is_layer(m.component)) {
      ++layers;
      moe_layers += m.config.num_moe_experts.has_value() && m.config.moe_router_topk == 2;
    }
    const CaseSpec g = draw_case_spec(i, gpt);
    mha += g.config.num_query_groups.value_or(g.config.num_attention_heads) == g.config.num_attention_heads;
  }
  EXPECT_EQ(gqa, 200);
  EXPECT_EQ(mha, 200);
  EXPECT_GT(layers, 20);
  EXPECT_EQ(moe_layers, layers);
}

// Earlier decisions are narrowed so that later lists stay reachable: tp 2
// only draws query groups that 2 divides, a kv_channels range only rotary
// percents whose head dimensions fit it.
TEST(Profiles, EarlierDecisionsKeepLaterListsReachable) {
  SpecFilter f;
  f.profile = parse_profile(R"({ "choices": { "tp": [2], "sp": [true] }, "ranges": { "kv_channels": [2, 4] } })",
                            "t.json", "t");
  for (uint64_t i = 0; i < 300; ++i) {
    const CaseSpec s = draw_case_spec(case_seed(4, i), f);
    EXPECT_EQ(s.layout.tensor_model_parallel_size, 2) << describe(s);
    EXPECT_TRUE(s.layout.sequence_parallel) << describe(s);
    EXPECT_TRUE(violations(s, *f.profile).empty()) << describe(s) << joined(violations(s, *f.profile));
    expect_valid(s);
  }
}

// A profile with no keys narrows nothing: the same draws as no profile.
TEST(Profiles, EmptyProfileDrawsWhatNoProfileDraws) {
  SpecFilter with;
  with.profile = parse_profile("{}", "empty", "empty");
  for (uint64_t i = 0; i < 500; ++i) EXPECT_EQ(draw_case_spec(case_seed(3, i), with), draw_case_spec(case_seed(3, i)));
}

// The command line's fixed values win over the profile.
TEST(Profiles, FilterWinsOverProfile) {
  SpecFilter f;
  f.profile = load_profile("llama-like");
  f.component = "cross_attention";  // not in llama-like
  f.layout = ParallelConfig::parse_layout("tp2");
  for (uint64_t i = 0; i < 50; ++i) {
    const CaseSpec s = draw_case_spec(i, f);
    EXPECT_EQ(s.component, "cross_attention");
    EXPECT_EQ(s.layout, *f.layout);
    EXPECT_EQ(s.config.normalization, "RMSNorm");
    expect_valid(s);
  }
  f.component.reset();
  f.layout = ParallelConfig::parse_layout("tp4-dp2-sp");
  for (uint64_t i = 0; i < 50; ++i) {
    const CaseSpec s = draw_case_spec(i, f);
    EXPECT_TRUE(violations(s, *f.profile).empty()) << describe(s) << joined(violations(s, *f.profile));
    expect_valid(s);
  }
}

RC_GTEST_PROP(Profiles, RapidCheckDrawsHonourTheProfile, ()) {
  static const Profile p = load_profile("mixtral-like");
  SpecFilter f;
  f.profile = p;
  const CaseSpec spec = *gen_case_spec(f);
  const std::vector<std::string> v = violations(spec, p);
  if (!v.empty()) RC_FAIL(describe(spec) + joined(v));
}

void expect_error(const std::string& text, const std::string& needle) {
  try {
    parse_profile(text, "test.json", "test");
    ADD_FAILURE() << "no error for " << text;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("test.json"), std::string::npos) << e.what();
  }
}

TEST(Profiles, BadFilesSayWhatIsWrong) {
  expect_error("{ \"name\": \"x\", ", "malformed JSON");
  expect_error("[1, 2]", "expected a JSON object");
  expect_error("{ \"nmae\": \"x\" }", "unknown key 'nmae'");
  expect_error("{ \"choices\": { \"normalisation\": [\"RMSNorm\"] } }", "unknown key 'normalisation'");
  expect_error("{ \"ranges\": { \"head\": [1, 2] } }", "unknown key 'head'");
  expect_error("{ \"choices\": { \"normalization\": [] } }", "empty list");
  expect_error("{ \"components\": [] }", "empty list");
  expect_error("{ \"choices\": { \"normalization\": [\"BatchNorm\"] } }", "not one of the generator's values");
  expect_error("{ \"choices\": { \"tp\": [3] } }", "not one of the generator's values");
  expect_error("{ \"choices\": { \"moe\": \"yes\" } }", "expected a list");
  expect_error("{ \"ranges\": { \"heads\": [1, 32] } }", "outside the generator's range [1, 8]");
  expect_error("{ \"ranges\": { \"heads\": [1, 16] } }", "\"large\": true allows up to 16");
  expect_error("{ \"ranges\": { \"heads\": [4, 2] } }", "lo 4 > hi 2");
  expect_error("{ \"ranges\": { \"seq\": [0, 4] } }", "outside the generator's range");
  expect_error("{ \"ranges\": { \"seq\": 4 } }", "expected [lo, hi]");
  expect_error("{ \"components\": [\"attention\"] }", "unknown component 'attention'");
  expect_error("{ \"dtypes\": [\"fp4\"] }", "unknown dtype 'fp4'");
  expect_error("{ \"max_world_size\": 0 }", "max_world_size");
  expect_error("{ \"large\": 1 }", "\"large\" must be true or false");
  // large: true widens the ranges
  EXPECT_NO_THROW(parse_profile("{ \"large\": true, \"ranges\": { \"heads\": [1, 16] } }", "t.json", "t"));
  // comments are allowed
  EXPECT_NO_THROW(parse_profile("{ // a comment\n \"choices\": { \"moe\": [false] } }", "t.json", "t"));
}

TEST(Profiles, UnknownNamesListTheAvailableOnes) {
  try {
    load_profile("llama");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("unknown profile 'llama'"), std::string::npos) << what;
    EXPECT_NE(what.find("llama-like"), std::string::npos) << what;
    EXPECT_NE(what.find("mixtral-like"), std::string::npos) << what;
  }
  EXPECT_THROW(load_profile("/nonexistent/profile.json"), Error);
}

TEST(Profiles, LoadsFromAPath) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "paritron_profile_test";
  std::filesystem::create_directories(dir);
  const std::filesystem::path file = dir / "mine.json";
  {
    std::ofstream out(file);
    out << R"({ "components": ["mlp"], "dtypes": ["bf16"], "choices": { "activation_func": ["silu"] } })";
  }
  const Profile p = load_profile(file.string());
  EXPECT_EQ(p.name, "mine");  // the file's stem
  EXPECT_EQ(p.source, file.string());
  SpecFilter f;
  f.profile = p;
  for (uint64_t i = 0; i < 20; ++i) {
    const CaseSpec s = draw_case_spec(i, f);
    EXPECT_EQ(s.component, "mlp");
    EXPECT_EQ(s.dtype, DType::BF16);
    EXPECT_EQ(s.config.activation_func, "silu");
  }
  {
    std::ofstream out(file);
    out << R"({ "choices": { "tp": [] } })";
  }
  EXPECT_THROW(load_profile(file.string()), Error);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace paritron::parity
