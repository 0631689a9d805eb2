// useg/core/descriptors.hpp — run-time problem descriptions handed to ops<B>.
#pragma once
#include <cstddef>

namespace useg {

/// Same-padded, stride-1 k×k convolution: x (n, cin, h, w) -> y (n, cout, h, w), weight (cout, cin, k, k).
struct conv_desc {
  int n = 0, cin = 0, cout = 0, h = 0, w = 0, k = 3;
  std::size_t hw() const { return static_cast<std::size_t>(h) * static_cast<std::size_t>(w); }
};

/// 2×2 stride-2 transposed convolution: x (n, cin, h, w) -> y (n, cout, 2h, 2w), weight (cin, cout, 2, 2).
struct upconv_desc {
  int n = 0, cin = 0, cout = 0, h = 0, w = 0;
  std::size_t hw() const { return static_cast<std::size_t>(h) * static_cast<std::size_t>(w); }
};

/// Per-channel statistics over (n, h, w) of an NCHW tensor.
struct bn_desc {
  int n = 0, c = 0;
  std::size_t hw = 0;
  double eps = 1e-5;
  double momentum = 0.1;
};

}  // namespace useg
