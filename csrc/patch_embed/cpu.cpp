// Patch embedding for CPU tensors: one pack of the image into the GEMM's A operand, one fp32 GEMM,
// one epilogue pass over the output rows.
//
// Kernel = stride, so patches do not overlap and the patch matrix A [M, K] (M = B * Gh * Gw
// patches, K = Cin * ph * pw in the weight's (c, i, j) order) holds every pixel once: it is the
// GEMM's input itself, no unfold / im2col tensor precedes it. It is packed a grid row at a time
// from whole image rows, each pixel normalized and converted to fp32 on the way (x * scale + shift
// per channel, folding the uint8 1/255, mean and std); patches running past H or W get zeros, as
// the reference pads the normalized image. Z = A W^T is ATen's fp32 GEMM, and the epilogue writes
// every output row once: the prefix rows (token + position), and each patch row as Z + bias, then
// LayerNorm, then + position, cast to the output dtype.
//
// Backward: A is packed again rather than kept; the weight and image gradients are ATen GEMMs on it
// (dW = dZ^T A, dA = dZ W, dA then scattered back to the image layout); the patch norm's input is
// recomputed and differentiated by the LayerNorm kernels of layernorm_mlp; the remaining sums over
// the batch and patches are ATen reductions, deterministic on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "common/cpu_math.h"
#include "common/cpu_tensor.h"
#include "layernorm_mlp/layernorm_mlp.h"
#include "patch_embed/inputs.h"
#include "patch_embed/patch_embed.h"

namespace vitkernels {
namespace {

using patch_embed::PatchGeometry;
using patch_embed::PatchInputs;

// Output rows per parallel task in the epilogue: a task should touch tens of kilobytes.
constexpr int64_t kRowsPerTask = 16;

// Calls fn(c, image_offset, a_offset, n) for each run of n pixels that is one patch's row i of
// channel c in grid row gy of image b: contiguous at image_offset in x [B, Cin, H, W] and at
// a_offset in A [M, K]. Pixels past H or W belong to no run.
template <typename Fn>
void for_each_patch_run(const PatchGeometry& g, int64_t b, int64_t gy, const Fn& fn) {
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t i = 0; i < g.patch_h && gy * g.patch_h + i < g.height; ++i) {
      const int64_t image_row = ((b * g.channels + c) * g.height + gy * g.patch_h + i) * g.width;
      const int64_t first_patch = b * g.patches() + gy * g.grid_w;
      for (int64_t gx = 0; gx < g.grid_w; ++gx) {
        fn(c, image_row + gx * g.patch_w, (first_patch + gx) * g.depth() + (c * g.patch_h + i) * g.patch_w,
           std::min(g.patch_w, g.width - gx * g.patch_w));
      }
    }
  }
}

// Runs fn(b, gy) for every grid row of every image, in parallel.
template <typename Fn>
void for_each_grid_row(const PatchGeometry& g, const Fn& fn) {
  at::parallel_for(0, g.batch * g.grid_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      fn(r / g.grid_h, r % g.grid_h);
    }
  });
}

// A [M, K] fp32: each pixel as x * scale[c] + shift[c], zeros where padded patches run past the image.
at::Tensor pack_patches(const at::Tensor& x, const PatchGeometry& g, const at::Tensor& scale, const at::Tensor& shift) {
  const auto options = x.options().dtype(at::kFloat);
  at::Tensor a = g.padded() ? at::zeros({g.rows(), g.depth()}, options) : at::empty({g.rows(), g.depth()}, options);
  float* dst = a.mutable_data_ptr<float>();
  const float* s = scale.const_data_ptr<float>();
  const float* t = shift.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "patch_embed_pack_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    for_each_grid_row(g, [&](int64_t b, int64_t gy) {
      for_each_patch_run(g, b, gy, [&](int64_t c, int64_t from, int64_t to, int64_t n) {
        for (int64_t j = 0; j < n; ++j) {
          dst[to + j] = static_cast<float>(src[from + j]) * s[c] + t[c];
        }
      });
    });
  });
  return a;
}

