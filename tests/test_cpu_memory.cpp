// The CPU backend's memory: the block cache behind every tensor and workspace (see
// useg/backend/cpu/context.hpp). It hands out blocks that never overlap, keeps their contents,
// accounts live and cached bytes exactly, and in a repeated pattern of requests (a training step)
// maps nothing new after the first round, even when the sizes vary.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "useg/backend/cpu.hpp"
#include "useg/core/rng.hpp"

using namespace useg;

namespace {

constexpr std::size_t MiB = std::size_t(1) << 20;
float* alloc_bytes(std::size_t bytes) { return detail::cpu_allocate<float>(bytes / sizeof(float)); }
/// The bytes the cache accounts for a request (its size class plus the header).
std::size_t block_bytes(std::size_t bytes) { return detail::cpu_block_cache::round_up(bytes + detail::cpu_block_cache::header); }

struct live_block {
  float* p;
  std::size_t n;
  float value;
};

void fill(const live_block& b) { std::fill(b.p, b.p + b.n, b.value); }
bool intact(const live_block& b) {
  for (std::size_t i = 0; i < b.n; i += 257)
    if (b.p[i] != b.value) return false;
  return b.p[b.n - 1] == b.value;
}

/// Pins the grow slack for one test (0: every request no cached block covers is assembled from
/// cached pages, the behaviour the tests below check), restoring it after.
struct grow_slack_guard {
  std::size_t old;
  explicit grow_slack_guard(std::size_t bytes) : old(cpu_set_grow_slack(bytes)) {}
  ~grow_slack_guard() { cpu_set_grow_slack(old); }
};

/// Three 3 MiB blocks freed into the cache, with live 1 MiB blocks between them so that they are
/// not joined (the freed ones are written first, so their pages are resident). Returns the live
/// blocks, filled (values 20, 21, 22).
std::vector<live_block> three_cached_blocks() {
  std::vector<live_block> freed, kept;
  for (int i = 0; i < 3; ++i) {
    freed.push_back({alloc_bytes(3 * MiB), 3 * MiB / sizeof(float), 10.f + static_cast<float>(i)});
    kept.push_back({alloc_bytes(MiB), MiB / sizeof(float), 20.f + static_cast<float>(i)});
  }
  for (const auto& b : freed) fill(b);
  for (const auto& b : kept) fill(b);
  for (const auto& b : freed) detail::cpu_free(b.p);
  REQUIRE(cpu_memory().cached == 3 * block_bytes(3 * MiB));
  return kept;
}

/// Takes an 8 MiB block that no cached block covers, checks that it got new pages and left the
/// cached blocks as they were (s0: the statistics just before), and frees it.
void check_gets_new_pages(const cpu_memory_stats& s0, float value) {
  live_block big{alloc_bytes(8 * MiB), 8 * MiB / sizeof(float), value};
  const cpu_memory_stats s1 = cpu_memory();
  CHECK(s1.system_bytes - s0.system_bytes == block_bytes(8 * MiB));
  CHECK(s1.cached == s0.cached);
  fill(big);
  CHECK(intact(big));
  detail::cpu_free(big.p);
}

}  // namespace

TEST_CASE("CPU block cache: a freed block is split for smaller requests and joined again") {
  const grow_slack_guard slack(0);
  cpu_trim_cache();
  float* a = alloc_bytes(8 * MiB);
  const cpu_memory_stats s0 = cpu_memory();
  detail::cpu_free(a);
  CHECK(cpu_memory().cached == block_bytes(8 * MiB));

  live_block b{alloc_bytes(3 * MiB), 3 * MiB / sizeof(float), 1.f};
  live_block c{alloc_bytes(3 * MiB), 3 * MiB / sizeof(float), 2.f};
  CHECK(cpu_memory().system_allocs == s0.system_allocs);  // both carved from the cached block
  CHECK((b.p + b.n <= c.p || c.p + c.n <= b.p));
  fill(b);
  fill(c);
  CHECK(intact(b));
  CHECK(intact(c));
  CHECK(cpu_memory().live == s0.live - block_bytes(8 * MiB) + 2 * block_bytes(3 * MiB));
  detail::cpu_free(b.p);
  detail::cpu_free(c.p);

  float* d = alloc_bytes(8 * MiB);  // the parts, joined again, hold it: nothing new is mapped
  CHECK(cpu_memory().system_allocs == s0.system_allocs);
  CHECK(cpu_memory().system_bytes == s0.system_bytes);
  CHECK(cpu_memory().cached == 0);
  detail::cpu_free(d);
}

