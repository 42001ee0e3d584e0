// The forward and backward kernels of window and global attention, on the building blocks of
// common/attention_tile.cuh (whose header comment describes the schedule), and their host-side
// launch: dtype and head-dim dispatch, shared-memory sizing, grid.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/attention_tile.cuh"
#include "common/cuda_utils.cuh"

namespace vitkernels {
namespace attention_tile {

// Forward: out rows and lse of query tile blockIdx.y of head blockIdx.z, for problems
// blockIdx.x, blockIdx.x + gridDim.x, ... A warp keeps its 16 query rows, their scores, the
// running softmax and the output in registers (attention_tile.cuh's fragment layouts): a lane holds
// rows g and g + 8 of the warp (g = lane / 4), columns 2t, 2t + 1 of every 8 (t = lane % 4), so a
// row's max and sum reduce over the 4 lanes of a quad.
template <class Policy, typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const Policy policy, const TileArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout l = Layout::make<D, T>(Kernel::kForward, 0);
  const int h = blockIdx.z;
  const int tile0 = blockIdx.y * kTile;
  const int lane = threadIdx.x % 32;
  const int row0 = threadIdx.x / 32 * kWarpRows;
  const int g = lane / 4;
  const int t = lane % 4;
  const float alpha = a.tau != nullptr ? a.tau[h] : a.scale;
  const Shared<T> m(smem, l);
  const int i[2] = {tile0 + row0 + g, tile0 + row0 + g + 8};  // the lane's two query rows
  // One tile (N <= 64): the keys are the queries' tokens, loaded with them.
  const bool one_tile = a.n <= kTile;
  const int32_t* key_tag = one_tile ? m.q_tag : m.k_tag;
  for (int64_t group = blockIdx.x; group < a.groups; group += gridDim.x) {
    if (one_tile) {
      load_rows<Policy, T, D>(policy, a, group, h, 0, m.q_pixel, m.q_tag, m.q, m.k, m.v, nullptr, m.q_norm, m.k_norm);
    } else {
      load_queries<Policy, T, D>(policy, a, m, group, h, tile0, false);
    }
    uint32_t q[D / 16][4];
    load_row_fragments<T, D>(m.q, row0, q);
    const int32_t tag[2] = {m.q_tag[row0 + g], m.q_tag[row0 + g + 8]};
    float o[D / 8][4] = {};
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};  // the lane's share; the quad's shares add up at the end
    for (int key0 = 0; key0 < a.n; key0 += kTile) {
      if (!one_tile) {
        load_keys<Policy, T, D>(policy, a, m, group, h, key0);
      }
      float s[kTile / 8][4];
      fragment_scores<T, D>(q, m.k, s);
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int jb = 0; jb < kTile / 8; ++jb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = jb * 8 + 2 * t + e % 2;
          const int j = key0 + c;
          const int r = e / 2;
          const float x = j >= a.n ? -INFINITY
                         : i[r] < a.n ? logit(policy, s[jb][e], alpha, group, h, i[r], j, tag[r], key_tag[c])
                                      : alpha * s[jb][e];
          s[jb][e] = x;
          tile_max[r] = fmaxf(tile_max[r], x);
        }
      }
      float shift[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float new_max = fmaxf(row_max[r], tile_max[r]);
        shift[r] = new_max == -INFINITY ? 0.0f : new_max;
        const float rescale = __expf(row_max[r] - shift[r]);
        row_max[r] = new_max;
        row_sum[r] *= rescale;
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
          o[d][2 * r] *= rescale;
          o[d][2 * r + 1] *= rescale;
        }
      }
