// The attention-unet family on useg::cpu: 1 and 3 input channels, 1 class.
#include "useg/attention_unet.hpp"

#include "model_impl.hpp"

LGG_DEFINE_FAMILY(make_attention_unet_family, useg::attention_unet, useg::cpu)
