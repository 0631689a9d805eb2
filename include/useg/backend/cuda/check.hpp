// useg/backend/cuda/check.hpp — checked CUDA, cuDNN and cuBLAS calls.
//
// Every runtime/library call of the CUDA backend goes through one of these macros. A failure
// throws useg::cuda_error (a useg::backend_error) whose message names the call as written, the
// file and line, the library and its own error name and text, e.g.
//   useg::cuda: cudaMalloc(&p, bytes) failed at ops.hpp:42: cudaErrorMemoryAllocation (out of memory)
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <string>

#include "useg/core/error.hpp"

namespace useg {

/// A failed CUDA runtime, cuDNN or cuBLAS call. library() is "CUDA", "cuDNN" or "cuBLAS";
/// code() is the library's status value.
struct cuda_error : backend_error {
  cuda_error(const std::string& msg, const char* library, int code) : backend_error(msg), library_(library), code_(code) {}
  const char* library() const noexcept { return library_; }
  int code() const noexcept { return code_; }

 private:
  const char* library_;
  int code_;
};

namespace detail {
inline const char* file_basename(const char* path) {
  const char* b = path;
  for (const char* p = path; *p; ++p)
    if (*p == '/' || *p == '\\') b = p + 1;
  return b;
}
[[noreturn]] inline void throw_cuda_error(const char* library, int code, const char* name, const char* text, const char* call,
                                          const char* file, int line) {
  throw cuda_error(std::string("useg::cuda: ") + call + " failed at " + file_basename(file) + ":" + std::to_string(line) +
                       ": " + library + " " + (name ? name : "?") + " (" + (text ? text : "unknown error") + ")",
                   library, code);
}
inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // reset the (non-sticky) last-error state for later calls
    throw_cuda_error("CUDA", static_cast<int>(e), cudaGetErrorName(e), cudaGetErrorString(e), call, file, line);
  }
}
inline void check_cudnn(cudnnStatus_t s, const char* call, const char* file, int line) {
  if (s != CUDNN_STATUS_SUCCESS) {
    // cuDNN 9 keeps a more specific message for the last failure of this thread.
    char detail_msg[512] = {0};
    cudnnGetLastErrorString(detail_msg, sizeof(detail_msg));
    std::string text = cudnnGetErrorString(s);
    if (detail_msg[0]) text += std::string("; ") + detail_msg;
    throw_cuda_error("cuDNN", static_cast<int>(s), cudnnGetErrorString(s), text.c_str(), call, file, line);
  }
}
inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw_cuda_error("cuBLAS", static_cast<int>(s), cublasGetStatusName(s), cublasGetStatusString(s), call, file, line);
}
}  // namespace detail

}  // namespace useg

/// Check a CUDA runtime call (cudaError_t).
#define USEG_CUDA_CHECK(call) ::useg::detail::check_cuda((call), #call, __FILE__, __LINE__)
/// Check a cuDNN call (cudnnStatus_t).
#define USEG_CUDNN_CHECK(call) ::useg::detail::check_cudnn((call), #call, __FILE__, __LINE__)
/// Check a cuBLAS call (cublasStatus_t).
#define USEG_CUBLAS_CHECK(call) ::useg::detail::check_cublas((call), #call, __FILE__, __LINE__)
/// Check the launch of the kernel just enqueued (configuration errors surface here; errors during
/// execution surface at the next synchronizing call). Define USEG_CUDA_SYNC_CHECKS to synchronize
/// after every launch, so that execution errors are reported at the kernel that caused them.
#ifdef USEG_CUDA_SYNC_CHECKS
#define USEG_CUDA_CHECK_LAUNCH(name)                                                              \
  do {                                                                                            \
    ::useg::detail::check_cuda(cudaGetLastError(), "launch of " name, __FILE__, __LINE__);        \
    ::useg::detail::check_cuda(cudaDeviceSynchronize(), "execution of " name, __FILE__, __LINE__); \
  } while (0)
#else
#define USEG_CUDA_CHECK_LAUNCH(name) ::useg::detail::check_cuda(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)
#endif
