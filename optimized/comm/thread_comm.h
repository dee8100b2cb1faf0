// ThreadComm: in-process ranks, one thread each, over shared memory
// (optimized/comm/comm.h is the contract).
//
// A ThreadWorld owns the shared state and one ThreadComm per rank; rank r's
// thread uses world.comm(r) only. Collectives rendezvous per (group member
// list, call number on that group): each member posts its operation, dtypes,
// shapes and buffer pointers; the last one to arrive checks that every member
// called the same operation on the same group with the same dtype and
// compatible sizes (else every member throws the same CommError listing each
// rank's call), then each member does its part reading the others' buffers
// directly (all_reduce / reduce_scatter: member i sums element block i over
// the members in group order, so every member gets identical bits), and a
// second rendezvous keeps every buffer alive until all are done.
//
// Buffers: a collective's output must not overlap another member's input
// (in-place all_reduce and broadcast are fine; reduce_scatter's out may only
// overlap this member's own block of in).
//
// send is buffered (copies into a mailbox keyed by (src, dst, tag), FIFO) and
// never blocks; recv waits for the message and checks dtype and shape.
//
// Faults: abort(reason) records the first failing rank and reason and wakes
// everyone; every pending and later call then throws CommError("rank R
// failed: reason [rank S in <op> on group g]"). A member that waits longer
// than timeout() throws CommError naming the op, the group and the ranks that
// have not arrived. retire() marks a rank whose body has finished: peers that
// wait for it (a collective it will never join, a recv from it with an empty
// mailbox) fail at once instead of waiting for the timeout.
//
// Memory: the ranks' data moves through a CommMemory (below): host memcpy and
// host sums by default (name() "threads"); the device-local comm
// (optimized/comm/device_local_comm.h) plugs in device copies and reduction
// kernels on each rank's stream (name() "device-threads") and keeps every
// rule above (rendezvous, checks, messages, aborts, timeouts, retire).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "optimized/comm/comm.h"

namespace paritron::math {
struct FloatFormat;
}

namespace paritron::opt {

// How a ThreadWorld's ranks move and sum data. The base class is the host
// implementation (memcpy, host sums): ThreadComm's behaviour. Each rank has
// its own instance, called only from that rank's thread; `context` names the
// call for error messages ("all_reduce on group tp [0, 1]").
//
// A collective, for an implementation that works asynchronously (a device
// stream): before_post; then, once every member posted, the member's copies
// and sums, which may be queued; then after_complete, which returns only
// once they are done, because the peers then reuse the buffers this member
// read and read what it wrote.
class CommMemory {
 public:
  virtual ~CommMemory() = default;
  // The comm's name().
  virtual std::string_view name() const { return "threads"; }
  // Before this rank posts a collective: its inputs must be ready for the
  // peers to read once it returns (a device waits for its stream).
  virtual void before_post(std::string_view context);
  // After this rank issued its part and before it signals it is done.
  virtual void after_complete(std::string_view context);
  // bytes from src to dst (either may be another rank's buffer).
  virtual void copy(void* dst, const void* src, size_t bytes, std::string_view context);
  // Whether sum_members can sum elements stored as `storage`.
  virtual bool can_sum(DType storage) const;
  // out[i] = inputs[0][begin + i] + inputs[1][begin + i] + ... (that order) in
  // fp32 (double for F64 storage, exact for integers), rounded once to
  // `round_to` when it is not null (a dtype narrower than the storage) and
  // stored as `storage` (which rounds to a 16-bit storage). out may alias
  // inputs[k] + begin.
  virtual void sum_members(const std::vector<const void*>& inputs, DType dtype, DType storage,
                           const math::FloatFormat* round_to, int64_t begin, int64_t count, void* out,
                           std::string_view context);
  // send / recv staging between this memory and host memory.
  virtual void to_host(void* host_dst, const void* src, size_t bytes, std::string_view context);
  virtual void from_host(void* dst, const void* host_src, size_t bytes, std::string_view context);
};

class ThreadWorld;

class ThreadComm final : public Comm {
 public:
  int64_t rank() const override { return rank_; }
  int64_t world_size() const override;
  std::string_view name() const override { return memory_->name(); }

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
  void abort(const std::string& reason) override;

  // This rank will make no more comm calls (its body returned).
  void retire();

  struct Post;        // implementation (thread_comm.cpp)
  struct Rendezvous;

 private:
  friend class ThreadWorld;
  class Session;
  ThreadComm(ThreadWorld* world, int64_t rank, std::unique_ptr<CommMemory> memory)
      : world_(world), rank_(rank), memory_(std::move(memory)) {}
  Session enter(const Group& g, Post post);

  ThreadWorld* world_;
  int64_t rank_;
  std::unique_ptr<CommMemory> memory_;
  std::map<std::vector<int64_t>, uint64_t> calls_;  // collectives issued per member list
};

class ThreadWorld {
 public:
  // Makes rank r's CommMemory (called once per rank, on the constructing thread).
  using MemoryFactory = std::function<std::unique_ptr<CommMemory>(int64_t rank)>;
  // An empty factory: host memory (plain ThreadComm).
  explicit ThreadWorld(int64_t world_size, const MemoryFactory& memory = {});
  ~ThreadWorld();
  ThreadWorld(const ThreadWorld&) = delete;
  ThreadWorld& operator=(const ThreadWorld&) = delete;

  int64_t size() const { return static_cast<int64_t>(comms_.size()); }
  ThreadComm& comm(int64_t rank);
  void set_timeout(std::chrono::milliseconds t);  // on every rank's comm

  struct Failure {
    int64_t rank = -1;
    std::string reason;
  };
  // The first abort (rank and reason), if any.
  std::optional<Failure> failure() const;

 private:
  friend class ThreadComm;
  struct State;
  std::unique_ptr<State> state_;
  std::vector<std::unique_ptr<ThreadComm>> comms_;
};

// run_on_threads (optimized/comm/run_ranks.h) on a world made by the caller
// (another CommMemory, per-rank settings): a thread per rank runs
// body(world.comm(r)); an exception escaping a body aborts that rank's comm, a
// body that returns retires its rank; after joining every thread the first
// failure is rethrown as RankFailed ("rank R failed: <its message>").
void run_on_world(ThreadWorld& world, const std::function<void(Comm&)>& body);

}  // namespace paritron::opt
