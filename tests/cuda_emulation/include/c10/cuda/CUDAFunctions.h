// Stands in for c10's header of this name in the emulated build: one device, index 0.
#pragma once
#include <c10/core/Device.h>

#include "vk_emulation.h"

namespace c10 {
namespace cuda {
inline c10::DeviceIndex current_device() { return 0; }
}  // namespace cuda
}  // namespace c10
