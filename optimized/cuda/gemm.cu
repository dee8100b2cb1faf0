// The GEMMs of the CUDA backend (cuda_backend.h): gemm and bias_grad of the
// Backend interface, gemm_lt (cuBLASLt epilogues and fp8 scaling) and
// grouped_gemm (the MoE experts' GEMMs in one cuBLAS call).
//
// Where they sit in Megatron (megatron/core/tensor_parallel/layers.py,
// ColumnParallelLinear / RowParallelLinear through
// LinearWithGradAccumulationAndAsyncCommunication):
//   forward   output = input @ weight^T (+ bias)   gemm(x, false, w, true, y, 1, 0, bias)
//   dgrad     grad_input = grad_output @ weight     gemm(dy, false, w, false, dx)
//   wgrad     grad_weight = grad_output^T @ input   gemm(dy, true, x, false, dw)
//             with gradient_accumulation_fusion the wgrad accumulates into the
//             fp32 main_grad (fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32):
//             bf16/fp16 a and b, F32 c, beta = 1 — cuBLASLt's A/B 16-bit, C/D
//             fp32 matmul does exactly that in one call.
//   bias      grad_bias = grad_output.sum(dim=0)     bias_grad(dy, db, accumulate)
// Transformer Engine's fp8 GEMM (transformer_engine/common/gemm/cublaslt_gemm.cu,
// cublas_gemm) is the model of gemm_lt: the same epilogues (BIAS, GELU_AUX_BIAS,
// DGELU, BGRADB), per-tensor scale_inv pointers for the fp8 operands, D scale
// and amax for an fp8 output, and Hopper's "TN only" fp8 layout.
//
// Row-major <-> column-major. Tensors here are row-major; cuBLAS(Lt) is
// column-major. A row-major X [r, c] is, read column-major, X^T [c, r] with
// leading dimension c. So the row-major d[M, N] = op(a) op(b) is computed as
// the column-major d^T[N, M] = op(b)^T op(a)^T: cuBLAS's A is our b (transa =
// trans_b), cuBLAS's B is our a (transb = trans_a), m = N, n = M, k = K. Every
// cuBLAS-side name below (A, B, transa, "rows of D") is column-major; every
// argument name (a, b, M, N) is row-major.
//
// Numerics (backend.h: compute in fp32, double for F64, round once):
//   * fp32 / bf16 / fp16 operands: CUBLAS_COMPUTE_32F, scale type fp32. Never
//     CUBLAS_COMPUTE_32F_FAST_TF32 / FAST_16BF: fp32 operands are multiplied
//     as fp32 (no TF32 rounding of the inputs).
//   * F64: CUBLAS_COMPUTE_64F, scale type fp64.
//   * Split-K partial sums are never stored in a 16-bit / fp8 output type:
//     the heuristic is restricted to the COMPUTE_TYPE reduction scheme for such
//     outputs (CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK), and the cuBLAS
//     handle of grouped_gemm gets CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION.
//   * fp8: CUBLASLT_MATMUL_DESC_FAST_ACCUM = 0 (TE's use_split_accumulator =
//     true: partial sums promoted to fp32 periodically).
//
// Descriptors and heuristic results are cached per thread (a small map keyed
// by device, handle, shape, dtypes, transposes, epilogue and pointer
// alignments), so the hot path is a few cublasLtMatmulDescSetAttribute calls
// for the per-call pointers and the cublasLtMatmul itself.
//
// Everything is enqueued on the backend's stream; nothing synchronises.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/error.h"
#include "optimized/cuda/cuda_backend.h"
#include "optimized/cuda/cuda_check.h"
#include "optimized/cuda/device.cuh"
#include "optimized/cuda/op_checks.h"

namespace paritron::opt::cuda {

namespace {

// ---------------------------------------------------------------------------
// Messages (text, fail, context and the shared checks: op_checks.h).

const char* tr(bool t) { return t ? "^T" : ""; }

// ---------------------------------------------------------------------------
// Checks.

bool is_fp8(DType d) { return d == DType::F8_E4M3 || d == DType::F8_E5M2; }
// The dtypes cuBLASLt takes as matrices here.
bool is_lt_type(DType d) { return is_compute_float(d) || is_fp8(d); }

// A matrix cuBLASLt reads (gemm_lt, grouped_gemm): also fp8.
void check_lt_input(std::string_view op, std::string_view name, const DTensor& t) {
  if (!t.defined()) fail(op, text("{} is not allocated", name));
  if (!is_lt_type(t.storage_dtype())) {
    fail(op, text("{} is {}: cuBLASLt takes f64, f32, bf16, f16, F8_E4M3 or F8_E5M2 matrices", name, t.describe()));
  }
}

// A matrix cuBLASLt writes: its storage is written as is, so the value dtype
// must be the storage dtype (no relabelled tensors, DTensor::as_dtype).
void check_lt_output(std::string_view op, std::string_view name, const DTensor& t) {
  check_lt_input(op, name, t);
  if (t.dtype() != t.storage_dtype()) {
    fail(op, text("{} is {}: a cuBLASLt output is written in its storage dtype, so its value dtype must be the "
                  "same (not a relabelled tensor)",
                  name, t.describe()));
  }
}

// An fp8 scale: a device fp32 scalar.
void check_scale(std::string_view op, std::string_view name, const DTensor* t) {
  if (t == nullptr) return;
  if (!t->defined()) fail(op, text("{} is not allocated", name));
  if (t->storage_dtype() != DType::F32 || t->numel() != 1) {
    fail(op, text("{} is {}: an fp8 scale is a device fp32 scalar (F32 [1])", name, t->describe()));
  }
}

// ---------------------------------------------------------------------------
// cuBLAS types.

cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::F64: return CUDA_R_64F;
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    case DType::F8_E4M3: return CUDA_R_8F_E4M3;
    case DType::F8_E5M2: return CUDA_R_8F_E5M2;
    default: return CUDA_R_32F;  // unreachable: every caller checked the dtype first
  }
}

const char* epilogue_name(cublasLtEpilogue_t e) {
  switch (e) {
    case CUBLASLT_EPILOGUE_DEFAULT: return "DEFAULT";
    case CUBLASLT_EPILOGUE_BIAS: return "BIAS";
    case CUBLASLT_EPILOGUE_GELU: return "GELU";
    case CUBLASLT_EPILOGUE_GELU_BIAS: return "GELU_BIAS";
    case CUBLASLT_EPILOGUE_GELU_AUX_BIAS: return "GELU_AUX_BIAS";
    case CUBLASLT_EPILOGUE_DGELU: return "DGELU";
    case CUBLASLT_EPILOGUE_BGRADB: return "BGRADB";
    default: return "other";
  }
}

