// Groups of a ParallelConfig as comm Groups (optimized/comm/comm.h): the
// members of common/parallel_config.h's group_members, in Megatron's group
// order, named with the short names of comm.h ("tp", "dp", ...).
#pragma once

#include <cstdint>
#include <string_view>

#include "common/parallel_config.h"
#include "optimized/comm/comm.h"

namespace paritron::opt {

// "tp", "cp", "dp", "dp_cp", "pp", "mp", "embd", "tp_dp", "tp_dp_cp", "tp_ep", "ep", "edp".
std::string_view short_group_name(GroupKind kind);

// The group of `kind` that holds `rank`, with `rank`'s position as index.
// kEmbedding on a middle pipeline stage (not a member): index = -1, and comm
// calls on it throw.
Group make_group(const ParallelConfig& pc, GroupKind kind, int64_t rank);

}  // namespace paritron::opt
