// useg/backend/cpu/winograd4_kernels.hpp — Winograd F(4×4, 3×3) convolution of the CPU backend
// (3×3, same padding, stride 1) for the forward and backward-data passes on wide planes.
//
// Each 4×4 output tile needs a 6×6 input tile and 36 multiplications per (input, output) channel
// pair instead of 144 (F(2×2,3×3): 64 per 16 outputs): the GEMMs, most of a wide convolution's
// time, shrink by 16/9, and so do the transformed input and output blocks they read and write
// (2.25 values per output instead of 4). V = Bᵀ d B, U = G g Gᵀ, M = Σ_ci U ⊙ V, y = Aᵀ M A with
// Lavin and Gray's matrices (interpolation points 0, ±1, ±2, ∞). Unlike F(2×2,3×3) the transforms
// multiply by 4, 5, 1/6, 1/24 ...: the result differs from a direct convolution by a few units of
// the float rounding of the sums (the kernel tests bound it as they bound the direct kernels),
// as in cuDNN's and oneDNN's Winograd convolutions.
//
// No padded copy: the input transform reads the input planes where they are. A tile vector is L
// consecutive tiles of one tile row (tile columns tx0 .. tx0 + L - 1): for each of its six input
// rows it loads the 4L image values from column 4·tx0 (masked past the row's end; rows outside
// the image are zeros), splits them by column phase (mod 4) into four vectors, and builds the two
// columns that reach into the neighbouring tiles (4X - 1 and 4X + 4) by shifting a lane in. Tile
// vectors start at tx0 = 0, L, 2L, ... of a tile row, so a vector's outputs are four aligned runs
// of 4L values in four output rows; tiles past TW are computed and not stored. It pays where a tile
// row fills a vector (w ≥ 4L - 3; narrower planes use F(2×2,3×3), whose dense layout packs several
// tile rows into a vector).
#pragma once
#include "useg/backend/cpu/winograd_kernels.hpp"

