// useg/blocks/conv_block.hpp — U-Net's double convolution: (conv3×3 + BN + ReLU) × 2
// (conv_block of LeeJunHyun/Image_Segmentation network.py; names conv.0/1 and conv.3/4).
//
// Memory: between forward and backward it keeps the two convolution outputs and the block's
// output; the first unit's output is recomputed for the backward (cbr_unit), and freed again,
// with the gradient flowing into it, before the first convolution's gradients are allocated. A
// model may drop the block's output too while nothing reads it (drop_output / restore_output).
#pragma once
#include <string>

#include "useg/blocks/cbr_unit.hpp"
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

  /// input_consumed() runs once x has been read (the caller may free it there).
  template <detail::hook InputConsumed = detail::no_op>
  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x, InputConsumed&& input_consumed = {}) {
    const tensor<B>& a = a_.forward(ctx, x);
    input_consumed();
    const tensor<B>& y = b_.forward(ctx, a);
    a_.drop_output();
    return y;
  }
  /// Inference: forward(concat(a, b)) without building the concatenation where the backend reads
  /// the two inputs in place (the decoder's skip and up-convolution output). No backward may
  /// follow. inputs_consumed() runs once a and b have been read.
  template <detail::hook InputConsumed = detail::no_op>
  const tensor<B>& forward_concat(context<B>& ctx, const tensor<B>& a, const tensor<B>& b,
                                  InputConsumed&& inputs_consumed = {}) {
    const tensor<B>& x = a_.forward_concat(ctx, a, b);
    inputs_consumed();
    const tensor<B>& y = b_.forward(ctx, x);
    a_.drop_output();
    return y;
  }
  /// gy_consumed() runs as soon as gy is no longer needed, input_consumed() once the block's input
  /// has been read for the last time, before its gradient is allocated (the caller may free them
  /// there).
  template <detail::hook GyConsumed = detail::no_op, detail::hook InputConsumed = detail::no_op>
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy, bool need_gx = true, GyConsumed&& gy_consumed = {},
                            InputConsumed&& input_consumed = {}) {
    a_.restore_output(ctx);  // the second convolution's input
    const tensor<B>& g = b_.backward(ctx, gy, true, gy_consumed);
    // After the first unit's batch-norm backward, neither the gradient of its output nor the
    // output itself is needed: both are freed before its convolution's gradients are allocated.
    return a_.backward(
        ctx, g, need_gx,
        [this] {
          b_.release_grad();
          a_.drop_output();
        },
        input_consumed);
  }
  const tensor<B>& output() const { return b_.output(); }
  /// Free the block's output once its consumers have run; restore_output() recomputes it,
  /// bit-identically (from the second convolution's output while the backward has not consumed
  /// it, else from the block's input, which must then be alive).
  void drop_output() { b_.drop_output(); }
  void restore_output(context<B>& ctx) {
    if (b_.has_output()) return;
    const bool from_input = !b_.has_conv_output();
    if (from_input) a_.restore_output(ctx);
    b_.restore_output(ctx);
    if (from_input) a_.drop_output();
  }
  /// Free the input gradient returned by the last backward once it is consumed.
  void release_grad() { a_.release_grad(); }
  /// Inference: free what only a backward would need (the output stays) / everything.
  void release_state() {
    a_.release_all();
    b_.release_state();
  }
  void release_all() {
    a_.release_all();
    b_.release_all();
  }
  double flops() const { return a_.flops() + b_.flops(); }

 private:
  detail::cbr_unit<B, 3> a_, b_;
};

}  // namespace useg
