// Models: gradient checks of all four models (double), shapes, padding, overfitting, bad use.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "gradcheck.hpp"
#include "useg/useg.hpp"

using namespace useg;
using gc::B;
using gc::T;

#define USEG_ALL_MODELS(Backend, In, Cls)                                                                      \
  useg::unet<Backend, In, Cls>, useg::attention_unet<Backend, In, Cls>, useg::r2unet<Backend, In, Cls>,        \
      useg::ar2unet<Backend, In, Cls>

TEST_CASE_TEMPLATE("model gradient check: inputs and every parameter tensor, train and eval, 16x16 and 18x14", Model,
                   USEG_ALL_MODELS(gc::B, 3, 1)) {
  unet_config cfg;
  cfg.width = 2;
  cfg.depth = 3;
  cfg.t = 2;
  cfg.seed = 17;
  Model m(cfg);
  useg::rng g(21);
  for (auto dims : {shape{2, 3, 16, 16}, shape{2, 3, 18, 14}}) {
    T x = gc::random_tensor(dims, g);
    for (bool train : {true, false}) {
      m.train(train);
      const std::string ctx_msg = std::string(Model::name()) + " " + dims.str() + (train ? " train" : " eval");
      INFO(ctx_msg);
      gc::options o;
      o.coords_per_input = 12;
      o.eps = 1e-7;  // whole networks have ReLU/max-pool kinks at ~1e-5 parameter scale
      gc::check(
          Model::name(), [&]() -> const T& { return m.forward(x); },
          [&](const T& gy) { return std::vector<const T*>{&m.backward(gy, true)}; }, {&x}, &m.params(), o);
    }
  }
}

TEST_CASE_TEMPLATE("model gradient check at depth 4 (default), width 4, transposed up-conv, 2 classes", Model,
                   USEG_ALL_MODELS(gc::B, 1, 2)) {
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 4;
  cfg.t = 1;
  cfg.up = up_kind::transpose;
  Model m(cfg);
  useg::rng g(22);
  // Train mode at 32x32 (the bottom BN sees 8 values per channel); eval mode at 16x16 (1x1 bottom).
  // Train mode at 16x16 would normalize 2 values per channel at the bottom: a function so curved
  // that finite differences stop resolving it, whatever the implementation.
  for (auto [train, size] : std::vector<std::pair<bool, int>>{{true, 32}, {false, 16}}) {
    m.train(train);
    T x = gc::random_tensor(shape{2, 1, size, size}, g);
    gc::options o;
    o.coords_per_input = 8;
    o.eps = 1e-7;
    const std::string ctx_msg = std::string(Model::name()) + (train ? " train 32x32" : " eval 16x16");
    INFO(ctx_msg);
    gc::check(
        Model::name(), [&]() -> const T& { return m.forward(x); },
        [&](const T& gy) { return std::vector<const T*>{&m.backward(gy, true)}; }, {&x}, &m.params(), o);
  }
}

