// See nccl_comm.h. The control plane (nccl_detail::MpiControl) is compiled
// with MPI alone, NcclComm with NCCL and MPI, nccl_usable() always (a
// CPU-only build globs this file too).
#include "optimized/comm/nccl_comm.h"

#include <string>

#if defined(PARITRON_HAVE_MPI)

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <thread>

#include "optimized/comm/comm_util.h"
#include "optimized/comm/thread_comm.h"

namespace paritron::opt {

using namespace comm_detail;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kAgreeTag = 101;                   // member -> group root: its call
constexpr int kReplyTag = 102;                   // group root -> member: the verdict
constexpr int64_t kMagic = 0x6e6f72746972'6170;  // "paritron"
constexpr size_t kIdWords = sizeof(nccl_detail::MpiControl::UniqueId) / 8;

constexpr std::string_view kOps[] = {"all_reduce",      "all_gather", "reduce_scatter", "all_to_all_v",
                                     "all_gather_ints", "broadcast",  "barrier"};

void check_mpi(int rc, std::string_view context) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw CommError(fmt::format("{}: MPI error: {}", context, std::string_view(text, static_cast<size_t>(len))));
}

int to_int(int64_t n, std::string_view context) {
  if (n < 0 || n > INT_MAX) throw CommError(fmt::format("{}: count {} does not fit MPI's int", context, n));
  return static_cast<int>(n);
}

// Polling: yield for the first ~thousand rounds (a collective's partners are
// usually microseconds away), then sleep 50 us per round.
class Backoff {
 public:
  void pause() {
    if (++rounds_ < 1000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  int rounds_ = 0;
};

// Messages are int64 words.
struct Writer {
  std::vector<int64_t> w;
  void put(int64_t x) { w.push_back(x); }
  void list(std::span<const int64_t> v) {
    w.push_back(static_cast<int64_t>(v.size()));
    w.insert(w.end(), v.begin(), v.end());
  }
  void text(std::string_view s) {
    w.push_back(static_cast<int64_t>(s.size()));
    const size_t at = w.size();
    w.resize(at + (s.size() + 7) / 8, 0);
    if (!s.empty()) std::memcpy(w.data() + at, s.data(), s.size());
  }
};

// Reads what a Writer wrote; `ok` turns false (and reads give 0 / empty) on
// a short or malformed message.
struct Reader {
  const std::vector<int64_t>& w;
  size_t i = 0;
  bool ok = true;
  int64_t get() {
    if (i >= w.size()) {
      ok = false;
      return 0;
    }
    return w[i++];
  }
  std::vector<int64_t> list() {
    const int64_t n = get();
    if (!ok || n < 0 || static_cast<uint64_t>(n) > w.size() - i) {
      ok = false;
      return {};
    }
    std::vector<int64_t> v(w.begin() + static_cast<ptrdiff_t>(i), w.begin() + static_cast<ptrdiff_t>(i) + n);
    i += static_cast<size_t>(n);
    return v;
  }
  std::string text() {
    const int64_t n = get();
    if (!ok || n < 0 || (static_cast<uint64_t>(n) + 7) / 8 > w.size() - i) {
      ok = false;
      return {};
    }
    std::string s(static_cast<size_t>(n), '\0');
    if (n > 0) std::memcpy(s.data(), w.data() + i, static_cast<size_t>(n));
    i += (static_cast<size_t>(n) + 7) / 8;
    return s;
  }
};

void encode(Writer& out, const CallDesc& d) {
  int64_t op = -1;
  for (size_t i = 0; i < std::size(kOps); ++i) {
    if (kOps[i] == d.op) op = static_cast<int64_t>(i);
  }
  out.put(op);
  out.text(d.group_name);
  out.put(d.has_in);
  out.put(d.has_out);
  out.put(static_cast<int64_t>(d.dtype));
  out.put(static_cast<int64_t>(d.storage));
  out.put(static_cast<int64_t>(d.out_dtype));
  out.put(static_cast<int64_t>(d.out_storage));
  out.put(d.root);
  out.put(d.num_ints);
  out.list(d.in_shape);
  out.list(d.out_shape);
  out.list(d.send_rows);
  out.list(d.recv_rows);
}

std::optional<CallDesc> decode(Reader& in) {
  CallDesc d;
  const int64_t op = in.get();
  if (op < 0 || op >= static_cast<int64_t>(std::size(kOps))) return std::nullopt;
  d.op = kOps[op];
  d.group_name = in.text();
  d.has_in = in.get() != 0;
  d.has_out = in.get() != 0;
  auto dtype = [&] {
    const int64_t x = in.get();
    if (x < 0 || x > static_cast<int64_t>(DType::BOOL)) in.ok = false;
    return static_cast<DType>(in.ok ? x : 0);
  };
  d.dtype = dtype();
  d.storage = dtype();
  d.out_dtype = dtype();
  d.out_storage = dtype();
  d.root = in.get();
  d.num_ints = in.get();
  d.in_shape = in.list();
  d.out_shape = in.list();
  d.send_rows = in.list();
  d.recv_rows = in.list();
  if (!in.ok) return std::nullopt;
  return d;
}

std::string rank_list(const std::vector<int64_t>& ranks) {
  return ranks.size() == 1 ? fmt::format("rank {}", ranks[0]) : fmt::format("ranks [{}]", fmt::join(ranks, ", "));
}

// One message from (src, tag) of any length, if one is there.
template <class T>
bool try_recv(int src, int tag, MPI_Comm c, MPI_Datatype type, std::vector<T>& out, std::string_view where) {
  int flag = 0;
  MPI_Message msg = MPI_MESSAGE_NULL;
  MPI_Status status;
  check_mpi(MPI_Improbe(src, tag, c, &flag, &msg, &status), where);
  if (!flag) return false;
  int count = 0;
  check_mpi(MPI_Get_count(&status, type, &count), where);
  out.resize(static_cast<size_t>(count));
  check_mpi(MPI_Mrecv(out.data(), count, type, &msg, MPI_STATUS_IGNORE), where);
  return true;
}

template <class T>
bool recv_until(int src, int tag, MPI_Comm c, MPI_Datatype type, std::vector<T>& out, Clock::time_point until,
                std::string_view where) {
  Backoff backoff;
  for (;;) {
    if (try_recv(src, tag, c, type, out, where)) return true;
    if (Clock::now() >= until) return false;
    backoff.pause();
  }
}

int checked_tag(int64_t tag, std::string_view what) {
  int* ub = nullptr;
  int flag = 0;
  MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &ub, &flag);
  const int64_t max_tag = flag && ub ? *ub : 32767;
  if (tag < 0 || tag > max_tag) throw CommError(fmt::format("{}: tag {} outside MPI's [0, {}]", what, tag, max_tag));
  return static_cast<int>(tag);
}

}  // namespace

