// Megatron-core's distributed-checkpoint sharding math (common/checkpoint_sharding.h).
//
// Mirrors, at core_v0.5.0: dist_checkpointing/mapping.py, dist_checkpointing/
// utils.py, dist_checkpointing/serialization.py (validate_sharding_integrity),
// megatron/core/utils.py, transformer/utils.py, transformer/module.py,
// transformer_layer.py, transformer_block.py, mlp.py, moe/experts.py,
// moe/moe_layer.py, moe/router.py, tensor_parallel/layers.py,
// fusions/fused_layer_norm.py, models/gpt/gpt_layer_specs.py (local spec).
// Spec: shared/spec/megatron-semantics.md §11 (and §10.7 for the ranks).
//
// The module builders below follow Megatron's recursion literally (each
// module's sharded_state_dict calls its children with prefix + name + ".",
// then renames keys with replace_prefix_for_sharding / apply_prefix_mapping),
// so the keys, offsets and replica ids fall out the same way they do in Python.
#include "common/checkpoint_sharding.h"

#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "common/module_params.h"
#include "common/parallel_config.h"
#include "common/strict_json.h"
#include "common/transformer_config.h"

namespace paritron {

// ===================== mapping.py =====================

bool is_main_replica(std::span<const int64_t> replica_id) {
  return std::all_of(replica_id.begin(), replica_id.end(), [](int64_t r) { return r == 0; });
}

std::vector<GlobalSliceAxis> ShardedTensor::global_slice() const {
  const size_t prepend = static_cast<size_t>(prepend_axis_num);
  if (prepend_axis_num < 0 || global_offset.size() != local_shape.size() + prepend) {
    throw CheckpointingError(fmt::format("{}: global_offset has {} entries, expected len(local_shape) + "
                                         "prepend_axis_num = {} + {}",
                                         key, global_offset.size(), local_shape.size(), prepend_axis_num));
  }
  std::vector<GlobalSliceAxis> out;
  for (size_t i = 0; i < global_offset.size(); ++i) {
    if (i < prepend) out.push_back({global_offset[i], global_offset[i] + 1, true});
    else out.push_back({global_offset[i], global_offset[i] + local_shape[i - prepend], false});
  }
  return out;
}

std::vector<int64_t> ShardedTensor::max_allowed_chunks() const {
  std::vector<int64_t> chunks;
  for (size_t i = 0; i < global_shape.size() && i < axis_fragmentations.size(); ++i) {
    const int64_t sh = global_shape[i], fragm = axis_fragmentations[i];
    if (fragm <= 0) throw CheckpointingError(fmt::format("{}: axis fragmentation {} on axis {}", key, fragm, i));
    if (!allow_shape_mismatch && sh % fragm != 0) {
      // Megatron's message, unbalanced parenthesis included.
      throw CheckpointingError(fmt::format("Axis shape ({}) not divisible by axis fragmentation ({}", sh, fragm));
    }
    chunks.push_back(sh / fragm);
  }
  return chunks;
}

bool ShardedTensor::is_main_replica() const { return paritron::is_main_replica(replica_id); }

std::string ShardedObject::unique_key() const {
  return fmt::format("{}/shard_{}_{}", key, fmt::join(global_offset, "."), fmt::join(global_shape, "."));
}

bool ShardedObject::is_main_replica() const { return paritron::is_main_replica(replica_id); }

ShardedTensor from_rank_offsets(std::string key, const Shape& local_shape, std::span<const RankOffset> rank_offsets,
                                std::vector<int64_t> replica_id, int64_t prepend_axis_num, bool allow_shape_mismatch,
                                std::optional<DType> dtype) {
  if (prepend_axis_num < 0) {
    throw CheckpointingError(fmt::format("{}: prepend_axis_num {} is negative", key, prepend_axis_num));
  }
  const size_t ndim = local_shape.size() + static_cast<size_t>(prepend_axis_num);
  ShardedTensor t;
  t.global_offset.assign(ndim, 0);
  t.global_shape.assign(static_cast<size_t>(prepend_axis_num), 1);
  t.global_shape.insert(t.global_shape.end(), local_shape.begin(), local_shape.end());
  t.axis_fragmentations.assign(ndim, 1);
  std::set<int64_t> seen_axis;
  for (const RankOffset& o : rank_offsets) {
    if (!(o.axis >= 0 && o.rank_offset >= 0 && o.fragm >= 0)) {
      // assert axis >= 0 and axis_rank_offset >= 0 and axis_fragm >= 0, (axis, axis_rank_offset, axis_fragm)
      throw CheckpointingError(
          fmt::format("{}: ({}, {}, {}): axis, rank offset and fragmentation must be >= 0", key, o.axis,
                      o.rank_offset, o.fragm));
    }
    if (!(o.rank_offset < o.fragm)) {
      throw CheckpointingError(fmt::format("{}: Rank offset must be lower than axis fragmentation ({}, {}, {})", key,
                                           o.axis, o.rank_offset, o.fragm));
    }
    if (!seen_axis.insert(o.axis).second) {
      throw CheckpointingError(fmt::format("{}: Duplicated axis specified ({})", key, o.axis));
    }
    if (static_cast<size_t>(o.axis) >= ndim) {
      // Python raises IndexError on global_shape[axis].
      throw CheckpointingError(fmt::format("{}: axis {} is outside the {}-d global tensor (local shape {}, {} "
                                           "prepended axes)",
                                           key, o.axis, ndim, shape_string(local_shape), prepend_axis_num));
    }
    const auto axis = static_cast<size_t>(o.axis);
    const int64_t local_len = o.axis < prepend_axis_num ? 1 : local_shape[axis - static_cast<size_t>(prepend_axis_num)];
    t.global_shape[axis] = o.fragm * local_len;
    t.global_offset[axis] = o.rank_offset * local_len;
    t.axis_fragmentations[axis] = o.fragm;
  }
  t.key = std::move(key);
  t.dtype = dtype;
  t.local_shape = local_shape;
  t.replica_id = std::move(replica_id);
  t.prepend_axis_num = prepend_axis_num;
  t.allow_shape_mismatch = allow_shape_mismatch;
  return t;
}

// ===================== megatron/core/utils.py, transformer/utils.py =====================

namespace {
// The group rank of `rank` in its group of `kind`: its position in the member
// list, as torch.distributed.get_rank(group) gives it.
int64_t group_rank(const ParallelConfig& pc, GroupKind kind, int64_t rank) {
  const std::vector<int64_t> members = group_members(pc, kind, rank);
  return std::find(members.begin(), members.end(), rank) - members.begin();
}
}  // namespace

ShardingContext sharding_context(const ParallelConfig& pc, int64_t global_rank) {
  const RankCoordinates c = rank_coordinates(pc, global_rank);
  ShardingContext ctx;
  ctx.tp_rank = c.tp;
  ctx.tp_size = pc.tensor_model_parallel_size;
  ctx.pp_rank = c.pp;
  ctx.ep_size = pc.expert_model_parallel_size;
  // parallel_state's getters are group ranks of the groups initialize_model_parallel
  // builds, so they are read off those groups literally. The DP-with-CP rank is
  // cp_rank + cp * dp_rank. With context parallelism, 0.5.0 builds the
  // data-modulo-expert groups from blocks of tp * dp consecutive ranks, ignoring
  // CP, so its rank is not dp div ep: two CP ranks of the same expert shard both
  // get rank 0 (see check_sharding_integrity in the tests: 0.5.0's expert
  // checkpoints with CP > 1 have duplicate main replicas).
  ctx.dp_rank_with_cp = group_rank(pc, GroupKind::kDataWithContext, global_rank);
  ctx.ep_rank = group_rank(pc, GroupKind::kExpert, global_rank);
  ctx.data_modulo_expert_rank = group_rank(pc, GroupKind::kDataModuloExpert, global_rank);
  return ctx;
}

ShardedTensor make_tp_sharded_tensor_for_checkpoint(std::string key, const Shape& local_shape, int64_t tp_axis,
                                                    const ShardingContext& ctx,
                                                    std::span<const RankOffset> prepend_offsets,
                                                    std::optional<std::vector<int64_t>> replica_id,
                                                    std::optional<DType> dtype) {
  const auto prepend_axis_num = static_cast<int64_t>(prepend_offsets.size());
  std::vector<RankOffset> offsets(prepend_offsets.begin(), prepend_offsets.end());
  offsets.push_back({tp_axis + prepend_axis_num, ctx.tp_rank, ctx.tp_size});
  return from_rank_offsets(std::move(key), local_shape, offsets,
                           replica_id.value_or(std::vector<int64_t>{0, 0, ctx.dp_rank_with_cp}), prepend_axis_num,
                           false, dtype);
}

ShardedTensor make_sharded_tensor_for_checkpoint(std::string key, const Shape& local_shape, const ShardingContext& ctx,
                                                 std::span<const RankOffset> prepend_offsets,
                                                 std::optional<std::vector<int64_t>> replica_id,
                                                 std::optional<DType> dtype) {
  return from_rank_offsets(std::move(key), local_shape, prepend_offsets,
                           replica_id.value_or(std::vector<int64_t>{0, ctx.tp_rank, ctx.dp_rank_with_cp}),
                           static_cast<int64_t>(prepend_offsets.size()), false, dtype);
}

ShardedObject make_sharded_object_for_checkpoint(std::string key, const ShardingContext& ctx,
                                                 std::span<const RankOffset> sharded_offsets,
                                                 std::optional<std::vector<int64_t>> replica_id) {
  ShardedObject o;
  // _get_extra_state_offsets: sort by axis, assert the axes are 0, 1, 2, ...
  std::vector<RankOffset> sorted(sharded_offsets.begin(), sharded_offsets.end());
  std::stable_sort(sorted.begin(), sorted.end(), [](const RankOffset& a, const RankOffset& b) { return a.axis < b.axis; });
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (sorted[i].axis != static_cast<int64_t>(i)) {
      throw CheckpointingError(fmt::format("{}: Expected contiguous axis for offsets: axis {} at position {}", key,
                                           sorted[i].axis, i));
    }
    o.global_shape.push_back(sorted[i].fragm);
    o.global_offset.push_back(sorted[i].rank_offset);
  }
  if (sorted.empty()) {
    o.global_shape = {1};
    o.global_offset = {0};
  }
  o.key = std::move(key);
  o.replica_id = replica_id.value_or(std::vector<int64_t>{0, ctx.tp_rank, ctx.dp_rank_with_cp});
  return o;
}

