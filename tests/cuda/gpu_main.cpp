// main() of the CUDA test executables that need a GPU: without a usable CUDA device every test
// exits with code 77, which CTest reports as "Skipped" (SKIP_RETURN_CODE 77). Listing the test
// cases (what doctest_discover_tests does at build time) works without a GPU.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  bool listing = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    for (const char* p : {"--list", "-l", "--dt-list", "-dt-l", "--help", "-h", "-?", "--version", "-v"})
      if (a.rfind(p, 0) == 0) listing = true;
  }
  if (!listing) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
      std::printf("SKIPPED: no usable CUDA device (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
      return 77;
    }
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
