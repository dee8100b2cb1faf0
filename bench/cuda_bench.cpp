// The CUDA backend's speed on one GPU (optimized/cuda/cuda_backend.h), each
// kernel next to the ceiling it is judged against, measured in the same
// binary on the same stream:
//   * gemm: CudaBackend::gemm (bf16, fp16, fp32) and gemm_lt (fp8 e4m3 with
//     per-tensor scales, bf16 out) as impl `cuda`, a bare cuBLASLt call
//     written here as impl `bare_gemm` (the table's "% peak" for the cuda rows), on the Linear fprop layout y = x W^T
//     (the TN layout cuBLASLt's fp8 kernels take) at m4096_n4096_k4096 and
//     the layer's m4096_n14336_k4096. Each cuda row also reports
//     `vs_bare` = bare time / its time, the bare call timed right after it.
//   * attention_fwd / attention_bwd: the flash attention, bf16, hd 128,
//     causal, 32 heads in 8 query groups, seq 4096 and 8192, batch 1 and 2.
//     FLOPs as FlashAttention counts them: forward 4 b h s^2 hd / 2 (causal
//     halves the square), backward 2.5x the forward (so these rows are not
//     the "full square" of bench/README.md; their shape says _causal).
//   * memory-bound fused kernels (LayerNorm / RMSNorm forward and backward,
//     RoPE, bias-dropout-add, gather_rows) in GB/s at n8192_h4096 bf16, next
//     to `device_copy` (Backend::copy) of the same bytes; each kernel row
//     reports `vs_copy` = its GB/s / the copy's, the copy timed right after.
//   * transformer_layer_fwd_bwd (and _fwd): a Llama-style layer (hidden
//     4096, 32 heads, 8 query groups, SwiGLU ffn 14336, RMSNorm, RoPE, no
//     biases, causal, seq 4096, batch 1, bf16) through opt::SingleRankModel
//     on the CUDA backend, with MFU against the H100 SXM dense bf16 peak of
//     989 TFLOP/s. Model FLOPs are an explicit count (layer_flops below).
//
// Rows are <component>/cuda/<shape>/<dtype> (bench/README.md; impl `cuda`,
// not `optimized`: there is no float64 reference row to pair them with, and
// an unpaired `optimized` row fails `ci/bench --strict`).
//
// Timing: cudaEvents on the backend's stream around every iteration
// (UseManualTime), after warm-up calls (workspace allocation, cuBLASLt
// heuristics); short kernels run several times between the events, and the
// iteration time is the GPU time of one call. Counters follow bench/README.md:
// `flops` / `bytes` per iteration as plain values (the table divides), plus
// `TFLOP/s` / `GB/s` as rate counters (per second of GPU time) for reading
// the console output directly.
//
// Without a device (or with a backend op not implemented yet) every
// benchmark reports SkipWithError("no CUDA device: ..." / the error) and the
// binary still exits 0.
//
//   build/gpu/bench/cuda_bench --benchmark_filter='gemm/'
#include <benchmark/benchmark.h>
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "common/case_file.h"
#include "common/init.h"
#include "common/rng.h"
#include "common/transformer_config.h"
#include "optimized/cuda/cuda_backend.h"
#include "optimized/run_case.h"

namespace {

using paritron::Case;
using paritron::DType;
using paritron::Shape;
using paritron::Tensor;
using paritron::opt::DTensor;
using paritron::opt::cuda::CudaBackend;

constexpr double kH100Bf16PeakFlops = 989e12;  // H100 SXM, dense bf16 tensor cores

// ---------------------------------------------------------------------------
// Device, timing, inputs.

// A failed CUDA / cuBLAS call inside a benchmark: reported through SkipWithError.
struct BenchFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void cuda_ok(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw BenchFailure(fmt::format("{}: {} ({})", what, cudaGetErrorName(status), cudaGetErrorString(status)));
  }
}

void cublas_ok(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw BenchFailure(fmt::format("{}: {} ({})", what, cublasLtGetStatusName(status), cublasLtGetStatusString(status)));
  }
}

// The backend every kernel benchmark shares (one stream, one cuBLASLt
// handle, one memory pool); created on first use, never destroyed (a static
// destructor would run after the CUDA runtime has unloaded).
CudaBackend& shared_backend() {
  static CudaBackend* backend = new CudaBackend();
  return *backend;
}

