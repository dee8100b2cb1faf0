// ThreadComm and run_on_threads (optimized/comm/thread_comm.h, run_ranks.h):
// every op at several world sizes and on the groups of real layouts, values
// checked exactly; mismatches, aborts, timeouts and retired ranks.
#include "optimized/comm/thread_comm.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <thread>

#include "common/math/float_format.h"
#include "common/parallel_config.h"
#include "optimized/comm/groups.h"
#include "optimized/comm/run_ranks.h"

namespace paritron::opt {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

DTensor make(DType dtype, Shape shape, DType storage = DType::F32) {
  const size_t n = static_cast<size_t>(shape_numel(shape)) * dtype_size(storage);
  std::shared_ptr<std::byte> buf(new std::byte[std::max<size_t>(n, 1)](), std::default_delete<std::byte[]>());
  return DTensor(buf, 0, dtype, storage, std::move(shape));
}

// f32 tensor with v(i) for element i.
template <typename F>
DTensor make_f32(Shape shape, F v, DType dtype = DType::F32) {
  DTensor t = make(dtype, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = static_cast<float>(v(i));
  return t;
}

std::vector<float> values(const DTensor& t) { return std::vector<float>(t.f32(), t.f32() + t.numel()); }

// Runs body(comm) on a thread per rank of a ThreadWorld without the runner's
// abort-on-exception: returns each rank's error message ("" when none).
std::vector<std::string> run_each(int64_t world_size, const std::function<void(Comm&)>& body,
                                  std::chrono::milliseconds timeout = 10s) {
  ThreadWorld world(world_size);
  world.set_timeout(timeout);
  std::vector<std::string> errors(static_cast<size_t>(world_size));
  std::vector<std::thread> threads;
  for (int64_t r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(world.comm(r));
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
        if (errors[static_cast<size_t>(r)].empty()) errors[static_cast<size_t>(r)] = "(empty message)";
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

TEST(Groups, DescribeWorldAndLayouts) {
  EXPECT_EQ(world_group(4, 2).describe(), "world [0, 1, 2, 3]");
  EXPECT_EQ(world_group(4, 2).index, 2);
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-dp2");
  const Group tp = make_group(pc, GroupKind::kTensor, 3);
  EXPECT_EQ(tp.describe(), "tp [2, 3]");
  EXPECT_EQ(tp.index, 1);
  const Group dp = make_group(pc, GroupKind::kData, 3);
  EXPECT_EQ(dp.describe(), "dp [1, 3]");
  EXPECT_EQ(dp.index, 1);
  const ParallelConfig pp = ParallelConfig::parse_layout("pp4");
  EXPECT_EQ(make_group(pp, GroupKind::kEmbedding, 1).index, -1);  // a middle stage is not a member
}

class WorldSizes : public ::testing::TestWithParam<int64_t> {};

TEST_P(WorldSizes, EveryOpOnTheWorldGroup) {
  const int64_t n = GetParam();
  run_on_threads(n, [n](Comm& c) {
    const int64_t r = c.rank();
    const Group g = world_group(n, r);
    // all_reduce: sum over ranks of (100 r + i) = 100 n(n-1)/2 + n i.
    DTensor t = make_f32({3, 5}, [r](int64_t i) { return 100 * r + i; });
    c.all_reduce(t, g);
    for (int64_t i = 0; i < 15; ++i) ASSERT_EQ(t.f32()[i], static_cast<float>(100 * n * (n - 1) / 2 + n * i));
    // all_gather: member blocks in rank order.
    DTensor in = make_f32({2, 3}, [r](int64_t i) { return 10 * r + i; });
    DTensor out = make(DType::F32, {2 * n, 3});
    c.all_gather(in, out, g);
    for (int64_t m = 0; m < n; ++m)
      for (int64_t i = 0; i < 6; ++i) ASSERT_EQ(out.f32()[m * 6 + i], static_cast<float>(10 * m + i));
    // reduce_scatter: block r of the sum.
    DTensor big = make_f32({2 * n, 2}, [r](int64_t i) { return r + 1 + i; });
    DTensor part = make(DType::F32, {2, 2});
    c.reduce_scatter(big, part, g);
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t gi = 4 * r + i;
      ASSERT_EQ(part.f32()[i], static_cast<float>(n * (n + 1) / 2 + n * gi));
    }
    // broadcast from the last member.
    DTensor b = make_f32({4}, [r](int64_t i) { return 1000 * r + i; });
    c.broadcast(b, n - 1, g);
    for (int64_t i = 0; i < 4; ++i) ASSERT_EQ(b.f32()[i], static_cast<float>(1000 * (n - 1) + i));
    // all_gather_ints.
    const std::vector<int64_t> mine{r, -r, 7};
    const auto all = c.all_gather_ints(mine, g);
    ASSERT_EQ(all.size(), static_cast<size_t>(3 * n));
    for (int64_t m = 0; m < n; ++m) {
      ASSERT_EQ(all[static_cast<size_t>(3 * m)], m);
      ASSERT_EQ(all[static_cast<size_t>(3 * m + 1)], -m);
      ASSERT_EQ(all[static_cast<size_t>(3 * m + 2)], 7);
    }
    c.barrier(g);
  });
}

INSTANTIATE_TEST_SUITE_P(ThreadComm, WorldSizes, ::testing::Values(1, 2, 3, 4, 8));

TEST(ThreadComm, AllReduceSumsInMemberOrderWithIdenticalBits) {
  // Values whose fp32 sum depends on the order: every rank gets the bits of
  // ((x0 + x1) + x2) + x3.
  const int64_t n = 4, len = 257;
  auto value = [](int64_t r, int64_t i) {
    return static_cast<float>(std::sin(0.37 * static_cast<double>(r * 1000 + i)) * std::pow(10.0, (r + i) % 7 - 3));
  };
  std::vector<std::vector<float>> got(n);
  run_on_threads(n, [&](Comm& c) {
    DTensor t = make_f32({len}, [&](int64_t i) { return value(c.rank(), i); });
    c.all_reduce(t, world_group(n, c.rank()));
    got[static_cast<size_t>(c.rank())] = values(t);
  });
  for (int64_t i = 0; i < len; ++i) {
    float expect = value(0, i);
    for (int64_t r = 1; r < n; ++r) expect += value(r, i);
    for (int64_t r = 0; r < n; ++r) {
      ASSERT_EQ(std::memcmp(&got[static_cast<size_t>(r)][static_cast<size_t>(i)], &expect, 4), 0) << r << " " << i;
    }
  }
}

TEST(ThreadComm, AllReduceRoundsTo16BitDtypesAndSumsF64InDouble) {
  run_on_threads(2, [](Comm& c) {
    const Group g = world_group(2, c.rank());
    // bf16 values 1 and 1 + 2^-7 (rank 1): the sum 2 + 2^-7 is not a bf16, it
    // rounds (ties to even) to 2.
    DTensor b = make_f32({2}, [&](int64_t i) { return c.rank() == 0 ? 1.0 : 1.0 + std::ldexp(1.0, -7) * (i + 1); },
                         DType::BF16);
    c.all_reduce(b, g);
    for (int64_t i = 0; i < 2; ++i) {
      const double sum = 2.0 + std::ldexp(1.0, -7) * static_cast<double>(i + 1);
      ASSERT_EQ(b.f32()[i], static_cast<float>(math::round_to(sum, math::kBFloat16))) << i;
    }
    EXPECT_EQ(b.f32()[0], 2.0f);
    EXPECT_EQ(b.f32()[1], 2.0f + 1.0f / 64);
    // fp16: 2048 + 1 is not representable (11 bits): rounds to even 2048.
    DTensor h = make_f32({1}, [&](int64_t) { return c.rank() == 0 ? 2048.0 : 1.0; }, DType::F16);
    c.all_reduce(h, g);
    EXPECT_EQ(h.f32()[0], 2048.0f);
    // f64: 1 + 2^-40 survives (it would not in fp32).
    DTensor d = make(DType::F64, {1}, DType::F64);
    d.f64()[0] = c.rank() == 0 ? 1.0 : std::ldexp(1.0, -40);
    c.all_reduce(d, g);
    EXPECT_EQ(d.f64()[0], 1.0 + std::ldexp(1.0, -40));
  });
}

TEST(ThreadComm, Tp2Dp2GroupsAndConcurrentCollectives) {
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-dp2");
  run_on_threads(4, [&](Comm& c) {
    const int64_t r = c.rank();
    const Group tp = make_group(pc, GroupKind::kTensor, r);
    const Group dp = make_group(pc, GroupKind::kData, r);
    for (int iter = 0; iter < 200; ++iter) {
      // tp groups {0,1},{2,3} run concurrently with each other, then dp {0,2},{1,3}.
      DTensor t = make_f32({8}, [&](int64_t i) { return r * 16 + i + iter; });
      c.all_reduce(t, tp);
      for (int64_t i = 0; i < 8; ++i) {
        float expect = 0;
        for (int64_t m : tp.ranks) expect += static_cast<float>(m * 16 + i + iter);
        ASSERT_EQ(t.f32()[i], expect);
      }
      DTensor in = make_f32({1, 2}, [&](int64_t i) { return r * 2 + i; });
      DTensor out = make(DType::F32, {2, 2});
      c.all_gather(in, out, dp);
      for (int64_t m = 0; m < 2; ++m)
        for (int64_t i = 0; i < 2; ++i)
          ASSERT_EQ(out.f32()[m * 2 + i], static_cast<float>(dp.ranks[static_cast<size_t>(m)] * 2 + i));
    }
  });
}

TEST(ThreadComm, ContextAndDataGroupsOfTp2Cp2Dp2) {
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-cp2-dp2");
  run_on_threads(8, [&](Comm& c) {
    const int64_t r = c.rank();
    for (GroupKind kind : {GroupKind::kTensor, GroupKind::kContext, GroupKind::kData, GroupKind::kDataWithContext,
                           GroupKind::kTensorAndData}) {
      const Group g = make_group(pc, kind, r);
      DTensor t = make_f32({3}, [&](int64_t i) { return r + 8 * i; });
      c.all_reduce(t, g);
      for (int64_t i = 0; i < 3; ++i) {
        float expect = 0;
        for (int64_t m : g.ranks) expect += static_cast<float>(m + 8 * i);
        ASSERT_EQ(t.f32()[i], expect) << g.describe();
      }
      const std::vector<int64_t> ints{r};
      ASSERT_EQ(c.all_gather_ints(ints, g), g.ranks) << g.describe();
    }
  });
}

TEST(ThreadComm, ConcatenationFollowsGroupRankOrder) {
  // A group listed out of rank order: group rank 0 is global rank 2.
  run_on_threads(3, [](Comm& c) {
    Group g{"odd", {2, 0, 1}, 0};
    for (size_t i = 0; i < 3; ++i)
      if (g.ranks[i] == c.rank()) g.index = static_cast<int64_t>(i);
    DTensor in = make_f32({1, 1}, [&](int64_t) { return c.rank(); });
    DTensor out = make(DType::F32, {3, 1});
    c.all_gather(in, out, g);
    EXPECT_EQ(values(out), (std::vector<float>{2, 0, 1}));
    DTensor big = make_f32({3, 1}, [&](int64_t i) { return (c.rank() + 1) * (i + 1); });  // sum = 6 (i + 1)
    DTensor part = make(DType::F32, {1, 1});
    c.reduce_scatter(big, part, g);
    EXPECT_EQ(part.f32()[0], 6.0f * static_cast<float>(g.index + 1));
  });
}

TEST(ThreadComm, AllToAllVWithUnevenAndZeroCounts) {
  // Rank s sends (s + d) % 3 rows to rank d (zero on the diagonal-ish cases);
  // row values encode (source, destination, row within the block).
  const int64_t n = 3, width = 2;
  auto count = [](int64_t s, int64_t d) { return (s + d) % 3; };
  run_on_threads(n, [&](Comm& c) {
    const int64_t r = c.rank();
    std::vector<int64_t> send, recv;
    int64_t total_send = 0, total_recv = 0;
    for (int64_t d = 0; d < n; ++d) {
      send.push_back(count(r, d));
      recv.push_back(count(d, r));
      total_send += send.back();
      total_recv += recv.back();
    }
    DTensor in = make(DType::F32, {total_send, width});
    int64_t row = 0;
    for (int64_t d = 0; d < n; ++d)
      for (int64_t k = 0; k < count(r, d); ++k, ++row)
        for (int64_t w = 0; w < width; ++w) in.f32()[row * width + w] = static_cast<float>(r * 1000 + d * 100 + k * 10 + w);
    DTensor out = make(DType::F32, {total_recv, width});
    c.all_to_all_v(in, send, out, recv, world_group(n, r));
    row = 0;
    for (int64_t s = 0; s < n; ++s)
      for (int64_t k = 0; k < count(s, r); ++k, ++row)
        for (int64_t w = 0; w < width; ++w)
          ASSERT_EQ(out.f32()[row * width + w], static_cast<float>(s * 1000 + r * 100 + k * 10 + w));
    // Nothing at all to exchange.
    DTensor none_in = make(DType::F32, {0, width});
    DTensor none_out = make(DType::F32, {0, width});
    const std::vector<int64_t> zeros(n, 0);
    c.all_to_all_v(none_in, zeros, none_out, zeros, world_group(n, r));
  });
}

TEST(ThreadComm, SendRecvIsFifoPerTag) {
  run_on_threads(2, [](Comm& c) {
    if (c.rank() == 0) {
      for (int k = 0; k < 3; ++k) c.send(make_f32({2}, [k](int64_t i) { return k * 10 + i; }), 1, 5);
      c.send(make_f32({1}, [](int64_t) { return 99; }), 1, 6);
      DTensor back = make(DType::F32, {1});
      c.recv(back, 1, 0);
      EXPECT_EQ(back.f32()[0], 42.0f);
    } else {
      DTensor other = make(DType::F32, {1});
      c.recv(other, 0, 6);  // a later tag first
      EXPECT_EQ(other.f32()[0], 99.0f);
      for (int k = 0; k < 3; ++k) {
        DTensor t = make(DType::F32, {2});
        c.recv(t, 0, 5);
        EXPECT_EQ(values(t), (std::vector<float>{static_cast<float>(k * 10), static_cast<float>(k * 10 + 1)}));
      }
      c.send(make_f32({1}, [](int64_t) { return 42; }), 0, 0);
    }
  });
}

TEST(ThreadComm, RecvChecksDtypeAndShape) {
  const auto errors = run_each(2, [](Comm& c) {
    if (c.rank() == 0) {
      c.send(make_f32({2, 3}, [](int64_t) { return 1; }, DType::BF16), 1, 1);
    } else {
      DTensor t = make(DType::F32, {2, 3});
      c.recv(t, 0, 1);
    }
  });
  EXPECT_EQ(errors[0], "");
  EXPECT_NE(errors[1].find("recv from rank 0 tag 1"), std::string::npos) << errors[1];
  EXPECT_NE(errors[1].find("BF16[2, 3]"), std::string::npos) << errors[1];
  EXPECT_NE(errors[1].find("F32[2, 3]"), std::string::npos) << errors[1];
}

// Every member of a mismatched collective throws the same message, naming the
// op, the group and each rank's call.
void expect_mismatch_on_all(const std::vector<std::string>& errors, const std::vector<std::string>& parts) {
  for (size_t r = 0; r < errors.size(); ++r) {
    ASSERT_FALSE(errors[r].empty()) << "rank " << r << " did not throw";
    EXPECT_EQ(errors[r], errors[0]);
    for (const auto& p : parts) EXPECT_NE(errors[r].find(p), std::string::npos) << "'" << p << "' not in: " << errors[r];
  }
}

TEST(ThreadComm, ShapeMismatchIsReportedOnEveryMember) {
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-dp2");
  const auto errors = run_each(4, [&](Comm& c) {
    const Group tp = make_group(pc, GroupKind::kTensor, c.rank());
    DTensor t = make(DType::F32, {4, c.rank() == 3 ? 9 : 8});
    c.all_reduce(t, tp);
  });
  EXPECT_EQ(errors[0], "");  // tp [0, 1] agrees
  EXPECT_EQ(errors[1], "");
  expect_mismatch_on_all({errors[2], errors[3]},
                         {"all_reduce on group tp [2, 3]", "different shapes", "rank 2 passed all_reduce(F32[4, 8])",
                          "rank 3 passed all_reduce(F32[4, 9])"});
}

TEST(ThreadComm, DtypeMismatchIsReportedOnEveryMember) {
  const auto errors = run_each(2, [](Comm& c) {
    DTensor t = make(c.rank() == 1 ? DType::BF16 : DType::F32, {4, 8});
    c.all_reduce(t, world_group(2, c.rank()));
  });
  expect_mismatch_on_all(errors, {"all_reduce on group world [0, 1]", "different dtypes", "F32[4, 8]",
                                  "rank 1 passed all_reduce(BF16[4, 8] (storage F32))"});
}

TEST(ThreadComm, OpMismatchIsReportedOnEveryMember) {
  const auto errors = run_each(3, [](Comm& c) {
    const Group g = world_group(3, c.rank());
    DTensor in = make(DType::F32, {2, 2});
    if (c.rank() == 2) {
      DTensor out = make(DType::F32, {6, 2});
      c.all_gather(in, out, g);
    } else {
      c.all_reduce(in, g);
    }
  });
  expect_mismatch_on_all(errors, {"on group world [0, 1, 2]", "different operations", "rank 0 passed all_reduce",
                                  "rank 2 passed all_gather(F32[2, 2] -> F32[6, 2])"});
}

TEST(ThreadComm, SizeMismatchesOfGatherScatterAndAllToAll) {
  auto errors = run_each(2, [](Comm& c) {
    DTensor in = make(DType::F32, {2, 2});
    DTensor out = make(DType::F32, {c.rank() == 0 ? 4 : 3, 2});
    c.all_gather(in, out, world_group(2, c.rank()));
  });
  expect_mismatch_on_all(errors, {"all_gather", "outputs must be [4, 2]", "F32[2, 2] -> F32[3, 2]"});
  errors = run_each(2, [](Comm& c) {
    DTensor in = make(DType::F32, {3, 2});
    DTensor out = make(DType::F32, {1, 2});
    c.reduce_scatter(in, out, world_group(2, c.rank()));
  });
  expect_mismatch_on_all(errors, {"reduce_scatter", "not a multiple of the group size 2"});
  errors = run_each(2, [](Comm& c) {
    const std::vector<int64_t> send{1, 1};
    const std::vector<int64_t> recv{1, c.rank() == 0 ? 2 : 1};  // rank 0 expects 2 rows from rank 1, which sends 1
    DTensor in = make(DType::F32, {2, 3});
    DTensor out = make(DType::F32, {recv[0] + recv[1], 3});
    c.all_to_all_v(in, send, out, recv, world_group(2, c.rank()));
  });
  expect_mismatch_on_all(errors, {"all_to_all_v", "rank 1 sends 1 rows to rank 0, which expects 2"});
}

TEST(ThreadComm, NonMemberCallThrowsAtOnce) {
  ThreadWorld world(2);
  Group g{"tp", {0, 1}, 1};  // index 1 is rank 1, not rank 0
  DTensor t = make(DType::F32, {1});
  EXPECT_THROW(world.comm(0).all_reduce(t, g), CommError);
}

TEST(ThreadComm, FailingRankMakesTheOthersFailNamingIt) {
  std::mutex mu;
  std::vector<std::string> seen(4);
  const auto start = Clock::now();
  try {
    run_on_threads(
        4,
        [&](Comm& c) {
          if (c.rank() == 1) {
            std::this_thread::sleep_for(50ms);  // the others are waiting in all_reduce by now
            throw Error("boom in layer 3");
          }
          try {
            DTensor t = make(DType::F32, {4});
            c.all_reduce(t, world_group(4, c.rank()));
          } catch (const CommError& e) {
            std::lock_guard<std::mutex> lock(mu);
            seen[static_cast<size_t>(c.rank())] = e.what();
            throw;
          }
        },
        10s);
    FAIL() << "run_on_threads did not throw";
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 1);
    EXPECT_EQ(std::string(e.what()), "rank 1 failed: boom in layer 3");
    EXPECT_THROW(std::rethrow_exception(e.cause()), Error);
  }
  const auto elapsed = Clock::now() - start;
  EXPECT_LT(elapsed, 2s);  // not the 10 s timeout
  for (int r : {0, 2, 3}) {
    EXPECT_NE(seen[static_cast<size_t>(r)].find("rank 1 failed: boom in layer 3"), std::string::npos) << seen[r];
    EXPECT_NE(seen[static_cast<size_t>(r)].find("all_reduce on group world [0, 1, 2, 3]"), std::string::npos)
        << seen[r];
  }
}

TEST(ThreadComm, AbortWakesARecvAndLaterCallsFailAtOnce) {
  ThreadWorld world(2);
  world.set_timeout(10s);
  std::string recv_error;
  std::thread t([&] {
    try {
      DTensor x = make(DType::F32, {1});
      world.comm(1).recv(x, 0, 3);
    } catch (const CommError& e) {
      recv_error = e.what();
    }
  });
  std::this_thread::sleep_for(30ms);
  const auto start = Clock::now();
  world.comm(0).abort("out of memory");
  t.join();
  EXPECT_LT(Clock::now() - start, 1s);
  EXPECT_EQ(recv_error, "rank 0 failed: out of memory [rank 1 in recv from rank 0 tag 3]");
  DTensor y = make(DType::F32, {1});
  try {
    world.comm(1).all_reduce(y, world_group(2, 1));
    FAIL();
  } catch (const CommError& e) {
    EXPECT_EQ(std::string(e.what()), "rank 0 failed: out of memory [rank 1 in all_reduce on group world [0, 1]]");
  }
  ASSERT_TRUE(world.failure().has_value());
  EXPECT_EQ(world.failure()->rank, 0);
}

TEST(ThreadComm, TimeoutNamesTheOpGroupAndMissingRanks) {
  // Rank 2 never arrives (no thread runs it): the first of ranks 0 and 1 to
  // reach its 200 ms deadline throws naming rank 2, the other one learns at
  // once that the collective was given up.
  ThreadWorld world(3);
  world.set_timeout(200ms);
  std::vector<std::string> errors(2);
  std::vector<double> ms(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      const auto start = Clock::now();
      try {
        DTensor t = make(DType::F32, {2});
        world.comm(r).all_reduce(t, world_group(3, r));
      } catch (const CommError& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
      ms[static_cast<size_t>(r)] = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    });
  }
  for (auto& t : threads) t.join();
  int timed_out = 0;
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(errors[r].rfind("all_reduce on group world [0, 1, 2]: ", 0), 0u) << errors[r];
    if (errors[r].find(fmt::format("rank {} timed out after 200 ms waiting for rank 2 (not arrived)", r)) !=
        std::string::npos) {
      ++timed_out;
    } else {
      EXPECT_NE(errors[r].find(fmt::format("rank {} timed out waiting and left it (rank {} waited)", 1 - r, r)),
                std::string::npos)
          << errors[r];
    }
    EXPECT_GE(ms[r], 190.0);
    EXPECT_LT(ms[r], 1000.0);
    std::cout << "rank " << r << " failed after " << ms[r] << " ms: " << errors[r] << "\n";
  }
  EXPECT_GE(timed_out, 1);
}

