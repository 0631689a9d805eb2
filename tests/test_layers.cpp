// Layers: finite-difference gradient checks (double) and exact small cases against naive loops.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cmath>

#include "gradcheck.hpp"
#include "useg/layers/activation.hpp"
#include "useg/layers/batch_norm2d.hpp"
#include "useg/layers/conv2d.hpp"
#include "useg/layers/conv_transpose2d.hpp"
#include "useg/layers/elementwise.hpp"
#include "useg/layers/resample.hpp"

using namespace useg;
using gc::B;
using gc::T;

namespace {
// Independent direct convolution (same padding, stride 1), for exact comparisons.
std::vector<double> naive_conv(const T& x, const double* w, const double* b, int cout, int k) {
  const int n = x.n(), c = x.c(), h = x.h(), wd = x.w(), p = k / 2;
  std::vector<double> y(static_cast<std::size_t>(n) * cout * h * wd, 0.0);
  for (int i = 0; i < n; ++i)
    for (int o = 0; o < cout; ++o)
      for (int yy = 0; yy < h; ++yy)
        for (int xx = 0; xx < wd; ++xx) {
          double s = b ? b[o] : 0.0;
          for (int ci = 0; ci < c; ++ci)
            for (int ky = 0; ky < k; ++ky)
              for (int kx = 0; kx < k; ++kx) {
                const int iy = yy + ky - p, ix = xx + kx - p;
                if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
                s += w[((o * c + ci) * k + ky) * k + kx] * x.data()[((i * c + ci) * h + iy) * wd + ix];
              }
          y[((static_cast<std::size_t>(i) * cout + o) * h + yy) * wd + xx] = s;
        }
  return y;
}
}  // namespace

TEST_CASE_TEMPLATE("conv2d matches a direct convolution", Conv, conv2d<B, 3, true>, conv2d<B, 1, true>, conv2d<B, 3, false>,
                   conv2d<B, 5, true>) {
  param_store<B> s;
  Conv conv(s, "c", 3, 4);
  s.finalize(7);
  useg::rng g(3);
  T x = gc::random_tensor(shape{2, 3, 5, 6}, g);
  context<B> ctx;
  const T& y = conv.forward(ctx, x);
  REQUIRE(y.dims() == shape({2, 4, 5, 6}));
  const double* b = s.entries().size() > 1 ? s.param(param_ref{1}) : nullptr;
  auto ref = naive_conv(x, s.param(param_ref{0}), b, 4, Conv::kernel);
  for (std::size_t i = 0; i < ref.size(); ++i) REQUIRE(y.data()[i] == doctest::Approx(ref[i]).epsilon(1e-12));
}

TEST_CASE_TEMPLATE("conv2d gradient check", Conv, conv2d<B, 3, true>, conv2d<B, 1, true>, conv2d<B, 3, false>) {
  param_store<B> s;
  Conv conv(s, "c", 3, 4);
  s.finalize(11);
  useg::rng g(5);
  context<B> ctx;
  for (auto dims : {shape{2, 3, 6, 5}, shape{2, 3, 1, 7}}) {
    T x = gc::random_tensor(dims, g);
    gc::check(
        "conv2d", [&]() -> const T& { return conv.forward(ctx, x); },
        [&](const T& gy) { return std::vector<const T*>{&conv.backward(ctx, gy)}; }, {&x}, &s);
  }
}

TEST_CASE("conv2d initialization follows PyTorch's kaiming-uniform(a=sqrt 5) bounds and is reproducible") {
  param_store<B> s1, s2;
  conv2d<B, 3, true> c1(s1, "c", 8, 16), c2(s2, "c", 8, 16);
  s1.finalize(42);
  s2.finalize(42);
  const double bound = 1.0 / std::sqrt(8.0 * 9.0);
  const double* w = s1.param(param_ref{0});
  double mx = 0;
  for (std::size_t i = 0; i < 16 * 8 * 9; ++i) {
    REQUIRE(std::abs(w[i]) <= bound);
    mx = std::max(mx, std::abs(w[i]));
    REQUIRE(w[i] == s2.param(param_ref{0})[i]);
  }
  CHECK(mx > 0.9 * bound);  // really spread over the interval
  CHECK(s1.entry(param_ref{0}).name == "c.weight");
  CHECK(s1.entry(param_ref{1}).name == "c.bias");
  param_store<B> s3;
  conv2d<B, 3, true> c3(s3, "c", 8, 16);
  s3.finalize(43);
  CHECK(s3.param(param_ref{0})[0] != w[0]);
}

