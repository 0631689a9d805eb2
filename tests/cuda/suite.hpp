// tests/cuda/suite.hpp — backend-generic test bodies. Each TEST_CASE_TEMPLATE_DEFINE here is
// instantiated per backend with TEST_CASE_TEMPLATE_INVOKE: for useg::cpu in backend_cpu.cpp
// (always built and run, which also validates the bodies themselves) and for useg::cuda in
// backend_cuda.cu. The bodies touch tensor data only through from_host()/to_host() and
// upload/download, never through data() on the host, and compare against independent host
// computations (direct loops in double, closed forms, hand values).
#pragma once
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "useg/core/params.hpp"
#include "useg/core/rng.hpp"
#include "useg/core/tensor.hpp"
#include "useg/layers/activation.hpp"
#include "useg/layers/batch_norm2d.hpp"
#include "useg/layers/conv2d.hpp"
#include "useg/layers/conv_transpose2d.hpp"
#include "useg/layers/elementwise.hpp"
#include "useg/layers/resample.hpp"
#include "useg/loss/losses.hpp"
#include "useg/models/unet_skeleton.hpp"
#include "useg/optim/optimizers.hpp"

namespace suite {

using useg::param_ref;
using useg::shape;

template <class B>
using T = useg::tensor<B>;

inline std::vector<float> random_values(std::size_t n, useg::rng& g, double lo = -1, double hi = 1) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(g.uniform(lo, hi));
  return v;
}
template <class B>
T<B> random_tensor(const shape& s, useg::rng& g, double lo = -1, double hi = 1) {
  return T<B>::from_host(s, random_values(s.numel(), g, lo, hi));
}
/// Host copy of a parameter (or its gradient) of a store.
template <class B>
std::vector<float> entry_host(useg::param_store<B>& s, param_ref r, bool grad = false) {
  std::vector<float> h(s.entry(r).size());
  useg::ops<B>::download(h.data(), grad ? s.grad(r) : s.param(r), h.size());
  return h;
}
template <class B>
void set_entry(useg::param_store<B>& s, param_ref r, const std::vector<float>& v) {
  REQUIRE(v.size() == s.entry(r).size());
  useg::ops<B>::upload(s.param(r), v.data(), v.size());
}
inline bool close(double a, double b, double rtol = 1e-5, double atol = 1e-6) {
  return std::abs(a - b) <= atol + rtol * std::abs(b);
}
/// Require every element close; report the first mismatch.
inline void require_close(const std::vector<float>& got, const std::vector<double>& want, const char* what, double rtol = 1e-5,
                          double atol = 1e-6) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i)
    if (!close(got[i], want[i], rtol, atol)) {
      INFO(what << "[" << i << "]: got " << got[i] << ", want " << want[i]);
      REQUIRE(close(got[i], want[i], rtol, atol));
    }
}

/// Direct same-padded convolution in double: x (n, c, h, w), w (co, c, k, k).
inline std::vector<double> direct_conv(const std::vector<float>& x, int n, int c, int h, int wd, const std::vector<float>& w,
                                       const std::vector<float>* b, int co, int k) {
  const int p = k / 2;
  std::vector<double> y(static_cast<std::size_t>(n) * co * h * wd, 0.0);
  for (int i = 0; i < n; ++i)
    for (int o = 0; o < co; ++o)
      for (int yy = 0; yy < h; ++yy)
        for (int xx = 0; xx < wd; ++xx) {
          double s = b ? (*b)[static_cast<std::size_t>(o)] : 0.0;
          for (int ci = 0; ci < c; ++ci)
            for (int ky = 0; ky < k; ++ky)
              for (int kx = 0; kx < k; ++kx) {
                const int iy = yy + ky - p, ix = xx + kx - p;
                if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
                s += static_cast<double>(w[static_cast<std::size_t>(((o * c + ci) * k + ky) * k + kx)]) *
                     x[static_cast<std::size_t>(((i * c + ci) * h + iy) * wd + ix)];
              }
          y[(static_cast<std::size_t>(i) * co + o) * h * wd + static_cast<std::size_t>(yy) * wd + xx] = s;
        }
  return y;
}

/// Whether ops<B> offers the fused batch norm + ReLU ops.
template <class B>
concept has_fused_bn_relu = requires {
  &useg::ops<B>::batch_norm_relu_forward_train;
  &useg::ops<B>::batch_norm_relu_forward_eval;
  &useg::ops<B>::batch_norm_relu_backward;
};

template <class Model>
Model small_model(int width, int depth, int t, std::uint64_t seed, useg::up_kind up = useg::up_kind::upsample) {
  useg::unet_config cfg;
  cfg.width = width;
  cfg.depth = depth;
  cfg.t = t;
  cfg.seed = seed;
  cfg.up = up;
  return Model(cfg);
}

template <class B, int In, int Cls>
using unet_t = useg::unet_skeleton<B, In, Cls, useg::conv_encoder, useg::identity_skip>;
template <class B, int In, int Cls>
using attention_unet_t = useg::unet_skeleton<B, In, Cls, useg::conv_encoder, useg::attention_skip>;
template <class B, int In, int Cls>
using r2unet_t = useg::unet_skeleton<B, In, Cls, useg::rrcnn_encoder, useg::identity_skip>;
template <class B, int In, int Cls>
using ar2unet_t = useg::unet_skeleton<B, In, Cls, useg::rrcnn_encoder, useg::attention_skip>;

}  // namespace suite

