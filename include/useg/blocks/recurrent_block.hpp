// useg/blocks/recurrent_block.hpp — the recurrent convolution of R2U-Net (Recurrent_block):
//   x1 = f(x); repeat t times: x1 = f(x + x1)
// with ONE shared f = conv3×3 + BN + ReLU (names conv.0, conv.1) applied t+1 times. Each
// application keeps its own activation cache and its own BN batch statistics; gradients of the
// shared weights sum over the applications, and BN running statistics are updated once per
// application, exactly as PyTorch does.
//
// Memory: between forward and backward it keeps the t+1 convolution outputs and the block's
// output; the intermediate outputs and the sums x + x1 are recomputed for the backward, and
// freed there again as soon as they have been read.
#pragma once
#include <string>
#include <vector>

#include "useg/blocks/cbr_unit.hpp"
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
    apply(ctx, x);
    const tensor<B>& y = steps_.back().forward(ctx, last_input(x), &steps_[0]);
    release_sum(static_cast<std::size_t>(t_));
    return y;
  }
  /// out = residual + forward(x), the block's output dropped afterwards (restore_output()
  /// recomputes it): in eval mode the last application adds the residual as it stores (the
  /// residual block's x + RCNN(x)).
  void forward_plus(context<B>& ctx, const tensor<B>& x, const tensor<B>& residual, tensor<B>& out) {
    apply(ctx, x);
    steps_.back().forward_plus(ctx, last_input(x), residual, out, &steps_[0], [&] { release_sum(static_cast<std::size_t>(t_)); });
  }
  /// Hooks where the caller may free what it no longer needs: gy_consumed() once gy has been
  /// read, input_consumed() once the block's input has been read for the last time.
  template <detail::hook GyConsumed = detail::no_op, detail::hook InputConsumed = detail::no_op>
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy, GyConsumed&& gy_consumed = {},
                            InputConsumed&& input_consumed = {}) {
    // gx_ sums dL/dx over the applications: application i >= 1 reads x + x1 (gradient gs), the
    // first one reads x. Each application's output and input gradient are freed after its batch
    // norm's backward, its recomputed input after its weight gradient: at most three tensors of
    // the block's size are alive besides the caller's.
    const std::size_t t = static_cast<std::size_t>(t_);
    if (consumed_) recompute(ctx);
    const tensor<B>* g = &gy;
    for (std::size_t i = t; i >= 1; --i) {
      // Application i's input x + x1 (freed in a train-mode forward) is recomputed for its weight
      // gradient, after its batch norm's backward has freed the output and the incoming gradient.
      // Its convolution output is at hand then (kept by the forward, rebuilt by recompute()), so
      // the batch norm's backward does not need the input. Eval mode keeps the sums.
      const bool train = steps_[i].training();
      const tensor<B>& gs = steps_[i].backward(  // grad of (x + x1)
          ctx, *g, true,
          [&] {
            steps_[i].drop_output();
            if (i == t) gy_consumed();
            else steps_[i + 1].release_grad();
            if (train) steps_[i - 1].output_plus(ctx, *x_, sums_[i - 1]);
          },
          [&] {
            if (train) sums_[i - 1] = tensor<B>();
          });
      if (i == t) {
        gx_.resize(x_->dims());
        ops<B>::copy(gx_.data(), gs.data(), gx_.size());
      } else {
        ops<B>::accumulate(ctx, gx_.data(), gs.data(), gx_.size());
      }
      g = &gs;
    }
    const tensor<B>& g0 = steps_[0].backward(
        ctx, *g, true,
        [&] {
          steps_[0].drop_output();
          steps_[1].release_grad();
        },
        input_consumed);
    ops<B>::accumulate(ctx, gx_.data(), g0.data(), gx_.size());
    steps_[0].release_grad();
    consumed_ = steps_[0].training();
    return gx_;
  }
  const tensor<B>& output() const { return steps_.back().output(); }
  /// Free the output (its consumers have run); restore_output() recomputes it.
  void drop_output() { steps_.back().drop_output(); }
  void restore_output(context<B>& ctx) {
    if (consumed_) recompute(ctx);
    steps_.back().restore_output(ctx);
  }
  /// Whether a train-mode backward has freed what the forward kept (recomputed from the input,
  /// which must then be alive, by restore_output / output_plus / a second backward).
  bool consumed() const { return consumed_; }
  /// out = residual + output, without materializing a dropped output (train mode).
  void output_plus(context<B>& ctx, const tensor<B>& residual, tensor<B>& out) {
    if (consumed_) recompute(ctx);
    steps_.back().output_plus(ctx, residual, out);
  }
  /// Free the input gradient returned by the last backward once it is consumed.
  void release_grad() { gx_ = tensor<B>(); }
  /// Hand the input gradient returned by the last backward over to the caller (to add into).
  tensor<B> take_grad() { return std::move(gx_); }
  /// Inference: free what only a backward would need (the output stays) / everything.
  void release_state() {
    for (auto& s : sums_) s = tensor<B>();
    for (std::size_t i = 0; i + 1 < steps_.size(); ++i) steps_[i].release_all();
    steps_.back().release_state();
    gx_ = tensor<B>();
  }
  void release_all() {
    release_state();
    steps_.back().release_all();
  }
  int t() const { return t_; }
  double flops() const {
    double f = 0;
    for (const auto& s : steps_) f += s.flops();
    return f + static_cast<double>(t_) * static_cast<double>(x_ ? x_->size() : 0);
  }

 private:
  /// After a train-mode backward, which frees the convolution outputs and the sums as it goes:
  /// recompute them from the input (saved batch statistics: bit-identical, running statistics
  /// untouched), applications in order, for a second backward.
  void recompute(context<B>& ctx) {
    const std::size_t t = static_cast<std::size_t>(t_);
    for (std::size_t i = 0; i <= t; ++i) {
      steps_[i].restore_output(ctx);  // convolution of its input (x, or the sum rebuilt just before)
      if (i > 0) sums_[i - 1] = tensor<B>();
      if (i < t) {
        steps_[i].output_plus(ctx, *x_, sums_[i]);
        steps_[i].drop_output();
      }
    }
    consumed_ = false;
  }

  /// The first t applications: sums_[i] = x + f(x or sums_[i-1]) (cbr_unit::forward_plus: in
  /// eval mode f's output is never written out; the batch norm is folded once per block, by the
  /// first application). Train mode frees each sum once the next application has read it: it is
  /// recomputed from the saved statistics for the backward. Eval mode keeps them, since
  /// recomputing an eval-mode output needs its input.
  void apply(context<B>& ctx, const tensor<B>& x) {
    x_ = &x;
    consumed_ = false;
    for (std::size_t i = 0; i < static_cast<std::size_t>(t_); ++i)
      steps_[i].forward_plus(ctx, i == 0 ? x : sums_[i - 1], x, sums_[i], i == 0 ? nullptr : &steps_[0],
                             [&] { release_sum(i); });
  }
  const tensor<B>& last_input(const tensor<B>& x) const { return t_ > 0 ? sums_[static_cast<std::size_t>(t_) - 1] : x; }
  /// Train mode: free application i's input sum (sums_[i - 1]) once it has read it.
  void release_sum(std::size_t i) {
    if (i > 0 && steps_[i].training()) sums_[i - 1] = tensor<B>();
  }

  bool consumed_ = false;
  int t_ = 0;
  std::vector<detail::cbr_unit<B, 3>> steps_;
  std::vector<tensor<B>> sums_;
  const tensor<B>* x_ = nullptr;
  tensor<B> gx_;
};

}  // namespace useg
