// LayerNorm, residual-add + LayerNorm and the LayerNorm + MLP block half for CUDA tensors.
//
// The MLP forward is LayerNorm (layernorm_cuda.cuh) into x's dtype, fc1 through cuBLASLt with
// its bias in the epilogue and an fp32 output (the pre-activation the backward needs, saved as
// the CPU op saves it), one vectorized GELU pass back to x's dtype, fc2 through cuBLASLt with its
// bias in the epilogue and an fp32 output z, and one vectorized pass out = x + gamma * z.
// cuBLASLt's GELU epilogues are not used: the fp32 pre-activation has to be written anyway, and
// the separate pass reads it once for either GELU flavour. gamma is not folded into fc2's
// weights and bias because the backward needs z itself (d gamma = sum of dout * z), and the
// residual cannot be cuBLASLt's C operand because C must have D's fp32 type while x is in x's
// dtype; so the LayerScale and the residual share the last elementwise pass.
//
// The backward's products go through ATen (cuBLAS, fp32 accumulation) in x's dtype, as PyTorch's
// own low-precision backward computes them; GELU's derivative and the LayerNorm backward are the
// kernels here. Parameter gradients are reduced in a fixed order (deterministic).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

#include "common/cpu_tensor.h"
#include "common/cublaslt_linear.h"
#include "common/cuda_utils.cuh"
#include "layernorm_mlp/layernorm_cuda.cuh"
#include "layernorm_mlp/layernorm_mlp.h"

namespace vitkernels {
namespace {

using cuda::load_floats;
using cuda::pack_size;
using cuda::store_floats;

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhCubic = 0.044715f;

__device__ __forceinline__ float gelu(float x, bool tanh_approximation) {
  if (tanh_approximation) {
    return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kTanhCubic * x * x * x)));
  }
  return 0.5f * x * (1.0f + erff(x * kSqrtHalf));
}

__device__ __forceinline__ float gelu_derivative(float x, bool tanh_approximation) {
  if (tanh_approximation) {
    const float t = tanhf(kSqrt2OverPi * (x + kTanhCubic * x * x * x));
    const float slope = kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * slope;
  }
  return 0.5f * (1.0f + erff(x * kSqrtHalf)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

// Elementwise operations over contiguous tensors, kVec elements per call starting at element e.

// act = GELU(pre): fp32 [M, H] in, x's dtype out.
template <typename scalar_t, int kVec_>
struct GeluOp {
  static constexpr int kVec = kVec_;
  const float* pre;
  scalar_t* act;
  bool tanh_approximation;

  __device__ void operator()(int64_t e) const {
    float v[kVec];
    load_floats(pre + e, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      v[j] = gelu(v[j], tanh_approximation);
    }
    store_floats(act + e, v);
  }
};

// out = grad * GELU'(pre); out may be grad itself.
template <typename scalar_t, int kVec_>
struct GeluBackwardOp {
  static constexpr int kVec = kVec_;
  const float* pre;
  const scalar_t* grad;
  scalar_t* out;
  bool tanh_approximation;

  __device__ void operator()(int64_t e) const {
    float a[kVec];
    float g[kVec];
    load_floats(pre + e, a);
    load_floats(grad + e, g);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      g[j] *= gelu_derivative(a[j], tanh_approximation);
    }
    store_floats(out + e, g);
  }
};

// out = x + gamma * z over [M, c] rows: x and out in x's dtype, z fp32, gamma fp32 [c] or null.
template <typename scalar_t, int kVec_>
struct ResidualOp {
  static constexpr int kVec = kVec_;
  const scalar_t* x;
  const float* z;
  const float* gamma;
  scalar_t* out;
  int64_t c;

  __device__ void operator()(int64_t e) const {
    float xv[kVec];
    float zv[kVec];
    load_floats(x + e, xv);
    load_floats(z + e, zv);
    int64_t col = e % c;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      xv[j] += gamma != nullptr ? gamma[col] * zv[j] : zv[j];
      col = col + 1 == c ? 0 : col + 1;
    }
    store_floats(out + e, xv);
  }
};

constexpr int kElementwiseThreads = 256;
// Grid-stride loops cover what this many blocks do not; far more blocks than any GPU runs at once.
constexpr int64_t kElementwiseMaxBlocks = int64_t{1} << 16;

template <typename Op>
__global__ void __launch_bounds__(kElementwiseThreads) elementwise_kernel(Op op, int64_t packs) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += step) {
    op(p * Op::kVec);
  }
}

