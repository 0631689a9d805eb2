// examples/common/model_registry.hpp — pick a model at run time from compiled-in instantiations.
//
// The four model families are compiled in separate translation units, each with 1 and 3 input
// channels and 1 class, so a parallel build compiles them at the same time and the programs
// themselves never instantiate a model template: models_*.cpp for useg::cpu and, in builds with
// the CUDA backend, models_*_cuda.cu (compiled by nvcc) for useg::cuda.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "useg/backend/cpu.hpp"
#include "useg/core/error.hpp"
#include "useg/core/params.hpp"
#include "useg/core/tensor.hpp"
#include "useg/models/unet_skeleton.hpp"

namespace lgg {

/// What to build: family name, input channels, classes, configuration.
struct model_spec {
  std::string model = "unet";  ///< unet, attention-unet, r2unet, ar2unet
  int in_channels = 3;
  int classes = 1;
  useg::unet_config cfg;
};

/// A model on backend B (useg::cpu or useg::cuda) behind a virtual interface.
template <class B>
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

/// The family names.
inline const std::vector<std::string>& model_names() {
  static const std::vector<std::string> n{"unet", "attention-unet", "r2unet", "ar2unet"};
  return n;
}

/// The compiled-in combinations, e.g. "unet: input channels 1 or 3, 1 class".
inline std::vector<std::string> compiled_models() {
  std::vector<std::string> v;
  for (const auto& n : model_names()) v.push_back(n + ": input channels 1 or 3, 1 class");
  return v;
}

// One per translation unit and backend: nullptr when the channel/class combination is not
// compiled in. Specialized (defined) in models_<family>.cpp and models_<family>_cuda.cu.
template <class B>
std::unique_ptr<any_model<B>> make_unet_family(const model_spec& s);
template <class B>
std::unique_ptr<any_model<B>> make_attention_unet_family(const model_spec& s);
template <class B>
std::unique_ptr<any_model<B>> make_r2unet_family(const model_spec& s);
template <class B>
std::unique_ptr<any_model<B>> make_ar2unet_family(const model_spec& s);

#define LGG_DECLARE_FAMILIES(B)                                                                      \
  template <>                                                                                        \
  std::unique_ptr<any_model<B>> make_unet_family<B>(const model_spec& s);                            \
  template <>                                                                                        \
  std::unique_ptr<any_model<B>> make_attention_unet_family<B>(const model_spec& s);                  \
  template <>                                                                                        \
  std::unique_ptr<any_model<B>> make_r2unet_family<B>(const model_spec& s);                          \
  template <>                                                                                        \
  std::unique_ptr<any_model<B>> make_ar2unet_family<B>(const model_spec& s)
LGG_DECLARE_FAMILIES(useg::cpu);
LGG_DECLARE_FAMILIES(useg::cuda);  // defined only in builds with the CUDA backend
#undef LGG_DECLARE_FAMILIES

/// Build the model `s` describes on backend B. Throws useg::config_error for an unknown family
/// or a channel / class combination that is not compiled in (the message lists what is), or for
/// a bad config.
template <class B = useg::cpu>
std::unique_ptr<any_model<B>> make_model(const model_spec& s) {
  std::unique_ptr<any_model<B>> m;
  if (s.model == "unet") m = make_unet_family<B>(s);
  else if (s.model == "attention-unet") m = make_attention_unet_family<B>(s);
  else if (s.model == "r2unet") m = make_r2unet_family<B>(s);
  else if (s.model == "ar2unet") m = make_ar2unet_family<B>(s);
  else throw useg::config_error("unknown model '" + s.model + "' (expected unet, attention-unet, r2unet or ar2unet)");
  if (!m) {
    std::string msg = "model '" + s.model + "' with " + std::to_string(s.in_channels) + " input channel(s) and " +
                      std::to_string(s.classes) + " class(es) is not compiled into this program; available:";
    for (const auto& c : compiled_models()) msg += "\n  " + c;
    throw useg::config_error(msg);
  }
  return m;
}

}  // namespace lgg
