// See run_case.h. The per-rank flow: load shards -> run (pipeline schedule)
// -> reduce gradients -> gather pieces on rank 0.
#include "optimized/run_case.h"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>
#include <set>

#include "common/error.h"
#include "common/init.h"
#include "common/module_params.h"
#include "optimized/comm/comm.h"
#include "optimized/comm/run_ranks.h"
#include "optimized/comm/thread_comm.h"
#if defined(PARITRON_HAVE_CUDA)
#include "optimized/comm/device_local_comm.h"
#endif
#include "optimized/faults.h"
#include "optimized/model/attention.h"
#include "optimized/model/gather.h"
#include "optimized/model/layer.h"
#include "optimized/model/pipeline.h"

namespace paritron::opt {
namespace {

const std::set<std::string>& supported_components() {
  static const std::set<std::string> s = {"layernorm",         "rmsnorm",          "self_attention",
                                          "mlp",               "moe_router",       "moe_layer",        "transformer_layer",
                                          "transformer_block", "dot_product_attention", "rotary_pos_emb",
                                          "cross_attention"};
  return s;
}

const Tensor& case_input(const Case& c, const std::string& name) {
  auto it = c.tensors.find("inputs." + name);
  if (it == c.tensors.end()) throw Error(fmt::format("the case has no inputs.{}", name));
  return it->second;
}

bool has_input(const Case& c, const std::string& name) { return c.tensors.count("inputs." + name) > 0; }

// Components on per-head tensors without linears: TP splits their heads,
// and sequence parallelism (which shards the hidden states between linears)
// leaves them as they are: Megatron runs core attention and RoPE on the
// whole sequence of a TP rank's heads.
bool is_heads_component(const std::string& component) {
  return component == "dot_product_attention" || component == "rotary_pos_emb";
}

// The input whose [s, b, ...] token grid the layout splits.
const char* token_input(const std::string& component) {
  if (component == "dot_product_attention") return "query";
  if (component == "rotary_pos_emb") return "t";
  return "hidden_states";
}

// The layer index of a block key ("layers.3.mlp..." -> 3), or -1.
int64_t layer_of_key(const std::string& key) {
  if (key.rfind("layers.", 0) != 0) return -1;
  return std::stoll(key.substr(7, key.find('.', 7) - 7));
}

// The global expert index of a key ("...local_experts.5...." -> 5), or -1.
int64_t expert_of_key(const std::string& key) {
  const std::string tag = "local_experts.";
  const size_t at = key.find(tag);
  if (at == std::string::npos) return -1;
  const size_t begin = at + tag.size();
  return std::stoll(key.substr(begin, key.find('.', begin) - begin));
}

// The Transformer Engine spec's fused-norm keys under their local names
// (the reference accepts both, common/module_params.h).
std::string local_key(const std::string& key) {
  for (const auto& [te, local] : kTeNormKeyPrefixes) {
    const size_t at = key.find(te);
    if (at != std::string::npos) return key.substr(0, at) + std::string(local) + key.substr(at + te.size());
  }
  return key;
}

struct RankPlan {
  ParallelState ps;
  int64_t S = 0, B = 0, h = 0;
  int64_t micro_batches = 1;
  std::vector<StagePlan> chunks;  // model chunks of this pipeline rank (one without a virtual pipeline)
  std::set<int64_t> layers;       // every layer this rank holds
  bool first_stage = true, last_stage = true;
  bool sequence_rows = false;     // sequence parallel splits the hidden rows over TP
};

// fp8: each forward call quantises with the amax of its own tokens (TE's
// single-step scale), so with several micro-batches every micro-batch would
// have its own scales; the default keeps one micro-batch under fp8, and an
// explicit request for more is refused (the reference expectation for it is
// not built yet).
int64_t pick_micro_batches(int64_t b_local, int64_t pp, int64_t requested, bool fp8) {
  if (requested > 0) {
    if (b_local % requested != 0) {
      throw Error(fmt::format("{} micro-batches do not divide the {} sequences of a data-parallel rank", requested, b_local));
    }
    if (fp8 && requested > 1) {
      throw Error(fmt::format("fp8 with {} micro-batches: each micro-batch's GEMM inputs would be quantised with its "
                              "own amax, which the reference expectation does not model yet; use 1",
                              requested));
    }
    return requested;
  }
  if (pp == 1 || fp8) return 1;
  for (int64_t m = std::min(b_local, 2 * pp); m > 1; --m) {
    if (b_local % m == 0) return m;
  }
  return 1;
}

RankPlan plan_rank(const Case& c, const ParallelConfig& pc, int64_t rank, const OptimizedOptions& o) {
  RankPlan p;
  p.ps = make_parallel_state(pc, rank);
  const Tensor& x = case_input(c, token_input(c.component));
  p.S = x.shape()[0];
  p.B = x.shape()[1];
  p.h = x.shape()[2];
  p.sequence_rows = pc.sequence_parallel && !is_heads_component(c.component);
  const int64_t b_local = p.B / pc.data_parallel_size;
  p.micro_batches = pick_micro_batches(b_local, pc.pipeline_model_parallel_size, o.micro_batches, c.config.fp8.has_value());
  const int64_t pp = pc.pipeline_model_parallel_size, pp_rank = p.ps.coord.pp;
  p.first_stage = pp_rank == 0;
  p.last_stage = pp_rank == pp - 1;
  if (c.component == "transformer_block") {
    const int64_t vp = pc.virtual_pipeline_model_parallel_size.value_or(1);
    for (int64_t v = 0; v < vp; ++v) {
      StagePlan s;
      s.layers = stage_layers(pc, c.config.num_layers, pp_rank, v);
      s.final_norm = p.last_stage && v == vp - 1 && c.tensors.count("weights.final_layernorm.weight");
      p.layers.insert(s.layers.begin(), s.layers.end());
      p.chunks.push_back(std::move(s));
    }
  }
  return p;
}

TokenLayout token_layout(const RankPlan& p, int64_t micro_batch) {
  const ParallelConfig& pc = p.ps.pc;
  TokenLayout t;
  t.s_global = p.S;
  t.b_global = p.B;
  const int64_t b_rank = p.B / pc.data_parallel_size;
  t.b_local = b_rank / p.micro_batches;
  t.batch_offset = p.ps.coord.dp * b_rank + micro_batch * t.b_local;
  t.seq = context_parallel_positions(p.S, pc.context_parallel_size, p.ps.coord.cp);
  const int64_t n = static_cast<int64_t>(t.seq.size());
  t.sp_count = p.sequence_rows ? n / pc.tensor_model_parallel_size : n;
  t.sp_begin = p.sequence_rows ? p.ps.coord.tp * t.sp_count : 0;
  return t;
}

// Rows `rows` (global token rows s * B + b) of an [S, B, ...] host tensor.
Tensor take_rows(const Tensor& t, const std::vector<int64_t>& rows) {
  const int64_t width = t.numel() / (t.shape()[0] * t.shape()[1]);
  Tensor out(t.dtype(), {static_cast<int64_t>(rows.size()), width});
  const size_t bytes = static_cast<size_t>(width) * dtype_size(t.dtype());
  for (size_t i = 0; i < rows.size(); ++i) {
    std::copy_n(t.bytes().data() + rows[i] * bytes, bytes, out.bytes().data() + i * bytes);
  }
  return out;
}

// Loads this rank's shard of every weight it holds.
void load_params(ModelContext& m, const Case& c, const RankPlan& p) {
  TransformerConfig plain = c.config;
  std::map<std::string, ParamSpec> catalogue;
  if (!is_heads_component(c.component)) {  // dot_product_attention, rotary_pos_emb: no parameters
    for (ParamSpec& s : module_params(c.component, plain)) catalogue[s.key] = s;
  }
  if (c.component == "transformer_layer" || c.component == "transformer_block") {
    // The cross-attention submodules of encoder-decoder layers (not in the GPT catalogue).
    const int64_t layers = c.component == "transformer_block" ? c.config.num_layers : 1;
    for (int64_t l = 0; l < layers; ++l) {
      const std::string prefix = c.component == "transformer_block" ? fmt::format("layers.{}.", l) : "";
      for (ParamSpec& s : cross_attention_layer_params(plain, prefix)) catalogue[s.key] = s;
    }
  }
  const ParallelConfig& pc = p.ps.pc;
  const int64_t experts = c.config.num_moe_experts.value_or(1);
  const int64_t ep = pc.expert_model_parallel_size, per_rank = experts / ep;
  for (const auto& [case_name, tensor] : c.tensors) {
    if (case_name.rfind("weights.", 0) != 0) continue;
    std::string name = case_name;
    std::string key = local_key(name.substr(8));
    int64_t layer = layer_of_key(key);
    if (faults::active(faults::Fault::pipeline_layer_offset) && c.component == "transformer_block" &&
        pc.pipeline_model_parallel_size > 1 && layer >= 0) {
      // The stage's layer offset is off by one stage (chunk): checkpoint layer
      // l is loaded as layer l - per_chunk (mod L), so stage p runs the layers
      // of stage p + 1 under its own layer names.
      const int64_t L = c.config.num_layers;
      const int64_t per_chunk =
          L / (pc.pipeline_model_parallel_size * pc.virtual_pipeline_model_parallel_size.value_or(1));
      const int64_t as = ((layer - per_chunk) % L + L) % L;
      const std::string from = fmt::format("layers.{}.", layer), to = fmt::format("layers.{}.", as);
      key = to + key.substr(from.size());
      name.replace(name.find(from), from.size(), to);
      layer = as;
    }
    if (c.component == "transformer_block") {
      if (layer >= 0 && !p.layers.count(layer)) continue;
      if (key.rfind("final_layernorm.", 0) == 0 && !(p.last_stage && p.chunks.back().final_norm)) continue;
    }
    const int64_t expert = expert_of_key(key);
    if (expert >= 0 && expert / per_rank != p.ps.coord.ep) continue;
    auto spec = catalogue.find(key);
    const bool router_bias = (c.component == "moe_router" && key == "bias") ||
                             (key.size() >= 11 && key.compare(key.size() - 11, 11, "router.bias") == 0);
    if (spec == catalogue.end() && c.config.num_moe_experts && router_bias) {
      // router.bias (core 0.15+, add_bias_linear; "bias" in a moe_router case):
      // replicated like the router weight.
      ParamSpec bias;
      bias.key = key;
      bias.shape = {*c.config.num_moe_experts};
      spec = catalogue.emplace(key, bias).first;
    }
    if (spec == catalogue.end()) {
      throw Error(fmt::format("{}: not a parameter of the optimized {} under this config (a misspelt "
                              "key, or router.expert_bias / GroupedMLP weights, which the optimized side does not "
                              "run yet)",
                              name, c.component));
    }
    if (tensor.shape() != spec->second.shape) {
      throw Error(fmt::format("{} has shape {}, the config gives {}", name, shape_string(tensor.shape()),
                              shape_string(spec->second.shape)));
    }
    Param param;
    param.name = name;
    param.shard = local_shard_spec(spec->second, pc.tensor_model_parallel_size, p.ps.coord.tp);
    param.global_shape = tensor.shape();
    param.value = m.be.upload(slice_tp_shard(tensor, param.shard), m.dtype);
    param.grad = m.be.zeros(m.grad_dtype, param.shard.local_shape);
    // Megatron 0.5.0 reduces an expert's gradients over the data-modulo-expert
    // group only under expert parallelism (layers.py:651, 898: allreduce =
    // not (is_expert and expert_parallel)); with ep = 1 they are ordinary
    // data-parallel (with CP: dp x cp) parameters.
    param.expert = expert >= 0 && ep > 1;
    param.reduce = param.shard.axis == -1 ? GradReduce::kTensorIfSequence : GradReduce::kNone;
    m.params.emplace(key, std::move(param));
  }
}

LayerArgs layer_args(const Case& c) {
  LayerArgs a;
  a.attn_mask_type = c.attn_mask_type;
  if (has_input(c, "attention_mask")) a.attention_mask = case_input(c, "attention_mask");
  if (has_input(c, "rotary_pos_emb")) {
    const Tensor& t = case_input(c, "rotary_pos_emb");
    if (t.dtype() != DType::F32) throw Error("inputs.rotary_pos_emb must be F32 (RotaryEmbedding's angles are float32)");
    a.rotary_pos_emb = t;
  }
  if (c.component == "cross_attention") {
    // The component's key_value_states and attention_mask are the layer's
    // context and context_mask; its mask type is the case's when stated
    // (CrossAttention's default: padding).
    a.context = case_input(c, "key_value_states");
    a.context_mask = a.attention_mask;
    a.attention_mask.reset();
    a.cross_attn_mask_type = c.attn_mask_type_given ? c.attn_mask_type : "padding";
  } else {
    if (has_input(c, "context")) a.context = case_input(c, "context");
    if (has_input(c, "context_mask")) a.context_mask = case_input(c, "context_mask");
  }
  return a;
}

// DDP: sum gradients over the ranks that hold the same parameter shard.
void reduce_gradients(ModelContext& m) {
  for (auto& [key, param] : m.params) {
    if (param.reduce == GradReduce::kTensorIfSequence && m.sequence_parallel() && m.tp() > 1) {
      m.comm.all_reduce(param.grad, m.ps.tp);
    }
    const Group& g = param.expert ? m.ps.edp : m.ps.dp_cp;
    if (faults::active(faults::Fault::missing_dp_grad_allreduce)) continue;  // every rank skips it alike
    if (g.size() > 1) m.comm.all_reduce(param.grad, g);
  }
}

// One micro-batch of a non-block component (no pipeline).
struct ComponentRun {
  ModelContext& m;
  const Case& c;
  LayerSaved saved;
  DTensor output;

