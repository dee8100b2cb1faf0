// The `paritron` command line: one file per subcommand group, each registering
// itself on the CLI11 app. Exit codes (the contract with scripts and CI):
//   0 ok, 1 a check failed, 2 bad input (invalid config, malformed file,
//   unknown option), 3 internal error (a bug: please report it).
#pragma once

#include <functional>

namespace CLI {
class App;
}

namespace paritron::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitCheckFailed = 1;
inline constexpr int kExitBadInput = 2;
inline constexpr int kExitInternalError = 3;

// A subcommand's action; it returns the process exit code. main() runs the
// one the user chose and turns exceptions into exit codes.
using Action = std::function<int()>;

void register_version(CLI::App& app, Action& action);
void register_config(CLI::App& app, Action& action);
void register_case(CLI::App& app, Action& action);
void register_check(CLI::App& app, Action& action);
void register_optimized(CLI::App& app, Action& action);
void register_parity(CLI::App& app, Action& action);
void register_case_make(CLI::App& group, Action& action);  // `case make`, inside the `case` group

}  // namespace paritron::cli
