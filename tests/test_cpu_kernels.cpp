// CPU kernels: the convolution kernels (forward, backward-data, backward-weights) and the fused
// ops, in float and double, against naive loops written here, on shapes that hit every edge
// of the vector blocking (widths below, at and across the vector length, odd sizes, channel
// counts that are not multiples of the register blocks, 1×1 / 3×3 / 5×5 kernels).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "useg/backend/cpu.hpp"
#include "useg/core/rng.hpp"

using namespace useg;

namespace {

template <class T>
std::vector<T> random_vec(std::size_t n, useg::rng& g) {
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(g.uniform(-1, 1));
  return v;
}

struct conv_case {
  int n, cin, cout, h, w, k;
};

// Naive same-padded stride-1 convolution in double.
std::vector<double> ref_forward(const conv_case& c, const std::vector<double>& x, const std::vector<double>& wt,
                                const std::vector<double>* b) {
  const int p = c.k / 2;
  std::vector<double> y(static_cast<std::size_t>(c.n) * c.cout * c.h * c.w);
  for (int i = 0; i < c.n; ++i)
    for (int o = 0; o < c.cout; ++o)
      for (int yy = 0; yy < c.h; ++yy)
        for (int xx = 0; xx < c.w; ++xx) {
          double s = b ? (*b)[o] : 0.0;
          for (int ci = 0; ci < c.cin; ++ci)
            for (int ky = 0; ky < c.k; ++ky)
              for (int kx = 0; kx < c.k; ++kx) {
                const int iy = yy + ky - p, ix = xx + kx - p;
                if (iy < 0 || iy >= c.h || ix < 0 || ix >= c.w) continue;
                s += wt[((static_cast<std::size_t>(o) * c.cin + ci) * c.k + ky) * c.k + kx] *
                     x[((static_cast<std::size_t>(i) * c.cin + ci) * c.h + iy) * c.w + ix];
              }
          y[((static_cast<std::size_t>(i) * c.cout + o) * c.h + yy) * c.w + xx] = s;
        }
  return y;
}

// gx = d(Σ gy·y)/dx, gw = d(Σ gy·y)/dw, gb = Σ gy, by scattering (independent of the kernels' gathers).
void ref_backward(const conv_case& c, const std::vector<double>& x, const std::vector<double>& wt,
                  const std::vector<double>& gy, std::vector<double>& gx, std::vector<double>& gw,
                  std::vector<double>& gb) {
  const int p = c.k / 2;
  gx.assign(x.size(), 0.0);
  gw.assign(wt.size(), 0.0);
  gb.assign(static_cast<std::size_t>(c.cout), 0.0);
  for (int i = 0; i < c.n; ++i)
    for (int o = 0; o < c.cout; ++o)
      for (int yy = 0; yy < c.h; ++yy)
        for (int xx = 0; xx < c.w; ++xx) {
          const double g = gy[((static_cast<std::size_t>(i) * c.cout + o) * c.h + yy) * c.w + xx];
          gb[o] += g;
          for (int ci = 0; ci < c.cin; ++ci)
            for (int ky = 0; ky < c.k; ++ky)
              for (int kx = 0; kx < c.k; ++kx) {
                const int iy = yy + ky - p, ix = xx + kx - p;
                if (iy < 0 || iy >= c.h || ix < 0 || ix >= c.w) continue;
                const std::size_t wi = ((static_cast<std::size_t>(o) * c.cin + ci) * c.k + ky) * c.k + kx;
                const std::size_t xi = ((static_cast<std::size_t>(i) * c.cin + ci) * c.h + iy) * c.w + ix;
                gx[xi] += wt[wi] * g;
                gw[wi] += x[xi] * g;
              }
        }
}

template <class T>
double tol() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-12;
}

// |a - b| <= tol · (scale + |b|): scale is the magnitude of the summands (sqrt of the term count).
template <class T>
void check_close(const std::vector<T>& got, const std::vector<double>& want, double scale, const std::string& what) {
  REQUIRE(got.size() == want.size());
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < want.size(); ++i)
    if (!(std::abs(static_cast<double>(got[i]) - want[i]) <= tol<T>() * (scale + std::abs(want[i])))) {
      if (!bad) first = i;
      ++bad;
    }
  INFO(what << ": " << bad << " of " << want.size() << " values differ; first at " << first << ": "
            << (bad ? static_cast<double>(got[first]) : 0.0) << " vs " << (bad ? want[first] : 0.0));
  CHECK(bad == 0);
}

template <class T>
void run_case(const conv_case& c, std::uint64_t seed, int threads = 1) {
  using Bk = cpu_backend<T>;
  context<Bk> ctx(threads);
  useg::rng g(seed);
  const std::size_t xs = static_cast<std::size_t>(c.n) * c.cin * c.h * c.w;
  const std::size_t ys = static_cast<std::size_t>(c.n) * c.cout * c.h * c.w;
  const std::size_t ws = static_cast<std::size_t>(c.cout) * c.cin * c.k * c.k;
  auto x = random_vec<T>(xs, g), wt = random_vec<T>(ws, g), b = random_vec<T>(c.cout, g), gy = random_vec<T>(ys, g);
  std::vector<double> xd(x.begin(), x.end()), wd(wt.begin(), wt.end()), bd(b.begin(), b.end()), gyd(gy.begin(), gy.end());
  const conv_desc d{c.n, c.cin, c.cout, c.h, c.w, c.k};
  std::ostringstream label;  // (not "n" + std::to_string(...): GCC 12 warns -Wrestrict on it, a false positive)
  label << "n" << c.n << " " << c.cin << "->" << c.cout << " " << c.h << "x" << c.w << " k" << c.k;
  const std::string name = label.str();
  const double terms = std::sqrt(static_cast<double>(c.cin) * c.k * c.k);

  std::vector<T> y(ys, T(7));
  ops<Bk>::conv2d_forward(ctx, d, x.data(), wt.data(), b.data(), y.data());
  check_close(y, ref_forward(c, xd, wd, &bd), terms, "forward " + name);
  std::vector<T> y0(ys, T(7));
  ops<Bk>::conv2d_forward(ctx, d, x.data(), wt.data(), nullptr, y0.data());
  check_close(y0, ref_forward(c, xd, wd, nullptr), terms, "forward without bias " + name);

  std::vector<double> rgx, rgw, rgb;
  ref_backward(c, xd, wd, gyd, rgx, rgw, rgb);
  std::vector<T> gx(xs, T(7));
  ops<Bk>::conv2d_backward_data(ctx, d, wt.data(), gy.data(), gx.data());
  check_close(gx, rgx, std::sqrt(static_cast<double>(c.cout) * c.k * c.k), "backward data " + name);

  // Weight and bias gradients accumulate: start from a known value.
  std::vector<T> gw(ws, T(0.5)), gb(static_cast<std::size_t>(c.cout), T(-0.25));
  ops<Bk>::conv2d_backward_weights(ctx, d, x.data(), gy.data(), gw.data(), gb.data());
  for (auto& v : rgw) v += 0.5;
  for (auto& v : rgb) v -= 0.25;
  const double pix = std::sqrt(static_cast<double>(c.n) * c.h * c.w);
  check_close(gw, rgw, pix, "backward weights " + name);
  check_close(gb, rgb, pix, "backward bias " + name);
}

