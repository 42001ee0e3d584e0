// Flash-style attention tiles for the CUDA kernels of window attention (Swin, SwinV2) and global
// attention (ViT): the device building blocks (shared-memory layout, tile loads, tensor-core
// products, softmax and gradient steps) of the kernels in common/attention_kernels.cuh, which are
// written once and specialized by a token policy that says where token t of a problem lives in
// memory and what is added to its logits.
//
// Schedule. A CTA of 4 warps owns a 64-row tile of one attention problem (one image or window,
// one head) and loops over the 64-column tiles of the other side; each warp owns 16 rows, so a
// 49-token Swin window costs one 64x64 tile (77% useful), not two 64-row blocks. Q, K, V, dO tiles
// are staged in shared memory in the input dtype, copied from global memory asynchronously
// (cp.async) so that a problem's tiles are in flight together; a head_dim below the kernel's D is
// zero-padded there, which changes no dot product. Logits are never written to global memory.
//
// Every product runs on tensor cores through mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate) on
// fragments that ldmatrix reads from the tiles; scores, probabilities and accumulators stay in
// registers, and the softmax, bias, mask and gradient steps work on the accumulator fragments in
// place (layouts below, before the fragment helpers).
//
// Backward without atomics. One tile: one kernel computes P and dP once and gets every gradient
// from them (attention_bwd_tile_kernel). Larger problems: the query kernel recomputes P from the
// saved lse to get delta = rowsum(P * dP) / rowsum(P) (rowsum(dO * O) without O's rounding), then
// dQ = dS K and the bias gradient; the key kernel (key tile per CTA, looping over query tiles)
// computes dK = dS^T Q and dV = P^T dO. Reduced gradients (the bias table, qkv_bias, logit_scale)
// go to per-CTA, per-warp partial sums in a fixed order; a CTA walks a fixed set of problems, so
// the partials, and their fixed-order sum by a second small kernel, are deterministic.
#pragma once

#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/ptx.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the cuda attention kernels need sm_80 or later (cp.async, mma.sync.m16n8k16); set VITKERNELS_CUDA_ARCHS"
#endif

namespace vitkernels {
namespace attention_tile {

constexpr int kTile = 64;  // rows of a query tile and of a key tile
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = kTile / kWarps;  // 16: one mma row block per warp
constexpr int kLdScore = kTile + 4;        // fp32 [16, 64] score rows, padded against bank conflicts
constexpr int kLdProb = kTile + 8;         // 16-bit [64, 64] P and dS rows (one-tile backward)
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
  float* key_partial;  // one-tile kernel: [heads, gridDim.x, 2 * head_dim] its k and v sums, or null
  const float* fill;  // [3C] q, k, v of padding tokens, or null (zeros)
  const float* tau;   // [heads] cosine attention temperature, or null (then scale)
  float scale;
  int64_t groups;  // images (global) or images * windows
  int n, heads, head_dim, channels;
  int table_rows;     // rows of the bias-table gradient in each partial (0 without)
  int partial_width;  // query and one-tile kernels: table_rows + head_dim + 1; key kernel: 2 * head_dim
  bool vectorized;    // 16-byte loads are aligned: pointers, strides and head offsets
};

// Byte offsets of one kernel's shared memory; the host sizes the launch with the same code.
// kTile is the backward of a problem that fits one tile (N <= 64), query and key side in one.
enum class Kernel { kForward, kQuery, kKey, kTile };

// Floats of a warp's partial sums: the one-tile kernel keeps the key side's beside the query side's.
template <typename T>
C10_HOST_DEVICE int warp_partial_width(Kernel kernel, const TileArgs<T>& a) {
  return kernel == Kernel::kTile ? a.partial_width + 2 * a.head_dim : a.partial_width;
}

struct Layout {
  size_t q_pixel = 0, q_tag = 0, k_pixel = 0, k_tag = 0, q_norm = 0, k_norm = 0, lse = 0, delta = 0;
  size_t q = 0, k = 0, v = 0, dout = 0, p_all = 0, ds_all = 0;
  size_t score = 0, acc = 0, partial = 0;
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
    // The one-tile kernel's P and dS of the whole tile, [64 queries, 64 keys] in the input dtype.
    const bool one_tile = kernel == Kernel::kTile;
    l.p_all = carve(at, one_tile ? sizeof(T) * kTile * kLdProb : 0);
    l.ds_all = carve(at, one_tile ? sizeof(T) * kTile * kLdProb : 0);
    // One warp's working set; warp w's copy starts at offset + w * warp_bytes. Products stay in
    // registers; the backward stages fp32 dS rows (score: the query side's bias-table gradient)
    // and gradient rows (acc: alpha, F.normalize's backward, the padding tokens' sums) in them.
    size_t w = 0;
    const bool backward = kernel != Kernel::kForward;
    l.score = carve(w, backward && kernel != Kernel::kKey ? sizeof(float) * kWarpRows * kLdScore : 0);
    l.acc = carve(w, backward ? sizeof(float) * kWarpRows * ld_acc<D>() : 0);
    l.partial = carve(w, backward ? sizeof(float) * partial_width : 0);
    l.warp_bytes = w;
    const size_t warps = carve(at, w * kWarps);
    l.score += warps;
    l.acc += warps;
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

// A kernel's shared memory as typed pointers; per-warp regions point at the calling warp's copy.
template <typename T>
struct Shared {
  int64_t *q_pixel, *k_pixel;
  int32_t *q_tag, *k_tag;
  float *q_norm, *k_norm, *lse, *delta;
  T *q, *k, *v, *dout, *p_all, *ds_all;
  float *score, *acc, *partial;

