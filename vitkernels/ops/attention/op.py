"""attention: boundary checks, the backend table and the registered torch ops."""
from __future__ import annotations

from typing import Optional

import torch

from ... import backends
from .. import _checks
from .._library import define_reference_op
from .reference import attention_reference

SCHEMA = "(Tensor qkv, int num_heads, Tensor? bias, float? scale) -> Tensor"


def _torch_impl(qkv, num_heads, bias, scale):
    return attention_reference(qkv, num_heads, bias=bias, scale=scale, upcast=True)


attention_torch = define_reference_op("attention_torch", SCHEMA, _torch_impl)

BACKENDS: dict[str, backends.Capability] = {"torch": backends.reference_capability()}
IMPLEMENTATIONS = {"torch": attention_torch}


def validate(qkv, num_heads, bias, scale):
    _checks.tensor("qkv", qkv, ndim=3)
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
    scale = _checks.optional_float("scale", scale)
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
