// See cross_attention.h.
#include "reference/cross_attention.h"

#include <fmt/format.h>

#include "common/error.h"
#include "reference/linear.h"
#include "reference/self_attention.h"

namespace paritron::ref {

void split_kv(const Mat& mixed_kv, const AttentionDims& d, Mat& key, Mat& value) {
  const int64_t hn = d.hn;
  if (mixed_kv.cols() != 2 * d.np * hn) {
    throw Error(fmt::format("linear_kv output has {} channels, expected 2*n*hn = 2*{}*{}", mixed_kv.cols(), d.np, hn));
  }
  key.resize(mixed_kv.rows(), d.np * hn);
  value.resize(mixed_kv.rows(), d.np * hn);
  // view [sk, b, np, 2*hn], split_tensor_along_last_dim(mixed_kv, 2).
  for (int64_t j = 0; j < d.np; ++j) {
    key.middleCols(j * hn, hn) = mixed_kv.middleCols(j * 2 * hn, hn);
    value.middleCols(j * hn, hn) = mixed_kv.middleCols(j * 2 * hn + hn, hn);
  }
}

Mat merge_kv(const Mat& key, const Mat& value, const AttentionDims& d) {
  const int64_t hn = d.hn;
  Mat mixed(key.rows(), 2 * d.np * hn);
  for (int64_t j = 0; j < d.np; ++j) {
    mixed.middleCols(j * 2 * hn, hn) = key.middleCols(j * hn, hn);
    mixed.middleCols(j * 2 * hn + hn, hn) = value.middleCols(j * hn, hn);
  }
  return mixed;
}

namespace {

AttentionDims cross_attention_checks(const TransformerConfig& cfg, const Params& w, const Mat& x, const Mat& c,
                                     int64_t b) {
  const AttentionDims d = attention_dims(cfg);
  if (d.ng != d.np) {
    throw Error(fmt::format("cross attention needs num_query_groups == num_attention_heads (got {} and {}): "
                            "Megatron's CrossAttention does not support group query attention",
                            d.ng, d.np));
  }
  if (b < 1) throw Error(fmt::format("micro-batch size b = {}: must be >= 1", b));
  for (const auto& [name, t] :
       {std::pair<const char*, const Mat*>{"hidden_states", &x}, {"key_value_states", &c}}) {
    if (t->cols() != cfg.hidden_size || t->rows() % b != 0) {
      throw Error(fmt::format("{} is [{}, {}], expected [s*b, hidden_size] with b = {}, hidden_size = {}", name,
                              t->rows(), t->cols(), b, cfg.hidden_size));
    }
  }
  const int64_t proj = d.np * d.hn;
  check_linear_params(w, "linear_q", proj, cfg.hidden_size, cfg.add_bias_linear, "add_bias_linear");
  check_linear_params(w, "linear_kv", 2 * proj, cfg.hidden_size, cfg.add_bias_linear, "add_bias_linear");
  check_linear_params(w, "linear_proj", cfg.hidden_size, proj, cfg.add_bias_linear, "add_bias_linear");
  return d;
}

}  // namespace

CrossAttentionForward cross_attention_forward(const TransformerConfig& cfg, const Params& w,
                                              const Mat& hidden_states, const Mat& key_value_states, int64_t b,
                                              AttnMaskType mask_type,
                                              const std::optional<AttentionMask>& attention_mask,
                                              const Precision& p, const RunContext& ctx, const Sink& taps) {
  const AttentionDims d = cross_attention_checks(cfg, w, hidden_states, key_value_states, b);
  CrossAttentionForward fwd;
  // get_query_key_value_tensors: linear_kv first, then linear_q (order does
  // not matter for the values; kept as in Megatron).
  fwd.mixed_kv = linear_forward(w.sub("linear_kv"), key_value_states, /*add_bias=*/true, p);
  split_kv(fwd.mixed_kv, d, fwd.key, fwd.value);
  fwd.query = linear_forward(w.sub("linear_q"), hidden_states, /*add_bias=*/true, p);
  fwd.core = dot_product_attention_forward(cfg, fwd.query, fwd.key, fwd.value, b, mask_type, attention_mask, p,
                                           ctx.sub("core_attention"), taps.sub("core_attention"));
  fwd.output = attention_proj_forward(cfg, w, fwd.core.output, p, &fwd.output_bias);
  if (taps.active()) {
    taps.put("linear_q.output", fwd.query);
    taps.put("linear_kv.output", fwd.mixed_kv);
    taps.put("output", fwd.output);
  }
  return fwd;
}

CrossAttentionGrads cross_attention_backward(const TransformerConfig& cfg, const Params& w,
                                             const Mat& hidden_states, const Mat& key_value_states, int64_t b,
                                             const CrossAttentionForward& fwd, const Mat& d_output,
                                             const std::optional<RowVec>& d_output_bias, const Sink& grads,
                                             const Precision& p) {
  const AttentionDims d = cross_attention_checks(cfg, w, hidden_states, key_value_states, b);
  const Mat d_context = attention_proj_backward(cfg, w, fwd.core.output, d_output, d_output_bias, grads, p);
  const DotProductAttentionGrads g =
      dot_product_attention_backward(cfg, fwd.query, fwd.key, fwd.value, fwd.core, d_context, p);
  CrossAttentionGrads out;
  out.d_hidden_states =
      linear_backward(w.sub("linear_q"), hidden_states, g.d_query, /*bias_grad=*/true, grads.sub("linear_q"), p);
  out.d_key_value_states = linear_backward(w.sub("linear_kv"), key_value_states, merge_kv(g.d_key, g.d_value, d),
                                           /*bias_grad=*/true, grads.sub("linear_kv"), p);
  return out;
}

}  // namespace paritron::ref
