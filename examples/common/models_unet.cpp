// The unet family on useg::cpu: 1 and 3 input channels, 1 class.
#include "useg/unet.hpp"

#include "model_impl.hpp"

LGG_DEFINE_FAMILY(make_unet_family, useg::unet, useg::cpu)
