// Stands in for c10's header of this name in the emulated build: there is no device to switch to.
#pragma once
#include <c10/core/Device.h>

#include "vk_emulation.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  CUDAGuard() = default;
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
