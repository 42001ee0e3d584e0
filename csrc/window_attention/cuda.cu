// Window attention kernels for CUDA tensors: the relative-position bias gather, and fused window
// attention on the shared attention kernels (common/attention_kernels.cuh, schedule in
// common/attention_tile.cuh) with a token policy that does the shift, padding and window
// partition as index arithmetic. A CTA owns 64 query rows of one window and head: a 7x7 window
// (49 tokens) is one 64x64 tile, four warps of 16 rows, instead of a 128-row block.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/attention_kernels.cuh"
#include "common/cuda_reduce.cuh"
#include "window_attention/window_attention.h"

namespace vitkernels {
namespace {

constexpr int kGatherThreads = 256;
// Grid-stride loops cover what this many blocks do not; far more blocks than any GPU runs at once.
constexpr int64_t kGatherMaxBlocks = int64_t{1} << 16;

// One thread per output element of the contiguous [heads, N, N] output, consecutive threads on
// consecutive keys, so stores coalesce; the small table stays in L1/L2.
template <typename scalar_t>
__global__ void gather_relative_position_bias_kernel(const scalar_t* __restrict__ table,  // [rows, heads], strided
                                                     int64_t stride_row, int64_t stride_head,
                                                     scalar_t* __restrict__ out,  // [heads, N, N]
                                                     int64_t total, int64_t window_h, int64_t window_w) {
  const int64_t n = window_h * window_w;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t linear = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; linear < total;
       linear += step) {
    const int64_t key = linear % n;
    const int64_t query = (linear / n) % n;
    const int64_t head = linear / (n * n);
    const int64_t row = relative_position_row(query / window_w, query % window_w, key / window_w, key % window_w,
                                              window_h, window_w);
    out[linear] = table[row * stride_row + head * stride_head];
  }
}

}  // namespace

