"""Triton kernels of global attention (ViT, DeiT): the window attention kernels with one window.

A sequence qkv [B, N, 3C] is the map [B, 1, N, 3C] cut into a single (1, N) window: no shift, no
padding, no relative position table, so the window kernels' frame arithmetic reduces to token
indices (their SEQUENCE mode), and their key loop is flash attention's, tiled over keys with masks for odd N (197, 577,
1025). The additive bias is read through its strides, broadcast dimensions having stride 0.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..window_attention.triton_kernels import (
    prune_configs, register_specialization, window_attention_bwd, window_attention_fwd)

# ViT-B's launches: 197 tokens tiled 128x64 forward and 64x64 backward, head_dim 64, as timm, Hugging
# Face and torchvision run them (no bias) and with a bias.
GLOBAL = dict(SEQUENCE=True, SHIFTED=False, HAS_TABLE=False, HAS_FILL=False, HAS_BIAS=False)
BIASED = dict(GLOBAL, HAS_BIAS=True)
VIT_B_FORWARD, VIT_B_BACKWARD = prune_configs(197, 64), prune_configs(197, 64, backward=True)
for dtype in ("bf16", "fp16"):
    register_specialization("fwd", dtype, VIT_B_FORWARD, 64, **GLOBAL)
register_specialization("dq", "bf16", VIT_B_BACKWARD, 64, **GLOBAL)
register_specialization("dkdv", "bf16", VIT_B_BACKWARD, 64, **GLOBAL)
register_specialization("fwd", "bf16", VIT_B_FORWARD, 64, **BIASED)
register_specialization("dq", "bf16", VIT_B_BACKWARD, 64, BIAS_GRAD=True, **BIASED)
register_specialization("dkdv", "bf16", VIT_B_BACKWARD, 64, **BIASED)


def attention_fwd(qkv: torch.Tensor, num_heads: int, bias: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias) v on qkv [B, N, 3C] (fp16 / bf16 / fp32, last dim contiguous or
    made so); bias broadcastable to [B, heads, N, N]. Returns (out [B, N, C], lse [B, heads, N] fp32)."""
    tokens = qkv.shape[1]
    out, lse = window_attention_fwd(qkv.unsqueeze(1), num_heads, (1, tokens), (0, 0), scale=scale, mask_value=0.0,
                                    bias=bias)
    return out.squeeze(1), lse


def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
                  bias: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                  needs_grad: tuple[bool, bool] = (True, True)) -> tuple:
    """Gradients (dqkv [B, N, 3C], dbias in bias's shape), None where not needed in ``needs_grad``.

    dbias sums dS, which the kernel writes as [B, heads, N, N] fp32, over bias's broadcast dims.
    """
    tokens = qkv.shape[1]
    need_qkv, need_bias = needs_grad
    grads = window_attention_bwd(dout.unsqueeze(1), qkv.unsqueeze(1), out.unsqueeze(1), lse, num_heads, (1, tokens),
                                 (0, 0), scale=scale, mask_value=0.0, bias=bias,
                                 needs_grad=(need_qkv, False, False, False, need_bias and bias is not None))
    dqkv = None if grads[0] is None else grads[0].squeeze(1)
    return dqkv, grads[4]