TEST_CASE("CPU block cache: a request larger than every cached block grows one; only the difference is new") {
  const grow_slack_guard slack(0);
  cpu_trim_cache();
  float* a = alloc_bytes(4 * MiB);
  detail::cpu_free(a);
  const cpu_memory_stats s0 = cpu_memory();
  live_block b{alloc_bytes(6 * MiB), 6 * MiB / sizeof(float), 3.f};
  const cpu_memory_stats s1 = cpu_memory();
  CHECK(s1.system_allocs == s0.system_allocs);
  CHECK(s1.system_bytes - s0.system_bytes == block_bytes(6 * MiB) - block_bytes(4 * MiB));
  CHECK(s1.cached == 0);
  fill(b);
  CHECK(intact(b));
  detail::cpu_free(b.p);
  CHECK(cpu_memory().cached == block_bytes(6 * MiB));
  cpu_trim_cache();
  CHECK(cpu_memory().cached == 0);
}

TEST_CASE("CPU block cache: random requests get aligned blocks that never overlap and keep their contents") {
  cpu_trim_cache();
  const std::size_t live0 = cpu_memory().live;
  useg::rng g(17);
  std::vector<live_block> live;
  float next = 1.f;
  for (int op = 0; op < 3000; ++op) {
    const bool release = !live.empty() && (live.size() > 40 || g.uniform(0, 1) < 0.45);
    if (release) {
      const std::size_t i = static_cast<std::size_t>(g.uniform(0, 1) * static_cast<double>(live.size())) % live.size();
      REQUIRE(intact(live[i]));
      detail::cpu_free(live[i].p);
      live[i] = live.back();
      live.pop_back();
    } else {
      // sizes from 1 KiB to 6 MiB, spread over the small (malloc), cached and mapped ranges
      const double e = g.uniform(10, 22.6);
      const std::size_t n = std::max<std::size_t>(1, static_cast<std::size_t>(std::exp2(e)) / sizeof(float));
      live_block b{detail::cpu_allocate<float>(n), n, next++};
      REQUIRE(reinterpret_cast<std::uintptr_t>(b.p) % 64 == 0);
      fill(b);
      live.push_back(b);
    }
  }
  // no two live blocks overlap
  std::vector<std::pair<const float*, const float*>> ranges;
  for (const auto& b : live) ranges.emplace_back(b.p, b.p + b.n);
  std::sort(ranges.begin(), ranges.end());
  for (std::size_t i = 1; i < ranges.size(); ++i) CHECK(ranges[i - 1].second <= ranges[i].first);
  for (const auto& b : live) {
    CHECK(intact(b));
    detail::cpu_free(b.p);
  }
  CHECK(cpu_memory().live == live0);
  cpu_trim_cache();
  CHECK(cpu_memory().cached == 0);
}

TEST_CASE("CPU block cache: a repeated pattern of varied sizes maps nothing new after its first round") {
  const grow_slack_guard slack(0);
  // Like a training step: phases that hold ~100 MiB of tensors, each phase in other sizes
  // (size classes a cache of exact sizes could not all keep under its limit).
  cpu_trim_cache();
  const std::vector<std::pair<int, std::size_t>> phases = {{10, 10 * MiB}, {11, 9 * MiB}, {20, 5 * MiB}, {7, 14 * MiB}, {40, 2 * MiB + MiB / 2}};
  auto round = [&] {
    for (const auto& [count, bytes] : phases) {
      std::vector<float*> held;
      for (int i = 0; i < count; ++i) held.push_back(alloc_bytes(bytes));
      for (float* p : held) detail::cpu_free(p);
    }
  };
  round();
  const cpu_memory_stats s0 = cpu_memory();
  for (int r = 0; r < 3; ++r) round();
  const cpu_memory_stats s1 = cpu_memory();
  CHECK(s1.system_allocs == s0.system_allocs);
  CHECK(s1.system_bytes == s0.system_bytes);
  CHECK(s1.cached <= s1.peak_live + std::max(s1.peak_live / 8, detail::cpu_block_cache::min_slack));
}

TEST_CASE("CPU block cache: a large tensor costs its size to the next page, not a size class") {
  // Activations of power-of-two size (64 MiB: 4 images × 64 channels × 256²) plus the block's
  // header once took the next size class, 12.5% more: resident pages that a reused block carried
  // unused.
  if (!detail::cpu_blocks_mapped) return;
  for (std::size_t bytes : {64 * MiB, 5 * MiB + 12345, std::size_t(256 * 1024 + 4)}) {
    const std::size_t live0 = cpu_memory().live;
    float* p = alloc_bytes(bytes);
    const std::size_t got = cpu_memory().live - live0;
    CHECK(got >= bytes + detail::cpu_block_cache::header);
    CHECK(got < bytes + detail::cpu_block_cache::header + 4096);
    detail::cpu_free(p);
  }
}