// Runs body(backend) when a device is usable, reporting anything thrown as
// the benchmark's error; without a device, SkipWithError("no CUDA device: ...").
template <class Body>
void with_device(benchmark::State& state, Body&& body) {
  std::string why;
  if (!paritron::opt::cuda::device_available(&why)) {
    state.SkipWithError(("no CUDA device: " + why).c_str());
    return;
  }
  try {
    body(shared_backend());
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

class EventTimer {
 public:
  explicit EventTimer(cudaStream_t stream) : stream_(stream) {
    cuda_ok(cudaEventCreate(&start_), "cudaEventCreate");
    cuda_ok(cudaEventCreate(&stop_), "cudaEventCreate");
  }
  ~EventTimer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  void start() { cuda_ok(cudaEventRecord(start_, stream_), "cudaEventRecord"); }
  double stop_seconds() {
    cuda_ok(cudaEventRecord(stop_, stream_), "cudaEventRecord");
    cuda_ok(cudaEventSynchronize(stop_), "cudaEventSynchronize");
    float ms = 0.0f;
    cuda_ok(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    return static_cast<double>(ms) * 1e-3;
  }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// The benchmark loop: `batch` calls of op per iteration between two events;
// the iteration's (manual) time is the GPU time of one call. Returns the
// mean seconds per call.
template <class Op>
double run_timed(benchmark::State& state, cudaStream_t stream, int batch, Op&& op) {
  for (int i = 0; i < 2; ++i) op();  // warm-up: workspaces, heuristics, lazy module loading
  cuda_ok(cudaStreamSynchronize(stream), "warm-up");
  EventTimer timer(stream);
  double total = 0.0;
  int64_t calls = 0;
  for (auto _ : state) {
    timer.start();
    for (int i = 0; i < batch; ++i) op();
    const double seconds = timer.stop_seconds() / batch;
    state.SetIterationTime(seconds);
    total += seconds;
    ++calls;
  }
  return calls > 0 ? total / static_cast<double>(calls) : 0.0;
}

// Mean seconds of one call of op over `reps` calls (outside the benchmark
// loop): the reference a row is compared with (bare GEMM, device copy).
template <class Op>
double measure(cudaStream_t stream, int reps, Op&& op) {
  for (int i = 0; i < 2; ++i) op();
  cuda_ok(cudaStreamSynchronize(stream), "warm-up");
  EventTimer timer(stream);
  timer.start();
  for (int i = 0; i < reps; ++i) op();
  return timer.stop_seconds() / reps;
}

void set_flops(benchmark::State& state, double flops) {
  state.counters["flops"] = flops;
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
}

void set_bytes(benchmark::State& state, double bytes) {
  state.counters["bytes"] = bytes;
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Uniform values in [-1, 1) (a fast counter hash: the inputs of a 4096 x
// 14336 GEMM are drawn in well under a second), uploaded as fp32 and cast on
// the device (Backend::copy) to dtype. Random rather than constant data: a
// GEMM of zeros draws less power and clocks higher.
DTensor random_device(CudaBackend& be, DType dtype, const Shape& shape, uint64_t seed, double scale = 1.0) {
  Tensor host(DType::F32, shape);
  auto v = host.data<float>();
  for (size_t i = 0; i < v.size(); ++i) {
    const uint64_t h = paritron::splitmix64(seed * 0x9E3779B97F4A7C15ull + i);
    v[i] = static_cast<float>(scale * (static_cast<double>(h >> 11) * 0x1p-52 - 1.0));
  }
  const DTensor f32 = be.upload(host, DType::F32);
  if (dtype == DType::F32) return f32;
  DTensor out = be.empty(dtype, shape);
  be.copy(f32, out);
  return out;
}

// Random finite E4M3 codes (no NaN encodings), uploaded as they are.
DTensor random_e4m3(CudaBackend& be, const Shape& shape, uint64_t seed) {
  Tensor host(DType::F8_E4M3, shape);
  auto v = host.data<uint8_t>();
  for (size_t i = 0; i < v.size(); ++i) {
    uint8_t b = static_cast<uint8_t>(paritron::splitmix64(seed * 0x9E3779B97F4A7C15ull + i) >> 56);
    if ((b & 0x7F) == 0x7F) b ^= 1;  // 0x7F / 0xFF are NaN in E4M3
    if ((b & 0x78) >= 0x58) b &= 0xC7;  // keep |x| < 2^4: products of magnitude well inside bf16 sums
    v[i] = b;
  }
  return be.upload(host, DType::F8_E4M3);
}

DTensor device_scalar(CudaBackend& be, float value) {
  Tensor t(DType::F32, {1});
  t.data<float>()[0] = value;
  return be.upload(t, DType::F32);
}

std::string dtype_label(DType d) {
  switch (d) {
    case DType::BF16: return "bf16";
    case DType::F16: return "fp16";
    case DType::F32: return "fp32";
    case DType::F8_E4M3: return "fp8_e4m3";
    default: return std::string(paritron::dtype_name(d));
  }
}

// ---------------------------------------------------------------------------
// GEMM: the backend vs a bare cuBLASLt call.
//
// Row-major d[M, N] = a[M, K] @ b[N, K]^T is column-major d^T[N, M] =
// op(A) @ B with A = b viewed as a K x N column-major matrix, transposed
// (lda K), and B = a viewed as K x M (ldb K), not transposed: the TN layout.

cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    case DType::F32: return CUDA_R_32F;
    case DType::F8_E4M3: return CUDA_R_8F_E4M3;
    default: throw BenchFailure(fmt::format("no CUDA data type for {}", paritron::dtype_name(d)));
  }
}

// One prepared cuBLASLt matmul (descriptors, layouts, the heuristic's best
// algorithm, a 32 MiB workspace), launched by run().
class BareGemm {
 public:
  static constexpr size_t kWorkspace = size_t{32} << 20;  // what cuBLAS recommends on Hopper

  BareGemm(cudaStream_t stream, int64_t m, int64_t n, int64_t k, DType in, DType out, const void* a, const void* b,
           void* d, const float* a_scale_inv, const float* b_scale_inv)
      : stream_(stream), a_(a), b_(b), d_(d) {
    cublas_ok(cublasLtCreate(&handle_), "cublasLtCreate");
    cuda_ok(cudaMalloc(&workspace_, kWorkspace), "cudaMalloc workspace");
    cublas_ok(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    const cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
    cublas_ok(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t), "TRANSA");
    cublas_ok(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof nt), "TRANSB");
    if (in == DType::F8_E4M3) {
      // A is our b, B is our a.
      cublas_ok(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &b_scale_inv,
                                               sizeof b_scale_inv),
                "A_SCALE_POINTER");
      cublas_ok(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &a_scale_inv,
                                               sizeof a_scale_inv),
                "B_SCALE_POINTER");
      // Transformer Engine's forward GEMM setting (split accumulation off).
      const int8_t fast = 1;
      cublas_ok(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast),
                "FAST_ACCUM");
    }
    const auto u = [](int64_t x) { return static_cast<uint64_t>(x); };
    cublas_ok(cublasLtMatrixLayoutCreate(&la_, cuda_type(in), u(k), u(n), k), "layout A");
    cublas_ok(cublasLtMatrixLayoutCreate(&lb_, cuda_type(in), u(k), u(m), k), "layout B");
    cublas_ok(cublasLtMatrixLayoutCreate(&ld_, cuda_type(out), u(n), u(m), n), "layout D");
    cublas_ok(cublasLtMatmulPreferenceCreate(&pref_), "cublasLtMatmulPreferenceCreate");
    const uint64_t ws = kWorkspace;
    cublas_ok(cublasLtMatmulPreferenceSetAttribute(pref_, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws),
              "MAX_WORKSPACE_BYTES");
    int found = 0;
    cublas_ok(cublasLtMatmulAlgoGetHeuristic(handle_, desc_, la_, lb_, ld_, ld_, pref_, 1, &heuristic_, &found),
              "cublasLtMatmulAlgoGetHeuristic");
    if (found == 0) throw BenchFailure("cublasLtMatmulAlgoGetHeuristic: no algorithm for this GEMM");
  }
  ~BareGemm() {
    if (pref_) (void)cublasLtMatmulPreferenceDestroy(pref_);
    if (ld_) (void)cublasLtMatrixLayoutDestroy(ld_);
    if (lb_) (void)cublasLtMatrixLayoutDestroy(lb_);
    if (la_) (void)cublasLtMatrixLayoutDestroy(la_);
    if (desc_) (void)cublasLtMatmulDescDestroy(desc_);
    if (workspace_) (void)cudaFree(workspace_);
    if (handle_) (void)cublasLtDestroy(handle_);
  }
  BareGemm(const BareGemm&) = delete;
  BareGemm& operator=(const BareGemm&) = delete;

  void run() {
    const float alpha = 1.0f, beta = 0.0f;
    cublas_ok(cublasLtMatmul(handle_, desc_, &alpha, b_, la_, a_, lb_, &beta, d_, ld_, d_, ld_, &heuristic_.algo,
                             workspace_, kWorkspace, stream_),
              "cublasLtMatmul");
  }

 private:
  cudaStream_t stream_;
  const void* a_;
  const void* b_;
  void* d_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t la_ = nullptr, lb_ = nullptr, ld_ = nullptr;
  cublasLtMatmulPreference_t pref_ = nullptr;
  cublasLtMatmulHeuristicResult_t heuristic_{};
};

