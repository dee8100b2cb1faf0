// See core.h.
#include "reference/core.h"

#include <fmt/format.h>

#include "common/error.h"
#include "common/math/float_format.h"
#include "common/math/random.h"

namespace paritron::ref {

// ---------------------------------------------------------------------------
// Params / Sink

bool Params::has(std::string_view key) const { return map_->find(prefix_ + std::string(key)) != map_->end(); }

const Mat& Params::at(std::string_view key) const {
  const std::string full = prefix_ + std::string(key);
  auto it = map_->find(full);
  if (it == map_->end()) throw Error(fmt::format("missing parameter '{}'", full));
  return it->second;
}

const Mat& Params::at(std::string_view key, int64_t rows, int64_t cols) const {
  const Mat& m = at(key);
  if (m.rows() != rows || m.cols() != cols) {
    throw Error(fmt::format("parameter '{}{}' has shape [{}, {}], expected [{}, {}]", prefix_, key, m.rows(), m.cols(),
                            rows, cols));
  }
  return m;
}

RowVec Params::row(std::string_view key, int64_t n) const {
  const Mat& m = at(key);
  if (m.rows() != 1 || (n >= 0 && m.cols() != n)) {
    throw Error(fmt::format("parameter '{}{}' has shape [{}, {}], expected a vector of {}", prefix_, key, m.rows(),
                            m.cols(), n >= 0 ? std::to_string(n) : std::string("some length")));
  }
  return m.row(0);
}

Sink Sink::sub(std::string_view module) const {
  if (!map_) return Sink();
  return Sink(*map_, prefix_ + std::string(module) + ".");
}

void Sink::put(std::string_view key, const Mat& value) const {
  if (map_) (*map_)[prefix_ + std::string(key)] = value;
}

void Sink::add(std::string_view key, const Mat& gradient) const {
  if (!map_) return;
  const std::string full = prefix_ + std::string(key);
  auto it = map_->find(full);
  if (it == map_->end()) {
    map_->emplace(full, gradient);
  } else {
    if (it->second.rows() != gradient.rows() || it->second.cols() != gradient.cols()) {
      throw Error(fmt::format("gradient '{}' accumulated with shapes [{}, {}] and [{}, {}]", full, it->second.rows(),
                              it->second.cols(), gradient.rows(), gradient.cols()));
    }
    it->second += gradient;
  }
}

// ---------------------------------------------------------------------------
// Precision

Precision truth_precision() { return Precision{}; }

Precision float64_math() {
  Precision p;
  p.forced_fp32 = false;
  return p;
}

Precision emulated_precision(DType dtype, const TransformerConfig& cfg) {
  if (dtype != DType::F64 && dtype != DType::F32 && dtype != DType::BF16 && dtype != DType::F16) {
    throw Error(fmt::format("the reference emulates F64, F32, BF16 and F16 activations, not {}", dtype_name(dtype)));
  }
  Precision p;
  p.dtype = dtype;
  const bool half = dtype == DType::BF16 || dtype == DType::F16;
  // FusedScaleMaskSoftmax upcasts only when the input is fp16/bf16 and
  // softmax_in_fp32; otherwise the softmax runs in the input dtype (spec §2.3).
  p.softmax_dtype = half && cfg.attention_softmax_in_fp32 ? DType::F32 : dtype;
  p.fp8 = cfg.fp8;
  p.fp8_margin = cfg.fp8_margin;
  p.fp8_wgrad = cfg.fp8_wgrad;
  return p;
}

double round_to(double x, DType dtype) {
  switch (dtype) {
    case DType::F64: return x;
    case DType::F32: return static_cast<double>(static_cast<float>(x));  // the C++ conversion is RNE
    default: {
      const math::FloatFormat* f = float_format(dtype);
      if (!f) throw Error(fmt::format("cannot round to {}", dtype_name(dtype)));
      return math::round_to(x, *f);
    }
  }
}

void round_inplace(Mat& m, DType dtype) {
  if (dtype == DType::F64) return;
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = round_to(m.data()[i], dtype);
}

Mat rounded(Mat m, DType dtype) {
  round_inplace(m, dtype);
  return m;
}

Mat matmul(const Mat& a, const Mat& b, DType dtype, double alpha) {
  if (a.cols() != b.rows()) {
    throw Error(fmt::format("matmul of [{}, {}] and [{}, {}]", a.rows(), a.cols(), b.rows(), b.cols()));
  }
  if (dtype == DType::F64) {
    Mat c = a * b;
    if (alpha != 1.0) c *= alpha;
    return c;
  }
  // cuBLAS accumulates fp32/bf16/fp16 GEMMs in fp32 and applies alpha to the
  // fp32 accumulator before the single rounding to the output dtype.
  using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  MatF c = a.cast<float>() * b.cast<float>();
  if (alpha != 1.0) c *= static_cast<float>(alpha);
  return rounded(c.cast<double>(), dtype);
}

// ---------------------------------------------------------------------------
// RunContext / dropout

RunContext RunContext::sub(std::string_view module) const {
  RunContext c = *this;
  c.path = path.empty() ? std::string(module) : path + "." + std::string(module);
  return c;
}

RngKey RunContext::key(std::string_view purpose) const {
  return rng_key(seed, path.empty() ? std::string(purpose) : std::string(purpose) + "." + path);
}

Mat dropout(const Mat& x, double p, const RunContext& ctx, std::string_view purpose, Mat* scale,
            uint64_t first_index) {
  if (!ctx.training || p <= 0.0) {
    if (scale) *scale = Mat::Ones(x.rows(), x.cols());
    return x;
  }
  if (p >= 1.0) {
    if (scale) *scale = Mat::Zero(x.rows(), x.cols());
    return Mat::Zero(x.rows(), x.cols());
  }
  const RngKey key = ctx.key(purpose);
  const double keep_scale = 1.0 / (1.0 - p);
  Mat s(x.rows(), x.cols());
  for (Eigen::Index i = 0; i < x.size(); ++i) {
    const bool keep = static_cast<double>(math::uniform_float(key, first_index + static_cast<uint64_t>(i))) >= p;
    s.data()[i] = keep ? keep_scale : 0.0;
  }
  Mat y = x.cwiseProduct(s);
  if (scale) *scale = std::move(s);
  return y;
}

// ---------------------------------------------------------------------------
// Tensor <-> Mat

Mat to_mat(const Tensor& t, int64_t cols) {
  if (cols <= 0 || t.numel() % cols != 0) {
    throw Error(fmt::format("cannot view a tensor of shape {} as rows of {}", shape_string(t.shape()), cols));
  }
  const std::vector<double> values = t.to_doubles();
  return Eigen::Map<const Mat>(values.data(), t.numel() / cols, cols);
}

Mat to_mat(const Tensor& t) {
  const int64_t cols = t.dim() == 0 ? 1 : t.shape().back();
  if (cols == 0) return Mat(t.dim() <= 1 ? 1 : 0, 0);
  return to_mat(t, cols);
}

Tensor to_tensor(const Mat& m, const Shape& shape, DType dtype) {
  if (shape_numel(shape) != m.size()) {
    throw Error(fmt::format("cannot store a [{}, {}] matrix as shape {}", m.rows(), m.cols(), shape_string(shape)));
  }
  return Tensor::from_values(dtype, shape, std::span<const double>(m.data(), static_cast<size_t>(m.size())));
}

}  // namespace paritron::ref
