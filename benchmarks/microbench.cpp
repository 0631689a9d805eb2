// useg_microbench — Google Benchmark timings of the CPU backend on the layer shapes the models
// use: a training batch of 4 at 256² through levels 0..4 (channels width·2^level, spatial
// 256/2^level). Each benchmark reports FLOP/s ("flops" counter) where FLOPs are meaningful.
//
//   useg_microbench --benchmark_filter='conv3x3_fwd/16/'      # one family
//   OMP_NUM_THREADS=2 useg_microbench --benchmark_min_time=0.2
#include <benchmark/benchmark.h>

#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "useg/blocks/attention_gate.hpp"
#include "useg/blocks/recurrent_block.hpp"
#include "useg/useg.hpp"

namespace {
using B = useg::cpu;
using T = float;
using O = useg::ops<B>;

std::vector<T> random_vec(std::size_t n, std::uint64_t seed) {
  useg::rng g(seed);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(g.uniform() * 2 - 1);
  return v;
}
useg::tensor<B> random_tensor(useg::shape s, std::uint64_t seed) { return useg::tensor<B>::from_host(s, random_vec(s.numel(), seed)); }

useg::context<B>& ctx() {
  static useg::context<B> c(0);
  return c;
}

// Args: batch, cin, cout, spatial, kernel.
void conv_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "cin", "cout", "hw", "k"});
  for (int width : {16, 64}) {
    b->Args({4, 3, width, 256, 3});  // first layer
    for (int lvl = 0; lvl <= 4; ++lvl) b->Args({4, width << lvl, width << lvl, 256 >> lvl, 3});
    b->Args({4, 2 * width, width, 256, 3});  // decoder block input (concat)
    b->Args({4, width, width / 2, 256, 1});  // attention gate W_x
  }
  // Width 16 at the 128² batch-8 training preset: levels 1-4 (level 0 is the 256² batch-4 shape's
  // pixel count), where the planes get small.
  for (int lvl = 1; lvl <= 4; ++lvl) b->Args({8, 16 << lvl, 16 << lvl, 128 >> lvl, 3});
}

struct conv_fixture {
  useg::conv_desc d;
  useg::tensor<B> x, w, b, y, gy, gx, gw, gb;
  explicit conv_fixture(const benchmark::State& s) {
    d = useg::conv_desc{static_cast<int>(s.range(0)), static_cast<int>(s.range(1)), static_cast<int>(s.range(2)),
                        static_cast<int>(s.range(3)), static_cast<int>(s.range(3)), static_cast<int>(s.range(4))};
    x = random_tensor(useg::shape{d.n, d.cin, d.h, d.w}, 1);
    w = random_tensor(useg::shape{d.cout, d.cin, d.k, d.k}, 2);
    b = random_tensor(useg::shape{d.cout}, 3);
    y = useg::tensor<B>(useg::shape{d.n, d.cout, d.h, d.w});
    gy = random_tensor(useg::shape{d.n, d.cout, d.h, d.w}, 4);
    gx = useg::tensor<B>(x.dims());
    gw = random_tensor(w.dims(), 5);
    gb = random_tensor(b.dims(), 6);
  }
  double flops() const { return 2.0 * d.n * static_cast<double>(d.hw()) * d.cin * d.cout * d.k * d.k; }
};

