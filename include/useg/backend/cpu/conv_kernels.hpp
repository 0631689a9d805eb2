// useg/backend/cpu/conv_kernels.hpp — direct (implicit-GEMM) convolution kernels of the CPU
// backend, for float and double.
//
// No im2col matrix is materialized. Each input plane is copied once into a zero-padded plane of
// row stride W2 = w + 2p; an output pixel (y, x) then has the flat index q = y·W2 + x, and tap
// (ky, kx) of the kernel reads the padded input at q + ky·W2 + kx, so a run of consecutive q is a
// run of consecutive input values for every tap: one unaligned vector load per tap feeds every
// output channel of a register block. The two junk columns per row (x >= w) are computed and
// never stored. The same kernel serves the backward pass for data (a convolution of the output
// gradient with the flipped, transposed kernel); the weight gradient is a register-blocked dot
// product over q of the output gradient and shifted input rows. Where the width is a whole number
// of vectors (the usual case: 256, 128, 64, ...) the weight gradient reads x and gy in place
// instead, each thread padding only the rows it is about to use into an L2-sized buffer
// (conv3x3_backward_weights_rows): no padded copy of the input and no q-layout copy of gy.
//
// Register blocks (float, AVX-512): forward 8 output channels × 3 vectors of 16 pixels (24
// accumulators); weight gradient 3 output channels × 9 taps (27 accumulators). Without AVX-512 the
// same code runs on GCC/Clang vector extensions (compiled to whatever the target has).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include "useg/backend/cpu/bn_kernels.hpp"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace useg::detail {

