#include "synthetic.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include "useg/core/rng.hpp"
#include "useg/data/tiff.hpp"

namespace lgg {

int write_synthetic_dataset(const std::string& dir, const synthetic_options& o) {
  namespace fs = std::filesystem;
  using useg::data::image_u8;
  useg::rng g(o.seed);
  const int S = o.size;
  int written = 0;
  fs::create_directories(dir);
  std::ofstream(fs::path(dir) / "README.md") << "Synthetic LGG-like data written by lgg_train (seed " << o.seed
                                              << "): ellipse brains with bright blobs as lesions. Not medical data.\n";
  for (int p = 0; p < o.patients; ++p) {
    char id[64];
    std::snprintf(id, sizeof id, "SYN_%02d_%04d_20000101", p % 4, 1000 + p);
    const fs::path pdir = fs::path(dir) / id;
    fs::create_directories(pdir);
    // the brain: center and radii (pixels), tissue intensities per channel
    const double bcx = S / 2.0 + g.uniform(-0.05, 0.05) * S, bcy = S / 2.0 + g.uniform(-0.05, 0.05) * S;
    const double brx = S * g.uniform(0.30, 0.38), bry = S * g.uniform(0.36, 0.44);
    const double tissue[3] = {g.uniform(70, 100), g.uniform(80, 110), g.uniform(60, 90)};
    // one or two lesions: 3-D ellipsoids
    struct blob {
      double cx, cy, cz, r, rz;
    };
    std::vector<blob> blobs;
    const int nb = g.uniform() < 0.3 ? 2 : 1;
    for (int b = 0; b < nb; ++b) {
      const double a = g.uniform(0, 6.283185307179586), d = g.uniform(0, 0.5);
      blobs.push_back({bcx + std::cos(a) * d * brx, bcy + std::sin(a) * d * bry, g.uniform(0.3, 0.7) * (o.slices - 1),
                       S * g.uniform(0.07, 0.14), o.slices * g.uniform(0.15, 0.3)});
    }
    const double bright[3] = {g.uniform(10, 30), g.uniform(70, 110), g.uniform(20, 50)};
    for (int z = 0; z < o.slices; ++z) {
      // the brain cross-section shrinks towards the first and last slices
      const double t = (z - (o.slices - 1) / 2.0) / (o.slices * 0.62);
      const double shrink = std::sqrt(std::max(0.05, 1 - t * t));
      image_u8 img = image_u8::from_shape({static_cast<std::size_t>(S), static_cast<std::size_t>(S), std::size_t{3}});
      image_u8 mask = image_u8::from_shape({static_cast<std::size_t>(S), static_cast<std::size_t>(S), std::size_t{1}});
      for (int y = 0; y < S; ++y)
        for (int x = 0; x < S; ++x) {
          const double ex = (x - bcx) / (brx * shrink), ey = (y - bcy) / (bry * shrink);
          const double rr = ex * ex + ey * ey;
          double lesion = 0;
          for (const auto& b : blobs) {
            const double dx = (x - b.cx) / b.r, dy = (y - b.cy) / b.r, dz = (z - b.cz) / b.rz;
            const double q = dx * dx + dy * dy + dz * dz;
            if (q < 1 && rr < 0.9) lesion = std::max(lesion, 1.0 - 0.4 * q);
          }
          for (int c = 0; c < 3; ++c) {
            double v = 0;
            if (rr < 1) {
              v = tissue[c] * (0.85 + 0.15 * std::cos(9 * ex + 7 * ey + c)) + (rr > 0.8 ? 25 : 0) + bright[c] * lesion;
              v += 6 * g.normal();
            } else {
              v = std::abs(2 * g.normal());
            }
            img(static_cast<std::size_t>(y), static_cast<std::size_t>(x), static_cast<std::size_t>(c)) =
                static_cast<std::uint8_t>(std::clamp(std::lround(v), 0L, 255L));
          }
          mask(static_cast<std::size_t>(y), static_cast<std::size_t>(x), 0) = lesion > 0 ? 255 : 0;
        }
      const std::string stem = (pdir / (std::string(id) + "_" + std::to_string(z + 1))).string();
      useg::data::write_tiff(stem + ".tif", img);
      useg::data::write_tiff(stem + "_mask.tif", mask);
      ++written;
    }
  }
  return written;
}

}  // namespace lgg
