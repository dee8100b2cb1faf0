// NcclComm: one process per GPU, collectives with NCCL, bootstrap and
// control over MPI (optimized/comm/comm.h is the contract; issue #7).
// Compiled only when CMake finds NCCL and MPI (PARITRON_HAVE_NCCL and
// PARITRON_HAVE_MPI); nccl_usable() exists in every build.
//
//   int main(int argc, char** argv) {
//     paritron::opt::MpiSession mpi(&argc, &argv);      // optimized/comm/mpi_comm.h
//     paritron::opt::run_on_nccl([](Comm& comm) {
//       cuda::CudaBackend be;   // after the comm: it uses the comm's device (cudaSetDevice)
//       ...
//     });
//   }
//
// Bootstrap: every rank of MPI_COMM_WORLD constructs one NcclComm (world-
// collective). Device = local rank (MPI_COMM_TYPE_SHARED) % device count,
// made current on the constructing thread; rank 0 makes an ncclUniqueId,
// MPI_Bcast sends it, ncclCommInitRankConfig creates the world communicator
// NON-BLOCKING (config.blocking = 0), so that every wait can time out.
//
// Groups: a group's NCCL communicator is created on first use and cached by
// member list, with the group index as NCCL rank (group-rank order is NCCL
// rank order). First use is collective over the group's members only, as
// every comm call: the group's first member makes an ncclUniqueId, sends it
// in the call-descriptor answer below, and the members run
// ncclCommInitRankConfig. ncclCommSplit is collective over the whole parent
// communicator (every world rank must call it), which a lazily created group
// cannot promise, so it is offered as split_groups(): a world-collective
// call that creates the groups it is given with ncclCommSplit of the world
// communicator (color = the group's smallest rank, key = its group index),
// resource-cheaper than separate inits.
//
// Mismatch detection, as MpiComm: before every collective the members send
// their call descriptors (op, group, dtypes, shapes, row counts, and their
// member list) over MPI to the group's first member, which checks them with
// check_calls and answers every member with the verdict: every member throws
// the same CommError as ThreadComm's, before NCCL sees the call, and the comm
// stays usable. all_gather_ints and barrier are this exchange alone (MPI).
//
// Streams: collectives run on cuda::current_stream() (the thread's last
// CudaBackend; a stream of the comm's own when there is none), which must be
// on the comm's device. A collective first waits for the stream (the
// caller's queued work is not the collective's: it does not count against
// the timeout), queues the NCCL call (and its conversion kernels) and waits
// until they are done, so it returns with its result in place.
//
// Results: all_reduce / reduce_scatter of 16-bit dtypes (2-byte storage)
// widen to an fp32 scratch buffer, sum with NCCL in fp32 (ncclFloat32,
// ncclSum) and round once (RNE) back to the dtype, as the contract says (NCCL
// summing bf16 itself would round after every step); F32 / F64 / I32 / I64
// sum natively (a dtype narrower than an f32 / f64 storage is rounded after).
// NCCL's summation order is not member order: the bits may differ from
// ThreadComm's when the sum is inexact, but every member gets the same bits.
//
// send / recv: buffered and tag-matched as ThreadComm's and MpiComm's, via
// MPI with host staging (the payload is copied to the host, MPI_Isend of a
// private copy; never blocks). NCCL's ncclSend/ncclRecv are not used for
// them: they have no tags and no buffering (a send completes only when the
// peer receives, ops on one communicator run in issue order), so a schedule
// in which ranks send before they receive (Paritron's interleaved and 1F1B
// pipelines, optimized/model/pipeline.cpp) would deadlock. recv checks dtype
// and shape against a header, as MpiComm.
//
// Errors and faults: every NCCL call is checked (ncclGetErrorString and
// ncclGetLastError, naming the call, the op, the group and the shapes); every
// CUDA call too. A wait (descriptor exchange, NCCL completion, communicator
// creation) that exceeds timeout() polls ncclCommGetAsyncError and
// cudaStreamQuery until then, then calls ncclCommAbort on every
// communicator and throws CommError naming the op, the group and the timeout
// (the root of an exchange names the ranks that did not arrive) — never a
// hang. An NCCL or CUDA failure during a collective aborts the communicators
// the same way. After that the comm is unusable: later calls throw at once,
// naming the first failure. A recv that times out (nothing sent) leaves the
// comm usable. abort(reason) prints "paritron: rank R aborting: reason",
// aborts every NCCL communicator, then MPI_Abort (as MpiComm).
//
// Threading: one thread per process makes the comm calls. MPI is used from
// that thread only (MPI_THREAD_FUNNELED suffices).
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#if defined(PARITRON_HAVE_MPI)
#include <mpi.h>
#endif

#include "optimized/comm/comm.h"
#include "optimized/comm/run_ranks.h"

