#include "optimized/model/mlp.h"

#include <fmt/format.h>

#include "common/error.h"

namespace paritron::opt {

ActivationKind mlp_activation_kind(const TransformerConfig& cfg) {
  static const std::map<std::string, ActivationKind, std::less<>> kinds = {
      {"gelu", ActivationKind::kGelu},           {"silu", ActivationKind::kSilu},
      {"relu", ActivationKind::kRelu},           {"squared_relu", ActivationKind::kSquaredRelu},
      {"openai_gelu", ActivationKind::kOpenaiGelu}, {"erf_gelu", ActivationKind::kErfGelu},
      {"quick_gelu", ActivationKind::kQuickGelu}};
  auto it = kinds.find(cfg.activation_func);
  if (it == kinds.end()) throw Error(fmt::format("unknown activation_func '{}'", cfg.activation_func));
  if (!cfg.bias_activation_fusion) return it->second;
  // MLP.forward under bias_activation_fusion (reference/activations.cpp mlp_activation).
  if (it->second == ActivationKind::kGelu) return ActivationKind::kBiasGeluTanh;
  if (it->second == ActivationKind::kSilu && cfg.gated_linear_unit) return ActivationKind::kSilu;
  throw Error(fmt::format("bias_activation_fusion supports gelu and swiglu only, not activation_func = '{}'",
                          cfg.activation_func));
}

DTensor mlp_forward(ModelContext& m, const std::string& prefix, const DTensor& x, MlpSaved& saved) {
  // 0.5.0 MLP.forward: `assert self.config.add_bias_linear is True` before bias_gelu_impl.
  if (mlp_activation_kind(m.cfg) == ActivationKind::kBiasGeluTanh && !m.cfg.gated_linear_unit &&
      !m.has_param(prefix + "linear_fc1.bias")) {
    throw Error("bias_activation_fusion with gelu needs add_bias_linear (bias_gelu_impl takes the fc1 bias)");
  }
  saved.pre_activation = column_parallel_forward(m, prefix + "linear_fc1.", x, saved.fc1, /*add_bias=*/false);
  const ActivationArgs act{mlp_activation_kind(m.cfg), m.cfg.gated_linear_unit, m.cfg.bias_activation_fusion};
  const int64_t f = m.cfg.gated_linear_unit ? saved.pre_activation.cols() / 2 : saved.pre_activation.cols();
  DTensor h = m.empty({saved.pre_activation.rows(), f});
  m.be.bias_act_forward(act, saved.pre_activation, m.param_or_null(prefix + "linear_fc1.bias"), h);
  return row_parallel_forward(m, prefix + "linear_fc2.", h, saved.fc2);
}

DTensor mlp_backward(ModelContext& m, const std::string& prefix, const DTensor& dy, MlpSaved& saved) {
  DTensor dh = row_parallel_backward(m, prefix + "linear_fc2.", dy, saved.fc2);
  const ActivationArgs act{mlp_activation_kind(m.cfg), m.cfg.gated_linear_unit, m.cfg.bias_activation_fusion};
  DTensor da = m.empty({dh.rows(), saved.pre_activation.cols()});
  m.be.bias_act_backward(act, saved.pre_activation, m.param_or_null(prefix + "linear_fc1.bias"), dh, da);
  const LinearSaved fc1 = std::move(saved.fc1);
  saved = MlpSaved{};
  return column_parallel_backward(m, prefix + "linear_fc1.", da, fc1);
}

}  // namespace paritron::opt
