// A Linear layer's matrix product through cuBLASLt, with the bias added in its epilogue:
// out[M, N] (fp32) = input[M, K] @ weight[N, K]^T + bias[N].
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <type_traits>

namespace vitkernels {
namespace cublaslt {

#define VITKERNELS_CUBLASLT_CHECK(EXPR)                                               \
  do {                                                                                \
    const cublasStatus_t vitkernels_status = (EXPR);                                  \
    TORCH_CHECK(vitkernels_status == CUBLAS_STATUS_SUCCESS, #EXPR " failed: ",       \
                cublasLtGetStatusString(vitkernels_status));                          \
  } while (0)

// cuBLASLt's workspace, taken from torch's caching allocator for each call (stream-ordered, so
// freeing it when the call returns is safe).
constexpr int64_t kWorkspaceBytes = int64_t{32} << 20;

template <typename Handle>
using Owned = std::unique_ptr<std::remove_pointer_t<Handle>, cublasStatus_t (*)(Handle)>;

inline cudaDataType_t data_type(at::ScalarType dtype) {
  if (dtype == at::kHalf) {
    return CUDA_R_16F;
  }
  if (dtype == at::kBFloat16) {
    return CUDA_R_16BF;
  }
  TORCH_CHECK(dtype == at::kFloat, "cuBLASLt products take float16, bfloat16 or float32 operands, got ", dtype);
  return CUDA_R_32F;
}

// The largest power of two up to 256 that divides the address: what the heuristic may assume.
inline uint32_t alignment(const void* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  uint32_t bytes = 1;
  while (bytes < 256 && address % (2 * bytes) == 0) {
    bytes *= 2;
  }
  return bytes;
}

template <typename T>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const T& value) {
  VITKERNELS_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}

template <typename T>
void set_preference(cublasLtMatmulPreference_t preference, cublasLtMatmulPreferenceAttributes_t attribute,
                    const T& value) {
  VITKERNELS_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, attribute, &value, sizeof(value)));
}

// A column-major [rows, cols] matrix with leading dimension ld.
inline Owned<cublasLtMatrixLayout_t> layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t raw = nullptr;
  VITKERNELS_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&raw, type, static_cast<uint64_t>(rows),
                                                       static_cast<uint64_t>(cols), ld));
  return Owned<cublasLtMatrixLayout_t>(raw, &cublasLtMatrixLayoutDestroy);
}

// The same product through ATen in fp32: for shapes linear() does not hand to cuBLASLt.
inline void linear_fallback(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                            at::Tensor& out) {
  const at::Tensor input32 = input.to(at::kFloat);
  const at::Tensor weight32 = weight.to(at::kFloat);
  if (bias.defined()) {
    at::addmm_out(out, bias, input32, weight32.t());
  } else {
    at::mm_out(out, input32, weight32.t());
  }
}

// Sizes cuBLASLt's bias epilogue is used for: PyTorch's own addmm takes its cuBLASLt path only
// for dimensions in (1, 65535 * 32), and so does linear().
inline bool epilogue_friendly(int64_t m, int64_t n, int64_t k) {
  constexpr int64_t kLimit = int64_t{65535} * 32;
  for (const int64_t size : {m, n, k}) {
    if (size <= 1 || size >= kLimit) {
      return false;
    }
  }
  return true;
}

// out = input @ weight^T (+ bias) for contiguous input [M, K] and weight [N, K] of one dtype
// (fp16 and bf16 on the tensor cores; fp32 as plain fp32, never TF32), fp32 accumulation, fp32
// contiguous out [M, N] and fp32 bias [N] (undefined: none), on the current stream. Shapes outside
// epilogue_friendly(), or that cuBLASLt's heuristic finds no kernel for, take linear_fallback().
//
// cuBLASLt is column-major: the row-major [M, N] output is the column-major [N, M] matrix
// weight (column-major [K, N], transposed) times input (column-major [K, M]), and the bias runs
// along its N rows, which is what CUBLASLT_EPILOGUE_BIAS broadcasts.
inline void linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out) {
  const int64_t m = input.size(0);
  const int64_t k = input.size(1);
  const int64_t n = weight.size(0);
  if (m == 0 || n == 0) {
    return;
  }
  if (!epilogue_friendly(m, n, k)) {
    linear_fallback(input, weight, bias, out);
    return;
  }
  const cudaDataType_t operand = data_type(input.scalar_type());
  cublasLtMatmulDesc_t raw_desc = nullptr;
  VITKERNELS_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&raw_desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const Owned<cublasLtMatmulDesc_t> desc(raw_desc, &cublasLtMatmulDescDestroy);
  set_attribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set_attribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  if (bias.defined()) {
    set_attribute(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
    set_attribute(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias.const_data_ptr());  // fp32: D's type
  }
  const auto a = layout(operand, k, n, k);
  const auto b = layout(operand, k, m, k);
  const auto d = layout(CUDA_R_32F, n, m, n);

  cublasLtMatmulPreference_t raw_preference = nullptr;
  VITKERNELS_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&raw_preference));
  const Owned<cublasLtMatmulPreference_t> preference(raw_preference, &cublasLtMatmulPreferenceDestroy);
  set_preference(preference.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(kWorkspaceBytes));
  set_preference(preference.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(weight.const_data_ptr()));
  set_preference(preference.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(input.const_data_ptr()));
  set_preference(preference.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(out.const_data_ptr()));
  set_preference(preference.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(out.const_data_ptr()));

  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, desc.get(), a.get(), b.get(), d.get(),
                                                               d.get(), preference.get(), 1, &heuristic, &found);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || (status == CUBLAS_STATUS_SUCCESS && found == 0)) {
    linear_fallback(input, weight, bias, out);
    return;
  }
  VITKERNELS_CUBLASLT_CHECK(status);
  const float alpha = 1.0f;
  const float beta = 0.0f;
  const at::Tensor workspace = at::empty({kWorkspaceBytes}, input.options().dtype(at::kByte));
  VITKERNELS_CUBLASLT_CHECK(cublasLtMatmul(handle, desc.get(), &alpha, weight.const_data_ptr(), a.get(),
                                           input.const_data_ptr(), b.get(), &beta, out.mutable_data_ptr(), d.get(),
                                           out.mutable_data_ptr(), d.get(), &heuristic.algo,
                                           workspace.mutable_data_ptr(), static_cast<size_t>(kWorkspaceBytes),
                                           c10::cuda::getCurrentCUDAStream()));
}

}  // namespace cublaslt
}  // namespace vitkernels
