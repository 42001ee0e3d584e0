// Host-side preparation shared by the CPU and CUDA patch embedding kernels: the patch geometry,
// the checked inputs as contiguous fp32 operands, and the device-agnostic tails of the backward.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceType.h>

#include <initializer_list>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/cpu_tensor.h"

namespace vitkernels {
namespace patch_embed {

// The convolution as a GEMM: M = batch * patches rows, K = depth = Cin * ph * pw in the weight's
// (c, i, j) order, N = dim = E; grid_h and grid_w count patches, the last ones padded past the image.
struct PatchGeometry {
  int64_t batch, channels, height, width, patch_h, patch_w, grid_h, grid_w, dim;

  int64_t patches() const { return grid_h * grid_w; }
  int64_t rows() const { return batch * patches(); }
  int64_t depth() const { return channels * patch_h * patch_w; }
  bool padded() const { return grid_h * patch_h != height || grid_w * patch_w != width; }
};

// The checked inputs, small operands as contiguous fp32 (undefined when absent).
struct PatchInputs {
  PatchGeometry g;
  at::Tensor x;                             // [B, Cin, H, W] contiguous, uint8 or the weight's dtype
  at::Tensor weight;                        // [E, K]
  at::Tensor scale, shift;                  // [Cin]: normalized pixel = x * scale + shift
  at::Tensor bias, norm_weight, norm_bias;  // [E]
  at::Tensor prefix, pos;                   // [P, E], [L, E]
  int64_t num_prefix = 0;
  int64_t pos_offset = 0;  // patch n adds pos row pos_offset + n: P when pos covers the prefix, else 0
};

// A [rows, E] table (prefix tokens or positions) given as [rows, E] or [1, rows, E].
inline at::Tensor token_table(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& weight,
                              int64_t dim) {
  if (!t.has_value()) {
    return at::Tensor();
  }
  check_same_device(*t, name, weight, "weight");
  check_floating(*t, name);
  TORCH_CHECK((t->dim() == 2 || (t->dim() == 3 && t->size(0) == 1)) && t->size(-1) == dim, name,
              " must be [L, ", dim, "] or [1, L, ", dim, "], got ", t->sizes());
  return contiguous_float(t->reshape({-1, dim}));
}

inline PatchGeometry geometry(const at::Tensor& x, const at::Tensor& weight, c10::DeviceType device) {
  check_device(x, "x", device);
  check_same_device(weight, "weight", x, "x");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "weight must be float16, bfloat16 or float32 for the compiled patch embedding, got ", dtype);
  check_dim(x, "x", 4);
  check_dim(weight, "weight", 4);
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() || x.scalar_type() == at::kByte,
              "x must be uint8 or the weight's dtype ", weight.scalar_type(), ", got ", x.scalar_type());
  check_size(x, "x", 1, weight.size(1));
  TORCH_CHECK(weight.size(0) > 0 && weight.size(2) > 0 && weight.size(3) > 0,
              "weight must have non-empty E, ph and pw, got shape ", weight.sizes());
  const int64_t ph = weight.size(2), pw = weight.size(3);
  return {x.size(0), x.size(1), x.size(2), x.size(3), ph, pw, (x.size(2) + ph - 1) / ph, (x.size(3) + pw - 1) / pw,
          weight.size(0)};
}

// (scale, shift) of the input normalization ((x / 255 for uint8) - mean) / std, per channel.
inline void input_affine(PatchInputs& in, const std::optional<at::Tensor>& mean,
                         const std::optional<at::Tensor>& std_dev) {
  const at::Tensor m = float_parameter(mean, "mean", in.x, in.g.channels);
  const at::Tensor s = float_parameter(std_dev, "std", in.x, in.g.channels);
  const double unit = in.x.scalar_type() == at::kByte ? 1.0 / 255.0 : 1.0;
  in.scale = at::full({in.g.channels}, unit, in.x.options().dtype(at::kFloat));
  in.shift = m.defined() ? -m : at::zeros_like(in.scale);
  if (s.defined()) {
    in.scale = in.scale / s;
    in.shift = in.shift / s;
  }
}

