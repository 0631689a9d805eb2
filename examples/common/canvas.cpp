#include "canvas.hpp"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>

#include "useg/core/error.hpp"

namespace lgg {

namespace {
// 5×7 glyphs, one byte per row, bit 4 = leftmost column.
struct glyph {
  char c;
  std::uint8_t rows[7];
};
constexpr glyph kFont[] = {
    {'0', {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}}, {'1', {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'2', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}}, {'3', {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E}},
    {'4', {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}}, {'5', {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E}},
    {'6', {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}}, {'7', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}}, {'9', {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C}},
    {'A', {0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11}}, {'B', {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E}},
    {'C', {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E}}, {'D', {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C}},
    {'E', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F}}, {'F', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10}},
    {'G', {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F}}, {'H', {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}},
    {'I', {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E}}, {'J', {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C}},
    {'K', {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11}}, {'L', {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F}},
    {'M', {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11}}, {'N', {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11}},
    {'O', {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}}, {'P', {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10}},
    {'Q', {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D}}, {'R', {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11}},
    {'S', {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E}}, {'T', {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
    {'U', {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}}, {'V', {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04}},
    {'W', {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A}}, {'X', {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11}},
    {'Y', {0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04}}, {'Z', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F}},
    {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C}}, {'-', {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00}},
    {':', {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00}}, {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}},
    {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}}, {'/', {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00}},
    {'_', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F}}, {'%', {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03}},
    {',', {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08}}, {'=', {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00}},
    {'+', {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00}}, {'|', {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
    {' ', {0, 0, 0, 0, 0, 0, 0}},
};
const glyph* find_glyph(char c) {
  if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  for (const auto& g : kFont)
    if (g.c == c) return &g;
  return nullptr;
}
}  // namespace

void canvas::blend(int x, int y, rgb c, double a) {
  if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
  const rgb o = get(x, y);
  auto mix = [a](std::uint8_t p, std::uint8_t q) { return static_cast<std::uint8_t>(std::lround(p * (1 - a) + q * a)); };
  set(x, y, {mix(o.r, c.r), mix(o.g, c.g), mix(o.b, c.b)});
}

void canvas::line(double x0, double y0, double x1, double y1, rgb c, int thick) {
  const double len = std::max(std::abs(x1 - x0), std::abs(y1 - y0));
  const int steps = std::max(1, static_cast<int>(std::ceil(len * 2)));
  for (int i = 0; i <= steps; ++i) {
    const double t = static_cast<double>(i) / steps;
    const int x = static_cast<int>(std::lround(x0 + t * (x1 - x0))), y = static_cast<int>(std::lround(y0 + t * (y1 - y0)));
    for (int dy = -(thick - 1) / 2; dy <= thick / 2; ++dy)
      for (int dx = -(thick - 1) / 2; dx <= thick / 2; ++dx) set(x + dx, y + dy, c);
  }
}

void canvas::rect(int x0, int y0, int x1, int y1, rgb c, bool filled) {
  if (filled) {
    for (int y = y0; y <= y1; ++y)
      for (int x = x0; x <= x1; ++x) set(x, y, c);
    return;
  }
  line(x0, y0, x1, y0, c);
  line(x0, y1, x1, y1, c);
  line(x0, y0, x0, y1, c);
  line(x1, y0, x1, y1, c);
}

int canvas::text(int x, int y, const std::string& s, rgb c, int scale) {
  int cx = x;
  for (char ch : s) {
    const glyph* g = find_glyph(ch);
    for (int r = 0; r < 7; ++r)
      for (int k = 0; k < 5; ++k) {
        const bool on = g ? ((g->rows[r] >> (4 - k)) & 1) : (r == 0 || r == 6 || k == 0 || k == 4);
        if (!on) continue;
        for (int dy = 0; dy < scale; ++dy)
          for (int dx = 0; dx < scale; ++dx) set(cx + k * scale + dx, y + r * scale + dy, c);
      }
    cx += 6 * scale;
  }
  return cx - x;
}

void write_png(const std::string& path, const canvas& c) {
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw useg::io_error("'" + path + "': cannot create the PNG file");
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info) {
    std::fclose(f);
    throw useg::io_error("'" + path + "': libpng initialization failed");
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    std::fclose(f);
    std::remove(tmp.c_str());
    throw useg::io_error("'" + path + "': writing the PNG failed");
  }
  png_init_io(png, f);
  png_set_IHDR(png, info, static_cast<png_uint_32>(c.width()), static_cast<png_uint_32>(c.height()), 8, PNG_COLOR_TYPE_RGB,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int y = 0; y < c.height(); ++y)
    png_write_row(png, const_cast<png_bytep>(c.pixels().data() + static_cast<std::size_t>(y) * c.width() * 3));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  if (std::fclose(f) != 0) throw useg::io_error("'" + path + "': closing the PNG failed");
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw useg::io_error("'" + path + "': cannot rename the temporary file into place");
}

