// Window attention kernels for CPU tensors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "window_attention/window_attention.h"

namespace vitkernels {
namespace {

// Output elements per parallel task: enough to amortize a task, as ATen's own CPU kernels use.
constexpr int64_t kElementsPerTask = 32768;

// Fills output rows [begin, end) of the [heads * N, N] view; row h * N + i holds query token i of head h.
template <typename scalar_t>
void gather_bias_rows(const scalar_t* table, int64_t stride_row, int64_t stride_head, scalar_t* out, int64_t begin,
                      int64_t end, int64_t window_h, int64_t window_w) {
  const int64_t n = window_h * window_w;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t head = row / n;
    const int64_t query = row % n;
    const int64_t ri = query / window_w;
    const int64_t ci = query % window_w;
    const scalar_t* column = table + head * stride_head;
    scalar_t* dst = out + row * n;
    for (int64_t rj = 0; rj < window_h; ++rj) {
      // Moving the key one column right moves one row up the table.
      const int64_t first = relative_position_row(ri, ci, rj, 0, window_h, window_w);
      for (int64_t cj = 0; cj < window_w; ++cj) {
        dst[rj * window_w + cj] = column[(first - cj) * stride_row];
      }
    }
  }
}

}  // namespace

at::Tensor gather_relative_position_bias_cpu(const at::Tensor& bias_table, int64_t window_h, int64_t window_w) {
  check_device(bias_table, "bias_table", c10::DeviceType::CPU);
  check_gather_relative_position_bias(bias_table, window_h, window_w);
  const int64_t n = window_h * window_w;
  const int64_t heads = bias_table.size(1);
  at::Tensor out = at::empty({heads, n, n}, bias_table.options());
  if (out.numel() == 0) {
    return out;
  }
  const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / n);
  VITKERNELS_DISPATCH_FLOATING(bias_table.scalar_type(), "gather_relative_position_bias_cpu", [&] {
    const scalar_t* table = bias_table.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t stride_row = bias_table.stride(0);
    const int64_t stride_head = bias_table.stride(1);
    at::parallel_for(0, heads * n, rows_per_task, [&](int64_t begin, int64_t end) {
      gather_bias_rows(table, stride_row, stride_head, dst, begin, end, window_h, window_w);
    });
  });
  return out;
}

}  // namespace vitkernels
