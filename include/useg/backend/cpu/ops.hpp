// useg/backend/cpu/ops.hpp — the CPU backend's math (Eigen GEMM, OpenMP loops).
//
// Every function here is a plain static function of ops<cpu_backend<T>> over raw pointers and
// run-time descriptors: it is compiled once per scalar type, however many layer
// configurations a program instantiates. Conventions:
//   - "forward"/"_fwd" functions overwrite their outputs;
//   - parameter gradients (gw, gb, ggamma, gbeta) are ACCUMULATED (+=), so shared weights and
//     repeated applications sum their gradients for free;
//   - input gradients (gx) are overwritten unless the name says "accumulate".
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "useg/backend/cpu/context.hpp"
#include "useg/backend/cpu/bn_kernels.hpp"
#include "useg/backend/cpu/conv1x1_kernels.hpp"
#include "useg/backend/cpu/conv_kernels.hpp"
#include "useg/backend/cpu/pool_kernels.hpp"
#include "useg/backend/cpu/winograd4_kernels.hpp"
#include "useg/backend/cpu/winograd_kernels.hpp"
#include "useg/core/descriptors.hpp"

namespace useg {

template <class T>
struct ops<cpu_backend<T>> {
  using B = cpu_backend<T>;
  using ctx_t = context<B>;
  using index = std::ptrdiff_t;
  using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using map = Eigen::Map<mat, Eigen::Aligned16>;
  using cmap = Eigen::Map<const mat>;
  using mmap = Eigen::Map<mat>;
  using vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;

  // ---------------------------------------------------------------- memory
  static T* allocate(std::size_t n) { return detail::cpu_allocate<T>(n); }
  static void deallocate(T* p, std::size_t) noexcept { detail::cpu_free(p); }
  /// Blocks of at least 1 MiB are filled by all threads, in 8 parts, and large copies are shared
  /// out too (copy_strided_pair): one core alone reaches about half the memory bandwidth of two
  /// here, and the other would wait.
  static constexpr std::size_t parallel_bytes = std::size_t(1) << 20;
  static void fill(T* p, std::size_t n, T v) {
    if (n * sizeof(T) >= parallel_bytes) {
#pragma omp parallel for schedule(static)
      for (int i = 0; i < 8; ++i) fill_part(p + n * i / 8, n * (i + 1) / 8 - n * i / 8, v);
    } else {
      fill_part(p, n, v);
    }
  }
  static void copy(T* dst, const T* src, std::size_t n) {
    detail::copy_strided_pair<T>(1, n, src, 0, dst, 0, 0, nullptr, 0, nullptr, 0);
  }
  static void fill_part(T* p, std::size_t n, T v) {
    if (v == T(0)) {
      if (n) std::memset(p, 0, n * sizeof(T));
    } else {
      std::fill(p, p + n, v);
    }
  }
  static void upload(T* dst, const T* host, std::size_t n) { copy(dst, host, n); }
  static void download(T* host, const T* src, std::size_t n) { copy(host, src, n); }

  // ---------------------------------------------------------------- convolution
  /// col (cin*k*k, h*w) from one image x (cin, h, w), zero padding k/2.
  static void im2col(const T* x, int cin, int h, int w, int k, T* col) {
    const int p = k / 2;
    const index hw = static_cast<index>(h) * w;
#pragma omp parallel for schedule(static) if (cin * k * k * hw > (1 << 15))
    for (int c = 0; c < cin; ++c) {
      const T* src = x + c * hw;
      for (int ky = 0; ky < k; ++ky)
        for (int kx = 0; kx < k; ++kx) {
          T* dst = col + ((static_cast<index>(c) * k + ky) * k + kx) * hw;
          const int dx = kx - p;
          const int x0 = std::max(0, -dx), x1 = std::min(w, w - dx);
          for (int y = 0; y < h; ++y) {
            const int iy = y + ky - p;
            T* d = dst + static_cast<index>(y) * w;
            if (iy < 0 || iy >= h || x0 >= x1) {
              std::fill(d, d + w, T(0));
              continue;
            }
            const T* s = src + static_cast<index>(iy) * w + dx;
            for (int xx = 0; xx < x0; ++xx) d[xx] = T(0);
            std::memcpy(d + x0, s + x0, static_cast<std::size_t>(x1 - x0) * sizeof(T));
            for (int xx = x1; xx < w; ++xx) d[xx] = T(0);
          }
        }
    }
  }
  /// gx (cin, h, w) = col2im(col); overwrites gx.
  static void col2im(const T* col, int cin, int h, int w, int k, T* gx) {
    const int p = k / 2;
    const index hw = static_cast<index>(h) * w;
#pragma omp parallel for schedule(static) if (cin * k * k * hw > (1 << 15))
    for (int c = 0; c < cin; ++c) {
      T* dst = gx + c * hw;
      std::fill(dst, dst + hw, T(0));
      for (int ky = 0; ky < k; ++ky)
        for (int kx = 0; kx < k; ++kx) {
          const T* src = col + ((static_cast<index>(c) * k + ky) * k + kx) * hw;
          const int dx = kx - p;
          const int x0 = std::max(0, -dx), x1 = std::min(w, w - dx);
          for (int y = 0; y < h; ++y) {
            const int iy = y + ky - p;
            if (iy < 0 || iy >= h) continue;
            const T* s = src + static_cast<index>(y) * w;
            T* d = dst + static_cast<index>(iy) * w + dx;
            for (int xx = x0; xx < x1; ++xx) d[xx] += s[xx];
          }
        }
    }
  }

