// Parameter initialisation (common/init.h): Megatron's init rules (core_v0.5.0
// megatron/core/utils.py init_method_normal / scaled_init_method_normal,
// tensor_parallel/layers.py, fusions/fused_layer_norm.py, moe/router.py;
// shared/spec/megatron-semantics.md §13) drawn from common/rng.h by global
// element index, so a TP shard is drawn without the rest of the tensor.
#include "common/init.h"

#include <cstring>

#include <fmt/format.h>

#include "common/error.h"
#include "common/rng.h"
#include "common/transformer_config.h"

namespace paritron {

namespace {

// A tensor seen as [outer, extent, inner] around `axis`: a range along the
// axis is then a column block [range.begin * inner, range.end * inner) of the
// row-major [outer, extent * inner] matrix, which rng.h can draw directly.
struct AxisView {
  int64_t outer = 1;
  int64_t extent = 1;
  int64_t inner = 1;
};

AxisView axis_view(const Shape& shape, int axis) {
  AxisView v;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (static_cast<int>(i) < axis) v.outer *= shape[i];
    else if (static_cast<int>(i) == axis) v.extent = shape[i];
    else v.inner *= shape[i];
  }
  return v;
}

// The effective init: without perform_initialization Megatron leaves linear
// parameters unwritten; Paritron zero-fills them (see init.h).
Init effective_init(const ParamSpec& spec, const TransformerConfig& cfg) {
  if (!cfg.perform_initialization && spec.linear) return Init::kZeros;
  return spec.init;
}

void require_floating(DType dtype, const ParamSpec& spec) {
  if (!is_floating(dtype)) {
    throw Error(fmt::format("init_parameter({}): dtype {} is not a floating dtype", spec.key, dtype_name(dtype)));
  }
}

Tensor constant(DType dtype, const Shape& shape, double value) {
  Tensor t(dtype, shape);  // zero-filled
  if (value != 0.0) {
    for (int64_t i = 0; i < t.numel(); ++i) t.set(i, value);
  }
  return t;
}

// Concatenates [outer, w_k] row-major blocks along their second axis.
Tensor concat_columns(const std::vector<Tensor>& blocks, DType dtype, const Shape& local_shape, int64_t outer) {
  Tensor out(dtype, local_shape);
  const size_t elem = dtype_size(dtype);
  std::byte* dst = out.bytes().data();
  for (int64_t o = 0; o < outer; ++o) {
    for (const Tensor& b : blocks) {
      const size_t row_bytes = static_cast<size_t>(b.numel() / outer) * elem;
      std::memcpy(dst, b.bytes().data() + static_cast<size_t>(o) * row_bytes, row_bytes);
      dst += row_bytes;
    }
  }
  return out;
}

}  // namespace

double init_stddev(Init init, const TransformerConfig& cfg) {
  switch (init) {
    case Init::kNormal: return cfg.init_method_std;
    case Init::kNormalOutputLayer: return output_layer_init_std(cfg);
    case Init::kZeros:
    case Init::kOnes: return 0.0;
  }
  return 0.0;
}

Tensor init_parameter(const ParamSpec& spec, const TransformerConfig& cfg, uint64_t seed, DType dtype,
                      std::string_view name_prefix) {
  require_floating(dtype, spec);
  const Init init = effective_init(spec, cfg);
  if (init == Init::kZeros) return constant(dtype, spec.shape, 0.0);
  if (init == Init::kOnes) return constant(dtype, spec.shape, 1.0);
  Tensor t(dtype, spec.shape);
  const std::string name = std::string(name_prefix) + spec.key;
  fill_normal(t, rng_key(seed, name), 0, 0.0, init_stddev(init, cfg));
  return t;
}

Tensor init_parameter_shard(const ParamSpec& spec, const TransformerConfig& cfg, int64_t tp_size, int64_t tp_rank,
                            uint64_t seed, DType dtype, std::string_view name_prefix) {
  require_floating(dtype, spec);
  const TpShard shard = local_shard_spec(spec, tp_size, tp_rank);
  if (shard.axis < 0) return init_parameter(spec, cfg, seed, dtype, name_prefix);  // replicated: the whole tensor
  const Init init = effective_init(spec, cfg);
  if (init == Init::kZeros) return constant(dtype, shard.local_shape, 0.0);
  if (init == Init::kOnes) return constant(dtype, shard.local_shape, 1.0);
  const std::string name = std::string(name_prefix) + spec.key;
  const RngKey key = rng_key(seed, name);
  const double stddev = init_stddev(init, cfg);
  const AxisView v = axis_view(spec.shape, shard.axis);
  std::vector<Tensor> blocks;
  for (const IndexRange& r : shard.ranges) {
    blocks.push_back(normal_shard(dtype, key, v.outer, v.extent * v.inner, 0, v.outer, r.begin * v.inner,
                                  (r.end - r.begin) * v.inner, 0.0, stddev));
  }
  return concat_columns(blocks, dtype, shard.local_shape, v.outer);
}


std::map<std::string, Tensor> init_parameters(std::string_view component, const TransformerConfig& cfg, uint64_t seed,
                                              DType dtype, std::string_view name_prefix) {
  std::map<std::string, Tensor> out;
  for (const ParamSpec& spec : module_params(component, cfg)) {
    out.emplace(std::string(name_prefix) + spec.key, init_parameter(spec, cfg, seed, dtype, name_prefix));
  }
  return out;
}

Tensor slice_tp_shard(const Tensor& whole, const TpShard& shard) {
  if (shard.axis < 0) return whole;
  if (static_cast<size_t>(shard.axis) >= whole.shape().size()) {
    throw Error(fmt::format("slice_tp_shard: axis {} outside shape {}", shard.axis, shape_string(whole.shape())));
  }
  const AxisView v = axis_view(whole.shape(), shard.axis);
  const size_t elem = dtype_size(whole.dtype());
  Tensor out(whole.dtype(), shard.local_shape);
  if (out.numel() == 0) return out;
  std::byte* dst = out.bytes().data();
  int64_t copied = 0;
  for (int64_t o = 0; o < v.outer; ++o) {
    for (const IndexRange& r : shard.ranges) {
      if (r.begin < 0 || r.end < r.begin || r.end > v.extent) {
        throw Error(fmt::format("slice_tp_shard: range [{}, {}) outside axis {} of extent {}", r.begin, r.end,
                                shard.axis, v.extent));
      }
      const int64_t count = (r.end - r.begin) * v.inner;
      if (copied + count > out.numel()) throw Error("slice_tp_shard: the ranges do not match the shard's local shape");
      const int64_t src = (o * v.extent + r.begin) * v.inner;
      std::memcpy(dst, whole.bytes().data() + static_cast<size_t>(src) * elem, static_cast<size_t>(count) * elem);
      dst += static_cast<size_t>(count) * elem;
      copied += count;
    }
  }
  if (copied != out.numel()) throw Error("slice_tp_shard: the ranges do not match the shard's local shape");
  return out;
}

}  // namespace paritron
