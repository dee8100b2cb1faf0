#include "optimized/comm/run_ranks.h"

#include <fmt/format.h>

#include "optimized/comm/thread_comm.h"

namespace paritron::opt {

RankFailed::RankFailed(int64_t rank, const std::string& message, std::exception_ptr cause)
    : CommError(fmt::format("rank {} failed: {}", rank, message)), rank_(rank), reason_(message), cause_(cause) {}

void run_on_threads(int64_t world_size, const std::function<void(Comm&)>& body, std::chrono::milliseconds timeout) {
  ThreadWorld world(world_size);
  world.set_timeout(timeout);
  run_on_world(world, body);  // thread_comm.h: a thread per rank, the failure semantics above
}

}  // namespace paritron::opt
