#include "optimized/comm/run_ranks.h"

#include <fmt/format.h>

#include <thread>
#include <vector>

#include "optimized/comm/thread_comm.h"

namespace paritron::opt {

RankFailed::RankFailed(int64_t rank, const std::string& message, std::exception_ptr cause)
    : CommError(fmt::format("rank {} failed: {}", rank, message)), rank_(rank), reason_(message), cause_(cause) {}

namespace {
std::string what_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "unknown exception (not a std::exception)";
  }
}
}  // namespace

void run_on_threads(int64_t world_size, const std::function<void(Comm&)>& body, std::chrono::milliseconds timeout) {
  ThreadWorld world(world_size);
  world.set_timeout(timeout);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world_size));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(world_size));
  auto rank_main = [&](int64_t r) {
    ThreadComm& comm = world.comm(r);
    try {
      body(comm);
    } catch (...) {
      errors[static_cast<size_t>(r)] = std::current_exception();
      try {
        comm.abort(what_of(errors[static_cast<size_t>(r)]));
      } catch (...) {
      }
    }
    try {
      comm.retire();
    } catch (...) {
    }
  };
  try {
    for (int64_t r = 0; r < world_size; ++r) threads.emplace_back(rank_main, r);
  } catch (const std::exception& e) {
    // Could not start every rank: fail the started ones, then join them.
    world.comm(0).abort(fmt::format("could not start rank thread {}: {}", threads.size(), e.what()));
    for (size_t r = threads.size(); r < static_cast<size_t>(world_size); ++r) world.comm(static_cast<int64_t>(r)).retire();
  }
  for (auto& t : threads) t.join();

  const auto failure = world.failure();
  if (!failure) return;
  const auto r = static_cast<size_t>(failure->rank);
  throw RankFailed(failure->rank, failure->reason, r < errors.size() ? errors[r] : nullptr);
}

}  // namespace paritron::opt