// The gradient of the image from that of A [M, K] (fp32): pack_patches' layout undone, padding dropped.
at::Tensor unpack_patches(const at::Tensor& da, const PatchGeometry& g) {
  at::Tensor image = at::empty({g.batch, g.channels, g.height, g.width}, da.options());
  float* dst = image.mutable_data_ptr<float>();
  const float* src = da.const_data_ptr<float>();
  for_each_grid_row(g, [&](int64_t b, int64_t gy) {
    for_each_patch_run(g, b, gy, [&](int64_t, int64_t to, int64_t from, int64_t n) {
      std::copy(src + from, src + from + n, dst + to);
    });
  });
  return image;
}

void add_row(float* row, const float* other, int64_t n) {
  if (other != nullptr) {
    for (int64_t e = 0; e < n; ++e) {
      row[e] += other[e];
    }
  }
}

template <typename out_t>
void store_row(const float* row, out_t* out, int64_t n) {
  for (int64_t e = 0; e < n; ++e) {
    out[e] = static_cast<out_t>(row[e]);
  }
}

// Prefix token t (+ its position when pos covers the prefix) into out [E].
template <typename out_t>
void prefix_row(const PatchInputs& in, int64_t t, out_t* out) {
  const int64_t dim = in.g.dim;
  const float* token = in.prefix.const_data_ptr<float>() + t * dim;
  const float* position = in.pos_offset > 0 ? in.pos.const_data_ptr<float>() + t * dim : nullptr;
  for (int64_t e = 0; e < dim; ++e) {
    out[e] = static_cast<out_t>(token[e] + (position != nullptr ? position[e] : 0.0f));
  }
}

// Patch n's GEMM row z [E], finished in place (+ bias, LayerNorm, + position), into out [E].
template <typename out_t>
void patch_row(const PatchInputs& in, int64_t n, float* z, out_t* out, bool patch_norm, float eps) {
  const int64_t dim = in.g.dim;
  add_row(z, data_or_null(in.bias), dim);
  if (patch_norm) {
    float mean, rstd;
    cpu::layernorm_row(z, data_or_null(in.norm_weight), data_or_null(in.norm_bias), z, dim, eps, &mean, &rstd);
  }
  add_row(z, in.pos.defined() ? in.pos.const_data_ptr<float>() + (in.pos_offset + n) * dim : nullptr, dim);
  store_row(z, out, dim);
}

// Output rows [begin, end) of out [B, P + N, E], from the GEMM's output z [M, E].
template <typename out_t>
void epilogue_rows(const PatchInputs& in, float* z, out_t* out, bool patch_norm, float eps, int64_t begin,
                   int64_t end) {
  const int64_t dim = in.g.dim;
  const int64_t tokens = in.num_prefix + in.g.patches();
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / tokens, t = r % tokens;
    if (t < in.num_prefix) {
      prefix_row(in, t, out + r * dim);
    } else {
      const int64_t n = t - in.num_prefix;
      patch_row(in, n, z + (b * in.g.patches() + n) * dim, out + r * dim, patch_norm, eps);
    }
  }
}

// dz [M, E] of the patch rows before the patch norm, from dz after it; sets the norm's parameter
// gradients (fp32 sums reduced in a fixed order) where needed.
at::Tensor patch_norm_backward(const PatchInputs& in, const at::Tensor& a, const at::Tensor& dz,
                               const std::optional<at::Tensor>& norm_weight, double eps, bool bias_grad,
                               at::Tensor& dnorm_weight, at::Tensor& dnorm_bias) {
  at::Tensor pre = a.mm(in.weight.t());
  if (in.bias.defined()) {
    pre.add_(in.bias);
  }
  const auto [y, mean, rstd] = layernorm_fwd_cpu(pre, std::nullopt, std::nullopt, eps);
  auto [dpre, dweight, dbias] = layernorm_bwd_cpu(dz, std::nullopt, pre, mean, rstd, norm_weight, bias_grad);
  dnorm_weight = dweight;
  dnorm_bias = dbias;
  return dpre;
}

}  // namespace

