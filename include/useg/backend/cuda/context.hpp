// useg/backend/cuda/context.hpp — the useg::cuda tag and its run-time context: device, stream,
// cuDNN and cuBLAS handles, a reusable workspace, and the cache of convolution plans (cuDNN
// descriptors plus the algorithm chosen once per shape).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <array>
#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "useg/backend/cuda/check.hpp"
#include "useg/backend/cuda/memory.hpp"
#include "useg/core/backend.hpp"

namespace useg {

/// The CUDA backend: float32 tensors in device memory; convolutions through cuDNN, the rest
/// through useg's own kernels and cuBLAS. Declared in useg/core/backend.hpp.
struct cuda {
  using scalar = float;
  static constexpr bool on_device = true;
  static constexpr const char* name = "cuda";
};

/// Number of CUDA devices this process can use (0 when there is no driver or no GPU). Never throws.
inline int cuda_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}
/// True when at least one CUDA device can be used.
inline bool cuda_available() noexcept { return cuda_device_count() > 0; }

/// Options of a CUDA context.
struct cuda_options {
  int device = -1;             ///< device ordinal; -1: the current device
  bool allow_tf32 = true;      ///< cuDNN convolutions may use TF32 tensor cores (PyTorch's default);
                               ///< false: strict FP32 (CUDNN_FMA_MATH)
  bool deterministic = false;  ///< only deterministic cuDNN algorithms, chosen by heuristics, so that
                               ///< runs repeat bit for bit (useg's own kernels always are)
  bool benchmark = false;      ///< time the cuDNN algorithms once per shape (cudnnFind*) instead of
                               ///< taking the heuristic's choice; ignored when deterministic
  bool own_stream = false;     ///< run on a new stream instead of the legacy default stream
};

namespace detail {

/// A cuDNN convolution problem: input (n, c, h, w), filter (k, c, r, r), stride, padding.
struct cudnn_conv_key {
  int n, c, h, w, k, r, stride, pad;
  auto tie() const { return std::tie(n, c, h, w, k, r, stride, pad); }
  friend bool operator<(const cudnn_conv_key& a, const cudnn_conv_key& b) { return a.tie() < b.tie(); }
  std::string str() const {
    return "input [" + std::to_string(n) + ", " + std::to_string(c) + ", " + std::to_string(h) + ", " + std::to_string(w) +
           "], filter [" + std::to_string(k) + ", " + std::to_string(c) + ", " + std::to_string(r) + ", " + std::to_string(r) +
           "], stride " + std::to_string(stride) + ", pad " + std::to_string(pad);
  }
};

/// One chosen algorithm: its id, math type and workspace size.
template <class Algo>
struct cudnn_choice {
  bool ready = false;
  Algo algo{};
  cudnnMathType_t math = CUDNN_DEFAULT_MATH;
  std::size_t workspace = 0;
};

/// Descriptors of one convolution shape and the algorithms chosen for it (per direction, on
/// first use).
struct cudnn_conv_plan {
  cudnn_conv_key key{};
  int oh = 0, ow = 0;
  cudnnTensorDescriptor_t x = nullptr, y = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;
  cudnn_choice<cudnnConvolutionFwdAlgo_t> fwd;
  cudnn_choice<cudnnConvolutionBwdDataAlgo_t> bwd_data;
  cudnn_choice<cudnnConvolutionBwdFilterAlgo_t> bwd_filter;

  explicit cudnn_conv_plan(const cudnn_conv_key& k) : key(k) {
    oh = (k.h + 2 * k.pad - k.r) / k.stride + 1;
    ow = (k.w + 2 * k.pad - k.r) / k.stride + 1;
    try {
      USEG_CUDNN_CHECK(cudnnCreateTensorDescriptor(&x));
      USEG_CUDNN_CHECK(cudnnCreateTensorDescriptor(&y));
      USEG_CUDNN_CHECK(cudnnCreateFilterDescriptor(&w));
      USEG_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&conv));
      USEG_CUDNN_CHECK(cudnnSetTensor4dDescriptor(x, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, k.n, k.c, k.h, k.w));
      USEG_CUDNN_CHECK(cudnnSetTensor4dDescriptor(y, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, k.n, k.k, oh, ow));
      USEG_CUDNN_CHECK(cudnnSetFilter4dDescriptor(w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, k.k, k.c, k.r, k.r));
      USEG_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(conv, k.pad, k.pad, k.stride, k.stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                                       CUDNN_DATA_FLOAT));
    } catch (...) {
      destroy();
      throw;
    }
  }
  cudnn_conv_plan(const cudnn_conv_plan&) = delete;
  cudnn_conv_plan& operator=(const cudnn_conv_plan&) = delete;
  ~cudnn_conv_plan() { destroy(); }

 private:
  void destroy() noexcept {
    if (conv) cudnnDestroyConvolutionDescriptor(conv);
    if (w) cudnnDestroyFilterDescriptor(w);
    if (y) cudnnDestroyTensorDescriptor(y);
    if (x) cudnnDestroyTensorDescriptor(x);
    conv = nullptr;
    w = nullptr;
    x = y = nullptr;
  }
};

