// Backend: the kernel interface the optimized model is written against
// (design.md, principle 4; issue #5 "Shape"). The CPU backend (optimized/cpu/,
// OpenMP + OpenBLAS) and the CUDA backend (optimized/cuda/) implement it; the
// model in optimized/model/ calls only this.
//
// Conventions, shared by every op:
//   * Activations are Megatron's sequence-first tensors, held as rows of
//     tokens: [s, b, h] is s*b rows of h (token t = i_s * b + i_b). Per-head
//     tensors [s, b, heads, hn] are rows of heads*hn channels, head-major.
//   * Every op computes in fp32 (F64 tensors: in double) and writes each
//     output once, rounded to the output's dtype (RNE): what a GPU kernel
//     reading bf16, computing in fp32 and storing bf16 does.
//   * Outputs are preallocated by the caller (Backend::empty / zeros) with the
//     shapes stated; ops throw Error naming the op and the shapes on a
//     mismatch. "accumulate" means out += result (gradient accumulation into
//     fp32 main grads, as Megatron's gradient_accumulation_fusion).
//   * Row indices and other small routing metadata are host vectors: the
//     CPU-sized control flow of MoE dispatch. (The CUDA backend keeps device
//     copies; see issue #7.)
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/math/random.h"
#include "common/tensor.h"
#include "optimized/tensor.h"

namespace paritron::opt {

// The MLP activations (reference/activations.h names them; the math is
// optimized/math/activations.h).
enum class ActivationKind : uint8_t {
  kGelu,         // erf gelu (torch F.gelu)
  kSilu,
  kRelu,
  kSquaredRelu,
  kOpenaiGelu,
  kErfGelu,      // Megatron's 1.41421 constant
  kQuickGelu,
  kBiasGeluTanh  // fused_bias_gelu.py's tanh form and hand-written backward
};

// ---------------------------------------------------------------------------
// Attention (core attention: DotProductAttention's softmax(QK^T)V, computed
// flash-style: tiled, online softmax, no s x s matrix).
//
// q [sq, b, np, hn], k and v [sk, b, ng, hn] (np % ng == 0: query head j uses
// key/value group j / (np / ng), Megatron's repeat_interleave grouping),
// out [sq, b, np, hn], lse [b, np, sq] fp32 (log-sum-exp of the scaled,
// masked scores of each query row, saved for the backward).
//
// Masks are in global coordinates so that a shard (a CP rank's chunks, a TP
// rank's heads) evaluates exactly the mask of the whole tensor:
//   position(q row i) = q_positions[i] (global sequence index), likewise k;
//   empty spans mean 0..sq-1 / 0..sk-1.
//   causal: masked when k_pos > q_pos;
//   window (left, right): masked when k_pos < q_pos - left or k_pos > q_pos + right
//   (Megatron's sliding window; left/right < 0 mean unbounded);
//   explicit: mask[bi, head?, q_pos, k_pos] != 0 means masked, a [b or 1,
//   np_global or 1, Sq, Sk] byte array (torch broadcasting), head and batch
//   indices global (head_offset + local head, batch_offset + local sequence).
// Masked scores are set to `fill` (Megatron's -10000), not -inf: a fully
// masked row is uniform, as in Megatron's torch softmax path.
struct AttentionArgs {
  int64_t batch = 1, sq = 0, sk = 0;
  int64_t heads = 1;       // np on this rank
  int64_t groups = 1;      // ng on this rank
  int64_t head_dim = 0;    // hn
  float softmax_scale = 1.0f;  // applied to q.k before masking (Megatron: alpha * coeff)
  bool causal = false;
  std::array<int64_t, 2> window = {-1, -1};  // {-1, -1}: no sliding window
  std::span<const int64_t> q_positions, k_positions;
  const uint8_t* mask = nullptr;             // explicit mask, or nullptr
  std::array<int64_t, 4> mask_dims = {1, 1, 0, 0};  // [b, heads, Sq, Sk] of the explicit mask
  float fill = -10000.0f;
  // Dropout on the probabilities (training): element (bi, head_global, q_pos,
  // k_pos) of the global [b, np_global, Sq, Sk] tensor is kept iff
  // math::uniform_float(dropout_key, flat index) >= dropout_p, kept values scaled
  // by 1 / (1 - p) (reference/core.h dropout).
  double dropout_p = 0.0;  // double: keep iff float u >= p, compared exactly as the reference does
  math::RngKey dropout_key{};
  int64_t head_offset = 0;   // global index of this rank's first head
  int64_t batch_offset = 0;  // global index of this shard's first sequence (data parallel)
  int64_t heads_global = 0;  // np of the whole model (dropout indexing, explicit mask)
  int64_t sq_global = 0, sk_global = 0;  // Sq, Sk of the whole sequence
  // When the values' dtype is bf16/fp16: the probabilities fed to the PV
  // product are rounded to it (Megatron casts softmax output to the dtype).
  DType probs_dtype = DType::F32;
};

// ---------------------------------------------------------------------------
// Norms (megatron/core/fusions/fused_layer_norm.py, TENorm): y = norm(x) *
// gamma (+ beta), gamma = weight (+ 1 when zero-centered: apex rounds 1 + w to
// the parameter dtype, TE keeps it in fp32).
struct NormArgs {
  bool rms = false;            // RMSNorm; else LayerNorm
  double eps = 1e-5;
  bool zero_centered_gamma = false;
  bool te_kernel = false;      // TE (1 + w in fp32) vs apex (1 + w rounded to w's dtype)
};

// RoPE (megatron/core/models/common/embeddings/rotary_pos_embedding.py
// apply_rotary_pos_emb): x [s, b, heads, hn]; freqs [s, rot_dim] fp32 angles
// of the tokens' sequence positions (row i for x's sequence row i); the first
// rot_dim channels of each head rotate, the rest pass through.
struct RopeArgs {
  int64_t batch = 1, heads = 1, head_dim = 0, rot_dim = 0;
  bool interleaved = false;
};

// Bias + activation (+ GLU): x [T, f] (or [T, 2f] for GLU: the first half is
// activated, the second multiplies, Megatron's chunk(2)), bias [f or 2f].
// fused = false is Megatron's unfused path (bias_activation_fusion off):
// `x + bias` and, for GLU, act(first half) are tensors of the dtype, rounded
// before the next step; the fused kernels keep them in fp32.
struct ActivationArgs {
  ActivationKind kind = ActivationKind::kGelu;
  bool glu = false;
  bool fused = true;
};

// Bias-dropout-add (megatron/core/fusions/fused_bias_dropout.py):
// out = residual + dropout(x + bias, p). Dropout element (row, col) of the
// global [S*b, h] tensor: index = (row_offset + row) * h + col, row_offset
// the global token row of this shard's row 0 (rows of a CP/SP shard are not
// contiguous globally: then the caller passes row_positions, the global row
// of each local row).
struct DropoutArgs {
  double p = 0.0;  // double: keep iff float u >= p, compared exactly as the reference does
  math::RngKey key{};
  int64_t row_offset = 0;
  std::span<const int64_t> row_positions;  // overrides row_offset when not empty
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;

