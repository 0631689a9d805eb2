// The r2unet family: 1 and 3 input channels, 1 class.
#include "useg/r2unet.hpp"

#include "model_impl.hpp"

namespace lgg {
std::unique_ptr<any_model> make_r2unet_family(const model_spec& s) { return make_family<useg::r2unet>(s); }
}  // namespace lgg
