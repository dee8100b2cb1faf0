// Device-local comm (issue #7): several ranks on ONE GPU, a thread and a
// stream each, with exactly ThreadComm's semantics (optimized/comm/comm.h is
// the contract, optimized/comm/thread_comm.h the implementation): the same
// rendezvous, mismatch checks and messages, abort, retire and timeouts. Only
// the data path differs: a CommMemory whose copies are cudaMemcpyAsync and
// whose sums are a reduction kernel, both on the rank's stream.
//
//   run_on_device_threads(4, [](Comm& comm) {
//     cuda::CudaBackend be;            // this thread's stream (cuda::current_stream())
//     DTensor t = be.upload(host, DType::BF16);
//     comm.all_reduce(t, world_group(comm.world_size(), comm.rank()));
//   });
//
// Streams: a rank's comm works on cuda::current_stream(), the stream of the
// CudaBackend its thread constructed last (the legacy default stream when
// there is none). Before posting a collective a rank synchronises that stream
// (its inputs must be ready for the peers, which read them directly); its
// copies and kernels are queued on it, and it synchronises again before
// signalling that it is done (the peers then reuse the buffers it read and
// read what it wrote). So a collective returns with its result in place, as
// ThreadComm's; nothing is left in flight.
//
// Results: all_reduce / reduce_scatter sum in member order in fp32 (double
// for F64 storage, exact for I32 / I64) and round once to the dtype: 16-bit
// tensors are stored as 2 bytes on the device (cuda_backend.h) and are
// widened on load and rounded (RNE) on store, so the bits equal ThreadComm's
// on the CPU backend's fp32-carried values, and every member gets identical
// bits (member i sums block i of the tensor and copies it to the others).
// F8 storage is not summable (the same error as ThreadComm's for host
// storages it cannot sum); a group is limited to 128 members per sum.
//
// send / recv are buffered as ThreadComm's: send copies the tensor to a host
// message (device-to-host, waiting for the copy), recv copies it back.
//
// Buffers are device memory of this GPU (any pointer cudaMemcpyDefault
// accepts also works for copies; sums read device memory only).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>

#include "optimized/comm/run_ranks.h"
#include "optimized/comm/thread_comm.h"

struct CUstream_st;  // cudaStream_t

namespace paritron::opt {

// Rank r's memory for a device-local ThreadWorld (comm name "device-threads";
// r only names the rank in error messages).
std::unique_ptr<CommMemory> make_device_comm_memory(int64_t rank);

// A ThreadWorld of world_size device-local ranks (rank r's thread uses
// world.comm(r) and constructs its own CudaBackend). Throws CommError when no
// CUDA device is usable.
std::unique_ptr<ThreadWorld> make_device_local_world(int64_t world_size);

// run_on_threads (optimized/comm/run_ranks.h) on device-local ranks: the same
// failure semantics (an exception aborts its rank's comm, the first failure
// is rethrown as RankFailed, a rank that returns retires). Throws CommError
// before starting any thread when no CUDA device is usable.
void run_on_device_threads(int64_t world_size, const std::function<void(Comm&)>& body,
                           std::chrono::milliseconds timeout = kDefaultCommTimeout);

// Kernels shared with the NCCL comm (optimized/comm/nccl_comm.cpp). All
// queue on `stream` and throw CommError "<context>: ..." on a CUDA error.
namespace device_comm_detail {

// dst[i] (F32) = src[i] widened from `storage` (BF16, F16, F32).
void widen_to_f32(const void* src, DType storage, float* dst, int64_t n, CUstream_st* stream,
                  std::string_view context);
// dst[i] = src[i] (stored as src_storage, F32 or F64, computed in that type),
// rounded to `dtype` first when round is true, then stored as dst_storage
// (RNE). dst may equal src when the storages match.
void store_rounded(const void* src, DType src_storage, void* dst, DType dst_storage, DType dtype, bool round,
                   int64_t n, CUstream_st* stream, std::string_view context);

}  // namespace device_comm_detail

}  // namespace paritron::opt
