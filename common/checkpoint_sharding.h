// Megatron-core's distributed-checkpoint sharding math: the ShardedTensor /
// ShardedObject metadata every rank contributes to a checkpoint, the helpers
// that build it, the per-module sharded_state_dict() of the GPT local spec, and
// the integrity check of the assembled shards. No tensor data: only where each
// rank's piece sits in each global tensor.
//
// Megatron source (core_v0.5.0): megatron/core/dist_checkpointing/mapping.py
// (ShardedTensor, from_rank_offsets, ShardedObject, ShardedTensorFactory),
// dist_checkpointing/utils.py (replace_prefix_for_sharding,
// apply_prefix_mapping), dist_checkpointing/serialization.py
// (validate_sharding_integrity), megatron/core/utils.py
// (make_tp_sharded_tensor_for_checkpoint, make_sharded_tensor_for_checkpoint),
// transformer/utils.py (make_sharded_tensors_for_checkpoint,
// make_sharded_object_for_checkpoint), transformer/module.py,
// transformer_layer.py, transformer_block.py, mlp.py, moe/experts.py,
// moe/moe_layer.py, moe/router.py, tensor_parallel/layers.py,
// fusions/fused_layer_norm.py. Spec: shared/spec/megatron-semantics.md §11.
//
// Where 0.5.0's source differs from the spec, the source is followed (each
// case is commented in checkpoint_sharding.cpp): expert keys carry
// "experts.experts." (SequentialMLP's prefix + "experts."), the local-spec
// rename also renames the MoE layer's pre_mlp_layernorm to
// "mlp.linear_fc1.layer_norm_*", and linear layers contribute `_extra_state`
// ShardedObjects.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/dtype.h"
#include "common/error.h"
#include "common/tensor.h"

namespace paritron {

struct TransformerConfig;
struct ParallelConfig;

// Megatron's CheckpointingException (and the AssertionErrors of the
// dist_checkpointing code), with Megatron's wording where it has one.
class CheckpointingError : public Error {
 public:
  using Error::Error;
};

// One `(axis, axis_rank_offset, axis_fragm)` tuple of from_rank_offsets: the
// local tensor is chunk `rank_offset` of `fragm` equal chunks of global axis `axis`.
struct RankOffset {
  int64_t axis = 0;
  int64_t rank_offset = 0;
  int64_t fragm = 1;
  bool operator==(const RankOffset&) const = default;
};

// A slice of the flattened local tensor (distributed optimizer); [start, stop).
struct FlattenedRange {
  int64_t start = 0;
  int64_t stop = 0;
  bool operator==(const FlattenedRange&) const = default;
};

// One axis of ShardedTensor.global_slice(): a prepended axis is an integer
// index (begin, end = begin + 1, integer = true), any other a slice [begin, end).
struct GlobalSliceAxis {
  int64_t begin = 0;
  int64_t end = 0;
  bool integer = false;
  bool operator==(const GlobalSliceAxis&) const = default;
};

// mapping.py ShardedTensor without `data`.
struct ShardedTensor {
  std::string key;              // global tensor identifier
  std::optional<DType> dtype;   // the local tensor's dtype (unset: not modelled)
  Shape local_shape;            // shape of the local piece (prepended axes excluded)
  Shape global_shape;           // shape of the global tensor (prepended axes included)
  Shape global_offset;          // element offset of the piece on every global axis
  std::vector<int64_t> axis_fragmentations;  // equal pieces each global axis is cut into
  std::vector<int64_t> replica_id = {0};     // an int replica id is a 1-element vector
  int64_t prepend_axis_num = 0;
  bool allow_shape_mismatch = false;
  std::optional<FlattenedRange> flattened_range;

  // Megatron's global_slice(); throws CheckpointingError when global_offset
  // does not have local_shape.size() + prepend_axis_num entries.
  std::vector<GlobalSliceAxis> global_slice() const;
  // global_shape / axis_fragmentations per axis; throws CheckpointingError for
  // "Axis shape (x) not divisible by axis fragmentation (y" unless allow_shape_mismatch.
  std::vector<int64_t> max_allowed_chunks() const;
  bool is_main_replica() const;

