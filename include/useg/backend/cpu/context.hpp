// useg/backend/cpu/context.hpp — the CPU backend's run-time context and memory.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <new>
#include <thread>

#include <Eigen/Core>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "useg/core/backend.hpp"
#include "useg/core/error.hpp"

namespace useg {

namespace detail {
/// 64-byte aligned host allocation (AVX-512 friendly).
template <class T>
T* cpu_allocate(std::size_t n) {
  if (n == 0) return nullptr;
  std::size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw backend_error("useg::cpu: out of memory allocating " + std::to_string(bytes) + " bytes");
  return static_cast<T*>(p);
}
inline void cpu_free(void* p) noexcept { std::free(p); }
}  // namespace detail

/// CPU context: thread count and a reusable workspace (grown on demand, never shrunk,
/// so a steady-state training step allocates nothing).
///
/// Threads are applied process-wide (OpenMP and Eigen keep global thread settings).
template <class T>
struct context<cpu_backend<T>> {
  /// threads > 0: set the process-wide thread count; threads <= 0: keep the current setting.
  explicit context(int threads = 0) {
    if (threads > 0) set_threads(threads);
    else threads_ = current_threads();
  }
  context(const context&) = delete;
  context& operator=(const context&) = delete;
  ~context() { detail::cpu_free(ws_); }

  /// threads <= 0: every hardware thread.
  void set_threads(int threads) {
    if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
    if (threads <= 0) threads = 1;
    threads_ = threads;
#ifdef _OPENMP
    omp_set_num_threads(threads_);
#endif
    Eigen::setNbThreads(threads_);
  }
  int threads() const { return threads_; }
  static int current_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return Eigen::nbThreads();
#endif
  }

  /// A scratch buffer of at least n elements, valid until the next workspace() call.
  T* workspace(std::size_t n) {
    if (n > ws_size_) {
      detail::cpu_free(ws_);
      ws_ = nullptr;
      ws_ = detail::cpu_allocate<T>(n);
      ws_size_ = n;
    }
    return ws_;
  }
  std::size_t workspace_size() const { return ws_size_; }
  /// Host code: nothing is asynchronous on the CPU.
  void synchronize() {}

 private:
  int threads_ = 1;
  T* ws_ = nullptr;
  std::size_t ws_size_ = 0;
};

}  // namespace useg
