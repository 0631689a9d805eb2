// useg/backend/cpu/winograd_kernels.hpp — Winograd F(2×2, 3×3) convolution of the CPU backend
// (3×3, same padding, stride 1), for the forward and backward-data passes, float and double,
// where F(4×4, 3×3) (winograd4_kernels.hpp) does not fit or pay, and for the weight gradient.
//
// Each 2×2 output tile needs a 4×4 input tile and 16 multiplications per (input, output)
// channel pair instead of 36: V = Bᵀ d B (input), U = G g Gᵀ (weights), M = Σ_ci U ⊙ V (16
// small GEMMs), y = Aᵀ M A. Its rounding is that of a direct convolution (the transforms only
// add and halve).
//
// Layout: the zero-padded input is split by row and column parity into four quarter planes of
// row stride QS = TW + 1 (TW tiles per row). Tile (ty, tx) then has flat index τ = ty·QS + tx,
// and element (r, c) of every tile sits at quarter plane (r&1, c&1), offset τ + (r>>1)·QS +
// (c>>1): a run of consecutive τ — across tile rows — is a run of consecutive values, so the
// input transform is plain vector loads and adds, with no gathers, for any plane size.
//
// Small planes (wino_geometry::dense): there a tile row is shorter than a vector, and one vector
// per tile row wastes most of the work (8×8: four tile rows of 4 tiles, 64 computed, 16 useful), so the
// padded input is split into eight planes per channel instead, (row parity, column offset 0..3)
// with row stride TW: element (r, c) of tile τ = ty·TW + tx sits at plane (r&1, c), offset τ +
// (r>>1)·TW. No junk column; it is used when an image's tile count is a whole number of vectors,
// so a task's vectors are numbered across the images of the batch.
//
// Tile vectors (L tiles each) of the quarter layout start at tx = 0, L, 2L, ... of one tile row,
// so a vector's outputs are whole aligned vector runs in its two output rows (stores that straddle
// cache lines and rows cost up to a third of a 16-channel forward pass); tiles past TW in a row's
// last vector are computed and not stored. Vectors are numbered across the images of the batch.
//
// Per task (wino_nv vectors of L tiles): the input transform of every channel
// into a thread-local V block, then per block of fwd_mr output channels the 16 GEMMs (the
// direct kernel's register block, fwd_block) into an M block, the output transform, and the
// stores (the two columns of a tile row interleaved into consecutive outputs).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "useg/backend/cpu/conv_kernels.hpp"
#include "useg/core/error.hpp"

namespace useg::detail {

inline constexpr int wino_nv = 3;  ///< tile vectors per task

/// Which Winograd convolutions 3×3 convolutions with at least 8 input and 8 output channels use,
/// from the environment variable USEG_CPU_WINOGRAD (read once per process): unset, empty or 1
/// (the default), F(4×4,3×3) where it fits and pays (winograd4_kernels.hpp: use_winograd4),
/// F(2×2,3×3) elsewhere; 0 none (the direct kernels); 2 F(2×2,3×3) only; 4 F(4×4,3×3) wherever it
/// fits the plane, however small the call (for tests and measurements). Any other value throws
/// useg::config_error naming the variable (at the first convolution), rather than silently
/// measuring the default.
inline int wino_mode() {
  static const int mode = [] {
    const char* e = std::getenv("USEG_CPU_WINOGRAD");
    if (!e || !*e) return 1;
    if ((e[0] == '0' || e[0] == '1' || e[0] == '2' || e[0] == '4') && e[1] == 0) return e[0] - '0';
    throw config_error(std::string("USEG_CPU_WINOGRAD=\"") + e +
                       "\": expected 0 (direct kernels), 1 (default), 2 (F(2x2,3x3) only) or 4 (F(4x4,3x3) wherever it fits)");
  }();
  return mode;
}
inline bool wino_enabled() { return wino_mode() != 0; }
inline bool use_winograd(int k, int cin, int cout) { return k == 3 && cin >= 8 && cout >= 8 && wino_enabled(); }
/// The Winograd weight gradient pays for its transforms from 64 channels each way on (measured).
inline bool use_winograd_weight_grad(int k, int cin, int cout) {
  return k == 3 && cin >= 64 && cout >= 64 && wino_enabled();
}

struct wino_geometry {
  int h = 0, w = 0, TH = 0, TW = 0;
  /// Dense layout (small planes whose tile count is a whole number of vectors): eight planes per
  /// channel, (row parity, column 0..3) of the padded input with row stride TW, so tile indices
  /// have no junk column and a task's vectors may come from different images. Otherwise the four
  /// quarter planes described at the top of this file.
  bool dense = false;
  /// Row stride of the planes, and so of the tile index τ = ty·QS + tx: TW + 1 (the junk
  /// column), or TW when dense.
  std::ptrdiff_t QS = 0;
  std::ptrdiff_t tn = 0;     ///< tile index extent: (TH-1)·QS + TW
  std::ptrdiff_t qsize = 0;  ///< elements of one quarter plane (with zeroed slack)
  std::ptrdiff_t off[4][4] = {};  ///< where element (r, c) of tile 0 sits in a channel's planes
  /// Dense pays where the junk column and the per-image task rounding cost most (its padding
  /// writes twice the input). Measured (2 threads, float): the forward gains on planes up to 32
  /// wide (8×8: time ×0.6, 16×16: ×0.8, 32×32: ×0.95-1.0), the weight gradient only on 8×8 (×0.55;
  /// ×1.1-1.25 on 16×16 and 32×32): dense_max_tw is 16 for the forward kernels, 4 for the weight
  /// gradient.
  wino_geometry(int h_, int w_, int lanes, int dense_max_tw = 16) : h(h_), w(w_) {
    TH = (h + 1) / 2;
    TW = (w + 1) / 2;
    dense = TW <= dense_max_tw && (static_cast<std::ptrdiff_t>(TH) * TW) % lanes == 0;
    QS = dense ? TW : TW + 1;
    tn = static_cast<std::ptrdiff_t>(TH - 1) * QS + TW;
    const std::ptrdiff_t rows = TH + 1;  // quarter rows 0..TH
    const std::ptrdiff_t slack = static_cast<std::ptrdiff_t>(lanes) * (wino_nv + 1) + QS + 1;
    qsize = (rows * QS + slack + lanes - 1) / lanes * lanes;
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c)
        off[r][c] = dense ? ((r & 1) * 4 + c) * qsize + (r >> 1) * QS
                          : ((r & 1) * 2 + (c & 1)) * qsize + (r >> 1) * QS + (c >> 1);
  }
  /// The planes of one channel: four quarter planes, eight when dense.
  std::ptrdiff_t plane() const { return (dense ? 8 : 4) * qsize; }
};

/// ev[j] = src[2j], od[j] = src[2j + 1] for the n values of src.
template <class T>
inline void deinterleave_row(const T* src, int n, T* ev, T* od) {
  using S = simd<T>;
  constexpr int L = S::L;
  int x = 0;
  for (; x + 2 * L <= n; x += 2 * L) {
    typename S::v e, o;
    S::deinterleave(S::load(src + x), S::load(src + x + L), e, o);
    S::store(ev + x / 2, e);
    S::store(od + x / 2, o);
  }
  if (x < n) {
    const int r = n - x;
    typename S::v e, o;
    S::deinterleave(S::load_n(src + x, std::min(r, L)), r > L ? S::load_n(src + x + L, r - L) : S::zero(), e, o);
    if ((r + 1) / 2) S::store_lanes(ev + x / 2, e, 0, (r + 1) / 2);
    if (r / 2) S::store_lanes(od + x / 2, o, 0, r / 2);
  }
}

