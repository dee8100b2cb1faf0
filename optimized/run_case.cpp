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
#include "optimized/model/gather.h"
#include "optimized/model/layer.h"
#include "optimized/model/pipeline.h"

namespace paritron::opt {
namespace {

const std::set<std::string>& supported_components() {
  static const std::set<std::string> s = {"layernorm", "rmsnorm", "self_attention", "mlp",
                                          "moe_layer", "transformer_layer", "transformer_block"};
  return s;
}

const Tensor& case_input(const Case& c, const std::string& name) {
  auto it = c.tensors.find("inputs." + name);
  if (it == c.tensors.end()) throw Error(fmt::format("the case has no inputs.{}", name));
  return it->second;
}

bool has_input(const Case& c, const std::string& name) { return c.tensors.count("inputs." + name) > 0; }

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
};

int64_t pick_micro_batches(int64_t b_local, int64_t pp, int64_t requested) {
  if (requested > 0) {
    if (b_local % requested != 0) {
      throw Error(fmt::format("{} micro-batches do not divide the {} sequences of a data-parallel rank", requested, b_local));
    }
    return requested;
  }
  if (pp == 1) return 1;
  for (int64_t m = std::min(b_local, 2 * pp); m > 1; --m) {
    if (b_local % m == 0) return m;
  }
  return 1;
}

RankPlan plan_rank(const Case& c, const ParallelConfig& pc, int64_t rank, const OptimizedOptions& o) {
  RankPlan p;
  p.ps = make_parallel_state(pc, rank);
  const Tensor& x = case_input(c, "hidden_states");
  p.S = x.shape()[0];
  p.B = x.shape()[1];
  p.h = x.shape()[2];
  const int64_t b_local = p.B / pc.data_parallel_size;
  p.micro_batches = pick_micro_batches(b_local, pc.pipeline_model_parallel_size, o.micro_batches);
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
  t.sp_count = pc.sequence_parallel ? n / pc.tensor_model_parallel_size : n;
  t.sp_begin = pc.sequence_parallel ? p.ps.coord.tp * t.sp_count : 0;
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
  for (ParamSpec& s : module_params(c.component, plain)) catalogue[s.key] = s;
  const ParallelConfig& pc = p.ps.pc;
  const int64_t experts = c.config.num_moe_experts.value_or(1);
  const int64_t ep = pc.expert_model_parallel_size, per_rank = experts / ep;
  for (const auto& [name, tensor] : c.tensors) {
    if (name.rfind("weights.", 0) != 0) continue;
    const std::string key = local_key(name.substr(8));
    const int64_t layer = layer_of_key(key);
    if (c.component == "transformer_block") {
      if (layer >= 0 && !p.layers.count(layer)) continue;
      if (key.rfind("final_layernorm.", 0) == 0 && !(p.last_stage && p.chunks.back().final_norm)) continue;
    }
    const int64_t expert = expert_of_key(key);
    if (expert >= 0 && expert / per_rank != p.ps.coord.ep) continue;
    auto spec = catalogue.find(key);
    if (spec == catalogue.end() && c.config.num_moe_experts && key.size() >= 11 &&
        key.compare(key.size() - 11, 11, "router.bias") == 0) {
      // router.bias (core 0.15+, add_bias_linear): replicated like the router weight.
      ParamSpec bias;
      bias.key = key;
      bias.shape = {*c.config.num_moe_experts};
      spec = catalogue.emplace(key, bias).first;
    }
    if (spec == catalogue.end()) {
      throw Error(fmt::format("{}: not a parameter the optimized {} knows (router.expert_bias, GroupedMLP "
                              "weights and cross attention are not supported there yet)",
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
    param.expert = expert >= 0;
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
  return a;
}

// DDP: sum gradients over the ranks that hold the same parameter shard.
void reduce_gradients(ModelContext& m) {
  for (auto& [key, param] : m.params) {
    if (param.reduce == GradReduce::kTensorIfSequence && m.sequence_parallel() && m.tp() > 1) {
      m.comm.all_reduce(param.grad, m.ps.tp);
    }
    const Group& g = param.expert ? m.ps.edp : m.ps.dp_cp;
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
    if (comp == "mlp") return output = mlp_forward(m, "", x, saved.mlp);
    if (comp == "moe_layer") return output = moe_forward(m, "", "", x, t, saved.moe);
    return output = transformer_layer_forward(m, "", c.layer_number, x, t, args, saved);
  }
  DTensor backward(const DTensor& dy, const DTensor* dy_bias, const TokenLayout& t) {
    const std::string& comp = c.component;
    if (comp == "layernorm" || comp == "rmsnorm") return norm_backward(m, "", dy, false, saved.input_norm);
    if (comp == "self_attention") return self_attention_backward(m, "", dy, t, saved.attention);
    if (comp == "mlp") return mlp_backward(m, "", dy, saved.mlp);
    if (comp == "moe_layer") return moe_backward(m, "", dy, dy_bias, t, saved.moe);
    return transformer_layer_backward(m, "", dy, t, saved);
  }
};

}  // namespace

int64_t optimized_micro_batches(const Case& c, const ParallelConfig& pc, const OptimizedOptions& o) {
  const int64_t b_local = case_input(c, "hidden_states").shape()[1] / pc.data_parallel_size;
  return pick_micro_batches(b_local, pc.pipeline_model_parallel_size, o.micro_batches);
}

bool optimized_supports(const std::string& component) { return supported_components().count(component) > 0; }

std::vector<std::string> optimized_layout_issues(const Case& c, const ParallelConfig& pc) {
  std::vector<std::string> issues;
  if (!optimized_supports(c.component)) {
    issues.push_back(fmt::format("component {} is not run by the optimized side (it runs: layernorm, rmsnorm, "
                                 "self_attention, mlp, moe_layer, transformer_layer, transformer_block)",
                                 c.component));
    return issues;
  }
  for (const ConfigIssue& i : pc.check()) issues.push_back(i.message());
  for (const ConfigIssue& i : check_fits(pc, c.config)) issues.push_back(i.message());
  if (!c.tensors.count("inputs.hidden_states") || c.tensors.at("inputs.hidden_states").dim() != 3) {
    issues.push_back("the case needs inputs.hidden_states [s, b, h]");
    return issues;
  }
  const Shape& x = c.tensors.at("inputs.hidden_states").shape();
  for (const ConfigIssue& i : check_sequence_length(pc, x[0])) issues.push_back(i.message());
  const int64_t tp = pc.tensor_model_parallel_size, cp = pc.context_parallel_size;
  if (pc.sequence_parallel && x[0] % (cp * tp) != 0) {
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
  if (c.config.num_moe_experts && tp > 1 &&
      (c.component == "moe_layer" || c.component == "transformer_layer" || c.component == "transformer_block")) {
    issues.push_back("MoE with tensor_model_parallel_size > 1 is not supported by the optimized side yet");
  }
  if (has_input(c, "context") || has_input(c, "key_value_states")) {
    issues.push_back("cross attention is not run by the optimized side yet");
  }
  return issues;
}

OptimizedResult run_optimized_rank(const Case& c, const ParallelConfig& pc, const OptimizedOptions& o, Comm& comm) {
  if (comm.world_size() != pc.world_size()) {
    throw Error(fmt::format("layout {} needs {} ranks, the comm has {}", pc.layout_name(), pc.world_size(),
                            comm.world_size()));
  }
  if (auto issues = optimized_layout_issues(c, pc); !issues.empty()) {
    std::string all;
    for (const auto& i : issues) all += "\n  " + i;
    throw Error(fmt::format("cannot run {} on {}:{}", c.component, pc.layout_name(), all));
  }
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
  const LayerArgs args = layer_args(c);
  const Tensor& x_all = case_input(c, "hidden_states");
  const Tensor* dy_all = backward ? &case_input(c, "grad_output") : nullptr;
  Pieces pieces;

  std::vector<TokenLayout> layouts;
  for (int64_t mb = 0; mb < plan.micro_batches; ++mb) layouts.push_back(token_layout(plan, mb));
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
      add_rows_piece(pieces, m, "outputs.output", y, layouts[mb], plan.ps.coord.tp);
      if (c.component == "moe_layer") add_moe_pieces(pieces, m, run.saved.moe, layouts[mb]);
      if (!backward) continue;
      DTensor dy_bias;
      if (c.component == "moe_layer" && has_input(c, "grad_output_bias") && run.saved.moe.output_bias.defined()) {
        dy_bias = load(case_input(c, "grad_output_bias"), layouts[mb]);
      }
      const DTensor dx = run.backward(load(*dy_all, layouts[mb]), dy_bias.defined() ? &dy_bias : nullptr, layouts[mb]);
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
  if (auto issues = optimized_layout_issues(c, pc); !issues.empty()) {
    std::string all;
    for (const auto& i : issues) all += "\n  " + i;
    throw Error(fmt::format("cannot run {} on {}:{}", c.component, pc.layout_name(), all));
  }
  OptimizedResult result;
  run_on_threads(
      pc.world_size(),
      [&](Comm& comm) {
        OptimizedResult r = run_optimized_rank(c, pc, o, comm);
        if (comm.rank() == 0) result = std::move(r);
      },
      o.timeout);
  return result;
}

struct SingleRankModel::Impl {
  ThreadWorld world{1};
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
  if (c.component == "transformer_block" || !optimized_supports(c.component)) {
    throw Error(fmt::format("SingleRankModel runs layer-like components, not {}", c.component));
  }
  const ParallelConfig pc;
  i.plan = plan_rank(i.c, pc, 0, o);
  i.backend = make_backend(o.backend);
  i.m = std::make_unique<ModelContext>(*i.backend, i.world.comm(0), i.plan.ps, c.config, o.dtype);
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