/// A device buffer from the pool that grows on demand and is never shrunk.
class cuda_buffer {
 public:
  cuda_buffer() = default;
  cuda_buffer(const cuda_buffer&) = delete;
  cuda_buffer& operator=(const cuda_buffer&) = delete;
  ~cuda_buffer() { cuda_pool::instance().deallocate(p_); }
  void* get(std::size_t bytes) {
    if (bytes > size_) {
      cuda_pool::instance().deallocate(p_);
      p_ = nullptr;
      size_ = 0;
      p_ = cuda_pool::instance().allocate(bytes);
      size_ = bytes;
    }
    return p_;
  }
  std::size_t size() const { return size_; }

 private:
  void* p_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace detail

/// CUDA context: one device, one stream, cuDNN and cuBLAS handles bound to that stream, a
/// workspace (grown on demand, never shrunk), small scratch buffers for reductions, and the
/// convolution plans. ops<cuda> enqueue their work on stream(); the ones that return a host
/// value (losses, sum, dot, class_indices_valid) synchronize the stream.
///
/// Construction throws useg::cuda_error when no CUDA device is usable.
template <>
struct context<cuda> {
  explicit context(cuda_options o = {}) : opt_(o) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
      (void)cudaGetLastError();
      throw cuda_error(std::string("useg::cuda: no usable CUDA device (cudaGetDeviceCount: ") +
                           (e != cudaSuccess ? std::string(cudaGetErrorName(e)) + ", " + cudaGetErrorString(e)
                                             : std::string("0 devices")) +
                           "); use useg::cpu, or run on a machine with an NVIDIA GPU and driver",
                       "CUDA", static_cast<int>(e));
    }
    if (o.device >= count)
      throw cuda_error("useg::cuda: device " + std::to_string(o.device) + " requested but only " + std::to_string(count) +
                           " CUDA device(s) present",
                       "CUDA", static_cast<int>(cudaErrorInvalidDevice));
    if (o.device >= 0) USEG_CUDA_CHECK(cudaSetDevice(o.device));
    USEG_CUDA_CHECK(cudaGetDevice(&device_));
    USEG_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device_));
    try {
      if (o.own_stream) {
        USEG_CUDA_CHECK(cudaStreamCreate(&stream_));  // a blocking stream: ordered with the legacy stream
        detail::cuda_pool::instance().add_own_stream();
        own_stream_ = true;
      } else {
        stream_ = cudaStreamLegacy;
      }
      USEG_CUDNN_CHECK(cudnnCreate(&cudnn_));
      USEG_CUDNN_CHECK(cudnnSetStream(cudnn_, stream_));
      USEG_CUBLAS_CHECK(cublasCreate(&cublas_));
      USEG_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    } catch (...) {
      release();
      throw;
    }
  }
  context(const context&) = delete;
  context& operator=(const context&) = delete;
  ~context() { release(); }

  cudaStream_t stream() const { return stream_; }
  cudnnHandle_t cudnn() const { return cudnn_; }
  cublasHandle_t cublas() const { return cublas_; }
  int device() const { return device_; }
  int multiprocessors() const { return sms_; }
  const cuda_options& options() const { return opt_; }

  /// Strict FP32 (false) or TF32 (true) for cuDNN convolutions. Clears the algorithm cache.
  void set_allow_tf32(bool on) {
    opt_.allow_tf32 = on;
    plans_.clear();
  }
  /// Deterministic cuDNN algorithms. Clears the algorithm cache.
  void set_deterministic(bool on) {
    opt_.deterministic = on;
    plans_.clear();
  }
  /// Benchmark the cuDNN algorithms per shape. Clears the algorithm cache.
  void set_benchmark(bool on) {
    opt_.benchmark = on;
    plans_.clear();
  }

  /// A device scratch buffer of at least n floats, valid until the next workspace call.
  float* workspace(std::size_t n) { return static_cast<float*>(ws_.get(n * sizeof(float))); }
  void* workspace_bytes(std::size_t bytes) { return ws_.get(bytes); }
  std::size_t workspace_size() const { return ws_.size() / sizeof(float); }

  /// Wait until all work enqueued on this context's stream has finished.
  void synchronize() { USEG_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  /// Internal: small device scratch of n elements of U in one of four slots (reduction
  /// partials, per-channel coefficients, results, spare) — distinct from workspace().
  template <class U>
  U* scratch(int slot, std::size_t n) {
    return static_cast<U*>(scratch_[static_cast<std::size_t>(slot)].get(n * sizeof(U)));
  }
  /// Internal: n doubles of pinned host memory for reading reduction results.
  double* host_results(std::size_t n) {
    if (n > host_n_) {
      if (host_) (void)cudaFreeHost(host_);
      host_ = nullptr;
      host_n_ = 0;
      USEG_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_), n * sizeof(double)));
      host_n_ = n;
    }
    return host_;
  }

  /// Internal: the plan of a convolution shape (descriptors + chosen algorithms), built once.
  detail::cudnn_conv_plan& conv_plan(const detail::cudnn_conv_key& k) {
    auto it = plans_.find(k);
    if (it == plans_.end()) it = plans_.emplace(k, std::make_unique<detail::cudnn_conv_plan>(k)).first;
    return *it->second;
  }
  /// Number of cached convolution plans (for tests).
  std::size_t conv_plan_count() const { return plans_.size(); }

  /// Internal: choose (once) the forward algorithm of a plan and make the workspace large enough.
  const detail::cudnn_choice<cudnnConvolutionFwdAlgo_t>& forward_algo(detail::cudnn_conv_plan& p) {
    if (!p.fwd.ready) {
      int max = 0;
      USEG_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithmMaxCount(cudnn_, &max));
      std::vector<cudnnConvolutionFwdAlgoPerf_t> perf(static_cast<std::size_t>(max > 0 ? max : 1));
      int got = 0;
      set_search_math(p);
      if (use_find())
        USEG_CUDNN_CHECK(cudnnFindConvolutionForwardAlgorithm(cudnn_, p.x, p.w, p.conv, p.y, max, &got, perf.data()));
      else
        USEG_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(cudnn_, p.x, p.w, p.conv, p.y, max, &got, perf.data()));
      p.fwd = pick(perf.data(), got, p, "forward", [&](const cudnnConvolutionFwdAlgoPerf_t& r, std::size_t* ws) {
        return cudnnGetConvolutionForwardWorkspaceSize(cudnn_, p.x, p.w, p.conv, p.y, r.algo, ws);
      });
    }
    ws_.get(p.fwd.workspace);
    return p.fwd;
  }
  const detail::cudnn_choice<cudnnConvolutionBwdDataAlgo_t>& backward_data_algo(detail::cudnn_conv_plan& p) {
    if (!p.bwd_data.ready) {
      int max = 0;
      USEG_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithmMaxCount(cudnn_, &max));
      std::vector<cudnnConvolutionBwdDataAlgoPerf_t> perf(static_cast<std::size_t>(max > 0 ? max : 1));
      int got = 0;
      set_search_math(p);
      if (use_find())
        USEG_CUDNN_CHECK(cudnnFindConvolutionBackwardDataAlgorithm(cudnn_, p.w, p.y, p.conv, p.x, max, &got, perf.data()));
      else
        USEG_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithm_v7(cudnn_, p.w, p.y, p.conv, p.x, max, &got, perf.data()));
      p.bwd_data = pick(perf.data(), got, p, "backward-data", [&](const cudnnConvolutionBwdDataAlgoPerf_t& r, std::size_t* ws) {
        return cudnnGetConvolutionBackwardDataWorkspaceSize(cudnn_, p.w, p.y, p.conv, p.x, r.algo, ws);
      });
    }
    ws_.get(p.bwd_data.workspace);
    return p.bwd_data;
  }
  const detail::cudnn_choice<cudnnConvolutionBwdFilterAlgo_t>& backward_filter_algo(detail::cudnn_conv_plan& p) {
    if (!p.bwd_filter.ready) {
      int max = 0;
      USEG_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(cudnn_, &max));
      std::vector<cudnnConvolutionBwdFilterAlgoPerf_t> perf(static_cast<std::size_t>(max > 0 ? max : 1));
      int got = 0;
      set_search_math(p);
      if (use_find())
        USEG_CUDNN_CHECK(cudnnFindConvolutionBackwardFilterAlgorithm(cudnn_, p.x, p.y, p.conv, p.w, max, &got, perf.data()));
      else
        USEG_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithm_v7(cudnn_, p.x, p.y, p.conv, p.w, max, &got, perf.data()));
      p.bwd_filter = pick(perf.data(), got, p, "backward-filter", [&](const cudnnConvolutionBwdFilterAlgoPerf_t& r, std::size_t* ws) {
        return cudnnGetConvolutionBackwardFilterWorkspaceSize(cudnn_, p.x, p.y, p.conv, p.w, r.algo, ws);
      });
    }
    ws_.get(p.bwd_filter.workspace);
    return p.bwd_filter;
  }

 private:
  bool use_find() const { return opt_.benchmark && !opt_.deterministic; }
  /// The math type the search runs under: TF32 allowed (CUDNN_DEFAULT_MATH permits TF32 tensor
  /// cores on sm_80+ for float data) or strict FP32 (CUDNN_FMA_MATH).
  void set_search_math(detail::cudnn_conv_plan& p) {
    USEG_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv, opt_.allow_tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH));
  }
  /// The first usable result (in cuDNN's order: heuristic preference or measured time) that
  /// succeeded, is deterministic when asked, keeps FP32 inputs (no down-conversion to FP16), is
  /// FMA-only in strict mode, and whose workspace can be allocated.
  template <class Perf, class WsQuery>
  auto pick(const Perf* perf, int count, detail::cudnn_conv_plan& p, const char* dir, WsQuery&& ws_query)
      -> detail::cudnn_choice<decltype(Perf{}.algo)> {
    std::string tried;
    for (int i = 0; i < count; ++i) {
      const Perf& r = perf[i];
      if (r.status != CUDNN_STATUS_SUCCESS) continue;
      if (opt_.deterministic && r.determinism != CUDNN_DETERMINISTIC) continue;
      if (r.mathType == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION) continue;
      if (!opt_.allow_tf32 && r.mathType == CUDNN_TENSOR_OP_MATH) continue;
      const cudnnMathType_t math = opt_.allow_tf32 ? r.mathType : CUDNN_FMA_MATH;
      if (cudnnSetConvolutionMathType(p.conv, math) != CUDNN_STATUS_SUCCESS) continue;
      std::size_t ws = 0;
      if (ws_query(r, &ws) != CUDNN_STATUS_SUCCESS) continue;
      try {
        ws_.get(ws);
      } catch (const cuda_error&) {
        tried += " algo " + std::to_string(static_cast<int>(r.algo)) + " (workspace " + std::to_string(ws >> 20) + " MiB: no memory)";
        continue;
      }
      detail::cudnn_choice<decltype(Perf{}.algo)> c;
      c.ready = true;
      c.algo = r.algo;
      c.math = math;
      c.workspace = ws;
      return c;
    }
    throw cuda_error(std::string("useg::cuda: cuDNN offers no usable ") + dir + " convolution algorithm for " + p.key.str() +
                         (opt_.deterministic ? " (deterministic)" : "") + (opt_.allow_tf32 ? "" : " (strict FP32)") + tried,
                     "cuDNN", static_cast<int>(CUDNN_STATUS_NOT_SUPPORTED));
  }

  void release() noexcept {
    plans_.clear();
    if (cublas_) cublasDestroy(cublas_);
    if (cudnn_) cudnnDestroy(cudnn_);
    cublas_ = nullptr;
    cudnn_ = nullptr;
    if (host_) (void)cudaFreeHost(host_);
    host_ = nullptr;
    if (own_stream_) {
      (void)cudaStreamSynchronize(stream_);
      (void)cudaStreamDestroy(stream_);
      detail::cuda_pool::instance().remove_own_stream();
      own_stream_ = false;
    }
    (void)cudaGetLastError();
  }

  cuda_options opt_;
  int device_ = 0, sms_ = 1;
  cudaStream_t stream_ = cudaStreamLegacy;
  bool own_stream_ = false;
  cudnnHandle_t cudnn_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  detail::cuda_buffer ws_;
  std::array<detail::cuda_buffer, 4> scratch_;
  double* host_ = nullptr;
  std::size_t host_n_ = 0;
  std::map<detail::cudnn_conv_key, std::unique_ptr<detail::cudnn_conv_plan>> plans_;
};

}  // namespace useg
