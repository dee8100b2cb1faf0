// NcclComm (optimized/comm/nccl_comm.h) under mpirun, one process per GPU.
//
// Control.* (MPI only, run on every machine with MPI, GPU or not): the
// control plane nccl_detail::MpiControl: descriptors agreed by the group's
// first member, every member throwing the same message on a mismatch, group
// disagreements, communicator ids handed out, all_gather_ints, buffered
// tag-matched messages, a recv that times out without consuming, a missing
// member timing out by name.
//
// Nccl.* (NCCL builds; skip on every rank unless every rank has a usable
// GPU): every op on the world and on the groups of real layouts (lazily
// created and ncclCommSplit ones), exact results on integer-valued data,
// 16-bit sums rounded once after an fp32 sum, identical bits on every rank,
// buffered tag-matched send/recv, mismatches caught on every rank without
// ending the job.
//
//   mpirun -np <GPUs> ./nccl_comm_mpitest      (CPU only: any -np, e.g. 4 --oversubscribe)
//
// Fault demos (they end the job; ctest can match their output):
//   PARITRON_NCCL_FAULT=abort   -> "rank 1 aborting: boom in layer 3"
//   PARITRON_NCCL_FAULT=timeout -> rank 0: "all_reduce on group world [...]: rank 0 timed out after 500 ms
//                                  waiting for rank 1 (not arrived)", then the job is aborted
#include "optimized/comm/nccl_comm.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <iostream>
#include <string>

#if defined(PARITRON_HAVE_MPI)

#include <fmt/format.h>
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "common/parallel_config.h"
#include "optimized/comm/comm_util.h"
#include "optimized/comm/groups.h"
#include "optimized/comm/mpi_comm.h"
#if defined(PARITRON_HAVE_NCCL)
#include <cuda_runtime_api.h>

#include "optimized/cuda/cuda_backend.h"
#endif

