// MpiComm: one rank per process over OpenMPI (optimized/comm/comm.h is the
// contract). Compiled only when CMake finds MPI (PARITRON_HAVE_MPI=1).
//
//   int main(int argc, char** argv) {
//     paritron::opt::MpiSession mpi(&argc, &argv);   // MPI_Init_thread(MULTIPLE) .. MPI_Finalize
//     paritron::opt::run_on_mpi([](Comm& comm) { ... });
//   }
//
// Groups map to sub-communicators (MPI_Comm_create_group over the members in
// group-rank order, so the communicator rank is the group rank), created on
// first use and cached by member list; creating one is collective over the
// members, as every comm call.
//
// Mismatch detection: before every collective the members exchange a small
// descriptor (op, group name, dtypes, shapes, all_to_all_v row counts:
// 8 * (30 + 2 * group size) bytes) with MPI_Allgather on the group and every
// member throws the same CommError as ThreadComm on disagreement, before the
// data exchange (so the job survives it). Cost: one extra small allgather
// per collective (a few microseconds on shared memory, measured in
// mpi_comm_mpitest's DescriptorOverhead), none for send/recv. send also sends
// a header (dtype and shape) that recv checks.
//
// Results: all_reduce and reduce_scatter use MPI_SUM on the storage type
// (fp32 / fp64) and then round to the dtype, as ThreadComm; the summation
// order is MPI's (OpenMPI gives every member the same bits, but the bits may
// differ from ThreadComm's member-order sum when the sum is inexact).
//
// send is buffered as ThreadComm's (MPI_Isend of a private copy, never
// blocks; completed sends are reaped on later calls, the rest when the comm
// is destroyed).
//
// Faults: abort(reason) prints "paritron: rank R aborting: reason" to stderr
// and calls MPI_Abort (mpirun then kills every rank; exit code 1). A watchdog
// thread MPI_Aborts the job (exit code 3) with a message naming the rank, the
// op and the group when a call has not finished within timeout(): MPI cannot
// tell which members are missing, so the message names the waiting rank. It
// needs MPI_THREAD_MULTIPLE (OpenMPI 4.1 provides it; with less the watchdog
// is off and a warning is printed).
#pragma once

#include <mpi.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "optimized/comm/comm.h"

namespace paritron::opt {

// True when this process was started by mpirun (OMPI_COMM_WORLD_SIZE set).
bool mpi_launched();

// MPI_Init_thread (asking for MPI_THREAD_MULTIPLE) in the constructor,
// MPI_Finalize in the destructor. Does nothing if MPI is already initialised.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  int thread_level() const { return provided_; }  // MPI_THREAD_*

 private:
  bool owner_ = false;
  int provided_ = 0;
};

class MpiComm final : public Comm {
 public:
  MpiComm();  // over MPI_COMM_WORLD; MPI must be initialised
  ~MpiComm() override;
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  int64_t rank() const override { return rank_; }
  int64_t world_size() const override { return size_; }
  std::string_view name() const override { return "mpi"; }

  void all_reduce(DTensor& t, const Group& g) override;
  void all_gather(const DTensor& in, DTensor& out, const Group& g) override;
  void reduce_scatter(const DTensor& in, DTensor& out, const Group& g) override;
  void all_to_all_v(const DTensor& in, std::span<const int64_t> send_rows, DTensor& out,
                    std::span<const int64_t> recv_rows, const Group& g) override;
  std::vector<int64_t> all_gather_ints(std::span<const int64_t> values, const Group& g) override;
  void broadcast(DTensor& t, int64_t root_index, const Group& g) override;
  void send(const DTensor& t, int64_t dst_rank, int64_t tag) override;
  void recv(DTensor& t, int64_t src_rank, int64_t tag) override;
  void barrier(const Group& g) override;
  [[noreturn]] void abort(const std::string& reason) override;

  bool watchdog_enabled() const { return watchdog_.joinable(); }

 private:
  class Guard;
  struct PendingSend;
  MPI_Comm comm_for(const Group& g, std::string_view op);
  void reap_sends(bool wait);
  void watch();

  int64_t rank_ = 0, size_ = 1;
  MPI_Comm world_ = MPI_COMM_NULL;                  // our copy of MPI_COMM_WORLD (also in comms_)
  std::map<std::vector<int64_t>, MPI_Comm> comms_;  // by member list
  std::vector<std::unique_ptr<PendingSend>> sends_;

  // Watchdog: the call in progress and its deadline.
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool active_ = false;
  std::string active_op_;
  std::chrono::steady_clock::time_point deadline_;
  std::thread watchdog_;
};

// Runs body on this process's rank with an MpiComm (timeout set); an
// exception escaping body aborts the job (MpiComm::abort with its message).
void run_on_mpi(const std::function<void(Comm&)>& body,
                std::chrono::milliseconds timeout = std::chrono::seconds(120));

}  // namespace paritron::opt
