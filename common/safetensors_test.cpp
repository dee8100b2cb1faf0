// The safetensors reader and writer (common/safetensors.h) against
// shared/spec/case-format.md, "Container": files the Python package wrote
// (fixtures/safetensors/python_*.safetensors, see make_python_files.py for how
// their values were made) read back to exactly the known values; our writer's
// bytes are deterministic and match the committed ours_*.safetensors files
// that fixtures/safetensors/check_python_reads.py proved Python reads; every
// malformed-file rule is rejected with a message naming the file and the
// problem.
//
// PARITRON_UPDATE_FIXTURES=1 rewrites ours_*.safetensors instead of comparing.
#include "common/safetensors.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <random>
#include <set>

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include "common/error.h"

namespace paritron {
namespace {

const std::filesystem::path kFixtures = std::filesystem::path(PARITRON_SOURCE_DIR) / "fixtures/safetensors";

std::vector<std::byte> as_bytes(std::string_view s) {
  std::vector<std::byte> out(s.size());
  std::memcpy(out.data(), s.data(), s.size());
  return out;
}

// A file with the given header text (no padding) and data bytes.
std::vector<std::byte> make_file(std::string_view header, std::string_view data = "",
                                 std::optional<uint64_t> header_len = std::nullopt) {
  const uint64_t n = header_len.value_or(header.size());
  std::vector<std::byte> out(8);
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xFF);
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  for (char c : data) out.push_back(static_cast<std::byte>(c));
  return out;
}

std::vector<std::byte> read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(chars.size());
  std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

// parse_safetensors must throw CaseFormatError whose message names the file
// and contains `problem`.
void expect_rejected(const std::vector<std::byte>& bytes, std::string_view problem) {
  try {
    parse_safetensors(bytes, "bad.safetensors");
    ADD_FAILURE() << "accepted a file that should fail with: " << problem;
  } catch (const CaseFormatError& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.rfind("bad.safetensors: ", 0), 0u) << message;
    EXPECT_NE(message.find(problem), std::string::npos) << "message: " << message << "\nwanted: " << problem;
  }
}

Tensor from_bits16(DType dtype, Shape shape, std::initializer_list<uint16_t> bits) {
  Tensor t(dtype, std::move(shape));
  std::copy(bits.begin(), bits.end(), t.data<uint16_t>().begin());
  return t;
}

Tensor from_bits8(DType dtype, Shape shape, std::initializer_list<uint8_t> bits) {
  Tensor t(dtype, std::move(shape));
  std::copy(bits.begin(), bits.end(), t.data<uint8_t>().begin());
  return t;
}

Tensor values(DType dtype, Shape shape, std::vector<double> v) { return Tensor::from_values(dtype, std::move(shape), v); }

// The tensors of python_all_dtypes.safetensors, as make_python_files.py states
// them, in the data-offset order Python gave them (dtype alignment, then name).
std::vector<std::pair<std::string, Tensor>> expected_all_dtypes() {
  Tensor special(DType::F64, {4});
  const uint64_t special_bits[4] = {0x8000000000000000ull, 0x7ff0000000000000ull, 0xfff0000000000000ull,
                                    0x7ff8000000000000ull};
  std::memcpy(special.bytes().data(), special_bits, sizeof special_bits);
  return {
      {"i64", Tensor::from_bytes(DType::I64, {4}, [] {
         static const int64_t v[4] = {-(int64_t{1} << 62), -1, 0, (int64_t{1} << 40) + 1};
         return std::as_bytes(std::span(v));
       }())},
      {"f64", values(DType::F64, {2, 3}, {-1.25, -0.75, -0.25, 0.25, 0.75, 1.25})},
      {"f64_special", special},
      {"f32", values(DType::F32, {2, 2, 2}, {-1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75})},
      {"i32", values(DType::I32, {2, 2}, {-2147483648.0, -1, 0, 2147483647.0})},
      {"bf16", from_bits16(DType::BF16, {2, 2}, {0x3f80, 0xc000, 0x3f00, 0x4040})},
      {"f16", values(DType::F16, {5}, {0, 1, -2, 0.5, 65504})},
      {"f8_e4m3", from_bits8(DType::F8_E4M3, {6}, {0x00, 0x38, 0xb8, 0x40, 0x7e, 0x01})},
      {"f8_e5m2", from_bits8(DType::F8_E5M2, {6}, {0x00, 0x3c, 0xbc, 0x40, 0x7b, 0x01})},
      {"i8", values(DType::I8, {4}, {-128, -1, 0, 127})},
      {"u8", values(DType::U8, {4}, {0, 1, 128, 255})},
      {"bool", values(DType::BOOL, {5}, {1, 0, 0, 1, 1})},
  };
}

