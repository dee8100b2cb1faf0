#include "optimized/model/attention.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <fmt/format.h>

#include "common/error.h"
#include "optimized/faults.h"

namespace paritron::opt {
namespace {

using faults::Fault;

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

// Masks as Megatron's torch path builds them (reference/fused_softmax.cpp
// softmax_mask): a sliding window replaces any mask; else a passed mask is
// used whatever the mask type; else the causal type masks k > q.
void set_mask(ModelContext& m, const CoreAttentionCall& call, int64_t np, AttentionSaved& saved) {
  AttentionArgs& a = saved.args;
  const int64_t sq = call.sq_global, sk = call.sk_global;
  if (m.cfg.window_size) {
    if (sq != sk) {
      throw Error(fmt::format("sliding window attention with sq = {} != sk = {} is not run by the optimized side "
                              "(the window aligns bottom-right there; its kernel's window is on positions)",
                              sq, sk));
    }
    a.window = *m.cfg.window_size;
    if (call.mask_type == "causal") a.window[1] = 0;  // TE: a causal window is (left, 0)
    if (call.mask_type == "causal" && faults::active(Fault::causal_mask_off_by_one)) a.window[1] = 1;
    return;
  }
  if (call.mask) {
    const Tensor& t = *call.mask;
    Shape dims = t.shape();
    if (dims.size() > 4) throw Error(fmt::format("the attention mask has shape {}: at most 4-D", shape_string(dims)));
    while (dims.size() < 4) dims.insert(dims.begin(), 1);
    const std::array<int64_t, 4> want = {call.b_global, np, sq, sk};
    for (size_t i = 0; i < 4; ++i) {
      if (dims[i] != 1 && dims[i] != want[i]) {
        throw Error(fmt::format("the attention mask has shape {}, not broadcastable to [b, np, sq, sk] = [{}, {}, {}, {}]",
                                shape_string(t.shape()), want[0], want[1], want[2], want[3]));
      }
    }
    const Tensor mask = t.to(DType::U8);
    saved.mask.assign(mask.data<uint8_t>().begin(), mask.data<uint8_t>().end());
    a.mask = saved.mask.data();
    a.mask_dims = {dims[0], dims[1], dims[2], dims[3]};
    return;
  }
  if (call.mask_type == "causal" && sq > 1) {
    if (sq != sk) {
      throw Error(fmt::format("the causal mask type without an attention mask needs sq == sk (got sq = {}, sk = {}): "
                              "Megatron builds the default causal mask only for self attention",
                              sq, sk));
    }
    a.causal = true;
    if (faults::active(Fault::causal_mask_off_by_one)) {  // masks k > q + 1 (triu diagonal 2)
      a.causal = false;
      a.window = {-1, 1};
    }
  }
}

std::string sub_path(const std::string& path, const std::string& module) {
  return path.empty() ? module : path + "." + module;
}

// Splits the per-group fused QKV columns [q_0..q_{r-1} | k | v] of each local
// group into q [rows, np_loc*hn], k and v [rows, ng_loc*hn] (or merges the
// gradients back when `merge`).
void split_qkv(Backend& be, const Heads& h, int64_t ng_loc, DTensor& mixed, DTensor& q, DTensor& k, DTensor& v,
               bool merge) {
  if (faults::active(Fault::qkv_split_per_group) && ng_loc > 1) {
    // [q | k | v] over the whole local projection instead of per query group.
    const int64_t nq = ng_loc * h.r * h.hn, nk = ng_loc * h.hn;
    if (merge) {
      be.copy_cols(q, 0, mixed, 0, nq);
      be.copy_cols(k, 0, mixed, nq, nk);
      be.copy_cols(v, 0, mixed, nq + nk, nk);
    } else {
      be.copy_cols(mixed, 0, q, 0, nq);
      be.copy_cols(mixed, nq, k, 0, nk);
      be.copy_cols(mixed, nq + nk, v, 0, nk);
    }
    return;
  }
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

// Fault gqa_tiling: K/V [rows, ng*hn] expanded to [rows, r*ng*hn] by tiling
// (torch .repeat, head j gets group j % ng) instead of repeat_interleave; and
// the gradient of the expansion (the r tiles summed).
DTensor tile_heads(ModelContext& m, const DTensor& x, int64_t r) {
  DTensor out = m.be.empty(x.dtype(), {x.rows(), r * x.cols()});
  for (int64_t t = 0; t < r; ++t) m.be.copy_cols(x, 0, out, t * x.cols(), x.cols());
  return out;
}

DTensor untile_heads_grad(ModelContext& m, const DTensor& dx, int64_t cols) {
  DTensor out = m.be.empty(dx.dtype(), {dx.rows(), cols});
  m.be.copy_cols(dx, 0, out, 0, cols);
  DTensor part = m.be.empty(dx.dtype(), {dx.rows(), cols});
  for (int64_t t = 1; t < dx.cols() / cols; ++t) {
    m.be.copy_cols(dx, t * cols, part, 0, cols);
    m.be.axpby(1.0f, out, 1.0f, part, out);
  }
  return out;
}

DTensor reduce_scatter_context_parallel(ModelContext& m, const DTensor& x) {
  if (m.ps.pc.context_parallel_size == 1) return x;
  DTensor out = m.be.empty(x.dtype(), {x.rows() / m.ps.cp.size(), x.cols()});
  m.comm.reduce_scatter(x, out, m.ps.cp);
  return out;
}

}  // namespace

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

double effective_softmax_scale(const TransformerConfig& cfg, int64_t layer_number) {
  const Heads h = heads_of(cfg);
  const double coeff = cfg.apply_query_key_layer_scaling ? static_cast<double>(std::max<int64_t>(1, layer_number)) : 1.0;
  // DotProductAttention: alpha = softmax_scale / coeff, or 1 / (sqrt(hn) * coeff);
  // FusedScaleMaskSoftmax multiplies the scores by coeff again.
  const double alpha = cfg.softmax_scale ? *cfg.softmax_scale / coeff : 1.0 / (std::sqrt(static_cast<double>(h.hn)) * coeff);
  if (faults::active(Fault::softmax_scale_no_layer_number)) return alpha;  // the softmax's scale = coeff dropped
  return alpha * coeff;
}

DTensor core_attention_forward(ModelContext& m, const CoreAttentionCall& call, const DTensor& q, const DTensor& k,
                               const DTensor& v, AttentionSaved& saved) {
  const Heads h = heads_of(m.cfg);
  const int64_t np_loc = q.cols() / h.hn, ng_loc = k.cols() / h.hn, b = call.batch;
  const int64_t sq_loc = static_cast<int64_t>(call.q_pos.size());
  if (q.rows() != sq_loc * b || q.cols() != np_loc * h.hn || k.cols() != ng_loc * h.hn || v.rows() != k.rows() ||
      v.cols() != k.cols()) {
    throw Error(fmt::format("core attention: q [{}, {}], k [{}, {}], v [{}, {}] for {} query rows x {} sequences, "
                            "head dim {}",
                            q.rows(), q.cols(), k.rows(), k.cols(), v.rows(), v.cols(), sq_loc, b, h.hn));
  }
  saved.q = q;
  saved.k = call.gather_kv ? gather_context_parallel(m, k) : k;
  saved.v = call.gather_kv ? gather_context_parallel(m, v) : v;
  saved.q_pos = call.q_pos;
  saved.k_pos.clear();
  if (call.gather_kv) {
    // Every CP rank's keys and values, with their positions.
    for (int64_t r = 0; r < m.ps.cp.size(); ++r) {
      auto pos = context_parallel_positions(call.sk_global, m.ps.pc.context_parallel_size, r);
      if (faults::active(Fault::cp_chunk_order)) {  // rank r's chunks taken as r and r + cp
        const int64_t cp = m.ps.pc.context_parallel_size, chunk = call.sk_global / (2 * cp);
        pos.clear();
        for (int64_t c : {r, r + cp}) {
          for (int64_t i = 0; i < chunk; ++i) pos.push_back(c * chunk + i);
        }
      }
      saved.k_pos.insert(saved.k_pos.end(), pos.begin(), pos.end());
    }
  } else {
    for (int64_t i = 0; i < call.sk_global; ++i) saved.k_pos.push_back(i);
  }
  if (saved.k.rows() != static_cast<int64_t>(saved.k_pos.size()) * b) {
    throw Error(fmt::format("core attention: {} key rows for {} key positions x {} sequences", saved.k.rows(),
                            saved.k_pos.size(), b));
  }

  AttentionArgs& a = saved.args;
  a = AttentionArgs{};
  a.batch = b;
  a.sq = sq_loc;
  a.sk = static_cast<int64_t>(saved.k_pos.size());
  a.heads = np_loc;
  a.groups = ng_loc;
  if (faults::active(Fault::gqa_tiling) && np_loc > ng_loc) {
    saved.k = tile_heads(m, saved.k, np_loc / ng_loc);
    saved.v = tile_heads(m, saved.v, np_loc / ng_loc);
    a.groups = np_loc;
  }
  a.head_dim = h.hn;
  a.softmax_scale = static_cast<float>(effective_softmax_scale(m.cfg, call.layer_number));
  set_mask(m, call, h.np, saved);
  if (faults::active(Fault::masked_fill_zero)) a.fill = 0.0f;
  a.q_positions = saved.q_pos;
  a.k_positions = saved.k_pos;
  if (m.training && m.cfg.attention_dropout > 0) {
    a.dropout_p = m.cfg.attention_dropout;
    a.dropout_key = m.key("dropout", sub_path(call.path, "core_attention"));
  }
  a.head_offset = m.ps.coord.tp * np_loc;
  a.batch_offset = call.batch_offset;
  a.heads_global = h.np;
  a.sq_global = call.sq_global;
  a.sk_global = call.sk_global;
  a.probs_dtype = m.dtype;
  saved.gather_kv = call.gather_kv;

  saved.context = m.empty({q.rows(), np_loc * h.hn});
  saved.lse = m.empty_f32({b, np_loc, sq_loc});
  m.be.attention_forward(a, saved.q, saved.k, saved.v, saved.context, saved.lse);
  const DTensor context = saved.context;
  saved.recompute = m.cfg.recompute_granularity == "selective";
  if (saved.recompute) {  // keep q, k, v only; the backward recomputes context and lse
    saved.context = DTensor{};
    saved.lse = DTensor{};
  }
  return context;
}

DTensor core_attention_backward(ModelContext& m, const DTensor& d_context, AttentionSaved& saved, DTensor& dk,
                                DTensor& dv) {
  if (saved.recompute) {  // selective recompute: core attention's forward again, just before its backward
    saved.context = m.empty({saved.q.rows(), saved.q.cols()});
    saved.lse = m.empty_f32({saved.args.batch, saved.args.heads, saved.args.sq});
    m.be.attention_forward(saved.args, saved.q, saved.k, saved.v, saved.context, saved.lse);
    saved.recompute = false;
  }
  DTensor dq = m.empty({saved.q.rows(), saved.q.cols()});
  DTensor dk_all = m.empty({saved.k.rows(), saved.k.cols()}), dv_all = m.empty({saved.v.rows(), saved.v.cols()});
  m.be.attention_backward(saved.args, saved.q, saved.k, saved.v, saved.context, saved.lse, d_context, dq, dk_all,
                          dv_all);
  if (faults::active(Fault::gqa_tiling) && saved.args.groups == saved.args.heads) {
    const int64_t hn = saved.args.head_dim, ng_loc = heads_of(m.cfg).ng / m.tp();
    if (ng_loc < saved.args.heads) {
      dk_all = untile_heads_grad(m, dk_all, ng_loc * hn);
      dv_all = untile_heads_grad(m, dv_all, ng_loc * hn);
    }
  }
  dk = saved.gather_kv ? reduce_scatter_context_parallel(m, dk_all) : dk_all;
  dv = saved.gather_kv ? reduce_scatter_context_parallel(m, dv_all) : dv_all;
  return dq;
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

  CoreAttentionCall call;
  call.batch = b;
  call.batch_offset = tokens.batch_offset;
  call.b_global = tokens.b_global;
  call.sq_global = call.sk_global = tokens.s_global;
  call.q_pos = tokens.seq;
  call.gather_kv = m.ps.pc.context_parallel_size > 1;
  call.mask_type = args.attn_mask_type;
  call.mask = args.attention_mask ? &*args.attention_mask : nullptr;
  call.path = path;
  call.layer_number = layer_number;
  const DTensor context = core_attention_forward(m, call, q, k, v, saved);
  return row_parallel_forward(m, prefix + "linear_proj.", context, saved.proj);
}

DTensor self_attention_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                const TokenLayout& tokens, AttentionSaved& saved) {
  const Heads h = heads_of(m.cfg);
  const int64_t np_loc = h.np / m.tp(), ng_loc = h.ng / m.tp();
  const int64_t rows = saved.q.rows();
  DTensor d_context = row_parallel_backward(m, prefix + "linear_proj.", dy, saved.proj);
  DTensor dk, dv;
  DTensor dq = core_attention_backward(m, d_context, saved, dk, dv);

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

TokenLayout cross_kv_tokens(const ModelContext& m, const TokenLayout& tokens, int64_t sk) {
  TokenLayout t;
  t.s_global = sk;
  t.b_global = tokens.b_global;
  t.b_local = tokens.b_local;
  t.batch_offset = tokens.batch_offset;
  for (int64_t i = 0; i < sk; ++i) t.seq.push_back(i);
  const bool sp = m.ps.pc.sequence_parallel && m.tp() > 1;
  t.sp_count = sp ? sk / m.tp() : sk;
  t.sp_begin = sp ? m.ps.coord.tp * t.sp_count : 0;
  return t;
}

DTensor cross_attention_forward(ModelContext& m, const std::string& prefix, const std::string& path,
                                int64_t layer_number, const DTensor& x, const TokenLayout& tokens,
                                const LayerArgs& args, CrossAttentionSaved& saved) {
  const Heads h = heads_of(m.cfg);
  if (h.ng != h.np) {
    throw Error(fmt::format("cross attention needs num_query_groups == num_attention_heads (got {} and {}): "
                            "Megatron's CrossAttention does not support group query attention",
                            h.ng, h.np));
  }
  if (m.ps.pc.context_parallel_size > 1) throw Error("cross attention is not run under context parallelism");
  if (!args.context) throw Error(fmt::format("{}: cross attention needs its context (key_value_states)", prefix));
  const Tensor& context = *args.context;
  if (context.dim() != 3 || context.shape()[1] != tokens.b_global || context.shape()[2] != m.cfg.hidden_size) {
    throw Error(fmt::format("the cross-attention context has shape {}, expected [sk, b = {}, h = {}]",
                            shape_string(context.shape()), tokens.b_global, m.cfg.hidden_size));
  }
  const int64_t np_loc = h.np / m.tp(), hn = h.hn;
  saved.kv_tokens = cross_kv_tokens(m, tokens, context.shape()[0]);
  saved.context_grad = args.context_grad;
  const std::vector<int64_t> kv_rows = saved.kv_tokens.hidden_token_rows();
  Tensor host(context.dtype(), {static_cast<int64_t>(kv_rows.size()), m.cfg.hidden_size});
  const size_t bytes = static_cast<size_t>(m.cfg.hidden_size) * dtype_size(context.dtype());
  for (size_t i = 0; i < kv_rows.size(); ++i) {
    std::copy_n(context.bytes().data() + kv_rows[i] * bytes, bytes, host.bytes().data() + i * bytes);
  }
  const DTensor c = m.be.upload(host, m.dtype);

  // get_query_key_value_tensors: linear_kv, then linear_q.
  const DTensor mixed = column_parallel_forward(m, prefix + "linear_kv.", c, saved.kv);
  DTensor k = m.empty({mixed.rows(), np_loc * hn}), v = m.empty({mixed.rows(), np_loc * hn});
  for (int64_t j = 0; j < np_loc; ++j) {  // [sk, b, np, 2*hn] split along the last dim
    m.be.copy_cols(mixed, j * 2 * hn, k, j * hn, hn);
    m.be.copy_cols(mixed, j * 2 * hn + hn, v, j * hn, hn);
  }
  const DTensor q = column_parallel_forward(m, prefix + "linear_q.", x, saved.q);

  CoreAttentionCall call;
  call.batch = tokens.b_local;
  call.batch_offset = tokens.batch_offset;
  call.b_global = tokens.b_global;
  call.sq_global = tokens.s_global;
  call.sk_global = saved.kv_tokens.s_global;
  call.q_pos = tokens.seq;
  call.mask_type = args.cross_attn_mask_type;
  call.mask = args.context_mask ? &*args.context_mask : nullptr;
  call.path = path;
  call.layer_number = layer_number;
  const DTensor ctx = core_attention_forward(m, call, q, k, v, saved.core);
  return row_parallel_forward(m, prefix + "linear_proj.", ctx, saved.proj);
}

DTensor cross_attention_backward(ModelContext& m, const std::string& prefix, const DTensor& dy,
                                 CrossAttentionSaved& saved) {
  const Heads h = heads_of(m.cfg);
  const int64_t np_loc = h.np / m.tp(), hn = h.hn;
  const DTensor d_ctx = row_parallel_backward(m, prefix + "linear_proj.", dy, saved.proj);
  DTensor dk, dv;
  const DTensor dq = core_attention_backward(m, d_ctx, saved.core, dk, dv);
  DTensor d_mixed = m.empty({dk.rows(), 2 * np_loc * hn});
  for (int64_t j = 0; j < np_loc; ++j) {
    m.be.copy_cols(dk, j * hn, d_mixed, j * 2 * hn, hn);
    m.be.copy_cols(dv, j * hn, d_mixed, j * 2 * hn + hn, hn);
  }
  const DTensor d_context = column_parallel_backward(m, prefix + "linear_kv.", d_mixed, saved.kv);
  const DTensor dx = column_parallel_backward(m, prefix + "linear_q.", dq, saved.q);
  if (saved.context_grad) saved.context_grad(saved.kv_tokens, d_context);
  saved = CrossAttentionSaved{};  // free the activations
  return dx;
}

}  // namespace paritron::opt
