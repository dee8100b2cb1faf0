// fp8 linears on the optimized side (optimized/model/linear.h) against the
// reference's fp8 emulation (reference/linear.h fp8_fake_quant, spec §12),
// under tensor, sequence, data and context parallel layouts.
//
// What must hold: a sharded run quantises every GEMM operand exactly as the
// unsharded reference does, i.e. with the scale of the WHOLE tensor's amax
// (TE max-reduces amaxes over the TP x DP x CP group). A wrong amax scope
// changes the scale of most casts, which moves nearly every quantised value
// (by up to half an fp8 ulp: 1/16 relative for E4M3, 1/8 for E5M2).
// Measured by breaking linear.cpp's reduce_amax (fp32 runs, worst tensor,
// relative to its max): no reduction 0.06-0.38 on every sharded layout; the
// TP group only 0.06-0.31 on dp2, tp2-dp2, cp2-tp2-sp; the DP x CP group only
// 0.07-0.36 on tp2, tp2-sp, tp2-dp2, cp2-tp2-sp. Correct scope: <= 5.3e-7.
//
// Which dtype: the reference emulates fp8 only in an emulated dtype (its
// float64 run is the truth, fp8 off: reference/run_case.cpp), so the
// comparisons are fp32 against fp32 and bf16 against bf16, and a float64
// optimized run is the truth as well.
//
// Tolerances:
//   * fp32 (the exactness check): both sides cast the same values, except
//     that tensors computed from GEMMs differ by accumulation order (~1e-7
//     relative). A cast of such a value flips to the neighbouring fp8 value
//     only when it lies within ~1e-7 relative of a rounding midpoint (E4M3 has
//     8 values per octave: probability ~2 * 1e-7 * 16 = 3e-6 per element),
//     and the amax (hence the scale) moves by ~1e-7 too, which moves the
//     dequantised values by as much. Measured worst over the 51 fp32 runs below:
//     5.3e-7, no flip. The bound 1e-4 (layouts_test's fp32 bound) tolerates
//     what these effects can do short of a flip and sits 600x below the
//     smallest wrong-scope mismatch (0.06). A flip (one element of a dot
//     product moved by 1/16 of itself, up to ~1e-2 of the output here) would
//     fail it: should one appear after a kernel change, look at the element
//     before widening anything.
//   * bf16: every GEMM output is rounded to bf16, so an accumulation-order
//     difference flips a bf16 rounding (2^-8 relative) of a tensor that is
//     then cast: the amax of that tensor can move by a bf16 ulp, which shifts
//     the fp8 grid of the whole tensor by 2^-8 and flips ~2^-8 / 2^-4 = 6%
//     of its fp8 values. The optimized and reference bf16 runs therefore
//     differ at the level of the fp8 error itself (measured 0.015-0.175
//     relative, against 0.004-0.02 for the same cases without fp8), and are
//     held to the project's low-precision rule (layouts_test.cpp): error
//     against the float64 truth <= 4 x the reference's own error + 2^-8 of
//     the tensor's scale. Measured worst ratio: 1.64. The amax scope is
//     pinned by the fp32 runs.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>

#include "common/fp8_scaling.h"
#include "common/math/fp8.h"
#include "common/transformer_config.h"
#include "optimized/comm/run_ranks.h"
#include "optimized/cpu/cpu_backend.h"
#include "optimized/model/linear.h"
#include "optimized/run_case.h"
#include "reference/make_case.h"
#include "reference/run_case.h"

namespace paritron::opt {
namespace {

// Small GPT and Llama layers (as layouts_test.cpp) under each fp8 recipe.
const char* kGptE4m3 = R"({"num_layers": 4, "hidden_size": 16, "num_attention_heads": 4, "ffn_hidden_size": 24,
  "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3, "fp8": "e4m3"})";
// hybrid (E5M2 gradients), margin 1, GQA, SwiGLU, no linear biases but a QKV bias.
const char* kLlamaHybrid = R"({"num_layers": 4, "hidden_size": 16, "num_attention_heads": 4, "num_query_groups": 2,
  "kv_channels": 6, "ffn_hidden_size": 10, "normalization": "RMSNorm", "activation_func": "silu",
  "gated_linear_unit": true, "add_bias_linear": false, "add_qkv_bias": true, "rotary_interleaved": true,
  "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3,
  "fp8": "hybrid", "fp8_margin": 1})";
