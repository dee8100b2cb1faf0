// CPU flash attention (optimized/cpu/attention.h): speed at the issue's
// layer shape (b = 1, np = 16, hn = 64, seq 2048, causal), the extra memory
// of a forward at seq 16384 (O(s): no s x s matrix), and the reference's
// core attention at a small size for the ratio.
//
// FLOPs: forward 4 * b * np * sq * sk * hn (the two GEMMs over the full
// score matrix, as the PyTorch anchor in shared/toolchain.md counts them);
// a causal kernel does about half of that work, reported separately as
// "GFLOPs_causal". Forward + backward counts 3x the forward (matmul FLOPs
// without the recomputation), the same convention as the anchor.
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <random>
#include <vector>

#include "optimized/cpu/attention.h"
#include "reference/dot_product_attention.h"

// Heap accounting for the memory benchmark: live and peak bytes through
// operator new (the kernel's buffers are std::vectors). A 16-byte header
// keeps each block's size.
namespace heap {
std::atomic<int64_t> live{0}, peak{0};
}  // namespace heap

void* operator new(size_t n) {
  auto* p = static_cast<char*>(std::malloc(n + 16));
  if (p == nullptr) throw std::bad_alloc();
  *reinterpret_cast<size_t*>(p) = n;
  const int64_t now = heap::live += static_cast<int64_t>(n);
  for (int64_t pk = heap::peak.load(); now > pk && !heap::peak.compare_exchange_weak(pk, now);) {
  }
  return p + 16;
}
void operator delete(void* p) noexcept {
  if (p == nullptr) return;
  char* base = static_cast<char*>(p) - 16;
  heap::live -= static_cast<int64_t>(*reinterpret_cast<size_t*>(base));
  std::free(base);
}
void operator delete(void* p, size_t) noexcept { operator delete(p); }

namespace {

using paritron::opt::AttentionArgs;

struct Problem {
  AttentionArgs args;
  std::vector<float> q, k, v, out, lse, dout, dq, dk, dv;
  Problem(int64_t b, int64_t np, int64_t hn, int64_t s, bool causal, bool grads) {
    args.batch = b, args.sq = s, args.sk = s, args.heads = np, args.groups = np, args.head_dim = hn;
    args.softmax_scale = 1.0f / std::sqrt(static_cast<float>(hn));
    args.causal = causal;
    const size_t n = static_cast<size_t>(s * b * np * hn);
    std::mt19937 gen(1);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto* t : {&q, &k, &v}) {
      t->resize(n);
      for (float& x : *t) x = nd(gen);
    }
    out.assign(n, 0.0f);
    lse.assign(static_cast<size_t>(b * np * s), 0.0f);
    if (grads) {
      dout.resize(n);
      for (float& x : dout) x = nd(gen);
      dq.assign(n, 0.0f), dk.assign(n, 0.0f), dv.assign(n, 0.0f);
    }
  }
  double flops() const { return 4.0 * args.batch * args.heads * args.sq * args.sk * args.head_dim; }
};

void set_flops(benchmark::State& state, double flops, bool causal) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  if (causal) {
    state.counters["GFLOP/s_causal"] =
        benchmark::Counter(flops * 0.5e-9, benchmark::Counter::kIsIterationInvariantRate);
  }
}

// Forward; args: seq, causal.
void BM_FlashForward(benchmark::State& state) {
  const bool causal = state.range(1) != 0;
  Problem p(1, 16, 64, state.range(0), causal, false);
  for (auto _ : state) {
    paritron::opt::cpu::attention_forward(p.args, p.q.data(), p.k.data(), p.v.data(), p.out.data(), p.lse.data());
    benchmark::DoNotOptimize(p.out.data());
  }
  set_flops(state, p.flops(), causal);
}
BENCHMARK(BM_FlashForward)->Args({2048, 1})->Args({2048, 0})->Unit(benchmark::kMillisecond)->UseRealTime();

