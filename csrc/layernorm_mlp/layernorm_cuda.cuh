// LayerNorm (and residual-add + LayerNorm) forward and backward kernels for CUDA tensors, with
// their launchers; included by layernorm_mlp/cuda.cu only.
//
// Schedule: a row is handled by a group of threads that keeps it in registers as 16-byte packs
// (one read of each input, one write of each output). The group is the fewest of 4, 8, 16 or 32
// lanes of a warp that hold the row, else the whole 128-thread block: the forward holds up to 32
// elements per thread (a warp per row up to 1024 elements, a block up to 4096), the backward,
// which also keeps the row's gradient terms and its column sums, 16. So Swin's narrow rows
// (C = 96: 12 packs of bf16) keep every lane busy, 4 lanes and 3 packs each, 8 rows per warp,
// instead of 12 of a warp's 32 lanes, and a ViT-B row (768) is one warp's, 3 packs per lane,
// without the block-wide reductions and their barriers. Rows whose width is not a multiple of
// the pack, or whose pointers are not 16-byte aligned, or that are wider than that take a general
// block-per-row path that reads scalars and re-reads the row from cache for each of its passes.
// Statistics are fp32; the variance is the mean squared deviation from the mean, as the CPU
// kernels compute it.
//
// The backward's weight and bias gradients are deterministic: every row group keeps fp32 partial
// sums for the columns it owns, writes them to its own row of a [parts, C] buffer, and a second
// kernel sums the parts of each column in order. The number of parts depends only on the rows
// (their count, width and dtype), never on the device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_reduce.cuh"
#include "common/cuda_utils.cuh"

namespace vitkernels {
namespace layernorm_cuda {

using cuda::kWarpSize;
using cuda::load_floats;
using cuda::pack_size;
using cuda::store_floats;

constexpr int kThreads = 128;  // threads of every LayerNorm block
constexpr int kWarps = kThreads / kWarpSize;
// Elements of a row each thread holds in registers on the fast paths (in 16-byte packs).
constexpr int kForwardElements = 32;
constexpr int kBackwardElements = 16;
// The backward's grid stops growing here (its blocks then take several rows each), which bounds
// the partial-sum buffer and the length of the final per-column sums.
constexpr int64_t kMaxBackwardBlocks = 512;

// The threads of a block that share one row: 4, 8, 16 or 32 consecutive lanes of a warp, or the
// whole block (kThreadsPerRow = kThreads, one row per block).
template <int kThreadsPerRow>
struct RowGroup {
  static_assert(kThreadsPerRow == kThreads ||
                    (kThreadsPerRow >= 4 && kThreadsPerRow <= kWarpSize && kWarpSize % kThreadsPerRow == 0),
                "a row takes 4, 8, 16 or 32 lanes of a warp, or the whole block");
  static constexpr int kRowsPerBlock = kThreads / kThreadsPerRow;
  static constexpr int kWarpsPerRow = kThreadsPerRow > kWarpSize ? kThreadsPerRow / kWarpSize : 1;
  int lane;  // this thread's index among its row's threads
  int slot;  // which of the block's rows

  __device__ RowGroup() : lane(threadIdx.x % kThreadsPerRow), slot(threadIdx.x / kThreadsPerRow) {}

  // v[k] summed over the row's threads, bitwise the same in all of them (a butterfly: each step
  // adds the same two values in every lane). Every thread of the warp must call it, those
  // without a row too (with zeros), and with a block per row every thread of the block (it
  // synchronizes the block).
  template <int K>
  __device__ void sum(float (&v)[K]) const {
    constexpr int kWidth = kThreadsPerRow < kWarpSize ? kThreadsPerRow : kWarpSize;
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int offset = kWidth / 2; offset > 0; offset /= 2) {
        v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
      }
    }
    if constexpr (kWarpsPerRow > 1) {
      __shared__ float shared[kWarps][K];  // one per instantiation, reused by every call
      const int warp = threadIdx.x / kWarpSize;
      if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          shared[warp][k] = v[k];
        }
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < K; ++k) {
        float total = 0.0f;
        for (int w = 0; w < kWarpsPerRow; ++w) {
          total += shared[slot * kWarpsPerRow + w][k];
        }
        v[k] = total;
      }
      __syncthreads();  // shared is reused by the next sum
    }
  }
};

// A row group's share of a row held in registers as 16-byte packs of kVec elements, kElements
// per thread: a thread's item i is pack lane + i * kThreadsPerRow of the row.
template <typename scalar_t, int kThreadsPerRow, int kElements>
struct RowTile : RowGroup<kThreadsPerRow> {
  static constexpr int kVec = pack_size<scalar_t>();
  static constexpr int kItems = kElements / kVec;

