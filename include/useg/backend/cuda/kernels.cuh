// useg/backend/cuda/kernels.cuh — useg's own CUDA kernels (everything but the convolutions).
//
// Kernels are function templates (so that a header included by several translation units
// stays within the one-definition rule) over the element type T (float for useg::cuda).
// Elementwise kernels use grid-stride loops. Every reduction runs in a fixed order — per-thread
// strided partial sums, a shared-memory tree per block, then the blocks' partials summed in
// index order by one thread or block — in double precision, with no atomics: results repeat
// bit for bit from run to run on the same device and launch configuration.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace useg::cuda_kernels {

using std::size_t;

constexpr int threads = 256;

#define USEG_GRID_STRIDE(i, n) \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<size_t>(blockDim.x) * gridDim.x)

template <class U>
__device__ inline U sigmoid(U x) {
  return x >= U(0) ? U(1) / (U(1) + exp(-x)) : exp(x) / (U(1) + exp(x));
}

// ------------------------------------------------------------------------ elementwise
template <class T>
__global__ void fill(T* p, size_t n, T v) {
  USEG_GRID_STRIDE(i, n) p[i] = v;
}
template <class T>
__global__ void relu_forward(const T* x, T* y, size_t n) {
  USEG_GRID_STRIDE(i, n) y[i] = x[i] > T(0) ? x[i] : T(0);
}
template <class T>
__global__ void relu_backward(const T* y, const T* gy, T* gx, size_t n) {
  USEG_GRID_STRIDE(i, n) gx[i] = y[i] > T(0) ? gy[i] : T(0);
}
template <class T>
__global__ void sigmoid_forward(const T* x, T* y, size_t n) {
  USEG_GRID_STRIDE(i, n) y[i] = sigmoid(x[i]);
}
template <class T>
__global__ void sigmoid_backward(const T* y, const T* gy, T* gx, size_t n) {
  USEG_GRID_STRIDE(i, n) gx[i] = gy[i] * y[i] * (T(1) - y[i]);
}
template <class T>
__global__ void add(const T* a, const T* b, T* y, size_t n) {
  USEG_GRID_STRIDE(i, n) y[i] = a[i] + b[i];
}
/// y (n, c, hw) += b[c]
template <class T>
__global__ void bias_add(T* y, const T* b, int c, size_t hw, size_t n) {
  USEG_GRID_STRIDE(i, n) y[i] += b[(i / hw) % static_cast<size_t>(c)];
}

