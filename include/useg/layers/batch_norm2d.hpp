// useg/layers/batch_norm2d.hpp — BatchNorm2d with PyTorch semantics: train mode normalizes with
// biased batch statistics and updates running mean / unbiased running var with momentum 0.1;
// eval mode uses the running statistics. eps = 1e-5.
#pragma once
#include <string>

#include "useg/core/descriptors.hpp"
#include "useg/core/module.hpp"
#include "useg/core/params.hpp"
#include "useg/core/tensor.hpp"

namespace useg {

/// B: backend tag. Registers weight, bias (parameters), running_mean, running_var (buffers) and
/// num_batches_tracked (counter), in PyTorch's state_dict order.
template <class B>
class batch_norm2d {
  USEG_CHECK_BACKEND(B);

 public:
  static constexpr double eps = 1e-5;
  static constexpr double momentum = 0.1;

  batch_norm2d() = default;
  batch_norm2d(param_store<B>& store, const std::string& name, int c) : store_(&store), c_(c) {
    if (c <= 0) throw config_error("useg::batch_norm2d '" + name + "': channel count must be positive");
    gamma_ = store.add_parameter(join_name(name, "weight"), shape{c}, init_kind::constant, 1.0);
    beta_ = store.add_parameter(join_name(name, "bias"), shape{c}, init_kind::constant, 0.0);
    rmean_ = store.add_buffer(join_name(name, "running_mean"), shape{c}, 0.0);
    rvar_ = store.add_buffer(join_name(name, "running_var"), shape{c}, 1.0);
    nbt_ = store.add_counter(join_name(name, "num_batches_tracked"));
  }
  batch_norm2d(share_params_t, const batch_norm2d& o)
      : store_(o.store_), c_(o.c_), gamma_(o.gamma_), beta_(o.beta_), rmean_(o.rmean_), rvar_(o.rvar_), nbt_(o.nbt_) {}
  batch_norm2d(batch_norm2d&&) noexcept = default;
  batch_norm2d& operator=(batch_norm2d&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) {
    require_nchw(x, c_, "useg::batch_norm2d::forward");
    x_ = &x;
    train_ = store_->training();
    d_ = bn_desc{x.n(), c_, x.dims().hw(), eps, momentum};
    y_.resize(x.dims());
    mean_.resize(shape{c_});
    invstd_.resize(shape{c_});
    if (train_) {
      if (x.n() * x.dims().hw() < 2)
        throw shape_error("useg::batch_norm2d::forward: train mode needs more than one value per channel (input " +
                          x.dims().str() + "); use a larger batch or input, or eval mode");
      ops<B>::batch_norm_forward_train(ctx, d_, x.data(), store_->param(gamma_), store_->param(beta_),
                                       store_->buffer(rmean_), store_->buffer(rvar_), mean_.data(), invstd_.data(),
                                       y_.data());
      ++store_->counter(nbt_);
    } else {
      ops<B>::batch_norm_forward_eval(ctx, d_, x.data(), store_->param(gamma_), store_->param(beta_),
                                      store_->buffer(rmean_), store_->buffer(rvar_), y_.data());
    }
    return y_;
  }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy) {
    gx_.resize(x_->dims());
    const typename B::scalar* mean = mean_.data();
    if (!train_) {
      ops<B>::copy(mean_.data(), store_->buffer(rmean_), static_cast<std::size_t>(c_));
      ops<B>::batch_norm_eval_invstd(ctx, c_, eps, store_->buffer(rvar_), invstd_.data());
    }
    ops<B>::batch_norm_backward(ctx, d_, train_, x_->data(), gy.data(), store_->param(gamma_), mean, invstd_.data(),
                                gx_.data(), store_->grad(gamma_), store_->grad(beta_));
    return gx_;
  }
  const tensor<B>& output() const { return y_; }
  int channels() const { return c_; }
  double flops() const { return 4.0 * d_.n * static_cast<double>(d_.hw) * d_.c; }

 private:
  param_store<B>* store_ = nullptr;
  int c_ = 0;
  param_ref gamma_, beta_, rmean_, rvar_, nbt_;
  bn_desc d_{};
  bool train_ = true;
  const tensor<B>* x_ = nullptr;
  tensor<B> y_, gx_, mean_, invstd_;
};

}  // namespace useg
