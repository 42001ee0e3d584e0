// C entry points over common/cpu_math.h for tests/ops/test_cpu_math.py, which builds them with
// common/cpu.cpp for one instruction set at a time and calls them through ctypes.
#include "common/cpu_math.h"

namespace cpu = vitkernels::cpu;

extern "C" {

void vk_gemm(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n, int64_t lda, int64_t ldb,
             int64_t ldc, float alpha, int transpose_a, int accumulate) {
  cpu::gemm(a, b, c, m, k, n, lda, ldb, ldc, alpha, transpose_a != 0, accumulate != 0);
}

void vk_transpose(const float* src, float* dst, int64_t rows, int64_t cols, int64_t ld_src, int64_t ld_dst) {
  cpu::transpose(src, dst, rows, cols, ld_src, ld_dst);
}

void vk_softmax_rows_unnormalized(float* s, const float* const* add, float* lse, float* inv_sum, int64_t rows,
                                  int64_t cols, int64_t ld) {
  cpu::softmax_rows_unnormalized(s, add, lse, inv_sum, rows, cols, ld);
}

void vk_exp_rows_minus(float* s, const float* const* add, const float* lse, int64_t rows, int64_t cols, int64_t ld) {
  cpu::exp_rows_minus(s, add, lse, rows, cols, ld);
}

float vk_dot(const float* a, const float* b, int64_t n) { return cpu::dot(a, b, n); }

void vk_normalize_rows(float* x, float* norm, int64_t n, int64_t d) { cpu::normalize_rows(x, norm, n, d); }

void vk_normalize_rows_backward(float* dy, const float* y, const float* norm, int64_t n, int64_t d) {
  cpu::normalize_rows_backward(dy, y, norm, n, d);
}

void vk_layernorm_row(const float* x, const float* weight, const float* bias, float* y, int64_t c, float eps,
                      float* mean, float* rstd) {
  cpu::layernorm_row(x, weight, bias, y, c, eps, mean, rstd);
}

void vk_layernorm_row_backward(const float* dy, const float* x, const float* weight, float mean, float rstd, float* dx,
                               float* dweight, float* dbias, int64_t c) {
  cpu::layernorm_row_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, c);
}

void vk_gelu(const float* a, float* out, int64_t n, int tanh_approximation) {
  cpu::gelu(a, out, n, tanh_approximation != 0);
}

void vk_bias_gelu(float* pre, const float* bias, float* out, int64_t n, int tanh_approximation) {
  cpu::bias_gelu(pre, bias, out, n, tanh_approximation != 0);
}

void vk_gelu_backward(const float* a, const float* dout, float* da, int64_t n, int tanh_approximation) {
  cpu::gelu_backward(a, dout, da, n, tanh_approximation != 0);
}

}  // extern "C"