void conv_fwd(benchmark::State& s) {
  conv_fixture f(s);
  for (auto _ : s) O::conv2d_forward(ctx(), f.d, f.x.data(), f.w.data(), f.b.data(), f.y.data());
  s.counters["flops"] = benchmark::Counter(f.flops(), benchmark::Counter::kIsIterationInvariantRate);
}
void conv_bwd_data(benchmark::State& s) {
  conv_fixture f(s);
  for (auto _ : s) O::conv2d_backward_data(ctx(), f.d, f.w.data(), f.gy.data(), f.gx.data());
  s.counters["flops"] = benchmark::Counter(f.flops(), benchmark::Counter::kIsIterationInvariantRate);
}
void conv_bwd_weights(benchmark::State& s) {
  conv_fixture f(s);
  for (auto _ : s) O::conv2d_backward_weights(ctx(), f.d, f.x.data(), f.gy.data(), f.gw.data(), f.gb.data());
  s.counters["flops"] = benchmark::Counter(f.flops(), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(conv_fwd)->Apply(conv_args)->Unit(benchmark::kMillisecond)->UseRealTime();
// Batch-1 inference (predict() of one 256² slice): every level of widths 16 and 64, where the deep
// levels' weights outweigh their activations.
void conv_infer1_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "cin", "cout", "hw", "k"});
  for (int width : {16, 64})
    for (int lvl = 0; lvl <= 4; ++lvl) b->Args({1, width << lvl, width << lvl, 256 >> lvl, 3});
}
// Two weight tensors in turn, as consecutive layers of a model: the packed weights are not kept
// from the call before (conv_fwd's repeated calls reuse them), so the time includes packing.
void conv_infer1(benchmark::State& s) {
  conv_fixture f(s);
  const useg::tensor<B> w2 = random_tensor(f.w.dims(), 7);
  bool other = false;
  for (auto _ : s) {
    O::conv2d_forward(ctx(), f.d, f.x.data(), other ? w2.data() : f.w.data(), f.b.data(), f.y.data());
    other = !other;
  }
  s.counters["flops"] = benchmark::Counter(f.flops(), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(conv_infer1)->Apply(conv_infer1_args)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(conv_bwd_data)->Apply(conv_args)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(conv_bwd_weights)->Apply(conv_args)->Unit(benchmark::kMillisecond)->UseRealTime();

// Args: batch, channels, spatial.
void plane_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "c", "hw"});
  for (int lvl = 0; lvl <= 4; lvl += 2) b->Args({4, 16 << lvl, 256 >> lvl});
}

void batch_norm_train(benchmark::State& s) {
  const int n = static_cast<int>(s.range(0)), c = static_cast<int>(s.range(1)), hw = static_cast<int>(s.range(2));
  useg::param_store<B> store;
  useg::batch_norm2d<B> bn(store, "bn", c);
  store.finalize(1);
  auto x = random_tensor(useg::shape{n, c, hw, hw}, 1), gy = random_tensor(x.dims(), 2);
  for (auto _ : s) {
    bn.forward(ctx(), x);
    bn.backward(ctx(), gy);
  }
  s.SetBytesProcessed(static_cast<std::int64_t>(s.iterations()) * static_cast<std::int64_t>(x.size() * sizeof(T)));
}
BENCHMARK(batch_norm_train)->Apply(plane_args)->Unit(benchmark::kMicrosecond)->UseRealTime();