// ------------------------------------------------------------------------ pooling / resampling
template <class T>
__global__ void maxpool2x2_forward(size_t planes, int h, int w, const T* x, T* y) {
  const int oh = h / 2, ow = w / 2;
  const size_t n = planes * oh * ow;
  USEG_GRID_STRIDE(o, n) {
    const size_t p = o / (static_cast<size_t>(oh) * ow);
    const int r = static_cast<int>(o % (static_cast<size_t>(oh) * ow));
    const int i = r / ow, j = r % ow;
    const T* s = x + p * h * w + static_cast<size_t>(2 * i) * w + 2 * j;
    T m = s[0];
    if (s[1] > m || isnan(s[1])) m = s[1];
    if (s[w] > m || isnan(s[w])) m = s[w];
    if (s[w + 1] > m || isnan(s[w + 1])) m = s[w + 1];
    y[o] = m;
  }
}
/// One thread per input element: it receives gy when it is the first maximum of its window.
template <class T>
__global__ void maxpool2x2_backward(size_t planes, int h, int w, const T* x, const T* gy, T* gx) {
  const int oh = h / 2, ow = w / 2;
  const size_t n = planes * h * w;
  USEG_GRID_STRIDE(e, n) {
    const size_t p = e / (static_cast<size_t>(h) * w);
    const int r = static_cast<int>(e % (static_cast<size_t>(h) * w));
    const int yy = r / w, xx = r % w;
    const int i = yy / 2, j = xx / 2;
    T g = T(0);
    if (i < oh && j < ow) {
      const T* xp = x + p * h * w;
      const int base = (2 * i) * w + 2 * j;
      const int off[4] = {base, base + 1, base + w, base + w + 1};
      int best = off[0];
      T m = xp[off[0]];
      for (int q = 1; q < 4; ++q)
        if (xp[off[q]] > m || isnan(xp[off[q]])) {
          m = xp[off[q]];
          best = off[q];
        }
      if (best == r) g = gy[p * oh * ow + static_cast<size_t>(i) * ow + j];
    }
    gx[e] = g;
  }
}
template <class T>
__global__ void upsample2x_forward(size_t planes, int h, int w, const T* x, T* y) {
  const size_t n = planes * 4 * h * w;
  const int W2 = 2 * w;
  USEG_GRID_STRIDE(o, n) {
    const size_t p = o / (static_cast<size_t>(4) * h * w);
    const int r = static_cast<int>(o % (static_cast<size_t>(4) * h * w));
    const int i = r / W2, j = r % W2;
    y[o] = x[p * h * w + static_cast<size_t>(i / 2) * w + j / 2];
  }
}
template <class T>
__global__ void upsample2x_backward(size_t planes, int h, int w, const T* gy, T* gx) {
  const size_t n = planes * h * w;
  USEG_GRID_STRIDE(e, n) {
    const size_t p = e / (static_cast<size_t>(h) * w);
    const int r = static_cast<int>(e % (static_cast<size_t>(h) * w));
    const int i = r / w, j = r % w;
    const T* s = gy + p * 4 * h * w + static_cast<size_t>(2 * i) * 2 * w + 2 * j;
    gx[e] = s[0] + s[1] + s[2 * w] + s[2 * w + 1];
  }
}
template <class T>
__global__ void pad2d(size_t planes, int h, int w, int H, int W, int top, int left, const T* x, T* y) {
  const size_t n = planes * H * W;
  USEG_GRID_STRIDE(o, n) {
    const size_t p = o / (static_cast<size_t>(H) * W);
    const int r = static_cast<int>(o % (static_cast<size_t>(H) * W));
    const int i = r / W - top, j = r % W - left;
    y[o] = (i >= 0 && i < h && j >= 0 && j < w) ? x[p * h * w + static_cast<size_t>(i) * w + j] : T(0);
  }
}
template <class T>
__global__ void crop2d(size_t planes, int H, int W, int h, int w, int top, int left, const T* y, T* x) {
  const size_t n = planes * h * w;
  USEG_GRID_STRIDE(e, n) {
    const size_t p = e / (static_cast<size_t>(h) * w);
    const int r = static_cast<int>(e % (static_cast<size_t>(h) * w));
    const int i = r / w, j = r % w;
    x[e] = y[p * H * W + static_cast<size_t>(i + top) * W + j + left];
  }
}

// ------------------------------------------------------------------------ attention gate
/// y (n, c, hw) = x * psi (n, 1, hw)
template <class T>
__global__ void gate_forward(int c, size_t hw, const T* x, const T* psi, T* y, size_t n) {
  USEG_GRID_STRIDE(i, n) y[i] = x[i] * psi[(i / (hw * c)) * hw + i % hw];
}
/// One thread per pixel (batch, position): gx = gy * psi for every channel and
/// gpsi = Σ_c gy * x, summed in channel order (as the CPU backend does).
template <class T>
__global__ void gate_backward(int c, size_t hw, const T* x, const T* psi, const T* gy, T* gx, T* gpsi, size_t pixels) {
  USEG_GRID_STRIDE(q, pixels) {
    const size_t i = q / hw, j = q % hw;
    const T p = psi[q];
    T acc = T(0);
    for (int ch = 0; ch < c; ++ch) {
      const size_t o = (i * c + ch) * hw + j;
      gx[o] = gy[o] * p;
      acc += gy[o] * x[o];
    }
    gpsi[q] = acc;
  }
}

