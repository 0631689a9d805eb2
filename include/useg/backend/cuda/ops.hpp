// useg/backend/cuda/ops.hpp — ops<cuda>: the same static functions, with the same signatures and
// conventions, as ops<cpu_backend<T>> (see useg/backend/cpu/ops.hpp), over device pointers.
//
//   - memory: the caching pool; fill/copy/upload/download run on the legacy default stream,
//     with which every context's stream is ordered; upload and download return when the data
//     has arrived;
//   - convolutions (and the 2×2 transposed convolution, as cuDNN's backward-data) through cuDNN,
//     with the algorithm chosen once per shape (context<cuda>::conv_plan);
//   - everything else through useg's kernels (kernels.cuh), and cuBLAS for axpy/scal;
//   - parameter gradients are ACCUMULATED (+=), input gradients overwritten, as on the CPU;
//   - functions that return a host value (losses, sum, dot, class_indices_valid) synchronize
//     the context's stream.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>

#include "useg/backend/cuda/check.hpp"
#include "useg/backend/cuda/context.hpp"
#include "useg/backend/cuda/kernels.cuh"
#include "useg/backend/cuda/memory.hpp"
#include "useg/core/descriptors.hpp"

namespace useg {

template <>
struct ops<cuda> {
  using T = float;
  using ctx_t = context<cuda>;

