// ThreadComm's CommMemory strategy (optimized/comm/thread_comm.h), on the
// host: the hooks the device-local comm (device_local_comm.h) relies on,
// exercised with QueuedMemory, a host stand-in for a device stream. It queues
// every copy and sum and runs them only at before_post / after_complete (as
// a stream runs at synchronisation), and stores bf16 / fp16 as 2 bytes,
// summed in fp32 and rounded once (as the device comm does). Every op is run
// on it and on plain ThreadComm with the same values: the results must agree
// bit for bit. A missing synchronisation point, a copy issued before its sum,
// or a peer released before this rank's queued writes ran shows up as a
// difference. Also: check_calls (16-bit storages summable, messages
// unchanged), failing hooks, and run_on_world's failure semantics.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "common/math/float_format.h"
#include "common/parallel_config.h"
#include "optimized/comm/comm_util.h"
#include "optimized/comm/groups.h"
#include "optimized/comm/run_ranks.h"
#include "optimized/comm/thread_comm.h"

namespace paritron::opt {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using comm_detail::CallDesc;

// ---------------------------------------------------------------------------
// Tensors of any storage.

DTensor make(DType dtype, Shape shape, DType storage) {
  const size_t n = static_cast<size_t>(shape_numel(shape)) * dtype_size(storage);
  std::shared_ptr<std::byte> buf(new std::byte[std::max<size_t>(n, 1)](), std::default_delete<std::byte[]>());
  return DTensor(buf, 0, dtype, storage, std::move(shape));
}

double load(const void* p, DType storage, int64_t i) {
  switch (storage) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::BF16: return math::bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return math::decode(static_cast<const uint16_t*>(p)[i], math::kFloat16);
    case DType::I64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::I32: return static_cast<const int32_t*>(p)[i];
    default: throw Error("load: unexpected storage");
  }
}

// Stores a value already representable in the storage (16-bit: RNE from fp32).
void store(void* p, DType storage, int64_t i, double v) {
  switch (storage) {
    case DType::F32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::F64: static_cast<double*>(p)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = math::float_to_bf16_bits(static_cast<float>(v)); break;
    case DType::F16:
      static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(math::encode(static_cast<float>(v), math::kFloat16));
      break;
    default: throw Error("store: unexpected storage");
  }
}

// The storage a dtype gets: its own ("device", 2-byte 16-bit floats) or the
// CPU backend's carrier (F32 for every float narrower than F64).
DType storage_of(DType dtype, bool own) {
  if (own || dtype == DType::F64) return dtype;
  return DType::F32;
}

double rounded(DType dtype, double v) {
  if (dtype == DType::F64) return v;
  if (dtype == DType::F32) return static_cast<float>(v);
  return math::round_to(static_cast<float>(v), *float_format(dtype));
}

template <typename F>
DTensor filled(DType dtype, bool own_storage, Shape shape, F v) {
  DTensor t = make(dtype, std::move(shape), storage_of(dtype, own_storage));
  for (int64_t i = 0; i < t.numel(); ++i) store(t.data(), t.storage_dtype(), i, rounded(dtype, v(i)));
  return t;
}

void record(std::vector<double>& out, const DTensor& t) {
  for (int64_t i = 0; i < t.numel(); ++i) out.push_back(load(t.data(), t.storage_dtype(), i));
}

// ---------------------------------------------------------------------------
// QueuedMemory.

