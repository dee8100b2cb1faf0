// `paritron case make` and `paritron check` as a user runs them: a made case
// passes, a corrupted one fails with exit 1 and names the tensor, unreadable
// input exits 2, the JSON report carries the summary and one entry per tensor.
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/case_file.h"
#include "parity/cli/cli_test_util.h"

namespace {

using namespace paritron::cli_test_util;

class CheckCommand : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = own_temp_path("check_test");
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::filesystem::path dir_;
};

TEST_F(CheckCommand, MadeCasesPass) {
  const Result made = run("case make --component transformer_layer --config " + fixture("configs/llama-small.json") +
                          " --seq 4 --batch 2 --rotary --mask padding -o " + path("layer.safetensors"));
  ASSERT_EQ(made.exit_code, 0) << made.output;
  const Result moe = run("case make --component moe_layer --config " + fixture("configs/mixtral-small.json") +
                         " --seq 4 --batch 2 -o " + path("moe.safetensors"));
  ASSERT_EQ(moe.exit_code, 0) << moe.output;
  const Result r = run("check " + path("layer.safetensors") + " " + path("moe.safetensors") + " --json " +
                       path("report.json"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("PASS  outputs.output"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("PASS  grads.weights.self_attention.linear_qkv.weight"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(" passed, 0 failed"), std::string::npos) << r.output;

  std::ifstream in(path("report.json"));
  const auto report = nlohmann::json::parse(in);
  EXPECT_EQ(report["summary"]["cases"], 2);
  EXPECT_EQ(report["summary"]["failed"], 0);
  EXPECT_GT(report["summary"]["passed"].get<int>(), 20);
  ASSERT_EQ(report["cases"].size(), 2u);
  EXPECT_EQ(report["cases"][0]["component"], "transformer_layer");
  EXPECT_TRUE(report["cases"][0]["passed"].get<bool>());
  for (const auto& t : report["cases"][1]["tensors"]) {
    EXPECT_EQ(t["verdict"], "pass") << t.dump();
    EXPECT_TRUE(t.contains("max_abs_error") && t.contains("rtol") && t.contains("atol")) << t.dump();
  }
}

TEST_F(CheckCommand, CorruptedOutputFailsAndIsNamed) {
  ASSERT_EQ(run("case make --component mlp --config " + fixture("configs/gpt-small.json") + " --seq 3 -o " +
                path("mlp.safetensors"))
                .exit_code,
            0);
  paritron::Case c = paritron::read_case(path("mlp.safetensors"));
  paritron::Tensor& w = c.tensors.at("grads.weights.linear_fc2.weight");
  w.set(5, w.get(5) + 1e-4);
  paritron::write_case(path("bad.safetensors"), c);
  const Result r = run("check " + path("bad.safetensors") + " --json " + path("bad.json"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("FAIL  grads.weights.linear_fc2.weight"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("PASS  outputs.output"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(" passed, 1 failed"), std::string::npos) << r.output;
  std::ifstream in(path("bad.json"));
  const auto report = nlohmann::json::parse(in);
  EXPECT_EQ(report["summary"]["failed"], 1);
  EXPECT_FALSE(report["cases"][0]["passed"].get<bool>());
}

TEST_F(CheckCommand, TensorsTheReferenceCannotProduceAreSkipped) {
  ASSERT_EQ(run("case make --component layernorm --config " + fixture("configs/gpt-small.json") + " -o " +
                path("ln.safetensors"))
                .exit_code,
            0);
  paritron::Case c = paritron::read_case(path("ln.safetensors"));
  c.tensors["outputs.intermediate.not_a_module"] = paritron::Tensor(paritron::DType::F64, {2});
  paritron::write_case(path("extra.safetensors"), c);
  const Result r = run("check " + path("extra.safetensors"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("SKIP  outputs.intermediate.not_a_module"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("1 skipped"), std::string::npos) << r.output;

  // A case in which nothing can be compared proves nothing: it fails.
  paritron::Case empty = paritron::read_case(path("ln.safetensors"));
  for (auto it = empty.tensors.begin(); it != empty.tensors.end();) {
    const bool checked = it->first.rfind("outputs.", 0) == 0 || it->first.rfind("grads.", 0) == 0;
    it = checked ? empty.tensors.erase(it) : std::next(it);
  }
  empty.tensors["outputs.intermediate.not_a_module"] = paritron::Tensor(paritron::DType::F64, {2});
  paritron::write_case(path("empty.safetensors"), empty);
  const Result e = run("check " + path("empty.safetensors") + " --json " + path("empty.json"));
  EXPECT_EQ(e.exit_code, 1) << e.output;
  EXPECT_NE(e.output.find("nothing to compare"), std::string::npos) << e.output;
  std::ifstream in(path("empty.json"));
  const auto report = nlohmann::json::parse(in);
  EXPECT_FALSE(report["cases"][0]["passed"].get<bool>());
  EXPECT_EQ(report["summary"]["nothing_compared"], 1);
}

TEST_F(CheckCommand, BadInputExitsTwo) {
  EXPECT_EQ(run("check " + path("missing.safetensors")).exit_code, 2);
  std::ofstream(path("garbage.safetensors")) << "not a safetensors file";
  const Result garbage = run("check " + path("garbage.safetensors"));
  EXPECT_EQ(garbage.exit_code, 2) << garbage.output;
  EXPECT_NE(garbage.output.find("ERROR"), std::string::npos) << garbage.output;
  // A case missing a weight: the error names it.
  ASSERT_EQ(run("case make --component mlp --config " + fixture("configs/gpt-small.json") + " -o " +
                path("mlp.safetensors"))
                .exit_code,
            0);
  paritron::Case c = paritron::read_case(path("mlp.safetensors"));
  c.tensors.erase("weights.linear_fc1.weight");
  paritron::write_case(path("noweight.safetensors"), c);
  const Result r = run("check " + path("noweight.safetensors"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("linear_fc1.weight"), std::string::npos) << r.output;
  EXPECT_EQ(run("case make --component moe_layer --config " + fixture("configs/gpt-small.json") + " -o " +
                path("x.safetensors"))
                .exit_code,
            2);
}

// Every committed case in fixtures/ passes `check` (the "done when").
TEST_F(CheckCommand, CommittedFixturesPass) {
  std::string files = fixture("safetensors/python_layernorm_case.safetensors") + " " +
                      fixture("safetensors/ours_layernorm_case.safetensors");
  int cases = 2;
  // Paritron's own cases, and the golden cases of the real Megatron-core (issue #4).
  const std::filesystem::path fixtures = std::filesystem::path(PARITRON_SOURCE_DIR) / "fixtures";
  for (const char* folder : {"cases", "golden/core_v0.5.0", "golden/core_v0.16.1"}) {
    for (const auto& entry : std::filesystem::directory_iterator(fixtures / folder)) {
      if (entry.path().extension() != ".safetensors") continue;
      files.append(" ").append(entry.path().string());
      ++cases;
    }
  }
  EXPECT_GE(cases, 18 + 40);
  const Result r = run("check -q " + files + " --json " + path("fixtures.json"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  std::ifstream in(path("fixtures.json"));
  const auto report = nlohmann::json::parse(in);
  EXPECT_EQ(report["summary"]["cases"], cases);
  EXPECT_EQ(report["summary"]["failed"], 0);
  EXPECT_EQ(report["summary"]["skipped"], 0);
  EXPECT_GT(report["summary"]["passed"].get<int>(), 1500);
}

// fixtures/cases/make.sh is reproducible: the same command writes the same bytes.
TEST_F(CheckCommand, CaseMakeIsDeterministic) {
  const Result r = run("case make --component layernorm --config " + fixture("cases/configs/tiny-gpt.json") +
                       " --seed 1 --seq 4 --batch 2 -o " + path("ln.safetensors"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto bytes = [](const std::string& file) {
    std::ifstream in(file, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  EXPECT_EQ(bytes(path("ln.safetensors")), bytes(fixture("cases/layernorm.safetensors")));
}

TEST_F(CheckCommand, Help) {
  for (const char* sub : {"check --help", "case make --help"}) {
    const Result r = run(sub);
    EXPECT_EQ(r.exit_code, 0) << sub;
    EXPECT_NE(r.output.find("Usage"), std::string::npos) << sub;
  }
}

}  // namespace
