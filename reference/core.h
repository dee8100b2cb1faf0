// The reference's shared vocabulary: Eigen matrices of tokens, parameters and
// gradients addressed by Megatron's state-dict keys, the precision being
// emulated, and the few primitives every component uses (rounding, GEMM,
// dropout). Included only by reference/ code and its tests: Eigen stays out of
// the headers the rest of the project includes (style.md, "Light headers");
// reference/run_case.h is the Eigen-free entry point.
//
// Layout. Megatron's activations are sequence-first [s, b, h]; the reference
// holds them as a row-major Mat of s*b rows (token t = i_s * b + i_b, the
// (s, b) row-major order of shared/spec/megatron-semantics.md §0) and h
// columns, which is the same memory as the [s, b, h] tensor. Per-head tensors
// [s, b, heads, hn] are Mats of s*b rows and heads*hn columns (head-major
// channels, channel j*hn + d). Linear weights are [out_features, in_features]
// as in PyTorch; 1-D parameters (biases, norm weights) are 1 x n Mats.
//
// Precision (the "Precision" section of issue #3, design.md principle 2):
// float64 is the truth. An emulated run executes the same code and rounds
// every tensor Megatron materialises in a low-precision dtype to that dtype
// (round-to-nearest-even), with GEMMs accumulated in float32 as the GPU
// kernels do. Element-wise and row-wise ops are evaluated in double and
// rounded once, i.e. as a correctly rounded kernel would write them; that is
// a lower bound on the error of real kernels, which is what the parity
// tolerance model (error <= k * emulated error + floor) needs.
#pragma once

#include <Eigen/Dense>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "common/dtype.h"
#include "common/rng.h"
#include "common/tensor.h"
#include "common/transformer_config.h"

namespace paritron::ref {

class Fp8Session;  // reference/linear.h: delayed fp8 scaling across steps

using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVec = Eigen::Matrix<double, 1, Eigen::Dynamic>;

// Tensors by dotted Megatron path ("self_attention.linear_qkv.weight").
using MatMap = std::map<std::string, Mat, std::less<>>;

// ---------------------------------------------------------------------------
// Parameters, gradients and intermediate taps, seen through a key prefix so a
// submodule addresses its own tensors by its local names ("linear_qkv.weight")
// while the map holds the parent's full keys ("self_attention.linear_qkv.weight").

class Params {
 public:
  explicit Params(const MatMap& map, std::string prefix = "") : map_(&map), prefix_(std::move(prefix)) {}
  Params sub(std::string_view module) const { return Params(*map_, prefix_ + std::string(module) + "."); }
  bool has(std::string_view key) const;
  // Throws Error naming the full key when it is missing.
  const Mat& at(std::string_view key) const;
  // A 1-D parameter (stored 1 x n) as a row vector; checks the length when n >= 0.
  RowVec row(std::string_view key, int64_t n = -1) const;
  // at(), checking the shape [rows, cols]; a clear Error otherwise.
  const Mat& at(std::string_view key, int64_t rows, int64_t cols) const;
  const std::string& prefix() const { return prefix_; }

 private:
  const MatMap* map_;
  std::string prefix_;
};

// Where gradients (accumulated) and taps (stored) go. A default-constructed
// Sink drops everything (no taps requested).
class Sink {
 public:
  Sink() = default;
  explicit Sink(MatMap& map, std::string prefix = "") : map_(&map), prefix_(std::move(prefix)) {}
  Sink sub(std::string_view module) const;
  bool active() const { return map_ != nullptr; }
  void put(std::string_view key, const Mat& value) const;       // replaces
  void add(std::string_view key, const Mat& gradient) const;    // accumulates (a parameter used twice)
  void add_row(std::string_view key, const RowVec& gradient) const { add(key, Mat(gradient)); }
  const std::string& prefix() const { return prefix_; }

