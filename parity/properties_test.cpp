// The parity properties of issue #6 as GoogleTest / RapidCheck tests with a
// small budget (CTest): every property draws its cases with gen_case_spec
// (parity/generators.h), so a failure shrinks through the Chooser toward a
// small config on a small layout and prints as describe(spec).
//
//   ParityWithinTolerance      optimized(layout, dtype) vs the float64 truth,
//                              forward and backward, the tolerance model
//                              (parity/sweep.h run_spec_case)
//   LayoutInvariance           the same case on two layouts: both within
//                              tolerance and within the sum of their bounds
//                              of each other
//   Determinism                the same case run twice (training, dropout on):
//                              the same bits
//   RecomputeEquivalence       recompute_granularity full (uniform / block) or
//                              selective vs none: the same bits
//   ExactMode                  dyadic data (parity/exact.h): mlp == truth bit
//                              for bit; norms, rotary, mlp on the layout ==
//                              the single-rank layout bit for bit
//
// Budget: each property runs a fixed number of cases (check_property's
// `tests`; RC_PARAMS="max_success=N" overrides it, PARITRON_PROPERTY_SCALE=N
// multiplies it for a longer local run). Reproduce a failure with
// RC_PARAMS="reproduce=..." as RapidCheck prints it. PARITRON_PROPERTY_FAULT
// names an injected fault (optimized/faults.h) in a faults build.
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <cstdlib>
#include <set>

#include <fmt/format.h>

#include "common/config_json.h"
#include "common/rng.h"
#include "optimized/faults.h"
#include "optimized/model/layer.h"
#include "optimized/run_case.h"
#include "parity/exact.h"
#include "parity/expected.h"
#include "parity/generators.h"
#include "parity/sweep.h"
#include "reference/make_case.h"

namespace paritron {
// RapidCheck prints a drawn layout with this (found by ADL).
void showValue(const ParallelConfig& pc, std::ostream& os) { os << pc.layout_name(); }
}  // namespace paritron

