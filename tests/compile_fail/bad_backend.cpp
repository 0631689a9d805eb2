#include <useg/ar2unet.hpp>
useg::ar2unet<int, 3, 1> m;