class QueuedMemory final : public CommMemory {
 public:
  std::string_view name() const override { return "queued"; }
  void before_post(std::string_view context) override {
    ++posts;
    if (fail_before_post) throw CommError(fmt::format("{}: queued memory failed before posting", context));
    flush();
  }
  void after_complete(std::string_view context) override {
    ++completes;
    flush();
    if (fail_after_complete) throw CommError(fmt::format("{}: queued memory failed to complete", context));
  }
  void copy(void* dst, const void* src, size_t bytes, std::string_view) override {
    queue_.push_back([=] { std::memcpy(dst, src, bytes); });
  }
  bool can_sum(DType storage) const override {
    return CommMemory::can_sum(storage) || storage == DType::BF16 || storage == DType::F16;
  }
  void sum_members(const std::vector<const void*>& inputs, DType dtype, DType storage,
                   const math::FloatFormat* round_to, int64_t begin, int64_t count, void* out,
                   std::string_view context) override {
    ++sums;
    if (storage != DType::BF16 && storage != DType::F16) {
      const std::string ctx(context);
      queue_.push_back(
          [=, this] { CommMemory::sum_members(inputs, dtype, storage, round_to, begin, count, out, ctx); });
      return;
    }
    queue_.push_back([=] {
      for (int64_t i = 0; i < count; ++i) {
        float acc = static_cast<float>(load(inputs[0], storage, begin + i));
        for (size_t m = 1; m < inputs.size(); ++m) acc += static_cast<float>(load(inputs[m], storage, begin + i));
        store(out, storage, i, static_cast<double>(acc));  // the store rounds (RNE)
      }
    });
  }
  // Producer work the test body queues "on the stream" (like a kernel that
  // writes a collective's input): before_post must run it.
  void enqueue(std::function<void()> f) { queue_.push_back(std::move(f)); }

  std::atomic<int> posts{0}, completes{0}, sums{0};
  bool fail_before_post = false, fail_after_complete = false;

 private:
  void flush() {
    while (!queue_.empty()) {
      queue_.front()();
      queue_.pop_front();
    }
  }
  std::deque<std::function<void()>> queue_;
};

struct QueuedWorld {
  std::vector<QueuedMemory*> memory;
  std::unique_ptr<ThreadWorld> world;
  explicit QueuedWorld(int64_t n) {
    memory.resize(static_cast<size_t>(n));
    world = std::make_unique<ThreadWorld>(n, [this](int64_t r) {
      auto m = std::make_unique<QueuedMemory>();
      memory[static_cast<size_t>(r)] = m.get();
      return m;
    });
  }
};

// ---------------------------------------------------------------------------
// check_calls.

CallDesc call(std::string_view op, DType dtype, DType storage, Shape in, Shape out = {}, bool has_out = false) {
  CallDesc d;
  d.op = op;
  d.group_name = "world";
  d.has_in = true;
  d.dtype = dtype;
  d.storage = storage;
  d.in_shape = std::move(in);
  d.has_out = has_out;
  if (has_out) {
    d.out_dtype = dtype;
    d.out_storage = storage;
    d.out_shape = std::move(out);
  }
  return d;
}

std::string check(const std::vector<CallDesc>& calls, bool device) {
  std::vector<const CallDesc*> ptrs;
  for (const auto& c : calls) ptrs.push_back(&c);
  QueuedMemory q;
  CommMemory host;
  const Group g = world_group(static_cast<int64_t>(calls.size()), 0);
  if (device) return comm_detail::check_calls(ptrs, g, [&](DType d) { return q.can_sum(d); });
  return comm_detail::check_calls(ptrs, g, [&](DType d) { return host.can_sum(d); });
}

TEST(CheckCallsWith, SixteenBitStoragesAreSummableWhereTheMemorySumsThem) {
  const auto bf = DType::BF16;
  EXPECT_EQ(check({call("all_reduce", bf, bf, {4, 8}), call("all_reduce", bf, bf, {4, 8})}, true), "");
  EXPECT_EQ(check({call("reduce_scatter", bf, bf, {4, 2}, {2, 2}, true),
                   call("reduce_scatter", bf, bf, {4, 2}, {2, 2}, true)},
                  true),
            "");
  // The host memory keeps check_calls' verdict.
  EXPECT_EQ(check({call("all_reduce", bf, bf, {4, 8}), call("all_reduce", bf, bf, {4, 8})}, false),
            "all_reduce on group world [0, 1]: cannot sum BF16 storage: rank 0 passed all_reduce(BF16[4, 8]), "
            "rank 1 passed all_reduce(BF16[4, 8])");
  // fp8 is summable nowhere.
  const auto f8 = DType::F8_E4M3;
  EXPECT_NE(check({call("all_reduce", f8, f8, {2}), call("all_reduce", f8, f8, {2})}, true)
                .find("cannot sum F8_E4M3 storage"),
            std::string::npos);
}