  // --- memory -------------------------------------------------------------
  virtual DTensor empty(DType dtype, Shape shape) = 0;
  virtual DTensor zeros(DType dtype, Shape shape) = 0;
  // A host tensor in the backend's memory, its values rounded to `dtype`.
  virtual DTensor upload(const Tensor& host, DType dtype) = 0;
  // The values as a host tensor of dtype t.dtype().
  virtual Tensor download(const DTensor& t) = 0;
  // dst = src (same numel), rounded to dst's dtype: also the cast.
  virtual void copy(const DTensor& src, DTensor& dst) = 0;
  // A block of columns: dst[:, dst_col + j] = src[:, src_col + j] for j < ncols,
  // both seen as 2-D [rows, cols] with equal rows (rounded to dst's dtype).
  // Splits Megatron's per-group fused QKV into q, k, v and merges gradients back.
  virtual void copy_cols(const DTensor& src, int64_t src_col, DTensor& dst, int64_t dst_col, int64_t ncols) = 0;
  virtual void fill(DTensor& t, double value) = 0;
  virtual void synchronize() = 0;

  // --- GEMM ---------------------------------------------------------------
  // c = alpha * op(a) @ op(b) + beta * c (+ bias broadcast over rows), with
  // a, b, c seen as 2-D [rows, cols]; op(x) = x^T when trans. Accumulates in
  // fp32 and writes c rounded to c's dtype. beta = 1 with an F32 c is the
  // fp32 gradient accumulation of wgrad.
  virtual void gemm(const DTensor& a, bool trans_a, const DTensor& b, bool trans_b, DTensor& c, float alpha = 1.0f,
                    float beta = 0.0f, const DTensor* bias = nullptr) = 0;
  // db (+)= column sums of dy [T, n]: the bias gradient.
  virtual void bias_grad(const DTensor& dy, DTensor& db, bool accumulate) = 0;

  // --- attention ----------------------------------------------------------
  virtual void attention_forward(const AttentionArgs& args, const DTensor& q, const DTensor& k, const DTensor& v,
                                 DTensor& out, DTensor& lse) = 0;
  // dq [sq,b,np,hn]; dk, dv [sk,b,ng,hn] (overwritten).
  virtual void attention_backward(const AttentionArgs& args, const DTensor& q, const DTensor& k, const DTensor& v,
                                  const DTensor& out, const DTensor& lse, const DTensor& dout, DTensor& dq,
                                  DTensor& dk, DTensor& dv) = 0;

