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
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <initializer_list>
#include <tuple>
#include <vector>

#include "common/cpu_tensor.h"
#include "common/cublaslt_linear.h"
#include "common/cuda_utils.cuh"
#include "layernorm_mlp/inputs.h"
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

// f(av, bv) on the kVec elements of a and of b as fp32, then av stored to out.
template <int kVec, typename A, typename B, typename Out, typename F>
__device__ __forceinline__ void combine_packs(const A* a, const B* b, Out* out, const F& f) {
  float av[kVec];
  float bv[kVec];
  load_floats(a, av);
  load_floats(b, bv);
  f(av, bv);
  store_floats(out, av);
}

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
    combine_packs<kVec>(grad + e, pre + e, out + e, [&](float (&g)[kVec], const float (&a)[kVec]) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        g[j] *= gelu_derivative(a[j], tanh_approximation);
      }
    });
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
    combine_packs<kVec>(x + e, z + e, out + e, [&](float (&xv)[kVec], const float (&zv)[kVec]) {
      int64_t col = e % c;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        xv[j] += gamma != nullptr ? gamma[col] * zv[j] : zv[j];
        col = col + 1 == c ? 0 : col + 1;
      }
    });
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

void check_input(const at::Tensor& x, const char* name) { layernorm::check_input(x, name, c10::DeviceType::CUDA); }

