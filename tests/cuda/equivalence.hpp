// tests/cuda/equivalence.hpp — backend-generic runners for the CPU-vs-CUDA equivalence tests.
//
// eq::run<B>(name, seed, ctx) builds the named case (an op, layer, block or model) from random
// data drawn from `seed` — identical on both backends, since everything random is drawn on the
// host — runs forward and backward (and a few optimizer steps where it applies), and returns
// every output and gradient as named host vectors. equivalence.cpp runs each case on useg::cpu
// and, through run_cuda() (equivalence_cuda.cu, compiled by nvcc), on useg::cuda in strict FP32
// with deterministic algorithms, and compares. This header never includes a backend.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "useg/blocks/attention_gate.hpp"
#include "useg/blocks/conv_block.hpp"
#include "useg/blocks/rrcnn_block.hpp"
#include "useg/blocks/up_conv.hpp"
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

namespace eq {

using outputs = std::vector<std::pair<std::string, std::vector<double>>>;
using useg::param_ref;
using useg::shape;

/// Every case, in the order the tests run them.
inline const std::vector<std::string>& op_cases() {
  static const std::vector<std::string> v{"conv3x3",    "conv1x1",  "conv3x3_nobias", "conv5x5", "upconv2x2", "batch_norm",
                                          "activations", "maxpool", "maxpool_ties",   "upsample", "elementwise", "memory_ops",
                                          "losses",      "optimizers"};
  return v;
}
inline const std::vector<std::string>& block_cases() {
  static const std::vector<std::string> v{"conv_block", "recurrent_block", "rrcnn_block", "attention_gate", "up_conv_upsample",
                                          "up_conv_transpose"};
  return v;
}
inline const std::vector<std::string>& model_cases() {
  static const std::vector<std::string> v{"unet", "attention_unet", "r2unet", "ar2unet"};
  return v;
}

namespace detail {

inline std::vector<float> random_values(std::size_t n, useg::rng& g, double lo = -1, double hi = 1) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(g.uniform(lo, hi));
  return v;
}
template <class B>
useg::tensor<B> rnd(const shape& s, useg::rng& g, double lo = -1, double hi = 1) {
  return useg::tensor<B>::from_host(s, random_values(s.numel(), g, lo, hi));
}
inline int between(useg::rng& g, int lo, int hi) { return lo + static_cast<int>(g.below(static_cast<std::uint64_t>(hi - lo + 1))); }

template <class B>
void put(outputs& o, const std::string& name, const useg::tensor<B>& t) {
  const auto h = t.to_host();
  o.emplace_back(name, std::vector<double>(h.begin(), h.end()));
}
template <class B>
void put_device(outputs& o, const std::string& name, const float* p, std::size_t n) {
  std::vector<float> h(n);
  useg::ops<B>::download(h.data(), p, n);
  o.emplace_back(name, std::vector<double>(h.begin(), h.end()));
}
inline void put_scalar(outputs& o, const std::string& name, double v) { o.emplace_back(name, std::vector<double>{v}); }

/// Non-trivial parameters: every value of the store redrawn (BN weights in [0.5, 1.5]); random
/// running statistics; random gradients already present (backward must ADD to them).
template <class B>
void randomize_store(useg::param_store<B>& s, useg::rng& g) {
  std::vector<float> p = random_values(s.num_parameters(), g, -0.5, 0.5);
  for (const auto& e : s.entries())
    if (e.kind == useg::entry_kind::parameter && e.name.size() > 7 && e.name.compare(e.name.size() - 7, 7, ".weight") == 0 &&
        e.dims.rank == 1)  // batch-norm weight
      for (std::size_t i = 0; i < e.size(); ++i) p[e.offset + i] = static_cast<float>(g.uniform(0.5, 1.5));
  if (!p.empty()) s.flat_params().upload(p.data());
  std::vector<float> b(s.num_buffers());
  for (const auto& e : s.entries())
    if (e.kind == useg::entry_kind::buffer) {
      const bool var = e.name.find("running_var") != std::string::npos;
      for (std::size_t i = 0; i < e.size(); ++i) b[e.offset + i] = static_cast<float>(var ? g.uniform(0.5, 2.0) : g.uniform(-0.5, 0.5));
    }
  if (!b.empty()) s.flat_buffers().upload(b.data());
  const auto gr = random_values(s.num_parameters(), g, -0.1, 0.1);
  if (!gr.empty()) s.flat_grads().upload(gr.data());
}
template <class B>
void put_store(outputs& o, const std::string& prefix, useg::param_store<B>& s) {
  put(o, prefix + "param_grads", s.flat_grads());
  if (s.num_buffers()) put(o, prefix + "buffers", s.flat_buffers());
}

// ---------------------------------------------------------------- layers
template <class B, int K, bool Bias>
outputs conv_case(useg::context<B>& ctx, useg::rng& g) {
  outputs o;
  const int n = between(g, 1, 3), ci = between(g, 1, 9), co = between(g, 1, 9), h = between(g, 1, 17), w = between(g, 1, 17);
  useg::param_store<B> s;
  useg::conv2d<B, K, Bias> conv(s, "c", ci, co);
  s.finalize(g.next_u64());
  randomize_store(s, g);
  auto x = rnd<B>(shape{n, ci, h, w}, g);
  put(o, "y", conv.forward(ctx, x));
  auto gy = rnd<B>(conv.output().dims(), g);
  put(o, "gx", conv.backward(ctx, gy));
  put_store(o, "", s);
  // the same shape again (cached algorithms), then a second backward adds onto the gradients
  put(o, "y_again", conv.forward(ctx, x));
  conv.backward(ctx, gy, false);
  put_store(o, "twice_", s);
  return o;
}
template <class B>
outputs upconv_case(useg::context<B>& ctx, useg::rng& g) {
  outputs o;
  const int n = between(g, 1, 3), ci = between(g, 1, 9), co = between(g, 1, 9), h = between(g, 1, 9), w = between(g, 1, 9);
  useg::param_store<B> s;
  useg::conv_transpose2x2<B> up(s, "up", ci, co);
  s.finalize(g.next_u64());
  randomize_store(s, g);
  auto x = rnd<B>(shape{n, ci, h, w}, g);
  put(o, "y", up.forward(ctx, x));
  auto gy = rnd<B>(up.output().dims(), g);
  put(o, "gx", up.backward(ctx, gy));
  put_store(o, "", s);
  return o;
}
template <class B>
outputs batch_norm_case(useg::context<B>& ctx, useg::rng& g) {
  outputs o;
  const int n = between(g, 1, 4), c = between(g, 1, 9), h = between(g, 2, 13), w = between(g, 1, 13);
  useg::param_store<B> s;
  useg::batch_norm2d<B> bn(s, "bn", c);
  s.finalize(0);
  randomize_store(s, g);
  // an offset mean and a wide spread per channel
  auto x = rnd<B>(shape{n, c, h, w}, g, -3, 5);
  put(o, "train_y", bn.forward(ctx, x));
  auto gy = rnd<B>(x.dims(), g);
  put(o, "train_gx", bn.backward(ctx, gy));
  put(o, "train_y_second", bn.forward(ctx, x));  // running statistics updated twice
  put_store(o, "train_", s);
  s.set_training(false);
  put(o, "eval_y", bn.forward(ctx, x));
  put(o, "eval_gx", bn.backward(ctx, gy));
  put_store(o, "eval_", s);
  // the fused batch norm + ReLU ops (what the blocks use), train and eval
  using ops = useg::ops<B>;
  const useg::bn_desc d{x.n(), c, x.dims().hw(), 1e-5, 0.1};
  auto gamma = rnd<B>(shape{c}, g, 0.5, 1.5), beta = rnd<B>(shape{c}, g, -0.5, 0.5);
  auto rm = rnd<B>(shape{c}, g, -0.5, 0.5), rv = rnd<B>(shape{c}, g, 0.5, 2);
  useg::tensor<B> mean(shape{c}), invstd(shape{c}), z(x.dims()), gx(x.dims()), gg(shape{c}), gb(shape{c});
  gg.fill(0.25f);
  gb.fill(-0.25f);
  ops::batch_norm_relu_forward_train(ctx, d, x.data(), gamma.data(), beta.data(), rm.data(), rv.data(), mean.data(), invstd.data(),
                                     z.data());
  put(o, "fused_train_z", z);
  put(o, "fused_save_mean", mean);
  put(o, "fused_save_invstd", invstd);
  put(o, "fused_running_mean", rm);
  put(o, "fused_running_var", rv);
  ops::batch_norm_relu_backward(ctx, d, true, x.data(), z.data(), gy.data(), gamma.data(), mean.data(), invstd.data(), gx.data(),
                                gg.data(), gb.data());
  put(o, "fused_train_gx", gx);
  put(o, "fused_train_ggamma", gg);
  put(o, "fused_train_gbeta", gb);
  if constexpr (requires { &ops::batch_norm_relu_apply; }) {
    auto r = rnd<B>(x.dims(), g);
    ops::batch_norm_relu_apply(ctx, d, x.data(), gamma.data(), beta.data(), mean.data(), invstd.data(), r.data(), z.data());
    put(o, "fused_apply_residual", z);
  }
  ops::batch_norm_relu_forward_eval(ctx, d, x.data(), gamma.data(), beta.data(), rm.data(), rv.data(), z.data());
  put(o, "fused_eval_z", z);
  ops::batch_norm_eval_invstd(ctx, c, 1e-5, rv.data(), invstd.data());
  ops::batch_norm_relu_backward(ctx, d, false, x.data(), z.data(), gy.data(), gamma.data(), rm.data(), invstd.data(), gx.data(),
                                gg.data(), gb.data());
  put(o, "fused_eval_gx", gx);
  put(o, "fused_eval_ggamma", gg);
  if constexpr (requires { &ops::fold_batch_norm; &ops::conv2d_forward_relu; }) {
    const int co = between(g, 1, 6);
    const useg::conv_desc cd{x.n(), c, co, x.h(), x.w(), 3};
    auto wt = rnd<B>(shape{co, c, 3, 3}, g), b = rnd<B>(shape{co}, g), g2 = rnd<B>(shape{co}, g, 0.5, 1.5);
    auto be2 = rnd<B>(shape{co}, g), m2 = rnd<B>(shape{co}, g), v2 = rnd<B>(shape{co}, g, 0.5, 2);
    useg::tensor<B> wf(wt.dims()), bf(shape{co}), y(shape{x.n(), co, x.h(), x.w()});
    ops::fold_batch_norm(ctx, co, static_cast<std::size_t>(c) * 9, wt.data(), b.data(), g2.data(), be2.data(), m2.data(), v2.data(),
                         1e-5, wf.data(), bf.data());
    put(o, "folded_w", wf);
    put(o, "folded_b", bf);
    ops::conv2d_forward_relu(ctx, cd, x.data(), wf.data(), bf.data(), y.data());
    put(o, "folded_conv_relu", y);
  }
  return o;
}
template <class B>
outputs activations_case(useg::context<B>& ctx, useg::rng& g) {
  outputs o;
  auto x = rnd<B>(shape{between(g, 1, 3), between(g, 1, 8), between(g, 1, 20), between(g, 1, 20)}, g, -8, 8);
  auto gy = rnd<B>(x.dims(), g);
  useg::relu<B> r;
  useg::sigmoid<B> sg;
  put(o, "relu_y", r.forward(ctx, x));
  put(o, "relu_gx", r.backward(ctx, gy));
  put(o, "sigmoid_y", sg.forward(ctx, x));
  put(o, "sigmoid_gx", sg.backward(ctx, gy));
  return o;
}
template <class B>
outputs maxpool_case(useg::context<B>& ctx, useg::rng& g, bool ties) {
  outputs o;
  const shape s{between(g, 1, 3), between(g, 1, 6), between(g, 2, 17), between(g, 2, 17)};
  std::vector<float> v = random_values(s.numel(), g);
  if (ties)  // few distinct values: many ties inside the windows
    for (auto& f : v) f = static_cast<float>(static_cast<int>(g.below(3)));
  auto x = useg::tensor<B>::from_host(s, v);
  useg::max_pool2x2<B> mp;
  put(o, "y", mp.forward(ctx, x));
  auto gy = rnd<B>(mp.output().dims(), g);
  put(o, "gx", mp.backward(ctx, gy));
  return o;
}
template <class B>
outputs upsample_case(useg::context<B>& ctx, useg::rng& g) {
  outputs o;
  auto x = rnd<B>(shape{between(g, 1, 3), between(g, 1, 6), between(g, 1, 11), between(g, 1, 11)}, g);
  useg::upsample2x<B> up;
  put(o, "y", up.forward(ctx, x));
  auto gy = rnd<B>(up.output().dims(), g);
  put(o, "gx", up.backward(ctx, gy));
  return o;
}
template <class B>
outputs elementwise_case(useg::context<B>& ctx, useg::rng& g) {
  outputs o;
  const int n = between(g, 1, 3), h = between(g, 1, 12), w = between(g, 1, 12), ca = between(g, 1, 7), cb = between(g, 1, 7);
  auto a = rnd<B>(shape{n, ca, h, w}, g), b = rnd<B>(shape{n, cb, h, w}, g), a2 = rnd<B>(shape{n, ca, h, w}, g);
  useg::concat<B> cat;
  put(o, "concat_y", cat.forward(ctx, a, b));
  auto gy = rnd<B>(cat.output().dims(), g);
  auto [ga, gb] = cat.backward(ctx, gy);
  put(o, "concat_ga", ga);
  put(o, "concat_gb", gb);
  useg::add<B> ad;
  put(o, "add_y", ad.forward(ctx, a, a2));
  auto psi = rnd<B>(shape{n, 1, h, w}, g, 0, 1);
  useg::gate_multiply<B> gm;
  put(o, "gate_y", gm.forward(ctx, b, psi));
  auto gz = rnd<B>(b.dims(), g);
  auto [gx, gpsi] = gm.backward(ctx, gz);
  put(o, "gate_gx", gx);
  put(o, "gate_gpsi", gpsi);
  return o;
}
template <class B>
outputs memory_ops_case(useg::context<B>& ctx, useg::rng& g) {
  using ops = useg::ops<B>;
  outputs o;
  const int planes = between(g, 1, 6), h = between(g, 1, 9), w = between(g, 1, 9);
  const int H = h + between(g, 0, 7), W = w + between(g, 0, 7), top = between(g, 0, H - h), left = between(g, 0, W - w);
  auto x = rnd<B>(shape{planes, h, w}, g);
  useg::tensor<B> y(shape{planes, H, W}), back(shape{planes, h, w});
  ops::pad2d(ctx, static_cast<std::size_t>(planes), h, w, H, W, top, left, x.data(), y.data());
  put(o, "pad", y);
  auto big = rnd<B>(shape{planes, H, W}, g);
  ops::crop2d(ctx, static_cast<std::size_t>(planes), H, W, h, w, top, left, big.data(), back.data());
  put(o, "crop", back);
  const std::size_t n = static_cast<std::size_t>(between(g, 1, 300000));
  auto a = rnd<B>(shape{static_cast<int>(n)}, g), b = rnd<B>(shape{static_cast<int>(n)}, g);
  put_scalar(o, "sum", ops::sum(ctx, a.data(), n));
  put_scalar(o, "dot", ops::dot(ctx, a.data(), b.data(), n));
  ops::accumulate(ctx, a.data(), b.data(), n);
  put(o, "accumulate", a);
  ops::scale(ctx, a.data(), 0.37f, n);
  put(o, "scale", a);
  ops::fill(b.data(), n, -2.5f);
  put(o, "fill", b);
  ops::copy(b.data(), a.data(), n / 2);
  put(o, "copy", b);
  return o;
}
template <class B>
outputs losses_case(useg::context<B>& ctx, useg::rng& g) {
  using ops = useg::ops<B>;
  outputs o;
  const int n = between(g, 1, 3), h = between(g, 1, 16), w = between(g, 1, 16), c = between(g, 2, 5);
  auto x = rnd<B>(shape{n, 1, h, w}, g, -6, 6);
  std::vector<float> tv(x.size());
  for (auto& t : tv) t = g.uniform() < 0.3 ? 1.f : 0.f;
  auto t = useg::tensor<B>::from_host(x.dims(), tv);
  auto xm = rnd<B>(shape{n, c, h, w}, g, -6, 6);
  std::vector<float> iv(static_cast<std::size_t>(n) * h * w);
  for (auto& v : iv) v = static_cast<float>(g.below(static_cast<std::uint64_t>(c)));
  auto ti = useg::tensor<B>::from_host(shape{n, 1, h, w}, iv);
  useg::tensor<B> grad;
  put_scalar(o, "bce", useg::bce_with_logits_loss(ctx, x, t, &grad, 2.5));
  put(o, "bce_grad", grad);
  put_scalar(o, "dice", useg::dice_loss(ctx, x, t, &grad));
  put(o, "dice_grad", grad);
  put_scalar(o, "bce_dice", useg::bce_dice_loss(ctx, x, t, &grad, 0.7, 1.3, 1.5, 0.5));
  put(o, "bce_dice_grad", grad);
  put_scalar(o, "dice_multiclass", useg::dice_loss(ctx, xm, ti, &grad));
  put(o, "dice_multiclass_grad", grad);
  put_scalar(o, "cross_entropy", useg::cross_entropy_loss(ctx, xm, ti, &grad));
  put(o, "cross_entropy_grad", grad);
  useg::loss_options lo;
  lo.bce_weight = 0.6;
  lo.dice_weight = 1.4;
  put_scalar(o, "compute_loss_multiclass", useg::compute_loss(ctx, lo, xm, ti, &grad));
  put(o, "compute_loss_multiclass_grad", grad);
  // ops-level: the gradient is ADDED, scaled by weight
  auto acc = rnd<B>(x.dims(), g);
  put_scalar(o, "ops_bce", ops::bce_with_logits(ctx, x.data(), t.data(), x.size(), 0.5, acc.data(), 0.7));
  put_scalar(o, "ops_dice", ops::dice_binary(ctx, x.data(), t.data(), x.size(), 0.25, acc.data(), 1.3));
  put(o, "ops_accumulated_grad", acc);
  put_scalar(o, "indices_valid", ops::class_indices_valid(ctx, ti.data(), ti.size(), c) ? 1 : 0);
  put_scalar(o, "indices_valid_too_few_classes", ops::class_indices_valid(ctx, ti.data(), ti.size(), 1) ? 1 : 0);
  return o;
}
template <class B>
outputs optimizers_case(useg::context<B>& ctx, useg::rng& g) {
  outputs o;
  for (int which = 0; which < 4; ++which) {
    useg::param_store<B> s;
    const int n = between(g, 1, 70000);
    s.add_parameter("p", shape{n}, useg::init_kind::constant, 0);
    s.finalize(0);
    const auto p0 = random_values(static_cast<std::size_t>(n), g);
    s.flat_params().upload(p0.data());
    std::unique_ptr<useg::optimizer<B>> opt;
    if (which == 0) opt = std::make_unique<useg::sgd<B>>(s, ctx, useg::sgd_options{0.05, 0.0, 0.0, 0.0, false});
    if (which == 1) opt = std::make_unique<useg::sgd<B>>(s, ctx, useg::sgd_options{0.05, 0.9, 0.0, 1e-3, true});
    if (which == 2) opt = std::make_unique<useg::adam<B>>(s, ctx, useg::adam_options{1e-2, 0.9, 0.99, 1e-8, 1e-2, false});
    if (which == 3) opt = std::make_unique<useg::adamw<B>>(s, ctx);
    for (int step = 0; step < 3; ++step) {
      const auto gv = random_values(static_cast<std::size_t>(n), g);
      s.flat_grads().upload(gv.data());
      opt->step();
    }
    const std::string pre = std::string(opt->name()) + std::to_string(which) + "_";
    put(o, pre + "params", s.flat_params());
    for (auto& [name, t] : opt->state()) put(o, pre + name, *t);
  }
  return o;
}

// ---------------------------------------------------------------- blocks
template <class B, class Block, class Make>
outputs block_case(useg::context<B>& ctx, useg::rng& g, Make&& make, int cin, bool two_inputs, int gin = 0) {
  outputs o;
  useg::param_store<B> s;
  Block blk = make(s);
  s.finalize(g.next_u64());
  randomize_store(s, g);
  const int n = between(g, 1, 3), h = between(g, 2, 12), w = between(g, 2, 12);
  auto x = rnd<B>(shape{n, cin, h, w}, g);
  auto gsig = rnd<B>(shape{n, gin > 0 ? gin : 1, h, w}, g);
  for (bool train : {true, false}) {
    s.set_training(train);
    const std::string pre = train ? "train_" : "eval_";
    if constexpr (requires { blk.forward(ctx, gsig, x); }) {
      put(o, pre + "y", blk.forward(ctx, gsig, x));
      auto gy = rnd<B>(blk.output().dims(), g);
      auto [gg, gx] = blk.backward(ctx, gy);
      put(o, pre + "gg", gg);
      put(o, pre + "gx", gx);
    } else {
      put(o, pre + "y", blk.forward(ctx, x));
      auto gy = rnd<B>(blk.output().dims(), g);
      put(o, pre + "gx", blk.backward(ctx, gy));
    }
    put_store(o, pre, s);
  }
  (void)two_inputs;
  return o;
}

// ---------------------------------------------------------------- models
/// Train mode at a size that needs padding, then eval mode, then three SGD steps on a
/// combined loss; all outputs, input gradients, parameter gradients and buffers.
template <class Model, class B = typename Model::backend>
void model_run(outputs& o, const std::string& tag, useg::context<B>& ctx, useg::rng& g, useg::unet_config cfg) {
  Model m(cfg);
  m.set_context(ctx);
  const int In = Model::in_channels, Cls = Model::classes;
  auto x = rnd<B>(shape{2, In, 18, 14}, g, 0, 1);
  m.train();
  m.zero_grad();
  put(o, tag + "train_logits", m.forward(x));
  auto gy = rnd<B>(shape{2, Cls, 18, 14}, g);
  put(o, tag + "train_input_grad", m.backward(gy, true));
  put(o, tag + "train_param_grads", m.params().flat_grads());
  put(o, tag + "train_buffers", m.params().flat_buffers());
  m.eval();
  m.zero_grad();
  auto xe = rnd<B>(shape{1, In, 16, 16}, g, 0, 1);
  put(o, tag + "eval_logits", m.forward(xe));
  auto gye = rnd<B>(shape{1, Cls, 16, 16}, g);
  put(o, tag + "eval_input_grad", m.backward(gye, true));
  put(o, tag + "eval_param_grads", m.params().flat_grads());
  // three SGD steps with momentum (linear in the gradients, so differences stay proportionate)
  m.train();
  useg::sgd<B> opt(m.params(), ctx, useg::sgd_options{0.01, 0.9});
  std::vector<float> tv(static_cast<std::size_t>(2) * 18 * 14);
  for (auto& t : tv) t = Cls == 1 ? (g.uniform() < 0.3 ? 1.f : 0.f) : static_cast<float>(g.below(Cls));
  auto target = useg::tensor<B>::from_host(shape{2, 1, 18, 14}, tv);
  useg::tensor<B> grad;
  useg::loss_options lo;
  for (int step = 0; step < 3; ++step) {
    m.zero_grad();
    put_scalar(o, tag + "loss" + std::to_string(step), useg::compute_loss(ctx, lo, m.forward(x), target, &grad));
    m.backward(grad);
    opt.step();
  }
  put(o, tag + "trained_params", m.params().flat_params());
  put(o, tag + "trained_buffers", m.params().flat_buffers());
}

template <class B, template <class, int, int, class, class> class Skel, class Enc, class Gate>
outputs model_case(useg::context<B>& ctx, useg::rng& g) {
  outputs o;
  useg::unet_config cfg;
  cfg.width = 4;
  cfg.depth = 3;
  cfg.t = 2;
  cfg.seed = g.next_u64();
  model_run<Skel<B, 3, 1, Enc, Gate>>(o, "a_", ctx, g, cfg);
  // default depth 4, transposed up-convolution, one input channel, two classes
  cfg.width = 2;
  cfg.depth = 4;
  cfg.t = 1;
  cfg.up = useg::up_kind::transpose;
  cfg.seed = g.next_u64();
  model_run<Skel<B, 1, 2, Enc, Gate>>(o, "b_", ctx, g, cfg);
  return o;
}

}  // namespace detail

