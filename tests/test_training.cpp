// Tensors, the parameter store, losses (values + gradient checks), optimizers and schedules.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cmath>

#include "gradcheck.hpp"
#include "useg/loss/losses.hpp"
#include "useg/optim/optimizers.hpp"
#include "useg/optim/schedules.hpp"

using namespace useg;
using gc::B;
using gc::T;

// ------------------------------------------------------------------------------------------ tensors
TEST_CASE("tensor: shapes, explicit copies, reuse of storage, host transfers") {
  tensor<cpu> t(2, 3, 4, 5);
  CHECK(t.size() == 120);
  CHECK(t.dims() == shape({2, 3, 4, 5}));
  CHECK(t.dims().str() == "[2, 3, 4, 5]");
  t.fill(1.5f);
  tensor<cpu> c = t.clone();
  c.data()[0] = 7;
  CHECK(t.data()[0] == 1.5f);  // clone is deep
  const float* before = t.data();
  t.resize(shape{1, 3, 4, 5});  // smaller: storage reused
  CHECK(t.data() == before);
  tensor<cpu> m = std::move(c);
  CHECK(c.data() == nullptr);
  CHECK(m.data()[0] == 7);
  auto host = m.to_host();
  CHECK(host.size() == 120);
  CHECK_THROWS_AS(tensor<cpu>::from_host(shape{2, 2}, {1, 2, 3}), shape_error);
  CHECK_THROWS_AS((shape{1, 2, 3, 4, 5}), shape_error);
  CHECK_THROWS_AS((shape{2, -1}), shape_error);
  static_assert(!std::is_copy_constructible_v<tensor<cpu>>, "tensors are copied explicitly only");
}

TEST_CASE("param_store: offsets, kinds, names, finalize once") {
  param_store<cpu> s;
  auto w = s.add_parameter("a.weight", shape{2, 3}, init_kind::constant, 0.5);
  auto b = s.add_buffer("a.running_mean", shape{3}, 0.0);
  auto n = s.add_counter("a.num_batches_tracked");
  auto v = s.add_parameter("b.weight", shape{4}, init_kind::kaiming_uniform, 0, 4);
  s.finalize(1);
  CHECK(s.num_parameters() == 10);
  CHECK(s.num_buffers() == 3);
  CHECK(s.param(v) == s.param(w) + 6);
  CHECK(s.param(w)[5] == 0.5f);
  CHECK(s.buffer(b)[2] == 0.0f);
  CHECK(s.counter(n) == 0);
  CHECK(s.find("b.weight").index == v.index);
  CHECK(!s.find("nope").valid());
  CHECK_THROWS_AS(s.add_parameter("late", shape{1}, init_kind::constant), error);
}

// ------------------------------------------------------------------------------------------ losses
TEST_CASE("bce_with_logits: hand values, pos_weight, extreme logits stay finite") {
  context<B> ctx;
  T x = T::from_host(shape{1, 1, 1, 4}, {0.0, 2.0, -3.0, 100.0});
  T y = T::from_host(shape{1, 1, 1, 4}, {1.0, 0.0, 1.0, 1.0});
  const double l0 = std::log(2.0), l1 = std::log1p(std::exp(2.0)), l2 = std::log1p(std::exp(3.0)), l3 = std::log1p(std::exp(-100.0));
  CHECK(bce_with_logits_loss(ctx, x, y) == doctest::Approx((l0 + l1 + l2 + l3) / 4).epsilon(1e-12));
  // pos_weight multiplies the positive term: (pw*l0 + l1 + pw*l2 + pw*l3)/4
  CHECK(bce_with_logits_loss(ctx, x, y, nullptr, 3.0) == doctest::Approx((3 * l0 + l1 + 3 * l2 + 3 * l3) / 4).epsilon(1e-12));
  T big = T::from_host(shape{1, 1, 1, 2}, {-1000.0, 1000.0});
  T yb = T::from_host(shape{1, 1, 1, 2}, {1.0, 0.0});
  T g;
  const double lb = bce_with_logits_loss(ctx, big, yb, &g);
  CHECK(lb == doctest::Approx(1000.0));
  CHECK(std::isfinite(g.data()[0]));
  CHECK(g.data()[0] == doctest::Approx(-0.5));
}