namespace paritron::opt {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using nccl_detail::MpiControl;
using comm_detail::CallDesc;

// ---------------------------------------------------------------------------
// The control plane, without a GPU.

// What the tests' fatal callback throws (NcclComm's aborts its communicators).
class Fatal : public CommError {
 public:
  using CommError::CommError;
};

std::unique_ptr<MpiControl> make_control(std::chrono::milliseconds timeout) {
  return std::make_unique<MpiControl>([timeout] { return timeout; },
                                      [](const std::string& message) { throw Fatal(message); });
}

MpiControl* g_control = nullptr;

bool device_sums(DType d) {
  return d == DType::F32 || d == DType::F64 || d == DType::BF16 || d == DType::F16 || d == DType::I32 ||
         d == DType::I64;
}

std::string no_id(MpiControl::UniqueId&) { return "make_id called without need"; }

CallDesc desc(std::string_view op, DType dtype, Shape shape) {
  CallDesc d;
  d.op = op;
  d.has_in = true;
  d.dtype = d.storage = dtype;
  d.in_shape = std::move(shape);
  return d;
}

CallDesc ints_desc(int64_t count) {
  CallDesc d;
  d.op = "all_gather_ints";
  d.num_ints = count;
  return d;
}

// Every rank's error text is the same: compare lengths and a hash.
void expect_same_everywhere(MpiControl& c, const std::string& e) {
  uint64_t h = 1469598103934665603ull;
  for (char ch : e) h = (h ^ static_cast<uint8_t>(ch)) * 1099511628211ull;
  const Group world = world_group(c.size(), c.rank());
  const std::vector<int64_t> mine = {static_cast<int64_t>(e.size()), static_cast<int64_t>(h >> 1)};
  const auto all = c.agree(ints_desc(2), world, mine, false, no_id, device_sums, "compare").ints;
  for (int64_t q = 0; q < c.size(); ++q) {
    EXPECT_EQ(all[static_cast<size_t>(2 * q)], all[0]) << "rank " << q << " saw another message than rank 0";
    EXPECT_EQ(all[static_cast<size_t>(2 * q + 1)], all[1]) << "rank " << q << " saw another message than rank 0";
  }
}

class Control : public ::testing::Test {
 protected:
  MpiControl& c = *g_control;
  int64_t r = g_control->rank();
  int64_t n = g_control->size();
  std::string agree_error(const CallDesc& d, const Group& g) {
    try {
      c.agree(d, g, {}, false, no_id, device_sums, fmt::format("{} on group {}", d.op, g.describe()));
    } catch (const Fatal&) {
      throw;
    } catch (const CommError& e) {
      return e.what();
    }
    return "";
  }
};

TEST_F(Control, AgreesAndGathersIntsOnTheWorldAndOnLayoutGroups) {
  std::vector<Group> groups = {world_group(n, r)};
  for (const std::string& layout : {fmt::format("tp{}", n), fmt::format("pp{}", n)}) {
    const ParallelConfig pc = ParallelConfig::parse_layout(layout);
    for (GroupKind kind : {GroupKind::kTensor, GroupKind::kPipeline, GroupKind::kData}) {
      groups.push_back(make_group(pc, kind, r));
    }
  }
  if (n == 4) {
    const ParallelConfig pc = ParallelConfig::parse_layout("tp2-dp2");
    groups.push_back(make_group(pc, GroupKind::kTensor, r));
    groups.push_back(make_group(pc, GroupKind::kData, r));
  }
  for (const Group& g : groups) {
    SCOPED_TRACE(g.describe());
    const std::vector<int64_t> mine = {r, 10 * r};
    const auto a = c.agree(ints_desc(2), g, mine, false, no_id, device_sums, "all_gather_ints");
    std::vector<int64_t> expect;
    for (int64_t m : g.ranks) {
      expect.push_back(m);
      expect.push_back(10 * m);
    }
    EXPECT_EQ(a.ints, expect);
    EXPECT_FALSE(a.id.has_value());
    EXPECT_EQ(agree_error(desc("all_reduce", DType::BF16, {4, 8}), g), "");  // bf16 sums: fine on a device
    CallDesc barrier;
    barrier.op = "barrier";
    EXPECT_EQ(agree_error(barrier, g), "");
  }
}

TEST_F(Control, MismatchesGiveTheSameMessageOnEveryMember) {
  if (n < 2) GTEST_SKIP() << "needs at least 2 ranks";
  const Group g = world_group(n, r);
  std::string e = agree_error(desc("all_reduce", DType::BF16, {4, r == n - 1 ? 9 : 8}), g);
  std::string expect = fmt::format("all_reduce on group {}: members passed different shapes", g.describe());
  for (int64_t q = 0; q < n; ++q) {
    expect += fmt::format("{} rank {} passed all_reduce(BF16[4, {}])", q == 0 ? ":" : ",", q, q == n - 1 ? 9 : 8);
  }
  EXPECT_EQ(e, expect);
  expect_same_everywhere(c, e);
  e = agree_error(desc("all_reduce", r == 0 ? DType::BF16 : DType::F32, {3}), g);
  EXPECT_NE(e.find("members passed different dtypes: rank 0 passed all_reduce(BF16[3])"), std::string::npos) << e;
  expect_same_everywhere(c, e);
  e = agree_error(desc("all_reduce", DType::F8_E4M3, {3}), g);
  EXPECT_NE(e.find("cannot sum F8_E4M3 storage"), std::string::npos) << e;
  expect_same_everywhere(c, e);
  CallDesc gather = desc("all_gather", DType::F32, {2, 2});
  gather.has_out = true;
  gather.out_shape = {2 * n, 2};
  e = agree_error(r == 1 ? gather : desc("all_reduce", DType::F32, {2, 2}), g);
  EXPECT_NE(e.find(fmt::format("collective on group {}: members called different operations", g.describe())),
            std::string::npos)
      << e;
  EXPECT_NE(e.find(fmt::format("rank 1 passed all_gather(F32[2, 2] -> F32[{}, 2])", 2 * n)), std::string::npos) << e;
  expect_same_everywhere(c, e);
  // Still usable.
  EXPECT_EQ(agree_error(desc("all_reduce", DType::F32, {1}), g), "");
}

TEST_F(Control, MembersThatDisagreeOnTheGroupAreTold) {
  if (n < 2) GTEST_SKIP() << "needs at least 2 ranks";
  // Rank 1 believes the group has a third member; the first member (rank 0)
  // sees it and tells both.
  if (r < 2) {
    Group g{"pair", {0, 1}, r};
    if (r == 1) g.ranks.push_back(n);  // a rank that does not exist: it is never contacted
    CallDesc d;
    d.op = "barrier";
    const std::string e = agree_error(d, g);
    EXPECT_EQ(e, fmt::format("barrier on group pair [0, 1]: members disagree on the group: rank 1 called barrier on "
                             "group pair [0, 1, {}]",
                             n))
        << "rank " << r;
  }
  CallDesc d;
  d.op = "barrier";
  EXPECT_EQ(agree_error(d, world_group(n, r)), "");
}

TEST_F(Control, TheFirstMemberHandsItsIdToEveryMember) {
  if (n < 2) GTEST_SKIP() << "needs at least 2 ranks";
  const Group g = world_group(n, r);
  std::atomic<int> made{0};
  auto make_id = [&](MpiControl::UniqueId& id) {
    ++made;
    for (size_t i = 0; i < id.size(); ++i) id[i] = static_cast<std::byte>((i * 7 + 3) & 0xFF);
    return std::string();
  };
  const auto a = c.agree(desc("all_reduce", DType::F32, {2}), g, {}, true, make_id, device_sums, "new group");
  ASSERT_TRUE(a.id.has_value());
  for (size_t i = 0; i < a.id->size(); ++i) ASSERT_EQ((*a.id)[i], static_cast<std::byte>((i * 7 + 3) & 0xFF)) << i;
  EXPECT_EQ(made.load(), r == 0 ? 1 : 0);
  // The id cannot be made: every member throws the maker's text.
  std::string e;
  try {
    c.agree(desc("all_reduce", DType::F32, {2}), g, {}, true,
            [](MpiControl::UniqueId&) { return std::string("ncclGetUniqueId failed: no network"); }, device_sums,
            "new group");
  } catch (const Fatal&) {
    throw;
  } catch (const CommError& x) {
    e = x.what();
  }
  EXPECT_EQ(e, "ncclGetUniqueId failed: no network");
  // Members that disagree on whether they need one: an error on every member.
  e.clear();
  try {
    c.agree(desc("all_reduce", DType::F32, {2}), g, {}, r == 0, make_id, device_sums, "all_reduce on group world");
  } catch (const Fatal&) {
    throw;
  } catch (const CommError& x) {
    e = x.what();
  }
  EXPECT_NE(e.find("the members disagree on whether the group has a communicator"), std::string::npos) << e;
  expect_same_everywhere(c, e);
}

std::vector<std::byte> bytes_of(int64_t count, int64_t seed) {
  std::vector<std::byte> b(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) b[static_cast<size_t>(i)] = static_cast<std::byte>((seed * 31 + i) & 0xFF);
  return b;
}

TEST_F(Control, MessagesAreBufferedFifoAndTagMatched) {
  // Everyone sends first (4 MiB, then three small ones with another tag),
  // then receives the later tag first.
  const int64_t next = (r + 1) % n, prev = (r + n - 1) % n;
  c.send({r, 1}, bytes_of(4 << 20, r), next, 1, "send");
  for (int64_t k = 0; k < 3; ++k) c.send({r, k}, bytes_of(10, r * 10 + k), next, 2, "send");
  std::vector<int64_t> header;
  std::vector<std::byte> payload;
  for (int64_t k = 0; k < 3; ++k) {
    ASSERT_TRUE(c.recv(prev, 2, header, payload, "recv"));
    EXPECT_EQ(header, (std::vector<int64_t>{prev, k}));
    EXPECT_EQ(payload, bytes_of(10, prev * 10 + k));
  }
  ASSERT_TRUE(c.recv(prev, 1, header, payload, "recv"));
  EXPECT_EQ(header, (std::vector<int64_t>{prev, 1}));
  EXPECT_EQ(payload, bytes_of(4 << 20, prev));
  // An empty payload.
  c.send({7}, {}, next, 3, "send");
  ASSERT_TRUE(c.recv(prev, 3, header, payload, "recv"));
  EXPECT_TRUE(payload.empty());
  EXPECT_THROW(c.send({}, {}, n, 1, "send"), CommError);  // no such rank
  EXPECT_THROW(c.send({}, {}, next, -1, "send"), CommError);  // no such tag
}

TEST_F(Control, ARecvThatTimesOutConsumesNothing) {
  auto quick = make_control(200ms);
  if (r == 0 && n > 1) {
    std::vector<int64_t> header;
    std::vector<std::byte> payload;
    const auto start = Clock::now();
    EXPECT_FALSE(quick->recv(1, 9, header, payload, "recv"));
    EXPECT_GE(Clock::now() - start, 190ms);
  }
  CallDesc d;
  d.op = "barrier";
  c.agree(d, world_group(n, r), {}, false, no_id, device_sums, "barrier");
  if (r == 1) quick->send({42}, bytes_of(3, 1), 0, 9, "send");
  if (r == 0 && n > 1) {
    std::vector<int64_t> header;
    std::vector<std::byte> payload;
    ASSERT_TRUE(quick->recv(1, 9, header, payload, "recv"));
    EXPECT_EQ(header, std::vector<int64_t>{42});
  }
  c.agree(d, world_group(n, r), {}, false, no_id, device_sums, "barrier");
}

TEST_F(Control, AMissingMemberTimesOutByName) {
  // The last rank never joins: the first member names it, the others say
  // whom they waited for; all within about the timeout.
  auto quick = make_control(300ms);
  if (n > 1 && r != n - 1) {
    CallDesc d;
    d.op = "barrier";
    const Group g = world_group(n, r);
    const auto start = Clock::now();
    std::string e;
    try {
      quick->agree(d, g, {}, false, no_id, device_sums, fmt::format("barrier on group {}", g.describe()));
    } catch (const Fatal& x) {
      e = x.what();
    }
    const auto waited = Clock::now() - start;
    if (r == 0) {
      EXPECT_EQ(e, fmt::format("barrier on group {}: rank 0 timed out after 300 ms waiting for rank {} (not arrived)",
                               g.describe(), n - 1));
    } else {
      EXPECT_EQ(e, fmt::format("barrier on group {}: rank {} timed out after 300 ms waiting for rank 0 (the group's "
                               "first member) to collect every member's call (a member is missing, stuck or failed)",
                               g.describe(), r));
    }
    EXPECT_GE(waited, 290ms);
    EXPECT_LT(waited, 3s);
  }
  CallDesc d;
  d.op = "barrier";
  c.agree(d, world_group(n, r), {}, false, no_id, device_sums, "barrier");
}

#if defined(PARITRON_HAVE_NCCL)

NcclComm* g_comm = nullptr;
cuda::CudaBackend* g_be = nullptr;
std::string g_skip;

class Nccl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (g_comm == nullptr) GTEST_SKIP() << "no CUDA device / NCCL: " << g_skip;
  }
  NcclComm& c() { return *g_comm; }
  cuda::CudaBackend& be() { return *g_be; }
  int64_t r() const { return g_comm->rank(); }
  int64_t n() const { return g_comm->world_size(); }

  template <typename F>
  DTensor make(DType dtype, Shape shape, F v) {
    const int64_t count = shape_numel(shape);
    std::vector<double> values(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) values[static_cast<size_t>(i)] = static_cast<double>(v(i));
    return be().upload(Tensor::from_values(dtype, shape, values), dtype);
  }
  std::vector<double> read(const DTensor& t) { return be().download(t).to_doubles(); }
};