/// Run case `name` on backend B with random data drawn from `seed`.
template <class B>
outputs run(const std::string& name, std::uint64_t seed, useg::context<B>& ctx) {
  using namespace detail;
  useg::rng g(seed);
  if (name == "conv3x3") return conv_case<B, 3, true>(ctx, g);
  if (name == "conv1x1") return conv_case<B, 1, true>(ctx, g);
  if (name == "conv3x3_nobias") return conv_case<B, 3, false>(ctx, g);
  if (name == "conv5x5") return conv_case<B, 5, true>(ctx, g);
  if (name == "upconv2x2") return upconv_case<B>(ctx, g);
  if (name == "batch_norm") return batch_norm_case<B>(ctx, g);
  if (name == "activations") return activations_case<B>(ctx, g);
  if (name == "maxpool") return maxpool_case<B>(ctx, g, false);
  if (name == "maxpool_ties") return maxpool_case<B>(ctx, g, true);
  if (name == "upsample") return upsample_case<B>(ctx, g);
  if (name == "elementwise") return elementwise_case<B>(ctx, g);
  if (name == "memory_ops") return memory_ops_case<B>(ctx, g);
  if (name == "losses") return losses_case<B>(ctx, g);
  if (name == "optimizers") return optimizers_case<B>(ctx, g);
  const int ci = between(g, 1, 6), co = between(g, 1, 6);
  if (name == "conv_block")
    return block_case<B, useg::conv_block<B>>(ctx, g, [&](auto& s) { return useg::conv_block<B>(s, "Conv1", ci, co); }, ci, false);
  if (name == "recurrent_block")
    return block_case<B, useg::recurrent_block<B>>(ctx, g, [&](auto& s) { return useg::recurrent_block<B>(s, "R", co, 2); }, co,
                                                   false);
  if (name == "rrcnn_block")
    return block_case<B, useg::rrcnn_block<B>>(ctx, g, [&](auto& s) { return useg::rrcnn_block<B>(s, "RRCNN1", ci, co, 2); }, ci,
                                               false);
  if (name == "attention_gate")
    return block_case<B, useg::attention_gate<B>>(
        ctx, g, [&](auto& s) { return useg::attention_gate<B>(s, "Att2", co, ci, 2); }, ci, true, co);
  if (name == "up_conv_upsample")
    return block_case<B, useg::up_conv<B>>(
        ctx, g, [&](auto& s) { return useg::up_conv<B>(s, "Up2", ci, co, useg::up_kind::upsample); }, ci, false);
  if (name == "up_conv_transpose")
    return block_case<B, useg::up_conv<B>>(
        ctx, g, [&](auto& s) { return useg::up_conv<B>(s, "Up2", ci, co, useg::up_kind::transpose); }, ci, false);
  if (name == "unet") return model_case<B, useg::unet_skeleton, useg::conv_encoder, useg::identity_skip>(ctx, g);
  if (name == "attention_unet") return model_case<B, useg::unet_skeleton, useg::conv_encoder, useg::attention_skip>(ctx, g);
  if (name == "r2unet") return model_case<B, useg::unet_skeleton, useg::rrcnn_encoder, useg::identity_skip>(ctx, g);
  if (name == "ar2unet") return model_case<B, useg::unet_skeleton, useg::rrcnn_encoder, useg::attention_skip>(ctx, g);
  throw std::invalid_argument("eq::run: unknown case " + name);
}

/// Defined in equivalence_cuda.cu: run<useg::cuda> on a strict-FP32, deterministic context.
outputs run_cuda(const std::string& name, std::uint64_t seed);

}  // namespace eq
