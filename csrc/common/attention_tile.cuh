// Flash-style attention tiles for the CUDA kernels of window attention (Swin, SwinV2) and global
// attention (ViT): the device building blocks (shared-memory layout, WMMA products, tile loads,
// softmax and gradient steps) of the kernels in common/attention_kernels.cuh, which are written
// once and specialized by a token policy that says where token t of a problem lives in memory and
// what is added to its logits.
//
// Schedule. A CTA of 4 warps owns a 64-row tile of one attention problem (one image or window,
// one head) and loops over the 64-column tiles of the other side; each warp owns 16 rows, so a
// 49-token Swin window costs one 64x64 tile (77% useful), not two 64-row blocks. Q, K, V, dO tiles
// are staged in shared memory in the input dtype; a head_dim below the kernel's D is zero-padded
// there, which changes no dot product. Logits are never written to global memory.
//
// Tensor cores through WMMA (16x16x16, fp16/bf16 in, fp32 accumulate). The scores and the output
// accumulators are staged through shared memory after every product: the softmax, bias, mask and
// rescaling work on plain row-major fp32 arrays instead of on the opaque fragment layouts, which is
// simpler to get right than register-level mma.sync layouts, at some shared-memory traffic.
//
// Backward without atomics: the query kernel recomputes P from the saved lse to get
// delta = rowsum(P * dP) / rowsum(P) (rowsum(dO * O) without O's rounding), then dQ = dS K and the
// bias gradient; the key kernel (key tile per CTA,
// looping over query tiles) computes dK = dS^T Q and dV = P^T dO. Reduced gradients (the bias table,
// qkv_bias, logit_scale) go to per-CTA, per-warp partial sums in a fixed order; a CTA walks a fixed
// set of problems, so the partials, and their fixed-order sum by a second small kernel, are deterministic.
#pragma once

#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace vitkernels {
namespace attention_tile {

constexpr int kTile = 64;  // rows of a query tile and of a key tile
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = kTile / kWarps;  // 16: one WMMA row block per warp
constexpr int kLdScore = kTile + 4;        // fp32 [16, 64] score rows, padded against bank conflicts
constexpr int kLdProb = kTile + 8;         // 16-bit [16, 64] probability rows
constexpr float kNormalizeEps = 1e-12f;    // F.normalize's eps, as the CPU kernels use

// Token pixels: a row of the qkv map, or one of these.
constexpr int64_t kPadding = -1;  // padding of the window frame: holds qkv_bias as q, k, v
constexpr int64_t kOutside = -2;  // beyond the problem's N tokens: zeros, never stored

template <int D>
constexpr int ld_tile() {
  return D + 8;
}
template <int D>
constexpr int ld_acc() {
  return D + 4;
}

__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ T from_float(float x);
template <>
__device__ inline __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// What the three kernels read and write; pointers not used by a kernel are null. Rows of qkv,
// grad_out and the outputs are the policy's token pixels.
template <typename T>
struct TileArgs {
  const T* qkv;       // [pixels, 3C]
  const T* grad_out;  // [pixels, C]
  T* out;             // forward: out [pixels, C]; backward: dqkv [pixels, 3C]
  float* lse;         // [groups * heads, N]
  float* delta;       // [groups * heads, N] rowsum(P * dP) / rowsum(P), written by the query kernel
  float* partial;     // [heads, gridDim.y * gridDim.x, partial_width] per-CTA sums, or null
  const float* fill;  // [3C] q, k, v of padding tokens, or null (zeros)
  const float* tau;   // [heads] cosine attention temperature, or null (then scale)
  float scale;
  int64_t groups;  // images (global) or images * windows
  int n, heads, head_dim, channels;
  int table_rows;     // rows of the bias-table gradient in each partial (0 without)
  int partial_width;  // query kernel: table_rows + head_dim + 1; key kernel: 2 * head_dim
  bool vectorized;    // 16-byte loads are aligned: pointers, strides and head offsets
};

// Byte offsets of one kernel's shared memory; the host sizes the launch with the same code.
enum class Kernel { kForward, kQuery, kKey };

struct Layout {
  size_t q_pixel = 0, q_tag = 0, k_pixel = 0, k_tag = 0, q_norm = 0, k_norm = 0, lse = 0, delta = 0;
  size_t q = 0, k = 0, v = 0, dout = 0;
  size_t score = 0, dp = 0, prob = 0, acc = 0, acc2 = 0, partial = 0, row_dot = 0;
  size_t warp_bytes = 0, total = 0;