TEST_F(Nccl, EveryOpOnTheWorldGroup) {
  const Group g = world_group(n(), r());
  EXPECT_EQ(c().name(), "nccl");
  for (DType dtype : {DType::F32, DType::BF16, DType::F16, DType::F64}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    // Small integers (sums below 256 for up to 8 ranks, or even below 512):
    // exact in every dtype and every summation order.
    DTensor t = make(dtype, {3, 5}, [&](int64_t i) { return r() + i; });
    c().all_reduce(t, g);
    auto v = read(t);
    for (int64_t i = 0; i < 15; ++i) EXPECT_EQ(v[static_cast<size_t>(i)], static_cast<double>(n() * (n() - 1) / 2 + n() * i)) << i;
    DTensor in = make(dtype, {2, 3}, [&](int64_t i) { return 10 * r() + i; });
    DTensor out = be().zeros(dtype, {2 * n(), 3});
    c().all_gather(in, out, g);
    v = read(out);
    for (int64_t m = 0; m < n(); ++m)
      for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(v[static_cast<size_t>(m * 6 + i)], static_cast<double>(10 * m + i));
    DTensor big = make(dtype, {2 * n(), 2}, [&](int64_t i) { return r() + 1 + i; });
    DTensor part = be().zeros(dtype, {2, 2});
    c().reduce_scatter(big, part, g);
    v = read(part);
    for (int64_t i = 0; i < 4; ++i) {
      EXPECT_EQ(v[static_cast<size_t>(i)], static_cast<double>(n() * (n() + 1) / 2 + n() * (4 * r() + i)));
    }
    DTensor b = make(dtype, {4}, [&](int64_t i) { return 10 * r() + i; });
    c().broadcast(b, n() - 1, g);
    v = read(b);
    for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(v[static_cast<size_t>(i)], static_cast<double>(10 * (n() - 1) + i));
  }
  const std::vector<int64_t> mine{r(), -r(), 7};
  const auto all = c().all_gather_ints(mine, g);
  ASSERT_EQ(all.size(), static_cast<size_t>(3 * n()));
  for (int64_t m = 0; m < n(); ++m) {
    EXPECT_EQ(all[static_cast<size_t>(3 * m)], m);
    EXPECT_EQ(all[static_cast<size_t>(3 * m + 1)], -m);
  }
  c().barrier(g);
}