namespace paritron::parity {
namespace {

// Runs `testable` as a RapidCheck property of the current gtest test with at
// most `tests` successful cases.
template <class Testable>
void check_property(int tests, Testable&& testable) {
  using namespace rc::detail;
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  TestMetadata metadata;
  metadata.id = std::string(info->test_suite_name()) + "/" + info->name();
  metadata.description = info->name();
  TestParams params = configuration().testParams;
  int scale = 1;
  if (const char* s = std::getenv("PARITRON_PROPERTY_SCALE")) scale = std::max(1, std::atoi(s));
  const std::string rc_params = std::getenv("RC_PARAMS") ? std::getenv("RC_PARAMS") : "";
  if (rc_params.find("max_success") == std::string::npos) params.maxSuccess = tests * scale;
  // CTest runs are reproducible: a fixed seed per property unless RC_PARAMS
  // names one (RC_PARAMS="seed=N" explores others).
  if (rc_params.find("seed") == std::string::npos) params.seed = fnv1a64(metadata.id);
  // PARITRON_PROPERTY_FAULT=NAME (a -DPARITRON_FAULTS=ON build): run the
  // property with that fault injected, to see that it catches it.
  const char* fault = std::getenv("PARITRON_PROPERTY_FAULT");
  if (fault != nullptr) opt::faults::activate(fault);
  const TestResult result = checkProperty(toProperty(std::forward<Testable>(testable)), metadata, params);
  if (fault != nullptr) opt::faults::deactivate();
  std::ostringstream ss;
  printResultMessage(result, ss);
  if (!result.template is<SuccessResult>()) {
    FAIL() << ss.str();
  } else {
    std::cout << ss.str() << "\n";
  }
}

std::string joined(const std::vector<std::string>& v, size_t most = 12) {
  std::string out;
  for (size_t i = 0; i < v.size() && i < most; ++i) out += "\n  " + v[i];
  if (v.size() > most) out += fmt::format("\n  ... {} more", v.size() - most);
  return out;
}

std::string failing(const CaseResult& r) {
  if (!r.error.empty()) return "error: " + r.error;
  std::vector<std::string> lines;
  for (const TensorVerdict& v : r.verdicts) {
    if (!v.passed) lines.push_back(v.summary());
  }
  return joined(lines);
}

// gen_case_spec at RapidCheck's full size: every decision uniform over its
// whole range from the first case (a small max_success would otherwise draw
// only the small end: inRange scales with the size). Shrinking still moves
// each decision toward its simplest value.
rc::Gen<CaseSpec> full_size(const SpecFilter& f) { return rc::gen::resize(100, gen_case_spec(f)); }
CaseSpec drawn_spec(const SpecFilter& f) { return *full_size(f); }  // inside a property only

// Small cases: world <= 4 ranks (in-process threads), default shapes.
SpecFilter small_filter() {
  SpecFilter f;
  f.max_world_size = 4;
  return f;
}

SpecFilter component_filter(const std::string& component, std::optional<DType> dtype = std::nullopt) {
  SpecFilter f;
  f.component = component;
  f.dtype = dtype;
  return f;
}

// Every layout up to `max_world` ranks the case runs on and the parity
// expectation accepts (the whole-case reference holds: no token-coupled router).
std::vector<ParallelConfig> runnable_layouts(const CaseSpec& spec, const Case& c, int64_t max_world) {
  std::vector<ParallelConfig> out;
  const bool moe = spec.config.num_moe_experts.has_value();
  for (int64_t tp : {1, 2, 4})
    for (int64_t cp : {1, 2})
      for (int64_t dp : {1, 2, 4})
        for (int64_t pp : {1, 2, 4})
          for (int64_t ep : {1, 2})
            for (bool sp : {false, true}) {
              if (tp * cp * dp * pp > max_world) continue;
              if (sp && tp == 1) continue;
              if (pp > 1 && spec.component != "transformer_block") continue;
              if (ep > 1 && (!moe || dp % ep != 0 || cp > 1)) continue;
              ParallelConfig pc;
              pc.tensor_model_parallel_size = tp;
              pc.context_parallel_size = cp;
              pc.data_parallel_size = dp;
              pc.pipeline_model_parallel_size = pp;
              pc.expert_model_parallel_size = ep;
              pc.sequence_parallel = sp;
              if (!pc.check().empty() || !check_fits(pc, spec.config).empty() ||
                  !check_sequence_length(pc, spec.seq).empty() || spec.batch % dp != 0) {
                continue;
              }
              if (!opt::optimized_layout_issues(c, pc).empty()) continue;
              out.push_back(pc);
            }
  return out;
}

// max |a - b| of two tensors of the same shape (inf when the shapes differ).
double max_abs_diff(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return INFINITY;
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a.get(i) - b.get(i)));
  return m;
}

// ---------------------------------------------------------------------------
// Optimized vs the float64 truth within the tolerance model.
// ---------------------------------------------------------------------------
TEST(Properties, ParityWithinTolerance) {
  check_property(100, [] {
    const CaseSpec spec = drawn_spec(small_filter());
    RC_TAG(spec.component);
    const CaseResult r = run_spec_case(spec);
    if (!r.near_tie.empty()) RC_DISCARD("near tie: " + r.near_tie);
    if (!r.passed) RC_FAIL(describe(spec) + "\n" + failing(r));
  });
}

