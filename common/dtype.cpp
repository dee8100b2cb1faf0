#include "common/dtype.h"

#include <string>

namespace paritron {

namespace {
struct DTypeInfo {
  DType dtype;
  std::string_view name;
  std::string_view torch_name;
  size_t size;
  const math::FloatFormat* format;
};

constexpr DTypeInfo kInfo[] = {
    {DType::F64, "F64", "float64", 8, nullptr},
    {DType::F32, "F32", "float32", 4, &math::kFloat32},
    {DType::F16, "F16", "float16", 2, &math::kFloat16},
    {DType::BF16, "BF16", "bfloat16", 2, &math::kBFloat16},
    {DType::F8_E4M3, "F8_E4M3", "float8_e4m3fn", 1, &math::kFloat8E4M3},
    {DType::F8_E5M2, "F8_E5M2", "float8_e5m2", 1, &math::kFloat8E5M2},
    {DType::I64, "I64", "", 8, nullptr},
    {DType::I32, "I32", "", 4, nullptr},
    {DType::I8, "I8", "", 1, nullptr},
    {DType::U8, "U8", "", 1, nullptr},
    {DType::BOOL, "BOOL", "", 1, nullptr},
};

const DTypeInfo& info(DType dtype) { return kInfo[static_cast<size_t>(dtype)]; }
}  // namespace

std::string_view dtype_name(DType dtype) { return info(dtype).name; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const DTypeInfo& i : kInfo) {
    if (i.name == name) return i.dtype;
  }
  return std::nullopt;
}

std::optional<DType> dtype_from_torch_name(std::string_view name) {
  if (name.starts_with("torch.")) name.remove_prefix(6);
  for (const DTypeInfo& i : kInfo) {
    if (!i.torch_name.empty() && i.torch_name == name) return i.dtype;
  }
  if (name == "double" || name == "fp64") return DType::F64;
  if (name == "float" || name == "fp32") return DType::F32;
  if (name == "half" || name == "fp16") return DType::F16;
  if (name == "bf16") return DType::BF16;
  return std::nullopt;
}

std::string_view torch_dtype_name(DType dtype) { return info(dtype).torch_name; }

size_t dtype_size(DType dtype) { return info(dtype).size; }

bool is_floating(DType dtype) { return dtype == DType::F64 || info(dtype).format != nullptr; }

bool is_integral(DType dtype) { return !is_floating(dtype); }

const math::FloatFormat* float_format(DType dtype) { return info(dtype).format; }

}  // namespace paritron