// ------------------------------------------------------------------------------------------ tensors
TEST_CASE_TEMPLATE_DEFINE("tensor: host transfers, explicit deep copies, storage reuse, fill", B, suite_tensor) {
  using namespace suite;
  auto t = T<B>::from_host(shape{2, 3}, {1, 2, 3, 4, 5, 6});
  CHECK(t.to_host() == std::vector<float>{1, 2, 3, 4, 5, 6});
  auto c = t.clone();
  t.fill(7.f);
  CHECK(c.to_host() == std::vector<float>{1, 2, 3, 4, 5, 6});  // clone is deep
  CHECK(t.to_host() == std::vector<float>(6, 7.f));
  T<B> d;
  d.copy_from(c);
  CHECK(d.dims() == shape({2, 3}));
  CHECK(d.to_host() == c.to_host());
  t.fill(0.f);
  CHECK(t.to_host() == std::vector<float>(6, 0.f));
  const float* before = t.data();
  t.resize(shape{1, 3});
  CHECK(t.data() == before);  // shrinking reuses the storage
  auto m = std::move(c);
  CHECK(c.data() == nullptr);
  CHECK(m.to_host()[5] == 6.f);
  CHECK_THROWS_AS(T<B>::from_host(shape{2, 2}, {1, 2, 3}), useg::shape_error);
  // a large round trip is exact
  useg::rng g(1);
  const auto v = random_values(100003, g);
  auto big = T<B>::from_host(shape{100003}, v);
  CHECK(big.to_host() == v);
  std::vector<float> back(v.size());
  big.download(back.data());
  CHECK(back == v);
}

TEST_CASE_TEMPLATE_DEFINE("param_store: seeded initialization, bounds, zero_grad", B, suite_params) {
  using namespace suite;
  useg::param_store<B> s1, s2;
  useg::conv2d<B, 3, true> c1(s1, "c", 8, 16), c2(s2, "c", 8, 16);
  s1.finalize(42);
  s2.finalize(42);
  const auto w1 = entry_host(s1, param_ref{0}), w2 = entry_host(s2, param_ref{0});
  CHECK(w1 == w2);
  const double bound = 1.0 / std::sqrt(72.0);
  double mx = 0;
  for (float v : w1) {
    REQUIRE(std::abs(v) <= bound);
    mx = std::max(mx, static_cast<double>(std::abs(v)));
  }
  CHECK(mx > 0.9 * bound);
  CHECK(s1.flat_grads().to_host() == std::vector<float>(s1.num_parameters(), 0.f));
  s1.flat_grads().fill(1.f);
  s1.zero_grad();
  CHECK(s1.flat_grads().to_host() == std::vector<float>(s1.num_parameters(), 0.f));
}

// ------------------------------------------------------------------------------------------ layers
TEST_CASE_TEMPLATE_DEFINE("conv2d: forward, input and parameter gradients against direct sums", B, suite_conv2d) {
  using namespace suite;
  useg::context<B> ctx;
  useg::rng g(11);
  for (int k : {1, 3}) {
    const int n = 2, ci = 3, co = 4, h = 5, w = 6;
    useg::param_store<B> s;
    useg::conv2d<B, 3, true> c3(s, "c3", ci, co);
    useg::conv2d<B, 1, true> c1(s, "c1", ci, co);
    s.finalize(7);
    const param_ref wr{k == 3 ? 0u : 2u}, br{k == 3 ? 1u : 3u};
    const auto xv = random_values(static_cast<std::size_t>(n) * ci * h * w, g);
    auto x = T<B>::from_host(shape{n, ci, h, w}, xv);
    const auto wv = entry_host(s, wr), bv = entry_host(s, br);
    const T<B>& y = k == 3 ? c3.forward(ctx, x) : c1.forward(ctx, x);
    REQUIRE(y.dims() == shape({n, co, h, w}));
    require_close(y.to_host(), direct_conv(xv, n, ci, h, w, wv, &bv, co, k), "conv y", 1e-4, 1e-5);
    // backward: gradients ACCUMULATE into the store (pre-filled with 0.5)
    s.flat_grads().fill(0.5f);
    const auto gyv = random_values(static_cast<std::size_t>(n) * co * h * w, g);
    auto gy = T<B>::from_host(shape{n, co, h, w}, gyv);
    const T<B>& gx = k == 3 ? c3.backward(ctx, gy) : c1.backward(ctx, gy);
    std::vector<double> gx_want(xv.size(), 0.0), gw_want(wv.size(), 0.5), gb_want(static_cast<std::size_t>(co), 0.5);
    const int p = k / 2;
    for (int i = 0; i < n; ++i)
      for (int o = 0; o < co; ++o)
        for (int yy = 0; yy < h; ++yy)
          for (int xx = 0; xx < w; ++xx) {
            const double gval = gyv[static_cast<std::size_t>(((i * co + o) * h + yy) * w + xx)];
            gb_want[static_cast<std::size_t>(o)] += gval;
            for (int c = 0; c < ci; ++c)
              for (int ky = 0; ky < k; ++ky)
                for (int kx = 0; kx < k; ++kx) {
                  const int iy = yy + ky - p, ix = xx + kx - p;
                  if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                  const std::size_t xi = static_cast<std::size_t>(((i * ci + c) * h + iy) * w + ix);
                  const std::size_t wi = static_cast<std::size_t>(((o * ci + c) * k + ky) * k + kx);
                  gx_want[xi] += gval * wv[wi];
                  gw_want[wi] += gval * xv[xi];
                }
          }
    require_close(gx.to_host(), gx_want, "conv gx", 1e-4, 1e-5);
    require_close(entry_host(s, wr, true), gw_want, "conv gw", 1e-4, 1e-5);
    require_close(entry_host(s, br, true), gb_want, "conv gb", 1e-4, 1e-5);
  }
}