  __device__ RowTile() : RowGroup<kThreadsPerRow>() {}

  // f(i, p) for each of this thread's items i whose pack p lies in a row of c elements (none
  // for c = 0: a group without a row).
  template <typename F>
  __device__ __forceinline__ void for_each_pack(int c, const F& f) const {
    const int packs = c / kVec;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int p = this->lane + i * kThreadsPerRow;
      if (p < packs) {
        f(i, p);
      }
    }
  }
};

// A [c] weight or bias: fp32, or in the rows' dtype and read as it is (a model in bf16 needs no
// conversion kernel before each call), or absent.
template <typename scalar_t>
struct ColumnVector {
  const float* f = nullptr;
  const scalar_t* s = nullptr;

  __device__ __forceinline__ float at(int col, float absent) const {
    return f != nullptr ? f[col] : (s != nullptr ? static_cast<float>(s[col]) : absent);
  }
};

// The ColumnVector of t (undefined: absent), which is fp32 or of scalar_t.
template <typename scalar_t>
ColumnVector<scalar_t> column_vector(const at::Tensor& t) {
  ColumnVector<scalar_t> v;
  if (!t.defined()) {
    return v;
  }
  if (t.scalar_type() == at::kFloat) {
    v.f = t.const_data_ptr<float>();
  } else {
    TORCH_CHECK(t.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value,
                "the cuda LayerNorm reads its weight and bias in fp32 or in the input's dtype, got ", t.scalar_type());
    v.s = t.const_data_ptr<scalar_t>();
  }
  return v;
}

template <typename scalar_t>
__device__ __forceinline__ float affine(float normalized, const ColumnVector<scalar_t>& weight,
                                        const ColumnVector<scalar_t>& bias, int col) {
  return normalized * weight.at(col, 1.0f) + bias.at(col, 0.0f);
}

// y = LayerNorm(x + residual) of [rows, c] rows; residual and sum are null for a plain LayerNorm.
template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* x;         // [rows, c]
  const scalar_t* residual;  // [rows, c] or null
  ColumnVector<scalar_t> weight;
  ColumnVector<scalar_t> bias;
  scalar_t* sum;             // [rows, c] or null: x + residual
  scalar_t* y;               // [rows, c]
  float* mean;               // [rows]
  float* rstd;               // [rows]
  int64_t rows;
  int c;
  float eps;
};

// The forward with a row per group, held in registers. c is a multiple of the pack, the row
// pointers 16-byte aligned, and c <= kForwardElements * kThreadsPerRow.
template <typename scalar_t, int kThreadsPerRow>
__global__ void __launch_bounds__(kThreads) layernorm_fwd_kernel(ForwardArgs<scalar_t> a) {
  using Tile = RowTile<scalar_t, kThreadsPerRow, kForwardElements>;
  constexpr int kVec = Tile::kVec;
  const Tile tile;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * Tile::kRowsPerBlock + tile.slot;
  // A group past the last row stays for its warp's reductions with an empty row (c = 0).
  const bool valid = row < a.rows;
  const int c = valid ? a.c : 0;
  const int64_t base = valid ? row * a.c : 0;
  float v[Tile::kItems][kVec];
  float total[1] = {0.0f};
  tile.for_each_pack(c, [&](int i, int p) {
    load_floats(a.x + base + p * kVec, v[i]);
    if (a.residual != nullptr) {
      float r[kVec];
      load_floats(a.residual + base + p * kVec, r);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v[i][j] += r[j];
      }
      store_floats(a.sum + base + p * kVec, v[i]);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      total[0] += v[i][j];
    }
  });
  tile.sum(total);
  const float mu = total[0] / static_cast<float>(a.c);
  float squares[1] = {0.0f};
  tile.for_each_pack(c, [&](int i, int) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      squares[0] += (v[i][j] - mu) * (v[i][j] - mu);
    }
  });
  tile.sum(squares);
  const float r = 1.0f / sqrtf(squares[0] / static_cast<float>(a.c) + a.eps);
  tile.for_each_pack(c, [&](int i, int p) {
    float out[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out[j] = affine((v[i][j] - mu) * r, a.weight, a.bias, p * kVec + j);
    }
    store_floats(a.y + base + p * kVec, out);
  });
  if (valid && tile.lane == 0) {
    a.mean[row] = mu;
    a.rstd[row] = r;
  }
}

