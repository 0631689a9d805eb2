// lgg_train — train a U-Net family model on the LGG (kaggle_3m) dataset, or on a small synthetic
// dataset in the same layout when no --data is given.
//
// Writes to --out: config.json, split.txt, metrics.csv, curves.png, summary.json,
// last.safetensors + last.state.safetensors (for --resume) and best.safetensors (best validation
// Dice). --device cuda trains on an NVIDIA GPU (builds with the CUDA backend); the data stay on
// the host and each batch is uploaded. Exit codes: 0 done, 1 run-time failure (also: no usable
// GPU), 2 bad flags (also: --device cuda in a CPU-only build), 130 interrupted.
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/canvas.hpp"
#include "common/lgg_common.hpp"
#include "common/synthetic.hpp"
#include "useg/io/checkpoint.hpp"
#include "useg/optim/schedules.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::atomic<bool> g_interrupted{false};
extern "C" void on_sigint(int) { g_interrupted = true; }

/// Every flag of lgg_train (JSON keys are the flag names without dashes).
struct train_args {
  std::string data, out = "runs/lgg", split_file, weights, device = "cpu";
  lgg::model_flags m;
  int epochs = 10, batch = 8;
  double lr = 1e-3, momentum = 0.9, weight_decay = 0;
  std::string optimizer = "adam", loss = "bce-dice", schedule = "constant";
  double pos_weight = 1, gamma = 0.1;
  int step_size = 10, patience = 3;
  std::uint64_t seed = 0;
  int threads = 0, workers = 1, prefetch = 2;
  double val_fraction = 0.15, test_fraction = 0.15;
  int patients = 0;
  bool no_augment = false;
  double flip = 0.5, rotate = 15, zoom = 0.05, brightness = 0.1, contrast = 0.1;
  int oversample = 1;
  bool skip_bad = false, mask_threshold = false;
  double threshold = 0.5;
  std::string empty = "one";
  int synthetic_patients = 16, synthetic_slices = 16;
  bool resume = false;
};

json to_json(const train_args& a) {
  return {{"data", a.data},
          {"out", a.out},
          {"split-file", a.split_file},
          {"weights", a.weights},
          {"model", a.m.model},
          {"width", a.m.width},
          {"depth", a.m.depth},
          {"t", a.m.t},
          {"up", a.m.up},
          {"channels", a.m.channels},
          {"size", a.m.size},
          {"normalize", a.m.normalize},
          {"epochs", a.epochs},
          {"batch", a.batch},
          {"lr", a.lr},
          {"momentum", a.momentum},
          {"weight-decay", a.weight_decay},
          {"optimizer", a.optimizer},
          {"loss", a.loss},
          {"pos-weight", a.pos_weight},
          {"schedule", a.schedule},
          {"step-size", a.step_size},
          {"gamma", a.gamma},
          {"patience", a.patience},
          {"seed", a.seed},
          {"device", a.device},
          {"threads", a.threads},
          {"workers", a.workers},
          {"prefetch", a.prefetch},
          {"val-fraction", a.val_fraction},
          {"test-fraction", a.test_fraction},
          {"patients", a.patients},
          {"no-augment", a.no_augment},
          {"flip", a.flip},
          {"rotate", a.rotate},
          {"zoom", a.zoom},
          {"brightness", a.brightness},
          {"contrast", a.contrast},
          {"oversample", a.oversample},
          {"skip-bad", a.skip_bad},
          {"mask-threshold", a.mask_threshold},
          {"threshold", a.threshold},
          {"empty", a.empty},
          {"synthetic-patients", a.synthetic_patients},
          {"synthetic-slices", a.synthetic_slices}};
}

