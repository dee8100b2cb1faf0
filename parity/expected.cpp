#include "parity/expected.h"

#include <fmt/format.h>

#include <algorithm>
#include <set>

#include "common/error.h"
#include "optimized/model/context.h"

namespace paritron::parity {
namespace {

// The token tensors of a case: [S, B, ...] inputs and results (a moe_router
// case's grad_output [S*B, k] is viewed as [S, B, k]).
bool is_token_result(const std::string& name) {
  return name == "outputs.output" || name == "outputs.output_bias" || name == "grads.inputs.hidden_states";
}

// One rank's token group: sequence positions (in the rank's row order) x sequences [b0, b0 + n).
struct TokenGroup {
  std::vector<int64_t> positions;
  int64_t b0 = 0, n = 0;
};

// Rows (positions[i], b0 + j) of an [S, B, ...] tensor, as [positions.size(), n, ...].
Tensor take_group(const Tensor& t, const TokenGroup& g) {
  Shape shape = t.shape();
  const int64_t B = shape[1];
  const size_t row = t.nbytes() / static_cast<size_t>(shape[0] * B);
  shape[0] = static_cast<int64_t>(g.positions.size());
  shape[1] = g.n;
  Tensor out(t.dtype(), shape);
  for (size_t i = 0; i < g.positions.size(); ++i) {
    std::copy_n(t.bytes().data() + (g.positions[i] * B + g.b0) * row, g.n * row,
                out.bytes().data() + static_cast<int64_t>(i) * g.n * row);
  }
  return out;
}

// Inputs split by name, never by shape (an encoder context [Sk, B, h] or a
// [S, S] mask could match a shape test by accident): the [S, B, ...] token
// inputs, and the masks with a batch dimension. A case whose other inputs
// are per sequence (a cross-attention context) is refused by
// expected_for_layout before it gets here.
const std::set<std::string> kTokenInputs = {"inputs.hidden_states", "inputs.grad_output", "inputs.grad_output_bias"};
const std::set<std::string> kBatchMasks = {"inputs.attention_mask"};

Case case_for_group(const Case& c, const TokenGroup& g) {
  Case sub = c;
  const Shape& x = c.tensors.at("inputs.hidden_states").shape();
  const int64_t S = x[0], B = x[1];
  for (auto& [name, t] : sub.tensors) {
    if (name.rfind("inputs.", 0) != 0) continue;
    if (c.component == "moe_router" && name == "inputs.grad_output" && t.dim() == 2 && t.shape()[0] == S * B) {
      const int64_t k = t.shape()[1];
      Tensor part = take_group(Tensor::from_bytes(t.dtype(), {S, B, k}, t.bytes()), g);
      t = Tensor::from_bytes(t.dtype(), {part.shape()[0] * g.n, k}, part.bytes());
    } else if (kTokenInputs.count(name) && t.dim() >= 2 && t.shape()[0] == S && t.shape()[1] == B) {
      t = take_group(t, g);
    } else if (kBatchMasks.count(name) && t.dim() == 4 && t.shape()[0] == B && B > 1) {
      // (only whole sequences reach here: positions are all of them)
      Tensor m(t.dtype(), {g.n, t.shape()[1], t.shape()[2], t.shape()[3]});
      const size_t per = t.nbytes() / static_cast<size_t>(B);
      std::copy_n(t.bytes().data() + g.b0 * per, g.n * per, m.bytes().data());
      t = std::move(m);
    }
  }
  return sub;
}

// The router taps the near-tie check reads (parity/near_ties.h): kept per
// group as rows appended in group order, so the truth's and an emulation's
// rows line up.
bool is_router_tap(const std::string& name) {
  if (name.rfind("outputs.intermediate.", 0) != 0) return false;
  return name.ends_with("router.logits") || name.ends_with("router.topk_margin") ||
         name.ends_with("router.order_margin") || name.ends_with("router.capacity_margin") ||
         name.ends_with("router.selection") ||
         name.ends_with("linear_fc1");
}

Tensor append_rows(const Tensor& top, const Tensor& bottom) {
  if (top.dim() != 2 || bottom.dim() != 2 || top.shape()[1] != bottom.shape()[1] || top.dtype() != bottom.dtype()) {
    throw Error("expected_for_layout: router taps of two token groups do not line up");
  }
  Tensor out(top.dtype(), {top.shape()[0] + bottom.shape()[0], top.shape()[1]});
  std::copy(top.bytes().begin(), top.bytes().end(), out.bytes().begin());
  std::copy(bottom.bytes().begin(), bottom.bytes().end(), out.bytes().begin() + static_cast<std::ptrdiff_t>(top.nbytes()));
  return out;
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
  const int64_t cp = pc.context_parallel_size;
  const int64_t sp = pc.sequence_parallel ? pc.tensor_model_parallel_size : 1;  // groups along a CP rank's positions
  const bool splits_sequences = cp > 1 || sp > 1;
  if (!token_coupled(c) || (dp == 1 && !splits_sequences)) return ref::run_reference(c, options);
  const Shape& x = c.tensors.at("inputs.hidden_states").shape();
  const int64_t S = x[0], B = x[1];
  if (B % dp != 0) {
    throw Error(fmt::format("{} data-parallel ranks x {} micro-batches do not divide the batch", pc.data_parallel_size,
                            micro_batches));
  }
  if (c.tensors.count("inputs.context") || c.tensors.count("inputs.context_mask")) {
    throw Error(fmt::format("{} on {}: a token-coupled MoE router with cross attention would need the encoder "
                            "context split with each token group; not supported yet (use dp1 or a dropless router "
                            "without losses)",
                            c.component, pc.layout_name()));
  }
  if (c.training && (c.config.hidden_dropout > 0 || c.config.attention_dropout > 0) &&
      (c.component == "transformer_layer" || c.component == "transformer_block")) {
    throw Error(fmt::format("{} on {}: a token-coupled MoE router is compared per token group, and each group's "
                            "reference run would draw its own dropout masks, not the whole batch's; run it in eval, "
                            "without dropout, or on one data-parallel rank with one micro-batch",
                            c.component, pc.layout_name()));
  }
  const bool token_wise = c.component == "moe_layer" || c.component == "moe_router";
  if (splits_sequences && !token_wise) {
    throw Error(fmt::format("{} on {}: the MoE router's capacity / aux loss / z-loss / jitter / sinkhorn are computed "
                            "per rank's tokens, and context or sequence parallelism cuts sequences into token groups "
                            "that a layer with attention cannot run alone; use a layout without cp/sp, a moe_layer "
                            "case, or a dropless router without losses",
                            c.component, pc.layout_name()));
  }
  if (splits_sequences && (S % (2 * cp) != 0 && cp > 1)) {
    throw Error(fmt::format("context parallel size {} needs s divisible by {} (s = {})", cp, 2 * cp, S));
  }
  if (splits_sequences && (S / cp) % sp != 0) {
    throw Error(fmt::format("sequence parallel splits each CP rank's {} positions over tp = {}", S / cp, sp));
  }
  // The groups, as the optimized token layout: batch slices (dp rank, micro-batch) x CP rank x SP slice.
  std::vector<TokenGroup> groups;
  const int64_t n = B / dp;
  for (int64_t d = 0; d < dp; ++d) {
    for (int64_t r = 0; r < cp; ++r) {
      const std::vector<int64_t> pos = opt::context_parallel_positions(S, cp, r);
      const int64_t per = static_cast<int64_t>(pos.size()) / sp;
      for (int64_t q = 0; q < sp; ++q) {
        TokenGroup g;
        g.positions.assign(pos.begin() + q * per, pos.begin() + (q + 1) * per);
        g.b0 = d * n;
        g.n = n;
        groups.push_back(std::move(g));
      }
    }
  }
  ref::ReferenceResult total;
  for (const TokenGroup& g : groups) {
    ref::ReferenceResult part = ref::run_reference(case_for_group(c, g), options);
    const int64_t s = static_cast<int64_t>(g.positions.size());
    total.notes = part.notes;
    for (auto& [name, t] : part.tensors) {
      auto it = total.tensors.find(name);
      if (is_router_tap(name)) {
        if (it == total.tensors.end()) {
          total.tensors.emplace(name, std::move(t));
        } else {
          it->second = append_rows(it->second, t);
        }
        continue;
      }
      if (name.rfind("outputs.intermediate.", 0) == 0) continue;  // taps of one group's internals
      const bool per_token = is_token_result(name) && t.dim() >= 2 && t.shape()[0] == s && t.shape()[1] == g.n;
      const bool router_rows = t.dim() == 2 && t.shape()[0] == s * g.n && name.rfind("outputs.router_", 0) == 0;
      if (per_token || router_rows) {
        if (it == total.tensors.end()) {
          Shape shape = t.shape();
          if (per_token) {
            shape[0] = S;
            shape[1] = B;
          } else {
            shape[0] = S * B;
          }
          it = total.tensors.emplace(name, Tensor(t.dtype(), shape)).first;
        }
        const size_t row = t.nbytes() / static_cast<size_t>(s * g.n);
        for (int64_t i = 0; i < s; ++i) {
          std::copy_n(t.bytes().data() + i * g.n * row, g.n * row,
                      it->second.bytes().data() + (g.positions[static_cast<size_t>(i)] * B + g.b0) * row);
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
