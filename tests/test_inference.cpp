// Inference (predict) and the memory plan: predict() gives the eval-mode forward's logits
// exactly, keeps nothing for a backward, restores the training flag, and holds less memory.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <vector>

#include "useg/useg.hpp"

using namespace useg;

#define USEG_ALL_MODELS_F(In, Cls)                                                                   \
  useg::unet<useg::cpu, In, Cls>, useg::attention_unet<useg::cpu, In, Cls>, useg::r2unet<useg::cpu, In, Cls>, \
      useg::ar2unet<useg::cpu, In, Cls>

namespace {
tensor<cpu> random_input(shape s, std::uint64_t seed) {
  useg::rng g(seed);
  tensor<cpu> x(s);
  for (std::size_t i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(g.uniform(-1, 1));
  return x;
}
}  // namespace

TEST_CASE_TEMPLATE("predict() equals the eval-mode forward, restores the mode, and forbids backward", Model,
                   USEG_ALL_MODELS_F(3, 2)) {
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 3;
  cfg.seed = 5;
  Model m(cfg);
  context<cpu> ctx(1);
  m.set_context(ctx);
  for (auto s : {shape{2, 3, 16, 16}, shape{1, 3, 19, 13}}) {
    tensor<cpu> x = random_input(s, 3);
    // A few training steps first, so the running statistics are not the initial ones.
    m.train();
    for (int i = 0; i < 2; ++i) m.forward(x);
    m.eval();
    const std::vector<float> ref = m.forward(x).to_host();
    m.train();
    const tensor<cpu>& y = m.predict(x);
    CHECK(m.is_training());
    REQUIRE(y.dims() == shape({s.n(), 2, s.h(), s.w()}));
    CHECK(y.to_host() == ref);
    tensor<cpu> gy(y.dims());
    gy.fill(1);
    CHECK_THROWS_AS(m.backward(gy), config_error);
    // forward() restores the ability to run backward.
    m.eval();
    const tensor<cpu>& y2 = m.forward(x);
    CHECK(y2.to_host() == ref);
    CHECK(m.backward(gy, true).dims() == x.dims());
    CHECK(m.predict(x).to_host() == ref);
  }
}

TEST_CASE_TEMPLATE("predict() equals the eval-mode forward where the decoder reads its inputs in place (F(4×4) sizes)",
                   Model, USEG_ALL_MODELS_F(3, 2)) {
  // Width 8 at 128×128: the up-convolutions into 64×64 and 128×128 read their input through the
  // upsampling (F(4×4,3×3) over whole vectors), and the decoder blocks read the skip and the
  // up-convolution output in place, where predict() takes those paths; the eval-mode forward
  // (kept for a backward) builds both. Same arithmetic: the same bits.
  unet_config cfg;
  cfg.width = 8;
  cfg.depth = 2;
  cfg.seed = 12;
  Model m(cfg);
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    context<cpu> ctx(threads);
    m.set_context(ctx);
    tensor<cpu> x = random_input(shape{1, 3, 128, 128}, 13);
    m.train();
    m.forward(x);  // running statistics that are not the initial ones
    m.eval();
    const std::vector<float> ref = m.forward(x).to_host();
    CHECK(m.predict(x).to_host() == ref);
    CHECK(m.predict(x).to_host() == ref);  // (packed weights from the cache)
  }
}