// ------------------------------------------------------------------------ reductions
/// Tree-reduce NV doubles per thread across a block (blockDim.x == threads); thread 0 gets the sums.
template <int NV>
__device__ inline void block_reduce(double (&acc)[NV]) {
  __shared__ double sh[NV][threads];
  for (int v = 0; v < NV; ++v) sh[v][threadIdx.x] = acc[v];
  __syncthreads();
  for (int s = threads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s)
      for (int v = 0; v < NV; ++v) sh[v][threadIdx.x] += sh[v][threadIdx.x + s];
    __syncthreads();
  }
  for (int v = 0; v < NV; ++v) acc[v] = sh[v][0];
}

/// Per-channel partial sums over an (n, c, hw) tensor. Grid (c, splits): block (ch, s) covers
/// the s-th of `splits` equal chunks of the n·hw values of channel ch and writes NV partials to
/// partials[(ch·splits + s)·NV + v]. F::operator()(ch, index, acc) adds one value's terms.
template <int NV, class F>
__global__ void channel_partials(F f, int c, size_t n, size_t hw, int splits, double* partials) {
  const int ch = blockIdx.x, s = blockIdx.y;
  const size_t total = n * hw;
  const size_t chunk = (total + splits - 1) / splits;
  const size_t begin = chunk * s, end = begin + chunk < total ? begin + chunk : total;
  double acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = 0;
  for (size_t j = begin + threadIdx.x; j < end; j += threads) {
    const size_t b = j / hw, i = j - b * hw;
    f(ch, (b * c + ch) * hw + i, acc);
  }
  block_reduce<NV>(acc);
  if (threadIdx.x == 0)
    for (int v = 0; v < NV; ++v) partials[(static_cast<size_t>(ch) * splits + s) * NV + v] = acc[v];
}
/// Sum a channel's partials in split order.
template <int NV>
__device__ inline void channel_total(const double* partials, int ch, int splits, double (&out)[NV]) {
  for (int v = 0; v < NV; ++v) out[v] = 0;
  for (int s = 0; s < splits; ++s)
    for (int v = 0; v < NV; ++v) out[v] += partials[(static_cast<size_t>(ch) * splits + s) * NV + v];
}

/// Whole-array partial sums: each block strides over [0, n) and writes NV partials. F may also
/// write per-element outputs (loss gradients), since every index is visited exactly once.
template <int NV, class F>
__global__ void global_partials(F f, size_t n, double* partials) {
  double acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = 0;
  USEG_GRID_STRIDE(i, n) f(i, acc);
  block_reduce<NV>(acc);
  if (threadIdx.x == 0)
    for (int v = 0; v < NV; ++v) partials[static_cast<size_t>(blockIdx.x) * NV + v] = acc[v];
}
/// One block: sum `blocks` partials (strided per thread, then a tree) into out[NV].
template <int NV>
__global__ void global_final(const double* partials, int blocks, double* out) {
  double acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = 0;
  for (int b = threadIdx.x; b < blocks; b += threads)
    for (int v = 0; v < NV; ++v) acc[v] += partials[static_cast<size_t>(b) * NV + v];
  block_reduce<NV>(acc);
  if (threadIdx.x == 0)
    for (int v = 0; v < NV; ++v) out[v] = acc[v];
}

