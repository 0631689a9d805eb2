// useg/r2unet.hpp — R2U-Net (Alom et al.): recurrent residual conv blocks, plain skips.
#pragma once
#include "useg/backend/cpu.hpp"
#include "useg/models/unet_skeleton.hpp"

namespace useg {
/// B: backend. InChannels: image channels. Classes: output channels (logits). Recurrence t in unet_config.
template <class B, int InChannels = 3, int Classes = 1>
using r2unet = unet_skeleton<B, InChannels, Classes, rrcnn_encoder, identity_skip>;
}  // namespace useg
