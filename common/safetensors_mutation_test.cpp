// Deterministic fuzzing of the safetensors reader (common/safetensors.h) and
// the case layer on top (common/case_file.h): the promise of
// shared/spec/case-format.md that malformed files are "rejected with a clear
// error", never a crash.
//
// Valid files (the committed Python-written and Paritron-written fixtures,
// plus a few built here) are mutated thousands of times with a fixed seed:
// bit flips, overwrites with interesting bytes, truncation, header-length
// edits, JSON-text edits (numbers in offsets and shapes, dtypes, duplicated
// and deleted spans, so duplicate keys too), splices of two files. Every parse
// must either throw paritron::Error or return a consistent file: one whose
// tensors hold dtype_size * numel bytes, fit in the input, and survive
// serialize -> parse unchanged. Anything else (another exception type, a
// sanitizer report in the ASan+UBSan build, a crash) fails the test. The
// libFuzzer target common/safetensors_fuzz.cpp holds the same properties.
//
// A failure prints the iteration and the input in hex; rerun with
// --gtest_filter and PARITRON_MUTATION_ITERATION=<n> to replay just that one.
#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <typeinfo>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "common/case_file.h"
#include "common/error.h"
#include "common/safetensors.h"

namespace paritron {
namespace {

using Bytes = std::vector<std::byte>;

constexpr uint64_t kSeed = 0x5afe7e2502025ull;
constexpr int kIterations = 100000;

Bytes read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes out(chars.size());
  std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

// The seed corpus: every committed fixture and a few files built here that
// reach corners the fixtures do not (a header with many small entries,
// pretty-printed JSON, unicode names).
std::vector<Bytes> seed_files() {
  std::vector<Bytes> seeds;
  const auto dir = std::filesystem::path(PARITRON_SOURCE_DIR) / "fixtures/safetensors";
  std::vector<std::filesystem::path> paths;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() == ".safetensors") paths.push_back(entry.path());
  }
  std::sort(paths.begin(), paths.end());  // directory order is not deterministic
  for (const auto& path : paths) seeds.push_back(read_bytes(path));

  SafetensorsFile many;
  many.metadata = {{"component", "moe_router"}, {"config", R"({"num_layers": 1, "hidden_size": 4, "num_attention_heads": 1, "num_moe_experts": 2})"},
                   {"tolerance", R"({"outputs.*": {"rtol": 0, "atol": 0}})"}, {"seed", "7"}};
  int i = 0;
  for (DType dtype : kAllDTypes) {
    Tensor t(dtype, {2, i % 3});
    for (auto& b : t.bytes()) b = std::byte{1};
    many.tensors.emplace_back(fmt::format("outputs.t{}", i++), std::move(t));
  }
  many.tensors.emplace_back("inputs.\xc3\xa9\xe2\x9c\x93", Tensor(DType::BOOL, {}));
  seeds.push_back(serialize_safetensors(many));

  const std::string pretty =
      "{\n  \"__metadata__\": {\"a\": \"b\"},\n  \"x\": {\"dtype\": \"I32\", \"shape\": [2], \"data_offsets\": [0, 8]}\n}";
  Bytes pretty_file(8);
  pretty_file[0] = static_cast<std::byte>(pretty.size());
  for (char c : pretty) pretty_file.push_back(static_cast<std::byte>(c));
  for (int k = 0; k < 8; ++k) pretty_file.push_back(std::byte{0x11});
  seeds.push_back(pretty_file);
  return seeds;
}

uint64_t header_length(const Bytes& file) {
  uint64_t n = 0;
  for (size_t i = std::min<size_t>(8, file.size()); i-- > 0;) n = (n << 8) | std::to_integer<uint64_t>(file[i]);
  return n;
}

void set_header_length(Bytes& file, uint64_t n) {
  if (file.size() < 8) return;
  for (size_t i = 0; i < 8; ++i) file[i] = static_cast<std::byte>((n >> (8 * i)) & 0xFF);
}

// The header's text and where it ends, when the length field is sane.
bool split(const Bytes& file, std::string& header, Bytes& data) {
  if (file.size() < 8) return false;
  const uint64_t n = header_length(file);
  if (n > file.size() - 8) return false;
  header.assign(reinterpret_cast<const char*>(file.data()) + 8, n);
  data.assign(file.begin() + 8 + static_cast<std::ptrdiff_t>(n), file.end());
  return true;
}

