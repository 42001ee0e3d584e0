// Stands in for csrc/common/cublaslt_linear.h in the emulated build: the same product, by ATen on
// the CPU. out[M, N] (fp32) = input[M, K] @ weight[N, K]^T + bias[N], inputs in their dtype's
// values, accumulated in fp32.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

namespace vitkernels {
namespace cublaslt {

inline void linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out) {
  const at::Tensor a = input.to(at::kFloat);
  const at::Tensor b = weight.to(at::kFloat).t();
  out.copy_(bias.defined() ? at::addmm(bias.to(at::kFloat), a, b) : at::mm(a, b));
}

}  // namespace cublaslt
}  // namespace vitkernels
