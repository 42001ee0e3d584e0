// Small dense fp32 building blocks for the CPU kernels: row-major matrix products sized for one
// attention window or key block, and softmax rows. Defined in common/cpu.cpp, where each is
// compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (the extension itself is
// built for baseline x86-64).
#pragma once

#include <cstdint>

namespace vitkernels {
namespace cpu {

// gemm computes c in column tiles this wide; a ragged last tile is several times slower per
// element, so callers with a free choice round n up to a multiple of it.
constexpr int64_t kGemmTileCols = 16;

// c[m, n] (+)= alpha * sum_k a[m, k] * b[k, n]; with transpose_a, a is stored as [k, m].
// Leading dimensions are in elements; accumulate=false overwrites c.
void gemm(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n, int64_t lda, int64_t ldb,
          int64_t ldc, float alpha, bool transpose_a, bool accumulate);

// dst[j, i] = src[i, j] for a [rows, cols] matrix.
void transpose(const float* src, float* dst, int64_t rows, int64_t cols, int64_t ld_src, int64_t ld_dst);

// The softmax of s + add left unnormalized: s[i, j] <- exp(s[i, j] + add[i][j] - m_i)
// with m_i the row's max; lse[i] = m_i + log(sum_i) and inv_sum[i] = 1 / sum_i, which normalizes the
// row or, for fewer multiplies, the row's product with the values. add holds one row pointer per
// row, or is null. Each row of s and add is read up to cols rounded up to kGemmTileCols (the
// buffers must allow it); s's columns from cols on are set to 0.
void softmax_rows_unnormalized(float* s, const float* const* add, float* lse, float* inv_sum, int64_t rows,
                               int64_t cols, int64_t ld);

// s[i, j] = exp(s[i, j] + add[i][j] - lse[i]): the probabilities a forward pass produced, from its
// statistics; add holds one row pointer per row, or is null.
void exp_rows_minus(float* s, const float* const* add, const float* lse, int64_t rows, int64_t cols, int64_t ld);

// sum_i a[i] * b[i].
float dot(const float* a, const float* b, int64_t n);

// F.normalize(x, dim=-1, eps=1e-12) of x[n, d] in place; norm[t] keeps row t's 2-norm.
void normalize_rows(float* x, float* norm, int64_t n, int64_t d);

// Backward of normalize_rows: dy[n, d] (the gradient of y = the normalized rows) becomes x's
// gradient in place, from y and norm.
void normalize_rows_backward(float* dy, const float* y, const float* norm, int64_t n, int64_t d);

// LayerNorm of one row x[c]: y = (x - mean) * rstd * weight + bias (weight, bias nullable);
// returns the row's mean and rstd = 1 / sqrt(var + eps) through the pointers.
void layernorm_row(const float* x, const float* weight, const float* bias, float* y, int64_t c, float eps, float* mean,
                   float* rstd);

// Backward of layernorm_row from its statistics: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
// with g = dy * weight and xhat = (x - mean) * rstd; adds dy * xhat to dweight and dy to dbias
// where those are not null.
void layernorm_row_backward(const float* dy, const float* x, const float* weight, float mean, float rstd, float* dx,
                            float* dweight, float* dbias, int64_t c);

// GELU of a[n] into out[n]: exact (erf, nn.GELU()) or the tanh approximation.
void gelu(const float* a, float* out, int64_t n, bool tanh_approximation);

// pre[i] += bias[i], then out[i] = GELU(pre[i]): a Linear's bias and activation in one pass.
void bias_gelu(float* pre, const float* bias, float* out, int64_t n, bool tanh_approximation);

// da[i] = dout[i] * GELU'(a[i]); da may alias dout.
void gelu_backward(const float* a, const float* dout, float* da, int64_t n, bool tanh_approximation);

}  // namespace cpu
}  // namespace vitkernels