TEST_CASE("CPU block cache: a request larger than every cached block takes the pages of several; nothing new is mapped") {
  const grow_slack_guard slack(0);
  if (!detail::cpu_blocks_mapped) return;
  cpu_trim_cache();
  // Three freed blocks with live ones between them (so they are not joined), then a request
  // larger than each but smaller than all three together.
  const std::vector<live_block> kept = three_cached_blocks();
  const cpu_memory_stats s0 = cpu_memory();
  live_block big{alloc_bytes(8 * MiB), 8 * MiB / sizeof(float), 5.f};
  const cpu_memory_stats s1 = cpu_memory();
  CHECK(s1.system_allocs == s0.system_allocs);
  CHECK(s1.system_bytes == s0.system_bytes);  // every page came from the cache
  CHECK(s1.moved_bytes - s0.moved_bytes == block_bytes(8 * MiB));
  CHECK(s1.cached == s0.cached - block_bytes(8 * MiB));
  CHECK(s1.live + s1.cached == s0.live + s0.cached);
  fill(big);
  CHECK(intact(big));
  for (const auto& b : kept) CHECK(intact(b));  // the blocks between were not touched
  // What is left cached still serves requests, and a request beyond the whole cache takes it all
  // and maps only the difference.
  live_block rest{alloc_bytes(MiB / 2), MiB / 2 / sizeof(float), 6.f};
  fill(rest);
  CHECK(cpu_memory().system_bytes == s0.system_bytes);
  const cpu_memory_stats s2 = cpu_memory();
  live_block huge{alloc_bytes(16 * MiB), 16 * MiB / sizeof(float), 7.f};
  const cpu_memory_stats s3 = cpu_memory();
  CHECK(s3.cached == 0);
  CHECK(s3.system_bytes - s2.system_bytes == block_bytes(16 * MiB) - s2.cached);
  CHECK(s3.moved_bytes - s2.moved_bytes == s2.cached);
  fill(huge);
  CHECK(intact(huge));
  CHECK(intact(big));
  CHECK(intact(rest));
  for (const auto& b : kept) CHECK(intact(b));
  for (float* p : {big.p, rest.p, huge.p}) detail::cpu_free(p);
  for (const auto& b : kept) detail::cpu_free(b.p);
  cpu_trim_cache();
}

TEST_CASE("CPU block cache: memory held (live + cached) never exceeds the live peak in a varied pattern") {
  const grow_slack_guard slack(0);
  if (!detail::cpu_blocks_mapped) return;
  cpu_trim_cache();
  useg::rng g(5);
  std::vector<float*> live;
  std::size_t worst = 0;
  for (int op = 0; op < 2000; ++op) {
    if (!live.empty() && (live.size() > 30 || g.uniform(0, 1) < 0.5)) {
      const std::size_t i = static_cast<std::size_t>(g.uniform(0, 1) * static_cast<double>(live.size())) % live.size();
      detail::cpu_free(live[i]);
      live[i] = live.back();
      live.pop_back();
    } else {
      live.push_back(alloc_bytes(static_cast<std::size_t>(std::exp2(g.uniform(16.5, 23)))));
    }
    const cpu_memory_stats s = cpu_memory();
    if (s.live + s.cached > s.peak_live) worst = std::max(worst, s.live + s.cached - s.peak_live);
  }
  CHECK(worst == 0);
  for (float* p : live) detail::cpu_free(p);
  cpu_trim_cache();
}

TEST_CASE("CPU block cache: within the grow slack a request no cached block covers gets new pages; past it, cached ones") {
  if (!detail::cpu_blocks_mapped) return;
  const grow_slack_guard slack(0);
  cpu_trim_cache();
  std::vector<live_block> kept = three_cached_blocks();
  const cpu_memory_stats s0 = cpu_memory();
  // The memory held after the request, against the live peak: a slack that just covers it gives
  // new pages, and the cached blocks stay as they are.
  const std::size_t held_after = s0.live + s0.cached + block_bytes(8 * MiB);
  const std::size_t room = held_after > s0.peak_live ? held_after - s0.peak_live : 1;
  cpu_set_grow_slack(room);
  check_gets_new_pages(s0, 5.f);
  // One byte less of slack (or none): the request is assembled from the cached blocks.
  cpu_trim_cache();
  for (const live_block& b : three_cached_blocks()) kept.push_back(b);
  const cpu_memory_stats s2 = cpu_memory();
  const std::size_t held_after2 = s2.live + s2.cached + block_bytes(8 * MiB);
  cpu_set_grow_slack(held_after2 > s2.peak_live + 1 ? held_after2 - s2.peak_live - 1 : 0);
  live_block big2{alloc_bytes(8 * MiB), 8 * MiB / sizeof(float), 6.f};
  const cpu_memory_stats s3 = cpu_memory();
  CHECK(s3.system_bytes == s2.system_bytes);
  CHECK(s3.cached == s2.cached - block_bytes(8 * MiB));
  fill(big2);
  CHECK(intact(big2));
  for (const auto& b : kept) CHECK(intact(b));
  detail::cpu_free(big2.p);
  for (const auto& b : kept) detail::cpu_free(b.p);
  cpu_trim_cache();
}