  __device__ Shared(unsigned char* smem, const Layout& l)
      : q_pixel(region<int64_t>(smem, l.q_pixel)),
        k_pixel(region<int64_t>(smem, l.k_pixel)),
        q_tag(region<int32_t>(smem, l.q_tag)),
        k_tag(region<int32_t>(smem, l.k_tag)),
        q_norm(region<float>(smem, l.q_norm)),
        k_norm(region<float>(smem, l.k_norm)),
        lse(region<float>(smem, l.lse)),
        delta(region<float>(smem, l.delta)),
        q(region<T>(smem, l.q)),
        k(region<T>(smem, l.k)),
        v(region<T>(smem, l.v)),
        dout(region<T>(smem, l.dout)),
        p_all(region<T>(smem, l.p_all)),
        ds_all(region<T>(smem, l.ds_all)),
        score(warp_region<float>(smem, l, l.score, threadIdx.x / 32)),
        acc(warp_region<float>(smem, l, l.acc, threadIdx.x / 32)),
        partial(warp_region<float>(smem, l, l.partial, threadIdx.x / 32)) {}
};

// --- Register fragments of mma.sync.m16n8k16 ---------------------------------------------------
// With g = lane / 4 and t = lane % 4, a lane holds (PTX ISA, "Matrix Fragments for mma.m16n8k16"):
//   A, 16x16 row-major, four 16-bit pairs: (g, 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..)
//   B, 16x8 (k x n), two 16-bit pairs:    (k 2t..2t+1, n g), (k 2t + 8.., n g)
//   C, 16x8 fp32:                         (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)
// So the C fragments of two adjacent 8-column blocks, rounded to 16 bits, are the A fragment of
// the 16 columns they cover: P goes from the softmax into P V without leaving registers. ldmatrix
// fills these fragments from row-major tiles in shared memory: lane l names row l % 8 of 8x8
// matrix l / 8, and lane l receives matrix j's (row g, columns 2t..2t+1) in register j (with
// .trans, the transposed matrix's).


// Two floats rounded to T in one 32-bit register, lo in the low half (the lower column).
template <typename T>
__device__ uint32_t pack_pair(float lo, float hi);

template <>
__device__ inline uint32_t pack_pair<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ inline uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The A fragments of a warp's 16 rows (from row0) of a [64, D] tile, one per 16 columns.
template <typename T, int D>
__device__ void load_row_fragments(const T* tile, int row0, uint32_t (&a)[D / 16][4]) {
  const int lane = threadIdx.x % 32;
  const T* row = tile + (row0 + lane % 8 + lane / 8 % 2 * 8) * ld_tile<D>() + lane / 16 * 8;
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
    ptx::ldmatrix_x4(a[k], row + k * 16);
  }
}

// s[16, 64] = a b^T for a warp's A fragments (16 rows, D columns) and a row-major [64, D] tile b:
// s[j] is the C fragment of columns 8j .. 8j + 7.
template <typename T, int D>
__device__ void fragment_scores(const uint32_t (&a)[D / 16][4], const T* b, float (&s)[kTile / 8][4]) {
  const int lane = threadIdx.x % 32;
  const T* row = b + (lane % 8 + lane / 16 * 8) * ld_tile<D>() + lane / 8 % 2 * 8;
#pragma unroll
  for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = 0.0f;
    }
  }
