#include "lgg_common.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "useg/core/error.hpp"

namespace lgg {

// ============================================================================ model flags

void add_model_flags(CLI::App& app, model_flags& f) {
  app.add_option("--model", f.model, "Model family")
      ->check(CLI::IsMember(model_names()))
      ->capture_default_str()
      ->group("Model");
  app.add_option("--width", f.width, "Channels of the first level (level i has width*2^i)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str()
      ->group("Model");
  app.add_option("--depth", f.depth, "Number of 2x2 poolings")->check(CLI::Range(1, 8))->capture_default_str()->group("Model");
  app.add_option("--t", f.t, "Recurrence steps of the R2 blocks (r2unet, ar2unet)")
      ->check(CLI::Range(1, 16))
      ->capture_default_str()
      ->group("Model");
  app.add_option("--up", f.up, "Decoder up-convolution: upsample (nearest x2 + conv) or transpose")
      ->check(CLI::IsMember({"upsample", "transpose"}))
      ->capture_default_str()
      ->group("Model");
  app.add_option("--channels", f.channels, "Input channels: 3 (pre-contrast, FLAIR, post-contrast) or 1 (FLAIR only)")
      ->check(CLI::IsMember({1, 3}))
      ->capture_default_str()
      ->group("Model");
  app.add_option("--size", f.size, "Slices are resized to size x size")->check(CLI::Range(8, 4096))->capture_default_str()->group("Model");
  app.add_option("--normalize", f.normalize, "Input intensities: scale (x/255) or volume (per-patient standardization)")
      ->check(CLI::IsMember({"scale", "volume"}))
      ->capture_default_str()
      ->group("Model");
}

void add_device_flag(CLI::App& app, std::string& device) {
  app.add_option("--device", device,
                 std::string("Compute device: cpu or cuda (an NVIDIA GPU; ") +
                     (built_with_cuda() ? "this build has the CUDA backend)" : "this build is CPU only)"))
      ->check(CLI::IsMember(device_names()))
      ->capture_default_str();
}

std::map<std::string, std::string> to_metadata(const model_flags& f) {
  return {{"format", "useg-lgg-1"},
          {"model", f.model},
          {"in_channels", std::to_string(f.channels)},
          {"classes", "1"},
          {"width", std::to_string(f.width)},
          {"depth", std::to_string(f.depth)},
          {"t", std::to_string(f.t)},
          {"up", f.up},
          {"size", std::to_string(f.size)},
          {"normalize", f.normalize}};
}

std::vector<std::string> apply_metadata(const CLI::App& app, model_flags& f, const std::map<std::string, std::string>& meta) {
  std::vector<std::string> taken;
  auto take_str = [&](const char* flag, const char* key, std::string& dst) {
    auto it = meta.find(key);
    if (it == meta.end()) return;
    if (app.count(flag) == 0) {
      dst = it->second;
      taken.push_back(std::string(flag) + " " + dst);
    } else if (dst != it->second) {
      std::fprintf(stderr, "note: %s %s differs from the checkpoint's %s\n", flag, dst.c_str(), it->second.c_str());
    }
  };
  auto take_int = [&](const char* flag, const char* key, int& dst) {
    auto it = meta.find(key);
    if (it == meta.end()) return;
    int v = 0;
    try {
      v = std::stoi(it->second);
    } catch (const std::exception&) {
      throw useg::io_error(std::string("checkpoint metadata '") + key + "' is '" + it->second + "', not a number");
    }
    if (app.count(flag) == 0) {
      dst = v;
      taken.push_back(std::string(flag) + " " + it->second);
    } else if (dst != v) {
      std::fprintf(stderr, "note: %s %d differs from the checkpoint's %d\n", flag, dst, v);
    }
  };
  take_str("--model", "model", f.model);
  take_int("--width", "width", f.width);
  take_int("--depth", "depth", f.depth);
  take_int("--t", "t", f.t);
  take_str("--up", "up", f.up);
  take_int("--channels", "in_channels", f.channels);
  take_int("--size", "size", f.size);
  take_str("--normalize", "normalize", f.normalize);
  return taken;
}

model_spec to_spec(const model_flags& f, std::uint64_t seed) {
  model_spec s;
  s.model = f.model;
  s.in_channels = f.channels;
  s.classes = 1;
  s.cfg.width = f.width;
  s.cfg.depth = f.depth;
  s.cfg.t = f.t;
  if (f.up == "upsample") s.cfg.up = useg::up_kind::upsample;
  else if (f.up == "transpose") s.cfg.up = useg::up_kind::transpose;
  else throw useg::config_error("unknown --up '" + f.up + "' (upsample or transpose)");
  s.cfg.seed = seed;
  return s;
}

useg::data::preprocess_options to_preprocess(const model_flags& f) {
  useg::data::preprocess_options p;
  p.channels = f.channels;
  p.size = f.size;
  return p;
}

std::string describe(const model_flags& f) {
  std::ostringstream os;
  os << f.model << " width " << f.width << " depth " << f.depth;
  if (f.model == "r2unet" || f.model == "ar2unet") os << " t " << f.t;
  os << " up " << f.up << ", " << f.channels << " channel" << (f.channels > 1 ? "s" : "") << " at " << f.size << "x" << f.size
     << ", " << f.normalize << " normalization";
  return os.str();
}

// ============================================================================ program frame

int run_program(CLI::App& app, int argc, char** argv, const std::function<int()>& body) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return exit_usage;
  }
  const std::string name = app.get_name();
  try {
    return body();
  } catch (const useg::config_error& e) {
    std::fprintf(stderr, "%s: error: %s\n", name.c_str(), e.what());
    return exit_usage;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", name.c_str(), e.what());
    return exit_failure;
  }
}

