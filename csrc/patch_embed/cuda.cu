// Patch embedding for CUDA tensors: the convolution as an implicit GEMM (common/cuda_tile_gemm.cuh),
// forward and backward, computed in fp32 for fp32 weights and on tensor cores in the weight's dtype
// (fp32 accumulation) for fp16 and bf16 ones; a uint8 image is normalized in fp32 and converted to
// that compute type on load.
//
// Forward: Z [M, E] = A W^T with M = B * N patches and K = Cin * ph * pw, where A's element
// (m, k = (c, i, j)) is read straight from the image by index arithmetic (normalized on the way,
// zero where a padded patch runs past the image) and W is the weight viewed [E, K]. The epilogue
// adds the bias and the position row and writes token P + n of image b. With the patch norm the
// 64-column tile does not span E, so the epilogue writes Z + bias to an fp32 buffer instead and a
// second pass, one warp per row, applies the LayerNorm and the position and writes the tokens.
// A small kernel writes the prefix rows (+ their positions when pos covers them).
//
// Backward, with dZ the gradient of the patch rows (before the patch norm when there is one):
// dW = dZ^T A and dA = dZ W as implicit GEMMs over M and E, dA scattered back into the image by the
// same index arithmetic (patches do not overlap, so each pixel is written once, and pixels of the
// padding are dropped); bias, prefix, position and norm parameter gradients are column sums in a
// fixed order. Nothing uses float atomics, so the backward is deterministic. The patch norm's input
// is recomputed by the forward GEMM.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_reduce.cuh"
#include "common/cuda_tile_gemm.cuh"
#include "patch_embed/inputs.h"
#include "patch_embed/patch_embed.h"

namespace vitkernels {
namespace {

using cuda::warp_sum;
using patch_embed::PatchGeometry;
using patch_embed::PatchInputs;
using tile_gemm::Matrix;
using tile_gemm::MatrixStore;
using tile_gemm::Transposed;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
// Grid-stride loops cover what this many blocks do not.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;
// The weight gradient's GEMM aims at this many blocks, splitting its depth (the patches) in ranges
// of at least kMinSplitPatches.
constexpr int64_t kTargetBlocks = 512;
constexpr int64_t kMinSplitPatches = 1024;

// The kernels divide the GEMMs' row and depth indices, and locate pixels, in 32 bits, a fraction
// of the instructions of 64-bit divisions (offsets into the tensors stay 64-bit). Both entry
// points check that these fit.
void check_32_bit_indices(const PatchGeometry& g) {
  TORCH_CHECK(g.rows() <= INT32_MAX && g.depth() <= INT32_MAX && g.dim <= INT32_MAX &&
                  g.grid_h * g.patch_h <= INT32_MAX && g.grid_w * g.patch_w <= INT32_MAX,
              "the cuda patch embedding takes fewer than 2^31 patches, patch elements and padded rows and columns, got ",
              g.rows(), " patches of ", g.depth(), " elements");
}

// Where element k = (c, i, j) of patch m lies in the image [B, Cin, H, W]: the patch's corner plus
// the element's place in the patch, so that a GEMM computes each once per row or depth.
struct PatchLayout {
  int channels, height, width, patch_h, patch_w, grid_w, patches;

  struct Corner {
    int64_t offset;  // of the patch's top-left pixel in channel 0 of its image
    int y, x;        // its row and column
  };
  struct Place {
    int64_t offset;  // from the corner
    int channel, i, j;
  };

  __device__ Corner corner(int64_t m) const {
    const int b = static_cast<int>(m) / patches;
    const int p = static_cast<int>(m) - b * patches;
    const int patch_row = p / grid_w;
    const int y = patch_row * patch_h;
    const int x = (p - patch_row * grid_w) * patch_w;
    return {(static_cast<int64_t>(b) * channels * height + y) * width + x, y, x};
  }

  __device__ Place place(int64_t k) const {
    const int area = patch_h * patch_w;
    const int c = static_cast<int>(k) / area;
    const int in_patch = static_cast<int>(k) - c * area;
    const int i = in_patch / patch_w;
    const int j = in_patch - i * patch_w;
    return {(static_cast<int64_t>(c) * height + i) * width + j, c, i, j};
  }