#pragma unroll
  for (int j = 0; j < kTile / 8; j += 2) {
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      uint32_t frag[4];  // B fragments of columns 8j .. 8j + 7 and 8j + 8 .. 8j + 15
      ptx::ldmatrix_x4(frag, row + j * 8 * ld_tile<D>() + k * 16);
      ptx::mma_16816<T>(s[j], a[k], frag[0], frag[1]);
      ptx::mma_16816<T>(s[j + 1], a[k], frag[2], frag[3]);
    }
  }
}

// The A fragments (one per 16 columns) of a warp's [16, 64] block held in C-fragment form
// (p[j]: columns 8j .. 8j + 7, as fragment_scores leaves it), rounded to T.
template <typename T>
__device__ void to_row_fragments(const float (&p)[kTile / 8][4], uint32_t (&a)[kTile / 16][4]) {
#pragma unroll
  for (int k = 0; k < kTile / 16; ++k) {
    a[k][0] = pack_pair<T>(p[2 * k][0], p[2 * k][1]);
    a[k][1] = pack_pair<T>(p[2 * k][2], p[2 * k][3]);
    a[k][2] = pack_pair<T>(p[2 * k + 1][0], p[2 * k + 1][1]);
    a[k][3] = pack_pair<T>(p[2 * k + 1][2], p[2 * k + 1][3]);
  }
}

// The A fragments of the transpose of columns col0 .. col0 + 15 of a row-major [64, ld] tile: the
// fragments' 16 rows are those columns, and the tile's 64 rows are the contraction.
template <typename T>
__device__ void load_column_fragments(const T* tile, int ld, int col0, uint32_t (&a)[kTile / 16][4]) {
  const int lane = threadIdx.x % 32;
  const T* row = tile + (lane % 8 + lane / 16 * 8) * ld + col0 + lane / 8 % 2 * 8;
#pragma unroll
  for (int k = 0; k < kTile / 16; ++k) {
    ptx::ldmatrix_x4_trans(a[k], row + k * 16 * ld);
  }
}

// o[16, D] += a[16, 64] b[64, D] for A fragments over 64 contraction rows and a row-major [64, D]
// tile b: o[d] is the C fragment of columns 8d .. 8d + 7.
template <typename T, int D>
__device__ void fragment_accumulate(const uint32_t (&a)[kTile / 16][4], const T* b, float (&o)[D / 8][4]) {
  const int lane = threadIdx.x % 32;
  const T* row = b + (lane % 8 + lane / 8 % 2 * 8) * ld_tile<D>() + lane / 16 * 8;
#pragma unroll
  for (int k = 0; k < kTile / 16; ++k) {
#pragma unroll
    for (int d = 0; d < D / 8; d += 2) {
      uint32_t frag[4];  // B fragments of columns 8d .. 8d + 7 and 8d + 8 .. 8d + 15
      ptx::ldmatrix_x4_trans(frag, row + k * 16 * ld_tile<D>() + d * 8);
      ptx::mma_16816<T>(o[d], a[k], frag[0], frag[1]);
      ptx::mma_16816<T>(o[d + 1], a[k], frag[2], frag[3]);
    }
  }
}