// ---------------------------------------------------------------- a minimal SIMD layer
#if defined(__AVX512F__)
template <class T>
struct simd;
template <>
struct simd<float> {
  using v = __m512;
  static constexpr int L = 16;
  static v load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, v a) { _mm512_storeu_ps(p, a); }
  /// A non-temporal store where p is 64-byte aligned (a plain one elsewhere): the line goes to
  /// memory without being read first. Call fence() before other threads read what it wrote.
  static void stream(float* p, v a) {
    if ((reinterpret_cast<std::uintptr_t>(p) & 63) == 0)
      _mm512_stream_ps(p, a);
    else
      _mm512_storeu_ps(p, a);
  }
  static void fence() { _mm_sfence(); }
  /// The first n (<= L) lanes from p, zeros after; nothing past p + n is touched (the store of
  /// the first n lanes is store_lanes(p, a, 0, n)).
  static v load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p); }
  /// Store lanes [j0, j1) of a to base[j0..j1).
  static void store_lanes(float* base, v a, int j0, int j1) {
    const __mmask16 m = static_cast<__mmask16>(((1u << j1) - 1u) & ~((1u << j0) - 1u));
    _mm512_mask_storeu_ps(base, m, a);
  }
  /// Lanes [j0, j1) from base[j0..j1), zeros elsewhere; nothing else is touched.
  static v load_lanes(const float* base, int j0, int j1) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>(((1u << j1) - 1u) & ~((1u << j0) - 1u)), base);
  }
  static v set1(float x) { return _mm512_set1_ps(x); }
  static v zero() { return _mm512_setzero_ps(); }
  static v fma(v a, v b, v c) { return _mm512_fmadd_ps(a, b, c); }
  static v add(v a, v b) { return _mm512_add_ps(a, b); }
  static v sub(v a, v b) { return _mm512_sub_ps(a, b); }
  /// max(a, 0) with ReLU's x > 0 ? x : 0 semantics (NaN -> 0, as ops::relu_forward).
  static v relu(v a) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ), a); }
  /// Lanes where a > b or a is NaN (the max pool's "take the candidate" rule).
  using mask = __mmask16;
  static mask gt_or_nan(v a, v b) {
    return static_cast<mask>(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q));
  }
  /// k ? a : b, lane by lane.
  static v select(mask k, v a, v b) { return _mm512_mask_blend_ps(k, b, a); }
  // Not _mm512_reduce_add_ps nor the shuffle intrinsics: GCC 12's versions trip -Wuninitialized
  // (their _mm512_undefined pass-through) in every caller. Generic vector shuffles do not.
  static float hsum(v a) {
    typedef float f8 __attribute__((vector_size(32)));
    typedef float f4 __attribute__((vector_size(16)));
    const f8 h = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    f4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    q += __builtin_shufflevector(q, q, 2, 3, 0, 1);
    return q[0] + q[1];
  }
  /// lo = a0 b0 a1 b1 ... a7 b7, hi = a8 b8 ... a15 b15
  static void interleave(v a, v b, v& lo, v& hi) {
    const __m512i il = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i ih = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    lo = _mm512_permutex2var_ps(a, il, b);
    hi = _mm512_permutex2var_ps(a, ih, b);
  }
  /// s a0 a1 ... a14 / a1 a2 ... a15 s (masked forms: the plain alignr intrinsics pass an
  /// undefined vector that GCC 12 warns about).
  /// a in the lanes whose bit is set, zero in the others.
  static v keep_lanes(v a, unsigned bits) { return _mm512_maskz_mov_ps(static_cast<__mmask16>(bits), a); }
  static v shift_in_first(v a, float s) {
    return _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(static_cast<__mmask16>(0xFFFF), _mm512_castps_si512(a),
                                                         _mm512_castps_si512(_mm512_set1_ps(s)), 15));
  }
  static v shift_in_last(v a, float s) {
    return _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(static_cast<__mmask16>(0xFFFF), _mm512_castps_si512(_mm512_set1_ps(s)),
                                                         _mm512_castps_si512(a), 1));
  }
  /// The inverse: ev = a0 a2 ... a14 b0 b2 ... b14, od = a1 a3 ... a15 b1 ... b15
  static void deinterleave(v a, v b, v& ev, v& od) {
    const __m512i ie = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i io = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    ev = _mm512_permutex2var_ps(a, ie, b);
    od = _mm512_permutex2var_ps(a, io, b);
  }
};
template <>
struct simd<double> {
  using v = __m512d;
  static constexpr int L = 8;
  static v load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, v a) { _mm512_storeu_pd(p, a); }
  static void stream(double* p, v a) {
    if ((reinterpret_cast<std::uintptr_t>(p) & 63) == 0)
      _mm512_stream_pd(p, a);
    else
      _mm512_storeu_pd(p, a);
  }
  static void fence() { _mm_sfence(); }
  static v load_n(const double* p, int n) { return _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1u), p); }
  static void store_lanes(double* base, v a, int j0, int j1) {
    const __mmask8 m = static_cast<__mmask8>(((1u << j1) - 1u) & ~((1u << j0) - 1u));
    _mm512_mask_storeu_pd(base, m, a);
  }
  static v load_lanes(const double* base, int j0, int j1) {
    return _mm512_maskz_loadu_pd(static_cast<__mmask8>(((1u << j1) - 1u) & ~((1u << j0) - 1u)), base);
  }
  static v set1(double x) { return _mm512_set1_pd(x); }
  static v zero() { return _mm512_setzero_pd(); }
  static v fma(v a, v b, v c) { return _mm512_fmadd_pd(a, b, c); }
  static v add(v a, v b) { return _mm512_add_pd(a, b); }
  static v sub(v a, v b) { return _mm512_sub_pd(a, b); }
  static v relu(v a) { return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(a, _mm512_setzero_pd(), _CMP_GT_OQ), a); }
  using mask = __mmask8;
  static mask gt_or_nan(v a, v b) {
    return static_cast<mask>(_mm512_cmp_pd_mask(a, b, _CMP_GT_OQ) | _mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q));
  }
  static v select(mask k, v a, v b) { return _mm512_mask_blend_pd(k, b, a); }
  static double hsum(v a) {
    typedef double d4 __attribute__((vector_size(32)));
    typedef double d2 __attribute__((vector_size(16)));
    const d4 h = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    const d2 q = __builtin_shufflevector(h, h, 0, 1) + __builtin_shufflevector(h, h, 2, 3);
    return q[0] + q[1];
  }
  static void interleave(v a, v b, v& lo, v& hi) {
    const __m512i il = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
    const __m512i ih = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
    lo = _mm512_permutex2var_pd(a, il, b);
    hi = _mm512_permutex2var_pd(a, ih, b);
  }
  static v keep_lanes(v a, unsigned bits) { return _mm512_maskz_mov_pd(static_cast<__mmask8>(bits), a); }
  static v shift_in_first(v a, double s) {
    return _mm512_castsi512_pd(_mm512_maskz_alignr_epi64(static_cast<__mmask8>(0xFF), _mm512_castpd_si512(a),
                                                         _mm512_castpd_si512(_mm512_set1_pd(s)), 7));
  }
  static v shift_in_last(v a, double s) {
    return _mm512_castsi512_pd(_mm512_maskz_alignr_epi64(static_cast<__mmask8>(0xFF), _mm512_castpd_si512(_mm512_set1_pd(s)),
                                                         _mm512_castpd_si512(a), 1));
  }
  static void deinterleave(v a, v b, v& ev, v& od) {
    const __m512i ie = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i io = _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1);
    ev = _mm512_permutex2var_pd(a, ie, b);
    od = _mm512_permutex2var_pd(a, io, b);
  }
};
#else
/// Portable fallback: 64-byte GCC/Clang vector extensions.
template <class T>
struct simd {
  typedef T v __attribute__((vector_size(64)));
  static constexpr int L = static_cast<int>(64 / sizeof(T));
  static v load(const T* p) {
    v r;
    std::memcpy(&r, p, sizeof r);
    return r;
  }
  static void store(T* p, v a) { std::memcpy(p, &a, sizeof a); }
  static void stream(T* p, v a) { store(p, a); }
  static void fence() {}
  static v load_n(const T* p, int n) {
    T tmp[L] = {};
    std::memcpy(tmp, p, static_cast<std::size_t>(n) * sizeof(T));
    return load(tmp);
  }
  static void store_lanes(T* base, v a, int j0, int j1) {
    T tmp[L];
    std::memcpy(tmp, &a, sizeof a);
    for (int j = j0; j < j1; ++j) base[j] = tmp[j];
  }
  static v load_lanes(const T* base, int j0, int j1) {
    T tmp[L] = {};
    for (int j = j0; j < j1; ++j) tmp[j] = base[j];
    return load(tmp);
  }
  static v set1(T x) { return v{} + x; }
  static v zero() { return v{}; }
  static v fma(v a, v b, v c) { return a * b + c; }
  static v add(v a, v b) { return a + b; }
  static v sub(v a, v b) { return a - b; }
  static v relu(v a) {
    T tmp[L];
    std::memcpy(tmp, &a, sizeof a);
    for (int j = 0; j < L; ++j) tmp[j] = tmp[j] > T(0) ? tmp[j] : T(0);
    return load(tmp);
  }
  using mask = decltype(v{} > v{});
  static mask gt_or_nan(v a, v b) { return (a > b) | (a != a); }
  static v select(mask k, v a, v b) { return k ? a : b; }
  static T hsum(v a) {
    T tmp[L];
    std::memcpy(tmp, &a, sizeof a);
    T s = 0;
    for (int j = 0; j < L; ++j) s += tmp[j];
    return s;
  }
  static void interleave(v a, v b, v& lo, v& hi) {
    T ta[L], tb[L], tl[L], th[L];
    std::memcpy(ta, &a, sizeof a);
    std::memcpy(tb, &b, sizeof b);
    for (int j = 0; j < L / 2; ++j) {
      tl[2 * j] = ta[j];
      tl[2 * j + 1] = tb[j];
      th[2 * j] = ta[L / 2 + j];
      th[2 * j + 1] = tb[L / 2 + j];
    }
    lo = load(tl);
    hi = load(th);
  }
  static v keep_lanes(v a, unsigned bits) {
    T t[L];
    std::memcpy(t, &a, sizeof a);
    for (int j = 0; j < L; ++j)
      if (!((bits >> j) & 1u)) t[j] = T(0);
    return load(t);
  }
  static v shift_in_first(v a, T s) {
    T t[L];
    std::memcpy(t + 1, &a, sizeof(T) * (L - 1));
    t[0] = s;
    return load(t);
  }
  static v shift_in_last(v a, T s) {
    T t[L + 1];
    std::memcpy(t, &a, sizeof a);
    t[L] = s;
    return load(t + 1);
  }
  static void deinterleave(v a, v b, v& ev, v& od) {
    T t[2 * L], te[L], to[L];
    std::memcpy(t, &a, sizeof a);
    std::memcpy(t + L, &b, sizeof b);
    for (int j = 0; j < L; ++j) {
      te[j] = t[2 * j];
      to[j] = t[2 * j + 1];
    }
    ev = load(te);
    od = load(to);
  }
};
#endif