// ---------------------------------------------------------------------------
// The control plane.

namespace nccl_detail {

struct MpiControl::PendingSend {
  std::vector<int64_t> words;
  std::vector<std::byte> bytes;
  MPI_Request requests[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
};

MpiControl::MpiControl(std::function<std::chrono::milliseconds()> timeout, Fatal fatal)
    : timeout_(std::move(timeout)), fatal_(std::move(fatal)) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw CommError("MPI is not initialised (create an MpiSession first)");
  int r = 0, n = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  rank_ = r;
  size_ = n;
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &mpi_), "MPI_Comm_dup");
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &p2p_), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(mpi_, MPI_ERRORS_RETURN);
  MPI_Comm_set_errhandler(p2p_, MPI_ERRORS_RETURN);
}

MpiControl::~MpiControl() {
  bool drained = false;
  try {
    drained = reap(true);
  } catch (...) {
  }
  if (!drained && !sends_.empty()) {
    static auto* leaked = new std::list<PendingSend>;  // buffers MPI may still read: never freed
    leaked->splice(leaked->end(), sends_);
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) {
    MPI_Comm_free(&mpi_);
    MPI_Comm_free(&p2p_);
  }
}

void MpiControl::post(PendingSend&& s, int dst, int tag, MPI_Comm c, const std::string& where) {
  sends_.push_back(std::move(s));
  PendingSend& p = sends_.back();
  check_mpi(MPI_Isend(p.words.data(), to_int(static_cast<int64_t>(p.words.size()), where), MPI_INT64_T, dst, tag, c,
                      &p.requests[0]),
            where);
  if (c == p2p_) {  // send / recv: the payload follows, same (source, tag), so in order
    check_mpi(MPI_Isend(p.bytes.data(), to_int(static_cast<int64_t>(p.bytes.size()), where), MPI_BYTE, dst, tag, c,
                        &p.requests[1]),
              where);
  }
}

bool MpiControl::reap(bool wait_all) {
  const auto until = Clock::now() + timeout_();
  Backoff backoff;
  for (;;) {
    for (auto it = sends_.begin(); it != sends_.end();) {
      int done = 0;
      check_mpi(MPI_Testall(2, it->requests, &done, MPI_STATUSES_IGNORE), "completing a send");
      it = done ? sends_.erase(it) : std::next(it);
    }
    if (!wait_all || sends_.empty()) return true;
    if (Clock::now() >= until) return false;
    backoff.pause();
  }
}

void MpiControl::reap_sends() { reap(false); }

void MpiControl::send(std::vector<int64_t> header, std::vector<std::byte> payload, int64_t dst, int64_t tag,
                      const std::string& where) {
  if (dst < 0 || dst >= size_) throw CommError(fmt::format("{}: no rank {} in a world of {}", where, dst, size_));
  const int mpi_tag = checked_tag(tag, where);
  reap(false);
  post(PendingSend{std::move(header), std::move(payload), {MPI_REQUEST_NULL, MPI_REQUEST_NULL}},
       static_cast<int>(dst), mpi_tag, p2p_, where);
}

bool MpiControl::recv(int64_t src, int64_t tag, std::vector<int64_t>& header, std::vector<std::byte>& payload,
                      const std::string& where) {
  if (src < 0 || src >= size_) throw CommError(fmt::format("{}: no rank {} in a world of {}", where, src, size_));
  const int mpi_tag = checked_tag(tag, where);
  reap(false);
  if (!recv_until(static_cast<int>(src), mpi_tag, p2p_, MPI_INT64_T, header, Clock::now() + timeout_(), where)) {
    return false;
  }
  if (!recv_until(static_cast<int>(src), mpi_tag, p2p_, MPI_BYTE, payload, Clock::now() + timeout_(), where)) {
    fatal_(fmt::format("{}: rank {}'s message header arrived but not its payload within {} ms", where, src,
                       timeout_().count()));
  }
  return true;
}

