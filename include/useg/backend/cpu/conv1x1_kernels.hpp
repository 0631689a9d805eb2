// useg/backend/cpu/conv1x1_kernels.hpp — 1×1 convolutions of the CPU backend (the attention
// gate's three, the recurrent residual block's channel change, every model's output layer).
//
// A 1×1 convolution is a matrix product per image, y(cout, hw) = W(cout, cin) · x(cin, hw), with
// a small inner dimension (cin) and a long one (hw). Both kernels read the planes where they lie:
// no padded copy, no packing of the activations.
//   - Forward (and backward-data, with the transposed weights): register blocks of 8 output
//     channels × 3 vectors of pixels over all cin, stored straight into the output planes.
//   - Weight gradient: gw(co, ci) = sum over images and pixels of gy(co, p) · x(ci, p), register
//     blocks of 4 × 5 dot products (plus the bias sums), over chunks of pixels that fit in L2;
//     each thread sums its chunks into its own partial gw, added up in thread order at the end
//     (deterministic for a given thread count).
// A pixel count that is not a multiple of the vector length ends in masked loads and stores.
#pragma once
#include <algorithm>
#include <cstddef>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "useg/backend/cpu/conv_kernels.hpp"

namespace useg::detail {

inline constexpr int c1_mr = 8;  ///< forward: output channels per register block
inline constexpr int c1_nv = 3;  ///< forward: pixel vectors per register block

/// y[m][p0 + j] = act(sum over ci of wp[ci][m] · x[ci][p0 + j] + bias[m]) for j < valid
/// (valid <= c1_nv·L; Full: valid == c1_nv·L). The input channels are cin planes from x, then
/// cin2 planes from x2 (a concatenation read in place; cin2 = 0: none).
template <class T, int MR, bool Full, bool Relu>
inline void c1_fwd_block(const T* x, std::ptrdiff_t hw, int cin, const T* wp, const T* bias, T* y, int valid,
                         const T* x2, int cin2) {
  using S = simd<T>;
  constexpr int L = S::L, NV = c1_nv;
  typename S::v acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = S::zero();
  int cnt[NV];
  for (int v = 0; v < NV; ++v) cnt[v] = std::clamp(valid - v * L, 0, L);
  for (int ci = 0; ci < cin + cin2; ++ci) {
    const T* xc = ci < cin ? x + ci * hw : x2 + (ci - cin) * hw;
    // The next block's pixels of this channel: cin concurrent streams, more than the hardware
    // prefetchers follow.
    for (int v = 0; v < NV; ++v) __builtin_prefetch(xc + (NV + v) * L);
    typename S::v xv[NV];
    for (int v = 0; v < NV; ++v) {
      if constexpr (Full)
        xv[v] = S::load(xc + v * L);
      else
        xv[v] = cnt[v] == L ? S::load(xc + v * L) : cnt[v] > 0 ? S::load_n(xc + v * L, cnt[v]) : S::zero();
    }
    for (int m = 0; m < MR; ++m) {
      const typename S::v wv = S::set1(wp[m]);
      for (int v = 0; v < NV; ++v) acc[m][v] = S::fma(wv, xv[v], acc[m][v]);
    }
    wp += MR;
  }
  for (int m = 0; m < MR; ++m) {
    const typename S::v b = S::set1(bias ? bias[m] : T(0));
    T* ym = y + m * hw;
    for (int v = 0; v < NV; ++v) {
      typename S::v r = S::add(acc[m][v], b);
      if constexpr (Relu) r = S::relu(r);
      if constexpr (Full)
        S::store(ym + v * L, r);
      else if (cnt[v] == L)
        S::store(ym + v * L, r);
      else if (cnt[v] > 0)
        S::store_lanes(ym + v * L, r, 0, cnt[v]);
    }
  }
}

template <class T, int MR, bool Relu>
inline void c1_fwd_rows(const T* x, std::ptrdiff_t hw, int cin, const T* wp, const T* bias, T* y, int valid, const T* x2,
                        int cin2) {
  if (valid == c1_nv * simd<T>::L)
    c1_fwd_block<T, MR, true, Relu>(x, hw, cin, wp, bias, y, valid, x2, cin2);
  else
    c1_fwd_block<T, MR, false, Relu>(x, hw, cin, wp, bias, y, valid, x2, cin2);
}

template <class T, bool Relu>
inline void c1_fwd_dispatch(int mr, const T* x, std::ptrdiff_t hw, int cin, const T* wp, const T* bias, T* y, int valid,
                            const T* x2, int cin2) {
  static_assert(c1_mr == 8, "c1_fwd_dispatch lists the block heights 1..8");
  switch (mr) {
    case 8: c1_fwd_rows<T, 8, Relu>(x, hw, cin, wp, bias, y, valid, x2, cin2); break;
    case 7: c1_fwd_rows<T, 7, Relu>(x, hw, cin, wp, bias, y, valid, x2, cin2); break;
    case 6: c1_fwd_rows<T, 6, Relu>(x, hw, cin, wp, bias, y, valid, x2, cin2); break;
    case 5: c1_fwd_rows<T, 5, Relu>(x, hw, cin, wp, bias, y, valid, x2, cin2); break;
    case 4: c1_fwd_rows<T, 4, Relu>(x, hw, cin, wp, bias, y, valid, x2, cin2); break;
    case 3: c1_fwd_rows<T, 3, Relu>(x, hw, cin, wp, bias, y, valid, x2, cin2); break;
    case 2: c1_fwd_rows<T, 2, Relu>(x, hw, cin, wp, bias, y, valid, x2, cin2); break;
    default: c1_fwd_rows<T, 1, Relu>(x, hw, cin, wp, bias, y, valid, x2, cin2); break;
  }
}

/// y (n, cout, hw) = W x + bias (then ReLU when relu) for x (n, cin, hw), given weights packed by
/// pack_fwd_weights(..., kk = 1, ...) in blocks of c1_mr (== fwd_mr) output channels. With x2
/// (n, cin2, hw), the input is the channel concatenation of x and x2, read in place (the weights
/// are packed for cin + cin2 input channels).
template <class T>
void conv1x1_forward(int n, int cin, int cout, std::ptrdiff_t hw, const T* x, const T* wp, const T* bias, T* y,
                     bool relu, const T* x2 = nullptr, int cin2 = 0) {
  static_assert(c1_mr == fwd_mr, "the weights are packed in fwd_mr blocks");
  const std::ptrdiff_t pb = static_cast<std::ptrdiff_t>(simd<T>::L) * c1_nv;  // pixels per block
  const std::ptrdiff_t npb = (hw + pb - 1) / pb;
  const int ncob = (cout + c1_mr - 1) / c1_mr;
  const std::ptrdiff_t tasks = static_cast<std::ptrdiff_t>(n) * npb * ncob;
  const double work = static_cast<double>(n) * static_cast<double>(hw) * (cin + cin2) * cout;
#pragma omp parallel for schedule(static) if (work > 2e5)
  for (std::ptrdiff_t task = 0; task < tasks; ++task) {
    const int cob = static_cast<int>(task % ncob);
    const std::ptrdiff_t rest = task / ncob;
    const std::ptrdiff_t p0 = (rest % npb) * pb;
    const int i = static_cast<int>(rest / npb);
    const int co0 = cob * c1_mr;
    const int mb = std::min(c1_mr, cout - co0);
    const int valid = static_cast<int>(std::min(pb, hw - p0));
    const T* xi = x + static_cast<std::ptrdiff_t>(i) * cin * hw + p0;
    const T* x2i = x2 ? x2 + static_cast<std::ptrdiff_t>(i) * cin2 * hw + p0 : nullptr;
    const T* wb = wp + static_cast<std::ptrdiff_t>(co0) * (cin + cin2);
    T* yi = y + (static_cast<std::ptrdiff_t>(i) * cout + co0) * hw + p0;
    const T* bb = bias ? bias + co0 : nullptr;
    if (relu)
      c1_fwd_dispatch<T, true>(mb, xi, hw, cin, wb, bb, yi, valid, x2i, cin2);
    else
      c1_fwd_dispatch<T, false>(mb, xi, hw, cin, wb, bb, yi, valid, x2i, cin2);
  }
}

// ---------------------------------------------------------------- weight gradient
inline constexpr int c1w_mr = 4;  ///< output channels (rows of gy) per register block
inline constexpr int c1w_nr = 5;  ///< input channels (rows of x) per register block

/// acc[m][j] += sum over p in [p0, p1) of gy_m[p] · x_j[p]; with Bias also bacc[m] += gy_m[p].
template <class T, int MR, bool Bias>
inline void c1w_span(const T* const* gm, const T* const* xs, std::ptrdiff_t p0, std::ptrdiff_t p1,
                     typename simd<T>::v (&acc)[MR][c1w_nr], typename simd<T>::v (&bacc)[MR]) {
  using S = simd<T>;
  constexpr int L = S::L, NR = c1w_nr;
  std::ptrdiff_t p = p0;
  for (; p + L <= p1; p += L) {
    typename S::v gv[MR];
    for (int m = 0; m < MR; ++m) gv[m] = S::load(gm[m] + p);
    if constexpr (Bias)
      for (int m = 0; m < MR; ++m) bacc[m] = S::add(bacc[m], gv[m]);
    for (int j = 0; j < NR; ++j) {
      typename S::v xv = S::load(xs[j] + p);
      keep_in_register(xv);
      for (int m = 0; m < MR; ++m) acc[m][j] = S::fma(gv[m], xv, acc[m][j]);
    }
  }
  if (p < p1) {
    const int r = static_cast<int>(p1 - p);
    typename S::v gv[MR];
    for (int m = 0; m < MR; ++m) gv[m] = S::load_n(gm[m] + p, r);
    if constexpr (Bias)
      for (int m = 0; m < MR; ++m) bacc[m] = S::add(bacc[m], gv[m]);
    for (int j = 0; j < NR; ++j) {
      const typename S::v xv = S::load_n(xs[j] + p, r);
      for (int m = 0; m < MR; ++m) acc[m][j] = S::fma(gv[m], xv, acc[m][j]);
    }
  }
}

/// One register block: rows co0..co0+MR of gy against rows ci0..ci0+nr of x (nr <= c1w_nr; the
/// missing rows repeat the last one and are not stored), over images [i0, i1) and pixels [p0, p1)
/// of each; adds into gw (cout, cin) and, with Bias, gb (cout).
template <class T, int MR, bool Bias>
inline void c1w_block(const T* x, const T* gy, std::ptrdiff_t hw, int cin, int cout, int i0, int i1, std::ptrdiff_t p0,
                      std::ptrdiff_t p1, int co0, int ci0, int nr, T* gw, T* gb) {
  using S = simd<T>;
  constexpr int NR = c1w_nr;
  typename S::v acc[MR][NR], bacc[MR];
  for (int m = 0; m < MR; ++m) {
    bacc[m] = S::zero();
    for (int j = 0; j < NR; ++j) acc[m][j] = S::zero();
  }
  for (int i = i0; i < i1; ++i) {
    const T* gm[MR];
    const T* xs[NR];
    for (int m = 0; m < MR; ++m) gm[m] = gy + (static_cast<std::ptrdiff_t>(i) * cout + co0 + m) * hw;
    for (int j = 0; j < NR; ++j) xs[j] = x + (static_cast<std::ptrdiff_t>(i) * cin + ci0 + std::min(j, nr - 1)) * hw;
    c1w_span<T, MR, Bias>(gm, xs, p0, p1, acc, bacc);
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < nr; ++j) gw[static_cast<std::ptrdiff_t>(co0 + m) * cin + ci0 + j] += S::hsum(acc[m][j]);
    if constexpr (Bias) gb[co0 + m] += S::hsum(bacc[m]);
  }
}

