// See cpu_backend.h. Layout of this file: storage / rounding helpers, memory,
// GEMM, attention (delegated), norms, RoPE, activations, dropout, the rest.
#include "optimized/cpu/cpu_backend.h"

#include <cblas.h>
#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/error.h"
#include "common/math/float_format.h"
#include "common/math/fp8.h"
#include "common/math/random.h"
#include "optimized/cpu/attention.h"
#include "optimized/faults.h"
#include "optimized/math/activations.h"
#include "optimized/math/norm.h"
#include "optimized/math/rope.h"
#include "optimized/math/rounding.h"

namespace paritron::opt::cpu {

namespace {

using faults::Fault;

// Fault bf16_truncation: x cut to bfloat16 by dropping the low 16 bits (NaN kept).
inline float truncate_to_bf16(float x) {
  const uint32_t u = math::bits_of(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return x;
  return math::float_from_bits(u & 0xFFFF0000u);
}

// ---------------------------------------------------------------------------
// Errors and checks.

[[noreturn]] void fail(std::string_view op, const std::string& what) {
  throw Error(fmt::format("{}: {}", op, what));
}

bool is_float_storage(const DTensor& t) {
  return t.storage_dtype() == DType::F32 || t.storage_dtype() == DType::F64;
}

void check_defined(std::string_view op, std::string_view name, const DTensor& t) {
  if (!t.defined()) fail(op, fmt::format("{} is not allocated", name));
  if (!is_float_storage(t)) fail(op, fmt::format("{} is {}: not a floating tensor of this backend", name, t.describe()));
}

// The big operands of one kernel share a storage type (one instantiation each).
void check_same_storage(std::string_view op, std::initializer_list<std::pair<std::string_view, const DTensor*>> ts) {
  const DTensor* first = nullptr;
  std::string_view first_name;
  for (const auto& [name, t] : ts) {
    if (t == nullptr) continue;
    check_defined(op, name, *t);
    if (first == nullptr) {
      first = t;
      first_name = name;
    } else if (t->storage_dtype() != first->storage_dtype()) {
      fail(op, fmt::format("{} {} and {} {} differ in storage (mixed f32/f64 operands)", first_name,
                           first->describe(), name, t->describe()));
    }
  }
}

void check_numel(std::string_view op, std::string_view name, const DTensor& t, int64_t numel,
                 std::string_view expected) {
  if (t.numel() != numel) {
    fail(op, fmt::format("{} is {}, expected {} ({} elements)", name, t.describe(), expected, numel));
  }
}

template <class T> T* ptr(DTensor& t);
template <> float* ptr<float>(DTensor& t) { return t.f32(); }
template <> double* ptr<double>(DTensor& t) { return t.f64(); }
template <class T> const T* cptr(const DTensor& t);
template <> const float* cptr<float>(const DTensor& t) { return t.f32(); }
template <> const double* cptr<double>(const DTensor& t) { return t.f64(); }

// A small tensor (bias, gamma, statistics) as T, whatever its storage.
template <class T> std::vector<T> read_vec(const DTensor& t) {
  std::vector<T> v(static_cast<size_t>(t.numel()));
  if (t.storage_dtype() == DType::F32) {
    const float* p = t.f32();
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<T>(p[i]);
  } else {
    const double* p = t.f64();
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<T>(p[i]);
  }
  return v;
}

// ---------------------------------------------------------------------------
// Rounding to a dtype.

enum class RMode : uint8_t { kNone, kBF16, kF16, kToF32, kGeneric };
struct Rounding {
  RMode mode = RMode::kNone;
  const math::FloatFormat* format = nullptr;
};

// How values computed in the storage type are rounded to the tensor's dtype.
Rounding rounding_of(const DTensor& t) {
  const DType d = t.dtype();
  if (t.storage_dtype() == DType::F32) {
    if (d == DType::F32) return {};
    if (d == DType::BF16) return {RMode::kBF16, nullptr};
    if (d == DType::F16) return {RMode::kF16, nullptr};
  } else {
    if (d == DType::F64) return {};
    if (d == DType::F32) return {RMode::kToF32, nullptr};
  }
  const math::FloatFormat* f = float_format(d);
  if (f == nullptr) throw Error(fmt::format("{} is not a floating tensor", t.describe()));
  return {RMode::kGeneric, f};
}

// Rounding of a value to a dtype, computed in double (single rounding).
double round_double(double v, DType dtype) {
  if (dtype == DType::F64) return v;
  if (dtype == DType::BF16 && faults::active(Fault::bf16_truncation)) {
    return truncate_to_bf16(static_cast<float>(v));
  }
  const math::FloatFormat* f = float_format(dtype);
  if (f == nullptr) throw Error(fmt::format("{} is not a floating dtype", dtype_name(dtype)));
  return math::round_to(v, *f);
}

inline float round_one(float v, Rounding r) {
  switch (r.mode) {
    case RMode::kNone:
    case RMode::kToF32: return v;
    case RMode::kBF16:
      if (faults::active(Fault::bf16_truncation)) return truncate_to_bf16(v);
      return math::round_float_to_bf16(v);
    case RMode::kF16: return math::round_float_to_fp16(v);
    case RMode::kGeneric: return static_cast<float>(math::round_to(static_cast<double>(v), *r.format));
  }
  return v;
}
inline double round_one(double v, Rounding r) {
  switch (r.mode) {
    case RMode::kNone: return v;
    case RMode::kToF32: return static_cast<double>(static_cast<float>(v));
    case RMode::kBF16:
      if (faults::active(Fault::bf16_truncation)) return truncate_to_bf16(static_cast<float>(v));
      return math::round_to(v, math::kBFloat16);
    case RMode::kF16: return math::round_to(v, math::kFloat16);
    case RMode::kGeneric: return math::round_to(v, *r.format);
  }
  return v;
}

void round_span(float* p, int64_t n, Rounding r) {
  int64_t i = 0;
  switch (r.mode) {
    case RMode::kNone:
    case RMode::kToF32: return;
    case RMode::kBF16: {
      if (faults::active(Fault::bf16_truncation)) {
        for (; i < n; ++i) p[i] = truncate_to_bf16(p[i]);
        return;
      }
#if defined(__AVX2__)
      const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
      const __m256i inf = _mm256_set1_epi32(0x7F800000);
      const __m256i bias = _mm256_set1_epi32(0x7FFF);
      const __m256i one = _mm256_set1_epi32(1);
      const __m256i keep = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
      const __m256i quiet = _mm256_set1_epi32(0x00400000);
      for (; i + 8 <= n; i += 8) {
        const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
        const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
        const __m256i r16 = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(bias, lsb)), keep);
        const __m256i res = _mm256_blendv_epi8(r16, _mm256_or_si256(u, quiet), is_nan);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), res);
      }
#endif
      for (; i < n; ++i) p[i] = math::round_float_to_bf16(p[i]);
      return;
    }
    case RMode::kF16: {
#if defined(__F16C__) && defined(__AVX2__)
      for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(p + i);
        const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(p + i, _mm256_cvtph_ps(h));
      }
#endif
      for (; i < n; ++i) p[i] = math::round_float_to_fp16(p[i]);
      return;
    }
    case RMode::kGeneric:
      for (; i < n; ++i) p[i] = static_cast<float>(math::round_to(static_cast<double>(p[i]), *r.format));
      return;
  }
}
void round_span(double* p, int64_t n, Rounding r) {
  if (r.mode == RMode::kNone) return;
  for (int64_t i = 0; i < n; ++i) p[i] = round_one(p[i], r);
}

// Parallelise only loops with enough work to pay for waking the team.
constexpr int64_t kParallelElems = 1 << 15;
inline bool par(int64_t elems) { return elems >= kParallelElems; }

// Rows [begin, end) of thread tid of nth over n rows (static split).
inline std::pair<int64_t, int64_t> thread_range(int64_t n, int tid, int nth) {
  return {n * tid / nth, n * (tid + 1) / nth};
}

// Column sums of the rows of [n_rows, n] into per-thread double partials,
// summed in thread order (deterministic for a given thread count).
template <class T, class RowFn>
std::vector<double> column_partials(int64_t n_rows, int64_t n, int64_t parts, RowFn row_fn) {
  const int nt = par(n_rows * n) ? omp_get_max_threads() : 1;
  std::vector<double> partial(static_cast<size_t>(nt * parts * n), 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const auto [r0, r1] = thread_range(n_rows, tid, omp_get_num_threads());
    double* acc = partial.data() + static_cast<size_t>(tid) * parts * n;
    for (int64_t r = r0; r < r1; ++r) row_fn(r, acc);
  }
  std::vector<double> total(partial.begin(), partial.begin() + parts * n);
  for (int t = 1; t < nt; ++t) {
    const double* p = partial.data() + static_cast<size_t>(t) * parts * n;
    for (int64_t i = 0; i < parts * n; ++i) total[static_cast<size_t>(i)] += p[i];
  }
  return total;
}