ShardedStateDict make_sharded_tensors_for_checkpoint(std::span<const LocalStateEntry> state_dict, std::string_view prefix,
                                                     std::span<const TpAxis> axis_map, const ShardingContext& ctx,
                                                     std::span<const RankOffset> sharded_offsets) {
  ShardedStateDict out;
  for (const LocalStateEntry& e : state_dict) {
    std::string layer_key = std::string(prefix) + e.name;
    const auto in_map = std::find_if(axis_map.begin(), axis_map.end(), [&](const TpAxis& a) { return a.name == e.name; });
    if (std::string_view(e.name).ends_with("_extra_state")) {
      out.objects.push_back(make_sharded_object_for_checkpoint(std::move(layer_key), ctx, sharded_offsets));
    } else if (in_map != axis_map.end()) {
      out.tensors.push_back(make_tp_sharded_tensor_for_checkpoint(std::move(layer_key), e.local_shape, in_map->axis,
                                                                  ctx, sharded_offsets, std::nullopt, e.dtype));
    } else {
      out.tensors.push_back(make_sharded_tensor_for_checkpoint(std::move(layer_key), e.local_shape, ctx,
                                                               sharded_offsets, std::nullopt, e.dtype));
    }
  }
  return out;
}

std::vector<TpAxis> tensor_parallel_axis_map(std::string_view module_class) {
  // tensor_parallel/layers.py: ColumnParallelLinear "Sharding along axis 0, bias sharded",
  // RowParallelLinear "Sharding along axis 1, bias not sharded"; norms and the
  // router have no sharded_state_dict of their own (all replicated).
  if (module_class == "ColumnParallelLinear") return {{"weight", 0}, {"bias", 0}};
  if (module_class == "RowParallelLinear") return {{"weight", 1}};
  if (module_class == "FusedLayerNorm" || module_class == "TENorm" || module_class == "TopKRouter") return {};
  throw Error(fmt::format("tensor_parallel_axis_map: unknown module class \"{}\"", module_class));
}