struct GemmShape {
  int64_t m, n, k;
  std::string name() const { return fmt::format("m{}_n{}_k{}", m, n, k); }
};

// One GEMM problem on the device: x [M, K], W [N, K], y [M, N] (bf16 for fp8 inputs).
struct GemmProblem {
  DTensor a, b, d, a_scale_inv, b_scale_inv;
  GemmProblem(CudaBackend& be, const GemmShape& s, DType dtype) {
    if (dtype == DType::F8_E4M3) {
      a = random_e4m3(be, {s.m, s.k}, 1);
      b = random_e4m3(be, {s.n, s.k}, 2);
      d = be.empty(DType::BF16, {s.m, s.n});
      a_scale_inv = device_scalar(be, 0.5f);
      b_scale_inv = device_scalar(be, 0.25f);
    } else {
      a = random_device(be, dtype, {s.m, s.k}, 1);
      b = random_device(be, dtype, {s.n, s.k}, 2);
      d = be.empty(dtype, {s.m, s.n});
    }
  }
  DType out_dtype() const { return d.dtype(); }
  std::unique_ptr<BareGemm> bare(CudaBackend& be, const GemmShape& s) {
    const float* as = a_scale_inv.defined() ? static_cast<const float*>(a_scale_inv.data()) : nullptr;
    const float* bs = b_scale_inv.defined() ? static_cast<const float*>(b_scale_inv.data()) : nullptr;
    return std::make_unique<BareGemm>(be.stream(), s.m, s.n, s.k, a.dtype(), d.dtype(), a.data(), b.data(), d.data(),
                                      as, bs);
  }
};

