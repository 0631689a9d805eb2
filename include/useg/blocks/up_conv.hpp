// useg/blocks/up_conv.hpp — the decoder's up-convolution (up_conv of network.py):
//   up_kind::upsample  (default): nearest ×2 upsample + conv3×3 + BN + ReLU   (names up.1, up.2)
//   up_kind::transpose (option):  ConvTranspose2d(k=2, s=2)                 (names up.weight/bias)
#pragma once
#include <string>

#include "useg/blocks/conv_bn_relu.hpp"
#include "useg/layers/conv_transpose2d.hpp"
#include "useg/layers/resample.hpp"

namespace useg {

enum class up_kind { upsample, transpose };

inline const char* to_string(up_kind k) { return k == up_kind::upsample ? "upsample" : "transpose"; }

template <class B>
class up_conv {
 public:
  up_conv() = default;
  up_conv(param_store<B>& store, const std::string& name, int cin, int cout, up_kind kind) : kind_(kind) {
    if (kind == up_kind::upsample)
      cbr_ = conv_bn_relu<B, 3>(store, name + ".up.1", name + ".up.2", cin, cout);
    else
      tconv_ = conv_transpose2x2<B>(store, name + ".up", cin, cout);
  }
  up_conv(up_conv&&) noexcept = default;
  up_conv& operator=(up_conv&&) noexcept = default;

  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) {
    if (kind_ == up_kind::upsample) return cbr_.forward(ctx, up_.forward(ctx, x));
    return tconv_.forward(ctx, x);
  }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy) {
    if (kind_ == up_kind::upsample) return up_.backward(ctx, cbr_.backward(ctx, gy));
    return tconv_.backward(ctx, gy);
  }
  const tensor<B>& output() const { return kind_ == up_kind::upsample ? cbr_.output() : tconv_.output(); }
  double flops() const { return kind_ == up_kind::upsample ? cbr_.flops() : tconv_.flops(); }

 private:
  up_kind kind_ = up_kind::upsample;
  upsample2x<B> up_;
  conv_bn_relu<B, 3> cbr_;
  conv_transpose2x2<B> tconv_;
};

}  // namespace useg
