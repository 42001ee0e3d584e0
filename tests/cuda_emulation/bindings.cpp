// The emulated build's Python module: the CUDA entry points of the kernels, compiled for the host
// (vk_emulation.h) and taking CPU tensors, under the names of the vitkernels ops they implement.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "attention/attention.h"
#include "layernorm_mlp/layernorm_mlp.h"
#include "patch_embed/patch_embed.h"
#include "window_attention/window_attention.h"

std::vector<double> run_emulator_check(const std::string& name);  // emulator_checks.cpp

namespace {

c10::List<bool> to_list(const std::vector<bool>& v) {
  c10::List<bool> list;
  for (const bool b : v) {
    list.push_back(b);
  }
  return list;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace vitkernels;
  m.def("gather_relative_position_bias", &gather_relative_position_bias_cuda);
  m.def("window_attention_fwd", &window_attention_fwd_cuda);
  m.def("window_attention_bwd", &window_attention_bwd_cuda);
  m.def("attention_fwd", &attention_fwd_cuda);
  m.def("attention_bwd", &attention_bwd_cuda);
  m.def("layernorm_fwd", &layernorm_fwd_cuda);
  m.def("add_layernorm_fwd", &add_layernorm_fwd_cuda);
  m.def("layernorm_bwd", &layernorm_bwd_cuda);
  m.def("layernorm_mlp_fwd", [](const at::Tensor& x, const std::optional<at::Tensor>& ln_weight,
                                const std::optional<at::Tensor>& ln_bias, const at::Tensor& fc1_weight,
                                const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                                const std::optional<at::Tensor>& fc2_bias, double eps,
                                const std::optional<at::Tensor>& gamma, const std::string& approximate) {
    return layernorm_mlp_fwd_cuda(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma,
                                  approximate);
  });
  m.def("layernorm_mlp_bwd", [](const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                const at::Tensor& rstd, const at::Tensor& pre, const at::Tensor& fc2_out,
                                const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                                const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                                const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, double eps,
                                const std::optional<at::Tensor>& gamma, const std::string& approximate) {
    return layernorm_mlp_bwd_cuda(grad_out, x, mean, rstd, pre, fc2_out, ln_weight, ln_bias, fc1_weight, fc1_bias,
                                  fc2_weight, fc2_bias, eps, gamma, approximate);
  });
  m.def("patch_embed_fwd", &patch_embed_fwd_cuda);
  m.def("patch_embed_bwd",
        [](const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& prefix_tokens,
           const std::optional<at::Tensor>& pos, const std::optional<at::Tensor>& norm_weight,
           const std::optional<at::Tensor>& norm_bias, double norm_eps, bool patch_norm,
           const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_dev,
           const std::vector<bool>& needs) {
          return patch_embed_bwd_cuda(grad_out, x, weight, bias, prefix_tokens, pos, norm_weight, norm_bias, norm_eps,
                                      patch_norm, mean, std_dev, to_list(needs));
        });
  m.def("set_reverse_order", &vk_emu::set_reverse_order,
        "run the threads of each block in reverse order (exposes reads that miss a barrier)");
  m.def("set_block_filter", &vk_emu::set_block_filter,
        "run only the blocks of these blockIdx.x values (negative: from the grid's end) in the launches that follow "
        "(empty: all)");
  m.def("run_emulator_check", &run_emulator_check);
}