/// Make the compiler materialize v in a register (GCC otherwise re-reads a loaded vector as a
/// memory operand of every FMA that uses it, multiplying the loads).
template <class V>
inline void keep_in_register(V& v) {
#if defined(__GNUC__) && defined(__AVX512F__)
  asm volatile("" : "+v"(v));
#else
  (void)v;
#endif
}

// ---------------------------------------------------------------- geometry
/// The padded-plane geometry of a same-padded stride-1 k×k convolution over (h, w) planes.
struct conv_geometry {
  int h = 0, w = 0, k = 1, p = 0, W2 = 0, H2 = 0;
  std::ptrdiff_t qn = 0;     ///< q extent of the valid outputs: (h-1)·W2 + w
  std::ptrdiff_t plane = 0;  ///< element stride of one padded plane (with zeroed slack after it)
  std::ptrdiff_t qplane = 0; ///< element stride of one q-layout plane (output gradient, junk zeroed)
  conv_geometry(int h_, int w_, int k_, int lanes, int slack_vectors) : h(h_), w(w_), k(k_), p(k_ / 2) {
    W2 = w + 2 * p;
    H2 = h + 2 * p;
    qn = static_cast<std::ptrdiff_t>(h - 1) * W2 + w;
    const std::ptrdiff_t slack = static_cast<std::ptrdiff_t>(lanes) * (slack_vectors + 1);
    plane = (static_cast<std::ptrdiff_t>(H2) * W2 + slack + lanes - 1) / lanes * lanes;
    qplane = (qn + static_cast<std::ptrdiff_t>(lanes) * slack_vectors + lanes - 1) / lanes * lanes;
  }
  /// Offsets of the k·k taps, row-major (ky, kx), relative to q.
  std::vector<std::ptrdiff_t> tap_offsets() const {
    std::vector<std::ptrdiff_t> o;
    for (int ky = 0; ky < k; ++ky)
      for (int kx = 0; kx < k; ++kx) o.push_back(static_cast<std::ptrdiff_t>(ky) * W2 + kx);
    return o;
  }
};

/// Where a convolution's input planes are: image i, channel c at a + (i·cin + c)·hw (one input),
/// or, for the concatenation of two inputs along channels read in place (the decoder's skip and
/// up-convolution output at inference), at a + (i·ca + c)·hw for c < ca and at
/// b + (i·(cin − ca) + c − ca)·hw after; or (up) one input read through its nearest ×2
/// upsampling.
template <class T>
struct plane_src {
  const T* a = nullptr;
  const T* b = nullptr;
  int cin = 1, ca = 1;  // ca == cin: one input
  std::ptrdiff_t hw = 0;
  /// The planes are half the convolution's height and width, read as their nearest ×2 upsampling
  /// (hw: their own size). Only the F(4×4,3×3) input transform reads such planes.
  bool up = false;
  plane_src(const T* x, int cin_, std::ptrdiff_t hw_) : a(x), cin(cin_), ca(cin_), hw(hw_) {}
  plane_src(const T* xa, int ca_, const T* xb, int cin_, std::ptrdiff_t hw_) : a(xa), b(xb), cin(cin_), ca(ca_), hw(hw_) {}
  /// Channel c's plane of image 0, and the distance from one image's plane c to the next's.
  const T* base(int c) const { return c < ca ? a + static_cast<std::ptrdiff_t>(c) * hw : b + static_cast<std::ptrdiff_t>(c - ca) * hw; }
  std::ptrdiff_t image_stride(int c) const { return static_cast<std::ptrdiff_t>(c < ca ? ca : cin - ca) * hw; }
  /// Plane p = i·cin + c.
  const T* plane(std::ptrdiff_t p) const {
    if (ca == cin) return a + p * hw;
    const std::ptrdiff_t i = p / cin;
    const int c = static_cast<int>(p - i * cin);
    return base(c) + i * image_stride(c);
  }
  /// The planes from image i0 on.
  plane_src from_image(std::ptrdiff_t i0) const {
    plane_src s = *this;
    s.a += i0 * ca * hw;
    if (b) s.b += i0 * (cin - ca) * hw;
    return s;
  }
};

