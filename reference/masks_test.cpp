// Tests of reference/masks: the enum, the mask builders against hand-written
// matrices, tensor conversion and broadcasting, the fill, and errors.
#include "reference/masks.h"

#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include <string>
#include <vector>

#include "common/error.h"
#include "reference/test_util.h"

namespace paritron::ref {
namespace {

using namespace test_util;

// The [sq, sk] slice (b, head) of a mask as 0/1 rows, for literal comparison.
std::vector<std::vector<int>> slice(const AttentionMask& m, int64_t b = 0, int64_t head = 0) {
  std::vector<std::vector<int>> out(static_cast<size_t>(m.sq()), std::vector<int>(static_cast<size_t>(m.sk())));
  for (int64_t i = 0; i < m.sq(); ++i)
    for (int64_t j = 0; j < m.sk(); ++j) out[i][j] = m.masked(b, head, i, j) ? 1 : 0;
  return out;
}

using Rows = std::vector<std::vector<int>>;

Tensor values(DType dtype, Shape shape, std::vector<double> v) { return Tensor::from_values(dtype, std::move(shape), v); }

TEST(AttnMaskType, ParsesCaseFormatStringsWithMegatronValues) {
  EXPECT_EQ(attn_mask_type_from_string("padding"), AttnMaskType::padding);
  EXPECT_EQ(attn_mask_type_from_string("causal"), AttnMaskType::causal);
  EXPECT_EQ(attn_mask_type_from_string("no_mask"), AttnMaskType::no_mask);
  // megatron/core/transformer/enums.py: padding = 1, causal = 2, no_mask = 3.
  EXPECT_EQ(static_cast<int>(AttnMaskType::padding), 1);
  EXPECT_EQ(static_cast<int>(AttnMaskType::causal), 2);
  EXPECT_EQ(static_cast<int>(AttnMaskType::no_mask), 3);
  for (AttnMaskType t : {AttnMaskType::padding, AttnMaskType::causal, AttnMaskType::no_mask}) {
    EXPECT_EQ(attn_mask_type_from_string(attn_mask_type_name(t)), t);
  }
  expect_error([] { attn_mask_type_from_string("Causal"); }, "'Causal'");
  expect_error([] { attn_mask_type_from_string("padding_causal"); }, "padding_causal");
}

TEST(Masks, DefaultCausalMaskIsStrictUpperTriangle) {
  // torch.triu(torch.ones(3, 3), diagonal=1).bool(): True where j > i.
  const AttentionMask m = get_default_causal_mask(3);
  EXPECT_EQ(m.dims(), (std::array<int64_t, 4>{1, 1, 3, 3}));
  EXPECT_EQ(slice(m), (Rows{{0, 1, 1}, {0, 0, 1}, {0, 0, 0}}));
  EXPECT_EQ(slice(get_default_causal_mask(1)), (Rows{{0}}));
}

TEST(Masks, PaddingMaskMasksPaddedKeysAndQueries) {
  // Batch 0: 2 valid queries of 3, 3 valid keys of 4; batch 1: all queries, 1 key.
  const std::vector<int64_t> q = {2, 3}, kv = {3, 1};
  const AttentionMask m = padding_mask(q, kv, 3, 4);
  EXPECT_EQ(m.dims(), (std::array<int64_t, 4>{2, 1, 3, 4}));
  EXPECT_EQ(slice(m, 0), (Rows{{0, 0, 0, 1}, {0, 0, 0, 1}, {1, 1, 1, 1}}));
  EXPECT_EQ(slice(m, 1), (Rows{{0, 1, 1, 1}, {0, 1, 1, 1}, {0, 1, 1, 1}}));
  // Key padding only.
  const AttentionMask k = padding_mask({}, kv, 2, 4);
  EXPECT_EQ(slice(k, 0), (Rows{{0, 0, 0, 1}, {0, 0, 0, 1}}));
  expect_error([&] { padding_mask({}, std::vector<int64_t>{5}, 2, 4); }, "key length 5");
  expect_error([&] { padding_mask(std::vector<int64_t>{1}, kv, 2, 4); }, "1 query lengths for 2");
}

TEST(Masks, SlidingWindowHandCases) {
  // (left, right) = (1, 0), sq = sk = 4: query i sees keys i-1 and i.
  EXPECT_EQ(slice(sliding_window_mask(4, 4, {1, 0})),
            (Rows{{0, 1, 1, 1}, {0, 0, 1, 1}, {1, 0, 0, 1}, {1, 1, 0, 0}}));
  // (0, 1): keys i and i+1.
  EXPECT_EQ(slice(sliding_window_mask(3, 3, {0, 1})), (Rows{{0, 0, 1}, {1, 0, 0}, {1, 1, 0}}));
  // -1 is unbounded: (-1, 0) is the causal mask, (-1, -1) masks nothing.
  EXPECT_EQ(sliding_window_mask(5, 5, {-1, 0}), get_default_causal_mask(5));
  EXPECT_EQ(slice(sliding_window_mask(2, 3, {-1, -1})), (Rows{{0, 0, 0}, {0, 0, 0}}));
  // (1, 1) band.
  EXPECT_EQ(slice(sliding_window_mask(4, 4, {1, 1})),
            (Rows{{0, 0, 1, 1}, {0, 0, 0, 1}, {1, 0, 0, 0}, {1, 1, 0, 0}}));
  // sq = 2 < sk = 4, bottom-right aligned: the diagonal of query i is key
  // i + 2, so with (1, 0) query 0 sees keys 1, 2 and query 1 keys 2, 3.
  EXPECT_EQ(slice(sliding_window_mask(2, 4, {1, 0})), (Rows{{1, 0, 0, 1}, {1, 1, 0, 0}}));
  expect_error([] { sliding_window_mask(2, 2, {-2, 0}); }, "window_size");
}

// Megatron's get_sliding_window_causal_mask (core_v0.19.0 utils.py) for
// windows >= 0: ~tril(triu(ones, skv - sq - w0), skv - sq + w1); triu with
// diagonal k keeps j - i >= k, tril keeps j - i <= k. Written out directly.
bool megatron_window_masked(int64_t sq, int64_t sk, int64_t w0, int64_t w1, int64_t i, int64_t j) {
  const bool kept_by_triu = j - i >= sk - sq - w0;
  const bool kept_by_tril = j - i <= sk - sq + w1;
  return !(kept_by_triu && kept_by_tril);
}

RC_GTEST_PROP(MasksProperty, SlidingWindowMatchesMegatronHelperForFiniteWindows, ()) {
  const int64_t sq = *rc::gen::inRange<int64_t>(1, 9);
  const int64_t sk = *rc::gen::inRange<int64_t>(1, 9);
  const int64_t w0 = *rc::gen::inRange<int64_t>(0, 10);
  const int64_t w1 = *rc::gen::inRange<int64_t>(0, 10);
  const AttentionMask m = sliding_window_mask(sq, sk, {w0, w1});
  for (int64_t i = 0; i < sq; ++i)
    for (int64_t j = 0; j < sk; ++j) RC_ASSERT(m.masked(0, 0, i, j) == megatron_window_masked(sq, sk, w0, w1, i, j));
  // -1 on a side equals any bound at least as wide as the matrix.
  RC_ASSERT(sliding_window_mask(sq, sk, {-1, w1}) == sliding_window_mask(sq, sk, {sk + sq, w1}));
  RC_ASSERT(sliding_window_mask(sq, sk, {w0, -1}) == sliding_window_mask(sq, sk, {w0, sk + sq}));
}

TEST(Masks, FromTensorReadsBoolAndIntegerMasks) {
  // [2, 1, 2, 2] BOOL, flat row-major.
  const std::vector<double> v = {0, 1, 0, 0, 1, 1, 0, 1};
  const Tensor t = Tensor::from_values(DType::BOOL, {2, 1, 2, 2}, v);
  const AttentionMask m = AttentionMask::from_tensor(t);
  EXPECT_EQ(m.dims(), (std::array<int64_t, 4>{2, 1, 2, 2}));
  EXPECT_EQ(slice(m, 0), (Rows{{0, 1}, {0, 0}}));
  EXPECT_EQ(slice(m, 1), (Rows{{1, 1}, {0, 1}}));
  EXPECT_TRUE(m.to_tensor().bitwise_equal(t));
  // The same values as I64 and U8.
  EXPECT_EQ(AttentionMask::from_tensor(Tensor::from_values(DType::I64, {2, 1, 2, 2}, v)), m);
  EXPECT_EQ(AttentionMask::from_tensor(Tensor::from_values(DType::U8, {2, 1, 2, 2}, v)), m);
  // Fewer dimensions broadcast from the right: [sq, sk] is [1, 1, sq, sk].
  const AttentionMask two = AttentionMask::from_tensor(values(DType::BOOL, {2, 2}, {0, 1, 0, 0}));
  EXPECT_EQ(two.dims(), (std::array<int64_t, 4>{1, 1, 2, 2}));
  EXPECT_EQ(two, get_default_causal_mask(2));
}

TEST(Masks, FromTensorRejectsBadMasks) {
  expect_error([] { AttentionMask::from_tensor(values(DType::F32, {1, 1, 1, 2}, {0, 1}), "inputs.attention_mask"); },
               "inputs.attention_mask has dtype F32");
  expect_error([] { AttentionMask::from_tensor(values(DType::I64, {1, 1, 1, 2}, {0, 2}), "m"); },
               "m holds 2 at flat index 1");
  expect_error([] { AttentionMask::from_tensor(Tensor(DType::BOOL, {1, 1, 1, 1, 2}), "m"); }, "1 to 4 dimensions");
  expect_error([] { AttentionMask::from_tensor(Tensor(DType::BOOL, {}), "m"); }, "1 to 4 dimensions");
}

TEST(Masks, BroadcastingAndCompatibility) {
  // [2, 1, 1, 3]: one key-padding row per batch element, broadcast over heads and queries.
  AttentionMask m(2, 1, 1, 3);
  m.set(0, 0, 0, 2, true);
  m.set(1, 0, 0, 0, true);
  EXPECT_TRUE(m.masked(0, 5, 7, 2));
  EXPECT_FALSE(m.masked(0, 5, 7, 0));
  EXPECT_TRUE(m.masked(1, 3, 1, 0));
  m.check_broadcastable(2, 4, 5, 3, "mask");
  expect_error([&] { m.check_broadcastable(3, 4, 5, 3, "inputs.attention_mask"); },
               "inputs.attention_mask has shape [2, 1, 1, 3], not broadcastable");
  expect_error([&] { m.check_broadcastable(2, 4, 5, 4, "mask"); }, "[2, 4, 5, 4]");
  expect_error([&] { m.set(0, 1, 0, 0, true); }, "outside");
  // OR broadcasts: [2, 1, 1, 3] | [1, 1, 3, 3] -> [2, 1, 3, 3].
  const AttentionMask both = m | get_default_causal_mask(3);
  EXPECT_EQ(both.dims(), (std::array<int64_t, 4>{2, 1, 3, 3}));
  EXPECT_EQ(slice(both, 0), (Rows{{0, 1, 1}, {0, 0, 1}, {0, 0, 1}}));
  EXPECT_EQ(slice(both, 1), (Rows{{1, 1, 1}, {1, 0, 1}, {1, 0, 0}}));
  expect_error([&] { (void)(m | get_default_causal_mask(4)); }, "cannot combine");
}

TEST(Masks, AttentionMaskFuncFillsMaskedScores) {
  // scores [b = 1, np = 2, sq = 2, sk = 2] with the causal mask: entry (i=0, j=1) of each head.
  Mat scores(4, 2);
  scores << 1, 2, 3, 4, 5, 6, 7, 8;
  attention_mask_func(scores, 1, 2, get_default_causal_mask(2), kMaskFillValue);
  Mat expected(4, 2);
  expected << 1, -10000, 3, 4, 5, -10000, 7, 8;
  EXPECT_EQ(scores, expected);
  // The fill is Megatron's -10000.0, not -inf.
  EXPECT_EQ(kMaskFillValue, -10000.0);
  Mat bad(3, 2);
  expect_error([&] { attention_mask_func(bad, 1, 2, get_default_causal_mask(2), kMaskFillValue); }, "b = 1, np = 2");
  Mat wide(2, 3);
  expect_error([&] { attention_mask_func(wide, 1, 1, get_default_causal_mask(2), kMaskFillValue); },
               "not broadcastable");
}

RC_GTEST_PROP(MasksProperty, BroadcastReadEqualsExplicitExpansion, ()) {
  // A random mask with random size-1 extents agrees with its OR against an
  // all-false mask of the full shape (which materialises the broadcast).
  const std::array<int64_t, 4> full = {*rc::gen::inRange<int64_t>(1, 4), *rc::gen::inRange<int64_t>(1, 4),
                                       *rc::gen::inRange<int64_t>(1, 5), *rc::gen::inRange<int64_t>(1, 5)};
  std::array<int64_t, 4> dims{};
  for (int k = 0; k < 4; ++k) dims[k] = *rc::gen::element<int64_t>(1, full[k]);
  AttentionMask m(dims[0], dims[1], dims[2], dims[3]);
  for (int64_t e = 0; e < dims[0]; ++e)
    for (int64_t h = 0; h < dims[1]; ++h)
      for (int64_t i = 0; i < dims[2]; ++i)
        for (int64_t j = 0; j < dims[3]; ++j) m.set(e, h, i, j, *rc::gen::arbitrary<bool>());
  const AttentionMask expanded = m | AttentionMask(full[0], full[1], full[2], full[3]);
  RC_ASSERT(expanded.dims() == full);
  for (int64_t e = 0; e < full[0]; ++e)
    for (int64_t h = 0; h < full[1]; ++h)
      for (int64_t i = 0; i < full[2]; ++i)
        for (int64_t j = 0; j < full[3]; ++j) {
          const bool stored = m.masked(e % dims[0], h % dims[1], i % dims[2], j % dims[3]);
          RC_ASSERT(expanded.masked(e, h, i, j) == stored);
          RC_ASSERT(m.masked(e, h, i, j) == stored);
        }
  // Round trip through a case-file tensor.
  RC_ASSERT(AttentionMask::from_tensor(m.to_tensor()) == m);
}

}  // namespace
}  // namespace paritron::ref