// dst (+)= contribution: the contribution rounded first to `contribution_dtype`
// (the dtype of the gradient tensor the framework materialises), then the sum
// rounded to dst's dtype (fp32 main grads accumulate an fp32 sum).
void accumulate_into(DTensor& dst, const std::vector<double>& contribution, DType contribution_dtype,
                     bool accumulate) {
  const int64_t n = dst.numel();
  if (dst.storage_dtype() == DType::F32) {
    float* d = dst.f32();
    for (int64_t i = 0; i < n; ++i) {
      const double c = round_double(contribution[static_cast<size_t>(i)], contribution_dtype);
      d[i] = static_cast<float>(round_double(accumulate ? static_cast<double>(d[i]) + c : c, dst.dtype()));
    }
  } else {
    double* d = dst.f64();
    for (int64_t i = 0; i < n; ++i) {
      const double c = round_double(contribution[static_cast<size_t>(i)], contribution_dtype);
      d[i] = round_double(accumulate ? d[i] + c : c, dst.dtype());
    }
  }
}

// Writes small per-row statistics (mean, rstd) into a tensor of any storage.
template <class T> void write_stat(DTensor& t, int64_t i, T v) {
  if (t.storage_dtype() == DType::F32) {
    t.f32()[i] = static_cast<float>(v);
  } else {
    t.f64()[i] = static_cast<double>(v);
  }
}

std::shared_ptr<std::byte> allocate(size_t bytes) {
  const size_t rounded = std::max<size_t>(64, (bytes + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, rounded);
  if (p == nullptr) throw BackendError(fmt::format("cpu backend: cannot allocate {} bytes", bytes));
  return std::shared_ptr<std::byte>(static_cast<std::byte*>(p), [](std::byte* q) { std::free(q); });
}

DType storage_for(DType dtype) {
  if (dtype == DType::F64) return DType::F64;
  if (is_floating(dtype)) return DType::F32;
  return dtype;
}

static_assert(static_cast<int>(ActivationKind::kBiasGeluTanh) == static_cast<int>(math::Act::kBiasGeluTanh));
static_assert(static_cast<int>(ActivationKind::kQuickGelu) == static_cast<int>(math::Act::kQuickGelu));
static_assert(static_cast<int>(ActivationKind::kGelu) == static_cast<int>(math::Act::kGelu));

}  // namespace

// ===========================================================================
// Memory.

DTensor CpuBackend::empty(DType dtype, Shape shape) {
  const int64_t n = shape_numel(shape);
  const DType storage = storage_for(dtype);
  return DTensor(allocate(static_cast<size_t>(n) * dtype_size(storage)), 0, dtype, storage, std::move(shape));
}

DTensor CpuBackend::zeros(DType dtype, Shape shape) {
  DTensor t = empty(dtype, std::move(shape));
  if (t.nbytes() > 0) std::memset(t.data(), 0, t.nbytes());
  return t;
}

DTensor CpuBackend::upload(const Tensor& host, DType dtype) {
  if (!is_floating(dtype)) {
    if (host.dtype() != dtype) {
      throw Error(fmt::format("upload: a {} tensor cannot be uploaded as {}", dtype_name(host.dtype()),
                              dtype_name(dtype)));
    }
    DTensor t = empty(dtype, host.shape());
    if (t.nbytes() > 0) std::memcpy(t.data(), host.bytes().data(), t.nbytes());
    return t;
  }
  DTensor t = empty(dtype, host.shape());
  const int64_t n = host.numel();
  if (t.storage_dtype() == DType::F32) {
    float* d = t.f32();
    if (host.dtype() == DType::F32) {
      const auto s = host.data<float>();
      std::memcpy(d, s.data(), static_cast<size_t>(n) * sizeof(float));
      round_span(d, n, rounding_of(t));  // no-op for F32
    } else {
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(round_double(host.get(i), dtype));
    }
  } else {
    double* d = t.f64();
    for (int64_t i = 0; i < n; ++i) d[i] = host.get(i);
  }
  return t;
}

Tensor CpuBackend::download(const DTensor& t) {
  if (!t.defined()) throw Error("download: the tensor is not allocated");
  Tensor host(t.dtype(), t.shape());
  const int64_t n = t.numel();
  if (!is_float_storage(t)) {
    if (t.nbytes() > 0) std::memcpy(host.bytes().data(), t.data(), t.nbytes());
    return host;
  }
  if (t.storage_dtype() == DType::F32) {
    const float* s = t.f32();
    if (t.dtype() == DType::F32) {
      std::memcpy(host.bytes().data(), s, static_cast<size_t>(n) * sizeof(float));
    } else if (t.dtype() == DType::BF16) {
      auto d = host.data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) d[static_cast<size_t>(i)] = math::float_to_bf16_bits(s[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) host.set(i, static_cast<double>(s[i]));
    }
  } else {
    const double* s = t.f64();
    if (t.dtype() == DType::F64) {
      std::memcpy(host.bytes().data(), s, static_cast<size_t>(n) * sizeof(double));
    } else {
      for (int64_t i = 0; i < n; ++i) host.set(i, s[i]);
    }
  }
  return host;
}

void CpuBackend::copy(const DTensor& src, DTensor& dst) {
  static constexpr std::string_view op = "copy";
  check_defined(op, "src", src);
  check_defined(op, "dst", dst);
  check_numel(op, "dst", dst, src.numel(), fmt::format("as many elements as src {}", src.describe()));
  const int64_t n = src.numel();
  const Rounding r = rounding_of(dst);
  if (src.storage_dtype() == DType::F32 && dst.storage_dtype() == DType::F32) {
    const float* s = src.f32();
    float* d = dst.f32();
    if (s != d) std::memcpy(d, s, static_cast<size_t>(n) * sizeof(float));
    if (src.dtype() != dst.dtype()) {
#pragma omp parallel for schedule(static) if (par(n))
      for (int64_t i0 = 0; i0 < n; i0 += 4096) round_span(d + i0, std::min<int64_t>(4096, n - i0), r);
    }
  } else if (src.storage_dtype() == DType::F64 && dst.storage_dtype() == DType::F64) {
    const double* s = src.f64();
    double* d = dst.f64();
    if (s != d) std::memcpy(d, s, static_cast<size_t>(n) * sizeof(double));
    round_span(d, n, r);
  } else if (src.storage_dtype() == DType::F32) {  // f32 -> f64: exact widening
    const float* s = src.f32();
    double* d = dst.f64();
    for (int64_t i = 0; i < n; ++i) d[i] = round_one(static_cast<double>(s[i]), r);
  } else {  // f64 -> f32 storage: one rounding straight to dst's dtype
    const double* s = src.f64();
    float* d = dst.f32();
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(round_double(s[i], dst.dtype()));
  }
}

void CpuBackend::copy_cols(const DTensor& src, int64_t src_col, DTensor& dst, int64_t dst_col, int64_t ncols) {
  static constexpr std::string_view op = "copy_cols";
  check_defined(op, "src", src);
  check_defined(op, "dst", dst);
  const int64_t rows = src.rows(), sc = src.cols(), dc = dst.cols();
  if (dst.rows() != rows || ncols < 0 || src_col < 0 || dst_col < 0 || src_col + ncols > sc ||
      dst_col + ncols > dc) {
    fail(op, fmt::format("columns [{}, {}) of src {} into columns [{}, {}) of dst {}: rows must match and the "
                         "ranges fit",
                         src_col, src_col + ncols, src.describe(), dst_col, dst_col + ncols, dst.describe()));
  }
  if (ncols == 0 || rows == 0) return;
  const Rounding r = src.dtype() == dst.dtype() ? Rounding{} : rounding_of(dst);
  if (src.storage_dtype() == DType::F32 && dst.storage_dtype() == DType::F32) {
    const float* s = src.f32();
    float* d = dst.f32();
#pragma omp parallel for schedule(static) if (par(rows * ncols))
    for (int64_t i = 0; i < rows; ++i) {
      std::memmove(d + i * dc + dst_col, s + i * sc + src_col, static_cast<size_t>(ncols) * sizeof(float));
      round_span(d + i * dc + dst_col, ncols, r);
    }
  } else {
    // Any other storage pair: through double, one rounding to dst's dtype.
    const std::vector<double> s = read_vec<double>(src);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < ncols; ++j) {
        const double v = round_double(s[static_cast<size_t>(i * sc + src_col + j)], dst.dtype());
        if (dst.storage_dtype() == DType::F32) {
          dst.f32()[i * dc + dst_col + j] = static_cast<float>(v);
        } else {
          dst.f64()[i * dc + dst_col + j] = v;
        }
      }
    }
  }
}

