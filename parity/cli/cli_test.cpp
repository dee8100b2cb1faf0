// The `paritron` command line as a user meets it: exit codes (0 ok, 2 bad
// input), help text, and messages that name the problem, run on the built
// binary against the committed fixtures.
#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "parity/cli/cli_test_util.h"

namespace {

using namespace paritron::cli_test_util;

TEST(Cli, HelpAndVersion) {
  const Result help = run("--help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.output.find("config"), std::string::npos);
  EXPECT_NE(help.output.find("Exit codes"), std::string::npos);
  for (const char* sub : {"config --help", "config validate --help", "case inspect --help", "version --help"}) {
    const Result r = run(sub);
    EXPECT_EQ(r.exit_code, 0) << sub;
    EXPECT_NE(r.output.find("Usage"), std::string::npos) << sub;
  }
  const Result version = run("version");
  EXPECT_EQ(version.exit_code, 0);
  EXPECT_NE(version.output.find("paritron "), std::string::npos);
  EXPECT_NE(version.output.find("CUDA"), std::string::npos);
}

TEST(Cli, UsageErrorsAreBadInput) {
  EXPECT_EQ(run("").exit_code, 2);
  EXPECT_EQ(run("frobnicate").exit_code, 2);
  EXPECT_EQ(run("config validate").exit_code, 2);  // missing file argument
  EXPECT_EQ(run("case inspect a b").exit_code, 2);
}

TEST(Cli, ConfigValidatePrintsTheNormalisedConfig) {
  const Result r = run("config validate " + fixture("configs/llama-small.json"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // Derived fields are filled: kv_channels = hidden_size / num_attention_heads.
  EXPECT_NE(r.output.find("\"kv_channels\": 8"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\"num_query_groups\": 2"), std::string::npos);
  EXPECT_NE(r.output.find("valid"), std::string::npos);
}

TEST(Cli, ConfigValidateListsEveryProblem) {
  const Result r = run("config validate " + fixture("configs/invalid/bad-heads.json"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("invalid config (7 problems)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("num_attention_heads = 6: must be a multiple of tensor_model_parallel_size (4)"), std::string::npos);
  EXPECT_NE(r.output.find("normalization = \"LayerNrom\""), std::string::npos);
}

TEST(Cli, ConfigValidateNamesUnknownFieldsAndBadJson) {
  const auto typo = temp_file("typo.json", R"({"num_layers": 2, "hiden_size": 64, "num_attention_heads": 8})");
  const Result r = run("config validate " + typo.string());
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("hiden_size"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("hidden_size"), std::string::npos) << r.output;  // the suggestion
  const auto broken = temp_file("broken.json", "{\"num_layers\": ");
  const Result b = run("config validate " + broken.string());
  EXPECT_EQ(b.exit_code, 2);
  EXPECT_NE(b.output.find("JSON"), std::string::npos) << b.output;
  const Result missing = run("config validate /no/such/config.json");
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.output.find("cannot read '/no/such/config.json'"), std::string::npos) << missing.output;
  std::filesystem::remove(typo);
  std::filesystem::remove(broken);
}

TEST(Cli, ConfigValidateAgainstALayout) {
  const std::string cfg = fixture("configs/llama-small.json");
  EXPECT_EQ(run("config validate --layout tp2-dp2 " + cfg).exit_code, 0);
  const Result r = run("config validate --layout tp16 " + cfg);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("tensor_model_parallel_size (16)"), std::string::npos) << r.output;
  const Result bad = run("config validate --layout tq2 " + cfg);
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.output.find("\"tq2\" is unknown"), std::string::npos) << bad.output;
}

TEST(Cli, CaseInspect) {
  const std::string file = fixture("safetensors/python_layernorm_case.safetensors");
  const Result r = run("case inspect " + file);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("component:      layernorm"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("inputs.hidden_states"), std::string::npos);
  EXPECT_NE(r.output.find("[2, 3, 4]"), std::string::npos);
  const Result json = run("case inspect --json " + file);
  ASSERT_EQ(json.exit_code, 0);
  EXPECT_NE(json.output.find("\"component\": \"layernorm\""), std::string::npos) << json.output;
  EXPECT_NE(json.output.find("\"nan\": 0"), std::string::npos);
}

TEST(Cli, CaseInspectRejectsMalformedFiles) {
  const auto junk = temp_file("junk.safetensors", std::string("\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", 13));
  const Result r = run("case inspect " + junk.string());
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find(junk.string()), std::string::npos) << r.output;  // names the file
  EXPECT_NE(r.output.find("header length 16"), std::string::npos) << r.output;
  // A valid safetensors file that is not a case: an error, and --raw shows it anyway.
  const std::string not_a_case = fixture("safetensors/python_all_dtypes.safetensors");
  const Result strict = run("case inspect " + not_a_case);
  EXPECT_EQ(strict.exit_code, 2);
  EXPECT_NE(strict.output.find("no \"component\""), std::string::npos) << strict.output;
  EXPECT_EQ(run("case inspect --raw " + not_a_case).exit_code, 0);
  std::filesystem::remove(junk);
}

}  // namespace