TEST_CASE("conv_transpose2x2 matches the definition and passes the gradient check") {
  param_store<B> s;
  conv_transpose2x2<B> up(s, "up", 3, 2);
  s.finalize(5);
  useg::rng g(9);
  context<B> ctx;
  T x = gc::random_tensor(shape{2, 3, 3, 4}, g);
  const T& y = up.forward(ctx, x);
  REQUIRE(y.dims() == shape({2, 2, 6, 8}));
  const double* w = s.param(param_ref{0});
  const double* b = s.param(param_ref{1});
  for (int n = 0; n < 2; ++n)
    for (int co = 0; co < 2; ++co)
      for (int i = 0; i < 6; ++i)
        for (int j = 0; j < 8; ++j) {
          double ref = b[co];
          for (int ci = 0; ci < 3; ++ci)
            ref += x.data()[((n * 3 + ci) * 3 + i / 2) * 4 + j / 2] * w[((ci * 2 + co) * 2 + i % 2) * 2 + j % 2];
          REQUIRE(y.data()[((n * 2 + co) * 6 + i) * 8 + j] == doctest::Approx(ref).epsilon(1e-12));
        }
  gc::check(
      "conv_transpose2x2", [&]() -> const T& { return up.forward(ctx, x); },
      [&](const T& gy) { return std::vector<const T*>{&up.backward(ctx, gy)}; }, {&x}, &s);
}

TEST_CASE("batch_norm2d train mode: batch statistics, running stats with momentum 0.1, unbiased var") {
  param_store<B> s;
  batch_norm2d<B> bn(s, "bn", 2);
  s.finalize(0);
  context<B> ctx;
  // channel 0 holds 1..8, channel 1 holds 2·(1..8)
  T x(shape{2, 2, 2, 2});
  for (int n = 0; n < 2; ++n)
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 4; ++i) x.data()[(n * 2 + c) * 4 + i] = (c + 1) * (n * 4 + i + 1);
  const T& y = bn.forward(ctx, x);
  const double mean0 = 4.5, var0 = 5.25;  // biased variance of 1..8
  CHECK(y.data()[0] == doctest::Approx((1 - mean0) / std::sqrt(var0 + 1e-5)));
  CHECK(s.buffer(param_ref{2})[0] == doctest::Approx(0.1 * mean0));
  CHECK(s.buffer(param_ref{3})[0] == doctest::Approx(0.9 + 0.1 * var0 * 8 / 7));
  CHECK(s.buffer(param_ref{2})[1] == doctest::Approx(0.1 * 2 * mean0));
  CHECK(s.counter(param_ref{4}) == 1);
  CHECK(s.entry(param_ref{2}).name == "bn.running_mean");
  CHECK(s.entry(param_ref{4}).name == "bn.num_batches_tracked");
  // eval mode uses the running statistics
  s.set_training(false);
  const T& ye = bn.forward(ctx, x);
  CHECK(ye.data()[0] == doctest::Approx((1 - 0.45) / std::sqrt(0.9 + 0.6 + 1e-5)));
  CHECK(s.counter(param_ref{4}) == 1);
}

TEST_CASE("batch_norm2d gradient check in train and eval mode") {
  param_store<B> s;
  batch_norm2d<B> bn(s, "bn", 3);
  s.finalize(0);
  useg::rng g(1);
  // non-trivial affine parameters and running statistics
  for (int i = 0; i < 3; ++i) {
    s.param(param_ref{0})[i] = g.uniform(0.5, 1.5);
    s.param(param_ref{1})[i] = g.uniform(-0.5, 0.5);
  }
  context<B> ctx;
  T x = gc::random_tensor(shape{2, 3, 4, 3}, g);
  for (bool train : {true, false}) {
    s.set_training(train);
    if (!train)
      for (int i = 0; i < 3; ++i) s.buffer(param_ref{3})[i] = g.uniform(0.5, 2.0);
    gc::check(
        train ? "bn train" : "bn eval", [&]() -> const T& { return bn.forward(ctx, x); },
        [&](const T& gy) { return std::vector<const T*>{&bn.backward(ctx, gy)}; }, {&x}, &s);
  }
}

