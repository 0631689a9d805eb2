// useg/blocks/attention_gate.hpp — additive attention gate (Oktay et al.; Attention_block of
// network.py):
//   g1 = BN(W_g g), x1 = BN(W_x x)        (1×1 convs with bias, F_int channels)
//   psi = sigmoid(BN(psi_conv(ReLU(g1 + x1))))   (1 channel)
//   out = x * psi
// Names: W_g.0/W_g.1, W_x.0/W_x.1, psi.0/psi.1.
//
// Memory: between forward and backward it keeps only the one-channel psi path (its convolution
// output and psi) and the batch norms' statistics. The backward recomputes the two F_int-channel
// 1×1 convolutions from g and x (which must be alive again then) and ReLU(g1 + x1) from them,
// bit-identical to the forward's: 3·F_int channels at full resolution not held through the
// forward and backward of the layers between (about 2% more step time, 74 MiB less at the
// training peak of Attention U-Net width 64, batch 8 at 128²). The output may be dropped once
// consumed and recomputed (drop_output / restore_output). All gradients except the two it
// returns are transient; the backward writes the batch norms' gradients over the recomputed
// convolution outputs.
#pragma once
#include <string>
#include <utility>

#include "useg/blocks/cbr_unit.hpp"
#include "useg/layers/elementwise.hpp"

namespace useg {

template <class B>
class attention_gate {
 public:
  static constexpr double eps = 1e-5;
  static constexpr double momentum = 0.1;

  attention_gate() = default;
  /// f_g: channels of the gating (decoder) signal; f_l: channels of the skip features; f_int: inner channels.
  attention_gate(param_store<B>& store, const std::string& name, int f_g, int f_l, int f_int) : store_(&store) {
    if (f_int < 1) throw config_error("useg::attention_gate '" + name + "': F_int must be >= 1 (base width too small)");
    wg_ = detail::conv_params(store, name + ".W_g.0", f_g, f_int, 1);
    bng_ = detail::bn_params(store, name + ".W_g.1", f_int);
    wx_ = detail::conv_params(store, name + ".W_x.0", f_l, f_int, 1);
    bnx_ = detail::bn_params(store, name + ".W_x.1", f_int);
    wp_ = detail::conv_params(store, name + ".psi.0", f_int, 1, 1);
    bnp_ = detail::bn_params(store, name + ".psi.1", 1);
  }
  attention_gate(attention_gate&&) noexcept = default;
  attention_gate& operator=(attention_gate&&) noexcept = default;

