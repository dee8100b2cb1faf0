// See fused_softmax.h.
#include "reference/fused_softmax.h"

#include <cmath>
#include <fmt/format.h>

#include "common/error.h"

namespace paritron::ref {

std::optional<AttentionMask> softmax_mask(AttnMaskType type, const std::optional<AttentionMask>& mask, int64_t b,
                                          int64_t np, int64_t sq, int64_t sk,
                                          const std::optional<std::array<int64_t, 2>>& window_size) {
  if (mask) mask->check_broadcastable(b, np, sq, sk, "attention_mask");
  if (window_size) {
    std::array<int64_t, 2> window = *window_size;
    if (type == AttnMaskType::causal) {
      if (sq != sk) {
        throw Error(fmt::format("sliding window attention with the causal mask type needs sq == sk (got sq = {}, "
                                "sk = {}): Transformer Engine aligns the window top-left, Megatron's torch path "
                                "bottom-right, and the reference does not pick one",
                                sq, sk));
      }
      window[1] = 0;  // TE check_set_window_size: a causal window is (left, 0)
    }
    // Newer Megatron's torch path (fused_softmax.py forward_torch_softmax):
    // with a window, get_sliding_window_causal_mask replaces any mask passed in.
    return sliding_window_mask(sq, sk, window);
  }
  if (mask) return mask;  // used as is, whatever the mask type (spec §2.3 step 4)
  if (type == AttnMaskType::causal && sq > 1) {
    // forward_torch_softmax: assert sq == sk, "causal mask is only for self attention"
    if (sq != sk) {
      throw Error(fmt::format("the causal mask type without an attention_mask needs sq == sk (got sq = {}, sk = {}): "
                              "Megatron builds the default causal mask only for self attention",
                              sq, sk));
    }
    return get_default_causal_mask(sq);
  }
  return std::nullopt;
}

Mat scale_mask_softmax_slice(const Mat& scores, const AttentionMask* mask, int64_t b, int64_t head,
                             std::optional<double> scale, const Precision& p, Mat* probs_softmax) {
  const DType sdt = p.softmax_dtype;
  // 1. Upcast: exact (the scores are values of p.dtype, which the softmax
  //    dtype contains); in the other direction (fp32 run, "softmax in bf16"
  //    cannot happen) rounding keeps the emulation honest.
  Mat x = rounded(scores, sdt);
  // 2. Scale before masking: one multiply, rounded to the softmax dtype.
  if (scale) {
    x *= *scale;
    round_inplace(x, sdt);
  }
  // 4. masked_fill with -10000 in the softmax dtype (bf16 holds -9984).
  if (mask) attention_mask_func(x, *mask, b, head, round_to(kMaskFillValue, sdt));
  // 5. Row softmax evaluated in double and rounded once, as a correctly
  //    rounded kernel writes it.
  Mat probs(x.rows(), x.cols());
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    if (x.cols() == 0) continue;
    const double m = x.row(i).maxCoeff();
    double sum = 0.0;
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      probs(i, j) = std::exp(x(i, j) - m);
      sum += probs(i, j);
    }
    probs.row(i) /= sum;
  }
  round_inplace(probs, sdt);
  if (sdt == p.dtype) {
    if (probs_softmax) *probs_softmax = Mat();
    return probs;
  }
  // 6. probs.half() / probs.bfloat16(): the softmax-dtype result cast down.
  Mat out = rounded(probs, p.dtype);
  if (probs_softmax) *probs_softmax = std::move(probs);
  return out;
}

