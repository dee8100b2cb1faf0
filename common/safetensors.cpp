// Implements common/safetensors.h: the safetensors container of case files
// (shared/spec/case-format.md, "Container").
//
// Parsing runs in a fixed order so that each malformed file gets the message
// for its first problem: the 8-byte length, the header bytes (size, UTF-8),
// the JSON (syntax, duplicate keys, nesting), each entry (types, dtype, shape,
// byte count, range), then the layout of the data (overlaps, holes, trailing
// bytes), then the tensor bytes themselves (BOOL must be 0/1).
#include "common/safetensors.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <fstream>
#include <limits>
#include <optional>
#include <random>
#include <set>
#include <system_error>
#include <tuple>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/strict_json.h"

namespace paritron {
namespace {

using nlohmann::json;

constexpr std::string_view kMetadataKey = "__metadata__";
constexpr size_t kLengthBytes = 8;

// Real headers nest three deep ({name: {shape: [...]}}). Refusing anything
// much deeper keeps a hostile header from building a tree that recursive code
// (json::dump in error messages, destructors) could overflow the stack on.
constexpr int kMaxJsonDepth = 32;

[[noreturn]] void fail(const std::string& source, const std::string& problem) {
  throw CaseFormatError(fmt::format("{}: {}", source, problem));
}

// Index of the first byte that is not part of well-formed UTF-8 (RFC 3629: no
// overlong forms, no surrogates, nothing above U+10FFFF), or npos.
size_t first_invalid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c == 0xE0) {
      len = 3, lo = 0xA0;
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
      len = 3;
    } else if (c == 0xED) {
      len = 3, hi = 0x9F;
    } else if (c == 0xF0) {
      len = 4, lo = 0x90;
    } else if (c >= 0xF1 && c <= 0xF3) {
      len = 4;
    } else if (c == 0xF4) {
      len = 4, hi = 0x8F;
    } else {
      return i;
    }
    if (len > s.size() - i) return i;
    const auto second = static_cast<unsigned char>(s[i + 1]);
    if (second < lo || second > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if (b < 0x80 || b > 0xBF) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

// A value's JSON text for a message, cut short.
std::string brief(const json& value) { return json_brief(value, 60); }

// "a string", "an array", "a negative number", ... for "X is <kind>" messages.
std::string kind(const json& value) {
  if (value.is_number_float()) return "a non-integer number";
  if (value.is_number_integer() && !value.is_number_unsigned()) return "a negative number";
  switch (value.type()) {
    case json::value_t::object: return "an object";
    case json::value_t::array: return "an array";
    default: return fmt::format("a {}", value.type_name());
  }
}

// Parses the header text strictly (common/strict_json.h): in a safetensors
// header a repeated name means two tensors claim one name.
json parse_header_json(std::string_view text, const std::string& source) {
  const auto duplicate = [](int depth, const std::string& key) {
    if (depth == 1 && key != kMetadataKey) return fmt::format("duplicate tensor name {} in the header", json_quoted(key));
    return fmt::format("duplicate key {} in the header JSON", json_quoted(key));
  };
  return parse_strict_json<json>(text, source, {.what = "header", .max_depth = kMaxJsonDepth, .duplicate_message = duplicate});
}

// A JSON integer in [0, INT64_MAX]: extents and offsets. The int64 bound keeps
// every later sum and product in range and matches Shape's element type.
std::optional<uint64_t> as_count(const json& value) {
  constexpr auto kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  if (value.is_number_unsigned()) {
    const auto v = value.get<uint64_t>();
    if (v <= kMax) return v;
  } else if (value.is_number_integer() && value.get<int64_t>() >= 0) {
    return static_cast<uint64_t>(value.get<int64_t>());
  }
  return std::nullopt;
}

struct Entry {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

std::string all_dtype_names() {
  std::vector<std::string_view> names;
  for (DType d : kAllDTypes) names.push_back(dtype_name(d));
  return fmt::format("{}", fmt::join(names, ", "));
}

Entry parse_entry(const std::string& name, const json& value, uint64_t data_len,
                  const std::string& source) {
  const std::string tensor = fmt::format("tensor {}", json_quoted(name));
  if (!value.is_object()) {
    fail(source, fmt::format("{}: entry is {} ({}), not an object with dtype, shape and data_offsets",
                             tensor, kind(value), brief(value)));
  }
  for (const auto& [key, unused] : value.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      fail(source, fmt::format("{}: unexpected key {} (an entry has dtype, shape and data_offsets)",
                               tensor, json_quoted(key)));
    }
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(key)) fail(source, fmt::format("{}: entry has no \"{}\"", tensor, key));
  }

  Entry entry;
  entry.name = name;
  const json& dtype = value.at("dtype");
  if (!dtype.is_string()) {
    fail(source, fmt::format("{}: dtype is {} ({}), not a string", tensor, kind(dtype), brief(dtype)));
  }
  const auto parsed_dtype = dtype_from_name(dtype.get_ref<const std::string&>());
  if (!parsed_dtype) {
    fail(source, fmt::format("{}: unknown dtype {} (Paritron reads {})", tensor, brief(dtype),
                             all_dtype_names()));
  }
  entry.dtype = *parsed_dtype;

  const json& shape = value.at("shape");
  if (!shape.is_array()) {
    fail(source, fmt::format("{}: shape is {} ({}), not an array", tensor, kind(shape), brief(shape)));
  }
  for (const json& extent : shape) {
    const auto count = as_count(extent);
    if (!count) {
      fail(source, fmt::format("{}: shape {} has extent {} that is not an integer in [0, 2^63)",
                               tensor, brief(shape), brief(extent)));
    }
    entry.shape.push_back(static_cast<int64_t>(*count));
  }

  const json& offsets = value.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2) {
    fail(source, fmt::format("{}: data_offsets is {}, not an array [begin, end]", tensor, brief(offsets)));
  }
  const auto begin = as_count(offsets[0]), end = as_count(offsets[1]);
  if (!begin || !end) {
    fail(source, fmt::format("{}: data_offsets {} must hold two integers in [0, 2^63)", tensor,
                             brief(offsets)));
  }
  if (*begin > *end) {
    fail(source, fmt::format("{}: data_offsets [{}, {}] begin after they end", tensor, *begin, *end));
  }
  entry.begin = *begin;
  entry.end = *end;