// The general forward: any width and alignment, a block per row, scalar accesses; each pass
// re-reads the row (from cache) instead of holding it.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) layernorm_fwd_general_kernel(ForwardArgs<scalar_t> a) {
  using Group = RowGroup<kThreads>;
  const Group group;
  const int64_t row = blockIdx.x;
  const int64_t base = row * a.c;
  const auto value = [&](int col) {
    const float v = static_cast<float>(a.x[base + col]);
    return a.residual != nullptr ? v + static_cast<float>(a.residual[base + col]) : v;
  };
  float total[1] = {0.0f};
  for (int col = group.lane; col < a.c; col += kThreads) {
    const float v = value(col);
    if (a.sum != nullptr) {
      a.sum[base + col] = static_cast<scalar_t>(v);
    }
    total[0] += v;
  }
  group.sum(total);
  const float mu = total[0] / static_cast<float>(a.c);
  float squares[1] = {0.0f};
  for (int col = group.lane; col < a.c; col += kThreads) {
    const float d = value(col) - mu;
    squares[0] += d * d;
  }
  group.sum(squares);
  const float r = 1.0f / sqrtf(squares[0] / static_cast<float>(a.c) + a.eps);
  for (int col = group.lane; col < a.c; col += kThreads) {
    a.y[base + col] = static_cast<scalar_t>(affine((value(col) - mu) * r, a.weight, a.bias, col));
  }
  if (group.lane == 0) {
    a.mean[row] = mu;
    a.rstd[row] = r;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + extra with g = dy * weight, for [rows, c]
// rows taken by row groups in a grid-stride loop. Each group sums dy * xhat and dy over its rows
// for the columns it owns and writes them to its own row `part` of partial_weight and
// partial_bias.
template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* dy;     // [rows, c]
  const scalar_t* extra;  // [rows, c] or null
  const scalar_t* x;      // [rows, c]
  const float* mean;      // [rows]
  const float* rstd;      // [rows]
  ColumnVector<scalar_t> weight;
  scalar_t* dx;           // [rows, c]
  float* partial_weight;  // [parts, c] or null
  float* partial_bias;    // [parts, c] or null
  int64_t rows;
  int c;
};

// The backward with the row in registers; layout conditions as for layernorm_fwd_kernel with
// kBackwardElements per thread. Parts are (block, slot): every thread writes its columns of its
// part, zeros when it had no row.
template <typename scalar_t, int kThreadsPerRow>
__global__ void __launch_bounds__(kThreads) layernorm_bwd_kernel(BackwardArgs<scalar_t> a) {
  using Tile = RowTile<scalar_t, kThreadsPerRow, kBackwardElements>;
  constexpr int kVec = Tile::kVec;
  const Tile tile;
  float dweight[Tile::kItems][kVec] = {};
  float dbias[Tile::kItems][kVec] = {};
  const int64_t step = static_cast<int64_t>(gridDim.x) * Tile::kRowsPerBlock;
  // The loop runs over the block's first rows, the same bounds for the whole block as sum()
  // requires; a group past the last row takes an empty row (c = 0).
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * Tile::kRowsPerBlock; first < a.rows; first += step) {
    const int64_t row = first + tile.slot;
    const bool valid = row < a.rows;
    const int c = valid ? a.c : 0;
    const int64_t base = valid ? row * a.c : 0;
    const float mu = valid ? a.mean[row] : 0.0f;
    const float r = valid ? a.rstd[row] : 0.0f;
    float grad[Tile::kItems][kVec];
    float xhat[Tile::kItems][kVec];
    float sums[2] = {0.0f, 0.0f};
    tile.for_each_pack(c, [&](int i, int p) {
      float d[kVec];
      load_floats(a.dy + base + p * kVec, d);
      load_floats(a.x + base + p * kVec, xhat[i]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        xhat[i][j] = (xhat[i][j] - mu) * r;
        dweight[i][j] += d[j] * xhat[i][j];
        dbias[i][j] += d[j];
        grad[i][j] = d[j] * a.weight.at(p * kVec + j, 1.0f);
        sums[0] += grad[i][j];
        sums[1] += grad[i][j] * xhat[i][j];
      }
    });
    tile.sum(sums);
    const float mean_g = sums[0] / static_cast<float>(a.c);
    const float mean_g_xhat = sums[1] / static_cast<float>(a.c);
    tile.for_each_pack(c, [&](int i, int p) {
      float out[kVec];
      float e[kVec] = {};
      if (a.extra != nullptr) {
        load_floats(a.extra + base + p * kVec, e);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        out[j] = r * (grad[i][j] - mean_g - xhat[i][j] * mean_g_xhat) + e[j];
      }
      store_floats(a.dx + base + p * kVec, out);
    });
  }
  const int64_t part = static_cast<int64_t>(blockIdx.x) * Tile::kRowsPerBlock + tile.slot;
  tile.for_each_pack(a.c, [&](int i, int p) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (a.partial_weight != nullptr) {
        a.partial_weight[part * a.c + p * kVec + j] = dweight[i][j];
      }
      if (a.partial_bias != nullptr) {
        a.partial_bias[part * a.c + p * kVec + j] = dbias[i][j];
      }
    }
  });
}