void CpuBackend::fill(DTensor& t, double value) {
  check_defined("fill", "t", t);
  const double v = round_double(value, t.dtype());
  if (t.storage_dtype() == DType::F32) {
    std::fill_n(t.f32(), t.numel(), static_cast<float>(v));
  } else {
    std::fill_n(t.f64(), t.numel(), v);
  }
}

// ===========================================================================
// GEMM.
//
// Threading: one OpenMP team for everything. OpenBLAS runs single-threaded
// inside it, each thread multiplying its block of rows (or columns) of c.
// Mixing OpenBLAS's own pthreads with OpenMP kernels made each pool's idle
// spinning steal the 2 cores from the other (measured: the layer forward
// took 1.8x longer than with OMP_WAIT_POLICY=passive); with a single pool
// there is nothing to fight over.

namespace {

void blas_single_threaded() {
  if (openblas_get_num_threads() != 1) openblas_set_num_threads(1);
}

void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda), b,
              static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
               const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda), b,
              static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

// c[m, n] = alpha op(a) op(b) + beta c (+ bias rows), rounded to c's dtype.
// The bias is written into c first and the GEMM accumulates onto it (beta 1):
// the bias epilogue inside the accumulation, one rounding at the end.
template <class T>
void blocked_gemm(const T* a, int64_t lda, bool ta, const T* b, int64_t ldb, bool tb, T* c, int64_t m, int64_t n,
                  int64_t k, float alpha, float beta, const std::vector<T>& bias, const Rounding& r) {
  blas_single_threaded();
  // Split the longer side of c into one block per thread (none when small).
  const int threads = omp_get_max_threads();
  const bool by_rows = m >= n;
  const int64_t extent = by_rows ? m : n;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, extent / 64)));
#pragma omp parallel for num_threads(blocks) schedule(static)
  for (int blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = extent * blk / blocks, i1 = extent * (blk + 1) / blocks;
    const int64_t bm = by_rows ? i1 - i0 : m, bn = by_rows ? n : i1 - i0;
    // Row block of op(a): rows of a, or columns when transposed; column block of op(b) likewise.
    const T* ab = by_rows ? (ta ? a + i0 : a + i0 * lda) : a;
    const T* bb = by_rows ? b : (tb ? b + i0 * ldb : b + i0);
    T* cb = by_rows ? c + i0 * n : c + i0;
    T beta_eff = static_cast<T>(beta);
    if (!bias.empty()) {
      for (int64_t i = 0; i < bm; ++i) {
        for (int64_t j = 0; j < bn; ++j) {
          T& x = cb[i * n + j];
          const T bj = bias[static_cast<size_t>(by_rows ? j : i0 + j)];
          x = beta == 0.0f ? bj : static_cast<T>(beta) * x + bj;
        }
      }
      beta_eff = 1;
    }
    if (k > 0) {
      blas_gemm(ta, tb, bm, bn, k, static_cast<T>(alpha), ab, lda, bb, ldb, beta_eff, cb, n);
    } else if (beta_eff != 1) {
      for (int64_t i = 0; i < bm; ++i) {
        for (int64_t j = 0; j < bn; ++j) cb[i * n + j] = beta_eff == 0 ? 0 : beta_eff * cb[i * n + j];
      }
    }
    if (r.mode != RMode::kNone) {
      for (int64_t i = 0; i < bm; ++i) round_span(cb + i * n, bn, r);
    }
  }
}

}  // namespace


void CpuBackend::gemm(const DTensor& a, bool trans_a, const DTensor& b, bool trans_b, DTensor& c, float alpha,
                      float beta, const DTensor* bias) {
  static constexpr std::string_view op = "gemm";
  check_same_storage(op, {{"a", &a}, {"b", &b}, {"c", &c}});
  if (bias != nullptr) check_defined(op, "bias", *bias);
  const int64_t m = trans_a ? a.cols() : a.rows();
  const int64_t k = trans_a ? a.rows() : a.cols();
  const int64_t kb = trans_b ? b.cols() : b.rows();
  const int64_t n = trans_b ? b.rows() : b.cols();
  if (k != kb || c.rows() != m || c.cols() != n) {
    fail(op, fmt::format("op(a) = [{}, {}] (a {}{}), op(b) = [{}, {}] (b {}{}), c {}: expected c [{}, {}] and "
                         "matching inner dimensions",
                         m, k, a.describe(), trans_a ? "^T" : "", kb, n, b.describe(), trans_b ? "^T" : "",
                         c.describe(), m, n));
  }
  if (bias != nullptr && bias->numel() != n) {
    fail(op, fmt::format("bias {} does not match the {} output columns of c {}", bias->describe(), n, c.describe()));
  }
  if (m == 0 || n == 0) return;
  const int64_t lda = std::max<int64_t>(1, a.cols());
  const int64_t ldb = std::max<int64_t>(1, b.cols());
  if (c.storage_dtype() == DType::F32) {
    blocked_gemm<float>(a.f32(), lda, trans_a, b.f32(), ldb, trans_b, c.f32(), m, n, k, alpha, beta,
                        bias ? read_vec<float>(*bias) : std::vector<float>{}, rounding_of(c));
  } else {
    blocked_gemm<double>(a.f64(), lda, trans_a, b.f64(), ldb, trans_b, c.f64(), m, n, k, alpha, beta,
                         bias ? read_vec<double>(*bias) : std::vector<double>{}, rounding_of(c));
  }
}

void CpuBackend::bias_grad(const DTensor& dy, DTensor& db, bool accumulate) {
  static constexpr std::string_view op = "bias_grad";
  check_defined(op, "dy", dy);
  check_defined(op, "db", db);
  const int64_t rows = dy.rows(), n = dy.cols();
  check_numel(op, "db", db, n, fmt::format("one entry per column of dy {}", dy.describe()));
  std::vector<double> sums;
  if (dy.storage_dtype() == DType::F32) {
    const float* p = dy.f32();
    sums = column_partials<float>(rows, n, 1, [&](int64_t r, double* acc) {
      const float* row = p + r * n;
      for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<double>(row[j]);
    });
  } else {
    const double* p = dy.f64();
    sums = column_partials<double>(rows, n, 1, [&](int64_t r, double* acc) {
      const double* row = p + r * n;
      for (int64_t j = 0; j < n; ++j) acc[j] += row[j];
    });
  }
  accumulate_into(db, sums, dy.dtype(), accumulate);
}

// ===========================================================================
// Attention: shapes here, the kernel in attention.cpp (fp32 pointers).

namespace {

void check_attention(std::string_view op, const AttentionArgs& a, const DTensor& q, const DTensor& k,
                     const DTensor& v, const DTensor& out, const DTensor& lse) {
  if (a.batch <= 0 || a.heads <= 0 || a.groups <= 0 || a.head_dim <= 0 || a.sq < 0 || a.sk < 0) {
    fail(op, fmt::format("batch {}, heads {}, groups {}, head_dim {} must be positive (sq {}, sk {})", a.batch,
                         a.heads, a.groups, a.head_dim, a.sq, a.sk));
  }
  if (a.heads % a.groups != 0) fail(op, fmt::format("heads {} is not a multiple of groups {}", a.heads, a.groups));
  const std::string qs = fmt::format("[{}, {}, {}, {}]", a.sq, a.batch, a.heads, a.head_dim);
  const std::string ks = fmt::format("[{}, {}, {}, {}]", a.sk, a.batch, a.groups, a.head_dim);
  check_numel(op, "q", q, a.sq * a.batch * a.heads * a.head_dim, qs);
  check_numel(op, "k", k, a.sk * a.batch * a.groups * a.head_dim, ks);
  check_numel(op, "v", v, a.sk * a.batch * a.groups * a.head_dim, ks);
  check_numel(op, "out", out, a.sq * a.batch * a.heads * a.head_dim, qs);
  check_numel(op, "lse", lse, a.batch * a.heads * a.sq, fmt::format("[{}, {}, {}]", a.batch, a.heads, a.sq));
  if (!a.q_positions.empty() && static_cast<int64_t>(a.q_positions.size()) != a.sq) {
    fail(op, fmt::format("{} q_positions for sq = {}", a.q_positions.size(), a.sq));
  }
  if (!a.k_positions.empty() && static_cast<int64_t>(a.k_positions.size()) != a.sk) {
    fail(op, fmt::format("{} k_positions for sk = {}", a.k_positions.size(), a.sk));
  }
}

// An fp32 view of a tensor: in place for f32 storage, a converted copy for
// f64 (the attention kernel is fp32-only; float64 runs lose precision there).
struct F32View {
  DTensor* t = nullptr;
  const DTensor* ct = nullptr;
  std::vector<float> copy;
  float* p = nullptr;
  explicit F32View(const DTensor& src, bool load = true) : ct(&src) {
    if (src.storage_dtype() == DType::F32) {
      p = const_cast<float*>(src.f32());
    } else {
      copy.resize(static_cast<size_t>(src.numel()));
      if (load) {
        const double* s = src.f64();
        for (size_t i = 0; i < copy.size(); ++i) copy[i] = static_cast<float>(s[i]);
      }
      p = copy.data();
    }
  }
  // Rounds the written values to the tensor's dtype (and stores f64 copies back).
  void finish(DTensor& dst) {
    const Rounding r = rounding_of(dst);
    if (dst.storage_dtype() == DType::F32) {
      round_span(p, dst.numel(), r);
    } else {
      double* d = dst.f64();
      for (size_t i = 0; i < copy.size(); ++i) d[i] = round_one(static_cast<double>(copy[i]), r);
    }
  }
};

}  // namespace