#pragma unroll
      for (int jb = 0; jb < kTile / 8; ++jb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[jb][e] = __expf(s[jb][e] - shift[e / 2]);
          row_sum[e / 2] += s[jb][e];
        }
      }
      uint32_t prob[kTile / 16][4];
      to_row_fragments<T>(s, prob);
      fragment_accumulate<T, D>(prob, m.v, o);
    }
    // The output in the input dtype, staged in the warp's own rows of the q tile (its Q has been in
    // registers since the first key tile), then stored as 16-byte rows.
    T* staged = m.q + row0 * ld_tile<D>();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
      row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
      const float inv = 1.0f / row_sum[r];
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        *reinterpret_cast<uint32_t*>(staged + (g + 8 * r) * ld_tile<D>() + d * 8 + 2 * t) =
            pack_pair<T>(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
      }
      if (t == 0 && i[r] < a.n) {
        a.lse[(group * a.heads + h) * a.n + i[r]] = row_max[r] + logf(row_sum[r]);
      }
    }
    __syncwarp();
    store_rows<T, D>(a.out, a.channels, static_cast<int64_t>(h) * a.head_dim, staged, ld_tile<D>(), m.q_pixel + row0,
                     a.head_dim, a.vectorized);
  }
}

// P = exp(logit - lse) of a warp's [16, 64] block in C-fragment form from its raw scores s, zero
// outside the problem. Rows are the lane's rows row[r] (tags row_tag[r]), columns col0 + c (tags
// col_tag[c]). Query rows (row_lse: their lse), or with `transposed` key rows against query
// columns (col_lse[c]: the columns' lse).
template <class Policy, typename T>
__device__ void fragment_probabilities(const Policy& policy, const TileArgs<T>& a, int64_t group, int h, float alpha,
                                       const int (&row)[2], const int32_t (&row_tag)[2], int col0,
                                       const int32_t* col_tag, bool transposed, const float (&row_lse)[2],
                                       const float* col_lse, const float (&s)[kTile / 8][4], float (&p)[kTile / 8][4]) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int jb = 0; jb < kTile / 8; ++jb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = jb * 8 + 2 * t + e % 2;
      const int r = e / 2;
      const int col = col0 + c;
      const int i = transposed ? col : row[r];
      const int j = transposed ? row[r] : col;
      const int32_t tag_i = transposed ? col_tag[c] : row_tag[r];
      const int32_t tag_j = transposed ? row_tag[r] : col_tag[c];
      const float lse = transposed ? col_lse[c] : row_lse[r];
      p[jb][e] = i < a.n && j < a.n ? __expf(logit(policy, s[jb][e], alpha, group, h, i, j, tag_i, tag_j) - lse)
                                    : 0.0f;
    }
  }
}

// Adds the lane's share of rowsum(P * dP) and rowsum(P) of its two rows to p_dp and p_sum.
__device__ inline void add_row_sums(const float (&p)[kTile / 8][4], const float (&dp)[kTile / 8][4], float (&p_dp)[2],
                                    float (&p_sum)[2]) {
#pragma unroll
  for (int jb = 0; jb < kTile / 8; ++jb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      p_dp[e / 2] += p[jb][e] * dp[jb][e];
      p_sum[e / 2] += p[jb][e];
    }
  }
}

// delta = rowsum(P * dP) / rowsum(P) of the lane's two rows from the lanes' shares (the quad's
// four lanes hold a row). That is rowsum(dO * O) without the rounding of O (or of P) to the input
// dtype, which the logit-scale gradient, a sum of dS * q.k over every window scaled by up to 100,
// magnifies several times over; dividing by rowsum(P) cancels the rounding of lse, which is as
// large as the logits.
__device__ inline void row_deltas(float (&p_dp)[2], float (&p_sum)[2], float (&delta)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int offset = 1; offset <= 2; offset *= 2) {
      p_dp[r] += __shfl_xor_sync(0xffffffffu, p_dp[r], offset);
      p_sum[r] += __shfl_xor_sync(0xffffffffu, p_sum[r], offset);
    }
    delta[r] = p_sum[r] > 0.0f ? p_dp[r] / p_sum[r] : 0.0f;
  }
}