template <typename Op>
void launch_elementwise(const Op& op, int64_t n) {
  const int64_t packs = n / Op::kVec;
  if (packs == 0) {
    return;
  }
  const int64_t blocks = std::min((packs + kElementwiseThreads - 1) / kElementwiseThreads, kElementwiseMaxBlocks);
  elementwise_kernel<<<static_cast<unsigned>(blocks), kElementwiseThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      op, packs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs Op<scalar_t, pack> over n elements when n is a multiple of the 16-byte pack of scalar_t
// and every tensor's data is aligned to its pack's size, else Op<scalar_t, 1>. Fields are the
// operation's members after kVec, in order.
template <template <typename, int> class Op, typename scalar_t, typename... Fields>
void run_elementwise(int64_t n, std::initializer_list<const at::Tensor*> tensors, Fields... fields) {
  constexpr int kVec = pack_size<scalar_t>();
  bool packed = n % kVec == 0;
  for (const at::Tensor* t : tensors) {
    packed = packed && (!t->defined() || cuda::is_aligned(t->const_data_ptr(), kVec * t->element_size()));
  }
  if (packed) {
    launch_elementwise(Op<scalar_t, kVec>{fields...}, n);
  } else {
    launch_elementwise(Op<scalar_t, 1>{fields...}, n);
  }
}

// GELU(pre) in dtype, for fp32 pre [M, H].
at::Tensor gelu_to(const at::Tensor& pre, at::ScalarType dtype, bool tanh_approximation) {
  at::Tensor act = at::empty(pre.sizes(), pre.options().dtype(dtype));
  VITKERNELS_LAYERNORM_DISPATCH(dtype, "gelu_cuda", [&] {
    run_elementwise<GeluOp, scalar_t>(pre.numel(), {&pre, &act}, pre.const_data_ptr<float>(),
                                      act.mutable_data_ptr<scalar_t>(), tanh_approximation);
  });
  return act;
}

// grad *= GELU'(pre) in place.
void gelu_backward_in_place(const at::Tensor& pre, const at::Tensor& grad, bool tanh_approximation) {
  VITKERNELS_LAYERNORM_DISPATCH(grad.scalar_type(), "gelu_backward_cuda", [&] {
    run_elementwise<GeluBackwardOp, scalar_t>(pre.numel(), {&pre, &grad}, pre.const_data_ptr<float>(),
                                              grad.const_data_ptr<scalar_t>(), grad.mutable_data_ptr<scalar_t>(),
                                              tanh_approximation);
  });
}

void check_input(const at::Tensor& x, const char* name) {
  check_device(x, name, c10::DeviceType::CUDA);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, name,
              " must be float16, bfloat16 or float32 on the cuda backend, got ", dtype);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, name, " must have a non-empty last dim, got shape ", x.sizes());
}

// [..., C] as contiguous [M, C] rows.
at::Tensor rows_of(const at::Tensor& t) {
  const int64_t c = t.size(-1);
  return t.contiguous().view({t.numel() / c, c});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_forward(
    const at::Tensor& x_in, const at::Tensor* residual_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps) {
  check_input(x_in, "x");
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor weight = float_parameter(weight_in, "weight", x_in, x_in.size(-1));
  const at::Tensor bias = float_parameter(bias_in, "bias", x_in, x_in.size(-1));
  const at::Tensor x = rows_of(x_in);
  at::Tensor residual;
  at::Tensor sum;
  if (residual_in != nullptr) {
    check_same_device(*residual_in, "residual", x_in, "x");
    check_same_dtype(*residual_in, "residual", x_in, "x");
    TORCH_CHECK(residual_in->sizes() == x_in.sizes(), "residual must have x's shape ", x_in.sizes(), ", got ",
                residual_in->sizes());
    residual = rows_of(*residual_in);
    sum = at::empty_like(x);
  }
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  layernorm_cuda::layernorm_forward(x, residual, weight, bias, sum, y, mean, rstd, eps);
  return {sum.defined() ? sum.view(x_in.sizes()) : sum, y.view(x_in.sizes()), mean, rstd};
}

bool tanh_gelu(c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "approximate must be \"none\" or \"tanh\", got \"",
              std::string(approximate), "\"");
  return approximate == "tanh";
}

