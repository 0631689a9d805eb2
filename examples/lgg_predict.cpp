// lgg_predict — segment slices with a trained model. --input is one .tif image, a patient folder
// or a whole dataset folder. For each slice, at the slice's original resolution:
//   <stem>_pred.tif     the mask (8-bit, 0/255)
//   <stem>_prob.tif     the tumour probability (float32), with --probabilities
//   <stem>_overlay.png  image | truth over image | prediction over image (image | prediction
//                       without a mask), unless --no-overlay
// plus predictions.csv (and metrics where masks exist). --device cuda runs the model on an NVIDIA
// GPU. Exit codes: 0 done, 1 run-time failure (also: no usable GPU), 2 bad flags (also: --device
// cuda in a CPU-only build).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/canvas.hpp"
#include "common/lgg_common.hpp"
#include "useg/io/checkpoint.hpp"

namespace fs = std::filesystem;

namespace {

struct predict_args {
  std::string weights, input, out = "predictions", device = "cpu";
  lgg::model_flags m;
  double threshold = 0.5;
  int batch = 8, threads = 0;
  bool probabilities = false, no_overlay = false, skip_bad = false, mask_threshold = false;
};

/// Draw an (h, w, c) 8-bit image at (x0, y0), optionally with a mask over it.
/// Small images are drawn `zoom` times larger (nearest).
void draw_image(lgg::canvas& cv, int x0, int y0, const useg::data::image_u8& img, const std::uint8_t* mask, lgg::rgb color, int zoom) {
  const int H = static_cast<int>(img.shape()[0]), W = static_cast<int>(img.shape()[1]);
  const bool gray = img.shape()[2] == 1;
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      const auto Y = static_cast<std::size_t>(y), X = static_cast<std::size_t>(x);
      const lgg::rgb p = gray ? lgg::rgb{img(Y, X, 0), img(Y, X, 0), img(Y, X, 0)} : lgg::rgb{img(Y, X, 0), img(Y, X, 1), img(Y, X, 2)};
      const bool in = mask && mask[Y * W + X];
      // the mask filled at 40 %, its outline (a neighbour outside the mask) opaque
      const bool edge = in && (x == 0 || y == 0 || x == W - 1 || y == H - 1 || !mask[Y * W + X - 1] || !mask[Y * W + X + 1] ||
                               !mask[(Y - 1) * W + X] || !mask[(Y + 1) * W + X]);
      for (int dy = 0; dy < zoom; ++dy)
        for (int dx = 0; dx < zoom; ++dx) {
          const int px = x0 + x * zoom + dx, py = y0 + y * zoom + dy;
          cv.set(px, py, edge ? color : p);
          if (in && !edge) cv.blend(px, py, color, 0.4);
        }
    }
}