void conv_bn_relu_train(benchmark::State& s) {
  const int n = static_cast<int>(s.range(0)), c = static_cast<int>(s.range(1)), hw = static_cast<int>(s.range(2));
  useg::param_store<B> store;
  useg::conv_bn_relu<B, 3> u(store, "c", "b", c, c);
  store.finalize(1);
  auto x = random_tensor(useg::shape{n, c, hw, hw}, 1), gy = random_tensor(x.dims(), 2);
  for (auto _ : s) {
    u.forward(ctx(), x);
    u.backward(ctx(), gy);
  }
  s.counters["flops"] = benchmark::Counter(3 * u.flops(), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(conv_bn_relu_train)->Apply(plane_args)->Unit(benchmark::kMillisecond)->UseRealTime();

void maxpool(benchmark::State& s) {
  const int n = static_cast<int>(s.range(0)), c = static_cast<int>(s.range(1)), hw = static_cast<int>(s.range(2));
  useg::max_pool2x2<B> p;
  auto x = random_tensor(useg::shape{n, c, hw, hw}, 1), gy = random_tensor(useg::shape{n, c, hw / 2, hw / 2}, 2);
  for (auto _ : s) {
    p.forward(ctx(), x);
    p.backward(ctx(), gy);
  }
  s.SetBytesProcessed(static_cast<std::int64_t>(s.iterations()) * static_cast<std::int64_t>(x.size() * sizeof(T)));
}
BENCHMARK(maxpool)->Apply(plane_args)->Unit(benchmark::kMicrosecond)->UseRealTime();

void attention_gate_train(benchmark::State& s) {
  const int n = static_cast<int>(s.range(0)), c = static_cast<int>(s.range(1)), hw = static_cast<int>(s.range(2));
  useg::param_store<B> store;
  useg::attention_gate<B> g(store, "Att", c, c, c / 2);
  store.finalize(1);
  auto gs = random_tensor(useg::shape{n, c, hw, hw}, 1), xs = random_tensor(gs.dims(), 2), gy = random_tensor(gs.dims(), 3);
  for (auto _ : s) {
    g.forward(ctx(), gs, xs);
    g.backward(ctx(), gy);
  }
  s.counters["flops"] = benchmark::Counter(3 * g.flops(), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(attention_gate_train)->Apply(plane_args)->Unit(benchmark::kMillisecond)->UseRealTime();

void recurrent_block_train(benchmark::State& s) {
  const int n = static_cast<int>(s.range(0)), c = static_cast<int>(s.range(1)), hw = static_cast<int>(s.range(2));
  useg::param_store<B> store;
  useg::recurrent_block<B> r(store, "R", c, 2);
  store.finalize(1);
  auto x = random_tensor(useg::shape{n, c, hw, hw}, 1), gy = random_tensor(x.dims(), 2);
  for (auto _ : s) {
    r.forward(ctx(), x);
    r.backward(ctx(), gy);
  }
  s.counters["flops"] = benchmark::Counter(3 * r.flops(), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(recurrent_block_train)->Apply(plane_args)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

// The machine's practical peak for comparison: Eigen's single-precision GEMM on large square
// matrices (2·n³ FLOPs), with as many threads as the convolutions get (OMP_NUM_THREADS).
void sgemm_eigen(benchmark::State& s) {
  const Eigen::Index n = s.range(0);
  const Eigen::MatrixXf a = Eigen::MatrixXf::Random(n, n), b = Eigen::MatrixXf::Random(n, n);
  Eigen::MatrixXf c(n, n);
  for (auto _ : s) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
  }
  s.counters["flops"] = benchmark::Counter(2.0 * static_cast<double>(n) * n * n, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(sgemm_eigen)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();

// The hardware's FP32 multiply-add peak as this build reaches it: every thread (OMP_NUM_THREADS)
// runs 16 independent chains of vector FMAs (the widest the build targets) on registers, enough to
// cover the FMA latency on every pipe. Clock boost included: this is the ceiling a kernel can meet.
void fma_peak(benchmark::State& s) {
  using S = useg::detail::simd<T>;
  constexpr int chains = 16;
  constexpr long iters = 1L << 22;
  int threads = 1;
  for (auto _ : s) {
    T sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
      // Named accumulators (an array would be kept on the stack).
      using V = typename S::v;
      V c0 = S::set1(T(1.00)), c1 = S::set1(T(1.01)), c2 = S::set1(T(1.02)), c3 = S::set1(T(1.03));
      V c4 = S::set1(T(1.04)), c5 = S::set1(T(1.05)), c6 = S::set1(T(1.06)), c7 = S::set1(T(1.07));
      V c8 = S::set1(T(1.08)), c9 = S::set1(T(1.09)), c10 = S::set1(T(1.10)), c11 = S::set1(T(1.11));
      V c12 = S::set1(T(1.12)), c13 = S::set1(T(1.13)), c14 = S::set1(T(1.14)), c15 = S::set1(T(1.15));
      const V a = S::set1(T(0.999999)), b = S::set1(T(1e-7));
      for (long it = 0; it < iters; ++it) {
        c0 = S::fma(c0, a, b), c1 = S::fma(c1, a, b), c2 = S::fma(c2, a, b), c3 = S::fma(c3, a, b);
        c4 = S::fma(c4, a, b), c5 = S::fma(c5, a, b), c6 = S::fma(c6, a, b), c7 = S::fma(c7, a, b);
        c8 = S::fma(c8, a, b), c9 = S::fma(c9, a, b), c10 = S::fma(c10, a, b), c11 = S::fma(c11, a, b);
        c12 = S::fma(c12, a, b), c13 = S::fma(c13, a, b), c14 = S::fma(c14, a, b), c15 = S::fma(c15, a, b);
      }
      sink += S::hsum(S::add(S::add(S::add(c0, c1), S::add(c2, c3)), S::add(S::add(c4, c5), S::add(c6, c7)))) +
              S::hsum(S::add(S::add(S::add(c8, c9), S::add(c10, c11)), S::add(S::add(c12, c13), S::add(c14, c15))));
#ifdef _OPENMP
#pragma omp single
      threads = omp_get_num_threads();
#endif
    }
    benchmark::DoNotOptimize(sink);
  }
  s.counters["threads"] = threads;
  s.counters["flops"] = benchmark::Counter(2.0 * threads * static_cast<double>(iters) * chains * S::L,
                                           benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(fma_peak)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
