#include "common/tensor.h"

#include <cmath>
#include <cstring>
#include <climits>
#include <limits>

#include <fmt/format.h>

#include "common/error.h"

namespace paritron {

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t extent : shape) {
    if (extent < 0) throw Error(fmt::format("shape {} has a negative extent", shape_string(shape)));
    if (extent != 0 && n > std::numeric_limits<int64_t>::max() / extent) {
      throw Error(fmt::format("shape {} has more elements than fit in 64 bits", shape_string(shape)));
    }
    n *= extent;
  }
  return n;
}

std::string shape_string(const Shape& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

namespace {
// The storage type each dtype is accessed through (Tensor::data<T>()).
std::string_view storage_name(DType dtype) {
  switch (dtype) {
    case DType::F64: return "double";
    case DType::F32: return "float";
    case DType::F16:
    case DType::BF16: return "uint16_t";
    case DType::I64: return "int64_t";
    case DType::I32: return "int32_t";
    case DType::I8: return "int8_t";
    case DType::F8_E4M3:
    case DType::F8_E5M2:
    case DType::U8:
    case DType::BOOL: return "uint8_t";
  }
  return "?";
}

template <class T> T load(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class T> void store(std::byte* p, T v) { std::memcpy(p, &v, sizeof v); }

// v must be an integer in [lo, hi]; integers are never rounded silently.
int64_t exact_integer(double v, double lo, double hi, DType dtype) {
  if (!(v >= lo && v <= hi) || std::trunc(v) != v) {
    throw Error(fmt::format("value {} is not representable as {}", v, dtype_name(dtype)));
  }
  return static_cast<int64_t>(v);
}
}  // namespace

Tensor::Tensor(DType dtype, Shape shape)
    : dtype_(dtype), shape_(std::move(shape)), numel_(shape_numel(shape_)) {
  const int64_t size = static_cast<int64_t>(dtype_size(dtype_));
  if (numel_ > std::numeric_limits<int64_t>::max() / size) {
    throw Error(fmt::format("tensor of shape {} is too large", shape_string(shape_)));
  }
  bytes_.assign(static_cast<size_t>(numel_ * size), std::byte{0});
}

Tensor Tensor::from_bytes(DType dtype, Shape shape, std::span<const std::byte> bytes) {
  Tensor t(dtype, std::move(shape));
  if (bytes.size() != t.nbytes()) {
    throw Error(fmt::format("{} bytes given for a {} tensor of shape {} (needs {})", bytes.size(),
                            dtype_name(dtype), shape_string(t.shape()), t.nbytes()));
  }
  if (!bytes.empty()) std::memcpy(t.bytes_.data(), bytes.data(), bytes.size());
  return t;
}

Tensor Tensor::from_values(DType dtype, Shape shape, std::span<const double> values) {
  Tensor t(dtype, std::move(shape));
  if (static_cast<int64_t>(values.size()) != t.numel()) {
    throw Error(fmt::format("{} values given for shape {} ({} elements)", values.size(),
                            shape_string(t.shape()), t.numel()));
  }
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, values[static_cast<size_t>(i)]);
  return t;
}

void Tensor::check_storage(std::string_view type_name) const {
  if (storage_name(dtype_) != type_name) {
    throw Error(fmt::format("a {} tensor is stored as {}, not {}", dtype_name(dtype_),
                            storage_name(dtype_), type_name));
  }
}

void Tensor::check_index(int64_t i) const {
  if (i < 0 || i >= numel_) {
    throw Error(fmt::format("element {} is out of range for shape {}", i, shape_string(shape_)));
  }
}

double Tensor::get(int64_t i) const {
  check_index(i);
  const std::byte* p = bytes_.data() + i * static_cast<int64_t>(dtype_size(dtype_));
  switch (dtype_) {
    case DType::F64: return load<double>(p);
    case DType::F32: return load<float>(p);
    case DType::F16:
    case DType::BF16: return math::decode(load<uint16_t>(p), *float_format(dtype_));
    case DType::F8_E4M3:
    case DType::F8_E5M2: return math::decode(load<uint8_t>(p), *float_format(dtype_));
    case DType::I64: return static_cast<double>(load<int64_t>(p));
    case DType::I32: return load<int32_t>(p);
    case DType::I8: return load<int8_t>(p);
    case DType::U8:
    case DType::BOOL: return load<uint8_t>(p);
  }
  return 0.0;
}

int64_t Tensor::get_int(int64_t i) const {
  check_index(i);
  const std::byte* p = bytes_.data() + i * static_cast<int64_t>(dtype_size(dtype_));
  switch (dtype_) {
    case DType::I64: return load<int64_t>(p);
    case DType::I32: return load<int32_t>(p);
    case DType::I8: return load<int8_t>(p);
    case DType::U8:
    case DType::BOOL: return load<uint8_t>(p);
    default: throw Error(fmt::format("get_int on a {} tensor", dtype_name(dtype_)));
  }
}

void Tensor::set(int64_t i, double v) {
  check_index(i);
  std::byte* p = bytes_.data() + i * static_cast<int64_t>(dtype_size(dtype_));
  switch (dtype_) {
    case DType::F64: store<double>(p, v); return;
    // Not static_cast<float>: a double beyond float's range is UB to cast.
    case DType::F32: store<uint32_t>(p, math::encode(v, math::kFloat32)); return;
    case DType::F16:
    case DType::BF16: store<uint16_t>(p, static_cast<uint16_t>(math::encode(v, *float_format(dtype_)))); return;
    case DType::F8_E4M3:
    case DType::F8_E5M2: store<uint8_t>(p, static_cast<uint8_t>(math::encode(v, *float_format(dtype_)))); return;
    // 2^63 is the first double past INT64_MAX; -2^63 is exact.
    case DType::I64: store<int64_t>(p, exact_integer(v, -0x1p63, 0x1p63 - 1024.0, dtype_)); return;
    case DType::I32: store<int32_t>(p, static_cast<int32_t>(exact_integer(v, -2147483648.0, 2147483647.0, dtype_))); return;
    case DType::I8: store<int8_t>(p, static_cast<int8_t>(exact_integer(v, -128.0, 127.0, dtype_))); return;
    case DType::U8: store<uint8_t>(p, static_cast<uint8_t>(exact_integer(v, 0.0, 255.0, dtype_))); return;
    case DType::BOOL: store<uint8_t>(p, static_cast<uint8_t>(exact_integer(v, 0.0, 1.0, dtype_))); return;
  }
}

void Tensor::set_int(int64_t i, int64_t v) {
  check_index(i);
  std::byte* p = bytes_.data() + i * static_cast<int64_t>(dtype_size(dtype_));
  const auto fits = [&](int64_t lo, int64_t hi) {
    if (v < lo || v > hi) throw Error(fmt::format("value {} is not representable as {}", v, dtype_name(dtype_)));
  };
  switch (dtype_) {
    case DType::I64: store<int64_t>(p, v); return;
    case DType::I32: fits(INT32_MIN, INT32_MAX); store<int32_t>(p, static_cast<int32_t>(v)); return;
    case DType::I8: fits(-128, 127); store<int8_t>(p, static_cast<int8_t>(v)); return;
    case DType::U8: fits(0, 255); store<uint8_t>(p, static_cast<uint8_t>(v)); return;
    case DType::BOOL: fits(0, 1); store<uint8_t>(p, static_cast<uint8_t>(v)); return;
    default: throw Error(fmt::format("set_int on a {} tensor", dtype_name(dtype_)));
  }
}

std::vector<double> Tensor::to_doubles() const {
  std::vector<double> out(static_cast<size_t>(numel_));
  for (int64_t i = 0; i < numel_; ++i) out[static_cast<size_t>(i)] = get(i);
  return out;
}

Tensor Tensor::to(DType dtype) const {
  Tensor out(dtype, shape_);
  if (is_integral(dtype_) && is_integral(dtype)) {
    for (int64_t i = 0; i < numel_; ++i) out.set_int(i, get_int(i));  // exact past 2^53
    return out;
  }
  for (int64_t i = 0; i < numel_; ++i) out.set(i, get(i));
  return out;
}

Shape Tensor::unravel(int64_t flat_index) const {
  check_index(flat_index);
  Shape index(shape_.size());
  for (size_t d = shape_.size(); d-- > 0;) {
    index[d] = flat_index % shape_[d];
    flat_index /= shape_[d];
  }
  return index;
}

bool Tensor::bitwise_equal(const Tensor& other) const {
  return dtype_ == other.dtype_ && shape_ == other.shape_ && bytes_ == other.bytes_;
}

}  // namespace paritron