// Functors for the reductions.
template <class T>
struct sum_f {
  const T* x;
  __device__ void operator()(size_t i, double (&a)[1]) const { a[0] += x[i]; }
};
template <class T>
struct dot_f {
  const T* x;
  const T* y;
  __device__ void operator()(size_t i, double (&a)[1]) const { a[0] += static_cast<double>(x[i]) * y[i]; }
};
/// Per-channel sums of d and d² with d = x - x[first value of the channel] (a shift that keeps
/// the one-pass variance accurate).
template <class T>
struct bn_stats_f {
  const T* x;
  size_t hw;
  __device__ void operator()(int ch, size_t idx, double (&a)[2]) const {
    const double d = static_cast<double>(x[idx]) - static_cast<double>(x[static_cast<size_t>(ch) * hw]);
    a[0] += d;
    a[1] += d * d;
  }
};
/// The gradient reaching the batch norm: gy, or with the fused ReLU gz·(z > 0), z its output.
template <class T>
__device__ inline T bn_incoming(const T* gy, const T* z, size_t i) {
  return z ? (z[i] > T(0) ? gy[i] : T(0)) : gy[i];
}
/// Per-channel Σ gy and Σ gy·x̂ for the batch-norm backward (z: see bn_incoming).
template <class T>
struct bn_backward_f {
  const T* x;
  const T* gy;
  const T* z;
  const T* mean;
  const T* invstd;
  __device__ void operator()(int ch, size_t idx, double (&a)[2]) const {
    const double g = bn_incoming(gy, z, idx);
    a[0] += g;
    a[1] += g * ((static_cast<double>(x[idx]) - static_cast<double>(mean[ch])) * static_cast<double>(invstd[ch]));
  }
};
/// Per-channel Σ gy (bias gradients).
template <class T>
struct channel_sum_f {
  const T* gy;
  __device__ void operator()(int, size_t idx, double (&a)[1]) const { a[0] += gy[idx]; }
};
/// Per-class Σ p·y and Σ (p + y) for the multi-class Dice; t holds class indices (n, 1, hw).
template <class T>
struct dice_class_f {
  const T* p;
  const T* t;
  int c;
  size_t hw;
  __device__ void operator()(int k, size_t idx, double (&a)[2]) const {
    const size_t b = idx / (hw * c), j = idx % hw;
    const double y = static_cast<int>(t[b * hw + j]) == k ? 1.0 : 0.0;
    a[0] += static_cast<double>(p[idx]) * y;
    a[1] += static_cast<double>(p[idx]) + y;
  }
};
/// Mean BCE on logits (stable form) with pos_weight; adds weight·inv·dL/dx to grad when non-null.
template <class T>
struct bce_f {
  const T* x;
  const T* t;
  double pos_weight, weight, inv;
  T* grad;
  __device__ void operator()(size_t i, double (&a)[1]) const {
    const double xi = x[i], yi = t[i];
    const double lw = 1.0 + (pos_weight - 1.0) * yi;
    const double sp = log1p(exp(-fabs(xi))) + fmax(-xi, 0.0);
    a[0] += (1.0 - yi) * xi + lw * sp;
    if (grad) {
      const double sig_neg = 1.0 / (1.0 + exp(xi));
      grad[i] += static_cast<T>(weight * inv * ((1.0 - yi) - lw * sig_neg));
    }
  }
};
template <class T>
struct dice_binary_f {
  const T* x;
  const T* t;
  __device__ void operator()(size_t i, double (&a)[3]) const {
    const double p = sigmoid(static_cast<double>(x[i]));
    a[0] += p * t[i];
    a[1] += p;
    a[2] += t[i];
  }
};
/// One pixel of the softmax cross-entropy; adds weight·inv·(p - y) to grad when non-null.
template <class T>
struct cross_entropy_f {
  const T* x;
  const T* t;
  int c;
  size_t hw;
  double weight, inv;
  T* grad;
  __device__ void operator()(size_t q, double (&a)[1]) const {
    const size_t i = q / hw, j = q % hw;
    const T* xi = x + i * c * hw + j;
    double m = xi[0];
    for (int k = 1; k < c; ++k) m = fmax(m, static_cast<double>(xi[k * hw]));
    double z = 0;
    for (int k = 0; k < c; ++k) z += exp(xi[k * hw] - m);
    const int cls = static_cast<int>(t[q]);
    a[0] += -(xi[static_cast<size_t>(cls) * hw] - m - log(z));
    if (grad)
      for (int k = 0; k < c; ++k) {
        const double pk = exp(xi[k * hw] - m) / z;
        grad[i * c * hw + k * hw + j] += static_cast<T>(weight * inv * (pk - (k == cls ? 1.0 : 0.0)));
      }
  }
};
/// Counts values that are not an integer class index in [0, classes).
template <class T>
struct invalid_index_f {
  const T* t;
  int classes;
  __device__ void operator()(size_t i, double (&a)[1]) const {
    const T v = t[i];
    if (!(v >= 0) || v >= classes || v != floor(v)) a[0] += 1;
  }
};

