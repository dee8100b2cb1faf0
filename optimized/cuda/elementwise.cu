// The element-wise ops and reductions of the CUDA backend (cuda_backend.h):
// copy / cast, copy_cols, fill, axpby, sum, amax (+ amax_to), the fp8 scaled
// cast, bias + activation forward/backward, bias-dropout-add and its backward.
//
// The CPU backend (optimized/cpu/cpu_backend.cpp) is the model: the same
// single-source element math (optimized/math/activations.h, common/math/fp8.h,
// common/math/random.h), the same rounding points and the same argument
// checks. Tensors here sit in their own dtype (bf16 as 2 bytes); kernels read
// them with ld<T> and write with put<T> (device.cuh), computing in
// T = float, or double when an operand is F64 (two instantiations per kernel,
// the storage dtype is a uniform runtime branch).
//
// Everything is enqueued on the backend's stream; only sum and amax (which
// return host values) synchronise. sum is bit-identical to the CPU backend's
// (same chunks, same 8-lane order); amax is a max, exact in any order.
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common/error.h"
#include "common/math/float_format.h"
#include "common/math/fp8.h"
#include "common/math/random.h"
#include "optimized/cuda/cuda_backend.h"
#include "optimized/cuda/cuda_check.h"
#include "optimized/cuda/device.cuh"
#include "optimized/cuda/op_checks.h"
#include "optimized/math/activations.h"

