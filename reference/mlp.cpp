// See mlp.h: MLP.forward (megatron/core/transformer/mlp.py) and its backward,
// spec §6, §14 #15, #16, #18, #19.
#include "reference/mlp.h"

#include <fmt/format.h>

#include "common/error.h"
#include "reference/activations.h"
#include "reference/linear.h"

namespace paritron::ref {

namespace {

// What MLP.__init__ / forward decide from the config and the weights.
struct MlpShape {
  int64_t h = 0;       // input and output width
  int64_t f = 0;       // ffn width (the input of linear_fc2)
  int64_t fc1_out = 0; // f, or 2f with gated_linear_unit
  bool gated = false;
  bool bias = false;   // add_bias_linear: linear_fc1.bias [fc1_out], linear_fc2.bias [h]
  bool fused = false;  // bias_activation_fusion
  Activation act = Activation::kGelu;
};

MlpShape mlp_shape(const TransformerConfig& cfg, const Params& w, const Mat& x) {
  MlpShape m;
  m.h = x.cols();
  m.gated = cfg.gated_linear_unit;
  m.bias = cfg.add_bias_linear;
  m.fused = cfg.bias_activation_fusion;
  m.act = mlp_activation(cfg);
  const Params fc1 = w.sub("linear_fc1");
  const Params fc2 = w.sub("linear_fc2");
  const Mat& w1 = fc1.at("weight");
  if (w1.cols() != m.h) {
    throw Error(fmt::format("'{}weight' is [{}, {}] but the MLP input has {} features", fc1.prefix(), w1.rows(),
                            w1.cols(), m.h));
  }
  m.fc1_out = w1.rows();
  if (m.gated && m.fc1_out % 2 != 0) {
    throw Error(fmt::format("'{}weight' has {} rows: gated_linear_unit needs an even [gate; up] width", fc1.prefix(),
                            m.fc1_out));
  }
  m.f = m.gated ? m.fc1_out / 2 : m.fc1_out;
  fc2.at("weight", m.h, m.f);
  if (m.bias) {
    fc1.row("bias", m.fc1_out);
    fc2.row("bias", m.h);
  }
  // 0.5.0 MLP.forward: `assert self.config.add_bias_linear is True` before bias_gelu_impl.
  if (m.fused && m.act == Activation::kBiasGeluTanh && !m.gated && !m.bias) {
    throw Error("bias_activation_fusion with gelu needs add_bias_linear (bias_gelu_impl takes the fc1 bias)");
  }
  return m;
}

// The dtype the fused jit kernels compute in: fp32 in emulated runs.
DType opmath(const Precision& p) { return p.dtype == DType::F64 ? DType::F64 : DType::F32; }

}  // namespace

MlpForward mlp_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p) {
  const MlpShape m = mlp_shape(cfg, w, x);
  const Params fc1 = w.sub("linear_fc1");
  const Params fc2 = w.sub("linear_fc2");
  MlpForward fwd;

  // linear_fc1 has skip_bias_add=True: the GEMM alone, the bias comes back separately.
  fwd.fc1_output = linear_forward(fc1, x, /*add_bias=*/false, p);
  if (m.bias) {
    fwd.fc1_output.rowwise() += fc1.row("bias", m.fc1_out);
    // Unfused: `intermediate_parallel + bias_parallel` is a tensor of the dtype;
    // fused: the sum lives in the kernel's fp32 registers.
    round_inplace(fwd.fc1_output, m.fused ? opmath(p) : p.dtype);
  }

  if (!m.gated) {
    fwd.activation_output = activation_forward(m.act, fwd.fc1_output, p.dtype);
  } else {
    // glu(x): chunk(2, -1): the first half is the gate (through the activation),
    // the second half the linear "up" part (spec §6.2, §14 #15).
    const Mat a1 = fwd.fc1_output.leftCols(m.f);
    const Mat a2 = fwd.fc1_output.rightCols(m.f);
    if (m.fused) {
      // bias_swiglu / bias_geglu: one kernel, one rounding.
      fwd.activation_output.resize(a1.rows(), m.f);
      for (Eigen::Index i = 0; i < a1.size(); ++i) {
        fwd.activation_output.data()[i] =
            round_to(activation_value(m.act, a1.data()[i]) * a2.data()[i], p.dtype);
      }
    } else {
      // activation_func(x[0]) * x[1]: the activation output is a tensor, then the product.
      fwd.activation_output = rounded(activation_forward(m.act, a1, p.dtype).cwiseProduct(a2), p.dtype);
    }
  }

  // linear_fc2 has skip_bias_add=True: its bias is returned as output_bias.
  fwd.output = linear_forward(fc2, fwd.activation_output, /*add_bias=*/false, p);
  if (m.bias) fwd.output_bias = fc2.row("bias", m.h);
  return fwd;
}

