// Implements common/case_file.h: case files on top of the safetensors
// container, following shared/spec/case-format.md ("Metadata", "Tensor
// names", "Components", "Comparison").
//
// Every metadata value is checked by one function, parse_case_metadata, which
// the reader uses on files and the writer uses on what it is about to write:
// so a file Paritron writes always reads back into the same Case.
#include "common/case_file.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <exception>
#include <utility>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/parallel_config.h"
#include "common/strict_json.h"

namespace paritron {
namespace {

using nlohmann::json;

// Metadata keys the contract defines; any other key is kept in other_metadata.
constexpr std::string_view kKnownKeys[] = {"component", "config",   "layer_number", "attn_mask_type", "training",
                                           "producer",  "tolerance", "parallel",    "seed",           "description"};
constexpr std::string_view kTensorPrefixes[] = {"weights.", "inputs.", "outputs.", "grads."};
constexpr std::string_view kAttnMaskTypes[] = {"causal", "padding", "no_mask"};
// Metadata JSON (config, tolerance, parallel) is shallow; refusing deep
// nesting keeps recursive code (dump, destructors) safe on hostile files.
constexpr int kMaxJsonDepth = 64;

[[noreturn]] void fail(const std::string& source, const std::string& problem) {
  throw CaseFormatError(fmt::format("{}: {}", source, problem));
}

bool is_known_key(std::string_view key) {
  return std::find(std::begin(kKnownKeys), std::end(kKnownKeys), key) != std::end(kKnownKeys);
}

// A metadata value that holds JSON, parsed strictly (common/strict_json.h):
// two tolerances for one tensor would leave it unclear which one was meant.
json parse_metadata_json(std::string_view text, std::string_view key, const std::string& source) {
  const std::string what = fmt::format("metadata {}", json_quoted(key));
  return parse_strict_json<json>(text, source, {.what = what, .max_depth = kMaxJsonDepth});
}

// A whole string as a decimal integer (no sign, spaces or fraction).
template <class T> std::optional<T> parse_decimal(std::string_view text) {
  if (text.empty() || text.front() < '0' || text.front() > '9') return std::nullopt;
  T value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

// Why a tolerance key is malformed, or "" if it is fine. A '*' anywhere but
// at the end would read as a glob the matcher does not implement.
std::string tolerance_key_problem(std::string_view key) {
  if (key.empty()) return "an empty key matches no tensor";
  const size_t star = key.find('*');
  if (star != std::string_view::npos && star != key.size() - 1) return "'*' may only end a pattern";
  return "";
}

std::map<std::string, Tolerance> parse_tolerance(std::string_view text, const std::string& source) {
  const json value = parse_metadata_json(text, "tolerance", source);
  const std::string form = "a JSON object of tensor name or pattern -> {\"rtol\": r, \"atol\": a}";
  if (!value.is_object()) fail(source, fmt::format("metadata \"tolerance\" is not {}", form));
  std::map<std::string, Tolerance> tolerance;
  for (const auto& [key, entry] : value.items()) {
    const std::string where = fmt::format("metadata \"tolerance\" entry {}", json_quoted(key));
    if (const std::string problem = tolerance_key_problem(key); !problem.empty()) {
      fail(source, fmt::format("{}: {}", where, problem));
    }
    if (!entry.is_object()) fail(source, fmt::format("{} is not an object {{\"rtol\": r, \"atol\": a}}", where));
    for (const auto& [field, unused] : entry.items()) {
      if (field != "rtol" && field != "atol") {
        fail(source, fmt::format("{} has the unexpected key {} (it takes rtol and atol)", where, json_quoted(field)));
      }
    }
    Tolerance parsed;
    for (const char* field : {"rtol", "atol"}) {
      if (!entry.contains(field)) fail(source, fmt::format("{} has no \"{}\"", where, field));
      const json& number = entry.at(field);
      const double v = number.is_number() ? number.get<double>() : -1.0;
      if (!number.is_number() || !std::isfinite(v) || v < 0) {
        fail(source, fmt::format("{}: {} is {}, not a finite number >= 0", where, field,
                                 number.dump(-1, ' ', false, json::error_handler_t::replace)));
      }
      (std::string_view(field) == "rtol" ? parsed.rtol : parsed.atol) = v;
    }
    tolerance.emplace(key, parsed);
  }
  return tolerance;
}

std::string tolerance_json(const std::map<std::string, Tolerance>& tolerance) {
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  for (const auto& [key, t] : tolerance) out[key] = {{"rtol", t.rtol}, {"atol", t.atol}};
  return out.dump();
}

std::string component_list() { return fmt::format("{}", fmt::join(case_components(), ", ")); }

// Checks and reads every metadata key into a Case (no tensors).
Case parse_case_metadata(const std::map<std::string, std::string>& metadata, const std::string& source) {
  auto find = [&](std::string_view key) -> const std::string* {
    const auto it = metadata.find(std::string(key));
    return it == metadata.end() ? nullptr : &it->second;
  };
  auto bad_value = [&](std::string_view key, const std::string& value, std::string_view rule) {
    fail(source, fmt::format("metadata {} is {}: {}", json_quoted(key), json_quoted(value), rule));
  };
  Case c;

  const std::string* component = find("component");
  if (!component) fail(source, fmt::format("metadata has no \"component\" (one of {})", component_list()));
  const auto& components = case_components();
  if (std::find(components.begin(), components.end(), *component) == components.end()) {
    fail(source, fmt::format("unknown component {} (one of {})", json_quoted(*component), component_list()));
  }
  c.component = *component;

  const std::string* config = find("config");
  if (!config) fail(source, "metadata has no \"config\" (the TransformerConfig as a JSON object)");
  if (!parse_metadata_json(*config, "config", source).is_object()) {
    fail(source, "metadata \"config\" is not a JSON object of TransformerConfig fields");
  }
  try {
    c.config = config_from_json_text(*config, /*validate=*/true).config;
  } catch (const Error& e) {
    // Nested, so a caller can still get the ConfigError and its issues.
    std::throw_with_nested(CaseFormatError(fmt::format("{}: invalid config: {}", source, e.what())));
  } catch (const json::exception& e) {
    fail(source, fmt::format("invalid config: {}", e.what()));
  }
  c.config_json = *config;

  if (const std::string* v = find("layer_number")) {
    const auto n = parse_decimal<int64_t>(*v);
    if (!n || *n < 1) bad_value("layer_number", *v, "must be a positive decimal integer (1-based)");
    c.layer_number = *n;
  }
  if (const std::string* v = find("attn_mask_type")) {
    if (std::find(std::begin(kAttnMaskTypes), std::end(kAttnMaskTypes), *v) == std::end(kAttnMaskTypes)) {
      bad_value("attn_mask_type", *v, "must be causal, padding or no_mask");
    }
    c.attn_mask_type = *v;
    c.attn_mask_type_given = true;
  }
  if (const std::string* v = find("training")) {
    if (*v != "true" && *v != "false") bad_value("training", *v, "must be true or false");
    c.training = *v == "true";
  }
  if (const std::string* v = find("seed")) {
    const auto seed = parse_decimal<uint64_t>(*v);
    if (!seed) bad_value("seed", *v, "must be a decimal integer in [0, 2^64)");
    c.seed = *seed;
  }
  if (const std::string* v = find("tolerance")) c.tolerance = parse_tolerance(*v, source);
  if (const std::string* v = find("parallel")) {
    if (!parse_metadata_json(*v, "parallel", source).is_object()) {
      fail(source, "metadata \"parallel\" is not a JSON object");
    }
    try {
      parallel_from_json_text(*v).validate();
    } catch (const ConfigError& e) {
      fail(source, fmt::format("metadata \"parallel\" is not a valid layout: {}", e.what()));
    }
    c.parallel = *v;
  }
  if (const std::string* v = find("producer")) c.producer = *v;
  if (const std::string* v = find("description")) c.description = *v;
  for (const auto& [key, value] : metadata) {
    if (!is_known_key(key)) c.other_metadata.emplace(key, value);
  }
  return c;
}

// Why a tensor name breaks the naming rule, or "".
std::string tensor_name_problem(std::string_view name) {
  // Gradients are of an input or of a weight: grads.inputs.<name>, grads.weights.<key>.
  if (name.starts_with("grads.")) {
    for (std::string_view prefix : {std::string_view("grads.inputs."), std::string_view("grads.weights.")}) {
      if (name.starts_with(prefix)) return name.size() > prefix.size() ? "" : fmt::format("nothing follows \"{}\"", prefix);
    }
    return "a gradient must be named grads.inputs.<name> or grads.weights.<key>";
  }
  for (std::string_view prefix : kTensorPrefixes) {
    if (name.starts_with(prefix)) {
      return name.size() > prefix.size() ? "" : fmt::format("nothing follows \"{}\"", prefix);
    }
  }
  return "must start with weights., inputs., outputs. or grads.";
}

Case case_from_file(SafetensorsFile file, const std::string& source) {
  Case c = parse_case_metadata(file.metadata, source);
  for (auto& [name, tensor] : file.tensors) {
    if (const std::string problem = tensor_name_problem(name); !problem.empty()) {
      fail(source, fmt::format("tensor name {}: {}", json_quoted(name), problem));
    }
    if (!c.tensors.emplace(name, std::move(tensor)).second) {
      fail(source, fmt::format("duplicate tensor name {}", json_quoted(name)));
    }
  }
  return c;
}

// The stored config text while it still loads to c.config (so a file read and
// written again keeps its text byte for byte), else c.config itself.
std::string config_text(const Case& c) {
  if (!c.config_json.empty()) {
    try {
      if (config_from_json_text(c.config_json, /*validate=*/true).config == c.config) return c.config_json;
    } catch (const Error&) {
      // Falls through: the text is stale or broken, the struct is what is meant.
    } catch (const json::exception&) {
    }
  }
  return config_to_json_text(c.config);
}

}  // namespace

const std::vector<std::string_view>& case_components() {
  static const std::vector<std::string_view> components = {
      "layernorm", "rmsnorm",     "rotary_pos_emb", "dot_product_attention", "self_attention",   "cross_attention",
      "mlp",       "moe_router",  "moe_layer",      "transformer_layer",     "transformer_block"};
  return components;
}

std::optional<Tolerance> Case::tolerance_for(const std::string& tensor_name, DType expected_dtype) const {
  // Indices, counts and masks match exactly, whatever a pattern says (case-format.md).
  if (is_integral(expected_dtype)) return Tolerance{0.0, 0.0};
  const Tolerance* best = nullptr;
  size_t best_length = 0;
  bool best_exact = false;
  for (const auto& [key, value] : tolerance) {
    const bool exact = key == tensor_name;
    const bool pattern = !key.empty() && key.back() == '*' &&
                         std::string_view(tensor_name).starts_with(std::string_view(key).substr(0, key.size() - 1));
    if (!exact && !pattern) continue;
    if (!best || key.size() > best_length || (key.size() == best_length && exact && !best_exact)) {
      best = &value;
      best_length = key.size();
      best_exact = exact;
    }
  }
  if (best) return *best;
  switch (expected_dtype) {
    case DType::F64: return Tolerance{1e-9, 1e-9};
    case DType::F32: return Tolerance{1e-5, 1e-5};
    case DType::F16:
    case DType::BF16:
    case DType::F8_E4M3:
    case DType::F8_E5M2: return std::nullopt;  // the parity tolerance model judges these
    default: return std::nullopt;
  }
}

Case case_from_safetensors(const SafetensorsFile& file, const std::string& source) {
  return case_from_file(file, source);
}

SafetensorsFile case_to_safetensors(const Case& c) {
  const std::string source = c.component.empty() ? "case to write" : fmt::format("{} case to write", c.component);
  SafetensorsFile file;
  auto& m = file.metadata;
  for (const auto& [key, value] : c.other_metadata) {
    if (is_known_key(key)) {
      throw Error(fmt::format("{}: other_metadata holds {}, a key the case format defines; set the Case field "
                              "instead", source, json_quoted(key)));
    }
    m.emplace(key, value);
  }
  // Optional keys are written only when they differ from the contract's
  // default, so a case states what is special about it.
  m["component"] = c.component;
  m["config"] = config_text(c);
  if (c.layer_number != 1) m["layer_number"] = std::to_string(c.layer_number);
  if (c.attn_mask_type != "causal" || c.attn_mask_type_given) m["attn_mask_type"] = c.attn_mask_type;
  if (c.training) m["training"] = "true";
  if (c.seed) m["seed"] = std::to_string(*c.seed);
  if (!c.tolerance.empty()) {
    for (const auto& [key, t] : c.tolerance) {
      if (const std::string problem = tolerance_key_problem(key); !problem.empty()) {
        throw Error(fmt::format("{}: tolerance key {}: {}", source, json_quoted(key), problem));
      }
      if (!std::isfinite(t.rtol) || !std::isfinite(t.atol) || t.rtol < 0 || t.atol < 0) {
        throw Error(fmt::format("{}: tolerance {}: rtol {} and atol {} must be finite and >= 0", source,
                                json_quoted(key), t.rtol, t.atol));
      }
    }
    m["tolerance"] = tolerance_json(c.tolerance);
  }
  if (c.parallel) m["parallel"] = *c.parallel;
  if (!c.producer.empty()) m["producer"] = c.producer;
  if (!c.description.empty()) m["description"] = c.description;
  // The reader's own checks, so that what is written reads back.
  (void)parse_case_metadata(m, source);

  for (const auto& [name, tensor] : c.tensors) {
    if (const std::string problem = tensor_name_problem(name); !problem.empty()) {
      throw Error(fmt::format("{}: tensor name {}: {}", source, json_quoted(name), problem));
    }
    file.tensors.emplace_back(name, tensor);
  }
  return file;
}

Case read_case(const std::filesystem::path& path) { return case_from_file(read_safetensors(path), path.string()); }

void write_case(const std::filesystem::path& path, const Case& c) { write_safetensors(path, case_to_safetensors(c)); }

}  // namespace paritron
