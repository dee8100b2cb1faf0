// See cuda_backend.h. This file: device selection, the stream, the library
// handles, memory (stream-ordered allocation), upload and download. The
// kernels are in the .cu files listed in the header.
#include "optimized/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "common/error.h"
#include "optimized/cuda/cuda_check.h"

namespace paritron::opt::cuda {

namespace {

thread_local CUstream_st* g_current_stream = nullptr;

// The stream and the device, shared by the backend and every tensor it
// allocated: a tensor freed after its backend (a result kept by the caller)
// still frees on a live stream.
struct StreamOwner {
  int device = 0;
  cudaStream_t stream = nullptr;
  ~StreamOwner() {
    if (stream == nullptr) return;
    // Destructors cannot throw: a failure here means the context is already
    // gone (process teardown), and there is nothing left to release.
    (void)cudaSetDevice(device);
    (void)cudaStreamSynchronize(stream);
    (void)cudaStreamDestroy(stream);
  }
};

size_t storage_bytes(DType dtype, const Shape& shape) {
  return static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
}

}  // namespace

CUstream_st* current_stream() { return g_current_stream; }

bool device_available(std::string* why) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    if (why) *why = fmt::format("cudaGetDeviceCount: {} ({})", cudaGetErrorName(status), cudaGetErrorString(status));
    return false;
  }
  if (count == 0) {
    if (why) *why = "cudaGetDeviceCount found 0 devices";
    return false;
  }
  return true;
}

struct CudaBackend::Impl {
  std::shared_ptr<StreamOwner> owner = std::make_shared<StreamOwner>();
  cublasLtHandle_t lt = nullptr;
  cublasHandle_t blas = nullptr;
  std::shared_ptr<std::byte> scratch;  // workspace(): grows, stream-ordered
  size_t scratch_bytes = 0;
  std::string device_name;
};

CudaBackend::CudaBackend(int device) : impl_(std::make_unique<Impl>()) {
  std::string why;
  if (!device_available(&why)) throw BackendError("backend 'cuda': no CUDA device is usable: " + why);
  if (device < 0) PARITRON_CUDA_CHECK(cudaGetDevice(&device), "CudaBackend");
  int count = 0;
  PARITRON_CUDA_CHECK(cudaGetDeviceCount(&count), "CudaBackend");
  if (device >= count) throw BackendError(fmt::format("backend 'cuda': device {} requested, {} present", device, count));
  PARITRON_CUDA_CHECK(cudaSetDevice(device), fmt::format("CudaBackend device {}", device));
  impl_->owner->device = device;
  PARITRON_CUDA_CHECK(cudaStreamCreateWithFlags(&impl_->owner->stream, cudaStreamNonBlocking), "CudaBackend");
  PARITRON_CUBLAS_CHECK(cublasLtCreate(&impl_->lt), "CudaBackend");
  PARITRON_CUBLAS_CHECK(cublasCreate(&impl_->blas), "CudaBackend");
  PARITRON_CUBLAS_CHECK(cublasSetStream(impl_->blas, impl_->owner->stream), "CudaBackend");
  g_current_stream = impl_->owner->stream;
}

CudaBackend::~CudaBackend() {
  if (g_current_stream == impl_->owner->stream) g_current_stream = nullptr;
  impl_->scratch.reset();
  if (impl_->blas) (void)cublasDestroy(impl_->blas);
  if (impl_->lt) (void)cublasLtDestroy(impl_->lt);
}

CUstream_st* CudaBackend::stream() const { return impl_->owner->stream; }
int CudaBackend::device() const { return impl_->owner->device; }
void* CudaBackend::cublaslt_handle() { return impl_->lt; }
void* CudaBackend::cublas_handle() { return impl_->blas; }

