// Constructive generators of parity cases (issue #6, "Generators"): a
// TransformerConfig, a ParallelConfig layout that fits it, a dtype, shapes,
// mask, training flag and seed — valid by construction, never filtered.
//
// One drawing routine, build_case_spec(), takes every decision through a tiny
// Chooser interface ("an integer in [lo, hi], lo being the simplest"), with
// two implementations:
//   * draw_case_spec(seed, filter): Philox (common/rng.h), RapidCheck-free, so
//     the CLI reproduces case i of a sweep exactly from (seed, i);
//   * gen_case_spec(filter): a rc::Gen whose every decision is a
//     rc::gen::inRange pick inside rc::gen::exec, so RapidCheck's shrinking
//     moves each decision toward lo: every choice list is ordered
//     simplest-first (tp1 before tp2, LayerNorm before RMSNorm, no MoE
//     options before MoE options, ...) and every size is drawn as a multiple
//     of what the layout needs, so a failure shrinks to a small config on a
//     small layout. The Gen is header-only (below, when <rapidcheck.h> is
//     available) so paritron_parity itself does not link RapidCheck.
//
// Decision order (later decisions depend on earlier ones, never the reverse):
//   component -> dtype -> MoE yes/no (layer/block) -> layout -> heads/groups/
//   kv_channels/hidden/ffn -> norm, activation, biases, scaling -> MoE router
//   -> mask, window, rotary -> shapes -> training, seed.
//
// Constraints encoded (by construction):
//   * tp | num_query_groups | num_attention_heads (groups = tp * a, heads =
//     groups * b); tp | ffn_hidden_size (ffn = tp * c, or the 4h default) and
//     tp | moe_ffn_hidden_size; cross_attention: groups == heads.
//   * kv_channels: int(hn * rotary_percent) is even and > 0 (hn a multiple of
//     2 / rotary_percent); either hidden = heads * hn with kv_channels left to
//     its derived default, or kv_channels explicit and hidden independent.
//   * sp only with tp > 1, forced when ep > 1 and tp > 1; pp only for
//     transformer_block, num_layers a multiple of pp * vp, vp only when pp > 2;
//     ep only with MoE, ep | dp and ep | num_moe_experts, ep > 1 only with
//     cp == 1; cp never for cross_attention; world size <= max_world_size.
//   * s a multiple of 2cp (cp > 1) and of cp * tp (sp); sq == sk (kv length
//     left to s); b a multiple of dp.
//   * MoE: topk <= E; sinkhorn without aux loss and without capacity;
//     pad-to-capacity only with a capacity factor; grouped GEMM only without
//     biases; a transformer_layer/block on a layout that splits sequences (cp >
//     1 or sp) gets a router that does not couple tokens (dropless, no aux /
//     z loss, no jitter, no sinkhorn: parity/expected.h refuses the others).
//   * bias_activation_fusion only for gelu with biases or silu with GLU.
//   * fp8 (dtype F8_E4M3): config.fp8 "e4m3" | "hybrid", activations bf16,
//     only drawn for components with (non-expert) linears; pp with fp8 runs
//     one micro-batch (optimized's default rule).
//   * the padding mask: make_case draws the key lengths from the seed, the
//     last sequence fully masked when b > 1 (fully masked rows).
//
// Profiles (fixtures/profiles/<name>.json, `paritron parity --profile NAME`;
// loaded by parity/profile.h, carried by SpecFilter::profile). A profile
// narrows the distribution; every key is optional and a missing key keeps the
// generator's full range. Comments (// and /* */) are allowed:
//   {
//     "name": "llama-like",                     // default: the file's stem
//     "description": "free text",
//     "components": ["self_attention", "mlp", "transformer_layer", "transformer_block"],
//     "dtypes": ["fp32", "bf16"],                // fp32 | bf16 | fp16 | fp8 | fp64
//     "max_world_size": 8,                       // min with SpecFilter::max_world_size
//     "large": false,                            // true: the larger shape ranges (SpecFilter::large)
//     "ranges": { "heads": [2, 8], "heads_per_group": [2, 4], "kv_channels": [4, 8],
//                 "num_layers": [1, 4], "experts": [4, 8], "topk": [2, 2], "seq": [4, 8] },
//     "choices": { "normalization": ["RMSNorm"], "activation_func": ["silu"],
//                  "gated_linear_unit": [true], "add_bias_linear": [false],
//                  "moe": [false], "router": ["aux_loss"], "mask": ["causal"],
//                  "rotary": [true], "training": [false, true], "tp": [1, 2] }
//   }
// The keys and their domains: profile_choice_domains() and
// profile_range_domains() in parity/profile.h (the loader rejects any other
// key or value, empty lists, lo > hi and ranges outside the generator's range
// for the profile's "large"). Semantics:
//   * a choice list keeps the listed values of a decision, in the generator's
//     simplest-first order whatever order the file uses (so shrinking still
//     goes toward the simplest allowed value);
//   * a range bounds a value; where the generator draws a multiple unit * m
//     (ffn = tp * c, experts = ep * m, s = unit * m, b = dp * m, a block's
//     layers = pp * vp * m, head dim = step * m), m is clamped to
//     [ceil(lo / unit), floor(hi / unit)]; heads and heads_per_group narrow
//     the heads drawn and the query groups among their divisors;
//   * "components" and the profile's norms / MoE / dtypes also narrow the
//     components ("normalization": ["RMSNorm"] drops layernorm, "moe": [false]
//     drops moe_router and moe_layer, "moe": [true] makes every
//     transformer_layer / block MoE, a component none of whose dtypes is listed
//     is dropped);
//   * the filter's fixed values (component, dtype, layout, training, moe) win
//     over the profile; where an earlier decision or a validity constraint
//     leaves no value the profile allows (tp 2 with an odd number of groups,
//     sp forced by ep, a token-coupled router on a split layout), validity
//     wins and the simplest valid value is taken (or the nearest multiple);
//   * without a profile, the profile hooks draw nothing of their own: a
//     profile adds no decision, so a seed's spec depends only on the
//     generator's version (seeds and repro lines are per version of Paritron).
// Bundled: tiny, gpt-like, llama-like, mixtral-like.
#pragma once

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/parallel_config.h"
#include "common/rng.h"
#include "common/transformer_config.h"
#include "optimized/run_case.h"
#include "parity/profile.h"
#include "reference/make_case.h"

