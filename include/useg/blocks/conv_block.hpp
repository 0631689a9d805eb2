// useg/blocks/conv_block.hpp — U-Net's double convolution: (conv3×3 + BN + ReLU) × 2
// (conv_block of LeeJunHyun/Image_Segmentation network.py; names conv.0/1 and conv.3/4).
#pragma once
#include <string>

#include "useg/blocks/conv_bn_relu.hpp"

namespace useg {

template <class B>
class conv_block {
 public:
  conv_block() = default;
  /// t is accepted for interface symmetry with rrcnn_block and ignored.
  conv_block(param_store<B>& store, const std::string& name, int cin, int cout, int /*t*/ = 0)
      : a_(store, name + ".conv.0", name + ".conv.1", cin, cout), b_(store, name + ".conv.3", name + ".conv.4", cout, cout) {}
  conv_block(conv_block&&) noexcept = default;
  conv_block& operator=(conv_block&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) { return b_.forward(ctx, a_.forward(ctx, x)); }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy, bool need_gx = true) {
    return a_.backward(ctx, b_.backward(ctx, gy), need_gx);
  }
  const tensor<B>& output() const { return b_.output(); }
  double flops() const { return a_.flops() + b_.flops(); }

 private:
  conv_bn_relu<B, 3> a_, b_;
};

}  // namespace useg