std::vector<ShardedTensor> glu_fc1_sharded_tensors(const std::string& key, const Shape& local_shape,
                                                   const ShardingContext& ctx,
                                                   std::span<const RankOffset> sharded_offsets,
                                                   std::vector<int64_t> replica_id, std::optional<DType> dtype) {
  // torch.chunk(t, 2, dim=0): two halves (the first one takes the odd row when
  // the extent is odd; Paritron's layouts never produce that because ffn % tp == 0).
  if (local_shape.empty() || local_shape[0] < 1) {
    throw CheckpointingError(fmt::format("{}: the GLU fc1 weight needs a non-empty axis 0 (local shape {})", key,
                                         shape_string(local_shape)));
  }
  const int64_t first = (local_shape[0] + 1) / 2;
  Shape w_shape = local_shape, v_shape = local_shape;
  w_shape[0] = first;
  v_shape[0] = local_shape[0] - first;
  const auto prepend_axis_num = static_cast<int64_t>(sharded_offsets.size());
  const int64_t tp_shard_axis = 0;
  std::vector<RankOffset> w_offsets(sharded_offsets.begin(), sharded_offsets.end());
  std::vector<RankOffset> v_offsets = w_offsets;
  w_offsets.push_back({tp_shard_axis + prepend_axis_num, ctx.tp_rank, ctx.tp_size * 2});
  v_offsets.push_back({tp_shard_axis + prepend_axis_num, ctx.tp_size + ctx.tp_rank, ctx.tp_size * 2});
  std::vector<ShardedTensor> out;
  out.push_back(from_rank_offsets(key, w_shape, w_offsets, replica_id, prepend_axis_num, false, dtype));
  if (v_shape[0] > 0) out.push_back(from_rank_offsets(key, v_shape, v_offsets, replica_id, prepend_axis_num, false, dtype));
  return out;
}

// ===================== module sharded_state_dict() =====================

namespace {

using Offsets = std::vector<RankOffset>;

// One value of a sharded state dict while it is being built. A
// ShardedTensorFactory (the GLU fc1 weight) stays one entry until
// apply_factories, so renames and replica changes made by enclosing modules
// (SequentialMLP) reach it, as they do in Python.
struct Entry {
  enum class Kind { kTensor, kObject, kGluFactory };
  Kind kind = Kind::kTensor;
  ShardedTensor tensor;     // kTensor; kGluFactory: the fc1 weight it replaced (key, data shape, dtype, replica)
  ShardedObject object;     // kObject
  Offsets factory_offsets;  // kGluFactory: the sharded_offsets the MLP received

  std::string& key() { return kind == Kind::kObject ? object.key : tensor.key; }
  std::vector<int64_t>& replica_id() { return kind == Kind::kObject ? object.replica_id : tensor.replica_id; }
};
using Entries = std::vector<Entry>;

void append(Entries& out, Entries more) {
  for (Entry& e : more) out.push_back(std::move(e));
}

Entries entries_of(ShardedStateDict sd) {
  Entries out;
  for (ShardedTensor& t : sd.tensors) {
    Entry& e = out.emplace_back();
    e.kind = Entry::Kind::kTensor;
    e.tensor = std::move(t);
  }
  for (ShardedObject& o : sd.objects) {
    Entry& e = out.emplace_back();
    e.kind = Entry::Kind::kObject;
    e.object = std::move(o);
  }
  return out;
}

// dist_checkpointing/utils.py replace_prefix_for_sharding: every key must start with old_prefix.
void replace_prefix_for_sharding(Entries& entries, const std::string& old_prefix, const std::string& new_prefix) {
  for (Entry& e : entries) {
    std::string& key = e.key();
    if (key.rfind(old_prefix, 0) != 0) {
      throw CheckpointingError(fmt::format("Expected {} to begin with prefix {}", key, old_prefix));
    }
    key = new_prefix + key.substr(old_prefix.size());
  }
}

// dist_checkpointing/utils.py apply_prefix_mapping: the first matching prefix
// of the (ordered) map is replaced; other keys are left alone.
void apply_prefix_mapping(Entries& entries, const std::vector<std::pair<std::string, std::string>>& prefix_map) {
  for (Entry& e : entries) {
    std::string& key = e.key();
    for (const auto& [old_prefix, new_prefix] : prefix_map) {
      if (key.rfind(old_prefix, 0) == 0) {
        key = new_prefix + key.substr(old_prefix.size());
        break;
      }
    }
  }
}

// megatron/core/utils.py divide / ensure_divisibility.
int64_t divide(int64_t numerator, int64_t denominator, std::string_view what) {
  if (denominator <= 0 || numerator % denominator != 0) {
    throw ConfigError(std::string(what), std::to_string(numerator),
                      fmt::format("{} is not divisible by {}", numerator, denominator));
  }
  return numerator / denominator;
}

// Builds the sharded state dicts of the local-spec modules on one rank.
class Builder {
 public:
  Builder(const TransformerConfig& cfg, const ParallelConfig& pc, int64_t global_rank, const ShardingOptions& options)
      : cfg_(cfg), pc_(pc), ctx_(sharding_context(pc, global_rank)), options_(options) {}

  const ShardingContext& ctx() const { return ctx_; }

  Entries component(std::string_view name, const std::string& prefix, const Offsets& offsets) {
    if (name == "layernorm") return fused_layer_norm(prefix, offsets, false);
    if (name == "rmsnorm") return te_norm(prefix, offsets, true);
    if (name == "self_attention") return self_attention(prefix, offsets);
    if (name == "cross_attention") return cross_attention(prefix, offsets);
    if (name == "mlp") return mlp(prefix, offsets, ffn());
    if (name == "moe_router") return router(prefix, offsets);
    if (name == "moe_layer") return moe_layer(prefix, offsets);
    if (name == "transformer_layer") return layer(prefix, offsets);
    if (name == "transformer_block") return block(prefix, offsets);
    throw Error(fmt::format("sharded_state_dict: unknown component \"{}\"", name));
  }

  // TransformerBlock's treatment of one layer: prefix "layers.<local i>." ->
  // "layers.", layer axis (0, G, num_layers).
  Entries block_layer(const std::string& prefix, int64_t local_index, int64_t global_index) {
    const std::string layer_prefix = prefix + "layers.";
    const std::string state_dict_prefix = fmt::format("{}{}.", layer_prefix, local_index);
    Entries e = layer(state_dict_prefix, {{0, global_index, cfg_.num_layers}});
    replace_prefix_for_sharding(e, state_dict_prefix, layer_prefix);
    return e;
  }

