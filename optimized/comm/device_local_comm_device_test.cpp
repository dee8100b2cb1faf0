// The device-local comm (optimized/comm/device_local_comm.h) on a GPU: 2-4
// ranks share the device, each with its own thread, CudaBackend and stream.
// Every collective is run on it and on ThreadComm (the CPU backend's
// fp32-carried values) with the same data: the results must agree bit for
// bit (member-order fp32 sums rounded once; f64 in double; bf16 / f16 stored
// in 2 bytes on the device). Also: queued producer kernels are waited for,
// mismatches give ThreadComm's messages on every member, a failing rank
// aborts its peers, a missing rank times out, recv checks dtype and shape,
// fp8 is not summable. Skips without a device; ci/gpu runs it (also under
// compute-sanitizer: the sizes stay small).
#include "optimized/comm/device_local_comm.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/parallel_config.h"
#include "optimized/comm/groups.h"
#include "optimized/comm/run_ranks.h"
#include "optimized/comm/thread_comm.h"
#include "optimized/cuda/cuda_backend.h"

namespace paritron::opt {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

class DeviceLocal : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::device_available(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  }
};

// ---------------------------------------------------------------------------
// The same program on two sides.

// Host side: the CPU backend's representation (F32 carrying 16-bit values).
struct HostSide {
  DTensor make(DType dtype, const Shape& shape, const std::vector<double>& v) {
    const Tensor rounded = Tensor::from_values(dtype, shape, v);
    const DType storage = dtype == DType::F64 || !is_floating(dtype) ? dtype : DType::F32;
    DTensor t = empty(dtype, shape, storage);
    for (int64_t i = 0; i < t.numel(); ++i) {
      if (storage == DType::F32) t.f32()[i] = static_cast<float>(rounded.get(i));
      if (storage == DType::F64) t.f64()[i] = rounded.get(i);
      if (storage == DType::I64) static_cast<int64_t*>(t.data())[i] = rounded.get_int(i);
    }
    return t;
  }
  DTensor empty(DType dtype, const Shape& shape) {
    return empty(dtype, shape, dtype == DType::F64 || !is_floating(dtype) ? dtype : DType::F32);
  }
  static DTensor empty(DType dtype, const Shape& shape, DType storage) {
    const size_t n = static_cast<size_t>(shape_numel(shape)) * dtype_size(storage);
    std::shared_ptr<std::byte> buf(new std::byte[std::max<size_t>(n, 1)](), std::default_delete<std::byte[]>());
    return DTensor(buf, 0, dtype, storage, shape);
  }
  std::vector<double> read(const DTensor& t) {
    std::vector<double> out;
    for (int64_t i = 0; i < t.numel(); ++i) {
      switch (t.storage_dtype()) {
        case DType::F32: out.push_back(t.f32()[i]); break;
        case DType::F64: out.push_back(t.f64()[i]); break;
        default: out.push_back(static_cast<double>(static_cast<const int64_t*>(t.data())[i])); break;
      }
    }
    return out;
  }
};

// Device side: this rank's CudaBackend (its stream is the comm's).
struct DeviceSide {
  cuda::CudaBackend be;
  DTensor make(DType dtype, const Shape& shape, const std::vector<double>& v) {
    return be.upload(Tensor::from_values(dtype, shape, v), dtype);
  }
  DTensor empty(DType dtype, const Shape& shape) { return be.zeros(dtype, shape); }
  std::vector<double> read(const DTensor& t) { return be.download(t).to_doubles(); }
};

double value(int64_t r, int64_t i) {
  // Magnitudes over 7 decades: fp32 sums depend on the order.
  return std::sin(0.37 * static_cast<double>(r * 1000 + i)) * std::pow(10.0, static_cast<double>((r + i) % 7) - 3);
}

std::vector<double> values(int64_t count, int64_t r, int64_t offset) {
  std::vector<double> v(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) v[static_cast<size_t>(i)] = value(r, offset + i);
  return v;
}