/// Copy `planes` planes (h, w) of src (plane_src::plane) into zero-padded planes of the geometry
/// (stride g.plane).
template <class T>
void pad_planes(const conv_geometry& g, std::ptrdiff_t planes, const plane_src<T>& src, T* xp) {
  const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(g.h) * g.w;
#pragma omp parallel for schedule(static) if (planes * hw > (1 << 14))
  for (std::ptrdiff_t i = 0; i < planes; ++i) {
    T* d = xp + i * g.plane;
    const T* s = src.plane(i);
    if (g.p == 0) {
      std::memcpy(d, s, static_cast<std::size_t>(hw) * sizeof(T));
      std::memset(d + hw, 0, static_cast<std::size_t>(g.plane - hw) * sizeof(T));
      continue;
    }
    std::memset(d, 0, static_cast<std::size_t>(g.p) * g.W2 * sizeof(T));
    for (int y = 0; y < g.h; ++y) {
      T* row = d + static_cast<std::ptrdiff_t>(y + g.p) * g.W2;
      for (int j = 0; j < g.p; ++j) row[j] = T(0);
      std::memcpy(row + g.p, s + static_cast<std::ptrdiff_t>(y) * g.w, static_cast<std::size_t>(g.w) * sizeof(T));
      for (int j = g.p + g.w; j < g.W2; ++j) row[j] = T(0);
    }
    const std::ptrdiff_t used = static_cast<std::ptrdiff_t>(g.h + g.p) * g.W2;
    std::memset(d + used, 0, static_cast<std::size_t>(g.plane - used) * sizeof(T));
  }
}
/// Copy `planes` consecutive planes (h, w) from x.
template <class T>
void pad_planes(const conv_geometry& g, std::ptrdiff_t planes, const T* x, T* xp) {
  pad_planes<T>(g, planes, plane_src<T>(x, 1, static_cast<std::ptrdiff_t>(g.h) * g.w), xp);
}

/// Copy planes (h, w) of gy into q-layout planes (stride g.qplane): value (y, x) at q = y·W2 + x,
/// zeros at the junk columns and after qn. When gb is non-null, gb[c] += sum of plane c (planes
/// are (n, c) ordered with c in [0, channels)).
template <class T>
void q_planes(const conv_geometry& g, int n, int channels, const T* gy, T* gq, T* gb) {
  const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(g.h) * g.w;
#pragma omp parallel for schedule(static) if (static_cast<std::ptrdiff_t>(n) * channels * hw > (1 << 14))
  for (int c = 0; c < channels; ++c) {
    double s = 0;
    for (int i = 0; i < n; ++i) {
      const std::ptrdiff_t pi = static_cast<std::ptrdiff_t>(i) * channels + c;
      const T* src = gy + pi * hw;
      T* d = gq + pi * g.qplane;
      for (int y = 0; y < g.h; ++y) {
        T* row = d + static_cast<std::ptrdiff_t>(y) * g.W2;
        const T* sr = src + static_cast<std::ptrdiff_t>(y) * g.w;
        std::memcpy(row, sr, static_cast<std::size_t>(g.w) * sizeof(T));
        if (y + 1 < g.h)
          for (int j = g.w; j < g.W2; ++j) row[j] = T(0);
        if (gb) s += long_sum<T>(sr, g.w);
      }
      std::memset(d + g.qn, 0, static_cast<std::size_t>(g.qplane - g.qn) * sizeof(T));
    }
    if (gb) gb[c] += static_cast<T>(s);
  }
}

// ---------------------------------------------------------------- forward (and backward-data)
inline constexpr int fwd_mr = 8;  ///< output channels per register block
inline constexpr int fwd_nv = 3;  ///< pixel vectors per register block

