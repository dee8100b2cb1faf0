// FP8 delayed scaling as Transformer Engine 1.x runs it under megatron-core
// 0.5.0: the recipe Megatron builds, the per-tensor scaling metadata (scale,
// scale_inv, amax history), the amax-and-scale update, and the scaled casts
// the reference uses to emulate TE's FP8 GEMM inputs.
//
// Mirrors:
//   * megatron/core/transformer/transformer_block.py (core_v0.5.0),
//     TransformerBlock.forward: the DelayedScaling(...) construction;
//   * transformer_engine/common/recipe.py (TE v1.3; `recipe/__init__.py` later):
//     Format (max_fwd / max_bwd), DelayedScaling and its __post_init__ checks;
//   * transformer_engine/pytorch/fp8.py (v1.3): _default_get_amax,
//     _update_amax_history, _default_sf_compute, _compute_scaling_factor_inverse;
//     common/recipe/delayed_scaling.cu (v1.4+: the same update as one kernel);
//   * transformer_engine/pytorch/module/base.py (v1.3/v1.4): prepare_forward /
//     _prepare_backward, which run the update before the next cast;
//   * the cast kernels' amax (common/util/vectorized_pointwise.h,
//     transpose/cast_transpose.cu: fmaxf reduction, atomicMaxFloat into
//     amax_history[0]).
// Spec: shared/spec/megatron-semantics.md §12 (12.1 recipe, 12.2 formats,
// 12.3 quantisation and delayed scaling) and Appendix A (fp8 scales and amax
// history are fp32). The element-wise math lives in common/math/fp8.h so CUDA
// kernels run the same code.
//
// Resolved behaviours (each follows TE; see the .cpp for the line of TE):
//   * record_amax takes the max with what slot 0 already holds (TE's cast does
//     atomicMaxFloat into amax_history[0], which the previous update zeroed), so
//     two casts of one slot within a step record the larger amax.
//   * update_scale: amax is read from the history BEFORE the roll (most_recent =
//     slot 0, max = max over all slots); then the history is rolled by -1 and
//     slot 0 zeroed; then the scale is computed. The roll is a permutation, so
//     "max" sees the same set either way; "most_recent" must read slot 0 first.
//   * tensor_amax ignores NaN elements (fmaxf in TE's kernels); +-inf gives inf.
//   * history "max" propagates a NaN that was recorded directly (torch.max in
//     TE v1.3); a NaN amax keeps the previous scale either way.
//   * interval: TE-PyTorch 1.x stores DelayedScaling.interval but never reads it
//     (it updates before every training forward/backward, i.e. interval 1). The
//     spec (§12.3) and this class honour it: the update runs after every
//     interval-th step, and amaxes of the steps in between max-accumulate in
//     slot 0. Set recipe.interval = 1 to match TE-PyTorch exactly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "common/dtype.h"
#include "common/math/float_format.h"
#include "common/tensor.h"

namespace paritron {

struct TransformerConfig;

// TransformerConfig.fp8: "e4m3" (all tensors E4M3) or "hybrid" (E4M3 forward,
// E5M2 backward). TE's Format.E5M2 is refused by DelayedScaling itself ("Pure
// E5M2 training is not supported") and by Megatron, so it is not modelled.
enum class Fp8Format : uint8_t { kE4M3, kHybrid };

// The FP8 tensors of one TE linear layer: the GEMM input (activation), the
// weight, and the gradient w.r.t. the output (the dgrad/wgrad input).
enum class Fp8Role : uint8_t { kInput, kWeight, kGradOutput };

enum class AmaxComputeAlgo : uint8_t { kMostRecent, kMax };

// The three GEMMs of a linear layer (TE's override_linear_precision order).
enum class Fp8Gemm : uint8_t { kFprop, kDgrad, kWgrad };

// "e4m3" / "hybrid"; throws ConfigError (field "fp8") for anything else.
Fp8Format parse_fp8_format(std::string_view name);
std::string_view fp8_format_name(Fp8Format format);
// "most_recent" / "max"; throws ConfigError (field "fp8_amax_compute_algo").
AmaxComputeAlgo parse_amax_compute_algo(std::string_view name);
std::string_view amax_compute_algo_name(AmaxComputeAlgo algo);

// Forward roles (input, weight) use the recipe's forward format, the
// grad-output role its backward format (TE's fp8_max_fwd / fp8_max_bwd).
bool is_forward_role(Fp8Role role);
const math::FloatFormat& fp8_float_format(Fp8Format format, Fp8Role role);
DType fp8_dtype(Fp8Format format, Fp8Role role);  // DType::F8_E4M3 or F8_E5M2
float fp8_max(Fp8Format format, Fp8Role role);    // 448 or 57344

struct OverrideLinearPrecision {
  bool fprop = false;
  bool dgrad = false;
  bool wgrad = false;
};

// TE's DelayedScaling. Defaults are TE's own (margin 0, interval 1, HYBRID,
// history 1024, "max"); delayed_scaling_recipe() gives what Megatron builds.
struct DelayedScalingRecipe {
  int margin = 0;
  int64_t interval = 1;
  Fp8Format fp8_format = Fp8Format::kHybrid;
  int64_t amax_history_len = 1024;
  AmaxComputeAlgo amax_compute_algo = AmaxComputeAlgo::kMax;
  OverrideLinearPrecision override_linear_precision;
  bool reduce_amax = true;  // amax max-all-reduced over the fp8 group (not applied here)