MpiControl::Agreed MpiControl::agree(const CallDesc& call, const Group& g, std::span<const int64_t> ints,
                                     bool needs_id, const std::function<std::string(UniqueId&)>& make_id,
                                     const std::function<bool(DType)>& can_sum, const std::string& context) {
  const int64_t n = g.size();
  CallDesc mine = call;
  mine.group_name = g.name;
  Agreed a;
  reap(false);
  if (n == 1) {
    const std::vector<const CallDesc*> calls = {&mine};
    const std::string error = check_calls(calls, g, can_sum);
    if (!error.empty()) throw CommError(error);
    a.ints.assign(ints.begin(), ints.end());
    return a;
  }
  Writer msg;
  msg.put(kMagic);
  msg.put(needs_id);
  msg.list(g.ranks);
  encode(msg, mine);
  msg.list(ints);
  const int root = static_cast<int>(g.ranks[0]);

  if (g.index != 0) {
    post(PendingSend{std::move(msg.w), {}, {MPI_REQUEST_NULL, MPI_REQUEST_NULL}}, root, kAgreeTag, mpi_, context);
    std::vector<int64_t> reply;
    if (!recv_until(root, kReplyTag, mpi_, MPI_INT64_T, reply, Clock::now() + timeout_(), context)) {
      fatal_(fmt::format("{}: rank {} timed out after {} ms waiting for rank {} (the group's first member) to "
                         "collect every member's call (a member is missing, stuck or failed)",
                         context, rank_, timeout_().count(), root));
    }
    Reader in{reply};
    const bool magic = in.get() == kMagic;
    const std::string error = in.text();
    a.ints = in.list();
    const bool has_id = in.get() != 0;
    if (has_id) {
      int64_t words[kIdWords];
      for (auto& w : words) w = in.get();
      a.id.emplace();
      std::memcpy(a.id->data(), words, a.id->size());
    }
    if (!magic || !in.ok) fatal_(fmt::format("{}: rank {} got a malformed answer from rank {}", context, rank_, root));
    if (!error.empty()) throw CommError(error);
    if (has_id != needs_id) {
      fatal_(fmt::format("{}: rank {}: the answer {} a communicator id, this member {} one (internal error)", context,
                         rank_, has_id ? "carries" : "lacks", needs_id ? "needs" : "does not need"));
    }
    return a;
  }

  // The first member: collect every member's call.
  std::vector<std::vector<int64_t>> got(static_cast<size_t>(n));
  std::vector<bool> arrived(static_cast<size_t>(n), false);
  got[0] = std::move(msg.w);
  arrived[0] = true;
  int64_t missing = n - 1;
  const auto until = Clock::now() + timeout_();
  Backoff backoff;
  while (missing > 0) {
    bool progress = false;
    for (int64_t j = 1; j < n; ++j) {
      const auto js = static_cast<size_t>(j);
      if (arrived[js]) continue;
      if (try_recv(static_cast<int>(g.ranks[js]), kAgreeTag, mpi_, MPI_INT64_T, got[js], context)) {
        arrived[js] = true;
        --missing;
        progress = true;
      }
    }
    if (missing == 0) break;
    if (Clock::now() >= until) {
      std::vector<int64_t> absent;
      for (int64_t j = 1; j < n; ++j) {
        if (!arrived[static_cast<size_t>(j)]) absent.push_back(g.ranks[static_cast<size_t>(j)]);
      }
      fatal_(fmt::format("{}: rank {} timed out after {} ms waiting for {} (not arrived)", context, rank_,
                         timeout_().count(), rank_list(absent)));
    }
    if (!progress) backoff.pause();
  }

  std::string error;
  std::vector<CallDesc> calls(static_cast<size_t>(n));
  std::vector<std::vector<int64_t>> member_ints(static_cast<size_t>(n));
  std::vector<bool> member_needs(static_cast<size_t>(n), false);
  for (int64_t j = 0; j < n && error.empty(); ++j) {
    const auto js = static_cast<size_t>(j);
    Reader in{got[js]};
    const bool magic = in.get() == kMagic;
    member_needs[js] = in.get() != 0;
    const std::vector<int64_t> members = in.list();
    std::optional<CallDesc> d = decode(in);
    member_ints[js] = in.list();
    if (!magic || !in.ok || !d) {
      error = fmt::format("{}: rank {} sent a malformed call descriptor", context, g.ranks[js]);
    } else if (members != g.ranks) {
      error = fmt::format("{}: members disagree on the group: rank {} called {} on group {} [{}]", context,
                          g.ranks[js], d->op, d->group_name, fmt::join(members, ", "));
    } else {
      calls[js] = std::move(*d);
    }
  }
  if (error.empty()) {
    std::vector<const CallDesc*> ptrs;
    for (const auto& c : calls) ptrs.push_back(&c);
    error = check_calls(ptrs, g, can_sum);
  }
  for (int64_t j = 1; j < n && error.empty(); ++j) {
    if (member_needs[static_cast<size_t>(j)] != needs_id) {
      error = fmt::format("{}: the members disagree on whether the group has a communicator (rank {} {} one, rank {} "
                          "{}; internal error)",
                          context, rank_, needs_id ? "needs" : "does not need", g.ranks[static_cast<size_t>(j)],
                          member_needs[static_cast<size_t>(j)] ? "needs" : "does not need");
    }
  }
  if (error.empty() && needs_id) {
    UniqueId id{};
    error = make_id(id);
    if (error.empty()) a.id = id;
  }
  if (error.empty()) {
    for (const auto& v : member_ints) a.ints.insert(a.ints.end(), v.begin(), v.end());
  }
  Writer reply;
  reply.put(kMagic);
  reply.text(error);
  reply.list(a.ints);
  reply.put(a.id.has_value());
  if (a.id) {
    int64_t words[kIdWords];
    std::memcpy(words, a.id->data(), a.id->size());
    for (int64_t w : words) reply.put(w);
  }
  for (int64_t j = 1; j < n; ++j) {
    post(PendingSend{reply.w, {}, {MPI_REQUEST_NULL, MPI_REQUEST_NULL}}, static_cast<int>(g.ranks[static_cast<size_t>(j)]),
         kReplyTag, mpi_, context);
  }
  if (!error.empty()) throw CommError(error);
  return a;
}

}  // namespace nccl_detail

}  // namespace paritron::opt

#endif  // PARITRON_HAVE_MPI

// ---------------------------------------------------------------------------
// NcclComm.

#if defined(PARITRON_HAVE_NCCL) && defined(PARITRON_HAVE_MPI)

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "optimized/comm/device_local_comm.h"
#include "optimized/cuda/cuda_backend.h"

namespace paritron::opt {

namespace {

static_assert(sizeof(ncclUniqueId) == sizeof(nccl_detail::MpiControl::UniqueId));

bool nccl_can_sum(DType storage) {
  switch (storage) {
    case DType::F32:
    case DType::F64:
    case DType::BF16:
    case DType::F16:
    case DType::I32:
    case DType::I64: return true;
    default: return false;
  }
}

// The NCCL type a storage is summed in (16-bit floats are widened to f32 first).
ncclDataType_t nccl_sum_type(DType storage) {
  switch (storage) {
    case DType::F64: return ncclFloat64;
    case DType::I32: return ncclInt32;
    case DType::I64: return ncclInt64;
    default: return ncclFloat32;
  }
}

std::string nccl_text(ncclResult_t r, ncclComm_t c) {
  std::string s = ncclGetErrorString(r);
  const char* last = ncclGetLastError(c);
  if (last != nullptr && *last != '\0') s += fmt::format(" ({})", last);
  return s;
}

uint64_t members_hash(const std::vector<int64_t>& ranks) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (int64_t r : ranks) h = (h ^ static_cast<uint64_t>(r)) * 1099511628211ull;
  return h;
}

}  // namespace

