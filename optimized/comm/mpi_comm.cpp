#include "optimized/comm/mpi_comm.h"

#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "optimized/comm/comm_util.h"

namespace paritron::opt {

using namespace comm_detail;

bool mpi_launched() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr;
}

MpiSession::MpiSession(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) {
    MPI_Query_thread(&provided_);
    return;
  }
  if (MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided_) != MPI_SUCCESS) {
    throw CommError("MPI_Init_thread failed");
  }
  owner_ = true;
}

MpiSession::~MpiSession() {
  if (!owner_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

namespace {

constexpr std::string_view kOps[] = {"all_reduce",      "all_gather", "reduce_scatter", "all_to_all_v",
                                     "all_gather_ints", "broadcast",  "barrier"};
constexpr int kMaxDims = 8;

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

// The MPI type of one stored element (16- and 8-bit floats only move as bits:
// they are never summed in their own storage).
MPI_Datatype mpi_type(DType storage) {
  switch (storage) {
    case DType::F32: return MPI_FLOAT;
    case DType::F64: return MPI_DOUBLE;
    case DType::I64: return MPI_INT64_T;
    case DType::I32: return MPI_INT32_T;
    case DType::F16:
    case DType::BF16: return MPI_UINT16_T;
    default: return MPI_UINT8_T;
  }
}

// Descriptor layout (int64): op, name (16 chars), has_in, has_out, dtype,
// storage, out_dtype, out_storage, root, num_ints, in shape (ndim + 8),
// out shape (ndim + 8), send rows (count + n + 1), recv rows (count + n + 1).
size_t descriptor_size(int64_t n) { return 11 + 2 * (1 + kMaxDims) + 2 * (1 + static_cast<size_t>(n) + 1); }

void put_shape(std::vector<int64_t>& v, const Shape& s) {
  v.push_back(static_cast<int64_t>(std::min<size_t>(s.size(), kMaxDims)));
  for (int d = 0; d < kMaxDims; ++d) {
    int64_t x = 0;
    if (static_cast<size_t>(d) < s.size()) x = s[static_cast<size_t>(d)];
    if (d == kMaxDims - 1) {  // collapse the dims past the last slot
      for (size_t e = kMaxDims; e < s.size(); ++e) x *= s[e];
    }
    v.push_back(x);
  }
}

void put_rows(std::vector<int64_t>& v, const std::vector<int64_t>& rows, int64_t n) {
  const size_t count = std::min(rows.size(), static_cast<size_t>(n + 1));
  v.push_back(static_cast<int64_t>(count));
  for (size_t i = 0; i < static_cast<size_t>(n + 1); ++i) v.push_back(i < count ? rows[i] : 0);
}

std::vector<int64_t> encode(const CallDesc& d, int64_t n) {
  std::vector<int64_t> v;
  v.reserve(descriptor_size(n));
  int64_t op = -1;
  for (size_t i = 0; i < std::size(kOps); ++i)
    if (kOps[i] == d.op) op = static_cast<int64_t>(i);
  v.push_back(op);
  char name[16] = {};
  std::memcpy(name, d.group_name.data(), std::min<size_t>(d.group_name.size(), 16));
  int64_t packed[2];
  std::memcpy(packed, name, 16);
  v.push_back(packed[0]);
  v.push_back(packed[1]);
  v.push_back(d.has_in);
  v.push_back(d.has_out);
  v.push_back(static_cast<int64_t>(d.dtype));
  v.push_back(static_cast<int64_t>(d.storage));
  v.push_back(static_cast<int64_t>(d.out_dtype));
  v.push_back(static_cast<int64_t>(d.out_storage));
  v.push_back(d.root);
  v.push_back(d.num_ints);
  put_shape(v, d.in_shape);
  put_shape(v, d.out_shape);
  put_rows(v, d.send_rows, n);
  put_rows(v, d.recv_rows, n);
  return v;
}

CallDesc decode(const int64_t* v, int64_t n) {
  CallDesc d;
  size_t i = 0;
  const int64_t op = v[i++];
  d.op = op >= 0 && op < static_cast<int64_t>(std::size(kOps)) ? kOps[op] : std::string_view("?");
  char name[17] = {};
  std::memcpy(name, v + i, 16);
  i += 2;
  d.group_name = name;
  d.has_in = v[i++] != 0;
  d.has_out = v[i++] != 0;
  d.dtype = static_cast<DType>(v[i++]);
  d.storage = static_cast<DType>(v[i++]);
  d.out_dtype = static_cast<DType>(v[i++]);
  d.out_storage = static_cast<DType>(v[i++]);
  d.root = v[i++];
  d.num_ints = v[i++];
  auto get_shape = [&](Shape& s) {
    const auto nd = static_cast<size_t>(v[i]);
    s.assign(v + i + 1, v + i + 1 + nd);
    i += 1 + kMaxDims;
  };
  get_shape(d.in_shape);
  get_shape(d.out_shape);
  auto get_rows = [&](std::vector<int64_t>& r) {
    const auto count = static_cast<size_t>(v[i]);
    r.assign(v + i + 1, v + i + 1 + count);
    i += 1 + static_cast<size_t>(n) + 1;
  };
  get_rows(d.send_rows);
  get_rows(d.recv_rows);
  return d;
}

}  // namespace

// Marks the call in progress for the watchdog (which polls: no wake-ups on
// the hot path).
class MpiComm::Guard {
 public:
  Guard(MpiComm& c, std::string what) : c_(c) {
    std::lock_guard<std::mutex> lock(c_.mu_);
    c_.active_ = true;
    c_.active_op_ = std::move(what);
    c_.deadline_ = std::chrono::steady_clock::now() + c_.timeout();
  }
  ~Guard() {
    std::lock_guard<std::mutex> lock(c_.mu_);
    c_.active_ = false;
  }
  Guard(const Guard&) = delete;
  Guard& operator=(const Guard&) = delete;

 private:
  MpiComm& c_;
};

struct MpiComm::PendingSend {
  std::vector<int64_t> header;
  std::vector<std::byte> data;
  MPI_Request requests[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
};

MpiComm::MpiComm() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw CommError("MpiComm: MPI is not initialised (create an MpiSession first)");
  int r = 0, n = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  rank_ = r;
  size_ = n;
  // A private copy of the world: our traffic never matches the caller's.
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &world_), "MpiComm: MPI_Comm_dup");
  MPI_Comm_set_errhandler(world_, MPI_ERRORS_RETURN);
  std::vector<int64_t> all(static_cast<size_t>(n));
  std::iota(all.begin(), all.end(), int64_t{0});
  comms_[all] = world_;
  int level = 0;
  MPI_Query_thread(&level);
  if (level >= MPI_THREAD_MULTIPLE) {
    watchdog_ = std::thread([this] { watch(); });
  } else if (rank_ == 0) {
    std::fprintf(stderr, "paritron: MPI gives thread level %d < MPI_THREAD_MULTIPLE: comm watchdog off\n", level);
  }
}

