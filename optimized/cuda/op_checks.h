// Host-side helpers shared by the ops of optimized/cuda/*.cu: message
// formatting, argument checks (the CPU backend's messages, thrown as
// BackendError), the error context of an op's CUDA calls, and small size /
// alignment arithmetic.
//
// Why this exists: fmt is not usable in .cu files. nvcc's C++20 front end
// rejects fmt 9's consteval format strings, and the host pass breaks its
// constexpr code; so the .cu files format their messages with text() below
// instead of fmt::format. Every .cu file used to carry its own copy of these
// helpers; this is the one copy (inline functions, so a file that does not use
// one gets no unused-function warning).
#pragma once

#include <cuda_runtime.h>

#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "common/error.h"
#include "optimized/cuda/cuda_backend.h"
#include "optimized/tensor.h"

namespace paritron::opt::cuda {

// ---------------------------------------------------------------------------
// Messages.

// "{}" placeholders filled with the arguments in order, as fmt::format("{}")
// prints them (numbers in their shortest round-trip form, bools as
// true / false).
inline void append(std::string& s, std::string_view v) { s += v; }
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <class N>
  requires(std::is_arithmetic_v<N> && !std::is_same_v<N, bool>)
inline void append(std::string& s, N v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  s.append(buf, r.ptr);
}

template <class... A>
inline std::string text(std::string_view format, const A&... args) {
  std::string out;
  size_t pos = 0;
  const auto one = [&](const auto& a) {
    const size_t k = format.find("{}", pos);
    if (k == std::string_view::npos) return;
    out += format.substr(pos, k - pos);
    append(out, a);
    pos = k + 2;
  };
  (one(args), ...);
  out += format.substr(pos);
  return out;
}

// "op: what" as a BackendError.
[[noreturn]] inline void fail(std::string_view op, const std::string& what) {
  throw BackendError(text("{}: {}", op, what));
}

// ---------------------------------------------------------------------------
// Checks (the CPU backend's messages).

// The dtypes the kernels compute with (fp8 tensors are gemm_lt operands).
inline bool is_compute_float(DType d) {
  return d == DType::F64 || d == DType::F32 || d == DType::BF16 || d == DType::F16;
}

// t is allocated and a floating tensor of this backend (value and storage).
inline void check_defined(std::string_view op, std::string_view name, const DTensor& t) {
  if (!t.defined()) fail(op, text("{} is not allocated", name));
  if (!is_compute_float(t.storage_dtype()) || !is_compute_float(t.dtype())) {
    fail(op, text("{} is {}: not a floating tensor of this backend (f64, f32, bf16 or f16)", name,
                  t.describe()));
  }
}

// t has numel elements; `expected` describes the shape for the message.
inline void check_numel(std::string_view op, std::string_view name, const DTensor& t, int64_t numel,
                        std::string_view expected) {
  if (t.numel() != numel) {
    fail(op, text("{} is {}, expected {} ({} elements)", name, t.describe(), expected, numel));
  }
}

// The error context of the CUDA calls of one op: its name and operands (null
// pointers left out; pass null for an operand that may be unallocated).
inline std::string context(std::string_view op,
                           std::initializer_list<std::pair<std::string_view, const DTensor*>> ts) {
  std::string s(op);
  for (const auto& [name, t] : ts) {
    if (t != nullptr) s += text(" {} {}", name, t->describe());
  }
  return s;
}

// ---------------------------------------------------------------------------
// Small host helpers.

inline cudaStream_t stream_of(const CudaBackend& be) { return static_cast<cudaStream_t>(be.stream()); }

// n rounded up to a multiple of a.
inline size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The smallest float >= p (the CPU backend's threshold_float): keep iff float
// u >= p compared in double is u >= threshold_float(p).
inline float threshold_float(double p) {
  float f = static_cast<float>(p);
  if (static_cast<double>(f) < p) f = std::nextafter(f, 2.0f);
  return f;
}

}  // namespace paritron::opt::cuda
