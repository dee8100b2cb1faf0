// Tensor: shapes, storage access, exact rounding on set(), bad input.
#include "common/tensor.h"

#include <cmath>
#include <limits>

#include <gtest/gtest.h>

#include "common/error.h"

namespace paritron {
namespace {

TEST(Tensor, ShapeAndStorage) {
  Tensor t(DType::BF16, {2, 3, 4});
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 48u);
  EXPECT_EQ(t.dim(), 3);
  EXPECT_EQ(t.get(23), 0.0);
  EXPECT_EQ(t.unravel(23), (Shape{1, 2, 3}));
  EXPECT_EQ(t.unravel(5), (Shape{0, 1, 1}));
  EXPECT_EQ(t.data<uint16_t>().size(), 24u);
  EXPECT_THROW(t.data<float>(), Error);
  EXPECT_THROW(t.data<uint8_t>(), Error);
  Tensor scalar;
  EXPECT_EQ(scalar.numel(), 1);
  EXPECT_EQ(scalar.dim(), 0);
  EXPECT_EQ(Tensor(DType::F32, {3, 0}).numel(), 0);
}

TEST(Tensor, SetRoundsToNearestEven) {
  Tensor t(DType::BF16, {3});
  t.set(0, 1.00390625);  // 1 + 2^-8: tie, rounds to 1
  t.set(1, 1.01171875);  // 1 + 3*2^-8: tie, rounds up to 1 + 2^-6
  t.set(2, 1e39);        // past bf16 max (3.39e38) -> inf
  EXPECT_EQ(t.get(0), 1.0);
  EXPECT_EQ(t.get(1), 1.015625);
  EXPECT_TRUE(std::isinf(t.get(2)));
  EXPECT_EQ(t.data<uint16_t>()[0], 0x3F80);
  Tensor f8(DType::F8_E4M3, {2});
  f8.set(0, 0.3);
  f8.set(1, -500.0);
  EXPECT_EQ(f8.get(0), 0.3125);
  EXPECT_TRUE(std::isnan(f8.get(1)));  // E4M3 has no inf
  Tensor f32(DType::F32, {2});
  f32.set(0, 0.1);
  f32.set(1, 1e300);
  EXPECT_EQ(f32.get(0), static_cast<double>(0.1f));
  EXPECT_TRUE(std::isinf(f32.get(1)));
}

TEST(Tensor, IntegersAreNeverRoundedSilently) {
  Tensor t(DType::I32, {1});
  t.set(0, -7);
  EXPECT_EQ(t.get_int(0), -7);
  EXPECT_THROW(t.set(0, 1.5), Error);
  EXPECT_THROW(t.set(0, 3e9), Error);
  Tensor b(DType::BOOL, {1});
  EXPECT_THROW(b.set(0, 2), Error);
  Tensor i64(DType::I64, {1});
  i64.set(0, -0x1p63);
  EXPECT_EQ(i64.get_int(0), std::numeric_limits<int64_t>::min());
  EXPECT_THROW(i64.set(0, 0x1p63), Error);
  EXPECT_THROW(Tensor(DType::F32, {1}).get_int(0), Error);
  // Integer to integer conversion is exact beyond 2^53 and refuses what does not fit.
  Tensor big(DType::I64, {2});
  big.set_int(0, (int64_t{1} << 53) + 1);
  big.set_int(1, -5);
  EXPECT_EQ(big.to(DType::I64).get_int(0), (int64_t{1} << 53) + 1);
  EXPECT_EQ(big.to(DType::I64).data<int64_t>()[0], (int64_t{1} << 53) + 1);
  EXPECT_THROW(big.to(DType::I32), Error);
  big.set_int(0, 100);
  EXPECT_EQ(big.to(DType::I8).get_int(1), -5);
  EXPECT_THROW(big.to(DType::U8), Error);
  EXPECT_THROW(Tensor(DType::F32, {1}).set_int(0, 1), Error);
}

TEST(Tensor, BadShapesAndSizesAreErrors) {
  EXPECT_THROW(Tensor(DType::F32, {2, -1}), Error);
  EXPECT_THROW(Tensor(DType::F64, {1LL << 40, 1LL << 40}), Error);
  const std::vector<std::byte> three(3);
  EXPECT_THROW(Tensor::from_bytes(DType::F32, {1}, three), Error);
  EXPECT_THROW(Tensor::from_values(DType::F32, {2}, std::vector<double>{1.0}), Error);
  Tensor t(DType::F32, {2});
  EXPECT_THROW(t.get(2), Error);
  EXPECT_THROW(t.set(-1, 0.0), Error);
  try {
    Tensor(DType::F32, {4, -2});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[4, -2]"), std::string::npos);
  }
}

TEST(Tensor, ConversionAndEquality) {
  const Tensor a = Tensor::from_values(DType::F64, {2, 2}, std::vector<double>{0.1, -2.5, 1e-8, 70000});
  const Tensor h = a.to(DType::F16);
  EXPECT_EQ(h.dtype(), DType::F16);
  EXPECT_EQ(h.get(1), -2.5);
  EXPECT_TRUE(std::isinf(h.get(3)));  // 70000 > 65504 + ulp/2
  EXPECT_EQ(h.get(2), 0x1p-24 * std::round(1e-8 / 0x1p-24));
  EXPECT_TRUE(a.bitwise_equal(a.to(DType::F64)));
  EXPECT_FALSE(a.bitwise_equal(h));
  const std::vector<double> back = h.to_doubles();
  EXPECT_EQ(back.size(), 4u);
  EXPECT_EQ(back[0], 0.0999755859375);
}

}  // namespace
}  // namespace paritron