// A Linear weight [rows, cols] on x's device, as a contiguous matrix in x's dtype.
at::Tensor weight_matrix(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t rows, int64_t cols) {
  check_same_device(t, name, x, "x");
  check_floating(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape [", rows, ", ", cols,
              "], got ", t.sizes());
  return t.to(x.scalar_type()).contiguous();
}

// An fp32 bias for cuBLASLt's epilogue, in a fresh allocation when the given one is not 16-byte
// aligned (the heuristic is told the operands' alignment, not the bias's).
at::Tensor epilogue_bias(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, int64_t size) {
  const at::Tensor bias = float_parameter(t, name, x, size);
  return bias.defined() && !cuda::is_aligned(bias.const_data_ptr(), 16) ? bias.clone() : bias;
}

// The MLP's parameters, checked against x [..., C]: the LayerNorm affine, biases and gamma as
// fp32 vectors, the Linear weights in x's dtype for the tensor cores.
struct MlpParameters {
  at::Tensor ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma;

  MlpParameters(const at::Tensor& x, const std::optional<at::Tensor>& ln_w, const std::optional<at::Tensor>& ln_b,
                const at::Tensor& fc1_w, const std::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
                const std::optional<at::Tensor>& fc2_b, const std::optional<at::Tensor>& gamma_in) {
    const int64_t c = x.size(-1);
    TORCH_CHECK(fc1_w.dim() == 2 && fc1_w.size(0) > 0, "fc1_weight must be a non-empty [hidden, ", c,
                "] matrix, got shape ", fc1_w.sizes());
    const int64_t hidden = fc1_w.size(0);
    ln_weight = float_parameter(ln_w, "ln_weight", x, c);
    ln_bias = float_parameter(ln_b, "ln_bias", x, c);
    fc1_weight = weight_matrix(fc1_w, "fc1_weight", x, hidden, c);
    fc1_bias = epilogue_bias(fc1_b, "fc1_bias", x, hidden);
    fc2_weight = weight_matrix(fc2_w, "fc2_weight", x, c, hidden);
    fc2_bias = epilogue_bias(fc2_b, "fc2_bias", x, c);
    gamma = float_parameter(gamma_in, "gamma", x, c);
  }
};

// LayerNorm(x) of [M, C] rows in x's dtype: fc1's input.
at::Tensor normalized(const at::Tensor& x, const MlpParameters& p, const at::Tensor& mean, const at::Tensor& rstd,
                      double eps) {
  at::Tensor h = at::empty_like(x);
  layernorm_cuda::layernorm_forward(x, at::Tensor(), p.ln_weight, p.ln_bias, at::Tensor(), h, mean, rstd, eps);
  return h;
}

at::Tensor empty_gradient(const at::Tensor& x) { return at::empty({0}, x.options().dtype(at::kFloat)); }

// A parameter's gradient in its input's dtype, or an empty tensor for an absent input.
at::Tensor typed_gradient(const at::Tensor& grad, const std::optional<at::Tensor>& input, const at::Tensor& x) {
  return input.has_value() ? grad.to(input->scalar_type()).view(input->sizes()) : empty_gradient(x);
}

// Column sums of [M, N] rows in fp32.
at::Tensor column_sums(const at::Tensor& t) { return at::sum(t, {0}, false, at::kFloat); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_fwd_cuda(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias, double eps) {
  auto [sum, y, mean, rstd] = layernorm_forward(x, nullptr, weight, bias, eps);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd_cuda(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  return layernorm_forward(x, &residual, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_bwd_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_extra, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool bias_grad) {
  check_input(x, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  for (const at::Tensor* t : {&grad_y, grad_extra.has_value() ? &*grad_extra : &grad_y}) {
    check_same_device(*t, "grad", x, "x");
    check_same_dtype(*t, "grad", x, "x");
    TORCH_CHECK(t->sizes() == x.sizes(), "gradients must have x's shape ", x.sizes(), ", got ", t->sizes());
  }
  const int64_t rows = x.numel() / x.size(-1);
  for (const at::Tensor* t : {&mean, &rstd}) {
    check_same_device(*t, "mean and rstd", x, "x");
    check_dtype(*t, "mean and rstd", at::kFloat);
    TORCH_CHECK(t->numel() == rows, "mean and rstd must hold one value per row (", rows, "), got shape ",
                t->sizes());
  }
  const at::Tensor extra = grad_extra.has_value() ? rows_of(*grad_extra) : at::Tensor();
  const auto grads =
      layernorm_cuda::layernorm_backward(rows_of(grad_y), extra, rows_of(x), mean.contiguous(), rstd.contiguous(),
                                         float_parameter(weight, "weight", x, x.size(-1)), bias_grad);
  const auto weight_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  return {grads.dx.view(x.sizes()), grads.dweight.to(weight_dtype), grads.dbias.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_mlp_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, double eps, const std::optional<at::Tensor>& gamma,
    c10::string_view approximate) {
  check_input(x_in, "x");
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const bool tanh_approximation = tanh_gelu(approximate);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const MlpParameters p(x_in, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma);
  const at::Tensor x = rows_of(x_in);
  const int64_t rows = x.size(0);
  const int64_t c = x.size(1);
  const auto fp32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({rows}, fp32);
  at::Tensor rstd = at::empty({rows}, fp32);
  at::Tensor pre = at::empty({rows, p.fc1_weight.size(0)}, fp32);
  cublaslt::linear(normalized(x, p, mean, rstd, eps), p.fc1_weight, p.fc1_bias, pre);
  at::Tensor z = at::empty({rows, c}, fp32);
  cublaslt::linear(gelu_to(pre, x.scalar_type(), tanh_approximation), p.fc2_weight, p.fc2_bias, z);
  at::Tensor out = at::empty_like(x);
  VITKERNELS_LAYERNORM_DISPATCH(x.scalar_type(), "layernorm_mlp_fwd_cuda", [&] {
    run_elementwise<ResidualOp, scalar_t>(x.numel(), {&x, &z, &out}, x.const_data_ptr<scalar_t>(),
                                          z.const_data_ptr<float>(), layernorm_cuda::pointer_or_null<float>(p.gamma),
                                          out.mutable_data_ptr<scalar_t>(), c);
  });
  return {out.view(x_in.sizes()), mean, rstd, pre, p.gamma.defined() ? z : empty_gradient(x)};
}

std::vector<at::Tensor> layernorm_mlp_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& pre_in, const at::Tensor& fc2_out, const std::optional<at::Tensor>& ln_weight,
    const std::optional<at::Tensor>& ln_bias, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, double eps,
    const std::optional<at::Tensor>& gamma, c10::string_view approximate) {
  check_input(x_in, "x");
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const bool tanh_approximation = tanh_gelu(approximate);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const MlpParameters p(x_in, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma);
  const at::Tensor x = rows_of(x_in);
  const int64_t rows = x.size(0);
  const int64_t c = x.size(1);
  const int64_t hidden = p.fc1_weight.size(0);
  TORCH_CHECK(grad_out.sizes() == x_in.sizes(), "grad_out must have x's shape ", x_in.sizes(), ", got ",
              grad_out.sizes());
  for (const at::Tensor* t : {&grad_out, &mean, &rstd, &pre_in, &fc2_out}) {
    check_same_device(*t, "grad_out and the saved tensors", x_in, "x");
  }
  TORCH_CHECK(pre_in.dim() == 2 && pre_in.size(0) == rows && pre_in.size(1) == hidden &&
                  pre_in.scalar_type() == at::kFloat,
              "pre must be the forward's fp32 [", rows, ", ", hidden, "] pre-activation, got ", pre_in.sizes(), " ",
              pre_in.scalar_type());
  TORCH_CHECK(!p.gamma.defined() || (fc2_out.scalar_type() == at::kFloat && fc2_out.numel() == rows * c),
              "fc2_out must be the forward's fp32 [", rows, ", ", c, "] fc2 output, got ", fc2_out.sizes(), " ",
              fc2_out.scalar_type());
  const at::Tensor pre = pre_in.contiguous();
  const at::Tensor dout = rows_of(grad_out.to(x.scalar_type()));
  const at::Tensor dz = p.gamma.defined() ? dout.to(at::kFloat).mul(p.gamma).to(x.scalar_type()) : dout;
  at::Tensor dact = dz.mm(p.fc2_weight);  // [M, H]
  const at::Tensor dfc2_weight = dz.t().mm(gelu_to(pre, x.scalar_type(), tanh_approximation));
  gelu_backward_in_place(pre, dact, tanh_approximation);  // now the gradient of pre
  at::Tensor unused_mean = at::empty_like(mean);
  at::Tensor unused_rstd = at::empty_like(rstd);
  const at::Tensor dfc1_weight = dact.t().mm(normalized(x, p, unused_mean, unused_rstd, eps));
  const auto ln = layernorm_cuda::layernorm_backward(dact.mm(p.fc1_weight), dout, x, mean.contiguous(),
                                                     rstd.contiguous(), p.ln_weight, ln_bias.has_value());
  return {ln.dx.view(x_in.sizes()),
          typed_gradient(ln.dweight, ln_weight, x),
          typed_gradient(ln.dbias, ln_bias, x),
          typed_gradient(dfc1_weight, fc1_weight, x),
          fc1_bias.has_value() ? typed_gradient(column_sums(dact), fc1_bias, x) : empty_gradient(x),
          typed_gradient(dfc2_weight, fc2_weight, x),
          fc2_bias.has_value() ? typed_gradient(column_sums(dz), fc2_bias, x) : empty_gradient(x),
          gamma.has_value() ? typed_gradient(column_sums(dout.to(at::kFloat).mul(fc2_out.reshape({rows, c}))), gamma, x)
                            : empty_gradient(x)};
}

}  // namespace vitkernels
