// See profile.h: the profile files' keys, their loader and where they live.
#include "parity/profile.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "common/error.h"
#include "common/transformer_config.h"
#include "parity/generators.h"

namespace paritron::parity {
namespace fs = std::filesystem;
namespace {

std::vector<ChoiceValue> bools() { return {false, true}; }
std::vector<ChoiceValue> numbers(std::initializer_list<double> v) { return std::vector<ChoiceValue>(v.begin(), v.end()); }
std::vector<ChoiceValue> strings(std::initializer_list<const char*> v) {
  std::vector<ChoiceValue> out;
  for (const char* s : v) out.emplace_back(s);
  return out;
}
std::vector<ChoiceValue> with_null(std::vector<ChoiceValue> v) {
  v.insert(v.begin(), ChoiceValue());
  return v;
}

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) {
    if (!out.empty()) out += ", ";
    out += s;
  }
  return out;
}

std::string domain_text(const std::vector<ChoiceValue>& domain) {
  std::vector<std::string> t;
  for (const auto& v : domain) t.push_back(choice_value_text(v));
  return joined(t);
}

ChoiceValue to_choice(const nlohmann::json& j, const std::string& where) {
  if (j.is_null()) return ChoiceValue();
  if (j.is_boolean()) return ChoiceValue(j.get<bool>());
  if (j.is_number()) return ChoiceValue(j.get<double>());
  if (j.is_string()) return ChoiceValue(j.get<std::string>());
  throw Error(fmt::format("{}: {} is not null, a bool, a number or a string", where, j.dump()));
}

std::vector<std::string> string_list(const nlohmann::json& j, const std::string& where) {
  if (!j.is_array()) throw Error(fmt::format("{}: expected a list, got {}", where, j.dump()));
  if (j.empty()) throw Error(fmt::format("{}: empty list (leave the key out to allow everything)", where));
  std::vector<std::string> out;
  for (const auto& e : j) {
    if (!e.is_string()) throw Error(fmt::format("{}: {} is not a string", where, e.dump()));
    out.push_back(e.get<std::string>());
  }
  return out;
}

fs::path exe_dir() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  return ec ? fs::path() : exe.parent_path();
}

fs::path find_upward(fs::path dir) {
  std::error_code ec;
  for (int depth = 0; !dir.empty() && depth < 12; ++depth) {
    const fs::path candidate = dir / "fixtures" / "profiles";
    if (fs::is_directory(candidate, ec)) return candidate;
    if (dir == dir.parent_path()) break;
    dir = dir.parent_path();
  }
  return {};
}

}  // namespace

std::string choice_value_text(const ChoiceValue& v) {
  switch (v.kind) {
    case ChoiceValue::Kind::Null: return "null";
    case ChoiceValue::Kind::Bool: return v.boolean ? "true" : "false";
    case ChoiceValue::Kind::Number: return fmt::format("{}", v.number);
    case ChoiceValue::Kind::String: return v.text;
  }
  return "";
}

