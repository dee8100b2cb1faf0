#include "parity/sensitivity.h"

#include <cmath>

#include "common/rng.h"

namespace paritron::parity {
namespace {

bool perturbable(const std::string& name, const Tensor& t) {
  if (!is_floating(t.dtype())) return false;
  if (name.rfind("weights.", 0) == 0) return true;
  return name.rfind("inputs.", 0) == 0 && name.rfind("inputs.grad_", 0) != 0 && name != "inputs.rotary_pos_emb" &&
         name != "inputs.freqs";
}

}  // namespace

double sensitivity_roundoff() { return std::ldexp(1.0, -24); }

Case perturb_case(const Case& c, double relative, uint64_t seed) {
  Case out = c;
  for (auto& [name, t] : out.tensors) {
    if (!perturbable(name, t)) continue;
    Tensor p = t.to(DType::F64);
    const RngKey key = rng_key(seed, name);
    for (int64_t i = 0; i < p.numel(); ++i) {
      const double sign = uniform(key, static_cast<uint64_t>(i)) < 0.5 ? -1.0 : 1.0;
      p.set(i, p.get(i) * (1.0 + relative * sign));
    }
    t = std::move(p);
  }
  return out;
}

}  // namespace paritron::parity