TEST(CheckCallsWith, MessagesShowTheRealCalls) {
  const auto bf = DType::BF16, h = DType::F16;
  // A failure after the summability test (shapes): the stand-in storage must
  // not leak into the message.
  EXPECT_EQ(check({call("all_reduce", bf, bf, {4, 8}), call("all_reduce", bf, bf, {4, 9})}, true),
            "all_reduce on group world [0, 1]: members passed different shapes: rank 0 passed all_reduce(BF16[4, 8]), "
            "rank 1 passed all_reduce(BF16[4, 9])");
  EXPECT_EQ(check({call("reduce_scatter", bf, bf, {4, 2}, {2, 2}, true),
                   call("reduce_scatter", bf, bf, {4, 2}, {3, 2}, true)},
                  true),
            "reduce_scatter on group world [0, 1]: outputs must be [2, 2]: rank 0 passed reduce_scatter(BF16[4, 2] -> "
            "BF16[2, 2]), rank 1 passed reduce_scatter(BF16[4, 2] -> BF16[3, 2])");
  // Failures before it (dtypes, outputs) come from the real calls.
  EXPECT_EQ(check({call("all_reduce", bf, bf, {4}), call("all_reduce", h, h, {4})}, true),
            "all_reduce on group world [0, 1]: members passed different dtypes: rank 0 passed all_reduce(BF16[4]), "
            "rank 1 passed all_reduce(F16[4])");
  std::vector<CallDesc> mixed = {call("reduce_scatter", bf, bf, {4}, {2}, true),
                                 call("reduce_scatter", bf, bf, {4}, {2}, true)};
  mixed[1].out_dtype = mixed[1].out_storage = DType::F32;
  EXPECT_NE(check(mixed, true).find("output dtype differs from the input dtype"), std::string::npos)
      << check(mixed, true);
  // Different operations, one of them a sum of bf16.
  std::vector<CallDesc> ops = {call("all_reduce", bf, bf, {2, 2}), call("all_gather", bf, bf, {2, 2}, {4, 2}, true)};
  EXPECT_EQ(check(ops, true),
            "collective on group world [0, 1]: members called different operations: rank 0 passed "
            "all_reduce(BF16[2, 2]), rank 1 passed all_gather(BF16[2, 2] -> BF16[4, 2])");
}

// ---------------------------------------------------------------------------
// Every op on QueuedMemory vs plain ThreadComm.

double value(int64_t r, int64_t i) {
  // Magnitudes spread over 7 decades: fp32 sums depend on the order.
  return std::sin(0.37 * static_cast<double>(r * 1000 + i)) * std::pow(10.0, static_cast<double>((r + i) % 7) - 3);
}

