// lgg_eval — evaluate a trained model on a split of an LGG dataset (or a whole folder): global,
// per-slice and per-volume metrics, printed and written as eval.json, per_patient.csv and
// per_slice.csv. --device cuda runs the model on an NVIDIA GPU. Exit codes: 0 done, 1 run-time
// failure (also: no usable GPU), 2 bad flags (also: --device cuda in a CPU-only build).
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/lgg_common.hpp"
#include "useg/io/checkpoint.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct eval_args {
  std::string weights, data, subset = "test", split_file, out, empty = "one", resolution = "original", device = "cpu";
  lgg::model_flags m;
  double threshold = 0.5;
  int batch = 8, threads = 0;
  bool skip_bad = false, mask_threshold = false;
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) v.push_back(item);
  return v;
}

int eval_main(CLI::App& app, eval_args& a) {
  const auto meta = useg::io::read_metadata(a.weights);
  const auto taken = lgg::apply_metadata(app, a.m, meta);
  if (!taken.empty()) {
    std::string s;
    for (const auto& t : taken) s += (s.empty() ? "" : ", ") + t;
    std::printf("from the checkpoint: %s\n", s.c_str());
  }
  const std::unique_ptr<lgg::engine> eng = lgg::make_engine(a.device, a.threads);
  useg::data::scan_options so;
  so.skip_bad = a.skip_bad;
  const useg::data::dataset_index index = useg::data::scan_dataset(a.data, so);
  for (const auto& w : index.warnings) std::fprintf(stderr, "warning: skipped: %s\n", w.c_str());

  // which patients
  std::vector<std::string> patients;
  std::string split_source;
  if (a.subset == "all") {
    patients = index.patient_ids();
    split_source = "all patients in the folder";
  } else {
    useg::data::patient_split sp;
    const fs::path beside = fs::path(a.weights).parent_path() / "split.txt";
    if (!a.split_file.empty()) {
      sp = useg::data::read_split_file(a.split_file);
      split_source = a.split_file;
    } else if (meta.count("split_" + a.subset)) {
      sp.train = split_list(meta.count("split_train") ? meta.at("split_train") : "");
      sp.val = split_list(meta.count("split_val") ? meta.at("split_val") : "");
      sp.test = split_list(meta.count("split_test") ? meta.at("split_test") : "");
      split_source = "the split recorded in " + a.weights;
    } else if (fs::exists(beside)) {
      sp = useg::data::read_split_file(beside.string());
      split_source = beside.string();
    } else {
      throw useg::config_error("--subset " + a.subset + ": '" + a.weights +
                               "' records no split and there is no split.txt beside it; give --split-file or use --subset all");
    }
    patients = a.subset == "train" ? sp.train : a.subset == "val" ? sp.val : sp.test;
    if (patients.empty())
      throw useg::config_error("--subset " + a.subset + " is empty in " + split_source + " (try --subset val or --subset all)");
    for (const auto& p : patients)
      if (!index.find(p))
        throw useg::config_error("patient '" + p + "' of the " + a.subset + " split (" + split_source + ") is not in '" + a.data +
                                 "' (evaluate another folder with --subset all)");
  }

  useg::data::load_options lo;
  lo.pre = lgg::to_preprocess(a.m);
  lo.pre.threshold_masks = a.mask_threshold;
  lo.skip_bad = a.skip_bad;
  lo.threads = std::max(1, eng->host_threads());
  useg::data::load_report rep;
  const useg::data::slice_set set = useg::data::load_slices(index, patients, lo, &rep);
  for (const auto& w : rep.warnings) std::fprintf(stderr, "warning: skipped: %s\n", w.c_str());
  if (set.size() == 0) throw useg::io_error("no readable slices to evaluate in '" + a.data + "'");

  eng->build_model(lgg::to_spec(a.m));
  eng->load_weights(a.weights);
  std::printf("model: %s (%s), %zu parameters, weights %s\n", lgg::describe(a.m).c_str(), eng->reference_name(), eng->num_parameters(),
              a.weights.c_str());
  std::printf("device: %s\n", eng->device_info().c_str());
  std::printf("data: %s, subset %s (%s): %zu patients, %zu slices\n", a.data.c_str(), a.subset.c_str(), split_source.c_str(),
              set.patients.size(), set.size());

  lgg::eval_options eo;
  eo.batch = a.batch;
  eo.norm = useg::data::parse_normalization(a.m.normalize);
  eo.threshold = a.threshold;
  eo.policy = useg::metrics::parse_empty_policy(a.empty);
  // at the original resolution: probabilities resized back (bilinear) and compared with the
  // original masks
  const bool original = a.resolution == "original";
  useg::metrics::evaluator native(eo.policy, eo.threshold);
  lgg::slice_callback cb;
  if (original)
    cb = [&](std::size_t i, const float* prob) {
      const auto& r = set.records[i];
      const useg::data::mask_u8 truth = useg::data::read_mask(r.mask_path, a.mask_threshold);
      const std::size_t oh = truth.shape()[0], ow = truth.shape()[1];
      const std::vector<float> p = useg::data::resize_bilinear(prob, static_cast<std::size_t>(set.height),
                                                               static_cast<std::size_t>(set.width), oh, ow);
      native.add(set.patients[r.patient], r.number, p.data(), truth.data(), oh * ow);
    };
  const lgg::eval_result res = lgg::evaluate(*eng, set, eo, cb);
  const useg::metrics::evaluator& ev = original ? native : res.ev;
  const useg::metrics::report r = ev.summary();
  std::printf("metrics at the %s resolution, threshold %.2f (%.1f s, %.1f slices/s):\n",
              original ? "original" : ("model's " + std::to_string(a.m.size) + "x" + std::to_string(a.m.size)).c_str(), a.threshold,
              res.seconds, static_cast<double>(set.size()) / std::max(1e-9, res.seconds));
  lgg::print_report(stdout, r);

  const fs::path out = a.out.empty() ? fs::path(a.weights).parent_path() / ("eval_" + a.subset) : fs::path(a.out);
  fs::create_directories(out);
  json j{{"program", "lgg_eval"},
         {"weights", a.weights},
         {"data", a.data},
         {"subset", a.subset},
         {"split_source", split_source},
         {"patients", set.patients},
         {"slices", set.size()},
         {"skipped", index.skipped + rep.skipped},
         {"model", lgg::to_metadata(a.m)},
         {"device", eng->device()},
         {"resolution", a.resolution},
         {"loss", res.loss},
         {"seconds", res.seconds},
         {"metrics", lgg::to_json(r)}};
  if (original) j["metrics_at_model_resolution"] = lgg::to_json(res.ev.summary());
  lgg::write_text_file((out / "eval.json").string(), j.dump(2) + "\n");
  lgg::write_patient_csv((out / "per_patient.csv").string(), ev);
  lgg::write_slice_csv((out / "per_slice.csv").string(), ev);
  std::printf("wrote %s, %s, %s\n", (out / "eval.json").c_str(), (out / "per_patient.csv").c_str(), (out / "per_slice.csv").c_str());
  if (index.skipped + rep.skipped) std::printf("%zu bad files or slices were skipped\n", index.skipped + rep.skipped);
  return lgg::exit_ok;
}

}  // namespace