const char* epilogue_name(Epilogue e) {
  switch (e) {
    case Epilogue::kNone: return "kNone";
    case Epilogue::kBias: return "kBias";
    case Epilogue::kGelu: return "kGelu";
    case Epilogue::kBiasGelu: return "kBiasGelu";
    case Epilogue::kBiasGeluAux: return "kBiasGeluAux";
    case Epilogue::kDGelu: return "kDGelu";
    case Epilogue::kBGradB: return "kBGradB";
    default: return "?";
  }
}

// The largest power of two <= 256 dividing the address (256 for null): the
// heuristic's MIN_ALIGNMENT preferences. Tensors are views (slice0 offsets),
// so an operand need not sit on the allocation's 256-byte boundary.
uint32_t alignment_of(const void* p) {
  if (p == nullptr) return 256;
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && address % a != 0) a >>= 1;
  return a;
}

// cuBLASLt workspace: 32 MiB, the size cuBLAS recommends for Hopper
// (cublasSetWorkspace; Ampere needs 4 MiB). Taken from the backend's
// workspace(), whose allocation is 256-byte aligned (cudaMallocAsync).
constexpr size_t kLtWorkspaceBytes = size_t{32} << 20;
constexpr size_t kScratchAlign = 256;

// ---------------------------------------------------------------------------
// One cuBLASLt matmul, in row-major terms: d[m, n] = alpha op(a) op(b) + beta c
// with the epilogue. Pointers are device pointers; dtypes are storage dtypes.

struct LtCall {
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  DType a_t = DType::F32;
  bool ta = false;
  const void* b = nullptr;
  DType b_t = DType::F32;
  bool tb = false;
  const void* c = nullptr;  // may be d; null only with beta = 0 (fp8 outputs)
  DType c_t = DType::F32;
  void* d = nullptr;
  DType d_t = DType::F32;
  double alpha = 1.0, beta = 0.0;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // BIAS* input [n], or BGRADB output [m]
  DType bias_t = DType::F32;
  bool set_bias_type = false;  // CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE (fp8, or a bias of another dtype than d)
  void* aux = nullptr;         // GELU_AUX_BIAS output / DGELU input, [m, n] like d
  DType aux_t = DType::F32;
  const void* a_scale = nullptr;  // scale_inv of a (row-major a = cuBLAS B)
  const void* b_scale = nullptr;  // scale_inv of b (row-major b = cuBLAS A)
  const void* d_scale = nullptr;
  void* d_amax = nullptr;
};

// "row-major d[M, N] = op(a) op(b): a BF16^T, b BF16, c BF16, d BF16; cuBLASLt
// transa N transb T, compute 32F, epilogue BIAS, bias BF16": the combination
// a failure names.
std::string describe(const LtCall& c) {
  std::string s = text("row-major d[{}, {}] = op(a) op(b) over K = {}: a {}{}, b {}{}, c {}, d {}; cuBLASLt "
                       "(column-major, A = b, B = a) transa {} transb {}, compute {}, epilogue {}",
                       c.m, c.n, c.k, dtype_name(c.a_t), tr(c.ta), dtype_name(c.b_t), tr(c.tb), dtype_name(c.c_t),
                       dtype_name(c.d_t), c.tb ? "T" : "N", c.ta ? "T" : "N",
                       c.a_t == DType::F64 ? "64F" : "32F", epilogue_name(c.epilogue));
  if (c.bias != nullptr) {
    s += text(", bias{} {}", c.epilogue == CUBLASLT_EPILOGUE_BGRADB ? " grad" : "", dtype_name(c.bias_t));
  }
  if (c.aux != nullptr) s += text(", aux {}", dtype_name(c.aux_t));
  if (c.a_scale != nullptr) s += ", a scale_inv";
  if (c.b_scale != nullptr) s += ", b scale_inv";
  if (c.d_scale != nullptr) s += ", d scale";
  if (c.d_amax != nullptr) s += ", d amax";
  return s;
}

// A cached cuBLASLt configuration: descriptors and the chosen algorithm.
struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;  // cuBLAS's A, B, C, D
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;

  LtPlan() = default;
  LtPlan(const LtPlan&) = delete;
  LtPlan& operator=(const LtPlan&) = delete;
  ~LtPlan() {
    // Host-side frees; a destructor cannot throw, and these cannot fail on a
    // valid descriptor.
    if (d) (void)cublasLtMatrixLayoutDestroy(d);
    if (c) (void)cublasLtMatrixLayoutDestroy(c);
    if (b) (void)cublasLtMatrixLayoutDestroy(b);
    if (a) (void)cublasLtMatrixLayoutDestroy(a);
    if (desc) (void)cublasLtMatmulDescDestroy(desc);
  }
};

struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const { (void)cublasLtMatmulPreferenceDestroy(p); }
};

// Everything the descriptors and the heuristic's choice depend on.
using LtKey = std::array<int64_t, 27>;
struct LtKeyHash {
  size_t operator()(const LtKey& k) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the words
    for (int64_t v : k) {
      h ^= static_cast<uint64_t>(v);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

LtKey key_of(int device, const void* handle, const LtCall& c) {
  return LtKey{device,
               static_cast<int64_t>(reinterpret_cast<uintptr_t>(handle)),
               c.m,
               c.n,
               c.k,
               c.ta,
               c.tb,
               static_cast<int64_t>(c.a_t),
               static_cast<int64_t>(c.b_t),
               static_cast<int64_t>(c.c_t),
               static_cast<int64_t>(c.d_t),
               static_cast<int64_t>(c.epilogue),
               c.bias != nullptr ? static_cast<int64_t>(c.bias_t) : -1,
               c.set_bias_type,
               c.aux != nullptr ? static_cast<int64_t>(c.aux_t) : -1,
               c.a_scale != nullptr,
               c.b_scale != nullptr,
               c.d_scale != nullptr,
               c.d_amax != nullptr,
               alignment_of(c.a),
               alignment_of(c.b),
               alignment_of(c.c),
               alignment_of(c.d),
               alignment_of(c.bias),
               alignment_of(c.aux),
               c.c == nullptr,
               c.c == c.d};
}

// The per-thread cache. Keyed by handle and device as well, so two backends
// on one thread keep separate entries; an entry of a destroyed handle is only
// memory (descriptors are not tied to a handle). Bounded: cleared when full.
constexpr size_t kMaxPlans = 4096;
thread_local std::unordered_map<LtKey, std::unique_ptr<LtPlan>, LtKeyHash> t_plans;

template <class V>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value, const std::string& ctx) {
  PARITRON_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)), ctx);
}

template <class V>
void set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const V& value,
              const std::string& ctx) {
  PARITRON_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)), ctx);
}