  /// y = conv(x, w) + b (b may be null). Direct convolution over zero-padded planes
  /// (conv_kernels.hpp), no im2col matrix.
  static void conv2d_forward(ctx_t& ctx, const conv_desc& d, const T* x, const T* wt, const T* b, T* y) {
    conv_any(ctx, d.n, d.cin, d.cout, d.h, d.w, d.k, x, wt, false, b, y, false);
  }
  /// y = relu(conv(x, w) + b): the convolution with the ReLU applied as it is stored (inference
  /// with batch norm folded into w and b, see fold_batch_norm).
  static void conv2d_forward_relu(ctx_t& ctx, const conv_desc& d, const T* x, const T* wt, const T* b, T* y) {
    conv_any(ctx, d.n, d.cin, d.cout, d.h, d.w, d.k, x, wt, false, b, y, true);
  }
  /// y = conv(concat(xa, xb)) + b (b may be null; then ReLU when relu), the two inputs read in
  /// place along channels: xa holds d.n images of ca channels, xb of d.cin - ca (the decoder's skip
  /// and up-convolution output at inference, and the attention gate's two 1×1 convolutions). The
  /// same kernels and arithmetic as conv2d_forward(_relu) on the concatenation, without building it.
  static void conv2d_forward_concat(ctx_t& ctx, const conv_desc& d, const T* xa, int ca, const T* xb, const T* wt,
                                    const T* b, T* y, bool relu = false) {
    if (ca <= 0 || ca >= d.cin)
      throw shape_error("useg::conv2d_forward_concat: two non-empty inputs (got " + std::to_string(ca) + " of " +
                        std::to_string(d.cin) + " channels in the first)");
    conv_any(ctx, d.n, d.cin, d.cout, d.h, d.w, d.k,
             detail::plane_src<T>(xa, ca, xb, d.cin, static_cast<std::ptrdiff_t>(d.hw())), wt, false, b, y, relu);
  }
  /// Whether conv2d_forward_upsampled reads its input through the upsampling for d, the
  /// convolution on the upsampled planes: a 3×3 F(4×4,3×3) call whose tile row fills whole vectors.
  static bool conv_reads_upsampled(const conv_desc& d) {
    return d.k == 3 && d.h % 2 == 0 && d.w % 2 == 0 && detail::use_winograd(3, d.cin, d.cout) &&
           detail::use_winograd4<T>(d.n, d.h, d.w, d.cin, d.cout) && detail::wino4_rows_per_vector<T>(d.w) == 1;
  }
  /// y = conv(upsample2x(x)) + b (then ReLU when relu), the nearest ×2 upsampling of x (d.n, d.cin,
  /// d.h/2, d.w/2) never built: the F(4×4,3×3) input transform reads x twice per column and per row
  /// (the decoder's up-convolution at inference). d is the convolution on the upsampled planes,
  /// and conv_reads_upsampled(d) must hold. The same arithmetic as conv2d_forward(_relu) on the
  /// upsampled input.
  static void conv2d_forward_upsampled(ctx_t& ctx, const conv_desc& d, const T* x, const T* wt, const T* b, T* y,
                                       bool relu = false) {
    if (!conv_reads_upsampled(d))
      throw shape_error("useg::conv2d_forward_upsampled: not a 3×3 F(4×4,3×3) convolution over whole vectors (" +
                        std::to_string(d.cin) + " -> " + std::to_string(d.cout) + " channels at " + std::to_string(d.h) +
                        "×" + std::to_string(d.w) + "; check conv_reads_upsampled first)");
    detail::plane_src<T> src(x, d.cin, static_cast<std::ptrdiff_t>(d.h / 2) * (d.w / 2));
    src.up = true;
    conv_any(ctx, d.n, d.cin, d.cout, d.h, d.w, d.k, src, wt, false, b, y, relu);
  }
  /// y = res + relu(conv(x, w) + b), res laid out as y and not overlapping it (the recurrent
  /// block's x + f(·) in inference): the Winograd kernels add res as they store, so f(·) is never
  /// written out; the other kernels add it in a pass after.
  static void conv2d_forward_relu_add(ctx_t& ctx, const conv_desc& d, const T* x, const T* wt, const T* b, const T* res,
                                      T* y) {
    conv_any(ctx, d.n, d.cin, d.cout, d.h, d.w, d.k, x, wt, false, b, y, true, res);
  }
  /// Images per group so that a group's padded copy stays under ~4M elements: the workspace
  /// holds one group at a time, not the batch (and lives as long as the context: 8M elements
  /// cost U-Net w64 128²×8 15 MiB more peak memory, for no measurable speed).
  static int image_group(int n, std::size_t per_image) {
    const std::size_t budget = std::size_t(4) << 20;
    return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(static_cast<std::size_t>(n), budget / std::max<std::size_t>(per_image, 1))));
  }
  /// A Winograd convolution's packed weights (packed_size elements, packing `kind` of wt: cout ×
  /// cin × 9) and a scratch of `scratch` elements from the workspace: the weights from the
  /// context's inference cache when it holds them (a call of `tiles` tiles, see
  /// caches_weights), else packed by pack(dst) at the start of the
  /// workspace, before the scratch (kept there when the previous convolution packed the same
  /// weights: the recurrent block applies one convolution several times in a row).
  template <class Pack>
  static std::pair<const T*, T*> wino_weights(ctx_t& ctx, const T* wt, int cout, int cin, int kind,
                                              std::size_t packed_size, std::size_t scratch, long tiles, Pack&& pack) {
    if (const T* up = ctx.cached_packed_weights(wt, cout, cin, 9, kind, packed_size, tiles, pack))
      return {up, ctx.workspace(scratch)};
    T* ws = ctx.workspace(packed_size + scratch);
    if (!ctx.keep_packed_weights(wt, cout, cin, 9, kind)) pack(ws);
    return {ws, ws + packed_size};
  }
  /// The forward kernels (Winograd or direct), image group by image group. flip: wt is the
  /// (cin_orig = cout, cout_orig = cin) weight of the convolution whose backward-data this is.
  /// res (null: none): y = res + that (after the ReLU), laid out as y; the Winograd kernels add it
  /// as they store, the others in a pass after.
  static void conv_any(ctx_t& ctx, int n, int cin, int cout, int h, int w, int k, const T* x, const T* wt, bool flip,
                       const T* b, T* y, bool relu, const T* res = nullptr) {
    conv_any(ctx, n, cin, cout, h, w, k, detail::plane_src<T>(x, cin, static_cast<std::ptrdiff_t>(h) * w), wt, flip, b, y,
             relu, res);
  }
  /// The same with the input planes where src says (one input, or two read in place).
  static void conv_any(ctx_t& ctx, int n, int cin, int cout, int h, int w, int k, const detail::plane_src<T>& src,
                       const T* wt, bool flip, const T* b, T* y, bool relu, const T* res = nullptr) {
    const std::size_t hw = static_cast<std::size_t>(h) * w;
    if (detail::use_winograd(k, cin, cout) && detail::use_winograd4<T>(n, h, w, cin, cout)) {  // F(4×4,3×3)
      const detail::wino4_geometry g(h, w, detail::simd<T>::L, detail::wino4_rows_per_vector<T>(w));
      if (src.up && g.rpv != 1) throw shape_error("useg::conv_any: an upsampled input needs a tile row of whole vectors");
      const int threads = std::max(1, ctx.threads());
      const auto [up, scratch] =
          wino_weights(ctx, wt, cout, cin, flip ? 4 : 3, std::size_t(36) * cout * cin,
                       static_cast<std::size_t>(threads) * detail::wino4_scratch<T>(cin),
                       static_cast<long>(n) * g.TH * g.TW, [&](T* dst) { detail::wino4_pack_weights<T>(wt, cout, cin, flip, dst); });
      const bool stream = static_cast<std::size_t>(n) * cout * hw * sizeof(T) >= detail::wino_stream_min_bytes;
      detail::wino4_forward<T>(g, n, cin, cout, src, up, b, y, relu, scratch, threads, stream, res);
      return;
    }
    if (src.up) throw shape_error("useg::conv_any: only F(4×4,3×3) reads an upsampled input");
    if (detail::use_winograd(k, cin, cout)) {  // F(2×2,3×3)
      const detail::wino_geometry g(h, w, detail::simd<T>::L);
      const int threads = std::max(1, ctx.threads());
      const std::size_t per = static_cast<std::size_t>(cin) * static_cast<std::size_t>(g.plane());
      const int grp = image_group(n, per);
      const bool stream = static_cast<std::size_t>(n) * cout * hw * sizeof(T) >= detail::wino_stream_min_bytes;
      const long tiles = static_cast<long>(n) * g.TH * g.TW;
      if (grp == n && !ctx.repeats_conv_weights(wt, flip) && detail::wino_fuse_weights<T>(g, n, threads) &&
          !ctx.caches_weights(tiles)) {
        // Few tile vectors: the weights transformed block by block as they are used, not packed.
        T* xq = ctx.workspace(n * per + detail::wino_fused_scratch<T>(g, n, cin, threads));
        ctx.note_conv_weights(wt, flip);
        detail::wino_pad<T>(g, static_cast<std::ptrdiff_t>(n) * cin, src, xq);
        detail::wino_forward_fused<T>(g, n, cin, cout, xq, wt, flip, b, y, relu, xq + n * per, threads, stream, res);
        return;
      }
      const auto [up, xq] =
          wino_weights(ctx, wt, cout, cin, flip ? 2 : 1, std::size_t(16) * cout * cin,
                       grp * per + static_cast<std::size_t>(threads) * detail::wino_scratch<T>(cin), tiles,
                       [&](T* dst) { detail::wino_pack_weights<T>(wt, cout, cin, flip, dst); });
      ctx.note_conv_weights(wt, flip);
      for (int i0 = 0; i0 < n; i0 += grp) {
        const int m = std::min(grp, n - i0);
        detail::wino_pad<T>(g, static_cast<std::ptrdiff_t>(m) * cin, src.from_image(i0), xq);
        detail::wino_forward<T>(g, m, cin, cout, xq, up, b, y + i0 * cout * hw, relu, xq + grp * per, threads, stream,
                                res ? res + i0 * cout * hw : nullptr);
      }
      return;
    }
    if (k == 1) {  // a matrix product per image, read in place (conv1x1_kernels.hpp)
      T* wp = ctx.workspace(static_cast<std::size_t>(cout) * cin);
      detail::pack_fwd_weights<T>(wt, cout, cin, 1, flip, wp);
      if (src.b)
        detail::conv1x1_forward<T>(n, src.ca, cout, static_cast<std::ptrdiff_t>(hw), src.a, wp, b, y, relu, src.b, cin - src.ca);
      else
        detail::conv1x1_forward<T>(n, cin, cout, static_cast<std::ptrdiff_t>(hw), src.a, wp, b, y, relu);
      if (res) add(ctx, res, y, y, static_cast<std::size_t>(n) * cout * hw);
      return;
    }
    const detail::conv_geometry g(h, w, k, detail::simd<T>::L, detail::fwd_nv);
    const std::size_t kk = static_cast<std::size_t>(k) * k;
    const std::size_t per = static_cast<std::size_t>(cin) * static_cast<std::size_t>(g.plane);
    const int grp = image_group(n, per);
    const std::size_t wps = static_cast<std::size_t>(cout) * cin * kk;
    T* ws = ctx.workspace(wps + grp * per);
    detail::pack_fwd_weights<T>(wt, cout, cin, static_cast<int>(kk), flip, ws);
    for (int i0 = 0; i0 < n; i0 += grp) {
      const int m = std::min(grp, n - i0);
      detail::pad_planes<T>(g, static_cast<std::ptrdiff_t>(m) * cin, src.from_image(i0), ws + wps);
      detail::conv_forward_padded<T>(g, m, cin, cout, ws + wps, ws, b, y + i0 * cout * hw, relu);
    }
    if (res) add(ctx, res, y, y, static_cast<std::size_t>(n) * cout * hw);
  }
  /// Fold an eval-mode batch norm into the convolution before it: with s = gamma/sqrt(rvar+eps),
  /// wf = w·s (per output channel; w holds cout rows of per_out values) and bf = (b - rmean)·s +
  /// beta (b may be null: zero). bn(conv_{w,b}(x)) = conv_{wf,bf}(x).
  /// Output channels are split among the threads: 1024 × 1024 channels of 3×3 weights are 36 MiB
  /// read and written per call, and an eval-mode R2U-Net folds every convolution it applies.
  static void fold_batch_norm(ctx_t&, int cout, std::size_t per_out, const T* w, const T* b, const T* gamma, const T* beta,
                              const T* running_mean, const T* running_var, double eps, T* wf, T* bf) {
#pragma omp parallel for schedule(static) if (static_cast<double>(cout) * static_cast<double>(per_out) > 3e4)
    for (int o = 0; o < cout; ++o) {
      const double sc = static_cast<double>(gamma[o]) / std::sqrt(static_cast<double>(running_var[o]) + eps);
      for (std::size_t i = 0; i < per_out; ++i) wf[o * per_out + i] = static_cast<T>(w[o * per_out + i] * sc);
      bf[o] = static_cast<T>(((b ? static_cast<double>(b[o]) : 0.0) - running_mean[o]) * sc + beta[o]);
    }
  }
  /// gx = conv^T(gy, w) (overwrites gx): the forward kernels applied to gy with the flipped,
  /// transposed weights.
  static void conv2d_backward_data(ctx_t& ctx, const conv_desc& d, const T* wt, const T* gy, T* gx) {
    conv_any(ctx, d.n, d.cout, d.cin, d.h, d.w, d.k, gy, wt, true, nullptr, gx, false);
  }
  /// gw += dL/dw, gb += dL/db (gb may be null).
  static void conv2d_backward_weights(ctx_t& ctx, const conv_desc& d, const T* x, const T* gy, T* gw, T* gb) {
    if (detail::use_winograd_weight_grad(d.k, d.cin, d.cout)) return winograd_backward_weights(ctx, d, x, gy, gw, gb);
    if (d.k == 1) {
      const int threads = std::max(1, ctx.threads());
      T* ws = ctx.workspace(detail::conv1x1_bww_scratch(d.cin, d.cout, threads));
      detail::conv1x1_backward_weights<T>(d.n, d.cin, d.cout, static_cast<std::ptrdiff_t>(d.hw()), x, gy, gw, gb, ws,
                                          threads);
      return;
    }
    if (d.k == 3 && d.w % detail::simd<T>::L == 0) {  // x and gy read in place, row by row
      const int threads = std::max(1, ctx.threads());
      const auto plan = detail::bww_rows_plan::make<T>(d.n, d.cout, d.h, d.w);
      T* ws = ctx.workspace(static_cast<std::size_t>(threads) * static_cast<std::size_t>(plan.buf));
      detail::conv3x3_backward_weights_rows<T>(plan, d.n, d.cin, d.cout, d.h, d.w, x, gy, gw, ws, threads);
      if (gb) add_bias_grad(d, gy, gb);
      return;
    }
    if (d.k == 3) {
      const detail::conv_geometry g(d.h, d.w, d.k, detail::simd<T>::L, detail::fwd_nv);
      const std::size_t hw = d.hw();
      const std::size_t per = static_cast<std::size_t>(d.cin) * static_cast<std::size_t>(g.plane) +
                              static_cast<std::size_t>(d.cout) * static_cast<std::size_t>(g.qplane);
      const int grp = image_group(d.n, per);
      const std::size_t xps = static_cast<std::size_t>(grp) * d.cin * static_cast<std::size_t>(g.plane);
      T* ws = ctx.workspace(grp * per);
      for (int i0 = 0; i0 < d.n; i0 += grp) {
        const int m = std::min(grp, d.n - i0);
        detail::pad_planes<T>(g, static_cast<std::ptrdiff_t>(m) * d.cin, x + i0 * d.cin * hw, ws);
        detail::q_planes<T>(g, m, d.cout, gy + i0 * d.cout * hw, ws + xps, gb);
        detail::conv3x3_backward_weights_padded<T>(g, m, d.cin, d.cout, ws, ws + xps, gw);
      }
      return;
    }
    conv2d_backward_weights_gemm(ctx, d, x, gy, gw, gb);
  }
  /// The weight gradient of a 3×3 convolution by Winograd F(2×2,3×3) (winograd_kernels.hpp).
  static void winograd_backward_weights(ctx_t& ctx, const conv_desc& d, const T* x, const T* gy, T* gw, T* gb) {
    constexpr int L = detail::simd<T>::L;
    const detail::wino_geometry g(d.h, d.w, L, 4);
    const detail::wino_wg_shape sh(d.cin, d.cout, L);
    const std::size_t hw = d.hw();
    const std::size_t per = static_cast<std::size_t>(d.cin + d.cout) * static_cast<std::size_t>(g.plane());
    const int grp = image_group(d.n, per);
    const std::ptrdiff_t tnp = (g.tn + L - 1) / L * L;
    const int threads = std::max(1, ctx.threads());
    const detail::wino_wg_plan plan = detail::wino_wg_make_plan(sh, static_cast<std::ptrdiff_t>(grp) * tnp, L);
    const std::size_t gs = sh.ghat();
    const std::size_t cs = plan.scratch(sh);
    const std::size_t xs = static_cast<std::size_t>(grp) * d.cin * static_cast<std::size_t>(g.plane());
    T* ws = ctx.workspace(gs + cs + static_cast<std::size_t>(grp) * per);
    fill(ws, gs, T(0));
    for (int i0 = 0; i0 < d.n; i0 += grp) {
      const int m = std::min(grp, d.n - i0);
      T* xq = ws + gs + cs;
      detail::wino_pad<T>(g, static_cast<std::ptrdiff_t>(m) * d.cin, x + i0 * d.cin * hw, xq);
      detail::wino_gy_quarters<T>(g, static_cast<std::ptrdiff_t>(m) * d.cout, gy + i0 * d.cout * hw, xq + xs);
      detail::wino_weight_grad_accumulate<T>(g, m, d.cin, d.cout, sh, xq, xq + xs, ws, plan, ws + gs, threads);
    }
    detail::wino_weight_grad_finish<T>(d.cin, d.cout, sh, ws, gw);
    if (gb) add_bias_grad(d, gy, gb);
  }
  /// gb[c] += the sum of gy's channel c over the batch (in double, per channel: the same whatever
  /// the thread count).
  static void add_bias_grad(const conv_desc& d, const T* gy, T* gb) {
    const index hw = static_cast<index>(d.hw());
    const index cs_ = static_cast<index>(d.cout) * hw;
#pragma omp parallel for schedule(static) if (static_cast<double>(d.n) * d.cout * hw > 3e4)
    for (int c = 0; c < d.cout; ++c) {
      double sum = 0;
      for (int i = 0; i < d.n; ++i) sum += detail::long_sum<T>(gy + i * cs_ + c * hw, hw);
      gb[c] += static_cast<T>(sum);
    }
  }
  /// The im2col + GEMM weight gradient (kernels other than 1×1 and 3×3).
  static void conv2d_backward_weights_gemm(ctx_t& ctx, const conv_desc& d, const T* x, const T* gy, T* gw, T* gb) {
    const index hw = static_cast<index>(d.hw());
    const index kk = static_cast<index>(d.cin) * d.k * d.k;
    mmap GW(gw, d.cout, kk);
    T* col = d.k == 1 ? nullptr : ctx.workspace(static_cast<std::size_t>(kk * hw));
    for (int n = 0; n < d.n; ++n) {
      const T* xn = x + n * d.cin * hw;
      cmap GY(gy + n * d.cout * hw, d.cout, hw);
      if (d.k == 1) {
        GW.noalias() += GY * cmap(xn, d.cin, hw).transpose();
      } else {
        im2col(xn, d.cin, d.h, d.w, d.k, col);
        GW.noalias() += GY * cmap(col, kk, hw).transpose();
      }
      if (gb) Eigen::Map<vec>(gb, d.cout) += GY.rowwise().sum();
    }
  }

  // ---------------------------------------------------------------- transposed conv 2×2 s2
  /// y (n, cout, 2h, 2w) = convT(x, w) + b; w is (cin, cout, 2, 2) as in PyTorch.
  static void upconv2x2_forward(ctx_t& ctx, const upconv_desc& d, const T* x, const T* wt, const T* b, T* y) {
    const index hw = static_cast<index>(d.hw());
    const index oc4 = static_cast<index>(d.cout) * 4;
    cmap W(wt, d.cin, oc4);
    T* tmp = ctx.workspace(static_cast<std::size_t>(oc4 * hw));
    const int W2 = 2 * d.w;
    for (int n = 0; n < d.n; ++n) {
      mmap(tmp, oc4, hw).noalias() = W.transpose() * cmap(x + n * d.cin * hw, d.cin, hw);
      T* yn = y + n * oc4 * hw;
#pragma omp parallel for schedule(static)
      for (int co = 0; co < d.cout; ++co) {
        const T bias = b ? b[co] : T(0);
        for (int a = 0; a < 2; ++a)
          for (int bb = 0; bb < 2; ++bb) {
            const T* t = tmp + (static_cast<index>(co) * 4 + a * 2 + bb) * hw;
            T* yc = yn + static_cast<index>(co) * 4 * hw;
            for (int i = 0; i < d.h; ++i)
              for (int j = 0; j < d.w; ++j)
                yc[static_cast<index>(2 * i + a) * W2 + 2 * j + bb] = t[static_cast<index>(i) * d.w + j] + bias;
          }
      }
    }
  }
  static void upconv_gather(const upconv_desc& d, const T* gyn, T* tmp) {
    const index hw = static_cast<index>(d.hw());
    const int W2 = 2 * d.w;
#pragma omp parallel for schedule(static)
    for (int co = 0; co < d.cout; ++co)
      for (int a = 0; a < 2; ++a)
        for (int bb = 0; bb < 2; ++bb) {
          T* t = tmp + (static_cast<index>(co) * 4 + a * 2 + bb) * hw;
          const T* g = gyn + static_cast<index>(co) * 4 * hw;
          for (int i = 0; i < d.h; ++i)
            for (int j = 0; j < d.w; ++j)
              t[static_cast<index>(i) * d.w + j] = g[static_cast<index>(2 * i + a) * W2 + 2 * j + bb];
        }
  }
  static void upconv2x2_backward_data(ctx_t& ctx, const upconv_desc& d, const T* wt, const T* gy, T* gx) {
    const index hw = static_cast<index>(d.hw());
    const index oc4 = static_cast<index>(d.cout) * 4;
    cmap W(wt, d.cin, oc4);
    T* tmp = ctx.workspace(static_cast<std::size_t>(oc4 * hw));
    for (int n = 0; n < d.n; ++n) {
      upconv_gather(d, gy + n * oc4 * hw, tmp);
      mmap(gx + n * d.cin * hw, d.cin, hw).noalias() = W * cmap(tmp, oc4, hw);
    }
  }
  static void upconv2x2_backward_weights(ctx_t& ctx, const upconv_desc& d, const T* x, const T* gy, T* gw, T* gb) {
    const index hw = static_cast<index>(d.hw());
    const index oc4 = static_cast<index>(d.cout) * 4;
    mmap GW(gw, d.cin, oc4);
    T* tmp = ctx.workspace(static_cast<std::size_t>(oc4 * hw));
    for (int n = 0; n < d.n; ++n) {
      upconv_gather(d, gy + n * oc4 * hw, tmp);
      GW.noalias() += cmap(x + n * d.cin * hw, d.cin, hw) * cmap(tmp, oc4, hw).transpose();
      if (gb) {
        for (int co = 0; co < d.cout; ++co) {
          gb[co] += static_cast<T>(detail::long_sum<T>(tmp + static_cast<index>(co) * 4 * hw, 4 * hw));
        }
      }
    }
  }

  // ---------------------------------------------------------------- batch norm
  /// Train mode: normalize with batch statistics, save mean and 1/sqrt(var+eps) for backward,
  /// update running mean and (unbiased) running var with momentum, as PyTorch does.
  static void batch_norm_forward_train(ctx_t&, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                                       T* running_mean, T* running_var, T* save_mean, T* save_invstd, T* y) {
    bn_train(d, x, gamma, beta, running_mean, running_var, save_mean, save_invstd, y, false);
  }
  /// Eval mode: normalize with the running statistics.
  static void batch_norm_forward_eval(ctx_t&, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                                      const T* running_mean, const T* running_var, T* y) {
    bn_eval(d, x, gamma, beta, running_mean, running_var, y, false);
  }
  /// Backward of either mode. train: mean/invstd are the saved batch statistics; eval: pass
  /// the running mean and invstd = 1/sqrt(running_var+eps) computed by the caller via
  /// batch_norm_eval_invstd. gx overwritten (skipped when null); ggamma, gbeta accumulated.
  static void batch_norm_backward(ctx_t&, const bn_desc& d, bool train, const T* x, const T* gy, const T* gamma,
                                  const T* mean, const T* invstd, T* gx, T* ggamma, T* gbeta) {
    bn_backward(d, train, x, gy, nullptr, gamma, mean, invstd, gx, ggamma, gbeta);
  }
  /// Fused batch norm + ReLU: z = relu(bn(x)) in one pass (train mode: batch statistics, running
  /// statistics updated as batch_norm_forward_train does).
  static void batch_norm_relu_forward_train(ctx_t&, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                                            T* running_mean, T* running_var, T* save_mean, T* save_invstd, T* z) {
    bn_train(d, x, gamma, beta, running_mean, running_var, save_mean, save_invstd, z, true);
  }
  /// Fused batch norm + ReLU, eval mode (running statistics).
  static void batch_norm_relu_forward_eval(ctx_t&, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                                           const T* running_mean, const T* running_var, T* z) {
    bn_eval(d, x, gamma, beta, running_mean, running_var, z, true);
  }
  /// Backward of z = relu(bn(x)) given gz = dL/dz: the ReLU's mask is read from z (z > 0).
  /// mean/invstd as in batch_norm_backward. gx overwritten (skipped when null); ggamma, gbeta
  /// accumulated. gx may alias x, z or gz (each element is read, then written, in one place).
  static void batch_norm_relu_backward(ctx_t&, const bn_desc& d, bool train, const T* x, const T* z, const T* gz,
                                       const T* gamma, const T* mean, const T* invstd, T* gx, T* ggamma, T* gbeta) {
    bn_backward(d, train, x, gz, z, gamma, mean, invstd, gx, ggamma, gbeta);
  }

  /// Train-mode backward of z = relu(bn(x)) without z: the ReLU's mask is recomputed from x with
  /// the forward's coefficients (bn_scale, bn_shift of the saved statistics), bit-identical to
  /// z > 0. Saves restoring a dropped z for its mask. gx overwritten, may alias x or gz;
  /// ggamma, gbeta accumulated.
  static void batch_norm_relu_backward_from_input(ctx_t&, const bn_desc& d, const T* x, const T* gz, const T* gamma,
                                                  const T* beta, const T* mean, const T* invstd, T* gx, T* ggamma,
                                                  T* gbeta) {
    bn_backward(d, true, x, gz, nullptr, gamma, mean, invstd, gx, ggamma, gbeta, beta);
  }

  /// Re-apply a train-mode batch norm + ReLU with its saved statistics: z = relu(bn(x)) (+
  /// residual when non-null), bit-identical to the z batch_norm_relu_forward_train wrote. Lets a
  /// block drop z after the forward and recompute it for the backward.
  static void batch_norm_relu_apply(ctx_t&, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                                    const T* save_mean, const T* save_invstd, const T* residual, T* z) {
    bn_apply_saved(d, x, gamma, beta, save_mean, save_invstd, residual, z, true);
  }
  /// The same without the ReLU: y = bn(x), bit-identical to the y batch_norm_forward_train wrote.
  static void batch_norm_apply(ctx_t&, const bn_desc& d, const T* x, const T* gamma, const T* beta, const T* save_mean,
                               const T* save_invstd, T* y) {
    bn_apply_saved(d, x, gamma, beta, save_mean, save_invstd, nullptr, y, false);
  }
  static void bn_apply_saved(const bn_desc& d, const T* x, const T* gamma, const T* beta, const T* save_mean,
                             const T* save_invstd, const T* residual, T* z, bool relu) {
    const index hw = static_cast<index>(d.hw), cs = static_cast<index>(d.c) * hw;
#pragma omp parallel for schedule(static) if (static_cast<double>(d.c) * d.n * hw > 3e4)
    for (int c = 0; c < d.c; ++c) {
      const T a = bn_scale(gamma[c], save_invstd[c]);
      const T bb = bn_shift(beta[c], save_mean[c], gamma[c], save_invstd[c]);
      detail::channel_affine<T>(x + c * hw, z + c * hw, d.n, cs, hw, a, bb, relu);
      if (residual)
        for (int i = 0; i < d.n; ++i) {
          T* q = z + c * hw + i * cs;
          const T* r = residual + c * hw + i * cs;
          for (index k = 0; k < hw; ++k) q[k] += r[k];
        }
    }
  }
  /// The normalization coefficients of a train-mode forward, from the saved (rounded) statistics.
  static T bn_scale(T gamma, T invstd) { return static_cast<T>(static_cast<double>(gamma) * invstd); }
  static T bn_shift(T beta, T mean, T gamma, T invstd) {
    return static_cast<T>(beta - static_cast<double>(mean) * gamma * invstd);
  }

  static void bn_train(const bn_desc& d, const T* x, const T* gamma, const T* beta, T* running_mean, T* running_var,
                       T* save_mean, T* save_invstd, T* y, bool relu) {
    const index hw = static_cast<index>(d.hw), cs = static_cast<index>(d.c) * hw;
    const double count = static_cast<double>(d.n) * static_cast<double>(hw);
#pragma omp parallel for schedule(static) if (static_cast<double>(d.c) * count > 3e4)
    for (int c = 0; c < d.c; ++c) {
      double mean = 0, m2 = 0;
      detail::channel_moments<T>(x + c * hw, d.n, cs, hw, mean, m2);
      const double var = m2 / count;
      const double invstd = 1.0 / std::sqrt(var + d.eps);
      save_mean[c] = static_cast<T>(mean);
      save_invstd[c] = static_cast<T>(invstd);
      const double unbiased = count > 1 ? m2 / (count - 1) : var;
      running_mean[c] = static_cast<T>((1 - d.momentum) * running_mean[c] + d.momentum * mean);
      running_var[c] = static_cast<T>((1 - d.momentum) * running_var[c] + d.momentum * unbiased);
      // From the saved (rounded) statistics, so batch_norm_relu_apply reproduces y exactly.
      const T a = bn_scale(gamma[c], save_invstd[c]);
      const T bb = bn_shift(beta[c], save_mean[c], gamma[c], save_invstd[c]);
      detail::channel_affine<T>(x + c * hw, y + c * hw, d.n, cs, hw, a, bb, relu);
    }
  }
  static void bn_eval(const bn_desc& d, const T* x, const T* gamma, const T* beta, const T* running_mean,
                      const T* running_var, T* y, bool relu) {
    const index hw = static_cast<index>(d.hw), cs = static_cast<index>(d.c) * hw;
#pragma omp parallel for schedule(static) if (static_cast<double>(d.c) * d.n * hw > 3e4)
    for (int c = 0; c < d.c; ++c) {
      const double invstd = 1.0 / std::sqrt(static_cast<double>(running_var[c]) + d.eps);
      const T a = static_cast<T>(gamma[c] * invstd);
      const T bb = static_cast<T>(beta[c] - running_mean[c] * gamma[c] * invstd);
      detail::channel_affine<T>(x + c * hw, y + c * hw, d.n, cs, hw, a, bb, relu);
    }
  }
  /// beta given (train mode, z null): the ReLU's mask recomputed from x, see
  /// batch_norm_relu_backward_from_input.
  static void bn_backward(const bn_desc& d, bool train, const T* x, const T* gy, const T* z, const T* gamma,
                          const T* mean, const T* invstd, T* gx, T* ggamma, T* gbeta, const T* beta = nullptr) {
    const index hw = static_cast<index>(d.hw), cs = static_cast<index>(d.c) * hw;
    const double count = static_cast<double>(d.n) * static_cast<double>(hw);
#pragma omp parallel for schedule(static) if (static_cast<double>(d.c) * count > 3e4)
    for (int c = 0; c < d.c; ++c) {
      const double is = invstd[c];
      double sg = 0, sgx = 0;  // Σ g, Σ g·(x - mean)
      T coef[2] = {};  // the forward's a, b when the mask is recomputed from x
      if (beta) {
        coef[0] = bn_scale(gamma[c], invstd[c]);
        coef[1] = bn_shift(beta[c], mean[c], gamma[c], invstd[c]);
      }
      const T* cf = beta ? coef : nullptr;
      detail::channel_backward_sums<T>(x + c * hw, gy + c * hw, z ? z + c * hw : nullptr, d.n, cs, hw, mean[c], sg, sgx,
                                       cf);
      ggamma[c] += static_cast<T>(sgx * is);
      gbeta[c] += static_cast<T>(sg);
      if (!gx) continue;
      const double k = gamma[c] * is;
      const double mg = train ? sg / count : 0.0, c2 = train ? is * is * sgx / count : 0.0;
      detail::channel_backward_apply<T>(x + c * hw, gy + c * hw, z ? z + c * hw : nullptr, gx + c * hw, d.n, cs, hw,
                                        mean[c], static_cast<T>(k), static_cast<T>(mg), static_cast<T>(c2), cf);
    }
  }
  static void batch_norm_eval_invstd(ctx_t&, int c, double eps, const T* running_var, T* invstd) {
    for (int i = 0; i < c; ++i) invstd[i] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(running_var[i]) + eps));
  }

  // ---------------------------------------------------------------- activations
  static void relu_forward(ctx_t&, const T* x, T* y, std::size_t n) {
#pragma omp parallel for schedule(static) if (n > (1u << 16))
    for (index i = 0; i < static_cast<index>(n); ++i) y[i] = x[i] > T(0) ? x[i] : T(0);
  }
  /// gx = gy * (y > 0); y is the forward output.
  static void relu_backward(ctx_t&, const T* y, const T* gy, T* gx, std::size_t n) {
#pragma omp parallel for schedule(static) if (n > (1u << 16))
    for (index i = 0; i < static_cast<index>(n); ++i) gx[i] = y[i] > T(0) ? gy[i] : T(0);
  }
  static void sigmoid_forward(ctx_t&, const T* x, T* y, std::size_t n) {
#pragma omp parallel for schedule(static) if (n >= (1u << 13))  // exp-bound: splits early
    for (index i = 0; i < static_cast<index>(n); ++i) y[i] = sigmoid(x[i]);
  }
  /// gx = gy * y * (1 - y); y is the forward output.
  static void sigmoid_backward(ctx_t&, const T* y, const T* gy, T* gx, std::size_t n) {
#pragma omp parallel for schedule(static) if (n > (1u << 16))
    for (index i = 0; i < static_cast<index>(n); ++i) gx[i] = gy[i] * y[i] * (T(1) - y[i]);
  }

  // ---------------------------------------------------------------- pooling / resampling
  /// 2×2 max pool, stride 2: x (n·c, h, w) -> y (n·c, h/2, w/2) (floor, as PyTorch).
  static void maxpool2x2_forward(ctx_t&, std::size_t planes, int h, int w, const T* x, T* y) {
    const index oh = h / 2, ow = w / 2;
#pragma omp parallel for schedule(static) if (planes * static_cast<std::size_t>(h) * w > (1u << 14))
    for (index p = 0; p < static_cast<index>(planes); ++p) detail::maxpool2x2_plane<T>(x + p * h * w, h, w, y + p * oh * ow);
  }
  /// Routes gy to the first maximum of each window (PyTorch's tie rule); overwrites gx.
  static void maxpool2x2_backward(ctx_t&, std::size_t planes, int h, int w, const T* x, const T* gy, T* gx) {
    const index oh = h / 2, ow = w / 2;
#pragma omp parallel for schedule(static) if (planes * static_cast<std::size_t>(h) * w > (1u << 14))
    for (index p = 0; p < static_cast<index>(planes); ++p)
      detail::maxpool2x2_backward_plane<T>(x + p * h * w, gy + p * oh * ow, h, w, gx + p * h * w);
  }
  /// Nearest-neighbour ×2 upsampling: x (planes, h, w) -> y (planes, 2h, 2w).
  static void upsample2x_forward(ctx_t&, std::size_t planes, int h, int w, const T* x, T* y) {
#pragma omp parallel for schedule(static) if (planes * static_cast<std::size_t>(h) * w > (1u << 12))
    for (index p = 0; p < static_cast<index>(planes); ++p) detail::upsample2x_plane<T>(x + p * h * w, h, w, y + p * 4 * h * w);
  }
  static void upsample2x_backward(ctx_t&, std::size_t planes, int h, int w, const T* gy, T* gx) {
#pragma omp parallel for schedule(static)
    for (index p = 0; p < static_cast<index>(planes); ++p) {
      const T* g = gy + p * 4 * h * w;
      T* d = gx + p * h * w;
      for (int i = 0; i < h; ++i)
        for (int j = 0; j < w; ++j) {
          const T* s = g + static_cast<index>(2 * i) * 2 * w + 2 * j;
          d[static_cast<index>(i) * w + j] = s[0] + s[1] + s[2 * w] + s[2 * w + 1];
        }
    }
  }
  /// Zero-pad each plane of x (planes, h, w) into y (planes, H, W) at (top, left).
  static void pad2d(ctx_t&, std::size_t planes, int h, int w, int H, int W, int top, int left, const T* x, T* y) {
#pragma omp parallel for schedule(static)
    for (index p = 0; p < static_cast<index>(planes); ++p) {
      T* yp = y + p * H * W;
      std::fill(yp, yp + static_cast<index>(H) * W, T(0));
      for (int i = 0; i < h; ++i)
        std::memcpy(yp + static_cast<index>(i + top) * W + left, x + (p * h + i) * w, static_cast<std::size_t>(w) * sizeof(T));
    }
  }
  /// Crop y (planes, H, W) at (top, left) to x (planes, h, w): the inverse of pad2d.
  static void crop2d(ctx_t&, std::size_t planes, int H, int W, int h, int w, int top, int left, const T* y, T* x) {
#pragma omp parallel for schedule(static)
    for (index p = 0; p < static_cast<index>(planes); ++p)
      for (int i = 0; i < h; ++i)
        std::memcpy(x + (p * h + i) * w, y + p * H * W + static_cast<index>(i + top) * W + left,
                    static_cast<std::size_t>(w) * sizeof(T));
  }

  // ---------------------------------------------------------------- elementwise / channels
  static void add(ctx_t&, const T* a, const T* b, T* y, std::size_t n) {
#pragma omp parallel for schedule(static) if (n > (1u << 16))
    for (index i = 0; i < static_cast<index>(n); ++i) y[i] = a[i] + b[i];
  }
  /// y += x
  static void accumulate(ctx_t&, T* y, const T* x, std::size_t n) {
#pragma omp parallel for schedule(static) if (n > (1u << 16))
    for (index i = 0; i < static_cast<index>(n); ++i) y[i] += x[i];
  }
  static void scale(ctx_t&, T* y, T s, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) y[i] *= s;
  }
  /// y (n, ca+cb, hw) = concat(a (n, ca, hw), b (n, cb, hw)) along channels. A null a or b
  /// leaves its part of y as it was (the concatenation built one input at a time).
  static void concat_channels(ctx_t&, int n, int ca, int cb, std::size_t hw, const T* a, const T* b, T* y) {
    const std::size_t sa = ca * hw, sb = cb * hw;
    detail::copy_strided_pair<T>(n, a ? sa : 0, a, sa, y, sa + sb, b ? sb : 0, b, sb, y + sa, sa + sb);
  }
  /// The backward of concat: split gy into ga and gb (either may be null).
  static void split_channels(ctx_t&, int n, int ca, int cb, std::size_t hw, const T* gy, T* ga, T* gb) {
    const std::size_t sa = ca * hw, sb = cb * hw;
    detail::copy_strided_pair<T>(n, ga ? sa : 0, gy, sa + sb, ga, sa, gb ? sb : 0, gy + sa, sa + sb, gb, sb);
  }
  /// Gating: y (n, c, hw) = x * psi (n, 1, hw), psi broadcast over channels.
  static void gate_forward(ctx_t&, int n, int c, std::size_t hw, const T* x, const T* psi, T* y) {
#pragma omp parallel for schedule(static)
    for (index nc = 0; nc < static_cast<index>(n) * c; ++nc) {
      const T* p = psi + (nc / c) * static_cast<index>(hw);
      const T* xs = x + nc * static_cast<index>(hw);
      T* ys = y + nc * static_cast<index>(hw);
      for (std::size_t i = 0; i < hw; ++i) ys[i] = xs[i] * p[i];
    }
  }
  /// gx = gy * psi (overwrites); gpsi = sum_c gy * x (overwrites).
  static void gate_backward(ctx_t&, int n, int c, std::size_t hw, const T* x, const T* psi, const T* gy, T* gx,
                            T* gpsi) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; ++i) {
      const T* p = psi + i * hw;
      T* gp = gpsi + i * hw;
      std::fill(gp, gp + hw, T(0));
      for (int ch = 0; ch < c; ++ch) {
        const std::size_t o = (static_cast<std::size_t>(i) * c + ch) * hw;
        for (std::size_t j = 0; j < hw; ++j) {
          gx[o + j] = gy[o + j] * p[j];
          gp[j] += gy[o + j] * x[o + j];
        }
      }
    }
  }
  static double sum(ctx_t&, const T* x, std::size_t n) {
    double s = 0;
    for (std::size_t i = 0; i < n; ++i) s += x[i];
    return s;
  }
  static double dot(ctx_t&, const T* a, const T* b, std::size_t n) {
    double s = 0;
    for (std::size_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
    return s;
  }

  // ---------------------------------------------------------------- losses
  // Each returns the loss value; when grad is non-null it ADDS weight * dLoss/dlogits to grad.

  /// Mean binary cross-entropy on logits (stable form), optional pos_weight (PyTorch semantics).
  static double bce_with_logits(ctx_t&, const T* x, const T* t, std::size_t n, double pos_weight, T* grad,
                                double weight) {
    double s = 0;
    const double inv = 1.0 / static_cast<double>(n);
#pragma omp parallel for schedule(static) reduction(+ : s) if (n > (1u << 16))
    for (index i = 0; i < static_cast<index>(n); ++i) {
      const double xi = x[i], yi = t[i];
      const double lw = 1.0 + (pos_weight - 1.0) * yi;
      const double sp = std::log1p(std::exp(-std::abs(xi))) + std::max(-xi, 0.0);  // softplus(-x)
      s += (1.0 - yi) * xi + lw * sp;
      if (grad) {
        const double sig_neg = 1.0 / (1.0 + std::exp(xi));  // sigmoid(-x)
        grad[i] += static_cast<T>(weight * inv * ((1.0 - yi) - lw * sig_neg));
      }
    }
    return s * inv;
  }
  /// Soft Dice on sigmoid(logits) over the whole batch: 1 - (2·Σpy + s)/(Σp + Σy + s).
  static double dice_binary(ctx_t&, const T* x, const T* t, std::size_t n, double smooth, T* grad, double weight) {
    double I = 0, Sp = 0, St = 0;
#pragma omp parallel for schedule(static) reduction(+ : I, Sp, St) if (n > (1u << 16))
    for (index i = 0; i < static_cast<index>(n); ++i) {
      const double p = sigmoid(static_cast<double>(x[i]));
      I += p * t[i];
      Sp += p;
      St += t[i];
    }
    const double num = 2 * I + smooth, den = Sp + St + smooth;
    if (grad) {
#pragma omp parallel for schedule(static) if (n > (1u << 16))
      for (index i = 0; i < static_cast<index>(n); ++i) {
        const double p = sigmoid(static_cast<double>(x[i]));
        const double dp = -(2.0 * t[i] * den - num) / (den * den);
        grad[i] += static_cast<T>(weight * dp * p * (1 - p));
      }
    }
    return 1.0 - num / den;
  }
  /// Multi-class soft Dice on softmax(logits) (n, c, hw) against class indices t (n, 1, hw):
  /// 1 - mean over classes of (2·Σ p_c y_c + s)/(Σ p_c + Σ y_c + s), sums over the batch.
  static double dice_multiclass(ctx_t& ctx, int n, int c, std::size_t hw, const T* x, const T* t, double smooth,
                                T* grad, double weight) {
    const std::size_t total = static_cast<std::size_t>(n) * c * hw;
    T* p = ctx.workspace(total);
    softmax_channels(n, c, hw, x, p);
    std::vector<double> I(c, 0), S(c, 0);
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < c; ++k) {
        const T* pk = p + (static_cast<std::size_t>(i) * c + k) * hw;
        const T* ti = t + static_cast<std::size_t>(i) * hw;
        for (std::size_t j = 0; j < hw; ++j) {
          const double y = (static_cast<int>(ti[j]) == k) ? 1.0 : 0.0;
          I[k] += pk[j] * y;
          S[k] += pk[j] + y;
        }
      }
    double dsum = 0;
    for (int k = 0; k < c; ++k) dsum += (2 * I[k] + smooth) / (S[k] + smooth);
    if (grad) {
      std::vector<double> a(c);
      for (int i = 0; i < n; ++i)
        for (std::size_t j = 0; j < hw; ++j) {
          const int cls = static_cast<int>(t[static_cast<std::size_t>(i) * hw + j]);
          double pa = 0;
          for (int k = 0; k < c; ++k) {
            const double y = cls == k ? 1.0 : 0.0;
            const double den = S[k] + smooth;
            a[k] = -(1.0 / c) * (2.0 * y * den - (2 * I[k] + smooth)) / (den * den);
            pa += p[(static_cast<std::size_t>(i) * c + k) * hw + j] * a[k];
          }
          for (int k = 0; k < c; ++k) {
            const std::size_t o = (static_cast<std::size_t>(i) * c + k) * hw + j;
            grad[o] += static_cast<T>(weight * p[o] * (a[k] - pa));
          }
        }
    }
    return 1.0 - dsum / c;
  }
  /// Mean softmax cross-entropy over pixels; t holds class indices (n, 1, hw).
  static double cross_entropy(ctx_t&, int n, int c, std::size_t hw, const T* x, const T* t, T* grad, double weight) {
    double s = 0;
    const double inv = 1.0 / (static_cast<double>(n) * static_cast<double>(hw));
    for (int i = 0; i < n; ++i)
      for (std::size_t j = 0; j < hw; ++j) {
        const T* xi = x + static_cast<std::size_t>(i) * c * hw + j;
        double m = xi[0];
        for (int k = 1; k < c; ++k) m = std::max(m, static_cast<double>(xi[k * hw]));
        double z = 0;
        for (int k = 0; k < c; ++k) z += std::exp(xi[k * hw] - m);
        const int cls = static_cast<int>(t[static_cast<std::size_t>(i) * hw + j]);
        s += -(xi[static_cast<std::size_t>(cls) * hw] - m - std::log(z));
        if (grad)
          for (int k = 0; k < c; ++k) {
            const double pk = std::exp(xi[k * hw] - m) / z;
            grad[static_cast<std::size_t>(i) * c * hw + k * hw + j] +=
                static_cast<T>(weight * inv * (pk - (k == cls ? 1.0 : 0.0)));
          }
      }
    return s * inv;
  }
  /// Largest class index present in t (for validating targets), or -1 when a value is not an
  /// integer in [0, classes).
  static bool class_indices_valid(ctx_t&, const T* t, std::size_t n, int classes) {
    for (std::size_t i = 0; i < n; ++i) {
      const T v = t[i];
      if (!(v >= 0) || v >= classes || v != std::floor(v)) return false;
    }
    return true;
  }

  // ---------------------------------------------------------------- optimizers (one flat buffer)
  /// PyTorch SGD: g += wd·p; buf = first ? g : μ·buf + (1-dampening)·g; g = nesterov ? g + μ·buf : buf.
  static void sgd_step(ctx_t&, T* p, const T* g, T* buf, std::size_t n, double lr, double momentum, double dampening,
                       double wd, bool nesterov, bool first) {
#pragma omp parallel for schedule(static) if (n > (1u << 16))
    for (index i = 0; i < static_cast<index>(n); ++i) {
      double gi = static_cast<double>(g[i]) + wd * p[i];
      if (momentum != 0) {
        const double b = first ? gi : momentum * buf[i] + (1 - dampening) * gi;
        buf[i] = static_cast<T>(b);
        gi = nesterov ? gi + momentum * b : b;
      }
      p[i] = static_cast<T>(p[i] - lr * gi);
    }
  }
  /// PyTorch Adam (decoupled = false, L2 added to the gradient) or AdamW (decoupled = true). The
  /// arithmetic is in double, rounded to T once per stored value.
  static void adam_step(ctx_t&, T* p, const T* g, T* m, T* v, std::size_t n, double lr, double beta1, double beta2,
                        double eps, double wd, bool decoupled, long step) {
    const double bc1 = 1 - std::pow(beta1, static_cast<double>(step));
    const double bc2 = 1 - std::pow(beta2, static_cast<double>(step));
    const double step_size = lr / bc1;
    const double sqrt_bc2 = std::sqrt(bc2);
    const double decay = 1 - lr * wd;
    // One update of D values at once: D = 1 is the scalar loop, D = 8 a vector of doubles (the
    // scalar std::sqrt keeps errno semantics and does not vectorize, so the vector square root
    // is spelled out).
    auto update = [&](auto pi, auto gi, auto mi, auto vi, auto sqrt_fn) {
      if (decoupled)
        pi *= decay;
      else
        gi += wd * pi;
      mi = beta1 * mi + (1 - beta1) * gi;
      vi = beta2 * vi + (1 - beta2) * gi * gi;
      pi -= step_size * mi / (sqrt_fn(vi) / sqrt_bc2 + eps);
      return std::array{pi, mi, vi};
    };
    typedef double d8 __attribute__((vector_size(64)));
    typedef T t8 __attribute__((vector_size(8 * sizeof(T))));
    auto vsqrt = [](d8 a) {
#if defined(__AVX512F__)
      return static_cast<d8>(_mm512_sqrt_pd(static_cast<__m512d>(a)));
#else
      for (int j = 0; j < 8; ++j) a[j] = std::sqrt(a[j]);
      return a;
#endif
    };
    auto ld = [](const T* s) {
      t8 x;
      std::memcpy(&x, s, sizeof x);
      return __builtin_convertvector(x, d8);
    };
    auto st = [](T* d, d8 x) {
      const t8 y = __builtin_convertvector(x, t8);
      std::memcpy(d, &y, sizeof y);
    };
    const index blocks = static_cast<index>(n / 8);
#pragma omp parallel for schedule(static) if (n > (1u << 16))
    for (index b = 0; b < blocks; ++b) {
      const index i = b * 8;
      const auto r = update(ld(p + i), ld(g + i), ld(m + i), ld(v + i), vsqrt);
      st(p + i, r[0]);
      st(m + i, r[1]);
      st(v + i, r[2]);
    }
    for (index i = blocks * 8; i < static_cast<index>(n); ++i) {
      const auto r = update(static_cast<double>(p[i]), static_cast<double>(g[i]), static_cast<double>(m[i]),
                            static_cast<double>(v[i]), [](double a) { return std::sqrt(a); });
      p[i] = static_cast<T>(r[0]);
      m[i] = static_cast<T>(r[1]);
      v[i] = static_cast<T>(r[2]);
    }
  }

  // ---------------------------------------------------------------- helpers
  template <class U>
  static U sigmoid(U x) {
    return x >= U(0) ? U(1) / (U(1) + std::exp(-x)) : std::exp(x) / (U(1) + std::exp(x));
  }
  static void softmax_channels(int n, int c, std::size_t hw, const T* x, T* p) {
    for (int i = 0; i < n; ++i)
      for (std::size_t j = 0; j < hw; ++j) {
        const std::size_t o = static_cast<std::size_t>(i) * c * hw + j;
        double m = x[o];
        for (int k = 1; k < c; ++k) m = std::max(m, static_cast<double>(x[o + k * hw]));
        double z = 0;
        for (int k = 0; k < c; ++k) z += std::exp(x[o + k * hw] - m);
        for (int k = 0; k < c; ++k) p[o + k * hw] = static_cast<T>(std::exp(x[o + k * hw] - m) / z);
      }
  }
};

}  // namespace useg
