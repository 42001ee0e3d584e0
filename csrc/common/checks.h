// Input checks for the host side of every kernel, and the floating-point dispatch macro.
//
// Each check throws through TORCH_CHECK (a Python RuntimeError) with a message naming the
// argument and showing the offending value, so users see what to fix, not where it failed.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace vitkernels {

inline void check_device(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device, /*lower_case=*/true),
              " tensor, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& other,
                              const char* other_name) {
  TORCH_CHECK(t.device() == other.device(), name, " and ", other_name, " must be on the same device, got ",
              t.device(), " and ", other.device());
}

// The dtypes every kernel of this package accepts: fp16, bf16, fp32, fp64.
inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, name,
              " must be float16, bfloat16, float32 or float64, got ", dtype);
}

inline void check_dtype(const at::Tensor& t, const char* name, c10::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& other,
                             const char* other_name) {
  TORCH_CHECK(t.scalar_type() == other.scalar_type(), name, " and ", other_name, " must have the same dtype, got ",
              t.scalar_type(), " and ", other.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got shape ", t.sizes(), " with strides ", t.strides());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t ndim) {
  TORCH_CHECK(t.dim() == ndim, name, " must be ", ndim, "-D, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected) {
  TORCH_CHECK(t.size(dim) == expected, name, " must have size ", expected, " in dim ", dim, ", got shape ",
              t.sizes());
}

// An int argument in [low, high]; the range is part of the message.
inline void check_range(int64_t value, const char* name, int64_t low, int64_t high) {
  TORCH_CHECK(low <= value && value <= high, name, " must be in [", low, ", ", high, "], got ", value);
}

}  // namespace vitkernels

// Runs the lambda with scalar_t bound to the tensor's dtype, for the four dtypes check_floating
// admits (at::Half and at::BFloat16 for the 16-bit ones).
#define VITKERNELS_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)