// The general backward: a block per row (grid-stride), scalar accesses, the row re-read per
// pass; block b adds its sums straight into row b of the zeroed partials (each column belongs to
// one thread of the block, so there is no race).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) layernorm_bwd_general_kernel(BackwardArgs<scalar_t> a) {
  using Group = RowGroup<kThreads>;
  const Group group;
  const int64_t part = static_cast<int64_t>(blockIdx.x) * a.c;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t base = row * a.c;
    const float mu = a.mean[row];
    const float r = a.rstd[row];
    const auto xhat = [&](int col) { return (static_cast<float>(a.x[base + col]) - mu) * r; };
    const auto grad = [&](int col) {
      return static_cast<float>(a.dy[base + col]) * a.weight.at(col, 1.0f);
    };
    float sums[2] = {0.0f, 0.0f};
    for (int col = group.lane; col < a.c; col += kThreads) {
      const float d = static_cast<float>(a.dy[base + col]);
      sums[0] += grad(col);
      sums[1] += grad(col) * xhat(col);
      if (a.partial_weight != nullptr) {
        a.partial_weight[part + col] += d * xhat(col);
      }
      if (a.partial_bias != nullptr) {
        a.partial_bias[part + col] += d;
      }
    }
    group.sum(sums);
    const float mean_g = sums[0] / static_cast<float>(a.c);
    const float mean_g_xhat = sums[1] / static_cast<float>(a.c);
    for (int col = group.lane; col < a.c; col += kThreads) {
      const float e = a.extra != nullptr ? static_cast<float>(a.extra[base + col]) : 0.0f;
      a.dx[base + col] = static_cast<scalar_t>(r * (grad(col) - mean_g - xhat(col) * mean_g_xhat) + e);
    }
  }
}

// The dtypes of the CUDA kernels of this op (fp64 is left to the reference backend).
#define VITKERNELS_LAYERNORM_DISPATCH(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The threads per row of the kernel a [rows, c] problem takes, given the row tensors the kernel
// reads or writes (undefined ones are absent; the first one sets the element size) and the
// elements per thread the register-resident kernel holds: the fewest of 4, 8, 16 and 32 lanes
// that hold a row, else kThreads (a block per row); 0 for the general kernel.
inline int threads_per_row(int64_t c, int elements, std::initializer_list<const at::Tensor*> tensors) {
  const int64_t vec = 16 / (*tensors.begin())->element_size();
  bool aligned = c % vec == 0;
  for (const at::Tensor* t : tensors) {
    aligned = aligned && (!t->defined() || cuda::is_aligned(t->const_data_ptr(), 16));
  }
  if (!aligned) {
    return 0;
  }
  for (int lanes = 4; lanes <= kWarpSize; lanes *= 2) {
    if (c <= static_cast<int64_t>(elements) * lanes) {
      return lanes;
    }
  }
  return c <= static_cast<int64_t>(elements) * kThreads ? kThreads : 0;
}

// f(std::integral_constant<int, lanes>) for the threads per row threads_per_row chose (not 0).
template <typename F>
void with_threads_per_row(int lanes, const F& f) {
  switch (lanes) {
    case 4:
      f(std::integral_constant<int, 4>());
      break;
    case 8:
      f(std::integral_constant<int, 8>());
      break;
    case 16:
      f(std::integral_constant<int, 16>());
      break;
    case 32:
      f(std::integral_constant<int, 32>());
      break;
    default:
      f(std::integral_constant<int, kThreads>());
      break;
  }
}

template <typename T>
const T* pointer_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_pointer_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

inline void check_launch_size(int64_t rows, int64_t c) {
  TORCH_CHECK(c <= std::numeric_limits<int>::max(), "the cuda LayerNorm takes rows of at most 2^31 - 1 elements, got ",
              c);
  TORCH_CHECK(rows <= std::numeric_limits<int>::max(), "the cuda LayerNorm takes at most 2^31 - 1 rows, got ", rows);
}