// The inputs of the op on `device`, checked, with the small operands as contiguous fp32.
inline PatchInputs checked_inputs(c10::DeviceType device, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& prefix_tokens, const std::optional<at::Tensor>& pos,
                                  const std::optional<at::Tensor>& norm_weight,
                                  const std::optional<at::Tensor>& norm_bias, const std::optional<at::Tensor>& mean,
                                  const std::optional<at::Tensor>& std_dev) {
  PatchInputs in;
  in.g = geometry(x, weight, device);
  const int64_t dim = in.g.dim;
  in.x = x.contiguous();
  in.weight = weight.reshape({dim, in.g.depth()}).to(at::kFloat).contiguous();
  input_affine(in, mean, std_dev);
  in.bias = float_parameter(bias, "bias", x, dim);
  in.norm_weight = float_parameter(norm_weight, "norm_weight", x, dim);
  in.norm_bias = float_parameter(norm_bias, "norm_bias", x, dim);
  in.prefix = token_table(prefix_tokens, "prefix_tokens", weight, dim);
  in.num_prefix = in.prefix.defined() ? in.prefix.size(0) : 0;
  in.pos = token_table(pos, "pos", weight, dim);
  if (in.pos.defined()) {
    const int64_t patches = in.g.patches();
    TORCH_CHECK(in.pos.size(0) == patches || in.pos.size(0) == in.num_prefix + patches, "pos must have ", patches,
                " rows (the patches) or ", in.num_prefix + patches, " (prefix tokens and patches), got ",
                in.pos.size(0));
    in.pos_offset = in.pos.size(0) - patches;
  }
  return in;
}

// A wanted gradient in its input's shape and dtype, else an empty tensor.
inline at::Tensor typed_gradient(const at::Tensor& grad, const std::optional<at::Tensor>& input, bool wanted,
                                 const at::Tensor& grad_out) {
  if (!wanted || !input.has_value() || !grad.defined()) {
    return at::empty({0}, grad_out.options());
  }
  return grad.to(input->scalar_type()).reshape(input->sizes()).contiguous();
}

// The gradients of patch_embed_bwd's inputs (x, weight, bias, prefix_tokens, pos, norm_weight,
// norm_bias, mean, std), each typed by typed_gradient.
inline void type_gradients(std::vector<at::Tensor>& grads, std::initializer_list<std::optional<at::Tensor>> inputs,
                           const c10::List<bool>& needs, const at::Tensor& grad_out) {
  size_t i = 0;
  for (const auto& input : inputs) {
    grads[i] = typed_gradient(grads[i], input, needs[i], grad_out);
    ++i;
  }
}

// grad_out as contiguous fp32 [B, P + N, E], checked against the geometry.
inline at::Tensor float_grad_out(const at::Tensor& grad_out, const PatchGeometry& g, int64_t tokens) {
  TORCH_CHECK(grad_out.numel() == g.batch * tokens * g.dim, "grad_out must hold [", g.batch, ", ", tokens, ", ",
              g.dim, "], got shape ", grad_out.sizes());
  return grad_out.reshape({g.batch, tokens, g.dim}).to(at::kFloat).contiguous();
}

// (dx, dmean, dstd) from d image [B, Cin, H, W] fp32, the gradient of the normalized image
// (x * scale + shift = (x' - mean) / std); each only where its input takes one.
inline void image_gradients(const PatchInputs& in, const at::Tensor& dimage, const std::optional<at::Tensor>& mean,
                            const std::optional<at::Tensor>& std_dev, at::Tensor& dx, at::Tensor& dmean,
                            at::Tensor& dstd) {
  const at::Tensor scale = in.scale.view({1, -1, 1, 1});
  if (in.x.is_floating_point()) {
    dx = dimage * scale;
  }
  const at::Tensor inv_std = std_dev.has_value() ? std_dev->to(at::kFloat).reciprocal() : at::ones_like(in.scale);
  if (mean.has_value()) {
    dmean = -dimage.sum({0, 2, 3}) * inv_std;
  }
  if (std_dev.has_value()) {
    const at::Tensor normalized = in.x.to(at::kFloat) * scale + in.shift.view({1, -1, 1, 1});
    dstd = -(dimage * normalized).sum({0, 2, 3}) * inv_std;
  }
}

}  // namespace patch_embed
}  // namespace vitkernels