void CpuBackend::attention_forward(const AttentionArgs& args, const DTensor& q, const DTensor& k, const DTensor& v,
                                   DTensor& out, DTensor& lse) {
  static constexpr std::string_view op = "attention_forward";
  for (auto [name, t] : {std::pair<std::string_view, const DTensor*>{"q", &q}, {"k", &k}, {"v", &v},
                         {"out", &out}, {"lse", &lse}}) {
    check_defined(op, name, *t);
  }
  check_attention(op, args, q, k, v, out, lse);
  F32View qv(q), kv(k), vv(v), ov(out, false), lv(lse, false);
  cpu::attention_forward(args, qv.p, kv.p, vv.p, ov.p, lv.p);
  ov.finish(out);
  lv.finish(lse);
}

void CpuBackend::attention_backward(const AttentionArgs& args, const DTensor& q, const DTensor& k, const DTensor& v,
                                    const DTensor& out, const DTensor& lse, const DTensor& dout, DTensor& dq,
                                    DTensor& dk, DTensor& dv) {
  static constexpr std::string_view op = "attention_backward";
  for (auto [name, t] : {std::pair<std::string_view, const DTensor*>{"q", &q}, {"k", &k}, {"v", &v},
                         {"out", &out}, {"lse", &lse}, {"dout", &dout}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}}) {
    check_defined(op, name, *t);
  }
  check_attention(op, args, q, k, v, out, lse);
  check_numel(op, "dout", dout, out.numel(), "the shape of out");
  check_numel(op, "dq", dq, q.numel(), "the shape of q");
  check_numel(op, "dk", dk, k.numel(), "the shape of k");
  check_numel(op, "dv", dv, v.numel(), "the shape of v");
  F32View qv(q), kv(k), vv(v), ov(out), lv(lse), dov(dout), dqv(dq, false), dkv(dk, false), dvv(dv, false);
  cpu::attention_backward(args, qv.p, kv.p, vv.p, ov.p, lv.p, dov.p, dqv.p, dkv.p, dvv.p);
  dqv.finish(dq);
  dkv.finish(dk);
  dvv.finish(dv);
}

// ===========================================================================
// Norms.

namespace {

// gamma as the kernel multiplies by it (reference norm_effective_gamma): w,
// or w + 1 rounded to w's dtype (Apex) / kept in fp32 (TE; double in f64 runs).
template <class T> std::vector<T> effective_gamma(const NormArgs& args, const DTensor& gamma) {
  std::vector<T> g = read_vec<T>(gamma);
  if (!args.zero_centered_gamma) return g;
  if (faults::active(Fault::zero_centered_gamma_missing_plus1)) return g;  // w, not 1 + w
  for (T& w : g) {
    const double plus = static_cast<double>(w) + 1.0;
    if (args.te_kernel) {
      w = static_cast<T>(gamma.storage_dtype() == DType::F64 && gamma.dtype() == DType::F64
                             ? plus
                             : static_cast<double>(static_cast<float>(plus)));
    } else {
      w = static_cast<T>(round_double(plus, gamma.dtype()));
    }
  }
  return g;
}

template <class T>
void norm_forward_impl(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor* beta, DTensor& y,
                       DTensor& mean, DTensor& rstd) {
  const int64_t rows = x.rows(), h = x.cols();
  const std::vector<T> g = effective_gamma<T>(args, gamma);
  std::vector<T> bv;
  if (!args.rms && beta != nullptr) bv = read_vec<T>(*beta);
  const T* bp = bv.empty() ? nullptr : bv.data();
  const T* xp = cptr<T>(x);
  T* yp = ptr<T>(y);
  const Rounding r = rounding_of(y);
  const bool want_mean = mean.defined();
  std::vector<T> stats(static_cast<size_t>(2 * rows));
#pragma omp parallel for schedule(static) if (par(rows * h))
  for (int64_t t = 0; t < rows; ++t) {
    T mu, rs;
    math::norm_row_stats(xp + t * h, h, args.rms, args.eps, &mu, &rs);
    math::norm_row_forward(xp + t * h, h, mu, rs, g.data(), bp, yp + t * h);
    round_span(yp + t * h, h, r);
    stats[static_cast<size_t>(2 * t)] = mu;
    stats[static_cast<size_t>(2 * t + 1)] = rs;
  }
  for (int64_t t = 0; t < rows; ++t) {
    if (want_mean) write_stat(mean, t, stats[static_cast<size_t>(2 * t)]);
    write_stat(rstd, t, stats[static_cast<size_t>(2 * t + 1)]);
  }
}

template <class T>
void norm_backward_impl(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor& mean,
                        const DTensor& rstd, const DTensor& dy, DTensor& dx, DTensor& dgamma, DTensor* dbeta) {
  const int64_t rows = x.rows(), h = x.cols();
  const std::vector<T> g = effective_gamma<T>(args, gamma);
  const std::vector<T> rs = read_vec<T>(rstd);
  std::vector<T> mu;
  if (!args.rms) mu = read_vec<T>(mean);
  const T* xp = cptr<T>(x);
  const T* dyp = cptr<T>(dy);
  T* dxp = ptr<T>(dx);
  const Rounding r = rounding_of(dx);
  const bool with_beta = dbeta != nullptr && !args.rms;
  const int64_t parts = with_beta ? 2 : 1;
  const std::vector<double> sums = column_partials<T>(rows, h, parts, [&](int64_t t, double* acc) {
    const T m = args.rms ? T(0) : mu[static_cast<size_t>(t)];
    math::norm_row_backward(xp + t * h, dyp + t * h, h, args.rms, m, rs[static_cast<size_t>(t)], g.data(),
                            dxp + t * h, acc, with_beta ? acc + h : nullptr);
    round_span(dxp + t * h, h, r);
  });
  accumulate_into(dgamma, std::vector<double>(sums.begin(), sums.begin() + h), gamma.dtype(), true);
  if (with_beta) accumulate_into(*dbeta, std::vector<double>(sums.begin() + h, sums.end()), gamma.dtype(), true);
}

}  // namespace

void CpuBackend::norm_forward(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor* beta,
                              DTensor& y, DTensor& mean, DTensor& rstd) {
  static constexpr std::string_view op = "norm_forward";
  check_same_storage(op, {{"x", &x}, {"y", &y}});
  check_defined(op, "gamma", gamma);
  check_defined(op, "rstd", rstd);
  const int64_t rows = x.rows(), h = x.cols();
  if (h <= 0) fail(op, fmt::format("x {} has no features", x.describe()));
  const std::string xs = fmt::format("[{}, {}]", rows, h);
  check_numel(op, "y", y, x.numel(), fmt::format("x's shape {}", xs));
  check_numel(op, "gamma", gamma, h, fmt::format("[{}]", h));
  if (beta != nullptr && !args.rms) {
    check_defined(op, "beta", *beta);
    check_numel(op, "beta", *beta, h, fmt::format("[{}]", h));
  }
  check_numel(op, "rstd", rstd, rows, fmt::format("[{}] (one per row of x {})", rows, xs));
  if (!args.rms || mean.defined()) {
    check_defined(op, "mean", mean);
    check_numel(op, "mean", mean, rows, fmt::format("[{}] (one per row of x {})", rows, xs));
  }
  if (x.storage_dtype() == DType::F32) {
    norm_forward_impl<float>(args, x, gamma, beta, y, mean, rstd);
  } else {
    norm_forward_impl<double>(args, x, gamma, beta, y, mean, rstd);
  }
}

