// Stands in for the CUDA toolkit header of this name in the emulated build (vk_emulation.h).
#pragma once
#include "vk_emulation.h"
