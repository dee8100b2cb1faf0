// What the config JSON loader knows about field names: Megatron's field
// catalog (every name of ModelParallelConfig, TransformerConfig and
// MLATransformerConfig in core_v0.5.0 .. core_v0.19.0, generated into
// common/megatron_config_fields.inc by fixtures/generate/megatron_field_catalog.py)
// and how Paritron treats each name. Loading and saving themselves are
// declared in common/transformer_config.h (config_from_json_text,
// config_to_json_text). No JSON library types here: headers stay light.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace paritron {

struct MegatronField {
  std::string_view name;
  std::string_view first_release;    // "0.5.0"
  std::string_view last_release;     // "0.19.0"
  std::string_view declaring_class;  // "ModelParallelConfig", "TransformerConfig", "MLATransformerConfig"
};

// The generated catalog, in order of first appearance.
std::span<const MegatronField> megatron_field_catalog();
const MegatronField* find_megatron_field(std::string_view name);

// How config_from_json_text treats a field name.
enum class FieldTreatment {
  kTyped,               // a TransformerConfig member: parsed, validated, saved
  kIgnored,             // a Megatron field that does not change numerics: accepted, any value
  kUnmodelledNumerics,  // changes numerics, not modelled: accepted only at Megatron's default
  kPrivate,             // starts with "_" (dataclass internals such as _cpu_offloading_context)
  kUnknown,             // no Megatron release 0.5 .. 0.19 has it: an error
};
FieldTreatment field_treatment(std::string_view name);

// Names of the TransformerConfig members, in the order config_to_json_text writes them.
std::vector<std::string_view> config_field_names();

// Names Paritron adds that no Megatron TransformerConfig 0.5.0 declares (GPTModel arguments).
std::span<const std::string_view> paritron_only_field_names();

// The known field name (Megatron catalog or typed) closest to `name` by edit distance,
// if close enough to be a likely typo ("hiden_size" -> "hidden_size").
std::optional<std::string_view> closest_field_name(std::string_view name);

}  // namespace paritron