at::Tensor patch_embed_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& prefix_tokens, const std::optional<at::Tensor>& pos,
                               const std::optional<at::Tensor>& norm_weight,
                               const std::optional<at::Tensor>& norm_bias, double norm_eps, bool patch_norm,
                               const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_dev) {
  TORCH_CHECK(norm_eps > 0, "norm_eps must be positive, got ", norm_eps);
  const PatchInputs in = patch_embed::checked_inputs(c10::DeviceType::CPU, x, weight, bias, prefix_tokens, pos,
                                                     norm_weight, norm_bias, mean, std_dev);
  const PatchGeometry& g = in.g;
  at::Tensor z = pack_patches(in.x, g, in.scale, in.shift).mm(in.weight.t());
  at::Tensor out = at::empty({g.batch, in.num_prefix + g.patches(), g.dim}, weight.options());
  VITKERNELS_DISPATCH_FLOATING(weight.scalar_type(), "patch_embed_fwd_cpu", [&] {
    at::parallel_for(0, out.numel() / g.dim, kRowsPerTask, [&](int64_t begin, int64_t end) {
      epilogue_rows(in, z.mutable_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), patch_norm,
                    static_cast<float>(norm_eps), begin, end);
    });
  });
  return out;
}

std::vector<at::Tensor> patch_embed_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& prefix_tokens,
                                            const std::optional<at::Tensor>& pos,
                                            const std::optional<at::Tensor>& norm_weight,
                                            const std::optional<at::Tensor>& norm_bias, double norm_eps,
                                            bool patch_norm, const std::optional<at::Tensor>& mean,
                                            const std::optional<at::Tensor>& std_dev, const c10::List<bool>& needs) {
  TORCH_CHECK(needs.size() == 9, "needs must hold 9 flags, got ", needs.size());
  const PatchInputs in = patch_embed::checked_inputs(c10::DeviceType::CPU, x, weight, bias, prefix_tokens, pos,
                                                     norm_weight, norm_bias, mean, std_dev);
  const PatchGeometry& g = in.g;
  const int64_t tokens = in.num_prefix + g.patches();
  const at::Tensor dout = patch_embed::float_grad_out(grad_out, g, tokens);
  std::vector<at::Tensor> grads(9);
  if (needs[3] && prefix_tokens.has_value()) {
    grads[3] = dout.narrow(1, 0, in.num_prefix).sum(0);
  }
  if (needs[4] && pos.has_value()) {
    grads[4] = dout.narrow(1, in.num_prefix - in.pos_offset, in.pos.size(0)).sum(0);
  }
  at::Tensor dz = dout.narrow(1, in.num_prefix, g.patches()).reshape({g.rows(), g.dim}).contiguous();
  const at::Tensor a = needs[1] || patch_norm ? pack_patches(in.x, g, in.scale, in.shift) : at::Tensor();
  if (patch_norm) {
    dz = patch_norm_backward(in, a, dz, norm_weight, norm_eps, needs[6] && norm_bias.has_value(), grads[5], grads[6]);
  }
  if (needs[2] && bias.has_value()) {
    grads[2] = dz.sum(0);
  }
  if (needs[1]) {
    grads[1] = dz.t().mm(a);
  }
  if (needs[0] || needs[7] || needs[8]) {
    patch_embed::image_gradients(in, unpack_patches(dz.mm(in.weight), g), mean, std_dev, grads[0], grads[7], grads[8]);
  }
  patch_embed::type_gradients(grads, {x, weight, bias, prefix_tokens, pos, norm_weight, norm_bias, mean, std_dev},
                              needs, grad_out);
  return grads;
}

}  // namespace vitkernels
