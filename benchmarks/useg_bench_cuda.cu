// useg_bench --device cuda: the same timed run (bench_run.hpp) for the four models on useg::cuda.
// Compiled by nvcc, only in builds with the CUDA backend, into the module useg_bench_cuda.so that
// useg_bench loads for --device cuda (so that --device cpu never maps the CUDA libraries).
#include "useg/backend/cuda.hpp"

#include <iostream>

#include "bench_run.hpp"

int bench::run_cuda(const options& o) {
  // run() creates the context first: without a usable GPU it throws useg::cuda_error, whose
  // message names the CUDA error (no device, no driver, ...)
  device_hooks hooks;
  hooks.name = [] {
    int dev = 0;
    cudaDeviceProp prop{};
    USEG_CUDA_CHECK(cudaGetDevice(&dev));
    USEG_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    return std::string(prop.name);
  };
  hooks.memory = [] {
    const useg::cuda_memory_stats s = useg::cuda_memory_statistics();
    return device_memory{s.in_use, s.cached, s.peak_in_use, s.malloc_calls};
  };
  if (o.model == "unet") return run<useg::unet<useg::cuda, 3, 1>>(o, &hooks);
  if (o.model == "attention-unet") return run<useg::attention_unet<useg::cuda, 3, 1>>(o, &hooks);
  if (o.model == "r2unet") return run<useg::r2unet<useg::cuda, 3, 1>>(o, &hooks);
  return run<useg::ar2unet<useg::cuda, 3, 1>>(o, &hooks);
}

/// The module's entry point (looked up by useg_bench with dlsym). Errors are reported here, so no
/// exception crosses the module boundary: 0 done, 1 failure (no usable GPU, out of memory, ...).
extern "C" __attribute__((visibility("default"))) int useg_bench_cuda_main(const bench::options* o) {
  try {
    return bench::run_cuda(*o);
  } catch (const std::exception& e) {
    std::cerr << "useg_bench: --device cuda: " << e.what() << "\n";
    return 1;
  }
}