TEST_CASE("dice: hand values (binary over the batch, multi-class softmax)") {
  context<B> ctx;
  // logits ±40: sigmoid is 0/1 to double precision
  T x = T::from_host(shape{1, 1, 2, 2}, {40, 40, -40, -40});
  T y = T::from_host(shape{1, 1, 2, 2}, {1, 0, 1, 0});
  // p = (1,1,0,0): I = 1, Sp = 2, St = 2 -> 1 - (2+1)/(4+1) = 0.4
  CHECK(dice_loss(ctx, x, y) == doctest::Approx(0.4).epsilon(1e-9));
  CHECK(dice_loss(ctx, x, y, nullptr, 0.0) == doctest::Approx(0.5).epsilon(1e-9));
  // two classes, each pixel's logits strongly favour class 0 or 1
  T xm = T::from_host(shape{1, 2, 1, 2}, {40, -40, -40, 40});  // pixel 0 -> class 0, pixel 1 -> class 1
  T tm = T::from_host(shape{1, 1, 1, 2}, {0, 0});
  // class 0: I=1, S = 1 + 2 = 3 -> (2+1)/(3+1) = .75; class 1: I=0, S = 1 + 0 -> (0+1)/(1+1) = .5
  CHECK(dice_loss(ctx, xm, tm) == doctest::Approx(1 - (0.75 + 0.5) / 2).epsilon(1e-9));
  T bad = T::from_host(shape{1, 1, 1, 2}, {0, 2});
  CHECK_THROWS_WITH_AS(dice_loss(ctx, xm, bad), doctest::Contains("class indices"), shape_error);
}

TEST_CASE("cross_entropy: hand value") {
  context<B> ctx;
  T x = T::from_host(shape{1, 3, 1, 1}, {1.0, 2.0, 3.0});
  T t = T::from_host(shape{1, 1, 1, 1}, {2.0});
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  CHECK(cross_entropy_loss(ctx, x, t) == doctest::Approx(-std::log(std::exp(3.0) / z)).epsilon(1e-12));
}

TEST_CASE("loss gradient checks (double)") {
  context<B> ctx;
  useg::rng g(3);
  T x = gc::random_tensor(shape{2, 1, 4, 5}, g, -3, 3);
  T y(x.dims());
  for (std::size_t i = 0; i < y.size(); ++i) y.data()[i] = g.uniform() < 0.3 ? 1 : 0;
  T xm = gc::random_tensor(shape{2, 3, 3, 4}, g, -3, 3);
  T tm(shape{2, 1, 3, 4});
  for (std::size_t i = 0; i < tm.size(); ++i) tm.data()[i] = static_cast<double>(g.below(3));
  T grad, out;
  // Wrap each loss as a "module" whose output is the scalar loss (shape [1]); the checker's random
  // R then scales it, and backward returns R * dL/dx.
  auto as_module = [&](const char* name, T& in, auto&& fn) {
    gc::check(
        name,
        [&]() -> const T& {
          out.resize(shape{1});
          out.data()[0] = fn(in, nullptr);
          return out;
        },
        [&](const T& gy) {
          fn(in, &grad);
          for (std::size_t i = 0; i < grad.size(); ++i) grad.data()[i] *= gy.data()[0];
          return std::vector<const T*>{&grad};
        },
        {&in}, nullptr);
  };
  as_module("bce", x, [&](T& in, T* gr) { return bce_with_logits_loss(ctx, in, y, gr); });
  as_module("bce pos_weight", x, [&](T& in, T* gr) { return bce_with_logits_loss(ctx, in, y, gr, 4.0); });
  as_module("dice", x, [&](T& in, T* gr) { return dice_loss(ctx, in, y, gr); });
  as_module("bce+dice", x, [&](T& in, T* gr) { return bce_dice_loss(ctx, in, y, gr, 0.7, 1.3, 2.0); });
  as_module("dice multi-class", xm, [&](T& in, T* gr) { return dice_loss(ctx, in, tm, gr); });
  as_module("cross-entropy", xm, [&](T& in, T* gr) { return cross_entropy_loss(ctx, in, tm, gr); });
  loss_options o;
  as_module("bce+dice multi-class", xm, [&](T& in, T* gr) { return compute_loss(ctx, o, in, tm, gr); });
}

