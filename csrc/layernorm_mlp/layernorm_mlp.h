// LayerNorm, residual-add + LayerNorm and the LayerNorm + MLP block half: declarations shared by
// cpu.cpp and registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace vitkernels {

// LayerNorm over the last dim of x [..., C] (fp16, bf16 or fp32; computed in fp32) with optional
// weight and bias [C]: (y in x's shape and dtype, mean [M] fp32, rstd [M] fp32), M = numel / C.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_fwd_cpu(const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias, double eps);

// s = x + residual, then LayerNorm(s): (s, y, mean, rstd); s and y in x's dtype. The statistics
// are those of the fp32 sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);

// Backward of either forward from its statistics: (dx, d weight, d bias). x is the LayerNorm's
// input (s for add_layernorm); grad_extra, when given, is added to dx (add_layernorm's gradient of
// s). d weight is empty without weight, d bias empty unless bias_grad; both are fp32 sums reduced
// in a fixed order, returned in weight's dtype (x's dtype for d bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_extra, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool bias_grad);

// x + gamma * fc2(GELU(fc1(LayerNorm(x)))) for x [..., C], fc1_weight [H, C], fc2_weight [C, H],
// biases, LayerNorm affine and gamma optional; approximate is "none" (erf) or "tanh". Returns
// (out in x's shape and dtype, mean [M], rstd [M], fc1 pre-activation [M, H], fc2 output [M, C]
// (empty without gamma)), all but out fp32 and kept for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_mlp_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, double eps, const std::optional<at::Tensor>& gamma,
    c10::string_view approximate);

// Backward from the forward's saved tensors: gradients of (x, ln_weight, ln_bias, fc1_weight,
// fc1_bias, fc2_weight, fc2_bias, gamma), each typed as its input; empty for an absent input.
std::vector<at::Tensor> layernorm_mlp_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& pre, const at::Tensor& fc2_out, const std::optional<at::Tensor>& ln_weight,
    const std::optional<at::Tensor>& ln_bias, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, double eps,
    const std::optional<at::Tensor>& gamma, c10::string_view approximate);

#ifdef VITKERNELS_WITH_CUDA
// The same ops for CUDA tensors (cuda.cu), fp16, bf16 and fp32. LayerNorm statistics and the
// saved pre-activation and fc2 output are fp32 as on the CPU; the MLP's matrix products run in x's
// dtype (tensor cores for fp16 and bf16) with fp32 accumulation, its weights cast to x's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_fwd_cuda(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd_cuda(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_bwd_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_extra, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool bias_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_mlp_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, double eps, const std::optional<at::Tensor>& gamma,
    c10::string_view approximate);

std::vector<at::Tensor> layernorm_mlp_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& pre, const at::Tensor& fc2_out, const std::optional<at::Tensor>& ln_weight,
    const std::optional<at::Tensor>& ln_bias, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, double eps,
    const std::optional<at::Tensor>& gamma, c10::string_view approximate);
#endif

}  // namespace vitkernels
