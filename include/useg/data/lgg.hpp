// useg/data/lgg.hpp — the LGG (kaggle_3m) layout: finding slices, reading and preprocessing them,
// and splitting patients into train / val / test.
//
// Layout: ROOT/<patient>/<patient>_<n>.tif with masks <patient>_<n>_mask.tif; slices are ordered by
// n numerically. Images are 8-bit RGB (pre-contrast, FLAIR, post-contrast) or gray; masks 8-bit
// with values 0 and 255 (read as 0/1).
//
//   scan_dataset(path)         find patients and slices (a dataset folder, one patient folder, or
//                              one .tif file); problems are io_errors naming the file, or warnings
//                              with skip_bad.
//   load_slice(files, opts)    read one image/mask pair, pick channels, resize.
//   load_slices(index, ids)    read many slices into memory (8-bit, at the target size).
//   split_patients(...)        seeded patient-level split; read/write_split_file for explicit lists.
#pragma once
#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <xtensor/xtensor.hpp>

#include "useg/core/error.hpp"
#include "useg/core/rng.hpp"
#include "useg/data/tiff.hpp"

namespace useg::data {

/// A binary mask, shape (height, width), values 0/1.
using mask_u8 = xt::xtensor<std::uint8_t, 2>;

// ====================================================================== layout

/// One slice: image path and (possibly empty) mask path.
struct slice_files {
  int number = 0;     ///< n of <patient>_<n>.tif
  std::string image;  ///< image path
  std::string mask;   ///< mask path; empty when the slice has none
};

/// One patient folder, slices ordered by number.
struct patient_files {
  std::string id;   ///< folder name, e.g. TCGA_CS_4941_19960909
  std::string dir;  ///< folder path
  std::vector<slice_files> slices;
};

/// Everything scan_dataset found.
struct dataset_index {
  std::string root;
  std::vector<patient_files> patients;  ///< sorted by id
  std::vector<std::string> warnings;    ///< problems skipped with skip_bad
  std::size_t skipped = 0;              ///< files or folders skipped
  std::size_t num_slices() const {
    std::size_t n = 0;
    for (const auto& p : patients) n += p.slices.size();
    return n;
  }
  std::vector<std::string> patient_ids() const {
    std::vector<std::string> v;
    for (const auto& p : patients) v.push_back(p.id);
    return v;
  }
  const patient_files* find(const std::string& id) const {
    for (const auto& p : patients)
      if (p.id == id) return &p;
    return nullptr;
  }
};

struct scan_options {
  bool require_masks = true;  ///< an image without a mask is a problem (training, evaluation)
  bool skip_bad = false;      ///< skip problems with a warning instead of throwing io_error
};

namespace detail {

inline std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
inline bool is_tiff_name(const std::filesystem::path& p) {
  const std::string e = lower(p.extension().string());
  return e == ".tif" || e == ".tiff";
}
/// Parse "<prefix>_<n>[_mask].tif". Returns false when the name does not follow the pattern.
inline bool parse_slice_name(const std::filesystem::path& p, std::string& prefix, int& number, bool& is_mask) {
  std::string stem = p.stem().string();
  is_mask = false;
  if (stem.size() > 5 && lower(stem.substr(stem.size() - 5)) == "_mask") {
    is_mask = true;
    stem.resize(stem.size() - 5);
  }
  const auto us = stem.rfind('_');
  if (us == std::string::npos || us + 1 >= stem.size()) return false;
  const std::string digits = stem.substr(us + 1);
  if (digits.size() > 6 || !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) return false;
  prefix = stem.substr(0, us);
  number = std::stoi(digits);
  return true;
}

/// Report a problem: throw, or record a warning when skipping.
struct problem_sink {
  dataset_index* index;
  bool skip;
  void operator()(const std::string& msg) const {
    if (!skip) throw io_error(msg);
    index->warnings.push_back(msg);
    ++index->skipped;
  }
};

inline void scan_patient_folder(const std::filesystem::path& dir, const scan_options& o, dataset_index& idx,
                                const problem_sink& problem) {
  namespace fs = std::filesystem;
  struct pair_t {
    std::string image, mask;
  };
  std::map<std::pair<std::string, int>, pair_t> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (!e.is_regular_file() || !is_tiff_name(e.path())) continue;
    std::string prefix;
    int n = 0;
    bool is_mask = false;
    if (!parse_slice_name(e.path(), prefix, n, is_mask)) {
      problem("'" + e.path().string() + "': file name does not follow <patient>_<n>.tif or <patient>_<n>_mask.tif");
      continue;
    }
    auto& slot = found[{prefix, n}];
    std::string& dst = is_mask ? slot.mask : slot.image;
    if (!dst.empty()) {
      problem("'" + e.path().string() + "': slice " + std::to_string(n) + " appears twice (also '" + dst + "')");
      continue;
    }
    dst = e.path().string();
  }
  if (ec) {
    problem("'" + dir.string() + "': cannot list the folder (" + ec.message() + ")");
    return;
  }
  patient_files p;
  p.id = dir.filename().string();
  p.dir = dir.string();
  for (const auto& [key, f] : found) {
    if (f.image.empty()) {
      problem("'" + f.mask + "': mask without an image (expected '" +
              (dir / (key.first + "_" + std::to_string(key.second) + ".tif")).string() + "')");
      continue;
    }
    if (f.mask.empty() && o.require_masks) {
      problem("'" + f.image + "': image without a mask (expected '" +
              (dir / (key.first + "_" + std::to_string(key.second) + "_mask.tif")).string() + "')");
      continue;
    }
    p.slices.push_back({key.second, f.image, f.mask});
  }
  std::stable_sort(p.slices.begin(), p.slices.end(), [](const slice_files& a, const slice_files& b) { return a.number < b.number; });
  for (std::size_t i = 1; i < p.slices.size(); ++i)
    if (p.slices[i].number == p.slices[i - 1].number) {
      problem("'" + p.dir + "': slice number " + std::to_string(p.slices[i].number) + " is used by two different name prefixes ('" +
              p.slices[i - 1].image + "', '" + p.slices[i].image + "')");
      p.slices.erase(p.slices.begin() + static_cast<std::ptrdiff_t>(i));
      --i;
    }
  if (p.slices.empty()) {
    if (found.empty()) problem("'" + dir.string() + "': patient folder contains no TIFF slices");
    return;
  }
  idx.patients.push_back(std::move(p));
}

}  // namespace detail