MpiComm::~MpiComm() {
  try {
    Guard guard(*this, "finishing pending sends");
    reap_sends(true);
  } catch (...) {
  }
  if (watchdog_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    watchdog_.join();
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) {
    for (auto& [members, c] : comms_) MPI_Comm_free(&c);
  }
}

void MpiComm::watch() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    // Poll at a tenth of the timeout (10 ms .. 1 s): a hung call is caught
    // within 1.1 x the timeout.
    const auto period = std::clamp<std::chrono::milliseconds>(timeout() / 10, std::chrono::milliseconds(10),
                                                              std::chrono::milliseconds(1000));
    cv_.wait_for(lock, period, [&] { return stop_; });
    if (stop_ || !active_ || std::chrono::steady_clock::now() < deadline_) continue;
    std::fprintf(stderr,
                 "paritron: rank %lld: %s did not finish within %lld ms (a peer is missing, stuck or failed); "
                 "aborting the job\n",
                 static_cast<long long>(rank_), active_op_.c_str(), static_cast<long long>(timeout().count()));
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
  }
}

void MpiComm::abort(const std::string& reason) {
  std::fprintf(stderr, "paritron: rank %lld aborting: %s\n", static_cast<long long>(rank_), reason.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::abort();  // MPI_Abort does not return
}

MPI_Comm MpiComm::comm_for(const Group& g, std::string_view op) {
  check_group(g, rank_, size_, op);
  auto it = comms_.find(g.ranks);
  if (it != comms_.end()) return it->second;
  MPI_Group world_group = MPI_GROUP_NULL, sub = MPI_GROUP_NULL;
  MPI_Comm world = world_;
  const std::string context = fmt::format("{} on group {}: creating the communicator", op, g.describe());
  check_mpi(MPI_Comm_group(world, &world_group), context);
  std::vector<int> ranks(g.ranks.begin(), g.ranks.end());
  check_mpi(MPI_Group_incl(world_group, static_cast<int>(ranks.size()), ranks.data(), &sub), context);
  uint64_t h = 1469598103934665603ull;  // FNV-1a of the member list: the creation tag
  for (int64_t r : g.ranks) h = (h ^ static_cast<uint64_t>(r)) * 1099511628211ull;
  MPI_Comm c = MPI_COMM_NULL;
  const int rc = MPI_Comm_create_group(world, sub, static_cast<int>(h & 0x7FFF), &c);
  MPI_Group_free(&sub);
  MPI_Group_free(&world_group);
  check_mpi(rc, context);
  MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN);
  comms_[g.ranks] = c;
  return c;
}

