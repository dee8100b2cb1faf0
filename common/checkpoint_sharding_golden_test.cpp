// Paritron's sharding math (checkpoint_sharding.h) against what Megatron-core
// itself returns: every fixtures/golden/sharding/<version>/<layout>.json
// (written by fixtures/generate/make_golden_sharding.py, which runs
// Megatron's own sharded_state_dict() on every rank of a gloo world) is
// replayed with module_sharded_state_dict on every rank, and the two must
// agree per rank: the same keys, and per key the same pieces (global_shape,
// global_offset, axis_fragmentations, replica_id, prepend_axis_num,
// local_shape, allow_shape_mismatch, flattened_range) and the same
// ShardedObjects; for a block, also each of its layers through
// sharded_state_dict("transformer_layer", ..., layer_number). dtype is not compared: the generator runs with torch's
// default dtype float64, which changes the dtype of FusedLayerNorm / router
// parameters that Paritron models as float32 (checkpoint_sharding.cpp).
//
// Files under fixtures/golden/sharding/disagreements/ are known
// disagreements (see fixtures/README.md) and are skipped.
#include <algorithm>
#include <cctype>
#include <filesystem>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/checkpoint_sharding.h"
#include "common/file_io.h"
#include "common/parallel_config.h"
#include "common/transformer_config.h"

