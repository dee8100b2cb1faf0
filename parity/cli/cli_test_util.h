// Helpers shared by the command-line tests (parity/cli/*_test.cpp, and only
// those): run the built `paritron` (PARITRON_EXE, set for each test target),
// find the committed fixtures (PARITRON_SOURCE_DIR), make temp files of this
// test process's own. Header-only; not part of the `paritron` executable.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace paritron::cli_test_util {

struct Result {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs `paritron <args>` through the shell; exit_code -1 when it did not exit normally.
inline Result run(const std::string& args) {
  const std::string command = std::string(PARITRON_EXE) + " " + args + " 2>&1";
  Result r;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return r;
  std::array<char, 4096> buffer;
  size_t n;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) r.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// fixtures/<relative> in the source tree.
inline std::string fixture(const std::string& relative) {
  return std::string(PARITRON_SOURCE_DIR) + "/fixtures/" + relative;
}

// <temp directory>/paritron_<what>_<pid>: a path of this test process's own.
inline std::filesystem::path own_temp_path(const std::string& what) {
  return std::filesystem::temp_directory_path() / ("paritron_" + what + "_" + std::to_string(::getpid()));
}

// Writes `content` to <temp directory>/paritron_cli_test_<pid>_<name>; returns its path.
inline std::filesystem::path temp_file(const std::string& name, const std::string& content) {
  const std::filesystem::path path = own_temp_path("cli_test").string() + "_" + name;
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

}  // namespace paritron::cli_test_util
