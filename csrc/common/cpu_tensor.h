// Host-side helpers of the CPU kernels: small operands as contiguous fp32, and their data.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <optional>

#include "common/checks.h"

namespace vitkernels {

// The dtypes the C++ CPU kernels compute in fp32: fp16, bf16, fp32 (fp64 is left to the reference).
inline void check_cpu_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, name,
              " must be float16, bfloat16 or float32 on the cpu backend, got ", dtype);
}

// An optional tensor as contiguous fp32, or an undefined tensor when absent.
inline at::Tensor contiguous_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

// Checks an optional [size] parameter of the kernel whose main operand is `like`.
inline void check_parameter(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& like,
                            int64_t size) {
  if (t.has_value()) {
    check_same_device(*t, name, like, "the input");
    check_floating(*t, name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == size, name, " must have shape [", size, "], got ", t->sizes());
  }
}

// An optional [size] parameter of the kernel whose main operand is `like`, checked and as
// contiguous fp32; undefined when absent.
inline at::Tensor float_parameter(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& like,
                                  int64_t size) {
  check_parameter(t, name, like, size);
  return contiguous_float(t);
}

// As float_parameter, but kept in `like`'s dtype when it has it (the CUDA LayerNorm reads either,
// so a model in bf16 needs no conversion before each call).
inline at::Tensor column_parameter(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& like,
                                   int64_t size) {
  check_parameter(t, name, like, size);
  return t.has_value() && t->scalar_type() == like.scalar_type() ? t->contiguous() : contiguous_float(t);
}

inline const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

}  // namespace vitkernels
