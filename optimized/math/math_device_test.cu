// The optimized side's single-source math (optimized/math/, PARITRON_HD) run
// on the GPU and compared bit for bit with the same functions on the host,
// so the CPU backend's CI tests the numbers the CUDA kernels will make
// (design.md, principle 4): every MLP activation's value and derivative
// (float, the fast_expf/erff/tanhf polynomials), the fp32 -> bf16/fp16
// roundings, LayerNorm/RMSNorm row statistics, and the router's softmax and
// top-k. Device code is compiled with --fmad=false (cmake/paritron_targets.cmake)
// so neither side contracts a*b+c. RoPE's cos/sin go through double-precision
// libm, whose device and host results may differ in the last bit, so they are
// not compared here. Skips without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "optimized/math/activations.h"
#include "optimized/math/norm.h"
#include "optimized/math/rounding.h"
#include "optimized/math/router.h"

namespace paritron::math {
namespace {

bool have_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

// Evaluates a float -> float functor over the inputs on the device.
template <class Op>
__global__ void map_kernel(const float* in, float* out, int64_t n, Op op) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = op(in[i]);
  }
}

template <class Op>
std::vector<float> on_device(const std::vector<float>& in, Op op) {
  std::vector<float> out(in.size());
  float *d_in = nullptr, *d_out = nullptr;
  EXPECT_EQ(cudaMalloc(&d_in, in.size() * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMalloc(&d_out, in.size() * sizeof(float)), cudaSuccess);
  cudaMemcpy(d_in, in.data(), in.size() * sizeof(float), cudaMemcpyHostToDevice);
  map_kernel<<<256, 256>>>(d_in, d_out, static_cast<int64_t>(in.size()), op);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaMemcpy(out.data(), d_out, in.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(d_in);
  cudaFree(d_out);
  return out;
}

std::vector<float> inputs() {
  std::vector<float> x;
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(-12.0f, 12.0f);
  for (int i = 0; i < 200000; ++i) x.push_back(u(gen));
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, 88.0f, -88.0f, 1e4f, -1e4f}) x.push_back(v);
  return x;
}

template <class Op>
void expect_bitwise(const char* what, Op op) {
  const std::vector<float> x = inputs();
  const std::vector<float> device = on_device(x, op);
  int64_t mismatches = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float host = op(x[i]);
    if (std::memcmp(&host, &device[i], sizeof(float)) != 0 && mismatches++ < 5) {
      ADD_FAILURE() << what << "(" << x[i] << "): host " << host << ", device " << device[i];
    }
  }
  EXPECT_EQ(mismatches, 0) << what;
}

struct ActValue {
  Act kind;
  PARITRON_HD float operator()(float x) const { return act_value(kind, x); }
};
struct ActDerivative {
  Act kind;
  PARITRON_HD float operator()(float x) const { return act_derivative(kind, x); }
};
struct ToBf16 {
  PARITRON_HD float operator()(float x) const { return round_float_to_bf16(x * 1.001f); }
};
struct ToFp16 {
  PARITRON_HD float operator()(float x) const { return round_float_to_fp16(x * 3.7f); }
};
// A row of 8 values around x: LayerNorm rstd, RMSNorm rstd, softmax of the
// first element, the top-2 pick encoded as a float.
struct RowMath {
  int which;
  PARITRON_HD float operator()(float x) const {
    float row[8];
    for (int j = 0; j < 8; ++j) row[j] = x * static_cast<float>(j - 3) * 0.25f + static_cast<float>(j % 3);
    if (which == 2) {
      float p[8];
      softmax_row(row, p, 8);
      return p[0];
    }
    if (which == 3) {
      int64_t idx[2];
      topk_row(row, 8, 2, idx);
      return static_cast<float>(idx[0] * 8 + idx[1]);
    }
    float mean = 0, rstd = 0;
    norm_row_stats(row, 8, /*rms=*/which == 1, 1e-5, &mean, &rstd);
    return rstd;
  }
};

TEST(OptimizedMathDevice, ActivationsRoundingNormsAndRouterAreBitwiseTheHostsOnTheGpu) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  for (Act a : {Act::kGelu, Act::kSilu, Act::kRelu, Act::kSquaredRelu, Act::kOpenaiGelu, Act::kErfGelu,
                Act::kQuickGelu, Act::kBiasGeluTanh}) {
    expect_bitwise("act_value", ActValue{a});
    expect_bitwise("act_derivative", ActDerivative{a});
  }
  expect_bitwise("round_float_to_bf16", ToBf16{});
  expect_bitwise("round_float_to_fp16", ToFp16{});
  for (int which = 0; which < 4; ++which) expect_bitwise("row math", RowMath{which});
}

}  // namespace
}  // namespace paritron::math
