// useg/blocks/recurrent_block.hpp — the recurrent convolution of R2U-Net (Recurrent_block):
//   x1 = f(x); repeat t times: x1 = f(x + x1)
// with ONE shared f = conv3×3 + BN + ReLU (names conv.0, conv.1) applied t+1 times. Each
// application keeps its own activation cache and its own BN batch statistics; gradients of the
// shared weights sum over the applications, and BN running statistics are updated once per
// application, exactly as PyTorch does.
#pragma once
#include <string>
#include <vector>

#include "useg/blocks/conv_bn_relu.hpp"
#include "useg/layers/elementwise.hpp"

namespace useg {

template <class B>
class recurrent_block {
 public:
  recurrent_block() = default;
  recurrent_block(param_store<B>& store, const std::string& name, int ch, int t) : t_(t) {
    if (t < 1) throw config_error("useg::recurrent_block '" + name + "': t must be >= 1 (got " + std::to_string(t) + ")");
    steps_.reserve(static_cast<std::size_t>(t) + 1);
    steps_.emplace_back(store, name + ".conv.0", name + ".conv.1", ch, ch);
    for (int i = 0; i < t; ++i) steps_.emplace_back(share_params, steps_.front());
    sums_.resize(static_cast<std::size_t>(t));
  }
  recurrent_block(recurrent_block&&) noexcept = default;
  recurrent_block& operator=(recurrent_block&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) {
    x_ = &x;
    const tensor<B>* x1 = &steps_[0].forward(ctx, x);
    for (int i = 0; i < t_; ++i) x1 = &steps_[static_cast<std::size_t>(i) + 1].forward(ctx, sums_[static_cast<std::size_t>(i)].forward(ctx, x, *x1));
    return *x1;
  }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy) {
    gx_.resize(x_->dims());
    gx_.fill(0);
    const tensor<B>* g = &gy;
    for (int i = t_; i >= 1; --i) {
      g = &steps_[static_cast<std::size_t>(i)].backward(ctx, *g);  // grad of (x + x1)
      ops<B>::accumulate(ctx, gx_.data(), g->data(), gx_.size());
    }
    g = &steps_[0].backward(ctx, *g);
    ops<B>::accumulate(ctx, gx_.data(), g->data(), gx_.size());
    return gx_;
  }
  const tensor<B>& output() const { return steps_.back().output(); }
  int t() const { return t_; }
  double flops() const {
    double f = 0;
    for (const auto& s : steps_) f += s.flops();
    return f + static_cast<double>(t_) * static_cast<double>(x_ ? x_->size() : 0);
  }

 private:
  int t_ = 0;
  std::vector<conv_bn_relu<B, 3>> steps_;
  std::vector<add<B>> sums_;
  const tensor<B>* x_ = nullptr;
  tensor<B> gx_;
};

}  // namespace useg
