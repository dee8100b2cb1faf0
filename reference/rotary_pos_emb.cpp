// See rotary_pos_emb.h: RotaryEmbedding's float32 angle table and
// apply_rotary_pos_emb_bshd, forward and backward (spec §5, §14 #11-#13).
#include "reference/rotary_pos_emb.h"

#include <cmath>
#include <fmt/format.h>

#include "common/error.h"

namespace paritron::ref {

namespace {

// The per-position cos_ / sin_ tensors of apply_rotary_pos_emb_bshd:
// torch.cos(freqs) in the freqs dtype, then .to(t.dtype).
struct CosSin {
  Mat cos, sin;  // [s, rot_dim]
};

CosSin cos_sin(const Mat& freqs, DType freqs_dtype, DType dtype) {
  CosSin cs{Mat(freqs.rows(), freqs.cols()), Mat(freqs.rows(), freqs.cols())};
  for (Eigen::Index i = 0; i < freqs.size(); ++i) {
    const double angle = round_to(freqs.data()[i], freqs_dtype);  // the value the freqs tensor holds
    cs.cos.data()[i] = round_to(round_to(std::cos(angle), freqs_dtype), dtype);
    cs.sin.data()[i] = round_to(round_to(std::sin(angle), freqs_dtype), dtype);
  }
  return cs;
}

// Checks t [s*b, heads*hn] against freqs [s, rot_dim]; returns hn.
int64_t check_shapes(std::string_view what, const Mat& t, int64_t b, int64_t heads, const Mat& freqs) {
  if (b <= 0 || heads <= 0) {
    throw Error(fmt::format("{}: batch size ({}) and heads ({}) must be positive", what, b, heads));
  }
  if (t.rows() % b != 0 || t.cols() % heads != 0) {
    throw Error(fmt::format("{}: t is [{}, {}], not [s*b, heads*hn] with b = {} and heads = {}", what, t.rows(),
                            t.cols(), b, heads));
  }
  const int64_t s = t.rows() / b;
  const int64_t hn = t.cols() / heads;
  const int64_t rot_dim = freqs.cols();
  if (freqs.rows() != s) {
    throw Error(fmt::format("{}: freqs has {} positions but t has s = {}", what, freqs.rows(), s));
  }
  if (rot_dim <= 0 || rot_dim % 2 != 0 || rot_dim > hn) {
    throw Error(fmt::format("{}: freqs width (rot_dim) {} must be even, positive and <= the head width {}", what,
                            rot_dim, hn));
  }
  return hn;
}

// rotate_half on one head's first rot_dim channels, as the index of the
// source channel and its sign: rotate_half(x)[c] = sign * x[source].
//   non-interleaved: [x1 | x2] -> [-x2 | x1]
//   interleaved:     (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])
struct Partner {
  int64_t source;
  double sign;
};
Partner rotate_half_partner(int64_t c, int64_t rot_dim, bool interleaved) {
  if (interleaved) return c % 2 == 0 ? Partner{c + 1, -1.0} : Partner{c - 1, 1.0};
  const int64_t m = rot_dim / 2;
  return c < m ? Partner{c + m, -1.0} : Partner{c - m, 1.0};
}

}  // namespace

std::vector<float> rotary_inv_freq(const TransformerConfig& cfg) {
  if (!cfg.kv_channels) throw Error("rotary_pos_emb: kv_channels is not set (validate the config first)");
  const int64_t dim = rotary_dim(cfg);
  if (dim <= 0 || dim % 2 != 0) {
    throw Error(fmt::format("rotary_pos_emb: the rotary dim int(kv_channels * rotary_percent) = {} must be even and "
                            "positive",
                            dim));
  }
  // 1.0 / (rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)): each op in float32.
  const float base = static_cast<float>(cfg.rotary_base);
  std::vector<float> inv_freq(static_cast<size_t>(dim / 2));
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    const float power = std::pow(base, exponent);  // the float overload: powf
    inv_freq[static_cast<size_t>(i)] = 1.0f / power;
  }
  return inv_freq;
}