TEST_CASE("CPU block cache: the default grow slack is 64 MiB for small live peaks and none from 1 GiB") {
  using C = detail::cpu_block_cache;
  const std::size_t old = cpu_set_grow_slack(cpu_grow_slack_auto);
  // The policy (context.hpp): 64 MiB up to a live peak of 512 MiB, then falling linearly to 0 at 1 GiB.
  CHECK(C::auto_slack(0) == 64 * MiB);
  CHECK(C::auto_slack(512 * MiB) == 64 * MiB);
  CHECK(C::auto_slack(768 * MiB) == 32 * MiB);
  CHECK(C::auto_slack(1024 * MiB) == 0);
  CHECK(C::auto_slack(4096 * MiB) == 0);
  for (std::size_t p = 0; p < 1100 * MiB; p += 7 * MiB) CHECK(C::auto_slack(p + 7 * MiB) <= C::auto_slack(p));
  // Under the default, with this process's small live peak, a request no cached block covers
  // gets new pages and leaves the cached blocks as they are.
  if (detail::cpu_blocks_mapped) {
    cpu_trim_cache();
    const std::vector<live_block> kept = three_cached_blocks();
    const cpu_memory_stats s0 = cpu_memory();
    REQUIRE(s0.peak_live < 256 * MiB);
    check_gets_new_pages(s0, 3.f);
    for (const auto& b : kept) detail::cpu_free(b.p);
    cpu_trim_cache();
  }
  cpu_set_grow_slack(old);
}

TEST_CASE("CPU context: a large workspace is given back when a call needs less than a quarter of it") {
  using C = context<cpu_backend<float>>;
  const std::size_t big = 48 * MiB / sizeof(float), small = 2 * MiB / sizeof(float);
  REQUIRE(big * sizeof(float) >= C::ws_shrink_min_bytes);
  C ctx(1);
  const std::size_t live0 = cpu_memory().live;
  float* w = ctx.workspace(big);
  std::fill(w, w + big, 1.f);  // it is usable whole
  CHECK(ctx.workspace_size() == big);
  CHECK(cpu_memory().live - live0 >= big * sizeof(float));
  // A call that fits in a quarter: the 48 MiB go back (live bytes fall by them).
  w = ctx.workspace(small);
  CHECK(ctx.workspace_size() == small);
  CHECK(cpu_memory().live - live0 < 3 * MiB);
  std::fill(w, w + small, 2.f);
  // Below the size where it shrinks, a smaller call keeps the workspace (no churn for small ones).
  CHECK(ctx.workspace(16) == w);
  CHECK(ctx.workspace_size() == small);
  // A call that needs more than a quarter keeps a large workspace too.
  ctx.workspace(big);
  CHECK(ctx.workspace(big / 3) == ctx.workspace(big / 2));
  CHECK(ctx.workspace_size() == big);
}

TEST_CASE("CPU block cache: a part smaller than 64 KiB that assembling leaves cached is unmapped, not freed as malloc memory") {
  // Assembling takes all but one page of the last block it draws from; that page stays cached,
  // a mapped block below cpu_map_min, which trimming (or making room) must unmap (freeing it
  // as malloc memory, as blocks of its size otherwise are, crashed).
  const grow_slack_guard slack(0);
  if (!detail::cpu_blocks_mapped) return;
  cpu_trim_cache();
  const std::vector<live_block> kept = three_cached_blocks();
  const std::size_t b3 = block_bytes(3 * MiB), page = 4096;
  const cpu_memory_stats s0 = cpu_memory();
  live_block big{alloc_bytes(3 * b3 - page - detail::cpu_block_cache::header), 0, 8.f};
  big.n = (3 * b3 - page - detail::cpu_block_cache::header) / sizeof(float);
  const cpu_memory_stats s1 = cpu_memory();
  CHECK(s1.moved_bytes - s0.moved_bytes == 3 * b3 - page);
  CHECK(s1.system_bytes == s0.system_bytes);
  CHECK(s1.cached == page);
  fill(big);
  CHECK(intact(big));
  cpu_trim_cache();
  CHECK(cpu_memory().cached == 0);
  for (const auto& b : kept) CHECK(intact(b));
  detail::cpu_free(big.p);
  for (const auto& b : kept) detail::cpu_free(b.p);
  cpu_trim_cache();
}
