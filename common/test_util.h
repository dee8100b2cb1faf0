// Helpers shared by the common library's tests (common/*_test.cpp, and only
// those): the small GQA config the parameter-catalogue tests build, and
// lookups in a parameter list. Header-only; not part of paritron_common.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/module_params.h"
#include "common/transformer_config.h"

namespace paritron::test_util {

using Keys = std::vector<std::string>;

// A validated GQA config: n 4, g 2 (r = 2), hn = hidden / 4; by default
// h 8, hn 2, f 12, two layers. `edit` sets further fields before validation.
inline TransformerConfig gqa_config(int64_t layers = 2, int64_t hidden = 8, int64_t ffn = 12,
                                    const std::function<void(TransformerConfig&)>& edit = {}) {
  TransformerConfig c;
  c.num_layers = layers;
  c.hidden_size = hidden;
  c.num_attention_heads = 4;
  c.num_query_groups = 2;
  c.ffn_hidden_size = ffn;
  if (edit) edit(c);
  validate_config(c);
  return c;
}

// The keys of a list of ParamSpecs (or of anything else with a `key`), in order.
template <class T>
Keys keys_of(const std::vector<T>& items) {
  Keys out;
  for (const T& t : items) out.push_back(t.key);
  return out;
}

// The parameter named `key`; throws when there is none.
inline const ParamSpec& find(const std::vector<ParamSpec>& ps, const std::string& key) {
  const auto it = std::find_if(ps.begin(), ps.end(), [&](const ParamSpec& p) { return p.key == key; });
  if (it == ps.end()) throw std::runtime_error("no parameter " + key);
  return *it;
}

}  // namespace paritron::test_util