// hybrid with the wgrad GEMM in high precision (override_linear_precision[2]).
const char* kGptHybridNoWgrad = R"({"num_layers": 4, "hidden_size": 16, "num_attention_heads": 4,
  "ffn_hidden_size": 24, "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3,
  "fp8": "hybrid", "fp8_wgrad": false})";

struct Fp8Setup {
  std::string component;
  const char* config;
  std::string layout;
  bool rotary = false;
};

Case make(const Fp8Setup& u, bool fp8 = true) {
  ref::MakeCaseOptions o;
  o.component = u.component;
  o.config = config_from_json_text(u.config).config;
  if (!fp8) o.config.fp8.reset();
  o.seq_length = 8;
  o.micro_batch_size = 2;
  o.rotary = u.rotary;
  o.seed = 7;
  o.taps = false;
  return ref::make_case(o);
}

// The worst over every output and gradient of max |got - want| / max |want|.
struct Mismatch {
  double rel = 0;
  std::string where;
};
Mismatch mismatch(const std::map<std::string, Tensor>& got, const std::map<std::string, Tensor>& want) {
  Mismatch m;
  int compared = 0;
  for (const auto& [name, w] : want) {
    if (name.rfind("outputs.intermediate.", 0) == 0) continue;
    auto it = got.find(name);
    EXPECT_NE(it, got.end()) << "the optimized run lacks " << name;
    if (it == got.end()) continue;
    EXPECT_EQ(it->second.shape(), w.shape()) << name;
    double scale = 1e-30, worst = 0;
    for (int64_t i = 0; i < w.numel(); ++i) scale = std::max(scale, std::abs(w.get(i)));
    for (int64_t i = 0; i < w.numel(); ++i) worst = std::max(worst, std::abs(it->second.get(i) - w.get(i)));
    if (worst / scale > m.rel) m = {worst / scale, name};
    ++compared;
  }
  EXPECT_GT(compared, 2);
  return m;
}

const std::vector<std::string> kLayouts = {"tp1", "tp2", "tp2-sp", "dp2", "tp2-dp2", "cp2-tp2-sp"};

struct Fp8Run {
  Fp8Setup setup;
  DType dtype;
  Mismatch m;
};

// Every component x layout x config in `dtype` against the reference in the
// same dtype (its fp8 emulation: emulated_precision takes fp8 from the config).
std::vector<Fp8Run> run_all(DType dtype) {
  std::vector<Fp8Run> runs;
  for (const char* cfg : {kGptE4m3, kLlamaHybrid, kGptHybridNoWgrad}) {
    for (const std::string component : {"mlp", "self_attention", "transformer_layer"}) {
      const bool rotary = cfg == kLlamaHybrid && component != "mlp";
      const Case c = make({component, cfg, "", rotary});
      ref::ReferenceOptions ro;
      ro.dtype = dtype;
      const ref::ReferenceResult want = ref::run_reference(c, ro);
      for (const std::string& layout : kLayouts) {
        if (component == "mlp" && layout.find("cp") != std::string::npos) continue;
        OptimizedOptions o;
        o.dtype = dtype;
        const OptimizedResult got = run_optimized(c, ParallelConfig::parse_layout(layout), o);
        runs.push_back({{component, cfg, layout, rotary}, dtype, mismatch(got.tensors, want.tensors)});
      }
    }
  }
  return runs;
}

std::string describe(const Fp8Run& r) {
  const char* name = r.setup.config == kGptE4m3       ? "gpt/e4m3"
                     : r.setup.config == kLlamaHybrid ? "llama/hybrid+margin1"
                                                      : "gpt/hybrid,!fp8_wgrad";
  return fmt::format("{} {} on {} in {}: {:.3g} at {}", r.setup.component, name, r.setup.layout,
                     dtype_name(r.dtype), r.m.rel, r.m.where);
}

