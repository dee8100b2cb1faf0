// Host fills for the counter-based RNG (common/rng.h): loops over
// common/math/random.h's per-element draws, storing straight into the
// tensor's storage with float_format.h's exact rounding (the same rounding
// Tensor::set does, without its per-element checks and dtype switch).
#include "common/rng.h"

#include <limits>

#include <fmt/format.h>

#include "common/error.h"

namespace paritron {

double uniform(RngKey key, uint64_t index) { return math::uniform_double(key, index); }
double normal(RngKey key, uint64_t index) { return math::normal_double(key, index); }

namespace {

// A block of `rows` x `cols` destination elements; element (r, c) is global
// element first + r * row_stride + c.
struct IndexBlock {
  int64_t rows = 1;
  int64_t cols = 0;
  uint64_t first = 0;
  uint64_t row_stride = 0;
};

template <class T, class Encode, class Draw>
void fill_block(std::span<T> out, const IndexBlock& block, Encode encode, Draw draw) {
  size_t j = 0;
  for (int64_t r = 0; r < block.rows; ++r) {
    const uint64_t row_first = block.first + static_cast<uint64_t>(r) * block.row_stride;
    for (int64_t c = 0; c < block.cols; ++c) out[j++] = encode(draw(row_first + static_cast<uint64_t>(c)));
  }
}

template <class Draw>
void fill_tensor(Tensor& dst, const IndexBlock& block, std::string_view what, Draw draw) {
  switch (dst.dtype()) {
    case DType::F64:
      fill_block(dst.data<double>(), block, [](double v) { return v; }, draw);
      return;
    case DType::F32:
      // encode, not static_cast<float>: defined for every double (overflow -> inf).
      fill_block(dst.data<float>(), block,
                 [](double v) { return math::float_from_bits(math::encode(v, math::kFloat32)); }, draw);
      return;
    case DType::F16:
    case DType::BF16: {
      const math::FloatFormat format = *float_format(dst.dtype());
      fill_block(dst.data<uint16_t>(), block,
                 [format](double v) { return static_cast<uint16_t>(math::encode(v, format)); }, draw);
      return;
    }
    case DType::F8_E4M3:
    case DType::F8_E5M2: {
      const math::FloatFormat format = *float_format(dst.dtype());
      fill_block(dst.data<uint8_t>(), block,
                 [format](double v) { return static_cast<uint8_t>(math::encode(v, format)); }, draw);
      return;
    }
    case DType::I64:
    case DType::I32:
    case DType::I8:
    case DType::U8:
    case DType::BOOL: break;
  }
  throw Error(fmt::format("{}: a {} tensor cannot hold random floats; use a floating dtype", what,
                          dtype_name(dst.dtype())));
}

// The flat range [global_begin, global_begin + numel) must not wrap around 2^64.
IndexBlock flat_block(const Tensor& dst, uint64_t global_begin, std::string_view what) {
  const auto n = static_cast<uint64_t>(dst.numel());
  if (n > 0 && global_begin > std::numeric_limits<uint64_t>::max() - (n - 1)) {
    throw Error(fmt::format("{}: global elements [{}, {} + {}) run past 2^64", what, global_begin,
                            global_begin, n));
  }
  return IndexBlock{1, dst.numel(), global_begin, 0};
}

IndexBlock shard_block(int64_t global_rows, int64_t global_cols, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                       std::string_view what) {
  shape_numel({global_rows, global_cols});  // throws on negative extents or 64-bit overflow
  const auto in_range = [](int64_t begin, int64_t count, int64_t extent) {
    return begin >= 0 && count >= 0 && begin <= extent && count <= extent - begin;
  };
  if (!in_range(r0, nr, global_rows) || !in_range(c0, nc, global_cols)) {
    throw Error(fmt::format("{}: rows [{}, {}+{}) x columns [{}, {}+{}) are not inside a [{}, {}] tensor", what,
                            r0, r0, nr, c0, c0, nc, global_rows, global_cols));
  }
  return IndexBlock{nr, nc, static_cast<uint64_t>(r0) * static_cast<uint64_t>(global_cols) + static_cast<uint64_t>(c0),
                    static_cast<uint64_t>(global_cols)};
}

auto uniform_draw(RngKey key, double low, double high) {
  return [=](uint64_t i) { return math::uniform_range(key, i, low, high); };
}

auto normal_draw(RngKey key, double mean, double stddev) {
  return [=](uint64_t i) { return math::normal_scaled(key, i, mean, stddev); };
}

}  // namespace

void fill_uniform(Tensor& dst, RngKey key, uint64_t global_begin, double low, double high) {
  fill_tensor(dst, flat_block(dst, global_begin, "fill_uniform"), "fill_uniform", uniform_draw(key, low, high));
}

void fill_normal(Tensor& dst, RngKey key, uint64_t global_begin, double mean, double stddev) {
  fill_tensor(dst, flat_block(dst, global_begin, "fill_normal"), "fill_normal", normal_draw(key, mean, stddev));
}

Tensor uniform_shard(DType dtype, RngKey key, int64_t global_rows, int64_t global_cols, int64_t r0, int64_t nr,
                     int64_t c0, int64_t nc, double low, double high) {
  const IndexBlock block = shard_block(global_rows, global_cols, r0, nr, c0, nc, "uniform_shard");
  Tensor t(dtype, {nr, nc});
  fill_tensor(t, block, "uniform_shard", uniform_draw(key, low, high));
  return t;
}

Tensor normal_shard(DType dtype, RngKey key, int64_t global_rows, int64_t global_cols, int64_t r0, int64_t nr,
                    int64_t c0, int64_t nc, double mean, double stddev) {
  const IndexBlock block = shard_block(global_rows, global_cols, r0, nr, c0, nc, "normal_shard");
  Tensor t(dtype, {nr, nc});
  fill_tensor(t, block, "normal_shard", normal_draw(key, mean, stddev));
  return t;
}

}  // namespace paritron
