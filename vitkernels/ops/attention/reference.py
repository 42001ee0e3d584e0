"""Plain PyTorch global multi-head attention (ViT, DeiT): the span between qkv and proj Linears."""
from __future__ import annotations

from typing import Optional

import torch


def attention_reference(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    upcast: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over all N tokens.

    Args:
        qkv: [B, N, 3*C], the qkv Linear's output, last dim ordered (3, heads, head_dim) as timm's.
        num_heads: heads; head_dim = C // num_heads.
        bias: additive logits bias broadcastable to [B, heads, N, N], or None.
        scale: head_dim ** -0.5 when None.
        upcast: compute in float32 and cast the result back for fp16/bf16 inputs.

    Returns:
        [B, N, C] in qkv's dtype, heads concatenated in order (as before timm's proj).
    """
    batch, tokens, three_c = qkv.shape
    head_dim = three_c // 3 // num_heads
    out_dtype = qkv.dtype
    if upcast and qkv.dtype in (torch.float16, torch.bfloat16):
        qkv = qkv.float()
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * (head_dim**-0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.to(attn.dtype)
    out = attn.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(batch, tokens, three_c // 3).to(out_dtype)
