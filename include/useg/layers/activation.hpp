// useg/layers/activation.hpp — elementwise activations (ReLU, sigmoid).
#pragma once
#include "useg/core/module.hpp"
#include "useg/core/tensor.hpp"

namespace useg {

/// Activation kinds (template arguments of activation<B, Act>).
struct relu_t {
  static constexpr const char* name = "relu";
};
struct sigmoid_t {
  static constexpr const char* name = "sigmoid";
};

/// B: backend tag. Act: relu_t or sigmoid_t. Backward uses the saved output.
template <class B, class Act>
class activation {
  USEG_CHECK_BACKEND(B);
  static_assert(std::is_same_v<Act, relu_t> || std::is_same_v<Act, sigmoid_t>,
                "useg::activation<B, Act>: Act must be useg::relu_t or useg::sigmoid_t");

 public:
  activation() = default;
  activation(activation&&) noexcept = default;
  activation& operator=(activation&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) {
    y_.resize(x.dims());
    if constexpr (std::is_same_v<Act, relu_t>)
      ops<B>::relu_forward(ctx, x.data(), y_.data(), x.size());
    else
      ops<B>::sigmoid_forward(ctx, x.data(), y_.data(), x.size());
    return y_;
  }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy) {
    gx_.resize(y_.dims());
    if constexpr (std::is_same_v<Act, relu_t>)
      ops<B>::relu_backward(ctx, y_.data(), gy.data(), gx_.data(), y_.size());
    else
      ops<B>::sigmoid_backward(ctx, y_.data(), gy.data(), gx_.data(), y_.size());
    return gx_;
  }
  const tensor<B>& output() const { return y_; }
  double flops() const { return static_cast<double>(y_.size()); }

 private:
  tensor<B> y_, gx_;
};

template <class B>
using relu = activation<B, relu_t>;
template <class B>
using sigmoid = activation<B, sigmoid_t>;

}  // namespace useg
