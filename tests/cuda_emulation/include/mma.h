// Stands in for the CUDA toolkit's mma.h in the emulated build: nvcuda::wmma's 16x16x16 fragments
// as whole matrices in every lane (the layout of a fragment's elements is opaque to the kernels,
// which only load, multiply, fill and store them). Each operation is a warp operation, so that a
// lane's load sees what the warp's other lanes stored before it, as __syncwarp would order them.
#pragma once

#include "vk_emulation.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulated wmma has 16x16x16 fragments only");
  float x[256];  // element (r, c) at x[16 r + c], rounded to T
};

namespace detail {
inline void warp_point(const char* op) {
  ::vk_emu::warp_op<int>(op, 0, [](const int*, int* outs) {
    for (int i = 0; i < 32; ++i) {
      outs[i] = 0;
    }
  });
}
template <typename Layout>
constexpr bool row_layout() {
  return std::is_same_v<Layout, row_major>;
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float v) {
  for (float& e : f.x) {
    e = static_cast<float>(static_cast<T>(v));
  }
}

// A (rows x k) or B (k x cols) from memory with leading dimension ld, in the fragment's layout.
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  detail::warp_point("wmma::load_matrix_sync");
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      f.x[16 * r + c] = static_cast<float>(detail::row_layout<Layout>() ? p[r * ld + c] : p[c * ld + r]);
    }
  }
}

template <typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  detail::warp_point("wmma::mma_sync");
  float out[256];
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 16; ++col) {
      float sum = c.x[16 * r + col];
      for (int k = 0; k < 16; ++k) {
        sum += a.x[16 * r + k] * b.x[16 * k + col];
      }
      out[16 * r + col] = sum;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld,
                              layout_t layout) {
  detail::warp_point("wmma::store_matrix_sync");
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      p[layout == mem_row_major ? r * ld + c : c * ld + r] = f.x[16 * r + c];
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda
