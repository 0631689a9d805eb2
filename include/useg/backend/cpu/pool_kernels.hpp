// useg/backend/cpu/pool_kernels.hpp — 2×2 max pooling (stride 2) and nearest ×2 upsampling of the
// CPU backend, float and double, in vectors: a row pair is split into even and odd columns
// (vector permutes), so L windows are compared at once; upsampling interleaves a row with itself.
//
// The rule is PyTorch's: scan the window in the order (0,0), (0,1), (1,0), (1,1) and take a value
// when it is greater than the current maximum or NaN; the backward pass routes the gradient to the
// value taken last (the first maximum, or the last NaN), as the scalar loop it replaces did.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "useg/backend/cpu/conv_kernels.hpp"

namespace useg::detail {

/// For each of n images i: la values from sa + i·ssa to da + i·dsa, and lb values from
/// sb + i·ssb to db + i·dsb (a length of 0 skips that part; its pointers are not read). The
/// channel concatenation and its split. The copies are shared out among the threads in equal
/// contiguous ranges of the n·(la + lb) values: one thread does not reach the memory bandwidth
/// that two do.
template <class T>
void copy_strided_pair(int n, std::size_t la, const T* sa, std::size_t ssa, T* da, std::size_t dsa, std::size_t lb,
                       const T* sb, std::size_t ssb, T* db, std::size_t dsb) {
  const std::size_t per = la + lb, total = static_cast<std::size_t>(std::max(n, 0)) * per;
  if (total == 0) return;
  const auto run = [&](std::size_t lo, std::size_t hi) {
    while (lo < hi) {
      const std::size_t i = lo / per, o = lo % per, left = hi - lo;
      if (o < la) {
        const std::size_t len = std::min(la - o, left);
        std::memcpy(da + i * dsa + o, sa + i * ssa + o, len * sizeof(T));
        lo += len;
      } else {
        const std::size_t ob = o - la, len = std::min(lb - ob, left);
        std::memcpy(db + i * dsb + ob, sb + i * ssb + ob, len * sizeof(T));
        lo += len;
      }
    }
  };
#pragma omp parallel if (total * sizeof(T) >= (std::size_t{1} << 18))
  {
    std::size_t parts = 1, me = 0;
#ifdef _OPENMP
    parts = static_cast<std::size_t>(omp_get_num_threads());
    me = static_cast<std::size_t>(omp_get_thread_num());
#endif
    constexpr std::size_t align = 64 / sizeof(T);  // range ends on cache-line multiples of values
    const auto bound = [&](std::size_t k) { return k == parts ? total : std::min(total, total * k / parts / align * align); };
    run(bound(me), bound(me + 1));
  }
}

/// The n <= L windows from column 2·j0 of rows r0, r1: a, b (row 0, even and odd columns), c, d
/// (row 1), and which of b, c, d the scan took (c1, c2, c3).
template <class T>
struct pool_windows {
  using S = simd<T>;
  typename S::v a, b, c, d, m;
  typename S::mask c1, c2, c3;
  static typename S::v load2(const T* p, int n, typename S::v& odd) {
    constexpr int L = S::L;
    typename S::v lo, hi, ev;
    if (n == L) {
      lo = S::load(p);
      hi = S::load(p + L);
    } else {
      lo = S::load_n(p, std::min(2 * n, L));
      hi = 2 * n > L ? S::load_n(p + L, 2 * n - L) : S::zero();
    }
    S::deinterleave(lo, hi, ev, odd);
    return ev;
  }
  pool_windows(const T* r0, const T* r1, int n) {
    a = load2(r0, n, b);
    c = load2(r1, n, d);
    c1 = S::gt_or_nan(b, a);
    m = S::select(c1, b, a);
    c2 = S::gt_or_nan(c, m);
    m = S::select(c2, c, m);
    c3 = S::gt_or_nan(d, m);
    m = S::select(c3, d, m);
  }
};

/// y (h/2, w/2) = the 2×2 maxima of one plane x (h, w) (floor: an odd last row or column is
/// dropped).
template <class T>
void maxpool2x2_plane(const T* x, int h, int w, T* y) {
  using S = simd<T>;
  constexpr int L = S::L;
  const int oh = h / 2, ow = w / 2;
  for (int i = 0; i < oh; ++i) {
    const T* r0 = x + static_cast<std::ptrdiff_t>(2 * i) * w;
    T* yr = y + static_cast<std::ptrdiff_t>(i) * ow;
    for (int j0 = 0; j0 < ow; j0 += L) {
      const int n = std::min(L, ow - j0);
      const pool_windows<T> pw(r0 + 2 * j0, r0 + w + 2 * j0, n);
      if (n == L)
        S::store(yr + j0, pw.m);
      else
        S::store_lanes(yr + j0, pw.m, 0, n);
    }
  }
}

/// gx (h, w) of one plane: gy (h/2, w/2) routed to the value each window took, zero elsewhere
/// (overwrites gx, including an odd last row and column).
template <class T>
void maxpool2x2_backward_plane(const T* x, const T* gy, int h, int w, T* gx) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int L = S::L;
  const int oh = h / 2, ow = w / 2;
  const v z = S::zero();
  auto put = [&](T* dst, v lo, v hi, int n) {  // 2n values
    if (n == L) {
      S::store(dst, lo);
      S::store(dst + L, hi);
    } else {
      S::store_lanes(dst, lo, 0, std::min(2 * n, L));
      if (2 * n > L) S::store_lanes(dst + L, hi, 0, 2 * n - L);
    }
  };
  for (int i = 0; i < oh; ++i) {
    const T* r0 = x + static_cast<std::ptrdiff_t>(2 * i) * w;
    T* g0 = gx + static_cast<std::ptrdiff_t>(2 * i) * w;
    T* g1 = g0 + w;
    const T* gr = gy + static_cast<std::ptrdiff_t>(i) * ow;
    for (int j0 = 0; j0 < ow; j0 += L) {
      const int n = std::min(L, ow - j0);
      const pool_windows<T> pw(r0 + 2 * j0, r0 + w + 2 * j0, n);
      v rest = n == L ? S::load(gr + j0) : S::load_n(gr + j0, n);
      const v gd = S::select(pw.c3, rest, z);
      rest = S::select(pw.c3, z, rest);
      const v gc = S::select(pw.c2, rest, z);
      rest = S::select(pw.c2, z, rest);
      const v gb = S::select(pw.c1, rest, z);
      const v ga = S::select(pw.c1, z, rest);
      v lo, hi;
      S::interleave(ga, gb, lo, hi);
      put(g0 + 2 * j0, lo, hi, n);
      S::interleave(gc, gd, lo, hi);
      put(g1 + 2 * j0, lo, hi, n);
    }
    if (w % 2) g0[w - 1] = g1[w - 1] = T(0);
  }
  if (h % 2) std::memset(gx + static_cast<std::ptrdiff_t>(h - 1) * w, 0, static_cast<std::size_t>(w) * sizeof(T));
}

/// y (2h, 2w) = nearest ×2 upsampling of one plane x (h, w).
template <class T>
void upsample2x_plane(const T* x, int h, int w, T* y) {
  using S = simd<T>;
  constexpr int L = S::L;
  const std::ptrdiff_t W = 2 * static_cast<std::ptrdiff_t>(w);
  for (int i = 0; i < h; ++i) {
    const T* s = x + static_cast<std::ptrdiff_t>(i) * w;
    T* d = y + 2 * static_cast<std::ptrdiff_t>(i) * W;
    int j = 0;
    for (; j + L <= w; j += L) {  // the row and the one below it, both from registers
      const typename S::v a = S::load(s + j);
      typename S::v lo, hi;
      S::interleave(a, a, lo, hi);
      S::store(d + 2 * j, lo);
      S::store(d + 2 * j + L, hi);
      S::store(d + W + 2 * j, lo);
      S::store(d + W + 2 * j + L, hi);
    }
    for (; j < w; ++j) d[2 * j] = d[2 * j + 1] = d[W + 2 * j] = d[W + 2 * j + 1] = s[j];
  }
}

}  // namespace useg::detail
