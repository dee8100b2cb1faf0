// FP8 delayed scaling (Transformer Engine 1.x under megatron-core 0.5.0).
//
// Mirrors megatron/core/transformer/transformer_block.py (core_v0.5.0, the
// DelayedScaling construction in TransformerBlock.forward) and Transformer
// Engine v1.3/v1.4: common/recipe.py, pytorch/fp8.py (amax_and_scale_update and
// its helpers), common/recipe/delayed_scaling.cu, pytorch/module/base.py, and the
// cast kernels' amax. Spec: shared/spec/megatron-semantics.md §12, Appendix A.
#include "common/fp8_scaling.h"

#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "common/error.h"
#include "common/math/fp8.h"
#include "common/transformer_config.h"

namespace paritron {

namespace {

std::string quoted(std::string_view s) { return fmt::format("\"{}\"", s); }

}  // namespace

Fp8Format parse_fp8_format(std::string_view name) {
  // transformer_block.py: `raise ValueError("E4M3 and HYBRID are the only
  // supported FP8 formats.")` for anything else.
  if (name == "e4m3") return Fp8Format::kE4M3;
  if (name == "hybrid") return Fp8Format::kHybrid;
  throw ConfigError("fp8", quoted(name), "must be \"e4m3\" or \"hybrid\" (E4M3 and HYBRID are the only supported "
                                         "FP8 formats)");
}

std::string_view fp8_format_name(Fp8Format format) { return format == Fp8Format::kE4M3 ? "e4m3" : "hybrid"; }

AmaxComputeAlgo parse_amax_compute_algo(std::string_view name) {
  // DelayedScaling's pydantic field is Literal["max", "most_recent"] (or a
  // callable, which a config cannot name); delayed_scaling.cu refuses others.
  if (name == "most_recent") return AmaxComputeAlgo::kMostRecent;
  if (name == "max") return AmaxComputeAlgo::kMax;
  throw ConfigError("fp8_amax_compute_algo", quoted(name), "must be \"most_recent\" or \"max\"");
}

std::string_view amax_compute_algo_name(AmaxComputeAlgo algo) {
  return algo == AmaxComputeAlgo::kMax ? "max" : "most_recent";
}

bool is_forward_role(Fp8Role role) { return role != Fp8Role::kGradOutput; }

const math::FloatFormat& fp8_float_format(Fp8Format format, Fp8Role role) {
  // recipe.py: E4M3 = (max_fwd=448, max_bwd=448); HYBRID = (max_fwd=E4M3,
  // max_bwd=E5M2); fp8.py get_fp8_te_dtype picks kFloat8E4M3 for forward
  // tensors and, under HYBRID, kFloat8E5M2 for backward tensors.
  if (format == Fp8Format::kHybrid && !is_forward_role(role)) return math::kFloat8E5M2;
  return math::kFloat8E4M3;
}

DType fp8_dtype(Fp8Format format, Fp8Role role) {
  return &fp8_float_format(format, role) == &math::kFloat8E5M2 ? DType::F8_E5M2 : DType::F8_E4M3;
}

float fp8_max(Fp8Format format, Fp8Role role) { return math::fp8_max(fp8_float_format(format, role)); }

void DelayedScalingRecipe::validate() const {
  std::vector<ConfigIssue> issues;
  if (interval < 1) issues.push_back({"fp8_interval", std::to_string(interval), "must be >= 1"});
  // TE allocates torch.zeros(amax_history_len, n) and indexes row 0.
  if (amax_history_len < 1) {
    issues.push_back({"fp8_amax_history_len", std::to_string(amax_history_len), "must be >= 1"});
  }
  // 2^margin must be an exact normal fp32 power of two (TE: `2 ** margin` /
  // std::pow(2.f, -margin)); Paritron's bound, far past any real margin.
  if (margin < -126 || margin > 127) {
    issues.push_back({"fp8_margin", std::to_string(margin), "must be in [-126, 127] (2^margin exact in fp32)"});
  }
  // recipe.py DelayedScaling.__post_init__: "Only wgrad GEMM override is
  // currently supported."
  if (override_linear_precision.fprop || override_linear_precision.dgrad) {
    issues.push_back({"override_linear_precision",
                      fmt::format("({}, {}, {})", override_linear_precision.fprop, override_linear_precision.dgrad,
                                  override_linear_precision.wgrad),
                      "only the wgrad GEMM may be overridden (TE DelayedScaling)"});
  }
  if (!issues.empty()) throw ConfigError(std::move(issues));
}

bool DelayedScalingRecipe::gemm_in_fp8(Fp8Gemm gemm) const {
  switch (gemm) {
    case Fp8Gemm::kFprop: return !override_linear_precision.fprop;
    case Fp8Gemm::kDgrad: return !override_linear_precision.dgrad;
    case Fp8Gemm::kWgrad: return !override_linear_precision.wgrad;
  }
  return true;
}

DelayedScalingRecipe delayed_scaling_recipe(const TransformerConfig& config) {
  if (!config.fp8) {
    throw ConfigError("fp8", "null", "must be \"e4m3\" or \"hybrid\" to build an FP8 recipe (fp8 is off)");
  }
  DelayedScalingRecipe recipe;
  recipe.fp8_format = parse_fp8_format(*config.fp8);
  recipe.amax_compute_algo = parse_amax_compute_algo(config.fp8_amax_compute_algo);
  // fp8_margin is int64 in the config; check the range before narrowing.
  if (config.fp8_margin < -126 || config.fp8_margin > 127) {
    throw ConfigError("fp8_margin", std::to_string(config.fp8_margin),
                      "must be in [-126, 127] (2^margin exact in fp32)");
  }
  recipe.margin = static_cast<int>(config.fp8_margin);
  recipe.interval = config.fp8_interval;
  recipe.amax_history_len = config.fp8_amax_history_len;
  recipe.override_linear_precision = {false, false, !config.fp8_wgrad};
  recipe.reduce_amax = true;  // Megatron leaves TE's default
  recipe.validate();
  return recipe;
}

Fp8TensorMeta::Fp8TensorMeta(int64_t amax_history_len) {
  if (amax_history_len < 1) {
    throw Error(fmt::format("Fp8TensorMeta: amax_history_len must be >= 1, got {}", amax_history_len));
  }
  amax_history.assign(static_cast<size_t>(amax_history_len), 0.0f);
}

void record_amax(Fp8TensorMeta& meta, float amax) {
  if (meta.amax_history.empty()) throw Error("record_amax: the amax history is empty");
  if (amax < 0.0f) throw Error(fmt::format("record_amax: amax must be >= 0, got {}", amax));
  float& slot = meta.amax_history[0];
  // atomicMaxFloat(addr, v) = atomicMax on the int bits: for non-negative
  // floats the int order is the float order with NaN above +inf. So a NaN
  // sticks, and a NaN already there stays (amax > NaN is false).
  if (std::isnan(amax)) {
    slot = std::numeric_limits<float>::quiet_NaN();
  } else if (amax > slot) {
    slot = amax;
  }
}

float history_amax(const Fp8TensorMeta& meta, AmaxComputeAlgo algo) {
  if (meta.amax_history.empty()) throw Error("history_amax: the amax history is empty");
  if (algo == AmaxComputeAlgo::kMostRecent) return meta.amax_history[0];
  // TE v1.3 _default_get_amax: torch.max(amax_history, dim=0) propagates NaN.
  // (v1.4's kernel uses fmaxf and would skip it; NaN cannot reach the history
  // from a cast either way, since the cast's amax ignores NaN elements.)
  float m = 0.0f;
  for (float a : meta.amax_history) {
    if (std::isnan(a)) return a;
    if (a > m) m = a;
  }
  return m;
}

void roll_amax_history(Fp8TensorMeta& meta) {
  auto& h = meta.amax_history;
  if (h.empty()) throw Error("roll_amax_history: the amax history is empty");
  // torch.roll(h, -1, 0): h'[i] = h[(i + 1) % L]; then h'[0] = 0. The value
  // dropped is h[1]; h[0] (this step's amax) moves to the end, so slots
  // 1..L-1 always hold the last L-1 completed steps, oldest first.
  const float first = h[0];
  for (size_t i = 0; i + 1 < h.size(); ++i) h[i] = h[i + 1];
  h.back() = first;
  h[0] = 0.0f;
}

void update_scale(Fp8TensorMeta& meta, const DelayedScalingRecipe& recipe, Fp8Role role) {
  if (static_cast<int64_t>(meta.amax_history.size()) != recipe.amax_history_len) {
    throw Error(fmt::format("update_scale: amax history has {} entries, the recipe's amax_history_len is {}",
                            meta.amax_history.size(), recipe.amax_history_len));
  }
  // Order of TE's _fused_amax_and_scale_update (v1.3) / delayed_scaling.cu
  // kernel (v1.4): amax from the history as it stands (slot 0 = the amax this
  // step recorded), then roll + zero slot 0, then scale and scale_inv.
  const float amax = history_amax(meta, recipe.amax_compute_algo);
  roll_amax_history(meta);
  meta.scale = scale_for_amax(amax, recipe.format(role), recipe.margin, meta.scale);
  // _compute_scaling_factor_inverse: 1.0 / scale in fp32 (for every tensor:
  // the weight exception only applies to TE's fp8 weight caching across
  // micro-batches, which Paritron does not model).
  meta.scale_inv = 1.0f / meta.scale;
}

float scale_for_amax(float amax, const math::FloatFormat& format, int margin, float previous_scale) {
  if (margin < -126 || margin > 127) {
    throw Error(fmt::format("scale_for_amax: margin must be in [-126, 127], got {}", margin));
  }
  return math::fp8_scale_from_amax(amax, math::fp8_max(format), margin, previous_scale);
}

float scale_for_amax(float amax, const DelayedScalingRecipe& recipe, Fp8Role role, float previous_scale) {
  return scale_for_amax(amax, recipe.format(role), recipe.margin, previous_scale);
}

float tensor_amax(std::span<const float> x) {
  float m = 0.0f;
  for (float v : x) m = math::fp8_amax_step(m, v);
  return m;
}

float tensor_amax(std::span<const double> x) {
  float m = 0.0f;
  for (double v : x) m = math::fp8_amax_step(m, static_cast<float>(v));
  return m;
}

namespace {

// A tensor's elements as fp32 (exact for F32/F16/BF16, RNE for F64): the
// ComputeType TE's kernels load them into.
std::vector<float> floats_of(const Tensor& x, std::string_view what) {
  const DType d = x.dtype();
  if (d != DType::F64 && d != DType::F32 && d != DType::F16 && d != DType::BF16) {
    throw Error(fmt::format("{}: expected an F64, F32, F16 or BF16 tensor, got {}", what, dtype_name(d)));
  }
  std::vector<float> out(static_cast<size_t>(x.numel()));
  if (d == DType::F32) {
    const auto src = x.data<float>();
    out.assign(src.begin(), src.end());
  } else {
    for (int64_t i = 0; i < x.numel(); ++i) out[static_cast<size_t>(i)] = static_cast<float>(x.get(i));
  }
  return out;
}

DType dtype_of_format(const math::FloatFormat& format, std::string_view what) {
  if (&format == &math::kFloat8E4M3) return DType::F8_E4M3;
  if (&format == &math::kFloat8E5M2) return DType::F8_E5M2;
  if (format.exponent_bits == 4 && format.mantissa_bits == 3) return DType::F8_E4M3;
  if (format.exponent_bits == 5 && format.mantissa_bits == 2) return DType::F8_E5M2;
  throw Error(fmt::format("{}: the format must be E4M3 or E5M2", what));
}

void check_fp8(const math::FloatFormat& format, std::string_view what) { (void)dtype_of_format(format, what); }

}  // namespace

float tensor_amax(const Tensor& x) { return tensor_amax(std::span<const float>(floats_of(x, "tensor_amax"))); }

void quantise(std::span<const float> x, float scale, const math::FloatFormat& format, std::span<uint8_t> q) {
  check_fp8(format, "quantise");
  if (q.size() != x.size()) {
    throw Error(fmt::format("quantise: output has {} elements, input {}", q.size(), x.size()));
  }
  for (size_t i = 0; i < x.size(); ++i) q[i] = math::fp8_quantise(x[i], scale, format);
}

std::vector<uint8_t> quantise(std::span<const float> x, float scale, const math::FloatFormat& format) {
  std::vector<uint8_t> q(x.size());
  quantise(x, scale, format, q);
  return q;
}

std::vector<uint8_t> quantise(std::span<const double> x, float scale, const math::FloatFormat& format) {
  check_fp8(format, "quantise");
  std::vector<uint8_t> q(x.size());
  for (size_t i = 0; i < x.size(); ++i) q[i] = math::fp8_quantise(static_cast<float>(x[i]), scale, format);
  return q;
}

std::vector<float> dequantise(std::span<const uint8_t> q, float scale_inv, const math::FloatFormat& format) {
  check_fp8(format, "dequantise");
  std::vector<float> out(q.size());
  for (size_t i = 0; i < q.size(); ++i) out[i] = math::fp8_dequantise(q[i], scale_inv, format);
  return out;
}

std::vector<double> dequantise_exact(std::span<const uint8_t> q, float scale_inv, const math::FloatFormat& format) {
  check_fp8(format, "dequantise_exact");
  std::vector<double> out(q.size());
  for (size_t i = 0; i < q.size(); ++i) out[i] = math::fp8_dequantise_exact(q[i], scale_inv, format);
  return out;
}

std::vector<float> fake_quant(std::span<const float> x, float scale, float scale_inv,
                              const math::FloatFormat& format) {
  check_fp8(format, "fake_quant");
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = math::fp8_fake_quant(x[i], scale, scale_inv, format);
  return out;
}

std::vector<double> fake_quant(std::span<const double> x, float scale, float scale_inv,
                               const math::FloatFormat& format) {
  check_fp8(format, "fake_quant");
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    out[i] = math::fp8_fake_quant(static_cast<float>(x[i]), scale, scale_inv, format);
  }
  return out;
}