TEST_CASE_TEMPLATE_DEFINE("conv_transpose2x2: forward and gradients against the definition", B, suite_upconv) {
  using namespace suite;
  useg::context<B> ctx;
  useg::param_store<B> s;
  useg::conv_transpose2x2<B> up(s, "up", 3, 2);
  s.finalize(5);
  useg::rng g(9);
  const int n = 2, ci = 3, co = 2, h = 3, w = 4;
  const auto xv = random_values(static_cast<std::size_t>(n) * ci * h * w, g);
  auto x = T<B>::from_host(shape{n, ci, h, w}, xv);
  const auto wv = entry_host(s, param_ref{0}), bv = entry_host(s, param_ref{1});
  const T<B>& y = up.forward(ctx, x);
  REQUIRE(y.dims() == shape({n, co, 2 * h, 2 * w}));
  std::vector<double> want(y.size());
  for (int b = 0; b < n; ++b)
    for (int o = 0; o < co; ++o)
      for (int i = 0; i < 2 * h; ++i)
        for (int j = 0; j < 2 * w; ++j) {
          double r = bv[static_cast<std::size_t>(o)];
          for (int c = 0; c < ci; ++c)
            r += static_cast<double>(xv[static_cast<std::size_t>(((b * ci + c) * h + i / 2) * w + j / 2)]) *
                 wv[static_cast<std::size_t>(((c * co + o) * 2 + i % 2) * 2 + j % 2)];
          want[static_cast<std::size_t>(((b * co + o) * 2 * h + i) * 2 * w + j)] = r;
        }
  require_close(y.to_host(), want, "upconv y", 1e-5, 1e-6);
  const auto gyv = random_values(y.size(), g);
  auto gy = T<B>::from_host(y.dims(), gyv);
  const T<B>& gx = up.backward(ctx, gy);
  std::vector<double> gx_want(xv.size(), 0), gw_want(wv.size(), 0), gb_want(static_cast<std::size_t>(co), 0);
  for (int b = 0; b < n; ++b)
    for (int o = 0; o < co; ++o)
      for (int i = 0; i < 2 * h; ++i)
        for (int j = 0; j < 2 * w; ++j) {
          const double gv = gyv[static_cast<std::size_t>(((b * co + o) * 2 * h + i) * 2 * w + j)];
          gb_want[static_cast<std::size_t>(o)] += gv;
          for (int c = 0; c < ci; ++c) {
            const std::size_t xi = static_cast<std::size_t>(((b * ci + c) * h + i / 2) * w + j / 2);
            const std::size_t wi = static_cast<std::size_t>(((c * co + o) * 2 + i % 2) * 2 + j % 2);
            gx_want[xi] += gv * wv[wi];
            gw_want[wi] += gv * xv[xi];
          }
        }
  require_close(gx.to_host(), gx_want, "upconv gx", 1e-5, 1e-6);
  require_close(entry_host(s, param_ref{0}, true), gw_want, "upconv gw", 1e-5, 1e-6);
  require_close(entry_host(s, param_ref{1}, true), gb_want, "upconv gb", 1e-5, 1e-6);
}

TEST_CASE_TEMPLATE_DEFINE("batch_norm2d: batch statistics, running statistics, eval mode, backward closed form", B,
                          suite_batch_norm) {
  using namespace suite;
  useg::context<B> ctx;
  useg::param_store<B> s;
  useg::batch_norm2d<B> bn(s, "bn", 2);
  s.finalize(0);
  // channel 0 holds 1..8, channel 1 holds 2·(1..8)
  std::vector<float> xv(16);
  for (int n = 0; n < 2; ++n)
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 4; ++i) xv[static_cast<std::size_t>((n * 2 + c) * 4 + i)] = static_cast<float>((c + 1) * (n * 4 + i + 1));
  auto x = T<B>::from_host(shape{2, 2, 2, 2}, xv);
  const auto y = bn.forward(ctx, x).to_host();
  const double mean0 = 4.5, var0 = 5.25;
  CHECK(y[0] == doctest::Approx((1 - mean0) / std::sqrt(var0 + 1e-5)).epsilon(1e-5));
  const auto buffers = s.flat_buffers().to_host();  // running_mean (2), running_var (2)
  CHECK(buffers[0] == doctest::Approx(0.1 * mean0).epsilon(1e-6));
  CHECK(buffers[1] == doctest::Approx(0.1 * 2 * mean0).epsilon(1e-6));
  CHECK(buffers[2] == doctest::Approx(0.9 + 0.1 * var0 * 8 / 7).epsilon(1e-6));
  CHECK(s.counter(param_ref{4}) == 1);
  // backward in train mode against the closed form, with non-trivial gamma
  set_entry(s, param_ref{0}, {1.5f, -0.5f});
  set_entry(s, param_ref{1}, {0.25f, 2.f});
  useg::rng g(3);
  const auto xr = random_values(2 * 3 * 4 * 5, g, -2, 3);
  auto x2 = T<B>::from_host(shape{2, 3, 4, 5}, xr);
  useg::param_store<B> s3;
  useg::batch_norm2d<B> bn3(s3, "bn", 3);
  s3.finalize(0);
  set_entry(s3, param_ref{0}, {1.5f, -0.5f, 0.75f});
  const auto y3 = bn3.forward(ctx, x2).to_host();
  const auto gyv = random_values(xr.size(), g);
  auto gy = T<B>::from_host(x2.dims(), gyv);
  s3.flat_grads().fill(0.25f);
  const auto gx = bn3.backward(ctx, gy).to_host();
  const auto ggamma = entry_host(s3, param_ref{0}, true), gbeta = entry_host(s3, param_ref{1}, true);
  const double gam[3] = {1.5, -0.5, 0.75};
  for (int c = 0; c < 3; ++c) {
    double m = 0, v = 0;
    const int cnt = 2 * 20;
    for (int n = 0; n < 2; ++n)
      for (int i = 0; i < 20; ++i) m += xr[static_cast<std::size_t>((n * 3 + c) * 20 + i)];
    m /= cnt;
    for (int n = 0; n < 2; ++n)
      for (int i = 0; i < 20; ++i) v += std::pow(xr[static_cast<std::size_t>((n * 3 + c) * 20 + i)] - m, 2);
    v /= cnt;
    const double is = 1 / std::sqrt(v + 1e-5);
    double sg = 0, sgx = 0;
    for (int n = 0; n < 2; ++n)
      for (int i = 0; i < 20; ++i) {
        const std::size_t o = static_cast<std::size_t>((n * 3 + c) * 20 + i);
        CHECK(y3[o] == doctest::Approx(gam[c] * (xr[o] - m) * is).epsilon(1e-4));
        sg += gyv[o];
        sgx += gyv[o] * (xr[o] - m) * is;
      }
    CHECK(ggamma[static_cast<std::size_t>(c)] == doctest::Approx(0.25 + sgx).epsilon(1e-4));
    CHECK(gbeta[static_cast<std::size_t>(c)] == doctest::Approx(0.25 + sg).epsilon(1e-4));
    for (int n = 0; n < 2; ++n)
      for (int i = 0; i < 20; ++i) {
        const std::size_t o = static_cast<std::size_t>((n * 3 + c) * 20 + i);
        const double want = gam[c] * is * (gyv[o] - sg / cnt - (xr[o] - m) * is * sgx / cnt);
        REQUIRE(close(gx[o], want, 1e-4, 1e-5));
      }
  }
  // eval mode uses the running statistics
  s.set_training(false);
  const auto ye = bn.forward(ctx, x).to_host();
  CHECK(ye[0] == doctest::Approx(1.5 * (1 - 0.45) / std::sqrt(0.9 + 0.6 + 1e-5) + 0.25).epsilon(1e-5));
  CHECK(s.counter(param_ref{4}) == 1);
  // and its backward is a per-channel scaling: gx = gy · γ / sqrt(running_var + eps)
  auto gy1 = T<B>::from_host(shape{2, 2, 2, 2}, std::vector<float>(16, 1.f));
  const auto gxe = bn.backward(ctx, gy1).to_host();
  CHECK(gxe[0] == doctest::Approx(1.5 / std::sqrt(0.9 + 0.6 + 1e-5)).epsilon(1e-5));
  CHECK(gxe[4] == doctest::Approx(-0.5 / std::sqrt(0.9 + 0.1 * 21.0 * 8 / 7 + 1e-5)).epsilon(1e-5));
}