namespace paritron::parity {

struct CaseSpec {
  std::string component;
  TransformerConfig config;  // as drawn: derived defaults not filled, parallel fields at 1 (the layout is separate)
  ParallelConfig layout;
  // F32, BF16, F16: the optimized run's dtype (config.bf16 / fp16 set to match);
  // F8_E4M3: config.fp8 set ("e4m3" or "hybrid"), the run in bf16 (run_dtype);
  // F64 only when a filter asks for it.
  DType dtype = DType::F32;
  int64_t seq = 8, batch = 2;
  std::string mask_type;  // causal | padding | no_mask; empty for components without attention
  bool rotary = false, training = false, explicit_mask = false;
  int64_t layer_number = 1;
  uint64_t seed = 0;

  bool operator==(const CaseSpec&) const = default;
};

// What the generators draw from. Unset fields draw from the full range.
struct SpecFilter {
  std::optional<std::string> component;     // one of optimized's components
  std::optional<DType> dtype;               // F32, BF16, F16, F8_E4M3 (fp8), F64
  std::optional<ParallelConfig> layout;     // a fixed layout; the config is drawn to fit it
  int64_t max_world_size = 8;               // drawn layouts' tp * cp * dp * pp
  bool large = false;                       // larger shapes (s up to 64, wider heads, more experts)
  std::optional<bool> training;
  std::optional<bool> moe;                  // transformer_layer/block: force MoE on or off
  std::optional<Profile> profile;           // narrows everything not fixed above (parity/profile.h)
};

// The components drawn, simplest first (the optimized side's list).
const std::vector<std::string>& generated_components();
// "fp32", "bf16", "fp16", "fp8", "fp64" and back (parse throws Error).
std::string spec_dtype_name(DType dtype);
DType parse_spec_dtype(const std::string& name);

// The dtype the optimized run and the reference emulation use (BF16 for fp8).
DType run_dtype(const CaseSpec& spec);

// Every decision drawn from here: an integer in [lo, hi], lo the simplest.
class Chooser {
 public:
  virtual ~Chooser() = default;
  int64_t integer(int64_t lo, int64_t hi) { return lo >= hi ? lo : draw(lo, hi); }
  size_t index(size_t n) { return static_cast<size_t>(integer(0, static_cast<int64_t>(n) - 1)); }
  bool flag() { return integer(0, 1) == 1; }
  template <class T>
  const T& pick(const std::vector<T>& options) { return options[index(options.size())]; }

 protected:
  virtual int64_t draw(int64_t lo, int64_t hi) = 0;  // lo < hi
};

// draw_case_spec's chooser: decision j is uniform(key(seed), j) scaled to [lo, hi].
class PhiloxChooser final : public Chooser {
 public:
  explicit PhiloxChooser(uint64_t seed);

 protected:
  int64_t draw(int64_t lo, int64_t hi) override;

 private:
  RngKey key_;
  uint64_t counter_ = 0;
};

// The one drawing routine. Throws Error when the filter admits no case (a
// fixed layout no component of the filter can run, a layout that is invalid).
CaseSpec build_case_spec(Chooser& chooser, const SpecFilter& filter = {});

// Deterministic: the same (seed, filter) gives the same spec on every machine.
CaseSpec draw_case_spec(uint64_t seed, const SpecFilter& filter = {});
// The seed of case `index` of a sweep seeded `sweep_seed` (draw_case_spec(case_seed(s, i), f)).
uint64_t case_seed(uint64_t sweep_seed, uint64_t index);

// One line: component dtype layout shapes, then the config fields that differ
// from Megatron's defaults.
std::string describe(const CaseSpec& spec);
std::ostream& operator<<(std::ostream& os, const CaseSpec& spec);  // describe (RapidCheck prints counterexamples)

ref::MakeCaseOptions make_options(const CaseSpec& spec);
opt::OptimizedOptions optimized_options(const CaseSpec& spec);

}  // namespace paritron::parity

// ---- RapidCheck (header-only: the including target links rapidcheck) ----
#if __has_include(<rapidcheck.h>)
#include <rapidcheck.h>

namespace paritron::parity {

// Each decision is a rc::gen::inRange pick, which shrinks toward lo.
class RapidCheckChooser final : public Chooser {
 protected:
  int64_t draw(int64_t lo, int64_t hi) override { return *rc::gen::inRange<int64_t>(lo, hi + 1); }
};

inline rc::Gen<CaseSpec> gen_case_spec(SpecFilter filter = {}) {
  return rc::gen::exec([filter] {
    RapidCheckChooser chooser;
    return build_case_spec(chooser, filter);
  });
}

}  // namespace paritron::parity
#endif