std::vector<std::pair<std::string, Tensor>> expected_scalar_and_empty() {
  return {{"empty", Tensor(DType::F32, {0})},
          {"empty_2d", Tensor(DType::I64, {2, 0})},
          {"scalar", values(DType::F32, {}, {3.5})},
          {"empty_3d", Tensor(DType::BOOL, {0, 3, 1})}};
}

void expect_same_tensors(const std::vector<std::pair<std::string, Tensor>>& actual,
                         const std::vector<std::pair<std::string, Tensor>>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].first, expected[i].first) << "tensor " << i;
    EXPECT_TRUE(actual[i].second.bitwise_equal(expected[i].second)) << actual[i].first;
  }
}

// Compares with (or, under PARITRON_UPDATE_FIXTURES=1, rewrites) a committed
// file of our writer's bytes.
void expect_committed(const std::string& file_name, const std::vector<std::byte>& bytes) {
  const auto path = kFixtures / file_name;
  if (const char* update = std::getenv("PARITRON_UPDATE_FIXTURES"); update && std::string(update) == "1") {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                                static_cast<std::streamsize>(bytes.size()));
    return;
  }
  EXPECT_TRUE(read_bytes(path) == bytes) << path << " differs from what the writer produces now; if the "
                                         << "change is intended, rerun with PARITRON_UPDATE_FIXTURES=1 and "
                                         << "then fixtures/safetensors/check_python_reads.py";
}

// ---------------------------------------------------------------------------
// Files written by Python

TEST(Safetensors, ReadsEveryDtypePythonWrites) {
  const SafetensorsFile file = read_safetensors(kFixtures / "python_all_dtypes.safetensors");
  EXPECT_EQ(file.metadata.size(), 2u);
  EXPECT_EQ(file.metadata.at("purpose"), "every dtype");
  EXPECT_EQ(file.metadata.at("writer").rfind("safetensors ", 0), 0u);
  expect_same_tensors(file.tensors, expected_all_dtypes());

  // The same numbers through get(), as the script states them.
  EXPECT_EQ(file.find("bf16")->to_doubles(), (std::vector<double>{1, -2, 0.5, 3}));
  EXPECT_EQ(file.find("f8_e4m3")->to_doubles(), (std::vector<double>{0, 1, -1, 2, 448, std::ldexp(1.0, -9)}));
  EXPECT_EQ(file.find("f8_e5m2")->to_doubles(), (std::vector<double>{0, 1, -1, 2, 57344, std::ldexp(1.0, -16)}));
  EXPECT_EQ(file.find("f16")->to_doubles(), (std::vector<double>{0, 1, -2, 0.5, 65504}));
  EXPECT_EQ(file.find("i64")->get_int(0), -(int64_t{1} << 62));
  EXPECT_EQ(file.find("i32")->shape(), (Shape{2, 2}));
  const Tensor& special = *file.find("f64_special");
  EXPECT_TRUE(std::signbit(special.get(0)) && special.get(0) == 0.0);
  EXPECT_EQ(special.get(1), std::numeric_limits<double>::infinity());
  EXPECT_EQ(special.get(2), -std::numeric_limits<double>::infinity());
  EXPECT_TRUE(std::isnan(special.get(3)));
  EXPECT_EQ(file.find("no such tensor"), nullptr);
}

