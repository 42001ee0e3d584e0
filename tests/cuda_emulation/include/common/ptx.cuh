// csrc/common/ptx.cuh's functions for the emulated build: the same contracts, computed on the host
// through the emulator's warp operations (vk_emulation.h), with their operands checked.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vk_emulation.h"

namespace vitkernels {
namespace ptx {

namespace detail {

template <typename T>
float element(uint32_t pair, int half) {
  T v;
  const uint16_t bits = static_cast<uint16_t>(half == 0 ? pair & 0xffffu : pair >> 16);
  std::memcpy(&v, &bits, 2);
  return static_cast<float>(v);
}

inline uint32_t pair_of(const unsigned char* row, int col) {
  uint16_t lo, hi;
  std::memcpy(&lo, row + 2 * col, 2);
  std::memcpy(&hi, row + 2 * (col + 1), 2);
  return lo | static_cast<uint32_t>(hi) << 16;
}

inline uint16_t at(const unsigned char* row, int col) {
  uint16_t v;
  std::memcpy(&v, row + 2 * col, 2);
  return v;
}

struct Quad {
  uint32_t r[4];
};

template <bool kTrans>
Quad ldmatrix(const void* row, const char* op) {
  ::vk_emu::check_shared(row, 16, 16, op);
  const auto* p = static_cast<const unsigned char*>(row);
  return ::vk_emu::warp_op<Quad>(op, p, [](const unsigned char* const* rows, Quad* outs) {
    for (int l = 0; l < 32; ++l) {
      for (int j = 0; j < 4; ++j) {
        const unsigned char* const* m = rows + 8 * j;  // matrix j's eight rows
        if (kTrans) {
          const uint16_t lo = at(m[2 * (l % 4)], l / 4);
          const uint16_t hi = at(m[2 * (l % 4) + 1], l / 4);
          outs[l].r[j] = lo | static_cast<uint32_t>(hi) << 16;
        } else {
          outs[l].r[j] = pair_of(m[l / 4], 2 * (l % 4));
        }
      }
    }
  });
}

struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};
struct MmaOut {
  float d[4];
};

}  // namespace detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const detail::Quad q = detail::ldmatrix<false>(row, "ldmatrix.x4");
  std::memcpy(r, q.r, sizeof(r));
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const detail::Quad q = detail::ldmatrix<true>(row, "ldmatrix.x4.trans");
  std::memcpy(r, q.r, sizeof(r));
}

// D = A B + C over the warp's fragments (layouts of attention_tile.cuh), products summed in fp32
// in k order.
template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::MmaIn in;
  std::memcpy(in.a, a, sizeof(in.a));
  in.b[0] = b0;
  in.b[1] = b1;
  std::memcpy(in.c, c, sizeof(in.c));
  const char* op = std::is_same_v<T, __half> ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16";
  auto product = [](const detail::MmaIn* ins, detail::MmaOut* outs) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = detail::element<T>(ins[l].a[0], h);
        A[g + 8][2 * t + h] = detail::element<T>(ins[l].a[1], h);
        A[g][2 * t + 8 + h] = detail::element<T>(ins[l].a[2], h);
        A[g + 8][2 * t + 8 + h] = detail::element<T>(ins[l].a[3], h);
        B[2 * t + h][g] = detail::element<T>(ins[l].b[0], h);
        B[2 * t + 8 + h][g] = detail::element<T>(ins[l].b[1], h);
        C[g][2 * t + h] = ins[l].c[h];
        C[g + 8][2 * t + h] = ins[l].c[2 + h];
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
        float sum = C[row][col];
        for (int k = 0; k < 16; ++k) {
          sum += A[row][k] * B[k][col];
        }
        outs[l].d[e] = sum;
      }
    }
  };
  const detail::MmaOut out = ::vk_emu::warp_op<detail::MmaOut>(op, in, product);
  std::memcpy(c, out.d, sizeof(c));
}

inline void copy_async_16(void* to_shared, const void* from_global) {
  ::vk_emu::copy_async(to_shared, from_global, 16);
}

inline void wait_async_copies() { ::vk_emu::wait_copies(); }

}  // namespace ptx
}  // namespace vitkernels