void CpuBackend::norm_backward(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor& mean,
                               const DTensor& rstd, const DTensor& dy, DTensor& dx, DTensor& dgamma,
                               DTensor* dbeta) {
  static constexpr std::string_view op = "norm_backward";
  check_same_storage(op, {{"x", &x}, {"dy", &dy}, {"dx", &dx}});
  check_defined(op, "gamma", gamma);
  check_defined(op, "rstd", rstd);
  check_defined(op, "dgamma", dgamma);
  const int64_t rows = x.rows(), h = x.cols();
  if (h <= 0) fail(op, fmt::format("x {} has no features", x.describe()));
  const std::string xs = fmt::format("x's shape [{}, {}]", rows, h);
  check_numel(op, "dy", dy, x.numel(), xs);
  check_numel(op, "dx", dx, x.numel(), xs);
  check_numel(op, "gamma", gamma, h, fmt::format("[{}]", h));
  check_numel(op, "dgamma", dgamma, h, fmt::format("[{}]", h));
  check_numel(op, "rstd", rstd, rows, fmt::format("[{}]", rows));
  if (!args.rms) {
    check_defined(op, "mean", mean);
    check_numel(op, "mean", mean, rows, fmt::format("[{}]", rows));
    if (dbeta != nullptr) {
      check_defined(op, "dbeta", *dbeta);
      check_numel(op, "dbeta", *dbeta, h, fmt::format("[{}]", h));
    }
  }
  if (x.storage_dtype() == DType::F32) {
    norm_backward_impl<float>(args, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
  } else {
    norm_backward_impl<double>(args, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
  }
}

// ===========================================================================
// RoPE.

namespace {

template <class T>
void rope_impl(const RopeArgs& a, const DTensor& x, const DTensor& freqs, DTensor& y, bool backward, int64_t s) {
  const int64_t rot = a.rot_dim, hn = a.head_dim, width = a.heads * hn;
  // cos_ / sin_: fp32 cos/sin of the fp32 angles, then .to(t.dtype).
  const std::vector<double> angles = read_vec<double>(freqs);
  const Rounding rx = rounding_of(x);
  std::vector<T> cs(static_cast<size_t>(s * rot)), sn(static_cast<size_t>(s * rot));
  for (size_t i = 0; i < cs.size(); ++i) {
    const float angle = static_cast<float>(angles[i]);
    cs[i] = round_one(static_cast<T>(math::rope_cos(angle)), rx);
    sn[i] = round_one(static_cast<T>(math::rope_sin(angle)), rx);
  }
  const T* xp = cptr<T>(x);
  T* yp = ptr<T>(y);
  const Rounding ry = rounding_of(y);
  const int64_t rows = s * a.batch;
#pragma omp parallel for schedule(static) if (par(rows * width))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = r / a.batch;
    for (int64_t hd = 0; hd < a.heads; ++hd) {
      const int64_t off = r * width + hd * hn;
      math::rope_head(xp + off, yp + off, cs.data() + pos * rot, sn.data() + pos * rot, hn, rot, a.interleaved,
                      backward);
      round_span(yp + off, rot, ry);
      if (x.dtype() != y.dtype()) round_span(yp + off + rot, hn - rot, ry);
    }
  }
}

}  // namespace

void CpuBackend::rope(const RopeArgs& args, const DTensor& x, const DTensor& freqs, DTensor& y, bool backward) {
  static constexpr std::string_view op = "rope";
  check_same_storage(op, {{"x", &x}, {"y", &y}});
  check_defined(op, "freqs", freqs);
  if (args.batch <= 0 || args.heads <= 0 || args.head_dim <= 0) {
    fail(op, fmt::format("batch {}, heads {}, head_dim {} must be positive", args.batch, args.heads, args.head_dim));
  }
  if (args.rot_dim <= 0 || args.rot_dim % 2 != 0 || args.rot_dim > args.head_dim) {
    fail(op, fmt::format("rot_dim {} must be even, positive and <= head_dim {}", args.rot_dim, args.head_dim));
  }
  const int64_t token = args.batch * args.heads * args.head_dim;
  if (x.numel() % token != 0) {
    fail(op, fmt::format("x {} is not [s, {}, {}, {}]", x.describe(), args.batch, args.heads, args.head_dim));
  }
  const int64_t s = x.numel() / token;
  check_numel(op, "y", y, x.numel(), fmt::format("x's shape [{}, {}, {}, {}]", s, args.batch, args.heads,
                                                 args.head_dim));
  if (freqs.cols() != args.rot_dim || freqs.numel() != s * args.rot_dim) {
    fail(op, fmt::format("freqs {} is not [{}, {}] ([s, rot_dim] for x {})", freqs.describe(), s, args.rot_dim,
                         x.describe()));
  }
  RopeArgs a = args;
  if (faults::active(Fault::rope_interleave_swapped)) a.interleaved = !a.interleaved;
  if (x.storage_dtype() == DType::F32) {
    rope_impl<float>(a, x, freqs, y, backward, s);
  } else {
    rope_impl<double>(a, x, freqs, y, backward, s);
  }
}

// ===========================================================================
// Bias + activation (+ GLU).

namespace {

// One value rounded as round_span rounds (the unfused path's intermediate tensors).
template <class T>
T round_value(T v, const Rounding& r) {
  round_span(&v, 1, r);
  return v;
}

// `inner` rounds the intermediate tensors of Megatron's unfused MLP path
// (bias_activation_fusion = false: `x + bias`, then activation_func(x[0]),
// each a tensor of the dtype; reference/mlp.cpp); kNone for the fused
// kernels, which keep them in fp32 registers.
template <math::Act K, class T>
void act_forward_rows(const T* x, const T* bias, T* y, int64_t rows, int64_t f, bool glu, Rounding r, Rounding inner) {
  const int64_t in_w = glu ? 2 * f : f;
#pragma omp parallel for schedule(static) if (par(rows * f))
  for (int64_t t = 0; t < rows; ++t) {
    const T* xr = x + t * in_w;
    T* yr = y + t * f;
    if (inner.mode != RMode::kNone) {  // unfused, 16-bit: scalar, rounding each intermediate
      for (int64_t c = 0; c < f; ++c) {
        const T a = bias ? round_value<T>(xr[c] + bias[c], inner) : xr[c];
        if (!glu) {
          yr[c] = math::act_value(K, a);
          continue;
        }
        const T g = bias ? round_value<T>(xr[f + c] + bias[f + c], inner) : xr[f + c];
        yr[c] = round_value<T>(math::act_value(K, a), inner) * g;
      }
    } else if (glu) {  // the loops below vectorise
      for (int64_t c = 0; c < f; ++c) {
        const T a = bias ? xr[c] + bias[c] : xr[c];
        const T g = bias ? xr[f + c] + bias[f + c] : xr[f + c];
        yr[c] = math::act_value(K, a) * g;
      }
    } else {
      for (int64_t c = 0; c < f; ++c) yr[c] = math::act_value(K, bias ? xr[c] + bias[c] : xr[c]);
    }
    round_span(yr, f, r);
  }
}

template <math::Act K, class T>
void act_backward_rows(const T* x, const T* bias, const T* dy, T* dx, int64_t rows, int64_t f, bool glu, Rounding r,
                       Rounding inner) {
  const int64_t in_w = glu ? 2 * f : f;
#pragma omp parallel for schedule(static) if (par(rows * f))
  for (int64_t t = 0; t < rows; ++t) {
    const T* xr = x + t * in_w;
    const T* dyr = dy + t * f;
    T* dxr = dx + t * in_w;
    if (inner.mode != RMode::kNone) {  // unfused, 16-bit: scalar, rounding each intermediate
      for (int64_t c = 0; c < f; ++c) {
        const T a = bias ? round_value<T>(xr[c] + bias[c], inner) : xr[c];
        if (!glu) {
          dxr[c] = dyr[c] * math::act_derivative(K, a);
          continue;
        }
        const T g = bias ? round_value<T>(xr[f + c] + bias[f + c], inner) : xr[f + c];
        // Unfused autograd through act(a) * g: d act = dy * g and act(a) are dtype tensors.
        dxr[c] = round_value<T>(dyr[c] * g, inner) * math::act_derivative(K, a);
        dxr[f + c] = dyr[c] * round_value<T>(math::act_value(K, a), inner);
      }
      round_span(dxr, in_w, r);
      continue;
    }
    for (int64_t c = 0; c < f; ++c) {
      const T a = bias ? xr[c] + bias[c] : xr[c];
      if (glu) {
        const T g = bias ? xr[f + c] + bias[f + c] : xr[f + c];
        const T d = dyr[c];
        dxr[c] = d * g * math::act_derivative(K, a);
        dxr[f + c] = d * math::act_value(K, a);
      } else {
        dxr[c] = dyr[c] * math::act_derivative(K, a);
      }
    }
    round_span(dxr, in_w, r);
  }
}

template <class T, class F> void dispatch_act(ActivationKind kind, F&& f) {
  switch (kind) {
    case ActivationKind::kGelu: return f(std::integral_constant<math::Act, math::Act::kGelu>{});
    case ActivationKind::kSilu: return f(std::integral_constant<math::Act, math::Act::kSilu>{});
    case ActivationKind::kRelu: return f(std::integral_constant<math::Act, math::Act::kRelu>{});
    case ActivationKind::kSquaredRelu: return f(std::integral_constant<math::Act, math::Act::kSquaredRelu>{});
    case ActivationKind::kOpenaiGelu: return f(std::integral_constant<math::Act, math::Act::kOpenaiGelu>{});
    case ActivationKind::kErfGelu: return f(std::integral_constant<math::Act, math::Act::kErfGelu>{});
    case ActivationKind::kQuickGelu: return f(std::integral_constant<math::Act, math::Act::kQuickGelu>{});
    case ActivationKind::kBiasGeluTanh: return f(std::integral_constant<math::Act, math::Act::kBiasGeluTanh>{});
  }
  throw Error("bias_act: unknown activation kind");
}

// Fault glu_halves_swapped: rows [a | g] of width 2f as [g | a].
template <class T>
std::vector<T> swap_glu_halves(const T* x, int64_t rows, int64_t f) {
  std::vector<T> out(static_cast<size_t>(rows * 2 * f));
  for (int64_t t = 0; t < rows; ++t) {
    std::copy_n(x + t * 2 * f, f, out.data() + t * 2 * f + f);
    std::copy_n(x + t * 2 * f + f, f, out.data() + t * 2 * f);
  }
  return out;
}

template <class T>
void bias_act_forward_impl(const ActivationArgs& args, const DTensor& x, const DTensor* bias, DTensor& y, int64_t f) {
  std::vector<T> bv;
  if (bias != nullptr) bv = read_vec<T>(*bias);
  const T* xp = cptr<T>(x);
  std::vector<T> xs;
  if (args.glu && faults::active(Fault::glu_halves_swapped)) {
    xs = swap_glu_halves(xp, x.rows(), f);
    xp = xs.data();
    if (bias != nullptr) bv = swap_glu_halves(bv.data(), 1, f);
  }
  const T* bp = bias ? bv.data() : nullptr;
  const Rounding r = rounding_of(y);
  dispatch_act<T>(args.kind, [&](auto k) {
    act_forward_rows<decltype(k)::value, T>(xp, bp, ptr<T>(y), x.rows(), f, args.glu, r,
                                            args.fused ? Rounding{} : r);
  });
}

template <class T>
void bias_act_backward_impl(const ActivationArgs& args, const DTensor& x, const DTensor* bias, const DTensor& dy,
                            DTensor& dx, int64_t f) {
  std::vector<T> bv;
  if (bias != nullptr) bv = read_vec<T>(*bias);
  const T* xp = cptr<T>(x);
  std::vector<T> xs;
  const bool swap = args.glu && faults::active(Fault::glu_halves_swapped);
  if (swap) {
    xs = swap_glu_halves(xp, x.rows(), f);
    xp = xs.data();
    if (bias != nullptr) bv = swap_glu_halves(bv.data(), 1, f);
  }
  const T* bp = bias ? bv.data() : nullptr;
  const Rounding r = rounding_of(dx);
  dispatch_act<T>(args.kind, [&](auto k) {
    act_backward_rows<decltype(k)::value, T>(xp, bp, cptr<T>(dy), ptr<T>(dx), x.rows(), f, args.glu, r,
                                             args.fused ? Rounding{} : r);
  });
  if (swap) {  // the gradient back in fc1's [a | g] order
    const std::vector<T> d = swap_glu_halves(cptr<T>(dx), x.rows(), f);
    std::copy(d.begin(), d.end(), ptr<T>(dx));
  }
}

// Checks x [T, f or 2f] and bias; returns f.
int64_t check_act(std::string_view op, const ActivationArgs& args, const DTensor& x, const DTensor* bias) {
  const int64_t in_w = x.cols();
  if (args.glu && in_w % 2 != 0) fail(op, fmt::format("GLU input x {} has an odd width", x.describe()));
  if (bias != nullptr) {
    check_defined(op, "bias", *bias);
    check_numel(op, "bias", *bias, in_w, fmt::format("[{}] (the width of x {})", in_w, x.describe()));
  }
  return args.glu ? in_w / 2 : in_w;
}

}  // namespace

void CpuBackend::bias_act_forward(const ActivationArgs& args, const DTensor& x, const DTensor* bias, DTensor& y) {
  static constexpr std::string_view op = "bias_act_forward";
  check_same_storage(op, {{"x", &x}, {"y", &y}});
  const int64_t f = check_act(op, args, x, bias);
  if (y.cols() != f || y.rows() != x.rows()) {
    fail(op, fmt::format("y {} is not [{}, {}] for x {}{}", y.describe(), x.rows(), f, x.describe(),
                         args.glu ? " (GLU halves the width)" : ""));
  }
  if (x.storage_dtype() == DType::F32) {
    bias_act_forward_impl<float>(args, x, bias, y, f);
  } else {
    bias_act_forward_impl<double>(args, x, bias, y, f);
  }
}

void CpuBackend::bias_act_backward(const ActivationArgs& args, const DTensor& x, const DTensor* bias,
                                   const DTensor& dy, DTensor& dx) {
  static constexpr std::string_view op = "bias_act_backward";
  check_same_storage(op, {{"x", &x}, {"dy", &dy}, {"dx", &dx}});
  const int64_t f = check_act(op, args, x, bias);
  if (dy.cols() != f || dy.rows() != x.rows()) {
    fail(op, fmt::format("dy {} is not [{}, {}] for x {}", dy.describe(), x.rows(), f, x.describe()));
  }
  check_numel(op, "dx", dx, x.numel(), fmt::format("x's shape {}", shape_string(x.shape())));
  if (x.storage_dtype() == DType::F32) {
    bias_act_backward_impl<float>(args, x, bias, dy, dx, f);
  } else {
    bias_act_backward_impl<double>(args, x, bias, dy, dx, f);
  }
}

// ===========================================================================
// Dropout.

namespace {

void check_dropout(std::string_view op, const DropoutArgs& args, int64_t rows) {
  if (!(args.p >= 0.0 && args.p <= 1.0)) fail(op, fmt::format("dropout probability {} is not in [0, 1]", args.p));
  if (!args.row_positions.empty() && static_cast<int64_t>(args.row_positions.size()) != rows) {
    fail(op, fmt::format("{} row_positions for {} rows", args.row_positions.size(), rows));
  }
}

// Global row of local row r.
inline int64_t global_row(const DropoutArgs& a, int64_t r) {
  return a.row_positions.empty() ? a.row_offset + r : a.row_positions[static_cast<size_t>(r)];
}


// The smallest float >= p: float u >= p (compared in double, as the
// reference does) exactly when u >= threshold_float(p).
float threshold_float(double p) {
  float f = static_cast<float>(p);
  if (static_cast<double>(f) < p) f = std::nextafter(f, 2.0f);
  return f;
}

#if defined(__AVX2__)
// lo / hi 32 bits of m * c for 8 lanes.
inline void mulhilo8(__m256i c, __m256i m, __m256i* lo, __m256i* hi) {
  const __m256i even = _mm256_mul_epu32(c, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

// scale_out[c] = keep(element base + c) ? scale : 0 for c < n: the keep mask of
// math::uniform_float(key, index) >= p, 8 Philox4x32-10 blocks at a time.
template <class T>
void dropout_scales(const math::RngKey& key, uint64_t base, int64_t n, double p, T scale, T* scale_out) {
  const float thr = threshold_float(p);
  int64_t c = 0;
#if defined(__AVX2__)
  // kVecs independent groups of 8 lanes per step: the rounds are a serial
  // chain of multiplies, interleaving groups fills the pipeline.
  constexpr int kVecs = 4;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(math::kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(math::kPhiloxM1));
  const __m256 vthr = _mm256_set1_ps(thr);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  alignas(32) float keep_f[8 * kVecs];
  for (int64_t width = 8 * kVecs; width >= 8; width /= kVecs) {
    const int groups = static_cast<int>(width / 8);
    for (; c + width <= n; c += width) {
      __m256i v0[kVecs], v1[kVecs], v2[kVecs], v3[kVecs];
      for (int g = 0; g < groups; ++g) {
        const uint64_t idx0 = base + static_cast<uint64_t>(c + 8 * g);
        // 8 consecutive indices; the high word is the same unless the low word wraps inside the group.
        v0[g] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(idx0))), lane);
        const uint32_t hi0 = static_cast<uint32_t>(idx0 >> 32);
        const uint32_t lo0 = static_cast<uint32_t>(idx0);
        // lanes whose low word wrapped (lo0 + l overflowed) carry into the high word
        const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lo0 ^ 0x80000000u)),
                                                   _mm256_xor_si256(v0[g], _mm256_set1_epi32(static_cast<int>(0x80000000u))));
        v1[g] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(hi0)), wrapped);  // wrapped = -1 -> +1
        v2[g] = _mm256_setzero_si256();                                               // attempt 0
        v3[g] = _mm256_set1_epi32(static_cast<int>(math::RngStream::kUniform));      // stream
      }
      uint32_t k0 = key.k0, k1 = key.k1;
      for (int r = 0; r < 10; ++r) {
        if (r > 0) {
          k0 += math::kPhiloxW0;
          k1 += math::kPhiloxW1;
        }
        const __m256i kk0 = _mm256_set1_epi32(static_cast<int>(k0)), kk1 = _mm256_set1_epi32(static_cast<int>(k1));
        for (int g = 0; g < groups; ++g) {
          __m256i lo0, hi0, lo1, hi1;
          mulhilo8(v0[g], m0, &lo0, &hi0);
          mulhilo8(v2[g], m1, &lo1, &hi1);
          v0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, v1[g]), kk0);
          v2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, v3[g]), kk1);
          v1[g] = lo1;
          v3[g] = lo0;
        }
      }
      for (int g = 0; g < groups; ++g) {
        // u01_open_open_float: ((bits >> 9) << 1 | 1) * 2^-24, exact.
        const __m256i odd =
            _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(v0[g], 9), 1), _mm256_set1_epi32(1));
        const __m256 uf = _mm256_mul_ps(_mm256_cvtepi32_ps(odd), _mm256_set1_ps(0x1p-24f));
        const __m256 keep = _mm256_cmp_ps(uf, vthr, _CMP_GE_OQ);
        _mm256_store_ps(keep_f + 8 * g, _mm256_and_ps(keep, _mm256_set1_ps(1.0f)));
      }
      for (int64_t l = 0; l < width; ++l) scale_out[c + l] = keep_f[l] != 0.0f ? scale : T(0);
    }
    if (width == 8) break;
  }
