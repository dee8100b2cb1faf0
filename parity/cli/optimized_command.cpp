// `paritron optimized CASE... --layout L`: runs the optimized implementation
// on a parallel layout (in-process ranks, or one rank per process when
// started by mpirun) and compares every output and gradient with the float64
// reference (parity/expected.h: the unsharded run, or per data-parallel
// token group for a token-coupled MoE router). One line per tensor, then
// `N passed, N failed`; exit 0 / 1 (a comparison failed) / 2 (a case or
// layout cannot be run).
//
// Tolerances until the parity tolerance model (issue #6): relative to each
// tensor's largest expected magnitude, 1e-5 for float64 runs (the CPU
// attention kernel computes in fp32) and 1e-3 for fp32 runs; bf16/fp16 use
// check's torch.testing defaults scaled the same way.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <iostream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/case_file.h"
#include "common/compare.h"
#include "common/error.h"
#include "optimized/comm/comm.h"
#include "optimized/run_case.h"
#include "parity/cli/commands.h"
#include "parity/expected.h"
#if PARITRON_HAVE_MPI
#include "optimized/comm/mpi_comm.h"
#include "optimized/comm/nccl_comm.h"
#endif

namespace paritron::cli {
namespace {

struct OptimizedCmdOptions {
  std::vector<std::string> files;
  std::string layout = "tp1";
  std::string dtype = "F32";
  std::string backend = "cpu";
  std::string json_file;
  int64_t micro_batches = 0;
  double timeout_s = 120;
  bool quiet = false;
};

double interim_rtol(DType dtype) {
  switch (dtype) {
    case DType::F64: return 1e-5;
    case DType::F32: return 1e-3;
    case DType::F16: return 1e-2;
    default: return 5e-2;
  }
}

// The tolerance of one tensor: rtol, and atol = rtol * its largest |expected|.
Tolerance tolerance_for(const Tensor& expected, DType dtype) {
  if (!is_floating(expected.dtype())) return {0, 0};
  double scale = 0;
  for (int64_t i = 0; i < expected.numel(); ++i) scale = std::max(scale, std::abs(expected.get(i)));
  const double rtol = interim_rtol(dtype);
  return {rtol, rtol * std::max(scale, 1e-30)};
}

struct Outcome {
  std::string file, component, error;
  std::vector<CompareReport> reports;
  double seconds = 0;
  bool failed() const {
    return !error.empty() || reports.empty() ||
           std::any_of(reports.begin(), reports.end(), [](const CompareReport& r) { return !r.ok(); });
  }
};

// Runs one case; on MPI every process calls this, and only rank 0 compares.
Outcome run_case(const std::string& file, const ParallelConfig& pc, const opt::OptimizedOptions& o, opt::Comm* comm) {
  Outcome out;
  out.file = file;
  const auto start = std::chrono::steady_clock::now();
  try {
    const Case c = read_case(file);
    out.component = c.component;
    opt::throw_if_unrunnable(c, pc);  // the same verdict on every rank, before any collective
    opt::OptimizedResult got;
    if (comm) {
      // One rank failing mid-run leaves its peers waiting in a collective:
      // end the whole job with the failed rank's error (never a hang).
      try {
        got = opt::run_optimized_rank(c, pc, o, *comm);
      } catch (const std::exception& e) {
        std::cout.flush();
        comm->abort(fmt::format("{}: {}", file, e.what()));
      }
    } else {
      got = opt::run_optimized(c, pc, o);
    }
    if (comm && comm->rank() != 0) return out;
    const ref::ReferenceResult want = parity::expected_for_layout(c, pc, opt::optimized_micro_batches(c, pc, o));
    for (const auto& [name, expected] : want.tensors) {
      if (name.rfind("outputs.intermediate.", 0) == 0) continue;
      auto it = got.tensors.find(name);
      if (it == got.tensors.end()) {
        throw Error(fmt::format("the optimized run produced no {} (the reference did)", name));
      }
      out.reports.push_back(compare(name, expected, it->second, tolerance_for(expected, o.dtype)));
    }
  } catch (const Error& e) {
    out.error = e.what();
  } catch (const std::bad_alloc&) {
    out.error = "out of memory running this case";
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

void print(const Outcome& v, const std::string& layout, const std::string& dtype, bool quiet) {
  std::cout << fmt::format("{}{} ({}) on {} in {}{}\n", quiet ? (v.failed() ? "FAIL " : "PASS ") : "", v.file,
                           v.component.empty() ? "unreadable" : v.component, layout, dtype,
                           quiet ? fmt::format(", {:.2f} s", v.seconds) : "");
  if (!v.error.empty()) {
    std::cout << fmt::format("  ERROR {}\n", v.error);
    return;
  }
  size_t width = 4;
  for (const auto& r : v.reports) width = std::max(width, r.name.size());
  for (const auto& r : v.reports) {
    if (quiet && r.ok()) continue;
    std::cout << fmt::format("  {}  {:<{}}  max_abs {:9.3e}  max_rel {:9.3e}  atol {:.1e}\n", r.ok() ? "PASS" : "FAIL",
                             r.name, width, r.max_abs_error, r.max_rel_error, r.tolerance.atol);
    if (!r.ok()) std::cout << "        " << r.summary() << "\n";
  }
}

int run(const OptimizedCmdOptions& opts) {
  const ParallelConfig pc = ParallelConfig::parse_layout(opts.layout);
  opt::OptimizedOptions o;
  o.dtype = dtype_from_name(opts.dtype).value();
  o.backend = opts.backend;
  o.micro_batches = opts.micro_batches;
  o.timeout = std::chrono::milliseconds(static_cast<int64_t>(opts.timeout_s * 1000));
  opt::Comm* comm = nullptr;
#if PARITRON_HAVE_MPI
  std::unique_ptr<opt::MpiSession> session;
  std::unique_ptr<opt::MpiComm> mpi;
  std::unique_ptr<opt::Comm> nccl;
  if (opt::mpi_launched()) {
    session = std::make_unique<opt::MpiSession>(nullptr, nullptr);
    if (o.backend == "cuda") {
      // GPU tensors between processes: NCCL, one GPU per process.
#if defined(PARITRON_HAVE_NCCL)
      nccl = std::make_unique<opt::NcclComm>(o.timeout);
      comm = nccl.get();
#else
      throw Error("--backend cuda under mpirun needs the NCCL comm: this build has no NCCL");
#endif
    } else {
      mpi = std::make_unique<opt::MpiComm>();
      mpi->set_timeout(o.timeout);
      comm = mpi.get();
    }
  }
#endif
  const bool reporter = comm == nullptr || comm->rank() == 0;
  int64_t passed = 0, failed = 0, errors = 0;
  nlohmann::ordered_json cases = nlohmann::ordered_json::array();
  for (const auto& file : opts.files) {
    const Outcome v = run_case(file, pc, o, comm);
#if PARITRON_HAVE_MPI
    // Rank 0 computes the reference after the run, which can take longer
    // than the comm timeout: wait for it outside the watchdog before the next
    // case's first collective (a rank that dies still ends the job: mpirun
    // kills the rest).
    if (mpi || nccl) MPI_Barrier(MPI_COMM_WORLD);
#endif
    if (!reporter) continue;
    print(v, pc.layout_name(), opts.dtype, opts.quiet);
    errors += v.error.empty() ? 0 : 1;
    for (const auto& r : v.reports) (r.ok() ? passed : failed) += 1;
    nlohmann::ordered_json tensors = nlohmann::ordered_json::array();
    for (const auto& r : v.reports) {
      tensors.push_back({{"name", r.name}, {"passed", r.ok()}, {"max_abs_error", r.max_abs_error},
                         {"max_rel_error", r.max_rel_error}, {"atol", r.tolerance.atol}, {"rtol", r.tolerance.rtol}});
    }
    cases.push_back({{"file", v.file}, {"component", v.component}, {"layout", pc.layout_name()},
                     {"dtype", opts.dtype}, {"comm", comm ? std::string(comm->name()) : std::string(o.backend == "cuda" ? "device-threads" : "threads")}, {"passed", !v.failed()},
                     {"error", v.error.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(v.error)},
                     {"seconds", v.seconds}, {"tensors", tensors}});
  }
  if (!reporter) return kExitOk;
  std::cout << fmt::format("{} passed, {} failed\n", passed, failed);
  if (!opts.json_file.empty()) {
    std::ofstream out(opts.json_file);
    if (!out) throw Error(fmt::format("cannot write the JSON report to '{}'", opts.json_file));
    out << nlohmann::ordered_json{{"summary", {{"cases", opts.files.size()}, {"passed", passed}, {"failed", failed},
                                               {"errors", errors}}},
                                  {"cases", cases}}
               .dump(2)
        << "\n";
  }
  if (errors > 0) return kExitBadInput;
  return failed > 0 ? kExitCheckFailed : kExitOk;
}

}  // namespace

void register_optimized(CLI::App& app, Action& action) {
  auto opts = std::make_shared<OptimizedCmdOptions>();
  CLI::App* cmd = app.add_subcommand(
      "optimized",
      "Run the optimized implementation on a parallel layout and compare every output and gradient with the\n"
      "float64 reference. In-process ranks by default; under `mpirun -np N` one rank per process.");
  cmd->add_option("cases", opts->files, "case files (.safetensors)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--layout", opts->layout, "parallel layout, e.g. tp2-pp2-dp2-sp, cp2, dp2-ep2 (default tp1)");
  cmd->add_option("--dtype", opts->dtype, "params and activations: F32 (default), BF16, F16, F64")
      ->check(CLI::IsMember({"F64", "F32", "BF16", "F16"}));
  cmd->add_option("--backend", opts->backend, "kernel backend (default cpu)");
  cmd->add_option("--micro-batches", opts->micro_batches, "pipeline micro-batches per data-parallel rank (default: up to 2*pp)");
  cmd->add_option("--timeout", opts->timeout_s, "seconds a collective waits for its peers before failing (default 120)");
  cmd->add_option("--json", opts->json_file, "also write a machine-readable report to FILE");
  cmd->add_flag("-q,--quiet", opts->quiet, "one line per case; tensors only when they fail");
  cmd->callback([opts, &action] { action = [opts] { return run(*opts); }; });
}

}  // namespace paritron::cli