namespace paritron::opt::cuda {

namespace {

static_assert(static_cast<int>(ActivationKind::kGelu) == static_cast<int>(math::Act::kGelu));
static_assert(static_cast<int>(ActivationKind::kSilu) == static_cast<int>(math::Act::kSilu));
static_assert(static_cast<int>(ActivationKind::kRelu) == static_cast<int>(math::Act::kRelu));
static_assert(static_cast<int>(ActivationKind::kSquaredRelu) == static_cast<int>(math::Act::kSquaredRelu));
static_assert(static_cast<int>(ActivationKind::kOpenaiGelu) == static_cast<int>(math::Act::kOpenaiGelu));
static_assert(static_cast<int>(ActivationKind::kErfGelu) == static_cast<int>(math::Act::kErfGelu));
static_assert(static_cast<int>(ActivationKind::kQuickGelu) == static_cast<int>(math::Act::kQuickGelu));
static_assert(static_cast<int>(ActivationKind::kBiasGeluTanh) == static_cast<int>(math::Act::kBiasGeluTanh));

// ---------------------------------------------------------------------------
// Errors and checks (the CPU backend's, with BackendError; the shared ones
// are op_checks.h's).

// A value of dtype `dtype` as a double (round_double of the CPU backend).
double round_double(double v, DType dtype) {
  if (dtype == DType::F64) return v;
  const math::FloatFormat* f = float_format(dtype);
  if (f == nullptr) throw BackendError(text("{} is not a floating dtype", dtype_name(dtype)));
  return math::round_to(v, *f);
}

// Reductions: enough blocks to fill the GPU, few enough that per-block
// results stay cheap to combine.
constexpr int kReduceBlocks = 1024;

// ---------------------------------------------------------------------------
// copy, copy_cols, fill, axpby.

template <class T>
__global__ void copy_kernel(DevPtr src, DevPtr dst, DType dst_dt, int64_t n) {
  PARITRON_GRID_LOOP(i, n) put<T>(dst, dst_dt, i, ld<T>(src, i));
}

template <class T>
__global__ void copy_cols_kernel(DevPtr src, int64_t src_cols, int64_t src_col, DevPtr dst, DType dst_dt,
                                 int64_t dst_cols, int64_t dst_col, int64_t rows, int64_t ncols) {
  PARITRON_GRID_LOOP(i, rows * ncols) {
    const int64_t r = i / ncols, j = i - r * ncols;
    put<T>(dst, dst_dt, r * dst_cols + dst_col + j, ld<T>(src, r * src_cols + src_col + j));
  }
}

template <class U>
__global__ void fill_bits_kernel(U* p, int64_t n, U bits) {
  PARITRON_GRID_LOOP(i, n) p[i] = bits;
}

template <class T>
__global__ void axpby_kernel(T alpha, DevPtr a, T beta, DevPtr b, DevPtr out, DType out_dt, int64_t n) {
  PARITRON_GRID_LOOP(i, n) put<T>(out, out_dt, i, ld<T>(a, i) * alpha + ld<T>(b, i) * beta);
}

// ---------------------------------------------------------------------------
// sum: the CPU backend's order exactly. Chunks of kSumChunk elements; within
// a chunk, element j goes to lane j % 8, each lane summed in index order from
// 0.0, the lanes combined as math::norm_detail::lane_sum does; the chunk
// partials are summed in chunk order on the host. Thread g of the kernel is
// lane g % 8 of chunk g / 8: the 8 lanes of a chunk are 8 adjacent threads of
// one warp, reading 8 adjacent elements per step.

constexpr int64_t kSumChunk = 4096;  // the CPU backend's sum_impl kChunk
constexpr int kSumLanes = 8;         // math::norm_detail::kLanes

__global__ void sum_partials_kernel(DevPtr t, int64_t n, int64_t chunks, double* partial) {
  const int64_t total = chunks * kSumLanes;
  // The loop bound is uniform over the block, so whole warps run the shuffles.
  for (int64_t base = blockIdx.x * int64_t{blockDim.x}; base < total; base += int64_t{gridDim.x} * blockDim.x) {
    const int64_t g = base + threadIdx.x;
    const int64_t c = g / kSumLanes;
    const int lane = static_cast<int>(g % kSumLanes);
    double acc = 0.0;
    if (g < total) {
      const int64_t i0 = c * kSumChunk;
      const int64_t len = n - i0 < kSumChunk ? n - i0 : kSumChunk;
      for (int64_t j = lane; j < len; j += kSumLanes) acc += ld<double>(t, i0 + j);
    }
    // ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)), in lane 0 of the 8.
    acc = acc + __shfl_down_sync(0xFFFFFFFFu, acc, 4, kSumLanes);  // lane l < 4: a_l + a_(l+4)
    acc = acc + __shfl_down_sync(0xFFFFFFFFu, acc, 1, kSumLanes);  // lanes 0, 2: the pairs of pairs
    acc = acc + __shfl_down_sync(0xFFFFFFFFu, acc, 2, kSumLanes);  // lane 0: the whole
    if (g < total && lane == 0) partial[c] = acc;
  }
}

// ---------------------------------------------------------------------------
// amax: max |float(x)| with NaN ignored (math::fp8_amax_step), per thread,
// warp and block, then one atomicMax per block on the result's bits: the
// values are >= +0 and never NaN, so their bit patterns order as the values
// do, and a max is exact in any order (deterministic). *out must start at +0.

__global__ void amax_kernel(DevPtr t, int64_t n, float* out) {
  float m = 0.0f;
  PARITRON_GRID_LOOP(i, n) m = math::fp8_amax_step(m, ld<float>(t, i));  // F64: RNE to fp32 first
  for (int o = 16; o > 0; o >>= 1) m = math::fp8_amax_step(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
  __shared__ float warp_max[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) b = math::fp8_amax_step(b, warp_max[w]);
    atomicMax(reinterpret_cast<unsigned int*>(out), __float_as_uint(b));
  }
}

// ---------------------------------------------------------------------------
// fp8 scaled cast (Transformer Engine's cast + cast_from_fp8, common/math/fp8.h).
// An F32 out holds fp8_dequantise (TE's fp32 product); any other dtype the
// exact product fp8_dequantise_exact rounded once to it.

__global__ void fp8_fake_quant_kernel(DevPtr x, DevPtr out, DType out_dt, int64_t n, bool e5m2, float scale,
                                      float scale_inv) {
  PARITRON_FORMAT(e4m3_format, kFloat8E4M3);
  PARITRON_FORMAT(e5m2_format, kFloat8E5M2);
  const math::FloatFormat f = e5m2 ? e5m2_format : e4m3_format;
  PARITRON_GRID_LOOP(i, n) {
    const uint8_t q = math::fp8_quantise(ld<float>(x, i), scale, f);  // x read as fp32 (F64: RNE)
    if (out_dt == DType::F32) {
      put<float>(out, out_dt, i, math::fp8_dequantise(q, scale_inv, f));
    } else {
      put<double>(out, out_dt, i, math::fp8_dequantise_exact(q, scale_inv, f));
    }
  }
}

// ---------------------------------------------------------------------------
// Bias + activation (+ GLU). One thread per output column c of row t: x's
// row is [a | g] (GLU, width 2f) or [a] (width f), the bias as wide as x's
// row. `unfused` is Megatron's bias_activation_fusion = false: `x + bias` and,
// under GLU, act(a) are tensors of the output's dtype (rounded to dt, the
// dtype of y / dx, as the CPU backend rounds them); the fused kernels keep
// them in registers. Under GLU's unfused backward, dy * g and act(a) are the
// dtype tensors of autograd through act(a) * g.

template <class T>
__device__ __forceinline__ void act_inputs(DevPtr x, DevPtr bias, DType dt, bool unfused, bool glu, int64_t xi,
                                           int64_t f, int64_t c, T* a, T* g) {
  *a = ld<T>(x, xi);
  if (bias.p != nullptr) {
    *a = *a + ld<T>(bias, c);
    if (unfused) *a = round_as<T>(dt, *a);
  }
  *g = T(0);
  if (glu) {
    *g = ld<T>(x, xi + f);
    if (bias.p != nullptr) {
      *g = *g + ld<T>(bias, f + c);
      if (unfused) *g = round_as<T>(dt, *g);
    }
  }
}

template <class T>
__global__ void bias_act_forward_kernel(DevPtr x, DevPtr bias, DevPtr y, DType y_dt, int64_t rows, int64_t f,
                                        math::Act kind, bool glu, bool unfused) {
  const int64_t in_w = glu ? 2 * f : f;
  PARITRON_GRID_LOOP(i, rows * f) {
    const int64_t t = i / f, c = i - t * f;
    T a, g;
    act_inputs<T>(x, bias, y_dt, unfused, glu, t * in_w + c, f, c, &a, &g);
    const T v = unfused && glu ? round_as<T>(y_dt, math::act_value(kind, a)) * g
                               : math::bias_act_value(kind, a, glu, g);
    put<T>(y, y_dt, i, v);
  }
}

template <class T>
__global__ void bias_act_backward_kernel(DevPtr x, DevPtr bias, DevPtr dy, DevPtr dx, DType dx_dt, int64_t rows,
                                         int64_t f, math::Act kind, bool glu, bool unfused) {
  const int64_t in_w = glu ? 2 * f : f;
  PARITRON_GRID_LOOP(i, rows * f) {
    const int64_t t = i / f, c = i - t * f;
    const int64_t xi = t * in_w + c;
    T a, g;
    act_inputs<T>(x, bias, dx_dt, unfused, glu, xi, f, c, &a, &g);
    const T d = ld<T>(dy, i);
    T da = T(0), dg = T(0);
    if (unfused && glu) {
      da = round_as<T>(dx_dt, d * g) * math::act_derivative(kind, a);
      dg = d * round_as<T>(dx_dt, math::act_value(kind, a));
    } else {
      math::bias_act_grad(kind, a, glu, g, d, &da, &dg);
    }
    put<T>(dx, dx_dt, xi, da);
    if (glu) put<T>(dx, dx_dt, xi + f, dg);
  }
}

// ---------------------------------------------------------------------------
// Dropout. Element (row, col) of the global [S*b, h] tensor is kept iff
// math::uniform_float(key, global_row * h + col) >= p, compared as the CPU
// backend does: u >= thr with thr the smallest float >= p. A kept value is
// multiplied by scale = 1 / (1 - p) (as T), a dropped one by 0.

struct DropoutMask {
  math::RngKey key{};
  const int64_t* row_positions = nullptr;  // device copy of DropoutArgs::row_positions, or null
  int64_t row_offset = 0;
  int64_t h = 1;
  float threshold = 0.0f;
  bool drop = false;
};

template <class T>
__device__ __forceinline__ T dropout_factor(const DropoutMask& m, int64_t t, int64_t c, T scale) {
  const int64_t row = m.row_positions != nullptr ? m.row_positions[t] : m.row_offset + t;
  const uint64_t index = static_cast<uint64_t>(row) * static_cast<uint64_t>(m.h) + static_cast<uint64_t>(c);
  return math::uniform_float(m.key, index) >= m.threshold ? scale : T(0);
}

// out = residual (rounded to x's dtype when it differs) + dropout(x + bias);
// bias [h] or x's shape (bias_full); residual may be null.
template <class T>
__global__ void bias_dropout_add_kernel(DevPtr x, DType x_dt, DevPtr bias, bool bias_full, DevPtr residual,
                                        bool round_residual, DevPtr out, DType out_dt, int64_t rows, DropoutMask m,
                                        T scale) {
  const int64_t h = m.h;
  PARITRON_GRID_LOOP(i, rows * h) {
    const int64_t t = i / h, c = i - t * h;
    T v = ld<T>(x, i);
    if (bias.p != nullptr) v = v + ld<T>(bias, bias_full ? i : c);
    if (m.drop) v = v * dropout_factor<T>(m, t, c, scale);
    if (residual.p != nullptr) {
      T r = ld<T>(residual, i);
      if (round_residual) r = round_as<T>(x_dt, r);
      v = r + v;
    }
    put<T>(out, out_dt, i, v);
  }
}

template <class T>
__global__ void dropout_backward_kernel(DevPtr dout, DevPtr dx, DType dx_dt, int64_t rows, DropoutMask m, T scale) {
  const int64_t h = m.h;
  PARITRON_GRID_LOOP(i, rows * h) {
    T v = ld<T>(dout, i);
    if (m.drop) {
      const int64_t t = i / h, c = i - t * h;
      v = v * dropout_factor<T>(m, t, c, scale);
    }
    put<T>(dx, dx_dt, i, v);
  }
}

void check_dropout(std::string_view op, const DropoutArgs& args, int64_t rows) {
  if (!(args.p >= 0.0 && args.p <= 1.0)) fail(op, text("dropout probability {} is not in [0, 1]", args.p));
  if (!args.row_positions.empty() && static_cast<int64_t>(args.row_positions.size()) != rows) {
    fail(op, text("{} row_positions for {} rows", args.row_positions.size(), rows));
  }
}

// The mask's parameters; row_positions are copied to the backend's workspace.
DropoutMask dropout_mask(CudaBackend& be, const DropoutArgs& args, int64_t h, const std::string& ctx) {
  DropoutMask m;
  m.key = args.key;
  m.row_offset = args.row_offset;
  m.h = h;
  m.threshold = threshold_float(args.p);
  m.drop = args.p > 0.0;
  if (m.drop && !args.row_positions.empty()) {
    const size_t bytes = args.row_positions.size() * sizeof(int64_t);
    void* d = be.workspace(bytes);
    // Pageable source: the call returns once the bytes are staged.
    PARITRON_CUDA_CHECK(cudaMemcpyAsync(d, args.row_positions.data(), bytes, cudaMemcpyHostToDevice, stream_of(be)),
                        ctx);
    m.row_positions = static_cast<const int64_t*>(d);
  }
  return m;
}

// The reference's scale, 1 / (1 - p) in double (0 for p = 1).
double dropout_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

// Checks x [T, f or 2f] and bias; returns f (the CPU backend's check_act).
int64_t check_act(std::string_view op, const ActivationArgs& args, const DTensor& x, const DTensor* bias) {
  if (static_cast<int>(args.kind) > static_cast<int>(ActivationKind::kBiasGeluTanh)) {
    fail(op, text("unknown activation kind {}", static_cast<int>(args.kind)));
  }
  const int64_t in_w = x.cols();
  if (args.glu && in_w % 2 != 0) fail(op, text("GLU input x {} has an odd width", x.describe()));
  if (bias != nullptr) {
    check_defined(op, "bias", *bias);
    check_numel(op, "bias", *bias, in_w, text("[{}] (the width of x {})", in_w, x.describe()));
  }
  return args.glu ? in_w / 2 : in_w;
}

}  // namespace

// ===========================================================================
// copy, copy_cols, fill.

// dst = src rounded to dst's dtype: torch's Tensor.copy_ / .to(dtype) (RNE
// casts), e.g. Megatron's Float16Module casts and the optimizer's fp32 main
// params (megatron/core/transformer/module.py, megatron/core/optimizer/optimizer.py).
void CudaBackend::copy(const DTensor& src, DTensor& dst) {
  static constexpr std::string_view op = "copy";
  if (!src.defined()) fail(op, "src is not allocated");
  if (!dst.defined()) fail(op, "dst is not allocated");
  check_numel(op, "dst", dst, src.numel(), text("as many elements as src {}", src.describe()));
  const int64_t n = src.numel();
  if (n == 0) return;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = context(op, {{"src", &src}, {"dst", &dst}});
  if (src.dtype() == dst.dtype() && src.storage_dtype() == dst.storage_dtype()) {  // any dtype: the bytes
    if (src.data() != dst.data()) {
      PARITRON_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), src.nbytes(), cudaMemcpyDeviceToDevice, s), ctx);
    }
    return;
  }
  if (!is_compute_float(src.dtype()) || !is_compute_float(src.storage_dtype()) || !is_compute_float(dst.dtype()) ||
      !is_compute_float(dst.storage_dtype())) {
    fail(op, text("src {} to dst {}: casts are between f64, f32, bf16 and f16 (other dtypes copy only to "
                  "their own dtype)",
                  src.describe(), dst.describe()));
  }
  if (is_f64(src) || is_f64(dst)) {
    copy_kernel<double><<<blocks_for(n), kThreads, 0, s>>>(dev(src), dev(dst), dst.dtype(), n);
  } else {
    copy_kernel<float><<<blocks_for(n), kThreads, 0, s>>>(dev(src), dev(dst), dst.dtype(), n);
  }
  PARITRON_CUDA_CHECK_LAUNCH("copy_kernel", ctx);
}

