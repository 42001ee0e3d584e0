// The inline PTX of the CUDA kernels, and nothing else: tensor-core products and fragment loads
// (mma.sync, ldmatrix) and asynchronous copies to shared memory (cp.async), all sm_80 and later.
// Everything that uses them goes through these functions, so that a host build of the kernels
// (tests/cuda_emulation) can supply its own definitions of this header's functions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace vitkernels {
namespace ptx {

__device__ inline uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements from shared memory: lane l names row l % 8 of matrix l / 8,
// 16 aligned bytes; lane l receives matrix j's elements (l / 4, 2 (l % 4) .. + 1) in r[j].
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row))
               : "memory");
}

// As ldmatrix_x4, each matrix transposed.
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row))
               : "memory");
}

// c += a b for one 16x8 block: a 16x16 (row), b 16x8 (col), T (__half or __nv_bfloat16) in, fp32
// accumulate; fragment layouts as in attention_tile.cuh.
#define VITKERNELS_MMA_16816(TYPE)                                                                          \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                       \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                     \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
__device__ inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    VITKERNELS_MMA_16816("f16");
  } else {
    VITKERNELS_MMA_16816("bf16");
  }
}
#undef VITKERNELS_MMA_16816

// 16 bytes from global to shared memory without passing through registers, both 16-byte aligned;
// the copy lands by the issuing thread's next wait_async_copies.
__device__ inline void copy_async_16(void* to_shared, const void* from_global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(to_shared)), "l"(from_global)
               : "memory");
}

// Waits until every copy_async_16 of the calling thread has landed.
__device__ inline void wait_async_copies() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

}  // namespace ptx
}  // namespace vitkernels