  DTensor forward(const DTensor& x, const TokenLayout& t, const LayerArgs& args) {
    const std::string& comp = c.component;
    if (comp == "layernorm" || comp == "rmsnorm") return output = norm_forward(m, "", x, false, saved.input_norm);
    if (comp == "self_attention") {
      return output = self_attention_forward(m, "", "", c.layer_number, x, t, args, saved.attention);
    }
    if (comp == "cross_attention") {
      return output = cross_attention_forward(m, "", "", c.layer_number, x, t, args, saved.cross);
    }
    if (comp == "mlp") return output = mlp_forward(m, "", x, saved.mlp);
    if (comp == "moe_layer") return output = moe_forward(m, "", "", x, t, saved.moe);
    if (comp == "moe_router") {  // results in saved.moe (router outputs), no outputs.output
      moe_router_forward(m, "", "", x, t, saved.moe);
      return output = DTensor();
    }
    return output = transformer_layer_forward(m, "", c.layer_number, x, t, args, saved);
  }
  DTensor backward(const DTensor& dy, const DTensor* dy_bias, const TokenLayout& t) {
    const std::string& comp = c.component;
    if (comp == "layernorm" || comp == "rmsnorm") return norm_backward(m, "", dy, false, saved.input_norm);
    if (comp == "self_attention") return self_attention_backward(m, "", dy, t, saved.attention);
    if (comp == "cross_attention") return cross_attention_backward(m, "", dy, saved.cross);
    if (comp == "mlp") return mlp_backward(m, "", dy, saved.mlp);
    if (comp == "moe_layer") return moe_backward(m, "", dy, dy_bias, t, saved.moe);
    if (comp == "moe_router") return moe_router_backward(m, "", dy, t, saved.moe);  // dy: d router_scores [T, k]
    return transformer_layer_backward(m, "", dy, t, saved);
  }
};

// Columns [col, col + n) of rows `rows` of an [S, B, ...] host tensor (seen
// as [S * B, width]): a rank's heads of its tokens.
Tensor take_block(const Tensor& t, const std::vector<int64_t>& rows, int64_t col, int64_t n) {
  const int64_t width = t.numel() / (t.shape()[0] * t.shape()[1]);
  Tensor out(t.dtype(), {static_cast<int64_t>(rows.size()), n});
  const size_t elem = dtype_size(t.dtype()), bytes = static_cast<size_t>(n) * elem;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::copy_n(t.bytes().data() + (rows[i] * width + col) * static_cast<int64_t>(elem), bytes,
                out.bytes().data() + i * bytes);
  }
  return out;
}

// The dot_product_attention and rotary_pos_emb cases: per-head inputs, TP
// rank r holding heads [r * H / tp, (r + 1) * H / tp) of its tokens (its
// data-parallel sequences, its context-parallel chunks).
void run_heads_case(ModelContext& m, const Case& c, const std::vector<TokenLayout>& layouts, bool backward,
                    Pieces& pieces) {
  const int64_t tp = m.tp(), r = m.ps.coord.tp;
  auto load = [&](const std::string& name, const std::vector<int64_t>& rows, int64_t heads, int64_t hn) {
    return m.be.upload(take_block(case_input(c, name), rows, r * heads / tp * hn, heads / tp * hn), m.dtype);
  };
  if (c.component == "rotary_pos_emb") {
    const Tensor& t = case_input(c, "t");
    const int64_t S = t.shape()[0], B = t.shape()[1], H = t.shape()[2], d = t.shape()[3];
    const Tensor& freqs = case_input(c, "freqs");
    for (const TokenLayout& tl : layouts) {
      const std::vector<int64_t> rows = tl.hidden_token_rows();
      const DTensor f = m.be.upload(rotary_rows(freqs, tl.seq), DType::F32);
      const RopeArgs rope{tl.b_local, H / tp, d, f.cols(), m.cfg.rotary_interleaved};
      const DTensor x = load("t", rows, H, d);
      DTensor y = m.empty({x.rows(), x.cols()});
      m.be.rope(rope, x, f, y, false);
      add_head_rows_piece(pieces, m, "outputs.output", y, rows, S * B, H, r * H / tp, d);
      if (!backward) continue;
      const DTensor dy = load("grad_output", rows, H, d);
      DTensor dx = m.empty({dy.rows(), dy.cols()});
      m.be.rope(rope, dy, f, dx, true);
      add_head_rows_piece(pieces, m, "grads.inputs.t", dx, rows, S * B, H, r * H / tp, d);
    }
    return;
  }
  const Tensor& query = case_input(c, "query");
  const Tensor& key = case_input(c, "key");
  const int64_t S = query.shape()[0], B = query.shape()[1], np = query.shape()[2], hn = query.shape()[3];
  const int64_t SK = key.shape()[0], ng = key.shape()[2];
  const bool cp = m.ps.pc.context_parallel_size > 1;
  const std::optional<Tensor> mask =
      has_input(c, "attention_mask") ? std::optional<Tensor>(case_input(c, "attention_mask")) : std::nullopt;
  for (const TokenLayout& tl : layouts) {
    const std::vector<int64_t> q_rows = tl.hidden_token_rows();
    // Keys: the CP rank's chunks (all-gathered in the core, sq == sk), else every position.
    TokenLayout kv = tl;
    if (!cp) {
      kv.s_global = SK;
      kv.seq.clear();
      for (int64_t i = 0; i < SK; ++i) kv.seq.push_back(i);
      kv.sp_begin = 0;
      kv.sp_count = SK;
    }
    const std::vector<int64_t> kv_rows = kv.hidden_token_rows();
    CoreAttentionCall call;
    call.batch = tl.b_local;
    call.batch_offset = tl.batch_offset;
    call.b_global = B;
    call.sq_global = S;
    call.sk_global = SK;
    call.q_pos = tl.seq;
    call.gather_kv = cp;
    call.mask_type = c.attn_mask_type;
    call.mask = mask ? &*mask : nullptr;
    call.layer_number = c.layer_number;
    AttentionSaved saved;
    const DTensor context = core_attention_forward(m, call, load("query", q_rows, np, hn), load("key", kv_rows, ng, hn),
                                                   load("value", kv_rows, ng, hn), saved);
    add_head_rows_piece(pieces, m, "outputs.output", context, q_rows, S * B, np, r * np / tp, hn);
    if (!backward) continue;
    DTensor dk, dv;
    const DTensor dq = core_attention_backward(m, load("grad_output", q_rows, np, hn), saved, dk, dv);
    add_head_rows_piece(pieces, m, "grads.inputs.query", dq, q_rows, S * B, np, r * np / tp, hn);
    add_head_rows_piece(pieces, m, "grads.inputs.key", dk, kv_rows, SK * B, ng, r * ng / tp, hn);
    add_head_rows_piece(pieces, m, "grads.inputs.value", dv, kv_rows, SK * B, ng, r * ng / tp, hn);
  }
}

// What a dot_product_attention or rotary_pos_emb case and a layout must satisfy.
std::vector<std::string> heads_case_issues(const Case& c, const ParallelConfig& pc) {
  std::vector<std::string> issues;
  const int64_t tp = pc.tensor_model_parallel_size, cp = pc.context_parallel_size;
  auto tensor4 = [&](const std::string& name) -> const Tensor* {
    auto it = c.tensors.find("inputs." + name);
    if (it == c.tensors.end() || it->second.dim() != 4) {
      issues.push_back(fmt::format("the case needs a 4-D inputs.{}", name));
      return nullptr;
    }
    return &it->second;
  };
  if (c.component == "rotary_pos_emb") {
    const Tensor* t = tensor4("t");
    const Tensor* f = tensor4("freqs");
    if (!t || !f) return issues;
    const Shape& ts = t->shape();
    const Shape& fs = f->shape();
    if (fs[0] != ts[0] || fs[1] != 1 || fs[2] != 1 || fs[3] > ts[3] || fs[3] % 2 != 0) {
      issues.push_back(fmt::format("inputs.freqs has shape {}, expected [{}, 1, 1, rot_dim] with an even rot_dim <= {}",
                                   shape_string(fs), ts[0], ts[3]));
    }
    if (f->dtype() != DType::F32) {
      issues.push_back(fmt::format("inputs.freqs is {}: the optimized RoPE takes float32 angles (RotaryEmbedding's)",
                                   dtype_name(f->dtype())));
    }
    if (ts[2] % tp != 0) {
      issues.push_back(fmt::format("tensor parallel splits t's {} heads: tensor_model_parallel_size {} must divide them",
                                   ts[2], tp));
    }
    return issues;
  }
  const Tensor* q = tensor4("query");
  const Tensor* k = tensor4("key");
  const Tensor* v = tensor4("value");
  if (!q || !k || !v) return issues;
  const int64_t np = c.config.num_attention_heads, ng = c.config.num_query_groups.value_or(np);
  const int64_t hn = c.config.kv_channels.value_or(c.config.hidden_size / np);
  const Shape& qs = q->shape();
  const Shape& ks = k->shape();
  if (qs[2] != np || qs[3] != hn || ks[2] != ng || ks[3] != hn || v->shape() != ks || ks[1] != qs[1]) {
    issues.push_back(fmt::format("inputs.query {} and key/value {} / {}: expected [sq, b, {}, {}] and [sk, b, {}, {}]",
                                 shape_string(qs), shape_string(ks), shape_string(v->shape()), np, hn, ng, hn));
  }
  if (np % tp != 0 || ng % tp != 0) {
    issues.push_back(fmt::format("tensor parallel splits the {} query heads and {} key/value groups: "
                                 "tensor_model_parallel_size {} must divide both",
                                 np, ng, tp));
  }
  if (cp > 1 && qs[0] != ks[0]) {
    issues.push_back(fmt::format("context parallel splits queries and keys alike (chunks r and 2cp-1-r, keys and "
                                 "values all-gathered): it needs sq == sk (got sq = {}, sk = {})",
                                 qs[0], ks[0]));
  }
  return issues;
}

// Cross attention (a cross_attention case, or layers with cross-attention
// weights and inputs.context).
std::vector<std::string> cross_attention_issues(const Case& c, const ParallelConfig& pc) {
  std::vector<std::string> issues;
  bool weights = c.component == "cross_attention";
  for (const auto& [name, t] : c.tensors) {
    if (name.rfind("weights.", 0) == 0 && name.find("cross_attention.") != std::string::npos) weights = true;
  }
  const char* input = c.component == "cross_attention" ? "key_value_states" : "context";
  if (!weights) return issues;  // a context without cross-attention layers is unused, as in the reference
  if (!has_input(c, input)) {
    issues.push_back(fmt::format("the case has cross-attention weights but no inputs.{}", input));
    return issues;
  }
  const Tensor& kv = case_input(c, input);
  const Shape& x = case_input(c, "hidden_states").shape();
  if (kv.dim() != 3 || kv.shape()[1] != x[1] || kv.shape()[2] != x[2]) {
    issues.push_back(fmt::format("inputs.{} has shape {}, expected [sk, b = {}, h = {}]", input,
                                 shape_string(kv.shape()), x[1], x[2]));
    return issues;
  }
  if (pc.context_parallel_size > 1) {
    issues.push_back("cross attention is not run under context parallelism: its queries' CP chunks would attend "
                     "to the whole context, which Megatron's all-gather CP (self attention only) does not split");
  }
  const int64_t tp = pc.tensor_model_parallel_size;
  if (pc.sequence_parallel && kv.shape()[0] % tp != 0) {
    issues.push_back(fmt::format("sequence parallel splits the cross-attention context's {} positions over tp = {} "
                                 "(linear_kv all-gathers them): sk must be divisible by tp",
                                 kv.shape()[0], tp));
  }
  if (c.config.num_query_groups.value_or(c.config.num_attention_heads) != c.config.num_attention_heads) {
    issues.push_back("cross attention needs num_query_groups == num_attention_heads (Megatron's CrossAttention "
                     "does not support group query attention)");
  }
  return issues;
}

}  // namespace