struct NcclComm::Impl {
  explicit Impl(NcclComm* s) : self(s) {}
  ~Impl();

  NcclComm* self;
  std::unique_ptr<nccl_detail::MpiControl> control;
  int64_t rank = 0, size = 1;
  int device = 0;
  std::vector<int64_t> world_members;
  std::map<std::vector<int64_t>, ncclComm_t> comms;  // by member list; the world's too
  cudaStream_t own_stream = nullptr;
  cudaStream_t checked_stream = nullptr;
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
  std::string broken;  // the first failure that made the comm unusable

  struct Call {
    std::string context;  // "all_reduce on group tp [0, 1]"
    std::string where;    // + the rank and the call's shapes, for data-phase errors
    cudaStream_t stream = nullptr;
    ncclComm_t comm = nullptr;
    int64_t n = 1, index = 0;
    std::vector<int64_t> ints;
  };

  std::chrono::milliseconds timeout() const { return self->timeout(); }

  void abort_all() {
    for (auto& [members, c] : comms) {
      if (c != nullptr) (void)ncclCommAbort(c);
    }
    comms.clear();
  }

  // Aborts every communicator (and `extra`, one not cached yet), marks the
  // comm unusable and throws.
  [[noreturn]] void fail(const std::string& message, ncclComm_t extra = nullptr) {
    if (extra != nullptr) {
      bool cached = false;
      for (auto& [members, c] : comms) cached = cached || c == extra;
      if (!cached) (void)ncclCommAbort(extra);
    }
    abort_all();
    if (broken.empty()) broken = message;
    throw CommError(message + fmt::format(" [every NCCL communicator of rank {} was aborted]", rank));
  }

  void usable(std::string_view context) const {
    if (!broken.empty()) {
      throw CommError(fmt::format("{}: rank {}: the NCCL comm is unusable after an earlier failure: {}", context, rank,
                                  broken));
    }
  }

  void cuda(cudaError_t status, std::string_view call, std::string_view where) {
    if (status == cudaSuccess) return;
    (void)cudaGetLastError();
    fail(fmt::format("{}: {} failed: {} ({})", where, call, cudaGetErrorName(status), cudaGetErrorString(status)));
  }

  static ncclConfig_t config() {
    ncclConfig_t c = NCCL_CONFIG_INITIALIZER;
    c.blocking = 0;  // every call returns at once; waits poll, so they can time out
    return c;
  }

  // An NCCL call's result: in progress (non-blocking communicator) -> polls
  // the communicator until it settles or the timeout passes; any failure
  // aborts every communicator and throws naming the call.
  void settle(ncclResult_t r, ncclComm_t c, std::string_view call, std::string_view where) {
    if (r == ncclInProgress && c != nullptr) {
      const auto until = Clock::now() + timeout();
      Backoff backoff;
      for (;;) {
        ncclResult_t state = ncclInProgress;
        const ncclResult_t q = ncclCommGetAsyncError(c, &state);
        if (q != ncclSuccess) {
          r = q;
          break;
        }
        if (state != ncclInProgress) {
          r = state;
          break;
        }
        if (Clock::now() >= until) {
          fail(fmt::format("{}: {} did not complete within {} ms (a peer is missing, stuck or failed)", where, call,
                           timeout().count()),
               c);
        }
        backoff.pause();
      }
    }
    if (r != ncclSuccess) fail(fmt::format("{}: {} failed: {}", where, call, nccl_text(r, c)), c);
  }

