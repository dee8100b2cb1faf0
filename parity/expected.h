// What the reference says an optimized run on a layout must produce.
//
// For most cases that is the reference run on the whole case (design.md,
// principle 3: sharded vs unsharded). A MoE router couples the tokens it
// sees — capacity, the aux loss and the z-loss (and 0.5.0's jitter draws) are
// computed over the tokens of one forward call on one rank, as in Megatron
// (MoELayer.forward runs the router on the rank's [s/tp, b, h] input before
// the dispatcher gathers anything) — so the expectation is the reference run
// on each rank's token group:
//   * data parallelism / pipeline micro-batching: consecutive groups of
//     B / (dp * micro_batches) sequences;
//   * context parallelism: the CP rank's sequence positions (chunks r and
//     2 cp - 1 - r, optimized/model/context.h context_parallel_positions);
//   * sequence parallelism (tp > 1): the TP rank's contiguous s / tp slice of
//     those positions;
// outputs and input gradients placed by token, router outputs placed by
// token, token counts, losses and weight gradients summed. A group that cuts
// sequences can only be run alone by the token-wise components (moe_layer,
// moe_router, each a sub-case of the group's rows); a token-coupled
// transformer_layer / transformer_block (attention mixes the positions)
// under context or sequence parallelism is refused with an Error saying so.
// A dropless router without aux / z loss, jitter or sinkhorn does not couple
// tokens: the whole-case reference holds on every layout.
#pragma once

#include "common/case_file.h"
#include "common/parallel_config.h"
#include "reference/run_case.h"

namespace paritron::parity {

// Whether the case's results depend on which tokens are routed together.
bool token_coupled(const Case& c);

// micro_batches: per data-parallel rank, as the optimized run used
// (opt::optimized_micro_batches).
ref::ReferenceResult expected_for_layout(const Case& c, const ParallelConfig& pc, int64_t micro_batches = 1,
                                         const ref::ReferenceOptions& options = {});

}  // namespace paritron::parity
