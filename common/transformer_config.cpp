// check_config: Megatron-core's TransformerConfig validation, in Megatron's order.
//
// Sections, in the order issues are reported:
//   A. ModelParallelConfig.__post_init__ (core_v0.5.0, rules MPC 1-4; spec §1.1)
//   B. TransformerConfig.__post_init__ (core_v0.5.0, rules TC 2-15; spec §1.3), with
//      the newer-version derivations placed where core_v0.19.0 makes them
//   C. checks Megatron makes elsewhere (layers, router, parallel_state; spec §1.3
//      "Checks that Megatron performs elsewhere", §10.7)
//   D. newer-version fields Paritron models (core_v0.19.0 __post_init__ rules)
//   E. Paritron's own rules: what no Megatron module could build or run
// Every check is guarded so that an invalid value can never make a later
// check divide by zero or overflow: check_config reports, it never throws.
#include "common/transformer_config.h"

#include <cmath>
#include <limits>
#include <utility>

#include <fmt/format.h>

namespace paritron {

bool is_known_activation(std::string_view name) {
  for (std::string_view known : kActivationNames) {
    if (known == name) return true;
  }
  return false;
}

namespace {

// ---- value formatting for ConfigIssue::value (JSON-like, as the user wrote it) ----
std::string show(int64_t v) { return std::to_string(v); }
std::string show(double v) { return fmt::format("{}", v); }
std::string show(bool v) { return v ? "true" : "false"; }
// fmt rather than "\"" + s + "\"": GCC 12 reports a false -Wrestrict on the latter at -O3.
std::string show(const std::string& v) { return fmt::format("\"{}\"", v); }
std::string show(DType v) {
  return fmt::format("\"{}\"", torch_dtype_name(v).empty() ? dtype_name(v) : torch_dtype_name(v));
}
template <class T>
std::string show(const std::optional<T>& v) {
  return v ? show(*v) : std::string("null");
}
std::string show(const std::optional<std::array<int64_t, 2>>& v) {
  return v ? fmt::format("[{}, {}]", (*v)[0], (*v)[1]) : std::string("null");
}

// Python's `a // b` (floor division), which Megatron derives kv_channels with. Empty where
// Python would raise (b == 0) or int64 would overflow (INT64_MIN // -1).
std::optional<int64_t> floor_div(int64_t a, int64_t b) {
  if (b == 0 || (b == -1 && a == std::numeric_limits<int64_t>::min())) return std::nullopt;
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

bool finite(double v) { return std::isfinite(v); }

class Issues {
 public:
  void add(std::string field, std::string value, std::string rule) {
    list_.push_back({std::move(field), std::move(value), std::move(rule)});
  }
  std::vector<ConfigIssue> take() { return std::move(list_); }

 private:
  std::vector<ConfigIssue> list_;
};

template <class Range>
std::string one_of(const Range& allowed) {
  std::string out = "must be one of ";
  bool first = true;
  for (std::string_view a : allowed) {
    if (!first) out += ", ";
    out += fmt::format("\"{}\"", a);
    first = false;
  }
  return out;
}

std::string one_of(std::initializer_list<std::string_view> allowed) {
  return one_of<std::initializer_list<std::string_view>>(allowed);
}

bool in(std::string_view v, std::initializer_list<std::string_view> allowed) {
  for (std::string_view a : allowed) {
    if (a == v) return true;
  }
  return false;
}

// A parallel size usable as a divisor (Paritron rule E1 reports the others).
bool usable(int64_t size) { return size >= 1; }

bool is_paritron_float(DType d) {
  return d == DType::F64 || d == DType::F32 || d == DType::F16 || d == DType::BF16;
}

// ---------------------------------------------------------------------------
// A. ModelParallelConfig.__post_init__, core_v0.5.0, in order.
// ---------------------------------------------------------------------------
void model_parallel_post_init(TransformerConfig& c, Issues& out) {
  // MPC 1: "Can not use sequence parallelism without tensor parallelism". (Megatron also
  // forces async_tensor_model_parallel_allreduce to False here; that field has no numeric
  // effect and is ignored by Paritron.)
  if (c.sequence_parallel && c.tensor_model_parallel_size <= 1) {
    out.add("sequence_parallel", show(true),
            fmt::format("requires tensor_model_parallel_size > 1 (is {}): can not use sequence "
                        "parallelism without tensor parallelism",
                        c.tensor_model_parallel_size));
  }
  // MPC 2: "When using pipeline parallelism, pipeline_dtype must be specified".
  if (c.pipeline_model_parallel_size > 1 && !c.pipeline_dtype) {
    out.add("pipeline_dtype", show(c.pipeline_dtype),
            fmt::format("must be specified when pipeline_model_parallel_size ({}) > 1",
                        c.pipeline_model_parallel_size));
  }
  // MPC 3: autocast_dtype defaults to params_dtype.
  if (!c.autocast_dtype) c.autocast_dtype = c.params_dtype;
  // MPC 4: "When using expert parallelism and tensor parallelism, sequence parallelism must
  // be used" (newer versions only warn; 0.5.0 raises).
  if (c.expert_model_parallel_size > 1 && c.tensor_model_parallel_size > 1 && !c.sequence_parallel) {
    out.add("sequence_parallel", show(false),
            fmt::format("must be true when expert_model_parallel_size ({}) > 1 and "
                        "tensor_model_parallel_size ({}) > 1",
                        c.expert_model_parallel_size, c.tensor_model_parallel_size));
  }
}

// TC 11: the activation-recomputation block, only when recompute_granularity is set.
void recompute_rules(TransformerConfig& c, Issues& out) {
  const std::string& granularity = *c.recompute_granularity;
  if (!in(granularity, {"full", "selective"})) {
    out.add("recompute_granularity", show(c.recompute_granularity), one_of({"full", "selective"}));
  }
  if (c.recompute_method) {
    if (!in(*c.recompute_method, {"block", "uniform"})) {
      out.add("recompute_method", show(c.recompute_method), one_of({"block", "uniform"}));
    }
  } else if (granularity != "selective") {
    out.add("recompute_method", show(c.recompute_method),
            fmt::format("must be \"block\" or \"uniform\" when recompute_granularity is \"{}\"",
                        granularity));
  }
  if (granularity != "selective" && !c.recompute_num_layers) {
    std::string per_rank = usable(c.pipeline_model_parallel_size)
                               ? std::to_string(c.num_layers / c.pipeline_model_parallel_size)
                               : std::string("?");
    out.add("recompute_num_layers", show(c.recompute_num_layers),
            fmt::format("must be between 1 and num_layers_per_pipeline_rank ({}) when "
                        "recompute_granularity is \"{}\"",
                        per_rank, granularity));
  } else if (granularity == "selective" && c.recompute_num_layers) {
    out.add("recompute_num_layers", show(c.recompute_num_layers),
            "must be None when recompute_granularity is \"selective\"");
  }
  if (c.distribute_saved_activations.value_or(false) && c.sequence_parallel) {
    out.add("distribute_saved_activations", show(true),
            "must be false when sequence_parallel is enabled");
  }
  // 0.5.0 checks num_layers % vp only here, inside the recompute branch; section C checks the
  // stronger (num_layers / pp) % vp for every config.
  if (c.virtual_pipeline_model_parallel_size && usable(*c.virtual_pipeline_model_parallel_size) &&
      c.num_layers % *c.virtual_pipeline_model_parallel_size != 0) {
    out.add("num_layers", show(c.num_layers),
            fmt::format("must be divisible by virtual_pipeline_model_parallel_size ({})",
                        *c.virtual_pipeline_model_parallel_size));
  }
}

// ---------------------------------------------------------------------------
// B. TransformerConfig.__post_init__, core_v0.5.0, in order (spec §1.3).
// ---------------------------------------------------------------------------
void transformer_post_init(TransformerConfig& c, Issues& out) {
  const int64_t tp = c.tensor_model_parallel_size;

  // TC 2.
  if (c.fp16 && c.bf16) {
    out.add("bf16", show(true), "only one of fp16 and bf16 may be true (fp16 is true)");
  }
  // TC 3.
  if (usable(tp) && c.num_attention_heads % tp != 0) {
    out.add("num_attention_heads", show(c.num_attention_heads),
            fmt::format("must be a multiple of tensor_model_parallel_size ({})", tp));
  }
  // TC 4: ffn_hidden_size = 4 * hidden_size.
  if (!c.ffn_hidden_size) {
    if (c.hidden_size > std::numeric_limits<int64_t>::max() / 4 ||
        c.hidden_size < std::numeric_limits<int64_t>::min() / 4) {
      // Paritron: Python has big integers; int64 does not.
      out.add("hidden_size", show(c.hidden_size), "is too large: 4 * hidden_size overflows int64");
    } else {
      c.ffn_hidden_size = 4 * c.hidden_size;
    }
  }
  // TC 5: kv_channels = hidden_size // num_attention_heads (Python floor division). With
  // num_attention_heads == 0 Megatron dies with ZeroDivisionError; Paritron leaves it unset
  // and rule E1 reports num_attention_heads.
  if (!c.kv_channels) c.kv_channels = floor_div(c.hidden_size, c.num_attention_heads);
  // TC 6: num_query_groups = num_attention_heads, then groups % tp. (Newer versions also
  // accept tp % groups == 0, replicating KV heads; 0.5.0 does not.)
  if (!c.num_query_groups) c.num_query_groups = c.num_attention_heads;
  if (usable(tp) && *c.num_query_groups % tp != 0) {
    out.add("num_query_groups", show(c.num_query_groups),
            fmt::format("must be a multiple of tensor_model_parallel_size ({})", tp));
  }
  // TC 7: query-key layer scaling forces the fp32 softmax (spec §2, §3).
  if (c.apply_query_key_layer_scaling) c.attention_softmax_in_fp32 = true;
  // TC 8.
  if (c.expert_model_parallel_size > 1 && !c.num_moe_experts) {
    out.add("num_moe_experts", show(c.num_moe_experts),
            fmt::format("must be set to use expert parallelism (expert_model_parallel_size = {})",
                        c.expert_model_parallel_size));
  }
  if (c.num_moe_experts && *c.num_moe_experts <= 0) {
    out.add("num_moe_experts", show(c.num_moe_experts), "must be positive");
  }
  // Newer (0.10+; core_v0.19.0 makes it right after the num_moe_experts checks):
  // moe_ffn_hidden_size defaults to ffn_hidden_size for MoE; setting it without experts is
  // an error (the mixed dense/MoE exception needs moe_layer_freq, which Paritron only
  // accepts at its all-MoE default).
  if (c.num_moe_experts && !c.moe_ffn_hidden_size) c.moe_ffn_hidden_size = c.ffn_hidden_size;
  if (!c.num_moe_experts && c.moe_ffn_hidden_size) {
    out.add("moe_ffn_hidden_size", show(c.moe_ffn_hidden_size),
            "is set but num_moe_experts is None: set num_moe_experts or remove moe_ffn_hidden_size");
  }
  // Newer (0.7+), same place in core_v0.19.0: capacity factor. A negative factor means
  // "dropless" and is reset to None; a factor only works with the aux-loss family or none.
  if (c.moe_expert_capacity_factor) {
    if (*c.moe_expert_capacity_factor < 0) c.moe_expert_capacity_factor.reset();
    if (c.moe_expert_capacity_factor && c.moe_router_load_balancing_type == "sinkhorn") {
      out.add("moe_expert_capacity_factor", show(c.moe_expert_capacity_factor),
              "only works with aux_loss or none load balancing (moe_router_load_balancing_type "
              "is \"sinkhorn\")");
    }
  }
  if (c.moe_pad_expert_input_to_capacity && !c.moe_expert_capacity_factor) {
    out.add("moe_pad_expert_input_to_capacity", show(true),
            "requires moe_expert_capacity_factor to be set");
  }
  // TC 9. The default cpu_offloading_num_layers = 0 makes this reject num_layers = 0 (spec
  // §14 #45). Newer versions check it only when cpu_offloading is on; 0.5.0 always does.
  if (c.cpu_offloading_num_layers < 0 || c.cpu_offloading_num_layers >= c.num_layers) {
    out.add("cpu_offloading_num_layers", show(c.cpu_offloading_num_layers),
            fmt::format("must be >= 0 and less than num_layers ({}): CPU offloading can be done "
                        "only for layers less than num_layers",
                        c.num_layers));
  }
  // TC 10.
  if (c.cpu_offloading && c.pipeline_model_parallel_size > 1) {
    out.add("cpu_offloading", show(true),
            fmt::format("is not supported with pipeline parallelism (pipeline_model_parallel_size "
                        "= {})",
                        c.pipeline_model_parallel_size));
  }
  if (c.cpu_offloading && c.recompute_granularity) {
    out.add("cpu_offloading", show(true),
            fmt::format("does not work with activation recomputation (recompute_granularity = {})",
                        show(c.recompute_granularity)));
  }
  // TC 11.
  if (c.recompute_granularity) recompute_rules(c, out);
  // TC 12: repeated in 0.5.0; idempotent.
  if (c.apply_query_key_layer_scaling) c.attention_softmax_in_fp32 = true;
  // TC 13: the fused bias-activation kernels exist for gelu (tanh form) and swiglu only.
  // (Newer versions add quick_gelu with GLU and exempt gated gelu from the bias rule; 0.5.0
  // is the primary version.)
  if (c.bias_activation_fusion) {
    if (!in(c.activation_func, {"gelu", "silu"})) {
      out.add("activation_func", show(c.activation_func),
              "must be \"gelu\" or \"silu\" when bias_activation_fusion is true");
    }
    if (c.activation_func == "gelu" && !c.add_bias_linear) {
      out.add("add_bias_linear", show(false),
              "must be true when bias_activation_fusion is true and activation_func is \"gelu\"");
    }
  }
  // TC 14.
  if (c.apply_rope_fusion && c.rotary_interleaved) {
    out.add("apply_rope_fusion", show(true), "does not work with rotary_interleaved");
  }
  // TC 15: init_method / output_layer_init_method default to N(0, init_method_std) and
  // N(0, init_method_std / sqrt(2 num_layers)). Paritron keeps None for "Megatron's default"
  // (output_layer_init_std() gives the std); a given name is recorded as is.

  // Newer (0.11+): expert bias for aux-loss-free routing needs sigmoid scores.
  if (c.moe_router_enable_expert_bias && c.moe_router_score_function != "sigmoid") {
    out.add("moe_router_enable_expert_bias", show(true),
            fmt::format("requires moe_router_score_function \"sigmoid\" (is {})",
                        show(c.moe_router_score_function)));
  }
  // Newer (0.10+): "Bias in Moe is only supported when ETP==1". Applied only when
  // expert_tensor_parallel_size is given: left None, experts are sharded by TP as in 0.5.0,
  // which supports expert biases under TP.
  if (c.num_moe_experts && c.add_bias_linear && c.expert_tensor_parallel_size &&
      *c.expert_tensor_parallel_size != 1) {
    out.add("expert_tensor_parallel_size", show(c.expert_tensor_parallel_size),
            "must be 1 when num_moe_experts is set and add_bias_linear is true (bias in MoE is "
            "only supported when ETP == 1)");
  }
  // NOT applied: core_v0.19.0's "moe_router_topk == 1 with softmax scoring needs
  // moe_router_pre_softmax" (top-1 then softmax gives a constant score 1 and no router
  // gradient). 0.5.0 accepts top-1 aux_loss routing (spec §14 #31) and the golden fixtures
  // use it.
}

// ---------------------------------------------------------------------------
// C. Checks Megatron makes elsewhere (spec §1.3, §10.7).
// ---------------------------------------------------------------------------
void elsewhere_rules(TransformerConfig& c, Issues& out) {
  const int64_t tp = c.tensor_model_parallel_size;
  const int64_t pp = c.pipeline_model_parallel_size;
  const int64_t ep = c.expert_model_parallel_size;

  // ColumnParallelLinear.output_size_per_partition = divide(output, tp) and
  // RowParallelLinear.input_size_per_partition = divide(input, tp) (tensor_parallel/layers.py):
  // linear_fc1 (output f, or 2f with GLU, whose halves must split evenly too) and linear_fc2
  // (input f). kv_channels * num_attention_heads and kv_channels * num_query_groups (the
  // projection sizes of linear_qkv / linear_proj) divide by tp whenever TC 3 and TC 6 hold,
  // so they need no separate issue. hidden_size is never split by TP (input of the column-
  // parallel and output of the row-parallel linears), so Megatron does not require
  // hidden_size % tp == 0 and neither does Paritron.
  if (usable(tp) && c.ffn_hidden_size && *c.ffn_hidden_size % tp != 0) {
    out.add("ffn_hidden_size", show(c.ffn_hidden_size),
            fmt::format("must be a multiple of tensor_model_parallel_size ({})", tp));
  }
  // Experts: experts.py divides the expert fc1/fc2 sizes by the (expert) TP size.
  if (c.num_moe_experts && c.moe_ffn_hidden_size && c.moe_ffn_hidden_size != c.ffn_hidden_size) {
    int64_t etp = c.expert_tensor_parallel_size.value_or(tp);
    if (usable(etp) && *c.moe_ffn_hidden_size % etp != 0) {
      out.add("moe_ffn_hidden_size", show(c.moe_ffn_hidden_size),
              fmt::format("must be a multiple of the expert tensor parallel size ({})", etp));
    }
  }
  // get_num_layers_to_build: num_layers // pp per stage; extra layers would be silently dropped.
  if (usable(pp) && c.num_layers % pp != 0) {
    out.add("num_layers", show(c.num_layers),
            fmt::format("must be divisible by pipeline_model_parallel_size ({})", pp));
  }
  if (c.virtual_pipeline_model_parallel_size) {
    const int64_t vp = *c.virtual_pipeline_model_parallel_size;
    // parallel_state.initialize_model_parallel, core_v0.5.0: "pipeline-model-parallel size
    // should be greater than 2 with interleaved schedule" (newer versions accept pp == 2).
    if (pp <= 2) {
      out.add("virtual_pipeline_model_parallel_size", show(c.virtual_pipeline_model_parallel_size),
              fmt::format("requires pipeline_model_parallel_size > 2 (is {}) with the interleaved "
                          "schedule (Megatron-core 0.5.0; newer versions accept 2)",
                          pp));
    }
    // Each stage's num_layers / pp layers are cut into vp chunks (spec §10.8).
    if (usable(pp) && usable(vp) && c.num_layers % pp == 0 && (c.num_layers / pp) % vp != 0) {
      out.add("num_layers", show(c.num_layers),
              fmt::format("num_layers / pipeline_model_parallel_size ({}) must be divisible by "
                          "virtual_pipeline_model_parallel_size ({})",
                          c.num_layers / pp, vp));
    }
  }
  // parallel_state 0.5.0: "combination of expert model parallelism and context parallelism
  // is not supported" (newer versions allow it).
  if (ep > 1 && c.context_parallel_size > 1) {
    out.add("expert_model_parallel_size", show(ep),
            fmt::format("cannot be combined with context_parallel_size ({}) > 1", c.context_parallel_size));
  }
  // context_parallel_size > 1 and window_size: DotProductAttention (local spec) asserts
  // cp == 1 and window_size is None; TEDotProductAttention supports both. Both are accepted
  // here: the config is valid for the TE spec; a component that cannot honour them reports
  // the case as unsupported.

  // MoE layer (only built when num_moe_experts is set).
  if (c.num_moe_experts && *c.num_moe_experts > 0) {
    const int64_t experts = *c.num_moe_experts;
    // moe_layer.py: assert num_moe_experts % expert_parallel_size == 0.
    if (usable(ep) && experts % ep != 0) {
      out.add("num_moe_experts", show(experts),
              fmt::format("must be a multiple of expert_model_parallel_size ({})", ep));
    }
    // experts.py GroupedMLP: "bias in the expert layer is not supported in Grouped GEMM yet".
    if (c.moe_grouped_gemm && c.add_bias_linear) {
      out.add("add_bias_linear", show(true), "must be false when moe_grouped_gemm is true");
    }
    // router.py TopKRouter: assert moe_token_dropping is False (0.5.0 is dropless; newer
    // versions drop tokens through moe_expert_capacity_factor instead).
    if (c.moe_token_dropping) {
      out.add("moe_token_dropping", show(true),
              "is not supported (Megatron-core 0.5.0 routing is dropless; use "
              "moe_expert_capacity_factor)");
    }
    // router.py sinkhorn_load_balancing: "Sinkhorn routing does not support aux loss".
    if (c.moe_router_load_balancing_type == "sinkhorn" && c.moe_aux_loss_coeff != 0) {
      out.add("moe_aux_loss_coeff", show(c.moe_aux_loss_coeff),
              "must be 0 with sinkhorn load balancing (sinkhorn routing does not support aux loss)");
    }
    // router.py: torch.topk(logits, k) needs k <= E.
    if (c.moe_router_topk > experts) {
      out.add("moe_router_topk", show(c.moe_router_topk),
              fmt::format("must be <= num_moe_experts ({})", experts));
    }
  }
  // mlp.py MLP.forward (0.5.0): with bias_activation_fusion, silu is fused only as swiglu:
  // "Only support fusion of gelu and swiglu".
  if (c.bias_activation_fusion && c.activation_func == "silu" && !c.gated_linear_unit) {
    out.add("gated_linear_unit", show(false),
            "must be true when bias_activation_fusion is true and activation_func is \"silu\" "
            "(only gelu and swiglu are fused)");
  }
}

// ---------------------------------------------------------------------------
// D. Newer-version fields Paritron models: their enumerations and what Paritron does not
// model of them (core_v0.19.0 Literal types).
// ---------------------------------------------------------------------------
void newer_field_rules(TransformerConfig& c, Issues& out) {
  if (c.moe_router_score_function == "sqrtsoftplus") {
    out.add("moe_router_score_function", show(c.moe_router_score_function),
            "changes numerics and is not modelled by paritron (supported: \"softmax\", \"sigmoid\")");
  } else if (!in(c.moe_router_score_function, {"softmax", "sigmoid"})) {
    out.add("moe_router_score_function", show(c.moe_router_score_function),
            one_of({"softmax", "sigmoid"}));
  }
  if (c.moe_router_dtype && !in(*c.moe_router_dtype, {"fp32", "fp64"})) {
    out.add("moe_router_dtype", show(c.moe_router_dtype), one_of({"fp32", "fp64"}) + " or null");
  }
  if (!in(c.moe_token_drop_policy, {"probs", "position"})) {
    out.add("moe_token_drop_policy", show(c.moe_token_drop_policy), one_of({"probs", "position"}));
  }
  if (c.expert_tensor_parallel_size) {
    const int64_t etp = *c.expert_tensor_parallel_size;
    if (etp < 1) {
      out.add("expert_tensor_parallel_size", show(etp), "must be >= 1");
    } else if (etp != c.tensor_model_parallel_size) {
      out.add("expert_tensor_parallel_size", show(etp),
              fmt::format("differs from tensor_model_parallel_size ({}): a separate expert tensor "
                          "parallel size changes numerics and is not modelled by paritron",
                          c.tensor_model_parallel_size));
    }
  }
  if (c.fp8_recipe && !in(*c.fp8_recipe, {"tensorwise", "delayed", "mxfp8", "blockwise", "custom"})) {
    out.add("fp8_recipe", show(c.fp8_recipe),
            one_of({"tensorwise", "delayed", "mxfp8", "blockwise", "custom"}));
  } else if (c.fp8 && c.fp8_recipe != "delayed") {
    // Only delayed scaling (the 0.5.0 recipe, spec §12) is emulated.
    out.add("fp8_recipe", show(c.fp8_recipe),
            "changes numerics and is not modelled by paritron (only \"delayed\" with fp8)");
  }
}

// ---------------------------------------------------------------------------
// E. Paritron's own rules: values no Megatron module could build or run.
// ---------------------------------------------------------------------------
void paritron_rules(TransformerConfig& c, Issues& out) {
  auto at_least_one = [&](const char* field, int64_t v) {
    if (v < 1) out.add(field, show(v), "must be >= 1");
  };
  // E1: sizes and parallel sizes.
  at_least_one("num_layers", c.num_layers);
  at_least_one("hidden_size", c.hidden_size);
  at_least_one("num_attention_heads", c.num_attention_heads);
  if (c.kv_channels && *c.kv_channels < 1) {
    out.add("kv_channels", show(c.kv_channels),
            c.num_attention_heads > 0 && c.hidden_size > 0
                ? fmt::format("must be >= 1 (hidden_size // num_attention_heads = {} // {} = {}; set "
                              "kv_channels explicitly)",
                              c.hidden_size, c.num_attention_heads, *c.kv_channels)
                : std::string("must be >= 1"));
  }
  if (c.ffn_hidden_size) at_least_one("ffn_hidden_size", *c.ffn_hidden_size);
  if (c.num_query_groups) at_least_one("num_query_groups", *c.num_query_groups);
  at_least_one("tensor_model_parallel_size", c.tensor_model_parallel_size);
  at_least_one("context_parallel_size", c.context_parallel_size);
  at_least_one("pipeline_model_parallel_size", c.pipeline_model_parallel_size);
  at_least_one("expert_model_parallel_size", c.expert_model_parallel_size);
  if (c.virtual_pipeline_model_parallel_size) {
    at_least_one("virtual_pipeline_model_parallel_size", *c.virtual_pipeline_model_parallel_size);
  }
  // E2: whole query groups of heads (Megatron only fails later in divide(np, ng); spec §1.3).
  if (c.num_query_groups && *c.num_query_groups >= 1 && c.num_attention_heads >= 1 &&
      c.num_attention_heads % *c.num_query_groups != 0) {
    out.add("num_attention_heads", show(c.num_attention_heads),
            fmt::format("must be a multiple of num_query_groups ({})", *c.num_query_groups));
  }
  // E3: enumerations and names.
  if (!in(c.normalization, {"LayerNorm", "RMSNorm"})) {
    out.add("normalization", show(c.normalization), one_of({"LayerNorm", "RMSNorm"}));
  }
  if (!is_known_activation(c.activation_func)) {
    out.add("activation_func", show(c.activation_func),
            one_of(kActivationNames) + " (the activations paritron implements)");
  }
  if (!in(c.moe_router_load_balancing_type, {"aux_loss", "sinkhorn", "none"})) {
    out.add("moe_router_load_balancing_type", show(c.moe_router_load_balancing_type),
            one_of({"aux_loss", "sinkhorn", "none"}));
  }
  if (c.fp8 && !in(*c.fp8, {"e4m3", "hybrid"})) {
    out.add("fp8", show(c.fp8), one_of({"e4m3", "hybrid"}) + " or null");
  }
  if (!in(c.fp8_amax_compute_algo, {"most_recent", "max"})) {
    out.add("fp8_amax_compute_algo", show(c.fp8_amax_compute_algo), one_of({"most_recent", "max"}));
  }
  // E4: dtypes Paritron computes in.
  auto float_dtype = [&](const char* field, const std::optional<DType>& d) {
    if (d && !is_paritron_float(*d)) {
      out.add(field, show(d), "must be one of \"float64\", \"float32\", \"float16\", \"bfloat16\"");
    }
  };
  float_dtype("params_dtype", c.params_dtype);
  float_dtype("pipeline_dtype", c.pipeline_dtype);
  float_dtype("autocast_dtype", c.autocast_dtype);
  // E5: probabilities, epsilons, scales.
  auto probability = [&](const char* field, double p) {
    if (!(p >= 0 && p < 1)) out.add(field, show(p), "must be in [0, 1)");
  };
  probability("hidden_dropout", c.hidden_dropout);
  probability("attention_dropout", c.attention_dropout);
  if (!(finite(c.layernorm_epsilon) && c.layernorm_epsilon >= 0)) {
    out.add("layernorm_epsilon", show(c.layernorm_epsilon), "must be finite and >= 0");
  }
  if (!(finite(c.init_method_std) && c.init_method_std >= 0)) {
    out.add("init_method_std", show(c.init_method_std), "must be finite and >= 0");
  }
  auto positive_if_set = [&](const char* field, const std::optional<double>& v) {
    if (v && !(finite(*v) && *v > 0)) out.add(field, show(v), "must be finite and > 0 if set");
  };
  positive_if_set("softmax_scale", c.softmax_scale);
  positive_if_set("seq_len_interpolation_factor", c.seq_len_interpolation_factor);
  // E6: RoPE (spec §5 gotchas): an odd or zero rotary dim makes the angle table ill-formed.
  if (!(c.rotary_percent > 0 && c.rotary_percent <= 1)) {
    out.add("rotary_percent", show(c.rotary_percent), "must be in (0, 1]");
  } else if (c.kv_channels && *c.kv_channels >= 1) {
    const int64_t dim = rotary_dim(c);
    if (dim <= 0 || dim % 2 != 0) {
      out.add("rotary_percent", show(c.rotary_percent),
              fmt::format("int(kv_channels * rotary_percent) = int({} * {}) = {} must be even and > 0",
                          *c.kv_channels, c.rotary_percent, dim));
    }
  }
  if (!(finite(c.rotary_base) && c.rotary_base > 0)) {
    out.add("rotary_base", show(c.rotary_base), "must be finite and > 0");
  }
  if (c.window_size && ((*c.window_size)[0] < -1 || (*c.window_size)[1] < -1)) {
    out.add("window_size", show(c.window_size), "entries must be >= -1 (-1 = infinite window)");
  }
  // E7: fp8 bookkeeping.
  if (c.fp8_amax_history_len < 1) {
    out.add("fp8_amax_history_len", show(c.fp8_amax_history_len), "must be >= 1");
  }
  if (c.fp8_interval < 1) out.add("fp8_interval", show(c.fp8_interval), "must be >= 1");
  // E8: recompute: Megatron's uniform method loops in steps of recompute_num_layers.
  if (c.recompute_num_layers && *c.recompute_num_layers < 1) {
    out.add("recompute_num_layers", show(c.recompute_num_layers), "must be >= 1 if set");
  }
  // E9: MoE.
  if (c.moe_router_topk < 1) out.add("moe_router_topk", show(c.moe_router_topk), "must be >= 1");
  if (c.moe_ffn_hidden_size && *c.moe_ffn_hidden_size < 1) {
    out.add("moe_ffn_hidden_size", show(c.moe_ffn_hidden_size), "must be >= 1");
  }
  if (!finite(c.moe_aux_loss_coeff)) {
    out.add("moe_aux_loss_coeff", show(c.moe_aux_loss_coeff), "must be finite");
  }
  if (c.moe_z_loss_coeff && !finite(*c.moe_z_loss_coeff)) {
    out.add("moe_z_loss_coeff", show(c.moe_z_loss_coeff), "must be finite if set");
  }
  if (c.moe_input_jitter_eps && !(finite(*c.moe_input_jitter_eps) && *c.moe_input_jitter_eps >= 0)) {
    out.add("moe_input_jitter_eps", show(c.moe_input_jitter_eps), "must be finite and >= 0 if set");
  }
  if (c.moe_expert_capacity_factor && !finite(*c.moe_expert_capacity_factor)) {
    out.add("moe_expert_capacity_factor", show(c.moe_expert_capacity_factor), "must be finite if set");
  }
  if (c.moe_router_topk_scaling_factor && !finite(*c.moe_router_topk_scaling_factor)) {
    out.add("moe_router_topk_scaling_factor", show(c.moe_router_topk_scaling_factor),
            "must be finite if set");
  }
}

}  // namespace

std::vector<ConfigIssue> check_config(TransformerConfig& cfg) {
  Issues out;
  model_parallel_post_init(cfg, out);
  transformer_post_init(cfg, out);
  elsewhere_rules(cfg, out);
  newer_field_rules(cfg, out);
  paritron_rules(cfg, out);
  return out.take();
}

void validate_config(TransformerConfig& cfg) {
  std::vector<ConfigIssue> issues = check_config(cfg);
  if (!issues.empty()) throw ConfigError(std::move(issues));
}

double output_layer_init_std(const TransformerConfig& cfg) {
  // megatron/core/utils.py scaled_init_method_normal: sigma / math.sqrt(2.0 * num_layers).
  return cfg.init_method_std / std::sqrt(2.0 * static_cast<double>(cfg.num_layers));
}

int64_t rotary_dim(const TransformerConfig& cfg) {
  const int64_t kv = cfg.kv_channels.value_or(0);
  // RotaryEmbedding.__init__: dim = kv_channels; if rotary_percent < 1.0:
  // dim = int(dim * rotary_percent) (a Python float product, truncated toward zero).
  if (cfg.rotary_percent < 1.0 && cfg.rotary_percent > 0) {
    return static_cast<int64_t>(static_cast<double>(kv) * cfg.rotary_percent);
  }
  return kv;
}

}  // namespace paritron
