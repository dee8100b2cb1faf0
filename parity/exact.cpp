// See exact.h.
#include "parity/exact.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "common/error.h"

namespace paritron::parity {
namespace {

bool is_norm_component(const std::string& c) { return c == "layernorm" || c == "rmsnorm"; }

int64_t ffn_of(const TransformerConfig& cfg) { return cfg.ffn_hidden_size.value_or(4 * cfg.hidden_size); }

bool mlp_fits(const TransformerConfig& cfg, int64_t tokens, const DyadicDraw& d) {
  return mlp_exact_magnitude(cfg, tokens, d) < kFp32ExactLimit;
}

bool splits_tokens(const ParallelConfig& pc) {
  return pc.data_parallel_size > 1 || pc.context_parallel_size > 1 ||
         (pc.sequence_parallel && pc.tensor_model_parallel_size > 1);
}

}  // namespace

const std::vector<std::string>& exact_components() {
  static const std::vector<std::string> c = {"layernorm", "rmsnorm", "mlp", "rotary_pos_emb"};
  return c;
}

double mlp_exact_magnitude(const TransformerConfig& cfg, int64_t tokens, const DyadicDraw& d) {
  const double A = static_cast<double>(d.range), q = std::ldexp(1.0, static_cast<int>(d.shift));
  const double h = static_cast<double>(cfg.hidden_size), f = static_cast<double>(ffn_of(cfg));
  const double T = static_cast<double>(tokens);
  const bool bias = cfg.add_bias_linear, glu = cfg.gated_linear_unit;
  const bool squared = cfg.activation_func == "squared_relu";
  // Forward. fc1: h products of two draws (+ the bias on the same grid).
  const double Z = h * A * A + (bias ? A * q : 0.0);
  double act = squared ? Z * Z : Z;
  int grid = squared ? 4 : 2;  // the activation's resolution 2^-(grid e)
  if (glu) {
    act *= Z;
    grid += 2;
  }
  const double y = f * act * A + (bias ? A * std::pow(q, grid) : 0.0);
  // Backward. d act = dy W2^T (h terms), dz through the activation.
  const double da = h * A * A;
  double dz = squared ? 2.0 * Z * da : da;
  if (glu) dz *= Z;  // d gate = da * u * act'(g), d up = da * act(g)
  const double dw2 = T * A * act, db2 = T * A;
  const double dw1 = T * A * dz, db1 = T * dz;
  const double dx = (glu ? 2.0 : 1.0) * f * dz * A;
  return std::max({Z, act, y, da, dz, dw2, db2, dw1, db1, dx});
}

double exact_limit(DType dtype) {
  switch (dtype) {
    case DType::F64: return std::ldexp(1.0, 53);
    case DType::F32: return kFp32ExactLimit;
    case DType::F16: return std::ldexp(1.0, 11);
    case DType::BF16: return std::ldexp(1.0, 8);
    default: throw Error(fmt::format("exact mode: no exactness limit for {}", dtype_name(dtype)));
  }
}

std::optional<CaseSpec> low_precision_exact_spec(const CaseSpec& spec, DType dtype) {
  if (spec.component != "mlp" || exact_check(spec) != ExactCheck::kReference) return std::nullopt;
  if (dtype != DType::BF16 && dtype != DType::F16) return std::nullopt;
  if (!(mlp_exact_magnitude(spec.config, spec.seq * spec.batch, kIntegerDraw) < exact_limit(dtype))) return std::nullopt;
  CaseSpec s = spec;
  s.dtype = dtype;
  s.config.bf16 = dtype == DType::BF16;
  s.config.fp16 = dtype == DType::F16;
  return s;
}

ExactCheck exact_check(const CaseSpec& spec) {
  if ((spec.dtype == DType::BF16 || spec.dtype == DType::F16) && spec.component == "mlp") {
    CaseSpec fp32 = spec;
    fp32.dtype = DType::F32;
    fp32.config.bf16 = fp32.config.fp16 = false;
    return low_precision_exact_spec(fp32, spec.dtype) ? ExactCheck::kReference : ExactCheck::kNone;
  }
  if (spec.dtype != DType::F32 || spec.config.fp8 || spec.config.bf16 || spec.config.fp16) return ExactCheck::kNone;
  const std::string& c = spec.component;
  if (is_norm_component(c) || c == "rotary_pos_emb") return ExactCheck::kLayouts;
  if (c != "mlp") return ExactCheck::kNone;
  const TransformerConfig& cfg = spec.config;
  if (cfg.activation_func != "relu" && cfg.activation_func != "squared_relu") return ExactCheck::kNone;
  if (cfg.num_moe_experts) return ExactCheck::kNone;
  DyadicDraw d;
  d.range = 1;
  return mlp_fits(cfg, spec.seq * spec.batch, d) ? ExactCheck::kReference : ExactCheck::kNone;
}

bool exact_capable(const CaseSpec& spec) { return exact_check(spec) != ExactCheck::kNone; }

CaseSpec to_exact_spec(CaseSpec spec) {
  const auto& comps = exact_components();
  if (std::find(comps.begin(), comps.end(), spec.component) == comps.end()) {
    throw Error(fmt::format("component {} has no exact mode (exact mode: layernorm, rmsnorm, mlp, rotary_pos_emb)",
                            spec.component));
  }
  spec.dtype = DType::F32;
  TransformerConfig& cfg = spec.config;
  cfg.bf16 = false;
  cfg.fp16 = false;
  cfg.fp8.reset();
  if (spec.component == "mlp") {
    if (cfg.activation_func != "relu" && cfg.activation_func != "squared_relu") cfg.activation_func = "relu";
    cfg.bias_activation_fusion = false;  // only for gelu with biases or silu with GLU
    DyadicDraw d;
    d.range = 1;
    const int64_t tokens = spec.seq * spec.batch;
    if (!mlp_fits(cfg, tokens, d)) cfg.gated_linear_unit = false;
    if (!mlp_fits(cfg, tokens, d)) cfg.activation_func = "relu";
    if (!mlp_fits(cfg, tokens, d)) {
      throw Error(fmt::format("mlp h={} ffn={} tokens={}: no dyadic draw keeps it exact in fp32", cfg.hidden_size,
                              ffn_of(cfg), tokens));
    }
  }
  return spec;
}

DyadicDraw exact_draw(const CaseSpec& spec) {
  if (spec.dtype == DType::BF16 || spec.dtype == DType::F16) return kIntegerDraw;
  DyadicDraw d;
  if (spec.component == "mlp" && !mlp_fits(spec.config, spec.seq * spec.batch, d)) d.range = 1;
  return d;
}

ref::MakeCaseOptions exact_make_options(const CaseSpec& spec) {
  ref::MakeCaseOptions o = make_options(spec);
  const DyadicDraw d = exact_draw(spec);
  o.dyadic = true;
  o.dyadic_range = d.range;
  o.dyadic_shift = d.shift;
  return o;
}

bool exact_layout_tensor(const CaseSpec& spec, const std::string& name) {
  if (!is_norm_component(spec.component) || !splits_tokens(spec.layout)) return true;
  return name.rfind("grads.weights.", 0) != 0;  // a norm's weight / bias gradient: a sum over split tokens
}

std::vector<std::string> bitwise_differences(const std::map<std::string, Tensor>& expected,
                                             const std::map<std::string, Tensor>& actual,
                                             const std::function<bool(const std::string&)>& include) {
  std::vector<std::string> out;
  for (const auto& [name, e] : expected) {
    if (include && !include(name)) continue;
    auto it = actual.find(name);
    if (it == actual.end()) {
      out.push_back(fmt::format("{}: missing", name));
      continue;
    }
    const Tensor& a = it->second;
    if (a.shape() != e.shape()) {
      out.push_back(fmt::format("{}: shape {} != {}", name, shape_string(a.shape()), shape_string(e.shape())));
      continue;
    }
    int64_t first = -1, count = 0;
    for (int64_t i = 0; i < e.numel(); ++i) {
      const double x = e.get(i), y = a.get(i);
      const bool same = x == y || (std::isnan(x) && std::isnan(y));
      if (!same) {
        if (first < 0) first = i;
        ++count;
      }
    }
    if (count > 0) {
      out.push_back(fmt::format("{}: {} of {} elements differ, first [{}] expected {:.17g} actual {:.17g}", name, count,
                                e.numel(), first, e.get(first), a.get(first)));
    }
  }
  for (const auto& [name, a] : actual) {
    if (include && !include(name)) continue;
    if (expected.count(name) == 0) out.push_back(fmt::format("{}: only in the actual", name));
  }
  return out;
}

}  // namespace paritron::parity