const std::vector<conv_case> cases = {
    {1, 1, 1, 1, 1, 3},   {2, 3, 4, 5, 6, 3},    {1, 2, 3, 7, 1, 3},    {1, 3, 2, 1, 9, 3},   {2, 4, 9, 8, 8, 3},
    {1, 5, 11, 16, 16, 3}, {3, 7, 17, 9, 17, 3}, {1, 16, 16, 33, 31, 3}, {2, 3, 16, 32, 48, 3}, {1, 17, 5, 15, 14, 3},
    {2, 8, 24, 4, 40, 3}, {1, 6, 8, 12, 12, 1},  {2, 5, 1, 9, 13, 1},   {1, 19, 10, 16, 16, 1}, {2, 3, 4, 7, 9, 5},
    {1, 2, 3, 6, 20, 5},  {1, 33, 9, 2, 2, 3},   {4, 12, 7, 3, 18, 3},
    // >= 8 channels each way: the Winograd path (odd sizes, single pixels, partial tiles)
    {2, 9, 10, 7, 5, 3},  {1, 8, 8, 1, 1, 3},    {3, 12, 16, 17, 33, 3}, {1, 10, 9, 3, 64, 3}, {2, 24, 8, 6, 6, 3},
    // the quarter layout's row-aligned tile vectors: whole-vector rows, an odd last output row, a
    // row's last vector with 8 (float: lo only) or 18 (float: lo and a masked hi) outputs left
    {2, 8, 9, 9, 64, 3},  {1, 9, 8, 5, 40, 3},   {2, 8, 9, 9, 50, 3},
    // >= 64 channels each way: the Winograd weight gradient (channel counts off the blocking)
    {2, 64, 64, 9, 7, 3}, {1, 70, 65, 5, 12, 3}, {3, 96, 64, 1, 3, 3},
    // Winograd's dense tile layout (planes up to 32 wide whose tile count is a whole number of
    // vectors: 16 tiles for float, 8 for double), tasks spanning images, odd sizes in it
    {3, 9, 12, 8, 8, 3},  {2, 16, 10, 8, 16, 3}, {5, 8, 8, 4, 8, 3},   {3, 8, 9, 7, 8, 3},  {1, 8, 9, 32, 32, 3},
    {2, 8, 8, 16, 10, 3}, {4, 10, 8, 15, 31, 3}, {3, 64, 66, 8, 8, 3}, {2, 65, 64, 16, 15, 3}, {3, 64, 64, 4, 4, 3}, {2, 64, 64, 8, 4, 3},
    // F(4×4,3×3) (a tile row fills a vector: w >= 61 for float, >= 29 for double): a whole vector
    // of tiles per row, a partial last tile (61, 66), a row's second vector nearly empty (70) or
    // partial (130), heights off the tile (1, 3, 5, 7), output channels off the blocks, tasks
    // spanning images
    {2, 8, 9, 7, 64, 3},  {1, 9, 8, 5, 61, 3},   {1, 8, 8, 3, 130, 3},  {3, 12, 10, 6, 70, 3}, {1, 8, 17, 1, 66, 3},
    {2, 20, 12, 13, 29, 3}, {1, 64, 72, 9, 64, 3},
    // F(4×4,3×3) with two or four tile rows per vector (tile rows of half or a quarter of a vector:
    // w = 29..32 or 13..16 for float, 13..16 or 5..8 for double): partial last tiles, heights off
    // the vector's rows, vectors spanning images
    {1, 8, 9, 13, 13, 3}, {3, 9, 8, 6, 30, 3},   {5, 8, 16, 16, 16, 3}, {2, 10, 8, 31, 14, 3}, {1, 12, 9, 2, 7, 3},
    {2, 8, 8, 9, 5, 3}};

// 1×1 kernels: pixel counts off the vector length, channel counts off the register blocks (8 × 3
// vectors forward, 4 × 5 weight gradient), one channel each way, several images per weight-gradient
// chunk, an image split into chunks with a partial last vector, a single pixel.
const std::vector<conv_case> cases_1x1 = {{3, 21, 13, 37, 29, 1}, {2, 1, 6, 9, 9, 1},   {2, 6, 1, 9, 9, 1},
                                          {1, 40, 30, 70, 71, 1}, {5, 9, 17, 1, 1, 1},  {4, 4, 4, 4, 12, 1},
                                          {2, 16, 8, 64, 64, 1}};

}  // namespace

TEST_CASE_TEMPLATE("conv kernels match naive loops (forward, backward data, weights, bias)", Tp, float, double) {
  std::uint64_t seed = 100;
  for (const auto& c : cases) run_case<Tp>(c, ++seed);
}

TEST_CASE_TEMPLATE("1x1 convolutions match naive loops on one and two threads", Tp, float, double) {
  std::uint64_t seed = 300;
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    for (const auto& c : cases_1x1) run_case<Tp>(c, ++seed, threads);
  }
  context<cpu_backend<Tp>> reset(1);
}

TEST_CASE_TEMPLATE("F(2x2,3x3) with few tasks on two threads (vectors spread evenly, narrower products) matches naive loops",
                   Tp, float, double) {
  // Dense small planes: 16×16 at batch 1 (4 vectors for float: tasks of 2 + 2), 8×8 at batch 8
  // (8 vectors: 4 tasks of 2) and batch 1 (one vector: one task of 1), 32×32 (16 vectors: 6 tasks
  // of 2 or 3), output channels off the blocks (the last, partial block computes all vectors);
  // 4×4 planes (quarter layout, two vectors an image: 3 tasks of 2 for 3 images).
  std::uint64_t seed = 500;
  for (const conv_case& c : {conv_case{1, 16, 24, 16, 16, 3}, conv_case{8, 16, 16, 8, 8, 3}, conv_case{1, 8, 16, 8, 8, 3},
                             conv_case{1, 12, 17, 32, 32, 3}, conv_case{2, 9, 8, 8, 8, 3}, conv_case{3, 8, 16, 4, 4, 3},
                             conv_case{5, 8, 9, 8, 8, 3}})
    run_case<Tp>(c, ++seed, 2);
  context<cpu_backend<Tp>> reset(1);
}

TEST_CASE_TEMPLATE("Winograd weight gradient over several tile chunks matches naive loops", Tp, float, double) {
  // The weight gradient transforms its tiles in chunks of ~2M scratch elements (16·tc·(cin +
  // cout)): 64 → 64 channels take tc = 1008 tiles a chunk. At 48×48 an image has 600 tiles (608
  // in whole float vectors), so a batch of 2 runs as a full chunk and a partial one (208 or 192
  // tiles) whose scratch rows past its end still hold the first chunk's tiles; 64 → 72 at 40×40
  // batch 3 (420 tiles an image, 1296 in all in whole float vectors; chunks of 960) likewise. Each chunk must sum its own tiles only
  // (until 2026-12-07 the partial chunk's products ran over the whole chunk length, counting the
  // stale tiles again: every weight gradient of 64+ channels on planes past ~32×32 was wrong).
  std::uint64_t seed = 700;
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    for (const conv_case& c : {conv_case{2, 64, 64, 48, 48, 3}, conv_case{3, 64, 72, 40, 40, 3}})
      run_case<Tp>(c, ++seed, threads);
  }
  context<cpu_backend<Tp>> reset(1);
}