namespace {

// Stream-ordered device memory: freed on the owner's stream once the work
// queued before the free is done (no device-wide synchronisation).
std::shared_ptr<std::byte> device_alloc(const std::shared_ptr<StreamOwner>& owner, size_t bytes,
                                        const std::string& what) {
  void* p = nullptr;
  PARITRON_CUDA_CHECK(cudaMallocAsync(&p, std::max<size_t>(bytes, 16), owner->stream),
                      fmt::format("{}: allocating {} bytes", what, bytes));
  return std::shared_ptr<std::byte>(static_cast<std::byte*>(p), [owner](std::byte* q) {
    (void)cudaFreeAsync(q, owner->stream);  // a deleter cannot throw; a failure here is a torn-down context
  });
}

}  // namespace

void* CudaBackend::workspace(size_t bytes) {
  if (bytes > impl_->scratch_bytes || !impl_->scratch) {
    impl_->scratch.reset();
    const size_t grown = std::max(bytes, impl_->scratch_bytes + impl_->scratch_bytes / 2);
    impl_->scratch = device_alloc(impl_->owner, grown, "workspace");
    impl_->scratch_bytes = grown;
  }
  return impl_->scratch.get();
}

DTensor CudaBackend::empty(DType dtype, Shape shape) {
  for (int64_t d : shape) {
    if (d < 0) throw BackendError(fmt::format("empty: negative extent in {}", shape_string(shape)));
  }
  const size_t bytes = storage_bytes(dtype, shape);
  auto storage = device_alloc(impl_->owner, bytes, fmt::format("empty {}{}", dtype_name(dtype), shape_string(shape)));
  return DTensor(std::move(storage), 0, dtype, dtype, std::move(shape));
}

DTensor CudaBackend::zeros(DType dtype, Shape shape) {
  DTensor t = empty(dtype, std::move(shape));
  // All-zero bytes are +0 in every float format and 0 in every integer one.
  PARITRON_CUDA_CHECK(cudaMemsetAsync(t.data(), 0, t.nbytes(), impl_->owner->stream), "zeros " + t.describe());
  return t;
}

DTensor CudaBackend::upload(const Tensor& host, DType dtype) {
  if (!is_floating(dtype) && host.dtype() != dtype) {
    throw BackendError(fmt::format("upload: a {} tensor cannot be uploaded as {}", dtype_name(host.dtype()),
                                   dtype_name(dtype)));
  }
  // The values rounded to dtype on the host (Tensor::to: RNE, the same
  // rounding the CPU backend applies), then one copy of the storage bytes.
  const Tensor converted = host.dtype() == dtype ? Tensor() : host.to(dtype);
  const Tensor& src = host.dtype() == dtype ? host : converted;
  DTensor t = empty(dtype, host.shape());
  if (t.nbytes() > 0) {
    // Pageable source: the call returns once the bytes are staged, so the
    // host buffer may go away after it.
    PARITRON_CUDA_CHECK(cudaMemcpyAsync(t.data(), src.bytes().data(), t.nbytes(), cudaMemcpyHostToDevice,
                                        impl_->owner->stream),
                        "upload " + t.describe());
  }
  return t;
}

Tensor CudaBackend::download(const DTensor& t) {
  if (!t.defined()) throw BackendError("download: the tensor is not allocated");
  Tensor host(t.dtype(), t.shape());
  if (t.storage_dtype() != t.dtype()) {
    throw BackendError(fmt::format("download: {} is not a tensor of the CUDA backend", t.describe()));
  }
  if (t.nbytes() > 0) {
    PARITRON_CUDA_CHECK(cudaMemcpyAsync(host.bytes().data(), t.data(), t.nbytes(), cudaMemcpyDeviceToHost,
                                        impl_->owner->stream),
                        "download " + t.describe());
  }
  PARITRON_CUDA_CHECK(cudaStreamSynchronize(impl_->owner->stream), "download " + t.describe());
  return host;
}

void CudaBackend::synchronize() {
  PARITRON_CUDA_CHECK(cudaStreamSynchronize(impl_->owner->stream), "synchronize");
}

}  // namespace paritron::opt::cuda
