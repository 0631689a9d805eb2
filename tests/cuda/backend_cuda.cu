// The backend-generic test bodies (suite.hpp) instantiated for useg::cuda, plus what only the CUDA
// backend has: the caching pool, the per-shape convolution plans, deterministic and strict-FP32
// switches, own streams and error reporting. Needs a GPU (skipped otherwise, see gpu_main.cpp).
//
// This translation unit includes <useg/useg.hpp> — the CPU backend and Eigen — as a user's .cu
// file would: the model aliases (useg::ar2unet<useg::cuda, ...>) must work under nvcc.
#include <doctest/doctest.h>

#include <vector>

#include "useg/useg.hpp"
#include "useg/backend/cuda.hpp"
#include "suite.hpp"

USEG_SUITE_INVOKE(useg::cuda);

// The optional ops the blocks use when present: fused batch norm + ReLU (and its re-application
// from the saved statistics, with and without the ReLU), and eval-mode batch norm folded into the convolution.
static_assert(suite::has_fused_bn_relu<useg::cuda>);
static_assert(requires {
  &useg::ops<useg::cuda>::batch_norm_relu_apply;
  &useg::ops<useg::cuda>::batch_norm_apply;
  &useg::ops<useg::cuda>::fold_batch_norm;
  &useg::ops<useg::cuda>::conv2d_forward_relu;
});

using useg::shape;
using tensor = useg::tensor<useg::cuda>;

TEST_CASE("the user's spelling: useg::ar2unet<useg::cuda, 3, 1> trains on the GPU") {
  useg::unet_config cfg;
  cfg.width = 4;
  cfg.depth = 2;
  useg::ar2unet<useg::cuda, 3, 1> m(cfg);
  useg::unet<useg::cuda, 3, 1> u(cfg);
  useg::rng g(1);
  auto x = suite::random_tensor<useg::cuda>(shape{2, 3, 16, 16}, g, 0, 1);
  auto y = suite::random_tensor<useg::cuda>(shape{2, 1, 16, 16}, g, 0, 1);
  tensor grad;
  useg::adamw<useg::cuda> opt(m.params(), m.ctx());
  const auto before = m.params().flat_params().to_host();
  m.zero_grad();
  const double l = useg::compute_loss(m.ctx(), useg::loss_options{}, m.forward(x), y, &grad);
  CHECK(std::isfinite(l));
  m.backward(grad);
  opt.step();
  CHECK(m.params().flat_params().to_host() != before);
  CHECK(u.forward(x).dims() == shape({2, 1, 16, 16}));
}

TEST_CASE("caching pool: freed blocks are reused without cudaMalloc, statistics add up") {
  const auto s0 = useg::cuda_memory_statistics();
  {
    tensor a(shape{1000, 1000});
    const auto s1 = useg::cuda_memory_statistics();
    CHECK(s1.in_use >= s0.in_use + 4000000);
    CHECK(s1.peak_in_use >= s1.in_use);
  }
  const auto s2 = useg::cuda_memory_statistics();
  CHECK(s2.in_use == s0.in_use);
  CHECK(s2.cached >= 4000000);
  for (int i = 0; i < 10; ++i) {
    tensor b(shape{1000, 1000});
    b.fill(1.f);
  }
  CHECK(useg::cuda_memory_statistics().malloc_calls == s2.malloc_calls);  // all served from the cache
  useg::cuda_release_cached_memory();
  CHECK(useg::cuda_memory_statistics().cached == 0);
}

