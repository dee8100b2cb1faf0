// The CPU backend: OpenMP over rows for the fused element-wise / row-wise
// kernels (their math is the single-source optimized/math/*.h), OpenBLAS for
// the GEMMs, the flash-style attention of optimized/cpu/attention.h.
// Storage: every floating tensor is F32 holding values already rounded to its
// dtype, F64 tensors are F64 (computed in double); see optimized/tensor.h.
// Semantics of every op: optimized/backend.h.
#pragma once

#include "optimized/backend.h"

namespace paritron::opt::cpu {

class CpuBackend final : public Backend {
 public:
  std::string_view name() const override { return "cpu"; }

  DTensor empty(DType dtype, Shape shape) override;
  DTensor zeros(DType dtype, Shape shape) override;
  DTensor upload(const Tensor& host, DType dtype) override;
  Tensor download(const DTensor& t) override;
  void copy(const DTensor& src, DTensor& dst) override;
  void copy_cols(const DTensor& src, int64_t src_col, DTensor& dst, int64_t dst_col, int64_t ncols) override;
  void fill(DTensor& t, double value) override;
  void synchronize() override {}

  void gemm(const DTensor& a, bool trans_a, const DTensor& b, bool trans_b, DTensor& c, float alpha = 1.0f,
            float beta = 0.0f, const DTensor* bias = nullptr) override;
  void bias_grad(const DTensor& dy, DTensor& db, bool accumulate) override;

  void attention_forward(const AttentionArgs& args, const DTensor& q, const DTensor& k, const DTensor& v,
                         DTensor& out, DTensor& lse) override;
  void attention_backward(const AttentionArgs& args, const DTensor& q, const DTensor& k, const DTensor& v,
                          const DTensor& out, const DTensor& lse, const DTensor& dout, DTensor& dq, DTensor& dk,
                          DTensor& dv) override;

  void norm_forward(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor* beta, DTensor& y,
                    DTensor& mean, DTensor& rstd) override;
  void norm_backward(const NormArgs& args, const DTensor& x, const DTensor& gamma, const DTensor& mean,
                     const DTensor& rstd, const DTensor& dy, DTensor& dx, DTensor& dgamma, DTensor* dbeta) override;

  void rope(const RopeArgs& args, const DTensor& x, const DTensor& freqs, DTensor& y, bool backward) override;

  void bias_act_forward(const ActivationArgs& args, const DTensor& x, const DTensor* bias, DTensor& y) override;
  void bias_act_backward(const ActivationArgs& args, const DTensor& x, const DTensor* bias, const DTensor& dy,
                         DTensor& dx) override;

  void bias_dropout_add(const DropoutArgs& args, const DTensor& x, const DTensor* bias, const DTensor* residual,
                        DTensor& out) override;
  void dropout_backward(const DropoutArgs& args, const DTensor& dout, DTensor& dx) override;

  void axpby(float alpha, const DTensor& a, float beta, const DTensor& b, DTensor& out) override;
  double sum(const DTensor& t) override;
  double amax(const DTensor& t) override;
  void fp8_fake_quant(const DTensor& x, bool e5m2, float scale, DTensor& out) override;

  void gather_rows(const DTensor& x, std::span<const int64_t> rows, DTensor& out) override;
  void scatter_add_rows(const DTensor& y, std::span<const int64_t> rows, std::span<const float> weights,
                        DTensor& out) override;
  void softmax_rows(const DTensor& x, DTensor& y) override;
};

}  // namespace paritron::opt::cpu