namespace useg::detail {

/// Whether the forward / backward-data convolution of an h×w plane uses F(4×4,3×3): a tile row
/// fills at least one vector, and F(4×4,3×3) is not turned off (wino_mode).
template <class T>
inline bool use_winograd4(int /*h*/, int w) {
  return wino_mode() == 4 && (w + 3) / 4 >= simd<T>::L;
}

struct wino4_geometry {
  int h = 0, w = 0, TH = 0, TW = 0;
  std::ptrdiff_t vpr = 0;  ///< tile vectors per tile row
  std::ptrdiff_t TS = 0;   ///< tile index stride of a tile row (vpr·L): τ = ty·TS + tx
  wino4_geometry(int h_, int w_, int lanes) : h(h_), w(w_) {
    TH = (h + 3) / 4;
    TW = (w + 3) / 4;
    vpr = (TW + lanes - 1) / lanes;
    TS = vpr * lanes;
  }
};

/// U = G g Gᵀ (6×6) for every (output, input) channel pair of w (cout, cin, 3, 3), in blocks of
/// fwd_mr output channels: up[36·co0·cin + (ξ·cin + ci)·mb + m]. flip: see wino_gather_taps.
template <class T>
void wino4_pack_weights(const T* w, int cout, int cin, bool flip, T* up) {
  static_assert(fwd_mr == 8, "wino4_pack_weights transforms blocks of 8 output channels");
  using v8 = typename wino_v8<T>::type;
  const std::ptrdiff_t nb = (cout + fwd_mr - 1) / fwd_mr;
#pragma omp parallel for schedule(static) if (static_cast<double>(cout) * cin > 4096)
  for (std::ptrdiff_t bi = 0; bi < nb; ++bi) {
    const int co0 = static_cast<int>(bi) * fwd_mr;
    const int mb = std::min(fwd_mr, cout - co0);
    T* blk = up + static_cast<std::ptrdiff_t>(36) * co0 * cin;
    for (int ci = 0; ci < cin; ++ci) {
      v8 g[3][3];
      wino_gather_taps<T>(w, cout, cin, flip, co0, mb, ci, g);
      // G = [[1/4,0,0], [-1/6,-1/6,-1/6], [-1/6,1/6,-1/6], [1/24,1/12,1/6], [1/24,-1/12,1/6],
      // [0,0,1]]; t = G g (6×3), U = t Gᵀ (6×6)
      auto gmul = [](const v8 (&a)[3], v8 (&o)[6]) {
        const T q = T(0.25), s6 = T(1) / T(6), s12 = T(1) / T(12), s24 = T(1) / T(24);
        o[0] = q * a[0];
        o[1] = -s6 * (a[0] + a[1] + a[2]);
        o[2] = -s6 * (a[0] - a[1] + a[2]);
        o[3] = s24 * a[0] + s12 * a[1] + s6 * a[2];
        o[4] = s24 * a[0] - s12 * a[1] + s6 * a[2];
        o[5] = a[2];
      };
      v8 t[6][3];
      for (int c = 0; c < 3; ++c) {
        const v8 col[3] = {g[0][c], g[1][c], g[2][c]};
        v8 o[6];
        gmul(col, o);
        for (int r = 0; r < 6; ++r) t[r][c] = o[r];
      }
      for (int r = 0; r < 6; ++r) {
        v8 u[6];
        gmul(t[r], u);
        for (int c = 0; c < 6; ++c) wino_store_lanes8<T>(blk + (static_cast<std::ptrdiff_t>(r * 6 + c) * cin + ci) * mb, u[c], mb);
      }
    }
  }
}

/// o = Bᵀ i for one 6-vector (of SIMD vectors), with Bᵀ = [[4,0,-5,0,1,0], [0,-4,-4,1,1,0],
/// [0,4,-4,-1,1,0], [0,-2,-1,2,1,0], [0,2,-1,-2,1,0], [0,4,0,-5,0,1]].
template <class T>
inline void wino4_bt(const typename simd<T>::v (&i)[6], typename simd<T>::v (&o)[6]) {
  using S = simd<T>;
  const typename S::v m4 = S::set1(T(-4)), m5 = S::set1(T(-5)), p4 = S::set1(T(4));
  const auto a = S::fma(m4, i[2], i[4]);  // i4 - 4 i2
  const auto b = S::fma(m4, i[1], i[3]);  // i3 - 4 i1
  const auto c = S::sub(i[4], i[2]);
  const auto d31 = S::sub(i[3], i[1]);
  const auto e = S::add(d31, d31);  // 2 (i3 - i1)
  o[0] = S::fma(p4, i[0], S::fma(m5, i[2], i[4]));
  o[1] = S::add(a, b);
  o[2] = S::sub(a, b);
  o[3] = S::add(c, e);
  o[4] = S::sub(c, e);
  o[5] = S::fma(p4, i[1], S::fma(m5, i[3], i[5]));
}

/// Input transform of the input x (n, cin, h, w) for the task's tile vectors (tile index τ =
/// ty·TS + tx0) into V[ξ][ci][NV·L], ξ = 0..35.
template <class T>
inline void wino4_input_transform(const wino4_geometry& g, int cin, const T* x, const wino_task& tk, T* V) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int NV = wino_nv;
  constexpr int L = S::L;
  const std::ptrdiff_t vs = static_cast<std::ptrdiff_t>(NV) * L;  // one (ξ, ci) row of V
  const std::ptrdiff_t xs = static_cast<std::ptrdiff_t>(cin) * vs;  // one ξ of V
  const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(g.h) * g.w;
  for (int ci = 0; ci < cin; ++ci) {
    T* out = V + ci * vs;
    for (int n = 0; n < tk.count; ++n) {
      const std::ptrdiff_t o = static_cast<std::ptrdiff_t>(n) * L;
      const std::ptrdiff_t ty = tk.t[n] / g.TS, c0 = 4 * (tk.t[n] - ty * g.TS);  // first image column
      const T* xc = x + (static_cast<std::ptrdiff_t>(tk.img[n]) * cin + ci) * hw;
      v t[6][6];  // t[r] = Bᵀ applied along input row r (over the tile columns c)
      for (int r = 0; r < 6; ++r) {
        const std::ptrdiff_t row = 4 * ty + r - 1;
        if (row < 0 || row >= g.h) {
          for (int c = 0; c < 6; ++c) t[r][c] = S::zero();
          continue;
        }
        const T* src = xc + row * g.w;
        v a[4];
        for (int j = 0; j < 4; ++j) {
          const std::ptrdiff_t left = g.w - (c0 + static_cast<std::ptrdiff_t>(j) * L);
          a[j] = left >= L ? S::load(src + c0 + j * L) : left > 0 ? S::load_n(src + c0 + j * L, static_cast<int>(left)) : S::zero();
        }
        v e01, o01, e23, o23, d[6];
        S::deinterleave(a[0], a[1], e01, o01);
        S::deinterleave(a[2], a[3], e23, o23);
        S::deinterleave(e01, e23, d[1], d[3]);  // x[4X], x[4X+2]
        S::deinterleave(o01, o23, d[2], d[4]);  // x[4X+1], x[4X+3]
        // Element c of tile X is image column 4X + c - 1: c = 0 is lane X-1 of x[4X+3] (x[c0-1] in
        // lane 0), c = 5 lane X+1 of x[4X] (x[c0+4L] in the last lane); zero outside the row.
        d[0] = S::shift_in_first(d[4], c0 > 0 ? src[c0 - 1] : T(0));
        d[5] = S::shift_in_last(d[1], c0 + 4 * L < g.w ? src[c0 + 4 * L] : T(0));
        wino4_bt<T>(d, t[r]);
      }
      for (int c = 0; c < 6; ++c) {
        const v col[6] = {t[0][c], t[1][c], t[2][c], t[3][c], t[4][c], t[5][c]};
        v res[6];
        wino4_bt<T>(col, res);
        for (int r = 0; r < 6; ++r) S::store(out + (r * 6 + c) * xs + o, res[r]);
      }
    }
  }
}