TEST_CASE("convolution plans: one per shape, algorithms chosen once") {
  useg::context<useg::cuda> ctx;
  useg::param_store<useg::cuda> s;
  useg::conv2d<useg::cuda, 3, true> conv(s, "c", 3, 4);
  s.finalize(1);
  tensor x(shape{2, 3, 8, 8}), x2(shape{1, 3, 8, 8});
  x.fill(1.f);
  x2.fill(1.f);
  CHECK(ctx.conv_plan_count() == 0);
  conv.forward(ctx, x);
  conv.forward(ctx, x);
  CHECK(ctx.conv_plan_count() == 1);
  conv.backward(ctx, conv.output());
  CHECK(ctx.conv_plan_count() == 1);
  conv.forward(ctx, x2);
  CHECK(ctx.conv_plan_count() == 2);
  ctx.set_allow_tf32(false);  // a different math mode: plans are rebuilt
  CHECK(ctx.conv_plan_count() == 0);
}

TEST_CASE("deterministic mode: training repeats bit for bit, also in strict FP32, and benchmark mode runs") {
  using model = useg::r2unet<useg::cuda, 3, 1>;
  useg::unet_config cfg;
  cfg.width = 4;
  cfg.depth = 3;
  cfg.seed = 5;
  auto train = [&](useg::cuda_options o) {
    useg::context<useg::cuda> ctx(o);
    model m(cfg);
    m.set_context(ctx);
    useg::rng g(2);
    auto x = suite::random_tensor<useg::cuda>(shape{2, 3, 24, 20}, g, 0, 1);
    auto y = suite::random_tensor<useg::cuda>(shape{2, 1, 24, 20}, g, 0, 1);
    tensor grad;
    useg::adam<useg::cuda> opt(m.params(), ctx);
    for (int i = 0; i < 3; ++i) {
      m.zero_grad();
      useg::bce_dice_loss(ctx, m.forward(x), y, &grad);
      m.backward(grad);
      opt.step();
    }
    return m.params().flat_params().to_host();
  };
  useg::cuda_options det;
  det.deterministic = true;
  CHECK(train(det) == train(det));
  det.allow_tf32 = false;
  CHECK(train(det) == train(det));
  useg::cuda_options bench;
  bench.benchmark = true;
  const auto pb = train(bench);
  for (float v : pb) REQUIRE(std::isfinite(v));
}

TEST_CASE("a context on its own stream gives the same results as the default stream") {
  useg::unet_config cfg;
  cfg.width = 4;
  cfg.depth = 2;
  useg::cuda_options a, b;
  a.deterministic = b.deterministic = true;
  b.own_stream = true;
  useg::context<useg::cuda> ca(a), cb(b);
  CHECK(ca.stream() == cudaStreamLegacy);
  CHECK(cb.stream() != cudaStreamLegacy);
  useg::attention_unet<useg::cuda, 3, 1> ma(cfg), mb(cfg);
  ma.set_context(ca);
  mb.set_context(cb);
  useg::rng g(3);
  auto x = suite::random_tensor<useg::cuda>(shape{2, 3, 16, 16}, g);
  const auto ya = ma.forward(x).to_host();
  const auto yb = mb.forward(x).to_host();
  CHECK(ya == yb);
  auto gy = suite::random_tensor<useg::cuda>(shape{2, 1, 16, 16}, g);
  ma.zero_grad();
  mb.zero_grad();
  const auto ga = ma.backward(gy, true).to_host();
  const auto gb = mb.backward(gy, true).to_host();
  CHECK(ga == gb);
  CHECK(ma.params().flat_grads().to_host() == mb.params().flat_grads().to_host());
}

TEST_CASE("a failing cuDNN call surfaces as cuda_error naming the call") {
  useg::context<useg::cuda> ctx;
  useg::conv_desc d{0, 3, 4, 8, 8, 3};  // batch 0: cuDNN rejects the descriptor
  CHECK_THROWS_WITH_AS(useg::ops<useg::cuda>::conv2d_forward(ctx, d, nullptr, nullptr, nullptr, nullptr),
                       doctest::Contains("cudnnSetTensor4dDescriptor"), useg::cuda_error);
  // the context stays usable
  tensor x(shape{1, 1, 4, 4});
  x.fill(2.f);
  CHECK(useg::ops<useg::cuda>::sum(ctx, x.data(), x.size()) == 32.0);
}