 private:
  int64_t h() const { return cfg_.hidden_size; }
  int64_t n() const { return cfg_.num_attention_heads; }
  int64_t g() const { return *cfg_.num_query_groups; }
  int64_t hn() const { return *cfg_.kv_channels; }
  int64_t ffn() const { return *cfg_.ffn_hidden_size; }
  int64_t tp() const { return ctx_.tp_size; }
  bool rms() const { return cfg_.normalization == "RMSNorm"; }

  // A plain module's state_dict through make_sharded_tensors_for_checkpoint.
  Entries plain(const std::vector<LocalStateEntry>& sd, const std::string& prefix, std::string_view module_class,
                const Offsets& offsets) {
    const std::vector<TpAxis> axis_map = tensor_parallel_axis_map(module_class);
    return entries_of(make_sharded_tensors_for_checkpoint(sd, prefix, axis_map, ctx_, offsets));
  }

  // ColumnParallelLinear / RowParallelLinear: state_dict = weight, bias (if
  // any), then `_extra_state` (get_extra_state is overridden and returns None,
  // so torch puts the key in the state dict).
  Entries column_linear(const std::string& prefix, int64_t in, int64_t out, bool bias, const Offsets& offsets) {
    const int64_t out_r = divide(out, tp(), prefix + "output_size");
    std::vector<LocalStateEntry> sd{{"weight", {out_r, in}, cfg_.params_dtype}};
    if (bias) sd.push_back({"bias", {out_r}, cfg_.params_dtype});
    sd.push_back({"_extra_state", {}, std::nullopt});
    return plain(sd, prefix, "ColumnParallelLinear", offsets);
  }
  Entries row_linear(const std::string& prefix, int64_t in, int64_t out, bool bias, const Offsets& offsets) {
    const int64_t in_r = divide(in, tp(), prefix + "input_size");
    std::vector<LocalStateEntry> sd{{"weight", {out, in_r}, cfg_.params_dtype}};
    if (bias) sd.push_back({"bias", {out}, cfg_.params_dtype});
    sd.push_back({"_extra_state", {}, std::nullopt});
    return plain(sd, prefix, "RowParallelLinear", offsets);
  }

  // FusedLayerNorm: a torch.nn.Module without sharded_state_dict ->
  // sharded_state_dict_default -> replicated. Its Parameters come from
  // torch.Tensor(h), i.e. torch's default dtype (float32), not params_dtype.
  // An RMSNorm in the layer (which 0.5.0's FusedLayerNorm refuses) is
  // Paritron's extension: a weight only.
  Entries fused_layer_norm(const std::string& prefix, const Offsets& offsets, bool rms_norm) {
    if (rms_norm) return te_norm(prefix, offsets, true);
    return plain({{"weight", {h()}, DType::F32}, {"bias", {h()}, DType::F32}}, prefix, "FusedLayerNorm", offsets);
  }
  // TENorm (te.pytorch.LayerNorm / RMSNorm, params_dtype): no sharded_state_dict, no extra state.
  Entries te_norm(const std::string& prefix, const Offsets& offsets, bool rms_norm) {
    std::vector<LocalStateEntry> sd{{"weight", {h()}, cfg_.params_dtype}};
    if (!rms_norm) sd.push_back({"bias", {h()}, cfg_.params_dtype});
    return plain(sd, prefix, "TENorm", offsets);
  }

  // MegatronModule.sharded_state_dict over Attention's children in
  // registration order: core_attention (no state), linear_proj, then the
  // subclass's projections.
  Entries self_attention(const std::string& prefix, const Offsets& offsets) {
    Entries out = row_linear(prefix + "linear_proj.", n() * hn(), h(), cfg_.add_bias_linear, offsets);
    append(out, column_linear(prefix + "linear_qkv.", h(), (n() + 2 * g()) * hn(),
                              cfg_.add_bias_linear || cfg_.add_qkv_bias, offsets));
    return out;
  }
  Entries cross_attention(const std::string& prefix, const Offsets& offsets) {
    if (g() != n()) {
      throw Error(fmt::format("cross_attention: num_query_groups ({}) must equal num_attention_heads ({}) "
                              "(Megatron's CrossAttention raises ValueError)",
                              g(), n()));
    }
    Entries out = row_linear(prefix + "linear_proj.", n() * hn(), h(), cfg_.add_bias_linear, offsets);
    append(out, column_linear(prefix + "linear_q.", h(), n() * hn(), cfg_.add_bias_linear, offsets));
    append(out, column_linear(prefix + "linear_kv.", h(), 2 * n() * hn(), cfg_.add_bias_linear, offsets));
    return out;
  }

  // MLP.sharded_state_dict: linear_fc1 (through the GLU factory when gated), linear_fc2.
  Entries mlp(const std::string& prefix, const Offsets& offsets, int64_t ffn_size) {
    const bool glu = cfg_.gated_linear_unit;
    Entries out = column_linear(prefix + "linear_fc1.", h(), glu ? 2 * ffn_size : ffn_size, cfg_.add_bias_linear, offsets);
    if (glu) {
      // Only the weight goes through the factory in 0.5.0 .. 0.7; the bias
      // stays a plain dim-0 TP shard (spec §11.6). 0.8+ sends the bias too.
      const std::string weight_key = prefix + "linear_fc1.weight", bias_key = prefix + "linear_fc1.bias";
      for (Entry& e : out) {
        const bool factory = e.tensor.key == weight_key || (options_.glu_fc1_bias_factory && e.tensor.key == bias_key);
        if (e.kind == Entry::Kind::kTensor && factory) {
          e.kind = Entry::Kind::kGluFactory;
          e.factory_offsets = offsets;
        }
      }
    }
    append(out, row_linear(prefix + "linear_fc2.", ffn_size, h(), cfg_.add_bias_linear, offsets));
    return out;
  }

  // Router: MegatronModule default, its own `weight` [E, h] replicated. The
  // Parameter is torch.empty((E, h)): torch's default dtype (float32).
  Entries router(const std::string& prefix, const Offsets& offsets) {
    if (!cfg_.num_moe_experts) throw Error("moe_router: num_moe_experts is not set");
    return plain({{"weight", {*cfg_.num_moe_experts, h()}, DType::F32}}, prefix, "TopKRouter", offsets);
  }

