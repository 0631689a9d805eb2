// The ar2unet family on useg::cpu: 1 and 3 input channels, 1 class.
#include "useg/ar2unet.hpp"

#include "model_impl.hpp"

LGG_DEFINE_FAMILY(make_ar2unet_family, useg::ar2unet, useg::cpu)