Bytes join(const std::string& header, const Bytes& data, std::optional<uint64_t> length = std::nullopt) {
  Bytes out(8);
  set_header_length(out, length.value_or(header.size()));
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}

  size_t below(size_t n) { return n == 0 ? 0 : std::uniform_int_distribution<size_t>(0, n - 1)(rng_); }
  bool coin(double p = 0.5) { return std::bernoulli_distribution(p)(rng_); }

  void mutate(Bytes& file, const std::vector<Bytes>& seeds) {
    switch (below(11)) {
      case 0: bit_flip(file); break;
      case 1: overwrite(file); break;
      case 2: truncate(file); break;
      case 3: edit_length(file); break;
      case 4: edit_number(file); break;
      case 5: edit_dtype(file); break;
      case 6: duplicate_span(file); break;
      case 7: delete_span(file); break;
      case 8: splice(file, seeds[below(seeds.size())]); break;
      case 9: shift_offsets(file); break;
      default: edit_data(file); break;
    }
  }

 private:
  // Positions mostly in the header: that is where the parser's logic is.
  size_t position(const Bytes& file) {
    const uint64_t n = header_length(file);
    if (file.size() > 8 && n <= file.size() - 8 && coin(0.8)) return 8 + below(n);
    return below(file.size());
  }

  void bit_flip(Bytes& file) {
    if (file.empty()) return;
    file[position(file)] ^= static_cast<std::byte>(1u << below(8));
  }

  void overwrite(Bytes& file) {
    static constexpr std::array<unsigned char, 24> kInteresting = {
        0x00, 0xff, 0x7f, 0x80, 0x01, '"', '{', '}', '[', ']', ',', ':', '-', '0', '9', ' ', '\\', 'e', '.', 'u',
        0xc0, 0xed, 0xf4, 0xef};
    if (file.empty()) return;
    file[position(file)] = static_cast<std::byte>(kInteresting[below(kInteresting.size())]);
  }

  void truncate(Bytes& file) { file.resize(below(file.size() + 1)); }

  void edit_length(Bytes& file) {
    if (file.size() < 8) return;
    const uint64_t n = header_length(file);
    static constexpr std::array<uint64_t, 8> kValues = {0, 1, 7, 8, kMaxSafetensorsHeaderBytes,
                                                        kMaxSafetensorsHeaderBytes + 1, uint64_t{1} << 63, ~uint64_t{0}};
    switch (below(4)) {
      case 0: set_header_length(file, n + below(17) - 8); break;
      case 1: set_header_length(file, kValues[below(kValues.size())]); break;
      case 2: set_header_length(file, file.size() - 8 - std::min<size_t>(file.size() - 8, below(4))); break;
      default: file[below(8)] = static_cast<std::byte>(below(256)); break;
    }
  }

  // Rewrites one number of the header (offsets, shapes, tolerances) and
  // keeps the length field in step so the edit reaches the entry checks.
  void edit_number(Bytes& file) {
    std::string header;
    Bytes data;
    if (!split(file, header, data)) return bit_flip(file);
    std::vector<size_t> starts;
    for (size_t i = 0; i < header.size(); ++i) {
      if (std::isdigit(static_cast<unsigned char>(header[i])) && (i == 0 || !std::isdigit(static_cast<unsigned char>(header[i - 1])))) {
        starts.push_back(i);
      }
    }
    if (starts.empty()) return bit_flip(file);
    const size_t begin = starts[below(starts.size())];
    size_t end = begin;
    while (end < header.size() && std::isdigit(static_cast<unsigned char>(header[end]))) ++end;
    const uint64_t old = std::strtoull(header.substr(begin, end - begin).c_str(), nullptr, 10);
    static const std::array<std::string, 14> kReplacements = {
        "0", "-1", "1.5", "2.0", "1e3", "9223372036854775807", "9223372036854775808", "18446744073709551615",
        "18446744073709551616", "1e400", "-0", "4294967296", "00", "null"};
    std::string replacement;
    switch (below(4)) {
      case 0: replacement = kReplacements[below(kReplacements.size())]; break;
      // Another number of the same header: an offset of a neighbour makes
      // overlaps and holes, an extent of another tensor plausible shapes.
      case 1: {
        const size_t other = starts[below(starts.size())];
        size_t other_end = other;
        while (other_end < header.size() && std::isdigit(static_cast<unsigned char>(header[other_end]))) ++other_end;
        replacement = header.substr(other, other_end - other);
        break;
      }
      case 2: replacement = std::to_string(old + 1); break;
      default: replacement = std::to_string(old == 0 ? 0 : old - 1); break;
    }
    header.replace(begin, end - begin, replacement);
    file = join(header, data);
  }

  void edit_dtype(Bytes& file) {
    std::string header;
    Bytes data;
    if (!split(file, header, data)) return bit_flip(file);
    static const std::array<std::string, 15> kNames = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32",
                                                       "I8",  "U8",  "BOOL", "I16", "F8_E4M3FNUZ", "", "f32"};
    const size_t at = header.find("\"dtype\":\"", below(header.size()));
    if (at == std::string::npos) return bit_flip(file);
    const size_t begin = at + 9;
    const size_t end = header.find('"', begin);
    if (end == std::string::npos) return;
    header.replace(begin, end - begin, kNames[below(kNames.size())]);
    file = join(header, data);
  }

  // Moves one tensor's data_offsets [b, e] to [b + d, e + d], keeping its
  // byte count right so the layout checks (overlaps, holes, range) are reached.
  void shift_offsets(Bytes& file) {
    std::string header;
    Bytes data;
    if (!split(file, header, data)) return bit_flip(file);
    const std::string key = "\"data_offsets\":[";
    const size_t at = header.find(key, below(header.size()));
    if (at == std::string::npos) return bit_flip(file);
    const size_t begin = at + key.size();
    const size_t end = header.find(']', begin);
    const size_t comma = header.find(',', begin);
    if (end == std::string::npos || comma == std::string::npos || comma > end) return;
    // strtoll saturates where atoll would be undefined; offsets this large
    // are for edit_number, here they would overflow the shift.
    const long long b = std::strtoll(header.c_str() + begin, nullptr, 10);
    const long long e = std::strtoll(header.c_str() + comma + 1, nullptr, 10);
    if (b < 0 || e < 0 || b > (1LL << 40) || e > (1LL << 40)) return bit_flip(file);
    static constexpr std::array<long long, 6> kShifts = {-8, -2, -1, 1, 2, 8};
    long long d = kShifts[below(kShifts.size())];
    if (coin(0.3)) d = e > b ? (coin() ? e - b : b - e) : d;  // exactly onto a neighbour
    if (b + d < 0) d = -b;
    header.replace(begin, end - begin, fmt::format("{},{}", b + d, e + d));
    file = join(header, data);
  }

  // Copies a span of the header elsewhere in it: duplicate keys, entries,
  // brackets; with the length adjusted or not.
  void duplicate_span(Bytes& file) {
    std::string header;
    Bytes data;
    if (!split(file, header, data) || header.empty()) return bit_flip(file);
    const size_t begin = below(header.size());
    const size_t length = 1 + below(std::min<size_t>(header.size() - begin, 120));
    const std::string span = header.substr(begin, length);
    header.insert(below(header.size() + 1), coin() ? span : "," + span);
    file = join(header, data, coin(0.9) ? std::nullopt : std::optional<uint64_t>(header.size() - length));
  }

  void delete_span(Bytes& file) {
    std::string header;
    Bytes data;
    if (!split(file, header, data) || header.empty()) return bit_flip(file);
    const size_t begin = below(header.size());
    header.erase(begin, 1 + below(std::min<size_t>(header.size() - begin, 40)));
    file = join(header, data);
  }

  // The header of one file with the data of another, or a chunk of another
  // file pasted in.
  void splice(Bytes& file, const Bytes& other) {
    std::string header, other_header;
    Bytes data, other_data;
    if (coin() && split(file, header, data) && split(other, other_header, other_data)) {
      file = join(header, other_data);
      return;
    }
    if (other.empty()) return;
    const size_t begin = below(other.size());
    const size_t length = 1 + below(std::min<size_t>(other.size() - begin, 64));
    const size_t at = below(file.size() + 1);
    file.insert(file.begin() + static_cast<std::ptrdiff_t>(at), other.begin() + static_cast<std::ptrdiff_t>(begin),
                other.begin() + static_cast<std::ptrdiff_t>(begin + length));
  }

  // Grows or shrinks the data: trailing bytes, short tensors, BOOL bytes.
  void edit_data(Bytes& file) {
    switch (below(3)) {
      case 0: file.push_back(static_cast<std::byte>(below(3))); break;
      case 1:
        if (file.size() > 8) file.pop_back();
        break;
      default:
        if (!file.empty()) file[file.size() - 1 - below(std::min<size_t>(file.size(), 16))] = std::byte{2};
        break;
    }
  }

  std::mt19937_64 rng_;
};