namespace {
std::string tick_label(double v, double step) {
  char buf[32];
  if (step >= 1 && std::abs(v - std::round(v)) < 1e-9) std::snprintf(buf, sizeof buf, "%.0f", v);
  else if (step >= 0.1) std::snprintf(buf, sizeof buf, "%.1f", v);
  else if (step >= 0.01) std::snprintf(buf, sizeof buf, "%.2f", v);
  else std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}
double nice_step(double range, int target) {
  const double raw = range / std::max(1, target);
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * p >= raw) return m * p;
  return 10 * p;
}

void draw_panel(canvas& cv, int ox, int oy, int W, int H, const panel& p) {
  const rgb black{0, 0, 0}, grid{225, 225, 225}, gray{90, 90, 90};
  const int left = ox + 56, right = ox + W - 14, top = oy + 30, bottom = oy + H - 40;
  cv.text(ox + (W - canvas::text_width(p.title, 2)) / 2, oy + 6, p.title, black, 2);
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
  for (const auto& s : p.curves)
    for (std::size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      xmin = std::min(xmin, s.x[i]);
      xmax = std::max(xmax, s.x[i]);
      ymin = std::min(ymin, s.y[i]);
      ymax = std::max(ymax, s.y[i]);
    }
  if (!std::isfinite(xmin)) xmin = 0, xmax = 1, ymin = 0, ymax = 1;
  if (xmax - xmin < 1) xmax = xmin + 1;
  if (p.unit_range) ymin = 0, ymax = 1;
  else {
    ymin = std::min(0.0, ymin);
    if (ymax - ymin < 1e-9) ymax = ymin + 1;
    ymax += 0.05 * (ymax - ymin);
  }
  auto X = [&](double x) { return left + (x - xmin) / (xmax - xmin) * (right - left); };
  auto Y = [&](double y) { return bottom - (y - ymin) / (ymax - ymin) * (bottom - top); };
  const double ys = nice_step(ymax - ymin, 5);
  for (double v = std::ceil(ymin / ys) * ys; v <= ymax + 1e-12; v += ys) {
    const int y = static_cast<int>(std::lround(Y(v)));
    cv.line(left, y, right, y, grid);
    const std::string l = tick_label(v, ys);
    cv.text(left - 6 - canvas::text_width(l), y - 3, l, gray);
  }
  const double xs = std::max(1.0, nice_step(xmax - xmin, 8));
  for (double v = std::ceil(xmin / xs) * xs; v <= xmax + 1e-12; v += xs) {
    const int x = static_cast<int>(std::lround(X(v)));
    cv.line(x, bottom, x, bottom + 4, black);
    const std::string l = tick_label(v, xs);
    cv.text(x - canvas::text_width(l) / 2, bottom + 8, l, gray);
  }
  cv.text(left + (right - left - canvas::text_width(p.xlabel)) / 2, bottom + 22, p.xlabel, black);
  cv.line(left, top, left, bottom, black);
  cv.line(left, bottom, right, bottom, black);
  for (const auto& s : p.curves)
    for (std::size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      if (i + 1 < s.x.size() && std::isfinite(s.y[i + 1])) cv.line(X(s.x[i]), Y(s.y[i]), X(s.x[i + 1]), Y(s.y[i + 1]), s.color, 2);
      const int cx = static_cast<int>(std::lround(X(s.x[i]))), cy = static_cast<int>(std::lround(Y(s.y[i])));
      cv.rect(cx - 2, cy - 2, cx + 2, cy + 2, s.color, true);
    }
  // legend in a white box
  int lw = 0;
  for (const auto& s : p.curves) lw = std::max(lw, canvas::text_width(s.label));
  const int lh = 12 * static_cast<int>(p.curves.size()) + 6, bw = lw + 36;
  const int bx = right - bw - 6, by = p.legend_bottom ? bottom - lh - 6 : top + 4;
  cv.rect(bx, by, bx + bw, by + lh, {255, 255, 255}, true);
  cv.rect(bx, by, bx + bw, by + lh, {160, 160, 160});
  int ly = by + 4;
  for (const auto& s : p.curves) {
    cv.line(bx + 6, ly + 3, bx + 26, ly + 3, s.color, 2);
    cv.text(bx + 30, ly, s.label, black);
    ly += 12;
  }
}
}  // namespace

void plot_png(const std::string& path, const std::vector<panel>& panels) {
  const int W = 460, H = 320;
  canvas cv(W * static_cast<int>(std::max<std::size_t>(1, panels.size())), H);
  for (std::size_t i = 0; i < panels.size(); ++i) draw_panel(cv, static_cast<int>(i) * W, 0, W, H, panels[i]);
  write_png(path, cv);
}

}  // namespace lgg