// The per-call pointers of the descriptor (the heuristic only looks at their
// alignment, which is part of the key).
void set_pointers(cublasLtMatmulDesc_t desc, const LtCall& c, const std::string& ctx) {
  if (c.bias != nullptr) set_desc(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, c.bias, ctx);
  if (c.aux != nullptr) set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, c.aux, ctx);
  // Row-major a is cuBLAS's B and b is cuBLAS's A: the scales swap with them.
  if (c.b_scale != nullptr) set_desc(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, c.b_scale, ctx);
  if (c.a_scale != nullptr) set_desc(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, c.a_scale, ctx);
  if (c.d_scale != nullptr) set_desc(desc, CUBLASLT_MATMUL_DESC_D_SCALE_POINTER, c.d_scale, ctx);
  if (c.d_amax != nullptr) set_desc(desc, CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, c.d_amax, ctx);
}

// Descriptors, layouts and the heuristic's algorithm for a new configuration.
std::unique_ptr<LtPlan> make_plan(cublasLtHandle_t handle, const LtCall& c, const std::string& ctx) {
  auto plan = std::make_unique<LtPlan>();
  const bool f64 = c.a_t == DType::F64;
  const bool fp8 = is_fp8(c.a_t) || is_fp8(c.b_t);
  const cublasComputeType_t compute = f64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  const cudaDataType_t scale_type = f64 ? CUDA_R_64F : CUDA_R_32F;
  PARITRON_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, compute, scale_type), ctx);

  // The swap: cuBLAS A = row-major b, cuBLAS B = row-major a.
  const int32_t transa = c.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t transb = c.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, transa, ctx);
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, transb, ctx);
  const uint32_t epilogue = c.epilogue;
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue, ctx);
  if (fp8) {
    // No fast accumulation: TE's use_split_accumulator = true (fp32 promotion
    // of the tensor cores' partial sums), the exact-fp32-accumulation choice.
    const int8_t fast_accum = 0;
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, fast_accum, ctx);
  }
  if (c.bias != nullptr && c.set_bias_type) {
    const int32_t bias_type = cuda_type(c.bias_t);
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, bias_type, ctx);
  }
  if (c.aux != nullptr) {
    // The aux matrix is laid out like D: column-major [N, M], ld N (a
    // multiple of 8, checked by the caller). Its type set explicitly as TE does.
    const int64_t aux_ld = c.n;
    const int32_t aux_type = cuda_type(c.aux_t);
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, aux_ld, ctx);
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, aux_type, ctx);
  }
  set_pointers(plan->desc, c, ctx);

  // Stored (pre-op) column-major matrices: row-major b [rb, cb] is the
  // column-major [cb, rb] with ld cb; likewise a. D (and C) is [N, M], ld N.
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  const int64_t a_rows = c.tb ? c.k : c.n, a_cols = c.tb ? c.n : c.k;  // cuBLAS A = b
  const int64_t b_rows = c.ta ? c.m : c.k, b_cols = c.ta ? c.k : c.m;  // cuBLAS B = a
  PARITRON_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, cuda_type(c.b_t), u(a_rows), u(a_cols), a_rows), ctx);
  PARITRON_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, cuda_type(c.a_t), u(b_rows), u(b_cols), b_rows), ctx);
  PARITRON_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, cuda_type(c.c_t), u(c.n), u(c.m), c.n), ctx);
  PARITRON_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->d, cuda_type(c.d_t), u(c.n), u(c.m), c.n), ctx);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  PARITRON_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref), ctx);
  const std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDeleter> pref(raw_pref);
  const uint64_t max_workspace = kLtWorkspaceBytes;
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, max_workspace, ctx);
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(c.b), ctx);
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(c.a), ctx);
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(c.c), ctx);
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(c.d), ctx);
  // Split-K: with a 16-bit or fp8 output, INPLACE and OUTPUT_TYPE reductions
  // would round partial sums to the output type (more than one rounding);
  // only the fp32 (compute type) reduction, or none, is allowed then.
  const bool narrow_out = c.d_t != DType::F32 && c.d_t != DType::F64;
  const uint32_t reduction = narrow_out ? static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE)
                                        : static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_MASK);
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reduction, ctx);

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->c,
                                                               plan->d, pref.get(), 1, &result, &found);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || (status == CUBLAS_STATUS_SUCCESS && found == 0)) {
    throw BackendError(text("{}: cuBLASLt has no algorithm for this combination ({}) on this device; "
                            "cublasLtMatmulAlgoGetHeuristic returned {}",
                            ctx, describe(c), status == CUBLAS_STATUS_SUCCESS ? "no result" : "NOT_SUPPORTED"));
  }
  // Any other failure (INVALID_VALUE for a rejected attribute combination)
  // names the configuration too; built only here, once per configuration.
  if (status != CUBLAS_STATUS_SUCCESS) PARITRON_CUBLAS_CHECK(status, text("{} [{}]", ctx, describe(c)));
  plan->algo = result.algo;
  plan->workspace = result.workspaceSize;
  return plan;
}

// Runs one matmul on the backend's stream. ws: kLtWorkspaceBytes of device
// memory (from be.workspace()).
void run_lt(CudaBackend& be, const LtCall& c, void* ws, const std::string& ctx) {
  const auto handle = static_cast<cublasLtHandle_t>(be.cublaslt_handle());
  const LtKey key = key_of(be.device(), handle, c);
  auto it = t_plans.find(key);
  if (it == t_plans.end()) {
    std::unique_ptr<LtPlan> plan = make_plan(handle, c, ctx);
    if (t_plans.size() >= kMaxPlans) t_plans.clear();
    it = t_plans.emplace(key, std::move(plan)).first;
  } else {
    set_pointers(it->second->desc, c, ctx);
  }
  const LtPlan& plan = *it->second;
  const float alpha_f = static_cast<float>(c.alpha), beta_f = static_cast<float>(c.beta);
  const double alpha_d = c.alpha, beta_d = c.beta;
  const bool f64 = c.a_t == DType::F64;
  const void* alpha = f64 ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f);
  const void* beta = f64 ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f);
  const auto s = static_cast<cudaStream_t>(be.stream());
  // cuBLAS's A is our b, its B our a (the swap).
  PARITRON_CUBLAS_CHECK(cublasLtMatmul(handle, plan.desc, alpha, c.b, plan.a, c.a, plan.b, beta, c.c, plan.c, c.d,
                                       plan.d, &plan.algo, ws, kLtWorkspaceBytes, s),
                        ctx);
}

// ---------------------------------------------------------------------------
// Kernels.

// out[r, j] = acc[r, j] + (beta c[r, j] + bias[j]), each term present only
// when given (c is not read when beta = 0), rounded once to out's dtype. The
// CPU backend's order: the bias is added to beta c first (its prefill), the
// product then accumulates onto that (BLAS with beta = 1).
//   acc = null:  the prefill (out may be c) and the K = 0 GEMM;
//   acc = fp32 scratch of alpha op(a) op(b): the GEMM whose dtype combination
//   cuBLASLt cannot write directly.
template <class T>
__global__ void combine_kernel(const T* acc, DevPtr c, T beta, DevPtr bias, DevPtr out, DType out_dt, int64_t rows,
                               int64_t cols) {
  PARITRON_GRID_LOOP(i, rows * cols) {
    T v = T(0);
    bool have = false;
    if (beta != T(0)) {
      v = beta * ld<T>(c, i);
      have = true;
    }
    if (bias.p != nullptr) {
      const T bj = ld<T>(bias, i % cols);
      v = have ? v + bj : bj;
      have = true;
    }
    if (acc != nullptr) v = have ? acc[i] + v : acc[i];
    put<T>(out, out_dt, i, v);
  }
}

