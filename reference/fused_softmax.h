// FusedScaleMaskSoftmax, torch path: the attention softmax with Megatron's
// upcast, scaling, masking and downcast, forward and backward.
//
// Megatron: megatron/core/fusions/fused_softmax.py
// (FusedScaleMaskSoftmax.forward_torch_softmax), megatron/core/transformer/
// utils.py (get_default_causal_mask, attention_mask_func). Spec §2.3, §14
// #5-#7, #10. For scores x [b, np, sq, sk]:
//   1. x upcast to the softmax dtype (fp32 when the run is fp16/bf16 and
//      attention_softmax_in_fp32; Precision::softmax_dtype);
//   2. x = x * scale when scale (the query-key layer-scaling coeff) is set:
//      scaling happens BEFORE masking;
//   3. mask: the passed mask as is, whatever the mask type (for the causal
//      type the triangle is not added to it; no_mask does not drop it); with
//      no mask, the causal type and sq > 1, the default causal mask
//      (requires sq == sk); otherwise none;
//   4. x[mask] = -10000 (rounded to the softmax dtype), so a fully masked row
//      is uniform 1/sk (spec §2.2);
//   5. probs = softmax(x, -1) in the softmax dtype, then cast to the
//      activation dtype.
// Backward (autograd of the same ops): d_x = scale * P (d_P - sum_j P d_P)
// with P the softmax-dtype probabilities, zero at masked entries (masked_fill
// cuts the gradient there), computed in the softmax dtype, cast back.
//
// Sliding window (config.window_size, a newer field): Transformer Engine
// conventions for the window values (TransformerConfig.window_size documents
// -1 = unbounded), Megatron's torch path for the mask: the mask applied is
//   sliding_window_mask(sq, sk, (left, right')), bottom-right aligned,
// and it REPLACES any passed mask, as newer Megatron's forward_torch_softmax
// does (mask = get_sliding_window_causal_mask(sq, sk, window_size); checked
// against megatron-core 0.16.1 by fixtures/golden/core_v0.16.1/
// dpa_sliding_window_causal). right' = 0 for the causal type (TE's
// check_set_window_size forces a causal window to (left, 0)). Deliberate
// differences from that torch helper: it reads -1 literally (window (-1, 0)
// masks every entry) and does not force right = 0 for causal. With a window and the causal type, sq must
// equal sk (TE aligns causal windows top-left, the torch helper bottom-right:
// they differ only when sq != sk, and that case is rejected). Also unlike TE:
// TE rejects mixed windows such as (-1, 3) and turns (-1, 0) into "no
// window" for non-causal types (check_set_window_size), and aligns a padding
// window to each sequence's actual lengths; here -1 is simply unbounded on
// its side and the window is aligned to the whole [sq, sk] matrix.
//
// Left out: the fused CUDA kernels (same math in the cases Paritron runs;
// their fully-masked-row behaviour is kernel-specific, spec §2.3), the
// newer softmax_type ("off-by-one", "learnable" softmax offsets).
#pragma once

#include <array>
#include <optional>

#include "reference/core.h"
#include "reference/masks.h"

namespace paritron::ref {

// Step 3 (plus the window rule above): the mask the torch path applies to
// scores [b, np, sq, sk], or nullopt for none. Checks that a passed mask is
// broadcastable (Error naming "attention_mask") and that a causal mask can
// be built (sq == sk).
std::optional<AttentionMask> softmax_mask(AttnMaskType type, const std::optional<AttentionMask>& mask, int64_t b,
                                          int64_t np, int64_t sq, int64_t sk,
                                          const std::optional<std::array<int64_t, 2>>& window_size);

struct SoftmaxForward {
  Mat probs;          // [b*np*sq, sk]: the output, in the activation dtype p.dtype
  Mat probs_softmax;  // the same in the softmax dtype when it differs from p.dtype (what autograd saves); else empty
  std::optional<AttentionMask> mask;  // the mask applied (softmax_mask), for backward
};

// The whole forward on scores [b, np, sq, sk] held as a Mat of b*np*sq rows
// (row (e*np + head)*sq + i) and sk columns, values of p.dtype.
SoftmaxForward fused_scale_mask_softmax_forward(const Mat& scores, int64_t b, int64_t np, AttnMaskType type,
                                                const std::optional<AttentionMask>& mask,
                                                std::optional<double> scale,
                                                const std::optional<std::array<int64_t, 2>>& window_size,
                                                const Precision& p);
// d_scores [b*np*sq, sk] from d_probs (same layout).
Mat fused_scale_mask_softmax_backward(const SoftmaxForward& fwd, const Mat& d_probs, int64_t b, int64_t np,
                                      std::optional<double> scale, const Precision& p);

// Steps 1, 2, 4, 5 on one (batch b, head) slice [sq, sk] of the scores, with
// the mask already chosen (softmax_mask; nullptr = none). Returns the probs in
// p.dtype; *probs_softmax receives them in the softmax dtype when that
// differs from p.dtype (else it is left empty). The attention core uses these
// to avoid holding the [b, np, sq, sk] scores twice.
Mat scale_mask_softmax_slice(const Mat& scores, const AttentionMask* mask, int64_t b, int64_t head,
                             std::optional<double> scale, const Precision& p, Mat* probs_softmax);
// Backward of one slice: `probs` are the softmax-dtype probabilities (or the
// p.dtype ones when the two dtypes agree).
Mat scale_mask_softmax_slice_backward(const Mat& probs, const Mat& d_probs, const AttentionMask* mask, int64_t b,
                                      int64_t head, std::optional<double> scale, const Precision& p);

}  // namespace paritron::ref