  // Waits until the call's work on its stream is done, watching the NCCL
  // communicator's asynchronous errors; the timeout aborts everything.
  void wait(const Call& call) {
    const auto until = Clock::now() + timeout();
    Backoff backoff;
    for (;;) {
      const cudaError_t q = cudaStreamQuery(call.stream);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) cuda(q, "cudaStreamQuery", call.where);
      if (call.comm != nullptr) {
        ncclResult_t state = ncclSuccess;
        if (ncclCommGetAsyncError(call.comm, &state) == ncclSuccess && state != ncclSuccess &&
            state != ncclInProgress) {
          fail(fmt::format("{}: NCCL reported an asynchronous error: {}", call.where, nccl_text(state, call.comm)));
        }
      }
      if (Clock::now() >= until) {
        fail(fmt::format("{}: did not complete within {} ms (a peer is missing, stuck or failed)", call.where,
                         timeout().count()));
      }
      backoff.pause();
    }
  }

  cudaStream_t stream_for(std::string_view where) {
    cuda(cudaSetDevice(device), "cudaSetDevice", where);
    cudaStream_t s = cuda::current_stream();
    if (s == nullptr) {
      if (own_stream == nullptr) {
        cuda(cudaStreamCreateWithFlags(&own_stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags", where);
      }
      s = own_stream;
    }
    if (s != checked_stream) {
      int dev = -1;
      cuda(cudaStreamGetDevice(s, &dev), "cudaStreamGetDevice", where);
      if (dev != device) {
        throw CommError(fmt::format("{}: this thread's CudaBackend stream is on device {}, the NCCL comm on device {} "
                                    "(construct the backend after the comm, or with comm.device())",
                                    where, dev, device));
      }
      checked_stream = s;
    }
    return s;
  }

  void* scratch_for(size_t bytes, std::string_view where) {
    if (bytes > scratch_bytes) {
      // Every call waits for its work, so the old buffer is idle.
      const size_t grown = std::max(bytes, scratch_bytes * 2);
      if (scratch != nullptr) cuda(cudaFree(scratch), "cudaFree", where);
      scratch = nullptr;
      scratch_bytes = 0;
      cuda(cudaMalloc(&scratch, grown), fmt::format("cudaMalloc of {} bytes of fp32 scratch", grown), where);
      scratch_bytes = grown;
    }
    return scratch;
  }

  Call begin(CallDesc d, const Group& g, bool needs_nccl, std::span<const int64_t> ints = {}, bool sync = true);
};

NcclComm::Impl::~Impl() {
  if (broken.empty()) {
    // Finalize every communicator (non-blocking), then wait for all, then
    // destroy; one that does not settle within the timeout is aborted.
    for (auto& [members, c] : comms) {
      const ncclResult_t r = ncclCommFinalize(c);
      if (r != ncclSuccess && r != ncclInProgress) {
        (void)ncclCommAbort(c);
        c = nullptr;
      }
    }
    const auto until = Clock::now() + timeout();
    for (auto& [members, c] : comms) {
      if (c == nullptr) continue;
      ncclResult_t state = ncclInProgress;
      Backoff backoff;
      while (ncclCommGetAsyncError(c, &state) == ncclSuccess && state == ncclInProgress && Clock::now() < until) {
        backoff.pause();
      }
      if (state == ncclSuccess) {
        (void)ncclCommDestroy(c);
      } else {
        (void)ncclCommAbort(c);
      }
    }
    comms.clear();
  } else {
    abort_all();
  }
  if (scratch != nullptr) (void)cudaFree(scratch);
  if (own_stream != nullptr) (void)cudaStreamDestroy(own_stream);
}

NcclComm::Impl::Call NcclComm::Impl::begin(CallDesc d, const Group& g, bool needs_nccl, std::span<const int64_t> ints,
                                           bool sync) {
  Call call;
  call.context = fmt::format("{} on group {}", d.op, g.describe());
  d.group_name = g.name;
  usable(call.context);
  check_group(g, rank, size, d.op);
  call.where = fmt::format("{}: rank {}, {}", call.context, rank, d.describe());
  call.stream = stream_for(call.where);
  // The caller's queued work is not the collective's: wait for it here, not
  // against the timeout (and a barrier means the GPU work before it is done).
  if (sync) cuda(cudaStreamSynchronize(call.stream), "cudaStreamSynchronize", call.where);
  needs_nccl = needs_nccl && g.size() > 1;
  const bool needs_id = needs_nccl && comms.count(g.ranks) == 0;
  auto make_id = [&](nccl_detail::MpiControl::UniqueId& id) -> std::string {
    ncclUniqueId uid;
    const ncclResult_t r = ncclGetUniqueId(&uid);
    if (r != ncclSuccess) return fmt::format("{}: rank {}: ncclGetUniqueId failed: {}", call.context, rank, nccl_text(r, nullptr));
    std::memcpy(id.data(), &uid, sizeof uid);
    return "";
  };
  nccl_detail::MpiControl::Agreed a = control->agree(d, g, ints, needs_id, make_id, nccl_can_sum, call.context);
  call.ints = std::move(a.ints);
  call.n = g.size();
  call.index = g.index;
  if (needs_nccl) {
    auto it = comms.find(g.ranks);
    if (it != comms.end()) {
      call.comm = it->second;
    } else {
      ncclUniqueId uid;
      std::memcpy(&uid, a.id->data(), sizeof uid);
      ncclConfig_t cfg = config();
      ncclComm_t c = nullptr;
      settle(ncclCommInitRankConfig(&c, static_cast<int>(g.size()), uid, static_cast<int>(g.index), &cfg), c,
             "ncclCommInitRankConfig", call.where + ": creating the group's NCCL communicator");
      comms[g.ranks] = c;
      call.comm = c;
    }
  }
  return call;
}

// ---------------------------------------------------------------------------

NcclComm::NcclComm(std::chrono::milliseconds timeout) : impl_(std::make_unique<Impl>(this)) {
  set_timeout(timeout);
  Impl& m = *impl_;
  const std::string what = "NcclComm: creating the world communicator";
  m.control = std::make_unique<nccl_detail::MpiControl>([this] { return this->timeout(); },
                                                        [&m](const std::string& message) { m.fail(message); });
  m.rank = m.control->rank();
  m.size = m.control->size();
  const int r = static_cast<int>(m.rank), n = static_cast<int>(m.size);
  for (int64_t i = 0; i < n; ++i) m.world_members.push_back(i);

  // Device: the local rank modulo the devices of this node.
  MPI_Comm local = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split_type(m.control->world(), MPI_COMM_TYPE_SHARED, r, MPI_INFO_NULL, &local), what);
  int local_rank = 0, local_size = 1;
  MPI_Comm_rank(local, &local_rank);
  MPI_Comm_size(local, &local_size);
  MPI_Comm_free(&local);
  std::string why;
  int count = 0;
  bool ok = cuda::device_available(&why) && cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  if (!ok && why.empty()) why = "no usable CUDA device";
  if (ok && local_size > count) {  // NCCL rejects two ranks of a communicator on one GPU
    ok = false;
    why = fmt::format("{} ranks run on this node but it has {} GPU(s): NCCL needs a GPU per rank", local_size, count);
  }
  if (ok) {
    m.device = local_rank % count;
    const cudaError_t e = cudaSetDevice(m.device);
    if (e != cudaSuccess) {
      ok = false;
      why = fmt::format("cudaSetDevice({}): {}", m.device, cudaGetErrorString(e));
    }
  }
  // Rank 0 makes the unique id; every rank first learns whether every rank
  // has a device (and rank 0 an id), so that either all start NCCL or none.
  ncclUniqueId id{};
  if (ok && r == 0) {
    const ncclResult_t e = ncclGetUniqueId(&id);
    if (e != ncclSuccess) {
      ok = false;
      why = fmt::format("ncclGetUniqueId: {}", nccl_text(e, nullptr));
    }
  }
  int mine = ok ? 1 : 0, all = 0;
  check_mpi(MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, m.control->world()), what);
  if (!all) {
    throw CommError(fmt::format("{}: rank {}: {}", what, r,
                                ok ? std::string("another rank has no usable CUDA device or NCCL") : why));
  }
  check_mpi(MPI_Bcast(&id, static_cast<int>(sizeof id), MPI_BYTE, 0, m.control->world()), what);
  ncclConfig_t cfg = Impl::config();
  ncclComm_t world = nullptr;
  m.settle(ncclCommInitRankConfig(&world, n, id, r, &cfg), world, "ncclCommInitRankConfig",
           fmt::format("{} ({} ranks, rank {} on device {})", what, n, r, m.device));
  m.comms[m.world_members] = world;
}

