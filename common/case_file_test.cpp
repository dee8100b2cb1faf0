// Case files (common/case_file.h) against shared/spec/case-format.md: the
// layernorm case Python wrote (fixtures/safetensors/python_layernorm_case,
// values stated in make_python_files.py) reads to exactly its values; cases
// round-trip through our writer (ours_layernorm_case.safetensors is committed
// and checked by check_python_reads.py); every metadata and naming rule is
// enforced with a message naming the file; tolerance_for follows
// "Comparison".
//
// PARITRON_UPDATE_FIXTURES=1 rewrites ours_layernorm_case.safetensors instead
// of comparing.
#include "common/case_file.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "common/error.h"

namespace paritron {
namespace {

const std::filesystem::path kFixtures = std::filesystem::path(PARITRON_SOURCE_DIR) / "fixtures/safetensors";
constexpr std::string_view kConfig = R"({"num_layers": 1, "hidden_size": 4, "num_attention_heads": 1})";

std::vector<std::byte> read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(chars.size());
  std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

// A minimal valid case file: a layernorm with one input.
SafetensorsFile base_file() {
  SafetensorsFile file;
  file.metadata = {{"component", "layernorm"}, {"config", std::string(kConfig)}};
  file.tensors.emplace_back("inputs.hidden_states", Tensor(DType::F32, {1, 1, 4}));
  return file;
}

SafetensorsFile with_metadata(const std::string& key, const std::string& value) {
  SafetensorsFile file = base_file();
  file.metadata[key] = value;
  return file;
}

SafetensorsFile without_metadata(const std::string& key) {
  SafetensorsFile file = base_file();
  file.metadata.erase(key);
  return file;
}

// case_from_safetensors must throw CaseFormatError naming the file and `problem`.
void expect_case_rejected(const SafetensorsFile& file, std::string_view problem) {
  try {
    case_from_safetensors(file, "bad_case.safetensors");
    ADD_FAILURE() << "accepted a case that should fail with: " << problem;
  } catch (const CaseFormatError& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.rfind("bad_case.safetensors: ", 0), 0u) << message;
    EXPECT_NE(message.find(problem), std::string::npos) << "message: " << message << "\nwanted: " << problem;
  }
}

void expect_write_refused(const Case& c, std::string_view problem) {
  try {
    case_to_safetensors(c);
    ADD_FAILURE() << "wrote a case that should fail with: " << problem;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(problem), std::string::npos) << e.what() << "\nwanted: " << problem;
  }
}

void expect_same_case(const Case& a, const Case& b) {
  EXPECT_EQ(a.component, b.component);
  EXPECT_TRUE(a.config == b.config);
  EXPECT_EQ(a.layer_number, b.layer_number);
  EXPECT_EQ(a.attn_mask_type, b.attn_mask_type);
  EXPECT_EQ(a.training, b.training);
  EXPECT_EQ(a.seed, b.seed);
  EXPECT_EQ(a.producer, b.producer);
  EXPECT_EQ(a.description, b.description);
  ASSERT_EQ(a.tolerance.size(), b.tolerance.size());
  for (const auto& [key, t] : a.tolerance) {
    ASSERT_TRUE(b.tolerance.count(key)) << key;
    EXPECT_EQ(t.rtol, b.tolerance.at(key).rtol) << key;
    EXPECT_EQ(t.atol, b.tolerance.at(key).atol) << key;
  }
  EXPECT_EQ(a.parallel, b.parallel);
  EXPECT_EQ(a.other_metadata, b.other_metadata);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, tensor] : a.tensors) {
    ASSERT_TRUE(b.tensors.count(name)) << name;
    EXPECT_TRUE(tensor.bitwise_equal(b.tensors.at(name))) << name;
  }
}

TEST(CaseFile, ComponentsAreTheContractsTable) {
  const std::vector<std::string_view> expected = {
      "layernorm", "rmsnorm", "rotary_pos_emb", "dot_product_attention", "self_attention", "cross_attention",
      "mlp", "moe_router", "moe_layer", "transformer_layer", "transformer_block"};
  EXPECT_EQ(case_components(), expected);
}

