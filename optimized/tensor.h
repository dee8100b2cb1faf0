// DTensor: a tensor in a backend's memory, the currency of the optimized side
// (design.md, principle 4: the model is written once against a Backend and a
// Comm, and both exchange DTensors).
//
// A DTensor is a view: shared storage, a byte offset into it, a shape
// (row-major, contiguous) and two dtypes:
//   dtype          the values' dtype, what Megatron's tensor would be (F32,
//                  BF16, F16; F64 for float64 runs);
//   storage_dtype  how elements sit in memory. The CPU backend stores every
//                  floating tensor as F32 holding values already rounded to
//                  `dtype`: numerically the same as 16-bit storage with fp32
//                  compute (what GPU kernels do), and one kernel per op instead
//                  of one per storage type. The CUDA backend stores `dtype`.
// Copies of a DTensor share storage (like torch views); Backend::copy copies
// data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/dtype.h"
#include "common/tensor.h"

namespace paritron::opt {

class DTensor {
 public:
  DTensor() = default;
  DTensor(std::shared_ptr<std::byte> storage, size_t offset_bytes, DType dtype, DType storage_dtype, Shape shape);

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  DType storage_dtype() const { return storage_dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t d) const;   // extent of dimension d (negative d counts from the back)
  int64_t numel() const { return numel_; }
  int64_t cols() const;            // the last extent (1 for a 0-d tensor)
  int64_t rows() const;            // numel / cols
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(storage_dtype_); }

  void* data() { return storage_.get() + offset_; }
  const void* data() const { return storage_.get() + offset_; }
  // Typed pointers; throw Error unless the storage dtype matches.
  float* f32();
  const float* f32() const;
  double* f64();
  const double* f64() const;

  // The same elements under another shape (numel must match).
  DTensor view(Shape shape) const;
  // Rows [begin, begin + count) of the tensor seen as [shape[0], ...]: a
  // contiguous slice along dimension 0.
  DTensor slice0(int64_t begin, int64_t count) const;
  // The same storage, labelled with another value dtype (the values must
  // already be representable in it).
  DTensor as_dtype(DType dtype) const;
  bool same_storage(const DTensor& other) const { return storage_ == other.storage_; }

  std::string describe() const;  // "bf16[4, 2, 64] (storage f32)"

 private:
  std::shared_ptr<std::byte> storage_;
  size_t offset_ = 0;
  DType dtype_ = DType::F32;
  DType storage_dtype_ = DType::F32;
  Shape shape_;
  int64_t numel_ = 0;
};

}  // namespace paritron::opt
