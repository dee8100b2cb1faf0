// Throughput of the counter-based RNG on the CPU (common/math/philox.h,
// common/math/random.h, common/rng.h): raw Philox4x32 blocks, per-element
// uniform and normal draws, and the tensor fills the reference and the CPU
// backend use to make weights and inputs. Items are Philox blocks or tensor
// elements (items_per_second); bytes are those written to the tensor.
//
// Napkin math: one Philox4x32-10 block is 10 rounds of two 32x32->64
// multiplies plus xors; a normal draw takes 4/pi blocks on average, plus a
// log (~20 flops), a division and a square root, all in double.
#include <benchmark/benchmark.h>

#include <cstdint>

#include "common/math/philox.h"
#include "common/math/random.h"
#include "common/rng.h"

namespace paritron {
namespace {

constexpr RngKey kKey = rng_key(1234, "bench.rng");

template <int Rounds>
void BM_Philox4x32(benchmark::State& state) {
  math::PhiloxBlock c;
  uint32_t sink = 0;
  for (auto _ : state) {
    for (uint32_t i = 0; i < 1024; ++i) {
      c.v[0] = i;
      const math::PhiloxBlock out = math::philox4x32<Rounds>(c, kKey);
      sink ^= out.v[0] ^ out.v[1] ^ out.v[2] ^ out.v[3];
    }
    ++c.v[1];
    benchmark::DoNotOptimize(sink);
  }
  state.SetItemsProcessed(state.iterations() * 1024);
}
BENCHMARK(BM_Philox4x32<10>)->Name("Philox4x32_10/blocks");
BENCHMARK(BM_Philox4x32<7>)->Name("Philox4x32_7/blocks");

void BM_UniformDouble(benchmark::State& state) {
  uint64_t base = 0;
  double sink = 0;
  for (auto _ : state) {
    for (uint64_t i = 0; i < 1024; ++i) sink += math::uniform_double(kKey, base + i);
    base += 1024;
    benchmark::DoNotOptimize(sink);
  }
  state.SetItemsProcessed(state.iterations() * 1024);
}
BENCHMARK(BM_UniformDouble);

void BM_NormalDouble(benchmark::State& state) {
  uint64_t base = 0;
  double sink = 0;
  for (auto _ : state) {
    for (uint64_t i = 0; i < 1024; ++i) sink += math::normal_double(kKey, base + i);
    base += 1024;
    benchmark::DoNotOptimize(sink);
  }
  state.SetItemsProcessed(state.iterations() * 1024);
}
BENCHMARK(BM_NormalDouble);

void BM_PortableLog(benchmark::State& state) {
  double x = 0.001;
  double sink = 0;
  for (auto _ : state) {
    for (int i = 0; i < 1024; ++i) {
      sink += math::portable_log(x);
      x += 0.000977;  // sweeps (0, 1], where the normal draw takes its logs
      if (x > 1.0) x -= 1.0;
    }
    benchmark::DoNotOptimize(sink);
  }
  state.SetItemsProcessed(state.iterations() * 1024);
}
BENCHMARK(BM_PortableLog);

// fill_* over a tensor of state.range(0) elements of dtype state.range(1).
template <bool Normal>
void BM_Fill(benchmark::State& state) {
  const auto dtype = static_cast<DType>(state.range(1));
  Tensor t(dtype, {state.range(0)});
  for (auto _ : state) {
    if constexpr (Normal) {
      fill_normal(t, kKey, 0, 0.0, 0.02);
    } else {
      fill_uniform(t, kKey, 0, -1.0, 1.0);
    }
    benchmark::DoNotOptimize(t.bytes().data());
  }
  state.SetItemsProcessed(state.iterations() * t.numel());
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(t.nbytes()));
  state.SetLabel(std::string(dtype_name(dtype)));
}

void fill_args(benchmark::internal::Benchmark* b) {
  for (DType d : {DType::F64, DType::F32, DType::BF16}) b->Args({1 << 20, static_cast<int64_t>(d)});
}
BENCHMARK(BM_Fill<true>)->Name("fill_normal")->Apply(fill_args)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Fill<false>)->Name("fill_uniform")->Apply(fill_args)->Unit(benchmark::kMillisecond);

// A tensor-parallel rank's shard: a quarter of the columns of a 1024 x 4096 weight.
void BM_NormalShard(benchmark::State& state) {
  for (auto _ : state) {
    Tensor t = normal_shard(DType::BF16, kKey, 1024, 4096, 0, 1024, 1024, 1024, 0.0, 0.02);
    benchmark::DoNotOptimize(t.bytes().data());
  }
  state.SetItemsProcessed(state.iterations() * 1024 * 1024);
}
BENCHMARK(BM_NormalShard)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace paritron
