// TransformerBlock: the layers of one pipeline stage (model chunk) in order,
// then the final norm on the last stage, forward and backward.
//
// Megatron: megatron/core/transformer/transformer_block.py
// (TransformerBlock._build_layers, forward; get_num_layers_to_build) and
// transformer_layer.py (_get_layer_offset). Spec §8.3-8.4, §10.8:
//   layers built = (num_layers // pp) // vp; layer i of the chunk has global
//   layer_number = offset + i + 1, offset from the stage and chunk;
//   final_layernorm (TENorm: LayerNorm or RMSNorm by cfg.normalization) exists
//   iff post_process and post_layer_norm.
// In 0.5.0 the attention modules receive the stage-local number i + 1 (the
// query-key layer-scaling coefficient), not the global one (spec §8.3); the
// `global_layer_number_in_attention` switch selects the newer behaviour.
//
// Parameters are "layers.<i>.<layer key>" with i the chunk-local index (what
// Megatron's state_dict holds) and "final_layernorm.weight" / ".bias".
#pragma once

#include <vector>

#include "reference/transformer_layer.h"

namespace paritron::ref {

struct BlockStage {
  int64_t num_layers = 0;    // layers of this chunk: get_num_layers_to_build
  int64_t layer_offset = 0;  // global 0-based index of its first layer
  bool post_process = true;  // last stage: applies final_layernorm when it has weights
  bool global_layer_number_in_attention = false;  // newer Megatron: attention sees the global number
};

// The whole model on one stage (pp = 1): num_layers layers, offset 0.
BlockStage whole_model_stage(const TransformerConfig& cfg);
// Pipeline stage pp_rank, model chunk vp_rank of a layout (spec §10.8).
BlockStage pipeline_stage(const TransformerConfig& cfg, int64_t pp, std::optional<int64_t> vp, int64_t pp_rank,
                          int64_t vp_rank = 0);

struct TransformerBlockForward {
  std::vector<TransformerLayerForward> layers;
  std::optional<NormForward> final_layernorm;
  Mat output;  // [T, h]
};

// Taps: layers.<i> (each layer's output), layers.<i>.<layer taps>, final_layernorm.
TransformerBlockForward transformer_block_forward(const TransformerConfig& cfg, const Params& w, const Mat& x,
                                                  const LayerInputs& in, const BlockStage& stage,
                                                  const Precision& p, const RunContext& ctx, const Sink& taps = {});

TransformerLayerGrads transformer_block_backward(const TransformerConfig& cfg, const Params& w,
                                                 const LayerInputs& in, const BlockStage& stage,
                                                 const TransformerBlockForward& fwd, const Mat& d_output,
                                                 const Sink& grads, const Precision& p);

}  // namespace paritron::ref
