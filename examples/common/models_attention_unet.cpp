// The attention_unet family: 1 and 3 input channels, 1 class.
#include "useg/attention_unet.hpp"

#include "model_impl.hpp"

namespace lgg {
std::unique_ptr<any_model> make_attention_unet_family(const model_spec& s) { return make_family<useg::attention_unet>(s); }
}  // namespace lgg