namespace paritron::opt {

// Whether an NcclComm can be made here: built with NCCL and MPI, a CUDA
// device usable, NCCL loadable, MPI initialised. When not, *why says why.
bool nccl_usable(std::string* why = nullptr);

#if defined(PARITRON_HAVE_MPI)

namespace comm_detail {
struct CallDesc;
}

namespace nccl_detail {

// NcclComm's control plane over MPI, which needs no GPU (compiled with MPI
// alone, so nccl_comm_mpitest exercises it on CPU-only machines): the
// call-descriptor exchange (mismatch detection, all_gather_ints, barrier,
// the unique ids of new communicators) and the buffered, tag-matched
// messages of send / recv. Every wait polls against timeout(); a wait that
// expires, or a broken protocol, calls `fatal` (which must throw; NcclComm's
// aborts its communicators first).
class MpiControl {
 public:
  using UniqueId = std::array<std::byte, 128>;  // ncclUniqueId's bytes
  using Fatal = std::function<void(const std::string& message)>;

  // Collective over MPI_COMM_WORLD (two MPI_Comm_dup); MPI must be initialised.
  MpiControl(std::function<std::chrono::milliseconds()> timeout, Fatal fatal);
  ~MpiControl();  // waits for pending sends (at most the timeout)
  MpiControl(const MpiControl&) = delete;
  MpiControl& operator=(const MpiControl&) = delete;

  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  MPI_Comm world() const { return mpi_; }  // a private copy of MPI_COMM_WORLD

  struct Agreed {
    std::vector<int64_t> ints;    // every member's ints, in member order
    std::optional<UniqueId> id;   // when the call asked for one
  };
  // Every member sends its call (and ints) to the group's first member, which
  // checks them (comm_detail::check_calls with can_sum) and answers
  // every member: on disagreement every member throws the same CommError
  // and the exchange stays usable. `needs_id`: this member has no
  // communicator for the group yet and the call needs one; the members must
  // agree on it, and the first member then makes one with make_id (which
  // returns "" or an error text, thrown on every member) and sends it along.
  // A group of one checks its call alone.
  Agreed agree(const comm_detail::CallDesc& mine, const Group& g, std::span<const int64_t> ints, bool needs_id,
               const std::function<std::string(UniqueId&)>& make_id, const std::function<bool(DType)>& can_sum,
               const std::string& context);

  // Buffered: MPI_Isend of the header words and the payload bytes (kept
  // until sent); never blocks.
  void send(std::vector<int64_t> header, std::vector<std::byte> payload, int64_t dst, int64_t tag,
            const std::string& where);
  // The next message from (src, tag): false when none arrived within the
  // timeout (nothing consumed).
  bool recv(int64_t src, int64_t tag, std::vector<int64_t>& header, std::vector<std::byte>& payload,
            const std::string& where);
  // Drops completed sends.
  void reap_sends();

 private:
  struct PendingSend;
  void post(PendingSend&& s, int dst, int tag, MPI_Comm c, const std::string& where);
  bool reap(bool wait_all);

  std::function<std::chrono::milliseconds()> timeout_;
  Fatal fatal_;
  int64_t rank_ = 0, size_ = 1;
  MPI_Comm mpi_ = MPI_COMM_NULL;  // descriptor exchange
  MPI_Comm p2p_ = MPI_COMM_NULL;  // send / recv (user tags)
  std::list<PendingSend> sends_;
};

}  // namespace nccl_detail

#endif  // PARITRON_HAVE_MPI

#if defined(PARITRON_HAVE_NCCL) && defined(PARITRON_HAVE_MPI)

class NcclComm final : public Comm {
 public:
  // World-collective (see above). MPI must be initialised (MpiSession).
  // Waits at most `timeout` for the world communicator, and sets timeout().
  explicit NcclComm(std::chrono::milliseconds timeout = kDefaultCommTimeout);
  ~NcclComm() override;
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int64_t rank() const override;
  int64_t world_size() const override;
  std::string_view name() const override { return "nccl"; }

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

  // World-collective: every rank passes its groups of the same kinds in the
  // same order (e.g. make_group(pc, kind, rank) for a list of kinds); a rank
  // that is not a member of its group of a kind (index -1, the embedding
  // group of a middle stage) takes part without joining. Each group not yet
  // created becomes an ncclCommSplit of the world communicator. Checks first
  // (over MPI) that the ranks passed the same number of groups and that the
  // members of each group list the same members.
  void split_groups(const std::vector<Group>& groups);

  // The CUDA device this rank uses.
  int device() const;
  // Whether a communicator for this member list exists (tests).
  bool has_communicator(const std::vector<int64_t>& members) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Runs body on this process's rank with an NcclComm (timeout set); an
// exception escaping body aborts the job (NcclComm::abort with its message).
void run_on_nccl(const std::function<void(Comm&)>& body, std::chrono::milliseconds timeout = kDefaultCommTimeout);

#endif

}  // namespace paritron::opt