void from_json(const json& j, train_args& a) {
  auto get = [&](const char* k, auto& v) {
    if (j.contains(k)) j.at(k).get_to(v);
  };
  get("data", a.data);
  get("split-file", a.split_file);
  get("weights", a.weights);
  get("model", a.m.model);
  get("width", a.m.width);
  get("depth", a.m.depth);
  get("t", a.m.t);
  get("up", a.m.up);
  get("channels", a.m.channels);
  get("size", a.m.size);
  get("normalize", a.m.normalize);
  get("epochs", a.epochs);
  get("batch", a.batch);
  get("lr", a.lr);
  get("momentum", a.momentum);
  get("weight-decay", a.weight_decay);
  get("optimizer", a.optimizer);
  get("loss", a.loss);
  get("pos-weight", a.pos_weight);
  get("schedule", a.schedule);
  get("step-size", a.step_size);
  get("gamma", a.gamma);
  get("patience", a.patience);
  get("seed", a.seed);
  get("device", a.device);
  get("threads", a.threads);
  get("workers", a.workers);
  get("prefetch", a.prefetch);
  get("val-fraction", a.val_fraction);
  get("test-fraction", a.test_fraction);
  get("patients", a.patients);
  get("no-augment", a.no_augment);
  get("flip", a.flip);
  get("rotate", a.rotate);
  get("zoom", a.zoom);
  get("brightness", a.brightness);
  get("contrast", a.contrast);
  get("oversample", a.oversample);
  get("skip-bad", a.skip_bad);
  get("mask-threshold", a.mask_threshold);
  get("threshold", a.threshold);
  get("empty", a.empty);
  get("synthetic-patients", a.synthetic_patients);
  get("synthetic-slices", a.synthetic_slices);
}