TEST(Safetensors, ReadsScalarsAndZeroSizeTensors) {
  const SafetensorsFile file = read_safetensors(kFixtures / "python_scalar_and_empty.safetensors");
  EXPECT_TRUE(file.metadata.empty());
  // Three tensors start at offset 0; zero-size ones sort first, then by name.
  expect_same_tensors(file.tensors, expected_scalar_and_empty());
  EXPECT_EQ(file.find("scalar")->dim(), 0);
  EXPECT_EQ(file.find("scalar")->get(0), 3.5);
  EXPECT_EQ(file.find("empty_3d")->numel(), 0);
}

TEST(Safetensors, ReadsEmptyMetadataAndFilesWithoutTensors) {
  const SafetensorsFile empty_metadata = read_safetensors(kFixtures / "python_empty_metadata.safetensors");
  EXPECT_TRUE(empty_metadata.metadata.empty());
  ASSERT_EQ(empty_metadata.tensors.size(), 1u);
  EXPECT_EQ(empty_metadata.tensors[0].second.to_doubles(), (std::vector<double>{1, 2, 3}));

  const SafetensorsFile no_tensors = read_safetensors(kFixtures / "python_no_tensors.safetensors");
  EXPECT_TRUE(no_tensors.tensors.empty());
  EXPECT_EQ(no_tensors.metadata, (std::map<std::string, std::string>{{"note", "no tensors"}}));
}

TEST(Safetensors, AcceptsWhatPythonMightWriteByHand) {
  // Padding before and after the JSON, metadata anywhere, pretty-printed JSON.
  const auto padded = parse_safetensors(
      make_file("  {\n \"t\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]},\n"
                " \"__metadata__\": {\"k\": \"v\\u00e9\"}}        ",
                "\x07"));
  EXPECT_EQ(padded.metadata.at("k"), "v\xc3\xa9");
  EXPECT_EQ(padded.find("t")->get_int(0), 7);
  // Key order within an entry does not matter.
  const auto reordered =
      parse_safetensors(make_file(R"({"t":{"data_offsets":[0,1],"shape":[],"dtype":"BOOL"}})", "\x01"));
  EXPECT_EQ(reordered.find("t")->get_int(0), 1);
  // Zero-size tensors may sit between others and at the very end.
  const auto zeros = parse_safetensors(make_file(
      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"z":{"dtype":"F64","shape":[0,5],"data_offsets":[1,1]},)"
      R"("b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"e":{"dtype":"F32","shape":[0],"data_offsets":[2,2]}})",
      "\x01\x02"));
  ASSERT_EQ(zeros.tensors.size(), 4u);
  EXPECT_EQ(zeros.tensors[0].first, "a");
  EXPECT_EQ(zeros.tensors[1].first, "z");
  EXPECT_EQ(zeros.tensors[2].first, "b");
  EXPECT_EQ(zeros.tensors[3].first, "e");
}

TEST(Safetensors, RejectsWhatSafetensors080WritesForNoTensorsAndEmptyMetadata) {
  // safetensors 0.8.0's save({}, metadata={}) writes this invalid header (its
  // own reader refuses it too: "trailing characters at line 1 column 3").
  expect_rejected(make_file("{},\"__metadata__\":{}}   "), "header is not valid JSON");
}

// ---------------------------------------------------------------------------
// Our writer

SafetensorsFile all_dtypes_file() {
  SafetensorsFile file;
  file.metadata = {{"purpose", "every dtype"}, {"writer", "paritron"}};
  file.tensors = expected_all_dtypes();
  return file;
}

TEST(Safetensors, WriterMatchesCommittedFilesThatPythonReads) {
  expect_committed("ours_all_dtypes.safetensors", serialize_safetensors(all_dtypes_file()));
  SafetensorsFile scalar_and_empty;
  scalar_and_empty.tensors = expected_scalar_and_empty();
  expect_committed("ours_scalar_and_empty.safetensors", serialize_safetensors(scalar_and_empty));
}