int64_t optimized_micro_batches(const Case& c, const ParallelConfig& pc, const OptimizedOptions& o) {
  const int64_t b_local = case_input(c, token_input(c.component)).shape()[1] / pc.data_parallel_size;
  return pick_micro_batches(b_local, pc.pipeline_model_parallel_size, o.micro_batches, c.config.fp8.has_value());
}

bool optimized_supports(const std::string& component) { return supported_components().count(component) > 0; }

std::vector<std::string> optimized_layout_issues(const Case& c, const ParallelConfig& pc) {
  std::vector<std::string> issues;
  if (!optimized_supports(c.component)) {
    std::string runs;
    for (const std::string& name : supported_components()) runs += (runs.empty() ? "" : ", ") + name;
    issues.push_back(fmt::format("component {} is not run by the optimized side (it runs: {})", c.component, runs));
    return issues;
  }
  for (const ConfigIssue& i : pc.check()) issues.push_back(i.message());
  // Config fields the reference models and the optimized side does not: refused, never ignored.
  if (c.config.qk_layernorm) issues.push_back("qk_layernorm is not run by the optimized side (nor the reference)");
  if (c.config.num_moe_experts) {  // (moe.cpp check_supported repeats these at run time, with the dtype rules)
    if (c.config.moe_grouped_gemm) issues.push_back("moe_grouped_gemm (GroupedMLP) is not run by the optimized side yet");
    if (c.config.moe_router_load_balancing_type != "sinkhorn" && c.config.moe_router_score_function != "softmax") {
      issues.push_back(fmt::format("moe_router_score_function = '{}' is not run by the optimized side (softmax)",
                                   c.config.moe_router_score_function));
    }
    if (c.config.moe_token_dropping) issues.push_back("moe_token_dropping is not supported (0.5.0 is dropless)");
  }
  // A case without linears needs only its heads divisible (heads_case_issues).
  if (!is_heads_component(c.component)) {
    for (const ConfigIssue& i : check_fits(pc, c.config)) issues.push_back(i.message());
  }
  if (is_heads_component(c.component)) {
    for (std::string& i : heads_case_issues(c, pc)) issues.push_back(std::move(i));
    if (!issues.empty()) return issues;
  } else if (!c.tensors.count("inputs.hidden_states") || c.tensors.at("inputs.hidden_states").dim() != 3) {
    issues.push_back("the case needs inputs.hidden_states [s, b, h]");
    return issues;
  }
  const Shape& x = c.tensors.at(std::string("inputs.") + token_input(c.component)).shape();
  ParallelConfig sequence = pc;
  if (is_heads_component(c.component)) sequence.sequence_parallel = false;  // no hidden rows to split
  for (const ConfigIssue& i : check_sequence_length(sequence, x[0])) issues.push_back(i.message());
  const int64_t tp = pc.tensor_model_parallel_size, cp = pc.context_parallel_size;
  if (pc.sequence_parallel && !is_heads_component(c.component) && x[0] % (cp * tp) != 0) {
    issues.push_back(fmt::format("sequence parallel splits each CP rank's {} positions over tp = {}: s = {} must be "
                                 "divisible by cp * tp",
                                 x[0] / cp, tp, x[0]));
  }
  if (x[1] % pc.data_parallel_size != 0) {
    issues.push_back(fmt::format("data_parallel_size {} must divide the batch ({} sequences)", pc.data_parallel_size, x[1]));
  }
  if (pc.pipeline_model_parallel_size > 1 && c.component != "transformer_block") {
    issues.push_back(fmt::format("pipeline parallelism splits a transformer_block's layers; {} has none", c.component));
  }
  for (std::string& i : cross_attention_issues(c, pc)) issues.push_back(std::move(i));
  return issues;
}