#endif
  for (; c < n; ++c) {
    scale_out[c] = math::uniform_float(key, base + static_cast<uint64_t>(c)) >= thr ? scale : T(0);
  }
}

template <class T>
void bias_dropout_add_impl(const DropoutArgs& args, const DTensor& x, const DTensor* bias, const DTensor* residual,
                           DTensor& out) {
  const int64_t rows = x.rows(), h = x.cols();
  std::vector<T> bv;
  bool bias_full = false;
  if (bias != nullptr) {
    bias_full = bias->numel() != h;
    if (!bias_full) bv = read_vec<T>(*bias);
  }
  const T* bfull = bias_full ? cptr<T>(*bias) : nullptr;
  const T* xp = cptr<T>(x);
  const T* rp = residual ? cptr<T>(*residual) : nullptr;
  // residual.to(x.dtype) before the add (fused_bias_dropout.py).
  const Rounding rres = residual && residual->dtype() != x.dtype() ? rounding_of(x) : Rounding{};
  T* op = ptr<T>(out);
  const Rounding r = rounding_of(out);
  const bool drop = args.p > 0.0;
  const T scale = args.p >= 1.0 ? T(0) : static_cast<T>(1.0 / (1.0 - args.p));  // the reference's scale, as T
  // Element c of a row reads x, bias, residual and its mask scale before out
  // is written: out may alias x or residual (the in-place residual stream).
#pragma omp parallel if (par(rows * h))
  {
    std::vector<T> mask(static_cast<size_t>(drop ? h : 0));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t g = global_row(args, t);
      if (drop) dropout_scales<T>(args.key, static_cast<uint64_t>(g) * static_cast<uint64_t>(h), h, args.p, scale,
                                  mask.data());
      const T* xr = xp + t * h;
      const T* rr = rp ? rp + t * h : nullptr;
      T* orow = op + t * h;
      for (int64_t c = 0; c < h; ++c) {
        T v = xr[c];
        if (bias != nullptr) v += bias_full ? bfull[t * h + c] : bv[static_cast<size_t>(c)];
        if (drop) v = v * mask[static_cast<size_t>(c)];
        if (rr != nullptr) v = (rres.mode == RMode::kNone ? rr[c] : round_one(rr[c], rres)) + v;
        orow[c] = v;
      }
      round_span(orow, h, r);
    }
  }
}

