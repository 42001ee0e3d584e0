// Stands in for c10's header of this name in the emulated build: checks that throw, a launch
// check that has nothing to check (launch errors throw).
#pragma once
#include <c10/util/Exception.h>

#include "vk_emulation.h"

#define C10_CUDA_CHECK(EXPR)                                                       \
  do {                                                                             \
    const cudaError_t vk_error = (EXPR);                                           \
    TORCH_CHECK(vk_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(vk_error)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