// ------------------------------------------------------------------------ batch norm
/// Train-mode affine coefficients from the saved (rounded) statistics, as the CPU backend
/// computes them, so that batch_norm_relu_apply reproduces the forward's output bit for bit.
template <class T>
__device__ inline void bn_coefficients(T gamma, T beta, T mean, T invstd, T& a, T& b) {
  a = static_cast<T>(static_cast<double>(gamma) * invstd);
  b = static_cast<T>(beta - static_cast<double>(mean) * gamma * invstd);
}
/// One thread per channel: batch statistics from the partials, saved mean/invstd, running
/// statistics (momentum, unbiased variance), and the affine coefficients y = a·x + b.
template <class T>
__global__ void bn_train_finalize(int c, int splits, const double* partials, double count, const T* x, size_t hw, const T* gamma,
                                  const T* beta, double eps, double momentum, T* running_mean, T* running_var, T* save_mean,
                                  T* save_invstd, T* coef) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  double s[2];
  channel_total<2>(partials, ch, splits, s);
  const double shift = x[static_cast<size_t>(ch) * hw];
  const double md = s[0] / count;
  double m2 = s[1] - s[0] * md;  // Σ (x - mean)²
  if (m2 < 0) m2 = 0;
  const double mean = shift + md;
  const double var = m2 / count;
  const double invstd = 1.0 / sqrt(var + eps);
  const T sm = static_cast<T>(mean), si = static_cast<T>(invstd);
  save_mean[ch] = sm;
  save_invstd[ch] = si;
  const double unbiased = count > 1 ? m2 / (count - 1) : var;
  running_mean[ch] = static_cast<T>((1 - momentum) * running_mean[ch] + momentum * mean);
  running_var[ch] = static_cast<T>((1 - momentum) * running_var[ch] + momentum * unbiased);
  bn_coefficients(gamma[ch], beta[ch], sm, si, coef[ch], coef[c + ch]);
}
/// The train-mode coefficients again, from the saved statistics (batch_norm_relu_apply).
template <class T>
__global__ void bn_saved_coefficients(int c, const T* gamma, const T* beta, const T* save_mean, const T* save_invstd, T* coef) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch < c) bn_coefficients(gamma[ch], beta[ch], save_mean[ch], save_invstd[ch], coef[ch], coef[c + ch]);
}
template <class T>
__global__ void bn_eval_coefficients(int c, const T* gamma, const T* beta, const T* running_mean, const T* running_var,
                                     double eps, T* coef) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  const double invstd = 1.0 / sqrt(static_cast<double>(running_var[ch]) + eps);
  coef[ch] = static_cast<T>(gamma[ch] * invstd);
  coef[c + ch] = static_cast<T>(beta[ch] - running_mean[ch] * gamma[ch] * invstd);
}
template <class T>
__global__ void bn_eval_invstd(int c, double eps, const T* running_var, T* invstd) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch < c) invstd[ch] = static_cast<T>(1.0 / sqrt(static_cast<double>(running_var[ch]) + eps));
}
/// y = a[ch]·x + b[ch], or relu of it (the fused batch norm + ReLU), plus residual when non-null
template <class T, bool Relu>
__global__ void bn_apply(int c, size_t hw, const T* x, const T* coef, const T* residual, T* y, size_t n) {
  USEG_GRID_STRIDE(i, n) {
    const int ch = static_cast<int>((i / hw) % static_cast<size_t>(c));
    const T v = coef[ch] * x[i] + coef[c + ch];
    T out = Relu ? (v > T(0) ? v : T(0)) : v;
    if (residual) out += residual[i];
    y[i] = out;
  }
}
/// y (n, c, hw) = relu(y + b[c]) (the eval-mode convolution with batch norm folded in)
template <class T>
__global__ void bias_relu(T* y, const T* b, int c, size_t hw, size_t n) {
  USEG_GRID_STRIDE(i, n) {
    const T v = y[i] + b[(i / hw) % static_cast<size_t>(c)];
    y[i] = v > T(0) ? v : T(0);
  }
}
/// wf = w·s per output channel, bf = (b - running_mean)·s + beta, s = gamma / sqrt(running_var + eps)
template <class T>
__global__ void fold_batch_norm(int cout, size_t per_out, const T* w, const T* b, const T* gamma, const T* beta,
                                const T* running_mean, const T* running_var, double eps, T* wf, T* bf) {
  const size_t n = static_cast<size_t>(cout) * per_out;
  USEG_GRID_STRIDE(i, n) {
    const size_t o = i / per_out;
    const double sc = static_cast<double>(gamma[o]) / sqrt(static_cast<double>(running_var[o]) + eps);
    wf[i] = static_cast<T>(w[i] * sc);
    if (i % per_out == 0) bf[o] = static_cast<T>(((b ? static_cast<double>(b[o]) : 0.0) - running_mean[o]) * sc + beta[o]);
  }
}
/// One thread per channel: accumulate ggamma/gbeta and prepare the input-gradient coefficients
/// (k = γ·invstd, mean of gy, mean of gy·x̂; the means are 0 in eval mode).
template <class T>
__global__ void bn_backward_finalize(int c, int splits, const double* partials, double count, bool train, const T* gamma,
                                     const T* mean, const T* invstd, T* ggamma, T* gbeta, double* coef) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  double s[2];
  channel_total<2>(partials, ch, splits, s);
  ggamma[ch] += static_cast<T>(s[1]);
  gbeta[ch] += static_cast<T>(s[0]);
  const double is = invstd[ch];
  coef[5 * ch + 0] = gamma[ch] * is;
  coef[5 * ch + 1] = train ? s[0] / count : 0.0;
  coef[5 * ch + 2] = train ? s[1] / count : 0.0;
  coef[5 * ch + 3] = mean[ch];
  coef[5 * ch + 4] = is;
}
template <class T>
__global__ void bn_backward_apply(int c, size_t hw, const T* x, const T* gy, const T* z, const double* coef, T* gx, size_t n) {
  USEG_GRID_STRIDE(i, n) {
    const int ch = static_cast<int>((i / hw) % static_cast<size_t>(c));
    const double* k = coef + 5 * ch;
    gx[i] = static_cast<T>(k[0] * (bn_incoming(gy, z, i) - k[1] - (static_cast<double>(x[i]) - k[3]) * k[4] * k[2]));
  }
}
/// gb[ch] += Σ partials (bias gradients of the convolutions).
template <class T>
__global__ void bias_grad_finalize(int c, int splits, const double* partials, T* gb) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  double s[1];
  channel_total<1>(partials, ch, splits, s);
  gb[ch] += static_cast<T>(s[0]);
}

