// See activations.h.
#include "reference/activations.h"

#include <cmath>
#include <fmt/format.h>

#include "common/error.h"

namespace paritron::ref {

namespace {

constexpr double kSqrt1_2 = 0.70710678118654752440;       // torch's M_SQRT1_2 (exact gelu)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1 / sqrt(2 pi): M_2_SQRTPI * M_SQRT1_2 * 0.5
constexpr double k2OverSqrtPi = 1.12837916709551257390;   // erf'(u) = 2 / sqrt(pi) exp(-u^2)
constexpr double kOpenaiSqrt2OverPi = 0.7978845608028654;  // utils.py gelu_impl
constexpr double kFusedSqrt2OverPi = 0.79788456;           // fused_bias_gelu.py (truncated)
constexpr double kFusedBackCoeff = 0.1070322243;           // fused_bias_gelu.py bias_gelu_back
constexpr double kTanhCubic = 0.044715;
constexpr double kErfGeluDivisor = 1.41421;                // utils.py erf_gelu (truncated sqrt 2)
constexpr double kQuickGeluAlpha = 1.702;                  // activations.py quick_gelu

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

struct NamedActivation {
  std::string_view name;
  Activation activation;
};
constexpr NamedActivation kNames[] = {
    {"gelu", Activation::kGelu},
    {"silu", Activation::kSilu},
    {"relu", Activation::kRelu},
    {"squared_relu", Activation::kSquaredRelu},
    {"openai_gelu", Activation::kOpenaiGelu},
    {"erf_gelu", Activation::kErfGelu},
    {"quick_gelu", Activation::kQuickGelu},
    {"bias_gelu", Activation::kBiasGeluTanh},
};

void check_same_shape(const Mat& x, const Mat& dy) {
  if (x.rows() != dy.rows() || x.cols() != dy.cols()) {
    throw Error(fmt::format("activation backward: the input is [{}, {}] but its gradient is [{}, {}]", x.rows(),
                            x.cols(), dy.rows(), dy.cols()));
  }
}

}  // namespace

Activation activation_from_name(std::string_view name) {
  for (const NamedActivation& n : kNames) {
    if (n.name == name) return n.activation;
  }
  throw Error(fmt::format("unknown activation function '{}' (the reference implements gelu, silu, relu, "
                          "squared_relu, openai_gelu, erf_gelu, quick_gelu and bias_gelu)",
                          name));
}

std::string_view activation_name(Activation a) {
  for (const NamedActivation& n : kNames) {
    if (n.activation == a) return n.name;
  }
  return "?";
}

Activation mlp_activation(const TransformerConfig& cfg) {
  const Activation a = activation_from_name(cfg.activation_func);
  if (!cfg.bias_activation_fusion) return a;
  // MLP.forward under bias_activation_fusion: F.gelu -> bias_gelu_impl (or, with
  // gated_linear_unit, newer versions' bias_geglu_impl: the same tanh form on the
  // gate half); F.silu with gated_linear_unit -> bias_swiglu_impl (plain silu);
  // anything else raises.
  if (a == Activation::kGelu) return Activation::kBiasGeluTanh;
  if (a == Activation::kSilu && cfg.gated_linear_unit) return Activation::kSilu;
  throw Error(fmt::format("bias_activation_fusion supports gelu and swiglu (silu with gated_linear_unit) only, "
                          "not activation_func = '{}' with gated_linear_unit = {} (Megatron: \"Only support "
                          "fusion of gelu and swiglu\")",
                          cfg.activation_func, cfg.gated_linear_unit));
}

double activation_value(Activation a, double x) {
  switch (a) {
    case Activation::kGelu: return x * 0.5 * (1.0 + std::erf(x * kSqrt1_2));
    case Activation::kSilu: return x * sigmoid(x);
    case Activation::kRelu: return x > 0 ? x : 0.0;
    case Activation::kSquaredRelu: return x > 0 ? x * x : 0.0;
    case Activation::kOpenaiGelu:
      return 0.5 * x * (1.0 + std::tanh(kOpenaiSqrt2OverPi * x * (1.0 + kTanhCubic * x * x)));
    case Activation::kErfGelu: return x * 0.5 * (std::erf(x / kErfGeluDivisor) + 1.0);
    case Activation::kQuickGelu: return x * sigmoid(kQuickGeluAlpha * x);
    case Activation::kBiasGeluTanh:
      return x * 0.5 * (1.0 + std::tanh(kFusedSqrt2OverPi * x * (1.0 + kTanhCubic * x * x)));
  }
  throw Error("unknown activation");
}

double activation_derivative(Activation a, double x) {
  switch (a) {
    case Activation::kGelu:
      // torch GeluBackward (approximate='none'): cdf + x * pdf.
      return 0.5 * (1.0 + std::erf(x * kSqrt1_2)) + x * kInvSqrt2Pi * std::exp(-0.5 * x * x);
    case Activation::kSilu: {
      const double s = sigmoid(x);
      return s * (1.0 + x * (1.0 - s));
    }
    case Activation::kRelu: return x > 0 ? 1.0 : 0.0;
    case Activation::kSquaredRelu: return x > 0 ? 2.0 * x : 0.0;
    case Activation::kOpenaiGelu: {
      // Autograd through 0.5 x (1 + tanh(c x (1 + k x^2))).
      const double t = std::tanh(kOpenaiSqrt2OverPi * x * (1.0 + kTanhCubic * x * x));
      return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * kOpenaiSqrt2OverPi * (1.0 + 3.0 * kTanhCubic * x * x);
    }
    case Activation::kErfGelu: {
      // Autograd through x 0.5 (erf(x / d) + 1): erf'(u) = 2 / sqrt(pi) exp(-u^2).
      const double u = x / kErfGeluDivisor;
      return 0.5 * (std::erf(u) + 1.0) + x * 0.5 * k2OverSqrtPi * std::exp(-u * u) / kErfGeluDivisor;
    }
    case Activation::kQuickGelu: {
      const double s = sigmoid(kQuickGeluAlpha * x);
      return s + x * kQuickGeluAlpha * s * (1.0 - s);
    }
    case Activation::kBiasGeluTanh: {
      // bias_gelu_back, term for term.
      const double t = std::tanh(kFusedSqrt2OverPi * x * (1.0 + kTanhCubic * x * x));
      return 0.5 * x * ((1.0 - t * t) * (kFusedSqrt2OverPi + kFusedBackCoeff * x * x)) + 0.5 * (1.0 + t);
    }
  }
  throw Error("unknown activation");
}

Mat activation_forward(Activation a, const Mat& x, DType dtype) {
  Mat y(x.rows(), x.cols());
  for (Eigen::Index i = 0; i < x.size(); ++i) y.data()[i] = round_to(activation_value(a, x.data()[i]), dtype);
  return y;
}

Mat activation_backward(Activation a, const Mat& x, const Mat& dy, DType dtype) {
  check_same_shape(x, dy);
  Mat dx(x.rows(), x.cols());
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    dx.data()[i] = round_to(dy.data()[i] * activation_derivative(a, x.data()[i]), dtype);
  }
  return dx;
}

}  // namespace paritron::ref
