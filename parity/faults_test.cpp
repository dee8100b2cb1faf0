// Proof that the parity sweep catches bugs (issue #6): every fault of
// optimized/faults.h, compiled in with -DPARITRON_FAULTS=ON (the "faults"
// preset), must make the default sweep (`paritron parity`: seed 2026, no
// filter, cases 0, 1, 2, ...) fail.
//
// Per fault:
//   * first catch: the first case index i at which run_sweep_case(2026, i)
//     fails with the fault active and passes without it (a failure the
//     unfaulted optimized side also has is a known false alarm, not a catch).
//     It must come within kBudget cases: the default 2-minute sweep runs far
//     more (~20,000 tiny cases), so a fault caught within the budget is caught
//     by the default sweep.
//   * catch rate: the fraction of the first N cases (N = kRateCases, 300 by
//     default) that are catches in that sense. It is over all drawn cases, so
//     a fault in a component or layout feature only part of the distribution
//     exercises (MoE routing, context parallelism, pipelines) has a low rate
//     by construction: it says how often the default distribution hits the
//     bug, and 1 / rate is about the expected number of cases to a catch.
// A table (fault, first catch, catch rate, how it failed) goes to stdout and,
// when PARITRON_FAULTS_REPORT names a file, as JSON to it.
//
// Environment (for investigating one fault): PARITRON_FAULTS_ONLY=a,b runs
// those faults only; PARITRON_FAULTS_RATE_CASES=N and PARITRON_FAULTS_BUDGET=B
// change the two constants.
//
// In a normal build the fault branches are compiled away: the test checks
// the registry and that activate() refuses with a clear message, and skips
// the sweep part.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "common/error.h"
#include "optimized/faults.h"
#include "parity/generators.h"
#include "parity/sweep.h"

namespace paritron::parity {
namespace {

namespace faults = opt::faults;

constexpr uint64_t kSeed = 2026;  // `paritron parity`'s default seed

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stoll(v) : fallback;
}

const std::vector<std::string>& expected_names() {
  static const std::vector<std::string> n = {
      "rope_interleave_swapped",     "gqa_tiling",
      "qkv_split_per_group",         "softmax_scale_no_layer_number",
      "masked_fill_zero",            "causal_mask_off_by_one",
      "bf16_truncation",             "missing_row_parallel_allreduce",
      "missing_sp_allgather",        "cp_chunk_order",
      "softmax_before_topk",         "aux_loss_normalisation",
      "z_loss_missing",              "glu_halves_swapped",
      "zero_centered_gamma_missing_plus1", "pipeline_layer_offset",
      "expert_permutation_order",    "missing_dp_grad_allreduce"};
  return n;
}

// Deactivates whatever a test activated, also when an assertion returns early.
struct FaultScope {
  explicit FaultScope(const std::string& name) { faults::activate(name); }
  ~FaultScope() { faults::deactivate(); }
  FaultScope(const FaultScope&) = delete;
  FaultScope& operator=(const FaultScope&) = delete;
};

TEST(Faults, RegistryListsEveryFault) {
  std::vector<std::string> names;
  for (const faults::FaultInfo& f : faults::all_faults()) {
    names.emplace_back(f.name);
    EXPECT_FALSE(f.description.empty()) << f.name;
  }
  EXPECT_EQ(names, expected_names());
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()).size(), names.size());
  EXPECT_EQ(static_cast<int>(faults::Fault::missing_dp_grad_allreduce), static_cast<int>(names.size()));
  EXPECT_TRUE(faults::active_name().empty());
}

TEST(Faults, ActivateRefusesClearly) {
#ifdef PARITRON_FAULTS
  EXPECT_TRUE(faults::built_with_faults());
  try {
    faults::activate("no_such_fault");
    ADD_FAILURE() << "activate accepted an unknown fault";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("unknown fault 'no_such_fault'"), std::string::npos) << what;
    for (const std::string& n : expected_names()) EXPECT_NE(what.find(n), std::string::npos) << what;
  }
  EXPECT_TRUE(faults::active_name().empty());
  {
    FaultScope scope("masked_fill_zero");
    EXPECT_EQ(faults::active_name(), "masked_fill_zero");
    EXPECT_TRUE(faults::active(faults::Fault::masked_fill_zero));
    EXPECT_FALSE(faults::active(faults::Fault::gqa_tiling));
  }
  EXPECT_TRUE(faults::active_name().empty());
  EXPECT_FALSE(faults::active(faults::Fault::masked_fill_zero));