TEST_CASE("losses reject mismatched targets") {
  context<cpu> ctx;
  tensor<cpu> x(shape{2, 1, 4, 4}), y(shape{2, 1, 4, 3});
  x.fill(0);
  y.fill(0);
  CHECK_THROWS_WITH_AS(bce_with_logits_loss(ctx, x, y), doctest::Contains("differs from logits"), shape_error);
  CHECK_THROWS_AS(parse_loss_kind("focal"), config_error);
}

// ------------------------------------------------------------------------------------------ optimizers
namespace {
// A store with one parameter tensor of 5 values and given gradients.
struct toy {
  param_store<B> s;
  param_ref p;
  toy() {
    p = s.add_parameter("p", shape{5}, init_kind::constant, 0);
    s.finalize(0);
    const double v[5] = {0.5, -1.0, 2.0, 0.0, -0.25};
    for (int i = 0; i < 5; ++i) s.param(p)[i] = v[i];
  }
  void set_grad(int step) {
    for (int i = 0; i < 5; ++i) s.grad(p)[i] = std::sin(1.0 + i + 0.7 * step) * (i + 1);
  }
};
}  // namespace

TEST_CASE("SGD: plain, momentum, dampening, Nesterov and weight decay follow torch.optim.SGD") {
  struct cfg {
    double mom, damp, wd;
    bool nest;
  };
  for (cfg c : {cfg{0, 0, 0, false}, cfg{0.9, 0, 0, false}, cfg{0.9, 0.1, 0.01, false}, cfg{0.8, 0, 0.05, true}}) {
    toy t;
    context<B> ctx;
    sgd<B> opt(t.s, ctx, sgd_options{0.1, c.mom, c.damp, c.wd, c.nest});
    // independent transcription of the algorithm in PyTorch's documentation
    std::vector<double> p(t.s.param(t.p), t.s.param(t.p) + 5), buf(5, 0);
    for (int step = 0; step < 4; ++step) {
      t.set_grad(step);
      opt.step();
      for (int i = 0; i < 5; ++i) {
        double gi = t.s.grad(t.p)[i] + c.wd * p[i];
        if (c.mom != 0) {
          buf[i] = step == 0 ? gi : c.mom * buf[i] + (1 - c.damp) * gi;
          gi = c.nest ? gi + c.mom * buf[i] : buf[i];
        }
        p[i] -= 0.1 * gi;
        CHECK(t.s.param(t.p)[i] == doctest::Approx(p[i]).epsilon(1e-12));
      }
    }
    CHECK(opt.steps() == 4);
  }
  toy t;
  context<B> ctx;
  CHECK_THROWS_AS(sgd<B>(t.s, ctx, sgd_options{0.1, 0.0, 0.0, 0.0, true}), config_error);
}

TEST_CASE("Adam and AdamW follow torch.optim.Adam / AdamW") {
  for (bool decoupled : {false, true}) {
    for (double wd : {0.0, 0.1}) {
      toy t;
      context<B> ctx;
      adam_options o{0.01, 0.9, 0.999, 1e-8, wd, decoupled};
      adam<B> opt(t.s, ctx, o);
      std::vector<double> p(t.s.param(t.p), t.s.param(t.p) + 5), m(5, 0), v(5, 0);
      for (int step = 1; step <= 5; ++step) {
        t.set_grad(step);
        opt.step();
        for (int i = 0; i < 5; ++i) {
          double gi = t.s.grad(t.p)[i];
          if (decoupled) p[i] *= 1 - o.lr * wd;
          else gi += wd * p[i];
          m[i] = 0.9 * m[i] + 0.1 * gi;
          v[i] = 0.999 * v[i] + 0.001 * gi * gi;
          const double mhat = m[i] / (1 - std::pow(0.9, step)), vhat = v[i] / (1 - std::pow(0.999, step));
          p[i] -= o.lr * mhat / (std::sqrt(vhat) + 1e-8);
          CHECK(t.s.param(t.p)[i] == doctest::Approx(p[i]).epsilon(1e-10));
        }
      }
      CHECK(std::string(opt.name()) == (decoupled ? "adamw" : "adam"));
      CHECK(opt.state().size() == 2);
    }
  }
  toy t;
  context<B> ctx;
  adamw<B> w(t.s, ctx);
  CHECK(std::string(w.name()) == "adamw");
}

