"""Fused drop-in subclasses of timm's transformer blocks.

Each class adds no parameter or buffer to the timm class it extends, so ``state_dict()`` keys and
values are the same both ways. ``vitkernels.apply`` swaps a built block's class for one of these and
sets ``vk_parts`` (the fusions this block takes) and ``vk_backend``; a block constructed directly
fuses everything it can with the "auto" backend. In training mode with active dropout or drop-path
a block runs timm's own forward, so those keep their exact semantics.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerScale
from timm.layers.attention import Attention
from timm.layers.mlp import Mlp
from timm.layers import PatchEmbed
from timm.models import deit, swin_transformer, swin_transformer_v2, vision_transformer
from timm.models._manipulate import checkpoint_seq

from .. import ops
from ._common import Fused, fused_mlp, gelu_approximate, layernorm_unfusable

def mlp_unfusable(norm: nn.Module, mlp: nn.Module) -> Optional[str]:
    """Why LayerNorm -> timm Mlp cannot become one layernorm_mlp call, or None."""
    reason = layernorm_unfusable(norm, (nn.LayerNorm, TimmLayerNorm))
    if reason:
        return reason
    if type(mlp) is not Mlp:
        return f"mlp is {type(mlp).__name__}, not timm Mlp"
    if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return "Mlp uses convolutions"
    if not isinstance(mlp.norm, nn.Identity):
        return "Mlp has an inner norm"
    if gelu_approximate(mlp.act) is None:
        return f"activation is {type(mlp.act).__name__}, not GELU"
    return None


def _mlp(block: nn.Module, x: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
    mlp = block.mlp
    return fused_mlp(x, block.norm2, mlp.fc1, mlp.act, mlp.fc2, gamma, block.vk_backend)


class Block(Fused, vision_transformer.Block):
    """timm ViT/DeiT Block with fused global attention (qkv -> proj span) and LayerNorm+MLP."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self._vk("attention"):
            attn = self.attn
            out = ops.attention(attn.qkv(self.norm1(x)), attn.num_heads, scale=attn.scale, backend=self.vk_backend)
            x = x + self.drop_path1(self.ls1(attn.proj_drop(attn.proj(out))))
        else:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self._vk("mlp"):
            return _mlp(self, x, self.ls2.gamma if isinstance(self.ls2, LayerScale) else None)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def attention_unfusable(attn: nn.Module) -> Optional[str]:
    if type(attn) is not Attention:
        return f"attention is {type(attn).__name__}, not timm Attention"
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            return f"attention has {name}"
    if getattr(attn, "gate", None) is not None:
        return "attention has a gate"
    return None


class SwinTransformerBlock(Fused, swin_transformer.SwinTransformerBlock):
    """timm Swin block with fused window attention (qkv -> proj span) and LayerNorm+MLP."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        if not self._vk("attention"):
            return super()._attn(x)
        attn = self.attn
        out = ops.window_attention(
            attn.qkv(x), attn.num_heads, self.window_size, self.shift_size, attn.relative_position_bias_table,
            qkv_bias=attn.qkv.bias, scale=attn.scale, backend=self.vk_backend,
        )
        return attn.proj_drop(attn.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._vk("mlp"):
            return super().forward(x)
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return _mlp(self, x, None)


class SwinTransformerV2Block(Fused, swin_transformer_v2.SwinTransformerV2Block):
    """timm SwinV2 block with fused cosine window attention (its MLP is post-norm: left as is)."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        if not self._vk("attention"):
            return super()._attn(x)
        attn = self.attn
        qkv_bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, qkv_bias)
        table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))
        out = ops.window_attention(
            qkv, attn.num_heads, self.window_size, self.shift_size, table,
            qkv_bias=qkv_bias, logit_scale=attn.logit_scale.flatten(), backend=self.vk_backend,
        )
        return attn.proj_drop(attn.proj(out))


def patch_embed_unfusable(model: nn.Module) -> Optional[str]:
    """Why a timm ViT's patch_embed + _pos_embed cannot become one patch_embed call, or None."""
    embed = model.patch_embed
    if type(embed) is not PatchEmbed:
        return f"patch_embed is {type(embed).__name__}"
    proj = embed.proj
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.padding != (0, 0) \
            or proj.dilation != (1, 1) or proj.groups != 1:
        return "patch projection is not a kernel = stride convolution"
    if not isinstance(embed.norm, nn.Identity):
        return layernorm_unfusable(embed.norm, (nn.LayerNorm, TimmLayerNorm))
    return None


class _FusedEmbedding(Fused):
    """timm ViT with patch embedding, prefix tokens and position embedding fused into one op."""

    def _vk_dropout_scope(self) -> list[nn.Module]:
        return [self.pos_drop, self.patch_embed]

    def _vk_prefix_tokens(self) -> Optional[torch.Tensor]:
        tokens = [t for t in (self.cls_token, getattr(self, "dist_token", None), self.reg_token) if t is not None]
        return torch.cat(tokens, dim=1) if tokens else None

    def _vk_embed(self, x: torch.Tensor) -> torch.Tensor:
        embed = self.patch_embed
        if embed.img_size is not None and embed.strict_img_size and tuple(x.shape[-2:]) != tuple(embed.img_size):
            raise AssertionError(f"Input size {tuple(x.shape[-2:])} doesn't match model ({tuple(embed.img_size)}).")
        norm = embed.norm if isinstance(embed.norm, nn.LayerNorm) else None
        return ops.patch_embed(
            x, embed.proj.weight, embed.proj.bias, prefix_tokens=self._vk_prefix_tokens(), pos_embed=self.pos_embed,
            pos_embed_grid=embed.grid_size if self.dynamic_img_size and self.pos_embed is not None else None,
            patch_norm=norm is not None, norm_weight=None if norm is None else norm.weight,
            norm_bias=None if norm is None else norm.bias, norm_eps=1e-5 if norm is None else norm.eps,
            dynamic_pad=embed.dynamic_img_pad, backend=self.vk_backend,
        )

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if not self._vk("patch_embed"):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        x = self.norm_pre(self.patch_drop(self._vk_embed(x)))
        if attn_mask is not None or is_causal:
            for block in self.blocks:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class VisionTransformer(_FusedEmbedding, vision_transformer.VisionTransformer):
    pass


class VisionTransformerDistilled(_FusedEmbedding, deit.VisionTransformerDistilled):
    pass