// A block of columns: the split of Megatron's fused QKV into q, k, v and the
// merge of their gradients (megatron/core/transformer/attention.py,
// SelfAttention.get_query_key_value_tensors).
void CudaBackend::copy_cols(const DTensor& src, int64_t src_col, DTensor& dst, int64_t dst_col, int64_t ncols) {
  static constexpr std::string_view op = "copy_cols";
  if (!src.defined()) fail(op, "src is not allocated");
  if (!dst.defined()) fail(op, "dst is not allocated");
  const int64_t rows = src.rows(), sc = src.cols(), dc = dst.cols();
  if (dst.rows() != rows || ncols < 0 || src_col < 0 || dst_col < 0 || src_col + ncols > sc ||
      dst_col + ncols > dc) {
    fail(op, text("columns [{}, {}) of src {} into columns [{}, {}) of dst {}: rows must match and the "
                  "ranges fit",
                  src_col, src_col + ncols, src.describe(), dst_col, dst_col + ncols, dst.describe()));
  }
  const bool same = src.dtype() == dst.dtype() && src.storage_dtype() == dst.storage_dtype();
  if (!same) {
    check_defined(op, "src", src);
    check_defined(op, "dst", dst);
  }
  if (ncols == 0 || rows == 0) return;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = text("{} columns [{}, {}) of src {} into columns [{}, {}) of dst {}", op, src_col,
                               src_col + ncols, src.describe(), dst_col, dst_col + ncols, dst.describe());
  if (same) {  // the bytes: one (strided) copy
    const size_t es = dtype_size(src.storage_dtype());
    const auto* sp = static_cast<const std::byte*>(src.data()) + static_cast<size_t>(src_col) * es;
    auto* dp = static_cast<std::byte*>(dst.data()) + static_cast<size_t>(dst_col) * es;
    if (rows == 1) {  // no pitch (a flat tensor's row may exceed the 2-D copy's pitch limit)
      PARITRON_CUDA_CHECK(cudaMemcpyAsync(dp, sp, static_cast<size_t>(ncols) * es, cudaMemcpyDeviceToDevice, s), ctx);
      return;
    }
    PARITRON_CUDA_CHECK(cudaMemcpy2DAsync(dp, static_cast<size_t>(dc) * es, sp, static_cast<size_t>(sc) * es,
                                          static_cast<size_t>(ncols) * es, static_cast<size_t>(rows),
                                          cudaMemcpyDeviceToDevice, s),
                        ctx);
    return;
  }
  const int64_t n = rows * ncols;
  if (is_f64(src) || is_f64(dst)) {
    copy_cols_kernel<double><<<blocks_for(n), kThreads, 0, s>>>(dev(src), sc, src_col, dev(dst), dst.dtype(), dc,
                                                                dst_col, rows, ncols);
  } else {
    copy_cols_kernel<float><<<blocks_for(n), kThreads, 0, s>>>(dev(src), sc, src_col, dev(dst), dst.dtype(), dc,
                                                               dst_col, rows, ncols);
  }
  PARITRON_CUDA_CHECK_LAUNCH("copy_cols_kernel", ctx);
}