TEST_CASE_TEMPLATE("Winograd weight gradient: shared and K-split plans, partial chunks, 1-3 threads, match naive loops",
                   Tp, float, double) {
  // The two ways the weight gradient splits its tiles (wino_wg_plan): shared (all threads on each
  // chunk) and K-split (two halves, each into its own Ĝ, added at the end; on two threads one half
  // each), forced here with a chunk of 5 vectors so that both end in partial chunks: 64 -> 70
  // channels at 20×18 batch 3 is 90 tiles an image (96 in whole float vectors, 288 in all: the
  // shared plan runs 3 chunks of 80 and one of 48; K-split halves of 144 run 80 + 64). Every
  // thread count must give the one-thread result bit for bit.
  using namespace useg::detail;
  constexpr int L = simd<Tp>::L;
  const conv_case c{3, 64, 70, 20, 18, 3};
  useg::rng r(900);
  const std::size_t xs = static_cast<std::size_t>(c.n) * c.cin * c.h * c.w, ys = static_cast<std::size_t>(c.n) * c.cout * c.h * c.w;
  auto x = random_vec<Tp>(xs, r), gy = random_vec<Tp>(ys, r);
  std::vector<double> xd(x.begin(), x.end()), gyd(gy.begin(), gy.end()), wd(static_cast<std::size_t>(c.cout) * c.cin * 9, 0.0);
  std::vector<double> rgx, rgw, rgb;
  ref_backward(c, xd, wd, gyd, rgx, rgw, rgb);
  const wino_geometry g(c.h, c.w, L, 4);
  const wino_wg_shape sh(c.cin, c.cout, L);
  const std::size_t plane = static_cast<std::size_t>(g.plane());
  std::vector<Tp> xq(static_cast<std::size_t>(c.n) * c.cin * plane), gq(static_cast<std::size_t>(c.n) * c.cout * plane);
  wino_pad<Tp>(g, static_cast<std::ptrdiff_t>(c.n) * c.cin, x.data(), xq.data());
  wino_gy_quarters<Tp>(g, static_cast<std::ptrdiff_t>(c.n) * c.cout, gy.data(), gq.data());
  const std::size_t gs = sh.ghat();
  std::vector<Tp> one_thread[2];
  for (bool ksplit : {false, true})
    for (int threads : {1, 2, 3}) {
      CAPTURE(ksplit);
      CAPTURE(threads);
      wino_wg_plan plan;
      plan.ksplit = ksplit;
      plan.tc = 5 * L;
      std::vector<Tp> Gh(gs, Tp(0)), scratch(plan.scratch(sh), Tp(std::nan(""))), gw(wd.size(), Tp(0));
      wino_weight_grad_accumulate<Tp>(g, c.n, c.cin, c.cout, sh, xq.data(), gq.data(), Gh.data(), plan, scratch.data(), threads);
      wino_weight_grad_finish<Tp>(c.cin, c.cout, sh, Gh.data(), gw.data());
      check_close(gw, rgw, std::sqrt(static_cast<double>(c.n) * c.h * c.w), ksplit ? "K-split" : "shared");
      if (threads == 1)
        one_thread[ksplit] = gw;
      else
        CHECK(gw == one_thread[ksplit]);
    }
}

TEST_CASE_TEMPLATE("direct 3x3 weight gradient read in place (widths of whole vectors): row chunks, 1-3 threads, naive loops",
                   Tp, float, double) {
  // Widths that are a whole number of vectors (16 for float, 8 for double, and multiples) take the
  // direct weight gradient that reads x and gy in place: each thread pads the rows of its current
  // input channel that a chunk reads into its own buffer. Chunks are whole images (several per
  // chunk: 2×3→5 at 70×16) or row ranges of one image (7→40 at 120×32: 102 + 18 rows a chunk for
  // float, 51 + 51 + 18 for double), one row high (1×48), one vector wide (16 for float), output
  // channels off the blocks of 3, input channels that the threads' pair ranges split mid-channel
  // (3 threads), a 64-channel input with a narrow output (still direct). The workspace is
  // poisoned with NaN first, so a buffer entry read before it is written shows. Every thread
  // count must give the one-thread result bit for bit.
  using Bk = cpu_backend<Tp>;
  std::uint64_t seed = 950;
  for (const conv_case& c : {conv_case{2, 3, 5, 70, 16, 3}, conv_case{2, 7, 40, 120, 32, 3}, conv_case{3, 4, 6, 1, 48, 3},
                             conv_case{2, 9, 7, 5, 16, 3}, conv_case{1, 64, 20, 33, 64, 3}, conv_case{4, 5, 16, 8, 32, 3}}) {
    CAPTURE(c.n);
    CAPTURE(c.cin);
    CAPTURE(c.cout);
    CAPTURE(c.h);
    CAPTURE(c.w);
    REQUIRE(c.w % useg::detail::simd<Tp>::L == 0);
    useg::rng r(++seed);
    const std::size_t xs = static_cast<std::size_t>(c.n) * c.cin * c.h * c.w, ys = static_cast<std::size_t>(c.n) * c.cout * c.h * c.w;
    const std::size_t ws = static_cast<std::size_t>(c.cout) * c.cin * 9;
    auto x = random_vec<Tp>(xs, r), gy = random_vec<Tp>(ys, r);
    std::vector<double> xd(x.begin(), x.end()), gyd(gy.begin(), gy.end()), wd(ws, 0.0), rgx, rgw, rgb;
    ref_backward(c, xd, wd, gyd, rgx, rgw, rgb);
    for (auto& v : rgw) v += 0.5;
    for (auto& v : rgb) v -= 0.25;
    const conv_desc d{c.n, c.cin, c.cout, c.h, c.w, 3};
    std::vector<Tp> one_gw, one_gb;
    for (int threads : {1, 2, 3}) {
      CAPTURE(threads);
      context<Bk> ctx(threads);
      Tp* poison = ctx.workspace(xs + ys);
      std::fill(poison, poison + xs + ys, Tp(std::nan("")));
      std::vector<Tp> gw(ws, Tp(0.5)), gb(static_cast<std::size_t>(c.cout), Tp(-0.25));
      ops<Bk>::conv2d_backward_weights(ctx, d, x.data(), gy.data(), gw.data(), gb.data());
      const double pix = std::sqrt(static_cast<double>(c.n) * c.h * c.w);
      check_close(gw, rgw, pix, "weights");
      check_close(gb, rgb, pix, "bias");
      if (threads == 1) {
        one_gw = gw;
        one_gb = gb;
      } else {
        CHECK(gw == one_gw);
        CHECK(gb == one_gb);
      }
    }
  }
  context<cpu_backend<Tp>> reset(1);
}