// One key tile of the query side for a warp's 16 query rows (from i0): dS = P * (dP - delta) in
// place of dP, its bias gradient (through fp32 rows staged in ds_warp), the lane's share of
// sum dS * q.k (cosine attention's logit-scale gradient) in logit_part, and dq += dS K.
template <class Policy, typename T, int D>
__device__ void query_step(const Policy& policy, int64_t group, int h, int n, int i0, int key0,
                           const float (&p)[kTile / 8][4], const float (&s)[kTile / 8][4], const float (&delta)[2],
                           const T* k_tile, float (&dp)[kTile / 8][4], float* ds_warp, float* partial,
                           float& logit_part, float (&dq)[D / 8][4]) {
#pragma unroll
  for (int jb = 0; jb < kTile / 8; ++jb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dp[jb][e] = p[jb][e] * (dp[jb][e] - delta[e / 2]);
      logit_part += dp[jb][e] * s[jb][e];
    }
  }
  stage_fragments<kTile>(dp, ds_warp, kLdScore);
  bias_gradient(policy, group, h, n, i0, key0, ds_warp, partial);
  uint32_t ds[kTile / 16][4];
  to_row_fragments<T>(dp, ds);
  fragment_accumulate<T, D>(ds, k_tile, dq);
}

// Adds alpha * sum dS * q.k over the warp's lanes to the warp's logit-scale partial sum, at
// `slot`. Cosine attention only.
__device__ inline void add_logit_gradient(float logit_part, float alpha, float* slot) {
  const float total = cuda::warp_sum(logit_part);
  if (threadIdx.x % 32 == 0) {
    *slot += alpha * total;
  }
}

// Stores a warp's dQ (dK): alpha and, for cosine attention, the backward of F.normalize applied to
// the fragments staged in acc, then written to dqkv at `column`, padding tokens' rows summed into
// sums (or dropped when null).
template <typename T, int D>
__device__ void store_scaled_gradient(const TileArgs<T>& a, const float (&grad)[D / 8][4], float* acc, const T* x_hat,
                                      const float* norm, float alpha, const int64_t* pixel, int64_t column,
                                      float* sums) {
  stage_fragments<D>(grad, acc, ld_acc<D>());
  finish_gradient<T, D>(acc, x_hat, norm, alpha, a.tau != nullptr);
  store_gradient<T, D>(a, acc, pixel, column, sums);
}

