// Writing case files with the reference (`paritron case make`): weights and
// inputs drawn from the counter-based RNG for a component and a config,
// outputs (and gradients) computed by the float64 reference. These are the
// cases `paritron check` replays, the seeds of regression tests, and the form
// in which the parity harness saves a failure. Eigen-free header.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "common/case_file.h"
#include "common/transformer_config.h"

namespace paritron::ref {

struct MakeCaseOptions {
  std::string component;            // a case-format component
  TransformerConfig config;         // validated by make_case
  uint64_t seed = 0;
  int64_t seq_length = 8;           // s (query length)
  int64_t kv_seq_length = 0;        // sk for cross attention / context (0: = s)
  int64_t micro_batch_size = 2;     // b
  // causal | padding | no_mask; empty: the module's default (padding for
  // cross_attention, causal for the GPT specs' self attention).
  std::string attn_mask_type;
  // Padding masks: key lengths drawn per sequence in [0, sk] with one
  // sequence fully masked when b > 1 (so fully masked rows are exercised).
  bool explicit_mask = false;       // also pass the causal mask as inputs.attention_mask
  bool rotary = false;              // pass inputs.rotary_pos_emb (self attention, layer, block)
  bool cross_attention = false;     // layer/block: add cross-attention submodules and inputs.context
  bool training = false;
  bool backward = true;             // inputs.grad_output (+ grad_output_bias) and grads.*
  bool taps = true;                 // outputs.intermediate.* for the modules that record them
  // "random": every parameter N(0, init_method_std), norm weights 1 + N(0, 0.1),
  // biases included, so a misplaced bias shows; "megatron": Megatron's init
  // (biases 0, norm weights 1, common/init.h).
  std::string weights = "random";
  DType dtype = DType::F64;         // dtype the tensors are stored in
  int64_t layer_number = 1;
  // Exact mode (parity/exact.h): every weight, input and grad_output (the
  // rotary angle table excepted: it is RotaryEmbedding's, not drawn) is a
  // small dyadic value i * 2^-dyadic_shift with i uniform in
  // [-dyadic_range, dyadic_range]; norm weights are centre + i * 2^-dyadic_shift
  // (centre 1, or 0 with zero-centered gamma), the padding-mask lengths as
  // usual. Products of two such values are multiples of 2^-2*shift, so a GEMM
  // of reduction length n and its bias stay exact in fp32 while
  // n * range^2 + range * 2^shift < 2^24 (parity/exact.cpp computes the bound
  // of every tensor of an MLP forward and backward). Overrides `weights`.
  // The outputs are still the float64 reference's.
  bool dyadic = false;
  int64_t dyadic_range = 2;         // |i| <= range, range in [1, 64]
  int64_t dyadic_shift = 2;         // values are i * 2^-shift, shift in [0, 8]
};

// Throws ConfigError / Error with a clear message for a config the component
// cannot run with, an unknown component or an option out of range.
Case make_case(const MakeCaseOptions& options);

}  // namespace paritron::ref