int main(int argc, char** argv) {
  eval_args a;
  CLI::App app{"Evaluate a trained model on LGG slices: global, per-slice and per-volume (per-patient 3-D) metrics.", "lgg_eval"};
  app.get_formatter()->column_width(34);
  app.add_option("--weights", a.weights, "Weights file (safetensors) written by lgg_train, or a PyTorch state_dict in safetensors")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--data", a.data, "Dataset folder (kaggle_3m layout) or one patient folder")->required()->check(CLI::ExistingPath);
  app.add_option("--subset", a.subset, "test, val or train patients of the training run's split, or all patients in --data")
      ->check(CLI::IsMember({"test", "val", "train", "all"}))
      ->capture_default_str();
  app.add_option("--split-file", a.split_file, "Split lines '<train|val|test> <patient>' (default: the split recorded in the weights)")
      ->check(CLI::ExistingFile);
  app.add_option("--out", a.out, "Output folder (default: eval_<subset> beside the weights)");
  lgg::add_device_flag(app, a.device);
  lgg::add_model_flags(app, a.m);
  app.add_option("--resolution", a.resolution, "Compare at the original mask resolution or at the model's --size")
      ->check(CLI::IsMember({"original", "model"}))
      ->capture_default_str();
  app.add_option("--threshold", a.threshold, "Probability threshold")->check(CLI::Range(0.0, 1.0))->capture_default_str();
  app.add_option("--empty", a.empty, "Slices with empty truth and prediction score 1 (one) or are left out (exclude)")
      ->check(CLI::IsMember({"one", "exclude"}))
      ->capture_default_str();
  app.add_option("--batch", a.batch, "Batch size")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--threads", a.threads, "Compute threads (0: all cores); with --device cuda, threads loading the data")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag("--skip-bad", a.skip_bad, "Skip unreadable or inconsistent files with a warning");
  app.add_flag("--mask-threshold", a.mask_threshold, "Binarize masks at 128 instead of rejecting values other than 0/255");
  return lgg::run_program(app, argc, argv, [&] { return eval_main(app, a); });
}
