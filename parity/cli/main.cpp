// paritron: check that fast Megatron-core code computes the right thing.
#include <iostream>

#include <CLI/CLI.hpp>

#include "common/error.h"
#include "parity/cli/commands.h"

int main(int argc, char** argv) {
  using namespace paritron::cli;
  CLI::App app{
      "paritron: Megatron-core transformer reference, optimized twin and parity checks.\n"
      "Exit codes: 0 ok, 1 check failed, 2 bad input, 3 internal error.",
      "paritron"};
  app.require_subcommand(1);
  app.fallthrough(false);
  Action action;
  register_version(app, action);
  register_config(app, action);
  register_case(app, action);
  register_check(app, action);
  register_optimized(app, action);
  register_parity(app, action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help / the parse error
    return code == 0 ? kExitOk : kExitBadInput;
  }
  try {
    return action ? action() : kExitBadInput;
  } catch (const paritron::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return kExitBadInput;
  } catch (const std::exception& e) {
    std::cerr << "internal error: " << e.what() << "\n";
    return kExitInternalError;
  }
}
