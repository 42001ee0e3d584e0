// Device helpers shared by the CUDA kernels: 16-byte packs of elements read and written as fp32,
// warp sums, and the host-side alignment test that decides whether a pack path may run.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>

namespace vitkernels {
namespace cuda {

constexpr int kWarpSize = 32;

// Elements of T in one 16-byte access: 8 for fp16/bf16, 4 for fp32.
template <typename T>
constexpr int pack_size() {
  return static_cast<int>(16 / sizeof(T));
}

// N elements of T read or written as one access; the address must be aligned to sizeof(Pack).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* src, float (&dst)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    dst[i] = static_cast<float>(pack.v[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_floats(T* dst, const float (&src)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    pack.v[i] = static_cast<T>(src[i]);
  }
  *reinterpret_cast<Pack<T, N>*>(dst) = pack;
}

// Sum over the 32 lanes of a warp. The butterfly pairs the same operands in every lane, so all
// lanes get the bitwise same result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Whether a pointer (null counts as aligned: an absent operand) is a multiple of `bytes`.
inline bool is_aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace cuda
}  // namespace vitkernels