TEST_CASE_TEMPLATE("Adam over many parameters (vector blocks, a scalar tail, both threads) matches a scalar transcription",
                   BT, cpu_backend<float>, cpu_backend<double>) {
  using TT = typename BT::scalar;
  const int n = 70003;  // > 2^16: the parallel loop; 70003 = 8 * 8750 + 3: blocks and a tail
  for (bool decoupled : {false, true}) {
    param_store<BT> s;
    const param_ref pr = s.add_parameter("p", shape{n}, init_kind::constant, 0);
    s.finalize(0);
    auto val = [](int i, double f) { return std::sin(0.37 * i + f) * (1 + (i % 7)); };
    for (int i = 0; i < n; ++i) s.param(pr)[i] = static_cast<TT>(val(i, 0.0));
    context<BT> ctx;
    const adam_options o{0.01, 0.9, 0.999, 1e-8, 0.05, decoupled};
    adam<BT> opt(s, ctx, o);
    // The reference keeps what the optimizer stores (T) and computes each update in double.
    std::vector<TT> p(s.param(pr), s.param(pr) + n), m(n, 0), v(n, 0);
    int bad = 0;
    for (int step = 1; step <= 3; ++step) {
      for (int i = 0; i < n; ++i) s.grad(pr)[i] = static_cast<TT>(val(i, 1.0 + step));
      opt.step();
      for (int i = 0; i < n; ++i) {
        double pi = p[i], gi = s.grad(pr)[i];
        if (decoupled) pi *= 1 - o.lr * o.weight_decay;
        else gi += o.weight_decay * pi;
        const double mi = 0.9 * m[i] + 0.1 * gi, vi = 0.999 * v[i] + 0.001 * gi * gi;
        pi -= o.lr / (1 - std::pow(0.9, step)) * mi / (std::sqrt(vi) / std::sqrt(1 - std::pow(0.999, step)) + 1e-8);
        m[i] = static_cast<TT>(mi);
        v[i] = static_cast<TT>(vi);
        p[i] = static_cast<TT>(pi);
        const double tol = (sizeof(TT) == 4 ? 1e-6 : 1e-13) * (1 + std::abs(pi));
        if (std::abs(s.param(pr)[i] - pi) > tol) ++bad;
      }
    }
    CHECK(bad == 0);
  }
}

// ------------------------------------------------------------------------------------------ schedules
TEST_CASE("step and cosine schedules") {
  step_lr s{0.1, 3, 0.5};
  CHECK(s.lr_at(0) == doctest::Approx(0.1));
  CHECK(s.lr_at(2) == doctest::Approx(0.1));
  CHECK(s.lr_at(3) == doctest::Approx(0.05));
  CHECK(s.lr_at(7) == doctest::Approx(0.025));
  cosine_lr c{0.1, 10, 0.001};
  CHECK(c.lr_at(0) == doctest::Approx(0.1));
  CHECK(c.lr_at(5) == doctest::Approx(0.001 + 0.099 * 0.5));
  CHECK(c.lr_at(10) == doctest::Approx(0.001));
}

TEST_CASE("reduce_on_plateau: patience, factor, cooldown, min_lr, threshold (PyTorch semantics)") {
  reduce_on_plateau r(1.0, reduce_on_plateau::mode::min, 0.5, 2, 1e-4, 1, 0.2);
  // improving: no change
  CHECK(r.step(10) == 1.0);
  CHECK(r.step(9) == 1.0);
  // plateau: 3 bad epochs (> patience 2) -> halve
  CHECK(r.step(9) == 1.0);
  CHECK(r.step(9) == 1.0);
  CHECK(r.step(9) == 0.5);
  // cooldown of 1 epoch: the bad count is reset during it
  CHECK(r.step(9) == 0.5);
  CHECK(r.step(9) == 0.5);
  CHECK(r.step(9) == 0.5);
  CHECK(r.step(9) == 0.25);
  // an improvement smaller than the relative threshold counts as bad
  CHECK(r.step(9 * (1 - 1e-5)) == 0.25);
  // min_lr bounds the decay
  for (int i = 0; i < 10; ++i) r.step(100);
  CHECK(r.lr() == doctest::Approx(0.2));
  reduce_on_plateau mx(1.0, reduce_on_plateau::mode::max, 0.1, 0);
  CHECK(mx.step(0.5) == 1.0);
  CHECK(mx.step(0.4) == doctest::Approx(0.1));
}
