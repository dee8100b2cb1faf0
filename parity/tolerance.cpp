#include "parity/tolerance.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "common/error.h"

namespace paritron::parity {

// Measured (parity/README.md, "Tolerance model"): over ~68,000 tensors per
// dtype (4,864 cases), the smallest floor with error / bound <= 0.5 (a 2x
// margin) on every tensor at k = 2.
double default_k(DType dtype) {
  (void)dtype;
  return 2.0;
}

double default_c(DType dtype) {
  switch (dtype) {
    case DType::BF16:
    case DType::F16: return 0.5;
    default: return 2.0;  // F32 (and F64, F8: not measured; see parity/README.md)
  }
}

double unit_roundoff(DType dtype) {
  const math::FloatFormat* f = float_format(dtype);
  if (dtype == DType::F64) return std::ldexp(1.0, -53);
  if (!f) throw Error(fmt::format("unit_roundoff: {} is not a floating dtype", dtype_name(dtype)));
  return std::ldexp(1.0, -(f->mantissa_bits + 1));
}

int64_t reduction_length(const Case& c) {
  const TransformerConfig& cfg = c.config;
  const int64_t h = cfg.hidden_size;
  int64_t n = std::max<int64_t>(1, h);
  n = std::max(n, cfg.ffn_hidden_size.value_or(4 * h));
  if (cfg.moe_ffn_hidden_size) n = std::max(n, *cfg.moe_ffn_hidden_size);
  n = std::max(n, cfg.num_attention_heads * cfg.kv_channels.value_or(cfg.num_attention_heads ? h / cfg.num_attention_heads : h));
  auto it = c.tensors.find("inputs.hidden_states");
  if (it != c.tensors.end() && it->second.dim() >= 2) {
    const Shape& s = it->second.shape();
    n = std::max(n, s[0]);                                  // key length of self attention
    n = std::max(n, it->second.numel() / std::max<int64_t>(1, s.back()));  // tokens
  }
  auto ctx = c.tensors.find("inputs.context");
  if (ctx != c.tensors.end() && ctx->second.dim() >= 1) n = std::max(n, ctx->second.shape()[0]);
  return n;
}

double TensorVerdict::ratio() const {
  if (bound > 0) return error / bound;
  return error > 0 ? std::numeric_limits<double>::infinity() : 0.0;
}

std::string TensorVerdict::summary() const {
  if (skipped) return fmt::format("SKIP {} (judged elsewhere)", name);
  std::string s = fmt::format("{} {} error {:.3e} bound {:.3e} (k*ref {:.3e} + floor {:.3e})", passed ? "PASS" : "FAIL",
                              name, error, bound, bound - floor, floor);
  if (worst_index >= 0) s += fmt::format(" worst [{}] expected {:.9g} actual {:.9g}", worst_index, expected, actual);
  if (!note.empty()) s += " (" + note + ")";
  return s;
}

namespace {

struct MaxError {
  double error = 0;
  int64_t index = -1;
};

// max |a - t| with non-finite handling: a mismatch of non-finite values is +inf.
MaxError max_error(const Tensor& truth, const Tensor& a) {
  MaxError m;
  for (int64_t i = 0; i < truth.numel(); ++i) {
    const double t = truth.get(i), x = a.get(i);
    double e;
    if (std::isfinite(t)) {
      e = std::isfinite(x) ? std::abs(x - t) : std::numeric_limits<double>::infinity();
    } else {
      e = (std::isnan(t) ? std::isnan(x) : x == t) ? 0.0 : std::numeric_limits<double>::infinity();
    }
    if (e > m.error || (m.index < 0 && e > 0)) {
      m.error = e;
      m.index = i;
    }
  }
  return m;
}

}  // namespace

namespace {

// "outputs" or "grads" (the part of a case-file name before the first dot).
std::string family_of(const std::string& name) { return name.substr(0, name.find('.')); }

}  // namespace

std::vector<TensorVerdict> judge(const std::map<std::string, Tensor>& truth,
                                 const std::map<std::string, Tensor>& emulated,
                                 const std::map<std::string, Tensor>& actual, DType dtype,
                                 int64_t reduction_length, const ToleranceParams& p) {
  const double k = p.k > 0 ? p.k : default_k(dtype);
  const double c = p.c > 0 ? p.c : default_c(dtype);
  const double u = unit_roundoff(dtype);
  const double root_n = std::sqrt(static_cast<double>(std::max<int64_t>(1, reduction_length)));
  // Rounding errors come from the magnitudes a computation passes through,
  // not from its result: a gradient that cancels to ~0 (a LayerNorm over 2
  // features, a fully masked key) still carries the rounding of its terms.
  // So the floor's scale is at least the largest magnitude of the tensor's
  // family (every output, or every gradient) of the case.
  std::map<std::string, double> family_scale;
  for (const auto& [name, t] : truth) {
    if (!is_floating(t.dtype())) continue;
    double& f = family_scale[family_of(name)];
    for (int64_t i = 0; i < t.numel(); ++i) {
      const double x = t.get(i);
      if (std::isfinite(x)) f = std::max(f, std::abs(x));
    }
  }
  std::vector<TensorVerdict> out;
  for (const auto& [name, t] : truth) {
    TensorVerdict v;
    v.name = name;
    if (p.skip.count(name)) {
      v.passed = v.skipped = true;
      out.push_back(v);
      continue;
    }
    auto a = actual.find(name);
    if (a == actual.end()) {
      if (!p.optional_prefix.empty() && name.rfind(p.optional_prefix, 0) == 0) continue;
      v.note = "missing from the actual result";
      out.push_back(v);
      continue;
    }
    if (a->second.shape() != t.shape()) {
      v.note = "shape differs from the truth";
      out.push_back(v);
      continue;
    }
    v.integral = !is_floating(t.dtype()) || !is_floating(a->second.dtype());
    const MaxError e = max_error(t, a->second);
    v.error = e.error;
    v.worst_index = e.index;
    if (e.index >= 0) {
      v.expected = t.get(e.index);
      v.actual = a->second.get(e.index);
    }
    if (v.integral) {
      // Exact; compared through double, which holds every index and count
      // the harness produces (< 2^53).
      v.passed = v.error == 0;
      out.push_back(v);
      continue;
    }
    for (int64_t i = 0; i < t.numel(); ++i) {
      const double x = t.get(i);
      if (std::isfinite(x)) v.scale = std::max(v.scale, std::abs(x));
    }
    auto em = emulated.find(name);
    if (em != emulated.end() && em->second.shape() == t.shape()) {
      v.reference_error = max_error(t, em->second).error;
      if (!std::isfinite(v.reference_error)) v.reference_error = 0;  // an overflowing emulation excuses nothing
    }
    v.floor = c * u * root_n * std::max(v.scale, family_scale[family_of(name)]);
    v.bound = k * v.reference_error + v.floor;
    v.passed = v.error <= v.bound;
    out.push_back(v);
  }
  for (const auto& [name, a] : actual) {
    if (truth.count(name) || p.skip.count(name)) continue;
    TensorVerdict v;
    v.name = name;
    v.note = "not in the truth";
    out.push_back(v);
  }
  return out;
}

bool all_passed(const std::vector<TensorVerdict>& verdicts) {
  return std::all_of(verdicts.begin(), verdicts.end(), [](const TensorVerdict& v) { return v.passed; });
}

}  // namespace paritron::parity
