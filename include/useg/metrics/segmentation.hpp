// useg/metrics/segmentation.hpp — binary segmentation metrics as the LGG literature reports them.
//
//   per slice:   Dice, IoU, precision, recall of (probability >= threshold) against the truth,
//                with an explicit policy for slices where truth and prediction are both empty
//   global:      the same over all pixels of a split, plus pixel accuracy and the accuracy of
//                predicting background everywhere
//   per volume:  Dice of each patient's 3-D volume (all its slices), mean and median over
//                patients (Buda et al., 2019)
//
// Zero-division convention: a ratio whose denominator is 0 is 1 when truth and prediction are
// both empty and 0 otherwise; under empty_policy::exclude such "both empty" slices or volumes are
// left out of the means instead.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "useg/core/error.hpp"

namespace useg::metrics {

/// Pixel counts of a binary prediction against a binary truth.
struct confusion {
  std::uint64_t tp = 0, fp = 0, fn = 0, tn = 0;
  std::uint64_t total() const { return tp + fp + fn + tn; }
  std::uint64_t truth_positives() const { return tp + fn; }
  std::uint64_t predicted_positives() const { return tp + fp; }
  /// Truth and prediction both empty.
  bool both_empty() const { return tp + fp + fn == 0; }
  confusion& operator+=(const confusion& o) {
    tp += o.tp;
    fp += o.fp;
    fn += o.fn;
    tn += o.tn;
    return *this;
  }
};

/// Count pixels: predicted positive where prob >= threshold; truth positive where truth >= 0.5.
template <class P, class T>
confusion count(const P* prob, const T* truth, std::size_t n, double threshold = 0.5) {
  confusion c;
  for (std::size_t i = 0; i < n; ++i) {
    const bool p = static_cast<double>(prob[i]) >= threshold;
    const bool t = static_cast<double>(truth[i]) >= 0.5;
    if (p && t) ++c.tp;
    else if (p) ++c.fp;
    else if (t) ++c.fn;
    else ++c.tn;
  }
  return c;
}

namespace detail {
inline double ratio(std::uint64_t num, std::uint64_t den, bool both_empty) {
  if (den == 0) return both_empty ? 1.0 : 0.0;
  return static_cast<double>(num) / static_cast<double>(den);
}
}  // namespace detail

inline double dice(const confusion& c) { return detail::ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn, c.both_empty()); }
inline double iou(const confusion& c) { return detail::ratio(c.tp, c.tp + c.fp + c.fn, c.both_empty()); }
inline double precision(const confusion& c) { return detail::ratio(c.tp, c.tp + c.fp, c.both_empty()); }
inline double recall(const confusion& c) { return detail::ratio(c.tp, c.tp + c.fn, c.both_empty()); }
inline double accuracy(const confusion& c) { return c.total() ? static_cast<double>(c.tp + c.tn) / static_cast<double>(c.total()) : 1.0; }
/// Pixel accuracy of predicting background everywhere: the fraction of truth-negative pixels.
inline double background_accuracy(const confusion& c) {
  return c.total() ? static_cast<double>(c.tn + c.fp) / static_cast<double>(c.total()) : 1.0;
}

/// What to do with slices (or volumes) whose truth and prediction are both empty.
enum class empty_policy {
  one,     ///< they score 1 on every metric (the Attention U-Net seed's convention)
  exclude  ///< they are left out of the means
};

inline empty_policy parse_empty_policy(const std::string& s) {
  if (s == "one" || s == "1") return empty_policy::one;
  if (s == "exclude") return empty_policy::exclude;
  throw config_error("unknown empty-slice policy '" + s + "' (expected one or exclude)");
}
inline const char* to_string(empty_policy p) { return p == empty_policy::one ? "one" : "exclude"; }

/// Scores of one slice or volume.
struct scores {
  double dice = 0, iou = 0, precision = 0, recall = 0;
};

/// Scores of c, or nothing when the policy excludes it.
inline std::optional<scores> score(const confusion& c, empty_policy p) {
  if (c.both_empty() && p == empty_policy::exclude) return std::nullopt;
  return scores{dice(c), iou(c), precision(c), recall(c)};
}