const std::map<std::string, std::vector<ChoiceValue>>& profile_choice_domains() {
  static const std::map<std::string, std::vector<ChoiceValue>> d = [] {
    std::vector<std::string> acts(kActivationNames.begin(), kActivationNames.end());
    std::vector<ChoiceValue> activations;
    for (const auto& a : acts) activations.emplace_back(std::string(a));
    return std::map<std::string, std::vector<ChoiceValue>>{
        // MoE on/off for transformer_layer / transformer_block (false: also no
        // moe_router / moe_layer components; true: only MoE layers)
        {"moe", bools()},
        // drawn layouts (ignored with a fixed --layout)
        {"tp", numbers({1, 2, 4})},
        {"pp", numbers({1, 2, 4})},
        {"vp", bools()},
        {"cp", numbers({1, 2})},
        {"dp", numbers({1, 2, 4})},
        {"ep", numbers({1, 2, 4})},
        {"sp", bools()},
        // architecture
        {"rotary_percent", numbers({1.0, 0.5, 0.25})},
        {"rotary_interleaved", bools()},
        {"kv_channels_explicit", bools()},  // false: hidden = heads * kv_channels, kv_channels derived
        {"ffn_hidden_size_4h", bools()},    // true: ffn_hidden_size left to its 4h default
        {"normalization", strings({"LayerNorm", "RMSNorm"})},
        {"layernorm_zero_centered_gamma", bools()},
        {"layernorm_epsilon", numbers({1e-5, 1e-6, 1e-3})},
        {"gated_linear_unit", bools()},
        {"activation_func", activations},
        {"add_bias_linear", bools()},
        {"add_qkv_bias", bools()},
        {"bias_activation_fusion", bools()},  // where it applies (gelu + bias, silu + GLU)
        {"apply_query_key_layer_scaling", bools()},
        {"softmax_scale", with_null(numbers({0.5, 0.25, 1.0}))},
        {"hidden_dropout", numbers({0.0, 0.1})},
        {"attention_dropout", numbers({0.0, 0.1})},
        {"init_method_std", numbers({0.02, 0.2})},
        // MoE router and experts
        {"router", strings({"aux_loss", "none", "sinkhorn"})},  // moe_router_load_balancing_type
        {"moe_aux_loss_coeff", numbers({0.0, 0.01, 0.1})},
        {"moe_z_loss_coeff", with_null(numbers({1e-3, 0.1}))},
        {"moe_input_jitter_eps", with_null(numbers({0.01}))},
        {"moe_expert_capacity_factor", with_null(numbers({1.0, 0.5, 2.0}))},
        {"moe_pad_expert_input_to_capacity", bools()},
        {"moe_token_drop_policy", strings({"probs", "position"})},
        {"moe_router_pre_softmax", bools()},
        {"moe_router_dtype", with_null(strings({"fp32", "fp64"}))},
        {"moe_ffn_hidden_size_explicit", bools()},
        {"fp8", strings({"e4m3", "hybrid"})},  // config.fp8 of fp8 cases
        // mask, window, rotary embedding, mode
        {"mask", strings({"causal", "no_mask", "padding"})},
        {"explicit_mask", bools()},
        {"window", bools()},  // a sliding window
        {"rotary", bools()},  // rotary embedding (self_attention, layers)
        {"training", bools()},
    };
  }();
  return d;
}

const std::map<std::string, RangeDomain>& profile_range_domains() {
  static const std::map<std::string, RangeDomain> d = {
      {"heads", {{1, 8}, {1, 16}, "num_attention_heads"}},
      {"heads_per_group", {{1, 8}, {1, 16}, "num_attention_heads / num_query_groups (1: MHA, > 1: GQA)"}},
      {"kv_channels", {{2, 8}, {2, 32}, "the head dimension (kv_channels, explicit or derived)"}},
      {"hidden_size", {{4, 16}, {4, 64}, "hidden_size where kv_channels is explicit (else heads * kv_channels; at least 4)"}},
      {"ffn_hidden_size", {{1, 16}, {1, 32}, "an explicit ffn_hidden_size (a multiple of tp)"}},
      {"num_layers", {{1, 16}, {1, 16}, "num_layers (a block's: a multiple of pp * vp)"}},
      {"experts", {{2, 8}, {2, 16}, "num_moe_experts (a multiple of ep)"}},
      {"topk", {{1, 4}, {1, 4}, "moe_router_topk"}},
      {"moe_ffn_hidden_size", {{1, 16}, {1, 32}, "an explicit moe_ffn_hidden_size (a multiple of tp)"}},
      {"seq", {{1, 8}, {1, 64}, "the sequence length (a multiple of what cp / sp need)"}},
      {"batch", {{1, 8}, {1, 16}, "the micro-batch size (a multiple of dp)"}},
  };
  return d;
}

bool Profile::allows(const std::string& key, const ChoiceValue& value) const {
  if (!profile_choice_domains().contains(key)) throw std::logic_error("Profile::allows: unknown choice key " + key);
  auto it = choices.find(key);
  if (it == choices.end()) return true;
  return std::find(it->second.begin(), it->second.end(), value) != it->second.end();
}