std::string hex(const Bytes& bytes) {
  std::string out;
  for (size_t i = 0; i < std::min<size_t>(bytes.size(), 4096); ++i) out += fmt::format("{:02x}", std::to_integer<unsigned>(bytes[i]));
  return bytes.size() > 4096 ? out + "..." : out;
}

// A rejection message without the file name, numbers and quoted names.
std::string message_kind(const std::string& message) {
  std::string kind;
  bool in_quotes = false;
  for (size_t i = message.find(": ") + 2; i < message.size() && kind.size() < 70; ++i) {
    const char c = message[i];
    if (c == '"') in_quotes = !in_quotes;
    if (in_quotes || std::isdigit(static_cast<unsigned char>(c))) continue;
    kind += c;
  }
  return kind;
}

// A parse that succeeded must describe a well-formed file. Returns "" or what
// is wrong.
std::string inconsistency(const SafetensorsFile& file, const Bytes& input) {
  size_t total = 0;
  std::set<std::string> names;
  for (const auto& [name, tensor] : file.tensors) {
    if (!names.insert(name).second) return "duplicate name " + name;
    if (tensor.nbytes() != static_cast<size_t>(tensor.numel()) * dtype_size(tensor.dtype())) return "byte count of " + name;
    if (tensor.dtype() == DType::BOOL) {
      for (std::byte b : tensor.bytes()) {
        if (std::to_integer<unsigned>(b) > 1) return "BOOL byte in " + name;
      }
    }
    total += tensor.nbytes();
  }
  if (total > input.size()) return "tensors hold more bytes than the input";
  // serialize_safetensors may throw here: the test reports it, since a file
  // the reader accepts must be one the writer can write.
  const SafetensorsFile again = parse_safetensors(serialize_safetensors(file), "<reserialized>");
  if (again.metadata != file.metadata) return "metadata changed through serialize -> parse";
  if (again.tensors.size() != file.tensors.size()) return "tensor count changed through serialize -> parse";
  for (const auto& [name, tensor] : file.tensors) {
    const Tensor* other = again.find(name);
    if (!other || !other->bitwise_equal(tensor)) return "tensor " + name + " changed through serialize -> parse";
  }
  return "";
}

