// Reading and writing safetensors files: the container of Paritron's case
// files (shared/spec/case-format.md, "Container").
//
// Layout, as the Python `safetensors` package writes it: an 8-byte
// little-endian header length N, N bytes of UTF-8 JSON (padded with spaces),
// then the tensor bytes. Each JSON entry is
//   "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}
// with offsets relative to the end of the header; "__metadata__" maps
// strings to strings.
//
// The reader accepts every file the Python package writes for Paritron's
// dtypes and rejects anything else with a CaseFormatError that names the file
// and the problem: it never crashes and never throws anything but
// paritron::Error on malformed input (common/safetensors_mutation_test.cpp and
// the libFuzzer target common/safetensors_fuzz.cpp hold it to that). It is
// stricter than the Rust reader in two places, both on purpose: duplicate JSON
// keys are an error (serde would keep one silently) and so are unknown keys in
// a tensor entry (they are a corrupt or misspelled entry, no writer emits them).
//
// The writer is deterministic: "__metadata__" first (omitted when empty), then
// tensors sorted by name, their data laid out in that order, header padded
// with spaces to a multiple of 8 (the Python package aligns the same way).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/tensor.h"

namespace paritron {

// Headers longer than this are rejected before anything is allocated; it is
// the Rust crate's own limit (MAX_HEADER_SIZE), so no Python-written file is
// refused by it.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;         // "__metadata__"
  std::vector<std::pair<std::string, Tensor>> tensors;  // in data-offset order when read

  // The tensor called `name`, or nullptr.
  const Tensor* find(std::string_view name) const;
};

// Parses a whole file held in memory. `source` names it in error messages.
// Throws CaseFormatError on anything malformed.
SafetensorsFile parse_safetensors(std::span<const std::byte> bytes,
                                  const std::string& source = "<memory>");
SafetensorsFile read_safetensors(const std::filesystem::path& path);

// The file's bytes, identical for equal inputs. Throws Error when the file
// could not be read back: duplicate or reserved tensor names, text that is not
// UTF-8, BOOL tensors holding bytes other than 0/1.
std::vector<std::byte> serialize_safetensors(const SafetensorsFile& file);
// Writes to a temporary file beside `path`, then renames it over `path`, so a
// reader never sees a half-written file.
void write_safetensors(const std::filesystem::path& path, const SafetensorsFile& file);

}  // namespace paritron