/// Split `planes` planes (h, w) of src (plane_src::plane), zero-padded by one pixel, into quarter
/// planes (4·qsize elements per plane): quarter (rp, cp) holds padded[2Y + rp][2X + cp] at
/// Y·QS + X.
template <class T>
void wino_pad(const wino_geometry& g, std::ptrdiff_t planes, const plane_src<T>& src, T* xq) {
  const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(g.h) * g.w;
  const std::ptrdiff_t rows = g.TH + 1;  // quarter rows 0..TH
  const std::size_t row_bytes = static_cast<std::size_t>(g.QS) * sizeof(T);
  const int ev_n = (g.w + 1) / 2, od_n = g.w / 2;  // even / odd columns of an image row
#pragma omp parallel for schedule(static) if (planes * hw > (1 << 14))
  for (std::ptrdiff_t i = 0; i < planes; ++i) {
    T* d = xq + i * g.plane();
    const T* s = src.plane(i);
    if (g.dense) {
      // Plane (rp, c), row Y, column X: padded[2Y + rp][2X + c] = x[2Y + rp - 1][2X + c - 1].
      const int TW = g.TW;
      for (std::ptrdiff_t Y = 0; Y < rows; ++Y)
        for (int rp = 0; rp < 2; ++rp) {
          T* p[4];
          for (int c = 0; c < 4; ++c) p[c] = d + static_cast<std::ptrdiff_t>(rp * 4 + c) * g.qsize + Y * g.QS;
          const std::ptrdiff_t R = 2 * Y + rp;
          if (R < 1 || R > g.h) {
            for (int c = 0; c < 4; ++c) std::memset(p[c], 0, row_bytes);
            continue;
          }
          deinterleave_row<T>(s + (R - 1) * g.w, g.w, p[1], p[2]);  // c = 1: x[2X]; c = 2: x[2X + 1]
          for (int X = od_n; X < TW; ++X) p[2][X] = T(0);
          p[0][0] = T(0);  // c = 0: x[2X - 1]
          std::memcpy(p[0] + 1, p[2], static_cast<std::size_t>(TW - 1) * sizeof(T));
          std::memcpy(p[3], p[1] + 1, static_cast<std::size_t>(ev_n - 1) * sizeof(T));  // c = 3: x[2X + 2]
          for (int X = ev_n - 1; X < TW; ++X) p[3][X] = T(0);
        }
      for (int q = 0; q < 8; ++q)
        std::memset(d + q * g.qsize + rows * g.QS, 0, static_cast<std::size_t>(g.qsize - rows * g.QS) * sizeof(T));
      continue;
    }
    // Row by row (one pass over memory), then the slack after the rows. Padding rows are zeroed
    // whole; an image row fills X = 1 .. w/2 of its even-column quarter row and 0 .. (w+1)/2 - 1
    // of its odd one, so only the padding columns left of and right of those are zeroed.
    for (std::ptrdiff_t Y = 0; Y < rows; ++Y)
      for (int rp = 0; rp < 2; ++rp) {
        T* q0 = d + static_cast<std::ptrdiff_t>(rp * 2) * g.qsize + Y * g.QS;  // even padded columns
        T* q1 = q0 + g.qsize;                                                   // odd padded columns
        const std::ptrdiff_t R = 2 * Y + rp;  // padded row; image row R - 1
        if (R < 1 || R > g.h) {
          std::memset(q0, 0, row_bytes);
          std::memset(q1, 0, row_bytes);
          continue;
        }
        const T* sr = s + (R - 1) * g.w;
        // padded column C = x + 1: x odd -> even C (quarter cp 0, X = (x+1)/2); x even -> cp 1, X = x/2
        deinterleave_row<T>(sr, g.w, q1, q0 + 1);
        q0[0] = T(0);
        for (std::ptrdiff_t X = 1 + od_n; X < g.QS; ++X) q0[X] = T(0);
        for (std::ptrdiff_t X = ev_n; X < g.QS; ++X) q1[X] = T(0);
      }
    for (int q = 0; q < 4; ++q)
      std::memset(d + q * g.qsize + rows * g.QS, 0, static_cast<std::size_t>(g.qsize - rows * g.QS) * sizeof(T));
  }
}
/// The same for `planes` consecutive planes from x.
template <class T>
void wino_pad(const wino_geometry& g, std::ptrdiff_t planes, const T* x, T* xq) {
  wino_pad<T>(g, planes, plane_src<T>(x, 1, static_cast<std::ptrdiff_t>(g.h) * g.w), xq);
}

/// Pack U = G g Gᵀ of the 3×3 weights w (cout, cin) — or, when flip, of the backward-data
/// weights w'(ci, co) = rot180(w(co, ci)) of a (cin, cout) tensor — in blocks of fwd_mr output
/// channels: block at co0 (mb channels) at offset 16·co0·cin, laid out [ξ][ci][m].
/// Eight output channels side by side in one vector (GCC/Clang vector extensions): the weight
/// transforms do the same arithmetic as one channel at a time, 8 at once.
template <class T>
struct wino_v8 {
  typedef T type __attribute__((vector_size(8 * sizeof(T))));
};

/// The 3×3 taps of input channel ci for output channels co0 .. co0 + mb - 1 of w (cout, cin, 3,
/// 3), zeros past mb: g[ky][kx] lane m. flip: w is (cin, cout, 3, 3), read transposed and
/// rotated by 180° (the backward-data convolution's weights).
template <class T>
inline void wino_gather_taps(const T* w, int cout, int cin, bool flip, int co0, int mb, int ci,
                             typename wino_v8<T>::type (&g)[3][3]) {
  using v8 = typename wino_v8<T>::type;
  const T* src[8];  // the 9 taps of output channel co0 + m (null past the block's end)
  for (int m = 0; m < 8; ++m)
    src[m] = m >= mb ? nullptr
             : flip  ? w + (static_cast<std::ptrdiff_t>(ci) * cout + co0 + m) * 9
                     : w + (static_cast<std::ptrdiff_t>(co0 + m) * cin + ci) * 9;
#ifndef __CUDACC__  // nvcc's front end (parsing this header for the CUDA tests) lacks vector initializers
  if (mb == 8) {
    // Each vector built from its 8 values in registers: storing them one by one to memory and
    // loading the vector back stalls on store forwarding (it took 65% of the weight packing).
    for (int k = 0; k < 9; ++k) {
      const int kk = flip ? 8 - k : k;
      g[k / 3][k % 3] = v8{src[0][kk], src[1][kk], src[2][kk], src[3][kk], src[4][kk], src[5][kk], src[6][kk], src[7][kk]};
    }
    return;
  }
#endif
  alignas(64) T gs[9][8];  // [tap][m]
  for (int m = 0; m < 8; ++m)
    for (int k = 0; k < 9; ++k) gs[k][m] = m >= mb ? T(0) : src[m][flip ? 8 - k : k];
  for (int k = 0; k < 9; ++k) std::memcpy(&g[k / 3][k % 3], gs[k], sizeof(v8));
}

