// Blocks: gradient checks (double), shared-weight recurrence, PyTorch parameter names.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "gradcheck.hpp"
#include "useg/blocks/attention_gate.hpp"
#include "useg/blocks/conv_block.hpp"
#include "useg/blocks/recurrent_block.hpp"
#include "useg/blocks/rrcnn_block.hpp"
#include "useg/blocks/up_conv.hpp"

using namespace useg;
using gc::B;
using gc::T;

namespace {
std::vector<std::string> names(const param_store<B>& s) {
  std::vector<std::string> v;
  for (const auto& e : s.entries()) v.push_back(e.name);
  return v;
}
// Runs backward() twice after one forward: both runs' input gradients (what backward() returns)
// and parameter gradients are equal to the last bit, and not all zero.
template <class Backward>
void check_second_backward(param_store<B>& s, Backward&& backward) {
  auto run = [&] {
    s.zero_grad();
    std::vector<double> g = backward();
    const std::vector<double> gp = s.flat_grads().to_host();
    g.insert(g.end(), gp.begin(), gp.end());
    return g;
  };
  const std::vector<double> first = run();
  const std::vector<double> second = run();
  REQUIRE(first.size() == second.size());
  CHECK(first == second);
  double norm = 0;
  for (double v : first) norm += v * v;
  CHECK(norm > 0);
}
}  // namespace

TEST_CASE("conv_block: names and gradient check (train and eval)") {
  param_store<B> s;
  conv_block<B> blk(s, "Conv1", 2, 3);
  s.finalize(1);
  const std::vector<std::string> want{
      "Conv1.conv.0.weight", "Conv1.conv.0.bias", "Conv1.conv.1.weight", "Conv1.conv.1.bias", "Conv1.conv.1.running_mean",
      "Conv1.conv.1.running_var", "Conv1.conv.1.num_batches_tracked", "Conv1.conv.3.weight", "Conv1.conv.3.bias",
      "Conv1.conv.4.weight", "Conv1.conv.4.bias", "Conv1.conv.4.running_mean", "Conv1.conv.4.running_var",
      "Conv1.conv.4.num_batches_tracked"};
  CHECK(names(s) == want);
  context<B> ctx;
  useg::rng g(2);
  T x = gc::random_tensor(shape{2, 2, 5, 4}, g);
  for (bool train : {true, false}) {
    s.set_training(train);
    gc::check("conv_block", [&]() -> const T& { return blk.forward(ctx, x); },
              [&](const T& gy) { return std::vector<const T*>{&blk.backward(ctx, gy)}; }, {&x}, &s);
  }
}

TEST_CASE("conv_block, up_conv, attention_gate: state freed by backward is recomputed bit-identically by a second backward") {
  // The units write gradients over their convolution outputs and free them at the end of their
  // backward (and the block drops its first unit's activation, the gate its output); a second
  // backward after the same forward recomputes them from the inputs and gets the same gradients.
  param_store<B> s;
  conv_block<B> blk(s, "Conv1", 3, 4);
  up_conv<B> up(s, "Up2", 4, 2, up_kind::upsample);
  attention_gate<B> att(s, "Att2", 2, 2, 1);
  s.finalize(3);
  context<B> ctx;
  useg::rng g(5);
  T x = gc::random_tensor(shape{2, 3, 6, 5}, g);
  const T& u = up.forward(ctx, blk.forward(ctx, x));
  T skip = gc::random_tensor(u.dims(), g);
  const T& y = att.forward(ctx, u, skip);
  const std::vector<double> y0 = y.to_host();
  att.drop_output();
  CHECK(att.restore_output(ctx).to_host() == y0);
  T gy = gc::random_tensor(skip.dims(), g);
  check_second_backward(s, [&] {
    auto [gg, gskip] = att.backward(ctx, gy);
    std::vector<double> gx = gskip.to_host();
    const T& gu = up.backward(ctx, gg);
    const std::vector<double> gb = blk.backward(ctx, gu).to_host();
    gx.insert(gx.end(), gb.begin(), gb.end());
    return gx;
  });
}