const IntRange* Profile::range(const std::string& key) const {
  if (!profile_range_domains().contains(key)) throw std::logic_error("Profile::range: unknown range key " + key);
  auto it = ranges.find(key);
  return it == ranges.end() ? nullptr : &it->second;
}

bool Profile::allows_component(const std::string& c) const {
  return components.empty() || std::find(components.begin(), components.end(), c) != components.end();
}

bool Profile::allows_dtype(DType d) const {
  return dtypes.empty() || std::find(dtypes.begin(), dtypes.end(), d) != dtypes.end();
}

Profile parse_profile(const std::string& text, const std::string& source, const std::string& default_name) {
  auto fail = [&](const std::string& what) { return Error(fmt::format("profile {}: {}", source, what)); };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text, nullptr, true, /*ignore_comments=*/true);
  } catch (const nlohmann::json::parse_error& e) {
    throw fail(fmt::format("malformed JSON: {}", e.what()));
  }
  if (!j.is_object()) throw fail("expected a JSON object");
  Profile p;
  p.source = source;
  p.name = default_name;
  static const std::vector<std::string> keys = {"name",  "description", "components", "dtypes", "max_world_size",
                                                "large", "ranges",      "choices"};
  try {
    for (const auto& [key, value] : j.items()) {
      if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
        throw Error(fmt::format("unknown key '{}' (expected one of: {})", key, joined(keys)));
      }
    }
    if (j.contains("name")) {
      if (!j["name"].is_string()) throw Error("\"name\" must be a string");
      p.name = j["name"].get<std::string>();
    }
    if (j.contains("description")) {
      if (!j["description"].is_string()) throw Error("\"description\" must be a string");
      p.description = j["description"].get<std::string>();
    }
    if (j.contains("components")) {
      const auto& all = generated_components();
      for (const std::string& c : string_list(j["components"], "components")) {
        if (std::find(all.begin(), all.end(), c) == all.end()) {
          throw Error(fmt::format("components: unknown component '{}' (expected: {})", c, joined(all)));
        }
        p.components.push_back(c);
      }
    }
    if (j.contains("dtypes")) {
      for (const std::string& d : string_list(j["dtypes"], "dtypes")) p.dtypes.push_back(parse_spec_dtype(d));
    }
    if (j.contains("max_world_size")) {
      const auto& w = j["max_world_size"];
      if (!w.is_number_integer() || w.get<int64_t>() < 1 || w.get<int64_t>() > 64) {
        throw Error(fmt::format("max_world_size: expected an integer in [1, 64], got {}", w.dump()));
      }
      p.max_world_size = w.get<int64_t>();
    }
    if (j.contains("large")) {
      if (!j["large"].is_boolean()) throw Error("\"large\" must be true or false");
      p.large = j["large"].get<bool>();
    }
    const bool large = p.large.value_or(false);
    if (j.contains("ranges")) {
      if (!j["ranges"].is_object()) throw Error("\"ranges\" must be an object of [lo, hi] pairs");
      for (const auto& [key, value] : j["ranges"].items()) {
        auto dom = profile_range_domains().find(key);
        if (dom == profile_range_domains().end()) {
          std::vector<std::string> names;
          for (const auto& [k, _] : profile_range_domains()) names.push_back(k);
          throw Error(fmt::format("ranges: unknown key '{}' (expected one of: {})", key, joined(names)));
        }
        if (!value.is_array() || value.size() != 2 || !value[0].is_number_integer() || !value[1].is_number_integer()) {
          throw Error(fmt::format("ranges.{}: expected [lo, hi] (integers), got {}", key, value.dump()));
        }
        const IntRange r{value[0].get<int64_t>(), value[1].get<int64_t>()};
        if (r.lo > r.hi) throw Error(fmt::format("ranges.{}: lo {} > hi {}", key, r.lo, r.hi));
        const IntRange g = large ? dom->second.large : dom->second.small;
        if (r.lo < g.lo || r.hi > g.hi) {
          std::string hint;
          if (!large && r.hi <= dom->second.large.hi && r.lo >= dom->second.large.lo) {
            hint = fmt::format(" (\"large\": true allows up to {})", dom->second.large.hi);
          }
          throw Error(fmt::format("ranges.{}: [{}, {}] is outside the generator's range [{}, {}] of {}{}", key, r.lo,
                                  r.hi, g.lo, g.hi, dom->second.description, hint));
        }
        p.ranges[key] = r;
      }
    }
    if (j.contains("choices")) {
      if (!j["choices"].is_object()) throw Error("\"choices\" must be an object of lists");
      for (const auto& [key, value] : j["choices"].items()) {
        auto dom = profile_choice_domains().find(key);
        if (dom == profile_choice_domains().end()) {
          std::vector<std::string> names;
          for (const auto& [k, _] : profile_choice_domains()) names.push_back(k);
          throw Error(fmt::format("choices: unknown key '{}' (expected one of: {})", key, joined(names)));
        }
        if (!value.is_array()) throw Error(fmt::format("choices.{}: expected a list, got {}", key, value.dump()));
        if (value.empty()) {
          throw Error(fmt::format("choices.{}: empty list (leave the key out to allow everything: {})", key,
                                  domain_text(dom->second)));
        }
        std::vector<ChoiceValue> allowed;
        for (const auto& e : value) {
          const ChoiceValue v = to_choice(e, "choices." + key);
          if (std::find(dom->second.begin(), dom->second.end(), v) == dom->second.end()) {
            throw Error(fmt::format("choices.{}: {} is not one of the generator's values ({})", key, e.dump(),
                                    domain_text(dom->second)));
          }
          allowed.push_back(v);
        }
        p.choices[key] = std::move(allowed);
      }
    }
  } catch (const Error& e) {
    throw fail(e.what());
  }
  if (p.name.empty()) throw fail("no \"name\"");
  return p;
}