  // ---------------------------------------------------------------- memory
  static T* allocate(std::size_t n) { return static_cast<T*>(detail::cuda_pool::instance().allocate(n * sizeof(T))); }
  static void deallocate(T* p, std::size_t) noexcept { detail::cuda_pool::instance().deallocate(p); }
  static void fill(T* p, std::size_t n, T v) {
    if (!n) return;
    if (v == T(0)) {
      USEG_CUDA_CHECK(cudaMemsetAsync(p, 0, n * sizeof(T), cudaStreamLegacy));
    } else {
      cuda_kernels::fill<T><<<grid(n), cuda_kernels::threads, 0, cudaStreamLegacy>>>(p, n, v);
      USEG_CUDA_CHECK_LAUNCH("fill");
    }
  }
  /// Device-to-device copy.
  static void copy(T* dst, const T* src, std::size_t n) {
    if (!n || dst == src) return;
    USEG_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToDevice, cudaStreamLegacy));
  }
  /// Host-to-device copy; returns when the data is on the device (the host buffer may be reused).
  static void upload(T* dst, const T* host, std::size_t n) {
    if (!n) return;
    USEG_CUDA_CHECK(cudaMemcpyAsync(dst, host, n * sizeof(T), cudaMemcpyHostToDevice, cudaStreamLegacy));
    USEG_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
  }
  /// Device-to-host copy; waits for the work that produces src.
  static void download(T* host, const T* src, std::size_t n) {
    if (!n) return;
    USEG_CUDA_CHECK(cudaMemcpyAsync(host, src, n * sizeof(T), cudaMemcpyDeviceToHost, cudaStreamLegacy));
    USEG_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
  }

  // ---------------------------------------------------------------- convolution (cuDNN)
  /// y = conv(x, w) + b (b may be null).
  static void conv2d_forward(ctx_t& ctx, const conv_desc& d, const T* x, const T* wt, const T* b, T* y) {
    auto& p = ctx.conv_plan(conv_key(d));
    run_forward(ctx, p, x, wt, y);
    if (b) add_bias(ctx, y, b, d.n, d.cout, d.hw());
  }
  /// gx = conv^T(gy, w) (overwrites gx).
  static void conv2d_backward_data(ctx_t& ctx, const conv_desc& d, const T* wt, const T* gy, T* gx) {
    run_backward_data(ctx, ctx.conv_plan(conv_key(d)), wt, gy, gx);
  }
  /// gw += dL/dw, gb += dL/db (gb may be null).
  static void conv2d_backward_weights(ctx_t& ctx, const conv_desc& d, const T* x, const T* gy, T* gw, T* gb) {
    run_backward_filter(ctx, ctx.conv_plan(conv_key(d)), x, gy, gw);
    if (gb) bias_grad(ctx, gy, d.n, d.cout, d.hw(), gb);
  }

  // ---------------------------------------------------------------- transposed conv 2×2 s2 (cuDNN)
  // ConvTranspose2d(k=2, s=2) is the adjoint of the stride-2 convolution with the same weight
  // (cin, cout, 2, 2) read as a cuDNN filter (K = cin, C = cout): its forward is cuDNN's
  // backward-data, its input gradient cuDNN's forward, its weight gradient cuDNN's
  // backward-filter with the roles of input and output gradient exchanged.
  static void upconv2x2_forward(ctx_t& ctx, const upconv_desc& d, const T* x, const T* wt, const T* b, T* y) {
    auto& p = ctx.conv_plan(upconv_key(d));
    run_backward_data(ctx, p, wt, x, y);
    if (b) add_bias(ctx, y, b, d.n, d.cout, 4 * d.hw());
  }
  static void upconv2x2_backward_data(ctx_t& ctx, const upconv_desc& d, const T* wt, const T* gy, T* gx) {
    run_forward(ctx, ctx.conv_plan(upconv_key(d)), gy, wt, gx);
  }
  static void upconv2x2_backward_weights(ctx_t& ctx, const upconv_desc& d, const T* x, const T* gy, T* gw, T* gb) {
    run_backward_filter(ctx, ctx.conv_plan(upconv_key(d)), gy, x, gw);
    if (gb) bias_grad(ctx, gy, d.n, d.cout, 4 * d.hw(), gb);
  }

  // ---------------------------------------------------------------- batch norm
  /// Train mode: batch statistics (saved for backward), running statistics updated with momentum
  /// and the unbiased variance, as PyTorch does.
  static void batch_norm_forward_train(ctx_t& ctx, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                                       T* running_mean, T* running_var, T* save_mean, T* save_invstd, T* y) {
    bn_train(ctx, d, x, gamma, beta, running_mean, running_var, save_mean, save_invstd, y, false);
  }
  /// Eval mode: normalize with the running statistics.
  static void batch_norm_forward_eval(ctx_t& ctx, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                                      const T* running_mean, const T* running_var, T* y) {
    bn_eval(ctx, d, x, gamma, beta, running_mean, running_var, y, false);
  }
  /// Backward of either mode (see the CPU backend): gx overwritten (skipped when null); ggamma,
  /// gbeta accumulated.
  static void batch_norm_backward(ctx_t& ctx, const bn_desc& d, bool train, const T* x, const T* gy, const T* gamma,
                                  const T* mean, const T* invstd, T* gx, T* ggamma, T* gbeta) {
    bn_backward(ctx, d, train, x, gy, nullptr, gamma, mean, invstd, gx, ggamma, gbeta);
  }
  static void batch_norm_eval_invstd(ctx_t& ctx, int c, double eps, const T* running_var, T* invstd) {
    if (c <= 0) return;
    cuda_kernels::bn_eval_invstd<T><<<per_channel_grid(c), 128, 0, ctx.stream()>>>(c, eps, running_var, invstd);
    USEG_CUDA_CHECK_LAUNCH("bn_eval_invstd");
  }

  // ---------------------------------------------------------------- batch norm + ReLU (fused)
  // The blocks' conv + BN + ReLU unit uses these when the backend has them (both built-in
  // backends do). z = relu(bn(x)) is written in the same pass as the normalization, and the
  // backward reads the ReLU's mask from z inside the batch-norm reductions, so the
  // pre-activation tensor is never stored. gx may alias x, z or gz (every element is read, then
  // written, by the same thread).
  static void batch_norm_relu_forward_train(ctx_t& ctx, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                                            T* running_mean, T* running_var, T* save_mean, T* save_invstd, T* z) {
    bn_train(ctx, d, x, gamma, beta, running_mean, running_var, save_mean, save_invstd, z, true);
  }
  static void batch_norm_relu_forward_eval(ctx_t& ctx, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                                           const T* running_mean, const T* running_var, T* z) {
    bn_eval(ctx, d, x, gamma, beta, running_mean, running_var, z, true);
  }
  /// gz: gradient of z = relu(bn(x)); gx overwritten (skipped when null), ggamma/gbeta accumulated.
  static void batch_norm_relu_backward(ctx_t& ctx, const bn_desc& d, bool train, const T* x, const T* z, const T* gz,
                                       const T* gamma, const T* mean, const T* invstd, T* gx, T* ggamma, T* gbeta) {
    bn_backward(ctx, d, train, x, gz, z, gamma, mean, invstd, gx, ggamma, gbeta);
  }
  /// Re-apply a train-mode batch norm + ReLU with its saved statistics: z = relu(bn(x)) (+ residual
  /// when non-null), bit-identical to what batch_norm_relu_forward_train wrote (same coefficient
  /// formula, same kernel), so a block may drop z and recompute it for the backward.
  static void batch_norm_relu_apply(ctx_t& ctx, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                                    const T* save_mean, const T* save_invstd, const T* residual, T* z) {
    bn_apply(ctx, d, x, saved_coefficients(ctx, d, gamma, beta, save_mean, save_invstd), residual, z, true);
  }
  /// The same without the ReLU: y = bn(x), bit-identical to the y batch_norm_forward_train wrote.
  static void batch_norm_apply(ctx_t& ctx, const bn_desc& d, const T* x, const T* gamma, const T* beta,
                               const T* save_mean, const T* save_invstd, T* y) {
    bn_apply(ctx, d, x, saved_coefficients(ctx, d, gamma, beta, save_mean, save_invstd), nullptr, y, false);
  }
  /// The train-mode forward's per-channel (scale, shift), from the saved statistics.
  static const T* saved_coefficients(ctx_t& ctx, const bn_desc& d, const T* gamma, const T* beta, const T* save_mean,
                                     const T* save_invstd) {
    T* coef = ctx.scratch<T>(1, 2 * static_cast<std::size_t>(d.c));
    cuda_kernels::bn_saved_coefficients<T><<<per_channel_grid(d.c), 128, 0, ctx.stream()>>>(d.c, gamma, beta, save_mean,
                                                                                           save_invstd, coef);
    USEG_CUDA_CHECK_LAUNCH("bn_saved_coefficients");
    return coef;
  }

  // ---------------------------------------------------------------- eval mode: batch norm folded into the convolution
  /// wf = w·s (per output channel; w holds cout rows of per_out values), bf = (b - rmean)·s + beta
  /// (b may be null), s = gamma/sqrt(rvar+eps): bn(conv_{w,b}(x)) = conv_{wf,bf}(x).
  static void fold_batch_norm(ctx_t& ctx, int cout, std::size_t per_out, const T* w, const T* b, const T* gamma, const T* beta,
                              const T* running_mean, const T* running_var, double eps, T* wf, T* bf) {
    const std::size_t n = static_cast<std::size_t>(cout) * per_out;
    if (!n) return;
    cuda_kernels::fold_batch_norm<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(
        cout, per_out, w, b, gamma, beta, running_mean, running_var, eps, wf, bf);
    USEG_CUDA_CHECK_LAUNCH("fold_batch_norm");
  }
  /// y = relu(conv(x, w) + b): cuDNN convolution, then bias and ReLU in one pass.
  static void conv2d_forward_relu(ctx_t& ctx, const conv_desc& d, const T* x, const T* wt, const T* b, T* y) {
    run_forward(ctx, ctx.conv_plan(conv_key(d)), x, wt, y);
    const std::size_t total = static_cast<std::size_t>(d.n) * d.cout * d.hw();
    if (!total) return;
    if (b) {
      cuda_kernels::bias_relu<T><<<grid(ctx, total), cuda_kernels::threads, 0, ctx.stream()>>>(y, b, d.cout, d.hw(), total);
      USEG_CUDA_CHECK_LAUNCH("bias_relu");
    } else {
      relu_forward(ctx, y, y, total);
    }
  }

  // ---------------------------------------------------------------- activations
  static void relu_forward(ctx_t& ctx, const T* x, T* y, std::size_t n) {
    if (!n) return;
    cuda_kernels::relu_forward<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(x, y, n);
    USEG_CUDA_CHECK_LAUNCH("relu_forward");
  }
  /// gx = gy * (y > 0); y is the forward output.
  static void relu_backward(ctx_t& ctx, const T* y, const T* gy, T* gx, std::size_t n) {
    if (!n) return;
    cuda_kernels::relu_backward<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(y, gy, gx, n);
    USEG_CUDA_CHECK_LAUNCH("relu_backward");
  }
  static void sigmoid_forward(ctx_t& ctx, const T* x, T* y, std::size_t n) {
    if (!n) return;
    cuda_kernels::sigmoid_forward<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(x, y, n);
    USEG_CUDA_CHECK_LAUNCH("sigmoid_forward");
  }
  /// gx = gy * y * (1 - y); y is the forward output.
  static void sigmoid_backward(ctx_t& ctx, const T* y, const T* gy, T* gx, std::size_t n) {
    if (!n) return;
    cuda_kernels::sigmoid_backward<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(y, gy, gx, n);
    USEG_CUDA_CHECK_LAUNCH("sigmoid_backward");
  }

  // ---------------------------------------------------------------- pooling / resampling
  /// 2×2 max pool, stride 2 (floor; NaN propagates; ties: first maximum).
  static void maxpool2x2_forward(ctx_t& ctx, std::size_t planes, int h, int w, const T* x, T* y) {
    const std::size_t n = planes * static_cast<std::size_t>(h / 2) * static_cast<std::size_t>(w / 2);
    if (!n) return;
    cuda_kernels::maxpool2x2_forward<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(planes, h, w, x, y);
    USEG_CUDA_CHECK_LAUNCH("maxpool2x2_forward");
  }
  /// Routes gy to the first maximum of each window; overwrites gx (zero elsewhere).
  static void maxpool2x2_backward(ctx_t& ctx, std::size_t planes, int h, int w, const T* x, const T* gy, T* gx) {
    const std::size_t n = planes * static_cast<std::size_t>(h) * static_cast<std::size_t>(w);
    if (!n) return;
    cuda_kernels::maxpool2x2_backward<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(planes, h, w, x, gy, gx);
    USEG_CUDA_CHECK_LAUNCH("maxpool2x2_backward");
  }
  static void upsample2x_forward(ctx_t& ctx, std::size_t planes, int h, int w, const T* x, T* y) {
    const std::size_t n = planes * 4 * static_cast<std::size_t>(h) * static_cast<std::size_t>(w);
    if (!n) return;
    cuda_kernels::upsample2x_forward<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(planes, h, w, x, y);
    USEG_CUDA_CHECK_LAUNCH("upsample2x_forward");
  }
  static void upsample2x_backward(ctx_t& ctx, std::size_t planes, int h, int w, const T* gy, T* gx) {
    const std::size_t n = planes * static_cast<std::size_t>(h) * static_cast<std::size_t>(w);
    if (!n) return;
    cuda_kernels::upsample2x_backward<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(planes, h, w, gy, gx);
    USEG_CUDA_CHECK_LAUNCH("upsample2x_backward");
  }
  /// Zero-pad each plane of x (planes, h, w) into y (planes, H, W) at (top, left).
  static void pad2d(ctx_t& ctx, std::size_t planes, int h, int w, int H, int W, int top, int left, const T* x, T* y) {
    const std::size_t n = planes * static_cast<std::size_t>(H) * static_cast<std::size_t>(W);
    if (!n) return;
    cuda_kernels::pad2d<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(planes, h, w, H, W, top, left, x, y);
    USEG_CUDA_CHECK_LAUNCH("pad2d");
  }
  /// Crop y (planes, H, W) at (top, left) to x (planes, h, w): the inverse of pad2d.
  static void crop2d(ctx_t& ctx, std::size_t planes, int H, int W, int h, int w, int top, int left, const T* y, T* x) {
    const std::size_t n = planes * static_cast<std::size_t>(h) * static_cast<std::size_t>(w);
    if (!n) return;
    cuda_kernels::crop2d<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(planes, H, W, h, w, top, left, y, x);
    USEG_CUDA_CHECK_LAUNCH("crop2d");
  }

  // ---------------------------------------------------------------- elementwise / channels
  static void add(ctx_t& ctx, const T* a, const T* b, T* y, std::size_t n) {
    if (!n) return;
    cuda_kernels::add<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(a, b, y, n);
    USEG_CUDA_CHECK_LAUNCH("add");
  }
  /// y += x (cuBLAS axpy with alpha 1: the same single rounding as y + x).
  static void accumulate(ctx_t& ctx, T* y, const T* x, std::size_t n) {
    if (!n) return;
    const float one = 1.f;
    USEG_CUBLAS_CHECK(cublasSaxpy_64(ctx.cublas(), static_cast<std::int64_t>(n), &one, x, 1, y, 1));
  }
  /// y *= s (cuBLAS scal).
  static void scale(ctx_t& ctx, T* y, T s, std::size_t n) {
    if (!n) return;
    USEG_CUBLAS_CHECK(cublasSscal_64(ctx.cublas(), static_cast<std::int64_t>(n), &s, y, 1));
  }
  /// y (n, ca+cb, hw) = concat(a (n, ca, hw), b (n, cb, hw)) along channels: two strided copies.
  /// A null a or b leaves its part of y as it was.
  static void concat_channels(ctx_t& ctx, int n, int ca, int cb, std::size_t hw, const T* a, const T* b, T* y) {
    const std::size_t sa = ca * hw * sizeof(T), sb = cb * hw * sizeof(T);
    if (n <= 0) return;
    if (a && sa)
      USEG_CUDA_CHECK(cudaMemcpy2DAsync(y, sa + sb, a, sa, sa, static_cast<std::size_t>(n), cudaMemcpyDeviceToDevice, ctx.stream()));
    if (b && sb)
      USEG_CUDA_CHECK(cudaMemcpy2DAsync(reinterpret_cast<char*>(y) + sa, sa + sb, b, sb, sb, static_cast<std::size_t>(n),
                                        cudaMemcpyDeviceToDevice, ctx.stream()));
  }
  /// The backward of concat: split gy into ga and gb (either may be null).
  static void split_channels(ctx_t& ctx, int n, int ca, int cb, std::size_t hw, const T* gy, T* ga, T* gb) {
    const std::size_t sa = ca * hw * sizeof(T), sb = cb * hw * sizeof(T);
    if (n <= 0) return;
    if (ga && sa)
      USEG_CUDA_CHECK(cudaMemcpy2DAsync(ga, sa, gy, sa + sb, sa, static_cast<std::size_t>(n), cudaMemcpyDeviceToDevice, ctx.stream()));
    if (gb && sb)
      USEG_CUDA_CHECK(cudaMemcpy2DAsync(gb, sb, reinterpret_cast<const char*>(gy) + sa, sa + sb, sb, static_cast<std::size_t>(n),
                                        cudaMemcpyDeviceToDevice, ctx.stream()));
  }
  /// Gating: y (n, c, hw) = x * psi (n, 1, hw), psi broadcast over channels.
  static void gate_forward(ctx_t& ctx, int n, int c, std::size_t hw, const T* x, const T* psi, T* y) {
    const std::size_t total = static_cast<std::size_t>(n) * c * hw;
    if (!total) return;
    cuda_kernels::gate_forward<T><<<grid(ctx, total), cuda_kernels::threads, 0, ctx.stream()>>>(c, hw, x, psi, y, total);
    USEG_CUDA_CHECK_LAUNCH("gate_forward");
  }
  /// gx = gy * psi (overwrites); gpsi = sum_c gy * x (overwrites). One fused kernel.
  static void gate_backward(ctx_t& ctx, int n, int c, std::size_t hw, const T* x, const T* psi, const T* gy, T* gx, T* gpsi) {
    const std::size_t pixels = static_cast<std::size_t>(n) * hw;
    if (!pixels) return;
    cuda_kernels::gate_backward<T><<<grid(ctx, pixels), cuda_kernels::threads, 0, ctx.stream()>>>(c, hw, x, psi, gy, gx, gpsi,
                                                                                                 pixels);
    USEG_CUDA_CHECK_LAUNCH("gate_backward");
  }
  static double sum(ctx_t& ctx, const T* x, std::size_t n) {
    if (!n) return 0;
    return reduce<1>(ctx, cuda_kernels::sum_f<T>{x}, n, "sum")[0];
  }
  static double dot(ctx_t& ctx, const T* a, const T* b, std::size_t n) {
    if (!n) return 0;
    return reduce<1>(ctx, cuda_kernels::dot_f<T>{a, b}, n, "dot")[0];
  }

  // ---------------------------------------------------------------- losses
  // Each returns the loss value; when grad is non-null it ADDS weight * dLoss/dlogits to grad.

  /// Mean binary cross-entropy on logits (stable form), optional pos_weight (PyTorch semantics).
  static double bce_with_logits(ctx_t& ctx, const T* x, const T* t, std::size_t n, double pos_weight, T* grad, double weight) {
    if (!n) return 0;
    const double inv = 1.0 / static_cast<double>(n);
    return reduce<1>(ctx, cuda_kernels::bce_f<T>{x, t, pos_weight, weight, inv, grad}, n, "bce_with_logits")[0] * inv;
  }
  /// Soft Dice on sigmoid(logits) over the whole batch: 1 - (2·Σpy + s)/(Σp + Σy + s).
  static double dice_binary(ctx_t& ctx, const T* x, const T* t, std::size_t n, double smooth, T* grad, double weight) {
    if (!n) return 0;
    const auto s = reduce<3>(ctx, cuda_kernels::dice_binary_f<T>{x, t}, n, "dice_binary");
    const double num = 2 * s[0] + smooth, den = s[1] + s[2] + smooth;
    if (grad) {
      cuda_kernels::dice_binary_grad<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(x, t, n, num, den, weight, grad);
      USEG_CUDA_CHECK_LAUNCH("dice_binary_grad");
    }
    return 1.0 - num / den;
  }
  /// Multi-class soft Dice on softmax(logits) (n, c, hw) against class indices t (n, 1, hw).
  static double dice_multiclass(ctx_t& ctx, int n, int c, std::size_t hw, const T* x, const T* t, double smooth, T* grad,
                                double weight) {
    const std::size_t pixels = static_cast<std::size_t>(n) * hw;
    if (!pixels || c <= 0) return 0;
    T* p = ctx.workspace(pixels * c);
    cuda_kernels::softmax_channels<T><<<grid(ctx, pixels), cuda_kernels::threads, 0, ctx.stream()>>>(c, hw, x, p, pixels);
    USEG_CUDA_CHECK_LAUNCH("softmax_channels");
    const int S = splits(ctx, c, pixels);
    double* part = ctx.scratch<double>(0, static_cast<std::size_t>(c) * S * 2);
    cuda_kernels::channel_partials<2><<<dim3(c, S), cuda_kernels::threads, 0, ctx.stream()>>>(
        cuda_kernels::dice_class_f<T>{p, t, c, hw}, c, static_cast<std::size_t>(n), hw, S, part);
    USEG_CUDA_CHECK_LAUNCH("channel_partials (dice classes)");
    double* sums = ctx.scratch<double>(2, 2 * static_cast<std::size_t>(c));
    cuda_kernels::dice_class_finalize<double><<<per_channel_grid(c), 128, 0, ctx.stream()>>>(c, S, part, sums);
    USEG_CUDA_CHECK_LAUNCH("dice_class_finalize");
    double* h = ctx.host_results(2 * static_cast<std::size_t>(c));
    USEG_CUDA_CHECK(cudaMemcpyAsync(h, sums, 2 * static_cast<std::size_t>(c) * sizeof(double), cudaMemcpyDeviceToHost, ctx.stream()));
    USEG_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));
    double dsum = 0;
    for (int k = 0; k < c; ++k) dsum += (2 * h[2 * k] + smooth) / (h[2 * k + 1] + smooth);
    if (grad) {
      cuda_kernels::dice_multiclass_grad<T><<<grid(ctx, pixels), cuda_kernels::threads, 0, ctx.stream()>>>(c, hw, p, t, sums, smooth,
                                                                                                          weight, grad, pixels);
      USEG_CUDA_CHECK_LAUNCH("dice_multiclass_grad");
    }
    return 1.0 - dsum / c;
  }
  /// Mean softmax cross-entropy over pixels; t holds class indices (n, 1, hw).
  static double cross_entropy(ctx_t& ctx, int n, int c, std::size_t hw, const T* x, const T* t, T* grad, double weight) {
    const std::size_t pixels = static_cast<std::size_t>(n) * hw;
    if (!pixels) return 0;
    const double inv = 1.0 / static_cast<double>(pixels);
    return reduce<1>(ctx, cuda_kernels::cross_entropy_f<T>{x, t, c, hw, weight, inv, grad}, pixels, "cross_entropy")[0] * inv;
  }
  /// True when every value of t is an integer class index in [0, classes).
  static bool class_indices_valid(ctx_t& ctx, const T* t, std::size_t n, int classes) {
    if (!n) return true;
    return reduce<1>(ctx, cuda_kernels::invalid_index_f<T>{t, classes}, n, "class_indices_valid")[0] == 0;
  }

  // ---------------------------------------------------------------- optimizers (one flat buffer)
  /// PyTorch SGD (see the CPU backend); buf is untouched (and may be null) when momentum is 0.
  static void sgd_step(ctx_t& ctx, T* p, const T* g, T* buf, std::size_t n, double lr, double momentum, double dampening,
                       double wd, bool nesterov, bool first) {
    if (!n) return;
    cuda_kernels::sgd_step<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(p, g, buf, n, lr, momentum, dampening, wd,
                                                                                      nesterov, first);
    USEG_CUDA_CHECK_LAUNCH("sgd_step");
  }
  /// PyTorch Adam (decoupled = false) or AdamW (decoupled = true): one fused kernel over the
  /// flat parameter buffer.
  static void adam_step(ctx_t& ctx, T* p, const T* g, T* m, T* v, std::size_t n, double lr, double beta1, double beta2,
                        double eps, double wd, bool decoupled, long step) {
    if (!n) return;
    const double bc1 = 1 - std::pow(beta1, static_cast<double>(step));
    const double bc2 = 1 - std::pow(beta2, static_cast<double>(step));
    cuda_kernels::adam_step<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(p, g, m, v, n, lr, beta1, beta2, eps, wd,
                                                                                       decoupled, lr / bc1, std::sqrt(bc2));
    USEG_CUDA_CHECK_LAUNCH("adam_step");
  }

  // ---------------------------------------------------------------- helpers (internal)
  /// Blocks for a grid-stride kernel over n elements (a few waves of the device at most).
  static unsigned grid(const ctx_t& ctx, std::size_t n) {
    const std::size_t b = (n + cuda_kernels::threads - 1) / cuda_kernels::threads;
    const std::size_t cap = static_cast<std::size_t>(ctx.multiprocessors()) * 16;
    return static_cast<unsigned>(std::max<std::size_t>(1, std::min(b, cap)));
  }
  /// The same without a context (memory functions): at most 4096 blocks.
  static unsigned grid(std::size_t n) {
    const std::size_t b = (n + cuda_kernels::threads - 1) / cuda_kernels::threads;
    return static_cast<unsigned>(std::max<std::size_t>(1, std::min<std::size_t>(b, 4096)));
  }
  static unsigned per_channel_grid(int c) { return static_cast<unsigned>((c + 127) / 128); }
  /// Splits per channel for channel_partials: enough blocks for ~4 waves, each split at least
  /// 1024 values, at most 65535 (the grid's y limit).
  static int splits(const ctx_t& ctx, int c, std::size_t per_channel) {
    const std::size_t want = (static_cast<std::size_t>(ctx.multiprocessors()) * 4 + c - 1) / static_cast<std::size_t>(c);
    const std::size_t most = std::max<std::size_t>(1, per_channel / 1024);
    return static_cast<int>(std::max<std::size_t>(1, std::min({want, most, std::size_t(65535)})));
  }
  /// Whole-array reduction of NV doubles: fixed-order partials per block, then one block; the
  /// result is copied to pinned host memory and the stream synchronized.
  template <int NV, class F>
  static std::array<double, NV> reduce(ctx_t& ctx, F f, std::size_t n, const char* what) {
    const int blocks = static_cast<int>(std::min<std::size_t>(grid(ctx, n), 1024));
    double* part = ctx.scratch<double>(0, static_cast<std::size_t>(blocks) * NV);
    double* out = ctx.scratch<double>(2, NV);
    cuda_kernels::global_partials<NV><<<blocks, cuda_kernels::threads, 0, ctx.stream()>>>(f, n, part);
    USEG_CUDA_CHECK_LAUNCH("global_partials");
    cuda_kernels::global_final<NV><<<1, cuda_kernels::threads, 0, ctx.stream()>>>(part, blocks, out);
    USEG_CUDA_CHECK_LAUNCH("global_final");
    double* h = ctx.host_results(NV);
    USEG_CUDA_CHECK(cudaMemcpyAsync(h, out, NV * sizeof(double), cudaMemcpyDeviceToHost, ctx.stream()));
    const cudaError_t e = cudaStreamSynchronize(ctx.stream());
    if (e != cudaSuccess) detail::check_cuda(e, what, __FILE__, __LINE__);
    std::array<double, NV> r{};
    for (int v = 0; v < NV; ++v) r[static_cast<std::size_t>(v)] = h[v];
    return r;
  }
  /// y (n, c, hw) += b[c]
  static void add_bias(ctx_t& ctx, T* y, const T* b, int n, int c, std::size_t hw) {
    const std::size_t total = static_cast<std::size_t>(n) * c * hw;
    if (!total) return;
    cuda_kernels::bias_add<T><<<grid(ctx, total), cuda_kernels::threads, 0, ctx.stream()>>>(y, b, c, hw, total);
    USEG_CUDA_CHECK_LAUNCH("bias_add");
  }
  /// gb[c] += Σ_{n,hw} gy (n, c, hw)
  static void bias_grad(ctx_t& ctx, const T* gy, int n, int c, std::size_t hw, T* gb) {
    const std::size_t count = static_cast<std::size_t>(n) * hw;
    if (!count || c <= 0) return;
    const int S = splits(ctx, c, count);
    double* part = ctx.scratch<double>(0, static_cast<std::size_t>(c) * S);
    cuda_kernels::channel_partials<1><<<dim3(c, S), cuda_kernels::threads, 0, ctx.stream()>>>(cuda_kernels::channel_sum_f<T>{gy}, c,
                                                                                             static_cast<std::size_t>(n), hw, S, part);
    USEG_CUDA_CHECK_LAUNCH("channel_partials (bias gradient)");
    cuda_kernels::bias_grad_finalize<T><<<per_channel_grid(c), 128, 0, ctx.stream()>>>(c, S, part, gb);
    USEG_CUDA_CHECK_LAUNCH("bias_grad_finalize");
  }
  static void bn_train(ctx_t& ctx, const bn_desc& d, const T* x, const T* gamma, const T* beta, T* running_mean,
                       T* running_var, T* save_mean, T* save_invstd, T* y, bool relu) {
    const std::size_t count = static_cast<std::size_t>(d.n) * d.hw;
    const int S = splits(ctx, d.c, count);
    double* part = ctx.scratch<double>(0, static_cast<std::size_t>(d.c) * S * 2);
    cuda_kernels::channel_partials<2><<<dim3(d.c, S), cuda_kernels::threads, 0, ctx.stream()>>>(
        cuda_kernels::bn_stats_f<T>{x, d.hw}, d.c, static_cast<std::size_t>(d.n), d.hw, S, part);
    USEG_CUDA_CHECK_LAUNCH("channel_partials (batch-norm statistics)");
    T* coef = ctx.scratch<T>(1, 2 * static_cast<std::size_t>(d.c));
    cuda_kernels::bn_train_finalize<T><<<per_channel_grid(d.c), 128, 0, ctx.stream()>>>(
        d.c, S, part, static_cast<double>(count), x, d.hw, gamma, beta, d.eps, d.momentum, running_mean, running_var, save_mean,
        save_invstd, coef);
    USEG_CUDA_CHECK_LAUNCH("bn_train_finalize");
    bn_apply(ctx, d, x, coef, nullptr, y, relu);
  }
  static void bn_eval(ctx_t& ctx, const bn_desc& d, const T* x, const T* gamma, const T* beta, const T* running_mean,
                      const T* running_var, T* y, bool relu) {
    T* coef = ctx.scratch<T>(1, 2 * static_cast<std::size_t>(d.c));
    cuda_kernels::bn_eval_coefficients<T><<<per_channel_grid(d.c), 128, 0, ctx.stream()>>>(d.c, gamma, beta, running_mean,
                                                                                          running_var, d.eps, coef);
    USEG_CUDA_CHECK_LAUNCH("bn_eval_coefficients");
    bn_apply(ctx, d, x, coef, nullptr, y, relu);
  }
  static void bn_apply(ctx_t& ctx, const bn_desc& d, const T* x, const T* coef, const T* residual, T* y, bool relu) {
    const std::size_t n = static_cast<std::size_t>(d.n) * d.c * d.hw;
    if (!n) return;
    if (relu)
      cuda_kernels::bn_apply<T, true><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(d.c, d.hw, x, coef, residual, y, n);
    else
      cuda_kernels::bn_apply<T, false><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(d.c, d.hw, x, coef, residual, y, n);
    USEG_CUDA_CHECK_LAUNCH("bn_apply");
  }
  /// z == nullptr: plain batch norm; otherwise gy is the gradient of z = relu(bn(x)).
  static void bn_backward(ctx_t& ctx, const bn_desc& d, bool train, const T* x, const T* gy, const T* z, const T* gamma,
                          const T* mean, const T* invstd, T* gx, T* ggamma, T* gbeta) {
    const std::size_t count = static_cast<std::size_t>(d.n) * d.hw;
    const int S = splits(ctx, d.c, count);
    double* part = ctx.scratch<double>(0, static_cast<std::size_t>(d.c) * S * 2);
    cuda_kernels::channel_partials<2><<<dim3(d.c, S), cuda_kernels::threads, 0, ctx.stream()>>>(
        cuda_kernels::bn_backward_f<T>{x, gy, z, mean, invstd}, d.c, static_cast<std::size_t>(d.n), d.hw, S, part);
    USEG_CUDA_CHECK_LAUNCH("channel_partials (batch-norm backward)");
    double* coef = ctx.scratch<double>(1, 5 * static_cast<std::size_t>(d.c));
    cuda_kernels::bn_backward_finalize<T><<<per_channel_grid(d.c), 128, 0, ctx.stream()>>>(
        d.c, S, part, static_cast<double>(count), train, gamma, mean, invstd, ggamma, gbeta, coef);
    USEG_CUDA_CHECK_LAUNCH("bn_backward_finalize");
    if (!gx) return;
    const std::size_t n = count * d.c;
    cuda_kernels::bn_backward_apply<T><<<grid(ctx, n), cuda_kernels::threads, 0, ctx.stream()>>>(d.c, d.hw, x, gy, z, coef, gx, n);
    USEG_CUDA_CHECK_LAUNCH("bn_backward_apply");
  }
  static detail::cudnn_conv_key conv_key(const conv_desc& d) { return {d.n, d.cin, d.h, d.w, d.cout, d.k, 1, d.k / 2}; }
  /// The stride-2 convolution whose adjoint is the transposed convolution: input (n, cout, 2h, 2w),
  /// filter (cin, cout, 2, 2), output (n, cin, h, w).
  static detail::cudnn_conv_key upconv_key(const upconv_desc& d) { return {d.n, d.cout, 2 * d.h, 2 * d.w, d.cin, 2, 2, 0}; }
  /// plan.y = conv(plan.x)
  static void run_forward(ctx_t& ctx, detail::cudnn_conv_plan& p, const T* in, const T* wt, T* out) {
    const auto& a = ctx.forward_algo(p);
    const float one = 1.f, zero = 0.f;
    USEG_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv, a.math));
    USEG_CUDNN_CHECK(cudnnConvolutionForward(ctx.cudnn(), &one, p.x, in, p.w, wt, p.conv, a.algo, ctx.workspace_bytes(a.workspace),
                                             a.workspace, &zero, p.y, out));
  }
  /// plan.x-shaped result = conv^T(plan.y-shaped input) (overwrites)
  static void run_backward_data(ctx_t& ctx, detail::cudnn_conv_plan& p, const T* wt, const T* gy, T* gx) {
    const auto& a = ctx.backward_data_algo(p);
    const float one = 1.f, zero = 0.f;
    USEG_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv, a.math));
    USEG_CUDNN_CHECK(cudnnConvolutionBackwardData(ctx.cudnn(), &one, p.w, wt, p.y, gy, p.conv, a.algo,
                                                  ctx.workspace_bytes(a.workspace), a.workspace, &zero, p.x, gx));
  }
  /// gw += dL/dw for input `in` (plan.x) and output gradient gy (plan.y)
  static void run_backward_filter(ctx_t& ctx, detail::cudnn_conv_plan& p, const T* in, const T* gy, T* gw) {
    const auto& a = ctx.backward_filter_algo(p);
    const float one = 1.f;
    USEG_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv, a.math));
    USEG_CUDNN_CHECK(cudnnConvolutionBackwardFilter(ctx.cudnn(), &one, p.x, in, p.y, gy, p.conv, a.algo,
                                                    ctx.workspace_bytes(a.workspace), a.workspace, &one, p.w, gw));
  }
};

}  // namespace useg