TEST_CASE_TEMPLATE("conv2d_forward_relu_add: the residual added as outputs are stored equals relu(conv) + residual",
                   Tp, float, double) {
  // Every forward path: F(4×4,3×3) (whole and partial vectors, streamed output), F(2×2,3×3) in
  // the quarter layout and in the dense one (runs across rows), the fused small-plane path, 1×1,
  // the direct kernels (fewer than 8 input channels, 5×5), on one and two threads. The sum is
  // one addition either way, so the results are bit-identical.
  using Bk = cpu_backend<Tp>;
  std::uint64_t seed = 700;
  for (int threads : {1, 2}) {
    for (const conv_case& c : {conv_case{1, 8, 16, 64, 48, 3}, conv_case{2, 8, 9, 37, 61, 3}, conv_case{1, 16, 64, 128, 128, 3},
                               conv_case{3, 13, 21, 37, 29, 3}, conv_case{5, 8, 9, 8, 8, 3}, conv_case{3, 8, 16, 4, 4, 3},
                               conv_case{1, 16, 24, 16, 16, 3}, conv_case{2, 5, 7, 9, 11, 1}, conv_case{2, 3, 8, 10, 12, 3},
                               conv_case{1, 4, 6, 9, 7, 5}}) {
      CAPTURE(threads);
      CAPTURE(c.n);
      CAPTURE(c.cin);
      CAPTURE(c.cout);
      CAPTURE(c.h);
      CAPTURE(c.w);
      CAPTURE(c.k);
      useg::rng g(++seed);
      const std::size_t xs = static_cast<std::size_t>(c.n) * c.cin * c.h * c.w;
      const std::size_t ys = static_cast<std::size_t>(c.n) * c.cout * c.h * c.w;
      auto x = random_vec<Tp>(xs, g), wt = random_vec<Tp>(static_cast<std::size_t>(c.cout) * c.cin * c.k * c.k, g);
      auto b = random_vec<Tp>(static_cast<std::size_t>(c.cout), g), res = random_vec<Tp>(ys, g);
      const conv_desc d{c.n, c.cin, c.cout, c.h, c.w, c.k};
      context<Bk> ctx(threads);
      std::vector<Tp> y(ys), fused(ys, Tp(7));
      ops<Bk>::conv2d_forward_relu(ctx, d, x.data(), wt.data(), b.data(), y.data());
      ops<Bk>::conv2d_forward_relu_add(ctx, d, x.data(), wt.data(), b.data(), res.data(), fused.data());
      std::size_t diff = 0, negative = 0;
      for (std::size_t i = 0; i < ys; ++i) {
        diff += fused[i] != res[i] + y[i];
        negative += y[i] < 0;
      }
      CHECK(diff == 0);
      CHECK(negative == 0);
    }
  }
  context<Bk> reset(1);
}

TEST_CASE_TEMPLATE("conv2d_forward_concat: two inputs read in place equal the convolution of their concatenation "
                   "(1×1, Winograd F(4×4) and F(2×2), direct)",
                   Tp, float, double) {
  // Same channel order, same sums: bit-identical, with and without the ReLU. 1×1: pixel counts
  // off the register blocks, channel splits off the blocks. 3×3: F(4×4,3×3) with a tile row of
  // whole, partial, half and quarter vectors; F(2×2,3×3) in the quarter and dense layouts and
  // the fused small-plane path; 160×160 × 64 channels runs in image groups {2, 1} where
  // F(2×2,3×3) is chosen (the winograd2 run); the direct kernels (fewer than 8 input channels,
  // 5×5). One and two threads.
  using Bk = cpu_backend<Tp>;
  std::uint64_t seed = 800;
  for (int threads : {1, 2})
    for (const auto& [n, ca, cb, cout, h, w, k] :
         {std::array{1, 16, 16, 16, 64, 64, 1}, std::array{2, 3, 5, 9, 7, 11, 1}, std::array{3, 1, 8, 8, 13, 5, 1},
          std::array{1, 32, 16, 24, 128, 96, 1}, std::array{1, 8, 8, 16, 64, 48, 3}, std::array{2, 4, 5, 9, 37, 61, 3},
          std::array{1, 16, 8, 16, 128, 128, 3}, std::array{8, 8, 8, 8, 16, 16, 3}, std::array{2, 8, 8, 8, 32, 32, 3},
          std::array{3, 5, 8, 21, 37, 29, 3}, std::array{5, 4, 4, 9, 8, 8, 3}, std::array{3, 4, 4, 16, 4, 4, 3},
          std::array{1, 8, 16, 24, 16, 16, 3}, std::array{3, 24, 40, 8, 160, 160, 3}, std::array{2, 1, 2, 8, 10, 12, 3},
          std::array{1, 2, 2, 6, 9, 7, 5}}) {
      CAPTURE(threads);
      CAPTURE(n);
      CAPTURE(ca);
      CAPTURE(cb);
      CAPTURE(h);
      CAPTURE(w);
      CAPTURE(k);
      useg::rng g(++seed);
      const std::size_t hw = static_cast<std::size_t>(h) * w;
      auto a = random_vec<Tp>(n * ca * hw, g), b = random_vec<Tp>(n * cb * hw, g);
      auto wt = random_vec<Tp>(static_cast<std::size_t>(cout) * (ca + cb) * k * k, g), bias = random_vec<Tp>(cout, g);
      context<Bk> ctx(threads);
      std::vector<Tp> cat(n * (ca + cb) * hw), y(n * cout * hw), yc(n * cout * hw, Tp(5));
      ops<Bk>::concat_channels(ctx, n, ca, cb, hw, a.data(), b.data(), cat.data());
      const conv_desc d{n, ca + cb, cout, h, w, k};
      ops<Bk>::conv2d_forward(ctx, d, cat.data(), wt.data(), bias.data(), y.data());
      ops<Bk>::conv2d_forward_concat(ctx, d, a.data(), ca, b.data(), wt.data(), bias.data(), yc.data());
      CHECK(yc == y);
      ops<Bk>::conv2d_forward_relu(ctx, d, cat.data(), wt.data(), bias.data(), y.data());
      std::fill(yc.begin(), yc.end(), Tp(5));
      ops<Bk>::conv2d_forward_concat(ctx, d, a.data(), ca, b.data(), wt.data(), bias.data(), yc.data(), true);
      CHECK(yc == y);
    }
  context<Bk> ctx(1);
  std::vector<Tp> x(64, Tp(1)), wt(9 * 4, Tp(1)), y(64);
  // An empty first or second input is refused.
  CHECK_THROWS_AS(ops<Bk>::conv2d_forward_concat(ctx, conv_desc{1, 4, 1, 4, 4, 3}, x.data(), 0, x.data(), wt.data(), nullptr,
                                                 y.data()),
                  shape_error);
  CHECK_THROWS_AS(ops<Bk>::conv2d_forward_concat(ctx, conv_desc{1, 4, 1, 4, 4, 1}, x.data(), 4, x.data(), wt.data(), nullptr,
                                                 y.data()),
                  shape_error);
}

