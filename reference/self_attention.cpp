// See self_attention.h.
#include "reference/self_attention.h"

#include <fmt/format.h>

#include "common/error.h"
#include "reference/linear.h"
#include "reference/rotary_pos_emb.h"

namespace paritron::ref {

void check_linear_params(const Params& w, std::string_view linear, int64_t out, int64_t in, bool has_bias,
                         std::string_view bias_rule) {
  const std::string weight = std::string(linear) + ".weight";
  const std::string bias = std::string(linear) + ".bias";
  w.at(weight, out, in);
  if (has_bias) {
    w.row(bias, out);
  } else if (w.has(bias)) {
    throw Error(fmt::format("unexpected parameter '{}{}': the config has no bias there ({} is false)", w.prefix(),
                            bias, bias_rule));
  }
}

void split_qkv(const Mat& mixed, const AttentionDims& d, Mat& query, Mat& key, Mat& value) {
  const int64_t r = d.heads_per_group(), hn = d.hn;
  if (mixed.cols() != (d.np + 2 * d.ng) * hn) {
    throw Error(fmt::format("linear_qkv output has {} channels, expected (n + 2g)*hn = ({} + 2*{})*{}", mixed.cols(),
                            d.np, d.ng, hn));
  }
  query.resize(mixed.rows(), d.np * hn);
  key.resize(mixed.rows(), d.ng * hn);
  value.resize(mixed.rows(), d.ng * hn);
  // view [T, ng, (r + 2)*hn], split the last axis [r*hn | hn | hn] (spec §4.2).
  for (int64_t g = 0; g < d.ng; ++g) {
    const int64_t base = g * (r + 2) * hn;
    query.middleCols(g * r * hn, r * hn) = mixed.middleCols(base, r * hn);
    key.middleCols(g * hn, hn) = mixed.middleCols(base + r * hn, hn);
    value.middleCols(g * hn, hn) = mixed.middleCols(base + (r + 1) * hn, hn);
  }
}

Mat merge_qkv(const Mat& query, const Mat& key, const Mat& value, const AttentionDims& d) {
  const int64_t r = d.heads_per_group(), hn = d.hn;
  Mat mixed(query.rows(), (d.np + 2 * d.ng) * hn);
  for (int64_t g = 0; g < d.ng; ++g) {
    const int64_t base = g * (r + 2) * hn;
    mixed.middleCols(base, r * hn) = query.middleCols(g * r * hn, r * hn);
    mixed.middleCols(base + r * hn, hn) = key.middleCols(g * hn, hn);
    mixed.middleCols(base + (r + 1) * hn, hn) = value.middleCols(g * hn, hn);
  }
  return mixed;
}

Mat attention_proj_forward(const TransformerConfig& cfg, const Params& w, const Mat& context, const Precision& p,
                           std::optional<RowVec>* output_bias) {
  // RowParallelLinear(skip_bias_add=True): the GEMM only; the bias is returned.
  Mat out = linear_forward(w.sub("linear_proj"), context, /*add_bias=*/false, p);
  if (output_bias) {
    *output_bias = std::nullopt;
    if (cfg.add_bias_linear) *output_bias = w.row("linear_proj.bias", cfg.hidden_size);
  }
  return out;
}

Mat attention_proj_backward(const TransformerConfig& cfg, const Params& w, const Mat& context, const Mat& d_output,
                            const std::optional<RowVec>& d_output_bias, const Sink& grads, const Precision& p) {
  // linear_proj's output is [tokens, h]: one row per row of the context.
  if (d_output.rows() != context.rows() || d_output.cols() != cfg.hidden_size) {
    throw Error(fmt::format("d_output is [{}, {}], expected the output's shape [{}, {}]", d_output.rows(),
                            d_output.cols(), context.rows(), cfg.hidden_size));
  }
  Mat d_context = linear_backward(w.sub("linear_proj"), context, d_output, /*bias_grad=*/false,
                                  grads.sub("linear_proj"), p);
  if (cfg.add_bias_linear) {
    // The bias reaches the loss only through output_bias.
    RowVec db = RowVec::Zero(cfg.hidden_size);
    if (d_output_bias) {
      if (d_output_bias->cols() != cfg.hidden_size) {
        throw Error(fmt::format("d_output_bias has {} entries, expected hidden_size = {}", d_output_bias->cols(),
                                cfg.hidden_size));
      }
      db = *d_output_bias;
    }
    grads.add_row("linear_proj.bias", db);
  }
  return d_context;
}

namespace {

void check_hidden(const TransformerConfig& cfg, const Mat& x, int64_t b, std::string_view name) {
  if (b < 1) throw Error(fmt::format("micro-batch size b = {}: must be >= 1", b));
  if (x.cols() != cfg.hidden_size || x.rows() % b != 0) {
    throw Error(fmt::format("{} is [{}, {}], expected [s*b, hidden_size] with b = {}, hidden_size = {}", name,
                            x.rows(), x.cols(), b, cfg.hidden_size));
  }
}

void check_rotary(const std::optional<Mat>& freqs, int64_t s, const AttentionDims& d) {
  if (!freqs) return;
  if (freqs->rows() != s || freqs->cols() < 1 || freqs->cols() > d.hn || freqs->cols() % 2 != 0) {
    throw Error(fmt::format("rotary_pos_emb is [{}, {}], expected [s, rot_dim] with s = {} and an even rot_dim <= "
                            "kv_channels = {}",
                            freqs->rows(), freqs->cols(), s, d.hn));
  }
}

AttentionDims self_attention_checks(const TransformerConfig& cfg, const Params& w, const Mat& x, int64_t b,
                                    const std::optional<Mat>& rotary_pos_emb) {
  if (cfg.qk_layernorm) {
    throw Error("qk_layernorm (a newer-version field) is not supported by the reference self attention");
  }
  const AttentionDims d = attention_dims(cfg);
  check_hidden(cfg, x, b, "hidden_states");
  check_rotary(rotary_pos_emb, x.rows() / b, d);
  check_linear_params(w, "linear_qkv", (d.np + 2 * d.ng) * d.hn, cfg.hidden_size,
                      cfg.add_bias_linear || cfg.add_qkv_bias, "add_bias_linear or add_qkv_bias");
  check_linear_params(w, "linear_proj", cfg.hidden_size, d.np * d.hn, cfg.add_bias_linear, "add_bias_linear");
  return d;
}

}  // namespace

SelfAttentionForward self_attention_forward(const TransformerConfig& cfg, const Params& w,
                                            const Mat& hidden_states, int64_t b, AttnMaskType mask_type,
                                            const std::optional<AttentionMask>& attention_mask,
                                            const std::optional<Mat>& rotary_pos_emb, const Precision& p,
                                            const RunContext& ctx, const Sink& taps) {
  const AttentionDims d = self_attention_checks(cfg, w, hidden_states, b, rotary_pos_emb);
  SelfAttentionForward fwd;
  // ColumnParallelLinear(skip_bias_add=False): the bias is added inside.
  fwd.mixed_qkv = linear_forward(w.sub("linear_qkv"), hidden_states, /*add_bias=*/true, p);
  split_qkv(fwd.mixed_qkv, d, fwd.query, fwd.key, fwd.value);
  if (rotary_pos_emb) {
    // A single table serves q and k: rotary_pos_emb = (emb, emb).
    fwd.query = apply_rotary_pos_emb_forward(fwd.query, b, d.np, *rotary_pos_emb, cfg.rotary_interleaved, p);
    fwd.key = apply_rotary_pos_emb_forward(fwd.key, b, d.ng, *rotary_pos_emb, cfg.rotary_interleaved, p);
  }
  fwd.core = dot_product_attention_forward(cfg, fwd.query, fwd.key, fwd.value, b, mask_type, attention_mask, p,
                                           ctx.sub("core_attention"), taps.sub("core_attention"));
  fwd.output = attention_proj_forward(cfg, w, fwd.core.output, p, &fwd.output_bias);
  if (taps.active()) {
    taps.put("linear_qkv.output", fwd.mixed_qkv);
    taps.put("output", fwd.output);
  }
  return fwd;
}

Mat self_attention_backward(const TransformerConfig& cfg, const Params& w, const Mat& hidden_states, int64_t b,
                            const std::optional<Mat>& rotary_pos_emb, const SelfAttentionForward& fwd,
                            const Mat& d_output, const std::optional<RowVec>& d_output_bias, const Sink& grads,
                            const Precision& p) {
  const AttentionDims d = self_attention_checks(cfg, w, hidden_states, b, rotary_pos_emb);
  const Mat d_context = attention_proj_backward(cfg, w, fwd.core.output, d_output, d_output_bias, grads, p);
  DotProductAttentionGrads g =
      dot_product_attention_backward(cfg, fwd.query, fwd.key, fwd.value, fwd.core, d_context, p);
  if (rotary_pos_emb) {
    g.d_query = apply_rotary_pos_emb_backward(g.d_query, b, d.np, *rotary_pos_emb, cfg.rotary_interleaved, p);
    g.d_key = apply_rotary_pos_emb_backward(g.d_key, b, d.ng, *rotary_pos_emb, cfg.rotary_interleaved, p);
  }
  const Mat d_mixed = merge_qkv(g.d_query, g.d_key, g.d_value, d);
  return linear_backward(w.sub("linear_qkv"), hidden_states, d_mixed, /*bias_grad=*/true, grads.sub("linear_qkv"),
                         p);
}

}  // namespace paritron::ref