void launch_combine(cudaStream_t s, bool f64, const float* acc, DevPtr c, float beta, DevPtr bias, DevPtr out,
                    DType out_dt, int64_t rows, int64_t cols, const std::string& ctx) {
  const int blocks = blocks_for(rows * cols);
  if (f64) {
    combine_kernel<double><<<blocks, kThreads, 0, s>>>(nullptr, c, static_cast<double>(beta), bias, out, out_dt, rows,
                                                       cols);
  } else {
    combine_kernel<float><<<blocks, kThreads, 0, s>>>(acc, c, beta, bias, out, out_dt, rows, cols);
  }
  PARITRON_CUDA_CHECK_LAUNCH("combine_kernel", ctx);
}

// bias_grad: column sums of dy [rows, n] in two deterministic passes, no
// atomics. Pass 1: block (tile of 32 columns, chunk of rows) — thread (x, y)
// sums rows y, y + 8, ... of its chunk for column x, in row order; the 8
// partial sums are then added in y order. Pass 2: per column, the chunk
// partials in chunk order. The launch shape depends only on (rows, n), so the
// order of additions, hence the bits, are the same run to run.
constexpr int kColTile = 32;
constexpr int kRowLanes = 8;

template <class T>
__global__ void bias_grad_partial_kernel(DevPtr dy, int64_t rows, int64_t n, int64_t rows_per_chunk, T* partial) {
  __shared__ T lanes[kRowLanes][kColTile];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t col = int64_t{blockIdx.x} * kColTile + tx;
  const int64_t r0 = int64_t{blockIdx.y} * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  T acc = T(0);
  if (col < n) {
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) acc += ld<T>(dy, r * n + col);
  }
  lanes[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && col < n) {
    T s = lanes[0][tx];
    for (int y = 1; y < kRowLanes; ++y) s += lanes[y][tx];
    partial[int64_t{blockIdx.y} * n + col] = s;
  }
}

// db[j] = round(accumulate ? db[j] + c : c, db's dtype) with c the column sum
// rounded to dy's dtype: the CPU backend's accumulate_into (the dbias tensor
// the framework materialises in dy's dtype, then added to the main grad).
template <class T>
__global__ void bias_grad_finish_kernel(const T* partial, int64_t chunks, int64_t n, DType dy_dt, DevPtr db,
                                        DType db_dt, bool accumulate) {
  PARITRON_GRID_LOOP(j, n) {
    T s = T(0);
    for (int64_t c = 0; c < chunks; ++c) s = c == 0 ? partial[j] : s + partial[c * n + j];
    s = round_as<T>(dy_dt, s);
    const T v = accumulate ? ld<T>(db, j) + s : s;
    put<T>(db, db_dt, j, v);
  }
}

// grouped_gemm: the pointer arrays cuBLAS reads from device memory, written
// by a kernel from its parameters (no host-to-device copy, so nothing waits
// for a pageable staging copy; stream-ordered like the GEMM). 3 x 128
// pointers = 3 KiB of parameters, under the 4 KiB kernel parameter limit.
constexpr int kPtrsPerLaunch = 128;
struct PtrBatch {
  const void* a[kPtrsPerLaunch];
  const void* b[kPtrsPerLaunch];
  void* c[kPtrsPerLaunch];
  int count;
};

__global__ void write_ptrs_kernel(PtrBatch batch, const void** a, const void** b, void** c) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < batch.count) {
    a[i] = batch.a[i];
    b[i] = batch.b[i];
    c[i] = batch.c[i];
  }
}

// Row-major GEMM extents of op(a) op(b): m, k, n; throws on a mismatch with d
// (the CPU backend's message).
struct Extents {
  int64_t m, k, n;
};

Extents gemm_extents(std::string_view op, const DTensor& a, bool trans_a, const DTensor& b, bool trans_b,
                     const DTensor& d, std::string_view d_name) {
  const int64_t m = trans_a ? a.cols() : a.rows();
  const int64_t k = trans_a ? a.rows() : a.cols();
  const int64_t kb = trans_b ? b.cols() : b.rows();
  const int64_t n = trans_b ? b.rows() : b.cols();
  if (k != kb || d.rows() != m || d.cols() != n) {
    fail(op, text("op(a) = [{}, {}] (a {}{}), op(b) = [{}, {}] (b {}{}), {} {}: expected {} [{}, {}] and "
                  "matching inner dimensions",
                  m, k, a.describe(), tr(trans_a), kb, n, b.describe(), tr(trans_b), d_name, d.describe(), d_name, m,
                  n));
  }
  return Extents{m, k, n};
}

}  // namespace