// Writes a warp's C fragments o (16 rows, D columns) to a row-major fp32 [16, ld] array.
template <int D>
__device__ void stage_fragments(const float (&o)[D / 8][4], float* to, int ld) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
#pragma unroll
  for (int d = 0; d < D / 8; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      to[(g + e / 2 * 8) * ld + d * 8 + 2 * t + e % 2] = o[d][e];
    }
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

// A block barrier after which every tile load_tile started is in shared memory.
__device__ inline void sync_tiles() {
  ptx::wait_async_copies();
  __syncthreads();
}

// dst[t, e] = src[pixel[t] * row_stride + column + e] for e < width, zeros for e >= width (up to
// D) and outside tokens, fill[column + e] (or zeros) for padding tokens. Block-wide; the aligned
// 16-byte chunks of token rows are copied asynchronously, so several tiles' loads are in flight at
// once, and dst may be read after the next sync_tiles.
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
      ptx::copy_async_16(to, src + p * row_stride + column + e0);
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

// Loads tokens first .. first + 63 of problem `group` (pixel and tag) and, for each tile that is
// not null, their q, k or v rows (qkv parts 0, 1, 2) or dO rows, with every copy in flight at once;
// normalizes q and k for cosine attention. Starts and ends with a block barrier.
template <class Policy, typename T, int D>
__device__ void load_rows(const Policy& policy, const TileArgs<T>& a, int64_t group, int h, int first, int64_t* pixel,
                          int32_t* tag, T* q, T* k, T* v, T* dout, float* q_norm, float* k_norm) {
  __syncthreads();
  load_tokens(policy, group, first, a.n, pixel, tag);
  __syncthreads();
  const int64_t head = static_cast<int64_t>(h) * a.head_dim;
  T* const parts[3] = {q, k, v};
#pragma unroll
  for (int part = 0; part < 3; ++part) {
    if (parts[part] != nullptr) {
      load_tile<T, D>(parts[part], a.qkv, 3 * static_cast<int64_t>(a.channels),
                      static_cast<int64_t>(part) * a.channels + head, a.head_dim, pixel, a.fill, a.vectorized);
    }
  }
  if (dout != nullptr) {
    load_tile<T, D>(dout, a.grad_out, a.channels, head, a.head_dim, pixel, nullptr, a.vectorized);
  }
  sync_tiles();
  if (a.tau != nullptr && (q != nullptr || k != nullptr)) {
    if (q != nullptr) {
      normalize_tile<T, D>(q, q_norm);
    }
    if (k != nullptr) {
      normalize_tile<T, D>(k, k_norm);
    }
    __syncthreads();
  }
}

// Keys key0 .. key0 + 63 of problem `group`: their tokens, k and v rows to the key side of m.
template <class Policy, typename T, int D>
__device__ void load_keys(const Policy& policy, const TileArgs<T>& a, const Shared<T>& m, int64_t group, int h,
                          int key0) {
  load_rows<Policy, T, D>(policy, a, group, h, key0, m.k_pixel, m.k_tag, nullptr, m.k, m.v, nullptr, nullptr, m.k_norm);
}

