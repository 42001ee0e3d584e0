"""attention: boundary checks, the backend table and the registered torch ops."""
from __future__ import annotations

from typing import Optional

import torch

from ... import backends
from .. import _checks
from .._library import custom_op, define_reference_op
from ..window_attention.op import cuda_kernel_reasons, triton_devices, triton_interpreter_reasons
from .reference import attention_reference

SCHEMA = "(Tensor qkv, int num_heads, Tensor? bias, float? scale) -> Tensor"


def _torch_impl(qkv, num_heads, bias, scale):
    return attention_reference(qkv, num_heads, bias=bias, scale=scale, upcast=True)


attention_torch = define_reference_op("attention_torch", SCHEMA, _torch_impl)


@custom_op("vitkernels::attention_triton")
def attention_triton(qkv: torch.Tensor, num_heads: int, bias: Optional[torch.Tensor],
                     scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels: (out [B, N, C], lse [B, heads, N] fp32 saved for backward)."""
    from .triton_kernels import attention_fwd

    return attention_fwd(qkv, num_heads, bias, scale)


@attention_triton.register_fake
def _(qkv, num_heads, bias, scale):
    batch, tokens, three_c = qkv.shape
    return qkv.new_empty(batch, tokens, three_c // 3), qkv.new_empty(batch, num_heads, tokens, dtype=torch.float32)


@custom_op("vitkernels::attention_triton_backward")
def attention_triton_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              num_heads: int, bias: Optional[torch.Tensor], scale: Optional[float],
                              needs_grad: list[bool]) -> list[torch.Tensor]:
    """Gradients of (qkv, bias); an empty tensor where not needed."""
    from .triton_kernels import attention_bwd

    grads = attention_bwd(grad_out, qkv, out, lse, num_heads, bias, scale, tuple(needs_grad))
    return [qkv.new_empty(0) if g is None else g for g in grads]


@attention_triton_backward.register_fake
def _(grad_out, qkv, out, lse, num_heads, bias, scale, needs_grad):
    return [torch.empty_like(t) if need and t is not None else qkv.new_empty(0)
            for t, need in zip((qkv, bias), needs_grad)]


def _triton_setup_context(ctx, inputs, output):
    qkv, num_heads, bias, scale = inputs
    ctx.save_for_backward(qkv, bias, *output)
    ctx.arguments = (num_heads, scale)
    ctx.mark_non_differentiable(output[1])


def _triton_backward(ctx, grad_out, _grad_lse):
    qkv, bias, out, lse = ctx.saved_tensors
    num_heads, scale = ctx.arguments
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2] and bias is not None]
    dqkv, dbias = attention_triton_backward(grad_out, qkv, out, lse, num_heads, bias, scale, needs)
    return dqkv if needs[0] else None, None, dbias if needs[1] else None, None


attention_triton.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def _triton_impl(*args):
    return attention_triton(*args)[0]


BACKENDS: dict[str, backends.Capability] = {
    "torch": backends.reference_capability(),
    "triton": backends.Capability(
        devices=triton_devices(),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        head_dims=(1, 128),
        features=frozenset({"bias", "backward"}),
        extra=triton_interpreter_reasons,
    ),
}
IMPLEMENTATIONS = {"torch": attention_torch, "triton": _triton_impl}


def validate(qkv, num_heads, bias, scale):
    _checks.tensor("qkv", qkv, ndim=3)
    _checks.nonempty_dims("qkv", qkv, (2,), "last dim")
    num_heads = _checks.positive_int("num_heads", num_heads)
    batch, tokens, three_c = qkv.shape
    if three_c % 3 or (three_c // 3) % num_heads:
        raise ValueError(f"qkv's last dim {three_c} must be 3 * num_heads * head_dim (num_heads={num_heads})")
    if tokens == 0:
        raise ValueError(f"qkv must hold at least one token, got shape {tuple(qkv.shape)}")
    _checks.optional_tensor("bias", bias, ndim=(2, 3, 4), like=qkv)
    if bias is not None:
        full = (batch, num_heads, tokens, tokens)
        try:
            torch.broadcast_shapes(bias.shape, full)
        except RuntimeError:
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to [B, heads, N, N] = {full}") from None
    scale = _checks.optional_float("scale", scale, finite=True)
    features = {n for n, on in (("bias", bias is not None), ("backward", _checks.needs_grad(qkv, bias))) if on}
    query = backends.Query(device=qkv.device.type, dtype=qkv.dtype, head_dim=three_c // 3 // num_heads,
                           features=frozenset(features))
    return (qkv, num_heads, bias, scale), query


def attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Global multi-head self-attention (ViT, DeiT) from the qkv Linear's output.

    Args:
        qkv: [B, N, 3*C], last dim ordered (3, heads, head_dim) as timm's; N counts prefix tokens
            and patches (197, 577, ... need no padding).
        num_heads: heads; head_dim = C // num_heads.
        bias: additive logits bias broadcastable to [B, heads, N, N], or None.
        scale: head_dim ** -0.5 by default.
        backend: "torch", "triton", "cuda", "cpu" or "auto".

    Returns:
        [B, N, C] in qkv's dtype.
    """
    args, query = validate(qkv, num_heads, bias, scale)
    name = backends.select("attention", BACKENDS, query, backend)
    return IMPLEMENTATIONS[name](*args)


# --- Compiled ops of vitkernels._C (schemas in csrc/registration.cpp): fake kernels, autograd ----
from ... import _ext  # noqa: E402

if _ext.unavailable_reason() is None:

    @torch.library.register_fake("vitkernels::attention_fwd")
    def _attention_fwd_fake(qkv, num_heads, bias, scale):
        batch, tokens, three_c = qkv.shape
        return qkv.new_empty(batch, tokens, three_c // 3), qkv.new_empty(batch, num_heads, tokens,
                                                                         dtype=torch.float32)

    @torch.library.register_fake("vitkernels::attention_bwd")
    def _attention_bwd_fake(grad_out, qkv, lse, num_heads, bias, scale, bias_grad):
        dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias_grad else qkv.new_empty(
            0, dtype=torch.float32)
        return torch.empty_like(qkv), dbias

    def _compiled_setup_context(ctx, inputs, output):
        qkv, num_heads, bias, scale = inputs
        ctx.save_for_backward(qkv, bias, output[1])
        ctx.arguments = (num_heads, scale)
        ctx.mark_non_differentiable(output[1])

    def _compiled_backward(ctx, grad_out, _grad_lse):
        qkv, bias, lse = ctx.saved_tensors
        num_heads, scale = ctx.arguments
        bias_grad = bias is not None and ctx.needs_input_grad[2]
        dqkv, dbias = torch.ops.vitkernels.attention_bwd(grad_out, qkv, lse, num_heads, bias, scale, bias_grad)
        return dqkv if ctx.needs_input_grad[0] else None, None, dbias if bias_grad else None, None

    torch.library.register_autograd("vitkernels::attention_fwd", _compiled_backward, setup_context=_compiled_setup_context)


def _compiled_impl(*args):
    return torch.ops.vitkernels.attention_fwd(*args)[0]


# The C++ kernels of csrc/attention/cpu.cpp: fp16 and bf16 are computed in fp32.
BACKENDS["cpu"] = backends.Capability(
    devices=frozenset({"cpu"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    features=frozenset({"bias", "backward"}),
)
IMPLEMENTATIONS["cpu"] = _compiled_impl


# The CUDA kernels of csrc/attention/cuda.cu (the same compiled op as "cpu", dispatched on the
# device): tensor cores in fp16/bf16 with fp32 softmax, head dims up to 64.
BACKENDS["cuda"] = backends.Capability(
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16, torch.bfloat16}),
    head_dims=(1, 64),
    features=frozenset({"bias", "backward"}),
    extra=cuda_kernel_reasons,
)
IMPLEMENTATIONS["cuda"] = _compiled_impl