  // Whether the pixel lies in the image (a padded patch runs past it).
  __device__ bool inside(const Corner& corner, const Place& place) const {
    return corner.y + place.i < height && corner.x + place.j < width;
  }
};

PatchLayout patch_layout(const PatchGeometry& g) {
  return {static_cast<int>(g.channels), static_cast<int>(g.height), static_cast<int>(g.width),
          static_cast<int>(g.patch_h),  static_cast<int>(g.patch_w), static_cast<int>(g.grid_w),
          static_cast<int>(g.patches())};
}

// GEMM operand A [M, K]: the normalized pixels of each patch, zeros past the image; a row is a
// patch's corner, a depth a place in the patch with its channel's scale and shift.
template <typename image_t>
struct PatchPixels {
  static constexpr bool kRowsContiguous = false;
  using Row = PatchLayout::Corner;
  struct Depth {
    PatchLayout::Place place;
    float scale, shift;
  };
  const image_t* image;  // [B, Cin, H, W]
  const float* scale;    // [Cin]
  const float* shift;    // [Cin]
  PatchLayout layout;

  __device__ Row row(int64_t m) const { return layout.corner(m); }

  __device__ Depth depth(int64_t k) const {
    const PatchLayout::Place place = layout.place(k);
    return {place, scale[place.channel], shift[place.channel]};
  }

  __device__ float at(const Row& r, const Depth& d) const {
    return layout.inside(r, d.place) ? static_cast<float>(image[r.offset + d.place.offset]) * d.scale + d.shift
                                     : 0.0f;
  }
};

template <typename image_t>
PatchPixels<image_t> patch_pixels(const PatchInputs& in) {
  return {in.x.const_data_ptr<image_t>(), in.scale.const_data_ptr<float>(), in.shift.const_data_ptr<float>(),
          patch_layout(in.g)};
}

// Row m < M, column e of [B, tokens, E] fp32 rows: token first + n of image b for m = b * patches + n.
// With tokens = patches and first = 0, a contiguous [M, E] matrix.
struct PatchRows {
  static constexpr bool kRowsContiguous = false;
  using Row = int64_t;
  using Depth = int64_t;
  const float* data;
  int64_t patches, tokens, first, dim;

  __device__ Row row(int64_t m) const {
    const int b = static_cast<int>(m) / static_cast<int>(patches);
    return (b * tokens + first + m - static_cast<int64_t>(b) * patches) * dim;
  }
  __device__ Depth depth(int64_t e) const { return e; }
  __device__ float at(Row r, Depth e) const { return data[r + e]; }
  __device__ float operator()(int64_t m, int64_t e) const { return at(row(m), e); }
};

// Epilogue of the forward GEMM: Z + bias into pre [M, E] when a patch norm follows, else
// + position and the token written to out [B, P + N, E]. The patch norm pass reuses it without
// bias and pre.
template <typename out_t>
struct TokenStore {
  out_t* out;
  float* pre;
  const float* bias;  // [E] or null
  const float* pos;   // [L, E] or null
  int64_t patches, tokens, num_prefix, pos_offset, dim;

  __device__ void operator()(int64_t m, int64_t e, float v, int = 0) const {
    if (bias != nullptr) {
      v += bias[e];
    }
    if (pre != nullptr) {
      pre[m * dim + e] = v;
      return;
    }
    const int64_t b = static_cast<int>(m) / static_cast<int>(patches), n = m - b * patches;
    if (pos != nullptr) {
      v += pos[(pos_offset + n) * dim + e];
    }
    out[(b * tokens + num_prefix + n) * dim + e] = static_cast<out_t>(v);
  }
};

// Epilogue of the image-gradient GEMM: dA (m, k) to its pixel of d image [B, Cin, H, W] fp32.
struct ImageScatter {
  float* image;
  PatchLayout layout;

