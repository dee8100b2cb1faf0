// Exact mode (issue #6): weights, inputs and output gradients drawn from
// small dyadic values (ref::MakeCaseOptions::dyadic), sizes such that every
// GEMM and reduction of the case is exact in fp32. There a sharding bug shows
// as an exact mismatch instead of hiding in rounding noise:
//
//   * kReference (mlp, relu or squared_relu, GLU or not, biases or not): every
//     output and gradient of an fp32 optimized run on any layout equals the
//     float64 reference truth bit for bit (so also every other layout's);
//   * kLayouts (layernorm, rmsnorm, rotary_pos_emb): the per-element /
//     per-row functions (rsqrt, cos, sin) are not exact, but are the same
//     function on every layout, so a run on any layout equals the run on the
//     single-rank layout bit for bit — except a norm's weight and bias
//     gradients when the layout splits the tokens (data, context or sequence
//     parallel): those are sums over tokens of inexact products, summed per
//     rank then all-reduced, so their rounding depends on the split. They are
//     judged within tolerance instead (exact_layout_tensor says which).
//
// Exactness bound (mlp). Every drawn value is i * 2^-e, |i| <= A (A =
// dyadic_range, e = dyadic_shift). In units of each tensor's resolution (a
// product of j drawn values is a multiple of 2^-j*e), with h = hidden,
// f = ffn, T = tokens (s * b), Z = h A^2 + A 2^e (fc1 output with bias):
//   activation a:   relu Z, squared_relu Z^2, times Z with GLU (act(g) * u)
//   fc2 output:     f |a| A + A 2^(k e)       (bias at the activation's grid)
//   d a:            h A^2;  dz: relu h A^2, squared_relu 2 Z h A^2, times Z with GLU
//   dW2, db2:       T A |a|, T A;  dW1, db1: T A |dz|, T |dz|;  dx: (1 + GLU) f |dz| A
// Each partial sum of such terms is a multiple of the resolution bounded by
// the total of |terms|, so in any summation order, blocking, TP split or
// data-parallel all-reduce the value is exact while the bound is < 2^24
// (fp32's significand). mlp_exact_magnitude computes the largest of them;
// to_exact_spec / exact_draw shrink the draw (A = 2, then A = 1, then no GLU,
// then relu) until it fits, never the check. bf16 (8 significand bits) and
// fp16 (11) hold only tiny MLPs exactly: low_precision_exact_spec gives
// those with integer draws, checked against the truth bit for bit as well.
//
// Zeros: values are compared as numbers (+0 == -0): the sign of an exact
// zero sum depends on the order of its zero terms, which is not a bug.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/tensor.h"
#include "parity/generators.h"
#include "reference/make_case.h"

namespace paritron::parity {

enum class ExactCheck {
  kNone,       // the component has no exact mode
  kLayouts,    // layout vs the single-rank layout bit for bit
  kReference,  // vs the float64 truth bit for bit (and so layout vs layout)
};

struct DyadicDraw {
  int64_t range = 2;  // A: |i| <= A
  int64_t shift = 2;  // e: values i * 2^-e
};

// The components exact mode covers, simplest first.
const std::vector<std::string>& exact_components();

// The largest |value| / resolution over every tensor of an MLP forward and
// backward with the draw d (see above); exact in fp32 while < 2^24.
double mlp_exact_magnitude(const TransformerConfig& cfg, int64_t tokens, const DyadicDraw& d);
inline constexpr double kFp32ExactLimit = 16777216.0;  // 2^24
// 2^(significand bits): 2^24 F32, 2^11 F16, 2^8 BF16, 2^53 F64.
double exact_limit(DType dtype);

// Low precision: an fp32-exact mlp spec whose tensors also fit `dtype`'s
// significand with integer draws (range 1, shift 0: values -1, 0, 1), as
// the spec adapted to that dtype (config bf16 / fp16 set); nullopt when the
// bound does not fit. The optimized side stores activations in the dtype and
// computes in fp32, so such a run must equal the float64 truth bit for bit too.
std::optional<CaseSpec> low_precision_exact_spec(const CaseSpec& spec, DType dtype);
inline constexpr DyadicDraw kIntegerDraw{1, 0};

// What exact mode checks for the spec as it stands (kNone: it cannot run in
// exact mode: another component, not fp32, an activation or size whose
// tensors are not exact).
ExactCheck exact_check(const CaseSpec& spec);
bool exact_capable(const CaseSpec& spec);

// A drawn spec adapted to exact mode: fp32 (no bf16 / fp16 / fp8 in the
// config); mlp: an activation other than relu / squared_relu becomes relu, no
// bias_activation_fusion, then GLU / squared_relu dropped while the bound does
// not fit. Throws Error for a component without an exact mode. The layout,
// shapes and seed are kept.
CaseSpec to_exact_spec(CaseSpec spec);

// The dyadic draw used for a spec (range 2, or 1 where the MLP bound needs it).
DyadicDraw exact_draw(const CaseSpec& spec);
// make_options(spec) with the dyadic draw (exact_draw(spec), or kIntegerDraw
// for a low_precision_exact_spec).
ref::MakeCaseOptions exact_make_options(const CaseSpec& spec);

// Whether tensor `name` of the spec must agree bit for bit between the
// spec's layout and the single-rank layout (kLayouts: not a norm's parameter
// gradient when the layout splits tokens; kReference: every tensor).
bool exact_layout_tensor(const CaseSpec& spec, const std::string& name);

// Bit-for-bit comparison (+0 == -0, NaN == NaN) of every tensor of
// `expected` that `include` accepts (all when empty) with `actual`: one line
// per tensor that differs (first differing element, count), is missing or
// has another shape, and per tensor only `actual` holds. Empty: identical.
std::vector<std::string> bitwise_differences(const std::map<std::string, Tensor>& expected,
                                             const std::map<std::string, Tensor>& actual,
                                             const std::function<bool(const std::string&)>& include = {});

}  // namespace paritron::parity
