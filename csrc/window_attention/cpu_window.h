// Window geometry and per-window loads and stores of the CPU window attention kernels: the cyclic
// shift, padding and window partition of the zoos as index arithmetic on the un-shifted map.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

#include "window_attention/window_attention.h"

namespace vitkernels {
namespace window_cpu {

struct Geometry {
  int64_t batch, height, width, heads, head_dim, channels;
  int64_t window_h, window_w, shift_h, shift_w;
  int64_t padded_h, padded_w, windows_h, windows_w, n;
  // Row stride of the [N, N] logits and of transposed [head_dim, N] keys and values: N rounded
  // up to whole gemm tiles. The extra columns are computed and ignored.
  int64_t ld;
  bool pad_first;

  int64_t windows() const { return windows_h * windows_w; }
  // Attention problems: one per (image, window, head), in that nesting order.
  int64_t tasks() const { return batch * windows() * heads; }
  bool shifted() const { return shift_h != 0 || shift_w != 0; }
};

// Checks qkv and the window arguments and derives the padded, windowed frame.
Geometry make_geometry(const at::Tensor& qkv, int64_t num_heads, at::IntArrayRef window_size,
                       at::IntArrayRef shift_size, bool pad_first);

// For every token of window `window` of image `image`: its pixel (image * H + row) * W + col in
// the un-shifted map, or -1 for padding, and its shift region (row region * 3 + column region).
void window_tokens(const Geometry& g, int64_t image, int64_t window, int64_t* pixel, int32_t* region);

// dst[t, e] = src[pixel[t] * row_stride + offset + e] for e < width, in fp32; padding tokens take
// fill[offset + e] (zeros when fill is null).
template <typename scalar_t>
void load_rows(const scalar_t* src, const int64_t* pixel, int64_t n, int64_t row_stride, int64_t offset,
               int64_t width, const float* fill, float* dst) {
  for (int64_t t = 0; t < n; ++t) {
    float* row = dst + t * width;
    if (pixel[t] >= 0) {
      const scalar_t* from = src + pixel[t] * row_stride + offset;
      for (int64_t e = 0; e < width; ++e) {
        row[e] = static_cast<float>(from[e]);
      }
    } else {
      for (int64_t e = 0; e < width; ++e) {
        row[e] = fill != nullptr ? fill[offset + e] : 0.0f;
      }
    }
  }
}

// The inverse of load_rows: real tokens are written to dst, row t multiplied by row_scale[t] when
// row_scale is not null; padding tokens are added to padding_sum[offset + e] when it is not null
// and dropped otherwise.
template <typename scalar_t>
void store_rows(const float* rows, const int64_t* pixel, int64_t n, int64_t row_stride, int64_t offset,
                int64_t width, scalar_t* dst, float* padding_sum, const float* row_scale = nullptr) {
  for (int64_t t = 0; t < n; ++t) {
    const float* row = rows + t * width;
    if (pixel[t] >= 0) {
      scalar_t* to = dst + pixel[t] * row_stride + offset;
      const float factor = row_scale != nullptr ? row_scale[t] : 1.0f;
      for (int64_t e = 0; e < width; ++e) {
        to[e] = static_cast<scalar_t>(row[e] * factor);
      }
    } else if (padding_sum != nullptr) {
      for (int64_t e = 0; e < width; ++e) {
        padding_sum[offset + e] += row[e];
      }
    }
  }
}

}  // namespace window_cpu
}  // namespace vitkernels
