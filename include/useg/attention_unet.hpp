// useg/attention_unet.hpp — Attention U-Net (Oktay et al.): U-Net with additive attention gates on the skips.
#pragma once
#include "useg/backend/cpu.hpp"
#include "useg/models/unet_skeleton.hpp"

namespace useg {
/// B: backend. InChannels: image channels. Classes: output channels (logits).
template <class B, int InChannels = 3, int Classes = 1>
using attention_unet = unet_skeleton<B, InChannels, Classes, conv_encoder, attention_skip>;
}  // namespace useg