/// Find the slices under `path`: a dataset folder (one sub-folder per patient), a single patient
/// folder (TIFFs directly inside), or a single .tif image (its mask is picked up when present).
/// Hidden entries and non-TIFF files (README.md, data.csv) are ignored.
inline dataset_index scan_dataset(const std::string& path, const scan_options& o = {}) {
  namespace fs = std::filesystem;
  dataset_index idx;
  idx.root = path;
  const detail::problem_sink problem{&idx, o.skip_bad};
  std::error_code ec;
  if (!fs::exists(path, ec)) throw io_error("'" + path + "': no such file or folder");
  if (fs::is_regular_file(path, ec)) {
    const fs::path p(path);
    if (!detail::is_tiff_name(p)) throw io_error("'" + path + "': not a .tif/.tiff file");
    std::string prefix;
    int n = 0;
    bool is_mask = false;
    slice_files s;
    if (detail::parse_slice_name(p, prefix, n, is_mask)) {
      if (is_mask) throw io_error("'" + path + "': this is a mask; give the image file");
      s.number = n;
      const fs::path m = p.parent_path() / (p.stem().string() + "_mask" + p.extension().string());
      if (fs::exists(m, ec)) s.mask = m.string();
    }
    s.image = p.string();
    if (s.mask.empty() && o.require_masks) throw io_error("'" + path + "': image without a mask");
    patient_files pf;
    pf.dir = p.parent_path().string();
    pf.id = p.has_parent_path() ? p.parent_path().filename().string() : std::string(".");
    if (pf.id.empty()) pf.id = ".";
    pf.slices.push_back(s);
    idx.patients.push_back(std::move(pf));
    return idx;
  }
  if (!fs::is_directory(path, ec)) throw io_error("'" + path + "': neither a folder nor a file");
  bool direct_tiffs = false;
  std::vector<fs::path> subdirs;
  for (const auto& e : fs::directory_iterator(path, ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name[0] == '.') continue;
    if (e.is_directory()) subdirs.push_back(e.path());
    else if (e.is_regular_file() && detail::is_tiff_name(e.path())) direct_tiffs = true;
  }
  if (ec) throw io_error("'" + path + "': cannot list the folder (" + ec.message() + ")");
  if (direct_tiffs) {
    detail::scan_patient_folder(fs::path(path), o, idx, problem);
  } else {
    std::sort(subdirs.begin(), subdirs.end());
    for (const auto& d : subdirs) detail::scan_patient_folder(d, o, idx, problem);
  }
  if (idx.patients.empty())
    throw io_error("'" + path + "': no slices found (expected <patient>/<patient>_<n>.tif with _mask.tif masks" +
                   std::string(idx.skipped ? "; " + std::to_string(idx.skipped) + " problems skipped" : "") + ")");
  std::sort(idx.patients.begin(), idx.patients.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
  return idx;
}

// ====================================================================== resizing

/// Bilinear resize of an (h, w, c) 8-bit image (half-pixel centers, as PyTorch's
/// align_corners=False and OpenCV's INTER_LINEAR), rounded to nearest.
inline image_u8 resize_bilinear(const image_u8& src, std::size_t oh, std::size_t ow) {
  const std::size_t H = src.shape()[0], W = src.shape()[1], C = src.shape()[2];
  if (oh == H && ow == W) return src;
  image_u8 out = image_u8::from_shape({oh, ow, C});
  const double sy = static_cast<double>(H) / static_cast<double>(oh), sx = static_cast<double>(W) / static_cast<double>(ow);
  for (std::size_t y = 0; y < oh; ++y) {
    double fy = (static_cast<double>(y) + 0.5) * sy - 0.5;
    fy = std::clamp(fy, 0.0, static_cast<double>(H - 1));
    const std::size_t y0 = static_cast<std::size_t>(fy), y1 = std::min(y0 + 1, H - 1);
    const double ay = fy - static_cast<double>(y0);
    for (std::size_t x = 0; x < ow; ++x) {
      double fx = (static_cast<double>(x) + 0.5) * sx - 0.5;
      fx = std::clamp(fx, 0.0, static_cast<double>(W - 1));
      const std::size_t x0 = static_cast<std::size_t>(fx), x1 = std::min(x0 + 1, W - 1);
      const double ax = fx - static_cast<double>(x0);
      for (std::size_t c = 0; c < C; ++c) {
        const double v = (1 - ay) * ((1 - ax) * src(y0, x0, c) + ax * src(y0, x1, c)) + ay * ((1 - ax) * src(y1, x0, c) + ax * src(y1, x1, c));
        out(y, x, c) = static_cast<std::uint8_t>(std::clamp(std::floor(v + 0.5), 0.0, 255.0));
      }
    }
  }
  return out;
}

/// Bilinear resize of one float plane (half-pixel centers); used to bring probability maps back
/// to the original resolution.
inline std::vector<float> resize_bilinear(const float* src, std::size_t H, std::size_t W, std::size_t oh, std::size_t ow) {
  std::vector<float> out(oh * ow);
  const double sy = static_cast<double>(H) / static_cast<double>(oh), sx = static_cast<double>(W) / static_cast<double>(ow);
  for (std::size_t y = 0; y < oh; ++y) {
    const double fy = std::clamp((static_cast<double>(y) + 0.5) * sy - 0.5, 0.0, static_cast<double>(H - 1));
    const std::size_t y0 = static_cast<std::size_t>(fy), y1 = std::min(y0 + 1, H - 1);
    const double ay = fy - static_cast<double>(y0);
    for (std::size_t x = 0; x < ow; ++x) {
      const double fx = std::clamp((static_cast<double>(x) + 0.5) * sx - 0.5, 0.0, static_cast<double>(W - 1));
      const std::size_t x0 = static_cast<std::size_t>(fx), x1 = std::min(x0 + 1, W - 1);
      const double ax = fx - static_cast<double>(x0);
      out[y * ow + x] = static_cast<float>((1 - ay) * ((1 - ax) * src[y0 * W + x0] + ax * src[y0 * W + x1]) +
                                           ay * ((1 - ax) * src[y1 * W + x0] + ax * src[y1 * W + x1]));
    }
  }
  return out;
}

/// Nearest-neighbour resize of a mask (the source pixel whose center is nearest to the output
/// pixel's center), so masks stay binary.
inline mask_u8 resize_nearest(const mask_u8& src, std::size_t oh, std::size_t ow) {
  const std::size_t H = src.shape()[0], W = src.shape()[1];
  if (oh == H && ow == W) return src;
  mask_u8 out = mask_u8::from_shape({oh, ow});
  for (std::size_t y = 0; y < oh; ++y) {
    const std::size_t sy = std::min(H - 1, static_cast<std::size_t>((static_cast<double>(y) + 0.5) * H / oh));
    for (std::size_t x = 0; x < ow; ++x) {
      const std::size_t sx = std::min(W - 1, static_cast<std::size_t>((static_cast<double>(x) + 0.5) * W / ow));
      out(y, x) = src(sy, sx);
    }
  }
  return out;
}

// ====================================================================== one slice

/// How an image/mask pair becomes model input.
struct preprocess_options {
  int channels = 3;            ///< 3: all channels; 1: the FLAIR channel only (or a gray image)
  int flair_channel = 1;       ///< which RGB channel is FLAIR (kaggle_3m: pre-contrast, FLAIR, post-contrast)
  int size = 0;                ///< resize to size×size (bilinear images, nearest masks); 0 keeps the size
  bool threshold_masks = false;  ///< masks with values other than 0/255: threshold at 128 instead of an error
};

/// A preprocessed slice: image (size, size, channels) and mask (size, size) in {0, 1}.
struct slice_data {
  image_u8 image;
  mask_u8 mask;
  bool has_mask = false;
  int original_height = 0, original_width = 0;
};

/// Read a mask: one 8-bit channel with values 0 and 255, returned as 0/1. Other values are an
/// io_error naming the file and the first bad pixel, or with `threshold`, values >= 128 become 1.
inline mask_u8 read_mask(const std::string& path, bool threshold = false) {
  const image_u8 m = read_tiff_u8(path);
  if (m.shape()[2] != 1) throw io_error("'" + path + "': mask has " + std::to_string(m.shape()[2]) + " channels, expected 1 (gray)");
  const std::size_t H = m.shape()[0], W = m.shape()[1];
  mask_u8 out = mask_u8::from_shape({H, W});
  const std::uint8_t* src = m.data();
  std::uint8_t* dst = out.data();
  for (std::size_t i = 0; i < H * W; ++i) {
    const std::uint8_t v = src[i];
    if (v != 0 && v != 255 && !threshold)
      throw io_error("'" + path + "': mask value " + std::to_string(v) + " at pixel (" + std::to_string(i / W) + ", " +
                     std::to_string(i % W) + ") is neither 0 nor 255 (use the mask-threshold option to binarize at 128)");
    dst[i] = v >= 128 ? 1 : 0;
  }
  return out;
}

/// Read and preprocess one slice. Throws io_error naming the file for unreadable files, channel
/// or size mismatches and non-binary masks.
inline slice_data load_slice(const slice_files& f, const preprocess_options& o) {
  if (o.channels != 1 && o.channels != 3) throw config_error("channels must be 1 or 3 (got " + std::to_string(o.channels) + ")");
  slice_data s;
  image_u8 img = read_tiff_u8(f.image);
  const std::size_t H = img.shape()[0], W = img.shape()[1], C = img.shape()[2];
  s.original_height = static_cast<int>(H);
  s.original_width = static_cast<int>(W);
  if (o.channels == 3 && C != 3)
    throw io_error("'" + f.image + "': gray image with 1 channel, but the model takes 3 (use --channels 1)");
  if (o.channels == 1 && C == 3) {
    image_u8 one = image_u8::from_shape({H, W, std::size_t{1}});
    for (std::size_t y = 0; y < H; ++y)
      for (std::size_t x = 0; x < W; ++x) one(y, x, 0) = img(y, x, static_cast<std::size_t>(o.flair_channel));
    img = std::move(one);
  }
  if (!f.mask.empty()) {
    s.mask = read_mask(f.mask, o.threshold_masks);
    if (s.mask.shape()[0] != H || s.mask.shape()[1] != W)
      throw io_error("'" + f.mask + "': mask is " + std::to_string(s.mask.shape()[1]) + "x" + std::to_string(s.mask.shape()[0]) +
                     " but its image '" + f.image + "' is " + std::to_string(W) + "x" + std::to_string(H));
    s.has_mask = true;
  }
  if (o.size > 0) {
    const std::size_t S = static_cast<std::size_t>(o.size);
    img = resize_bilinear(img, S, S);
    if (s.has_mask) s.mask = resize_nearest(s.mask, S, S);
  }
  s.image = std::move(img);
  if (!s.has_mask) {
    s.mask = mask_u8::from_shape({s.image.shape()[0], s.image.shape()[1]});
    s.mask.fill(0);
  }
  return s;
}

// ====================================================================== many slices in memory

/// Where a slice came from.
struct slice_record {
  std::size_t patient = 0;  ///< index into slice_set::patients
  int number = 0;
  std::string image_path, mask_path;
  int original_height = 0, original_width = 0;
  std::size_t positives = 0;  ///< tumour pixels at the target size
  bool has_mask = false;
};

/// Preprocessed slices of some patients, kept as 8-bit (size, size, channels) images and 0/1
/// masks: memory is slices × size² × (channels + 1) bytes.
struct slice_set {
  int channels = 0, height = 0, width = 0;
  std::vector<std::string> patients;        ///< patient ids, in the order given to load_slices
  std::vector<slice_record> records;        ///< one per slice, grouped by patient, ordered by number
  std::vector<std::uint8_t> images, masks;  ///< records.size() × h·w·c and × h·w
  /// Per patient and channel: mean and standard deviation of the 8-bit values over the volume.
  std::vector<std::array<float, 3>> mean, stdev;

  std::size_t size() const { return records.size(); }
  std::size_t image_pixels() const { return static_cast<std::size_t>(height) * static_cast<std::size_t>(width); }
  const std::uint8_t* image(std::size_t i) const { return images.data() + i * image_pixels() * static_cast<std::size_t>(channels); }
  const std::uint8_t* mask(std::size_t i) const { return masks.data() + i * image_pixels(); }
  bool has_tumour(std::size_t i) const { return records[i].positives > 0; }
  std::size_t bytes() const { return images.size() + masks.size(); }
};

struct load_options {
  preprocess_options pre;
  bool skip_bad = false;  ///< skip unreadable or inconsistent slices with a warning instead of throwing
  int threads = 1;        ///< reader threads
  /// Called now and then with (slices done, total), from the calling thread.
  std::function<void(std::size_t, std::size_t)> progress;
};

struct load_report {
  std::size_t loaded = 0, skipped = 0;
  std::vector<std::string> warnings;
};

/// Read the slices of `patient_ids` (in that order) from `index`, preprocessed. All slices get
/// the same size: set pre.size, or every image must already have one size.
inline slice_set load_slices(const dataset_index& index, const std::vector<std::string>& patient_ids, const load_options& o,
                             load_report* report = nullptr) {
  struct job {
    std::size_t patient;
    const slice_files* files;
  };
  std::vector<job> jobs;
  slice_set set;
  set.channels = o.pre.channels;
  for (const auto& id : patient_ids) {
    const patient_files* p = index.find(id);
    if (!p) throw config_error("patient '" + id + "' is not in '" + index.root + "'");
    for (const auto& s : p->slices) jobs.push_back({set.patients.size(), &s});
    set.patients.push_back(id);
  }
  std::vector<slice_data> data(jobs.size());
  std::vector<std::string> errors(jobs.size());
  std::atomic<std::size_t> next{0}, done{0};
  auto work = [&] {
    for (std::size_t i; (i = next.fetch_add(1)) < jobs.size();) {
      try {
        data[i] = load_slice(*jobs[i].files, o.pre);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
      done.fetch_add(1);
    }
  };
  const int nt = std::max(1, std::min<int>(o.threads, static_cast<int>(jobs.size())));
  std::vector<std::thread> pool;
  for (int t = 1; t < nt; ++t) pool.emplace_back(work);
  if (o.progress) {
    // the calling thread reports progress while helping
    for (std::size_t i; (i = next.fetch_add(1)) < jobs.size();) {
      try {
        data[i] = load_slice(*jobs[i].files, o.pre);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
      done.fetch_add(1);
      o.progress(done.load(), jobs.size());
    }
  } else {
    work();
  }
  for (auto& t : pool) t.join();
  if (o.progress) o.progress(jobs.size(), jobs.size());

  load_report rep;
  std::vector<char> keep(jobs.size(), 1);
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    if (errors[i].empty()) continue;
    if (!o.skip_bad) throw io_error(errors[i]);
    rep.warnings.push_back(errors[i]);
    keep[i] = 0;
  }
  // one size for all
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    if (!keep[i]) continue;
    const int h = static_cast<int>(data[i].image.shape()[0]), w = static_cast<int>(data[i].image.shape()[1]);
    if (set.height == 0) {
      set.height = h;
      set.width = w;
    } else if (h != set.height || w != set.width) {
      const std::string msg = "'" + jobs[i].files->image + "': image is " + std::to_string(w) + "x" + std::to_string(h) +
                              " but earlier slices are " + std::to_string(set.width) + "x" + std::to_string(set.height) +
                              " (set a common size with --size)";
      if (!o.skip_bad) throw io_error(msg);
      rep.warnings.push_back(msg);
      keep[i] = 0;
    }
  }
  std::size_t n = 0;
  for (auto k : keep) n += static_cast<std::size_t>(k);
  const std::size_t hw = static_cast<std::size_t>(set.height) * static_cast<std::size_t>(set.width);
  const std::size_t C = static_cast<std::size_t>(set.channels);
  set.images.resize(n * hw * C);
  set.masks.resize(n * hw);
  set.records.reserve(n);
  std::vector<std::array<double, 3>> sum(set.patients.size(), {0, 0, 0}), sq(set.patients.size(), {0, 0, 0});
  std::vector<double> count(set.patients.size(), 0);
  for (std::size_t i = 0, j = 0; i < jobs.size(); ++i) {
    if (!keep[i]) continue;
    const slice_data& d = data[i];
    slice_record r;
    r.patient = jobs[i].patient;
    r.number = jobs[i].files->number;
    r.image_path = jobs[i].files->image;
    r.mask_path = jobs[i].files->mask;
    r.original_height = d.original_height;
    r.original_width = d.original_width;
    r.has_mask = d.has_mask;
    std::copy(d.image.data(), d.image.data() + hw * C, set.images.data() + j * hw * C);
    std::copy(d.mask.data(), d.mask.data() + hw, set.masks.data() + j * hw);
    for (std::size_t p = 0; p < hw; ++p) r.positives += d.mask.data()[p];
    for (std::size_t p = 0; p < hw; ++p)
      for (std::size_t c = 0; c < C; ++c) {
        const double v = d.image.data()[p * C + c];
        sum[r.patient][c] += v;
        sq[r.patient][c] += v * v;
      }
    count[r.patient] += static_cast<double>(hw);
    set.records.push_back(std::move(r));
    ++j;
  }
  set.mean.assign(set.patients.size(), {0, 0, 0});
  set.stdev.assign(set.patients.size(), {1, 1, 1});
  for (std::size_t p = 0; p < set.patients.size(); ++p) {
    if (count[p] == 0) continue;
    for (std::size_t c = 0; c < C; ++c) {
      const double m = sum[p][c] / count[p];
      const double var = std::max(0.0, sq[p][c] / count[p] - m * m);
      set.mean[p][c] = static_cast<float>(m);
      set.stdev[p][c] = static_cast<float>(std::max(std::sqrt(var), 1e-3));
    }
  }
  rep.loaded = n;
  rep.skipped = jobs.size() - n;
  if (report) *report = std::move(rep);
  return set;
}

// ====================================================================== patient split

/// Patients of each subset.
struct patient_split {
  std::vector<std::string> train, val, test;
};

/// Deterministic, seeded, patient-level split: ids are sorted, shuffled with `seed`, then the
/// first round(test_fraction·N) go to test and the next round(val_fraction·N) to val (at least
/// one each when the fraction is > 0 and enough patients exist); the rest train. Subsets are
/// returned sorted.
inline patient_split split_patients(std::vector<std::string> ids, double val_fraction, double test_fraction, std::uint64_t seed) {
  if (val_fraction < 0 || test_fraction < 0 || val_fraction + test_fraction >= 1)
    throw config_error("split fractions must be >= 0 and val + test < 1 (got val " + std::to_string(val_fraction) + ", test " +
                       std::to_string(test_fraction) + ")");
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  rng g(seed);
  for (std::size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[static_cast<std::size_t>(g.below(i))]);
  const std::size_t N = ids.size();
  auto count = [&](double f) {
    std::size_t k = static_cast<std::size_t>(std::llround(f * static_cast<double>(N)));
    if (f > 0 && k == 0) k = 1;
    return k;
  };
  std::size_t nt = count(test_fraction), nv = count(val_fraction);
  if (N < nt + nv + 1)
    throw config_error("cannot split " + std::to_string(N) + " patients into train/val/test with fractions " + std::to_string(val_fraction) +
                       "/" + std::to_string(test_fraction) + ": at least one training patient is needed");
  patient_split s;
  s.test.assign(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(nt));
  s.val.assign(ids.begin() + static_cast<std::ptrdiff_t>(nt), ids.begin() + static_cast<std::ptrdiff_t>(nt + nv));
  s.train.assign(ids.begin() + static_cast<std::ptrdiff_t>(nt + nv), ids.end());
  std::sort(s.train.begin(), s.train.end());
  std::sort(s.val.begin(), s.val.end());
  std::sort(s.test.begin(), s.test.end());
  return s;
}

/// Write a split as lines "<subset> <patient>" (subset: train, val, test).
inline void write_split_file(const std::string& path, const patient_split& s) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    if (!f) throw io_error("'" + path + "': cannot write the split file");
    f << "# useg patient split: <subset> <patient>\n";
    for (const auto& p : s.train) f << "train " << p << "\n";
    for (const auto& p : s.val) f << "val " << p << "\n";
    for (const auto& p : s.test) f << "test " << p << "\n";
    if (!f) throw io_error("'" + path + "': write failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw io_error("'" + path + "': cannot rename the temporary file into place");
}

/// Read a split file: lines "<subset> <patient>", subset train|val|test, '#' comments. Patients
/// must be in `known` (when non-empty) and appear once.
inline patient_split read_split_file(const std::string& path, const std::vector<std::string>& known = {}) {
  std::ifstream f(path);
  if (!f) throw io_error("'" + path + "': cannot open the split file");
  patient_split s;
  std::set<std::string> seen, known_set(known.begin(), known.end());
  std::string line;
  for (int ln = 1; std::getline(f, line); ++ln) {
    const auto hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    std::istringstream is(line);
    std::string subset, id, extra;
    if (!(is >> subset)) continue;
    const std::string where = "'" + path + "' line " + std::to_string(ln) + ": ";
    if (!(is >> id) || (is >> extra)) throw io_error(where + "expected '<subset> <patient>'");
    if (!known_set.empty() && !known_set.count(id)) throw io_error(where + "patient '" + id + "' is not in the dataset");
    if (!seen.insert(id).second) throw io_error(where + "patient '" + id + "' is listed twice");
    if (subset == "train") s.train.push_back(id);
    else if (subset == "val") s.val.push_back(id);
    else if (subset == "test") s.test.push_back(id);
    else throw io_error(where + "unknown subset '" + subset + "' (train, val or test)");
  }
  return s;
}

}  // namespace useg::data