  C10_HOST_DEVICE static size_t carve(size_t& at, size_t bytes) {
    const size_t offset = at;
    at = (at + bytes + 127) / 128 * 128;
    return offset;
  }

  template <int D, typename T>
  C10_HOST_DEVICE static Layout make(Kernel kernel, int partial_width) {
    Layout l;
    size_t at = 0;
    const size_t tile = sizeof(T) * kTile * ld_tile<D>();
    l.q_pixel = carve(at, sizeof(int64_t) * kTile);
    l.k_pixel = carve(at, sizeof(int64_t) * kTile);
    l.q_tag = carve(at, sizeof(int32_t) * kTile);
    l.k_tag = carve(at, sizeof(int32_t) * kTile);
    l.q_norm = carve(at, sizeof(float) * kTile);
    l.k_norm = carve(at, sizeof(float) * kTile);
    l.lse = carve(at, sizeof(float) * kTile);
    l.delta = carve(at, sizeof(float) * kTile);
    l.q = carve(at, tile);
    l.k = carve(at, tile);
    l.v = carve(at, tile);
    l.dout = carve(at, kernel == Kernel::kForward ? 0 : tile);
    // One warp's working set; warp w's copy starts at offset + w * warp_bytes.
    size_t w = 0;
    const size_t acc = sizeof(float) * kWarpRows * ld_acc<D>();
    l.score = carve(w, sizeof(float) * kWarpRows * kLdScore);
    l.dp = carve(w, kernel == Kernel::kForward ? 0 : sizeof(float) * kWarpRows * kLdScore);
    l.prob = carve(w, sizeof(T) * kWarpRows * kLdProb);
    l.acc = carve(w, acc);
    l.acc2 = carve(w, kernel == Kernel::kKey ? acc : 0);
    l.row_dot = carve(w, sizeof(float) * kWarpRows);
    l.partial = carve(w, kernel == Kernel::kForward ? 0 : sizeof(float) * partial_width);
    l.warp_bytes = w;
    const size_t warps = carve(at, w * kWarps);
    l.score += warps;
    l.dp += warps;
    l.prob += warps;
    l.acc += warps;
    l.acc2 += warps;
    l.row_dot += warps;
    l.partial += warps;
    l.total = at;
    return l;
  }
};

// Typed pointer to a region of shared memory, `warp`'s copy for per-warp regions.
template <typename P>
__device__ inline P* region(unsigned char* smem, size_t offset) {
  return reinterpret_cast<P*>(smem + offset);
}
template <typename P>
__device__ inline P* warp_region(unsigned char* smem, const Layout& l, size_t offset, int warp) {
  return reinterpret_cast<P*>(smem + offset + static_cast<size_t>(warp) * l.warp_bytes);
}

namespace wmma = nvcuda::wmma;

// s[16, 64] = a[16, D] b[64, D]^T: a warp's scores against a 64-row tile, both row-major.
template <typename T, int D>
__device__ void warp_scores(const T* a, const T* b, float* s) {
#pragma unroll
  for (int n = 0; n < kTile / 16; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a + k * 16, ld_tile<D>());
      wmma::load_matrix_sync(fb, b + n * 16 * ld_tile<D>() + k * 16, ld_tile<D>());
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(s + n * 16, acc, kLdScore, wmma::mem_row_major);
  }
  __syncwarp();
}

// c[16, D] += p[16, 64] b[64, D]: a warp's probabilities (or dS) times a 64-row tile.
template <typename T, int D>
__device__ void warp_accumulate(const T* p, const T* b, float* c) {
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, c + n * 16, ld_acc<D>(), wmma::mem_row_major);
#pragma unroll
    for (int k = 0; k < kTile / 16; ++k) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, p + k * 16, kLdProb);
      wmma::load_matrix_sync(fb, b + k * 16 * ld_tile<D>() + n * 16, ld_tile<D>());
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + n * 16, acc, ld_acc<D>(), wmma::mem_row_major);
  }
  __syncwarp();
}

// Tokens first .. first + 63 of problem `group`: pixel and tag, kOutside past N. Block-wide.
template <class Policy>
__device__ void load_tokens(const Policy& policy, int64_t group, int first, int n, int64_t* pixel, int32_t* tag) {
  for (int t = threadIdx.x; t < kTile; t += kThreads) {
    const int token = first + t;
    if (token < n) {
      const auto info = policy.token(group, token);
      pixel[t] = info.pixel;
      tag[t] = info.tag;
    } else {
      pixel[t] = kOutside;
      tag[t] = 0;
    }
  }
}

