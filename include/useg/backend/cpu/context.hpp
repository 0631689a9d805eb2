// useg/backend/cpu/context.hpp — the CPU backend's run-time context and memory.
#pragma once
#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <new>
#include <thread>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <Eigen/Core>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "useg/core/backend.hpp"
#include "useg/core/error.hpp"

namespace useg {

namespace detail {
/// Blocks of at least this many bytes are mapped from the system directly (and unmapped when
/// the cache lets them go), so memory given back leaves the resident set; smaller ones use
/// malloc.
inline constexpr std::size_t cpu_map_min = std::size_t(1) << 20;
inline void* cpu_system_alloc(std::size_t bytes) {
#if defined(__linux__)
  if (bytes >= cpu_map_min) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }
#endif
  return std::aligned_alloc(64, bytes);
}
inline void cpu_system_free(void* p, std::size_t bytes) noexcept {
#if defined(__linux__)
  if (bytes >= cpu_map_min) {
    munmap(p, bytes);
    return;
  }
#endif
  (void)bytes;
  std::free(p);
}

/// Host memory for the CPU backend: 64-byte aligned (AVX-512 friendly), with a small header that
/// records the block size. Blocks of 64 KiB and more are cached when freed and handed out again
/// for requests of the same size class, so tensors that are released and re-created every
/// training step (transient activations and gradients) reuse the same memory instead of going
/// back to the system; cached blocks that would raise the memory held above the peak of live
/// tensors are freed. cpu_trim_cache() returns all cached blocks to the system.
struct cpu_block_cache {
  static constexpr std::size_t header = 64;
  static constexpr std::size_t min_cached = std::size_t(1) << 16;
  /// The least the cache may hold above the live peak (see take()).
  static constexpr std::size_t min_slack = std::size_t(64) << 20;
  std::mutex m;
  struct cached_block {
    void* p;
    std::uint64_t stamp;  // when it was freed
  };
  std::multimap<std::size_t, cached_block> free_blocks;  // total bytes (header included) -> block
  std::uint64_t clock = 0;
  std::size_t cached_bytes = 0;
  std::size_t live_bytes = 0, peak_live_bytes = 0;  // blocks handed out (all sizes)
  std::size_t system_allocs = 0;                     // blocks of >= min_cached bytes taken from the system
  static cpu_block_cache& get() {
    static cpu_block_cache* c = new cpu_block_cache;  // never destroyed: tensors may outlive statics
    return *c;
  }
  /// Size classes: multiples of 1/8 of the power of two below (at most 12.5% rounding).
  static std::size_t round_up(std::size_t bytes) {
    if (bytes < min_cached) return (bytes + 63) / 64 * 64;  // (a multiple of 4 KiB from 64 KiB on)
    std::size_t p = min_cached;
    while (p * 2 <= bytes) p *= 2;
    const std::size_t step = p / 8;
    return (bytes + step - 1) / step * step;
  }
  /// A cached block for `bytes`, or null after making room: cached blocks are freed, least
  /// recently freed first, until live + cached + bytes fits under the high-water mark of live
  /// bytes plus 12.5% or 64 MiB, whichever is more, so that memory held for reuse raises the
  /// resident peak little. (The 64 MiB floor matters for small models: batch-1 inference frees
  /// every activation as soon as it is consumed, and with a 12.5% margin alone the cache kept
  /// giving blocks back and mapping new ones, 20-70 times per image, which cost up to 40% of the
  /// time in page faults.)
  void* take(std::size_t bytes) {
    if (bytes < min_cached) return nullptr;
    std::lock_guard<std::mutex> lock(m);
    auto it = free_blocks.find(bytes);
    if (it != free_blocks.end()) {
      void* p = it->second.p;
      cached_bytes -= it->first;
      free_blocks.erase(it);
      return p;
    }
    const std::size_t limit = std::max(peak_live_bytes + std::max(peak_live_bytes / 8, min_slack), live_bytes + bytes);
    while (!free_blocks.empty() && live_bytes + cached_bytes + bytes > limit) {
      auto victim = free_blocks.begin();  // the least recently freed
      for (auto v = free_blocks.begin(); v != free_blocks.end(); ++v)
        if (v->second.stamp < victim->second.stamp) victim = v;
      cpu_system_free(victim->second.p, victim->first);
      cached_bytes -= victim->first;
      free_blocks.erase(victim);
    }
    return nullptr;
  }
  bool give(void* p, std::size_t bytes) {
    if (bytes < min_cached) return false;
    std::lock_guard<std::mutex> lock(m);
    free_blocks.emplace(bytes, cached_block{p, ++clock});
    cached_bytes += bytes;
    return true;
  }
  void trim() {
    std::lock_guard<std::mutex> lock(m);
    for (auto& [b, blk] : free_blocks) cpu_system_free(blk.p, b);
    free_blocks.clear();
    cached_bytes = 0;
  }
};

template <class T>
T* cpu_allocate(std::size_t n) {
  if (n == 0) return nullptr;
  const std::size_t bytes = cpu_block_cache::round_up(n * sizeof(T) + cpu_block_cache::header);
  void* p = cpu_block_cache::get().take(bytes);
  if (!p) {
    if (bytes >= cpu_block_cache::min_cached) {
      auto& c = cpu_block_cache::get();
      std::lock_guard<std::mutex> lock(c.m);
      ++c.system_allocs;
    }
    p = cpu_system_alloc(bytes);
    if (!p) throw backend_error("useg::cpu: out of memory allocating " + std::to_string(bytes) + " bytes");
  }
  *static_cast<std::size_t*>(p) = bytes;
  {
    auto& c = cpu_block_cache::get();
    std::lock_guard<std::mutex> lock(c.m);
    c.live_bytes += bytes;
    c.peak_live_bytes = std::max(c.peak_live_bytes, c.live_bytes);
  }
  return reinterpret_cast<T*>(static_cast<char*>(p) + cpu_block_cache::header);
}
inline void cpu_free(void* q) noexcept {
  if (!q) return;
  void* p = static_cast<char*>(q) - cpu_block_cache::header;
  const std::size_t bytes = *static_cast<std::size_t*>(p);
  {
    auto& c = cpu_block_cache::get();
    std::lock_guard<std::mutex> lock(c.m);
    c.live_bytes -= bytes;
  }
  bool cached = false;
  try {
    cached = cpu_block_cache::get().give(p, bytes);
  } catch (...) {
    cached = false;
  }
  if (!cached) cpu_system_free(p, bytes);
}
}  // namespace detail

/// Return the CPU backend's cached free blocks to the system (see detail::cpu_block_cache).
inline void cpu_trim_cache() { detail::cpu_block_cache::get().trim(); }
/// CPU backend memory: bytes in tensors and workspaces now, their peak, and bytes held in the
/// cache of free blocks.
struct cpu_memory_stats {
  std::size_t live = 0, peak_live = 0, cached = 0;
  std::size_t system_allocs = 0;  ///< large blocks taken from the system so far (cache misses)
};
inline cpu_memory_stats cpu_memory() {
  auto& c = detail::cpu_block_cache::get();
  std::lock_guard<std::mutex> lock(c.m);
  return {c.live_bytes, c.peak_live_bytes, c.cached_bytes, c.system_allocs};
}
/// Bytes currently held in the CPU backend's cache of free blocks.
inline std::size_t cpu_cached_bytes() {
  auto& c = detail::cpu_block_cache::get();
  std::lock_guard<std::mutex> lock(c.m);
  return c.cached_bytes;
}

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