TEST(ThreadComm, RecvTimesOut) {
  ThreadWorld world(2);
  world.set_timeout(200ms);
  DTensor t = make(DType::F32, {1});
  const auto start = Clock::now();
  try {
    world.comm(0).recv(t, 1, 9);
    FAIL();
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("recv from rank 1 tag 9 on rank 0: timed out after 200 ms"),
              std::string::npos)
        << e.what();
  }
  EXPECT_GE(Clock::now() - start, 199ms);
}

TEST(ThreadComm, RankThatReturnedFailsItsWaitingPeersAtOnce) {
  const auto start = Clock::now();
  try {
    run_on_threads(
        2,
        [](Comm& c) {
          if (c.rank() == 0) c.barrier(world_group(2, 0));  // rank 1 never calls it
        },
        30s);
    FAIL();
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 0);
    EXPECT_NE(std::string(e.what()).find("barrier on group world [0, 1]: rank 1 finished without joining it"),
              std::string::npos)
        << e.what();
  }
  EXPECT_LT(Clock::now() - start, 2s);
}

TEST(RunOnThreads, ASlowRankMakesTheWaitingRankTimeOut) {
  // Rank 1 computes for 600 ms outside comm calls; rank 0's all_reduce gives
  // up after 200 ms and is the root cause, naming rank 1.
  const auto start = Clock::now();
  try {
    run_on_threads(
        2,
        [](Comm& c) {
          if (c.rank() == 1) std::this_thread::sleep_for(600ms);
          DTensor t = make(DType::F32, {1});
          c.all_reduce(t, world_group(2, c.rank()));
        },
        200ms);
    FAIL();
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 0);
    EXPECT_EQ(std::string(e.what()),
              "rank 0 failed: all_reduce on group world [0, 1]: rank 0 timed out after 200 ms waiting for rank 1 "
              "(not arrived)");
  }
  const auto elapsed = Clock::now() - start;
  EXPECT_GE(elapsed, 590ms);  // run_on_threads joins the slow rank (it cannot interrupt it)
  EXPECT_LT(elapsed, 2s);
}

