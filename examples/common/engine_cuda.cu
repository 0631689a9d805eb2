// backend_engine<useg::cuda>: the --device cuda engine (compiled by nvcc, only in builds with the
// CUDA backend, into the module lgg_cuda.so that make_engine loads for --device cuda).
#include "useg/backend/cuda.hpp"

#include <cstdio>
#include <thread>

#include "engine_impl.hpp"

namespace lgg {

std::unique_ptr<engine> make_cuda_engine(int threads) {
  std::unique_ptr<useg::context<useg::cuda>> ctx;
  try {
    ctx = std::make_unique<useg::context<useg::cuda>>();
  } catch (const useg::cuda_error& e) {
    // no GPU or driver: the backend's own message, which names the CUDA error
    throw useg::backend_error(std::string("--device cuda: ") + e.what());
  }
  cudaDeviceProp prop{};
  USEG_CUDA_CHECK(cudaGetDeviceProperties(&prop, ctx->device()));
  char info[512];
  std::snprintf(info, sizeof info, "cuda device %d (%s, %d SMs, %.1f GiB)", ctx->device(), prop.name, ctx->multiprocessors(),
                static_cast<double>(prop.totalGlobalMem) / (1u << 30));
  // host threads: loading and preprocessing the slices
  int host = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
  if (host <= 0) host = 1;
  return std::make_unique<backend_engine<useg::cuda>>(std::move(ctx), host, info);
}

}  // namespace lgg

/// The module's entry point, looked up by make_engine (engine.cpp) with dlsym. Throws as
/// make_cuda_engine does (useg::backend_error when no GPU is usable).
extern "C" __attribute__((visibility("default"))) lgg::engine* lgg_cuda_new_engine(int threads) {
  return lgg::make_cuda_engine(threads).release();
}