TEST_CASE_TEMPLATE("conv2d_forward_upsampled: Winograd F(4×4) reading its input through the nearest ×2 upsampling "
                   "equals the convolution of the upsampled input",
                   Tp, float, double) {
  // Same values into the same transforms: bit-identical, with and without the ReLU. Upsampled
  // widths of whole and partial vectors and of a partial last tile (w/2 odd), several images,
  // one and two threads; the shapes F(4×4,3×3) does not take this way are refused.
  using Bk = cpu_backend<Tp>;
  using O = ops<Bk>;
  std::uint64_t seed = 900;
  int ran = 0;
  for (int threads : {1, 2})
    for (const auto& [n, cin, cout, hl, wl] : {std::array{1, 8, 16, 32, 32}, std::array{2, 12, 9, 19, 31}, std::array{1, 16, 8, 64, 48},
                                               std::array{3, 8, 8, 24, 33}, std::array{1, 32, 16, 16, 40}}) {
      CAPTURE(threads);
      CAPTURE(n);
      CAPTURE(hl);
      CAPTURE(wl);
      const conv_desc d{n, cin, cout, 2 * hl, 2 * wl, 3};
      if (!O::conv_reads_upsampled(d)) continue;  // USEG_CPU_WINOGRAD=2 or 0 runs, or too few pixels
      ++ran;
      useg::rng g(++seed);
      const std::size_t lo = static_cast<std::size_t>(hl) * wl, up = 4 * lo;
      auto x = random_vec<Tp>(n * cin * lo, g);
      auto wt = random_vec<Tp>(static_cast<std::size_t>(cout) * cin * 9, g), bias = random_vec<Tp>(cout, g);
      context<Bk> ctx(threads);
      std::vector<Tp> xu(n * cin * up), y(n * cout * up), yu(n * cout * up, Tp(5));
      O::upsample2x_forward(ctx, static_cast<std::size_t>(n) * cin, hl, wl, x.data(), xu.data());
      O::conv2d_forward(ctx, d, xu.data(), wt.data(), bias.data(), y.data());
      O::conv2d_forward_upsampled(ctx, d, x.data(), wt.data(), bias.data(), yu.data());
      CHECK(yu == y);
      O::conv2d_forward_relu(ctx, d, xu.data(), wt.data(), bias.data(), y.data());
      std::fill(yu.begin(), yu.end(), Tp(5));
      O::conv2d_forward_upsampled(ctx, d, x.data(), wt.data(), bias.data(), yu.data(), true);
      CHECK(yu == y);
    }
  if (detail::wino_mode() == 4 || detail::wino_mode() == 1) CHECK(ran == 10);  // (1: the default, F(4×4) where it pays)
  else CHECK(ran == 0);
  // Planes a tile row does not fill (16 wide: F(4×4,3×3) with four tile rows per vector, or
  // F(2×2,3×3)), an odd size, 1×1: refused.
  context<Bk> ctx(1);
  std::vector<Tp> x(8 * 64 * 64, Tp(1)), wt(8 * 8 * 9, Tp(1)), y(8 * 128 * 128);
  for (const conv_desc& d : {conv_desc{8, 8, 8, 16, 16, 3}, conv_desc{1, 8, 8, 63, 64, 3}, conv_desc{1, 8, 8, 64, 64, 1}}) {
    CHECK_FALSE(O::conv_reads_upsampled(d));
    CHECK_THROWS_AS(O::conv2d_forward_upsampled(ctx, d, x.data(), wt.data(), nullptr, y.data()), shape_error);
  }
}

TEST_CASE("conv kernels: multi-threaded runs give the single-threaded results") {
  using Bk = cpu_backend<float>;
  // The direct weight gradient, then the Winograd one (>= 64 channels) over several tile chunks.
  // F(4×4,3×3) with few tasks: the output channels split between the threads (one 16×16 image: one
  // tile vector; three images: one task), and tasks that split evenly (64×64, 32×32).
  for (const conv_case c : {conv_case{3, 13, 21, 37, 29, 3}, conv_case{2, 64, 70, 40, 60, 3}, conv_case{7, 64, 64, 8, 8, 3},
                            conv_case{1, 16, 40, 16, 16, 3}, conv_case{3, 24, 16, 16, 16, 3}, conv_case{1, 8, 24, 64, 64, 3},
                            conv_case{2, 16, 16, 32, 32, 3}, conv_case{8, 32, 32, 8, 8, 3}, conv_case{1, 256, 64, 16, 16, 3}}) {
    CAPTURE(c.cin);
    useg::rng g(5);
    const std::size_t xs = static_cast<std::size_t>(c.n) * c.cin * c.h * c.w;
    const std::size_t ys = static_cast<std::size_t>(c.n) * c.cout * c.h * c.w;
    const std::size_t ws = static_cast<std::size_t>(c.cout) * c.cin * 9;
    auto x = random_vec<float>(xs, g), wt = random_vec<float>(ws, g), gy = random_vec<float>(ys, g);
    const conv_desc d{c.n, c.cin, c.cout, c.h, c.w, c.k};
    std::vector<float> y[2], gx[2], gw[2];
    for (int threads : {1, 2}) {
      context<Bk> ctx(threads);
      auto& Y = y[threads - 1];
      auto& GX = gx[threads - 1];
      auto& GW = gw[threads - 1];
      Y.assign(ys, 0);
      GX.assign(xs, 0);
      GW.assign(ws, 0);
      ops<Bk>::conv2d_forward(ctx, d, x.data(), wt.data(), nullptr, Y.data());
      ops<Bk>::conv2d_backward_data(ctx, d, wt.data(), gy.data(), GX.data());
      ops<Bk>::conv2d_backward_weights(ctx, d, x.data(), gy.data(), GW.data(), nullptr);
    }
    context<Bk> reset(1);
    CHECK(y[0] == y[1]);
    CHECK(gx[0] == gx[1]);
    CHECK(gw[0] == gw[1]);
  }
}

TEST_CASE("conv kernels: a batch processed in image groups gives the per-image results") {
  // 64 channels at 160x160: the padded copies of two images fit the group budget, three do not,
  // so the batch runs as groups {2, 1} (forward: Winograd; weight gradient: the direct kernel).
  using Bk = cpu_backend<float>;
  const int n = 3, cin = 64, cout = 8, h = 160, w = 160;
  const std::size_t xi = static_cast<std::size_t>(cin) * h * w, yi = static_cast<std::size_t>(cout) * h * w;
  const std::size_t ws = static_cast<std::size_t>(cout) * cin * 9;
  useg::rng g(11);
  auto x = random_vec<float>(n * xi, g), wt = random_vec<float>(ws, g), gy = random_vec<float>(n * yi, g);
  context<Bk> ctx(2);
  std::vector<float> y(n * yi), gw(ws, 0.f), y1(yi), gw1(ws, 0.f);
  ops<Bk>::conv2d_forward(ctx, conv_desc{n, cin, cout, h, w, 3}, x.data(), wt.data(), nullptr, y.data());
  ops<Bk>::conv2d_backward_weights(ctx, conv_desc{n, cin, cout, h, w, 3}, x.data(), gy.data(), gw.data(), nullptr);
  int diff = 0;
  for (int i = 0; i < n; ++i) {
    ops<Bk>::conv2d_forward(ctx, conv_desc{1, cin, cout, h, w, 3}, x.data() + i * xi, wt.data(), nullptr, y1.data());
    for (std::size_t j = 0; j < yi; ++j) diff += y1[j] != y[i * yi + j];
    ops<Bk>::conv2d_backward_weights(ctx, conv_desc{1, cin, cout, h, w, 3}, x.data() + i * xi, gy.data() + i * yi,
                                     gw1.data(), nullptr);
  }
  CHECK(diff == 0);
  double worst = 0;
  for (std::size_t j = 0; j < ws; ++j) worst = std::max(worst, std::abs(static_cast<double>(gw[j]) - gw1[j]) / (1 + std::abs(gw1[j])));
  CHECK(worst < 1e-4);
}

