// See device_local_comm.h: ThreadComm's rendezvous with a device CommMemory
// (copies and member-order sums on the rank's stream).
#include "optimized/comm/device_local_comm.h"

#include <cuda_runtime.h>

#include <string>
#include <type_traits>
#include <vector>

#include "optimized/cuda/cuda_backend.h"
#include "optimized/cuda/device.cuh"

namespace paritron::opt {
namespace {

using cuda::DevPtr;

// Messages are built by concatenation: fmt is not usable in .cu files (nvcc's
// C++20 front end rejects fmt 9's consteval format strings; see
// optimized/cuda/elementwise.cu).
void append(std::string& s, std::string_view v) { s += v; }
void append(std::string& s, const char* v) { s += v; }
void append(std::string& s, const std::string& v) { s += v; }
template <class N>
  requires std::is_integral_v<N>
void append(std::string& s, N v) {
  s += std::to_string(v);
}
template <class... A>
std::string cat(const A&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

// The members' input pointers, passed by value (kernel parameters: 1 KiB).
constexpr int kMaxMembers = 128;
struct MemberInputs {
  const void* p[kMaxMembers];
};

[[noreturn]] void throw_cuda(cudaError_t status, const char* call, std::string_view where) {
  (void)cudaGetLastError();  // clear a sticky launch error so the next check reports its own
  throw CommError(cat(where, ": ", call, " failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ")"));
}

inline void check(cudaError_t status, const char* call, std::string_view where) {
  if (status != cudaSuccess) throw_cuda(status, call, where);
}

#define PARITRON_COMM_CUDA(call, where) check((call), #call, (where))

// out[i] = sum over members m (in order) of in[m][begin + i], in T (float,
// or double for F64 storage), rounded to dtype when `round`, stored as out's
// storage (RNE). Each element is one thread's left-to-right sum: the same
// additions, in the same order, as comm_detail::sum_members on the host.
template <class T>
__global__ void sum_float_members(MemberInputs in, int members, DType storage, int64_t begin, int64_t count,
                                  DevPtr out, DType dtype, bool round) {
  PARITRON_GRID_LOOP(i, count) {
    T acc = cuda::ld<T>(DevPtr{const_cast<void*>(in.p[0]), storage}, begin + i);
    for (int m = 1; m < members; ++m) acc += cuda::ld<T>(DevPtr{const_cast<void*>(in.p[m]), storage}, begin + i);
    if (round) acc = cuda::round_as<T>(dtype, acc);
    cuda::st<T>(out, i, acc);
  }
}

template <class I>
__global__ void sum_int_members(MemberInputs in, int members, int64_t begin, int64_t count, I* out) {
  PARITRON_GRID_LOOP(i, count) {
    I acc = static_cast<const I*>(in.p[0])[begin + i];
    for (int m = 1; m < members; ++m) acc += static_cast<const I*>(in.p[m])[begin + i];
    out[i] = acc;
  }
}

__global__ void widen_kernel(DevPtr src, float* dst, int64_t n) {
  PARITRON_GRID_LOOP(i, n) { dst[i] = cuda::ld<float>(src, i); }
}

template <class T>
__global__ void store_rounded_kernel(const T* src, DevPtr dst, DType dtype, bool round, int64_t n) {
  PARITRON_GRID_LOOP(i, n) {
    T v = src[i];
    if (round) v = cuda::round_as<T>(dtype, v);
    cuda::st<T>(dst, i, v);
  }
}

// Rank r's device memory: everything on cuda::current_stream() of the calling
// (rank) thread.
class DeviceCommMemory final : public CommMemory {
 public:
  explicit DeviceCommMemory(int64_t rank) : rank_(rank) {}

  std::string_view name() const override { return "device-threads"; }

  void before_post(std::string_view context) override {
    PARITRON_COMM_CUDA(cudaStreamSynchronize(stream()), where(context, "waiting for this rank's inputs"));
  }

  void after_complete(std::string_view context) override {
    PARITRON_COMM_CUDA(cudaStreamSynchronize(stream()), where(context, "waiting for this rank's copies and sums"));
  }

  void copy(void* dst, const void* src, size_t bytes, std::string_view context) override {
    if (bytes == 0) return;
    PARITRON_COMM_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream()),
                       where(context, cat("copying ", bytes, " bytes")));
  }

  bool can_sum(DType storage) const override {
    switch (storage) {
      case DType::F32:
      case DType::F64:
      case DType::BF16:
      case DType::F16:
      case DType::I32:
      case DType::I64: return true;
      default: return false;
    }
  }

  void sum_members(const std::vector<const void*>& inputs, DType dtype, DType storage,
                   const math::FloatFormat* round_to, int64_t begin, int64_t count, void* out,
                   std::string_view context) override {
    if (count <= 0) return;
    const auto members = static_cast<int>(inputs.size());
    if (members < 1 || members > kMaxMembers) {
      throw CommError(cat(context, ": rank ", rank_, ": the device-local sum takes 1 to ", kMaxMembers,
                          " members, the group has ", inputs.size()));
    }
    MemberInputs in{};
    for (int m = 0; m < members; ++m) in.p[m] = inputs[static_cast<size_t>(m)];
    const int blocks = cuda::blocks_for(count);
    const DevPtr dst{out, storage};
    const bool round = round_to != nullptr;
    switch (storage) {
      case DType::F32:
      case DType::BF16:
      case DType::F16:
        sum_float_members<float><<<blocks, cuda::kThreads, 0, stream()>>>(in, members, storage, begin, count, dst,
                                                                           dtype, round);
        break;
      case DType::F64:
        sum_float_members<double><<<blocks, cuda::kThreads, 0, stream()>>>(in, members, storage, begin, count, dst,
                                                                            dtype, round);
        break;
      case DType::I32:
        sum_int_members<int32_t><<<blocks, cuda::kThreads, 0, stream()>>>(in, members, begin, count,
                                                                           static_cast<int32_t*>(out));
        break;
      case DType::I64:
        sum_int_members<int64_t><<<blocks, cuda::kThreads, 0, stream()>>>(in, members, begin, count,
                                                                           static_cast<int64_t*>(out));
        break;
      default:
        throw CommError(cat(context, ": rank ", rank_, ": cannot sum tensors stored as ", dtype_name(storage)));
    }
    PARITRON_COMM_CUDA(cudaGetLastError(),
                       where(context, cat("summing ", count, " elements of ", members, " members (",
                                          dtype_name(storage), " storage)")));
  }

  void to_host(void* host_dst, const void* src, size_t bytes, std::string_view context) override {
    if (bytes == 0) return;
    const std::string w = where(context, cat("copying ", bytes, " bytes to the host message"));
    PARITRON_COMM_CUDA(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDefault, stream()), w);
    PARITRON_COMM_CUDA(cudaStreamSynchronize(stream()), w);
  }

