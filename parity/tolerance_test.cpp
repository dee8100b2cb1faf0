// The tolerance model (parity/tolerance.h): hand-computed verdicts, real
// cases in each dtype passing, injected faults failing, integer tensors
// exact; and, gated by PARITRON_TOLERANCE_MEASURE, the measurement the
// constants rest on (parity/README.md, "Tolerance model").
#include "parity/tolerance.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include <fmt/format.h>

#include "common/transformer_config.h"
#include "optimized/run_case.h"
#include "parity/expected.h"
#include "reference/make_case.h"

namespace paritron::parity {
namespace {

Tensor f64(Shape shape, std::vector<double> v) { return Tensor::from_values(DType::F64, std::move(shape), v); }

const TensorVerdict& find(const std::vector<TensorVerdict>& vs, const std::string& name) {
  for (const auto& v : vs) {
    if (v.name == name) return v;
  }
  throw std::runtime_error("no verdict for " + name);
}

TEST(Tolerance, UnitRoundoff) {
  EXPECT_EQ(unit_roundoff(DType::F64), std::ldexp(1.0, -53));
  EXPECT_EQ(unit_roundoff(DType::F32), std::ldexp(1.0, -24));
  EXPECT_EQ(unit_roundoff(DType::F16), std::ldexp(1.0, -11));
  EXPECT_EQ(unit_roundoff(DType::BF16), std::ldexp(1.0, -8));
  EXPECT_THROW(unit_roundoff(DType::I64), Error);
}

// bound = k * max|emulated - truth| + c * u * sqrt(n) * max|truth|, by hand.
TEST(Tolerance, HandComputedVerdicts) {
  std::map<std::string, Tensor> truth{{"outputs.output", f64({4}, {1.0, -2.0, 0.5, 0.0})}};
  // Dyadic values, so every number below is exact. Reference error 1/64.
  std::map<std::string, Tensor> emulated{{"outputs.output", f64({4}, {1.0, -2.015625, 0.5, 0.0})}};
  ToleranceParams p;
  p.k = 2;
  p.c = 1;
  // BF16: u = 2^-8, n = 16: floor = 2^-8 * 4 * 2 = 1/32; bound = 2/64 + 1/32 = 1/16 (inclusive).
  {
    std::map<std::string, Tensor> actual{{"outputs.output", f64({4}, {1.0, -2.0, 0.5625, 0.0})}};
    const auto vs = judge(truth, emulated, actual, DType::BF16, 16, p);
    ASSERT_EQ(vs.size(), 1u);
    const TensorVerdict& v = vs[0];
    EXPECT_TRUE(v.passed) << v.summary();
    EXPECT_EQ(v.error, 0.0625);
    EXPECT_EQ(v.reference_error, 0.015625);
    EXPECT_EQ(v.scale, 2.0);
    EXPECT_EQ(v.floor, 0.03125);
    EXPECT_EQ(v.bound, 0.0625);
    EXPECT_EQ(v.worst_index, 2);
    EXPECT_EQ(v.expected, 0.5);
    EXPECT_EQ(v.actual, 0.5625);
  }
  {
    std::map<std::string, Tensor> actual{{"outputs.output", f64({4}, {1.0, -2.0, 0.5, 0.0625 + 0.0009765625})}};
    const TensorVerdict v = judge(truth, emulated, actual, DType::BF16, 16, p)[0];
    EXPECT_FALSE(v.passed) << v.summary();
    EXPECT_EQ(v.worst_index, 3);
    EXPECT_EQ(v.worst_position(), "[3]");
    EXPECT_NE(v.summary().find("FAIL outputs.output"), std::string::npos);
  }
  // F32 with no emulated error: the floor alone, 2^-24 * 1 * 2.
  {
    std::map<std::string, Tensor> actual{{"outputs.output", f64({4}, {1.0, -2.0 + 1e-7, 0.5, 0.0})}};
    const TensorVerdict v = judge(truth, truth, actual, DType::F32, 1, p)[0];
    EXPECT_DOUBLE_EQ(v.floor, std::ldexp(2.0, -24));
    EXPECT_TRUE(v.passed) << v.summary();
    std::map<std::string, Tensor> worse{{"outputs.output", f64({4}, {1.0, -2.0 + 2e-7, 0.5, 0.0})}};
    EXPECT_FALSE(judge(truth, truth, worse, DType::F32, 1, p)[0].passed);
  }
}

TEST(Tolerance, NonFiniteMissingAndExtraTensors) {
  std::map<std::string, Tensor> truth{{"outputs.output", f64({2}, {1.0, INFINITY})},
                                      {"outputs.intermediate.x", f64({1}, {1.0})},
                                      {"grads.inputs.hidden_states", f64({1}, {1.0})}};
  std::map<std::string, Tensor> actual{{"outputs.output", f64({2}, {1.0, INFINITY})},
                                       {"outputs.extra", f64({1}, {0.0})}};
  const auto vs = judge(truth, truth, actual, DType::F32, 8);
  ASSERT_EQ(vs.size(), 3u);  // the intermediate tap the actual lacks is left out
  EXPECT_TRUE(find(vs, "outputs.output").passed);
  EXPECT_FALSE(find(vs, "grads.inputs.hidden_states").passed);
  EXPECT_FALSE(find(vs, "outputs.extra").passed);
  std::map<std::string, Tensor> nan{{"outputs.output", f64({2}, {NAN, INFINITY})}};
  const TensorVerdict v = find(judge(truth, truth, nan, DType::F32, 8), "outputs.output");
  EXPECT_FALSE(v.passed);
  EXPECT_TRUE(std::isinf(v.error));
  EXPECT_EQ(v.worst_index, 0);
}

TEST(Tolerance, IntegerTensorsExactAndSkipList) {
  const std::vector<double> idx{0, 3, 1, 2};
  std::map<std::string, Tensor> truth{{"outputs.indices", Tensor::from_values(DType::I64, {2, 2}, idx)}};
  std::map<std::string, Tensor> same{{"outputs.indices", Tensor::from_values(DType::I64, {2, 2}, idx)}};
  std::map<std::string, Tensor> off{{"outputs.indices", Tensor::from_values(DType::I64, {2, 2}, std::vector<double>{0, 3, 2, 1})}};
  ToleranceParams loose;
  loose.k = 1e9;
  loose.c = 1e9;
  const TensorVerdict ok = judge(truth, truth, same, DType::BF16, 64, loose)[0];
  EXPECT_TRUE(ok.passed);
  EXPECT_TRUE(ok.integral);
  const TensorVerdict bad = judge(truth, off, off, DType::BF16, 64, loose)[0];  // even when the emulation agrees
  EXPECT_FALSE(bad.passed);
  EXPECT_EQ(bad.worst_index, 2);
  loose.skip = {"outputs.indices"};
  const TensorVerdict skipped = judge(truth, truth, off, DType::BF16, 64, loose)[0];
  EXPECT_TRUE(skipped.passed);
  EXPECT_TRUE(skipped.skipped);
}

// ---------------------------------------------------------------- real cases

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Case profile_case(const std::string& profile, const std::string& component, uint64_t seed, int64_t s, int64_t b) {
  ref::MakeCaseOptions o;
  o.component = component;
  o.config = config_from_json_text(read_text(std::string(PARITRON_SOURCE_DIR) + "/fixtures/configs/" + profile + ".json")).config;
  o.seed = seed;
  o.seq_length = s;
  o.micro_batch_size = b;
  o.taps = false;
  o.rotary = profile != "gpt-small" && component != "mlp" && component != "moe_layer";
  return ref::make_case(o);
}

struct Results {
  std::map<std::string, Tensor> truth, emulated, actual;
  int64_t n = 1;
};

Results run(const Case& c, const std::string& layout, DType dtype) {
  const ParallelConfig pc = ParallelConfig::parse_layout(layout);
  opt::OptimizedOptions o;
  o.dtype = dtype;
  Results r;
  r.actual = opt::run_optimized(c, pc, o).tensors;
  const int64_t mb = opt::optimized_micro_batches(c, pc, o);
  ref::ReferenceOptions ro;
  r.truth = expected_for_layout(c, pc, mb, ro).tensors;
  ro.dtype = dtype;
  r.emulated = expected_for_layout(c, pc, mb, ro).tensors;
  r.n = reduction_length(c);
  return r;
}

std::string failures(const std::vector<TensorVerdict>& vs) {
  std::string s;
  for (const auto& v : vs) {
    if (!v.passed) s += v.summary() + "\n";
  }
  return s;
}

// Truncation toward zero to bfloat16 (the "bf16 rounding by truncation" fault).
double truncate_bf16(double x) {
  if (x == 0 || !std::isfinite(x)) return x;
  int e;
  std::frexp(x, &e);                     // |x| in [2^(e-1), 2^e)
  const double ulp = std::ldexp(1.0, e - 8);  // 8 significant bits
  return std::trunc(x / ulp) * ulp;
}

TEST(Tolerance, RealCasesPassInEachDtype) {
  const Case layer = profile_case("llama-small", "transformer_layer", 3, 8, 2);
  const Case moe = profile_case("mixtral-small", "moe_layer", 5, 8, 2);
  // F64 is left out: the optimized F64 path runs its CPU attention kernel in
  // fp32 (optimized/), so it is not a float64 emulation; see parity/README.md.
  for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
    for (const auto* c : {&layer, &moe}) {
      const Results r = run(*c, "tp2-sp", dtype);
      const auto vs = judge(r.truth, r.emulated, r.actual, dtype, r.n);
      EXPECT_GT(vs.size(), 4u);
      EXPECT_TRUE(all_passed(vs)) << c->component << " " << dtype_name(dtype) << "\n" << failures(vs);
    }
  }
}

// The same runs with a fault applied to the optimized result must fail.
TEST(Tolerance, InjectedFaultsFail) {
  const Case layer = profile_case("llama-small", "transformer_layer", 3, 8, 2);
  // One tensor scaled by 1.01 (a wrong constant, e.g. a scale off by 1%), in F32.
  {
    Results r = run(layer, "tp2-sp", DType::F32);
    Tensor& t = r.actual.at("outputs.output");
    for (int64_t i = 0; i < t.numel(); ++i) t.set(i, t.get(i) * 1.01);
    const auto vs = judge(r.truth, r.emulated, r.actual, DType::F32, r.n);
    EXPECT_FALSE(find(vs, "outputs.output").passed);
  }
  // bf16 rounding by truncation where the optimized side casts its
  // parameters and inputs: the case's weights and inputs truncated to bf16
  // (the optimized BF16 run's round-to-nearest is then a no-op on them),
  // judged against the truth and the emulation of the original case.
  {
    Case truncated = layer;
    for (auto& [name, t] : truncated.tensors) {
      if (!is_floating(t.dtype()) || name.rfind("outputs.", 0) == 0 || name.rfind("grads.", 0) == 0) continue;
      for (int64_t i = 0; i < t.numel(); ++i) t.set(i, truncate_bf16(t.get(i)));
    }
    const Results want = run(layer, "tp2-sp", DType::BF16);
    const ParallelConfig pc = ParallelConfig::parse_layout("tp2-sp");
    opt::OptimizedOptions o;
    o.dtype = DType::BF16;
    const auto got = opt::run_optimized(truncated, pc, o).tensors;
    const auto vs = judge(want.truth, want.emulated, got, DType::BF16, want.n);
    // Known limit (parity/README.md): this raises the max error only ~1.1-2x
    // over the emulation's, inside the 2x margin k = 2 keeps, so one case
    // does not catch it; the errors must still show it.
    const TensorVerdict& out = find(vs, "outputs.output");
    EXPECT_GT(out.error, out.reference_error);
    int failed = 0;
    for (const auto& v : vs) failed += !v.passed;
    std::cout << "bf16 truncation (weights, inputs): " << failed << " of " << vs.size() << " tensors fail\n";
  }
  // The same fault on the outputs alone (every result truncated once).
  {
    Results r = run(layer, "tp2-sp", DType::BF16);
    for (auto& [name, t] : r.actual) {
      if (!is_floating(t.dtype())) continue;
      for (int64_t i = 0; i < t.numel(); ++i) t.set(i, truncate_bf16(t.get(i)));
    }
    const auto vs = judge(r.truth, r.emulated, r.actual, DType::BF16, r.n);
    int failed = 0;
    for (const auto& v : vs) failed += !v.passed;
    std::cout << "bf16 truncation (outputs): " << failed << " of " << vs.size() << " tensors fail\n";
  }
  // BF16 resolves a wrong constant of a few percent: 1.1 fails, as does a
  // missing 1/sqrt(d) (a factor sqrt(kv_channels) = 2.8 here, far larger).
  {
    Results r = run(layer, "tp2-sp", DType::BF16);
    Tensor& t = r.actual.at("outputs.output");
    for (int64_t i = 0; i < t.numel(); ++i) t.set(i, t.get(i) * 1.1);
    const auto vs = judge(r.truth, r.emulated, r.actual, DType::BF16, r.n);
    EXPECT_FALSE(find(vs, "outputs.output").passed);
    EXPECT_TRUE(find(vs, "grads.inputs.hidden_states").passed);
  }
}

// ---------------------------------------------------------------- measurement
//
// PARITRON_TOLERANCE_MEASURE=<seconds> PARITRON_TOLERANCE_OUT=<file.csv>
// draws cases over the fixture profiles, components, layouts and dtypes
// until the time is up and writes one row per floating tensor:
// dtype,component,profile,layout,seed,s,b,n,tensor,error,reference_error,scale.
TEST(Tolerance, MeasureDistribution) {
  const char* budget = std::getenv("PARITRON_TOLERANCE_MEASURE");
  if (!budget) GTEST_SKIP() << "set PARITRON_TOLERANCE_MEASURE=<seconds> to measure";
  const char* out_path = std::getenv("PARITRON_TOLERANCE_OUT");
  std::ofstream out(out_path ? out_path : "tolerance_measure.csv");
  out << "dtype,component,profile,layout,seed,s,b,n,tensor,error,reference_error,scale\n";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(std::atoi(budget));
  const std::vector<std::string> profiles{"gpt-small", "llama-small", "mixtral-small"};
  const std::vector<std::string> components{"self_attention", "mlp", "transformer_layer", "transformer_block",
                                            "moe_layer"};
  const std::vector<std::string> layouts{"tp1", "tp2-sp", "dp2", "cp2", "pp2"};
  const std::vector<DType> dtypes{DType::F32, DType::BF16, DType::F16};
  std::mt19937_64 rng(20240601);
  int cases = 0, skipped = 0;
  for (uint64_t seed = 1; std::chrono::steady_clock::now() < deadline; ++seed) {
    const std::string profile = profiles[rng() % profiles.size()];
    const std::string component = components[rng() % components.size()];
    const std::string layout = layouts[rng() % layouts.size()];
    if (layout == "pp2" && component != "transformer_block") { ++skipped; continue; }
    if (component == "moe_layer" && profile != "mixtral-small") { ++skipped; continue; }
    const int64_t s = std::vector<int64_t>{4, 8, 16}[rng() % 3];
    const int64_t b = std::vector<int64_t>{2, 4}[rng() % 2];
    try {
      const Case c = profile_case(profile, component, seed, s, b);
      if (!opt::optimized_layout_issues(c, ParallelConfig::parse_layout(layout)).empty()) { ++skipped; continue; }
      for (DType dtype : dtypes) {
        const Results r = run(c, layout, dtype);
        for (const auto& v : judge(r.truth, r.emulated, r.actual, dtype, r.n)) {
          if (v.integral || v.skipped || !v.note.empty()) continue;
          out << fmt::format("{},{},{},{},{},{},{},{},{},{:.6e},{:.6e},{:.6e}\n", dtype_name(dtype), component, profile,
                             layout, seed, s, b, r.n, v.name, v.error, v.reference_error, v.scale);
        }
      }
      ++cases;
    } catch (const std::exception&) {
      ++skipped;
    }
  }
  std::cout << cases << " cases measured, " << skipped << " draws skipped\n";
}

}  // namespace

// The worst element as a multi-index of the tensor's shape (row-major).
TEST(Tolerance, WorstPositionIsAMultiIndex) {
  TensorVerdict v;
  v.shape = {2, 3, 4};
  v.worst_index = 1 * 12 + 2 * 4 + 3;
  EXPECT_EQ(v.worst_position(), "[1, 2, 3]");
  v.worst_index = -1;
  EXPECT_EQ(v.worst_position(), "");
  v.shape = {};
  v.worst_index = 0;
  EXPECT_EQ(v.worst_position(), "[]");
}

}  // namespace paritron::parity
