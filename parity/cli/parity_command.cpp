// `paritron parity`: the main job. A sweep of randomly drawn, valid-by-
// construction cases (parity/generators.h: config, layout, dtype, shapes,
// masks, training) run on the optimized side and judged against the float64
// reference with the tolerance model (parity/tolerance.h), until the time
// budget or the case count runs out. Progress on stderr (cases done,
// failures, time left), every failure with its config, its worst element and
// one command that reruns exactly that case, then a summary table by
// component x dtype x parallelism. Exit 0 when every case passed, 1 when one
// failed, 2 on bad options.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/case_file.h"
#include "common/error.h"
#include "parity/cli/commands.h"
#include "optimized/backend.h"
#include "optimized/faults.h"
#include "parity/shrink.h"
#include "parity/sweep.h"

namespace paritron::cli {
namespace {

using parity::CaseResult;

struct ParityOptions {
  double time_s = 120;
  int64_t cases = 0;  // 0: as many as the time allows
  uint64_t seed = 2026;
  int64_t only_case = -1;  // --case I: rerun case I of the sweep alone
  parity::SweepFilterArgs filter;
  std::string json_file, junit_file, save_dir;
  bool quiet = false;
  bool list_faults = false;
  std::string decisions;      // --decisions LIST: run the case those generator decisions give (a shrunk case)
  double shrink_time_s = 30;  // per failure; 0: no shrinking
};

// Shrinks a failing sweep case (parity/shrink.h): the smallest spec found
// that still fails the same way (a tolerance failure stays one; an error
// stays an error), and the one command that reruns it.
void print_shrunk(const CaseResult& r, uint64_t seed, const parity::SpecFilter& filter, const ParityOptions& o) {
  if (o.shrink_time_s <= 0) return;
  const bool was_error = !r.error.empty();
  parity::ShrinkBudget budget;
  budget.max_seconds = o.shrink_time_s;
  budget.max_calls = 1000;
  const auto still_fails = [&](const parity::CaseSpec& spec) {
    const CaseResult x = parity::run_spec_case(spec);
    return !x.passed && x.error.empty() == !was_error;
  };
  const parity::ShrinkResult s = parity::shrink_drawn_case(
      parity::attempt_seed(seed, r.index, static_cast<int>(r.resampled.size())), filter, still_fails, budget);
  if (s.steps == 0) {
    std::cout << fmt::format("  shrunk: no smaller failing case found ({} tries, {:.1f} s)\n", s.calls, s.seconds);
    return;
  }
  std::cout << fmt::format("  shrunk ({} steps, {} tries, {:.1f} s{}): {}\n", s.steps, s.calls, s.seconds,
                           s.budget_exhausted ? ", budget spent" : "", parity::describe(s.spec));
  const CaseResult again = parity::run_spec_case(s.spec);
  if (const auto* w = again.worst(); w && again.error.empty()) std::cout << "    " << w->summary() << "\n";
  if (!again.error.empty()) std::cout << "    error: " << again.error << "\n";
  std::cout << fmt::format("  rerun shrunk: paritron parity --decisions {}{}\n", s.repro_decisions,
                           parity::filter_flags(o.filter));
}

// "tp+sp+pp" style: which parallelisms a layout uses ("none" for one rank).
std::string parallelism(const ParallelConfig& pc) {
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (on) s += (s.empty() ? "" : "+") + std::string(name);
  };
  add(pc.tensor_model_parallel_size > 1, "tp");
  add(pc.sequence_parallel, "sp");
  add(pc.context_parallel_size > 1, "cp");
  add(pc.expert_model_parallel_size > 1, "ep");
  add(pc.pipeline_model_parallel_size > 1, "pp");
  add(pc.virtual_pipeline_model_parallel_size.has_value(), "vp");
  add(pc.data_parallel_size > 1, "dp");
  return s.empty() ? "none" : s;
}

void print_failure(const CaseResult& r) {
  std::cout << fmt::format("FAIL case {}: {}\n", r.index, parity::describe(r.spec));
  if (!r.error.empty()) std::cout << fmt::format("  error: {}\n", r.error);
  if (!r.closest_decision.empty() && r.near_tie.empty()) {
    std::cout << fmt::format("  closest decision to a tie: {}\n", r.closest_decision);
  }
  if (!r.near_tie.empty()) {
    std::cout << fmt::format("  note: judged although its routing or a ReLU kink is a near tie (no redraw left): {}\n",
                             r.near_tie);
  }
  for (const auto& v : r.verdicts) {
    if (!v.passed && !v.skipped) std::cout << "  " << v.summary() << "\n";
  }
  std::cout << fmt::format("  rerun: {}\n", r.repro);
}

class Progress {
 public:
  Progress(double budget_s, int64_t max_cases) : budget_(budget_s), max_(max_cases), tty_(isatty(2) != 0) {}
  void update(int64_t done, int64_t failed, double elapsed) {
    const double left = std::max(0.0, budget_ - elapsed);
    const double frac = max_ > 0 ? std::min(1.0, static_cast<double>(done) / static_cast<double>(max_))
                                 : std::min(1.0, elapsed / budget_);
    if (tty_) {
      const int width = 30, fill = static_cast<int>(frac * width);
      std::cerr << fmt::format("\r[{}{}] {} cases, {} failed, {:.0f} s left ", std::string(fill, '#'),
                               std::string(width - fill, '.'), done, failed, left)
                << std::flush;
    } else if (elapsed - last_ >= 15 || done == 1) {
      std::cerr << fmt::format("parity: {} cases, {} failed, {:.0f} s left\n", done, failed, left);
      last_ = elapsed;
    }
  }
  void finish() {
    if (tty_) std::cerr << "\n";
  }

