#include "optimized/comm/thread_comm.h"

#include <fmt/format.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <numeric>
#include <thread>
#include <tuple>

#include "common/math/float_format.h"
#include "optimized/comm/comm_util.h"
#include "optimized/comm/run_ranks.h"

namespace paritron::opt {

using namespace comm_detail;

// --- CommMemory: the host implementation -----------------------------------

void CommMemory::before_post(std::string_view) {}
void CommMemory::after_complete(std::string_view) {}
void CommMemory::copy(void* dst, const void* src, size_t bytes, std::string_view) { std::memcpy(dst, src, bytes); }
bool CommMemory::can_sum(DType storage) const { return summable(storage); }
void CommMemory::sum_members(const std::vector<const void*>& inputs, DType, DType storage,
                             const math::FloatFormat* round_to, int64_t begin, int64_t count, void* out,
                             std::string_view) {
  comm_detail::sum_members(inputs, storage, begin, count, out, round_to);
}
void CommMemory::to_host(void* host_dst, const void* src, size_t bytes, std::string_view) {
  std::memcpy(host_dst, src, bytes);
}
void CommMemory::from_host(void* dst, const void* host_src, size_t bytes, std::string_view) {
  std::memcpy(dst, host_src, bytes);
}


// What one member passed to a collective: its call and its buffers.
struct ThreadComm::Post : CallDesc {
  const void* in = nullptr;
  void* out = nullptr;
  std::vector<int64_t> ints;
};

struct ThreadComm::Rendezvous {
  std::vector<std::optional<Post>> posts;
  int64_t arrived = 0;
  bool complete = false;
  std::string error;  // set with complete when the members disagree
  int64_t done = 0;
  std::vector<int64_t> gave_up;  // members that timed out waiting and left: it can never complete
};

struct Message {
  DType dtype, storage;
  Shape shape;
  std::vector<std::byte> bytes;
};

struct ThreadWorld::State {
  mutable std::mutex mu;
  std::condition_variable cv;
  std::map<std::pair<std::vector<int64_t>, uint64_t>, std::shared_ptr<ThreadComm::Rendezvous>> rendezvous;
  std::map<std::tuple<int64_t, int64_t, int64_t>, std::deque<Message>> mail;
  std::optional<Failure> failure;
  std::vector<bool> retired;
};

ThreadWorld::ThreadWorld(int64_t world_size, const MemoryFactory& memory) : state_(std::make_unique<State>()) {
  if (world_size < 1) throw CommError(fmt::format("ThreadWorld: world size {} < 1", world_size));
  state_->retired.assign(static_cast<size_t>(world_size), false);
  for (int64_t r = 0; r < world_size; ++r) {
    std::unique_ptr<CommMemory> m = memory ? memory(r) : std::make_unique<CommMemory>();
    if (!m) throw CommError(fmt::format("ThreadWorld: the memory factory returned nothing for rank {}", r));
    comms_.push_back(std::unique_ptr<ThreadComm>(new ThreadComm(this, r, std::move(m))));
  }
}

ThreadWorld::~ThreadWorld() = default;

ThreadComm& ThreadWorld::comm(int64_t rank) {
  if (rank < 0 || rank >= size()) throw CommError(fmt::format("ThreadWorld: no rank {} in a world of {}", rank, size()));
  return *comms_[static_cast<size_t>(rank)];
}

void ThreadWorld::set_timeout(std::chrono::milliseconds t) {
  for (auto& c : comms_) c->set_timeout(t);
}

std::optional<ThreadWorld::Failure> ThreadWorld::failure() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->failure;
}

int64_t ThreadComm::world_size() const { return world_->size(); }

namespace {

std::string aborted_message(const ThreadWorld::Failure& f, int64_t rank, const std::string& context) {
  return fmt::format("rank {} failed: {} [rank {} in {}]", f.rank, f.reason, rank, context);
}

}  // namespace

