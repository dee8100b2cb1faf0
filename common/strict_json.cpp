#include "common/strict_json.h"

#include <set>
#include <vector>

#include <fmt/format.h>

#include "common/error.h"

namespace paritron {

std::string json_quoted(std::string_view text) {
  return nlohmann::json(std::string(text)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

template <class Json>
Json parse_strict_json(std::string_view text, const std::string& source, const StrictJsonOptions& o) {
  using json = Json;
  const auto fail = [&](const std::string& problem) {
    if (o.fail) o.fail(problem);
    throw CaseFormatError(fmt::format("{}: {}", source, problem));
  };
  if (const size_t nul = text.find('\0'); nul != std::string_view::npos) {
    fail(fmt::format("{} is not valid JSON: NUL byte at offset {}", o.what, nul));
  }
  std::vector<std::set<std::string>> open_objects;  // keys seen in each enclosing object
  auto watch = [&](int depth, typename json::parse_event_t event, json& parsed) -> bool {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= o.max_depth) fail(fmt::format("{} nests deeper than {} levels", o.what, o.max_depth));
        if (event == json::parse_event_t::object_start) open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::key: {
        const auto& key = parsed.template get_ref<const std::string&>();
        if (!open_objects.empty() && !open_objects.back().insert(key).second) {
          fail(o.duplicate_message ? o.duplicate_message(depth, key)
                                   : fmt::format("{} has the key {} twice", o.what, json_quoted(key)));
        }
        break;
      }
      default: break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), watch);
  } catch (const nlohmann::json::exception& e) {
    fail(fmt::format("{} is not valid JSON: {}", o.what, e.what()));
  }
  return {};  // not reached: fail() throws
}

template nlohmann::json parse_strict_json<nlohmann::json>(std::string_view, const std::string&, const StrictJsonOptions&);
template nlohmann::ordered_json parse_strict_json<nlohmann::ordered_json>(std::string_view, const std::string&,
                                                                         const StrictJsonOptions&);

}  // namespace paritron
