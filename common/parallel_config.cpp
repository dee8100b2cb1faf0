#include "common/parallel_config.h"

#include <algorithm>
#include <charconv>
#include <map>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/strict_json.h"
#include "common/transformer_config.h"

namespace paritron {

std::string ParallelConfig::layout_name() const {
  std::string name = fmt::format("tp{}-pp{}-dp{}-cp{}-ep{}", tensor_model_parallel_size, pipeline_model_parallel_size,
                                 data_parallel_size, context_parallel_size, expert_model_parallel_size);
  if (virtual_pipeline_model_parallel_size) name += fmt::format("-vp{}", *virtual_pipeline_model_parallel_size);
  if (sequence_parallel) name += "-sp";
  return name;
}

ParallelConfig ParallelConfig::parse_layout(std::string_view layout) {
  ParallelConfig pc;
  const std::map<std::string_view, int64_t*> sizes = {
      {"tp", &pc.tensor_model_parallel_size}, {"pp", &pc.pipeline_model_parallel_size},
      {"dp", &pc.data_parallel_size},         {"cp", &pc.context_parallel_size},
      {"ep", &pc.expert_model_parallel_size}};
  const auto bad = [&](std::string_view part, std::string_view why) {
    return ConfigError("layout", fmt::format("\"{}\"", layout), fmt::format("part \"{}\" {}", part, why));
  };
  if (layout.empty()) throw ConfigError("layout", "\"\"", "is empty; expected e.g. tp2-pp1-dp2-cp1-ep1-sp");
  std::set<std::string_view> seen;
  size_t begin = 0;
  while (begin <= layout.size()) {
    const size_t end = std::min(layout.find('-', begin), layout.size());
    const std::string_view part = layout.substr(begin, end - begin);
    begin = end + 1;
    const std::string_view key = part.substr(0, 2);
    if (!seen.insert(key).second) throw bad(part, "is given twice");
    if (part == "sp") {
      pc.sequence_parallel = true;
      continue;
    }
    const std::string_view digits = part.size() > 2 ? part.substr(2) : std::string_view{};
    int64_t value = 0;
    const auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
    const bool number_ok = !digits.empty() && ec == std::errc{} && ptr == digits.data() + digits.size();
    if (key == "vp") {
      if (!number_ok) throw bad(part, "needs a size, e.g. vp2");
      pc.virtual_pipeline_model_parallel_size = value;
      continue;
    }
    const auto it = sizes.find(key);
    if (it == sizes.end()) throw bad(part, "is unknown; expected tpN, ppN, dpN, cpN, epN, vpN or sp");
    if (!number_ok) throw bad(part, fmt::format("needs a size, e.g. {}2", key));
    *it->second = value;
  }
  return pc;
}

namespace {
// Layouts past this many ranks are refused: it keeps every rank product in
// int64 range (and no machine has more).
constexpr int64_t kMaxWorldSize = int64_t{1} << 31;

// The fields of TransformerConfig that a layout sets.
bool is_layout_field(const std::string& field) {
  return field == "tensor_model_parallel_size" || field == "pipeline_model_parallel_size" ||
         field == "virtual_pipeline_model_parallel_size" || field == "context_parallel_size" ||
         field == "expert_model_parallel_size" || field == "sequence_parallel";
}

// Sizes >= 1 and a world that fits: what the rank arithmetic needs.
std::vector<ConfigIssue> arithmetic_issues(const ParallelConfig& pc) {
  std::vector<ConfigIssue> issues;
  const std::pair<const char*, int64_t> sizes[] = {
      {"tensor_model_parallel_size", pc.tensor_model_parallel_size},
      {"pipeline_model_parallel_size", pc.pipeline_model_parallel_size},
      {"context_parallel_size", pc.context_parallel_size},
      {"expert_model_parallel_size", pc.expert_model_parallel_size},
      {"data_parallel_size", pc.data_parallel_size}};
  int64_t world = 1;
  bool sizes_ok = true;
  for (const auto& [name, size] : sizes) {
    if (size < 1) {
      issues.push_back({name, std::to_string(size), "must be >= 1"});
      sizes_ok = false;
    } else {
      world = size > kMaxWorldSize / world ? kMaxWorldSize + 1 : world * size;
    }
  }
  if (pc.virtual_pipeline_model_parallel_size && *pc.virtual_pipeline_model_parallel_size < 1) {
    issues.push_back({"virtual_pipeline_model_parallel_size", std::to_string(*pc.virtual_pipeline_model_parallel_size),
                      "must be >= 1"});
  }
  if (sizes_ok && world > kMaxWorldSize) {
    issues.push_back({"data_parallel_size", std::to_string(pc.data_parallel_size),
                      fmt::format("makes the world tp * cp * dp * pp larger than {} ranks", kMaxWorldSize)});
  }
  return issues;
}

// The rank functions divide by the sizes: refuse a layout they cannot handle.
void require_arithmetic(const ParallelConfig& pc) {
  std::vector<ConfigIssue> issues = arithmetic_issues(pc);
  if (!issues.empty()) throw ConfigError(std::move(issues));
}
}  // namespace

int64_t ParallelConfig::world_size() const {
  require_arithmetic(*this);
  return tensor_model_parallel_size * context_parallel_size * data_parallel_size * pipeline_model_parallel_size;
}

std::vector<ConfigIssue> ParallelConfig::check() const {
  std::vector<ConfigIssue> issues = arithmetic_issues(*this);
  if (!issues.empty()) return issues;
  // initialize_model_parallel: EP is carved out of DP (dp is not a config field).
  if (data_parallel_size % expert_model_parallel_size != 0) {
    issues.push_back({"data_parallel_size", std::to_string(data_parallel_size),
                      fmt::format("must be divisible by expert_model_parallel_size ({})", expert_model_parallel_size)});
  }
  // The rules between the parallel sizes themselves (SP needs TP, EP with TP
  // needs SP, VP needs pp > 2, no EP with CP) are TransformerConfig's: written
  // once there, evaluated here on an empty model and kept when they are about
  // the layout's fields, so check_fits() reports each of them once.
  TransformerConfig empty_model = with_parallel(TransformerConfig{}, *this);
  for (ConfigIssue& issue : check_config(empty_model)) {
    if (is_layout_field(issue.field)) issues.push_back(std::move(issue));
  }
  return issues;
}

void ParallelConfig::validate() const {
  std::vector<ConfigIssue> issues = check();
  if (!issues.empty()) throw ConfigError(std::move(issues));
}

RankCoordinates rank_coordinates(const ParallelConfig& pc, int64_t rank) {
  const int64_t world = pc.world_size();  // refuses layouts the arithmetic below cannot handle
  if (rank < 0 || rank >= world) {
    throw Error(fmt::format("rank {} is outside the world of {} ranks ({})", rank, world, pc.layout_name()));
  }
  RankCoordinates c;
  const int64_t tp = pc.tensor_model_parallel_size, cp = pc.context_parallel_size, dp = pc.data_parallel_size;
  c.tp = rank % tp;
  c.cp = (rank / tp) % cp;
  c.dp = (rank / (tp * cp)) % dp;
  c.pp = rank / (tp * cp * dp);
  c.ep = c.dp % pc.expert_model_parallel_size;
  c.edp = c.dp / pc.expert_model_parallel_size;
  return c;
}

int64_t global_rank(const ParallelConfig& pc, int64_t tp, int64_t cp, int64_t dp, int64_t pp) {
  require_arithmetic(pc);
  const int64_t TP = pc.tensor_model_parallel_size, CP = pc.context_parallel_size, DP = pc.data_parallel_size;
  if (tp < 0 || tp >= TP || cp < 0 || cp >= CP || dp < 0 || dp >= DP || pp < 0 || pp >= pc.pipeline_model_parallel_size) {
    throw Error(fmt::format("coordinates tp={} cp={} dp={} pp={} are outside layout {}", tp, cp, dp, pp, pc.layout_name()));
  }
  return tp + TP * (cp + CP * (dp + DP * pp));
}

std::string_view group_name(GroupKind kind) {
  switch (kind) {
    case GroupKind::kTensor: return "tensor";
    case GroupKind::kContext: return "context";
    case GroupKind::kData: return "data";
    case GroupKind::kDataWithContext: return "data_with_context";
    case GroupKind::kPipeline: return "pipeline";
    case GroupKind::kModel: return "model";
    case GroupKind::kEmbedding: return "embedding";
    case GroupKind::kTensorAndData: return "tensor_and_data";
    case GroupKind::kTensorDataContext: return "tensor_data_context";
    case GroupKind::kTensorAndExpert: return "tensor_and_expert";
    case GroupKind::kExpert: return "expert";
    case GroupKind::kDataModuloExpert: return "data_modulo_expert";
  }
  return "?";
}

namespace {
std::vector<int64_t> strided(int64_t begin, int64_t end, int64_t step) {
  std::vector<int64_t> out;
  for (int64_t r = begin; r < end; r += step) out.push_back(r);
  return out;
}
}  // namespace

// Each case follows the corresponding loop of initialize_model_parallel (0.5.0).
std::vector<int64_t> group_members(const ParallelConfig& pc, GroupKind kind, int64_t rank) {
  const RankCoordinates c = rank_coordinates(pc, rank);
  const int64_t tp = pc.tensor_model_parallel_size, cp = pc.context_parallel_size, dp = pc.data_parallel_size;
  const int64_t pp = pc.pipeline_model_parallel_size, ep = pc.expert_model_parallel_size;
  const int64_t stage_size = pc.world_size() / pp;  // num_pipeline_model_parallel_groups
  const int64_t stage_begin = c.pp * stage_size, stage_end = stage_begin + stage_size;
  const int64_t td = tp * dp;  // tensor_and_data_group_size (expert groups assume cp == 1)
  switch (kind) {
    case GroupKind::kTensor: return strided(rank - c.tp, rank - c.tp + tp, 1);
    case GroupKind::kData: return strided(stage_begin + (rank - stage_begin) % (tp * cp), stage_end, tp * cp);
    case GroupKind::kDataWithContext: return strided(stage_begin + c.tp, stage_end, tp);
    case GroupKind::kContext: {
      const int64_t begin = stage_begin + c.dp * tp * cp;
      return strided(begin + c.tp, begin + tp * cp, tp);
    }
    case GroupKind::kPipeline: return strided(rank % stage_size, pc.world_size(), stage_size);
    case GroupKind::kEmbedding: {
      std::vector<int64_t> pipeline = strided(rank % stage_size, pc.world_size(), stage_size);
      if (pipeline.size() > 1) return {pipeline.front(), pipeline.back()};
      return pipeline;
    }
    case GroupKind::kModel: {
      // The i-th member of every data-with-context group, groups ordered (pp, tp).
      const int64_t i = c.cp + cp * c.dp;
      std::vector<int64_t> out;
      for (int64_t p = 0; p < pp; ++p) {
        for (int64_t t = 0; t < tp; ++t) out.push_back(p * stage_size + t + tp * i);
      }
      return out;
    }
    case GroupKind::kTensorDataContext: return strided(stage_begin, stage_end, 1);
    case GroupKind::kTensorAndData: {
      std::vector<int64_t> out;
      for (int64_t k = 0; k < dp; ++k) {
        const int64_t begin = stage_begin + c.cp * tp + k * tp * cp;
        for (int64_t r = begin; r < begin + tp; ++r) out.push_back(r);
      }
      return out;
    }
    case GroupKind::kTensorAndExpert: {
      const int64_t begin = rank - (rank % td) % (tp * ep);
      return strided(begin, begin + tp * ep, 1);
    }
    case GroupKind::kExpert: {
      const int64_t begin = rank - (rank % td) % (tp * ep);
      return strided(begin + c.tp, begin + tp * ep, tp);
    }
    case GroupKind::kDataModuloExpert: {
      const int64_t block = rank - rank % td;
      return strided(block + (rank % td) % (tp * ep), block + td, tp * ep);
    }
  }
  return {};
}

std::vector<std::vector<int64_t>> all_groups(const ParallelConfig& pc, GroupKind kind) {
  std::vector<std::vector<int64_t>> groups;
  std::set<std::vector<int64_t>> seen;
  for (int64_t rank = 0; rank < pc.world_size(); ++rank) {
    std::vector<int64_t> members = group_members(pc, kind, rank);
    if (seen.insert(members).second) groups.push_back(std::move(members));
  }
  return groups;
}

int64_t num_layers_to_build(const ParallelConfig& pc, int64_t num_layers) {
  require_arithmetic(pc);
  const int64_t per_stage = num_layers / pc.pipeline_model_parallel_size;
  return pc.virtual_pipeline_model_parallel_size ? per_stage / *pc.virtual_pipeline_model_parallel_size : per_stage;
}

// TransformerLayer._get_layer_offset (0.5.0).
int64_t layer_offset(const ParallelConfig& pc, int64_t num_layers, int64_t pp_rank, int64_t vp_rank) {
  require_arithmetic(pc);
  const int64_t pp = pc.pipeline_model_parallel_size;
  if (pp_rank < 0 || pp_rank >= pp) throw Error(fmt::format("pipeline rank {} outside pp={}", pp_rank, pp));
  const int64_t vp = pc.virtual_pipeline_model_parallel_size.value_or(1);
  if (vp_rank < 0 || vp_rank >= vp) throw Error(fmt::format("virtual pipeline rank {} outside vp={}", vp_rank, vp));
  if (pc.virtual_pipeline_model_parallel_size) {
    const int64_t per_chunk = (num_layers / pp) / vp;
    return vp_rank * (num_layers / vp) + pp_rank * per_chunk;
  }
  return pp_rank * (num_layers / pp);
}

std::vector<int64_t> stage_layers(const ParallelConfig& pc, int64_t num_layers, int64_t pp_rank, int64_t vp_rank) {
  const int64_t offset = layer_offset(pc, num_layers, pp_rank, vp_rank);
  return strided(offset, offset + num_layers_to_build(pc, num_layers), 1);
}

ParallelConfig parallel_from_config(const TransformerConfig& cfg, int64_t data_parallel_size) {
  ParallelConfig pc;
  pc.tensor_model_parallel_size = cfg.tensor_model_parallel_size;
  pc.pipeline_model_parallel_size = cfg.pipeline_model_parallel_size;
  pc.virtual_pipeline_model_parallel_size = cfg.virtual_pipeline_model_parallel_size;
  pc.context_parallel_size = cfg.context_parallel_size;
  pc.expert_model_parallel_size = cfg.expert_model_parallel_size;
  pc.data_parallel_size = data_parallel_size;
  pc.sequence_parallel = cfg.sequence_parallel;
  return pc;
}

TransformerConfig with_parallel(const TransformerConfig& cfg, const ParallelConfig& pc) {
  TransformerConfig out = cfg;
  out.tensor_model_parallel_size = pc.tensor_model_parallel_size;
  out.pipeline_model_parallel_size = pc.pipeline_model_parallel_size;
  out.virtual_pipeline_model_parallel_size = pc.virtual_pipeline_model_parallel_size;
  out.context_parallel_size = pc.context_parallel_size;
  out.expert_model_parallel_size = pc.expert_model_parallel_size;
  out.sequence_parallel = pc.sequence_parallel;
  // Megatron requires a pipeline dtype with pp > 1; activations travel in the
  // parameter dtype unless the config says otherwise.
  if (pc.pipeline_model_parallel_size > 1 && !out.pipeline_dtype) out.pipeline_dtype = out.params_dtype;
  return out;
}

std::vector<ConfigIssue> check_fits(const ParallelConfig& pc, const TransformerConfig& cfg) {
  std::vector<ConfigIssue> issues = pc.check();
  TransformerConfig sized = with_parallel(cfg, pc);
  std::set<std::string> seen;
  for (const ConfigIssue& i : issues) seen.insert(i.message());
  for (ConfigIssue& i : check_config(sized)) {
    if (seen.insert(i.message()).second) issues.push_back(std::move(i));
  }
  return issues;
}

std::vector<ConfigIssue> check_sequence_length(const ParallelConfig& pc, int64_t seq_length) {
  std::vector<ConfigIssue> issues;
  const std::string s = std::to_string(seq_length);
  if (seq_length < 1) {
    issues.push_back({"seq_length", s, "must be at least 1"});
    return issues;
  }
  if (pc.sequence_parallel && pc.tensor_model_parallel_size > 0 && seq_length % pc.tensor_model_parallel_size != 0) {
    issues.push_back({"seq_length", s, fmt::format("must be divisible by tensor_model_parallel_size ({}) with sequence_parallel",
                                                   pc.tensor_model_parallel_size)});
  }
  if (pc.context_parallel_size > 1 && seq_length % (2 * pc.context_parallel_size) != 0) {
    issues.push_back({"seq_length", s, fmt::format("must be divisible by 2 * context_parallel_size ({}): CP cuts it into 2*cp chunks",
                                                   2 * pc.context_parallel_size)});
  }
  return issues;
}

std::string parallel_to_json_text(const ParallelConfig& pc, int indent) {
  nlohmann::ordered_json j;
  j["tensor_model_parallel_size"] = pc.tensor_model_parallel_size;
  j["pipeline_model_parallel_size"] = pc.pipeline_model_parallel_size;
  j["virtual_pipeline_model_parallel_size"] =
      pc.virtual_pipeline_model_parallel_size ? nlohmann::ordered_json(*pc.virtual_pipeline_model_parallel_size) : nullptr;
  j["context_parallel_size"] = pc.context_parallel_size;
  j["expert_model_parallel_size"] = pc.expert_model_parallel_size;
  j["data_parallel_size"] = pc.data_parallel_size;
  j["sequence_parallel"] = pc.sequence_parallel;
  return j.dump(indent);
}

ParallelConfig parallel_from_json_text(std::string_view json_text) {
  const nlohmann::json j = parse_strict_json<nlohmann::json>(
      json_text, "parallel", {.what = "the layout", .fail = [](const std::string& problem) {
                                throw ConfigError("parallel", "", problem);
                              }});
  if (!j.is_object()) throw ConfigError("parallel", json_brief(j), "must be a JSON object");
  ParallelConfig pc;
  std::vector<ConfigIssue> issues;
  const std::map<std::string, int64_t*> sizes = {
      {"tensor_model_parallel_size", &pc.tensor_model_parallel_size},
      {"pipeline_model_parallel_size", &pc.pipeline_model_parallel_size},
      {"context_parallel_size", &pc.context_parallel_size},
      {"expert_model_parallel_size", &pc.expert_model_parallel_size},
      {"data_parallel_size", &pc.data_parallel_size}};
  for (const auto& [key, value] : j.items()) {
    if (auto it = sizes.find(key); it != sizes.end()) {
      if (const std::optional<int64_t> v = json_int64(value)) {
        *it->second = *v;
      } else {
        issues.push_back({key, json_brief(value), "must be an integer"});
      }
    } else if (key == "virtual_pipeline_model_parallel_size") {
      if (value.is_null()) continue;
      if (const std::optional<int64_t> v = json_int64(value)) {
        pc.virtual_pipeline_model_parallel_size = *v;
      } else {
        issues.push_back({key, json_brief(value), "must be an integer or null"});
      }
    } else if (key == "sequence_parallel") {
      if (!value.is_boolean()) {
        issues.push_back({key, json_brief(value), "must be true or false"});
      } else {
        pc.sequence_parallel = value.get<bool>();
      }
    } else {
      issues.push_back({key, json_brief(value),
                        "is not a parallel layout field (tensor_model_parallel_size, pipeline_model_parallel_size, "
                        "virtual_pipeline_model_parallel_size, context_parallel_size, expert_model_parallel_size, "
                        "data_parallel_size, sequence_parallel)"});
    }
  }
  if (!issues.empty()) throw ConfigError(std::move(issues));
  return pc;
}

}  // namespace paritron
