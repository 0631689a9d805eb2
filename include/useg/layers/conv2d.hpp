// useg/layers/conv2d.hpp — k×k same-padded stride-1 convolution (PyTorch nn.Conv2d(padding=k/2)).
#pragma once
#include <string>

#include "useg/core/descriptors.hpp"
#include "useg/core/module.hpp"
#include "useg/core/params.hpp"
#include "useg/core/tensor.hpp"
#include "useg/layers/elementwise.hpp"

namespace useg {

/// B: backend tag. K: odd kernel size (1 or 3 in the models). Bias: learnable bias.
template <class B, int K = 3, bool Bias = true>
class conv2d {
  USEG_CHECK_BACKEND(B);
  static_assert(K >= 1 && K % 2 == 1, "useg::conv2d<B, K>: K must be odd and positive (same padding, stride 1)");

 public:
  using scalar = typename B::scalar;
  static constexpr int kernel = K;

  conv2d() = default;
  /// Registers `name.weight` (cout, cin, K, K) and `name.bias` (cout) in `store`.
  conv2d(param_store<B>& store, const std::string& name, int cin, int cout)
      : store_(&store), cin_(cin), cout_(cout) {
    if (cin <= 0 || cout <= 0)
      throw config_error("useg::conv2d '" + name + "': channel counts must be positive (got " + std::to_string(cin) +
                         " -> " + std::to_string(cout) + ")");
    const int fan_in = cin * K * K;
    w_ = store.add_parameter(join_name(name, "weight"), shape{cout, cin, K, K}, init_kind::kaiming_uniform, 0, fan_in);
    if constexpr (Bias) b_ = store.add_parameter(join_name(name, "bias"), shape{cout}, init_kind::fan_in_uniform, 0, fan_in);
  }
  conv2d(share_params_t, const conv2d& o) : store_(o.store_), cin_(o.cin_), cout_(o.cout_), w_(o.w_), b_(o.b_) {}
  conv2d(conv2d&&) noexcept = default;
  conv2d& operator=(conv2d&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) {
    require_nchw(x, cin_, "useg::conv2d::forward");
    x_ = &x;
    d_ = conv_desc{x.n(), cin_, cout_, x.h(), x.w(), K};
    y_.resize(x.n(), cout_, x.h(), x.w());
    ops<B>::conv2d_forward(ctx, d_, x.data(), store_->param(w_), Bias ? store_->param(b_) : nullptr, y_.data());
    return y_;
  }
  /// Inference: y = conv(concat(a, b)) along channels, without building the concatenation where
  /// the backend can read it in place (conv2d_forward_concat). No backward may follow: the
  /// input it would need was never built.
  const tensor<B>& forward_concat(context<B>& ctx, const tensor<B>& a, const tensor<B>& b) {
    detail::require_same_spatial(a, b, "useg::conv2d::forward_concat");
    if (a.n() != b.n() || a.c() + b.c() != cin_)
      throw shape_error("useg::conv2d::forward_concat: inputs " + a.dims().str() + " and " + b.dims().str() +
                        " do not concatenate to " + std::to_string(cin_) + " channels");
    x_ = nullptr;
    d_ = conv_desc{a.n(), cin_, cout_, a.h(), a.w(), K};
    y_.resize(a.n(), cout_, a.h(), a.w());
    const scalar* bias = Bias ? store_->param(b_) : nullptr;
    if constexpr (requires(context<B>& c, const scalar* p, scalar* q) {
                    ops<B>::conv2d_forward_concat(c, conv_desc{}, p, 1, p, p, p, q);
                  }) {
      ops<B>::conv2d_forward_concat(ctx, d_, a.data(), a.c(), b.data(), store_->param(w_), bias, y_.data());
    } else {
      tensor<B> cat(shape::nchw(a.n(), cin_, a.h(), a.w()));
      ops<B>::concat_channels(ctx, a.n(), a.c(), b.c(), a.dims().hw(), a.data(), b.data(), cat.data());
      ops<B>::conv2d_forward(ctx, d_, cat.data(), store_->param(w_), bias, y_.data());
    }
    return y_;
  }
  /// Accumulates weight/bias gradients; returns dL/dx unless need_gx is false (first layer).
  /// input_consumed() runs once the weight gradient has read the input, before the input
  /// gradient is allocated (the caller may free the input there).
  template <detail::hook InputConsumed = detail::no_op>
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy, bool need_gx = true, InputConsumed&& input_consumed = {}) {
    if (!x_) throw shape_error("useg::conv2d::backward: no forward with an input to differentiate (forward_concat is inference only)");
    ops<B>::conv2d_backward_weights(ctx, d_, x_->data(), gy.data(), store_->grad(w_), Bias ? store_->grad(b_) : nullptr);
    const shape xd = x_->dims();
    input_consumed();
    if (need_gx) {
      gx_.resize(xd);
      ops<B>::conv2d_backward_data(ctx, d_, store_->param(w_), gy.data(), gx_.data());
    }
    return gx_;
  }
  const tensor<B>& output() const { return y_; }
  /// Free the input gradient of the last backward once its consumer has run (the memory goes
  /// back to the backend's allocator cache).
  void release_grad() { gx_ = tensor<B>(); }
  /// Free the output once nothing reads it (inference).
  void release_output() { y_ = tensor<B>(); }
  int in_channels() const { return cin_; }
  int out_channels() const { return cout_; }
  double flops() const { return 2.0 * d_.n * static_cast<double>(d_.hw()) * d_.cout * d_.cin * K * K; }

 private:
  param_store<B>* store_ = nullptr;
  int cin_ = 0, cout_ = 0;
  param_ref w_, b_;
  conv_desc d_{};
  const tensor<B>* x_ = nullptr;
  tensor<B> y_, gx_;
};

}  // namespace useg
