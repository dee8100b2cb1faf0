// See dot_product_attention.h.
#include "reference/dot_product_attention.h"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <vector>

#include "common/error.h"

namespace paritron::ref {

AttentionDims attention_dims(const TransformerConfig& cfg) {
  AttentionDims d;
  d.np = cfg.num_attention_heads;
  if (d.np < 1) throw Error(fmt::format("num_attention_heads = {}: must be >= 1", d.np));
  d.ng = cfg.num_query_groups.value_or(d.np);
  if (d.ng < 1) throw Error(fmt::format("num_query_groups = {}: must be >= 1", d.ng));
  if (d.np % d.ng != 0) {
    throw Error(fmt::format("num_attention_heads ({}) must be a multiple of num_query_groups ({})", d.np, d.ng));
  }
  // TransformerConfig.__post_init__: kv_channels = hidden_size // num_attention_heads.
  d.hn = cfg.kv_channels.value_or(cfg.hidden_size / d.np);
  if (d.hn < 1) throw Error(fmt::format("kv_channels = {}: must be >= 1", d.hn));
  return d;
}

AttentionScale attention_scale(const TransformerConfig& cfg, int64_t layer_number) {
  const AttentionDims d = attention_dims(cfg);
  const int64_t L = std::max<int64_t>(1, layer_number);  // DotProductAttention: max(1, layer_number)
  AttentionScale s;
  if (cfg.softmax_scale) {
    // core_v0.19.0: self.softmax_scale = softmax_scale; under layer scaling
    // softmax_scale /= coeff.
    s.alpha = *cfg.softmax_scale;
    if (cfg.apply_query_key_layer_scaling) {
      s.coeff = static_cast<double>(L);
      s.alpha /= static_cast<double>(L);
    }
  } else {
    // core_v0.5.0: norm_factor = sqrt(hn) (* coeff), alpha = 1 / norm_factor.
    double norm_factor = std::sqrt(static_cast<double>(d.hn));
    if (cfg.apply_query_key_layer_scaling) {
      s.coeff = static_cast<double>(L);
      norm_factor *= static_cast<double>(L);
    }
    s.alpha = 1.0 / norm_factor;
  }
  return s;
}

namespace {

using StridedConst = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
using Strided = Eigen::Map<Mat, 0, Eigen::OuterStride<>>;

// Head `head` of batch element e of a [s*b, heads*hn] tensor: [s, hn].
Mat head_slice(const Mat& t, int64_t b, int64_t e, int64_t head, int64_t hn) {
  const int64_t s = t.rows() / b;
  return StridedConst(t.data() + e * t.cols() + head * hn, s, hn, Eigen::OuterStride<>(b * t.cols()));
}

Strided head_block(Mat& t, int64_t b, int64_t e, int64_t head, int64_t hn) {
  const int64_t s = t.rows() / b;
  return Strided(t.data() + e * t.cols() + head * hn, s, hn, Eigen::OuterStride<>(b * t.cols()));
}

void check_inputs(const AttentionDims& d, const Mat& query, const Mat& key, const Mat& value, int64_t b) {
  if (b < 1) throw Error(fmt::format("micro-batch size b = {}: must be >= 1", b));
  if (query.cols() != d.np * d.hn || query.rows() % b != 0) {
    throw Error(fmt::format("query is [{}, {}], expected [sq*b, np*hn] with b = {}, np*hn = {}*{}", query.rows(),
                            query.cols(), b, d.np, d.hn));
  }
  for (const auto& [name, t] : {std::pair<const char*, const Mat*>{"key", &key}, {"value", &value}}) {
    if (t->cols() != d.ng * d.hn || t->rows() % b != 0) {
      throw Error(fmt::format("{} is [{}, {}], expected [sk*b, ng*hn] with b = {}, ng*hn = {}*{}", name, t->rows(),
                              t->cols(), b, d.ng, d.hn));
    }
  }
  if (key.rows() != value.rows()) {
    throw Error(fmt::format("key has {} rows but value has {}: both are [sk*b, ng*hn]", key.rows(), value.rows()));
  }
}

}  // namespace

DotProductAttentionForward dot_product_attention_forward(const TransformerConfig& cfg, const Mat& query,
                                                         const Mat& key, const Mat& value, int64_t b,
                                                         AttnMaskType mask_type,
                                                         const std::optional<AttentionMask>& attention_mask,
                                                         const Precision& p, const RunContext& ctx,
                                                         const Sink& taps) {
  const AttentionDims d = attention_dims(cfg);
  check_inputs(d, query, key, value, b);
  DotProductAttentionForward fwd;
  fwd.b = b;
  fwd.sq = query.rows() / b;
  fwd.sk = key.rows() / b;
  const int64_t sq = fwd.sq, sk = fwd.sk, r = d.heads_per_group();
  fwd.scale = attention_scale(cfg, ctx.layer_number);
  fwd.mask = softmax_mask(mask_type, attention_mask, b, d.np, sq, sk, cfg.window_size);
  const AttentionMask* mask = fwd.mask ? &*fwd.mask : nullptr;

  const bool keep_softmax = p.softmax_dtype != p.dtype;
  const bool drop = ctx.training && cfg.attention_dropout > 0.0;
  fwd.probs.resize(b * d.np * sq, sk);
  if (keep_softmax) fwd.probs_softmax.resize(fwd.probs.rows(), sk);
  if (drop) {
    fwd.dropout_scale.resize(fwd.probs.rows(), sk);
    fwd.probs_dropped.resize(fwd.probs.rows(), sk);
  }
  fwd.output = Mat::Zero(query.rows(), d.np * d.hn);

  for (int64_t e = 0; e < b; ++e) {
    for (int64_t j = 0; j < d.np; ++j) {
      const int64_t g = j / r;  // repeat_interleave: heads g*r .. g*r+r-1 share group g
      const int64_t r0 = (e * d.np + j) * sq;
      const Mat q = head_slice(query, b, e, j, d.hn);
      const Mat k = head_slice(key, b, e, g, d.hn);
      const Mat v = head_slice(value, b, e, g, d.hn);
      // baddbmm(beta=0, alpha): alpha scales the fp32 accumulator.
      const Mat scores = matmul(q, k.transpose(), p.dtype, fwd.scale.alpha);
      Mat ps;
      Mat probs = scale_mask_softmax_slice(scores, mask, e, j, fwd.scale.coeff, p, keep_softmax ? &ps : nullptr);
      fwd.probs.middleRows(r0, sq) = probs;
      if (keep_softmax) fwd.probs_softmax.middleRows(r0, sq) = ps;
      if (drop) {
        // Element (i, l) of this slice is element r0*sk + i*sk + l of [b, np, sq, sk].
        Mat scale;
        probs = rounded(dropout(probs, cfg.attention_dropout, ctx, "dropout", &scale,
                                static_cast<uint64_t>(r0 * sk)),
                        p.dtype);
        fwd.dropout_scale.middleRows(r0, sq) = scale;
        fwd.probs_dropped.middleRows(r0, sq) = probs;
      }
      head_block(fwd.output, b, e, j, d.hn) = matmul(probs, v, p.dtype);
    }
  }

  if (taps.active()) {
    taps.put("query", query);
    taps.put("key", key);
    taps.put("value", value);
    taps.put("scale_mask_softmax.output", fwd.probs);
    if (drop) taps.put("attention_dropout.output", fwd.probs_dropped);
    taps.put("output", fwd.output);
  }
  return fwd;
}

DotProductAttentionGrads dot_product_attention_backward(const TransformerConfig& cfg, const Mat& query,
                                                        const Mat& key, const Mat& value,
                                                        const DotProductAttentionForward& fwd, const Mat& d_output,
                                                        const Precision& p) {
  const AttentionDims d = attention_dims(cfg);
  const int64_t b = fwd.b;
  check_inputs(d, query, key, value, b);
  const int64_t sq = fwd.sq, sk = fwd.sk, r = d.heads_per_group();
  if (query.rows() != sq * b || key.rows() != sk * b || fwd.probs.rows() != b * d.np * sq) {
    throw Error("dot_product_attention_backward: the inputs are not the ones the forward ran on");
  }
  if (d_output.rows() != fwd.output.rows() || d_output.cols() != fwd.output.cols()) {
    throw Error(fmt::format("d_output is [{}, {}], expected the output's shape [{}, {}]", d_output.rows(),
                            d_output.cols(), fwd.output.rows(), fwd.output.cols()));
  }
  const bool drop = fwd.dropout_scale.size() > 0;
  const Mat& saved_probs = fwd.probs_softmax.size() > 0 ? fwd.probs_softmax : fwd.probs;
  const Mat& context_probs = drop ? fwd.probs_dropped : fwd.probs;
  const AttentionMask* mask = fwd.mask ? &*fwd.mask : nullptr;
  const double alpha = fwd.scale.alpha;

  DotProductAttentionGrads g;
  g.d_query = Mat::Zero(query.rows(), query.cols());
  // Per-head key/value gradients summed over each group in double, rounded
  // once: repeat_interleave's backward is one reduction.
  Mat dk_sum = Mat::Zero(key.rows(), key.cols());
  Mat dv_sum = Mat::Zero(value.rows(), value.cols());

  for (int64_t e = 0; e < b; ++e) {
    for (int64_t j = 0; j < d.np; ++j) {
      const int64_t grp = j / r;
      const int64_t r0 = (e * d.np + j) * sq;
      const Mat q = head_slice(query, b, e, j, d.hn);
      const Mat k = head_slice(key, b, e, grp, d.hn);
      const Mat v = head_slice(value, b, e, grp, d.hn);
      const Mat dc = head_slice(d_output, b, e, j, d.hn);
      const Mat pc = context_probs.middleRows(r0, sq);
      // context = bmm(P', V): dP' = dC V^T, dV = P'^T dC.
      Mat dp = matmul(dc, v.transpose(), p.dtype);
      head_block(dv_sum, b, e, grp, d.hn) += matmul(pc.transpose(), dc, p.dtype);
      if (drop) dp = rounded(dp.cwiseProduct(fwd.dropout_scale.middleRows(r0, sq)), p.dtype);
      const Mat ds = scale_mask_softmax_slice_backward(saved_probs.middleRows(r0, sq), dp, mask, e, j,
                                                       fwd.scale.coeff, p);
      // baddbmm's backward: bmm, then maybe_multiply(alpha) as a separate op.
      head_block(g.d_query, b, e, j, d.hn) = rounded(matmul(ds, k, p.dtype) * alpha, p.dtype);
      head_block(dk_sum, b, e, grp, d.hn) += rounded(matmul(ds.transpose(), q, p.dtype) * alpha, p.dtype);
    }
  }
  g.d_key = rounded(std::move(dk_sum), p.dtype);
  g.d_value = rounded(std::move(dv_sum), p.dtype);
  return g;
}

}  // namespace paritron::ref