  __device__ void operator()(int64_t m, int64_t k, float v, int) const {
    const PatchLayout::Corner corner = layout.corner(m);
    const PatchLayout::Place place = layout.place(k);
    if (layout.inside(corner, place)) {
      image[corner.offset + place.offset] = v;
    }
  }
};

// Mean and 1 / sqrt(var + eps) of row[dim], in every lane of the warp (two passes for accuracy).
__device__ void row_statistics(const float* row, int64_t dim, float eps, float& mean, float& rstd) {
  const int lane = threadIdx.x % 32;
  float sum = 0.0f;
  for (int64_t e = lane; e < dim; e += 32) {
    sum += row[e];
  }
  mean = warp_sum(sum) / static_cast<float>(dim);
  float squares = 0.0f;
  for (int64_t e = lane; e < dim; e += 32) {
    const float d = row[e] - mean;
    squares += d * d;
  }
  rstd = rsqrtf(warp_sum(squares) / static_cast<float>(dim) + eps);
}

// The patch norm as a second pass over pre [M, E] (Z + bias), one warp per row; store adds the
// position and writes the token.
template <typename out_t>
__global__ void patch_norm_kernel(const float* __restrict__ pre, TokenStore<out_t> store,
                                  const float* __restrict__ norm_weight, const float* __restrict__ norm_bias,
                                  float eps, int64_t rows) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (m >= rows) {
    return;
  }
  const int64_t dim = store.dim;
  const float* row = pre + m * dim;
  float mean, rstd;
  row_statistics(row, dim, eps, mean, rstd);
  for (int64_t e = threadIdx.x % 32; e < dim; e += 32) {
    float y = (row[e] - mean) * rstd;
    y = norm_weight != nullptr ? y * norm_weight[e] : y;
    store(m, e, norm_bias != nullptr ? y + norm_bias[e] : y);
  }
}

// Backward of the patch norm, one warp per row: dpre [M, E] = rstd * (g - mean(g) - xhat * mean(g * xhat))
// with g = dy * norm_weight and xhat = (pre - mean) * rstd; keeps each row's mean and rstd.
__global__ void patch_norm_backward_kernel(PatchRows dy, const float* __restrict__ pre,
                                           const float* __restrict__ norm_weight, float eps, int64_t rows,
                                           float* __restrict__ dpre, float* __restrict__ row_mean,
                                           float* __restrict__ row_rstd) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (m >= rows) {
    return;
  }
  const int lane = threadIdx.x % 32;
  const int64_t dim = dy.dim;
  const float* row = pre + m * dim;
  float mean, rstd;
  row_statistics(row, dim, eps, mean, rstd);
  float sum_g = 0.0f, sum_g_xhat = 0.0f;
  for (int64_t e = lane; e < dim; e += 32) {
    const float g = norm_weight != nullptr ? dy(m, e) * norm_weight[e] : dy(m, e);
    sum_g += g;
    sum_g_xhat += g * (row[e] - mean) * rstd;
  }
  const float mean_g = warp_sum(sum_g) / static_cast<float>(dim);
  const float mean_g_xhat = warp_sum(sum_g_xhat) / static_cast<float>(dim);
  for (int64_t e = lane; e < dim; e += 32) {
    const float g = norm_weight != nullptr ? dy(m, e) * norm_weight[e] : dy(m, e);
    dpre[m * dim + e] = rstd * (g - mean_g - (row[e] - mean) * rstd * mean_g_xhat);
  }
  if (lane == 0) {
    row_mean[m] = mean;
    row_rstd[m] = rstd;
  }
}

// dy(m, e) * xhat(m, e): the summand of the norm weight's gradient.
struct NormalizedGradient {
  PatchRows dy;
  const float* pre;
  const float* mean;
  const float* rstd;
  __device__ float operator()(int64_t m, int64_t e) const {
    return dy(m, e) * (pre[m * dy.dim + e] - mean[m]) * rstd[m];
  }
};

