// A plain tiled GEMM for CUDA whose operands are read, and whose result is written, through
// functors: a kernel gathers its operands by index arithmetic (an implicit GEMM, no im2col buffer)
// and finishes each output element in the epilogue.
//
// C[m, n] = sum_k A(m, k) * B(n, k) for m < rows, n < cols, k < depth. A block of 256 threads
// computes one 64 x 64 tile of C, staging 64 x 32 slices of A and B through shared memory in the
// compute type, converted from the fp32 the functors return: __half and __nv_bfloat16 run on tensor
// cores (WMMA 16x16x16, fp32 accumulation), float on the CUDA cores (4 x 4 outputs per thread).
// The finished tile goes through shared memory to store(m, n, value, split), called once per element
// of C and split with n the fastest-varying index across threads. One slice is staged at a time (no
// double buffering): simple rather than fast.
//
// With splits > 1 the depth is cut into that many consecutive ranges (grid z), each giving its own
// partial C to store(..., split): for a C too small to fill the GPU over a long depth. The caller
// adds the partials in a fixed order, which keeps the result deterministic.
//
// Operands are separable: an element's address is a part that depends on its row and a part that
// depends on k, so the index arithmetic (divisions, for a gather) runs once per row and once per k
// of a slice rather than per element. An operand provides types Row and Depth, `__device__ Row
// row(int64_t row) const` and `__device__ Depth depth(int64_t k) const`, called for row < rows (or
// cols) and k < depth only, `__device__ float at(const Row&, const Depth&) const`, and `static
// constexpr bool kRowsContiguous`: whether consecutive rows rather than consecutive k are adjacent
// in memory, which decides how the threads of a block spread over a slice as they load it, so that
// neighbouring threads read neighbouring addresses. A thread loads the same rows (or, with rows
// contiguous, the same row) of every slice, so it computes their Row parts once.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

// Runs the lambda with scalar_t bound to the tensor's dtype among the three the tile GEMM computes
// in: float32, float16 and bfloat16.
#define VITKERNELS_DISPATCH_GEMM_TYPES(TYPE, NAME, ...)                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)      \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)   \
                                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace vitkernels {
namespace tile_gemm {

constexpr int kTile = 64;  // rows and columns of C per block
constexpr int kStep = 32;  // depth of one shared-memory slice
constexpr int kThreads = 256;
constexpr int64_t kMaxColumnTiles = 65535;  // gridDim.y
constexpr int kMaxSplits = 256;

// The type the products are computed in for tensors of dtype scalar_t.
template <typename scalar_t>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<c10::Half> {
  using type = __half;
};
template <>
struct ComputeType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename scalar_t>
using compute_t = typename ComputeType<scalar_t>::type;

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Rows are padded against bank conflicts; WMMA wants a leading dimension of a multiple of 16 bytes
// and fragment pointers aligned to 32 bytes, which these sizes keep.
template <typename T>
struct alignas(128) SharedTiles {
  static constexpr int kLd = std::is_same<T, float>::value ? kStep + 1 : kStep + 8;
  static constexpr int kLdC = kTile + 4;
  T a[kTile * kLd];  // A slice [64 rows][32 k]
  T b[kTile * kLd];  // B slice [64 columns][32 k]
  float c[kTile * kLdC];
};

// Warp w computes rows 16 * (w % 4) .. + 16 and columns 32 * (w / 4) .. + 32 of the tile, as two
// 16 x 16 fragments.
template <typename T>
struct TensorCoreAccumulator {
  using Tiles = SharedTiles<T>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];

  __device__ int row() const { return 16 * ((threadIdx.x / 32) % 4); }
  __device__ int col() const { return 32 * ((threadIdx.x / 32) / 4); }

  __device__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }

  __device__ void multiply(const Tiles& s) {
    for (int k = 0; k < kStep; k += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> a;
      nvcuda::wmma::load_matrix_sync(a, s.a + row() * Tiles::kLd + k, Tiles::kLd);
      for (int j = 0; j < 2; ++j) {
        // B^T[k][n] sits at b[n * kLd + k]: a column-major K x N operand.
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major> b;
        nvcuda::wmma::load_matrix_sync(b, s.b + (col() + 16 * j) * Tiles::kLd + k, Tiles::kLd);
        nvcuda::wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
  }

  __device__ void store(float* c) const {
    for (int j = 0; j < 2; ++j) {
      nvcuda::wmma::store_matrix_sync(c + row() * Tiles::kLdC + col() + 16 * j, acc[j], Tiles::kLdC,
                                      nvcuda::wmma::mem_row_major);
    }
  }
};

// Thread t computes rows t / 16 + 16 i and columns t % 16 + 16 j, i, j < 4.
struct CudaCoreAccumulator {
  using Tiles = SharedTiles<float>;
  float acc[4][4];

  __device__ void zero() {
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        acc[i][j] = 0.0f;
      }
    }
  }

  __device__ void multiply(const Tiles& s) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int k = 0; k < kStep; ++k) {
      float a[4], b[4];
      for (int i = 0; i < 4; ++i) {
        a[i] = s.a[(ty + 16 * i) * Tiles::kLd + k];
        b[i] = s.b[(tx + 16 * i) * Tiles::kLd + k];
      }
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
      }
    }
  }

  __device__ void store(float* c) const {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        c[(ty + 16 * i) * Tiles::kLdC + tx + 16 * j] = acc[i][j];
      }
    }
  }
};

