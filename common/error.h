// Paritron's error types. Bad input (invalid config, malformed file, dead rank)
// is reported by throwing one of these with a message that names the problem;
// the command line maps them to exit code 2 ("bad input").
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace paritron {

// Base of every error Paritron raises on purpose.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One broken rule of a configuration: which field, its value, and the rule it
// breaks, in the spirit of Megatron's messages ("num_attention_heads (6) must
// be a multiple of tensor_model_parallel_size (4)").
struct ConfigIssue {
  std::string field;  // Megatron's field name, e.g. "num_query_groups"
  std::string value;  // the offending value as written, e.g. "6" or "\"swish\""
  std::string rule;   // e.g. "must be a multiple of tensor_model_parallel_size (4)"
  std::string message() const;  // "num_query_groups = 6: must be a multiple of ..."
};

// An invalid TransformerConfig / ParallelConfig; carries every issue found.
class ConfigError : public Error {
 public:
  explicit ConfigError(std::vector<ConfigIssue> issues);
  ConfigError(std::string field, std::string value, std::string rule);
  const std::vector<ConfigIssue>& issues() const { return issues_; }

 private:
  std::vector<ConfigIssue> issues_;
};

// A malformed case / safetensors file. The message names the file (when known)
// and what is wrong with it.
class CaseFormatError : public Error {
 public:
  using Error::Error;
};

// A collective failed: which rank, which operation, and why (timeout, peer died,
// mismatched shapes).
class CommError : public Error {
 public:
  using Error::Error;
};

// A kernel backend failed or was asked for something it cannot do.
class BackendError : public Error {
 public:
  using Error::Error;
};

}  // namespace paritron