// Forward + backward; args: seq, causal.
void BM_FlashForwardBackward(benchmark::State& state) {
  const bool causal = state.range(1) != 0;
  Problem p(1, 16, 64, state.range(0), causal, true);
  for (auto _ : state) {
    paritron::opt::cpu::attention_forward(p.args, p.q.data(), p.k.data(), p.v.data(), p.out.data(), p.lse.data());
    paritron::opt::cpu::attention_backward(p.args, p.q.data(), p.k.data(), p.v.data(), p.out.data(), p.lse.data(),
                                           p.dout.data(), p.dq.data(), p.dk.data(), p.dv.data());
    benchmark::DoNotOptimize(p.dq.data());
  }
  set_flops(state, 3.0 * p.flops(), causal);
}
BENCHMARK(BM_FlashForwardBackward)->Args({2048, 1})->Unit(benchmark::kMillisecond)->UseRealTime();

// Extra memory of one causal forward at seq 16384, one head: peak heap bytes
// allocated during the call beyond what was live before ("extra_MiB"; the
// inputs and outputs are allocated first), and the peak-RSS growth
// ("rss_growth_MiB": only meaningful when this benchmark runs first in the
// process, as ru_maxrss is a process-wide peak). An s x s fp32 score matrix
// would be 1 GiB.
void BM_FlashForwardMemory(benchmark::State& state) {
  const int64_t s = state.range(0);
  Problem p(1, 1, 64, s, true, false);
  rusage before{}, after{};
  getrusage(RUSAGE_SELF, &before);
  const int64_t live0 = heap::live.load();
  heap::peak = live0;
  for (auto _ : state) {
    paritron::opt::cpu::attention_forward(p.args, p.q.data(), p.k.data(), p.v.data(), p.out.data(), p.lse.data());
    benchmark::DoNotOptimize(p.out.data());
  }
  getrusage(RUSAGE_SELF, &after);
  state.counters["extra_MiB"] = static_cast<double>(heap::peak.load() - live0) / (1024.0 * 1024.0);
  state.counters["rss_growth_MiB"] = static_cast<double>(after.ru_maxrss - before.ru_maxrss) / 1024.0;  // KiB
  set_flops(state, p.flops(), true);
}
BENCHMARK(BM_FlashForwardMemory)->Arg(16384)->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();

// The reference core attention (float64 truth) and the kernel at a small
// size: b = 1, np = 2, hn = 64, seq 256, causal.
void BM_ReferenceForwardSmall(benchmark::State& state) {
  using namespace paritron;
  const int64_t s = 256, np = 2, hn = 64;
  TransformerConfig cfg;
  cfg.num_layers = 1, cfg.hidden_size = np * hn, cfg.num_attention_heads = np, cfg.num_query_groups = np;
  cfg.kv_channels = hn, cfg.attention_dropout = 0.0;
  Problem p(1, np, hn, s, true, false);
  ref::Mat q(s, np * hn), k(s, np * hn), v(s, np * hn);
  for (int64_t i = 0; i < q.size(); ++i) q.data()[i] = p.q[i], k.data()[i] = p.k[i], v.data()[i] = p.v[i];
  const ref::Precision prec = ref::truth_precision();
  for (auto _ : state) {
    auto f = ref::dot_product_attention_forward(cfg, q, k, v, 1, ref::AttnMaskType::causal, std::nullopt, prec, {});
    benchmark::DoNotOptimize(f.output.data());
  }
  set_flops(state, p.flops(), true);
}
BENCHMARK(BM_ReferenceForwardSmall)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_FlashForwardSmall(benchmark::State& state) {
  Problem p(1, 2, 64, 256, true, false);
  for (auto _ : state) {
    paritron::opt::cpu::attention_forward(p.args, p.q.data(), p.k.data(), p.v.data(), p.out.data(), p.lse.data());
    benchmark::DoNotOptimize(p.out.data());
  }
  set_flops(state, p.flops(), true);
}
BENCHMARK(BM_FlashForwardSmall)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