// Queries q0 .. q0 + 63 of problem `group`: their tokens, q rows and (with_dout) dO rows to the
// query side of m.
template <class Policy, typename T, int D>
__device__ void load_queries(const Policy& policy, const TileArgs<T>& a, const Shared<T>& m, int64_t group, int h,
                             int q0, bool with_dout) {
  load_rows<Policy, T, D>(policy, a, group, h, q0, m.q_pixel, m.q_tag, m.q, nullptr, nullptr,
                          with_dout ? m.dout : nullptr, m.q_norm, nullptr);
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

__device__ inline float pair_sum(float x) { return x + __shfl_xor_sync(0xffffffffu, x, 1); }

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

// Writes rows r < 16 of a warp's staged [16, ld] block (in T, or fp32 rounded to T), columns below
// width, to rows pixel[r] of out (row_stride apart, from `column`), 8 columns a lane with one
// 16-byte store where `vectorized`; rows of padding and outside tokens are skipped.
template <typename T, int D, typename S>
__device__ void store_rows(T* out, int64_t row_stride, int64_t column, const S* staged, int ld, const int64_t* pixel,
                           int width, bool vectorized) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x % 32; idx < kWarpRows * kChunks; idx += 32) {
    const int r = idx / kChunks;
    const int c0 = idx % kChunks * 8;
    const int64_t p = pixel[r];
    if (p < 0 || c0 >= width) {
      continue;
    }
    const S* from = staged + r * ld + c0;
    T* to = out + p * row_stride + column + c0;
    if constexpr (std::is_same_v<S, float>) {
      if (vectorized && c0 + 8 <= width) {
        *reinterpret_cast<uint4*>(to) = {pack_pair<T>(from[0], from[1]), pack_pair<T>(from[2], from[3]),
                                         pack_pair<T>(from[4], from[5]), pack_pair<T>(from[6], from[7])};
      } else {
        for (int c = 0; c < 8 && c0 + c < width; ++c) {
          to[c] = from_float<T>(from[c]);
        }
      }
    } else if (vectorized && c0 + 8 <= width) {
      *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
    } else {
      for (int c = 0; c < 8 && c0 + c < width; ++c) {
        to[c] = from[c];
      }
    }
  }
}

// Writes a warp's gradient rows to dqkv at `column`; rows of padding tokens are summed, in row
// order, into sums[e] when sums is not null and dropped otherwise.
template <typename T, int D>
__device__ void store_gradient(const TileArgs<T>& a, const float* acc, const int64_t* pixel, int64_t column,
                               float* sums) {
  store_rows<T, D>(a.out, 3 * static_cast<int64_t>(a.channels), column, acc, ld_acc<D>(), pixel, a.head_dim,
                   a.vectorized);
  if (sums != nullptr) {
    for (int r = 0; r < kWarpRows; ++r) {
      if (pixel[r] == kPadding) {
        for (int c = threadIdx.x % 32; c < a.head_dim; c += 32) {
          sums[c] += acc[r * ld_acc<D>() + c];
        }
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

// Sums floats offset .. offset + width - 1 of the warps' partials, in warp order, into this CTA's
// slot of dst ([gridDim.z, slots, width]). Block-wide.
__device__ inline void write_partial_range(float* dst, int width, int offset, unsigned char* smem, const Layout& l) {
  __syncthreads();
  if (dst == nullptr) {
    return;
  }
  const int64_t slot = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t slots = static_cast<int64_t>(gridDim.y) * gridDim.x;
  float* to = dst + (blockIdx.z * slots + slot) * width;
  for (int e = threadIdx.x; e < width; e += kThreads) {
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      sum += warp_region<float>(smem, l, l.partial, w)[offset + e];
    }
    to[e] = sum;
  }
}

template <typename T>
__device__ void write_partials(const TileArgs<T>& a, unsigned char* smem, const Layout& l) {
  write_partial_range(a.partial, a.partial_width, 0, smem, l);
}

// Zeroes the warps' partials of `width` floats each. Block-wide.
__device__ inline void zero_partials(int width, unsigned char* smem, const Layout& l) {
  for (int e = threadIdx.x; e < kWarps * width; e += kThreads) {
    warp_region<float>(smem, l, l.partial, e / width)[e % width] = 0.0f;
  }
  __syncthreads();
}

}  // namespace attention_tile
}  // namespace vitkernels