// t = value rounded to t's dtype (torch's fill_ / zero_).
void CudaBackend::fill(DTensor& t, double value) {
  check_defined("fill", "t", t);
  const int64_t n = t.numel();
  if (n == 0) return;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = text("fill {} with {}", t.describe(), value);
  const double v = round_double(value, t.dtype());  // then exact in the storage dtype
  uint64_t bits = 0;
  switch (t.storage_dtype()) {
    case DType::F64: bits = std::bit_cast<uint64_t>(v); break;
    case DType::F32: bits = std::bit_cast<uint32_t>(static_cast<float>(v)); break;
    case DType::BF16: bits = math::encode(v, math::kBFloat16); break;
    default: bits = math::encode(v, math::kFloat16); break;  // F16 (check_defined admits no other)
  }
  if (bits == 0) {  // +0: all-zero bytes
    PARITRON_CUDA_CHECK(cudaMemsetAsync(t.data(), 0, t.nbytes(), s), ctx);
    return;
  }
  switch (dtype_size(t.storage_dtype())) {
    case 8:
      fill_bits_kernel<uint64_t><<<blocks_for(n), kThreads, 0, s>>>(static_cast<uint64_t*>(t.data()), n, bits);
      break;
    case 4:
      fill_bits_kernel<uint32_t><<<blocks_for(n), kThreads, 0, s>>>(static_cast<uint32_t*>(t.data()), n,
                                                                    static_cast<uint32_t>(bits));
      break;
    default:
      fill_bits_kernel<uint16_t><<<blocks_for(n), kThreads, 0, s>>>(static_cast<uint16_t*>(t.data()), n,
                                                                    static_cast<uint16_t>(bits));
      break;
  }
  PARITRON_CUDA_CHECK_LAUNCH("fill_bits_kernel", ctx);
}