void MpiComm::reap_sends(bool wait) {
  for (auto it = sends_.begin(); it != sends_.end();) {
    int done = 0;
    if (wait) {
      check_mpi(MPI_Waitall(2, (*it)->requests, MPI_STATUSES_IGNORE), "send");
      done = 1;
    } else {
      check_mpi(MPI_Testall(2, (*it)->requests, &done, MPI_STATUSES_IGNORE), "send");
    }
    it = done ? sends_.erase(it) : it + 1;
  }
}

namespace {
// Exchanges the members' call descriptors and throws the common CommError if
// they disagree.
void agree(MPI_Comm c, const CallDesc& mine, const Group& g) {
  const int64_t n = g.size();
  const std::vector<int64_t> d = encode(mine, n);
  std::vector<int64_t> all(d.size() * static_cast<size_t>(n));
  const std::string context = fmt::format("{} on group {}", mine.op, g.describe());
  check_mpi(MPI_Allgather(d.data(), static_cast<int>(d.size()), MPI_INT64_T, all.data(), static_cast<int>(d.size()),
                          MPI_INT64_T, c),
            context + ": descriptor exchange");
  std::vector<CallDesc> calls;
  calls.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) calls.push_back(decode(all.data() + i * static_cast<int64_t>(d.size()), n));
  std::vector<const CallDesc*> ptrs;
  for (const auto& x : calls) ptrs.push_back(&x);
  const std::string error = check_calls(ptrs, g);
  if (!error.empty()) throw CommError(error);
}
}  // namespace

void MpiComm::all_reduce(DTensor& t, const Group& g) {
  const std::string what = fmt::format("all_reduce on group {}", g.describe());
  Guard guard(*this, what);
  reap_sends(false);
  MPI_Comm c = comm_for(g, "all_reduce");
  agree(c, tensor_call("all_reduce", t, nullptr), g);
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, t.data(), to_int(t.numel(), what), mpi_type(t.storage_dtype()), MPI_SUM, c),
            what);
  round_in_place(t.data(), t.storage_dtype(), t.numel(), rounding_format(t));
}

void MpiComm::all_gather(const DTensor& in, DTensor& out, const Group& g) {
  const std::string what = fmt::format("all_gather on group {}", g.describe());
  Guard guard(*this, what);
  reap_sends(false);
  MPI_Comm c = comm_for(g, "all_gather");
  agree(c, tensor_call("all_gather", in, &out), g);
  const int count = to_int(in.numel(), what);
  const MPI_Datatype type = mpi_type(in.storage_dtype());
  check_mpi(MPI_Allgather(in.data(), count, type, out.data(), count, type, c), what);
}

