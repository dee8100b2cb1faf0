// The CUDA backend (issue #7): the Backend interface (optimized/backend.h) on
// one NVIDIA GPU. Tensors are stored in their own dtype (bf16 as 2 bytes,
// unlike the CPU backend's fp32 carrier, optimized/tensor.h); every kernel
// computes in fp32 (double for F64 tensors) and rounds once to the output
// dtype (RNE), the semantics every op's comment in backend.h states. The
// element-wise and row-wise math is the single source of optimized/math/ and
// common/math/ (PARITRON_HD), so the CPU backend's CI runs the very formulas
// these kernels run.
//
// Layout of optimized/cuda/:
//   cuda_check.h/.cpp     error checks naming the call and the shapes
//   device.cuh            device-side storage access (load/store per dtype), launch helpers
//   cuda_backend.cpp      device selection, stream, memory, upload/download
//   elementwise.cu        copy/cast, copy_cols, fill, axpby, sum, amax, fp8 cast,
//                         bias-activation, bias-dropout-add, dropout backward
//   norm.cu rope.cu       fused LayerNorm/RMSNorm forward/backward, RoPE
//   softmax.cu            row softmax (router scores) and the router's top-k
//   permute.cu            gather / scatter-add of token rows (MoE permute/unpermute, CUB)
//   gemm.cu               cuBLASLt GEMMs (fp32/bf16/fp16/fp8, epilogues), grouped GEMM
//   attention.cu          flash attention forward/backward (own kernels)
//
// Streams and workspaces are owned here: every op is enqueued on stream();
// nothing synchronises except download, sum, amax (they return host values)
// and synchronize(). Errors throw BackendError naming the op, the failing call
// and the shapes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "optimized/backend.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace paritron::opt::cuda {

// Whether a CUDA device can be used; when not, *why says why (no driver, no
// device, ...). Any error counts as "no device" (toolchain.md: without a
// driver cudaGetDeviceCount returns cudaErrorInsufficientDriver).
bool device_available(std::string* why = nullptr);

// The stream of the CudaBackend most recently constructed on this thread
// (null if none, or after it was destroyed). The device-local comm
// (optimized/comm/device_local_comm.h) orders its copies and reduction
// kernels on it: one thread, one backend, one stream per rank.
CUstream_st* current_stream();

// cuBLASLt epilogues (gemm_lt).
enum class Epilogue : uint8_t {
  kNone,
  kBias,         // D = A B + bias (bias broadcast over rows of the row-major result)
  kGelu,         // D = gelu_tanh(A B)
  kBiasGelu,     // D = gelu_tanh(A B + bias)
  kBiasGeluAux,  // as kBiasGelu, and aux = A B + bias (the pre-activation, for the backward)
  kDGelu,        // D = (A B) * gelu_tanh'(aux)  (backward through the activation)
  kBGradB,       // D = op(A) B, and bias_grad[m] = sum over K of op(A)[m, :]: the wgrad dW = dy^T x with db = column sums of dy
};

// One cuBLASLt matmul in row-major terms: d[M, N] = alpha * op(a) @ op(b)
// + beta * c, op(x) = x^T when trans. d and c may be the same tensor. For
// fp8 operands (F8_E4M3 / F8_E5M2 storage) the per-tensor scales follow
// Transformer Engine: a_scale_inv / b_scale_inv dequantise the inputs,
// d_scale quantises an fp8 output, d_amax (device fp32 [1], optional)
// receives max |D| before quantisation.
struct GemmLtArgs {
  const DTensor* a = nullptr;
  bool trans_a = false;
  const DTensor* b = nullptr;
  bool trans_b = false;
  DTensor* d = nullptr;
  const DTensor* c = nullptr;  // null: d (used when beta != 0)
  float alpha = 1.0f, beta = 0.0f;
  Epilogue epilogue = Epilogue::kNone;
  const DTensor* bias = nullptr;  // kBias, kBiasGelu, kBiasGeluAux
  DTensor* aux = nullptr;         // kBiasGeluAux (written), kDGelu (read)
  DTensor* bias_grad = nullptr;   // kBGradB (written)
  // fp8 scaling: device fp32 scalars (DTensor F32 [1]) or null for 1.
  const DTensor* a_scale_inv = nullptr;
  const DTensor* b_scale_inv = nullptr;
  const DTensor* d_scale = nullptr;
  DTensor* d_amax = nullptr;
};