// ===========================================================================
// Bias + activation (+ GLU): megatron/core/transformer/mlp.py (unfused: `x +
// bias`, activation_func, chunk(2) for GLU), megatron/core/fusions/
// fused_bias_gelu.py (bias_gelu and its hand-written backward) and
// fused_bias_swiglu.py (bias_swiglu).

void CudaBackend::bias_act_forward(const ActivationArgs& args, const DTensor& x, const DTensor* bias, DTensor& y) {
  static constexpr std::string_view op = "bias_act_forward";
  check_defined(op, "x", x);
  check_defined(op, "y", y);
  const int64_t f = check_act(op, args, x, bias);
  if (y.cols() != f || y.rows() != x.rows()) {
    fail(op, text("y {} is not [{}, {}] for x {}{}", y.describe(), x.rows(), f, x.describe(),
                  args.glu ? " (GLU halves the width)" : ""));
  }
  const int64_t rows = x.rows();
  if (rows == 0 || f == 0) return;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = context(op, {{"x", &x}, {"bias", bias}, {"y", &y}});
  const auto kind = static_cast<math::Act>(args.kind);
  const int blocks = blocks_for(rows * f);
  if (is_f64(x) || is_f64(y) || (bias != nullptr && is_f64(*bias))) {
    bias_act_forward_kernel<double><<<blocks, kThreads, 0, s>>>(dev(x), dev(bias), dev(y), y.dtype(), rows, f, kind,
                                                                args.glu, !args.fused);
  } else {
    bias_act_forward_kernel<float><<<blocks, kThreads, 0, s>>>(dev(x), dev(bias), dev(y), y.dtype(), rows, f, kind,
                                                               args.glu, !args.fused);
  }
  PARITRON_CUDA_CHECK_LAUNCH("bias_act_forward_kernel", ctx);
}

