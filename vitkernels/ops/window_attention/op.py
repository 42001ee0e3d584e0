"""window_attention: boundary checks, the backend table and the registered torch ops."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ... import backends
from .. import _checks
from .._library import custom_op, define_reference_op
from .reference import MASK_VALUE, window_attention_reference

SCHEMA = (
    "(Tensor qkv, int num_heads, int[] window_size, int[] shift_size, Tensor? bias_table, "
    "Tensor? qkv_bias, Tensor? logit_scale, float? scale, bool pad_first, float mask_value) -> Tensor"
)


def _torch_impl(qkv, num_heads, window_size, shift_size, bias_table, qkv_bias, logit_scale, scale, pad_first,
                mask_value):
    return window_attention_reference(
        qkv, num_heads, tuple(window_size), tuple(shift_size), bias_table,
        qkv_bias=qkv_bias, logit_scale=logit_scale, scale=scale, pad_first=pad_first, mask_value=mask_value,
        upcast=True,
    )


window_attention_torch = define_reference_op("window_attention_torch", SCHEMA, _torch_impl)


@custom_op("vitkernels::window_attention_triton")
def window_attention_triton(
    qkv: torch.Tensor, num_heads: int, window_size: list[int], shift_size: list[int],
    bias_table: Optional[torch.Tensor], qkv_bias: Optional[torch.Tensor], logit_scale: Optional[torch.Tensor],
    scale: Optional[float], pad_first: bool, mask_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels: (out [B, H, W, C], lse [B * nW, heads, N] fp32 saved for backward)."""
    from .triton_kernels import window_attention_fwd

    return window_attention_fwd(qkv, num_heads, window_size, shift_size, bias_table, qkv_bias, logit_scale, scale,
                                pad_first, mask_value)