  // MoELayer: MegatronModule default over router, experts (token_dispatcher is not a Module).
  Entries moe_layer(const std::string& prefix, const Offsets& offsets) {
    if (!cfg_.num_moe_experts) throw Error("moe_layer: num_moe_experts is not set");
    if (cfg_.moe_grouped_gemm) {
      throw CheckpointingError("Currently distributed checkpointing is not supported for GroupedMLP");
    }
    Entries out = router(prefix + "router.", offsets);
    append(out, sequential_mlp(prefix + "experts.", offsets));
    return out;
  }

  // SequentialMLP.sharded_state_dict (moe/experts.py).
  Entries sequential_mlp(const std::string& prefix, const Offsets& offsets) {
    const int64_t num_local = divide(*cfg_.num_moe_experts, ctx_.ep_size, "num_moe_experts");
    const int64_t num_global = ctx_.ep_size * num_local;
    const int64_t first_global = ctx_.ep_rank * num_local;
    // Note: prefix is already "...mlp.experts.", so the stacked key is
    // "...mlp.experts.experts.<param>" (the spec writes "mlp.experts.<param>").
    const std::string expert_sharded_prefix = prefix + "experts.";
    const int64_t ffn_size = expert_ffn_hidden_size(cfg_);
    Entries out;
    for (int64_t i = 0; i < num_local; ++i) {
      const std::string expert_state_dict_prefix = fmt::format("{}local_experts.{}.", prefix, i);
      Offsets expert_offsets = offsets;
      expert_offsets.push_back({static_cast<int64_t>(offsets.size()), first_global + i, num_global});
      Entries e = mlp(expert_state_dict_prefix, expert_offsets, ffn_size);
      replace_prefix_for_sharding(e, expert_state_dict_prefix, expert_sharded_prefix);
      // Replication along DP modulo EP: (PP, TP, DP) -> (PP, TP, data-modulo-expert rank).
      for (Entry& x : e) {
        std::vector<int64_t>& r = x.replica_id();
        if (r.size() != 3) {
          throw CheckpointingError(fmt::format(
              "Expected replica_id for {} to be in (PP, TP, DP) format, got: ({})", x.key(), fmt::join(r, ", ")));
        }
        r = {r[0], r[1], ctx_.data_modulo_expert_rank};
      }
      append(out, std::move(e));
    }
    return out;
  }

  // TransformerLayer.sharded_state_dict: MegatronModule default over the
  // children (input_layernorm, self_attention, the IdentityOps, pre_mlp_layernorm,
  // mlp), then the local spec's sharded_state_dict_keys_map, prefixed with the
  // layer's prefix, applied by apply_prefix_mapping. The map is applied to the
  // MoE layer's pre_mlp_layernorm too, giving "mlp.linear_fc1.layer_norm_*"
  // even though a MoELayer has no linear_fc1.
  Entries layer(const std::string& prefix, const Offsets& offsets) {
    Entries out = fused_layer_norm(prefix + "input_layernorm.", offsets, rms());
    append(out, self_attention(prefix + "self_attention.", offsets));
    append(out, fused_layer_norm(prefix + "pre_mlp_layernorm.", offsets, rms()));
    append(out, cfg_.num_moe_experts ? moe_layer(prefix + "mlp.", offsets) : mlp(prefix + "mlp.", offsets, ffn()));
    std::vector<std::pair<std::string, std::string>> renames;  // local prefix -> TE prefix
    for (const auto& [te, local] : kTeNormKeyPrefixes) {
      renames.emplace_back(prefix + std::string(local), prefix + std::string(te));
    }
    apply_prefix_mapping(out, renames);
    return out;
  }

  // TransformerBlock.sharded_state_dict for every model chunk this rank holds
  // (one per virtual pipeline rank, in chunk order), then final_layernorm
  // (TENorm, no layer axis) where post_process holds: the last pipeline stage's
  // last virtual chunk.
  Entries block(const std::string& prefix, const Offsets& offsets) {
    if (!offsets.empty()) throw CheckpointingError("Unexpected sharded offsets");
    const int64_t vp = pc_.virtual_pipeline_model_parallel_size.value_or(1);
    const int64_t pp = pc_.pipeline_model_parallel_size;
    Entries out;
    for (int64_t v = 0; v < vp; ++v) {
      const std::vector<int64_t> layers = stage_layers(pc_, cfg_.num_layers, ctx_.pp_rank, v);
      for (size_t i = 0; i < layers.size(); ++i) append(out, block_layer(prefix, static_cast<int64_t>(i), layers[i]));
      if (ctx_.pp_rank == pp - 1 && v == vp - 1) append(out, te_norm(prefix + "final_layernorm.", {}, rms()));
    }
    return out;
  }

  TransformerConfig cfg_;
  ParallelConfig pc_;
  ShardingContext ctx_;
  ShardingOptions options_;
};

// mapping.py apply_factories: the GLU factory becomes its two ShardedTensors.
ShardedStateDict apply_factories(Entries entries, const ShardingContext& ctx) {
  ShardedStateDict out;
  for (Entry& e : entries) {
    switch (e.kind) {
      case Entry::Kind::kTensor: out.tensors.push_back(std::move(e.tensor)); break;
      case Entry::Kind::kObject: out.objects.push_back(std::move(e.object)); break;
      case Entry::Kind::kGluFactory:
        for (ShardedTensor& t : glu_fc1_sharded_tensors(e.tensor.key, e.tensor.local_shape, ctx, e.factory_offsets,
                                                        e.tensor.replica_id, e.tensor.dtype)) {
          out.tensors.push_back(std::move(t));
        }
        break;
    }
  }
  return out;
}

// The config with its derived defaults and the layout's parallel sizes; throws
// ConfigError when the layout does not fit the model.
TransformerConfig fitted_config(const TransformerConfig& cfg, const ParallelConfig& pc) {
  std::vector<ConfigIssue> issues = check_fits(pc, cfg);
  if (!issues.empty()) throw ConfigError(std::move(issues));
  TransformerConfig sized = with_parallel(cfg, pc);
  check_config(sized);  // fills the derived defaults; check_fits has already found no issue
  return sized;
}

}  // namespace

