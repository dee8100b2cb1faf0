// MpiComm under mpirun (ctest mpi_comm_np2 / mpi_comm_np4): every op on the
// world and on the groups of real layouts, rank-dependent data, exact
// results; mismatches caught on every rank without aborting the job.
//
// Fault demos (not run by ctest: they end the job), for measuring:
//   PARITRON_MPI_FAULT=abort   mpirun -np 4 --oversubscribe ./mpi_comm_mpitest
//     rank 1 throws inside run_on_mpi -> MpiComm::abort -> MPI_Abort
//   PARITRON_MPI_FAULT=timeout mpirun -np 4 --oversubscribe ./mpi_comm_mpitest
//     rank 1 never joins a barrier -> the others' watchdog (500 ms) aborts
#include "optimized/comm/mpi_comm.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <thread>

#include "common/math/float_format.h"
#include "common/parallel_config.h"
#include "optimized/comm/groups.h"

namespace paritron::opt {
namespace {

using namespace std::chrono_literals;

MpiComm* g_comm = nullptr;

DTensor make(DType dtype, Shape shape, DType storage = DType::F32) {
  const size_t n = static_cast<size_t>(shape_numel(shape)) * dtype_size(storage);
  std::shared_ptr<std::byte> buf(new std::byte[std::max<size_t>(n, 1)](), std::default_delete<std::byte[]>());
  return DTensor(buf, 0, dtype, storage, std::move(shape));
}

template <typename F>
DTensor make_f32(Shape shape, F v, DType dtype = DType::F32) {
  DTensor t = make(dtype, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = static_cast<float>(v(i));
  return t;
}

std::vector<float> values(const DTensor& t) { return std::vector<float>(t.f32(), t.f32() + t.numel()); }

class Mpi : public ::testing::Test {
 protected:
  Comm& c = *g_comm;
  int64_t r = g_comm->rank();
  int64_t n = g_comm->world_size();
};

TEST_F(Mpi, EveryOpOnTheWorldGroup) {
  const Group g = world_group(n, r);
  DTensor t = make_f32({3, 5}, [&](int64_t i) { return 100 * r + i; });
  c.all_reduce(t, g);
  for (int64_t i = 0; i < 15; ++i) EXPECT_EQ(t.f32()[i], static_cast<float>(100 * n * (n - 1) / 2 + n * i));
  DTensor in = make_f32({2, 3}, [&](int64_t i) { return 10 * r + i; });
  DTensor out = make(DType::F32, {2 * n, 3});
  c.all_gather(in, out, g);
  for (int64_t m = 0; m < n; ++m)
    for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(out.f32()[m * 6 + i], static_cast<float>(10 * m + i));
  DTensor big = make_f32({2 * n, 2}, [&](int64_t i) { return r + 1 + i; });
  DTensor part = make(DType::F32, {2, 2});
  c.reduce_scatter(big, part, g);
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(part.f32()[i], static_cast<float>(n * (n + 1) / 2 + n * (4 * r + i)));
  DTensor b = make_f32({4}, [&](int64_t i) { return 1000 * r + i; });
  c.broadcast(b, n - 1, g);
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(b.f32()[i], static_cast<float>(1000 * (n - 1) + i));
  const std::vector<int64_t> mine{r, -r, 7};
  const auto all = c.all_gather_ints(mine, g);
  ASSERT_EQ(all.size(), static_cast<size_t>(3 * n));
  for (int64_t m = 0; m < n; ++m) {
    EXPECT_EQ(all[static_cast<size_t>(3 * m)], m);
    EXPECT_EQ(all[static_cast<size_t>(3 * m + 1)], -m);
    EXPECT_EQ(all[static_cast<size_t>(3 * m + 2)], 7);
  }
  c.barrier(g);
}

TEST_F(Mpi, GroupsOfRealLayouts) {
  std::vector<std::string> layouts = {fmt::format("tp{}", n), fmt::format("dp{}", n), fmt::format("pp{}", n)};
  if (n == 4) {
    layouts.push_back("tp2-dp2");
    layouts.push_back("tp2-pp2");
    layouts.push_back("dp2-cp2");
  }
  for (const auto& layout : layouts) {
    const ParallelConfig pc = ParallelConfig::parse_layout(layout);
    for (GroupKind kind : {GroupKind::kTensor, GroupKind::kData, GroupKind::kContext, GroupKind::kPipeline,
                           GroupKind::kDataWithContext, GroupKind::kModel}) {
      const Group g = make_group(pc, kind, r);
      SCOPED_TRACE(layout + " " + g.describe());
      DTensor t = make_f32({5}, [&](int64_t i) { return r * 7 + i; });
      c.all_reduce(t, g);
      for (int64_t i = 0; i < 5; ++i) {
        float expect = 0;
        for (int64_t m : g.ranks) expect += static_cast<float>(m * 7 + i);
        EXPECT_EQ(t.f32()[i], expect);
      }
      DTensor in = make_f32({1, 2}, [&](int64_t i) { return r * 2 + i; });
      DTensor out = make(DType::F32, {g.size(), 2});
      c.all_gather(in, out, g);
      for (int64_t m = 0; m < g.size(); ++m)
        for (int64_t i = 0; i < 2; ++i)
          EXPECT_EQ(out.f32()[m * 2 + i], static_cast<float>(g.ranks[static_cast<size_t>(m)] * 2 + i));
      const std::vector<int64_t> me{r};
      EXPECT_EQ(c.all_gather_ints(me, g), g.ranks);
    }
  }
}

TEST_F(Mpi, ConcatenationFollowsGroupRankOrder) {
  Group g{"rev", {}, n - 1 - r};
  for (int64_t m = n - 1; m >= 0; --m) g.ranks.push_back(m);
  DTensor in = make_f32({1, 1}, [&](int64_t) { return r; });
  DTensor out = make(DType::F32, {n, 1});
  c.all_gather(in, out, g);
  for (int64_t m = 0; m < n; ++m) EXPECT_EQ(out.f32()[m], static_cast<float>(n - 1 - m));
  DTensor big = make_f32({n, 1}, [&](int64_t i) { return (r + 1) * (i + 1); });
  DTensor part = make(DType::F32, {1, 1});
  c.reduce_scatter(big, part, g);
  EXPECT_EQ(part.f32()[0], static_cast<float>(n * (n + 1) / 2 * (g.index + 1)));
  DTensor b = make_f32({2}, [&](int64_t i) { return r * 10 + i; });
  c.broadcast(b, 0, g);  // group rank 0 is global rank n - 1
  EXPECT_EQ(values(b), (std::vector<float>{static_cast<float>((n - 1) * 10), static_cast<float>((n - 1) * 10 + 1)}));
}

TEST_F(Mpi, AllToAllVWithUnevenAndZeroCounts) {
  const int64_t width = 3;
  auto count = [&](int64_t s, int64_t d) { return (s + 2 * d) % 3; };
  std::vector<int64_t> send, recv;
  int64_t ts = 0, tr = 0;
  for (int64_t d = 0; d < n; ++d) {
    send.push_back(count(r, d));
    recv.push_back(count(d, r));
    ts += send.back();
    tr += recv.back();
  }
  DTensor in = make(DType::F32, {ts, width});
  int64_t row = 0;
  for (int64_t d = 0; d < n; ++d)
    for (int64_t k = 0; k < count(r, d); ++k, ++row)
      for (int64_t w = 0; w < width; ++w) in.f32()[row * width + w] = static_cast<float>(r * 1000 + d * 100 + k * 10 + w);
  DTensor out = make(DType::F32, {tr, width});
  c.all_to_all_v(in, send, out, recv, world_group(n, r));
  row = 0;
  for (int64_t s = 0; s < n; ++s)
    for (int64_t k = 0; k < count(s, r); ++k, ++row)
      for (int64_t w = 0; w < width; ++w)
        EXPECT_EQ(out.f32()[row * width + w], static_cast<float>(s * 1000 + r * 100 + k * 10 + w));
  const std::vector<int64_t> zeros(static_cast<size_t>(n), 0);
  DTensor e_in = make(DType::F32, {0, width}), e_out = make(DType::F32, {0, width});
  c.all_to_all_v(e_in, zeros, e_out, zeros, world_group(n, r));
}

TEST_F(Mpi, AllReduceRoundsTo16BitDtypesAndSumsF64InDouble) {
  const Group g = world_group(n, r);
  // Sum = 1 + (n - 1) (1 + 2^-7): rounded to bf16.
  DTensor b = make_f32({1}, [&](int64_t) { return r == 0 ? 1.0 : 1.0 + std::ldexp(1.0, -7); }, DType::BF16);
  c.all_reduce(b, g);
  const double sum = 1.0 + static_cast<double>(n - 1) * (1.0 + std::ldexp(1.0, -7));
  EXPECT_EQ(b.f32()[0], static_cast<float>(math::round_to(sum, math::kBFloat16)));
  EXPECT_NE(static_cast<double>(b.f32()[0]), sum);  // it did round
  DTensor d = make(DType::F64, {1}, DType::F64);
  d.f64()[0] = r == 0 ? 1.0 : std::ldexp(1.0, -40);
  c.all_reduce(d, g);
  EXPECT_EQ(d.f64()[0], 1.0 + static_cast<double>(n - 1) * std::ldexp(1.0, -40));
}

TEST_F(Mpi, SendRecvRingIsBufferedAndFifo) {
  // Every rank sends first, then receives: needs buffered sends for a payload
  // past the eager limit (4 MiB here).
  const int64_t next = (r + 1) % n, prev = (r + n - 1) % n;
  DTensor bigs = make_f32({1 << 20}, [&](int64_t i) { return r + (i % 100); });
  c.send(bigs, next, 1);
  for (int k = 0; k < 3; ++k) c.send(make_f32({2}, [&](int64_t i) { return r * 100 + k * 10 + i; }), next, 2);
  DTensor bigr = make(DType::F32, {1 << 20});
  c.recv(bigr, prev, 1);
  for (int64_t i = 0; i < (1 << 20); i += 4099) ASSERT_EQ(bigr.f32()[i], static_cast<float>(prev + (i % 100)));
  for (int k = 0; k < 3; ++k) {
    DTensor t = make(DType::F32, {2});
    c.recv(t, prev, 2);
    EXPECT_EQ(values(t), (std::vector<float>{static_cast<float>(prev * 100 + k * 10),
                                             static_cast<float>(prev * 100 + k * 10 + 1)}));
  }
  c.barrier(world_group(n, r));
}

TEST_F(Mpi, RecvChecksDtypeAndShapeAndStaysUsable) {
  if (r == 0) {
    c.send(make_f32({2, 3}, [](int64_t) { return 1; }, DType::BF16), 1, 4);
    c.send(make_f32({1}, [](int64_t) { return 5; }), 1, 4);
  } else if (r == 1) {
    DTensor t = make(DType::F32, {2, 3});
    try {
      c.recv(t, 0, 4);
      ADD_FAILURE() << "no error";
    } catch (const CommError& e) {
      EXPECT_NE(std::string(e.what()).find("recv from rank 0 tag 4 on rank 1: rank 0 sent BF16[2, 3] (storage F32), "
                                           "the receiving tensor is F32[2, 3]"),
                std::string::npos)
          << e.what();
    }
    DTensor u = make(DType::F32, {1});
    c.recv(u, 0, 4);  // the next message is intact
    EXPECT_EQ(u.f32()[0], 5.0f);
  }
  c.barrier(world_group(n, r));
}

// A mismatched collective throws the same CommError on every rank, before any
// data moves; the comm stays usable.
std::string catch_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const CommError& e) {
    return e.what();
  }
  return "";
}

TEST_F(Mpi, MismatchesAreCaughtOnEveryRank) {
  const Group g = world_group(n, r);
  std::string e = catch_error([&] {
    DTensor t = make(DType::F32, {4, r == n - 1 ? 9 : 8});
    c.all_reduce(t, g);
  });
  EXPECT_NE(e.find(fmt::format("all_reduce on group {}: members passed different shapes", g.describe())),
            std::string::npos)
      << e;
  EXPECT_NE(e.find(fmt::format("rank {} passed all_reduce(F32[4, 9])", n - 1)), std::string::npos) << e;
  e = catch_error([&] {
    DTensor t = make(r == 0 ? DType::BF16 : DType::F32, {3});
    c.all_reduce(t, g);
  });
  EXPECT_NE(e.find("members passed different dtypes: rank 0 passed all_reduce(BF16[3] (storage F32))"),
            std::string::npos)
      << e;
  e = catch_error([&] {
    DTensor in = make(DType::F32, {2, 2});
    if (r == 1) {
      DTensor out = make(DType::F32, {2 * n, 2});
      c.all_gather(in, out, g);
    } else {
      c.all_reduce(in, g);
    }
  });
  EXPECT_NE(e.find("collective on group"), std::string::npos) << e;
  EXPECT_NE(e.find(fmt::format("rank 1 passed all_gather(F32[2, 2] -> F32[{}, 2])", 2 * n)), std::string::npos) << e;
  e = catch_error([&] {
    std::vector<int64_t> send(static_cast<size_t>(n), 1), recv(static_cast<size_t>(n), 1);
    if (r == 0) recv[1] = 2;
    DTensor in = make(DType::F32, {n, 2});
    DTensor out = make(DType::F32, {n + (r == 0 ? 1 : 0), 2});
    c.all_to_all_v(in, send, out, recv, g);
  });
  EXPECT_NE(e.find("rank 1 sends 1 rows to rank 0, which expects 2"), std::string::npos) << e;
  // Every rank saw the same error text: compare lengths across ranks.
  const auto lens = c.all_gather_ints(std::vector<int64_t>{static_cast<int64_t>(e.size())}, g);
  for (int64_t x : lens) EXPECT_EQ(x, lens[0]);
  // Still usable.
  DTensor t = make_f32({1}, [](int64_t) { return 1; });
  c.all_reduce(t, g);
  EXPECT_EQ(t.f32()[0], static_cast<float>(n));
}

TEST_F(Mpi, DescriptorOverhead) {
  // Cost of the mismatch check: all_reduce of 4 floats through MpiComm vs
  // a raw MPI_Allreduce (the difference is the descriptor allgather).
  const Group g = world_group(n, r);
  DTensor t = make(DType::F32, {4});
  const int iters = 300;
  MPI_Comm dup;
  MPI_Comm_dup(MPI_COMM_WORLD, &dup);
  auto time = [&](auto f) {
    MPI_Barrier(dup);
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) f();
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / iters;
  };
  const double comm_us = time([&] { c.all_reduce(t, g); });
  const double raw_us = time([&] { MPI_Allreduce(MPI_IN_PLACE, t.data(), 4, MPI_FLOAT, MPI_SUM, dup); });
  MPI_Comm_free(&dup);
  if (r == 0) std::cout << fmt::format("np {}: MpiComm all_reduce(4 floats) {:.1f} us, raw MPI_Allreduce {:.1f} us\n", n, comm_us, raw_us);
}