TEST_CASE_TEMPLATE_DEFINE("fused batch norm + ReLU ops equal batch norm then ReLU; folded eval convolution", B, suite_bn_relu) {
  using namespace suite;
  using ops = useg::ops<B>;
  static_assert(has_fused_bn_relu<B>, "both backends provide the fused batch norm + ReLU ops");
  useg::context<B> ctx;
  useg::rng g(12);
  const int n = 2, c = 3, h = 5, w = 4;
  const useg::bn_desc d{n, c, static_cast<std::size_t>(h * w), 1e-5, 0.1};
  auto x = random_tensor<B>(shape{n, c, h, w}, g, -2, 2), gz = random_tensor<B>(x.dims(), g);
  auto gamma = random_tensor<B>(shape{c}, g, 0.5, 1.5), beta = random_tensor<B>(shape{c}, g, -0.5, 0.5);
  const auto rm0 = random_values(3, g, -0.5, 0.5), rv0 = random_values(3, g, 0.5, 2);
  auto rm1 = T<B>::from_host(shape{c}, rm0), rv1 = T<B>::from_host(shape{c}, rv0);
  auto rm2 = T<B>::from_host(shape{c}, rm0), rv2 = T<B>::from_host(shape{c}, rv0);
  T<B> m1(shape{c}), s1(shape{c}), m2(shape{c}), s2(shape{c}), y(x.dims()), z(x.dims()), zr(x.dims());
  // train: batch norm then ReLU, against the fused op
  ops::batch_norm_forward_train(ctx, d, x.data(), gamma.data(), beta.data(), rm1.data(), rv1.data(), m1.data(), s1.data(), y.data());
  ops::relu_forward(ctx, y.data(), zr.data(), y.size());
  if constexpr (requires { &ops::batch_norm_apply; }) {
    // re-applying the plain batch norm with the saved statistics reproduces y bit for bit
    T<B> y2(x.dims());
    ops::batch_norm_apply(ctx, d, x.data(), gamma.data(), beta.data(), m1.data(), s1.data(), y2.data());
    CHECK(y2.to_host() == y.to_host());
  }
  ops::batch_norm_relu_forward_train(ctx, d, x.data(), gamma.data(), beta.data(), rm2.data(), rv2.data(), m2.data(), s2.data(),
                                     z.data());
  const auto zv = z.to_host(), zrv = zr.to_host();
  require_close(zv, std::vector<double>(zrv.begin(), zrv.end()), "fused z", 1e-6, 1e-7);
  CHECK(m1.to_host() == m2.to_host());
  CHECK(s1.to_host() == s2.to_host());
  CHECK(rm1.to_host() == rm2.to_host());
  CHECK(rv1.to_host() == rv2.to_host());
  // backward: ReLU backward then batch norm backward (in place, gx aliasing gy), against the fused op
  T<B> gy(x.dims()), gx(x.dims());
  auto gg1 = T<B>::from_host(shape{c}, {0.5f, 0.5f, 0.5f}), gb1 = T<B>::from_host(shape{c}, {0.5f, 0.5f, 0.5f});
  auto gg2 = T<B>::from_host(shape{c}, {0.5f, 0.5f, 0.5f}), gb2 = T<B>::from_host(shape{c}, {0.5f, 0.5f, 0.5f});
  ops::relu_backward(ctx, zr.data(), gz.data(), gy.data(), gy.size());
  ops::batch_norm_backward(ctx, d, true, x.data(), gy.data(), gamma.data(), m1.data(), s1.data(), gy.data(), gg1.data(), gb1.data());
  ops::batch_norm_relu_backward(ctx, d, true, x.data(), z.data(), gz.data(), gamma.data(), m2.data(), s2.data(), gx.data(),
                                gg2.data(), gb2.data());
  const auto gyv = gy.to_host(), g1 = gg1.to_host(), b1 = gb1.to_host();
  require_close(gx.to_host(), std::vector<double>(gyv.begin(), gyv.end()), "fused gx", 1e-5, 1e-6);
  require_close(gg2.to_host(), std::vector<double>(g1.begin(), g1.end()), "fused ggamma", 1e-5, 1e-6);
  require_close(gb2.to_host(), std::vector<double>(b1.begin(), b1.end()), "fused gbeta", 1e-5, 1e-6);
  CHECK(gg1.to_host() != std::vector<float>(3, 0.5f));  // gradients were added
  if constexpr (requires { &ops::batch_norm_relu_apply; }) {
    // re-applying with the saved statistics reproduces z bit for bit, and adds a residual
    T<B> z2(x.dims()), z3(x.dims());
    auto r = random_tensor<B>(x.dims(), g);
    ops::batch_norm_relu_apply(ctx, d, x.data(), gamma.data(), beta.data(), m2.data(), s2.data(), nullptr, z2.data());
    CHECK(z2.to_host() == zv);
    ops::batch_norm_relu_apply(ctx, d, x.data(), gamma.data(), beta.data(), m2.data(), s2.data(), r.data(), z3.data());
    const auto z3v = z3.to_host(), rv = r.to_host();
    for (std::size_t i = 0; i < zv.size(); ++i) REQUIRE(z3v[i] == zv[i] + rv[i]);
  }
  // eval mode
  ops::batch_norm_forward_eval(ctx, d, x.data(), gamma.data(), beta.data(), rm1.data(), rv1.data(), y.data());
  ops::relu_forward(ctx, y.data(), zr.data(), y.size());
  ops::batch_norm_relu_forward_eval(ctx, d, x.data(), gamma.data(), beta.data(), rm1.data(), rv1.data(), z.data());
  const auto ze = zr.to_host();
  require_close(z.to_host(), std::vector<double>(ze.begin(), ze.end()), "fused eval z", 1e-6, 1e-7);
  if constexpr (requires { &ops::fold_batch_norm; &ops::conv2d_forward_relu; }) {
    // relu(bn_eval(conv(x))) == relu(conv_folded(x))
    const useg::conv_desc cd{n, c, 4, h, w, 3};
    auto wt = random_tensor<B>(shape{4, c, 3, 3}, g), b = random_tensor<B>(shape{4}, g);
    auto g4 = random_tensor<B>(shape{4}, g, 0.5, 1.5), be4 = random_tensor<B>(shape{4}, g, -0.5, 0.5);
    auto m4 = random_tensor<B>(shape{4}, g, -0.5, 0.5), v4 = random_tensor<B>(shape{4}, g, 0.5, 2);
    T<B> yc(shape{n, 4, h, w}), yb(yc.dims()), yf(yc.dims()), wf(wt.dims()), bf(shape{4});
    ops::conv2d_forward(ctx, cd, x.data(), wt.data(), b.data(), yc.data());
    ops::batch_norm_forward_eval(ctx, useg::bn_desc{n, 4, d.hw, 1e-5, 0.1}, yc.data(), g4.data(), be4.data(), m4.data(), v4.data(),
                                 yb.data());
    ops::relu_forward(ctx, yb.data(), yb.data(), yb.size());
    ops::fold_batch_norm(ctx, 4, static_cast<std::size_t>(c) * 9, wt.data(), b.data(), g4.data(), be4.data(), m4.data(), v4.data(),
                         1e-5, wf.data(), bf.data());
    ops::conv2d_forward_relu(ctx, cd, x.data(), wf.data(), bf.data(), yf.data());
    const auto ybv = yb.to_host();
    require_close(yf.to_host(), std::vector<double>(ybv.begin(), ybv.end()), "folded conv", 1e-4, 1e-5);
  }
}