// [..., C] as contiguous [M, C] rows.
at::Tensor rows_of(const at::Tensor& t) {
  const int64_t c = t.size(-1);
  return t.contiguous().view({t.numel() / c, c});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_forward(
    const at::Tensor& x_in, const at::Tensor* residual_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps) {
  check_input(x_in, "x");
  layernorm::check_eps(eps);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor weight = column_parameter(weight_in, "weight", x_in, x_in.size(-1));
  const at::Tensor bias = column_parameter(bias_in, "bias", x_in, x_in.size(-1));
  const at::Tensor x = rows_of(x_in);
  at::Tensor residual;
  at::Tensor sum;
  if (residual_in != nullptr) {
    layernorm::check_residual(*residual_in, x_in);
    residual = rows_of(*residual_in);
    sum = at::empty_like(x);
  }
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  layernorm_cuda::layernorm_forward(x, residual, weight, bias, sum, y, mean, rstd, eps);
  return {sum.defined() ? sum.view(x_in.sizes()) : sum, y.view(x_in.sizes()), mean, rstd};
}

using layernorm::empty_gradient;
using layernorm::MlpParameters;
using layernorm::tanh_gelu;

// An fp32 bias for cuBLASLt's epilogue, in a fresh allocation when the given one is not 16-byte
// aligned (the heuristic is told the operands' alignment, not the bias's).
at::Tensor epilogue_bias(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, int64_t size) {
  const at::Tensor bias = float_parameter(t, name, x, size);
  return bias.defined() && !cuda::is_aligned(bias.const_data_ptr(), 16) ? bias.clone() : bias;
}

// The MLP's parameters, checked against x [..., C]: the LayerNorm affine, biases and gamma as
// fp32 vectors, the Linear weights as contiguous matrices in x's dtype for the tensor cores.
MlpParameters mlp_parameters(const at::Tensor& x, const std::optional<at::Tensor>& ln_w,
                             const std::optional<at::Tensor>& ln_b, const at::Tensor& fc1_w,
                             const std::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
                             const std::optional<at::Tensor>& fc2_b, const std::optional<at::Tensor>& gamma) {
  TORCH_CHECK(fc1_w.dim() == 2 && fc1_w.size(0) > 0, "fc1_weight must be a non-empty [hidden, ", x.size(-1),
              "] matrix, got shape ", fc1_w.sizes());
  return MlpParameters(
      x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma, fc1_w.size(0),
      [&](const at::Tensor& w) { return w.to(x.scalar_type()).contiguous(); },
      [&](const std::optional<at::Tensor>& b, const char* name, int64_t size) {
        return epilogue_bias(b, name, x, size);
      });
}

// LayerNorm(x) of [M, C] rows in x's dtype: fc1's input.
at::Tensor normalized(const at::Tensor& x, const MlpParameters& p, const at::Tensor& mean, const at::Tensor& rstd,
                      double eps) {
  at::Tensor h = at::empty_like(x);
  layernorm_cuda::layernorm_forward(x, at::Tensor(), p.ln_weight, p.ln_bias, at::Tensor(), h, mean, rstd, eps);
  return h;
}

// The MLP ops' arguments, checked, with x's device current while the call lasts; x as [rows, c].
struct MlpCall {
  bool tanh_approximation;
  c10::cuda::CUDAGuard device_guard;
  MlpParameters p;
  at::Tensor x;
  int64_t rows, c;

  MlpCall(const at::Tensor& x_in, const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
          const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
          const std::optional<at::Tensor>& fc2_bias, double eps, const std::optional<at::Tensor>& gamma,
          c10::string_view approximate)
      : tanh_approximation(checked_approximation(x_in, eps, approximate)),
        device_guard(x_in.device()),
        p(mlp_parameters(x_in, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma)),
        x(rows_of(x_in)),
        rows(x.size(0)),
        c(x.size(1)) {}

 private:
  static bool checked_approximation(const at::Tensor& x, double eps, c10::string_view approximate) {
    check_input(x, "x");
    layernorm::check_eps(eps);
    return tanh_gelu(approximate);
  }
};

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
  layernorm::check_gradients(grad_y, grad_extra, x);
  layernorm::check_statistics(mean, rstd, x);
  const at::Tensor extra = grad_extra.has_value() ? rows_of(*grad_extra) : at::Tensor();
  const auto grads =
      layernorm_cuda::layernorm_backward(rows_of(grad_y), extra, rows_of(x), mean.contiguous(), rstd.contiguous(),
                                         column_parameter(weight, "weight", x, x.size(-1)), bias_grad);
  return layernorm::typed_layernorm_gradients(grads.dx.view(x.sizes()), grads.dweight, grads.dbias, weight, x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_mlp_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, double eps, const std::optional<at::Tensor>& gamma,
    c10::string_view approximate) {
  const MlpCall m(x_in, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma, approximate);
  const MlpParameters& p = m.p;
  const at::Tensor& x = m.x;
  const auto fp32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({m.rows}, fp32);
  at::Tensor rstd = at::empty({m.rows}, fp32);
  at::Tensor pre = at::empty({m.rows, p.fc1_weight.size(0)}, fp32);
  cublaslt::linear(normalized(x, p, mean, rstd, eps), p.fc1_weight, p.fc1_bias, pre);
  at::Tensor z = at::empty({m.rows, m.c}, fp32);
  cublaslt::linear(gelu_to(pre, x.scalar_type(), m.tanh_approximation), p.fc2_weight, p.fc2_bias, z);
  at::Tensor out = at::empty_like(x);
  VITKERNELS_LAYERNORM_DISPATCH(x.scalar_type(), "layernorm_mlp_fwd_cuda", [&] {
    run_elementwise<ResidualOp, scalar_t>(x.numel(), {&x, &z, &out}, x.const_data_ptr<scalar_t>(),
                                          z.const_data_ptr<float>(), layernorm_cuda::pointer_or_null<float>(p.gamma),
                                          out.mutable_data_ptr<scalar_t>(), m.c);
  });
  return {out.view(x_in.sizes()), mean, rstd, pre, p.gamma.defined() ? z : empty_gradient(x)};
}

std::vector<at::Tensor> layernorm_mlp_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& pre_in, const at::Tensor& fc2_out, const std::optional<at::Tensor>& ln_weight,
    const std::optional<at::Tensor>& ln_bias, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, double eps,
    const std::optional<at::Tensor>& gamma, c10::string_view approximate) {
  const MlpCall m(x_in, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma, approximate);
  const MlpParameters& p = m.p;
  const at::Tensor& x = m.x;
  const int64_t rows = m.rows;
  const int64_t c = m.c;
  const int64_t hidden = p.fc1_weight.size(0);
  layernorm::check_grad_out(grad_out, x_in);
  layernorm::check_statistics(mean, rstd, x_in);
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
  const at::Tensor dfc2_weight = dz.t().mm(gelu_to(pre, x.scalar_type(), m.tanh_approximation));
  gelu_backward_in_place(pre, dact, m.tanh_approximation);  // now the gradient of pre
  at::Tensor unused_mean = at::empty_like(mean);
  at::Tensor unused_rstd = at::empty_like(rstd);
  const at::Tensor dfc1_weight = dact.t().mm(normalized(x, p, unused_mean, unused_rstd, eps));
  const auto ln = layernorm_cuda::layernorm_backward(dact.mm(p.fc1_weight), dout, x, mean.contiguous(),
                                                     rstd.contiguous(), p.ln_weight, ln_bias.has_value());
  const layernorm::MlpGradients d{ln.dx.view(x_in.sizes()), ln.dweight, ln.dbias, dfc1_weight, dact, dfc2_weight,
                                  dz, dout};
  return layernorm::typed_mlp_gradients(d, fc2_out, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                        gamma, x);
}

}  // namespace vitkernels
