// Rotary position embedding: RotaryEmbedding (the angle table) and
// apply_rotary_pos_emb (the rotation of q and k), forward and backward.
//
// Megatron: megatron/core/models/common/embeddings/rotary_pos_embedding.py
// (RotaryEmbedding.__init__/forward, _rotate_half, apply_rotary_pos_emb_bshd).
// Spec §5: inv_freq[i] = 1 / base^(2i/dim) in float32, angles = outer(pos, inv_freq)
// in float32 (pos scaled by the float32 reciprocal of
// seq_len_interpolation_factor), emb = cat(f, f) or repeat-each (interleaved);
// t_rot' = t_rot cos + rotate_half(t_rot) sin on the first rot_dim channels of
// each head, the rest pass through; cos/sin of the float32 angles rounded to
// the activation dtype.
//
// Float32 angle table: every step mirrors torch's float32 op, so the table is
// bit-identical to Megatron's: arange (exact), exponent = float(2i) / float(dim)
// (float32 division), base ** exponent = std::pow(float(base), exponent)
// (float32 pow), inv_freq = 1.0f / that, positions float(i) + float(offset),
// times float(1.0 / factor) (Python computes 1/factor in double; torch
// multiplies the float32 tensor by it in float32), angle = pos * inv_freq
// (float32 product). The float32 angles are used in every precision, float64
// runs included (Megatron's inv_freq is a float32 attribute, not a buffer that
// .double() would convert). Caveat: this is torch's CPU arithmetic. On CUDA
// (where 0.5.0 builds inv_freq) `tensor / python_scalar` runs as a multiply by
// the float32 reciprocal, float(2i) * float(1/dim), which differs from the
// division by an ulp for some i when dim is not a power of two (e.g. dim 80,
// 96, 112; never for 64, 128, 256).
//
// cos/sin (spec §5.2 step 2): torch.cos(freqs) in the freqs dtype (float32),
// then .to(t.dtype): the reference takes the correctly rounded float32 cos/sin
// of the float32 angle — in float64 runs too, since Megatron's are float32 —
// and rounds that to p.dtype. (torch's float32 cos/sin may differ from the
// correctly rounded one by an ulp on some elements.)
// The rotation itself is eager torch: t * cos_, rotate_half(t) * sin_ and their
// sum are three tensors of the activation dtype, each rounded to p.dtype;
// backward (autograd) likewise rounds g * cos_, g * sin_ and their sum:
//   dt_rot = g cos - rotate_half(g sin)   (the rotation by -theta), dt_pass = g.
// Left out: the thd (packed sequence) form, context-parallel slicing of the
// table, the Apex fused kernel (apply_rope_fusion: same math, one rounding),
// and newer versions' rope_scaling / mscale / MLA interleaving (not in
// Paritron's config).
#pragma once

#include <vector>

#include "reference/core.h"

namespace paritron::ref {

// RotaryEmbedding.inv_freq: 1 / rotary_base^(2i / dim), i < dim / 2, dim =
// rotary_dim(cfg), as float32. Throws Error when kv_channels is unset or dim
// is odd or not positive (a validated config has neither).
std::vector<float> rotary_inv_freq(const TransformerConfig& cfg);

// RotaryEmbedding(kv_channels, rotary_percent, rotary_interleaved,
// seq_len_interpolation_factor, rotary_base).forward(seq_len, offset): the
// angle table [seq_len, rot_dim] (Megatron's [S, 1, 1, rot_dim]), every value
// a float32 number.
Mat rotary_freqs(const TransformerConfig& cfg, int64_t seq_len, int64_t offset = 0);

// apply_rotary_pos_emb(t, freqs) for t [s, b, heads, hn] held as a Mat of s*b
// rows and heads*hn columns; freqs [s, rot_dim] (rot_dim <= hn).
Mat apply_rotary_pos_emb_forward(const Mat& t, int64_t b, int64_t heads, const Mat& freqs, bool rotary_interleaved,
                                 const Precision& p);
// The gradient with respect to t (the rotation is linear in t; freqs get no gradient).
Mat apply_rotary_pos_emb_backward(const Mat& dy, int64_t b, int64_t heads, const Mat& freqs, bool rotary_interleaved,
                                  const Precision& p);

// The same with the dtype freqs is held in (cos/sin are evaluated in it before
// the cast to the activation dtype); the overloads above use float32, which is
// what RotaryEmbedding produces.
Mat apply_rotary_pos_emb_forward(const Mat& t, int64_t b, int64_t heads, const Mat& freqs, bool rotary_interleaved,
                                 const Precision& p, DType freqs_dtype);
Mat apply_rotary_pos_emb_backward(const Mat& dy, int64_t b, int64_t heads, const Mat& freqs, bool rotary_interleaved,
                                  const Precision& p, DType freqs_dtype);

}  // namespace paritron::ref