NcclComm::~NcclComm() = default;

int64_t NcclComm::rank() const { return impl_->rank; }
int64_t NcclComm::world_size() const { return impl_->size; }
int NcclComm::device() const { return impl_->device; }
bool NcclComm::has_communicator(const std::vector<int64_t>& members) const { return impl_->comms.count(members) > 0; }

void NcclComm::abort(const std::string& reason) {
  std::fprintf(stderr, "paritron: rank %lld aborting: %s\n", static_cast<long long>(impl_->rank), reason.c_str());
  std::fflush(stderr);
  impl_->abort_all();
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::abort();  // MPI_Abort does not return
}

void NcclComm::all_reduce(DTensor& t, const Group& g) {
  Impl& m = *impl_;
  Impl::Call c = m.begin(tensor_call("all_reduce", t, nullptr), g, true);
  const DType storage = t.storage_dtype();
  const bool round = rounding_format(t) != nullptr;
  const int64_t numel = t.numel();
  if (numel > 0) {
    if (c.n > 1 && (storage == DType::BF16 || storage == DType::F16)) {
      // Widen, sum in fp32, round once.
      auto* s = static_cast<float*>(m.scratch_for(static_cast<size_t>(numel) * sizeof(float), c.where));
      device_comm_detail::widen_to_f32(t.data(), storage, s, numel, c.stream, c.where);
      m.settle(ncclAllReduce(s, s, static_cast<size_t>(numel), ncclFloat32, ncclSum, c.comm, c.stream), c.comm,
               "ncclAllReduce", c.where);
      device_comm_detail::store_rounded(s, DType::F32, t.data(), storage, t.dtype(), false, numel, c.stream, c.where);
    } else {
      if (c.n > 1) {
        m.settle(ncclAllReduce(t.data(), t.data(), static_cast<size_t>(numel), nccl_sum_type(storage), ncclSum, c.comm,
                               c.stream),
                 c.comm, "ncclAllReduce", c.where);
      }
      if (round) {  // a dtype narrower than its f32 / f64 storage
        device_comm_detail::store_rounded(t.data(), storage, t.data(), storage, t.dtype(), true, numel, c.stream,
                                          c.where);
      }
    }
  }
  m.wait(c);
}

void NcclComm::all_gather(const DTensor& in, DTensor& out, const Group& g) {
  Impl& m = *impl_;
  Impl::Call c = m.begin(tensor_call("all_gather", in, &out), g, true);
  if (in.nbytes() > 0) {
    if (c.n == 1) {
      if (out.data() != in.data()) {
        m.cuda(cudaMemcpyAsync(out.data(), in.data(), in.nbytes(), cudaMemcpyDefault, c.stream), "cudaMemcpyAsync",
               c.where);
      }
    } else {
      m.settle(ncclAllGather(in.data(), out.data(), in.nbytes(), ncclUint8, c.comm, c.stream), c.comm, "ncclAllGather",
               c.where);
    }
  }
  m.wait(c);
}

void NcclComm::reduce_scatter(const DTensor& in, DTensor& out, const Group& g) {
  Impl& m = *impl_;
  Impl::Call c = m.begin(tensor_call("reduce_scatter", in, &out), g, true);
  const DType storage = in.storage_dtype();
  const bool round = rounding_format(in) != nullptr;
  const int64_t block = out.numel();
  if (block > 0) {
    if (c.n == 1) {
      if (out.data() != in.data()) {
        m.cuda(cudaMemcpyAsync(out.data(), in.data(), out.nbytes(), cudaMemcpyDefault, c.stream), "cudaMemcpyAsync",
               c.where);
      }
      if (round) {
        device_comm_detail::store_rounded(out.data(), storage, out.data(), storage, in.dtype(), true, block, c.stream,
                                          c.where);
      }
    } else if (storage == DType::BF16 || storage == DType::F16) {
      const int64_t total = in.numel();
      auto* s = static_cast<float*>(m.scratch_for(static_cast<size_t>(total + block) * sizeof(float), c.where));
      device_comm_detail::widen_to_f32(in.data(), storage, s, total, c.stream, c.where);
      m.settle(ncclReduceScatter(s, s + total, static_cast<size_t>(block), ncclFloat32, ncclSum, c.comm, c.stream),
               c.comm, "ncclReduceScatter", c.where);
      device_comm_detail::store_rounded(s + total, DType::F32, out.data(), storage, in.dtype(), false, block, c.stream,
                                        c.where);
    } else {
      m.settle(ncclReduceScatter(in.data(), out.data(), static_cast<size_t>(block), nccl_sum_type(storage), ncclSum,
                                 c.comm, c.stream),
               c.comm, "ncclReduceScatter", c.where);
      if (round) {
        device_comm_detail::store_rounded(out.data(), storage, out.data(), storage, in.dtype(), true, block, c.stream,
                                          c.where);
      }
    }
  }
  m.wait(c);
}