TEST_CASE_TEMPLATE_DEFINE("relu and sigmoid: values and backward", B, suite_activations) {
  using namespace suite;
  useg::context<B> ctx;
  useg::rng g(2);
  const auto xv = random_values(2 * 3 * 4 * 5, g, -4, 4);
  auto x = T<B>::from_host(shape{2, 3, 4, 5}, xv);
  useg::relu<B> r;
  useg::sigmoid<B> sg;
  const auto yr = r.forward(ctx, x).to_host();
  const auto ys = sg.forward(ctx, x).to_host();
  const auto gyv = random_values(xv.size(), g);
  auto gy = T<B>::from_host(x.dims(), gyv);
  const auto gr = r.backward(ctx, gy).to_host();
  const auto gs = sg.backward(ctx, gy).to_host();
  for (std::size_t i = 0; i < xv.size(); ++i) {
    REQUIRE(yr[i] == std::max(0.f, xv[i]));
    REQUIRE(gr[i] == (xv[i] > 0 ? gyv[i] : 0.f));
    const double sv = 1 / (1 + std::exp(-static_cast<double>(xv[i])));
    REQUIRE(close(ys[i], sv, 1e-6, 1e-7));
    REQUIRE(close(gs[i], gyv[i] * sv * (1 - sv), 1e-5, 1e-7));
  }
}

TEST_CASE_TEMPLATE_DEFINE("max_pool2x2: values, first-maximum ties, odd sizes, backward routing", B, suite_maxpool) {
  using namespace suite;
  useg::context<B> ctx;
  useg::max_pool2x2<B> mp;
  auto x = T<B>::from_host(shape{1, 1, 2, 4}, {1, 5, 7, 7, 3, 2, 7, 1});
  const T<B>& y = mp.forward(ctx, x);
  REQUIRE(y.dims() == shape({1, 1, 1, 2}));
  CHECK(y.to_host() == std::vector<float>{5, 7});
  auto gy = T<B>::from_host(shape{1, 1, 1, 2}, {1, 2});
  CHECK(mp.backward(ctx, gy).to_host() == std::vector<float>{0, 1, 2, 0, 0, 0, 0, 0});
  // odd sizes: floor; the last row/column gets zero gradient
  useg::rng g(4);
  const auto ov = random_values(2 * 5 * 3, g);
  auto odd = T<B>::from_host(shape{1, 2, 5, 3}, ov);
  const auto yo = mp.forward(ctx, odd).to_host();
  REQUIRE(mp.output().dims() == shape({1, 2, 2, 1}));
  for (int c = 0; c < 2; ++c)
    for (int i = 0; i < 2; ++i) {
      const float* p = ov.data() + c * 15 + 2 * i * 3;
      CHECK(yo[static_cast<std::size_t>(c * 2 + i)] == std::max(std::max(p[0], p[1]), std::max(p[3], p[4])));
    }
  auto gyo = T<B>::from_host(shape{1, 2, 2, 1}, {1, 2, 3, 4});
  const auto gxo = mp.backward(ctx, gyo).to_host();
  double total = 0;
  for (float v : gxo) total += v;
  CHECK(total == 10);
  for (int c = 0; c < 2; ++c) {
    for (int j = 0; j < 3; ++j) CHECK(gxo[static_cast<std::size_t>(c * 15 + 4 * 3 + j)] == 0);  // row 4 unused
    for (int i = 0; i < 5; ++i) CHECK(gxo[static_cast<std::size_t>(c * 15 + i * 3 + 2)] == 0);  // column 2 unused
  }
}