  /// g: decoder signal, x: skip features (same batch and spatial size). Returns x * psi.
  const tensor<B>& forward(context<B>& ctx, const tensor<B>& g, const tensor<B>& x) {
    detail::require_same_spatial(g, x, "useg::attention_gate::forward");
    require_nchw(g, wg_.cin, "useg::conv2d::forward");
    require_nchw(x, wx_.cin, "useg::conv2d::forward");
    g_ = &g;
    x_ = &x;
    train_ = store_->training();
    const int n = x.n(), h = x.h(), w = x.w(), fi = wg_.cout;
    dg_ = conv_desc{n, wg_.cin, fi, h, w, 1};
    dx_ = conv_desc{n, wx_.cin, fi, h, w, 1};
    dp_ = conv_desc{n, fi, 1, h, w, 1};
    bd_ = bn_desc{n, fi, x.dims().hw(), eps, momentum};
    bdp_ = bn_desc{n, 1, x.dims().hw(), eps, momentum};
    if (train_ && n * x.dims().hw() < 2)
      throw shape_error("useg::batch_norm2d::forward: train mode needs more than one value per channel (input " +
                        x.dims().str() + "); use a larger batch or input, or eval mode");
    psi_.resize(n, 1, h, w);
    if constexpr (has_fused_eval<B>) {
      if (!train_) {
        fused_eval_psi(ctx);
        gate(ctx);
        return out_;
      }
    }
    inner(ctx, true);
    zp_.resize(n, 1, h, w);
    ops<B>::conv2d_forward(ctx, dp_, s_.data(), P(wp_.w), P(wp_.b), zp_.data());
    release_inner();
    bn_forward(ctx, bnp_, bdp_, zp_, psi_, sp_);
    ops<B>::sigmoid_forward(ctx, psi_.data(), psi_.data(), psi_.size());
    gate(ctx);
    return out_;
  }
  /// Returns (dL/dg, dL/dx).
  std::pair<const tensor<B>&, const tensor<B>&> backward(context<B>& ctx, const tensor<B>& gy) {
    if (!x_) throw shape_error("useg::attention_gate::backward: called before forward");
    inner(ctx, false);
    if (zp_.empty()) {  // the fused eval forward kept no psi convolution output
      zp_.resize(psi_.dims());
      ops<B>::conv2d_forward(ctx, dp_, s_.data(), P(wp_.w), P(wp_.b), zp_.data());
    }
    const int n = x_->n(), c = x_->c();
    const std::size_t hw = x_->dims().hw();
    gx_.resize(x_->dims());
    tensor<B> gpsi(psi_.dims()), t(psi_.dims());
    ops<B>::gate_backward(ctx, n, c, hw, x_->data(), psi_.data(), gy.data(), gx_.data(), gpsi.data());
    ops<B>::sigmoid_backward(ctx, psi_.data(), gpsi.data(), t.data(), t.size());
    bn_backward(ctx, bnp_, bdp_, sp_, zp_, t, gpsi);  // gpsi: dL/dzp
    t = tensor<B>();
    tensor<B> gs(s_.dims());
    ops<B>::conv2d_backward_weights(ctx, dp_, s_.data(), gpsi.data(), G(wp_.w), G(wp_.b));
    ops<B>::conv2d_backward_data(ctx, dp_, P(wp_.w), gpsi.data(), gs.data());
    gpsi = tensor<B>();
    ops<B>::relu_backward(ctx, s_.data(), gs.data(), gs.data(), gs.size());
    s_ = tensor<B>();
    {
      tensor<B> gz = std::move(zx_);  // dL/dzx, written over zx
      bn_backward(ctx, bnx_, bd_, sx_, gz, gs, gz);
      ops<B>::conv2d_backward_weights(ctx, dx_, x_->data(), gz.data(), G(wx_.w), G(wx_.b));
      tensor<B> g2(x_->dims());
      ops<B>::conv2d_backward_data(ctx, dx_, P(wx_.w), gz.data(), g2.data());
      ops<B>::accumulate(ctx, gx_.data(), g2.data(), gx_.size());
    }
    {
      tensor<B> gz = std::move(zg_);  // dL/dzg, written over zg
      bn_backward(ctx, bng_, bd_, sg_, gz, gs, gz);
      gs = tensor<B>();
      ops<B>::conv2d_backward_weights(ctx, dg_, g_->data(), gz.data(), G(wg_.w), G(wg_.b));
      gg_.resize(g_->dims());
      ops<B>::conv2d_backward_data(ctx, dg_, P(wg_.w), gz.data(), gg_.data());
    }
    return {gg_, gx_};
  }
  const tensor<B>& output() const { return out_; }
  /// Free the output once its consumers have run; restore_output() recomputes it (bit-identical,
  /// from the inputs and psi, which must still be alive).
  void drop_output() { out_ = tensor<B>(); }
  const tensor<B>& restore_output(context<B>& ctx) {
    if (out_.empty()) gate(ctx);
    return out_;
  }
  /// Inference: free what only a backward would need (the output stays) / everything.
  void release_state() {
    release_inner();
    zp_ = tensor<B>();
    psi_ = tensor<B>();
    release_grads();
  }
  void release_all() {
    release_state();
    out_ = tensor<B>();
  }
  /// Free the returned dL/dg once it is consumed.
  void release_gate_grad() { gg_ = tensor<B>(); }
  /// Free both returned gradients once they are consumed.
  void release_grads() {
    gg_ = tensor<B>();
    gx_ = tensor<B>();
  }
  double flops() const {
    const double pix = static_cast<double>(dx_.n) * static_cast<double>(dx_.hw());
    return wg_.flops(dg_) + wx_.flops(dx_) + wp_.flops(dp_) + 4.0 * pix * (2.0 * dg_.cout + 1.0) +
           3.0 * static_cast<double>(out_.size());
  }