TEST_CASE("batch_norm2d refuses a single value per channel in train mode") {
  param_store<B> s;
  batch_norm2d<B> bn(s, "bn", 2);
  s.finalize(0);
  context<B> ctx;
  T x(shape{1, 2, 1, 1});
  x.fill(1);
  CHECK_THROWS_AS(bn.forward(ctx, x), shape_error);
}

TEST_CASE("relu and sigmoid: values and gradient checks") {
  context<B> ctx;
  useg::rng g(2);
  T x = gc::random_tensor(shape{2, 3, 4, 5}, g);
  relu<B> r;
  sigmoid<B> sg;
  const T& yr = r.forward(ctx, x);
  const T& ys = sg.forward(ctx, x);
  for (std::size_t i = 0; i < x.size(); ++i) {
    REQUIRE(yr.data()[i] == std::max(0.0, x.data()[i]));
    REQUIRE(ys.data()[i] == doctest::Approx(1 / (1 + std::exp(-x.data()[i]))));
  }
  gc::check("relu", [&]() -> const T& { return r.forward(ctx, x); },
            [&](const T& gy) { return std::vector<const T*>{&r.backward(ctx, gy)}; }, {&x}, nullptr);
  gc::check("sigmoid", [&]() -> const T& { return sg.forward(ctx, x); },
            [&](const T& gy) { return std::vector<const T*>{&sg.backward(ctx, gy)}; }, {&x}, nullptr);
}

TEST_CASE("max_pool2x2: values, first-maximum ties, odd sizes floor, gradient check") {
  context<B> ctx;
  max_pool2x2<B> mp;
  T x = T::from_host(shape{1, 1, 2, 4}, {1, 5, 7, 7, 3, 2, 7, 1});
  const T& y = mp.forward(ctx, x);
  REQUIRE(y.dims() == shape({1, 1, 1, 2}));
  CHECK(y.data()[0] == 5);
  CHECK(y.data()[1] == 7);
  T gy = T::from_host(shape{1, 1, 1, 2}, {1, 2});
  const T& gx = mp.backward(ctx, gy);
  const std::vector<double> want{0, 1, 2, 0, 0, 0, 0, 0};  // tie 7,7,7 -> first one
  for (int i = 0; i < 8; ++i) CHECK(gx.data()[i] == want[static_cast<std::size_t>(i)]);
  T odd(shape{1, 2, 5, 3});
  odd.fill(1);
  CHECK(mp.forward(ctx, odd).dims() == shape({1, 2, 2, 1}));
  useg::rng g(4);
  T xr = gc::random_tensor(shape{2, 3, 6, 4}, g);
  gc::check("maxpool", [&]() -> const T& { return mp.forward(ctx, xr); },
            [&](const T& gy2) { return std::vector<const T*>{&mp.backward(ctx, gy2)}; }, {&xr}, nullptr);
}

TEST_CASE("upsample2x: nearest values and gradient check") {
  context<B> ctx;
  upsample2x<B> up;
  T x = T::from_host(shape{1, 1, 2, 2}, {1, 2, 3, 4});
  const T& y = up.forward(ctx, x);
  const std::vector<double> want{1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4};
  for (int i = 0; i < 16; ++i) CHECK(y.data()[i] == want[static_cast<std::size_t>(i)]);
  useg::rng g(4);
  T xr = gc::random_tensor(shape{2, 3, 3, 2}, g);
  gc::check("upsample", [&]() -> const T& { return up.forward(ctx, xr); },
            [&](const T& gy) { return std::vector<const T*>{&up.backward(ctx, gy)}; }, {&xr}, nullptr);
}

