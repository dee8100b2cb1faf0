// LayerNorm (and the LayerNorm/RMSNorm dispatch), forward and backward.
//
// Megatron: megatron/core/fusions/fused_layer_norm.py FusedLayerNorm.forward
// (weight = self.weight + 1 if zero_centered_gamma; Apex
// FusedLayerNormAffineFunction / FastLayerNormFN), and TENorm
// (te.pytorch.LayerNorm) in custom_layers/transformer_engine.py.
// y = (x - mean) * rstd * gamma + beta with rstd = 1 / sqrt(var + eps), biased
// variance (divide by h); spec §7, §14 #22, #23. See norm.h for the backward
// formulas and the precision model.
// Left out: sequence-parallel weight-gradient all-reduce; the Apex
// persistent / memory-efficient variants (same math).
#include <cmath>
#include <fmt/format.h>

#include "common/error.h"
#include "reference/norm.h"

namespace paritron::ref {

namespace {

void check_backward_shapes(std::string_view what, const Mat& x, const NormForward& fwd, const Mat& dy) {
  if (dy.rows() != x.rows() || dy.cols() != x.cols()) {
    throw Error(fmt::format("{} backward: input is [{}, {}] but the output gradient is [{}, {}]", what, x.rows(),
                            x.cols(), dy.rows(), dy.cols()));
  }
  if (fwd.normalized.rows() != x.rows() || fwd.normalized.cols() != x.cols() || fwd.rstd.size() != x.rows()) {
    throw Error(fmt::format("{} backward: the saved forward (normalized [{}, {}], rstd [{}]) does not match the "
                            "input [{}, {}]",
                            what, fwd.normalized.rows(), fwd.normalized.cols(), fwd.rstd.size(), x.rows(), x.cols()));
  }
}

}  // namespace

RowVec norm_effective_gamma(const TransformerConfig& cfg, const RowVec& weight, const Precision& p,
                            NormKernel kernel) {
  if (!cfg.layernorm_zero_centered_gamma) return weight;
  RowVec gamma = weight.array() + 1.0;
  // FusedLayerNorm: `self.weight + 1` is a tensor of the parameter dtype.
  // Transformer Engine: the kernel adds 1 to the fp32 value it loaded.
  const DType dtype = kernel == NormKernel::kApex ? p.dtype : (p.dtype == DType::F64 ? DType::F64 : DType::F32);
  for (Eigen::Index i = 0; i < gamma.size(); ++i) gamma[i] = round_to(gamma[i], dtype);
  return gamma;
}

NormForward layernorm_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p,
                              NormKernel kernel) {
  const int64_t h = x.cols();
  if (h == 0) throw Error(fmt::format("LayerNorm '{}': the input has no features", w.prefix()));
  const RowVec gamma = norm_effective_gamma(cfg, w.row("weight", h), p, kernel);
  const RowVec beta = w.row("bias", h);
  const double eps = cfg.layernorm_epsilon;

  NormForward fwd;
  fwd.output.resize(x.rows(), h);
  fwd.normalized.resize(x.rows(), h);
  fwd.rstd.resize(x.rows());
  const DType c = norm_compute_dtype(p);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const double mean = round_to(x.row(t).mean(), c);
    const Mat diff = rounded(x.row(t).array() - mean, c);
    const double var = round_to(diff.array().square().mean(), c);  // biased: divide by h
    const double rstd = round_to(1.0 / std::sqrt(round_to(var + eps, c)), c);
    fwd.rstd[t] = rstd;
    fwd.normalized.row(t) = rounded(diff * rstd, c);
    fwd.output.row(t) = fwd.normalized.row(t).array() * gamma.array() + beta.array();
  }
  round_inplace(fwd.output, p.dtype);
  return fwd;
}

Mat layernorm_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const NormForward& fwd,
                       const Mat& dy, const Sink& grads, const Precision& p, NormKernel kernel) {
  check_backward_shapes("LayerNorm", x, fwd, dy);
  const int64_t h = x.cols();
  const RowVec gamma = norm_effective_gamma(cfg, w.row("weight", h), p, kernel);
  w.row("bias", h);  // a LayerNorm without its bias is malformed

  Mat dx(x.rows(), h);
  const DType c = norm_compute_dtype(p);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const Eigen::ArrayXd g = rounded((dy.row(t).array() * gamma.array()).transpose(), c).array();
    const Eigen::ArrayXd xhat = fwd.normalized.row(t).transpose().array();
    const double mean_g = round_to(g.mean(), c);
    const double mean_gx = round_to((g * xhat).mean(), c);
    const Mat centred = rounded(rounded(g - mean_g, c).array() - rounded(xhat * mean_gx, c).array(), c);
    dx.row(t) = (fwd.rstd[t] * centred.array()).transpose();
  }
  round_inplace(dx, p.dtype);
  // Column sums over tokens; the weight gradient equals the gamma gradient.
  grads.add("weight", rounded(dy.cwiseProduct(fwd.normalized).colwise().sum(), p.dtype));
  grads.add("bias", rounded(dy.colwise().sum(), p.dtype));
  return dx;
}

NormForward layernorm_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p) {
  return layernorm_forward(cfg, w, x, p, NormKernel::kApex);
}

Mat layernorm_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const NormForward& fwd,
                       const Mat& dy, const Sink& grads, const Precision& p) {
  return layernorm_backward(cfg, w, x, fwd, dy, grads, p, NormKernel::kApex);
}

// ---------------------------------------------------------------------------
// Dispatch on cfg.normalization (TENorm.__new__'s choice).

NormForward norm_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p,
                         NormKernel kernel) {
  if (cfg.normalization == "LayerNorm") return layernorm_forward(cfg, w, x, p, kernel);
  if (cfg.normalization == "RMSNorm") return rmsnorm_forward(cfg, w, x, p);
  throw Error(fmt::format("normalization '{}' at '{}': only LayerNorm and RMSNorm are supported", cfg.normalization,
                          w.prefix()));
}

Mat norm_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const NormForward& fwd, const Mat& dy,
                  const Sink& grads, const Precision& p, NormKernel kernel) {
  if (cfg.normalization == "LayerNorm") return layernorm_backward(cfg, w, x, fwd, dy, grads, p, kernel);
  if (cfg.normalization == "RMSNorm") return rmsnorm_backward(cfg, w, x, fwd, dy, grads, p);
  throw Error(fmt::format("normalization '{}' at '{}': only LayerNorm and RMSNorm are supported", cfg.normalization,
                          w.prefix()));
}

NormForward norm_forward(const TransformerConfig& cfg, const Params& w, const Mat& x, const Precision& p) {
  return norm_forward(cfg, w, x, p, NormKernel::kApex);
}

Mat norm_backward(const TransformerConfig& cfg, const Params& w, const Mat& x, const NormForward& fwd, const Mat& dy,
                  const Sink& grads, const Precision& p) {
  return norm_backward(cfg, w, x, fwd, dy, grads, p, NormKernel::kApex);
}

}  // namespace paritron::ref