TEST_CASE_TEMPLATE("Winograd outputs past wino_stream_min_bytes (non-temporal stores) equal the per-image results", Tp,
                   float, double) {
  // A batch whose output (forward) and input gradient (backward data) reach the streaming
  // threshold while one image's do not: the batch is written with non-temporal stores, each image
  // alone with plain ones, and the values must be the same bits. Widths 128 (every row's vectors
  // aligned) and 130 (rows start off the 64-byte grid: aligned and unaligned vectors mixed).
  using Bk = cpu_backend<Tp>;
  for (const int w : {128, 130}) {
    CAPTURE(w);
    const int n = 4, c = 16, h = 128;
    const std::size_t per = static_cast<std::size_t>(c) * h * w, ws = static_cast<std::size_t>(c) * c * 9;
    REQUIRE(n * per * sizeof(Tp) >= detail::wino_stream_min_bytes);
    REQUIRE(per * sizeof(Tp) < detail::wino_stream_min_bytes);
    useg::rng g(21);
    auto x = random_vec<Tp>(n * per, g), wt = random_vec<Tp>(ws, g), b = random_vec<Tp>(c, g);
    context<Bk> ctx(2);
    std::vector<Tp> y(n * per), gx(n * per), y1(per), gx1(per);
    ops<Bk>::conv2d_forward(ctx, conv_desc{n, c, c, h, w, 3}, x.data(), wt.data(), b.data(), y.data());
    ops<Bk>::conv2d_backward_data(ctx, conv_desc{n, c, c, h, w, 3}, wt.data(), x.data(), gx.data());
    std::size_t dy = 0, dx = 0;
    for (int i = 0; i < n; ++i) {
      ops<Bk>::conv2d_forward(ctx, conv_desc{1, c, c, h, w, 3}, x.data() + i * per, wt.data(), b.data(), y1.data());
      ops<Bk>::conv2d_backward_data(ctx, conv_desc{1, c, c, h, w, 3}, wt.data(), x.data() + i * per, gx1.data());
      for (std::size_t j = 0; j < per; ++j) {
        dy += y1[j] != y[i * per + j];
        dx += gx1[j] != gx[i * per + j];
      }
    }
    CHECK(dy == 0);
    CHECK(dx == 0);
  }
  context<Bk> reset(1);
}

TEST_CASE("Winograd packed weights: reused by the next convolution only when its weights are bit-identical") {
  // One context runs a sequence of convolutions (as the recurrent block does); each result must
  // equal a fresh context's (which always packs): same weights twice, the same buffer changed in
  // place, a copy at another address, the backward-data packing of the same weights, and a
  // workspace user in between.
  using Bk = cpu_backend<float>;
  useg::rng g(11);
  const conv_desc d{2, 16, 24, 13, 17, 3};
  const std::size_t xs = static_cast<std::size_t>(d.n) * d.cin * d.h * d.w, ys = static_cast<std::size_t>(d.n) * d.cout * d.h * d.w;
  auto x = random_vec<float>(xs, g), gy = random_vec<float>(ys, g), wt = random_vec<float>(static_cast<std::size_t>(d.cout) * d.cin * 9, g);
  context<Bk> ctx(1);
  auto forward_on = [&](context<Bk>& c, const std::vector<float>& w) {
    std::vector<float> y(ys);
    ops<Bk>::conv2d_forward(c, d, x.data(), w.data(), nullptr, y.data());
    return y;
  };
  auto forward = [&](const std::vector<float>& w) { return forward_on(ctx, w); };
  auto fresh_forward = [&](const std::vector<float>& w) {
    context<Bk> f(1);
    return forward_on(f, w);
  };
  CHECK(forward(wt) == fresh_forward(wt));
  CHECK(forward(wt) == fresh_forward(wt));  // reused
  wt[7] += 0.25f;                           // same address, other values
  CHECK(forward(wt) == fresh_forward(wt));
  const std::vector<float> copy = wt;  // other address, same values
  CHECK(forward(copy) == fresh_forward(wt));
  {
    std::vector<float> gx(xs), gx_fresh(xs);
    ops<Bk>::conv2d_backward_data(ctx, d, wt.data(), gy.data(), gx.data());
    context<Bk> f(1);
    ops<Bk>::conv2d_backward_data(f, d, wt.data(), gy.data(), gx_fresh.data());
    CHECK(gx == gx_fresh);
  }
  CHECK(forward(wt) == fresh_forward(wt));
  float* scratch = ctx.workspace(16);  // another user of the workspace scribbles over it
  std::fill(scratch, scratch + 16, 3.f);
  CHECK(forward(wt) == fresh_forward(wt));
  CHECK(ctx.workspace_size() > 0);
}

TEST_CASE("Winograd packed weights: the fingerprint of the weights tells every one-bit change apart") {
  // The key of the packed weights (context.hpp): equal bytes give equal fingerprints wherever
  // they are; flipping any one bit, dropping or adding a trailing byte changes it, and no two of
  // those changes collide.
  useg::rng g(5);
  std::vector<unsigned char> bytes(100);
  for (auto& b : bytes) b = static_cast<unsigned char>(g.uniform(0.0, 256.0));
  const auto fp = [](const std::vector<unsigned char>& v, std::size_t n) { return detail::fingerprint128(v.data(), n); };
  const detail::fingerprint base = fp(bytes, bytes.size());
  const std::vector<unsigned char> copy = bytes;
  CHECK(fp(copy, copy.size()) == base);
  std::vector<detail::fingerprint> seen{base};
  for (std::size_t i = 0; i < bytes.size(); ++i)
    for (int bit = 0; bit < 8; ++bit) {
      std::vector<unsigned char> v = bytes;
      v[i] = static_cast<unsigned char>(v[i] ^ (1u << bit));
      seen.push_back(fp(v, v.size()));
    }
  for (std::size_t n : {std::size_t(0), std::size_t(31), std::size_t(32), std::size_t(99)}) seen.push_back(fp(bytes, n));
  std::vector<unsigned char> longer = bytes;
  longer.push_back(0);
  seen.push_back(fp(longer, longer.size()));
  std::vector<std::pair<std::uint64_t, std::uint64_t>> keys;
  for (const auto& f : seen) keys.emplace_back(f.a, f.b);
  std::sort(keys.begin(), keys.end());
  CHECK(std::adjacent_find(keys.begin(), keys.end()) == keys.end());
  // Neither half alone collides either (each is a full 64-bit hash).
  std::vector<std::uint64_t> as, bs;
  for (const auto& f : seen) {
    as.push_back(f.a);
    bs.push_back(f.b);
  }
  std::sort(as.begin(), as.end());
  std::sort(bs.begin(), bs.end());
  CHECK(std::adjacent_find(as.begin(), as.end()) == as.end());
  CHECK(std::adjacent_find(bs.begin(), bs.end()) == bs.end());
}

TEST_CASE("Winograd packed weights: the fingerprint on several threads tells one-bit changes in every part apart") {
  // fingerprint128_mt (the key of large packed weights) cuts the range into one part per thread:
  // a bit flipped at either end of each part, or one byte less, changes it; the same bytes give
  // the same fingerprint on every call; on one thread, or below 256 KiB, it is fingerprint128.
  useg::rng g(6);
  std::vector<unsigned char> bytes((std::size_t(1) << 19) + 100);
  for (auto& b : bytes) b = static_cast<unsigned char>(g.uniform(0.0, 256.0));
  const std::size_t n = bytes.size();
  CHECK(detail::fingerprint128_mt(bytes.data(), n, 1) == detail::fingerprint128(bytes.data(), n));
  CHECK(detail::fingerprint128_mt(bytes.data(), 1000, 2) == detail::fingerprint128(bytes.data(), 1000));
  for (int threads : {2, 3, 4}) {
    INFO("threads " << threads);
    const detail::fingerprint base = detail::fingerprint128_mt(bytes.data(), n, threads);
    CHECK(detail::fingerprint128_mt(bytes.data(), n, threads) == base);
    std::vector<std::pair<std::uint64_t, std::uint64_t>> keys{{base.a, base.b}};
    const std::size_t chunk = (n / threads + 31) / 32 * 32;
    for (int k = 0; k < threads; ++k)
      for (std::size_t at : {chunk * k, std::min(n, chunk * (k + 1)) - 1}) {
        std::vector<unsigned char> v = bytes;
        v[at] = static_cast<unsigned char>(v[at] ^ 1u);
        const detail::fingerprint f = detail::fingerprint128_mt(v.data(), n, threads);
        keys.emplace_back(f.a, f.b);
      }
    const detail::fingerprint shorter = detail::fingerprint128_mt(bytes.data(), n - 1, threads);
    keys.emplace_back(shorter.a, shorter.b);
    std::sort(keys.begin(), keys.end());
    CHECK(std::adjacent_find(keys.begin(), keys.end()) == keys.end());
  }
}