// out [B, P + N, E]: prefix row t of every image = prefix[t] (+ pos[t] where given).
template <typename out_t>
__global__ void prefix_rows_kernel(const float* __restrict__ prefix, const float* __restrict__ pos,
                                   out_t* __restrict__ out, int64_t total, int64_t per_image, int64_t image_stride) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t j = i % per_image;
    out[(i / per_image) * image_stride + j] = static_cast<out_t>(prefix[j] + (pos != nullptr ? pos[j] : 0.0f));
  }
}

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::min((items + per_block - 1) / per_block, kMaxBlocks));
}

unsigned row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "patch embedding of ", rows, " patches is too large for one launch");
  return static_cast<unsigned>(blocks);
}

// Fills out [B, P + N, E]; pre is an fp32 [M, E] buffer when patch_norm, else undefined.
template <typename scalar_t, typename image_t>
void embed(const PatchInputs& in, at::Tensor& out, const at::Tensor& pre, float eps, cudaStream_t stream) {
  const PatchGeometry& g = in.g;
  const int64_t tokens = in.num_prefix + g.patches();
  TokenStore<scalar_t> store{out.mutable_data_ptr<scalar_t>(), pre.defined() ? pre.mutable_data_ptr<float>() : nullptr,
                             data_or_null(in.bias), data_or_null(in.pos), g.patches(), tokens, in.num_prefix,
                             in.pos_offset, g.dim};
  const Matrix weight_rows{in.weight.const_data_ptr<float>(), g.depth()};
  tile_gemm::launch<tile_gemm::compute_t<scalar_t>>(patch_pixels<image_t>(in), weight_rows, store, g.rows(), g.dim,
                                                    g.depth(), stream);
  if (pre.defined() && g.rows() > 0) {
    store.pre = nullptr;
    store.bias = nullptr;
    patch_norm_kernel<scalar_t><<<row_blocks(g.rows()), kThreads, 0, stream>>>(
        pre.const_data_ptr<float>(), store, data_or_null(in.norm_weight), data_or_null(in.norm_bias), eps, g.rows());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t prefix_total = g.batch * in.num_prefix * g.dim;
  if (prefix_total > 0) {
    prefix_rows_kernel<scalar_t><<<blocks_for(prefix_total, kThreads), kThreads, 0, stream>>>(
        in.prefix.const_data_ptr<float>(), in.pos_offset > 0 ? in.pos.const_data_ptr<float>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), prefix_total, in.num_prefix * g.dim, tokens * g.dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs fn with scalar_t bound to the weight's dtype and image_t to the image's (uint8 or scalar_t).
template <typename Fn>
void dispatch_patch_types(const PatchInputs& in, const at::Tensor& weight, const Fn& fn) {
  VITKERNELS_DISPATCH_GEMM_TYPES(weight.scalar_type(), "patch_embed_cuda", [&] {
    if (in.x.scalar_type() == at::kByte) {
      fn(scalar_t{}, uint8_t{});
    } else {
      fn(scalar_t{}, scalar_t{});
    }
  });
}

// Z + bias [M, E] fp32: the patch norm's input, recomputed by the forward GEMM.
at::Tensor patch_norm_input(const PatchInputs& in, const at::Tensor& weight, cudaStream_t stream) {
  at::Tensor pre = at::empty({in.g.rows(), in.g.dim}, in.weight.options());
  dispatch_patch_types(in, weight, [&](auto weight_type, auto image_type) {
    using scalar_t = decltype(weight_type);
    TokenStore<scalar_t> store{nullptr, pre.mutable_data_ptr<float>(), data_or_null(in.bias), nullptr, in.g.patches(),
                               in.g.patches(), 0, 0, in.g.dim};
    tile_gemm::launch<tile_gemm::compute_t<scalar_t>>(patch_pixels<decltype(image_type)>(in),
                                                    Matrix{in.weight.const_data_ptr<float>(), in.g.depth()}, store,
                                                    in.g.rows(), in.g.dim, in.g.depth(), stream);
  });
  return pre;
}

// dpre [M, E] from dy = the patch rows of grad_out; the norm's weight and bias gradients where wanted.
at::Tensor patch_norm_backward(const PatchInputs& in, const at::Tensor& weight, const PatchRows& dy, float eps,
                               bool weight_grad, bool bias_grad, at::Tensor& dnorm_weight, at::Tensor& dnorm_bias,
                               cudaStream_t stream) {
  const int64_t rows = in.g.rows();
  const at::Tensor pre = patch_norm_input(in, weight, stream);
  at::Tensor dpre = at::empty_like(pre);
  at::Tensor mean = at::empty({rows}, pre.options()), rstd = at::empty({rows}, pre.options());
  if (rows > 0) {
    patch_norm_backward_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(
        dy, pre.const_data_ptr<float>(), data_or_null(in.norm_weight), eps, rows, dpre.mutable_data_ptr<float>(),
        mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (weight_grad) {
    const NormalizedGradient summand{dy, pre.const_data_ptr<float>(), mean.const_data_ptr<float>(),
                                     rstd.const_data_ptr<float>()};
    dnorm_weight = column_sums(summand, rows, in.g.dim, pre, stream);
  }
  if (bias_grad) {
    dnorm_bias = column_sums(dy, rows, in.g.dim, pre, stream);
  }
  return dpre;
}

// Depth ranges of the weight gradient's GEMM: enough blocks for a large GPU when [E, K] has few
// tiles (Swin: one or two), each range at least kMinSplitPatches long. A function of the shape
// only, so the result does not depend on the device.
int weight_gradient_splits(const PatchGeometry& g) {
  const int64_t tiles = ((g.dim + tile_gemm::kTile - 1) / tile_gemm::kTile) *
                        ((g.depth() + tile_gemm::kTile - 1) / tile_gemm::kTile);
  const int64_t wanted = (kTargetBlocks + tiles - 1) / tiles;
  const int64_t affordable = g.rows() / kMinSplitPatches;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, affordable, tile_gemm::kMaxSplits})));
}

// dW [E, K] fp32 = dZ^T A, reduced over the M patches: per depth range inside each block, then the
// ranges' partial products added in order.
at::Tensor weight_gradient(const PatchInputs& in, const at::Tensor& weight, const PatchRows& dz, cudaStream_t stream) {
  const PatchGeometry& g = in.g;
  const int splits = weight_gradient_splits(g);
  at::Tensor partial = at::empty({splits, g.dim, g.depth()}, in.weight.options());
  dispatch_patch_types(in, weight, [&](auto weight_type, auto image_type) {
    using scalar_t = decltype(weight_type);
    using image_t = decltype(image_type);
    tile_gemm::launch<tile_gemm::compute_t<scalar_t>>(
        Transposed<PatchRows>{dz}, Transposed<PatchPixels<image_t>>{patch_pixels<image_t>(in)},
        MatrixStore{partial.mutable_data_ptr<float>(), g.depth(), g.dim * g.depth()}, g.dim, g.depth(), g.rows(),
        stream, splits);
  });
  if (splits == 1) {
    return partial[0];
  }
  const int64_t size = g.dim * g.depth();
  return column_sums(Matrix{partial.const_data_ptr<float>(), size}, splits, size, partial, stream);
}

// d image [B, Cin, H, W] fp32 = dZ W scattered back to the pixels (x is floating point here).
at::Tensor image_gradient(const PatchInputs& in, const at::Tensor& weight, const PatchRows& dz, cudaStream_t stream) {
  const PatchGeometry& g = in.g;
  at::Tensor dimage = at::empty({g.batch, g.channels, g.height, g.width}, in.weight.options());
  VITKERNELS_DISPATCH_GEMM_TYPES(weight.scalar_type(), "patch_embed_image_grad_cuda", [&] {
    tile_gemm::launch<tile_gemm::compute_t<scalar_t>>(
        dz, Transposed<Matrix>{Matrix{in.weight.const_data_ptr<float>(), g.depth()}},
        ImageScatter{dimage.mutable_data_ptr<float>(), patch_layout(g)}, g.rows(), g.depth(), g.dim, stream);
  });
  return dimage;
}

}  // namespace

