// See transformer_block.h.
#include "reference/transformer_block.h"

#include <fmt/format.h>

#include "common/error.h"
#include "common/parallel_config.h"

namespace paritron::ref {
namespace {

std::string layer_name(int64_t i) { return fmt::format("layers.{}", i); }

RunContext layer_context(const RunContext& ctx, const BlockStage& stage, int64_t i) {
  RunContext c = ctx.sub(layer_name(stage.layer_offset + i));  // RNG draws named by the global layer
  c.layer_number = stage.global_layer_number_in_attention ? stage.layer_offset + i + 1 : i + 1;
  return c;
}

}  // namespace

BlockStage whole_model_stage(const TransformerConfig& cfg) { return BlockStage{cfg.num_layers, 0, true, false}; }

BlockStage pipeline_stage(const TransformerConfig& cfg, int64_t pp, std::optional<int64_t> vp, int64_t pp_rank,
                          int64_t vp_rank) {
  ParallelConfig pc;
  pc.pipeline_model_parallel_size = pp;
  pc.virtual_pipeline_model_parallel_size = vp;
  BlockStage s;
  s.num_layers = num_layers_to_build(pc, cfg.num_layers);
  s.layer_offset = layer_offset(pc, cfg.num_layers, pp_rank, vp_rank);
  // Only the last stage's last model chunk holds the final norm.
  s.post_process = pp_rank == pp - 1 && (!vp || vp_rank == *vp - 1);
  return s;
}

TransformerBlockForward transformer_block_forward(const TransformerConfig& cfg, const Params& w, const Mat& x,
                                                  const LayerInputs& in, const BlockStage& stage,
                                                  const Precision& p, const RunContext& ctx, const Sink& taps) {
  if (stage.num_layers < 1) throw Error(fmt::format("a transformer block needs at least one layer, got {}", stage.num_layers));
  TransformerBlockForward f;
  Mat hidden = x;
  for (int64_t i = 0; i < stage.num_layers; ++i) {
    const std::string name = layer_name(i);
    if (!layer_spec_for(w.sub(name)).any()) {
      // Every submodule an IdentityOp: almost surely weights missing or keyed by
      // global instead of chunk-local index, not a model anyone builds.
      throw Error(fmt::format("the block's {} has no parameters ({}{}.*): the stage has {} layers, keyed by their "
                              "chunk-local index",
                              name, w.prefix(), name, stage.num_layers));
    }
    f.layers.push_back(transformer_layer_forward(cfg, w.sub(name), hidden, in, p, layer_context(ctx, stage, i),
                                                 taps.sub(name)));
    hidden = f.layers.back().output;
    taps.put(name, hidden);
  }
  if (stage.post_process && w.sub("final_layernorm").has("weight")) {
    // 0.5.0 builds the final norm as TENorm whatever the layer spec (spec §7, §14 #24).
    f.final_layernorm = norm_forward(cfg, w.sub("final_layernorm"), hidden, p, NormKernel::kTransformerEngine);
    hidden = f.final_layernorm->output;
    taps.put("final_layernorm", hidden);
  }
  f.output = hidden;
  return f;
}

TransformerLayerGrads transformer_block_backward(const TransformerConfig& cfg, const Params& w,
                                                 const LayerInputs& in, const BlockStage& stage,
                                                 const TransformerBlockForward& f, const Mat& d_output,
                                                 const Sink& grads, const Precision& p) {
  Mat d_hidden = d_output;
  if (f.final_layernorm) {
    d_hidden = norm_backward(cfg, w.sub("final_layernorm"), f.layers.back().output, *f.final_layernorm, d_hidden,
                             grads.sub("final_layernorm"), p, NormKernel::kTransformerEngine);
  }
  TransformerLayerGrads g;
  for (int64_t i = stage.num_layers - 1; i >= 0; --i) {
    const std::string name = layer_name(i);
    const TransformerLayerGrads lg = transformer_layer_backward(cfg, w.sub(name), in, f.layers[i], d_hidden,
                                                                grads.sub(name), p);
    d_hidden = lg.hidden_states;
    if (lg.context) g.context = g.context ? Mat(*g.context + *lg.context) : *lg.context;
  }
  g.hidden_states = d_hidden;
  return g;
}

}  // namespace paritron::ref