// fp32: the exactness check (see the top of the file).
TEST(Fp8Linears, Float32MatchesTheReferenceOnEveryLayout) {
  for (const Fp8Run& r : run_all(DType::F32)) {
    EXPECT_LE(r.m.rel, 1e-4) << describe(r);
    if (r.m.rel > 1e-6) std::printf("  %s\n", describe(r).c_str());
  }
}

// bf16: within the reference's own error (see the top of the file).
TEST(Fp8Linears, Bf16WithinTheReferencesOwnError) {
  for (const char* cfg : {kGptE4m3, kLlamaHybrid, kGptHybridNoWgrad}) {
    for (const std::string component : {"mlp", "self_attention", "transformer_layer"}) {
      const bool rotary = cfg == kLlamaHybrid && component != "mlp";
      const Case c = make({component, cfg, "", rotary});
      ref::ReferenceOptions ro;
      ro.dtype = DType::BF16;
      const ref::ReferenceResult emulated = ref::run_reference(c, ro);
      const ref::ReferenceResult truth = ref::run_reference(c);
      for (const std::string layout : {"tp1", "tp2-sp", "tp2-dp2"}) {
        OptimizedOptions o;
        o.dtype = DType::BF16;
        const OptimizedResult got = run_optimized(c, ParallelConfig::parse_layout(layout), o);
        for (const auto& [name, t] : truth.tensors) {
          if (name.rfind("outputs.intermediate.", 0) == 0) continue;
          const Tensor& e = emulated.tensors.at(name);
          const Tensor& g = got.tensors.at(name);
          double scale = 0, err_opt = 0, err_emu = 0;
          for (int64_t i = 0; i < t.numel(); ++i) {
            scale = std::max(scale, std::abs(t.get(i)));
            err_opt = std::max(err_opt, std::abs(g.get(i) - t.get(i)));
            err_emu = std::max(err_emu, std::abs(e.get(i) - t.get(i)));
          }
          EXPECT_LE(err_opt, 4 * err_emu + 0x1p-8 * scale)
              << component << " on " << layout << ": " << name << " (reference's own error " << err_emu << ")";
        }
      }
    }
  }
}

// float64 runs are the truth on both sides: fp8 is not applied (as
// run_reference does for F64), so a float64 run of an fp8 case matches the
// truth as in layouts_test.cpp.
TEST(Fp8Linears, Float64RunsAreTheTruth) {
  for (const Fp8Run& r : run_all(DType::F64)) {
    EXPECT_LE(r.m.rel, r.setup.component == "mlp" ? 1e-10 : 3e-6) << describe(r);
  }
}

// A pipeline: each stage reduces amaxes over its own TP x DP x CP ranks (the
// stages hold different layers, so a world-wide reduction would not even pair
// up). With one micro-batch per data-parallel rank every cast sees the whole
// batch as in the reference. (With several micro-batches, the default for
// pp > 1, each one's casts use the amax of its own tokens, see linear.h: the
// same runs with 2 micro-batches differ from the reference by 0.2-0.26.)
TEST(Fp8Linears, PipelineStagesWithOneMicroBatch) {
  ref::MakeCaseOptions mo;
  mo.component = "transformer_block";
  mo.config = config_from_json_text(kGptE4m3).config;
  mo.seq_length = 8;
  mo.micro_batch_size = 4;
  mo.seed = 7;
  mo.taps = false;
  const Case c = ref::make_case(mo);
  ref::ReferenceOptions ro;
  ro.dtype = DType::F32;
  const ref::ReferenceResult want = ref::run_reference(c, ro);
  for (const std::string layout : {"pp2", "tp2-pp2-dp2"}) {
    OptimizedOptions o;
    o.dtype = DType::F32;
    o.micro_batches = 1;
    const Mismatch m = mismatch(run_optimized(c, ParallelConfig::parse_layout(layout), o).tensors, want.tensors);
    EXPECT_LE(m.rel, 1e-4) << layout << ": " << m.where;  // measured 7.8e-7
  }
}

