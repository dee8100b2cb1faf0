// libFuzzer entry point for the safetensors reader (common/safetensors.h) and
// the case layer on top (common/case_file.h): shared/spec/case-format.md
// promises that malformed files are rejected with a clear error, never a
// crash. Built as `fuzz_safetensors` by cmake/paritron_fuzz.cmake when the
// compiler supports -fsanitize=fuzzer (clang), with ASan and UBSan.
//
// Properties, the same as common/safetensors_mutation_test.cpp: parsing any
// bytes either throws paritron::Error or returns a consistent file (tensors
// hold dtype_size * numel bytes, BOOL bytes are 0/1, and serialize -> parse
// gives the same file back). Any other exception escapes and aborts, which
// libFuzzer reports as a crash.
//
//   mkdir -p build/fuzz-corpus
//   build/h-fuzz/common/fuzz_safetensors build/fuzz-corpus fixtures/safetensors \
//       -dict=fixtures/safetensors/fuzz.dict -max_total_time=120
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <set>
#include <span>

#include "common/case_file.h"
#include "common/error.h"
#include "common/safetensors.h"

namespace {

[[noreturn]] void inconsistent() {
  // abort (not throw): the property failed, the input is the reproduction.
  std::abort();
}

void check_consistent(const paritron::SafetensorsFile& file, size_t input_size) {
  using paritron::DType;
  size_t total = 0;
  std::set<std::string> names;
  for (const auto& [name, tensor] : file.tensors) {
    if (!names.insert(name).second) inconsistent();
    if (tensor.nbytes() != static_cast<size_t>(tensor.numel()) * paritron::dtype_size(tensor.dtype())) inconsistent();
    if (tensor.dtype() == DType::BOOL) {
      for (std::byte b : tensor.bytes()) {
        if (std::to_integer<unsigned>(b) > 1) inconsistent();
      }
    }
    total += tensor.nbytes();
  }
  if (total > input_size) inconsistent();
  // Outside any try: a file the reader accepts must be one the writer writes.
  const auto again = paritron::parse_safetensors(paritron::serialize_safetensors(file), "<reserialized>");
  if (again.metadata != file.metadata || again.tensors.size() != file.tensors.size()) inconsistent();
  for (const auto& [name, tensor] : file.tensors) {
    const paritron::Tensor* other = again.find(name);
    if (!other || !other->bitwise_equal(tensor)) inconsistent();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  std::optional<paritron::SafetensorsFile> file;
  try {
    file = paritron::parse_safetensors(bytes, "fuzz.safetensors");
  } catch (const paritron::Error&) {
    return 0;
  }
  check_consistent(*file, size);
  try {
    (void)paritron::case_from_safetensors(*file, "fuzz.safetensors");
  } catch (const paritron::Error&) {
  }
  return 0;
}