Tensor quantise(const Tensor& x, float scale, const math::FloatFormat& format) {
  Tensor q(dtype_of_format(format, "quantise"), x.shape());
  quantise(floats_of(x, "quantise"), scale, format, q.data<uint8_t>());
  return q;
}

Tensor dequantise(const Tensor& q, float scale_inv, DType out_dtype) {
  if (q.dtype() != DType::F8_E4M3 && q.dtype() != DType::F8_E5M2) {
    throw Error(fmt::format("dequantise: expected an F8_E4M3 or F8_E5M2 tensor, got {}", dtype_name(q.dtype())));
  }
  if (!is_floating(out_dtype)) {
    throw Error(fmt::format("dequantise: out_dtype must be floating, got {}", dtype_name(out_dtype)));
  }
  const math::FloatFormat& format = *float_format(q.dtype());
  const auto bits = q.data<uint8_t>();
  Tensor out(out_dtype, q.shape());
  for (int64_t i = 0; i < q.numel(); ++i) {
    out.set(i, math::fp8_dequantise(bits[static_cast<size_t>(i)], scale_inv, format));
  }
  return out;
}

Tensor fake_quant(const Tensor& x, float scale, float scale_inv, const math::FloatFormat& format, DType out_dtype) {
  return dequantise(quantise(x, scale, format), scale_inv, out_dtype);
}