TEST(SafetensorsMutation, MalformedFilesThrowErrorOrParseConsistently) {
  const std::vector<Bytes> seeds = seed_files();
  ASSERT_GE(seeds.size(), 8u) << "fixtures missing";
  for (const Bytes& seed : seeds) {
    ASSERT_NO_THROW(parse_safetensors(seed)) << "a seed file does not parse";
  }

  const char* only = std::getenv("PARITRON_MUTATION_ITERATION");
  const int only_iteration = only ? std::atoi(only) : -1;
  Mutator mutator(kSeed);
  int parsed = 0, rejected = 0, cases_read = 0;
  // PARITRON_MUTATION_STATS=1 prints how often each kind of rejection came
  // up, to see which checks the mutations reach.
  const bool stats = std::getenv("PARITRON_MUTATION_STATS") != nullptr;
  std::map<std::string, int> messages;
  for (int iteration = 0; iteration < kIterations; ++iteration) {
    Bytes file = seeds[mutator.below(seeds.size())];
    const size_t mutations = 1 + mutator.below(3);
    for (size_t m = 0; m < mutations; ++m) mutator.mutate(file, seeds);
    if (only_iteration >= 0 && iteration != only_iteration) continue;

    std::optional<SafetensorsFile> result;
    try {
      result = parse_safetensors(file, "mutated.safetensors");
    } catch (const Error& e) {
      ++rejected;
      const std::string message = e.what();
      if (stats) ++messages[message_kind(message)];
      if (message.rfind("mutated.safetensors: ", 0) != 0) {
        ADD_FAILURE() << "iteration " << iteration << ": message does not name the file: " << message;
      }
      continue;
    } catch (const std::exception& e) {
      FAIL() << "iteration " << iteration << ": threw " << typeid(e).name() << " (not paritron::Error): " << e.what()
             << "\ninput: " << hex(file);
    }
    ++parsed;
    try {
      const std::string problem = inconsistency(*result, file);
      ASSERT_EQ(problem, "") << "iteration " << iteration << "\ninput: " << hex(file);
    } catch (const std::exception& e) {
      FAIL() << "iteration " << iteration << ": an accepted file does not re-serialize: " << e.what()
             << "\ninput: " << hex(file);
    }
    // The case layer on top: metadata values are as hostile as the header.
    try {
      (void)case_from_safetensors(*result, "mutated.safetensors");
      ++cases_read;
    } catch (const Error&) {
    } catch (const std::exception& e) {
      FAIL() << "iteration " << iteration << ": case_from_safetensors threw " << typeid(e).name()
             << " (not paritron::Error): " << e.what() << "\ninput: " << hex(file);
    }
  }
  // The mutations must exercise both paths, or the test proves little.
  if (only_iteration < 0) {
    EXPECT_GT(parsed, kIterations / 50) << "too few mutated files parse";
    EXPECT_GT(rejected, kIterations / 2) << "too few mutated files are rejected";
    EXPECT_GT(cases_read, 0);
  }
  std::printf("%d parsed, %d rejected, %d read as cases\n", parsed, rejected, cases_read);
  for (const auto& [kind, count] : messages) std::printf("%7d  %s\n", count, kind.c_str());
}

}  // namespace
}  // namespace paritron