Mat rotary_freqs(const TransformerConfig& cfg, int64_t seq_len, int64_t offset) {
  if (seq_len < 0) throw Error(fmt::format("rotary_pos_emb: sequence length {} is negative", seq_len));
  const std::vector<float> inv_freq = rotary_inv_freq(cfg);
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  // seq *= 1 / factor: Python's double reciprocal, applied as a float32 multiply.
  const std::optional<float> position_scale =
      cfg.seq_len_interpolation_factor ? std::optional<float>(static_cast<float>(1.0 / *cfg.seq_len_interpolation_factor))
                                       : std::nullopt;
  Mat emb(seq_len, 2 * half);
  for (int64_t i = 0; i < seq_len; ++i) {
    float pos = static_cast<float>(i) + static_cast<float>(offset);  // arange(float32) + offset
    if (position_scale) pos = pos * *position_scale;
    for (int64_t j = 0; j < half; ++j) {
      const double angle = static_cast<double>(pos * inv_freq[static_cast<size_t>(j)]);  // torch.outer, float32
      if (cfg.rotary_interleaved) {
        emb(i, 2 * j) = angle;  // stack((f, f), -1).view: [f0, f0, f1, f1, ...]
        emb(i, 2 * j + 1) = angle;
      } else {
        emb(i, j) = angle;  // cat((f, f), -1): [f0 .. f_{m-1}, f0 .. f_{m-1}]
        emb(i, half + j) = angle;
      }
    }
  }
  return emb;
}

Mat apply_rotary_pos_emb_forward(const Mat& t, int64_t b, int64_t heads, const Mat& freqs, bool rotary_interleaved,
                                 const Precision& p, DType freqs_dtype) {
  const int64_t hn = check_shapes("apply_rotary_pos_emb", t, b, heads, freqs);
  const int64_t rot_dim = freqs.cols();
  const CosSin cs = cos_sin(freqs, freqs_dtype, p.dtype);
  Mat out = t;  // t_pass (channels >= rot_dim of each head) is copied through
  for (Eigen::Index r = 0; r < t.rows(); ++r) {
    const Eigen::Index pos = r / b;  // row r is token (i_s, i_b) = (r / b, r % b)
    for (int64_t head = 0; head < heads; ++head) {
      const int64_t base = head * hn;
      for (int64_t c = 0; c < rot_dim; ++c) {
        const Partner q = rotate_half_partner(c, rot_dim, rotary_interleaved);
        // (t * cos_) + (_rotate_half(t) * sin_): two products and a sum, each a tensor of t.dtype.
        const double a = round_to(t(r, base + c) * cs.cos(pos, c), p.dtype);
        const double bterm = round_to(q.sign * t(r, base + q.source) * cs.sin(pos, c), p.dtype);
        out(r, base + c) = round_to(a + bterm, p.dtype);
      }
    }
  }
  return out;
}

Mat apply_rotary_pos_emb_backward(const Mat& dy, int64_t b, int64_t heads, const Mat& freqs, bool rotary_interleaved,
                                  const Precision& p, DType freqs_dtype) {
  const int64_t hn = check_shapes("apply_rotary_pos_emb backward", dy, b, heads, freqs);
  const int64_t rot_dim = freqs.cols();
  const CosSin cs = cos_sin(freqs, freqs_dtype, p.dtype);
  Mat dt = dy;  // the pass-through channels get dy unchanged
  for (Eigen::Index r = 0; r < dy.rows(); ++r) {
    const Eigen::Index pos = r / b;
    for (int64_t head = 0; head < heads; ++head) {
      const int64_t base = head * hn;
      for (int64_t c = 0; c < rot_dim; ++c) {
        // Autograd: the t * cos_ branch gives g * cos_; the rotate_half branch
        // gives (g * sin_) sent back through rotate_half's transpose. Channel c
        // feeds rotate_half(t)[k] for the k whose partner is c, with the same
        // sign; that k is c's own partner (the pairing is an involution).
        const Partner q = rotate_half_partner(c, rot_dim, rotary_interleaved);
        const int64_t k = q.source;
        const double sign_k = rotate_half_partner(k, rot_dim, rotary_interleaved).sign;
        const double from_cos = round_to(dy(r, base + c) * cs.cos(pos, c), p.dtype);
        const double from_sin = sign_k * round_to(dy(r, base + k) * cs.sin(pos, k), p.dtype);
        dt(r, base + c) = round_to(from_cos + from_sin, p.dtype);
      }
    }
  }
  return dt;
}

Mat apply_rotary_pos_emb_forward(const Mat& t, int64_t b, int64_t heads, const Mat& freqs, bool rotary_interleaved,
                                 const Precision& p) {
  return apply_rotary_pos_emb_forward(t, b, heads, freqs, rotary_interleaved, p, DType::F32);
}

Mat apply_rotary_pos_emb_backward(const Mat& dy, int64_t b, int64_t heads, const Mat& freqs, bool rotary_interleaved,
                                  const Precision& p) {
  return apply_rotary_pos_emb_backward(dy, b, heads, freqs, rotary_interleaved, p, DType::F32);
}

}  // namespace paritron::ref
