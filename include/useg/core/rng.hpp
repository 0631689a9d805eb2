// useg/core/rng.hpp — a small, portable, seeded random generator (same numbers on every platform).
#pragma once
#include <cmath>
#include <cstdint>
#include <random>

namespace useg {

/// Seeded generator: mt19937_64 with portable conversions to real numbers.
class rng {
 public:
  explicit rng(std::uint64_t seed = 0) : eng_(seed) {}
  void seed(std::uint64_t s) { eng_.seed(s); }
  std::uint64_t next_u64() { return eng_(); }
  /// Uniform in [0, 1).
  double uniform() { return static_cast<double>(eng_() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Standard normal (Box-Muller).
  double normal() {
    double u1 = uniform();
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925286766559 * u2);
  }
  /// Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) { return n ? next_u64() % n : 0; }
  std::mt19937_64& engine() { return eng_; }

 private:
  std::mt19937_64 eng_;
};

}  // namespace useg