void throw_if_unrunnable(const Case& c, const ParallelConfig& pc) {
  const std::vector<std::string> issues = optimized_layout_issues(c, pc);
  if (issues.empty()) return;
  std::string all;
  for (const auto& i : issues) all += "\n  " + i;
  throw Error(fmt::format("cannot run {} on {}:{}", c.component, pc.layout_name(), all));
}

OptimizedResult run_optimized_rank(const Case& c, const ParallelConfig& pc, const OptimizedOptions& o, Comm& comm) {
  if (comm.world_size() != pc.world_size()) {
    throw Error(fmt::format("layout {} needs {} ranks, the comm has {}", pc.layout_name(), pc.world_size(),
                            comm.world_size()));
  }
  throw_if_unrunnable(c, pc);
  const RankPlan plan = plan_rank(c, pc, comm.rank(), o);
  std::unique_ptr<Backend> backend = make_backend(o.backend);
  ModelContext m(*backend, comm, plan.ps, c.config, o.dtype);
  // A norm case names its kind; the config's `normalization` is for layers.
  if (c.component == "layernorm") m.cfg.normalization = "LayerNorm";
  if (c.component == "rmsnorm") m.cfg.normalization = "RMSNorm";
  m.training = c.training;
  m.seed = c.seed.value_or(0);
  comm.set_timeout(o.timeout);
  load_params(m, c, plan);
  const bool backward = o.backward && has_input(c, "grad_output");
  LayerArgs args = layer_args(c);
  Pieces pieces;
  if (backward && args.context) {
    // Each cross attention's gradient of its context rows; a block's layers
    // and pipeline stages add theirs up.
    const std::string name = c.component == "cross_attention" ? "grads.inputs.key_value_states" : "grads.inputs.context";
    const bool sum = c.component != "cross_attention";
    args.context_grad = [&pieces, &m, name, sum](const TokenLayout& kv, const DTensor& d) {
      add_rows_piece(pieces, m, name, d, kv, m.ps.coord.tp, sum);
    };
  }
  std::vector<TokenLayout> layouts;
  for (int64_t mb = 0; mb < plan.micro_batches; ++mb) layouts.push_back(token_layout(plan, mb));
  if (is_heads_component(c.component)) {
    run_heads_case(m, c, layouts, backward, pieces);
    OptimizedResult result;
    gather_pieces(m, pieces, c, plan.S, plan.B, result.tensors);
    if (!backward && o.backward) result.notes.push_back("no inputs.grad_output: backward not run");
    return result;
  }
  const Tensor& x_all = case_input(c, "hidden_states");
  const Tensor* dy_all = backward ? &case_input(c, "grad_output") : nullptr;
  auto load = [&](const Tensor& t, const TokenLayout& tl) { return m.be.upload(take_rows(t, tl.hidden_token_rows()), m.dtype); };

  if (c.component == "transformer_block") {
    PipelineIo io;
    io.input = [&](int64_t mb) { return load(x_all, layouts[mb]); };
    io.grad_output = [&](int64_t mb) { return load(*dy_all, layouts[mb]); };
    io.output = [&](int64_t mb, const DTensor& y) { add_rows_piece(pieces, m, "outputs.output", y, layouts[mb], plan.ps.coord.tp); };
    io.input_grad = [&](int64_t mb, const DTensor& dx) {
      add_rows_piece(pieces, m, "grads.inputs.hidden_states", dx, layouts[mb], plan.ps.coord.tp);
    };
    run_pipeline(m, plan.chunks, layouts, args, io, backward);
  } else {
    for (int64_t mb = 0; mb < plan.micro_batches; ++mb) {
      ComponentRun run{m, c, {}, {}};
      const DTensor y = run.forward(load(x_all, layouts[mb]), layouts[mb], args);
      if (c.component != "moe_router") add_rows_piece(pieces, m, "outputs.output", y, layouts[mb], plan.ps.coord.tp);
      if (c.component == "moe_layer" || c.component == "moe_router") add_moe_pieces(pieces, m, run.saved.moe, layouts[mb]);
      if (!backward) continue;
      DTensor dy_bias;
      if (c.component == "moe_layer" && has_input(c, "grad_output_bias") && run.saved.moe.output_bias.defined()) {
        dy_bias = load(case_input(c, "grad_output_bias"), layouts[mb]);
      }
      // moe_router: grad_output is router_scores' gradient [S*B, k] (token s * B + b), read as [S, B, k].
      const DTensor dy = c.component == "moe_router"
                             ? load(Tensor::from_bytes(dy_all->dtype(), {plan.S, plan.B, dy_all->numel() / (plan.S * plan.B)},
                                                       dy_all->bytes()),
                                    layouts[mb])
                             : load(*dy_all, layouts[mb]);
      const DTensor dx = run.backward(dy, dy_bias.defined() ? &dy_bias : nullptr, layouts[mb]);
      add_rows_piece(pieces, m, "grads.inputs.hidden_states", dx, layouts[mb], plan.ps.coord.tp);
    }
  }
  if (backward) {
    reduce_gradients(m);
    add_param_grad_pieces(pieces, m, c);
  }
  OptimizedResult result;
  gather_pieces(m, pieces, c, plan.S, plan.B, result.tensors);
  if (!backward && o.backward) result.notes.push_back("no inputs.grad_output: backward not run");
  return result;
}