TEST_CASE_TEMPLATE_DEFINE("upsample2x: nearest values, backward sums each 2x2 block", B, suite_upsample) {
  using namespace suite;
  useg::context<B> ctx;
  useg::upsample2x<B> up;
  auto x = T<B>::from_host(shape{1, 1, 2, 2}, {1, 2, 3, 4});
  CHECK(up.forward(ctx, x).to_host() == std::vector<float>{1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4});
  std::vector<float> gv(16);
  for (int i = 0; i < 16; ++i) gv[static_cast<std::size_t>(i)] = static_cast<float>(i);
  auto gy = T<B>::from_host(shape{1, 1, 4, 4}, gv);
  CHECK(up.backward(ctx, gy).to_host() == std::vector<float>{0 + 1 + 4 + 5, 2 + 3 + 6 + 7, 8 + 9 + 12 + 13, 10 + 11 + 14 + 15});
}

TEST_CASE_TEMPLATE_DEFINE("concat, add and gate_multiply: values and backward", B, suite_elementwise) {
  using namespace suite;
  useg::context<B> ctx;
  useg::rng g(8);
  const auto av = random_values(2 * 2 * 3, g), bv = random_values(2 * 3 * 3, g);
  auto a = T<B>::from_host(shape{2, 2, 1, 3}, av), b = T<B>::from_host(shape{2, 3, 1, 3}, bv);
  useg::concat<B> cat;
  const auto y = cat.forward(ctx, a, b).to_host();
  REQUIRE(y.size() == 30);
  for (int n = 0; n < 2; ++n)
    for (int k = 0; k < 15; ++k) {
      const float want = k < 6 ? av[static_cast<std::size_t>(n * 6 + k)] : bv[static_cast<std::size_t>(n * 9 + k - 6)];
      REQUIRE(y[static_cast<std::size_t>(n * 15 + k)] == want);
    }
  auto gy = T<B>::from_host(shape{2, 5, 1, 3}, y);
  auto [ga, gb] = cat.backward(ctx, gy);
  CHECK(ga.to_host() == av);
  CHECK(gb.to_host() == bv);

  useg::add<B> ad;
  auto c = random_tensor<B>(a.dims(), g);
  const auto sum = ad.forward(ctx, a, c).to_host();
  const auto cv = c.to_host();
  for (std::size_t i = 0; i < sum.size(); ++i) REQUIRE(sum[i] == av[i] + cv[i]);
  CHECK_THROWS_AS(ad.forward(ctx, a, b), useg::shape_error);

  const auto xv = random_values(2 * 3 * 4 * 2, g), pv = random_values(2 * 4 * 2, g, 0, 1);
  auto x = T<B>::from_host(shape{2, 3, 4, 2}, xv), psi = T<B>::from_host(shape{2, 1, 4, 2}, pv);
  useg::gate_multiply<B> gm;
  const auto z = gm.forward(ctx, x, psi).to_host();
  const auto gzv = random_values(z.size(), g);
  auto gz = T<B>::from_host(x.dims(), gzv);
  auto [gx, gpsi] = gm.backward(ctx, gz);
  const auto gxv = gx.to_host(), gpv = gpsi.to_host();
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 8; ++j) {
      double acc = 0;
      for (int ch = 0; ch < 3; ++ch) {
        const std::size_t o = static_cast<std::size_t>((n * 3 + ch) * 8 + j), q = static_cast<std::size_t>(n * 8 + j);
        REQUIRE(z[o] == xv[o] * pv[q]);
        REQUIRE(gxv[o] == gzv[o] * pv[q]);
        acc += static_cast<double>(gzv[o]) * xv[o];
      }
      REQUIRE(close(gpv[static_cast<std::size_t>(n * 8 + j)], acc, 1e-5, 1e-6));
    }
  CHECK_THROWS_AS(gm.forward(ctx, x, a), useg::shape_error);
}

TEST_CASE_TEMPLATE_DEFINE("ops: pad/crop, accumulate, scale, sum, dot", B, suite_ops) {
  using namespace suite;
  using ops = useg::ops<B>;
  useg::context<B> ctx;
  auto x = T<B>::from_host(shape{1, 1, 2, 2}, {1, 2, 3, 4});
  T<B> y(shape{1, 1, 3, 4});
  ops::pad2d(ctx, 1, 2, 2, 3, 4, 1, 1, x.data(), y.data());
  CHECK(y.to_host() == std::vector<float>{0, 0, 0, 0, 0, 1, 2, 0, 0, 3, 4, 0});
  T<B> back(shape{1, 1, 2, 2});
  ops::crop2d(ctx, 1, 3, 4, 2, 2, 1, 1, y.data(), back.data());
  CHECK(back.to_host() == std::vector<float>{1, 2, 3, 4});
  auto a = T<B>::from_host(shape{4}, {1, 2, 3, 4});
  auto b = T<B>::from_host(shape{4}, {0.5, -1, 2, 0});
  ops::accumulate(ctx, a.data(), b.data(), 4);
  CHECK(a.to_host() == std::vector<float>{1.5, 1, 5, 4});
  ops::scale(ctx, a.data(), 2.f, 4);
  CHECK(a.to_host() == std::vector<float>{3, 2, 10, 8});
  CHECK(ops::sum(ctx, a.data(), 4) == 23.0);
  CHECK(ops::dot(ctx, a.data(), b.data(), 4) == 1.5 - 2 + 20);
  // a sum over many values, in double
  useg::rng g(5);
  const auto v = random_values(1 << 20, g);
  auto big = T<B>::from_host(shape{1 << 20}, v);
  double want = 0, want2 = 0;
  for (float f : v) {
    want += f;
    want2 += static_cast<double>(f) * f;
  }
  CHECK(ops::sum(ctx, big.data(), v.size()) == doctest::Approx(want).epsilon(1e-12));
  CHECK(ops::dot(ctx, big.data(), big.data(), v.size()) == doctest::Approx(want2).epsilon(1e-12));
}

