// useg/useg.hpp — everything the model side of useg offers (CPU backend included).
// Data loading (<useg/data/...>) and file formats (<useg/io/...>) are separate, so that model
// code never pulls in libtiff or JSON.
#pragma once
#include "useg/ar2unet.hpp"
#include "useg/attention_unet.hpp"
#include "useg/loss/losses.hpp"
#include "useg/optim/optimizers.hpp"
#include "useg/optim/schedules.hpp"
#include "useg/r2unet.hpp"
#include "useg/unet.hpp"
