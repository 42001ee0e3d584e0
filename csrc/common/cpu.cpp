// Definitions of common/cpu_math.h.
#include "common/cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

// Each function is cloned per instruction set; the loader picks the widest the CPU runs.
// VITKERNELS_CPU_SINGLE_TARGET compiles one version, for the compiler's -march: that is how the
// tests run each clone's code (tests/ops/test_cpu_math.py) whatever the CPU would pick.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(VITKERNELS_CPU_SINGLE_TARGET)
#define VITKERNELS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VITKERNELS_CPU_CLONES
#endif
// Helpers of the cloned functions are forced inline so each clone compiles them for its own target.
#define VITKERNELS_INLINE inline __attribute__((always_inline))

namespace vitkernels {
namespace cpu {
namespace {

constexpr int64_t kTileRows = 4;
constexpr int64_t kTileCols = kGemmTileCols;

// Sixteen floats as one value (GNU vector extension, which gcc and clang lower to one AVX-512,
// two AVX2 or four SSE registers per clone); loaded and stored unaligned through memcpy. The
// helpers taking them by value are always inlined into a clone compiled for its own instruction
// set, so the AVX-512 argument ABI gcc warns about never applies.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float Float16 __attribute__((vector_size(kTileCols * sizeof(float))));
typedef float Float8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Float4 __attribute__((vector_size(4 * sizeof(float))));
typedef int32_t Int16 __attribute__((vector_size(kTileCols * sizeof(int32_t))));

// x as a float, or in every lane of a Float16.
template <typename T>
VITKERNELS_INLINE T splat(float x) {
  return T{} + x;
}

VITKERNELS_INLINE Float16 splat16(float x) { return splat<Float16>(x); }

// 2^n for integral n in [-127, 128], by the exponent bits.
VITKERNELS_INLINE float exp2_integral(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

VITKERNELS_INLINE Float16 exp2_integral(Float16 n) {
  const Int16 bits = (__builtin_convertvector(n, Int16) + 127) << 23;
  return (Float16)bits;  // a vector cast reinterprets the bits
}

// exp(x) by 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, for a float or 16 lanes: written
// branch-free so that the compiler vectorizes the loops calling it (std::exp does not vectorize
// without -ffast-math); n is rounded to nearest even by adding and subtracting 1.5 * 2^23.
// Relative error about 2 ulp; NaN stays NaN. Below -70 it returns 0: such a probability
// (e^-70 ~ 4e-31, say a key behind the -100 shift mask) changes no fp32 sum, while its denormal
// products would slow every later operation on it many times over.
constexpr float kExpFlushBelow = -70.0f;

template <typename T>
VITKERNELS_INLINE T exp_by_parts(T x) {
  x = x < -87.0f ? splat<T>(-87.0f) : x;
  x = x > 88.0f ? splat<T>(88.0f) : x;
  const T n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const T r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  T p = splat<T>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return x < kExpFlushBelow ? splat<T>(0.0f) : p * exp2_integral(n);
}

VITKERNELS_INLINE float fast_exp(float x) { return exp_by_parts(x); }

VITKERNELS_INLINE Float16 fast_exp16(Float16 x) { return exp_by_parts(x); }



// c[rows, tiles * kTileCols] (+)= alpha * a b for one block of c held in registers across the
// whole depth k; a's element (r, p) is at a[r * row_step + p * depth_step]. Two column tiles give
// rows * 2 independent accumulator chains, enough to hide the FMA latency on AVX-512.
template <int64_t rows, int64_t tiles>
VITKERNELS_INLINE void gemm_tile(const float* a, int64_t row_step, int64_t depth_step, const float* b, int64_t ldb,
                                 float* c, int64_t ldc, int64_t k, float alpha, bool accumulate) {
  Float16 acc[rows][tiles] = {};
  for (int64_t p = 0; p < k; ++p) {
    Float16 brow[tiles];
    for (int64_t t = 0; t < tiles; ++t) {
      std::memcpy(&brow[t], b + p * ldb + t * kTileCols, sizeof(Float16));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float arp = a[r * row_step + p * depth_step];
      for (int64_t t = 0; t < tiles; ++t) {
        acc[r][t] += arp * brow[t];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < tiles; ++t) {
      float* to = c + r * ldc + t * kTileCols;
      Float16 out = alpha * acc[r][t];
      if (accumulate) {
        Float16 old;
        std::memcpy(&old, to, sizeof(old));
        out += old;
      }
      std::memcpy(to, &out, sizeof(out));
    }
  }
}

// The ragged last column tile, cols < kTileCols.
template <int64_t rows>
VITKERNELS_INLINE void gemm_ragged_tile(const float* a, int64_t row_step, int64_t depth_step, const float* b,
                                        int64_t ldb, float* c, int64_t ldc, int64_t k, int64_t cols, float alpha,
                                        bool accumulate) {
  float acc[rows][kTileCols] = {};
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t r = 0; r < rows; ++r) {
      const float arp = a[r * row_step + p * depth_step];
      for (int64_t j = 0; j < cols; ++j) {
        acc[r][j] += arp * b[p * ldb + j];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      c[r * ldc + j] = (accumulate ? c[r * ldc + j] : 0.0f) + alpha * acc[r][j];
    }
  }
}

// One row band of c: full column tiles, then the ragged one.
template <int64_t rows>
VITKERNELS_INLINE void gemm_band(const float* a, int64_t row_step, int64_t depth_step, const float* b, int64_t ldb,
                                 float* c, int64_t ldc, int64_t k, int64_t n, float alpha, bool accumulate) {
  int64_t j = 0;
  for (; j + 2 * kTileCols <= n; j += 2 * kTileCols) {
    gemm_tile<rows, 2>(a, row_step, depth_step, b + j, ldb, c + j, ldc, k, alpha, accumulate);
  }
  if (j + kTileCols <= n) {
    gemm_tile<rows, 1>(a, row_step, depth_step, b + j, ldb, c + j, ldc, k, alpha, accumulate);
    j += kTileCols;
  }
  if (j < n) {
    gemm_ragged_tile<rows>(a, row_step, depth_step, b + j, ldb, c + j, ldc, k, n - j, alpha, accumulate);
  }
}

// erf by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7), the approximation ATen's
// own vectorized CPU erf uses; exp is exact enough here because it is flushed only below -70.
VITKERNELS_INLINE float fast_erf(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float r = 1.061405429f;
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  const float value = 1.0f - r * t * fast_exp(-ax * ax);
  return std::copysign(value, x);
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCubic = 0.044715f;

// tanh(u) = 1 - 2 / (exp(2u) + 1), through the vectorizable exp.
VITKERNELS_INLINE float fast_tanh(float u) { return 1.0f - 2.0f / (fast_exp(2.0f * u) + 1.0f); }


VITKERNELS_INLINE Float16 load16(const float* p) {
  Float16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

VITKERNELS_INLINE void store16(float* p, Float16 v) { std::memcpy(p, &v, sizeof(v)); }


VITKERNELS_INLINE Float16 max16(Float16 a, Float16 b) { return a > b ? a : b; }

// One stage of a 16 x 16 transpose held in 16 vectors: swaps the b x b blocks off the diagonal of
// each 2b x 2b block. Rows i and i + b (bit b of i clear) become lo and hi.
template <int b, size_t... lane>
VITKERNELS_INLINE void swap_blocks(Float16& lo, Float16& hi, std::index_sequence<lane...>) {
  const Float16 x = lo;
  const Float16 y = hi;
  lo = __builtin_shufflevector(x, y, ((lane & b) ? kTileCols + lane - b : lane)...);
  hi = __builtin_shufflevector(x, y, ((lane & b) ? kTileCols + lane : lane + b)...);
}

template <int b>
VITKERNELS_INLINE void transpose_stage(Float16 (&r)[kTileCols]) {
  for (int i = 0; i < kTileCols; ++i) {
    if ((i & b) == 0) {
      swap_blocks<b>(r[i], r[i + b], std::make_index_sequence<kTileCols>());
    }
  }
}

// dst[j, i] = src[i, j] for one 16 x 16 block, in registers (four shuffle stages).
VITKERNELS_INLINE void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  Float16 r[kTileCols];
  for (int64_t i = 0; i < kTileCols; ++i) {
    r[i] = load16(src + i * ld_src);
  }
  transpose_stage<8>(r);
  transpose_stage<4>(r);
  transpose_stage<2>(r);
  transpose_stage<1>(r);
  for (int64_t j = 0; j < kTileCols; ++j) {
    store16(dst + j * ld_dst, r[j]);
  }
}

// Horizontal sum and max of 16 lanes by halving (a few shuffles instead of 16 dependent steps).
VITKERNELS_INLINE float sum_lanes(Float16 v) {
  const Float8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Float4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

VITKERNELS_INLINE float max_lanes(Float16 v) {
  const Float8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const Float8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Float8 a = lo > hi ? lo : hi;
  const Float4 b0 = __builtin_shufflevector(a, a, 0, 1, 2, 3);
  const Float4 b1 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const Float4 b = b0 > b1 ? b0 : b1;
  return std::max(std::max(b[0], b[2]), std::max(b[1], b[3]));
}

// log on 16 lanes, for the positive sums of exponentials of the softmax statistics: x = 2^e * m
// with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(z) = 2 (z + z^3/3 + ...), z = (m - 1) / (m + 1),
// |z| < 0.172. inf and NaN lanes come back unchanged; x must be positive and normal.
VITKERNELS_INLINE Float16 fast_log16(Float16 x) {
  const Int16 bits = (Int16)x;
  Float16 m = (Float16)((bits & 0x007fffff) | 0x3f800000);
  const Int16 high = m > 1.41421356237309505f;  // -1 in the lanes where m is halved
  m = high ? 0.5f * m : m;
  const Int16 exponent = (bits >> 23) - 127 - high;
  const Float16 z = (m - 1.0f) / (m + 1.0f);
  const Float16 z2 = z * z;
  Float16 p = splat16(1.0f / 11.0f);
  p = p * z2 + 1.0f / 9.0f;
  p = p * z2 + 1.0f / 7.0f;
  p = p * z2 + 1.0f / 5.0f;
  p = p * z2 + 1.0f / 3.0f;
  p = p * z2 + 1.0f;
  const Float16 value = __builtin_convertvector(exponent, Float16) * 0.693147180559945309f + 2.0f * z * p;
  return x < std::numeric_limits<float>::infinity() ? value : x;
}

// The first `count` (at most kTileCols) floats at p as a vector, other lanes `fill`; and back.
VITKERNELS_INLINE Float16 load_partial16(const float* p, int64_t count, float fill) {
  Float16 v = splat16(fill);
  std::memcpy(&v, p, count * sizeof(float));
  return v;
}

VITKERNELS_INLINE void store_partial16(float* p, Float16 v, int64_t count) { std::memcpy(p, &v, count * sizeof(float)); }

}  // namespace

VITKERNELS_CPU_CLONES
void gemm(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n, int64_t lda, int64_t ldb,
          int64_t ldc, float alpha, bool transpose_a, bool accumulate) {
  const int64_t row_step = transpose_a ? 1 : lda;
  const int64_t depth_step = transpose_a ? lda : 1;
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) {
    gemm_band<kTileRows>(a + i * row_step, row_step, depth_step, b, ldb, c + i * ldc, ldc, k, n, alpha, accumulate);
  }
  for (; i < m; ++i) {
    gemm_band<1>(a + i * row_step, row_step, depth_step, b, ldb, c + i * ldc, ldc, k, n, alpha, accumulate);
  }
}

VITKERNELS_CPU_CLONES
void transpose(const float* src, float* dst, int64_t rows, int64_t cols, int64_t ld_src, int64_t ld_dst) {
  const int64_t full_rows = rows / kTileCols * kTileCols;
  const int64_t full_cols = cols / kTileCols * kTileCols;
  for (int64_t i = 0; i < full_rows; i += kTileCols) {
    for (int64_t j = 0; j < full_cols; j += kTileCols) {
      transpose_block(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
    }
  }
  for (int64_t j = 0; j < cols; ++j) {
    const int64_t first_row = j < full_cols ? full_rows : 0;
    for (int64_t i = first_row; i < rows; ++i) {
      dst[j * ld_dst + i] = src[i * ld_src + j];
    }
  }
}

VITKERNELS_CPU_CLONES
void softmax_rows_unnormalized(float* s, const float* const* add, float* lse, float* inv_sum, int64_t rows,
                               int64_t cols, int64_t ld) {
  const Float16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const Float16 minus_inf = splat16(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    const float* addend = add != nullptr ? add[i] : nullptr;
    Float16 lanes = minus_inf;
    for (int64_t j = 0; j < cols; j += kTileCols) {
      Float16 x = load16(row + j);
      if (addend != nullptr) {
        x += load16(addend + j);
      }
      x = lane < static_cast<float>(cols - j) ? x : minus_inf;
      store16(row + j, x);
      lanes = max16(lanes, x);
    }
    lse[i] = max_lanes(lanes);
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    Float16 sums{};
    for (int64_t j = 0; j < cols; j += kTileCols) {
      const Float16 e = fast_exp16(load16(row + j) - lse[i]);
      store16(row + j, e);
      sums += e;
    }
    inv_sum[i] = sum_lanes(sums);
  }
  for (int64_t i = 0; i < rows; i += kTileCols) {
    const int64_t count = std::min(kTileCols, rows - i);
    const Float16 sum = load_partial16(inv_sum + i, count, 1.0f);
    store_partial16(lse + i, load_partial16(lse + i, count, 0.0f) + fast_log16(sum), count);
    store_partial16(inv_sum + i, 1.0f / sum, count);
  }
}

VITKERNELS_CPU_CLONES
void exp_rows_minus(float* s, const float* const* add, const float* lse, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    float* __restrict row = s + i * ld;
    const float shift = lse[i];
    if (add != nullptr) {
      const float* __restrict addend = add[i];
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        row[j] = fast_exp(row[j] + addend[j] - shift);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        row[j] = fast_exp(row[j] - shift);
      }
    }
  }
}

VITKERNELS_CPU_CLONES
float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += a[i] * b[i];
  }
  return sum;
}

constexpr float kNormalizeEps = 1e-12f;

void normalize_rows(float* x, float* norm, int64_t n, int64_t d) {
  for (int64_t t = 0; t < n; ++t) {
    float* row = x + t * d;
    norm[t] = std::sqrt(dot(row, row, d));
    const float inv = 1.0f / std::max(norm[t], kNormalizeEps);
    for (int64_t e = 0; e < d; ++e) {
      row[e] *= inv;
    }
  }
}

void normalize_rows_backward(float* dy, const float* y, const float* norm, int64_t n, int64_t d) {
  for (int64_t t = 0; t < n; ++t) {
    float* grad = dy + t * d;
    // Below eps the divisor is the constant eps, so the gradient only rescales.
    const float along = norm[t] > kNormalizeEps ? dot(y + t * d, grad, d) : 0.0f;
    const float inv = 1.0f / std::max(norm[t], kNormalizeEps);
    for (int64_t e = 0; e < d; ++e) {
      grad[e] = (grad[e] - y[t * d + e] * along) * inv;
    }
  }
}

VITKERNELS_CPU_CLONES
void layernorm_row(const float* x, const float* weight, const float* bias, float* y, int64_t c, float eps, float* mean,
                   float* rstd) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < c; ++e) {
    sum += x[e];
  }
  const float mu = sum / static_cast<float>(c);
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t e = 0; e < c; ++e) {
    squares += (x[e] - mu) * (x[e] - mu);
  }
  const float r = 1.0f / std::sqrt(squares / static_cast<float>(c) + eps);
  for (int64_t e = 0; e < c; ++e) {
    y[e] = (x[e] - mu) * r * (weight != nullptr ? weight[e] : 1.0f) + (bias != nullptr ? bias[e] : 0.0f);
  }
  *mean = mu;
  *rstd = r;
}