ShardedStateDict module_sharded_state_dict(std::string_view component, const TransformerConfig& cfg,
                                           const ParallelConfig& pc, int64_t global_rank, std::string_view prefix,
                                           std::span<const RankOffset> sharded_offsets, const ShardingOptions& options) {
  const TransformerConfig sized = fitted_config(cfg, pc);
  Builder b(sized, pc, global_rank, options);
  return apply_factories(b.component(component, std::string(prefix), Offsets(sharded_offsets.begin(), sharded_offsets.end())),
                         b.ctx());
}

std::vector<ShardedTensor> sharded_state_dict(std::string_view component, const TransformerConfig& cfg,
                                              const ParallelConfig& pc, int64_t global_rank, std::string_view prefix,
                                              std::optional<int64_t> layer_number, const ShardingOptions& options) {
  if (!layer_number) return module_sharded_state_dict(component, cfg, pc, global_rank, prefix, {}, options).tensors;
  if (component != "transformer_layer") {
    throw Error(fmt::format("sharded_state_dict: a layer_number goes with \"transformer_layer\", not \"{}\"", component));
  }
  const TransformerConfig sized = fitted_config(cfg, pc);
  if (*layer_number < 1 || *layer_number > sized.num_layers) {
    throw Error(fmt::format("sharded_state_dict: layer_number {} outside 1..{}", *layer_number, sized.num_layers));
  }
  const int64_t global_index = *layer_number - 1;
  Builder b(sized, pc, global_rank, options);
  const int64_t vp = pc.virtual_pipeline_model_parallel_size.value_or(1);
  for (int64_t v = 0; v < vp; ++v) {
    const std::vector<int64_t> layers = stage_layers(pc, sized.num_layers, b.ctx().pp_rank, v);
    const auto it = std::find(layers.begin(), layers.end(), global_index);
    if (it != layers.end()) {
      return apply_factories(b.block_layer(std::string(prefix), it - layers.begin(), global_index), b.ctx()).tensors;
    }
  }
  throw Error(fmt::format("sharded_state_dict: layer {} is not on pipeline stage {} of rank {} ({})", *layer_number,
                          b.ctx().pp_rank, global_rank, pc.layout_name()));
}

// ===================== serialization.py validate_sharding_integrity =====================

namespace {

struct Box {
  std::vector<int64_t> begin, end;  // per global axis
};

Box box_of(const ShardedTensor& t) {
  Box b;
  for (const GlobalSliceAxis& a : t.global_slice()) {
    b.begin.push_back(a.begin);
    b.end.push_back(a.end);
  }
  return b;
}

int64_t volume(const Box& b) {
  int64_t v = 1;
  for (size_t i = 0; i < b.begin.size(); ++i) v *= b.end[i] - b.begin[i];
  return v;
}

bool overlap(const Box& a, const Box& b) {
  for (size_t i = 0; i < a.begin.size(); ++i) {
    if (a.end[i] <= b.begin[i] || b.end[i] <= a.begin[i]) return false;
  }
  return true;
}

std::string describe(const ShardedTensor& t, size_t rank) {
  return fmt::format("rank {} (offset [{}], local shape {}, replica ({}))", rank, fmt::join(t.global_offset, ", "),
                     shape_string(t.local_shape), fmt::join(t.replica_id, ", "));
}

// Structural problems of one piece (shape bookkeeping, bounds, fragmentation); empty when sound.
std::vector<std::string> piece_problems(const ShardedTensor& t, size_t rank) {
  std::vector<std::string> out;
  const std::string who = fmt::format("{}: {}", t.key, describe(t, rank));
  const size_t ndim = t.global_shape.size();
  if (t.prepend_axis_num < 0 || t.local_shape.size() + static_cast<size_t>(t.prepend_axis_num) != ndim ||
      t.global_offset.size() != ndim || t.axis_fragmentations.size() != ndim) {
    out.push_back(fmt::format("{}: global_shape {} / global_offset / axis_fragmentations do not have "
                              "len(local_shape) + prepend_axis_num = {} + {} entries",
                              who, shape_string(t.global_shape), t.local_shape.size(), t.prepend_axis_num));
    return out;
  }
  for (size_t i = 0; i < ndim; ++i) {
    const bool prepended = i < static_cast<size_t>(t.prepend_axis_num);
    const int64_t extent = prepended ? 1 : t.local_shape[i - static_cast<size_t>(t.prepend_axis_num)];
    const int64_t off = t.global_offset[i], gs = t.global_shape[i], fragm = t.axis_fragmentations[i];
    if (extent < 0 || off < 0 || gs < 0 || off > gs - extent) {
      out.push_back(fmt::format("{}: axis {} piece [{}, {}) is outside the global extent {}", who, i, off,
                                off + extent, gs));
      continue;
    }
    if (!t.allow_shape_mismatch && (fragm < 1 || gs != fragm * extent || (extent > 0 && off % extent != 0))) {
      out.push_back(fmt::format("{}: axis {} (global {}, local {}, offset {}) does not match its fragmentation {}",
                                who, i, gs, extent, off, fragm));
    }
  }
  if (t.flattened_range) {
    const int64_t n = shape_numel(t.local_shape);
    if (t.flattened_range->start < 0 || t.flattened_range->start > t.flattened_range->stop ||
        t.flattened_range->stop > n) {
      out.push_back(fmt::format("{}: flattened_range [{}, {}) is outside the {} local elements", who,
                                t.flattened_range->start, t.flattened_range->stop, n));
    }
  }
  return out;
}

}  // namespace

