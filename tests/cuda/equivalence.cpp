// CPU-vs-CUDA equivalence: every op, layer, block and the four models, forward and every
// gradient (and optimizer steps), on fresh random data, CUDA in strict FP32 (no TF32) with
// deterministic algorithms, compared with the CPU backend element by element.
//
// The seed is drawn fresh for every run and printed on failure; USEG_TEST_SEED=<n> repeats a run.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>

#include "equivalence.hpp"
#include "useg/backend/cpu.hpp"

namespace {

std::uint64_t test_seed() {
  if (const char* s = std::getenv("USEG_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
}

/// Elementwise |cuda - cpu| <= rtol·|cpu| + atol·max|cpu| for all but a fraction `outliers` of the
/// elements (isolated ReLU / max-pool decisions that round differently in a deep network), and
/// relative L2 error <= l2.
struct tolerance {
  double rtol, atol, outliers, l2;
};

void compare(const std::string& what, const std::vector<double>& cpu, const std::vector<double>& gpu, tolerance t) {
  INFO(what);
  REQUIRE(cpu.size() == gpu.size());
  double scale = 0, num = 0, den = 0;
  for (double v : cpu) scale = std::max(scale, std::abs(v));
  std::size_t bad = 0, worst = 0;
  double worst_err = -1;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const double e = std::abs(gpu[i] - cpu[i]);
    num += e * e;
    den += cpu[i] * cpu[i];
    const bool ok = e <= t.rtol * std::abs(cpu[i]) + t.atol * scale;  // false for NaN
    if (!ok) ++bad;
    if (!(e <= worst_err)) {
      worst_err = e;
      worst = i;
    }
  }
  const double rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  INFO("elements " << cpu.size() << ", out of tolerance " << bad << ", relative L2 error " << rel_l2 << "; worst at [" << worst
                   << "]: cpu " << (cpu.empty() ? 0 : cpu[worst]) << " cuda " << (gpu.empty() ? 0 : gpu[worst]));
  CHECK(static_cast<double>(bad) <= t.outliers * static_cast<double>(cpu.size()));
  CHECK(rel_l2 <= t.l2);
}

tolerance tolerance_for(const std::string& case_name, const std::string& output) {
  const auto has = [&](const char* s) { return output.find(s) != std::string::npos; };
  // pure data movement and selection: bit-exact
  if (case_name == "maxpool" || case_name == "maxpool_ties" || (case_name == "upsample" && has("y")) ||
      (case_name == "memory_ops" && (has("pad") || has("crop") || has("fill") || has("copy"))) ||
      (case_name == "elementwise" && (has("concat") || has("add") || has("gate_y") || has("gate_gx"))) ||
      (case_name == "activations" && has("relu")))
    return {0, 0, 0, 0};
  if (case_name == "activations" || case_name == "losses" || case_name == "optimizers" || case_name == "memory_ops" ||
      case_name == "upsample" || case_name == "elementwise")
    return {2e-6, 1e-7, 0, 1e-6};
  if (case_name.rfind("conv", 0) == 0 || case_name == "upconv2x2" || case_name == "batch_norm") return {1e-4, 1e-5, 0, 1e-5};
  // blocks: a few layers deep
  for (const auto& b : eq::block_cases())
    if (case_name == b) return {1e-3, 1e-4, 0, 1e-4};
  // models: whole networks, and three training steps
  if (has("trained") || has("loss")) return {1e-3, 1e-3, 2e-3, 1e-3};
  return {1e-3, 1e-4, 2e-3, 5e-4};
}

void run_and_compare(const std::string& name) {
  const std::uint64_t seed = test_seed();
  INFO("case " << name << ", seed " << seed << " (USEG_TEST_SEED=" << seed << " repeats it)");
  useg::context<useg::cpu> cpu_ctx;
  const eq::outputs cpu = eq::run<useg::cpu>(name, seed, cpu_ctx);
  const eq::outputs gpu = eq::run_cuda(name, seed);
  REQUIRE(cpu.size() == gpu.size());
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    REQUIRE(cpu[i].first == gpu[i].first);
    compare(name + "/" + cpu[i].first, cpu[i].second, gpu[i].second, tolerance_for(name, cpu[i].first));
  }
}

}  // namespace

TEST_CASE("CPU vs CUDA: ops and layers (forward and all gradients)") {
  for (const auto& name : eq::op_cases()) {
    SUBCASE(name.c_str()) { run_and_compare(name); }
  }
}
TEST_CASE("CPU vs CUDA: blocks (train and eval, forward and all gradients)") {
  for (const auto& name : eq::block_cases()) {
    SUBCASE(name.c_str()) { run_and_compare(name); }
  }
}
TEST_CASE("CPU vs CUDA: unet") { run_and_compare("unet"); }
TEST_CASE("CPU vs CUDA: attention_unet") { run_and_compare("attention_unet"); }
TEST_CASE("CPU vs CUDA: r2unet") { run_and_compare("r2unet"); }
TEST_CASE("CPU vs CUDA: ar2unet") { run_and_compare("ar2unet"); }
