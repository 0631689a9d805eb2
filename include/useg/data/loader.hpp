// useg/data/loader.hpp — training batches from a slice_set: normalization, seeded augmentation,
// oversampling of tumour slices, and background threads that prepare the next batches while the
// model computes (at most `prefetch` batches wait in memory).
//
// Everything random is a pure function of (seed, epoch, position in the epoch), so an epoch's
// batches are the same whatever the number of worker threads and after a resume.
#pragma once
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <xtensor/xtensor.hpp>

#include "useg/core/error.hpp"
#include "useg/core/rng.hpp"
#include "useg/data/lgg.hpp"

namespace useg::data {

/// Intensity normalization of the model input.
enum class normalization {
  scale,  ///< x / 255, in [0, 1]
  volume  ///< (x - mean) / std per channel over the patient's volume
};

inline normalization parse_normalization(const std::string& s) {
  if (s == "scale" || s == "01") return normalization::scale;
  if (s == "volume" || s == "standardize") return normalization::volume;
  throw config_error("unknown normalization '" + s + "' (expected scale or volume)");
}
inline const char* to_string(normalization n) { return n == normalization::scale ? "scale" : "volume"; }

/// Random augmentation ranges (training only).
struct augment_options {
  bool enabled = false;
  double flip_h = 0.5;       ///< probability of a left-right flip
  double flip_v = 0.0;       ///< probability of an up-down flip
  double rotate_deg = 15.0;  ///< rotation uniform in ±rotate_deg degrees
  double scale = 0.05;       ///< zoom uniform in [1 - scale, 1 + scale]
  double brightness = 0.1;   ///< intensity shift uniform in ±brightness (in [0, 1] units)
  double contrast = 0.1;     ///< intensity factor uniform in [1 - contrast, 1 + contrast]
};

/// One draw of the augmentation.
struct augment_params {
  bool flip_h = false, flip_v = false;
  double angle_deg = 0, scale = 1, brightness = 0, contrast = 1;
  bool identity() const { return !flip_h && !flip_v && angle_deg == 0 && scale == 1 && brightness == 0 && contrast == 1; }
};

inline augment_params draw_augment(const augment_options& o, rng& g) {
  augment_params p;
  if (!o.enabled) return p;
  // draw every value unconditionally: the stream does not depend on which options are zero
  const double u_fh = g.uniform(), u_fv = g.uniform(), u_r = g.uniform(), u_s = g.uniform(), u_b = g.uniform(), u_c = g.uniform();
  p.flip_h = u_fh < o.flip_h;
  p.flip_v = u_fv < o.flip_v;
  p.angle_deg = (2 * u_r - 1) * o.rotate_deg;
  p.scale = 1 + (2 * u_s - 1) * o.scale;
  p.brightness = (2 * u_b - 1) * o.brightness;
  p.contrast = 1 + (2 * u_c - 1) * o.contrast;
  return p;
}

/// Apply `p` to one slice: img (h, w, c) 8-bit, mask (h, w) 0/1 → x (c, h, w) in [0, 1] and
/// y (h, w) in {0, 1}. Geometry: flips, then rotation and zoom about the image center (bilinear
/// for the image, nearest for the mask, zero outside). Intensity: x·contrast + brightness,
/// clipped to [0, 1].
inline void augment_slice(const std::uint8_t* img, const std::uint8_t* mask, int h, int w, int c, const augment_params& p, float* x,
                          float* y) {
  const std::size_t H = static_cast<std::size_t>(h), W = static_cast<std::size_t>(w), C = static_cast<std::size_t>(c);
  const double kPi = 3.14159265358979323846;
  const double a = p.angle_deg * kPi / 180.0;
  const double ca = std::cos(a) / p.scale, sa = std::sin(a) / p.scale;
  const double cy = (h - 1) / 2.0, cx = (w - 1) / 2.0;
  const bool geometric = p.angle_deg != 0 || p.scale != 1;
  for (std::size_t oy = 0; oy < H; ++oy)
    for (std::size_t ox = 0; ox < W; ++ox) {
      // output pixel -> (flipped) -> source coordinates through the inverse rotation/zoom
      double dy = static_cast<double>(p.flip_v ? H - 1 - oy : oy), dx = static_cast<double>(p.flip_h ? W - 1 - ox : ox);
      double sy = dy, sx = dx;
      if (geometric) {
        const double ry = dy - cy, rx = dx - cx;
        sy = cy + ca * ry - sa * rx;
        sx = cx + sa * ry + ca * rx;
      }
      const std::size_t o = oy * W + ox;
      // mask: nearest
      const long my = std::lround(sy), mx = std::lround(sx);
      y[o] = (my >= 0 && mx >= 0 && my < h && mx < w) ? static_cast<float>(mask[static_cast<std::size_t>(my) * W + static_cast<std::size_t>(mx)]) : 0.f;
      // image: bilinear, zero outside
      const double fy = std::floor(sy), fx = std::floor(sx);
      const double ay = sy - fy, ax = sx - fx;
      const long y0 = static_cast<long>(fy), x0 = static_cast<long>(fx);
      for (std::size_t k = 0; k < C; ++k) {
        auto at = [&](long yy, long xx) -> double {
          if (yy < 0 || xx < 0 || yy >= h || xx >= w) return 0.0;
          return img[(static_cast<std::size_t>(yy) * W + static_cast<std::size_t>(xx)) * C + k];
        };
        double v;
        if (ay == 0 && ax == 0) v = at(y0, x0);
        else v = (1 - ay) * ((1 - ax) * at(y0, x0) + ax * at(y0, x0 + 1)) + ay * ((1 - ax) * at(y0 + 1, x0) + ax * at(y0 + 1, x0 + 1));
        v = v / 255.0 * p.contrast + p.brightness;
        x[k * H * W + o] = static_cast<float>(std::clamp(v, 0.0, 1.0));
      }
    }
}

/// A batch: x (n, c, h, w) normalized images, y (n, 1, h, w) 0/1 masks, and which slices.
struct batch {
  xt::xtensor<float, 4> x, y;
  std::vector<std::size_t> indices;
  std::size_t size() const { return indices.size(); }
};

struct loader_options {
  int batch_size = 8;
  bool shuffle = true;
  bool drop_last = false;
  int oversample = 1;  ///< slices with tumour appear this many times per epoch (1: no oversampling)
  augment_options augment;
  normalization norm = normalization::scale;
  std::uint64_t seed = 0;
  int prefetch = 2;  ///< batches prepared ahead (memory bound: prefetch + workers batches)
  int workers = 1;   ///< background threads; 0 prepares batches in next() on the calling thread
};

namespace detail {
inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
inline std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t a, std::uint64_t b) {
  return splitmix64(splitmix64(splitmix64(seed) ^ a) ^ (b * 0x9E3779B97F4A7C15ull));
}
}  // namespace detail