Mat scale_mask_softmax_slice_backward(const Mat& probs, const Mat& d_probs, const AttentionMask* mask, int64_t b,
                                      int64_t head, std::optional<double> scale, const Precision& p) {
  if (probs.rows() != d_probs.rows() || probs.cols() != d_probs.cols()) {
    throw Error(fmt::format("softmax backward: d_probs is [{}, {}] but probs are [{}, {}]", d_probs.rows(),
                            d_probs.cols(), probs.rows(), probs.cols()));
  }
  const DType sdt = p.softmax_dtype;
  // The cast-down's backward upcasts d_probs (exact); softmax backward
  // P (dP - <P, dP>) in the softmax dtype, one rounding.
  const Mat dp = rounded(d_probs, sdt);
  Mat dx(probs.rows(), probs.cols());
  for (Eigen::Index i = 0; i < probs.rows(); ++i) {
    const double inner = probs.row(i).dot(dp.row(i));
    for (Eigen::Index j = 0; j < probs.cols(); ++j) dx(i, j) = probs(i, j) * (dp(i, j) - inner);
  }
  round_inplace(dx, sdt);
  // masked_fill's backward: masked entries were overwritten, no gradient.
  if (mask) attention_mask_func(dx, *mask, b, head, 0.0);
  // x * scale's backward, then the upcast's backward (cast to p.dtype).
  if (scale) {
    dx *= *scale;
    round_inplace(dx, sdt);
  }
  round_inplace(dx, p.dtype);
  return dx;
}

namespace {

int64_t rows_per_slice(const Mat& scores, int64_t b, int64_t np, std::string_view what) {
  if (b < 1 || np < 1 || scores.rows() % (b * np) != 0) {
    throw Error(fmt::format("{} has {} rows, not a multiple of b * np = {} * {} ([b, np, sq, sk] as b*np*sq rows)",
                            what, scores.rows(), b, np));
  }
  return scores.rows() / (b * np);
}

}  // namespace

SoftmaxForward fused_scale_mask_softmax_forward(const Mat& scores, int64_t b, int64_t np, AttnMaskType type,
                                                const std::optional<AttentionMask>& mask,
                                                std::optional<double> scale,
                                                const std::optional<std::array<int64_t, 2>>& window_size,
                                                const Precision& p) {
  const int64_t sq = rows_per_slice(scores, b, np, "softmax input");
  const int64_t sk = scores.cols();
  SoftmaxForward fwd;
  fwd.mask = softmax_mask(type, mask, b, np, sq, sk, window_size);
  fwd.probs.resize(scores.rows(), sk);
  const bool keep_softmax = p.softmax_dtype != p.dtype;
  if (keep_softmax) fwd.probs_softmax.resize(scores.rows(), sk);
  const AttentionMask* m = fwd.mask ? &*fwd.mask : nullptr;
  for (int64_t e = 0; e < b; ++e) {
    for (int64_t h = 0; h < np; ++h) {
      const int64_t r0 = (e * np + h) * sq;
      Mat ps;
      fwd.probs.middleRows(r0, sq) =
          scale_mask_softmax_slice(scores.middleRows(r0, sq), m, e, h, scale, p, keep_softmax ? &ps : nullptr);
      if (keep_softmax) fwd.probs_softmax.middleRows(r0, sq) = ps;
    }
  }
  return fwd;
}

Mat fused_scale_mask_softmax_backward(const SoftmaxForward& fwd, const Mat& d_probs, int64_t b, int64_t np,
                                      std::optional<double> scale, const Precision& p) {
  const int64_t sq = rows_per_slice(d_probs, b, np, "softmax output gradient");
  if (d_probs.rows() != fwd.probs.rows() || d_probs.cols() != fwd.probs.cols()) {
    throw Error(fmt::format("softmax output gradient is [{}, {}], the probs [{}, {}]", d_probs.rows(),
                            d_probs.cols(), fwd.probs.rows(), fwd.probs.cols()));
  }
  const Mat& saved = fwd.probs_softmax.size() > 0 ? fwd.probs_softmax : fwd.probs;
  const AttentionMask* m = fwd.mask ? &*fwd.mask : nullptr;
  Mat dx(d_probs.rows(), d_probs.cols());
  for (int64_t e = 0; e < b; ++e) {
    for (int64_t h = 0; h < np; ++h) {
      const int64_t r0 = (e * np + h) * sq;
      dx.middleRows(r0, sq) =
          scale_mask_softmax_slice_backward(saved.middleRows(r0, sq), d_probs.middleRows(r0, sq), m, e, h, scale, p);
    }
  }
  return dx;
}

}  // namespace paritron::ref