template <class T, bool Bias>
inline void c1w_dispatch(int mr, const T* x, const T* gy, std::ptrdiff_t hw, int cin, int cout, int i0, int i1,
                         std::ptrdiff_t p0, std::ptrdiff_t p1, int co0, int ci0, int nr, T* gw, T* gb) {
  static_assert(c1w_mr == 4, "c1w_dispatch lists the block heights 1..4");
  switch (mr) {
    case 4: c1w_block<T, 4, Bias>(x, gy, hw, cin, cout, i0, i1, p0, p1, co0, ci0, nr, gw, gb); break;
    case 3: c1w_block<T, 3, Bias>(x, gy, hw, cin, cout, i0, i1, p0, p1, co0, ci0, nr, gw, gb); break;
    case 2: c1w_block<T, 2, Bias>(x, gy, hw, cin, cout, i0, i1, p0, p1, co0, ci0, nr, gw, gb); break;
    default: c1w_block<T, 1, Bias>(x, gy, hw, cin, cout, i0, i1, p0, p1, co0, ci0, nr, gw, gb); break;
  }
}

/// Workspace elements conv1x1_backward_weights needs: one partial gw and gb per thread.
inline std::size_t conv1x1_bww_scratch(int cin, int cout, int threads) {
  return static_cast<std::size_t>(std::max(threads, 1)) * (static_cast<std::size_t>(cout) * cin + cout);
}

