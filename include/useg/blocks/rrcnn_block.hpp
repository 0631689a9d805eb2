// useg/blocks/rrcnn_block.hpp — R2U-Net's recurrent residual block (RRCNN_block):
//   x = Conv_1x1(input)   (1×1 conv with bias, no BN)
//   out = x + RCNN(x),    RCNN = Recurrent_block(t) ∘ Recurrent_block(t)
// Names follow PyTorch registration order: RCNN.0.*, RCNN.1.*, then Conv_1x1.*.
//
// Memory: between forward and backward it keeps x, the recurrent blocks' convolution outputs
// and the block's output; the recurrent blocks' outputs are recomputed for the backward (and
// freed again once read). A model may drop the block's output too while nothing reads it
// (drop_output / restore_output).
#pragma once
#include <string>

#include "useg/blocks/recurrent_block.hpp"
#include "useg/layers/conv2d.hpp"

namespace useg {

template <class B>
class rrcnn_block {
 public:
  rrcnn_block() = default;
  rrcnn_block(param_store<B>& store, const std::string& name, int cin, int cout, int t)
      : r0_(store, name + ".RCNN.0", cout, t), r1_(store, name + ".RCNN.1", cout, t), c1_(store, name + ".Conv_1x1", cin, cout) {}
  rrcnn_block(rrcnn_block&&) noexcept = default;
  rrcnn_block& operator=(rrcnn_block&&) noexcept = default;

  /// input_consumed() runs once `in` has been read (the caller may free it there).
  template <detail::hook InputConsumed = detail::no_op>
  const tensor<B>& forward(context<B>& ctx, const tensor<B>& in, InputConsumed&& input_consumed = {}) {
    const tensor<B>& x = c1_.forward(ctx, in);
    input_consumed();
    return residual_path(ctx, x);
  }
  /// Inference: forward(concat(a, b)) without building the concatenation (the decoder's skip and
  /// up-convolution output feed only the 1×1 convolution). No backward may follow.
  /// inputs_consumed() runs once a and b have been read.
  template <detail::hook InputConsumed = detail::no_op>
  const tensor<B>& forward_concat(context<B>& ctx, const tensor<B>& a, const tensor<B>& b,
                                  InputConsumed&& inputs_consumed = {}) {
    const tensor<B>& x = c1_.forward_concat(ctx, a, b);
    inputs_consumed();
    return residual_path(ctx, x);
  }
  /// gy_consumed() runs as soon as gy is no longer needed, input_consumed() once the block's input
  /// has been read for the last time, before its gradient is allocated (the caller may free them
  /// there).
  template <detail::hook GyConsumed = detail::no_op, detail::hook InputConsumed = detail::no_op>
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy, bool need_gx = true, GyConsumed&& gy_consumed = {},
                            InputConsumed&& input_consumed = {}) {
    r0_.restore_output(ctx);  // the second recurrent block's input
    // Freed once read: r0's output after r1's backward (r0's backward needs it only for its ReLU
    // mask, which the CPU backend recomputes from z), r1's input gradient after r0's last batch
    // norm. The recurrent blocks drop their own outputs in their backward.
    const tensor<B>& g1 = r1_.backward(ctx, gy, detail::no_op{}, [this] { r0_.drop_output(); });
    r0_.backward(ctx, g1, [this] { r1_.release_grad(); });
    gx_ = r0_.take_grad();
    ops<B>::accumulate(ctx, gx_.data(), gy.data(), gx_.size());  // the residual path
    gy_consumed();
    const tensor<B>& gin = c1_.backward(ctx, gx_, need_gx, input_consumed);
    gx_ = tensor<B>();
    return gin;
  }
  const tensor<B>& output() const { return out_; }
  /// Free the block's output once its consumers have run; restore_output() recomputes it from
  /// the residual path and the last recurrent application, bit-identically.
  void drop_output() { out_ = tensor<B>(); }
  void restore_output(context<B>& ctx) {
    if (!out_.empty()) return;
    const bool from_input = r1_.consumed();  // after the backward: r1's input is rebuilt first
    if (from_input) r0_.restore_output(ctx);
    r1_.output_plus(ctx, c1_.output(), out_);
    if (from_input) r0_.drop_output();
  }
  /// Free the input gradient returned by the last backward once it is consumed.
  void release_grad() { c1_.release_grad(); }
  /// Inference: free what only a backward would need (the output stays) / everything.
  void release_state() {
    r0_.release_all();
    r1_.release_all();
    c1_.release_output();
    c1_.release_grad();
    gx_ = tensor<B>();
  }
  void release_all() {
    release_state();
    drop_output();
  }
  double flops() const { return c1_.flops() + r0_.flops() + r1_.flops() + static_cast<double>(out_.size()); }

 private:
  /// out = x + RCNN(x), as restore_output() recomputes it (the recurrent blocks' outputs dropped).
  const tensor<B>& residual_path(context<B>& ctx, const tensor<B>& x) {
    r1_.forward_plus(ctx, r0_.forward(ctx, x), x, out_);
    r0_.drop_output();
    return out_;
  }
  recurrent_block<B> r0_, r1_;
  conv2d<B, 1, true> c1_;
  tensor<B> out_, gx_;
};

}  // namespace useg
