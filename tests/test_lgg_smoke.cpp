// Smoke test on the real LGG data: 1 epoch on 2 patients at 32x32, then lgg_eval and lgg_predict.
// The folder is the first argument (CMake passes ../shared/data/lgg/kaggle_3m relative to the
// source tree) or the environment variable USEG_LGG_DATA. Exits 77 (ctest: skipped) when absent.
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "useg/data/lgg.hpp"

namespace fs = std::filesystem;

namespace {
int failures = 0;
void check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
    ++failures;
  }
}
int run(const std::string& cmd) {
  std::printf("$ %s\n", cmd.c_str());
  std::fflush(stdout);
  const int st = std::system(cmd.c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
std::string q(const fs::path& p) { return "'" + p.string() + "'"; }
}  // namespace

int main(int argc, char** argv) {
  std::string data = argc > 1 ? argv[1] : "";
  if (const char* env = std::getenv("USEG_LGG_DATA")) data = env;
  if (data.empty() || !fs::is_directory(data)) {
    std::printf("SKIPPED: no LGG data at '%s' (set USEG_LGG_DATA to a kaggle_3m folder)\n", data.c_str());
    return 77;
  }
  const fs::path work = fs::path(EXAMPLES_WORK) / "smoke";
  fs::remove_all(work);
  fs::create_directories(work);
  const fs::path run_dir = work / "run";
  int rc = run(std::string("'") + LGG_TRAIN + "' --data " + q(data) +
               " --patients 2 --val-fraction 0.5 --test-fraction 0 --epochs 1 --size 32 --width 4 --depth 3 --batch 8 --threads 1"
               " --out " + q(run_dir));
  check(rc == 0, "lgg_train exit code " + std::to_string(rc));
  if (rc != 0) return 1;
  std::ifstream sf(run_dir / "summary.json");
  const auto summary = nlohmann::json::parse(sf);
  check(summary["data"]["patients"]["train"] == 1 && summary["data"]["patients"]["val"] == 1, "1 training and 1 validation patient");
  check(summary["epochs_completed"] == 1, "1 epoch");
  const double bg = summary["best"]["val"]["global"]["background_accuracy"];
  check(bg > 0.9 && bg < 1.0, "background accuracy of real LGG slices is high but below 1");

  rc = run(std::string("'") + LGG_EVAL + "' --threads 1 --weights " + q(run_dir / "best.safetensors") + " --data " + q(data) +
           " --subset val --out " + q(work / "eval"));
  check(rc == 0, "lgg_eval exit code " + std::to_string(rc));
  check(fs::exists(work / "eval" / "eval.json"), "eval.json");

  const auto idx = useg::data::scan_dataset(data);
  const auto& slice = idx.patients[0].slices[idx.patients[0].slices.size() / 2];
  rc = run(std::string("'") + LGG_PREDICT + "' --threads 1 --weights " + q(run_dir / "best.safetensors") + " --input " + q(slice.image) +
           " --out " + q(work / "pred"));
  check(rc == 0, "lgg_predict exit code " + std::to_string(rc));
  const fs::path pred = work / "pred" / (fs::path(slice.image).stem().string() + "_pred.tif");
  if (fs::exists(pred)) {
    const auto m = useg::data::read_tiff_u8(pred.string());
    const auto img = useg::data::read_tiff_u8(slice.image);
    check(m.shape()[0] == img.shape()[0] && m.shape()[1] == img.shape()[1], "prediction at the original resolution");
  } else {
    check(false, "prediction written");
  }
  std::printf(failures ? "smoke test FAILED\n" : "smoke test passed\n");
  return failures ? 1 : 0;
}
