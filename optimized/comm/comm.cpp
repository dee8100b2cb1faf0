#include "optimized/comm/comm.h"

#include <fmt/format.h>

#include "optimized/comm/comm_util.h"
#include "optimized/comm/groups.h"

namespace paritron::opt {

std::string Group::describe() const { return fmt::format("{} [{}]", name, fmt::join(ranks, ", ")); }

Group world_group(int64_t world_size, int64_t rank) {
  Group g;
  g.name = "world";
  g.ranks.resize(static_cast<size_t>(world_size < 0 ? 0 : world_size));
  for (int64_t r = 0; r < world_size; ++r) g.ranks[static_cast<size_t>(r)] = r;
  g.index = rank;
  return g;
}

std::string_view short_group_name(GroupKind kind) {
  switch (kind) {
    case GroupKind::kTensor: return "tp";
    case GroupKind::kContext: return "cp";
    case GroupKind::kData: return "dp";
    case GroupKind::kDataWithContext: return "dp_cp";
    case GroupKind::kPipeline: return "pp";
    case GroupKind::kModel: return "mp";
    case GroupKind::kEmbedding: return "embd";
    case GroupKind::kTensorAndData: return "tp_dp";
    case GroupKind::kTensorDataContext: return "tp_dp_cp";
    case GroupKind::kTensorAndExpert: return "tp_ep";
    case GroupKind::kExpert: return "ep";
    case GroupKind::kDataModuloExpert: return "edp";
  }
  return "?";
}

Group make_group(const ParallelConfig& pc, GroupKind kind, int64_t rank) {
  Group g;
  g.name = std::string(short_group_name(kind));
  g.ranks = group_members(pc, kind, rank);
  g.index = -1;
  for (size_t i = 0; i < g.ranks.size(); ++i) {
    if (g.ranks[i] == rank) g.index = static_cast<int64_t>(i);
  }
  return g;
}

namespace comm_detail {

void check_group(const Group& g, int64_t rank, int64_t world_size, std::string_view op) {
  if (g.ranks.empty()) throw CommError(fmt::format("{} on group {}: the group is empty", op, g.describe()));
  if (g.index < 0 || g.index >= g.size() || g.ranks[static_cast<size_t>(g.index)] != rank) {
    throw CommError(fmt::format("{} on group {}: group index {} is not rank {} (not a member, or a wrong index)", op,
                                g.describe(), g.index, rank));
  }
  for (size_t i = 0; i < g.ranks.size(); ++i) {
    const int64_t r = g.ranks[i];
    if (r < 0 || r >= world_size) {
      throw CommError(fmt::format("{} on group {}: rank {} is outside the world of {} ranks", op, g.describe(), r,
                                  world_size));
    }
    for (size_t j = 0; j < i; ++j) {
      if (g.ranks[j] == r) throw CommError(fmt::format("{} on group {}: rank {} is listed twice", op, g.describe(), r));
    }
  }
}

int64_t row_width(const DTensor& t) {
  if (t.dim() == 0) return 1;
  int64_t w = 1;
  for (size_t d = 1; d < t.shape().size(); ++d) w *= t.shape()[d];
  return w;
}

const math::FloatFormat* rounding_format(const DTensor& t) {
  if (t.dtype() == t.storage_dtype()) return nullptr;
  if (t.dtype() == DType::F64) return nullptr;
  if (t.storage_dtype() == DType::F32 && t.dtype() == DType::F32) return nullptr;
  return float_format(t.dtype());
}

void round_in_place(void* data, DType storage, int64_t n, const math::FloatFormat* fmt) {
  if (fmt == nullptr) return;
  if (storage == DType::F32) {
    float* p = static_cast<float*>(data);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(math::round_to(static_cast<double>(p[i]), *fmt));
  } else if (storage == DType::F64) {
    double* p = static_cast<double*>(data);
    for (int64_t i = 0; i < n; ++i) p[i] = math::round_to(p[i], *fmt);
  }
}

bool summable(DType storage) {
  return storage == DType::F32 || storage == DType::F64 || storage == DType::I64 || storage == DType::I32;
}

namespace {
template <typename T>
void sum_typed(const std::vector<const void*>& inputs, void* out, int64_t begin, int64_t count) {
  T* o = static_cast<T*>(out);
  for (int64_t i = 0; i < count; ++i) {
    T acc = static_cast<const T*>(inputs[0])[begin + i];
    for (size_t m = 1; m < inputs.size(); ++m) acc += static_cast<const T*>(inputs[m])[begin + i];
    o[i] = acc;
  }
}
}  // namespace

void sum_members(const std::vector<const void*>& inputs, DType storage, int64_t begin, int64_t count, void* out,
                 const math::FloatFormat* fmt) {
  switch (storage) {
    case DType::F32: sum_typed<float>(inputs, out, begin, count); break;
    case DType::F64: sum_typed<double>(inputs, out, begin, count); break;
    case DType::I64: sum_typed<int64_t>(inputs, out, begin, count); break;
    case DType::I32: sum_typed<int32_t>(inputs, out, begin, count); break;
    default: throw CommError(fmt::format("cannot sum tensors stored as {}", dtype_name(storage)));
  }
  round_in_place(out, storage, count, fmt);
}

CallDesc tensor_call(std::string_view op, const DTensor& in, const DTensor* out) {
  CallDesc d;
  d.op = op;
  d.has_in = true;
  d.dtype = in.dtype();
  d.storage = in.storage_dtype();
  d.in_shape = in.shape();
  if (out) {
    d.has_out = true;
    d.out_dtype = out->dtype();
    d.out_storage = out->storage_dtype();
    d.out_shape = out->shape();
  }
  return d;
}

std::string CallDesc::describe() const {
  std::string s(op);
  s += "(";
  auto tensor = [](DType dt, DType st, const Shape& shape) {
    std::string t = fmt::format("{}{}", dtype_name(dt), shape_string(shape));
    if (st != dt) t += fmt::format(" (storage {})", dtype_name(st));
    return t;
  };
  if (op == "all_gather_ints") {
    s += fmt::format("{} values", num_ints);
  } else if (has_in) {
    s += tensor(dtype, storage, in_shape);
    if (!send_rows.empty() || op == "all_to_all_v") s += fmt::format(" send rows [{}]", fmt::join(send_rows, ", "));
    if (has_out) s += " -> " + tensor(out_dtype, out_storage, out_shape);
    if (op == "all_to_all_v") s += fmt::format(" recv rows [{}]", fmt::join(recv_rows, ", "));
    if (op == "broadcast") s += fmt::format(" root {}", root);
  }
  s += ")";
  return s;
}

// The first disagreement between the members' posts, or "".
std::string check_calls(const std::vector<const CallDesc*>& posts, const Group& g,
                        const std::function<bool(DType)>& can_sum) {
  const auto n = static_cast<int64_t>(posts.size());
  const CallDesc& p0 = *posts[0];
  auto fail = [&](std::string_view problem) {
    bool same_op = true;
    for (const auto* p : posts) same_op = same_op && p->op == p0.op;
    std::string msg = fmt::format("{} on group {}: {}", same_op ? std::string(p0.op) : std::string("collective"),
                                  g.describe(), problem);
    for (int64_t i = 0; i < n; ++i) {
      msg += fmt::format("{} rank {} passed {}", i == 0 ? ":" : ",", g.ranks[static_cast<size_t>(i)],
                         posts[static_cast<size_t>(i)]->describe());
    }
    return msg;
  };
  for (const auto* p : posts) {
    if (p->op != p0.op) return fail("members called different operations");
  }
  for (const auto* p : posts) {
    if (p->group_name != p0.group_name) return fail(fmt::format("members named the group differently ({} vs {})",
                                                                 p0.group_name, p->group_name));
  }
  const std::string_view op = p0.op;
  if (op == "barrier") return "";
  if (op == "all_gather_ints") {
    for (const auto* p : posts) {
      if (p->num_ints != p0.num_ints) return fail("members passed different numbers of values");
    }
    return "";
  }
  for (const auto* p : posts) {
    if (p->dtype != p0.dtype || p->storage != p0.storage) return fail("members passed different dtypes");
    if (p->has_out && (p->out_dtype != p->dtype || p->out_storage != p->storage)) {
      return fail("output dtype differs from the input dtype");
    }
  }
  if (op == "all_reduce" || op == "reduce_scatter") {
    if (!(can_sum ? can_sum(p0.storage) : summable(p0.storage))) {
      return fail(fmt::format("cannot sum {} storage", dtype_name(p0.storage)));
    }
  }
  if (op == "all_reduce" || op == "broadcast" || op == "all_gather" || op == "reduce_scatter") {
    for (const auto* p : posts) {
      if (p->in_shape != p0.in_shape) return fail("members passed different shapes");
    }
  }
  if (op == "broadcast") {
    for (const auto* p : posts) {
      if (p->root != p0.root) return fail("members named different roots");
    }
    if (p0.root < 0 || p0.root >= n) return fail(fmt::format("root index {} is not in the group", p0.root));
    return "";
  }
  if (op == "all_reduce") return "";
  if (op == "all_gather" || op == "reduce_scatter") {
    if (p0.in_shape.empty()) return fail("0-d tensors have no dimension 0");
    Shape want = p0.in_shape;
    if (op == "all_gather") {
      want[0] *= n;
    } else {
      if (want[0] % n != 0) return fail(fmt::format("dimension 0 ({}) is not a multiple of the group size {}", want[0], n));
      want[0] /= n;
    }
    for (const auto* p : posts) {
      if (p->out_shape != want) return fail(fmt::format("outputs must be {}", shape_string(want)));
    }
    return "";
  }
  if (op == "all_to_all_v") {
    auto width = [](const Shape& s) {
      int64_t w = 1;
      for (size_t d = 1; d < s.size(); ++d) w *= s[d];
      return w;
    };
    const int64_t w0 = width(p0.in_shape);
    for (int64_t i = 0; i < n; ++i) {
      const auto& p = *posts[static_cast<size_t>(i)];
      if (p.in_shape.empty() || p.out_shape.empty()) return fail("0-d tensors have no rows");
      if (width(p.in_shape) != w0 || width(p.out_shape) != w0) return fail("row widths differ");
      if (static_cast<int64_t>(p.send_rows.size()) != n || static_cast<int64_t>(p.recv_rows.size()) != n) {
        return fail(fmt::format("send_rows and recv_rows need {} entries", n));
      }
      int64_t sent = 0, received = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t s = p.send_rows[static_cast<size_t>(j)], r = p.recv_rows[static_cast<size_t>(j)];
        if (s < 0 || r < 0) return fail("negative row counts");
        sent += s;
        received += r;
        if (posts[static_cast<size_t>(j)]->recv_rows.size() == static_cast<size_t>(n) &&
            posts[static_cast<size_t>(j)]->recv_rows[static_cast<size_t>(i)] != s) {
          return fail(fmt::format("rank {} sends {} rows to rank {}, which expects {}", g.ranks[static_cast<size_t>(i)],
                                  s, g.ranks[static_cast<size_t>(j)],
                                  posts[static_cast<size_t>(j)]->recv_rows[static_cast<size_t>(i)]));
        }
      }
      if (sent != p.in_shape[0]) {
        return fail(fmt::format("rank {} sends {} rows but its input has {}", g.ranks[static_cast<size_t>(i)], sent,
                                p.in_shape[0]));
      }
      if (received != p.out_shape[0]) {
        return fail(fmt::format("rank {} receives {} rows but its output has {}", g.ranks[static_cast<size_t>(i)],
                                received, p.out_shape[0]));
      }
    }
    return "";
  }
  return "";
}

}  // namespace comm_detail

}  // namespace paritron::opt
