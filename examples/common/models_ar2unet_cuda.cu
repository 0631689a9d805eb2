// The ar2unet family on useg::cuda: 1 and 3 input channels, 1 class (compiled by nvcc, only in
// builds with the CUDA backend).
#include "useg/backend/cuda.hpp"
#include "useg/ar2unet.hpp"

#include "model_impl.hpp"

LGG_DEFINE_FAMILY(make_ar2unet_family, useg::ar2unet, useg::cuda)
