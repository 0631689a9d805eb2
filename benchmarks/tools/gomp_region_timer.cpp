// gomp_region_timer.cpp — where the threads of an OpenMP (libgomp) program wait.
//
// An LD_PRELOAD shim around GOMP_parallel (GCC's entry to every `#pragma omp parallel`): each
// region's wall time, each thread's time inside it, and from those the imbalance (slowest minus
// fastest thread) and the fork/join overhead (wall minus slowest thread), summed per region
// (outlined function) and printed at exit, the costliest first. Regions that ran on one thread
// (an `if` clause that was false, or a region nested in another) are counted as serial. perf
// attributes barrier waits to libgomp; this says which region they belong to.
//
//   g++ -O2 -shared -fPIC -fopenmp benchmarks/tools/gomp_region_timer.cpp -o /tmp/gomp_region_timer.so -ldl
//   LD_PRELOAD=/tmp/gomp_region_timer.so ./build/benchmarks/useg_bench --model unet --width 16 --size 128 --batch 8 --mode train --threads 2 --iters 10
//   nm -C build/benchmarks/useg_bench | grep -i '^0*<offset> '   # the region's function
//
// Single-threaded callers of GOMP_parallel only (the main thread's regions, as in useg); at most
// 8 threads. Not part of the build.
#include <dlfcn.h>
#include <omp.h>
#include <time.h>

#include <cstdio>
#include <cstdlib>
#include <map>

namespace {
double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}
struct totals {
  double wall = 0, imbalance = 0, overhead = 0, serial = 0;
  long calls = 0, serial_calls = 0;
};
constexpr int max_threads = 8;
struct trampoline {
  void (*fn)(void*);
  void* data;
  double t0[max_threads], t1[max_threads];
};
std::map<void*, totals>* regions = nullptr;
double first = 0, last = 0;

void run(void* p) {
  auto* t = static_cast<trampoline*>(p);
  const int me = omp_get_thread_num();
  const double a = now();
  t->fn(t->data);
  if (me < max_threads) {
    t->t0[me] = a;
    t->t1[me] = now();
  }
}

void report() {
  totals all;
  for (const auto& [fn, r] : *regions) {
    all.wall += r.wall;
    all.imbalance += r.imbalance;
    all.overhead += r.overhead;
    all.serial += r.serial;
  }
  std::fprintf(stderr, "gomp_region_timer: span %.3f s; in regions %.3f s (one-thread regions %.3f s), imbalance %.3f s, fork/join %.3f s\n",
               last - first, all.wall, all.serial, all.imbalance, all.overhead);
  std::multimap<double, std::pair<void*, totals>> order;
  for (const auto& [fn, r] : *regions) order.insert({-(r.imbalance + r.overhead + r.wall), {fn, r}});
  int shown = 0;
  for (const auto& [key, e] : order) {
    if (shown++ == 40) break;
    Dl_info di{};
    dladdr(e.first, &di);
    const long off = di.dli_fbase ? static_cast<long>(static_cast<char*>(e.first) - static_cast<char*>(di.dli_fbase)) : 0;
    const totals& r = e.second;
    std::fprintf(stderr, "  %s+%lx (%s): %ld calls, wall %.4f s, imbalance %.4f s, fork/join %.4f s, one-thread %ld calls %.4f s\n",
                 di.dli_fname ? di.dli_fname : "?", off, di.dli_sname ? di.dli_sname : "?", r.calls, r.wall,
                 r.imbalance, r.overhead, r.serial_calls, r.serial);
  }
}
}  // namespace

extern "C" void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) {
  using real_t = void (*)(void (*)(void*), void*, unsigned, unsigned);
  static const real_t real = reinterpret_cast<real_t>(dlsym(RTLD_NEXT, "GOMP_parallel"));
  if (!regions) {
    regions = new std::map<void*, totals>;
    std::atexit(report);
  }
  trampoline t{fn, data, {}, {}};
  const double a = now();
  if (first == 0) first = a;
  real(run, &t, num_threads, flags);
  const double b = now();
  last = b;
  totals& r = (*regions)[reinterpret_cast<void*>(fn)];
  ++r.calls;
  r.wall += b - a;
  double slowest = 0, fastest = 1e300;
  int ran = 0;
  for (int i = 0; i < max_threads; ++i)
    if (t.t1[i] > 0) {
      const double d = t.t1[i] - t.t0[i];
      slowest = d > slowest ? d : slowest;
      fastest = d < fastest ? d : fastest;
      ++ran;
    }
  if (ran <= 1) {
    ++r.serial_calls;
    r.serial += b - a;
  } else {
    r.imbalance += slowest - fastest;
    r.overhead += (b - a) - slowest;
  }
}