// ------------------------------------------------------------------------------------------ losses
TEST_CASE_TEMPLATE_DEFINE("losses: hand values and closed-form gradients", B, suite_losses) {
  using namespace suite;
  useg::context<B> ctx;
  auto x = T<B>::from_host(shape{1, 1, 1, 4}, {0.f, 2.f, -3.f, 100.f});
  auto y = T<B>::from_host(shape{1, 1, 1, 4}, {1.f, 0.f, 1.f, 1.f});
  const double l0 = std::log(2.0), l1 = std::log1p(std::exp(2.0)), l2 = std::log1p(std::exp(3.0)), l3 = std::log1p(std::exp(-100.0));
  T<B> grad;
  CHECK(useg::bce_with_logits_loss(ctx, x, y, &grad) == doctest::Approx((l0 + l1 + l2 + l3) / 4).epsilon(1e-7));
  const auto gv = grad.to_host();
  const float xs[4] = {0, 2, -3, 100}, ts[4] = {1, 0, 1, 1};
  for (int i = 0; i < 4; ++i)
    CHECK(gv[static_cast<std::size_t>(i)] == doctest::Approx((1 / (1 + std::exp(-double(xs[i]))) - ts[i]) / 4).epsilon(1e-6));
  CHECK(useg::bce_with_logits_loss(ctx, x, y, nullptr, 3.0) == doctest::Approx((3 * l0 + l1 + 3 * l2 + 3 * l3) / 4).epsilon(1e-7));
  // Dice: logits ±40 make sigmoid 0/1
  auto xd = T<B>::from_host(shape{1, 1, 2, 2}, {40, 40, -40, -40});
  auto yd = T<B>::from_host(shape{1, 1, 2, 2}, {1, 0, 1, 0});
  CHECK(useg::dice_loss(ctx, xd, yd) == doctest::Approx(0.4).epsilon(1e-7));
  CHECK(useg::bce_dice_loss(ctx, xd, yd, nullptr, 0.0, 1.0) == doctest::Approx(0.4).epsilon(1e-7));
  auto xm = T<B>::from_host(shape{1, 2, 1, 2}, {40, -40, -40, 40});
  auto tm = T<B>::from_host(shape{1, 1, 1, 2}, {0, 0});
  CHECK(useg::dice_loss(ctx, xm, tm) == doctest::Approx(1 - (0.75 + 0.5) / 2).epsilon(1e-7));
  auto bad = T<B>::from_host(shape{1, 1, 1, 2}, {0, 2});
  CHECK_THROWS_WITH_AS(useg::dice_loss(ctx, xm, bad), doctest::Contains("class indices"), useg::shape_error);
  auto frac = T<B>::from_host(shape{1, 1, 1, 2}, {0, 0.5});
  CHECK_THROWS_AS(useg::cross_entropy_loss(ctx, xm, frac), useg::shape_error);
  // cross-entropy value and gradient softmax - onehot (mean over pixels)
  auto xc = T<B>::from_host(shape{1, 3, 1, 1}, {1.f, 2.f, 3.f});
  auto tc = T<B>::from_host(shape{1, 1, 1, 1}, {2.f});
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  CHECK(useg::cross_entropy_loss(ctx, xc, tc, &grad) == doctest::Approx(-std::log(std::exp(3.0) / z)).epsilon(1e-7));
  const auto gc = grad.to_host();
  CHECK(gc[0] == doctest::Approx(std::exp(1.0) / z).epsilon(1e-6));
  CHECK(gc[2] == doctest::Approx(std::exp(3.0) / z - 1).epsilon(1e-6));
  // binary Dice gradient by central differences of the (double) closed form
  useg::rng g(3);
  const auto xv = random_values(20, g, -3, 3);
  std::vector<float> tv(20);
  for (auto& t : tv) t = g.uniform() < 0.4 ? 1.f : 0.f;
  auto xb = T<B>::from_host(shape{1, 1, 4, 5}, xv), tb = T<B>::from_host(shape{1, 1, 4, 5}, tv);
  const double loss = useg::dice_loss(ctx, xb, tb, &grad);
  auto dice = [&](const std::vector<double>& xs2) {
    double I = 0, Sp = 0, St = 0;
    for (std::size_t i = 0; i < xs2.size(); ++i) {
      const double p = 1 / (1 + std::exp(-xs2[i]));
      I += p * tv[i];
      Sp += p;
      St += tv[i];
    }
    return 1 - (2 * I + 1) / (Sp + St + 1);
  };
  std::vector<double> xd2(xv.begin(), xv.end());
  CHECK(loss == doctest::Approx(dice(xd2)).epsilon(1e-7));
  const auto gd = grad.to_host();
  for (std::size_t i = 0; i < 20; ++i) {
    auto xp = xd2, xn = xd2;
    xp[i] += 1e-5;
    xn[i] -= 1e-5;
    CHECK(gd[i] == doctest::Approx((dice(xp) - dice(xn)) / 2e-5).epsilon(1e-4).scale(1e-6));
  }
}

// ------------------------------------------------------------------------------------------ optimizers
TEST_CASE_TEMPLATE_DEFINE("SGD and Adam/AdamW steps follow the PyTorch update rules", B, suite_optim) {
  using namespace suite;
  for (int which = 0; which < 3; ++which) {
    useg::param_store<B> s;
    const auto p = s.add_parameter("p", shape{5}, useg::init_kind::constant, 0);
    s.finalize(0);
    const std::vector<float> p0{0.5f, -1.f, 2.f, 0.f, -0.25f};
    set_entry(s, p, p0);
    useg::context<B> ctx;
    std::unique_ptr<useg::optimizer<B>> opt;
    if (which == 0) opt = std::make_unique<useg::sgd<B>>(s, ctx, useg::sgd_options{0.1, 0.9, 0.1, 0.01, false});
    if (which == 1) opt = std::make_unique<useg::adam<B>>(s, ctx, useg::adam_options{0.01, 0.9, 0.999, 1e-8, 0.1, false});
    if (which == 2) opt = std::make_unique<useg::adamw<B>>(s, ctx);
    std::vector<double> pv(p0.begin(), p0.end()), m(5, 0), v(5, 0);
    for (int step = 1; step <= 4; ++step) {
      std::vector<float> gv(5);
      for (int i = 0; i < 5; ++i) gv[static_cast<std::size_t>(i)] = static_cast<float>(std::sin(1.0 + i + 0.7 * step) * (i + 1));
      useg::ops<B>::upload(s.grad(p), gv.data(), 5);
      opt->step();
      for (std::size_t i = 0; i < 5; ++i) {
        double gi = gv[i];
        if (which == 0) {
          gi += 0.01 * pv[i];
          m[i] = step == 1 ? gi : 0.9 * m[i] + 0.9 * gi;
          pv[i] -= 0.1 * m[i];
        } else {
          const double lr = which == 1 ? 0.01 : 1e-3, wd = which == 1 ? 0.1 : 1e-2;
          if (which == 2) pv[i] *= 1 - lr * wd;
          else gi += wd * pv[i];
          m[i] = 0.9 * m[i] + 0.1 * gi;
          v[i] = 0.999 * v[i] + 0.001 * gi * gi;
          pv[i] -= lr * (m[i] / (1 - std::pow(0.9, step))) / (std::sqrt(v[i] / (1 - std::pow(0.999, step))) + 1e-8);
        }
      }
      const auto got = entry_host(s, p);
      for (std::size_t i = 0; i < 5; ++i) CHECK(got[i] == doctest::Approx(pv[i]).epsilon(1e-6));
    }
  }
}

