// CUDA backend infrastructure that is testable with or without a GPU: the checked-call macros
// report the call, file, line and the library's own error name and text; without a device,
// contexts (and so models) refuse to start with a clear message, and cuda_device_count() says 0.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <string>

#include "useg/backend/cuda.hpp"
#include "useg/models/unet_skeleton.hpp"

TEST_CASE("checked CUDA runtime calls throw cuda_error naming the call, file, line and error") {
  const int line = __LINE__ + 2;
  try {
    USEG_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL("no exception");
  } catch (const useg::cuda_error& e) {
    const std::string m = e.what();
    CHECK(m.find("cudaErrorInvalidValue") != std::string::npos);            // the call as written
    CHECK(m.find("infra.cu:" + std::to_string(line)) != std::string::npos);  // file and line
    CHECK(m.find("invalid argument") != std::string::npos);                 // the runtime's own text
    CHECK(std::string(e.library()) == "CUDA");
    CHECK(e.code() == static_cast<int>(cudaErrorInvalidValue));
  }
  // a cuda_error is a useg::backend_error and a useg::error
  CHECK_THROWS_AS(USEG_CUDA_CHECK(cudaErrorMemoryAllocation), useg::backend_error);
  CHECK_THROWS_WITH_AS(USEG_CUDA_CHECK(cudaErrorMemoryAllocation), doctest::Contains("out of memory"), useg::error);
  CHECK_NOTHROW(USEG_CUDA_CHECK(cudaSuccess));
}

TEST_CASE("checked cuDNN and cuBLAS calls throw cuda_error with the library's status name and text") {
  CHECK_THROWS_WITH_AS(USEG_CUDNN_CHECK(CUDNN_STATUS_BAD_PARAM), doctest::Contains("CUDNN_STATUS_BAD_PARAM"), useg::cuda_error);
  CHECK_THROWS_WITH_AS(USEG_CUDNN_CHECK(CUDNN_STATUS_BAD_PARAM), doctest::Contains("cuDNN"), useg::cuda_error);
  CHECK_THROWS_WITH_AS(USEG_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE), doctest::Contains("CUBLAS_STATUS_INVALID_VALUE"),
                       useg::cuda_error);
  try {
    USEG_CUBLAS_CHECK(CUBLAS_STATUS_NOT_INITIALIZED);
  } catch (const useg::cuda_error& e) {
    CHECK(std::string(e.library()) == "cuBLAS");
    CHECK(std::string(e.what()).find("USEG_CUBLAS_CHECK") == std::string::npos);  // the call, not the macro
    CHECK(std::string(e.what()).find("CUBLAS_STATUS_NOT_INITIALIZED") != std::string::npos);
  }
  CHECK_NOTHROW(USEG_CUDNN_CHECK(CUDNN_STATUS_SUCCESS));
  CHECK_NOTHROW(USEG_CUBLAS_CHECK(CUBLAS_STATUS_SUCCESS));
}

TEST_CASE("contexts and models refuse to start without a GPU, with a clear message, and start with one") {
  using model = useg::unet_skeleton<useg::cuda, 3, 1, useg::conv_encoder, useg::identity_skip>;
  useg::unet_config cfg;
  cfg.width = 2;
  cfg.depth = 2;
  if (!useg::cuda_available()) {
    CHECK(useg::cuda_device_count() == 0);
    CHECK_THROWS_WITH_AS(useg::context<useg::cuda>{}, doctest::Contains("no usable CUDA device"), useg::cuda_error);
    CHECK_THROWS_WITH_AS(model{cfg}, doctest::Contains("use useg::cpu"), useg::backend_error);
    // no device memory was taken from the pool along the way
    CHECK(useg::cuda_memory_statistics().in_use == 0);
  } else {
    useg::context<useg::cuda> ctx;
    CHECK(ctx.multiprocessors() > 0);
    CHECK(ctx.options().allow_tf32);  // PyTorch's default for cuDNN convolutions
    model m(cfg);
    CHECK(m.num_parameters() > 0);
    useg::cuda_options o;
    o.device = useg::cuda_device_count();
    CHECK_THROWS_WITH_AS(useg::context<useg::cuda>{o}, doctest::Contains("requested but only"), useg::cuda_error);
  }
}

TEST_CASE("the CUDA backend tag") {
  static_assert(std::is_same_v<useg::cuda::scalar, float>);
  static_assert(useg::cuda::on_device);
  static_assert(useg::is_backend<useg::cuda>::value);
  CHECK(std::string(useg::cuda::name) == "cuda");
}