TEST_CASE("predict() holds less memory than an eval-mode forward kept for a backward") {
  unet_config cfg;
  cfg.width = 8;
  cfg.depth = 3;
  ar2unet<cpu, 3, 1> m(cfg);
  context<cpu> ctx(1);
  ctx.set_weight_cache_bytes(std::size_t(64) << 20);  // (whatever USEG_CPU_WEIGHT_CACHE_MB says)
  m.set_context(ctx);
  tensor<cpu> x = random_input(shape{2, 3, 64, 64}, 4);
  m.eval();
  m.predict(x);
  const std::size_t cached = ctx.weight_cache_held();
  CHECK(cached > 0);
  m.forward(x);
  const std::size_t after_forward = cpu_memory().live;
  // (The forward may grow the context's workspace, which stays: predict() is compared with
  // itself after it.)
  m.predict(x);
  const std::size_t after_predict = cpu_memory().live;
  m.predict(x);
  const std::size_t after_predict2 = cpu_memory().live;
  CHECK(ctx.weight_cache_held() == cached);
  // One 8-channel 64x64 map of the batch is 256 KiB; the kept state is many of them.
  CHECK(after_forward > after_predict + 8 * 256 * 1024);
  CHECK(after_predict2 == after_predict);
}

TEST_CASE("predict(): packed weights cached between calls follow the weights, the budget and the model") {
  unet_config cfg;
  cfg.width = 8;
  cfg.depth = 3;
  cfg.seed = 3;
  unet<cpu, 3, 1> a(cfg);
  cfg.seed = 4;
  attention_unet<cpu, 3, 1> b(cfg);
  context<cpu> ctx(1);
  CHECK(ctx.weight_cache_bytes() == context<cpu>::default_weight_cache_bytes());
  ctx.set_weight_cache_bytes(std::size_t(64) << 20);  // (whatever USEG_CPU_WEIGHT_CACHE_MB says)
  a.set_context(ctx);
  b.set_context(ctx);
  tensor<cpu> x = random_input(shape{2, 3, 64, 64}, 8);
  auto eval_forward = [&](auto& m) {
    m.eval();
    auto y = m.forward(x).to_host();
    m.train();
    return y;
  };
  const auto ref_a = eval_forward(a);
  CHECK(a.predict(x).to_host() == ref_a);
  const std::size_t held_a = ctx.weight_cache_held();
  CHECK(held_a > 0);
  CHECK(held_a <= ctx.weight_cache_bytes());
  CHECK(a.predict(x).to_host() == ref_a);  // served from the cache
  CHECK(ctx.weight_cache_held() == held_a);
  // New weights (as after an optimizer step): the cache must not serve the old packing.
  a.visit_parameters([](const auto&, float* v, float*) { v[0] += 0.25f; });
  const auto ref_a2 = eval_forward(a);
  REQUIRE(ref_a2 != ref_a);
  CHECK(a.predict(x).to_host() == ref_a2);
  CHECK(ctx.weight_cache_held() == held_a);  // the stale entries were dropped
  // Another model on the same context: only its entries stay.
  const auto ref_b = eval_forward(b);
  CHECK(b.predict(x).to_host() == ref_b);
  const std::size_t held_b = ctx.weight_cache_held();
  CHECK(held_b > 0);
  CHECK(a.predict(x).to_host() == ref_a2);
  CHECK(ctx.weight_cache_held() == held_a);
  // A budget smaller than the model's packed weights: the cache empties and turns itself off;
  // set_weight_cache_bytes turns it on again; 0: nothing cached.
  ctx.set_weight_cache_bytes(held_a / 2);
  CHECK(ctx.weight_cache_held() == 0);
  CHECK(a.predict(x).to_host() == ref_a2);
  CHECK(ctx.weight_cache_overflowed());
  CHECK(ctx.weight_cache_held() == 0);
  CHECK(a.predict(x).to_host() == ref_a2);
  CHECK(ctx.weight_cache_held() == 0);
  ctx.set_weight_cache_bytes(held_a);
  CHECK_FALSE(ctx.weight_cache_overflowed());
  CHECK(a.predict(x).to_host() == ref_a2);
  CHECK(ctx.weight_cache_held() == held_a);
  ctx.set_weight_cache_bytes(0);
  CHECK(ctx.weight_cache_held() == 0);
  CHECK(a.predict(x).to_host() == ref_a2);
  CHECK(ctx.weight_cache_held() == 0);
  CHECK_FALSE(ctx.weight_cache_overflowed());
}