/// The weight transform U = G g Gᵀ of a Winograd convolution with NX = n² points for output
/// channels co0 .. co0 + mb - 1 (mb ≤ 8) and every input channel of w (cout, cin, 3, 3), into blk
/// laid out [ξ][ci][m]: blk[(ξ·cin + ci)·mb + m]. transform(g, u) maps the taps g[3][3] of 8 output
/// channels to u[NX] (8 lanes each). flip: see wino_gather_taps.
template <class T, int NX, class Transform>
void wino_pack_block(const T* w, int cout, int cin, bool flip, int co0, int mb, T* blk, Transform&& transform) {
  using v8 = typename wino_v8<T>::type;
  // Transformed into a chunk of CH input channels (L1), then copied out as NX runs of CH·mb
  // contiguous values: storing each channel's NX vectors straight to the NX rows (cin·mb apart,
  // a multiple of 4 KiB for most widths) conflicted in the L1 sets (F(4×4,3×3): 7 GB/s).
  constexpr int CH = 16;
  alignas(64) T buf[NX][CH][8];
  for (int c0 = 0; c0 < cin; c0 += CH) {
    const int cn = std::min(CH, cin - c0);
    for (int c = 0; c < cn; ++c) {
      v8 g[3][3], u[NX];
      wino_gather_taps<T>(w, cout, cin, flip, co0, mb, c0 + c, g);
      transform(g, u);
      for (int k = 0; k < NX; ++k) std::memcpy(buf[k][c], &u[k], sizeof(v8));
    }
    for (int k = 0; k < NX; ++k) {
      T* dst = blk + (static_cast<std::ptrdiff_t>(k) * cin + c0) * mb;
      if (mb == 8) {
        // In the 8-lane vectors they were stored as: wider loads of the just-stored buffer stall
        // on store forwarding, and a copy loop becomes a memmove call (which loads 64 bytes at a
        // time) unless the values pass through a register.
        for (int c = 0; c < cn; ++c) {
          v8 t;
          std::memcpy(&t, buf[k][c], sizeof t);
          keep_in_register(t);
          std::memcpy(dst + c * 8, &t, sizeof t);
        }
      } else {
        for (int c = 0; c < cn; ++c)
          for (int m = 0; m < mb; ++m) dst[c * mb + m] = buf[k][c][m];
      }
    }
  }
}

/// wino_pack_block for every block of fwd_mr output channels: block at co0 at offset NX·co0·cin.
template <class T, int NX, class Transform>
void wino_pack_blocks(const T* w, int cout, int cin, bool flip, T* up, Transform&& transform) {
  static_assert(fwd_mr == 8, "the Winograd weight packing transforms blocks of 8 output channels");
  const std::ptrdiff_t nb = (cout + fwd_mr - 1) / fwd_mr;
  // Split from 2 blocks and 16K transformed values on (F(4×4,3×3) 64 × 64 channels ran alone before).
#pragma omp parallel for schedule(static) if (nb >= 2 && static_cast<double>(NX) * cout * cin >= 16384)
  for (std::ptrdiff_t bi = 0; bi < nb; ++bi) {
    const int co0 = static_cast<int>(bi) * fwd_mr;
    wino_pack_block<T, NX>(w, cout, cin, flip, co0, std::min(fwd_mr, cout - co0), up + static_cast<std::ptrdiff_t>(NX) * co0 * cin,
                           transform);
  }
}

/// F(2×2,3×3)'s weight transform: U = G g Gᵀ (4×4) of 8 output channels at once.
template <class T>
struct wino2_weight_transform {
  using v8 = typename wino_v8<T>::type;
  void operator()(const v8 (&g)[3][3], v8 (&u)[16]) const {
    // G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]]; t = G g (4×3), U = t Gᵀ (4×4)
    const T h = T(0.5);
    v8 t[4][3];
    for (int c = 0; c < 3; ++c) {
      t[0][c] = g[0][c];
      t[1][c] = h * (g[0][c] + g[1][c] + g[2][c]);
      t[2][c] = h * (g[0][c] - g[1][c] + g[2][c]);
      t[3][c] = g[2][c];
    }
    for (int r = 0; r < 4; ++r) {
      u[r * 4 + 0] = t[r][0];
      u[r * 4 + 1] = h * (t[r][0] + t[r][1] + t[r][2]);
      u[r * 4 + 2] = h * (t[r][0] - t[r][1] + t[r][2]);
      u[r * 4 + 3] = t[r][2];
    }
  }
};

/// F(2×2,3×3): U = G g Gᵀ (4×4) in wino_pack_blocks' layout (NX = 16).
template <class T>
void wino_pack_weights(const T* w, int cout, int cin, bool flip, T* up) {
  wino_pack_blocks<T, 16>(w, cout, cin, flip, up, wino2_weight_transform<T>{});
}

/// V = Bᵀ d B of one channel for L tiles from τ (its planes at base = channel planes + τ): 16
/// vectors, V[r·4 + c] for ξ = (r, c).
template <class T>
inline void wino_v(const wino_geometry& g, const T* base, typename simd<T>::v (&V)[16]) {
  using S = simd<T>;
  typename S::v d[4][4], t[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) d[r][c] = S::load(base + g.off[r][c]);
  for (int c = 0; c < 4; ++c) {
    t[0][c] = S::sub(d[0][c], d[2][c]);
    t[1][c] = S::add(d[1][c], d[2][c]);
    t[2][c] = S::sub(d[2][c], d[1][c]);
    t[3][c] = S::sub(d[1][c], d[3][c]);
  }
  for (int r = 0; r < 4; ++r) {
    V[r * 4 + 0] = S::sub(t[r][0], t[r][2]);
    V[r * 4 + 1] = S::add(t[r][1], t[r][2]);
    V[r * 4 + 2] = S::sub(t[r][2], t[r][1]);
    V[r * 4 + 3] = S::sub(t[r][1], t[r][3]);
  }
}

/// The vectors of one task: vector n (n < count) holds L consecutive tiles from tile index t[n]
/// of image img[n].
struct wino_task {
  int count = 0;
  int img[wino_nv] = {};
  std::ptrdiff_t t[wino_nv] = {};
};

/// Input transform of the channel planes xq (wino_pad; image i at xq + i·cin·plane) for the
/// task's tile vectors into V[ξ][ci][NV·L].
template <class T>
inline void wino_input_transform(const wino_geometry& g, int cin, const T* xq, const wino_task& tk, T* V) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int NV = wino_nv;
  const int L = S::L;
  const std::ptrdiff_t vs = static_cast<std::ptrdiff_t>(NV) * L;  // one (ξ, ci) row of V
  const std::ptrdiff_t xs = static_cast<std::ptrdiff_t>(cin) * vs;  // one ξ of V
  const std::ptrdiff_t plane = g.plane();
  for (int ci = 0; ci < cin; ++ci) {
    T* out = V + ci * vs;
    for (int n = 0; n < tk.count; ++n) {
      const std::ptrdiff_t o = static_cast<std::ptrdiff_t>(n) * L;
      const T* base = xq + (static_cast<std::ptrdiff_t>(tk.img[n]) * cin + ci) * plane + tk.t[n];
      v vt[16];
      wino_v<T>(g, base, vt);
      for (int k = 0; k < 16; ++k) S::store(out + k * xs + o, vt[k]);
    }
  }
}