// ------------------------------------------------------------------------------------------ models
TEST_CASE_TEMPLATE_DEFINE("models: output and gradient shapes for any input size, clear errors", Model, suite_model_shapes) {
  using namespace suite;
  using B = typename Model::backend;
  Model m = small_model<Model>(4, 3, 2, 1);
  useg::rng g(1);
  for (auto [h, w] : std::vector<std::pair<int, int>>{{16, 16}, {18, 14}, {33, 47}, {5, 3}}) {
    auto x = random_tensor<B>(shape{2, Model::in_channels, h, w}, g, 0, 1);
    const auto& y = m.forward(x);
    CHECK(y.dims() == shape({2, Model::classes, h, w}));
    for (float v : y.to_host()) REQUIRE(std::isfinite(v));
    m.zero_grad();
    T<B> gy(y.dims());
    gy.fill(1);
    CHECK(m.backward(gy, true).dims() == x.dims());
    CHECK(m.backward(gy, false).empty());
    for (float v : m.params().flat_grads().to_host()) REQUIRE(std::isfinite(v));
  }
  T<B> wrong(shape{1, Model::in_channels + 1, 8, 8});
  wrong.fill(0);
  CHECK_THROWS_WITH_AS(m.forward(wrong), doctest::Contains("channels"), useg::shape_error);
  m.eval();
  T<B> one(shape{1, Model::in_channels, 8, 8});
  one.fill(0.5f);
  CHECK(m.forward(one).dims() == shape({1, Model::classes, 8, 8}));
  T<B> g2(shape{1, Model::classes, 4, 4});
  g2.fill(0);
  CHECK_THROWS_WITH_AS(m.backward(g2), doctest::Contains("does not match"), useg::shape_error);
}

TEST_CASE_TEMPLATE_DEFINE("models: a small model overfits a fixed batch (loss falls tenfold)", Model, suite_model_overfit) {
  using namespace suite;
  using B = typename Model::backend;
  Model m = small_model<Model>(4, 2, 1, 3);
  useg::rng g(7);
  std::vector<float> xv(2 * Model::in_channels * 256), yv(2 * 256);
  for (int n = 0; n < 2; ++n)
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        const bool inside = (i - 8 + 3 * n) * (i - 8 + 3 * n) + (j - 7) * (j - 7) < 20;
        yv[static_cast<std::size_t>((n * 16 + i) * 16 + j)] = inside ? 1.f : 0.f;
        for (int c = 0; c < Model::in_channels; ++c)
          xv[static_cast<std::size_t>(((n * Model::in_channels + c) * 16 + i) * 16 + j)] =
              static_cast<float>((inside ? 0.6 : 0.2) + 0.1 * g.uniform());
      }
  auto x = T<B>::from_host(shape{2, Model::in_channels, 16, 16}, xv);
  auto y = T<B>::from_host(shape{2, 1, 16, 16}, yv);
  T<B> grad;
  useg::adam<B> opt(m.params(), m.ctx(), useg::adam_options{1e-2});
  double first = 0, last = 0;
  for (int it = 0; it < 150; ++it) {
    m.zero_grad();
    const double l = useg::bce_with_logits_loss(m.ctx(), m.forward(x), y, &grad);
    m.backward(grad);
    opt.step();
    if (it == 0) first = l;
    last = l;
  }
  INFO(std::string(Model::name()) << " first loss " << first << " last " << last);
  CHECK(last < first / 10);
}

/// Invoke every generic test case for backend B.
#define USEG_SUITE_INVOKE(B)                                                                               \
  TEST_CASE_TEMPLATE_INVOKE(suite_tensor, B);                                                              \
  TEST_CASE_TEMPLATE_INVOKE(suite_params, B);                                                              \
  TEST_CASE_TEMPLATE_INVOKE(suite_conv2d, B);                                                              \
  TEST_CASE_TEMPLATE_INVOKE(suite_upconv, B);                                                              \
  TEST_CASE_TEMPLATE_INVOKE(suite_batch_norm, B);                                                          \
  TEST_CASE_TEMPLATE_INVOKE(suite_bn_relu, B);                                                             \
  TEST_CASE_TEMPLATE_INVOKE(suite_activations, B);                                                         \
  TEST_CASE_TEMPLATE_INVOKE(suite_maxpool, B);                                                             \
  TEST_CASE_TEMPLATE_INVOKE(suite_upsample, B);                                                            \
  TEST_CASE_TEMPLATE_INVOKE(suite_elementwise, B);                                                         \
  TEST_CASE_TEMPLATE_INVOKE(suite_ops, B);                                                                 \
  TEST_CASE_TEMPLATE_INVOKE(suite_losses, B);                                                              \
  TEST_CASE_TEMPLATE_INVOKE(suite_optim, B);                                                               \
  TEST_CASE_TEMPLATE_INVOKE(suite_model_shapes, suite::unet_t<B, 3, 2>, suite::attention_unet_t<B, 3, 2>,  \
                            suite::r2unet_t<B, 1, 1>, suite::ar2unet_t<B, 1, 1>);                          \
  TEST_CASE_TEMPLATE_INVOKE(suite_model_overfit, suite::unet_t<B, 3, 1>, suite::attention_unet_t<B, 3, 1>, \
                            suite::r2unet_t<B, 3, 1>, suite::ar2unet_t<B, 3, 1>)
