// See masks.h.
#include "reference/masks.h"

#include <algorithm>
#include <fmt/format.h>
#include <limits>

#include "common/error.h"

namespace paritron::ref {

AttnMaskType attn_mask_type_from_string(std::string_view name) {
  if (name == "padding") return AttnMaskType::padding;
  if (name == "causal") return AttnMaskType::causal;
  if (name == "no_mask") return AttnMaskType::no_mask;
  throw Error(fmt::format("unknown attn_mask_type '{}' (expected \"padding\", \"causal\" or \"no_mask\")", name));
}

std::string_view attn_mask_type_name(AttnMaskType type) {
  switch (type) {
    case AttnMaskType::padding: return "padding";
    case AttnMaskType::causal: return "causal";
    case AttnMaskType::no_mask: return "no_mask";
  }
  throw Error(fmt::format("invalid AttnMaskType {}", static_cast<int>(type)));
}

// ---------------------------------------------------------------------------
// AttentionMask

AttentionMask::AttentionMask(int64_t batch, int64_t heads, int64_t sq, int64_t sk, bool value)
    : dims_{batch, heads, sq, sk} {
  if (batch < 1 || heads < 1 || sq < 0 || sk < 0) {
    throw Error(fmt::format("attention mask extents [{}, {}, {}, {}] are invalid", batch, heads, sq, sk));
  }
  data_.assign(static_cast<size_t>(batch * heads * sq * sk), value ? 1 : 0);
}

AttentionMask AttentionMask::from_tensor(const Tensor& t, std::string_view name) {
  if (t.dim() < 1 || t.dim() > 4) {
    throw Error(fmt::format("{} has shape {}: an attention mask has 1 to 4 dimensions, broadcastable to "
                            "[b, np, sq, sk]",
                            name, shape_string(t.shape())));
  }
  if (!is_integral(t.dtype())) {
    throw Error(fmt::format("{} has dtype {}: an attention mask is BOOL (or integer 0/1), true = masked out",
                            name, dtype_name(t.dtype())));
  }
  std::array<int64_t, 4> d = {1, 1, 1, 1};
  for (int64_t k = 0; k < t.dim(); ++k) d[4 - t.dim() + k] = t.shape()[k];
  if (d[0] < 1 || d[1] < 1) {
    throw Error(fmt::format("{} has shape {}: the batch and head extents must be >= 1", name,
                            shape_string(t.shape())));
  }
  AttentionMask m(d[0], d[1], d[2], d[3]);
  for (int64_t i = 0; i < t.numel(); ++i) {
    const int64_t v = t.get_int(i);
    if (v != 0 && v != 1) {
      throw Error(fmt::format("{} holds {} at flat index {}: an integer attention mask must be 0 or 1", name, v, i));
    }
    m.data_[static_cast<size_t>(i)] = static_cast<uint8_t>(v);
  }
  return m;
}

Tensor AttentionMask::to_tensor() const {
  Tensor t(DType::BOOL, {dims_[0], dims_[1], dims_[2], dims_[3]});
  for (int64_t i = 0; i < t.numel(); ++i) t.set_int(i, data_[static_cast<size_t>(i)]);
  return t;
}

int64_t AttentionMask::offset(int64_t b, int64_t head, int64_t i, int64_t j) const {
  return ((b * dims_[1] + head) * dims_[2] + i) * dims_[3] + j;
}

bool AttentionMask::masked(int64_t b, int64_t head, int64_t i, int64_t j) const {
  // Broadcasting: an extent of 1 serves every index.
  const int64_t bb = dims_[0] == 1 ? 0 : b;
  const int64_t hh = dims_[1] == 1 ? 0 : head;
  const int64_t ii = dims_[2] == 1 ? 0 : i;
  const int64_t jj = dims_[3] == 1 ? 0 : j;
  return data_[static_cast<size_t>(offset(bb, hh, ii, jj))] != 0;
}

void AttentionMask::set(int64_t b, int64_t head, int64_t i, int64_t j, bool value) {
  if (b < 0 || b >= dims_[0] || head < 0 || head >= dims_[1] || i < 0 || i >= dims_[2] || j < 0 || j >= dims_[3]) {
    throw Error(fmt::format("attention mask index ({}, {}, {}, {}) outside [{}, {}, {}, {}]", b, head, i, j,
                            dims_[0], dims_[1], dims_[2], dims_[3]));
  }
  data_[static_cast<size_t>(offset(b, head, i, j))] = value ? 1 : 0;
}

void AttentionMask::check_broadcastable(int64_t b, int64_t np, int64_t sq, int64_t sk, std::string_view name) const {
  const std::array<int64_t, 4> want = {b, np, sq, sk};
  for (int k = 0; k < 4; ++k) {
    if (dims_[k] != 1 && dims_[k] != want[k]) {
      throw Error(fmt::format("{} has shape [{}, {}, {}, {}], not broadcastable to the attention scores [b, np, sq, "
                              "sk] = [{}, {}, {}, {}]",
                              name, dims_[0], dims_[1], dims_[2], dims_[3], b, np, sq, sk));
    }
  }
}

AttentionMask operator|(const AttentionMask& a, const AttentionMask& c) {
  std::array<int64_t, 4> d{};
  for (int k = 0; k < 4; ++k) {
    if (a.dims_[k] != c.dims_[k] && a.dims_[k] != 1 && c.dims_[k] != 1) {
      throw Error(fmt::format("cannot combine attention masks of shapes [{}, {}, {}, {}] and [{}, {}, {}, {}]",
                              a.dims_[0], a.dims_[1], a.dims_[2], a.dims_[3], c.dims_[0], c.dims_[1], c.dims_[2],
                              c.dims_[3]));
    }
    d[k] = std::max(a.dims_[k], c.dims_[k]);
  }
  AttentionMask m(d[0], d[1], d[2], d[3]);
  for (int64_t e = 0; e < d[0]; ++e)
    for (int64_t h = 0; h < d[1]; ++h)
      for (int64_t i = 0; i < d[2]; ++i)
        for (int64_t j = 0; j < d[3]; ++j) m.set(e, h, i, j, a.masked(e, h, i, j) || c.masked(e, h, i, j));
  return m;
}

// ---------------------------------------------------------------------------
// Builders

AttentionMask get_default_causal_mask(int64_t sq) {
  AttentionMask m(1, 1, sq, sq);
  for (int64_t i = 0; i < sq; ++i)
    for (int64_t j = i + 1; j < sq; ++j) m.set(0, 0, i, j, true);
  return m;
}

AttentionMask padding_mask(std::span<const int64_t> q_lengths, std::span<const int64_t> kv_lengths, int64_t sq,
                           int64_t sk) {
  const int64_t b = static_cast<int64_t>(kv_lengths.size());
  if (b < 1) throw Error("padding_mask needs one key length per batch element (got none)");
  if (!q_lengths.empty() && static_cast<int64_t>(q_lengths.size()) != b) {
    throw Error(fmt::format("padding_mask got {} query lengths for {} key lengths", q_lengths.size(), b));
  }
  AttentionMask m(b, 1, sq, sk);
  for (int64_t e = 0; e < b; ++e) {
    const int64_t lk = kv_lengths[static_cast<size_t>(e)];
    const int64_t lq = q_lengths.empty() ? sq : q_lengths[static_cast<size_t>(e)];
    if (lk < 0 || lk > sk) throw Error(fmt::format("padding_mask: key length {} outside [0, {}]", lk, sk));
    if (lq < 0 || lq > sq) throw Error(fmt::format("padding_mask: query length {} outside [0, {}]", lq, sq));
    for (int64_t i = 0; i < sq; ++i)
      for (int64_t j = 0; j < sk; ++j) m.set(e, 0, i, j, i >= lq || j >= lk);
  }
  return m;
}

AttentionMask sliding_window_mask(int64_t sq, int64_t sk, std::array<int64_t, 2> window) {
  for (int k = 0; k < 2; ++k) {
    if (window[k] < -1) {
      throw Error(fmt::format("window_size ({}, {}): entries must be >= 0 or -1 (unbounded)", window[0], window[1]));
    }
  }
  // TE get_full_mask: -1 becomes a bound that can never bind (sk on the left,
  // sq on the right); the same as "unbounded" for every (i, j) of the matrix.
  const int64_t left = window[0] == -1 ? std::numeric_limits<int32_t>::max() : window[0];
  const int64_t right = window[1] == -1 ? std::numeric_limits<int32_t>::max() : window[1];
  AttentionMask m(1, 1, sq, sk);
  for (int64_t i = 0; i < sq; ++i) {
    const int64_t diag = i + (sk - sq);  // bottom-right alignment
    for (int64_t j = 0; j < sk; ++j) m.set(0, 0, i, j, j < diag - left || j > diag + right);
  }
  return m;
}

// ---------------------------------------------------------------------------
// attention_mask_func

void attention_mask_func(Mat& scores, const AttentionMask& mask, int64_t b, int64_t head, double fill) {
  for (Eigen::Index i = 0; i < scores.rows(); ++i)
    for (Eigen::Index j = 0; j < scores.cols(); ++j)
      if (mask.masked(b, head, i, j)) scores(i, j) = fill;
}

void attention_mask_func(Mat& scores, int64_t b, int64_t np, const AttentionMask& mask, double fill) {
  if (b < 1 || np < 1 || scores.rows() % (b * np) != 0) {
    throw Error(fmt::format("attention scores of {} rows are not [b = {}, np = {}, sq, sk]", scores.rows(), b, np));
  }
  const int64_t sq = scores.rows() / (b * np);
  const int64_t sk = scores.cols();
  mask.check_broadcastable(b, np, sq, sk, "attention_mask");
  for (int64_t e = 0; e < b; ++e)
    for (int64_t h = 0; h < np; ++h)
      for (int64_t i = 0; i < sq; ++i)
        for (int64_t j = 0; j < sk; ++j)
          if (mask.masked(e, h, i, j)) scores((e * np + h) * sq + i, j) = fill;
}

}  // namespace paritron::ref
