// LayerNorm and residual-add + LayerNorm kernels for CPU tensors: one pass over each row in fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <ATen/ops/mm.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_math.h"
#include "common/cpu_tensor.h"
#include "layernorm_mlp/inputs.h"
#include "layernorm_mlp/layernorm_mlp.h"

namespace vitkernels {
namespace {

// Rows per parallel task: a task should touch tens of kilobytes.
constexpr int64_t kRowsPerTask = 16;
// Blocks of rows whose weight and bias gradients are summed separately, then in block order: a
// count independent of the thread count keeps the sums bitwise reproducible.
constexpr int64_t kGradientBlocks = 64;

void check_input(const at::Tensor& x, const char* name) { layernorm::check_input(x, name, c10::DeviceType::CPU); }

template <typename scalar_t>
void load_row(const scalar_t* src, float* dst, int64_t c) {
  for (int64_t e = 0; e < c; ++e) {
    dst[e] = static_cast<float>(src[e]);
  }
}

template <typename scalar_t>
void store_row(const float* src, scalar_t* dst, int64_t c) {
  for (int64_t e = 0; e < c; ++e) {
    dst[e] = static_cast<scalar_t>(src[e]);
  }
}

// Rows [begin, end) of LayerNorm(x + residual) (residual and sum nullable: plain LayerNorm).
template <typename scalar_t, typename out_t>
void layernorm_rows(const scalar_t* x, const scalar_t* residual, const float* weight, const float* bias,
                    scalar_t* sum, out_t* y, float* mean, float* rstd, int64_t begin, int64_t end, int64_t c,
                    float eps) {
  std::vector<float> row(c), other(c);
  for (int64_t r = begin; r < end; ++r) {
    load_row(x + r * c, row.data(), c);
    if (residual != nullptr) {
      load_row(residual + r * c, other.data(), c);
      for (int64_t e = 0; e < c; ++e) {
        row[e] += other[e];
      }
      store_row(row.data(), sum + r * c, c);
    }
    if constexpr (std::is_same_v<out_t, float>) {
      cpu::layernorm_row(row.data(), weight, bias, y + r * c, c, eps, mean + r, rstd + r);
    } else {
      cpu::layernorm_row(row.data(), weight, bias, other.data(), c, eps, mean + r, rstd + r);
      store_row(other.data(), y + r * c, c);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_forward(
    const at::Tensor& x_in, const at::Tensor* residual_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps) {
  check_input(x_in, "x");
  layernorm::check_eps(eps);
  const at::Tensor weight = float_parameter(weight_in, "weight", x_in, x_in.size(-1));
  const at::Tensor bias = float_parameter(bias_in, "bias", x_in, x_in.size(-1));
  const at::Tensor x = x_in.contiguous();
  at::Tensor residual;
  at::Tensor sum;
  if (residual_in != nullptr) {
    layernorm::check_residual(*residual_in, x_in);
    residual = residual_in->contiguous();
    sum = at::empty_like(x);
  }
  const int64_t c = x.size(-1);
  const int64_t rows = x.numel() / c;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  VITKERNELS_DISPATCH_FLOATING(x.scalar_type(), "layernorm_fwd_cpu", [&] {
    const scalar_t* res = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* sum_ptr = sum.defined() ? sum.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      layernorm_rows(x.const_data_ptr<scalar_t>(), res, data_or_null(weight), data_or_null(bias), sum_ptr,
                     y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(),
                     begin, end, c, static_cast<float>(eps));
    });
  });
  return {sum, y, mean, rstd};
}

// Rows [begin, end) of the backward; the parameter gradients of these rows are added to dweight
// and dbias (nullable).
template <typename scalar_t>
void layernorm_backward_rows(const scalar_t* dy, const scalar_t* extra, const scalar_t* x, const float* mean,
                             const float* rstd, const float* weight, scalar_t* dx, float* dweight, float* dbias,
                             int64_t begin, int64_t end, int64_t c) {
  std::vector<float> grad(c), row(c), out(c);
  for (int64_t r = begin; r < end; ++r) {
    load_row(dy + r * c, grad.data(), c);
    load_row(x + r * c, row.data(), c);
    cpu::layernorm_row_backward(grad.data(), row.data(), weight, mean[r], rstd[r], out.data(), dweight, dbias, c);
    if (extra != nullptr) {
      load_row(extra + r * c, grad.data(), c);
      for (int64_t e = 0; e < c; ++e) {
        out[e] += grad[e];
      }
    }
    store_row(out.data(), dx + r * c, c);
  }
}

// Sums blocks [1, blocks) of [blocks, width] partials into block 0, in order.
void reduce_blocks(std::vector<float>& partials, int64_t blocks, int64_t width) {
  for (int64_t b = 1; b < blocks; ++b) {
    for (int64_t e = 0; e < width; ++e) {
      partials[e] += partials[b * width + e];
    }
  }
}

// A [c] fp32 gradient from its sum, or an empty tensor when not wanted.
at::Tensor parameter_gradient(bool wanted, const float* sum, int64_t c, const at::TensorOptions& options) {
  at::Tensor grad = at::empty({wanted ? c : 0}, options);
  std::copy(sum, sum + grad.numel(), grad.mutable_data_ptr<float>());
  return grad;
}

// LayerNorm backward of x's rows from their statistics; dy, extra (undefined: none) and x share a
// dtype. Returns (dx in x's dtype, d weight and d bias in fp32, empty where not wanted).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_backward(const at::Tensor& dy_in, const at::Tensor& extra_in,
                                                                  const at::Tensor& x_in, const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in, const at::Tensor& weight,
                                                                  bool bias_grad) {
  const int64_t c = x_in.size(-1);
  const int64_t rows = x_in.numel() / c;
  layernorm::check_statistics(mean_in, rstd_in, x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor extra = extra_in.defined() ? extra_in.contiguous() : at::Tensor();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  const bool weight_grad = weight.defined();
  const int64_t blocks = std::max<int64_t>(1, std::min(rows, kGradientBlocks));
  const int64_t per_block = (rows + blocks - 1) / blocks;
  std::vector<float> partials(blocks * 2 * c, 0.0f);
  VITKERNELS_DISPATCH_FLOATING(x.scalar_type(), "layernorm_bwd_cpu", [&] {
    const scalar_t* extra_ptr = extra.defined() ? extra.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        float* part = partials.data() + b * 2 * c;
        layernorm_backward_rows(dy.const_data_ptr<scalar_t>(), extra_ptr, x.const_data_ptr<scalar_t>(),
                                mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), data_or_null(weight),
                                dx.mutable_data_ptr<scalar_t>(), weight_grad ? part : nullptr,
                                bias_grad ? part + c : nullptr, b * per_block, std::min(rows, (b + 1) * per_block),
                                c);
      }
    });
  });
  reduce_blocks(partials, blocks, 2 * c);
  const auto options = x.options().dtype(at::kFloat);
  return {dx, parameter_gradient(weight_grad, partials.data(), c, options),
          parameter_gradient(bias_grad, partials.data() + c, c, options)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_fwd_cpu(const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias, double eps) {
  auto [sum, y, mean, rstd] = layernorm_forward(x, nullptr, weight, bias, eps);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  return layernorm_forward(x, &residual, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_extra, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool bias_grad) {
  check_input(x, "x");
  layernorm::check_gradients(grad_y, grad_extra, x);
  const at::Tensor extra = grad_extra.has_value() ? *grad_extra : at::Tensor();
  auto [dx, dweight, dbias] =
      layernorm_backward(grad_y, extra, x, mean, rstd, float_parameter(weight, "weight", x, x.size(-1)), bias_grad);
  return layernorm::typed_layernorm_gradients(dx, dweight, dbias, weight, x);
}

namespace {

using layernorm::empty_gradient;
using layernorm::MlpParameters;
using layernorm::tanh_gelu;

// The MLP's parameters in fp32, checked against x [..., C].
MlpParameters mlp_parameters(const at::Tensor& x, const std::optional<at::Tensor>& ln_w,
                             const std::optional<at::Tensor>& ln_b, const at::Tensor& fc1_w,
                             const std::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
                             const std::optional<at::Tensor>& fc2_b, const std::optional<at::Tensor>& gamma) {
  const int64_t hidden = fc1_w.dim() == 2 ? fc1_w.size(0) : -1;
  return MlpParameters(
      x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma, hidden, [](const at::Tensor& w) { return w.to(at::kFloat); },
      [&](const std::optional<at::Tensor>& b, const char* name, int64_t size) {
        return float_parameter(b, name, x, size);
      });
}

// fc1's input: LayerNorm(x) packed as fp32 [M, C] rows, with the row statistics.
at::Tensor packed_layernorm(const at::Tensor& x, const MlpParameters& p, at::Tensor& mean, at::Tensor& rstd,
                            double eps) {
  const int64_t c = x.size(-1);
  const int64_t rows = x.numel() / c;
  at::Tensor h = at::empty({rows, c}, x.options().dtype(at::kFloat));
  mean = at::empty({rows}, h.options());
  rstd = at::empty({rows}, h.options());
  VITKERNELS_DISPATCH_FLOATING(x.scalar_type(), "layernorm_mlp_pack_cpu", [&] {
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      layernorm_rows(x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr), data_or_null(p.ln_weight),
                     data_or_null(p.ln_bias), static_cast<scalar_t*>(nullptr), h.mutable_data_ptr<float>(),
                     mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), begin, end, c,
                     static_cast<float>(eps));
    });
  });
  return h;
}