// ---------------------------------------------------------------------------
// Layout invariance: the same case (not token-coupled: the whole-case
// reference holds on every layout) on the drawn layout and on a second
// layout drawn from those it runs on. Both pass the tolerance model and
// differ from each other by at most the sum of their bounds.
// ---------------------------------------------------------------------------
TEST(Properties, LayoutInvariance) {
  check_property(40, [] {
    const CaseSpec a = drawn_spec(small_filter());
    const Case c = ref::make_case(make_options(a));
    if (token_coupled(c)) RC_DISCARD("token-coupled router: the expectation depends on the layout");
    const std::vector<ParallelConfig> layouts = runnable_layouts(a, c, 4);
    RC_PRE(!layouts.empty());
    CaseSpec b = a;
    b.layout = *rc::gen::resize(100, rc::gen::elementOf(layouts));
    RC_TAG(a.component);
    const CaseResult ra = run_spec_case(a), rb = run_spec_case(b);
    if (!ra.near_tie.empty() || !rb.near_tie.empty()) RC_DISCARD("near tie");
    if (!ra.passed) RC_FAIL(describe(a) + "\n" + failing(ra));
    if (!rb.passed) RC_FAIL(describe(b) + "\n" + failing(rb));
    const opt::OptimizedOptions o = optimized_options(a);
    const auto ta = opt::run_optimized(c, a.layout, o).tensors;
    const auto tb = opt::run_optimized(c, b.layout, o).tensors;
    std::map<std::string, double> bound;
    for (const auto* r : {&ra, &rb}) {
      for (const TensorVerdict& v : r->verdicts) bound[v.name] += v.skipped || v.integral ? 0.0 : v.bound;
    }
    std::vector<std::string> bad;
    for (const auto& [name, x] : ta) {
      auto it = tb.find(name);
      if (it == tb.end()) {
        bad.push_back(name + ": missing on " + b.layout.layout_name());
        continue;
      }
      if (ra.verdicts.end() != std::find_if(ra.verdicts.begin(), ra.verdicts.end(),
                                            [&](const TensorVerdict& v) { return v.name == name && v.skipped; })) {
        continue;  // judged elsewhere (routing decisions)
      }
      const double d = max_abs_diff(x, it->second);
      if (!(d <= bound[name])) bad.push_back(fmt::format("{}: |a - b| = {:.3g} > {:.3g}", name, d, bound[name]));
    }
    if (!bad.empty()) RC_FAIL(describe(a) + " vs " + b.layout.layout_name() + joined(bad));
  });
}

// ---------------------------------------------------------------------------
// Determinism: training with dropout on, the same case twice, the same bits.
// ---------------------------------------------------------------------------
TEST(Properties, Determinism) {
  check_property(100, [] {
    SpecFilter f = small_filter();
    f.training = true;
    CaseSpec spec = drawn_spec(f);
    spec.config.hidden_dropout = 0.1;
    spec.config.attention_dropout = 0.1;
    RC_TAG(spec.component);
    const Case c = ref::make_case(make_options(spec));
    const opt::OptimizedOptions o = optimized_options(spec);
    const auto first = opt::run_optimized(c, spec.layout, o).tensors;
    const auto second = opt::run_optimized(c, spec.layout, o).tensors;
    const std::vector<std::string> diff = bitwise_differences(first, second);
    if (!diff.empty()) RC_FAIL(describe(spec) + joined(diff));
  });
}

// ---------------------------------------------------------------------------
// Recompute equivalence: activation recompute changes no bit of any output or
// gradient (training, dropout on: the re-run draws the same masks).
// ---------------------------------------------------------------------------
TEST(Properties, RecomputeEquivalence) {
  check_property(200, [] {
    SpecFilter f = small_filter();
    f.component = *rc::gen::resize(100, rc::gen::element<std::string>("transformer_block", "transformer_layer"));
    f.training = true;
    CaseSpec spec = drawn_spec(f);
    spec.config.hidden_dropout = 0.1;
    spec.config.attention_dropout = 0.1;
    const Case off = ref::make_case(make_options(spec));
    // "full" recomputes whole layers of a block; a layer case takes "selective" (core attention).
    Case on = off;
    TransformerConfig& cfg = on.config;
    const int64_t chunk_layers = cfg.num_layers / (spec.layout.pipeline_model_parallel_size *
                                                   spec.layout.virtual_pipeline_model_parallel_size.value_or(1));
    const int mode = spec.component == "transformer_block" ? *rc::gen::resize(100, rc::gen::inRange(0, 3)) : 0;
    if (mode == 0) {
      cfg.recompute_granularity = "selective";
    } else {
      cfg.recompute_granularity = "full";
      cfg.recompute_method = mode == 1 ? "uniform" : "block";
      // Up to one more than the chunk holds (Megatron checks only that it is set).
      cfg.recompute_num_layers = *rc::gen::resize(100, rc::gen::inRange<int64_t>(1, chunk_layers + 2));
    }
    validate_config(cfg);
    on.config_json = config_to_json_text(cfg);
    RC_TAG(spec.component, mode == 0 ? "selective" : mode == 1 ? "uniform" : "block");
    const opt::OptimizedOptions o = optimized_options(spec);
    const auto base = opt::run_optimized(off, spec.layout, o).tensors;
    const auto re = opt::run_optimized(on, spec.layout, o).tensors;
    const std::vector<std::string> diff = bitwise_differences(base, re);
    if (!diff.empty()) {
      RC_FAIL(fmt::format("{} recompute {} {} {}{}", describe(spec), *cfg.recompute_granularity,
                          cfg.recompute_method.value_or(""), cfg.recompute_num_layers.value_or(0), joined(diff)));
    }
  });
}

