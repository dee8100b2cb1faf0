// `paritron check CASE...`: runs the reference on each case file and compares
// every output, gradient and intermediate tap it produces with the file's
// (shared/spec/case-format.md, "Comparison"). One line per tensor (verdict,
// name, max abs/rel error, tolerance), then `N passed, N failed`; tensors the
// reference cannot produce are listed as skipped, never as passed. Exit 0
// when everything compared passes, 1 when a comparison fails, 2 when a case
// cannot be read or run (its error is printed, the other cases still run).
// A case with nothing the reference can compare fails too: skips never pass.
#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/case_file.h"
#include "common/compare.h"
#include "common/error.h"
#include "parity/cli/commands.h"
#include "reference/run_case.h"

namespace paritron::cli {
namespace {

struct CheckOptions {
  std::vector<std::string> files;
  std::string json_file;
  std::string dtype = "F64";
  bool verbose = false;
  bool quiet = false;
};

// Expected tensors in fp16/bf16/fp8 are judged by the parity tolerance model
// (issue #6); until then `check` uses torch.testing.assert_close's defaults
// for fp16 (rtol 1e-3, atol 1e-5) and bf16 (rtol 1.6e-2, atol 1e-5), and for
// fp8 the E4M3 half-ulp (rtol 2^-4 = 0.0625) with atol 1e-3. A case's own
// `tolerance` metadata overrides these.
Tolerance low_precision_default(DType dtype) {
  switch (dtype) {
    case DType::F16: return {1e-3, 1e-5};
    case DType::BF16: return {1.6e-2, 1e-5};
    default: return {0.0625, 1e-3};
  }
}

bool is_checked_tensor(const std::string& name) {
  return name.rfind("outputs.", 0) == 0 || name.rfind("grads.", 0) == 0;
}

struct TensorVerdict {
  std::string name;
  std::string verdict;  // pass | fail | skip
  std::optional<CompareReport> report;
  std::string reason;   // for skip
};

struct CaseVerdict {
  std::string file, component, error;
  std::vector<TensorVerdict> tensors;
  std::vector<std::string> notes;
  double seconds = 0;

