#include <useg/unet.hpp>
useg::unet<useg::cpu, 0, 1> m;
