// End-to-end tests of the example programs (lgg_train, lgg_eval, lgg_predict) on synthetic data:
// exit codes, the files they write (read back with libtiff/nlohmann-json), the train -> eval ->
// predict chain, exact resume, every model family, --device cuda (works with a GPU, fails cleanly
// without one or in a CPU-only build), and the model registry.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#include <sys/wait.h>

#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/engine.hpp"
#include "common/model_registry.hpp"
#include "useg/data/lgg.hpp"
#include "useg/io/checkpoint.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct result {
  int code = -1;    ///< exit code; -1 when killed by a signal
  int signal = 0;   ///< the signal that ended the program (SIGSEGV, SIGABRT, ...), 0 when it exited
  std::string output;
};

/// Run a shell command; stdout and stderr together. The shell execs the program, so a program
/// killed by a signal shows as one (a shell that forks reports 128 + the signal: counted too).
result run(const std::string& cmd) {
  result r;
  std::FILE* p = ::popen(("exec " + cmd + " 2>&1").c_str(), "r");
  REQUIRE(p);
  char buf[4096];
  while (std::size_t n = std::fread(buf, 1, sizeof buf, p)) r.output.append(buf, n);
  const int st = ::pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  if (WIFSIGNALED(st)) r.signal = WTERMSIG(st);
  else if (r.code > 128) r.signal = r.code - 128;
  return r;
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string q(const fs::path& p) {
  std::string s = "'";  // (not "'" + p.string() + "'": a GCC 12 -Wrestrict false positive)
  s += p.string();
  s += "'";
  return s;
}

fs::path fresh(const std::string& name) {
  const fs::path d = fs::path(EXAMPLES_WORK) / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
std::vector<std::string> lines(const fs::path& p) {
  std::vector<std::string> v;
  std::ifstream f(p);
  for (std::string l; std::getline(f, l);)
    if (!l.empty()) v.push_back(l);
  return v;
}
json read_json(const fs::path& p) {
  std::ifstream f(p);
  return json::parse(f);
}
bool is_png(const fs::path& p) { return read_file(p).rfind("\x89PNG\r\n\x1a\n", 0) == 0; }

const std::string kTiny = " --threads 1 --synthetic-patients 5 --synthetic-slices 6 --size 32 --width 4 --depth 2 --batch 4";
const std::string kTrain = std::string("'") + LGG_TRAIN + "'", kEval = std::string("'") + LGG_EVAL + "'",
                  kPredict = std::string("'") + LGG_PREDICT + "'";

}  // namespace

TEST_CASE("help and usage errors give conventional exit codes and clear messages") {
  for (const auto& prog : {kTrain, kEval, kPredict}) {
    const result h = run(prog + " --help");
    CHECK(h.code == 0);
    CHECK(h.output.find("--model") != std::string::npos);
    CHECK(h.output.find("--size") != std::string::npos);
  }
  result r = run(kTrain + " --model nope");
  CHECK(r.code == 2);
  CHECK(r.output.find("nope") != std::string::npos);
  r = run(kTrain + " --no-such-flag");
  CHECK(r.code == 2);
  r = run(kEval + " --data .");
  CHECK(r.code == 2);
  CHECK(r.output.find("--weights") != std::string::npos);
  r = run(kPredict + " --weights /nonexistent.safetensors --input .");
  CHECK(r.code == 2);

  const fs::path d = fresh("errors");
  // a weights file that is not one
  std::ofstream(d / "bad.safetensors") << "not a safetensors file";
  r = run(kEval + " --weights " + q(d / "bad.safetensors") + " --data " + q(d));
  CHECK(r.code == 1);
  CHECK(r.output.find("bad.safetensors") != std::string::npos);
  // a dataset with a corrupt image: an error naming it, or skipped with --skip-bad
  const fs::path data = d / "data";
  r = run(kTrain + kTiny + " --epochs 1 --out " + q(d / "gen"));  // writes gen/synthetic
  REQUIRE(r.code == 0);
  fs::copy(d / "gen" / "synthetic", data, fs::copy_options::recursive);
  const auto idx = useg::data::scan_dataset(data.string());
  const std::string victim = idx.patients[1].slices[2].image;
  std::ofstream(victim, std::ios::trunc) << "truncated";
  r = run(kTrain + kTiny + " --epochs 1 --val-fraction 0.2 --test-fraction 0 --data " + q(data) + " --out " + q(d / "run"));
  CHECK(r.code == 1);
  CHECK(r.output.find(fs::path(victim).filename().string()) != std::string::npos);
  r = run(kTrain + kTiny + " --epochs 1 --val-fraction 0.2 --test-fraction 0 --skip-bad --data " + q(data) + " --out " + q(d / "run"));
  CHECK(r.code == 0);
  CHECK(r.output.find("warning: skipped") != std::string::npos);
  CHECK(r.output.find("1 bad files or slices skipped") != std::string::npos);
  // an image without its mask
  fs::remove(fs::path(idx.patients[2].slices[0].mask));
  r = run(kTrain + kTiny + " --epochs 1 --data " + q(data) + " --out " + q(d / "run2"));
  CHECK(r.code == 1);
  CHECK(r.output.find("without a mask") != std::string::npos);
}

TEST_CASE("train -> eval -> predict on synthetic data") {
  const fs::path d = fresh("chain");
  const fs::path run_dir = d / "run";
  result r = run(kTrain + kTiny + " --epochs 2 --out " + q(run_dir));
  INFO(r.output);
  REQUIRE(r.code == 0);
  for (const char* f : {"best.safetensors", "last.safetensors", "last.state.safetensors", "metrics.csv", "curves.png", "summary.json",
                        "split.txt", "config.json"})
    CHECK(fs::exists(run_dir / f));
  CHECK(is_png(run_dir / "curves.png"));
  const auto csv = lines(run_dir / "metrics.csv");
  REQUIRE(csv.size() == 3);
  CHECK(csv[0].rfind("epoch,lr,train_loss,val_loss,val_dice", 0) == 0);
  CHECK(csv[2].rfind("2,", 0) == 0);
  const json summary = read_json(run_dir / "summary.json");
  CHECK(summary["epochs_completed"] == 2);
  CHECK(summary["data"]["synthetic"] == true);
  // the split: patient-level, disjoint, complete
  const auto ids = useg::data::scan_dataset((run_dir / "synthetic").string()).patient_ids();
  REQUIRE(ids.size() == 5);
  const auto split = useg::data::read_split_file((run_dir / "split.txt").string(), ids);
  std::set<std::string> all;
  for (const auto* v : {&split.train, &split.val, &split.test}) all.insert(v->begin(), v->end());
  CHECK(all.size() == 5);
  CHECK(split.train.size() + split.val.size() + split.test.size() == 5);
  REQUIRE(!split.val.empty());
  // the model flags are recorded in the weights
  const auto meta = useg::io::read_metadata((run_dir / "best.safetensors").string());
  CHECK(meta.at("model") == "unet");
  CHECK(meta.at("width") == "4");
  CHECK(meta.at("depth") == "2");
  CHECK(meta.at("size") == "32");
  CHECK(meta.at("in_channels") == "3");

  // eval on the validation patients, flags from the checkpoint
  r = run(kEval + " --threads 1 --weights " + q(run_dir / "best.safetensors") + " --data " + q(run_dir / "synthetic") +
          " --subset val --out " + q(d / "eval"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("from the checkpoint: --model unet, --width 4") != std::string::npos);
  const json ej = read_json(d / "eval" / "eval.json");
  CHECK(ej["subset"] == "val");
  CHECK(ej["metrics"]["per_volume"]["volumes"] == split.val.size());
  CHECK(ej["metrics"]["per_slice"]["slices"] == 6 * split.val.size());
  const double bg = ej["metrics"]["global"]["background_accuracy"];
  CHECK(bg > 0.5);
  CHECK(bg < 1.0);
  CHECK(lines(d / "eval" / "per_patient.csv").size() == 1 + split.val.size());
  CHECK(lines(d / "eval" / "per_slice.csv").size() == 1 + 6 * split.val.size());
  // --subset test with no test patients recorded is a usage error... here test has patients
  r = run(kEval + " --threads 1 --weights " + q(run_dir / "best.safetensors") + " --data " + q(run_dir / "synthetic") + " --subset all --out " +
          q(d / "eval_all"));
  CHECK(r.code == 0);
  CHECK(read_json(d / "eval_all" / "eval.json")["metrics"]["per_volume"]["volumes"] == 5);

  // predict one patient folder with probabilities
  const fs::path patient = run_dir / "synthetic" / split.val[0];
  r = run(kPredict + " --threads 1 --probabilities --weights " + q(run_dir / "best.safetensors") + " --input " + q(patient) + " --out " +
          q(d / "pred"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(lines(d / "pred" / "predictions.csv").size() == 7);
  for (int n = 1; n <= 6; ++n) {
    const std::string stem = split.val[0] + "_" + std::to_string(n);
    CAPTURE(stem);
    const auto pred = useg::data::read_tiff_u8((d / "pred" / (stem + "_pred.tif")).string());
    const auto prob = useg::data::read_tiff_f32((d / "pred" / (stem + "_prob.tif")).string());
    REQUIRE(pred.shape()[0] == 32);
    REQUIRE(pred.shape()[1] == 32);
    REQUIRE(pred.shape()[2] == 1);
    REQUIRE(prob.shape()[0] == 32);
    std::size_t bad = 0;
    for (std::size_t i = 0; i < 32 * 32; ++i) {
      const float p = prob.data()[i];
      const std::uint8_t m = pred.data()[i];
      bad += !(p >= 0 && p <= 1) || (m != 0 && m != 255) || ((p >= 0.5f) != (m == 255));
    }
    CHECK(bad == 0);
    CHECK(is_png(d / "pred" / (stem + "_overlay.png")));
  }
  // one file, and a whole dataset (one folder per patient)
  r = run(kPredict + " --threads 1 --weights " + q(run_dir / "best.safetensors") + " --input " + q(patient / (split.val[0] + "_3.tif")) +
          " --out " + q(d / "pred1"));
  CHECK(r.code == 0);
  CHECK(fs::exists(d / "pred1" / (split.val[0] + "_3_pred.tif")));
  CHECK(fs::exists(d / "pred1" / (split.val[0] + "_3_overlay.png")));
  r = run(kPredict + " --threads 1 --no-overlay --weights " + q(run_dir / "best.safetensors") + " --input " + q(run_dir / "synthetic") +
          " --out " + q(d / "pred_all"));
  CHECK(r.code == 0);
  for (const auto& id : ids) CHECK(fs::exists(d / "pred_all" / id / (id + "_6_pred.tif")));
  CHECK(!fs::exists(d / "pred_all" / ids[0] / (ids[0] + "_6_overlay.png")));
  // an explicit flag that contradicts the checkpoint: the weights do not fit, one clear error
  r = run(kPredict + " --threads 1 --up transpose --weights " + q(run_dir / "best.safetensors") + " --input " + q(patient) + " --out " +
          q(d / "pred_bad"));
  CHECK(r.code == 1);
  CHECK(r.output.find("best.safetensors") != std::string::npos);
  CHECK(r.output.find("Up3") != std::string::npos);

  // lgg_train --weights: start from a weights file; one of another architecture is an error
  r = run(kTrain + kTiny + " --epochs 1 --weights " + q(run_dir / "best.safetensors") + " --out " + q(d / "finetune"));
  CHECK(r.code == 0);
  CHECK(r.output.find("initial weights") != std::string::npos);
  std::string wide = kTiny;
  wide.replace(wide.find("--width 4"), 9, "--width 8");
  r = run(kTrain + wide + " --epochs 1 --weights " + q(run_dir / "best.safetensors") + " --out " + q(d / "finetune2"));
  CHECK(r.code == 1);
  CHECK(r.output.find("best.safetensors") != std::string::npos);
}

TEST_CASE("--resume continues exactly where the run stopped") {
  const fs::path d = fresh("resume");
  const std::string common = kTrain + kTiny + " --oversample 2 --schedule cosine";
  result a = run(common + " --epochs 3 --out " + q(d / "a"));
  INFO(a.output);
  REQUIRE(a.code == 0);
  result b = run(common + " --epochs 1 --out " + q(d / "b"));
  REQUIRE(b.code == 0);
  b = run(kTrain + " --resume --epochs 3 --out " + q(d / "b"));
  INFO(b.output);
  REQUIRE(b.code == 0);
  CHECK(b.output.find("resuming") != std::string::npos);
  // identical weights (parameters, BN statistics, counters) and identical metrics
  CHECK(read_file(d / "a" / "last.safetensors") == read_file(d / "b" / "last.safetensors"));
  const auto la = lines(d / "a" / "metrics.csv"), lb = lines(d / "b" / "metrics.csv");
  REQUIRE(la.size() == 4);
  REQUIRE(lb.size() == 4);
  for (std::size_t i = 1; i < 4; ++i) {
    // columns up to val_volume_dice_median; the timing columns differ
    auto cut = [](const std::string& s) {
      std::size_t pos = 0;
      for (int k = 0; k < 13; ++k) pos = s.find(',', pos) + 1;
      return s.substr(0, pos);
    };
    CHECK(cut(la[i]) == cut(lb[i]));
  }
  // nothing left to do; a changed flag; nothing to resume
  b = run(kTrain + " --resume --epochs 3 --out " + q(d / "b"));
  CHECK(b.code == 0);
  CHECK(b.output.find("nothing to do") != std::string::npos);
  b = run(kTrain + " --resume --epochs 4 --lr 0.1 --out " + q(d / "b"));
  CHECK(b.code == 2);
  CHECK(b.output.find("--lr") != std::string::npos);
  b = run(kTrain + " --resume --out " + q(d / "none"));
  CHECK(b.code == 2);
}

TEST_CASE("every model family trains, and lgg_eval picks its flags from the checkpoint") {
  const fs::path d = fresh("families");
  struct variant {
    const char* model;
    const char* extra;
  };
  for (const variant v : {variant{"attention-unet", " --channels 1 --up transpose"}, variant{"r2unet", " --t 1 --normalize volume"},
                          variant{"ar2unet", " --t 1 --channels 1 --oversample 2 --optimizer sgd --lr 0.01"}}) {
    CAPTURE(v.model);
    const fs::path out = d / v.model;
    result r = run(kTrain + kTiny + " --epochs 1 --model " + v.model + v.extra + " --out " + q(out));
    INFO(r.output);
    REQUIRE(r.code == 0);
    r = run(kEval + " --threads 1 --subset all --weights " + q(out / "last.safetensors") + " --data " + q(out / "synthetic") + " --out " +
            q(out / "eval"));
    INFO(r.output);
    REQUIRE(r.code == 0);
    CHECK(r.output.find(std::string("from the checkpoint: --model ") + v.model) != std::string::npos);
    const json ej = read_json(out / "eval" / "eval.json");
    CHECK(ej["model"]["model"] == v.model);
  }
}

TEST_CASE("--device cuda works where there is a GPU, and otherwise fails with a clear message, never a crash") {
  const fs::path d = fresh("device");
  result r = run(kTrain + kTiny + " --epochs 1 --device tpu --out " + q(d / "tpu"));
  CHECK(r.code == 2);
  CHECK(r.output.find("--device") != std::string::npos);
  // weights and data from a CPU run
  r = run(kTrain + kTiny + " --epochs 1 --device cpu --out " + q(d / "cpu"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(read_json(d / "cpu" / "summary.json")["device"] == "cpu");
  const std::string weights = q(d / "cpu" / "last.safetensors"), data = q(d / "cpu" / "synthetic");
  struct program {
    const char* name;
    std::string cmd;
  };
  std::vector<program> programs{
      {"lgg_train", kTrain + kTiny + " --epochs 1 --device cuda --out " + q(d / "train")},
      {"lgg_eval", kEval + " --threads 1 --device cuda --subset all --weights " + weights + " --data " + data + " --out " + q(d / "eval")},
      {"lgg_predict",
       kPredict + " --threads 1 --device cuda --no-overlay --weights " + weights + " --input " + data + " --out " + q(d / "predict")}};
#ifdef USEG_BENCH
  programs.push_back({"useg_bench", std::string("'") + USEG_BENCH +
                                        "' --device cuda --model unet --width 4 --depth 2 --size 32 --batch 2 --warmup 1 --iters 1"});
#endif
  for (const auto& p : programs) {
    CAPTURE(p.name);
    r = run(p.cmd);
    INFO(r.output);
    CHECK(r.signal == 0);  // no segfault, no abort (an uncaught exception)
    REQUIRE(r.code >= 0);
    if (r.code == 0) {
      // a build with the CUDA backend on a machine with a GPU: the run happened on it
      CHECK(lgg::built_with_cuda());
      const std::string name = p.name;
      if (name == "lgg_train") CHECK(read_json(d / "train" / "summary.json")["device"] == "cuda");
      if (name == "lgg_eval") CHECK(read_json(d / "eval" / "eval.json")["device"] == "cuda");
      if (name == "lgg_predict") CHECK(lines(d / "predict" / "predictions.csv").size() == 1 + 5 * 6);
      if (name == "useg_bench") {
        const json j = json::parse(r.output.substr(r.output.find('{')));
        CHECK(j["device"] == "cuda");
        CHECK(j["gpu_peak_mb"].get<double>() > 0);
      }
      continue;
    }
    // otherwise a clear message naming cuda, and the conventional exit code
    CHECK(lower(r.output).find("cuda") != std::string::npos);
    CHECK(r.output.find("terminate called") == std::string::npos);
    if (lgg::built_with_cuda()) {
      CHECK(r.code == 1);  // a run-time problem: no usable GPU or driver
      CHECK(r.output.find("CUDA") != std::string::npos);
    } else {
      CHECK(r.code == 2);  // a usage error: this build has no CUDA backend
      CHECK(r.output.find("built without the CUDA backend") != std::string::npos);
    }
  }
}

TEST_CASE("model registry: compiled-in combinations, clear message otherwise") {
  for (const auto& name : lgg::model_names())
    for (int in : {1, 3}) {
      lgg::model_spec s;
      s.model = name;
      s.in_channels = in;
      s.cfg.width = 4;
      s.cfg.depth = 2;
      auto m = lgg::make_model(s);
      REQUIRE(m);
      CHECK(m->num_parameters() > 0);
      CHECK(m->params().find(name.find("r2") != std::string::npos ? "RRCNN1.Conv_1x1.weight" : "Conv1.conv.0.weight").valid());
    }
  lgg::model_spec s;
  s.in_channels = 2;
  try {
    lgg::make_model(s);
    FAIL("expected a config_error");
  } catch (const useg::config_error& e) {
    const std::string m = e.what();
    CHECK(m.find("2 input channel") != std::string::npos);
    CHECK(m.find("ar2unet: input channels 1 or 3") != std::string::npos);
  }
  s.in_channels = 3;
  s.model = "segnet";
  CHECK_THROWS_AS(lgg::make_model(s), useg::config_error);
}