TEST_CASE_TEMPLATE("model output shapes for several input sizes", Model, USEG_ALL_MODELS(useg::cpu, 3, 2)) {
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 3;
  Model m(cfg);
  for (auto [h, w] : std::vector<std::pair<int, int>>{{16, 16}, {18, 14}, {33, 47}, {8, 8}, {5, 3}, {64, 32}}) {
    T x0(shape{2, 3, h, w});
    useg::tensor<useg::cpu> x(shape{2, 3, h, w});
    useg::rng g(1);
    for (std::size_t i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(g.uniform());
    const auto& y = m.forward(x);
    CHECK(y.dims() == shape({2, 2, h, w}));
    m.zero_grad();
    useg::tensor<useg::cpu> gy(y.dims());
    gy.fill(1);
    CHECK(m.backward(gy, true).dims() == x.dims());
    CHECK(m.backward(gy, false).empty());
  }
}

TEST_CASE_TEMPLATE("a second backward after one forward gives the same gradients, running statistics untouched", Model,
                   USEG_ALL_MODELS(useg::cpu, 3, 1)) {
  // A train-mode forward drops block outputs that the backward restores and frees again; a second
  // backward runs the forward again for them, bit-identically, and puts the batch norms' running
  // statistics and counters back.
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 3;
  cfg.t = 2;
  Model m(cfg);
  useg::tensor<useg::cpu> x(shape{2, 3, 18, 14});  // padded to 24x16 inside
  useg::rng g(5);
  for (std::size_t i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(g.uniform());
  m.train();
  const auto& y = m.forward(x);
  useg::tensor<useg::cpu> gy(y.dims());
  for (std::size_t i = 0; i < gy.size(); ++i) gy.data()[i] = static_cast<float>(g.uniform() - 0.5);
  const std::vector<float> y0 = y.to_host();
  const std::vector<float> buffers = m.params().flat_buffers().to_host();
  const std::vector<std::int64_t> counters = m.params().counters();
  auto run = [&] {
    m.zero_grad();
    std::vector<float> v = m.backward(gy, true).to_host();
    const std::vector<float> gp = m.params().flat_grads().to_host();
    v.insert(v.end(), gp.begin(), gp.end());
    return v;
  };
  const std::vector<float> first = run();
  const std::vector<float> second = run();
  CHECK(second == first);
  CHECK(y.to_host() == y0);
  CHECK(m.params().flat_buffers().to_host() == buffers);
  CHECK(m.params().counters() == counters);
  double norm = 0;
  for (float v : first) norm += static_cast<double>(v) * v;
  CHECK(norm > 0);
}

TEST_CASE("parameter names and shapes follow the PyTorch reference models") {
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 4;
  ar2unet<useg::cpu, 3, 1> m(cfg);
  const auto& e = m.params().entries();
  CHECK(e.front().name == "RRCNN1.RCNN.0.conv.0.weight");
  CHECK(e.front().dims == shape({4, 4, 3, 3}));
  CHECK(m.params().entry(m.params().find("RRCNN1.Conv_1x1.weight")).dims == shape({4, 3, 1, 1}));
  CHECK(m.params().find("RRCNN5.Conv_1x1.weight").valid());
  CHECK(!m.params().find("RRCNN6.Conv_1x1.weight").valid());
  CHECK(m.params().entry(m.params().find("Up5.up.1.weight")).dims == shape({32, 64, 3, 3}));
  CHECK(m.params().entry(m.params().find("Att5.W_g.0.weight")).dims == shape({16, 32, 1, 1}));
  CHECK(m.params().entry(m.params().find("Att2.psi.0.weight")).dims == shape({1, 2, 1, 1}));
  CHECK(m.params().entry(m.params().find("Up_RRCNN2.Conv_1x1.weight")).dims == shape({4, 8, 1, 1}));
  CHECK(e.back().name == "Conv_1x1.bias");
  // registration order: Up5, Att5, Up_RRCNN5, Up4, ...
  auto pos = [&](const std::string& n) { return m.params().find(n).index; };
  CHECK(pos("Up5.up.1.weight") < pos("Att5.W_g.0.weight"));
  CHECK(pos("Att5.psi.1.num_batches_tracked") < pos("Up_RRCNN5.RCNN.0.conv.0.weight"));
  CHECK(pos("Up_RRCNN5.Conv_1x1.bias") < pos("Up4.up.1.weight"));

  unet<useg::cpu, 3, 1> u;  // defaults: width 64, depth 4 = the PyTorch U_Net
  CHECK(u.num_parameters() == 34527041);  // sum(p.numel() for p in U_Net(3, 1).parameters())
  CHECK(u.params().entry(u.params().find("Conv5.conv.0.weight")).dims == shape({1024, 512, 3, 3}));
}

TEST_CASE("initialization is seeded and reproducible") {
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 2;
  cfg.seed = 5;
  r2unet<useg::cpu, 3, 1> a(cfg), b(cfg);
  cfg.seed = 6;
  r2unet<useg::cpu, 3, 1> c(cfg);
  auto pa = a.params().flat_params().to_host(), pb = b.params().flat_params().to_host(), pc = c.params().flat_params().to_host();
  CHECK(pa == pb);
  CHECK(pa != pc);
}

TEST_CASE_TEMPLATE("a small model overfits a fixed batch (loss falls by a large factor)", Model, USEG_ALL_MODELS(useg::cpu, 3, 1)) {
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 2;
  cfg.t = 1;
  cfg.seed = 3;
  Model m(cfg);
  useg::rng g(7);
  useg::tensor<useg::cpu> x(shape{2, 3, 16, 16}), y(shape{2, 1, 16, 16}), grad;
  for (int n = 0; n < 2; ++n)
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        const bool inside = (i - 8 + 3 * n) * (i - 8 + 3 * n) + (j - 7) * (j - 7) < 20;
        y.data()[(n * 16 + i) * 16 + j] = inside ? 1.f : 0.f;
        for (int c = 0; c < 3; ++c)
          x.data()[((n * 3 + c) * 16 + i) * 16 + j] = static_cast<float>((inside ? 0.6 : 0.2) + 0.1 * g.uniform());
      }
  adam<useg::cpu> opt(m.params(), m.ctx(), adam_options{1e-2});
  double first = 0, last = 0;
  for (int it = 0; it < 150; ++it) {
    m.zero_grad();
    const double l = bce_with_logits_loss(m.ctx(), m.forward(x), y, &grad);
    m.backward(grad);
    opt.step();
    if (it == 0) first = l;
    last = l;
  }
  INFO(Model::name() << " first loss " << first << " last " << last);
  CHECK(last < first / 10);
}

TEST_CASE("bad use gives clear errors") {
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 2;
  unet<useg::cpu, 3, 1> m(cfg);
  useg::tensor<useg::cpu> wrong_c(shape{1, 1, 8, 8}), wrong_rank(shape{3, 8, 8}), ok(shape{1, 3, 8, 8});
  wrong_c.fill(0);
  wrong_rank.fill(0);
  ok.fill(0);
  CHECK_THROWS_WITH_AS(m.forward(wrong_c), doctest::Contains("expected 3 channels, got 1"), shape_error);
  CHECK_THROWS_WITH_AS(m.forward(wrong_rank), doctest::Contains("rank-4"), shape_error);
  m.eval();
  m.forward(ok);
  useg::tensor<useg::cpu> g(shape{1, 1, 4, 4});
  CHECK_THROWS_WITH_AS(m.backward(g), doctest::Contains("does not match"), shape_error);
  cfg.depth = 0;
  CHECK_THROWS_AS((unet<useg::cpu, 3, 1>(cfg)), config_error);
  cfg.depth = 2;
  cfg.t = 0;
  CHECK_THROWS_WITH_AS((r2unet<useg::cpu, 3, 1>(cfg)), doctest::Contains("t must be >= 1"), config_error);
  cfg.t = 2;
  cfg.width = 1;
  CHECK_THROWS_AS((attention_unet<useg::cpu, 3, 1>(cfg)), config_error);
  // train mode with a single value per channel at the bottom level: a clear error, not garbage
  cfg.width = 2;
  cfg.depth = 3;
  unet<useg::cpu, 3, 1> m2(cfg);
  useg::tensor<useg::cpu> one(shape{1, 3, 8, 8});
  one.fill(0.5f);
  CHECK_THROWS_WITH_AS(m2.forward(one), doctest::Contains("more than one value per channel"), shape_error);
}

TEST_CASE("summary describes the model") {
  unet_config cfg;
  cfg.width = 8;
  cfg.depth = 3;
  ar2unet<useg::cpu, 1, 1> m(cfg);
  const std::string s = m.summary();
  CHECK(s.find("ar2unet (R2AttU_Net)") != std::string::npos);
  CHECK(s.find("RRCNN4(64)") != std::string::npos);
  CHECK(s.find("Att2(F_int=4)") != std::string::npos);
}

TEST_CASE_TEMPLATE("the float32 backend computes the same outputs and gradients as the checked double one", Pair,
                   std::pair<useg::unet<useg::cpu, 3, 1>, useg::unet<useg::cpu_f64, 3, 1>>,
                   std::pair<useg::attention_unet<useg::cpu, 3, 1>, useg::attention_unet<useg::cpu_f64, 3, 1>>,
                   std::pair<useg::r2unet<useg::cpu, 3, 1>, useg::r2unet<useg::cpu_f64, 3, 1>>,
                   std::pair<useg::ar2unet<useg::cpu, 3, 1>, useg::ar2unet<useg::cpu_f64, 3, 1>>) {
  unet_config cfg;
  cfg.width = 4;
  cfg.depth = 3;
  cfg.seed = 11;
  typename Pair::first_type mf(cfg);
  typename Pair::second_type md(cfg);
  // the same parameters: copy the double ones (rounded) into the float model
  auto pd = md.params().flat_params().to_host();
  std::vector<float> pf(pd.begin(), pd.end());
  mf.params().flat_params().upload(pf.data());
  for (std::size_t i = 0; i < pd.size(); ++i) pd[i] = static_cast<double>(pf[i]);
  md.params().flat_params().upload(pd.data());
  useg::rng g(4);
  useg::tensor<useg::cpu> xf(shape{2, 3, 24, 20}), gf(shape{2, 1, 24, 20});
  T xd(xf.dims()), gd(gf.dims());
  for (std::size_t i = 0; i < xf.size(); ++i) xd.data()[i] = xf.data()[i] = static_cast<float>(g.uniform(-1, 1));
  for (std::size_t i = 0; i < gf.size(); ++i) gd.data()[i] = gf.data()[i] = static_cast<float>(g.uniform(-1, 1));
  for (bool train : {true, false}) {
    mf.train(train);
    md.train(train);
    const auto& yf = mf.forward(xf);
    const auto& yd = md.forward(xd);
    double num = 0, den = 0;
    for (std::size_t i = 0; i < yf.size(); ++i) {
      num += (yf.data()[i] - yd.data()[i]) * (yf.data()[i] - yd.data()[i]);
      den += yd.data()[i] * yd.data()[i];
    }
    CHECK(std::sqrt(num / den) < 1e-4);
    mf.zero_grad();
    md.zero_grad();
    mf.backward(gf);
    md.backward(gd);
    auto a = mf.params().flat_grads().to_host();
    auto b = md.params().flat_grads().to_host();
    num = den = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      num += (a[i] - b[i]) * (a[i] - b[i]);
      den += b[i] * b[i];
    }
    const std::string what = std::string(Pair::first_type::name()) + (train ? " train" : " eval");
    INFO(what);
    // Eval mode is well conditioned: float matches double to ~1e-6. In train mode the R2 models are
    // not: perturbing the input by 1e-7 (float rounding) moves the EXACT double gradient by ~1e-3
    // (ReLU/max-pool kinks flip), so float and double legitimately differ by up to a few percent.
    // A wrong formula gives errors of order 1, which both bounds catch.
    CHECK(std::sqrt(num / den) < (train ? 5e-2 : 1e-4));
  }
}
