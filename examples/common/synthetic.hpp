// examples/common/synthetic.hpp — a small synthetic dataset in the kaggle_3m layout, so the
// programs run on a fresh machine: ellipse "brains" whose size follows the slice position, with
// bright 3-D blobs (brightest in the FLAIR channel) as lesions; masks mark the blobs.
#pragma once
#include <cstdint>
#include <string>

namespace lgg {

struct synthetic_options {
  int patients = 10;
  int slices = 16;  ///< per patient
  int size = 64;    ///< image side
  std::uint64_t seed = 1;
};

/// Write the dataset under `dir` (dir/<patient>/<patient>_<n>.tif and _mask.tif). Returns the
/// number of slices written.
int write_synthetic_dataset(const std::string& dir, const synthetic_options& o);

}  // namespace lgg