// The backend's call for the problem: gemm, or gemm_lt with the fp8 scales.
void backend_gemm(CudaBackend& be, GemmProblem& p) {
  if (p.a.dtype() == DType::F8_E4M3) {
    paritron::opt::cuda::GemmLtArgs args;
    args.a = &p.a;
    args.b = &p.b;
    args.trans_b = true;
    args.d = &p.d;
    args.a_scale_inv = &p.a_scale_inv;
    args.b_scale_inv = &p.b_scale_inv;
    be.gemm_lt(args);
  } else {
    be.gemm(p.a, false, p.b, true, p.d);
  }
}

void bm_gemm(benchmark::State& state, GemmShape s, DType dtype, bool bare) {
  with_device(state, [&](CudaBackend& be) {
    GemmProblem p(be, s, dtype);
    const double flops = 2.0 * static_cast<double>(s.m) * static_cast<double>(s.n) * static_cast<double>(s.k);
    if (bare) {
      std::unique_ptr<BareGemm> g = p.bare(be, s);
      run_timed(state, be.stream(), 3, [&] { g->run(); });
    } else {
      const double mine = run_timed(state, be.stream(), 3, [&] { backend_gemm(be, p); });
      std::unique_ptr<BareGemm> g = p.bare(be, s);
      const double theirs = measure(be.stream(), 10, [&] { g->run(); });
      state.counters["vs_bare"] = mine > 0 ? theirs / mine : 0.0;
      state.counters["bare_TFLOP/s"] = theirs > 0 ? flops / theirs * 1e-12 : 0.0;
    }
    set_flops(state, flops);
  });
}