OptimizedResult run_optimized(const Case& c, const ParallelConfig& pc, const OptimizedOptions& o) {
  throw_if_unrunnable(c, pc);
  OptimizedResult result;
  auto body = [&](Comm& comm) {
    OptimizedResult r = run_optimized_rank(c, pc, o, comm);
    if (comm.rank() == 0) result = std::move(r);
  };
#if defined(PARITRON_HAVE_CUDA)
  // GPU ranks as threads sharing one device: the device-local comm moves
  // device memory (NCCL refuses two ranks on one GPU).
  if (o.backend == "cuda") {
    run_on_device_threads(pc.world_size(), body, o.timeout);
    return result;
  }
#endif
  run_on_threads(pc.world_size(), body, o.timeout);
  return result;
}

namespace {
// A one-rank world whose comm moves the backend's memory.
std::unique_ptr<ThreadWorld> single_rank_world(const std::string& backend) {
#if defined(PARITRON_HAVE_CUDA)
  if (backend == "cuda") return make_device_local_world(1);
#endif
  (void)backend;
  return std::make_unique<ThreadWorld>(1);
}
}  // namespace

struct SingleRankModel::Impl {
  std::unique_ptr<ThreadWorld> world;
  Case c;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<ModelContext> m;
  RankPlan plan;
  TokenLayout tokens;
  LayerArgs args;
  DTensor x, dy;
};