// Backward, query side: delta, dQ and the reduced gradients of query tile blockIdx.y of head
// blockIdx.z, in two passes over the key tiles (delta needs whole rows); partial holds
// [table_rows] bias table, [head_dim] q part of qkv_bias, [1] logit scale.
template <class Policy, typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_query_kernel(const Policy policy, const TileArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout l = Layout::make<D, T>(Kernel::kQuery, a.partial_width);
  const int h = blockIdx.z;
  const int tile0 = blockIdx.y * kTile;
  const int warp = threadIdx.x / 32;
  const int row0 = warp * kWarpRows;
  const int g = threadIdx.x % 32 / 4;
  const float alpha = a.tau != nullptr ? a.tau[h] : a.scale;
  const Shared<T> m(smem, l);
  const int64_t column = static_cast<int64_t>(h) * a.head_dim;
  const int i[2] = {tile0 + row0 + g, tile0 + row0 + g + 8};  // the lane's two query rows
  zero_partials(a.partial_width, smem, l);
  for (int64_t group = blockIdx.x; group < a.groups; group += gridDim.x) {
    const int64_t problem = group * a.heads + h;
    load_queries<Policy, T, D>(policy, a, m, group, h, tile0, true);
    uint32_t q[D / 16][4];
    uint32_t dout[D / 16][4];
    load_row_fragments<T, D>(m.q, row0, q);
    load_row_fragments<T, D>(m.dout, row0, dout);
    float lse[2];
    int32_t tag[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lse[r] = i[r] < a.n ? a.lse[problem * a.n + i[r]] : 0.0f;
      tag[r] = m.q_tag[row0 + g + 8 * r];
    }
    float s[kTile / 8][4];
    float dp[kTile / 8][4];
    float p[kTile / 8][4];
    float p_dp[2] = {0.0f, 0.0f};
    float p_sum[2] = {0.0f, 0.0f};
    for (int key0 = 0; key0 < a.n; key0 += kTile) {
      load_keys<Policy, T, D>(policy, a, m, group, h, key0);
      fragment_scores<T, D>(q, m.k, s);
      fragment_scores<T, D>(dout, m.v, dp);
      fragment_probabilities(policy, a, group, h, alpha, i, tag, key0, m.k_tag, false, lse, nullptr, s, p);
      add_row_sums(p, dp, p_dp, p_sum);
    }
    float delta[2];
    row_deltas(p_dp, p_sum, delta);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (threadIdx.x % 4 == 0 && i[r] < a.n) {
        a.delta[problem * a.n + i[r]] = delta[r];
      }
    }
    float dq[D / 8][4] = {};
    float logit_part = 0.0f;
    for (int key0 = 0; key0 < a.n; key0 += kTile) {
      load_keys<Policy, T, D>(policy, a, m, group, h, key0);
      fragment_scores<T, D>(q, m.k, s);
      fragment_scores<T, D>(dout, m.v, dp);
      fragment_probabilities(policy, a, group, h, alpha, i, tag, key0, m.k_tag, false, lse, nullptr, s, p);
      query_step<Policy, T, D>(policy, group, h, a.n, tile0 + row0, key0, p, s, delta, m.k, dp, m.score, m.partial,
                               logit_part, dq);
    }
    if (a.tau != nullptr) {
      add_logit_gradient(logit_part, alpha, m.partial + a.table_rows + a.head_dim);
    }
    store_scaled_gradient<T, D>(a, dq, m.acc, m.q + row0 * ld_tile<D>(), m.q_norm + row0, alpha,
                                m.q_pixel + row0, column, a.fill != nullptr ? m.partial + a.table_rows : nullptr);
  }
  write_partials(a, smem, l);
}

// Backward, key side: dK and dV of key tile blockIdx.y of head blockIdx.z, from delta; a warp's 16
// key rows against each query tile (S^T = K Q^T, dP^T = V dO^T); partial holds the k and v parts
// of the qkv_bias gradient ([head_dim] each).
template <class Policy, typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_key_kernel(const Policy policy, const TileArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout l = Layout::make<D, T>(Kernel::kKey, a.partial_width);
  const int h = blockIdx.z;
  const int key0 = blockIdx.y * kTile;
  const int warp = threadIdx.x / 32;
  const int row0 = warp * kWarpRows;
  const int g = threadIdx.x % 32 / 4;
  const float alpha = a.tau != nullptr ? a.tau[h] : a.scale;
  const Shared<T> m(smem, l);
  const int64_t column = static_cast<int64_t>(h) * a.head_dim;
  const int j[2] = {key0 + row0 + g, key0 + row0 + g + 8};  // the lane's two key rows
  const float no_lse[2] = {0.0f, 0.0f};
  zero_partials(a.partial_width, smem, l);
  for (int64_t group = blockIdx.x; group < a.groups; group += gridDim.x) {
    const int64_t problem = group * a.heads + h;
    load_keys<Policy, T, D>(policy, a, m, group, h, key0);
    uint32_t k[D / 16][4];
    uint32_t v[D / 16][4];
    load_row_fragments<T, D>(m.k, row0, k);
    load_row_fragments<T, D>(m.v, row0, v);
    const int32_t tag[2] = {m.k_tag[row0 + g], m.k_tag[row0 + g + 8]};
    float dk[D / 8][4] = {};
    float dv[D / 8][4] = {};
    for (int q0 = 0; q0 < a.n; q0 += kTile) {
      load_queries<Policy, T, D>(policy, a, m, group, h, q0, true);
      load_row_stats(a.lse, a.delta, problem, q0, a.n, m.lse, m.delta);
      __syncthreads();
      float st[kTile / 8][4];  // S^T, then P^T
      float dpt[kTile / 8][4];  // dP^T, then dS^T
      fragment_scores<T, D>(k, m.q, st);
      fragment_scores<T, D>(v, m.dout, dpt);
      fragment_probabilities(policy, a, group, h, alpha, j, tag, q0, m.q_tag, true, no_lse, m.lse, st, st);
#pragma unroll
      for (int jb = 0; jb < kTile / 8; ++jb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          dpt[jb][e] = st[jb][e] * (dpt[jb][e] - m.delta[jb * 8 + 2 * (threadIdx.x % 4) + e % 2]);
        }
      }
      uint32_t frag[kTile / 16][4];
      to_row_fragments<T>(st, frag);
      fragment_accumulate<T, D>(frag, m.dout, dv);
      to_row_fragments<T>(dpt, frag);
      fragment_accumulate<T, D>(frag, m.q, dk);
    }
    const bool sums = a.fill != nullptr && a.partial != nullptr;
    store_scaled_gradient<T, D>(a, dk, m.acc, m.k + row0 * ld_tile<D>(), m.k_norm + row0, alpha,
                                m.k_pixel + row0, a.channels + column, sums ? m.partial : nullptr);
    stage_fragments<D>(dv, m.acc, ld_acc<D>());
    store_gradient<T, D>(a, m.acc, m.k_pixel + row0, 2 * static_cast<int64_t>(a.channels) + column,
                         sums ? m.partial + a.head_dim : nullptr);
  }
  write_partials(a, smem, l);
}

