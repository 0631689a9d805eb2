// backend_engine<useg::cpu>: the --device cpu engine.
#include "useg/backend/cpu.hpp"

#include "engine_impl.hpp"

namespace lgg {

std::unique_ptr<engine> make_cpu_engine(int threads) {
  auto ctx = std::make_unique<useg::context<useg::cpu>>(threads);
  const int n = ctx->threads();
  std::string info = "cpu, " + std::to_string(n) + (n == 1 ? " compute thread" : " compute threads");
  return std::make_unique<backend_engine<useg::cpu>>(std::move(ctx), n, std::move(info));
}

}  // namespace lgg