  // numel and bytes with the same left-to-right overflow rule as
  // shape_numel(), so that Tensor never throws on a shape accepted here.
  int64_t numel = 1;
  for (int64_t extent : entry.shape) {
    if (extent != 0 && numel > std::numeric_limits<int64_t>::max() / extent) {
      fail(source, fmt::format("{}: shape {} has more elements than fit in 64 bits", tensor,
                               shape_string(entry.shape)));
    }
    numel *= extent;
  }
  const auto size = static_cast<int64_t>(dtype_size(entry.dtype));
  if (numel > std::numeric_limits<int64_t>::max() / size) {
    fail(source, fmt::format("{}: {} tensor of shape {} is too large", tensor, dtype_name(entry.dtype),
                             shape_string(entry.shape)));
  }
  const auto nbytes = static_cast<uint64_t>(numel * size);
  if (entry.end - entry.begin != nbytes) {
    fail(source, fmt::format("{}: {} of shape {} needs {} bytes, but data_offsets [{}, {}] hold {}",
                             tensor, dtype_name(entry.dtype), shape_string(entry.shape), nbytes,
                             entry.begin, entry.end, entry.end - entry.begin));
  }
  if (entry.end > data_len) {
    fail(source, fmt::format("{}: data_offsets [{}, {}] run past the end of the data ({} bytes)", tensor,
                             entry.begin, entry.end, data_len));
  }
  return entry;
}

std::map<std::string, std::string> parse_metadata(const json& value, const std::string& source) {
  // The Rust crate reads __metadata__ as Option<HashMap>: null means none.
  if (value.is_null()) return {};
  if (!value.is_object()) {
    fail(source, fmt::format("__metadata__ is {} ({}), not an object of strings", kind(value), brief(value)));
  }
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      fail(source, fmt::format("__metadata__ value of {} is {} ({}), not a string", json_quoted(key), kind(item),
                               brief(item)));
    }
    metadata.emplace(key, item.get<std::string>());
  }
  return metadata;
}

uint64_t read_u64_le(std::span<const std::byte> bytes) {
  uint64_t v = 0;
  for (size_t i = kLengthBytes; i-- > 0;) v = (v << 8) | std::to_integer<uint64_t>(bytes[i]);
  return v;
}

void write_u64_le(std::byte* out, uint64_t v) {
  for (size_t i = 0; i < kLengthBytes; ++i) out[i] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
}