TEST(RunOnThreads, RethrowsTheRootCauseNotTheSecondaryErrors) {
  // Rank 2 fails late, after the others are blocked in different collectives;
  // a non-std exception type on another run still gives a RankFailed.
  try {
    run_on_threads(4, [](Comm& c) {
      const int64_t r = c.rank();
      if (r == 2) {
        std::this_thread::sleep_for(20ms);
        throw ConfigError("num_attention_heads", "6", "must be a multiple of tensor_model_parallel_size (4)");
      }
      DTensor t = make(DType::F32, {1});
      if (r == 3) {
        c.recv(t, 2, 0);
      } else {
        c.all_reduce(t, world_group(4, r));
      }
    });
    FAIL();
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 2);
    EXPECT_NE(std::string(e.what()).find("rank 2 failed: invalid config: num_attention_heads = 6"), std::string::npos) << e.what();
    EXPECT_THROW(std::rethrow_exception(e.cause()), ConfigError);
  }
  try {
    run_on_threads(2, [](Comm& c) {
      if (c.rank() == 0) throw 42;
      c.barrier(world_group(2, 1));
    });
    FAIL();
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 0);
    EXPECT_NE(std::string(e.what()).find("unknown exception"), std::string::npos);
  }
  // A clean run returns.
  EXPECT_NO_THROW(run_on_threads(3, [](Comm& c) { c.barrier(world_group(3, c.rank())); }));
}

}  // namespace
}  // namespace paritron::opt
