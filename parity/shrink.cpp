// See shrink.h: decision lists, their replay, greedy shrinking over them.
#include "parity/shrink.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <optional>

#include "common/error.h"

namespace paritron::parity {

int64_t RecordingChooser::draw(int64_t lo, int64_t hi) {
  const int64_t v = inner_.integer(lo, hi);
  decisions_.push_back({lo, hi, v});
  return v;
}

int64_t ReplayChooser::draw(int64_t lo, int64_t hi) {
  const int64_t v = next_ < values_.size() ? std::clamp(values_[next_], lo, hi) : lo;
  ++next_;
  decisions_.push_back({lo, hi, v});
  return v;
}

RecordedSpec record_case_spec(uint64_t seed, const SpecFilter& filter) {
  PhiloxChooser philox(seed);
  RecordingChooser rec(philox);
  CaseSpec spec = build_case_spec(rec, filter);
  return {std::move(spec), rec.decisions()};
}

RecordedSpec replay_case_spec(const std::vector<int64_t>& values, const SpecFilter& filter) {
  ReplayChooser replay(values);
  CaseSpec spec = build_case_spec(replay, filter);
  return {std::move(spec), replay.decisions()};
}

CaseSpec draw_case_spec_from_decisions(const std::vector<int64_t>& values, const SpecFilter& filter) {
  return replay_case_spec(values, filter).spec;
}

std::vector<int64_t> decision_values(const std::vector<Decision>& decisions) {
  size_t n = decisions.size();
  while (n > 0 && decisions[n - 1].value == decisions[n - 1].lo) --n;
  std::vector<int64_t> values;
  values.reserve(n);
  for (size_t i = 0; i < n; ++i) values.push_back(decisions[i].value);
  return values;
}

std::string format_decisions(const std::vector<int64_t>& values) {
  std::string out;
  for (int64_t v : values) {
    if (!out.empty()) out += ',';
    out += std::to_string(v);
  }
  return out.empty() ? "0" : out;  // every lo is >= 0: "0" replays as the empty list
}

std::vector<int64_t> parse_decisions(const std::string& text) {
  std::vector<int64_t> values;
  size_t i = 0;
  auto skip_space = [&] {
    while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  };
  skip_space();
  if (i == text.size()) return values;
  while (true) {
    skip_space();
    const size_t start = i;
    if (i < text.size() && (text[i] == '-' || text[i] == '+')) ++i;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
    const std::string number = text.substr(start, i - start);
    if (number.empty() || number == "-" || number == "+") {
      throw Error(fmt::format("decisions '{}': expected comma-separated integers (at character {})", text, start + 1));
    }
    try {
      values.push_back(std::stoll(number));
    } catch (const std::exception&) {
      throw Error(fmt::format("decisions '{}': {} is out of range", text, number));
    }
    skip_space();
    if (i == text.size()) break;
    if (text[i] != ',') {
      throw Error(fmt::format("decisions '{}': expected ',' at character {}", text, i + 1));
    }
    ++i;
  }
  return values;
}

namespace {

// The values to try for a decision at `v` in [lo, hi], simplest first.
std::vector<int64_t> candidates(int64_t lo, int64_t v) {
  std::vector<int64_t> out;
  if (v <= lo) return out;
  const int64_t d = v - lo;
  if (d <= 8) {
    for (int64_t c = lo; c < v; ++c) out.push_back(c);
    return out;
  }
  for (int64_t step = d; step > 0; step /= 2) out.push_back(v - step);
  return out;
}

class Shrinker {
 public:
  Shrinker(const SpecFilter& filter, const StillFails& still_fails, const ShrinkBudget& budget)
      : filter_(filter), still_fails_(still_fails), budget_(budget), start_(std::chrono::steady_clock::now()) {}

  ShrinkResult run(const std::vector<int64_t>& values) {
    RecordedSpec current = replay_case_spec(values, filter_);
    seen_.push_back(current.spec);
    bool changed = true;
    while (changed && !exhausted_) {
      changed = false;
      ++result_.passes;
      for (size_t i = 0; i < current.decisions.size() && !exhausted_; ++i) {
        // Lower decision i as far as it goes (restart from each accepted value).
        bool lowered = true;
        while (lowered && !exhausted_ && i < current.decisions.size()) {
          lowered = false;
          const Decision d = current.decisions[i];
          for (int64_t c : candidates(d.lo, d.value)) {
            std::vector<int64_t> trial = full_values(current);
            trial[i] = c;
            std::optional<RecordedSpec> next = try_values(trial);
            if (!next && c == d.lo && !exhausted_) {
              // Lowering decision i may add or remove decisions after it (a
              // feature switched off, another component): the later values
              // then land on other decisions. Realign them by the decisions'
              // [lo, hi] and try once more.
              if (std::optional<std::vector<int64_t>> aligned = realigned(current, trial, i)) next = try_values(*aligned);
            }
            if (exhausted_) break;
            if (next) {
              current = std::move(*next);
              ++result_.steps;
              changed = lowered = true;
              break;
            }
          }
        }
      }
    }
    result_.spec = current.spec;
    result_.decisions = decision_values(current.decisions);
    result_.repro_decisions = format_decisions(result_.decisions);
    result_.budget_exhausted = exhausted_;
    result_.seconds = elapsed();
    return result_;
  }

