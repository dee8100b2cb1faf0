// What every optimized module works with: the rank's place in the parallel
// layout (groups in Megatron's order), the backend and comm, the rank's
// parameter shards with their fp32 gradient accumulators, and where the
// current micro-batch's tokens sit in the global [s, b] grid.
//
// Megatron: megatron/core/parallel_state.py (groups), tensor_parallel/
// layers.py (a rank holds its TP shard; gradients accumulate in fp32
// main_grad with gradient_accumulation_fusion), distributed/
// distributed_data_parallel.py (grads all-reduced over the data-parallel
// group, with context parallel the dp x cp group; expert grads over the
// data-modulo-expert group); shared/spec/megatron-semantics.md §10.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/case_file.h"
#include "common/math/random.h"
#include "common/module_params.h"
#include "common/parallel_config.h"
#include "common/transformer_config.h"
#include "optimized/backend.h"
#include "optimized/comm/comm.h"

namespace paritron::opt {

struct ParallelState {
  ParallelConfig pc;
  int64_t rank = 0;
  RankCoordinates coord;
  Group world, tp, cp, dp, dp_cp, pp, ep, edp;
};
ParallelState make_parallel_state(const ParallelConfig& pc, int64_t rank);

// A parameter shard and its gradient. How its gradient is reduced after the
// backward (on top of the data-parallel all-reduce every parameter gets):
enum class GradReduce : uint8_t {
  kNone,                // TP-sharded, or computed from all tokens on every TP rank
  kTensorIfSequence,    // replicated over TP but fed SP-local tokens (norms, row-parallel bias, router): all-reduce over TP under SP
};
struct Param {
  std::string name;  // the case's tensor name ("weights.<key>", the TE spelling when the case used it)
  DTensor value;  // the local shard, in the run's dtype
  DTensor grad;   // fp32 (F64 for float64 runs) main grad, accumulated over micro-batches
  GradReduce reduce = GradReduce::kNone;
  bool expert = false;  // an expert's parameter: DP reduction over the data-modulo-expert group
  TpShard shard;        // which part of the global tensor this is (axis -1: all of it)
  Shape global_shape;
  bool used = false;    // a gradient was produced (parameters of identity submodules are not)
};

// Where a micro-batch's tokens sit globally. Rows of a local [s_loc, b_loc, h]
// tensor are (sequence row i, batch j) -> global token (seq[i], batch_offset + j).
struct TokenLayout {
  int64_t s_global = 0, b_global = 0;
  int64_t b_local = 0, batch_offset = 0;
  std::vector<int64_t> seq;     // global positions of the CP-local sequence rows (attention's view)
  int64_t sp_begin = 0, sp_count = 0;  // this TP rank's rows of `seq` under sequence parallel (else all of them)

  int64_t attention_rows() const { return static_cast<int64_t>(seq.size()) * b_local; }
  int64_t hidden_rows() const { return sp_count * b_local; }
  // Global token row (s * b_global + b) of each local hidden row (the SP slice).
  std::vector<int64_t> hidden_token_rows() const;
  std::vector<int64_t> sp_positions() const;  // seq[sp_begin .. sp_begin + sp_count)
};

// The global sequence positions CP rank r holds: Megatron's load balancing
// for causal attention splits the sequence into 2*cp chunks and gives rank r
// chunks r and 2*cp - 1 - r (get_batch_on_this_cp_rank), in that order.
std::vector<int64_t> context_parallel_positions(int64_t s, int64_t cp, int64_t cp_rank);

// The forward arguments every layer receives.
struct LayerArgs {
  std::string attn_mask_type = "causal";     // causal | padding | no_mask
  std::optional<Tensor> attention_mask;      // [b|1, np|1, S, S] bool, global coordinates
  std::optional<Tensor> rotary_pos_emb;      // [S, 1, 1, rot] fp32 angles of every position
  // Cross attention (encoder-decoder layers, a cross_attention case): the
  // encoder output [Sk, B, h] whole (each layer takes its micro-batch's
  // sequences and, under sequence parallel, its TP rank's rows), the mask
  // [b|1, np|1, S, Sk] and its type (CrossAttention's default: padding), and
  // where each layer's gradient of its context rows goes.
  std::optional<Tensor> context;
  std::optional<Tensor> context_mask;
  std::string cross_attn_mask_type = "padding";
  std::function<void(const TokenLayout& context_tokens, const DTensor& d_context)> context_grad;
};

class ModelContext {
 public:
  ModelContext(Backend& backend, Comm& comm, ParallelState state, TransformerConfig cfg, DType dtype);

  Backend& be;
  Comm& comm;
  ParallelState ps;
  TransformerConfig cfg;
  DType dtype;           // params and activations
  DType grad_dtype;      // main grads: F32, or F64 for float64 runs
  bool training = false;
  uint64_t seed = 0;
  // Linears run their GEMM inputs in fp8 when cfg.fp8 is set and this is
  // true. MoE experts clear it: 0.5.0 builds them from the local spec's
  // ColumnParallel/RowParallelLinear, which never run in fp8 (reference/
  // moe_layer.cpp expert_precision).
  bool fp8_linears = true;

  // Parameters by the case's key (global names, local shards).
  std::map<std::string, Param> params;
  Param& param(const std::string& key);             // throws Error naming a missing key
  bool has_param(const std::string& key) const { return params.count(key) > 0; }
  const DTensor* param_or_null(const std::string& key);  // the value, or nullptr when absent

  int64_t tp() const { return ps.pc.tensor_model_parallel_size; }
  bool sequence_parallel() const { return ps.pc.sequence_parallel; }
  // rng_key(seed, "<purpose>.<path>") as reference/core.h's RunContext::key.
  math::RngKey key(const std::string& purpose, const std::string& path) const;

  DTensor empty(Shape shape) { return be.empty(dtype, std::move(shape)); }
  DTensor empty_f32(Shape shape) { return be.empty(grad_dtype == DType::F64 ? DType::F64 : DType::F32, std::move(shape)); }
};

}  // namespace paritron::opt