#else
  EXPECT_FALSE(faults::built_with_faults());
  static_assert(!faults::active(faults::Fault::masked_fill_zero), "a normal build compiles the faults away");
  try {
    faults::activate("masked_fill_zero");
    ADD_FAILURE() << "activate succeeded in a build without fault injection";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("this build has no fault injection; configure with -DPARITRON_FAULTS=ON"),
              std::string::npos)
        << what;
  }
  EXPECT_NO_THROW(faults::deactivate());
  EXPECT_TRUE(faults::active_name().empty());
#endif
}

struct FaultRecord {
  std::string name;
  std::optional<uint64_t> first_catch;  // case index
  int64_t rate_cases = 0, caught_in_rate = 0, false_alarms_in_rate = 0;
  int64_t errors_in_rate = 0;  // catches that were a thrown error rather than a tolerance failure
  int64_t cases_run = 0;
  std::string how;  // the first catch: its spec and worst tensor (or error)
  double seconds = 0;
  std::vector<int64_t> catches;  // the catches' case indices (the rate window, then up to 3 catches)
  double rate() const { return rate_cases ? static_cast<double>(caught_in_rate) / static_cast<double>(rate_cases) : 0; }
  // The median number of cases a sweep runs until it catches the fault: the
  // median gap between successive catches (the first counted from case 0).
  // Null with fewer than two catches within the budget (too few to say).
  std::optional<double> median_cases_to_catch() const {
    if (catches.size() < 2) return std::nullopt;
    std::vector<int64_t> gaps;
    int64_t prev = -1;
    for (int64_t c : catches) {
      gaps.push_back(c - prev);
      prev = c;
    }
    std::sort(gaps.begin(), gaps.end());
    const size_t n = gaps.size();
    return n % 2 ? static_cast<double>(gaps[n / 2]) : 0.5 * static_cast<double>(gaps[n / 2 - 1] + gaps[n / 2]);
  }
};

std::string what_failed(const CaseResult& r) {
  if (!r.error.empty()) return "error: " + r.error.substr(0, 200);
  const TensorVerdict* w = r.worst();
  return w ? w->summary() : std::string("failed");
}

// Cases run without a fault, memoised (the false-alarm check).
class Baseline {
 public:
  bool passes(uint64_t index) {
    auto it = passed_.find(index);
    if (it != passed_.end()) return it->second;
    faults::deactivate();
    const bool ok = run_sweep_case(kSeed, index, SpecFilter{}, {}).passed;
    passed_[index] = ok;
    return ok;
  }

 private:
  std::map<uint64_t, bool> passed_;
};

