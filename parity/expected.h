// What the reference says an optimized run on a layout must produce.
//
// For most cases that is the reference run on the whole case (design.md,
// principle 3: sharded vs unsharded). A MoE router couples the tokens it
// sees — capacity, the aux loss and the z-loss (and 0.5.0's jitter draws) are
// computed over the tokens of one forward call on one rank, as in Megatron —
// so under data parallelism or pipeline micro-batching the expectation is the
// reference run on each micro-batch of each data-parallel rank (consecutive
// groups of B / (dp * micro_batches) sequences): outputs and input gradients
// concatenated, router outputs placed by token, token counts, losses and
// weight gradients summed.
// Token-coupled MoE under context or sequence parallelism (token groups that
// cut sequences) is refused with an Error saying so.
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
