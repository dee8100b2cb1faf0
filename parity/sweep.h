// One parity case of a sweep: draw a CaseSpec (parity/generators.h) from
// (sweep seed, case index), make the case with the reference, compute the
// float64 truth, the reference emulating the run's dtype and the truth of the
// perturbed case (parity/sensitivity.h) (all per token group where a MoE
// router couples tokens, parity/expected.h); redraw while a routing, capacity
// or ReLU decision is a near tie (parity/near_ties.h); run the optimized side
// on the spec's layout and dtype, and judge every output and gradient with
// the tolerance model (parity/tolerance.h).
//
// A case is reproduced exactly by its (seed, index) and the sweep's filter:
// `repro` is the command line that reruns it alone.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/case_file.h"
#include "parity/generators.h"
#include "parity/tolerance.h"

namespace paritron::parity {

struct SweepFilterArgs {  // the filter as the command line spells it, for repro lines
  std::string component, dtype, layout;
  std::string profile;  // --profile NAME (fixtures/profiles/NAME.json) or a file
  std::string fault;    // --fault NAME (a -DPARITRON_FAULTS=ON build): part of the repro, not of the draw
  std::string backend;  // --backend NAME (empty: cpu): part of the repro, not of the draw
};

// The optimized side's kernel backend for every case this process runs
// ("cpu" unless set; `paritron parity --backend cuda`). A process-wide
// setting, like an injected fault: the cases and their draws do not depend
// on it, only the side under test does.
void set_sweep_backend(const std::string& name);
const std::string& sweep_backend();

struct CaseResult {
  uint64_t index = 0;
  CaseSpec spec;
  bool passed = false;
  std::string error;                    // the case could not be made or run (a failure too)
  std::vector<TensorVerdict> verdicts;
  const TensorVerdict* worst() const;   // the verdict with the largest error / bound (null if none)
  double needed_k() const;              // the largest needed_k of the floating verdicts (calibration)
  std::vector<std::string> resampled;   // the near-tie draws replaced before this one (parity/near_ties.h)
  std::string near_tie;                 // run_spec_case: the spec is a near tie, not judged (passed stays true)
  std::string closest_decision;         // the judged case's decision closest to a tie (routing, capacity, ReLU), if any
  bool gradients_judged = true;         // false: a ReLU kink is a near tie; outputs judged, gradients not
  double seconds = 0;
  std::string repro;
  Case made;                            // the case file (kept for --save-failures)
};

// " --component C --dtype D ..." for the filters set (repro lines end with it).
std::string filter_flags(const SweepFilterArgs& args);

// The filter a command line asks for (throws Error for an unknown component,
// dtype or layout).
SpecFilter make_filter(const SweepFilterArgs& args);

// The seed case `index` of sweep `seed` is drawn from after `attempt`
// near-tie redraws (attempt 0: case_seed(seed, index)).
uint64_t attempt_seed(uint64_t seed, uint64_t index, int attempt);

// Case `index` of the sweep `seed`: drawn, redrawn while its routing is a
// near tie (up to 16 times; `resampled` lists them), run and judged (its
// outputs only when a ReLU kink is a near tie: gradients_judged = false).
CaseResult run_sweep_case(uint64_t seed, uint64_t index, const SpecFilter& filter, const SweepFilterArgs& args);

// One given spec, run and judged, without redrawing: a near tie is reported in
// `near_tie` and not judged (shrinking treats it as not failing). `index` and
// `repro` are left for the caller.
CaseResult run_spec_case(const CaseSpec& spec);

}  // namespace paritron::parity