// ===========================================================================
// gemm: the Backend contract (backend.h), the CPU backend's checks.
//
// Paths, by dtypes (a and b always share a storage dtype: cuBLASLt multiplies
// operands of one type):
//   direct   a, b, c of one dtype, or bf16/fp16 a, b with an F32 c (the fp32
//            wgrad accumulation): one cuBLASLt matmul writing c, the bias by
//            the BIAS epilogue (bias of c's dtype), so D = alpha AB + beta C +
//            bias is formed in fp32 and rounded once.
//   prefill  F64 runs with a bias, and an F32 c with a bias of another dtype:
//            c = beta c + bias by a kernel, then the matmul with beta = 1 —
//            exactly the CPU backend's order (its blocked_gemm prefill).
//   scratch  combinations cuBLASLt cannot write (fp32 a, b into a bf16 c;
//            bf16 a, b into an f16 c; a relabelled c; a 16-bit c with a bias
//            of another dtype): alpha op(a) op(b) into an fp32 scratch
//            [M, N], then one kernel adds beta c + bias and rounds once.
void CudaBackend::gemm(const DTensor& a, bool trans_a, const DTensor& b, bool trans_b, DTensor& c, float alpha,
                       float beta, const DTensor* bias) {
  static constexpr std::string_view op = "gemm";
  check_defined(op, "a", a);
  check_defined(op, "b", b);
  check_defined(op, "c", c);
  if (bias != nullptr) check_defined(op, "bias", *bias);
  const auto [m, k, n] = gemm_extents(op, a, trans_a, b, trans_b, c, "c");
  if (bias != nullptr && bias->numel() != n) {
    fail(op, text("bias {} does not match the {} output columns of c {}", bias->describe(), n, c.describe()));
  }
  const DType ab = a.storage_dtype(), ct = c.storage_dtype();
  if (b.storage_dtype() != ab) {
    fail(op, text("a {} and b {} differ in storage dtype: cuBLASLt multiplies operands of one type", a.describe(),
                  b.describe()));
  }
  const bool f64 = ab == DType::F64 || ct == DType::F64 || (bias != nullptr && is_f64(*bias));
  if (f64 && (ab != DType::F64 || ct != DType::F64 || c.dtype() != DType::F64)) {
    fail(op, text("a {}, b {}, c {}{}{}: a float64 run keeps a, b and c in f64 (CUBLAS_COMPUTE_64F)", a.describe(),
                  b.describe(), c.describe(), bias != nullptr ? ", bias " : "",
                  bias != nullptr ? bias->describe() : std::string()));
  }
  if (m == 0 || n == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream());
  const std::string ctx = context(op, {{"a", &a}, {"b", &b}, {"c", &c}, {"bias", bias}}) +
                          text(" trans_a {} trans_b {} alpha {} beta {}", trans_a, trans_b, alpha, beta);

  if (k == 0) {  // op(a) op(b) = 0: c = beta c (+ bias), the CPU backend's k = 0 branch
    launch_combine(s, f64, nullptr, dev(c), beta, dev(bias), dev(c), c.dtype(), m, n, ctx);
    return;
  }

  LtCall call;
  call.m = m;
  call.n = n;
  call.k = k;
  call.a = a.data();
  call.a_t = ab;
  call.ta = trans_a;
  call.b = b.data();
  call.b_t = ab;
  call.tb = trans_b;
  call.alpha = alpha;

  enum class Path { kDirect, kPrefill, kScratch };
  const bool direct_types = ab == ct || ((ab == DType::BF16 || ab == DType::F16) && ct == DType::F32);
  const bool bias_same = bias == nullptr || bias->storage_dtype() == ct;
  Path path = Path::kDirect;
  if (f64) {
    path = bias != nullptr ? Path::kPrefill : Path::kDirect;
  } else if (!direct_types || c.dtype() != ct) {
    path = Path::kScratch;
  } else if (!bias_same) {
    path = ct == DType::F32 ? Path::kPrefill : Path::kScratch;
  }

  if (path == Path::kScratch) {
    const size_t scratch_bytes = static_cast<size_t>(m) * static_cast<size_t>(n) * sizeof(float);
    auto* ws = static_cast<std::byte*>(workspace(kLtWorkspaceBytes + align_up(scratch_bytes, kScratchAlign)));
    auto* acc = reinterpret_cast<float*>(ws + kLtWorkspaceBytes);
    call.c = acc;
    call.c_t = DType::F32;
    call.d = acc;
    call.d_t = DType::F32;
    call.beta = 0.0;
    run_lt(*this, call, ws, ctx);
    launch_combine(s, false, acc, dev(c), beta, dev(bias), dev(c), c.dtype(), m, n, ctx);
    return;
  }

  if (path == Path::kPrefill) {
    launch_combine(s, f64, nullptr, dev(c), beta, dev(bias), dev(c), c.dtype(), m, n, ctx);
    call.beta = 1.0;
  } else {
    call.beta = beta;
    if (bias != nullptr) {
      call.epilogue = CUBLASLT_EPILOGUE_BIAS;  // bias [N] = rows of the column-major D: broadcast over our rows
      call.bias = bias->data();
      call.bias_t = ct;
    }
  }
  call.c = c.data();
  call.c_t = ct;
  call.d = c.data();
  call.d_t = ct;
  run_lt(*this, call, workspace(kLtWorkspaceBytes), ctx);
}

// ===========================================================================
// bias_grad: db (+)= column sums of dy [T, n]; sums in double (the CPU
// backend's column_partials), then accumulate_into's two roundings from double
// (to dy's dtype, then the sum with db to db's dtype: one rounding each, no
// fp32 intermediate); deterministic (fixed-order two-pass reduction, no atomics).
void CudaBackend::bias_grad(const DTensor& dy, DTensor& db, bool accumulate) {
  static constexpr std::string_view op = "bias_grad";
  check_defined(op, "dy", dy);
  check_defined(op, "db", db);
  const int64_t rows = dy.rows(), n = dy.cols();
  if (db.numel() != n) {
    fail(op, text("db is {}, expected one entry per column of dy {} ({} elements)", db.describe(), dy.describe(), n));
  }
  if (n == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream());
  const std::string ctx = context(op, {{"dy", &dy}, {"db", &db}}) + text(" accumulate {}", accumulate);

  // Chunks of rows: enough blocks (~1024) to fill the GPU, at least 256 rows
  // each; a function of (rows, n) only.
  const int64_t col_tiles = (n + kColTile - 1) / kColTile;
  int64_t chunks = 0, rows_per_chunk = 0;
  if (rows > 0) {
    chunks = std::min<int64_t>((rows + 255) / 256, std::max<int64_t>(1, 1024 / col_tiles));
    chunks = std::min<int64_t>(chunks, 65535);
    rows_per_chunk = (rows + chunks - 1) / chunks;
    chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  }
  auto* partial = static_cast<double*>(
      workspace(std::max<size_t>(1, static_cast<size_t>(chunks) * static_cast<size_t>(n)) * sizeof(double)));
  if (chunks > 0) {
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(chunks));
    const dim3 block(kColTile, kRowLanes);
    bias_grad_partial_kernel<double><<<grid, block, 0, s>>>(dev(dy), rows, n, rows_per_chunk, partial);
    PARITRON_CUDA_CHECK_LAUNCH("bias_grad_partial_kernel", ctx);
  }
  bias_grad_finish_kernel<double><<<blocks_for(n), kThreads, 0, s>>>(partial, chunks, n, dy.dtype(), dev(db),
                                                                     db.dtype(), accumulate);
  PARITRON_CUDA_CHECK_LAUNCH("bias_grad_finish_kernel", ctx);
}