// ------------------------------------------------------------------------ losses
/// Softmax over channels of (n, c, hw), one thread per pixel, in double.
template <class T>
__global__ void softmax_channels(int c, size_t hw, const T* x, T* p, size_t pixels) {
  USEG_GRID_STRIDE(q, pixels) {
    const size_t o = (q / hw) * c * hw + q % hw;
    double m = x[o];
    for (int k = 1; k < c; ++k) m = fmax(m, static_cast<double>(x[o + k * hw]));
    double z = 0;
    for (int k = 0; k < c; ++k) z += exp(x[o + k * hw] - m);
    for (int k = 0; k < c; ++k) p[o + k * hw] = static_cast<T>(exp(x[o + k * hw] - m) / z);
  }
}
template <class T>
__global__ void dice_binary_grad(const T* x, const T* t, size_t n, double num, double den, double weight, T* grad) {
  USEG_GRID_STRIDE(i, n) {
    const double p = sigmoid(static_cast<double>(x[i]));
    const double dp = -(2.0 * t[i] * den - num) / (den * den);
    grad[i] += static_cast<T>(weight * dp * p * (1 - p));
  }
}
/// One thread per class: I_k and S_k from the partials into sums[2k], sums[2k+1].
template <class D>
__global__ void dice_class_finalize(int c, int splits, const D* partials, D* sums) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= c) return;
  D s[2];
  channel_total<2>(partials, k, splits, s);
  sums[2 * k] = s[0];
  sums[2 * k + 1] = s[1];
}
/// One thread per pixel: the multi-class Dice gradient through the softmax.
template <class T>
__global__ void dice_multiclass_grad(int c, size_t hw, const T* p, const T* t, const double* sums, double smooth, double weight,
                                     T* grad, size_t pixels) {
  USEG_GRID_STRIDE(q, pixels) {
    const size_t i = q / hw, j = q % hw;
    const int cls = static_cast<int>(t[q]);
    double pa = 0;
    for (int k = 0; k < c; ++k) {
      const double y = cls == k ? 1.0 : 0.0;
      const double den = sums[2 * k + 1] + smooth;
      const double a = -(1.0 / c) * (2.0 * y * den - (2 * sums[2 * k] + smooth)) / (den * den);
      pa += p[(i * c + k) * hw + j] * a;
    }
    for (int k = 0; k < c; ++k) {
      const double y = cls == k ? 1.0 : 0.0;
      const double den = sums[2 * k + 1] + smooth;
      const double a = -(1.0 / c) * (2.0 * y * den - (2 * sums[2 * k] + smooth)) / (den * den);
      const size_t o = (i * c + k) * hw + j;
      grad[o] += static_cast<T>(weight * p[o] * (a - pa));
    }
  }
}