TEST_CASE("recurrent_block: one shared conv applied t+1 times, gradients summed, BN stats per application") {
  for (int t : {1, 2, 3}) {
    param_store<B> s;
    recurrent_block<B> rb(s, "R", 3, t);
    s.finalize(3);
    // exactly one conv + one BN registered, whatever t is
    CHECK(names(s) == std::vector<std::string>{"R.conv.0.weight", "R.conv.0.bias", "R.conv.1.weight", "R.conv.1.bias",
                                               "R.conv.1.running_mean", "R.conv.1.running_var",
                                               "R.conv.1.num_batches_tracked"});
    context<B> ctx;
    useg::rng g(4);
    T x = gc::random_tensor(shape{2, 3, 4, 5}, g);
    rb.forward(ctx, x);
    CHECK(s.counter(s.find("R.conv.1.num_batches_tracked")) == t + 1);
    // running mean after t+1 momentum updates from zero: never equal to a single update's value
    gc::check("recurrent t=" + std::to_string(t), [&]() -> const T& { return rb.forward(ctx, x); },
              [&](const T& gy) { return std::vector<const T*>{&rb.backward(ctx, gy)}; }, {&x}, &s);
  }
}

TEST_CASE("recurrent_block forward equals the unrolled definition x1 = f(x); x1 = f(x + x1) ...") {
  param_store<B> s;
  recurrent_block<B> rb(s, "R", 2, 2);
  s.finalize(9);
  // an independent f with the same parameters, applied by hand
  param_store<B> s2;
  conv_bn_relu<B, 3> f2(s2, "R.conv.0", "R.conv.1", 2, 2);
  s2.finalize(9);  // same seed, same registration -> same parameters
  context<B> ctx;
  useg::rng g(5);
  T x = gc::random_tensor(shape{2, 2, 4, 4}, g);
  const T& y = rb.forward(ctx, x);
  T x1 = f2.forward(ctx, x).clone();
  for (int i = 0; i < 2; ++i) {
    T sum(x.dims());
    for (std::size_t k = 0; k < x.size(); ++k) sum.data()[k] = x.data()[k] + x1.data()[k];
    x1 = f2.forward(ctx, sum).clone();
  }
  for (std::size_t k = 0; k < y.size(); ++k) REQUIRE(y.data()[k] == doctest::Approx(x1.data()[k]).epsilon(1e-12));
  CHECK(s.buffer(param_ref{4})[0] == doctest::Approx(s2.buffer(param_ref{4})[0]).epsilon(1e-12));
}

TEST_CASE("recurrent_block in eval mode equals the unrolled definition (batch norm folded once per block)") {
  // Eval mode folds the batch norm into the convolution; the block folds it once and its later
  // applications reuse the folded weights. 8 channels and an 8×8 plane take the Winograd path.
  for (int t : {1, 2, 3}) {
    param_store<B> s;
    recurrent_block<B> rb(s, "R", 8, t);
    s.finalize(11);
    param_store<B> s2;
    conv_bn_relu<B, 3> f2(s2, "R.conv.0", "R.conv.1", 8, 8);
    s2.finalize(11);
    useg::rng g(12);
    for (const char* buf : {"R.conv.1.running_mean", "R.conv.1.running_var"}) {
      const param_ref r = s.find(buf);
      for (int c = 0; c < 8; ++c) {
        const double v = std::string(buf).ends_with("var") ? 0.5 + g.uniform() : g.uniform() - 0.5;
        s.buffer(r)[c] = v;
        s2.buffer(s2.find(buf))[c] = v;
      }
    }
    s.set_training(false);
    s2.set_training(false);
    context<B> ctx;
    T x = gc::random_tensor(shape{1, 8, 8, 8}, g);
    for (int pass = 0; pass < 2; ++pass) {  // the second pass folds anew
      const T& y = rb.forward(ctx, x);
      T x1 = f2.forward(ctx, x).clone();
      for (int i = 0; i < t; ++i) {
        T sum(x.dims());
        for (std::size_t k = 0; k < x.size(); ++k) sum.data()[k] = x.data()[k] + x1.data()[k];
        x1 = f2.forward(ctx, sum).clone();
      }
      for (std::size_t k = 0; k < y.size(); ++k) REQUIRE(y.data()[k] == doctest::Approx(x1.data()[k]).epsilon(1e-12));
      // new parameters between passes must be seen by every application
      const param_ref gm = s.find("R.conv.1.weight");
      for (int c = 0; c < 8; ++c) s.param(gm)[c] = s2.param(s2.find("R.conv.1.weight"))[c] = 0.5 + c * 0.125;
    }
  }
}

