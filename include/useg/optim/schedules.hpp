// useg/optim/schedules.hpp — learning-rate schedules with PyTorch's semantics:
// StepLR, CosineAnnealingLR and ReduceLROnPlateau. Host-side, backend-independent.
#pragma once
#include <cmath>
#include <limits>
#include <string>

#include "useg/core/error.hpp"

namespace useg {

/// lr(epoch) = base · gamma^floor(epoch / step_size)   (torch.optim.lr_scheduler.StepLR)
struct step_lr {
  double base_lr;
  int step_size;
  double gamma = 0.1;
  double lr_at(int epoch) const {
    if (step_size <= 0) throw config_error("useg::step_lr: step_size must be positive");
    return base_lr * std::pow(gamma, epoch / step_size);
  }
};

/// lr(epoch) = eta_min + (base - eta_min)·(1 + cos(pi·epoch/T_max))/2   (CosineAnnealingLR, closed form)
struct cosine_lr {
  double base_lr;
  int t_max;
  double eta_min = 0.0;
  double lr_at(int epoch) const {
    if (t_max <= 0) throw config_error("useg::cosine_lr: T_max must be positive");
    return eta_min + (base_lr - eta_min) * (1 + std::cos(3.14159265358979323846 * epoch / t_max)) / 2;
  }
};

/// torch.optim.lr_scheduler.ReduceLROnPlateau (threshold_mode 'rel').
class reduce_on_plateau {
 public:
  enum class mode { min, max };
  reduce_on_plateau(double lr, mode m = mode::min, double factor = 0.1, int patience = 10, double threshold = 1e-4,
                    int cooldown = 0, double min_lr = 0.0)
      : lr_(lr), mode_(m), factor_(factor), patience_(patience), threshold_(threshold), cooldown_(cooldown), min_lr_(min_lr) {
    if (factor >= 1.0 || factor <= 0) throw config_error("useg::reduce_on_plateau: factor must be in (0, 1)");
    best_ = m == mode::min ? std::numeric_limits<double>::infinity() : -std::numeric_limits<double>::infinity();
  }
  /// Feed the epoch's metric; returns the learning rate to use next.
  double step(double metric) {
    if (better(metric)) {
      best_ = metric;
      bad_ = 0;
    } else {
      ++bad_;
    }
    if (cooldown_counter_ > 0) {
      --cooldown_counter_;
      bad_ = 0;
    }
    if (bad_ > patience_) {
      const double nl = std::max(lr_ * factor_, min_lr_);
      if (lr_ - nl > 1e-8) lr_ = nl;
      cooldown_counter_ = cooldown_;
      bad_ = 0;
    }
    return lr_;
  }
  double lr() const { return lr_; }
  double best() const { return best_; }
  int bad_epochs() const { return bad_; }
  int cooldown_counter() const { return cooldown_counter_; }
  /// Restore after resume.
  void restore(double lr, double best, int bad, int cooldown_counter) {
    lr_ = lr;
    best_ = best;
    bad_ = bad;
    cooldown_counter_ = cooldown_counter;
  }

 private:
  bool better(double a) const {
    return mode_ == mode::min ? a < best_ * (1 - threshold_) : a > best_ * (1 + threshold_);
  }
  double lr_;
  mode mode_;
  double factor_;
  int patience_;
  double threshold_;
  int cooldown_;
  double min_lr_;
  double best_;
  int bad_ = 0;
  int cooldown_counter_ = 0;
};

}  // namespace useg
