// Window attention kernels: declarations shared by cpu.cpp, cuda.cu and registration.cpp, and the
// relative-position index arithmetic every window kernel derives instead of loading.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"

namespace vitkernels {

// Bounds each window side so that the table's row count and N = Wh*Ww stay far from int64
// overflow; real windows (Swin: 7 to 24) are nowhere near it.
constexpr int64_t kMaxWindowSide = int64_t{1} << 16;

// Row of the [(2Wh-1)(2Ww-1), heads] bias table for query token (ri, ci) and key token (rj, cj)
// of a Wh x Ww window; the same index timm, torchvision and Hugging Face keep in a buffer.
template <typename I>
C10_HOST_DEVICE inline I relative_position_row(I ri, I ci, I rj, I cj, I window_h, I window_w) {
  return (ri - rj + window_h - 1) * (2 * window_w - 1) + (ci - cj + window_w - 1);
}

// T in a parameter that takes no part in template argument deduction: std::type_identity_t,
// which is C++20, while torch's extension builder may compile as C++17 (torch 2.11 does).
template <typename T>
struct NonDeduced {
  using type = T;
};
template <typename T>
using non_deduced_t = typename NonDeduced<T>::type;

// Coordinate in the un-shifted, un-padded map of frame coordinate y (a row or a column) of the
// shifted, padded map, or -1 where the frame holds padding. pad_first=false: shift then pad (timm);
// true: pad then shift (original Swin, Hugging Face, torchvision). I: int64_t, or int where the
// caller has bounded the padded map below 2^30.
template <typename I = int64_t>
C10_HOST_DEVICE inline I source_coordinate(non_deduced_t<I> y, non_deduced_t<I> size,
                                           non_deduced_t<I> padded, non_deduced_t<I> shift,
                                           bool pad_first) {
  if (pad_first) {
    const I p = (y + shift) % padded;
    return p < size ? p : -1;
  }
  return y < size ? (y + shift) % size : -1;
}

// Shift-mask region (0, 1 or 2) of frame coordinate y, as the zoos' masks slice the padded map.
template <typename I = int64_t>
C10_HOST_DEVICE inline int32_t shift_region(non_deduced_t<I> y, non_deduced_t<I> padded,
                                            non_deduced_t<I> window, non_deduced_t<I> shift) {
  if (shift == 0) {
    return 0;
  }
  return static_cast<int32_t>(y >= padded - window) + static_cast<int32_t>(y >= padded - shift);
}

// Device-independent checks of gather_relative_position_bias's arguments.
inline void check_gather_relative_position_bias(const at::Tensor& bias_table, int64_t window_h, int64_t window_w) {
  check_range(window_h, "window_h", 1, kMaxWindowSide);
  check_range(window_w, "window_w", 1, kMaxWindowSide);
  check_floating(bias_table, "bias_table");
  const int64_t rows = (2 * window_h - 1) * (2 * window_w - 1);
  TORCH_CHECK(bias_table.dim() == 2 && bias_table.size(0) == rows,
              "bias_table must have shape [(2*window_h-1)*(2*window_w-1), heads] = [", rows, ", heads] for window (",
              window_h, ", ", window_w, "), got ", bias_table.sizes());
}

// bias_table [(2Wh-1)(2Ww-1), heads], any strides -> contiguous [heads, N, N], N = Wh*Ww, with
// out[h, i, j] = bias_table[relative_position_row(token i, token j), h], tokens in row-major order.
at::Tensor gather_relative_position_bias_cpu(const at::Tensor& bias_table, int64_t window_h, int64_t window_w);

// Fused window attention, forward: qkv [B, H, W, 3C] (the qkv Linear's output on the un-shifted,
// un-padded map) -> (out [B, H, W, C] in qkv's dtype, lse [B, nW, heads, N] fp32 softmax
// statistics). Arguments and semantics as vitkernels.ops.window_attention; scale None means
// head_dim ** -0.5; logit_scale selects SwinV2 cosine attention.
std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cpu(
    const at::Tensor& qkv, int64_t num_heads, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    const std::optional<at::Tensor>& bias_table, const std::optional<at::Tensor>& qkv_bias,
    const std::optional<at::Tensor>& logit_scale, std::optional<double> scale, bool pad_first, double mask_value);

// Backward of window_attention_fwd from its lse: (dqkv, d bias_table, d qkv_bias, d logit_scale),
// each shaped and typed as its input; a gradient whose input is None is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse, int64_t num_heads,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& qkv_bias, const std::optional<at::Tensor>& logit_scale,
    std::optional<double> scale, bool pad_first, double mask_value);

#ifdef VITKERNELS_WITH_CUDA
at::Tensor gather_relative_position_bias_cuda(const at::Tensor& bias_table, int64_t window_h, int64_t window_w);

// The CUDA kernels of window_attention_fwd/_bwd: same arguments and results as the CPU ones, for
// fp16 and bf16 qkv with head_dim up to 64 (tensor cores; other inputs are refused).
std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cuda(
    const at::Tensor& qkv, int64_t num_heads, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    const std::optional<at::Tensor>& bias_table, const std::optional<at::Tensor>& qkv_bias,
    const std::optional<at::Tensor>& logit_scale, std::optional<double> scale, bool pad_first, double mask_value);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse, int64_t num_heads,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& qkv_bias, const std::optional<at::Tensor>& logit_scale,
    std::optional<double> scale, bool pad_first, double mask_value);
#endif

}  // namespace vitkernels