/// Output transform of M[ξ][m][NV·L] (mb channels, from co0) for the task's tile vectors and
/// stores into the output planes y (image i, channel co at y + (i·cout + co)·hw), with bias (and
/// ReLU when Relu), then plus res (laid out as y; null: none).
template <class T, bool Relu, bool Stream>
inline void wino_output_transform(const wino_geometry& g, int mb, const T* M, const T* bias, T* y, int cout, int co0,
                                  const wino_task& tk, const T* res = nullptr) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int NV = wino_nv;
  const int L = S::L;
  const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(g.h) * g.w;
  const std::ptrdiff_t vs = static_cast<std::ptrdiff_t>(NV) * L;
  const std::ptrdiff_t xs = static_cast<std::ptrdiff_t>(mb) * vs;
  // Output row 2ty + a, column 2tx + b: a virtual flat index 2τ + b over rows of 2·QS values.
  const std::ptrdiff_t W2v = 2 * g.QS;
  std::ptrdiff_t qend[2];
  for (int a = 0; a < 2; ++a) {
    const std::ptrdiff_t rows = (g.h - a + 1) / 2;
    qend[a] = rows > 0 ? (rows - 1) * W2v + g.w : 0;
  }
  for (int m = 0; m < mb; ++m) {
    const v b = S::set1(bias ? bias[m] : T(0));
    const T* Mm = M + m * vs;
    for (int n = 0; n < tk.count; ++n) {
      const std::ptrdiff_t o = static_cast<std::ptrdiff_t>(n) * L;
      const std::ptrdiff_t tt = tk.t[n];
      if (tt >= g.tn) break;
      T* yc = y + (static_cast<std::ptrdiff_t>(tk.img[n]) * cout + co0 + m) * hw;
      // Quarter layout: the vector's tiles lie in one tile row (wino_forward numbers them so),
      // starting at a multiple of L, so its outputs are two runs of 2L values from a multiple of
      // 2L in output rows 2ty and 2ty + 1: whole aligned vector stores (where the row width is a
      // multiple of L), masked only at the row's end.
      const std::ptrdiff_t ty = tt / g.QS, tx = tt - ty * g.QS;
      v mm[4][4];
      for (int k = 0; k < 16; ++k) mm[k / 4][k % 4] = S::load(Mm + k * xs + o);
      v s[2][4];
      for (int c = 0; c < 4; ++c) {  // Aᵀ M
        s[0][c] = S::add(S::add(mm[0][c], mm[1][c]), mm[2][c]);
        s[1][c] = S::sub(S::sub(mm[1][c], mm[2][c]), mm[3][c]);
      }
      for (int a = 0; a < 2; ++a) {  // (Aᵀ M) A
        v y0 = S::add(S::add(S::add(s[a][0], s[a][1]), s[a][2]), b);
        v y1 = S::add(S::sub(S::sub(s[a][1], s[a][2]), s[a][3]), b);
        if constexpr (Relu) {
          y0 = S::relu(y0);
          y1 = S::relu(y1);
        }
        v lo, hi;
        S::interleave(y0, y1, lo, hi);
        if (!g.dense) {
          const std::ptrdiff_t row = 2 * ty + a, col = 2 * tx;
          if (row >= g.h) continue;
          T* yr = yc + row * g.w + col;
          const std::ptrdiff_t left = g.w - col;  // > 0: tx < TW
          if (res) {
            const T* rr = res + (yr - y);
            lo = S::add(lo, left >= L ? S::load(rr) : S::load_n(rr, static_cast<int>(left)));
            if (left > L) hi = S::add(hi, left >= 2 * L ? S::load(rr + L) : S::load_n(rr + L, static_cast<int>(left - L)));
          }
          if (left >= 2 * L) {
            if constexpr (Stream) {
              S::stream(yr, lo);
              S::stream(yr + L, hi);
            } else {
              S::store(yr, lo);
              S::store(yr + L, hi);
            }
          } else if (left > L) {
            S::store(yr, lo);
            S::store_lanes(yr + L, hi, 0, static_cast<int>(left - L));
          } else {
            S::store_lanes(yr, lo, 0, static_cast<int>(left));
          }
          continue;
        }
        T* ya = yc + a * g.w;
        const T* ra = res ? res + (ya - y) : nullptr;
        const std::ptrdiff_t q = 2 * tt;
        if (q < qend[a]) store_run<T>(ya, W2v, g.w, 2 * static_cast<std::ptrdiff_t>(g.w), lo, q, qend[a], ra);
        if (q + L < qend[a]) store_run<T>(ya, W2v, g.w, 2 * static_cast<std::ptrdiff_t>(g.w), hi, q + L, qend[a], ra);
      }
    }
  }
}

/// M[ξ] = U[ξ] · V[ξ] for the NX points ξ of the transform (16 for F(2×2,3×3), 36 for
/// F(4×4,3×3)): an MR-channel block of outputs for the first NV of the task's wino_nv tile
/// vectors (rows of V and M are wino_nv·L long).
template <class T, int MR, int NX = 16, int NV = wino_nv>
inline void wino_gemm_block(int cin, const T* V, const T* U, T* M) {
  using S = simd<T>;
  static_assert(NV >= 1 && NV <= wino_nv);
  const std::ptrdiff_t vs = static_cast<std::ptrdiff_t>(wino_nv) * S::L;
  const std::ptrdiff_t zero = 0;
  for (int k = 0; k < NX; ++k) {
    typename S::v acc[MR][NV];
    fwd_block<T, MR, NV>(V + k * cin * vs, vs, cin, &zero, 1, 1, U + static_cast<std::ptrdiff_t>(k) * cin * MR, acc);
    T* Mk = M + static_cast<std::ptrdiff_t>(k) * MR * vs;
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NV; ++n) S::store(Mk + m * vs + n * S::L, acc[m][n]);
  }
}

/// wino_gemm_block for mb output channels and the task's first `count` tile vectors: full blocks
/// of a task with fewer vectors (wino_forward's few-task split) run a narrower product; partial
/// blocks (the last one of a width off fwd_mr) compute all wino_nv vectors.
template <class T, int NX = 16>
inline void wino_gemm_dispatch(int mb, int cin, const T* V, const T* U, T* M, int count = wino_nv) {
  static_assert(fwd_mr == 8, "wino_gemm_dispatch lists the block heights 1..8");
  static_assert(wino_nv == 3, "wino_gemm_dispatch lists the narrower products for 1 and 2 vectors");
  if (mb == 8 && count == 1) return wino_gemm_block<T, 8, NX, 1>(cin, V, U, M);
  if (mb == 8 && count == 2) return wino_gemm_block<T, 8, NX, 2>(cin, V, U, M);
  switch (mb) {
    case 8: wino_gemm_block<T, 8, NX>(cin, V, U, M); break;
    case 7: wino_gemm_block<T, 7, NX>(cin, V, U, M); break;
    case 6: wino_gemm_block<T, 6, NX>(cin, V, U, M); break;
    case 5: wino_gemm_block<T, 5, NX>(cin, V, U, M); break;
    case 4: wino_gemm_block<T, 4, NX>(cin, V, U, M); break;
    case 3: wino_gemm_block<T, 3, NX>(cin, V, U, M); break;
    case 2: wino_gemm_block<T, 2, NX>(cin, V, U, M); break;
    default: wino_gemm_block<T, 1, NX>(cin, V, U, M); break;
  }
}

