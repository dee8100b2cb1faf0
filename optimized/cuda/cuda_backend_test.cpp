// Host-run tests of the CUDA backend's device selection (optimized/cuda/
// cuda_backend.h, make_backend in optimized/backend.h). They run on every
// machine of a CUDA build: without a device (the development and CI machines,
// toolchain.md: cudaGetDeviceCount fails with cudaErrorInsufficientDriver
// there) the backend must refuse with a message that says why; with one, the
// "no device" expectations skip and the positive cases run instead. The op
// tests are cuda_backend_device_test.cpp.
#include "optimized/cuda/cuda_backend.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "common/error.h"
#include "optimized/backend.h"

namespace paritron::opt::cuda {
namespace {

// Runs f, which must throw BackendError; returns its message.
template <class F>
std::string backend_error_of(F&& f) {
  try {
    f();
  } catch (const BackendError& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a BackendError: " << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no BackendError thrown";
  return "";
}

TEST(CudaBackendHost, DeviceAvailableGivesTheSameAnswerEveryTime) {
  std::string why;
  const bool have = device_available(&why);
  EXPECT_EQ(device_available(), have);  // why may be null
  EXPECT_EQ(device_available(&why), have);
}

TEST(CudaBackendHost, NoDeviceMeansFalseWithAReason) {
  if (device_available()) GTEST_SKIP() << "a device is present";
  std::string why;
  EXPECT_FALSE(device_available(&why));
  EXPECT_FALSE(why.empty());
}

TEST(CudaBackendHost, MakeBackendCudaWithoutADeviceNamesTheReason) {
  if (device_available()) GTEST_SKIP() << "a device is present";
  std::string why;
  ASSERT_FALSE(device_available(&why));
  const std::string msg = backend_error_of([] { (void)make_backend("cuda"); });
  EXPECT_NE(msg.find("no CUDA device is usable"), std::string::npos) << msg;
  EXPECT_NE(msg.find(why), std::string::npos) << "the reason '" << why << "' is not in: " << msg;
  EXPECT_NE(msg.find("cuda"), std::string::npos) << msg;
}

TEST(CudaBackendHost, ConstructingWithoutADeviceThrowsTheSame) {
  if (device_available()) GTEST_SKIP() << "a device is present";
  std::string why;
  ASSERT_FALSE(device_available(&why));
  const std::string direct = backend_error_of([] { CudaBackend backend; });
  EXPECT_NE(direct.find("no CUDA device is usable"), std::string::npos) << direct;
  EXPECT_NE(direct.find(why), std::string::npos) << direct;
  EXPECT_EQ(direct, backend_error_of([] { (void)make_backend("cuda"); }));
  const std::string indexed = backend_error_of([] { CudaBackend backend(0); });
  EXPECT_NE(indexed.find("no CUDA device is usable"), std::string::npos) << indexed;
  // A failed construction leaves no stream behind for the device-local comm.
  EXPECT_EQ(current_stream(), nullptr);
}

TEST(CudaBackendHost, UnknownBackendNamesWhatThisBuildHas) {
  const std::string msg = backend_error_of([] { (void)make_backend("tpu"); });
  EXPECT_NE(msg.find("tpu"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cpu"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cuda"), std::string::npos) << msg;
  EXPECT_EQ(make_backend("cpu")->name(), "cpu");  // the CPU backend needs no device
}

// With a device: the backend by name, its stream registered as the current
// one while it lives, and a device index out of range refused by name.
TEST(CudaBackendHost, MakeBackendCudaOnADevice) {
  std::string why;
  if (!device_available(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  std::unique_ptr<Backend> backend = make_backend("cuda");
  EXPECT_EQ(backend->name(), "cuda");
  auto* cuda = dynamic_cast<CudaBackend*>(backend.get());
  ASSERT_NE(cuda, nullptr);
  EXPECT_NE(cuda->stream(), nullptr);
  EXPECT_EQ(current_stream(), cuda->stream());
  backend.reset();
  EXPECT_EQ(current_stream(), nullptr);
  const std::string msg = backend_error_of([] { CudaBackend out_of_range(4096); });
  EXPECT_NE(msg.find("4096"), std::string::npos) << msg;
}

}  // namespace
}  // namespace paritron::opt::cuda
