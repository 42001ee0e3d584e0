// The forward and the two backward kernels of window and global attention, on the building
// blocks of common/attention_tile.cuh (whose header comment describes the schedule), and their
// host-side launch: dtype and head-dim dispatch, shared-memory sizing, grid.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/attention_tile.cuh"

namespace vitkernels {
namespace attention_tile {

// Forward: out rows and lse of query tile blockIdx.y of head blockIdx.z, for problems
// blockIdx.x, blockIdx.x + gridDim.x, ...
template <class Policy, typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const Policy policy, const TileArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout l = Layout::make<D, T>(Kernel::kForward, 0);
  const int h = blockIdx.z;
  const int tile0 = blockIdx.y * kTile;
  const int warp = threadIdx.x / 32;
  const float alpha = a.tau != nullptr ? a.tau[h] : a.scale;
  int64_t* q_pixel = region<int64_t>(smem, l.q_pixel);
  int32_t* q_tag = region<int32_t>(smem, l.q_tag);
  const T* q_warp = region<T>(smem, l.q) + warp * kWarpRows * ld_tile<D>();
  float* score = warp_region<float>(smem, l, l.score, warp);
  T* prob = warp_region<T>(smem, l, l.prob, warp);
  float* acc = warp_region<float>(smem, l, l.acc, warp);
  const LaneRow lr;
  const int row = warp * kWarpRows + lr.r;
  const int i = tile0 + row;
  for (int64_t group = blockIdx.x; group < a.groups; group += gridDim.x) {
    load_part<Policy, T, D>(policy, a, group, h, tile0, 0, q_pixel, q_tag, region<T>(smem, l.q),
                            region<float>(smem, l.q_norm));
    zero_accumulator<D>(acc);
    SoftmaxRow state;
    for (int key0 = 0; key0 < a.n; key0 += kTile) {
      int64_t* k_pixel = region<int64_t>(smem, l.k_pixel);
      int32_t* k_tag = region<int32_t>(smem, l.k_tag);
      load_part<Policy, T, D>(policy, a, group, h, key0, 1, k_pixel, k_tag, region<T>(smem, l.k),
                              region<float>(smem, l.k_norm));
      load_tile<T, D>(region<T>(smem, l.v), a.qkv, 3 * static_cast<int64_t>(a.channels),
                      2 * static_cast<int64_t>(a.channels) + static_cast<int64_t>(h) * a.head_dim, a.head_dim,
                      k_pixel, a.fill, a.vectorized);
      __syncthreads();
      warp_scores<T, D>(q_warp, region<T>(smem, l.k), score);
      online_softmax<Policy, T, D>(policy, a, group, h, alpha, i, q_tag[row], key0, k_tag, score, prob, acc, state);
      warp_accumulate<T, D>(prob, region<T>(smem, l.v), acc);
    }
    const int64_t pixel = q_pixel[row];
    const float inv = 1.0f / state.sum;
    for (int c = lr.first_column(D); c < lr.first_column(D) + D / 2 && pixel >= 0; ++c) {
      if (c < a.head_dim) {
        a.out[pixel * a.channels + static_cast<int64_t>(h) * a.head_dim + c] =
            from_float<T>(acc[lr.r * ld_acc<D>() + c] * inv);
      }
    }
    if (lr.half == 0 && i < a.n) {
      a.lse[(group * a.heads + h) * a.n + i] = state.max + logf(state.sum);
    }
  }
}

// Pass 1 of the query kernel: delta = rowsum(P * dP) / rowsum(P) of the warp's rows in fp32, P
// recomputed from lse and dP = dO V^T, written to a.delta and returned (both lanes of a row hold
// it). That is rowsum(dO * O) without the rounding of O (or of P) to the input dtype, which the
// logit-scale gradient, a sum of dS * q.k over every window scaled by up to 100, magnifies several
// times over; dividing by rowsum(P) cancels the rounding of lse, which is as large as the logits.
template <class Policy, typename T, int D>
__device__ float recompute_delta(const Policy& policy, const TileArgs<T>& a, unsigned char* smem, const Layout& l,
                                 int64_t group, int h, float alpha, int tile0) {
  const int warp = threadIdx.x / 32;
  float* score = warp_region<float>(smem, l, l.score, warp);
  float* dp = warp_region<float>(smem, l, l.dp, warp);
  T* prob = warp_region<T>(smem, l, l.prob, warp);
  const int row0 = warp * kWarpRows;
  const LaneRow lr;
  float p_dp = 0.0f;
  float p_sum = 0.0f;
  for (int key0 = 0; key0 < a.n; key0 += kTile) {
    int64_t* k_pixel = region<int64_t>(smem, l.k_pixel);
    load_part<Policy, T, D>(policy, a, group, h, key0, 1, k_pixel, region<int32_t>(smem, l.k_tag),
                            region<T>(smem, l.k), region<float>(smem, l.k_norm));
    load_tile<T, D>(region<T>(smem, l.v), a.qkv, 3 * static_cast<int64_t>(a.channels),
                    2 * static_cast<int64_t>(a.channels) + static_cast<int64_t>(h) * a.head_dim, a.head_dim, k_pixel,
                    a.fill, a.vectorized);
    __syncthreads();
    warp_scores<T, D>(region<T>(smem, l.q) + row0 * ld_tile<D>(), region<T>(smem, l.k), score);
    warp_scores<T, D>(region<T>(smem, l.dout) + row0 * ld_tile<D>(), region<T>(smem, l.v), dp);
    probabilities(policy, a, group, h, alpha, tile0 + row0, key0, false, region<int32_t>(smem, l.q_tag) + row0,
                  region<int32_t>(smem, l.k_tag), region<float>(smem, l.lse) + row0, score, prob);
    p_dp += half_row_dot(score, dp);
    for (int c = lr.first_column(kTile); c < lr.first_column(kTile) + kTile / 2; ++c) {
      p_sum += score[lr.r * kLdScore + c];
    }
  }
  p_dp = pair_sum(p_dp);
  p_sum = pair_sum(p_sum);
  const float delta = p_sum > 0.0f ? p_dp / p_sum : 0.0f;
  const int i = tile0 + row0 + lr.r;
  if (lr.half == 0 && i < a.n) {
    a.delta[(group * a.heads + h) * a.n + i] = delta;
  }
  return delta;
}

// Backward, query side: delta, dQ and the reduced gradients of query tile blockIdx.y of head
// blockIdx.z; partial holds [table_rows] bias table, [head_dim] q part of qkv_bias, [1] logit scale.
template <class Policy, typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_query_kernel(const Policy policy, const TileArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout l = Layout::make<D, T>(Kernel::kQuery, a.partial_width);
  const int h = blockIdx.z;
  const int tile0 = blockIdx.y * kTile;
  const int warp = threadIdx.x / 32;
  const int row0 = warp * kWarpRows;
  const float alpha = a.tau != nullptr ? a.tau[h] : a.scale;
  float* score = warp_region<float>(smem, l, l.score, warp);
  float* dp = warp_region<float>(smem, l, l.dp, warp);
  T* prob = warp_region<T>(smem, l, l.prob, warp);
  float* acc = warp_region<float>(smem, l, l.acc, warp);
  float* partial = warp_region<float>(smem, l, l.partial, warp);
  float* delta_tile = region<float>(smem, l.delta);
  const T* q_warp = region<T>(smem, l.q) + row0 * ld_tile<D>();
  const T* dout_warp = region<T>(smem, l.dout) + row0 * ld_tile<D>();
  zero_partials(a, smem, l);
  for (int64_t group = blockIdx.x; group < a.groups; group += gridDim.x) {
    const int64_t problem = group * a.heads + h;
    int64_t* q_pixel = region<int64_t>(smem, l.q_pixel);
    load_part<Policy, T, D>(policy, a, group, h, tile0, 0, q_pixel, region<int32_t>(smem, l.q_tag),
                            region<T>(smem, l.q), region<float>(smem, l.q_norm));
    load_tile<T, D>(region<T>(smem, l.dout), a.grad_out, a.channels, static_cast<int64_t>(h) * a.head_dim,
                    a.head_dim, q_pixel, nullptr, a.vectorized);
    for (int t = threadIdx.x; t < kTile; t += kThreads) {
      region<float>(smem, l.lse)[t] = tile0 + t < a.n ? a.lse[problem * a.n + tile0 + t] : 0.0f;
    }
    __syncthreads();
    const float delta = recompute_delta<Policy, T, D>(policy, a, smem, l, group, h, alpha, tile0);
    if (threadIdx.x % 2 == 0) {
      delta_tile[row0 + threadIdx.x % 32 / 2] = delta;
    }
    zero_accumulator<D>(acc);
    float logit_row = 0.0f;  // cosine attention: sum of dS * q.k over the lane's half of its row
    for (int key0 = 0; key0 < a.n; key0 += kTile) {
      int64_t* k_pixel = region<int64_t>(smem, l.k_pixel);
      load_part<Policy, T, D>(policy, a, group, h, key0, 1, k_pixel, region<int32_t>(smem, l.k_tag),
                              region<T>(smem, l.k), region<float>(smem, l.k_norm));
      load_tile<T, D>(region<T>(smem, l.v), a.qkv, 3 * static_cast<int64_t>(a.channels),
                      2 * static_cast<int64_t>(a.channels) + static_cast<int64_t>(h) * a.head_dim, a.head_dim,
                      k_pixel, a.fill, a.vectorized);
      __syncthreads();
      warp_scores<T, D>(q_warp, region<T>(smem, l.k), score);
      warp_scores<T, D>(dout_warp, region<T>(smem, l.v), dp);
      probabilities(policy, a, group, h, alpha, tile0 + row0, key0, false, region<int32_t>(smem, l.q_tag) + row0,
                    region<int32_t>(smem, l.k_tag), region<float>(smem, l.lse) + row0, score, prob);
      score_gradient(score, dp, prob, false, delta_tile + row0);
      bias_gradient(policy, group, h, a.n, tile0 + row0, key0, dp, partial);
      if (a.tau != nullptr) {
        // q.k once more (score holds P by now): the logit-scale gradient sums dS * q.k in fp32, not
        // q . dQ, whose dS went through the input dtype on its way into the tensor cores.
        warp_scores<T, D>(q_warp, region<T>(smem, l.k), score);
        logit_row += half_row_dot(dp, score);
      }
      warp_accumulate<T, D>(prob, region<T>(smem, l.k), acc);
    }
    finish_gradient<T, D>(acc, q_warp, region<float>(smem, l.q_norm) + row0, alpha, a.tau != nullptr);
    if (a.tau != nullptr) {
      const float logit_grad =
          alpha * warp_rows_total(pair_sum(logit_row), warp_region<float>(smem, l, l.row_dot, warp));
      if (threadIdx.x % 32 == 0) {
        partial[a.table_rows + a.head_dim] += logit_grad;
      }
    }
    store_gradient<T, D>(a, acc, q_pixel + row0, static_cast<int64_t>(h) * a.head_dim,
                         a.fill != nullptr ? partial + a.table_rows : nullptr);
  }
  write_partials(a, smem, l);
}

// Backward, key side: dK and dV of key tile blockIdx.y of head blockIdx.z, from delta; partial
// holds the k and v parts of the qkv_bias gradient ([head_dim] each).
template <class Policy, typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_key_kernel(const Policy policy, const TileArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout l = Layout::make<D, T>(Kernel::kKey, a.partial_width);
  const int h = blockIdx.z;
  const int key0 = blockIdx.y * kTile;
  const int warp = threadIdx.x / 32;
  const int row0 = warp * kWarpRows;
  const float alpha = a.tau != nullptr ? a.tau[h] : a.scale;
  float* score = warp_region<float>(smem, l, l.score, warp);
  float* dp = warp_region<float>(smem, l, l.dp, warp);
  T* prob = warp_region<T>(smem, l, l.prob, warp);
  float* dk = warp_region<float>(smem, l, l.acc, warp);
  float* dv = warp_region<float>(smem, l, l.acc2, warp);
  float* partial = warp_region<float>(smem, l, l.partial, warp);
  const T* k_warp = region<T>(smem, l.k) + row0 * ld_tile<D>();
  const T* v_warp = region<T>(smem, l.v) + row0 * ld_tile<D>();
  int64_t* k_pixel = region<int64_t>(smem, l.k_pixel);
  int64_t* q_pixel = region<int64_t>(smem, l.q_pixel);
  zero_partials(a, smem, l);
  for (int64_t group = blockIdx.x; group < a.groups; group += gridDim.x) {
    const int64_t problem = group * a.heads + h;
    load_part<Policy, T, D>(policy, a, group, h, key0, 1, k_pixel, region<int32_t>(smem, l.k_tag),
                            region<T>(smem, l.k), region<float>(smem, l.k_norm));
    load_tile<T, D>(region<T>(smem, l.v), a.qkv, 3 * static_cast<int64_t>(a.channels),
                    2 * static_cast<int64_t>(a.channels) + static_cast<int64_t>(h) * a.head_dim, a.head_dim, k_pixel,
                    a.fill, a.vectorized);
    zero_accumulator<D>(dk);
    zero_accumulator<D>(dv);
    for (int q0 = 0; q0 < a.n; q0 += kTile) {
      load_part<Policy, T, D>(policy, a, group, h, q0, 0, q_pixel, region<int32_t>(smem, l.q_tag),
                              region<T>(smem, l.q), region<float>(smem, l.q_norm));
      load_tile<T, D>(region<T>(smem, l.dout), a.grad_out, a.channels, static_cast<int64_t>(h) * a.head_dim,
                      a.head_dim, q_pixel, nullptr, a.vectorized);
      load_row_stats(a.lse, a.delta, problem, q0, a.n, region<float>(smem, l.lse), region<float>(smem, l.delta));
      __syncthreads();
      warp_scores<T, D>(k_warp, region<T>(smem, l.q), score);
      probabilities(policy, a, group, h, alpha, key0 + row0, q0, true, region<int32_t>(smem, l.k_tag) + row0,
                    region<int32_t>(smem, l.q_tag), region<float>(smem, l.lse), score, prob);
      warp_accumulate<T, D>(prob, region<T>(smem, l.dout), dv);
      warp_scores<T, D>(v_warp, region<T>(smem, l.dout), dp);
      score_gradient(score, dp, prob, true, region<float>(smem, l.delta));
      warp_accumulate<T, D>(prob, region<T>(smem, l.q), dk);
    }
    finish_gradient<T, D>(dk, k_warp, region<float>(smem, l.k_norm) + row0, alpha, a.tau != nullptr);
    const int64_t column = static_cast<int64_t>(h) * a.head_dim;
    const bool sums = a.fill != nullptr && a.partial != nullptr;
    store_gradient<T, D>(a, dk, k_pixel + row0, a.channels + column, sums ? partial : nullptr);
    store_gradient<T, D>(a, dv, k_pixel + row0, 2 * static_cast<int64_t>(a.channels) + column,
                         sums ? partial + a.head_dim : nullptr);
  }
  write_partials(a, smem, l);
}


// --- Host side -----------------------------------------------------------------------------------

// Head dims up to this are computed, zero-padded to the kernel's D of 32 or 64.
constexpr int64_t kMaxHeadDim = 64;
// Backward grids aim at this many CTAs; each walks groups / gridDim.x problems, so the partial
// sums of the reduced gradients stay small (gridDim.x * tiles slots per head).
constexpr int64_t kTargetCtas = 2048;

// Refuses problems whose N or head count exceed the grid (N / 64 tiles in gridDim.y, heads in
// gridDim.z), on the int64 sizes before TileArgs narrows them to int.
inline void check_grid_size(int64_t n, int64_t heads) {
  TORCH_CHECK(n <= int64_t{65535} * kTile && heads <= 65535,
              "attention problem too large for the cuda kernels' grid: N=", n, ", heads=", heads);
}

// Refuses what the kernels do not compute, naming the value.
inline void check_tile_support(const at::Tensor& qkv, int64_t head_dim) {
  TORCH_CHECK(qkv.scalar_type() == at::kHalf || qkv.scalar_type() == at::kBFloat16,
              "the cuda attention kernels compute float16 and bfloat16 inputs (tensor cores) only, got qkv of dtype ",
              qkv.scalar_type());
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "the cuda attention kernels support head_dim 1 to ",
              kMaxHeadDim, ", got ", head_dim);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}, std::integral_constant<int, D>{}) for the CUDA type of `dtype` (fp16 or
// bf16, checked before) and the smallest kernel head dim D that holds head_dim.
template <class F>
void dispatch_tile(at::ScalarType dtype, int64_t head_dim, F&& f) {
  auto by_dim = [&](auto type) {
    if (head_dim <= 32) {
      f(type, std::integral_constant<int, 32>{});
    } else {
      f(type, std::integral_constant<int, 64>{});
    }
  };
  if (dtype == at::kHalf) {
    by_dim(TypeTag<__half>{});
  } else {
    by_dim(TypeTag<__nv_bfloat16>{});
  }
}

// 16-byte loads are safe when every row and head offset is a multiple of 8 elements and the base
// pointers are 16-byte aligned.
inline bool vectorizable(int64_t channels, int64_t head_dim, const void* qkv, const void* grad_out) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return channels % 8 == 0 && head_dim % 8 == 0 && aligned(qkv) && (grad_out == nullptr || aligned(grad_out));
}

