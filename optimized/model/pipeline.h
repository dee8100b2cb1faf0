// Pipeline parallelism: the schedule that runs a rank's model chunks over
// micro-batches and passes activations and their gradients between stages.
//
// Megatron: megatron/core/pipeline_parallel/schedules.py.
//   No virtual pipeline: forward_backward_pipelining_without_interleaving
//   (1F1B): stage p runs min(pp - p - 1, M) warm-up forwards, then alternates
//   one forward and one backward, then drains the remaining backwards.
//   Virtual pipeline (vp model chunks per stage, layers assigned by
//   stage_layers): chunk v of the last stage feeds chunk v + 1 of the first.
//   Paritron runs all forwards of chunk 0, 1, ... then all backwards in
//   reverse (a GPipe-style order; Megatron interleaves them to save memory:
//   the numbers are the same, only peak memory differs).
// Sends are buffered (Comm::send does not wait for the receiver), so neither
// order can deadlock. Activations travel in the run's dtype.
#pragma once

#include <functional>
#include <vector>

#include "optimized/model/context.h"
#include "optimized/model/layer.h"

namespace paritron::opt {

struct PipelineIo {
  std::function<DTensor(int64_t mb)> input;                    // first stage, chunk 0
  std::function<DTensor(int64_t mb)> grad_output;              // last stage, last chunk
  std::function<void(int64_t mb, const DTensor&)> output;      // last stage, last chunk
  std::function<void(int64_t mb, const DTensor&)> input_grad;  // first stage, chunk 0
};

void run_pipeline(ModelContext& m, const std::vector<StagePlan>& chunks, const std::vector<TokenLayout>& layouts,
                  const LayerArgs& args, PipelineIo& io, bool backward);

}  // namespace paritron::opt