 private:
  double budget_;
  int64_t max_;
  bool tty_;
  double last_ = -1e9;
};

void print_summary(const std::vector<CaseResult>& results) {
  struct Row {
    int64_t cases = 0, failed = 0, ties = 0;
    double worst_ratio = 0;
  };
  std::map<std::tuple<std::string, std::string, std::string>, Row> rows;
  for (const auto& r : results) {
    Row& row = rows[{r.spec.component, parity::spec_dtype_name(r.spec.dtype), parallelism(r.spec.layout)}];
    ++row.cases;
    row.failed += r.passed ? 0 : 1;
    row.ties += static_cast<int64_t>(r.resampled.size());
    if (const auto* w = r.worst()) row.worst_ratio = std::max(row.worst_ratio, w->ratio());
  }
  std::cout << fmt::format("\n{:<22} {:<5} {:<16} {:>6} {:>7} {:>12} {:>6}\n", "component", "dtype", "parallelism",
                           "cases", "failed", "worst e/tol", "ties");
  for (const auto& [key, row] : rows) {
    std::cout << fmt::format("{:<22} {:<5} {:<16} {:>6} {:>7} {:>12.3f} {:>6}\n", std::get<0>(key), std::get<1>(key),
                             std::get<2>(key), row.cases, row.failed, row.worst_ratio, row.ties);
  }
}

nlohmann::ordered_json case_json(const CaseResult& r) {
  const auto* w = r.worst();
  return {{"index", r.index},
          {"component", r.spec.component},
          {"dtype", parity::spec_dtype_name(r.spec.dtype)},
          {"layout", r.spec.layout.layout_name()},
          {"passed", r.passed},
          {"max_error", w ? w->error : 0.0},
          {"tolerance", w ? w->bound : 0.0},
          {"worst_tensor", w ? w->name : ""},
          {"worst_element", w ? w->worst_position() : ""},
          {"expected", w ? w->expected : 0.0},
          {"actual", w ? w->actual : 0.0},
          {"reference_error", w ? w->reference_error : 0.0},
          {"sensitivity", w ? w->sensitivity : 0.0},
          {"floor", w ? w->floor : 0.0},
          {"needed_k", std::isfinite(r.needed_k()) ? nlohmann::ordered_json(r.needed_k()) : nlohmann::ordered_json("inf")},
          {"near_ties_resampled", r.resampled.size()},
          {"near_tie", r.near_tie.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(r.near_tie)},
          {"gradients_judged", r.gradients_judged},
          {"error", r.error.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(r.error)},
          {"config", parity::describe(r.spec)},
          {"seconds", r.seconds},
          {"repro", r.repro}};
}

void write_junit(const std::string& file, const std::vector<CaseResult>& results, double seconds) {
  std::ofstream out(file);
  if (!out) throw Error(fmt::format("cannot write the JUnit report to '{}'", file));
  int64_t failures = std::count_if(results.begin(), results.end(), [](const CaseResult& r) { return !r.passed; });
  auto esc = [](const std::string& s) {
    std::string e;
    for (char ch : s) {
      switch (ch) {
        case '<': e += "&lt;"; break;
        case '>': e += "&gt;"; break;
        case '&': e += "&amp;"; break;
        case '"': e += "&quot;"; break;
        default: e += ch;
      }
    }
    return e;
  };
  out << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  out << fmt::format("<testsuite name=\"paritron parity\" tests=\"{}\" failures=\"{}\" time=\"{:.3f}\">\n",
                     results.size(), failures, seconds);
  for (const auto& r : results) {
    out << fmt::format("  <testcase classname=\"{}.{}\" name=\"case {} {}\" time=\"{:.3f}\"", esc(r.spec.component),
                       parity::spec_dtype_name(r.spec.dtype), r.index, esc(r.spec.layout.layout_name()), r.seconds);
    if (r.passed) {
      out << "/>\n";
      continue;
    }
    const auto* w = r.worst();
    const std::string msg = !r.error.empty() ? r.error : (w ? w->summary() : "failed");
    out << fmt::format(">\n    <failure message=\"{}\">{}\nrerun: {}</failure>\n  </testcase>\n", esc(msg),
                       esc(parity::describe(r.spec)), esc(r.repro));
  }
  out << "</testsuite>\n";
}

int list_faults() {
  std::cout << (opt::faults::built_with_faults()
                    ? "faults compiled into this build (paritron parity --fault NAME):\n"
                    : "faults (this build has none compiled in: configure with -DPARITRON_FAULTS=ON to inject them):\n");
  for (const auto& f : opt::faults::all_faults()) std::cout << fmt::format("  {:<34} {}\n", f.name, f.description);
  return kExitOk;
}

// Deactivates the fault when the sweep ends, however it ends.
struct FaultScope {
  explicit FaultScope(const std::string& name) {
    if (!name.empty()) opt::faults::activate(name);
  }
  ~FaultScope() { opt::faults::deactivate(); }
  FaultScope(const FaultScope&) = delete;
  FaultScope& operator=(const FaultScope&) = delete;
};

int run_parity(const ParityOptions& o) {
  if (o.list_faults) return list_faults();
  const parity::SpecFilter filter = parity::make_filter(o.filter);
  const FaultScope fault(o.filter.fault);
  parity::set_sweep_backend(o.filter.backend);
  if (parity::sweep_backend() != "cpu") {
    // A backend that cannot run here (no GPU, a build without CUDA) is a bad
    // option, said once, not a failure in every case.
    try {
      (void)opt::make_backend(parity::sweep_backend());
    } catch (const std::exception& e) {
      std::cerr << "parity: --backend " << parity::sweep_backend() << ": " << e.what() << "\n";
      return kExitBadInput;
    }
    std::cerr << fmt::format("parity: optimized side on the {} backend\n", parity::sweep_backend());
  }
  if (!o.filter.fault.empty()) {
    std::cerr << fmt::format("parity: fault '{}' injected into the optimized side\n", o.filter.fault);
  }
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  std::vector<CaseResult> results;
  Progress progress(o.time_s, o.only_case >= 0 || !o.decisions.empty() ? 1 : o.cases);
  int64_t failed = 0;
  const bool single = o.only_case >= 0 || !o.decisions.empty();
  for (uint64_t i = o.only_case >= 0 ? static_cast<uint64_t>(o.only_case) : 0;; ++i) {
    CaseResult r;
    if (!o.decisions.empty()) {
      r = parity::run_spec_case(
          parity::draw_case_spec_from_decisions(parity::parse_decisions(o.decisions), filter));
      r.repro = "paritron parity --decisions " + o.decisions + parity::filter_flags(o.filter);
      if (!r.near_tie.empty()) std::cout << "note: this case's routing is a near tie, not judged: " << r.near_tie << "\n";
      if (!r.gradients_judged) std::cout << "note: a ReLU kink is a near tie: outputs judged, gradients not\n";
    } else {
      r = parity::run_sweep_case(o.seed, i, filter, o.filter);
    }
    if (!r.passed) {
      ++failed;
      progress.finish();
      print_failure(r);
      if (o.decisions.empty()) {
        try {
          print_shrunk(r, o.seed, filter, o);
        } catch (const std::exception& e) {
          std::cout << "  shrinking failed: " << e.what() << "\n";
        }
      }
      if (!o.save_dir.empty() && !r.made.component.empty()) {
        std::filesystem::create_directories(o.save_dir);
        const std::string path =
            o.decisions.empty()
                ? fmt::format("{}/parity-seed{}-case{}.safetensors", o.save_dir, o.seed, i)
                : fmt::format("{}/parity-decisions-{}.safetensors", o.save_dir, std::hash<std::string>{}(o.decisions));
        write_case(path, r.made);
        std::cout << fmt::format("  saved: {} (replay: paritron optimized {} --layout {} --dtype {})\n", path, path,
                                 r.spec.layout.layout_name(), dtype_name(parity::run_dtype(r.spec)));
      }
    }
    results.push_back(std::move(r));
    progress.update(static_cast<int64_t>(results.size()), failed, elapsed());
    if (single) break;
    if (o.cases > 0 && static_cast<int64_t>(results.size()) >= o.cases) break;
    if (o.cases == 0 && elapsed() >= o.time_s) break;
  }
  progress.finish();
  const double seconds = elapsed();
  if (!o.quiet || single) print_summary(results);
  std::cout << fmt::format("{} cases, {} passed, {} failed in {:.1f} s (seed {})\n", results.size(),
                           static_cast<int64_t>(results.size()) - failed, failed, seconds, o.seed);
  int64_t redrawn = 0, outputs_only = 0;
  for (const auto& r : results) {
    redrawn += static_cast<int64_t>(r.resampled.size());
    outputs_only += r.gradients_judged ? 0 : 1;
  }
  if (redrawn > 0 || outputs_only > 0) {
    std::cout << fmt::format("near ties: {} draws redrawn (routing / capacity), {} cases judged on outputs only "
                             "(a ReLU kink within reach of rounding)\n",
                             redrawn, outputs_only);
  }
  if (!o.json_file.empty()) {
    nlohmann::ordered_json cases = nlohmann::ordered_json::array();
    for (const auto& r : results) cases.push_back(case_json(r));
    std::ofstream out(o.json_file);
    if (!out) throw Error(fmt::format("cannot write the JSON report to '{}'", o.json_file));
    out << nlohmann::ordered_json{{"summary",
                                   {{"cases", results.size()},
                                    {"passed", static_cast<int64_t>(results.size()) - failed},
                                    {"failed", failed},
                                    {"seconds", seconds},
                                    {"seed", o.seed},
                                    {"backend", parity::sweep_backend()},
                                    {"fault", o.filter.fault.empty() ? nlohmann::ordered_json(nullptr)
                                                                     : nlohmann::ordered_json(o.filter.fault)}}},
                                  {"cases", cases}}
               .dump(2)
        << "\n";
  }
  if (!o.junit_file.empty()) write_junit(o.junit_file, results, seconds);
  return failed > 0 ? kExitCheckFailed : kExitOk;
}

}  // namespace