inline int64_t tiles_of(int64_t n) { return (n + kTile - 1) / kTile; }

// Problems per CTA column of a backward grid: enough CTAs to fill the GPU, and a fixed count for
// given shapes, so the partial sums are reproducible.
inline int64_t backward_chunks(int64_t groups, int64_t n, int64_t heads) {
  const int64_t per_group = tiles_of(n) * heads;
  return std::max<int64_t>(1, std::min(groups, (kTargetCtas + per_group - 1) / per_group));
}

template <typename T, int D, class Policy>
auto kernel_entry(Kernel kernel) -> void (*)(const Policy, const TileArgs<T>) {
  switch (kernel) {
    case Kernel::kForward:
      return attention_fwd_kernel<Policy, T, D>;
    case Kernel::kQuery:
      return attention_bwd_query_kernel<Policy, T, D>;
    default:
      return attention_bwd_key_kernel<Policy, T, D>;
  }
}

// Launches `kernel` over grid (chunks, tiles of N, heads) with the shared memory its layout needs,
// opting in above 48 KB; refuses shapes whose layout exceeds the device's opt-in limit.
template <typename T, int D, class Policy>
void launch_tiles(Kernel kernel, const Policy& policy, const TileArgs<T>& a, int64_t chunks, cudaStream_t stream) {
  check_grid_size(a.n, a.heads);
  TORCH_CHECK(chunks <= int64_t{INT32_MAX}, "attention problem too large for the cuda kernels' grid: ", chunks,
              " problems per head");
  const Layout layout = Layout::make<D, T>(kernel, a.partial_width);
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  TORCH_CHECK(layout.total <= static_cast<size_t>(limit), "the cuda attention kernel needs ", layout.total,
              " bytes of shared memory for these shapes (the bias-table gradient of a large window), more than the ",
              limit, " this device allows");
  void (*entry)(const Policy, const TileArgs<T>) = kernel_entry<T, D, Policy>(kernel);
  C10_CUDA_CHECK(cudaFuncSetAttribute(entry, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(layout.total)));
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(tiles_of(a.n)), static_cast<unsigned>(a.heads));
  entry<<<grid, kThreads, layout.total, stream>>>(policy, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attention_tile
}  // namespace vitkernels