// One expert's GEMM of a grouped GEMM: d = op(a) @ op(b) (+ beta d).
struct GroupedGemmProblem {
  const DTensor* a;
  const DTensor* b;
  DTensor* d;
};

class CudaBackend final : public Backend {
 public:
  // device < 0: the current device (0 unless the caller set another).
  // Throws BackendError when no device can be used.
  explicit CudaBackend(int device = -1);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string_view name() const override { return "cuda"; }

  DTensor empty(DType dtype, Shape shape) override;
  DTensor zeros(DType dtype, Shape shape) override;
  DTensor upload(const Tensor& host, DType dtype) override;
  Tensor download(const DTensor& t) override;
  void copy(const DTensor& src, DTensor& dst) override;
  void copy_cols(const DTensor& src, int64_t src_col, DTensor& dst, int64_t dst_col, int64_t ncols) override;
  void fill(DTensor& t, double value) override;
  void synchronize() override;

  void gemm(const DTensor& a, bool trans_a, const DTensor& b, bool trans_b, DTensor& c, float alpha = 1.0f,
            float beta = 0.0f, const DTensor* bias = nullptr) override;
  void bias_grad(const DTensor& dy, DTensor& db, bool accumulate) override;

  void attention_forward(const AttentionArgs& args, const DTensor& q, const DTensor& k, const DTensor& v,
                         DTensor& out, DTensor& lse) override;
  void attention_backward(const AttentionArgs& args, const DTensor& q, const DTensor& k, const DTensor& v,
                          const DTensor& out, const DTensor& lse, const DTensor& dout, DTensor& dq, DTensor& dk,
                          DTensor& dv) override;

  void norm_forward(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor* beta, DTensor& y,
                    DTensor& mean, DTensor& rstd) override;
  void norm_backward(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor& mean,
                     const DTensor& rstd, const DTensor& dy, DTensor& dx, DTensor& dgamma, DTensor* dbeta) override;

  void rope(const RopeArgs& args, const DTensor& x, const DTensor& freqs, DTensor& y, bool backward) override;

  void bias_act_forward(const ActivationArgs& args, const DTensor& x, const DTensor* bias, DTensor& y) override;
  void bias_act_backward(const ActivationArgs& args, const DTensor& x, const DTensor* bias, const DTensor& dy,
                         DTensor& dx) override;

  void bias_dropout_add(const DropoutArgs& args, const DTensor& x, const DTensor* bias, const DTensor* residual,
                        DTensor& out) override;
  void dropout_backward(const DropoutArgs& args, const DTensor& dout, DTensor& dx) override;

  void axpby(float alpha, const DTensor& a, float beta, const DTensor& b, DTensor& out) override;
  double sum(const DTensor& t) override;
  double amax(const DTensor& t) override;
  void fp8_fake_quant(const DTensor& x, bool e5m2, float scale, DTensor& out) override;

  void gather_rows(const DTensor& x, std::span<const int64_t> rows, DTensor& out) override;
  void scatter_add_rows(const DTensor& y, std::span<const int64_t> rows, std::span<const float> weights,
                        DTensor& out) override;
  void softmax_rows(const DTensor& x, DTensor& y) override;

  // --- beyond the Backend interface (benchmarks, fp8 and expert paths) ------
  // A cuBLASLt matmul with an epilogue and fp8 scaling (gemm.cu).
  void gemm_lt(const GemmLtArgs& args);
  // The experts' GEMMs in one cuBLAS grouped batched call (gemm.cu); every
  // problem has the same dtypes and transposes, shapes may differ.
  void grouped_gemm(std::span<const GroupedGemmProblem> problems, bool trans_a, bool trans_b, float alpha = 1.0f,
                    float beta = 0.0f);
  // The router's top-k per row of scores [T, E] (fp32): indices [T, k] (I64),
  // in math::topk_row's order (softmax.cu).
  void router_topk(const DTensor& scores, int64_t k, DTensor& indices);
  // Max |x| of t into a device fp32 scalar (amax without the host round trip).
  void amax_to(const DTensor& t, DTensor& out);

  CUstream_st* stream() const;
  int device() const;
  // Scratch memory of at least `bytes` on this backend's stream, valid until
  // the next call that asks for scratch (ops use it within one call).
  void* workspace(size_t bytes);
  // cuBLASLt handle (opaque pointer; gemm.cu casts it).
  void* cublaslt_handle();
  void* cublas_handle();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace paritron::opt::cuda
