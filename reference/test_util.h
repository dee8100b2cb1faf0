// Helpers shared by the reference's tests (reference/*_test.cpp, and only
// those): literal matrices, expected errors, the small configs and random
// weights several component tests build the same way. Header-only; not part
// of paritron_reference.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/module_params.h"
#include "common/transformer_config.h"
#include "reference/core.h"
#include "reference/gradcheck.h"

namespace paritron::ref::test_util {

// A rows x cols matrix from its values in row-major order:
// mat(2, 2, {1, 2, 3, 4}) = [[1, 2], [3, 4]].
inline Mat mat(int64_t rows, int64_t cols, std::initializer_list<double> v) {
  Mat m(rows, cols);
  Eigen::Index i = 0;
  for (double d : v) m.data()[i++] = d;
  return m;
}

// A matrix from its rows: rows_of({{1, 2}, {3, 4}}) = [[1, 2], [3, 4]].
inline Mat rows_of(std::initializer_list<std::initializer_list<double>> rows) {
  Mat m(static_cast<Eigen::Index>(rows.size()), static_cast<Eigen::Index>(rows.begin()->size()));
  Eigen::Index r = 0;
  for (const auto& row : rows) {
    Eigen::Index c = 0;
    for (double v : row) m(r, c++) = v;
    ++r;
  }
  return m;
}

// Columns `cols` of m, in that order.
inline Mat columns(const Mat& m, const std::vector<int64_t>& cols) {
  Mat out(m.rows(), static_cast<Eigen::Index>(cols.size()));
  for (size_t c = 0; c < cols.size(); ++c) out.col(static_cast<Eigen::Index>(c)) = m.col(cols[c]);
  return out;
}

// Runs f, expects paritron::Error whose message contains `needle`.
template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no Error thrown; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// The message of the paritron::Error f throws, or "(no error)".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// A config from JSON text, validated as `paritron config` loads it.
inline TransformerConfig json_config(const std::string& json) { return config_from_json_text(json).config; }

// An attention config (not validated): n heads in g query groups of width hn,
// hidden size h, two layers, no dropout.
inline TransformerConfig attention_config(int64_t n, int64_t g, int64_t hn, int64_t h, bool bias_linear = true,
                                          bool qkv_bias = false) {
  TransformerConfig c;
  c.num_layers = 2;
  c.hidden_size = h;
  c.num_attention_heads = n;
  c.num_query_groups = g;
  c.kv_channels = hn;
  c.attention_dropout = 0.0;
  c.hidden_dropout = 0.0;
  c.add_bias_linear = bias_linear;
  c.add_qkv_bias = qkv_bias;
  return c;
}

// Random weights for the parameters `specs` (keys as module_params gives
// them) under `prefix`: norm weights 1 + N(0, 0.1) (N(0, 0.1) with
// zero_centered_gamma), everything else N(0, std), rounded to dtype.
inline MatMap random_weights(const std::vector<ParamSpec>& specs, const std::string& prefix, uint64_t seed,
                             DType dtype = DType::F64, bool zero_centered_gamma = false, double std = 0.3) {
  MatMap w;
  for (const ParamSpec& s : specs) {
    const std::string key = prefix + s.key;
    const int64_t rows = s.shape.size() == 1 ? 1 : s.shape[0];
    const int64_t cols = s.shape.size() == 1 ? s.shape[0] : s.shape[1];
    const bool norm_weight = key.ends_with("layernorm.weight");
    Mat m = random_normal(rows, cols, seed, key, norm_weight ? 0.1 : std);
    if (norm_weight && !zero_centered_gamma) m.array() += 1.0;
    w[key] = rounded(m, dtype);
  }
  return w;
}

}  // namespace paritron::ref::test_util
