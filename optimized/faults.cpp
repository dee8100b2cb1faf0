// See faults.h.
#include "optimized/faults.h"

#include <fmt/format.h>

#include "common/error.h"

namespace paritron::opt::faults {

#ifdef PARITRON_FAULTS
namespace detail {
std::atomic<int> g_active{0};
}
#endif

const std::vector<FaultInfo>& all_faults() {
  static const std::vector<FaultInfo> f = {
      {"rope_interleave_swapped",
       "RoPE applies the other channel pairing (interleaved vs rotate-half) than rotary_interleaved says "
       "(cpu_backend.cpp CpuBackend::rope)"},
      {"gqa_tiling",
       "GQA expands K/V by tiling: query head h uses group h % groups instead of h / (heads / groups) "
       "(model/attention.cpp core_attention_forward/backward)"},
      {"qkv_split_per_group",
       "the fused QKV output is split as [q | k | v] over the whole projection instead of per query group "
       "(model/attention.cpp split_qkv)"},
      {"softmax_scale_no_layer_number",
       "apply_query_key_layer_scaling: the fused softmax's scale = layer_number is dropped while norm_factor keeps "
       "it (model/attention.cpp effective_softmax_scale)"},
      {"masked_fill_zero",
       "masked attention scores filled with 0 instead of Megatron's -10000 (model/attention.cpp "
       "core_attention_forward)"},
      {"causal_mask_off_by_one",
       "the causal mask masks k > q + 1 instead of k > q (triu diagonal 2 instead of 1) (model/attention.cpp "
       "set_mask)"},
      {"bf16_truncation",
       "bf16 rounding by truncation instead of round-to-nearest-even in the optimized side's rounding "
       "(cpu_backend.cpp round_span / round_one)"},
      {"missing_row_parallel_allreduce",
       "no all-reduce / reduce-scatter of a RowParallelLinear's partial sums under tp > 1: each rank keeps its own "
       "partial (model/linear.cpp row_parallel_forward)"},
      {"missing_sp_allgather",
       "the sequence-parallel all-gather before a ColumnParallelLinear is missing: each rank repeats its own shard "
       "(model/linear.cpp gather_sequence)"},
      {"cp_chunk_order",
       "context parallel: the all-gathered K/V chunks are taken to be chunks r and r + cp of rank r instead of r and "
       "2cp - 1 - r (model/attention.cpp core_attention_forward)"},
      {"softmax_before_topk",
       "the top-k-then-softmax router applies the softmax over all experts before the top-k (scores not "
       "renormalised over the k) (model/moe.cpp router_forward)"},
      {"aux_loss_normalisation",
       "the load-balancing aux loss is normalised by the tokens instead of tokens * topk (model/moe.cpp "
       "router_losses / router_backward)"},
      {"z_loss_missing",
       "the router z-loss is computed and reported but never added to the loss: its gradient is missing "
       "(model/moe.cpp router_backward)"},
      {"glu_halves_swapped",
       "GLU activates the second half of fc1's output and gates with the first (chunk(2) order swapped) "
       "(cpu_backend.cpp CpuBackend::bias_act_forward/backward)"},
      {"zero_centered_gamma_missing_plus1",
       "layernorm_zero_centered_gamma: the norm multiplies by w instead of 1 + w (cpu_backend.cpp "
       "effective_gamma)"},
      {"pipeline_layer_offset",
       "a pipeline stage's layer offset is off by one stage: stage p loads the checkpoint layers of stage p + 1 "
       "(the last wraps to the first) under its own layer names (run_case.cpp load_params)"},
      {"expert_permutation_order",
       "MoE unpermute does not invert the permute: the expert-major output rows are combined as if they were in "
       "token-major order (model/moe.cpp moe_forward combine)"},
      {"missing_dp_grad_allreduce",
       "the data-parallel (x context-parallel, expert-data-parallel) gradient all-reduce is missing "
       "(run_case.cpp reduce_gradients)"},
  };
  return f;
}

bool built_with_faults() {
#ifdef PARITRON_FAULTS
  return true;
#else
  return false;
#endif
}

void activate(const std::string& name) {
  const std::vector<FaultInfo>& all = all_faults();
  int found = 0;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].name == name) found = static_cast<int>(i) + 1;
  }
  if (!built_with_faults()) {
    throw Error(fmt::format("cannot activate fault '{}': this build has no fault injection; configure with "
                            "-DPARITRON_FAULTS=ON",
                            name));
  }
  if (found == 0) {
    std::string names;
    for (const FaultInfo& f : all) names += (names.empty() ? "" : ", ") + std::string(f.name);
    throw Error(fmt::format("unknown fault '{}' (known faults: {})", name, names));
  }
#ifdef PARITRON_FAULTS
  detail::g_active.store(found, std::memory_order_relaxed);
#endif
}

void deactivate() {
#ifdef PARITRON_FAULTS
  detail::g_active.store(0, std::memory_order_relaxed);
#endif
}

std::string_view active_name() {
#ifdef PARITRON_FAULTS
  const int i = detail::g_active.load(std::memory_order_relaxed);
  if (i > 0 && i <= static_cast<int>(all_faults().size())) return all_faults()[static_cast<size_t>(i) - 1].name;
#endif
  return {};
}

}  // namespace paritron::opt::faults
