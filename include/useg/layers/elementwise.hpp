// useg/layers/elementwise.hpp — channel concat, add, per-pixel gating multiply.
#pragma once
#include <utility>

#include "useg/core/module.hpp"
#include "useg/core/tensor.hpp"

namespace useg {

namespace detail {
inline void require_same_spatial(const shape& a, const shape& b, const char* who) {
  if (a.rank != 4 || b.rank != 4 || a.n() != b.n() || a.h() != b.h() || a.w() != b.w())
    throw shape_error(std::string(who) + ": batch/spatial sizes differ: " + a.str() + " vs " + b.str());
}
template <class B>
void require_same_spatial(const tensor<B>& a, const tensor<B>& b, const char* who) {
  require_nchw(a, -1, who);
  require_nchw(b, -1, who);
  require_same_spatial(a.dims(), b.dims(), who);
}
}  // namespace detail

/// torch.cat((a, b), dim=1).
template <class B>
class concat {
  USEG_CHECK_BACKEND(B);

 public:
  const tensor<B>& forward(context<B>& ctx, const tensor<B>& a, const tensor<B>& b) {
    detail::require_same_spatial(a, b, "useg::concat::forward");
    ad_ = a.dims();
    bd_ = b.dims();
    y_.resize(a.n(), a.c() + b.c(), a.h(), a.w());
    ops<B>::concat_channels(ctx, a.n(), a.c(), b.c(), a.dims().hw(), a.data(), b.data(), y_.data());
    return y_;
  }
  /// The same output built one input at a time, so that the caller may free (or not yet hold)
  /// the other: begin() with both shapes, then fill_a() and fill_b() in either order.
  void begin(const shape& a, const shape& b) {
    detail::require_same_spatial(a, b, "useg::concat::begin");
    ad_ = a;
    bd_ = b;
    y_.resize(a.n(), a.c() + b.c(), a.h(), a.w());
  }
  void fill_a(context<B>& ctx, const tensor<B>& a) {
    check_fill(a, ad_, "fill_a");
    ops<B>::concat_channels(ctx, ad_.n(), ad_.c(), bd_.c(), ad_.hw(), a.data(), nullptr, y_.data());
  }
  void fill_b(context<B>& ctx, const tensor<B>& b) {
    check_fill(b, bd_, "fill_b");
    ops<B>::concat_channels(ctx, ad_.n(), ad_.c(), bd_.c(), ad_.hw(), nullptr, b.data(), y_.data());
  }
  /// Returns (dL/da, dL/db).
  std::pair<const tensor<B>&, const tensor<B>&> backward(context<B>& ctx, const tensor<B>& gy) {
    ga_.resize(ad_);
    gb_.resize(bd_);
    ops<B>::split_channels(ctx, ad_.n(), ad_.c(), bd_.c(), ad_.hw(), gy.data(), ga_.data(), gb_.data());
    return {ga_, gb_};
  }
  const tensor<B>& output() const { return y_; }
  /// Free the two gradients of the last backward once they are consumed.
  void release_grads() {
    ga_ = tensor<B>();
    gb_ = tensor<B>();
  }
  /// Free the gradient of the second input only (the first one is still to be consumed).
  void release_grad_b() { gb_ = tensor<B>(); }
  /// Free the output once nothing reads it any more.
  void release_output() { y_ = tensor<B>(); }

 private:
  void check_fill(const tensor<B>& x, const shape& want, const char* who) const {
    if (x.dims() != want || y_.empty())
      throw shape_error(std::string("useg::concat::") + who + ": input " + x.dims().str() + " does not match begin()'s " +
                        want.str());
  }
  shape ad_{}, bd_{};
  tensor<B> y_, ga_, gb_;
};

/// y = a + b (same shapes). The gradient passes through unchanged to both inputs.
template <class B>
class add {
  USEG_CHECK_BACKEND(B);

 public:
  const tensor<B>& forward(context<B>& ctx, const tensor<B>& a, const tensor<B>& b) {
    if (a.dims() != b.dims())
      throw shape_error("useg::add::forward: shapes differ: " + a.dims().str() + " vs " + b.dims().str());
    y_.resize(a.dims());
    ops<B>::add(ctx, a.data(), b.data(), y_.data(), a.size());
    return y_;
  }
  const tensor<B>& output() const { return y_; }

 private:
  tensor<B> y_;
};

/// y = x * psi, psi (n, 1, h, w) broadcast over the channels of x (the attention gate's output).
template <class B>
class gate_multiply {
  USEG_CHECK_BACKEND(B);

 public:
  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x, const tensor<B>& psi) {
    detail::require_same_spatial(x, psi, "useg::gate_multiply::forward");
    if (psi.c() != 1) throw shape_error("useg::gate_multiply::forward: psi must have 1 channel, got " + psi.dims().str());
    x_ = &x;
    psi_ = &psi;
    y_.resize(x.dims());
    ops<B>::gate_forward(ctx, x.n(), x.c(), x.dims().hw(), x.data(), psi.data(), y_.data());
    return y_;
  }
  /// Returns (dL/dx, dL/dpsi).
  std::pair<const tensor<B>&, const tensor<B>&> backward(context<B>& ctx, const tensor<B>& gy) {
    gx_.resize(x_->dims());
    gpsi_.resize(psi_->dims());
    ops<B>::gate_backward(ctx, x_->n(), x_->c(), x_->dims().hw(), x_->data(), psi_->data(), gy.data(), gx_.data(),
                          gpsi_.data());
    return {gx_, gpsi_};
  }
  const tensor<B>& output() const { return y_; }

 private:
  const tensor<B>* x_ = nullptr;
  const tensor<B>* psi_ = nullptr;
  tensor<B> y_, gx_, gpsi_;
};

}  // namespace useg