TEST_CASE("rrcnn_block: names in PyTorch order and gradient check (train and eval)") {
  param_store<B> s;
  rrcnn_block<B> blk(s, "RRCNN1", 2, 3, 2);
  s.finalize(5);
  auto n = names(s);
  CHECK(n.front() == "RRCNN1.RCNN.0.conv.0.weight");
  CHECK(n[7] == "RRCNN1.RCNN.1.conv.0.weight");
  CHECK(n[n.size() - 2] == "RRCNN1.Conv_1x1.weight");
  CHECK(n.back() == "RRCNN1.Conv_1x1.bias");
  context<B> ctx;
  useg::rng g(6);
  T x = gc::random_tensor(shape{2, 2, 4, 3}, g);
  for (bool train : {true, false}) {
    s.set_training(train);
    gc::check("rrcnn_block", [&]() -> const T& { return blk.forward(ctx, x); },
              [&](const T& gy) { return std::vector<const T*>{&blk.backward(ctx, gy)}; }, {&x}, &s);
  }
}

TEST_CASE("rrcnn_block::forward_concat (inference) equals forward on the concatenation; no backward follows it") {
  param_store<B> s;
  rrcnn_block<B> blk(s, "RRCNN1", 12, 8, 2);
  s.finalize(13);
  s.set_training(false);
  context<B> ctx;
  useg::rng g(14);
  T a = gc::random_tensor(shape{2, 5, 9, 8}, g), b = gc::random_tensor(shape{2, 7, 9, 8}, g);
  T cat(shape{2, 12, 9, 8});
  ops<B>::concat_channels(ctx, 2, 5, 7, 72, a.data(), b.data(), cat.data());
  const std::vector<double> ref = blk.forward(ctx, cat).to_host();
  int consumed = 0;
  CHECK(blk.forward_concat(ctx, a, b, [&] { ++consumed; }).to_host() == ref);
  CHECK(consumed == 1);
  T gy(shape{2, 8, 9, 8});
  gy.fill(1);
  CHECK_THROWS_AS(blk.backward(ctx, gy), shape_error);
  T wrong = gc::random_tensor(shape{2, 6, 9, 8}, g);
  CHECK_THROWS_AS(blk.forward_concat(ctx, a, wrong), shape_error);
}

TEST_CASE("rrcnn_block: a second backward recomputes what the first freed, bit-identically, for t = 1..3") {
  // The recurrent blocks free each application's output, sum and convolution output during the
  // backward; a second backward after the same forward rebuilds them from the input.
  for (int t : {1, 2, 3}) {
    param_store<B> s;
    rrcnn_block<B> blk(s, "RRCNN1", 2, 3, t);
    s.finalize(7);
    context<B> ctx;
    useg::rng g(8);
    T x = gc::random_tensor(shape{2, 2, 5, 4}, g);
    const T& y = blk.forward(ctx, x);
    T gy = gc::random_tensor(y.dims(), g);
    check_second_backward(s, [&] { return blk.backward(ctx, gy).to_host(); });
  }
}

namespace {
// A block's output dropped and restored equals the forward's output to the last bit: restored
// from the kept convolution output before the backward, from the block's input after it.
template <class Block, class Fwd>
void check_drop_restore(const char* what, param_store<B>& s, Block& blk, Fwd&& forward) {
  INFO(what);
  context<B> ctx;
  useg::rng g(4);
  s.set_training(true);
  const T& y = forward(ctx);
  const std::vector<double> y0 = y.to_host();
  blk.drop_output();
  CHECK(blk.output().empty());
  blk.restore_output(ctx);
  CHECK(blk.output().to_host() == y0);
  blk.restore_output(ctx);  // present: no change
  CHECK(blk.output().to_host() == y0);
  T gy = gc::random_tensor(y.dims(), g);
  blk.drop_output();
  blk.backward(ctx, gy);  // does not need the output
  blk.restore_output(ctx);
  CHECK(blk.output().to_host() == y0);
}
}  // namespace

TEST_CASE("conv_block, rrcnn_block, up_conv: a dropped output is restored bit-identically, before and after backward") {
  useg::rng g(3);
  T x = gc::random_tensor(shape{2, 3, 6, 5}, g);
  {
    param_store<B> s;
    conv_block<B> blk(s, "Conv1", 3, 4);
    s.finalize(1);
    check_drop_restore("conv_block", s, blk, [&](context<B>& c) -> const T& { return blk.forward(c, x); });
  }
  for (int t : {1, 2}) {
    param_store<B> s;
    rrcnn_block<B> blk(s, "RRCNN1", 3, 4, t);
    s.finalize(2);
    check_drop_restore("rrcnn_block", s, blk, [&](context<B>& c) -> const T& { return blk.forward(c, x); });
  }
  {
    param_store<B> s;
    up_conv<B> blk(s, "Up2", 3, 2, up_kind::upsample);
    s.finalize(3);
    check_drop_restore("up_conv", s, blk, [&](context<B>& c) -> const T& { return blk.forward(c, x); });
  }
}

