// useg/blocks/attention_gate.hpp — additive attention gate (Oktay et al.; Attention_block of
// network.py):
//   g1 = BN(W_g g), x1 = BN(W_x x)        (1×1 convs with bias, F_int channels)
//   psi = sigmoid(BN(psi_conv(ReLU(g1 + x1))))   (1 channel)
//   out = x * psi
// Names: W_g.0/W_g.1, W_x.0/W_x.1, psi.0/psi.1.
#pragma once
#include <string>

#include "useg/layers/activation.hpp"
#include "useg/layers/batch_norm2d.hpp"
#include "useg/layers/conv2d.hpp"
#include "useg/layers/elementwise.hpp"

namespace useg {

template <class B>
class attention_gate {
 public:
  attention_gate() = default;
  /// f_g: channels of the gating (decoder) signal; f_l: channels of the skip features; f_int: inner channels.
  attention_gate(param_store<B>& store, const std::string& name, int f_g, int f_l, int f_int)
      : wg_(store, name + ".W_g.0", f_g, f_int), wg_bn_(store, name + ".W_g.1", f_int),
        wx_(store, name + ".W_x.0", f_l, f_int), wx_bn_(store, name + ".W_x.1", f_int),
        psi_(store, name + ".psi.0", f_int, 1), psi_bn_(store, name + ".psi.1", 1) {
    if (f_int < 1) throw config_error("useg::attention_gate '" + name + "': F_int must be >= 1 (base width too small)");
  }
  attention_gate(attention_gate&&) noexcept = default;
  attention_gate& operator=(attention_gate&&) noexcept = default;

  /// g: decoder signal, x: skip features (same batch and spatial size). Returns x * psi.
  const tensor<B>& forward(context<B>& ctx, const tensor<B>& g, const tensor<B>& x) {
    detail::require_same_spatial(g, x, "useg::attention_gate::forward");
    const tensor<B>& g1 = wg_bn_.forward(ctx, wg_.forward(ctx, g));
    const tensor<B>& x1 = wx_bn_.forward(ctx, wx_.forward(ctx, x));
    const tensor<B>& s = relu_.forward(ctx, sum_.forward(ctx, g1, x1));
    const tensor<B>& p = sig_.forward(ctx, psi_bn_.forward(ctx, psi_.forward(ctx, s)));
    return mul_.forward(ctx, x, p);
  }
  /// Returns (dL/dg, dL/dx).
  std::pair<const tensor<B>&, const tensor<B>&> backward(context<B>& ctx, const tensor<B>& gy) {
    auto [gx_direct, gpsi] = mul_.backward(ctx, gy);
    const tensor<B>& gs = psi_.backward(ctx, psi_bn_.backward(ctx, sig_.backward(ctx, gpsi)));
    const tensor<B>& ga = relu_.backward(ctx, gs);
    const tensor<B>& gg = wg_.backward(ctx, wg_bn_.backward(ctx, ga));
    const tensor<B>& gx2 = wx_.backward(ctx, wx_bn_.backward(ctx, ga));
    gx_.resize(gx2.dims());
    ops<B>::add(ctx, gx_direct.data(), gx2.data(), gx_.data(), gx_.size());
    return {gg, gx_};
  }
  const tensor<B>& output() const { return mul_.output(); }
  double flops() const {
    return wg_.flops() + wg_bn_.flops() + wx_.flops() + wx_bn_.flops() + psi_.flops() + psi_bn_.flops() +
           3.0 * static_cast<double>(mul_.output().size());
  }

 private:
  conv2d<B, 1, true> wg_;
  batch_norm2d<B> wg_bn_;
  conv2d<B, 1, true> wx_;
  batch_norm2d<B> wx_bn_;
  conv2d<B, 1, true> psi_;
  batch_norm2d<B> psi_bn_;
  add<B> sum_;
  relu<B> relu_;
  sigmoid<B> sig_;
  gate_multiply<B> mul_;
  tensor<B> gx_;
};

}  // namespace useg