// Elementwise passes over contiguous fp32 tensors, in chunks of this many elements.
constexpr int64_t kElementsPerTask = 32768;

at::Tensor gelu(const at::Tensor& pre, bool tanh_approximation) {
  at::Tensor out = at::empty_like(pre);
  at::parallel_for(0, pre.numel(), kElementsPerTask, [&](int64_t begin, int64_t end) {
    cpu::gelu(pre.const_data_ptr<float>() + begin, out.mutable_data_ptr<float>() + begin, end - begin,
              tanh_approximation);
  });
  return out;
}

void gelu_backward_in_place(const at::Tensor& pre, at::Tensor& grad, bool tanh_approximation) {
  at::parallel_for(0, pre.numel(), kElementsPerTask, [&](int64_t begin, int64_t end) {
    float* g = grad.mutable_data_ptr<float>() + begin;
    cpu::gelu_backward(pre.const_data_ptr<float>() + begin, g, g, end - begin, tanh_approximation);
  });
}

// fc1's epilogue on the fp32 product [M, hidden] in place: pre = product + bias (bias nullable),
// and act = GELU(pre). The bias joins here rather than in the GEMM (addmm first writes it across
// the whole output, one more pass over the largest tensor of the block).
void fc1_epilogue(at::Tensor& pre, const float* bias, bool tanh_approximation, at::Tensor& act) {
  const int64_t hidden = pre.size(1);
  at::parallel_for(0, pre.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = pre.mutable_data_ptr<float>() + r * hidden;
      float* out = act.mutable_data_ptr<float>() + r * hidden;
      if (bias != nullptr) {
        cpu::bias_gelu(row, bias, out, hidden, tanh_approximation);
      } else {
        cpu::gelu(row, out, hidden, tanh_approximation);
      }
    }
  });
}

