// RMSNorm, forward and backward.
//
// Megatron: megatron/core/transformer/custom_layers/transformer_engine.py
// TENorm with normalization == "RMSNorm" (te.pytorch.RMSNorm; 0.5.0 has no
// local RMSNorm). y = x * rstd * gamma with rstd = 1 / sqrt(mean(x^2) + eps):
// no mean subtraction, no bias; gamma = weight + 1 (added by TE in fp32) under
// layernorm_zero_centered_gamma. Spec §7, §14 #23. See norm.h for the backward
// formula and the precision model.
// Left out: sequence-parallel weight-gradient all-reduce; newer versions'
// torch-native RMSNorm (same math).
#include <cmath>
#include <fmt/format.h>

#include "common/error.h"
#include "reference/norm.h"

namespace paritron::ref {

NormForward rmsnorm_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p) {
  const int64_t h = x.cols();
  if (h == 0) throw Error(fmt::format("RMSNorm '{}': the input has no features", w.prefix()));
  const RowVec gamma = norm_effective_gamma(cfg, w.row("weight", h), p, NormKernel::kTransformerEngine);
  const double eps = cfg.layernorm_epsilon;

  NormForward fwd;
  fwd.output.resize(x.rows(), h);
  fwd.normalized.resize(x.rows(), h);
  fwd.rstd.resize(x.rows());
  const DType c = norm_compute_dtype(p);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const double ms = round_to(x.row(t).squaredNorm() / static_cast<double>(h), c);
    const double rstd = round_to(1.0 / std::sqrt(round_to(ms + eps, c)), c);
    fwd.rstd[t] = rstd;
    fwd.normalized.row(t) = rounded(x.row(t) * rstd, c);
    fwd.output.row(t) = fwd.normalized.row(t).array() * gamma.array();
  }
  round_inplace(fwd.output, p.dtype);
  return fwd;
}

Mat rmsnorm_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const NormForward& fwd,
                     const Mat& dy, const Sink& grads, const Precision& p) {
  if (dy.rows() != x.rows() || dy.cols() != x.cols()) {
    throw Error(fmt::format("RMSNorm backward: input is [{}, {}] but the output gradient is [{}, {}]", x.rows(),
                            x.cols(), dy.rows(), dy.cols()));
  }
  if (fwd.normalized.rows() != x.rows() || fwd.normalized.cols() != x.cols() || fwd.rstd.size() != x.rows()) {
    throw Error(fmt::format("RMSNorm backward: the saved forward (normalized [{}, {}], rstd [{}]) does not match "
                            "the input [{}, {}]",
                            fwd.normalized.rows(), fwd.normalized.cols(), fwd.rstd.size(), x.rows(), x.cols()));
  }
  const int64_t h = x.cols();
  const RowVec gamma = norm_effective_gamma(cfg, w.row("weight", h), p, NormKernel::kTransformerEngine);

  Mat dx(x.rows(), h);
  const DType c = norm_compute_dtype(p);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const Eigen::ArrayXd g = rounded((dy.row(t).array() * gamma.array()).transpose(), c).array();
    const Eigen::ArrayXd xhat = fwd.normalized.row(t).transpose().array();
    const double mean_gx = round_to((g * xhat).mean(), c);
    const Mat centred = rounded(g - rounded(xhat * mean_gx, c).array(), c);
    dx.row(t) = (fwd.rstd[t] * centred.array()).transpose();
  }
  round_inplace(dx, p.dtype);
  grads.add("weight", rounded(dy.cwiseProduct(fwd.normalized).colwise().sum(), p.dtype));
  return dx;
}

}  // namespace paritron::ref