namespace {
// Batch norm (+ ReLU) in double, straight from the definitions.
struct bn_ref {
  std::vector<double> y, gx, ggamma, gbeta, mean, invstd, rmean, rvar;
};
bn_ref ref_bn(int n, int c, int hw, const std::vector<double>& x, const std::vector<double>& gamma,
              const std::vector<double>& beta, const std::vector<double>& gz, bool relu, double eps, double mom) {
  bn_ref r;
  const double N = static_cast<double>(n) * hw;
  r.y.resize(x.size());
  r.gx.resize(x.size());
  for (int ch = 0; ch < c; ++ch) {
    double m = 0, v = 0;
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < hw; ++k) m += x[(static_cast<std::size_t>(i) * c + ch) * hw + k];
    m /= N;
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < hw; ++k) {
        const double t = x[(static_cast<std::size_t>(i) * c + ch) * hw + k] - m;
        v += t * t;
      }
    const double is = 1.0 / std::sqrt(v / N + eps);
    r.mean.push_back(m);
    r.invstd.push_back(is);
    r.rmean.push_back((1 - mom) * 0.25 + mom * m);
    r.rvar.push_back((1 - mom) * 1.5 + mom * v / (N - 1));
    double sg = 0, sgx = 0;
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < hw; ++k) {
        const std::size_t o = (static_cast<std::size_t>(i) * c + ch) * hw + k;
        const double xh = (x[o] - m) * is;
        const double pre = gamma[ch] * xh + beta[ch];
        r.y[o] = relu ? std::max(pre, 0.0) : pre;
        const double g = (!relu || pre > 0) ? gz[o] : 0.0;
        sg += g;
        sgx += g * xh;
      }
    r.gbeta.push_back(sg);
    r.ggamma.push_back(sgx);
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < hw; ++k) {
        const std::size_t o = (static_cast<std::size_t>(i) * c + ch) * hw + k;
        const double xh = (x[o] - m) * is;
        const double pre = gamma[ch] * xh + beta[ch];
        const double g = (!relu || pre > 0) ? gz[o] : 0.0;
        r.gx[o] = gamma[ch] * is / N * (N * g - sg - xh * sgx);
      }
  }
  return r;
}
}  // namespace

