// make_backend: the backends by name (optimized/backend.h).
#include "optimized/backend.h"

#include <fmt/format.h>

#include "common/error.h"
#include "optimized/cpu/cpu_backend.h"

namespace paritron::opt {

std::unique_ptr<Backend> make_backend(std::string_view name) {
  if (name == "cpu") return std::make_unique<cpu::CpuBackend>();
  throw BackendError(fmt::format("unknown backend '{}': this build has: cpu", name));
}

}  // namespace paritron::opt