// fc2's epilogue: z <- z + bias (the fc2 output, kept for gamma's gradient) and
// out = x + gamma * z in x's dtype; z is fp32 [M, C], bias and gamma nullable.
template <typename scalar_t>
void residual_rows(const scalar_t* x, float* z, const float* bias, const float* gamma, scalar_t* out, int64_t begin,
                   int64_t end, int64_t c) {
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t e = 0; e < c; ++e) {
      const float value = z[r * c + e] + (bias != nullptr ? bias[e] : 0.0f);
      z[r * c + e] = value;
      const float scaled = gamma != nullptr ? gamma[e] * value : value;
      out[r * c + e] = static_cast<scalar_t>(static_cast<float>(x[r * c + e]) + scaled);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_mlp_fwd_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, double eps, const std::optional<at::Tensor>& gamma,
    c10::string_view approximate) {
  check_input(x_in, "x");
  layernorm::check_eps(eps);
  const bool tanh_approximation = tanh_gelu(approximate);
  const MlpParameters p = mlp_parameters(x_in, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma);
  const at::Tensor x = x_in.contiguous();
  at::Tensor mean, rstd;
  at::Tensor pre = at::mm(packed_layernorm(x, p, mean, rstd, eps), p.fc1_weight.t());
  at::Tensor act = at::empty_like(pre);
  fc1_epilogue(pre, data_or_null(p.fc1_bias), tanh_approximation, act);
  at::Tensor z = at::mm(act, p.fc2_weight.t());
  at::Tensor out = at::empty_like(x);
  const int64_t c = x.size(-1);
  VITKERNELS_DISPATCH_FLOATING(x.scalar_type(), "layernorm_mlp_fwd_cpu", [&] {
    at::parallel_for(0, x.numel() / c, kRowsPerTask, [&](int64_t begin, int64_t end) {
      residual_rows(x.const_data_ptr<scalar_t>(), z.mutable_data_ptr<float>(), data_or_null(p.fc2_bias),
                    data_or_null(p.gamma), out.mutable_data_ptr<scalar_t>(), begin, end, c);
    });
  });
  return {out, mean, rstd, pre, p.gamma.defined() ? z : empty_gradient(x)};
}

