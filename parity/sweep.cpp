#include "parity/sweep.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>

#include "common/error.h"
#include "optimized/run_case.h"
#include "parity/expected.h"
#include "parity/near_ties.h"
#include "parity/profile.h"
#include "parity/sensitivity.h"
#include "reference/make_case.h"

namespace paritron::parity {
namespace {

// A case whose router is within its dtype's resolution of a tie is redrawn
// (parity/near_ties.h), from a seed derived from the case's, at most this
// many times; the count is reported.
constexpr int kMaxResamples = 16;

std::string repro_line(uint64_t seed, uint64_t index, const SweepFilterArgs& args) {
  return fmt::format("paritron parity --seed {} --case {}{}", seed, index, filter_flags(args));
}

}  // namespace

std::string filter_flags(const SweepFilterArgs& args) {
  std::string s;
  if (!args.component.empty()) s += " --component " + args.component;
  if (!args.dtype.empty()) s += " --dtype " + args.dtype;
  if (!args.layout.empty()) s += " --layout " + args.layout;
  if (!args.profile.empty()) s += " --profile " + args.profile;
  if (!args.fault.empty()) s += " --fault " + args.fault;
  if (!args.backend.empty() && args.backend != "cpu") s += " --backend " + args.backend;
  return s;
}

namespace {
std::string& backend_setting() {
  static std::string name = "cpu";
  return name;
}
}  // namespace

void set_sweep_backend(const std::string& name) { backend_setting() = name.empty() ? "cpu" : name; }
const std::string& sweep_backend() { return backend_setting(); }

const TensorVerdict* CaseResult::worst() const {
  const TensorVerdict* w = nullptr;
  for (const TensorVerdict& v : verdicts) {
    if (v.skipped) continue;
    if (w == nullptr || v.ratio() > w->ratio()) w = &v;
  }
  return w;
}

double CaseResult::needed_k() const {
  double k = 0;
  for (const TensorVerdict& v : verdicts) {
    if (!v.skipped && !v.integral) k = std::max(k, v.needed_k);
  }
  return k;
}

SpecFilter make_filter(const SweepFilterArgs& args) {
  SpecFilter f;
  if (!args.component.empty()) {
    const auto& all = generated_components();
    if (std::find(all.begin(), all.end(), args.component) == all.end()) {
      std::string names;
      for (const auto& c : all) names += (names.empty() ? "" : ", ") + c;
      throw Error(fmt::format("--component {}: not a component the sweep draws ({})", args.component, names));
    }
    f.component = args.component;
  }
  if (!args.dtype.empty()) f.dtype = parse_spec_dtype(args.dtype);
  if (!args.layout.empty()) f.layout = ParallelConfig::parse_layout(args.layout);
  if (!args.profile.empty()) f.profile = load_profile(args.profile);
  return f;
}

uint64_t attempt_seed(uint64_t seed, uint64_t index, int attempt) {
  const uint64_t first = case_seed(seed, index);
  return attempt == 0 ? first : case_seed(first, static_cast<uint64_t>(attempt));
}

namespace {

// The reference side of a case: the truth, the emulation of the run's dtype,
// the perturbed truth (the sensitivity term) and the near-tie verdict
// (nothing the optimized side does can influence them).
struct ReferenceSide {
  opt::OptimizedOptions options;
  int64_t micro_batches = 1;
  ref::ReferenceResult truth, emulated, perturbed;  // perturbed: empty for F64 runs
  NearTie tie;
};

ReferenceSide run_reference_side(CaseResult& r) {
  ReferenceSide side;
  r.made = ref::make_case(make_options(r.spec));
  side.options = optimized_options(r.spec);
  side.options.backend = sweep_backend();
  side.micro_batches = opt::optimized_micro_batches(r.made, r.spec.layout, side.options);
  side.truth = expected_for_layout(r.made, r.spec.layout, side.micro_batches);
  ref::ReferenceOptions emulate;
  emulate.dtype = side.options.dtype;
  side.emulated = side.options.dtype == DType::F64
                      ? side.truth
                      : expected_for_layout(r.made, r.spec.layout, side.micro_batches, emulate);
  std::vector<const std::map<std::string, Tensor>*> drifts = {&side.emulated.tensors};
  if (side.options.dtype != DType::F64) {
    const Case shaken = perturb_case(r.made, sensitivity_roundoff(), r.spec.seed ^ 0x5e45171517ULL);
    side.perturbed = expected_for_layout(shaken, r.spec.layout, side.micro_batches);
    drifts.push_back(&side.perturbed.tensors);
  }
  side.tie = find_near_tie(side.truth.tensors, drifts, side.options.dtype, r.spec.dtype, r.made.config);
  return side;
}

// The optimized run and its verdicts.
void judge_optimized(CaseResult& r, const ReferenceSide& side) {
  if (side.tie.resolution > 0) {
    r.closest_decision = fmt::format("{} (margin / resolution {:.3g}){}", side.tie.describe(),
                                     side.tie.margin / side.tie.resolution,
                                     side.tie.kink && !side.tie.routing ? ": gradients not judged" : "");
  }
  const DType dtype = side.options.dtype;
  ToleranceParams p;
  if (side.tie.kink && !side.tie.routing) {
    // A ReLU pre-activation within reach of rounding: the forward is
    // continuous there, the gradients jump. Judge the outputs only.
    r.gradients_judged = false;
    for (const auto& [name, t] : side.truth.tensors) {
      if (name.rfind("grads.", 0) == 0) p.skip.insert(name);
    }
  }
  if (r.spec.dtype == DType::F8_E4M3) p.k = default_k(DType::F8_E4M3);  // fp8 GEMMs in a bf16 run
  if (dtype != DType::F64) p.perturbed = &side.perturbed.tensors;
  const opt::OptimizedResult got = opt::run_optimized(r.made, r.spec.layout, side.options);
  r.verdicts = judge(side.truth.tensors, side.emulated.tensors, got.tensors, dtype, reduction_length(r.made), p);
  r.passed = all_passed(r.verdicts);
}

template <class F>
void guarded(CaseResult& r, F&& body) {
  const auto start = std::chrono::steady_clock::now();
  try {
    body();
  } catch (const std::exception& e) {
    r.error = e.what();
    r.passed = false;
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

CaseResult run_spec_case(const CaseSpec& spec) {
  CaseResult r;
  r.spec = spec;
  guarded(r, [&] {
    const ReferenceSide side = run_reference_side(r);
    if (side.tie.routing) {
      r.near_tie = side.tie.describe();
      r.passed = true;  // not judged
      return;
    }
    judge_optimized(r, side);
  });
  return r;
}

CaseResult run_sweep_case(uint64_t seed, uint64_t index, const SpecFilter& filter, const SweepFilterArgs& args) {
  CaseResult r;
  r.index = index;
  r.repro = repro_line(seed, index, args);
  guarded(r, [&] {
    for (int attempt = 0;; ++attempt) {
      r.spec = draw_case_spec(attempt_seed(seed, index, attempt), filter);
      const ReferenceSide side = run_reference_side(r);
      if (side.tie.routing && attempt < kMaxResamples) {
        r.resampled.push_back(fmt::format("{}: {}", describe(r.spec), side.tie.describe()));
        continue;
      }
      if (side.tie.routing) r.near_tie = side.tie.describe();  // judged anyway: the draws ran out
      judge_optimized(r, side);
      return;
    }
  });
  return r;
}

}  // namespace paritron::parity
