// `paritron parity` through the command line: the JSON contract (summary
// and one object per case with component, dtype, layout, passed, max_error,
// tolerance, repro), the repro line rerunning exactly one case, JUnit, and
// bad options. (The sweep's judgement itself is tested in parity/*_test.cpp.)
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "parity/cli/cli_test_util.h"

namespace paritron::cli_test_util {
namespace {

nlohmann::json read_json(const std::filesystem::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

TEST(ParityCommand, JsonHoldsTheContractFieldsAndReproRerunsOneCase) {
  const auto json = own_temp_path("parity.json");
  const auto junit = own_temp_path("parity.xml");
  const Result r = run("parity --cases 6 --seed 7 --component mlp --dtype fp32 --json " + json.string() +
                       " --junit " + junit.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("6 cases, 6 passed, 0 failed"), std::string::npos) << r.output;
  const nlohmann::json j = read_json(json);
  EXPECT_EQ(j["summary"]["cases"], 6);
  EXPECT_EQ(j["summary"]["passed"], 6);
  EXPECT_EQ(j["summary"]["failed"], 0);
  EXPECT_TRUE(j["summary"].contains("seconds"));
  ASSERT_EQ(j["cases"].size(), 6u);
  for (const auto& c : j["cases"]) {
    for (const char* field : {"component", "dtype", "layout", "passed", "max_error", "tolerance", "repro"}) {
      EXPECT_TRUE(c.contains(field)) << field;
    }
    EXPECT_EQ(c["component"], "mlp");
    EXPECT_EQ(c["dtype"], "fp32");
    EXPECT_LE(c["max_error"].get<double>(), c["tolerance"].get<double>());
  }
  // The third case's repro line reruns exactly it: same layout, same error.
  const nlohmann::json third = j["cases"][2];
  const std::string repro = third["repro"];
  ASSERT_EQ(repro.rfind("paritron parity ", 0), 0u) << repro;
  const auto again = own_temp_path("parity_again.json");
  const Result r2 = run(repro.substr(std::string("paritron ").size()) + " --json " + again.string());
  ASSERT_EQ(r2.exit_code, 0) << r2.output;
  const nlohmann::json k = read_json(again);
  ASSERT_EQ(k["cases"].size(), 1u);
  EXPECT_EQ(k["cases"][0]["layout"], third["layout"]);
  EXPECT_EQ(k["cases"][0]["config"], third["config"]);
  EXPECT_EQ(k["cases"][0]["max_error"], third["max_error"]);
  std::ifstream x(junit);
  const std::string xml((std::istreambuf_iterator<char>(x)), std::istreambuf_iterator<char>());
  EXPECT_NE(xml.find("<testsuite name=\"paritron parity\" tests=\"6\" failures=\"0\""), std::string::npos) << xml;
  std::filesystem::remove(json);
  std::filesystem::remove(junit);
  std::filesystem::remove(again);
}

TEST(ParityCommand, BadFiltersAreExplained) {
  const Result r = run("parity --cases 1 --component nonsense");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("not a component the sweep draws"), std::string::npos) << r.output;
  EXPECT_EQ(run("parity --cases 1 --dtype fp7").exit_code, 2);
}

// --backend cuda where it cannot run (a CPU-only build, or no GPU) is one
// clear bad-option error, not a failure in every case. On a GPU machine the
// same command runs one case on the CUDA backend and names the backend in the
// repro line of the JSON report.
TEST(ParityCommand, CudaBackendUnavailableIsABadOption) {
  const std::filesystem::path json = own_temp_path("backend.json");
  const Result r = run("parity --cases 1 --backend cuda -q --json " + json.string());
  if (r.exit_code == 0) {
    std::ifstream in(json);
    const auto report = nlohmann::json::parse(in);
    EXPECT_EQ(report["summary"]["backend"], "cuda");
    GTEST_SKIP() << "a CUDA device is present: the case ran on it";
  }
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--backend cuda: backend 'cuda'"), std::string::npos) << r.output;
  EXPECT_EQ(run("parity --cases 1 --backend tpu").exit_code, 2);
}

}  // namespace
}  // namespace paritron::cli_test_util