// Index of the first BOOL byte that is neither 0 nor 1, or -1.
int64_t first_bad_bool(std::span<const std::byte> bytes) {
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (std::to_integer<unsigned>(bytes[i]) > 1) return static_cast<int64_t>(i);
  }
  return -1;
}

}  // namespace

const Tensor* SafetensorsFile::find(std::string_view name) const {
  for (const auto& [tensor_name, tensor] : tensors) {
    if (tensor_name == name) return &tensor;
  }
  return nullptr;
}

SafetensorsFile parse_safetensors(std::span<const std::byte> bytes, const std::string& source) {
  if (bytes.size() < kLengthBytes) {
    fail(source, fmt::format("file is {} bytes, shorter than the 8-byte header length", bytes.size()));
  }
  const uint64_t header_len = read_u64_le(bytes.first(kLengthBytes));
  const uint64_t rest = bytes.size() - kLengthBytes;
  if (header_len > kMaxSafetensorsHeaderBytes) {
    fail(source, fmt::format("header length {} exceeds the {}-byte limit (not a safetensors file, "
                             "or a corrupt one)", header_len, kMaxSafetensorsHeaderBytes));
  }
  if (header_len > rest) {
    fail(source, fmt::format("header length {} runs past the end of the file ({} bytes follow the "
                             "8-byte length)", header_len, rest));
  }
  const auto header_bytes = bytes.subspan(kLengthBytes, header_len);
  const std::string_view header_text(reinterpret_cast<const char*>(header_bytes.data()), header_bytes.size());
  if (const size_t bad = first_invalid_utf8(header_text); bad != std::string_view::npos) {
    fail(source, fmt::format("header is not valid UTF-8 (byte 0x{:02x} at header offset {})",
                             static_cast<unsigned char>(header_text[bad]), bad));
  }
  // nlohmann skips a leading byte order mark; serde (and so Python) does not.
  if (header_text.starts_with("\xEF\xBB\xBF")) {
    fail(source, "header is not valid JSON: it starts with a UTF-8 byte order mark");
  }
  const json header = parse_header_json(header_text, source);
  if (!header.is_object()) {
    fail(source, fmt::format("header JSON is {}, not an object", kind(header)));
  }

  const auto data = bytes.subspan(kLengthBytes + header_len);
  SafetensorsFile file;
  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      file.metadata = parse_metadata(value, source);
    } else {
      entries.push_back(parse_entry(name, value, data.size(), source));
    }
  }

  // The tensors must tile the data exactly: sorted by offsets, each begins
  // where the previous one ends (zero-size tensors take no room), and the
  // last ends at the end of the file. Names break ties between zero-size
  // tensors so the order is deterministic.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t covered = 0;
  const Entry* previous = nullptr;
  for (const Entry& entry : entries) {
    if (entry.begin < covered) {
      fail(source, fmt::format("tensor {} (data_offsets [{}, {}]) overlaps tensor {} ([{}, {}])",
                               json_quoted(entry.name), entry.begin, entry.end, json_quoted(previous->name),
                               previous->begin, previous->end));
    }
    if (entry.begin > covered) {
      fail(source, fmt::format("data bytes [{}, {}) belong to no tensor (a hole before tensor {})", covered,
                               entry.begin, json_quoted(entry.name)));
    }
    covered = entry.end;
    previous = &entry;
  }
  if (covered != data.size()) {
    fail(source, fmt::format("{} trailing bytes after the last tensor (the tensors end at data offset {}, "
                             "the data is {} bytes)", data.size() - covered, covered, data.size()));
  }

  file.tensors.reserve(entries.size());
  for (Entry& entry : entries) {
    const auto tensor_bytes = data.subspan(entry.begin, entry.end - entry.begin);
    if (entry.dtype == DType::BOOL) {
      if (const int64_t bad = first_bad_bool(tensor_bytes); bad >= 0) {
        fail(source, fmt::format("tensor {}: BOOL element {} is byte 0x{:02x} (must be 0 or 1)",
                                 json_quoted(entry.name), bad,
                                 std::to_integer<unsigned>(tensor_bytes[static_cast<size_t>(bad)])));
      }
    }
    try {
      file.tensors.emplace_back(std::move(entry.name),
                                Tensor::from_bytes(entry.dtype, std::move(entry.shape), tensor_bytes));
    } catch (const Error& e) {
      fail(source, e.what());  // unreachable by construction: the checks above are Tensor's
    }
  }
  return file;
}

