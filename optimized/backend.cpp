// make_backend: the backends by name (optimized/backend.h).
#include "optimized/backend.h"

#include <fmt/format.h>

#include "common/error.h"
#include "optimized/cpu/cpu_backend.h"
#if defined(PARITRON_HAVE_CUDA)
#include "optimized/cuda/cuda_backend.h"
#endif

namespace paritron::opt {

std::unique_ptr<Backend> make_backend(std::string_view name) {
  if (name == "cpu") return std::make_unique<cpu::CpuBackend>();
#if defined(PARITRON_HAVE_CUDA)
  // Throws BackendError naming the reason when no device is usable.
  if (name == "cuda") return std::make_unique<cuda::CudaBackend>();
  throw BackendError(fmt::format("unknown backend '{}': this build has: cpu, cuda", name));
#else
  if (name == "cuda") {
    throw BackendError("backend 'cuda': this build has no CUDA parts (nvcc was not found at configure time, "
                       "or PARITRON_CUDA=OFF); it has: cpu");
  }
  throw BackendError(fmt::format("unknown backend '{}': this build has: cpu", name));
#endif
}

}  // namespace paritron::opt
