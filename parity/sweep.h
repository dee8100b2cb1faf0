// One parity case of a sweep: draw a CaseSpec (parity/generators.h) from
// (sweep seed, case index), make the case with the reference, run the
// optimized side on the spec's layout and dtype, and judge every output and
// gradient with the tolerance model (parity/tolerance.h) against the float64
// truth, using the reference emulating the same dtype for the error budget
// (both per token group where a MoE router couples tokens, parity/expected.h).
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
};

struct CaseResult {
  uint64_t index = 0;
  CaseSpec spec;
  bool passed = false;
  std::string error;                    // the case could not be made or run (a failure too)
  std::vector<TensorVerdict> verdicts;
  const TensorVerdict* worst() const;   // the verdict with the largest error / bound (null if none)
  int64_t routing_ties = 0;             // MoE choices that differ from the truth's, not judged (near-ties)
  double seconds = 0;
  std::string repro;
  Case made;                            // the case file (kept for --save-failures)
};

// The filter a command line asks for (throws Error for an unknown component,
// dtype or layout).
SpecFilter make_filter(const SweepFilterArgs& args);

CaseResult run_sweep_case(uint64_t seed, uint64_t index, const SpecFilter& filter, const SweepFilterArgs& args);

}  // namespace paritron::parity