  // Throws ConfigError: interval >= 1, amax_history_len >= 1, margin in
  // [-126, 127] (2^margin exact in fp32), override_linear_precision one of
  // (F,F,F), (F,F,T) (TE's __post_init__ assertion).
  void validate() const;
  const math::FloatFormat& format(Fp8Role role) const { return fp8_float_format(fp8_format, role); }
  float fp8_max(Fp8Role role) const { return paritron::fp8_max(fp8_format, role); }
  // Whether that GEMM runs in FP8 (false: higher precision, TE's override).
  bool gemm_in_fp8(Fp8Gemm gemm) const;
};

// DelayedScaling(margin=fp8_margin, interval=fp8_interval, fp8_format=E4M3 if
// fp8 == "e4m3" else HYBRID if fp8 == "hybrid", amax_compute_algo=
// fp8_amax_compute_algo, amax_history_len=fp8_amax_history_len,
// override_linear_precision=(False, False, not fp8_wgrad)) — spec §12.1.
// Throws ConfigError when config.fp8 is unset or any field is invalid.
DelayedScalingRecipe delayed_scaling_recipe(const TransformerConfig& config);

// One FP8 tensor slot's scaling state (fp32, spec Appendix A). amax_history[0]
// is the slot the current step's casts record into.
struct Fp8TensorMeta {
  float scale = 1.0f;
  float scale_inv = 1.0f;
  std::vector<float> amax_history = std::vector<float>(1, 0.0f);

