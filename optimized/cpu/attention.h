// Flash-style core attention on the CPU (the CPU backend's
// attention_forward/backward; semantics in optimized/backend.h,
// AttentionArgs): tiled over query and key blocks with an online softmax, so
// memory is O(s) — no s x s score matrix — and OpenMP over (batch, head,
// query tile). GQA reads the shared key/value group in place (no copies).
//
// Pointers are fp32 arrays of the layouts of AttentionArgs: q/out
// [sq, b, np, hn], k/v [sk, b, ng, hn], lse [b, np, sq]. Values are written
// in fp32; the caller rounds outputs to their dtype.
#pragma once

#include "optimized/backend.h"

namespace paritron::opt::cpu {

void attention_forward(const AttentionArgs& args, const float* q, const float* k, const float* v, float* out,
                       float* lse);
// dq [sq,b,np,hn]; dk, dv [sk,b,ng,hn]; all overwritten.
void attention_backward(const AttentionArgs& args, const float* q, const float* k, const float* v, const float* out,
                        const float* lse, const float* dout, float* dq, float* dk, float* dv);

}  // namespace paritron::opt::cpu