// ============================================================================ progress

progress_bar::progress_bar(std::string label, std::size_t total)
    : label_(std::move(label)), total_(total), tty_(::isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()) {
  last_draw_ = start_ - std::chrono::seconds(1);
}

double progress_bar::seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

void progress_bar::update(std::size_t done, std::size_t images_done, const std::string& extra) {
  if (!tty_) return;
  const auto now = std::chrono::steady_clock::now();
  if (done < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  const double el = seconds();
  const int W = 24;
  const int fill = total_ ? static_cast<int>(static_cast<double>(done) / static_cast<double>(total_) * W) : W;
  std::string bar(static_cast<std::size_t>(W), ' ');
  for (int i = 0; i < fill; ++i) bar[static_cast<std::size_t>(i)] = '=';
  if (fill < W) bar[static_cast<std::size_t>(fill)] = '>';
  const double ips = el > 0 ? static_cast<double>(images_done) / el : 0;
  const double eta = done ? el / static_cast<double>(done) * static_cast<double>(total_ - done) : 0;
  char line[512];
  std::snprintf(line, sizeof line, "%s [%s] %zu/%zu  %s  %.1f img/s  ETA %s", label_.c_str(), bar.c_str(), done, total_, extra.c_str(),
                ips, format_seconds(eta).c_str());
  std::string s(line);
  const std::size_t len = s.size();
  if (len < width_) s.append(width_ - len, ' ');
  width_ = len;
  std::fprintf(stderr, "\r%s", s.c_str());
  std::fflush(stderr);
}

void progress_bar::finish() {
  if (!tty_ || width_ == 0) return;
  std::fprintf(stderr, "\r%s\r", std::string(width_, ' ').c_str());
  std::fflush(stderr);
  width_ = 0;
}

// ============================================================================ evaluation

void sigmoid(std::vector<float>& v) {
  for (auto& x : v) x = 1.f / (1.f + std::exp(-x));
}

eval_result evaluate(engine& e, const useg::data::slice_set& set, const eval_options& o, const slice_callback& cb) {
  eval_result r{useg::metrics::evaluator(o.policy, o.threshold), 0, 0};
  useg::data::loader_options lo;
  lo.batch_size = o.batch;
  lo.shuffle = false;
  lo.norm = o.norm;
  lo.workers = 1;
  useg::data::batch_loader loader(set, lo);
  loader.start(0);
  progress_bar bar(o.label, loader.batches_per_epoch());
  useg::data::batch b;
  std::vector<float> prob;
  std::size_t done = 0, images = 0;
  double loss_sum = 0;
  const std::size_t hw = set.image_pixels();
  while (loader.next(b)) {
    const int n = static_cast<int>(b.size());
    // eval mode, no backward state; the logits come back to the host
    loss_sum += e.predict(b.x.data(), b.y.data(), n, set.channels, set.height, set.width, o.loss, prob) * n;
    sigmoid(prob);
    for (int k = 0; k < n; ++k) {
      const std::size_t i = b.indices[static_cast<std::size_t>(k)];
      const auto& rec = set.records[i];
      r.ev.add(set.patients[rec.patient], rec.number, prob.data() + static_cast<std::size_t>(k) * hw,
               b.y.data() + static_cast<std::size_t>(k) * hw, hw);
      if (cb) cb(i, prob.data() + static_cast<std::size_t>(k) * hw);
    }
    images += static_cast<std::size_t>(n);
    ++done;
    if (o.show_progress) {
      char extra[64];
      std::snprintf(extra, sizeof extra, "loss %.4f", loss_sum / static_cast<double>(images));
      bar.update(done, images, extra);
    }
  }
  bar.finish();
  r.loss = images ? loss_sum / static_cast<double>(images) : 0;
  r.seconds = bar.seconds();
  return r;
}

// ============================================================================ output

nlohmann::json to_json(const useg::metrics::report& r) {
  nlohmann::json j;
  j["threshold"] = r.threshold;
  j["empty_policy"] = useg::metrics::to_string(r.policy);
  j["global"] = {{"dice", r.global_dice},
                 {"iou", r.global_iou},
                 {"pixel_accuracy", r.pixel_accuracy},
                 {"precision", r.global_precision},
                 {"recall", r.global_recall},
                 {"background_accuracy", r.background_accuracy},
                 {"tp", r.global.tp},
                 {"fp", r.global.fp},
                 {"fn", r.global.fn},
                 {"tn", r.global.tn}};
  j["per_slice"] = {{"slices", r.slices},
                    {"slices_included", r.slices_included},
                    {"slices_with_tumour", r.slices_with_tumour},
                    {"mean_dice", r.mean_dice},
                    {"mean_iou", r.mean_iou},
                    {"mean_precision", r.mean_precision},
                    {"mean_recall", r.mean_recall}};
  j["per_volume"] = {{"volumes", r.volumes},
                     {"volumes_included", r.volumes_included},
                     {"dice_mean", r.volume_dice_mean},
                     {"dice_median", r.volume_dice_median}};
  return j;
}

namespace {
std::string fmt(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.6f", v);
  return b;
}
}  // namespace

void write_patient_csv(const std::string& path, const useg::metrics::evaluator& ev) {
  std::map<std::string, std::size_t> tumour_slices;
  for (const auto& s : ev.slices())
    if (s.counts.truth_positives() > 0) ++tumour_slices[s.patient];
  std::ostringstream os;
  os << "patient,slices,tumour_slices,tp,fp,fn,tn,dice,iou,precision,recall\n";
  for (const auto& v : ev.volumes()) {
    os << v.patient << "," << v.slices << "," << tumour_slices[v.patient] << "," << v.counts.tp << "," << v.counts.fp << ","
       << v.counts.fn << "," << v.counts.tn << ",";
    if (auto s = useg::metrics::score(v.counts, ev.policy()))
      os << fmt(s->dice) << "," << fmt(s->iou) << "," << fmt(s->precision) << "," << fmt(s->recall) << "\n";
    else
      os << ",,,\n";
  }
  write_text_file(path, os.str());
}

void write_slice_csv(const std::string& path, const useg::metrics::evaluator& ev) {
  std::ostringstream os;
  os << "patient,slice,tp,fp,fn,tn,dice,iou,precision,recall\n";
  for (const auto& s : ev.slices()) {
    os << s.patient << "," << s.slice << "," << s.counts.tp << "," << s.counts.fp << "," << s.counts.fn << "," << s.counts.tn << ",";
    if (auto sc = useg::metrics::score(s.counts, ev.policy()))
      os << fmt(sc->dice) << "," << fmt(sc->iou) << "," << fmt(sc->precision) << "," << fmt(sc->recall) << "\n";
    else
      os << ",,,\n";
  }
  write_text_file(path, os.str());
}

void print_report(std::FILE* f, const useg::metrics::report& r) {
  std::fprintf(f, "  global (all pixels):   Dice %.4f  IoU %.4f  precision %.4f  recall %.4f\n", r.global_dice, r.global_iou,
               r.global_precision, r.global_recall);
  std::fprintf(f, "                         pixel accuracy %.4f  (all-background baseline %.4f)\n", r.pixel_accuracy,
               r.background_accuracy);
  std::fprintf(f, "  per slice (mean of %zu/%zu, empty=%s): Dice %.4f  IoU %.4f  precision %.4f  recall %.4f\n", r.slices_included,
               r.slices, useg::metrics::to_string(r.policy), r.mean_dice, r.mean_iou, r.mean_precision, r.mean_recall);
  std::fprintf(f, "  per volume (%zu patients): Dice mean %.4f  median %.4f\n", r.volumes_included, r.volume_dice_mean,
               r.volume_dice_median);
}

void write_text_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw useg::io_error("'" + path + "': cannot create the file");
    f << text;
    if (!f) throw useg::io_error("'" + path + "': write failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw useg::io_error("'" + path + "': cannot rename the temporary file into place");
}

std::string format_seconds(double s) {
  if (!std::isfinite(s) || s < 0) s = 0;
  const long t = std::lround(s);
  char b[32];
  if (t >= 3600) std::snprintf(b, sizeof b, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
  else std::snprintf(b, sizeof b, "%ld:%02ld", t / 60, t % 60);
  return b;
}

std::string format_bytes(std::size_t b) {
  char s[32];
  if (b >= (1u << 30)) std::snprintf(s, sizeof s, "%.1f GiB", static_cast<double>(b) / (1u << 30));
  else std::snprintf(s, sizeof s, "%.1f MiB", static_cast<double>(b) / (1u << 20));
  return s;
}

}  // namespace lgg