at::Tensor gather_relative_position_bias_cuda(const at::Tensor& bias_table, int64_t window_h, int64_t window_w) {
  check_device(bias_table, "bias_table", c10::DeviceType::CUDA);
  check_gather_relative_position_bias(bias_table, window_h, window_w);
  const c10::cuda::CUDAGuard device_guard(bias_table.device());
  const int64_t n = window_h * window_w;
  const int64_t heads = bias_table.size(1);
  at::Tensor out = at::empty({heads, n, n}, bias_table.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  const int64_t blocks = std::min<int64_t>((total + kGatherThreads - 1) / kGatherThreads, kGatherMaxBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VITKERNELS_DISPATCH_FLOATING(bias_table.scalar_type(), "gather_relative_position_bias_cuda", [&] {
    gather_relative_position_bias_kernel<scalar_t><<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(
        bias_table.const_data_ptr<scalar_t>(), bias_table.stride(0), bias_table.stride(1),
        out.mutable_data_ptr<scalar_t>(), total, window_h, window_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}


namespace {

namespace tile = attention_tile;

struct WindowToken {
  int64_t pixel;  // row of the [B * H * W, 3C] qkv map, or tile::kPadding
  int32_t tag;    // shift-mask region: row region * 3 + column region
};

// Token t of window `group` (image * nW + window): the cyclic shift, padding and window partition
// of the zoos as index arithmetic; the bias-table gather and the shift mask as logit terms.
struct WindowPolicy {
  int height, width, padded_h, padded_w, windows_w, windows;  // bounded by make_problem
  int window_h, window_w, shift_h, shift_w;
  float inv_window_w;  // 1 / window_w, for window_row
  bool pad_first;
  const float* table;  // [(2Wh-1)(2Ww-1), heads] fp32, or null
  int heads;
  float mask_value;

  __device__ int table_row(int i, int j) const {
    const int ri = window_row(i);
    const int rj = window_row(j);
    return relative_position_row(ri, i - ri * window_w, rj, j - rj * window_w, window_h, window_w);
  }

  // t / window_w by a float multiply, for the per-logit table index: exact for the t < 2^20 of a
  // window the kernels take, as (t + 0.5) / window_w lies at least 0.5 / window_w from an integer
  // and the product's relative error is under 2^-23.
  __device__ int window_row(int t) const { return static_cast<int>((static_cast<float>(t) + 0.5f) * inv_window_w); }

  // 32-bit arithmetic up to the pixel's offset (two integer divisions, two remainders): group is
  // below the 2^31 make_problem allows, coordinates below 2^30.
  __device__ WindowToken token(int64_t group, int t) const {
    const int image = static_cast<int>(group) / windows;
    const int window = static_cast<int>(group) - image * windows;
    const int frame_row = window / windows_w;
    const int t_row = window_row(t);
    const int y = frame_row * window_h + t_row;
    const int x = (window - frame_row * windows_w) * window_w + t - t_row * window_w;
    const int row = source_coordinate<int>(y, height, padded_h, shift_h, pad_first);
    const int col = source_coordinate<int>(x, width, padded_w, shift_w, pad_first);
    WindowToken token;
    token.pixel =
        row < 0 || col < 0 ? tile::kPadding : (static_cast<int64_t>(image) * height + row) * width + col;
    token.tag = shift_region<int>(y, padded_h, window_h, shift_h) * 3 + shift_region<int>(x, padded_w, window_w, shift_w);
    return token;
  }

  __device__ float logit_bias(int64_t, int h, int i, int j, int32_t tag_i, int32_t tag_j) const {
    const float bias = table != nullptr ? table[static_cast<int64_t>(table_row(i, j)) * heads + h] : 0.0f;
    return tag_i != tag_j ? bias + mask_value : bias;
  }

  // table_grad: the calling warp's [table rows] partial sum of head h.
  __device__ void add_bias_grad(float* table_grad, int64_t, int, int i, int j, float ds) const {
    if (table != nullptr) {
      table_grad[table_row(i, j)] += ds;
    }
  }
};

// The fp32 operands the kernels read, made once per call on the current stream.
struct WindowOptions {
  at::Tensor table, fill, tau;
  float scale = 1.0f;
};

struct WindowProblem {
  WindowPolicy policy;
  int64_t batch, channels, head_dim, n, table_rows;
  int64_t groups() const { return batch * static_cast<int64_t>(policy.windows); }
};

void check_optional(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& qkv, int64_t numel) {
  if (t.has_value()) {
    check_same_device(*t, name, qkv, "qkv");
    check_floating(*t, name);
    TORCH_CHECK(t->numel() == numel, name, " must hold ", numel, " values, got shape ", t->sizes());
  }
}

WindowProblem make_problem(const at::Tensor& qkv, int64_t num_heads, at::IntArrayRef window_size,
                           at::IntArrayRef shift_size, bool pad_first, double mask_value) {
  check_device(qkv, "qkv", c10::DeviceType::CUDA);
  check_dim(qkv, "qkv", 4);
  TORCH_CHECK(window_size.size() == 2 && shift_size.size() == 2, "window_size and shift_size must be pairs, got ",
              window_size, " and ", shift_size);
  check_range(num_heads, "num_heads", 1, std::max<int64_t>(1, qkv.size(3)));
  TORCH_CHECK(qkv.size(3) % (3 * num_heads) == 0, "qkv's last dim ", qkv.size(3),
              " must be 3 * num_heads * head_dim with num_heads=", num_heads);
  TORCH_CHECK(qkv.size(1) > 0 && qkv.size(2) > 0, "qkv map must be non-empty, got shape ", qkv.sizes());
  check_range(window_size[0], "window_size[0]", 1, kMaxWindowSide);
  check_range(window_size[1], "window_size[1]", 1, kMaxWindowSide);
  check_range(shift_size[0], "shift_size[0]", 0, window_size[0] - 1);
  check_range(shift_size[1], "shift_size[1]", 0, window_size[1] - 1);
  WindowProblem p{};
  p.batch = qkv.size(0);
  p.channels = qkv.size(3) / 3;
  p.head_dim = p.channels / num_heads;
  tile::check_tile_support(qkv, p.head_dim);
  tile::check_grid_size(window_size[0] * window_size[1], num_heads);
  const int64_t windows_h = (qkv.size(1) + window_size[0] - 1) / window_size[0];
  const int64_t windows_w = (qkv.size(2) + window_size[1] - 1) / window_size[1];
  constexpr int64_t kMaxSide = int64_t{1} << 30;
  TORCH_CHECK(windows_h * window_size[0] < kMaxSide && windows_w * window_size[1] < kMaxSide,
              "the cuda window attention takes maps whose padded sides are below 2^30, got a map of ", qkv.size(1),
              " x ", qkv.size(2), " with window ", window_size);
  TORCH_CHECK(std::max<int64_t>(p.batch, 1) * windows_h * windows_w <= INT32_MAX,
              "the cuda window attention takes fewer than 2^31 windows, got ", p.batch, " images of ",
              windows_h * windows_w, " windows");
  WindowPolicy& w = p.policy;
  w.height = static_cast<int>(qkv.size(1));
  w.width = static_cast<int>(qkv.size(2));
  w.window_h = static_cast<int>(window_size[0]);
  w.window_w = static_cast<int>(window_size[1]);
  w.inv_window_w = 1.0f / static_cast<float>(w.window_w);
  w.shift_h = static_cast<int>(shift_size[0]);
  w.shift_w = static_cast<int>(shift_size[1]);
  w.windows_w = static_cast<int>(windows_w);
  w.windows = static_cast<int>(windows_h * windows_w);
  w.padded_h = static_cast<int>(windows_h) * w.window_h;
  w.padded_w = w.windows_w * w.window_w;
  w.pad_first = pad_first;
  w.heads = static_cast<int>(num_heads);
  w.mask_value = static_cast<float>(mask_value);
  p.n = window_size[0] * window_size[1];
  TORCH_CHECK(p.n <= int64_t{1} << 20, "window ", window_size, " holds more tokens than the cuda kernels support");
  return p;
}

WindowOptions make_options(WindowProblem& p, const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
                           const std::optional<at::Tensor>& qkv_bias, const std::optional<at::Tensor>& logit_scale,
                           std::optional<double> scale) {
  const int64_t rows = (2 * p.policy.window_h - 1) * (2 * p.policy.window_w - 1);
  check_optional(bias_table, "bias_table", qkv, rows * p.policy.heads);
  check_optional(qkv_bias, "qkv_bias", qkv, 3 * p.channels);
  check_optional(logit_scale, "logit_scale", qkv, p.policy.heads);
  TORCH_CHECK(!(scale.has_value() && logit_scale.has_value()), "scale and logit_scale are exclusive");
  WindowOptions o;
  if (bias_table.has_value()) {
    o.table = bias_table->to(at::kFloat).reshape({rows, p.policy.heads}).contiguous();
  }
  if (qkv_bias.has_value()) {
    o.fill = qkv_bias->to(at::kFloat).reshape({-1}).contiguous();
  }
  if (logit_scale.has_value()) {
    o.tau = logit_scale->to(at::kFloat).reshape({-1}).clamp_max(std::log(100.0)).exp().contiguous();
  }
  o.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.head_dim)));
  p.policy.table = o.table.defined() ? o.table.const_data_ptr<float>() : nullptr;
  p.table_rows = bias_table.has_value() ? rows : 0;
  return o;
}

const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

template <typename T>
tile::TileArgs<T> tile_args(const WindowProblem& p, const WindowOptions& o, const at::Tensor& qkv) {
  tile::TileArgs<T> a{};
  a.qkv = reinterpret_cast<const T*>(qkv.const_data_ptr());
  a.fill = data_or_null(o.fill);
  a.tau = data_or_null(o.tau);
  a.scale = o.scale;
  a.groups = p.groups();
  a.n = static_cast<int>(p.n);
  a.heads = p.policy.heads;
  a.head_dim = static_cast<int>(p.head_dim);
  a.channels = static_cast<int>(p.channels);
  a.table_rows = static_cast<int>(p.table_rows);
  return a;
}

// Element (slot, h * width + e) of the per-CTA partial sums [heads, slots, width].
struct SlotSums {
  const float* partial;
  int64_t slots, width;
  __device__ float operator()(int64_t slot, int64_t col) const {
    const int64_t h = col / width;
    return partial[(h * slots + slot) * width + col - h * width];
  }
};

// [heads, width]: the sum over slots, in an order fixed by the shape, of partial [heads, slots,
// width]: the deterministic second stage of the reduced gradients.
at::Tensor sum_slots(const at::Tensor& partial, cudaStream_t stream) {
  const int64_t heads = partial.size(0), slots = partial.size(1), width = partial.size(2);
  return column_sums(SlotSums{partial.const_data_ptr<float>(), slots, width}, slots, heads * width, partial, stream)
      .view({heads, width});
}

// The gradient of an optional input from its fp32 values in the input's row-major order; an
// empty tensor on qkv's device when the input is absent.
at::Tensor optional_gradient(const std::optional<at::Tensor>& input, const at::Tensor& sum, const at::Tensor& qkv) {
  if (!input.has_value()) {
    return at::empty({0}, qkv.options().dtype(at::kFloat));
  }
  return sum.reshape(input->sizes()).to(input->scalar_type()).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cuda(
    const at::Tensor& qkv_in, int64_t num_heads, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    const std::optional<at::Tensor>& bias_table, const std::optional<at::Tensor>& qkv_bias,
    const std::optional<at::Tensor>& logit_scale, std::optional<double> scale, bool pad_first, double mask_value) {
  WindowProblem p = make_problem(qkv_in, num_heads, window_size, shift_size, pad_first, mask_value);
  const c10::cuda::CUDAGuard device_guard(qkv_in.device());
  const WindowOptions o = make_options(p, qkv_in, bias_table, qkv_bias, logit_scale, scale);
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor out = at::empty({p.batch, p.policy.height, p.policy.width, p.channels}, qkv.options());
  at::Tensor lse = at::empty({p.batch, p.policy.windows, num_heads, p.n}, qkv.options().dtype(at::kFloat));
  if (p.groups() == 0) {
    return {out, lse};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  tile::dispatch_tile(qkv.scalar_type(), p.head_dim, [&](auto type, auto dim) {
    using T = typename decltype(type)::type;
    tile::TileArgs<T> a = tile_args<T>(p, o, qkv);
    a.out = reinterpret_cast<T*>(out.mutable_data_ptr());
    a.lse = lse.mutable_data_ptr<float>();
    a.vectorized = tile::vectorizable(p.channels, p.head_dim, a.qkv, nullptr);
    tile::launch_tiles<T, decltype(dim)::value>(tile::Kernel::kForward, p.policy, a, p.groups(), stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& lse_in, int64_t num_heads,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& qkv_bias, const std::optional<at::Tensor>& logit_scale,
    std::optional<double> scale, bool pad_first, double mask_value) {
  WindowProblem p = make_problem(qkv_in, num_heads, window_size, shift_size, pad_first, mask_value);
  const c10::cuda::CUDAGuard device_guard(qkv_in.device());
  const WindowOptions o = make_options(p, qkv_in, bias_table, qkv_bias, logit_scale, scale);
  check_same_device(grad_out_in, "grad_out", qkv_in, "qkv");
  check_same_device(lse_in, "lse", qkv_in, "qkv");
  check_same_dtype(grad_out_in, "grad_out", qkv_in, "qkv");
  const std::vector<int64_t> out_shape = {p.batch, p.policy.height, p.policy.width, p.channels};
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef(out_shape), "grad_out must have shape [B, H, W, C] = ",
              at::IntArrayRef(out_shape), ", got ", grad_out_in.sizes());
  check_dtype(lse_in, "lse", at::kFloat);
  TORCH_CHECK(lse_in.numel() == p.groups() * num_heads * p.n, "lse must have shape [B, nW, heads, N] = [", p.batch,
              ", ", p.policy.windows, ", ", num_heads, ", ", p.n, "], got ", lse_in.sizes());
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor lse = lse_in.contiguous();
  at::Tensor dqkv = at::empty_like(qkv);
  const at::TensorOptions floats = qkv.options().dtype(at::kFloat);
  const int64_t chunks = tile::backward_chunks(p.groups(), p.n, num_heads);
  const int64_t slots = chunks * tile::tiles_of(p.n);
  const int64_t query_width = p.table_rows + p.head_dim + 1;
  at::Tensor query_partial = at::empty({num_heads, slots, query_width}, floats);
  at::Tensor key_partial = at::empty({num_heads, slots, 2 * p.head_dim}, floats);
  at::Tensor delta = at::empty({p.groups() * num_heads, p.n}, floats);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (p.groups() > 0) {
    tile::dispatch_tile(qkv.scalar_type(), p.head_dim, [&](auto type, auto dim) {
      using T = typename decltype(type)::type;
      constexpr int D = decltype(dim)::value;
      tile::TileArgs<T> a = tile_args<T>(p, o, qkv);
      a.grad_out = reinterpret_cast<const T*>(grad_out.const_data_ptr());
      a.out = reinterpret_cast<T*>(dqkv.mutable_data_ptr());
      a.lse = lse.mutable_data_ptr<float>();
      a.delta = delta.mutable_data_ptr<float>();
      a.vectorized = tile::vectorizable(p.channels, p.head_dim, a.qkv, a.grad_out);
      a.partial = query_partial.mutable_data_ptr<float>();
      a.partial_width = static_cast<int>(query_width);
      tile::launch_backward<T, D>(p.policy, a, key_partial.mutable_data_ptr<float>(), chunks, stream);
    });
  } else {
    query_partial.zero_();
    key_partial.zero_();
  }
  // [heads, table rows | q part of qkv_bias | logit scale] and [heads, k part | v part]
  const at::Tensor query_sums = sum_slots(query_partial, stream);
  const at::Tensor key_sums = sum_slots(key_partial, stream);
  const at::Tensor table_sum = query_sums.narrow(1, 0, p.table_rows).t();
  const at::Tensor bias_sum = at::cat({query_sums.narrow(1, p.table_rows, p.head_dim).reshape({-1}),
                                       key_sums.narrow(1, 0, p.head_dim).reshape({-1}),
                                       key_sums.narrow(1, p.head_dim, p.head_dim).reshape({-1})});
  at::Tensor logit_sum = query_sums.select(1, p.table_rows + p.head_dim);
  if (logit_scale.has_value()) {
    // Clamping at log(100) passes no gradient to a logit scale above it.
    const at::Tensor below = logit_scale->to(at::kFloat).reshape({-1}).le(std::log(100.0f));
    logit_sum = at::where(below, logit_sum, at::zeros_like(logit_sum));
  }
  return {dqkv, optional_gradient(bias_table, table_sum, qkv), optional_gradient(qkv_bias, bias_sum, qkv),
          optional_gradient(logit_scale, logit_sum, qkv)};
}

}  // namespace vitkernels
