// useg/unet.hpp — U-Net (Ronneberger et al.): double-conv encoder/decoder, plain skips.
#pragma once
#include "useg/backend/cpu.hpp"
#include "useg/models/unet_skeleton.hpp"

namespace useg {
/// B: backend. InChannels: image channels. Classes: output channels (1 = binary, logits).
template <class B, int InChannels = 3, int Classes = 1>
using unet = unet_skeleton<B, InChannels, Classes, conv_encoder, identity_skip>;
}  // namespace useg
