// Window attention kernels for CUDA tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "window_attention/window_attention.h"

namespace vitkernels {
namespace {

constexpr int kGatherThreads = 256;
// Grid-stride loops cover what this many blocks do not; far more blocks than any GPU runs at once.
constexpr int64_t kGatherMaxBlocks = int64_t{1} << 16;

// One thread per output element of the contiguous [heads, N, N] output, consecutive threads on
// consecutive keys, so stores coalesce; the small table stays in L1/L2.
template <typename scalar_t>
__global__ void gather_relative_position_bias_kernel(const scalar_t* __restrict__ table,  // [rows, heads], strided
                                                     int64_t stride_row, int64_t stride_head,
                                                     scalar_t* __restrict__ out,  // [heads, N, N]
                                                     int64_t total, int64_t window_h, int64_t window_w) {
  const int64_t n = window_h * window_w;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t linear = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; linear < total;
       linear += step) {
    const int64_t key = linear % n;
    const int64_t query = (linear / n) % n;
    const int64_t head = linear / (n * n);
    const int64_t row = relative_position_row(query / window_w, query % window_w, key / window_w, key % window_w,
                                              window_h, window_w);
    out[linear] = table[row * stride_row + head * stride_head];
  }
}

}  // namespace

at::Tensor gather_relative_position_bias_cuda(const at::Tensor& bias_table, int64_t window_h, int64_t window_w) {
  check_device(bias_table, "bias_table", c10::DeviceType::CUDA);
  check_gather_relative_position_bias(bias_table, window_h, window_w);
  const c10::cuda::CUDAGuard device_guard(bias_table.device());
  const int64_t n = window_h * window_w;
  const int64_t heads = bias_table.size(1);
  at::Tensor out = at::empty({heads, n, n}, bias_table.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  const int64_t blocks = std::min<int64_t>((total + kGatherThreads - 1) / kGatherThreads, kGatherMaxBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VITKERNELS_DISPATCH_FLOATING(bias_table.scalar_type(), "gather_relative_position_bias_cuda", [&] {
    gather_relative_position_bias_kernel<scalar_t><<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(
        bias_table.const_data_ptr<scalar_t>(), bias_table.stride(0), bias_table.stride(1),
        out.mutable_data_ptr<scalar_t>(), total, window_h, window_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace vitkernels
