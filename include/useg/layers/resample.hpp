// useg/layers/resample.hpp — 2×2 max pooling (stride 2) and nearest ×2 upsampling.
#pragma once
#include "useg/core/module.hpp"
#include "useg/core/tensor.hpp"

namespace useg {

/// nn.MaxPool2d(kernel_size=2, stride=2): floor on odd sizes; ties go to the first maximum.
template <class B>
class max_pool2x2 {
  USEG_CHECK_BACKEND(B);

 public:
  max_pool2x2() = default;
  max_pool2x2(max_pool2x2&&) noexcept = default;
  max_pool2x2& operator=(max_pool2x2&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) {
    require_nchw(x, -1, "useg::max_pool2x2::forward");
    if (x.h() < 2 || x.w() < 2) throw shape_error("useg::max_pool2x2::forward: input " + x.dims().str() + " is smaller than 2×2");
    x_ = &x;
    y_.resize(x.n(), x.c(), x.h() / 2, x.w() / 2);
    ops<B>::maxpool2x2_forward(ctx, static_cast<std::size_t>(x.n()) * x.c(), x.h(), x.w(), x.data(), y_.data());
    return y_;
  }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy) {
    gx_.resize(x_->dims());
    ops<B>::maxpool2x2_backward(ctx, static_cast<std::size_t>(x_->n()) * x_->c(), x_->h(), x_->w(), x_->data(),
                                gy.data(), gx_.data());
    return gx_;
  }
  const tensor<B>& output() const { return y_; }
  /// Free the input gradient of the last backward once it is consumed.
  void release_grad() { gx_ = tensor<B>(); }
  /// Free the output once nothing reads it (inference).
  void release_output() { y_ = tensor<B>(); }

 private:
  const tensor<B>* x_ = nullptr;
  tensor<B> y_, gx_;
};

/// nn.Upsample(scale_factor=2) (mode 'nearest').
template <class B>
class upsample2x {
  USEG_CHECK_BACKEND(B);

 public:
  upsample2x() = default;
  upsample2x(upsample2x&&) noexcept = default;
  upsample2x& operator=(upsample2x&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) {
    require_nchw(x, -1, "useg::upsample2x::forward");
    xdims_ = x.dims();
    y_.resize(x.n(), x.c(), 2 * x.h(), 2 * x.w());
    ops<B>::upsample2x_forward(ctx, static_cast<std::size_t>(x.n()) * x.c(), x.h(), x.w(), x.data(), y_.data());
    return y_;
  }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy) {
    gx_.resize(xdims_);
    ops<B>::upsample2x_backward(ctx, static_cast<std::size_t>(xdims_.n()) * xdims_.c(), xdims_.h(), xdims_.w(),
                                gy.data(), gx_.data());
    return gx_;
  }
  const tensor<B>& output() const { return y_; }

 private:
  shape xdims_{};
  tensor<B> y_, gx_;
};

}  // namespace useg
