// Near-ties of MoE routing decisions (issue #6: "Integer outputs (expert
// indices, counts) exact, with near-ties handled honestly").
//
// A router picks the top-k of each token's selection values (logits,
// probabilities or sinkhorn values). Where the k-th and (k+1)-th values are
// closer than what the run's dtype can resolve, a correct implementation in
// that dtype may pick the other expert, and every result downstream of that
// token then legitimately differs from the float64 truth by O(1). The
// harness never judges such a case: it resamples it (parity/sweep.h) and
// counts the resampling.
//
// What "can resolve" means, per token (row) of each router of the case (the
// reference's taps `<path>router.logits`, `router.selection` (the values
// top-k ran on), `router.topk_margin`, `router.order_margin`):
//   resolution = the largest drift |other - truth| of the token's logits and
//                selection values, over the other runs (the emulation of the
//                dtype, and the truth of the perturbed case the sensitivity
//                term uses: a decision that flips there would make the
//                sensitivity, and so the bound, huge), at least the median
//                token's drift (one run's drift of one token is one sample)
//                and u(dtype) times the row's largest magnitude
//   near tie   = the token's topk_margin (and order_margin when the case
//                reports the top-k order: moe_router / moe_layer's
//                router_indices) < factor * resolution
// factor = tie_factor(dtype) = max(4, k(dtype)) of the tolerance model (2,
// 6, 6, 16 for F32, BF16, F16, fp8): the tolerance lets a correct run err k
// times the emulation, so its deciding values may drift that far too (a
// factor of 4 in fp16 let a flip through at margin / resolution 4.7). The
// margins are in selection units (a probability difference for
// softmax-then-top-k), which a logit drift bounds from above.
//
// ReLU kinks are the same kind of decision: relu'(z) jumps from 0 to 1 at
// z = 0, so a pre-activation within the dtype's resolution of 0 may land on
// the other side in a correct low-precision run, and the gradient through
// that unit (linear_fc1's weight and bias gradients, everything upstream)
// changes by O(|dy| |x|), while the forward, continuous at the kink, does
// not: the sweep still judges such a case's outputs and leaves only its
// gradients unjudged (counted), instead of redrawing it. With
// activation_func relu (the gate half under GLU), the taps `linear_fc1`
// (dense MLP, experts) give
//   margin = min |z_truth| of a token's row, resolution = its drift as above
// and the same factor test. (squared_relu and the GELU family have
// continuous derivatives: no kink.)
//
// Capacity dropping by score (drop policy "probs") is a second kind of
// decision, which tokens an expert keeps: `router.capacity_margin` (the last
// kept score minus the first dropped one, per expert) joins the same test,
// against the widest token resolution; a margin of exactly 0 is an exact tie
// of equal scores (every top-1 score is 1), settled by the tie rule (lower
// token index first) on both sides, not a near tie.
#pragma once

#include <limits>
#include <map>
#include <string>

#include "common/dtype.h"
#include "common/tensor.h"
#include "common/transformer_config.h"

namespace paritron::parity {

struct NearTie {
  bool near_tie = false;  // routing || kink
  bool routing = false;   // a router's top-k / order / capacity decision (forward results jump: redraw)
  bool kink = false;      // a ReLU kink (the forward is continuous there: only gradients jump)
  std::string router;   // the tap path of the closest router ("", "mlp.", "layers.3.mlp.")
  double margin = std::numeric_limits<double>::infinity();      // its smallest margin
  double resolution = 0;                                        // its resolution
  double factor = 4;                                            // tie_factor of the judged dtype
  std::string describe() const;  // "router 'layers.3.mlp.': margin 1.2e-05 < 4 x resolution 9.8e-06"
};

// max(4, default_k(dtype)) (the dtype a case is judged as).
double tie_factor(DType dtype);

// truth: the reference's float64 results with taps; others: the runs whose
// drift measures the resolution (the emulation in the run's dtype, the
// perturbed truth). dtype: the run's dtype (its u); judged_as: the case's
// dtype (F8_E4M3 for fp8 cases run in BF16). Cases without MoE routers or
// ReLU give no near tie.
NearTie find_near_tie(const std::map<std::string, Tensor>& truth,
                      const std::vector<const std::map<std::string, Tensor>*>& others, DType dtype, DType judged_as,
                      const TransformerConfig& cfg);

}  // namespace paritron::parity