SafetensorsFile read_safetensors(const std::filesystem::path& path) {
  const std::string source = path.string();
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail(source, "is a directory, not a safetensors file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(source, fmt::format("cannot open: {}", std::generic_category().message(errno)));
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  in.seekg(0, std::ios::beg);
  if (!in || size < 0) fail(source, "cannot determine the file's size");
  std::vector<std::byte> bytes(static_cast<size_t>(size));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (in.gcount() != static_cast<std::streamsize>(size)) fail(source, "could not read the whole file");
  return parse_safetensors(bytes, source);
}

std::vector<std::byte> serialize_safetensors(const SafetensorsFile& file) {
  // Everything parse_safetensors would refuse is refused here, so a file
  // Paritron writes always reads back.
  auto check_text = [](std::string_view what, std::string_view text) {
    if (first_invalid_utf8(text) != std::string_view::npos) {
      throw Error(fmt::format("cannot write safetensors: {} {} is not valid UTF-8", what, json_quoted(text)));
    }
  };
  std::vector<const std::pair<std::string, Tensor>*> order;
  order.reserve(file.tensors.size());
  for (const auto& item : file.tensors) order.push_back(&item);
  std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) { return a->first < b->first; });
  for (size_t i = 0; i < order.size(); ++i) {
    const auto& [name, tensor] = *order[i];
    check_text("tensor name", name);
    if (name == kMetadataKey) throw Error("cannot write safetensors: tensor name \"__metadata__\" is reserved");
    if (i > 0 && order[i - 1]->first == name) {
      throw Error(fmt::format("cannot write safetensors: duplicate tensor name {}", json_quoted(name)));
    }
    if (tensor.dtype() == DType::BOOL) {
      if (const int64_t bad = first_bad_bool(tensor.bytes()); bad >= 0) {
        throw Error(fmt::format("cannot write safetensors: BOOL tensor {} holds a byte other than 0/1 at "
                                "element {}", json_quoted(name), bad));
      }
    }
  }

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!file.metadata.empty()) {
    auto& metadata = header[std::string(kMetadataKey)] = nlohmann::ordered_json::object();
    for (const auto& [key, value] : file.metadata) {
      check_text("metadata key", key);
      check_text(fmt::format("value of metadata key {}", json_quoted(key)), value);
      metadata[key] = value;
    }
  }
  uint64_t offset = 0;
  for (const auto* item : order) {
    const Tensor& tensor = item->second;
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = std::string(dtype_name(tensor.dtype()));
    entry["shape"] = tensor.shape();
    entry["data_offsets"] = {offset, offset + tensor.nbytes()};
    header[item->first] = std::move(entry);
    offset += tensor.nbytes();
  }
  std::string text = header.dump();
  // Spaces up to a multiple of 8 keep the data 8-byte aligned, as Python does.
  text.append((kLengthBytes - text.size() % kLengthBytes) % kLengthBytes, ' ');

  std::vector<std::byte> out(kLengthBytes + text.size() + offset);
  write_u64_le(out.data(), text.size());
  std::copy_n(reinterpret_cast<const std::byte*>(text.data()), text.size(), out.data() + kLengthBytes);
  std::byte* data = out.data() + kLengthBytes + text.size();
  for (const auto* item : order) {
    const auto tensor_bytes = item->second.bytes();
    std::copy(tensor_bytes.begin(), tensor_bytes.end(), data);
    data += tensor_bytes.size();
  }
  return out;
}

void write_safetensors(const std::filesystem::path& path, const SafetensorsFile& file) {
  const std::vector<std::byte> bytes = serialize_safetensors(file);
  // A unique temporary beside the target (same file system, so the rename is
  // atomic), so concurrent writers and readers never see a partial file.
  std::random_device random;
  const uint64_t tag = (static_cast<uint64_t>(random()) << 32) ^ random();
  std::filesystem::path temp = path;
  temp += fmt::format(".tmp-{:016x}", tag);
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    if (!out) {
      throw Error(fmt::format("{}: cannot create {}: {}", path.string(), temp.string(),
                              std::generic_category().message(errno)));
    }
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(temp, ignored);
      throw Error(fmt::format("{}: writing {} failed", path.string(), temp.string()));
    }
  }
  std::error_code ec;
  std::filesystem::rename(temp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(temp, ignored);
    throw Error(fmt::format("{}: cannot move {} into place: {}", path.string(), temp.string(), ec.message()));
  }
}

}  // namespace paritron
