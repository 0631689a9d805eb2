// useg_bench — time one model configuration (inference or a full training step) and print one
// JSON line: images/s, ms per step, peak resident memory, achieved GFLOP/s, and how much CPU
// other processes used while it was timed (so noisy runs can be flagged or re-run).
//
//   useg_bench --model ar2unet --width 16 --size 256 --batch 4 --mode train --threads 2 --iters 5
//
// A training step is: forward, BCE-with-logits loss (+ its gradient), zero_grad, backward, Adam
// step — what the PyTorch side (benchmarks/pytorch_bench.py) times as well. Inference is the
// model's predict() (eval mode, no backward state), as PyTorch's eval() under no_grad(). FLOPs come from the
// model's own count (forward_flops()); a training step counts 3× the forward.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "useg/useg.hpp"

namespace {

struct options {
  std::string model = "unet";
  int width = 16, depth = 4, t = 2, size = 256, batch = 4, in_ch = 3, threads = 2, iters = 5, warmup = 1;
  double min_time = 0;
  std::string mode = "train", device = "cpu", up = "upsample";
};

/// Busy and total jiffies of the whole machine (/proc/stat "cpu" line).
struct cpu_sample {
  double busy_s = 0, own_s = 0;
  std::chrono::steady_clock::time_point wall;
};
/// Current resident set size in MiB (/proc/self/statm).
double current_rss_mb() {
  std::ifstream f("/proc/self/statm");
  unsigned long long size = 0, resident = 0;
  f >> size >> resident;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

cpu_sample sample() {
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

template <class Model>
int run(const options& o) {
  using B = typename Model::backend;
  useg::unet_config cfg;
  cfg.width = o.width;
  cfg.depth = o.depth;
  cfg.t = o.t;
  cfg.up = o.up == "transpose" ? useg::up_kind::transpose : useg::up_kind::upsample;
  cfg.seed = 1;
  useg::context<B> ctx(o.threads);
  Model m(cfg);
  m.set_context(ctx);
  const bool train = o.mode == "train";
  m.train(train);

  useg::rng g(7);
  useg::tensor<B> x(o.batch, o.in_ch, o.size, o.size), target(o.batch, 1, o.size, o.size), grad;
  for (std::size_t i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(g.uniform() * 2 - 1);
  for (std::size_t i = 0; i < target.size(); ++i) target.data()[i] = g.uniform() < 0.2 ? 1.0f : 0.0f;
  useg::adam_options ao;
  ao.lr = 1e-4;
  useg::adam<B> opt(m.params(), ctx, ao);

  const double base_rss = current_rss_mb();  // model, optimizer state and inputs: before any step
  double loss = 0;
  auto step = [&] {
    // Inference is predict(): eval mode, nothing kept for a backward (PyTorch: eval + no_grad).
    const auto& y = train ? m.forward(ctx, x) : m.predict(ctx, x);
    if (train) {
      loss = useg::bce_with_logits_loss(ctx, y, target, &grad);
      m.zero_grad();
      m.backward(ctx, grad);
      opt.step();
    } else {
      loss = static_cast<double>(y.data()[0]);
    }
  };
  for (int i = 0; i < o.warmup; ++i) step();
  const double flops_fwd = m.forward_flops();
  const double flops_step = train ? 3.0 * flops_fwd : flops_fwd;

  std::vector<double> ms;
  const std::size_t allocs0 = useg::cpu_memory().system_allocs;
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
  std::ostringstream js;
  js.precision(6);
  js << "{\"impl\":\"useg\",\"model\":\"" << Model::name() << "\",\"width\":" << o.width << ",\"depth\":" << o.depth
     << ",\"t\":" << o.t << ",\"size\":" << o.size << ",\"batch\":" << o.batch << ",\"mode\":\"" << o.mode
     << "\",\"device\":\"" << o.device << "\",\"threads\":" << ctx.threads() << ",\"iters\":" << iters
     << ",\"images_per_s\":" << o.batch * 1e3 / mean_ms << ",\"ms_per_step\":" << mean_ms
     << ",\"ms_min\":" << sorted.front() << ",\"ms_median\":" << sorted[sorted.size() / 2]
     << ",\"peak_rss_mb\":" << static_cast<double>(ru.ru_maxrss) / 1024.0 << ",\"base_rss_mb\":" << base_rss << ",\"peak_tensor_mb\":" << static_cast<double>(mem.peak_live) / 1048576.0
     << ",\"cached_mb\":" << static_cast<double>(mem.cached) / 1048576.0
     << ",\"system_allocs_per_step\":" << static_cast<double>(mem.system_allocs - allocs0) / iters << ",\"flops_per_step\":" << flops_step
     << ",\"gflops_per_s\":" << flops_step / (mean_ms * 1e6) << ",\"parameters\":" << m.num_parameters()
     << ",\"own_cpu_s\":" << own << ",\"wall_s\":" << wall << ",\"others_cores\":" << others / wall
     << ",\"loss\":" << loss << "}";
  std::cout << js.str() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"useg_bench: time one model configuration and print one JSON line"};
  app.add_option("--model", o.model, "unet | attention-unet | r2unet | ar2unet")
      ->check(CLI::IsMember({"unet", "attention-unet", "r2unet", "ar2unet"}));
  app.add_option("--width", o.width, "base width (channels at the top level)");
  app.add_option("--depth", o.depth, "number of poolings");
  app.add_option("--t", o.t, "recurrence of the R2 blocks");
  app.add_option("--size", o.size, "input height = width");
  app.add_option("--batch", o.batch, "batch size");
  app.add_option("--mode", o.mode, "infer | train")->check(CLI::IsMember({"infer", "train"}));
  app.add_option("--device", o.device, "cpu (the CUDA backend has its own build)")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--threads", o.threads, "CPU threads (0: all)");
  app.add_option("--iters", o.iters, "timed steps")->check(CLI::PositiveNumber);
  app.add_option("--min-time", o.min_time, "keep timing steps until this many seconds have passed");
  app.add_option("--warmup", o.warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  app.add_option("--up", o.up, "upsample | transpose")->check(CLI::IsMember({"upsample", "transpose"}));
  CLI11_PARSE(app, argc, argv);
  if (o.device != "cpu") {
    std::cerr << "useg_bench: device '" << o.device << "' is not available in this build (CPU only)\n";
    return 2;
  }
  try {
    // 3 input channels (RGB MRI slices, as the LGG data), 1 class.
    if (o.model == "unet") return run<useg::unet<useg::cpu, 3, 1>>(o);
    if (o.model == "attention-unet") return run<useg::attention_unet<useg::cpu, 3, 1>>(o);
    if (o.model == "r2unet") return run<useg::r2unet<useg::cpu, 3, 1>>(o);
    return run<useg::ar2unet<useg::cpu, 3, 1>>(o);
  } catch (const std::exception& e) {
    std::cerr << "useg_bench: " << e.what() << "\n";
    return 1;
  }
}
