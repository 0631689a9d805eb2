// The r2unet family on useg::cpu: 1 and 3 input channels, 1 class.
#include "useg/r2unet.hpp"

#include "model_impl.hpp"

LGG_DEFINE_FAMILY(make_r2unet_family, useg::r2unet, useg::cpu)
