// ParallelConfig: how a model is sharded over ranks, and the rank arithmetic of
// Megatron's `initialize_model_parallel` (megatron/core/parallel_state.py,
// core_v0.5.0; shared/spec/megatron-semantics.md §10.7, §10.8).
//
//   world = tp * cp * dp * pp
//   rank  = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))   (TP fastest)
//   expert parallelism is carved out of DP: ep_rank = dp_rank mod ep,
//   data-modulo-expert rank = dp_rank div ep (requires cp == 1 when ep > 1).
//
// Group membership mirrors the loops of initialize_model_parallel literally,
// so a group's member list is in the order Megatron passes to new_group (the
// position in it is the group rank).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"

namespace paritron {

struct TransformerConfig;

struct ParallelConfig {
  int64_t tensor_model_parallel_size = 1;    // tp
  int64_t pipeline_model_parallel_size = 1;  // pp
  std::optional<int64_t> virtual_pipeline_model_parallel_size;  // vp: model chunks per pp rank
  int64_t context_parallel_size = 1;         // cp
  int64_t expert_model_parallel_size = 1;    // ep (carved out of dp)
  int64_t data_parallel_size = 1;            // dp
  bool sequence_parallel = false;            // sp (needs tp > 1)

  int64_t world_size() const;  // throws ConfigError for sizes < 1 or > 2^31 ranks
  // "tp2-pp2-dp1-cp1-ep1-sp" (the -sp suffix only when sequence parallel, -vpN
  // only with a virtual pipeline). parse_layout accepts the parts in any order
  // and defaults missing sizes to 1.
  std::string layout_name() const;
  static ParallelConfig parse_layout(std::string_view layout);

  // Every broken rule of the layout itself (sizes >= 1 and at most 2^31 ranks,
  // dp % ep, and TransformerConfig's rules between parallel sizes: sp needs
  // tp, ep with tp needs sp, vp needs pp > 2, no ep with cp).
  std::vector<ConfigIssue> check() const;
  void validate() const;  // throws ConfigError with every issue

  bool operator==(const ParallelConfig&) const = default;
};

// The coordinates of a global rank.
struct RankCoordinates {
  int64_t tp = 0, cp = 0, dp = 0, pp = 0;
  int64_t ep = 0;   // expert-parallel rank: dp mod ep
  int64_t edp = 0;  // data-modulo-expert rank: dp div ep
  bool operator==(const RankCoordinates&) const = default;
};

RankCoordinates rank_coordinates(const ParallelConfig& pc, int64_t rank);
int64_t global_rank(const ParallelConfig& pc, int64_t tp, int64_t cp, int64_t dp, int64_t pp);

enum class GroupKind {
  kTensor,             // tp consecutive ranks
  kContext,            // stride tp within one (dp, pp) block
  kData,               // stride tp*cp (gradient all-reduce without CP)
  kDataWithContext,    // stride tp over the whole tp*cp*dp block (gradient all-reduce with CP)
  kPipeline,           // stride world/pp
  kModel,              // TP x PP ranks sharing (dp, cp)
  kEmbedding,          // first and last rank of the rank's pipeline group (a middle stage is
                       // not a member of the group it is given, as in Megatron's _EMBEDDING_GLOBAL_RANKS)
  kTensorAndData,      // TP x DP ranks sharing (cp, pp)
  kTensorDataContext,  // TP x DP x CP ranks sharing pp (the fp8 amax reduction group)
  kTensorAndExpert,    // contiguous tp*ep ranks (MoE all-gather / reduce-scatter dispatcher)
  kExpert,             // the ep ranks of one tensor-and-expert group with the same tp rank
  kDataModuloExpert,   // stride tp*ep: replicas of the same expert shard
};
std::string_view group_name(GroupKind kind);

// The members of the group of `kind` that contains `rank` (kEmbedding: see
// above), in group-rank order. The rank functions throw ConfigError for a
// layout with sizes < 1 or a world past 2^31 ranks.
std::vector<int64_t> group_members(const ParallelConfig& pc, GroupKind kind, int64_t rank);
// Every group of a kind: a partition of the world (the embedding group
// excepted, which only holds pipeline end points).
std::vector<std::vector<int64_t>> all_groups(const ParallelConfig& pc, GroupKind kind);

// Pipeline layer assignment (spec §10.8; `get_num_layers_to_build` and
// TransformerLayer._get_layer_offset): 0-based global indices of the layers of model
// chunk `vp_rank` on pipeline stage `pp_rank`.
int64_t num_layers_to_build(const ParallelConfig& pc, int64_t num_layers);
int64_t layer_offset(const ParallelConfig& pc, int64_t num_layers, int64_t pp_rank, int64_t vp_rank = 0);
std::vector<int64_t> stage_layers(const ParallelConfig& pc, int64_t num_layers, int64_t pp_rank, int64_t vp_rank = 0);

// The layout read off a TransformerConfig's parallel fields, with dp given.
ParallelConfig parallel_from_config(const TransformerConfig& cfg, int64_t data_parallel_size = 1);
// cfg with its parallel fields set from pc (pipeline_dtype defaults to params_dtype when pp > 1).
TransformerConfig with_parallel(const TransformerConfig& cfg, const ParallelConfig& pc);
// Every rule the layout breaks for this model (tp divides heads and groups,
// pp divides layers, ep divides experts, ...): the layout's own rules plus
// the config's rules evaluated with the layout's sizes.
std::vector<ConfigIssue> check_fits(const ParallelConfig& pc, const TransformerConfig& cfg);
// Rules that need the sequence length: SP splits s over tp, CP into 2*cp chunks.
std::vector<ConfigIssue> check_sequence_length(const ParallelConfig& pc, int64_t seq_length);

std::string parallel_to_json_text(const ParallelConfig& pc, int indent = -1);
ParallelConfig parallel_from_json_text(std::string_view json_text);  // throws ConfigError

}  // namespace paritron