 private:
  /// Backends with the ops of the fused eval forward (fused_eval_psi).
  template <class BB>
  static constexpr bool has_fused_eval = requires(context<BB>& c, const conv_desc& d, const typename BB::scalar* p,
                                                  typename BB::scalar* q) {
    ops<BB>::conv2d_forward_concat(c, d, p, 1, p, p, p, q, true);
    ops<BB>::fold_batch_norm(c, 1, std::size_t(1), p, p, p, p, p, p, 1e-5, q, q);
  };
  /// Eval mode: psi from the batch norms folded into the 1×1 convolutions, W_g g + W_x x as one
  /// convolution over the two inputs read in place (conv2d_forward_concat, ReLU as it stores),
  /// then the folded psi convolution and the sigmoid: no F_int-channel tensor besides s, no batch
  /// norm or add pass. The same function as the unfused path, rounded differently; a backward
  /// after it recomputes what it needs in the unfused way.
  void fused_eval_psi(context<B>& ctx) {
    const int fi = wg_.cout, cg = wg_.cin, cx = wx_.cin;
    const std::size_t row = static_cast<std::size_t>(cg) + cx;
    zp_ = tensor<B>();  // (zg_, zx_ are freed by every forward)
    for (auto [st, c] : {std::pair{&sg_, fi}, std::pair{&sx_, fi}, std::pair{&sp_, 1}}) {  // for an eval-mode backward
      st->mean.resize(shape{c});
      st->invstd.resize(shape{c});
    }
    tensor<B> wgf(shape{fi, cg}), wxf(shape{fi, cx}), bg(shape{fi}), bx(shape{fi}), wc(shape{fi, cg + cx, 1, 1});
    fold(ctx, wg_, bng_, fi, cg, wgf.data(), bg.data());
    fold(ctx, wx_, bnx_, fi, cx, wxf.data(), bx.data());
    for (int o = 0; o < fi; ++o) {
      ops<B>::copy(wc.data() + o * row, wgf.data() + static_cast<std::size_t>(o) * cg, static_cast<std::size_t>(cg));
      ops<B>::copy(wc.data() + o * row + cg, wxf.data() + static_cast<std::size_t>(o) * cx, static_cast<std::size_t>(cx));
    }
    ops<B>::accumulate(ctx, bg.data(), bx.data(), static_cast<std::size_t>(fi));
    s_.resize(x_->n(), fi, x_->h(), x_->w());
    const conv_desc dc{x_->n(), cg + cx, fi, x_->h(), x_->w(), 1};
    ops<B>::conv2d_forward_concat(ctx, dc, g_->data(), cg, x_->data(), wc.data(), bg.data(), s_.data(), true);
    tensor<B> wpf(shape{1, fi}), bpf(shape{1});
    fold(ctx, wp_, bnp_, 1, fi, wpf.data(), bpf.data());
    ops<B>::conv2d_forward(ctx, dp_, s_.data(), wpf.data(), bpf.data(), psi_.data());
    s_ = tensor<B>();
    ops<B>::sigmoid_forward(ctx, psi_.data(), psi_.data(), psi_.size());
  }
  void fold(context<B>& ctx, const detail::conv_params& c, const detail::bn_params& p, int cout, int per, typename B::scalar* wf,
            typename B::scalar* bf) {
    ops<B>::fold_batch_norm(ctx, cout, static_cast<std::size_t>(per), P(c.w), P(c.b), P(p.gamma), P(p.beta),
                            store_->buffer(p.rmean), store_->buffer(p.rvar), eps, wf, bf);
  }
  /// Per-BN saved statistics.
  struct bn_state {
    tensor<B> mean, invstd;
  };
  /// zg = W_g g, zx = W_x x, s = ReLU(BN(zg) + BN(zx)): in the forward with the batch norms'
  /// forward (statistics saved), in the backward again with those statistics (bit-identical).
  void inner(context<B>& ctx, bool forward) {
    zg_.resize(dg_.n, dg_.cout, dg_.h, dg_.w);
    zx_.resize(dx_.n, dx_.cout, dx_.h, dx_.w);
    ops<B>::conv2d_forward(ctx, dg_, g_->data(), P(wg_.w), P(wg_.b), zg_.data());
    ops<B>::conv2d_forward(ctx, dx_, x_->data(), P(wx_.w), P(wx_.b), zx_.data());
    tensor<B> g1(zg_.dims());
    s_.resize(zx_.dims());
    if (forward) {
      bn_forward(ctx, bng_, bd_, zg_, g1, sg_);
      bn_forward(ctx, bnx_, bd_, zx_, s_, sx_);
    } else {
      bn_reapply(ctx, bng_, bd_, zg_, g1, sg_);
      bn_reapply(ctx, bnx_, bd_, zx_, s_, sx_);
    }
    ops<B>::add(ctx, g1.data(), s_.data(), s_.data(), s_.size());
    ops<B>::relu_forward(ctx, s_.data(), s_.data(), s_.size());
  }
  void release_inner() {
    zg_ = tensor<B>();
    zx_ = tensor<B>();
    s_ = tensor<B>();
  }
  void gate(context<B>& ctx) {
    out_.resize(x_->dims());
    ops<B>::gate_forward(ctx, x_->n(), x_->c(), x_->dims().hw(), x_->data(), psi_.data(), out_.data());
  }
  typename B::scalar* P(param_ref r) { return store_->param(r); }
  typename B::scalar* G(param_ref r) { return store_->grad(r); }
  void bn_forward(context<B>& ctx, const detail::bn_params& p, const bn_desc& d, const tensor<B>& z, tensor<B>& y,
                  bn_state& st) {
    st.mean.resize(shape{p.c});
    st.invstd.resize(shape{p.c});
    if (train_) {
      ops<B>::batch_norm_forward_train(ctx, d, z.data(), P(p.gamma), P(p.beta), store_->buffer(p.rmean),
                                       store_->buffer(p.rvar), st.mean.data(), st.invstd.data(), y.data());
      ++store_->counter(p.nbt);
    } else {
      bn_reapply(ctx, p, d, z, y, st);  // eval mode: from the running statistics
    }
  }
  /// The forward's y again: train mode from the saved batch statistics, eval mode from the
  /// running ones (which only a forward changes).
  void bn_reapply(context<B>& ctx, const detail::bn_params& p, const bn_desc& d, const tensor<B>& z, tensor<B>& y,
                  const bn_state& st) {
    if (train_)
      ops<B>::batch_norm_apply(ctx, d, z.data(), P(p.gamma), P(p.beta), st.mean.data(), st.invstd.data(), y.data());
    else
      ops<B>::batch_norm_forward_eval(ctx, d, z.data(), P(p.gamma), P(p.beta), store_->buffer(p.rmean),
                                      store_->buffer(p.rvar), y.data());
  }
  void bn_backward(context<B>& ctx, const detail::bn_params& p, const bn_desc& d, bn_state& st, const tensor<B>& z,
                   const tensor<B>& gy, tensor<B>& gz) {
    if (!train_) {
      ops<B>::copy(st.mean.data(), store_->buffer(p.rmean), static_cast<std::size_t>(p.c));
      ops<B>::batch_norm_eval_invstd(ctx, p.c, eps, store_->buffer(p.rvar), st.invstd.data());
    }
    ops<B>::batch_norm_backward(ctx, d, train_, z.data(), gy.data(), P(p.gamma), st.mean.data(), st.invstd.data(),
                                gz.data(), G(p.gamma), G(p.beta));
  }

  param_store<B>* store_ = nullptr;
  detail::conv_params wg_, wx_, wp_;
  detail::bn_params bng_, bnx_, bnp_;
  conv_desc dg_{}, dx_{}, dp_{};
  bn_desc bd_{}, bdp_{};
  bool train_ = true;
  const tensor<B>* g_ = nullptr;
  const tensor<B>* x_ = nullptr;
  bn_state sg_, sx_, sp_;
  tensor<B> zg_, zx_, s_, zp_, psi_, out_, gg_, gx_;
};

}  // namespace useg