/// Store one vector of outputs, q-indexed from q, into an unpadded (h, w) output plane;
/// only q < qend and x < w are written. bias is added.
/// Store one vector of values indexed by a flat q = row·W2 + x (x < w valid, x >= w junk) into
/// a plane with row stride ystride; only q < qend is written.
/// res (may be null): a plane laid out as y whose values are added to what is stored.
template <class T>
inline void store_run(T* y, std::ptrdiff_t W2, std::ptrdiff_t w, std::ptrdiff_t ystride, typename simd<T>::v a,
                      std::ptrdiff_t q, std::ptrdiff_t qend, const T* res = nullptr) {
  using S = simd<T>;
  const int L = S::L;
  std::ptrdiff_t yy = q / W2;
  std::ptrdiff_t xx = q - yy * W2;
  if (xx + L <= w && q + L <= qend) {
    if (res) a = S::add(a, S::load(res + yy * ystride + xx));
    S::store(y + yy * ystride + xx, a);
    return;
  }
  int j = 0;
  while (j < L && q + j < qend) {
    if (xx >= w) {  // junk columns: skip to the next row
      j += static_cast<int>(W2 - xx);
      ++yy;
      xx = 0;
      continue;
    }
    const int run = static_cast<int>(std::min<std::ptrdiff_t>({w - xx, L - j, qend - (q + j)}));
    if (res) {
      S::store_lanes(y + yy * ystride + xx - j, S::add(a, S::load_lanes(res + yy * ystride + xx - j, j, j + run)), j, j + run);
    } else {
      S::store_lanes(y + yy * ystride + xx - j, a, j, j + run);
    }
    j += run;
    xx += run;
  }
}

/// Store one vector of outputs, q-indexed from q, into an unpadded (h, w) output plane;
/// only q < qend and x < w are written.
template <class T>
inline void store_q_vector(const conv_geometry& g, T* y, typename simd<T>::v a, std::ptrdiff_t q, std::ptrdiff_t qend) {
  store_run<T>(y, g.W2, g.w, g.w, a, q, qend);
}

/// acc[m][v] = sum over ci, taps of wp[ci][t][m] · xp[ci·plane + off[t] + v·L]
template <class T, int MR, int NV>
inline void fwd_block(const T* xp, std::ptrdiff_t plane, int cin, const std::ptrdiff_t* off, int k, int kk, const T* wp,
                      typename simd<T>::v (&acc)[MR][NV]) {
  using S = simd<T>;
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = S::zero();
  for (int ci = 0; ci < cin; ++ci) {
    const T* xc = xp + ci * plane;
    // Prefetch what the next block along q will read: the input rows are many concurrent
    // streams (one per channel and kernel row), more than the hardware prefetchers follow.
    for (int t = 0; t < kk; t += k)
      for (int v = 0; v < NV; ++v) __builtin_prefetch(xc + off[t] + (NV + v) * S::L);
    for (int t = 0; t < kk; ++t) {
      const T* s = xc + off[t];
      typename S::v xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = S::load(s + v * S::L);
      for (int m = 0; m < MR; ++m) {
        const typename S::v wv = S::set1(wp[m]);
        for (int v = 0; v < NV; ++v) acc[m][v] = S::fma(wv, xv[v], acc[m][v]);
      }
      wp += MR;
    }
  }
}

template <class T, int MR, bool Relu>
inline void fwd_block_store(const conv_geometry& g, const T* xp, int cin, const std::ptrdiff_t* off, int kk, const T* wp,
                            const T* bias, T* y, std::ptrdiff_t hw, std::ptrdiff_t q0, std::ptrdiff_t qend) {
  using S = simd<T>;
  typename S::v acc[MR][fwd_nv];
  fwd_block<T, MR, fwd_nv>(xp + q0, g.plane, cin, off, g.k, kk, wp, acc);
  for (int m = 0; m < MR; ++m) {
    const typename S::v b = S::set1(bias ? bias[m] : T(0));
    for (int v = 0; v < fwd_nv; ++v) {
      const std::ptrdiff_t q = q0 + static_cast<std::ptrdiff_t>(v) * S::L;
      if (q >= qend) break;
      typename S::v r = S::add(acc[m][v], b);
      if constexpr (Relu) r = S::relu(r);
      store_q_vector<T>(g, y + m * hw, r, q, qend);
    }
  }
}

template <class T, bool Relu>
inline void fwd_dispatch(int mr, const conv_geometry& g, const T* xp, int cin, const std::ptrdiff_t* off, int kk,
                         const T* wp, const T* bias, T* y, std::ptrdiff_t hw, std::ptrdiff_t q0, std::ptrdiff_t qend) {
  static_assert(fwd_mr == 8, "fwd_dispatch lists the block heights 1..8");
  switch (mr) {
    case 8: fwd_block_store<T, 8, Relu>(g, xp, cin, off, kk, wp, bias, y, hw, q0, qend); break;
    case 7: fwd_block_store<T, 7, Relu>(g, xp, cin, off, kk, wp, bias, y, hw, q0, qend); break;
    case 6: fwd_block_store<T, 6, Relu>(g, xp, cin, off, kk, wp, bias, y, hw, q0, qend); break;
    case 5: fwd_block_store<T, 5, Relu>(g, xp, cin, off, kk, wp, bias, y, hw, q0, qend); break;
    case 4: fwd_block_store<T, 4, Relu>(g, xp, cin, off, kk, wp, bias, y, hw, q0, qend); break;
    case 3: fwd_block_store<T, 3, Relu>(g, xp, cin, off, kk, wp, bias, y, hw, q0, qend); break;
    case 2: fwd_block_store<T, 2, Relu>(g, xp, cin, off, kk, wp, bias, y, hw, q0, qend); break;
    default: fwd_block_store<T, 1, Relu>(g, xp, cin, off, kk, wp, bias, y, hw, q0, qend); break;
  }
}

