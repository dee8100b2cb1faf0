// Attention masks: the boolean masks Megatron's attention takes (true =
// masked out), the masks it builds itself (causal, sliding window), padding
// masks, the fill the softmax applies, and the AttnMaskType enum.
//
// Megatron: megatron/core/transformer/enums.py (AttnMaskType),
// megatron/core/transformer/utils.py (get_default_causal_mask,
// attention_mask_func; core_v0.19.0 adds get_sliding_window_causal_mask).
// Spec §2.1, §2.2, §14 #4-#7.
//
//   mask[b, head, i, j] = true  ->  query i of (b, head) does not attend key j
//   attention_mask_func:  scores[mask] = -10000.0   (not -inf: spec §2.2)
//   get_default_causal_mask(sq) = triu(ones(sq, sq), diagonal=1): j > i masked
//
// A mask is broadcastable to the scores [b, np, sq, sk] the way torch
// broadcasts masked_fill's mask: every extent is either the full one or 1.
// The usual shapes are [b, 1, sq, sk] (padding), [1, 1, s, s] (GPT causal
// from the data pipeline) and [b, 1, 1, sk] (key padding only).
//
// Sliding window (config.window_size = (left, right), -1 = unbounded; a newer
// field, core_v0.19.0 / Transformer Engine semantics): query i attends key j
// iff  i + (sk - sq) - left <= j <= i + (sk - sq) + right, i.e. the window is
// aligned to the bottom-right corner of the [sq, sk] score matrix, as in
// Megatron's get_sliding_window_causal_mask and TE's get_full_mask for
// "no_mask"/"causal_bottom_right" (TE's "causal" type aligns top-left; for
// sq == sk the two agree, and fused_softmax rejects the one case where they
// would not). Unlike Megatron's torch helper, -1 means "unbounded" as
// TransformerConfig.window_size documents (the helper would take -1
// literally, masking everything for (-1, 0): see fused_softmax.h).
//
// Left out: AttnMaskType.padding_causal / arbitrary (newer versions, not in
// the case format), packed-sequence (thd) masks.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "common/tensor.h"
#include "reference/core.h"

namespace paritron::ref {

// megatron/core/transformer/enums.py AttnMaskType (0.5.0 members, same values).
enum class AttnMaskType { padding = 1, causal = 2, no_mask = 3 };

// The case-format strings "padding", "causal", "no_mask" (also Megatron's
// enum member names); anything else throws Error naming the string.
AttnMaskType attn_mask_type_from_string(std::string_view name);
std::string_view attn_mask_type_name(AttnMaskType type);

// Megatron's fill value for masked scores (attention_mask_func).
inline constexpr double kMaskFillValue = -10000.0;

// A boolean mask [batch, heads, sq, sk], true = masked out; an extent of 1
// broadcasts over the scores' extent.
class AttentionMask {
 public:
  AttentionMask() = default;  // [1, 1, 0, 0]
  // All entries `value`. Every extent must be >= 1 (sq, sk >= 0 allowed).
  AttentionMask(int64_t batch, int64_t heads, int64_t sq, int64_t sk, bool value = false);

  // From a case-file tensor: 1 to 4 dimensions, read as [b, heads, sq, sk]
  // with missing leading dimensions 1 (torch broadcasting); dtype BOOL or an
  // integer dtype holding only 0 and 1. Anything else throws Error naming
  // `name` (e.g. "inputs.attention_mask").
  static AttentionMask from_tensor(const Tensor& t, std::string_view name = "attention_mask");
  // BOOL [batch, heads, sq, sk].
  Tensor to_tensor() const;

  int64_t batch() const { return dims_[0]; }
  int64_t heads() const { return dims_[1]; }
  int64_t sq() const { return dims_[2]; }
  int64_t sk() const { return dims_[3]; }
  const std::array<int64_t, 4>& dims() const { return dims_; }

  // Entry (b, head, i, j) of the mask broadcast to any larger shape: an index
  // along an extent of 1 is taken as 0.
  bool masked(int64_t b, int64_t head, int64_t i, int64_t j) const;
  // Sets the stored entry (indices within the stored extents).
  void set(int64_t b, int64_t head, int64_t i, int64_t j, bool value);

  // Throws Error naming `name` unless every extent is 1 or equals the
  // corresponding extent of [b, np, sq, sk].
  void check_broadcastable(int64_t b, int64_t np, int64_t sq, int64_t sk, std::string_view name) const;

  // Element-wise OR, broadcast to the larger extent of each dimension (the
  // two must be broadcast-compatible).
  friend AttentionMask operator|(const AttentionMask& a, const AttentionMask& c);
  friend bool operator==(const AttentionMask& a, const AttentionMask& c) = default;

 private:
  int64_t offset(int64_t b, int64_t head, int64_t i, int64_t j) const;
  std::array<int64_t, 4> dims_ = {1, 1, 0, 0};
  std::vector<uint8_t> data_;
};

// get_default_causal_mask(sq): [1, 1, sq, sq], true strictly above the diagonal.
AttentionMask get_default_causal_mask(int64_t sq);

// A padding mask [b, 1, sq, sk] for batches whose valid tokens come first:
// key j of batch element e is masked iff j >= kv_lengths[e], and query i is
// masked (a fully masked row, uniform after the softmax) iff
// i >= q_lengths[e]. An empty q_lengths masks no query rows. Lengths must lie
// in [0, sq] / [0, sk], and q_lengths (when given) must have one length per
// batch element like kv_lengths.
AttentionMask padding_mask(std::span<const int64_t> q_lengths, std::span<const int64_t> kv_lengths, int64_t sq,
                           int64_t sk);

// The sliding-window mask [1, 1, sq, sk] for window (left, right), each >= 0
// or -1 = unbounded, bottom-right aligned (see the top of this file):
// masked iff j < i + (sk - sq) - left or j > i + (sk - sq) + right.
// window (-1, 0) is the causal mask (for sq == sk), (-1, -1) masks nothing.
AttentionMask sliding_window_mask(int64_t sq, int64_t sk, std::array<int64_t, 2> window);

// attention_mask_func on one (batch b, head) slice of the scores: every
// masked entry of scores [sq, sk] is set to `fill` (kMaskFillValue rounded
// to the dtype the softmax runs in).
void attention_mask_func(Mat& scores, const AttentionMask& mask, int64_t b, int64_t head, double fill);

// attention_mask_func on the whole scores tensor [b, np, sq, sk], held as a
// Mat of b*np*sq rows (row (e*np + head)*sq + i) and sk columns.
void attention_mask_func(Mat& scores, int64_t b, int64_t np, const AttentionMask& mask, double fill);

}  // namespace paritron::ref