TEST(Safetensors, WriterIsDeterministicAndLaysOutByName) {
  SafetensorsFile file = all_dtypes_file();
  const auto bytes = serialize_safetensors(file);
  std::mt19937_64 rng(7);
  std::shuffle(file.tensors.begin(), file.tensors.end(), rng);
  EXPECT_TRUE(serialize_safetensors(file) == bytes) << "tensor order changed the bytes";

  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<uint64_t>(bytes[static_cast<size_t>(i)]);
  EXPECT_EQ(n % 8, 0u);
  const std::string header(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  EXPECT_EQ(header.rfind(R"({"__metadata__":{"purpose":"every dtype","writer":"paritron"},"bf16":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"bool":)", 0), 0u) << header;
  EXPECT_EQ(header.find_last_not_of(' '), header.find_last_of('}'));

  const SafetensorsFile back = parse_safetensors(bytes);
  EXPECT_EQ(back.metadata, file.metadata);
  std::vector<std::string> names;
  for (const auto& [name, tensor] : back.tensors) names.push_back(name);
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));

  // No metadata: no "__metadata__" entry at all; nothing at all: "{}" padded.
  const auto empty = serialize_safetensors(SafetensorsFile{});
  EXPECT_TRUE(empty == make_file("{}      ")) << "empty file";
}

TEST(Safetensors, WriterRefusesWhatCouldNotBeReadBack) {
  auto expect_refused = [](SafetensorsFile file, std::string_view problem) {
    try {
      serialize_safetensors(file);
      ADD_FAILURE() << "wrote a file that should fail with: " << problem;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(problem), std::string::npos) << e.what();
    }
  };
  SafetensorsFile dup;
  dup.tensors = {{"a", Tensor()}, {"a", Tensor()}};
  expect_refused(dup, "duplicate tensor name \"a\"");
  SafetensorsFile reserved;
  reserved.tensors = {{"__metadata__", Tensor()}};
  expect_refused(reserved, "reserved");
  SafetensorsFile bad_name;
  bad_name.tensors = {{"bad\xff", Tensor()}};
  expect_refused(bad_name, "not valid UTF-8");
  SafetensorsFile bad_value;
  bad_value.metadata = {{"k", "\xc0\x80"}};
  expect_refused(bad_value, "not valid UTF-8");
  SafetensorsFile bad_bool;
  bad_bool.tensors = {{"m", Tensor(DType::BOOL, {3})}};
  bad_bool.tensors[0].second.bytes()[2] = std::byte{2};
  expect_refused(bad_bool, "BOOL tensor \"m\"");
}

TEST(Safetensors, WriteGoesThroughATemporaryFileAndReplaces) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("paritron_safetensors_test_" + std::to_string(std::random_device{}()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "out.safetensors";
  write_safetensors(path, all_dtypes_file());
  SafetensorsFile second;
  second.metadata = {{"second", "yes"}};
  write_safetensors(path, second);  // replaces the first
  EXPECT_EQ(read_safetensors(path).metadata, second.metadata);
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir), std::filesystem::directory_iterator()), 1)
      << "a temporary file was left behind";
  EXPECT_THROW(write_safetensors(dir / "missing_dir" / "x.safetensors", second), Error);
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir), std::filesystem::directory_iterator()), 1);
  std::filesystem::remove_all(dir);
}

TEST(Safetensors, ReadNamesFilesThatCannotBeRead) {
  try {
    read_safetensors("/nonexistent/x.safetensors");
    ADD_FAILURE();
  } catch (const CaseFormatError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/x.safetensors: cannot open"), std::string::npos) << e.what();
  }
  try {
    read_safetensors(kFixtures);
    ADD_FAILURE();
  } catch (const CaseFormatError& e) {
    EXPECT_NE(std::string(e.what()).find("is a directory"), std::string::npos) << e.what();
  }
}

