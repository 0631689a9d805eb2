// useg_bench — time one model configuration (inference or a full training step) and print one
// JSON line: images/s, ms per step, peak resident memory, achieved GFLOP/s, and how much CPU
// other processes used while it was timed (so noisy runs can be flagged or re-run).
//
//   useg_bench --model ar2unet --width 16 --size 256 --batch 4 --mode train --threads 2 --iters 5
//   useg_bench --device cuda --model ar2unet --width 32 --size 256 --batch 16 --mode train
//
// A training step is: forward, BCE-with-logits loss (+ its gradient), zero_grad, backward, Adam
// step — what the PyTorch side (benchmarks/pytorch_bench.py) times as well. Inference is the
// model's predict() (eval mode, no backward state), as PyTorch's eval() under no_grad(). FLOPs come from the
// model's own count (forward_flops()); a training step counts 3× the forward.
//
// --device cuda (builds with the CUDA backend) runs the same models through useg::cuda, in the
// module useg_bench_cuda.so beside this program (loaded only then, so --device cpu never maps the
// CUDA libraries): each timed step ends with a stream synchronization, and the line adds the GPU's
// name and the CUDA caching pool's peak ("gpu_peak_mb"), base, cached bytes and cudaMalloc calls
// per step.
// Exit codes: 0 done, 1 run-time failure (also: no usable GPU), 2 bad flags (also: --device cuda
// in a CPU-only build).
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>

#include "bench_run.hpp"

#ifdef USEG_BENCH_CUDA_MODULE
#include "sibling_module.hpp"  // examples/common

/// --device cuda: load the module beside this program (useg_bench_cuda.cu) and run it there.
static int run_cuda_module(const bench::options& o) {
  using entry_t = int (*)(const bench::options*);
  entry_t entry = nullptr;
  try {
    entry = reinterpret_cast<entry_t>(lgg::sibling_module_symbol(USEG_BENCH_CUDA_MODULE, "useg_bench_cuda_main"));
  } catch (const std::exception& e) {
    std::cerr << "useg_bench: --device cuda: " << e.what() << "\n";
    return 1;
  }
  return entry(&o);  // the module stays loaded until the process exits
}
#endif

int main(int argc, char** argv) {
  bench::options o;
  CLI::App app{"useg_bench: time one model configuration and print one JSON line"};
  app.add_option("--model", o.model, "unet | attention-unet | r2unet | ar2unet")
      ->check(CLI::IsMember({"unet", "attention-unet", "r2unet", "ar2unet"}));
  app.add_option("--width", o.width, "base width (channels at the top level)");
  app.add_option("--depth", o.depth, "number of poolings");
  app.add_option("--t", o.t, "recurrence of the R2 blocks");
  app.add_option("--size", o.size, "input height = width");
  app.add_option("--batch", o.batch, "batch size");
  app.add_option("--mode", o.mode, "infer | train")->check(CLI::IsMember({"infer", "train"}));
#ifdef USEG_BENCH_CUDA_MODULE
  const char* device_help = "cpu | cuda (this build has the CUDA backend)";
#else
  const char* device_help = "cpu | cuda (this build is CPU only)";
#endif
  app.add_option("--device", o.device, device_help)->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--threads", o.threads, "CPU threads (0: all); not used by --device cuda");
  app.add_option("--iters", o.iters, "timed steps")->check(CLI::PositiveNumber);
  app.add_option("--min-time", o.min_time, "keep timing steps until this many seconds have passed");
  app.add_option("--warmup", o.warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  app.add_option("--up", o.up, "upsample | transpose")->check(CLI::IsMember({"upsample", "transpose"}));
  CLI11_PARSE(app, argc, argv);
  if (o.device == "cuda") {
#ifdef USEG_BENCH_CUDA_MODULE
    return run_cuda_module(o);
#else
    std::cerr << "useg_bench: --device cuda: this program was built without the CUDA backend (CPU only); rebuild with nvcc and "
                 "cuDNN present (CMake option USEG_ENABLE_CUDA=AUTO or ON), or use --device cpu\n";
    return 2;
#endif
  }
  try {
    // 3 input channels (RGB MRI slices, as the LGG data), 1 class.
    if (o.model == "unet") return bench::run<useg::unet<useg::cpu, 3, 1>>(o);
    if (o.model == "attention-unet") return bench::run<useg::attention_unet<useg::cpu, 3, 1>>(o);
    if (o.model == "r2unet") return bench::run<useg::r2unet<useg::cpu, 3, 1>>(o);
    return bench::run<useg::ar2unet<useg::cpu, 3, 1>>(o);
  } catch (const std::exception& e) {
    std::cerr << "useg_bench: " << e.what() << "\n";
    return 1;
  }
}