// Runs every op on `comm` with dtype-rounded values; returns what this rank
// saw, element by element, as doubles.
std::vector<double> program(Comm& c, DType dtype, bool own_storage) {
  const int64_t n = c.world_size(), r = c.rank();
  const Group world = world_group(n, r);
  std::vector<double> seen;
  // all_reduce, world and (n even) tp-like pairs.
  DTensor t = filled(dtype, own_storage, {37}, [&](int64_t i) { return value(r, i); });
  c.all_reduce(t, world);
  record(seen, t);
  if (n % 2 == 0) {
    const ParallelConfig pc = ParallelConfig::parse_layout(fmt::format("tp2-dp{}", n / 2));
    for (GroupKind kind : {GroupKind::kTensor, GroupKind::kData}) {
      const Group g = make_group(pc, kind, r);
      DTensor u = filled(dtype, own_storage, {5, 3}, [&](int64_t i) { return value(r + 7, i); });
      c.all_reduce(u, g);
      record(seen, u);
    }
  }
  // all_gather.
  DTensor in = filled(dtype, own_storage, {3, 5}, [&](int64_t i) { return value(r, 100 + i); });
  DTensor out = make(dtype, {3 * n, 5}, in.storage_dtype());
  c.all_gather(in, out, world);
  record(seen, out);
  // reduce_scatter.
  DTensor big = filled(dtype, own_storage, {2 * n, 3}, [&](int64_t i) { return value(r, 200 + i); });
  DTensor part = make(dtype, {2, 3}, big.storage_dtype());
  c.reduce_scatter(big, part, world);
  record(seen, part);
  // all_to_all_v: uneven and zero counts.
  auto count = [](int64_t s, int64_t d) { return (s + d) % 3; };
  std::vector<int64_t> send, recv;
  int64_t rows_in = 0, rows_out = 0;
  for (int64_t d = 0; d < n; ++d) {
    send.push_back(count(r, d));
    recv.push_back(count(d, r));
    rows_in += send.back();
    rows_out += recv.back();
  }
  DTensor a_in = filled(dtype, own_storage, {rows_in, 4}, [&](int64_t i) { return value(r, 300 + i); });
  DTensor a_out = make(dtype, {rows_out, 4}, a_in.storage_dtype());
  c.all_to_all_v(a_in, send, a_out, recv, world);
  record(seen, a_out);
  // broadcast from the last member.
  DTensor b = filled(dtype, own_storage, {6}, [&](int64_t i) { return value(r, 400 + i); });
  c.broadcast(b, n - 1, world);
  record(seen, b);
  // send / recv ring (buffered: everyone sends first).
  if (n > 1) {
    c.send(filled(dtype, own_storage, {2, 2}, [&](int64_t i) { return value(r, 500 + i); }), (r + 1) % n, 7);
    DTensor m = make(dtype, {2, 2}, storage_of(dtype, own_storage));
    c.recv(m, (r + n - 1) % n, 7);
    record(seen, m);
  }
  for (int64_t v : c.all_gather_ints(std::vector<int64_t>{r, 10 * r}, world)) seen.push_back(static_cast<double>(v));
  c.barrier(world);
  return seen;
}

void expect_same_bits(const std::vector<double>& a, const std::vector<double>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(std::memcmp(&a[i], &b[i], sizeof(double)), 0) << what << " element " << i << ": " << a[i] << " vs " << b[i];
  }
}

class QueuedVsThreads : public ::testing::TestWithParam<std::tuple<int64_t, DType>> {};

TEST_P(QueuedVsThreads, EveryOpGivesThreadCommsBits) {
  const auto [n, dtype] = GetParam();
  std::vector<std::vector<double>> host(static_cast<size_t>(n)), queued(static_cast<size_t>(n));
  run_on_threads(n, [&](Comm& c) { host[static_cast<size_t>(c.rank())] = program(c, dtype, false); }, 10s);
  QueuedWorld qw(n);
  qw.world->set_timeout(10s);
  run_on_world(*qw.world, [&](Comm& c) {
    EXPECT_EQ(c.name(), "queued");
    queued[static_cast<size_t>(c.rank())] = program(c, dtype, true);
  });
  for (int64_t r = 0; r < n; ++r) {
    expect_same_bits(host[static_cast<size_t>(r)], queued[static_cast<size_t>(r)],
                     fmt::format("rank {} of {}, {}", r, n, dtype_name(dtype)));
  }
  // Every collective passed through both hooks exactly once.
  for (QueuedMemory* m : qw.memory) EXPECT_EQ(m->posts.load(), m->completes.load());
}

INSTANTIATE_TEST_SUITE_P(Comm, QueuedVsThreads,
                         ::testing::Combine(::testing::Values<int64_t>(1, 2, 3, 4),
                                            ::testing::Values(DType::F32, DType::BF16, DType::F16, DType::F64)),
                         [](const auto& info) {
                           return fmt::format("np{}_{}", std::get<0>(info.param), dtype_name(std::get<1>(info.param)));
                         });