TEST_CASE("predict(): the cache keeps the packed weights of calls of at most weight_cache_max_tiles() tiles") {
  // Width 8, depth 3 at 64×64, batch 2: level 0 is 2·16·16 = 512 F(4×4,3×3) tiles (not cached by
  // default), level 1 128, the deeper levels fewer (cached).
  unet_config cfg;
  cfg.width = 8;
  cfg.depth = 3;
  unet<cpu, 3, 1> m(cfg);
  context<cpu> ctx(1);
  ctx.set_weight_cache_bytes(std::size_t(64) << 20);
  CHECK(ctx.weight_cache_max_tiles() == context<cpu>::default_weight_cache_max_tiles);
  m.set_context(ctx);
  tensor<cpu> x = random_input(shape{2, 3, 64, 64}, 9);
  m.eval();
  const auto ref = m.forward(x).to_host();
  CHECK(m.predict(x).to_host() == ref);
  const std::size_t held_default = ctx.weight_cache_held();
  CHECK(held_default > 0);
  ctx.set_weight_cache_max_tiles(long(1) << 40);
  ctx.set_weight_cache_bytes(std::size_t(64) << 20);  // empties it
  CHECK(m.predict(x).to_host() == ref);
  const std::size_t held_all = ctx.weight_cache_held();
  CHECK(held_all > held_default);
  CHECK(m.predict(x).to_host() == ref);
  CHECK(ctx.weight_cache_held() == held_all);
  ctx.set_weight_cache_max_tiles(0);
  ctx.set_weight_cache_bytes(std::size_t(64) << 20);
  CHECK(m.predict(x).to_host() == ref);
  CHECK(ctx.weight_cache_held() == 0);
  CHECK_FALSE(ctx.weight_cache_overflowed());
  ctx.set_weight_cache_max_tiles(-5);
  CHECK(ctx.weight_cache_max_tiles() == 0);
}

TEST_CASE("a training step after predict() matches one without it") {
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 2;
  r2unet<cpu, 3, 1> a(cfg), b(cfg);
  context<cpu> ctx(1);
  a.set_context(ctx);
  b.set_context(ctx);
  tensor<cpu> x = random_input(shape{2, 3, 12, 12}, 6), gy = random_input(shape{2, 1, 12, 12}, 7);
  a.predict(x);
  a.zero_grad();
  a.forward(x);
  a.backward(gy);
  b.zero_grad();
  b.forward(x);
  b.backward(gy);
  const auto ga = a.params().flat_grads().to_host(), gb = b.params().flat_grads().to_host();
  CHECK(ga == gb);
}

TEST_CASE("a model used only for inference never allocates its gradient buffer") {
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 2;
  useg::attention_unet<cpu, 3, 1> m(cfg);
  context<cpu> ctx(1);
  m.set_context(ctx);
  CHECK_FALSE(m.params().has_grads());
  tensor<cpu> x = random_input(shape{2, 3, 16, 16}, 9);
  m.predict(x);
  m.eval();
  m.forward(x);
  CHECK_FALSE(m.params().has_grads());
  // The first backward allocates it, zeroed, and accumulates into it.
  m.train();
  const tensor<cpu>& y = m.forward(x);
  tensor<cpu> g = tensor<cpu>::from_host(y.dims(), std::vector<float>(y.size(), 1.0f));
  m.backward(g);
  REQUIRE(m.params().has_grads());
  const std::vector<float> g1 = m.params().flat_grads().to_host();
  double norm = 0;
  for (float v : g1) norm += static_cast<double>(v) * v;
  CHECK(norm > 0);
  m.forward(x);
  m.backward(g);  // accumulates: twice the first gradient
  const std::vector<float> g2 = m.params().flat_grads().to_host();
  for (std::size_t i = 0; i < g1.size(); i += 97) CHECK(g2[i] == doctest::Approx(2 * g1[i]).epsilon(1e-4));
  m.zero_grad();
  for (float v : m.params().flat_grads().to_host()) REQUIRE(v == 0.0f);
}
