"""Fused drop-in subclasses of torchvision's Swin and ViT modules (same parameters and buffers).

Window attention follows torchvision's shifted_window_attention exactly: pad, then shift, with the
shift dropped along a dimension whose padded size is at most the window; SwinV2 zeroes the key
part of the qkv bias. See vitkernels.nn.timm for how the classes are swapped in.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import swin_transformer, vision_transformer

from .. import ops
from ._common import Fused, fused_mlp, gelu_approximate, layernorm_unfusable


def _effective_shift(x: torch.Tensor, window: list[int], shift: list[int]) -> tuple[int, int]:
    padded = [-(-x.shape[1 + i] // window[i]) * window[i] for i in range(2)]
    return tuple(0 if window[i] >= padded[i] else shift[i] for i in range(2))


def _window_attention(module: nn.Module, x: torch.Tensor, table: torch.Tensor, qkv_bias: Optional[torch.Tensor],
                      logit_scale: Optional[torch.Tensor]) -> torch.Tensor:
    qkv = F.linear(x, module.qkv.weight, qkv_bias)
    out = ops.window_attention(
        qkv, module.num_heads, tuple(module.window_size), _effective_shift(x, module.window_size, module.shift_size),
        table, qkv_bias=qkv_bias, logit_scale=logit_scale, pad_first=True, backend=module.vk_backend,
    )
    return module.proj(out)


class ShiftedWindowAttention(Fused, swin_transformer.ShiftedWindowAttention):
    """torchvision Swin window attention, qkv -> proj span fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._vk("attention"):
            return super().forward(x)
        return _window_attention(self, x, self.relative_position_bias_table, self.qkv.bias, None)


class ShiftedWindowAttentionV2(Fused, swin_transformer.ShiftedWindowAttentionV2):
    """torchvision SwinV2 cosine window attention, qkv -> proj span fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._vk("attention"):
            return super().forward(x)
        bias = self.qkv.bias
        if bias is not None:
            third = bias.numel() // 3
            bias = torch.cat((bias[:third], torch.zeros_like(bias[third:2 * third]), bias[2 * third:]))
        table = 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))
        return _window_attention(self, x, table, bias, self.logit_scale.flatten())


def mlp_unfusable(norm: nn.Module, mlp: nn.Module) -> Optional[str]:
    """Why norm -> torchvision MLP (Linear, GELU, Dropout, Linear, Dropout) cannot be one op."""
    reason = layernorm_unfusable(norm)
    if reason:
        return reason
    layers = list(mlp)
    kinds = [type(m) for m in layers]
    if kinds != [nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout] or gelu_approximate(layers[1]) is None:
        return f"mlp is {[k.__name__ for k in kinds]}, not Linear-GELU-Dropout-Linear-Dropout"
    return None


def _mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fc1, act, _, fc2, _ = block.mlp
    return fused_mlp(x, block.norm2 if hasattr(block, "norm2") else block.ln_2, fc1, act, fc2, None, block.vk_backend)


class SwinTransformerBlock(Fused, swin_transformer.SwinTransformerBlock):
    """torchvision Swin block with LayerNorm+MLP fused (its attention module is fused on its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._vk("mlp"):
            return super().forward(x)
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return _mlp(self, x)


class EncoderBlock(Fused, vision_transformer.EncoderBlock):
    """torchvision ViT encoder block with fused global attention (in_proj -> out_proj) and LayerNorm+MLP."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self._vk("attention") or self._vk("mlp")):
            return super().forward(input)
        h = self.ln_1(input)
        if self._vk("attention"):
            mha = self.self_attention
            qkv = F.linear(h, mha.in_proj_weight, mha.in_proj_bias)
            h = mha.out_proj(ops.attention(qkv, mha.num_heads, backend=self.vk_backend))
        else:
            h, _ = self.self_attention(h, h, h, need_weights=False)
        x = self.dropout(h) + input
        if self._vk("mlp"):
            return _mlp(self, x)
        return x + self.mlp(self.ln_2(x))