TEST(Faults, DefaultSweepCatchesEveryFault) {
  if (!faults::built_with_faults()) {
    GTEST_SKIP() << "this build has no fault injection (configure with -DPARITRON_FAULTS=ON, preset 'faults'): "
                    "the sweep part needs the faults compiled in";
  }
  const int64_t rate_cases = env_int("PARITRON_FAULTS_RATE_CASES", 300);
  const int64_t budget = env_int("PARITRON_FAULTS_BUDGET", 3000);
  std::set<std::string> only;
  if (const char* o = std::getenv("PARITRON_FAULTS_ONLY"); o && *o) {
    std::stringstream ss(o);
    for (std::string n; std::getline(ss, n, ',');) only.insert(n);
  }

  // Sanity: with no fault the first cases pass (the default sweep passes;
  // a case that failed without the fault would never count as a catch below
  // anyway).
  Baseline baseline;
  {
    const int64_t n = std::min<int64_t>(50, rate_cases);
    std::vector<uint64_t> alarms;
    for (int64_t i = 0; i < n; ++i) {
      if (!baseline.passes(static_cast<uint64_t>(i))) alarms.push_back(static_cast<uint64_t>(i));
    }
    std::cout << fmt::format("no fault: {} of the first {} cases fail{}{}\n", alarms.size(), n,
                             alarms.empty() ? "" : " (known false alarms): ", fmt::join(alarms, ", "));
    EXPECT_TRUE(alarms.empty()) << "the unfaulted optimized side fails cases of the default sweep";
  }

  std::vector<FaultRecord> records;
  for (const faults::FaultInfo& info : faults::all_faults()) {
    const std::string name(info.name);
    if (!only.empty() && !only.count(name)) continue;
    FaultRecord rec;
    rec.name = name;
    rec.rate_cases = rate_cases;
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < std::max(rate_cases, budget); ++i) {
      if (i >= rate_cases && rec.catches.size() >= 3) break;  // the rate window, and 3 catches for the median
      CaseResult r;
      {
        FaultScope scope(name);
        r = run_sweep_case(kSeed, static_cast<uint64_t>(i), SpecFilter{}, {});
      }
      ++rec.cases_run;
      if (r.passed) continue;
      if (!baseline.passes(static_cast<uint64_t>(i))) {  // fails without the fault too: not a catch
        if (i < rate_cases) ++rec.false_alarms_in_rate;
        continue;
      }
      rec.catches.push_back(i);
      if (i < rate_cases) ++rec.caught_in_rate;
      if (i < rate_cases && !r.error.empty()) ++rec.errors_in_rate;
      if (!rec.first_catch) {
        rec.first_catch = static_cast<uint64_t>(i);
        rec.how = fmt::format("{} | {}", describe(r.spec), what_failed(r));
      }
    }
    rec.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_TRUE(rec.first_catch.has_value())
        << "fault " << name << " (" << info.description << ") is not caught by the first " << budget
        << " cases of the default sweep (seed " << kSeed << ")";
    std::cout << fmt::format("  {:<34} first catch {:>6}  rate {:>5.1f}% ({}/{}, {} as errors)  {:.1f} s\n", name,
                             rec.first_catch ? std::to_string(*rec.first_catch) : std::string("none"),
                             100 * rec.rate(), rec.caught_in_rate, rec.rate_cases, rec.errors_in_rate, rec.seconds)
              << std::flush;
    records.push_back(std::move(rec));
  }

  // The table and the JSON report.
  std::cout << fmt::format("\nfaults caught by the default sweep (seed {}, budget {} cases, rate over the first {}):\n",
                           kSeed, budget, rate_cases);
  std::cout << fmt::format("{:<34} {:>11} {:>10} {:>13}  first catch\n", "fault", "first catch", "catch rate",
                           "median cases");
  nlohmann::json report = nlohmann::json::array();
  for (const FaultRecord& r : records) {
    const auto median = r.median_cases_to_catch();
    std::cout << fmt::format("{:<34} {:>11} {:>9.1f}% {:>13}  {}\n", r.name,
                             r.first_catch ? std::to_string(*r.first_catch) : std::string("NOT CAUGHT"),
                             100 * r.rate(), median ? fmt::format("{:.1f}", *median) : std::string("-"), r.how);
    nlohmann::json j = {{"fault", r.name},
                        {"first_catch", r.first_catch ? nlohmann::json(*r.first_catch) : nlohmann::json(nullptr)},
                        {"cases_to_first_catch", r.first_catch ? nlohmann::json(*r.first_catch + 1) : nlohmann::json(nullptr)},
                        {"catch_rate", r.rate()},
                        {"median_cases_to_catch", median ? nlohmann::json(*median) : nlohmann::json(nullptr)},
                        {"caught_in_rate_window", r.caught_in_rate},
                        {"rate_window", r.rate_cases},
                        {"false_alarms_in_rate_window", r.false_alarms_in_rate},
                        {"errors_in_rate_window", r.errors_in_rate},
                        {"cases_run", r.cases_run},
                        {"first_catch_detail", r.how},
                        {"seconds", r.seconds}};
    report.push_back(std::move(j));
  }
  if (const char* path = std::getenv("PARITRON_FAULTS_REPORT"); path && *path) {
    std::ofstream out(path);
    out << nlohmann::json{{"seed", kSeed}, {"budget", budget}, {"rate_window", rate_cases}, {"faults", report}}.dump(2)
        << "\n";
    EXPECT_TRUE(out.good()) << "cannot write " << path;
  }
}

}  // namespace
}  // namespace paritron::parity
