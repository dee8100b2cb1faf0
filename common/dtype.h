// Element types of tensors and case files. The names are safetensors' dtype
// strings (shared/spec/case-format.md); float types map to an exact
// FloatFormat (common/math/float_format.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "common/math/float_format.h"

namespace paritron {

enum class DType : uint8_t { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I8, U8, BOOL };

inline constexpr DType kAllDTypes[] = {DType::F64,     DType::F32,     DType::F16, DType::BF16,
                                       DType::F8_E4M3, DType::F8_E5M2, DType::I64, DType::I32,
                                       DType::I8,      DType::U8,      DType::BOOL};

// "F64", "BF16", "F8_E4M3", ... exactly as safetensors spells them.
std::string_view dtype_name(DType dtype);
std::optional<DType> dtype_from_name(std::string_view name);

// Torch-style names used in configs ("float32", "torch.bfloat16", "fp16", "bf16").
std::optional<DType> dtype_from_torch_name(std::string_view name);
std::string_view torch_dtype_name(DType dtype);  // "float64", "bfloat16", ... ("" for non-float)

size_t dtype_size(DType dtype);  // bytes per element
bool is_floating(DType dtype);
bool is_integral(DType dtype);   // I64, I32, I8, U8, BOOL

// The exact format of a floating dtype (F64 has none: it is the carrier type).
const math::FloatFormat* float_format(DType dtype);

}  // namespace paritron
