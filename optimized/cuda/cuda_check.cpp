// See cuda_check.h.
#include "optimized/cuda/cuda_check.h"

#include <fmt/format.h>

#include "common/error.h"

namespace paritron::opt::cuda {

namespace {
std::string where(const char* call, const char* file, int line, std::string_view context) {
  std::string s;
  if (!context.empty()) s = fmt::format("{}: ", context);
  return s + fmt::format("{} failed ({}:{})", call, file, line);
}
}  // namespace

void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line, std::string_view context) {
  (void)cudaGetLastError();  // clear a sticky launch error so the next check reports its own
  throw BackendError(fmt::format("{}: {} ({})", where(call, file, line, context), cudaGetErrorName(status),
                                 cudaGetErrorString(status)));
}

void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line,
                        std::string_view context) {
  throw BackendError(fmt::format("{}: {} ({})", where(call, file, line, context), cublasGetStatusName(status),
                                 cublasGetStatusString(status)));
}

}  // namespace paritron::opt::cuda
