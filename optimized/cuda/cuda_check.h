// Error checks for CUDA runtime and cuBLAS(Lt) calls (design.md principle 7:
// a failure names the call, where it was made and the shapes involved, never
// a silent wrong answer). Every runtime/library call in optimized/cuda/ goes
// through one of these; kernel launches are followed by
// PARITRON_CUDA_CHECK_LAUNCH (a launch error is only visible through
// cudaGetLastError). NCCL's check lives with the NCCL comm.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>
#include <string_view>

namespace paritron::opt::cuda {

// Throw BackendError "<context>: <call> failed at file:line: <name> (<message>)".
[[noreturn]] void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line,
                                   std::string_view context);
[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line,
                                     std::string_view context);

inline void check_cuda(cudaError_t status, const char* call, const char* file, int line, std::string_view context) {
  if (status != cudaSuccess) throw_cuda_error(status, call, file, line, context);
}
inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line,
                         std::string_view context) {
  if (status != CUBLAS_STATUS_SUCCESS) throw_cublas_error(status, call, file, line, context);
}

}  // namespace paritron::opt::cuda

// CONTEXT is a string (view) naming the op and its shapes, e.g.
// "gemm a bf16[64, 128] b ...", built by the caller (only evaluated on failure
// would be nicer, but the contexts are cheap next to a kernel launch).
#define PARITRON_CUDA_CHECK(call, context) ::paritron::opt::cuda::check_cuda((call), #call, __FILE__, __LINE__, (context))
#define PARITRON_CUBLAS_CHECK(call, context) \
  ::paritron::opt::cuda::check_cublas((call), #call, __FILE__, __LINE__, (context))
#define PARITRON_CUDA_CHECK_LAUNCH(kernel_name, context) \
  ::paritron::opt::cuda::check_cuda(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__, (context))