TEST_CASE("up_conv: upsample+conv and transposed-conv variants, names and gradient checks") {
  for (up_kind k : {up_kind::upsample, up_kind::transpose}) {
    param_store<B> s;
    up_conv<B> up(s, "Up5", 4, 2, k);
    s.finalize(7);
    if (k == up_kind::upsample) {
      CHECK(s.entries()[0].name == "Up5.up.1.weight");
      CHECK(s.entries()[2].name == "Up5.up.2.weight");
    } else {
      CHECK(names(s) == std::vector<std::string>{"Up5.up.weight", "Up5.up.bias"});
      CHECK(s.entries()[0].dims == shape({4, 2, 2, 2}));
    }
    context<B> ctx;
    useg::rng g(8);
    T x = gc::random_tensor(shape{2, 4, 3, 2}, g);
    CHECK(up.forward(ctx, x).dims() == shape({2, 2, 6, 4}));
    gc::check(std::string("up_conv ") + to_string(k), [&]() -> const T& { return up.forward(ctx, x); },
              [&](const T& gy) { return std::vector<const T*>{&up.backward(ctx, gy)}; }, {&x}, &s);
  }
}

TEST_CASE("attention_gate: output is x * psi with psi in (0,1), names, gradient check for g, x and parameters") {
  param_store<B> s;
  attention_gate<B> att(s, "Att2", 4, 4, 2);
  s.finalize(9);
  auto n = names(s);
  CHECK(n[0] == "Att2.W_g.0.weight");
  CHECK(n[2] == "Att2.W_g.1.weight");
  CHECK(n[7] == "Att2.W_x.0.weight");
  CHECK(n[14] == "Att2.psi.0.weight");
  CHECK(s.entries()[14].dims == shape({1, 2, 1, 1}));
  context<B> ctx;
  useg::rng g(10);
  T gs = gc::random_tensor(shape{2, 4, 3, 3}, g), x = gc::random_tensor(shape{2, 4, 3, 3}, g);
  const T& y = att.forward(ctx, gs, x);
  for (std::size_t i = 0; i < y.size(); ++i) {
    const double r = x.data()[i] != 0 ? y.data()[i] / x.data()[i] : 0.5;
    REQUIRE(r > 0);
    REQUIRE(r < 1);
  }
  for (bool train : {true, false}) {
    s.set_training(train);
    gc::check("attention_gate", [&]() -> const T& { return att.forward(ctx, gs, x); },
              [&](const T& gy) {
                auto [gg, gx] = att.backward(ctx, gy);
                return std::vector<const T*>{&gg, &gx};
              },
              {&gs, &x}, &s);
  }
}

TEST_CASE("attention_gate: between forward and backward it holds the output and the one-channel psi path, not the F_int-channel tensors") {
  param_store<B> s;
  attention_gate<B> att(s, "Att", 8, 8, 8);  // F_int = channels of x: each inner tensor is as large as the output
  s.finalize(3);
  context<B> ctx;
  useg::rng g(4);
  T gs = gc::random_tensor(shape{2, 8, 32, 32}, g), x = gc::random_tensor(shape{2, 8, 32, 32}, g);
  const std::size_t out_bytes = x.size() * sizeof(double);
  att.forward(ctx, gs, x);  // workspaces grown
  const std::size_t live0 = cpu_memory().live;
  att.release_all();
  const std::size_t empty = cpu_memory().live;
  att.forward(ctx, gs, x);
  const std::size_t held = cpu_memory().live - empty;
  CHECK(live0 - empty == held);
  CHECK(held >= out_bytes);
  CHECK(held < out_bytes + out_bytes / 2);  // output + zp + psi (1/8 each) + statistics; the three inner tensors would be 3x more
  // and the backward, which recomputes them, matches a fresh forward + backward bit for bit
  T gy = gc::random_tensor(x.dims(), g);
  auto [gg1, gx1] = att.backward(ctx, gy);
  const std::vector<double> a = gg1.to_host(), b = gx1.to_host();
  att.forward(ctx, gs, x);
  auto [gg2, gx2] = att.backward(ctx, gy);
  CHECK(gg2.to_host() == a);
  CHECK(gx2.to_host() == b);
}