/// Batches over a slice_set. Call start(epoch), then next() until it returns false.
class batch_loader {
 public:
  batch_loader(const slice_set& set, loader_options o) : set_(&set), o_(o) {
    if (o_.batch_size < 1) throw config_error("batch size must be >= 1");
    if (o_.oversample < 1) throw config_error("oversample factor must be >= 1");
    if (o_.prefetch < 1) o_.prefetch = 1;
    if (o_.workers < 0) o_.workers = 0;
  }
  batch_loader(const batch_loader&) = delete;
  batch_loader& operator=(const batch_loader&) = delete;
  ~batch_loader() { stop(); }

  const loader_options& options() const { return o_; }

  /// The slice indices of an epoch, in order (tumour slices repeated `oversample` times, shuffled
  /// with (seed, epoch) when shuffle is on).
  std::vector<std::size_t> epoch_order(int epoch) const {
    std::vector<std::size_t> order;
    for (std::size_t i = 0; i < set_->size(); ++i) {
      const int reps = set_->has_tumour(i) ? o_.oversample : 1;
      for (int r = 0; r < reps; ++r) order.push_back(i);
    }
    if (o_.shuffle) {
      rng g(detail::mix_seed(o_.seed, 0x5AFFu, static_cast<std::uint64_t>(epoch)));
      for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[static_cast<std::size_t>(g.below(i))]);
    }
    return order;
  }
  std::size_t samples_per_epoch() const {
    std::size_t n = 0;
    for (std::size_t i = 0; i < set_->size(); ++i) n += set_->has_tumour(i) ? static_cast<std::size_t>(o_.oversample) : 1;
    return n;
  }
  std::size_t batches_per_epoch() const {
    const std::size_t n = samples_per_epoch(), b = static_cast<std::size_t>(o_.batch_size);
    return o_.drop_last ? n / b : (n + b - 1) / b;
  }

  /// Build batch `b` of `order` (deterministic; what the workers run).
  void make_batch(const std::vector<std::size_t>& order, int epoch, std::size_t b, batch& out) const {
    const std::size_t B = static_cast<std::size_t>(o_.batch_size);
    const std::size_t first = b * B, last = std::min(order.size(), first + B);
    const std::size_t n = last - first;
    const std::size_t C = static_cast<std::size_t>(set_->channels), H = static_cast<std::size_t>(set_->height),
                      W = static_cast<std::size_t>(set_->width);
    out.x = xt::xtensor<float, 4>::from_shape({n, C, H, W});
    out.y = xt::xtensor<float, 4>::from_shape({n, std::size_t{1}, H, W});
    out.indices.assign(order.begin() + static_cast<std::ptrdiff_t>(first), order.begin() + static_cast<std::ptrdiff_t>(last));
    for (std::size_t k = 0; k < n; ++k) {
      const std::size_t i = out.indices[k];
      rng g(detail::mix_seed(o_.seed, static_cast<std::uint64_t>(epoch) + 1, first + k));
      const augment_params p = draw_augment(o_.augment, g);
      float* x = out.x.data() + k * C * H * W;
      augment_slice(set_->image(i), set_->mask(i), set_->height, set_->width, set_->channels, p, x, out.y.data() + k * H * W);
      normalize(i, x);
    }
  }

  /// Normalize one (c, h, w) image of slice i that is in [0, 1].
  void normalize(std::size_t i, float* x) const {
    if (o_.norm == normalization::scale) return;
    const std::size_t C = static_cast<std::size_t>(set_->channels), HW = set_->image_pixels();
    const std::size_t p = set_->records[i].patient;
    for (std::size_t c = 0; c < C; ++c) {
      const float m = set_->mean[p][c], s = set_->stdev[p][c];
      float* xc = x + c * HW;
      for (std::size_t q = 0; q < HW; ++q) xc[q] = (xc[q] * 255.f - m) / s;
    }
  }

  /// Begin an epoch: background workers start preparing its batches.
  void start(int epoch) {
    stop();
    epoch_ = epoch;
    order_ = epoch_order(epoch);
    total_ = batches_per_epoch();
    next_out_ = 0;
    next_job_ = 0;
    ready_.clear();
    error_ = nullptr;
    stopping_ = false;
    for (int t = 0; t < o_.workers; ++t) threads_.emplace_back([this] { worker(); });
  }

  /// The next batch of the epoch in order; false when the epoch is over. Rethrows a worker's
  /// exception.
  bool next(batch& out) {
    if (next_out_ >= total_) return false;
    if (o_.workers == 0) {
      make_batch(order_, epoch_, next_out_++, out);
      return true;
    }
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return error_ || ready_.count(next_out_); });
    if (error_) std::rethrow_exception(error_);
    out = std::move(ready_[next_out_]);
    ready_.erase(next_out_);
    ++next_out_;
    lk.unlock();
    cv_.notify_all();
    return true;
  }

  /// Batches waiting in memory right now (for tests of the bound).
  std::size_t queued() {
    std::lock_guard lk(mu_);
    return ready_.size();
  }

  /// Stop the workers (called by start() and the destructor).
  void stop() {
    {
      std::lock_guard lk(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

 private:
  void worker() {
    for (;;) {
      std::size_t b;
      {
        std::unique_lock lk(mu_);
        // bounded: a batch is started only when it is within `prefetch` of the consumer
        cv_.wait(lk, [&] { return stopping_ || error_ || next_job_ >= total_ || next_job_ < next_out_ + static_cast<std::size_t>(o_.prefetch); });
        if (stopping_ || error_ || next_job_ >= total_) return;
        b = next_job_++;
      }
      batch out;
      try {
        make_batch(order_, epoch_, b, out);
      } catch (...) {
        std::lock_guard lk(mu_);
        error_ = std::current_exception();
        cv_.notify_all();
        return;
      }
      {
        std::lock_guard lk(mu_);
        ready_[b] = std::move(out);
      }
      cv_.notify_all();
    }
  }

  const slice_set* set_;
  loader_options o_;
  int epoch_ = 0;
  std::vector<std::size_t> order_;
  std::size_t total_ = 0, next_out_ = 0, next_job_ = 0;
  std::map<std::size_t, batch> ready_;
  std::exception_ptr error_;
  bool stopping_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
};

}  // namespace useg::data
