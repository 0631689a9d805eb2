# The optional CUDA backend target useg::cuda (included by the top-level CMakeLists.txt).
#
# USEG_ENABLE_CUDA: AUTO (default) builds it when a CUDA compiler, the CUDA Toolkit and cuDNN are
# found; ON requires them; OFF skips the CUDA side entirely (no CUDA compiler is even looked for).
# Sets USEG_HAS_CUDA. Code that only uses useg::cpu never needs any of this.
set(USEG_ENABLE_CUDA AUTO CACHE STRING "CUDA backend: AUTO (when nvcc and cuDNN are found), ON (required) or OFF")
set_property(CACHE USEG_ENABLE_CUDA PROPERTY STRINGS AUTO ON OFF)

set(USEG_HAS_CUDA OFF)
set(_useg_cuda_why "")
if(NOT USEG_ENABLE_CUDA STREQUAL "OFF")
  # Ampere (A100) and Hopper (H100/H200): SASS for both plus PTX, so newer GPUs can JIT-compile.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 80 90)
  endif()
  # One CUDA runtime per program: the shared one that useg::cuda links (CUDA::cudart).
  if(NOT DEFINED CMAKE_CUDA_RUNTIME_LIBRARY)
    set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  endif()
  if(NOT DEFINED CMAKE_CUDA_HOST_COMPILER AND NOT DEFINED ENV{CUDAHOSTCXX} AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    set(CMAKE_CUDA_HOST_COMPILER ${CMAKE_CXX_COMPILER})
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    find_package(CUDAToolkit)
    if(CUDAToolkit_FOUND)
      find_package(CUDNN)
      if(CUDNN_FOUND)
        set(USEG_HAS_CUDA ON)
      else()
        set(_useg_cuda_why "cuDNN not found (set CUDNN_ROOT)")
      endif()
    else()
      set(_useg_cuda_why "CUDA Toolkit not found")
    endif()
  else()
    set(_useg_cuda_why "no CUDA compiler found (set CMAKE_CUDA_COMPILER or CUDACXX)")
  endif()
  if(USEG_ENABLE_CUDA STREQUAL "ON" AND NOT USEG_HAS_CUDA)
    message(FATAL_ERROR "useg: USEG_ENABLE_CUDA=ON but ${_useg_cuda_why}")
  endif()
endif()

if(USEG_HAS_CUDA)
  add_library(useg_cuda INTERFACE)
  add_library(useg::cuda ALIAS useg_cuda)
  target_link_libraries(useg_cuda INTERFACE useg CUDA::cudart CUDA::cublas CUDNN::cudnn)
  # Eigen (the CPU backend) compiles as plain host code inside .cu files.
  target_compile_definitions(useg_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:EIGEN_NO_CUDA>)
  # useg needs C++20 in .cu files too (CMake < 3.26 has no cuda_std_20 for nvcc: pass the flag).
  if(DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    target_compile_features(useg_cuda INTERFACE cuda_std_20)
  else()
    target_compile_options(useg_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
  endif()
  # OpenMP for the host code of .cu files (FindOpenMP's flags apply to CXX only).
  if(OpenMP_CXX_FOUND)
    target_compile_options(useg_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=${OpenMP_CXX_FLAGS}>)
  endif()
  set_target_properties(useg_cuda PROPERTIES EXPORT_NAME cuda)
  message(STATUS "useg: CUDA backend ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, cuDNN ${CUDNN_VERSION}, "
                 "architectures ${CMAKE_CUDA_ARCHITECTURES})")
elseif(USEG_ENABLE_CUDA STREQUAL "OFF")
  message(STATUS "useg: CUDA backend OFF (USEG_ENABLE_CUDA=OFF)")
else()
  message(STATUS "useg: CUDA backend OFF: ${_useg_cuda_why}")
endif()

# Installed as its own export set: the package config loads it when CUDA and cuDNN are found
# on the consumer's machine, so a CPU-only consumer of a CUDA-built package still works.
if(USEG_HAS_CUDA AND USEG_INSTALL)
  install(TARGETS useg_cuda EXPORT usegCudaTargets)
  install(EXPORT usegCudaTargets NAMESPACE useg:: DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/useg)
  install(FILES ${CMAKE_CURRENT_LIST_DIR}/FindCUDNN.cmake DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/useg)
endif()
