// Launch helpers: run a body once per rank (optimized/comm/comm.h).
//
// run_on_threads starts a ThreadWorld of world_size ranks, a thread each,
// every comm with the given timeout. An exception escaping a rank's body
// (anything, not only paritron errors) calls abort on that rank's comm, so
// the other ranks' comm calls throw CommError naming it and they unwind too;
// a body that returns retires its rank (peers still waiting for it fail at
// once). After joining every thread, the root cause (the first rank that
// failed) is rethrown as RankFailed: "rank R failed: <its message>", with the
// original exception in cause(); the other ranks' secondary CommErrors are
// dropped. Never calls std::terminate. It cannot interrupt a rank stuck
// outside comm calls (an infinite loop in the body); every wait inside comm
// calls ends within the timeout.
//
// For MPI (one process per rank) see run_on_mpi in optimized/comm/mpi_comm.h.
#pragma once

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <string>

#include "optimized/comm/comm.h"

namespace paritron::opt {

class RankFailed : public CommError {
 public:
  RankFailed(int64_t rank, const std::string& message, std::exception_ptr cause);
  int64_t rank() const { return rank_; }
  const std::string& reason() const { return reason_; }  // the failed rank's own message
  std::exception_ptr cause() const { return cause_; }   // its exception (null after an explicit abort)

 private:
  int64_t rank_;
  std::string reason_;
  std::exception_ptr cause_;
};

inline constexpr std::chrono::milliseconds kDefaultCommTimeout{std::chrono::seconds(120)};

void run_on_threads(int64_t world_size, const std::function<void(Comm&)>& body,
                    std::chrono::milliseconds timeout = kDefaultCommTimeout);

}  // namespace paritron::opt