/// f(relu, stream) with the run-time flags as std::bool_constant values (the output transforms
/// take them as template parameters).
template <class F>
inline void wino_with_flags(bool relu, bool stream, F&& f) {
  using yes = std::true_type;
  using no = std::false_type;
  if (stream) {
    if (relu) f(yes{}, yes{});
    else f(no{}, yes{});
  } else if (relu) {
    f(yes{}, no{});
  } else {
    f(no{}, no{});
  }
}

/// Per-thread scratch (V and M blocks) of the Winograd convolution, in elements.
template <class T>
std::size_t wino_scratch(int cin) {
  const std::size_t vs = static_cast<std::size_t>(wino_nv) * simd<T>::L;
  return 16 * vs * (static_cast<std::size_t>(cin) + fwd_mr);
}

/// The tile vectors of a forward call over n images: dense, L consecutive tile indices (rows run
/// on); quarter layout, vpr vectors per tile row from tx = 0, L, 2L, ... (the last one's tiles past
/// TW are computed and not stored), so a vector's outputs are aligned runs in two output rows.
/// Numbered across the images.
template <class T>
struct wino_vectors {
  std::ptrdiff_t vpr, per_img, nvec;
  wino_vectors(const wino_geometry& g, int n)
      : vpr((g.TW + simd<T>::L - 1) / simd<T>::L),
        per_img(g.dense ? g.tn / simd<T>::L : static_cast<std::ptrdiff_t>(g.TH) * vpr),
        nvec(static_cast<std::ptrdiff_t>(n) * per_img) {}
  /// The task of vectors v0 .. v1 - 1 (at most wino_nv of them).
  wino_task task(const wino_geometry& g, std::ptrdiff_t v0, std::ptrdiff_t v1) const {
    wino_task tk;
    for (std::ptrdiff_t gv = v0; gv < v1; ++gv) {
      const int v = static_cast<int>(gv - v0);
      tk.img[v] = static_cast<int>(gv / per_img);
      const std::ptrdiff_t r = gv % per_img;
      tk.t[v] = g.dense ? r * simd<T>::L : (r / vpr) * g.QS + (r % vpr) * simd<T>::L;
      tk.count = v + 1;
    }
    return tk;
  }
};

/// Outputs at least this large (all images of the call, in bytes) are written with non-temporal
/// stores: they do not stay in the cores' L2 (1 MiB each here) for the next layer anyway, and a
/// plain store first reads every line it fills. A/B of useg_bench against plain stores: U-Net w16
/// 128²×8 training ×1.04 (×1.02 streaming every output, also the small ones); streaming every
/// output, w16 256²×8 inference ×1.10, w32 256²×4 training ×1.07.
inline constexpr std::size_t wino_stream_min_bytes = std::size_t(4) << 20;

/// y (n, cout, h, w) = conv3×3(x) + bias (then ReLU when relu) (then + res when res is not null:
/// laid out as y), from quarter planes xq (wino_pad) and packed weights up (wino_pack_weights);
/// scratch: threads × wino_scratch(cin).
/// stream: write y with non-temporal stores (wino_stream_min_bytes); the dense layout ignores it
/// (its runs of stores cross rows, and its planes are small).
template <class T>
void wino_forward(const wino_geometry& g, int n, int cin, int cout, const T* xq, const T* up, const T* bias, T* y,
                  bool relu, T* scratch, int threads, bool stream = false, const T* res = nullptr) {
  using S = simd<T>;
  const std::ptrdiff_t tb = static_cast<std::ptrdiff_t>(wino_nv) * S::L;
  const wino_vectors<T> vecs(g, n);  // the tile vectors
  const std::ptrdiff_t nvec = vecs.nvec;
  std::ptrdiff_t tasks = (nvec + wino_nv - 1) / wino_nv;
  // Few tasks (small planes: 16×16 at batch 1, 8×8 at batch 8): a multiple of the threads, with
  // the vectors spread evenly (task k: vectors k·nvec/tasks ..), so that no thread waits on a
  // partner with more full tasks and no task computes empty vectors (wino_gemm_dispatch's count).
  // 4 vectors: tasks of 3 + 1 -> 2 + 2; 8 vectors: 3 + 3 + 2 on two threads -> 2 + 2 + 2 + 2.
  const bool even = threads > 1 && tasks < 4 * threads;
  if (even) tasks = std::min(nvec, (tasks + threads - 1) / threads * threads);
  const std::size_t per = wino_scratch<T>(cin);
#pragma omp parallel num_threads(threads) if (threads > 1 && tasks > 1)
  {
    int me = 0;
#ifdef _OPENMP
    me = omp_get_thread_num();
#endif
    T* V = scratch + per * static_cast<std::size_t>(me);
    T* M = V + 16 * tb * cin;
#pragma omp for schedule(static) nowait
    for (std::ptrdiff_t task = 0; task < tasks; ++task) {
      const std::ptrdiff_t v0 = even ? task * nvec / tasks : task * wino_nv;
      const wino_task tk = vecs.task(g, v0, even ? (task + 1) * nvec / tasks : std::min(nvec, v0 + wino_nv));
      wino_input_transform<T>(g, cin, xq, tk, V);
      for (int co0 = 0; co0 < cout; co0 += fwd_mr) {
        const int mb = std::min(fwd_mr, cout - co0);
        wino_gemm_dispatch<T>(mb, cin, V, up + static_cast<std::ptrdiff_t>(16) * co0 * cin, M, tk.count);
        const T* bb = bias ? bias + co0 : nullptr;
        // (The dense layout stores in runs, store_run, never streamed.)
        wino_with_flags(relu, stream && !g.dense, [&](auto r, auto st) {
          wino_output_transform<T, decltype(r)::value, decltype(st)::value>(g, mb, M, bb, y, cout, co0, tk, res);
        });
      }
    }
    if (stream) S::fence();  // the non-temporal stores drain before the region's closing barrier
  }
}

/// Few tile vectors (small planes at batch 1: 16×16 has 4 vectors of 16 tiles): the weight-heavy
/// case, where packing every weight (16 values per channel pair, written out and read back by
/// each task) costs about as much as the products. wino_forward_fused transforms the weights of
/// one block of output channels at a time into a per-thread buffer (L2) and uses them at once for
/// every tile vector, whose input transforms are made first, once.
template <class T>
inline bool wino_fuse_weights(const wino_geometry& g, int n, int threads) {
  return wino_vectors<T>(g, n).nvec <= std::ptrdiff_t(2) * wino_nv * std::max(threads, 1);
}

/// Scratch of wino_forward_fused, in elements: the input transforms of every task, then per
/// thread one output-channel block's transformed weights and its products.
template <class T>
std::size_t wino_fused_scratch(const wino_geometry& g, int n, int cin, int threads) {
  const std::size_t tb = static_cast<std::size_t>(wino_nv) * simd<T>::L;
  const std::size_t tasks = static_cast<std::size_t>((wino_vectors<T>(g, n).nvec + wino_nv - 1) / wino_nv);
  return tasks * 16 * tb * cin + static_cast<std::size_t>(threads) * 16 * fwd_mr * (cin + tb);
}

