// useg/blocks/conv_bn_relu.hpp — conv k×k + BatchNorm2d + ReLU, the unit every block is made of.
#pragma once
#include <string>

#include "useg/layers/activation.hpp"
#include "useg/layers/batch_norm2d.hpp"
#include "useg/layers/conv2d.hpp"

namespace useg {

/// B: backend tag. K: kernel size. Parameter names are given separately for the conv and the BN
/// (their indices inside a PyTorch nn.Sequential, e.g. "Conv1.conv.0" and "Conv1.conv.1").
template <class B, int K = 3>
class conv_bn_relu {
 public:
  conv_bn_relu() = default;
  conv_bn_relu(param_store<B>& store, const std::string& conv_name, const std::string& bn_name, int cin, int cout)
      : conv_(store, conv_name, cin, cout), bn_(store, bn_name, cout) {}
  conv_bn_relu(share_params_t, const conv_bn_relu& o) : conv_(share_params, o.conv_), bn_(share_params, o.bn_) {}
  conv_bn_relu(conv_bn_relu&&) noexcept = default;
  conv_bn_relu& operator=(conv_bn_relu&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) {
    return act_.forward(ctx, bn_.forward(ctx, conv_.forward(ctx, x)));
  }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy, bool need_gx = true) {
    return conv_.backward(ctx, bn_.backward(ctx, act_.backward(ctx, gy)), need_gx);
  }
  const tensor<B>& output() const { return act_.output(); }
  int in_channels() const { return conv_.in_channels(); }
  int out_channels() const { return conv_.out_channels(); }
  double flops() const { return conv_.flops() + bn_.flops() + act_.flops(); }

 private:
  conv2d<B, K, true> conv_;
  batch_norm2d<B> bn_;
  relu<B> act_;
};

}  // namespace useg