void MpiComm::reduce_scatter(const DTensor& in, DTensor& out, const Group& g) {
  const std::string what = fmt::format("reduce_scatter on group {}", g.describe());
  Guard guard(*this, what);
  reap_sends(false);
  MPI_Comm c = comm_for(g, "reduce_scatter");
  agree(c, tensor_call("reduce_scatter", in, &out), g);
  check_mpi(MPI_Reduce_scatter_block(in.data(), out.data(), to_int(out.numel(), what), mpi_type(in.storage_dtype()),
                                     MPI_SUM, c),
            what);
  round_in_place(out.data(), out.storage_dtype(), out.numel(), rounding_format(in));
}

void MpiComm::all_to_all_v(const DTensor& in, std::span<const int64_t> send_rows, DTensor& out,
                           std::span<const int64_t> recv_rows, const Group& g) {
  const std::string what = fmt::format("all_to_all_v on group {}", g.describe());
  Guard guard(*this, what);
  reap_sends(false);
  MPI_Comm c = comm_for(g, "all_to_all_v");
  CallDesc d = tensor_call("all_to_all_v", in, &out);
  d.send_rows.assign(send_rows.begin(), send_rows.end());
  d.recv_rows.assign(recv_rows.begin(), recv_rows.end());
  agree(c, d, g);
  const int64_t width = row_width(in);
  const auto n = static_cast<size_t>(g.size());
  std::vector<int> sc(n), sd(n), rc(n), rd(n);
  int64_t so = 0, ro = 0;
  for (size_t j = 0; j < n; ++j) {
    sc[j] = to_int(send_rows[j] * width, what);
    sd[j] = to_int(so, what);
    so += send_rows[j] * width;
    rc[j] = to_int(recv_rows[j] * width, what);
    rd[j] = to_int(ro, what);
    ro += recv_rows[j] * width;
  }
  const MPI_Datatype type = mpi_type(in.storage_dtype());
  check_mpi(MPI_Alltoallv(in.data(), sc.data(), sd.data(), type, out.data(), rc.data(), rd.data(), type, c), what);
}

std::vector<int64_t> MpiComm::all_gather_ints(std::span<const int64_t> values, const Group& g) {
  const std::string what = fmt::format("all_gather_ints on group {}", g.describe());
  Guard guard(*this, what);
  reap_sends(false);
  MPI_Comm c = comm_for(g, "all_gather_ints");
  CallDesc d;
  d.op = "all_gather_ints";
  d.num_ints = static_cast<int64_t>(values.size());
  agree(c, d, g);
  std::vector<int64_t> out(values.size() * static_cast<size_t>(g.size()));
  const int count = to_int(static_cast<int64_t>(values.size()), what);
  check_mpi(MPI_Allgather(values.data(), count, MPI_INT64_T, out.data(), count, MPI_INT64_T, c), what);
  return out;
}

void MpiComm::broadcast(DTensor& t, int64_t root_index, const Group& g) {
  const std::string what = fmt::format("broadcast on group {}", g.describe());
  Guard guard(*this, what);
  reap_sends(false);
  MPI_Comm c = comm_for(g, "broadcast");
  CallDesc d = tensor_call("broadcast", t, nullptr);
  d.root = root_index;
  agree(c, d, g);
  check_mpi(MPI_Bcast(t.data(), to_int(t.numel(), what), mpi_type(t.storage_dtype()), static_cast<int>(root_index), c),
            what);
}

void MpiComm::barrier(const Group& g) {
  const std::string what = fmt::format("barrier on group {}", g.describe());
  Guard guard(*this, what);
  reap_sends(false);
  MPI_Comm c = comm_for(g, "barrier");
  CallDesc d;
  d.op = "barrier";
  agree(c, d, g);  // the descriptor exchange is itself the barrier
}

namespace {
constexpr size_t kHeader = 3 + kMaxDims;  // dtype, storage, ndim, dims

int checked_tag(int64_t tag, std::string_view what) {
  int* ub = nullptr;
  int flag = 0;
  MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &ub, &flag);
  const int64_t max_tag = flag && ub ? *ub : 32767;
  if (tag < 0 || tag > max_tag) throw CommError(fmt::format("{}: tag {} outside MPI's [0, {}]", what, tag, max_tag));
  return static_cast<int>(tag);
}
}  // namespace