TEST(QueuedMemory, SixteenBitSumsRoundOnceAfterTheFp32Sum) {
  // bf16: 1 + (1 + 2^-7) + (1 + 2^-7) = 3 + 2^-6 in fp32, rounded once to
  // bf16 (ulp 2^-6 at 3): 3 + 2^-6 exactly. Rounding after each addition
  // would give round(2 + 2^-7) = 2 (ties to even), then 3 + 2^-7 -> 3.
  QueuedWorld qw(3);
  run_on_world(*qw.world, [](Comm& c) {
    DTensor t = filled(DType::BF16, true, {1}, [&](int64_t) { return c.rank() == 0 ? 1.0 : 1.0 + std::ldexp(1.0, -7); });
    c.all_reduce(t, world_group(3, c.rank()));
    EXPECT_EQ(load(t.data(), DType::BF16, 0), 3.0 + std::ldexp(1.0, -6));
  });
}

TEST(QueuedMemory, InputsQueuedBeforeACollectiveAreReadyForThePeers) {
  // Each rank's input is written by queued "producer" work issued just
  // before the collective: before_post must run it before the peers read.
  const int64_t n = 4;
  QueuedWorld qw(n);
  run_on_world(*qw.world, [&](Comm& c) {
    const int64_t r = c.rank();
    QueuedMemory& mem = *qw.memory[static_cast<size_t>(r)];
    for (int iter = 0; iter < 50; ++iter) {
      DTensor t = make(DType::F32, {64}, DType::F32);
      DTensor in = make(DType::F32, {2, 8}, DType::F32);
      mem.enqueue([=]() mutable {
        for (int64_t i = 0; i < 64; ++i) t.f32()[i] = static_cast<float>(r * 100 + i + iter);
        for (int64_t i = 0; i < 16; ++i) in.f32()[i] = static_cast<float>(r * 16 + i + iter);
      });
      c.all_reduce(t, world_group(n, r));
      for (int64_t i = 0; i < 64; ++i) ASSERT_EQ(t.f32()[i], static_cast<float>(100 * n * (n - 1) / 2 + n * (i + iter)));
      DTensor out = make(DType::F32, {2 * n, 8}, DType::F32);
      c.all_gather(in, out, world_group(n, r));
      for (int64_t i = 0; i < 16 * n; ++i) ASSERT_EQ(out.f32()[i], static_cast<float>(i + iter));
    }
  });
}

TEST(QueuedMemory, SixteenBitMismatchIsReportedOnEveryMemberWithTheRealCalls) {
  const int64_t n = 2;
  QueuedWorld qw(n);
  std::vector<std::string> errors(n);
  std::vector<std::thread> threads;
  for (int64_t r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        DTensor t = make(DType::BF16, {4, r == 1 ? 9 : 8}, DType::BF16);
        qw.world->comm(r).all_reduce(t, world_group(n, r));
      } catch (const CommError& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors) {
    EXPECT_EQ(e, "all_reduce on group world [0, 1]: members passed different shapes: rank 0 passed "
                 "all_reduce(BF16[4, 8]), rank 1 passed all_reduce(BF16[4, 9])");
  }
}

// ---------------------------------------------------------------------------
// Failing hooks and the runner.

TEST(QueuedMemory, AFailingCompletionIsThrownByItsRankAndReleasesThePeers) {
  // Rank 1's work fails when it waits for it: its all_reduce throws that
  // error (after the second rendezvous, so nobody waits forever); the runner
  // reports rank 1 as the root cause.
  const int64_t n = 3;
  QueuedWorld qw(n);
  qw.world->set_timeout(10s);
  qw.memory[1]->fail_after_complete = true;
  const auto start = Clock::now();
  try {
    run_on_world(*qw.world, [&](Comm& c) {
      DTensor t = filled(DType::F32, true, {5}, [&](int64_t i) { return c.rank() + i; });
      c.all_reduce(t, world_group(n, c.rank()));
      c.barrier(world_group(n, c.rank()));
    });
    FAIL() << "no error";
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 1);
    EXPECT_EQ(std::string(e.what()), "rank 1 failed: all_reduce on group world [0, 1, 2]: queued memory failed to complete");
  }
  EXPECT_LT(Clock::now() - start, 5s);
}