std::vector<at::Tensor> layernorm_mlp_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& pre, const at::Tensor& fc2_out, const std::optional<at::Tensor>& ln_weight,
    const std::optional<at::Tensor>& ln_bias, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, double eps,
    const std::optional<at::Tensor>& gamma, c10::string_view approximate) {
  check_input(x_in, "x");
  const bool tanh_approximation = tanh_gelu(approximate);
  const MlpParameters p = mlp_parameters(x_in, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma);
  const int64_t c = x_in.size(-1);
  const int64_t rows = x_in.numel() / c;
  layernorm::check_grad_out(grad_out, x_in);
  layernorm::check_statistics(mean, rstd, x_in);
  TORCH_CHECK(pre.dim() == 2 && pre.size(0) == rows && pre.scalar_type() == at::kFloat,
              "pre must be the forward's fp32 [M, hidden] pre-activation, got ", pre.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dout = grad_out.reshape({rows, c}).to(at::kFloat).contiguous();
  const at::Tensor dz = p.gamma.defined() ? dout.mul(p.gamma) : dout;
  at::Tensor dact = dz.mm(p.fc2_weight);
  const at::Tensor dfc2_weight = dz.t().mm(gelu(pre.contiguous(), tanh_approximation));
  gelu_backward_in_place(pre.contiguous(), dact, tanh_approximation);
  at::Tensor unused_mean, unused_rstd;
  const at::Tensor h = packed_layernorm(x, p, unused_mean, unused_rstd, eps);
  const at::Tensor dfc1_weight = dact.t().mm(h);
  auto [dx, dln_weight, dln_bias] = layernorm_backward(dact.mm(p.fc1_weight), dout, x.reshape({rows, c}).to(at::kFloat),
                                                       mean, rstd, p.ln_weight, ln_bias.has_value());
  const layernorm::MlpGradients d{
      dx.to(x.scalar_type()).view(x.sizes()), dln_weight, dln_bias, dfc1_weight, dact, dfc2_weight, dz, dout};
  return layernorm::typed_mlp_gradients(d, fc2_out, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                        gamma, x);
}

}  // namespace vitkernels
