// examples/common/model_registry.hpp — pick a model at run time from compiled-in instantiations.
//
// The four model families are compiled in separate translation units (models_*.cpp), each with
// 1 and 3 input channels and 1 class, so a parallel build compiles them at the same time and the
// programs themselves never instantiate a model template.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "useg/backend/cpu.hpp"
#include "useg/core/params.hpp"
#include "useg/core/tensor.hpp"
#include "useg/models/unet_skeleton.hpp"

namespace lgg {

using B = useg::cpu;

/// What to build: family name, input channels, classes, configuration.
struct model_spec {
  std::string model = "unet";  ///< unet, attention-unet, r2unet, ar2unet
  int in_channels = 3;
  int classes = 1;
  useg::unet_config cfg;
};

/// A model behind a virtual interface (cpu, float).
class any_model {
 public:
  explicit any_model(model_spec s) : spec_(std::move(s)) {}
  virtual ~any_model() = default;
  /// Logits (n, classes, h, w) of x (n, in_channels, h, w).
  virtual const useg::tensor<B>& forward(useg::context<B>& ctx, const useg::tensor<B>& x) = 0;
  /// Inference in eval mode, keeping nothing for a backward (activations are freed early).
  virtual const useg::tensor<B>& predict(useg::context<B>& ctx, const useg::tensor<B>& x) = 0;
  /// Adds parameter gradients for dL/dlogits of the last forward.
  virtual void backward(useg::context<B>& ctx, const useg::tensor<B>& grad_logits) = 0;
  virtual void train(bool on) = 0;
  virtual useg::param_store<B>& params() = 0;
  virtual std::string summary() const = 0;
  virtual std::size_t num_parameters() const = 0;
  virtual double forward_flops() const = 0;
  virtual const char* reference_name() const = 0;
  const model_spec& spec() const { return spec_; }

 private:
  model_spec spec_;
};

/// Build the model `s` describes. Throws useg::config_error for an unknown family or a channel /
/// class combination that is not compiled in (the message lists what is), or for a bad config.
std::unique_ptr<any_model> make_model(const model_spec& s);

/// The compiled-in combinations, e.g. "unet: in 1|3, classes 1".
std::vector<std::string> compiled_models();

/// The family names.
inline const std::vector<std::string>& model_names() {
  static const std::vector<std::string> n{"unet", "attention-unet", "r2unet", "ar2unet"};
  return n;
}

// one per translation unit: nullptr when the channel/class combination is not compiled in
std::unique_ptr<any_model> make_unet_family(const model_spec& s);
std::unique_ptr<any_model> make_attention_unet_family(const model_spec& s);
std::unique_ptr<any_model> make_r2unet_family(const model_spec& s);
std::unique_ptr<any_model> make_ar2unet_family(const model_spec& s);

}  // namespace lgg
