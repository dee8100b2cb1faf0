#include "common/error.h"

namespace paritron {

std::string ConfigIssue::message() const {
  if (value.empty()) return field + ": " + rule;
  return field + " = " + value + ": " + rule;
}

namespace {
std::string join_issues(const std::vector<ConfigIssue>& issues) {
  if (issues.size() == 1) return "invalid config: " + issues[0].message();
  std::string out = "invalid config (" + std::to_string(issues.size()) + " problems):";
  for (const ConfigIssue& issue : issues) out += "\n  - " + issue.message();
  return out;
}
}  // namespace

ConfigError::ConfigError(std::vector<ConfigIssue> issues)
    : Error(join_issues(issues)), issues_(std::move(issues)) {}

ConfigError::ConfigError(std::string field, std::string value, std::string rule)
    : ConfigError(std::vector<ConfigIssue>{{std::move(field), std::move(value), std::move(rule)}}) {}

}  // namespace paritron
