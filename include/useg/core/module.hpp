// useg/core/module.hpp — what layers, blocks and models share.
//
// The protocol every layer and block follows (dlib-style):
//   const tensor<B>& forward(context<B>&, const tensor<B>& x);   // output owned by the layer
//   const tensor<B>& backward(context<B>&, const tensor<B>& gy); // grad of input, owned by the layer
// backward() must follow the matching forward() while its input is still alive; it ADDS
// parameter gradients into the model's param_store, so shared weights and repeated
// applications sum their gradients. double flops() const gives the multiply-add count ×2 of the
// last forward.
#pragma once
#include <concepts>
#include <string>

namespace useg {

/// Tag: construct a layer that shares (aliases) another layer's parameters but has its own
/// activation caches. Used by the recurrent block to apply one convolution t+1 times.
struct share_params_t {
  explicit share_params_t() = default;
};
inline constexpr share_params_t share_params{};

/// Join a module prefix and a child name with '.', PyTorch style.
inline std::string join_name(const std::string& prefix, const std::string& child) {
  return prefix.empty() ? child : prefix + "." + child;
}

namespace detail {
/// The blocks' hooks: callables run at the point where the caller may free what it no longer
/// needs. no_op, the default, frees nothing.
template <class F>
concept hook = std::invocable<F&>;
struct no_op {
  void operator()() const noexcept {}
};
}  // namespace detail

}  // namespace useg