TEST_CASE("concat, add and gate_multiply: values and gradient checks") {
  context<B> ctx;
  useg::rng g(8);
  T a = gc::random_tensor(shape{2, 2, 3, 3}, g), b = gc::random_tensor(shape{2, 3, 3, 3}, g);
  concat<B> cat;
  const T& y = cat.forward(ctx, a, b);
  REQUIRE(y.dims() == shape({2, 5, 3, 3}));
  CHECK(y.data()[0] == a.data()[0]);
  CHECK(y.data()[18] == b.data()[0]);
  CHECK(y.data()[45] == a.data()[18]);
  gc::check("concat", [&]() -> const T& { return cat.forward(ctx, a, b); },
            [&](const T& gy) {
              auto [ga, gb] = cat.backward(ctx, gy);
              return std::vector<const T*>{&ga, &gb};
            },
            {&a, &b}, nullptr);
  // Built one input at a time (either order): the same values.
  const std::vector<double> whole = cat.forward(ctx, a, b).to_host();
  concat<B> parts;
  parts.begin(a.dims(), b.dims());
  parts.fill_b(ctx, b);
  parts.fill_a(ctx, a);
  CHECK(parts.output().to_host() == whole);
  CHECK_THROWS_WITH_AS(parts.fill_a(ctx, b), doctest::Contains("does not match"), shape_error);
  CHECK_THROWS_AS(parts.begin(a.dims(), shape{2, 3, 3, 4}), shape_error);

  T x = gc::random_tensor(shape{2, 3, 4, 2}, g), psi = gc::random_tensor(shape{2, 1, 4, 2}, g, 0, 1);
  gate_multiply<B> gm;
  const T& z = gm.forward(ctx, x, psi);
  CHECK(z.data()[8] == doctest::Approx(x.data()[8] * psi.data()[0]));
  gc::check("gate_multiply", [&]() -> const T& { return gm.forward(ctx, x, psi); },
            [&](const T& gy) {
              auto [gx, gp] = gm.backward(ctx, gy);
              return std::vector<const T*>{&gx, &gp};
            },
            {&x, &psi}, nullptr);
  add<B> ad;
  T c = gc::random_tensor(shape{2, 2, 3, 3}, g);
  CHECK(ad.forward(ctx, a, c).data()[5] == doctest::Approx(a.data()[5] + c.data()[5]));
  CHECK_THROWS_AS(ad.forward(ctx, a, b), shape_error);
  CHECK_THROWS_AS(gm.forward(ctx, x, a), shape_error);
}

TEST_CASE("layers reject inputs of the wrong rank or channel count with a message") {
  param_store<B> s;
  conv2d<B, 3, true> conv(s, "c", 3, 4);
  s.finalize(0);
  context<B> ctx;
  T bad_c(shape{1, 2, 4, 4});
  bad_c.fill(0);
  T bad_rank(shape{3, 4, 4});
  bad_rank.fill(0);
  CHECK_THROWS_WITH_AS(conv.forward(ctx, bad_c), doctest::Contains("expected 3 channels, got 2"), shape_error);
  CHECK_THROWS_WITH_AS(conv.forward(ctx, bad_rank), doctest::Contains("rank-4"), shape_error);
  CHECK_THROWS_AS(conv2d<B>(s, "d", 0, 3), config_error);
}

TEST_CASE("the gradient checker catches a gradient that is off by 0.1%, and a missing term") {
  param_store<B> s;
  conv2d<B, 3, true> conv(s, "c", 2, 3);
  s.finalize(1);
  context<B> ctx;
  useg::rng g(2);
  T x = gc::random_tensor(shape{2, 2, 4, 4}, g);
  T scaled;
  gc::options o;
  o.report = false;
  const int bad = gc::check(
      "scaled", [&]() -> const T& { return conv.forward(ctx, x); },
      [&](const T& gy) {
        const T& gx = conv.backward(ctx, gy);
        scaled = gx.clone();
        for (std::size_t i = 0; i < scaled.size(); ++i) scaled.data()[i] *= 1.001;
        return std::vector<const T*>{&scaled};
      },
      {&x}, &s, o);
  CHECK(bad > 0);
  // a backward that loses the parameter gradients
  const int bad2 = gc::check(
      "no param grads", [&]() -> const T& { return conv.forward(ctx, x); },
      [&](const T& gy) {
        const T& gx = conv.backward(ctx, gy);
        s.zero_grad();
        return std::vector<const T*>{&gx};
      },
      {&x}, &s, o);
  CHECK(bad2 > 0);
  // and the same checker passes the correct backward
  CHECK(gc::check("correct", [&]() -> const T& { return conv.forward(ctx, x); },
                  [&](const T& gy) { return std::vector<const T*>{&conv.backward(ctx, gy)}; }, {&x}, &s, o) == 0);
}