  Fp8TensorMeta() = default;
  explicit Fp8TensorMeta(int64_t amax_history_len);  // zeros; throws Error when < 1
};

// amax_history[0] = max(amax_history[0], amax) — TE's atomicMaxFloat, which
// compares the float bits as integers, so a NaN amax (never produced by
// tensor_amax) sticks. Throws Error for a negative amax.
void record_amax(Fp8TensorMeta& meta, float amax);
// The amax the update uses: history[0] (most_recent) or the max over the
// history (max; NaN if any entry is NaN, like torch.max).
float history_amax(const Fp8TensorMeta& meta, AmaxComputeAlgo algo);
// roll(history, -1); history[0] = 0 (TE's _update_amax_history).
void roll_amax_history(Fp8TensorMeta& meta);
// TE's amax_and_scale_update for one tensor: amax = history_amax (before the
// roll), roll, scale = scale_for_amax(amax, ..., old scale), scale_inv =
// 1/scale, all in fp32. Throws Error when the history length is not
// recipe.amax_history_len.
void update_scale(Fp8TensorMeta& meta, const DelayedScalingRecipe& recipe, Fp8Role role);

// (fp8_max / amax) / 2^margin in fp32 if amax is finite and > 0, else
// previous_scale. With previous_scale = 1 this is the "steady state" scale a
// tensor gets once the history holds its own amax (and the first-step scale
// for amax 0). Throws Error for a margin outside [-126, 127].
float scale_for_amax(float amax, const math::FloatFormat& format, int margin, float previous_scale = 1.0f);
float scale_for_amax(float amax, const DelayedScalingRecipe& recipe, Fp8Role role, float previous_scale = 1.0f);

// max |x| with NaN elements ignored (TE's fmaxf reduction); 0 for an empty
// span. Double inputs are first rounded to fp32 (TE's ComputeType), which
// commutes with the max.
float tensor_amax(std::span<const float> x);
float tensor_amax(std::span<const double> x);
float tensor_amax(const Tensor& x);  // any F64/F32/F16/BF16 tensor; throws Error otherwise

// q = fp8(RNE(float(x) * scale)) with finite saturation, as bits of `format`.
void quantise(std::span<const float> x, float scale, const math::FloatFormat& format, std::span<uint8_t> q);
std::vector<uint8_t> quantise(std::span<const float> x, float scale, const math::FloatFormat& format);
std::vector<uint8_t> quantise(std::span<const double> x, float scale, const math::FloatFormat& format);
// q * scale_inv rounded to fp32 (TE's cast_from_fp8).
std::vector<float> dequantise(std::span<const uint8_t> q, float scale_inv, const math::FloatFormat& format);
// q * scale_inv exactly (what an FP8 GEMM consumes; see common/math/fp8.h).
std::vector<double> dequantise_exact(std::span<const uint8_t> q, float scale_inv, const math::FloatFormat& format);
// dequantise(quantise(x)) (fp32 values; the double overload widens them exactly).
std::vector<float> fake_quant(std::span<const float> x, float scale, float scale_inv,
                              const math::FloatFormat& format);
std::vector<double> fake_quant(std::span<const double> x, float scale, float scale_inv,
                               const math::FloatFormat& format);

// Tensor forms. quantise returns an F8_E4M3 / F8_E5M2 tensor of x's shape;
// dequantise takes one and stores q * scale_inv (fp32) rounded to out_dtype;
// fake_quant stores dequantise(quantise(x)) rounded to out_dtype (F32 and F64
// hold it exactly). Inputs: F64/F32/F16/BF16; throws Error otherwise.
Tensor quantise(const Tensor& x, float scale, const math::FloatFormat& format);
Tensor dequantise(const Tensor& q, float scale_inv, DType out_dtype = DType::F32);
Tensor fake_quant(const Tensor& x, float scale, float scale_inv, const math::FloatFormat& format,
                  DType out_dtype = DType::F32);

// The metas of every FP8 tensor slot of a model under one recipe, and the step
// counter that decides when their scales update (spec §12.3 "delayed": the
// scale used in step t comes from amaxes of steps before t; step 1 uses 1).
//
// A step is one training iteration of every slot: each cast records its amax
// into slot 0 of its history with the slot's current scale, then end_step().
// TE updates forward metas at the start of the next forward and grad metas at
// the start of the next backward (module/base.py); with one forward and one
// backward per step both are "after this step's casts, before the next step's",
// which is where end_step() puts them.
class DelayedScalingState {
 public:
  explicit DelayedScalingState(DelayedScalingRecipe recipe);  // validates the recipe

  // A new slot (scale 1, zero history); returns its index.
  size_t add_slot(Fp8Role role);
  size_t num_slots() const { return slots_.size(); }
  const DelayedScalingRecipe& recipe() const { return recipe_; }
  Fp8Role role(size_t slot) const;
  const math::FloatFormat& format(size_t slot) const;
  const Fp8TensorMeta& meta(size_t slot) const;
  Fp8TensorMeta& meta(size_t slot);

  void record_amax(size_t slot, float amax);
  // TE's cast: record tensor_amax(x), quantise with the slot's current scale.
  std::vector<uint8_t> cast(size_t slot, std::span<const float> x);
  // The same cast, returning dequantise(q) with the slot's scale_inv.
  std::vector<float> fake_quant(size_t slot, std::span<const float> x);
  std::vector<double> fake_quant(size_t slot, std::span<const double> x);
  Tensor fake_quant(size_t slot, const Tensor& x, DType out_dtype = DType::F32);

  // Ends a step: steps_completed() += 1, and when it becomes a multiple of
  // recipe().interval every slot runs update_scale. Returns whether it did.
  bool end_step();
  int64_t steps_completed() const { return steps_; }

 private:
  struct Slot {
    Fp8Role role;
    Fp8TensorMeta meta;
  };
  const Slot& slot_at(size_t slot) const;

  DelayedScalingRecipe recipe_;
  std::vector<Slot> slots_;
  int64_t steps_ = 0;
};

}  // namespace paritron
