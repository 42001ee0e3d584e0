// Deterministic reductions for CUDA kernels: column sums whose order of addition is fixed by the
// shape alone (no atomics), so repeated runs give bitwise-equal results. Warp sums are
// cuda::warp_sum (cuda_utils.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_utils.cuh"

namespace vitkernels {

namespace column_sum {

constexpr int kThreads = 256;
constexpr int64_t kMaxChunks = 256;       // row chunks summed in parallel
constexpr int64_t kMinRowsPerChunk = 32;  // fewer rows than this per chunk is not worth a block

// partial[chunk, col] = sum of value(row, col) over the chunk's rows, in row order.
// grid (column blocks, chunks).
template <typename Value>
__global__ void partial_sums_kernel(Value value, float* __restrict__ partial, int64_t rows, int64_t cols,
                                    int64_t rows_per_chunk) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= cols) {
    return;
  }
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
  float sum = 0.0f;
  for (int64_t row = begin; row < end; ++row) {
    sum += value(row, col);
  }
  partial[blockIdx.y * cols + col] = sum;
}

// out[col] = sum of partial[chunk, col] in chunk order (a template so that the header defines no
// symbol of its own).
template <typename acc_t>
__global__ void chunk_sums_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int64_t chunks,
                                  int64_t cols) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= cols) {
    return;
  }
  acc_t sum = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    sum += partial[chunk * cols + col];
  }
  out[col] = sum;
}

// Blocks of kThreads columns that cover cols, for one launch.
inline unsigned column_blocks(int64_t cols) {
  const int64_t blocks = (cols + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "column sum over ", cols, " columns is too large for one launch");
  return static_cast<unsigned>(blocks);
}

// fp32 [cols]: out[col] = sum of partial[chunk, col] over the chunks of fp32 [chunks, cols], in
// chunk order, one thread per column: for the few chunks column_sums leaves.
inline at::Tensor chunk_sums(const at::Tensor& partial, cudaStream_t stream) {
  const int64_t cols = partial.size(1);
  at::Tensor out = at::empty({cols}, partial.options());
  chunk_sums_kernel<float><<<column_blocks(cols), kThreads, 0, stream>>>(
      partial.const_data_ptr<float>(), out.mutable_data_ptr<float>(), partial.size(0), cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Element (row, col) of a row-major fp32 matrix.
struct Rows {
  const float* data;
  int64_t cols;
  __device__ float operator()(int64_t row, int64_t col) const { return data[row * cols + col]; }
};

}  // namespace column_sum

// fp32 [cols] on the device of `like`: out[col] = sum over row < rows of value(row, col), where
// value is a functor `__device__ float operator()(int64_t row, int64_t col) const`. The rows are
// summed in at most kMaxChunks chunks at once, then the chunks in order: the order depends on
// the shape alone.
template <typename Value>
at::Tensor column_sums(const Value& value, int64_t rows, int64_t cols, const at::Tensor& like, cudaStream_t stream) {
  const auto options = like.options().dtype(at::kFloat);
  if (rows == 0 || cols == 0) {
    return at::zeros({cols}, options);
  }
  const int64_t rows_per_chunk =
      std::max(column_sum::kMinRowsPerChunk, (rows + column_sum::kMaxChunks - 1) / column_sum::kMaxChunks);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  const unsigned col_blocks = column_sum::column_blocks(cols);
  at::Tensor partial = at::empty({chunks, cols}, options);
  column_sum::partial_sums_kernel<<<dim3(col_blocks, static_cast<unsigned>(chunks)),
                                    column_sum::kThreads, 0, stream>>>(value, partial.mutable_data_ptr<float>(),
                                                                       rows, cols, rows_per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return column_sum::chunk_sums(partial, stream);
}

namespace column_sum {

// fp32 [cols]: out[col] = sum of partial[chunk, col] over fp32 [chunks, cols]. Up to kMaxChunks
// chunks one thread per column adds them in order; more (a grid of thousands of row groups'
// partials) go through column_sums, whose threads each add a run of at most a few dozen before
// one thread per column adds the runs: a serial sum over thousands of chunks would take one
// thread a memory latency per chunk.
inline at::Tensor sum_chunks(const at::Tensor& partial, cudaStream_t stream) {
  if (partial.size(0) <= kMaxChunks) {
    return chunk_sums(partial, stream);
  }
  return column_sums(Rows{partial.const_data_ptr<float>(), partial.size(1)}, partial.size(0), partial.size(1), partial,
                     stream);
}

}  // namespace column_sum

}  // namespace vitkernels
