// benchmarks/bench_run.hpp — the timed run of useg_bench, written once for every backend:
// run<Model>() is instantiated for useg::cpu in useg_bench.cpp and, in builds with the CUDA
// backend, for useg::cuda in useg_bench_cuda.cu (nvcc; the module useg_bench_cuda.so, which
// useg_bench loads for --device cuda). It includes no CLI11 (nvcc's C++20 front end is known to
// choke on it, CLIUtils/CLI11#1378); the command line is parsed in useg_bench.cpp.
#pragma once
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "useg/useg.hpp"

namespace bench {

struct options {
  std::string model = "unet";
  int width = 16, depth = 4, t = 2, size = 256, batch = 4, in_ch = 3, threads = 2, iters = 5, warmup = 1;
  double min_time = 0;
  std::string mode = "train", device = "cpu", up = "upsample";
};

/// Byte counters of a device memory pool (the CUDA caching pool).
struct device_memory {
  std::size_t in_use = 0, cached = 0, peak_in_use = 0, malloc_calls = 0;
};

/// What only a device backend has: its name and its memory pool's statistics (called once the
/// backend's context exists).
struct device_hooks {
  std::function<std::string()> name;      ///< e.g. "NVIDIA H100 80GB HBM3"
  std::function<device_memory()> memory;  ///< pool statistics
};

/// Busy and total jiffies of the whole machine (/proc/stat "cpu" line).
struct cpu_sample {
  double busy_s = 0, own_s = 0;
  std::chrono::steady_clock::time_point wall;
};
/// Current resident set size in MiB (/proc/self/statm).
inline double current_rss_mb() {
  std::ifstream f("/proc/self/statm");
  unsigned long long size = 0, resident = 0;
  f >> size >> resident;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

inline cpu_sample sample() {
  cpu_sample s;
  std::ifstream f("/proc/stat");
  std::string cpu;
  unsigned long long v[10] = {};
  f >> cpu;
  for (auto& x : v) f >> x;
  const double hz = static_cast<double>(sysconf(_SC_CLK_TCK));
  // user nice system idle iowait irq softirq steal guest guest_nice; busy = all but idle/iowait
  // (guest time is already included in user).
  s.busy_s = static_cast<double>(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz;
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  s.own_s = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
            1e-6 * static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  s.wall = std::chrono::steady_clock::now();
  return s;
}

/// Time o.iters steps (after o.warmup untimed ones) of Model and print one JSON line. On a device
/// backend each step ends with the context's synchronize(), so the time is the device's time;
/// the inputs are built on the host and uploaded once.
template <class Model>
int run(const options& o, const device_hooks* dev = nullptr) {
  using B = typename Model::backend;
  useg::unet_config cfg;
  cfg.width = o.width;
  cfg.depth = o.depth;
  cfg.t = o.t;
  cfg.up = o.up == "transpose" ? useg::up_kind::transpose : useg::up_kind::upsample;
  cfg.seed = 1;
  std::unique_ptr<useg::context<B>> ctx_ptr;
  if constexpr (B::on_device) ctx_ptr = std::make_unique<useg::context<B>>();  // throws when no device is usable
  else ctx_ptr = std::make_unique<useg::context<B>>(o.threads);
  useg::context<B>& ctx = *ctx_ptr;
  int threads = 0;  // CPU compute threads; 0 on a device backend
  if constexpr (requires { ctx.threads(); }) threads = ctx.threads();
  Model m(cfg);
  m.set_context(ctx);
  const bool train = o.mode == "train";
  m.train(train);

  useg::rng g(7);
  useg::tensor<B> x(o.batch, o.in_ch, o.size, o.size), target(o.batch, 1, o.size, o.size), grad;
  {
    std::vector<float> hx(x.size()), ht(target.size());
    for (auto& v : hx) v = static_cast<float>(g.uniform() * 2 - 1);
    for (auto& v : ht) v = g.uniform() < 0.2 ? 1.0f : 0.0f;
    x.upload(hx.data());
    target.upload(ht.data());
  }
  useg::adam_options ao;
  ao.lr = 1e-4;
  // Only a training run holds an optimizer (PyTorch's Adam state is lazy too: none in inference).
  std::optional<useg::adam<B>> opt;
  if (train) opt.emplace(m.params(), ctx, ao);

  ctx.synchronize();
  const double base_rss = current_rss_mb();  // model, optimizer state and inputs: before any step
  const device_memory dev_base = dev && dev->memory ? dev->memory() : device_memory{};
  double loss = 0;
  auto step = [&] {
    // Inference is predict(): eval mode, nothing kept for a backward (PyTorch: eval + no_grad).
    const auto& y = train ? m.forward(ctx, x) : m.predict(ctx, x);
    if (train) {
      loss = useg::bce_with_logits_loss(ctx, y, target, &grad);
      m.zero_grad();
      m.backward(ctx, grad);
      opt->step();
    } else {
      float first = 0;
      useg::ops<B>::download(&first, y.data(), 1);  // a host read of the result (synchronizes on a device)
      loss = static_cast<double>(first);
    }
    ctx.synchronize();  // a no-op on the CPU
  };
  for (int i = 0; i < o.warmup; ++i) step();
  const double flops_fwd = m.forward_flops();
  const double flops_step = train ? 3.0 * flops_fwd : flops_fwd;

  std::vector<double> ms;
  const useg::cpu_memory_stats mem0 = useg::cpu_memory();
  const std::size_t dev_mallocs0 = dev && dev->memory ? dev->memory().malloc_calls : 0;
  const cpu_sample s0 = sample();
  for (int i = 0; i < o.iters || std::chrono::duration<double>(std::chrono::steady_clock::now() - s0.wall).count() < o.min_time; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  const cpu_sample s1 = sample();
  const double wall = std::chrono::duration<double>(s1.wall - s0.wall).count();
  const double own = s1.own_s - s0.own_s;
  const double others = std::max(0.0, (s1.busy_s - s0.busy_s) - own);

  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  const auto mem = useg::cpu_memory();
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  const int iters = static_cast<int>(ms.size());
  const double mean_ms = wall * 1e3 / iters;
  constexpr double mib = 1048576.0;
  std::ostringstream js;
  js.precision(6);
  js << "{\"impl\":\"useg\",\"model\":\"" << Model::name() << "\",\"width\":" << o.width << ",\"depth\":" << o.depth
     << ",\"t\":" << o.t << ",\"size\":" << o.size << ",\"batch\":" << o.batch << ",\"mode\":\"" << o.mode
     << "\",\"device\":\"" << B::name << "\",\"threads\":" << threads << ",\"iters\":" << iters
     << ",\"images_per_s\":" << o.batch * 1e3 / mean_ms << ",\"ms_per_step\":" << mean_ms
     << ",\"ms_min\":" << sorted.front() << ",\"ms_median\":" << sorted[sorted.size() / 2]
     << ",\"peak_rss_mb\":" << static_cast<double>(ru.ru_maxrss) / 1024.0 << ",\"base_rss_mb\":" << base_rss << ",\"peak_tensor_mb\":" << static_cast<double>(mem.peak_live) / mib
     << ",\"cached_mb\":" << static_cast<double>(mem.cached) / mib
     << ",\"system_allocs_per_step\":" << static_cast<double>(mem.system_allocs - mem0.system_allocs) / iters
     << ",\"system_mb_per_step\":" << static_cast<double>(mem.system_bytes - mem0.system_bytes) / mib / iters
     << ",\"moved_mb_per_step\":" << static_cast<double>(mem.moved_bytes - mem0.moved_bytes) / mib / iters;
  // The packed weights the CPU context keeps between predictions (part of peak_tensor_mb).
  if constexpr (requires { ctx.weight_cache_held(); })
    js << ",\"weight_cache_mb\":" << static_cast<double>(ctx.weight_cache_held()) / mib;
  if (dev && dev->memory) {
    // the CUDA caching pool: peak bytes held by tensors and workspaces (the whole process, model
    // and optimizer state included), what was in use before the first step, and cudaMalloc calls
    const device_memory d = dev->memory();
    std::string name;
    for (const char c : dev->name ? dev->name() : std::string())
      if (c != '"' && c != '\\') name += c;
    js << ",\"gpu\":\"" << name << "\",\"gpu_peak_mb\":" << static_cast<double>(d.peak_in_use) / mib
       << ",\"gpu_base_mb\":" << static_cast<double>(dev_base.in_use) / mib << ",\"gpu_cached_mb\":" << static_cast<double>(d.cached) / mib
       << ",\"gpu_mallocs_per_step\":" << static_cast<double>(d.malloc_calls - dev_mallocs0) / iters;
  }
  js << ",\"flops_per_step\":" << flops_step << ",\"gflops_per_s\":" << flops_step / (mean_ms * 1e6)
     << ",\"parameters\":" << m.num_parameters() << ",\"own_cpu_s\":" << own << ",\"wall_s\":" << wall
     << ",\"others_cores\":" << others / wall << ",\"loss\":" << loss << "}";
  std::cout << js.str() << std::endl;
  return 0;
}

/// run<> for the model o.model on useg::cuda (useg_bench_cuda.cu, builds with the CUDA backend only).
int run_cuda(const options& o);

}  // namespace bench