// ---------------------------------------------------------------------------
// Attention.

struct AttnShape {
  int64_t b, heads, groups, s, hd;
  std::string name() const { return fmt::format("b{}_a{}_g{}_s{}_d{}_causal", b, heads, groups, s, hd); }
  // FlashAttention's count: two GEMMs of 2 s^2 hd per head, half the square under the causal mask.
  double forward_flops() const {
    return 4.0 * static_cast<double>(b * heads) * static_cast<double>(s) * static_cast<double>(s) *
           static_cast<double>(hd) / 2.0;
  }
};

void bm_attention(benchmark::State& state, AttnShape sh, bool backward) {
  with_device(state, [&](CudaBackend& be) {
    paritron::opt::AttentionArgs a;
    a.batch = sh.b, a.sq = sh.s, a.sk = sh.s, a.heads = sh.heads, a.groups = sh.groups, a.head_dim = sh.hd;
    a.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sh.hd)));
    a.causal = true;
    a.probs_dtype = DType::BF16;
    const DTensor q = random_device(be, DType::BF16, {sh.s, sh.b, sh.heads, sh.hd}, 11, 2.0);
    const DTensor k = random_device(be, DType::BF16, {sh.s, sh.b, sh.groups, sh.hd}, 12, 2.0);
    const DTensor v = random_device(be, DType::BF16, {sh.s, sh.b, sh.groups, sh.hd}, 13);
    DTensor out = be.empty(DType::BF16, {sh.s, sh.b, sh.heads, sh.hd});
    DTensor lse = be.empty(DType::F32, {sh.b, sh.heads, sh.s});
    if (!backward) {
      run_timed(state, be.stream(), 1, [&] { be.attention_forward(a, q, k, v, out, lse); });
      set_flops(state, sh.forward_flops());
      return;
    }
    be.attention_forward(a, q, k, v, out, lse);
    const DTensor dout = random_device(be, DType::BF16, {sh.s, sh.b, sh.heads, sh.hd}, 14);
    DTensor dq = be.empty(DType::BF16, q.shape()), dk = be.empty(DType::BF16, k.shape()),
            dv = be.empty(DType::BF16, v.shape());
    run_timed(state, be.stream(), 1, [&] { be.attention_backward(a, q, k, v, out, lse, dout, dq, dk, dv); });
    set_flops(state, 2.5 * sh.forward_flops());
  });
}

// ---------------------------------------------------------------------------
// Memory-bound fused kernels vs a device copy of the same bytes.

constexpr int64_t kRows = 8192, kHidden = 4096;  // 64 MiB per bf16 tensor: beyond the 50 MiB L2
constexpr int kBatch = 10;                       // calls between the events

// GB/s of Backend::copy of `bytes` (read + write of bytes / 2 each).
double copy_seconds(CudaBackend& be, int64_t elements) {
  const DTensor src = random_device(be, DType::BF16, {elements}, 21);
  DTensor dst = be.empty(DType::BF16, {elements});
  return measure(be.stream(), kBatch, [&] { be.copy(src, dst); });
}

// Runs the kernel's loop, sets bytes, and vs_copy against a copy moving the same number of bytes.
template <class Op>
void memory_bound(benchmark::State& state, CudaBackend& be, double bytes, Op&& op) {
  const double mine = run_timed(state, be.stream(), kBatch, op);
  const int64_t copy_elements = static_cast<int64_t>(bytes / 4.0);  // bf16: 2 bytes read + 2 written each
  const double copy = copy_seconds(be, copy_elements);
  state.counters["vs_copy"] = mine > 0 ? copy / mine : 0.0;
  set_bytes(state, bytes);
}

void bm_device_copy(benchmark::State& state, int64_t rows) {
  with_device(state, [&](CudaBackend& be) {
    const DTensor src = random_device(be, DType::BF16, {rows, kHidden}, 22);
    DTensor dst = be.empty(DType::BF16, {rows, kHidden});
    run_timed(state, be.stream(), kBatch, [&] { be.copy(src, dst); });
    set_bytes(state, 2.0 * static_cast<double>(src.nbytes()));
  });
}

