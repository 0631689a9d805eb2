// useg/backend/cpu.hpp — the CPU backend (useg::cpu, useg::cpu_f64).
#pragma once
#include "useg/backend/cpu/context.hpp"
#include "useg/backend/cpu/ops.hpp"