  bool operator==(const ShardedTensor&) const = default;
};

// mapping.py ShardedObject without `data` (the `_extra_state` entries).
struct ShardedObject {
  std::string key;
  std::vector<int64_t> global_shape;   // in shards, not elements
  std::vector<int64_t> global_offset;  // in shards
  std::vector<int64_t> replica_id = {0};
  std::string unique_key() const;  // "<key>/shard_<offsets joined by .>_<shape joined by .>"
  bool is_main_replica() const;
  bool operator==(const ShardedObject&) const = default;
};

// A sharded state dict's entries in Megatron's dict order, ShardedTensorFactory
// already applied (a GLU fc1 weight is its two ShardedTensors).
struct ShardedStateDict {
  std::vector<ShardedTensor> tensors;
  std::vector<ShardedObject> objects;
};

// Megatron's is_main_replica: int 0, or a tuple of zeros.
bool is_main_replica(std::span<const int64_t> replica_id);

// ShardedTensor.from_rank_offsets(key, data, *rank_offsets, replica_id,
// prepend_axis_num, allow_shape_mismatch) with data's shape given. Throws
// CheckpointingError for Megatron's asserts: a negative axis, rank offset or
// fragmentation; rank offset >= fragmentation ("Rank offset must be lower than
// axis fragmentation"); a repeated axis ("Duplicated axis specified"); and an
// axis outside the global tensor (an IndexError in Python).
ShardedTensor from_rank_offsets(std::string key, const Shape& local_shape, std::span<const RankOffset> rank_offsets,
                                std::vector<int64_t> replica_id = {0}, int64_t prepend_axis_num = 0,
                                bool allow_shape_mismatch = false, std::optional<DType> dtype = std::nullopt);

// The values the helpers read from parallel_state, as group ranks of the
// groups initialize_model_parallel (0.5.0) builds (parallel_config.h).
// What changed in Megatron's sharded_state_dict between releases without a
// config field saying so.
struct ShardingOptions {
  // megatron-core >= 0.8 sends the GLU linear_fc1 bias through the gate/up
  // factory like the weight (mlp.py apply_swiglu_sharded_factory); 0.5 .. 0.7
  // save it as a plain dim-0 TP shard (spec §11.6).
  bool glu_fc1_bias_factory = false;
};

struct ShardingContext {
  int64_t tp_rank = 0, tp_size = 1;
  int64_t dp_rank_with_cp = 0;  // rank in the data-parallel group with context parallel: cp + cp_size * dp
  int64_t ep_rank = 0, ep_size = 1;
  // Rank in the data-modulo-expert group: dp div ep when cp == 1; with cp > 1
  // 0.5.0's groups ignore CP (see checkpoint_sharding.cpp).
  int64_t data_modulo_expert_rank = 0;
  int64_t pp_rank = 0;
};
ShardingContext sharding_context(const ParallelConfig& pc, int64_t global_rank);

// megatron/core/utils.py: offsets = (*prepend_offsets, (tp_axis + len(prepend), tp_rank, tp_size)),
// replica_id (0, 0, dp_rank_with_cp) unless given.
ShardedTensor make_tp_sharded_tensor_for_checkpoint(std::string key, const Shape& local_shape, int64_t tp_axis,
                                                    const ShardingContext& ctx,
                                                    std::span<const RankOffset> prepend_offsets = {},
                                                    std::optional<std::vector<int64_t>> replica_id = std::nullopt,
                                                    std::optional<DType> dtype = std::nullopt);
// Replicated over TP: offsets = prepend_offsets, replica_id (0, tp_rank, dp_rank_with_cp) unless given.
ShardedTensor make_sharded_tensor_for_checkpoint(std::string key, const Shape& local_shape, const ShardingContext& ctx,
                                                 std::span<const RankOffset> prepend_offsets = {},
                                                 std::optional<std::vector<int64_t>> replica_id = std::nullopt,
                                                 std::optional<DType> dtype = std::nullopt);
// transformer/utils.py make_sharded_object_for_checkpoint: global shape / offset
// from the sharded offsets (sorted by axis, which must be 0, 1, ...), or (1,) / (0,).
ShardedObject make_sharded_object_for_checkpoint(std::string key, const ShardingContext& ctx,
                                                 std::span<const RankOffset> sharded_offsets = {},
                                                 std::optional<std::vector<int64_t>> replica_id = std::nullopt);

// One entry of a module's plain state_dict (keep_vars=True): its name relative
// to the module and its local shape. A name ending in "_extra_state" is the
// None extra state of a linear layer.
struct LocalStateEntry {
  std::string name;
  Shape local_shape;
  std::optional<DType> dtype;
};
// Axis map entry: state-dict name -> TP axis.
struct TpAxis {
  std::string name;
  int64_t axis = 0;
};
// transformer/utils.py make_sharded_tensors_for_checkpoint(state_dict, prefix,
// tensor_parallel_layers_axis_map, sharded_offsets): *_extra_state ->
// ShardedObject, names in the map -> TP-sharded on that axis, the rest replicated.
ShardedStateDict make_sharded_tensors_for_checkpoint(std::span<const LocalStateEntry> state_dict, std::string_view prefix,
                                                     std::span<const TpAxis> axis_map, const ShardingContext& ctx,
                                                     std::span<const RankOffset> sharded_offsets = {});

// The tensor-parallel axis map a module class passes (spec §11.4):
// "ColumnParallelLinear" {weight: 0, bias: 0}, "RowParallelLinear" {weight: 1},
// "FusedLayerNorm", "TENorm", "TopKRouter" {} (replicated). Throws Error otherwise.
std::vector<TpAxis> tensor_parallel_axis_map(std::string_view module_class);

// The GLU fc1 ShardedTensorFactory's build (mlp.py _sharded_state_dict_for_glu):
// the local [2f/tp, h] weight is chunked into gate_r and up_r, saved under one
// key with offsets (prepend + 0, tp_rank, 2 tp) and (prepend + 0, tp + tp_rank, 2 tp).
std::vector<ShardedTensor> glu_fc1_sharded_tensors(const std::string& key, const Shape& local_shape,
                                                   const ShardingContext& ctx,
                                                   std::span<const RankOffset> sharded_offsets,
                                                   std::vector<int64_t> replica_id,
                                                   std::optional<DType> dtype = std::nullopt);

// <Module>.sharded_state_dict(prefix, sharded_offsets) of one module of the
// GPT local spec built on `global_rank` (components as in module_params.h:
// "layernorm", "rmsnorm", "self_attention", "cross_attention", "mlp",
// "moe_router", "moe_layer", "transformer_layer", "transformer_block"). A
// transformer_block is the rank's whole decoder: the layers of its pipeline
// stage, every virtual-pipeline chunk in chunk order, and final_layernorm on
// the last stage's last chunk; it takes no sharded_offsets (Megatron asserts).
// The config must be validated and the layout must fit it (check_fits);
// ConfigError otherwise.
ShardedStateDict module_sharded_state_dict(std::string_view component, const TransformerConfig& cfg,
                                           const ParallelConfig& pc, int64_t global_rank, std::string_view prefix = "",
                                           std::span<const RankOffset> sharded_offsets = {},
                                           const ShardingOptions& options = {});

// The ShardedTensors of `component` on `global_rank` ("transformer_layer" or
// "transformer_block"; any component of module_sharded_state_dict works).
// For "transformer_layer" with a 1-based global layer_number, what the block
// emits for that layer: key prefix + "layers." and the layer axis
// (0, layer_number - 1, num_layers); without one, a standalone
// TransformerLayer.sharded_state_dict(prefix).
std::vector<ShardedTensor> sharded_state_dict(std::string_view component, const TransformerConfig& cfg,
                                              const ParallelConfig& pc, int64_t global_rank,
                                              std::string_view prefix = "",
                                              std::optional<int64_t> layer_number = std::nullopt,
                                              const ShardingOptions& options = {});

// Every problem of the shards all ranks contribute (per_rank[r] = rank r's
// list), empty when the sharding is sound: per key, equal global shape, local
// shape, dtype and flattened-range presence (Megatron's asserts), a global
// offset and local shape per axis that stay inside the global shape and agree
// with the fragmentation, and every global element covered exactly once by the
// main replicas (replica_id all zero). Pieces with a flattened_range are
// checked as Megatron does: per local box, the main replicas' ranges tile it.
std::vector<std::string> check_sharding_integrity(const std::vector<std::vector<ShardedTensor>>& per_rank);
// Objects: main replicas' unique keys are unique (Megatron), and every cell of
// each key's shard grid has a main replica (Paritron's extra check).
std::vector<std::string> check_object_integrity(const std::vector<std::vector<ShardedObject>>& per_rank);

// JSON array of objects with Megatron's field names: key, dtype (torch name,
// only when set), local_shape, global_shape, global_offset,
// axis_fragmentations, replica_id (an integer for a 1-element id, else an
// array), prepend_axis_num, allow_shape_mismatch, flattened_range (null, or
// {"start": s, "stop": e}). indent < 0: one line.
std::string sharded_tensors_to_json(std::span<const ShardedTensor> tensors, int indent = -1);
// Accepts what to_json writes; dtype, allow_shape_mismatch and flattened_range
// may be left out; flattened_range may also be [start, stop] and dtype
// "torch.float32". Throws Error naming the entry and field for bad input.
std::vector<ShardedTensor> sharded_tensors_from_json(std::string_view json_text);
// key, global_shape, global_offset, replica_id.
std::string sharded_objects_to_json(std::span<const ShardedObject> objects, int indent = -1);
std::vector<ShardedObject> sharded_objects_from_json(std::string_view json_text);

}  // namespace paritron