/// One evaluated slice.
struct slice_result {
  std::string patient;
  int slice = 0;
  confusion counts;
};

/// One patient's volume.
struct volume_result {
  std::string patient;
  std::size_t slices = 0;
  confusion counts;  ///< summed over its slices
};

/// Everything an evaluation reports.
struct report {
  empty_policy policy = empty_policy::one;
  double threshold = 0.5;
  // global, over all pixels
  confusion global;
  double global_dice = 0, global_iou = 0, pixel_accuracy = 0, global_precision = 0, global_recall = 0, background_accuracy = 0;
  // per slice, mean over included slices
  std::size_t slices = 0, slices_included = 0, slices_with_tumour = 0;
  double mean_dice = 0, mean_iou = 0, mean_precision = 0, mean_recall = 0;
  // per volume
  std::size_t volumes = 0, volumes_included = 0;
  double volume_dice_mean = 0, volume_dice_median = 0;
};

/// Accumulates slices, then summarizes. Slices of one patient may arrive in any order.
class evaluator {
 public:
  explicit evaluator(empty_policy p = empty_policy::one, double threshold = 0.5) : policy_(p), threshold_(threshold) {}

  /// Add one slice: prob (probabilities, thresholded) and truth (0/1), n pixels each.
  template <class P, class T>
  const slice_result& add(const std::string& patient, int slice, const P* prob, const T* truth, std::size_t n) {
    return add_counts(patient, slice, count(prob, truth, n, threshold_));
  }
  const slice_result& add_counts(const std::string& patient, int slice, const confusion& c) {
    slices_.push_back({patient, slice, c});
    auto it = volume_index_.find(patient);
    if (it == volume_index_.end()) {
      it = volume_index_.emplace(patient, volumes_.size()).first;
      volumes_.push_back({patient, 0, {}});
    }
    volumes_[it->second].slices += 1;
    volumes_[it->second].counts += c;
    return slices_.back();
  }

  const std::vector<slice_result>& slices() const { return slices_; }
  /// Volumes in order of first appearance.
  const std::vector<volume_result>& volumes() const { return volumes_; }
  empty_policy policy() const { return policy_; }
  double threshold() const { return threshold_; }

  report summary() const {
    report r;
    r.policy = policy_;
    r.threshold = threshold_;
    for (const auto& s : slices_) r.global += s.counts;
    r.global_dice = dice(r.global);
    r.global_iou = iou(r.global);
    r.pixel_accuracy = accuracy(r.global);
    r.global_precision = precision(r.global);
    r.global_recall = recall(r.global);
    r.background_accuracy = metrics::background_accuracy(r.global);
    r.slices = slices_.size();
    scores sum;
    for (const auto& s : slices_) {
      if (s.counts.truth_positives() > 0) ++r.slices_with_tumour;
      if (auto sc = score(s.counts, policy_)) {
        ++r.slices_included;
        sum.dice += sc->dice;
        sum.iou += sc->iou;
        sum.precision += sc->precision;
        sum.recall += sc->recall;
      }
    }
    if (r.slices_included) {
      const double k = static_cast<double>(r.slices_included);
      r.mean_dice = sum.dice / k;
      r.mean_iou = sum.iou / k;
      r.mean_precision = sum.precision / k;
      r.mean_recall = sum.recall / k;
    }
    r.volumes = volumes_.size();
    std::vector<double> vd;
    for (const auto& v : volumes_)
      if (auto sc = score(v.counts, policy_)) vd.push_back(sc->dice);
    r.volumes_included = vd.size();
    if (!vd.empty()) {
      double s = 0;
      for (double d : vd) s += d;
      r.volume_dice_mean = s / static_cast<double>(vd.size());
      std::sort(vd.begin(), vd.end());
      const std::size_t m = vd.size() / 2;
      r.volume_dice_median = vd.size() % 2 ? vd[m] : (vd[m - 1] + vd[m]) / 2;
    }
    return r;
  }

 private:
  empty_policy policy_;
  double threshold_;
  std::vector<slice_result> slices_;
  std::vector<volume_result> volumes_;
  std::map<std::string, std::size_t> volume_index_;
};

}  // namespace useg::metrics