// Random files: write -> read gives the same metadata and bitwise-equal
// tensors (in name order, which is our data order), and writing again gives
// the same bytes.
RC_GTEST_PROP(Safetensors, RoundTripIsExact, ()) {
  const auto dtypes = std::vector<DType>(std::begin(kAllDTypes), std::end(kAllDTypes));
  const auto text = rc::gen::container<std::string>(rc::gen::inRange<char>(1, 127));
  // Arbitrary unicode (as UTF-8) too: names and metadata are JSON strings.
  const auto unicode = rc::gen::map(rc::gen::container<std::vector<uint32_t>>(rc::gen::inRange<uint32_t>(0, 0x10FFFF)),
                                    [](const std::vector<uint32_t>& cps) {
                                      std::string s;
                                      for (uint32_t cp : cps) {
                                        if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
                                        if (cp < 0x80) {
                                          s += static_cast<char>(cp);
                                        } else if (cp < 0x800) {
                                          s += static_cast<char>(0xC0 | (cp >> 6));
                                          s += static_cast<char>(0x80 | (cp & 0x3F));
                                        } else if (cp < 0x10000) {
                                          s += static_cast<char>(0xE0 | (cp >> 12));
                                          s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                                          s += static_cast<char>(0x80 | (cp & 0x3F));
                                        } else {
                                          s += static_cast<char>(0xF0 | (cp >> 18));
                                          s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
                                          s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                                          s += static_cast<char>(0x80 | (cp & 0x3F));
                                        }
                                      }
                                      return s;
                                    });
  SafetensorsFile file;
  const auto metadata_count = *rc::gen::inRange(0, 4);
  for (int i = 0; i < metadata_count; ++i) file.metadata[*rc::gen::oneOf(text, unicode)] = *rc::gen::oneOf(text, unicode);
  const auto tensor_count = *rc::gen::inRange(0, 6);
  std::set<std::string> names;
  for (int i = 0; i < tensor_count; ++i) {
    const std::string name = *rc::gen::oneOf(text, unicode);
    if (name == "__metadata__" || !names.insert(name).second) continue;
    const DType dtype = *rc::gen::elementOf(dtypes);
    const Shape shape = *rc::gen::container<Shape>(static_cast<size_t>(*rc::gen::inRange(0, 4)), rc::gen::inRange<int64_t>(0, 4));
    Tensor tensor(dtype, shape);
    for (auto& b : tensor.bytes()) {
      b = static_cast<std::byte>(dtype == DType::BOOL ? *rc::gen::inRange(0, 2) : *rc::gen::inRange(0, 256));
    }
    file.tensors.emplace_back(name, std::move(tensor));
  }
  const auto bytes = serialize_safetensors(file);
  const SafetensorsFile back = parse_safetensors(bytes);
  RC_ASSERT(back.metadata == file.metadata);
  std::sort(file.tensors.begin(), file.tensors.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  RC_ASSERT(back.tensors.size() == file.tensors.size());
  for (size_t i = 0; i < back.tensors.size(); ++i) {
    RC_ASSERT(back.tensors[i].first == file.tensors[i].first);
    RC_ASSERT(back.tensors[i].second.bitwise_equal(file.tensors[i].second));
  }
  RC_ASSERT(serialize_safetensors(back) == bytes);
}

// ---------------------------------------------------------------------------
// Malformed files: each rule of the contract, each with its message.

std::string one_entry(std::string_view entry) { return "{\"t\":" + std::string(entry) + "}"; }

TEST(SafetensorsRejects, FilesTooShortForTheLength) {
  expect_rejected({}, "file is 0 bytes, shorter than the 8-byte header length");
  expect_rejected(as_bytes(std::string_view("\x02\0\0\0\0", 5)), "file is 5 bytes");
}

TEST(SafetensorsRejects, HeaderLengthPastTheEnd) {
  expect_rejected(make_file("{}", "", 100), "header length 100 runs past the end of the file (2 bytes follow");
  expect_rejected(make_file("{}", "", uint64_t{1} << 63), "header length 9223372036854775808 exceeds the 100000000-byte limit");
  expect_rejected(make_file("{}", "", kMaxSafetensorsHeaderBytes + 1), "exceeds the 100000000-byte limit");
  expect_rejected(make_file("{}", "", ~uint64_t{0}), "exceeds");
}

TEST(SafetensorsRejects, HeaderThatIsNotJsonOrNotAnObject) {
  expect_rejected(make_file(""), "header is not valid JSON");
  expect_rejected(make_file("{"), "header is not valid JSON");
  expect_rejected(make_file("{}x"), "header is not valid JSON");
  expect_rejected(make_file("{} // comment"), "header is not valid JSON");
  // nlohmann would stop at a NUL byte and accept this; serde (and so Python) refuses it.
  expect_rejected(make_file(std::string("{}\0\0", 4)), "header is not valid JSON: NUL byte at offset 2");
  expect_rejected(make_file(std::string("{\"a\0\":1}", 8)), "NUL byte at offset 3");
  expect_rejected(make_file("\xEF\xBB\xBF{}"), "header is not valid JSON: it starts with a UTF-8 byte order mark");
  expect_rejected(make_file("[]"), "header JSON is an array, not an object");
  expect_rejected(make_file("3"), "header JSON is a number, not an object");
  expect_rejected(make_file("{\"a\":1e999}"), "header is not valid JSON");
  expect_rejected(make_file(std::string(100, '[') + std::string(100, ']')), "nests deeper than 32 levels");
}

TEST(SafetensorsRejects, HeaderThatIsNotUtf8) {
  expect_rejected(make_file("{\"a\xff\":1}"), "not valid UTF-8 (byte 0xff at header offset 3)");
  expect_rejected(make_file("{\"\xc0\xaf\":1}"), "not valid UTF-8 (byte 0xc0");       // overlong '/'
  expect_rejected(make_file("{\"\xed\xa0\x80\":1}"), "not valid UTF-8 (byte 0xed");   // a surrogate
  expect_rejected(make_file("{\"\xf4\x90\x80\x80\":1}"), "not valid UTF-8");          // past U+10FFFF
  expect_rejected(make_file("{\"\xe2\x82\":1}"), "not valid UTF-8");                  // truncated
  expect_rejected(make_file("{\"\\ud800\":1}"), "header is not valid JSON");          // escaped lone surrogate
}

TEST(SafetensorsRejects, EntriesOfTheWrongShape) {
  expect_rejected(make_file(one_entry("3")), "tensor \"t\": entry is a number (3), not an object");
  expect_rejected(make_file(one_entry("[1]")), "tensor \"t\": entry is an array");
  expect_rejected(make_file(one_entry(R"({"shape":[],"data_offsets":[0,0]})")), "tensor \"t\": entry has no \"dtype\"");
  expect_rejected(make_file(one_entry(R"({"dtype":"U8","data_offsets":[0,0]})")), "entry has no \"shape\"");
  expect_rejected(make_file(one_entry(R"({"dtype":"U8","shape":[0]})")), "entry has no \"data_offsets\"");
  expect_rejected(make_file(one_entry(R"({"dtype":"U8","shape":[0],"data_offsets":[0,0],"extra":1})")),
                  "unexpected key \"extra\"");
  expect_rejected(make_file(one_entry(R"({"dtype":5,"shape":[0],"data_offsets":[0,0]})")),
                  "tensor \"t\": dtype is a number (5), not a string");
  expect_rejected(make_file(one_entry(R"({"dtype":"F128","shape":[0],"data_offsets":[0,0]})")),
                  "tensor \"t\": unknown dtype \"F128\" (Paritron reads F64, F32, F16, BF16");
  expect_rejected(make_file(one_entry(R"({"dtype":"I16","shape":[0],"data_offsets":[0,0]})")), "unknown dtype \"I16\"");
  expect_rejected(make_file(one_entry(R"({"dtype":"f32","shape":[0],"data_offsets":[0,0]})")), "unknown dtype \"f32\"");
}

TEST(SafetensorsRejects, BadShapes) {
  auto entry = [](std::string_view shape) {
    return one_entry(R"({"dtype":"U8","shape":)" + std::string(shape) + R"(,"data_offsets":[0,0]})");
  };
  expect_rejected(make_file(entry("4")), "tensor \"t\": shape is a number (4), not an array");
  expect_rejected(make_file(entry("null")), "shape is a null");
  expect_rejected(make_file(entry("[2,-1]")), "shape [2,-1] has extent -1 that is not an integer in [0, 2^63)");
  expect_rejected(make_file(entry("[1.5]")), "has extent 1.5 that is not an integer");
  expect_rejected(make_file(entry("[2.0]")), "has extent 2.0 that is not an integer");
  expect_rejected(make_file(entry("[\"2\"]")), "has extent \"2\"");
  expect_rejected(make_file(entry("[9223372036854775808]")), "has extent 9223372036854775808");
  expect_rejected(make_file(entry("[[1]]")), "has extent [1]");
}

TEST(SafetensorsRejects, BadDataOffsets) {
  auto entry = [](std::string_view offsets) {
    return one_entry(R"({"dtype":"U8","shape":[4],"data_offsets":)" + std::string(offsets) + "}");
  };
  expect_rejected(make_file(entry("[0]"), "0123"), "tensor \"t\": data_offsets is [0], not an array [begin, end]");
  expect_rejected(make_file(entry("[0,4,4]"), "0123"), "data_offsets is [0,4,4], not an array");
  expect_rejected(make_file(entry("{}"), "0123"), "data_offsets is {}, not an array");
  expect_rejected(make_file(entry("[-1,3]"), "0123"), "data_offsets [-1,3] must hold two integers in [0, 2^63)");
  expect_rejected(make_file(entry("[0,4.0]"), "0123"), "data_offsets [0,4.0] must hold two integers");
  expect_rejected(make_file(entry("[0,null]"), "0123"), "must hold two integers");
  expect_rejected(make_file(entry("[4,0]"), "0123"), "data_offsets [4, 0] begin after they end");
  expect_rejected(make_file(entry("[0,8]"), "0123"), "needs 4 bytes, but data_offsets [0, 8] hold 8");
  expect_rejected(make_file(entry("[4,8]"), "0123"), "data_offsets [4, 8] run past the end of the data (4 bytes)");
  expect_rejected(make_file(entry("[9223372036854775803,9223372036854775807]"), "0123"), "run past the end");
}

TEST(SafetensorsRejects, ByteCountsThatDoNotMatchDtypeTimesShape) {
  expect_rejected(make_file(one_entry(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})"), "01234567"),
                  "tensor \"t\": F32 of shape [3] needs 12 bytes, but data_offsets [0, 8] hold 8");
  expect_rejected(make_file(one_entry(R"({"dtype":"BF16","shape":[],"data_offsets":[0,1]})"), "0"),
                  "BF16 of shape [] needs 2 bytes");
  // Products that overflow: refused, not wrapped around to a small count.
  expect_rejected(make_file(one_entry(R"({"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]})")),
                  "shape [4294967296, 4294967296] has more elements than fit in 64 bits");
  expect_rejected(make_file(one_entry(R"({"dtype":"F64","shape":[1152921504606846976,16],"data_offsets":[0,0]})")),
                  "more elements than fit in 64 bits");
  expect_rejected(make_file(one_entry(R"({"dtype":"F64","shape":[1152921504606846976],"data_offsets":[0,0]})")),
                  "F64 tensor of shape [1152921504606846976] is too large");
  // 2^62 * 2^62 * 0 overflows before the zero, as in the Rust reader.
  expect_rejected(make_file(one_entry(R"({"dtype":"U8","shape":[4611686018427387904,4611686018427387904,0],"data_offsets":[0,0]})")),
                  "more elements than fit in 64 bits");
}

