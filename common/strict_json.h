// JSON from untrusted text (safetensors headers, case metadata, config and
// layout files): nlohmann's parser plus refusal of what it would let through
// silently — a repeated key in an object (it keeps the last one), a NUL byte
// (it stops reading there as if the input ended) and nesting deeper than a
// limit (hostile input would recurse without bound in dump() and destructors).
// Used only by .cpp files.
#pragma once

#include <functional>
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

}  // namespace paritron
