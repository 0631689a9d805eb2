// useg/backend/cpu/bn_kernels.hpp — batch-norm kernels of the CPU backend (float and double),
// optionally fused with the ReLU that follows.
//
// Statistics are taken per channel in blocks of at most 1024 values: each block's sum and sum of
// squared deviations from its own mean are accumulated in T over 16 independent lanes (which the
// compiler vectorizes), and blocks are merged in double with Chan's parallel formula, so a
// channel is read once for both moments with two-pass accuracy. Normalization and the backward
// pass are one fused sweep each.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>

namespace useg::detail {

inline constexpr int bn_lanes = 16;
inline constexpr std::ptrdiff_t bn_block = 1024;

template <class T>
inline T lanes_sum(const T (&a)[bn_lanes]) {
  T s = 0;
  for (int j = 0; j < bn_lanes; ++j) s += a[j];
  return s;
}

/// Sum of p[0..len).
template <class T>
inline T block_sum(const T* p, std::ptrdiff_t len) {
  T acc[bn_lanes] = {};
  std::ptrdiff_t i = 0;
  for (; i + bn_lanes <= len; i += bn_lanes)
    for (int j = 0; j < bn_lanes; ++j) acc[j] += p[i + j];
  T s = lanes_sum(acc);
  for (; i < len; ++i) s += p[i];
  return s;
}
/// Sum of p[0..len) in double: blocks of bn_block values summed in T over bn_lanes lanes (the
/// compiler vectorizes them; a double accumulator per value does not vectorize), blocks added in
/// double.
template <class T>
inline double long_sum(const T* p, std::ptrdiff_t len) {
  double s = 0;
  for (std::ptrdiff_t b0 = 0; b0 < len; b0 += bn_block) s += static_cast<double>(block_sum<T>(p + b0, std::min(bn_block, len - b0)));
  return s;
}
/// Sum of (p[i] - m)² over [0, len).
template <class T>
inline T block_sqdev(const T* p, std::ptrdiff_t len, T m) {
  T acc[bn_lanes] = {};
  std::ptrdiff_t i = 0;
  for (; i + bn_lanes <= len; i += bn_lanes)
    for (int j = 0; j < bn_lanes; ++j) {
      const T d = p[i + j] - m;
      acc[j] += d * d;
    }
  T s = lanes_sum(acc);
  for (; i < len; ++i) s += (p[i] - m) * (p[i] - m);
  return s;
}

/// Mean and M2 (sum of squared deviations) of one channel: n planes of hw values, cstride apart.
template <class T>
inline void channel_moments(const T* x, int n, std::ptrdiff_t cstride, std::ptrdiff_t hw, double& mean, double& m2) {
  double cnt = 0;
  mean = 0;
  m2 = 0;
  for (int i = 0; i < n; ++i) {
    const T* p = x + i * cstride;
    for (std::ptrdiff_t b0 = 0; b0 < hw; b0 += bn_block) {
      const std::ptrdiff_t len = std::min(bn_block, hw - b0);
      const double bs = static_cast<double>(block_sum(p + b0, len));
      const double bm = bs / static_cast<double>(len);
      const T bmt = static_cast<T>(bm);
      // Deviations from the rounded block mean, corrected to the exact one.
      const double bq = static_cast<double>(block_sqdev(p + b0, len, bmt)) -
                        static_cast<double>(len) * (bm - static_cast<double>(bmt)) * (bm - static_cast<double>(bmt));
      const double nb = static_cast<double>(len), tot = cnt + nb, delta = bm - mean;
      mean += delta * nb / tot;
      m2 += std::max(0.0, bq) + delta * delta * cnt * nb / tot;
      cnt = tot;
    }
  }
}

/// a·x + b: the normalization, one expression wherever it is evaluated, so that the ReLU's mask
/// recomputed in the backward (channel_backward_sums) equals the forward's exactly.
template <class T>
inline T affine_value(T a, T x, T b) {
  return a * x + b;
}

/// y = a·x + b (then ReLU when relu) over n planes of one channel.
template <class T>
inline void channel_affine(const T* x, T* y, int n, std::ptrdiff_t cstride, std::ptrdiff_t hw, T a, T b, bool relu) {
  for (int i = 0; i < n; ++i) {
    const T* p = x + i * cstride;
    T* q = y + i * cstride;
    if (relu) {
      for (std::ptrdiff_t k = 0; k < hw; ++k) {
        const T v = affine_value(a, p[k], b);
        q[k] = v > T(0) ? v : T(0);
      }
    } else {
      for (std::ptrdiff_t k = 0; k < hw; ++k) q[k] = a * p[k] + b;
    }
  }
}

/// Backward reductions of one channel: sg = Σ g', sgx = Σ g'·(x - m), with g' = gy, or gy where
/// the ReLU that followed the batch norm passed: z > 0 read from its output z when given, else
/// a·x + b > 0 recomputed from the batch norm's input with coef = (a, b), the train-mode
/// forward's coefficients, when given (bit-identical to the forward's ReLU).
template <class T>
inline void channel_backward_sums(const T* x, const T* gy, const T* z, int n, std::ptrdiff_t cstride, std::ptrdiff_t hw,
                                  T m, double& sg, double& sgx, const T* coef = nullptr) {
  sg = 0;
  sgx = 0;
  for (int i = 0; i < n; ++i) {
    const T* p = x + i * cstride;
    const T* g = gy + i * cstride;
    const T* zz = z ? z + i * cstride : nullptr;
    for (std::ptrdiff_t b0 = 0; b0 < hw; b0 += bn_block) {
      const std::ptrdiff_t len = std::min(bn_block, hw - b0);
      T a1[bn_lanes] = {}, a2[bn_lanes] = {};
      std::ptrdiff_t k = 0;
      if (zz) {
        for (; k + bn_lanes <= len; k += bn_lanes)
          for (int j = 0; j < bn_lanes; ++j) {
            const std::ptrdiff_t o = b0 + k + j;
            const T gg = zz[o] > T(0) ? g[o] : T(0);
            a1[j] += gg;
            a2[j] += gg * (p[o] - m);
          }
      } else if (coef) {
        const T ca = coef[0], cb = coef[1];
        for (; k + bn_lanes <= len; k += bn_lanes)
          for (int j = 0; j < bn_lanes; ++j) {
            const std::ptrdiff_t o = b0 + k + j;
            const T gg = affine_value(ca, p[o], cb) > T(0) ? g[o] : T(0);
            a1[j] += gg;
            a2[j] += gg * (p[o] - m);
          }
      } else {
        for (; k + bn_lanes <= len; k += bn_lanes)
          for (int j = 0; j < bn_lanes; ++j) {
            const std::ptrdiff_t o = b0 + k + j;
            a1[j] += g[o];
            a2[j] += g[o] * (p[o] - m);
          }
      }
      T s1 = lanes_sum(a1), s2 = lanes_sum(a2);
      for (; k < len; ++k) {
        const std::ptrdiff_t o = b0 + k;
        const bool pass = zz ? zz[o] > T(0) : (!coef || affine_value(coef[0], p[o], coef[1]) > T(0));
        const T gg = pass ? g[o] : T(0);
        s1 += gg;
        s2 += gg * (p[o] - m);
      }
      sg += static_cast<double>(s1);
      sgx += static_cast<double>(s2);
    }
  }
}

/// gx = k·(g' - mg - (x - m)·c2) over n planes of one channel (g' and the mask as in
/// channel_backward_sums).
template <class T>
inline void channel_backward_apply(const T* x, const T* gy, const T* z, T* gx, int n, std::ptrdiff_t cstride,
                                   std::ptrdiff_t hw, T m, T k, T mg, T c2, const T* coef = nullptr) {
  for (int i = 0; i < n; ++i) {
    const T* p = x + i * cstride;
    const T* g = gy + i * cstride;
    T* q = gx + i * cstride;
    if (z) {
      const T* zz = z + i * cstride;
      for (std::ptrdiff_t o = 0; o < hw; ++o) {
        const T gg = zz[o] > T(0) ? g[o] : T(0);
        q[o] = k * (gg - mg - (p[o] - m) * c2);
      }
    } else if (coef) {
      const T ca = coef[0], cb = coef[1];
      for (std::ptrdiff_t o = 0; o < hw; ++o) {
        const T gg = affine_value(ca, p[o], cb) > T(0) ? g[o] : T(0);
        q[o] = k * (gg - mg - (p[o] - m) * c2);
      }
    } else {
      for (std::ptrdiff_t o = 0; o < hw; ++o) q[o] = k * (g[o] - mg - (p[o] - m) * c2);
    }
  }
}

}  // namespace useg::detail
