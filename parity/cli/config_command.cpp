// `paritron config validate FILE.json [--layout L]`: load a TransformerConfig
// as a case file's `config` would be loaded (shared/spec/case-format.md), fill
// Megatron's derived defaults, and print the normalised config as JSON on
// stdout, or every broken rule on stderr (exit 2).
#include <iostream>
#include <optional>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "common/file_io.h"
#include "common/parallel_config.h"
#include "common/transformer_config.h"
#include "parity/cli/commands.h"

namespace paritron::cli {

namespace {

struct ValidateOptions {
  std::string file;
  std::string layout;
  bool quiet = false;
};

void print_issues(const std::string& file, const std::vector<ConfigIssue>& issues) {
  std::cerr << fmt::format("{}: invalid config ({} problem{}):\n", file, issues.size(), issues.size() == 1 ? "" : "s");
  for (const ConfigIssue& issue : issues) std::cerr << "  - " << issue.message() << "\n";
}

int validate(const ValidateOptions& o) {
  const std::string text = read_text_file(o.file);
  LoadedConfig loaded;
  try {
    loaded = config_from_json_text(text, /*validate=*/false);
  } catch (const ConfigError& e) {
    print_issues(o.file, e.issues());
    return kExitBadInput;
  }
  std::vector<ConfigIssue> issues;
  std::optional<ParallelConfig> layout;
  if (!o.layout.empty()) {
    try {
      layout = ParallelConfig::parse_layout(o.layout);
    } catch (const ConfigError& e) {
      print_issues("--layout", e.issues());
      return kExitBadInput;
    }
    issues = check_fits(*layout, loaded.config);
  }
  // check_config fills the derived defaults; with a layout, check_fits has
  // already run it on a copy sized for the layout.
  std::vector<ConfigIssue> config_issues = check_config(loaded.config);
  if (!layout) issues = std::move(config_issues);
  if (!issues.empty()) {
    print_issues(o.file, issues);
    return kExitBadInput;
  }
  std::cout << config_to_json_text(loaded.config) << "\n";
  if (!o.quiet) {
    std::cerr << fmt::format("{}: valid{}\n", o.file, layout ? fmt::format(" for layout {}", layout->layout_name()) : "");
    if (!loaded.ignored_fields.empty()) {
      std::cerr << fmt::format("  ignored (no effect on numerics): {}\n", fmt::join(loaded.ignored_fields, ", "));
    }
  }
  return kExitOk;
}

}  // namespace

void register_config(CLI::App& app, Action& action) {
  CLI::App* config = app.add_subcommand("config", "Work with TransformerConfig JSON files");
  config->require_subcommand(1);
  auto options = std::make_shared<ValidateOptions>();
  CLI::App* cmd = config->add_subcommand(
      "validate",
      "Validate a TransformerConfig JSON file (Megatron field names; any Megatron-core version from 0.5 on).\n"
      "Prints the normalised config with derived fields (ffn_hidden_size, kv_channels, num_query_groups, ...)\n"
      "on stdout, or every broken rule on stderr and exits 2.");
  cmd->add_option("file", options->file, "config JSON file")->required();
  cmd->add_option("--layout", options->layout,
                  "also check that the config fits a parallel layout, e.g. tp2-pp2-dp1-cp1-ep1-sp");
  cmd->add_flag("-q,--quiet", options->quiet, "print only the normalised config");
  cmd->callback([&action, options] { action = [options] { return validate(*options); }; });
}

}  // namespace paritron::cli