// LayerNorm(x + residual) of contiguous [rows, c] x (residual and sum undefined: plain
// LayerNorm) with weight and bias [c] (fp32 or x's dtype) or undefined; writes sum, y, mean and rstd.
inline void layernorm_forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                              const at::Tensor& bias, const at::Tensor& sum, const at::Tensor& y,
                              const at::Tensor& mean, const at::Tensor& rstd, double eps) {
  const int64_t rows = x.size(0);
  const int64_t c = x.size(1);
  check_launch_size(rows, c);
  if (rows == 0) {
    return;
  }
  const int lanes = threads_per_row(c, kForwardElements, {&x, &residual, &sum, &y});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VITKERNELS_LAYERNORM_DISPATCH(x.scalar_type(), "layernorm_fwd_cuda", [&] {
    const ForwardArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), pointer_or_null<scalar_t>(residual),
                                     column_vector<scalar_t>(weight), column_vector<scalar_t>(bias),
                                     mutable_pointer_or_null<scalar_t>(sum), y.mutable_data_ptr<scalar_t>(),
                                     mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), rows,
                                     static_cast<int>(c), static_cast<float>(eps)};
    if (lanes == 0) {
      layernorm_fwd_general_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(args);
    } else {
      with_threads_per_row(lanes, [&](auto threads) {
        constexpr int kRowsPerBlock = kThreads / decltype(threads)::value;
        layernorm_fwd_kernel<scalar_t, decltype(threads)::value>
            <<<static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock), kThreads, 0, stream>>>(args);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct LayerNormGrads {
  at::Tensor dx, dweight, dbias;  // dx in x's dtype; dweight and dbias fp32 [c], empty where not wanted
};

// Backward of layernorm_forward for contiguous [rows, c] dy, extra (undefined: none) and x of one
// dtype, from the fp32 statistics [rows]; weight [c] (fp32 or x's dtype) or undefined.
inline LayerNormGrads layernorm_backward(const at::Tensor& dy, const at::Tensor& extra, const at::Tensor& x,
                                         const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                                         bool bias_grad) {
  const int64_t rows = x.size(0);
  const int64_t c = x.size(1);
  check_launch_size(rows, c);
  LayerNormGrads grads{at::empty_like(x), at::Tensor(), at::Tensor()};
  const int lanes = threads_per_row(c, kBackwardElements, {&x, &dy, &extra, &grads.dx});
  const int64_t rows_per_block = lanes == 0 ? 1 : kThreads / lanes;
  const int64_t blocks = std::min((rows + rows_per_block - 1) / rows_per_block, kMaxBackwardBlocks);
  const int64_t parts = std::max<int64_t>(blocks * rows_per_block, 1);
  const auto options = x.options().dtype(at::kFloat);
  // The fast kernels write every partial; the general one (and no rows at all) needs zeros.
  const auto partials = [&](bool wanted) {
    if (!wanted) {
      return at::Tensor();
    }
    return lanes == 0 || blocks == 0 ? at::zeros({parts, c}, options) : at::empty({parts, c}, options);
  };
  at::Tensor partial_weight = partials(weight.defined());
  at::Tensor partial_bias = partials(bias_grad);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (blocks > 0) {
    VITKERNELS_LAYERNORM_DISPATCH(x.scalar_type(), "layernorm_bwd_cuda", [&] {
      const BackwardArgs<scalar_t> args{
          dy.const_data_ptr<scalar_t>(),    pointer_or_null<scalar_t>(extra),
          x.const_data_ptr<scalar_t>(),     mean.const_data_ptr<float>(),
          rstd.const_data_ptr<float>(),     column_vector<scalar_t>(weight),
          grads.dx.mutable_data_ptr<scalar_t>(), mutable_pointer_or_null<float>(partial_weight),
          mutable_pointer_or_null<float>(partial_bias), rows, static_cast<int>(c)};
      const auto grid = static_cast<unsigned>(blocks);
      if (lanes == 0) {
        layernorm_bwd_general_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args);
      } else {
        with_threads_per_row(lanes, [&](auto threads) {
          layernorm_bwd_kernel<scalar_t, decltype(threads)::value><<<grid, kThreads, 0, stream>>>(args);
        });
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto empty = at::empty({0}, options);
  grads.dweight = weight.defined() ? column_sum::sum_chunks(partial_weight, stream) : empty;
  grads.dbias = bias_grad ? column_sum::sum_chunks(partial_bias, stream) : empty;
  return grads;
}

}  // namespace layernorm_cuda
}  // namespace vitkernels