TEST_F(Nccl, SixteenBitSumsRoundOnceAfterAnFp32Sum) {
  // bf16: 1 + (n - 1)(1 + 2^-7), summed in fp32 (exact for n <= 8), rounded once.
  const Group g = world_group(n(), r());
  DTensor b = make(DType::BF16, {1}, [&](int64_t) { return r() == 0 ? 1.0 : 1.0 + std::ldexp(1.0, -7); });
  c().all_reduce(b, g);
  const double sum = 1.0 + static_cast<double>(n() - 1) * (1.0 + std::ldexp(1.0, -7));
  EXPECT_EQ(read(b)[0], Tensor::from_values(DType::BF16, {1}, std::vector<double>{sum}).get(0));
  // fp16 reduce_scatter: 2048 + (n - 1) -> rounded to fp16's even neighbours once.
  DTensor h = make(DType::F16, {n()}, [&](int64_t) { return r() == 0 ? 2048.0 : 1.0; });
  DTensor hp = be().zeros(DType::F16, {1});
  c().reduce_scatter(h, hp, g);
  const double hs = 2048.0 + static_cast<double>(n() - 1);
  EXPECT_EQ(read(hp)[0], Tensor::from_values(DType::F16, {1}, std::vector<double>{hs}).get(0));
  // f64: 1 + 2^-40 survives.
  DTensor d = make(DType::F64, {1}, [&](int64_t) { return r() == 0 ? 1.0 : std::ldexp(1.0, -40); });
  c().all_reduce(d, g);
  EXPECT_EQ(read(d)[0], 1.0 + static_cast<double>(n() - 1) * std::ldexp(1.0, -40));
}

