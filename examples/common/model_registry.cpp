#include "model_registry.hpp"

#include "useg/core/error.hpp"

namespace lgg {

std::vector<std::string> compiled_models() {
  std::vector<std::string> v;
  for (const auto& n : model_names()) v.push_back(n + ": input channels 1 or 3, 1 class");
  return v;
}

std::unique_ptr<any_model> make_model(const model_spec& s) {
  std::unique_ptr<any_model> m;
  if (s.model == "unet") m = make_unet_family(s);
  else if (s.model == "attention-unet") m = make_attention_unet_family(s);
  else if (s.model == "r2unet") m = make_r2unet_family(s);
  else if (s.model == "ar2unet") m = make_ar2unet_family(s);
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