std::vector<std::string> check_sharding_integrity(const std::vector<std::vector<ShardedTensor>>& per_rank) {
  std::vector<std::string> problems;
  // Keys in first-seen order, each with its (rank, piece) list.
  std::vector<std::string> order;
  std::map<std::string, std::vector<std::pair<size_t, const ShardedTensor*>>> by_key;
  for (size_t r = 0; r < per_rank.size(); ++r) {
    for (const ShardedTensor& t : per_rank[r]) {
      auto [it, fresh] = by_key.try_emplace(t.key);
      if (fresh) order.push_back(t.key);
      it->second.emplace_back(r, &t);
    }
  }
  for (const std::string& key : order) {
    const auto& pieces = by_key[key];
    const ShardedTensor& ref = *pieces.front().second;
    const size_t ref_rank = pieces.front().first;
    bool consistent = true;
    for (const auto& [rank, t] : pieces) {
      // Megatron's _validate_sharding_for_key asserts.
      if (t->global_shape != ref.global_shape) {
        problems.push_back(fmt::format("{}: rank {} has global shape {}, rank {} has {}", key, rank,
                                       shape_string(t->global_shape), ref_rank, shape_string(ref.global_shape)));
        consistent = false;
      }
      if (t->local_shape != ref.local_shape) {
        problems.push_back(fmt::format("{}: rank {} has local shape {}, rank {} has {}", key, rank,
                                       shape_string(t->local_shape), ref_rank, shape_string(ref.local_shape)));
      }
      if (t->dtype != ref.dtype) {
        problems.push_back(fmt::format("{}: rank {} has dtype {}, rank {} has {}", key, rank,
                                       t->dtype ? dtype_name(*t->dtype) : "unset", ref_rank,
                                       ref.dtype ? dtype_name(*ref.dtype) : "unset"));
      }
      if (t->flattened_range.has_value() != ref.flattened_range.has_value()) {
        problems.push_back(fmt::format("{}: rank {} and rank {} disagree on having a flattened_range", key, rank,
                                       ref_rank));
        consistent = false;
      }
      std::vector<std::string> own = piece_problems(*t, rank);
      if (!own.empty()) consistent = false;
      problems.insert(problems.end(), own.begin(), own.end());
    }
    if (!consistent) continue;  // coverage of inconsistent pieces means nothing

    // The boxes the main replicas write. With flattened ranges, pieces with the
    // same global offset share one local box that their ranges must tile.
    std::vector<std::pair<Box, std::string>> covering;
    if (ref.flattened_range) {
      std::map<std::vector<int64_t>, std::vector<std::pair<size_t, const ShardedTensor*>>> groups;
      for (const auto& p : pieces) groups[p.second->global_offset].push_back(p);
      for (const auto& [offset, group] : groups) {
        std::vector<std::pair<int64_t, int64_t>> ranges;
        for (const auto& [rank, t] : group) {
          if (t->is_main_replica()) ranges.emplace_back(t->flattened_range->start, t->flattened_range->stop);
        }
        if (ranges.empty()) continue;
        std::sort(ranges.begin(), ranges.end());
        const int64_t n = shape_numel(ref.local_shape);
        bool tiles = ranges.front().first == 0 && ranges.back().second == n;
        for (size_t i = 1; i < ranges.size(); ++i) tiles = tiles && ranges[i].first == ranges[i - 1].second;
        if (!tiles) {
          problems.push_back(fmt::format("{}: flattened ranges at offset [{}] do not tile the {} local elements", key,
                                         fmt::join(offset, ", "), n));
        }
        covering.emplace_back(box_of(*group.front().second), describe(*group.front().second, group.front().first));
      }
    } else {
      for (const auto& [rank, t] : pieces) {
        if (t->is_main_replica()) covering.emplace_back(box_of(*t), describe(*t, rank));
      }
    }
    bool overlapping = false;
    for (size_t i = 0; i < covering.size(); ++i) {
      for (size_t j = i + 1; j < covering.size(); ++j) {
        if (overlap(covering[i].first, covering[j].first)) {
          problems.push_back(fmt::format("{}: main replicas overlap: {} and {}", key, covering[i].second,
                                         covering[j].second));
          overlapping = true;
        }
      }
    }
    int64_t covered = 0;
    for (const auto& c : covering) covered += volume(c.first);
    const int64_t total = shape_numel(ref.global_shape);
    if (!overlapping && covered != total) {
      problems.push_back(fmt::format("{}: main replicas cover {} of the {} elements of global shape {}", key, covered,
                                     total, shape_string(ref.global_shape)));
    }
  }
  return problems;
}

std::vector<std::string> check_object_integrity(const std::vector<std::vector<ShardedObject>>& per_rank) {
  std::vector<std::string> problems;
  std::map<std::string, int64_t> unique_count;
  std::vector<std::string> order;
  std::map<std::string, std::vector<const ShardedObject*>> by_key;
  for (const auto& objects : per_rank) {
    for (const ShardedObject& o : objects) {
      auto [it, fresh] = by_key.try_emplace(o.key);
      if (fresh) order.push_back(o.key);
      it->second.push_back(&o);
      if (o.is_main_replica()) ++unique_count[o.unique_key()];
    }
  }
  for (const auto& [unique_key, count] : unique_count) {
    if (count > 1) problems.push_back(fmt::format("Duplicate ShardedObject key {} ({} main replicas)", unique_key, count));
  }
  for (const std::string& key : order) {
    const auto& objects = by_key[key];
    const std::vector<int64_t>& shape = objects.front()->global_shape;
    bool sound = true;
    std::set<std::vector<int64_t>> cells;
    for (const ShardedObject* o : objects) {
      if (o->global_shape != shape || o->global_offset.size() != shape.size()) {
        problems.push_back(fmt::format("{}: shard grid [{}] at offset [{}] disagrees with grid [{}]", key,
                                       fmt::join(o->global_shape, ", "), fmt::join(o->global_offset, ", "),
                                       fmt::join(shape, ", ")));
        sound = false;
        continue;
      }
      for (size_t i = 0; i < shape.size(); ++i) {
        if (o->global_offset[i] < 0 || o->global_offset[i] >= shape[i]) {
          problems.push_back(fmt::format("{}: offset [{}] outside grid [{}]", key, fmt::join(o->global_offset, ", "),
                                         fmt::join(shape, ", ")));
          sound = false;
        }
      }
      if (o->is_main_replica()) cells.insert(o->global_offset);
    }
    if (!sound) continue;
    int64_t total = 1;
    for (int64_t s : shape) total *= s;
    if (static_cast<int64_t>(cells.size()) != total) {
      problems.push_back(fmt::format("{}: main replicas hold {} of the {} cells of grid [{}]", key, cells.size(),
                                     total, fmt::join(shape, ", ")));
    }
  }
  return problems;
}

// ===================== JSON =====================

