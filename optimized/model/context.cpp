#include "optimized/model/context.h"

#include <fmt/format.h>

#include "common/error.h"
#include "common/rng.h"
#include "optimized/comm/groups.h"

namespace paritron::opt {

ParallelState make_parallel_state(const ParallelConfig& pc, int64_t rank) {
  pc.validate();
  ParallelState s;
  s.pc = pc;
  s.rank = rank;
  s.coord = rank_coordinates(pc, rank);
  s.world = world_group(pc.world_size(), rank);
  s.tp = make_group(pc, GroupKind::kTensor, rank);
  s.cp = make_group(pc, GroupKind::kContext, rank);
  s.dp = make_group(pc, GroupKind::kData, rank);
  s.dp_cp = make_group(pc, GroupKind::kDataWithContext, rank);
  s.pp = make_group(pc, GroupKind::kPipeline, rank);
  s.ep = make_group(pc, GroupKind::kExpert, rank);
  s.edp = make_group(pc, GroupKind::kDataModuloExpert, rank);
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