DelayedScalingState::DelayedScalingState(DelayedScalingRecipe recipe) : recipe_(recipe) { recipe_.validate(); }

size_t DelayedScalingState::add_slot(Fp8Role role) {
  slots_.push_back({role, Fp8TensorMeta(recipe_.amax_history_len)});
  return slots_.size() - 1;
}

const DelayedScalingState::Slot& DelayedScalingState::slot_at(size_t slot) const {
  if (slot >= slots_.size()) {
    throw Error(fmt::format("DelayedScalingState: slot {} out of range ({} slots)", slot, slots_.size()));
  }
  return slots_[slot];
}

Fp8Role DelayedScalingState::role(size_t slot) const { return slot_at(slot).role; }

const math::FloatFormat& DelayedScalingState::format(size_t slot) const { return recipe_.format(role(slot)); }

const Fp8TensorMeta& DelayedScalingState::meta(size_t slot) const { return slot_at(slot).meta; }

Fp8TensorMeta& DelayedScalingState::meta(size_t slot) {
  (void)slot_at(slot);  // range check
  return slots_[slot].meta;
}

void DelayedScalingState::record_amax(size_t slot, float amax) { paritron::record_amax(meta(slot), amax); }

std::vector<uint8_t> DelayedScalingState::cast(size_t slot, std::span<const float> x) {
  Fp8TensorMeta& m = meta(slot);
  paritron::record_amax(m, tensor_amax(x));
  return quantise(x, m.scale, format(slot));
}

std::vector<float> DelayedScalingState::fake_quant(size_t slot, std::span<const float> x) {
  Fp8TensorMeta& m = meta(slot);
  paritron::record_amax(m, tensor_amax(x));
  return paritron::fake_quant(x, m.scale, m.scale_inv, format(slot));
}

std::vector<double> DelayedScalingState::fake_quant(size_t slot, std::span<const double> x) {
  Fp8TensorMeta& m = meta(slot);
  paritron::record_amax(m, tensor_amax(x));
  return paritron::fake_quant(x, m.scale, m.scale_inv, format(slot));
}

Tensor DelayedScalingState::fake_quant(size_t slot, const Tensor& x, DType out_dtype) {
  Fp8TensorMeta& m = meta(slot);
  paritron::record_amax(m, tensor_amax(x));
  return paritron::fake_quant(x, m.scale, m.scale_inv, format(slot), out_dtype);
}

bool DelayedScalingState::end_step() {
  ++steps_;
  if (steps_ % recipe_.interval != 0) return false;
  for (Slot& s : slots_) update_scale(s.meta, recipe_, s.role);
  return true;
}

}  // namespace paritron
