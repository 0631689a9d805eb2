// useg/optim/optimizers.hpp — SGD (momentum, Nesterov, weight decay), Adam and AdamW with
// PyTorch's update rules, over a model's flat parameter buffer (one fused update per step).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "useg/core/error.hpp"
#include "useg/core/params.hpp"
#include "useg/core/tensor.hpp"

namespace useg {

/// Common interface, so programs can pick an optimizer at run time.
template <class B>
class optimizer {
 public:
  virtual ~optimizer() = default;
  /// Apply one update from the gradients currently in the store.
  virtual void step() = 0;
  virtual double lr() const = 0;
  virtual void set_lr(double lr) = 0;
  virtual const char* name() const = 0;
  /// Number of step() calls so far.
  std::int64_t steps() const { return steps_; }
  void set_steps(std::int64_t s) { steps_ = s; }
  /// Named state tensors (momentum buffers, Adam moments), each of num_parameters() elements,
  /// for checkpoints.
  virtual std::vector<std::pair<std::string, tensor<B>*>> state() = 0;

 protected:
  std::int64_t steps_ = 0;
};

struct sgd_options {
  double lr = 0.01;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

template <class B>
class sgd final : public optimizer<B> {
 public:
  sgd(param_store<B>& store, context<B>& ctx, sgd_options o = {}) : store_(&store), ctx_(&ctx), o_(o) {
    if (o.lr < 0) throw config_error("useg::sgd: learning rate must be >= 0");
    if (o.nesterov && (o.momentum <= 0 || o.dampening != 0))
      throw config_error("useg::sgd: Nesterov momentum requires momentum > 0 and zero dampening");
    if (o.momentum != 0) {
      buf_.resize(store.flat_params().dims());
      buf_.fill(0);
    }
  }
  void step() override {
    auto& p = store_->flat_params();
    ops<B>::sgd_step(*ctx_, p.data(), store_->flat_grads().data(), buf_.data(), p.size(), o_.lr, o_.momentum, o_.dampening,
                     o_.weight_decay, o_.nesterov, this->steps_ == 0);
    ++this->steps_;
  }
  double lr() const override { return o_.lr; }
  void set_lr(double lr) override { o_.lr = lr; }
  const char* name() const override { return "sgd"; }
  std::vector<std::pair<std::string, tensor<B>*>> state() override {
    if (o_.momentum == 0) return {};
    return {{"momentum_buffer", &buf_}};
  }

 private:
  param_store<B>* store_;
  context<B>* ctx_;
  sgd_options o_;
  tensor<B> buf_;
};

struct adam_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = false;  ///< true: AdamW (decoupled weight decay)
};

template <class B>
class adam : public optimizer<B> {
 public:
  adam(param_store<B>& store, context<B>& ctx, adam_options o = {}) : store_(&store), ctx_(&ctx), o_(o) {
    if (o.lr < 0) throw config_error("useg::adam: learning rate must be >= 0");
    if (o.beta1 < 0 || o.beta1 >= 1 || o.beta2 < 0 || o.beta2 >= 1) throw config_error("useg::adam: betas must be in [0, 1)");
    m_.resize(store.flat_params().dims());
    v_.resize(store.flat_params().dims());
    m_.fill(0);
    v_.fill(0);
  }
  void step() override {
    ++this->steps_;
    auto& p = store_->flat_params();
    ops<B>::adam_step(*ctx_, p.data(), store_->flat_grads().data(), m_.data(), v_.data(), p.size(), o_.lr, o_.beta1, o_.beta2,
                      o_.eps, o_.weight_decay, o_.decoupled, static_cast<long>(this->steps_));
  }
  double lr() const override { return o_.lr; }
  void set_lr(double lr) override { o_.lr = lr; }
  const char* name() const override { return o_.decoupled ? "adamw" : "adam"; }
  std::vector<std::pair<std::string, tensor<B>*>> state() override { return {{"exp_avg", &m_}, {"exp_avg_sq", &v_}}; }

 private:
  param_store<B>* store_;
  context<B>* ctx_;
  adam_options o_;
  tensor<B> m_, v_;
};

/// AdamW: Adam with decoupled weight decay (PyTorch default weight_decay 1e-2).
template <class B>
class adamw final : public adam<B> {
 public:
  static adam_options defaults(adam_options o) {
    o.decoupled = true;
    return o;
  }
  adamw(param_store<B>& store, context<B>& ctx, adam_options o = adam_options{1e-3, 0.9, 0.999, 1e-8, 1e-2, true})
      : adam<B>(store, ctx, defaults(o)) {}
};

}  // namespace useg