/// wino_forward from the 3×3 weights w (cout, cin, 3, 3; flip: see wino_gather_taps) instead of
/// packed ones: the input transforms of all tasks first (spread over the threads), then the
/// output-channel blocks spread over the threads, each transformed once into the thread's buffer
/// and multiplied with every task's input transform. Same arithmetic, same results as
/// wino_pack_weights + wino_forward. scratch: wino_fused_scratch.
template <class T>
void wino_forward_fused(const wino_geometry& g, int n, int cin, int cout, const T* xq, const T* w, bool flip,
                        const T* bias, T* y, bool relu, T* scratch, int threads, bool stream = false,
                        const T* res = nullptr) {
  using S = simd<T>;
  const std::ptrdiff_t tb = static_cast<std::ptrdiff_t>(wino_nv) * S::L;
  const wino_vectors<T> vecs(g, n);
  const std::ptrdiff_t nvec = vecs.nvec;
  const std::ptrdiff_t tasks = (nvec + wino_nv - 1) / wino_nv;
  const std::ptrdiff_t vsize = 16 * tb * cin;  // one task's input transforms
  const int blocks = (cout + fwd_mr - 1) / fwd_mr;
  // Task k: vectors k·nvec/tasks .. (k+1)·nvec/tasks (2 or 3 of them).
  auto make_task = [&](std::ptrdiff_t task) { return vecs.task(g, task * nvec / tasks, (task + 1) * nvec / tasks); };
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int me = 0;
#ifdef _OPENMP
    me = omp_get_thread_num();
#endif
#pragma omp for schedule(static)
    for (std::ptrdiff_t task = 0; task < tasks; ++task) wino_input_transform<T>(g, cin, xq, make_task(task), scratch + task * vsize);
    T* U = scratch + tasks * vsize + static_cast<std::ptrdiff_t>(me) * 16 * fwd_mr * (cin + tb);
    T* M = U + static_cast<std::ptrdiff_t>(16) * fwd_mr * cin;
#pragma omp for schedule(static) nowait
    for (int b = 0; b < blocks; ++b) {
      const int co0 = b * fwd_mr, mb = std::min(fwd_mr, cout - co0);
      wino_pack_block<T, 16>(w, cout, cin, flip, co0, mb, U, wino2_weight_transform<T>{});
      const T* bb = bias ? bias + co0 : nullptr;
      for (std::ptrdiff_t task = 0; task < tasks; ++task) {
        const wino_task tk = make_task(task);
        wino_gemm_dispatch<T>(mb, cin, scratch + task * vsize, U, M, tk.count);
        wino_with_flags(relu, stream && !g.dense, [&](auto r, auto st) {
          wino_output_transform<T, decltype(r)::value, decltype(st)::value>(g, mb, M, bb, y, cout, co0, tk, res);
        });
      }
    }
    if (stream) S::fence();
  }
}

// ---------------------------------------------------------------- weight gradient
// ∇g = Σ_tiles Gᵀ [(Bᵀ d B) ⊙ (A ∇y Aᵀ)] G: per tile chunk, the input transform V (transposed to
// [ξ][τ][ci], channels contiguous) and the output-gradient transform Ŷ ([ξ][co][τ]); then per ξ
// the GEMM Ĝ[ξ] (cout × cin) += Ŷ[ξ] · V[ξ]ᵀ with output-channel broadcasts and input-channel
// vectors (no horizontal sums); finally gw += Gᵀ Ĝ G.

/// L×L transpose: row r of src (stride ss) becomes column r of dst (stride ds).
template <class T>
inline void transpose_block(const T* src, std::ptrdiff_t ss, T* dst, std::ptrdiff_t ds) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j) {
        t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
        t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
      }
    for (int j = 0; j < 8; ++j) {
      _mm512_storeu_ps(dst + j * ds, _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88));
      _mm512_storeu_ps(dst + (j + 8) * ds, _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd));
    }
    return;
  }
#endif
  constexpr int L = simd<T>::L;
  for (int r = 0; r < L; ++r)
    for (int c = 0; c < L; ++c) dst[c * ds + r] = src[r * ss + c];
}

/// Quarter planes of unpadded output-gradient planes: quarter (a, b) holds gy[2Y + a][2X + b]
/// at Y·QS + X, zero elsewhere (junk tiles, odd edges, slack).
template <class T>
void wino_gy_quarters(const wino_geometry& g, std::ptrdiff_t planes, const T* gy, T* gq) {
  const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(g.h) * g.w;
#pragma omp parallel for schedule(static) if (planes * hw > (1 << 14))
  for (std::ptrdiff_t i = 0; i < planes; ++i) {
    T* d = gq + i * g.plane();
    std::memset(d, 0, static_cast<std::size_t>(g.plane()) * sizeof(T));
    const T* s = gy + i * hw;
    for (int y = 0; y < g.h; ++y) {
      T* q0 = d + static_cast<std::ptrdiff_t>((y & 1) * 2) * g.qsize + static_cast<std::ptrdiff_t>(y >> 1) * g.QS;
      T* q1 = q0 + g.qsize;
      const T* sr = s + static_cast<std::ptrdiff_t>(y) * g.w;
      for (int xx = 0; xx < g.w; xx += 2) q0[xx >> 1] = sr[xx];
      for (int xx = 1; xx < g.w; xx += 2) q1[xx >> 1] = sr[xx];
    }
  }
}

/// Ŷ = A ∇y Aᵀ of one channel for L tiles from τ (output-gradient quarter planes at base).
template <class T>
inline void wino_yhat(const wino_geometry& g, const T* base, typename simd<T>::v (&Y)[16]) {
  using S = simd<T>;
  using v = typename S::v;
  const v y00 = S::load(base), y01 = S::load(base + g.qsize), y10 = S::load(base + 2 * g.qsize),
          y11 = S::load(base + 3 * g.qsize);
  const v zero = S::zero();
  // t = A ∇y (4×2): rows y0, y0 + y1, y0 - y1, -y1
  const v t[4][2] = {{y00, y01}, {S::add(y00, y10), S::add(y01, y11)}, {S::sub(y00, y10), S::sub(y01, y11)},
                     {S::sub(zero, y10), S::sub(zero, y11)}};
  for (int r = 0; r < 4; ++r) {  // Ŷ = t Aᵀ: columns t0, t0 + t1, t0 - t1, -t1
    Y[r * 4 + 0] = t[r][0];
    Y[r * 4 + 1] = S::add(t[r][0], t[r][1]);
    Y[r * 4 + 2] = S::sub(t[r][0], t[r][1]);
    Y[r * 4 + 3] = S::sub(zero, t[r][1]);
  }
}