TEST_F(Nccl, OrderSensitiveSumsGiveIdenticalBitsOnEveryRank) {
  const Group g = world_group(n(), r());
  for (DType dtype : {DType::F32, DType::BF16}) {
    DTensor t = make(dtype, {4099}, [&](int64_t i) {
      return std::sin(0.37 * static_cast<double>(r() * 1000 + i)) * std::pow(10.0, static_cast<double>((r() + i) % 7) - 3);
    });
    c().all_reduce(t, g);
    const Tensor host = be().download(t);
    uint64_t h = 1469598103934665603ull;
    for (std::byte x : host.bytes()) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
    const auto hashes = c().all_gather_ints(std::vector<int64_t>{static_cast<int64_t>(h >> 1)}, g);
    for (int64_t x : hashes) EXPECT_EQ(x, hashes[0]) << dtype_name(dtype);
  }
}

TEST_F(Nccl, GroupsOfRealLayoutsLazilyAndBySplit) {
  std::vector<std::string> layouts = {fmt::format("tp{}", n()), fmt::format("dp{}", n()), fmt::format("pp{}", n())};
  if (n() % 2 == 0 && n() > 2) {
    layouts.push_back(fmt::format("tp2-dp{}", n() / 2));
    layouts.push_back(fmt::format("tp2-pp{}", n() / 2));
  }
  const std::vector<GroupKind> kinds = {GroupKind::kTensor, GroupKind::kData, GroupKind::kPipeline,
                                        GroupKind::kModel};
  for (size_t li = 0; li < layouts.size(); ++li) {
    const ParallelConfig pc = ParallelConfig::parse_layout(layouts[li]);
    std::vector<Group> groups;
    for (GroupKind kind : kinds) groups.push_back(make_group(pc, kind, r()));
    if (li % 2 == 1) {
      c().split_groups(groups);  // world-collective: every rank passes its groups of the same kinds
      for (const Group& g : groups) {
        if (g.size() > 1) {
          EXPECT_TRUE(c().has_communicator(g.ranks)) << g.describe();
        }
      }
    }
    for (const Group& g : groups) {
      SCOPED_TRACE(layouts[li] + " " + g.describe());
      DTensor t = make(DType::BF16, {5}, [&](int64_t i) { return r() * 7 + i; });
      c().all_reduce(t, g);
      const auto v = read(t);
      for (int64_t i = 0; i < 5; ++i) {
        double expect = 0;
        for (int64_t m : g.ranks) expect += static_cast<double>(m * 7 + i);
        EXPECT_EQ(v[static_cast<size_t>(i)], expect);
      }
      DTensor in = make(DType::F32, {1, 2}, [&](int64_t i) { return r() * 2 + i; });
      DTensor out = be().zeros(DType::F32, {g.size(), 2});
      c().all_gather(in, out, g);
      const auto gathered = read(out);
      for (int64_t m = 0; m < g.size(); ++m)
        for (int64_t i = 0; i < 2; ++i)
          EXPECT_EQ(gathered[static_cast<size_t>(m * 2 + i)], static_cast<double>(g.ranks[static_cast<size_t>(m)] * 2 + i));
      if (g.size() > 1) {
        EXPECT_TRUE(c().has_communicator(g.ranks));
      }
    }
  }
}

