// A small owning tensor: dtype, shape, contiguous row-major little-endian
// bytes. It is what the reference, the optimized side and case files exchange
// at their boundaries (the reference maps it into Eigen, kernels take spans).
//
// Float16/bfloat16/fp8 elements are stored as their raw bits (uint16_t /
// uint8_t); get()/set() convert through double with exact round-to-nearest-even.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common/dtype.h"

namespace paritron {

using Shape = std::vector<int64_t>;

// Number of elements; throws Error on a negative extent or on overflow.
int64_t shape_numel(const Shape& shape);
std::string shape_string(const Shape& shape);  // "[2, 3, 4]"

class Tensor {
 public:
  Tensor() = default;                  // a 0-d F32 tensor holding 0
  Tensor(DType dtype, Shape shape);    // zero-filled

  // Takes a copy of raw bytes; their count must be numel * dtype_size.
  static Tensor from_bytes(DType dtype, Shape shape, std::span<const std::byte> bytes);
  // Rounds each value to dtype (RNE; integers must be exact and in range).
  static Tensor from_values(DType dtype, Shape shape, std::span<const double> values);

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return bytes_.size(); }

  std::span<std::byte> bytes() { return bytes_; }
  std::span<const std::byte> bytes() const { return bytes_; }

  // Typed access to the storage. T must match the dtype's storage: double (F64),
  // float (F32), uint16_t (F16, BF16 bits), uint8_t (F8_*, U8, BOOL), int64_t,
  // int32_t, int8_t. Throws Error otherwise.
  template <class T> std::span<T> data();
  template <class T> std::span<const T> data() const;

  // Element i (flat, row-major) as a double: exact for every float dtype and
  // for integers up to 2^53.
  double get(int64_t i) const;
  int64_t get_int(int64_t i) const;  // integral dtypes only
  // Stores v rounded to the dtype (RNE, no saturation; integers: must be exact).
  void set(int64_t i, double v);
  void set_int(int64_t i, int64_t v);  // integral dtypes only; v must fit the dtype

  std::vector<double> to_doubles() const;
  // Element-wise conversion with set()'s rounding; integer to integer is exact
  // (no trip through double), and throws when a value does not fit.
  Tensor to(DType dtype) const;

  Shape unravel(int64_t flat_index) const;  // flat index -> multi-index
  bool bitwise_equal(const Tensor& other) const;  // same dtype, shape and bytes

 private:
  void check_index(int64_t i) const;
  void check_storage(std::string_view type_name) const;

  DType dtype_ = DType::F32;
  Shape shape_;
  int64_t numel_ = 1;
  std::vector<std::byte> bytes_ = std::vector<std::byte>(4);
};

namespace detail {
template <class T> struct StorageTraits;
template <> struct StorageTraits<double> { static constexpr std::string_view kName = "double"; };
template <> struct StorageTraits<float> { static constexpr std::string_view kName = "float"; };
template <> struct StorageTraits<uint16_t> { static constexpr std::string_view kName = "uint16_t"; };
template <> struct StorageTraits<uint8_t> { static constexpr std::string_view kName = "uint8_t"; };
template <> struct StorageTraits<int64_t> { static constexpr std::string_view kName = "int64_t"; };
template <> struct StorageTraits<int32_t> { static constexpr std::string_view kName = "int32_t"; };
template <> struct StorageTraits<int8_t> { static constexpr std::string_view kName = "int8_t"; };
}  // namespace detail

template <class T> std::span<T> Tensor::data() {
  using Traits = detail::StorageTraits<std::remove_const_t<T>>;
  check_storage(Traits::kName);
  return {reinterpret_cast<T*>(bytes_.data()), static_cast<size_t>(numel_)};
}

template <class T> std::span<const T> Tensor::data() const {
  using Traits = detail::StorageTraits<std::remove_const_t<T>>;
  check_storage(Traits::kName);
  return {reinterpret_cast<const T*>(bytes_.data()), static_cast<size_t>(numel_)};
}

}  // namespace paritron