// ===========================================================================
// gemm_lt: one cuBLASLt matmul with an epilogue and TE's fp8 scaling.
//
// Epilogues (row-major d[M, N]; after the swap the column-major D is [N, M]):
//   kBias         CUBLASLT_EPILOGUE_BIAS: bias [N] (rows of D) broadcast over our rows
//   kGelu         CUBLASLT_EPILOGUE_GELU (cuBLASLt's GELU is the tanh form)
//   kBiasGelu     CUBLASLT_EPILOGUE_GELU_BIAS
//   kBiasGeluAux  CUBLASLT_EPILOGUE_GELU_AUX_BIAS: aux [M, N] = A B + bias (pre-activation)
//   kDGelu        CUBLASLT_EPILOGUE_DGELU: d = (A B) * gelu'(aux), aux [M, N] read
//   kBGradB       CUBLASLT_EPILOGUE_BGRADB: bias_grad [M] = sums over K of
//                 cuBLAS's B operand = row-major op(a): for TE's wgrad
//                 dW = dy^T x (a = dy, trans_a; TE's "NT" layout, B = grad
//                 output) that is the column sums of dy as stored [T, M] —
//                 the bias gradient, written (not accumulated) in d's dtype.
// fp8 (F8_E4M3 forward, F8_E5M2 gradients of TE's hybrid recipe):
//   * both operands fp8 and not both E5M2; Hopper/Ada cuBLASLt runs fp8 only
//     in the "TN" layout (column-major A transposed, B not): with the swap
//     that is row-major trans_a = false, trans_b = true, d = a @ b^T with both
//     operands K-contiguous (TE keeps transposed fp8 copies, its column-wise
//     data, for the dgrad/wgrad GEMMs); K a multiple of 16 and 16-byte
//     aligned operands (cuBLAS's fp8 tensor-core requirements);
//   * a_scale_inv / b_scale_inv: CUBLASLT_MATMUL_DESC_{B,A}_SCALE_POINTER
//     (swapped with the operands); d_scale / d_amax: D_SCALE_POINTER /
//     AMAX_D_POINTER, fp8 outputs only;
//   * an fp8 output takes no accumulation (beta = 0) and its C descriptor is
//     bf16 (or the bias's dtype), TE's configuration; an fp8-input bias is
//     typed explicitly (BIAS_DATA_TYPE: bf16 for an fp32 output).
// Combinations cuBLASLt rejects are reported naming the whole configuration.
void CudaBackend::gemm_lt(const GemmLtArgs& args) {
  static constexpr std::string_view op = "gemm_lt";
  if (args.a == nullptr || args.b == nullptr || args.d == nullptr) fail(op, "a, b and d are required");
  const DTensor& a = *args.a;
  const DTensor& b = *args.b;
  DTensor& d = *args.d;
  check_lt_input(op, "a", a);
  check_lt_input(op, "b", b);
  check_lt_output(op, "d", d);
  const auto [m, k, n] = gemm_extents(op, a, args.trans_a, b, args.trans_b, d, "d");
  const DType at = a.storage_dtype(), bt = b.storage_dtype(), dt = d.storage_dtype();
  const bool fp8 = is_fp8(at) || is_fp8(bt);
  const Epilogue epi = args.epilogue;
  const std::string ctx =
      context(op, {{"a", &a}, {"b", &b}, {"d", &d}, {"c", args.c}, {"bias", args.bias}, {"aux", args.aux},
                   {"bias_grad", args.bias_grad}}) +
      text(" trans_a {} trans_b {} alpha {} beta {} epilogue {}", args.trans_a, args.trans_b, args.alpha, args.beta,
           epilogue_name(epi));

  // C: args.c, else d itself (read only when beta != 0).
  const DTensor* c = args.c != nullptr ? args.c : &d;
  if (args.c != nullptr) {
    check_lt_input(op, "c", *args.c);
    if (args.c->rows() != m || args.c->cols() != n || args.c->storage_dtype() != dt) {
      fail(op, text("c {} must match d {} in shape and dtype (cuBLASLt's C and D share a layout and type)",
                    args.c->describe(), d.describe()));
    }
  }

  // Epilogue arguments: exactly those the epilogue uses.
  const bool wants_bias = epi == Epilogue::kBias || epi == Epilogue::kBiasGelu || epi == Epilogue::kBiasGeluAux;
  const bool wants_aux = epi == Epilogue::kBiasGeluAux || epi == Epilogue::kDGelu;
  const bool wants_bgrad = epi == Epilogue::kBGradB;
  if (wants_bias != (args.bias != nullptr)) {
    fail(op, text("epilogue {} {} a bias", epilogue_name(epi), wants_bias ? "needs" : "does not take"));
  }
  if (wants_aux != (args.aux != nullptr)) {
    fail(op, text("epilogue {} {} an aux matrix", epilogue_name(epi), wants_aux ? "needs" : "does not take"));
  }
  if (wants_bgrad != (args.bias_grad != nullptr)) {
    fail(op, text("epilogue {} {} a bias_grad output", epilogue_name(epi), wants_bgrad ? "needs" : "does not take"));
  }
  if (args.bias != nullptr) {
    check_lt_input(op, "bias", *args.bias);
    if (args.bias->numel() != n) {
      fail(op, text("bias {} does not match the {} output columns of d {}", args.bias->describe(), n, d.describe()));
    }
  }
  if (args.aux != nullptr) {
    check_lt_output(op, "aux", *args.aux);
    if (args.aux->rows() != m || args.aux->cols() != n) {
      fail(op, text("aux {} must be [{}, {}] like d {}", args.aux->describe(), m, n, d.describe()));
    }
    if (n % 8 != 0) {
      fail(op, text("epilogue {} needs d's column count N = {} to be a multiple of 8 (cuBLASLt's "
                    "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD requirement; d {})",
                    epilogue_name(epi), n, d.describe()));
    }
  }
  if (args.bias_grad != nullptr) {
    check_lt_output(op, "bias_grad", *args.bias_grad);
    if (args.bias_grad->numel() != m) {
      fail(op, text("bias_grad {} must have one entry per row of d {} ({} elements: the sums over K of op(a))",
                    args.bias_grad->describe(), d.describe(), m));
    }
    if (!fp8 && args.bias_grad->storage_dtype() != dt) {
      fail(op, text("bias_grad {} must have d's dtype {} (cuBLASLt writes the bias gradient in the output type)",
                    args.bias_grad->describe(), dtype_name(dt)));
    }
  }
  check_scale(op, "a_scale_inv", args.a_scale_inv);
  check_scale(op, "b_scale_inv", args.b_scale_inv);
  check_scale(op, "d_scale", args.d_scale);
  check_scale(op, "d_amax", args.d_amax);
  if (args.a_scale_inv != nullptr && !is_fp8(at)) {
    fail(op, text("a_scale_inv given for a non-fp8 a {} (scales apply to fp8 operands only)", a.describe()));
  }
  if (args.b_scale_inv != nullptr && !is_fp8(bt)) {
    fail(op, text("b_scale_inv given for a non-fp8 b {} (scales apply to fp8 operands only)", b.describe()));
  }
  if ((args.d_scale != nullptr || args.d_amax != nullptr) && !is_fp8(dt)) {
    fail(op, text("d_scale / d_amax given for a non-fp8 output d {} (TE sets them for fp8 outputs only)",
                  d.describe()));
  }

  if (fp8) {
    if (!is_fp8(at) || !is_fp8(bt)) {
      fail(op, text("mixed fp8 and non-fp8 operands (a {}, b {}): cuBLASLt's fp8 GEMM takes two fp8 operands",
                    a.describe(), b.describe()));
    }
    if (at == DType::F8_E5M2 && bt == DType::F8_E5M2) {
      fail(op, text("F8_E5M2 x F8_E5M2 (a {}, b {}) is not supported by cuBLASLt: one operand must be F8_E4M3 "
                    "(TE's hybrid recipe pairs E5M2 gradients with E4M3 weights / activations)",
                    a.describe(), b.describe()));
    }
    if (args.trans_a || !args.trans_b) {
      fail(op, text("fp8 operands need cuBLASLt's \"TN\" layout, which is row-major trans_a = false, trans_b = true "
                    "(d = a @ b^T, both operands K-contiguous); got trans_a = {}, trans_b = {} (a {}, b {}): pass "
                    "the transposed fp8 copy, as TE does with its column-wise data",
                    args.trans_a, args.trans_b, a.describe(), b.describe()));
    }
    if (k % 16 != 0) {
      fail(op, text("fp8 GEMM needs K = {} to be a multiple of 16 (leading dimensions of 16 bytes; a {}, b {})", k,
                    a.describe(), b.describe()));
    }
    if (alignment_of(a.data()) < 16 || alignment_of(b.data()) < 16 || alignment_of(d.data()) < 16) {
      fail(op, text("fp8 GEMM needs 16-byte aligned a, b and d (a {}, b {}, d {})", a.describe(), b.describe(),
                    d.describe()));
    }
    if (is_fp8(dt) && (args.beta != 0.0f || args.c != nullptr)) {
      fail(op, text("an fp8 output d {} takes no accumulation (beta = {}{}): TE's 'accumulation mode not "
                    "supported for FP8 output'",
                    d.describe(), args.beta, args.c != nullptr ? ", c given" : ""));
    }
  } else {
    if (at != bt) {
      fail(op, text("a {} and b {} differ in storage dtype: cuBLASLt multiplies operands of one type", a.describe(),
                    b.describe()));
    }
    if (is_fp8(dt) || !(dt == at || ((at == DType::BF16 || at == DType::F16) && dt == DType::F32))) {
      fail(op, text("d {} for {} operands: cuBLASLt writes the operands' dtype, or f32 from bf16 / f16 operands",
                    d.describe(), dtype_name(at)));
    }
  }

  if (m == 0 || n == 0) {
    if (wants_bgrad && m > 0) {
      fail(op, text("epilogue kBGradB with N = 0 (d {}): no GEMM to attach the bias gradient to; use bias_grad",
                    d.describe()));
    }
    return;
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream());
  if (k == 0) {
    if ((epi != Epilogue::kNone && epi != Epilogue::kBias) || is_fp8(dt)) {
      fail(op, text("K = 0 (a {}, b {}) with epilogue {} and d {}: only kNone / kBias into a non-fp8 d handle an "
                    "empty inner dimension",
                    a.describe(), b.describe(), epilogue_name(epi), d.describe()));
    }
    launch_combine(s, dt == DType::F64, nullptr, dev(*c), args.beta, dev(args.bias), dev(d), d.dtype(), m, n, ctx);
    return;
  }

  LtCall call;
  call.m = m;
  call.n = n;
  call.k = k;
  call.a = a.data();
  call.a_t = at;
  call.ta = args.trans_a;
  call.b = b.data();
  call.b_t = bt;
  call.tb = args.trans_b;
  call.d = d.data();
  call.d_t = dt;
  call.alpha = args.alpha;
  call.beta = args.beta;
  switch (epi) {
    case Epilogue::kNone: call.epilogue = CUBLASLT_EPILOGUE_DEFAULT; break;
    case Epilogue::kBias: call.epilogue = CUBLASLT_EPILOGUE_BIAS; break;
    case Epilogue::kGelu: call.epilogue = CUBLASLT_EPILOGUE_GELU; break;
    case Epilogue::kBiasGelu: call.epilogue = CUBLASLT_EPILOGUE_GELU_BIAS; break;
    case Epilogue::kBiasGeluAux: call.epilogue = CUBLASLT_EPILOGUE_GELU_AUX_BIAS; break;
    case Epilogue::kDGelu: call.epilogue = CUBLASLT_EPILOGUE_DGELU; break;
    case Epilogue::kBGradB: call.epilogue = CUBLASLT_EPILOGUE_BGRADB; break;
    default: fail(op, text("unknown epilogue {}", static_cast<int>(epi)));
  }
  if (args.bias != nullptr) {
    call.bias = args.bias->data();
    call.bias_t = args.bias->storage_dtype();
  } else if (args.bias_grad != nullptr) {
    call.bias = args.bias_grad->data();
    call.bias_t = args.bias_grad->storage_dtype();
  }
  call.set_bias_type = call.bias != nullptr && (fp8 || call.bias_t != dt);
  if (args.aux != nullptr) {
    call.aux = args.aux->data();
    call.aux_t = args.aux->storage_dtype();
  }
  if (is_fp8(dt)) {
    // TE: "for FP8 output, cuBLAS requires C_type to match bias_type and be
    // FP16/BF16"; C is not read (beta = 0).
    call.c = nullptr;
    call.c_t = args.bias != nullptr ? args.bias->storage_dtype() : DType::BF16;
  } else {
    call.c = c->data();
    call.c_t = dt;
  }
  call.a_scale = args.a_scale_inv != nullptr ? args.a_scale_inv->data() : nullptr;
  call.b_scale = args.b_scale_inv != nullptr ? args.b_scale_inv->data() : nullptr;
  call.d_scale = args.d_scale != nullptr ? args.d_scale->data() : nullptr;
  call.d_amax = args.d_amax != nullptr ? args.d_amax->data() : nullptr;
  run_lt(*this, call, workspace(kLtWorkspaceBytes), ctx);
}