/// Pack weights w (cout, cin, kk) — or, when flip, the backward-data weights w'(ci, co, t) =
/// w(co, ci, kk-1-t) of a (cin, cout, kk) tensor — into blocks of fwd_mr output channels:
/// block b (channels co0..co0+mb) at offset co0·cin·kk, laid out [ci][t][m].
template <class T>
void pack_fwd_weights(const T* w, int cout, int cin, int kk, bool flip, T* wp) {
  for (int co0 = 0; co0 < cout; co0 += fwd_mr) {
    const int mb = std::min(fwd_mr, cout - co0);
    T* d = wp + static_cast<std::ptrdiff_t>(co0) * cin * kk;
    for (int ci = 0; ci < cin; ++ci)
      for (int t = 0; t < kk; ++t)
        for (int m = 0; m < mb; ++m) {
          const int co = co0 + m;
          // not flipped: w[co][ci][t]; flipped: the stored tensor is (cin_orig = cout, cout_orig = cin).
          *d++ = flip ? w[(static_cast<std::ptrdiff_t>(ci) * cout + co) * kk + (kk - 1 - t)]
                      : w[(static_cast<std::ptrdiff_t>(co) * cin + ci) * kk + t];
        }
  }
}

/// y (n, cout, h, w) = conv(x (n, cin, h, w)) + bias (then ReLU when relu), given padded input
/// planes xp and packed weights wp (pack_fwd_weights).
template <class T>
void conv_forward_padded(const conv_geometry& g, int n, int cin, int cout, const T* xp, const T* wp, const T* bias, T* y,
                         bool relu = false) {
  using S = simd<T>;
  const auto offs = g.tap_offsets();
  const int kk = g.k * g.k;
  const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(g.h) * g.w;
  const std::ptrdiff_t qb = static_cast<std::ptrdiff_t>(S::L) * fwd_nv;  // q per block
  const std::ptrdiff_t nqb = (g.qn + qb - 1) / qb;
  const int ncob = (cout + fwd_mr - 1) / fwd_mr;
  const std::ptrdiff_t tasks = static_cast<std::ptrdiff_t>(n) * nqb * ncob;
  const double work = static_cast<double>(tasks) * cin * kk;
#pragma omp parallel for schedule(static) if (work > 2e4)
  for (std::ptrdiff_t task = 0; task < tasks; ++task) {
    const int cob = static_cast<int>(task % ncob);
    const std::ptrdiff_t rest = task / ncob;
    const std::ptrdiff_t qi = rest % nqb;
    const int i = static_cast<int>(rest / nqb);
    const int co0 = cob * fwd_mr;
    const int mb = std::min(fwd_mr, cout - co0);
    const T* xi = xp + static_cast<std::ptrdiff_t>(i) * cin * g.plane;
    const T* wb = wp + static_cast<std::ptrdiff_t>(co0) * cin * kk;
    T* yi = y + (static_cast<std::ptrdiff_t>(i) * cout + co0) * hw;
    if (relu)
      fwd_dispatch<T, true>(mb, g, xi, cin, offs.data(), kk, wb, bias ? bias + co0 : nullptr, yi, hw, qi * qb, g.qn);
    else
      fwd_dispatch<T, false>(mb, g, xi, cin, offs.data(), kk, wb, bias ? bias + co0 : nullptr, yi, hw, qi * qb, g.qn);
  }
}

// ---------------------------------------------------------------- backward-weights
inline constexpr int bww_mr = 3;  ///< output channels per register block (× 9 taps of one input channel)

/// acc[m][j] += sum over q in [0, len) of gq[m·qplane + q] · src_j[q], j < NB
template <class T, int MR, int NB>
inline void bww_block(const T* gq, std::ptrdiff_t qplane, const T* const* src, std::ptrdiff_t len,
                      typename simd<T>::v (&acc)[MR][NB]) {
  using S = simd<T>;
  for (std::ptrdiff_t q = 0; q < len; q += S::L) {
    typename S::v gv[MR];
    for (int m = 0; m < MR; ++m) gv[m] = S::load(gq + m * qplane + q);
    for (int j = 0; j < NB; ++j) {
      typename S::v xv = S::load(src[j] + q);
      keep_in_register(xv);  // one (unaligned) load feeding MR FMAs, not MR memory operands
      for (int m = 0; m < MR; ++m) acc[m][j] = S::fma(gv[m], xv, acc[m][j]);
    }
  }
}

template <class T, int MR, int NB>
inline void bww_pair(const conv_geometry& g, int n, int cin, int cout, const T* xp, const T* gq, int ci, int co0,
                     const std::ptrdiff_t* off, int i0, int i1, std::ptrdiff_t q0, std::ptrdiff_t q1, T* gw) {
  using S = simd<T>;
  typename S::v acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = S::zero();
  for (int i = i0; i < i1; ++i) {
    const T* src[NB];
    const T* xc = xp + (static_cast<std::ptrdiff_t>(i) * cin + ci) * g.plane + q0;
    for (int j = 0; j < NB; ++j) src[j] = xc + off[j];
    bww_block<T, MR, NB>(gq + (static_cast<std::ptrdiff_t>(i) * cout + co0) * g.qplane + q0, g.qplane, src, q1 - q0, acc);
  }
  (void)n;
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) gw[(static_cast<std::ptrdiff_t>(co0 + m) * cin + ci) * NB + j] += S::hsum(acc[m][j]);
}