TEST_CASE_TEMPLATE("batch norm kernels (plain and fused with ReLU, train) match the definitions", Tp, float, double) {
  using Bk = cpu_backend<Tp>;
  context<Bk> ctx(1);
  for (auto [n, c, hw] : std::vector<std::tuple<int, int, int>>{{2, 3, 5}, {1, 4, 1031}, {3, 2, 2500}, {4, 5, 17}}) {
    for (bool relu : {false, true}) {
      useg::rng g(static_cast<std::uint64_t>(n * 100 + c * 10 + hw + relu));
      const std::size_t sz = static_cast<std::size_t>(n) * c * hw;
      auto x = random_vec<Tp>(sz, g), gz = random_vec<Tp>(sz, g), gamma = random_vec<Tp>(c, g), beta = random_vec<Tp>(c, g);
      for (auto& v : x) v = static_cast<Tp>(v * 3 + 5);  // an offset mean: the variance must not cancel
      std::vector<double> xd(x.begin(), x.end()), gzd(gz.begin(), gz.end()), gd(gamma.begin(), gamma.end()),
          bd(beta.begin(), beta.end());
      const bn_desc d{n, c, static_cast<std::size_t>(hw), 1e-5, 0.1};
      const auto r = ref_bn(n, c, hw, xd, gd, bd, gzd, relu, d.eps, d.momentum);
      std::vector<Tp> y(sz), rm(c, Tp(0.25)), rv(c, Tp(1.5)), sm(c), si(c), gx(sz, Tp(9)), gg(c, Tp(1)), gb(c, Tp(-1));
      if (relu)
        ops<Bk>::batch_norm_relu_forward_train(ctx, d, x.data(), gamma.data(), beta.data(), rm.data(), rv.data(), sm.data(),
                                               si.data(), y.data());
      else
        ops<Bk>::batch_norm_forward_train(ctx, d, x.data(), gamma.data(), beta.data(), rm.data(), rv.data(), sm.data(),
                                          si.data(), y.data());
      const std::string what = std::string(relu ? "bn+relu " : "bn ") + std::to_string(n) + "x" + std::to_string(c) + "x" +
                                std::to_string(hw);
      check_close(y, r.y, 1.0, what + " forward");
      check_close(sm, r.mean, 1.0, what + " mean");
      check_close(si, r.invstd, 1.0, what + " invstd");
      check_close(rm, r.rmean, 1.0, what + " running mean");
      check_close(rv, r.rvar, 1.0, what + " running var");
      if (relu)
        ops<Bk>::batch_norm_relu_backward(ctx, d, true, x.data(), y.data(), gz.data(), gamma.data(), sm.data(), si.data(),
                                          gx.data(), gg.data(), gb.data());
      else
        ops<Bk>::batch_norm_backward(ctx, d, true, x.data(), gz.data(), gamma.data(), sm.data(), si.data(), gx.data(),
                                     gg.data(), gb.data());
      std::vector<double> rgg = r.ggamma, rgb = r.gbeta;
      for (auto& v : rgg) v += 1;
      for (auto& v : rgb) v -= 1;
      const double terms = std::sqrt(static_cast<double>(n) * hw);
      check_close(gx, r.gx, 1.0, what + " backward data");
      check_close(gg, rgg, terms, what + " backward gamma");
      check_close(gb, rgb, terms, what + " backward beta");
      if (relu) {
        // The mask recomputed from x (no output at hand) equals the output's z > 0: the same
        // gradients to the last bit, written in place over x.
        std::vector<Tp> gx2 = x, gg2(c, Tp(1)), gb2(c, Tp(-1));
        ops<Bk>::batch_norm_relu_backward_from_input(ctx, d, gx2.data(), gz.data(), gamma.data(), beta.data(), sm.data(),
                                                     si.data(), gx2.data(), gg2.data(), gb2.data());
        CHECK(gx2 == gx);
        CHECK(gg2 == gg);
        CHECK(gb2 == gb);
        std::size_t clipped = 0;
        for (Tp v : y) clipped += v == Tp(0);
        CHECK(clipped > 0);  // the mask matters
        CHECK(clipped < sz);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ max pool
template <class TT>
void check_maxpool(int planes, int h, int w, useg::rng& g) {
  const int oh = h / 2, ow = w / 2;
  const std::size_t nx = static_cast<std::size_t>(planes) * h * w, ny = static_cast<std::size_t>(planes) * oh * ow;
  // Few distinct values (ties), some NaNs, negative zero.
  std::vector<TT> x(nx), gy(ny), y(ny, TT(-7)), gx(nx, TT(-7));
  for (auto& v : x) {
    const double u = g.uniform(0, 1);
    v = u < 0.05 ? TT(NAN) : u < 0.1 ? TT(-0.0) : static_cast<TT>(std::floor(g.uniform(-3, 3)));
  }
  for (std::size_t i = 0; i < ny; ++i) gy[i] = static_cast<TT>(1 + i);
  context<cpu_backend<TT>> ctx;
  ops<cpu_backend<TT>>::maxpool2x2_forward(ctx, static_cast<std::size_t>(planes), h, w, x.data(), y.data());
  ops<cpu_backend<TT>>::maxpool2x2_backward(ctx, static_cast<std::size_t>(planes), h, w, x.data(), gy.data(), gx.data());
  // Reference: PyTorch's scan (take a value when greater than the maximum so far, or NaN).
  std::vector<TT> gref(nx, TT(0));
  int bad_y = 0, bad_g = 0;
  for (int p = 0; p < planes; ++p)
    for (int i = 0; i < oh; ++i)
      for (int j = 0; j < ow; ++j) {
        std::size_t best = (static_cast<std::size_t>(p) * h + 2 * i) * w + 2 * j;
        const std::size_t cand[3] = {best + 1, best + w, best + w + 1};
        TT m = x[best];
        for (std::size_t c : cand)
          if (x[c] > m || std::isnan(x[c])) {
            m = x[c];
            best = c;
          }
        const TT got = y[(static_cast<std::size_t>(p) * oh + i) * ow + j];
        if (!(std::isnan(m) ? std::isnan(got) : got == m && std::signbit(got) == std::signbit(m))) ++bad_y;
        gref[best] = gy[(static_cast<std::size_t>(p) * oh + i) * ow + j];
      }
  for (std::size_t i = 0; i < nx; ++i) bad_g += gx[i] != gref[i];
  CHECK_MESSAGE(bad_y == 0, "forward ", planes, "x", h, "x", w);
  CHECK_MESSAGE(bad_g == 0, "backward ", planes, "x", h, "x", w);
}

TEST_CASE_TEMPLATE("max pool 2x2: vector kernels against PyTorch's scan (ties, NaN, -0, odd sizes, vector tails)", TT,
                   float, double) {
  useg::rng g(77);
  for (int h : {1, 2, 3, 5, 8})
    for (int w : {1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 34, 48, 67}) check_maxpool<TT>(3, h, w, g);
  check_maxpool<TT>(40, 34, 66, g);  // large enough for the parallel loop
}

TEST_CASE_TEMPLATE("nearest 2x upsampling: vector kernel against the definition (vector tails, odd sizes)", TT, float,
                   double) {
  useg::rng g(78);
  for (int h : {1, 3, 4})
    for (int w : {1, 7, 15, 16, 17, 33, 40}) {
      const int planes = 3;
      auto x = random_vec<TT>(static_cast<std::size_t>(planes) * h * w, g);
      std::vector<TT> y(static_cast<std::size_t>(planes) * 4 * h * w, TT(-9));
      context<cpu_backend<TT>> ctx;
      ops<cpu_backend<TT>>::upsample2x_forward(ctx, planes, h, w, x.data(), y.data());
      int bad = 0;
      for (int p = 0; p < planes; ++p)
        for (int i = 0; i < 2 * h; ++i)
          for (int j = 0; j < 2 * w; ++j)
            bad += y[(static_cast<std::size_t>(p) * 2 * h + i) * 2 * w + j] != x[(static_cast<std::size_t>(p) * h + i / 2) * w + j / 2];
      CHECK_MESSAGE(bad == 0, h, "x", w);
    }
}

TEST_CASE_TEMPLATE("channel concat and split: threaded copies against the definition (parts, null halves, odd sizes)",
                   TT, float, double) {
  useg::rng g(79);
  context<cpu_backend<TT>> ctx;
  using O = ops<cpu_backend<TT>>;
  // Small (one thread) and large enough for the threaded copy, with ranges that end inside
  // images and inside either half.
  for (auto [n, ca, cb, hw] : {std::tuple{2, 2, 3, 9}, std::tuple{3, 5, 7, 4099}, std::tuple{5, 1, 13, 2311},
                               std::tuple{3, 0, 6, 4096}, std::tuple{1, 9, 4, 10007}}) {
    const std::size_t sa = static_cast<std::size_t>(ca) * hw, sb = static_cast<std::size_t>(cb) * hw, sy = sa + sb;
    const auto a = random_vec<TT>(n * sa, g), b = random_vec<TT>(n * sb, g);
    std::vector<TT> want(n * sy);
    for (int i = 0; i < n; ++i)
      for (std::size_t k = 0; k < sy; ++k) want[i * sy + k] = k < sa ? a[i * sa + k] : b[i * sb + k - sa];
    std::vector<TT> y(n * sy, TT(-7));
    O::concat_channels(ctx, n, ca, cb, hw, a.data(), b.data(), y.data());
    CHECK_MESSAGE(y == want, n, " ", ca, " ", cb, " ", hw);
    // One half at a time, each leaving the other as it was.
    std::vector<TT> z(n * sy, TT(-7));
    O::concat_channels(ctx, n, ca, cb, hw, nullptr, b.data(), z.data());
    int untouched = 0;
    for (int i = 0; i < n; ++i)
      for (std::size_t k = 0; k < sa; ++k) untouched += z[i * sy + k] == TT(-7);
    CHECK(untouched == static_cast<int>(n * sa));
    O::concat_channels(ctx, n, ca, cb, hw, a.data(), nullptr, z.data());
    CHECK(z == want);
    std::vector<TT> ga(n * sa, TT(-7)), gb(n * sb, TT(-7));
    O::split_channels(ctx, n, ca, cb, hw, want.data(), ga.data(), gb.data());
    CHECK(ga == a);
    CHECK(gb == b);
    std::vector<TT> gb2(n * sb, TT(-7));
    O::split_channels(ctx, n, ca, cb, hw, want.data(), nullptr, gb2.data());
    CHECK(gb2 == b);
  }
}

TEST_CASE_TEMPLATE("copy and fill: threaded for large blocks, exact at every size (odd lengths, part boundaries)", TT,
                   float, double) {
  useg::rng g(83);
  context<cpu_backend<TT>> ctx;
  using O = ops<cpu_backend<TT>>;
  const std::size_t big = O::parallel_bytes / sizeof(TT);
  for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(1000), big - 1, big, big + 7, 3 * big + 5}) {
    const auto src = random_vec<TT>(n + 2, g);
    std::vector<TT> dst(n + 2, TT(-7));
    O::copy(dst.data() + 1, src.data() + 1, n);
    CHECK(dst.front() == TT(-7));  // nothing outside [1, n + 1) written
    CHECK(dst.back() == TT(-7));
    CHECK(std::equal(dst.begin() + 1, dst.end() - 1, src.begin() + 1));
    for (TT v : {TT(0), TT(2.5)}) {
      std::vector<TT> f(n + 2, TT(-7));
      O::fill(f.data() + 1, n, v);
      CHECK(f.front() == TT(-7));
      CHECK(f.back() == TT(-7));
      CHECK(std::count(f.begin() + 1, f.end() - 1, v) == static_cast<std::ptrdiff_t>(n));
    }
  }
}