int predict_main(CLI::App& app, predict_args& a) {
  const auto meta = useg::io::read_metadata(a.weights);
  const auto taken = lgg::apply_metadata(app, a.m, meta);
  if (!taken.empty()) {
    std::string s;
    for (const auto& t : taken) s += (s.empty() ? "" : ", ") + t;
    std::printf("from the checkpoint: %s\n", s.c_str());
  }
  const std::unique_ptr<lgg::engine> eng = lgg::make_engine(a.device, a.threads);
  useg::data::scan_options so;
  so.require_masks = false;
  so.skip_bad = a.skip_bad;
  const useg::data::dataset_index index = useg::data::scan_dataset(a.input, so);
  for (const auto& w : index.warnings) std::fprintf(stderr, "warning: skipped: %s\n", w.c_str());
  // a dataset folder gets one output folder per patient
  std::error_code ec;
  const bool nested = fs::is_directory(a.input) && !fs::equivalent(fs::path(index.patients[0].dir), fs::path(a.input), ec);

  useg::data::load_options lo;
  lo.pre = lgg::to_preprocess(a.m);
  lo.pre.threshold_masks = a.mask_threshold;
  lo.skip_bad = a.skip_bad;
  lo.threads = std::max(1, eng->host_threads());
  useg::data::load_report rep;
  const useg::data::slice_set set = useg::data::load_slices(index, index.patient_ids(), lo, &rep);
  for (const auto& w : rep.warnings) std::fprintf(stderr, "warning: skipped: %s\n", w.c_str());
  if (set.size() == 0) throw useg::io_error("no readable slices in '" + a.input + "'");

  eng->build_model(lgg::to_spec(a.m));
  eng->load_weights(a.weights);
  std::printf("model: %s (%s), weights %s\n", lgg::describe(a.m).c_str(), eng->reference_name(), a.weights.c_str());
  std::printf("device: %s\n", eng->device_info().c_str());
  std::printf("input: %s: %zu patient(s), %zu slices\n", a.input.c_str(), set.patients.size(), set.size());

  const fs::path out(a.out);
  fs::create_directories(out);
  useg::metrics::evaluator ev(useg::metrics::empty_policy::one, a.threshold);
  std::size_t with_mask = 0;
  std::ostringstream csv;
  csv << "patient,slice,image,prediction,predicted_pixels,truth_pixels,dice\n";

  lgg::eval_options eo;
  eo.batch = a.batch;
  eo.norm = useg::data::parse_normalization(a.m.normalize);
  eo.threshold = a.threshold;
  eo.label = "predict";
  lgg::evaluate(*eng, set, eo, [&](std::size_t i, const float* prob) {
    const auto& r = set.records[i];
    useg::data::slice_files f{r.number, r.image_path, r.mask_path};
    useg::data::image_u8 img = useg::data::read_tiff_u8(f.image);
    const std::size_t oh = img.shape()[0], ow = img.shape()[1];
    const std::vector<float> p = useg::data::resize_bilinear(prob, static_cast<std::size_t>(set.height), static_cast<std::size_t>(set.width), oh, ow);
    useg::data::image_u8 pred = useg::data::image_u8::from_shape({oh, ow, std::size_t{1}});
    std::vector<std::uint8_t> pred01(oh * ow);
    std::size_t npred = 0;
    for (std::size_t q = 0; q < oh * ow; ++q) {
      pred01[q] = p[q] >= a.threshold ? 1 : 0;
      pred.data()[q] = pred01[q] ? 255 : 0;
      npred += pred01[q];
    }
    const fs::path dir = nested ? out / set.patients[r.patient] : out;
    fs::create_directories(dir);
    const std::string stem = fs::path(f.image).stem().string();
    const std::string pred_path = (dir / (stem + "_pred.tif")).string();
    useg::data::write_tiff(pred_path, pred);
    if (a.probabilities) {
      useg::data::image_f32 pf = useg::data::image_f32::from_shape({oh, ow, std::size_t{1}});
      std::copy(p.begin(), p.end(), pf.data());
      useg::data::write_tiff((dir / (stem + "_prob.tif")).string(), pf);
    }
    useg::data::mask_u8 truth;
    std::string dice_s;
    std::size_t ntruth = 0;
    if (r.has_mask) {
      truth = useg::data::read_mask(f.mask, a.mask_threshold);
      if (truth.shape()[0] != oh || truth.shape()[1] != ow) throw useg::io_error("'" + f.mask + "': mask and image sizes differ");
      const auto& s = ev.add(set.patients[r.patient], r.number, p.data(), truth.data(), oh * ow);
      ++with_mask;
      for (std::size_t q = 0; q < oh * ow; ++q) ntruth += truth.data()[q];
      char d[32];
      std::snprintf(d, sizeof d, "%.6f", useg::metrics::dice(s.counts));
      dice_s = d;
    }
    if (!a.no_overlay) {
      const int zoom = std::max(1, 256 / static_cast<int>(std::max(oh, ow)));
      const int W = static_cast<int>(ow) * zoom, H = static_cast<int>(oh) * zoom, gap = 6, head = 14;
      const int panels = r.has_mask ? 3 : 2;
      lgg::canvas cv(panels * W + (panels - 1) * gap, H + head, {255, 255, 255});
      const lgg::rgb black{0, 0, 0}, green{0, 220, 0}, red{255, 40, 40};
      draw_image(cv, 0, head, img, nullptr, {}, zoom);
      cv.text(2, 3, "image", black);
      int x = W + gap;
      if (r.has_mask) {
        draw_image(cv, x, head, img, truth.data(), green, zoom);
        cv.text(x + 2, 3, "truth", black);
        x += W + gap;
      }
      draw_image(cv, x, head, img, pred01.data(), red, zoom);
      cv.text(x + 2, 3, r.has_mask ? "prediction  dice " + dice_s.substr(0, 4) : std::string("prediction"), black);
      lgg::write_png((dir / (stem + "_overlay.png")).string(), cv);
    }
    csv << set.patients[r.patient] << "," << r.number << "," << f.image << "," << pred_path << "," << npred << ","
        << (r.has_mask ? std::to_string(ntruth) : "") << "," << dice_s << "\n";
  });
  lgg::write_text_file((out / "predictions.csv").string(), csv.str());
  std::printf("wrote %zu masks%s%s to %s (list: predictions.csv)\n", set.size(), a.probabilities ? ", probability maps" : "",
              a.no_overlay ? "" : " and overlays", a.out.c_str());
  if (with_mask) {
    std::printf("metrics over the %zu slices with masks (original resolution):\n", with_mask);
    lgg::print_report(stdout, ev.summary());
  }
  if (index.skipped + rep.skipped) std::printf("%zu bad files or slices were skipped\n", index.skipped + rep.skipped);
  return lgg::exit_ok;
}

}  // namespace

int main(int argc, char** argv) {
  predict_args a;
  CLI::App app{"Segment LGG slices with a trained model: mask TIFFs, probability TIFFs and overlay PNGs.", "lgg_predict"};
  app.get_formatter()->column_width(34);
  app.add_option("--weights", a.weights, "Weights file (safetensors) written by lgg_train")->required()->check(CLI::ExistingFile);
  app.add_option("--input", a.input, "A .tif image, a patient folder or a dataset folder (kaggle_3m layout)")
      ->required()
      ->check(CLI::ExistingPath);
  app.add_option("--out", a.out, "Output folder")->capture_default_str();
  lgg::add_device_flag(app, a.device);
  lgg::add_model_flags(app, a.m);
  app.add_flag("--probabilities", a.probabilities, "Also write float32 probability TIFFs");
  app.add_flag("--no-overlay", a.no_overlay, "Do not write overlay PNGs");
  app.add_option("--threshold", a.threshold, "Probability threshold")->check(CLI::Range(0.0, 1.0))->capture_default_str();
  app.add_option("--batch", a.batch, "Batch size")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--threads", a.threads, "Compute threads (0: all cores); with --device cuda, threads loading the data")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag("--skip-bad", a.skip_bad, "Skip unreadable or inconsistent files with a warning");
  app.add_flag("--mask-threshold", a.mask_threshold, "Binarize masks at 128 instead of rejecting values other than 0/255");
  return lgg::run_program(app, argc, argv, [&] { return predict_main(app, a); });
}
