// See bias_dropout_add.h.
#include "reference/bias_dropout_add.h"

#include <fmt/format.h>

#include "common/error.h"

namespace paritron::ref {

BiasDropoutAddForward bias_dropout_add_forward(const Mat& x, const std::optional<Mat>& bias, const Mat& residual,
                                               double p, const RunContext& ctx, std::string_view purpose,
                                               const Precision& prec) {
  if (residual.rows() != x.rows() || residual.cols() != x.cols()) {
    throw Error(fmt::format("bias-dropout-add: residual [{}, {}] and output [{}, {}] differ", residual.rows(),
                            residual.cols(), x.rows(), x.cols()));
  }
  Mat with_bias = x;
  if (bias) {
    if (bias->rows() == 1 && bias->cols() == x.cols()) {
      with_bias.rowwise() += bias->row(0);
    } else if (bias->rows() == x.rows() && bias->cols() == x.cols()) {
      with_bias += *bias;
    } else {
      throw Error(fmt::format("bias-dropout-add: bias [{}, {}] fits neither [1, {}] nor [{}, {}]", bias->rows(),
                              bias->cols(), x.cols(), x.rows(), x.cols()));
    }
    round_inplace(with_bias, prec.dtype);  // x + bias is its own op in the jit function
  }
  BiasDropoutAddForward f;
  Mat dropped = dropout(with_bias, p, ctx, purpose, &f.dropout_scale);
  round_inplace(dropped, prec.dtype);
  // residual.to(x.dtype) comes first (a float32 residual stream meets a bf16 output).
  f.output = rounded(rounded(residual, prec.dtype) + dropped, prec.dtype);
  return f;
}

BiasDropoutAddGrads bias_dropout_add_backward(const BiasDropoutAddForward& fwd, const std::optional<Mat>& bias,
                                              const Mat& dy, const Precision& prec) {
  BiasDropoutAddGrads g;
  g.residual = dy;
  g.x = rounded(dy.cwiseProduct(fwd.dropout_scale), prec.dtype);
  if (bias) g.bias = bias->rows() == 1 && dy.rows() != 1 ? rounded(g.x.colwise().sum(), prec.dtype) : g.x;
  return g;
}

}  // namespace paritron::ref