/// o = Aᵀ m for one 6-vector, with Aᵀ = [[1,1,1,1,1,0], [0,1,-1,2,-2,0], [0,1,1,4,4,0],
/// [0,1,-1,8,-8,1]].
template <class T>
inline void wino4_at(const typename simd<T>::v (&m)[6], typename simd<T>::v (&o)[4]) {
  using S = simd<T>;
  const auto p = S::add(m[1], m[2]), q = S::sub(m[1], m[2]);
  const auto r = S::add(m[3], m[4]), s = S::sub(m[3], m[4]);
  o[0] = S::add(S::add(m[0], p), r);
  o[1] = S::fma(S::set1(T(2)), s, q);
  o[2] = S::fma(S::set1(T(4)), r, p);
  o[3] = S::add(S::fma(S::set1(T(8)), s, q), m[5]);
}

/// Output transform of M[ξ][m][NV·L] (mb channels, from co0) for the task's tile vectors and
/// stores into the output planes y (image i, channel co at y + (i·cout + co)·hw), with bias (and
/// ReLU when Relu).
template <class T, bool Relu, bool Stream>
inline void wino4_output_transform(const wino4_geometry& g, int mb, const T* M, const T* bias, T* y, int cout, int co0,
                                   const wino_task& tk) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int NV = wino_nv;
  const int L = S::L;
  const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(g.h) * g.w;
  const std::ptrdiff_t vs = static_cast<std::ptrdiff_t>(NV) * L;
  const std::ptrdiff_t xs = static_cast<std::ptrdiff_t>(mb) * vs;
  for (int m = 0; m < mb; ++m) {
    const v b = S::set1(bias ? bias[m] : T(0));
    const T* Mm = M + m * vs;
    for (int n = 0; n < tk.count; ++n) {
      const std::ptrdiff_t o = static_cast<std::ptrdiff_t>(n) * L;
      const std::ptrdiff_t tt = tk.t[n];
      T* yc = y + (static_cast<std::ptrdiff_t>(tk.img[n]) * cout + co0 + m) * hw;
      const std::ptrdiff_t ty = tt / g.TS, tx = tt - ty * g.TS;
      v s[4][6];  // Aᵀ M, column by column
      for (int c = 0; c < 6; ++c) {
        v col[6];
        for (int r = 0; r < 6; ++r) col[r] = S::load(Mm + (r * 6 + c) * xs + o);
        v res[4];
        wino4_at<T>(col, res);
        for (int a = 0; a < 4; ++a) s[a][c] = res[a];
      }
      const std::ptrdiff_t col0 = 4 * tx, left = g.w - col0;  // > 0: tx < TW
      for (int a = 0; a < 4; ++a) {
        const std::ptrdiff_t row = 4 * ty + a;
        if (row >= g.h) break;
        v yv[4];
        wino4_at<T>(s[a], yv);  // (Aᵀ M) A: outputs 4tx + j of the L tiles, j = 0..3
        for (int j = 0; j < 4; ++j) {
          yv[j] = S::add(yv[j], b);
          if constexpr (Relu) yv[j] = S::relu(yv[j]);
        }
        // Tile-major order: output 4·(tx + l) + j = lane l of yv[j].
        v lo02, hi02, lo13, hi13, r[4];
        S::interleave(yv[0], yv[2], lo02, hi02);
        S::interleave(yv[1], yv[3], lo13, hi13);
        S::interleave(lo02, lo13, r[0], r[1]);
        S::interleave(hi02, hi13, r[2], r[3]);
        T* yr = yc + row * g.w + col0;
        for (int j = 0; j < 4; ++j) {
          const std::ptrdiff_t rem = left - static_cast<std::ptrdiff_t>(j) * L;
          if (rem >= L) {
            if constexpr (Stream) S::stream(yr + j * L, r[j]);
            else S::store(yr + j * L, r[j]);
          } else {
            if (rem > 0) S::store_lanes(yr + j * L, r[j], 0, static_cast<int>(rem));
            break;
          }
        }
      }
    }
  }
}

