// Tests of useg::metrics against cases computed by hand.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include <useg/metrics/segmentation.hpp>

using namespace useg::metrics;
using doctest::Approx;

TEST_CASE("count: threshold 0.5 on probabilities, truth >= 0.5") {
  const float prob[] = {0.2f, 0.5f, 0.7f, 0.49f, 0.9f, 0.0f};
  const std::uint8_t truth[] = {0, 1, 1, 1, 0, 0};
  const confusion c = count(prob, truth, 6);
  // predicted: 0 1 1 0 1 0 ; truth: 0 1 1 1 0 0
  CHECK(c.tp == 2);
  CHECK(c.fp == 1);
  CHECK(c.fn == 1);
  CHECK(c.tn == 2);
  CHECK(dice(c) == Approx(4.0 / 6.0));       // 2·2 / (2·2 + 1 + 1)
  CHECK(iou(c) == Approx(2.0 / 4.0));        // 2 / (2 + 1 + 1)
  CHECK(precision(c) == Approx(2.0 / 3.0));  // 2 / (2 + 1)
  CHECK(recall(c) == Approx(2.0 / 3.0));     // 2 / (2 + 1)
  CHECK(accuracy(c) == Approx(4.0 / 6.0));
  CHECK(background_accuracy(c) == Approx(3.0 / 6.0));  // truth-negative pixels
  // another threshold
  const confusion c2 = count(prob, truth, 6, 0.8);
  CHECK(c2.tp == 0);
  CHECK(c2.fp == 1);
  CHECK(c2.fn == 3);
}

TEST_CASE("empty slices: both empty scores 1 or is excluded; one-sided emptiness scores 0") {
  const float zero[] = {0.f, 0.1f, 0.f, 0.4f};
  const float some[] = {0.f, 0.9f, 0.f, 0.f};
  const std::uint8_t empty[] = {0, 0, 0, 0};
  const std::uint8_t lesion[] = {0, 0, 1, 0};
  const confusion both = count(zero, empty, 4);
  CHECK(both.both_empty());
  auto s = score(both, empty_policy::one);
  REQUIRE(s);
  CHECK(s->dice == 1.0);
  CHECK(s->iou == 1.0);
  CHECK(s->precision == 1.0);
  CHECK(s->recall == 1.0);
  CHECK(!score(both, empty_policy::exclude));
  // false positive on an empty slice
  const confusion fp = count(some, empty, 4);
  s = score(fp, empty_policy::exclude);
  REQUIRE(s);
  CHECK(s->dice == 0.0);
  CHECK(s->iou == 0.0);
  CHECK(s->precision == 0.0);
  CHECK(s->recall == 0.0);  // 0/0 with a non-empty prediction
  // missed lesion
  const confusion fn = count(zero, lesion, 4);
  s = score(fn, empty_policy::one);
  CHECK(s->dice == 0.0);
  CHECK(s->precision == 0.0);  // 0/0 with a non-empty truth
  CHECK(s->recall == 0.0);
  CHECK(parse_empty_policy("exclude") == empty_policy::exclude);
  CHECK_THROWS_AS(parse_empty_policy("skip"), useg::config_error);
}

TEST_CASE("evaluator: global, per-slice and per-volume summaries by hand") {
  // patient A: slice 1 tp=3 fp=1 fn=0 tn=4; slice 2 both empty (tn=8)
  // patient B: slice 1 tp=1 fp=0 fn=3 tn=4
  // patient C: slice 1 tp=0 fp=2 fn=0 tn=6 (false positives only)
  // patient D: slice 5 both empty
  auto mk = [](std::uint64_t tp, std::uint64_t fp, std::uint64_t fn, std::uint64_t tn) {
    confusion c;
    c.tp = tp, c.fp = fp, c.fn = fn, c.tn = tn;
    return c;
  };
  for (auto policy : {empty_policy::one, empty_policy::exclude}) {
    CAPTURE(to_string(policy));
    evaluator ev(policy);
    ev.add_counts("A", 1, mk(3, 1, 0, 4));
    ev.add_counts("B", 1, mk(1, 0, 3, 4));
    ev.add_counts("A", 2, mk(0, 0, 0, 8));
    ev.add_counts("C", 1, mk(0, 2, 0, 6));
    ev.add_counts("D", 5, mk(0, 0, 0, 8));
    const report r = ev.summary();
    // global: tp 4, fp 3, fn 3, tn 30 (40 px)
    CHECK(r.global.tp == 4);
    CHECK(r.global.total() == 40);
    CHECK(r.global_dice == Approx(8.0 / 14.0));
    CHECK(r.global_iou == Approx(4.0 / 10.0));
    CHECK(r.global_precision == Approx(4.0 / 7.0));
    CHECK(r.global_recall == Approx(4.0 / 7.0));
    CHECK(r.pixel_accuracy == Approx(34.0 / 40.0));
    CHECK(r.background_accuracy == Approx(33.0 / 40.0));
    CHECK(r.slices == 5);
    CHECK(r.slices_with_tumour == 2);
    // slice dice: A1 6/7, B1 2/5, A2 empty, C1 0, D5 empty
    const double a1 = 6.0 / 7.0, b1 = 2.0 / 5.0;
    // volume dice: A 6/7 (tp 3 fp 1), B 2/5, C 0, D empty
    if (policy == empty_policy::one) {
      CHECK(r.slices_included == 5);
      CHECK(r.mean_dice == Approx((a1 + b1 + 1 + 0 + 1) / 5));
      CHECK(r.mean_iou == Approx((3.0 / 4 + 1.0 / 4 + 1 + 0 + 1) / 5));
      CHECK(r.mean_precision == Approx((3.0 / 4 + 1 + 1 + 0 + 1) / 5));
      CHECK(r.mean_recall == Approx((1 + 1.0 / 4 + 1 + 0 + 1) / 5));
      CHECK(r.volumes_included == 4);
      CHECK(r.volume_dice_mean == Approx((a1 + b1 + 0 + 1) / 4));
      CHECK(r.volume_dice_median == Approx((b1 + a1) / 2));  // sorted: 0, 2/5, 6/7, 1
    } else {
      CHECK(r.slices_included == 3);
      CHECK(r.mean_dice == Approx((a1 + b1 + 0) / 3));
      CHECK(r.mean_recall == Approx((1 + 1.0 / 4 + 0) / 3));
      CHECK(r.volumes_included == 3);
      CHECK(r.volume_dice_mean == Approx((a1 + b1) / 3));
      CHECK(r.volume_dice_median == Approx(b1));  // sorted: 0, 2/5, 6/7
    }
    REQUIRE(ev.volumes().size() == 4);
    CHECK(ev.volumes()[0].patient == "A");
    CHECK(ev.volumes()[0].slices == 2);
    CHECK(ev.volumes()[0].counts.tn == 12);
  }
}

TEST_CASE("evaluator: add() thresholds probabilities; empty evaluator") {
  evaluator ev;
  const float p[] = {0.6f, 0.4f, 0.6f, 0.1f};
  const float t[] = {1.f, 1.f, 0.f, 0.f};
  const slice_result& s = ev.add("X", 3, p, t, 4);
  CHECK(s.counts.tp == 1);
  CHECK(s.counts.fn == 1);
  CHECK(s.counts.fp == 1);
  CHECK(s.counts.tn == 1);
  CHECK(ev.summary().volume_dice_mean == Approx(0.5));
  const report e = evaluator().summary();
  CHECK(e.slices == 0);
  CHECK(e.volumes_included == 0);
  CHECK(e.mean_dice == 0);
}
