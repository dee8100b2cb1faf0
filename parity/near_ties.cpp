#include "parity/near_ties.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "parity/tolerance.h"

namespace paritron::parity {
namespace {

constexpr std::string_view kTapPrefix = "outputs.intermediate.";
constexpr double kInf = std::numeric_limits<double>::infinity();

// A 2-D tap's rows (a 1-D or scalar tap is one row).
int64_t rows_of(const Tensor& t) { return t.dim() == 2 ? t.shape()[0] : 1; }

// Per row of a [rows, cols] tap: the largest drift |other - truth| over the
// other runs (same shape only), at least the median row's drift (one run's
// drift of one token is a single sample; another correct run may drift
// there as much as elsewhere) and u * the row's largest |truth|.
std::vector<double> row_resolution(const Tensor& truth, const std::vector<const Tensor*>& others, double u) {
  const int64_t rows = rows_of(truth), cols = truth.numel() / std::max<int64_t>(1, rows);
  std::vector<double> res(static_cast<size_t>(rows), 0.0), scales(static_cast<size_t>(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double scale = 0, drift = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const double t = truth.get(r * cols + c);
      if (std::isfinite(t)) scale = std::max(scale, std::abs(t));
      for (const Tensor* o : others) {
        const double d = std::abs(o->get(r * cols + c) - t);
        if (std::isfinite(d)) drift = std::max(drift, d);
      }
    }
    res[static_cast<size_t>(r)] = drift;
    scales[static_cast<size_t>(r)] = u * scale;
  }
  std::vector<double> sorted = res;
  const auto mid = sorted.begin() + static_cast<std::ptrdiff_t>(sorted.size() / 2);
  std::nth_element(sorted.begin(), mid, sorted.end());
  const double typical = sorted.empty() ? 0.0 : *mid;
  for (size_t r = 0; r < res.size(); ++r) res[r] = std::max({res[r], typical, scales[r]});
  return res;
}

// The same-shaped taps of the other runs.
std::vector<const Tensor*> others_of(const std::string& name, const Tensor& truth,
                                     const std::vector<const std::map<std::string, Tensor>*>& runs) {
  std::vector<const Tensor*> out;
  for (const auto* run : runs) {
    auto it = run->find(name);
    if (it != run->end() && it->second.shape() == truth.shape()) out.push_back(&it->second);
  }
  return out;
}

struct Worst {
  NearTie tie;
  double ratio = kInf;
  void offer(const std::string& where, double margin, double resolution) {
    if (resolution <= 0 || !std::isfinite(margin)) return;
    const double r = margin / resolution;
    if (r < ratio) {
      ratio = r;
      tie.router = where;
      tie.margin = margin;
      tie.resolution = resolution;
    }
  }
};

}  // namespace

double tie_factor(DType dtype) { return std::max(4.0, default_k(dtype)); }

std::string NearTie::describe() const {
  return fmt::format("{}: margin {:.3g} {} {} x resolution {:.3g}",
                     router.rfind("relu", 0) == 0 ? router : "router '" + router + "'", margin, near_tie ? "<" : ">=", factor, resolution);
}

NearTie find_near_tie(const std::map<std::string, Tensor>& truth,
                      const std::vector<const std::map<std::string, Tensor>*>& others, DType dtype, DType judged_as,
                      const TransformerConfig& cfg) {
  const double u = unit_roundoff(dtype);
  const bool order_matters = truth.count("outputs.router_indices") > 0;
  Worst worst, kinks;  // routing / capacity decisions; ReLU kinks
  for (const auto& [name, topk] : truth) {
    if (name.rfind(kTapPrefix, 0) != 0 || !name.ends_with("router.topk_margin")) continue;
    const std::string prefix = name.substr(0, name.size() - std::string_view("topk_margin").size());
    const std::string router = prefix.substr(kTapPrefix.size(), prefix.size() - kTapPrefix.size() - 7);  // - "router."
    // Per token: the drift of the values the choice ran on (logits, and the
    // selection values: probabilities, sigmoid or sinkhorn values, which a
    // low-precision run may round), against the token's margins.
    std::vector<double> res(static_cast<size_t>(rows_of(topk)), 0.0);
    for (const char* values : {"logits", "selection"}) {
      auto t = truth.find(prefix + values);
      if (t == truth.end() || rows_of(t->second) != rows_of(topk)) continue;
      const std::vector<double> r = row_resolution(t->second, others_of(prefix + values, t->second, others), u);
      for (size_t i = 0; i < res.size(); ++i) res[i] = std::max(res[i], r[i]);
    }
    const Tensor* order = nullptr;
    if (auto o = truth.find(prefix + "order_margin"); order_matters && o != truth.end() && o->second.numel() == topk.numel()) {
      order = &o->second;
    }
    double widest = 0;
    for (size_t i = 0; i < res.size(); ++i) {
      widest = std::max(widest, res[i]);
      worst.offer(router, topk.get(static_cast<int64_t>(i)), res[i]);
      if (order) worst.offer(router, order->get(static_cast<int64_t>(i)), res[i]);
    }
    // Capacity: which tokens an expert keeps, a choice across tokens (against
    // the widest token resolution). A margin of exactly 0 is an exact tie of
    // equal scores (e.g. every top-1 score is 1), settled by the tie rule
    // (lower token index first), not by rounding.
    if (auto c = truth.find(prefix + "capacity_margin"); c != truth.end()) {
      for (int64_t i = 0; i < c->second.numel(); ++i) {
        if (c->second.get(i) > 0) worst.offer(router, c->second.get(i), widest);
      }
    }
  }
  if (cfg.activation_func == "relu") {
    for (const auto& [name, fc1] : truth) {
      if (name.rfind(kTapPrefix, 0) != 0 || !name.ends_with("linear_fc1") || fc1.dim() != 2) continue;
      // Per row (token): the closest pre-activation to the kink against the
      // row's drift (GLU: the gate half carries the activation).
      const std::vector<double> res = row_resolution(fc1, others_of(name, fc1, others), u);
      const int64_t cols = fc1.shape()[1], gate = cfg.gated_linear_unit ? cols / 2 : cols;
      const std::string where = "relu kink at " + name.substr(kTapPrefix.size());
      for (int64_t r = 0; r < fc1.shape()[0]; ++r) {
        double m = kInf;
        for (int64_t c = 0; c < gate; ++c) m = std::min(m, std::abs(fc1.get(r * cols + c)));
        kinks.offer(where, m, res[static_cast<size_t>(r)]);
      }
    }
  }
  const double factor = tie_factor(judged_as);
  const bool routing = worst.ratio < factor, kink = kinks.ratio < factor;
  // The details of the decision that matters most: a routing tie, else a
  // kink tie, else the closest decision of either kind.
  NearTie tie = routing ? worst.tie : kink ? kinks.tie : worst.ratio <= kinks.ratio ? worst.tie : kinks.tie;
  tie.factor = factor;
  tie.routing = routing;
  tie.kink = kink;
  tie.near_tie = routing || kink;
  return tie;
}

}  // namespace paritron::parity