void CudaBackend::bias_act_backward(const ActivationArgs& args, const DTensor& x, const DTensor* bias,
                                    const DTensor& dy, DTensor& dx) {
  static constexpr std::string_view op = "bias_act_backward";
  check_defined(op, "x", x);
  check_defined(op, "dy", dy);
  check_defined(op, "dx", dx);
  const int64_t f = check_act(op, args, x, bias);
  if (dy.cols() != f || dy.rows() != x.rows()) {
    fail(op, text("dy {} is not [{}, {}] for x {}", dy.describe(), x.rows(), f, x.describe()));
  }
  check_numel(op, "dx", dx, x.numel(), text("x's shape {}", shape_string(x.shape())));
  const int64_t rows = x.rows();
  if (rows == 0 || f == 0) return;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = context(op, {{"x", &x}, {"bias", bias}, {"dy", &dy}, {"dx", &dx}});
  const auto kind = static_cast<math::Act>(args.kind);
  const int blocks = blocks_for(rows * f);
  if (is_f64(x) || is_f64(dy) || is_f64(dx) || (bias != nullptr && is_f64(*bias))) {
    bias_act_backward_kernel<double><<<blocks, kThreads, 0, s>>>(dev(x), dev(bias), dev(dy), dev(dx), dx.dtype(),
                                                                 rows, f, kind, args.glu, !args.fused);
  } else {
    bias_act_backward_kernel<float><<<blocks, kThreads, 0, s>>>(dev(x), dev(bias), dev(dy), dev(dx), dx.dtype(),
                                                                rows, f, kind, args.glu, !args.fused);
  }
  PARITRON_CUDA_CHECK_LAUNCH("bias_act_backward_kernel", ctx);
}

// ===========================================================================
// Bias-dropout-add: megatron/core/fusions/fused_bias_dropout.py
// (_bias_dropout_add_func): residual.to(x.dtype), x + bias, dropout, residual + x.