// A member's view of a completed rendezvous; its destructor is the second
// rendezvous (waits until every member is done with the others' buffers).
// complete() waits for this member's queued work (CommMemory::after_complete)
// and reports its failure; without it (an exception unwinding) the destructor
// still waits for that work, ignoring errors, before it signals done.
class ThreadComm::Session {
 public:
  Session(ThreadWorld::State* st, CommMemory* memory, std::shared_ptr<Rendezvous> rv,
          std::pair<std::vector<int64_t>, uint64_t> key, std::string context)
      : st_(st), memory_(memory), rv_(std::move(rv)), key_(std::move(key)), context_(std::move(context)) {}
  Session(Session&&) = default;
  ~Session() {
    if (!rv_) return;
    if (!completed_) {
      try {
        memory_->after_complete(context_);
      } catch (...) {  // a destructor cannot throw; complete() is where failures are reported
      }
    }
    std::unique_lock<std::mutex> lock(st_->mu);
    const auto n = static_cast<int64_t>(rv_->posts.size());
    if (++rv_->done == n) {
      st_->rendezvous.erase(key_);
      st_->cv.notify_all();
    } else {
      // Every member has arrived and only copies memory now: this wait ends
      // without timeouts (a member leaving early would free buffers others read).
      st_->cv.wait(lock, [&] { return rv_->done == n; });
    }
  }
  const Post& post(int64_t i) const { return *rv_->posts[static_cast<size_t>(i)]; }
  const std::string& context() const { return context_; }
  void complete() {
    memory_->after_complete(context_);
    completed_ = true;
  }

 private:
  ThreadWorld::State* st_;
  CommMemory* memory_;
  std::shared_ptr<Rendezvous> rv_;
  std::pair<std::vector<int64_t>, uint64_t> key_;
  std::string context_;
  bool completed_ = false;
};

ThreadComm::Session ThreadComm::enter(const Group& g, Post post) {
  const std::string context = fmt::format("{} on group {}", post.op, g.describe());
  post.group_name = g.name;
  check_group(g, rank_, world_size(), post.op);
  memory_->before_post(context);
  ThreadWorld::State* st = world_->state_.get();
  const uint64_t seq = calls_[g.ranks]++;
  auto key = std::make_pair(g.ranks, seq);
  const auto n = g.size();
  const auto me = static_cast<size_t>(g.index);

  std::unique_lock<std::mutex> lock(st->mu);
  if (st->failure) throw CommError(aborted_message(*st->failure, rank_, context));
  auto& slot = st->rendezvous[key];
  if (!slot) {
    slot = std::make_shared<Rendezvous>();
    slot->posts.resize(static_cast<size_t>(n));
  }
  std::shared_ptr<Rendezvous> rv = slot;
  rv->posts[me] = std::move(post);
  if (++rv->arrived == n) {
    std::vector<const CallDesc*> calls;
    for (const auto& p : rv->posts) calls.push_back(&*p);
    rv->error = check_calls(calls, g, [this](DType d) { return memory_->can_sum(d); });
    rv->complete = true;
    st->cv.notify_all();
  } else {
    const auto deadline = std::chrono::steady_clock::now() + timeout();
    auto missing = [&] {
      std::vector<int64_t> m;
      for (size_t i = 0; i < rv->posts.size(); ++i) {
        if (!rv->posts[i]) m.push_back(g.ranks[i]);
      }
      return m;
    };
    auto withdraw = [&] {
      rv->posts[me].reset();
      // Kept while someone gave up, so that late members learn it at once.
      if (--rv->arrived == 0 && rv->gave_up.empty()) st->rendezvous.erase(key);
    };
    while (!rv->complete) {
      if (st->failure) {
        withdraw();
        throw CommError(aborted_message(*st->failure, rank_, context));
      }
      if (!rv->gave_up.empty()) {
        withdraw();
        throw CommError(fmt::format("{}: rank {} timed out waiting and left it (rank {} waited)", context,
                                    rv->gave_up.front(), rank_));
      }
      for (int64_t r : missing()) {
        if (st->retired[static_cast<size_t>(r)]) {
          withdraw();
          throw CommError(fmt::format("{}: rank {} finished without joining it (rank {} waited)", context, r, rank_));
        }
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        const auto m = missing();
        rv->gave_up.push_back(rank_);
        withdraw();
        st->cv.notify_all();
        const std::string who = m.size() == 1 ? fmt::format("rank {}", m[0]) : fmt::format("ranks [{}]", fmt::join(m, ", "));
        throw CommError(fmt::format("{}: rank {} timed out after {} ms waiting for {} (not arrived)", context, rank_,
                                    timeout().count(), who));
      }
      st->cv.wait_until(lock, deadline);
    }
  }
  lock.unlock();
  Session session(st, memory_.get(), rv, std::move(key), context);
  if (!rv->error.empty()) throw CommError(rv->error);  // the session's destructor still does the second rendezvous
  return session;
}