TEST_F(Nccl, ConcatenationFollowsGroupRankOrder) {
  Group g{"rev", {}, n() - 1 - r()};
  for (int64_t m = n() - 1; m >= 0; --m) g.ranks.push_back(m);
  DTensor in = make(DType::F32, {1, 1}, [&](int64_t) { return r(); });
  DTensor out = be().zeros(DType::F32, {n(), 1});
  c().all_gather(in, out, g);
  const auto v = read(out);
  for (int64_t m = 0; m < n(); ++m) EXPECT_EQ(v[static_cast<size_t>(m)], static_cast<double>(n() - 1 - m));
}

TEST_F(Nccl, AllToAllVWithUnevenAndZeroCounts) {
  auto count = [](int64_t s, int64_t d) { return (s + d) % 3; };
  const int64_t width = 3;
  std::vector<int64_t> send, recv;
  int64_t rows_in = 0, rows_out = 0;
  for (int64_t d = 0; d < n(); ++d) {
    send.push_back(count(r(), d));
    recv.push_back(count(d, r()));
    rows_in += send.back();
    rows_out += recv.back();
  }
  std::vector<double> values;
  for (int64_t d = 0; d < n(); ++d)
    for (int64_t k = 0; k < count(r(), d); ++k)
      for (int64_t w = 0; w < width; ++w) values.push_back(static_cast<double>(r() * 1000 + d * 100 + k * 10 + w));
  DTensor in = be().upload(Tensor::from_values(DType::BF16, {rows_in, width}, values), DType::BF16);
  DTensor out = be().zeros(DType::BF16, {rows_out, width});
  c().all_to_all_v(in, send, out, recv, world_group(n(), r()));
  const auto v = read(out);
  size_t at = 0;
  for (int64_t s = 0; s < n(); ++s)
    for (int64_t k = 0; k < count(s, r()); ++k)
      for (int64_t w = 0; w < width; ++w, ++at) {
        const double expect = Tensor::from_values(DType::BF16, {1}, std::vector<double>{
                                                                      static_cast<double>(s * 1000 + r() * 100 + k * 10 + w)})
                                  .get(0);
        EXPECT_EQ(v[at], expect);
      }
  const std::vector<int64_t> zeros(static_cast<size_t>(n()), 0);
  DTensor e_in = be().zeros(DType::F32, {0, width}), e_out = be().zeros(DType::F32, {0, width});
  c().all_to_all_v(e_in, zeros, e_out, zeros, world_group(n(), r()));
}