TEST(CaseFile, ReadsTheLayernormCasePythonWrote) {
  const Case c = read_case(kFixtures / "python_layernorm_case.safetensors");
  EXPECT_EQ(c.component, "layernorm");
  EXPECT_EQ(c.config.num_layers, 1);
  EXPECT_EQ(c.config.hidden_size, 4);
  EXPECT_EQ(c.config.num_attention_heads, 1);
  EXPECT_EQ(c.config.normalization, "LayerNorm");
  EXPECT_EQ(c.config.layernorm_epsilon, 1e-5);
  EXPECT_EQ(c.config_json,
            R"({"num_layers": 1, "hidden_size": 4, "num_attention_heads": 1, "normalization": "LayerNorm", )"
            R"("layernorm_epsilon": 1e-05})");
  EXPECT_EQ(c.layer_number, 1);
  EXPECT_EQ(c.attn_mask_type, "causal");
  EXPECT_FALSE(c.training);
  EXPECT_EQ(c.seed, 1234u);
  EXPECT_EQ(c.producer, "numpy float64 (fixtures/safetensors/make_python_files.py), rounded to float32");
  EXPECT_EQ(c.description, "arange inputs for the safetensors and case-file reader tests");
  ASSERT_EQ(c.tolerance.size(), 1u);
  EXPECT_EQ(c.tolerance.at("outputs.*").rtol, 1e-5);
  EXPECT_EQ(c.tolerance.at("outputs.*").atol, 1e-6);
  EXPECT_FALSE(c.parallel);
  ASSERT_EQ(c.other_metadata.size(), 1u);
  EXPECT_EQ(c.other_metadata.at("writer").rfind("safetensors ", 0), 0u);

  ASSERT_EQ(c.tensors.size(), 4u);
  const Tensor& weight = c.tensors.at("weights.weight");
  const Tensor& bias = c.tensors.at("weights.bias");
  const Tensor& x = c.tensors.at("inputs.hidden_states");
  const Tensor& y = c.tensors.at("outputs.output");
  EXPECT_EQ(weight.shape(), (Shape{4}));
  EXPECT_EQ(x.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(y.shape(), (Shape{2, 3, 4}));
  for (const Tensor* t : {&weight, &bias, &x, &y}) EXPECT_EQ(t->dtype(), DType::F32);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(weight.get(i), 1 + 0.25 * i);
    EXPECT_EQ(bias.get(i), 0.5 * i - 1);
  }
  for (int i = 0; i < 24; ++i) EXPECT_EQ(x.get(i), 0.125 * i - 1.5) << i;
  // The output is LayerNorm in float64 rounded to float32: recomputed here it
  // agrees to float32's last bit (numpy may sum in another order).
  for (int row = 0; row < 6; ++row) {
    double mean = 0, var = 0;
    for (int i = 0; i < 4; ++i) mean += x.get(row * 4 + i) / 4;
    for (int i = 0; i < 4; ++i) var += std::pow(x.get(row * 4 + i) - mean, 2) / 4;
    for (int i = 0; i < 4; ++i) {
      const double expected = (x.get(row * 4 + i) - mean) / std::sqrt(var + 1e-5) * weight.get(i) + bias.get(i);
      EXPECT_NEAR(y.get(row * 4 + i), expected, std::abs(expected) * 0x1p-23 + 1e-12) << row << "," << i;
    }
  }

  // tolerance_for: the file's "outputs.*" entry, else the dtype defaults.
  const auto out_tol = c.tolerance_for("outputs.output", DType::F32);
  ASSERT_TRUE(out_tol);
  EXPECT_EQ(out_tol->rtol, 1e-5);
  EXPECT_EQ(out_tol->atol, 1e-6);
  const auto weight_tol = c.tolerance_for("weights.weight", DType::F32);
  ASSERT_TRUE(weight_tol);
  EXPECT_EQ(weight_tol->atol, 1e-5);
}