VITKERNELS_CPU_CLONES
void layernorm_row_backward(const float* dy, const float* x, const float* weight, float mean, float rstd, float* dx,
                            float* dweight, float* dbias, int64_t c) {
  float sum_g = 0.0f;
  float sum_g_xhat = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_g_xhat)
  for (int64_t e = 0; e < c; ++e) {
    const float g = dy[e] * (weight != nullptr ? weight[e] : 1.0f);
    sum_g += g;
    sum_g_xhat += g * (x[e] - mean) * rstd;
  }
  const float mean_g = sum_g / static_cast<float>(c);
  const float mean_g_xhat = sum_g_xhat / static_cast<float>(c);
  for (int64_t e = 0; e < c; ++e) {
    const float xhat = (x[e] - mean) * rstd;
    const float g = dy[e] * (weight != nullptr ? weight[e] : 1.0f);
    dx[e] = rstd * (g - mean_g - xhat * mean_g_xhat);
  }
  if (dweight != nullptr) {
    for (int64_t e = 0; e < c; ++e) {
      dweight[e] += dy[e] * (x[e] - mean) * rstd;
    }
  }
  if (dbias != nullptr) {
    for (int64_t e = 0; e < c; ++e) {
      dbias[e] += dy[e];
    }
  }
}

VITKERNELS_INLINE float gelu_tanh(float x) {
  return 0.5f * x * (1.0f + fast_tanh(kSqrt2OverPi * (x + kTanhCubic * x * x * x)));
}

