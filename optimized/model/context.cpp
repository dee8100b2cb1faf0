#include "optimized/model/context.h"

#include <fmt/format.h>

#include "common/error.h"
#include "common/rng.h"

namespace paritron::opt {
namespace {

Group group_of(const ParallelConfig& pc, GroupKind kind, int64_t rank, std::string name) {
  Group g;
  g.name = std::move(name);
  g.ranks = group_members(pc, kind, rank);
  for (size_t i = 0; i < g.ranks.size(); ++i) {
    if (g.ranks[i] == rank) g.index = static_cast<int64_t>(i);
  }
  return g;
}

}  // namespace

ParallelState make_parallel_state(const ParallelConfig& pc, int64_t rank) {
  pc.validate();
  ParallelState s;
  s.pc = pc;
  s.rank = rank;
  s.coord = rank_coordinates(pc, rank);
  s.world = world_group(pc.world_size(), rank);
  s.tp = group_of(pc, GroupKind::kTensor, rank, "tp");
  s.cp = group_of(pc, GroupKind::kContext, rank, "cp");
  s.dp = group_of(pc, GroupKind::kData, rank, "dp");
  s.dp_cp = group_of(pc, GroupKind::kDataWithContext, rank, "dp_cp");
  s.pp = group_of(pc, GroupKind::kPipeline, rank, "pp");
  s.ep = group_of(pc, GroupKind::kExpert, rank, "ep");
  s.edp = group_of(pc, GroupKind::kDataModuloExpert, rank, "edp");
  return s;
}

std::vector<int64_t> context_parallel_positions(int64_t s, int64_t cp, int64_t cp_rank) {
  std::vector<int64_t> pos;
  if (cp == 1) {
    for (int64_t i = 0; i < s; ++i) pos.push_back(i);
    return pos;
  }
  if (s % (2 * cp) != 0) throw Error(fmt::format("context parallel size {} needs s divisible by {} (s = {})", cp, 2 * cp, s));
  const int64_t chunk = s / (2 * cp);
  for (int64_t c : {cp_rank, 2 * cp - 1 - cp_rank}) {
    for (int64_t i = 0; i < chunk; ++i) pos.push_back(c * chunk + i);
  }
  return pos;
}

std::vector<int64_t> TokenLayout::sp_positions() const {
  return {seq.begin() + sp_begin, seq.begin() + sp_begin + sp_count};
}

std::vector<int64_t> TokenLayout::hidden_token_rows() const {
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(hidden_rows()));
  for (int64_t i = sp_begin; i < sp_begin + sp_count; ++i) {
    for (int64_t j = 0; j < b_local; ++j) rows.push_back(seq[static_cast<size_t>(i)] * b_global + batch_offset + j);
  }
  return rows;
}

ModelContext::ModelContext(Backend& backend, Comm& comm_, ParallelState state, TransformerConfig config, DType dt)
    : be(backend),
      comm(comm_),
      ps(std::move(state)),
      cfg(std::move(config)),
      dtype(dt),
      grad_dtype(dt == DType::F64 ? DType::F64 : DType::F32) {}

Param& ModelContext::param(const std::string& key) {
  auto it = params.find(key);
  if (it == params.end()) throw Error(fmt::format("the optimized model needs the parameter {}, which the case lacks", key));
  return it->second;
}

const DTensor* ModelContext::param_or_null(const std::string& key) {
  auto it = params.find(key);
  return it == params.end() ? nullptr : &it->second.value;
}

math::RngKey ModelContext::key(const std::string& purpose, const std::string& path) const {
  return rng_key(seed, path.empty() ? purpose : purpose + "." + path);
}

}  // namespace paritron::opt
