// useg/backend/cpu/context.hpp — the CPU backend's run-time context and memory.
#pragma once
#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <iterator>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <map>
#include <mutex>
#include <utility>
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
/// Blocks of at least this many bytes (the ones the cache below keeps) are mapped from the system
/// directly, so that memory given back leaves the resident set and a cached block can be split
/// and resized without copying; smaller ones use malloc.
inline constexpr std::size_t cpu_map_min = std::size_t(1) << 16;
/// Whether those blocks are mappings (which can be split, joined and grown) or plain malloc'd
/// ones (which the cache can only hand out whole).
#if defined(__linux__)
inline constexpr bool cpu_blocks_mapped = true;
#else
inline constexpr bool cpu_blocks_mapped = false;
#endif
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
/// Move the pages of [src, src + bytes) to [dst, dst + bytes) (page-aligned; whatever was mapped
/// at dst is replaced): page-table entries move, no byte is copied and no page is faulted in.
/// The source range is unmapped afterwards. A range that spans two of the system's mappings is
/// moved in halves. False when the system can't (or has no mremap): part of the range may then
/// have moved, the rest is still at src.
inline bool cpu_system_move(char* src, std::size_t bytes, char* dst) noexcept {
#if defined(__linux__) && defined(MREMAP_FIXED)
  if (mremap(src, bytes, bytes, MREMAP_MAYMOVE | MREMAP_FIXED, dst) != MAP_FAILED) return true;
  constexpr std::size_t page = 4096;
  if (errno != EFAULT || bytes <= page) return false;
  const std::size_t half = bytes / 2 / page * page;
  return cpu_system_move(src, half, dst) && cpu_system_move(src + half, bytes - half, dst + half);
#else
  (void)src, (void)bytes, (void)dst;
  return false;
#endif
}

/// A 128-bit fingerprint of a byte range: two independent xxHash64-style streams (other seeds and
/// rotations), four lanes each, so it runs at memory speed. Two ranges that differ get the same
/// fingerprint with a probability of about 2^-128. (Used to recognize weights packed by the
/// previous convolution without keeping a copy of them.)
struct fingerprint {
  std::uint64_t a = 0, b = 0;
  friend bool operator==(const fingerprint&, const fingerprint&) = default;
};
inline fingerprint fingerprint128(const void* data, std::size_t bytes) {
  constexpr std::uint64_t p1 = 0x9E3779B185EBCA87ull, p2 = 0xC2B2AE3D27D4EB4Full, p3 = 0x165667B19E3779F9ull,
                          p4 = 0x85EBCA77C2B2AE63ull, p5 = 0x27D4EB2F165667C5ull;
  auto rotl = [](std::uint64_t x, int r) { return (x << r) | (x >> (64 - r)); };
  auto round_a = [&](std::uint64_t acc, std::uint64_t w) { return rotl(acc + w * p2, 31) * p1; };
  auto round_b = [&](std::uint64_t acc, std::uint64_t w) { return rotl(acc + w * p4, 27) * p3; };
  auto avalanche = [](std::uint64_t h) {
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ull;
    return h ^ (h >> 33);
  };
  const unsigned char* p = static_cast<const unsigned char*>(data);
  std::uint64_t a[4] = {p1 + p2, p2, 0, 0 - p1}, b[4] = {p3 + p4, p4, p5, 0 - p3};
  std::size_t i = 0;
  for (; i + 32 <= bytes; i += 32)
    for (int l = 0; l < 4; ++l) {
      std::uint64_t w;
      std::memcpy(&w, p + i + 8 * l, 8);
      a[l] = round_a(a[l], w);
      b[l] = round_b(b[l], w);
    }
  std::uint64_t ha = rotl(a[0], 1) + rotl(a[1], 7) + rotl(a[2], 12) + rotl(a[3], 18);
  std::uint64_t hb = rotl(b[0], 3) + rotl(b[1], 11) + rotl(b[2], 17) + rotl(b[3], 23);
  for (int l = 0; l < 4; ++l) {
    ha = (ha ^ round_a(0, a[l])) * p1 + p4;
    hb = (hb ^ round_b(0, b[l])) * p3 + p2;
  }
  for (; i < bytes; ++i) {  // the tail, byte by byte (weights are whole floats: at most 28 bytes)
    ha = rotl(ha ^ (p[i] * p5), 11) * p1;
    hb = rotl(hb ^ (p[i] * p1), 13) * p3;
  }
  return {avalanche(ha ^ bytes), avalanche(hb + bytes * p5)};
}
/// fingerprint128 of a large range on several threads: the fingerprints of `threads` parts (cut at
/// multiples of 32 bytes), fingerprinted together with the length. A different function from
/// fingerprint128, with the same collision odds; below 256 KiB, or on one thread, it is
/// fingerprint128. (The keep-packed check hashes every packed convolution's weights, and the
/// other thread waited.)
inline fingerprint fingerprint128_mt(const void* data, std::size_t bytes, int threads) {
  constexpr int max_parts = 16;
  const int parts = std::min(threads, max_parts);
  if (parts < 2 || bytes < (std::size_t(1) << 18)) return fingerprint128(data, bytes);
  fingerprint fp[max_parts + 1];
  const auto* p = static_cast<const unsigned char*>(data);
  const std::size_t chunk = (bytes / parts + 31) / 32 * 32;
#pragma omp parallel for schedule(static) num_threads(parts)
  for (int k = 0; k < parts; ++k) {
    const std::size_t b0 = std::min(bytes, chunk * k), b1 = k + 1 == parts ? bytes : std::min(bytes, chunk * (k + 1));
    fp[k] = fingerprint128(p + b0, b1 - b0);
  }
  fp[parts] = {bytes, static_cast<std::uint64_t>(parts)};
  return fingerprint128(fp, sizeof(fingerprint) * (parts + 1));
}