TEST_F(Nccl, SendRecvRingIsBufferedAndFifo) {
  // Every rank sends first, then receives: a 4 MiB payload and three small
  // messages with another tag, received in order.
  const int64_t next = (r() + 1) % n(), prev = (r() + n() - 1) % n();
  DTensor big = make(DType::F32, {1 << 20}, [&](int64_t i) { return r() + (i % 100); });
  c().send(big, next, 1);
  for (int k = 0; k < 3; ++k) c().send(make(DType::BF16, {2}, [&](int64_t i) { return r() * 100 + k * 10 + i; }), next, 2);
  DTensor got = be().zeros(DType::F32, {1 << 20});
  c().recv(got, prev, 1);
  const auto v = read(got);
  for (int64_t i = 0; i < (1 << 20); i += 4099) ASSERT_EQ(v[static_cast<size_t>(i)], static_cast<double>(prev + (i % 100)));
  for (int k = 0; k < 3; ++k) {
    DTensor t = be().zeros(DType::BF16, {2});
    c().recv(t, prev, 2);
    EXPECT_EQ(read(t), (std::vector<double>{static_cast<double>(prev * 100 + k * 10),
                                            static_cast<double>(prev * 100 + k * 10 + 1)}));
  }
  c().barrier(world_group(n(), r()));
}

std::string catch_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const CommError& e) {
    return e.what();
  }
  return "";
}

TEST_F(Nccl, MismatchesAreCaughtOnEveryRankAndTheCommStaysUsable) {
  const Group g = world_group(n(), r());
  std::string e = catch_error([&] {
    DTensor t = be().zeros(DType::BF16, {4, r() == n() - 1 ? 9 : 8});
    c().all_reduce(t, g);
  });
  EXPECT_NE(e.find(fmt::format("all_reduce on group {}: members passed different shapes", g.describe())),
            std::string::npos)
      << e;
  EXPECT_NE(e.find(fmt::format("rank {} passed all_reduce(BF16[4, 9])", n() - 1)), std::string::npos) << e;
  e = catch_error([&] {
    DTensor t = be().zeros(r() == 0 ? DType::BF16 : DType::F32, {3});
    c().all_reduce(t, g);
  });
  EXPECT_NE(e.find("members passed different dtypes: rank 0 passed all_reduce(BF16[3])"), std::string::npos) << e;
  e = catch_error([&] {
    DTensor t = be().zeros(DType::F8_E4M3, {3});
    c().all_reduce(t, g);
  });
  EXPECT_NE(e.find("cannot sum F8_E4M3 storage"), std::string::npos) << e;
  e = catch_error([&] {
    std::vector<int64_t> send(static_cast<size_t>(n()), 1), recv(static_cast<size_t>(n()), 1);
    if (r() == 0) recv[1] = 2;
    DTensor in = be().zeros(DType::F32, {n(), 2});
    DTensor out = be().zeros(DType::F32, {n() + (r() == 0 ? 1 : 0), 2});
    c().all_to_all_v(in, send, out, recv, g);
  });
  EXPECT_NE(e.find("rank 1 sends 1 rows to rank 0, which expects 2"), std::string::npos) << e;
  // Every rank saw the same text.
  const auto lens = c().all_gather_ints(std::vector<int64_t>{static_cast<int64_t>(e.size())}, g);
  for (int64_t x : lens) EXPECT_EQ(x, lens[0]);
  // recv checks dtype and shape, and the next message is intact.
  if (r() == 0) {
    c().send(be().zeros(DType::BF16, {2, 3}), 1, 4);
    c().send(make(DType::F32, {1}, [](int64_t) { return 5; }), 1, 4);
  } else if (r() == 1) {
    DTensor t = be().zeros(DType::F32, {2, 3});
    e = catch_error([&] { c().recv(t, 0, 4); });
    EXPECT_NE(e.find("recv from rank 0 tag 4 on rank 1: rank 0 sent BF16[2, 3], the receiving tensor is F32[2, 3]"),
              std::string::npos)
        << e;
    DTensor u = be().zeros(DType::F32, {1});
    c().recv(u, 0, 4);
    EXPECT_EQ(read(u)[0], 5.0);
  }
  DTensor t = make(DType::F32, {1}, [](int64_t) { return 1; });
  c().all_reduce(t, g);
  EXPECT_EQ(read(t)[0], static_cast<double>(n()));
}

