// The attention-unet family on useg::cuda: 1 and 3 input channels, 1 class (compiled by nvcc, only in
// builds with the CUDA backend).
#include "useg/backend/cuda.hpp"
#include "useg/attention_unet.hpp"

#include "model_impl.hpp"

LGG_DEFINE_FAMILY(make_attention_unet_family, useg::attention_unet, useg::cuda)