/// Host memory for the CPU backend: 64-byte aligned (AVX-512 friendly), with a small header that
/// records the block size. Blocks of 64 KiB and more are mapped from the system and cached when
/// freed, so tensors that are released and re-created every training step (transient
/// activations and gradients) reuse pages that are already resident instead of going back to
/// the system: a fresh page costs a fault and a page of zeros, about 0.45 ms per MiB on the
/// benchmark machine (BENCHMARKS.md).
///
/// A request takes the smallest cached block that is large enough and splits off what it does
/// not need, which stays cached (pages of one mapping, so splitting is bookkeeping, not a system
/// call); a freed block is joined with cached neighbours in memory. A request no cached block
/// covers is assembled from the pages of several cached blocks, largest first (cpu_system_move:
/// the pages move, nothing is copied); only what the whole cache can't cover is new pages. That
/// assembling is kept for when the memory held, live plus cached, would otherwise rise more than
/// a grow slack above the peak of live bytes (64 MiB for a live peak up to 512 MiB, none from
/// 1 GiB: auto_slack()); below that a request no cached block covers
/// gets new pages, since moved pages are not free either: under the benchmark machine's
/// hypervisor each faults at its first touch after the move (a fault the guest does not count),
/// which cost Attention U-Net's width-16 training step 28% when every step assembled its large
/// blocks anew. (Before, such a
/// request grew the largest cached block and the other cached blocks stayed idle: the resident
/// peak sat up to 12.5% above the live peak, and fragmented steps mapped new pages each time,
/// 80 MiB per step for U-Net width-64 training.) Should moving fail, cached blocks that would
/// raise the memory held above the live peak plus a slack are unmapped, least recently freed
/// first. cpu_trim_cache() returns all cached blocks to the system.
///
/// (The cache this replaced handed out only blocks of the requested size class: models whose
/// tensors come in many sizes, attention gates and recurrent blocks, missed it 10-65 times per
/// step, up to 600 MiB of fresh pages per step for R2U-Net batch-8 inference, and the blocks of
/// unneeded classes it held raised the resident peak: AR2U-Net batch-1 inference 134 MiB, now 84.)
struct cpu_block_cache {
  static constexpr std::size_t header = 64;
  static constexpr std::size_t min_cached = cpu_map_min;
  /// The least the cache may hold above the live peak (see make_room()).
  static constexpr std::size_t min_slack = std::size_t(64) << 20;
  std::mutex m;
  struct cached_block {
    char* p;
    std::uint64_t stamp;  // when it was freed
  };
  using size_index = std::multimap<std::size_t, cached_block>;  // total bytes (header included) -> block
  size_index free_blocks;
  std::map<char*, size_index::iterator> by_address;  // the same blocks, by address
  std::uint64_t clock = 0;
  std::size_t cached_bytes = 0;
  std::size_t live_bytes = 0, peak_live_bytes = 0;  // blocks handed out (all sizes)
  /// How far above the live peak the memory held (live + cached) may grow with new pages before
  /// a request no cached block covers is assembled from the pages of several (cpu_set_grow_slack;
  /// 0: always assembled while the cache holds any block; slack_auto: auto_slack()).
  static constexpr std::size_t slack_auto = static_cast<std::size_t>(-1);
  std::size_t grow_slack = slack_auto;
  /// The default grow slack for a live peak: 64 MiB up to a live peak of 512 MiB, then falling
  /// linearly to none at 1 GiB. Measured on the benchmark machine (BENCHMARKS.md): the width-16
  /// models, live peaks of 180-330 MiB, train 6-25% faster with 64 MiB (with 32 MiB some pages
  /// still moved every step); width-32 models (420-730 MiB) gained nothing measurable; width-64
  /// models (over 1 GiB) gained about 5% but held 64 MiB more, 6% of their resident peak, where
  /// memory is their tighter budget.
  static std::size_t auto_slack(std::size_t peak_live) {
    // At most make_room()'s floor: a larger slack would map pages that make_room() then unmaps.
    constexpr std::size_t full = min_slack, lo = std::size_t(512) << 20, hi = std::size_t(1024) << 20;
    if (peak_live <= lo) return full;
    if (peak_live >= hi) return 0;
    return static_cast<std::size_t>(static_cast<double>(full) * static_cast<double>(hi - peak_live) /
                                    static_cast<double>(hi - lo));
  }
  std::size_t slack() const { return grow_slack == slack_auto ? auto_slack(peak_live_bytes) : grow_slack; }
  std::size_t system_allocs = 0;                     // blocks of >= min_cached bytes taken from the system
  std::size_t system_bytes = 0;                      // new pages: those blocks, and the parts of assembled ones the cache could not cover
  std::size_t moved_bytes = 0;                       // pages moved from cached blocks into assembled ones
  static cpu_block_cache& get() {
    static cpu_block_cache* c = new cpu_block_cache;  // never destroyed: tensors may outlive statics
    return *c;
  }
  /// Sizes: a multiple of 64 bytes below 64 KiB, whole 4 KiB pages from there. (Mapped blocks
  /// are split and joined, so they need no size classes; a coarser rounding left up to 12.5% of
  /// a reused block's resident pages unused.)
  static std::size_t round_up(std::size_t bytes) {
    if (bytes < min_cached) return (bytes + 63) / 64 * 64;
    if (!cpu_blocks_mapped) {  // whole blocks only: a multiple of 1/8 of the power of two below
      std::size_t p = min_cached;
      while (p * 2 <= bytes) p *= 2;
      const std::size_t step = p / 8;
      return (bytes + step - 1) / step * step;
    }
    return (bytes + 4095) / 4096 * 4096;
  }
  /// Give a cached block back to the system. Mapped blocks are unmapped whatever their size: the
  /// part of a block that assembling leaves over can be smaller than cpu_map_min.
  static void release(char* p, std::size_t bytes) noexcept {
#if defined(__linux__)
    if constexpr (cpu_blocks_mapped) {
      munmap(p, bytes);
      return;
    }
#endif
    cpu_system_free(p, bytes);
  }
  void insert(char* p, std::size_t bytes, std::uint64_t stamp) {
    by_address.emplace(p, free_blocks.emplace(bytes, cached_block{p, stamp}));
    cached_bytes += bytes;
  }
  void erase(size_index::iterator it) {
    cached_bytes -= it->first;
    by_address.erase(it->second.p);
    free_blocks.erase(it);
  }
  /// Cache a freed block, joined with cached neighbours in memory (parts split from one block
  /// earlier), so that a large request later finds them whole. A joined block may span two
  /// mappings of the system (cpu_system_move moves it in parts).
  void insert_joined(char* p, std::size_t bytes) {
    if (!cpu_blocks_mapped) return insert(p, bytes, ++clock);
    auto after = by_address.lower_bound(p);
    if (after != by_address.begin()) {
      auto before = std::prev(after);
      if (before->first + before->second->first == p) {
        p = before->first;
        bytes += before->second->first;
        erase(before->second);
      }
    }
    after = by_address.lower_bound(p + bytes);
    if (after != by_address.end() && after->first == p + bytes) {
      bytes += after->second->first;
      erase(after->second);
    }
    insert(p, bytes, ++clock);
  }
  /// Unmap cached blocks, least recently freed first, until live + cached + bytes fits under the
  /// high-water mark of live bytes plus 12.5% or 64 MiB, whichever is more, so that memory held
  /// for reuse raises the resident peak little. (The 64 MiB floor matters for small models:
  /// batch-1 inference frees every activation as soon as it is consumed, and with a 12.5% margin
  /// alone the cache kept giving blocks back and mapping new ones, 20-70 times per image.)
  void make_room(std::size_t bytes) {
    const std::size_t limit = std::max(peak_live_bytes + std::max(peak_live_bytes / 8, min_slack), live_bytes + bytes);
    while (!free_blocks.empty() && live_bytes + cached_bytes + bytes > limit) {
      auto victim = free_blocks.begin();  // the least recently freed
      for (auto v = free_blocks.begin(); v != free_blocks.end(); ++v)
        if (v->second.stamp < victim->second.stamp) victim = v;
      release(victim->second.p, victim->first);
      erase(victim);
    }
  }
  /// A block of `bytes`, more than any cached block holds: a fresh range whose pages come from
  /// cached blocks, largest first (a block larger than what is still missing gives its first
  /// pages; the rest stays cached), and new pages for what the cache can't cover. Null when the
  /// system can't map or move (nothing is then lost: a block whose move failed midway is given
  /// back to the system whole).
  void* assemble(std::size_t bytes) {
#if defined(__linux__)
    void* q = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (q == MAP_FAILED) return nullptr;
    char* dst = static_cast<char*>(q);
    std::size_t filled = 0;
    while (filled < bytes && !free_blocks.empty()) {
      auto largest = std::prev(free_blocks.end());
      char* p = largest->second.p;
      const std::size_t got = largest->first;
      const std::uint64_t stamp = largest->second.stamp;
      const std::size_t part = std::min(got, bytes - filled);
      erase(largest);
      if (!cpu_system_move(p, part, dst + filled)) {
        release(p, got);  // what did not move (the moved part is dst's now)
        break;
      }
      if (part < got) insert(p + part, got - part, stamp);
      filled += part;
      moved_bytes += part;
    }
    system_bytes += bytes - filled;  // new pages
    make_room(bytes - filled);
    return q;
#else
    (void)bytes;
    return nullptr;
#endif
  }
  /// A block of `bytes` (a size from round_up()) from the cache, or null after making room for a
  /// new one. `bytes` becomes the size of the block returned (up to 64 KiB more).
  void* take(std::size_t& bytes) {
    if (bytes < min_cached) return nullptr;
    std::lock_guard<std::mutex> lock(m);
    auto it = free_blocks.lower_bound(bytes);
    if (it != free_blocks.end() && (cpu_blocks_mapped || it->first <= bytes + bytes / 8)) {
      char* p = it->second.p;
      const std::size_t got = it->first;
      const std::uint64_t stamp = it->second.stamp;
      erase(it);
      if (cpu_blocks_mapped && got - bytes >= min_cached)  // split: the rest stays cached
        insert(p + bytes, got - bytes, stamp);
      else
        bytes = got;
      return p;
    }
    // New pages while the memory held stays within the grow slack of the live peak; past it (or
    // with a slack of 0), the pages of cached blocks (why: the comment above this struct).
    const std::size_t sl = slack();
    if (cpu_blocks_mapped && !free_blocks.empty() && (sl == 0 || live_bytes + cached_bytes + bytes > peak_live_bytes + sl))
      if (void* q = assemble(bytes)) return q;
    make_room(bytes);
    return nullptr;
  }
  bool give(void* p, std::size_t bytes) {
    if (bytes < min_cached) return false;
    std::lock_guard<std::mutex> lock(m);
    insert_joined(static_cast<char*>(p), bytes);
    return true;
  }
  void trim() {
    std::lock_guard<std::mutex> lock(m);
    for (auto& [b, blk] : free_blocks) release(blk.p, b);
    free_blocks.clear();
    by_address.clear();
    cached_bytes = 0;
  }
};