 private:
  MatMap* map_ = nullptr;
  std::string prefix_;
};

// ---------------------------------------------------------------------------
// Precision.

struct Precision {
  DType dtype = DType::F64;          // params and activations: F64 (truth), F32, BF16, F16
  DType softmax_dtype = DType::F64;  // attention softmax computed in this dtype (spec §2.3)
  // fp8 (spec §12): the inputs of the linear layers' GEMMs are quantised with
  // Transformer Engine's delayed scaling. Set from cfg.fp8 ("e4m3"/"hybrid").
  std::optional<std::string> fp8;
  int64_t fp8_margin = 0;
  bool fp8_wgrad = true;
  // Delayed scaling across steps (amax histories, interval, most_recent/max):
  // when set, each linear's operands are cast with the scales of earlier
  // steps; when null, with the steady-state scale of the tensor's own amax.
  std::shared_ptr<Fp8Session> fp8_session;
  // Round where Megatron forces float32 even in a float64 model: the router's
  // softmax(..., dtype=torch.float32) (scores, aux-loss probabilities, the
  // sinkhorn activation). The truth keeps it, as Megatron run in float64
  // produces those values; finite-difference checks turn it off to get the
  // smooth float64 function (spec Appendix A).
  bool forced_fp32 = true;

  bool truth() const { return dtype == DType::F64 && !fp8; }
};

// Megatron in float64: no rounding except where Megatron forces float32.
Precision truth_precision();
// Pure float64 math, nothing rounded (finite differences, hand-computed values).
Precision float64_math();
// Megatron running in `dtype` under cfg: softmax in fp32 when the dtype is
// fp16/bf16 and attention_softmax_in_fp32 (the fp16/bf16 flags are implied by
// the dtype), else in the dtype itself; fp8 from cfg.fp8.
Precision emulated_precision(DType dtype, const TransformerConfig& cfg);

// x rounded to dtype (RNE, no saturation); identity for F64.
double round_to(double x, DType dtype);
void round_inplace(Mat& m, DType dtype);
Mat rounded(Mat m, DType dtype);

// a @ b as Megatron's GEMM in `dtype` produces it: F64 is plain double;
// otherwise the operands (values of the dtype already) are multiplied with
// float32 accumulation and the product is rounded to dtype. alpha scales the
// product inside the accumulation (torch.baddbmm's alpha) before rounding.
Mat matmul(const Mat& a, const Mat& b, DType dtype, double alpha = 1.0);

// ---------------------------------------------------------------------------
// How a component is run: mode, randomness and where it sits in the model.

struct RunContext {
  bool training = false;   // the module's training flag (dropout, sinkhorn)
  uint64_t seed = 0;       // the Philox seed for dropout masks and jitter
  std::string path;        // module path ("layers.0.self_attention"): names RNG draws
  int64_t layer_number = 1;  // 1-based, as the attention module receives it (spec §8.3)

  RunContext sub(std::string_view module) const;
  // The RNG key of a draw made by this module: rng_key(seed, "<purpose>.<path>").
  RngKey key(std::string_view purpose) const;
};

// Inverted dropout (torch.nn.functional.dropout) with Paritron's counter-based
// masks (spec §10.9): element i of the global tensor is kept iff
// math::uniform_float(key, i) >= p, and kept values are scaled by 1 / (1 - p).
// Identity unless training and p > 0. Returns the mask scale per element
// (0 or 1/(1-p)) in `scale` so backward can apply the same mask. Element
// (r, c) of x is global element first_index + r * x.cols() + c, so a module
// dropping one slice of a bigger global tensor (one head's probabilities)
// passes the slice's offset.
Mat dropout(const Mat& x, double p, const RunContext& ctx, std::string_view purpose, Mat* scale = nullptr,
            uint64_t first_index = 0);

// ---------------------------------------------------------------------------
// Tensor <-> Mat. Shapes are Megatron's; a Mat is the tensor viewed as
// [numel / cols, cols].

Mat to_mat(const Tensor& t, int64_t cols);
Mat to_mat(const Tensor& t);                   // cols = last dimension (a 0-d or 1-d tensor is one row)
Tensor to_tensor(const Mat& m, const Shape& shape, DType dtype = DType::F64);

}  // namespace paritron::ref