  int64_t count(std::string_view verdict) const {
    return std::count_if(tensors.begin(), tensors.end(), [&](const TensorVerdict& t) { return t.verdict == verdict; });
  }
  // No tensor could be compared: the case proves nothing, so it fails the run
  // (skips are never passes).
  bool nothing_compared() const { return error.empty() && count("skip") == static_cast<int64_t>(tensors.size()); }
  bool failed() const { return !error.empty() || nothing_compared() || count("fail") > 0; }
};

CaseVerdict check_case(const std::string& file, const ref::ReferenceOptions& options) {
  CaseVerdict v;
  v.file = file;
  const auto start = std::chrono::steady_clock::now();
  try {
    const Case c = read_case(file);
    v.component = c.component;
    const ref::ReferenceResult result = ref::run_reference(c, options);
    v.notes = result.notes;
    for (const auto& [name, expected] : c.tensors) {
      if (!is_checked_tensor(name)) continue;
      TensorVerdict t{name, "skip", std::nullopt, ""};
      auto produced = result.tensors.find(name);
      if (produced == result.tensors.end()) {
        t.reason = "not produced by the reference";
      } else {
        const Tolerance tol = c.tolerance_for(name, expected.dtype()).value_or(low_precision_default(expected.dtype()));
        t.report = compare(name, expected, produced->second, tol);
        t.verdict = t.report->ok() ? "pass" : "fail";
      }
      v.tensors.push_back(std::move(t));
    }
  } catch (const Error& e) {
    v.error = e.what();
  } catch (const std::bad_alloc&) {
    v.error = "out of memory running the reference on this case (its shapes are too large for this machine)";
  } catch (const std::exception& e) {
    v.error = fmt::format("internal error: {} (please report it with the case file)", e.what());
  }
  v.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return v;
}

void print_case(const CaseVerdict& v, bool verbose, bool quiet) {
  if (quiet) {
    const char* verdict = !v.error.empty() ? "ERROR" : v.failed() ? "FAIL " : "PASS ";
    std::cout << fmt::format("{} {} ({}): {} passed, {} failed, {:.3f} s\n", verdict, v.file,
                             v.component.empty() ? "unreadable" : v.component, v.count("pass"), v.count("fail"),
                             v.seconds);
    if (!v.error.empty()) std::cout << fmt::format("  {}\n", v.error);
    for (const auto& t : v.tensors) {
      if (t.verdict == "fail") std::cout << "  " << (verbose ? t.report->details() : t.report->summary()) << "\n";
    }
    return;
  }
  std::cout << fmt::format("{} ({})\n", v.file, v.component.empty() ? "unreadable" : v.component);
  if (!v.error.empty()) {
    std::cout << fmt::format("  ERROR {}\n", v.error);
    return;
  }
  size_t width = 4;
  for (const auto& t : v.tensors) width = std::max(width, t.name.size());
  for (const auto& t : v.tensors) {
    if (!t.report) {
      std::cout << fmt::format("  SKIP  {:<{}}  {}\n", t.name, width, t.reason);
      continue;
    }
    const CompareReport& r = *t.report;
    std::cout << fmt::format("  {}  {:<{}}  max_abs {:9.3e}  max_rel {:9.3e}  rtol {:.1e} atol {:.1e}\n",
                             r.ok() ? "PASS" : "FAIL", t.name, width, r.max_abs_error, r.max_rel_error,
                             r.tolerance.rtol, r.tolerance.atol);
    if (!r.ok()) {
      const std::string details = verbose ? r.details() : r.summary();
      std::cout << "        " << details << "\n";
    }
  }
  for (const auto& note : v.notes) std::cout << "  note: " << note << "\n";
  if (v.nothing_compared()) {
    std::cout << "  FAIL  nothing to compare: the case holds no output or gradient the reference produces\n";
  }
}

nlohmann::ordered_json case_json(const CaseVerdict& v) {
  nlohmann::ordered_json tensors = nlohmann::ordered_json::array();
  for (const auto& t : v.tensors) {
    nlohmann::ordered_json j = {{"name", t.name}, {"verdict", t.verdict}};
    if (t.report) {
      const CompareReport& r = *t.report;
      j["max_abs_error"] = r.max_abs_error;
      j["max_rel_error"] = r.max_rel_error;
      j["rtol"] = r.tolerance.rtol;
      j["atol"] = r.tolerance.atol;
      j["out_of_tolerance"] = r.out_of_tolerance;
      j["shape_mismatch"] = r.shape_mismatch;
      if (!r.ok()) {
        j["worst"] = {{"index", r.worst.index}, {"expected", r.worst.expected}, {"actual", r.worst.actual}};
        j["summary"] = r.summary();
      }
    } else {
      j["reason"] = t.reason;
    }
    tensors.push_back(std::move(j));
  }
  return {{"file", v.file},
          {"component", v.component},
          {"passed", !v.failed()},
          {"error", v.error.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(v.error)},
          {"seconds", v.seconds},
          {"notes", v.notes},
          {"tensors", tensors}};
}

int check(const CheckOptions& o) {
  ref::ReferenceOptions options;
  options.dtype = dtype_from_name(o.dtype).value();  // CLI11 checked the name
  const auto start = std::chrono::steady_clock::now();
  int64_t passed = 0, failed = 0, skipped = 0, errors = 0, empty = 0;
  nlohmann::ordered_json cases = nlohmann::ordered_json::array();
  for (const auto& file : o.files) {
    const CaseVerdict v = check_case(file, options);
    print_case(v, o.verbose, o.quiet);
    if (!v.error.empty()) ++errors;
    if (v.nothing_compared()) ++empty;
    passed += v.count("pass");
    failed += v.count("fail");
    skipped += v.count("skip");
    cases.push_back(case_json(v));
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (skipped > 0) std::cout << fmt::format("{} skipped (not produced by the reference)\n", skipped);
  if (errors > 0) std::cout << fmt::format("{} case(s) could not be run\n", errors);
  if (empty > 0) std::cout << fmt::format("{} case(s) had nothing to compare\n", empty);
  std::cout << fmt::format("{} passed, {} failed\n", passed, failed);
  if (!o.json_file.empty()) {
    nlohmann::ordered_json report = {
        {"summary",
         {{"cases", o.files.size()}, {"passed", passed}, {"failed", failed}, {"skipped", skipped},
          {"errors", errors}, {"nothing_compared", empty}, {"seconds", seconds}}},
        {"cases", cases}};
    std::ofstream out(o.json_file);
    if (!out) throw Error(fmt::format("cannot write the JSON report to '{}'", o.json_file));
    out << report.dump(2) << "\n";
  }
  if (errors > 0) return kExitBadInput;
  return failed > 0 || empty > 0 ? kExitCheckFailed : kExitOk;
}

}  // namespace

void register_check(CLI::App& app, Action& action) {
  auto opts = std::make_shared<CheckOptions>();
  CLI::App* cmd = app.add_subcommand(
      "check",
      "Run the reference on case files and compare every output, gradient and intermediate tap they hold.\n"
      "Prints one line per tensor and 'N passed, N failed'; exit 1 on a failed comparison, 2 on an unreadable case.");
  cmd->add_option("cases", opts->files, "case files (.safetensors, shared/spec/case-format.md)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--json", opts->json_file, "also write a machine-readable report to FILE");
  cmd->add_option("--dtype", opts->dtype,
                  "precision the reference runs in: F64 (the truth, default), or emulate F32, BF16, F16")
      ->check(CLI::IsMember({"F64", "F32", "BF16", "F16"}));
  cmd->add_flag("-v,--verbose", opts->verbose, "list the first failing elements of each failed tensor");
  cmd->add_flag("-q,--quiet", opts->quiet, "one line per case; tensors only when they fail");
  cmd->callback([opts, &action] { action = [opts] { return check(*opts); }; });
}

}  // namespace paritron::cli