template <class Side>
std::vector<double> program(Comm& c, Side& side, DType dtype) {
  const int64_t n = c.world_size(), r = c.rank();
  const Group world = world_group(n, r);
  std::vector<double> seen;
  auto keep = [&](const DTensor& t) {
    const auto v = side.read(t);
    seen.insert(seen.end(), v.begin(), v.end());
  };
  // all_reduce: an awkward length (blocks of 1013 / n elements per member).
  DTensor t = side.make(dtype, {1013}, values(1013, r, 0));
  c.all_reduce(t, world);
  keep(t);
  if (n % 2 == 0) {
    const ParallelConfig pc = ParallelConfig::parse_layout(fmt::format("tp2-dp{}", n / 2));
    for (GroupKind kind : {GroupKind::kTensor, GroupKind::kData}) {
      DTensor u = side.make(dtype, {5, 3}, values(15, r + 7, 0));
      c.all_reduce(u, make_group(pc, kind, r));
      keep(u);
    }
  }
  // all_gather.
  DTensor in = side.make(dtype, {3, 5}, values(15, r, 2000));
  DTensor out = side.empty(dtype, {3 * n, 5});
  c.all_gather(in, out, world);
  keep(out);
  // reduce_scatter.
  DTensor big = side.make(dtype, {2 * n, 33}, values(2 * n * 33, r, 3000));
  DTensor part = side.empty(dtype, {2, 33});
  c.reduce_scatter(big, part, world);
  keep(part);
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
  DTensor a_in = side.make(dtype, {rows_in, 4}, values(rows_in * 4, r, 4000));
  DTensor a_out = side.empty(dtype, {rows_out, 4});
  c.all_to_all_v(a_in, send, a_out, recv, world);
  keep(a_out);
  // broadcast from the last member.
  DTensor b = side.make(dtype, {6}, values(6, r, 5000));
  c.broadcast(b, n - 1, world);
  keep(b);
  // send / recv ring (buffered: everyone sends first).
  if (n > 1) {
    c.send(side.make(dtype, {2, 2}, values(4, r, 6000)), (r + 1) % n, 7);
    DTensor m = side.empty(dtype, {2, 2});
    c.recv(m, (r + n - 1) % n, 7);
    keep(m);
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

class DeviceVsThreads : public ::testing::TestWithParam<std::tuple<int64_t, DType>> {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::device_available(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  }
};

TEST_P(DeviceVsThreads, EveryCollectiveGivesThreadCommsBits) {
  const auto [n, dtype] = GetParam();
  std::vector<std::vector<double>> host(static_cast<size_t>(n)), device(static_cast<size_t>(n));
  run_on_threads(n, [&](Comm& c) {
    HostSide side;
    host[static_cast<size_t>(c.rank())] = program(c, side, dtype);
  }, 30s);
  run_on_device_threads(n, [&](Comm& c) {
    EXPECT_EQ(c.name(), "device-threads");
    DeviceSide side;
    device[static_cast<size_t>(c.rank())] = program(c, side, dtype);
  }, 30s);
  for (int64_t r = 0; r < n; ++r) {
    expect_same_bits(host[static_cast<size_t>(r)], device[static_cast<size_t>(r)],
                     fmt::format("rank {} of {}, {}", r, n, dtype_name(dtype)));
  }
}

INSTANTIATE_TEST_SUITE_P(Comm, DeviceVsThreads,
                         ::testing::Combine(::testing::Values<int64_t>(1, 2, 3, 4),
                                            ::testing::Values(DType::F32, DType::BF16, DType::F16, DType::F64)),
                         [](const auto& info) {
                           return fmt::format("np{}_{}", std::get<0>(info.param), dtype_name(std::get<1>(info.param)));
                         });

TEST_F(DeviceLocal, IntegerAllReduceIsExactAndSixteenBitSumsRoundOnce) {
  run_on_device_threads(3, [](Comm& c) {
    DeviceSide side;
    const Group g = world_group(3, c.rank());
    const auto r = static_cast<double>(c.rank());
    DTensor i = side.make(DType::I64, {4}, {r, -r, r * 1e12, 1});
    c.all_reduce(i, g);
    EXPECT_EQ(side.read(i), (std::vector<double>{3, -3, 3e12, 3}));
    // bf16: 1 + 2 (1 + 2^-7) = 3 + 2^-6 in fp32, a bf16: kept. Rounding after
    // each addition would give 3 (two ties to even).
    DTensor b = side.make(DType::BF16, {1}, {c.rank() == 0 ? 1.0 : 1.0 + std::ldexp(1.0, -7)});
    c.all_reduce(b, g);
    EXPECT_EQ(side.read(b)[0], 3.0 + std::ldexp(1.0, -6));
  });
}

TEST_F(DeviceLocal, QueuedProducersAreWaitedForAndResultsAreReadyOnReturn) {
  // Each rank fills its input with a kernel queued just before the
  // collective (the comm must wait for it), and reads the result with a
  // kernel queued just after (the comm must have finished writing it).
  const int64_t n = 4, len = 1 << 16;
  run_on_device_threads(n, [&](Comm& c) {
    DeviceSide side;
    const Group g = world_group(n, c.rank());
    for (int iter = 0; iter < 5; ++iter) {
      DTensor t = side.be.empty(DType::F32, {len});
      side.be.fill(t, static_cast<double>(c.rank() + 1 + iter));
      c.all_reduce(t, g);
      EXPECT_EQ(side.be.sum(t), static_cast<double>(len) * static_cast<double>(n * (n + 1) / 2 + n * iter));
      DTensor in = side.be.empty(DType::BF16, {len / n});
      side.be.fill(in, static_cast<double>(c.rank()));
      DTensor out = side.be.empty(DType::BF16, {len});
      c.all_gather(in, out, g);
      EXPECT_EQ(side.be.sum(out), static_cast<double>(len / n) * static_cast<double>(n * (n - 1) / 2));
    }
  });
}

// Runs body on device-local ranks without the runner's abort: each rank's
// error message ("" when none).
std::vector<std::string> run_each(int64_t n, const std::function<void(Comm&, DeviceSide&)>& body,
                                  std::chrono::milliseconds timeout = 10s) {
  auto world = make_device_local_world(n);
  world->set_timeout(timeout);
  std::vector<std::string> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int64_t r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        DeviceSide side;
        body(world->comm(r), side);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

TEST_F(DeviceLocal, MismatchesAreReportedOnEveryMemberWithThreadCommsMessages) {
  auto errors = run_each(2, [](Comm& c, DeviceSide& side) {
    DTensor t = side.empty(DType::BF16, {4, c.rank() == 1 ? 9 : 8});
    c.all_reduce(t, world_group(2, c.rank()));
  });
  for (const auto& e : errors) {
    EXPECT_EQ(e, "all_reduce on group world [0, 1]: members passed different shapes: rank 0 passed "
                 "all_reduce(BF16[4, 8]), rank 1 passed all_reduce(BF16[4, 9])");
  }
  errors = run_each(2, [](Comm& c, DeviceSide& side) {
    DTensor t = side.empty(DType::F8_E4M3, {4});
    c.all_reduce(t, world_group(2, c.rank()));
  });
  for (const auto& e : errors) EXPECT_NE(e.find("cannot sum F8_E4M3 storage"), std::string::npos) << e;
  errors = run_each(2, [](Comm& c, DeviceSide& side) {
    if (c.rank() == 0) {
      c.send(side.empty(DType::BF16, {2, 3}), 1, 1);
    } else {
      DTensor t = side.empty(DType::F32, {2, 3});
      c.recv(t, 0, 1);
    }
  });
  EXPECT_EQ(errors[0], "");
  EXPECT_EQ(errors[1], "recv from rank 0 tag 1 on rank 1: rank 0 sent BF16[2, 3], the receiving tensor is F32[2, 3]");
}

TEST_F(DeviceLocal, AFailingRankAbortsItsPeers) {
  std::mutex mu;
  std::vector<std::string> seen(4);
  const auto start = Clock::now();
  try {
    run_on_device_threads(4, [&](Comm& c) {
      DeviceSide side;
      if (c.rank() == 1) {
        std::this_thread::sleep_for(50ms);
        throw Error("boom in layer 3");
      }
      try {
        DTensor t = side.empty(DType::BF16, {64});
        c.all_reduce(t, world_group(4, c.rank()));
      } catch (const CommError& e) {
        std::lock_guard<std::mutex> lock(mu);
        seen[static_cast<size_t>(c.rank())] = e.what();
        throw;
      }
    }, 10s);
    FAIL() << "no error";
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 1);
    EXPECT_EQ(std::string(e.what()), "rank 1 failed: boom in layer 3");
  }
  EXPECT_LT(Clock::now() - start, 5s);  // not the 10 s timeout (backend construction included)
  for (int r : {0, 2, 3}) {
    EXPECT_EQ(seen[static_cast<size_t>(r)],
              fmt::format("rank 1 failed: boom in layer 3 [rank {} in all_reduce on group world [0, 1, 2, 3]]", r));
  }
}

TEST_F(DeviceLocal, AMissingRankTimesOut) {
  const auto start = Clock::now();
  try {
    run_on_device_threads(2, [](Comm& c) {
      DeviceSide side;
      if (c.rank() == 1) std::this_thread::sleep_for(600ms);
      DTensor t = side.empty(DType::F32, {1});
      c.all_reduce(t, world_group(2, c.rank()));
    }, 200ms);
    FAIL() << "no error";
  } catch (const RankFailed& e) {
    EXPECT_EQ(e.rank(), 0);
    EXPECT_EQ(std::string(e.what()),
              "rank 0 failed: all_reduce on group world [0, 1]: rank 0 timed out after 200 ms waiting for rank 1 "
              "(not arrived)");
  }
  EXPECT_LT(Clock::now() - start, 5s);
}

TEST_F(DeviceLocal, ConcurrentGroupsOfTp2Dp2) {
  // tp groups {0,1},{2,3} run concurrently, then dp {0,2},{1,3}, many times:
  // bf16 results against host sums of the same values.
  const ParallelConfig pc = ParallelConfig::parse_layout("tp2-dp2");
  run_on_device_threads(4, [&](Comm& c) {
    DeviceSide side;
    const int64_t r = c.rank();
    const Group tp = make_group(pc, GroupKind::kTensor, r);
    const Group dp = make_group(pc, GroupKind::kData, r);
    for (int iter = 0; iter < 50; ++iter) {
      std::vector<double> mine(8);
      for (int64_t i = 0; i < 8; ++i) mine[static_cast<size_t>(i)] = static_cast<double>(r * 16 + i + iter);
      DTensor t = side.make(DType::BF16, {8}, mine);
      c.all_reduce(t, tp);
      const auto got = side.read(t);
      for (int64_t i = 0; i < 8; ++i) {
        float expect = 0;
        for (int64_t m : tp.ranks) expect += static_cast<float>(m * 16 + i + iter);
        ASSERT_EQ(got[static_cast<size_t>(i)], Tensor::from_values(DType::BF16, {1}, std::vector<double>{expect}).get(0));
      }
      DTensor in = side.make(DType::F32, {1, 2}, {static_cast<double>(2 * r), static_cast<double>(2 * r + 1)});
      DTensor out = side.empty(DType::F32, {2, 2});
      c.all_gather(in, out, dp);
      const auto gathered = side.read(out);
      for (int64_t m = 0; m < 2; ++m)
        for (int64_t i = 0; i < 2; ++i)
          ASSERT_EQ(gathered[static_cast<size_t>(m * 2 + i)], static_cast<double>(dp.ranks[static_cast<size_t>(m)] * 2 + i));
    }
  });
}

TEST(DeviceLocalWithoutDevice, SaysWhy) {
  std::string why;
  if (cuda::device_available(&why)) GTEST_SKIP() << "a CUDA device is present";
  try {
    run_on_device_threads(2, [](Comm&) {});
    FAIL() << "no error";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("device-threads comm: no CUDA device is usable: "), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace paritron::opt