void bm_norm(benchmark::State& state, bool rms, bool backward) {
  with_device(state, [&](CudaBackend& be) {
    paritron::opt::NormArgs args;
    args.rms = rms;
    args.te_kernel = rms;
    const DTensor x = random_device(be, DType::BF16, {kRows, kHidden}, 31);
    const DTensor gamma = random_device(be, DType::BF16, {kHidden}, 32), beta = random_device(be, DType::BF16, {kHidden}, 33);
    DTensor y = be.empty(DType::BF16, {kRows, kHidden});
    DTensor mean = be.empty(DType::F32, {kRows}), rstd = be.empty(DType::F32, {kRows});
    const double act = static_cast<double>(kRows * kHidden) * 2.0, stats = static_cast<double>(kRows) * 4.0;
    const double params = static_cast<double>(kHidden) * 2.0 * (rms ? 1 : 2);
    if (!backward) {
      // read x, write y, write the statistics.
      memory_bound(state, be, 2.0 * act + (rms ? 1 : 2) * stats + params,
                   [&] { be.norm_forward(args, x, gamma, rms ? nullptr : &beta, y, mean, rstd); });
      return;
    }
    be.norm_forward(args, x, gamma, rms ? nullptr : &beta, y, mean, rstd);
    const DTensor dy = random_device(be, DType::BF16, {kRows, kHidden}, 34);
    DTensor dx = be.empty(DType::BF16, {kRows, kHidden});
    DTensor dgamma = be.zeros(DType::F32, {kHidden}), dbeta = be.zeros(DType::F32, {kHidden});
    // read x and dy, write dx, read the statistics; the fp32 main grads are read and written once.
    memory_bound(state, be, 3.0 * act + (rms ? 1 : 2) * stats + params + 2.0 * 4.0 * kHidden * (rms ? 1 : 2),
                 [&] { be.norm_backward(args, x, gamma, mean, rstd, dy, dx, dgamma, rms ? nullptr : &dbeta); });
  });
}

void bm_rope(benchmark::State& state) {
  with_device(state, [&](CudaBackend& be) {
    const int64_t heads = 32, hd = 128;  // [s, b = 1, 32, 128]: kHidden channels per token
    const DTensor x = random_device(be, DType::BF16, {kRows, 1, heads, hd}, 41);
    const DTensor freqs = random_device(be, DType::F32, {kRows, hd}, 42, 100.0);
    DTensor y = be.empty(DType::BF16, {kRows, 1, heads, hd});
    const paritron::opt::RopeArgs args{1, heads, hd, hd, false};
    const double bytes = 2.0 * static_cast<double>(x.nbytes()) + static_cast<double>(freqs.nbytes());
    memory_bound(state, be, bytes, [&] { be.rope(args, x, freqs, y, false); });
  });
}

void bm_bias_dropout_add(benchmark::State& state) {
  with_device(state, [&](CudaBackend& be) {
    paritron::opt::DropoutArgs args;
    args.p = 0.1;
    args.key = paritron::rng_key(1, "dropout.cuda_bench");
    const DTensor x = random_device(be, DType::BF16, {kRows, kHidden}, 51);
    const DTensor bias = random_device(be, DType::BF16, {kHidden}, 52);
    const DTensor residual = random_device(be, DType::BF16, {kRows, kHidden}, 53);
    DTensor out = be.empty(DType::BF16, {kRows, kHidden});
    // read x and the residual, write out.
    const double bytes = 3.0 * static_cast<double>(x.nbytes()) + static_cast<double>(bias.nbytes());
    memory_bound(state, be, bytes, [&] { be.bias_dropout_add(args, x, &bias, &residual, out); });
  });
}