at::Tensor patch_embed_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& prefix_tokens, const std::optional<at::Tensor>& pos,
                                const std::optional<at::Tensor>& norm_weight,
                                const std::optional<at::Tensor>& norm_bias, double norm_eps, bool patch_norm,
                                const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_dev) {
  TORCH_CHECK(norm_eps > 0, "norm_eps must be positive, got ", norm_eps);
  check_device(x, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const PatchInputs in = patch_embed::checked_inputs(c10::DeviceType::CUDA, x, weight, bias, prefix_tokens, pos,
                                                     norm_weight, norm_bias, mean, std_dev);
  const PatchGeometry& g = in.g;
  check_32_bit_indices(g);
  at::Tensor out = at::empty({g.batch, in.num_prefix + g.patches(), g.dim}, weight.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor pre = patch_norm ? at::empty({g.rows(), g.dim}, in.weight.options()) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_patch_types(in, weight, [&](auto weight_type, auto image_type) {
    embed<decltype(weight_type), decltype(image_type)>(in, out, pre, static_cast<float>(norm_eps), stream);
  });
  return out;
}

std::vector<at::Tensor> patch_embed_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& prefix_tokens,
                                             const std::optional<at::Tensor>& pos,
                                             const std::optional<at::Tensor>& norm_weight,
                                             const std::optional<at::Tensor>& norm_bias, double norm_eps,
                                             bool patch_norm, const std::optional<at::Tensor>& mean,
                                             const std::optional<at::Tensor>& std_dev, const c10::List<bool>& needs) {
  TORCH_CHECK(needs.size() == 9, "needs must hold 9 flags, got ", needs.size());
  TORCH_CHECK(norm_eps > 0, "norm_eps must be positive, got ", norm_eps);
  check_device(x, "x", c10::DeviceType::CUDA);
  check_same_device(grad_out, "grad_out", x, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const PatchInputs in = patch_embed::checked_inputs(c10::DeviceType::CUDA, x, weight, bias, prefix_tokens, pos,
                                                     norm_weight, norm_bias, mean, std_dev);
  const PatchGeometry& g = in.g;
  check_32_bit_indices(g);
  const int64_t tokens = in.num_prefix + g.patches();
  const at::Tensor dout = patch_embed::float_grad_out(grad_out, g, tokens);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> grads(9);
  const Matrix image_rows{dout.const_data_ptr<float>(), tokens * g.dim};  // [B, (P + N) * E]
  if (needs[3] && prefix_tokens.has_value()) {
    grads[3] = column_sums(image_rows, g.batch, in.num_prefix * g.dim, dout, stream);
  }
  if (needs[4] && pos.has_value()) {
    const Matrix covered{image_rows.data + (in.num_prefix - in.pos_offset) * g.dim, image_rows.ld};
    grads[4] = column_sums(covered, g.batch, in.pos.numel(), dout, stream);
  }
  PatchRows dz{dout.const_data_ptr<float>(), g.patches(), tokens, in.num_prefix, g.dim};
  at::Tensor dpre;
  if (patch_norm) {
    dpre = patch_norm_backward(in, weight, dz, static_cast<float>(norm_eps), needs[5] && norm_weight.has_value(),
                               needs[6] && norm_bias.has_value(), grads[5], grads[6], stream);
    dz = PatchRows{dpre.const_data_ptr<float>(), g.patches(), g.patches(), 0, g.dim};
  }
  if (needs[2] && bias.has_value()) {
    grads[2] = column_sums(dz, g.rows(), g.dim, dout, stream);
  }
  if (needs[1]) {
    grads[1] = weight_gradient(in, weight, dz, stream);
  }
  if (needs[0] || needs[7] || needs[8]) {
    patch_embed::image_gradients(in, image_gradient(in, weight, dz, stream), mean, std_dev, grads[0], grads[7],
                                 grads[8]);
  }
  patch_embed::type_gradients(grads, {x, weight, bias, prefix_tokens, pos, norm_weight, norm_bias, mean, std_dev},
                              needs, grad_out);
  return grads;
}

}  // namespace vitkernels
