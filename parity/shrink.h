// Shrinking a failing sweep case (issue #6). The Philox path
// (draw_case_spec) has no RapidCheck shrink tree, so shrinking works on the
// decision list: every Chooser::integer(lo, hi) call build_case_spec makes
// (lo < hi; fixed ones make no decision), in order. A RecordingChooser
// records them under the Philox chooser; a ReplayChooser replays a list of
// values (clamped into the [lo, hi] asked now, lo past the end), so any list
// of integers is a valid spec: lowering one decision is a simpler case.
//
// shrink_case() lowers decisions greedily while a predicate ("rerun the case;
// does it still fail?") holds: for each decision, lo first, then every value
// up from lo when the distance is small (<= 8), else RapidCheck's halving
// (v - d, v - d/2, ..., v - 1 with d = v - lo); a decision that vanishes
// with a lowered one (a MoE block switched off) also has the entries after
// it dropped in a second try. Passes repeat until a pass changes nothing or
// the budget (predicate calls, seconds) is spent. After every accepted step
// the list is the replay's normalized list (values actually used, trailing
// lo's trimmed), which is also the one-line repro:
//   `paritron parity --decisions 3,1,0,2 [the sweep's filter / --profile]`
//   = draw_case_spec_from_decisions(parse_decisions("3,1,0,2"), filter).
// The filter (component, dtype, layout, profile) must be the sweep's: the
// decisions are relative to it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "parity/generators.h"

namespace paritron::parity {

struct Decision {
  int64_t lo = 0, hi = 0, value = 0;
  bool operator==(const Decision&) const = default;
};

// Passes every draw to `inner` and records (lo, hi, value).
class RecordingChooser final : public Chooser {
 public:
  explicit RecordingChooser(Chooser& inner) : inner_(inner) {}
  const std::vector<Decision>& decisions() const { return decisions_; }

 protected:
  int64_t draw(int64_t lo, int64_t hi) override;

 private:
  Chooser& inner_;
  std::vector<Decision> decisions_;
};

// Replays `values`: draw j returns clamp(values[j], lo, hi), lo past the end;
// records what it returned.
class ReplayChooser final : public Chooser {
 public:
  explicit ReplayChooser(std::vector<int64_t> values) : values_(std::move(values)) {}
  const std::vector<Decision>& decisions() const { return decisions_; }

 protected:
  int64_t draw(int64_t lo, int64_t hi) override;

 private:
  std::vector<int64_t> values_;
  size_t next_ = 0;
  std::vector<Decision> decisions_;
};

struct RecordedSpec {
  CaseSpec spec;
  std::vector<Decision> decisions;
};

// draw_case_spec(seed, filter) and its decisions.
RecordedSpec record_case_spec(uint64_t seed, const SpecFilter& filter = {});
// The spec a decision list gives (and the decisions it used, normalized).
RecordedSpec replay_case_spec(const std::vector<int64_t>& values, const SpecFilter& filter = {});
CaseSpec draw_case_spec_from_decisions(const std::vector<int64_t>& values, const SpecFilter& filter = {});

// The values of a decision list, with trailing decisions at their lo dropped
// (the replay gives lo past the end): the shortest list with the same spec.
std::vector<int64_t> decision_values(const std::vector<Decision>& decisions);
// "3,1,0,2" and back (the empty list prints as "0", which replays the same:
// every decision's lo is >= 0); parse throws Error on anything but
// comma-separated integers (whitespace allowed; "" is the empty list).
std::string format_decisions(const std::vector<int64_t>& values);
std::vector<int64_t> parse_decisions(const std::string& text);

// Whether a spec still fails. An exception thrown counts as "does not fail"
// (make the predicate catch what it means as a failure).
using StillFails = std::function<bool(const CaseSpec&)>;

struct ShrinkBudget {
  int64_t max_calls = 200;    // predicate calls
  double max_seconds = 120;   // wall clock, checked before each call
};

struct ShrinkResult {
  CaseSpec spec;                   // the smallest failing spec found (the input's when nothing shrank)
  std::vector<int64_t> decisions;  // its normalized decision list (decision_values)
  std::string repro_decisions;     // format_decisions(decisions)
  int64_t calls = 0;               // predicate calls made
  int64_t steps = 0;               // accepted shrinks
  int64_t passes = 0;
  double seconds = 0;
  bool budget_exhausted = false;   // stopped by the budget, not by a pass without change
};

// Shrinks the failing spec that `values` gives under `filter` (the start is
// assumed to fail and is not rerun).
ShrinkResult shrink_case(const std::vector<int64_t>& values, const SpecFilter& filter, const StillFails& still_fails,
                         const ShrinkBudget& budget = {});
// The same from the seed draw_case_spec was given: case_seed(seed, index)
// for a sweep case drawn once; after near-tie redraws, the last attempt's
// seed (parity/sweep.cpp attempt_seed(seed, index, r.resampled.size())).
ShrinkResult shrink_drawn_case(uint64_t draw_seed, const SpecFilter& filter, const StillFails& still_fails,
                               const ShrinkBudget& budget = {});

}  // namespace paritron::parity