// ------------------------------------------------------------------------ optimizers
template <class T>
__global__ void sgd_step(T* p, const T* g, T* buf, size_t n, double lr, double momentum, double dampening, double wd,
                         bool nesterov, bool first) {
  USEG_GRID_STRIDE(i, n) {
    double gi = static_cast<double>(g[i]) + wd * p[i];
    if (momentum != 0) {
      const double b = first ? gi : momentum * buf[i] + (1 - dampening) * gi;
      buf[i] = static_cast<T>(b);
      gi = nesterov ? gi + momentum * b : b;
    }
    p[i] = static_cast<T>(p[i] - lr * gi);
  }
}
/// Adam / AdamW over the flat parameter buffer, one fused pass (PyTorch's update rule).
template <class T>
__global__ void adam_step(T* p, const T* g, T* m, T* v, size_t n, double lr, double beta1, double beta2, double eps, double wd,
                          bool decoupled, double step_size, double sqrt_bc2) {
  USEG_GRID_STRIDE(i, n) {
    double pi = p[i];
    double gi = g[i];
    if (decoupled)
      pi *= 1 - lr * wd;
    else
      gi += wd * pi;
    const double mi = beta1 * m[i] + (1 - beta1) * gi;
    const double vi = beta2 * v[i] + (1 - beta2) * gi * gi;
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
    pi -= step_size * mi / (sqrt(vi) / sqrt_bc2 + eps);
    p[i] = static_cast<T>(pi);
  }
}

#undef USEG_GRID_STRIDE

}  // namespace useg::cuda_kernels
