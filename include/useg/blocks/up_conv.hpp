// useg/blocks/up_conv.hpp — the decoder's up-convolution (up_conv of network.py):
//   up_kind::upsample  (default): nearest ×2 upsample + conv3×3 + BN + ReLU   (names up.1, up.2)
//   up_kind::transpose (option):  ConvTranspose2d(k=2, s=2)                 (names up.weight/bias)
//
// Memory: the upsampled tensor is dropped after the forward and recomputed for the backward,
// where it is freed again once the weight gradient has read it.
#pragma once
#include <string>

#include "useg/blocks/cbr_unit.hpp"
#include "useg/blocks/conv_bn_relu.hpp"
#include "useg/layers/resample.hpp"
#include "useg/layers/conv_transpose2d.hpp"

namespace useg {

enum class up_kind { upsample, transpose };

inline const char* to_string(up_kind k) { return k == up_kind::upsample ? "upsample" : "transpose"; }

template <class B>
class up_conv {
 public:
  up_conv() = default;
  up_conv(param_store<B>& store, const std::string& name, int cin, int cout, up_kind kind) : kind_(kind) {
    if (kind == up_kind::upsample)
      cbr_ = detail::cbr_unit<B, 3>(store, name + ".up.1", name + ".up.2", cin, cout);
    else
      tconv_ = conv_transpose2x2<B>(store, name + ".up", cin, cout);
  }
  up_conv(up_conv&&) noexcept = default;
  up_conv& operator=(up_conv&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) {
    if (kind_ == up_kind::transpose) return tconv_.forward(ctx, x);
    require_nchw(x, -1, "useg::upsample2x::forward");
    x_ = &x;
    upsample(ctx);
    const tensor<B>& y = cbr_.forward(ctx, up_);
    up_ = tensor<B>();  // recomputed for the backward
    return y;
  }
  /// Inference (eval mode; no backward may follow): forward(x), with the upsampled input never
  /// built where the backend's convolution reads x through the upsampling (cbr_unit::
  /// forward_upsampled: the same arithmetic).
  const tensor<B>& forward_inference(context<B>& ctx, const tensor<B>& x) {
    if (kind_ == up_kind::upsample && cbr_.reads_upsampled(x)) {
      x_ = &x;
      up_ = tensor<B>();
      return cbr_.forward_upsampled(ctx, x);
    }
    return forward(ctx, x);
  }
  /// gy_consumed() runs as soon as gy is no longer needed (the caller may free it there).
  template <detail::hook GyConsumed = detail::no_op>
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy, GyConsumed&& gy_consumed = {}) {
    if (kind_ == up_kind::transpose) {
      const tensor<B>& g = tconv_.backward(ctx, gy);
      gy_consumed();
      return g;
    }
    upsample(ctx);
    // The upsampled input serves the weight gradient only: freed before the input gradient is
    // allocated.
    const tensor<B>& g = cbr_.backward(ctx, gy, true, gy_consumed, [this] { up_ = tensor<B>(); });
    gx_.resize(x_->dims());
    ops<B>::upsample2x_backward(ctx, static_cast<std::size_t>(x_->n()) * x_->c(), x_->h(), x_->w(), g.data(), gx_.data());
    cbr_.release_grad();
    return gx_;
  }
  const tensor<B>& output() const { return kind_ == up_kind::upsample ? cbr_.output() : tconv_.output(); }
  /// The output's shape (also while it is dropped).
  shape output_dims() const {
    if (kind_ == up_kind::transpose) return tconv_.output().dims();
    return cbr_.output_dims();
  }
  /// Free the output once its consumers have run; restore_output() recomputes it bit-identically
  /// (upsample kind; the transposed convolution keeps its output).
  void drop_output() {
    if (kind_ == up_kind::upsample) cbr_.drop_output();
  }
  void restore_output(context<B>& ctx) {
    if (kind_ == up_kind::upsample && !cbr_.has_output()) {
      if (!cbr_.has_conv_output()) upsample(ctx);  // its convolution's input, dropped after the forward
      cbr_.restore_output(ctx);
      up_ = tensor<B>();
    }
  }
  /// Free the input gradient returned by the last backward once it is consumed.
  void release_grad() { gx_ = tensor<B>(); }
  /// Inference: free what only a backward would need (the output stays) / everything.
  void release_state() {
    cbr_.release_state();
    up_ = tensor<B>();
    gx_ = tensor<B>();
  }
  void release_all() {
    release_state();
    cbr_.release_all();
    tconv_.release_output();
  }
  double flops() const { return kind_ == up_kind::upsample ? cbr_.flops() : tconv_.flops(); }

 private:
  void upsample(context<B>& ctx) {
    up_.resize(x_->n(), x_->c(), 2 * x_->h(), 2 * x_->w());
    ops<B>::upsample2x_forward(ctx, static_cast<std::size_t>(x_->n()) * x_->c(), x_->h(), x_->w(), x_->data(), up_.data());
  }

  up_kind kind_ = up_kind::upsample;
  detail::cbr_unit<B, 3> cbr_;
  conv_transpose2x2<B> tconv_;
  const tensor<B>* x_ = nullptr;
  tensor<B> up_, gx_;
};

}  // namespace useg