@window_attention_triton.register_fake
def _(qkv, num_heads, window_size, shift_size, bias_table, qkv_bias, logit_scale, scale, pad_first, mask_value):
    batch, height, width, three_c = qkv.shape
    windows = -(-height // window_size[0]) * -(-width // window_size[1])
    tokens = window_size[0] * window_size[1]
    return (qkv.new_empty(batch, height, width, three_c // 3),
            qkv.new_empty(batch * windows, num_heads, tokens, dtype=torch.float32))


@custom_op("vitkernels::window_attention_triton_backward")
def window_attention_triton_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
    window_size: list[int], shift_size: list[int], bias_table: Optional[torch.Tensor],
    qkv_bias: Optional[torch.Tensor], logit_scale: Optional[torch.Tensor], scale: Optional[float], pad_first: bool,
    mask_value: float, needs_grad: list[bool],
) -> list[torch.Tensor]:
    """Gradients of (qkv, bias_table, qkv_bias, logit_scale); an empty tensor where not needed."""
    from .triton_kernels import window_attention_bwd

    grads = window_attention_bwd(grad_out, qkv, out, lse, num_heads, window_size, shift_size, bias_table, qkv_bias,
                                 logit_scale, scale, pad_first, mask_value, needs_grad=(*needs_grad, False))
    return [qkv.new_empty(0) if g is None else g for g in grads[:4]]


@window_attention_triton_backward.register_fake
def _(grad_out, qkv, out, lse, num_heads, window_size, shift_size, bias_table, qkv_bias, logit_scale, scale,
      pad_first, mask_value, needs_grad):
    inputs = (qkv, bias_table, qkv_bias, logit_scale)
    return [torch.empty_like(t) if need and t is not None else qkv.new_empty(0) for t, need in zip(inputs, needs_grad)]


def _triton_setup_context(ctx, inputs, output):
    qkv, num_heads, window_size, shift_size, bias_table, qkv_bias, logit_scale, scale, pad_first, mask_value = inputs
    ctx.save_for_backward(qkv, bias_table, qkv_bias, logit_scale, *output)
    ctx.arguments = (num_heads, window_size, shift_size, scale, pad_first, mask_value)
    ctx.mark_non_differentiable(output[1])


def _triton_backward(ctx, grad_out, _grad_lse):
    qkv, bias_table, qkv_bias, logit_scale, out, lse = ctx.saved_tensors
    num_heads, window_size, shift_size, scale, pad_first, mask_value = ctx.arguments
    inputs = (qkv, bias_table, qkv_bias, logit_scale)
    needs = [bool(ctx.needs_input_grad[i]) and t is not None for i, t in zip((0, 4, 5, 6), inputs)]
    grads = window_attention_triton_backward(grad_out, qkv, out, lse, num_heads, window_size, shift_size, bias_table,
                                             qkv_bias, logit_scale, scale, pad_first, mask_value, needs)
    dqkv, dtable, dqkv_bias, dlogit_scale = (g if need else None for g, need in zip(grads, needs))
    return dqkv, None, None, None, dtable, dqkv_bias, dlogit_scale, None, None, None


window_attention_triton.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def _triton_impl(*args):
    return window_attention_triton(*args)[0]


def triton_devices() -> frozenset[str]:
    """Where the Triton kernels run: CUDA, and CPU tensors too under TRITON_INTERPRET=1."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return frozenset({"cuda", "cpu"}) if interpreted else frozenset({"cuda"})


def triton_interpreter_reasons(query: backends.Query) -> list[str]:
    """The Triton interpreter computes bf16 wrongly (raw bits), so CPU bf16 is refused."""
    if query.device == "cpu" and query.dtype == torch.bfloat16:
        return ["bfloat16 under the Triton interpreter (CPU tensors) gives wrong results"]
    return []


BACKENDS: dict[str, backends.Capability] = {
    "torch": backends.reference_capability(),
    "triton": backends.Capability(
        devices=triton_devices(),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        head_dims=(1, 128),
        window=(1, 32),
        features=frozenset({"shift", "padding", "pad_first", "bias_table", "qkv_bias", "cosine", "backward"}),
        extra=triton_interpreter_reasons,
    ),
}
IMPLEMENTATIONS = {"torch": window_attention_torch, "triton": _triton_impl}


def validate(qkv, num_heads, window_size, shift_size, bias_table, qkv_bias, logit_scale, scale, pad_first,
             mask_value):
    """Checks the public arguments; returns them normalized (pairs as tuples) and the backend query."""
    _checks.tensor("qkv", qkv, ndim=4)
    _checks.nonempty_dims("qkv", qkv, (3,), "last dim")
    num_heads = _checks.positive_int("num_heads", num_heads)
    window = _checks.pair("window_size", window_size)
    shift = _checks.pair("shift_size", shift_size, minimum=0)
    batch, height, width, three_c = qkv.shape
    if three_c % 3 or (three_c // 3) % num_heads:
        raise ValueError(
            f"qkv's last dim {three_c} must be 3 * num_heads * head_dim (num_heads={num_heads})"
        )
    if any(s >= w for s, w in zip(shift, window)):
        raise ValueError(f"shift_size {shift} must be smaller than window_size {window} in each dimension")
    if height == 0 or width == 0:
        raise ValueError(f"qkv map must be non-empty, got H={height}, W={width}")
    table_rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    _checks.optional_tensor("bias_table", bias_table, ndim=2, like=qkv, shape=(table_rows, num_heads))
    _checks.optional_tensor("qkv_bias", qkv_bias, ndim=1, like=qkv, shape=(three_c,))
    _checks.optional_tensor("logit_scale", logit_scale, like=qkv)
    if logit_scale is not None and logit_scale.numel() != num_heads:
        raise ValueError(f"logit_scale must hold num_heads={num_heads} values, got shape {tuple(logit_scale.shape)}")
    scale = _checks.optional_float("scale", scale, finite=True)
    if scale is not None and logit_scale is not None:
        raise ValueError("scale and logit_scale are exclusive: cosine attention (logit_scale) has no softmax scale")
    _checks.flag("pad_first", pad_first)
    mask_value = _checks.optional_float("mask_value", mask_value)
    if mask_value is None or not mask_value <= 0:
        raise ValueError(f"mask_value must be a float <= 0 such as -100.0, got {mask_value!r}")

    padded = height % window[0] != 0 or width % window[1] != 0
    features = {
        name for name, on in (
            ("shift", any(shift)),
            ("padding", padded),
            ("pad_first", pad_first and padded and any(shift)),
            ("bias_table", bias_table is not None),
            ("qkv_bias", qkv_bias is not None and padded),
            ("cosine", logit_scale is not None),
            ("backward", _checks.needs_grad(qkv, bias_table, qkv_bias, logit_scale)),
        ) if on
    }
    query = backends.Query(
        device=qkv.device.type, dtype=qkv.dtype, head_dim=three_c // 3 // num_heads,
        window=window, features=frozenset(features),
    )
    args = (qkv, num_heads, list(window), list(shift), bias_table, qkv_bias, logit_scale, scale, pad_first,
            mask_value)
    return args, query


def window_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window_size,
    shift_size=(0, 0),
    bias_table: Optional[torch.Tensor] = None,
    *,
    qkv_bias: Optional[torch.Tensor] = None,
    logit_scale: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    pad_first: bool = False,
    mask_value: float = MASK_VALUE,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Swin (shifted) window attention from the qkv map to the map before proj.

    Args:
        qkv: [B, H, W, 3*C] output of the qkv Linear on the un-shifted, un-padded map, last dim
            ordered (3, heads, head_dim) as timm's; fp16, bf16, fp32 or fp64.
        num_heads: number of heads (head_dim = C // num_heads).
        window_size: int or (Wh, Ww).
        shift_size: int or (sh, sw), 0 <= s < window; zero disables the shift along that dim.
        bias_table: [(2Wh-1)*(2Ww-1), heads] relative position bias table (SwinV2: the computed
            16*sigmoid(cpb_mlp(coords)) table), or None.
        qkv_bias: [3C] the qkv Linear's bias, which is what padding positions (zero rows before
            the Linear in every zoo) hold as q, k, v; None when the Linear has no bias.
        logit_scale: SwinV2 cosine attention: per-head log scale ([heads] values), clamped at
            log(100).
        scale: softmax scale, head_dim ** -0.5 by default (not with logit_scale).
        pad_first: False: shift then pad (timm). True: pad then shift (original Swin, Hugging
            Face, torchvision).
        mask_value: added to logits across shifted-window regions; -100 as in timm, torchvision
            and Hugging Face Swin (Hugging Face Swinv2 adds its mask twice: -200).
        backend: "torch", "triton", "cuda", "cpu" or "auto" (default: use_backend /
            VITKERNELS_BACKEND / auto).

    Returns:
        [B, H, W, C] in qkv's dtype.
    """
    args, query = validate(qkv, num_heads, window_size, shift_size, bias_table, qkv_bias, logit_scale, scale,
                           pad_first, mask_value)
    name = backends.select("window_attention", BACKENDS, query, backend)
    return IMPLEMENTATIONS[name](*args)


# --- Compiled ops of vitkernels._C (schemas in csrc/registration.cpp): fake (meta) kernels -------
from ... import _ext  # noqa: E402

if _ext.unavailable_reason() is None:

    @torch.library.register_fake("vitkernels::gather_relative_position_bias")
    def _gather_relative_position_bias_fake(bias_table, window_h, window_w):
        rows = (2 * window_h - 1) * (2 * window_w - 1)
        torch._check(window_h >= 1 and window_w >= 1, lambda: f"window ({window_h}, {window_w}) must be positive")
        torch._check(
            bias_table.dim() == 2 and bias_table.shape[0] == rows,
            lambda: f"bias_table must have shape [{rows}, heads] for window ({window_h}, {window_w}), "
            f"got {tuple(bias_table.shape)}",
        )
        n = window_h * window_w
        return bias_table.new_empty((bias_table.shape[1], n, n))

    @torch.library.register_fake("vitkernels::window_attention_fwd")
    def _window_attention_fwd_fake(qkv, num_heads, window_size, shift_size, bias_table, qkv_bias, logit_scale, scale,
                                   pad_first, mask_value):
        batch, height, width, three_c = qkv.shape
        windows = -(-height // window_size[0]) * -(-width // window_size[1])
        tokens = window_size[0] * window_size[1]
        return (qkv.new_empty(batch, height, width, three_c // 3),
                qkv.new_empty(batch, windows, num_heads, tokens, dtype=torch.float32))

    @torch.library.register_fake("vitkernels::window_attention_bwd")
    def _window_attention_bwd_fake(grad_out, qkv, lse, num_heads, window_size, shift_size, bias_table, qkv_bias,
                                   logit_scale, scale, pad_first, mask_value):
        return tuple(qkv.new_empty(0, dtype=torch.float32) if t is None else torch.empty_like(t)
                     for t in (qkv, bias_table, qkv_bias, logit_scale))

    def _compiled_setup_context(ctx, inputs, output):
        qkv, num_heads, window_size, shift_size, bias_table, qkv_bias, logit_scale, scale, pad_first, mask_value = (
            inputs)
        ctx.save_for_backward(qkv, bias_table, qkv_bias, logit_scale, output[1])
        ctx.arguments = (num_heads, window_size, shift_size, scale, pad_first, mask_value)
        ctx.mark_non_differentiable(output[1])

    def _compiled_backward(ctx, grad_out, _grad_lse):
        qkv, bias_table, qkv_bias, logit_scale, lse = ctx.saved_tensors
        num_heads, window_size, shift_size, scale, pad_first, mask_value = ctx.arguments
        grads = torch.ops.vitkernels.window_attention_bwd(
            grad_out, qkv, lse, num_heads, window_size, shift_size, bias_table, qkv_bias, logit_scale, scale,
            pad_first, mask_value,
        )
        dqkv, dtable, dqkv_bias, dlogit_scale = (
            g if ctx.needs_input_grad[i] and t is not None else None
            for g, i, t in zip(grads, (0, 4, 5, 6), (qkv, bias_table, qkv_bias, logit_scale))
        )
        return dqkv, None, None, None, dtable, dqkv_bias, dlogit_scale, None, None, None

    torch.library.register_autograd("vitkernels::window_attention_fwd", _compiled_backward, setup_context=_compiled_setup_context)


def _compiled_impl(*args):
    return torch.ops.vitkernels.window_attention_fwd(*args)[0]


# The C++ kernels of csrc/window_attention/cpu.cpp: fp16 and bf16 are computed in fp32.
BACKENDS["cpu"] = backends.Capability(
    devices=frozenset({"cpu"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    features=frozenset({"shift", "padding", "pad_first", "bias_table", "qkv_bias", "cosine", "backward"}),
)
IMPLEMENTATIONS["cpu"] = _compiled_impl


def cuda_kernel_reasons(query: backends.Query) -> list[str]:
    """Why the CUDA C++ attention kernels refuse a float32 input, beyond the dtype list."""
    if query.dtype == torch.float32:
        return ["float32: the CUDA kernels run on tensor cores in float16/bfloat16 (use 'triton' or 'torch')"]
    return []


# The CUDA kernels of csrc/window_attention/cuda.cu (the same compiled op as "cpu", dispatched on
# the device): tensor cores (mma.sync) in fp16/bf16 with fp32 softmax, head dims up to 64
# zero-padded to 32 or 64 in shared memory; windows up to 32 keep the bias-table gradient's
# per-warp partial sums within the shared memory of sm_80 and sm_90.
BACKENDS["cuda"] = backends.Capability(
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16, torch.bfloat16}),
    head_dims=(1, 64),
    window=(1, 32),
    features=frozenset({"shift", "padding", "pad_first", "bias_table", "qkv_bias", "cosine", "backward"}),
    extra=cuda_kernel_reasons,
)
IMPLEMENTATIONS["cuda"] = _compiled_impl