TEST(QueuedMemory, AFailureBeforePostingFailsTheRunNamingTheRank) {
  const int64_t n = 2;
  QueuedWorld qw(n);
  qw.world->set_timeout(10s);
  qw.memory[0]->fail_before_post = true;
  const auto start = Clock::now();
  try {
    run_on_world(*qw.world, [&](Comm& c) {
      DTensor t = make(DType::F32, {3}, DType::F32);
      c.all_reduce(t, world_group(n, c.rank()));
    });
    FAIL() << "no error";
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 0);
    EXPECT_EQ(std::string(e.what()), "rank 0 failed: all_reduce on group world [0, 1]: queued memory failed before posting");
  }
  EXPECT_LT(Clock::now() - start, 5s);
}

TEST(QueuedMemory, TimeoutsAndRetiredRanksAreThreadComms) {
  // A slow rank: the waiting rank times out with ThreadComm's message.
  QueuedWorld slow(2);
  slow.world->set_timeout(200ms);
  try {
    run_on_world(*slow.world, [](Comm& c) {
      if (c.rank() == 1) std::this_thread::sleep_for(500ms);
      DTensor t = make(DType::BF16, {1}, DType::BF16);
      c.all_reduce(t, world_group(2, c.rank()));
    });
    FAIL();
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 0);
    EXPECT_EQ(std::string(e.what()),
              "rank 0 failed: all_reduce on group world [0, 1]: rank 0 timed out after 200 ms waiting for rank 1 "
              "(not arrived)");
  }
  // A rank that returned: its peers fail at once.
  QueuedWorld early(2);
  early.world->set_timeout(30s);
  const auto start = Clock::now();
  try {
    run_on_world(*early.world, [](Comm& c) {
      if (c.rank() == 0) c.barrier(world_group(2, 0));
    });
    FAIL();
  } catch (const RankFailed& e) {
    EXPECT_NE(std::string(e.what()).find("barrier on group world [0, 1]: rank 1 finished without joining it"),
              std::string::npos)
        << e.what();
  }
  EXPECT_LT(Clock::now() - start, 2s);
}

TEST(RunOnWorld, AbortsPeersAndRethrowsTheRootCause) {
  ThreadWorld world(3);
  world.set_timeout(10s);
  std::mutex mu;
  std::vector<std::string> seen(3);
  const auto start = Clock::now();
  try {
    run_on_world(world, [&](Comm& c) {
      if (c.rank() == 2) {
        std::this_thread::sleep_for(30ms);
        throw Error("boom");
      }
      try {
        c.barrier(world_group(3, c.rank()));
      } catch (const CommError& e) {
        std::lock_guard<std::mutex> lock(mu);
        seen[static_cast<size_t>(c.rank())] = e.what();
        throw;
      }
    });
    FAIL();
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 2);
    EXPECT_EQ(std::string(e.what()), "rank 2 failed: boom");
    EXPECT_THROW(std::rethrow_exception(e.cause()), Error);
  }
  EXPECT_LT(Clock::now() - start, 2s);
  for (int r : {0, 1}) EXPECT_EQ(seen[r], fmt::format("rank 2 failed: boom [rank {} in barrier on group world [0, 1, 2]]", r));
  // A clean run returns; the default memory is ThreadComm's.
  ThreadWorld clean(2);
  EXPECT_NO_THROW(run_on_world(clean, [](Comm& c) {
    EXPECT_EQ(c.name(), "threads");
    c.barrier(world_group(2, c.rank()));
  }));
}

TEST(ThreadWorld, AFactoryMustMakeAMemory) {
  EXPECT_THROW(ThreadWorld(2, [](int64_t) { return std::unique_ptr<CommMemory>(); }), CommError);
}

}  // namespace
}  // namespace paritron::opt