void bm_gather_rows(benchmark::State& state) {
  with_device(state, [&](CudaBackend& be) {
    // The MoE permute of top-2 routing: every token twice, in expert order.
    std::vector<int64_t> rows(static_cast<size_t>(2 * kRows));
    for (size_t i = 0; i < rows.size(); ++i) {
      rows[i] = static_cast<int64_t>(paritron::splitmix64(i) % static_cast<uint64_t>(kRows));
    }
    const DTensor x = random_device(be, DType::BF16, {kRows, kHidden}, 61);
    DTensor out = be.empty(DType::BF16, {2 * kRows, kHidden});
    // read the gathered rows, write out (the index upload is part of the call, not counted).
    const double bytes = 2.0 * static_cast<double>(out.nbytes());
    memory_bound(state, be, bytes, [&] { be.gather_rows(x, rows, out); });
  });
}

// ---------------------------------------------------------------------------
// A transformer layer, forward + backward, through SingleRankModel.

struct LayerShape {
  int64_t hidden, heads, groups, ffn, seq;
  std::string name() const { return fmt::format("h{}_a{}_g{}_f{}_s{}_b1", hidden, heads, groups, ffn, seq); }
};

// Model FLOPs of one layer's forward, counted explicitly (matmuls only, 2
// FLOPs per multiply-add; norms, RoPE, SwiGLU and residuals not counted):
//   QKV 2 s h (h + 2 g d) + output projection 2 s h^2
//   + fc1 2 s h (2 f) (SwiGLU: two halves) + fc2 2 s f h
//   + core attention 4 s^2 h / 2 (QK^T and PV, causal: half the square,
//     as FlashAttention counts it).
// Forward + backward is 3x the forward (no recomputation counted).
double layer_forward_flops(const LayerShape& l) {
  const double s = static_cast<double>(l.seq), h = static_cast<double>(l.hidden), f = static_cast<double>(l.ffn);
  const double kv = static_cast<double>(l.groups) * (h / static_cast<double>(l.heads));
  return 2.0 * s * h * (h + 2.0 * kv) + 2.0 * s * h * h + 2.0 * s * h * (2.0 * f) + 2.0 * s * f * h +
         4.0 * s * s * h / 2.0;
}

// Llama-style layer case: GPT layer with RMSNorm, GQA, SwiGLU, RoPE, no
// biases, no dropout, Megatron's init from the counter-based RNG; inputs as
// bench/layer_case.h draws them.
Case llama_layer_case(const LayerShape& l) {
  Case c;
  c.component = "transformer_layer";
  c.config = paritron::config_from_json_text(
                 fmt::format(R"({{"num_layers": 1, "hidden_size": {}, "num_attention_heads": {},
                     "num_query_groups": {}, "ffn_hidden_size": {}, "normalization": "RMSNorm",
                     "add_bias_linear": false, "gated_linear_unit": true, "activation_func": "silu",
                     "bias_activation_fusion": true, "hidden_dropout": 0.0, "attention_dropout": 0.0}})",
                             l.hidden, l.heads, l.groups, l.ffn))
                 .config;
  c.config_json = paritron::config_to_json_text(c.config);
  for (auto& [key, t] : paritron::init_parameters("transformer_layer", c.config, 1, DType::BF16)) {
    c.tensors["weights." + key] = std::move(t);
  }
  for (const char* name : {"hidden_states", "grad_output"}) {
    Tensor t(DType::BF16, {l.seq, 1, l.hidden});
    paritron::fill_uniform(t, paritron::rng_key(1, std::string("inputs.") + name), 0, -1.0, 1.0);
    c.tensors[std::string("inputs.") + name] = std::move(t);
  }
  // RotaryEmbedding's angles (float32): position * base^(-2j / d), cat((f, f)).
  const int64_t d = l.hidden / l.heads;
  Tensor freqs(DType::F32, {l.seq, 1, 1, d});
  auto fv = freqs.data<float>();
  for (int64_t i = 0; i < l.seq; ++i) {
    for (int64_t j = 0; j < d / 2; ++j) {
      const float inv = static_cast<float>(1.0 / std::pow(10000.0, static_cast<double>(2 * j) / static_cast<double>(d)));
      const float angle = static_cast<float>(i) * inv;
      fv[static_cast<size_t>(i * d + j)] = angle;
      fv[static_cast<size_t>(i * d + d / 2 + j)] = angle;
    }
  }
  c.tensors["inputs.rotary_pos_emb"] = std::move(freqs);
  return c;
}