TEST(CaseFile, RoundTripKeepsEverythingAndMatchesTheCommittedFile) {
  const Case c = read_case(kFixtures / "python_layernorm_case.safetensors");
  const auto bytes = serialize_safetensors(case_to_safetensors(c));
  EXPECT_TRUE(serialize_safetensors(case_to_safetensors(c)) == bytes);
  const Case back = case_from_safetensors(parse_safetensors(bytes), "ours");
  expect_same_case(c, back);
  EXPECT_EQ(back.config_json, c.config_json) << "the config text is kept byte for byte";

  const auto path = kFixtures / "ours_layernorm_case.safetensors";
  if (const char* update = std::getenv("PARITRON_UPDATE_FIXTURES"); update && std::string(update) == "1") {
    write_case(path, c);
  } else {
    EXPECT_TRUE(read_bytes(path) == bytes)
        << path << " differs from what the writer produces now; if intended, rerun with "
        << "PARITRON_UPDATE_FIXTURES=1 and then fixtures/safetensors/check_python_reads.py";
  }
}

TEST(CaseFile, EveryFieldRoundTrips) {
  Case c;
  c.component = "self_attention";
  c.config.num_layers = 2;
  c.config.hidden_size = 8;
  c.config.num_attention_heads = 2;
  c.config.num_query_groups = 1;
  c.layer_number = 2;
  c.attn_mask_type = "no_mask";
  c.training = true;
  c.seed = std::numeric_limits<uint64_t>::max();
  c.producer = "paritron test";
  c.description = "every field \xe2\x9c\x93";
  c.tolerance = {{"*", {1e-3, 1e-4}}, {"outputs.output", {0.0, 0.5}}, {"grads.*", {1.0 / 3, 1e-300}}};
  c.parallel = R"({"tensor_model_parallel_size": 2, "sequence_parallel": true})";
  c.other_metadata = {{"x-note", "kept"}, {"empty", ""}};
  c.tensors.emplace("inputs.hidden_states", Tensor::from_values(DType::BF16, {2, 1, 8}, std::vector<double>(16, 0.5)));
  c.tensors.emplace("inputs.attention_mask", Tensor(DType::BOOL, {1, 1, 2, 2}));
  c.tensors.emplace("outputs.output", Tensor(DType::F64, {2, 1, 8}));
  c.tensors.emplace("outputs.intermediate.self_attention.core_attention.query", Tensor(DType::F16, {2, 1, 2, 4}));
  c.tensors.emplace("grads.weights.linear_qkv.weight", Tensor(DType::F32, {16, 8}));
  c.tensors.emplace("weights.linear_qkv.weight", Tensor(DType::F8_E4M3, {16, 8}));

  const auto dir = std::filesystem::temp_directory_path() /
                   ("paritron_case_file_test_" + std::to_string(std::random_device{}()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "case.safetensors";
  write_case(path, c);
  const Case back = read_case(path);
  std::filesystem::remove_all(dir);

  // The config was written from the struct (config_json was empty) and read
  // back validated, with Megatron's derived defaults filled in.
  EXPECT_EQ(back.config.hidden_size, 8);
  EXPECT_EQ(back.config.num_query_groups, 1);
  EXPECT_EQ(back.config.kv_channels, 4);
  EXPECT_FALSE(back.config_json.empty());
  Case expected = c;
  expected.config = back.config;
  expect_same_case(back, expected);

  // Defaults are left out of the file.
  Case minimal;
  minimal.component = "mlp";
  minimal.config_json = std::string(kConfig);
  minimal.config = back.config;  // stale: the struct wins over the text
  const auto metadata = case_to_safetensors(minimal).metadata;
  EXPECT_EQ(metadata.size(), 2u);
  EXPECT_NE(metadata.at("config"), kConfig);
  EXPECT_TRUE(case_from_safetensors(case_to_safetensors(minimal), "m").config == back.config);
}

TEST(CaseFile, ToleranceForPicksTheLongestMatchingKey) {
  Case c;
  c.tolerance = {{"*", {1, 1}}, {"outputs.*", {2, 2}}, {"outputs.outpu*", {3, 3}}, {"outputs.output", {4, 4}},
                 {"grads.weights.router.weight", {5, 5}}};
  EXPECT_EQ(c.tolerance_for("outputs.output", DType::F32)->rtol, 4);  // exact beats a pattern of equal length
  EXPECT_EQ(c.tolerance_for("outputs.output_bias", DType::F32)->rtol, 3);
  EXPECT_EQ(c.tolerance_for("outputs.router_indices", DType::I64)->rtol, 0);  // integers: always exact
  EXPECT_EQ(c.tolerance_for("outputs.router_indices", DType::F32)->rtol, 2);
  EXPECT_EQ(c.tolerance_for("grads.weights.router.weight", DType::F64)->rtol, 5);
  EXPECT_EQ(c.tolerance_for("grads.inputs.hidden_states", DType::BF16)->rtol, 1);

  const Case defaults;
  EXPECT_EQ(defaults.tolerance_for("outputs.output", DType::F64)->rtol, 1e-9);
  EXPECT_EQ(defaults.tolerance_for("outputs.output", DType::F64)->atol, 1e-9);
  EXPECT_EQ(defaults.tolerance_for("outputs.output", DType::F32)->rtol, 1e-5);
  EXPECT_EQ(defaults.tolerance_for("outputs.output", DType::F32)->atol, 1e-5);
  for (DType d : {DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2}) {
    EXPECT_FALSE(defaults.tolerance_for("outputs.output", d)) << dtype_name(d);
  }
  for (DType d : {DType::I64, DType::I32, DType::I8, DType::U8, DType::BOOL}) {
    const auto t = defaults.tolerance_for("outputs.router_indices", d);
    ASSERT_TRUE(t) << dtype_name(d);
    EXPECT_EQ(t->rtol, 0.0);
    EXPECT_EQ(t->atol, 0.0);
  }
  Case only_prefix;
  only_prefix.tolerance = {{"outputs.output", {7, 7}}};
  EXPECT_EQ(only_prefix.tolerance_for("outputs.output_bias", DType::F32)->rtol, 1e-5);  // names match exactly
}

// ---------------------------------------------------------------------------
// Malformed cases: each rule, each with its message.

TEST(CaseFileRejects, MissingOrUnknownComponent) {
  expect_case_rejected(without_metadata("component"), "metadata has no \"component\" (one of layernorm, rmsnorm,");
  expect_case_rejected(with_metadata("component", "attention"),
                       "unknown component \"attention\" (one of layernorm, rmsnorm, rotary_pos_emb");
  expect_case_rejected(with_metadata("component", "LayerNorm"), "unknown component \"LayerNorm\"");
  SafetensorsFile no_metadata = base_file();
  no_metadata.metadata.clear();
  expect_case_rejected(no_metadata, "metadata has no \"component\"");
}

TEST(CaseFileRejects, MissingOrMalformedConfig) {
  expect_case_rejected(without_metadata("config"), "metadata has no \"config\"");
  expect_case_rejected(with_metadata("config", "{"), "metadata \"config\" is not valid JSON");
  expect_case_rejected(with_metadata("config", ""), "metadata \"config\" is not valid JSON");
  expect_case_rejected(with_metadata("config", std::string("{}\0x", 4)), "NUL byte");
  expect_case_rejected(with_metadata("config", "[1]"), "metadata \"config\" is not a JSON object");
  expect_case_rejected(with_metadata("config", R"({"num_layers": 1, "hidden_size": 4, "hidden_size": 8, "num_attention_heads": 1})"),
                       "metadata \"config\" has the key \"hidden_size\" twice");
}

TEST(CaseFileRejects, InvalidConfigNamesTheFileAndCarriesTheConfigError) {
  expect_case_rejected(with_metadata("config", R"({"num_layers": 1, "hidden_size": 4, "num_attention_heads": 1, "no_such_field": 1})"),
                       "invalid config:");
  expect_case_rejected(with_metadata("config", R"({"num_layers": 1, "hidden_size": 4, "num_attention_heads": 1, "no_such_field": 1})"),
                       "no_such_field");
  const auto bad_rule = with_metadata(
      "config", R"({"num_layers": 1, "hidden_size": 4, "num_attention_heads": 1, "tensor_model_parallel_size": 3})");
  expect_case_rejected(bad_rule, "tensor_model_parallel_size");
  try {
    case_from_safetensors(bad_rule, "bad_case.safetensors");
    ADD_FAILURE();
  } catch (const CaseFormatError& e) {
    try {
      std::rethrow_if_nested(e);
      ADD_FAILURE() << "no nested ConfigError";
    } catch (const ConfigError& config_error) {
      ASSERT_FALSE(config_error.issues().empty());
    }
  }
}

TEST(CaseFileRejects, BadOptionalValues) {
  for (const char* v : {"0", "-1", "1.0", "", " 1", "1 ", "+1", "abc", "99999999999999999999"}) {
    expect_case_rejected(with_metadata("layer_number", v),
                         fmt::format("metadata \"layer_number\" is \"{}\": must be a positive decimal integer", v));
  }
  expect_case_rejected(with_metadata("attn_mask_type", "arbitrary"),
                       "metadata \"attn_mask_type\" is \"arbitrary\": must be causal, padding or no_mask");
  for (const char* v : {"True", "1", "", "yes"}) {
    expect_case_rejected(with_metadata("training", v), "metadata \"training\" is \"" + std::string(v) + "\": must be true or false");
  }
  for (const char* v : {"-1", "18446744073709551616", "0x10", "", "1e3"}) {
    expect_case_rejected(with_metadata("seed", v), "metadata \"seed\" is \"" + std::string(v) + "\": must be a decimal integer");
  }
  expect_case_rejected(with_metadata("parallel", "tp=2"), "metadata \"parallel\" is not valid JSON");
  expect_case_rejected(with_metadata("parallel", "[2]"), "metadata \"parallel\" is not a JSON object");
  expect_case_rejected(with_metadata("parallel", R"({"a":1,"a":2})"), "metadata \"parallel\" has the key \"a\" twice");
  expect_case_rejected(with_metadata("parallel", R"({"tp":"x"})"), "metadata \"parallel\" is not a valid layout: ");
  expect_case_rejected(with_metadata("parallel", R"({"tensor_model_parallel_size":1,"sequence_parallel":true})"),
                       "sequence_parallel");
  EXPECT_NO_THROW(case_from_safetensors(with_metadata("parallel", R"({"tensor_model_parallel_size":2,"data_parallel_size":2})"), "ok"));
}

TEST(CaseFileRejects, BadTolerance) {
  auto tolerance = [](const std::string& v) { return with_metadata("tolerance", v); };
  expect_case_rejected(tolerance("1e-5"), "metadata \"tolerance\" is not a JSON object of tensor name or pattern");
  expect_case_rejected(tolerance("{"), "metadata \"tolerance\" is not valid JSON");
  expect_case_rejected(tolerance(R"({"outputs.output": 1e-5})"),
                       "metadata \"tolerance\" entry \"outputs.output\" is not an object {\"rtol\": r, \"atol\": a}");
  expect_case_rejected(tolerance(R"({"outputs.output": {"rtol": 1e-5}})"), "entry \"outputs.output\" has no \"atol\"");
  expect_case_rejected(tolerance(R"({"outputs.output": {"rtol": -1, "atol": 0}})"),
                       "entry \"outputs.output\": rtol is -1, not a finite number >= 0");
  expect_case_rejected(tolerance(R"({"outputs.output": {"rtol": "1e-5", "atol": 0}})"), "rtol is \"1e-5\"");
  expect_case_rejected(tolerance(R"({"outputs.output": {"rtol": 0, "atol": null}})"), "atol is null");
  expect_case_rejected(tolerance(R"({"outputs.output": {"rtol": 0, "atol": 0, "ulp": 1}})"),
                       "has the unexpected key \"ulp\" (it takes rtol and atol)");
  expect_case_rejected(tolerance(R"({"outputs.*.weight": {"rtol": 0, "atol": 0}})"),
                       "entry \"outputs.*.weight\": '*' may only end a pattern");
  expect_case_rejected(tolerance(R"({"": {"rtol": 0, "atol": 0}})"), "an empty key matches no tensor");
  expect_case_rejected(tolerance(R"({"*": {"rtol": 0, "atol": 0}, "*": {"rtol": 1, "atol": 1}})"),
                       "metadata \"tolerance\" has the key \"*\" twice");
}

TEST(CaseFileRejects, TensorNamesOutsideTheFourGroups) {
  for (const char* name : {"hidden_states", "weights.", "Weights.x", "output.output", "grads", "", "grads.bogus",
                           "grads.inputs.", "grads.output"}) {
    SafetensorsFile file = base_file();
    file.tensors.emplace_back(name, Tensor());
    expect_case_rejected(file, "tensor name \"" + std::string(name) + "\": ");
  }
  SafetensorsFile file = base_file();
  file.tensors.emplace_back("outputs.output", Tensor());
  file.tensors.emplace_back("outputs.output", Tensor());
  expect_case_rejected(file, "duplicate tensor name \"outputs.output\"");
}

TEST(CaseFileRejects, ReadCaseNamesTheFile) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("paritron_case_file_reject_" + std::to_string(std::random_device{}()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "broken.safetensors";
  write_safetensors(path, with_metadata("config", R"({"num_layers": 1, "hidden_size": 4, "num_attention_heads": 1, "no_such_field": 1})"));
  try {
    read_case(path);
    ADD_FAILURE();
  } catch (const CaseFormatError& e) {
    EXPECT_EQ(std::string(e.what()).rfind(path.string() + ": invalid config", 0), 0u) << e.what();
  }
  std::ofstream(path, std::ios::binary) << "garbage";
  try {
    read_case(path);
    ADD_FAILURE();
  } catch (const CaseFormatError& e) {
    EXPECT_EQ(std::string(e.what()).rfind(path.string() + ": file is 7 bytes", 0), 0u) << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(CaseFile, WriterRefusesCasesThatWouldNotReadBack) {
  Case c;
  c.component = "layernorm";
  c.config_json = std::string(kConfig);
  c.config = case_from_safetensors(base_file(), "base").config;
  EXPECT_NO_THROW(case_to_safetensors(c));

  Case bad = c;
  bad.component = "attention";
  expect_write_refused(bad, "unknown component \"attention\"");
  bad = c;
  bad.other_metadata = {{"component", "mlp"}};
  expect_write_refused(bad, "other_metadata holds \"component\", a key the case format defines");
  bad = c;
  bad.tensors.emplace("hidden_states", Tensor());
  expect_write_refused(bad, "tensor name \"hidden_states\": must start with weights.");
  bad = c;
  bad.tolerance = {{"a*b", {0, 0}}};
  expect_write_refused(bad, "'*' may only end a pattern");
  bad = c;
  bad.tolerance = {{"*", {std::nan(""), 0}}};
  expect_write_refused(bad, "must be finite and >= 0");
  bad = c;
  bad.parallel = "[]";
  expect_write_refused(bad, "metadata \"parallel\" is not a JSON object");
  bad = c;
  bad.layer_number = 0;
  expect_write_refused(bad, "layer_number");
  bad = c;
  bad.attn_mask_type = "arbitrary";
  expect_write_refused(bad, "attn_mask_type");
  bad = c;
  bad.config_json.clear();
  bad.config.tensor_model_parallel_size = 3;
  expect_write_refused(bad, "invalid config");
}

}  // namespace
}  // namespace paritron
