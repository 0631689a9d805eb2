// examples/common/engine_impl.hpp — backend_engine<B>, the engine of one backend; included only
// by engine_cpu.cpp (useg::cpu) and engine_cuda.cu (useg::cuda, with the CUDA backend's header
// included first).
#pragma once
#include <cmath>
#include <memory>
#include <string>
#include <utility>

#include "engine.hpp"
#include "model_registry.hpp"
#include "useg/io/checkpoint.hpp"
#include "useg/loss/losses.hpp"
#include "useg/optim/optimizers.hpp"

namespace lgg {

template <class B>
class backend_engine final : public engine {
 public:
  /// ctx: the backend's context (created by make_cpu_engine / make_cuda_engine).
  backend_engine(std::unique_ptr<useg::context<B>> ctx, int host_threads, std::string info)
      : ctx_(std::move(ctx)), host_threads_(host_threads), info_(std::move(info)) {}

  const char* device() const override { return B::name; }
  std::string device_info() const override { return info_; }
  int host_threads() const override { return host_threads_; }

  void build_model(const model_spec& s) override {
    opt_.reset();
    model_.reset();
    model_ = make_model<B>(s);
  }
  std::string summary() const override { return model().summary(); }
  std::size_t num_parameters() const override { return model().num_parameters(); }
  const char* reference_name() const override { return model().reference_name(); }
  void train(bool on) override { model().train(on); }

  void load_weights(const std::string& path) override { useg::io::load_weights(path, model().params()); }
  void save_weights(const std::string& path, const std::map<std::string, std::string>& metadata) override {
    useg::io::save_weights(path, model().params(), metadata);
  }

  void make_optimizer(const optimizer_spec& o) override {
    auto& store = model().params();
    if (o.name == "adam" || o.name == "adamw") {
      useg::adam_options a;
      a.lr = o.lr;
      a.weight_decay = o.weight_decay;
      if (o.name == "adamw") opt_ = std::make_unique<useg::adamw<B>>(store, *ctx_, useg::adamw<B>::defaults(a));
      else opt_ = std::make_unique<useg::adam<B>>(store, *ctx_, a);
    } else if (o.name == "sgd") {
      useg::sgd_options s;
      s.lr = o.lr;
      s.momentum = o.momentum;
      s.weight_decay = o.weight_decay;
      opt_ = std::make_unique<useg::sgd<B>>(store, *ctx_, s);
    } else {
      throw useg::config_error("unknown optimizer '" + o.name + "' (adam, adamw or sgd)");
    }
  }
  void set_lr(double lr) override { optimizer().set_lr(lr); }
  void save_training_state(const std::string& path, const nlohmann::json& extra) override {
    useg::io::save_training_state(path, optimizer(), extra);
  }
  nlohmann::json load_training_state(const std::string& path) override { return useg::io::load_training_state(path, optimizer()); }

  double train_step(const float* x, const float* y, int n, int c, int h, int w, const useg::loss_options& loss) override {
    upload(x, y, n, c, h, w);
    auto& m = model();
    m.params().zero_grad();
    const auto& logits = m.forward(*ctx_, x_);
    const double l = useg::compute_loss(*ctx_, loss, logits, y_, &grad_);
    if (!std::isfinite(l)) return l;
    m.backward(*ctx_, grad_);
    optimizer().step();
    return l;
  }

  double predict(const float* x, const float* y, int n, int c, int h, int w, const useg::loss_options& loss,
                 std::vector<float>& logits_out) override {
    upload(x, y, n, c, h, w);
    const useg::tensor<B>& logits = model().predict(*ctx_, x_);  // eval mode, no backward state
    const double l = useg::compute_loss(*ctx_, loss, logits, y_);
    logits_out.resize(logits.size());
    logits.download(logits_out.data());
    return l;
  }

 private:
  any_model<B>& model() const {
    if (!model_) throw useg::error("lgg::engine: no model (build_model() first)");
    return *model_;
  }
  useg::optimizer<B>& optimizer() const {
    if (!opt_) throw useg::error("lgg::engine: no optimizer (make_optimizer() first)");
    return *opt_;
  }
  /// Explicit host-to-device copies of the batch (a memcpy on useg::cpu).
  void upload(const float* x, const float* y, int n, int c, int h, int w) {
    x_.resize(n, c, h, w);
    y_.resize(n, 1, h, w);
    x_.upload(x);
    y_.upload(y);
  }

  std::unique_ptr<useg::context<B>> ctx_;
  int host_threads_;
  std::string info_;
  std::unique_ptr<any_model<B>> model_;
  std::unique_ptr<useg::optimizer<B>> opt_;
  useg::tensor<B> x_, y_, grad_;
};

}  // namespace lgg