std::string profiles_dir() {
  std::error_code ec;
  if (const char* env = std::getenv("PARITRON_PROFILES_DIR"); env != nullptr && *env != '\0') return env;
#ifdef PARITRON_PROFILES_DIR
  if (fs::is_directory(PARITRON_PROFILES_DIR, ec)) return PARITRON_PROFILES_DIR;
#endif
  if (fs::path d = find_upward(fs::current_path(ec)); !d.empty()) return d.string();
  if (fs::path d = find_upward(exe_dir()); !d.empty()) return d.string();
  return {};
}

std::vector<std::string> available_profiles() {
  std::vector<std::string> names;
  const std::string dir = profiles_dir();
  std::error_code ec;
  if (dir.empty() || !fs::is_directory(dir, ec)) return names;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (entry.path().extension() == ".json") names.push_back(entry.path().stem().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

Profile load_profile(const std::string& name_or_path) {
  fs::path path;
  const bool is_path = name_or_path.find('/') != std::string::npos ||
                       (name_or_path.size() >= 5 && name_or_path.ends_with(".json"));
  if (is_path) {
    path = name_or_path;
  } else {
    const std::string dir = profiles_dir();
    const std::vector<std::string> names = available_profiles();
    if (std::find(names.begin(), names.end(), name_or_path) == names.end()) {
      throw Error(fmt::format("unknown profile '{}' (available: {}; profiles live in {})", name_or_path,
                              names.empty() ? std::string("none") : joined(names),
                              dir.empty() ? std::string("fixtures/profiles, not found") : dir));
    }
    path = fs::path(dir) / (name_or_path + ".json");
  }
  std::ifstream in(path);
  if (!in) throw Error(fmt::format("profile {}: cannot read the file", path.string()));
  std::stringstream text;
  text << in.rdbuf();
  return parse_profile(text.str(), path.string(), path.stem().string());
}

}  // namespace paritron::parity