// The model, built once per process (drawing 220M parameters takes seconds);
// never destroyed (see shared_backend). Its backend's stream is
// current_stream() right after construction.
struct LayerModel {
  std::unique_ptr<paritron::opt::SingleRankModel> model;
  cudaStream_t stream = nullptr;
};

LayerModel& layer_model(const LayerShape& l) {
  static LayerModel* m = [&] {
    auto* lm = new LayerModel;
    lm->model = std::make_unique<paritron::opt::SingleRankModel>(
        llama_layer_case(l), paritron::opt::OptimizedOptions{.dtype = DType::BF16, .backend = "cuda"});
    lm->stream = paritron::opt::cuda::current_stream();
    return lm;
  }();
  return *m;
}

void bm_layer(benchmark::State& state, LayerShape l, bool backward) {
  with_device(state, [&](CudaBackend&) {
    LayerModel& m = layer_model(l);
    if (m.stream == nullptr) throw BenchFailure("the layer's backend registered no CUDA stream");
    run_timed(state, m.stream, 1, [&] {
      if (backward) {
        m.model->forward_backward();
      } else {
        m.model->forward();
      }
    });
    const double flops = (backward ? 3.0 : 1.0) * layer_forward_flops(l);
    set_flops(state, flops);
    state.counters["MFU"] = benchmark::Counter(flops / kH100Bf16PeakFlops, benchmark::Counter::kIsIterationInvariantRate);
  });
}

// ---------------------------------------------------------------------------
// Registration: <component>/<impl>/<shape>/<dtype> (bench/README.md).

const bool kRegistered = [] {
  for (const GemmShape s : {GemmShape{4096, 4096, 4096}, GemmShape{4096, 14336, 4096}}) {
    for (const DType d : {DType::BF16, DType::F16, DType::F32, DType::F8_E4M3}) {
      for (const bool bare : {true, false}) {
        const std::string name = fmt::format("gemm/{}/{}/{}", bare ? "bare_gemm" : "cuda", s.name(), dtype_label(d));
        benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { bm_gemm(st, s, d, bare); })
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  for (const int64_t seq : {int64_t{4096}, int64_t{8192}}) {
    for (const int64_t b : {int64_t{1}, int64_t{2}}) {
      const AttnShape sh{b, 32, 8, seq, 128};
      for (const bool backward : {false, true}) {
        const std::string name =
            fmt::format("attention_{}/cuda/{}/bf16", backward ? "bwd" : "fwd", sh.name());
        benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { bm_attention(st, sh, backward); })
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  const std::string mem = fmt::format("n{}_h{}", kRows, kHidden);
  auto reg_mem = [&](const std::string& component, auto fn) {
    benchmark::RegisterBenchmark(fmt::format("{}/cuda/{}/bf16", component, mem).c_str(), fn)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  };
  reg_mem("device_copy", [](benchmark::State& st) { bm_device_copy(st, kRows); });
  reg_mem("layernorm_fwd", [](benchmark::State& st) { bm_norm(st, false, false); });
  reg_mem("layernorm_bwd", [](benchmark::State& st) { bm_norm(st, false, true); });
  reg_mem("rmsnorm_fwd", [](benchmark::State& st) { bm_norm(st, true, false); });
  reg_mem("rmsnorm_bwd", [](benchmark::State& st) { bm_norm(st, true, true); });
  reg_mem("rope_fwd", [](benchmark::State& st) { bm_rope(st); });
  reg_mem("bias_dropout_add_fwd", [](benchmark::State& st) { bm_bias_dropout_add(st); });
  reg_mem("gather_rows", [](benchmark::State& st) { bm_gather_rows(st); });
  benchmark::RegisterBenchmark(fmt::format("device_copy/cuda/n{}_h{}/bf16", 2 * kRows, kHidden).c_str(),
                               [](benchmark::State& st) { bm_device_copy(st, 2 * kRows); })
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  const LayerShape layer{4096, 32, 8, 14336, 4096};
  for (const bool backward : {false, true}) {
    const std::string name =
        fmt::format("transformer_layer_{}/cuda/{}/bf16", backward ? "fwd_bwd" : "fwd", layer.name());
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { bm_layer(st, layer, backward); })
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(20);
  }
  return true;
}();

}  // namespace