// The recompute fields reach the optimized side: a checkpointed unit drops its
// layers' activations and re-runs them (units as Megatron groups them).
TEST(Properties, RecomputeUnits) {
  TransformerConfig cfg;
  auto units = [&](size_t n) {
    std::string s;
    for (const opt::RecomputeUnit& u : opt::recompute_units(cfg, n)) {
      s += fmt::format("[{},{}){}", u.begin, u.end, u.checkpointed ? "*" : "");
    }
    return s;
  };
  EXPECT_EQ(units(3), "[0,1)[1,2)[2,3)");
  cfg.recompute_granularity = "full";
  cfg.recompute_method = "uniform";
  cfg.recompute_num_layers = 2;
  EXPECT_EQ(units(5), "[0,2)*[2,4)*[4,5)*");
  cfg.recompute_method = "block";
  EXPECT_EQ(units(3), "[0,1)*[1,2)*[2,3)");
  cfg.recompute_granularity = "selective";
  cfg.recompute_method.reset();
  cfg.recompute_num_layers.reset();
  EXPECT_EQ(units(2), "[0,1)[1,2)");
}

// ---------------------------------------------------------------------------
// Exact mode (parity/exact.h).
// ---------------------------------------------------------------------------
TEST(Properties, ExactMode) {
  check_property(400, [] {
    SpecFilter f = small_filter();
    f.component = *rc::gen::resize(100, rc::gen::elementOf(exact_components()));
    f.dtype = DType::F32;
    // Half the cases on a tensor-parallel layout (the free draw rarely gives
    // one: tp must divide the drawn query groups); the config is fitted to it.
    static const std::vector<std::string> kTensorParallel = {"tp2", "tp2-sp", "tp4", "tp4-sp", "tp2-dp2-sp", "tp2-cp2-sp"};
    if (*rc::gen::resize(100, rc::gen::arbitrary<bool>())) {
      f.layout = ParallelConfig::parse_layout(*rc::gen::resize(100, rc::gen::elementOf(kTensorParallel)));
    }
    const CaseSpec spec = to_exact_spec(drawn_spec(f));
    const ExactCheck check = exact_check(spec);
    RC_ASSERT(check != ExactCheck::kNone);
    RC_TAG(spec.component, spec.layout.layout_name());
    const Case c = ref::make_case(exact_make_options(spec));
    opt::OptimizedOptions o = optimized_options(spec);
    o.micro_batches = 1;  // the single-rank baseline sums over all its tokens at once as well
    const auto got = opt::run_optimized(c, spec.layout, o).tensors;
    std::vector<std::string> bad;
    if (check == ExactCheck::kReference) {
      const ref::ReferenceResult truth = expected_for_layout(c, spec.layout, 1);
      for (const std::string& line :
           bitwise_differences(truth.tensors, got, [](const std::string& name) {
             return name.rfind("outputs.intermediate.", 0) != 0;
           })) {
        bad.push_back("vs truth: " + line);
      }
    }
    const auto single = opt::run_optimized(c, ParallelConfig{}, o).tensors;
    for (const std::string& line :
         bitwise_differences(single, got, [&](const std::string& name) { return exact_layout_tensor(spec, name); })) {
      bad.push_back("vs single rank: " + line);
    }
    // Tiny MLPs are exact in bf16 / fp16 too (integer draws; activations
    // stored in the dtype, fp32 compute): the truth bit for bit as well.
    for (DType dtype : {DType::BF16, DType::F16}) {
      const std::optional<CaseSpec> low = low_precision_exact_spec(spec, dtype);
      if (!low) continue;
      RC_TAG(spec_dtype_name(dtype));
      const Case lc = ref::make_case(exact_make_options(*low));
      opt::OptimizedOptions lo = optimized_options(*low);
      lo.micro_batches = 1;
      const auto low_got = opt::run_optimized(lc, low->layout, lo).tensors;
      const ref::ReferenceResult low_truth = expected_for_layout(lc, low->layout, 1);
      for (const std::string& line : bitwise_differences(low_truth.tensors, low_got, [](const std::string& name) {
             return name.rfind("outputs.intermediate.", 0) != 0;
           })) {
        bad.push_back(spec_dtype_name(dtype) + " vs truth: " + line);
      }
    }
    if (std::getenv("PARITRON_PROPERTY_VERBOSE")) {
      std::cerr << describe(spec) << " | " << got.size() << " tensors, " << single.size() << " single\n";
    }
    if (!bad.empty()) RC_FAIL(describe(spec) + joined(bad));
  });
}

