// Comm: the collective interface the optimized model is written against
// (design.md, principles 4 and 5; issue #5 "Comm backends"). Implementations:
//   ThreadComm (optimized/comm/thread_comm.h)  in-process ranks, a thread each
//   MpiComm    (optimized/comm/mpi_comm.h)     one rank per process, OpenMPI
//   device-local (optimized/comm/device_local_comm.h) several ranks on one GPU, a thread each
//   NcclComm   (optimized/comm/nccl_comm.h)    one GPU per process, NCCL bootstrapped over MPI
//
// Groups are built from common/parallel_config.h's group_members, i.e. in the
// order of Megatron's initialize_model_parallel; a rank's index in
// Group::ranks is its group rank. Tensors exchanged are DTensors of the
// backend the comm was made for; concatenation is along dimension 0 (as
// Megatron's _gather_along_first_dim / _reduce_scatter_along_first_dim), in
// group-rank order.
//
// Errors (design.md principle 7): every member of a collective must call it
// with the same operation, group, dtype and sizes; a mismatch is detected
// and reported on every member ("all_reduce on group tp [0, 1]: rank 1 passed
// bf16[4, 8], rank 0 f32[4, 8]"). A rank that fails calls abort() (the
// runners do it for any exception), which makes every rank's pending and
// future comm calls throw CommAborted naming the failed rank and its error.
// A collective that does not complete within the timeout throws on the
// ranks that wait, naming the operation, the group and the missing ranks —
// never a hang.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/error.h"
#include "optimized/tensor.h"

namespace paritron::opt {

struct Group {
  std::string name;               // "tp", "cp", "dp", "dp_cp", "pp", "ep", "tp_ep", "edp", "world"
  std::vector<int64_t> ranks;     // global ranks in group-rank order
  int64_t index = 0;              // this rank's position in `ranks`
  int64_t size() const { return static_cast<int64_t>(ranks.size()); }
  std::string describe() const;   // "tp [0, 1]"
};

// Thrown by comm calls after some rank aborted the run, and by a rank that
// timed out waiting.
class CommError : public Error {
 public:
  using Error::Error;
};

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;
  virtual std::string_view name() const = 0;  // "threads", "mpi", "device-threads", "nccl"

  // Sum over the group, in place, in fp32 (fp64 for F64 storage) with the
  // result rounded to t's dtype. Every member gets identical bits.
  virtual void all_reduce(DTensor& t, const Group& g) = 0;
  // out [g.size() * in.size(0), ...] = the members' `in` concatenated along dim 0.
  virtual void all_gather(const DTensor& in, DTensor& out, const Group& g) = 0;
  // out [in.size(0) / g.size(), ...] = this member's dim-0 block of the sum of the members' `in`.
  virtual void reduce_scatter(const DTensor& in, DTensor& out, const Group& g) = 0;
  // Sends rows send_rows[j] (consecutive blocks of `in`, in member order) to
  // member j and receives recv_rows[j] rows from member j into consecutive
  // blocks of `out`. Row = dim-0 slice; every member's row width must agree.
  virtual void all_to_all_v(const DTensor& in, std::span<const int64_t> send_rows, DTensor& out,
                            std::span<const int64_t> recv_rows, const Group& g) = 0;
  // Small host metadata: every member's `values` (equal lengths), concatenated in member order.
  virtual std::vector<int64_t> all_gather_ints(std::span<const int64_t> values, const Group& g) = 0;
  virtual void broadcast(DTensor& t, int64_t root_index, const Group& g) = 0;
  // Point to point (pipeline stages). Matched by (source, destination, tag)
  // in order; the receiver's tensor must have the sender's dtype and shape.
  virtual void send(const DTensor& t, int64_t dst_rank, int64_t tag) = 0;
  virtual void recv(DTensor& t, int64_t src_rank, int64_t tag) = 0;
  virtual void barrier(const Group& g) = 0;

  // This rank failed with `reason`: every rank's comm calls throw CommError
  // naming this rank and the reason (MPI: the job is aborted).
  virtual void abort(const std::string& reason) = 0;

  // How long a collective waits for its peers before throwing.
  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }
  std::chrono::milliseconds timeout() const { return timeout_; }

 protected:
  std::chrono::milliseconds timeout_{std::chrono::seconds(120)};
};

// The group of every rank (all_gather of results, barriers).
Group world_group(int64_t world_size, int64_t rank);

}  // namespace paritron::opt