template <class T>
T* cpu_allocate(std::size_t n) {
  if (n == 0) return nullptr;
  std::size_t bytes = cpu_block_cache::round_up(n * sizeof(T) + cpu_block_cache::header);
  void* p = cpu_block_cache::get().take(bytes);
  if (!p) {
    if (bytes >= cpu_block_cache::min_cached) {
      auto& c = cpu_block_cache::get();
      std::lock_guard<std::mutex> lock(c.m);
      ++c.system_allocs;
      c.system_bytes += bytes;
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
/// cpu_set_grow_slack(cpu_grow_slack_auto): the default, a slack that depends on the live peak.
inline constexpr std::size_t cpu_grow_slack_auto = detail::cpu_block_cache::slack_auto;
/// How many bytes above the peak of live bytes the CPU backend's memory (live + cached) may grow
/// with new pages rather than move the pages of cached blocks into a larger one. The default,
/// cpu_grow_slack_auto, is 64 MiB while the live peak is at most 512 MiB, falling linearly to 0 at
/// 1 GiB (detail::cpu_block_cache::auto_slack); 0: always move when the cache holds enough.
/// Returns the previous value (cpu_grow_slack_auto when it was the default).
inline std::size_t cpu_set_grow_slack(std::size_t bytes) {
  auto& c = detail::cpu_block_cache::get();
  std::lock_guard<std::mutex> lock(c.m);
  return std::exchange(c.grow_slack, bytes);
}
/// CPU backend memory: bytes in tensors and workspaces now, their peak, and bytes held in the
/// cache of free blocks.
struct cpu_memory_stats {
  std::size_t live = 0, peak_live = 0, cached = 0;
  std::size_t system_allocs = 0;  ///< large blocks taken from the system so far (cache misses)
  std::size_t system_bytes = 0;   ///< bytes of those, plus bytes added by growing cached blocks
  /// Bytes of cached blocks' pages moved into assembled blocks so far (each moved page faults at
  /// its first touch on some virtual machines; see detail::cpu_block_cache).
  std::size_t moved_bytes = 0;
};
inline cpu_memory_stats cpu_memory() {
  auto& c = detail::cpu_block_cache::get();
  std::lock_guard<std::mutex> lock(c.m);
  return {c.live_bytes, c.peak_live_bytes, c.cached_bytes, c.system_allocs, c.system_bytes, c.moved_bytes};
}
/// Bytes currently held in the CPU backend's cache of free blocks.
inline std::size_t cpu_cached_bytes() {
  auto& c = detail::cpu_block_cache::get();
  std::lock_guard<std::mutex> lock(c.m);
  return c.cached_bytes;
}

/// CPU context: thread count and a reusable workspace (grown on demand; a large one is given
/// back when calls need much less, see workspace()), so a steady-state training step allocates
/// nothing from the system.
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
  ~context() {
    detail::cpu_free(ws_);
    clear_weight_cache();
  }

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

  /// A workspace of this many bytes or more is given back when a call needs less than a quarter
  /// of it (see workspace()).
  static constexpr std::size_t ws_shrink_min_bytes = std::size_t(32) << 20;
  /// A scratch buffer of at least n elements, valid until the next workspace() call. It grows on
  /// demand. A workspace of ws_shrink_min_bytes or more is reallocated at n elements when n is
  /// less than a quarter of it: the deepest levels' Winograd weights (16·cin·cout values, 64 MiB
  /// for 1024 channels each way) would otherwise stay allocated through the top levels, where
  /// the training step's memory peaks (U-Net width 64: 85 MiB of a 1062 MiB live peak). The block
  /// goes back to the backend's cache, which serves the next calls and tensors from it.
  T* workspace(std::size_t n) {
    ++ws_calls_;
    const bool shrink = ws_size_ * sizeof(T) >= ws_shrink_min_bytes && n < ws_size_ / 4;
    if (n > ws_size_ || shrink) {
      packed_.call = 0;  // what was packed is gone
      detail::cpu_free(ws_);
      ws_ = nullptr;
      ws_size_ = 0;
      ws_ = detail::cpu_allocate<T>(n);
      ws_size_ = n;
    }
    return ws_;
  }
  std::size_t workspace_size() const { return ws_size_; }

  /// The weights of the last F(2×2,3×3) convolution, noted right after its workspace() call. A
  /// convolution whose weights repeat the previous one's (the recurrent block applies one several
  /// times in a row) packs them rather than transforming them as it uses them
  /// (detail::wino_forward_fused), so that the ones after it keep them (keep_packed_weights).
  /// Only a choice of path: either gives the same results.
  void note_conv_weights(const T* w, bool flip) {
    conv_w_ = w;
    conv_flip_ = flip;
    conv_call_ = ws_calls_;
  }
  bool repeats_conv_weights(const T* w, bool flip) const {
    return conv_w_ == w && conv_flip_ == flip && conv_call_ == ws_calls_;
  }
  /// Packed weights kept at the start of the workspace from one convolution to the next (the
  /// recurrent block applies one convolution several times in a row). The key is the weights'
  /// values, not their address: the convolution that packed them must have been the workspace's
  /// last user (a reallocation resets the key), and the weights must have the same 128-bit
  /// fingerprint (detail::fingerprint128_mt) as the ones it packed. (The key used to be a copy of the
  /// weights: 36 MiB of resident memory for 1024 channels each way.)
  struct packed_weights_key {
    detail::fingerprint fp{};
    std::size_t count = 0;
    int rows = 0, cols = 0, kind = 0;
    std::uint64_t call = 0;  // the workspace() call after which they were packed; 0: none
  };
  /// Called right after workspace(): true when the workspace still starts with the packing `kind`
  /// of the weights w (rows × cols × per values); otherwise false, and the key records that the
  /// caller packs w there now.
  bool keep_packed_weights(const T* w, int rows, int cols, std::size_t per, int kind) {
    auto& k = packed_;
    const std::size_t count = static_cast<std::size_t>(rows) * cols * per;
    const bool same_call = k.call != 0 && k.call + 1 == ws_calls_ && k.rows == rows && k.cols == cols && k.kind == kind &&
                           k.count == count;
    const detail::fingerprint fp = detail::fingerprint128_mt(w, count * sizeof(T), threads());
    const bool kept = same_call && fp == k.fp;
    k.fp = fp;
    k.count = count;
    k.rows = rows;
    k.cols = cols;
    k.kind = kind;
    k.call = ws_calls_;
    return kept;
  }
  // ---------------------------------------------------------------- packed-weights cache
  /// Inference repeats the same convolutions with the same weights, and packing them (Winograd
  /// transforms: 16 or 36 values per channel pair, written anew per call) took ~8% of a batch-1
  /// U-Net prediction. Between begin_weight_cache() and end_weight_cache() (a model's predict()
  /// opens and closes it), the packed weights of a convolution call of at most
  /// weight_cache_max_tiles() Winograd tiles (all images) are looked up by the 128-bit fingerprint
  /// of the weights and the packing kind, and on a miss packed into a new entry. Packing costs
  /// roughly as much as 7 tiles of that convolution's products, so ~3% of a call of 256 tiles and
  /// under 1% from 1024: the cache holds the weights of the deep, small-plane calls, where their
  /// packing is a large part of the work (at 256² batch 1 levels 2 and deeper; at batch 8 the
  /// deepest level), and not those of calls where packing is noise.
  /// The budget, weight_cache_bytes(), is default_weight_cache_bytes() (128 MiB unless the
  /// environment variable USEG_CPU_WEIGHT_CACHE_MB says otherwise; 0: off), or what
  /// set_weight_cache_bytes() sets. U-Net at 256² caches 16 MiB at width 16 and 65 MiB at width
  /// 32 at batch 1, 14 and 18 MiB at batch 8; width 64 overflows it (below) and caches none.
  /// All or nothing: when a session's packed weights do not all fit the budget, the cache is
  /// emptied and stays off until set_weight_cache_bytes() is called again (a part of them cached
  /// held memory and ran U-Net width 64 batch 1 17% slower). end_weight_cache() frees the entries
  /// the session did not use (weights changed by training, another model), so the cache holds at
  /// most the last prediction's weights. Outside a session nothing is cached: a training step's
  /// weights change every step.
  static std::size_t default_weight_cache_bytes() {
    static const std::size_t b = [] {
      const char* e = std::getenv("USEG_CPU_WEIGHT_CACHE_MB");
      if (!e || !*e) return std::size_t(128) << 20;
      // Whole MiB, at most 1 TiB; anything else is an error, not a silent "off".
      char* end = nullptr;
      errno = 0;
      const unsigned long long mb = std::strtoull(e, &end, 10);
      if (e[0] < '0' || e[0] > '9' || *end != 0 || errno != 0 || mb > (1ull << 20))
        throw config_error(std::string("USEG_CPU_WEIGHT_CACHE_MB=\"") + e +
                           "\": expected a whole number of MiB for the packed-weights cache (0: off)");
      return static_cast<std::size_t>(mb) << 20;
    }();
    return b;
  }
  std::size_t weight_cache_bytes() const { return wc_limit_; }
  /// Sets the budget (0: off) and turns the cache back on after an overflow; frees the entries.
  void set_weight_cache_bytes(std::size_t bytes) {
    wc_limit_ = bytes;
    wc_overflowed_ = false;
    clear_weight_cache();
  }
  /// Bytes held by cached packed weights.
  std::size_t weight_cache_held() const { return wc_held_; }
  /// Whether the cache turned itself off: a session's packed weights did not fit the budget.
  bool weight_cache_overflowed() const { return wc_overflowed_; }
  /// Whether a session with the cache on is open (its packed weights serve the convolutions).
  bool weight_cache_active() const { return wc_on_; }
  /// The largest convolution call, in Winograd tiles of all its images, whose packed weights the
  /// cache keeps (default_weight_cache_max_tiles; 0: none, as with the cache off).
  static constexpr long default_weight_cache_max_tiles = 256;
  long weight_cache_max_tiles() const { return wc_max_tiles_; }
  void set_weight_cache_max_tiles(long tiles) { wc_max_tiles_ = std::max(0L, tiles); }
  /// Whether a convolution call of `tiles` Winograd tiles is served from the cache now.
  bool caches_weights(long tiles) const { return wc_on_ && tiles <= wc_max_tiles_; }
  void begin_weight_cache() {
    wc_on_ = wc_limit_ > 0 && !wc_overflowed_;
    wc_missed_ = false;
    for (auto& e : wc_) e.used = false;
  }
  void end_weight_cache() {
    const bool was_on = wc_on_;
    wc_on_ = false;
    if (!was_on) return;
    if (wc_missed_) {
      wc_overflowed_ = true;
      clear_weight_cache();
      return;
    }
    for (auto it = wc_.begin(); it != wc_.end();) {
      if (it->used) {
        ++it;
        continue;
      }
      wc_held_ -= it->size * sizeof(T);
      weight_free(*it);
      it = wc_.erase(it);
    }
  }
  void clear_weight_cache() {
    for (auto& e : wc_) weight_free(e);
    wc_.clear();
    wc_held_ = 0;
  }
  /// Inside a session, for a call of `tiles` tiles (caches_weights): the packed weights (size
  /// elements) of w (rows × cols × per values) in packing `kind`, packed by pack(T* dst) on a
  /// miss; nullptr otherwise or when a new entry would not fit (the caller packs into its
  /// workspace).
  template <class Pack>
  const T* cached_packed_weights(const T* w, int rows, int cols, std::size_t per, int kind, std::size_t size, long tiles,
                                 Pack&& pack) {
    if (!caches_weights(tiles)) return nullptr;
    const std::size_t count = static_cast<std::size_t>(rows) * cols * per;
    const detail::fingerprint fp = detail::fingerprint128_mt(w, count * sizeof(T), threads());
    for (auto& e : wc_)
      if (e.fp == fp && e.count == count && e.rows == rows && e.cols == cols && e.kind == kind && e.size == size) {
        e.used = true;
        return e.data;
      }
    if (wc_missed_ || wc_held_ + size * sizeof(T) > wc_limit_) {
      wc_missed_ = true;
      return nullptr;
    }
    // From the block cache, like the tensors: its large blocks are backed by huge pages where the
    // system has them (fresh mappings per entry ran U-Net width 32 batch-1 inference 69 ms
    // against 58; glibc's malloc 79, as without the cache).
    T* data = detail::cpu_allocate<T>(size);
    pack(data);
    wc_.push_back(weight_entry{fp, count, rows, cols, kind, size, data, true});
    wc_held_ += size * sizeof(T);
    return data;
  }

  /// Host code: nothing is asynchronous on the CPU.
  void synchronize() {}

 private:
  struct weight_entry {
    detail::fingerprint fp{};
    std::size_t count = 0;
    int rows = 0, cols = 0, kind = 0;
    std::size_t size = 0;
    T* data = nullptr;
    bool used = false;
  };
  static void weight_free(const weight_entry& e) { detail::cpu_free(e.data); }
  std::vector<weight_entry> wc_;
  std::size_t wc_limit_ = default_weight_cache_bytes(), wc_held_ = 0;
  long wc_max_tiles_ = default_weight_cache_max_tiles;
  bool wc_on_ = false, wc_missed_ = false, wc_overflowed_ = false;
  int threads_ = 1;
  T* ws_ = nullptr;
  std::size_t ws_size_ = 0;
  std::uint64_t ws_calls_ = 0;
  packed_weights_key packed_;
  const T* conv_w_ = nullptr;  // see note_conv_weights
  bool conv_flip_ = false;
  std::uint64_t conv_call_ = 0;
};

}  // namespace useg