int run_fault_demo(const std::string& kind) {
  const auto start = std::chrono::steady_clock::now();
  run_on_mpi(
      [&](Comm& c) {
        const Group g = world_group(c.world_size(), c.rank());
        c.barrier(g);
        if (kind == "abort") {
          if (c.rank() == 1) throw Error("boom in layer 3");
          c.barrier(g);
        } else if (kind == "timeout") {
          if (c.rank() == 1) std::this_thread::sleep_for(30s);
          c.barrier(g);
        }
      },
      500ms);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::cerr << "fault demo finished without aborting after " << ms << " ms\n";
  return 1;
}

}  // namespace
}  // namespace paritron::opt

int main(int argc, char** argv) {
  paritron::opt::MpiSession mpi(&argc, &argv);
  if (const char* fault = std::getenv("PARITRON_MPI_FAULT")) return paritron::opt::run_fault_demo(fault);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {  // rank 0 prints progress; the other ranks print only their failures
    struct FailurePrinter : ::testing::EmptyTestEventListener {
      int rank = 0;
      void OnTestPartResult(const ::testing::TestPartResult& r) override {
        if (r.failed()) {
          std::cerr << "rank " << rank << ": " << (r.file_name() ? r.file_name() : "?") << ":" << r.line_number()
                    << ": failure\n" << r.summary() << "\n";
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
    paritron::opt::MpiComm comm;
    comm.set_timeout(std::chrono::seconds(30));  // a test bug that desynchronises ranks aborts instead of hanging
    paritron::opt::g_comm = &comm;
    int local = RUN_ALL_TESTS();
    MPI_Allreduce(&local, &status, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (local != 0) std::cerr << "rank " << rank << ": tests failed\n";
    paritron::opt::g_comm = nullptr;
  }
  return status;
}