std::string join(const std::vector<std::string>& v, const char* sep = ",") {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

/// One row of metrics.csv.
struct epoch_row {
  int epoch = 0;
  double lr = 0, train_loss = 0, val_loss = NAN, val_dice = NAN, val_iou = NAN, val_precision = NAN, val_recall = NAN,
         val_accuracy = NAN, val_background_accuracy = NAN, val_slice_dice = NAN, val_volume_dice = NAN,
         val_volume_dice_median = NAN, seconds = 0, val_seconds = 0, images_per_second = 0;
};

json to_json(const epoch_row& r) {
  auto num = [](double v) { return std::isfinite(v) ? json(v) : json(nullptr); };
  return {{"epoch", r.epoch},
          {"lr", r.lr},
          {"train_loss", r.train_loss},
          {"val_loss", num(r.val_loss)},
          {"val_dice", num(r.val_dice)},
          {"val_iou", num(r.val_iou)},
          {"val_precision", num(r.val_precision)},
          {"val_recall", num(r.val_recall)},
          {"val_pixel_accuracy", num(r.val_accuracy)},
          {"val_background_accuracy", num(r.val_background_accuracy)},
          {"val_slice_dice", num(r.val_slice_dice)},
          {"val_volume_dice", num(r.val_volume_dice)},
          {"val_volume_dice_median", num(r.val_volume_dice_median)},
          {"seconds", r.seconds},
          {"val_seconds", r.val_seconds},
          {"images_per_second", r.images_per_second}};
}

epoch_row row_from_json(const json& j) {
  auto num = [&](const char* k) { return j.contains(k) && j.at(k).is_number() ? j.at(k).get<double>() : NAN; };
  epoch_row r;
  r.epoch = j.at("epoch").get<int>();
  r.lr = num("lr");
  r.train_loss = num("train_loss");
  r.val_loss = num("val_loss");
  r.val_dice = num("val_dice");
  r.val_iou = num("val_iou");
  r.val_precision = num("val_precision");
  r.val_recall = num("val_recall");
  r.val_accuracy = num("val_pixel_accuracy");
  r.val_background_accuracy = num("val_background_accuracy");
  r.val_slice_dice = num("val_slice_dice");
  r.val_volume_dice = num("val_volume_dice");
  r.val_volume_dice_median = num("val_volume_dice_median");
  r.seconds = num("seconds");
  r.val_seconds = num("val_seconds");
  r.images_per_second = num("images_per_second");
  return r;
}

void write_metrics_csv(const std::string& path, const std::vector<epoch_row>& rows) {
  std::ostringstream os;
  os << "epoch,lr,train_loss,val_loss,val_dice,val_iou,val_precision,val_recall,val_pixel_accuracy,val_background_accuracy,"
        "val_slice_dice,val_volume_dice,val_volume_dice_median,seconds,val_seconds,images_per_second\n";
  auto f = [&](double v) {
    if (!std::isfinite(v)) return std::string();
    char b[32];
    std::snprintf(b, sizeof b, "%.6g", v);
    return std::string(b);
  };
  for (const auto& r : rows)
    os << r.epoch << "," << f(r.lr) << "," << f(r.train_loss) << "," << f(r.val_loss) << "," << f(r.val_dice) << "," << f(r.val_iou)
       << "," << f(r.val_precision) << "," << f(r.val_recall) << "," << f(r.val_accuracy) << "," << f(r.val_background_accuracy) << ","
       << f(r.val_slice_dice) << "," << f(r.val_volume_dice) << "," << f(r.val_volume_dice_median) << "," << f(r.seconds) << ","
       << f(r.val_seconds) << "," << f(r.images_per_second) << "\n";
  lgg::write_text_file(path, os.str());
}

void plot_curves(const std::string& path, const std::vector<epoch_row>& rows) {
  lgg::series tl{"train loss", {}, {}, {31, 119, 180}}, vl{"val loss", {}, {}, {255, 127, 14}};
  lgg::series vd{"val dice (all pixels)", {}, {}, {44, 160, 44}}, sd{"val dice (slice mean)", {}, {}, {148, 103, 189}},
      pd{"val dice (volume mean)", {}, {}, {214, 39, 40}};
  for (const auto& r : rows) {
    for (auto* s : {&tl, &vl, &vd, &sd, &pd}) s->x.push_back(r.epoch);
    tl.y.push_back(r.train_loss);
    vl.y.push_back(r.val_loss);
    vd.y.push_back(r.val_dice);
    sd.y.push_back(r.val_slice_dice);
    pd.y.push_back(r.val_volume_dice);
  }
  lgg::panel loss{"loss", "epoch", {tl, vl}, false}, dice{"validation dice", "epoch", {vd, sd, pd}, true, true};
  lgg::plot_png(path, {loss, dice});
}

int train_main(CLI::App& app, train_args& a) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  std::error_code ec;
  const fs::path out(a.out);
  const std::string config_path = (out / "config.json").string(), last_w = (out / "last.safetensors").string(),
                    last_s = (out / "last.state.safetensors").string(), best_w = (out / "best.safetensors").string();

  // ------------------------------------------------------------------ resume: the recorded flags
  if (a.resume) {
    if (!fs::exists(config_path) || !fs::exists(last_w) || !fs::exists(last_s))
      throw useg::config_error("--resume: '" + a.out + "' has no config.json, last.safetensors and last.state.safetensors to resume from");
    std::ifstream f(config_path);
    json saved;
    try {
      saved = json::parse(f);
    } catch (const json::exception& e) {
      throw useg::io_error("'" + config_path + "': " + e.what());
    }
    // flags that may change on resume; every other explicit flag must match the recorded one
    const std::set<std::string> may_change{"epochs", "device", "threads", "workers", "prefetch", "out", "resume"};
    const json now = to_json(a);
    for (const auto& [k, v] : now.items()) {
      if (may_change.count(k) || app.count("--" + k) == 0 || !saved.contains(k)) continue;
      if (saved.at(k) != v)
        throw useg::config_error("--resume: --" + k + " " + v.dump() + " differs from the run being resumed (" + saved.at(k).dump() +
                                 "); only --epochs, --device, --threads, --workers and --prefetch may change");
    }
    train_args b = a;
    from_json(saved, b);
    b.out = a.out;
    b.resume = true;
    if (app.count("--epochs")) b.epochs = a.epochs;
    if (app.count("--device")) b.device = a.device;
    if (app.count("--threads")) b.threads = a.threads;
    if (app.count("--workers")) b.workers = a.workers;
    if (app.count("--prefetch")) b.prefetch = a.prefetch;
    a = b;
  }

  // ------------------------------------------------------------------ the device (first: a GPU that is not there fails early)
  const std::unique_ptr<lgg::engine> eng = lgg::make_engine(a.device, a.threads);

  // ------------------------------------------------------------------ synthetic data when no --data
  const bool synthetic = a.data.empty();
  if (synthetic && !a.resume) {
    // small defaults for the demo unless given
    if (!app.count("--size")) a.m.size = 64;
    if (!app.count("--width")) a.m.width = 8;
    if (!app.count("--epochs")) a.epochs = 12;
  }
  fs::create_directories(out, ec);
  if (ec) throw useg::io_error("'" + a.out + "': cannot create the output folder (" + ec.message() + ")");
  std::string data_dir = a.data;
  if (synthetic) {
    data_dir = (out / "synthetic").string();
    if (!fs::exists(fs::path(data_dir) / "README.md")) {
      lgg::synthetic_options so;
      so.patients = a.synthetic_patients;
      so.slices = a.synthetic_slices;
      so.size = std::max(a.m.size, 32);
      so.seed = a.seed + 1;
      std::printf("no --data: writing a synthetic dataset (%d patients x %d slices, %dx%d) to %s\n", so.patients, so.slices, so.size,
                  so.size, data_dir.c_str());
      lgg::write_synthetic_dataset(data_dir, so);
    }
  }
  if (!a.resume) lgg::write_text_file(config_path, to_json(a).dump(2) + "\n");

  // ------------------------------------------------------------------ data
  std::printf("device: %s; %d loader thread%s\n", eng->device_info().c_str(), a.workers, a.workers == 1 ? "" : "s");
  useg::data::scan_options so;
  so.skip_bad = a.skip_bad;
  useg::data::dataset_index index = useg::data::scan_dataset(data_dir, so);
  for (const auto& w : index.warnings) std::fprintf(stderr, "warning: skipped: %s\n", w.c_str());
  if (a.patients > 0 && static_cast<std::size_t>(a.patients) < index.patients.size()) index.patients.resize(static_cast<std::size_t>(a.patients));
  useg::data::patient_split split;
  const std::string split_path = (out / "split.txt").string();
  if (a.resume && fs::exists(split_path)) split = useg::data::read_split_file(split_path, index.patient_ids());
  else if (!a.split_file.empty()) split = useg::data::read_split_file(a.split_file, index.patient_ids());
  else split = useg::data::split_patients(index.patient_ids(), a.val_fraction, a.test_fraction, a.seed);
  if (split.train.empty()) throw useg::config_error("the split has no training patients");
  useg::data::write_split_file(split_path, split);

  const useg::data::normalization norm = useg::data::parse_normalization(a.m.normalize);
  useg::data::load_options lo;
  lo.pre = lgg::to_preprocess(a.m);
  lo.pre.threshold_masks = a.mask_threshold;
  lo.skip_bad = a.skip_bad;
  lo.threads = std::max(1, eng->host_threads());
  const auto t_load = clock::now();
  useg::data::load_report rep_train, rep_val;
  const useg::data::slice_set train_set = useg::data::load_slices(index, split.train, lo, &rep_train);
  const useg::data::slice_set val_set = split.val.empty() ? useg::data::slice_set{} : useg::data::load_slices(index, split.val, lo, &rep_val);
  for (const auto* rep : {&rep_train, &rep_val})
    for (const auto& w : rep->warnings) std::fprintf(stderr, "warning: skipped: %s\n", w.c_str());
  const std::size_t skipped = index.skipped + rep_train.skipped + rep_val.skipped;
  if (train_set.size() == 0) throw useg::io_error("no readable training slices in '" + data_dir + "'");
  std::size_t tumour = 0;
  for (std::size_t i = 0; i < train_set.size(); ++i) tumour += train_set.has_tumour(i);
  const std::size_t test_slices = [&] {
    std::size_t n = 0;
    for (const auto& id : split.test) n += index.find(id)->slices.size();
    return n;
  }();
  std::printf("data: %s%s\n  %zu patients, %zu slices; split train/val/test = %zu/%zu/%zu patients, %zu/%zu/%zu slices\n",
              data_dir.c_str(), synthetic ? " (synthetic)" : "", index.patients.size(), index.num_slices(), split.train.size(),
              split.val.size(), split.test.size(), train_set.size(), val_set.size(), test_slices);
  std::printf("  %zu of %zu training slices show tumour; loaded in %.1f s (%s in memory)%s\n", tumour, train_set.size(),
              std::chrono::duration<double>(clock::now() - t_load).count(), lgg::format_bytes(train_set.bytes() + val_set.bytes()).c_str(),
              skipped ? (" — " + std::to_string(skipped) + " bad files or slices skipped").c_str() : "");

  // ------------------------------------------------------------------ model, optimizer, schedule
  eng->build_model(lgg::to_spec(a.m, a.seed));
  std::printf("model: %s (%s), %zu parameters\n", lgg::describe(a.m).c_str(), eng->reference_name(), eng->num_parameters());
  if (!a.weights.empty() && !a.resume) {
    eng->load_weights(a.weights);
    std::printf("initial weights: %s\n", a.weights.c_str());
  }
  eng->make_optimizer({a.optimizer, a.lr, a.momentum, a.weight_decay});
  useg::loss_options loss;
  loss.kind = useg::parse_loss_kind(a.loss);
  if (loss.kind == useg::loss_kind::cross_entropy) throw useg::config_error("--loss cross-entropy needs 2 classes; this program trains 1 class (bce, dice, bce-dice)");
  loss.pos_weight = a.pos_weight;
  if (a.schedule != "constant" && a.schedule != "step" && a.schedule != "cosine" && a.schedule != "plateau")
    throw useg::config_error("unknown --schedule '" + a.schedule + "' (constant, step, cosine or plateau)");
  useg::reduce_on_plateau plateau(a.lr, useg::reduce_on_plateau::mode::max, a.gamma, a.patience);
  auto lr_for = [&](int epoch) {
    if (a.schedule == "step") return useg::step_lr{a.lr, a.step_size, a.gamma}.lr_at(epoch);
    if (a.schedule == "cosine") return useg::cosine_lr{a.lr, std::max(1, a.epochs)}.lr_at(epoch);
    if (a.schedule == "plateau") return plateau.lr();
    return a.lr;
  };

  // ------------------------------------------------------------------ resume: weights, optimizer, history
  int start_epoch = 0, best_epoch = 0;
  double best_dice = -1, best_loss = std::numeric_limits<double>::infinity();
  json best_report;
  std::vector<epoch_row> history;
  if (a.resume) {
    eng->load_weights(last_w);
    const json st = eng->load_training_state(last_s);
    const auto meta = useg::io::read_metadata(last_w);
    start_epoch = st.at("epoch").get<int>();
    if (!meta.count("epoch") || meta.at("epoch") != std::to_string(start_epoch))
      throw useg::io_error("'" + last_w + "' and '" + last_s + "' are from different epochs (an interrupted save?); cannot resume");
    best_epoch = st.at("best_epoch").get<int>();
    best_dice = st.at("best_dice").get<double>();
    best_loss = st.at("best_loss").get<double>();
    best_report = st.value("best_report", json());
    for (const auto& r : st.at("history")) history.push_back(row_from_json(r));
    const json& p = st.at("plateau");
    plateau.restore(p.at("lr").get<double>(), p.at("best").get<double>(), p.at("bad").get<int>(), p.at("cooldown").get<int>());
    std::printf("resuming %s after epoch %d (best val Dice %.4f at epoch %d)\n", a.out.c_str(), start_epoch, best_dice, best_epoch);
  }
  if (start_epoch >= a.epochs) {
    std::printf("nothing to do: %d epochs already done (raise --epochs to continue)\n", start_epoch);
    return lgg::exit_ok;
  }

  useg::data::loader_options tl;
  tl.batch_size = a.batch;
  tl.shuffle = true;
  tl.oversample = a.oversample;
  tl.augment.enabled = !a.no_augment;
  tl.augment.flip_h = a.flip;
  tl.augment.rotate_deg = a.rotate;
  tl.augment.scale = a.zoom;
  tl.augment.brightness = a.brightness;
  tl.augment.contrast = a.contrast;
  tl.norm = norm;
  tl.seed = a.seed;
  tl.workers = a.workers;
  tl.prefetch = a.prefetch;
  useg::data::batch_loader loader(train_set, tl);
  lgg::eval_options eo;
  eo.batch = a.batch;
  eo.norm = norm;
  eo.threshold = a.threshold;
  eo.policy = useg::metrics::parse_empty_policy(a.empty);
  eo.loss = loss;

  std::signal(SIGINT, on_sigint);
  std::printf("training %d epochs (%zu batches of %d per epoch), %s, lr %g, %s loss, %s schedule%s -> %s\n", a.epochs,
              loader.batches_per_epoch(), a.batch, a.optimizer.c_str(), a.lr, a.loss.c_str(), a.schedule.c_str(),
              tl.augment.enabled ? ", augmentation on" : "", a.out.c_str());
  std::fflush(stdout);

  for (int epoch = start_epoch; epoch < a.epochs; ++epoch) {
    const double lr = lr_for(epoch);
    eng->set_lr(lr);
    eng->train(true);
    loader.start(epoch);
    char label[32];
    std::snprintf(label, sizeof label, "epoch %d/%d", epoch + 1, a.epochs);
    lgg::progress_bar bar(label, loader.batches_per_epoch());
    useg::data::batch b;
    std::size_t done = 0, images = 0;
    double loss_sum = 0;
    while (loader.next(b)) {
      if (g_interrupted) {
        bar.finish();
        std::fprintf(stderr, "interrupted during epoch %d; %s\n", epoch + 1,
                     epoch > 0 ? ("'--resume' continues after epoch " + std::to_string(epoch)).c_str() : "no epoch was completed");
        return lgg::exit_interrupted;
      }
      const int n = static_cast<int>(b.size());
      // zero_grad, forward, loss and (when finite) backward and the optimizer step on the device
      const double l = eng->train_step(b.x.data(), b.y.data(), n, train_set.channels, train_set.height, train_set.width, loss);
      if (!std::isfinite(l))
        throw useg::error("training diverged: the loss is " + std::to_string(l) + " at epoch " + std::to_string(epoch + 1) + ", batch " +
                          std::to_string(done + 1) + " (try a smaller --lr)");
      loss_sum += l * n;
      images += static_cast<std::size_t>(n);
      ++done;
      char extra[64];
      std::snprintf(extra, sizeof extra, "loss %.4f", loss_sum / static_cast<double>(images));
      bar.update(done, images, extra);
    }
    bar.finish();
    epoch_row row;
    row.epoch = epoch + 1;
    row.lr = lr;
    row.train_loss = loss_sum / static_cast<double>(std::max<std::size_t>(1, images));
    row.seconds = bar.seconds();  // training only
    row.images_per_second = static_cast<double>(images) / std::max(1e-9, row.seconds);
    json report;
    if (val_set.size()) {
      char vl[32];
      std::snprintf(vl, sizeof vl, "  val %d/%d", epoch + 1, a.epochs);
      eo.label = vl;
      const lgg::eval_result ev = lgg::evaluate(*eng, val_set, eo);
      const useg::metrics::report r = ev.ev.summary();
      report = lgg::to_json(r);
      row.val_loss = ev.loss;
      row.val_seconds = ev.seconds;
      row.val_dice = r.global_dice;
      row.val_iou = r.global_iou;
      row.val_precision = r.global_precision;
      row.val_recall = r.global_recall;
      row.val_accuracy = r.pixel_accuracy;
      row.val_background_accuracy = r.background_accuracy;
      row.val_slice_dice = r.mean_dice;
      row.val_volume_dice = r.volume_dice_mean;
      row.val_volume_dice_median = r.volume_dice_median;
      if (a.schedule == "plateau") plateau.step(r.global_dice);
    }
    history.push_back(row);
    bool is_best = false;
    if (val_set.size()) is_best = row.val_dice > best_dice;
    else is_best = row.train_loss < best_loss;
    if (is_best) {
      best_epoch = row.epoch;
      best_dice = val_set.size() ? row.val_dice : best_dice;
      best_loss = row.train_loss;
      best_report = report;
    }

    // checkpoints: weights first, then the state that points at them; best last
    auto meta = lgg::to_metadata(a.m);
    meta["epoch"] = std::to_string(row.epoch);
    meta["seed"] = std::to_string(a.seed);
    meta["split_train"] = join(split.train);
    meta["split_val"] = join(split.val);
    meta["split_test"] = join(split.test);
    if (val_set.size()) {
      char d[32];
      std::snprintf(d, sizeof d, "%.6f", row.val_dice);
      meta["val_dice"] = d;
    }
    eng->save_weights(last_w, meta);
    json hist = json::array();
    for (const auto& r : history) hist.push_back(to_json(r));
    const double plateau_best = plateau.best();
    json st{{"epoch", row.epoch},
            {"best_epoch", best_epoch},
            {"best_dice", best_dice},
            {"best_loss", std::isfinite(best_loss) ? best_loss : 0.0},
            {"best_report", best_report},
            {"history", hist},
            {"plateau",
             {{"lr", plateau.lr()},
              {"best", std::isfinite(plateau_best) ? plateau_best : -1e300},
              {"bad", plateau.bad_epochs()},
              {"cooldown", plateau.cooldown_counter()}}},
            {"seed", a.seed}};
    eng->save_training_state(last_s, st);
    if (is_best) eng->save_weights(best_w, meta);
    write_metrics_csv((out / "metrics.csv").string(), history);
    plot_curves((out / "curves.png").string(), history);

    if (val_set.size())
      std::printf("epoch %3d/%d  loss %.4f  val loss %.4f  Dice %.4f (slices %.4f, volumes %.4f)  IoU %.4f  %6.1f img/s  %s%s\n",
                  row.epoch, a.epochs, row.train_loss, row.val_loss, row.val_dice, row.val_slice_dice, row.val_volume_dice, row.val_iou,
                  row.images_per_second, lgg::format_seconds(row.seconds + row.val_seconds).c_str(), is_best ? "  *best" : "");
    else
      std::printf("epoch %3d/%d  loss %.4f  %6.1f img/s  %s%s\n", row.epoch, a.epochs, row.train_loss, row.images_per_second,
                  lgg::format_seconds(row.seconds).c_str(), is_best ? "  *best" : "");
    std::fflush(stdout);

    // the summary, rewritten every epoch
    double train_seconds = 0, val_seconds = 0, ips = 0;
    for (const auto& r : history) train_seconds += r.seconds, val_seconds += r.val_seconds, ips += r.images_per_second;
    json summary{{"program", "lgg_train"},
                 {"args", to_json(a)},
                 {"data",
                  {{"dir", data_dir},
                   {"synthetic", synthetic},
                   {"patients", {{"train", split.train.size()}, {"val", split.val.size()}, {"test", split.test.size()}}},
                   {"slices", {{"train", train_set.size()}, {"val", val_set.size()}, {"test", test_slices}}},
                   {"train_tumour_slices", tumour},
                   {"skipped", skipped}}},
                 {"model",
                  {{"name", a.m.model},
                   {"reference", eng->reference_name()},
                   {"parameters", eng->num_parameters()},
                   {"summary", eng->summary()}}},
                 {"epochs_completed", row.epoch},
                 {"device", eng->device()},
                 {"device_info", eng->device_info()},
                 {"threads", eng->host_threads()},
                 {"best", {{"epoch", best_epoch}, {"val", best_report}}},
                 {"last", to_json(row)},
                 {"timing",
                  {{"mean_epoch_train_seconds", train_seconds / static_cast<double>(history.size())},
                   {"mean_epoch_val_seconds", val_seconds / static_cast<double>(history.size())},
                   {"mean_images_per_second", ips / static_cast<double>(history.size())}}},
                 {"files",
                  {{"best", best_w},
                   {"last", last_w},
                   {"state", last_s},
                   {"metrics", (out / "metrics.csv").string()},
                   {"curves", (out / "curves.png").string()},
                   {"split", split_path}}}};
    lgg::write_text_file((out / "summary.json").string(), summary.dump(2) + "\n");
  }
  std::printf("done in %s. best epoch %d", lgg::format_seconds(std::chrono::duration<double>(clock::now() - t_start).count()).c_str(), best_epoch);
  if (val_set.size()) std::printf(" (val Dice %.4f)", best_dice);
  std::printf("\n  weights: %s (best), %s (last)\n  metrics: %s, %s, %s\n", best_w.c_str(), last_w.c_str(), (out / "metrics.csv").c_str(),
              (out / "curves.png").c_str(), (out / "summary.json").c_str());
  std::printf("next: lgg_eval --weights %s --data %s --subset %s\n", best_w.c_str(), data_dir.c_str(), split.test.empty() ? "val" : "test");
  return lgg::exit_ok;
}

}  // namespace