Mat mlp_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const MlpForward& fwd,
                 const Mat& d_output, const std::optional<RowVec>& d_output_bias, const Sink& grads,
                 const Precision& p) {
  const MlpShape m = mlp_shape(cfg, w, x);
  const Params fc1 = w.sub("linear_fc1");
  const Params fc2 = w.sub("linear_fc2");
  if (d_output.rows() != x.rows() || d_output.cols() != m.h) {
    throw Error(fmt::format("MLP backward '{}': the output gradient is [{}, {}], expected [{}, {}]", w.prefix(),
                            d_output.rows(), d_output.cols(), x.rows(), m.h));
  }
  if (fwd.fc1_output.rows() != x.rows() || fwd.fc1_output.cols() != m.fc1_out ||
      fwd.activation_output.rows() != x.rows() || fwd.activation_output.cols() != m.f) {
    throw Error(fmt::format("MLP backward '{}': the saved forward (fc1_output [{}, {}], activation_output [{}, {}]) "
                            "does not match the weights and input",
                            w.prefix(), fwd.fc1_output.rows(), fwd.fc1_output.cols(), fwd.activation_output.rows(),
                            fwd.activation_output.cols()));
  }
  if (d_output_bias && d_output_bias->size() != m.h) {
    throw Error(fmt::format("MLP backward '{}': the output_bias gradient has {} entries, expected {}", w.prefix(),
                            d_output_bias->size(), m.h));
  }

  // linear_fc2: dz, dW2; its bias only reaches the loss through output_bias.
  const Mat dz = linear_backward(fc2, fwd.activation_output, d_output, /*bias_grad=*/false, grads.sub("linear_fc2"), p);
  if (m.bias) {
    grads.sub("linear_fc2").add_row("bias", d_output_bias ? *d_output_bias : RowVec(RowVec::Zero(m.h)));
  }

  // The gradient of the fc1 output plus bias (the activation's input).
  Mat da(x.rows(), m.fc1_out);
  if (!m.gated) {
    da = activation_backward(m.act, fwd.fc1_output, dz, p.dtype);
  } else {
    const Mat a1 = fwd.fc1_output.leftCols(m.f);
    const Mat a2 = fwd.fc1_output.rightCols(m.f);
    if (m.fused) {
      // swiglu_back / geglu_back: both halves in one fp32 kernel, rounded once.
      for (Eigen::Index r = 0; r < a1.rows(); ++r) {
        for (Eigen::Index c = 0; c < m.f; ++c) {
          const double g = dz(r, c);
          da(r, c) = round_to(g * a2(r, c) * activation_derivative(m.act, a1(r, c)), p.dtype);
          da(r, m.f + c) = round_to(g * activation_value(m.act, a1(r, c)), p.dtype);
        }
      }
    } else {
      // Autograd through act(a1) * a2: the saved activation output is the dtype tensor.
      const Mat act_out = activation_forward(m.act, a1, p.dtype);
      const Mat d_act = rounded(dz.cwiseProduct(a2), p.dtype);
      da.leftCols(m.f) = activation_backward(m.act, a1, d_act, p.dtype);
      da.rightCols(m.f) = rounded(dz.cwiseProduct(act_out), p.dtype);
    }
  }

  // The fc1 bias was added before the split: its gradient is the token sum of the whole da.
  if (m.bias) grads.sub("linear_fc1").add("bias", rounded(da.colwise().sum(), p.dtype));
  return linear_backward(fc1, x, da, /*bias_grad=*/false, grads.sub("linear_fc1"), p);
}

}  // namespace paritron::ref
