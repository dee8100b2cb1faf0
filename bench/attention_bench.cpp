// CPU flash attention (optimized/cpu/attention.h): speed at the issue's
// layer shape (b = 1, np = 16, hn = 64, seq 2048, causal and unmasked), the
// extra memory of a causal forward at seq 16384 (O(s): no s x s matrix), and
// the float64 reference's core attention (reference/dot_product_attention.h)
// for the ratio, at the layer shape and at a small one.
//
// Names and counters follow bench/README.md:
//   attention_fwd/<impl>/b<b>_a<np>_s<s>_d<hn>[_causal|_nomask]/<dtype>
//   attention_fwd_bwd/...
// `flops` per iteration: forward 4 * b * np * sq * sk * hn (the two GEMMs over
// the full score matrix, as the PyTorch anchor in shared/toolchain.md counts
// them, also for causal shapes); forward + backward 3x the forward (matmul
// FLOPs without the recomputation). `flops_causal_half` (informational, not
// read by the table) is the half square a causal kernel actually has to do.
// `extra_memory_bytes`: peak heap bytes through operator new during the call
// beyond what was live before it (inputs and outputs are allocated first).
//
//   build/release/bench/attention_bench --benchmark_filter=optimized
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "optimized/cpu/attention.h"
#include "reference/dot_product_attention.h"

// Heap accounting for the memory benchmark: live and peak bytes through
// operator new (the kernel's buffers are std::vectors). A 16-byte header
// keeps each block's size. (The aligned operator new overloads are not
// replaced: the kernel does not use over-aligned types.)
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

struct Shape {
  int64_t b, np, s, hn;
  bool causal;
  std::string name() const {
    return fmt::format("b{}_a{}_s{}_d{}_{}", b, np, s, hn, causal ? "causal" : "nomask");
  }
  // Forward model FLOPs: the full s x s square (bench/README.md).
  double flops() const { return 4.0 * b * np * s * s * hn; }
};

struct Problem {
  AttentionArgs args;
  std::vector<float> q, k, v, out, lse, dout, dq, dk, dv;
  Problem(const Shape& sh, bool grads) {
    args.batch = sh.b, args.sq = sh.s, args.sk = sh.s, args.heads = sh.np, args.groups = sh.np, args.head_dim = sh.hn;
    args.softmax_scale = 1.0f / std::sqrt(static_cast<float>(sh.hn));
    args.causal = sh.causal;
    const size_t n = static_cast<size_t>(sh.s * sh.b * sh.np * sh.hn);
    std::mt19937 gen(1);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto* t : {&q, &k, &v}) {
      t->resize(n);
      for (float& x : *t) x = nd(gen);
    }
    out.assign(n, 0.0f);
    lse.assign(static_cast<size_t>(sh.b * sh.np * sh.s), 0.0f);
    if (grads) {
      dout.resize(n);
      for (float& x : dout) x = nd(gen);
      dq.assign(n, 0.0f), dk.assign(n, 0.0f), dv.assign(n, 0.0f);
    }
  }
};

void set_flops(benchmark::State& state, const Shape& sh, bool backward) {
  const double mult = backward ? 3.0 : 1.0;
  state.counters["flops"] = mult * sh.flops();
  if (sh.causal) state.counters["flops_causal_half"] = 0.5 * mult * sh.flops();
}

void BM_OptimizedAttention(benchmark::State& state, Shape sh, bool backward) {
  Problem p(sh, backward);
  for (auto _ : state) {
    paritron::opt::cpu::attention_forward(p.args, p.q.data(), p.k.data(), p.v.data(), p.out.data(), p.lse.data());
    if (backward) {
      paritron::opt::cpu::attention_backward(p.args, p.q.data(), p.k.data(), p.v.data(), p.out.data(), p.lse.data(),
                                             p.dout.data(), p.dq.data(), p.dk.data(), p.dv.data());
      benchmark::DoNotOptimize(p.dq.data());
    }
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, sh, backward);
}