void CudaBackend::bias_dropout_add(const DropoutArgs& args, const DTensor& x, const DTensor* bias,
                                   const DTensor* residual, DTensor& out) {
  static constexpr std::string_view op = "bias_dropout_add";
  check_defined(op, "x", x);
  if (residual != nullptr) check_defined(op, "residual", *residual);
  check_defined(op, "out", out);
  const int64_t rows = x.rows(), h = x.cols();
  const std::string xs = text("x's shape {}", shape_string(x.shape()));
  check_numel(op, "out", out, x.numel(), xs);
  if (residual != nullptr) check_numel(op, "residual", *residual, x.numel(), xs);
  if (bias != nullptr) {
    check_defined(op, "bias", *bias);
    if (bias->numel() != h && bias->numel() != x.numel()) {
      fail(op, text("bias {} is neither [{}] nor x's shape {}", bias->describe(), h, x.describe()));
    }
  }
  check_dropout(op, args, rows);
  if (rows == 0 || h == 0) return;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = context(op, {{"x", &x}, {"bias", bias}, {"residual", residual}, {"out", &out}});
  const DropoutMask m = dropout_mask(*this, args, h, ctx);
  const bool bias_full = bias != nullptr && bias->numel() != h;
  const bool round_residual = residual != nullptr && residual->dtype() != x.dtype();
  const double scale = dropout_scale(args.p);
  const int blocks = blocks_for(rows * h);
  if (is_f64(x) || is_f64(out) || (bias != nullptr && is_f64(*bias)) || (residual != nullptr && is_f64(*residual))) {
    bias_dropout_add_kernel<double><<<blocks, kThreads, 0, s>>>(dev(x), x.dtype(), dev(bias), bias_full,
                                                                dev(residual), round_residual, dev(out), out.dtype(),
                                                                rows, m, scale);
  } else {
    bias_dropout_add_kernel<float><<<blocks, kThreads, 0, s>>>(dev(x), x.dtype(), dev(bias), bias_full,
                                                               dev(residual), round_residual, dev(out), out.dtype(),
                                                               rows, m, static_cast<float>(scale));
  }
  PARITRON_CUDA_CHECK_LAUNCH("bias_dropout_add_kernel", ctx);
}

// The backward of the dropout in bias-dropout-add (autograd through
// fused_bias_dropout.py's dropout): the same mask, regenerated from the key.
void CudaBackend::dropout_backward(const DropoutArgs& args, const DTensor& dout, DTensor& dx) {
  static constexpr std::string_view op = "dropout_backward";
  check_defined(op, "dout", dout);
  check_defined(op, "dx", dx);
  check_numel(op, "dx", dx, dout.numel(), text("dout's shape {}", shape_string(dout.shape())));
  const int64_t rows = dout.rows(), h = dout.cols();
  check_dropout(op, args, rows);
  if (rows == 0 || h == 0) return;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = context(op, {{"dout", &dout}, {"dx", &dx}});
  const DropoutMask m = dropout_mask(*this, args, h, ctx);
  const double scale = dropout_scale(args.p);
  const int blocks = blocks_for(rows * h);
  if (is_f64(dout) || is_f64(dx)) {
    dropout_backward_kernel<double><<<blocks, kThreads, 0, s>>>(dev(dout), dev(dx), dx.dtype(), rows, m, scale);
  } else {
    dropout_backward_kernel<float><<<blocks, kThreads, 0, s>>>(dev(dout), dev(dx), dx.dtype(), rows, m,
                                                               static_cast<float>(scale));
  }
  PARITRON_CUDA_CHECK_LAUNCH("dropout_backward_kernel", ctx);
}

// ===========================================================================
// Element-wise and reductions.

// out = a * alpha + b * beta: torch's add / mul in the optimizer and grad
// paths (e.g. grad scaling, megatron/core/optimizer/optimizer.py).
void CudaBackend::axpby(float alpha, const DTensor& a, float beta, const DTensor& b, DTensor& out) {
  static constexpr std::string_view op = "axpby";
  check_defined(op, "a", a);
  check_defined(op, "b", b);
  check_defined(op, "out", out);
  if (a.numel() != b.numel() || a.numel() != out.numel()) {
    fail(op, text("a {}, b {} and out {} differ in size", a.describe(), b.describe(), out.describe()));
  }
  const int64_t n = a.numel();
  if (n == 0) return;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = context(op, {{"a", &a}, {"b", &b}, {"out", &out}});
  if (is_f64(a) || is_f64(b) || is_f64(out)) {
    axpby_kernel<double><<<blocks_for(n), kThreads, 0, s>>>(alpha, dev(a), beta, dev(b), dev(out), out.dtype(), n);
  } else {
    axpby_kernel<float><<<blocks_for(n), kThreads, 0, s>>>(alpha, dev(a), beta, dev(b), dev(out), out.dtype(), n);
  }
  PARITRON_CUDA_CHECK_LAUNCH("axpby_kernel", ctx);
}