namespace paritron {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

const fs::path kGolden = fs::path(PARITRON_SOURCE_DIR) / "fixtures" / "golden" / "sharding";

std::vector<fs::path> golden_files() {
  std::vector<fs::path> out;
  if (!fs::exists(kGolden)) return out;
  for (auto it = fs::recursive_directory_iterator(kGolden); it != fs::recursive_directory_iterator(); ++it) {
    if (it->is_directory() && it->path().filename() == "disagreements") {
      it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file() && it->path().extension() == ".json") out.push_back(it->path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string test_name(const fs::path& p) {
  std::string s = fs::relative(p, kGolden).replace_extension().string();
  for (char& c : s) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return s;
}

std::string show(const ShardedTensor& t) {
  return sharded_tensors_to_json(std::span<const ShardedTensor>(&t, 1));
}
std::string show(const ShardedObject& o) {
  return sharded_objects_to_json(std::span<const ShardedObject>(&o, 1));
}

// The compared fields of a ShardedTensor (everything but key and dtype).
std::string tensor_signature(const ShardedTensor& t) {
  ShardedTensor c = t;
  c.dtype.reset();
  return show(c);
}

// Per key, the sorted signatures of its pieces (a GLU fc1 weight has two).
template <class T, class Sig>
std::map<std::string, std::vector<std::string>> by_key(const std::vector<T>& items, Sig sig) {
  std::map<std::string, std::vector<std::string>> out;
  for (const T& x : items) out[x.key].push_back(sig(x));
  for (auto& [k, v] : out) std::sort(v.begin(), v.end());
  return out;
}

// Differences between Megatron's and Paritron's entries of one rank, one line each.
std::vector<std::string> diff(const std::map<std::string, std::vector<std::string>>& megatron,
                              const std::map<std::string, std::vector<std::string>>& paritron, const char* what) {
  std::vector<std::string> out;
  std::set<std::string> keys;
  for (const auto& [k, v] : megatron) keys.insert(k);
  for (const auto& [k, v] : paritron) keys.insert(k);
  for (const std::string& k : keys) {
    auto m = megatron.find(k);
    auto p = paritron.find(k);
    if (p == paritron.end()) {
      out.push_back(fmt::format("{} {}: only in Megatron: {}", what, k, fmt::join(m->second, " ")));
    } else if (m == megatron.end()) {
      out.push_back(fmt::format("{} {}: only in Paritron: {}", what, k, fmt::join(p->second, " ")));
    } else if (m->second != p->second) {
      out.push_back(fmt::format("{} {}:\n      Megatron {}\n      Paritron {}", what, k, fmt::join(m->second, " "),
                                fmt::join(p->second, " ")));
    }
  }
  return out;
}

class ShardingGolden : public ::testing::TestWithParam<fs::path> {};

TEST_P(ShardingGolden, MatchesMegatron) {
  const fs::path path = GetParam();
  const Json doc = Json::parse(read_text_file(path));
  const std::string component = doc.at("component").get<std::string>();
  const std::string prefix = doc.at("prefix").get<std::string>();
  const LoadedConfig loaded = config_from_json_text(doc.at("config").dump());
  const TransformerConfig& cfg = loaded.config;
  const ParallelConfig pc = parallel_from_json_text(doc.at("parallel").dump());
  // 0.5.x's TransformerBlock final norm is TENorm only: the generator builds it with
  // post_layer_norm=False, which Paritron's block does not model; drop its entries.
  const bool drop_final_norm = component == "transformer_block" && doc.contains("post_layer_norm") &&
                               !doc.at("post_layer_norm").get<bool>();
  const std::string final_norm = prefix + "final_layernorm.";

  // Behaviour that changed between releases without a config field (checkpoint_sharding.h).
  ShardingOptions options;
  const std::string version = doc.at("megatron_core").get<std::string>();
  const int minor = std::stoi(version.substr(version.find('.') + 1));
  options.glu_fc1_bias_factory = version.rfind("0.", 0) != 0 || minor >= 8;
  const Json& ranks = doc.at("ranks");
  ASSERT_EQ(static_cast<int64_t>(ranks.size()), pc.world_size()) << path;
  std::vector<std::vector<ShardedTensor>> megatron_all;
  std::vector<std::vector<ShardedObject>> megatron_objects_all;
  std::vector<std::string> problems;
  for (const Json& r : ranks) {
    const int64_t rank = r.at("rank").get<int64_t>();
    const std::vector<ShardedTensor> megatron = sharded_tensors_from_json(r.at("tensors").dump());
    const std::vector<ShardedObject> megatron_objects = sharded_objects_from_json(r.at("objects").dump());
    megatron_all.push_back(megatron);
    megatron_objects_all.push_back(megatron_objects);

    ShardedStateDict paritron = module_sharded_state_dict(component, cfg, pc, rank, prefix, {}, options);
    if (drop_final_norm) {
      std::erase_if(paritron.tensors, [&](const ShardedTensor& t) { return t.key.starts_with(final_norm); });
      std::erase_if(paritron.objects, [&](const ShardedObject& o) { return o.key.starts_with(final_norm); });
    }
    for (std::string& d : diff(by_key(megatron, tensor_signature), by_key(paritron.tensors, tensor_signature),
                               "tensor")) {
      problems.push_back(fmt::format("rank {}: {}", rank, d));
    }
    // A block's layers one at a time: sharded_state_dict("transformer_layer", ...,
    // layer_number) is what the block emits for that layer.
    if (component == "transformer_block") {
      std::vector<ShardedTensor> layers;
      for (const Json& n : r.at("layer_numbers")) {
        for (ShardedTensor& t : sharded_state_dict("transformer_layer", cfg, pc, rank, prefix, n.get<int64_t>(), options)) {
          layers.push_back(std::move(t));
        }
      }
      std::vector<ShardedTensor> megatron_layers;
      std::copy_if(megatron.begin(), megatron.end(), std::back_inserter(megatron_layers),
                   [&](const ShardedTensor& t) { return t.key.starts_with(prefix + "layers."); });
      for (std::string& d : diff(by_key(megatron_layers, tensor_signature), by_key(layers, tensor_signature),
                                 "layer_number tensor")) {
        problems.push_back(fmt::format("rank {}: {}", rank, d));
      }
    }
    const auto object_sig = [](const ShardedObject& o) { return show(o); };
    for (std::string& d :
         diff(by_key(megatron_objects, object_sig), by_key(paritron.objects, object_sig), "object")) {
      problems.push_back(fmt::format("rank {}: {}", rank, d));
    }
  }
  std::ostringstream report;
  for (const std::string& p : problems) report << "  " << p << "\n";
  EXPECT_TRUE(problems.empty()) << path.string() << " (megatron-core " << doc.at("megatron_core").get<std::string>()
                                << ", " << pc.layout_name() << "): " << problems.size()
                                << " difference(s), Megatron vs Paritron:\n"
                                << report.str();

  // Megatron's own shards pass Paritron's integrity checks.
  EXPECT_EQ(check_sharding_integrity(megatron_all), std::vector<std::string>{}) << path;
  EXPECT_EQ(check_object_integrity(megatron_objects_all), std::vector<std::string>{}) << path;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ShardingGolden, ::testing::ValuesIn(golden_files()),
                         [](const ::testing::TestParamInfo<fs::path>& info) { return test_name(info.param); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(ShardingGolden);

TEST(ShardingGoldenFiles, Present) {
  // The generator writes four layouts for each of two Megatron versions (known
  // disagreements included).
  size_t all = 0;
  if (fs::exists(kGolden)) {
    for (const auto& e : fs::recursive_directory_iterator(kGolden)) {
      if (e.is_regular_file() && e.path().extension() == ".json") ++all;
    }
  }
  EXPECT_GE(all, 8u) << "golden sharding files under " << kGolden;
}

}  // namespace
}  // namespace paritron
