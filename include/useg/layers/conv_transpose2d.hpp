// useg/layers/conv_transpose2d.hpp — 2×2 stride-2 transposed convolution
// (PyTorch nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)).
#pragma once
#include <string>

#include "useg/core/descriptors.hpp"
#include "useg/core/module.hpp"
#include "useg/core/params.hpp"
#include "useg/core/tensor.hpp"

namespace useg {

/// B: backend tag. Weight (cin, cout, 2, 2) and bias (cout), PyTorch layout and init.
template <class B>
class conv_transpose2x2 {
  USEG_CHECK_BACKEND(B);

 public:
  conv_transpose2x2() = default;
  conv_transpose2x2(param_store<B>& store, const std::string& name, int cin, int cout)
      : store_(&store), cin_(cin), cout_(cout) {
    if (cin <= 0 || cout <= 0) throw config_error("useg::conv_transpose2x2 '" + name + "': channel counts must be positive");
    const int fan_in = cout * 4;  // PyTorch computes fan_in from weight.size(1) * k * k
    w_ = store.add_parameter(join_name(name, "weight"), shape{cin, cout, 2, 2}, init_kind::kaiming_uniform, 0, fan_in);
    b_ = store.add_parameter(join_name(name, "bias"), shape{cout}, init_kind::fan_in_uniform, 0, fan_in);
  }
  conv_transpose2x2(conv_transpose2x2&&) noexcept = default;
  conv_transpose2x2& operator=(conv_transpose2x2&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) {
    require_nchw(x, cin_, "useg::conv_transpose2x2::forward");
    x_ = &x;
    d_ = upconv_desc{x.n(), cin_, cout_, x.h(), x.w()};
    y_.resize(x.n(), cout_, 2 * x.h(), 2 * x.w());
    ops<B>::upconv2x2_forward(ctx, d_, x.data(), store_->param(w_), store_->param(b_), y_.data());
    return y_;
  }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy) {
    ops<B>::upconv2x2_backward_weights(ctx, d_, x_->data(), gy.data(), store_->grad(w_), store_->grad(b_));
    gx_.resize(x_->dims());
    ops<B>::upconv2x2_backward_data(ctx, d_, store_->param(w_), gy.data(), gx_.data());
    return gx_;
  }
  const tensor<B>& output() const { return y_; }
  /// Free the output once nothing reads it (inference).
  void release_output() { y_ = tensor<B>(); }
  double flops() const { return 2.0 * d_.n * static_cast<double>(d_.hw()) * d_.cin * d_.cout * 4; }

 private:
  param_store<B>* store_ = nullptr;
  int cin_ = 0, cout_ = 0;
  param_ref w_, b_;
  upconv_desc d_{};
  const tensor<B>* x_ = nullptr;
  tensor<B> y_, gx_;
};

}  // namespace useg