namespace {

using Json = nlohmann::ordered_json;

Json replica_json(const std::vector<int64_t>& replica_id) {
  if (replica_id.size() == 1) return replica_id.front();
  return Json(replica_id);
}

[[noreturn]] void bad(size_t index, std::string_view field, const std::string& problem) {
  throw Error(fmt::format("sharded JSON entry {}: \"{}\" {}", index, field, problem));
}

const Json& field(const Json& entry, size_t index, const char* name) {
  const auto it = entry.find(name);
  if (it == entry.end()) bad(index, name, "is missing");
  return *it;
}

int64_t int_of(const Json& v, size_t index, std::string_view name) {
  const std::optional<int64_t> i = json_int64(v);
  if (!i) bad(index, name, "must be an integer, got " + json_brief(v));
  return *i;
}

std::vector<int64_t> ints_of(const Json& v, size_t index, std::string_view name) {
  if (!v.is_array()) bad(index, name, "must be an array of integers, got " + json_brief(v));
  std::vector<int64_t> out;
  for (const Json& x : v) out.push_back(int_of(x, index, name));
  return out;
}

std::vector<int64_t> replica_of(const Json& v, size_t index) {
  if (v.is_array()) return ints_of(v, index, "replica_id");
  return {int_of(v, index, "replica_id")};
}

Json parse_array(std::string_view text, std::string_view what) {
  const Json root = parse_strict_json<Json>(text, std::string(what),
                                            {.what = what, .fail = [what](const std::string& problem) {
                                               throw Error(fmt::format("{}: {}", what, problem));
                                             }});
  if (!root.is_array()) throw Error(fmt::format("{}: must be a JSON array of objects, got {}", what, json_brief(root)));
  for (size_t i = 0; i < root.size(); ++i) {
    if (!root[i].is_object()) throw Error(fmt::format("{}: entry {} is not an object: {}", what, i, json_brief(root[i])));
  }
  return root;
}

}  // namespace

std::string sharded_tensors_to_json(std::span<const ShardedTensor> tensors, int indent) {
  Json out = Json::array();
  for (const ShardedTensor& t : tensors) {
    Json e;
    e["key"] = t.key;
    if (t.dtype) e["dtype"] = std::string(torch_dtype_name(*t.dtype));
    e["local_shape"] = t.local_shape;
    e["global_shape"] = t.global_shape;
    e["global_offset"] = t.global_offset;
    e["axis_fragmentations"] = t.axis_fragmentations;
    e["replica_id"] = replica_json(t.replica_id);
    e["prepend_axis_num"] = t.prepend_axis_num;
    e["allow_shape_mismatch"] = t.allow_shape_mismatch;
    if (t.flattened_range) {
      e["flattened_range"] = Json{{"start", t.flattened_range->start}, {"stop", t.flattened_range->stop}};
    } else {
      e["flattened_range"] = nullptr;
    }
    out.push_back(std::move(e));
  }
  return out.dump(indent, ' ', false, Json::error_handler_t::replace);
}

std::vector<ShardedTensor> sharded_tensors_from_json(std::string_view json_text) {
  const Json root = parse_array(json_text, "sharded tensors JSON");
  std::vector<ShardedTensor> out;
  for (size_t i = 0; i < root.size(); ++i) {
    const Json& e = root[i];
    ShardedTensor t;
    const Json& key = field(e, i, "key");
    if (!key.is_string()) bad(i, "key", "must be a string, got " + json_brief(key));
    t.key = key.get<std::string>();
    if (const auto it = e.find("dtype"); it != e.end() && !it->is_null()) {
      const std::optional<DType> d = it->is_string() ? dtype_from_torch_name(it->get<std::string>()) : std::nullopt;
      if (!d) bad(i, "dtype", "must be a torch dtype name, got " + json_brief(*it));
      t.dtype = d;
    }
    t.local_shape = ints_of(field(e, i, "local_shape"), i, "local_shape");
    t.global_shape = ints_of(field(e, i, "global_shape"), i, "global_shape");
    t.global_offset = ints_of(field(e, i, "global_offset"), i, "global_offset");
    t.axis_fragmentations = ints_of(field(e, i, "axis_fragmentations"), i, "axis_fragmentations");
    t.replica_id = replica_of(field(e, i, "replica_id"), i);
    t.prepend_axis_num = int_of(field(e, i, "prepend_axis_num"), i, "prepend_axis_num");
    if (const auto it = e.find("allow_shape_mismatch"); it != e.end()) {
      if (!it->is_boolean()) bad(i, "allow_shape_mismatch", "must be true or false, got " + json_brief(*it));
      t.allow_shape_mismatch = it->get<bool>();
    }
    if (const auto it = e.find("flattened_range"); it != e.end() && !it->is_null()) {
      if (it->is_array() && it->size() == 2) {
        t.flattened_range = FlattenedRange{int_of((*it)[0], i, "flattened_range"), int_of((*it)[1], i, "flattened_range")};
      } else if (it->is_object() && it->contains("start") && it->contains("stop")) {
        t.flattened_range =
            FlattenedRange{int_of(it->at("start"), i, "flattened_range"), int_of(it->at("stop"), i, "flattened_range")};
      } else {
        bad(i, "flattened_range", "must be null, {\"start\": s, \"stop\": e} or [s, e], got " + json_brief(*it));
      }
    }
    out.push_back(std::move(t));
  }
  return out;
}

std::string sharded_objects_to_json(std::span<const ShardedObject> objects, int indent) {
  Json out = Json::array();
  for (const ShardedObject& o : objects) {
    Json e;
    e["key"] = o.key;
    e["global_shape"] = o.global_shape;
    e["global_offset"] = o.global_offset;
    e["replica_id"] = replica_json(o.replica_id);
    out.push_back(std::move(e));
  }
  return out.dump(indent, ' ', false, Json::error_handler_t::replace);
}

std::vector<ShardedObject> sharded_objects_from_json(std::string_view json_text) {
  const Json root = parse_array(json_text, "sharded objects JSON");
  std::vector<ShardedObject> out;
  for (size_t i = 0; i < root.size(); ++i) {
    const Json& e = root[i];
    ShardedObject o;
    const Json& key = field(e, i, "key");
    if (!key.is_string()) bad(i, "key", "must be a string, got " + json_brief(key));
    o.key = key.get<std::string>();
    o.global_shape = ints_of(field(e, i, "global_shape"), i, "global_shape");
    o.global_offset = ints_of(field(e, i, "global_offset"), i, "global_offset");
    o.replica_id = replica_of(field(e, i, "replica_id"), i);
    out.push_back(std::move(o));
  }
  return out;
}

}  // namespace paritron
