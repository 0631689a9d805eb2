#include <useg/unet.hpp>
useg::unet<useg::cpu, 3, 0> m;