  void from_host(void* dst, const void* host_src, size_t bytes, std::string_view context) override {
    if (bytes == 0) return;
    const std::string w = where(context, cat("copying ", bytes, " bytes from the host message"));
    PARITRON_COMM_CUDA(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyDefault, stream()), w);
    PARITRON_COMM_CUDA(cudaStreamSynchronize(stream()), w);  // the message is freed on return
  }

 private:
  static cudaStream_t stream() { return cuda::current_stream(); }
  std::string where(std::string_view context, std::string_view what) const {
    return cat(context, ": rank ", rank_, " (device-threads), ", what);
  }

  int64_t rank_;
};

}  // namespace

std::unique_ptr<CommMemory> make_device_comm_memory(int64_t rank) { return std::make_unique<DeviceCommMemory>(rank); }

std::unique_ptr<ThreadWorld> make_device_local_world(int64_t world_size) {
  std::string why;
  if (!cuda::device_available(&why)) {
    throw CommError(cat("device-threads comm: no CUDA device is usable: ", why));
  }
  return std::make_unique<ThreadWorld>(world_size, [](int64_t r) { return make_device_comm_memory(r); });
}

void run_on_device_threads(int64_t world_size, const std::function<void(Comm&)>& body,
                           std::chrono::milliseconds timeout) {
  std::unique_ptr<ThreadWorld> world = make_device_local_world(world_size);
  world->set_timeout(timeout);
  run_on_world(*world, body);
}

namespace device_comm_detail {

void widen_to_f32(const void* src, DType storage, float* dst, int64_t n, CUstream_st* stream,
                  std::string_view context) {
  if (n <= 0) return;
  widen_kernel<<<cuda::blocks_for(n), cuda::kThreads, 0, stream>>>(DevPtr{const_cast<void*>(src), storage}, dst, n);
  PARITRON_COMM_CUDA(cudaGetLastError(),
                     cat(context, ": widening ", n, " ", dtype_name(storage), " elements to f32"));
}

void store_rounded(const void* src, DType src_storage, void* dst, DType dst_storage, DType dtype, bool round,
                   int64_t n, CUstream_st* stream, std::string_view context) {
  if (n <= 0) return;
  const int blocks = cuda::blocks_for(n);
  const DevPtr out{dst, dst_storage};
  if (src_storage == DType::F64) {
    store_rounded_kernel<double><<<blocks, cuda::kThreads, 0, stream>>>(static_cast<const double*>(src), out, dtype,
                                                                         round, n);
  } else if (src_storage == DType::F32) {
    store_rounded_kernel<float><<<blocks, cuda::kThreads, 0, stream>>>(static_cast<const float*>(src), out, dtype,
                                                                        round, n);
  } else {
    throw CommError(cat(context, ": store_rounded reads f32 or f64, not ", dtype_name(src_storage)));
  }
  PARITRON_COMM_CUDA(cudaGetLastError(), cat(context, ": rounding ", n, " elements to ", dtype_name(dtype), " (",
                                             dtype_name(dst_storage), " storage)"));
}

}  // namespace device_comm_detail

}  // namespace paritron::opt