void register_parity(CLI::App& app, Action& action) {
  auto opts = std::make_shared<ParityOptions>();
  CLI::App* cmd = app.add_subcommand(
      "parity",
      "The main job: a sweep of random valid cases (configs, parallel layouts, dtypes, shapes) run on the optimized\n"
      "side and judged against the float64 reference with the tolerance model. Each failure prints the command\n"
      "that reruns it. Exit 1 when a case fails.");
  cmd->add_option("--time", opts->time_s, "time budget in seconds (default 120)")->check(CLI::PositiveNumber);
  cmd->add_option("--cases", opts->cases, "run exactly this many cases (overrides --time)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--seed", opts->seed, "sweep seed (default 2026); case i is drawn from (seed, i)");
  cmd->add_option("--case", opts->only_case, "rerun case I of the sweep alone (what a failure's rerun line says)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--component", opts->filter.component, "draw only this component (e.g. transformer_layer)");
  cmd->add_option("--dtype", opts->filter.dtype, "draw only this dtype: fp32, bf16, fp16, fp8, fp64");
  cmd->add_option("--layout", opts->filter.layout, "a fixed layout (e.g. tp2-pp2-dp2-sp); configs are drawn to fit it");
  cmd->add_option("--json", opts->json_file, "write {summary, cases} to FILE");
  cmd->add_option("--junit", opts->junit_file, "write a JUnit XML report to FILE");
  cmd->add_option("--save-failures", opts->save_dir, "write each failing case as a case file into DIR");
  cmd->add_option("--backend", opts->filter.backend,
                  "kernel backend of the optimized side: cpu (default) or cuda (a CUDA build on a GPU machine; "
                  "multi-rank layouts run as threads sharing the GPU)");
  cmd->add_option("--fault", opts->filter.fault,
                  "inject the named fault into the optimized side (builds configured with -DPARITRON_FAULTS=ON; "
                  "see --list-faults)");
  cmd->add_flag("--list-faults", opts->list_faults, "list the injectable faults and exit");
  cmd->add_option("--profile", opts->filter.profile,
                  "draw from a named distribution: fixtures/profiles/NAME.json (gpt-like, llama-like, mixtral-like, "
                  "tiny) or a JSON file");
  cmd->add_option("--decisions", opts->decisions,
                  "run the one case these generator decisions give (what a shrunk failure's rerun line says; "
                  "with the same filter flags)");
  cmd->add_option("--shrink-time", opts->shrink_time_s,
                  "seconds spent shrinking each failure to a smaller failing config (default 30; 0: off)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("-q,--quiet", opts->quiet, "no summary table");
  cmd->callback([opts, &action] { action = [opts] { return run_parity(*opts); }; });
}

}  // namespace paritron::cli
