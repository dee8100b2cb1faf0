// Fault injection (issue #6, "Proof that it catches bugs"): named, realistic
// bugs compiled into the optimized side when the build is configured with
// -DPARITRON_FAULTS=ON, one of them chosen at run time, so that a test
// (parity/faults_test.cpp) can show the parity sweep catches each.
//
// Every fault is a guarded branch at the place the real bug would be:
//
//     if (faults::active(Fault::masked_fill_zero)) a.fill = 0.0f;
//
// In a normal build PARITRON_FAULTS is not defined and active() is a
// constexpr `false`: the branches compile away and the optimized side is
// bit for bit the unfaulted one. In a faults build the active fault is one
// process-global atomic, read by every rank thread; activate() before a run,
// deactivate() after (not while ranks run).
//
// The names (all_faults()) are a contract: `paritron parity --fault NAME`,
// `--list-faults` and the test's report use them.
#pragma once

#include <atomic>
#include <string>
#include <string_view>
#include <vector>

namespace paritron::opt::faults {

// One value per fault, in all_faults() order (none = no fault active).
enum class Fault : int {
  none = 0,
  rope_interleave_swapped,
  gqa_tiling,
  qkv_split_per_group,
  softmax_scale_no_layer_number,
  masked_fill_zero,
  causal_mask_off_by_one,
  bf16_truncation,
  missing_row_parallel_allreduce,
  missing_sp_allgather,
  cp_chunk_order,
  softmax_before_topk,
  aux_loss_normalisation,
  z_loss_missing,
  glu_halves_swapped,
  zero_centered_gamma_missing_plus1,
  pipeline_layer_offset,
  expert_permutation_order,
  missing_dp_grad_allreduce,
};

struct FaultInfo {
  std::string_view name, description;
};

// Every fault, in enum order (all_faults()[i] is Fault(i + 1)); listed in every
// build (a normal build can name them, not activate them).
const std::vector<FaultInfo>& all_faults();

// Whether this build has the faults compiled in (-DPARITRON_FAULTS=ON).
bool built_with_faults();

// Makes the fault named `name` the active one. Throws paritron::Error naming
// the known faults for an unknown name, and, in a normal build, an Error
// saying the build has no fault injection.
void activate(const std::string& name);
// No fault active (a no-op in a normal build).
void deactivate();
// The active fault's name, or "" when none.
std::string_view active_name();

#ifdef PARITRON_FAULTS
namespace detail {
extern std::atomic<int> g_active;
}
inline bool active(Fault f) { return detail::g_active.load(std::memory_order_relaxed) == static_cast<int>(f); }
#else
constexpr bool active(Fault) { return false; }
#endif

}  // namespace paritron::opt::faults
