// Patch embedding (ViT, DeiT, Swin): declarations shared by cpu.cpp, cuda.cu and registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <ATen/core/List.h>

#include <optional>
#include <vector>

#include "common/checks.h"

namespace vitkernels {

// Image x [B, Cin, H, W] (uint8, scaled by 1/255, or the weight's dtype) to tokens [B, P + N, E]
// in the weight's dtype, computed in fp32: the conv with kernel = stride = (ph, pw) of weight
// [E, Cin, ph, pw] (+ bias [E]) over the image normalized as (x - mean) / std_dev per channel and
// zero-padded at the bottom and right to whole patches, then LayerNorm over E (norm_weight,
// norm_bias, norm_eps) when patch_norm, then the prefix tokens [P, E] (or [1, P, E]) written first
// and the position table pos [L, E] added: L = N adds it to the patches, L = P + N to every token.
at::Tensor patch_embed_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& prefix_tokens, const std::optional<at::Tensor>& pos,
                               const std::optional<at::Tensor>& norm_weight,
                               const std::optional<at::Tensor>& norm_bias, double norm_eps, bool patch_norm,
                               const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_dev);

// Backward of patch_embed_fwd_cpu for grad_out [B, P + N, E]: gradients of (x, weight, bias,
// prefix_tokens, pos, norm_weight, norm_bias, mean, std_dev), each in its input's shape and dtype where
// needs says so (x only when it is floating point), else empty tensors of grad_out's dtype.
std::vector<at::Tensor> patch_embed_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& prefix_tokens,
                                            const std::optional<at::Tensor>& pos,
                                            const std::optional<at::Tensor>& norm_weight,
                                            const std::optional<at::Tensor>& norm_bias, double norm_eps,
                                            bool patch_norm, const std::optional<at::Tensor>& mean,
                                            const std::optional<at::Tensor>& std_dev, const c10::List<bool>& needs);

#ifdef VITKERNELS_WITH_CUDA
// The same ops for CUDA tensors (cuda.cu): fp32 weights computed in fp32, fp16 and bf16 ones on
// tensor cores in their dtype with fp32 accumulation; a deterministic backward.
at::Tensor patch_embed_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& prefix_tokens, const std::optional<at::Tensor>& pos,
                                const std::optional<at::Tensor>& norm_weight,
                                const std::optional<at::Tensor>& norm_bias, double norm_eps, bool patch_norm,
                                const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_dev);

std::vector<at::Tensor> patch_embed_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& prefix_tokens,
                                             const std::optional<at::Tensor>& pos,
                                             const std::optional<at::Tensor>& norm_weight,
                                             const std::optional<at::Tensor>& norm_bias, double norm_eps,
                                             bool patch_norm, const std::optional<at::Tensor>& mean,
                                             const std::optional<at::Tensor>& std_dev, const c10::List<bool>& needs);
#endif

}  // namespace vitkernels
