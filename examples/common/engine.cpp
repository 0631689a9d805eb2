// make_engine: --device dispatch. In builds with the CUDA backend, LGG_CUDA_MODULE names the module
// (engine_cuda.cu and the model families for useg::cuda, compiled by nvcc) that is loaded from the
// program's folder for --device cuda only, so that --device cpu never maps the CUDA libraries.
#include "engine.hpp"

#ifdef LGG_CUDA_MODULE
#include "sibling_module.hpp"
#endif
#include "useg/core/error.hpp"

namespace lgg {

bool built_with_cuda() {
#ifdef LGG_CUDA_MODULE
  return true;
#else
  return false;
#endif
}

#ifdef LGG_CUDA_MODULE
namespace {
/// The module's engine factory (lgg_cuda_new_engine in engine_cuda.cu). The module stays loaded
/// until the process exits: engines, their vtables and their exceptions come from it.
using factory_t = engine* (*)(int threads);
factory_t cuda_factory() {
  try {
    return reinterpret_cast<factory_t>(sibling_module_symbol(LGG_CUDA_MODULE, "lgg_cuda_new_engine"));
  } catch (const useg::error& e) {
    throw useg::error(std::string("--device cuda: ") + e.what());
  }
}
}  // namespace
#endif

std::unique_ptr<engine> make_engine(const std::string& device, int threads) {
  if (device == "cpu") return make_cpu_engine(threads);
  if (device == "cuda") {
#ifdef LGG_CUDA_MODULE
    static const factory_t f = cuda_factory();
    return std::unique_ptr<engine>(f(threads));
#else
    throw useg::config_error(
        "--device cuda: this program was built without the CUDA backend (CPU only); rebuild with nvcc and cuDNN "
        "present (CMake option USEG_ENABLE_CUDA=AUTO or ON), or use --device cpu");
#endif
  }
  throw useg::config_error("unknown --device '" + device + "' (cpu or cuda)");
}

}  // namespace lgg