template <class T> void dropout_backward_impl(const DropoutArgs& args, const DTensor& dout, DTensor& dx) {
  const int64_t rows = dout.rows(), h = dout.cols();
  const T* dp = cptr<T>(dout);
  T* xp = ptr<T>(dx);
  const Rounding r = rounding_of(dx);
  const bool drop = args.p > 0.0;
  const T scale = args.p >= 1.0 ? T(0) : static_cast<T>(1.0 / (1.0 - args.p));  // the reference's scale, as T
#pragma omp parallel if (par(rows * h))
  {
    std::vector<T> mask(static_cast<size_t>(drop ? h : 0));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t g = global_row(args, t);
      T* xr = xp + t * h;
      const T* dr = dp + t * h;
      if (drop) {
        dropout_scales<T>(args.key, static_cast<uint64_t>(g) * static_cast<uint64_t>(h), h, args.p, scale,
                          mask.data());
        for (int64_t c = 0; c < h; ++c) xr[c] = dr[c] * mask[static_cast<size_t>(c)];
      } else if (xr != dr) {
        for (int64_t c = 0; c < h; ++c) xr[c] = dr[c];
      }
      round_span(xr, h, r);
    }
  }
}

}  // namespace

void CpuBackend::bias_dropout_add(const DropoutArgs& args, const DTensor& x, const DTensor* bias,
                                  const DTensor* residual, DTensor& out) {
  static constexpr std::string_view op = "bias_dropout_add";
  check_same_storage(op, {{"x", &x}, {"residual", residual}, {"out", &out}});
  const int64_t rows = x.rows(), h = x.cols();
  const std::string xs = fmt::format("x's shape {}", shape_string(x.shape()));
  check_numel(op, "out", out, x.numel(), xs);
  if (residual != nullptr) check_numel(op, "residual", *residual, x.numel(), xs);
  if (bias != nullptr) {
    check_defined(op, "bias", *bias);
    if (bias->numel() != h && bias->numel() != x.numel()) {
      fail(op, fmt::format("bias {} is neither [{}] nor x's shape {}", bias->describe(), h, x.describe()));
    }
    if (bias->numel() != h && bias->storage_dtype() != x.storage_dtype()) {
      fail(op, fmt::format("bias {} and x {} differ in storage", bias->describe(), x.describe()));
    }
  }
  check_dropout(op, args, rows);
  if (x.storage_dtype() == DType::F32) {
    bias_dropout_add_impl<float>(args, x, bias, residual, out);
  } else {
    bias_dropout_add_impl<double>(args, x, bias, residual, out);
  }
}

void CpuBackend::dropout_backward(const DropoutArgs& args, const DTensor& dout, DTensor& dx) {
  static constexpr std::string_view op = "dropout_backward";
  check_same_storage(op, {{"dout", &dout}, {"dx", &dx}});
  check_numel(op, "dx", dx, dout.numel(), fmt::format("dout's shape {}", shape_string(dout.shape())));
  check_dropout(op, args, dout.rows());
  if (dout.storage_dtype() == DType::F32) {
    dropout_backward_impl<float>(args, dout, dx);
  } else {
    dropout_backward_impl<double>(args, dout, dx);
  }
}

// ===========================================================================
// Element-wise, reductions, routing.

namespace {

template <class T> void axpby_impl(T alpha, const T* a, T beta, const T* b, T* out, int64_t n, Rounding r) {
  constexpr int64_t kChunk = 4096;
#pragma omp parallel for schedule(static) if (par(n))
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    for (int64_t i = i0; i < i1; ++i) out[i] = a[i] * alpha + b[i] * beta;
    round_span(out + i0, i1 - i0, r);
  }
}

template <class T> double sum_impl(const T* p, int64_t n) {
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static) if (par(n))
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t i0 = ch * kChunk, i1 = std::min(n, i0 + kChunk);
    part[static_cast<size_t>(ch)] =
        math::norm_detail::lane_sum(i1 - i0, [&](int64_t i) { return static_cast<double>(p[i0 + i]); });
  }
  double s = 0.0;
  for (double v : part) s += v;
  return s;
}

template <class T> void softmax_impl(const T* x, T* y, int64_t rows, int64_t n, Rounding r) {
#pragma omp parallel for schedule(static) if (par(rows * n))
  for (int64_t t = 0; t < rows; ++t) {
    const T* xr = x + t * n;
    T* yr = y + t * n;
    T mx = xr[0];
    for (int64_t c = 1; c < n; ++c) mx = xr[c] > mx ? xr[c] : mx;
    for (int64_t c = 0; c < n; ++c) yr[c] = math::act_detail::exp_(xr[c] - mx);
    const double s = math::norm_detail::lane_sum(n, [&](int64_t i) { return static_cast<double>(yr[i]); });
    const T inv = static_cast<T>(1.0 / s);
    for (int64_t c = 0; c < n; ++c) yr[c] = yr[c] * inv;
    round_span(yr, n, r);
  }
}

}  // namespace