// Extra memory of the forward: peak heap bytes allocated during the calls
// beyond what was live before (extra_memory_bytes), and the peak-RSS growth
// (rss_growth_bytes: only meaningful when this benchmark runs first in the
// process, as ru_maxrss is a process-wide peak; it is registered first). An
// s x s fp32 score matrix at s 16384 would be 1 GiB per head.
void BM_OptimizedAttentionMemory(benchmark::State& state, Shape sh) {
  Problem p(sh, false);
  rusage before{}, after{};
  getrusage(RUSAGE_SELF, &before);
  const int64_t live0 = heap::live.load();
  heap::peak = live0;
  for (auto _ : state) {
    paritron::opt::cpu::attention_forward(p.args, p.q.data(), p.k.data(), p.v.data(), p.out.data(), p.lse.data());
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  }
  getrusage(RUSAGE_SELF, &after);
  state.counters["extra_memory_bytes"] = static_cast<double>(heap::peak.load() - live0);
  state.counters["rss_growth_bytes"] = static_cast<double>(after.ru_maxrss - before.ru_maxrss) * 1024.0;  // KiB
  set_flops(state, sh, false);
}

// The float64 reference's core attention (the truth), from the same inputs.
void BM_ReferenceAttention(benchmark::State& state, Shape sh, bool backward) {
  using namespace paritron;
  TransformerConfig cfg;
  cfg.num_layers = 1, cfg.hidden_size = sh.np * sh.hn, cfg.num_attention_heads = sh.np;
  cfg.num_query_groups = sh.np, cfg.kv_channels = sh.hn, cfg.attention_dropout = 0.0;
  const int64_t rows = sh.s * sh.b, cols = sh.np * sh.hn;
  ref::Mat q(rows, cols), k(rows, cols), v(rows, cols), dout;
  {
    Problem p(sh, backward);
    for (int64_t i = 0; i < q.size(); ++i) q.data()[i] = p.q[i], k.data()[i] = p.k[i], v.data()[i] = p.v[i];
    if (backward) {
      dout.resize(rows, cols);
      for (int64_t i = 0; i < dout.size(); ++i) dout.data()[i] = p.dout[i];
    }
  }
  const ref::Precision prec = ref::truth_precision();
  const ref::AttnMaskType mask = sh.causal ? ref::AttnMaskType::causal : ref::AttnMaskType::no_mask;
  for (auto _ : state) {
    auto f = ref::dot_product_attention_forward(cfg, q, k, v, sh.b, mask, std::nullopt, prec, {});
    benchmark::DoNotOptimize(f.output.data());
    if (backward) {
      auto g = ref::dot_product_attention_backward(cfg, q, k, v, f, dout, prec);
      benchmark::DoNotOptimize(&g);
    }
    benchmark::ClobberMemory();
  }
  set_flops(state, sh, backward);
}

std::string row_name(bool backward, const char* impl, const Shape& sh, const char* dtype) {
  return fmt::format("attention_{}/{}/{}/{}", backward ? "fwd_bwd" : "fwd", impl, sh.name(), dtype);
}

const bool kRegistered = [] {
  // First, so that rss_growth_bytes sees the process's first big allocations.
  const Shape long_seq{1, 1, 16384, 64, true};
  benchmark::RegisterBenchmark(row_name(false, "optimized", long_seq, "fp32").c_str(), BM_OptimizedAttentionMemory,
                               long_seq)
      ->Iterations(1)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();

  // The layer's attention (issue #5 shape) and a small shape; each with the
  // reference for the ratio. The reference at the layer shape holds several
  // [16 * 2048, 2048] float64 matrices (~0.5 GiB each) and takes seconds:
  // one iteration.
  const Shape layer_causal{1, 16, 2048, 64, true}, layer_nomask{1, 16, 2048, 64, false};
  const Shape small{1, 2, 256, 64, true};
  struct Row {
    Shape sh;
    bool backward;
    bool reference_once;  // reference: ->Iterations(1)
  };
  for (const Row& r : {Row{layer_causal, false, true}, Row{layer_nomask, false, true}, Row{layer_causal, true, true},
                       Row{small, false, false}, Row{small, true, false}}) {
    auto* ref = benchmark::RegisterBenchmark(row_name(r.backward, "reference", r.sh, "fp64").c_str(),
                                             BM_ReferenceAttention, r.sh, r.backward)
                    ->Unit(benchmark::kMillisecond)
                    ->UseRealTime();
    if (r.reference_once) ref->Iterations(1);
    benchmark::RegisterBenchmark(row_name(r.backward, "optimized", r.sh, "fp32").c_str(), BM_OptimizedAttention, r.sh,
                                 r.backward)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  return true;
}();

}  // namespace
