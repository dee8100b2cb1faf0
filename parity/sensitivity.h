// The conditioning term of the tolerance model (parity/tolerance.h).
//
// The reference emulating a dtype rounds what Megatron stores in that dtype
// (module outputs, parameters) but computes inside a kernel in float64. Real
// kernels compute inside in fp32, and where a function is ill-conditioned
// that fp32 rounding is amplified: a LayerNorm over 2 features with a
// variance near eps, a softmax over large logits, a deep block. Such errors
// are backward errors of size u_fp32 on the kernel's inputs, magnified by the
// condition number. The emulation cannot see them; the float64 truth of a
// perturbed case measures them: every weight and differentiable input
// multiplied by (1 + u r), r = +-1 drawn per element, and the change of each
// result is its sensitivity to relative perturbations of size u.
#pragma once

#include <cstdint>

#include "common/case_file.h"

namespace paritron::parity {

// The unit roundoff the sensitivity uses: fp32's (2^-24), the precision every
// optimized kernel computes in (also for bf16 / fp16 / fp8 runs).
double sensitivity_roundoff();

// A copy of `c` with every floating weight and input (not the output
// gradients inputs.grad_*, not the float32 RoPE table or boolean masks)
// stored as F64 and multiplied by (1 + relative * r), r = +-1 from Philox
// keyed by (seed, tensor name, element).
Case perturb_case(const Case& c, double relative, uint64_t seed);

}  // namespace paritron::parity
