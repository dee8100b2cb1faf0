#include "optimized/model/attention.h"

#include <cmath>
#include <fmt/format.h>

#include "common/error.h"

namespace paritron::opt {
namespace {

struct Heads {
  int64_t np, ng, hn, r;  // global heads, groups, head dim, heads per group
};

Heads heads_of(const TransformerConfig& cfg) {
  Heads h;
  h.np = cfg.num_attention_heads;
  h.ng = cfg.num_query_groups.value_or(h.np);
  h.hn = cfg.kv_channels.value_or(cfg.hidden_size / h.np);
  h.r = h.np / h.ng;
  return h;
}

// The [s_loc, rot] angle table of the given positions, from the case's
// [S, 1, 1, rot] fp32 table (RotaryEmbedding's output for every position).
Tensor rotary_rows(const Tensor& table, const std::vector<int64_t>& positions) {
  const int64_t rot = table.shape()[3];
  Tensor rows(DType::F32, {static_cast<int64_t>(positions.size()), rot});
  const auto src = table.data<float>();
  auto dst = rows.data<float>();
  for (size_t i = 0; i < positions.size(); ++i) {
    for (int64_t c = 0; c < rot; ++c) dst[i * rot + c] = src[positions[i] * rot + c];
  }
  return rows;
}

// Masks as Megatron's torch path builds them (reference/fused_softmax.cpp
// softmax_mask): a sliding window replaces any mask; else a passed mask is
// used whatever the mask type; else the causal type masks k > q.
void set_mask(ModelContext& m, const LayerArgs& args, int64_t s, AttentionSaved& saved) {
  AttentionArgs& a = saved.args;
  if (m.cfg.window_size) {
    a.window = *m.cfg.window_size;
    if (args.attn_mask_type == "causal") a.window[1] = 0;  // TE: a causal window is (left, 0)
    return;
  }
  if (args.attention_mask) {
    const Tensor& t = *args.attention_mask;
    const Tensor mask = t.to(DType::U8);
    saved.mask.assign(mask.data<uint8_t>().begin(), mask.data<uint8_t>().end());
    Shape dims = t.shape();
    while (dims.size() < 4) dims.insert(dims.begin(), 1);
    a.mask = saved.mask.data();
    a.mask_dims = {dims[0], dims[1], dims[2], dims[3]};
    return;
  }
  a.causal = args.attn_mask_type == "causal" && s > 1;
}

// Splits the per-group fused QKV columns [q_0..q_{r-1} | k | v] of each local
// group into q [rows, np_loc*hn], k and v [rows, ng_loc*hn] (or merges the
// gradients back when `merge`).
void split_qkv(Backend& be, const Heads& h, int64_t ng_loc, DTensor& mixed, DTensor& q, DTensor& k, DTensor& v,
               bool merge) {
  const int64_t width = (h.r + 2) * h.hn;
  for (int64_t g = 0; g < ng_loc; ++g) {
    const int64_t base = g * width;
    if (merge) {
      be.copy_cols(q, g * h.r * h.hn, mixed, base, h.r * h.hn);
      be.copy_cols(k, g * h.hn, mixed, base + h.r * h.hn, h.hn);
      be.copy_cols(v, g * h.hn, mixed, base + (h.r + 1) * h.hn, h.hn);
    } else {
      be.copy_cols(mixed, base, q, g * h.r * h.hn, h.r * h.hn);
      be.copy_cols(mixed, base + h.r * h.hn, k, g * h.hn, h.hn);
      be.copy_cols(mixed, base + (h.r + 1) * h.hn, v, g * h.hn, h.hn);
    }
  }
}

DTensor gather_context_parallel(ModelContext& m, const DTensor& x) {
  if (m.ps.pc.context_parallel_size == 1) return x;
  DTensor out = m.be.empty(x.dtype(), {x.rows() * m.ps.cp.size(), x.cols()});
  m.comm.all_gather(x, out, m.ps.cp);
  return out;
}

DTensor reduce_scatter_context_parallel(ModelContext& m, const DTensor& x) {
  if (m.ps.pc.context_parallel_size == 1) return x;
  DTensor out = m.be.empty(x.dtype(), {x.rows() / m.ps.cp.size(), x.cols()});
  m.comm.reduce_scatter(x, out, m.ps.cp);
  return out;
}

}  // namespace

double effective_softmax_scale(const TransformerConfig& cfg, int64_t layer_number) {
  const Heads h = heads_of(cfg);
  const double coeff = cfg.apply_query_key_layer_scaling ? static_cast<double>(std::max<int64_t>(1, layer_number)) : 1.0;
  // DotProductAttention: alpha = softmax_scale / coeff, or 1 / (sqrt(hn) * coeff);
  // FusedScaleMaskSoftmax multiplies the scores by coeff again.
  const double alpha = cfg.softmax_scale ? *cfg.softmax_scale / coeff : 1.0 / (std::sqrt(static_cast<double>(h.hn)) * coeff);
  return alpha * coeff;
}

DTensor self_attention_forward(ModelContext& m, const std::string& prefix, const std::string& path,
                               int64_t layer_number, const DTensor& x, const TokenLayout& tokens,
                               const LayerArgs& args, AttentionSaved& saved) {
  const Heads h = heads_of(m.cfg);
  const int64_t tp = m.tp(), np_loc = h.np / tp, ng_loc = h.ng / tp;
  const int64_t s_loc = static_cast<int64_t>(tokens.seq.size()), b = tokens.b_local, rows = s_loc * b;

  DTensor mixed = column_parallel_forward(m, prefix + "linear_qkv.", x, saved.qkv);
  if (mixed.rows() != rows) throw Error(fmt::format("{}linear_qkv: {} rows, expected {}", prefix, mixed.rows(), rows));
  DTensor q = m.empty({rows, np_loc * h.hn}), k = m.empty({rows, ng_loc * h.hn}), v = m.empty({rows, ng_loc * h.hn});
  split_qkv(m.be, h, ng_loc, mixed, q, k, v, /*merge=*/false);

  RopeArgs rope;
  if (args.rotary_pos_emb) {
    saved.freqs = m.be.upload(rotary_rows(*args.rotary_pos_emb, tokens.seq), DType::F32);
    rope = {b, np_loc, h.hn, saved.freqs.cols(), m.cfg.rotary_interleaved};
    m.be.rope(rope, q, saved.freqs, q, false);
    rope.heads = ng_loc;
    m.be.rope(rope, k, saved.freqs, k, false);
  }

  // Context parallel: every CP rank's keys and values, with their positions.
  saved.q = q;
  saved.k = gather_context_parallel(m, k);
  saved.v = gather_context_parallel(m, v);
  saved.q_pos = tokens.seq;
  saved.k_pos.clear();
  for (int64_t r = 0; r < m.ps.cp.size(); ++r) {
    const auto pos = context_parallel_positions(tokens.s_global, m.ps.pc.context_parallel_size, r);
    saved.k_pos.insert(saved.k_pos.end(), pos.begin(), pos.end());
  }

  AttentionArgs& a = saved.args;
  a = AttentionArgs{};
  a.batch = b;
  a.sq = s_loc;
  a.sk = static_cast<int64_t>(saved.k_pos.size());
  a.heads = np_loc;
  a.groups = ng_loc;
  a.head_dim = h.hn;
  a.softmax_scale = static_cast<float>(effective_softmax_scale(m.cfg, layer_number));
  set_mask(m, args, tokens.s_global, saved);
  a.q_positions = saved.q_pos;
  a.k_positions = saved.k_pos;
  if (m.training && m.cfg.attention_dropout > 0) {
    a.dropout_p = m.cfg.attention_dropout;
    a.dropout_key = m.key("dropout", path + ".core_attention");
  }
  a.head_offset = m.ps.coord.tp * np_loc;
  a.batch_offset = tokens.batch_offset;
  a.heads_global = h.np;
  a.sq_global = a.sk_global = tokens.s_global;
  a.probs_dtype = m.dtype;

  saved.context = m.empty({rows, np_loc * h.hn});
  saved.lse = m.empty_f32({b, np_loc, s_loc});
  m.be.attention_forward(a, saved.q, saved.k, saved.v, saved.context, saved.lse);
  return row_parallel_forward(m, prefix + "linear_proj.", saved.context, saved.proj);
}

DTensor self_attention_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                const TokenLayout& tokens, AttentionSaved& saved) {
  const Heads h = heads_of(m.cfg);
  const int64_t np_loc = h.np / m.tp(), ng_loc = h.ng / m.tp();
  const int64_t rows = saved.q.rows();
  DTensor d_context = row_parallel_backward(m, prefix + "linear_proj.", dy, saved.proj);

  DTensor dq = m.empty({rows, np_loc * h.hn});
  DTensor dk_all = m.empty({saved.k.rows(), ng_loc * h.hn}), dv_all = m.empty({saved.v.rows(), ng_loc * h.hn});
  m.be.attention_backward(saved.args, saved.q, saved.k, saved.v, saved.context, saved.lse, d_context, dq, dk_all,
                          dv_all);
  DTensor dk = reduce_scatter_context_parallel(m, dk_all);
  DTensor dv = reduce_scatter_context_parallel(m, dv_all);

  if (saved.freqs.defined()) {
    RopeArgs rope{tokens.b_local, np_loc, h.hn, saved.freqs.cols(), m.cfg.rotary_interleaved};
    m.be.rope(rope, dq, saved.freqs, dq, true);
    rope.heads = ng_loc;
    m.be.rope(rope, dk, saved.freqs, dk, true);
  }
  DTensor d_mixed = m.empty({rows, ng_loc * (h.r + 2) * h.hn});
  split_qkv(m.be, h, ng_loc, d_mixed, dq, dk, dv, /*merge=*/true);
  const LinearSaved qkv = std::move(saved.qkv);
  saved = AttentionSaved{};  // free the activations
  return column_parallel_backward(m, prefix + "linear_qkv.", d_mixed, qkv);
}

}  // namespace paritron::opt
