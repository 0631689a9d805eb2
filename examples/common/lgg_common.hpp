// examples/common/lgg_common.hpp — what lgg_train, lgg_eval and lgg_predict share: model flags and
// their record in the weights' metadata, the evaluation loop, the progress bar, JSON/CSV output,
// and exit codes.
#pragma once
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine.hpp"
#include "useg/data/loader.hpp"
#include "useg/loss/losses.hpp"
#include "useg/metrics/segmentation.hpp"

namespace lgg {

/// Exit codes of the three programs.
enum exit_code : int {
  exit_ok = 0,
  exit_failure = 1,      ///< a run-time problem: unreadable data, I/O error
  exit_usage = 2,        ///< bad flags or configuration
  exit_interrupted = 130 ///< stopped by Ctrl-C (SIGINT)
};

/// The model flags all three programs share.
struct model_flags {
  std::string model = "unet";
  int width = 16;
  int depth = 4;
  int t = 2;
  std::string up = "upsample";
  int channels = 3;  ///< 3: all channels; 1: FLAIR only
  int size = 128;
  std::string normalize = "scale";  ///< scale | volume
};

/// Register --model --width --depth --t --up --channels --size --normalize on `app`.
void add_model_flags(CLI::App& app, model_flags& f);
/// Register --device {cpu,cuda} on `app` (cuda in a build without the CUDA backend is accepted
/// here and refused by make_engine with a config_error, exit code 2).
void add_device_flag(CLI::App& app, std::string& device);
/// For each model flag not given on the command line, take the value recorded in `meta` (the
/// metadata of a weights file). Returns the names of the flags taken from the file.
std::vector<std::string> apply_metadata(const CLI::App& app, model_flags& f, const std::map<std::string, std::string>& meta);
/// The metadata recording `f` (keys: model, in_channels, classes, width, depth, t, up, size, normalize).
std::map<std::string, std::string> to_metadata(const model_flags& f);
/// The model spec of `f` (1 class).
model_spec to_spec(const model_flags& f, std::uint64_t seed = 0);
useg::data::preprocess_options to_preprocess(const model_flags& f);
std::string describe(const model_flags& f);

/// Parse the command line and run `body`, turning exceptions into messages and exit codes:
/// --help -> 0, flag errors and useg::config_error -> 2, other errors -> 1.
int run_program(CLI::App& app, int argc, char** argv, const std::function<int()>& body);

/// A one-line progress bar on stderr, redrawn in place when stderr is a terminal (nothing is
/// drawn otherwise; the caller prints a summary line at the end).
class progress_bar {
 public:
  progress_bar(std::string label, std::size_t total);
  /// `done` units finished; `extra` is shown after the bar (e.g. "loss 0.1234").
  void update(std::size_t done, std::size_t images_done, const std::string& extra);
  void finish();
  double seconds() const;

 private:
  std::string label_;
  std::size_t total_;
  bool tty_;
  std::chrono::steady_clock::time_point start_, last_draw_;
  std::size_t width_ = 0;
};

/// In-place logistic sigmoid.
void sigmoid(std::vector<float>& v);

/// Called for each evaluated slice with its index in the set and its probability map (h·w).
using slice_callback = std::function<void(std::size_t index, const float* prob)>;

struct eval_options {
  int batch = 8;
  useg::data::normalization norm = useg::data::normalization::scale;
  double threshold = 0.5;
  useg::metrics::empty_policy policy = useg::metrics::empty_policy::one;
  useg::loss_options loss;
  bool show_progress = true;
  std::string label = "eval";
};

struct eval_result {
  useg::metrics::evaluator ev;
  double loss = 0;  ///< mean over slices
  double seconds = 0;
};

/// Run the engine's model in eval mode over every slice of `set` (in order), computing the loss
/// and accumulating metrics; `cb` (optional) sees each probability map.
eval_result evaluate(engine& e, const useg::data::slice_set& set, const eval_options& o, const slice_callback& cb = {});

/// A metrics report as JSON (all fields).
nlohmann::json to_json(const useg::metrics::report& r);
/// Per-patient CSV: patient, slices, tumour slices, tp, fp, fn, tn, dice, iou, precision, recall.
void write_patient_csv(const std::string& path, const useg::metrics::evaluator& ev);
/// Per-slice CSV: patient, slice, tp, fp, fn, tn, dice, iou, precision, recall (empty when excluded).
void write_slice_csv(const std::string& path, const useg::metrics::evaluator& ev);
/// Print a metrics report as a small table.
void print_report(std::FILE* f, const useg::metrics::report& r);

/// Write text atomically (temporary file + rename).
void write_text_file(const std::string& path, const std::string& text);
std::string format_seconds(double s);
std::string format_bytes(std::size_t b);

}  // namespace lgg