TEST(SafetensorsRejects, OverlapsHolesAndTrailingBytes) {
  const std::string a = R"("a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]})";
  expect_rejected(make_file("{" + a + R"(,"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})", "012345"),
                  "tensor \"b\" (data_offsets [2, 6]) overlaps tensor \"a\" ([0, 4])");
  expect_rejected(make_file("{" + a + R"(,"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", "0123"),
                  "overlaps tensor");
  // A zero-size tensor inside another one.
  expect_rejected(make_file("{" + a + R"(,"z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}})", "0123"),
                  "tensor \"z\" (data_offsets [2, 2]) overlaps tensor \"a\"");
  expect_rejected(make_file("{" + a + R"(,"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})", "01234567"),
                  "data bytes [4, 6) belong to no tensor (a hole before tensor \"b\")");
  expect_rejected(make_file(R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})", "0123"),
                  "data bytes [0, 2) belong to no tensor");
  expect_rejected(make_file("{" + a + "}", "012345"),
                  "2 trailing bytes after the last tensor (the tensors end at data offset 4, the data is 6 bytes)");
  expect_rejected(make_file("{}", "xy"), "2 trailing bytes after the last tensor");
  expect_rejected(make_file(R"({"__metadata__":{}}  )", "x"), "1 trailing bytes");
}