void MpiComm::send(const DTensor& t, int64_t dst_rank, int64_t tag) {
  const std::string what = fmt::format("send to rank {} tag {}", dst_rank, tag);
  if (dst_rank < 0 || dst_rank >= size_) throw CommError(fmt::format("{}: no rank {} in a world of {}", what, dst_rank, size_));
  const int mpi_tag = checked_tag(tag, what);
  Guard guard(*this, what);
  reap_sends(false);
  auto s = std::make_unique<PendingSend>();
  s->header = {static_cast<int64_t>(t.dtype()), static_cast<int64_t>(t.storage_dtype())};
  put_shape(s->header, t.shape());
  s->data.resize(t.nbytes());
  if (t.nbytes() > 0) std::memcpy(s->data.data(), t.data(), t.nbytes());
  MPI_Comm world = world_;
  check_mpi(MPI_Isend(s->header.data(), static_cast<int>(kHeader), MPI_INT64_T, static_cast<int>(dst_rank), mpi_tag,
                      world, &s->requests[0]),
            what);
  check_mpi(MPI_Isend(s->data.data(), to_int(static_cast<int64_t>(s->data.size()), what), MPI_BYTE,
                      static_cast<int>(dst_rank), mpi_tag, world, &s->requests[1]),
            what);
  sends_.push_back(std::move(s));
}

void MpiComm::recv(DTensor& t, int64_t src_rank, int64_t tag) {
  const std::string what = fmt::format("recv from rank {} tag {}", src_rank, tag);
  if (src_rank < 0 || src_rank >= size_) throw CommError(fmt::format("{}: no rank {} in a world of {}", what, src_rank, size_));
  const int mpi_tag = checked_tag(tag, what);
  Guard guard(*this, what);
  reap_sends(false);
  MPI_Comm world = world_;
  std::vector<int64_t> header(kHeader);
  check_mpi(MPI_Recv(header.data(), static_cast<int>(kHeader), MPI_INT64_T, static_cast<int>(src_rank), mpi_tag, world,
                     MPI_STATUS_IGNORE),
            what);
  const auto dtype = static_cast<DType>(header[0]);
  const auto storage = static_cast<DType>(header[1]);
  Shape shape(header.begin() + 3, header.begin() + 3 + header[2]);
  std::vector<int64_t> mine = {static_cast<int64_t>(t.dtype()), static_cast<int64_t>(t.storage_dtype())};
  put_shape(mine, t.shape());
  if (mine != header) {
    // Drain the payload, then report.
    MPI_Status status;
    check_mpi(MPI_Probe(static_cast<int>(src_rank), mpi_tag, world, &status), what);
    int bytes = 0;
    MPI_Get_count(&status, MPI_BYTE, &bytes);
    std::vector<std::byte> scratch(static_cast<size_t>(bytes));
    check_mpi(MPI_Recv(scratch.data(), bytes, MPI_BYTE, static_cast<int>(src_rank), mpi_tag, world, MPI_STATUS_IGNORE),
              what);
    std::string sent = fmt::format("{}{}", dtype_name(dtype), shape_string(shape));
    if (storage != dtype) sent += fmt::format(" (storage {})", dtype_name(storage));
    throw CommError(fmt::format("{} on rank {}: rank {} sent {}, the receiving tensor is {}", what, rank_, src_rank,
                                sent, t.describe()));
  }
  check_mpi(MPI_Recv(t.data(), to_int(static_cast<int64_t>(t.nbytes()), what), MPI_BYTE, static_cast<int>(src_rank),
                     mpi_tag, world, MPI_STATUS_IGNORE),
            what);
}

void run_on_mpi(const std::function<void(Comm&)>& body, std::chrono::milliseconds timeout) {
  MpiComm comm;
  comm.set_timeout(timeout);
  try {
    body(comm);
  } catch (const std::exception& e) {
    comm.abort(e.what());
  } catch (...) {
    comm.abort("unknown exception (not a std::exception)");
  }
}

}  // namespace paritron::opt
