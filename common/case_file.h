// Case files: one component run, its config, weights, inputs and (optionally)
// outputs and gradients, in one safetensors file. Follows
// shared/spec/case-format.md ("Metadata", "Tensor names", "Components",
// "Comparison"); the container is common/safetensors.h.
//
// Reading checks every metadata value the contract defines and every tensor
// name, and loads the config through config_from_json_text (validated), so a
// Case in hand is well formed; any problem is a CaseFormatError naming the
// file. An invalid config is a CaseFormatError whose message carries the
// config issues and which nests the ConfigError (std::rethrow_if_nested).
// Writing refuses a Case that would not read back.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/compare.h"
#include "common/safetensors.h"
#include "common/tensor.h"
#include "common/transformer_config.h"

namespace paritron {

struct Case {
  std::string component;                 // one of case_components()
  TransformerConfig config;              // from the "config" metadata, validated (derived defaults filled)
  std::string config_json;               // the config text as stored; written back while it still loads to `config`
  int64_t layer_number = 1;              // 1-based
  std::string attn_mask_type = "causal"; // causal | padding | no_mask
  // Whether the file states attn_mask_type. The contract's default is causal;
  // a cross_attention case without it takes CrossAttention's own default,
  // padding (megatron/core/transformer/attention.py), see reference/README.md.
  bool attn_mask_type_given = false;
  bool training = false;
  std::optional<uint64_t> seed;
  std::string producer, description;     // empty = absent
  std::map<std::string, Tolerance> tolerance;   // "tolerance": name, "prefix*" or "*" -> rtol/atol
  std::optional<std::string> parallel;          // raw JSON object text of "parallel"
  std::map<std::string, std::string> other_metadata;  // keys readers ignore, kept for round trips
  std::map<std::string, Tensor> tensors;        // "weights.*", "inputs.*", "outputs.*", "grads.*"

  // The tolerance an expected tensor is judged by: the longest matching key of
  // `tolerance` (an exact name beats a pattern of the same length), else the
  // contract's default for the expected dtype: F64 1e-9/1e-9, F32 1e-5/1e-5,
  // integers and BOOL exact {0, 0}, and std::nullopt for F16/BF16/F8, which
  // the parity tolerance model judges.
  std::optional<Tolerance> tolerance_for(const std::string& tensor_name, DType expected_dtype) const;
};

// `source` names the file in error messages.
Case case_from_safetensors(const SafetensorsFile& file, const std::string& source);
// Throws Error if the case could not be read back (unknown component, bad
// names or values, an invalid config, other_metadata shadowing a known key).
SafetensorsFile case_to_safetensors(const Case& c);
Case read_case(const std::filesystem::path& path);
void write_case(const std::filesystem::path& path, const Case& c);

// The component names of the contract's table, in its order.
const std::vector<std::string_view>& case_components();

}  // namespace paritron
