// Global attention kernels for CUDA tensors: the shared attention kernels
// (common/attention_kernels.cuh, schedule in common/attention_tile.cuh) with every token of an
// image in one problem and an optional additive bias.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "attention/attention.h"
#include "common/attention_kernels.cuh"

namespace vitkernels {
namespace {

namespace tile = attention_tile;

struct GlobalToken {
  int64_t pixel;  // row b * N + t of the [B * N, 3C] qkv
  int32_t tag;    // unused
};

// Token t of image `group`; the logit bias read through the strides of its [B, heads, N, N]
// broadcast; dS written to dbias when the backward asks for the bias gradient.
struct GlobalPolicy {
  int64_t n;
  int heads;
  const float* bias;  // fp32, or null
  int64_t bias_stride[4];
  float* dbias;  // [B, heads, N, N] fp32, or null

  __device__ GlobalToken token(int64_t group, int t) const { return {group * n + t, 0}; }

  __device__ float logit_bias(int64_t group, int h, int i, int j, int32_t, int32_t) const {
    return bias != nullptr ? bias[group * bias_stride[0] + h * bias_stride[1] + i * bias_stride[2] +
                                  j * bias_stride[3]]
                           : 0.0f;
  }

  __device__ void add_bias_grad(float*, int64_t group, int h, int i, int j, float ds) const {
    if (dbias != nullptr) {
      dbias[((group * heads + h) * n + i) * n + j] = ds;
    }
  }
};

struct GlobalProblem {
  GlobalPolicy policy;
  int64_t batch, channels, head_dim;
  float scale;
};

GlobalProblem make_problem(const at::Tensor& qkv, int64_t num_heads, std::optional<double> scale) {
  check_device(qkv, "qkv", c10::DeviceType::CUDA);
  check_dim(qkv, "qkv", 3);
  check_range(num_heads, "num_heads", 1, std::max<int64_t>(1, qkv.size(2)));
  TORCH_CHECK(qkv.size(2) % (3 * num_heads) == 0, "qkv's last dim ", qkv.size(2),
              " must be 3 * num_heads * head_dim with num_heads=", num_heads);
  GlobalProblem p{};
  p.batch = qkv.size(0);
  p.channels = qkv.size(2) / 3;
  p.head_dim = p.channels / num_heads;
  tile::check_tile_support(qkv, p.head_dim);
  p.policy.n = qkv.size(1);
  tile::check_grid_size(p.policy.n, num_heads);
  p.policy.heads = static_cast<int>(num_heads);
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.head_dim)));
  return p;
}

// The bias as fp32 viewed at [B, heads, N, N]; the returned tensor owns what p.policy.bias points to.
at::Tensor attach_bias(GlobalProblem& p, const std::optional<at::Tensor>& bias, const at::Tensor& qkv) {
  at::Tensor values = expanded_float_bias(bias, qkv, p.batch, p.policy.heads, p.policy.n, p.policy.bias_stride);
  p.policy.bias = values.defined() ? values.const_data_ptr<float>() : nullptr;
  return values;
}

template <typename T>
tile::TileArgs<T> tile_args(const GlobalProblem& p, const at::Tensor& qkv) {
  tile::TileArgs<T> a{};
  a.qkv = reinterpret_cast<const T*>(qkv.const_data_ptr());
  a.scale = p.scale;
  a.groups = p.batch;
  a.n = static_cast<int>(p.policy.n);
  a.heads = p.policy.heads;
  a.head_dim = static_cast<int>(p.head_dim);
  a.channels = static_cast<int>(p.channels);
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& qkv_in, int64_t num_heads,
                                                      const std::optional<at::Tensor>& bias,
                                                      std::optional<double> scale) {
  GlobalProblem p = make_problem(qkv_in, num_heads, scale);
  const c10::cuda::CUDAGuard device_guard(qkv_in.device());
  const at::Tensor bias_values = attach_bias(p, bias, qkv_in);
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor out = at::empty({p.batch, p.policy.n, p.channels}, qkv.options());
  at::Tensor lse = at::empty({p.batch, num_heads, p.policy.n}, qkv.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    return {out, lse};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  tile::dispatch_tile(qkv.scalar_type(), p.head_dim, [&](auto type, auto dim) {
    using T = typename decltype(type)::type;
    tile::TileArgs<T> a = tile_args<T>(p, qkv);
    a.out = reinterpret_cast<T*>(out.mutable_data_ptr());
    a.lse = lse.mutable_data_ptr<float>();
    a.vectorized = tile::vectorizable(p.channels, p.head_dim, a.qkv, nullptr);
    tile::launch_tiles<T, decltype(dim)::value>(tile::Kernel::kForward, p.policy, a, p.batch, stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                                                      const at::Tensor& lse_in, int64_t num_heads,
                                                      const std::optional<at::Tensor>& bias,
                                                      std::optional<double> scale, bool bias_grad) {
  GlobalProblem p = make_problem(qkv_in, num_heads, scale);
  const c10::cuda::CUDAGuard device_guard(qkv_in.device());
  const at::Tensor bias_values = attach_bias(p, bias, qkv_in);
  TORCH_CHECK(!bias_grad || bias.has_value(), "bias_grad needs a bias");
  check_same_device(grad_out_in, "grad_out", qkv_in, "qkv");
  check_same_device(lse_in, "lse", qkv_in, "qkv");
  check_same_dtype(grad_out_in, "grad_out", qkv_in, "qkv");
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({p.batch, p.policy.n, p.channels}),
              "grad_out must have shape [B, N, C], got ", grad_out_in.sizes());
  check_dtype(lse_in, "lse", at::kFloat);
  TORCH_CHECK(lse_in.numel() == p.batch * num_heads * p.policy.n, "lse must have shape [B, heads, N], got ",
              lse_in.sizes());
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor lse = lse_in.contiguous();
  at::Tensor dqkv = at::empty_like(qkv);
  const at::TensorOptions floats = qkv.options().dtype(at::kFloat);
  at::Tensor dlogits;
  if (bias_grad) {
    dlogits = at::empty({p.batch, num_heads, p.policy.n, p.policy.n}, floats);
    p.policy.dbias = dlogits.mutable_data_ptr<float>();
  }
  at::Tensor delta = at::empty({p.batch * num_heads, p.policy.n}, floats);
  if (dqkv.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    tile::dispatch_tile(qkv.scalar_type(), p.head_dim, [&](auto type, auto dim) {
      using T = typename decltype(type)::type;
      constexpr int D = decltype(dim)::value;
      tile::TileArgs<T> a = tile_args<T>(p, qkv);
      a.grad_out = reinterpret_cast<const T*>(grad_out.const_data_ptr());
      a.out = reinterpret_cast<T*>(dqkv.mutable_data_ptr());
      a.lse = lse.mutable_data_ptr<float>();
      a.delta = delta.mutable_data_ptr<float>();
      a.vectorized = tile::vectorizable(p.channels, p.head_dim, a.qkv, a.grad_out);
      tile::launch_backward<T, D>(p.policy, a, nullptr, p.batch, stream);
    });
  }
  if (!bias_grad) {
    return {dqkv, at::empty({0}, floats)};
  }
  return {dqkv, dlogits.sum_to_size(bias->sizes()).to(bias->scalar_type()).contiguous()};
}

}  // namespace vitkernels