TEST(Exact, DyadicDrawIsOnTheGrid) {
  CaseSpec spec = draw_case_spec(7, component_filter("mlp", DType::F32));
  spec = to_exact_spec(spec);
  ref::MakeCaseOptions o = exact_make_options(spec);
  const Case c = ref::make_case(o);
  const double step = std::ldexp(1.0, -static_cast<int>(o.dyadic_shift));
  int64_t checked = 0;
  for (const auto& [name, t] : c.tensors) {
    if (name.rfind("weights.", 0) != 0 && name.rfind("inputs.", 0) != 0) continue;
    for (int64_t i = 0; i < t.numel(); ++i, ++checked) {
      const double k = t.get(i) / step;
      ASSERT_EQ(k, std::round(k)) << name << "[" << i << "] = " << t.get(i);
      ASSERT_LE(std::abs(k), static_cast<double>(o.dyadic_range)) << name;
    }
  }
  EXPECT_GT(checked, 0);
  o.dyadic_range = 0;
  EXPECT_ANY_THROW(ref::make_case(o));
}

TEST(Exact, MlpBoundShrinksTheDraw) {
  CaseSpec spec = draw_case_spec(1, component_filter("mlp", DType::F32));
  spec.config.hidden_size = 64;
  spec.config.ffn_hidden_size = 256;
  spec.config.add_bias_linear = true;
  spec.config.gated_linear_unit = true;
  spec.config.activation_func = "squared_relu";
  spec.seq = 8;
  spec.batch = 8;
  DyadicDraw d;
  d.range = 1;
  EXPECT_GE(mlp_exact_magnitude(spec.config, 64, d), kFp32ExactLimit);  // relu^2 * up: Z^3 * ffn
  const CaseSpec exact = to_exact_spec(spec);
  EXPECT_FALSE(exact.config.gated_linear_unit);
  EXPECT_EQ(exact.config.activation_func, "squared_relu");
  EXPECT_EQ(exact_check(exact), ExactCheck::kReference);
  EXPECT_LT(mlp_exact_magnitude(exact.config, 64, exact_draw(exact)), kFp32ExactLimit);
  EXPECT_FALSE(low_precision_exact_spec(exact, DType::BF16));  // 8 bits: far too wide
  CaseSpec tiny = exact;
  tiny.config.hidden_size = 4;
  tiny.config.ffn_hidden_size = 4;
  tiny.config.activation_func = "relu";
  tiny.seq = 2;
  tiny.batch = 2;
  const std::optional<CaseSpec> bf16 = low_precision_exact_spec(tiny, DType::BF16);
  ASSERT_TRUE(bf16);
  EXPECT_TRUE(bf16->config.bf16);
  EXPECT_EQ(exact_check(*bf16), ExactCheck::kReference);
  EXPECT_EQ(exact_draw(*bf16).shift, 0);
  spec.config.activation_func = "gelu";
  EXPECT_EQ(exact_check(spec), ExactCheck::kNone);
  EXPECT_THROW(to_exact_spec(draw_case_spec(1, component_filter("self_attention"))), Error);
}

}  // namespace
}  // namespace paritron::parity
