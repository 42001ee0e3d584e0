// Global multi-head attention (ViT, DeiT): declarations shared by cpu.cpp, cuda.cu and registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/checks.h"

namespace vitkernels {

// The optional additive bias as fp32, checked against qkv, with its strides (elements) once
// expanded to [batch, heads, n, n] written to strides[0..3]; undefined when absent. The returned
// tensor owns the memory the kernels read.
inline at::Tensor expanded_float_bias(const std::optional<at::Tensor>& bias, const at::Tensor& qkv, int64_t batch,
                                      int64_t heads, int64_t n, int64_t* strides) {
  if (!bias.has_value()) {
    return at::Tensor();
  }
  check_same_device(*bias, "bias", qkv, "qkv");
  check_floating(*bias, "bias");
  TORCH_CHECK(bias->dim() >= 2 && bias->dim() <= 4, "bias must be 2-D to 4-D, got shape ", bias->sizes());
  at::Tensor values = bias->to(at::kFloat);
  const at::Tensor expanded = values.expand({batch, heads, n, n});
  for (int64_t d = 0; d < 4; ++d) {
    strides[d] = expanded.stride(d);
  }
  return values;
}

// softmax(q k^T * scale + bias) v from qkv [B, N, 3C] (last dim ordered (3, heads, head_dim);
// fp16, bf16 or fp32, computed in fp32) with bias broadcastable to [B, heads, N, N] or None and
// scale head_dim ** -0.5 when None: (out [B, N, C] in qkv's dtype, lse [B, heads, N] fp32).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& qkv, int64_t num_heads,
                                                     const std::optional<at::Tensor>& bias,
                                                     std::optional<double> scale);

// Backward from the forward's lse: (dqkv, d bias in bias's shape and dtype, empty unless
// bias_grad).
std::tuple<at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                     const at::Tensor& lse, int64_t num_heads,
                                                     const std::optional<at::Tensor>& bias,
                                                     std::optional<double> scale, bool bias_grad);

#ifdef VITKERNELS_WITH_CUDA
// The CUDA kernels of attention_fwd/_bwd: same arguments and results as the CPU ones, for fp16
// and bf16 qkv with head_dim up to 64 (tensor cores; other inputs are refused).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& qkv, int64_t num_heads,
                                                      const std::optional<at::Tensor>& bias,
                                                      std::optional<double> scale);

std::tuple<at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                      const at::Tensor& lse, int64_t num_heads,
                                                      const std::optional<at::Tensor>& bias,
                                                      std::optional<double> scale, bool bias_grad);
#endif

}  // namespace vitkernels