// The sum of all elements in double (torch.sum of the loss terms), in the CPU
// backend's order: the same double.
double CudaBackend::sum(const DTensor& t) {
  static constexpr std::string_view op = "sum";
  check_defined(op, "t", t);
  const int64_t n = t.numel();
  if (n == 0) return 0.0;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = context(op, {{"t", &t}});
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  auto* partial = static_cast<double*>(workspace(static_cast<size_t>(chunks) * sizeof(double)));
  sum_partials_kernel<<<blocks_for(chunks * kSumLanes), kThreads, 0, s>>>(dev(t), n, chunks, partial);
  PARITRON_CUDA_CHECK_LAUNCH("sum_partials_kernel", ctx);
  std::vector<double> host(static_cast<size_t>(chunks));
  PARITRON_CUDA_CHECK(cudaMemcpyAsync(host.data(), partial, host.size() * sizeof(double), cudaMemcpyDeviceToHost, s),
                      ctx);
  PARITRON_CUDA_CHECK(cudaStreamSynchronize(s), ctx);
  double total = 0.0;
  for (double v : host) total += v;
  return total;
}

// ---------------------------------------------------------------------------
// fp8 (spec §12.3): Transformer Engine's amax reduction and scaled cast
// (transformer_engine/common/util/vectorized_pointwise.h, cast_from_fp8),
// element math from common/math/fp8.h.

double CudaBackend::amax(const DTensor& t) {
  static constexpr std::string_view op = "amax";
  check_defined(op, "t", t);
  const int64_t n = t.numel();
  if (n == 0) return 0.0;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = context(op, {{"t", &t}});
  auto* d = static_cast<float*>(workspace(sizeof(float)));
  PARITRON_CUDA_CHECK(cudaMemsetAsync(d, 0, sizeof(float), s), ctx);
  amax_kernel<<<std::min(blocks_for(n), kReduceBlocks), kThreads, 0, s>>>(dev(t), n, d);
  PARITRON_CUDA_CHECK_LAUNCH("amax_kernel", ctx);
  float result = 0.0f;
  PARITRON_CUDA_CHECK(cudaMemcpyAsync(&result, d, sizeof(float), cudaMemcpyDeviceToHost, s), ctx);
  PARITRON_CUDA_CHECK(cudaStreamSynchronize(s), ctx);
  return static_cast<double>(result);
}

void CudaBackend::amax_to(const DTensor& t, DTensor& out) {
  static constexpr std::string_view op = "amax_to";
  check_defined(op, "t", t);
  if (!out.defined()) fail(op, "out is not allocated");
  if (out.storage_dtype() != DType::F32 || out.dtype() != DType::F32 || out.numel() != 1) {
    fail(op, text("out is {}, expected an fp32 scalar (f32, 1 element)", out.describe()));
  }
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = context(op, {{"t", &t}, {"out", &out}});
  PARITRON_CUDA_CHECK(cudaMemsetAsync(out.data(), 0, sizeof(float), s), ctx);
  const int64_t n = t.numel();
  if (n == 0) return;
  amax_kernel<<<std::min(blocks_for(n), kReduceBlocks), kThreads, 0, s>>>(dev(t), n, static_cast<float*>(out.data()));
  PARITRON_CUDA_CHECK_LAUNCH("amax_kernel", ctx);
}

void CudaBackend::fp8_fake_quant(const DTensor& x, bool e5m2, float scale, DTensor& out) {
  static constexpr std::string_view op = "fp8_fake_quant";
  check_defined(op, "x", x);
  check_defined(op, "out", out);
  check_numel(op, "out", out, x.numel(), text("as many elements as x {}", x.describe()));
  const int64_t n = x.numel();
  if (n == 0) return;
  const cudaStream_t s = stream_of(*this);
  const std::string ctx = text("{} {} x {} scale {} out {}", op, e5m2 ? "e5m2" : "e4m3", x.describe(), scale,
                               out.describe());
  const float scale_inv = 1.0f / scale;  // TE's _compute_scaling_factor_inverse, one fp32 division
  fp8_fake_quant_kernel<<<blocks_for(n), kThreads, 0, s>>>(dev(x), dev(out), out.dtype(), n, e5m2, scale, scale_inv);
  PARITRON_CUDA_CHECK_LAUNCH("fp8_fake_quant_kernel", ctx);
}

}  // namespace paritron::opt::cuda