// Backward of problems that fit one tile (N <= 64: Swin's 7x7 and 8x8 windows) in one kernel: P and
// dP are computed once, where the two-kernel path computes them three times. A warp first takes 16
// query rows: S = Q K^T and dP = dO V^T, P from lse, delta (whole rows are in the tile), then the
// query side's step (dS, bias gradient, dQ); P and dS of its rows go to shared memory in the input
// dtype. After a block barrier the warp takes 16 keys: dV = P^T dO and dK = dS^T Q, their A
// fragments read transposed by ldmatrix. Partial sums as in the two-kernel path:
// [table rows | q bias | logit scale] to a.partial, [k bias | v bias] to a.key_partial.
template <class Policy, typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_tile_kernel(const Policy policy, const TileArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout l = Layout::make<D, T>(Kernel::kTile, warp_partial_width(Kernel::kTile, a));
  const int h = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int row0 = warp * kWarpRows;
  const int g = threadIdx.x % 32 / 4;
  const int t = threadIdx.x % 4;
  const float alpha = a.tau != nullptr ? a.tau[h] : a.scale;
  const Shared<T> m(smem, l);
  const bool bias_sums = a.fill != nullptr;
  const int64_t column = static_cast<int64_t>(h) * a.head_dim;
  const int i[2] = {row0 + g, row0 + g + 8};  // the lane's two query rows
  zero_partials(warp_partial_width(Kernel::kTile, a), smem, l);
  for (int64_t group = blockIdx.x; group < a.groups; group += gridDim.x) {
    const int64_t problem = group * a.heads + h;
    load_rows<Policy, T, D>(policy, a, group, h, 0, m.q_pixel, m.q_tag, m.q, m.k, m.v, m.dout, m.q_norm, m.k_norm);

    // Query side: the warp's 16 query rows against every key.
    float s[kTile / 8][4];
    float dp[kTile / 8][4];
    {
      uint32_t rows[D / 16][4];
      load_row_fragments<T, D>(m.q, row0, rows);
      fragment_scores<T, D>(rows, m.k, s);
      load_row_fragments<T, D>(m.dout, row0, rows);
      fragment_scores<T, D>(rows, m.v, dp);
    }
    float lse[2];
    int32_t tag[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lse[r] = i[r] < a.n ? a.lse[problem * a.n + i[r]] : 0.0f;
      tag[r] = m.q_tag[i[r]];
    }
    float p[kTile / 8][4];
    fragment_probabilities(policy, a, group, h, alpha, i, tag, 0, m.q_tag, false, lse, nullptr, s, p);
    float p_dp[2] = {0.0f, 0.0f};
    float p_sum[2] = {0.0f, 0.0f};
    add_row_sums(p, dp, p_dp, p_sum);
    float delta[2];
    row_deltas(p_dp, p_sum, delta);
    float dq[D / 8][4] = {};
    float logit_part = 0.0f;
    query_step<Policy, T, D>(policy, group, h, a.n, row0, 0, p, s, delta, m.k, dp, m.score, m.partial, logit_part,
                             dq);
    if (a.tau != nullptr) {
      add_logit_gradient(logit_part, alpha, m.partial + a.table_rows + a.head_dim);
    }
#pragma unroll
    for (int jb = 0; jb < kTile / 8; ++jb) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int at = (row0 + g + 8 * r) * kLdProb + jb * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(m.p_all + at) = pack_pair<T>(p[jb][2 * r], p[jb][2 * r + 1]);
        *reinterpret_cast<uint32_t*>(m.ds_all + at) = pack_pair<T>(dp[jb][2 * r], dp[jb][2 * r + 1]);
      }
    }
    store_scaled_gradient<T, D>(a, dq, m.acc, m.q + row0 * ld_tile<D>(), m.q_norm + row0, alpha,
                                m.q_pixel + row0, column, bias_sums ? m.partial + a.table_rows : nullptr);
    __syncthreads();

    // Key side: the warp's 16 keys against every query.
    float dk[D / 8][4] = {};
    float dv[D / 8][4] = {};
    {
      uint32_t cols[kTile / 16][4];
      load_column_fragments<T>(m.p_all, kLdProb, row0, cols);
      fragment_accumulate<T, D>(cols, m.dout, dv);
      load_column_fragments<T>(m.ds_all, kLdProb, row0, cols);
      fragment_accumulate<T, D>(cols, m.q, dk);
    }
    float* key_sums = bias_sums ? m.partial + a.partial_width : nullptr;
    store_scaled_gradient<T, D>(a, dk, m.acc, m.k + row0 * ld_tile<D>(), m.k_norm + row0, alpha,
                                m.q_pixel + row0, a.channels + column, key_sums);
    stage_fragments<D>(dv, m.acc, ld_acc<D>());
    store_gradient<T, D>(a, m.acc, m.q_pixel + row0, 2 * static_cast<int64_t>(a.channels) + column,
                         key_sums != nullptr ? key_sums + a.head_dim : nullptr);
  }
  write_partial_range(a.partial, a.partial_width, 0, smem, l);
  write_partial_range(a.key_partial, 2 * a.head_dim, a.partial_width, smem, l);
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
    case Kernel::kTile:
      return attention_bwd_tile_kernel<Policy, T, D>;
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
  const Layout layout = Layout::make<D, T>(kernel, warp_partial_width(kernel, a));
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

// The backward: the one-tile kernel where N fits a tile, else the query kernel and then the key
// kernel, whose k and v sums go to key_partial. a.partial and a.partial_width are the query side's.
template <typename T, int D, class Policy>
void launch_backward(const Policy& policy, TileArgs<T> a, float* key_partial, int64_t chunks, cudaStream_t stream) {
  if (a.n <= kTile) {
    a.key_partial = key_partial;
    launch_tiles<T, D>(Kernel::kTile, policy, a, chunks, stream);
    return;
  }
  launch_tiles<T, D>(Kernel::kQuery, policy, a, chunks, stream);
  a.partial = key_partial;
  a.partial_width = 2 * a.head_dim;
  launch_tiles<T, D>(Kernel::kKey, policy, a, chunks, stream);
}

}  // namespace attention_tile
}  // namespace vitkernels
