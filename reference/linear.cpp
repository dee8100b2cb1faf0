// See linear.h.
#include "reference/linear.h"

#include <fmt/format.h>

#include "common/error.h"
#include "common/fp8_scaling.h"

namespace paritron::ref {



Fp8Session::Fp8Session(const TransformerConfig& cfg) : state_(delayed_scaling_recipe(cfg)) {}

size_t Fp8Session::slot(std::string_view linear, Fp8Operand role) {
  const auto key = std::make_pair(std::string(linear), role);
  auto it = slots_.find(key);
  if (it == slots_.end()) it = slots_.emplace(key, state_.add_slot(role)).first;
  return it->second;
}

Mat fp8_fake_quant(const Mat& x, Fp8Operand role, const Precision& p, std::string_view linear) {
  if (!p.fp8) return x;
  const Fp8Format format = parse_fp8_format(*p.fp8);
  const math::FloatFormat& f = fp8_float_format(format, role);
  const float amax = tensor_amax(std::span<const double>(x.data(), x.size()));
  float scale = 0;
  if (p.fp8_session) {
    // TE's cast records this tensor's amax and uses the scale of earlier steps.
    DelayedScalingState& state = p.fp8_session->state();
    const size_t slot = p.fp8_session->slot(linear, role);
    state.record_amax(slot, amax);
    scale = state.meta(slot).scale;
  } else {
    scale = scale_for_amax(amax, f, static_cast<int>(p.fp8_margin));
  }
  // cuBLASLt applies scale_inv to the fp32 accumulator, so the operand's value
  // in the GEMM is the exact q * scale_inv, not a per-element fp32 rounding of it.
  const std::vector<double> dequantised =
      dequantise_exact(quantise(std::span<const double>(x.data(), x.size()), scale, f), 1.0f / scale, f);
  return Eigen::Map<const Mat>(dequantised.data(), x.rows(), x.cols());
}

Mat linear_forward(const Params& w, const Mat& x, bool add_bias, const Precision& p) {
  const Mat& weight = w.at("weight");
  if (weight.cols() != x.cols()) {
    throw Error(fmt::format("'{}weight' is [{}, {}] but its input has {} features", w.prefix(), weight.rows(),
                            weight.cols(), x.cols()));
  }
  Mat y = matmul(fp8_fake_quant(x, Fp8Operand::kInput, p, w.prefix()),
                 fp8_fake_quant(weight, Fp8Operand::kWeight, p, w.prefix()).transpose(), p.dtype);
  if (add_bias && w.has("bias")) {
    y.rowwise() += w.row("bias", weight.rows());
    round_inplace(y, p.dtype);
  }
  return y;
}

Mat linear_backward(const Params& w, const Mat& x, const Mat& dy, bool bias_grad, const Sink& grads,
                    const Precision& p) {
  const Mat& weight = w.at("weight");
  const Mat dy_q = fp8_fake_quant(dy, Fp8Operand::kGradOutput, p, w.prefix());
  // dgrad: dx = dy W, both operands fp8 under an fp8 recipe (the forward's casts:
  // within a step the scales do not change, so casting again gives the same values).
  Mat dx = matmul(dy_q, fp8_fake_quant(weight, Fp8Operand::kWeight, p, w.prefix()), p.dtype);
  // wgrad: dW = dy^T x; override_linear_precision[2] = not fp8_wgrad keeps it high precision.
  const bool wgrad_fp8 = p.fp8 && p.fp8_wgrad;
  const Mat dw = wgrad_fp8 ? matmul(dy_q.transpose(), fp8_fake_quant(x, Fp8Operand::kInput, p, w.prefix()), p.dtype)
                           : matmul(dy.transpose(), x, p.dtype);
  grads.add("weight", dw);
  if (bias_grad && w.has("bias")) grads.add("bias", rounded(dy.colwise().sum(), p.dtype));
  return dx;
}

}  // namespace paritron::ref