void CpuBackend::axpby(float alpha, const DTensor& a, float beta, const DTensor& b, DTensor& out) {
  static constexpr std::string_view op = "axpby";
  check_same_storage(op, {{"a", &a}, {"b", &b}, {"out", &out}});
  if (a.numel() != b.numel() || a.numel() != out.numel()) {
    fail(op, fmt::format("a {}, b {} and out {} differ in size", a.describe(), b.describe(), out.describe()));
  }
  if (a.storage_dtype() == DType::F32) {
    axpby_impl<float>(alpha, a.f32(), beta, b.f32(), out.f32(), a.numel(), rounding_of(out));
  } else {
    axpby_impl<double>(alpha, a.f64(), beta, b.f64(), out.f64(), a.numel(), rounding_of(out));
  }
}

double CpuBackend::sum(const DTensor& t) {
  check_defined("sum", "t", t);
  return t.storage_dtype() == DType::F32 ? sum_impl(t.f32(), t.numel()) : sum_impl(t.f64(), t.numel());
}

// ---------------------------------------------------------------------------
// fp8 (spec §12.3): TE's amax reduction and scaled cast, element math from
// common/math/fp8.h (the reference's fp8_scaling.cpp uses the same functions).

namespace {

// max |float(x)| ignoring NaN, in chunks combined with the same step: the max
// is exact and order-free, so the chunking cannot change the result.
template <class T> float amax_impl(const T* p, int64_t n) {
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<float> part(static_cast<size_t>(chunks), 0.0f);
#pragma omp parallel for schedule(static) if (par(n))
  for (int64_t ch = 0; ch < chunks; ++ch) {
    float m = 0.0f;
    for (int64_t i = ch * kChunk, i1 = std::min(n, i + kChunk); i < i1; ++i) {
      m = math::fp8_amax_step(m, static_cast<float>(p[i]));
    }
    part[static_cast<size_t>(ch)] = m;
  }
  float m = 0.0f;
  for (float v : part) m = math::fp8_amax_step(m, v);
  return m;
}

// out[i] = q * scale_inv rounded once to out's dtype. Elements are read as
// fp32 (TE's ComputeType; F64 inputs rounded RNE, as the reference's quantise
// of a double span does). For an F32 out, fp8_dequantise is that rounding.
template <class T>
void fake_quant_impl(const T* x, T* out, int64_t n, float scale, const math::FloatFormat& f, DType out_dtype) {
  const float scale_inv = 1.0f / scale;  // TE's _compute_scaling_factor_inverse, fp32
#pragma omp parallel for schedule(static) if (par(n))
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t q = math::fp8_quantise(static_cast<float>(x[i]), scale, f);
    if (out_dtype == DType::F32) {
      out[i] = static_cast<T>(math::fp8_dequantise(q, scale_inv, f));
    } else {
      out[i] = static_cast<T>(round_double(math::fp8_dequantise_exact(q, scale_inv, f), out_dtype));
    }
  }
}

}  // namespace

double CpuBackend::amax(const DTensor& t) {
  check_defined("amax", "t", t);
  return t.storage_dtype() == DType::F32 ? amax_impl(t.f32(), t.numel()) : amax_impl(t.f64(), t.numel());
}

void CpuBackend::fp8_fake_quant(const DTensor& x, bool e5m2, float scale, DTensor& out) {
  static constexpr std::string_view op = "fp8_fake_quant";
  check_same_storage(op, {{"x", &x}, {"out", &out}});
  check_numel(op, "out", out, x.numel(), fmt::format("as many elements as x {}", x.describe()));
  const math::FloatFormat& f = e5m2 ? math::kFloat8E5M2 : math::kFloat8E4M3;
  if (x.storage_dtype() == DType::F32) {
    fake_quant_impl(x.f32(), out.f32(), x.numel(), scale, f, out.dtype());
  } else {
    fake_quant_impl(x.f64(), out.f64(), x.numel(), scale, f, out.dtype());
  }
}

void CpuBackend::gather_rows(const DTensor& x, std::span<const int64_t> rows, DTensor& out) {
  static constexpr std::string_view op = "gather_rows";
  check_same_storage(op, {{"x", &x}, {"out", &out}});
  const int64_t h = x.cols(), n = static_cast<int64_t>(rows.size()), xr = x.rows();
  if (out.rows() != n || out.cols() != h) {
    fail(op, fmt::format("out {} is not [{}, {}] ({} rows of x {})", out.describe(), n, h, n, x.describe()));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (rows[static_cast<size_t>(i)] < 0 || rows[static_cast<size_t>(i)] >= xr) {
      fail(op, fmt::format("row index {} (entry {}) out of range for x {}", rows[static_cast<size_t>(i)], i,
                           x.describe()));
    }
  }
  const Rounding r = x.dtype() == out.dtype() ? Rounding{} : rounding_of(out);
  const size_t bytes = static_cast<size_t>(h) * dtype_size(x.storage_dtype());
  const auto* src = static_cast<const std::byte*>(x.data());
  auto* dst = static_cast<std::byte*>(out.data());
#pragma omp parallel for schedule(static) if (par(n * h))
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(dst + static_cast<size_t>(i) * bytes, src + static_cast<size_t>(rows[static_cast<size_t>(i)]) * bytes,
                bytes);
    if (r.mode != RMode::kNone) {
      if (out.storage_dtype() == DType::F32) {
        round_span(out.f32() + i * h, h, r);
      } else {
        round_span(out.f64() + i * h, h, r);
      }
    }
  }
}

namespace {

template <class T>
void scatter_impl(const T* y, std::span<const int64_t> rows, std::span<const float> w, T* out, int64_t h,
                  Rounding r) {
  const int64_t n = static_cast<int64_t>(rows.size());
  // Threads own disjoint column ranges: no two write the same element, and
  // each element sees its contributions in entry order (deterministic).
  const int nt = par(n * h) ? omp_get_max_threads() : 1;
#pragma omp parallel num_threads(nt)
  {
    const auto [c0, c1] = thread_range(h, omp_get_thread_num(), omp_get_num_threads());
    for (int64_t i = 0; i < n && c1 > c0; ++i) {
      const T* yr = y + i * h;
      T* orow = out + rows[static_cast<size_t>(i)] * h;
      if (w.empty()) {
        for (int64_t c = c0; c < c1; ++c) orow[c] = orow[c] + yr[c];
      } else {
        const T wi = static_cast<T>(w[static_cast<size_t>(i)]);
        for (int64_t c = c0; c < c1; ++c) orow[c] = orow[c] + wi * yr[c];
      }
      round_span(orow + c0, c1 - c0, r);
    }
  }
}

}  // namespace

void CpuBackend::scatter_add_rows(const DTensor& y, std::span<const int64_t> rows, std::span<const float> weights,
                                  DTensor& out) {
  static constexpr std::string_view op = "scatter_add_rows";
  check_same_storage(op, {{"y", &y}, {"out", &out}});
  const int64_t h = y.cols(), n = static_cast<int64_t>(rows.size());
  if (y.rows() != n || out.cols() != h) {
    fail(op, fmt::format("y {} must be [{}, h] ({} row indices) and out {} [*, {}]", y.describe(), n, n,
                         out.describe(), h));
  }
  if (!weights.empty() && static_cast<int64_t>(weights.size()) != n) {
    fail(op, fmt::format("{} weights for {} rows", weights.size(), n));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (rows[static_cast<size_t>(i)] < 0 || rows[static_cast<size_t>(i)] >= out.rows()) {
      fail(op, fmt::format("row index {} (entry {}) out of range for out {}", rows[static_cast<size_t>(i)], i,
                           out.describe()));
    }
  }
  if (y.storage_dtype() == DType::F32) {
    scatter_impl<float>(y.f32(), rows, weights, out.f32(), h, rounding_of(out));
  } else {
    scatter_impl<double>(y.f64(), rows, weights, out.f64(), h, rounding_of(out));
  }
}

void CpuBackend::softmax_rows(const DTensor& x, DTensor& y) {
  static constexpr std::string_view op = "softmax_rows";
  check_same_storage(op, {{"x", &x}, {"y", &y}});
  if (y.rows() != x.rows() || y.cols() != x.cols()) {
    fail(op, fmt::format("y {} is not x's shape {}", y.describe(), x.describe()));
  }
  if (x.cols() == 0 || x.rows() == 0) return;
  if (x.storage_dtype() == DType::F32) {
    softmax_impl<float>(x.f32(), y.f32(), x.rows(), x.cols(), rounding_of(y));
  } else {
    softmax_impl<double>(x.f64(), y.f64(), x.rows(), x.cols(), rounding_of(y));
  }
}

}  // namespace paritron::opt::cpu
