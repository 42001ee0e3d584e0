// Kernels that break the rules the emulator checks, one per check, for test_cuda_emulation.py to
// see each rejected with its message: a kernel error the emulator missed would pass the tests.
#include <torch/extension.h>

#include <cstring>
#include <string>

#include "common/ptx.cuh"

namespace {

// Half a warp at a warp barrier, the other half at the block barrier: neither completes.
void deadlock_kernel() {
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// Lanes of one warp at two different warp operations.
void divergence_kernel() {
  if (threadIdx.x % 2 == 0) {
    __syncwarp();
  } else {
    __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

// ldmatrix rows that end past the launch's dynamic shared memory.
void ldmatrix_bounds_kernel() {
  unsigned char* smem = ::vk_emu::dynamic_shared();
  uint32_t r[4];
  vitkernels::ptx::ldmatrix_x4(r, smem + 16 * (threadIdx.x % 32));
}

// A store one element past the dynamic shared memory.
void shared_overflow_kernel(int bytes) {
  if (threadIdx.x == 0) {
    ::vk_emu::dynamic_shared()[bytes] = 0;
  }
}

// Reads a cp.async destination without waiting: it still holds the fill (0xff), not the copy.
void copy_read_early_kernel(const float* src, float* out) {
  float* smem = reinterpret_cast<float*>(::vk_emu::dynamic_shared());
  if (threadIdx.x == 0) {
    vitkernels::ptx::copy_async_16(smem, src);
    out[0] = smem[0];
    vitkernels::ptx::wait_async_copies();
    out[1] = smem[0];
  }
}

// A thread that exits with a copy in flight.
void copy_never_waited_kernel(const float* src) {
  if (threadIdx.x == 0) {
    vitkernels::ptx::copy_async_16(::vk_emu::dynamic_shared(), src);
  }
}

// Warp 1 reads what warp 0 writes, with no barrier between: right in thread order only.
void missing_barrier_kernel(float* out) {
  float* smem = reinterpret_cast<float*>(::vk_emu::dynamic_shared());
  if (threadIdx.x == 0) {
    smem[0] = 1.0f;
  }
  if (threadIdx.x == 32) {
    out[0] = smem[0];
  }
}

void warp_barrier_kernel() { __syncwarp(); }

// A store one element past a tensor's memory: only AddressSanitizer sees it (asan_sweep.py).
void global_overflow_kernel(float* data, int64_t numel) {
  if (threadIdx.x == 0) {
    data[numel] = 1.0f;
  }
}

void fill_kernel(float* out) { out[threadIdx.x] = static_cast<float>(threadIdx.x); }

}  // namespace

// Runs the named rule-breaking kernel; raises the emulator's error where it reports one, and
// returns what the kernel stored where it does not.
std::vector<double> run_emulator_check(const std::string& name) {
  alignas(16) float src[4] = {2.0f, 3.0f, 4.0f, 5.0f};
  float out[2] = {0.0f, 0.0f};
  using ::vk_emu::Config;
  using ::vk_emu::launch;
  if (name == "deadlock") {
    launch(Config(1, 32), deadlock_kernel);
  } else if (name == "divergence") {
    launch(Config(1, 32), divergence_kernel);
  } else if (name == "ldmatrix_bounds") {
    launch(Config(1, 32, 256), ldmatrix_bounds_kernel);
  } else if (name == "shared_overflow") {
    launch(Config(1, 32, 64), shared_overflow_kernel, 64);
  } else if (name == "copy_read_early") {
    launch(Config(1, 32, 64), copy_read_early_kernel, static_cast<const float*>(src), static_cast<float*>(out));
  } else if (name == "copy_never_waited") {
    launch(Config(1, 32, 64), copy_never_waited_kernel, static_cast<const float*>(src));
  } else if (name == "missing_barrier") {
    launch(Config(1, 64, 64), missing_barrier_kernel, static_cast<float*>(out));
  } else if (name == "shared_without_optin") {
    cudaFuncSetAttribute(fill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    launch(Config(1, 32, 100 * 1024), fill_kernel, static_cast<float*>(out));
  } else if (name == "partial_warp") {
    launch(Config(1, 48), warp_barrier_kernel);
  } else if (name == "global_overflow") {
    at::Tensor data = at::empty({4}, at::kFloat);
    launch(Config(1, 32), global_overflow_kernel, data.mutable_data_ptr<float>(), data.numel());
  } else if (name == "block_too_large") {
    launch(Config(1, 2048), fill_kernel, static_cast<float*>(out));
  } else {
    TORCH_CHECK(false, "unknown emulator check ", name);
  }
  return {out[0], out[1]};
}