// lse and delta of queries first .. first + 63 (zeros past N), for the key kernel. Block-wide.
__device__ inline void load_row_stats(const float* lse, const float* delta, int64_t problem, int first, int n,
                                      float* lse_tile, float* delta_tile) {
  for (int t = threadIdx.x; t < kTile; t += kThreads) {
    const int token = first + t;
    const bool inside = token < n;
    lse_tile[t] = inside ? lse[problem * n + token] : 0.0f;
    delta_tile[t] = inside ? delta[problem * n + token] : 0.0f;
  }
}

// dst[t, e] = src[pixel[t] * row_stride + column + e] for e < width, zeros for e >= width (up to
// D) and outside tokens, fill[column + e] (or zeros) for padding tokens. Block-wide.
template <typename T, int D>
__device__ void load_tile(T* dst, const T* src, int64_t row_stride, int64_t column, int width, const int64_t* pixel,
                          const float* fill, bool vectorized) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < kTile * kChunks; idx += kThreads) {
    const int row = idx / kChunks;
    const int e0 = idx % kChunks * 8;
    T* to = dst + row * ld_tile<D>() + e0;
    const int64_t p = pixel[row];
    if (p >= 0 && vectorized && e0 + 8 <= width) {
      *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(src + p * row_stride + column + e0);
      continue;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int c = e0 + e;
      float value = 0.0f;
      if (c < width && p >= 0) {
        value = to_float(src[p * row_stride + column + c]);
      } else if (c < width && p == kPadding && fill != nullptr) {
        value = fill[column + c];
      }
      to[e] = from_float<T>(value);
    }
  }
}

// F.normalize of each row of a tile, in place, keeping the norms (cosine attention). Block-wide.
template <typename T, int D>
__device__ void normalize_tile(T* tile, float* norm) {
  for (int row = threadIdx.x; row < kTile; row += kThreads) {
    T* x = tile + row * ld_tile<D>();
    float squares = 0.0f;
#pragma unroll 8
    for (int e = 0; e < D; ++e) {
      const float v = to_float(x[e]);
      squares += v * v;
    }
    norm[row] = sqrtf(squares);
    const float inv = 1.0f / fmaxf(norm[row], kNormalizeEps);
#pragma unroll 8
    for (int e = 0; e < D; ++e) {
      x[e] = from_float<T>(to_float(x[e]) * inv);
    }
  }
}

// Loads the tile of `first`'s tokens of one of q, k, v (part 0, 1, 2) and normalizes it for
// cosine attention. Starts and ends with a block barrier.
template <class Policy, typename T, int D>
__device__ void load_part(const Policy& policy, const TileArgs<T>& a, int64_t group, int h, int first, int part,
                          int64_t* pixel, int32_t* tag, T* tile, float* norm) {
  __syncthreads();
  load_tokens(policy, group, first, a.n, pixel, tag);
  __syncthreads();
  load_tile<T, D>(tile, a.qkv, 3 * static_cast<int64_t>(a.channels),
                  static_cast<int64_t>(part) * a.channels + static_cast<int64_t>(h) * a.head_dim, a.head_dim, pixel,
                  a.fill, a.vectorized);
  __syncthreads();
  if (a.tau != nullptr && part != 2) {
    normalize_tile<T, D>(tile, norm);
    __syncthreads();
  }
}

// The logit of query i and key j (both inside the problem) from the raw score q.k.
template <class Policy>
__device__ inline float logit(const Policy& policy, float score, float alpha, int64_t group, int h, int i, int j,
                              int32_t tag_i, int32_t tag_j) {
  return alpha * score + policy.logit_bias(group, h, i, j, tag_i, tag_j);
}

// The row and column half of a warp's [16, 64] score block that a lane owns in the softmax steps.
struct LaneRow {
  int r, half;
  __device__ LaneRow() : r(threadIdx.x % 32 / 2), half(threadIdx.x % 2) {}
  __device__ int first_column(int columns) const { return half * columns / 2; }
};

__device__ inline float pair_max(float x) { return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1)); }
__device__ inline float pair_sum(float x) { return x + __shfl_xor_sync(0xffffffffu, x, 1); }

// Zeroes a warp's [16, D] accumulator once every lane is done reading it.
template <int D>
__device__ void zero_accumulator(float* acc) {
  __syncwarp();
  for (int idx = threadIdx.x % 32; idx < kWarpRows * ld_acc<D>(); idx += 32) {
    acc[idx] = 0.0f;
  }
  __syncwarp();
}

