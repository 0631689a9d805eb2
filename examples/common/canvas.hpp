// examples/common/canvas.hpp — a tiny RGB canvas (lines, rectangles, 5×7 text), PNG output via
// libpng, the training-curve plot and the overlay figures.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace lgg {

struct rgb {
  std::uint8_t r = 0, g = 0, b = 0;
};

class canvas {
 public:
  canvas(int w, int h, rgb bg = {255, 255, 255}) : w_(w), h_(h), px_(static_cast<std::size_t>(w) * h * 3) {
    for (int i = 0; i < w * h; ++i) set_index(i, bg);
  }
  int width() const { return w_; }
  int height() const { return h_; }
  const std::vector<std::uint8_t>& pixels() const { return px_; }
  void set(int x, int y, rgb c) {
    if (x >= 0 && y >= 0 && x < w_ && y < h_) set_index(y * w_ + x, c);
  }
  /// Blend c over the pixel with opacity a in [0, 1].
  void blend(int x, int y, rgb c, double a);
  rgb get(int x, int y) const {
    const std::size_t i = (static_cast<std::size_t>(y) * w_ + x) * 3;
    return {px_[i], px_[i + 1], px_[i + 2]};
  }
  void line(double x0, double y0, double x1, double y1, rgb c, int thick = 1);
  void rect(int x0, int y0, int x1, int y1, rgb c, bool filled = false);
  /// 5×7 text, scaled by `scale`; returns the width drawn. Unknown characters draw as boxes.
  int text(int x, int y, const std::string& s, rgb c, int scale = 1);
  static int text_width(const std::string& s, int scale = 1) { return static_cast<int>(s.size()) * 6 * scale; }

 private:
  void set_index(int i, rgb c) {
    px_[static_cast<std::size_t>(i) * 3] = c.r;
    px_[static_cast<std::size_t>(i) * 3 + 1] = c.g;
    px_[static_cast<std::size_t>(i) * 3 + 2] = c.b;
  }
  int w_, h_;
  std::vector<std::uint8_t> px_;
};

/// Write an RGB PNG atomically (temporary file + rename); throws useg::io_error.
void write_png(const std::string& path, const canvas& c);

/// One curve of a plot.
struct series {
  std::string label;
  std::vector<double> x, y;
  rgb color;
};

/// One panel of a plot.
struct panel {
  std::string title, xlabel;
  std::vector<series> curves;
  bool unit_range = false;     ///< y axis fixed to [0, 1]
  bool legend_bottom = false;  ///< legend in the lower right corner instead of the upper right
};

/// Panels side by side in one PNG.
void plot_png(const std::string& path, const std::vector<panel>& panels);

}  // namespace lgg
