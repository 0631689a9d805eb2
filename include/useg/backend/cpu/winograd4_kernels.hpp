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
// tiles: on planes whose tile row fills a vector (TW = ⌈w/4⌉ ≥ L), L consecutive tiles of one
// tile row from tx0 = 0, L, 2L, ... (tiles past TW are computed and not stored); on narrower
// planes whose tile row is half or a quarter of a vector (TW = L/2 or L/4: w = 29..32 or 13..16 for
// float), whole tile rows, two or four of them. For each of its six input rows (per tile row) it
// loads the 4L image values (masked past the row's end; rows outside the image are zeros), splits
// them by column phase (mod 4) into four vectors, and builds the two columns that reach into the
// neighbouring tiles (4X - 1 and 4X + 4) by shifting a lane in (zero at the row's ends). The
// outputs of a vector are four runs of 4L values, each within one output row. Other planes
// use F(2×2,3×3).
//
// Few tasks (small planes at batch 1): the output channels are split among the threads too, each
// thread repeating the task's input transform (cheap next to the GEMMs when there are many output
// channels), so that both cores work.
#pragma once
#include "useg/backend/cpu/winograd_kernels.hpp"

namespace useg::detail {

/// Tile rows per vector of an F(4×4,3×3) convolution over planes w wide: 1 (a tile row fills at
/// least one vector), 2 or 4 (a tile row is exactly half or a quarter of a vector), or 0 (F(4×4,3×3)
/// does not fit: F(2×2,3×3) is used).
template <class T>
inline int wino4_rows_per_vector(int w) {
  const int TW = (w + 3) / 4, L = simd<T>::L;
  if (TW >= L) return 1;
  if (2 * TW == L) return 2;
  if (4 * TW == L) return 4;
  return 0;
}

/// F(4×4,3×3)'s packed weights (36·cin·cout values, F(2×2,3×3)'s 16) are kept in the context's
/// workspace, which a training step holds at its peak: above this size the convolution uses
/// F(2×2,3×3) (the deepest levels of width-64 models: 1024 × 512 channels would pack into 75 MiB
/// instead of 34).
inline constexpr std::size_t wino4_max_weight_bytes = std::size_t(32) << 20;

/// Below this many output pixels per call (all images) F(4×4,3×3) does not earn back packing its
/// weights (36 values per channel pair instead of 16; packed anew for every call of another
/// convolution). Measured on 2 threads, float, packing included: 256 -> 256 channels at 16×16
/// batch 1 F(4×4,3×3) 2.14 ms against 1.65, 128 -> 128 at 32×32 batch 1 1.09 against 0.86; at
/// batch 8 (2048 and 8192 pixels) 5.10 against 5.75 and 4.21 against 4.44; 64 -> 64 at 64×64
/// batch 1 (4096) 0.59 against 0.68.
inline constexpr long wino4_min_pixels = 2048;

/// Whether the forward / backward-data convolution of n h×w planes (cin -> cout channels) uses
/// F(4×4,3×3): it fits the plane (wino4_rows_per_vector), there are enough pixels
/// (wino4_min_pixels) and its packed weights fit wino4_max_weight_bytes, or wino_mode() asks for
/// F(4×4,3×3) wherever it fits (4) or for none (0, 2).
template <class T>
inline bool use_winograd4(int n, int h, int w, int cin, int cout) {
  const int mode = wino_mode();
  if (mode == 0 || mode == 2 || wino4_rows_per_vector<T>(w) == 0) return false;
  if (mode == 4) return true;
  return static_cast<long>(n) * h * w >= wino4_min_pixels && 36.0 * cin * cout * sizeof(T) <= static_cast<double>(wino4_max_weight_bytes);
}

struct wino4_geometry {
  int h = 0, w = 0, TH = 0, TW = 0;
  int rpv = 1;             ///< tile rows per vector (wino4_rows_per_vector)
  int tpr = 0;             ///< tiles of one tile row in a vector: L (rpv = 1) or TW
  std::ptrdiff_t vpr = 0;  ///< vectors per tile row (rpv = 1)
  std::ptrdiff_t TS = 0;   ///< tile index stride of a tile row: τ = ty·TS + tx (vpr·L, or L)
  std::ptrdiff_t per_img = 0;  ///< tile vectors per image
  unsigned first_lanes = 0;    ///< lanes of a vector that hold a tile row's first tile
  unsigned last_lanes = 0;     ///< lanes of a vector that hold a tile row's last tile (rpv > 1)
  wino4_geometry(int h_, int w_, int lanes, int rows_per_vector) : h(h_), w(w_), rpv(rows_per_vector) {
    TH = (h + 3) / 4;
    TW = (w + 3) / 4;
    if (rpv == 1) {
      tpr = lanes;
      vpr = (TW + lanes - 1) / lanes;
      TS = vpr * lanes;
      per_img = static_cast<std::ptrdiff_t>(TH) * vpr;
    } else {
      tpr = TW;
      vpr = 1;
      TS = lanes;
      per_img = (TH + rpv - 1) / rpv;
    }
    for (int l = 0; l < lanes; ++l) {
      if (l % tpr == 0) first_lanes |= 1u << l;
      if (rpv > 1 && l % tpr == tpr - 1) last_lanes |= 1u << l;
    }
  }
};

/// F(4×4,3×3): U = G g Gᵀ (6×6) in wino_pack_blocks' layout (NX = 36).
template <class T>
void wino4_pack_weights(const T* w, int cout, int cin, bool flip, T* up) {
  using v8 = typename wino_v8<T>::type;
  wino_pack_blocks<T, 36>(w, cout, cin, flip, up, [](const v8 (&g)[3][3], v8 (&u)[36]) {
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
      v8 o[6];
      gmul(t[r], o);
      for (int c = 0; c < 6; ++c) u[r * 6 + c] = o[c];
    }
  });
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

/// The L values at p of which the first `left` are in the row (the rest, and all of them when left
/// ≤ 0, read as zeros).
template <class T>
inline typename simd<T>::v wino4_load_upto(const T* p, std::ptrdiff_t left) {
  using S = simd<T>;
  return left >= S::L ? S::load(p) : left > 0 ? S::load_n(p, static_cast<int>(left)) : S::zero();
}

/// Input transform of the input x (n, cin, h, w) for the task's tile vectors (tile index τ =
/// ty·TS + tx0 of the vector's first tile) into V[ξ][ci][NV·L], ξ = 0..35. RPV = g.rpv (a
/// compile-time count, so that the loads stay in registers). Up (RPV = 1, x.up): x holds planes
/// (h/2, w/2), read as their nearest ×2 upsampling: a vector's 4L input columns are 2L columns of
/// the plane, each twice (columns 4X and 4X+1 are plane column 2X, 4X+2 and 4X+3 are 2X+1), and
/// input rows 1, 2 and 3, 4 of a tile are one plane row each, transformed once.
template <class T, int RPV, bool Up = false>
inline void wino4_input_transform(const wino4_geometry& g, int cin, const plane_src<T>& x, const wino_task& tk, T* V) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int NV = wino_nv;
  constexpr int L = S::L;
  const std::ptrdiff_t vs = static_cast<std::ptrdiff_t>(NV) * L;  // one (ξ, ci) row of V
  const std::ptrdiff_t xs = static_cast<std::ptrdiff_t>(cin) * vs;  // one ξ of V
  constexpr int rpv = RPV, per_row = 4 / RPV;  // vectors of input per tile row
  for (int ci = 0; ci < cin; ++ci) {
    T* out = V + ci * vs;
    const T* xci = x.base(ci);
    const std::ptrdiff_t istride = x.image_stride(ci);
    for (int n = 0; n < tk.count; ++n) {
      const std::ptrdiff_t o = static_cast<std::ptrdiff_t>(n) * L;
      const std::ptrdiff_t ty = tk.t[n] / g.TS, c0 = 4 * (tk.t[n] - ty * g.TS);  // first image column
      const T* xc = xci + static_cast<std::ptrdiff_t>(tk.img[n]) * istride;
      v t[6][6];  // t[r] = Bᵀ applied along input row r (over the tile columns c)
      if constexpr (Up) {
        static_assert(RPV == 1, "the upsampled input is read with a tile row of whole vectors");
        const int wl = g.w / 2;
        const std::ptrdiff_t lc0 = c0 / 2;  // a multiple of 2L
        auto row_pass = [&](int r) {
          const std::ptrdiff_t row = 4 * ty + r - 1;  // input row; plane row row / 2
          if (row < 0 || row >= g.h) {
            for (int c = 0; c < 6; ++c) t[r][c] = S::zero();
            return;
          }
          const T* src = xc + (row >> 1) * wl + lc0;
          v a[2];
          for (int j = 0; j < 2; ++j) {
            const std::ptrdiff_t left = wl - (lc0 + static_cast<std::ptrdiff_t>(j) * L);
            a[j] = wino4_load_upto<T>(src + j * L, left);
          }
          v d[6];
          S::deinterleave(a[0], a[1], d[1], d[3]);  // plane columns 2X, 2X + 1
          d[2] = d[1];
          d[4] = d[3];
          d[0] = S::shift_in_first(d[4], lc0 > 0 ? src[-1] : T(0));                  // 2X - 1
          d[5] = S::shift_in_last(d[1], lc0 + 2 * L < wl ? src[2 * L] : T(0));  // 2X + 2
          wino4_bt<T>(d, t[r]);
        };
        row_pass(0);
        row_pass(1);
        row_pass(3);
        row_pass(5);
        for (int c = 0; c < 6; ++c) {
          t[2][c] = t[1][c];
          t[4][c] = t[3][c];
        }
      } else {
        for (int r = 0; r < 6; ++r) {
          // The 4L values of input row r of the vector's tiles: one image row (rpv = 1) or the
          // rows of rpv tile rows, each 4·TW values (zeros past the image).
          v a[4];
          bool any = false;
          for (int k = 0; k < rpv; ++k) {
            const std::ptrdiff_t row = 4 * (ty + k) + r - 1;
            const bool in = row >= 0 && row < g.h;
            any = any || in;
            const T* src = in ? xc + row * g.w + c0 : xc;
            for (int j = 0; j < per_row; ++j) {
              const std::ptrdiff_t left = in ? g.w - (c0 + static_cast<std::ptrdiff_t>(j) * L) : 0;
              a[k * per_row + j] = wino4_load_upto<T>(src + j * L, left);
            }
          }
          if (!any) {
            for (int c = 0; c < 6; ++c) t[r][c] = S::zero();
            continue;
          }
          v e01, o01, e23, o23, d[6];
          S::deinterleave(a[0], a[1], e01, o01);
          S::deinterleave(a[2], a[3], e23, o23);
          S::deinterleave(e01, e23, d[1], d[3]);  // x[4X], x[4X+2]
          S::deinterleave(o01, o23, d[2], d[4]);  // x[4X+1], x[4X+3]
          // Element c of tile X is image column 4X + c - 1: c = 0 is the previous lane of x[4X+3],
          // c = 5 the next lane of x[4X]; at a row's ends the image column before it (x[c0-1], or
          // padding) and after it (x[c0+4L] or padding).
          if constexpr (RPV == 1) {
            const T* src = xc + (4 * ty + r - 1) * g.w;  // in the image: `any`
            d[0] = S::shift_in_first(d[4], c0 > 0 ? src[c0 - 1] : T(0));
            d[5] = S::shift_in_last(d[1], c0 + 4 * L < g.w ? src[c0 + 4 * L] : T(0));
          } else {  // every tile row of the vector starts and ends at the padding
            d[0] = S::keep_lanes(S::shift_in_first(d[4], T(0)), ~g.first_lanes);
            d[5] = S::keep_lanes(S::shift_in_last(d[1], T(0)), ~g.last_lanes);
          }
          wino4_bt<T>(d, t[r]);
        }
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
                                   const wino_task& tk, const T* res = nullptr) {
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
      for (int a = 0; a < 4; ++a) {
        v yv[4];
        wino4_at<T>(s[a], yv);  // (Aᵀ M) A: output 4·(tile) + j of the L tiles, j = 0..3
        for (int j = 0; j < 4; ++j) {
          yv[j] = S::add(yv[j], b);
          if constexpr (Relu) yv[j] = S::relu(yv[j]);
        }
        // Tile-major order: output 4·l + j of the vector = lane l of yv[j]; r[q] holds tiles
        // q·L/4 .. (q+1)·L/4 - 1, which lie in one tile row.
        v lo02, hi02, lo13, hi13, r[4];
        S::interleave(yv[0], yv[2], lo02, hi02);
        S::interleave(yv[1], yv[3], lo13, hi13);
        S::interleave(lo02, lo13, r[0], r[1]);
        S::interleave(hi02, hi13, r[2], r[3]);
        for (int q = 0; q < 4; ++q) {
          const int k = q * (L / 4);  // the run's first tile in the vector
          const std::ptrdiff_t row = 4 * (ty + k / g.tpr) + a, col = 4 * (tx + k % g.tpr);
          const std::ptrdiff_t rem = g.w - col;
          if (row >= g.h || rem <= 0) continue;
          T* yr = yc + row * g.w + col;
          if (res) r[q] = S::add(r[q], rem >= L ? S::load(res + (yr - y)) : S::load_n(res + (yr - y), static_cast<int>(rem)));
          if (rem >= L) {
            if constexpr (Stream) S::stream(yr, r[q]);
            else S::store(yr, r[q]);
          } else {
            S::store_lanes(yr, r[q], 0, static_cast<int>(rem));
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

/// y (n, cout, h, w) = conv3×3(x) + bias (then ReLU when relu) for x (n, cin, h, w; or two inputs
/// read in place, or planes read through their upsampling with g.rpv = 1: see plane_src), with
/// packed weights up (wino4_pack_weights); scratch: threads × wino4_scratch(cin). stream: write y
/// with non-temporal stores (see wino_stream_min_bytes). res (null: none): added after the ReLU,
/// laid out as y.
template <class T>
void wino4_forward(const wino4_geometry& g, int n, int cin, int cout, const plane_src<T>& x, const T* up, const T* bias,
                   T* y, bool relu, T* scratch, int threads, bool stream = false, const T* res = nullptr) {
  using S = simd<T>;
  const std::ptrdiff_t tb = static_cast<std::ptrdiff_t>(wino_nv) * S::L;
  const std::ptrdiff_t nvec = static_cast<std::ptrdiff_t>(n) * g.per_img;
  const std::ptrdiff_t tasks = (nvec + wino_nv - 1) / wino_nv;
  // Few tasks that do not split evenly among the threads: each task's output channels are split
  // into `threads` parts (whole blocks of fwd_mr), one work item each.
  const int blocks = (cout + fwd_mr - 1) / fwd_mr;
  const int parts = threads > 1 && tasks % threads != 0 && tasks < 8 * threads && blocks >= threads ? threads : 1;
  const std::ptrdiff_t items = tasks * parts;
  const std::size_t per = wino4_scratch<T>(cin);
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1)
  {
    int me = 0;
#ifdef _OPENMP
    me = omp_get_thread_num();
#endif
    T* V = scratch + per * static_cast<std::size_t>(me);
    T* M = V + 36 * tb * cin;
#pragma omp for schedule(static) nowait
    for (std::ptrdiff_t item = 0; item < items; ++item) {
      const std::ptrdiff_t task = item / parts;
      const int part = static_cast<int>(item % parts);
      wino_task tk;
      for (int v = 0; v < wino_nv; ++v) {
        const std::ptrdiff_t gv = task * wino_nv + v;
        if (gv >= nvec) break;
        tk.img[v] = static_cast<int>(gv / g.per_img);
        const std::ptrdiff_t r = gv % g.per_img;
        tk.t[v] = g.rpv == 1 ? (r / g.vpr) * g.TS + (r % g.vpr) * S::L : r * g.rpv * g.TS;
        tk.count = v + 1;
      }
      if (x.up) wino4_input_transform<T, 1, true>(g, cin, x, tk, V);
      else if (g.rpv == 1) wino4_input_transform<T, 1>(g, cin, x, tk, V);
      else if (g.rpv == 2) wino4_input_transform<T, 2>(g, cin, x, tk, V);
      else wino4_input_transform<T, 4>(g, cin, x, tk, V);
      const int b0 = blocks * part / parts, b1 = blocks * (part + 1) / parts;
      for (int co0 = b0 * fwd_mr; co0 < std::min(cout, b1 * fwd_mr); co0 += fwd_mr) {
        const int mb = std::min(fwd_mr, cout - co0);
        wino_gemm_dispatch<T, 36>(mb, cin, V, up + static_cast<std::ptrdiff_t>(36) * co0 * cin, M);
        const T* bb = bias ? bias + co0 : nullptr;
        wino_with_flags(relu, stream, [&](auto r, auto st) {
          wino4_output_transform<T, decltype(r)::value, decltype(st)::value>(g, mb, M, bb, y, cout, co0, tk, res);
        });
      }
    }
    if (stream) S::fence();  // the non-temporal stores drain before the region's closing barrier
  }
}

}  // namespace useg::detail