// Running state of a lane's row across key tiles: max and sum of exp.
struct SoftmaxRow {
  float max = -INFINITY;
  float sum = 0.0f;
};

// One key tile of the forward's online softmax for a warp: logits from the scores, probabilities
// into prob, the output accumulator rescaled to the new running max.
template <class Policy, typename T, int D>
__device__ void online_softmax(const Policy& policy, const TileArgs<T>& a, int64_t group, int h, float alpha, int i,
                               int32_t tag_i, int key0, const int32_t* k_tag, float* score, T* prob, float* acc,
                               SoftmaxRow& state) {
  const LaneRow lr;
  float* s = score + lr.r * kLdScore;
  float tile_max = -INFINITY;
  for (int c = lr.first_column(kTile); c < lr.first_column(kTile) + kTile / 2; ++c) {
    const int j = key0 + c;
    const float x = j >= a.n ? -INFINITY
                   : i < a.n ? logit(policy, s[c], alpha, group, h, i, j, tag_i, k_tag[c])
                             : alpha * s[c];
    s[c] = x;
    tile_max = fmaxf(tile_max, x);
  }
  const float new_max = fmaxf(state.max, pair_max(tile_max));
  const float shift = new_max == -INFINITY ? 0.0f : new_max;
  const float rescale = __expf(state.max - shift);
  float tile_sum = 0.0f;
  for (int c = lr.first_column(kTile); c < lr.first_column(kTile) + kTile / 2; ++c) {
    const float p = __expf(s[c] - shift);
    tile_sum += p;
    prob[lr.r * kLdProb + c] = from_float<T>(p);
  }
  state.sum = state.sum * rescale + pair_sum(tile_sum);
  state.max = new_max;
  for (int c = lr.first_column(D); c < lr.first_column(D) + D / 2; ++c) {
    acc[lr.r * ld_acc<D>() + c] *= rescale;
  }
  __syncwarp();
}

// P = exp(logit - lse) of a warp's [16, 64] block in place in s, and in the input dtype in prob;
// zero outside the problem. `transposed`: rows are keys and columns queries (the key kernel).
template <class Policy, typename T>
__device__ void probabilities(const Policy& policy, const TileArgs<T>& a, int64_t group, int h, float alpha,
                              int row0, int col0, bool transposed, const int32_t* row_tag, const int32_t* col_tag,
                              const float* lse_tile, float* s, T* prob) {
  const LaneRow lr;
  const int row = row0 + lr.r;
  for (int c = lr.first_column(kTile); c < lr.first_column(kTile) + kTile / 2; ++c) {
    const int col = col0 + c;
    const int i = transposed ? col : row;
    const int j = transposed ? row : col;
    const int32_t tag_i = transposed ? col_tag[c] : row_tag[lr.r];
    const int32_t tag_j = transposed ? row_tag[lr.r] : col_tag[c];
    const float lse = transposed ? lse_tile[c] : lse_tile[lr.r];
    float& x = s[lr.r * kLdScore + c];
    x = i < a.n && j < a.n ? __expf(logit(policy, x, alpha, group, h, i, j, tag_i, tag_j) - lse) : 0.0f;
    prob[lr.r * kLdProb + c] = from_float<T>(x);
  }
  __syncwarp();
}

// dS = P * (dP - delta) in place in dp, and in the input dtype in prob.
template <typename T>
__device__ void score_gradient(const float* p, float* dp, T* prob, bool transposed, const float* delta_tile) {
  const LaneRow lr;
  for (int c = lr.first_column(kTile); c < lr.first_column(kTile) + kTile / 2; ++c) {
    const int at = lr.r * kLdScore + c;
    dp[at] = p[at] * (dp[at] - (transposed ? delta_tile[c] : delta_tile[lr.r]));
    prob[lr.r * kLdProb + c] = from_float<T>(dp[at]);
  }
  __syncwarp();
}

// Row r of a warp's [16, D] accumulator dotted with row r of a tile, over the lane pair.
template <typename T, int D>
__device__ float row_dot(const float* acc, const T* tile_row) {
  const LaneRow lr;
  float sum = 0.0f;
  for (int c = lr.first_column(D); c < lr.first_column(D) + D / 2; ++c) {
    sum += acc[lr.r * ld_acc<D>() + c] * to_float(tile_row[c]);
  }
  return pair_sum(sum);
}