template <typename T>
using Accumulator = std::conditional_t<std::is_same<T, float>::value, CudaCoreAccumulator, TensorCoreAccumulator<T>>;

// Elements of a slice each thread loads.
constexpr int kLoads = kTile * kStep / kThreads;

// What one thread loads of every slice of an operand: with rows contiguous, row threadIdx.x % 64
// at depths threadIdx.x / 64 + 4 i; else rows threadIdx.x / 32 + 8 i at depth threadIdx.x % 32
// (i < kLoads), so consecutive threads read consecutive rows, or consecutive k.
template <typename Operand>
struct SliceLoader {
  static constexpr bool kByRow = Operand::kRowsContiguous;
  static constexpr int kRows = kByRow ? 1 : kLoads;
  static constexpr int kDepths = kByRow ? kLoads : 1;
  typename Operand::Row rows[kRows];
  bool row_inside[kRows];

  __device__ static int row_of(int i) { return kByRow ? threadIdx.x % kTile : threadIdx.x / kStep + kThreads / kStep * i; }
  __device__ static int depth_of(int i) { return kByRow ? threadIdx.x / kTile + kThreads / kTile * i : threadIdx.x % kStep; }

  // The Row parts of this thread's rows of [first, first + 64), rows past count marked outside.
  __device__ SliceLoader(const Operand& operand, int64_t first, int64_t count) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t row = first + row_of(i);
      row_inside[i] = row < count;
      rows[i] = operand.row(row_inside[i] ? row : first);
    }
  }

  // dst [64][ld] <- this thread's elements of the slice at depths [k0, k0 + 32), zeros past count
  // or depth.
  template <typename T>
  __device__ void load(const Operand& operand, T* dst, int ld, int64_t k0, int64_t depth) const {
    typename Operand::Depth depths[kDepths];
    bool depth_inside[kDepths];
#pragma unroll
    for (int j = 0; j < kDepths; ++j) {
      const int64_t k = k0 + depth_of(j);
      depth_inside[j] = k < depth;
      depths[j] = operand.depth(depth_inside[j] ? k : k0);
    }
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int r = kByRow ? 0 : i;
      const int d = kByRow ? i : 0;
      const bool inside = row_inside[r] && depth_inside[d];
      dst[row_of(r) * ld + depth_of(d)] = from_float<T>(inside ? operand.at(rows[r], depths[d]) : 0.0f);
    }
  }
};