 private:
  double elapsed() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

  static std::vector<int64_t> full_values(const RecordedSpec& r) {
    std::vector<int64_t> v;
    v.reserve(r.decisions.size());
    for (const Decision& d : r.decisions) v.push_back(d.value);
    return v;
  }

  // The values of `current` after position i moved onto the decisions the
  // replay of `trial` makes (a longest common subsequence of the [lo, hi]
  // signatures; unmatched new decisions take lo), iterated while the structure
  // changes; nullopt when it gives nothing new.
  std::optional<std::vector<int64_t>> realigned(const RecordedSpec& current, const std::vector<int64_t>& trial,
                                                size_t i) const {
    const std::vector<Decision>& c = current.decisions;
    std::vector<int64_t> values = trial;
    std::optional<RecordedSpec> probe = replay(values);
    for (int round = 0; round < 4 && probe; ++round) {
      const std::vector<Decision>& p = probe->decisions;
      const size_t n = c.size() > i + 1 ? c.size() - (i + 1) : 0;
      const size_t m = p.size() > i + 1 ? p.size() - (i + 1) : 0;
      auto same = [&](size_t a, size_t b) { return c[i + 1 + a].lo == p[i + 1 + b].lo && c[i + 1 + a].hi == p[i + 1 + b].hi; };
      std::vector<std::vector<int>> lcs(n + 1, std::vector<int>(m + 1, 0));  // suffix LCS lengths
      for (size_t a = n; a-- > 0;) {
        for (size_t b = m; b-- > 0;) {
          lcs[a][b] = same(a, b) ? lcs[a + 1][b + 1] + 1 : std::max(lcs[a + 1][b], lcs[a][b + 1]);
        }
      }
      std::vector<int64_t> next(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(std::min(values.size(), i + 1)));
      size_t a = 0, b = 0;
      while (b < m) {
        if (a < n && same(a, b) && lcs[a][b] == lcs[a + 1][b + 1] + 1) {
          next.push_back(c[i + 1 + a].value);
          ++a;
          ++b;
        } else if (a < n && lcs[a + 1][b] >= lcs[a][b + 1]) {
          ++a;  // a decision that is gone
        } else {
          next.push_back(p[i + 1 + b].lo);  // a new decision
          ++b;
        }
      }
      if (next == values) break;
      values = std::move(next);
      probe = replay(values);
    }
    if (!probe || values == trial) return std::nullopt;
    return values;
  }

  std::optional<RecordedSpec> replay(const std::vector<int64_t>& values) const {
    try {
      return replay_case_spec(values, filter_);
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }

  // The replayed spec when it is new and still fails; nullopt otherwise (or
  // when the budget is spent, which sets exhausted_).
  std::optional<RecordedSpec> try_values(const std::vector<int64_t>& values) {
    std::optional<RecordedSpec> r = replay(values);
    if (!r) return std::nullopt;
    if (std::find(seen_.begin(), seen_.end(), r->spec) != seen_.end()) return std::nullopt;
    if (result_.calls >= budget_.max_calls || elapsed() >= budget_.max_seconds) {
      exhausted_ = true;
      return std::nullopt;
    }
    seen_.push_back(r->spec);
    ++result_.calls;
    bool fails = false;
    try {
      fails = still_fails_(r->spec);
    } catch (const std::exception&) {
      fails = false;
    }
    if (!fails) return std::nullopt;
    return r;
  }

  const SpecFilter& filter_;
  const StillFails& still_fails_;
  ShrinkBudget budget_;
  std::chrono::steady_clock::time_point start_;
  std::vector<CaseSpec> seen_;
  ShrinkResult result_;
  bool exhausted_ = false;
};

}  // namespace

ShrinkResult shrink_case(const std::vector<int64_t>& values, const SpecFilter& filter, const StillFails& still_fails,
                         const ShrinkBudget& budget) {
  return Shrinker(filter, still_fails, budget).run(values);
}

ShrinkResult shrink_drawn_case(uint64_t draw_seed, const SpecFilter& filter, const StillFails& still_fails,
                               const ShrinkBudget& budget) {
  const RecordedSpec recorded = record_case_spec(draw_seed, filter);
  return shrink_case(decision_values(recorded.decisions), filter, still_fails, budget);
}

}  // namespace paritron::parity
