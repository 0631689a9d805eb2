// useg/backend/cuda/memory.hpp — the process-wide caching pool of device memory.
//
// Tensors of useg::cuda get their storage here. Blocks come from cudaMalloc (never managed
// memory) and go back to the pool when a tensor is freed, so a steady-state training loop calls
// cudaMalloc only in its first step. When cudaMalloc fails, the cached blocks are released and
// the allocation retried once; a second failure throws useg::cuda_error with the sizes involved.
//
// Ordering: all useg work is ordered with the legacy default stream (contexts use it unless asked
// for their own stream, and own streams are blocking streams), so a block freed after being used
// on one stream can be reused at once. With two or more contexts on their own streams alive, a
// freed block could still be in use on another stream: the pool then synchronizes the device
// before caching a freed block.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "useg/backend/cuda/check.hpp"

namespace useg {

/// Counters of the CUDA caching pool (bytes).
struct cuda_memory_stats {
  std::size_t in_use = 0;        ///< bytes held by live tensors and workspaces
  std::size_t cached = 0;        ///< bytes held by the pool for reuse
  std::size_t peak_in_use = 0;   ///< high-water mark of in_use
  std::size_t malloc_calls = 0;  ///< number of cudaMalloc calls so far
};

namespace detail {

class cuda_pool {
 public:
  /// The pool lives until the process ends (never destroyed, so tensors with static storage
  /// duration can still give their memory back during exit).
  static cuda_pool& instance() {
    static cuda_pool* p = new cuda_pool();
    return *p;
  }

  void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    bytes = round(bytes);
    int dev = 0;
    USEG_CUDA_CHECK(cudaGetDevice(&dev));
    std::lock_guard<std::mutex> lock(m_);
    auto it = free_.lower_bound({dev, bytes});
    if (it != free_.end() && it->first.first == dev && it->first.second <= 2 * bytes) {
      void* p = it->second;
      const std::size_t got = it->first.second;
      free_.erase(it);
      cached_ -= got;
      note_live(p, got, dev);
      return p;
    }
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    ++malloc_calls_;
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      release_cached_locked();
      e = cudaMalloc(&p, bytes);
      ++malloc_calls_;
    }
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      std::size_t free_b = 0, total_b = 0;
      (void)cudaMemGetInfo(&free_b, &total_b);
      (void)cudaGetLastError();
      const auto mib = [](std::size_t b) { return std::to_string(b >> 20) + " MiB"; };
      throw cuda_error("useg::cuda: out of device memory allocating " + mib(bytes) + " on device " + std::to_string(dev) +
                           " (device: " + mib(free_b) + " free of " + mib(total_b) + "; useg pool: " + mib(in_use_) +
                           " in use) — cudaMalloc: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")",
                       "CUDA", static_cast<int>(e));
    }
    note_live(p, bytes, dev);
    return p;
  }

  void deallocate(void* p) noexcept {
    if (!p) return;
    std::lock_guard<std::mutex> lock(m_);
    auto it = live_.find(p);
    if (it == live_.end()) {  // not ours: give it back to CUDA directly
      (void)cudaFree(p);
      (void)cudaGetLastError();
      return;
    }
    const auto [bytes, dev] = it->second;
    live_.erase(it);
    in_use_ -= bytes;
    if (own_streams_ >= 2) {
      (void)cudaDeviceSynchronize();
      (void)cudaGetLastError();
    }
    free_.emplace(std::make_pair(dev, bytes), p);
    cached_ += bytes;
  }

  /// cudaFree every cached block (e.g. before handing the GPU to another library).
  void release_cached() {
    std::lock_guard<std::mutex> lock(m_);
    release_cached_locked();
  }

  cuda_memory_stats stats() {
    std::lock_guard<std::mutex> lock(m_);
    return {in_use_, cached_, peak_, malloc_calls_};
  }

  /// Contexts that create their own stream register it (see the ordering note above).
  void add_own_stream() {
    std::lock_guard<std::mutex> lock(m_);
    ++own_streams_;
  }
  void remove_own_stream() noexcept {
    std::lock_guard<std::mutex> lock(m_);
    --own_streams_;
  }

 private:
  cuda_pool() = default;

  /// 512-byte granules below 1 MiB, 2 MiB granules above (fewer distinct sizes to cache).
  static std::size_t round(std::size_t b) {
    constexpr std::size_t small = 512, large = std::size_t(2) << 20;
    return b < (std::size_t(1) << 20) ? (b + small - 1) / small * small : (b + large - 1) / large * large;
  }
  void note_live(void* p, std::size_t bytes, int dev) {
    live_.emplace(p, std::make_pair(bytes, dev));
    in_use_ += bytes;
    if (in_use_ > peak_) peak_ = in_use_;
  }
  void release_cached_locked() noexcept {
    for (auto& [key, p] : free_) (void)cudaFree(p);
    (void)cudaGetLastError();
    free_.clear();
    cached_ = 0;
  }

  std::mutex m_;
  std::multimap<std::pair<int, std::size_t>, void*> free_;       // (device, bytes) -> block
  std::unordered_map<void*, std::pair<std::size_t, int>> live_;  // block -> (bytes, device)
  std::size_t in_use_ = 0, cached_ = 0, peak_ = 0, malloc_calls_ = 0;
  int own_streams_ = 0;
};

}  // namespace detail

/// Statistics of the CUDA caching pool.
inline cuda_memory_stats cuda_memory_statistics() { return detail::cuda_pool::instance().stats(); }
/// Return every cached (free) block of the CUDA pool to the driver.
inline void cuda_release_cached_memory() { detail::cuda_pool::instance().release_cached(); }

}  // namespace useg