// grid (row tiles, column tiles, splits), kThreads threads; split z covers depth
// [z * split_depth, (z + 1) * split_depth).
template <typename T, typename OperandA, typename OperandB, typename Store>
__global__ void __launch_bounds__(kThreads) tile_gemm_kernel(OperandA a, OperandB b, Store store, int64_t rows,
                                                             int64_t cols, int64_t depth, int64_t split_depth) {
  using Tiles = SharedTiles<T>;
  __shared__ Tiles s;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * split_depth;
  const int64_t k_end = k_begin + split_depth < depth ? k_begin + split_depth : depth;
  const SliceLoader<OperandA> a_loader(a, row0, rows);
  const SliceLoader<OperandB> b_loader(b, col0, cols);
  Accumulator<T> acc;
  acc.zero();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kStep) {
    a_loader.load(a, s.a, Tiles::kLd, k0, k_end);
    b_loader.load(b, s.b, Tiles::kLd, k0, k_end);
    __syncthreads();
    acc.multiply(s);
    __syncthreads();
  }
  acc.store(s.c);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
    const int r = idx / kTile, c = idx % kTile;
    if (row0 + r < rows && col0 + c < cols) {
      store(row0 + r, col0 + c, s.c[r * Tiles::kLdC + c], static_cast<int>(blockIdx.z));
    }
  }
}

// Launches the GEMM on stream, computing in compute type T, in `splits` depth ranges (each a
// multiple of kStep; a split past the depth stores zeros); nothing to do when C is empty. A depth
// of 0 stores zeros.
template <typename T, typename OperandA, typename OperandB, typename Store>
void launch(const OperandA& a, const OperandB& b, const Store& store, int64_t rows, int64_t cols, int64_t depth,
            cudaStream_t stream, int splits = 1) {
  if (rows == 0 || cols == 0) {
    return;
  }
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  TORCH_CHECK(row_tiles <= INT32_MAX && col_tiles <= kMaxColumnTiles, "tile GEMM of ", rows, " x ", cols,
              " is too large for one launch");
  TORCH_CHECK(1 <= splits && splits <= kMaxSplits, "tile GEMM splits must be in [1, ", kMaxSplits, "], got ", splits);
  const int64_t steps = (depth + kStep - 1) / kStep;
  const int64_t split_depth = (steps + splits - 1) / splits * kStep;
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits));
  tile_gemm_kernel<T><<<grid, kThreads, 0, stream>>>(a, b, store, rows, cols, depth, split_depth);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A store into row-major fp32 matrices, one per split: data[split * split_stride + row * ld + col].
struct MatrixStore {
  float* data;
  int64_t ld, split_stride;
  __device__ void operator()(int64_t row, int64_t col, float v, int split) const {
    data[split * split_stride + row * ld + col] = v;
  }
};

// Operand (or column_sums value) of a row-major matrix: data[row * ld + k].
struct Matrix {
  static constexpr bool kRowsContiguous = false;
  using Row = int64_t;
  using Depth = int64_t;
  const float* data;
  int64_t ld;
  __device__ float operator()(int64_t row, int64_t k) const { return data[row * ld + k]; }
  __device__ Row row(int64_t r) const { return r * ld; }
  __device__ Depth depth(int64_t k) const { return k; }
  __device__ float at(Row r, Depth k) const { return data[r + k]; }
};

// The transpose of another operand: element (row, k) is the operand's (k, row).
template <typename Operand>
struct Transposed {
  static constexpr bool kRowsContiguous = !Operand::kRowsContiguous;
  using Row = typename Operand::Depth;
  using Depth = typename Operand::Row;
  Operand operand;
  __device__ Row row(int64_t r) const { return operand.depth(r); }
  __device__ Depth depth(int64_t k) const { return operand.row(k); }
  __device__ float at(const Row& r, const Depth& k) const { return operand.at(k, r); }
};

}  // namespace tile_gemm
}  // namespace vitkernels
