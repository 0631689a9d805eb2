// useg/ar2unet.hpp — AR2U-Net (Attention R2U-Net): recurrent residual blocks and attention gates.
#pragma once
#include "useg/backend/cpu.hpp"
#include "useg/models/unet_skeleton.hpp"

namespace useg {
/// B: backend. InChannels: image channels. Classes: output channels (logits). Recurrence t in unet_config.
template <class B, int InChannels = 3, int Classes = 1>
using ar2unet = unet_skeleton<B, InChannels, Classes, rrcnn_encoder, attention_skip>;
}  // namespace useg
