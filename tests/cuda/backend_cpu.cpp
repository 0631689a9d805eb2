// The backend-generic test bodies (suite.hpp) instantiated for useg::cpu. Built everywhere: it
// runs the same bodies the CUDA backend is tested with, on the CPU backend.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "useg/backend/cpu.hpp"
#include "suite.hpp"

USEG_SUITE_INVOKE(useg::cpu);
