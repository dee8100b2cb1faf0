#include "parity/expected.h"

#include <fmt/format.h>

#include <algorithm>

#include "common/error.h"

namespace paritron::parity {
namespace {

bool is_token_tensor(const std::string& name, const Tensor& t, int64_t S, int64_t B) {
  return (name == "outputs.output" || name == "outputs.output_bias" || name == "grads.inputs.hidden_states" ||
          name.rfind("inputs.", 0) == 0) &&
         t.dim() >= 2 && t.shape()[0] == S && t.shape()[1] == B;
}

// Sequences [b0, b0 + n) of an [S, B, ...] tensor.
Tensor batch_slice(const Tensor& t, int64_t b0, int64_t n) {
  Shape shape = t.shape();
  const int64_t S = shape[0], B = shape[1];
  const size_t row = t.nbytes() / static_cast<size_t>(S * B);
  shape[1] = n;
  Tensor out(t.dtype(), shape);
  for (int64_t s = 0; s < S; ++s) {
    std::copy_n(t.bytes().data() + (s * B + b0) * row, n * row, out.bytes().data() + s * n * row);
  }
  return out;
}

Case case_slice(const Case& c, int64_t b0, int64_t n) {
  Case sub = c;
  const Shape& x = c.tensors.at("inputs.hidden_states").shape();
  for (auto& [name, t] : sub.tensors) {
    if (name.rfind("inputs.", 0) == 0 && is_token_tensor(name, t, x[0], x[1])) t = batch_slice(t, b0, n);
    if (name == "inputs.attention_mask" && t.dim() == 4 && t.shape()[0] == x[1]) {
      Tensor m(t.dtype(), {n, t.shape()[1], t.shape()[2], t.shape()[3]});
      const size_t per = t.nbytes() / static_cast<size_t>(x[1]);
      std::copy_n(t.bytes().data() + b0 * per, n * per, m.bytes().data());
      t = std::move(m);
    }
  }
  return sub;
}

void add_into(Tensor& total, const Tensor& part) {
  for (int64_t i = 0; i < total.numel(); ++i) total.set(i, total.get(i) + part.get(i));
}

}  // namespace

bool token_coupled(const Case& c) {
  const TransformerConfig& cfg = c.config;
  if (!cfg.num_moe_experts) return false;
  if (c.component != "moe_layer" && c.component != "moe_router" && c.component != "transformer_layer" &&
      c.component != "transformer_block") {
    return false;
  }
  return cfg.moe_aux_loss_coeff > 0 || cfg.moe_z_loss_coeff.has_value() || cfg.moe_input_jitter_eps.has_value() ||
         cfg.moe_expert_capacity_factor.has_value() || cfg.moe_router_load_balancing_type == "sinkhorn";
}

ref::ReferenceResult expected_for_layout(const Case& c, const ParallelConfig& pc, int64_t micro_batches,
                                         const ref::ReferenceOptions& options) {
  const int64_t dp = pc.data_parallel_size * micro_batches;  // token groups along the batch
  const bool splits_sequences = pc.context_parallel_size > 1 || (pc.sequence_parallel && pc.tensor_model_parallel_size > 1);
  if (!token_coupled(c) || (dp == 1 && !splits_sequences)) return ref::run_reference(c, options);
  if (c.tensors.at("inputs.hidden_states").shape()[1] % dp != 0) {
    throw Error(fmt::format("{} data-parallel ranks x {} micro-batches do not divide the batch", pc.data_parallel_size,
                            micro_batches));
  }
  if (splits_sequences) {
    throw Error(fmt::format("{} on {}: the MoE router's capacity / aux loss / z-loss / jitter are computed per "
                            "rank's tokens, and context or sequence parallelism cuts sequences into token "
                            "groups the reference cannot run alone; use a layout without cp/sp, or a dropless "
                            "router without losses",
                            c.component, pc.layout_name()));
  }
  const Shape& x = c.tensors.at("inputs.hidden_states").shape();
  const int64_t S = x[0], B = x[1], n = B / dp;
  ref::ReferenceResult total;
  for (int64_t d = 0; d < dp; ++d) {
    ref::ReferenceResult part = ref::run_reference(case_slice(c, d * n, n), options);
    total.notes = part.notes;
    for (auto& [name, t] : part.tensors) {
      if (name.rfind("outputs.intermediate.", 0) == 0) continue;  // taps of one slice's internals
      auto it = total.tensors.find(name);
      const bool per_token = t.dim() >= 2 && t.shape()[0] == S && t.shape()[1] == n;
      const bool router_rows = t.dim() == 2 && t.shape()[0] == S * n && name.rfind("outputs.router_", 0) == 0;
      if (per_token || router_rows) {
        if (it == total.tensors.end()) {
          Shape shape = t.shape();
          if (per_token) shape[1] = B; else shape[0] = S * B;
          it = total.tensors.emplace(name, Tensor(t.dtype(), shape)).first;
        }
        const size_t row = t.nbytes() / static_cast<size_t>(S * n);
        for (int64_t s = 0; s < S; ++s) {
          std::copy_n(t.bytes().data() + s * n * row, n * row, it->second.bytes().data() + (s * B + d * n) * row);
        }
      } else if (it == total.tensors.end()) {
        total.tensors.emplace(name, std::move(t));
      } else {
        add_into(it->second, t);
      }
    }
  }
  return total;
}

}  // namespace paritron::parity