namespace {

// What a member posts for a collective reading `in` and writing `out`.
ThreadComm::Post in_out_post(const char* op, const DTensor& in, DTensor& out) {
  ThreadComm::Post p;
  static_cast<CallDesc&>(p) = tensor_call(op, in, &out);
  p.in = in.data();
  p.out = out.data();
  return p;
}

// ... and for one working in place on t.
ThreadComm::Post in_place_post(const char* op, DTensor& t) {
  ThreadComm::Post p;
  static_cast<CallDesc&>(p) = tensor_call(op, t, nullptr);
  p.in = t.data();
  p.out = t.data();
  return p;
}

}  // namespace

void ThreadComm::all_reduce(DTensor& t, const Group& g) {
  Post p = in_place_post("all_reduce", t);
  Session s = enter(g, std::move(p));
  const int64_t n = g.size(), me = g.index, numel = t.numel();
  const int64_t begin = numel * me / n, end = numel * (me + 1) / n;
  std::vector<const void*> inputs;
  for (int64_t i = 0; i < n; ++i) inputs.push_back(s.post(i).in);
  const size_t esize = dtype_size(t.storage_dtype());
  auto* mine = static_cast<std::byte*>(t.data()) + static_cast<size_t>(begin) * esize;
  memory_->sum_members(inputs, t.dtype(), t.storage_dtype(), rounding_format(t), begin, end - begin, mine,
                       s.context());
  for (int64_t i = 0; i < n; ++i) {
    auto* dst = static_cast<std::byte*>(s.post(i).out) + static_cast<size_t>(begin) * esize;
    if (i != me && dst != mine) memory_->copy(dst, mine, static_cast<size_t>(end - begin) * esize, s.context());
  }
  s.complete();
}

void ThreadComm::all_gather(const DTensor& in, DTensor& out, const Group& g) {
  Post p = in_out_post("all_gather", in, out);
  Session s = enter(g, std::move(p));
  const size_t bytes = in.nbytes();
  for (int64_t i = 0; i < g.size(); ++i) {
    auto* dst = static_cast<std::byte*>(out.data()) + static_cast<size_t>(i) * bytes;
    if (dst != s.post(i).in) memory_->copy(dst, s.post(i).in, bytes, s.context());
  }
  s.complete();
}

void ThreadComm::reduce_scatter(const DTensor& in, DTensor& out, const Group& g) {
  Post p = in_out_post("reduce_scatter", in, out);
  Session s = enter(g, std::move(p));
  const int64_t block = out.numel();
  std::vector<const void*> inputs;
  for (int64_t i = 0; i < g.size(); ++i) inputs.push_back(s.post(i).in);
  memory_->sum_members(inputs, in.dtype(), in.storage_dtype(), rounding_format(in), block * g.index, block, out.data(),
                       s.context());
  s.complete();
}

void ThreadComm::all_to_all_v(const DTensor& in, std::span<const int64_t> send_rows, DTensor& out,
                              std::span<const int64_t> recv_rows, const Group& g) {
  Post p = in_out_post("all_to_all_v", in, out);
  p.send_rows.assign(send_rows.begin(), send_rows.end());
  p.recv_rows.assign(recv_rows.begin(), recv_rows.end());
  Session s = enter(g, std::move(p));
  const size_t row_bytes = static_cast<size_t>(row_width(in)) * dtype_size(in.storage_dtype());
  const auto me = static_cast<size_t>(g.index);
  size_t out_row = 0;
  for (int64_t j = 0; j < g.size(); ++j) {
    const Post& pj = s.post(j);
    const int64_t src_row = std::accumulate(pj.send_rows.begin(), pj.send_rows.begin() + static_cast<ptrdiff_t>(me),
                                            int64_t{0});
    const auto count = static_cast<size_t>(pj.send_rows[me]);
    if (count > 0) {
      memory_->copy(static_cast<std::byte*>(out.data()) + out_row * row_bytes,
                    static_cast<const std::byte*>(pj.in) + static_cast<size_t>(src_row) * row_bytes, count * row_bytes,
                    s.context());
    }
    out_row += count;
  }
  s.complete();
}

std::vector<int64_t> ThreadComm::all_gather_ints(std::span<const int64_t> values, const Group& g) {
  Post p;
  p.op = "all_gather_ints";
  p.ints.assign(values.begin(), values.end());
  p.num_ints = static_cast<int64_t>(values.size());
  Session s = enter(g, std::move(p));
  std::vector<int64_t> out;
  out.reserve(values.size() * static_cast<size_t>(g.size()));
  for (int64_t i = 0; i < g.size(); ++i) out.insert(out.end(), s.post(i).ints.begin(), s.post(i).ints.end());
  s.complete();
  return out;
}

