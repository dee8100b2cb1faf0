// What the reference says an optimized run on a layout must produce.
//
// For most cases that is the reference run on the whole case (design.md,
// principle 3: sharded vs unsharded). A MoE router couples the tokens it
// sees — capacity, the aux loss and the z-loss (and 0.5.0's jitter draws) are
// computed over a rank's own tokens, as in Megatron — so under data
// parallelism the expectation is the reference run on each data-parallel
// rank's batch slice: outputs and input gradients concatenated, router
// outputs placed by token, token counts, losses and weight gradients summed.
// Token-coupled MoE under context or sequence parallelism (token groups that
// cut sequences) is refused with an Error saying so.
#pragma once

#include "common/case_file.h"
#include "common/parallel_config.h"
#include "reference/run_case.h"

namespace paritron::parity {

// Whether the case's results depend on which tokens are routed together.
bool token_coupled(const Case& c);

ref::ReferenceResult expected_for_layout(const Case& c, const ParallelConfig& pc,
                                         const ref::ReferenceOptions& options = {});

}  // namespace paritron::parity
