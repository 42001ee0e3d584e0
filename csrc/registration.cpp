// Every vitkernels op schema, the kernels registered for each device, and the module's Python face.
//
// Schemas live here and nowhere else. Fake (meta) kernels are registered in Python next to each
// op (vitkernels/ops/<op>/op.py); set_python_module names that module for the ops defined after it,
// so torch can say which import is missing when a fake kernel is needed.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <sstream>
#include <string>

#include "attention/attention.h"
#include "layernorm_mlp/layernorm_mlp.h"
#include "patch_embed/patch_embed.h"
#include "window_attention/window_attention.h"

#ifdef VITKERNELS_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

TORCH_LIBRARY(vitkernels, m) {
  m.set_python_module("vitkernels.ops.window_attention.op");
  m.def("gather_relative_position_bias(Tensor bias_table, int window_h, int window_w) -> Tensor");
  m.def(
      "window_attention_fwd(Tensor qkv, int num_heads, int[] window_size, int[] shift_size, Tensor? bias_table, "
      "Tensor? qkv_bias, Tensor? logit_scale, float? scale, bool pad_first, float mask_value) -> (Tensor, Tensor)");
  m.def(
      "window_attention_bwd(Tensor grad_out, Tensor qkv, Tensor lse, int num_heads, int[] window_size, "
      "int[] shift_size, Tensor? bias_table, Tensor? qkv_bias, Tensor? logit_scale, float? scale, bool pad_first, "
      "float mask_value) -> (Tensor, Tensor, Tensor, Tensor)");

  m.set_python_module("vitkernels.ops.attention.op");
  m.def("attention_fwd(Tensor qkv, int num_heads, Tensor? bias, float? scale) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor qkv, Tensor lse, int num_heads, Tensor? bias, float? scale, "
      "bool bias_grad) -> (Tensor, Tensor)");

  m.set_python_module("vitkernels.ops.layernorm_mlp.op");
  m.def("layernorm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "add_layernorm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layernorm_bwd(Tensor grad_y, Tensor? grad_extra, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "bool bias_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layernorm_mlp_fwd(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, Tensor? fc1_bias, "
      "Tensor fc2_weight, Tensor? fc2_bias, float eps, Tensor? gamma, str approximate) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layernorm_mlp_bwd(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd, Tensor pre, Tensor fc2_out, "
      "Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
      "float eps, Tensor? gamma, str approximate) -> Tensor[]");

  m.set_python_module("vitkernels.ops.patch_embed.op");
  m.def(
      "patch_embed_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? prefix_tokens, Tensor? pos, "
      "Tensor? norm_weight, Tensor? norm_bias, float norm_eps, bool patch_norm, Tensor? mean, Tensor? std) -> Tensor");
  m.def(
      "patch_embed_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? prefix_tokens, Tensor? pos, "
      "Tensor? norm_weight, Tensor? norm_bias, float norm_eps, bool patch_norm, Tensor? mean, Tensor? std, "
      "bool[] needs) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("gather_relative_position_bias", &vitkernels::gather_relative_position_bias_cpu);
  m.impl("window_attention_fwd", &vitkernels::window_attention_fwd_cpu);
  m.impl("window_attention_bwd", &vitkernels::window_attention_bwd_cpu);
  m.impl("attention_fwd", &vitkernels::attention_fwd_cpu);
  m.impl("attention_bwd", &vitkernels::attention_bwd_cpu);
  m.impl("layernorm_fwd", &vitkernels::layernorm_fwd_cpu);
  m.impl("add_layernorm_fwd", &vitkernels::add_layernorm_fwd_cpu);
  m.impl("layernorm_bwd", &vitkernels::layernorm_bwd_cpu);
  m.impl("layernorm_mlp_fwd", &vitkernels::layernorm_mlp_fwd_cpu);
  m.impl("layernorm_mlp_bwd", &vitkernels::layernorm_mlp_bwd_cpu);
  m.impl("patch_embed_fwd", &vitkernels::patch_embed_fwd_cpu);
  m.impl("patch_embed_bwd", &vitkernels::patch_embed_bwd_cpu);
}

#ifdef VITKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(vitkernels, CUDA, m) {
  m.impl("gather_relative_position_bias", &vitkernels::gather_relative_position_bias_cuda);
  m.impl("window_attention_fwd", &vitkernels::window_attention_fwd_cuda);
  m.impl("window_attention_bwd", &vitkernels::window_attention_bwd_cuda);
  m.impl("attention_fwd", &vitkernels::attention_fwd_cuda);
  m.impl("attention_bwd", &vitkernels::attention_bwd_cuda);
  m.impl("layernorm_fwd", &vitkernels::layernorm_fwd_cuda);
  m.impl("add_layernorm_fwd", &vitkernels::add_layernorm_fwd_cuda);
  m.impl("layernorm_bwd", &vitkernels::layernorm_bwd_cuda);
  m.impl("layernorm_mlp_fwd", &vitkernels::layernorm_mlp_fwd_cuda);
  m.impl("layernorm_mlp_bwd", &vitkernels::layernorm_mlp_bwd_cuda);
  m.impl("patch_embed_fwd", &vitkernels::patch_embed_fwd_cuda);
  m.impl("patch_embed_bwd", &vitkernels::patch_embed_bwd_cuda);
}
#endif

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

// VITKERNELS_CUDA_ARCHS is the TORCH_CUDA_ARCH_LIST setup.py compiled the CUDA kernels for.
pybind11::list cuda_archs() {
  pybind11::list archs;
#if defined(VITKERNELS_WITH_CUDA) && defined(VITKERNELS_CUDA_ARCHS)
  std::stringstream list(VITKERNELS_CUDA_ARCHS);
  std::string arch;
  while (std::getline(list, arch, ';')) {
    if (!arch.empty()) {
      archs.append(arch);
    }
  }
#endif
  return archs;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["compiler"] = compiler();
  info["torch"] = TORCH_VERSION;
#ifdef VITKERNELS_WITH_CUDA
  info["cuda"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
  info["cuda"] = pybind11::none();
#endif
  info["archs"] = cuda_archs();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitkernels' compiled kernels; the ops themselves are reached through torch.ops.vitkernels.";
  m.def(
      "has_cuda",
      [] {
#ifdef VITKERNELS_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether this build carries the CUDA kernels.");
  m.def("build_info", &build_info,
        "What the extension was built with: compiler, torch, cuda (None without CUDA), archs, openmp.");
}