  // --- norms ----------------------------------------------------------------
  // x, y [T, h]; gamma, beta [h] (beta undefined for RMSNorm); rstd [T] fp32
  // (and mean [T] fp32 for LayerNorm) saved for the backward.
  virtual void norm_forward(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor* beta,
                            DTensor& y, DTensor& mean, DTensor& rstd) = 0;
  // dx overwritten; dgamma, dbeta accumulated (fp32 main grads).
  virtual void norm_backward(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor& mean,
                             const DTensor& rstd, const DTensor& dy, DTensor& dx, DTensor& dgamma,
                             DTensor* dbeta) = 0;

  // --- RoPE -------------------------------------------------------------------
  // y = rotate(x, freqs); backward = true applies the transpose (rotation by
  // -angle) to a gradient. y may alias x.
  virtual void rope(const RopeArgs& args, const DTensor& x, const DTensor& freqs, DTensor& y, bool backward) = 0;

  // --- MLP activation -----------------------------------------------------
  // y [T, f] = act(x + bias) (GLU: act(a + ba) * (g + bg)); bias may be null.
  virtual void bias_act_forward(const ActivationArgs& args, const DTensor& x, const DTensor* bias, DTensor& y) = 0;
  // dx [T, f or 2f] = gradient w.r.t. (x + bias), from dy [T, f].
  virtual void bias_act_backward(const ActivationArgs& args, const DTensor& x, const DTensor* bias,
                                 const DTensor& dy, DTensor& dx) = 0;

  // --- bias-dropout-add ---------------------------------------------------
  // out = residual + dropout(x + bias); bias [h] may be null; residual may be
  // null (then out = dropout(x + bias)).
  virtual void bias_dropout_add(const DropoutArgs& args, const DTensor& x, const DTensor* bias,
                                const DTensor* residual, DTensor& out) = 0;
  // dx = dropout mask applied to dout (regenerated from the key): the
  // gradient w.r.t. x (and, summed over rows, the bias).
  virtual void dropout_backward(const DropoutArgs& args, const DTensor& dout, DTensor& dx) = 0;

  // --- element-wise and reductions ---------------------------------------
  // out = a * alpha + b * beta (any of them may alias).
  virtual void axpby(float alpha, const DTensor& a, float beta, const DTensor& b, DTensor& out) = 0;
  virtual double sum(const DTensor& t) = 0;

  // --- fp8 (Transformer Engine delayed scaling, emulated; spec §12.3) -----
  // The math is common/math/fp8.h (single source with the reference).
  // amax: max |x| over the tensor with NaN elements ignored and every element
  // first rounded to fp32 (TE's fmaxf reduction in fp32; fp8_amax_step);
  // 0 for an empty tensor. The value is an fp32 number.
  virtual double amax(const DTensor& t) = 0;
  // out = q * (1 / scale) with q = fp8(RNE(float(x) * scale)), saturating to
  // the format's max (E4M3, or E5M2 when e5m2): TE's scaled cast followed by
  // the value an fp8 GEMM consumes. 1 / scale is one fp32 division (TE's
  // scale_inv); q * scale_inv is formed exactly and rounded once to out's
  // dtype, so an F32 out holds TE's cast_from_fp8 value (fp8_dequantise) and
  // an F64 out the exact product (fp8_dequantise_exact), the two values
  // reference/linear.cpp feeds its fp32 / float64 GEMMs. x and out have the
  // same numel and may alias.
  virtual void fp8_fake_quant(const DTensor& x, bool e5m2, float scale, DTensor& out) = 0;

  // --- MoE token routing ------------------------------------------------------
  // out[i] = x[rows[i]] (rows of the token-major x), out [rows.size(), h].
  virtual void gather_rows(const DTensor& x, std::span<const int64_t> rows, DTensor& out) = 0;
  // out[rows[i]] += weights[i] * y[i] (weights empty: 1). The unpermute/combine.
  virtual void scatter_add_rows(const DTensor& y, std::span<const int64_t> rows, std::span<const float> weights,
                                DTensor& out) = 0;
  // Row-wise softmax in fp32 of x [T, n] into y (router scores).
  virtual void softmax_rows(const DTensor& x, DTensor& y) = 0;
};

// The backend by name: "cpu" (always), "cuda" (when built with CUDA and a
// GPU is present). Throws Error naming the backends available otherwise.
std::unique_ptr<Backend> make_backend(std::string_view name);

}  // namespace paritron::opt