SingleRankModel::SingleRankModel(const Case& c, const OptimizedOptions& o) : impl_(std::make_unique<Impl>()) {
  Impl& i = *impl_;
  i.c = c;
  if (c.component == "transformer_block" || is_heads_component(c.component) || !optimized_supports(c.component)) {
    throw Error(fmt::format("SingleRankModel runs layer-like components, not {}", c.component));
  }
  const ParallelConfig pc;
  i.plan = plan_rank(i.c, pc, 0, o);
  i.backend = make_backend(o.backend);
  i.world = single_rank_world(o.backend);
  i.m = std::make_unique<ModelContext>(*i.backend, i.world->comm(0), i.plan.ps, c.config, o.dtype);
  i.m->training = c.training;
  i.m->seed = c.seed.value_or(0);
  load_params(*i.m, i.c, i.plan);
  i.tokens = token_layout(i.plan, 0);
  i.args = layer_args(i.c);
  i.x = i.backend->upload(take_rows(case_input(i.c, "hidden_states"), i.tokens.hidden_token_rows()), o.dtype);
  if (has_input(i.c, "grad_output")) {
    i.dy = i.backend->upload(take_rows(case_input(i.c, "grad_output"), i.tokens.hidden_token_rows()), o.dtype);
  }
}

SingleRankModel::~SingleRankModel() = default;

void SingleRankModel::forward() {
  ComponentRun run{*impl_->m, impl_->c, {}, {}};
  run.forward(impl_->x, impl_->tokens, impl_->args);
}

void SingleRankModel::forward_backward() {
  Impl& i = *impl_;
  if (!i.dy.defined()) throw Error("forward_backward needs inputs.grad_output");
  ComponentRun run{*i.m, i.c, {}, {}};
  run.forward(i.x, i.tokens, i.args);
  run.backward(i.dy, nullptr, i.tokens);
}

}  // namespace paritron::opt
