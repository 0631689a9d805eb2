// The CUDA side of the equivalence tests: eq::run<useg::cuda> on a strict-FP32, deterministic
// context. This translation unit includes no CPU backend (no Eigen under nvcc here).
#include "equivalence.hpp"
#include "useg/backend/cuda.hpp"

namespace eq {
outputs run_cuda(const std::string& name, std::uint64_t seed) {
  useg::cuda_options o;
  o.allow_tf32 = false;
  o.deterministic = true;
  useg::context<useg::cuda> ctx(o);
  auto out = run<useg::cuda>(name, seed, ctx);
  ctx.synchronize();
  return out;
}
}  // namespace eq