/// The direct weight gradient's chunks: at most this many pixels (q positions) a chunk, so that the
/// chunk's output gradients for all cout channels fit in ~512 KiB of L2.
template <class T>
std::ptrdiff_t bww_chunk_budget(int cout) {
  return std::max<std::ptrdiff_t>(static_cast<std::ptrdiff_t>(simd<T>::L) * 16,
                                  (std::ptrdiff_t(512) * 1024 / static_cast<std::ptrdiff_t>(sizeof(T))) / std::max(cout, 1));
}
/// Whole images per chunk when an image (`pixels` long) fits the budget: at least ~4096 pixels a
/// chunk, since each chunk ends with horizontal sums of the accumulators.
inline int bww_images_per_chunk(std::ptrdiff_t pixels, std::ptrdiff_t budget) {
  const std::ptrdiff_t want = std::max<std::ptrdiff_t>(budget, 4096);
  return static_cast<int>(std::max<std::ptrdiff_t>(1, want / std::max<std::ptrdiff_t>(pixels, 1)));
}

// The weight gradient with gy read in place, for w a whole number of vectors: output row r of
// image i is a run of w/L whole vectors. The pixels go in chunks (whole images, or row ranges of one
// image) whose gy rows for every output channel fit in ~512 KiB of L2. Each thread takes a fixed
// range of (input channel, block of output channels) pairs; for each chunk it copies the rows of its
// current input channel that the chunk reads into a zero-padded buffer of its own (in L2, not a
// padded copy of the whole input in memory), and every pair sums the chunk in registers and adds
// it to gw, so the sums run in chunk order whatever the thread count.
struct bww_rows_plan {
  struct chunk {
    int i0, i1, r0, r1;
  };
  std::vector<chunk> chunks;
  std::ptrdiff_t buf = 0;  ///< elements of one thread's padded rows buffer
  int W2 = 0;
  template <class T>
  static bww_rows_plan make(int n, int cout, int h, int w) {
    bww_rows_plan p;
    p.W2 = w + 2;
    const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(h) * w;
    const std::ptrdiff_t budget = bww_chunk_budget<T>(cout);
    if (hw <= budget) {  // several whole images per chunk
      const int per = bww_images_per_chunk(hw, budget);
      for (int i = 0; i < n; i += per) p.chunks.push_back({i, std::min(n, i + per), 0, h});
    } else {
      const int rows = static_cast<int>(std::max<std::ptrdiff_t>(1, budget / w));
      for (int i = 0; i < n; ++i)
        for (int r = 0; r < h; r += rows) p.chunks.push_back({i, i + 1, r, std::min(h, r + rows)});
    }
    for (const chunk& c : p.chunks)
      p.buf = std::max(p.buf, static_cast<std::ptrdiff_t>(c.i1 - c.i0) * p.image_stride(c));
    return p;
  }
  /// Buffer elements per image of a chunk: rows r0 - 1 .. r1 (zero rows outside the plane).
  std::ptrdiff_t image_stride(const chunk& c) const { return static_cast<std::ptrdiff_t>(c.r1 - c.r0 + 2) * W2; }
};

/// The rows of input channel ci that chunk c reads, zero-padded (a zero column on each side, zero
/// rows above and below the plane), into xb: image i's buffer row b is input row c.r0 - 1 + b.
template <class T>
void bww_pad_rows(const bww_rows_plan& p, const bww_rows_plan::chunk& c, int cin, int h, int w, const T* x, int ci, T* xb) {
  const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(h) * w;
  const std::ptrdiff_t is = p.image_stride(c);
  for (int i = c.i0; i < c.i1; ++i) {
    const T* xc = x + (static_cast<std::ptrdiff_t>(i) * cin + ci) * hw;
    T* bi = xb + (i - c.i0) * is;
    for (int b = 0; b < c.r1 - c.r0 + 2; ++b) {
      T* row = bi + static_cast<std::ptrdiff_t>(b) * p.W2;
      const int r = c.r0 - 1 + b;
      row[0] = T(0);
      row[w + 1] = T(0);
      if (r >= 0 && r < h)
        std::memcpy(row + 1, xc + static_cast<std::ptrdiff_t>(r) * w, static_cast<std::size_t>(w) * sizeof(T));
      else
        std::memset(row + 1, 0, static_cast<std::size_t>(w) * sizeof(T));
    }
  }
}