/// Ĝ[co0..co0+MR][ci0..ci0+NV·L] += Σ_τ<len Ŷ[co][τ] · VT[τ][ci] for one ξ (Ŷ rows tc apart).
/// Only the chunk's first len tiles are summed: a chunk's scratch rows past len hold the previous
/// chunk's tiles.
template <class T, int MR, int NV>
inline void wino_wg_gemm(const T* Yh, std::ptrdiff_t tc, std::ptrdiff_t len, const T* VT, std::ptrdiff_t cinp, T* Gh) {
  using S = simd<T>;
  typename S::v acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = S::load(Gh + m * cinp + v * S::L);
  for (std::ptrdiff_t t = 0; t < len; ++t) {
    typename S::v xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = S::load(VT + t * cinp + v * S::L);
    for (int m = 0; m < MR; ++m) {
      const typename S::v yv = S::set1(Yh[m * tc + t]);
      for (int v = 0; v < NV; ++v) acc[m][v] = S::fma(yv, xv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) S::store(Gh + m * cinp + v * S::L, acc[m][v]);
}

/// Padded channel counts and the GEMM's register block of the weight gradient.
struct wino_wg_shape {
  int cinp = 0, coutp = 0, nv = 1, mr = 24;
  wino_wg_shape(int cin, int cout, int lanes) {
    cinp = (cin + lanes - 1) / lanes * lanes;
    const int vecs = cinp / lanes;
    nv = vecs % 4 == 0 ? 4 : vecs % 2 == 0 ? 2 : 1;
    mr = 24 / nv;
    coutp = (cout + mr - 1) / mr * mr;
  }
  /// Elements of Ĝ (16 × coutp × cinp) and of a chunk of tc tiles' transforms (V̂, then Ŷ).
  std::size_t ghat() const { return static_cast<std::size_t>(16) * coutp * cinp; }
  std::ptrdiff_t chunk(std::ptrdiff_t tc) const { return static_cast<std::ptrdiff_t>(16) * tc * (cinp + coutp); }
};

/// How the weight gradient splits its work. Shared: each chunk of tc tiles is transformed by all
/// threads together, then its 16 GEMMs split among them (two barriers per chunk, and each
/// thread's GEMMs read transforms the other thread wrote). K-split: the tiles in two halves, each
/// summed into its own Ĝ in chunks of tc = 64 tiles (scratch that stays in a core's L2), the two Ĝs
/// added at the end; on two threads each thread takes one half alone, sharing nothing but the final
/// sum. On 2 threads (`useg_microbench` conv_bwd_weights), K-split took 64 × 64 channels at 32²
/// batch 8 from 2.3 to 1.4 ms and at 64² batch 4 from 4.4 to 2.9, 128 × 128 at 16² batch 8 from
/// 2.0 to 1.56 and at 32² batch 4 from 3.2 to 2.5; at 256 × 256 it was within ±8% either way, and
/// slower at 512 × 512, whose Ĝ (16 MiB) fits no cache. The plan depends on the shape only, never
/// on the thread count, and every Ĝ element is summed in the same order on any number of threads:
/// the results do not depend on the thread count.
struct wino_wg_plan {
  bool ksplit = false;
  std::ptrdiff_t tc = 0;  // tiles per chunk
  /// Scratch elements: the chunk (K-split: two chunks and the second half's Ĝ).
  std::size_t scratch(const wino_wg_shape& sh) const {
    return static_cast<std::size_t>(sh.chunk(tc)) * (ksplit ? 2 : 1) + (ksplit ? sh.ghat() : 0);
  }
};
/// The plan for image groups of up to `tiles` tiles (in whole vectors).
inline wino_wg_plan wino_wg_make_plan(const wino_wg_shape& sh, std::ptrdiff_t tiles, int L) {
  wino_wg_plan p;
  p.ksplit = static_cast<std::ptrdiff_t>(sh.cinp) * sh.coutp <= 192 * 192 && tiles >= 256;
  if (p.ksplit) {
    p.tc = 64;  // a chunk of 520 KiB at 64 × 64 channels (Ĝ 264 KiB), 1 MiB at 128 × 128 (Ĝ 1 MiB)
  } else {
    p.tc = std::max<std::ptrdiff_t>(L, (std::ptrdiff_t(2) << 20) / sh.chunk(1) / L * L);  // ~2M elements
    p.tc = std::min(p.tc, (tiles + L - 1) / L * L);
  }
  return p;
}

/// The transforms of L tiles (from tile t0 of image img, at row tv·L of a chunk of tc rows):
/// V of L input channels from ci0 into VT [ξ][τ][cinp] (tmp: 16·L·L scratch)...
template <class T>
inline void wino_wg_v_vector(const wino_geometry& g, int cin, int cinp, const T* xq, int img, std::ptrdiff_t t0, int ci0,
                             std::ptrdiff_t tc, std::ptrdiff_t tv, T* tmp, T* VT) {
  using S = simd<T>;
  constexpr int L = S::L;
  for (int j = 0; j < L; ++j) {
    const int ci = ci0 + j;
    typename S::v V[16];
    if (ci < cin)
      wino_v<T>(g, xq + (static_cast<std::ptrdiff_t>(img) * cin + ci) * g.plane() + t0, V);
    else
      for (auto& x : V) x = S::zero();
    for (int k = 0; k < 16; ++k) S::store(tmp + (k * L + j) * L, V[k]);
  }
  for (int k = 0; k < 16; ++k)
    transpose_block<T>(tmp + k * L * L, L, VT + (static_cast<std::ptrdiff_t>(k) * tc + tv * L) * cinp + ci0, cinp);
}
/// ... and Ŷ of output channel co into Yh [ξ][coutp][τ].
template <class T>
inline void wino_wg_y_vector(const wino_geometry& g, int cout, int coutp, const T* gq, int img, std::ptrdiff_t t0, int co,
                             std::ptrdiff_t tc, std::ptrdiff_t tv, T* Yh) {
  using S = simd<T>;
  typename S::v Y[16];
  if (co < cout)
    wino_yhat<T>(g, gq + (static_cast<std::ptrdiff_t>(img) * cout + co) * g.plane() + t0, Y);
  else
    for (auto& x : Y) x = S::zero();
  for (int k = 0; k < 16; ++k) S::store(Yh + (static_cast<std::ptrdiff_t>(k) * coutp + co) * tc + tv * S::L, Y[k]);
}
/// Ĝ_ξ[co0..co0+mr][all] += Ŷ_ξ · V_ξ over the chunk's first len tiles (GEMM item (ξ = k, co0)).
template <class T>
inline void wino_wg_gemm_item(const wino_wg_shape& sh, const T* Yh, const T* VT, std::ptrdiff_t tc, std::ptrdiff_t len, int k,
                              int co0, T* Gh) {
  constexpr int L = simd<T>::L;
  const int cinp = sh.cinp, coutp = sh.coutp;
  const T* Yk = Yh + (static_cast<std::ptrdiff_t>(k) * coutp + co0) * tc;
  const T* Vk = VT + static_cast<std::ptrdiff_t>(k) * tc * cinp;
  T* Gk = Gh + (static_cast<std::ptrdiff_t>(k) * coutp + co0) * cinp;
  for (int ci0 = 0; ci0 < cinp; ci0 += sh.nv * L) {
    if (sh.nv == 4)
      wino_wg_gemm<T, 6, 4>(Yk, tc, len, Vk + ci0, cinp, Gk + ci0);
    else if (sh.nv == 2)
      wino_wg_gemm<T, 12, 2>(Yk, tc, len, Vk + ci0, cinp, Gk + ci0);
    else
      wino_wg_gemm<T, 24, 1>(Yk, tc, len, Vk + ci0, cinp, Gk + ci0);
  }
}

/// Ĝ (accumulated) over tiles [begin, end) (multiples of L) of quarter planes xq and gq, in chunks
/// of tc tiles, the chunks' transforms and GEMMs split among the threads (VT, Yh: a chunk's
/// scratch, 16·tc·cinp and 16·tc·coutp elements).
template <class T>
void wino_wg_range(const wino_geometry& g, int cin, int cout, const wino_wg_shape& sh, const T* xq, const T* gq,
                   std::ptrdiff_t begin, std::ptrdiff_t end, std::ptrdiff_t tc, T* VT, T* Yh, T* Gh, int threads) {
  const int L = simd<T>::L;
  const std::ptrdiff_t tnp = (g.tn + L - 1) / L * L;  // tiles per image, whole vectors (extra ones are zero)
  const int cinp = sh.cinp, coutp = sh.coutp;
  const int cig = cinp / L;
  const int ncob = coutp / sh.mr;
  // Tile vector τ (a global tile index, a multiple of L) -> its image and first tile there.
  auto image_of = [&](std::ptrdiff_t tau) {
    const int img = static_cast<int>(tau / tnp);
    return std::pair<int, std::ptrdiff_t>(img, tau - static_cast<std::ptrdiff_t>(img) * tnp);
  };
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    alignas(64) T tmp[16 * 16 * 16];  // [ξ][ci (L)][τ (L)] (L <= 16)
    for (std::ptrdiff_t c0 = begin; c0 < end; c0 += tc) {
      const std::ptrdiff_t len = std::min(tc, end - c0);  // a multiple of L
      const std::ptrdiff_t nvec = len / L;
      // Transforms, each kind split evenly over the threads (a V item, L channels and their
      // transposes, costs far more than a Ŷ item, one channel): V items (tile vector, channel
      // group), then Ŷ items (tile vector, output channel), one barrier after both.
#pragma omp for schedule(static) nowait
      for (std::ptrdiff_t item = 0; item < nvec * cig; ++item) {
        const std::ptrdiff_t tv = item % nvec;
        const auto [img, t0] = image_of(c0 + tv * L);
        wino_wg_v_vector<T>(g, cin, cinp, xq, img, t0, static_cast<int>(item / nvec) * L, tc, tv, tmp, VT);
      }
#pragma omp for schedule(static)
      for (std::ptrdiff_t item = 0; item < nvec * coutp; ++item) {
        const std::ptrdiff_t tv = item % nvec;
        const auto [img, t0] = image_of(c0 + tv * L);
        wino_wg_y_vector<T>(g, cout, coutp, gq, img, t0, static_cast<int>(item / nvec), tc, tv, Yh);
      }
      // GEMMs: items (ξ, output-channel block); each Ĝ element sums the chunks and their tiles in order.
#pragma omp for schedule(static)
      for (int item = 0; item < 16 * ncob; ++item)
        wino_wg_gemm_item<T>(sh, Yh, VT, tc, len, item / ncob, (item % ncob) * sh.mr, Gh);
    }
  }
}

/// Ĝ (16 × coutp × cinp, accumulated) from quarter planes xq (wino_pad) and gq
/// (wino_gy_quarters) of n images, as planned (wino_wg_make_plan; scratch: plan.scratch(sh) elements).
template <class T>
void wino_weight_grad_accumulate(const wino_geometry& g, int n, int cin, int cout, const wino_wg_shape& sh, const T* xq,
                                 const T* gq, T* Gh, const wino_wg_plan& plan, T* scratch, int threads) {
  const int L = simd<T>::L;
  const std::ptrdiff_t tnp = (g.tn + L - 1) / L * L;
  const std::ptrdiff_t total = static_cast<std::ptrdiff_t>(n) * tnp;
  const std::ptrdiff_t tc = plan.tc;
  const std::ptrdiff_t vt = static_cast<std::ptrdiff_t>(16) * tc * sh.cinp;  // a chunk: VT, then Yh
  if (!plan.ksplit) {
    wino_wg_range<T>(g, cin, cout, sh, xq, gq, 0, total, tc, scratch, scratch + vt, Gh, threads);
    return;
  }
  const std::ptrdiff_t cs = sh.chunk(tc);
  const std::ptrdiff_t gs = static_cast<std::ptrdiff_t>(sh.ghat());
  const std::ptrdiff_t mid = total / L / 2 * L;
  T* G1 = scratch + 2 * cs;  // the second half's Ĝ; the first half sums into Gh
  std::fill(G1, G1 + gs, T(0));
  if (threads == 2) {
#pragma omp parallel num_threads(2)
    {
#ifdef _OPENMP
      const int h = omp_get_thread_num(), nt = omp_get_num_threads();
#else
      const int h = 0, nt = 1;
#endif
      for (int half = h; half < 2; half += nt) {  // (one thread, should the runtime give one: both halves)
        T* chunk = scratch + half * cs;
        wino_wg_range<T>(g, cin, cout, sh, xq, gq, half ? mid : 0, half ? total : mid, tc, chunk, chunk + vt,
                         half ? G1 : Gh, 1);
      }
    }
  } else {
    // One thread, or more than two: the halves one after the other, each chunk shared.
    wino_wg_range<T>(g, cin, cout, sh, xq, gq, 0, mid, tc, scratch, scratch + vt, Gh, threads);
    wino_wg_range<T>(g, cin, cout, sh, xq, gq, mid, total, tc, scratch, scratch + vt, G1, threads);
  }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && gs > 65536)
  for (std::ptrdiff_t i = 0; i < gs; ++i) Gh[i] += G1[i];
}