void ThreadComm::broadcast(DTensor& t, int64_t root_index, const Group& g) {
  Post p = in_place_post("broadcast", t);
  p.root = root_index;
  Session s = enter(g, std::move(p));
  if (g.index != root_index && s.post(root_index).in != t.data()) {
    memory_->copy(t.data(), s.post(root_index).in, t.nbytes(), s.context());
  }
  s.complete();
}

void ThreadComm::barrier(const Group& g) {
  Post p;
  p.op = "barrier";
  Session s = enter(g, std::move(p));
  s.complete();
}

void ThreadComm::send(const DTensor& t, int64_t dst_rank, int64_t tag) {
  const std::string context = fmt::format("send to rank {} tag {}", dst_rank, tag);
  if (dst_rank < 0 || dst_rank >= world_size()) {
    throw CommError(fmt::format("{}: no rank {} in a world of {}", context, dst_rank, world_size()));
  }
  Message m{t.dtype(), t.storage_dtype(), t.shape(), std::vector<std::byte>(t.nbytes())};
  if (t.nbytes() > 0) memory_->to_host(m.bytes.data(), t.data(), t.nbytes(), context);
  ThreadWorld::State* st = world_->state_.get();
  std::lock_guard<std::mutex> lock(st->mu);
  if (st->failure) throw CommError(aborted_message(*st->failure, rank_, context));
  st->mail[{rank_, dst_rank, tag}].push_back(std::move(m));
  st->cv.notify_all();
}

void ThreadComm::recv(DTensor& t, int64_t src_rank, int64_t tag) {
  const std::string context = fmt::format("recv from rank {} tag {}", src_rank, tag);
  if (src_rank < 0 || src_rank >= world_size()) {
    throw CommError(fmt::format("{}: no rank {} in a world of {}", context, src_rank, world_size()));
  }
  ThreadWorld::State* st = world_->state_.get();
  const auto key = std::make_tuple(src_rank, rank_, tag);
  const auto deadline = std::chrono::steady_clock::now() + timeout();
  std::unique_lock<std::mutex> lock(st->mu);
  for (;;) {
    if (st->failure) throw CommError(aborted_message(*st->failure, rank_, context));
    auto it = st->mail.find(key);
    if (it != st->mail.end() && !it->second.empty()) {
      Message m = std::move(it->second.front());
      it->second.pop_front();
      if (it->second.empty()) st->mail.erase(it);
      lock.unlock();
      if (m.dtype != t.dtype() || m.storage != t.storage_dtype() || m.shape != t.shape()) {
        std::string sent = fmt::format("{}{}", dtype_name(m.dtype), shape_string(m.shape));
        if (m.storage != m.dtype) sent += fmt::format(" (storage {})", dtype_name(m.storage));
        throw CommError(fmt::format("{} on rank {}: rank {} sent {}, the receiving tensor is {}", context, rank_,
                                    src_rank, sent, t.describe()));
      }
      if (!m.bytes.empty()) memory_->from_host(t.data(), m.bytes.data(), m.bytes.size(), context);
      return;
    }
    if (st->retired[static_cast<size_t>(src_rank)]) {
      throw CommError(fmt::format("{} on rank {}: rank {} finished without sending it", context, rank_, src_rank));
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      throw CommError(fmt::format("{} on rank {}: timed out after {} ms, rank {} has not sent it", context, rank_,
                                  timeout().count(), src_rank));
    }
    st->cv.wait_until(lock, deadline);
  }
}

void ThreadComm::abort(const std::string& reason) {
  ThreadWorld::State* st = world_->state_.get();
  std::lock_guard<std::mutex> lock(st->mu);
  if (!st->failure) st->failure = ThreadWorld::Failure{rank_, reason};
  st->cv.notify_all();
}

void ThreadComm::retire() {
  ThreadWorld::State* st = world_->state_.get();
  std::lock_guard<std::mutex> lock(st->mu);
  st->retired[static_cast<size_t>(rank_)] = true;
  st->cv.notify_all();
}

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

void run_on_world(ThreadWorld& world, const std::function<void(Comm&)>& body) {
  const int64_t world_size = world.size();
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
