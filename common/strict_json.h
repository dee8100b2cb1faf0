// JSON from untrusted text (safetensors headers, case metadata, config and
// layout files): nlohmann's parser plus refusal of what it would let through
// silently — a repeated key in an object (it keeps the last one), a NUL byte
// (it stops reading there as if the input ended) and nesting deeper than a
// limit (hostile input would recurse without bound in dump() and destructors).
// Used only by .cpp files.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace paritron {

struct StrictJsonOptions {
  std::string_view what;  // names the text in messages: "header", "metadata \"config\""
  int max_depth = 64;
  // Message for a repeated key at nesting depth `depth` (1 = top level);
  // default: "<what> has the key "<key>" twice".
  std::string (*duplicate_message)(int depth, const std::string& key) = nullptr;
  // Throws for a problem ("<what> is not valid JSON: ..."); must not return.
  // Default: CaseFormatError("<source>: <problem>").
  std::function<void(const std::string& problem)> fail = nullptr;
};

// Json is nlohmann::json or nlohmann::ordered_json (keeps the text's key order).
template <class Json>
Json parse_strict_json(std::string_view text, const std::string& source, const StrictJsonOptions& options);

// A string as a JSON literal, for quoting names in messages (invalid UTF-8 replaced).
std::string json_quoted(std::string_view text);

// A value's JSON text for a message (invalid UTF-8 replaced), cut to max_chars.
template <class Json>
std::string json_brief(const Json& value, size_t max_chars = 80) {
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > max_chars) text = text.substr(0, max_chars - 3) + "...";
  return text;
}

// An integer JSON number that fits int64 (nlohmann would wrap larger unsigned ones).
template <class Json>
std::optional<int64_t> json_int64(const Json& value) {
  if (value.is_number_unsigned()) {
    const auto u = value.template get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (value.is_number_integer()) return value.template get<int64_t>();
  return std::nullopt;
}

}  // namespace paritron
