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
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "optimized/comm/comm.h"

namespace paritron::opt {

class ThreadWorld;

class ThreadComm final : public Comm {
 public:
  int64_t rank() const override { return rank_; }
  int64_t world_size() const override;
  std::string_view name() const override { return "threads"; }

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
  ThreadComm(ThreadWorld* world, int64_t rank) : world_(world), rank_(rank) {}
  Session enter(const Group& g, Post post);

  ThreadWorld* world_;
  int64_t rank_;
  std::map<std::vector<int64_t>, uint64_t> calls_;  // collectives issued per member list
};

class ThreadWorld {
 public:
  explicit ThreadWorld(int64_t world_size);
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

}  // namespace paritron::opt
