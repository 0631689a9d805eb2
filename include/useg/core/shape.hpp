// useg/core/shape.hpp — tensor shapes (rank 1..4, NCHW for images).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "useg/core/error.hpp"

namespace useg {

/// A dense row-major shape of rank 1 to 4. Images are NCHW.
struct shape {
  int rank = 0;
  std::array<int, 4> d{0, 0, 0, 0};

  shape() = default;
  shape(std::initializer_list<int> dims) {
    if (dims.size() > 4) throw shape_error("useg::shape: rank " + std::to_string(dims.size()) + " > 4 is not supported");
    for (int v : dims) {
      if (v < 0) throw shape_error("useg::shape: negative dimension " + std::to_string(v));
      d[static_cast<std::size_t>(rank++)] = v;
    }
  }
  static shape nchw(int n, int c, int h, int w) { return shape{n, c, h, w}; }

  int operator[](int i) const { return d[static_cast<std::size_t>(i)]; }
  std::size_t numel() const {
    if (rank == 0) return 0;
    std::size_t s = 1;
    for (int i = 0; i < rank; ++i) s *= static_cast<std::size_t>(d[static_cast<std::size_t>(i)]);
    return s;
  }
  // NCHW accessors; only meaningful for rank 4.
  int n() const { return d[0]; }
  int c() const { return d[1]; }
  int h() const { return d[2]; }
  int w() const { return d[3]; }
  std::size_t hw() const { return static_cast<std::size_t>(d[2]) * static_cast<std::size_t>(d[3]); }

  friend bool operator==(const shape& a, const shape& b) {
    if (a.rank != b.rank) return false;
    for (int i = 0; i < a.rank; ++i)
      if (a.d[static_cast<std::size_t>(i)] != b.d[static_cast<std::size_t>(i)]) return false;
    return true;
  }
  friend bool operator!=(const shape& a, const shape& b) { return !(a == b); }

  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank; ++i) {
      if (i) s += ", ";
      s += std::to_string(d[static_cast<std::size_t>(i)]);
    }
    return s + "]";
  }
};

}  // namespace useg
