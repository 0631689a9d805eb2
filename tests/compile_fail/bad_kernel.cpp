#include <useg/layers/conv2d.hpp>
#include <useg/backend/cpu.hpp>
useg::conv2d<useg::cpu, 2> c;
