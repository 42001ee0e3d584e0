"""patch_embed: boundary checks, the backend table and the registered torch ops."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ... import backends
from .. import _checks
from .._library import custom_op, define_reference_op
from .reference import patch_embed_reference

SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? prefix_tokens, Tensor? pos_embed, int[]? pos_embed_grid, "
    "Tensor? norm_weight, Tensor? norm_bias, float norm_eps, bool patch_norm, Tensor? mean, Tensor? std, "
    "bool dynamic_pad, str output_format) -> Tensor"
)


def _torch_impl(x, weight, bias, prefix_tokens, pos_embed, pos_embed_grid, norm_weight, norm_bias, norm_eps,
                patch_norm, mean, std, dynamic_pad, output_format):
    return patch_embed_reference(
        x, weight, bias, prefix_tokens=prefix_tokens, pos_embed=pos_embed, pos_embed_grid=pos_embed_grid,
        norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps, patch_norm=patch_norm, mean=mean,
        std=std, dynamic_pad=dynamic_pad, output_format=output_format, upcast=True,
    )


patch_embed_torch = define_reference_op("patch_embed_torch", SCHEMA, _torch_impl)


# --- Triton ---------------------------------------------------------------------------------------------

BACKWARD_SCHEMA = (
    "(Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? prefix_tokens, Tensor? pos_embed, "
    "int[]? pos_embed_grid, Tensor? norm_weight, Tensor? norm_bias, float norm_eps, bool patch_norm, Tensor? mean, "
    "Tensor? std, bool[] needs) -> Tensor[]"
)
# positions in SCHEMA of the tensors that can take a gradient, in the backward op's output order
_GRAD_INPUTS = (0, 1, 2, 3, 4, 6, 7, 10, 11)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


@custom_op("vitkernels::patch_embed_triton", schema=SCHEMA)
def patch_embed_triton(x, weight, bias, prefix_tokens, pos_embed, pos_embed_grid, norm_weight, norm_bias, norm_eps,
                       patch_norm, mean, std, dynamic_pad, output_format):
    from .triton_kernels import patch_embed_fwd

    tensors = [_contiguous(t) for t in (x, weight, bias, prefix_tokens, pos_embed)]
    return patch_embed_fwd(*tensors, pos_embed_grid, _contiguous(norm_weight), _contiguous(norm_bias), norm_eps,
                           patch_norm, mean, std, output_format)


@custom_op("vitkernels::patch_embed_triton_backward", schema=BACKWARD_SCHEMA)
def patch_embed_triton_backward(dout, x, weight, bias, prefix_tokens, pos_embed, pos_embed_grid, norm_weight,
                                norm_bias, norm_eps, patch_norm, mean, std, needs):
    """Gradients of (x, weight, bias, prefix_tokens, pos_embed, norm_weight, norm_bias, mean, std).

    An entry is empty where ``needs`` is False; the conv's GEMMs run as torch convolution-backward calls.
    """
    from .triton_kernels import patch_embed_bwd

    grads = patch_embed_bwd(dout, x.contiguous(), weight.contiguous(), bias, prefix_tokens, pos_embed,
                            pos_embed_grid, _contiguous(norm_weight), norm_bias, norm_eps, patch_norm, mean, std,
                            needs)
    return [dout.new_empty(0) if g is None else g.contiguous() for g in grads]


def _output_shape(x, weight, num_prefix, output_format):
    grid = _grid(x, tuple(weight.shape[-2:]), dynamic_pad=True)
    if output_format == "map":
        return (x.shape[0], *grid, weight.shape[0])
    return (x.shape[0], num_prefix + grid[0] * grid[1], weight.shape[0])


@patch_embed_triton.register_fake
def _(x, weight, bias, prefix_tokens, pos_embed, pos_embed_grid, norm_weight, norm_bias, norm_eps, patch_norm, mean,
      std, dynamic_pad, output_format):
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[-2]
    return weight.new_empty(_output_shape(x, weight, num_prefix, output_format))


@patch_embed_triton_backward.register_fake
def _(dout, x, weight, bias, prefix_tokens, pos_embed, pos_embed_grid, norm_weight, norm_bias, norm_eps, patch_norm,
      mean, std, needs):
    inputs = (x, weight, bias, prefix_tokens, pos_embed, norm_weight, norm_bias, mean, std)
    return [t.new_empty(t.shape) if need else dout.new_empty(0) for t, need in zip(inputs, needs)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(inputs[i] for i in _GRAD_INPUTS))
    ctx.pos_embed_grid, ctx.norm_eps, ctx.patch_norm = inputs[5], inputs[8], inputs[9]


def _backward(ctx, dout):
    saved = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) and saved[k] is not None and saved[k].is_floating_point()
             for k, i in enumerate(_GRAD_INPUTS)]
    x, weight, bias, prefix_tokens, pos_embed, norm_weight, norm_bias, mean, std = saved
    grads = patch_embed_triton_backward(dout, x, weight, bias, prefix_tokens, pos_embed, ctx.pos_embed_grid,
                                        norm_weight, norm_bias, ctx.norm_eps, ctx.patch_norm, mean, std, needs)
    out: list = [None] * len(ctx.needs_input_grad)
    for k, i in enumerate(_GRAD_INPUTS):
        out[i] = grads[k] if needs[k] else None
    return tuple(out)


patch_embed_triton.register_autograd(_backward, setup_context=_setup_context)

_TRITON_FEATURES = frozenset({"prefix_tokens", "pos_embed", "resample_pos_embed", "patch_norm", "uint8", "normalize",
                              "dynamic_pad", "map", "backward"})
_TRITON_DEVICES = frozenset({"cuda"} | ({"cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else set()))

BACKENDS: dict[str, backends.Capability] = {
    "torch": backends.reference_capability(),
    "triton": backends.Capability(devices=_TRITON_DEVICES,
                                  dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                                  features=_TRITON_FEATURES),
}
IMPLEMENTATIONS = {"torch": patch_embed_torch, "triton": patch_embed_triton}


def _grid(x: torch.Tensor, patch: tuple[int, int], dynamic_pad: bool) -> tuple[int, int]:
    height, width = x.shape[-2:]
    if not dynamic_pad and (height % patch[0] or width % patch[1]):
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the patch size {patch[0]}x{patch[1]}; "
            "pass dynamic_pad=True to pad it as timm's dynamic_img_pad does"
        )
    return -(-height // patch[0]), -(-width // patch[1])


def _pos_embed_coverage(pos_embed, grid, pos_embed_grid, num_prefix, dim) -> Optional[list[int]]:
    """Checks pos_embed's length against the grid and prefix count; returns pos_embed_grid as a list."""
    length = pos_embed.shape[-2]
    if pos_embed.shape[-1] != dim or (pos_embed.dim() == 3 and pos_embed.shape[0] != 1):
        raise ValueError(f"pos_embed must be [1, L, {dim}] or [L, {dim}], got {tuple(pos_embed.shape)}")
    if pos_embed_grid is None:
        if length not in (grid[0] * grid[1], grid[0] * grid[1] + num_prefix):
            raise ValueError(
                f"pos_embed has {length} entries but the {grid[0]}x{grid[1]} grid has {grid[0] * grid[1]} patches "
                f"and {num_prefix} prefix tokens; pass pos_embed_grid to resample it"
            )
        return None
    old = _checks.pair("pos_embed_grid", pos_embed_grid)
    if length - old[0] * old[1] not in (0, num_prefix):
        raise ValueError(
            f"pos_embed has {length} entries, which is neither the {old[0]}x{old[1]} pos_embed_grid "
            f"nor that plus {num_prefix} prefix tokens"
        )
    return list(old)


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    prefix_tokens: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    pos_embed_grid: Optional[Sequence[int]] = None,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-5,
    patch_norm: bool = False,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    dynamic_pad: bool = False,
    output_format: str = "tokens",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Patch embedding: conv with kernel = stride = patch, then norm, prefix tokens and position embedding.

    Args:
        x: [B, Cin, H, W] image in the weight's dtype, or uint8 (scaled by 1/255; fold the
            preprocessing in with ``mean`` and ``std``).
        weight: [E, Cin, ph, pw] conv weight; bias: [E] or None.
        prefix_tokens: [P, E] or [1, P, E] class / distillation / register tokens in timm's order.
        pos_embed: [1, L, E] or [L, E]: L = P + N is added after the prefix concat (timm default),
            L = N to the patches only (timm's no_embed_class).
        pos_embed_grid: (Gh, Gw) grid of pos_embed; a different input grid resamples it as timm's
            dynamic_img_size does.
        patch_norm: LayerNorm(norm_weight, norm_bias, norm_eps) over E after the conv (Swin).
        mean, std: [Cin] per-channel image normalization, (x - mean) / std.
        dynamic_pad: pad H and W to patch multiples (timm's dynamic_img_pad); an error otherwise.
        output_format: "tokens" -> [B, P + N, E]; "map" -> [B, H', W', E] (no prefix tokens).
        backend: "torch", "triton", "cuda", "cpu" or "auto".

    Returns:
        [B, P + N, E] or [B, H', W', E] in the weight's dtype.
    """
    _checks.tensor("weight", weight, ndim=4)
    _checks.nonempty_dims("weight", weight, (0, 1, 2, 3), "E, Cin, ph and pw")
    _checks.tensor("x", x, ndim=4, like=weight, dtypes=(weight.dtype, torch.uint8))
    _checks.nonempty_dims("x", x, (2, 3), "H and W")
    dim, in_chans, ph, pw = weight.shape
    if x.shape[1] != in_chans:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {in_chans} (weight {tuple(weight.shape)})")
    like = {"like": weight, "dtypes": (weight.dtype,)}
    _checks.optional_tensor("bias", bias, ndim=1, shape=(dim,), **like)
    if prefix_tokens is not None:
        _checks.tensor("prefix_tokens", prefix_tokens, ndim=(2, 3), **like)
        if prefix_tokens.shape[-1] != dim or (prefix_tokens.dim() == 3 and prefix_tokens.shape[0] != 1):
            raise ValueError(f"prefix_tokens must be [P, {dim}] or [1, P, {dim}], got {tuple(prefix_tokens.shape)}")
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[-2]
    output_format = _checks.choice("output_format", output_format, ("tokens", "map"))
    if output_format == "map" and num_prefix:
        raise ValueError(f"output_format='map' cannot hold {num_prefix} prefix tokens")
    patch_norm, dynamic_pad = _checks.flag("patch_norm", patch_norm), _checks.flag("dynamic_pad", dynamic_pad)
    grid = _grid(x, (ph, pw), dynamic_pad)
    if pos_embed is not None:
        _checks.tensor("pos_embed", pos_embed, ndim=(2, 3), **like)
        pos_embed_grid = _pos_embed_coverage(pos_embed, grid, pos_embed_grid, num_prefix, dim)
        if output_format == "map" and pos_embed.shape[-2] != grid[0] * grid[1] and pos_embed_grid is None:
            raise ValueError("output_format='map' takes a pos_embed of the patches only")
    elif pos_embed_grid is not None:
        raise ValueError("pos_embed_grid given without pos_embed")
    _checks.optional_tensor("norm_weight", norm_weight, ndim=1, shape=(dim,), **like)
    _checks.optional_tensor("norm_bias", norm_bias, ndim=1, shape=(dim,), **like)
    if (norm_weight is not None or norm_bias is not None) and not patch_norm:
        raise ValueError("norm_weight / norm_bias given but patch_norm=False")
    norm_eps = _checks.positive_float("norm_eps", norm_eps)
    _checks.optional_tensor("mean", mean, ndim=1, like=weight, shape=(in_chans,))
    _checks.optional_tensor("std", std, ndim=1, like=weight, shape=(in_chans,))

    features = {
        f for f, on in (
            ("prefix_tokens", num_prefix > 0), ("pos_embed", pos_embed is not None),
            ("resample_pos_embed", pos_embed_grid is not None), ("patch_norm", patch_norm),
            ("uint8", x.dtype == torch.uint8), ("normalize", mean is not None or std is not None),
            ("dynamic_pad", dynamic_pad), ("map", output_format == "map"),
            ("backward", _checks.needs_grad(x, weight, bias, prefix_tokens, pos_embed, norm_weight, norm_bias)),
        ) if on
    }
    query = backends.Query(device=weight.device.type, dtype=weight.dtype, features=frozenset(features))
    name = backends.select("patch_embed", BACKENDS, query, backend)
    return IMPLEMENTATIONS[name](
        x, weight, bias, prefix_tokens, pos_embed, pos_embed_grid, norm_weight, norm_bias, norm_eps,
        patch_norm, mean, std, dynamic_pad, output_format,
    )


# --- Compiled ops of vitkernels._C (schemas in csrc/registration.cpp): fake kernels, autograd ----
from ... import _ext  # noqa: E402
from .reference import resample_pos_embed  # noqa: E402

# positions in patch_embed_fwd's schema of the tensors that can take a gradient, in patch_embed_bwd's
# output order
_COMPILED_GRAD_INPUTS = (0, 1, 2, 3, 4, 5, 6, 9, 10)

if _ext.unavailable_reason() is None:

    @torch.library.register_fake("vitkernels::patch_embed_fwd")
    def _patch_embed_fwd_fake(x, weight, bias, prefix_tokens, pos, norm_weight, norm_bias, norm_eps, patch_norm, mean,
                              std):
        num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[-2]
        return weight.new_empty(_output_shape(x, weight, num_prefix, "tokens"))

    @torch.library.register_fake("vitkernels::patch_embed_bwd")
    def _patch_embed_bwd_fake(grad_out, x, weight, bias, prefix_tokens, pos, norm_weight, norm_bias, norm_eps,
                              patch_norm, mean, std, needs):
        inputs = (x, weight, bias, prefix_tokens, pos, norm_weight, norm_bias, mean, std)
        return [t.new_empty(t.shape) if need and t is not None and t.is_floating_point() else grad_out.new_empty(0)
                for t, need in zip(inputs, needs)]

    def _patch_embed_compiled_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in _COMPILED_GRAD_INPUTS))
        ctx.norm = inputs[7:9]

    def _patch_embed_compiled_backward(ctx, grad_out):
        saved = ctx.saved_tensors
        needs = [bool(ctx.needs_input_grad[i]) and t is not None and t.is_floating_point()
                 for i, t in zip(_COMPILED_GRAD_INPUTS, saved)]
        x, weight, bias, prefix_tokens, pos, norm_weight, norm_bias, mean, std = saved
        grads = torch.ops.vitkernels.patch_embed_bwd(grad_out, x, weight, bias, prefix_tokens, pos, norm_weight,
                                                     norm_bias, *ctx.norm, mean, std, needs)
        out: list = [None] * len(ctx.needs_input_grad)
        for k, i in enumerate(_COMPILED_GRAD_INPUTS):
            out[i] = grads[k] if needs[k] else None
        return tuple(out)

    torch.library.register_autograd("vitkernels::patch_embed_fwd", _patch_embed_compiled_backward,
                                    setup_context=_patch_embed_compiled_setup_context)


def _position_table(pos_embed, pos_embed_grid, grid):
    """pos_embed as an [L, E] table for the input's grid: resampled in fp32 when pos_embed_grid differs."""
    table = pos_embed.reshape(-1, pos_embed.shape[-1])
    if pos_embed_grid is None or tuple(pos_embed_grid) == tuple(grid):
        return table
    covered = table.shape[0] - pos_embed_grid[0] * pos_embed_grid[1]
    return resample_pos_embed(table.float()[None], grid, pos_embed_grid, covered)[0]


def _patch_embed_compiled(x, weight, bias, prefix_tokens, pos_embed, pos_embed_grid, norm_weight, norm_bias,
                          norm_eps, patch_norm, mean, std, dynamic_pad, output_format):
    grid = _grid(x, tuple(weight.shape[-2:]), dynamic_pad=True)
    pos = None if pos_embed is None else _position_table(pos_embed, pos_embed_grid, grid)
    out = torch.ops.vitkernels.patch_embed_fwd(x, weight, bias, prefix_tokens, pos, norm_weight, norm_bias, norm_eps,
                                               patch_norm, mean, std)
    return out.view(x.shape[0], *grid, weight.shape[0]) if output_format == "map" else out


_COMPILED_FEATURES = frozenset({"prefix_tokens", "pos_embed", "resample_pos_embed", "patch_norm", "uint8", "normalize",
                                "dynamic_pad", "map", "backward"})

# The C++ kernels of csrc/patch_embed/cpu.cpp: fp16 and bf16 are computed in fp32 (the GEMMs too, by
# ATen's fp32 GEMM); a pos_embed_grid resample runs in torch before the kernel.
BACKENDS["cpu"] = backends.Capability(
    devices=frozenset({"cpu"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    features=_COMPILED_FEATURES,
)
IMPLEMENTATIONS["cpu"] = _patch_embed_compiled

# The CUDA kernels of csrc/patch_embed/cuda.cu, the same op on CUDA tensors: implicit GEMMs on tensor
# cores in fp16 / bf16 with fp32 accumulation (fp32 on the CUDA cores; a uint8 image is normalized in
# fp32, then converted), LayerNorm and sums in fp32, a deterministic backward; a pos_embed_grid
# resample runs in torch before the kernel.
BACKENDS["cuda"] = backends.Capability(
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    features=_COMPILED_FEATURES,
)
IMPLEMENTATIONS["cuda"] = _patch_embed_compiled
