// useg/backend/cuda.hpp — the CUDA backend (useg::cuda): include it in a translation unit compiled
// by nvcc (a .cu file) and link useg::cuda (CUDA runtime, cuBLAS, cuDNN). Then every model,
// layer, loss and optimizer of useg runs on the GPU with B = useg::cuda:
//
//   #include <useg/ar2unet.hpp>
//   #include <useg/backend/cuda.hpp>
//   useg::ar2unet<useg::cuda, 3, 1> model;   // parameters on the GPU
//
// Programs that never name useg::cuda need neither this header nor nvcc.
#pragma once
#if !defined(__CUDACC__)
#error "useg/backend/cuda.hpp contains CUDA kernels: include it only in translation units compiled by nvcc (.cu files)"
#endif
#if !defined(__cplusplus) || __cplusplus < 202002L
#error "useg needs C++20: compile with nvcc -std=c++20 (CMake: link useg::cuda, which sets it)"
#endif

#include "useg/backend/cuda/check.hpp"
#include "useg/backend/cuda/context.hpp"
#include "useg/backend/cuda/memory.hpp"
#include "useg/backend/cuda/ops.hpp"