// ===========================================================================
// grouped_gemm: d_i = alpha op(a_i) op(b_i) + beta d_i for every expert in one
// cublasGemmGroupedBatchedEx (cuBLAS >= 12.5), one group of one problem per
// expert (shapes differ per expert: tokens routed to it), with the row-major
// swap of every problem (A = b_i, B = a_i, m = N_i, n = M_i).
//
// cublasGemmGroupedBatchedEx multiplies operands and output of one type
// (f32, bf16, f16 with CUBLAS_COMPUTE_32F; f64 with CUBLAS_COMPUTE_64F). Any
// other combination — bf16 experts accumulating into fp32 main grads, fp8
// experts, a relabelled d — falls back to a loop of per-expert GEMMs through
// gemm() (or gemm_lt() for fp8), each one cuBLASLt matmul.
void CudaBackend::grouped_gemm(std::span<const GroupedGemmProblem> problems, bool trans_a, bool trans_b, float alpha,
                               float beta) {
  static constexpr std::string_view op = "grouped_gemm";
  if (problems.empty()) return;
  const auto name = [](std::string_view what, size_t i) { return text("{}[{}]", what, i); };
  std::vector<Extents> ext(problems.size());
  for (size_t i = 0; i < problems.size(); ++i) {
    const GroupedGemmProblem& p = problems[i];
    if (p.a == nullptr || p.b == nullptr || p.d == nullptr) fail(op, text("problem {}: a, b and d are required", i));
    check_lt_input(op, name("a", i), *p.a);
    check_lt_input(op, name("b", i), *p.b);
    check_lt_input(op, name("d", i), *p.d);
    const GroupedGemmProblem& p0 = problems[0];
    if (p.a->storage_dtype() != p0.a->storage_dtype() || p.b->storage_dtype() != p0.b->storage_dtype() ||
        p.d->storage_dtype() != p0.d->storage_dtype() || p.d->dtype() != p0.d->dtype()) {
      fail(op, text("problem {} (a {}, b {}, d {}) differs in dtype from problem 0 (a {}, b {}, d {}): every "
                    "expert's GEMM has the same dtypes",
                    i, p.a->describe(), p.b->describe(), p.d->describe(), p0.a->describe(), p0.b->describe(),
                    p0.d->describe()));
    }
    ext[i] = gemm_extents(op, *p.a, trans_a, *p.b, trans_b, *p.d, name("d", i));
  }

  const DType at = problems[0].a->storage_dtype(), bt = problems[0].b->storage_dtype();
  const DType dt = problems[0].d->storage_dtype();
  bool grouped = at == bt && bt == dt && is_compute_float(dt) && problems[0].d->dtype() == dt;
  for (size_t i = 0; i < problems.size() && grouped; ++i) {
    const Extents& e = ext[i];
    grouped = e.m <= INT_MAX && e.n <= INT_MAX && e.k <= INT_MAX && problems[i].a->cols() <= INT_MAX &&
              problems[i].b->cols() <= INT_MAX;
  }
  if (!grouped) {
    // Fallback: the dtype combination (or an extent beyond int) is outside
    // cublasGemmGroupedBatchedEx; one cuBLASLt matmul per expert.
    for (const GroupedGemmProblem& p : problems) {
      if (is_fp8(at) || is_fp8(bt)) {
        GemmLtArgs args;
        args.a = p.a;
        args.trans_a = trans_a;
        args.b = p.b;
        args.trans_b = trans_b;
        args.d = p.d;
        args.alpha = alpha;
        args.beta = beta;
        gemm_lt(args);
      } else {
        gemm(*p.a, trans_a, *p.b, trans_b, *p.d, alpha, beta);
      }
    }
    return;
  }

  const cudaStream_t s = static_cast<cudaStream_t>(stream());
  const GroupedGemmProblem& p0 = problems[0];
  const std::string ctx = text("{} of {} problems (problem 0: a {}, b {}, d {}) trans_a {} trans_b {} alpha {} beta {}",
                               op, problems.size(), p0.a->describe(), p0.b->describe(), p0.d->describe(), trans_a,
                               trans_b, alpha, beta);
  const bool f64 = dt == DType::F64;

  // Problems with an empty inner dimension (an expert without tokens, in a
  // wgrad): d = beta d. Empty outputs: nothing.
  std::vector<size_t> active;
  active.reserve(problems.size());
  for (size_t i = 0; i < problems.size(); ++i) {
    const Extents& e = ext[i];
    if (e.m == 0 || e.n == 0) continue;
    if (e.k == 0) {
      DTensor& d = *problems[i].d;
      launch_combine(s, f64, nullptr, dev(d), beta, DevPtr{}, dev(d), d.dtype(), e.m, e.n, ctx);
      continue;
    }
    active.push_back(i);
  }
  if (active.empty()) return;
  const int groups = static_cast<int>(active.size());

  // Host arrays (cuBLAS reads them during the call), one entry per group.
  std::vector<cublasOperation_t> transa(active.size(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  std::vector<cublasOperation_t> transb(active.size(), trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  std::vector<int> m_arr(active.size()), n_arr(active.size()), k_arr(active.size());
  std::vector<int> lda(active.size()), ldb(active.size()), ldc(active.size());
  std::vector<int> group_size(active.size(), 1);
  std::vector<float> alpha_f(active.size(), alpha), beta_f(active.size(), beta);
  std::vector<double> alpha_d(active.size(), alpha), beta_d(active.size(), beta);
  for (size_t g = 0; g < active.size(); ++g) {
    const Extents& e = ext[active[g]];
    m_arr[g] = static_cast<int>(e.n);
    n_arr[g] = static_cast<int>(e.m);
    k_arr[g] = static_cast<int>(e.k);
    lda[g] = static_cast<int>(problems[active[g]].b->cols());  // cuBLAS A = b, ld = b's row length
    ldb[g] = static_cast<int>(problems[active[g]].a->cols());  // cuBLAS B = a
    ldc[g] = static_cast<int>(e.n);
  }

  // Device pointer arrays [A | B | C] in the workspace, written by kernels.
  const size_t G = active.size();
  auto** ptrs = static_cast<void**>(workspace(3 * G * sizeof(void*)));
  auto** d_a = const_cast<const void**>(ptrs);
  auto** d_b = const_cast<const void**>(ptrs + G);
  void** d_c = ptrs + 2 * G;
  for (size_t g0 = 0; g0 < G; g0 += kPtrsPerLaunch) {
    PtrBatch batch{};
    batch.count = static_cast<int>(std::min<size_t>(kPtrsPerLaunch, G - g0));
    for (int j = 0; j < batch.count; ++j) {
      const GroupedGemmProblem& p = problems[active[g0 + static_cast<size_t>(j)]];
      batch.a[j] = p.b->data();
      batch.b[j] = p.a->data();
      batch.c[j] = p.d->data();
    }
    write_ptrs_kernel<<<1, kPtrsPerLaunch, 0, s>>>(batch, d_a + g0, d_b + g0, d_c + g0);
    PARITRON_CUDA_CHECK_LAUNCH("write_ptrs_kernel", ctx);
  }

  const auto handle = static_cast<cublasHandle_t>(cublas_handle());
  PARITRON_CUBLAS_CHECK(cublasSetStream(handle, s), ctx);
  PARITRON_CUBLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST), ctx);  // alpha/beta arrays on the host
  // Default math (no TF32 for fp32), and split-K reductions in the compute
  // type, never in a 16-bit output type.
  const auto math = static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
  cublasMath_t current = CUBLAS_DEFAULT_MATH;
  PARITRON_CUBLAS_CHECK(cublasGetMathMode(handle, &current), ctx);
  if (current != math) PARITRON_CUBLAS_CHECK(cublasSetMathMode(handle, math), ctx);
  const cublasComputeType_t compute = f64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  const void* alphas = f64 ? static_cast<const void*>(alpha_d.data()) : static_cast<const void*>(alpha_f.data());
  const void* betas = f64 ? static_cast<const void*>(beta_d.data()) : static_cast<const void*>(beta_f.data());
  const cudaDataType_t type = cuda_type(dt);
  PARITRON_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(handle, transa.data(), transb.data(), m_arr.data(), n_arr.data(),
                                                   k_arr.data(), alphas, d_a, type, lda.data(), d_b, type, ldb.data(),
                                                   betas, d_c, type, ldc.data(), groups, group_size.data(), compute),
                        ctx);
}

}  // namespace paritron::opt::cuda