// acc <- alpha * acc, then (cosine attention) the backward of F.normalize from the normalized
// rows x_hat and their norms.
template <typename T, int D>
__device__ void finish_gradient(float* acc, const T* x_hat, const float* norm, float alpha, bool cosine) {
  const LaneRow lr;
  for (int c = lr.first_column(D); c < lr.first_column(D) + D / 2; ++c) {
    acc[lr.r * ld_acc<D>() + c] *= alpha;
  }
  __syncwarp();
  if (!cosine) {
    return;
  }
  const T* x = x_hat + lr.r * ld_tile<D>();
  const float along = row_dot<T, D>(acc, x);
  const float inv = 1.0f / fmaxf(norm[lr.r], kNormalizeEps);
  const float radial = norm[lr.r] > kNormalizeEps ? along : 0.0f;
  for (int c = lr.first_column(D); c < lr.first_column(D) + D / 2; ++c) {
    float& g = acc[lr.r * ld_acc<D>() + c];
    g = (g - to_float(x[c]) * radial) * inv;
  }
  __syncwarp();
}

// sum_c a[r, c] b[r, c] over the lane's half of its row r of two fp32 [16, 64] warp blocks; the
// lane pair's halves add up to the row's.
__device__ inline float half_row_dot(const float* a, const float* b) {
  const LaneRow lr;
  float sum = 0.0f;
  for (int c = lr.first_column(kTile); c < lr.first_column(kTile) + kTile / 2; ++c) {
    sum += a[lr.r * kLdScore + c] * b[lr.r * kLdScore + c];
  }
  return sum;
}

// The sum over a warp's 16 rows, in row order, of a value both lanes of each row hold; every lane
// gets it.
__device__ inline float warp_rows_total(float row_value, float* row_values) {
  const LaneRow lr;
  if (lr.half == 0) {
    row_values[lr.r] = row_value;
  }
  __syncwarp();
  float total = 0.0f;
  for (int r = 0; r < kWarpRows; ++r) {
    total += row_values[r];
  }
  __syncwarp();
  return total;
}

// Writes a warp's gradient rows to dqkv at `column`; rows of padding tokens are summed, in row
// order, into sums[e] when sums is not null and dropped otherwise.
template <typename T, int D>
__device__ void store_gradient(const TileArgs<T>& a, const float* acc, const int64_t* pixel, int64_t column,
                               float* sums) {
  const int lane = threadIdx.x % 32;
  for (int r = 0; r < kWarpRows; ++r) {
    const int64_t p = pixel[r];
    for (int c = lane; c < a.head_dim; c += 32) {
      const float g = acc[r * ld_acc<D>() + c];
      if (p >= 0) {
        a.out[p * 3 * a.channels + column + c] = from_float<T>(g);
      } else if (p == kPadding && sums != nullptr) {
        sums[c] += g;
      }
    }
  }
  __syncwarp();
}

// Adds a warp's dS block to the bias gradient, one query row at a time: within a row every key
// maps to its own table row, so the lanes never collide and the order of the sums is fixed.
template <class Policy>
__device__ void bias_gradient(const Policy& policy, int64_t group, int h, int n, int i0, int key0, const float* ds,
                              float* table) {
  const int lane = threadIdx.x % 32;
  for (int r = 0; r < kWarpRows && i0 + r < n; ++r) {
    for (int c = lane; c < kTile && key0 + c < n; c += 32) {
      policy.add_bias_grad(table, group, h, i0 + r, key0 + c, ds[r * kLdScore + c]);
    }
    __syncwarp();
  }
}

// Sums the warps' partials in warp order into this CTA's slot of a.partial. Block-wide.
template <typename T>
__device__ void write_partials(const TileArgs<T>& a, unsigned char* smem, const Layout& l) {
  __syncthreads();
  if (a.partial == nullptr) {
    return;
  }
  const int64_t slot = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t slots = static_cast<int64_t>(gridDim.y) * gridDim.x;
  float* dst = a.partial + (blockIdx.z * slots + slot) * a.partial_width;
  for (int e = threadIdx.x; e < a.partial_width; e += kThreads) {
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      sum += warp_region<float>(smem, l, l.partial, w)[e];
    }
    dst[e] = sum;
  }
}

template <typename T>
__device__ void zero_partials(const TileArgs<T>& a, unsigned char* smem, const Layout& l) {
  for (int e = threadIdx.x; e < kWarps * a.partial_width; e += kThreads) {
    warp_region<float>(smem, l, l.partial, e / a.partial_width)[e % a.partial_width] = 0.0f;
  }
  __syncthreads();
}

}  // namespace attention_tile
}  // namespace vitkernels