int main(int argc, char** argv) {
  train_args a;
  CLI::App app{"Train a U-Net family model on LGG brain MRI slices (kaggle_3m layout). Without --data, a small synthetic "
               "dataset in the same layout is written to OUT/synthetic and used (with --size 64 --width 8 --epochs 12 unless given).",
               "lgg_train"};
  app.get_formatter()->column_width(34);
  app.add_option("--data", a.data, "Dataset folder: <patient>/<patient>_<n>.tif + _mask.tif (e.g. lgg-mri-segmentation/kaggle_3m)")
      ->check(CLI::ExistingDirectory);
  app.add_option("--out", a.out, "Output folder (checkpoints, metrics.csv, curves.png, summary.json)")->capture_default_str();
  app.add_flag("--resume", a.resume, "Continue the run in --out where it stopped (optimizer state, epoch, schedule, RNG)");
  app.add_option("--weights", a.weights, "Start from these weights (safetensors, PyTorch state_dict names)")->check(CLI::ExistingFile);
  lgg::add_device_flag(app, a.device);
  lgg::add_model_flags(app, a.m);
  app.add_option("--epochs", a.epochs, "Epochs")->check(CLI::Range(1, 100000))->capture_default_str()->group("Training");
  app.add_option("--batch", a.batch, "Batch size")->check(CLI::Range(1, 4096))->capture_default_str()->group("Training");
  app.add_option("--lr", a.lr, "Learning rate")->check(CLI::PositiveNumber)->capture_default_str()->group("Training");
  app.add_option("--optimizer", a.optimizer, "adam, adamw or sgd")
      ->check(CLI::IsMember({"adam", "adamw", "sgd"}))
      ->capture_default_str()
      ->group("Training");
  app.add_option("--momentum", a.momentum, "SGD momentum")->check(CLI::Range(0.0, 1.0))->capture_default_str()->group("Training");
  app.add_option("--weight-decay", a.weight_decay, "Weight decay")->check(CLI::NonNegativeNumber)->capture_default_str()->group("Training");
  app.add_option("--loss", a.loss, "bce, dice or bce-dice")
      ->check(CLI::IsMember({"bce", "dice", "bce-dice"}))
      ->capture_default_str()
      ->group("Training");
  app.add_option("--pos-weight", a.pos_weight, "BCE weight of tumour pixels")->check(CLI::PositiveNumber)->capture_default_str()->group("Training");
  app.add_option("--schedule", a.schedule, "Learning-rate schedule: constant, step, cosine or plateau (on val Dice)")
      ->check(CLI::IsMember({"constant", "step", "cosine", "plateau"}))
      ->capture_default_str()
      ->group("Training");
  app.add_option("--step-size", a.step_size, "step: epochs between decays")->check(CLI::PositiveNumber)->capture_default_str()->group("Training");
  app.add_option("--gamma", a.gamma, "step/plateau: decay factor")->check(CLI::Range(1e-6, 0.999999))->capture_default_str()->group("Training");
  app.add_option("--patience", a.patience, "plateau: epochs without improvement before a decay")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str()
      ->group("Training");
  app.add_option("--seed", a.seed, "Seed of the split, initialization, shuffling and augmentation")->capture_default_str()->group("Training");
  app.add_option("--threads", a.threads, "Compute threads (0: all cores); with --device cuda, threads loading the data")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str()
      ->group("Training");
  app.add_option("--val-fraction", a.val_fraction, "Fraction of patients for validation")
      ->check(CLI::Range(0.0, 0.9))
      ->capture_default_str()
      ->group("Data");
  app.add_option("--test-fraction", a.test_fraction, "Fraction of patients held out for testing (lgg_eval --subset test)")
      ->check(CLI::Range(0.0, 0.9))
      ->capture_default_str()
      ->group("Data");
  app.add_option("--split-file", a.split_file, "Explicit split: lines '<train|val|test> <patient>' (overrides the fractions)")
      ->check(CLI::ExistingFile)
      ->group("Data");
  app.add_option("--patients", a.patients, "Use only the first N patients (0: all), e.g. for quick runs")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str()
      ->group("Data");
  app.add_flag("--no-augment", a.no_augment, "Turn augmentation off")->group("Data");
  app.add_option("--flip", a.flip, "Augmentation: probability of a left-right flip")->check(CLI::Range(0.0, 1.0))->capture_default_str()->group("Data");
  app.add_option("--rotate", a.rotate, "Augmentation: rotation range, +-degrees")->check(CLI::Range(0.0, 180.0))->capture_default_str()->group("Data");
  app.add_option("--zoom", a.zoom, "Augmentation: scaling range, 1 +- zoom")->check(CLI::Range(0.0, 0.9))->capture_default_str()->group("Data");
  app.add_option("--brightness", a.brightness, "Augmentation: intensity shift range (x/255 units)")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str()
      ->group("Data");
  app.add_option("--contrast", a.contrast, "Augmentation: intensity factor range, 1 +- contrast")
      ->check(CLI::Range(0.0, 0.9))
      ->capture_default_str()
      ->group("Data");
  app.add_option("--oversample", a.oversample, "Slices with tumour appear this many times per epoch")
      ->check(CLI::Range(1, 100))
      ->capture_default_str()
      ->group("Data");
  app.add_option("--workers", a.workers, "Background threads preparing batches (0: none)")->check(CLI::Range(0, 64))->capture_default_str()->group("Data");
  app.add_option("--prefetch", a.prefetch, "Batches prepared ahead")->check(CLI::Range(1, 64))->capture_default_str()->group("Data");
  app.add_flag("--skip-bad", a.skip_bad, "Skip unreadable or inconsistent files with a warning instead of stopping")->group("Data");
  app.add_flag("--mask-threshold", a.mask_threshold, "Binarize masks at 128 instead of rejecting values other than 0/255")->group("Data");
  app.add_option("--synthetic-patients", a.synthetic_patients, "Without --data: synthetic patients")
      ->check(CLI::Range(3, 1000))
      ->capture_default_str()
      ->group("Data");
  app.add_option("--synthetic-slices", a.synthetic_slices, "Without --data: slices per synthetic patient")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str()
      ->group("Data");
  app.add_option("--threshold", a.threshold, "Validation: probability threshold")->check(CLI::Range(0.0, 1.0))->capture_default_str()->group("Metrics");
  app.add_option("--empty", a.empty, "Validation: slices with empty truth and prediction score 1 (one) or are left out (exclude)")
      ->check(CLI::IsMember({"one", "exclude"}))
      ->capture_default_str()
      ->group("Metrics");
  return lgg::run_program(app, argc, argv, [&] { return train_main(app, a); });
}