/// gw (cout, cin, 3, 3) += Gᵀ Ĝ G.
template <class T>
void wino_weight_grad_finish(int cin, int cout, const wino_wg_shape& sh, const T* Gh, T* gw) {
#pragma omp parallel for schedule(static) if (static_cast<double>(cout) * cin > 4096)
  for (int co = 0; co < cout; ++co)
    for (int ci = 0; ci < cin; ++ci) {
      double M[4][4];
      for (int k = 0; k < 16; ++k) M[k / 4][k % 4] = Gh[(static_cast<std::ptrdiff_t>(k) * sh.coutp + co) * sh.cinp + ci];
      // Gᵀ = [[1,.5,.5,0],[0,.5,-.5,0],[0,.5,.5,1]]
      double t[3][4];
      for (int c = 0; c < 4; ++c) {
        t[0][c] = M[0][c] + 0.5 * (M[1][c] + M[2][c]);
        t[1][c] = 0.5 * (M[1][c] - M[2][c]);
        t[2][c] = 0.5 * (M[1][c] + M[2][c]) + M[3][c];
      }
      T* o = gw + (static_cast<std::ptrdiff_t>(co) * cin + ci) * 9;
      for (int r = 0; r < 3; ++r) {
        o[r * 3 + 0] += static_cast<T>(t[r][0] + 0.5 * (t[r][1] + t[r][2]));
        o[r * 3 + 1] += static_cast<T>(0.5 * (t[r][1] - t[r][2]));
        o[r * 3 + 2] += static_cast<T>(0.5 * (t[r][1] + t[r][2]) + t[r][3]);
      }
    }
}

}  // namespace useg::detail
