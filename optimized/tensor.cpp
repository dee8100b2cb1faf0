#include "optimized/tensor.h"

#include <fmt/format.h>

#include "common/error.h"

namespace paritron::opt {

DTensor::DTensor(std::shared_ptr<std::byte> storage, size_t offset_bytes, DType dtype, DType storage_dtype,
                 Shape shape)
    : storage_(std::move(storage)),
      offset_(offset_bytes),
      dtype_(dtype),
      storage_dtype_(storage_dtype),
      shape_(std::move(shape)),
      numel_(shape_numel(shape_)) {}

int64_t DTensor::size(int64_t d) const {
  const int64_t n = dim();
  if (d < 0) d += n;
  if (d < 0 || d >= n) throw Error(fmt::format("dimension {} out of range for {}", d, describe()));
  return shape_[static_cast<size_t>(d)];
}

int64_t DTensor::cols() const { return shape_.empty() ? 1 : shape_.back(); }
int64_t DTensor::rows() const { return cols() == 0 ? 0 : numel_ / cols(); }

float* DTensor::f32() {
  if (storage_dtype_ != DType::F32) throw Error(fmt::format("{} is not stored as f32", describe()));
  return static_cast<float*>(data());
}
const float* DTensor::f32() const { return const_cast<DTensor*>(this)->f32(); }
double* DTensor::f64() {
  if (storage_dtype_ != DType::F64) throw Error(fmt::format("{} is not stored as f64", describe()));
  return static_cast<double*>(data());
}
const double* DTensor::f64() const { return const_cast<DTensor*>(this)->f64(); }

DTensor DTensor::view(Shape shape) const {
  if (shape_numel(shape) != numel_) {
    throw Error(fmt::format("cannot view {} as {}", describe(), shape_string(shape)));
  }
  DTensor v = *this;
  v.shape_ = std::move(shape);
  return v;
}

DTensor DTensor::slice0(int64_t begin, int64_t count) const {
  if (shape_.empty()) throw Error(fmt::format("cannot slice the 0-d tensor {}", describe()));
  if (begin < 0 || count < 0 || begin + count > shape_[0]) {
    throw Error(fmt::format("rows [{}, {}) out of range for {}", begin, begin + count, describe()));
  }
  const int64_t row_elems = shape_[0] == 0 ? 0 : numel_ / shape_[0];
  DTensor v = *this;
  v.offset_ = offset_ + static_cast<size_t>(begin * row_elems) * dtype_size(storage_dtype_);
  v.shape_[0] = count;
  v.numel_ = count * row_elems;
  return v;
}

DTensor DTensor::as_dtype(DType dtype) const {
  DTensor v = *this;
  v.dtype_ = dtype;
  return v;
}

std::string DTensor::describe() const {
  std::string s = fmt::format("{}{}", dtype_name(dtype_), shape_string(shape_));
  if (storage_dtype_ != dtype_) s += fmt::format(" (storage {})", dtype_name(storage_dtype_));
  return s;
}

}  // namespace paritron::opt
