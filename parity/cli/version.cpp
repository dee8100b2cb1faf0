// `paritron version`: what was built, with what.
#include <iostream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "parity/cli/commands.h"

namespace paritron::cli {

void register_version(CLI::App& app, Action& action) {
  CLI::App* cmd = app.add_subcommand("version", "Print the version and how this binary was built");
  cmd->callback([&action] {
    action = [] {
      std::cout << fmt::format("paritron {}\n", PARITRON_VERSION)
                << fmt::format("  build type: {}\n", PARITRON_BUILD_TYPE)
                << fmt::format("  compiler:   {}\n", PARITRON_COMPILER)
                << fmt::format("  CUDA:       {}\n", PARITRON_CUDA_BUILT ? fmt::format("built (toolkit {})", PARITRON_CUDA_VERSION)
                                                                         : std::string("not built"));
      return kExitOk;
    };
  });
}

}  // namespace paritron::cli