void NcclComm::all_to_all_v(const DTensor& in, std::span<const int64_t> send_rows, DTensor& out,
                            std::span<const int64_t> recv_rows, const Group& g) {
  Impl& m = *impl_;
  CallDesc d = tensor_call("all_to_all_v", in, &out);
  d.send_rows.assign(send_rows.begin(), send_rows.end());
  d.recv_rows.assign(recv_rows.begin(), recv_rows.end());
  Impl::Call c = m.begin(std::move(d), g, true);
  const size_t row_bytes = static_cast<size_t>(row_width(in)) * dtype_size(in.storage_dtype());
  const auto n = static_cast<size_t>(c.n), me = static_cast<size_t>(c.index);
  std::vector<size_t> send_at(n + 1, 0), recv_at(n + 1, 0);
  for (size_t j = 0; j < n; ++j) {
    send_at[j + 1] = send_at[j] + static_cast<size_t>(send_rows[j]) * row_bytes;
    recv_at[j + 1] = recv_at[j] + static_cast<size_t>(recv_rows[j]) * row_bytes;
  }
  const auto* src = static_cast<const std::byte*>(in.data());
  auto* dst = static_cast<std::byte*>(out.data());
  // This member's own rows: a device copy.
  if (send_at[me + 1] > send_at[me]) {
    m.cuda(cudaMemcpyAsync(dst + recv_at[me], src + send_at[me], send_at[me + 1] - send_at[me], cudaMemcpyDefault,
                           c.stream),
           "cudaMemcpyAsync", c.where);
  }
  bool traffic = false;
  for (size_t j = 0; j < n; ++j) {
    traffic = traffic || (j != me && (send_at[j + 1] > send_at[j] || recv_at[j + 1] > recv_at[j]));
  }
  if (traffic) {
    m.settle(ncclGroupStart(), nullptr, "ncclGroupStart", c.where);
    for (size_t j = 0; j < n; ++j) {
      if (j == me) continue;
      if (send_at[j + 1] > send_at[j]) {
        m.settle(ncclSend(src + send_at[j], send_at[j + 1] - send_at[j], ncclUint8, static_cast<int>(j), c.comm,
                          c.stream),
                 c.comm, "ncclSend", c.where);
      }
      if (recv_at[j + 1] > recv_at[j]) {
        m.settle(ncclRecv(dst + recv_at[j], recv_at[j + 1] - recv_at[j], ncclUint8, static_cast<int>(j), c.comm,
                          c.stream),
                 c.comm, "ncclRecv", c.where);
      }
    }
    m.settle(ncclGroupEnd(), c.comm, "ncclGroupEnd", c.where);
  }
  m.wait(c);
}

std::vector<int64_t> NcclComm::all_gather_ints(std::span<const int64_t> values, const Group& g) {
  CallDesc d;
  d.op = "all_gather_ints";
  d.num_ints = static_cast<int64_t>(values.size());
  Impl::Call c = impl_->begin(std::move(d), g, false, values, false);
  return std::move(c.ints);
}

void NcclComm::broadcast(DTensor& t, int64_t root_index, const Group& g) {
  Impl& m = *impl_;
  CallDesc d = tensor_call("broadcast", t, nullptr);
  d.root = root_index;
  Impl::Call c = m.begin(std::move(d), g, true);
  if (c.n > 1 && t.nbytes() > 0) {
    m.settle(ncclBroadcast(t.data(), t.data(), t.nbytes(), ncclUint8, static_cast<int>(root_index), c.comm, c.stream),
             c.comm, "ncclBroadcast", c.where);
  }
  m.wait(c);
}

void NcclComm::barrier(const Group& g) {
  CallDesc d;
  d.op = "barrier";
  impl_->begin(std::move(d), g, false);  // the exchange is the barrier; the stream was waited for first
}

namespace {
std::vector<int64_t> p2p_header(const DTensor& t) {
  Writer w;
  w.put(kMagic);
  w.put(static_cast<int64_t>(t.dtype()));
  w.put(static_cast<int64_t>(t.storage_dtype()));
  w.list(t.shape());
  return std::move(w.w);
}
}  // namespace

void NcclComm::send(const DTensor& t, int64_t dst_rank, int64_t tag) {
  Impl& m = *impl_;
  const std::string what = fmt::format("send to rank {} tag {}", dst_rank, tag);
  m.usable(what);
  if (dst_rank < 0 || dst_rank >= m.size) {
    throw CommError(fmt::format("{}: no rank {} in a world of {}", what, dst_rank, m.size));
  }
  const std::string where = fmt::format("{} on rank {}, {}", what, m.rank, t.describe());
  std::vector<std::byte> bytes(t.nbytes());
  if (t.nbytes() > 0) {
    const cudaStream_t stream = m.stream_for(where);
    m.cuda(cudaMemcpyAsync(bytes.data(), t.data(), t.nbytes(), cudaMemcpyDefault, stream), "cudaMemcpyAsync", where);
    m.cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize", where);
  }
  m.control->send(p2p_header(t), std::move(bytes), dst_rank, tag, what);
}

void NcclComm::recv(DTensor& t, int64_t src_rank, int64_t tag) {
  Impl& m = *impl_;
  const std::string what = fmt::format("recv from rank {} tag {}", src_rank, tag);
  m.usable(what);
  if (src_rank < 0 || src_rank >= m.size) {
    throw CommError(fmt::format("{}: no rank {} in a world of {}", what, src_rank, m.size));
  }
  const std::string where = fmt::format("{} on rank {}", what, m.rank);
  std::vector<int64_t> header;
  std::vector<std::byte> payload;
  if (!m.control->recv(src_rank, tag, header, payload, where)) {
    // Nothing was consumed: the comm stays usable (as ThreadComm's).
    throw CommError(fmt::format("{}: timed out after {} ms, rank {} has not sent it", where, m.timeout().count(),
                                src_rank));
  }
  Reader in{header};
  const bool magic = in.get() == kMagic;
  const auto dtype = static_cast<DType>(in.get());
  const auto storage = static_cast<DType>(in.get());
  const std::vector<int64_t> dims = in.list();
  if (!magic || !in.ok) throw CommError(fmt::format("{}: a malformed message header from rank {}", where, src_rank));
  const Shape shape(dims.begin(), dims.end());
  if (dtype != t.dtype() || storage != t.storage_dtype() || shape != t.shape() || payload.size() != t.nbytes()) {
    std::string sent = fmt::format("{}{}", dtype_name(dtype), shape_string(shape));
    if (storage != dtype) sent += fmt::format(" (storage {})", dtype_name(storage));
    throw CommError(fmt::format("{}: rank {} sent {}, the receiving tensor is {}", where, src_rank, sent,
                                t.describe()));
  }
  if (!payload.empty()) {
    const std::string w = fmt::format("{}, {}", where, t.describe());
    const cudaStream_t stream = m.stream_for(w);
    m.cuda(cudaMemcpyAsync(t.data(), payload.data(), payload.size(), cudaMemcpyDefault, stream), "cudaMemcpyAsync", w);
    m.cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize", w);  // the payload is freed on return
  }
}