/// gw (cout, cin) += sum over images and pixels of gy(co, p) · x(ci, p); gb (cout, may be null)
/// += sum of gy(co, ·). scratch: conv1x1_bww_scratch(cin, cout, threads) elements.
template <class T>
void conv1x1_backward_weights(int n, int cin, int cout, std::ptrdiff_t hw, const T* x, const T* gy, T* gw, T* gb,
                              T* scratch, int threads) {
  constexpr int L = simd<T>::L;
  // Chunks of (images, pixel range) whose gy and x rows fit in ~512 KiB of L2: every register
  // block of the chunk re-reads them from there.
  const std::ptrdiff_t budget = std::max<std::ptrdiff_t>(
      static_cast<std::ptrdiff_t>(L) * 16, (std::ptrdiff_t(512) * 1024 / static_cast<std::ptrdiff_t>(sizeof(T))) / (cin + cout) / L * L);
  struct chunk {
    int i0, i1;
    std::ptrdiff_t p0, p1;
  };
  std::vector<chunk> chunks;
  if (hw <= budget) {
    const int per = static_cast<int>(std::max<std::ptrdiff_t>(1, budget / hw));
    for (int i = 0; i < n; i += per) chunks.push_back({i, std::min(n, i + per), 0, hw});
  } else {
    for (int i = 0; i < n; ++i)
      for (std::ptrdiff_t p = 0; p < hw; p += budget) chunks.push_back({i, i + 1, p, std::min(hw, p + budget)});
  }
  const int ncob = (cout + c1w_mr - 1) / c1w_mr, ncib = (cin + c1w_nr - 1) / c1w_nr;
  const std::ptrdiff_t pairs = static_cast<std::ptrdiff_t>(ncob) * ncib;
  const std::ptrdiff_t tasks = static_cast<std::ptrdiff_t>(chunks.size()) * pairs;
  const double work = static_cast<double>(n) * static_cast<double>(hw) * cin * cout;
  const int team = (work > 2e5 && tasks > 1) ? std::max(threads, 1) : 1;
  const std::size_t per = static_cast<std::size_t>(cout) * cin + cout;
  std::fill(scratch, scratch + per * static_cast<std::size_t>(team), T(0));
#pragma omp parallel num_threads(team) if (team > 1)
  {
    int me = 0;
#ifdef _OPENMP
    me = omp_get_thread_num();
#endif
    T* pw = scratch + per * static_cast<std::size_t>(me);
    T* pgb = pw + static_cast<std::size_t>(cout) * cin;
#pragma omp for schedule(static)
    for (std::ptrdiff_t task = 0; task < tasks; ++task) {
      const chunk& c = chunks[static_cast<std::size_t>(task / pairs)];
      const std::ptrdiff_t pr = task % pairs;
      const int co0 = static_cast<int>(pr / ncib) * c1w_mr, ci0 = static_cast<int>(pr % ncib) * c1w_nr;
      const int mb = std::min(c1w_mr, cout - co0), nr = std::min(c1w_nr, cin - ci0);
      if (gb && ci0 == 0)
        c1w_dispatch<T, true>(mb, x, gy, hw, cin, cout, c.i0, c.i1, c.p0, c.p1, co0, ci0, nr, pw, pgb);
      else
        c1w_dispatch<T, false>(mb, x, gy, hw, cin, cout, c.i0, c.i1, c.p0, c.p1, co0, ci0, nr, pw, pgb);
    }
  }
  for (int t = 0; t < team; ++t) {
    const T* pw = scratch + per * static_cast<std::size_t>(t);
    for (std::size_t e = 0; e < static_cast<std::size_t>(cout) * cin; ++e) gw[e] += pw[e];
    if (gb)
      for (int co = 0; co < cout; ++co) gb[co] += pw[static_cast<std::size_t>(cout) * cin + co];
  }
}

}  // namespace useg::detail