TEST_F(Nccl, SmallAllReduceLatency) {
  // The cost of the descriptor exchange + completion wait, for the record.
  const Group g = world_group(n(), r());
  DTensor t = be().zeros(DType::F32, {4});
  c().all_reduce(t, g);
  const int iters = 200;
  MPI_Barrier(MPI_COMM_WORLD);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) c().all_reduce(t, g);
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / iters;
  if (r() == 0) std::cout << fmt::format("np {}: NcclComm all_reduce(4 floats) {:.1f} us\n", n(), us);
}

int run_fault_demo(const std::string& kind) {
  run_on_nccl(
      [&](Comm& comm) {
        auto& nc = dynamic_cast<NcclComm&>(comm);
        cuda::CudaBackend be(nc.device());
        const Group g = world_group(comm.world_size(), comm.rank());
        comm.barrier(g);
        if (kind == "abort" && comm.rank() == 1) throw Error("boom in layer 3");
        if (kind == "timeout" && comm.rank() == 1) std::this_thread::sleep_for(30s);
        DTensor t = be.zeros(DType::F32, {16});
        comm.all_reduce(t, g);
      },
      500ms);
  std::cerr << "fault demo finished without aborting\n";
  return 1;
}

#endif  // PARITRON_HAVE_NCCL

}  // namespace
}  // namespace paritron::opt

int main(int argc, char** argv) {
  using namespace paritron::opt;
  MpiSession mpi(&argc, &argv);
  if (const char* fault = std::getenv("PARITRON_NCCL_FAULT")) {
    std::string why;
    if (!nccl_usable(&why)) {
      std::cout << "fault demo skipped: " << why << "\n";
      return 0;
    }
#if defined(PARITRON_HAVE_NCCL)
    return run_fault_demo(fault);
#else
    (void)fault;
    return 0;
#endif
  }
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {  // rank 0 prints progress; the others print only their failures
    struct FailurePrinter : ::testing::EmptyTestEventListener {
      int rank = 0;
      void OnTestPartResult(const ::testing::TestPartResult& r) override {
        if (r.failed()) {
          std::cerr << "rank " << rank << ": " << (r.file_name() ? r.file_name() : "?") << ":" << r.line_number()
                    << ": failure\n"
                    << r.summary() << "\n";
        }
      }
    };
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    auto* printer = new FailurePrinter;
    printer->rank = rank;
    listeners.Append(printer);
  }
  int status = 0;
  {
    // A desynchronised test fails (timeout) instead of hanging.
    auto control = make_control(std::chrono::seconds(60));
    g_control = control.get();
#if defined(PARITRON_HAVE_NCCL)
    // Every rank must be able to: otherwise every Nccl test skips on every rank.
    std::string why;
    bool usable = nccl_usable(&why);
    if (usable) {  // NCCL needs a GPU per rank
      MPI_Comm local = MPI_COMM_NULL;
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
      int local_size = 1, devices = 0;
      MPI_Comm_size(local, &local_size);
      MPI_Comm_free(&local);
      if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < local_size) {
        usable = false;
        why = fmt::format("{} ranks on this node, {} GPU(s): NCCL needs a GPU per rank (run with -np <= GPUs)",
                          local_size, devices);
      }
    }
    int mine = usable ? 1 : 0, all = 0;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    g_skip = mine ? "another rank has no usable CUDA device or NCCL" : why;
    std::unique_ptr<NcclComm> comm;
    std::unique_ptr<paritron::opt::cuda::CudaBackend> be;
    if (all) {
      comm = std::make_unique<NcclComm>(std::chrono::seconds(60));
      be = std::make_unique<paritron::opt::cuda::CudaBackend>(comm->device());
      g_comm = comm.get();
      g_be = be.get();
    }
#endif
    const int local = RUN_ALL_TESTS();
    MPI_Allreduce(&local, &status, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (local != 0) std::cerr << "rank " << rank << ": tests failed\n";
#if defined(PARITRON_HAVE_NCCL)
    g_comm = nullptr;
    g_be = nullptr;
    be.reset();  // the backend's stream before the comm
#endif
    g_control = nullptr;
  }
  return status;
}

#else  // built without MPI

int main() {
  std::string why;
  paritron::opt::nccl_usable(&why);
  std::cout << "nccl_comm_mpitest skipped: " << why << "\n";
  return 0;
}

#endif