/// gw[co0 + m][ci] += the sum over chunk c, from ci's padded rows xb (bww_pad_rows).
template <class T, int MR>
inline void bww_pair_rows(const bww_rows_plan& p, const bww_rows_plan::chunk& c, int cin, int cout, int h, int w,
                          const T* xb, const T* gy, int ci, int co0, T* gw) {
  using S = simd<T>;
  constexpr int NB = 9;
  typename S::v acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = S::zero();
  const std::ptrdiff_t hw = static_cast<std::ptrdiff_t>(h) * w;
  const std::ptrdiff_t is = p.image_stride(c);
  std::ptrdiff_t off[NB];
  for (int ky = 0; ky < 3; ++ky)
    for (int kx = 0; kx < 3; ++kx) off[3 * ky + kx] = static_cast<std::ptrdiff_t>(ky) * p.W2 + kx;
  for (int i = c.i0; i < c.i1; ++i) {
    const T* xi = xb + (i - c.i0) * is;
    const T* gc = gy + (static_cast<std::ptrdiff_t>(i) * cout + co0) * hw;
    for (int r = c.r0; r < c.r1; ++r) {
      const T* src[NB];
      const T* xr = xi + static_cast<std::ptrdiff_t>(r - c.r0) * p.W2;
      for (int j = 0; j < NB; ++j) src[j] = xr + off[j];
      bww_block<T, MR, NB>(gc + static_cast<std::ptrdiff_t>(r) * w, hw, src, w, acc);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) gw[(static_cast<std::ptrdiff_t>(co0 + m) * cin + ci) * NB + j] += S::hsum(acc[m][j]);
}

/// gw (cout, cin, 3, 3) += dL/dw for a 3×3 convolution with padding 1 of x (n, cin, h, w), gy
/// (n, cout, h, w), both read in place; w a whole number of vectors. scratch: threads × plan.buf.
template <class T>
void conv3x3_backward_weights_rows(const bww_rows_plan& p, int n, int cin, int cout, int h, int w, const T* x,
                                   const T* gy, T* gw, T* scratch, int threads) {
  const int ncob = (cout + bww_mr - 1) / bww_mr;
  const std::ptrdiff_t pairs = static_cast<std::ptrdiff_t>(cin) * ncob;
  const double work = static_cast<double>(pairs) * static_cast<double>(n) * static_cast<double>(h) * w;
#pragma omp parallel num_threads(threads) if (threads > 1 && work > 2e5)
  {
    int me = 0;
#ifdef _OPENMP
    me = omp_get_thread_num();
#endif
    T* xb = scratch + static_cast<std::ptrdiff_t>(me) * p.buf;
    for (const bww_rows_plan::chunk& c : p.chunks) {
      int padded = -1;  // the input channel whose rows xb holds for this chunk
      // The same pairs go to the same thread in every chunk (static schedule, same count): a
      // pair's gw entries are written by one thread only, so no barrier between chunks.
#pragma omp for schedule(static) nowait
      for (std::ptrdiff_t pr = 0; pr < pairs; ++pr) {
        const int ci = static_cast<int>(pr / ncob);
        const int co0 = static_cast<int>(pr % ncob) * bww_mr;
        const int mb = std::min(bww_mr, cout - co0);
        if (ci != padded) {
          bww_pad_rows<T>(p, c, cin, h, w, x, ci, xb);
          padded = ci;
        }
        if (mb == 3)
          bww_pair_rows<T, 3>(p, c, cin, cout, h, w, xb, gy, ci, co0, gw);
        else if (mb == 2)
          bww_pair_rows<T, 2>(p, c, cin, cout, h, w, xb, gy, ci, co0, gw);
        else
          bww_pair_rows<T, 1>(p, c, cin, cout, h, w, xb, gy, ci, co0, gw);
      }
    }
  }
}

/// gw (cout, cin, 3, 3) += dL/dw for a 3×3 convolution, given padded input planes xp and
/// q-layout output-gradient planes gq (q_planes).
template <class T>
void conv3x3_backward_weights_padded(const conv_geometry& g, int n, int cin, int cout, const T* xp, const T* gq, T* gw) {
  using S = simd<T>;
  constexpr int NB = 9;
  const auto offs = g.tap_offsets();
  const std::ptrdiff_t qlen = (g.qn + S::L - 1) / S::L * S::L;  // whole vectors; gq is zero past qn
  // Chunks over (image, q-range) whose output gradients (all cout planes) fit in ~512 KiB of L2.
  const std::ptrdiff_t budget = bww_chunk_budget<T>(cout);
  struct chunk {
    int i0, i1;
    std::ptrdiff_t q0, q1;
  };
  std::vector<chunk> chunks;
  if (qlen <= budget) {  // several whole images per chunk
    const int per = bww_images_per_chunk(qlen, budget);
    for (int i = 0; i < n; i += per) chunks.push_back({i, std::min(n, i + per), 0, qlen});
  } else {
    const std::ptrdiff_t step = budget / S::L * S::L;
    for (int i = 0; i < n; ++i)
      for (std::ptrdiff_t q = 0; q < qlen; q += step) chunks.push_back({i, i + 1, q, std::min(qlen, q + step)});
  }
  const int ncob = (cout + bww_mr - 1) / bww_mr;
  const std::ptrdiff_t pairs = static_cast<std::ptrdiff_t>(cin) * ncob;
  const double work = static_cast<double>(pairs) * static_cast<double>(n) * static_cast<double>(qlen);
#pragma omp parallel if (work > 2e5)
  {
    for (const chunk& c : chunks) {
#pragma omp for schedule(static) nowait
      for (std::ptrdiff_t pr = 0; pr < pairs; ++pr) {
        const int ci = static_cast<int>(pr / ncob);
        const int co0 = static_cast<int>(pr % ncob) * bww_mr;
        const int mb = std::min(bww_mr, cout - co0);
        if (mb == 3)
          bww_pair<T, 3, NB>(g, n, cin, cout, xp, gq, ci, co0, offs.data(), c.i0, c.i1, c.q0, c.q1, gw);
        else if (mb == 2)
          bww_pair<T, 2, NB>(g, n, cin, cout, xp, gq, ci, co0, offs.data(), c.i0, c.i1, c.q0, c.q1, gw);
        else
          bww_pair<T, 1, NB>(g, n, cin, cout, xp, gq, ci, co0, offs.data(), c.i0, c.i1, c.q0, c.q1, gw);
      }
    }
  }
}

}  // namespace useg::detail
