// Profiles (issue #6): named distributions for the parity generators, kept as
// files in fixtures/profiles/<name>.json (`paritron parity --profile NAME`).
// A profile narrows what build_case_spec (parity/generators.h) draws: choice
// lists keep only the listed values (in the generator's simplest-first order,
// whatever order the file lists them), ranges bound the drawn sizes. The
// schema is documented in parity/generators.h ("Profiles"); the keys and
// their domains are profile_choice_domains() / profile_range_domains() below.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace paritron::parity {

// One value of a choice list: JSON null (a default left unset), a bool, a
// number (integers too) or a string.
struct ChoiceValue {
  enum class Kind { Null, Bool, Number, String };
  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0;
  std::string text;

  ChoiceValue() = default;  // null
  ChoiceValue(bool b) : kind(Kind::Bool), boolean(b) {}
  ChoiceValue(int v) : kind(Kind::Number), number(v) {}
  ChoiceValue(int64_t v) : kind(Kind::Number), number(static_cast<double>(v)) {}
  ChoiceValue(double v) : kind(Kind::Number), number(v) {}
  ChoiceValue(std::string s) : kind(Kind::String), text(std::move(s)) {}
  ChoiceValue(const char* s) : kind(Kind::String), text(s) {}
  bool operator==(const ChoiceValue&) const = default;
};
std::string choice_value_text(const ChoiceValue& v);  // "null", "true", "0.01", "RMSNorm"

struct IntRange {
  int64_t lo = 0, hi = 0;  // inclusive
  bool contains(int64_t v) const { return lo <= v && v <= hi; }
  bool operator==(const IntRange&) const = default;
};

struct Profile {
  std::string name;         // "llama-like"
  std::string description;  // free text
  std::string source;       // the file it was loaded from ("" when built in code)
  std::vector<std::string> components;  // empty: every component
  std::vector<DType> dtypes;            // empty: every dtype the component admits
  std::optional<int64_t> max_world_size;
  std::optional<bool> large;
  std::map<std::string, IntRange> ranges;                  // keys of profile_range_domains()
  std::map<std::string, std::vector<ChoiceValue>> choices;  // keys of profile_choice_domains()

  // Whether the profile lets decision `key` take `value` (true when the
  // profile has no list for `key`). Throws std::logic_error for a key that is
  // not a choice key (a typo in the generator).
  bool allows(const std::string& key, const ChoiceValue& value) const;
  const IntRange* range(const std::string& key) const;  // null when unbounded
  bool allows_component(const std::string& c) const;
  bool allows_dtype(DType d) const;

  bool operator==(const Profile&) const = default;
};

// Every choice key with its domain, in the generator's simplest-first order.
const std::map<std::string, std::vector<ChoiceValue>>& profile_choice_domains();

struct RangeDomain {
  IntRange small, large;    // the generator's range without / with "large": true
  std::string description;  // what the range bounds
};
const std::map<std::string, RangeDomain>& profile_range_domains();

// The directory holding the bundled profiles: $PARITRON_PROFILES_DIR, else the
// source tree's fixtures/profiles (a compile definition), else the first
// fixtures/profiles found walking up from the current directory or the
// executable. Empty when none exists.
std::string profiles_dir();
// The names of the bundled profiles (file stems), sorted.
std::vector<std::string> available_profiles();

// `name_or_path`: a bundled profile's name ("llama-like"), or a file (any
// argument with a '/' or ending in ".json"). Throws Error, with the file in
// the message, for an unknown name (listing the available ones), unreadable
// or malformed JSON, unknown keys or values, empty choice lists, ranges with
// lo > hi or outside the generator's range, unknown components or dtypes.
Profile load_profile(const std::string& name_or_path);
// The same from JSON text (`source` names it in error messages).
Profile parse_profile(const std::string& json_text, const std::string& source, const std::string& default_name = "");

}  // namespace paritron::parity
