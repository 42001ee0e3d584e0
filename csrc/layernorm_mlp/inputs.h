// Host-side checks and gradient typing shared by the CPU and CUDA LayerNorm and LayerNorm + MLP
// kernels: what does not depend on where the kernels run.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/core/DeviceType.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/cpu_tensor.h"

namespace vitkernels {
namespace layernorm {

// x [..., C] on `device`, fp16, bf16 or fp32, with a non-empty last dim.
inline void check_input(const at::Tensor& x, const char* name, c10::DeviceType device) {
  check_device(x, name, device);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, name,
              " must be float16, bfloat16 or float32 on the ", c10::DeviceTypeName(device, true), " backend, got ",
              dtype);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, name, " must have a non-empty last dim, got shape ", x.sizes());
}

inline void check_eps(double eps) { TORCH_CHECK(eps > 0, "eps must be positive, got ", eps); }

// The residual of residual-add + LayerNorm: x's device, dtype and shape.
inline void check_residual(const at::Tensor& residual, const at::Tensor& x) {
  check_same_device(residual, "residual", x, "x");
  check_same_dtype(residual, "residual", x, "x");
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ", residual.sizes());
}

// The LayerNorm backward's incoming gradients: x's device, dtype and shape.
inline void check_gradients(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_extra,
                            const at::Tensor& x) {
  for (const at::Tensor* t : {&grad_y, grad_extra.has_value() ? &*grad_extra : &grad_y}) {
    check_same_device(*t, "grad", x, "x");
    check_same_dtype(*t, "grad", x, "x");
    TORCH_CHECK(t->sizes() == x.sizes(), "gradients must have x's shape ", x.sizes(), ", got ", t->sizes());
  }
}

// The forward's row statistics: fp32 on x's device, one value per row of x.
inline void check_statistics(const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& x) {
  const int64_t rows = x.numel() / x.size(-1);
  for (const at::Tensor* t : {&mean, &rstd}) {
    check_same_device(*t, "mean and rstd", x, "x");
    check_dtype(*t, "mean and rstd", at::kFloat);
    TORCH_CHECK(t->numel() == rows, "mean and rstd must hold one value per row (", rows, "), got shape ",
                t->sizes());
  }
}

// layernorm_bwd's result from dx in x's shape and dtype and the fp32 parameter gradients: d weight
// in the weight's dtype (x's when absent), d bias in x's dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> typed_layernorm_gradients(
    const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias, const std::optional<at::Tensor>& weight,
    const at::Tensor& x) {
  const auto weight_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  return {dx, dweight.to(weight_dtype), dbias.to(x.scalar_type())};
}

inline bool tanh_gelu(c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "approximate must be \"none\" or \"tanh\", got \"",
              std::string(approximate), "\"");
  return approximate == "tanh";
}

// A Linear weight [rows, cols] on x's device, checked.
inline const at::Tensor& checked_matrix(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t rows,
                                        int64_t cols) {
  check_same_device(t, name, x, "x");
  check_floating(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape [", rows, ", ", cols,
              "], got ", t.sizes());
  return t;
}

// The MLP's parameters, checked against x [..., C] with fc1's width `hidden`: the LayerNorm affine
// and gamma as fp32 vectors, the Linear weights as matrix(weight) and their biases as
// bias(bias, name, size) give them to the kernels.
struct MlpParameters {
  at::Tensor ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma;

  template <typename Matrix, typename Bias>
  MlpParameters(const at::Tensor& x, const std::optional<at::Tensor>& ln_w, const std::optional<at::Tensor>& ln_b,
                const at::Tensor& fc1_w, const std::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
                const std::optional<at::Tensor>& fc2_b, const std::optional<at::Tensor>& gamma_in, int64_t hidden,
                const Matrix& matrix, const Bias& bias) {
    const int64_t c = x.size(-1);
    ln_weight = float_parameter(ln_w, "ln_weight", x, c);
    ln_bias = float_parameter(ln_b, "ln_bias", x, c);
    fc1_weight = matrix(checked_matrix(fc1_w, "fc1_weight", x, hidden, c));
    fc1_bias = bias(fc1_b, "fc1_bias", hidden);
    fc2_weight = matrix(checked_matrix(fc2_w, "fc2_weight", x, c, hidden));
    fc2_bias = bias(fc2_b, "fc2_bias", c);
    gamma = float_parameter(gamma_in, "gamma", x, c);
  }
};

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have x's shape ", x.sizes(), ", got ", grad_out.sizes());
}

inline at::Tensor empty_gradient(const at::Tensor& x) { return at::empty({0}, x.options().dtype(at::kFloat)); }

// A parameter's gradient in its input's dtype, or an empty tensor for an absent input.
inline at::Tensor typed_gradient(const at::Tensor& grad, const std::optional<at::Tensor>& input,
                                 const at::Tensor& x) {
  return input.has_value() ? grad.to(input->scalar_type()).view(input->sizes()) : empty_gradient(x);
}

// Column sums of [M, N] rows in fp32.
inline at::Tensor column_sums(const at::Tensor& t) { return at::sum(t, {0}, false, at::kFloat); }

// What layernorm_mlp_bwd's gradients come from: dx in x's shape and dtype, the LayerNorm's fp32
// parameter gradients, the Linear weights' gradients, and the [M, *] gradients of fc1's output
// (dpre), of fc2's output (dz) and of the block's output (dout).
struct MlpGradients {
  at::Tensor dx, dln_weight, dln_bias, dfc1_weight, dpre, dfc2_weight, dz, dout;
};

// layernorm_mlp_bwd's result: the gradients of (x, ln_weight, ln_bias, fc1_weight, fc1_bias,
// fc2_weight, fc2_bias, gamma), each in its input's dtype, empty for an absent input.
inline std::vector<at::Tensor> typed_mlp_gradients(
    const MlpGradients& d, const at::Tensor& fc2_out, const std::optional<at::Tensor>& ln_weight,
    const std::optional<at::Tensor>& ln_bias, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, const std::optional<at::Tensor>& gamma,
    const at::Tensor& x) {
  const auto summed = [&](const at::Tensor& t, const std::optional<at::Tensor>& input) {
    return input.has_value() ? typed_gradient(column_sums(t), input, x) : empty_gradient(x);
  };
  return {d.dx,
          typed_gradient(d.dln_weight, ln_weight, x),
          typed_gradient(d.dln_bias, ln_bias, x),
          typed_gradient(d.dfc1_weight, fc1_weight, x),
          summed(d.dpre, fc1_bias),
          typed_gradient(d.dfc2_weight, fc2_weight, x),
          summed(d.dz, fc2_bias),
          gamma.has_value() ? summed(d.dout.to(at::kFloat).mul(fc2_out.reshape(d.dout.sizes())), gamma)
                            : empty_gradient(x)};
}

}  // namespace layernorm
}  // namespace vitkernels