void NcclComm::split_groups(const std::vector<Group>& groups) {
  Impl& m = *impl_;
  const std::string what = fmt::format("split_groups on rank {}", m.rank);
  m.usable(what);
  m.control->reap_sends();
  const auto k = static_cast<int64_t>(groups.size());
  for (const Group& g : groups) {
    if (g.index != -1) check_group(g, m.rank, m.size, "split_groups");
  }
  auto all_gather = [&](std::vector<int64_t>& mine, std::vector<int64_t>& all) {
    all.assign(mine.size() * static_cast<size_t>(m.size), 0);
    MPI_Request req = MPI_REQUEST_NULL;
    check_mpi(MPI_Iallgather(mine.data(), static_cast<int>(mine.size()), MPI_INT64_T, all.data(),
                             static_cast<int>(mine.size()), MPI_INT64_T, m.control->world(), &req),
              what);
    const auto until = Clock::now() + m.timeout();
    Backoff backoff;
    for (;;) {
      int done = 0;
      check_mpi(MPI_Test(&req, &done, MPI_STATUS_IGNORE), what);
      if (done) return;
      if (Clock::now() >= until) {
        m.fail(fmt::format("{}: timed out after {} ms waiting for every rank to call it", what, m.timeout().count()));
      }
      backoff.pause();
    }
  };
  std::vector<int64_t> mine = {k}, counts;
  all_gather(mine, counts);
  for (int64_t q = 0; q < m.size; ++q) {
    if (counts[static_cast<size_t>(q)] != k) {
      throw CommError(fmt::format("split_groups: the ranks passed different numbers of groups: [{}]",
                                  fmt::join(counts, ", ")));
    }
  }
  // Every rank's table: per group [member, smallest rank, size, index, hash,
  // cached], so that every rank sees a disagreement the same way.
  constexpr int64_t kFields = 6;
  mine.clear();
  for (const Group& g : groups) {
    const bool member = g.index >= 0;
    mine.push_back(member);
    mine.push_back(member ? *std::min_element(g.ranks.begin(), g.ranks.end()) : -1);
    mine.push_back(member ? g.size() : 0);
    mine.push_back(member ? g.index : -1);
    mine.push_back(member ? static_cast<int64_t>(members_hash(g.ranks) >> 1) : 0);
    mine.push_back(member && m.comms.count(g.ranks) > 0);
  }
  std::vector<int64_t> table;
  all_gather(mine, table);
  auto at = [&](int64_t q, int64_t j, int64_t f) { return table[static_cast<size_t>((q * k + j) * kFields + f)]; };
  for (int64_t j = 0; j < k; ++j) {
    // Ranks of one color must agree on the members (hash, size) and the
    // cache, hold distinct indices, and be as many as the size.
    std::map<int64_t, std::vector<int64_t>> by_color;
    for (int64_t q = 0; q < m.size; ++q) {
      if (at(q, j, 0)) by_color[at(q, j, 1)].push_back(q);
    }
    for (const auto& [color, ranks] : by_color) {
      const int64_t q0 = ranks[0];
      std::vector<bool> seen(static_cast<size_t>(std::max<int64_t>(at(q0, j, 2), 0)), false);
      bool ok = static_cast<int64_t>(ranks.size()) == at(q0, j, 2);
      for (int64_t q : ranks) {
        ok = ok && at(q, j, 2) == at(q0, j, 2) && at(q, j, 4) == at(q0, j, 4) && at(q, j, 5) == at(q0, j, 5);
        const int64_t idx = at(q, j, 3);
        ok = ok && idx >= 0 && idx < static_cast<int64_t>(seen.size()) && !seen[static_cast<size_t>(idx)];
        if (ok) seen[static_cast<size_t>(idx)] = true;
      }
      if (!ok) {
        throw CommError(fmt::format("split_groups: group {} (the one of ranks [{}]) is listed differently by its "
                                    "members (members, size, index or communicator)",
                                    j, fmt::join(ranks, ", ")));
      }
    }
  }
  ncclComm_t world = m.comms.at(m.world_members);
  for (int64_t j = 0; j < k; ++j) {
    const Group& g = groups[static_cast<size_t>(j)];
    const bool join = g.index >= 0 && g.size() > 1 && m.comms.count(g.ranks) == 0;
    const int color = join ? static_cast<int>(at(m.rank, j, 1)) : NCCL_SPLIT_NOCOLOR;
    const int key = join ? static_cast<int>(g.index) : 0;
    ncclConfig_t cfg = Impl::config();
    ncclComm_t c = nullptr;
    const std::string where = g.index >= 0 ? fmt::format("{}: group {}", what, g.describe())
                                           : fmt::format("{}: group {} (not a member)", what, j);
    m.settle(ncclCommSplit(world, color, key, &c, &cfg), c != nullptr ? c : world, "ncclCommSplit", where);
    if (c != nullptr) m.comms[g.ranks] = c;
  }
}

void run_on_nccl(const std::function<void(Comm&)>& body, std::chrono::milliseconds timeout) {
  std::unique_ptr<NcclComm> comm;
  try {
    comm = std::make_unique<NcclComm>(timeout);
  } catch (const std::exception& e) {
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    std::fprintf(stderr, "paritron: rank %d aborting: %s\n", r, e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    std::abort();
  }
  try {
    body(*comm);
  } catch (const std::exception& e) {
    comm->abort(e.what());
  } catch (...) {
    comm->abort("unknown exception (not a std::exception)");
  }
}

bool nccl_usable(std::string* why) {
  if (!cuda::device_available(why)) return false;
  int version = 0;
  const ncclResult_t r = ncclGetVersion(&version);
  if (r != ncclSuccess) {
    if (why) *why = fmt::format("ncclGetVersion: {}", ncclGetErrorString(r));
    return false;
  }
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    if (why) *why = "MPI is not initialised (create an MpiSession first)";
    return false;
  }
  return true;
}

}  // namespace paritron::opt

#else  // no NCCL or no MPI

namespace paritron::opt {

bool nccl_usable(std::string* why) {
#if !defined(PARITRON_HAVE_NCCL)
  if (why) *why = "Paritron was built without NCCL (CMake found no CUDA toolkit with NCCL)";
#else
  if (why) *why = "Paritron was built without MPI, which the NCCL comm bootstraps over";
#endif
  return false;
}

}  // namespace paritron::opt

#endif