/// Per-thread scratch (V and M blocks) of the F(4×4,3×3) convolution, in elements.
template <class T>
std::size_t wino4_scratch(int cin) {
  const std::size_t vs = static_cast<std::size_t>(wino_nv) * simd<T>::L;
  return 36 * vs * (static_cast<std::size_t>(cin) + fwd_mr);
}

/// y (n, cout, h, w) = conv3×3(x) + bias (then ReLU when relu) for x (n, cin, h, w), with packed
/// weights up (wino4_pack_weights); scratch: threads × wino4_scratch(cin). stream: write y with
/// non-temporal stores (see wino_stream_min_bytes).
template <class T>
void wino4_forward(const wino4_geometry& g, int n, int cin, int cout, const T* x, const T* up, const T* bias, T* y,
                   bool relu, T* scratch, int threads, bool stream = false) {
  using S = simd<T>;
  const std::ptrdiff_t tb = static_cast<std::ptrdiff_t>(wino_nv) * S::L;
  const std::ptrdiff_t vpr = g.vpr;  // vectors per tile row, from tx = 0, L, ...
  const std::ptrdiff_t per_img = static_cast<std::ptrdiff_t>(g.TH) * vpr;
  const std::ptrdiff_t nvec = static_cast<std::ptrdiff_t>(n) * per_img;
  const std::ptrdiff_t tasks = (nvec + wino_nv - 1) / wino_nv;
  const std::size_t per = wino4_scratch<T>(cin);
#pragma omp parallel num_threads(threads) if (threads > 1 && tasks > 1)
  {
    int me = 0;
#ifdef _OPENMP
    me = omp_get_thread_num();
#endif
    T* V = scratch + per * static_cast<std::size_t>(me);
    T* M = V + 36 * tb * cin;
#pragma omp for schedule(static) nowait
    for (std::ptrdiff_t task = 0; task < tasks; ++task) {
      wino_task tk;
      for (int v = 0; v < wino_nv; ++v) {
        const std::ptrdiff_t gv = task * wino_nv + v;
        if (gv >= nvec) break;
        tk.img[v] = static_cast<int>(gv / per_img);
        const std::ptrdiff_t r = gv % per_img;
        tk.t[v] = (r / vpr) * g.TS + (r % vpr) * S::L;
        tk.count = v + 1;
      }
      wino4_input_transform<T>(g, cin, x, tk, V);
      for (int co0 = 0; co0 < cout; co0 += fwd_mr) {
        const int mb = std::min(fwd_mr, cout - co0);
        wino_gemm_dispatch<T, 36>(mb, cin, V, up + static_cast<std::ptrdiff_t>(36) * co0 * cin, M);
        const T* bb = bias ? bias + co0 : nullptr;
        if (stream) {
          if (relu)
            wino4_output_transform<T, true, true>(g, mb, M, bb, y, cout, co0, tk);
          else
            wino4_output_transform<T, false, true>(g, mb, M, bb, y, cout, co0, tk);
        } else if (relu) {
          wino4_output_transform<T, true, false>(g, mb, M, bb, y, cout, co0, tk);
        } else {
          wino4_output_transform<T, false, false>(g, mb, M, bb, y, cout, co0, tk);
        }
      }
    }
    if (stream) S::fence();  // the non-temporal stores drain before the region's closing barrier
  }
}

}  // namespace useg::detail
