// See gradcheck.h.
#include "reference/gradcheck.h"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>

#include "common/rng.h"

namespace paritron::ref {

std::string GradcheckResult::describe() const {
  std::string out = fmt::format("{} elements checked, {} failed", checked, failures.size());
  for (size_t i = 0; i < failures.size() && i < 10; ++i) {
    const auto& f = failures[i];
    out += fmt::format("\n  {}[{}, {}]: finite difference {:.12g}, analytic {:.12g}", f.tensor, f.row, f.col,
                       f.finite_difference, f.analytic);
  }
  return out;
}

GradcheckResult gradcheck(const std::function<double(const MatMap&)>& loss, const MatMap& vars,
                          const MatMap& analytic, const GradcheckOptions& options) {
  GradcheckResult result;
  MatMap perturbed = vars;
  for (const auto& [name, value] : vars) {
    auto g = analytic.find(name);
    if (g == analytic.end() || g->second.rows() != value.rows() || g->second.cols() != value.cols()) {
      result.failures.push_back({name + " (no analytic gradient of its shape)", 0, 0, 0, 0});
      continue;
    }
    const int64_t n = value.size();
    const int64_t count = std::min<int64_t>(n, options.max_elements_per_tensor);
    for (int64_t c = 0; c < count; ++c) {
      // Evenly spread indices, always including the first and the last element.
      const int64_t i = count == 1 ? 0 : c * (n - 1) / (count - 1);
      Mat& m = perturbed.at(name);
      const double original = m.data()[i];
      m.data()[i] = original + options.eps;
      const double up = loss(perturbed);
      m.data()[i] = original - options.eps;
      const double down = loss(perturbed);
      m.data()[i] = original;
      const double fd = (up - down) / (2 * options.eps);
      const double an = g->second.data()[i];
      ++result.checked;
      if (!(std::abs(fd - an) <= options.atol + options.rtol * std::max(std::abs(fd), std::abs(an)))) {
        result.failures.push_back({name, i / value.cols(), i % value.cols(), fd, an});
      }
    }
  }
  return result;
}

Mat random_normal(int64_t rows, int64_t cols, uint64_t seed, std::string_view name, double stddev) {
  Tensor t(DType::F64, {rows, cols});
  fill_normal(t, rng_key(seed, name), 0, 0.0, stddev);
  return to_mat(t, cols);
}

Mat random_uniform(int64_t rows, int64_t cols, uint64_t seed, std::string_view name, double low, double high) {
  Tensor t(DType::F64, {rows, cols});
  fill_uniform(t, rng_key(seed, name), 0, low, high);
  return to_mat(t, cols);
}

}  // namespace paritron::ref