VITKERNELS_INLINE float gelu_erf(float x) { return 0.5f * x * (1.0f + fast_erf(x * kSqrtHalf)); }

VITKERNELS_CPU_CLONES
void gelu(const float* a, float* out, int64_t n, bool tanh_approximation) {
  if (tanh_approximation) {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = gelu_tanh(a[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = gelu_erf(a[i]);
    }
  }
}

VITKERNELS_CPU_CLONES
void bias_gelu(float* pre, const float* bias, float* out, int64_t n, bool tanh_approximation) {
  if (tanh_approximation) {
    for (int64_t i = 0; i < n; ++i) {
      pre[i] += bias[i];
      out[i] = gelu_tanh(pre[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      pre[i] += bias[i];
      out[i] = gelu_erf(pre[i]);
    }
  }
}

VITKERNELS_CPU_CLONES
void gelu_backward(const float* a, const float* dout, float* da, int64_t n, bool tanh_approximation) {
  if (tanh_approximation) {
    for (int64_t i = 0; i < n; ++i) {
      const float x = a[i];
      const float t = fast_tanh(kSqrt2OverPi * (x + kTanhCubic * x * x * x));
      const float slope = kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x * x);
      da[i] = dout[i] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * slope);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float x = a[i];
      const float cdf = 0.5f * (1.0f + fast_erf(x * kSqrtHalf));
      da[i] = dout[i] * (cdf + x * kInvSqrt2Pi * fast_exp(-0.5f * x * x));
    }
  }
}

}  // namespace cpu
}  // namespace vitkernels