// The fp8 path runs at all: the same case without fp8 differs by far more
// than the tolerances above.
TEST(Fp8Linears, Fp8ChangesTheResult) {
  for (const char* cfg : {kGptE4m3, kLlamaHybrid, kGptHybridNoWgrad}) {
    const Fp8Setup u{"transformer_layer", cfg, "tp2-dp2", cfg == kLlamaHybrid};
    OptimizedOptions o;
    o.dtype = DType::F32;
    const OptimizedResult with = run_optimized(make(u), ParallelConfig::parse_layout(u.layout), o);
    const OptimizedResult without = run_optimized(make(u, false), ParallelConfig::parse_layout(u.layout), o);
    EXPECT_GT(mismatch(with.tensors, without.tensors).rel, 1e-3);
  }
}

// ---------------------------------------------------------------------------
// The amax scope directly: every rank holds a different slice of one global
// tensor (with its largest element on one rank only); fp8_cast on each rank
// must give the slice of the whole tensor quantised with the whole tensor's
// scale. The group is TP x DP x CP within a pipeline stage: with pp2 each
// stage quantises its own tensor (the stages hold different layers).

TEST(Fp8Linears, AmaxIsReducedOverTensorDataAndContextParallelRanks) {
  for (const std::string layout : {"tp2-dp2", "cp2-tp2", "tp2-pp2"}) {
    const ParallelConfig pc = ParallelConfig::parse_layout(layout);
    const int64_t world = pc.world_size(), pp = pc.pipeline_model_parallel_size, per_stage = world / pp;
    const int64_t rows = 3, cols = 5;
    // Slice r of the global tensor; its biggest element (amax 40 + stage) on the stage's last rank.
    auto value = [&](int64_t rank, int64_t i) {
      const int64_t stage = rank / per_stage;
      if (rank % per_stage == per_stage - 1 && i == 7) return -(40.0 + static_cast<double>(stage));
      return std::sin(0.37 * static_cast<double>(rank * rows * cols + i) + 1.0);
    };
    TransformerConfig cfg = config_from_json_text(kLlamaHybrid).config;
    for (const Fp8Role role : {Fp8Role::kInput, Fp8Role::kGradOutput}) {
      run_on_threads(world, [&](Comm& comm) {
        cpu::CpuBackend be;
        ModelContext m(be, comm, make_parallel_state(pc, comm.rank()), cfg, DType::F64);
        Tensor mine(DType::F64, {rows, cols});
        for (int64_t i = 0; i < rows * cols; ++i) mine.set(i, value(comm.rank(), i));
        const DTensor x = be.upload(mine, DType::F64);
        const DTensor q = fp8_cast(m, {{&x, role}})[0];
        // The whole tensor of this rank's stage: its amax gives the scale.
        const int64_t stage = comm.rank() / per_stage;
        float whole_amax = 0;
        for (int64_t r = stage * per_stage; r < (stage + 1) * per_stage; ++r) {
          for (int64_t i = 0; i < rows * cols; ++i) {
            whole_amax = math::fp8_amax_step(whole_amax, static_cast<float>(value(r, i)));
          }
        }
        EXPECT_EQ(whole_amax, 40.0f + static_cast<float>(stage));
        const Fp8Format format = parse_fp8_format(*cfg.fp8);
        const math::FloatFormat& f = fp8_float_format(format, role);
        const float scale = scale_for_amax(whole_amax, f, static_cast<int>(cfg.fp8_margin));
        const Tensor got = be.download(q);
        for (int64_t i = 0; i < rows * cols; ++i) {
          const double want = math::fp8_dequantise_exact(
              math::fp8_quantise(static_cast<float>(value(comm.rank(), i)), scale, f), 1.0f / scale, f);
          EXPECT_EQ(got.get(i), want) << layout << " rank " << comm.rank() << " element " << i;
        }
      });
    }
  }
}

}  // namespace
}  // namespace paritron::opt
