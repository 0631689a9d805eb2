// useg/blocks/rrcnn_block.hpp — R2U-Net's recurrent residual block (RRCNN_block):
//   x = Conv_1x1(input)   (1×1 conv with bias, no BN)
//   out = x + RCNN(x),    RCNN = Recurrent_block(t) ∘ Recurrent_block(t)
// Names follow PyTorch registration order: RCNN.0.*, RCNN.1.*, then Conv_1x1.*.
#pragma once
#include <string>

#include "useg/blocks/recurrent_block.hpp"
#include "useg/layers/conv2d.hpp"
#include "useg/layers/elementwise.hpp"

namespace useg {

template <class B>
class rrcnn_block {
 public:
  rrcnn_block() = default;
  rrcnn_block(param_store<B>& store, const std::string& name, int cin, int cout, int t)
      : r0_(store, name + ".RCNN.0", cout, t), r1_(store, name + ".RCNN.1", cout, t), c1_(store, name + ".Conv_1x1", cin, cout) {}
  rrcnn_block(rrcnn_block&&) noexcept = default;
  rrcnn_block& operator=(rrcnn_block&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& in) {
    const tensor<B>& x = c1_.forward(ctx, in);
    return sum_.forward(ctx, x, r1_.forward(ctx, r0_.forward(ctx, x)));
  }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy, bool need_gx = true) {
    const tensor<B>& g0 = r0_.backward(ctx, r1_.backward(ctx, gy));
    gx_.resize(gy.dims());
    ops<B>::add(ctx, g0.data(), gy.data(), gx_.data(), gy.size());
    return c1_.backward(ctx, gx_, need_gx);
  }
  const tensor<B>& output() const { return sum_.output(); }
  double flops() const { return c1_.flops() + r0_.flops() + r1_.flops() + static_cast<double>(sum_.output().size()); }

 private:
  recurrent_block<B> r0_, r1_;
  conv2d<B, 1, true> c1_;
  add<B> sum_;
  tensor<B> gx_;
};

}  // namespace useg