TEST(SafetensorsRejects, DuplicateNamesAndKeys) {
  const std::string a = R"("a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]})";
  expect_rejected(make_file("{" + a + "," + a + "}"), "duplicate tensor name \"a\" in the header");
  expect_rejected(make_file(R"({"a":{"dtype":"U8","dtype":"U8","shape":[0],"data_offsets":[0,0]}})"),
                  "duplicate key \"dtype\" in the header JSON");
  expect_rejected(make_file(R"({"__metadata__":{},"__metadata__":{}})"), "duplicate key \"__metadata__\"");
  expect_rejected(make_file(R"({"__metadata__":{"k":"1","k":"2"}})"), "duplicate key \"k\"");
  // Keys equal after unescaping are the same key.
  expect_rejected(make_file("{" + a + R"(,"\u0061":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})"),
                  "duplicate tensor name \"a\"");
}

TEST(SafetensorsRejects, MetadataThatIsNotStringsToStrings) {
  EXPECT_TRUE(parse_safetensors(make_file(R"({"__metadata__":null})"), "null.safetensors").metadata.empty());
  expect_rejected(make_file(R"({"__metadata__":[]})"), "__metadata__ is an array ([]), not an object of strings");
  expect_rejected(make_file(R"({"__metadata__":"x"})"), "__metadata__ is a string");
  expect_rejected(make_file(R"({"__metadata__":{"k":1}})"), "__metadata__ value of \"k\" is a number (1), not a string");
  expect_rejected(make_file(R"({"__metadata__":{"k":null}})"), "__metadata__ value of \"k\" is a null");
  expect_rejected(make_file(R"({"__metadata__":{"k":{"a":"b"}}})"), "__metadata__ value of \"k\" is an object");
}

TEST(SafetensorsRejects, BoolBytesOtherThanZeroAndOne) {
  expect_rejected(make_file(R"({"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})", std::string("\x01\x02\x00", 3)),
                  "tensor \"m\": BOOL element 1 is byte 0x02 (must be 0 or 1)");
  expect_rejected(make_file(R"({"m":{"dtype":"BOOL","shape":[],"data_offsets":[0,1]}})", "\xff"),
                  "BOOL element 0 is byte 0xff");
}

TEST(SafetensorsRejects, NamesInMessagesAreEscaped) {
  expect_rejected(make_file("{\"a\\nb\":3}"), "tensor \"a\\nb\": entry is a number");
  expect_rejected(make_file(one_entry(R"({"dtype":"U8","shape":[4],"data_offsets":[0,4]})") + " ", "012"),
                  "run past the end of the data (3 bytes)");
}

}  // namespace
}  // namespace paritron
